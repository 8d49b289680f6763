//! The election loop of one service: the only place where its primary is chosen.
//!
//! The [`Elector`] keeps one [`TunnelEntry`] per tunnel, folds its tasks' reports into them,
//! runs the pure [`election::elect`] after every change and whenever a hold expires, publishes
//! `primary_changed` / `no_healthy_tunnel`, and derives the service's status board from its
//! entries. It never waits on a tunnel, a hook or a reader.

use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::entry::TunnelEntry;
use crate::bus::{Bus, EventKind};
use crate::config::spec::ServiceSpec;
use crate::election::{self, Contender, Decision, FirstVerdict, Input, Mode, Reason, Settle};
use crate::probe::Transition;
use crate::routes::Primary;
use crate::standby;
use crate::status::{ServiceStatus, SharedStatus};
use crate::supervisor::{sleep_until, Report, SlotId, TaggedReport};

/// A request to the election loop.
pub(super) enum Command {
    /// Pin the primary to a tunnel, or unpin (None). Answered once the election ran.
    Pin(Option<String>, oneshot::Sender<()>),
    /// Drain (true) or undrain (false) a tunnel. Answered once the election ran.
    Drain(String, bool, oneshot::Sender<()>),
    /// Take a (re)configured spec. `slots` follows `spec.tunnels`: a kept tunnel's id, or a
    /// new task's id with its standby switch (a new tunnel, or a restarted one).
    Reconfigure {
        spec: Box<ServiceSpec>,
        slots: Vec<(SlotId, Option<watch::Sender<bool>>)>,
    },
}

/// The election loop's state.
pub(super) struct Elector {
    spec: ServiceSpec,
    /// One per tunnel, in `spec.tunnels` order.
    tunnels: Vec<TunnelEntry>,
    bus: Arc<Bus>,
    board: SharedStatus,
    primary_tx: watch::Sender<Primary>,
    current: Option<String>,
    degraded: bool,
    /// Why the primary is what it is (the status's `reason`).
    reason: String,
    pin: Option<String>,
    /// A pin was just removed: the next change of primary is reported as `unpinned`.
    unpinned: bool,
    recheck_at: Option<Instant>,
    /// Once cancelled, tunnels stopping is not news: no more elections or events.
    stopping: CancellationToken,
    /// When the service started (cold standby's start-up grace).
    started: Instant,
    /// Until the first election: the latest instant it may wait for (`failover.settle`).
    settling: Option<Instant>,
}

impl Elector {
    /// The loop of `spec`, whose tunnels' tasks report as `slots` (in `spec.tunnels` order)
    /// and run while their `wanted` switch is on.
    pub fn new(
        spec: &ServiceSpec,
        slots: Vec<(SlotId, watch::Sender<bool>)>,
        bus: Arc<Bus>,
        board: SharedStatus,
        primary_tx: watch::Sender<Primary>,
        stopping: CancellationToken,
    ) -> Elector {
        let hold = spec.policy.failback_hold;
        let tunnels = spec
            .tunnels
            .iter()
            .zip(slots)
            .map(|(t, (slot, wanted))| TunnelEntry::new(slot, t, hold, wanted))
            .collect();
        let elector = Elector {
            spec: spec.clone(),
            tunnels,
            bus,
            board,
            primary_tx,
            current: None,
            degraded: false,
            reason: "starting".into(),
            pin: None,
            unpinned: false,
            recheck_at: None,
            stopping,
            started: Instant::now(),
            settling: Some(Instant::now() + spec.settle),
        };
        elector.publish();
        elector
    }

    /// The status of a service that has just started (what [`Elector::new`] publishes).
    pub fn initial_status(spec: &ServiceSpec) -> ServiceStatus {
        let hold = spec.policy.failback_hold;
        ServiceStatus {
            name: spec.name.clone(),
            primary: None,
            degraded: false,
            starting: true,
            reason: "starting".into(),
            pin: None,
            mode: mode_name(spec.policy.mode),
            tunnels: spec
                .tunnels
                .iter()
                .map(|t| super::entry::initial_status(t, hold))
                .collect(),
            listener: None,
        }
    }

    /// Runs until the service drops its command sender (it has stopped every tunnel).
    pub async fn run(
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
                    Some(Command::Drain(name, drained, done)) => {
                        if let Some(entry) = self.tunnels.iter_mut().find(|e| e.spec.name == name) {
                            entry.set_drained(drained);
                        }
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
            // Once stopping, no election runs, but the board still shows tunnels stopping.
            self.publish();
        }
    }

    /// Takes a new spec: kept tunnels carry their entry (health, latency, dampening, status);
    /// new and restarted ones start from scratch. Drains follow the tunnel's name.
    fn reconfigure(
        &mut self,
        spec: ServiceSpec,
        slots: Vec<(SlotId, Option<watch::Sender<bool>>)>,
    ) {
        let hold = spec.policy.failback_hold;
        let mut old: Vec<Option<TunnelEntry>> = std::mem::take(&mut self.tunnels)
            .into_iter()
            .map(Some)
            .collect();
        let drained: Vec<String> = old
            .iter()
            .flatten()
            .filter(|e| e.drained)
            .map(|e| e.spec.name.clone())
            .collect();
        for ((id, switch), tunnel) in slots.into_iter().zip(&spec.tunnels) {
            let kept = match switch {
                None => old
                    .iter()
                    .position(|e| e.as_ref().is_some_and(|e| e.slot == id))
                    .and_then(|i| old[i].take()),
                Some(_) => None,
            };
            let entry = match kept {
                Some(mut entry) => {
                    entry.spec = tunnel.clone();
                    entry
                }
                None => {
                    let switch = switch.unwrap_or_else(|| watch::channel(true).0);
                    let mut entry = TunnelEntry::new(id, tunnel, hold, switch);
                    entry.set_drained(drained.contains(&tunnel.name));
                    entry
                }
            };
            self.tunnels.push(entry);
        }
        if let Some(pin) = &self.pin {
            if !spec.tunnels.iter().any(|t| &t.name == pin) {
                self.pin = None;
                self.unpinned = true;
            }
        }
        self.spec = spec;
    }

    fn apply(&mut self, slot: SlotId, report: Report) {
        let hold = self.spec.policy.failback_hold;
        // A tunnel retired by a reload or a restart may still report while it stops.
        if let Some(entry) = self.tunnels.iter_mut().find(|e| e.slot == slot) {
            entry.apply(report, hold, Instant::now());
        }
    }

    /// The contenders the election looks at, in config order: drained tunnels are left out.
    fn candidates(&self) -> Vec<Contender> {
        self.tunnels
            .iter()
            .filter(|e| !e.drained)
            .map(|e| e.contender.clone())
            .collect()
    }

    fn elect(&mut self) {
        if self.stopping.is_cancelled() {
            return;
        }
        let now = Instant::now();
        let base_hold = self.spec.policy.failback_hold;
        for entry in &mut self.tunnels {
            entry.refresh_hold(base_hold, now);
        }
        // A cold tunnel's fate can change when a hold or its start-up grace runs out, and a
        // dampened hold shrinks when old failures leave the window: wake for those too.
        let mut wakes: Vec<Instant> = self
            .tunnels
            .iter()
            .filter_map(|e| e.dampening.next_expiry(now))
            .collect();
        // A drained tunnel counts as down, so that a cold backup wakes to replace it.
        let standby_view: Vec<Contender> = self
            .tunnels
            .iter()
            .map(TunnelEntry::contender_view)
            .collect();
        for (i, entry) in self.tunnels.iter().enumerate() {
            if !entry.is_cold() {
                continue;
            }
            let (want, recheck) =
                standby::wanted(&standby_view, i, entry.running, self.started, now);
            wakes.extend(recheck);
            entry
                .wanted
                .send_if_modified(|w| std::mem::replace(w, want) != want);
        }
        let contenders = self.candidates();
        if let Some(deadline) = self.settling {
            let verdicts: Vec<FirstVerdict> = self
                .tunnels
                .iter()
                .filter(|e| !e.drained)
                .map(|e| e.verdict)
                .collect();
            let pin = self.pin.as_deref();
            match election::settle(&contenders, &verdicts, pin, deadline, now) {
                Settle::Until(at) => {
                    self.publish();
                    wakes.push(at);
                    self.recheck_at = wakes.into_iter().min();
                    return;
                }
                Settle::Done => self.settling = None,
            }
        }
        let decision: Decision = election::elect(&Input {
            contenders: &contenders,
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
        if changed || self.reason == "starting" {
            self.reason = reason.clone();
        }
        // Status and the primary watch are updated before the events go out, so that anyone
        // reacting to an event (systemd STATUS=, a hook querying the API) sees the new state.
        self.publish();
        let order = election::dial_order(&contenders, &self.spec.policy, self.current.as_deref());
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
        self.current.is_some() || self.tunnels.iter().any(|e| e.contender.last_down.is_some())
    }

    /// Writes the status board from the entries and the election's outcome.
    fn publish(&self) {
        let mut board = self.board.write().unwrap_or_else(|p| p.into_inner());
        board.name.clone_from(&self.spec.name);
        board.primary.clone_from(&self.current);
        board.degraded = self.degraded;
        board.starting = self.settling.is_some();
        board.reason.clone_from(&self.reason);
        board.pin.clone_from(&self.pin);
        board.mode = mode_name(self.spec.policy.mode);
        board.tunnels = self.tunnels.iter().map(|e| e.status.clone()).collect();
    }
}

fn mode_name(mode: Mode) -> String {
    match mode {
        Mode::Priority => "priority".into(),
        Mode::Latency => "latency".into(),
    }
}

#[cfg(test)]
mod tests {
    //! The election loop on a paused clock: holds expire exactly on time because the loop
    //! sleeps until `recheck_at`, with no probe or report needed to wake it.
    use std::sync::RwLock;
    use std::time::Duration;

    use super::*;
    use crate::config::model::OnFailover;
    use crate::config::spec::{RestartSpec, TunnelSpec};
    use crate::election::{Failback, Policy};
    use crate::status;

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
        let status = Arc::new(RwLock::new(Elector::initial_status(&spec)));
        let board = status.clone();
        let (primary_tx, primary) = watch::channel(Primary::default());
        let (reports, rx) = mpsc::unbounded_channel();
        // In these tests a tunnel's slot id is its index.
        let slots = vec![(0, watch::channel(true).0), (1, watch::channel(true).0)];
        let election = Elector::new(
            &spec,
            slots,
            bus,
            status,
            primary_tx,
            CancellationToken::new(),
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
        /// The task with id `index` (a tunnel's index, or a new task's id) passes a probe.
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

        async fn drain(&self, tunnel: &str, drained: bool) {
            let (done, elected) = oneshot::channel();
            self.commands
                .send(Command::Drain(tunnel.into(), drained, done))
                .unwrap();
            elected.await.unwrap();
        }

        fn order(&self) -> Vec<String> {
            self.primary.borrow().order.clone()
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
        h.up(7);
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

    #[tokio::test(start_paused = true)]
    async fn a_drained_tunnel_is_neither_elected_nor_dialled_until_undrained() {
        let hold = Duration::from_secs(30);
        let mut h = start(hold);
        h.up(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        h.drain("a", true).await;
        assert_eq!(
            h.primary().as_deref(),
            Some("b"),
            "a drained primary is replaced"
        );
        assert_eq!(
            h.order(),
            ["b"],
            "new connections never dial a drained tunnel"
        );
        let board = status::read(&h.status);
        assert!(board.tunnels[0].drained && !board.tunnels[1].drained);
        assert_eq!(
            board.tunnels[0].state,
            crate::status::TunnelState::Up,
            "it keeps running"
        );
        // Even with nothing else up, a drained tunnel is not a fallback.
        h.die(1);
        h.settle().await;
        assert!(!h.order().contains(&"a".to_owned()), "{:?}", h.order());
        assert_ne!(h.primary().as_deref(), Some("a"));
        // Pinning a drained tunnel does not bring it back either.
        h.pin(Some("a")).await;
        assert_ne!(h.primary().as_deref(), Some("a"));
        h.pin(None).await;
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("b"));
        // Undrained, it is a contender again: being better, it takes over.
        h.drain("a", false).await;
        tokio::time::advance(hold + Duration::from_millis(1)).await;
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        assert!(!status::read(&h.status).tunnels[0].drained);
        let reasons = h.reasons();
        assert_eq!(reasons[0], "initial");
        assert!(reasons.len() >= 3, "{reasons:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_board_is_derived_from_the_entries_and_follows_a_restart() {
        let h = start(Duration::from_secs(30));
        h.up(0);
        h.up(1);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"));
        // `a` restarted: a new task (slot 9) under the same spec, from scratch.
        let spec = service(
            Duration::from_secs(30),
            vec![tunnel("a", 10), tunnel("b", 20)],
        );
        h.commands
            .send(Command::Reconfigure {
                spec: Box::new(spec),
                slots: vec![(9, Some(watch::channel(true).0)), (1, None)],
            })
            .unwrap();
        h.settle().await;
        let board = status::read(&h.status);
        assert_eq!(board.primary.as_deref(), Some("b"), "{board:?}");
        assert_eq!(board.tunnels[0].state, crate::status::TunnelState::Starting);
        assert_eq!(board.tunnels[1].state, crate::status::TunnelState::Up);
        // The old task's last words are ignored; the new one's count.
        h.die(0);
        h.up(9);
        h.settle().await;
        assert_eq!(h.primary().as_deref(), Some("a"), "a first up wins at once");
        assert_eq!(
            status::read(&h.status).tunnels[0].state,
            crate::status::TunnelState::Up
        );
    }
}
