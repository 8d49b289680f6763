//! The `tailscale` provider: a path through the tailnet of an already running `tailscaled`,
//! driven only through the `tailscale` CLI.
//!
//! Three modes:
//!
//! - **peer**: the service runs on another node of the tailnet. Start reads
//!   `tailscale status --json`: the backend must be `Running` and the peer (matched by its
//!   HostName, its MagicDNS name with or without the trailing dot, or any of its Tailscale IPs)
//!   known. A dial is a TCP connect to the peer's first Tailscale IP (IPv4 preferred) and
//!   `port`. Native health is `tailscale ping --c 1 --until-direct=false --timeout T <ip>`:
//!   its latency, and whether the path is direct or relayed through DERP. The ping is given
//!   the peer's Tailscale IP from the status, never the configured name: the CLI resolves only
//!   a MagicDNS label or the exact DNSName with its trailing dot (cmd/tailscale/cli/ping.go),
//!   so an FQDN without the dot or a HostName would fail every ping of a working path.
//!   A peer that the status shows `Online: false` is not dead on that alone: `Online` is the
//!   coordination server's view, and a control-plane blip leaves the data path working. The
//!   provider pings it, and only a peer that is offline *and* silent counts as gone.
//! - **serve** / **funnel**: this node exposes a local port to the tailnet / the internet with
//!   `tailscale serve|funnel --bg --https=<https_port> --set-path=<serve_path> <port>`, after
//!   checking with `tailscale serve status --json` that no other handler (the operator's own,
//!   or another tunnel's) holds that port and path. The endpoint is the URL the CLI prints; a
//!   dial goes to that URL's host and port, end to end through Tailscale's proxy. Stop removes
//!   only this tunnel's handler, `tailscale serve --https=<port> --set-path=<path> off`
//!   (`funnel` likewise): `--https=443 off` alone would remove every handler on the port. When
//!   HTTPS or Funnel is not enabled on the tailnet the CLI prints an enable URL and waits; the
//!   start then fails quoting that URL. Both need tailscale [`MIN_VERSION_SERVE`] (checked at
//!   start) and, for a daemon that is not root, `tailscale set --operator=<its user>`.
//!
//! No process runs for the tunnel's lifetime: every CLI call is a one-shot
//! [`crate::process::run`] bounded by `check_timeout`. The hard signal therefore comes from a status
//! watcher, a task that reads `tailscale status --json` every `status_interval` and closes the
//! tunnel the moment the backend is not `Running` or (peer mode) the peer is gone, or offline
//! and not answering a ping, or once the status call has failed three times in a row
//! (tailscaled unreachable). A [`Tunnel::check`] that reads such a status closes the tunnel
//! too.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::version::{self, Version};
use crate::{Provider, ProviderError, StartContext, Tunnel};

mod cli;
mod spec;
mod status;
mod tunnel;

use cli::{Cli, Exposed};
pub use spec::{Handler, TailscaleMode, TailscaleSettings, TailscaleSpec, FUNNEL_PORTS};
use status::evaluate;
use tunnel::{confirm, watch_status, Shared, TailscaleTunnel};

/// The CLI looked up in `PATH` unless `binary` says otherwise.
pub const DEFAULT_BINARY: &str = "tailscale";
/// How long one CLI call may take unless configured otherwise.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the status watcher reads `tailscale status --json` unless configured otherwise.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(3);

/// What a missing CLI is reported with.
const INSTALL_HINT: &str = "install Tailscale (https://tailscale.com/download; on Linux: \
     `curl -fsSL https://tailscale.com/install.sh | sh`) or set `binary:` to the full path of \
     the `tailscale` CLI";
/// Status of a big tailnet is large (about 1 KiB per peer): never cut the JSON short.
const STATUS_OUTPUT_CAP: usize = 4 * 1024 * 1024;
/// Enough for any other command's output.
const OUTPUT_CAP: usize = 64 * 1024;
/// Time a `tailscale ping` call needs on top of its `--timeout`: after a pong the CLI sleeps a
/// second before it decides it is done (even with `--c 1`), and it asks tailscaled for status
/// first.
const PING_OVERHEAD: Duration = Duration::from_millis(1500);
/// Status calls that may fail in a row (timeouts, tailscaled restarting) before the watcher
/// declares the path dead.
const MAX_STATUS_FAILURES: u32 = 3;
/// How much of a command's output goes into an error message.
const MAX_QUOTED: usize = 400;
/// Go's zero `time.Time`, which the status prints for "never".
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// The oldest tailscale whose `serve`/`funnel` take `--bg`, `--https` and `--set-path` (the
/// CLI rewritten in 1.52.0).
pub const MIN_VERSION_SERVE: Version = Version(1, 52, 0);
/// The HTTPS port serve/funnel use unless configured otherwise.
pub const DEFAULT_HTTPS_PORT: u16 = 443;

/// Brings up `tailscale` tunnels.
#[derive(Debug)]
pub struct TailscaleProvider {
    spec: TailscaleSpec,
}

impl TailscaleProvider {
    /// A provider for the given settings.
    pub fn new(spec: TailscaleSpec) -> Self {
        TailscaleProvider { spec }
    }
}

#[async_trait]
impl Provider for TailscaleProvider {
    /// Peer mode: checks the backend and the peer in `tailscale status --json`. Serve/funnel:
    /// checks the backend, then exposes the port and reads its URL. Then starts the status
    /// watcher.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        let spec = &self.spec;
        let (peer, exposed) = match &spec.mode {
            TailscaleMode::Peer { peer } => (Some(peer.trim().to_string()), None),
            TailscaleMode::Serve(handler) => (None, Some(("serve", handler))),
            TailscaleMode::Funnel(handler) => (None, Some(("funnel", handler))),
        };
        let cli = Cli {
            binary: spec
                .binary
                .clone()
                .unwrap_or_else(|| DEFAULT_BINARY.to_string()),
            socket: spec
                .socket
                .as_ref()
                .and_then(|s| s.to_str())
                .map(str::to_string),
            timeout: spec.check_timeout,
            tag: ctx.tag(),
        };

        let handler = match exposed {
            Some((command, handler)) => {
                version::require(
                    spec.version_argv(),
                    &cli.tag,
                    MIN_VERSION_SERVE,
                    "`serve`/`funnel` with `--bg`, `--https` and `--set-path`",
                )
                .await
                .map_err(|err| err.with_install_hint(INSTALL_HINT))?;
                Some(Exposed {
                    command,
                    https_port: handler.https_port,
                    path: handler.path.clone(),
                    proxy: format!("http://127.0.0.1:{}", spec.port),
                })
            }
            None => None,
        };
        let ping_wait = ping_wait(spec.check_timeout);
        let status = cli.status().await?;
        let seen = evaluate(&status, peer.as_deref(), spec.port)
            .map_err(|down| ProviderError::Unhealthy(down.to_string()))?;
        let peer_addr = match (&seen, &peer) {
            (Some(view), Some(name)) => {
                confirm(&cli, name, view, ping_wait)
                    .await
                    .map_err(|down| ProviderError::Unhealthy(down.to_string()))?;
                Some(view.addr)
            }
            _ => None,
        };

        let url = match &handler {
            None => None,
            Some(handler) => Some(cli.expose(handler, &status).await?),
        };
        match (&url, peer_addr) {
            (Some(url), _) => tracing::info!(tunnel = %cli.tag, "tailscale {url} up"),
            (None, Some(addr)) => tracing::info!(tunnel = %cli.tag, "tailscale peer up at {addr}"),
            (None, None) => {}
        }

        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            cli,
            peer,
            port: spec.port,
            peer_addr: Mutex::new(peer_addr),
            ping_wait,
            handler,
            closed,
        });
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(watch_status(
            shared.clone(),
            stop.clone(),
            spec.status_interval,
        ));
        Ok(Arc::new(TailscaleTunnel {
            shared,
            url,
            dial_address: spec.dial_address.clone(),
            resolver: ctx.resolver.clone(),
            stop,
            watcher: tokio::sync::Mutex::new(Some(watcher)),
            stopped: AtomicBool::new(false),
        }))
    }
}

/// The `--timeout` for `tailscale ping`, so that the whole call fits in `check_timeout`.
fn ping_wait(check_timeout: Duration) -> Duration {
    if check_timeout > PING_OVERHEAD * 2 {
        check_timeout - PING_OVERHEAD
    } else {
        check_timeout / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_waits_leave_room_for_the_cli() {
        assert_eq!(
            ping_wait(Duration::from_secs(5)),
            Duration::from_millis(3500)
        );
        assert_eq!(ping_wait(Duration::from_secs(2)), Duration::from_secs(1));
    }
}
