//! The YAML model, exactly as operators write it.
//!
//! Every struct rejects unknown keys, and every field that may be left out is an `Option` (or
//! defaults to empty) so that layering (`defaults` → service → tunnel) can tell "not set" from
//! "set to the default". Turning this model into the resolved specs the daemon runs on is the
//! job of the private `validate` module, run by [`super::parse`]; nothing here checks meaning.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::scalar::{Count, Delay, Port, PositiveDuration};

use crate::election::{Failback, Mode};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Schema version; only `1` exists.
    pub version: u32,
    /// Daemon-wide settings.
    #[serde(default)]
    pub daemon: DaemonSection,
    /// Name resolution for `direct` addresses and `dns` probes.
    #[serde(default)]
    pub dns: DnsSection,
    /// Settings every service and tunnel inherits unless it overrides them.
    #[serde(default)]
    pub defaults: DefaultsSection,
    /// SSH-managed hosts watched for reboots (router recovery).
    #[serde(default)]
    pub routers: Vec<RouterSection>,
    /// The services kept reachable.
    #[serde(default)]
    pub services: Vec<ServiceSection>,
    /// Hooks run once per event for router and daemon events (and any service's events).
    #[serde(default)]
    pub hooks: Vec<HookSection>,
}

/// `daemon:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Path of the control socket.
    pub control_socket: Option<PathBuf>,
    /// Where persistent state (pins, boot ids) lives.
    pub state_dir: Option<PathBuf>,
    /// Extra principals allowed read-only queries: `uid:N`, `gid:N`, `user:NAME`, `group:NAME`.
    #[serde(default)]
    pub readers: Vec<String>,
    /// TCP address for Prometheus metrics.
    pub metrics_listen: Option<String>,
    /// How long shutdown waits for children and connections.
    pub shutdown_grace: Option<Delay>,
}

/// `dns:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// Nameserver IPs; empty means the system resolver configuration.
    #[serde(default)]
    pub nameservers: Vec<String>,
}

/// `defaults:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    /// Probe settings.
    #[serde(default)]
    pub probe: ProbeSection,
    /// Election settings.
    #[serde(default)]
    pub failover: FailoverSection,
    /// Restart backoff settings.
    #[serde(default)]
    pub restart: RestartSection,
}

/// `probe:` at any level. Unset fields inherit from the level above.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Time between probes.
    pub interval: Option<PositiveDuration>,
    /// Limit for one probe (must not exceed `interval`).
    pub timeout: Option<PositiveDuration>,
    /// Consecutive successes that mark a tunnel up.
    pub rise: Option<Count>,
    /// Consecutive failures that mark a tunnel down.
    pub fall: Option<Count>,
    /// Time between probes after a failed one, until the tunnel is down or a probe passes.
    pub fast_interval: Option<PositiveDuration>,
    /// Time between probes of a tunnel that probes declared down.
    pub down_interval: Option<PositiveDuration>,
    /// Floor of the per-probe timeout that adapts to the measured round trip.
    pub min_timeout: Option<PositiveDuration>,
    /// Bytes written on the dialled stream before reading.
    pub send: Option<String>,
    /// Prefix the reply (or the banner) must start with.
    pub expect: Option<String>,
    /// Extra check: TCP connect to `host:port`.
    pub tcp: Option<String>,
    /// Extra check: HTTP GET of a URL.
    pub http: Option<String>,
    /// Expected HTTP status for `http` (default: any 2xx).
    pub status: Option<u16>,
    /// Extra check: run argv, exit 0 passes.
    pub exec: Option<Vec<String>>,
    /// Extra check: the name must resolve.
    pub dns: Option<String>,
}

/// `failover:` in `defaults` or a service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    /// `priority` or `latency`.
    pub mode: Option<Mode>,
    /// Latency mode: how much better a challenger must be.
    pub tolerance: Option<Delay>,
    /// Above this smoothed latency a tunnel is degraded.
    pub max_latency: Option<PositiveDuration>,
    /// `auto` or `manual`.
    pub failback: Option<Failback>,
    /// How long a better tunnel must stay up before it takes over.
    pub failback_hold: Option<Delay>,
    /// How long the first election of a service waits for every tunnel's first verdict.
    pub settle: Option<Delay>,
}

/// `restart:` in `defaults`, a service or a tunnel.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    /// First backoff delay.
    pub initial: Option<PositiveDuration>,
    /// Backoff cap.
    pub max: Option<PositiveDuration>,
    /// Growth factor per attempt.
    pub multiplier: Option<f64>,
    /// Random spread, as a fraction of the delay (0..1).
    pub jitter: Option<f64>,
    /// A tunnel with a process that probes have held down this long is restarted (0 = never).
    pub when_down: Option<Delay>,
}

/// One entry of `routers:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// Unique router name, referenced by `via_router`.
    pub name: String,
    /// How to reach it.
    pub ssh: SshSection,
    /// Prints the current boot id.
    pub boot_id_command: Option<String>,
    /// How often the boot id is re-read.
    pub check_interval: Option<PositiveDuration>,
    /// Commands re-applied after a reboot or drift.
    #[serde(default)]
    pub provision: Vec<String>,
    /// State checks.
    #[serde(default)]
    pub verify: Vec<VerifySection>,
    /// How often `verify` runs.
    pub verify_interval: Option<PositiveDuration>,
    /// Limit for each command run on the router (boot id, provision, verify).
    pub command_timeout: Option<PositiveDuration>,
}

/// A router `verify` check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySection {
    /// Check name, shown in events.
    pub name: String,
    /// Command run on the router.
    pub command: String,
    /// Expected trimmed stdout; without it exit 0 passes.
    pub expect: Option<String>,
}

/// SSH connection settings, of an `ssh` tunnel or a router.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    /// Host name, address, or a `Host` alias of `ssh_config`.
    pub host: String,
    /// Port (default: from ssh_config, else 22).
    pub port: Option<Port>,
    /// Login user (default: from ssh_config, else the daemon's user).
    pub user: Option<String>,
    /// Private key file (ed25519, ecdsa, RSA).
    pub identity_file: Option<PathBuf>,
    /// File holding the key's passphrase.
    pub passphrase_file: Option<PathBuf>,
    /// File holding a password for password authentication.
    pub password_file: Option<PathBuf>,
    /// Also try the keys of the ssh-agent at `$SSH_AUTH_SOCK`.
    pub agent: Option<bool>,
    /// known_hosts file for strict host-key checking (default: `known_hosts` next to the
    /// config file).
    pub known_hosts: Option<PathBuf>,
    /// `strict` (default) or `accept_new`.
    pub host_key_policy: Option<HostKeyPolicyName>,
    /// ssh_config file whose Host aliases apply.
    pub ssh_config: Option<PathBuf>,
    /// Limit for TCP connect and key exchange.
    pub connect_timeout: Option<PositiveDuration>,
    /// Limit for authentication.
    pub auth_timeout: Option<PositiveDuration>,
    /// Keepalive interval.
    pub keepalive_interval: Option<PositiveDuration>,
    /// Unanswered keepalives before the session counts as dead.
    pub keepalive_max: Option<Count>,
    /// Channels per session before the pool opens another (OpenSSH MaxSessions).
    pub max_channels: Option<Count>,
    /// Sessions the pool opens to this target at most (0: no limit).
    pub max_sessions: Option<u32>,
    /// An unused session closes after this long.
    pub idle_timeout: Option<PositiveDuration>,
    /// Sessions are replaced after this long.
    pub max_age: Option<PositiveDuration>,
}

/// `host_key_policy:`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKeyPolicyName {
    /// Refuse unknown host keys.
    Strict,
    /// Record unknown host keys (trust on first use).
    AcceptNew,
}

/// `remote_forward:` of an `ssh` tunnel (`-R`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteForwardSection {
    /// `host:port` the server listens on (port 0: the server picks).
    pub bind: String,
    /// Local `host:port` each forwarded connection goes to.
    pub to: String,
}

/// `local_forward:` of an `ssh` tunnel (`-L`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalForwardSection {
    /// `host:port` as seen from the server.
    pub to: String,
}

/// One entry of `services:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Unique service name.
    pub name: String,
    /// Local failover listener address.
    pub listen: Option<String>,
    /// Per-dial limit of the listener.
    pub connect_timeout: Option<PositiveDuration>,
    /// What happens to open connections on failover: `keep` or `close`.
    pub on_failover: Option<OnFailover>,
    /// Further tunnels a new connection may try after the first dial fails (default: all).
    pub retries: Option<u32>,
    /// Connections served at once; beyond it the listener stops accepting (default 1024).
    pub max_connections: Option<Count>,
    /// Close a connection after this long without traffic either way, counted from accept
    /// (default 1h).
    pub idle_timeout: Option<PositiveDuration>,
    /// Re-dial through the next tunnel and replay what the client sent when a tunnel fails
    /// before its first reply byte (default true).
    pub replay_unanswered: Option<bool>,
    /// `hot` or `cold` for every tunnel of the service.
    pub standby: Option<Standby>,
    /// Election overrides.
    #[serde(default)]
    pub failover: FailoverSection,
    /// Probe overrides for every tunnel of the service.
    #[serde(default)]
    pub probe: ProbeSection,
    /// Restart overrides for every tunnel of the service.
    #[serde(default)]
    pub restart: RestartSection,
    /// Commands run on events.
    #[serde(default)]
    pub hooks: Vec<HookSection>,
    /// The paths to the service.
    #[serde(default)]
    pub tunnels: Vec<TunnelSection>,
}

/// `on_failover:`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailover {
    /// Existing connections stay on their tunnel until it dies.
    Keep,
    /// Connections on the old primary are closed.
    Close,
}

/// `standby:`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standby {
    /// Every tunnel runs all the time.
    Hot,
    /// Started only while no better tunnel is up.
    Cold,
}

/// A hook's command: a string run by `/bin/sh -c`, or an argv list run as is.
#[derive(Debug, Clone)]
pub enum HookCommand {
    /// Shell command line.
    Shell(String),
    /// Program and arguments.
    Argv(Vec<String>),
}

impl<'de> Deserialize<'de> for HookCommand {
    // By hand rather than `untagged`, whose error ("data did not match any variant") names
    // neither shape.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandVisitor;
        impl<'de> serde::de::Visitor<'de> for CommandVisitor {
            type Value = HookCommand;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a command line (a string) or an argv list (a list of strings)")
            }
            fn visit_str<E: serde::de::Error>(self, line: &str) -> Result<HookCommand, E> {
                Ok(HookCommand::Shell(line.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<HookCommand, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(HookCommand::Argv(argv))
            }
        }
        deserializer.deserialize_any(CommandVisitor)
    }
}

/// One entry of a service's `hooks:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSection {
    /// Event types that trigger it.
    pub on: Vec<String>,
    /// What to run.
    pub run: HookCommand,
    /// Kill after this long (default 10s).
    pub timeout: Option<PositiveDuration>,
}

/// `provider:` of a tunnel. Every kind in the design is listed so that a config naming one that
/// this build lacks gets a precise error instead of "unknown variant".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// TCP to a fixed address.
    Direct,
    /// Any program.
    Command,
    /// Native SSH (russh).
    Ssh,
    /// cloudflared.
    Cloudflare,
    /// tailscale.
    Tailscale,
    /// ngrok.
    Ngrok,
}

/// One entry of a service's `tunnels:`. Provider-specific keys sit beside the common ones, as in
/// the design's YAML; validation rejects keys that do not belong to the tunnel's provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    /// Unique name within the service.
    pub name: String,
    /// Which provider runs it.
    pub provider: ProviderKind,
    /// Lower wins in priority mode (default: 10 × position, 1-based).
    pub priority: Option<i64>,
    /// Per-tunnel standby override.
    pub standby: Option<Standby>,
    /// Router this tunnel depends on.
    pub via_router: Option<String>,
    /// Probe overrides.
    #[serde(default)]
    pub probe: ProbeSection,
    /// Restart overrides.
    #[serde(default)]
    pub restart: RestartSection,

    // --- direct ---
    /// `direct`: `host:port` of the service.
    pub address: Option<String>,

    // --- command ---
    /// `command`: program and arguments (no shell).
    pub run: Option<Vec<String>>,
    /// `command`: fixed `host:port` the program exposes.
    pub endpoint: Option<String>,
    /// `command`: regex whose first capture over the program's output is the endpoint.
    pub endpoint_regex: Option<String>,
    /// `command`: how long to wait for `endpoint_regex`.
    pub start_timeout: Option<PositiveDuration>,
    /// `command`: SIGTERM → SIGKILL grace on stop.
    pub stop_grace: Option<Delay>,
    /// `command`: extra environment for the program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `command`: a file of `KEY=value` lines (systemd `EnvironmentFile=` style) read at every
    /// start and added to the program's environment: the place for its secrets, since
    /// config.yaml holds none.
    pub env_file: Option<PathBuf>,

    // --- cloudflare, tailscale, ngrok ---
    /// The provider's CLI (default: `cloudflared` / `tailscale` / `ngrok` from PATH).
    pub binary: Option<String>,
    /// `cloudflare`: `tunnel` or `access`; `tailscale`: `peer`, `serve` or `funnel`.
    pub mode: Option<String>,
    /// `cloudflare` tunnel mode: file holding the tunnel token (none: a quick tunnel).
    pub token_file: Option<PathBuf>,
    /// `cloudflare`: the public hostname (tunnel) or the Access hostname (access).
    pub hostname: Option<String>,
    /// `cloudflare` quick tunnel: the local service URL; `ngrok`: a reserved URL or domain.
    pub url: Option<String>,
    /// `cloudflare`: port dialled on `hostname` (default 443); `tailscale`: port on the peer,
    /// or the local port to serve.
    pub port: Option<Port>,
    /// `cloudflare`: how long start waits for `/ready`.
    pub ready_timeout: Option<PositiveDuration>,
    /// `tailscale`: the tailscaled socket (`--socket`), for a userspace tailscaled.
    pub socket: Option<PathBuf>,
    /// `tailscale` peer mode: the peer's HostName, MagicDNS name or Tailscale IP.
    pub peer: Option<String>,
    /// `tailscale`: limit for each CLI call.
    pub check_timeout: Option<PositiveDuration>,
    /// `tailscale`: `host:port` dialled instead of the peer's Tailscale IP (e.g. a MagicDNS
    /// name resolved through `dns.nameservers: [100.100.100.100]`).
    pub dial_address: Option<String>,
    /// `ngrok`: `tcp` or `http`.
    pub proto: Option<String>,
    /// `ngrok`: the local `host:port` to expose.
    pub to: Option<String>,
    /// `ngrok`: file holding the authtoken.
    pub authtoken_file: Option<PathBuf>,
    /// `ngrok`: region.
    pub region: Option<String>,
    /// `ngrok`: how long the agent may stay offline after an error line before it is
    /// restarted.
    pub reconnect_grace: Option<PositiveDuration>,
    /// `tailscale` serve/funnel: the handler's HTTPS port (`--https`).
    pub https_port: Option<Port>,
    /// `tailscale` serve/funnel: the handler's mount path (`--set-path`).
    pub serve_path: Option<String>,
    /// `cloudflare` access mode: file holding the Access service token's client ID.
    pub service_token_id_file: Option<PathBuf>,
    /// `cloudflare` access mode: file holding the Access service token's client secret.
    pub service_token_secret_file: Option<PathBuf>,

    // --- ssh ---
    /// `ssh`: the server and how to log in.
    pub ssh: Option<SshSection>,
    /// `ssh`: a remote forward (`-R`).
    pub remote_forward: Option<RemoteForwardSection>,
    /// `ssh`: a local forward (`-L`).
    pub local_forward: Option<LocalForwardSection>,
}
