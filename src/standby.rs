//! Cold standby: when a `standby: cold` tunnel should run.
//!
//! A cold tunnel (a metered or single-session provider, such as ngrok's free tier) is started
//! only while no better tunnel — one with a lower `priority` — is up, and stopped again once a
//! better tunnel has held its place for its failback hold, so a flapping better tunnel cannot
//! start and stop it in a loop. At start-up the better tunnels get a grace period to come up
//! before the cold one is woken. Pure: the service loop calls [`wanted`] after every change.

use std::time::Duration;

use tokio::time::Instant;

use crate::election::Contender;

/// How long after the service starts a cold tunnel waits for better tunnels that have neither
/// come up nor failed yet (they may still be starting or probing).
pub const STARTUP_GRACE: Duration = Duration::from_secs(20);

/// Whether cold tunnel `index` should run now, and when the answer may change without any
/// report arriving (a hold or the start-up grace expiring).
pub fn wanted(
    contenders: &[Contender],
    index: usize,
    running: bool,
    started: Instant,
    now: Instant,
) -> (bool, Option<Instant>) {
    let Some(me) = contenders.get(index) else {
        return (false, None);
    };
    let better: Vec<&Contender> = contenders
        .iter()
        .filter(|c| c.priority < me.priority)
        .collect();
    if better.is_empty() {
        return (true, None);
    }
    let mut recheck: Option<Instant> = None;
    let mut earliest = |at: Instant| recheck = Some(recheck.map_or(at, |r| r.min(at)));
    if running {
        // Stop only once a better tunnel has been up for its whole hold.
        for c in better.iter().filter(|c| c.up) {
            let held_from = c.up_since.unwrap_or(now) + c.hold;
            if held_from <= now {
                return (false, None);
            }
            earliest(held_from);
        }
        return (true, recheck);
    }
    if better.iter().any(|c| c.up) {
        return (false, None);
    }
    // Nothing better is up: wake, unless better tunnels may still be coming up.
    let grace_over = started + STARTUP_GRACE;
    let undecided = better.iter().any(|c| c.last_down.is_none());
    if undecided && now < grace_over {
        earliest(grace_over);
        return (false, recheck);
    }
    (true, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, priority: i64, up_since: Option<Instant>, failed: bool) -> Contender {
        Contender {
            name: name.into(),
            priority,
            up: up_since.is_some(),
            latency: None,
            up_since,
            hold: Duration::from_secs(30),
            last_down: failed.then(|| "down".to_string()),
            last_down_hard: failed,
            first_up: false,
        }
    }

    #[test]
    fn waits_during_start_up_then_wakes_when_better_tunnels_fail() {
        let t0 = Instant::now();
        let cold = c("ng", 50, None, false);
        // Start-up: the better tunnel is neither up nor failed yet.
        let list = [c("lan", 10, None, false), cold.clone()];
        assert_eq!(
            wanted(&list, 1, false, t0, t0),
            (false, Some(t0 + STARTUP_GRACE))
        );
        // It failed: wake the cold tunnel at once.
        let list = [c("lan", 10, None, true), cold.clone()];
        assert_eq!(wanted(&list, 1, false, t0, t0), (true, None));
        // Grace over with the better tunnel still undecided: wake.
        let list = [c("lan", 10, None, false), cold];
        assert!(wanted(&list, 1, false, t0, t0 + STARTUP_GRACE).0);
    }

    #[test]
    fn stays_down_while_a_better_tunnel_is_up_and_stops_only_after_its_hold() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(100);
        let cold = c("ng", 50, None, false);
        let list = [c("lan", 10, Some(now), false), cold.clone()];
        assert_eq!(wanted(&list, 1, false, t0, now), (false, None));
        // Running: the better tunnel just came back; keep running until its hold is served.
        assert_eq!(
            wanted(&list, 1, true, t0, now),
            (true, Some(now + Duration::from_secs(30)))
        );
        let later = now + Duration::from_secs(30);
        assert_eq!(wanted(&list, 1, true, t0, later), (false, None));
    }

    #[test]
    fn the_best_tunnel_is_always_wanted() {
        let t0 = Instant::now();
        let list = [c("ng", 5, None, false), c("lan", 10, Some(t0), false)];
        assert_eq!(wanted(&list, 0, false, t0, t0), (true, None));
    }
}
