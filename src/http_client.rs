//! A minimal HTTP/1.1 client over any byte stream.
//!
//! Used by the `http` probe (TCP) and by the CLI talking to the control socket (Unix). One
//! request per connection keeps it simple and bounded; nothing here needs keep-alive.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tunnelkeeper_providers::{http, Resolver};

/// Sends one request on `stream` and returns the response with its body still streaming.
pub async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    http::send(stream, request).await.context("HTTP request")
}

/// Reads a whole response body (bounded by `limit` bytes).
pub async fn read_body(response: Response<Incoming>, limit: usize) -> anyhow::Result<Bytes> {
    http::read_body(response, limit)
        .await
        .map_err(|e| anyhow!(e))
}

/// `GET http://host[:port]/path` within `timeout`; returns the status code.
pub async fn get_url(url: &str, resolver: &Resolver, timeout: Duration) -> anyhow::Result<u16> {
    let (authority, path) = split_http_url(url)?;
    let work = async {
        let target = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = resolver.resolve_socket(&target, timeout).await?;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let request = Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::USER_AGENT, "tunnelkeeper-probe")
            .body(Full::new(Bytes::new()))?;
        let response = send(stream, request).await?;
        Ok::<u16, anyhow::Error>(response.status().as_u16())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow!("timed out after {timeout:?}"))?
}

/// Splits `http://authority/path` into its authority and path (default `/`).
pub fn split_http_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("only http:// URLs are supported");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("URL has no host");
    }
    Ok((authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_http_url("http://127.0.0.1:8080/health").unwrap(),
            ("127.0.0.1:8080", "/health")
        );
        assert_eq!(
            split_http_url("http://example.com").unwrap(),
            ("example.com", "/")
        );
        assert!(split_http_url("https://example.com/").is_err());
        assert!(split_http_url("http:///x").is_err());
    }
}
