//! The `command` provider: any program that keeps a path open while it runs (`bore`, `socat`,
//! `autossh`, a home-grown script).
//!
//! The program is run directly (no shell) under [`crate::process`] supervision. Its endpoint is
//! either fixed in the settings, or read from its output with a regex (tools such as `bore`
//! print the address they were given). The tunnel lives exactly as long as the process: its
//! exit is the hard signal that resolves [`Tunnel::closed`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use regex_lite::Regex;
use tokio::time::Instant;

use crate::process::{self, ExitInfo, Lines, SpawnSpec, Supervised};
use crate::util::quote;
use crate::{Dial, Endpoint, Health, Provider, ProviderError, Resolver, StartContext, Tunnel};

/// How long start waits for the endpoint unless configured otherwise.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stop waits after `SIGTERM` before `SIGKILL`, unless configured otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long one readiness dial to a fixed endpoint may take during start.
const READY_DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between readiness dials to a fixed endpoint.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long to keep reading output after the child exited during start, so the error can
/// quote its last words.
const EXIT_DRAIN: Duration = Duration::from_millis(200);

/// Where a `command` tunnel's endpoint comes from.
#[derive(Debug, Clone)]
pub enum EndpointSource {
    /// Known in advance (`endpoint: host:port`). Start waits until it accepts a connection.
    Fixed(String),
    /// The first capture group (or the whole match, if the regex has no group) of the first
    /// output line, on stdout or stderr, that matches.
    Regex(Regex),
}

/// Settings of a `command` tunnel.
#[derive(Clone)]
pub struct CommandSpec {
    /// The program and its arguments (no shell).
    pub run: Vec<String>,
    /// Where the endpoint comes from.
    pub endpoint: EndpointSource,
    /// Extra environment variables (never argv; not secret: they come from the config file).
    pub env: Vec<(String, String)>,
    /// A file of `KEY=value` lines ([`parse_env_file`]) read at every start and added to the
    /// environment, winning over `env`: the place for the program's secrets.
    pub env_file: Option<PathBuf>,
    /// How long start waits for the endpoint ([`DEFAULT_START_TIMEOUT`] by default).
    pub start_timeout: Duration,
    /// How long stop waits after `SIGTERM` before `SIGKILL` ([`DEFAULT_STOP_GRACE`] by default).
    pub stop_grace: Duration,
}

impl CommandSpec {
    /// Settings with no extra environment and the default timeouts.
    pub fn new(run: Vec<String>, endpoint: EndpointSource) -> Self {
        CommandSpec {
            run,
            endpoint,
            env: Vec::new(),
            env_file: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, _)| format!("{k}=MASKED"))
            .collect();
        f.debug_struct("CommandSpec")
            .field("run", &self.run)
            .field("endpoint", &self.endpoint)
            .field("env", &env)
            .field("env_file", &self.env_file)
            .field("start_timeout", &self.start_timeout)
            .field("stop_grace", &self.stop_grace)
            .finish()
    }
}

/// Brings up `command` tunnels.
#[derive(Debug)]
pub struct CommandProvider {
    spec: CommandSpec,
}

impl CommandProvider {
    /// A provider for the given settings.
    pub fn new(spec: CommandSpec) -> Self {
        CommandProvider { spec }
    }

    /// `env`, then what `env_file` holds now (a file entry replaces an `env` one, as systemd's
    /// `EnvironmentFile=` wins over `Environment=`). Errors name the file and line, never a value.
    fn environment(&self) -> crate::Result<Vec<(String, String)>> {
        let mut env = self.spec.env.clone();
        let Some(file) = &self.spec.env_file else {
            return Ok(env);
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| ProviderError::Config(format!("env_file {}: {e}", file.display())))?;
        let pairs = parse_env_file(&text)
            .map_err(|e| ProviderError::Config(format!("env_file {}: {e}", file.display())))?;
        for (name, value) in pairs {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        }
        Ok(env)
    }
}

/// Parses an environment file the way systemd's `EnvironmentFile=` does for the common cases:
/// one `KEY=value` per line, blank lines and lines starting with `#` or `;` ignored, whitespace
/// around key and value trimmed, one pair of enclosing `"` or `'` quotes removed. Errors give
/// the 1-based line and never quote a value (values are secrets).
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let at = index + 1;
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {at}: expected KEY=value"));
        };
        let key = key.trim();
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "line {at}: `{key}` is not a valid variable name (letters, digits and `_`, not \
                 starting with a digit)"
            ));
        }
        let value = value.trim();
        let value = [b'"', b'\'']
            .iter()
            .find_map(|&q| {
                let q = q as char;
                (value.len() >= 2 && value.starts_with(q) && value.ends_with(q))
                    .then(|| &value[1..value.len() - 1])
            })
            .unwrap_or(value);
        if value.contains('\0') {
            return Err(format!(
                "line {at}: the value of `{key}` contains a NUL byte"
            ));
        }
        env.push((key.to_owned(), value.to_owned()));
    }
    Ok(env)
}

/// Environment values long enough to be secrets (`env` is where a command's tokens go): masked
/// in the program's output. Short values (`1`, `yes`) would only mangle the logs.
fn secret_values(env: &[(String, String)]) -> Vec<String> {
    env.iter()
        .map(|(_, value)| value.clone())
        .filter(|value| value.len() >= 8)
        .collect()
}

#[async_trait]
impl Provider for CommandProvider {
    /// Runs the program and waits (at most `start_timeout`) for its endpoint: the regex to
    /// match, or the fixed endpoint to accept a connection. Fails if the program exits first.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        let env = self.environment()?;
        let child = process::spawn(SpawnSpec {
            argv: self.spec.run.clone(),
            redact: secret_values(&env),
            env,
            cwd: None,
            tag: ctx.tag(),
        })
        .await?;
        let deadline = Instant::now() + self.spec.start_timeout;
        let endpoint = match &self.spec.endpoint {
            EndpointSource::Fixed(endpoint) => {
                wait_until_dialable(
                    &child,
                    endpoint,
                    &ctx.resolver,
                    deadline,
                    self.spec.start_timeout,
                )
                .await?;
                endpoint.clone()
            }
            EndpointSource::Regex(regex) => {
                wait_for_match(&child, regex, deadline, self.spec.start_timeout).await?
            }
        };
        // On an error above, dropping `child` kills its group: a failed start leaves nothing.
        Ok(Arc::new(CommandTunnel {
            child,
            endpoint,
            resolver: ctx.resolver.clone(),
            stop_grace: self.spec.stop_grace,
        }))
    }
}

/// Scans the child's output for the endpoint.
async fn wait_for_match(
    child: &Supervised,
    regex: &Regex,
    deadline: Instant,
    start_timeout: Duration,
) -> crate::Result<String> {
    let mut lines = child.lines();
    let mut last: Option<String> = None;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            line = lines.next(), if open => match line {
                Some(line) => {
                    if let Some(endpoint) = capture(regex, &line.text) {
                        return Ok(endpoint);
                    }
                    last = Some(line.text);
                }
                None => open = false,
            },
            info = child.exited() => {
                // The child may have printed its endpoint just before exiting; read what is left.
                let _ = tokio::time::timeout(EXIT_DRAIN, async {
                    while let Some(line) = lines.next().await {
                        last = Some(line.text);
                    }
                })
                .await;
                return Err(exited_during_start(&info, last.as_deref()));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ProviderError::StartTimeout {
                    after: start_timeout,
                    detail: format!(
                        "endpoint_regex `{}` never matched the output; last line: {}",
                        regex.as_str(),
                        quote(last.as_deref()),
                    ),
                });
            }
        }
    }
}

/// The endpoint a matching line names: the first capture group, or the whole match.
fn capture(regex: &Regex, line: &str) -> Option<String> {
    let caps = regex.captures(line)?;
    let found = caps.get(1).or_else(|| caps.get(0))?;
    Some(found.as_str().to_string())
}

/// Dials a fixed endpoint until it accepts a connection, the child exits, or time runs out.
async fn wait_until_dialable(
    child: &Supervised,
    endpoint: &str,
    resolver: &Resolver,
    deadline: Instant,
    start_timeout: Duration,
) -> crate::Result<()> {
    let lines = child.lines();
    let attempt = async {
        let mut last_error;
        loop {
            let budget = READY_DIAL_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match resolver.dial(endpoint, budget).await {
                Ok(_ready) => return Ok(()),
                // A malformed endpoint will not heal by waiting.
                Err(err @ ProviderError::Config(_)) => return Err(err),
                Err(err) => last_error = err.to_string(),
            }
            if Instant::now() + READY_POLL >= deadline {
                return Err(ProviderError::StartTimeout {
                    after: start_timeout,
                    detail: format!(
                        "endpoint {endpoint} never accepted a connection (last error: {last_error}); last output line: {}",
                        quote(child.last_line().as_deref()),
                    ),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    };
    tokio::select! {
        biased;
        info = child.exited() => {
            drain(lines).await;
            Err(exited_during_start(&info, child.last_line().as_deref()))
        }
        result = attempt => result,
    }
}

/// Lets the output readers catch up with a child that just exited.
async fn drain(mut lines: Lines) {
    let _ = tokio::time::timeout(EXIT_DRAIN, async { while lines.next().await.is_some() {} }).await;
}

fn exited_during_start(info: &ExitInfo, last: Option<&str>) -> ProviderError {
    ProviderError::Spawn(format!(
        "{info} during start; last output line: {}",
        quote(last)
    ))
}

/// A running `command` tunnel: the supervised child and the endpoint it serves.
struct CommandTunnel {
    child: Supervised,
    endpoint: String,
    resolver: Resolver,
    stop_grace: Duration,
}

impl CommandTunnel {
    /// Why the tunnel is gone: how the child ended, and its last words.
    fn describe(&self, info: &ExitInfo) -> String {
        match self.child.last_line() {
            Some(line) => format!("{info}; last output line: {line:?}"),
            None => info.to_string(),
        }
    }
}

#[async_trait]
impl Tunnel for CommandTunnel {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.endpoint.clone(),
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(info) = self.child.try_exited() {
            return Err(ProviderError::Closed(self.describe(&info)));
        }
        // The resolver strips a URL scheme, and names are looked up afresh: relays move.
        self.resolver.dial(&self.endpoint, timeout).await
    }

    async fn check(&self) -> crate::Result<Health> {
        match self.child.try_exited() {
            Some(info) => Err(ProviderError::Closed(self.describe(&info))),
            None => Ok(Health::default()),
        }
    }

    async fn closed(&self) -> String {
        let info = self.child.exited().await;
        self.describe(&info)
    }

    async fn stop(&self) {
        self.child.terminate(self.stop_grace).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_read_like_systemd() {
        let text =
            "# comment\n; also\n\nTOKEN=abc=def\n  NAME = 'quoted value' \nB=\"x\"\nEMPTY=\n";
        assert_eq!(
            parse_env_file(text).unwrap(),
            [
                ("TOKEN".to_owned(), "abc=def".to_owned()),
                ("NAME".to_owned(), "quoted value".to_owned()),
                ("B".to_owned(), "x".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        let err = parse_env_file("A=1\nsecret-without-key\n").unwrap_err();
        assert_eq!(err, "line 2: expected KEY=value");
        assert!(!err.contains("secret"));
        assert!(parse_env_file("1A=x\n")
            .unwrap_err()
            .starts_with("line 1: `1A`"));
    }
}
