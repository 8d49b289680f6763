//! Integration tests of `tunnelkeeper::election`: one test (at least) per election rule, with
//! instants produced by a hand-driven clock, plus property tests over random inputs for the
//! invariants every election must keep.
//!
//! Why not `#[tokio::test(start_paused = true)]` + `tokio::time::advance`: those need tokio's
//! `test-util` feature, which `full` does not include and this package does not enable. The
//! election is a pure function of `now`, so a base `Instant` advanced by hand is exactly as
//! deterministic, and needs no runtime.

use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;
use tunnelkeeper::election::{
    elect, settle, Contender, Dampening, Decision, Failback, FirstVerdict, Input, Mode, Policy,
    Reason, Settle, DAMPENING_MAX_HOLD, DAMPENING_WINDOW,
};

const HOLD: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The defaults of DESIGN.md (`defaults.failover`).
fn policy(mode: Mode) -> Policy {
    Policy {
        mode,
        tolerance: ms(50),
        max_latency: ms(500),
        failback: Failback::Auto,
        failback_hold: HOLD,
    }
}

/// An up tunnel, up since `since`, no latency sample, the default hold.
fn up(name: &str, priority: i64, since: Instant) -> Contender {
    Contender {
        name: name.to_owned(),
        priority,
        up: true,
        latency: None,
        up_since: Some(since),
        hold: HOLD,
        last_down: None,
        last_down_hard: false,
        first_up: false,
    }
}

/// A down tunnel that went down for `why`.
fn down(name: &str, priority: i64, why: &str, hard: bool) -> Contender {
    Contender {
        name: name.to_owned(),
        priority,
        up: false,
        latency: None,
        up_since: None,
        hold: HOLD,
        last_down: Some(why.to_owned()),
        last_down_hard: hard,
        first_up: false,
    }
}

fn with_latency(mut c: Contender, latency: Duration) -> Contender {
    c.latency = Some(latency);
    c
}

fn run(
    contenders: &[Contender],
    policy: &Policy,
    current: Option<&str>,
    pin: Option<&str>,
    now: Instant,
) -> Decision {
    elect(&Input {
        contenders,
        policy,
        current,
        pin,
        now,
    })
}

/// A clock that only moves when told to, mirroring `tokio::time::advance` on a paused clock.
struct Clock {
    now: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            now: Instant::now(),
        }
    }

    fn now(&self) -> Instant {
        self.now
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Moves on by `ago` and returns (instant before, instant after), so tunnels can have
    /// been up for a while.
    fn later(&mut self, ago: Duration) -> (Instant, Instant) {
        let start = self.now;
        self.advance(ago);
        (start, self.now)
    }
}

fn first(mut c: Contender) -> Contender {
    c.first_up = true;
    c
}

#[test]
fn a_first_up_takes_over_at_once_as_better_and_a_return_waits_for_its_hold() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    for mode in [Mode::Priority, Mode::Latency] {
        let p = policy(mode);
        // `lan` just came up for the first time; `vps` has been primary for a minute.
        let tunnels = [
            with_latency(first(up("lan", 10, now)), ms(5)),
            with_latency(up("vps", 20, t0), ms(80)),
        ];
        let d = run(&tunnels, &p, Some("vps"), None, now);
        assert_eq!(d.primary.as_deref(), Some("lan"), "{mode:?}");
        assert_eq!(d.reason, Reason::Better, "{mode:?}");
        assert_eq!(d.reason.to_string(), "better");
        // The same tunnel coming back after a down serves its hold.
        let tunnels = [
            with_latency(up("lan", 10, now), ms(5)),
            with_latency(up("vps", 20, t0), ms(80)),
        ];
        let d = run(&tunnels, &p, Some("vps"), None, now);
        assert_eq!(d.primary.as_deref(), Some("vps"), "{mode:?}");
        assert_eq!(d.recheck_at, Some(now + HOLD), "{mode:?}");
    }
}

#[test]
fn the_first_election_waits_for_every_first_verdict_a_pin_or_the_deadline() {
    let mut clock = Clock::new();
    let start = clock.now();
    let deadline = start + secs(4);
    let tunnels = [
        first(up("vps", 20, start)),
        down("lan", 10, "starting", false),
    ];
    let pending = [FirstVerdict::Up, FirstVerdict::Pending];
    clock.advance(secs(1));
    assert_eq!(
        settle(&tunnels, &pending, None, deadline, clock.now()),
        Settle::Until(deadline),
        "lan has said nothing yet"
    );
    let spoke = [FirstVerdict::Up, FirstVerdict::NotUp];
    assert_eq!(
        settle(&tunnels, &spoke, None, deadline, clock.now()),
        Settle::Done
    );
    // An up pinned tunnel ends the wait; a down one does not.
    assert_eq!(
        settle(&tunnels, &pending, Some("vps"), deadline, clock.now()),
        Settle::Done
    );
    assert_eq!(
        settle(&tunnels, &pending, Some("lan"), deadline, clock.now()),
        Settle::Until(deadline)
    );
    clock.advance(secs(3) - ms(1));
    assert_eq!(
        settle(&tunnels, &pending, None, deadline, clock.now()),
        Settle::Until(deadline)
    );
    clock.advance(ms(1));
    assert_eq!(
        settle(&tunnels, &pending, None, deadline, clock.now()),
        Settle::Done
    );
}

#[test]
fn priority_mode_elects_lowest_priority_first() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    let tunnels = [up("cf", 30, t0), up("lan", 10, t0), up("vps", 20, t0)];
    let d = run(&tunnels, &policy(Mode::Priority), None, None, now);
    assert_eq!(d.primary.as_deref(), Some("lan"));
    assert_eq!(d.reason, Reason::Initial);
    assert!(!d.degraded);
    assert_eq!(d.recheck_at, None);
}

#[test]
fn priority_ties_are_broken_by_name_and_do_not_cause_failback() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    let tunnels = [up("b", 10, t0), up("a", 10, t0)];
    let p = policy(Mode::Priority);
    let d = run(&tunnels, &p, None, None, now);
    assert_eq!(d.primary.as_deref(), Some("a"));
    // Equal priority is not better: a current "b" is kept even though "a" has served its hold.
    let d = run(&tunnels, &p, Some("b"), None, now);
    assert_eq!(d.primary.as_deref(), Some("b"));
    assert_eq!(d.reason, Reason::Unchanged);
}

#[test]
fn latency_mode_elects_fastest_and_ranks_unsampled_last() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    let tunnels = [
        up("fresh", 1, t0),
        with_latency(up("slow", 1, t0), ms(200)),
        with_latency(up("fast", 9, t0), ms(20)),
    ];
    let d = run(&tunnels, &policy(Mode::Latency), None, None, now);
    assert_eq!(d.primary.as_deref(), Some("fast"));
    assert_eq!(d.reason, Reason::Initial);
    // Equal latency: priority then name decide.
    let tied = [
        with_latency(up("b", 5, t0), ms(20)),
        with_latency(up("a", 5, t0), ms(20)),
        with_latency(up("c", 1, t0), ms(20)),
    ];
    let d = run(&tied, &policy(Mode::Latency), None, None, now);
    assert_eq!(d.primary.as_deref(), Some("c"));
}

#[test]
fn latency_tolerance_keeps_current_within_tolerance() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(600));
    let p = policy(Mode::Latency); // tolerance 50ms
                                   // Exactly the tolerance better is not MORE than the tolerance.
    let tunnels = [
        with_latency(up("cur", 1, t0), ms(100)),
        with_latency(up("chal", 2, t0), ms(50)),
    ];
    let d = run(&tunnels, &p, Some("cur"), None, now);
    assert_eq!(d.primary.as_deref(), Some("cur"));
    assert_eq!(d.reason, Reason::Unchanged);
    assert_eq!(d.recheck_at, None);
}

#[test]
fn latency_tolerance_switches_beyond_tolerance() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(600));
    let p = policy(Mode::Latency);
    let tunnels = [
        with_latency(up("cur", 1, t0), ms(100)),
        with_latency(up("chal", 2, t0), ms(49)),
    ];
    let d = run(&tunnels, &p, Some("cur"), None, now);
    assert_eq!(d.primary.as_deref(), Some("chal"));
    assert_eq!(d.reason, Reason::BetterLatency);
    assert!(!d.degraded);
}

#[test]
fn max_latency_ceiling_excludes_degraded_tunnels_but_not_unsampled_ones() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    let p = policy(Mode::Priority); // ceiling 500ms
    let tunnels = [
        with_latency(up("best", 1, t0), ms(501)),
        up("unsampled", 2, t0),
        with_latency(up("ok", 3, t0), ms(500)),
    ];
    let d = run(&tunnels, &p, None, None, now);
    assert_eq!(d.primary.as_deref(), Some("unsampled"));
    assert!(!d.degraded);
    let d = run(&tunnels[..1], &p, None, None, now);
    assert!(
        d.degraded,
        "a tunnel over the ceiling is never a healthy primary"
    );
    let d = run(
        &[tunnels[0].clone(), tunnels[2].clone()],
        &p,
        None,
        None,
        now,
    );
    assert_eq!(
        d.primary.as_deref(),
        Some("ok"),
        "the ceiling itself is allowed"
    );
}

#[test]
fn degraded_primary_is_replaced_at_once_without_hold() {
    let mut clock = Clock::new();
    let (t0, _) = clock.later(secs(60));
    let fresh = clock.now();
    clock.advance(secs(1));
    let now = clock.now();
    let tunnels = [
        with_latency(up("cur", 1, t0), ms(900)),
        with_latency(up("other", 5, fresh), ms(30)),
    ];
    let d = run(&tunnels, &policy(Mode::Priority), Some("cur"), None, now);
    assert_eq!(d.primary.as_deref(), Some("other"));
    assert_eq!(d.reason, Reason::PrimaryDegraded);
    assert!(!d.degraded);
}

#[test]
fn failback_waits_for_hold_then_happens_at_recheck_at() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let backup_since = clock.now();
    clock.advance(secs(120));
    let lan_since = clock.now();
    clock.advance(secs(10));
    let tunnels = [up("lan", 10, lan_since), up("vps", 20, backup_since)];

    // Not before: lan has been up 10s of its 30s hold.
    let d = run(&tunnels, &p, Some("vps"), None, clock.now());
    assert_eq!(d.primary.as_deref(), Some("vps"));
    assert_eq!(d.reason, Reason::Unchanged);
    assert_eq!(d.recheck_at, Some(lan_since + HOLD));
    let wake = d.recheck_at.expect("a hold is pending");

    // Still not one millisecond before the hold expires.
    clock.advance(wake - clock.now() - ms(1));
    let d = run(&tunnels, &p, Some("vps"), None, clock.now());
    assert_eq!(d.primary.as_deref(), Some("vps"));
    assert_eq!(d.recheck_at, Some(wake));

    // Yes, at the instant recheck_at named.
    clock.advance(ms(1));
    assert_eq!(clock.now(), wake);
    let d = run(&tunnels, &p, Some("vps"), None, clock.now());
    assert_eq!(d.primary.as_deref(), Some("lan"));
    assert_eq!(d.reason, Reason::Failback);
    assert_eq!(d.recheck_at, None);
}

#[test]
fn failback_to_a_ready_tunnel_is_not_blocked_by_a_better_unready_one() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (t0, _) = clock.later(secs(300));
    let flapper_since = clock.now();
    clock.advance(secs(5));
    let mut flapper = up("flapper", 10, flapper_since);
    flapper.hold = secs(600);
    let tunnels = [flapper, up("stable", 20, t0), up("cur", 30, t0)];
    let d = run(&tunnels, &p, Some("cur"), None, clock.now());
    assert_eq!(d.primary.as_deref(), Some("stable"));
    assert_eq!(d.reason, Reason::Failback);
    // The flapper would still beat the new primary once its hold is served.
    assert_eq!(d.recheck_at, Some(flapper_since + secs(600)));
}

#[test]
fn dampening_grows_hold_per_extra_down_and_forgets_after_window() {
    let mut clock = Clock::new();
    let base = secs(10);
    let mut damp = Dampening::default();
    assert_eq!(damp.hold(base, clock.now()), base);

    let first_down = clock.now();
    damp.record_down(first_down);
    assert_eq!(damp.hold(base, clock.now()), base, "the first down is free");
    assert_eq!(damp.next_expiry(clock.now()), None, "nothing to shrink");
    clock.advance(secs(60));
    damp.record_down(clock.now());
    assert_eq!(damp.hold(base, clock.now()), secs(20));
    clock.advance(secs(60));
    damp.record_down(clock.now());
    assert_eq!(damp.hold(base, clock.now()), secs(40));
    assert_eq!(damp.recent_downs(clock.now()), 3);
    assert_eq!(
        damp.next_expiry(clock.now()),
        Some(first_down + DAMPENING_WINDOW)
    );

    // The first down leaves the window exactly DAMPENING_WINDOW after it happened.
    clock.advance(DAMPENING_WINDOW - secs(120));
    assert_eq!(damp.recent_downs(clock.now()), 2);
    assert_eq!(damp.hold(base, clock.now()), secs(20));
    clock.advance(secs(120));
    assert_eq!(damp.recent_downs(clock.now()), 0);
    assert_eq!(damp.hold(base, clock.now()), base);
    assert_eq!(damp.next_expiry(clock.now()), None);
}

#[test]
fn dampening_hold_is_capped() {
    let mut clock = Clock::new();
    let mut damp = Dampening::default();
    for _ in 0..20 {
        damp.record_down(clock.now());
        clock.advance(secs(1));
    }
    let now = clock.now();
    // 2^6 x base when that is below the absolute cap...
    assert_eq!(damp.hold(secs(1), now), secs(64));
    // ...and the absolute cap when 2^6 x base would be above it.
    assert_eq!(damp.hold(secs(30), now), DAMPENING_MAX_HOLD);
    // A base already above the cap is never shortened.
    assert_eq!(damp.hold(secs(3600), now), secs(3600));
}

#[test]
fn dampened_hold_delays_failback() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (t0, _) = clock.later(secs(300));
    let mut damp = Dampening::default();
    for _ in 0..3 {
        damp.record_down(clock.now());
        clock.advance(secs(5));
    }
    let lan_since = clock.now();
    clock.advance(HOLD);
    let mut lan = up("lan", 10, lan_since);
    lan.hold = damp.hold(p.failback_hold, clock.now());
    assert_eq!(lan.hold, HOLD * 4);
    let tunnels = [lan, up("vps", 20, t0)];
    let d = run(&tunnels, &p, Some("vps"), None, clock.now());
    assert_eq!(
        d.primary.as_deref(),
        Some("vps"),
        "the base hold alone is not enough"
    );
    assert_eq!(d.recheck_at, Some(lan_since + HOLD * 4));
}

#[test]
fn manual_failback_never_replaces_a_healthy_primary() {
    let mut clock = Clock::new();
    let mut p = policy(Mode::Priority);
    p.failback = Failback::Manual;
    let (t0, now) = clock.later(secs(3600));
    let tunnels = [up("lan", 10, t0), up("vps", 20, t0)];
    let d = run(&tunnels, &p, Some("vps"), None, now);
    assert_eq!(d.primary.as_deref(), Some("vps"));
    assert_eq!(d.reason, Reason::Unchanged);
    assert_eq!(
        d.recheck_at, None,
        "no hold can change a manual-failback answer"
    );

    let mut p = policy(Mode::Latency);
    p.failback = Failback::Manual;
    let tunnels = [
        with_latency(up("fast", 1, t0), ms(5)),
        with_latency(up("slow", 2, t0), ms(400)),
    ];
    let d = run(&tunnels, &p, Some("slow"), None, now);
    assert_eq!(d.primary.as_deref(), Some("slow"));
}

#[test]
fn manual_failback_still_fails_over_when_primary_goes_down() {
    let mut clock = Clock::new();
    let mut p = policy(Mode::Priority);
    p.failback = Failback::Manual;
    let (t0, now) = clock.later(secs(60));
    let tunnels = [
        up("lan", 10, t0),
        down("vps", 20, "probe: 3 consecutive failures", false),
    ];
    let d = run(&tunnels, &p, Some("vps"), None, now);
    assert_eq!(d.primary.as_deref(), Some("lan"));
    assert!(matches!(d.reason, Reason::PrimaryDown { .. }));
}

#[test]
fn pin_wins_while_up_even_over_the_ceiling_and_hold() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (t0, _) = clock.later(secs(60));
    let pinned_since = clock.now();
    clock.advance(secs(1));
    let now = clock.now();
    let tunnels = [
        up("lan", 10, t0),
        with_latency(up("slow", 50, pinned_since), ms(900)),
    ];
    let d = run(&tunnels, &p, Some("lan"), Some("slow"), now);
    assert_eq!(d.primary.as_deref(), Some("slow"));
    assert_eq!(d.reason, Reason::Pinned);
    assert!(
        d.degraded,
        "pinned but over the ceiling is still reported as degraded"
    );
    assert_eq!(d.recheck_at, None);

    // Once in force, re-running the election changes nothing.
    let d = run(&tunnels, &p, Some("slow"), Some("slow"), now);
    assert_eq!(d.primary.as_deref(), Some("slow"));
    assert_eq!(d.reason, Reason::Unchanged);
}

#[test]
fn pin_is_ignored_when_pinned_tunnel_is_down_or_unknown() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (t0, now) = clock.later(secs(60));
    let tunnels = [
        up("lan", 10, t0),
        up("vps", 20, t0),
        down("cf", 5, "hard: child exited (status 1)", true),
    ];
    for pin in ["cf", "no-such-tunnel"] {
        let d = run(&tunnels, &p, Some("vps"), Some(pin), now);
        assert_eq!(d.primary.as_deref(), Some("lan"), "pin {pin}");
        assert_eq!(d.reason, Reason::Failback, "pin {pin}");
    }
    // A pinned tunnel going down lets normal failover happen at once.
    let d = run(&tunnels, &p, Some("cf"), Some("cf"), now);
    assert_eq!(d.primary.as_deref(), Some("lan"));
    assert!(matches!(d.reason, Reason::PrimaryDown { hard: true, .. }));
}

#[test]
fn unpin_falls_back_to_normal_rules() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (t0, now) = clock.later(secs(60));
    let tunnels = [up("lan", 10, t0), up("vps", 20, t0)];
    let d = run(&tunnels, &p, Some("vps"), None, now);
    assert_eq!(d.primary.as_deref(), Some("lan"));
    assert_eq!(Reason::Unpinned.as_str(), "unpinned");
}

#[test]
fn no_candidate_keeps_last_primary_as_degraded_fallback() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (_, now) = clock.later(secs(60));
    let tunnels = [
        down("lan", 10, "probe: 3 consecutive failures", false),
        down("vps", 20, "hard: ssh disconnected", true),
    ];
    let d = run(&tunnels, &p, Some("vps"), None, now);
    assert_eq!(d.primary.as_deref(), Some("vps"));
    assert_eq!(d.reason, Reason::NoCandidate);
    assert!(d.degraded);
    assert_eq!(d.recheck_at, None);

    // Without a previous primary there is nothing to fall back on.
    let d = run(&tunnels, &p, None, None, now);
    assert_eq!(d.primary, None);
    assert_eq!(d.reason, Reason::NoCandidate);
    assert!(d.degraded);
}

#[test]
fn no_candidate_picks_least_bad_degraded_tunnel() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    let tunnels = [
        down("lan", 1, "probe: 3 consecutive failures", false),
        with_latency(up("far", 20, t0), ms(2000)),
        with_latency(up("near", 30, t0), ms(800)),
    ];
    let d = run(&tunnels, &policy(Mode::Latency), Some("lan"), None, now);
    assert_eq!(d.primary.as_deref(), Some("near"));
    assert_eq!(d.reason, Reason::NoCandidate);
    assert!(d.degraded);
    let d = run(&tunnels, &policy(Mode::Priority), Some("lan"), None, now);
    assert_eq!(d.primary.as_deref(), Some("far"));
    assert!(d.degraded);
    // A degraded current primary that is still up is kept rather than churned.
    let d = run(&tunnels, &policy(Mode::Latency), Some("far"), None, now);
    assert_eq!(d.primary.as_deref(), Some("far"));
    assert!(d.degraded);
}

#[test]
fn primary_down_reason_distinguishes_hard_from_soft() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    let (t0, now) = clock.later(secs(60));

    let hard = [
        down("lan", 10, "child exited (signal 9)", true),
        up("vps", 20, t0),
    ];
    let d = run(&hard, &p, Some("lan"), None, now);
    assert_eq!(d.primary.as_deref(), Some("vps"));
    assert_eq!(
        d.reason,
        Reason::PrimaryDown {
            hard: true,
            detail: "child exited (signal 9)".to_owned()
        }
    );
    assert_eq!(
        d.reason.to_string(),
        "primary_down (hard: child exited (signal 9))"
    );

    let soft = [
        down("lan", 10, "probe: 3 consecutive failures", false),
        up("vps", 20, t0),
    ];
    let d = run(&soft, &p, Some("lan"), None, now);
    assert_eq!(
        d.reason,
        Reason::PrimaryDown {
            hard: false,
            detail: "probe: 3 consecutive failures".to_owned()
        }
    );
    assert_eq!(d.reason.as_str(), "primary_down");
    assert_eq!(
        d.reason.to_string(),
        "primary_down (probe: 3 consecutive failures)"
    );
}

#[test]
fn failover_on_down_ignores_the_hold() {
    let mut clock = Clock::new();
    let p = policy(Mode::Priority);
    clock.advance(secs(60));
    let just_up = clock.now();
    let tunnels = [
        down("lan", 10, "hard: child exited", true),
        up("vps", 20, just_up),
    ];
    let d = run(&tunnels, &p, Some("lan"), None, clock.now());
    assert_eq!(d.primary.as_deref(), Some("vps"));
}

#[test]
fn unchanged_when_nothing_changes() {
    let mut clock = Clock::new();
    let (t0, now) = clock.later(secs(60));
    let tunnels = [up("lan", 10, t0), up("vps", 20, t0)];
    let p = policy(Mode::Priority);
    let first = run(&tunnels, &p, None, None, now);
    let again = run(&tunnels, &p, first.primary.as_deref(), None, now);
    assert_eq!(again.primary, first.primary);
    assert_eq!(again.reason, Reason::Unchanged);
}

#[test]
fn reason_words_are_stable_snake_case() {
    let words = [
        (Reason::Initial, "initial"),
        (Reason::Unchanged, "unchanged"),
        (Reason::PrimaryDegraded, "primary_degraded"),
        (Reason::Failback, "failback"),
        (Reason::BetterLatency, "better_latency"),
        (Reason::Pinned, "pinned"),
        (Reason::Unpinned, "unpinned"),
        (Reason::NoCandidate, "no_candidate"),
    ];
    for (reason, word) in words {
        assert_eq!(reason.as_str(), word);
        assert_eq!(reason.to_string(), word);
    }
    let down = Reason::PrimaryDown {
        hard: false,
        detail: String::new(),
    };
    assert_eq!(down.to_string(), "primary_down");
}

#[test]
fn mode_and_failback_use_snake_case_in_config() -> Result<(), serde_json::Error> {
    assert_eq!(serde_json::from_str::<Mode>("\"latency\"")?, Mode::Latency);
    assert_eq!(
        serde_json::from_str::<Mode>("\"priority\"")?,
        Mode::Priority
    );
    assert_eq!(
        serde_json::from_str::<Failback>("\"manual\"")?,
        Failback::Manual
    );
    assert_eq!(serde_json::to_string(&Failback::Auto)?, "\"auto\"");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Property tests. Instants are a fixed base plus generated offsets, so no clock is involved.

/// A generated scenario: contenders with unique names, policy, current, pin, and `now`.
#[derive(Debug, Clone)]
struct Scenario {
    contenders: Vec<Contender>,
    policy: Policy,
    current: Option<String>,
    pin: Option<String>,
    now: Instant,
}

/// Raw fields of one contender: priority, up, latency ms, up_since offset s, hold s, hard.
fn contender_strategy() -> impl Strategy<Value = (i64, bool, Option<u64>, u64, u64, bool)> {
    (
        0i64..4,                          // priority (small range: plenty of ties)
        any::<bool>(),                    // up
        proptest::option::of(0u64..1000), // latency ms
        0u64..=200,                       // up_since offset s from base (now = base + 200s)
        0u64..90,                         // hold s
        any::<bool>(),                    // last_down_hard
    )
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    let base = Instant::now();
    let now = base + secs(200);
    let names = prop_oneof![
        Just(None),
        (0usize..7).prop_map(|i| Some(format!("t{i}"))),
        Just(Some("ghost".to_owned())),
    ];
    (
        proptest::collection::vec(contender_strategy(), 0..6),
        any::<bool>(),
        0u64..100,
        100u64..800,
        any::<bool>(),
        names.clone(),
        names,
    )
        .prop_map(
            move |(raw, latency_mode, tolerance, max_latency, auto, current, pin)| {
                let contenders = raw
                    .into_iter()
                    .enumerate()
                    .map(
                        |(i, (priority, up, latency, since, hold, hard))| Contender {
                            name: format!("t{i}"),
                            priority,
                            up,
                            latency: latency.map(ms),
                            up_since: up.then(|| base + secs(since)),
                            hold: secs(hold),
                            last_down: (!up).then(|| "probe: 3 consecutive failures".to_owned()),
                            last_down_hard: hard,
                            first_up: false,
                        },
                    )
                    .collect();
                Scenario {
                    contenders,
                    policy: Policy {
                        mode: if latency_mode {
                            Mode::Latency
                        } else {
                            Mode::Priority
                        },
                        tolerance: ms(tolerance),
                        max_latency: ms(max_latency),
                        failback: if auto {
                            Failback::Auto
                        } else {
                            Failback::Manual
                        },
                        failback_hold: HOLD,
                    },
                    current,
                    pin,
                    now,
                }
            },
        )
}

impl Scenario {
    fn elect(&self) -> Decision {
        run(
            &self.contenders,
            &self.policy,
            self.current.as_deref(),
            self.pin.as_deref(),
            self.now,
        )
    }

    fn find(&self, name: &str) -> Option<&Contender> {
        self.contenders.iter().find(|c| c.name == name)
    }

    fn healthy(&self, c: &Contender) -> bool {
        c.up && c.latency.is_none_or(|l| l <= self.policy.max_latency)
    }

    fn served_hold(&self, c: &Contender) -> bool {
        c.up_since
            .is_some_and(|s| self.now.saturating_duration_since(s) >= c.hold)
    }

    /// The current primary, if it is up and within the ceiling.
    fn healthy_current(&self) -> Option<&Contender> {
        let current = self.find(self.current.as_deref()?)?;
        self.healthy(current).then_some(current)
    }

    /// The pin is in force (names an up tunnel).
    fn pin_in_force(&self) -> bool {
        self.pin
            .as_deref()
            .and_then(|p| self.find(p))
            .is_some_and(|c| c.up)
    }
}

proptest! {
    #[test]
    fn never_elects_a_down_tunnel_except_as_degraded_fallback(s in scenario_strategy()) {
        let d = s.elect();
        if let Some(primary) = d.primary.as_deref() {
            let is_up = s.find(primary).is_some_and(|c| c.up);
            prop_assert!(
                is_up || (d.degraded && d.primary == s.current),
                "elected {primary:?} which is down: {d:?}"
            );
        }
    }

    #[test]
    fn never_changes_primary_without_a_cause(s in scenario_strategy()) {
        let d = s.elect();
        let changed = d.primary.as_deref() != s.current.as_deref();
        if changed {
            prop_assert_ne!(&d.reason, &Reason::Unchanged);
        }
        if let Some(current) = s.healthy_current() {
            let displaced_by_pin = s.pin_in_force() && s.pin != s.current;
            let some_ready = s.contenders.iter().any(|c| {
                c.name != current.name && s.healthy(c) && s.served_hold(c)
            });
            if !displaced_by_pin && !some_ready {
                prop_assert!(!changed, "healthy current replaced without cause: {d:?}");
            }
            if !displaced_by_pin && s.policy.failback == Failback::Manual {
                prop_assert!(!changed, "manual failback replaced a healthy primary: {d:?}");
            }
        }
    }

    #[test]
    fn never_fails_back_before_the_hold(s in scenario_strategy()) {
        let d = s.elect();
        if s.pin.is_none() && s.healthy_current().is_some() {
            if let Some(primary) = d.primary.as_deref() {
                if Some(primary) != s.current.as_deref() {
                    let new = s.find(primary);
                    prop_assert!(
                        new.is_some_and(|c| s.served_hold(c)),
                        "failed back to {primary:?} before its hold: {d:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn answer_only_changes_with_time_at_recheck_at(s in scenario_strategy()) {
        let d = s.elect();
        if let Some(at) = d.recheck_at {
            prop_assert!(at > s.now);
        }
        // Up to just before recheck_at (or far in the future when there is none), with the
        // decision applied and no input changed, the answer stays the same.
        let until = d.recheck_at.unwrap_or(s.now + secs(100_000));
        let mut applied = s.clone();
        applied.current = d.primary.clone();
        applied.now = until - ms(1);
        prop_assert_eq!(applied.elect().primary, d.primary.clone());
    }

    #[test]
    fn answer_does_not_depend_on_contender_order(s in scenario_strategy()) {
        let mut reversed = s.clone();
        reversed.contenders.reverse();
        prop_assert_eq!(s.elect(), reversed.elect());
    }
}

#[test]
fn dial_order_tries_the_primary_then_healthy_then_degraded_and_skips_down_ones() {
    use tunnelkeeper::election::dial_order;
    let mut clock = Clock::new();
    let (t0, _) = clock.later(secs(60));
    let mut slow = up("slow", 5, t0);
    slow.latency = Some(Duration::from_secs(2));
    let tunnels = [
        up("c", 30, t0),
        down("a", 10, "probe", false),
        slow,
        up("b", 20, t0),
        up("d", 40, t0),
    ];
    let p = policy(Mode::Priority);
    assert_eq!(dial_order(&tunnels, &p, Some("d")), ["d", "b", "c", "slow"]);
    assert_eq!(dial_order(&tunnels, &p, None), ["b", "c", "d", "slow"]);
    // Nothing up: every tunnel is worth a try, best first.
    let all_down = [down("y", 2, "x", true), down("x", 1, "x", true)];
    assert_eq!(dial_order(&all_down, &p, None), ["x", "y"]);
}
