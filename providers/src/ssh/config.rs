//! Turns an [`SshTarget`] into the concrete server to connect to, and the pool key of it.
//!
//! When `ssh_config` is set, a `Host` alias there supplies `HostName`, `User`, `Port` and
//! `IdentityFile` (the first value wins, as in OpenSSH); explicit settings in the target win over
//! the file. Everything else in the file is ignored, so an operator's full ssh_config parses.

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use ssh2_config::{ParseRule, SshConfig};

use super::spec::{HostKeyPolicy, SshTarget};
use crate::ProviderError;

/// Sessions are shared between everything that resolves to the same key: the same server and
/// login, and the same trust. A session carries the trust it was opened with (its host key was
/// checked against one known_hosts file under one policy, its login used one method), so two
/// targets that differ in any of these never share one: a `strict` target must not ride a
/// session another target accepted on first use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    /// Login user.
    pub user: String,
    /// Host name or address actually connected to (after `HostName`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Private key file, if any.
    pub identity: Option<PathBuf>,
    /// The known_hosts file the host key was checked against.
    pub known_hosts: PathBuf,
    /// The policy it was checked under.
    pub host_key_policy: HostKeyPolicy,
    /// The other login methods: password file, ssh-agent.
    pub password_file: Option<PathBuf>,
    /// Whether the agent's keys were offered.
    pub agent: bool,
}

impl fmt::Display for PoolKey {
    /// `user@host:port` (`[v6]` bracketed), the form used in messages and stats.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// A target with every alias resolved: what a session is opened with.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// Where and as whom.
    pub key: PoolKey,
    /// The rest of the settings (timeouts, files, limits).
    pub target: SshTarget,
}

/// Applies `ssh_config` (if any) and defaults.
pub(crate) fn resolve(target: &SshTarget) -> Result<Resolved, ProviderError> {
    let mut host = target.host.clone();
    let mut port = target.port;
    let mut user = target.user.clone();
    let mut identity = target.identity_file.clone();

    if let Some(path) = &target.ssh_config {
        let file = File::open(path).map_err(|err| {
            ProviderError::Config(format!("cannot read ssh_config {}: {err}", path.display()))
        })?;
        let config = SshConfig::default()
            .parse(
                &mut BufReader::new(file),
                ParseRule::ALLOW_UNKNOWN_FIELDS | ParseRule::ALLOW_UNSUPPORTED_FIELDS,
            )
            .map_err(|err| {
                ProviderError::Config(format!("cannot parse ssh_config {}: {err}", path.display()))
            })?;
        let params = config.query(&target.host);
        if let Some(name) = params.host_name {
            host = expand_host_name(&name, &target.host);
        }
        port = port.or(params.port);
        user = user.or(params.user);
        if identity.is_none() {
            identity = params
                .identity_file
                .and_then(|files| files.into_iter().next());
        }
    }

    let user = match user {
        Some(user) => user,
        None => current_user()?,
    };
    if host.is_empty() {
        return Err(ProviderError::Config("ssh host is empty".to_string()));
    }
    Ok(Resolved {
        key: PoolKey {
            user,
            host,
            port: port.unwrap_or(22),
            identity,
            known_hosts: target.known_hosts.clone(),
            host_key_policy: target.host_key_policy,
            password_file: target.password_file.clone(),
            agent: target.agent,
        },
        target: target.clone(),
    })
}

/// `HostName` may use `%h` (the alias given) and `%%`.
fn expand_host_name(name: &str, alias: &str) -> String {
    name.replace("%%", "\u{0}")
        .replace("%h", alias)
        .replace('\u{0}', "%")
}

/// The daemon's own user name: OpenSSH's default login name.
fn current_user() -> Result<String, ProviderError> {
    let uid = nix::unistd::Uid::current();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => Ok(user.name),
        _ => std::env::var("USER").map_err(|_| {
            ProviderError::Config(format!(
                "no ssh user set and uid {uid} has no name; set `user:`"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn aliases_resolve_and_explicit_settings_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config");
        let mut file = File::create(&path).expect("create");
        writeln!(
            file,
            "Host vps\n  HostName %h.example.com\n  User tunnel\n  Port 2200\n  IdentityFile /keys/vps\n  ForwardX11 no\n  SomethingUnknown yes\n\nHost *\n  User fallback\n"
        )
        .expect("write");
        let mut target = SshTarget::new("vps", "/kh");
        target.ssh_config = Some(path.clone());
        let resolved = resolve(&target).expect("resolve");
        assert_eq!(resolved.key.host, "vps.example.com");
        assert_eq!(resolved.key.user, "tunnel");
        assert_eq!(resolved.key.port, 2200);
        assert_eq!(resolved.key.identity, Some(PathBuf::from("/keys/vps")));
        assert_eq!(resolved.key.to_string(), "tunnel@vps.example.com:2200");

        target.port = Some(22);
        target.user = Some("root".to_string());
        let resolved = resolve(&target).expect("resolve");
        assert_eq!(resolved.key.to_string(), "root@vps.example.com:22");

        let mut other = SshTarget::new("plain", "/kh");
        other.ssh_config = Some(path);
        let resolved = resolve(&other).expect("resolve");
        assert_eq!(resolved.key.to_string(), "fallback@plain:22");
    }

    #[test]
    fn trust_and_login_method_are_part_of_the_pool_key() {
        let base = SshTarget::new("10.0.0.1", "/kh");
        let key = |change: &dyn Fn(&mut SshTarget)| {
            let mut target = base.clone();
            target.user = Some("root".to_string());
            change(&mut target);
            resolve(&target).expect("resolve").key
        };
        let plain = key(&|_| {});
        assert_eq!(plain, key(&|_| {}));
        let variants = [
            key(&|t| t.known_hosts = PathBuf::from("/other_kh")),
            key(&|t| t.host_key_policy = HostKeyPolicy::AcceptNew),
            key(&|t| t.password_file = Some(PathBuf::from("/pw"))),
            key(&|t| t.agent = true),
            key(&|t| t.identity_file = Some(PathBuf::from("/id"))),
        ];
        for variant in &variants {
            assert_ne!(&plain, variant);
            // Shown the same: they are the same server and login name.
            assert_eq!(plain.to_string(), variant.to_string());
        }
    }

    #[test]
    fn missing_config_file_is_a_config_error() {
        let mut target = SshTarget::new("vps", "/kh");
        target.ssh_config = Some(PathBuf::from("/nonexistent/ssh_config"));
        assert!(matches!(resolve(&target), Err(ProviderError::Config(_))));
    }
}
