//! A minimal HTTP/1.1 client over any byte stream, shared by the providers that read a CLI's
//! local API (cloudflared `/ready`, ngrok `/api/tunnels`) and by the daemon (control-socket
//! client, `http` probes). One request per connection keeps it bounded and simple.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::ProviderError;

/// Largest body a local API answer may have.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Sends one request on `stream`; the response body is still streaming.
pub async fn send<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future drives the socket; it ends when the response is fully read.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(request).await
}

/// Reads a whole response body, at most `limit` bytes.
pub async fn read_body(response: Response<Incoming>, limit: usize) -> Result<Bytes, String> {
    http_body_util::Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("reading body: {e}"))
}

/// `GET http://addr/path` within `timeout`: the status and the body.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Bytes), ProviderError> {
    let what = format!("GET http://{addr}{path}");
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ProviderError::Dial {
                target: addr.to_string(),
                source,
            })?;
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| ProviderError::Unhealthy(format!("{what}: {e}")))?;
        let response = send(stream, request)
            .await
            .map_err(|e| ProviderError::Unhealthy(format!("{what}: {e}")))?;
        let status = response.status().as_u16();
        let body = read_body(response, MAX_BODY)
            .await
            .map_err(|e| ProviderError::Unhealthy(format!("{what}: {e}")))?;
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProviderError::Timeout {
            what,
            after: timeout,
        })?
}

/// `GET` of a JSON document: the status and the parsed body.
pub async fn get_json(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), ProviderError> {
    let (status, body) = get(addr, path, timeout).await?;
    let value = serde_json::from_slice(&body).map_err(|e| {
        ProviderError::Unhealthy(format!("GET http://{addr}{path}: not JSON ({e})"))
    })?;
    Ok((status, value))
}
