//! Validation of the tunnels run by a provider's own CLI: `cloudflare`, `tailscale`, `ngrok`.
//!
//! Each resolves into the providers crate's spec with its defaults. The rules about which keys
//! a mode needs or refuses live in that crate's `Settings::parse`, the one place they are
//! written; this layer expands secret paths, hands the keys over, and reports each error the
//! parse returns at its key's position.

use tunnelkeeper_providers::cloudflare::{CloudflareSettings, CloudflareSpec};
use tunnelkeeper_providers::ngrok::{NgrokProto, NgrokSpec};
use tunnelkeeper_providers::spec::SpecError;
use tunnelkeeper_providers::tailscale::{TailscaleSettings, TailscaleSpec};

use super::Validator;
use crate::config::locate::KeyPath;
use crate::config::model::TunnelSection;
use crate::config::values::{check_host_port, credential_path};

impl Validator {
    pub(super) fn cloudflare(
        &mut self,
        t: &TunnelSection,
        path: &KeyPath,
    ) -> Option<CloudflareSpec> {
        let before = self.issues.len();
        self.positive(t.ready_timeout, &path.key("ready_timeout"));
        self.positive(t.stop_grace, &path.key("stop_grace"));
        let settings = CloudflareSettings {
            mode: t.mode.clone(),
            binary: t.binary.clone(),
            token_file: self.secret_file_as_given(t.token_file.as_ref(), path, "token_file"),
            hostname: t.hostname.clone(),
            url: t.url.clone(),
            port: t.port,
            ready_timeout: t.ready_timeout,
            stop_grace: t.stop_grace,
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
        self.positive(t.check_timeout, &path.key("check_timeout"));
        if let Some(address) = &t.dial_address {
            self.check(&path.key("dial_address"), check_host_port(address));
        }
        let settings = TailscaleSettings {
            mode: t.mode.clone(),
            binary: t.binary.clone(),
            socket: t.socket.clone(),
            peer: t.peer.clone(),
            port: t.port,
            check_timeout: t.check_timeout,
            dial_address: t.dial_address.clone(),
            https_port: t.https_port,
            serve_path: t.serve_path.clone(),
        };
        let spec = self.built(settings.parse(), path)?;
        (self.issues.len() == before).then_some(spec)
    }

    pub(super) fn ngrok(&mut self, t: &TunnelSection, path: &KeyPath) -> Option<NgrokSpec> {
        let before = self.issues.len();
        let proto = match t.proto.as_deref().unwrap_or("tcp") {
            "tcp" => NgrokProto::Tcp,
            "http" => NgrokProto::Http,
            other => {
                self.error(
                    path.key("proto"),
                    format!("unknown ngrok proto `{other}`: use `tcp` or `http`"),
                );
                return None;
            }
        };
        let Some(to) = &t.to else {
            self.error(
                path.key("to"),
                "ngrok needs `to`: the local host:port to expose".to_owned(),
            );
            return None;
        };
        self.check(&path.key("to"), check_host_port(to));
        let Some(token) = self.secret_file(t.authtoken_file.as_ref(), &path.key("authtoken_file"))
        else {
            if t.authtoken_file.is_none() {
                self.error(
                    path.key("authtoken_file"),
                    "ngrok needs `authtoken_file`: the file holding the agent's authtoken"
                        .to_owned(),
                );
            }
            return None;
        };
        // The agent's 0600 config file (a copy of the token) lives under the daemon's runtime
        // directory, a tmpfs: a crash cannot leave it on persistent disk.
        let mut spec = NgrokSpec::new(proto, to.clone(), token, self.runtime_dir.join("ngrok"));
        // Where earlier versions wrote it: copies left there by a crash are removed at start.
        spec.old_config_dirs = vec![self.state_dir.join("ngrok")];
        spec.binary = t.binary.clone();
        spec.url = t.url.clone();
        spec.region = t.region.clone();
        self.positive(t.start_timeout, &path.key("start_timeout"));
        self.positive(t.stop_grace, &path.key("stop_grace"));
        self.positive(t.reconnect_grace, &path.key("reconnect_grace"));
        if let Some(d) = t.start_timeout {
            spec.start_timeout = d;
        }
        if let Some(d) = t.reconnect_grace {
            spec.reconnect_grace = d;
        }
        if let Some(d) = t.stop_grace {
            spec.stop_grace = d;
        }
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
