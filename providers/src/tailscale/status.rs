//! Reading what the CLI prints: `tailscale status --json` (the backend and the peer),
//! `tailscale ping` lines, and the URL or enable prompt of `serve`/`funnel`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::GO_ZERO_TIME;
use crate::util::parse_go_duration;
use crate::Health;

/// A peer as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PeerView {
    /// Where dials go: its first Tailscale IP (IPv4 preferred) and the service port.
    pub(super) addr: SocketAddr,
    /// Connected to the coordination server (not the same as reachable).
    pub(super) online: bool,
    /// `LastSeen`, when the status gives one.
    pub(super) last_seen: Option<String>,
}

/// The parts of `tailscale status --json` the provider reads. The format is documented as
/// "subject to change", so every field is optional and unknown ones are ignored.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Status {
    #[serde(rename = "BackendState", default)]
    pub(super) backend_state: String,
    #[serde(rename = "AuthURL", default)]
    pub(super) auth_url: String,
    #[serde(rename = "Health", default)]
    pub(super) health: Option<Vec<String>>,
    #[serde(rename = "Peer", default)]
    pub(super) peer: Option<BTreeMap<String, PeerStatus>>,
    #[serde(rename = "Self", default)]
    pub(super) self_node: Option<PeerStatus>,
}

/// The parts of `tailscale serve status --json` (ipn.ServeConfig) the provider reads.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ServeConfig {
    #[serde(rename = "Web", default)]
    pub(super) web: Option<BTreeMap<String, WebServerConfig>>,
}

/// One `host:port` of `Web`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct WebServerConfig {
    #[serde(rename = "Handlers", default)]
    pub(super) handlers: Option<BTreeMap<String, HttpHandler>>,
}

/// One mount path's handler.
#[derive(Debug, Default, Deserialize)]
pub(super) struct HttpHandler {
    /// What it proxies to (empty for a file or text handler).
    #[serde(rename = "Proxy", default)]
    pub(super) proxy: String,
}

/// One entry of `Peer` in `tailscale status --json`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct PeerStatus {
    #[serde(rename = "HostName", default)]
    pub(super) host_name: String,
    #[serde(rename = "DNSName", default)]
    pub(super) dns_name: String,
    #[serde(rename = "TailscaleIPs", default)]
    pub(super) tailscale_ips: Option<Vec<String>>,
    #[serde(rename = "Online", default)]
    pub(super) online: bool,
    #[serde(rename = "LastSeen", default)]
    pub(super) last_seen: String,
}

impl PeerStatus {
    pub(super) fn ips(&self) -> Vec<IpAddr> {
        self.tailscale_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect()
    }

    /// How well `wanted` names this peer, best first: 0 an IP, 1 the full MagicDNS name,
    /// 2 its first label, 3 the HostName; `None` if not at all. A reinstalled node often
    /// leaves an offline namesake behind, so exact names must beat HostNames.
    pub(super) fn match_rank(&self, wanted: &str) -> Option<u8> {
        if let Ok(ip) = wanted.parse::<IpAddr>() {
            return self.ips().contains(&ip).then_some(0);
        }
        let wanted_name = wanted.trim_end_matches('.');
        let dns = self.dns_name.trim_end_matches('.');
        if !dns.is_empty() && dns.eq_ignore_ascii_case(wanted_name) {
            return Some(1);
        }
        if dns
            .split('.')
            .next()
            .is_some_and(|label| !label.is_empty() && label.eq_ignore_ascii_case(wanted))
        {
            return Some(2);
        }
        if !self.host_name.is_empty() && self.host_name.eq_ignore_ascii_case(wanted) {
            return Some(3);
        }
        None
    }
}

/// Why the status (with a confirming ping, for an offline peer) says the path is gone. Each is
/// a hard signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Down {
    /// The backend is not `Running` (logged out, stopped, waiting for approval, starting).
    #[error("tailscale is not running (BackendState {state}){detail}")]
    Backend { state: String, detail: String },
    /// The peer is not connected to the control plane and does not answer a ping either.
    #[error("peer {peer} is offline{detail}")]
    PeerOffline { peer: String, detail: String },
    /// No peer of that name or address.
    #[error("peer {peer} is not in this node's tailnet (peers: {known})")]
    PeerUnknown { peer: String, known: String },
    /// The peer has no address to dial.
    #[error("peer {peer} has no Tailscale IP")]
    PeerWithoutIp { peer: String },
}

/// Reads a status: `Ok(Some(view))` is the peer (peer mode), `Ok(None)` a running backend
/// (serve/funnel), `Err` why the path is down. A peer shown offline is still returned: only a
/// ping can tell whether it is gone.
pub(super) fn evaluate(
    status: &Status,
    peer: Option<&str>,
    port: u16,
) -> Result<Option<PeerView>, Down> {
    if status.backend_state != "Running" {
        return Err(backend_down(status));
    }
    let Some(wanted) = peer else {
        return Ok(None);
    };
    let peers = status.peer.as_ref();
    let best = peers
        .into_iter()
        .flat_map(|peers| peers.values())
        .filter_map(|p| p.match_rank(wanted).map(|rank| (rank, !p.online, p)))
        .min_by_key(|(rank, offline, _)| (*rank, *offline))
        .map(|(_, _, p)| p);
    let Some(found) = best else {
        let mut known: Vec<&str> = peers
            .into_iter()
            .flat_map(|peers| peers.values())
            .map(|p| p.host_name.as_str())
            .collect();
        known.sort_unstable();
        let shown = match known.len() {
            0 => "none".to_string(),
            n if n > 10 => format!("{}, … ({n} in all)", known[..10].join(", ")),
            _ => known.join(", "),
        };
        return Err(Down::PeerUnknown {
            peer: wanted.to_string(),
            known: shown,
        });
    };
    let last_seen = (!found.last_seen.is_empty() && found.last_seen != GO_ZERO_TIME)
        .then(|| found.last_seen.clone());
    let ips = found.ips();
    let ip = ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| ips.first())
        .ok_or_else(|| Down::PeerWithoutIp {
            peer: wanted.to_string(),
        })?;
    Ok(Some(PeerView {
        addr: SocketAddr::new(*ip, port),
        online: found.online,
        last_seen,
    }))
}

/// The enable URL the CLI prints when HTTPS or Funnel is off on the tailnet: the first
/// `https://` word of output that carries no `Available …:` header (which introduces the
/// served URL instead).
pub(super) fn enable_url(output: &str) -> Option<String> {
    if parse_serve_url(output).is_some() {
        return None;
    }
    output
        .split_whitespace()
        .find(|word| word.starts_with("https://"))
        .map(str::to_string)
}

/// Explains a backend that is not `Running`, with the login URL and health messages.
pub(super) fn backend_down(status: &Status) -> Down {
    let mut parts = Vec::new();
    match status.backend_state.as_str() {
        "NeedsLogin" => parts.push("it needs to be logged in".to_string()),
        "NeedsMachineAuth" => {
            parts.push("it waits for a tailnet admin to approve this machine".to_string())
        }
        "Stopped" => parts.push("it was stopped (`tailscale up` starts it)".to_string()),
        "Starting" => parts.push("it is still connecting".to_string()),
        "NoState" | "" => parts.push("tailscaled has no state yet".to_string()),
        _ => {}
    }
    if !status.auth_url.is_empty() {
        parts.push(format!("log in at {}", status.auth_url));
    }
    let health: Vec<&str> = status
        .health
        .iter()
        .flatten()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .collect();
    if !health.is_empty() {
        parts.push(format!("health: {}", health.join("; ")));
    }
    let state = if status.backend_state.is_empty() {
        "unknown".to_string()
    } else {
        status.backend_state.clone()
    };
    let detail = if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join("; "))
    };
    Down::Backend { state, detail }
}

/// Reads the last `pong from <node> (<ip>[, <peerapi port>]) via <path> in <latency>` line:
/// `<path>` is `DERP(<region>)`, `peer-relay(<relay>)` or the direct `ip:port`.
pub(super) fn parse_ping(stdout: &str) -> Option<Health> {
    stdout.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("pong from ")?;
        let (head, latency) = rest.rsplit_once(" in ")?;
        let (_, via) = head.rsplit_once(" via ")?;
        let latency = parse_go_duration(latency.trim()).ok()?;
        let relayed = via.starts_with("DERP(") || via.starts_with("peer-relay(");
        let detail = if relayed {
            format!("via {via}")
        } else {
            "direct".to_string()
        };
        Some(Health {
            latency: Some(latency),
            detail: Some(detail),
        })
    })
}

/// `ping "<ip>" timed out`.
pub(super) fn is_ping_timeout(line: &str) -> bool {
    let line = line.trim();
    line.starts_with("ping ") && line.ends_with(" timed out")
}

/// Where `serve`/`funnel` said the port is reachable.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ServeUrl {
    pub(super) url: String,
    /// `Available on the internet:` rather than `Available within your tailnet:`.
    pub(super) internet: bool,
}

/// Finds the first `https://host/` line after an `Available …:` header.
pub(super) fn parse_serve_url(output: &str) -> Option<ServeUrl> {
    let mut internet = None;
    for line in output.lines().map(str::trim) {
        match line {
            "Available on the internet:" => internet = Some(true),
            "Available within your tailnet:" => internet = Some(false),
            _ => {
                if let Some(internet) = internet {
                    if line.starts_with("https://") || line.starts_with("http://") {
                        let url = line.split_whitespace().next()?.to_string();
                        return Some(ServeUrl { url, internet });
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const RUNNING: &str = include_str!("../../tests/fixtures/tailscale/status-running.json");
    const OFFLINE: &str = include_str!("../../tests/fixtures/tailscale/status-peer-offline.json");
    const NEEDS_LOGIN: &str = include_str!("../../tests/fixtures/tailscale/status-needslogin.json");

    fn status(json: &str) -> Status {
        serde_json::from_str(json).expect("fixture parses")
    }

    #[test]
    fn running_status_finds_the_peer_by_every_name() {
        let status = status(RUNNING);
        let want: SocketAddr = "100.101.102.103:22".parse().expect("addr");
        for name in [
            "homebox",
            "HomeBox",
            "homebox.tail1234.ts.net",
            "homebox.tail1234.ts.net.",
            "100.101.102.103",
            "fd7a:115c:a1e0::abcd:ef01",
        ] {
            assert_eq!(
                evaluate(&status, Some(name), 22).map(|v| v.map(|v| (v.addr, v.online))),
                Ok(Some((want, true))),
                "{name}"
            );
        }
        assert_eq!(evaluate(&status, None, 22), Ok(None));
        match evaluate(&status, Some("nosuch"), 22) {
            Err(Down::PeerUnknown { known, .. }) => assert_eq!(known, "homebox, old-laptop"),
            other => panic!("{other:?}"),
        }
        // A known but offline peer is returned as such: only a ping can tell it is gone.
        let view = evaluate(&status, Some("old-laptop"), 22)
            .expect("known")
            .expect("peer");
        assert!(!view.online);
        assert_eq!(view.last_seen.as_deref(), Some("2026-10-01T17:00:00Z"));
    }

    #[test]
    fn offline_and_logged_out_explain_themselves() {
        let view = evaluate(&status(OFFLINE), Some("homebox"), 22)
            .expect("known")
            .expect("peer");
        assert!(!view.online);
        assert_eq!(view.last_seen.as_deref(), Some("2026-11-20T10:14:58Z"));
        let down = evaluate(&status(NEEDS_LOGIN), None, 22).unwrap_err();
        assert_eq!(
            down.to_string(),
            "tailscale is not running (BackendState NeedsLogin): it needs to be logged in; \
             log in at https://login.tailscale.com/a/0123456789abc; health: You are logged out."
        );
    }

    #[test]
    fn exact_names_beat_an_offline_namesake() {
        let status: Status = serde_json::from_str(
            r#"{"BackendState":"Running","Peer":{
                "a":{"HostName":"box","DNSName":"box.t.ts.net.","TailscaleIPs":["100.64.0.1"],"Online":false},
                "b":{"HostName":"box","DNSName":"box-1.t.ts.net.","TailscaleIPs":["fd7a::2","100.64.0.2"],"Online":true}}}"#,
        )
        .expect("json");
        // Same HostName: the online one wins; IPv4 is preferred even when listed second.
        assert_eq!(
            evaluate(&status, Some("box-1"), 1).map(|v| v.map(|v| v.addr)),
            Ok(Some("100.64.0.2:1".parse().expect("addr")))
        );
        // The exact MagicDNS name wins over a HostName match, even offline.
        assert_eq!(
            evaluate(&status, Some("box.t.ts.net"), 1).map(|v| v.map(|v| (v.addr, v.online))),
            Ok(Some(("100.64.0.1:1".parse().expect("addr"), false)))
        );
        // Nulls where Go prints them.
        let status: Status =
            serde_json::from_str(r#"{"BackendState":"Running","Health":null,"Peer":null}"#)
                .expect("json");
        assert!(matches!(
            evaluate(&status, Some("x"), 1),
            Err(Down::PeerUnknown { .. })
        ));
    }

    #[test]
    fn pongs_parse_with_path_and_latency() {
        let derp = parse_ping("pong from homebox (100.101.102.103) via DERP(fra) in 23ms\n");
        assert_eq!(
            derp,
            Some(Health {
                latency: Some(Duration::from_millis(23)),
                detail: Some("via DERP(fra)".to_string()),
            })
        );
        let direct = parse_ping(
            "pong from homebox (100.101.102.103, 41112) via 203.0.113.9:41641 in 1.204s",
        );
        assert_eq!(
            direct,
            Some(Health {
                latency: Some(Duration::from_millis(1204)),
                detail: Some("direct".to_string()),
            })
        );
        assert_eq!(parse_ping("ping \"100.101.102.103\" timed out"), None);
        assert!(is_ping_timeout("ping \"100.101.102.103\" timed out"));
    }

    #[test]
    fn an_enable_prompt_is_told_from_a_served_url() {
        let prompt = "Funnel is not enabled on your tailnet.\nTo enable, visit:\n\n         \
                      https://login.tailscale.com/f/funnel?node=n1\n";
        assert_eq!(
            enable_url(prompt).as_deref(),
            Some("https://login.tailscale.com/f/funnel?node=n1")
        );
        let served = "Available on the internet:\n\nhttps://edgebox.tail1234.ts.net/\n";
        assert_eq!(enable_url(served), None);
    }

    #[test]
    fn serve_output_gives_the_url() {
        let serve = "Available within your tailnet:\n\nhttps://edgebox.tail1234.ts.net/\n\
                     |-- proxy http://127.0.0.1:8080\n\nServe started and running in the background.\n\
                     To disable the proxy, run: tailscale serve --https=443 off\n";
        assert_eq!(
            parse_serve_url(serve),
            Some(ServeUrl {
                url: "https://edgebox.tail1234.ts.net/".to_string(),
                internet: false
            })
        );
        let funnel = serve.replace(
            "Available within your tailnet:",
            "Available on the internet:",
        );
        assert!(parse_serve_url(&funnel).is_some_and(|u| u.internet));
        assert_eq!(parse_serve_url("https://x/ without a header"), None);
    }
}
