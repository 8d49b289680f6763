//! Validation of `ssh` tunnels and of SSH connection settings.
//!
//! Resolves a tunnel's `ssh:` section and its one forward into the providers crate's
//! [`SshSpec`]: defaults filled in, secret file paths expanded (`$CREDENTIALS_DIRECTORY/…`),
//! and the checks an operator would otherwise discover only at connect time (no way to
//! authenticate, a forward missing or doubled, a keepalive that cannot work).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tunnelkeeper_providers::ssh::{Forward, HostKeyPolicy, SshSpec, SshTarget};

use super::Validator;
use crate::config::model::{HostKeyPolicyName, SshSection, TunnelSection};
use crate::config::path::KeyPath;
use crate::config::scalar::{Port, PositiveDuration};
use crate::config::values::{check_bind_address, check_host_port, credential_path};

impl Validator {
    /// An `ssh` tunnel: `ssh` plus exactly one of `remote_forward` / `local_forward`.
    pub(super) fn ssh_tunnel(&mut self, tunnel: &TunnelSection, path: &KeyPath) -> Option<SshSpec> {
        let before = self.issues.len();
        let target = match &tunnel.ssh {
            Some(section) => self.ssh_target(section, &path.key("ssh")),
            None => {
                self.error(
                    path.key("ssh"),
                    "provider `ssh` needs `ssh: { host, user, identity_file, known_hosts, ... }`"
                        .to_owned(),
                );
                None
            }
        };
        let forward = match (&tunnel.remote_forward, &tunnel.local_forward) {
            (Some(_), Some(_)) => {
                self.error(
                    path.key("local_forward"),
                    "give either `remote_forward` or `local_forward`, not both: one tunnel holds \
                     one forward"
                        .to_owned(),
                );
                None
            }
            (None, None) => {
                self.error(
                    path.key("remote_forward"),
                    "provider `ssh` needs `remote_forward: { bind, to }` (expose a local service \
                     on the server) or `local_forward: { to }` (reach a service through the server)"
                        .to_owned(),
                );
                None
            }
            (Some(remote), None) => {
                let at = path.key("remote_forward");
                let bind_ok = self.check(&at.key("bind"), check_bind_address(&remote.bind));
                let to_ok = self.check(&at.key("to"), check_host_port(&remote.to));
                (bind_ok && to_ok).then(|| Forward::Remote {
                    bind: remote.bind.clone(),
                    to: remote.to.clone(),
                })
            }
            (None, Some(local)) => self
                .check(
                    &path.key("local_forward").key("to"),
                    check_host_port(&local.to),
                )
                .then(|| Forward::Local {
                    to: local.to.clone(),
                }),
        };
        let (target, forward) = (target?, forward?);
        (self.issues.len() == before).then_some(SshSpec { target, forward })
    }

    /// One `ssh:` section (of a tunnel or a router) into an [`SshTarget`].
    pub(super) fn ssh_target(&mut self, ssh: &SshSection, path: &KeyPath) -> Option<SshTarget> {
        let before = self.issues.len();
        if ssh.host.trim().is_empty() {
            self.error(path.key("host"), "must not be empty".to_owned());
        }
        if ssh.user.as_deref().is_some_and(|u| u.trim().is_empty()) {
            self.error(path.key("user"), "must not be empty".to_owned());
        }
        let dir = self.config_dir.clone();
        let mut secret = |key: &str, file: &Option<PathBuf>| -> Option<PathBuf> {
            let file = file.as_ref()?;
            match credential_path(file) {
                Ok(mut p) => {
                    relative_to(&dir, &mut p);
                    Some(p)
                }
                Err(message) => {
                    self.error(path.key(key), message);
                    None
                }
            }
        };
        let identity_file = secret("identity_file", &ssh.identity_file);
        let passphrase_file = secret("passphrase_file", &ssh.passphrase_file);
        let password_file = secret("password_file", &ssh.password_file);
        let agent = ssh.agent.unwrap_or(false);
        if ssh.identity_file.is_none() && ssh.password_file.is_none() && !agent {
            self.error(
                path.key("identity_file"),
                "no way to log in: set `identity_file`, `password_file` or `agent: true`"
                    .to_owned(),
            );
        }
        if ssh.passphrase_file.is_some() && ssh.identity_file.is_none() {
            self.error(
                path.key("passphrase_file"),
                "`passphrase_file` unlocks `identity_file`, which is not set".to_owned(),
            );
        }
        let mut target = SshTarget::new(
            ssh.host.clone(),
            ssh.known_hosts
                .clone()
                .unwrap_or_else(|| self.config_dir.join("known_hosts")),
        );
        target.port = ssh.port.map(Port::get);
        target.user = ssh.user.clone();
        target.identity_file = identity_file;
        target.passphrase_file = passphrase_file;
        target.password_file = password_file;
        target.agent = agent;
        target.host_key_policy = match ssh.host_key_policy {
            Some(HostKeyPolicyName::AcceptNew) => HostKeyPolicy::AcceptNew,
            Some(HostKeyPolicyName::Strict) | None => HostKeyPolicy::Strict,
        };
        target.ssh_config = ssh.ssh_config.clone().map(|mut p| {
            relative_to(&dir, &mut p);
            p
        });
        let set = |value: Option<PositiveDuration>, slot: &mut Duration| {
            if let Some(v) = value {
                *slot = v.get();
            }
        };
        set(ssh.connect_timeout, &mut target.connect_timeout);
        set(ssh.auth_timeout, &mut target.auth_timeout);
        set(ssh.keepalive_interval, &mut target.keepalive_interval);
        set(ssh.idle_timeout, &mut target.idle_timeout);
        set(ssh.max_age, &mut target.max_age);
        if let Some(n) = ssh.keepalive_max {
            target.keepalive_max = n.get();
        }
        if let Some(n) = ssh.max_channels {
            target.max_channels = n.get();
        }
        if let Some(n) = ssh.max_sessions {
            target.max_sessions = n;
        }
        relative_to(&dir, &mut target.known_hosts);
        (self.issues.len() == before).then_some(target)
    }
}

/// Relative paths in the config are relative to the config file, as an operator reading the file
/// would assume, not to the daemon's working directory.
fn relative_to(dir: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = dir.join(&*path);
    }
}
