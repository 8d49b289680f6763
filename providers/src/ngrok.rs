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

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::process::{self, Lines, SpawnSpec, Supervised};
use crate::version::{self, Version};
use crate::{
    http, Dial, Endpoint, Health, Provider, ProviderError, Resolver, StartContext, Tunnel,
};

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

/// Which kind of endpoint the agent opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NgrokProto {
    /// `ngrok tcp`: a raw TCP address such as `tcp://0.tcp.ngrok.io:53476`.
    Tcp,
    /// `ngrok http`: an HTTPS URL such as `https://x.ngrok.app`.
    Http,
}

impl NgrokProto {
    /// The agent's subcommand for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            NgrokProto::Tcp => "tcp",
            NgrokProto::Http => "http",
        }
    }
}

impl fmt::Display for NgrokProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of an `ngrok` tunnel. Holds the *path* of the authtoken, never the token: the
/// token is read at each start and goes only into the private config file.
#[derive(Debug, Clone)]
pub struct NgrokSpec {
    /// The agent program; [`DEFAULT_BINARY`] in `PATH` when `None`.
    pub binary: Option<String>,
    /// `tcp` or `http`.
    pub proto: NgrokProto,
    /// The local service to expose, as the agent takes it (`127.0.0.1:22`, `22`,
    /// `http://localhost:8080`).
    pub to: String,
    /// The file holding the authtoken (required; surrounding whitespace is ignored).
    pub authtoken_file: PathBuf,
    /// A reserved URL or domain, passed as `--url` (`https://x.ngrok.app`,
    /// `tcp://1.tcp.ngrok.io:12345`).
    pub url: Option<String>,
    /// An ngrok region, passed as `--region` (`us`, `eu`, `au`, ...). Deprecated by ngrok (the
    /// agent picks the lowest-latency region): start warns when it is set.
    pub region: Option<String>,
    /// Where the per-tunnel agent config file is written (created 0700 if missing). The daemon
    /// passes `<runtime dir>/ngrok` (tmpfs), so a crash leaves no token copy on disk.
    pub config_dir: PathBuf,
    /// How long after an error line the agent may stay away from `online` before the tunnel
    /// closes ([`DEFAULT_RECONNECT_GRACE`] by default).
    pub reconnect_grace: Duration,
    /// Directories where earlier versions wrote the config file (the daemon passes
    /// `state_dir/ngrok`): this tunnel's token copies left there are removed at start.
    pub old_config_dirs: Vec<PathBuf>,
    /// How long start waits for the public URL ([`DEFAULT_START_TIMEOUT`] by default).
    pub start_timeout: Duration,
    /// How long stop waits after `SIGTERM` before `SIGKILL` ([`DEFAULT_STOP_GRACE`] by default).
    pub stop_grace: Duration,
}

impl NgrokSpec {
    /// Settings with the default binary, no reserved URL or region, and the default timeouts.
    pub fn new(
        proto: NgrokProto,
        to: impl Into<String>,
        authtoken_file: impl Into<PathBuf>,
        config_dir: impl Into<PathBuf>,
    ) -> Self {
        NgrokSpec {
            binary: None,
            proto,
            to: to.into(),
            authtoken_file: authtoken_file.into(),
            url: None,
            region: None,
            config_dir: config_dir.into(),
            reconnect_grace: DEFAULT_RECONNECT_GRACE,
            old_config_dirs: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    /// The program to run.
    /// The command that prints the agent's version (its first argument is the program).
    pub fn version_argv(&self) -> Vec<String> {
        vec![self.binary().to_string(), "version".to_string()]
    }

    fn binary(&self) -> &str {
        self.binary.as_deref().unwrap_or(DEFAULT_BINARY)
    }

    /// Refuses values that would change the meaning of the command line: argv is not parsed by
    /// a shell, but the agent's own flag parser would take `-x` for a flag.
    fn validate(&self) -> crate::Result<()> {
        check_arg("to", &self.to)?;
        if let Some(url) = &self.url {
            check_arg("url", url)?;
        }
        if let Some(region) = &self.region {
            check_arg("region", region)?;
        }
        if self.binary().is_empty() {
            return Err(ProviderError::Config("`binary` is empty".to_string()));
        }
        Ok(())
    }
}

fn check_arg(name: &str, value: &str) -> crate::Result<()> {
    if value.is_empty() {
        return Err(ProviderError::Config(format!("ngrok `{name}` is empty")));
    }
    if value.starts_with('-') {
        return Err(ProviderError::Config(format!(
            "ngrok `{name}` {value:?} starts with `-`, which the agent would read as a flag"
        )));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProviderError::Config(format!(
            "ngrok `{name}` {value:?} contains whitespace or control characters"
        )));
    }
    Ok(())
}

/// Why the private agent config could not be prepared. Never carries the token.
#[derive(Debug, thiserror::Error)]
enum ConfigFileError {
    #[error("cannot read authtoken_file {path}: {source}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("authtoken_file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("authtoken_file {path} must hold the token on one line, without control characters")]
    MalformedToken { path: PathBuf },
    #[error("cannot create the ngrok config directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the ngrok config file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the ngrok config directory {path} {why}: it must be a directory of this user's with \
         mode 0700 (it receives a copy of the authtoken)"
    )]
    UnsafeDir { path: PathBuf, why: String },
    #[error("cannot pick a free loopback port for the agent's web_addr: {0}")]
    WebAddr(#[source] io::Error),
}

impl From<ConfigFileError> for ProviderError {
    fn from(err: ConfigFileError) -> Self {
        match err {
            // The operator has to fix these; retrying will not help.
            ConfigFileError::ReadToken { .. }
            | ConfigFileError::EmptyToken { .. }
            | ConfigFileError::MalformedToken { .. }
            | ConfigFileError::UnsafeDir { .. } => ProviderError::Config(err.to_string()),
            // Disk full, a directory that appears later, a port race: worth a retry.
            _ => ProviderError::Spawn(err.to_string()),
        }
    }
}

/// The authtoken, kept only to scrub it from messages the agent might echo it in. Its `Debug`
/// prints nothing of it.
struct Secret(String);

impl Secret {
    /// `text` with every occurrence of the token replaced by `MASKED`.
    fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "MASKED")
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Reads and checks the token. Errors name the file, never its content.
fn read_authtoken(path: &Path) -> Result<Secret, ConfigFileError> {
    let raw = fs::read_to_string(path).map_err(|source| ConfigFileError::ReadToken {
        path: path.to_path_buf(),
        source,
    })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(ConfigFileError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    // A newline inside would let the file's content add YAML keys to the agent config.
    if token.chars().any(char::is_control) {
        return Err(ConfigFileError::MalformedToken {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret(token.to_string()))
}

/// The agent config, in the v3 layout: `version: 3`, then `agent.authtoken` and
/// `agent.web_addr`.
fn config_yaml(token: &Secret, web_addr: SocketAddr) -> String {
    // Double-quoted YAML: the only characters that need escaping there are `\` and `"`
    // (control characters were refused when the token was read).
    let quoted = token.0.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "# Written by tunnelkeeper for one ngrok agent; removed when the tunnel stops.\n\
         version: 3\n\
         agent:\n  \
           authtoken: \"{quoted}\"\n  \
           web_addr: {web_addr}\n"
    )
}

/// A free port on 127.0.0.1 for the agent's local API. The port is released before the agent
/// binds it; losing that race makes the agent fail its start, and the daemon retries.
fn free_loopback_addr() -> Result<SocketAddr, ConfigFileError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ConfigFileError::WebAddr)?;
    listener.local_addr().map_err(ConfigFileError::WebAddr)
}

/// Refuses a config directory another user could read or swap files in (a pre-made one in a
/// shared place, a symlink): the token copy goes there.
fn check_private_dir(dir: &Path) -> Result<(), ConfigFileError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |why: String| ConfigFileError::UnsafeDir {
        path: dir.to_path_buf(),
        why,
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| ConfigFileError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(unsafe_dir(
            "is not a directory (or is a symlink)".to_string(),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!("has mode {:o}", meta.mode() & 0o7777)));
    }
    Ok(())
}

/// Distinguishes config files of tunnels started by one daemon process.
static CONFIG_SEQ: AtomicU64 = AtomicU64::new(0);

/// The config files this process has written and not yet removed: everything else with our
/// prefix in the directory is a leftover of a run that crashed.
static LIVE_CONFIGS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The file-name-safe form of a tunnel tag.
fn file_stem(tag: &str) -> String {
    tag.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Removes config files of `stem` left in `dir` by an earlier daemon that crashed (a copy of
/// the token each): every file with our prefix and this tunnel's stem that no live tunnel of
/// this process owns. Returns how many were removed.
fn remove_leftovers(dir: &Path, stem: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let ours = format!("{CONFIG_PREFIX}{stem}-");
    let live = LIVE_CONFIGS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // `<stem>-<pid>-<seq>.yml`: the part after our stem must be digits, so that a tunnel
        // whose name extends this one's (`a` and `a-b`) is not taken for it.
        let Some(rest) = name.strip_prefix(&ours) else {
            continue;
        };
        let shape_ok = rest.strip_suffix(".yml").is_some_and(|ids| {
            ids.split('-').count() == 2
                && ids
                    .split('-')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        });
        let path = entry.path();
        if !shape_ok || live.contains(&path) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                removed += 1;
                tracing::warn!(path = %path.display(), "removed an ngrok config file (a token copy) left by an earlier run");
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot remove a leftover ngrok config file")
            }
        }
    }
    removed
}

/// The private agent config file. Removed when dropped, so no path (failed start, stop, a
/// dropped tunnel) leaves the token behind.
#[derive(Debug)]
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    /// Creates a new file in `dir` holding `contents`, readable and writable by the owner only
    /// from the moment it exists.
    fn create(dir: &Path, tag: &str, contents: &str) -> Result<ConfigFile, ConfigFileError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ConfigFileError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        check_private_dir(dir)?;
        let stem = file_stem(tag);
        // A file left by a daemon that crashed with the same pid must not be reused (nor
        // followed, were it a symlink): `create_new` refuses it, and the next name is tried.
        let mut attempts = 0;
        let (path, mut file) = loop {
            let seq = CONFIG_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(
                "{CONFIG_PREFIX}{stem}-{}-{seq}.yml",
                std::process::id()
            ));
            let opened = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match opened {
                Ok(file) => break (path, file),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                    attempts += 1;
                }
                Err(source) => return Err(ConfigFileError::Write { path, source }),
            }
        };
        LIVE_CONFIGS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(path.clone());
        let guard = ConfigFile { path };
        let written = file
            // The umask can only have removed bits; make it exactly owner read/write.
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(contents.as_bytes()))
            .and_then(|()| file.flush());
        match written {
            Ok(()) => Ok(guard),
            // Dropping the guard removes the partial file.
            Err(source) => Err(ConfigFileError::Write {
                path: guard.path.clone(),
                source,
            }),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        LIVE_CONFIGS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| p != &self.path);
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "cannot remove the ngrok config file")
            }
        }
    }
}

/// The exact command line: `ngrok <proto> <to> --config <file> --log stdout --log-format json`,
/// `--inspect=false` for http (no captured requests for local users to read through the API),
/// then `--url` and `--region` when set.
fn command_line(spec: &NgrokSpec, config: &Path) -> Vec<String> {
    let mut argv = vec![
        spec.binary().to_string(),
        spec.proto.as_str().to_string(),
        spec.to.clone(),
        "--config".to_string(),
        config.display().to_string(),
        "--log".to_string(),
        "stdout".to_string(),
        "--log-format".to_string(),
        "json".to_string(),
    ];
    if spec.proto == NgrokProto::Http {
        argv.push("--inspect=false".to_string());
    }
    if let Some(url) = &spec.url {
        argv.push("--url".to_string());
        argv.push(url.clone());
    }
    if let Some(region) = &spec.region {
        argv.push("--region".to_string());
        argv.push(region.clone());
    }
    argv
}

/// What the agent's log has said so far.
#[derive(Debug, Clone, Default)]
struct LogState {
    /// The `url` of the first `started tunnel` line.
    url: Option<String>,
    /// The `err` (or, lacking one, the `msg`) of the latest `eror`/`crit` line.
    error: Option<String>,
    /// How many `eror`/`crit` lines there were: a new one restarts the reconnect watch.
    errors: u64,
}

/// One log line's meaning to the provider.
#[derive(Debug, PartialEq, Eq)]
enum LogEvent {
    /// `started tunnel` with its public URL.
    Started(String),
    /// `lvl` `eror` or `crit`: the reason.
    Failure(String),
}

/// Reads one line of `--log-format json` output. Lines that are not JSON objects (the
/// `ERROR:` lines the CLI prints on stderr) mean nothing here.
fn parse_log_line(line: &str) -> Option<LogEvent> {
    let value: Value = serde_json::from_str(line.trim()).ok()?;
    let record = value.as_object()?;
    let text = |key: &str| record.get(key).and_then(Value::as_str);
    match text("lvl") {
        Some("eror" | "crit") => {
            let reason = text("err")
                .or_else(|| text("msg"))
                .unwrap_or("an error without `err`");
            Some(LogEvent::Failure(reason.to_string()))
        }
        _ if text("msg") == Some("started tunnel") => text("url")
            .filter(|url| !url.is_empty())
            .map(|url| LogEvent::Started(url.to_string())),
        _ => None,
    }
}

/// Follows the agent's output for the tunnel's whole life, publishing what it learns. Ends
/// when the agent closes its output (it exited), which drops the sender.
async fn follow_log(mut lines: Lines, state: watch::Sender<LogState>) {
    while let Some(line) = lines.next().await {
        match parse_log_line(&line.text) {
            Some(LogEvent::Started(url)) => {
                state.send_if_modified(|s| set_once(&mut s.url, url));
            }
            Some(LogEvent::Failure(reason)) => {
                // Not a verdict: the agent reconnects by itself after most errors.
                state.send_modify(|s| {
                    s.error = Some(reason);
                    s.errors += 1;
                });
            }
            None => {}
        }
    }
}

/// Sets `slot` unless it already holds a value; returns whether it changed.
fn set_once(slot: &mut Option<String>, value: String) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(value);
    true
}

/// The public URL listed by `GET /api/tunnels`, if any: the command-line tunnel's (the only
/// one in a config of our own), preferring HTTPS for an `http` endpoint.
fn public_url_from_tunnels(body: &Value) -> Option<String> {
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
fn health_from_status(body: &Value) -> Result<Health, String> {
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
            Err(err) => shown.push(format!("{region} ({err})")),
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

/// A Go duration string that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("latency {0:?} is not a duration")]
struct BadDuration(String);

/// Parses a Go `time.Duration` string as the agent prints it (`87ms`, `1.5s`, `250µs`,
/// `1m2.5s`, `0s`).
fn parse_go_duration(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_string());
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        total += number * nanos_per_unit;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Where `dial()` connects for a public URL: its host and port, the port defaulting to 443 for
/// an `http` endpoint (ngrok's edge serves HTTPS). A URL that names a port keeps it.
fn dial_target(proto: NgrokProto, url: &str) -> crate::Result<String> {
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
        spec.validate()?;
        let tag = format!("{}/{}", ctx.service, ctx.tunnel);
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
        let web_addr = free_loopback_addr()?;
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

fn quote(line: Option<&str>) -> String {
    match line {
        Some(line) => format!("{line:?}"),
        None => "(none)".to_string(),
    }
}

/// The agent's own view of its session: `Ok` when `/api/status` says `online`.
async fn agent_online(web_addr: SocketAddr) -> crate::Result<Health> {
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

/// A running agent with its public URL.
struct NgrokTunnel {
    child: Supervised,
    /// The public URL, as the agent reported it.
    url: String,
    /// `host:port` that `dial()` connects to.
    target: String,
    /// The agent's local API.
    web_addr: SocketAddr,
    resolver: Resolver,
    stop_grace: Duration,
    log: watch::Receiver<LogState>,
    /// Set by the reconnect watch when the agent stayed offline past `reconnect_grace`.
    dead: watch::Receiver<Option<String>>,
    /// The reconnect watch, ended on stop.
    watch: tokio::task::JoinHandle<()>,
    /// When `/api/status` last said `online` (dials within [`ONLINE_CACHE`] of it skip asking).
    online_at: Mutex<Option<Instant>>,
    /// Taken (and so removed) on stop; also removed if the tunnel is dropped unstopped.
    config: Mutex<Option<ConfigFile>>,
    /// Only for scrubbing reasons.
    token: Secret,
}

impl NgrokTunnel {
    /// Why the tunnel is unusable, if it is: the agent's exit, or a session that did not come
    /// back in time.
    fn closed_now(&self) -> Option<String> {
        if let Some(info) = self.child.try_exited() {
            return Some(self.exit_reason(&info));
        }
        self.dead
            .borrow()
            .clone()
            .map(|why| self.token.redact(&why))
    }

    fn exit_reason(&self, info: &process::ExitInfo) -> String {
        let mut reason = match self.child.last_line() {
            Some(line) => format!("ngrok {info}; last output line: {line:?}"),
            None => format!("ngrok {info}"),
        };
        if let Some(err) = self.log.borrow().error.clone() {
            reason.push_str(&format!("; its last error: {err}"));
        }
        self.token.redact(&reason)
    }

    /// The agent's `/api/status`, its last error line added to a failure.
    async fn online(&self) -> crate::Result<Health> {
        let answer = agent_online(self.web_addr).await;
        match answer {
            Ok(health) => {
                *self
                    .online_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                Ok(health)
            }
            Err(ProviderError::Unhealthy(why)) => {
                let err = self.log.borrow().error.clone();
                Err(ProviderError::Unhealthy(match err {
                    Some(err) => self.token.redact(&format!("{why}; last error: {err}")),
                    None => why,
                }))
            }
            Err(other) => Err(other),
        }
    }
}

#[async_trait]
impl Tunnel for NgrokTunnel {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.url.clone(),
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    /// Connects to the public address, but only while the agent says its session is
    /// `online`: ngrok's edge accepts for an offline endpoint too (ERR_NGROK_3200).
    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(reason) = self.closed_now() {
            return Err(ProviderError::Closed(reason));
        }
        let fresh = self
            .online_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < ONLINE_CACHE);
        if !fresh {
            match self.online().await {
                // The agent says its session is down: the edge would only serve its error page.
                Err(ProviderError::Unhealthy(why)) if !why.contains(API_UNREACHABLE) => {
                    return Err(ProviderError::Unhealthy(why))
                }
                // Healthy, or no answer from the API at all: then the connect judges alone.
                _ => {}
            }
        }
        // Looked up afresh each time: the edge's addresses move.
        self.resolver.dial(&self.target, timeout).await
    }

    async fn check(&self) -> crate::Result<Health> {
        if let Some(reason) = self.closed_now() {
            return Err(ProviderError::Closed(reason));
        }
        self.online().await
    }

    async fn closed(&self) -> String {
        let mut dead = self.dead.clone();
        tokio::select! {
            info = self.child.exited() => self.exit_reason(&info),
            why = async {
                let seen = dead
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|why| why.clone());
                match seen {
                    Some(why) => why,
                    // The watch ended without a verdict: only the exit can answer.
                    None => std::future::pending().await,
                }
            } => self.token.redact(&why),
        }
    }

    async fn stop(&self) {
        self.watch.abort();
        self.child.terminate(self.stop_grace).await;
        let config = self
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(config);
    }
}

impl Drop for NgrokTunnel {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TUNNELS_TCP: &str = include_str!("../tests/fixtures/ngrok/api-tunnels-tcp.json");
    const TUNNELS_HTTP: &str = include_str!("../tests/fixtures/ngrok/api-tunnels-http.json");
    const TUNNELS_EMPTY: &str = include_str!("../tests/fixtures/ngrok/api-tunnels-empty.json");
    const STATUS: &str = include_str!("../tests/fixtures/ngrok/api-status.json");
    const LOG: &str = include_str!("../tests/fixtures/ngrok/log-json.ndjson");
    const LOG_ERROR: &str = include_str!("../tests/fixtures/ngrok/log-json-error.ndjson");

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
    fn log_fixtures_give_the_url_and_the_error() {
        let events: Vec<LogEvent> = LOG.lines().filter_map(parse_log_line).collect();
        assert_eq!(
            events,
            [LogEvent::Started("tcp://0.tcp.ngrok.io:53476".to_string())]
        );
        let events: Vec<LogEvent> = LOG_ERROR.lines().filter_map(parse_log_line).collect();
        assert_eq!(
            events,
            [LogEvent::Failure(
                "authentication failed: The authtoken you specified does not look like a proper ngrok tunnel authtoken."
                    .to_string()
            )]
        );
        assert_eq!(
            parse_log_line(r#"{"lvl":"crit","msg":"panic"}"#),
            Some(LogEvent::Failure("panic".to_string()))
        );
        assert_eq!(parse_log_line("ERROR:  authentication failed"), None);
        assert_eq!(parse_log_line(r#"{"lvl":"warn","err":"x"}"#), None);
    }

    #[test]
    fn go_durations() {
        let ok = |s: &str| parse_go_duration(s).ok();
        assert_eq!(ok("87ms"), Some(Duration::from_millis(87)));
        assert_eq!(ok("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(ok("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(ok("1m2.5s"), Some(Duration::from_millis(62_500)));
        assert_eq!(ok("0s"), Some(Duration::ZERO));
        assert_eq!(ok("0"), Some(Duration::ZERO));
        assert_eq!(ok(""), None);
        assert_eq!(ok("87"), None);
        assert_eq!(ok("ms"), None);
        assert_eq!(ok("87 ms"), None);
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

    #[test]
    fn config_layout_is_version_3_with_agent_keys() {
        let addr: SocketAddr = "127.0.0.1:4040".parse().expect("addr");
        assert_eq!(
            config_yaml(&Secret("abc_123".to_string()), addr),
            "# Written by tunnelkeeper for one ngrok agent; removed when the tunnel stops.\n\
             version: 3\nagent:\n  authtoken: \"abc_123\"\n  web_addr: 127.0.0.1:4040\n"
        );
        assert!(
            config_yaml(&Secret(r#"a"b\c"#.to_string()), addr).contains(r#"authtoken: "a\"b\\c""#)
        );
    }

    #[test]
    fn secrets_are_masked() {
        let secret = Secret("s3cr3t".to_string());
        assert_eq!(format!("{secret:?}"), "MASKED");
        assert_eq!(
            secret.redact("Your authtoken: s3cr3t."),
            "Your authtoken: MASKED."
        );
    }
}
