//! The `ssh` bench: the SSH provider and session pool against a real OpenSSH sshd that the
//! bench starts on 127.0.0.1 (the shared harness, `tunnelkeeper_test_support::Sshd`, with the
//! bench's settings from [`start_sshd`]), all in one run on one machine.
//!
//! Parts, in the order they run:
//! - `memory`: memory per idle pooled session (first, before the heap has grown), with one idle
//!   `ssh -N` process as the anchor;
//! - `latency`: `true` run by pooled exec vs a fresh `ssh` per command vs OpenSSH
//!   ControlMaster, p50/p99 side by side;
//! - `channels`: 1000 concurrent forwarded channels across pooled sessions (dial latency cold
//!   and warm, the pool's acquire percentiles against the target p99 < 1 ms);
//! - `throughput`: bulk transfer through a dialled channel vs direct loopback vs `ssh -L`.
//!
//! Every loop is bounded in count and time; everything stays on loopback. A part that fails is
//! reported and the others still run; the bench then exits non-zero.

mod channels;
mod latency;
mod memory;
mod throughput;
pub(crate) mod tools;

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};

use crate::common::{fmt_ms, ms, Echo, Stats, TempDir};
use channels::Channels;
use latency::{Latency, Method};
use memory::MemoryReport;
use throughput::{Route, Throughput};
use tunnelkeeper_test_support::{Sshd, SshdOptions};

/// The pool's acquire target once sessions are open (issue 3: p99 < 1 ms).
const ACQUIRE_TARGET_US: u64 = 1000;
/// How many recent acquisitions the pool computes its percentiles over (`LATENCY_SAMPLES` in
/// the pool; not exported, so mirrored here for the labels only).
const POOL_LATENCY_WINDOW: usize = 1024;

/// What to run, from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Rounds of the latency comparison (each method once per round); also the number of
    /// sequential single dials.
    runs: u32,
    /// Small counts (a smoke check).
    quick: bool,
    /// Commands run with the account's real HOME (its ~/.bashrc runs).
    login_home: bool,
    /// Extra sshd_config lines.
    sshd_options: Vec<String>,
    /// Concurrent dials per wave.
    channels: usize,
    /// The target's `max_channels` for the channel waves.
    max_channels: u32,
    /// Waves after the cold one.
    warm_waves: usize,
    /// Idle session totals of the memory steps.
    idle_totals: Vec<usize>,
    /// Bytes per transfer.
    transfer_bytes: u64,
    /// Time limit per transfer.
    transfer_limit: Duration,
    /// Transfers per route.
    transfer_reps: u32,
}

impl Settings {
    /// Full-size counts, or small ones with `quick`.
    pub(crate) fn new(
        runs: Option<u32>,
        quick: bool,
        login_home: bool,
        sshd_options: Vec<String>,
    ) -> Settings {
        const MIB: u64 = 1024 * 1024;
        Settings {
            runs: runs.unwrap_or(if quick { 20 } else { 200 }),
            quick,
            login_home,
            sshd_options,
            channels: if quick { 100 } else { 1000 },
            max_channels: if quick { 10 } else { 100 },
            warm_waves: 2,
            idle_totals: if quick { vec![5, 10] } else { vec![50, 100] },
            transfer_bytes: if quick { 32 * MIB } else { 512 * MIB },
            transfer_limit: Duration::from_secs(if quick { 5 } else { 20 }),
            transfer_reps: if quick { 1 } else { 5 },
        }
    }

    /// Overall limit of the latency part: generous for a loaded box, still bounded.
    fn latency_limit(&self) -> Duration {
        Duration::from_secs(60) + Duration::from_secs(2) * self.runs
    }
}

/// Starts the benches' sshd in `dir`: the shared test harness with `extra` lines first, then
/// `MaxSessions` and `MaxStartups` raised so the pool, not sshd, decides how channels spread
/// over sessions, and INFO logging (VERBOSE would log every channel). Also checks that the
/// OpenSSH client the comparisons run is installed.
pub(crate) async fn start_sshd(
    dir: &Path,
    extra: &[String],
    login_home: bool,
) -> anyhow::Result<Sshd> {
    if crate::common::which("ssh").is_none() {
        bail!("the OpenSSH client `ssh` is not on PATH (apt-get install openssh-client)");
    }
    let mut lines = extra.to_vec();
    lines.extend(
        [
            "MaxSessions 2000",
            "MaxStartups 100:30:200",
            "LogLevel INFO",
        ]
        .map(String::from),
    );
    let options = SshdOptions {
        dir: Some(dir.to_path_buf()),
        extra: lines,
        login_home,
    };
    Sshd::launch(options).await
}

/// Runs every part and prints its figures and a summary.
pub(crate) async fn ssh(settings: Settings) -> anyhow::Result<()> {
    // Each held channel costs the echo server one socket in this process.
    let needed = settings.channels as u64 + 256;
    let limit = tools::open_files_limit()?;
    if limit < needed {
        bail!(
            "the open-files limit is {limit}, and {} channels need about {needed}: raise it \
             (`ulimit -n {needed}`) or use --quick",
            settings.channels
        );
    }
    let dir = TempDir::new("ssh")?;
    let sshd = start_sshd(&dir.0, &settings.sshd_options, settings.login_home)
        .await
        .context("starting sshd")?;
    let echo = Echo::start().await?;
    print_header(&settings, &sshd);

    let mut failures = Vec::new();
    let mut failed = |part: &str, err: anyhow::Error| {
        println!("   FAILED: {err:#}");
        failures.push(format!("{part}: {err:#}"));
    };

    println!(
        "\n== memory per idle pooled session (measured first, before the other parts grow the heap)"
    );
    println!(
        "   max_channels 1, so each dial held at once needs its own session; dials then dropped"
    );
    let memory = match memory::measure(&sshd, echo.addr, &settings.idle_totals).await {
        Ok(report) => Some(report),
        Err(err) => {
            failed("memory", err);
            None
        }
    };

    println!(
        "\n== 1. command latency: `true`, {} rounds, methods in rotating order within each round",
        settings.runs
    );
    let latency =
        match latency::measure(&sshd, &dir.0, settings.runs, settings.latency_limit()).await {
            Ok(latency) => {
                print_latency(&latency);
                Some(latency)
            }
            Err(err) => {
                failed("latency", err);
                None
            }
        };

    println!(
        "\n== 2. {} concurrent forwarded channels, max_channels {} (sshd MaxSessions 2000), echo server on loopback",
        settings.channels, settings.max_channels
    );
    let mut target = sshd.target();
    target.max_channels = settings.max_channels;
    // The waves measure how the pool spreads channels over sessions: no session cap.
    target.max_sessions = 0;
    target.idle_timeout = Duration::from_secs(3600);
    let channels = match channels::measure(
        target,
        echo.addr,
        settings.channels,
        settings.warm_waves,
        settings.runs,
    )
    .await
    {
        Ok(channels) => {
            print_channels(&channels);
            Some(channels)
        }
        Err(err) => {
            failed("channels", err);
            None
        }
    };
    if let Some(memory) = &memory {
        print_memory(memory, latency.as_ref());
    }

    println!(
        "\n== 3. -L throughput: {} MiB per transfer (or {} at most), {} round(s), routes in turn",
        settings.transfer_bytes / (1024 * 1024),
        crate::common::fmt_d(settings.transfer_limit),
        settings.transfer_reps
    );
    let throughput = match throughput::measure(
        &sshd,
        settings.transfer_bytes,
        settings.transfer_limit,
        settings.transfer_reps,
    )
    .await
    {
        Ok(throughput) => {
            print_throughput(&throughput);
            Some(throughput)
        }
        Err(err) => {
            failed("throughput", err);
            None
        }
    };

    print_summary(
        latency.as_ref(),
        channels.as_ref(),
        memory.as_ref(),
        throughput.as_ref(),
    );
    println!("\n   load average at the end: {}", load_average());
    drop(sshd);
    if failures.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} part(s) did not complete:\n  {}",
            failures.len(),
            failures.join("\n  ")
        )
    }
}

/// What ran where, before any figure.
fn print_header(settings: &Settings, sshd: &Sshd) {
    println!("tunnelkeeper ssh bench — loopback only, one sshd started by the bench");
    println!(
        "  date: {} UTC; machine: {} CPUs ({}), Linux {}; load average {}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model(),
        read_trimmed("/proc/sys/kernel/osrelease"),
        load_average()
    );
    println!(
        "  server: {} on 127.0.0.1:{} (MaxSessions 2000, MaxStartups 100:30:200), login {}",
        sshd.version, sshd.port, sshd.user
    );
    println!(
        "  commands run with {}",
        if settings.login_home {
            "the account's real HOME (its ~/.bashrc runs for every command)"
        } else {
            "HOME set to an empty directory (sshd SetEnv; no ~/.bashrc) — --login-home to change"
        }
    );
    for option in &settings.sshd_options {
        println!("  extra sshd option: {option}");
    }
    if settings.quick {
        println!("  --quick: small counts, a smoke check; the figures are not the recorded ones");
    }
}

/// The latency table: each method with its ratios to ControlMaster and to a fresh `ssh`.
fn print_latency(latency: &Latency) {
    let stats = |m: Method| Stats::of(latency.samples(m).iter().map(|d| ms(*d)));
    let master = stats(Method::Master);
    let fresh = stats(Method::Fresh);
    println!(
        "   {:<30} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} │ {:>7} {:>7} │ {:>8} {:>8}",
        "method (ms)",
        "n",
        "min",
        "p50",
        "p90",
        "p99",
        "max",
        "mean",
        "p50÷CM",
        "p99÷CM",
        "p50÷ssh",
        "p99÷ssh"
    );
    for method in [Method::Pooled, Method::Master, Method::Fresh] {
        let s = stats(method);
        println!(
            "   {:<30} {:>4} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} │ {:>7.3} {:>7.3} │ {:>8.3} {:>8.3}",
            method.label(),
            s.n,
            s.min,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            s.mean,
            s.p50 / master.p50,
            s.p99 / master.p99,
            s.p50 / fresh.p50,
            s.p99 / fresh.p99,
        );
    }
    if let Some(m) = latency.master_memory {
        println!(
            "   ControlMaster process after its commands: VmRSS {} KiB, RssAnon {} KiB",
            m.rss, m.anon
        );
    }
}

/// The pool's acquire percentiles and the single-dial figure (the waves print as they go).
fn print_channels(c: &Channels) {
    let acquire = |s: &tunnelkeeper_providers::ssh::PoolStats| {
        format!(
            "p50 {} µs, p99 {} µs",
            s.acquire_p50_us.map_or("-".to_string(), |v| v.to_string()),
            s.acquire_p99_us.map_or("-".to_string(), |v| v.to_string())
        )
    };
    println!(
        "   PoolStats acquire after the cold wave (window: the tunnel's lease + the cold wave): {}",
        acquire(&c.after_cold)
    );
    let warm = warm_in_window(c);
    let window = if warm == POOL_LATENCY_WINDOW {
        "the last 1024 acquisitions, all warm".to_string()
    } else {
        format!("the last 1024 acquisitions, {warm} of them warm")
    };
    println!(
        "   PoolStats acquire after the warm waves (window: {window}): {}  → target p99 < 1 ms: {}",
        acquire(&c.after_warm),
        acquire_verdict(c.after_warm.acquire_p99_us)
    );
    println!(
        "   sessions opened {}, closed {}, open now {}",
        c.after_warm.opened, c.after_warm.closed, c.after_warm.sessions
    );
    let seq = Stats::of(c.sequential.iter().map(|d| ms(*d)));
    println!(
        "   one dial at a time on open sessions, n {}: p50 {}  p99 {}  max {}",
        seq.n,
        fmt_ms(seq.p50),
        fmt_ms(seq.p99),
        fmt_ms(seq.max)
    );
}

/// KiB per idle session between steps, and the OpenSSH anchors.
fn print_memory(report: &MemoryReport, latency: Option<&Latency>) {
    println!("\n== memory per idle session (from the first part)");
    for (from, to, [own_rss, own_anon, sshd_rss, sshd_anon]) in report.per_session() {
        println!(
            "   {from:>4} → {to:>4} sessions: this process {own_rss:.0} KiB VmRSS ({own_anon:.0} KiB RssAnon) per session; sshd {sshd_rss:.0} KiB VmRSS ({sshd_anon:.0} KiB RssAnon) per session"
        );
    }
    if let Some(m) = report.ssh_client {
        println!(
            "   anchor: one idle `ssh -N` process: VmRSS {} KiB, RssAnon {} KiB",
            m.rss, m.anon
        );
    }
    if let Some(m) = latency.and_then(|l| l.master_memory) {
        println!(
            "   anchor: the ControlMaster after its commands: VmRSS {} KiB, RssAnon {} KiB",
            m.rss, m.anon
        );
    }
}

/// MB/s per route, with the ratio to direct loopback.
fn print_throughput(t: &Throughput) {
    let direct = median_mb(&t.of(Route::Direct));
    println!(
        "   {:<24} {:>4} {:>10} {:>10} {:>10} {:>10} │ {:>14}",
        "route (MB/s, 10^6 B)", "n", "median", "min", "max", "÷direct", "CPU-s/GB (med)"
    );
    for route in [Route::Direct, Route::Russh, Route::OpenSsh] {
        let runs = t.of(route);
        let stats = Stats::of(runs.iter().map(|r| r.mb_per_s()));
        println!(
            "   {:<24} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>10.3} │ {:>14.2}",
            route.label(),
            stats.n,
            median_mb(&runs),
            stats.min,
            stats.max,
            median_mb(&runs) / direct,
            median_cpu(&runs)
        );
    }
    println!(
        "   russh ÷ ssh -L, median of the per-round ratios: {:.3} (MB/s), {:.3} (CPU-s/GB)",
        round_ratio(t, |r| r.mb_per_s()),
        round_ratio(t, |r| r.cpu_per_gb())
    );
    let bounded = t.runs.iter().filter(|(_, r)| r.time_bound).count();
    if bounded > 0 {
        println!("   {bounded} transfer(s) stopped by the time limit before the byte count");
    }
}

/// The median of the transfers' MB/s (the lower middle for an even count).
fn median_mb(runs: &[throughput::Transfer]) -> f64 {
    Stats::of(runs.iter().map(|r| r.mb_per_s())).p50
}

/// The median of the transfers' CPU seconds per GB.
fn median_cpu(runs: &[throughput::Transfer]) -> f64 {
    Stats::of(runs.iter().map(|r| r.cpu_per_gb())).p50
}

/// The median over rounds of russh's figure divided by `ssh -L`'s in the same round (the two
/// ran back to back, so they saw much the same load).
fn round_ratio(t: &Throughput, figure: impl Fn(&throughput::Transfer) -> f64) -> f64 {
    let (russh, openssh) = (t.of(Route::Russh), t.of(Route::OpenSsh));
    Stats::of(
        russh
            .iter()
            .zip(openssh.iter())
            .map(|(r, o)| figure(r) / figure(o)),
    )
    .p50
}

/// The headline figures of every part that completed, one line each.
fn print_summary(
    latency: Option<&Latency>,
    channels: Option<&Channels>,
    memory: Option<&MemoryReport>,
    throughput: Option<&Throughput>,
) {
    println!("\n== summary (nearest-rank percentiles)");
    println!("   {:<52} {:<30} anchor / target", "figure", "result");
    if let Some(l) = latency {
        let s = |m: Method| Stats::of(l.samples(m).iter().map(|d| ms(*d)));
        let (pooled, master, fresh) = (s(Method::Pooled), s(Method::Master), s(Method::Fresh));
        println!(
            "   {:<52} {:<30} ControlMaster {} / {}; fresh ssh {} / {}",
            format!("exec `true` p50 / p99, pooled (n {})", pooled.n),
            format!("{} / {}", fmt_ms(pooled.p50), fmt_ms(pooled.p99)),
            fmt_ms(master.p50),
            fmt_ms(master.p99),
            fmt_ms(fresh.p50),
            fmt_ms(fresh.p99),
        );
        println!(
            "   {:<52} {:<30} (pooled ÷ fresh ssh: {:.3} / {:.3})",
            "exec p50 / p99, pooled ÷ ControlMaster",
            format!(
                "{:.3} / {:.3}",
                pooled.p50 / master.p50,
                pooled.p99 / master.p99
            ),
            pooled.p50 / fresh.p50,
            pooled.p99 / fresh.p99,
        );
    }
    if let Some(c) = channels {
        let p99 = c.after_warm.acquire_p99_us;
        let mixed = if warm_in_window(c) < POOL_LATENCY_WINDOW {
            " (window includes cold acquisitions)"
        } else {
            ""
        };
        println!(
            "   {:<52} {:<30} target p99 < 1 ms: {}{mixed}",
            format!("acquire p50 / p99, warm sessions ({} channels)", c.count),
            format!(
                "{} / {} µs",
                c.after_warm
                    .acquire_p50_us
                    .map_or("-".to_string(), |v| v.to_string()),
                p99.map_or("-".to_string(), |v| v.to_string())
            ),
            acquire_verdict(p99),
        );
        for wave in &c.waves {
            let s = Stats::of(wave.dials.iter().map(|d| ms(*d)));
            println!(
                "   {:<52} {:<30} {} sessions, {} channels held, {} echoed",
                format!("dial p50 / p99, {} wave of {} at once", wave.label, c.count),
                format!("{} / {}", fmt_ms(s.p50), fmt_ms(s.p99)),
                wave.held.sessions,
                wave.held.channels_in_use,
                wave.echoed
            );
        }
        let seq = Stats::of(c.sequential.iter().map(|d| ms(*d)));
        println!(
            "   {:<52} {:<30} max_channels {}",
            "dial p50 / p99, one at a time, warm",
            format!("{} / {}", fmt_ms(seq.p50), fmt_ms(seq.p99)),
            c.max_channels
        );
    }
    if let Some(m) = memory {
        if let Some((from, to, [rss, anon, sshd_rss, _])) = m.per_session().last().copied() {
            let anchor = m.ssh_client.map_or("-".to_string(), |a| {
                format!("idle `ssh -N`: {} KiB VmRSS, {} KiB RssAnon", a.rss, a.anon)
            });
            println!(
                "   {:<52} {:<30} {anchor}",
                format!("memory per idle session ({from} → {to})"),
                format!("{rss:.0} KiB RSS ({anon:.0} anon)"),
            );
            println!(
                "   {:<52} {:<30}",
                "sshd memory per idle session (server side)",
                format!("{sshd_rss:.0} KiB RSS"),
            );
        }
    }
    if let Some(t) = throughput {
        let direct = median_mb(&t.of(Route::Direct));
        let russh = median_mb(&t.of(Route::Russh));
        let openssh = median_mb(&t.of(Route::OpenSsh));
        println!(
            "   {:<52} {:<30} direct {direct:.0} MB/s ({:.3}); ssh -L {openssh:.0} MB/s ({:.3})",
            "-L throughput, russh channel (median)",
            format!("{russh:.0} MB/s"),
            russh / direct,
            russh / openssh,
        );
        println!(
            "   {:<52} {:<30} ssh -L {:.2} CPU-s/GB; per-round russh ÷ ssh -L {:.3}",
            "-L CPU per GB, russh channel (median, whole path)",
            format!("{:.2} CPU-s/GB", median_cpu(&t.of(Route::Russh))),
            median_cpu(&t.of(Route::OpenSsh)),
            round_ratio(t, |r| r.cpu_per_gb()),
        );
    }
}

/// How many of the pool's last 1024 acquisitions (its percentile window) came from warm waves.
fn warm_in_window(c: &Channels) -> usize {
    (c.waves.len().saturating_sub(1) * c.count).min(POOL_LATENCY_WINDOW)
}

/// `PASS` when the acquire p99 is under the target (strictly: "p99 < 1 ms"), else `MISS`.
fn acquire_verdict(p99_us: Option<u64>) -> &'static str {
    match p99_us {
        Some(p99) if p99 < ACQUIRE_TARGET_US => "PASS",
        Some(_) => "MISS",
        None => "-",
    }
}

/// The CPU's model name from `/proc/cpuinfo`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A small `/proc` file's text, or `?`.
fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}
