//! A `tailscale` tunnel's settings, correct by construction: one shape per mode, built once
//! from the keys as written by [`TailscaleSettings::parse`], where every rule about them lives.

use std::path::PathBuf;
use std::time::Duration;

use crate::spec::{self, Problems, SpecError};

use super::{DEFAULT_CHECK_TIMEOUT, DEFAULT_HTTPS_PORT, DEFAULT_STATUS_INTERVAL};

/// The only HTTPS ports Funnel accepts (<https://tailscale.com/kb/1223/funnel>).
pub const FUNNEL_PORTS: [u16; 3] = [443, 8443, 10000];

/// Which way the tunnel uses the tailnet, with exactly what that way needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailscaleMode {
    /// Reach a service on another node of the tailnet.
    Peer {
        /// The node's HostName, MagicDNS name (with or without the trailing dot, or just its
        /// first label) or one of its Tailscale IPs; trimmed, never starting with `-`.
        peer: String,
    },
    /// Expose a local port to the tailnet (`tailscale serve`).
    Serve(Handler),
    /// Expose a local port to the internet (`tailscale funnel`); the handler's port is one of
    /// [`FUNNEL_PORTS`].
    Funnel(Handler),
}

/// The serve/funnel handler a tunnel adds: which HTTPS port and mount path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// The HTTPS port (`--https`, [`DEFAULT_HTTPS_PORT`] unless set).
    pub https_port: u16,
    /// The mount path (`--set-path`, `/` unless set): starts with `/`, no whitespace, control
    /// characters, `?` or `#`. Tunnels and the operator's own handlers on one node need
    /// distinct port/path pairs.
    pub path: String,
}

impl Default for Handler {
    fn default() -> Self {
        Handler {
            https_port: DEFAULT_HTTPS_PORT,
            path: "/".to_string(),
        }
    }
}

impl TailscaleMode {
    /// Peer mode to `peer`, taken as it is (use [`TailscaleSettings::parse`] for checked input).
    pub fn peer(peer: &str) -> TailscaleMode {
        TailscaleMode::Peer {
            peer: peer.to_string(),
        }
    }

    /// Serve mode on port 443 at `/`.
    pub fn serve() -> TailscaleMode {
        TailscaleMode::Serve(Handler::default())
    }

    /// Funnel mode on port 443 at `/`.
    pub fn funnel() -> TailscaleMode {
        TailscaleMode::Funnel(Handler::default())
    }
}

/// Settings of a `tailscale` tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailscaleSpec {
    /// Peer, serve or funnel, with what each needs.
    pub mode: TailscaleMode,
    /// The `tailscale` CLI to run; [`super::DEFAULT_BINARY`] (looked up in `PATH`) when `None`.
    pub binary: Option<String>,
    /// The tailscaled socket, passed as the global `--socket=<path>` flag (for a userspace
    /// `tailscaled --tun=userspace-networking --socket=<path>`); valid UTF-8.
    pub socket: Option<PathBuf>,
    /// Peer mode: the service's port on the peer. Serve/funnel: the local port to expose.
    pub port: u16,
    /// How long each CLI call may take ([`DEFAULT_CHECK_TIMEOUT`] by default). A ping's own
    /// `--timeout` is derived from it, leaving room for the CLI's pause after a pong.
    pub check_timeout: Duration,
    /// How often the status watcher polls for a backend or peer that went away
    /// ([`DEFAULT_STATUS_INTERVAL`] by default): the delay of the hard signal.
    pub status_interval: Duration,
    /// `host:port` (or a URL) dialled through the daemon's resolver instead of the mode's own
    /// target (the peer's Tailscale IP and `port`; the serve/funnel URL's host on 443). For a
    /// MagicDNS name through `100.100.100.100` (`homebox.tail1234.ts.net:22` with
    /// `dns.nameservers: [100.100.100.100]`), or for tests, which cannot bind port 443.
    pub dial_address: Option<String>,
}

impl TailscaleSpec {
    /// The command that prints the CLI's version (its first argument is the program).
    pub fn version_argv(&self) -> Vec<String> {
        let binary = self.binary.as_deref().unwrap_or(super::DEFAULT_BINARY);
        vec![binary.to_owned(), "version".to_owned()]
    }

    /// Settings for `mode` and `port` with the default binary and timeouts, no socket and no
    /// dial override.
    pub fn new(mode: TailscaleMode, port: u16) -> Self {
        TailscaleSpec {
            mode,
            binary: None,
            socket: None,
            port,
            check_timeout: DEFAULT_CHECK_TIMEOUT,
            status_interval: DEFAULT_STATUS_INTERVAL,
            dial_address: None,
        }
    }
}

/// The keys of a `tailscale` tunnel as written, before any rule is applied.
#[derive(Debug, Clone, Default)]
pub struct TailscaleSettings {
    /// `mode`: `peer` (the default), `serve` or `funnel`.
    pub mode: Option<String>,
    /// `binary`
    pub binary: Option<String>,
    /// `socket`
    pub socket: Option<PathBuf>,
    /// `peer`
    pub peer: Option<String>,
    /// `port`
    pub port: Option<u16>,
    /// `check_timeout`
    pub check_timeout: Option<Duration>,
    /// `dial_address` (its `host:port` form is the config layer's to check)
    pub dial_address: Option<String>,
    /// `https_port`
    pub https_port: Option<u16>,
    /// `serve_path`
    pub serve_path: Option<String>,
}

impl TailscaleSettings {
    /// Builds the spec, or says what is wrong: one message per broken rule, each at its key.
    pub fn parse(self) -> Result<TailscaleSpec, Vec<SpecError>> {
        let mut problems = Problems::default();
        let mode = self.mode.as_deref().unwrap_or("peer");
        if !matches!(mode, "peer" | "serve" | "funnel") {
            problems.add(
                "mode",
                format!("unknown tailscale mode `{mode}`: use `peer`, `serve` or `funnel`"),
            );
            return problems.finish(None);
        }
        let Some(port) = self.port else {
            problems.add(
                "port",
                "tailscale needs `port`: the service's port on the peer, or the local port to \
                 serve",
            );
            return problems.finish(None);
        };
        let port = spec::port(&mut problems, "port", port);
        let binary = spec::binary(&mut problems, self.binary);
        if self.socket.as_ref().is_some_and(|s| s.to_str().is_none()) {
            problems.add("socket", "is not valid UTF-8");
        }
        let handler = if mode == "peer" {
            if let Some(key) = [
                self.https_port.map(|_| "https_port"),
                self.serve_path.as_ref().map(|_| "serve_path"),
            ]
            .into_iter()
            .flatten()
            .next()
            {
                problems.add(
                    key,
                    "`https_port` and `serve_path` are for `mode: serve` or `funnel`",
                );
            }
            None
        } else {
            let https_port = spec::port(
                &mut problems,
                "https_port",
                self.https_port.unwrap_or(DEFAULT_HTTPS_PORT),
            );
            if mode == "funnel" && https_port != 0 && !FUNNEL_PORTS.contains(&https_port) {
                problems.add(
                    "https_port",
                    format!("funnel accepts 443, 8443 or 10000, not {https_port}"),
                );
            }
            let path = self.serve_path.unwrap_or_else(|| "/".to_string());
            if !path.starts_with('/')
                || path
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
            {
                problems.add(
                    "serve_path",
                    format!("`{path}` must be a URL path starting with `/`, e.g. /ssh"),
                );
            }
            Some(Handler { https_port, path })
        };
        let mode = match (handler, self.peer.as_deref().map(str::trim)) {
            (None, None | Some("")) => {
                problems.add(
                    "peer",
                    "peer mode needs `peer`: the node's HostName, MagicDNS name or Tailscale IP",
                );
                None
            }
            // The CLI would read it as a flag; no node name or address starts with a dash.
            (None, Some(peer)) if peer.starts_with('-') => {
                problems.add("peer", format!("`{peer}` is not a node name or address"));
                None
            }
            (None, Some(peer)) => Some(TailscaleMode::peer(peer)),
            (Some(_), Some(_)) => {
                problems.add(
                    "peer",
                    "`peer` is for `mode: peer`; serve and funnel expose this node's own port",
                );
                None
            }
            (Some(handler), None) if mode == "funnel" => Some(TailscaleMode::Funnel(handler)),
            (Some(handler), None) => Some(TailscaleMode::Serve(handler)),
        };
        let spec = mode.map(|mode| TailscaleSpec {
            mode,
            binary,
            socket: self.socket,
            port,
            check_timeout: self.check_timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT),
            status_interval: DEFAULT_STATUS_INTERVAL,
            dial_address: self.dial_address,
        });
        problems.finish(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: &str, port: u16) -> TailscaleSettings {
        TailscaleSettings {
            mode: Some(mode.to_string()),
            port: Some(port),
            ..TailscaleSettings::default()
        }
    }

    fn keys(settings: TailscaleSettings) -> Vec<&'static str> {
        match settings.parse() {
            Ok(spec) => panic!("expected errors, built {spec:?}"),
            Err(errors) => errors.into_iter().map(|e| e.key).collect(),
        }
    }

    #[test]
    fn each_mode_builds_its_own_shape() {
        let peer = TailscaleSettings {
            peer: Some(" homebox ".to_string()),
            ..settings("peer", 22)
        }
        .parse()
        .expect("peer");
        assert_eq!(peer, TailscaleSpec::new(TailscaleMode::peer("homebox"), 22));
        let serve = TailscaleSettings {
            https_port: Some(8443),
            serve_path: Some("/ssh".to_string()),
            ..settings("serve", 8080)
        }
        .parse()
        .expect("serve");
        assert_eq!(
            serve.mode,
            TailscaleMode::Serve(Handler {
                https_port: 8443,
                path: "/ssh".to_string()
            })
        );
        let funnel = settings("funnel", 3000).parse().expect("funnel");
        assert_eq!(funnel.mode, TailscaleMode::funnel());
        assert_ne!(funnel, TailscaleSpec::new(TailscaleMode::serve(), 3000));
    }

    #[test]
    fn a_spec_that_cannot_be_built_names_each_broken_key_once() {
        let with_peer = |peer: &str, base: TailscaleSettings| TailscaleSettings {
            peer: Some(peer.to_string()),
            ..base
        };
        assert_eq!(keys(settings("peer", 22)), ["peer"]);
        assert_eq!(keys(with_peer("  ", settings("peer", 22))), ["peer"]);
        assert_eq!(keys(with_peer("--help", settings("peer", 22))), ["peer"]);
        assert_eq!(keys(with_peer("homebox", settings("peer", 0))), ["port"]);
        assert_eq!(
            keys(with_peer("homebox", settings("serve", 8080))),
            ["peer"]
        );
        assert_eq!(keys(settings("edge", 22)), ["mode"]);
        assert_eq!(
            keys(TailscaleSettings {
                port: None,
                ..with_peer("homebox", settings("peer", 22))
            }),
            ["port"]
        );
        assert_eq!(
            keys(TailscaleSettings {
                https_port: Some(8080),
                ..settings("funnel", 3000)
            }),
            ["https_port"]
        );
        assert_eq!(
            keys(TailscaleSettings {
                serve_path: Some("ssh".to_string()),
                ..settings("serve", 3000)
            }),
            ["serve_path"]
        );
        assert_eq!(
            keys(TailscaleSettings {
                serve_path: Some("/a b".to_string()),
                ..settings("serve", 3000)
            }),
            ["serve_path"]
        );
        assert_eq!(
            keys(TailscaleSettings {
                https_port: Some(443),
                ..with_peer("homebox", settings("peer", 22))
            }),
            ["https_port"]
        );
        assert_eq!(
            keys(TailscaleSettings {
                binary: Some(String::new()),
                ..with_peer("homebox", settings("peer", 22))
            }),
            ["binary"]
        );
    }
}
