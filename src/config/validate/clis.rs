//! Validation of the tunnels run by a provider's own CLI: `cloudflare`, `tailscale`, `ngrok`.
//!
//! Each resolves into the providers crate's spec with its defaults. The rules about which keys
//! a mode needs or refuses live in that crate's `Settings::parse`, the one place they are
//! written; this layer expands secret paths, hands the keys over, and reports each error the
//! parse returns at its key's position.

use tunnelkeeper_providers::cloudflare::{CloudflareSettings, CloudflareSpec};
use tunnelkeeper_providers::ngrok::{NgrokSettings, NgrokSpec};
use tunnelkeeper_providers::spec::SpecError;
use tunnelkeeper_providers::tailscale::{TailscaleSettings, TailscaleSpec};

use super::Validator;
use crate::config::model::TunnelSection;
use crate::config::path::KeyPath;
use crate::config::scalar::Port;
use crate::config::values::{check_host_port, credential_path};

impl Validator {
    pub(super) fn cloudflare(
        &mut self,
        t: &TunnelSection,
        path: &KeyPath,
    ) -> Option<CloudflareSpec> {
        let before = self.issues.len();
        let settings = CloudflareSettings {
            mode: t.mode.clone(),
            binary: t.binary.clone(),
            token_file: self.secret_file_as_given(t.token_file.as_ref(), path, "token_file"),
            hostname: t.hostname.clone(),
            url: t.url.clone(),
            port: t.port.map(Port::get),
            ready_timeout: t.ready_timeout.map(|d| d.get()),
            stop_grace: t.stop_grace.map(|d| d.get()),
            service_token_id_file: self.secret_file_as_given(
                t.service_token_id_file.as_ref(),
                path,
                "service_token_id_file",
            ),
            service_token_secret_file: self.secret_file_as_given(
                t.service_token_secret_file.as_ref(),
                path,
                "service_token_secret_file",
            ),
        };
        let spec = self.built(settings.parse(), path)?;
        (self.issues.len() == before).then_some(spec)
    }

    pub(super) fn tailscale(&mut self, t: &TunnelSection, path: &KeyPath) -> Option<TailscaleSpec> {
        let before = self.issues.len();
        if let Some(address) = &t.dial_address {
            self.check(&path.key("dial_address"), check_host_port(address));
        }
        let settings = TailscaleSettings {
            mode: t.mode.clone(),
            binary: t.binary.clone(),
            socket: t.socket.clone(),
            peer: t.peer.clone(),
            port: t.port.map(Port::get),
            check_timeout: t.check_timeout.map(|d| d.get()),
            dial_address: t.dial_address.clone(),
            https_port: t.https_port.map(Port::get),
            serve_path: t.serve_path.clone(),
        };
        let spec = self.built(settings.parse(), path)?;
        (self.issues.len() == before).then_some(spec)
    }

    pub(super) fn ngrok(&mut self, t: &TunnelSection, path: &KeyPath) -> Option<NgrokSpec> {
        let before = self.issues.len();
        if let Some(to) = &t.to {
            self.check(&path.key("to"), check_host_port(to));
        }
        let settings = NgrokSettings {
            proto: t.proto.clone(),
            binary: t.binary.clone(),
            to: t.to.clone(),
            authtoken_file: self.secret_file_as_given(
                t.authtoken_file.as_ref(),
                path,
                "authtoken_file",
            ),
            url: t.url.clone(),
            region: t.region.clone(),
            start_timeout: t.start_timeout.map(|d| d.get()),
            reconnect_grace: t.reconnect_grace.map(|d| d.get()),
            stop_grace: t.stop_grace.map(|d| d.get()),
            // The agent's 0600 config file (a copy of the token) lives under the daemon's
            // runtime directory, a tmpfs: a crash cannot leave it on persistent disk.
            config_dir: self.runtime_dir.join("ngrok"),
            // Where earlier versions wrote it: copies left there by a crash are removed at start.
            old_config_dirs: vec![self.state_dir.join("ngrok")],
        };
        let spec = self.built(settings.parse(), path)?;
        (self.issues.len() == before).then_some(spec)
    }

    /// A secret file path: `$CREDENTIALS_DIRECTORY/NAME` expanded, relative paths taken from
    /// the config file's directory.
    pub(super) fn secret_file(
        &mut self,
        file: Option<&std::path::PathBuf>,
        path: &KeyPath,
    ) -> Option<std::path::PathBuf> {
        match credential_path(file?) {
            Ok(p) if p.is_relative() => Some(self.config_dir.join(p)),
            Ok(p) => Some(p),
            Err(message) => {
                self.error(path.clone(), message);
                None
            }
        }
    }

    /// A spec the providers crate built, or its errors reported at their keys.
    fn built<T>(&mut self, parsed: Result<T, Vec<SpecError>>, path: &KeyPath) -> Option<T> {
        match parsed {
            Ok(spec) => Some(spec),
            Err(errors) => {
                for error in errors {
                    self.error(path.key(error.key), error.message);
                }
                None
            }
        }
    }

    /// [`Self::secret_file`], but a path that cannot be expanded (already reported) is passed
    /// on as written, so that the provider's rules about which keys go together still judge
    /// the rest of the tunnel, and report nothing twice.
    fn secret_file_as_given(
        &mut self,
        file: Option<&std::path::PathBuf>,
        path: &KeyPath,
        key: &str,
    ) -> Option<std::path::PathBuf> {
        self.secret_file(file, &path.key(key))
            .or_else(|| file.cloned())
    }
}
