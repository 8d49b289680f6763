//! Validation of the tunnels run by a provider's own CLI: `cloudflare`, `tailscale`, `ngrok`.
//!
//! Each resolves into the providers crate's spec with its defaults; what the CLI would only
//! reject at start (a missing hostname, a mode that needs a peer, an unreadable secret path
//! form) is caught here, at its key.

use tunnelkeeper_providers::cloudflare::{CloudflareMode, CloudflareSpec};
use tunnelkeeper_providers::ngrok::{NgrokProto, NgrokSpec};
use tunnelkeeper_providers::tailscale::{TailscaleMode, TailscaleSpec};

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
        let mode = match t.mode.as_deref().unwrap_or("tunnel") {
            "tunnel" => CloudflareMode::Tunnel,
            "access" => CloudflareMode::Access,
            other => {
                self.error(
                    path.key("mode"),
                    format!("unknown cloudflare mode `{other}`: use `tunnel` or `access`"),
                );
                return None;
            }
        };
        let mut spec = CloudflareSpec::new(mode);
        spec.binary = t.binary.clone();
        spec.token_file = self.secret_file(t.token_file.as_ref(), &path.key("token_file"));
        spec.hostname = t.hostname.clone();
        spec.url = t.url.clone();
        // The same rules the provider enforces before spawning, reported here at their keys.
        let named = t.token_file.is_some();
        let problems: [(bool, &str, &str); 6] = [
            (
                mode == CloudflareMode::Tunnel && named && t.hostname.is_none(),
                "hostname",
                "a named tunnel (`token_file`) needs `hostname`: the public name its probe dials",
            ),
            (
                mode == CloudflareMode::Tunnel && named && t.url.is_some(),
                "url",
                "`url` is for a quick tunnel; a named tunnel (`token_file`) routes by its own ingress",
            ),
            (
                mode == CloudflareMode::Tunnel && !named && t.url.is_none(),
                "token_file",
                "give `token_file` (a named tunnel) or `url` (a quick tunnel to that local service)",
            ),
            (
                mode == CloudflareMode::Tunnel && !named && t.hostname.is_some() && t.url.is_some(),
                "hostname",
                "a quick tunnel gets its hostname from Cloudflare; drop `hostname` or add `token_file`",
            ),
            (
                mode == CloudflareMode::Access && t.hostname.is_none(),
                "hostname",
                "access mode needs `hostname`: the Access application to reach",
            ),
            (
                mode == CloudflareMode::Access && (named || t.url.is_some()),
                if named { "token_file" } else { "url" },
                "access mode takes only `hostname` (it logs in through Access and listens locally)",
            ),
        ];
        for (bad, key, message) in problems {
            if bad {
                self.error(path.key(key), message.to_owned());
            }
        }
        if let Some(hostname) = &t.hostname {
            if hostname.contains("://") || hostname.contains('/') || hostname.contains(':') {
                self.error(
                    path.key("hostname"),
                    format!("`{hostname}` must be a bare host name (no scheme, port or path; the port is `port`)"),
                );
            }
        }
        let id_file = self.secret_file(
            t.service_token_id_file.as_ref(),
            &path.key("service_token_id_file"),
        );
        let secret_file = self.secret_file(
            t.service_token_secret_file.as_ref(),
            &path.key("service_token_secret_file"),
        );
        match (&t.service_token_id_file, &t.service_token_secret_file) {
            (Some(_), None) => self.error(
                path.key("service_token_id_file"),
                "an Access service token needs `service_token_secret_file` too".to_owned(),
            ),
            (None, Some(_)) => self.error(
                path.key("service_token_secret_file"),
                "an Access service token needs `service_token_id_file` too".to_owned(),
            ),
            (Some(_), Some(_)) if mode != CloudflareMode::Access => self.error(
                path.key("service_token_id_file"),
                "an Access service token is for `mode: access`".to_owned(),
            ),
            _ => {}
        }
        if let (Some(id), Some(secret)) = (id_file, secret_file) {
            spec.service_token = Some((id, secret));
        }
        if let Some(port) = t.port {
            spec.port = port.get();
        }
        if let Some(d) = t.ready_timeout {
            spec.ready_timeout = d.get();
        }
        if let Some(d) = t.stop_grace {
            spec.stop_grace = d.get();
        }
        (self.issues.len() == before).then_some(spec)
    }

    pub(super) fn tailscale(&mut self, t: &TunnelSection, path: &KeyPath) -> Option<TailscaleSpec> {
        let before = self.issues.len();
        let mode = match t.mode.as_deref().unwrap_or("peer") {
            "peer" => TailscaleMode::Peer,
            "serve" => TailscaleMode::Serve,
            "funnel" => TailscaleMode::Funnel,
            other => {
                self.error(
                    path.key("mode"),
                    format!("unknown tailscale mode `{other}`: use `peer`, `serve` or `funnel`"),
                );
                return None;
            }
        };
        let Some(port) = t.port.map(Port::get) else {
            self.error(
                path.key("port"),
                "tailscale needs `port`: the service's port on the peer, or the local port to \
                 serve"
                    .to_owned(),
            );
            return None;
        };
        let mut spec = TailscaleSpec::new(mode, port);
        spec.binary = t.binary.clone();
        spec.socket = t.socket.clone();
        spec.peer = t.peer.clone();
        match (mode, &t.peer) {
            (TailscaleMode::Peer, None) => self.error(
                path.key("peer"),
                "peer mode needs `peer`: the node's HostName, MagicDNS name or Tailscale IP"
                    .to_owned(),
            ),
            (TailscaleMode::Serve | TailscaleMode::Funnel, Some(_)) => self.error(
                path.key("peer"),
                "`peer` is for `mode: peer`; serve and funnel expose this node's own port"
                    .to_owned(),
            ),
            _ => {}
        }
        if let Some(d) = t.check_timeout {
            spec.check_timeout = d.get();
        }
        if let Some(address) = &t.dial_address {
            self.check(&path.key("dial_address"), check_host_port(address));
            spec.dial_address = Some(address.clone());
        }
        let exposes = matches!(mode, TailscaleMode::Serve | TailscaleMode::Funnel);
        if let Some(https_port) = t.https_port.map(Port::get) {
            if mode == TailscaleMode::Funnel && ![443, 8443, 10000].contains(&https_port) {
                self.error(
                    path.key("https_port"),
                    format!("funnel accepts 443, 8443 or 10000, not {https_port}"),
                );
            }
            spec.https_port = https_port;
        }
        if let Some(serve_path) = &t.serve_path {
            if !serve_path.starts_with('/') || serve_path.contains(char::is_whitespace) {
                self.error(
                    path.key("serve_path"),
                    format!("`{serve_path}` must be a URL path starting with `/`, e.g. /ssh"),
                );
            }
            spec.serve_path = serve_path.clone();
        }
        if !exposes && (t.https_port.is_some() || t.serve_path.is_some()) {
            let key = if t.https_port.is_some() {
                "https_port"
            } else {
                "serve_path"
            };
            self.error(
                path.key(key),
                "`https_port` and `serve_path` are for `mode: serve` or `funnel`".to_owned(),
            );
        }
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
        if let Some(d) = t.start_timeout {
            spec.start_timeout = d.get();
        }
        if let Some(d) = t.reconnect_grace {
            spec.reconnect_grace = d.get();
        }
        if let Some(d) = t.stop_grace {
            spec.stop_grace = d.get();
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
}
