//! The daemon: wires config, bus, services and the control socket together.
//!
//! [`Daemon::start`] brings everything up and returns a handle (used by `run`, the demo and the
//! tests alike); [`run`] adds the process-level concerns: signals, sd-notify and the watchdog.
//! Shutdown is injected as a future so tests can drive it.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::cloudflare::CloudflareProvider;
use tunnelkeeper_providers::command::CommandProvider;
use tunnelkeeper_providers::direct::DirectProvider;
use tunnelkeeper_providers::ngrok::NgrokProvider;
use tunnelkeeper_providers::process;
use tunnelkeeper_providers::ssh::{SshPool, SshProvider};
use tunnelkeeper_providers::tailscale::TailscaleProvider;
use tunnelkeeper_providers::{Provider, Resolver};

use crate::bus::{Bus, EventKind, DEFAULT_JOURNAL};
use crate::config::spec::{Config, ProviderSpec, ServiceSpec, TunnelSpec};
use crate::control::{self, ControlState, Op, OpError, TunnelAction};
use crate::forward::{Acceptor, ListenerStats};
use crate::metrics::Metrics;
use crate::pins::{Drains, Pins};
use crate::reload::{self, ServiceStep};
use crate::router::{RouterBoard, RouterStatus, Routers};
use crate::service::ServiceHandle;
use crate::status::{
    self, DaemonInfo, DaemonStatus, ReloadStatus, ServiceStatus, SharedStatus, TunnelState,
};
use crate::systemd;

/// A running daemon.
pub struct Daemon {
    config: Config,
    /// The configuration the daemon started with: settings a reload cannot apply still run
    /// as they were then, so `restart_required` compares the file against this.
    booted: Config,
    bus: Arc<Bus>,
    metrics: Arc<Metrics>,
    ssh: SshPool,
    resolver: Resolver,
    services: Vec<ServiceHandle>,
    routers: Routers,
    /// What the status document reads; replaced on reload.
    board: Board,
    pins: Pins,
    drains: Drains,
    control_state: Arc<ControlState>,
    ops: mpsc::Receiver<Op>,
    last_reload: Arc<RwLock<Option<ReloadStatus>>>,
    cancel: CancellationToken,
    control: JoinHandle<()>,
    status: Arc<dyn Fn() -> DaemonStatus + Send + Sync>,
    socket: PathBuf,
    /// The top-level hooks (None only while a reload replaces them).
    hooks: Option<crate::hooks::DaemonHooks>,
}

/// Per service: its status and its listener's figures, as the status document reads them.
type Board = Arc<RwLock<Vec<(SharedStatus, Option<ListenerStats>)>>>;

/// Writes queued from the control socket while one is being applied.
const OPS_QUEUE: usize = 16;

/// Builds the provider for one tunnel. The only place that maps settings to provider types.
pub fn provider_for(spec: &ProviderSpec, ssh: &SshPool) -> Arc<dyn Provider> {
    match spec {
        ProviderSpec::Direct(s) => Arc::new(DirectProvider::new(s.clone())),
        ProviderSpec::Command(s) => Arc::new(CommandProvider::new(s.clone())),
        ProviderSpec::Ssh(s) => Arc::new(SshProvider::new(s.clone(), ssh.clone())),
        ProviderSpec::Cloudflare(s) => Arc::new(CloudflareProvider::new(s.clone())),
        ProviderSpec::Tailscale(s) => Arc::new(TailscaleProvider::new(s.clone())),
        ProviderSpec::Ngrok(s) => Arc::new(NgrokProvider::new(s.clone())),
    }
}

impl Daemon {
    /// Binds the control socket, then starts every service (tunnels come up in the background)
    /// and applies the pins persisted in `state_dir`.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        let resolver = Resolver::new(&config.nameservers).context("setting up the DNS resolver")?;
        let (bus, journal_problem) = Bus::open(
            DEFAULT_JOURNAL,
            &config.daemon.state_dir.join(crate::bus::JOURNAL_FILE),
        );
        if let Some(e) = journal_problem {
            tracing::warn!("{e:#}");
        }
        let ssh = SshPool::with_resolver(resolver.clone());
        let cancel = CancellationToken::new();
        let hooks = crate::hooks::DaemonHooks::start(&config.hooks, &bus, cancel.child_token());
        let socket = config.daemon.control_socket.clone();
        let listener = control::server::bind(&socket).await?;
        // Until the start succeeds, a failure removes the socket we just bound.
        let socket_file = crate::socket_file::SocketFile::new(socket.clone());
        let metrics_listener = match config.daemon.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("daemon.metrics_listen: binding {addr}"))?,
            ),
            None => None,
        };
        let metrics = Metrics::new();

        // Every listener is bound before anything starts: a taken address fails the start
        // cleanly, with nothing to tear down.
        let mut acceptors = Vec::new();
        for spec in &config.services {
            match bind_listener(spec).await {
                Ok(acceptor) => acceptors.push(acceptor),
                Err(e) => {
                    // Unix listeners bound so far are ours: leave no socket file behind.
                    for acceptor in acceptors.iter().flatten() {
                        if let Acceptor::Unix(_, path) = acceptor {
                            crate::socket_file::remove(path);
                        }
                    }
                    return Err(e);
                }
            }
        }
        let services: Vec<ServiceHandle> = config
            .services
            .iter()
            .zip(acceptors)
            .map(|(spec, acceptor)| {
                start_service(spec, acceptor, &ssh, &bus, &metrics, &resolver, &cancel)
            })
            .collect();

        let routers = Routers::start(
            &config.routers,
            ssh.clone(),
            bus.clone(),
            config.daemon.state_dir.clone(),
            &cancel,
        );
        let board: Board = Arc::new(RwLock::new(Vec::new()));
        let last_reload = Arc::new(RwLock::new(None));
        let status = status_source(&config, &bus, &board, &routers.board(), &ssh, &last_reload);
        let (ops_tx, ops) = mpsc::channel(OPS_QUEUE);
        let render_metrics: Arc<dyn Fn() -> String + Send + Sync> = {
            let (metrics, status, bus) = (metrics.clone(), status.clone(), bus.clone());
            Arc::new(move || metrics.render(&status(), &bus))
        };
        let control_state = Arc::new(ControlState {
            bus: bus.clone(),
            status: {
                let status = status.clone();
                Box::new(move || status())
            },
            metrics: {
                let render = render_metrics.clone();
                Box::new(move || render())
            },
            readers: control::server::Readers::new(config.daemon.readers.clone()),
            ops: ops_tx,
        });
        let control = tokio::spawn(control::serve(
            listener,
            control_state.clone(),
            cancel.child_token(),
        ));
        // One collector for the daemon's life: reloads never add subscribers.
        metrics.spawn_collector(bus.clone(), cancel.child_token());
        if let Some(listener) = metrics_listener {
            tokio::spawn(crate::metrics::serve_tcp(
                listener,
                render_metrics,
                cancel.child_token(),
            ));
        }
        let (pins, damaged) = Pins::load(&config.daemon.state_dir);
        if let Some(e) = damaged {
            tracing::warn!("starting without pins: {e:#}");
        }
        let (drains, damaged) = Drains::load(&config.daemon.state_dir);
        if let Some(e) = damaged {
            tracing::warn!("starting without drained tunnels: {e:#}");
        }
        let mut daemon = Daemon {
            booted: config.clone(),
            config,
            bus,
            metrics,
            ssh,
            resolver,
            services,
            routers,
            board,
            pins,
            drains,
            control_state,
            ops,
            last_reload,
            cancel,
            control,
            status,
            socket,
            hooks: Some(hooks),
        };
        daemon.refresh_board();
        daemon.apply_pins().await;
        socket_file.keep();
        Ok(daemon)
    }

    /// The event bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// The running services.
    pub fn services(&self) -> &[ServiceHandle] {
        &self.services
    }

    /// The status document served on `/v1/status`.
    pub fn status(&self) -> DaemonStatus {
        (self.status)()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The running routers' watchers.
    pub fn routers(&self) -> &Routers {
        &self.routers
    }

    /// Reacts to an event on the bus: after a router is provisioned, the tunnels that depend
    /// on it restart at once instead of waiting out their backoff.
    pub fn on_event(&self, event: &EventKind) {
        if let EventKind::RouterProvisioned { router, .. } = event {
            for service in &self.services {
                let kicked = service.kick_via_router(router);
                if !kicked.is_empty() {
                    tracing::info!(
                        router,
                        service = %service.spec.name,
                        tunnels = ?kicked,
                        "router provisioned: restarting the tunnels that depend on it"
                    );
                }
            }
        }
    }

    /// The next write from the control socket (pin, unpin, reload).
    pub async fn next_op(&mut self) -> Option<Op> {
        self.ops.recv().await
    }

    /// Applies one write and answers it.
    pub async fn apply(&mut self, op: Op) {
        match op {
            Op::Tunnel {
                service,
                tunnel,
                action: TunnelAction::Probe,
                reply,
            } => {
                // A probe may take its whole timeout: it runs beside the main loop, which
                // goes on applying writes and petting the watchdog.
                match self
                    .service(&service)
                    .and_then(|s| s.probe_now(&tunnel).map_err(OpError::not_found))
                {
                    Ok(probe) => {
                        tokio::spawn(async move {
                            let outcome = probe.await;
                            let _ =
                                reply.send(Ok(serde_json::to_value(&outcome).unwrap_or_default()));
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Op::Tunnel {
                service,
                tunnel,
                action,
                reply,
            } => {
                let _ = reply.send(self.tunnel_action(&service, &tunnel, action).await);
            }
            Op::SshReset { target, reply } => {
                let _ = reply.send(self.ssh_reset(&target).await);
            }
            Op::Pin {
                service,
                tunnel,
                reply,
            } => {
                let _ = reply.send(self.pin(&service, tunnel.as_deref()).await);
            }
            Op::Reload { reply } => {
                let outcome = self.reload().await;
                let _ = reply.send(if outcome.ok {
                    Ok(serde_json::to_value(&outcome).unwrap_or_default())
                } else {
                    Err(OpError::unprocessable(outcome.error.unwrap_or_default()))
                });
            }
        }
    }

    /// The running service called `name`.
    fn service(&self, name: &str) -> Result<&ServiceHandle, OpError> {
        self.services
            .iter()
            .find(|s| s.spec.name == name)
            .ok_or_else(|| OpError::not_found(format!("no service `{name}`")))
    }

    /// Restarts, drains or undrains one tunnel; a drain is persisted in `state_dir` like a pin.
    pub async fn tunnel_action(
        &mut self,
        service: &str,
        tunnel: &str,
        action: TunnelAction,
    ) -> Result<serde_json::Value, OpError> {
        self.service(service)?
            .check_tunnel(tunnel)
            .map_err(OpError::not_found)?;
        let Some(handle) = self.services.iter_mut().find(|s| s.spec.name == service) else {
            return Err(OpError::not_found(format!("no service `{service}`")));
        };
        match action {
            TunnelAction::Restart => handle.restart(tunnel).await.map_err(OpError::not_found)?,
            TunnelAction::Drain | TunnelAction::Undrain => {
                let drained = action == TunnelAction::Drain;
                self.drains
                    .set(service, tunnel, drained)
                    .map_err(|e| OpError::internal(format!("{e:#}")))?;
                handle
                    .set_drained(tunnel, drained)
                    .await
                    .map_err(OpError::not_found)?;
            }
            TunnelAction::Probe => {
                return Err(OpError::internal(
                    "a probe is answered beside the main loop",
                ))
            }
        }
        let status = handle.status();
        tracing::info!(service, tunnel, ?action, primary = ?status.primary, "tunnel control applied");
        Ok(serde_json::json!({
            "service": service,
            "tunnel": tunnel,
            "action": format!("{action:?}").to_lowercase(),
            "primary": status.primary,
        }))
    }

    /// Closes every pooled SSH session to `target` (`user@host:port`, as the status's
    /// `ssh_pool` names it); the tunnels and routers on them reconnect.
    pub async fn ssh_reset(&self, target: &str) -> Result<serde_json::Value, OpError> {
        match self.ssh.reset(target, "reset by the operator").await {
            Some(closed) => {
                tracing::info!(target, closed, "ssh sessions reset on request");
                Ok(serde_json::json!({ "target": target, "closed": closed }))
            }
            None => {
                let known: Vec<String> = self
                    .ssh
                    .stats()
                    .targets
                    .into_iter()
                    .map(|t| t.target)
                    .collect();
                Err(OpError::not_found(format!(
                    "no SSH target `{target}` in the pool (targets: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )))
            }
        }
    }

    /// Pins `service` to `tunnel` (None unpins) and persists the choice in `state_dir`.
    pub async fn pin(
        &mut self,
        service: &str,
        tunnel: Option<&str>,
    ) -> Result<serde_json::Value, OpError> {
        let Some(handle) = self.services.iter().find(|s| s.spec.name == service) else {
            return Err(OpError::not_found(format!("no service `{service}`")));
        };
        // Validate before persisting: a pin on a tunnel that does not exist is refused.
        if let Some(name) = tunnel {
            if !handle.spec.tunnels.iter().any(|t| t.name == name) {
                let known: Vec<&str> = handle
                    .spec
                    .tunnels
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect();
                return Err(OpError::not_found(format!(
                    "service `{service}` has no tunnel `{name}` (tunnels: {})",
                    known.join(", ")
                )));
            }
        }
        self.pins
            .set(service, tunnel)
            .map_err(|e| OpError::internal(format!("{e:#}")))?;
        handle.pin(tunnel).await.map_err(OpError::not_found)?;
        let status = handle.status();
        tracing::info!(service, pin = ?tunnel, primary = ?status.primary, "pin changed");
        Ok(serde_json::json!({
            "service": service,
            "pin": tunnel,
            "primary": status.primary,
        }))
    }

    /// Re-reads the configuration file and applies the difference: added services and tunnels
    /// start, removed ones stop, changed ones restart, unchanged ones keep running untouched.
    /// An invalid file changes nothing. Publishes `config_reloaded` or `config_reload_failed`.
    pub async fn reload(&mut self) -> ReloadStatus {
        let path = self.config.source.clone();
        let outcome = match crate::config::load(&path) {
            Ok(next) => self.apply_config(next).await,
            Err(e) => Err(e.to_string()),
        };
        let at = status::rfc3339(SystemTime::now());
        let outcome = match outcome {
            Ok(mut done) => {
                done.at = at;
                tracing::info!(
                    added = ?done.added,
                    removed = ?done.removed,
                    changed = ?done.changed,
                    "configuration reloaded"
                );
                for key in &done.restart_required {
                    tracing::warn!("reload: `{key}` changed; it takes effect at the next restart");
                }
                self.bus.publish(EventKind::ConfigReloaded {
                    added: done.added.clone(),
                    removed: done.removed.clone(),
                    changed: done.changed.clone(),
                });
                done
            }
            Err(error) => {
                tracing::error!("reload refused, the running configuration stays: {error}");
                self.bus.publish(EventKind::ConfigReloadFailed {
                    error: error.clone(),
                });
                ReloadStatus {
                    at,
                    ok: false,
                    error: Some(error),
                    ..ReloadStatus::default()
                }
            }
        };
        *self.last_reload.write().unwrap_or_else(|p| p.into_inner()) = Some(outcome.clone());
        outcome
    }

    /// Applies a validated configuration as [`reload::plan`] decides. Fails (changing nothing)
    /// only when a new listener address cannot be bound.
    async fn apply_config(&mut self, next: Config) -> Result<ReloadStatus, String> {
        let plan = reload::plan(&self.config, &next);
        let changes = plan.changes(&self.config, &next);
        let mut done = ReloadStatus {
            ok: true,
            added: changes.added,
            removed: changes.removed,
            changed: changes.changed,
            restart_required: reload::restart_required(&self.booted, &next),
            ..ReloadStatus::default()
        };
        // New listener addresses are bound before anything changes, so a taken port refuses
        // the whole reload. Addresses the running listeners hold are rebound in place.
        let mut acceptors: HashMap<String, Acceptor> = HashMap::new();
        for (service, address) in plan.binds_first(&self.config, &next) {
            let acceptor = Acceptor::bind(address)
                .await
                .with_context(|| format!("service `{service}`"))
                .map_err(|e| format!("{e:#}"))?;
            acceptors.insert(service.to_owned(), acceptor);
        }
        if plan.readers_changed {
            self.control_state.readers.set(next.daemon.readers.clone());
        }
        let grace = next.daemon.shutdown_grace;

        // Removed services first: they may free addresses and ports the others need.
        let mut running: HashMap<String, ServiceHandle> = std::mem::take(&mut self.services)
            .into_iter()
            .map(|s| (s.spec.name.clone(), s))
            .collect();
        for name in &plan.removed_services {
            if let Some(mut service) = running.remove(name) {
                service.drain(grace).await;
                service.stop().await;
            }
        }
        let ssh = self.ssh.clone();
        let provider = move |t: &TunnelSpec| provider_for(&t.provider, &ssh);
        for (step, spec) in plan.services.iter().zip(&next.services) {
            let acceptor = acceptors.remove(&spec.name);
            match (&step.step, running.remove(&spec.name)) {
                (ServiceStep::Keep, Some(service)) => self.services.push(service),
                (ServiceStep::Update(_), Some(mut service)) => {
                    if let Err(e) = service.reconfigure(spec.clone(), acceptor, &provider).await {
                        // Validation passed, so this is a listener that could not be rebound
                        // in place: the service runs on without it.
                        let e = format!("{e:#}");
                        tracing::error!("reload: {e}");
                        done.error = Some(e);
                    }
                    self.services.push(service);
                }
                (_, _) => {
                    let acceptor = match acceptor {
                        Some(a) => Some(a),
                        None => bind_listener(spec).await.unwrap_or_else(|e| {
                            tracing::error!("reload: {e:#}");
                            done.error = Some(format!("{e:#}"));
                            None
                        }),
                    };
                    self.services.push(start_service(
                        spec,
                        acceptor,
                        &self.ssh,
                        &self.bus,
                        &self.metrics,
                        &self.resolver,
                        &self.cancel,
                    ));
                }
            }
        }
        self.routers.reconfigure(&next.routers).await;
        if next.hooks != self.config.hooks {
            if let Some(hooks) = self.hooks.take() {
                hooks.stop().await;
            }
            self.hooks = Some(crate::hooks::DaemonHooks::start(
                &next.hooks,
                &self.bus,
                self.cancel.child_token(),
            ));
        }
        self.config = next;
        self.refresh_board();
        for stale in self.pins.retain_known(&self.config) {
            tracing::warn!("reload: pin {stale} dropped: that tunnel is gone");
        }
        for stale in self.drains.retain_known(&self.config) {
            tracing::warn!("reload: drain of {stale} dropped: that tunnel is gone");
        }
        Ok(done)
    }

    /// Re-applies the persisted pins and drains (at start).
    async fn apply_pins(&mut self) {
        for stale in self.drains.retain_known(&self.config) {
            tracing::warn!(
                "drain of {stale} dropped: no such service or tunnel in the configuration"
            );
        }
        for (service, tunnel) in self.drains.all() {
            if let Some(handle) = self.services.iter().find(|s| s.spec.name == service) {
                if handle.set_drained(&tunnel, true).await.is_ok() {
                    tracing::info!(service, tunnel, "drain restored from the state directory");
                }
            }
        }
        for stale in self.pins.retain_known(&self.config) {
            tracing::warn!("pin {stale} dropped: no such service or tunnel in the configuration");
        }
        for (service, tunnel) in self.pins.all().clone() {
            if let Some(handle) = self.services.iter().find(|s| s.spec.name == service) {
                if handle.pin(Some(&tunnel)).await.is_ok() {
                    tracing::info!(service, tunnel, "pin restored from the state directory");
                }
            }
        }
    }

    /// Points the status document at the current services and listeners.
    fn refresh_board(&self) {
        let views = self
            .services
            .iter()
            .map(|s| (s.status.clone(), s.listener_stats()))
            .collect();
        *self.board.write().unwrap_or_else(|p| p.into_inner()) = views;
    }

    /// Stops every tunnel (children get SIGTERM, then SIGKILL after their grace), bounded by
    /// `daemon.shutdown_grace`, then closes and removes the control socket.
    pub async fn shutdown(mut self) {
        self.bus.publish(EventKind::DaemonStopping {});
        let grace = self.config.daemon.shutdown_grace;
        // Listeners first: stop accepting and let open connections finish, while the tunnels
        // they use are still up.
        futures_util::future::join_all(self.services.iter_mut().map(|s| s.drain(grace))).await;
        let stops = futures_util::future::join_all(self.services.into_iter().map(|s| s.stop()));
        if tokio::time::timeout(grace, stops).await.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown grace elapsed; some tunnels were still stopping"
            );
        }
        self.routers.stop().await;
        if let Some(hooks) = self.hooks.take() {
            hooks.finish(grace).await;
        }
        self.cancel.cancel();
        let _ = self.control.await;
        crate::socket_file::remove(&self.socket);
    }
}

/// Binds a service's listener, if it has one.
async fn bind_listener(spec: &ServiceSpec) -> anyhow::Result<Option<Acceptor>> {
    match &spec.listen {
        Some(listen) => Ok(Some(
            Acceptor::bind(&listen.address)
                .await
                .with_context(|| format!("service `{}`", spec.name))?,
        )),
        None => Ok(None),
    }
}

fn start_service(
    spec: &ServiceSpec,
    acceptor: Option<Acceptor>,
    ssh: &SshPool,
    bus: &Arc<Bus>,
    metrics: &Arc<Metrics>,
    resolver: &Resolver,
    cancel: &CancellationToken,
) -> ServiceHandle {
    let providers = spec
        .tunnels
        .iter()
        .map(|t| provider_for(&t.provider, ssh))
        .collect();
    ServiceHandle::start(
        spec.clone(),
        providers,
        acceptor,
        bus.clone(),
        metrics.clone(),
        resolver.clone(),
        cancel,
    )
}

fn status_source(
    config: &Config,
    bus: &Arc<Bus>,
    board: &Board,
    routers: &RouterBoard,
    ssh: &SshPool,
    last_reload: &Arc<RwLock<Option<ReloadStatus>>>,
) -> Arc<dyn Fn() -> DaemonStatus + Send + Sync> {
    let ssh = ssh.clone();
    let board = board.clone();
    let bus = bus.clone();
    let last_reload = last_reload.clone();
    let routers = routers.clone();
    let config_path = config.source.display().to_string();
    let started_wall = status::rfc3339(SystemTime::now());
    let started = Instant::now();
    Arc::new(move || {
        let routers = routers.snapshot();
        let mut services: Vec<ServiceStatus> = board
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(status, listener)| {
                let mut s = status::read(status);
                s.listener = listener.as_ref().map(ListenerStats::status);
                s
            })
            .collect();
        blame_unreachable_routers(&mut services, &routers);
        DaemonStatus {
            daemon: DaemonInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                config: config_path.clone(),
                started: started_wall.clone(),
                uptime_s: started.elapsed().as_secs(),
                last_seq: bus.last_seq(),
                subscribers: bus.subscriber_count(),
                last_reload: last_reload
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            },
            services,
            routers,
            ssh_pool: serde_json::to_value(ssh.stats()).unwrap_or_default(),
        }
    })
}

/// A tunnel that is not up while the router it goes through is unreachable is down because of
/// the router: its reason says so first, so the operator looks in the right place.
fn blame_unreachable_routers(services: &mut [ServiceStatus], routers: &[RouterStatus]) {
    for tunnel in services.iter_mut().flat_map(|s| s.tunnels.iter_mut()) {
        let Some(router) = tunnel
            .via_router
            .as_deref()
            .and_then(|name| routers.iter().find(|r| r.name == name))
        else {
            continue;
        };
        if router.connected || tunnel.state == TunnelState::Up {
            continue;
        }
        let why = router.reason.as_deref().unwrap_or("no answer");
        tunnel.reason = Some(match &tunnel.reason {
            Some(own) => format!("router `{}` unreachable ({why}); {own}", router.name),
            None => format!("router `{}` unreachable ({why})", router.name),
        });
    }
}

/// Runs the daemon until `shutdown` resolves: READY=1 once the socket is bound, STATUS= on every
/// primary change, WATCHDOG=1 from this loop (so a stalled loop stops petting), RELOADING=1 (with
/// MONOTONIC_USEC) then READY=1 around every reload, STOPPING=1 on the way out. Writes from the
/// control socket (pin, reload) are applied here, one at a time.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Whatever a hook or agent leaves behind with `setsid` is re-parented to us, not to init:
    // reaped while we run and ended when we stop.
    if let Err(e) = process::become_subreaper() {
        tracing::warn!("cannot become a child subreaper ({e}); processes that leave their group may outlive the daemon");
    }
    let reaper = tokio::spawn(reap_orphans_forever());
    let mut daemon = Daemon::start(config).await?;
    systemd::ready();
    tracing::info!(
        socket = %daemon.socket.display(),
        services = daemon.services.len(),
        "tunnelkeeper ready"
    );
    // Subscribe before the first STATUS=: whatever happened earlier is in that first line.
    let mut events = daemon.bus.subscribe();
    let report_status = |daemon: &Daemon| {
        let lines: Vec<String> = daemon
            .services
            .iter()
            .map(|s| s.status().summary())
            .collect();
        systemd::status(&lines.join("; "));
    };
    report_status(&daemon);
    let watchdog = systemd::watchdog_period();
    let mut pet = tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // Tunnel states reach the status board just after their events; a slow refresh catches up.
    let mut refresh = tokio::time::interval(std::time::Duration::from_secs(5));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = refresh.tick() => report_status(&daemon),
            _ = pet.tick() => if watchdog.is_some() { systemd::watchdog() },
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading {}", daemon.config.source.display());
                systemd::reloading();
                daemon.reload().await;
                systemd::ready();
                report_status(&daemon);
            }
            Some(op) = daemon.next_op() => {
                let reload = matches!(op, Op::Reload { .. });
                if reload {
                    systemd::reloading();
                }
                daemon.apply(op).await;
                if reload {
                    systemd::ready();
                }
                report_status(&daemon);
            }
            event = events.next() => {
                if let Some(crate::bus::Delivery::Event(event)) = event {
                    daemon.on_event(&event.kind);
                }
                report_status(&daemon);
            }
        }
    }
    systemd::stopping();
    tracing::info!("shutting down");
    daemon.shutdown().await;
    reaper.abort();
    let ended = process::kill_orphans(ORPHAN_GRACE).await;
    if ended > 0 {
        tracing::info!(ended, "ended processes that children had left behind");
    }
    Ok(())
}

/// How long orphans left by children get between SIGTERM and SIGKILL when the daemon stops.
const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Collects exited orphans on every SIGCHLD (and every few seconds, as signals coalesce).
async fn reap_orphans_forever() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut chld = signal(SignalKind::child()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        match chld.as_mut() {
            Some(chld) => tokio::select! {
                _ = chld.recv() => {}
                _ = tick.tick() => {}
            },
            None => {
                tick.tick().await;
            }
        }
        process::reap_orphans();
    }
}
