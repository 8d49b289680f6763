//! The status snapshot served by `GET /v1/status` and printed by `tunnelkeeper status`.
//!
//! Each service task is the single writer of its own [`ServiceStatus`]; readers clone it under a
//! short lock, so a status query never waits on an election or a probe.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The lifecycle state of one tunnel, as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    /// The provider is starting it.
    Starting,
    /// Started; not yet `rise` successful probes.
    Probing,
    /// Eligible for election.
    Up,
    /// Started but failing probes, or dead.
    Down,
    /// Waiting for the next start after a failure.
    Restarting,
    /// Stopped for good.
    Stopped,
    /// Cold standby: not started while a better tunnel is up.
    Standby,
}

/// One tunnel in the status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// Tunnel name.
    pub name: String,
    /// Provider kind.
    pub provider: String,
    /// Priority (lower wins in priority mode).
    pub priority: i64,
    /// Lifecycle state.
    pub state: TunnelState,
    /// Why it is in that state (last failure), if anything notable.
    pub reason: Option<String>,
    /// Where it leads, once started.
    pub endpoint: Option<String>,
    /// Smoothed probe latency in milliseconds.
    pub latency_ms: Option<f64>,
    /// The child process, for command-like providers.
    pub pid: Option<u32>,
    /// How many times it was restarted.
    pub restarts: u64,
    /// When it entered its current state (RFC 3339).
    pub since: String,
    /// Its current failback hold in milliseconds (grows when it flaps).
    pub hold_ms: u64,
    /// The router it depends on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_router: Option<String>,
    /// Taken out of service by an operator (`tunnelkeeper drain`): never elected, not dialled
    /// by new connections; it keeps running and its open connections go on.
    #[serde(default)]
    pub drained: bool,
}

/// One service in the status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// The elected primary, if any.
    pub primary: Option<String>,
    /// True when no tunnel qualifies and the primary is a fallback.
    pub degraded: bool,
    /// True until the first election: the tunnels are still giving their first verdicts
    /// (`failover.settle`). Not degraded: that is how every start looks.
    #[serde(default)]
    pub starting: bool,
    /// Why the primary is what it is.
    pub reason: String,
    /// Manual pin, if any.
    pub pin: Option<String>,
    /// Election mode.
    pub mode: String,
    /// Tunnels in config order.
    pub tunnels: Vec<TunnelStatus>,
    /// The failover listener's figures, if the service has one.
    #[serde(default)]
    pub listener: Option<crate::forward::ListenerStatus>,
}

impl ServiceStatus {
    /// A one-line summary such as `home-ssh: vps 12ms, 4/5 up` (systemd STATUS=, demo view).
    pub fn summary(&self) -> String {
        let up = self
            .tunnels
            .iter()
            .filter(|t| t.state == TunnelState::Up)
            .count();
        let primary = match &self.primary {
            Some(p) => {
                let latency = self
                    .tunnels
                    .iter()
                    .find(|t| &t.name == p)
                    .and_then(|t| t.latency_ms)
                    .map(|ms| format!(" {ms:.0}ms"))
                    .unwrap_or_default();
                format!("{p}{latency}")
            }
            None => "no primary".into(),
        };
        if self.starting {
            return format!("{}: starting, {up}/{} up", self.name, self.tunnels.len());
        }
        let degraded = if self.degraded { " (degraded)" } else { "" };
        format!(
            "{}: {primary}{degraded}, {up}/{} up",
            self.name,
            self.tunnels.len()
        )
    }
}

/// Shared handle on one service's status.
pub type SharedStatus = Arc<RwLock<ServiceStatus>>;

/// Reads a shared status, tolerating a poisoned lock (the data is plain values).
pub fn read(status: &SharedStatus) -> ServiceStatus {
    status.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The whole daemon's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Daemon facts.
    pub daemon: DaemonInfo,
    /// Every service.
    pub services: Vec<ServiceStatus>,
    /// Every router: connected, boot id, last reboot, last provision, each check's result.
    #[serde(default)]
    pub routers: Vec<crate::router::RouterStatus>,
    /// The shared SSH session pool: sessions, channels in use, opened/closed, acquire latency,
    /// reconnects, per target.
    #[serde(default)]
    pub ssh_pool: serde_json::Value,
}

/// Facts about the running daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Crate version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// Config file in use.
    pub config: String,
    /// Start time (RFC 3339).
    pub started: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Sequence number of the last event.
    pub last_seq: u64,
    /// Live event-bus subscriptions (hooks, router recovery, metrics, event streams); a
    /// reload must not grow it.
    #[serde(default)]
    pub subscribers: usize,
    /// The outcome of the last reload, if there was one.
    #[serde(default)]
    pub last_reload: Option<ReloadStatus>,
}

/// The outcome of a configuration reload (SIGHUP, `POST /v1/reload`, `tunnelkeeper reload`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    /// When it was attempted (RFC 3339).
    pub at: String,
    /// False when the new file was refused and the old configuration kept running.
    pub ok: bool,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Added services (`NAME`), tunnels (`SERVICE/TUNNEL`) and routers (`router:NAME`).
    #[serde(default)]
    pub added: Vec<String>,
    /// Removed ones, named alike.
    #[serde(default)]
    pub removed: Vec<String>,
    /// Restarted with new settings, named alike.
    #[serde(default)]
    pub changed: Vec<String>,
    /// Changed settings that only a restart applies (e.g. `daemon.control_socket`).
    #[serde(default)]
    pub restart_required: Vec<String>,
}

/// RFC 3339 (milliseconds) for a wall-clock time.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
