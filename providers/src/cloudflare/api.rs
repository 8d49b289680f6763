//! cloudflared's local HTTP answers (`/ready`, `/quicktunnel` on its metrics server) and the
//! Access listener's state in `/proc/net/tcp`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::{dial_tcp, http};

/// `GET /ready` on the metrics server: the number of registered edge connections, or why the
/// tunnel is not ready (cloudflared's own answer when it gave one).
pub(super) async fn read_ready(metrics: SocketAddr, timeout: Duration) -> Result<u64, String> {
    match http::get(metrics, "/ready", timeout).await {
        Ok((status, body)) => ready_verdict(status, &body),
        Err(err) => Err(format!("cloudflared metrics server at {metrics}: {err}")),
    }
}

/// Judges a `/ready` answer: 200 with `readyConnections >= 1` is ready, anything else is not,
/// and the reason quotes the body's own fields.
fn ready_verdict(status: u16, body: &[u8]) -> Result<u64, String> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let connections = parsed
        .as_ref()
        .and_then(|v| v.get("readyConnections"))
        .and_then(Value::as_u64);
    match (status, connections) {
        (200, Some(n)) if n >= 1 => Ok(n),
        (status, Some(n)) => Err(format!(
            "cloudflared /ready answered {status} with readyConnections={n}: no edge connection is registered"
        )),
        (status, None) => Err(format!(
            "cloudflared /ready answered {status} without readyConnections: {}",
            snippet(body)
        )),
    }
}

/// The quick tunnel's hostname: `GET /quicktunnel` first; the banner line only if this
/// cloudflared has no such route.
pub(super) async fn quick_hostname(
    metrics: SocketAddr,
    timeout: Duration,
    banner: Option<&str>,
) -> Result<String, String> {
    match http::get(metrics, "/quicktunnel", timeout).await {
        Ok((200, body)) => {
            let hostname = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("hostname")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .filter(|h| !h.is_empty());
            match hostname {
                Some(hostname) => Ok(hostname),
                None => Err(format!(
                    "cloudflared /quicktunnel has no hostname yet: {}",
                    snippet(&body)
                )),
            }
        }
        Ok((404, _)) => banner.map(str::to_string).ok_or_else(|| {
            "cloudflared has no /quicktunnel route and printed no trycloudflare.com banner yet"
                .to_string()
        }),
        Ok((status, body)) => Err(format!(
            "cloudflared /quicktunnel answered {status}: {}",
            snippet(&body)
        )),
        Err(err) => Err(format!("cloudflared /quicktunnel: {err}")),
    }
}

/// Whether the Access listener is bound. Read from `/proc/net/tcp` rather than by connecting:
/// every connection to `cloudflared access tcp` opens a session to Cloudflare (and may start a
/// browser login), which a readiness poll must not do. Without procfs, a connect has to do.
pub(super) async fn access_listening(listener: SocketAddr, budget: Duration) -> Result<(), String> {
    match listening_in_procfs(listener) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("nothing listens on {listener} yet")),
        Err(_) => dial_tcp(listener, budget)
            .await
            .map(drop)
            .map_err(|err| err.to_string()),
    }
}

/// Looks for a listening TCP socket on `addr` (or the wildcard address with its port) in
/// `/proc/net/tcp`.
pub(super) fn listening_in_procfs(addr: SocketAddr) -> io::Result<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let ip = match addr {
        // The kernel prints the address as the in-memory (network order) word in host order.
        SocketAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.ip().octets())),
        SocketAddr::V6(_) => return Ok(false),
    };
    let exact = format!("{ip}:{:04X}", addr.port());
    let wildcard = format!("00000000:{:04X}", addr.port());
    // `st` 0A is TCP_LISTEN.
    Ok(table.lines().skip(1).any(|row| {
        let mut fields = row.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        state == Some("0A") && (local == Some(exact.as_str()) || local == Some(wildcard.as_str()))
    }))
}

/// Up to 200 characters of a body, on one line, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 200 {
        format!("{}...", one_line.chars().take(200).collect::<String>())
    } else if one_line.is_empty() {
        "(empty body)".to_string()
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_answers_from_the_fixtures() {
        let ok = br#"{"status":200,"readyConnections":4,"connectorId":"2f1a6a4e-94c2-4b8e-9b71-0c1b5e6f7a10"}"#;
        assert_eq!(ready_verdict(200, ok), Ok(4));
        let down = br#"{"status":503,"readyConnections":0,"connectorId":"2f1a6a4e-94c2-4b8e-9b71-0c1b5e6f7a10"}"#;
        let why = ready_verdict(503, down).unwrap_err();
        assert!(
            why.contains("503") && why.contains("readyConnections=0"),
            "{why}"
        );
        assert!(ready_verdict(200, br#"{"readyConnections":0}"#).is_err());
        assert!(ready_verdict(200, b"OK").is_err());
    }
}
