//! The `tailscale` CLI as the provider runs it: one-shot calls bounded in time (`status`,
//! `ping`, `serve`/`funnel` and their removal), and the handler a tunnel adds.

use std::net::IpAddr;
use std::time::Duration;

use super::status::{
    enable_url, is_ping_timeout, parse_ping, parse_serve_url, ServeConfig, Status,
};
use super::{INSTALL_HINT, MAX_QUOTED, OUTPUT_CAP, STATUS_OUTPUT_CAP};
use crate::process::{self, ExitInfo, RunSpec};
use crate::{Health, ProviderError};

/// A duration as Go's `time.ParseDuration` reads it: whole seconds, else milliseconds.
pub(super) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The serve/funnel handler a tunnel adds: `--https=<https_port> --set-path=<path>` proxying to
/// `proxy`.
#[derive(Debug, Clone)]
pub(super) struct Exposed {
    /// `serve` or `funnel`.
    pub(super) command: &'static str,
    pub(super) https_port: u16,
    pub(super) path: String,
    /// What the handler proxies to, as `serve status --json` shows it.
    pub(super) proxy: String,
}

impl Exposed {
    /// The flags that name this handler, for adding and removing it.
    pub(super) fn flags(&self) -> [String; 2] {
        [
            format!("--https={}", self.https_port),
            format!("--set-path={}", self.path),
        ]
    }
}

/// How the provider runs the CLI.
#[derive(Debug, Clone)]
pub(super) struct Cli {
    pub(super) binary: String,
    /// The value of the global `--socket` flag.
    pub(super) socket: Option<String>,
    /// Per call.
    pub(super) timeout: Duration,
    /// `service/tunnel`, for log lines.
    pub(super) tag: String,
}

/// A finished CLI call.
pub(super) struct Ran {
    /// The command line without the program path, for messages.
    pub(super) shown: String,
    /// Killed at the per-call timeout.
    pub(super) timed_out: bool,
    pub(super) status: ExitInfo,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Ran {
    /// What the command said, for an error message: stderr, else stdout, on one line.
    pub(super) fn said(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let line = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ");
        if line.chars().count() > MAX_QUOTED {
            let cut: String = line.chars().take(MAX_QUOTED).collect();
            format!("{cut}…")
        } else if line.is_empty() {
            "(no output)".to_string()
        } else {
            line
        }
    }

    pub(super) fn failure(&self) -> String {
        format!("`{}` {}: {}", self.shown, self.status, self.said())
    }
}

impl Cli {
    /// Runs `tailscale [--socket=S] <args>` to completion within the per-call timeout; a call
    /// that runs past it is a [`ProviderError::Timeout`].
    pub(super) async fn run(&self, args: Vec<String>, output_cap: usize) -> crate::Result<Ran> {
        let ran = self.run_raw(args, output_cap).await?;
        if ran.timed_out {
            return Err(ProviderError::Timeout {
                what: format!("`{}`", ran.shown),
                after: self.timeout,
            });
        }
        Ok(ran)
    }

    /// [`Cli::run`], but a call killed at the timeout is returned with what it printed.
    pub(super) async fn run_raw(&self, args: Vec<String>, output_cap: usize) -> crate::Result<Ran> {
        let mut full = Vec::with_capacity(args.len() + 1);
        if let Some(socket) = &self.socket {
            full.push(format!("--socket={socket}"));
        }
        full.extend(args);
        let shown = format!("tailscale {}", full.join(" "));
        let mut argv = Vec::with_capacity(full.len() + 1);
        argv.push(self.binary.clone());
        argv.extend(full);
        let mut spec = RunSpec::new(argv);
        spec.timeout = self.timeout;
        spec.output_cap = output_cap;
        spec.tag = self.tag.clone();
        let out = process::run(spec)
            .await
            .map_err(|err| err.with_install_hint(INSTALL_HINT))?;
        Ok(Ran {
            shown,
            timed_out: out.timed_out,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `tailscale status --json`, parsed.
    pub(super) async fn status(&self) -> crate::Result<Status> {
        let ran = self
            .run(argv(&["status", "--json"]), STATUS_OUTPUT_CAP)
            .await?;
        if !ran.status.success() {
            return Err(ProviderError::Unhealthy(ran.failure()));
        }
        serde_json::from_str(&ran.stdout).map_err(|err| {
            ProviderError::Unhealthy(format!("cannot parse the output of `{}`: {err}", ran.shown))
        })
    }

    /// `tailscale ping --c 1 --until-direct=false --timeout <wait> <ip>`: one pong, whichever
    /// path it takes (`--until-direct` defaults to true, and a path that stays on DERP would
    /// then fail the call). `ip` is the peer's Tailscale IP: the CLI would not resolve every
    /// name the status matches. `peer` names it in messages.
    pub(super) async fn ping(
        &self,
        peer: &str,
        ip: IpAddr,
        wait: Duration,
    ) -> crate::Result<Health> {
        let args = vec![
            "ping".to_string(),
            "--c".to_string(),
            "1".to_string(),
            "--until-direct=false".to_string(),
            "--timeout".to_string(),
            go_duration(wait),
            ip.to_string(),
        ];
        let ran = self.run(args, OUTPUT_CAP).await?;
        if let Some(health) = parse_ping(&ran.stdout) {
            return Ok(health);
        }
        if ran.stdout.lines().any(is_ping_timeout) {
            return Err(ProviderError::Timeout {
                what: format!("tailscale ping {ip} ({peer})"),
                after: wait,
            });
        }
        Err(ProviderError::Unhealthy(ran.failure()))
    }

    /// The handlers already served on this node, from `tailscale serve status --json`:
    /// `(host:port, path, proxy)`.
    pub(super) async fn serve_handlers(&self) -> crate::Result<Vec<(String, String, String)>> {
        let ran = self
            .run(argv(&["serve", "status", "--json"]), STATUS_OUTPUT_CAP)
            .await?;
        if !ran.status.success() {
            return Err(ProviderError::Spawn(ran.failure()));
        }
        let config: ServeConfig = if ran.stdout.trim().is_empty() {
            ServeConfig::default()
        } else {
            serde_json::from_str(&ran.stdout).map_err(|err| {
                ProviderError::Spawn(format!("cannot parse the output of `{}`: {err}", ran.shown))
            })?
        };
        let mut found = Vec::new();
        for (host_port, web) in config.web.into_iter().flatten() {
            for (path, handler) in web.handlers.into_iter().flatten() {
                found.push((host_port.clone(), path, handler.proxy));
            }
        }
        Ok(found)
    }

    /// Adds `handler` with `tailscale serve|funnel --bg --https=N --set-path=P <port>`, and
    /// returns the URL it printed. Refuses to replace a handler someone else put on that port
    /// and path (the CLI would silently overwrite it).
    pub(super) async fn expose(&self, handler: &Exposed, status: &Status) -> crate::Result<String> {
        let command = handler.command;
        let self_name = status
            .self_node
            .as_ref()
            .map(|n| n.dns_name.trim_end_matches('.').to_string())
            .unwrap_or_default();
        let wanted = format!("{self_name}:{}", handler.https_port);
        for (host_port, path, proxy) in self.serve_handlers().await? {
            if host_port == wanted && path == handler.path && proxy != handler.proxy {
                return Err(ProviderError::Config(format!(
                    "tailscale already serves https://{wanted}{path} -> {proxy}, which is not this \
                     tunnel's ({}); give this tunnel its own `https_port` or `serve_path`",
                    handler.proxy
                )));
            }
        }
        let mut args = vec![command.to_string(), "--bg".to_string()];
        args.extend(handler.flags());
        args.push(
            handler
                .proxy
                .trim_start_matches("http://127.0.0.1:")
                .to_string(),
        );
        let ran = self.run_raw(args, OUTPUT_CAP).await?;
        if ran.timed_out || !ran.status.success() {
            // Not enabled on the tailnet: the CLI printed where to enable it and waited.
            if let Some(enable) = enable_url(&ran.stdout).or_else(|| enable_url(&ran.stderr)) {
                if let Err(err) = self.unexpose(handler).await {
                    tracing::debug!(tunnel = %self.tag, "nothing to turn off after the enable prompt: {err}");
                }
                return Err(ProviderError::Spawn(format!(
                    "tailscale {command} is not enabled on this tailnet: an admin must enable it \
                     at {enable} (`{}` waited for that {})",
                    ran.shown,
                    if ran.timed_out {
                        "until killed"
                    } else {
                        "and failed"
                    }
                )));
            }
            if ran.timed_out {
                return Err(ProviderError::Timeout {
                    what: format!("`{}`", ran.shown),
                    after: self.timeout,
                });
            }
            return Err(ProviderError::Spawn(ran.failure()));
        }
        let Some(found) = parse_serve_url(&ran.stdout).or_else(|| parse_serve_url(&ran.stderr))
        else {
            // It exposed the port but said nowhere where: take it down again rather than
            // leave an exposure nobody manages.
            if let Err(err) = self.unexpose(handler).await {
                tracing::warn!(tunnel = %self.tag, "cannot turn tailscale {command} off again: {err}");
            }
            return Err(ProviderError::Spawn(format!(
                "`{}` printed no URL after `Available on the internet:` or `Available within your tailnet:`; output: {}",
                ran.shown,
                ran.said()
            )));
        };
        if command == "funnel" && !found.internet {
            tracing::warn!(tunnel = %self.tag, "`{}` exposed {} within the tailnet only", ran.shown, found.url);
        }
        Ok(found.url)
    }

    /// Removes exactly the handler `expose` added: `tailscale serve|funnel --https=N
    /// --set-path=P off`. Without `--set-path`, `off` would remove every handler on the port,
    /// the operator's own included; `--bg <port> off` is not used: `funnel` refuses
    /// `<port> off` as its pre-1.52 syntax.
    pub(super) async fn unexpose(&self, handler: &Exposed) -> crate::Result<()> {
        let mut args = vec![handler.command.to_string()];
        args.extend(handler.flags());
        args.push("off".to_string());
        let ran = self.run(args, OUTPUT_CAP).await?;
        if ran.status.success() {
            Ok(())
        } else {
            Err(ProviderError::Unhealthy(ran.failure()))
        }
    }
}

pub(super) fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_are_written_in_whole_seconds_or_milliseconds() {
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_millis(3500)), "3500ms");
    }
}
