//! The `tailscale` provider: a path through the tailnet of an already running `tailscaled`,
//! driven only through the `tailscale` CLI.
//!
//! Three modes:
//!
//! - **peer**: the service runs on another node of the tailnet. Start reads
//!   `tailscale status --json`: the backend must be `Running` and the peer (matched by its
//!   HostName, its MagicDNS name with or without the trailing dot, or any of its Tailscale IPs)
//!   `Online`. A dial is a TCP connect to the peer's first Tailscale IP (IPv4 preferred) and
//!   `port`. Native health is `tailscale ping --c 1 --until-direct=false --timeout T <peer>`:
//!   its latency, and whether the path is direct or relayed through DERP.
//! - **serve** / **funnel**: this node exposes a local port to the tailnet / the internet with
//!   `tailscale serve --bg <port>` / `tailscale funnel --bg <port>`. The endpoint is the URL the
//!   CLI prints; a dial goes to that URL's host on 443, end to end through Tailscale's proxy.
//!   Stop turns the proxy off with the command the CLI itself prints for that,
//!   `tailscale serve --https=443 off` (`funnel` likewise).
//!
//! No process runs for the tunnel's lifetime: every CLI call is a one-shot
//! [`process::run`] bounded by `check_timeout`. The hard signal therefore comes from a status
//! watcher, a task that reads `tailscale status --json` every `status_interval` and closes the
//! tunnel the moment the backend is not `Running` or (peer mode) the peer is offline or gone,
//! or once the status call has failed three times in a row (tailscaled unreachable). A
//! [`Tunnel::check`] that reads such a status closes the tunnel too.

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
/// The HTTPS port `serve`/`funnel` use when no `--https` is given: where the URL listens.
const HTTPS_PORT: u16 = 443;
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
}

impl TailscaleSpec {
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

        let status = cli.status().await?;
        let peer_addr = evaluate(&status, peer.as_deref(), spec.port)
            .map_err(|down| ProviderError::Unhealthy(down.to_string()))?;

        let url = match spec.mode.expose_command() {
            None => None,
            Some(command) => Some(cli.expose(command, spec.port).await?),
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
            ping_wait: ping_wait(spec.check_timeout),
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

    /// Reads the status once. `Ok(Err(down))` is a definitive "the path is gone", and closes
    /// the tunnel; `Err` means the status could not be read at all.
    async fn observe(&self) -> crate::Result<Result<(), Down>> {
        let status = self.cli.status().await?;
        match evaluate(&status, self.peer.as_deref(), self.port) {
            Ok(addr) => {
                if addr.is_some() {
                    *lock(&self.peer_addr) = addr;
                }
                Ok(Ok(()))
            }
            Err(down) => {
                self.close(down.to_string());
                Ok(Err(down))
            }
        }
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
            Ok(Ok(())) => failures = 0,
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
    /// The `--timeout` given to `tailscale ping`.
    ping_wait: Duration,
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
        if let Err(down) = self.shared.observe().await? {
            return Err(ProviderError::Unhealthy(down.to_string()));
        }
        match (self.shared.mode, &self.shared.peer) {
            (TailscaleMode::Peer, Some(peer)) => self.shared.cli.ping(peer, self.ping_wait).await,
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
        if let Some(command) = self.shared.mode.expose_command() {
            if let Err(err) = self.shared.cli.unexpose(command).await {
                tracing::warn!(tunnel = %self.shared.cli.tag, "cannot turn tailscale {command} off: {err}");
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
        if let (Some(command), Ok(runtime)) = (
            self.shared.mode.expose_command(),
            tokio::runtime::Handle::try_current(),
        ) {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                if let Err(err) = shared.cli.unexpose(command).await {
                    tracing::warn!(tunnel = %shared.cli.tag, "cannot turn tailscale {command} off: {err}");
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
    /// Runs `tailscale [--socket=S] <args>` to completion within the per-call timeout.
    async fn run(&self, args: Vec<String>, output_cap: usize) -> crate::Result<Ran> {
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
        let out = process::run(spec).await.map_err(|err| match err {
            ProviderError::MissingBinary { binary, .. } => ProviderError::MissingBinary {
                binary,
                hint: INSTALL_HINT.to_string(),
            },
            other => other,
        })?;
        if out.timed_out {
            return Err(ProviderError::Timeout {
                what: format!("`{shown}`"),
                after: self.timeout,
            });
        }
        Ok(Ran {
            shown,
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

    /// `tailscale ping --c 1 --until-direct=false --timeout <wait> <peer>`: one pong, whichever
    /// path it takes (`--until-direct` defaults to true, and a path that stays on DERP would
    /// then fail the call).
    async fn ping(&self, peer: &str, wait: Duration) -> crate::Result<Health> {
        let args = vec![
            "ping".to_string(),
            "--c".to_string(),
            "1".to_string(),
            "--until-direct=false".to_string(),
            "--timeout".to_string(),
            go_duration(wait),
            peer.to_string(),
        ];
        let ran = self.run(args, OUTPUT_CAP).await?;
        if let Some(health) = parse_ping(&ran.stdout) {
            return Ok(health);
        }
        if ran.stdout.lines().any(is_ping_timeout) {
            return Err(ProviderError::Timeout {
                what: format!("tailscale ping {peer}"),
                after: wait,
            });
        }
        Err(ProviderError::Unhealthy(ran.failure()))
    }

    /// `tailscale serve|funnel --bg <port>`, and the URL it printed.
    async fn expose(&self, command: &str, port: u16) -> crate::Result<String> {
        let args = vec![command.to_string(), "--bg".to_string(), port.to_string()];
        let ran = self.run(args, OUTPUT_CAP).await?;
        if !ran.status.success() {
            return Err(ProviderError::Spawn(ran.failure()));
        }
        let Some(found) = parse_serve_url(&ran.stdout).or_else(|| parse_serve_url(&ran.stderr))
        else {
            // It exposed the port but said nowhere where: take it down again rather than
            // leave an exposure nobody manages.
            if let Err(err) = self.unexpose(command).await {
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

    /// Turns off what `expose` set up, with the command the CLI prints for it
    /// (`To disable the proxy, run: tailscale serve --https=443 off`). `--bg <port> off` is not
    /// used: `funnel` refuses `<port> off` as its pre-1.52 syntax.
    async fn unexpose(&self, command: &str) -> crate::Result<()> {
        let args = vec![
            command.to_string(),
            format!("--https={HTTPS_PORT}"),
            "off".to_string(),
        ];
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

/// Why the status says the path is gone. Each is a hard signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Down {
    /// The backend is not `Running` (logged out, stopped, waiting for approval, starting).
    #[error("tailscale is not running (BackendState {state}){detail}")]
    Backend { state: String, detail: String },
    /// The peer is known but not connected to the control plane.
    #[error("peer {peer} is offline{detail}")]
    PeerOffline { peer: String, detail: String },
    /// No peer of that name or address.
    #[error("peer {peer} is not in this node's tailnet (peers: {known})")]
    PeerUnknown { peer: String, known: String },
    /// The peer has no address to dial.
    #[error("peer {peer} has no Tailscale IP")]
    PeerWithoutIp { peer: String },
}

/// Reads a status: `Ok(Some(addr))` is the peer's dial address (peer mode), `Ok(None)` a
/// running backend (serve/funnel), `Err` why the path is down.
fn evaluate(status: &Status, peer: Option<&str>, port: u16) -> Result<Option<SocketAddr>, Down> {
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
    if !found.online {
        let detail = if found.last_seen.is_empty() || found.last_seen == GO_ZERO_TIME {
            String::new()
        } else {
            format!(" (last seen {})", found.last_seen)
        };
        return Err(Down::PeerOffline {
            peer: wanted.to_string(),
            detail,
        });
    }
    let ips = found.ips();
    let ip = ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| ips.first())
        .ok_or_else(|| Down::PeerWithoutIp {
            peer: wanted.to_string(),
        })?;
    Ok(Some(SocketAddr::new(*ip, port)))
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
            assert_eq!(evaluate(&status, Some(name), 22), Ok(Some(want)), "{name}");
        }
        assert_eq!(evaluate(&status, None, 22), Ok(None));
        match evaluate(&status, Some("nosuch"), 22) {
            Err(Down::PeerUnknown { known, .. }) => assert_eq!(known, "homebox, old-laptop"),
            other => panic!("{other:?}"),
        }
        // A known but offline peer.
        assert_eq!(
            evaluate(&status, Some("old-laptop"), 22)
                .map_err(|d| d.to_string())
                .unwrap_err(),
            "peer old-laptop is offline (last seen 2026-10-01T17:00:00Z)"
        );
    }

    #[test]
    fn offline_and_logged_out_explain_themselves() {
        let down = evaluate(&status(OFFLINE), Some("homebox"), 22).unwrap_err();
        assert_eq!(
            down.to_string(),
            "peer homebox is offline (last seen 2026-11-20T10:14:58Z)"
        );
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
            evaluate(&status, Some("box-1"), 1),
            Ok(Some("100.64.0.2:1".parse().expect("addr")))
        );
        // The exact MagicDNS name wins over a HostName match, even offline.
        assert!(matches!(
            evaluate(&status, Some("box.t.ts.net"), 1),
            Err(Down::PeerOffline { .. })
        ));
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
