//! The `failover` bench: how long the real daemon takes to move a service off a failed primary.
//!
//! Each scenario starts a fresh in-process [`Daemon`] from YAML text loaded through
//! `tunnelkeeper::config::parse` (the path `tunnelkeeper run` takes), with an in-process loopback
//! echo server as the service and three `command` tunnels that are real child processes
//! (`tunnelkeeper relay --to ECHO`, the binary next to this one). A repetition waits until the
//! preferred tunnel is primary and every tunnel is up, waits a random fraction of a probe
//! interval (so the fault lands at a uniformly random point of the probe cycle), then either
//! kills the primary's child with SIGKILL (a hard failure, noticed from the child's exit) or
//! freezes it with SIGSTOP (a blackhole: the kernel still completes TCP handshakes, so only the
//! send/expect probe notices). The figure is the time from just before `kill(2)` to the moment
//! this process receives the `primary_changed` event moving away from the victim on the bus (so
//! it includes bus delivery); the event's own timestamp gives a second, millisecond resolution
//! figure without the delivery. The probe settings leave the adaptive keys (`fast_interval`,
//! `down_interval`, `min_timeout`) at their defaults, so the default setting is what users get. The victim is then let back (SIGCONT, or the supervisor's
//! restart) and the bench waits for failback before the next repetition. Results and method are
//! written up in `docs/BENCHMARKS.md`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use futures_util::FutureExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use tokio::time::Instant;
use tunnelkeeper::bus::{Delivery, Event, EventKind, Subscription};
use tunnelkeeper::config::spec::{default, ProbeSpec};
use tunnelkeeper::daemon::Daemon;
use tunnelkeeper::probe::schedule::Detection;
use tunnelkeeper::status::TunnelState;

use crate::common::{fmt_d, fmt_ms, ms, verdict, Echo, Stats, TempDir};

/// The service name in the generated configuration.
const SERVICE: &str = "bench";
/// The tunnels, in order of preference; the first is always the victim.
const TUNNELS: [&str; 3] = ["alpha", "beta", "gamma"];
/// The preferred tunnel: primary before every fault, and the one the fault hits.
const VICTIM: &str = TUNNELS[0];
/// The hard-failure target from DESIGN.md ("fails over in well under a second on hard
/// failures"), made concrete for this bench.
const HARD_TARGET: Duration = Duration::from_millis(100);
/// Slack allowed on top of the probe arithmetic for the blackhole target.
const BLACKHOLE_SLACK: Duration = Duration::from_millis(50);
/// How long a fresh daemon may take to bring every tunnel up and elect the preferred one.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);

/// One probe configuration under test.
#[derive(Debug, Clone, Copy)]
struct Setting {
    /// Short label for tables.
    label: &'static str,
    /// `probe.interval`
    interval: Duration,
    /// `probe.timeout`
    timeout: Duration,
    /// `probe.fall`: consecutive failures that mark a tunnel down.
    fall: u32,
    /// `probe.rise`: consecutive successes that mark it up again.
    rise: u32,
}

/// Fast probes, as an operator who wants quick blackhole detection would set them.
const FAST: Setting = Setting {
    label: "100ms",
    interval: Duration::from_millis(100),
    timeout: Duration::from_millis(100),
    fall: 3,
    rise: 2,
};

/// The built-in defaults (`defaults.probe` in DESIGN.md).
const DEFAULTS: Setting = Setting {
    label: "defaults",
    interval: Duration::from_secs(1),
    timeout: Duration::from_secs(1),
    fall: 3,
    rise: 3,
};

/// The fault injected into the primary's child process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL: the child exits; the daemon learns it from the exit (a hard signal).
    Kill,
    /// SIGSTOP: the child is frozen; only failing probes reveal it.
    Stop,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::Kill => "hard (kill -9)",
            Fault::Stop => "blackhole (SIGSTOP)",
        }
    }

    fn signal(self) -> Signal {
        match self {
            Fault::Kill => Signal::SIGKILL,
            Fault::Stop => Signal::SIGSTOP,
        }
    }
}

/// One fault at one probe setting.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    fault: Fault,
    setting: Setting,
}

impl Scenario {
    fn label(&self) -> String {
        format!("{} @ {}", self.fault.label(), self.setting.label)
    }

    /// The p99 target: 100ms for a hard failure; for a blackhole, the worst case of the
    /// detection arithmetic ([`Scenario::ceiling`]) plus 50ms of slack.
    fn target(&self) -> Duration {
        match self.fault {
            Fault::Kill => HARD_TARGET,
            Fault::Stop => self.ceiling() + BLACKHOLE_SLACK,
        }
    }

    /// The blackhole arithmetic of the daemon's own [`Detection`], for this setting with the
    /// built-in adaptive settings (`fast_interval`, `down_interval`, `min_timeout` unset): on
    /// loopback the measured round trip is far below `min_timeout`, so each failing probe
    /// times out at `min(timeout, min_timeout)`.
    fn detection(&self) -> Detection {
        let s = &self.setting;
        Detection::fast_path(&ProbeSpec {
            interval: s.interval,
            timeout: s.timeout,
            rise: s.rise,
            fall: s.fall,
            fast_interval: default::probe_fast_interval(s.interval),
            down_interval: s.interval,
            min_timeout: default::PROBE_MIN_TIMEOUT,
            send: None,
            expect: None,
            checks: Vec::new(),
        })
    }

    /// The best case the design allows, for context. A hard failure waits for nothing (the
    /// floor is process-exit notification plus one election, well under a millisecond). A
    /// blackhole needs `fall` consecutive probes to time out; at best the first starts right
    /// after the fault, and after a failure the next ones start every
    /// `max(fast_interval, timeout)`.
    fn floor(&self) -> Duration {
        match self.fault {
            Fault::Kill => Duration::ZERO,
            Fault::Stop => self.detection().best,
        }
    }

    /// The worst case without any overhead: the fault lands just after a successful probe, so a
    /// whole interval passes before the first probe that can fail.
    fn ceiling(&self) -> Duration {
        match self.fault {
            Fault::Kill => Duration::ZERO,
            Fault::Stop => self.detection().worst,
        }
    }

    /// How long one repetition may wait for the failover before giving up on the scenario.
    fn detect_limit(&self) -> Duration {
        (self.target() * 3).max(Duration::from_secs(5))
    }

    /// How long one repetition may wait for the victim to come back and be primary again:
    /// restart backoff (at most 200ms here) and start-up, then `rise` probes, with room to spare.
    fn recover_limit(&self) -> Duration {
        Duration::from_secs(10)
            + self.setting.interval.max(self.setting.timeout) * self.setting.rise * 3
    }
}

/// One measured failover.
#[derive(Debug, Clone)]
struct Sample {
    /// From just before `kill(2)` to this process receiving `primary_changed`.
    received: Duration,
    /// From just before `kill(2)` (wall clock) to the event's own `time` (millisecond
    /// resolution, truncated, so it reads up to 1ms low and may even be slightly negative).
    stamped_ms: f64,
    /// Where the primary went.
    to: Option<String>,
}

/// What a scenario produced.
struct Outcome {
    scenario: Scenario,
    samples: Vec<Sample>,
    /// Repetitions discarded because the failover was not the one the fault should cause.
    rejected: Vec<String>,
    wall: Duration,
}
/// Runs every failover scenario and prints the per-scenario figures and a summary.
pub(crate) async fn failover(reps: u32, quick: bool) -> anyhow::Result<()> {
    let relay = crate::common::daemon_binary()?;
    let settings: &[Setting] = if quick { &[FAST] } else { &[FAST, DEFAULTS] };
    let scenarios: Vec<Scenario> = settings
        .iter()
        .flat_map(|&setting| {
            [Fault::Kill, Fault::Stop]
                .into_iter()
                .map(move |fault| Scenario { fault, setting })
        })
        .collect();

    println!("tunnelkeeper failover bench — loopback only, {reps} repetitions per scenario");
    println!("  relay binary: {}", relay.display());
    println!(
        "  figure: time from just before kill(2) to receiving `primary_changed` away from `{VICTIM}`"
    );
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (index, scenario) in scenarios.iter().enumerate() {
        let s = &scenario.setting;
        println!(
            "\n== {} — probe interval {}, timeout {}, fall {}, rise {}; target p99 ≤ {}",
            scenario.label(),
            fmt_d(s.interval),
            fmt_d(s.timeout),
            s.fall,
            s.rise,
            fmt_d(scenario.target())
        );
        match run_scenario(&relay, *scenario, reps, index).await {
            Ok(outcome) => {
                print_outcome(&outcome);
                outcomes.push(outcome);
            }
            Err(e) => {
                println!("   FAILED: {e:#}");
                failures.push(format!("{}: {e:#}", scenario.label()));
            }
        }
    }
    print_summary(&outcomes);
    if failures.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} scenario(s) did not complete:\n  {}",
            failures.len(),
            failures.join("\n  ")
        )
    }
}

/// Starts a fresh daemon for one scenario, runs its repetitions, and always shuts it down.
async fn run_scenario(
    relay: &Path,
    scenario: Scenario,
    reps: u32,
    index: usize,
) -> anyhow::Result<Outcome> {
    let dir = TempDir::new(&index.to_string())?;
    let echo = Echo::start().await?;
    let text = config_text(&scenario.setting, &dir.0, relay, echo.addr);
    let config = tunnelkeeper::config::parse(&text, &dir.0.join("bench.yaml"))
        .map_err(|e| anyhow::anyhow!("the generated bench config is invalid:\n{e}"))?;
    let daemon = Daemon::start(config).await.context("starting the daemon")?;
    // Subscribed before anything can happen, so no event of interest is missed.
    let mut events = daemon.bus().subscribe();
    let started = Instant::now();
    let mut pids = BTreeSet::new();
    let result = repetitions(&daemon, &mut events, scenario, reps, &mut pids).await;
    let wall = started.elapsed();
    daemon.shutdown().await;
    drop(echo);
    // A pid is only checked after the daemon stopped it; reuse by an unrelated process in the
    // meantime is possible but unlikely, hence a warning rather than an error.
    let leftovers: Vec<u32> = pids
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    if !leftovers.is_empty() {
        println!("   warning: child processes still present after shutdown: {leftovers:?}");
    }
    let (samples, rejected) = result?;
    Ok(Outcome {
        scenario,
        samples,
        rejected,
        wall,
    })
}

/// The daemon configuration for one setting, as YAML text (loaded through the real parser).
fn config_text(setting: &Setting, dir: &Path, relay: &Path, echo: std::net::SocketAddr) -> String {
    // JSON string literals are valid YAML double-quoted scalars: paths need no hand-escaping.
    let quote = |p: &Path| {
        serde_json::to_string(&p.display().to_string()).unwrap_or_else(|_| "\"\"".into())
    };
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut text = format!(
        "version: 1
daemon:
  control_socket: {socket}
  state_dir: {state}
  shutdown_grace: 3s
defaults:
  probe: {{ interval: {interval}, timeout: {timeout}, rise: {rise}, fall: {fall}, send: \"ping\\n\", expect: \"ping\" }}
  # A zero hold: failback as soon as the victim is up again, so repetitions are quick; dampening
  # doubles the hold per recent down, and twice zero is still zero. Failover never waits for a
  # hold, so this does not touch the figure being measured.
  failover: {{ mode: priority, failback: auto, failback_hold: 0s }}
  # Short backoff, reset after 200ms alive: recovery between repetitions stays quick.
  restart: {{ initial: 100ms, max: 200ms, multiplier: 2.0, jitter: 0.1 }}
services:
  - name: {SERVICE}
    tunnels:
",
        socket = quote(&dir.join("control.sock")),
        state = quote(&dir.join("state")),
        interval = ms(setting.interval),
        timeout = ms(setting.timeout),
        rise = setting.rise,
        fall = setting.fall,
    );
    for (i, name) in TUNNELS.iter().enumerate() {
        text.push_str(&format!(
            "      - name: {name}
        provider: command
        priority: {priority}
        run: [{relay}, \"relay\", \"--to\", \"{echo}\"]
        endpoint_regex: 'relay listening at (\\S+)'
        start_timeout: 5s
        stop_grace: 1s
",
            priority = (i + 1) * 10,
            relay = quote(relay),
        ));
    }
    text
}

/// Runs `reps` accepted repetitions (with a bounded number of retries for rejected ones).
async fn repetitions(
    daemon: &Daemon,
    events: &mut Subscription,
    scenario: Scenario,
    reps: u32,
    pids: &mut BTreeSet<u32>,
) -> anyhow::Result<(Vec<Sample>, Vec<String>)> {
    wait_ready(daemon, STARTUP_LIMIT, pids)
        .await
        .context("the daemon never reached its starting state")?;
    let mut samples = Vec::new();
    let mut rejected = Vec::new();
    let attempts = reps + reps / 2 + 3;
    for attempt in 1..=attempts {
        if samples.len() >= reps as usize {
            break;
        }
        let victim = wait_ready(daemon, scenario.recover_limit(), pids)
            .await
            .with_context(|| format!("repetition {attempt}: not ready"))?;
        // Settle for one interval plus a uniformly random fraction of another: the fault then
        // lands at a random point of the probe cycle rather than right after the probe that
        // brought the victim back (which would always be the worst case for a blackhole).
        let interval = scenario.setting.interval;
        let jitter = interval.mul_f64(rand::rng().random::<f64>());
        tokio::time::sleep(interval + jitter).await;
        match inject(events, scenario, victim).await? {
            Ok(sample) => {
                println!(
                    "   rep {:>3}: {:>9}  (event stamp {:>8.1}ms, → {})",
                    samples.len() + 1,
                    fmt_d(sample.received),
                    sample.stamped_ms,
                    sample.to.as_deref().unwrap_or("none"),
                );
                samples.push(sample);
            }
            Err(why) => {
                println!("   attempt {attempt} rejected: {why}");
                rejected.push(why);
            }
        }
    }
    if samples.len() < reps as usize {
        bail!(
            "only {} of {reps} repetitions were accepted in {attempts} attempts",
            samples.len()
        );
    }
    Ok((samples, rejected))
}

/// Polls the status until the victim is primary with a child pid and every tunnel is up;
/// returns the victim's pid. Polling is fine here: nothing is being timed yet.
async fn wait_ready(
    daemon: &Daemon,
    limit: Duration,
    pids: &mut BTreeSet<u32>,
) -> anyhow::Result<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let status = daemon.status();
        if let Some(service) = status.services.first() {
            pids.extend(service.tunnels.iter().filter_map(|t| t.pid));
            let all_up = service.tunnels.iter().all(|t| t.state == TunnelState::Up);
            let victim_pid = service
                .tunnels
                .iter()
                .find(|t| t.name == VICTIM)
                .and_then(|t| t.pid);
            if let (true, Some(true), Some(pid)) = (
                all_up,
                service.primary.as_deref().map(|p| p == VICTIM),
                victim_pid,
            ) {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                bail!(
                    "after {}: primary {:?}, tunnels {}",
                    fmt_d(limit),
                    service.primary,
                    service
                        .tunnels
                        .iter()
                        .map(|t| format!("{} {:?}", t.name, t.state))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        } else if Instant::now() >= deadline {
            bail!("the daemon reports no service");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Injects one fault and measures it; the inner result is a rejection (the repetition is
/// discarded, e.g. the failover had another cause), the outer one an error that ends the
/// scenario. The victim is always let back (SIGCONT) and failback awaited before returning.
async fn inject(
    events: &mut Subscription,
    scenario: Scenario,
    victim: u32,
) -> anyhow::Result<Result<Sample, String>> {
    let pid = Pid::from_raw(
        i32::try_from(victim).with_context(|| format!("pid {victim} does not fit a pid_t"))?,
    );
    let signal = scenario.fault.signal();
    // Anything already queued happened before the fault and must not be mistaken for its effect.
    drain(events)?;
    let wall = SystemTime::now();
    let sent = Instant::now();
    kill(pid, signal).with_context(|| format!("sending {signal} to {VICTIM} (pid {pid})"))?;
    let waited = until(
        events,
        scenario.detect_limit(),
        |e| matches!(&e.kind, EventKind::PrimaryChanged { from: Some(f), .. } if f == VICTIM),
    )
    .await;
    if scenario.fault == Fault::Stop {
        // Before anything else, even on error: a frozen child would otherwise stay frozen until
        // the daemon's shutdown escalates to SIGKILL.
        kill(pid, Signal::SIGCONT).with_context(|| format!("sending SIGCONT to {pid}"))?;
    }
    let (event, received) = waited.with_context(|| {
        format!(
            "no failover away from {VICTIM} within {}",
            fmt_d(scenario.detect_limit())
        )
    })?;
    let received = received.saturating_duration_since(sent);
    let (to, reason) = match &event.kind {
        EventKind::PrimaryChanged { to, reason, .. } => (to.clone(), reason.clone()),
        _ => (None, String::new()),
    };
    // The event's own time is the bus's wall clock at publication, in whole milliseconds.
    let stamped_ms = humantime::parse_rfc3339(&event.time)
        .map(|t| signed_ms(t, wall))
        .unwrap_or(f64::NAN);

    // The victim comes back (SIGCONT above, or the supervisor restarts a killed child) and,
    // with a zero failback hold, becomes primary again as soon as it has risen.
    until(
        events,
        scenario.recover_limit(),
        |e| matches!(&e.kind, EventKind::PrimaryChanged { to: Some(t), .. } if t == VICTIM),
    )
    .await
    .with_context(|| {
        format!(
            "no failback to {VICTIM} within {}",
            fmt_d(scenario.recover_limit())
        )
    })?;

    // A failover the fault did not cause (a stray probe failure just before the kill, say)
    // would be a wrong figure, not a slow one: it is discarded and reported.
    let expected = match scenario.fault {
        Fault::Kill => reason.starts_with("primary_down (hard"),
        Fault::Stop => reason.starts_with("primary_down (probe"),
    };
    if !expected {
        return Ok(Err(format!(
            "unexpected reason {reason:?} after {}",
            fmt_d(received)
        )));
    }
    Ok(Ok(Sample {
        received,
        stamped_ms,
        to,
    }))
}

/// Discards the events already delivered to this subscriber.
fn drain(events: &mut Subscription) -> anyhow::Result<()> {
    // Bounded: the channel holds at most the journal's capacity.
    for _ in 0..100_000 {
        match events.next().now_or_never() {
            Some(Some(_)) => {}
            Some(None) => bail!("the event bus closed"),
            None => return Ok(()),
        }
    }
    Ok(())
}

/// Waits for the first event matching `want`; returns it with the instant it was received.
async fn until(
    events: &mut Subscription,
    limit: Duration,
    want: impl Fn(&Event) -> bool,
) -> anyhow::Result<(Arc<Event>, Instant)> {
    let deadline = Instant::now() + limit;
    loop {
        let delivery = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {}", fmt_d(limit)))?;
        let received = Instant::now();
        match delivery {
            Some(Delivery::Event(e)) if want(&e) => return Ok((e, received)),
            Some(Delivery::Event(_)) => {}
            // The event sought may be among those skipped: the repetition cannot be trusted.
            Some(Delivery::Lagged(n)) => bail!("the bench fell {n} events behind the bus"),
            None => bail!("the event bus closed"),
        }
    }
}

/// `a − b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

fn print_outcome(o: &Outcome) {
    let received = Stats::of(o.samples.iter().map(|s| s.received.as_secs_f64() * 1000.0));
    let stamped = Stats::of(o.samples.iter().map(|s| s.stamped_ms));
    let target = ms(o.scenario.target());
    println!(
        "   n {}  min {}  p50 {}  p90 {}  p99 {}  max {}  mean {}",
        received.n,
        fmt_ms(received.min),
        fmt_ms(received.p50),
        fmt_ms(received.p90),
        fmt_ms(received.p99),
        fmt_ms(received.max),
        fmt_ms(received.mean)
    );
    println!(
        "   by event timestamp (1ms resolution, no bus delivery): p50 {}  p99 {}  max {}",
        fmt_ms(stamped.p50),
        fmt_ms(stamped.p99),
        fmt_ms(stamped.max)
    );
    println!(
        "   target p99 ≤ {}: {} (p99/target {:.3}); floor {}, no-overhead ceiling {}",
        fmt_ms(target),
        verdict(received.p99, target),
        received.p99 / target,
        fmt_d(o.scenario.floor()),
        fmt_d(o.scenario.ceiling()),
    );
    if !o.rejected.is_empty() {
        println!("   {} repetition(s) rejected (see above)", o.rejected.len());
    }
    println!("   scenario wall time {}", fmt_d(o.wall));
}

fn print_summary(outcomes: &[Outcome]) {
    println!("\n== summary (ms; figure = kill(2) → bench receives primary_changed; nearest-rank percentiles)");
    println!(
        "   {:<30} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>9}",
        "scenario", "n", "p50", "p90", "p99", "max", "target", "p99/tg", "result", "floor"
    );
    for o in outcomes {
        let s = Stats::of(o.samples.iter().map(|s| s.received.as_secs_f64() * 1000.0));
        let target = ms(o.scenario.target());
        println!(
            "   {:<30} {:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.3} {:>6} {:>9.1}",
            o.scenario.label(),
            s.n,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            target,
            s.p99 / target,
            verdict(s.p99, target),
            ms(o.scenario.floor()),
        );
    }
}
