//! An `ngrok` tunnel's settings, correct by construction: the kind of endpoint as an enum,
//! built once from the keys as written by [`NgrokSettings::parse`], where every rule about them
//! lives.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::spec::{self, Problems, SpecError};

use super::{DEFAULT_BINARY, DEFAULT_RECONNECT_GRACE, DEFAULT_START_TIMEOUT, DEFAULT_STOP_GRACE};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// The command that prints the agent's version (its first argument is the program).
    pub fn version_argv(&self) -> Vec<String> {
        vec![self.binary().to_owned(), "version".to_owned()]
    }

    /// The program to run.
    pub(super) fn binary(&self) -> &str {
        self.binary.as_deref().unwrap_or(DEFAULT_BINARY)
    }
}

/// The keys of an `ngrok` tunnel as written (the token path already expanded), before any rule
/// is applied, and where the daemon keeps the agent's config files.
#[derive(Debug, Clone, Default)]
pub struct NgrokSettings {
    /// `proto`: `tcp` (the default) or `http`.
    pub proto: Option<String>,
    /// `binary`
    pub binary: Option<String>,
    /// `to`
    pub to: Option<String>,
    /// `authtoken_file`
    pub authtoken_file: Option<PathBuf>,
    /// `url`
    pub url: Option<String>,
    /// `region`
    pub region: Option<String>,
    /// `start_timeout`
    pub start_timeout: Option<Duration>,
    /// `reconnect_grace`
    pub reconnect_grace: Option<Duration>,
    /// `stop_grace`
    pub stop_grace: Option<Duration>,
    /// See [`NgrokSpec::config_dir`].
    pub config_dir: PathBuf,
    /// See [`NgrokSpec::old_config_dirs`].
    pub old_config_dirs: Vec<PathBuf>,
}

impl NgrokSettings {
    /// Builds the spec, or says what is wrong: one message per broken rule, each at its key.
    pub fn parse(self) -> Result<NgrokSpec, Vec<SpecError>> {
        let mut problems = Problems::default();
        let proto = match self.proto.as_deref().unwrap_or("tcp") {
            "tcp" => NgrokProto::Tcp,
            "http" => NgrokProto::Http,
            other => {
                problems.add(
                    "proto",
                    format!("unknown ngrok proto `{other}`: use `tcp` or `http`"),
                );
                return problems.finish(None);
            }
        };
        let Some(to) = self.to else {
            problems.add("to", "ngrok needs `to`: the local host:port to expose");
            return problems.finish(None);
        };
        let binary = spec::binary(&mut problems, self.binary);
        let to = problems.take("to", agent_arg(&to).map(|()| to.clone()));
        if let Some(url) = &self.url {
            problems.take("url", agent_arg(url));
        }
        if let Some(region) = &self.region {
            problems.take("region", agent_arg(region));
        }
        if self.authtoken_file.is_none() {
            problems.add(
                "authtoken_file",
                "ngrok needs `authtoken_file`: the file holding the agent's authtoken",
            );
        }
        let spec = match (to, self.authtoken_file) {
            (Some(to), Some(authtoken_file)) => Some(NgrokSpec {
                binary,
                proto,
                to,
                authtoken_file,
                url: self.url,
                region: self.region,
                config_dir: self.config_dir,
                reconnect_grace: self.reconnect_grace.unwrap_or(DEFAULT_RECONNECT_GRACE),
                old_config_dirs: self.old_config_dirs,
                start_timeout: self.start_timeout.unwrap_or(DEFAULT_START_TIMEOUT),
                stop_grace: self.stop_grace.unwrap_or(DEFAULT_STOP_GRACE),
            }),
            _ => None,
        };
        problems.finish(spec)
    }
}

/// A value for the agent's command line: argv is not parsed by a shell, but the agent's own
/// flag parser would take `-x` for a flag, and a space would make two values of one.
fn agent_arg(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".to_string());
    }
    if value.starts_with('-') {
        return Err(format!(
            "{value:?} starts with `-`, which the agent would read as a flag"
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{value:?} contains whitespace or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(to: &str) -> NgrokSettings {
        NgrokSettings {
            to: Some(to.to_string()),
            authtoken_file: Some("/t".into()),
            config_dir: "/run/tk/ngrok".into(),
            ..NgrokSettings::default()
        }
    }

    fn keys(settings: NgrokSettings) -> Vec<&'static str> {
        match settings.parse() {
            Ok(spec) => panic!("expected errors, built {spec:?}"),
            Err(errors) => errors.into_iter().map(|e| e.key).collect(),
        }
    }

    #[test]
    fn builds_with_defaults() {
        let spec = settings("127.0.0.1:22").parse().expect("spec");
        assert_eq!(
            spec,
            NgrokSpec::new(NgrokProto::Tcp, "127.0.0.1:22", "/t", "/run/tk/ngrok")
        );
        let http = NgrokSettings {
            proto: Some("http".to_string()),
            ..settings("8080")
        };
        assert_eq!(http.parse().expect("http").proto, NgrokProto::Http);
    }

    #[test]
    fn a_spec_that_cannot_be_built_names_each_broken_key_once() {
        for to in ["--authtoken=x", "127.0.0.1:22 --inspect", ""] {
            assert_eq!(keys(settings(to)), ["to"], "{to:?}");
        }
        let url = NgrokSettings {
            url: Some("-x".to_string()),
            region: Some("e u".to_string()),
            ..settings("127.0.0.1:22")
        };
        assert_eq!(keys(url), ["url", "region"]);
        let proto = NgrokSettings {
            proto: Some("udp".to_string()),
            ..settings("127.0.0.1:22")
        };
        assert_eq!(keys(proto), ["proto"]);
        let missing = NgrokSettings {
            authtoken_file: None,
            binary: Some(String::new()),
            ..settings("127.0.0.1:22")
        };
        assert_eq!(keys(missing), ["binary", "authtoken_file"]);
        let no_to = NgrokSettings {
            to: None,
            ..settings("x")
        };
        assert_eq!(keys(no_to), ["to"]);
    }
}
