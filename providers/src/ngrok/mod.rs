//! The `ngrok` provider: the ngrok agent v3 (`ngrok tcp|http <to>`) exposing a local service.
//!
//! Start first asks `ngrok version` and refuses an agent older than [`MIN_VERSION`] (the config
//! layout and `--url` below need it). The authtoken never touches argv (visible to every user
//! through `/proc/*/cmdline`) nor the logs: start writes a private agent config file (mode 0600
//! from its creation, one per tunnel, removed on stop, under the daemon's runtime directory so
//! a crash cannot leave it on persistent disk; leftovers of a crashed run are removed at the
//! next start) holding `agent.authtoken` and an explicit `agent.web_addr` on a free loopback
//! port, then runs
//!
//! ```text
//! ngrok <tcp|http> <to> --config <file> --log stdout --log-format json [--inspect=false] [--url <url>] [--region <region>]
//! ```
//!
//! under [`crate::process`] supervision. `--inspect=false` (http): the agent's local API is
//! open to every local user, and with inspection on it would hand them every captured request.
//! The public URL comes from the agent's local API (`GET /api/tunnels`, polled until the tunnel
//! is listed), with the `started tunnel` log line as a fallback when the API stays silent.
//!
//! Only the agent's exit is a hard signal. A JSON log line with `lvl` `eror`/`crit` is not: the
//! agent logs one on every network blip (`session closed, starting reconnect loop`) and
//! reconnects by itself, keeping its URL, while a restart would lose a free-plan URL or hit
//! ERR_NGROK_334/108 with a reserved one. So an error line starts a watch: if `/api/status` has
//! not said `online` again within `reconnect_grace`, the tunnel closes (and the daemon restarts
//! the agent). Native health, and the gate of every dial, is the agent's own view,
//! `GET /api/status`: `online`, with the agent-to-edge round trip of its session legs as
//! latency; ngrok's edge accepts connections for an offline endpoint (ERR_NGROK_3200), so a
//! connect there proves nothing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::process::{self, SpawnSpec, Supervised};
use crate::util::{free_loopback_addr, quote};
use crate::version::{self, Version};
use crate::{http, Provider, ProviderError, StartContext, Tunnel};

mod api;
mod cli;
mod config;
mod spec;
mod tunnel;

use api::*;
use cli::*;
use config::*;
pub use spec::{NgrokProto, NgrokSettings, NgrokSpec};
use tunnel::*;

/// The program run unless `binary:` says otherwise (looked up in `PATH`).
pub const DEFAULT_BINARY: &str = "ngrok";
/// How long start waits for the public URL unless configured otherwise.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long stop waits after `SIGTERM` before `SIGKILL`, unless configured otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// Where to get the agent when it is missing.
const INSTALL_HINT: &str = "install the ngrok agent v3 (https://ngrok.com/download, or your \
    distribution's `ngrok` package) or set `binary:` to its full path";
/// Pause between polls of `/api/tunnels` during start.
const API_POLL: Duration = Duration::from_millis(100);
/// How long one request to the local API may take (it is on loopback: a slow answer means a
/// wedged agent).
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the API gets to list a tunnel that the log already announced before the log's URL
/// is used: the API is the documented source, the log line's fields are not verified.
const LOG_URL_GRACE: Duration = Duration::from_secs(1);
/// How long to keep reading output after the agent exited during start, so the error can
/// quote its `err`.
const EXIT_DRAIN: Duration = Duration::from_millis(300);
/// The public port of an `http` endpoint whose URL names none: ngrok's edge serves HTTPS.
const HTTPS_PORT: u16 = 443;
/// The oldest agent that takes the config (`version: 3` with `agent:`) and the `--url` flag
/// this provider passes (ngrok agent changelog, 3.16.0). `/api/status` needs 3.9.0, older still.
pub const MIN_VERSION: Version = Version(3, 16, 0);
/// How long after an error line the agent may stay away from `online` before it is restarted,
/// unless configured otherwise.
pub const DEFAULT_RECONNECT_GRACE: Duration = Duration::from_secs(60);
/// How often `/api/status` is read while the agent reconnects.
const RECONNECT_POLL: Duration = Duration::from_millis(250);
/// How long an `online` answer gates dials without being asked again.
const ONLINE_CACHE: Duration = Duration::from_secs(1);
/// Marks a health answer that comes from no answer at all (the API could not be reached).
const API_UNREACHABLE: &str = "no answer";
/// Prefix of every config file this provider writes; the rest is `<tunnel>-<pid>-<seq>.yml`.
const CONFIG_PREFIX: &str = "tunnelkeeper-ngrok-";

/// Brings up `ngrok` tunnels.
#[derive(Debug)]
pub struct NgrokProvider {
    spec: NgrokSpec,
}

impl NgrokProvider {
    /// A provider for the given settings.
    pub fn new(spec: NgrokSpec) -> Self {
        NgrokProvider { spec }
    }
}

#[async_trait]
impl Provider for NgrokProvider {
    /// Checks the agent's version, writes the private config, runs the agent and waits (at
    /// most `start_timeout`) for the public URL. Fails on the agent's exit (quoting the `err`
    /// of its last error line) or when no URL appears in time; a failed start leaves neither
    /// process nor config file.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        let spec = &self.spec;
        let tag = ctx.tag();
        version::require(
            spec.version_argv(),
            &tag,
            MIN_VERSION,
            "the agent config `version: 3` with `agent:`, and `--url`",
        )
        .await
        .map_err(install_hint)?;
        if let Some(region) = &spec.region {
            tracing::warn!(tunnel = %tag, %region, "ngrok `region` is deprecated by ngrok (the agent picks the lowest-latency region); passing --region anyway");
        }
        let token = read_authtoken(&spec.authtoken_file)?;
        // The port is released before the agent binds it; losing that race makes the agent
        // fail its start, and the daemon retries.
        let web_addr = free_loopback_addr().map_err(ConfigFileError::WebAddr)?;
        let stem = file_stem(&tag);
        for dir in std::iter::once(&spec.config_dir).chain(&spec.old_config_dirs) {
            remove_leftovers(dir, &stem);
        }
        // Small local writes: not worth a blocking-pool round trip.
        let config = ConfigFile::create(&spec.config_dir, &tag, &config_yaml(&token, web_addr))?;
        let argv = command_line(spec, config.path());
        let child = process::spawn(SpawnSpec {
            argv,
            env: Vec::new(),
            cwd: None,
            tag: tag.clone(),
            // The agent may quote a token it rejects; never let that reach the journal.
            redact: vec![token.0.clone()],
        })
        .await
        .map_err(install_hint)?;
        let (log_tx, log) = watch::channel(LogState::default());
        tokio::spawn(follow_log(child.lines(), log_tx));

        let deadline = Instant::now() + spec.start_timeout;
        // On an error, dropping `child` kills its group and dropping `config` removes the file.
        let url = wait_for_url(&child, log.clone(), web_addr, deadline, spec.start_timeout)
            .await
            .map_err(|err| redact_error(&token, err))?;
        let target = dial_target(spec.proto, &url)?;
        let (dead_tx, dead) = watch::channel(None);
        let watch = tokio::spawn(watch_reconnects(
            log.clone(),
            web_addr,
            spec.reconnect_grace,
            dead_tx,
            tag,
        ));
        Ok(Arc::new(NgrokTunnel {
            child,
            url,
            target,
            web_addr,
            resolver: ctx.resolver.clone(),
            stop_grace: spec.stop_grace,
            log,
            dead,
            watch,
            online_at: Mutex::new(None),
            config: Mutex::new(Some(config)),
            token,
        }))
    }
}

/// Gives a missing agent an ngrok-specific install hint.
fn install_hint(err: ProviderError) -> ProviderError {
    err.with_install_hint(INSTALL_HINT)
}

/// Scrubs the token from an error's message (the agent may quote a refused token).
fn redact_error(token: &Secret, err: ProviderError) -> ProviderError {
    match err {
        ProviderError::Spawn(msg) => ProviderError::Spawn(token.redact(&msg)),
        ProviderError::StartTimeout { after, detail } => ProviderError::StartTimeout {
            after,
            detail: token.redact(&detail),
        },
        other => other,
    }
}

/// Polls `/api/tunnels` until it lists a public URL, with the `started tunnel` log line as the
/// fallback, and watches the child for an early exit. An error line alone does not end the
/// wait (the agent retries its session by itself); it is quoted if the agent then exits or
/// the wait times out.
async fn wait_for_url(
    child: &Supervised,
    mut log: watch::Receiver<LogState>,
    web_addr: SocketAddr,
    deadline: Instant,
    start_timeout: Duration,
) -> crate::Result<String> {
    let mut last_api;
    let mut log_url_since: Option<Instant> = None;
    loop {
        if let Some(info) = child.try_exited() {
            // The agent logs its error just before exiting: let the log follower read it
            // (it ends, dropping its sender, once the pipes close).
            let _ =
                tokio::time::timeout(EXIT_DRAIN, async { while log.changed().await.is_ok() {} })
                    .await;
            let reason = match log.borrow().error.clone() {
                Some(err) => format!("ngrok failed to start: {err}"),
                None => format!(
                    "ngrok {info} during start; last output line: {}",
                    quote(child.last_line().as_deref())
                ),
            };
            return Err(ProviderError::Spawn(reason));
        }

        let budget = API_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        match http::get_json(web_addr, "/api/tunnels", budget).await {
            Ok((200, body)) => match public_url_from_tunnels(&body) {
                Some(url) => return Ok(url),
                None => last_api = "no tunnel listed yet".to_string(),
            },
            Ok((status, _)) => last_api = format!("status {status}"),
            Err(err) => last_api = err.to_string(),
        }

        let log_url = log.borrow().url.clone();
        if let Some(url) = log_url {
            let since = *log_url_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= LOG_URL_GRACE {
                tracing::warn!(%url, api = %last_api, "ngrok's API did not list the tunnel; using the URL from its `started tunnel` log line");
                return Ok(url);
            }
        }

        if Instant::now() + API_POLL >= deadline {
            let error = match log.borrow().error.clone() {
                Some(err) => format!("; its last error: {err}"),
                None => String::new(),
            };
            return Err(ProviderError::StartTimeout {
                after: start_timeout,
                detail: format!(
                    "GET http://{web_addr}/api/tunnels never listed a public URL (last: {last_api}){error}; last output line: {}",
                    quote(child.last_line().as_deref())
                ),
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(API_POLL) => {}
            _ = child.exited() => {}
        }
    }
}

/// The soft signal made hard after a time bound: after each error line, waits for
/// `/api/status` to say `online` again; if it has not within `grace`, publishes why the
/// tunnel is dead (and ends). Ends quietly when the log ends (the agent exited: the exit is
/// the hard signal then).
async fn watch_reconnects(
    mut log: watch::Receiver<LogState>,
    web_addr: SocketAddr,
    grace: Duration,
    dead: watch::Sender<Option<String>>,
    tag: String,
) {
    let mut seen = log.borrow().errors;
    loop {
        if log.wait_for(|s| s.errors != seen).await.is_err() {
            return;
        }
        let err = log.borrow().error.clone().unwrap_or_default();
        tracing::warn!(tunnel = %tag, %err, "ngrok reported an error; waiting up to {grace:?} for its session to come back");
        let since = Instant::now();
        let back = loop {
            // A moment first: right after the error line the status may still read `online`.
            tokio::time::sleep(RECONNECT_POLL).await;
            if agent_online(web_addr).await.is_ok() {
                break true;
            }
            if since.elapsed() >= grace {
                break false;
            }
        };
        if back {
            tracing::info!(tunnel = %tag, "ngrok reconnected by itself after {:?}", since.elapsed());
            // Errors logged while it reconnected are part of the same blip.
            seen = log.borrow().errors;
            continue;
        }
        let _ = dead.send(Some(format!(
            "ngrok reported an error ({err}) and its session was not online again within {grace:?}"
        )));
        return;
    }
}
