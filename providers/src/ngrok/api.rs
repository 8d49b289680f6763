//! The agent's local API (`/api/tunnels`, `/api/status`) and where a public URL is dialled.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::util::parse_go_duration;
use crate::{http, Health, ProviderError};

use super::*;

/// The public URL listed by `GET /api/tunnels`, if any: the command-line tunnel's (the only
/// one in a config of our own), preferring HTTPS for an `http` endpoint.
pub(super) fn public_url_from_tunnels(body: &Value) -> Option<String> {
    let tunnels = body.get("tunnels")?.as_array()?;
    let urls: Vec<(&str, &str)> = tunnels
        .iter()
        .filter_map(|t| {
            let url = t.get("public_url")?.as_str().filter(|u| !u.is_empty())?;
            let name = t.get("name").and_then(Value::as_str).unwrap_or("");
            Some((name, url))
        })
        .collect();
    let pick = urls
        .iter()
        .find(|(name, url)| *name == "command_line" && url.starts_with("https://"))
        .or_else(|| urls.iter().find(|(name, _)| *name == "command_line"))
        .or_else(|| urls.iter().find(|(_, url)| url.starts_with("https://")))
        .or_else(|| urls.first())?;
    Some(pick.1.to_string())
}

/// Reads `GET /api/status`: `online`, and the session legs' latency (the lowest, since the
/// agent uses whichever leg is up) with every leg listed in the detail.
pub(super) fn health_from_status(body: &Value) -> Result<Health, String> {
    let status = body
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| "/api/status has no `status`".to_string())?;
    if status != "online" {
        return Err(format!("agent status is {status:?}"));
    }
    let legs = body
        .get("session")
        .and_then(|s| s.get("legs"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut latency: Option<Duration> = None;
    let mut shown = Vec::new();
    for leg in legs {
        let region = leg.get("region").and_then(Value::as_str).unwrap_or("?");
        let raw = leg.get("latency").and_then(Value::as_str).unwrap_or("");
        match parse_go_duration(raw) {
            Ok(rtt) => {
                latency = Some(latency.map_or(rtt, |best| best.min(rtt)));
                shown.push(format!("{region} {raw}"));
            }
            Err(err) => shown.push(format!("{region} (latency {err})")),
        }
    }
    let detail = if shown.is_empty() {
        "online, no session legs".to_string()
    } else {
        format!("online via {}", shown.join(", "))
    };
    Ok(Health {
        latency,
        detail: Some(detail),
    })
}

/// Where `dial()` connects for a public URL: its host and port, the port defaulting to 443 for
/// an `http` endpoint (ngrok's edge serves HTTPS). A URL that names a port keeps it.
pub(super) fn dial_target(proto: NgrokProto, url: &str) -> crate::Result<String> {
    let invalid =
        |why: &str| ProviderError::Spawn(format!("ngrok reported a public URL {url:?} that {why}"));
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    // A bracketed IPv6 host has colons of its own: only a `:` after the `]` starts a port.
    let port = match authority.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .and_then(|(_, tail)| tail.strip_prefix(':')),
        None => authority.rsplit_once(':').map(|(_, port)| port),
    };
    let has_port = port.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if authority.is_empty() {
        return Err(invalid("has no host"));
    }
    match (has_port, proto) {
        (true, _) => Ok(authority.to_string()),
        (false, NgrokProto::Http) => Ok(format!("{authority}:{HTTPS_PORT}")),
        (false, NgrokProto::Tcp) => Err(invalid("names no port")),
    }
}

/// The agent's own view of its session: `Ok` when `/api/status` says `online`.
pub(super) async fn agent_online(web_addr: SocketAddr) -> crate::Result<Health> {
    let api = format!("ngrok API at {web_addr}");
    let (status, body) = match http::get_json(web_addr, "/api/status", API_TIMEOUT).await {
        Ok(answer) => answer,
        Err(err @ ProviderError::Timeout { .. }) => return Err(err),
        Err(err) => {
            return Err(ProviderError::Unhealthy(format!(
                "{api}: {API_UNREACHABLE}: {err}"
            )))
        }
    };
    if status != 200 {
        return Err(ProviderError::Unhealthy(format!(
            "{api}: GET /api/status answered {status}"
        )));
    }
    health_from_status(&body).map_err(|why| ProviderError::Unhealthy(format!("{api}: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TUNNELS_TCP: &str = include_str!("../../tests/fixtures/ngrok/api-tunnels-tcp.json");
    const TUNNELS_HTTP: &str = include_str!("../../tests/fixtures/ngrok/api-tunnels-http.json");
    const TUNNELS_EMPTY: &str = include_str!("../../tests/fixtures/ngrok/api-tunnels-empty.json");
    const STATUS: &str = include_str!("../../tests/fixtures/ngrok/api-status.json");

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    #[test]
    fn public_url_comes_from_the_tunnels_fixtures() {
        assert_eq!(
            public_url_from_tunnels(&json(TUNNELS_TCP)).as_deref(),
            Some("tcp://0.tcp.ngrok.io:53476")
        );
        assert_eq!(
            public_url_from_tunnels(&json(TUNNELS_HTTP)).as_deref(),
            Some("https://d95211d2.ngrok.app")
        );
        assert_eq!(public_url_from_tunnels(&json(TUNNELS_EMPTY)), None);
    }

    #[test]
    fn latency_comes_from_the_status_fixture() {
        let health = health_from_status(&json(STATUS)).expect("online");
        assert_eq!(health.latency, Some(Duration::from_millis(87)));
        assert_eq!(health.detail.as_deref(), Some("online via au 87ms"));
        let offline = json(r#"{"status":"reconnecting","session":{"legs":[]}}"#);
        assert!(health_from_status(&offline)
            .unwrap_err()
            .contains("reconnecting"));
    }

    #[test]
    fn dial_targets() {
        let t = |p, u: &str| dial_target(p, u).ok();
        assert_eq!(
            t(NgrokProto::Tcp, "tcp://0.tcp.ngrok.io:53476").as_deref(),
            Some("0.tcp.ngrok.io:53476")
        );
        assert_eq!(t(NgrokProto::Tcp, "tcp://0.tcp.ngrok.io"), None);
        assert_eq!(
            t(NgrokProto::Http, "https://d95211d2.ngrok.app").as_deref(),
            Some("d95211d2.ngrok.app:443")
        );
        assert_eq!(
            t(NgrokProto::Http, "http://x.ngrok.app/").as_deref(),
            Some("x.ngrok.app:443")
        );
        assert_eq!(
            t(NgrokProto::Http, "https://127.0.0.1:8443").as_deref(),
            Some("127.0.0.1:8443")
        );
        assert_eq!(
            t(NgrokProto::Http, "https://[::1]").as_deref(),
            Some("[::1]:443")
        );
        assert_eq!(
            t(NgrokProto::Tcp, "tcp://[::1]:2222").as_deref(),
            Some("[::1]:2222")
        );
        assert_eq!(t(NgrokProto::Tcp, "tcp://[::1]"), None);
    }
}
