//! The `cloudflare` provider: Cloudflare Tunnel through the real `cloudflared` CLI.
//!
//! Three shapes, all run under [`crate::process`] supervision (own process group, death signal,
//! `SIGTERM` then `SIGKILL`, output lines into tracing):
//!
//! - **tunnel** with a token (expose a service): `cloudflared tunnel --no-autoupdate --metrics
//!   127.0.0.1:<port> --grace-period <d> run --token-file <token_file>`. cloudflared reads the
//!   token itself, so the daemon never holds it: it is in no argv, no environment and no log
//!   line of ours. `--token-file` needs cloudflared [`MIN_VERSION_TOKEN_FILE`]: start asks
//!   `cloudflared --version` first and refuses an older one naming the minimum. An inherited
//!   `TUNNEL_TOKEN` would win over `--token-file`, so the child gets it emptied.
//! - **quick tunnel** (tunnel mode without a token): `cloudflared tunnel --no-autoupdate
//!   --metrics 127.0.0.1:<port> --grace-period <d> --url <url>`; the random
//!   `*.trycloudflare.com` hostname is read from the metrics server's `GET /quicktunnel` (the
//!   banner line is the fallback).
//! - **access** (reach a service behind Cloudflare Access): `cloudflared access tcp --hostname
//!   <hostname> --url 127.0.0.1:<port>`; [`Tunnel::dial`] connects to that local port. An
//!   Access service token, when configured, is read from its two files at start and handed to
//!   cloudflared in `TUNNEL_SERVICE_TOKEN_ID` / `TUNNEL_SERVICE_TOKEN_SECRET` (never argv).
//!
//! `--grace-period` is set just below `stop_grace` ([`grace_period`]): on `SIGTERM`
//! cloudflared drains in-flight requests for that long (30 s by default), so without it every
//! stop with traffic would end in our `SIGKILL`.
//!
//! Native health for the first two is `GET /ready` on the metrics port: 200 with
//! `readyConnections >= 1` means at least one edge connection is registered. Start waits for
//! it (bounded), and fails with cloudflared's own words if the child exits first. Every dial
//! through the edge asks `/ready` too (an answer younger than a second is reused): Cloudflare's
//! edge accepts on 443 for a hostname whose tunnel is down (error 1033, HTTP 530), so a connect
//! there proves nothing. The child's exit is the hard signal that resolves
//! [`Tunnel::closed`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;

use crate::process::{self, ExitInfo, Lines, SpawnSpec, Supervised};
use crate::version::{self, Version};
use crate::{
    dial_tcp, http, Dial, Endpoint, Health, Provider, ProviderError, Resolver, StartContext, Tunnel,
};

/// The program run when `binary` is not set (looked up in `PATH`).
pub const DEFAULT_BINARY: &str = "cloudflared";
/// The port the end-to-end dial uses on a tunnel's public hostname unless configured otherwise.
pub const DEFAULT_PORT: u16 = 443;
/// How long start waits for the first registered edge connection unless configured otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long stop waits after `SIGTERM` before `SIGKILL`, unless configured otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// How to get cloudflared when it is not installed.
const INSTALL_HINT: &str = "install cloudflared from Cloudflare's package repository \
    (https://pkg.cloudflare.com) or its GitHub releases, or set `binary:` to its full path";
/// Pause between readiness polls during start.
const READY_POLL: Duration = Duration::from_millis(100);
/// Longest a single request to cloudflared's local metrics server may take. It answers from
/// memory on loopback, so anything slower means it is wedged.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to keep reading output after the child exited, so errors can quote its last words.
const EXIT_DRAIN: Duration = Duration::from_millis(200);
/// How many times start picks a new local port when the one it chose was taken in between
/// (the port is found free, released, then handed to cloudflared: another process may win).
const PORT_ATTEMPTS: usize = 3;
/// Output lines remembered during start for the error message.
const KEPT_LINES: usize = 64;
/// The oldest cloudflared with `tunnel run --token-file` (release 2025.4.0).
pub const MIN_VERSION_TOKEN_FILE: Version = Version(2025, 4, 0);
/// cloudflared's own ceiling for `--grace-period`.
const MAX_GRACE_PERIOD: Duration = Duration::from_secs(180);
/// Room left between cloudflared's grace period and our `SIGKILL`, at most.
const GRACE_MARGIN: Duration = Duration::from_secs(1);
/// How long a `/ready` answer gates dials without being asked again.
const READY_CACHE: Duration = Duration::from_secs(1);

/// What a `cloudflare` tunnel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudflareMode {
    /// Expose a local service through a Cloudflare Tunnel (`cloudflared tunnel`): a named
    /// tunnel from `token_file`, or a quick tunnel to `url` when there is no token.
    Tunnel,
    /// Reach a TCP service behind Cloudflare Access (`cloudflared access tcp`) through a local
    /// listener.
    Access,
}

/// Settings of a `cloudflare` tunnel. Holds no secret: the token stays in `token_file`, which
/// only cloudflared reads, so `Debug` shows the path and nothing else.
#[derive(Debug, Clone)]
pub struct CloudflareSpec {
    /// Tunnel or Access.
    pub mode: CloudflareMode,
    /// The cloudflared program; [`DEFAULT_BINARY`] looked up in `PATH` when `None`.
    pub binary: Option<String>,
    /// Tunnel mode: the file holding the tunnel token (passed as `--token-file`). `None` runs a
    /// quick tunnel to `url` instead. Not allowed in access mode.
    pub token_file: Option<PathBuf>,
    /// Tunnel mode with a token: the public hostname routed to the tunnel (the endpoint).
    /// Access mode: the Access application's hostname (required). A quick tunnel gets its
    /// hostname from cloudflared, so it must be `None` there.
    pub hostname: Option<String>,
    /// Quick tunnel only: the local service URL, e.g. `http://127.0.0.1:8080`. A tunnel with a
    /// token serves the ingress configured in the Cloudflare dashboard instead.
    pub url: Option<String>,
    /// The port the end-to-end dial uses on `hostname` in tunnel mode ([`DEFAULT_PORT`]).
    pub port: u16,
    /// How long start waits for cloudflared to become ready ([`DEFAULT_READY_TIMEOUT`]).
    pub ready_timeout: Duration,
    /// How long stop waits after `SIGTERM` before `SIGKILL` ([`DEFAULT_STOP_GRACE`]).
    pub stop_grace: Duration,
    /// Access mode: the files holding an Access service token's client ID and secret, handed
    /// to cloudflared as `TUNNEL_SERVICE_TOKEN_ID` / `TUNNEL_SERVICE_TOKEN_SECRET`.
    pub service_token: Option<(PathBuf, PathBuf)>,
}

/// cloudflared's `--grace-period` for a tunnel stopped with `stop_grace`: just below it (a
/// quarter of it, at most a second, kept for cloudflared to exit), and within cloudflared's
/// 3 minute ceiling.
pub fn grace_period(stop_grace: Duration) -> Duration {
    let margin = GRACE_MARGIN.min(stop_grace / 4);
    stop_grace.saturating_sub(margin).min(MAX_GRACE_PERIOD)
}

/// A duration as Go's `time.ParseDuration` reads it: milliseconds.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl CloudflareSpec {
    /// The command that prints cloudflared's version (its first argument is the program).
    pub fn version_argv(&self) -> Vec<String> {
        let binary = self.binary.as_deref().unwrap_or(DEFAULT_BINARY);
        vec![binary.to_string(), "--version".to_string()]
    }

    /// Settings for `mode` with every option at its default; fill in `token_file`,
    /// `hostname` or `url` as the mode needs.
    pub fn new(mode: CloudflareMode) -> Self {
        CloudflareSpec {
            mode,
            binary: None,
            token_file: None,
            hostname: None,
            url: None,
            port: DEFAULT_PORT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            service_token: None,
        }
    }

    /// Checks that the settings fit together and says what to run.
    fn plan(&self) -> crate::Result<Plan> {
        let invalid = |msg: String| Err(ProviderError::Config(msg));
        if self.binary.as_deref().is_some_and(str::is_empty) {
            return invalid("cloudflare: `binary` is empty".to_string());
        }
        if self.ready_timeout.is_zero() {
            return invalid("cloudflare: `ready_timeout` must be longer than zero".to_string());
        }
        match self.mode {
            CloudflareMode::Access => {
                if self.token_file.is_some() {
                    return invalid(
                        "cloudflare mode access: `token_file` is for mode tunnel; Access runs \
                         without a tunnel token"
                            .to_string(),
                    );
                }
                if self.url.is_some() {
                    return invalid(
                        "cloudflare mode access: `url` is for quick tunnels; the local listener \
                         address is chosen by tunnelkeeper"
                            .to_string(),
                    );
                }
                let Some(hostname) = self.hostname.as_deref() else {
                    return invalid(
                        "cloudflare mode access needs `hostname`: the Access application's \
                         hostname, e.g. ssh.example.com"
                            .to_string(),
                    );
                };
                Ok(Plan::Access {
                    hostname: check_hostname(hostname)?,
                    service_token: self.service_token.clone(),
                })
            }
            CloudflareMode::Tunnel => {
                if self.service_token.is_some() {
                    return invalid(
                        "cloudflare mode tunnel: the Access service token is for mode access"
                            .to_string(),
                    );
                }
                if self.port == 0 {
                    return invalid("cloudflare: `port` must be from 1 to 65535".to_string());
                }
                match &self.token_file {
                    Some(token_file) => {
                        if self.url.is_some() {
                            return invalid(
                                "cloudflare mode tunnel: `url` is only for quick tunnels (no \
                                 `token_file`); a tunnel with a token serves the ingress \
                                 configured in the Cloudflare dashboard"
                                    .to_string(),
                            );
                        }
                        let Some(hostname) = self.hostname.as_deref() else {
                            return invalid(
                                "cloudflare mode tunnel with `token_file` needs `hostname`: the \
                                 public hostname routed to the tunnel"
                                    .to_string(),
                            );
                        };
                        Ok(Plan::Named {
                            token_file: token_file.clone(),
                            hostname: check_hostname(hostname)?,
                        })
                    }
                    None => {
                        if self.hostname.is_some() {
                            return invalid(
                                "cloudflare quick tunnel (no `token_file`): `hostname` is \
                                 assigned by trycloudflare.com, leave it out or add `token_file`"
                                    .to_string(),
                            );
                        }
                        match self.url.as_deref().map(str::trim) {
                            Some(url) if !url.is_empty() && !url.contains(char::is_whitespace) => {
                                Ok(Plan::Quick {
                                    url: url.to_string(),
                                })
                            }
                            Some(url) => invalid(format!(
                                "cloudflare quick tunnel: `url` {url:?} is not a URL"
                            )),
                            None => invalid(
                                "cloudflare mode tunnel needs `token_file` (a named tunnel) or \
                                 `url` (a quick tunnel to that local service)"
                                    .to_string(),
                            ),
                        }
                    }
                }
            }
        }
    }
}

/// A hostname as cloudflared and the resolver want it: bare, no scheme, port or path.
fn check_hostname(hostname: &str) -> crate::Result<String> {
    let trimmed = hostname.trim();
    if trimmed.is_empty()
        || trimmed.contains("://")
        || trimmed.contains(['/', '?', '#', '@'])
        || trimmed.contains(char::is_whitespace)
    {
        return Err(ProviderError::Config(format!(
            "cloudflare: `hostname` {hostname:?} must be a bare host name such as ssh.example.com"
        )));
    }
    Ok(trimmed.to_string())
}

/// What to run, decided from validated settings.
#[derive(Debug, Clone)]
enum Plan {
    /// `cloudflared tunnel ... run --token-file`.
    Named {
        token_file: PathBuf,
        hostname: String,
    },
    /// `cloudflared tunnel ... --url`.
    Quick { url: String },
    /// `cloudflared access tcp`, with the service token's two files if any.
    Access {
        hostname: String,
        service_token: Option<(PathBuf, PathBuf)>,
    },
}

impl Plan {
    /// The command line, with `local` as the metrics address (tunnel) or the listener (access)
    /// and `grace` as the drain time on `SIGTERM` (tunnel modes; `access` has no such flag).
    fn argv(&self, binary: &str, local: SocketAddr, grace: Duration) -> Vec<String> {
        let mut argv = vec![binary.to_string()];
        let words: Vec<String> = match self {
            Plan::Named { token_file, .. } => vec![
                "tunnel".into(),
                "--no-autoupdate".into(),
                "--metrics".into(),
                local.to_string(),
                "--grace-period".into(),
                go_duration(grace),
                "run".into(),
                // The path, not the token: cloudflared reads the file itself (never argv).
                "--token-file".into(),
                token_file.display().to_string(),
            ],
            Plan::Quick { url } => vec![
                "tunnel".into(),
                "--no-autoupdate".into(),
                "--metrics".into(),
                local.to_string(),
                "--grace-period".into(),
                go_duration(grace),
                "--url".into(),
                url.clone(),
            ],
            Plan::Access { hostname, .. } => vec![
                "access".into(),
                "tcp".into(),
                "--hostname".into(),
                hostname.clone(),
                "--url".into(),
                local.to_string(),
            ],
        };
        argv.extend(words);
        argv
    }
}

/// Brings up `cloudflare` tunnels.
#[derive(Debug)]
pub struct CloudflareProvider {
    spec: CloudflareSpec,
}

impl CloudflareProvider {
    /// A provider for the given settings (checked when a tunnel starts).
    pub fn new(spec: CloudflareSpec) -> Self {
        CloudflareProvider { spec }
    }
}

#[async_trait]
impl Provider for CloudflareProvider {
    /// Runs cloudflared and waits (at most `ready_timeout`) until it is usable: `/ready`
    /// reports an edge connection (and, for a quick tunnel, its hostname is known), or the
    /// Access listener is bound. Fails with cloudflared's last words if it exits first.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        let plan = self.spec.plan()?;
        let binary = self
            .spec
            .binary
            .clone()
            .unwrap_or_else(|| DEFAULT_BINARY.to_string());
        let tag = format!("{}/{}", ctx.service, ctx.tunnel);
        let mut env = Vec::new();
        let mut redact = Vec::new();
        match &plan {
            Plan::Named { token_file, .. } => {
                check_token_file(token_file)?;
                version::require(
                    self.spec.version_argv(),
                    &tag,
                    MIN_VERSION_TOKEN_FILE,
                    "`tunnel run --token-file`",
                )
                .await
                .map_err(install_hint)?;
                // `--token`/TUNNEL_TOKEN wins over `--token-file` in cloudflared: an inherited
                // one (set for the daemon) would silently run another tunnel. Empty reads as
                // unset there.
                env.push(("TUNNEL_TOKEN".to_string(), String::new()));
            }
            Plan::Access {
                service_token: Some((id_file, secret_file)),
                ..
            } => {
                let id = read_secret(id_file, "service_token_id_file")?;
                let secret = read_secret(secret_file, "service_token_secret_file")?;
                redact.push(id.clone());
                redact.push(secret.clone());
                env.push(("TUNNEL_SERVICE_TOKEN_ID".to_string(), id));
                env.push(("TUNNEL_SERVICE_TOKEN_SECRET".to_string(), secret));
            }
            Plan::Quick { .. } | Plan::Access { .. } => {}
        }
        let grace = grace_period(self.spec.stop_grace);
        let deadline = Instant::now() + self.spec.ready_timeout;
        let mut attempt = 1;
        loop {
            let local = free_local_addr()?;
            let child = process::spawn(SpawnSpec {
                argv: plan.argv(&binary, local, grace),
                env: env.clone(),
                cwd: None,
                tag: tag.clone(),
                // The tunnel token stays in its file, which only cloudflared reads; an Access
                // service token is masked should cloudflared echo it.
                redact: redact.clone(),
            })
            .await
            .map_err(install_hint)?;
            let waited = wait_until_up(&child, &plan, local, deadline).await;
            // On an error below, dropping `child` kills its group: a failed start leaves nothing.
            match waited {
                Ok(hostname) => {
                    tracing::info!(tunnel = %tag, pid = child.pid(), "cloudflared is up: {hostname}");
                    let route = match &plan {
                        Plan::Access { .. } => Route::Access { listener: local },
                        Plan::Named { .. } | Plan::Quick { .. } => Route::Edge {
                            metrics: local,
                            target: host_port(&hostname, self.spec.port),
                        },
                    };
                    return Ok(Arc::new(CloudflareTunnel {
                        child,
                        hostname,
                        route,
                        resolver: ctx.resolver.clone(),
                        stop_grace: self.spec.stop_grace,
                        ready_at: std::sync::Mutex::new(None),
                    }));
                }
                Err(StartFailure::PortTaken(why)) if attempt < PORT_ATTEMPTS => {
                    tracing::warn!(tunnel = %tag, "local port {local} was taken before cloudflared bound it ({why}); trying another");
                    attempt += 1;
                }
                Err(failure) => return Err(failure.into_error(self.spec.ready_timeout)),
            }
        }
    }
}

/// Checks that the token file exists, is a non-empty regular file and can be opened, without
/// reading a byte of it: the token is cloudflared's business alone.
fn check_token_file(path: &std::path::Path) -> crate::Result<()> {
    let problem = |why: String| {
        Err(ProviderError::Config(format!(
            "cloudflare `token_file` {}: {why}",
            path.display()
        )))
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) => return problem(err.to_string()),
    };
    if !meta.is_file() {
        return problem("not a regular file".to_string());
    }
    if meta.len() == 0 {
        return problem(
            "the file is empty; put the tunnel token from the Cloudflare dashboard in it"
                .to_string(),
        );
    }
    // Opening proves the permissions (cloudflared runs as the daemon's user); dropping the
    // handle unread keeps the token out of this process.
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(err) => problem(err.to_string()),
    }
}

/// Reads one line of secret from `path` (an Access service token part). Errors name the key and
/// the file, never the content.
fn read_secret(path: &std::path::Path, key: &str) -> crate::Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|err| {
        ProviderError::Config(format!("cloudflare `{key}` {}: {err}", path.display()))
    })?;
    let value = raw.trim();
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(ProviderError::Config(format!(
            "cloudflare `{key}` {}: must hold one non-empty line",
            path.display()
        )));
    }
    Ok(value.to_string())
}

/// A loopback address with a port nothing listens on right now (bound, then released).
fn free_local_addr() -> crate::Result<SocketAddr> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|err| ProviderError::Spawn(format!("cannot pick a free local port: {err}")))
}

/// Gives a missing cloudflared a cloudflared-specific install hint.
fn install_hint(err: ProviderError) -> ProviderError {
    err.with_install_hint(INSTALL_HINT)
}

/// `host:port`, with brackets around an IPv6 literal.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a start attempt failed.
enum StartFailure {
    /// The local port was grabbed by someone else before cloudflared bound it: worth another
    /// attempt with a new port.
    PortTaken(String),
    /// The child exited.
    Exited(String),
    /// Not ready in time.
    Timeout(String),
}

impl StartFailure {
    fn into_error(self, ready_timeout: Duration) -> ProviderError {
        match self {
            StartFailure::PortTaken(msg) | StartFailure::Exited(msg) => ProviderError::Spawn(msg),
            StartFailure::Timeout(detail) => ProviderError::StartTimeout {
                after: ready_timeout,
                detail,
            },
        }
    }
}

/// The last output lines seen, oldest first.
#[derive(Default)]
struct Recent(VecDeque<String>);

impl Recent {
    fn push(&mut self, line: String) {
        if self.0.len() == KEPT_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line);
    }

    fn as_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// Watches a fresh child until it is usable, exits, or `deadline` passes. Returns the
/// tunnel's hostname.
async fn wait_until_up(
    child: &Supervised,
    plan: &Plan,
    local: SocketAddr,
    deadline: Instant,
) -> Result<String, StartFailure> {
    let mut lines = child.lines();
    let mut seen = Recent::default();
    let mut open = true;
    let mut banner: Option<String> = None;
    let mut last_answer = "no answer yet".to_string();
    let mut next_poll = Instant::now();
    loop {
        tokio::select! {
            biased;
            info = child.exited() => {
                drain(&mut lines, &mut seen).await;
                let lines = seen.as_vec();
                let reason = describe_exit(&info, &lines, " during start");
                if lines.iter().any(|l| l.contains("address already in use")) {
                    return Err(StartFailure::PortTaken(reason));
                }
                return Err(StartFailure::Exited(reason));
            }
            () = tokio::time::sleep_until(deadline) => {
                let lines = seen.as_vec();
                return Err(StartFailure::Timeout(format!(
                    "cloudflared never became ready ({last_answer}); last log line: {}",
                    quote(telling_line(&lines)),
                )));
            }
            // Polling comes before reading output, so a chatty child cannot starve it.
            () = tokio::time::sleep_until(next_poll) => {
                let budget = API_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
                match probe_start(plan, local, budget, banner.as_deref()).await {
                    Ok(hostname) => return Ok(hostname),
                    Err(why) => last_answer = why,
                }
                next_poll = Instant::now() + READY_POLL;
            }
            line = lines.next(), if open => match line {
                Some(line) => {
                    if matches!(plan, Plan::Quick { .. }) {
                        if let Some(host) = banner_hostname(&line.text) {
                            banner = Some(host);
                        }
                    }
                    seen.push(line.text);
                }
                None => open = false,
            },
        }
    }
}

/// One readiness probe during start: `Ok(hostname)` once usable, else why not yet.
async fn probe_start(
    plan: &Plan,
    local: SocketAddr,
    budget: Duration,
    banner: Option<&str>,
) -> Result<String, String> {
    match plan {
        Plan::Named { hostname, .. } => {
            read_ready(local, budget).await?;
            Ok(hostname.clone())
        }
        Plan::Quick { .. } => {
            read_ready(local, budget).await?;
            quick_hostname(local, budget, banner).await
        }
        Plan::Access { hostname, .. } => {
            access_listening(local, budget).await?;
            Ok(hostname.clone())
        }
    }
}

/// `GET /ready` on the metrics server: the number of registered edge connections, or why the
/// tunnel is not ready (cloudflared's own answer when it gave one).
async fn read_ready(metrics: SocketAddr, timeout: Duration) -> Result<u64, String> {
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
async fn quick_hostname(
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

/// The hostname in a quick-tunnel banner line (`|  https://<words>.trycloudflare.com  |`).
fn banner_hostname(line: &str) -> Option<String> {
    let start = line.find("https://")? + "https://".len();
    let host: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    host.ends_with(".trycloudflare.com").then_some(host)
}

/// Whether the Access listener is bound. Read from `/proc/net/tcp` rather than by connecting:
/// every connection to `cloudflared access tcp` opens a session to Cloudflare (and may start a
/// browser login), which a readiness poll must not do. Without procfs, a connect has to do.
async fn access_listening(listener: SocketAddr, budget: Duration) -> Result<(), String> {
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
fn listening_in_procfs(addr: SocketAddr) -> io::Result<bool> {
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

/// Reads what is left of a child's output after it exited.
async fn drain(lines: &mut Lines, seen: &mut Recent) {
    let _ = tokio::time::timeout(EXIT_DRAIN, async {
        while let Some(line) = lines.next().await {
            seen.push(line.text);
        }
    })
    .await;
}

/// How cloudflared ended (`when` says when, if that matters), with the line that best says why.
fn describe_exit(info: &ExitInfo, lines: &[String], when: &str) -> String {
    let line = telling_line(lines);
    let mut text = format!("cloudflared {info}{when}; last log line: {}", quote(line));
    if line.is_some_and(|l| l.contains("flag provided but not defined: -token-file")) {
        text.push_str(" (this cloudflared predates `--token-file`: upgrade it)");
    }
    text
}

/// The output line that best explains a failure. cloudflared ends a usage error with a
/// "See 'cloudflared ... --help'." hint, an unknown flag with a page of help after the
/// "Incorrect Usage:" line, and a dying tunnel often with info lines after the error.
fn telling_line(lines: &[String]) -> Option<&str> {
    if let Some(usage) = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Incorrect Usage:"))
    {
        return Some(usage);
    }
    let last = lines
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty() && !is_help_hint(l))?;
    if matches!(level(last), Some(Level::Quiet)) {
        if let Some(error) = lines
            .iter()
            .rev()
            .find(|l| matches!(level(l), Some(Level::Error)))
        {
            return Some(error);
        }
    }
    Some(last)
}

fn is_help_hint(line: &str) -> bool {
    line.starts_with("See 'cloudflared ") && line.ends_with("--help'.")
}

/// The two kinds of log level that matter when picking a reason.
enum Level {
    /// Debug, info, warning.
    Quiet,
    /// Error, fatal, panic.
    Error,
}

/// The level of a cloudflared log line: text (`<time> INF ...`) or JSON (`"level":"info"`).
fn level(line: &str) -> Option<Level> {
    let word = if line.starts_with('{') {
        serde_json::from_str::<Value>(line)
            .ok()?
            .get("level")?
            .as_str()?
            .to_ascii_lowercase()
    } else {
        line.split_whitespace().nth(1)?.to_ascii_lowercase()
    };
    match word.as_str() {
        "dbg" | "inf" | "wrn" | "debug" | "info" | "warn" => Some(Level::Quiet),
        "err" | "ftl" | "error" | "fatal" | "panic" => Some(Level::Error),
        _ => None,
    }
}

fn quote(line: Option<&str>) -> String {
    match line {
        Some(line) => format!("{line:?}"),
        None => "(none)".to_string(),
    }
}

/// Where a running tunnel's streams go.
#[derive(Debug)]
enum Route {
    /// Through Cloudflare's edge to the public hostname; health from the metrics server.
    Edge {
        metrics: SocketAddr,
        /// `hostname:port`, resolved afresh on every dial.
        target: String,
    },
    /// Through the local `cloudflared access tcp` listener.
    Access { listener: SocketAddr },
}

/// A running cloudflared.
struct CloudflareTunnel {
    child: Supervised,
    hostname: String,
    route: Route,
    resolver: Resolver,
    stop_grace: Duration,
    /// When `/ready` last said ready (edge dials within [`READY_CACHE`] of it skip asking).
    ready_at: std::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for CloudflareTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareTunnel")
            .field("pid", &self.child.pid())
            .field("hostname", &self.hostname)
            .field("route", &self.route)
            .finish()
    }
}

impl CloudflareTunnel {
    /// Why the tunnel is gone: how cloudflared ended, and its telling last words.
    async fn describe(&self, info: &ExitInfo) -> String {
        let mut lines = self.child.lines();
        let mut seen = Recent::default();
        drain(&mut lines, &mut seen).await;
        describe_exit(info, &seen.as_vec(), "")
    }
}

#[async_trait]
impl Tunnel for CloudflareTunnel {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.hostname.clone(),
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(info) = self.child.try_exited() {
            return Err(ProviderError::Closed(self.describe(&info).await));
        }
        match &self.route {
            Route::Edge { target, metrics } => {
                // The edge answers with error 1033 while no connector is registered: only
                // cloudflared's own readiness says the hostname leads to the service.
                let fresh = self
                    .ready_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some_and(|at| at.elapsed() < READY_CACHE);
                if !fresh {
                    read_ready(*metrics, API_TIMEOUT)
                        .await
                        .map_err(ProviderError::Unhealthy)?;
                    *self
                        .ready_at
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
                }
                // Names are looked up afresh: Cloudflare's anycast answers may change.
                self.resolver.dial(target, timeout).await
            }
            Route::Access { listener } => dial_tcp(*listener, timeout).await,
        }
    }

    async fn check(&self) -> crate::Result<Health> {
        if let Some(info) = self.child.try_exited() {
            return Err(ProviderError::Closed(self.describe(&info).await));
        }
        match &self.route {
            Route::Edge { metrics, .. } => match read_ready(*metrics, API_TIMEOUT).await {
                Ok(n) => Ok(Health {
                    latency: None,
                    detail: Some(format!("{n} edge connections")),
                }),
                Err(why) => Err(ProviderError::Unhealthy(why)),
            },
            Route::Access { listener } => match listening_in_procfs(*listener) {
                Ok(false) => Err(ProviderError::Unhealthy(format!(
                    "cloudflared no longer listens on {listener}"
                ))),
                // Without procfs there is no side-effect-free check; the child is alive.
                Ok(true) | Err(_) => Ok(Health::default()),
            },
        }
    }

    async fn closed(&self) -> String {
        let info = self.child.exited().await;
        self.describe(&info).await
    }

    async fn stop(&self) {
        self.child.terminate(self.stop_grace).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| l.to_string()).collect()
    }

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

    #[test]
    fn grace_period_stays_below_the_stop_grace() {
        assert_eq!(grace_period(Duration::from_secs(5)), Duration::from_secs(4));
        assert_eq!(
            grace_period(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            grace_period(Duration::from_millis(400)),
            Duration::from_millis(300)
        );
        assert_eq!(grace_period(Duration::from_secs(600)), MAX_GRACE_PERIOD);
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn banner_line_yields_the_hostname() {
        let line = "2026-11-20T10:15:02Z INF |  https://fancy-river-sound-example.trycloudflare.com                                       |";
        assert_eq!(
            banner_hostname(line).as_deref(),
            Some("fancy-river-sound-example.trycloudflare.com")
        );
        assert_eq!(banner_hostname("INF Visit https://example.com/"), None);
    }

    #[test]
    fn telling_line_skips_help_and_prefers_errors() {
        let usage = lines(&[
            "Provided Tunnel token is not valid.",
            "See 'cloudflared tunnel run --help'.",
        ]);
        assert_eq!(
            telling_line(&usage),
            Some("Provided Tunnel token is not valid.")
        );
        let flag = lines(&[
            "Incorrect Usage: flag provided but not defined: -token-file",
            "",
            "NAME:",
            "   cloudflared tunnel run - Proxy a local web server by running the given tunnel",
        ]);
        assert_eq!(
            telling_line(&flag),
            Some("Incorrect Usage: flag provided but not defined: -token-file")
        );
        let runtime = lines(&[
            "2026-11-20T10:15:02Z INF Starting tunnel tunnelID=x",
            "2026-11-20T10:15:03Z ERR Unable to establish connection with Cloudflare edge",
            "2026-11-20T10:15:03Z INF Retrying connection in up to 1s",
        ]);
        assert_eq!(
            telling_line(&runtime),
            Some("2026-11-20T10:15:03Z ERR Unable to establish connection with Cloudflare edge")
        );
        let json = lines(&[
            r#"{"level":"error","message":"boom","time":"t"}"#,
            r#"{"level":"info","message":"bye","time":"t"}"#,
        ]);
        assert_eq!(telling_line(&json), Some(json[0].as_str()));
        assert_eq!(telling_line(&[]), None);
    }

    #[test]
    fn settings_that_cannot_work_are_config_errors() {
        let config_error =
            |spec: CloudflareSpec| matches!(spec.plan(), Err(ProviderError::Config(_)));
        assert!(config_error(CloudflareSpec::new(CloudflareMode::Access)));
        assert!(config_error(CloudflareSpec::new(CloudflareMode::Tunnel)));
        let mut named = CloudflareSpec::new(CloudflareMode::Tunnel);
        named.token_file = Some("/t".into());
        assert!(config_error(named.clone()));
        named.hostname = Some("https://ssh.example.com".into());
        assert!(config_error(named.clone()));
        named.hostname = Some("ssh.example.com".into());
        assert!(named.plan().is_ok());
        named.url = Some("http://127.0.0.1:1".into());
        assert!(config_error(named));
        let mut quick = CloudflareSpec::new(CloudflareMode::Tunnel);
        quick.url = Some("http://127.0.0.1:8080".into());
        assert!(quick.plan().is_ok());
        quick.hostname = Some("x.example.com".into());
        assert!(config_error(quick));
    }

    #[test]
    fn command_lines_are_the_documented_ones() {
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 20241));
        let grace = grace_period(DEFAULT_STOP_GRACE);
        let named = Plan::Named {
            token_file: "/etc/tk/cf".into(),
            hostname: "h".into(),
        };
        assert_eq!(
            named.argv("cloudflared", local, grace).join(" "),
            "cloudflared tunnel --no-autoupdate --metrics 127.0.0.1:20241 --grace-period 4000ms run --token-file /etc/tk/cf"
        );
        let quick = Plan::Quick {
            url: "http://localhost:8080".into(),
        };
        assert_eq!(
            quick.argv("cloudflared", local, grace).join(" "),
            "cloudflared tunnel --no-autoupdate --metrics 127.0.0.1:20241 --grace-period 4000ms --url http://localhost:8080"
        );
        let access = Plan::Access {
            hostname: "ssh.example.com".into(),
            service_token: None,
        };
        assert_eq!(
            access.argv("cloudflared", local, grace).join(" "),
            "cloudflared access tcp --hostname ssh.example.com --url 127.0.0.1:20241"
        );
    }
}
