//! Turns the YAML model into the resolved configuration, checking meaning on the way.
//!
//! Settings are layered field by field: built-in defaults ([`super::spec::default`]) <
//! `defaults.*` < a service's `probe`/`restart`/`failover` < a tunnel's `probe`/`restart`. Each value is
//! checked once, at the key where it is written; checks that relate two fields (a probe
//! timeout against its interval, a backoff start against its cap) run on the layered result
//! for every tunnel, and are reported at the key that set the offending value, wherever in
//! the hierarchy that is.
//!
//! Validation never stops at the first problem: every issue is collected, so an operator
//! fixes a file in one pass. Features that this build does not have yet (some providers,
//! router recovery, the failover listener, cold standby, metrics) are errors at their key,
//! never silently ignored: a config that asks for them must not appear to work.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tunnelkeeper_providers::command::{CommandSpec, EndpointSource};
use tunnelkeeper_providers::direct::DirectSpec;

mod clis;
pub(crate) mod collisions;
mod ssh;

use crate::config::model::{
    ConfigFile, DaemonSection, DefaultsSection, DnsSection, HookCommand, HookSection, OnFailover,
    ProbeSection, ProviderKind, RestartSection, RouterSection, ServiceSection, Standby,
    TunnelSection,
};
use crate::config::path::KeyPath;
use crate::config::scalar::{Count, Delay, PositiveDuration};
use crate::config::spec::{
    default, Config, DaemonSpec, ExtraCheck, HookSpec, ListenSpec, ProbeSpec, ProviderSpec,
    RestartSpec, RouterSpec, ServiceSpec, TunnelSpec, VerifySpec,
};
use crate::config::values::{
    check_host_port, check_hostname, check_http_url, check_name, compile_endpoint_regex,
    parse_listen, parse_reader,
};
use crate::election::{Failback, Mode, Policy};

/// Event types a hook may subscribe to: every event the daemon publishes, router events
/// included, so hooks written today keep working when router recovery arrives.
use crate::bus::EVENT_TYPES;

/// Longest Unix socket path: `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// One problem: the key it concerns and what is wrong. Positions are added by the caller,
/// which has the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    /// The offending key (or the nearest one that exists, for a missing key).
    pub(crate) path: KeyPath,
    /// What is wrong, naming the value.
    pub(crate) message: String,
}

/// Checks `file` and resolves it into the configuration the daemon runs on. `source` is
/// recorded in the result for reloads and messages.
pub(crate) fn validate(file: &ConfigFile, source: &Path) -> Result<Config, Vec<Issue>> {
    let mut v = Validator {
        issues: Vec::new(),
        state_dir: std::path::PathBuf::from(default::STATE_DIR),
        runtime_dir: Path::new(default::CONTROL_SOCKET)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        config_dir: source.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let root = KeyPath::root();

    if file.version != 1 {
        v.error(
            root.key("version"),
            format!(
                "unsupported version {}: this build reads version 1",
                file.version
            ),
        );
    }
    let daemon = v.daemon(&file.daemon, &root.key("daemon"));
    v.state_dir = daemon.state_dir.clone();
    v.runtime_dir = runtime_dir(&daemon.control_socket);
    let nameservers = v.nameservers(&file.dns, &root.key("dns"));
    v.defaults(&file.defaults, &root.key("defaults"));
    let (routers, router_names) = v.routers(&file.routers, &root.key("routers"));

    let services_path = root.key("services");
    if file.services.is_empty() {
        v.error(
            services_path.clone(),
            "at least one service is required".to_owned(),
        );
    }
    let mut names = Names::new("service");
    let mut services = Vec::with_capacity(file.services.len());
    for (i, service) in file.services.iter().enumerate() {
        let path = services_path.index(i);
        v.name(&mut names, &service.name, &path.key("name"));
        services.push(v.service(service, &path, &file.defaults, &router_names));
    }

    let hooks_path = root.key("hooks");
    let hooks = file
        .hooks
        .iter()
        .enumerate()
        .map(|(i, hook)| v.hook(hook, &hooks_path.index(i)))
        .collect();

    if !v.issues.is_empty() {
        return Err(v.issues);
    }
    let config = Config {
        source: source.to_path_buf(),
        daemon,
        nameservers,
        services,
        routers,
        hooks,
    };
    let clashes = collisions::collisions(&config);
    if !clashes.is_empty() {
        return Err(clashes
            .into_iter()
            .map(|clash| Issue {
                path: match clash.service {
                    Some(i) => services_path.index(i).key("listen"),
                    None => root.key("daemon").key("metrics_listen"),
                },
                message: clash.message,
            })
            .collect());
    }
    Ok(config)
}

/// The runtime directory: where the control socket lives (`RuntimeDirectory=` under systemd).
fn runtime_dir(control_socket: &Path) -> std::path::PathBuf {
    match control_socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// Collects issues while walking the model.
struct Validator {
    issues: Vec<Issue>,
    /// The daemon's state directory (providers keep generated files under it).
    state_dir: std::path::PathBuf,
    /// The daemon's runtime directory (tmpfs: files there do not outlive a reboot): the
    /// control socket's directory.
    runtime_dir: std::path::PathBuf,
    /// Directory of the config file: relative defaults (known_hosts) live there.
    config_dir: std::path::PathBuf,
}

/// Names seen so far at one level, to report duplicates against their first use.
struct Names {
    what: &'static str,
    seen: HashMap<String, KeyPath>,
}

impl Names {
    fn new(what: &'static str) -> Self {
        Names {
            what,
            seen: HashMap::new(),
        }
    }
}

/// A layered setting and the key that set it (`None`: the built-in default).
struct Layered<T> {
    value: T,
    from: Option<KeyPath>,
}

/// The innermost level that sets a field: `levels` go from outermost to innermost.
fn layer<S, T>(
    levels: &[(&S, KeyPath)],
    field: &str,
    builtin: T,
    get: impl Fn(&S) -> Option<T>,
) -> Layered<T> {
    levels
        .iter()
        .rev()
        .find_map(|(section, path)| {
            get(section).map(|value| Layered {
                value,
                from: Some(path.key(field)),
            })
        })
        .unwrap_or(Layered {
            value: builtin,
            from: None,
        })
}

/// Like [`layer`] for settings without a built-in default.
fn layer_opt<S, T>(
    levels: &[(&S, KeyPath)],
    field: &str,
    get: impl Fn(&S) -> Option<T>,
) -> Option<(T, KeyPath)> {
    levels
        .iter()
        .rev()
        .find_map(|(section, path)| get(section).map(|value| (value, path.key(field))))
}

/// Where a layered value came from, for messages about the *other* side of a comparison.
fn origin<T>(layered: &Layered<T>) -> String {
    match &layered.from {
        Some(path) => format!("set at {path}"),
        None => "from the built-in default".to_owned(),
    }
}

fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Every provider-specific key of a tunnel: whether it is set, and the providers it belongs to.
fn provider_keys(t: &TunnelSection) -> [(&'static str, bool, &'static [ProviderKind]); 31] {
    use ProviderKind::{Cloudflare as Cf, Command, Direct, Ngrok, Ssh, Tailscale as Ts};
    [
        ("address", t.address.is_some(), &[Direct]),
        ("run", t.run.is_some(), &[Command]),
        ("endpoint", t.endpoint.is_some(), &[Command]),
        ("endpoint_regex", t.endpoint_regex.is_some(), &[Command]),
        (
            "start_timeout",
            t.start_timeout.is_some(),
            &[Command, Ngrok],
        ),
        ("stop_grace", t.stop_grace.is_some(), &[Command, Cf, Ngrok]),
        ("env", !t.env.is_empty(), &[Command]),
        ("env_file", t.env_file.is_some(), &[Command]),
        ("ssh", t.ssh.is_some(), &[Ssh]),
        ("remote_forward", t.remote_forward.is_some(), &[Ssh]),
        ("local_forward", t.local_forward.is_some(), &[Ssh]),
        ("binary", t.binary.is_some(), &[Cf, Ts, Ngrok]),
        ("mode", t.mode.is_some(), &[Cf, Ts]),
        ("token_file", t.token_file.is_some(), &[Cf]),
        ("hostname", t.hostname.is_some(), &[Cf]),
        ("url", t.url.is_some(), &[Cf, Ngrok]),
        ("port", t.port.is_some(), &[Cf, Ts]),
        ("ready_timeout", t.ready_timeout.is_some(), &[Cf]),
        ("socket", t.socket.is_some(), &[Ts]),
        ("peer", t.peer.is_some(), &[Ts]),
        ("check_timeout", t.check_timeout.is_some(), &[Ts]),
        ("dial_address", t.dial_address.is_some(), &[Ts]),
        ("proto", t.proto.is_some(), &[Ngrok]),
        ("to", t.to.is_some(), &[Ngrok]),
        ("authtoken_file", t.authtoken_file.is_some(), &[Ngrok]),
        ("region", t.region.is_some(), &[Ngrok]),
        ("reconnect_grace", t.reconnect_grace.is_some(), &[Ngrok]),
        ("https_port", t.https_port.is_some(), &[Ts]),
        ("serve_path", t.serve_path.is_some(), &[Ts]),
        (
            "service_token_id_file",
            t.service_token_id_file.is_some(),
            &[Cf],
        ),
        (
            "service_token_secret_file",
            t.service_token_secret_file.is_some(),
            &[Cf],
        ),
    ]
}

fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Direct => "direct",
        ProviderKind::Command => "command",
        ProviderKind::Ssh => "ssh",
        ProviderKind::Cloudflare => "cloudflare",
        ProviderKind::Tailscale => "tailscale",
        ProviderKind::Ngrok => "ngrok",
    }
}

impl Validator {
    fn error(&mut self, path: KeyPath, message: String) {
        let issue = Issue { path, message };
        // Inherited settings are checked once per tunnel; identical reports add nothing.
        if !self.issues.contains(&issue) {
            self.issues.push(issue);
        }
    }

    /// Records a failed check; returns whether it passed.
    fn check(&mut self, path: &KeyPath, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => true,
            Err(message) => {
                self.error(path.clone(), message);
                false
            }
        }
    }

    /// A service, tunnel or router name: checked for shape and uniqueness at its level.
    fn name(&mut self, names: &mut Names, name: &str, path: &KeyPath) {
        let what = names.what;
        if !self.check(path, check_name(name, what)) {
            return;
        }
        match names.seen.get(name) {
            Some(first) => self.error(
                path.clone(),
                format!("duplicate {what} name `{name}` (first used at {first})"),
            ),
            None => {
                names.seen.insert(name.to_owned(), path.clone());
            }
        }
    }

    /// An argv: at least the program, no NUL bytes (they cannot be passed to exec).
    fn argv(&mut self, argv: &[String], path: &KeyPath) {
        match argv.first() {
            None => self.error(
                path.clone(),
                "must list at least the program to run".to_owned(),
            ),
            Some(program) if program.trim().is_empty() => self.error(
                path.index(0),
                "the program name must not be empty".to_owned(),
            ),
            Some(_) => {}
        }
        for (i, arg) in argv.iter().enumerate() {
            if arg.contains('\0') {
                self.error(path.index(i), "contains a NUL byte".to_owned());
            }
        }
    }

    fn daemon(&mut self, daemon: &DaemonSection, path: &KeyPath) -> DaemonSpec {
        let control_socket = daemon
            .control_socket
            .clone()
            .unwrap_or_else(|| default::CONTROL_SOCKET.into());
        let socket_path = path.key("control_socket");
        let socket_len = control_socket.as_os_str().len();
        if socket_len == 0 {
            self.error(socket_path, "must not be empty".to_owned());
        } else if socket_len > MAX_SOCKET_PATH {
            self.error(
                socket_path,
                format!(
                    "`{}` is {socket_len} bytes long; a Unix socket path may have at most \
                     {MAX_SOCKET_PATH}",
                    control_socket.display()
                ),
            );
        }
        let state_dir = daemon
            .state_dir
            .clone()
            .unwrap_or_else(|| default::STATE_DIR.into());
        if state_dir.as_os_str().is_empty() {
            self.error(path.key("state_dir"), "must not be empty".to_owned());
        }

        let mut readers = Vec::with_capacity(daemon.readers.len());
        for (i, text) in daemon.readers.iter().enumerate() {
            match parse_reader(text) {
                Ok(reader) => readers.push(reader),
                Err(message) => self.error(path.key("readers").index(i), message),
            }
        }

        let metrics_listen = daemon.metrics_listen.as_ref().and_then(|text| {
            match text.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.port() != 0 => Some(addr),
                Ok(_) => {
                    self.error(
                        path.key("metrics_listen"),
                        "needs a fixed port, e.g. 127.0.0.1:9469".to_owned(),
                    );
                    None
                }
                Err(_) => {
                    self.error(
                        path.key("metrics_listen"),
                        format!("`{text}` is not an IP:PORT address, e.g. 127.0.0.1:9469"),
                    );
                    None
                }
            }
        });

        DaemonSpec {
            control_socket,
            state_dir,
            readers,
            shutdown_grace: daemon
                .shutdown_grace
                .map_or(default::SHUTDOWN_GRACE, Delay::get),
            metrics_listen,
        }
    }

    fn nameservers(&mut self, dns: &DnsSection, path: &KeyPath) -> Vec<IpAddr> {
        let mut addresses = Vec::with_capacity(dns.nameservers.len());
        for (i, text) in dns.nameservers.iter().enumerate() {
            match text.trim().parse::<IpAddr>() {
                Ok(ip) => addresses.push(ip),
                Err(_) => self.error(
                    path.key("nameservers").index(i),
                    format!(
                        "`{text}` is not an IP address (nameservers are given as bare \
                         addresses, e.g. 192.0.2.53 or 2001:db8::53, without a port)"
                    ),
                ),
            }
        }
        addresses
    }

    fn defaults(&mut self, defaults: &DefaultsSection, path: &KeyPath) {
        self.probe_section(&defaults.probe, &path.key("probe"));
        self.restart_section(&defaults.restart, &path.key("restart"));
    }

    /// Checks every value written in one `probe:` block, at whatever level.
    fn probe_section(&mut self, probe: &ProbeSection, path: &KeyPath) {
        for (field, value) in [("send", &probe.send), ("expect", &probe.expect)] {
            if value.as_deref() == Some("") {
                self.error(
                    path.key(field),
                    "must not be empty (leave the key out instead)".to_owned(),
                );
            }
        }
        if let Some(tcp) = &probe.tcp {
            self.check(&path.key("tcp"), check_host_port(tcp));
        }
        if let Some(url) = &probe.http {
            self.check(&path.key("http"), check_http_url(url));
        }
        if let Some(status) = probe.status {
            if !(100..=599).contains(&status) {
                self.error(
                    path.key("status"),
                    format!("{status} is not an HTTP status code (100-599)"),
                );
            }
        }
        if let Some(exec) = &probe.exec {
            self.argv(exec, &path.key("exec"));
        }
        if let Some(name) = &probe.dns {
            self.check(
                &path.key("dns"),
                check_hostname(name).map_err(|why| format!("`{name}` is not a host name: {why}")),
            );
        }
    }

    fn restart_section(&mut self, restart: &RestartSection, path: &KeyPath) {
        if let Some(multiplier) = restart.multiplier {
            // NaN is not finite, so it is rejected here too.
            if !multiplier.is_finite() || multiplier < 1.0 {
                self.error(
                    path.key("multiplier"),
                    format!("{multiplier} is not a valid multiplier: it must be at least 1.0"),
                );
            }
        }
        if let Some(jitter) = restart.jitter {
            if !(0.0..=1.0).contains(&jitter) {
                self.error(
                    path.key("jitter"),
                    format!("{jitter} is not a valid jitter: it must be between 0 and 1"),
                );
            }
        }
    }

    /// Every router into a [`RouterSpec`]; the names are returned too, for `via_router`.
    fn routers(
        &mut self,
        routers: &[RouterSection],
        path: &KeyPath,
    ) -> (Vec<RouterSpec>, BTreeSet<String>) {
        let mut names = Names::new("router");
        let mut specs = Vec::with_capacity(routers.len());
        for (i, router) in routers.iter().enumerate() {
            let path = path.index(i);
            self.name(&mut names, &router.name, &path.key("name"));
            let ssh = self.ssh_target(&router.ssh, &path.key("ssh"));
            let boot_id_command = router
                .boot_id_command
                .clone()
                .unwrap_or_else(|| default::BOOT_ID_COMMAND.to_owned());
            if boot_id_command.trim().is_empty() {
                self.error(path.key("boot_id_command"), "must not be empty".to_owned());
            }
            for (j, command) in router.provision.iter().enumerate() {
                if command.trim().is_empty() {
                    self.error(
                        path.key("provision").index(j),
                        "must not be empty".to_owned(),
                    );
                }
            }
            let mut checks = Names::new("verify check");
            for (j, verify) in router.verify.iter().enumerate() {
                let check = path.key("verify").index(j);
                self.name(&mut checks, &verify.name, &check.key("name"));
                if verify.command.trim().is_empty() {
                    self.error(check.key("command"), "must not be empty".to_owned());
                }
            }
            if let Some(ssh) = ssh {
                specs.push(RouterSpec {
                    name: router.name.clone(),
                    ssh,
                    boot_id_command,
                    check_interval: router
                        .check_interval
                        .map_or(default::ROUTER_CHECK_INTERVAL, PositiveDuration::get),
                    provision: router.provision.clone(),
                    verify: router
                        .verify
                        .iter()
                        .map(|v| VerifySpec {
                            name: v.name.clone(),
                            command: v.command.clone(),
                            expect: v.expect.clone(),
                        })
                        .collect(),
                    verify_interval: router
                        .verify_interval
                        .map_or(default::ROUTER_VERIFY_INTERVAL, PositiveDuration::get),
                    command_timeout: router
                        .command_timeout
                        .map_or(default::ROUTER_COMMAND_TIMEOUT, PositiveDuration::get),
                });
            }
        }
        (specs, names.seen.into_keys().collect())
    }

    fn service(
        &mut self,
        service: &ServiceSection,
        path: &KeyPath,
        defaults: &DefaultsSection,
        routers: &BTreeSet<String>,
    ) -> ServiceSpec {
        let listen = self.listen(service, path);
        self.probe_section(&service.probe, &path.key("probe"));
        self.restart_section(&service.restart, &path.key("restart"));

        let defaults_path = KeyPath::root().key("defaults");
        let failover_levels = [
            (&defaults.failover, defaults_path.key("failover")),
            (&service.failover, path.key("failover")),
        ];
        let policy = Policy {
            mode: layer(&failover_levels, "mode", Mode::Priority, |f| f.mode).value,
            tolerance: layer(&failover_levels, "tolerance", default::TOLERANCE, |f| {
                f.tolerance.map(Delay::get)
            })
            .value,
            max_latency: layer(&failover_levels, "max_latency", default::MAX_LATENCY, |f| {
                f.max_latency.map(PositiveDuration::get)
            })
            .value,
            failback: layer(&failover_levels, "failback", Failback::Auto, |f| f.failback).value,
            failback_hold: layer(
                &failover_levels,
                "failback_hold",
                default::FAILBACK_HOLD,
                |f| f.failback_hold.map(Delay::get),
            )
            .value,
        };

        let hooks = service
            .hooks
            .iter()
            .enumerate()
            .map(|(i, hook)| self.hook(hook, &path.key("hooks").index(i)))
            .collect();

        let tunnels_path = path.key("tunnels");
        if service.tunnels.is_empty() {
            self.error(
                tunnels_path.clone(),
                format!(
                    "service `{}` has no tunnels: at least one is required",
                    service.name
                ),
            );
        }
        let mut names = Names::new("tunnel");
        let mut tunnels = Vec::with_capacity(service.tunnels.len());
        for (j, tunnel) in service.tunnels.iter().enumerate() {
            let tunnel_path = tunnels_path.index(j);
            self.name(&mut names, &tunnel.name, &tunnel_path.key("name"));
            let context = TunnelContext {
                service,
                service_path: path,
                defaults,
                routers,
                position: j,
            };
            if let Some(spec) = self.tunnel(tunnel, &tunnel_path, &context) {
                tunnels.push(spec);
            }
        }

        // By default the first election waits as long as the slowest tunnel needs to prove
        // itself: `rise` probes one `interval` apart, the last one taking up to `timeout`, with
        // one interval to spare for starting its process.
        let settle = layer_opt(&failover_levels, "settle", |f| f.settle.map(Delay::get))
            .map(|(value, _)| value)
            .unwrap_or_else(|| {
                tunnels
                    .iter()
                    .map(|t| {
                        t.probe
                            .interval
                            .saturating_mul(t.probe.rise)
                            .saturating_add(t.probe.timeout)
                    })
                    .max()
                    .unwrap_or_default()
            });
        ServiceSpec {
            name: service.name.clone(),
            policy,
            settle,
            connect_timeout: service
                .connect_timeout
                .map_or(default::CONNECT_TIMEOUT, PositiveDuration::get),
            on_failover: service.on_failover.unwrap_or(OnFailover::Keep),
            listen,
            hooks,
            tunnels,
        }
    }

    /// The failover listener: `listen` plus the keys that only make sense with it.
    fn listen(&mut self, service: &ServiceSection, path: &KeyPath) -> Option<ListenSpec> {
        let Some(listen) = &service.listen else {
            for (key, set) in [
                ("retries", service.retries.is_some()),
                ("max_connections", service.max_connections.is_some()),
                ("idle_timeout", service.idle_timeout.is_some()),
                ("replay_unanswered", service.replay_unanswered.is_some()),
            ] {
                if set {
                    self.error(
                        path.key(key),
                        format!(
                            "`{key}` configures the failover listener, and there is no `listen`"
                        ),
                    );
                }
            }
            return None;
        };
        let address = match parse_listen(listen) {
            Ok(address) => address,
            Err(message) => {
                self.error(path.key("listen"), message);
                return None;
            }
        };
        Some(ListenSpec {
            address,
            retries: service.retries,
            max_connections: service
                .max_connections
                .map_or(default::MAX_CONNECTIONS, Count::get),
            idle_timeout: Some(
                service
                    .idle_timeout
                    .map_or(default::IDLE_TIMEOUT, PositiveDuration::get),
            ),
            replay_unanswered: service.replay_unanswered.unwrap_or(true),
        })
    }

    fn hook(&mut self, hook: &HookSection, path: &KeyPath) -> HookSpec {
        let on_path = path.key("on");
        if hook.on.is_empty() {
            self.error(
                on_path.clone(),
                "must name at least one event type".to_owned(),
            );
        }
        // A service's hooks see that service's events only: router and daemon events run the
        // top-level hooks, once each.
        let of_service = matches!(
            path.segments().first(),
            Some(crate::config::path::Segment::Key(k)) if k == "services"
        );
        for (i, event) in hook.on.iter().enumerate() {
            if of_service && crate::bus::is_service_event(event) == Some(false) {
                self.error(
                    on_path.index(i),
                    format!(
                        "`{event}` is not an event of a service: list it under the top-level \
                         `hooks:`, which runs once per event"
                    ),
                );
            } else if !EVENT_TYPES.contains(&event.as_str()) {
                self.error(
                    on_path.index(i),
                    format!(
                        "unknown event type `{event}`; known types: {}",
                        EVENT_TYPES.join(", ")
                    ),
                );
            }
        }
        let run_path = path.key("run");
        match &hook.run {
            HookCommand::Shell(line) => {
                if line.trim().is_empty() {
                    self.error(run_path, "must not be empty".to_owned());
                } else if line.contains('\0') {
                    self.error(run_path, "contains a NUL byte".to_owned());
                }
            }
            HookCommand::Argv(argv) => self.argv(argv, &run_path),
        }
        HookSpec {
            on: hook.on.clone(),
            argv: Vec::from(&hook.run),
            timeout: hook
                .timeout
                .map_or(default::HOOK_TIMEOUT, PositiveDuration::get),
        }
    }

    fn tunnel(
        &mut self,
        tunnel: &TunnelSection,
        path: &KeyPath,
        cx: &TunnelContext<'_>,
    ) -> Option<TunnelSpec> {
        let label = format!("tunnel `{}` of service `{}`", tunnel.name, cx.service.name);

        if let Some(router) = &tunnel.via_router {
            if !cx.routers.contains(router) {
                let known = if cx.routers.is_empty() {
                    "no routers are defined".to_owned()
                } else {
                    let names: Vec<&str> = cx.routers.iter().map(String::as_str).collect();
                    format!("defined routers: {}", names.join(", "))
                };
                self.error(
                    path.key("via_router"),
                    format!("unknown router `{router}` ({known})"),
                );
            }
        }
        self.probe_section(&tunnel.probe, &path.key("probe"));
        self.restart_section(&tunnel.restart, &path.key("restart"));

        let defaults_path = KeyPath::root().key("defaults");
        let probe = self.layered_probe(
            &[
                (&cx.defaults.probe, defaults_path.key("probe")),
                (&cx.service.probe, cx.service_path.key("probe")),
                (&tunnel.probe, path.key("probe")),
            ],
            &label,
        );
        let restart = self.layered_restart(
            &[
                (&cx.defaults.restart, defaults_path.key("restart")),
                (&cx.service.restart, cx.service_path.key("restart")),
                (&tunnel.restart, path.key("restart")),
            ],
            &label,
        );
        let provider = self.provider(tunnel, path)?;

        // The default keeps file order and leaves gaps of ten for inserting tunnels later.
        let position = i64::try_from(cx.position).unwrap_or(i64::MAX);
        let priority = tunnel
            .priority
            .unwrap_or_else(|| position.saturating_add(1).saturating_mul(10));

        Some(TunnelSpec {
            name: tunnel.name.clone(),
            priority,
            standby: tunnel
                .standby
                .or(cx.service.standby)
                .unwrap_or(Standby::Hot),
            via_router: tunnel.via_router.clone(),
            probe,
            restart,
            provider,
        })
    }

    /// Probe settings of one tunnel, layered, with the checks that relate two fields.
    fn layered_probe(&mut self, levels: &[(&ProbeSection, KeyPath)], label: &str) -> ProbeSpec {
        let interval = layer(levels, "interval", default::PROBE_INTERVAL, |p| {
            p.interval.map(PositiveDuration::get)
        });
        let timeout = layer(levels, "timeout", default::PROBE_TIMEOUT, |p| {
            p.timeout.map(PositiveDuration::get)
        });
        if !interval.value.is_zero() && timeout.value > interval.value {
            // Reported at the timeout if it was written anywhere, else at the interval.
            let (at, other) = match (&timeout.from, &interval.from) {
                (Some(at), _) => (at.clone(), format!("interval {}", origin(&interval))),
                (None, Some(at)) => (at.clone(), format!("timeout {}", origin(&timeout))),
                (None, None) => (KeyPath::root(), String::new()),
            };
            self.error(
                at,
                format!(
                    "probe timeout {} is longer than the probe interval {} for {label} \
                     ({other}): a probe must end before the next one starts",
                    human(timeout.value),
                    human(interval.value)
                ),
            );
        }
        let rise = layer(levels, "rise", default::PROBE_RISE, |p| {
            p.rise.map(Count::get)
        })
        .value;
        let fall = layer(levels, "fall", default::PROBE_FALL, |p| {
            p.fall.map(Count::get)
        })
        .value;
        let (fast_interval, down_interval, min_timeout) =
            self.adaptive_probe(levels, &interval, &timeout, label);

        let send = layer_opt(levels, "send", |p| p.send.clone());
        let expect = layer_opt(levels, "expect", |p| p.expect.clone());
        if let (Some((_, at)), None) = (&send, &expect) {
            self.error(
                at.clone(),
                format!(
                    "`send` needs `expect` for {label}: without a reply to check, sending \
                     proves nothing"
                ),
            );
        }

        let http = layer_opt(levels, "http", |p| p.http.clone());
        let status = layer_opt(levels, "status", |p| p.status);
        if let (Some((code, at)), None) = (&status, &http) {
            self.error(
                at.clone(),
                format!("`status: {code}` needs an `http` check, and {label} has none"),
            );
        }

        let mut checks = Vec::new();
        if let Some((target, _)) = layer_opt(levels, "tcp", |p| p.tcp.clone()) {
            checks.push(ExtraCheck::Tcp(target));
        }
        if let Some((url, _)) = http {
            checks.push(ExtraCheck::Http {
                url,
                status: status.map(|(code, _)| code),
            });
        }
        if let Some((argv, _)) = layer_opt(levels, "exec", |p| p.exec.clone()) {
            checks.push(ExtraCheck::Exec(argv));
        }
        if let Some((name, _)) = layer_opt(levels, "dns", |p| p.dns.clone()) {
            checks.push(ExtraCheck::Dns(name));
        }

        ProbeSpec {
            interval: interval.value,
            timeout: timeout.value,
            rise,
            fall,
            fast_interval,
            down_interval,
            min_timeout,
            send: send.map(|(text, _)| text.into_bytes()),
            expect: expect.map(|(text, _)| text.into_bytes()),
            checks,
        }
    }

    /// The adaptive probing settings of one tunnel (`fast_interval`, `down_interval`,
    /// `min_timeout`), layered and defaulted from `interval`, each checked against the setting
    /// it refines: a fast interval slower than the interval, or a timeout floor above its
    /// ceiling, would mean nothing.
    fn adaptive_probe(
        &mut self,
        levels: &[(&ProbeSection, KeyPath)],
        interval: &Layered<Duration>,
        timeout: &Layered<Duration>,
        label: &str,
    ) -> (Duration, Duration, Duration) {
        let fast = layer(
            levels,
            "fast_interval",
            default::probe_fast_interval(interval.value),
            |p| p.fast_interval.map(PositiveDuration::get),
        );
        if let Some(at) = &fast.from {
            if fast.value > interval.value {
                self.error(
                    at.clone(),
                    format!(
                        "probe fast_interval {} is longer than the probe interval {} for \
                         {label} (interval {}): it is the quicker pace after a failure",
                        human(fast.value),
                        human(interval.value),
                        origin(interval)
                    ),
                );
            }
        }
        let down = layer(levels, "down_interval", interval.value, |p| {
            p.down_interval.map(PositiveDuration::get)
        })
        .value;
        let floor = layer(levels, "min_timeout", default::PROBE_MIN_TIMEOUT, |p| {
            p.min_timeout.map(PositiveDuration::get)
        });
        if let Some(at) = &floor.from {
            if floor.value > timeout.value {
                self.error(
                    at.clone(),
                    format!(
                        "probe min_timeout {} is longer than the probe timeout {} for {label} \
                         (timeout {}): the timeout is the ceiling of the adaptive one",
                        human(floor.value),
                        human(timeout.value),
                        origin(timeout)
                    ),
                );
            }
        }
        (fast.value, down, floor.value)
    }

    /// Restart backoff of one tunnel, layered, with the start-versus-cap check.
    fn layered_restart(
        &mut self,
        levels: &[(&RestartSection, KeyPath)],
        label: &str,
    ) -> RestartSpec {
        let initial = layer(levels, "initial", default::RESTART_INITIAL, |r| {
            r.initial.map(PositiveDuration::get)
        });
        let max = layer(levels, "max", default::RESTART_MAX, |r| {
            r.max.map(PositiveDuration::get)
        });
        if !max.value.is_zero() && initial.value > max.value {
            let (at, other) = match (&initial.from, &max.from) {
                (Some(at), _) => (at.clone(), format!("max {}", origin(&max))),
                (None, Some(at)) => (at.clone(), format!("initial {}", origin(&initial))),
                (None, None) => (KeyPath::root(), String::new()),
            };
            self.error(
                at,
                format!(
                    "restart initial delay {} is longer than the maximum delay {} for {label} \
                     ({other})",
                    human(initial.value),
                    human(max.value)
                ),
            );
        }
        RestartSpec {
            initial: initial.value,
            max: max.value,
            multiplier: layer(levels, "multiplier", default::RESTART_MULTIPLIER, |r| {
                r.multiplier
            })
            .value,
            jitter: layer(levels, "jitter", default::RESTART_JITTER, |r| r.jitter).value,
            when_down: layer(levels, "when_down", default::RESTART_WHEN_DOWN, |r| {
                r.when_down.map(Delay::get)
            })
            .value,
        }
    }

    /// The provider's own settings; keys of other providers are errors.
    fn provider(&mut self, tunnel: &TunnelSection, path: &KeyPath) -> Option<ProviderSpec> {
        let kind = provider_name(tunnel.provider);
        for (key, set, owners) in provider_keys(tunnel) {
            if set && !owners.contains(&tunnel.provider) {
                let owners: Vec<String> = owners
                    .iter()
                    .map(|o| format!("`{}`", provider_name(*o)))
                    .collect();
                self.error(
                    path.key(key),
                    format!(
                        "`{key}` does not apply to provider `{kind}` (it belongs to provider {})",
                        owners.join(" / ")
                    ),
                );
            }
        }
        match tunnel.provider {
            ProviderKind::Direct => {
                let Some(address) = &tunnel.address else {
                    self.error(
                        path.key("address"),
                        "provider `direct` needs `address: host:port`".to_owned(),
                    );
                    return None;
                };
                self.check(&path.key("address"), check_host_port(address))
                    .then(|| {
                        ProviderSpec::Direct(DirectSpec {
                            address: address.clone(),
                        })
                    })
            }
            ProviderKind::Command => self.command(tunnel, path).map(ProviderSpec::Command),
            ProviderKind::Ssh => self.ssh_tunnel(tunnel, path).map(ProviderSpec::Ssh),
            ProviderKind::Cloudflare => self.cloudflare(tunnel, path).map(ProviderSpec::Cloudflare),
            ProviderKind::Tailscale => self.tailscale(tunnel, path).map(ProviderSpec::Tailscale),
            ProviderKind::Ngrok => self.ngrok(tunnel, path).map(ProviderSpec::Ngrok),
        }
    }

    fn command(&mut self, tunnel: &TunnelSection, path: &KeyPath) -> Option<CommandSpec> {
        let before = self.issues.len();
        let run = match &tunnel.run {
            Some(run) => {
                self.argv(run, &path.key("run"));
                run.clone()
            }
            None => {
                self.error(
                    path.key("run"),
                    "provider `command` needs `run`: the program and its arguments".to_owned(),
                );
                Vec::new()
            }
        };

        let endpoint = match (&tunnel.endpoint, &tunnel.endpoint_regex) {
            (Some(_), Some(_)) => {
                self.error(
                    path.key("endpoint_regex"),
                    "give either `endpoint` or `endpoint_regex`, not both".to_owned(),
                );
                None
            }
            (None, None) => {
                self.error(
                    path.key("endpoint"),
                    "provider `command` needs `endpoint: host:port` or `endpoint_regex`".to_owned(),
                );
                None
            }
            (Some(fixed), None) => self
                .check(&path.key("endpoint"), check_host_port(fixed))
                .then(|| EndpointSource::Fixed(fixed.clone())),
            (None, Some(pattern)) => match compile_endpoint_regex(pattern) {
                Ok(regex) => Some(EndpointSource::Regex(regex)),
                Err(message) => {
                    self.error(path.key("endpoint_regex"), message);
                    None
                }
            },
        };
        for (name, value) in &tunnel.env {
            let at = path.key("env").key(name);
            if name.is_empty() {
                self.error(
                    at,
                    "an environment variable name must not be empty".to_owned(),
                );
            } else if name.contains('=') || name.contains('\0') {
                self.error(
                    at,
                    format!("`{name}` is not a valid environment variable name (no `=` or NUL)"),
                );
            } else if value.contains('\0') {
                self.error(at, "the value contains a NUL byte".to_owned());
            }
        }

        let env_file = self.secret_file(tunnel.env_file.as_ref(), &path.key("env_file"));

        let endpoint = endpoint?;
        if self.issues.len() != before {
            return None;
        }
        Some(CommandSpec {
            run,
            endpoint,
            env: tunnel
                .env
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            env_file,
            start_timeout: tunnel
                .start_timeout
                .map_or(default::START_TIMEOUT, PositiveDuration::get),
            stop_grace: tunnel.stop_grace.map_or(default::STOP_GRACE, Delay::get),
        })
    }
}

/// What a tunnel inherits from around it.
struct TunnelContext<'a> {
    service: &'a ServiceSection,
    service_path: &'a KeyPath,
    defaults: &'a DefaultsSection,
    routers: &'a BTreeSet<String>,
    /// 0-based position in the service's list, for the default priority.
    position: usize,
}
