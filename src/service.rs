//! A service: its tunnels' tasks, its election loop, and its status.
//!
//! The service task is the only place where a primary is chosen. It folds the reports of its
//! tunnel tasks into [`Contender`]s, runs the pure [`election::elect`] after every change and
//! whenever a failback hold expires, publishes `primary_changed` / `no_healthy_tunnel`, and keeps
//! the shared [`ServiceStatus`] current. It never waits on a tunnel, a hook or a reader.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::{Provider, Resolver, StartContext, Tunnel};

use crate::bus::{Bus, EventKind};
use crate::config::model::Standby;
use crate::config::spec::ServiceSpec;
use crate::election::{self, Contender, Dampening, Decision, Input, Mode};
use crate::forward::{Acceptor, Listener, ListenerStats};
use crate::probe::Transition;
use crate::standby;
use crate::status::{self, ServiceStatus, SharedStatus, TunnelState, TunnelStatus};
use crate::supervisor::{LiveTunnel, Report, TaggedReport, TunnelTask};

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

/// What the data plane needs of a service: its tunnels as they run, where to report failures
/// that real traffic meets, and the current primary and dial order.
#[derive(Clone)]
pub struct Routes {
    /// Tunnel names in config order (indexes match `live` and `passive`).
    pub names: Vec<String>,
    /// Each tunnel's running instance, if started.
    pub live: Vec<LiveTunnel>,
    /// Each tunnel task's passive-failure inbox.
    pub passive: Vec<mpsc::UnboundedSender<String>>,
    /// Primary and dial order.
    pub primary: watch::Receiver<Primary>,
}

impl Routes {
    /// The index and running instance of the tunnel called `name`, if it is started.
    pub fn get(&self, name: &str) -> Option<(usize, Arc<dyn Tunnel>)> {
        let index = self.names.iter().position(|n| n == name)?;
        let tunnel = self.live[index]
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some((index, tunnel))
    }

    /// Reports a failure real traffic met on tunnel `index`; it counts like a failed probe.
    pub fn report_failure(&self, index: usize, reason: String) {
        if let Some(tx) = self.passive.get(index) {
            let _ = tx.send(reason);
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
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    hooks: JoinSet<()>,
    listener: Option<Listener>,
}

impl ServiceHandle {
    /// Starts the service's tunnels and its election loop.
    /// `acceptor` is the service's bound failover listener, if it has `listen:`.
    pub fn start(
        spec: ServiceSpec,
        providers: Vec<Arc<dyn Provider>>,
        acceptor: Option<Acceptor>,
        bus: Arc<Bus>,
        resolver: Resolver,
        parent: &CancellationToken,
    ) -> ServiceHandle {
        let cancel = parent.child_token();
        let status = Arc::new(RwLock::new(initial_status(&spec)));
        let (primary_tx, primary_rx) = watch::channel(Primary::default());
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let mut tunnels = JoinSet::new();
        let mut live = Vec::new();
        let mut passive = Vec::new();
        let mut wanted = Vec::new();
        for (index, (tunnel, provider)) in spec.tunnels.iter().zip(providers).enumerate() {
            let slot = LiveTunnel::default();
            let (passive_tx, passive_rx) = mpsc::unbounded_channel();
            // Hot tunnels run at once; cold ones wait for the election loop to wake them.
            let (wanted_tx, wanted_rx) = watch::channel(tunnel.standby == Standby::Hot);
            wanted.push(wanted_tx);
            live.push(slot.clone());
            passive.push(passive_tx);
            let task = TunnelTask {
                index,
                service: spec.name.clone(),
                spec: tunnel.clone(),
                provider,
                ctx: StartContext {
                    tunnel: tunnel.name.clone(),
                    service: spec.name.clone(),
                    resolver: resolver.clone(),
                },
                bus: bus.clone(),
                reports: reports_tx.clone(),
                cancel: cancel.child_token(),
                live: slot,
                wanted: wanted_rx,
            };
            tunnels.spawn(task.run(passive_rx));
        }
        let routes = Routes {
            names: spec.tunnels.iter().map(|t| t.name.clone()).collect(),
            live,
            passive,
            primary: primary_rx.clone(),
        };
        drop(reports_tx);
        let hooks = crate::hooks::start(&spec.name, &spec.hooks, &bus, cancel.child_token());
        let listener = match (acceptor, &spec.listen) {
            (Some(acceptor), Some(listen)) => {
                Some(Listener::start(acceptor, &spec, listen, routes.clone()))
            }
            _ => None,
        };
        let election = Election::new(
            &spec,
            bus,
            status.clone(),
            primary_tx,
            cancel.clone(),
            wanted,
        );
        let task = tokio::spawn(election.run(reports_rx, tunnels));
        ServiceHandle {
            spec,
            status,
            primary: primary_rx,
            routes,
            cancel,
            task,
            hooks,
            listener,
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

    /// Stops the listener: no new connections; open ones may finish for up to `grace`.
    pub async fn drain(&mut self, grace: Duration) {
        if let Some(listener) = self.listener.take() {
            listener.stop(grace).await;
        }
    }

    /// Stops every tunnel (each bounded by its provider's grace) and the election loop.
    pub async fn stop(mut self) {
        self.drain(Duration::ZERO).await;
        self.cancel.cancel();
        let _ = self.task.await;
        // A hook still running is killed (its process group) as its task is dropped.
        let mut hooks = self.hooks;
        hooks.shutdown().await;
    }
}

fn initial_status(spec: &ServiceSpec) -> ServiceStatus {
    let now = status::rfc3339(SystemTime::now());
    ServiceStatus {
        name: spec.name.clone(),
        primary: None,
        degraded: true,
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
    bus: Arc<Bus>,
    status: SharedStatus,
    primary_tx: watch::Sender<Primary>,
    contenders: Vec<Contender>,
    dampening: Vec<Dampening>,
    current: Option<String>,
    degraded: bool,
    pin: Option<String>,
    recheck_at: Option<Instant>,
    /// Once cancelled, tunnels stopping is not news: no more elections or events.
    stopping: CancellationToken,
    /// Per tunnel: whether it should run (flipped for `standby: cold` only).
    wanted: Vec<watch::Sender<bool>>,
    /// Per tunnel: started or starting (not parked in standby, not stopped).
    running: Vec<bool>,
    /// When the service started (cold standby's start-up grace).
    started: Instant,
}

impl Election {
    fn new(
        spec: &ServiceSpec,
        bus: Arc<Bus>,
        status: SharedStatus,
        primary_tx: watch::Sender<Primary>,
        stopping: CancellationToken,
        wanted: Vec<watch::Sender<bool>>,
    ) -> Election {
        let contenders = spec
            .tunnels
            .iter()
            .map(|t| Contender {
                name: t.name.clone(),
                priority: t.priority,
                up: false,
                latency: None,
                up_since: None,
                hold: spec.policy.failback_hold,
                last_down: None,
                last_down_hard: false,
            })
            .collect();
        Election {
            spec: spec.clone(),
            bus,
            status,
            primary_tx,
            contenders,
            dampening: vec![Dampening::default(); spec.tunnels.len()],
            current: None,
            degraded: false,
            pin: None,
            recheck_at: None,
            stopping,
            running: vec![false; spec.tunnels.len()],
            wanted,
            started: Instant::now(),
        }
    }

    async fn run(
        mut self,
        mut reports: mpsc::UnboundedReceiver<TaggedReport>,
        mut tunnels: JoinSet<()>,
    ) {
        loop {
            let recheck = self.recheck_at;
            tokio::select! {
                report = reports.recv() => match report {
                    Some((index, report)) => {
                        self.apply(index, report);
                        // Fold every report already queued before electing once: a burst (many
                        // tunnels dying together) must yield one decision, not a cascade. A
                        // tunnel coming up is an election boundary, though, so that a death
                        // followed by a return in the same burst is still seen as a failure.
                        while let Ok((index, report)) = reports.try_recv() {
                            if matches!(report, Report::Probe { transition: Some(Transition::Up), .. }) {
                                self.elect();
                            }
                            self.apply(index, report);
                        }
                        self.elect();
                    }
                    // Every tunnel task has ended: the service was stopped.
                    None => break,
                },
                _ = sleep_until(recheck) => self.elect(),
            }
        }
        while tunnels.join_next().await.is_some() {}
    }

    fn apply(&mut self, index: usize, report: Report) {
        let now = Instant::now();
        let base_hold = self.spec.policy.failback_hold;
        let Some(contender) = self.contenders.get_mut(index) else {
            return;
        };
        let dampening = &mut self.dampening[index];
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
        let decision: Decision = election::elect(&Input {
            contenders: &self.contenders,
            policy: &self.spec.policy,
            current: self.current.as_deref(),
            pin: self.pin.as_deref(),
            now,
        });
        // A dampened hold also shrinks when old failures leave the window, and a cold tunnel's
        // fate can change when a hold or its start-up grace runs out: wake for those too.
        let mut wakes: Vec<Instant> = decision.recheck_at.into_iter().collect();
        wakes.extend(self.dampening.iter().filter_map(|d| d.next_expiry(now)));
        for (i, spec) in self.spec.tunnels.iter().enumerate() {
            if spec.standby != Standby::Cold {
                continue;
            }
            let (want, recheck) =
                standby::wanted(&self.contenders, i, self.running[i], self.started, now);
            wakes.extend(recheck);
            self.wanted[i].send_if_modified(|w| std::mem::replace(w, want) != want);
        }
        self.recheck_at = wakes.into_iter().min();
        let previous = self.current.clone();
        let was_degraded = self.degraded;
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
                board.reason = decision.reason.to_string();
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
                reason: decision.reason.to_string(),
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

async fn sleep_until(at: Option<Instant>) {
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
        };
        TunnelSpec::for_test(name, priority, restart)
    }

    struct Harness {
        reports: mpsc::UnboundedSender<TaggedReport>,
        primary: watch::Receiver<Primary>,
        events: crate::bus::Subscription,
    }

    fn start(hold: Duration) -> Harness {
        let spec = ServiceSpec {
            name: "svc".into(),
            policy: Policy {
                mode: Mode::Priority,
                tolerance: Duration::from_millis(50),
                max_latency: Duration::from_millis(500),
                failback: Failback::Auto,
                failback_hold: hold,
            },
            connect_timeout: Duration::from_secs(1),
            on_failover: OnFailover::Keep,
            listen: None,
            hooks: vec![],
            tunnels: vec![tunnel("a", 10), tunnel("b", 20)],
        };
        let bus = Bus::new(64);
        let events = bus.subscribe();
        let status = Arc::new(RwLock::new(initial_status(&spec)));
        let (primary_tx, primary) = watch::channel(Primary::default());
        let (reports, rx) = mpsc::unbounded_channel();
        let wanted = spec
            .tunnels
            .iter()
            .map(|_| watch::channel(true).0)
            .collect();
        let election = Election::new(
            &spec,
            bus,
            status,
            primary_tx,
            CancellationToken::new(),
            wanted,
        );
        tokio::spawn(election.run(rx, JoinSet::new()));
        Harness {
            reports,
            primary,
            events,
        }
    }

    impl Harness {
        fn up(&self, index: usize) {
            let probe = Report::Probe {
                latency: Some(Duration::from_millis(5)),
                error: None,
                transition: Some(Transition::Up),
            };
            self.reports.send((index, probe)).unwrap();
        }

        fn die(&self, index: usize) {
            let died = Report::Died {
                reason: "killed by signal 9 (SIGKILL)".into(),
            };
            self.reports.send((index, died)).unwrap();
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
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        // a comes up later: b is healthy, so a must wait out the hold.
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
        assert_eq!(h.reasons(), ["initial", "failback"]);
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
}
