//! Primary election for one service: a pure function from what the probes know about each
//! tunnel (up or down, smoothed latency, how long it has been up), the service's failover
//! policy, the current primary and an optional manual pin, to the tunnel that should be primary
//! and why.
//!
//! Nothing here does I/O, spawns tasks or reads the clock: the caller passes `now`, so the same
//! input always gives the same answer and tests can drive time with a paused tokio clock. The
//! only time-dependent part of the answer is the failback hold; [`Decision::recheck_at`] tells
//! the caller when a hold expires so it can re-run the election without polling.
//!
//! [`Dampening`] lives here too: it turns a tunnel's recent up->down history into a longer
//! failback hold, so a flapping tunnel cannot drag the primary back and forth.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// How candidates are ranked (`failover.mode` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The lowest `priority` number wins; latency only matters through `max_latency`.
    Priority,
    /// The lowest smoothed latency wins, with `tolerance` as hysteresis against the current
    /// primary.
    Latency,
}

/// Whether a healthy primary may be replaced by a better tunnel without an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failback {
    /// A better tunnel takes over once it has been up for its hold.
    Auto,
    /// A healthy primary is only replaced by a pin or by its own failure.
    Manual,
}

/// The election rules for one service (resolved from config defaults + overrides by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How candidates are ranked.
    pub mode: Mode,
    /// In [`Mode::Latency`], a challenger must beat the current primary by MORE than this.
    pub tolerance: Duration,
    /// A tunnel whose smoothed latency is above this is degraded and not a candidate.
    pub max_latency: Duration,
    /// Whether a healthy primary is replaced automatically by a better tunnel.
    pub failback: Failback,
    /// The base failback hold. [`elect`] itself reads the per-tunnel [`Contender::hold`]; the
    /// caller derives that from this value with [`Dampening::hold`].
    pub failback_hold: Duration,
}

/// What the election sees of one tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct Contender {
    /// The tunnel's name, unique within its service.
    pub name: String,
    /// Lower wins in priority mode; also the tie-breaker in latency mode, then name.
    pub priority: i64,
    /// Probes say up (rise reached, no hard failure since).
    pub up: bool,
    /// Smoothed latency; `None` = no sample yet (not degraded, but ranked last in latency mode).
    pub latency: Option<Duration>,
    /// Start of the current continuous up period (`None` when down).
    pub up_since: Option<Instant>,
    /// The failback hold for THIS tunnel: the base hold grown by [`Dampening`].
    pub hold: Duration,
    /// Why it last went down, e.g. "hard: child exited (signal 9)" or
    /// "probe: 3 consecutive failures".
    pub last_down: Option<String>,
    /// Whether the last down was a hard signal (child exit, SSH disconnect) rather than probes.
    pub last_down_hard: bool,
    /// This up period is the tunnel's first since it was started (daemon start, or a reload
    /// that added or changed it). A first up is news, not a return: it serves no hold and a
    /// win is reported as [`Reason::Better`]. Holds and dampening are for tunnels that were
    /// up, went down and came back.
    pub first_up: bool,
}

/// Everything [`elect`] looks at. Borrowed, so the caller re-runs the election cheaply.
pub struct Input<'a> {
    /// Every tunnel of the service, in any order (the answer does not depend on it).
    pub contenders: &'a [Contender],
    /// The service's resolved failover policy.
    pub policy: &'a Policy,
    /// The primary chosen by the previous election, if any.
    pub current: Option<&'a str>,
    /// The tunnel pinned through the control API, if any.
    pub pin: Option<&'a str>,
    /// The clock reading to judge holds against.
    pub now: Instant,
}

/// The outcome of one election.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The tunnel that should be primary; `None` only when no tunnel is up and there is no
    /// previous primary to fall back on.
    pub primary: Option<String>,
    /// Why the primary is what it is.
    pub reason: Reason,
    /// true when the primary is not a healthy candidate (no tunnel qualifies): either a degraded-but-up
    /// tunnel (latency over the ceiling) chosen as least bad, or the last primary kept as fallback.
    /// Also true for a pinned tunnel over the latency ceiling, and when there is no primary at all.
    pub degraded: bool,
    /// the earliest instant at which re-running the election could give another answer without
    /// any input changing (a hold expiring); the caller sleeps until then
    pub recheck_at: Option<Instant>,
}

/// Why the primary is what it is. `as_str()`/Display gives a stable `snake_case` word plus detail for events,
/// e.g. `primary_down (hard: child exited)`, `failback`, `better_latency`, `pinned`, `initial`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// There was no primary before; the best candidate was chosen.
    Initial,
    /// The primary did not change.
    Unchanged,
    /// The previous primary went down (or was removed from the configuration); the best
    /// candidate took over at once, without a hold.
    PrimaryDown {
        /// The previous primary's down was a hard signal rather than failed probes.
        hard: bool,
        /// The previous primary's down reason, for events and logs.
        detail: String,
    },
    /// The previous primary is up but over `max_latency`; a healthy candidate took over at once.
    PrimaryDegraded,
    /// Priority mode: a better tunnel has been up for its hold and took over.
    Failback,
    /// Latency mode: a tunnel faster by more than `tolerance` has been up for its hold and took
    /// over.
    BetterLatency,
    /// A better tunnel came up for the first time (after the first election) and took over at
    /// once: its first up is not a failback, so it serves no hold.
    Better,
    /// A manual pin chose the primary.
    Pinned,
    /// The primary changed because a pin was removed. [`elect`] never returns this: its input
    /// only carries the current pin, not the previous one, so the service loop substitutes it
    /// for the reason of the first election after an unpin when that election changes the
    /// primary.
    Unpinned,
    /// No tunnel is up and within `max_latency`; the primary is the least bad up tunnel or the
    /// last primary kept as fallback. Reported on every election in that state (not only on
    /// entry), so the caller detects entry by `degraded` turning true.
    NoCandidate,
}

impl Reason {
    /// The stable `snake_case` word for this reason, without detail.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Unchanged => "unchanged",
            Reason::PrimaryDown { .. } => "primary_down",
            Reason::PrimaryDegraded => "primary_degraded",
            Reason::Failback => "failback",
            Reason::BetterLatency => "better_latency",
            Reason::Better => "better",
            Reason::Pinned => "pinned",
            Reason::Unpinned => "unpinned",
            Reason::NoCandidate => "no_candidate",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // "hard" is spelled out: operators and hooks tell an instant failover (child exit,
            // disconnect) from a probe-driven one by it.
            Reason::PrimaryDown { hard: true, detail } => {
                write!(f, "{} (hard: {detail})", self.as_str())
            }
            Reason::PrimaryDown { detail, .. } if !detail.is_empty() => {
                write!(f, "{} ({detail})", self.as_str())
            }
            _ => f.write_str(self.as_str()),
        }
    }
}

/// Elects the primary of one service. Pure and deterministic; see the module docs and
/// DESIGN.md ("Core model > Election") for the rules. The order of checks is the order of
/// precedence: pin, then the fate of the current primary, then failback.
#[must_use]
pub fn elect(input: &Input<'_>) -> Decision {
    let policy = input.policy;
    let contenders = input.contenders;

    // A pin beats every rule while its tunnel is up, even over the latency ceiling: the
    // operator asked for it. A pin on a down or unknown tunnel is ignored rather than leaving
    // the service without a working primary.
    if let Some(pinned) = input.pin.and_then(|name| find(contenders, name)) {
        if pinned.up {
            let reason = if input.current == Some(pinned.name.as_str()) {
                Reason::Unchanged
            } else {
                Reason::Pinned
            };
            return Decision {
                primary: Some(pinned.name.clone()),
                reason,
                degraded: is_degraded(pinned, policy),
                // Holds cannot displace a pin, so there is nothing to wake up for.
                recheck_at: None,
            };
        }
    }

    let best = best_of(candidates(input), policy.mode);
    let Some(current_name) = input.current else {
        return match best {
            Some(best) => switch_to(input, best, Reason::Initial),
            None => no_candidate(input, None),
        };
    };

    let Some(current) = find(contenders, current_name) else {
        // The previous primary is gone from the configuration (reload): as urgent as a down.
        return match best {
            Some(best) => switch_to(
                input,
                best,
                Reason::PrimaryDown {
                    hard: false,
                    detail: "no longer configured".to_owned(),
                },
            ),
            None => no_candidate(input, None),
        };
    };

    if !current.up {
        // Failover never waits for a hold: any working path is better than a dead one.
        return match best {
            Some(best) => switch_to(
                input,
                best,
                Reason::PrimaryDown {
                    hard: current.last_down_hard,
                    detail: current
                        .last_down
                        .clone()
                        .unwrap_or_else(|| "down".to_owned()),
                },
            ),
            None => no_candidate(input, Some(current)),
        };
    }

    if is_degraded(current, policy) {
        return match best {
            Some(best) => switch_to(input, best, Reason::PrimaryDegraded),
            None => no_candidate(input, Some(current)),
        };
    }

    // The current primary is healthy: only failback can replace it.
    if policy.failback == Failback::Manual {
        return keep(current, Reason::Unchanged, None);
    }
    // Among the tunnels that beat the current primary, take the best one that has served its
    // hold, not the overall best: a flapping tunnel with a long dampened hold must not block
    // failback to a stable tunnel that is also better than the current one.
    let ready_challenger = best_of(
        candidates(input).filter(|c| {
            c.name != current.name && beats(c, current, policy) && served_hold(c, input.now)
        }),
        policy.mode,
    );
    match ready_challenger {
        Some(challenger) => {
            let reason = match policy.mode {
                _ if challenger.first_up => Reason::Better,
                Mode::Priority => Reason::Failback,
                Mode::Latency => Reason::BetterLatency,
            };
            switch_to(input, challenger, reason)
        }
        None => keep(current, Reason::Unchanged, recheck_at(input, current)),
    }
}

/// The first contender with this name (names are unique per service; the first one wins if
/// the caller ever passes duplicates, which keeps the answer deterministic).
/// The order in which the data plane tries tunnels for a new connection: the primary first,
/// then the other healthy tunnels, then the degraded ones (each group by the mode's rank).
/// Tunnels that are down are left out — unless nothing else is left, when every tunnel is
/// worth a try (probes may lag behind a path that has just come back).
#[must_use]
pub fn dial_order(contenders: &[Contender], policy: &Policy, primary: Option<&str>) -> Vec<String> {
    let mut up: Vec<&Contender> = contenders
        .iter()
        .filter(|c| c.up && Some(c.name.as_str()) != primary)
        .collect();
    up.sort_by(|a, b| {
        is_degraded(a, policy)
            .cmp(&is_degraded(b, policy))
            .then_with(|| rank(a, b, policy.mode))
    });
    let mut order: Vec<String> = primary.map(str::to_owned).into_iter().collect();
    order.extend(up.into_iter().map(|c| c.name.clone()));
    if order.is_empty() {
        let mut all: Vec<&Contender> = contenders.iter().collect();
        all.sort_by(|a, b| rank(a, b, policy.mode));
        order.extend(all.into_iter().map(|c| c.name.clone()));
    }
    order
}

fn find<'c>(contenders: &'c [Contender], name: &str) -> Option<&'c Contender> {
    contenders.iter().find(|c| c.name == name)
}

/// Over the latency ceiling. A tunnel with no sample yet is not degraded: it has just come
/// up and deserves a chance rather than being treated as infinitely slow.
fn is_degraded(c: &Contender, policy: &Policy) -> bool {
    c.latency
        .is_some_and(|latency| latency > policy.max_latency)
}

/// The tunnels that may become primary under the normal rules.
fn candidates<'c>(input: &Input<'c>) -> impl Iterator<Item = &'c Contender> + 'c {
    let policy = input.policy;
    input
        .contenders
        .iter()
        .filter(move |c| c.up && !is_degraded(c, policy))
}

/// Total ranking (best first). Names are unique, so no two tunnels compare equal and the
/// winner does not depend on the order the caller lists them in.
fn rank(a: &Contender, b: &Contender, mode: Mode) -> Ordering {
    let by_priority = a
        .priority
        .cmp(&b.priority)
        .then_with(|| a.name.cmp(&b.name));
    match mode {
        Mode::Priority => by_priority,
        Mode::Latency => cmp_latency(a.latency, b.latency).then(by_priority),
    }
}

/// Lower latency first; no sample ranks after every sample.
fn cmp_latency(a: Option<Duration>, b: Option<Duration>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn best_of<'c>(iter: impl Iterator<Item = &'c Contender>, mode: Mode) -> Option<&'c Contender> {
    iter.min_by(|a, b| rank(a, b, mode))
}

/// Whether `challenger` is better enough than the healthy `current` primary to justify a
/// switch. Stricter than [`rank`]: equal priority is not better (switching between tunnels
/// the operator ranked equal is churn), and in latency mode the gap must exceed `tolerance`
/// so noise in the smoothed latency cannot flip the primary.
fn beats(challenger: &Contender, current: &Contender, policy: &Policy) -> bool {
    match policy.mode {
        Mode::Priority => challenger.priority < current.priority,
        Mode::Latency => match (challenger.latency, current.latency) {
            (Some(c), Some(cur)) => cur.saturating_sub(c) > policy.tolerance,
            // A measured tunnel beats an unmeasured primary by an unbounded margin.
            (Some(_), None) => true,
            (None, _) => false,
        },
    }
}

/// Continuously up for at least its own hold, or up for the first time (no hold applies).
/// A returning tunnel that claims to be up without an `up_since` has an unknown up time and is
/// never treated as having served its hold.
fn served_hold(c: &Contender, now: Instant) -> bool {
    c.first_up
        || c.up_since
            .is_some_and(|since| now.saturating_duration_since(since) >= c.hold)
}

/// When the earliest hold of a tunnel that would replace `primary` expires. Only meaningful
/// for a healthy primary under automatic failback; otherwise no hold can change the answer.
fn recheck_at(input: &Input<'_>, primary: &Contender) -> Option<Instant> {
    let policy = input.policy;
    if policy.failback != Failback::Auto || !primary.up || is_degraded(primary, policy) {
        return None;
    }
    candidates(input)
        .filter(|c| {
            c.name != primary.name && beats(c, primary, policy) && !served_hold(c, input.now)
        })
        // An `up_since` far enough in the future to overflow never expires: no wake-up.
        .filter_map(|c| c.up_since.and_then(|since| since.checked_add(c.hold)))
        .min()
}

/// A decision that makes `to` primary (a healthy candidate) for `reason`, or reports it as
/// unchanged if it already is.
fn switch_to(input: &Input<'_>, to: &Contender, reason: Reason) -> Decision {
    let reason = if input.current == Some(to.name.as_str()) {
        Reason::Unchanged
    } else {
        reason
    };
    keep(to, reason, recheck_at(input, to))
}

fn keep(primary: &Contender, reason: Reason, recheck_at: Option<Instant>) -> Decision {
    Decision {
        primary: Some(primary.name.clone()),
        reason,
        degraded: false,
        recheck_at,
    }
}

/// No tunnel is up and within the ceiling. Prefer the current primary if it is still up
/// (avoid churn between equally unsatisfying tunnels), then the least bad up tunnel, then the
/// last primary as a fallback even though it is down: clients keep a target and the service
/// loop keeps reporting the service as degraded.
fn no_candidate(input: &Input<'_>, current: Option<&Contender>) -> Decision {
    let up_current = current.filter(|c| c.up);
    let chosen = up_current
        .or_else(|| best_of(input.contenders.iter().filter(|c| c.up), input.policy.mode))
        .or(current);
    Decision {
        primary: chosen.map(|c| c.name.clone()),
        reason: Reason::NoCandidate,
        degraded: true,
        // Holds only matter between healthy candidates; only an input change can help here.
        recheck_at: None,
    }
}

/// What one tunnel has said so far, for the first election of its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirstVerdict {
    /// Nothing yet: still starting or still counting its first `rise`/`fall` probes.
    #[default]
    Pending,
    /// It came up.
    Up,
    /// It cannot be up soon: its start failed, its process died, `fall` probes failed in a row,
    /// or it is a cold standby that is not started.
    NotUp,
}

/// Whether the first election of a service may run now, and if not, until when it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Elect now.
    Done,
    /// Keep waiting; elect at the latest at this instant.
    Until(Instant),
}

/// The settle rule: the first election of a service waits until every tunnel has given its
/// first verdict, or a pinned tunnel is up (the operator's choice is known, nobody can beat
/// it), or `deadline` has passed. Electing on the first tunnel to come up would make whichever
/// tunnel starts fastest the primary, and the best one would then wait out a failback hold.
/// `verdicts` follows `contenders`.
#[must_use]
pub fn settle(
    contenders: &[Contender],
    verdicts: &[FirstVerdict],
    pin: Option<&str>,
    deadline: Instant,
    now: Instant,
) -> Settle {
    let pinned_up = pin
        .and_then(|name| find(contenders, name))
        .is_some_and(|c| c.up);
    let all_spoke = verdicts.iter().all(|v| *v != FirstVerdict::Pending);
    if pinned_up || all_spoke || now >= deadline {
        Settle::Done
    } else {
        Settle::Until(deadline)
    }
}

/// How long recent downs are remembered. Ten minutes covers the usual flapping patterns
/// (a relay restarting in a loop, a link bouncing every minute or two) without punishing a
/// tunnel for one bad evening hour forever; and since a hold is measured from the tunnel's
/// last up, a tunnel that stays up for the whole window is back to the base hold anyway.
pub const DAMPENING_WINDOW: Duration = Duration::from_secs(600);

/// The longest hold dampening can produce. A hold longer than [`DAMPENING_WINDOW`] could
/// never be served (the downs that caused it are forgotten first), so it is capped there.
pub const DAMPENING_MAX_HOLD: Duration = DAMPENING_WINDOW;

/// The most doublings of the base hold (2^6 = 64 times the base), so a tiny base hold cannot
/// grow past what the operator would recognise as "their" setting either.
pub const DAMPENING_MAX_DOUBLINGS: u32 = 6;

/// Remembers recent up->down transitions of one tunnel and grows its failback hold.
#[derive(Debug, Clone, Default)]
pub struct Dampening {
    /// Instants of recent downs, oldest first; at most `DAMPENING_MAX_DOUBLINGS + 1` entries,
    /// since older ones cannot change the hold before they expire.
    downs: VecDeque<Instant>,
}

impl Dampening {
    /// Records that the tunnel went from up to down at `now`.
    pub fn record_down(&mut self, now: Instant) {
        // Forget what has left the window so memory stays bounded on a long-lived flapper.
        while self
            .downs
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= DAMPENING_WINDOW)
        {
            self.downs.pop_front();
        }
        self.downs.push_back(now);
        let keep = usize::try_from(DAMPENING_MAX_DOUBLINGS)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        while self.downs.len() > keep {
            self.downs.pop_front();
        }
    }

    /// How many recorded downs are still within [`DAMPENING_WINDOW`] of `now` (a down exactly
    /// one window old is forgotten).
    #[must_use]
    pub fn recent_downs(&self, now: Instant) -> usize {
        self.downs
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) < DAMPENING_WINDOW)
            .count()
    }

    /// The next instant at which [`Dampening::hold`] shrinks without a new down (the oldest
    /// down that still adds to the hold leaves the window), or `None` if the hold is already
    /// the base. [`elect`] takes each [`Contender::hold`] as given, so its `recheck_at` cannot
    /// see this; a caller that wants a shrinking hold to count promptly wakes at the earlier
    /// of the two.
    #[must_use]
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        if self.recent_downs(now) < 2 {
            return None;
        }
        self.downs
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) < DAMPENING_WINDOW)
            .find_map(|&t| t.checked_add(DAMPENING_WINDOW))
    }

    /// base hold doubled for each down within `window` beyond the first, capped at `max` (and at 2^6 × base); downs older than window forgotten.
    ///
    /// Here `window` is [`DAMPENING_WINDOW`] and `max` is [`DAMPENING_MAX_HOLD`]; a base
    /// already above `max` is returned unchanged, since dampening only ever lengthens holds.
    #[must_use]
    pub fn hold(&self, base: Duration, now: Instant) -> Duration {
        let extra_downs = self.recent_downs(now).saturating_sub(1);
        let doublings = u32::try_from(extra_downs)
            .unwrap_or(u32::MAX)
            .min(DAMPENING_MAX_DOUBLINGS);
        if doublings == 0 {
            return base;
        }
        let grown = base.checked_mul(1u32 << doublings).unwrap_or(Duration::MAX);
        grown.min(DAMPENING_MAX_HOLD.max(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contender(name: &str, priority: i64, latency: Option<u64>) -> Contender {
        Contender {
            name: name.to_owned(),
            priority,
            up: true,
            latency: latency.map(Duration::from_millis),
            up_since: None,
            hold: Duration::ZERO,
            last_down: None,
            last_down_hard: false,
            first_up: false,
        }
    }

    fn policy(mode: Mode) -> Policy {
        Policy {
            mode,
            tolerance: Duration::from_millis(50),
            max_latency: Duration::from_millis(500),
            failback: Failback::Auto,
            failback_hold: Duration::from_secs(30),
        }
    }

    #[test]
    fn election_unsampled_latency_ranks_last() {
        assert_eq!(
            cmp_latency(Some(Duration::MAX), None),
            Ordering::Less,
            "any sample beats no sample"
        );
        assert_eq!(cmp_latency(None, None), Ordering::Equal);
    }

    #[test]
    fn election_beats_needs_more_than_tolerance_and_strictly_lower_priority() {
        let p = policy(Mode::Latency);
        let cur = contender("cur", 1, Some(100));
        assert!(!beats(&contender("c", 0, Some(50)), &cur, &p));
        assert!(beats(&contender("c", 9, Some(49)), &cur, &p));
        assert!(!beats(&contender("c", 0, None), &cur, &p));
        assert!(beats(
            &contender("c", 9, Some(900)),
            &contender("cur", 1, None),
            &p
        ));

        let p = policy(Mode::Priority);
        assert!(!beats(&contender("a", 1, None), &cur, &p), "equal priority");
        assert!(beats(&contender("z", 0, None), &cur, &p));
    }

    #[test]
    fn election_up_without_up_since_never_serves_its_hold() {
        let now = Instant::now();
        assert!(!served_hold(&contender("c", 0, None), now));
    }

    #[test]
    fn election_dampening_memory_is_bounded() {
        let now = Instant::now();
        let mut damp = Dampening::default();
        for _ in 0..1000 {
            damp.record_down(now);
        }
        assert_eq!(damp.downs.len(), DAMPENING_MAX_DOUBLINGS as usize + 1);
    }
}
