//! One task per tunnel: start it, probe it, notice its death, restart it with backoff.
//!
//! The task publishes the tunnel's own events (`tunnel_starting`, `tunnel_up`, `tunnel_down`,
//! `tunnel_restarting`, `probe_failed`, `probe_recovered`) and reports every observation to its
//! service, which alone runs the election. A hard signal — the provider's `closed()` resolving,
//! or a failed start — is reported at once, even in the middle of a probe. Restarts back off
//! exponentially with jitter, never below `restart.initial × (1 − jitter)`, so a crash loop
//! cannot spin the CPU; the backoff resets once a tunnel has stayed alive for `restart.max`.
//!
//! A tunnel with a process that probes hold down for `restart.when_down` is wedged as far as we
//! can tell (a frozen or hung agent stays alive, so `closed()` never fires): it is stopped and
//! restarted like a dead one. From outside, a hung agent cannot be told from one waiting for a
//! network that is out, so these restarts are rationed rather than guessed at: each one in a
//! row without the tunnel coming up in between doubles the wait ([`wedge_wait`]), so an outage
//! costs a handful of restarts an hour, and the first up resets it.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::{Provider, StartContext, Tunnel};

use crate::bus::{Bus, EventKind};
use crate::config::spec::{RestartSpec, TunnelSpec};
use crate::metrics::Metrics;
use crate::probe::schedule::{self, Phase, RttEstimator};
use crate::probe::{self, Counter, Ewma, Transition};

/// What a tunnel task tells its service.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The provider is starting the tunnel.
    Starting,
    /// The provider started it; probes begin.
    Started {
        /// Where it leads.
        endpoint: String,
        /// Its child process, if any.
        pid: Option<u32>,
    },
    /// One probe result.
    Probe {
        /// Smoothed latency after this probe (None until the first success).
        latency: Option<Duration>,
        /// Why the probe failed, if it did.
        error: Option<String>,
        /// The up/down change it caused, if any.
        transition: Option<Transition>,
    },
    /// The tunnel died (hard signal) or could not start.
    Died {
        /// Why.
        reason: String,
    },
    /// Waiting before the next start.
    Restarting {
        /// Attempt number, from 1.
        attempt: u32,
        /// The wait.
        delay: Duration,
    },
    /// Stopped for good (shutdown or removal).
    Stopped,
    /// A cold-standby tunnel that is not needed now (not started, or stopped again).
    Standby,
}

/// The provider-native check runs at most this often (or every probe interval, if longer).
pub const NATIVE_CHECK_MIN_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the provider's own health check within `limit`; a failure counts like a failed probe.
async fn native_check(tunnel: &dyn Tunnel, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, tunnel.check()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("provider check: {e}")),
        Err(_) => Err(format!(
            "provider check timed out after {}",
            probe::fmt_ms(limit)
        )),
    }
}

/// Identifies one tunnel task for its whole life. A reload that restarts a tunnel gives the new
/// task a new id, so late reports of the old one cannot be mistaken for the new one's.
pub type SlotId = u64;

/// A report tagged with the tunnel task's id.
pub type TaggedReport = (SlotId, Report);

/// Sleeps until `at`, or forever without one (a `select!` branch that may have no deadline).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A fresh, never reused [`SlotId`].
pub fn next_slot_id() -> SlotId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Everything a tunnel task needs.
pub struct TunnelTask {
    /// The task's id (the report tag).
    pub slot: SlotId,
    /// Service name (for events).
    pub service: String,
    /// The tunnel's resolved settings.
    pub spec: TunnelSpec,
    /// The provider that starts it.
    pub provider: Arc<dyn Provider>,
    /// Start context handed to the provider.
    pub ctx: StartContext,
    /// Where events go.
    pub bus: Arc<Bus>,
    /// Where reports go.
    pub reports: mpsc::UnboundedSender<TaggedReport>,
    /// Cancelled to stop the tunnel for good.
    pub cancel: CancellationToken,
    /// Where the started tunnel is published for the data plane (None while not started).
    pub live: LiveTunnel,
    /// Whether the tunnel should run now: always true for hot standby; the service flips it
    /// for `standby: cold`.
    pub wanted: watch::Receiver<bool>,
    /// Notified to restart the tunnel now, skipping any backoff (after its router was
    /// re-provisioned).
    pub kick: Arc<tokio::sync::Notify>,
    /// Where successful probes' latencies are recorded.
    pub metrics: Arc<Metrics>,
}

/// The running tunnel of one tunnel task, shared with the data plane.
pub use crate::routes::LiveTunnel;

/// Failures seen by real traffic (a listener's failed dial), fed to the tunnel's probe counter.
pub type PassiveFailures = mpsc::UnboundedReceiver<String>;

/// The longest a tunnel waits between restarts for being held down by probes (unless
/// `restart.when_down` itself is longer).
pub const WEDGE_MAX_WAIT: Duration = Duration::from_secs(600);

/// How long probes must hold a tunnel with a process down before it is restarted, given how
/// many such restarts came in a row without it coming up since: `when_down × 2^in_a_row`,
/// capped at [`WEDGE_MAX_WAIT`] (or `when_down`, if longer). `None` when `when_down` is zero
/// (never restart for being down).
pub fn wedge_wait(when_down: Duration, in_a_row: u32) -> Option<Duration> {
    if when_down.is_zero() {
        return None;
    }
    let grown = when_down
        .checked_mul(1u32 << in_a_row.min(16))
        .unwrap_or(Duration::MAX);
    Some(grown.min(WEDGE_MAX_WAIT.max(when_down)))
}

/// How one started tunnel ended.
enum Ending {
    Died(String),
    /// Held down by probes for its `restart.when_down` (see [`wedge_wait`]).
    Wedged(String),
    Cancelled,
    /// Cold standby: a better tunnel has held its place; stop without a restart.
    Parked,
    /// Asked to restart at once (its router was re-provisioned).
    Kicked,
}

impl TunnelTask {
    /// Runs until cancelled; stops the tunnel before returning. `passive` carries failures that
    /// real traffic met on this tunnel: they count like failed probes.
    pub async fn run(self, mut passive: PassiveFailures) {
        let mut attempt: u32 = 0;
        // Restarts for being held down, in a row without an up in between (see `wedge_wait`).
        let mut wedged: u32 = 0;
        loop {
            if !*self.wanted.borrow() {
                self.report(Report::Standby);
                let mut wanted = self.wanted.clone();
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => break,
                    woken = async { wanted.wait_for(|w| *w).await.is_ok() } => if !woken { break },
                }
                attempt = 0;
            }
            self.publish(EventKind::TunnelStarting {
                service: self.service.clone(),
                tunnel: self.spec.name.clone(),
            });
            self.report(Report::Starting);
            let started = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                r = self.provider.start(&self.ctx) => r,
            };
            let alive_since = Instant::now();
            match started {
                Ok(tunnel) => {
                    self.set_live(Some(tunnel.clone()));
                    let ending = self.watch(tunnel.as_ref(), &mut passive, &mut wedged).await;
                    self.set_live(None);
                    tunnel.stop().await;
                    match ending {
                        Ending::Cancelled => break,
                        Ending::Kicked => {
                            self.publish(EventKind::TunnelDown {
                                service: self.service.clone(),
                                tunnel: self.spec.name.clone(),
                                reason: "restarting after its router was provisioned".into(),
                                hard: true,
                            });
                            self.report(Report::Died {
                                reason: "restarting after its router was provisioned".into(),
                            });
                            attempt = 0;
                            continue;
                        }
                        Ending::Died(reason) => self.died(reason),
                        Ending::Wedged(reason) => {
                            wedged = wedged.saturating_add(1);
                            self.died(reason);
                        }
                        Ending::Parked => {
                            self.publish(EventKind::TunnelDown {
                                service: self.service.clone(),
                                tunnel: self.spec.name.clone(),
                                reason: "cold standby: a better tunnel is up again".into(),
                                hard: false,
                            });
                            continue;
                        }
                    }
                }
                Err(e) => self.died(format!("start failed: {e}")),
            }
            if alive_since.elapsed() >= self.spec.restart.max {
                attempt = 0;
            }
            attempt = attempt.saturating_add(1);
            let delay = backoff_delay(&self.spec.restart, attempt, rand::rng().random());
            self.publish(EventKind::TunnelRestarting {
                service: self.service.clone(),
                tunnel: self.spec.name.clone(),
                attempt,
                delay_ms: delay.as_millis() as u64,
            });
            self.report(Report::Restarting { attempt, delay });
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                // What it depends on was just repaired: waiting out the backoff helps nobody.
                _ = self.kick.notified() => attempt = 0,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.report(Report::Stopped);
    }

    /// Probes a started tunnel until it dies or the task is cancelled.
    async fn watch(
        &self,
        tunnel: &dyn Tunnel,
        passive: &mut PassiveFailures,
        wedged: &mut u32,
    ) -> Ending {
        let endpoint = tunnel.endpoint().to_string();
        self.report(Report::Started {
            endpoint: endpoint.clone(),
            pid: tunnel.pid(),
        });
        let mut wanted = self.wanted.clone();
        let parked = async move {
            // (A closed channel means the service is going away; cancellation will follow.)
            if wanted.wait_for(|w| !*w).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Ending::Cancelled,
            reason = tunnel.closed() => Ending::Died(reason),
            _ = parked => Ending::Parked,
            _ = self.kick.notified() => Ending::Kicked,
            reason = self.probe_loop(tunnel, &endpoint, passive, wedged) => Ending::Wedged(reason),
        }
    }

    /// Probes on the adaptive schedule of [`schedule`] (every `interval` at rest, every
    /// `fast_interval` after a failure, every `down_interval` once down, at once when real
    /// traffic failed) until the caller's `select!` ends it, or — for a tunnel with a
    /// process — until probes have held it down for its [`wedge_wait`]: then returns why.
    /// `wedged` counts such restarts in a row; the tunnel coming up resets it.
    async fn probe_loop(
        &self,
        tunnel: &dyn Tunnel,
        endpoint: &str,
        passive: &mut PassiveFailures,
        wedged: &mut u32,
    ) -> String {
        let spec = &self.spec.probe;
        // Only a process can be restarted back to life; other tunnels have their own liveness
        // signal (an SSH session's keep-alive) and nothing to restart.
        let has_process = tunnel.pid().is_some();
        // Down since it started (it has not come up yet), or since its last down.
        let mut down_since = Some(Instant::now());
        let mut counter = Counter::new(spec.rise, spec.fall);
        let mut latency = Ewma::default();
        // Adaptive probing (see `probe::schedule`): the pace follows the phase, the timeout the
        // round trip. A new incarnation starts without samples (it may take another path).
        let mut rtt = RttEstimator::default();
        let mut declared_down = false;
        let mut next_probe = Instant::now();
        let mut last_start = next_probe;
        let tag = tunnelkeeper_providers::util::log_tag(&self.service, &self.spec.name);
        // The provider's own health (cloudflared /ready, ngrok's API, `tailscale status`, an SSH
        // ping) runs on a slower clock than the end-to-end probe: some of those cost a CLI run.
        let native_every = spec.interval.max(NATIVE_CHECK_MIN_INTERVAL);
        let mut native_ticks =
            tokio::time::interval_at(Instant::now() + native_every, native_every);
        native_ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut native_error: Option<String> = None;
        // Failures real traffic met before this start belong to the previous incarnation.
        while passive.try_recv().is_ok() {}
        loop {
            let wedge_after =
                wedge_wait(self.spec.restart.when_down, *wedged).filter(|_| has_process);
            let wedge_at = down_since
                .zip(wedge_after)
                .and_then(|(since, after)| since.checked_add(after));
            // Whether this round ran a probe (rather than hearing of a failure elsewhere).
            let mut probed = false;
            let result = tokio::select! {
                _ = sleep_until(wedge_at) => {
                    let after = wedge_after.unwrap_or_default();
                    return format!(
                        "not up for {} (restart.when_down): restarting its process",
                        probe::fmt_ms(after)
                    );
                }
                _ = tokio::time::sleep_until(next_probe) => {
                    let timeout = rtt.timeout(spec.min_timeout, spec.timeout);
                    probed = true;
                    last_start = Instant::now();
                    let result =
                        probe::probe_within(tunnel, spec, timeout, &self.ctx.resolver, &tag).await;
                    // The whole probe (checks included) is what the timeout bounds, so it is
                    // the sample; only a pass measures the round trip (Karn's rule).
                    match &result {
                        Ok(_) => rtt.sample(last_start.elapsed()),
                        Err(failure) if failure.timed_out => rtt.timed_out(),
                        Err(_) => {}
                    }
                    let result = result.map_err(|f| f.reason);
                    // While the provider itself reports trouble, a passing end-to-end probe does
                    // not count as a success: the path may work for us and not for others.
                    match (&result, &native_error) {
                        (Ok(_), Some(reason)) => Err(reason.clone()),
                        _ => result,
                    }
                }
                Some(reason) = passive.recv() => {
                    // Real traffic failed on a tunnel we hold up: check it now rather than at
                    // the next tick. (While it is down the down pace rules: no probe storms.)
                    if counter.is_up() {
                        next_probe = Instant::now();
                    }
                    Err(format!("real traffic: {reason}"))
                }
                _ = native_ticks.tick() => match native_check(tunnel, native_every).await {
                    // A healthy native check is no news: the end-to-end probe measures latency.
                    Ok(()) => {
                        native_error = None;
                        continue;
                    }
                    Err(reason) => {
                        native_error = Some(reason.clone());
                        Err(reason)
                    }
                },
            };
            let failures_before = counter.failures();
            let transition = counter.record(result.is_ok());
            let error = match result {
                Ok(sample) => {
                    latency.add(sample);
                    self.metrics
                        .observe_latency(&self.service, &self.spec.name, sample);
                    if failures_before > 0 && counter.is_up() {
                        self.publish(EventKind::ProbeRecovered {
                            service: self.service.clone(),
                            tunnel: self.spec.name.clone(),
                            failures: failures_before,
                        });
                    }
                    None
                }
                Err(reason) => {
                    self.metrics
                        .count_probe_failure(&self.service, &self.spec.name);
                    // Announce the first failure of a streak only: once a second is plenty.
                    if failures_before == 0 && counter.is_up() {
                        self.publish(EventKind::ProbeFailed {
                            service: self.service.clone(),
                            tunnel: self.spec.name.clone(),
                            reason: reason.clone(),
                        });
                    }
                    Some(reason)
                }
            };
            match transition {
                Some(Transition::Up) => {
                    down_since = None;
                    declared_down = false;
                    *wedged = 0;
                }
                Some(Transition::Down) => {
                    down_since = Some(Instant::now());
                    declared_down = true;
                }
                None => {}
            }
            // The pace follows the phase this result left the tunnel in; a probe already due
            // (real traffic asked for one) is not pushed back.
            let gap = Phase::of(counter.is_up(), counter.failures(), declared_down).gap(spec);
            let paced = schedule::next_start(last_start, Instant::now(), gap);
            next_probe = if probed { paced } else { next_probe.min(paced) };
            match transition {
                Some(Transition::Up) => self.publish(EventKind::TunnelUp {
                    service: self.service.clone(),
                    tunnel: self.spec.name.clone(),
                    endpoint: endpoint.to_string(),
                }),
                Some(Transition::Down) => self.publish(EventKind::TunnelDown {
                    service: self.service.clone(),
                    tunnel: self.spec.name.clone(),
                    reason: format!(
                        "probe: {} consecutive failures, last: {}",
                        spec.fall,
                        error.as_deref().unwrap_or("?")
                    ),
                    hard: false,
                }),
                None => {}
            }
            self.report(Report::Probe {
                latency: latency.get(),
                error,
                transition,
            });
        }
    }

    fn set_live(&self, tunnel: Option<Arc<dyn Tunnel>>) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = tunnel;
    }

    fn died(&self, reason: String) {
        self.publish(EventKind::TunnelDown {
            service: self.service.clone(),
            tunnel: self.spec.name.clone(),
            reason: reason.clone(),
            hard: true,
        });
        self.report(Report::Died { reason });
    }

    fn publish(&self, kind: EventKind) {
        self.bus.publish(kind);
    }

    fn report(&self, report: Report) {
        // The service outlives its tunnels; a closed channel only happens during teardown.
        let _ = self.reports.send((self.slot, report));
    }
}

/// The wait before restart `attempt` (1-based): `initial × multiplier^(attempt−1)`, capped at
/// `max`, then shortened by up to `jitter` of itself (`unit_random` in `[0, 1)`) so that many
/// tunnels failing together do not restart in lockstep. Never above `max`, never below
/// `initial × (1 − jitter)`.
pub fn backoff_delay(restart: &RestartSpec, attempt: u32, unit_random: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(64) as i32;
    let grown = restart.initial.as_secs_f64() * restart.multiplier.max(1.0).powi(exponent);
    let base = grown.min(restart.max.as_secs_f64());
    let spread = restart.jitter.clamp(0.0, 1.0) * unit_random.clamp(0.0, 1.0);
    let floor = restart.initial.as_secs_f64() * (1.0 - restart.jitter.clamp(0.0, 1.0));
    Duration::from_secs_f64((base * (1.0 - spread)).max(floor).max(0.001))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart() -> RestartSpec {
        RestartSpec {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
            when_down: Duration::ZERO,
        }
    }

    #[test]
    fn backoff_grows_exponentially_to_the_cap() {
        let r = restart();
        let delays: Vec<u128> = (1..=10)
            .map(|n| backoff_delay(&r, n, 0.0).as_millis())
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
        assert_eq!(backoff_delay(&r, u32::MAX, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_only_shortens_and_never_below_the_floor() {
        let r = restart();
        for attempt in 1..20 {
            for k in 0..10 {
                let u = k as f64 / 10.0;
                let d = backoff_delay(&r, attempt, u);
                assert!(d <= r.max, "{d:?}");
                assert!(d >= Duration::from_millis(400), "{d:?}");
                let plain = backoff_delay(&r, attempt, 0.0).as_secs_f64();
                assert!(d.as_secs_f64() >= plain * 0.8 - 1e-9);
            }
        }
    }
}

#[cfg(test)]
mod paused_tests {
    //! The supervisor's restart loop on a paused clock, with a provider that cannot start or
    //! whose tunnel dies after a set time: delays are exact and the backoff resets after a
    //! long enough life.
    use super::*;
    use crate::bus::Delivery;
    use async_trait::async_trait;
    use tunnelkeeper_providers::{Dial, Endpoint, ProviderError};

    /// Fails every start, or starts tunnels that die after `life`.
    #[derive(Debug)]
    struct Flaky {
        life: Option<Duration>,
    }

    struct Dying {
        dies_at: Instant,
    }

    #[async_trait]
    impl Provider for Flaky {
        async fn start(&self, _: &StartContext) -> tunnelkeeper_providers::Result<Arc<dyn Tunnel>> {
            match self.life {
                None => Err(ProviderError::Spawn("exited with status 1".into())),
                Some(life) => Ok(Arc::new(Dying {
                    dies_at: Instant::now() + life,
                })),
            }
        }
    }

    #[async_trait]
    impl Tunnel for Dying {
        fn endpoint(&self) -> tunnelkeeper_providers::Endpoint {
            Endpoint {
                display: "test".into(),
            }
        }
        async fn dial(&self, _: Duration) -> tunnelkeeper_providers::Result<Dial> {
            Err(ProviderError::Closed("test".into()))
        }
        async fn closed(&self) -> String {
            tokio::time::sleep_until(self.dies_at).await;
            "exited with status 1".into()
        }
        async fn stop(&self) {}
    }

    /// Spawns a hot tunnel task for `provider`: returns its events, its cancel switch, the task
    /// and when it started.
    pub(super) fn spawn_task(
        provider: Arc<dyn Provider>,
        restart: RestartSpec,
    ) -> (
        crate::bus::Subscription,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        Instant,
    ) {
        let bus = Bus::new(4096);
        let events = bus.subscribe();
        let cancel = CancellationToken::new();
        let task = TunnelTask::for_test(provider, restart, bus, cancel.clone());
        // Nobody reports real traffic here; the task just needs the channel open.
        let (passive_tx, passive) = mpsc::unbounded_channel();
        let handle = tokio::spawn(async move {
            let _keep = passive_tx;
            task.run(passive).await;
        });
        (events, cancel, handle, Instant::now())
    }

    /// Runs a tunnel task for `window` of paused time; returns (offset of each start, delay of
    /// each restart).
    async fn observe(
        life: Option<Duration>,
        restart: RestartSpec,
        window: Duration,
    ) -> (Vec<Duration>, Vec<u64>) {
        let (mut events, cancel, handle, t0) = spawn_task(Arc::new(Flaky { life }), restart);
        tokio::time::sleep(window).await;
        cancel.cancel();
        handle.await.unwrap();
        let (mut starts, mut delays) = (vec![], vec![]);
        while let Some(Some(Delivery::Event(e))) =
            futures_util::FutureExt::now_or_never(events.next())
        {
            match &e.kind {
                EventKind::TunnelStarting { .. } => starts.push(Instant::now() - t0),
                EventKind::TunnelRestarting { delay_ms, .. } => delays.push(*delay_ms),
                _ => {}
            }
        }
        (starts, delays)
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_backs_off_exponentially_to_the_cap() {
        let restart = RestartSpec {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(8),
            multiplier: 2.0,
            jitter: 0.0,
            when_down: Duration::ZERO,
        };
        let (starts, delays) = observe(None, restart, Duration::from_secs(60)).await;
        // 0.5+1+2+4+8 = 15.5 s, then every 8 s: 1 + 5 + 5 (at 23.5 … 55.5) starts in 60 s.
        assert_eq!(
            delays[..8],
            [500, 1000, 2000, 4000, 8000, 8000, 8000, 8000],
            "{delays:?}"
        );
        assert_eq!(
            starts.len(),
            11,
            "a crash loop must not spin: {} starts",
            starts.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_resets_after_the_tunnel_lived_for_restart_max() {
        let restart = RestartSpec {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(4),
            multiplier: 2.0,
            jitter: 0.0,
            when_down: Duration::ZERO,
        };
        // Lives 5 s each time (> max): every restart is a first attempt again.
        let (_, delays) = observe(
            Some(Duration::from_secs(5)),
            restart,
            Duration::from_secs(30),
        )
        .await;
        assert!(delays.len() >= 4, "{delays:?}");
        assert!(delays.iter().all(|&d| d == 500), "{delays:?}");
        // Lives 1 s each time (< max): the backoff keeps growing.
        let (_, delays) = observe(
            Some(Duration::from_secs(1)),
            restart,
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(delays[..4], [500, 1000, 2000, 4000], "{delays:?}");
    }
}

#[cfg(test)]
mod wedge_tests {
    //! The `restart.when_down` rule on a paused clock: a tunnel with a process that never
    //! passes a probe (a frozen agent) is restarted after `when_down`, then after twice that,
    //! and so on; without a process, or with `when_down: 0`, it is left alone.
    use super::*;
    use crate::bus::Delivery;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tunnelkeeper_providers::{Dial, Endpoint, ProviderError};

    /// Starts tunnels that stay alive and answer probes only while `answers` is set; `pid`
    /// says whether they have a process.
    #[derive(Debug)]
    struct Frozen {
        pid: Option<u32>,
        answers: Arc<AtomicBool>,
    }

    struct FrozenTunnel(Option<u32>, Arc<AtomicBool>);

    #[async_trait]
    impl Provider for Frozen {
        async fn start(&self, _: &StartContext) -> tunnelkeeper_providers::Result<Arc<dyn Tunnel>> {
            Ok(Arc::new(FrozenTunnel(self.pid, self.answers.clone())))
        }
    }

    #[async_trait]
    impl Tunnel for FrozenTunnel {
        fn endpoint(&self) -> Endpoint {
            Endpoint {
                display: "test".into(),
            }
        }
        fn pid(&self) -> Option<u32> {
            self.0
        }
        async fn dial(&self, _: Duration) -> tunnelkeeper_providers::Result<Dial> {
            if self.1.load(Ordering::Relaxed) {
                // The probe of `for_test` only connects: an in-memory stream passes it.
                return Ok(Dial::Stream(Box::new(tokio::io::duplex(64).0)));
            }
            Err(ProviderError::Closed("no answer".into()))
        }
        async fn closed(&self) -> String {
            std::future::pending().await
        }
        async fn stop(&self) {}
    }

    /// Runs a frozen tunnel for `window`; returns when each wedge restart was announced.
    async fn wedge_restarts(
        pid: Option<u32>,
        when_down: Duration,
        window: Duration,
    ) -> Vec<Duration> {
        let answers = Arc::new(AtomicBool::new(false));
        wedge_restarts_of(Frozen { pid, answers }, when_down, window, |_| {}).await
    }

    /// Like [`wedge_restarts`], calling `at_second(n)` at each second of paused time.
    async fn wedge_restarts_of(
        provider: Frozen,
        when_down: Duration,
        window: Duration,
        at_second: impl Fn(u64),
    ) -> Vec<Duration> {
        let restart = RestartSpec {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
            when_down,
        };
        let (mut events, cancel, handle, t0) =
            super::paused_tests::spawn_task(Arc::new(provider), restart);
        let mut at = vec![];
        let deadline = t0 + window;
        let mut second = 0;
        at_second(0);
        loop {
            let tick = (t0 + Duration::from_secs(second + 1)).min(deadline);
            let next = tokio::time::timeout_at(tick, events.next()).await;
            let next = match next {
                Err(_) if tick < deadline => {
                    second += 1;
                    at_second(second);
                    continue;
                }
                Err(_) => break,
                Ok(next) => next,
            };
            let Some(Delivery::Event(e)) = next else {
                break;
            };
            // (A tunnel that was up also has a `tunnel_down` from its probes.)
            if let EventKind::TunnelDown { reason, hard, .. } = &e.kind {
                if reason.contains("restart.when_down") {
                    assert!(hard, "a wedge restart is a hard down");
                    at.push(Instant::now() - t0);
                }
            }
        }
        cancel.cancel();
        handle.await.unwrap();
        at
    }

    #[test]
    fn the_wait_doubles_per_restart_in_a_row_up_to_the_cap() {
        let s = Duration::from_secs;
        let waits: Vec<_> = (0..8).map(|n| wedge_wait(s(30), n).unwrap()).collect();
        assert_eq!(
            waits,
            [s(30), s(60), s(120), s(240), s(480), s(600), s(600), s(600)]
        );
        assert_eq!(wedge_wait(Duration::ZERO, 0), None, "0 = never");
        assert_eq!(
            wedge_wait(s(900), 3),
            Some(s(900)),
            "a long when_down is its own cap"
        );
        assert_eq!(wedge_wait(s(30), u32::MAX), Some(WEDGE_MAX_WAIT));
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_process_is_restarted_ever_more_rarely() {
        let at = wedge_restarts(
            Some(4242),
            Duration::from_secs(30),
            Duration::from_secs(400),
        )
        .await;
        // 30 s after the start; restarted 0.5 s later (the usual backoff), wedged again 60 s
        // after that; it lived 60 s = restart.max, so the backoff is back to 0.5 s; then 120 s.
        let secs: Vec<f64> = at.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, [30.0, 90.5, 211.0], "{secs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn coming_up_resets_the_wait() {
        let answers = Arc::new(AtomicBool::new(false));
        let provider = Frozen {
            pid: Some(4242),
            answers: answers.clone(),
        };
        // Frozen until 40 s (restarted at 30 s), answering from 40 s to 100 s, frozen again.
        let at = wedge_restarts_of(
            provider,
            Duration::from_secs(30),
            Duration::from_secs(200),
            |s| answers.store((40..100).contains(&s), Ordering::Relaxed),
        )
        .await;
        let secs: Vec<u64> = at.iter().map(Duration::as_secs).collect();
        // Down again at 100 s (fall 1): the next restart waits 30 s again, not 60 s; the one
        // after it (no up in between, restarted at 131 s) waits 60 s.
        assert_eq!(secs, [30, 130, 191], "{secs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_process_or_with_when_down_0_a_down_tunnel_keeps_running() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            wedge_restarts(None, Duration::from_secs(30), hour).await,
            []
        );
        assert_eq!(wedge_restarts(Some(4242), Duration::ZERO, hour).await, []);
    }
}

#[cfg(test)]
mod native_check_tests {
    //! A provider whose own health check fails takes the tunnel down even while the
    //! end-to-end dial still works, and brings it back when the check passes again.
    use super::*;
    use crate::bus::Delivery;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tunnelkeeper_providers::{Dial, Endpoint, Health, ProviderError};

    #[derive(Debug)]
    struct Flag(Arc<AtomicBool>);

    struct Healthy(Arc<AtomicBool>);

    #[async_trait]
    impl Provider for Flag {
        async fn start(&self, _: &StartContext) -> tunnelkeeper_providers::Result<Arc<dyn Tunnel>> {
            Ok(Arc::new(Healthy(self.0.clone())))
        }
    }

    #[async_trait]
    impl Tunnel for Healthy {
        fn endpoint(&self) -> Endpoint {
            Endpoint {
                display: "test".into(),
            }
        }
        async fn dial(&self, _: Duration) -> tunnelkeeper_providers::Result<Dial> {
            // An in-memory stream: the end-to-end probe (connect only) always passes.
            Ok(Dial::Stream(Box::new(tokio::io::duplex(64).0)))
        }
        async fn check(&self) -> tunnelkeeper_providers::Result<Health> {
            if self.0.load(Ordering::Relaxed) {
                Ok(Health::default())
            } else {
                Err(ProviderError::Unhealthy("readyConnections=0".into()))
            }
        }
        async fn closed(&self) -> String {
            std::future::pending().await
        }
        async fn stop(&self) {}
    }

    /// The next event of type `want`, within two minutes of (paused) time.
    async fn next(events: &mut crate::bus::Subscription, want: &str) -> Arc<crate::bus::Event> {
        let wait = async {
            loop {
                match events.next().await {
                    Some(Delivery::Event(e)) if e.type_name() == want => return e,
                    Some(_) => continue,
                    None => panic!("bus closed"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .unwrap_or_else(|_| panic!("no {want} within 120 s"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_native_check_takes_the_tunnel_down_and_a_passing_one_back_up() {
        let healthy = Arc::new(AtomicBool::new(true));
        let bus = Bus::new(256);
        let mut events = bus.subscribe();
        let cancel = CancellationToken::new();
        let restart = RestartSpec {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(8),
            multiplier: 2.0,
            jitter: 0.0,
            when_down: Duration::ZERO,
        };
        let task = TunnelTask::for_test(
            Arc::new(Flag(healthy.clone())),
            restart,
            bus.clone(),
            cancel.clone(),
        );
        let (_passive_tx, passive) = mpsc::unbounded_channel();
        let handle = tokio::spawn(task.run(passive));
        next(&mut events, "tunnel_up").await;
        healthy.store(false, Ordering::Relaxed);
        let down = next(&mut events, "tunnel_down").await;
        match &down.kind {
            EventKind::TunnelDown { reason, hard, .. } => {
                assert!(reason.contains("provider check"), "{reason}");
                assert!(!hard);
            }
            other => panic!("{other:?}"),
        }
        healthy.store(true, Ordering::Relaxed);
        next(&mut events, "tunnel_up").await;
        cancel.cancel();
        handle.await.unwrap();
    }
}

#[cfg(test)]
mod adaptive_tests {
    //! Adaptive probing through the real probe loop on a paused clock: one probe per interval
    //! at rest, quick confirmation of a silent failure with the round-trip timeout, the down
    //! pace, a probe at once when real traffic fails, and no false down on jittery paths.
    use super::*;
    use crate::bus::Delivery;
    use async_trait::async_trait;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::sync::Mutex;
    use tunnelkeeper_providers::{Dial, Endpoint};

    /// How the tunnel answers a dial.
    #[derive(Debug, Clone, Copy)]
    enum Path {
        /// After this round trip.
        Answer(Duration),
        /// After `base` plus a uniformly random part of `spread` (seeded, reproducible).
        Jitter { base: Duration, spread: Duration },
        /// Never: the dial hangs, as into a frozen relay.
        Blackhole,
    }

    /// Starts tunnels that answer as `path` says and note when each dial began.
    #[derive(Debug, Clone)]
    struct Switch {
        path: Arc<Mutex<Path>>,
        dials: Arc<Mutex<Vec<Instant>>>,
        rng: Arc<Mutex<StdRng>>,
    }

    impl Switch {
        fn new(path: Path) -> Switch {
            Switch {
                path: Arc::new(Mutex::new(path)),
                dials: Default::default(),
                rng: Arc::new(Mutex::new(StdRng::seed_from_u64(17))),
            }
        }
        fn set(&self, path: Path) {
            *self.path.lock().unwrap() = path;
        }
        /// Offsets from `t0` of the dials in `[from, to)`.
        fn dials_between(&self, t0: Instant, from: Duration, to: Duration) -> Vec<Duration> {
            let dials = self.dials.lock().unwrap();
            dials
                .iter()
                .map(|at| *at - t0)
                .filter(|d| *d >= from && *d < to)
                .collect()
        }
    }

    #[async_trait]
    impl Provider for Switch {
        async fn start(&self, _: &StartContext) -> tunnelkeeper_providers::Result<Arc<dyn Tunnel>> {
            Ok(Arc::new(self.clone()))
        }
    }

    #[async_trait]
    impl Tunnel for Switch {
        fn endpoint(&self) -> Endpoint {
            Endpoint {
                display: "test".into(),
            }
        }
        async fn dial(&self, _: Duration) -> tunnelkeeper_providers::Result<Dial> {
            self.dials.lock().unwrap().push(Instant::now());
            let path = *self.path.lock().unwrap();
            let delay = match path {
                Path::Answer(rtt) => rtt,
                Path::Jitter { base, spread } => {
                    base + spread.mul_f64(self.rng.lock().unwrap().random::<f64>())
                }
                Path::Blackhole => std::future::pending().await,
            };
            tokio::time::sleep(delay).await;
            // The probe of `for_test` only connects: an in-memory stream passes it.
            Ok(Dial::Stream(Box::new(tokio::io::duplex(64).0)))
        }
        async fn closed(&self) -> String {
            std::future::pending().await
        }
        async fn stop(&self) {}
    }

    /// The defaults, with `down_interval` at 5 s so that its pace shows.
    fn adaptive(probe: &mut crate::config::spec::ProbeSpec) {
        use crate::config::spec::default;
        probe.interval = default::PROBE_INTERVAL;
        probe.timeout = default::PROBE_TIMEOUT;
        probe.rise = default::PROBE_RISE;
        probe.fall = default::PROBE_FALL;
        probe.fast_interval = default::probe_fast_interval(default::PROBE_INTERVAL);
        probe.down_interval = Duration::from_secs(5);
        probe.min_timeout = default::PROBE_MIN_TIMEOUT;
    }

    /// A running tunnel task over `switch`, its events (with offsets from `t0`) collected.
    struct Running {
        t0: Instant,
        events: Arc<Mutex<Vec<(Duration, EventKind)>>>,
        passive: mpsc::UnboundedSender<String>,
        cancel: CancellationToken,
        handle: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn start(switch: &Switch, probe: impl FnOnce(&mut crate::config::spec::ProbeSpec)) -> Self {
            let bus = Bus::new(1 << 16);
            let mut sub = bus.subscribe();
            let cancel = CancellationToken::new();
            let restart = RestartSpec {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(8),
                multiplier: 2.0,
                jitter: 0.0,
                when_down: Duration::ZERO,
            };
            let mut task =
                TunnelTask::for_test(Arc::new(switch.clone()), restart, bus, cancel.clone());
            probe(&mut task.spec.probe);
            let t0 = Instant::now();
            let events: Arc<Mutex<Vec<(Duration, EventKind)>>> = Default::default();
            let sink = events.clone();
            tokio::spawn(async move {
                while let Some(delivery) = sub.next().await {
                    if let Delivery::Event(e) = delivery {
                        sink.lock()
                            .unwrap()
                            .push((Instant::now() - t0, e.kind.clone()));
                    }
                }
            });
            let (passive, rx) = mpsc::unbounded_channel();
            let handle = tokio::spawn(task.run(rx));
            Running {
                t0,
                events,
                passive,
                cancel,
                handle,
            }
        }

        async fn until(&self, offset: Duration) {
            tokio::time::sleep_until(self.t0 + offset).await;
        }

        /// Offsets of the events named `kind`.
        fn times(&self, kind: &str) -> Vec<Duration> {
            let events = self.events.lock().unwrap();
            events
                .iter()
                .filter(|(_, k)| k.type_name() == kind)
                .map(|(at, _)| *at)
                .collect()
        }

        fn reasons(&self, kind: &str) -> Vec<String> {
            let events = self.events.lock().unwrap();
            events
                .iter()
                .filter_map(|(_, k)| match k {
                    EventKind::TunnelDown { reason, .. } if kind == "tunnel_down" => {
                        Some(reason.clone())
                    }
                    EventKind::ProbeFailed { reason, .. } if kind == "probe_failed" => {
                        Some(reason.clone())
                    }
                    _ => None,
                })
                .collect()
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.handle.await.unwrap();
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_blackhole_is_confirmed_at_the_fast_pace_with_the_round_trip_timeout() {
        let switch = Switch::new(Path::Answer(ms(2)));
        let run = Running::start(&switch, adaptive);
        // At rest: one probe per interval, nothing more (0, 1, …, 10 s).
        run.until(ms(10_500)).await;
        let rest = switch.dials_between(run.t0, ms(0), ms(10_500));
        assert_eq!(
            rest,
            (0..=10).map(|s| ms(s * 1000)).collect::<Vec<_>>(),
            "one probe per interval at rest"
        );
        assert_eq!(run.times("tunnel_up"), [ms(2002)], "rise 3, 1 s apart");
        // Blackhole at 10.5 s. The probe at 11 s times out after the 200 ms floor (the 2 ms
        // round trip put the estimate far below it), the next two follow back to back (their
        // 100 ms gap is shorter than a probe): down at 11.6 s, 1.1 s after the fault, where a
        // fixed 1 s timeout and 1 s pace took 3.5 s.
        switch.set(Path::Blackhole);
        run.until(ms(30_000)).await;
        assert_eq!(run.times("tunnel_down"), [ms(11_600)]);
        assert_eq!(run.times("probe_failed"), [ms(11_200)]);
        assert!(
            run.reasons("probe_failed")[0].contains("timed out after 200ms"),
            "{:?}",
            run.reasons("probe_failed")
        );
        // Down: every `down_interval` (5 s) from the last probe's start.
        assert_eq!(
            switch.dials_between(run.t0, ms(10_500), ms(30_000)),
            [11_000, 11_200, 11_400, 16_400, 21_400, 26_400].map(ms)
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_sample_the_timeout_is_the_ceiling() {
        // Dead from the start: no round trip was ever measured, so each probe gets the full
        // 1 s; the tunnel never was up, so its pace stays the interval.
        let switch = Switch::new(Path::Blackhole);
        let run = Running::start(&switch, adaptive);
        run.until(ms(3_500)).await;
        assert_eq!(
            switch.dials_between(run.t0, ms(0), ms(3_500)),
            [0, 1000, 2000, 3000].map(ms)
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn real_traffic_failing_triggers_a_probe_at_once() {
        let switch = Switch::new(Path::Answer(ms(2)));
        let run = Running::start(&switch, adaptive);
        run.until(ms(5_300)).await;
        run.passive.send("dial: connection reset".into()).unwrap();
        run.until(ms(5_400)).await;
        // The failure is announced, and the tunnel checked at once (not at 6 s): it passes,
        // so it stays up, and the pace is back to one per interval from that probe.
        assert_eq!(run.times("probe_failed"), [ms(5_300)]);
        run.until(ms(8_000)).await;
        assert_eq!(
            switch.dials_between(run.t0, ms(5_000), ms(8_000)),
            [5_000, 5_300, 6_300, 7_300].map(ms)
        );
        assert_eq!(run.times("tunnel_down"), []);
        assert_eq!(run.times("probe_recovered"), [ms(5_302)]);
        run.stop().await;
    }

    /// Runs the defaults over a path answering after `base` plus up to `spread` for ten
    /// minutes of paused time; returns the tunnel's downs.
    async fn downs_over_ten_minutes(base: Duration, spread: Duration) -> Vec<Duration> {
        let switch = Switch::new(Path::Jitter { base, spread });
        let run = Running::start(&switch, |p| {
            adaptive(p);
            p.down_interval = p.interval;
        });
        run.until(Duration::from_secs(600)).await;
        assert!(!run.times("tunnel_up").is_empty());
        let downs = run.times("tunnel_down");
        run.stop().await;
        downs
    }

    #[tokio::test(start_paused = true)]
    async fn jittery_paths_never_go_down() {
        // 0–150 ms added per direction (0–300 ms a round trip), and a satellite-like 600 ms
        // plus up to 350 ms.
        assert_eq!(downs_over_ten_minutes(ms(0), ms(300)).await, []);
        assert_eq!(downs_over_ten_minutes(ms(600), ms(350)).await, []);
    }
}

#[cfg(test)]
impl TunnelTask {
    /// A hot tunnel task `s/t` for unit tests: `provider` runs it with `restart`, events go to
    /// `bus`, reports nowhere.
    fn for_test(
        provider: Arc<dyn Provider>,
        restart: RestartSpec,
        bus: Arc<Bus>,
        cancel: CancellationToken,
    ) -> TunnelTask {
        TunnelTask {
            slot: next_slot_id(),
            service: "s".into(),
            spec: TunnelSpec::for_test("t", 10, restart),
            provider,
            ctx: StartContext {
                tunnel: "t".into(),
                service: "s".into(),
                resolver: tunnelkeeper_providers::Resolver::new(&[std::net::IpAddr::from([
                    127, 0, 0, 1,
                ])])
                .expect("a resolver with a literal nameserver"),
            },
            bus,
            reports: mpsc::unbounded_channel().0,
            cancel,
            live: Default::default(),
            wanted: watch::channel(true).1,
            kick: Default::default(),
            metrics: Metrics::new(),
        }
    }
}
