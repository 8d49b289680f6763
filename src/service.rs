//! A service: its tunnels' tasks, its election loop, and its status.
//!
//! The service task is the only place where a primary is chosen. It folds the reports of its
//! tunnel tasks into [`Contender`]s, runs the pure [`election::elect`] after every change and
//! whenever a failback hold expires, publishes `primary_changed` / `no_healthy_tunnel`, and keeps
//! the shared [`ServiceStatus`] current. It never waits on a tunnel, a hook or a reader.
//!
//! A reload reconfigures a running service in place ([`ServiceHandle::reconfigure`]): tunnels
//! whose settings are unchanged keep their task, process and status entry; only added, removed
//! and changed ones are started or stopped.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::{Provider, Resolver, StartContext, Tunnel};

use crate::bus::{Bus, EventKind};
use crate::config::model::Standby;
use crate::config::spec::{ServiceSpec, TunnelSpec};
use crate::election::{
    self, Contender, Dampening, Decision, FirstVerdict, Input, Mode, Reason, Settle,
};
use crate::forward::{Acceptor, Listener, ListenerStats};
use crate::metrics::Metrics;
use crate::probe::Transition;
use crate::standby;
use crate::status::{self, ServiceStatus, SharedStatus, TunnelState, TunnelStatus};
use crate::supervisor::{next_slot_id, LiveTunnel, Report, SlotId, TaggedReport, TunnelTask};

/// The current primary of a service, published for the data plane (and tests).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Primary {
    /// Elected tunnel name.
    pub tunnel: Option<String>,
    /// True when it is only a fallback.
    pub degraded: bool,
    /// The order in which a new connection tries tunnels (see [`election::dial_order`]).
    pub order: Vec<String>,
}

/// One tunnel as the data plane sees it: its running instance and where to report failures
/// that real traffic meets on it.
#[derive(Clone)]
pub struct Route {
    /// Tunnel name.
    pub name: String,
    live: LiveTunnel,
    passive: mpsc::UnboundedSender<String>,
}

impl Route {
    /// Reports a failure real traffic met on this tunnel; it counts like a failed probe, and a
    /// tunnel that was up is probed at once (see `supervisor::TunnelTask::run`).
    pub fn report_failure(&self, reason: String) {
        let _ = self.passive.send(reason);
    }
}

/// What the data plane needs of a service: its tunnels as they run (the table follows
/// reloads), and the current primary and dial order.
#[derive(Clone)]
pub struct Routes {
    table: Arc<RwLock<Vec<Route>>>,
    /// Primary and dial order.
    pub primary: watch::Receiver<Primary>,
}

impl Routes {
    /// The route and running instance of the tunnel called `name`, if it is started.
    pub fn get(&self, name: &str) -> Option<(Route, Arc<dyn Tunnel>)> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let route = table.iter().find(|r| r.name == name)?;
        let tunnel = route
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some((route.clone(), tunnel))
    }

    /// Tunnel names in config order.
    pub fn names(&self) -> Vec<String> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.iter().map(|r| r.name.clone()).collect()
    }

    fn replace(&self, routes: Vec<Route>) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = routes;
    }
}

/// A request to the election loop.
enum Command {
    /// Pin the primary to a tunnel, or unpin (None). Answered once the election ran.
    Pin(Option<String>, oneshot::Sender<()>),
    /// Take a reloaded spec. `slots` follows `spec.tunnels`: a kept tunnel's id, or a new
    /// tunnel's id with its standby switch.
    Reconfigure {
        spec: Box<ServiceSpec>,
        slots: Vec<(SlotId, Option<watch::Sender<bool>>)>,
    },
}

/// One running tunnel task, owned by its service.
struct Slot {
    id: SlotId,
    spec: TunnelSpec,
    route: Route,
    kick: Arc<Notify>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What a reload did to one service's tunnels (`service/tunnel` names).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TunnelChanges {
    /// Started.
    pub added: Vec<String>,
    /// Stopped.
    pub removed: Vec<String>,
    /// Restarted with new settings.
    pub changed: Vec<String>,
}

/// Shared by every tunnel task a service starts.
struct TaskContext {
    service: String,
    bus: Arc<Bus>,
    metrics: Arc<Metrics>,
    resolver: Resolver,
    reports: mpsc::UnboundedSender<TaggedReport>,
    cancel: CancellationToken,
}

impl TaskContext {
    /// Spawns the task of one tunnel; returns it and the switch that wakes it from cold standby.
    fn spawn(
        &self,
        tunnel: &TunnelSpec,
        provider: Arc<dyn Provider>,
    ) -> (Slot, watch::Sender<bool>) {
        // Hot tunnels run at once; cold ones wait for the election loop to wake them.
        let (wanted_tx, wanted_rx) = watch::channel(tunnel.standby == Standby::Hot);
        (
            self.spawn_as(next_slot_id(), wanted_rx, tunnel, provider),
            wanted_tx,
        )
    }

    /// Spawns the task of one tunnel under a chosen id and standby switch.
    fn spawn_as(
        &self,
        id: SlotId,
        wanted: watch::Receiver<bool>,
        tunnel: &TunnelSpec,
        provider: Arc<dyn Provider>,
    ) -> Slot {
        let live = LiveTunnel::default();
        let (passive_tx, passive_rx) = mpsc::unbounded_channel();
        let cancel = self.cancel.child_token();
        let kick = Arc::new(Notify::new());
        let task = TunnelTask {
            slot: id,
            service: self.service.clone(),
            spec: tunnel.clone(),
            provider,
            ctx: StartContext {
                tunnel: tunnel.name.clone(),
                service: self.service.clone(),
                resolver: self.resolver.clone(),
            },
            bus: self.bus.clone(),
            reports: self.reports.clone(),
            cancel: cancel.clone(),
            live: live.clone(),
            wanted,
            kick: kick.clone(),
            metrics: self.metrics.clone(),
        };
        Slot {
            id,
            spec: tunnel.clone(),
            route: Route {
                name: tunnel.name.clone(),
                live,
                passive: passive_tx,
            },
            kick,
            cancel,
            task: tokio::spawn(task.run(passive_rx)),
        }
    }
}

/// A running service.
pub struct ServiceHandle {
    /// Its resolved settings.
    pub spec: ServiceSpec,
    /// Its status, kept current by the service task.
    pub status: SharedStatus,
    /// Its primary, for whoever steers traffic.
    pub primary: watch::Receiver<Primary>,
    /// Its tunnels, for the data plane.
    pub routes: Routes,
    tasks: TaskContext,
    slots: Vec<Slot>,
    commands: mpsc::UnboundedSender<Command>,
    election: JoinHandle<()>,
    hooks: JoinSet<()>,
    listener: Option<Listener>,
    /// Listeners a reload removed, still carrying the connections they had accepted.
    retired: Vec<Listener>,
}

impl ServiceHandle {
    /// Starts the service's tunnels and its election loop.
    /// `acceptor` is the service's bound failover listener, if it has `listen:`.
    pub fn start(
        spec: ServiceSpec,
        providers: Vec<Arc<dyn Provider>>,
        acceptor: Option<Acceptor>,
        bus: Arc<Bus>,
        metrics: Arc<Metrics>,
        resolver: Resolver,
        parent: &CancellationToken,
    ) -> ServiceHandle {
        let cancel = parent.child_token();
        let status = Arc::new(RwLock::new(initial_status(&spec)));
        let (primary_tx, primary_rx) = watch::channel(Primary::default());
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let tasks = TaskContext {
            service: spec.name.clone(),
            bus: bus.clone(),
            metrics,
            resolver,
            reports: reports_tx,
            cancel: cancel.clone(),
        };
        let (slots, wanted): (Vec<Slot>, Vec<_>) = spec
            .tunnels
            .iter()
            .zip(providers)
            .map(|(tunnel, provider)| tasks.spawn(tunnel, provider))
            .unzip();
        let routes = Routes {
            table: Arc::new(RwLock::new(slots.iter().map(|s| s.route.clone()).collect())),
            primary: primary_rx.clone(),
        };
        let hooks = crate::hooks::start(&spec.name, &spec.hooks, &bus, cancel.child_token());
        let listener = match (acceptor, &spec.listen) {
            (Some(acceptor), Some(listen)) => {
                Some(Listener::start(acceptor, &spec, listen, routes.clone()))
            }
            _ => None,
        };
        let election = Election::new(
            &spec,
            slots.iter().map(|s| s.id).collect(),
            bus,
            status.clone(),
            primary_tx,
            cancel,
            wanted,
        );
        let election = tokio::spawn(election.run(reports_rx, commands_rx));
        ServiceHandle {
            spec,
            status,
            primary: primary_rx,
            routes,
            tasks,
            slots,
            commands,
            election,
            hooks,
            listener,
            retired: Vec::new(),
        }
    }

    /// A handle on the listener's figures, if the service has a listener.
    pub fn listener_stats(&self) -> Option<ListenerStats> {
        self.listener.as_ref().map(Listener::stats)
    }

    /// A copy of the current status.
    pub fn status(&self) -> ServiceStatus {
        let mut status = status::read(&self.status);
        status.listener = self.listener.as_ref().map(|l| l.stats().status());
        status
    }

    /// Pins the primary to `tunnel` (None unpins). The pinned tunnel is primary whenever it is
    /// up; returns once the election has run. An unknown tunnel is an error.
    pub async fn pin(&self, tunnel: Option<&str>) -> Result<(), String> {
        if let Some(name) = tunnel {
            if !self.spec.tunnels.iter().any(|t| t.name == name) {
                let known: Vec<&str> = self.spec.tunnels.iter().map(|t| t.name.as_str()).collect();
                return Err(format!(
                    "service `{}` has no tunnel `{name}` (tunnels: {})",
                    self.spec.name,
                    known.join(", ")
                ));
            }
        }
        let (done, elected) = oneshot::channel();
        let _ = self
            .commands
            .send(Command::Pin(tunnel.map(str::to_owned), done));
        let _ = elected.await;
        Ok(())
    }

    /// Restarts the tunnels that depend on `router` at once, skipping any backoff.
    pub fn kick_via_router(&self, router: &str) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.spec.via_router.as_deref() == Some(router))
            .map(|s| {
                s.kick.notify_waiters();
                s.spec.name.clone()
            })
            .collect()
    }

    /// The child pids of the running tunnels, by name (for tests and diagnostics).
    pub fn tunnel_names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.spec.name.clone()).collect()
    }

    /// Applies a reloaded spec of the same service: tunnels whose settings are equal keep
    /// running untouched (same task, same process, same status `since`); changed ones are
    /// restarted, removed ones stopped, added ones started. The listener keeps its open
    /// connections and counters: new settings apply to new connections, and it is rebound only
    /// when its address moved (`acceptor`: the already bound new address); hooks are restarted
    /// only when they changed. `provider_for` builds new tunnels' providers.
    pub async fn reconfigure(
        &mut self,
        spec: ServiceSpec,
        acceptor: Option<Acceptor>,
        provider_for: &dyn Fn(&TunnelSpec) -> Arc<dyn Provider>,
    ) -> anyhow::Result<TunnelChanges> {
        let mut changes = TunnelChanges::default();
        let qualified = |name: &str| format!("{}/{name}", spec.name);
        let mut old: Vec<Option<Slot>> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(Some)
            .collect();
        // Plan first: which tunnels keep their task, which get a new one (under a new id).
        enum Plan {
            Keep(Box<Slot>),
            Start(SlotId, watch::Receiver<bool>),
        }
        let mut plan = Vec::with_capacity(spec.tunnels.len());
        let mut handover = Vec::with_capacity(spec.tunnels.len());
        let mut retired = Vec::new();
        for tunnel in &spec.tunnels {
            let same_name = old
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| s.spec.name == tunnel.name));
            match same_name.and_then(|i| old[i].take()) {
                Some(slot) if slot.spec == *tunnel => {
                    handover.push((slot.id, None));
                    plan.push(Plan::Keep(Box::new(slot)));
                }
                previous => {
                    match previous {
                        Some(previous) => {
                            changes.changed.push(qualified(&tunnel.name));
                            retired.push(previous);
                        }
                        None => changes.added.push(qualified(&tunnel.name)),
                    }
                    let id = next_slot_id();
                    let (wanted_tx, wanted_rx) = watch::channel(tunnel.standby == Standby::Hot);
                    handover.push((id, Some(wanted_tx)));
                    plan.push(Plan::Start(id, wanted_rx));
                }
            }
        }
        for slot in old.into_iter().flatten() {
            changes.removed.push(qualified(&slot.spec.name));
            retired.push(slot);
        }
        // The election switches to the new slots first, so the retired tunnels' last reports
        // (their `stopped`) are ignored rather than counted as failures. They are stopped
        // before their successors start: a restarted child may need the same port.
        let _ = self.commands.send(Command::Reconfigure {
            spec: Box::new(spec.clone()),
            slots: handover,
        });
        stop_slots(retired).await;
        self.slots = plan
            .into_iter()
            .zip(&spec.tunnels)
            .map(|(plan, tunnel)| match plan {
                Plan::Keep(slot) => *slot,
                Plan::Start(id, wanted) => {
                    self.tasks
                        .spawn_as(id, wanted, tunnel, provider_for(tunnel))
                }
            })
            .collect();
        self.routes
            .replace(self.slots.iter().map(|s| s.route.clone()).collect());

        if spec.hooks != self.spec.hooks {
            self.hooks.shutdown().await;
            self.hooks = crate::hooks::start(
                &spec.name,
                &spec.hooks,
                &self.tasks.bus,
                self.tasks.cancel.child_token(),
            );
        }
        // A listener is only rebound when its address moves, and even then the connections it
        // holds go on; any other setting applies to new connections. Tunnels come and go
        // without touching it (the default `retries` follows them at dial time).
        let old_spec = std::mem::replace(&mut self.spec, spec);
        let old_address = old_spec.listen.as_ref().map(|l| &l.address);
        match (self.listener.as_mut(), &self.spec.listen) {
            (Some(listener), Some(listen)) => {
                if old_address != Some(&listen.address) {
                    let acceptor = bound(acceptor, listen, &self.spec.name).await?;
                    listener.rebind(acceptor).await;
                }
                listener.update(&self.spec, listen);
            }
            (Some(_), None) => {
                // No new connections; the open ones go on until they end or the service stops.
                if let Some(mut listener) = self.listener.take() {
                    listener.retire().await;
                    self.retired.push(listener);
                }
            }
            (None, Some(listen)) => {
                let acceptor = bound(acceptor, listen, &self.spec.name).await?;
                self.listener = Some(Listener::start(
                    acceptor,
                    &self.spec,
                    listen,
                    self.routes.clone(),
                ));
            }
            (None, None) => {}
        }
        drop(old_spec);
        Ok(changes)
    }

    /// Stops the listener (and any a reload removed): no new connections; open ones may
    /// finish for up to `grace`.
    pub async fn drain(&mut self, grace: Duration) {
        let listeners = self
            .listener
            .take()
            .into_iter()
            .chain(self.retired.drain(..));
        futures_util::future::join_all(listeners.map(|l| l.stop(grace))).await;
    }

    /// Stops every tunnel (each bounded by its provider's grace) and the election loop.
    pub async fn stop(mut self) {
        self.drain(Duration::ZERO).await;
        self.tasks.cancel.cancel();
        stop_slots(std::mem::take(&mut self.slots)).await;
        drop(self.commands);
        let _ = self.election.await;
        // A hook still running is killed (its process group) as its task is dropped.
        let mut hooks = self.hooks;
        hooks.shutdown().await;
    }
}

/// The acceptor the daemon bound for a listener's new address, or one bound here (an address
/// another listener of this daemon held until now).
async fn bound(
    acceptor: Option<Acceptor>,
    listen: &crate::config::spec::ListenSpec,
    service: &str,
) -> anyhow::Result<Acceptor> {
    match acceptor {
        Some(a) => Ok(a),
        None => Acceptor::bind(&listen.address)
            .await
            .map_err(|e| anyhow::anyhow!("service `{service}`: {e:#}")),
    }
}

/// Cancels tunnel tasks and waits until each has stopped its tunnel.
async fn stop_slots(slots: Vec<Slot>) {
    for slot in &slots {
        slot.cancel.cancel();
    }
    futures_util::future::join_all(slots.into_iter().map(|s| s.task)).await;
}

fn initial_status(spec: &ServiceSpec) -> ServiceStatus {
    let now = status::rfc3339(SystemTime::now());
    ServiceStatus {
        name: spec.name.clone(),
        primary: None,
        degraded: false,
        starting: true,
        reason: "starting".into(),
        pin: None,
        mode: match spec.policy.mode {
            Mode::Priority => "priority".into(),
            Mode::Latency => "latency".into(),
        },
        tunnels: spec
            .tunnels
            .iter()
            .map(|t| TunnelStatus {
                name: t.name.clone(),
                provider: format!("{:?}", t.provider.kind()).to_lowercase(),
                priority: t.priority,
                state: TunnelState::Starting,
                reason: None,
                endpoint: None,
                latency_ms: None,
                pid: None,
                restarts: 0,
                since: now.clone(),
                hold_ms: t_hold_ms(spec.policy.failback_hold),
                via_router: t.via_router.clone(),
            })
            .collect(),
        listener: None,
    }
}

fn t_hold_ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The election loop's state.
struct Election {
    spec: ServiceSpec,
    /// Per tunnel (in `spec.tunnels` order): the id of the task that reports for it.
    slots: Vec<SlotId>,
    bus: Arc<Bus>,
    status: SharedStatus,
    primary_tx: watch::Sender<Primary>,
    contenders: Vec<Contender>,
    dampening: Vec<Dampening>,
    current: Option<String>,
    degraded: bool,
    pin: Option<String>,
    /// A pin was just removed: the next change of primary is reported as `unpinned`.
    unpinned: bool,
    recheck_at: Option<Instant>,
    /// Once cancelled, tunnels stopping is not news: no more elections or events.
    stopping: CancellationToken,
    /// Per tunnel: whether it should run (flipped for `standby: cold` only).
    wanted: Vec<watch::Sender<bool>>,
    /// Per tunnel: started or starting (not parked in standby, not stopped).
    running: Vec<bool>,
    /// When the service started (cold standby's start-up grace).
    started: Instant,
    /// Per tunnel: what it has said so far, for the first election.
    verdicts: Vec<FirstVerdict>,
    /// Per tunnel: failed probes in a row before its first verdict (`fall` of them is one).
    early_failures: Vec<u32>,
    /// Until the first election: the latest instant it may wait for (`failover.settle`).
    settling: Option<Instant>,
}

/// A contender that has not reported yet.
fn new_contender(tunnel: &TunnelSpec, hold: Duration) -> Contender {
    Contender {
        name: tunnel.name.clone(),
        priority: tunnel.priority,
        up: false,
        latency: None,
        up_since: None,
        hold,
        last_down: None,
        last_down_hard: false,
        first_up: true,
    }
}

impl Election {
    fn new(
        spec: &ServiceSpec,
        slots: Vec<SlotId>,
        bus: Arc<Bus>,
        status: SharedStatus,
        primary_tx: watch::Sender<Primary>,
        stopping: CancellationToken,
        wanted: Vec<watch::Sender<bool>>,
    ) -> Election {
        let contenders = spec
            .tunnels
            .iter()
            .map(|t| new_contender(t, spec.policy.failback_hold))
            .collect();
        Election {
            spec: spec.clone(),
            slots,
            bus,
            status,
            primary_tx,
            contenders,
            dampening: vec![Dampening::default(); spec.tunnels.len()],
            current: None,
            degraded: false,
            pin: None,
            unpinned: false,
            recheck_at: None,
            stopping,
            running: vec![false; spec.tunnels.len()],
            wanted,
            started: Instant::now(),
            verdicts: vec![FirstVerdict::Pending; spec.tunnels.len()],
            early_failures: vec![0; spec.tunnels.len()],
            settling: Some(Instant::now() + spec.settle),
        }
    }

    /// Runs until the service drops its command sender (it has stopped every tunnel).
    async fn run(
        mut self,
        mut reports: mpsc::UnboundedReceiver<TaggedReport>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        loop {
            let recheck = self.recheck_at;
            tokio::select! {
                Some((slot, report)) = reports.recv() => {
                    self.apply(slot, report);
                    // Fold every report already queued before electing once: a burst (many
                    // tunnels dying together) must yield one decision, not a cascade. A
                    // tunnel coming up is an election boundary, though, so that a death
                    // followed by a return in the same burst is still seen as a failure.
                    while let Ok((slot, report)) = reports.try_recv() {
                        if matches!(report, Report::Probe { transition: Some(Transition::Up), .. }) {
                            self.elect();
                        }
                        self.apply(slot, report);
                    }
                    self.elect();
                }
                command = commands.recv() => match command {
                    Some(Command::Pin(pin, done)) => {
                        self.unpinned = pin.is_none() && self.pin.is_some();
                        self.pin = pin;
                        self.elect();
                        let _ = done.send(());
                    }
                    Some(Command::Reconfigure { spec, slots }) => {
                        self.reconfigure(*spec, slots);
                        self.elect();
                    }
                    None => break,
                },
                _ = sleep_until(recheck) => self.elect(),
            }
        }
    }

    /// Takes a reloaded spec: kept tunnels carry their state (health, latency, dampening,
    /// status entry) to their new position; new ones start from scratch.
    fn reconfigure(
        &mut self,
        spec: ServiceSpec,
        slots: Vec<(SlotId, Option<watch::Sender<bool>>)>,
    ) {
        let hold = spec.policy.failback_hold;
        let mut contenders = Vec::with_capacity(slots.len());
        let mut dampening = Vec::with_capacity(slots.len());
        let mut running = Vec::with_capacity(slots.len());
        let mut wanted = Vec::with_capacity(slots.len());
        let mut verdicts = Vec::with_capacity(slots.len());
        let mut early_failures = Vec::with_capacity(slots.len());
        let mut ids = Vec::with_capacity(slots.len());
        let fresh = initial_status(&spec);
        let mut board = self.status.write().unwrap_or_else(|p| p.into_inner());
        let mut tunnels = Vec::with_capacity(slots.len());
        for ((id, switch), (tunnel, fresh)) in slots
            .into_iter()
            .zip(spec.tunnels.iter().zip(fresh.tunnels))
        {
            let kept = match switch {
                None => self.slots.iter().position(|s| *s == id),
                Some(_) => None,
            };
            match (kept, switch) {
                (Some(i), _) => {
                    contenders.push(self.contenders[i].clone());
                    dampening.push(self.dampening[i].clone());
                    running.push(self.running[i]);
                    wanted.push(self.wanted[i].clone());
                    verdicts.push(self.verdicts[i]);
                    early_failures.push(self.early_failures[i]);
                    tunnels.push(board.tunnels[i].clone());
                }
                (None, switch) => {
                    contenders.push(new_contender(tunnel, hold));
                    dampening.push(Dampening::default());
                    running.push(false);
                    wanted.push(switch.unwrap_or_else(|| watch::channel(true).0));
                    verdicts.push(FirstVerdict::Pending);
                    early_failures.push(0);
                    tunnels.push(fresh);
                }
            }
            ids.push(id);
        }
        board.tunnels = tunnels;
        board.mode = fresh.mode;
        drop(board);
        if let Some(pin) = &self.pin {
            if !spec.tunnels.iter().any(|t| &t.name == pin) {
                self.pin = None;
                self.unpinned = true;
            }
        }
        self.contenders = contenders;
        self.dampening = dampening;
        self.running = running;
        self.wanted = wanted;
        self.verdicts = verdicts;
        self.early_failures = early_failures;
        self.slots = ids;
        self.spec = spec;
    }

    fn apply(&mut self, slot: SlotId, report: Report) {
        // A tunnel retired by a reload may still report while it stops.
        let Some(index) = self.slots.iter().position(|s| *s == slot) else {
            return;
        };
        let now = Instant::now();
        let base_hold = self.spec.policy.failback_hold;
        let Some(contender) = self.contenders.get_mut(index) else {
            return;
        };
        let dampening = &mut self.dampening[index];
        let fall = self
            .spec
            .tunnels
            .get(index)
            .map_or(1, |t| t.probe.fall.max(1));
        if let (Some(verdict), Some(failures)) = (
            self.verdicts.get_mut(index),
            self.early_failures.get_mut(index),
        ) {
            *verdict = first_verdict(*verdict, failures, &report, fall);
        }
        let was_up = contender.up;
        let mut board = self.status.write().unwrap_or_else(|p| p.into_inner());
        let Some(t) = board.tunnels.get_mut(index) else {
            return;
        };
        let set_state = |t: &mut TunnelStatus, state: TunnelState| {
            if t.state != state {
                t.state = state;
                t.since = status::rfc3339(SystemTime::now());
            }
        };
        if let Some(running) = self.running.get_mut(index) {
            *running = !matches!(report, Report::Standby | Report::Stopped);
        }
        match report {
            Report::Starting => set_state(t, TunnelState::Starting),
            Report::Standby => {
                contender.up = false;
                contender.up_since = None;
                contender.latency = None;
                t.latency_ms = None;
                t.pid = None;
                t.reason = Some("cold standby: not needed while a better tunnel is up".into());
                set_state(t, TunnelState::Standby);
            }
            Report::Started { endpoint, pid } => {
                t.endpoint = Some(endpoint);
                t.pid = pid;
                set_state(t, TunnelState::Probing);
            }
            Report::Probe {
                latency,
                error,
                transition,
            } => {
                contender.latency = latency;
                t.latency_ms = latency.map(|d| d.as_secs_f64() * 1000.0);
                match transition {
                    Some(Transition::Up) => {
                        contender.up = true;
                        contender.up_since = Some(now);
                        t.reason = None;
                        set_state(t, TunnelState::Up);
                    }
                    Some(Transition::Down) => {
                        let reason = format!(
                            "probe: {} consecutive failures, last: {}",
                            self.spec
                                .tunnels
                                .get(index)
                                .map(|s| s.probe.fall)
                                .unwrap_or_default(),
                            error.as_deref().unwrap_or("?")
                        );
                        mark_down(contender, dampening, now, reason.clone(), false);
                        t.reason = Some(reason);
                        set_state(t, TunnelState::Down);
                    }
                    None => {
                        if let Some(e) = error {
                            t.reason = Some(e);
                        }
                    }
                }
            }
            Report::Died { reason } => {
                mark_down(contender, dampening, now, reason.clone(), true);
                contender.latency = None;
                t.latency_ms = None;
                t.pid = None;
                t.reason = Some(reason);
                set_state(t, TunnelState::Down);
            }
            Report::Restarting { .. } => {
                t.restarts += 1;
                set_state(t, TunnelState::Restarting);
            }
            Report::Stopped => {
                contender.up = false;
                contender.up_since = None;
                t.pid = None;
                set_state(t, TunnelState::Stopped);
            }
        }
        if was_up && !contender.up {
            // Whatever comes next is a return, not a first up.
            contender.first_up = false;
        }
        contender.hold = dampening.hold(base_hold, now);
        t.hold_ms = t_hold_ms(contender.hold);
    }

    fn elect(&mut self) {
        if self.stopping.is_cancelled() {
            return;
        }
        let now = Instant::now();
        for (c, d) in self.contenders.iter_mut().zip(&self.dampening) {
            c.hold = d.hold(self.spec.policy.failback_hold, now);
        }
        // A cold tunnel's fate can change when a hold or its start-up grace runs out, and a
        // dampened hold shrinks when old failures leave the window: wake for those too.
        let mut wakes: Vec<Instant> = self
            .dampening
            .iter()
            .filter_map(|d| d.next_expiry(now))
            .collect();
        for (i, spec) in self.spec.tunnels.iter().enumerate() {
            if spec.standby != Standby::Cold {
                continue;
            }
            let (want, recheck) =
                standby::wanted(&self.contenders, i, self.running[i], self.started, now);
            wakes.extend(recheck);
            self.wanted[i].send_if_modified(|w| std::mem::replace(w, want) != want);
        }
        if let Some(deadline) = self.settling {
            let pin = self.pin.as_deref();
            match election::settle(&self.contenders, &self.verdicts, pin, deadline, now) {
                Settle::Until(at) => {
                    let mut board = self.status.write().unwrap_or_else(|p| p.into_inner());
                    board.pin = self.pin.clone();
                    drop(board);
                    wakes.push(at);
                    self.recheck_at = wakes.into_iter().min();
                    return;
                }
                Settle::Done => {
                    self.settling = None;
                    let mut board = self.status.write().unwrap_or_else(|p| p.into_inner());
                    board.starting = false;
                }
            }
        }
        let decision: Decision = election::elect(&Input {
            contenders: &self.contenders,
            policy: &self.spec.policy,
            current: self.current.as_deref(),
            pin: self.pin.as_deref(),
            now,
        });
        wakes.extend(decision.recheck_at);
        self.recheck_at = wakes.into_iter().min();
        let previous = self.current.clone();
        let was_degraded = self.degraded;
        let mut reason = decision.reason.to_string();
        if std::mem::take(&mut self.unpinned) && decision.primary != previous {
            reason = Reason::Unpinned.to_string();
        }
        let changed = decision.primary != previous || decision.degraded != was_degraded;
        self.current = decision.primary.clone();
        self.degraded = decision.degraded;
        // Status and the primary watch are updated before the events go out, so that anyone
        // reacting to an event (systemd STATUS=, a hook querying the API) sees the new state.
        {
            let mut board = self.status.write().unwrap_or_else(|p| p.into_inner());
            board.primary = self.current.clone();
            board.degraded = self.degraded;
            board.pin = self.pin.clone();
            if changed || board.reason == "starting" {
                board.reason = reason.clone();
            }
        }
        let order =
            election::dial_order(&self.contenders, &self.spec.policy, self.current.as_deref());
        let routing = Primary {
            tunnel: self.current.clone(),
            degraded: self.degraded,
            order,
        };
        self.primary_tx.send_if_modified(|p| {
            let modified = *p != routing;
            *p = routing;
            modified
        });
        if decision.primary != previous {
            self.bus.publish(EventKind::PrimaryChanged {
                service: self.spec.name.clone(),
                from: previous,
                to: decision.primary.clone(),
                reason,
            });
        }
        if decision.degraded && !was_degraded && self.any_started() {
            self.bus.publish(EventKind::NoHealthyTunnel {
                service: self.spec.name.clone(),
                fallback: decision.primary.clone(),
            });
        }
    }

    /// Until some tunnel has been up once, "no healthy tunnel" is just start-up, not news.
    fn any_started(&self) -> bool {
        self.current.is_some() || self.contenders.iter().any(|c| c.last_down.is_some())
    }
}

/// Folds one report into a tunnel's first verdict (see [`election::settle`]). `failures`
/// counts failed probes in a row before the first verdict; `fall` of them say "not up".
fn first_verdict(
    verdict: FirstVerdict,
    failures: &mut u32,
    report: &Report,
    fall: u32,
) -> FirstVerdict {
    if verdict != FirstVerdict::Pending {
        return verdict;
    }
    match report {
        Report::Probe {
            transition: Some(Transition::Up),
            ..
        } => FirstVerdict::Up,
        Report::Probe {
            transition: Some(Transition::Down),
            ..
        } => FirstVerdict::NotUp,
        Report::Probe { error: Some(_), .. } => {
            *failures = failures.saturating_add(1);
            if *failures >= fall {
                FirstVerdict::NotUp
            } else {
                FirstVerdict::Pending
            }
        }
        Report::Probe { error: None, .. } => {
            *failures = 0;
            FirstVerdict::Pending
        }
        Report::Died { .. } | Report::Standby | Report::Stopped => FirstVerdict::NotUp,
        Report::Starting | Report::Started { .. } | Report::Restarting { .. } => {
            FirstVerdict::Pending
        }
    }
}

fn mark_down(
    contender: &mut Contender,
    dampening: &mut Dampening,
    now: Instant,
    reason: String,
    hard: bool,
) {
    if contender.up {
        dampening.record_down(now);
    }
    contender.up = false;
    contender.up_since = None;
    contender.last_down = Some(reason);
    contender.last_down_hard = hard;
}

/// Sleeps until `at`, or forever without one (a `select!` branch that may have no deadline).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The election loop on a paused clock: holds expire exactly on time because the loop
    //! sleeps until `recheck_at`, with no probe or report needed to wake it.
    use super::*;
    use crate::config::model::OnFailover;
    use crate::config::spec::{RestartSpec, TunnelSpec};
    use crate::election::{Failback, Policy};

    fn tunnel(name: &str, priority: i64) -> TunnelSpec {
        let restart = RestartSpec {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
            when_down: Duration::ZERO,
        };
        TunnelSpec::for_test(name, priority, restart)
    }

    struct Harness {
        reports: mpsc::UnboundedSender<TaggedReport>,
        commands: mpsc::UnboundedSender<Command>,
        primary: watch::Receiver<Primary>,
        events: crate::bus::Subscription,
        status: SharedStatus,
    }

    /// How long the harness's first election waits for first verdicts.
    const SETTLE: Duration = Duration::from_secs(4);

    /// Service `svc` in priority mode with a failback `hold`.
    fn service(hold: Duration, tunnels: Vec<TunnelSpec>) -> ServiceSpec {
        ServiceSpec {
            name: "svc".into(),
            policy: Policy {
                mode: Mode::Priority,
                tolerance: Duration::from_millis(50),
                max_latency: Duration::from_millis(500),
                failback: Failback::Auto,
                failback_hold: hold,
            },
            settle: SETTLE,
            connect_timeout: Duration::from_secs(1),
            on_failover: OnFailover::Keep,
            listen: None,
            hooks: vec![],
            tunnels,
        }
    }

    fn start(hold: Duration) -> Harness {
        let spec = service(hold, vec![tunnel("a", 10), tunnel("b", 20)]);
        let bus = Bus::new(64);
        let events = bus.subscribe();
        let status = Arc::new(RwLock::new(initial_status(&spec)));
        let board = status.clone();
        let (primary_tx, primary) = watch::channel(Primary::default());
        let (reports, rx) = mpsc::unbounded_channel();
        let wanted = spec
            .tunnels
            .iter()
            .map(|_| watch::channel(true).0)
            .collect();
        // In these tests a tunnel's slot id is its index.
        let election = Election::new(
            &spec,
            vec![0, 1],
            bus,
            status,
            primary_tx,
            CancellationToken::new(),
            wanted,
        );
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(election.run(rx, commands_rx));
        Harness {
            reports,
            commands,
            primary,
            events,
            status: board,
        }
    }

    impl Harness {
        fn up(&self, index: usize) {
            let probe = Report::Probe {
                latency: Some(Duration::from_millis(5)),
                error: None,
                transition: Some(Transition::Up),
            };
            self.reports.send((index as SlotId, probe)).unwrap();
        }

        fn fail(&self, index: usize) {
            let failed = Report::Probe {
                latency: None,
                error: Some("connection refused".into()),
                transition: None,
            };
            self.reports.send((index as SlotId, failed)).unwrap();
        }

        fn die(&self, index: usize) {
            let died = Report::Died {
                reason: "killed by signal 9 (SIGKILL)".into(),
            };
            self.reports.send((index as SlotId, died)).unwrap();
        }

        async fn pin(&self, tunnel: Option<&str>) {
            let (done, elected) = oneshot::channel();
            self.commands
                .send(Command::Pin(tunnel.map(str::to_owned), done))
                .unwrap();
            elected.await.unwrap();
        }

        /// Lets the loop run without letting time pass.
        async fn settle(&self) {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }

        fn primary(&self) -> Option<String> {
            self.primary.borrow().tunnel.clone()
        }

        fn reasons(&mut self) -> Vec<String> {
            let mut out = vec![];
            while let Some(Some(crate::bus::Delivery::Event(e))) =
                futures_util::FutureExt::now_or_never(self.events.next())
            {
                if let EventKind::PrimaryChanged { reason, .. } = &e.kind {
                    out.push(reason.clone());
                }
            }
            out
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failback_happens_exactly_when_the_hold_expires() {
        let hold = Duration::from_secs(30);
        let mut h = start(hold);
        h.up(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        h.die(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        // a comes back: b is healthy, so a returning tunnel must wait out the hold.
        h.up(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        tokio::time::advance(hold - Duration::from_millis(1)).await;
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "failback before the hold"
        );
        tokio::time::advance(Duration::from_millis(2)).await;
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"), "no failback at the hold");
        let reasons = h.reasons();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert_eq!(reasons[0], "initial");
        assert_eq!(reasons[2], "failback");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_election_waits_for_every_first_verdict_and_elects_the_best_once() {
        let mut h = start(Duration::from_secs(30));
        // b passes its probes first: no election while a has said nothing.
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary(), None, "elected before every tunnel spoke");
        {
            let status = status::read(&h.status);
            assert!(status.starting && !status.degraded, "{status:?}");
            assert_eq!(status.reason, "starting");
            assert_eq!(status.summary(), "svc: starting, 1/2 up");
        }
        tokio::time::advance(Duration::from_millis(300)).await;
        h.up(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        assert_eq!(h.reasons(), ["initial"], "exactly one primary_changed");
        let status = status::read(&h.status);
        assert!(!status.starting && !status.degraded, "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_election_runs_at_the_settle_deadline_and_a_late_first_up_wins_at_once() {
        let mut h = start(Duration::from_secs(30));
        h.up(1);
        h.settle().await;
        tokio::time::advance(SETTLE - Duration::from_millis(1)).await;
        h.settle().await;
        assert_eq!(h.primary(), None, "elected before the settle time");
        tokio::time::advance(Duration::from_millis(1)).await;
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "no election at the deadline"
        );
        // a's first up is not a failback: no hold.
        h.up(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        assert_eq!(h.reasons(), ["initial", "better"]);
    }

    #[tokio::test(start_paused = true)]
    async fn fall_failures_or_a_death_are_a_first_verdict() {
        let mut h = start(Duration::from_secs(30));
        h.up(1);
        // a fails its first probe (fall: 1 in this harness): its verdict is in.
        h.fail(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        assert_eq!(h.reasons(), ["initial"]);

        let mut h = start(Duration::from_secs(30));
        h.die(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        assert_eq!(h.reasons(), ["initial"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_up_pinned_tunnel_ends_the_wait() {
        let mut h = start(Duration::from_secs(30));
        h.pin(Some("b")).await;
        assert_eq!(h.primary(), None, "the pinned tunnel is not up yet");
        assert_eq!(status::read(&h.status).pin.as_deref(), Some("b"));
        h.up(1);
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "a pinned tunnel that is up"
        );
        h.up(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"), "the pin holds");
        let reasons = h.reasons();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn hard_failure_fails_over_at_once_and_a_flapping_tunnel_waits_longer() {
        let hold = Duration::from_secs(10);
        let mut h = start(hold);
        h.up(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        h.die(0);
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "a hard failure needs no time"
        );
        // First return: the base hold.
        h.up(0);
        h.settle().await;
        tokio::time::advance(hold + Duration::from_millis(1)).await;
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        // It dies again: the hold doubles.
        h.die(0);
        h.up(0);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        tokio::time::advance(hold + Duration::from_millis(1)).await;
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "dampening must grow the hold"
        );
        tokio::time::advance(hold).await;
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        let reasons = h.reasons();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert!(
            reasons[1].starts_with("primary_down (hard: killed by signal 9"),
            "{reasons:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn losing_every_tunnel_reports_no_healthy_tunnel_once_and_keeps_the_fallback() {
        let mut h = start(Duration::from_secs(1));
        h.up(0);
        h.up(1);
        h.settle().await;
        h.die(0);
        h.die(1);
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("a"),
            "last primary kept as fallback"
        );
        assert!(h.primary.borrow().degraded);
        let mut no_healthy = 0;
        while let Some(Some(crate::bus::Delivery::Event(e))) =
            futures_util::FutureExt::now_or_never(h.events.next())
        {
            if let EventKind::NoHealthyTunnel { fallback, .. } = &e.kind {
                assert_eq!(fallback.as_deref(), Some("a"));
                no_healthy += 1;
            }
        }
        assert_eq!(no_healthy, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pin_wins_while_its_tunnel_is_up_and_its_removal_is_reported_as_unpinned() {
        let hold = Duration::from_secs(30);
        let mut h = start(hold);
        h.up(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        h.pin(Some("b")).await;
        assert_eq!(h.primary().as_deref(), Some("b"), "the pin beats priority");
        // A pinned tunnel that dies is not kept: traffic must flow.
        h.die(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        h.up(1);
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "the pin applies again, no hold"
        );
        tokio::time::advance(hold + Duration::from_secs(1)).await;
        h.pin(None).await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        assert_eq!(
            h.reasons(),
            [
                "initial",
                "pinned",
                "primary_down (hard: killed by signal 9 (SIGKILL))",
                "pinned",
                "unpinned"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconfigure_keeps_the_state_of_unchanged_tunnels_and_ignores_retired_ones() {
        let h = start(Duration::from_secs(30));
        h.up(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        // b is replaced by c (slot 7); a keeps its slot and its health.
        let mut spec = service(
            Duration::from_secs(30),
            vec![tunnel("a", 10), tunnel("c", 5)],
        );
        h.commands
            .send(Command::Reconfigure {
                spec: Box::new(spec.clone()),
                slots: vec![(0, None), (7, Some(watch::channel(true).0))],
            })
            .unwrap();
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"), "a kept its health");
        // The retired b's last words change nothing.
        h.die(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        h.reports
            .send((
                7,
                Report::Probe {
                    latency: Some(Duration::from_millis(1)),
                    error: None,
                    transition: Some(Transition::Up),
                },
            ))
            .unwrap();
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("c"),
            "a better tunnel's first up takes over at once"
        );
        spec.tunnels.truncate(1);
        h.commands
            .send(Command::Reconfigure {
                spec: Box::new(spec),
                slots: vec![(0, None)],
            })
            .unwrap();
        h.settle().await;
        assert_eq!(
            h.primary().as_deref(),
            Some("a"),
            "a removed primary is replaced at once"
        );
    }
}
