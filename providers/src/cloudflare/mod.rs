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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::process::{self, Lines, SpawnSpec, Supervised};
use crate::util::{free_loopback_addr, host_port, quote};
use crate::version::{self, Version};
use crate::{Provider, ProviderError, StartContext, Tunnel};

mod api;
mod cli;
mod spec;
mod tunnel;

use api::{access_listening, quick_hostname, read_ready};
pub use cli::grace_period;
use cli::{banner_hostname, describe_exit, telling_line};
pub use spec::{CloudflareMode, CloudflareSettings, CloudflareSpec};
use tunnel::{CloudflareTunnel, Route};

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
/// How long a `/ready` answer gates dials without being asked again.
const READY_CACHE: Duration = Duration::from_secs(1);

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
        let plan = &self.spec.mode;
        let binary = self
            .spec
            .binary
            .clone()
            .unwrap_or_else(|| DEFAULT_BINARY.to_string());
        let tag = ctx.tag();
        let mut env = Vec::new();
        let mut redact = Vec::new();
        match plan {
            CloudflareMode::Named { token_file, .. } => {
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
            CloudflareMode::Access {
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
            CloudflareMode::Quick { .. } | CloudflareMode::Access { .. } => {}
        }
        let grace = grace_period(self.spec.stop_grace);
        let deadline = Instant::now() + self.spec.ready_timeout;
        let mut attempt = 1;
        loop {
            let local = free_loopback_addr().map_err(|err| {
                ProviderError::Spawn(format!("cannot pick a free local port: {err}"))
            })?;
            let child = process::spawn(SpawnSpec {
                argv: cli::argv(plan, &binary, local, grace),
                env: env.clone(),
                cwd: None,
                tag: tag.clone(),
                // The tunnel token stays in its file, which only cloudflared reads; an Access
                // service token is masked should cloudflared echo it.
                redact: redact.clone(),
            })
            .await
            .map_err(install_hint)?;
            let waited = wait_until_up(&child, plan, local, deadline).await;
            // On an error below, dropping `child` kills its group: a failed start leaves nothing.
            match waited {
                Ok(hostname) => {
                    tracing::info!(tunnel = %tag, pid = child.pid(), "cloudflared is up: {hostname}");
                    let route = match plan {
                        CloudflareMode::Access { .. } => Route::Access { listener: local },
                        CloudflareMode::Named { .. } | CloudflareMode::Quick { .. } => {
                            Route::Edge {
                                metrics: local,
                                target: host_port(&hostname, self.spec.port),
                            }
                        }
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

/// Gives a missing cloudflared a cloudflared-specific install hint.
fn install_hint(err: ProviderError) -> ProviderError {
    err.with_install_hint(INSTALL_HINT)
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

/// What a start timeout reports when cloudflared never answered its `/ready`.
const NO_ANSWER: &str = "no answer yet";

/// Watches a fresh child until it is usable, exits, or `deadline` passes. Returns the
/// tunnel's hostname.
async fn wait_until_up(
    child: &Supervised,
    plan: &CloudflareMode,
    local: SocketAddr,
    deadline: Instant,
) -> Result<String, StartFailure> {
    let mut lines = child.lines();
    let mut seen = Recent::default();
    let mut open = true;
    let mut banner: Option<String> = None;
    let mut last_answer = NO_ANSWER.to_string();
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
                let asked = Instant::now();
                match probe_start(plan, local, budget, banner.as_deref()).await {
                    Ok(hostname) => return Ok(hostname),
                    Err(why) => {
                        // A poll the deadline cut short that then ran out of time says nothing
                        // about cloudflared: the operator is told its last real answer (its
                        // 503 and `readyConnections=0`), not "timed out after 40µs".
                        let cut_short = budget < API_TIMEOUT && asked.elapsed() >= budget;
                        if !cut_short || last_answer == NO_ANSWER {
                            last_answer = why;
                        }
                    }
                }
                next_poll = Instant::now() + READY_POLL;
            }
            line = lines.next(), if open => match line {
                Some(line) => {
                    if matches!(plan, CloudflareMode::Quick { .. }) {
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
    plan: &CloudflareMode,
    local: SocketAddr,
    budget: Duration,
    banner: Option<&str>,
) -> Result<String, String> {
    match plan {
        CloudflareMode::Named { hostname, .. } => {
            read_ready(local, budget).await?;
            Ok(hostname.to_string())
        }
        CloudflareMode::Quick { .. } => {
            read_ready(local, budget).await?;
            quick_hostname(local, budget, banner).await
        }
        CloudflareMode::Access { hostname, .. } => {
            access_listening(local, budget).await?;
            Ok(hostname.to_string())
        }
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
