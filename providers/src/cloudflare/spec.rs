//! A `cloudflare` tunnel's settings, correct by construction: one shape per mode, built once
//! from the keys as written by [`CloudflareSettings::parse`], where every rule about them lives.

use std::path::PathBuf;
use std::time::Duration;

use crate::spec::{self, Hostname, Problems, SpecError};

use super::{DEFAULT_PORT, DEFAULT_READY_TIMEOUT, DEFAULT_STOP_GRACE};

/// What a `cloudflare` tunnel runs, with exactly what that shape needs. Holds no secret: the
/// tokens stay in their files, so `Debug` shows paths and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudflareMode {
    /// A named tunnel exposing a local service: `cloudflared tunnel run --token-file
    /// <token_file>`; the ingress is configured in the Cloudflare dashboard.
    Named {
        /// The file holding the tunnel token (only cloudflared reads it).
        token_file: PathBuf,
        /// The public hostname routed to the tunnel: the endpoint, and where dials go.
        hostname: Hostname,
    },
    /// A quick tunnel to a local service: `cloudflared tunnel --url <url>`; the random
    /// `*.trycloudflare.com` hostname comes from cloudflared.
    Quick {
        /// The local service URL, e.g. `http://127.0.0.1:8080` (one word).
        url: String,
    },
    /// A TCP service behind Cloudflare Access, reached through a local
    /// `cloudflared access tcp` listener.
    Access {
        /// The Access application's hostname.
        hostname: Hostname,
        /// The files holding an Access service token's client ID and secret, handed to
        /// cloudflared as `TUNNEL_SERVICE_TOKEN_ID` / `TUNNEL_SERVICE_TOKEN_SECRET`.
        service_token: Option<(PathBuf, PathBuf)>,
    },
}

/// Settings of a `cloudflare` tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudflareSpec {
    /// Named tunnel, quick tunnel or Access, with what each needs.
    pub mode: CloudflareMode,
    /// The cloudflared program; [`super::DEFAULT_BINARY`] looked up in `PATH` when `None`.
    pub binary: Option<String>,
    /// The port the end-to-end dial uses on the hostname of a named or quick tunnel
    /// ([`DEFAULT_PORT`]).
    pub port: u16,
    /// How long start waits for cloudflared to become ready ([`DEFAULT_READY_TIMEOUT`]).
    pub ready_timeout: Duration,
    /// How long stop waits after `SIGTERM` before `SIGKILL` ([`DEFAULT_STOP_GRACE`]).
    pub stop_grace: Duration,
}

impl CloudflareSpec {
    /// The command that prints cloudflared's version (its first argument is the program).
    pub fn version_argv(&self) -> Vec<String> {
        let binary = self.binary.as_deref().unwrap_or(super::DEFAULT_BINARY);
        vec![binary.to_owned(), "--version".to_owned()]
    }

    /// Settings for `mode` with every option at its default.
    pub fn new(mode: CloudflareMode) -> Self {
        CloudflareSpec {
            mode,
            binary: None,
            port: DEFAULT_PORT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    /// The Access service token's two files, if this is an Access tunnel with one.
    pub fn service_token(&self) -> Option<&(PathBuf, PathBuf)> {
        match &self.mode {
            CloudflareMode::Access { service_token, .. } => service_token.as_ref(),
            CloudflareMode::Named { .. } | CloudflareMode::Quick { .. } => None,
        }
    }
}

/// The keys of a `cloudflare` tunnel as written (secret paths already expanded), before any
/// rule is applied. Every field is optional: [`CloudflareSettings::parse`] says what is missing.
#[derive(Debug, Clone, Default)]
pub struct CloudflareSettings {
    /// `mode`: `tunnel` (the default) or `access`.
    pub mode: Option<String>,
    /// `binary`
    pub binary: Option<String>,
    /// `token_file`: makes a tunnel a named one.
    pub token_file: Option<PathBuf>,
    /// `hostname`
    pub hostname: Option<String>,
    /// `url`: makes a tunnel a quick one.
    pub url: Option<String>,
    /// `port`
    pub port: Option<u16>,
    /// `ready_timeout`
    pub ready_timeout: Option<Duration>,
    /// `stop_grace`
    pub stop_grace: Option<Duration>,
    /// `service_token_id_file`
    pub service_token_id_file: Option<PathBuf>,
    /// `service_token_secret_file`
    pub service_token_secret_file: Option<PathBuf>,
}

impl CloudflareSettings {
    /// Builds the spec, or says what is wrong: one message per broken rule, each at its key.
    pub fn parse(self) -> Result<CloudflareSpec, Vec<SpecError>> {
        let mut problems = Problems::default();
        let access = match self.mode.as_deref().unwrap_or("tunnel") {
            "tunnel" => false,
            "access" => true,
            other => {
                problems.add(
                    "mode",
                    format!("unknown cloudflare mode `{other}`: use `tunnel` or `access`"),
                );
                return problems.finish(None);
            }
        };
        let binary = spec::binary(&mut problems, self.binary);
        let hostname = match &self.hostname {
            Some(text) => problems.take(
                "hostname",
                Hostname::parse(text).map_err(|why| {
                    format!(
                        "`{text}` must be a bare host name (no scheme, port or path; the port \
                         is `port`): {why}"
                    )
                }),
            ),
            None => None,
        };
        let service_token = match (self.service_token_id_file, self.service_token_secret_file) {
            (Some(_), None) => {
                problems.add(
                    "service_token_id_file",
                    "an Access service token needs `service_token_secret_file` too",
                );
                None
            }
            (None, Some(_)) => {
                problems.add(
                    "service_token_secret_file",
                    "an Access service token needs `service_token_id_file` too",
                );
                None
            }
            (Some(_), Some(_)) if !access => {
                problems.add(
                    "service_token_id_file",
                    "an Access service token is for `mode: access`",
                );
                None
            }
            (Some(id), Some(secret)) => Some((id, secret)),
            (None, None) => None,
        };
        let named = self.token_file.is_some();
        let mode = match (access, self.token_file, self.url) {
            (true, token_file, url) => {
                if token_file.is_some() || url.is_some() {
                    problems.add(
                        if named { "token_file" } else { "url" },
                        "access mode takes only `hostname` (it logs in through Access and \
                         listens locally)",
                    );
                }
                if self.hostname.is_none() {
                    problems.add(
                        "hostname",
                        "access mode needs `hostname`: the Access application to reach",
                    );
                }
                hostname.map(|hostname| CloudflareMode::Access {
                    hostname,
                    service_token,
                })
            }
            (false, Some(token_file), url) => {
                if self.hostname.is_none() {
                    problems.add(
                        "hostname",
                        "a named tunnel (`token_file`) needs `hostname`: the public name its \
                         probe dials",
                    );
                }
                if url.is_some() {
                    problems.add(
                        "url",
                        "`url` is for a quick tunnel; a named tunnel (`token_file`) routes by \
                         its own ingress",
                    );
                }
                hostname.map(|hostname| CloudflareMode::Named {
                    token_file,
                    hostname,
                })
            }
            (false, None, Some(url)) => {
                if self.hostname.is_some() {
                    problems.add(
                        "hostname",
                        "a quick tunnel gets its hostname from Cloudflare; drop `hostname` or \
                         add `token_file`",
                    );
                }
                let url = url.trim().to_string();
                if url.is_empty() || url.contains(char::is_whitespace) {
                    problems.add("url", format!("{url:?} is not a URL"));
                }
                Some(CloudflareMode::Quick { url })
            }
            (false, None, None) => {
                problems.add(
                    "token_file",
                    "give `token_file` (a named tunnel) or `url` (a quick tunnel to that local \
                     service)",
                );
                None
            }
        };
        let port = spec::port(&mut problems, "port", self.port.unwrap_or(DEFAULT_PORT));
        let spec = mode.map(|mode| CloudflareSpec {
            mode,
            binary,
            port,
            ready_timeout: self.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
            stop_grace: self.stop_grace.unwrap_or(DEFAULT_STOP_GRACE),
        });
        problems.finish(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(settings: CloudflareSettings) -> Vec<(&'static str, String)> {
        match settings.parse() {
            Ok(spec) => panic!("expected errors, built {spec:?}"),
            Err(errors) => errors.into_iter().map(|e| (e.key, e.message)).collect(),
        }
    }

    fn keys(settings: CloudflareSettings) -> Vec<&'static str> {
        errors(settings).into_iter().map(|(key, _)| key).collect()
    }

    fn named() -> CloudflareSettings {
        CloudflareSettings {
            token_file: Some("/t".into()),
            hostname: Some("ssh.example.com".into()),
            ..CloudflareSettings::default()
        }
    }

    #[test]
    fn each_mode_builds_its_own_shape() {
        let spec = named().parse().expect("named");
        assert_eq!(
            spec.mode,
            CloudflareMode::Named {
                token_file: "/t".into(),
                hostname: Hostname::parse("ssh.example.com").expect("host"),
            }
        );
        assert_eq!(spec, CloudflareSpec::new(spec.mode.clone()));
        let quick = CloudflareSettings {
            url: Some(" http://127.0.0.1:8080 ".into()),
            port: Some(8443),
            ..CloudflareSettings::default()
        }
        .parse()
        .expect("quick");
        assert_eq!(
            quick.mode,
            CloudflareMode::Quick {
                url: "http://127.0.0.1:8080".into()
            }
        );
        assert_eq!(quick.port, 8443);
        let access = CloudflareSettings {
            mode: Some("access".into()),
            hostname: Some("ssh.example.com".into()),
            service_token_id_file: Some("/id".into()),
            service_token_secret_file: Some("/secret".into()),
            ..CloudflareSettings::default()
        }
        .parse()
        .expect("access");
        assert_eq!(
            access.service_token(),
            Some(&(PathBuf::from("/id"), PathBuf::from("/secret")))
        );
    }

    #[test]
    fn a_spec_that_cannot_be_built_names_each_broken_key_once() {
        let only = |settings| {
            let errors = errors(settings);
            assert_eq!(errors.len(), 1, "{errors:?}");
            errors.into_iter().next()
        };
        let (key, message) = only(CloudflareSettings {
            hostname: None,
            ..named()
        })
        .expect("one");
        assert_eq!(key, "hostname");
        assert!(message.starts_with("a named tunnel (`token_file`) needs `hostname`"));
        let (key, message) = only(CloudflareSettings::default()).expect("one");
        assert_eq!(key, "token_file");
        assert!(message.contains("`token_file`") && message.contains("`url`"));
        let (key, message) = only(CloudflareSettings {
            mode: Some("edge".into()),
            ..named()
        })
        .expect("one");
        assert_eq!(key, "mode");
        assert_eq!(
            message,
            "unknown cloudflare mode `edge`: use `tunnel` or `access`"
        );
        let (key, message) = only(CloudflareSettings {
            hostname: Some("https://ssh.example.com".into()),
            ..named()
        })
        .expect("one");
        assert_eq!(key, "hostname");
        assert!(message.contains("bare host name"), "{message}");

        assert_eq!(
            keys(CloudflareSettings {
                url: Some("http://127.0.0.1:1".into()),
                ..named()
            }),
            ["url"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                url: Some("http://127.0.0.1:1".into()),
                hostname: Some("x.example.com".into()),
                ..CloudflareSettings::default()
            }),
            ["hostname"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                url: Some("two words".into()),
                ..CloudflareSettings::default()
            }),
            ["url"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                mode: Some("access".into()),
                ..CloudflareSettings::default()
            }),
            ["hostname"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                mode: Some("access".into()),
                ..named()
            }),
            ["token_file"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                service_token_id_file: Some("/id".into()),
                service_token_secret_file: Some("/secret".into()),
                ..named()
            }),
            ["service_token_id_file"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                mode: Some("access".into()),
                hostname: Some("h.example.com".into()),
                service_token_secret_file: Some("/secret".into()),
                ..CloudflareSettings::default()
            }),
            ["service_token_secret_file"]
        );
        assert_eq!(
            keys(CloudflareSettings {
                binary: Some(String::new()),
                port: Some(0),
                ..named()
            }),
            ["binary", "port"]
        );
    }
}
