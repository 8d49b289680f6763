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
//! [`process::run`] bounded by `check_timeout`. The hard signal therefore comes from a status
//! watcher, a task that reads `tailscale status --json` every `status_interval` and closes the
//! tunnel the moment the backend is not `Running` or (peer mode) the peer is gone, or offline
//! and not answering a ping, or once the status call has failed three times in a row
//! (tailscaled unreachable). A [`Tunnel::check`] that reads such a status closes the tunnel
//! too.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::process::{self, ExitInfo, RunSpec};
use crate::version::{self, Version};
use crate::{
    dial_tcp, Dial, Endpoint, Health, Provider, ProviderError, Resolver, StartContext, Tunnel,
};

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
/// The only ports Funnel accepts (https://tailscale.com/kb/1223/funnel).
const FUNNEL_PORTS: [u16; 3] = [443, 8443, 10000];

/// Which way the tunnel uses the tailnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailscaleMode {
    /// Reach a service on another node of the tailnet.
    Peer,
    /// Expose a local port to the tailnet (`tailscale serve`).
    Serve,
    /// Expose a local port to the internet (`tailscale funnel`).
    Funnel,
}

impl TailscaleMode {
    /// The CLI subcommand that exposes a port in this mode, if the mode exposes one.
    fn expose_command(self) -> Option<&'static str> {
        match self {
            TailscaleMode::Peer => None,
            TailscaleMode::Serve => Some("serve"),
            TailscaleMode::Funnel => Some("funnel"),
        }
    }
}

/// Settings of a `tailscale` tunnel.
#[derive(Debug, Clone)]
pub struct TailscaleSpec {
    /// Peer, serve or funnel.
    pub mode: TailscaleMode,
    /// The `tailscale` CLI to run; [`DEFAULT_BINARY`] (looked up in `PATH`) when `None`.
    pub binary: Option<String>,
    /// The tailscaled socket, passed as the global `--socket=<path>` flag (for a userspace
    /// `tailscaled --tun=userspace-networking --socket=<path>`).
    pub socket: Option<PathBuf>,
    /// Peer mode (required there, refused otherwise): the peer's HostName, MagicDNS name (with
    /// or without the trailing dot, or just its first label) or one of its Tailscale IPs.
    pub peer: Option<String>,
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
    /// Serve/funnel: the HTTPS port of the handler (`--https`, [`DEFAULT_HTTPS_PORT`]; funnel
    /// allows 443, 8443 and 10000).
    pub https_port: u16,
    /// Serve/funnel: the handler's mount path (`--set-path`, `/` by default). Tunnels and the
    /// operator's own handlers on one node need distinct port/path pairs.
    pub serve_path: String,
}

impl TailscaleSpec {
    /// The command that prints the CLI's version (its first argument is the program).
    pub fn version_argv(&self) -> Vec<String> {
        let binary = self.binary.as_deref().unwrap_or(DEFAULT_BINARY);
        vec![binary.to_string(), "version".to_string()]
    }

    /// Settings for `mode` and `port` with the default binary, timeouts, no socket, no peer
    /// and no dial override.
    pub fn new(mode: TailscaleMode, port: u16) -> Self {
        TailscaleSpec {
            mode,
            binary: None,
            socket: None,
            peer: None,
            port,
            check_timeout: DEFAULT_CHECK_TIMEOUT,
            status_interval: DEFAULT_STATUS_INTERVAL,
            dial_address: None,
            https_port: DEFAULT_HTTPS_PORT,
            serve_path: "/".to_string(),
        }
    }
}

/// Brings up `tailscale` tunnels.
#[derive(Debug)]
pub struct TailscaleProvider {
    spec: TailscaleSpec,
}

impl TailscaleProvider {
    /// A provider for the given settings (checked when the tunnel starts).
    pub fn new(spec: TailscaleSpec) -> Self {
        TailscaleProvider { spec }
    }

    /// Refuses settings that cannot work, before anything is run.
    fn validate(&self) -> crate::Result<()> {
        let spec = &self.spec;
        let config = |msg: &str| Err(ProviderError::Config(format!("tailscale: {msg}")));
        if spec.port == 0 {
            return config("`port` must be 1-65535");
        }
        if spec.check_timeout.is_zero() || spec.status_interval.is_zero() {
            return config("`check_timeout` and `status_interval` must be longer than zero");
        }
        if spec.binary.as_deref().is_some_and(str::is_empty) {
            return config("`binary` is empty");
        }
        if spec.socket.as_ref().is_some_and(|s| s.to_str().is_none()) {
            return config("`socket` is not valid UTF-8");
        }
        if spec.https_port == 0 {
            return config("`https_port` must be 1-65535");
        }
        if spec.mode == TailscaleMode::Funnel && !FUNNEL_PORTS.contains(&spec.https_port) {
            return config(&format!(
                "funnel accepts `https_port` 443, 8443 or 10000, not {}",
                spec.https_port
            ));
        }
        if !spec.serve_path.starts_with('/')
            || spec
                .serve_path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return config(&format!(
                "`serve_path` {:?} must be a URL path starting with `/`",
                spec.serve_path
            ));
        }
        match (spec.mode, spec.peer.as_deref().map(str::trim)) {
            (TailscaleMode::Peer, None | Some("")) => config(
                "mode peer needs `peer`: the HostName, MagicDNS name or Tailscale IP of the node",
            ),
            // The CLI would read it as a flag; no node name or address starts with a dash.
            (TailscaleMode::Peer, Some(peer)) if peer.starts_with('-') => {
                config(&format!("`peer` {peer:?} is not a node name or address"))
            }
            (TailscaleMode::Serve | TailscaleMode::Funnel, Some(_)) => {
                config("`peer` only applies to mode peer")
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Provider for TailscaleProvider {
    /// Peer mode: checks the backend and the peer in `tailscale status --json`. Serve/funnel:
    /// checks the backend, then exposes the port and reads its URL. Then starts the status
    /// watcher.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        self.validate()?;
        let spec = &self.spec;
        let peer = spec.peer.as_deref().map(str::trim).map(str::to_string);
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
            tag: format!("{}/{}", ctx.service, ctx.tunnel),
        };

        let handler = match spec.mode.expose_command() {
            Some(command) => {
                version::require(
                    spec.version_argv(),
                    &cli.tag,
                    MIN_VERSION_SERVE,
                    "`serve`/`funnel` with `--bg`, `--https` and `--set-path`",
                )
                .await
                .map_err(|err| err.with_install_hint(INSTALL_HINT))?;
                Some(Handler {
                    command,
                    https_port: spec.https_port,
                    path: spec.serve_path.clone(),
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
            mode: spec.mode,
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

/// State shared by the tunnel and its status watcher.
struct Shared {
    cli: Cli,
    mode: TailscaleMode,
    /// Peer mode: the node, as configured.
    peer: Option<String>,
    port: u16,
    /// Peer mode: where dials go, refreshed by every status read.
    peer_addr: Mutex<Option<SocketAddr>>,
    /// The `--timeout` given to `tailscale ping`.
    ping_wait: Duration,
    /// Serve/funnel: the handler this tunnel added (and alone removes).
    handler: Option<Handler>,
    /// Why the tunnel closed, once it has.
    closed: watch::Sender<Option<String>>,
}

impl Shared {
    /// Records the first reason the tunnel closed; later ones change nothing.
    fn close(&self, reason: String) {
        let first = self.closed.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if first {
            tracing::warn!(tunnel = %self.cli.tag, "tailscale tunnel closed: {reason}");
        }
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Reads the status once (and pings a peer the status shows offline). `Ok(Err(down))` is
    /// a definitive "the path is gone", and closes the tunnel; `Ok(Ok(Some(health)))` carries
    /// the confirming ping's answer; `Err` means the status could not be read at all.
    async fn observe(&self) -> crate::Result<Result<Option<Health>, Down>> {
        let status = self.cli.status().await?;
        let seen = evaluate(&status, self.peer.as_deref(), self.port);
        let confirmed = match (seen, &self.peer) {
            (Ok(Some(view)), Some(name)) => {
                match confirm(&self.cli, name, &view, self.ping_wait).await {
                    Ok(health) => {
                        *lock(&self.peer_addr) = Some(view.addr);
                        Ok(health)
                    }
                    Err(down) => Err(down),
                }
            }
            (Ok(_), _) => Ok(None),
            (Err(down), _) => Err(down),
        };
        if let Err(down) = &confirmed {
            self.close(down.to_string());
        }
        Ok(confirmed)
    }
}

/// The status watcher: polls until the path is gone or the tunnel is stopped.
async fn watch_status(shared: Arc<Shared>, stop: CancellationToken, interval: Duration) {
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        // Cancelling mid-call drops the run, which kills the CLI's process group.
        let observed = tokio::select! {
            _ = stop.cancelled() => return,
            observed = shared.observe() => observed,
        };
        match observed {
            Ok(Ok(_)) => failures = 0,
            Ok(Err(_down)) => return,
            Err(err) => {
                failures += 1;
                tracing::warn!(tunnel = %shared.cli.tag, failures, "cannot read tailscale status: {err}");
                if failures >= MAX_STATUS_FAILURES {
                    shared.close(format!(
                        "`tailscale status` failed {failures} times in a row; last: {err}"
                    ));
                    return;
                }
            }
        }
    }
}

/// A running `tailscale` tunnel.
struct TailscaleTunnel {
    shared: Arc<Shared>,
    /// Serve/funnel: the URL the CLI printed.
    url: Option<String>,
    dial_address: Option<String>,
    resolver: Resolver,
    stop: CancellationToken,
    /// Taken by the first `stop`.
    watcher: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Whether `stop` finished, so `Drop` knows whether an exposure is left behind.
    stopped: AtomicBool,
}

#[async_trait]
impl Tunnel for TailscaleTunnel {
    fn endpoint(&self) -> Endpoint {
        let display = match (&self.url, *lock(&self.shared.peer_addr)) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => addr.to_string(),
            (None, None) => String::new(),
        };
        Endpoint { display }
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(reason) = self.shared.closed_reason() {
            return Err(ProviderError::Closed(reason));
        }
        if let Some(address) = &self.dial_address {
            return self.resolver.dial(address, timeout).await;
        }
        if let Some(url) = &self.url {
            // The resolver takes the host of `https://host/` and port 443.
            return self.resolver.dial(url, timeout).await;
        }
        let addr = *lock(&self.shared.peer_addr);
        match addr {
            Some(addr) => dial_tcp(addr, timeout).await,
            None => Err(ProviderError::Closed(
                "the peer's address is unknown".to_string(),
            )),
        }
    }

    async fn check(&self) -> crate::Result<Health> {
        if let Some(reason) = self.shared.closed_reason() {
            return Err(ProviderError::Closed(reason));
        }
        let confirmed = match self.shared.observe().await? {
            Ok(confirmed) => confirmed,
            Err(down) => return Err(ProviderError::Unhealthy(down.to_string())),
        };
        // A peer the status showed offline was pinged already: that answer is the health.
        if let Some(health) = confirmed {
            return Ok(health);
        }
        let addr = *lock(&self.shared.peer_addr);
        match (self.shared.mode, &self.shared.peer, addr) {
            (TailscaleMode::Peer, Some(peer), Some(addr)) => {
                self.shared
                    .cli
                    .ping(peer, addr.ip(), self.shared.ping_wait)
                    .await
            }
            _ => Ok(Health::default()),
        }
    }

    async fn closed(&self) -> String {
        let mut closed = self.shared.closed.subscribe();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // Cannot happen while `self` holds the sender; say something true anyway.
            Err(_) => "the tailscale tunnel is gone".to_string(),
        };
        reason
    }

    async fn stop(&self) {
        let mut watcher = self.watcher.lock().await;
        let Some(task) = watcher.take() else {
            return;
        };
        // Refuse new dials at once, then end the watcher, then undo what start set up.
        self.shared.close("stopped".to_string());
        self.stop.cancel();
        if let Err(err) = task.await {
            tracing::warn!(tunnel = %self.shared.cli.tag, "tailscale status watcher ended badly: {err}");
        }
        if let Some(handler) = &self.shared.handler {
            if let Err(err) = self.shared.cli.unexpose(handler).await {
                tracing::warn!(tunnel = %self.shared.cli.tag, "cannot turn tailscale {} off: {err}", handler.command);
            }
        }
        self.stopped.store(true, Ordering::SeqCst);
    }
}

impl Drop for TailscaleTunnel {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        // Dropped without `stop`: a funnel left on would keep the port open to the internet,
        // so turn it off in the background if there is still a runtime to do it.
        if let (Some(_), Ok(runtime)) = (
            self.shared.handler.as_ref(),
            tokio::runtime::Handle::try_current(),
        ) {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                if let Some(handler) = &shared.handler {
                    if let Err(err) = shared.cli.unexpose(handler).await {
                        tracing::warn!(tunnel = %shared.cli.tag, "cannot turn tailscale {} off: {err}", handler.command);
                    }
                }
            });
        }
    }
}

/// Locks a mutex even if a panicking thread poisoned it: the address inside stays valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `--timeout` for `tailscale ping`, so that the whole call fits in `check_timeout`.
fn ping_wait(check_timeout: Duration) -> Duration {
    if check_timeout > PING_OVERHEAD * 2 {
        check_timeout - PING_OVERHEAD
    } else {
        check_timeout / 2
    }
}

/// A duration as Go's `time.ParseDuration` reads it: whole seconds, else milliseconds.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The serve/funnel handler a tunnel adds: `--https=<https_port> --set-path=<path>` proxying to
/// `proxy`.
#[derive(Debug, Clone)]
struct Handler {
    /// `serve` or `funnel`.
    command: &'static str,
    https_port: u16,
    path: String,
    /// What the handler proxies to, as `serve status --json` shows it.
    proxy: String,
}

impl Handler {
    /// The flags that name this handler, for adding and removing it.
    fn flags(&self) -> [String; 2] {
        [
            format!("--https={}", self.https_port),
            format!("--set-path={}", self.path),
        ]
    }
}

/// A peer as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerView {
    /// Where dials go: its first Tailscale IP (IPv4 preferred) and the service port.
    addr: SocketAddr,
    /// Connected to the coordination server (not the same as reachable).
    online: bool,
    /// `LastSeen`, when the status gives one.
    last_seen: Option<String>,
}

/// Confirms a peer the status shows offline with a ping of its Tailscale IP: an answer means
/// the data path works whatever the coordination server thinks (`Ok(Some(health))`). An online
/// peer needs no ping here (`Ok(None)`).
async fn confirm(
    cli: &Cli,
    name: &str,
    view: &PeerView,
    wait: Duration,
) -> Result<Option<Health>, Down> {
    if view.online {
        return Ok(None);
    }
    let detail = view
        .last_seen
        .as_ref()
        .map(|at| format!(" (last seen {at})"))
        .unwrap_or_default();
    match cli.ping(name, view.addr.ip(), wait).await {
        Ok(mut health) => {
            tracing::info!(tunnel = %cli.tag, "peer {name} is offline at the coordination server{detail} but answers tailscale ping");
            let shown = health.detail.take().unwrap_or_default();
            health.detail = Some(
                format!("{shown}; offline at the coordination server")
                    .trim_start_matches("; ")
                    .to_string(),
            );
            Ok(Some(health))
        }
        Err(err) => Err(Down::PeerOffline {
            peer: name.to_string(),
            detail: format!("{detail} and does not answer tailscale ping ({err})"),
        }),
    }
}

/// How the provider runs the CLI.
#[derive(Debug, Clone)]
struct Cli {
    binary: String,
    /// The value of the global `--socket` flag.
    socket: Option<String>,
    /// Per call.
    timeout: Duration,
    /// `service/tunnel`, for log lines.
    tag: String,
}

/// A finished CLI call.
struct Ran {
    /// The command line without the program path, for messages.
    shown: String,
    /// Killed at the per-call timeout.
    timed_out: bool,
    status: ExitInfo,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// What the command said, for an error message: stderr, else stdout, on one line.
    fn said(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let line = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ");
        if line.chars().count() > MAX_QUOTED {
            let cut: String = line.chars().take(MAX_QUOTED).collect();
            format!("{cut}…")
        } else if line.is_empty() {
            "(no output)".to_string()
        } else {
            line
        }
    }

    fn failure(&self) -> String {
        format!("`{}` {}: {}", self.shown, self.status, self.said())
    }
}

impl Cli {
    /// Runs `tailscale [--socket=S] <args>` to completion within the per-call timeout; a call
    /// that runs past it is a [`ProviderError::Timeout`].
    async fn run(&self, args: Vec<String>, output_cap: usize) -> crate::Result<Ran> {
        let ran = self.run_raw(args, output_cap).await?;
        if ran.timed_out {
            return Err(ProviderError::Timeout {
                what: format!("`{}`", ran.shown),
                after: self.timeout,
            });
        }
        Ok(ran)
    }

    /// [`Cli::run`], but a call killed at the timeout is returned with what it printed.
    async fn run_raw(&self, args: Vec<String>, output_cap: usize) -> crate::Result<Ran> {
        let mut full = Vec::with_capacity(args.len() + 1);
        if let Some(socket) = &self.socket {
            full.push(format!("--socket={socket}"));
        }
        full.extend(args);
        let shown = format!("tailscale {}", full.join(" "));
        let mut argv = Vec::with_capacity(full.len() + 1);
        argv.push(self.binary.clone());
        argv.extend(full);
        let mut spec = RunSpec::new(argv);
        spec.timeout = self.timeout;
        spec.output_cap = output_cap;
        spec.tag = self.tag.clone();
        let out = process::run(spec)
            .await
            .map_err(|err| err.with_install_hint(INSTALL_HINT))?;
        Ok(Ran {
            shown,
            timed_out: out.timed_out,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `tailscale status --json`, parsed.
    async fn status(&self) -> crate::Result<Status> {
        let ran = self
            .run(argv(&["status", "--json"]), STATUS_OUTPUT_CAP)
            .await?;
        if !ran.status.success() {
            return Err(ProviderError::Unhealthy(ran.failure()));
        }
        serde_json::from_str(&ran.stdout).map_err(|err| {
            ProviderError::Unhealthy(format!("cannot parse the output of `{}`: {err}", ran.shown))
        })
    }

    /// `tailscale ping --c 1 --until-direct=false --timeout <wait> <ip>`: one pong, whichever
    /// path it takes (`--until-direct` defaults to true, and a path that stays on DERP would
    /// then fail the call). `ip` is the peer's Tailscale IP: the CLI would not resolve every
    /// name the status matches. `peer` names it in messages.
    async fn ping(&self, peer: &str, ip: IpAddr, wait: Duration) -> crate::Result<Health> {
        let args = vec![
            "ping".to_string(),
            "--c".to_string(),
            "1".to_string(),
            "--until-direct=false".to_string(),
            "--timeout".to_string(),
            go_duration(wait),
            ip.to_string(),
        ];
        let ran = self.run(args, OUTPUT_CAP).await?;
        if let Some(health) = parse_ping(&ran.stdout) {
            return Ok(health);
        }
        if ran.stdout.lines().any(is_ping_timeout) {
            return Err(ProviderError::Timeout {
                what: format!("tailscale ping {ip} ({peer})"),
                after: wait,
            });
        }
        Err(ProviderError::Unhealthy(ran.failure()))
    }

    /// The handlers already served on this node, from `tailscale serve status --json`:
    /// `(host:port, path, proxy)`.
    async fn serve_handlers(&self) -> crate::Result<Vec<(String, String, String)>> {
        let ran = self
            .run(argv(&["serve", "status", "--json"]), STATUS_OUTPUT_CAP)
            .await?;
        if !ran.status.success() {
            return Err(ProviderError::Spawn(ran.failure()));
        }
        let config: ServeConfig = if ran.stdout.trim().is_empty() {
            ServeConfig::default()
        } else {
            serde_json::from_str(&ran.stdout).map_err(|err| {
                ProviderError::Spawn(format!("cannot parse the output of `{}`: {err}", ran.shown))
            })?
        };
        let mut found = Vec::new();
        for (host_port, web) in config.web.into_iter().flatten() {
            for (path, handler) in web.handlers.into_iter().flatten() {
                found.push((host_port.clone(), path, handler.proxy));
            }
        }
        Ok(found)
    }

    /// Adds `handler` with `tailscale serve|funnel --bg --https=N --set-path=P <port>`, and
    /// returns the URL it printed. Refuses to replace a handler someone else put on that port
    /// and path (the CLI would silently overwrite it).
    async fn expose(&self, handler: &Handler, status: &Status) -> crate::Result<String> {
        let command = handler.command;
        let self_name = status
            .self_node
            .as_ref()
            .map(|n| n.dns_name.trim_end_matches('.').to_string())
            .unwrap_or_default();
        let wanted = format!("{self_name}:{}", handler.https_port);
        for (host_port, path, proxy) in self.serve_handlers().await? {
            if host_port == wanted && path == handler.path && proxy != handler.proxy {
                return Err(ProviderError::Config(format!(
                    "tailscale already serves https://{wanted}{path} -> {proxy}, which is not this \
                     tunnel's ({}); give this tunnel its own `https_port` or `serve_path`",
                    handler.proxy
                )));
            }
        }
        let mut args = vec![command.to_string(), "--bg".to_string()];
        args.extend(handler.flags());
        args.push(
            handler
                .proxy
                .trim_start_matches("http://127.0.0.1:")
                .to_string(),
        );
        let ran = self.run_raw(args, OUTPUT_CAP).await?;
        if ran.timed_out || !ran.status.success() {
            // Not enabled on the tailnet: the CLI printed where to enable it and waited.
            if let Some(enable) = enable_url(&ran.stdout).or_else(|| enable_url(&ran.stderr)) {
                if let Err(err) = self.unexpose(handler).await {
                    tracing::debug!(tunnel = %self.tag, "nothing to turn off after the enable prompt: {err}");
                }
                return Err(ProviderError::Spawn(format!(
                    "tailscale {command} is not enabled on this tailnet: an admin must enable it \
                     at {enable} (`{}` waited for that {})",
                    ran.shown,
                    if ran.timed_out {
                        "until killed"
                    } else {
                        "and failed"
                    }
                )));
            }
            if ran.timed_out {
                return Err(ProviderError::Timeout {
                    what: format!("`{}`", ran.shown),
                    after: self.timeout,
                });
            }
            return Err(ProviderError::Spawn(ran.failure()));
        }
        let Some(found) = parse_serve_url(&ran.stdout).or_else(|| parse_serve_url(&ran.stderr))
        else {
            // It exposed the port but said nowhere where: take it down again rather than
            // leave an exposure nobody manages.
            if let Err(err) = self.unexpose(handler).await {
                tracing::warn!(tunnel = %self.tag, "cannot turn tailscale {command} off again: {err}");
            }
            return Err(ProviderError::Spawn(format!(
                "`{}` printed no URL after `Available on the internet:` or `Available within your tailnet:`; output: {}",
                ran.shown,
                ran.said()
            )));
        };
        if command == "funnel" && !found.internet {
            tracing::warn!(tunnel = %self.tag, "`{}` exposed {} within the tailnet only", ran.shown, found.url);
        }
        Ok(found.url)
    }

    /// Removes exactly the handler `expose` added: `tailscale serve|funnel --https=N
    /// --set-path=P off`. Without `--set-path`, `off` would remove every handler on the port,
    /// the operator's own included; `--bg <port> off` is not used: `funnel` refuses
    /// `<port> off` as its pre-1.52 syntax.
    async fn unexpose(&self, handler: &Handler) -> crate::Result<()> {
        let mut args = vec![handler.command.to_string()];
        args.extend(handler.flags());
        args.push("off".to_string());
        let ran = self.run(args, OUTPUT_CAP).await?;
        if ran.status.success() {
            Ok(())
        } else {
            Err(ProviderError::Unhealthy(ran.failure()))
        }
    }
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// The parts of `tailscale status --json` the provider reads. The format is documented as
/// "subject to change", so every field is optional and unknown ones are ignored.
#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(rename = "BackendState", default)]
    backend_state: String,
    #[serde(rename = "AuthURL", default)]
    auth_url: String,
    #[serde(rename = "Health", default)]
    health: Option<Vec<String>>,
    #[serde(rename = "Peer", default)]
    peer: Option<BTreeMap<String, PeerStatus>>,
    #[serde(rename = "Self", default)]
    self_node: Option<PeerStatus>,
}

/// The parts of `tailscale serve status --json` (ipn.ServeConfig) the provider reads.
#[derive(Debug, Default, Deserialize)]
struct ServeConfig {
    #[serde(rename = "Web", default)]
    web: Option<BTreeMap<String, WebServerConfig>>,
}

/// One `host:port` of `Web`.
#[derive(Debug, Default, Deserialize)]
struct WebServerConfig {
    #[serde(rename = "Handlers", default)]
    handlers: Option<BTreeMap<String, HttpHandler>>,
}

/// One mount path's handler.
#[derive(Debug, Default, Deserialize)]
struct HttpHandler {
    /// What it proxies to (empty for a file or text handler).
    #[serde(rename = "Proxy", default)]
    proxy: String,
}

/// One entry of `Peer` in `tailscale status --json`.
#[derive(Debug, Default, Deserialize)]
struct PeerStatus {
    #[serde(rename = "HostName", default)]
    host_name: String,
    #[serde(rename = "DNSName", default)]
    dns_name: String,
    #[serde(rename = "TailscaleIPs", default)]
    tailscale_ips: Option<Vec<String>>,
    #[serde(rename = "Online", default)]
    online: bool,
    #[serde(rename = "LastSeen", default)]
    last_seen: String,
}

impl PeerStatus {
    fn ips(&self) -> Vec<IpAddr> {
        self.tailscale_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect()
    }

    /// How well `wanted` names this peer, best first: 0 an IP, 1 the full MagicDNS name,
    /// 2 its first label, 3 the HostName; `None` if not at all. A reinstalled node often
    /// leaves an offline namesake behind, so exact names must beat HostNames.
    fn match_rank(&self, wanted: &str) -> Option<u8> {
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
enum Down {
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
fn evaluate(status: &Status, peer: Option<&str>, port: u16) -> Result<Option<PeerView>, Down> {
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
fn enable_url(output: &str) -> Option<String> {
    if parse_serve_url(output).is_some() {
        return None;
    }
    output
        .split_whitespace()
        .find(|word| word.starts_with("https://"))
        .map(str::to_string)
}

/// Explains a backend that is not `Running`, with the login URL and health messages.
fn backend_down(status: &Status) -> Down {
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
fn parse_ping(stdout: &str) -> Option<Health> {
    stdout.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("pong from ")?;
        let (head, latency) = rest.rsplit_once(" in ")?;
        let (_, via) = head.rsplit_once(" via ")?;
        let latency = parse_go_duration(latency.trim())?;
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
fn is_ping_timeout(line: &str) -> bool {
    let line = line.trim();
    line.starts_with("ping ") && line.ends_with(" timed out")
}

/// Parses what Go's `time.Duration` prints: `23ms`, `1.204s`, `1m2.5s`, `850µs`, `0s`.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut seconds = 0.0_f64;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if number_end == 0 {
            return None;
        }
        let value: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        seconds += value * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(seconds).ok()
}

/// Where `serve`/`funnel` said the port is reachable.
#[derive(Debug, PartialEq, Eq)]
struct ServeUrl {
    url: String,
    /// `Available on the internet:` rather than `Available within your tailnet:`.
    internet: bool,
}

/// Finds the first `https://host/` line after an `Available …:` header.
fn parse_serve_url(output: &str) -> Option<ServeUrl> {
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
    use super::*;

    const RUNNING: &str = include_str!("../tests/fixtures/tailscale/status-running.json");
    const OFFLINE: &str = include_str!("../tests/fixtures/tailscale/status-peer-offline.json");
    const NEEDS_LOGIN: &str = include_str!("../tests/fixtures/tailscale/status-needslogin.json");

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
    fn go_durations_round_trip() {
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("850µs"), Some(Duration::from_micros(850)));
        assert_eq!(
            parse_go_duration("1m2.5s"),
            Some(Duration::from_millis(62_500))
        );
        assert_eq!(parse_go_duration("ms"), None);
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("5parsecs"), None);
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_millis(3500)), "3500ms");
        assert_eq!(
            ping_wait(Duration::from_secs(5)),
            Duration::from_millis(3500)
        );
        assert_eq!(ping_wait(Duration::from_secs(2)), Duration::from_secs(1));
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
