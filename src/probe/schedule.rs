//! Adaptive probing: when a tunnel's next probe runs, and how long it may take.
//!
//! Two ideas from elsewhere, kept pure here so that a paused clock can test them:
//!
//! - **The pace** follows HAProxy's `inter`/`fastinter`/`downinter` and BFD: a healthy tunnel is
//!   probed every `interval` (the load at rest does not change); after a failed probe the next
//!   ones run every `fast_interval` until the tunnel is declared down or a probe passes, so a
//!   silent failure is confirmed quickly; a tunnel that probes declared down is probed every
//!   `down_interval`, so a dead tunnel costs little. A new incarnation that has not come up yet
//!   is probed every `interval` (the first election's `settle` counts on that). Gaps run from
//!   the start of one probe to the start of the next, never before the previous one ended.
//! - **The per-probe timeout** follows TCP's retransmission timer (RFC 6298): a smoothed round
//!   trip `srtt` and its mean deviation `rttvar` give `srtt + 4 × rttvar`, clamped to
//!   `[min_timeout, timeout]`; `timeout` alone is used until there is a sample. A probe that
//!   timed out doubles the estimate for the next one (RFC 6298 §5.5, applied before the clamp, so
//!   a fast path keeps its `min_timeout` and a jittery one gets room), and only passed probes
//!   are samples (Karn's rule: a timeout measures nothing).
//!
//! [`Detection`] is the arithmetic of the two together, for the README and `tunnelkeeper check`.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::spec::{ProbeSpec, ServiceSpec};

/// Where a tunnel is in its probe cycle; it picks the gap to the next probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started, not up yet, never declared down since: every `interval`.
    Starting,
    /// Up, last probe passed: every `interval`.
    Healthy,
    /// Up, with a streak of failures short of `fall`: every `fast_interval`.
    Failing,
    /// Declared down by probes (until `rise` passes bring it back): every `down_interval`.
    Down,
}

impl Phase {
    /// The phase of a tunnel whose verdict is `up`, with `failures` consecutive failures, and
    /// which probes have `declared_down` in this incarnation (and not brought up since).
    pub fn of(up: bool, failures: u32, declared_down: bool) -> Phase {
        match (up, declared_down) {
            (true, _) if failures > 0 => Phase::Failing,
            (true, _) => Phase::Healthy,
            (false, true) => Phase::Down,
            (false, false) => Phase::Starting,
        }
    }

    /// The gap from one probe's start to the next one's in this phase.
    pub fn gap(self, spec: &ProbeSpec) -> Duration {
        match self {
            Phase::Starting | Phase::Healthy => spec.interval,
            Phase::Failing => spec.fast_interval,
            Phase::Down => spec.down_interval,
        }
    }
}

/// When the next probe starts: `gap` after the last one started, but not before it ended.
pub fn next_start(last_start: Instant, last_end: Instant, gap: Duration) -> Instant {
    (last_start + gap).max(last_end)
}

/// The RFC 6298 round-trip estimator of one tunnel's probes.
#[derive(Debug, Clone, Default)]
pub struct RttEstimator {
    /// Smoothed round trip, seconds (None until the first sample).
    srtt: Option<f64>,
    /// Smoothed mean deviation, seconds.
    rttvar: f64,
    /// Timeouts in a row since the last sample: each doubles the estimate.
    backoff: u32,
}

impl RttEstimator {
    /// Weight of a new sample in `srtt` (RFC 6298's α).
    pub const ALPHA: f64 = 1.0 / 8.0;
    /// Weight of a new deviation in `rttvar` (RFC 6298's β).
    pub const BETA: f64 = 1.0 / 4.0;
    /// How many deviations above the mean the timeout sits (RFC 6298's K).
    pub const K: f64 = 4.0;
    /// The doubling after timeouts stops here (2⁶ = 64 ×): the ceiling has long won by then.
    const MAX_BACKOFF: u32 = 6;

    /// Adds the duration of a probe that passed.
    pub fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f64();
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2.0;
            }
            Some(srtt) => {
                self.rttvar = (1.0 - Self::BETA) * self.rttvar + Self::BETA * (srtt - r).abs();
                self.srtt = Some((1.0 - Self::ALPHA) * srtt + Self::ALPHA * r);
            }
        }
        self.backoff = 0;
    }

    /// Notes a probe that ran out of time: the next timeout doubles (within the clamp).
    pub fn timed_out(&mut self) {
        self.backoff = (self.backoff + 1).min(Self::MAX_BACKOFF);
    }

    /// The smoothed round trip, once there is a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt.map(Duration::from_secs_f64)
    }

    /// The raw estimate `(srtt + K × rttvar) × 2^backoff`, once there is a sample.
    pub fn estimate(&self) -> Option<Duration> {
        let srtt = self.srtt?;
        let rto = (srtt + Self::K * self.rttvar) * f64::from(1u32 << self.backoff);
        // Finite and non-negative by construction; `try_` keeps a corrupt value from panicking.
        Duration::try_from_secs_f64(rto).ok()
    }

    /// The timeout of the next probe: `min(ceiling, max(floor, estimate))`, or `ceiling`
    /// without samples.
    pub fn timeout(&self, floor: Duration, ceiling: Duration) -> Duration {
        match self.estimate() {
            Some(rto) => rto.max(floor).min(ceiling),
            None => ceiling,
        }
    }

    /// Forgets everything (a restarted tunnel may take another path).
    pub fn clear(&mut self) {
        *self = RttEstimator::default();
    }
}

/// How long a silent failure (a blackhole: no reply, no error) takes to mark a tunnel down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// The fault lands just before a probe starts.
    pub best: Duration,
    /// The fault lands halfway between two probes (the mean over random phases).
    pub typical: Duration,
    /// The fault lands just after a probe passed.
    pub worst: Duration,
}

impl Detection {
    /// The arithmetic when each probe times out after `timeout`: the first failing probe
    /// starts within one `interval` (half of one on average) and ends `timeout` later; each of
    /// the other `fall − 1` starts `max(fast_interval, timeout)` after the one before.
    pub fn of(spec: &ProbeSpec, timeout: Duration) -> Detection {
        let confirm = spec
            .fast_interval
            .max(timeout)
            .saturating_mul(spec.fall.saturating_sub(1));
        let after_first = timeout.saturating_add(confirm);
        Detection {
            best: after_first,
            typical: (spec.interval / 2).saturating_add(after_first),
            worst: spec.interval.saturating_add(after_first),
        }
    }

    /// On a path whose measured round trip keeps the adaptive timeout at its floor.
    pub fn fast_path(spec: &ProbeSpec) -> Detection {
        Detection::of(spec, spec.min_timeout.min(spec.timeout))
    }

    /// Before the first sample, or on a path so slow that the timeout sits at its ceiling.
    pub fn ceiling(spec: &ProbeSpec) -> Detection {
        Detection::of(spec, spec.timeout)
    }
}

/// One line for `tunnelkeeper check`: how fast the service's tunnels notice a silent failure
/// (the slowest tunnel's figures when their settings differ).
pub fn describe_detection(service: &ServiceSpec) -> String {
    let slowest = |f: fn(&ProbeSpec) -> Detection| {
        service
            .tunnels
            .iter()
            .map(|t| f(&t.probe))
            .max_by_key(|d| d.worst)
    };
    match (slowest(Detection::fast_path), slowest(Detection::ceiling)) {
        (Some(fast), Some(ceiling)) => format!(
            "service `{}`: a silent tunnel is down in {} typical, {} worst ({} at the full \
             probe timeout)",
            service.name,
            secs(fast.typical),
            secs(fast.worst),
            secs(ceiling.worst),
        ),
        _ => format!("service `{}`: no tunnels", service.name),
    }
}

/// Seconds with one decimal, for people.
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The built-in defaults: interval 1 s, timeout 1 s, fall 3, fast 100 ms, floor 200 ms.
    fn defaults() -> ProbeSpec {
        use crate::config::spec::default;
        ProbeSpec {
            interval: default::PROBE_INTERVAL,
            timeout: default::PROBE_TIMEOUT,
            rise: default::PROBE_RISE,
            fall: default::PROBE_FALL,
            fast_interval: default::probe_fast_interval(default::PROBE_INTERVAL),
            down_interval: default::PROBE_INTERVAL,
            min_timeout: default::PROBE_MIN_TIMEOUT,
            send: None,
            expect: None,
            checks: vec![],
        }
    }

    #[test]
    fn the_default_fast_interval_is_a_tenth_at_least_50ms_at_most_the_interval() {
        use crate::config::spec::default::probe_fast_interval;
        assert_eq!(probe_fast_interval(ms(1000)), ms(100));
        assert_eq!(probe_fast_interval(ms(5000)), ms(500));
        assert_eq!(probe_fast_interval(ms(300)), ms(50));
        assert_eq!(probe_fast_interval(ms(20)), ms(20));
    }

    #[test]
    fn phases_pick_their_gaps() {
        let spec = ProbeSpec {
            down_interval: ms(5000),
            ..defaults()
        };
        assert_eq!(Phase::of(false, 0, false), Phase::Starting);
        assert_eq!(Phase::of(false, 2, false), Phase::Starting);
        assert_eq!(Phase::of(true, 0, false), Phase::Healthy);
        assert_eq!(Phase::of(true, 1, false), Phase::Failing);
        assert_eq!(Phase::of(true, 2, true), Phase::Failing);
        assert_eq!(Phase::of(false, 3, true), Phase::Down);
        assert_eq!(
            Phase::of(false, 0, true),
            Phase::Down,
            "rising is still down"
        );
        assert_eq!(Phase::Starting.gap(&spec), ms(1000));
        assert_eq!(Phase::Healthy.gap(&spec), ms(1000));
        assert_eq!(Phase::Failing.gap(&spec), ms(100));
        assert_eq!(Phase::Down.gap(&spec), ms(5000));
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_probe_waits_for_the_gap_but_never_overlaps_the_last() {
        let t0 = Instant::now();
        // A 1 ms probe: the next one is a gap after its start.
        assert_eq!(next_start(t0, t0 + ms(1), ms(100)), t0 + ms(100));
        // A probe that ran 200 ms into a 100 ms gap: the next one starts as it ends.
        assert_eq!(next_start(t0, t0 + ms(200), ms(100)), t0 + ms(200));
    }

    #[test]
    fn the_timeout_is_the_ceiling_until_there_is_a_sample() {
        let rtt = RttEstimator::default();
        assert_eq!(rtt.estimate(), None);
        assert_eq!(rtt.timeout(ms(200), ms(1000)), ms(1000));
    }

    #[test]
    fn the_estimator_follows_rfc_6298() {
        let mut rtt = RttEstimator::default();
        // First sample R: srtt = R, rttvar = R/2, so the estimate is 3R.
        rtt.sample(ms(100));
        assert_eq!(rtt.srtt(), Some(ms(100)));
        assert_eq!(rtt.estimate(), Some(ms(300)));
        // Second, R' = 200: rttvar = 3/4·50 + 1/4·100 = 62.5; srtt = 7/8·100 + 1/8·200 = 112.5;
        // estimate = 112.5 + 4·62.5 = 362.5 ms.
        rtt.sample(ms(200));
        let est = rtt.estimate().unwrap().as_secs_f64();
        assert!((est - 0.3625).abs() < 1e-9, "{est}");
        assert_eq!(
            rtt.timeout(ms(200), ms(1000)),
            Duration::from_secs_f64(0.3625)
        );
        // Clamped to the ceiling and to the floor.
        assert_eq!(rtt.timeout(ms(200), ms(300)), ms(300));
        let mut fast = RttEstimator::default();
        for _ in 0..20 {
            fast.sample(ms(1));
        }
        assert!(fast.estimate().unwrap() < ms(5));
        assert_eq!(fast.timeout(ms(200), ms(1000)), ms(200));
    }

    #[test]
    fn a_steady_path_converges_and_a_jittery_one_keeps_room() {
        let mut steady = RttEstimator::default();
        for _ in 0..100 {
            steady.sample(ms(40));
        }
        let est = steady.estimate().unwrap();
        assert!(est >= ms(40) && est < ms(41), "{est:?}");
        // Alternating 0 and 300 ms: srtt settles near 150, rttvar near 150: well above 300.
        let mut jittery = RttEstimator::default();
        for i in 0..100 {
            jittery.sample(ms(if i % 2 == 0 { 0 } else { 300 }));
        }
        let est = jittery.timeout(ms(200), ms(1000));
        assert!(est > ms(600), "{est:?}");
    }

    #[test]
    fn a_timeout_doubles_the_estimate_before_the_clamp_and_a_sample_resets_it() {
        let mut rtt = RttEstimator::default();
        rtt.sample(ms(100)); // estimate 300 ms
        rtt.timed_out();
        assert_eq!(rtt.timeout(ms(200), ms(1000)), ms(600));
        rtt.timed_out();
        assert_eq!(
            rtt.timeout(ms(200), ms(1000)),
            ms(1000),
            "the ceiling holds"
        );
        for _ in 0..100 {
            rtt.timed_out();
        }
        assert_eq!(rtt.timeout(ms(200), ms(1000)), ms(1000));
        rtt.sample(ms(100));
        assert!(rtt.timeout(ms(200), ms(1000)) < ms(300));
        // A fast path keeps its floor through timeouts: a blackhole is still caught quickly.
        let mut fast = RttEstimator::default();
        fast.sample(ms(1)); // estimate 3 ms
        for expected in [6, 12, 24, 48] {
            fast.timed_out();
            assert_eq!(fast.estimate(), Some(ms(expected)));
            assert_eq!(fast.timeout(ms(200), ms(1000)), ms(200));
        }
        fast.clear();
        assert_eq!(fast.timeout(ms(200), ms(1000)), ms(1000));
    }

    #[test]
    fn check_describes_the_slowest_tunnel_of_a_service() {
        use crate::config::spec::{RestartSpec, TunnelSpec};
        let restart = RestartSpec {
            initial: ms(500),
            max: ms(60_000),
            multiplier: 2.0,
            jitter: 0.2,
            when_down: ms(30_000),
        };
        let mut quick = TunnelSpec::for_test("quick", 10, restart);
        quick.probe = defaults();
        let mut slow = TunnelSpec::for_test("slow", 20, restart);
        slow.probe = ProbeSpec {
            interval: ms(2000),
            fast_interval: ms(200),
            ..defaults()
        };
        let config = crate::config::parse(
            "version: 1\nservices: [{ name: web, tunnels: [{ name: t, provider: direct, \
             address: \"127.0.0.1:1\" }] }]",
            std::path::Path::new("test.yaml"),
        )
        .unwrap();
        let mut service = config.services[0].clone();
        assert_eq!(
            describe_detection(&service),
            "service `web`: a silent tunnel is down in 1.1s typical, 1.6s worst (4.0s at the \
             full probe timeout)"
        );
        service.tunnels = vec![quick, slow];
        // The slow one: 2 s + 200 ms + 2 × 200 ms = 2.6 s; 1 s + 0.6 s typical.
        assert_eq!(
            describe_detection(&service),
            "service `web`: a silent tunnel is down in 1.6s typical, 2.6s worst (5.0s at the \
             full probe timeout)"
        );
        service.tunnels.clear();
        assert_eq!(describe_detection(&service), "service `web`: no tunnels");
    }

    #[test]
    fn detection_arithmetic_at_the_defaults() {
        let spec = defaults();
        // Fast path: timeout 200 ms; probes after the first start back to back (200 > 100).
        // Worst: 1 s + 200 ms + 2 × 200 ms = 1.6 s; typical: 0.5 s + 0.6 s = 1.1 s.
        assert_eq!(
            Detection::fast_path(&spec),
            Detection {
                best: ms(600),
                typical: ms(1100),
                worst: ms(1600)
            }
        );
        // At the 1 s ceiling: 1 s + 1 s + 2 × 1 s = 4 s (the figure before adaptive probing).
        assert_eq!(
            Detection::ceiling(&spec),
            Detection {
                best: ms(3000),
                typical: ms(3500),
                worst: ms(4000)
            }
        );
        // A fast interval above the timeout spaces the confirmations.
        let slow = ProbeSpec {
            fast_interval: ms(500),
            ..defaults()
        };
        assert_eq!(Detection::fast_path(&slow).worst, ms(1000 + 200 + 1000));
        // fall 1: the first failing probe decides.
        let one = ProbeSpec {
            fall: 1,
            ..defaults()
        };
        assert_eq!(Detection::fast_path(&one).worst, ms(1200));
    }
}
