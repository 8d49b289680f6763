//! The CLI's side of the control socket.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tokio::net::UnixStream;

use crate::http_client;
use crate::status::DaemonStatus;

/// Largest status document the CLI accepts.
const MAX_STATUS: usize = 64 * 1024 * 1024;
/// Largest answer to a write the CLI accepts.
const MAX_ANSWER: usize = 1024 * 1024;

/// The daemon refused a request: its HTTP status and `{"error": ...}` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: hyper::StatusCode,
    /// The daemon's message.
    pub message: String,
}

/// A client for one daemon's control socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends a request and returns the response if its status is a success; otherwise the
    /// daemon's `{"error": ...}` becomes the error.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Response<Incoming>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| anyhow::anyhow!(connect_error(&self.socket, &e)))?;
        let body = body
            .map(|v| Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
            .unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        // The daemon closes a peer it does not serve (not root, not its own uid, not a reader;
        // or no free slot) without a word of HTTP: say so rather than "connection closed".
        let response = http_client::send(stream, request).await.with_context(|| {
            format!(
                "the daemon closed the connection on {} without answering: permission denied \
                 (only root, the daemon's user and `daemon.readers` may connect) or all \
                 connection slots are taken",
                self.socket.display()
            )
        })?;
        if !response.status().is_success() {
            let status = response.status();
            let body = http_client::read_body(response, 64 * 1024).await?;
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ApiError { status, message }.into());
        }
        Ok(response)
    }

    /// `GET /v1/status` as raw JSON.
    pub async fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        let response = self.request(Method::GET, "/v1/status", None).await?;
        let body = http_client::read_body(response, MAX_STATUS).await?;
        serde_json::from_slice(&body).context("status is not JSON")
    }

    /// `GET /v1/status`, typed.
    pub async fn status(&self) -> anyhow::Result<DaemonStatus> {
        let v = self.status_json().await?;
        serde_json::from_value(v).context("unexpected status document")
    }

    /// Sends a write and returns the daemon's JSON answer.
    async fn write(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self.request(method, path, body).await?;
        let body = http_client::read_body(response, MAX_ANSWER).await?;
        serde_json::from_slice(&body).context("the daemon's answer is not JSON")
    }

    /// `POST /v1/services/SERVICE/pin {"tunnel": TUNNEL}`.
    pub async fn pin(&self, service: &str, tunnel: &str) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({ "tunnel": tunnel });
        self.write(Method::POST, &pin_path(service), Some(body))
            .await
    }

    /// `DELETE /v1/services/SERVICE/pin`.
    pub async fn unpin(&self, service: &str) -> anyhow::Result<serde_json::Value> {
        self.write(Method::DELETE, &pin_path(service), None).await
    }

    /// `POST /v1/services/SERVICE/tunnels/TUNNEL/VERB` (DELETE for `undrain`): restart,
    /// drain, undrain or probe one tunnel.
    pub async fn tunnel(
        &self,
        service: &str,
        tunnel: &str,
        verb: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let (method, verb) = match verb {
            "undrain" => (Method::DELETE, "drain"),
            other => (Method::POST, other),
        };
        let path = format!(
            "/v1/services/{}/tunnels/{}/{verb}",
            segment(service),
            segment(tunnel)
        );
        self.write(method, &path, None).await
    }

    /// `POST /v1/ssh/reset {"target": TARGET}`: closes the pool's sessions to TARGET.
    pub async fn ssh_reset(&self, target: &str) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({ "target": target });
        self.write(Method::POST, "/v1/ssh/reset", Some(body)).await
    }

    /// `POST /v1/reload`: what changed, or an [`ApiError`] (422) naming what is wrong.
    pub async fn reload(&self) -> anyhow::Result<serde_json::Value> {
        self.write(Method::POST, "/v1/reload", None).await
    }

    /// `GET /v1/events`; calls `line` for every NDJSON line until the stream ends.
    pub async fn events(
        &self,
        since: u64,
        follow: bool,
        mut line: impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let path = format!("/v1/events?since={since}&follow={follow}");
        let mut body = self.request(Method::GET, &path, None).await?.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading events")?;
            if let Some(data) = frame.data_ref() {
                pending.extend_from_slice(data);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let rest = pending.split_off(i + 1);
                    let text = String::from_utf8_lossy(&pending[..i]).into_owned();
                    pending = rest;
                    line(&text)?;
                }
            }
        }
        Ok(())
    }
}

/// The pin endpoint of a service (its name is percent-encoded: names are restricted, but a
/// typo with a slash must not reach another endpoint).
/// What to do when the socket cannot be opened: the advice depends on why.
fn connect_error(socket: &Path, error: &std::io::Error) -> String {
    let socket_text = socket.display();
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            // The socket (0660) and its directory (0750) belong to the daemon's group.
            let group = std::fs::metadata(socket)
                .or_else(|_| std::fs::metadata(socket.parent().unwrap_or(Path::new("/"))))
                .ok()
                .and_then(|meta| {
                    use std::os::unix::fs::MetadataExt;
                    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid())).ok()
                })
                .flatten()
                .map_or_else(|| "tunnelkeeper".to_owned(), |group| group.name);
            format!(
                "permission denied on {socket_text}: the daemon is running, but only root, its \
                 user and members of its group `{group}` may open the socket. Add your user to \
                 the group (`sudo usermod -aG {group} $USER`, then log in again) and list the user \
                 or the group in `daemon.readers`, or use sudo"
            )
        }
        std::io::ErrorKind::NotFound => format!(
            "cannot connect to {socket_text}: no such socket (is the daemon running? set \
             --socket or TUNNELKEEPER_SOCKET)"
        ),
        std::io::ErrorKind::ConnectionRefused => format!(
            "cannot connect to {socket_text}: nothing answers there (the daemon is not running; \
             the socket is left over)"
        ),
        _ => format!(
            "cannot connect to {socket_text}: {error} (is the daemon running? set --socket or \
             TUNNELKEEPER_SOCKET)"
        ),
    }
}

fn pin_path(service: &str) -> String {
    format!("/v1/services/{}/pin", segment(service))
}

/// `name` as one URL path segment (percent-encoded).
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_say_what_to_do() {
        let socket = Path::new("/nonexistent-dir-tk/control.sock");
        let denied = connect_error(
            socket,
            &std::io::Error::from_raw_os_error(nix::libc::EACCES),
        );
        assert!(
            denied.starts_with(
                "permission denied on /nonexistent-dir-tk/control.sock: the daemon is running"
            ) && denied.contains("usermod -aG")
                && denied.contains("daemon.readers")
                && !denied.contains("is the daemon running"),
            "{denied}"
        );
        let missing = connect_error(
            socket,
            &std::io::Error::from_raw_os_error(nix::libc::ENOENT),
        );
        assert!(
            missing.contains("no such socket (is the daemon running?"),
            "{missing}"
        );
        let refused = connect_error(
            socket,
            &std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED),
        );
        assert!(refused.contains("the daemon is not running"), "{refused}");
    }
}
