//! The `bus` bench: how fast events can be published on the daemon's bus, and that a slow
//! subscriber lags instead of holding the publisher back.
//!
//! In process, on a fresh [`Bus`] with the daemon's journal size ([`DEFAULT_JOURNAL`], which is
//! also how far a subscriber may fall behind before it lags). A publisher on a thread of its own
//! (`spawn_blocking`) calls [`Bus::publish`] in a tight loop with a realistic event (a
//! `probe_failed` with its strings, cloned per event) until it has published `--events` or
//! `--secs` have passed. Subscribers are tasks on this process's multi-threaded runtime: a fast
//! one only counts; the slow one sleeps `--slow-ms` after every event it receives. Three
//! scenarios flat out, side by side: no subscriber (the anchor), 9 fast ones, 9 fast + 1 slow.
//! Flat out, the publisher outruns even the fast subscribers on a small machine, so a fourth
//! scenario paces the publisher (`--paced`, 100 000 events/s by default: far above what a daemon
//! publishes, about 700 events/s while 1000 tunnels start and none once they are healthy) to show
//! fast subscribers keeping up while the slow one lags.
//!
//! Per subscriber: events received, events it was told it missed (`Delivery::Lagged`, summed)
//! and how many lag notices that took; a subscriber is complete when received + missed equals
//! what was published. Fast subscribers get 5 s after the publisher ends to drain; the slow one
//! is stopped then, and what it had not read yet is reported as unread.
//!
//! Also printed: what one `publish` spends on the two things it does besides the channel work,
//! formatting the RFC 3339 timestamp and serializing the event to JSON for the log line (done
//! even when nothing logs), each timed alone in a loop.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnelkeeper::bus::{Bus, Delivery, EventKind, Subscription, DEFAULT_JOURNAL};

use crate::common::{fmt_d, load_average};

/// Fast subscribers in the scenarios that have them.
const FAST: usize = 9;
/// How long fast subscribers may take to drain after the publisher is done.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Iterations of each part of the per-publish cost breakdown.
const BREAKDOWN_ITERATIONS: u32 = 200_000;

/// What to run, from the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Events per scenario at most.
    pub(crate) events: u64,
    /// Publishing time per scenario at most.
    pub(crate) limit: Duration,
    /// The slow subscriber's sleep after each event.
    pub(crate) slow: Duration,
    /// Events per second of the paced scenario.
    pub(crate) paced: u64,
}

/// One scenario: how many subscribers of each kind.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    fast: usize,
    slow: usize,
    /// Events per second the publisher keeps to (None: as fast as it can).
    paced: Option<u64>,
}

impl Scenario {
    fn label(&self) -> String {
        let who = match (self.fast, self.slow) {
            (0, 0) => "no subscriber".to_string(),
            (f, 0) => format!("{f} fast"),
            (f, s) => format!("{f} fast + {s} slow"),
        };
        match self.paced {
            Some(rate) => format!("{who}, paced {rate}/s"),
            None => who,
        }
    }
}

/// What one subscriber saw.
#[derive(Debug, Clone, Default)]
struct Seen {
    slow: bool,
    received: u64,
    missed: u64,
    notices: u64,
    /// Received + missed reached the published count.
    complete: bool,
}

/// What one scenario measured.
struct Outcome {
    scenario: Scenario,
    published: u64,
    elapsed: Duration,
    subscribers: Vec<Seen>,
    dropped: u64,
    load: String,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the three scenarios and the breakdown, and prints the figures.
pub(crate) async fn bus(settings: Settings) -> anyhow::Result<()> {
    println!(
        "tunnelkeeper bus bench — in process, journal {DEFAULT_JOURNAL} events, up to {} events \
         or {} per scenario, slow subscriber sleeps {} per event; {} vCPUs",
        settings.events,
        fmt_d(settings.limit),
        fmt_d(settings.slow),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("  load average at start: {}", load_average());
    let flat_out = |fast, slow| Scenario {
        fast,
        slow,
        paced: None,
    };
    let scenarios = [
        flat_out(0, 0),
        flat_out(FAST, 0),
        flat_out(FAST, 1),
        Scenario {
            fast: FAST,
            slow: 1,
            paced: Some(settings.paced),
        },
    ];
    let mut outcomes = Vec::new();
    for scenario in scenarios {
        println!("\n== {}", scenario.label());
        let outcome = run(scenario, settings).await?;
        print_outcome(&outcome, outcomes.first());
        outcomes.push(outcome);
    }
    print_summary(&outcomes);
    breakdown(outcomes.first().map(Outcome::rate));
    Ok(())
}

/// The event published: what a probe failure looks like on a 1000-tunnel daemon.
fn sample_event() -> EventKind {
    EventKind::ProbeFailed {
        service: "svc0042".to_string(),
        tunnel: "c7".to_string(),
        reason: "probe timed out after 1000ms (during the end-to-end exchange)".to_string(),
    }
}

async fn run(scenario: Scenario, settings: Settings) -> anyhow::Result<Outcome> {
    let bus = Bus::new(DEFAULT_JOURNAL);
    let (done_tx, done_rx) = watch::channel(0u64);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for i in 0..scenario.fast + scenario.slow {
        let slow = (i >= scenario.fast).then_some(settings.slow);
        // Subscribed before the first event: each should account for every one.
        let subscription = bus.subscribe();
        let done = done_rx.clone();
        let cancel = cancel.clone();
        tasks.spawn(subscriber(subscription, slow, done, cancel));
    }
    let load = load_average();
    let publisher = {
        let bus = bus.clone();
        let (events, limit, paced) = (settings.events, settings.limit, scenario.paced);
        tokio::task::spawn_blocking(move || {
            let kind = sample_event();
            let started = std::time::Instant::now();
            let mut published = 0u64;
            while published < events {
                bus.publish(kind.clone());
                published += 1;
                if published.is_multiple_of(64) {
                    if let Some(rate) = paced {
                        // Batches of 64 on a fixed schedule: no drift, no catching up in bursts
                        // larger than one batch.
                        let due = started
                            + Duration::from_secs_f64(published as f64 / rate.max(1) as f64);
                        let now = std::time::Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                    if published.is_multiple_of(1024) && started.elapsed() >= limit {
                        break;
                    }
                }
            }
            (published, started.elapsed())
        })
    };
    let (published, elapsed) = publisher.await.context("the publisher panicked")?;
    let _ = done_tx.send(published);
    // Fast subscribers finish by themselves; whoever is left after the drain limit is stopped.
    let stop = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DRAIN_LIMIT).await;
            cancel.cancel();
        })
    };
    let mut subscribers = Vec::new();
    let mut fast_left = scenario.fast;
    while let Some(joined) = tasks.join_next().await {
        let seen = joined.context("a subscriber panicked")?;
        if !seen.slow {
            fast_left -= 1;
            if fast_left == 0 {
                // Every fast one is done: the slow one has had its chance.
                cancel.cancel();
            }
        }
        subscribers.push(seen);
    }
    stop.abort();
    subscribers.sort_by_key(|s| s.slow);
    Ok(Outcome {
        scenario,
        published,
        elapsed,
        subscribers,
        dropped: bus.dropped(),
        load,
    })
}

/// Reads until it has accounted for every published event (received or missed), the bus closes,
/// or it is cancelled; `slow` sleeps after each event.
async fn subscriber(
    mut subscription: Subscription,
    slow: Option<Duration>,
    mut done: watch::Receiver<u64>,
    cancel: CancellationToken,
) -> Seen {
    let mut seen = Seen {
        slow: slow.is_some(),
        ..Seen::default()
    };
    loop {
        let total = *done.borrow();
        if total > 0 && seen.received + seen.missed >= total {
            seen.complete = true;
            return seen;
        }
        let delivery = tokio::select! {
            biased;
            _ = cancel.cancelled() => return seen,
            // Wakes an idle subscriber when the publisher announces its total.
            changed = done.changed(), if total == 0 => {
                if changed.is_err() {
                    return seen;
                }
                continue;
            }
            delivery = subscription.next() => delivery,
        };
        match delivery {
            Some(Delivery::Event(_)) => {
                seen.received += 1;
                if let Some(pause) = slow {
                    tokio::select! {
                        _ = cancel.cancelled() => return seen,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
            Some(Delivery::Lagged(n)) => {
                seen.missed += n;
                seen.notices += 1;
            }
            None => return seen,
        }
    }
}

fn print_outcome(o: &Outcome, anchor: Option<&Outcome>) {
    let ratio = match (anchor, o.scenario.paced) {
        (_, Some(_)) => " (paced)".to_string(),
        (Some(a), None) => format!(" = {:.2} × the no-subscriber rate", o.rate() / a.rate()),
        (None, None) => " (the anchor)".to_string(),
    };
    println!(
        "   published {} events in {}: {:.0} events/s{ratio}; load average {}",
        o.published,
        fmt_d(o.elapsed),
        o.rate(),
        o.load
    );
    if o.subscribers.is_empty() {
        return;
    }
    println!(
        "   {:<12} {:>10} {:>10} {:>8} {:>10} {:>9}",
        "subscriber", "received", "missed", "notices", "unread", "complete"
    );
    let mut fast = 0;
    for s in &o.subscribers {
        let name = if s.slow {
            "slow".to_string()
        } else {
            fast += 1;
            format!("fast {fast}")
        };
        println!(
            "   {name:<12} {:>10} {:>10} {:>8} {:>10} {:>9}",
            s.received,
            s.missed,
            s.notices,
            o.published.saturating_sub(s.received + s.missed),
            if s.complete { "yes" } else { "no" }
        );
    }
    println!(
        "   Bus::dropped() (events lost by laggards, summed) = {}",
        o.dropped
    );
}

fn print_summary(outcomes: &[Outcome]) {
    let Some(anchor) = outcomes.first() else {
        return;
    };
    println!("\n== summary (publish rate: events ÷ the publisher's wall time)");
    println!(
        "   {:<32} {:>10} {:>12} {:>9} {:>22} {:>22}",
        "scenario",
        "published",
        "events/s",
        "× anchor",
        "fast missed (max)",
        "slow received/missed"
    );
    for o in outcomes {
        let fast: Vec<&Seen> = o.subscribers.iter().filter(|s| !s.slow).collect();
        let slow: Vec<&Seen> = o.subscribers.iter().filter(|s| s.slow).collect();
        let fast_missed = if fast.is_empty() {
            "—".to_string()
        } else {
            format!(
                "{} ({} complete)",
                fast.iter().map(|s| s.missed).max().unwrap_or(0),
                fast.iter().filter(|s| s.complete).count()
            )
        };
        let slow_seen = slow
            .first()
            .map(|s| format!("{} / {}", s.received, s.missed))
            .unwrap_or_else(|| "—".to_string());
        let ratio = if o.scenario.paced.is_some() {
            "paced".to_string()
        } else {
            format!("{:.2}", o.rate() / anchor.rate())
        };
        println!(
            "   {:<32} {:>10} {:>12.0} {:>9} {:>22} {:>22}",
            o.scenario.label(),
            o.published,
            o.rate(),
            ratio,
            fast_missed,
            slow_seen
        );
    }
    if let (Some(fast), Some(with_slow)) = (outcomes.get(1), outcomes.get(2)) {
        let slow_missed: u64 = with_slow
            .subscribers
            .iter()
            .filter(|s| s.slow)
            .map(|s| s.missed)
            .sum();
        println!(
            "   the slow subscriber {} (missed {slow_missed}); publish rate with it {:.2} × without \
             it",
            if slow_missed > 0 { "lagged" } else { "did NOT lag" },
            with_slow.rate() / fast.rate()
        );
    }
}

/// Times the two non-channel parts of a publish alone, per call.
fn breakdown(anchor_rate: Option<f64>) {
    let kind = sample_event();
    let started = std::time::Instant::now();
    let mut bytes = 0usize;
    for _ in 0..BREAKDOWN_ITERATIONS {
        bytes += serde_json::to_string(std::hint::black_box(&kind))
            .map(|s| s.len())
            .unwrap_or(0);
    }
    let json = started.elapsed().as_secs_f64() * 1e9 / f64::from(BREAKDOWN_ITERATIONS);
    let started = std::time::Instant::now();
    for _ in 0..BREAKDOWN_ITERATIONS {
        bytes += humantime::format_rfc3339_millis(SystemTime::now())
            .to_string()
            .len();
    }
    let stamp = started.elapsed().as_secs_f64() * 1e9 / f64::from(BREAKDOWN_ITERATIONS);
    let started = std::time::Instant::now();
    for _ in 0..BREAKDOWN_ITERATIONS {
        bytes += match std::hint::black_box(kind.clone()) {
            EventKind::ProbeFailed { reason, .. } => reason.len(),
            _ => 0,
        };
    }
    let clone = started.elapsed().as_secs_f64() * 1e9 / f64::from(BREAKDOWN_ITERATIONS);
    std::hint::black_box(bytes);
    println!(
        "\n== one publish, in parts (each alone, {BREAKDOWN_ITERATIONS} times): JSON for the log \
         line {json:.0} ns, RFC 3339 timestamp {stamp:.0} ns, cloning the event {clone:.0} ns"
    );
    if let Some(rate) = anchor_rate {
        let per = 1e9 / rate.max(1e-9);
        println!(
            "   a whole publish with no subscriber took {per:.0} ns: JSON + timestamp are {:.0} % \
             of it",
            (json + stamp) / per * 100.0
        );
    }
}
