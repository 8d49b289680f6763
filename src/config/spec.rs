//! The resolved configuration the daemon runs on.
//!
//! Produced by [`super::parse`] from the YAML model: defaults are layered in, strings are
//! parsed (addresses, regexes, byte strings), and every provider's settings are turned into the
//! providers crate's own spec types. Nothing downstream re-checks or re-defaults anything.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tunnelkeeper_providers::cloudflare::CloudflareSpec;
use tunnelkeeper_providers::command::{CommandSpec, EndpointSource};
use tunnelkeeper_providers::direct::DirectSpec;
use tunnelkeeper_providers::ngrok::NgrokSpec;
use tunnelkeeper_providers::ssh::{SshSpec, SshTarget};
use tunnelkeeper_providers::tailscale::TailscaleSpec;

use super::model::{HookCommand, OnFailover, ProviderKind, Standby};
use crate::election::Policy;

/// Built-in defaults, used where no level of the file sets a value.
pub mod default {
    use std::time::Duration;

    /// `routers[].boot_id_command`
    pub const BOOT_ID_COMMAND: &str = "cat /proc/sys/kernel/random/boot_id";
    /// `routers[].check_interval`
    pub const ROUTER_CHECK_INTERVAL: Duration = Duration::from_secs(30);
    /// `routers[].verify_interval`
    pub const ROUTER_VERIFY_INTERVAL: Duration = Duration::from_secs(300);
    /// `routers[].command_timeout`
    pub const ROUTER_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
    /// `daemon.control_socket`
    pub const CONTROL_SOCKET: &str = "/run/tunnelkeeper/control.sock";
    /// `daemon.state_dir`
    pub const STATE_DIR: &str = "/var/lib/tunnelkeeper";
    /// `daemon.shutdown_grace`
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// `probe.interval`
    pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
    /// `probe.timeout`
    pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
    /// `probe.rise`
    pub const PROBE_RISE: u32 = 3;
    /// `probe.fall`
    pub const PROBE_FALL: u32 = 3;
    /// `probe.min_timeout`: the floor of the adaptive per-probe timeout.
    pub const PROBE_MIN_TIMEOUT: Duration = Duration::from_millis(200);
    /// `probe.fast_interval` is never below this by default.
    pub const PROBE_FAST_INTERVAL_FLOOR: Duration = Duration::from_millis(50);

    /// `probe.fast_interval` by default: `interval / 10`, at least
    /// [`PROBE_FAST_INTERVAL_FLOOR`], never more than `interval`.
    pub fn probe_fast_interval(interval: Duration) -> Duration {
        (interval / 10).max(PROBE_FAST_INTERVAL_FLOOR).min(interval)
    }
    /// `failover.tolerance`
    pub const TOLERANCE: Duration = Duration::from_millis(50);
    /// `failover.max_latency`
    pub const MAX_LATENCY: Duration = Duration::from_millis(500);
    /// `failover.failback_hold`
    pub const FAILBACK_HOLD: Duration = Duration::from_secs(30);
    /// `restart.initial`
    pub const RESTART_INITIAL: Duration = Duration::from_millis(500);
    /// `restart.max`
    pub const RESTART_MAX: Duration = Duration::from_secs(60);
    /// `restart.multiplier`
    pub const RESTART_MULTIPLIER: f64 = 2.0;
    /// `restart.jitter`
    pub const RESTART_JITTER: f64 = 0.2;
    /// `restart.when_down`
    pub const RESTART_WHEN_DOWN: Duration = Duration::from_secs(30);
    /// service `connect_timeout`
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// service `max_connections`
    pub const MAX_CONNECTIONS: u32 = 1024;
    /// service `idle_timeout`: finite, so a silent client cannot hold a listener slot forever
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    /// hook `timeout`
    pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
    /// command `start_timeout`
    pub const START_TIMEOUT: Duration = Duration::from_secs(10);
    /// command `stop_grace`
    pub const STOP_GRACE: Duration = Duration::from_secs(5);
}

/// The whole resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages and reload).
    pub source: PathBuf,
    /// Daemon-wide settings.
    pub daemon: DaemonSpec,
    /// Nameservers for the resolver; empty = system configuration.
    pub nameservers: Vec<IpAddr>,
    /// Services in file order.
    pub services: Vec<ServiceSpec>,
    /// Routers watched for reboots and drift, in file order.
    pub routers: Vec<RouterSpec>,
    /// Top-level hooks: run once per event, for router and daemon events.
    pub hooks: Vec<HookSpec>,
}

/// A router (or any SSH-managed host the tunnels depend on) watched for reboots and drift.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    /// Unique name, referenced by tunnels' `via_router`.
    pub name: String,
    /// How to reach it (through the shared SSH pool).
    pub ssh: SshTarget,
    /// Prints the current boot id.
    pub boot_id_command: String,
    /// How often the boot id is re-read (also on every reconnect).
    pub check_interval: Duration,
    /// Commands re-applied, in order, after a reboot or drift.
    pub provision: Vec<String>,
    /// State checks; a failing one is drift.
    pub verify: Vec<VerifySpec>,
    /// How often `verify` runs.
    pub verify_interval: Duration,
    /// Limit for each command run on the router.
    pub command_timeout: Duration,
}

/// One `verify` check of a router.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifySpec {
    /// Check name, shown in events and status.
    pub name: String,
    /// Command run on the router.
    pub command: String,
    /// Expected trimmed stdout; without it exit status 0 passes.
    pub expect: Option<String>,
}

/// Daemon-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSpec {
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Persistent state directory.
    pub state_dir: PathBuf,
    /// Read-only principals.
    pub readers: Vec<Reader>,
    /// Grace for children and connections on shutdown.
    pub shutdown_grace: Duration,
    /// Where Prometheus metrics are also served over TCP, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A principal allowed read-only access to the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    /// A user id.
    Uid(u32),
    /// A group id.
    Gid(u32),
}

/// One service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// Election rules.
    pub policy: Policy,
    /// The longest the first election waits for every tunnel's first verdict
    /// (`failover.settle`; by default the slowest tunnel's `rise × interval + timeout`).
    pub settle: Duration,
    /// Per-dial limit for the listener.
    pub connect_timeout: Duration,
    /// What happens to open connections on failover.
    pub on_failover: OnFailover,
    /// The local failover listener, if any.
    pub listen: Option<ListenSpec>,
    /// Commands run on events.
    pub hooks: Vec<HookSpec>,
    /// Tunnels in file order.
    pub tunnels: Vec<TunnelSpec>,
}

/// A service's local failover listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenSpec {
    /// Where it accepts.
    pub address: ListenAddress,
    /// Further tunnels one connection may try after its first dial fails. `None` (the default)
    /// means every other tunnel the service has at the time of the connection; kept unresolved
    /// so that adding or removing a tunnel is not a change of the listener.
    pub retries: Option<u32>,
    /// Connections served at once.
    pub max_connections: u32,
    /// Connections without a byte either way for this long are closed, counted from accept
    /// (always set by the config; `None` only where a listener is built by hand).
    pub idle_timeout: Option<Duration>,
    /// Re-dial and replay when a tunnel fails before its first reply byte.
    pub replay_unanswered: bool,
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// TCP on an IP address (v4 or v6).
    Tcp(std::net::SocketAddr),
    /// A Unix stream socket at this path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One hook.
#[derive(Debug, Clone, PartialEq)]
pub struct HookSpec {
    /// Event types (snake_case) that trigger it.
    pub on: Vec<String>,
    /// The argv to run (a shell string becomes `["/bin/sh", "-c", s]`).
    pub argv: Vec<String>,
    /// Kill after this long.
    pub timeout: Duration,
}

/// One tunnel, fully resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelSpec {
    /// Unique within its service.
    pub name: String,
    /// Lower wins in priority mode.
    pub priority: i64,
    /// Hot or cold standby.
    pub standby: Standby,
    /// Router it depends on.
    pub via_router: Option<String>,
    /// Probe settings.
    pub probe: ProbeSpec,
    /// Restart backoff.
    pub restart: RestartSpec,
    /// Provider and its settings.
    pub provider: ProviderSpec,
}

/// The provider of a tunnel with its own settings, in the providers crate's types.
#[derive(Debug, Clone)]
pub enum ProviderSpec {
    /// `direct`
    Direct(DirectSpec),
    /// `command`
    Command(CommandSpec),
    /// `ssh`
    Ssh(SshSpec),
    /// `cloudflare`
    Cloudflare(CloudflareSpec),
    /// `tailscale`
    Tailscale(TailscaleSpec),
    /// `ngrok`
    Ngrok(NgrokSpec),
}

impl PartialEq for ProviderSpec {
    /// Equal when the settings are equal: used by reload to tell changed tunnels from unchanged.
    /// Compared field by field rather than through `Debug`, which masks `env` values: a rotated
    /// secret must restart the tunnel. The patterns name every field, so a field added to a
    /// provider's spec fails to compile here until it is compared too.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ProviderSpec::Direct(a), ProviderSpec::Direct(b)) => {
                let DirectSpec { address } = a;
                *address == b.address
            }
            (ProviderSpec::Command(a), ProviderSpec::Command(b)) => {
                let CommandSpec {
                    run,
                    endpoint,
                    env,
                    env_file,
                    start_timeout,
                    stop_grace,
                } = a;
                let same_endpoint = match (endpoint, &b.endpoint) {
                    (EndpointSource::Fixed(x), EndpointSource::Fixed(y)) => x == y,
                    (EndpointSource::Regex(x), EndpointSource::Regex(y)) => {
                        x.as_str() == y.as_str()
                    }
                    _ => false,
                };
                same_endpoint
                    && *run == b.run
                    && *env == b.env
                    && *env_file == b.env_file
                    && *start_timeout == b.start_timeout
                    && *stop_grace == b.stop_grace
            }
            // These derive PartialEq over plain data (settings and secret *paths*, not secrets).
            (ProviderSpec::Ssh(a), ProviderSpec::Ssh(b)) => a == b,
            (ProviderSpec::Cloudflare(a), ProviderSpec::Cloudflare(b)) => a == b,
            (ProviderSpec::Tailscale(a), ProviderSpec::Tailscale(b)) => a == b,
            (ProviderSpec::Ngrok(a), ProviderSpec::Ngrok(b)) => a == b,
            _ => false,
        }
    }
}

impl ProviderSpec {
    /// The provider kind, for status and events.
    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderSpec::Direct(_) => ProviderKind::Direct,
            ProviderSpec::Command(_) => ProviderKind::Command,
            ProviderSpec::Ssh(_) => ProviderKind::Ssh,
            ProviderSpec::Cloudflare(_) => ProviderKind::Cloudflare,
            ProviderSpec::Tailscale(_) => ProviderKind::Tailscale,
            ProviderSpec::Ngrok(_) => ProviderKind::Ngrok,
        }
    }
}

/// Probe settings of one tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    /// Time between probes.
    pub interval: Duration,
    /// Limit for one probe.
    pub timeout: Duration,
    /// Successes to go up.
    pub rise: u32,
    /// Failures to go down.
    pub fall: u32,
    /// Time between probes after a failed one, until the tunnel is down or a probe passes.
    pub fast_interval: Duration,
    /// Time between probes of a tunnel that probes declared down.
    pub down_interval: Duration,
    /// Floor of the per-probe timeout that adapts to the measured round trip (`timeout` is
    /// its ceiling).
    pub min_timeout: Duration,
    /// Bytes sent on the dialled stream.
    pub send: Option<Vec<u8>>,
    /// Required reply/banner prefix.
    pub expect: Option<Vec<u8>>,
    /// Extra checks, all of which must pass.
    pub checks: Vec<ExtraCheck>,
}

/// An extra probe check beside the end-to-end dial.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraCheck {
    /// TCP connect to `host:port`.
    Tcp(String),
    /// HTTP GET; `status` None means any 2xx.
    Http {
        /// `http://host[:port]/path`
        url: String,
        /// Expected status.
        status: Option<u16>,
    },
    /// Run argv; exit 0 passes.
    Exec(Vec<String>),
    /// The name must resolve.
    Dns(String),
}

/// Restart backoff of one tunnel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartSpec {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
    /// Growth per attempt (>= 1).
    pub multiplier: f64,
    /// Spread as a fraction of the delay (0..=1).
    pub jitter: f64,
    /// Restart a tunnel with a process once probes have held it down this long
    /// (`Duration::ZERO` = never).
    pub when_down: Duration,
}

impl From<&HookCommand> for Vec<String> {
    fn from(cmd: &HookCommand) -> Self {
        match cmd {
            HookCommand::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            HookCommand::Argv(v) => v.clone(),
        }
    }
}

#[cfg(test)]
impl TunnelSpec {
    /// A `direct` tunnel with 1 s probes (rise 1, fall 1) and the given restart backoff, for
    /// unit tests that drive the supervisor or the election loop.
    pub(crate) fn for_test(name: &str, priority: i64, restart: RestartSpec) -> TunnelSpec {
        TunnelSpec {
            name: name.into(),
            priority,
            standby: Standby::Hot,
            via_router: None,
            probe: ProbeSpec {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                rise: 1,
                fall: 1,
                fast_interval: Duration::from_millis(100),
                down_interval: Duration::from_secs(1),
                min_timeout: default::PROBE_MIN_TIMEOUT,
                send: None,
                expect: None,
                checks: vec![],
            },
            restart,
            provider: ProviderSpec::Direct(DirectSpec {
                address: "127.0.0.1:1".into(),
            }),
        }
    }
}
