//! The `scale` bench: the real daemon binary with many tunnels, idle but probing.
//!
//! `tunnelkeeper run -c GENERATED` (the binary next to this one) runs as a child process with N
//! tunnels spread over N/10 services of 10 tunnels each: half `direct` (to the service's echo
//! listener), half `command` (`sleep 1000000` with a fixed `endpoint` at the same listener: a
//! real child process per tunnel, so N/2 children are part of the load). Every tunnel is probed
//! end to end every second (`send: "ping\n"`, `expect: "ping"`, the built-in rise/fall of 3).
//! The echo listeners (one per service) run in this process on a thread of their own.
//!
//! Once every tunnel is up and a warm-up has passed, a window of `--secs` measures:
//!
//! - **CPU**: the daemon's utime + stime (all threads) from `/proc/PID/stat` over the wall time
//!   of the window, in cores (its `sleep` children use none);
//! - **memory**: `VmRSS` (and `RssAnon`), sampled every second: the peak and the last sample;
//! - **events/s**: lines received on `GET /v1/events?since=SEQ&follow=true` during the window,
//!   checked against the `last_seq` delta of `/v1/status`;
//! - **probes/s**: the delta of `tunnelkeeper_tunnel_latency_seconds_count` summed over all
//!   tunnels (`GET /metrics`), i.e. successful probes.
//!
//! Then `GET /v1/status` latency over the control socket, 200 sequential requests per method,
//! interleaved round by round: through [`Client`] (connect, hyper client, the whole body read;
//! the figure), as a raw request written on a `UnixStream` and read to EOF (no HTTP client),
//! and the floor: the same raw round trip for an unknown path (`404`: connect, accept, HTTP
//! parse and a tiny answer, without building or serializing a status).
//!
//! The anchor is the same run with a tenth of the tunnels (100 against 1000 by default), side by
//! side: if the daemon scales linearly, CPU per probe and memory per tunnel stay put. Every loop
//! is bounded in count and time, everything is on 127.0.0.1, and the daemon is stopped (SIGTERM,
//! SIGKILL after 60 s) at the end of each run. Results are written up in `docs/BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tunnelkeeper::control::client::Client;
use tunnelkeeper::status::TunnelState;

use crate::common::{
    clock_ticks, descendants_of, ensure_open_files, fmt_d, fmt_ms, load_1min, load_average, ms,
    process_cpu, threads_and_fds, verdict, which, DaemonProcess, Echo, ProcMemory, Stats, TempDir,
};

/// Tunnels per service.
const PER_SERVICE: usize = 10;
/// Target: the daemon's CPU with the full tunnel count (issue 8).
const CPU_TARGET_CORES: f64 = 0.5;
/// Target: `/v1/status` p99 with the full tunnel count (issue 8).
const STATUS_TARGET_MS: f64 = 10.0;
/// Sequential requests per method in the status latency part.
const STATUS_REQUESTS: usize = 200;
/// Limit of one status request.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// Limit of the whole status latency part.
const STATUS_PHASE_LIMIT: Duration = Duration::from_secs(120);
/// Left alone after every tunnel is up, before the window: longer than the default
/// `failback_hold` (30 s), because a service's first primary is whichever tunnel rose first, and
/// the preferred one takes over a hold later; the window should see the steady state.
const WARMUP: Duration = Duration::from_secs(35);
/// How long the daemon may take to answer on its socket.
const SOCKET_LIMIT: Duration = Duration::from_secs(30);
/// How long it may take to stop (every child gets SIGTERM, then SIGKILL after `stop_grace`).
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Largest status document read.
const MAX_STATUS: usize = 64 * 1024 * 1024;

/// What to run, from the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Tunnels of the measured run.
    pub(crate) tunnels: usize,
    /// Tunnels of the anchor run.
    pub(crate) anchor: usize,
    /// Length of the measurement window.
    pub(crate) window: Duration,
}

/// What one run measured.
struct RunResult {
    tunnels: usize,
    services: usize,
    children: usize,
    startup: Duration,
    threads: u64,
    fds: usize,
    window: Window,
    status: StatusLatency,
    shutdown: Option<Duration>,
}

/// The idle window's figures.
struct Window {
    wall: Duration,
    cpu: Duration,
    own_cpu: Duration,
    last: ProcMemory,
    peak: ProcMemory,
    /// The first sample (a second into the window), to tell a plateau from growth.
    first: ProcMemory,
    events: u64,
    event_types: BTreeMap<String, u64>,
    seq_delta: u64,
    probes: f64,
    load_before: String,
    load_after: String,
}

impl Window {
    fn cores(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    fn probes_per_second(&self) -> f64 {
        self.probes / self.wall.as_secs_f64().max(1e-9)
    }

    /// CPU time per successful probe, in microseconds (everything the daemon did, divided).
    fn cpu_per_probe_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.probes.max(1.0)
    }

    fn events_per_second(&self) -> f64 {
        self.events as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Status latency, milliseconds.
struct StatusLatency {
    client: Vec<f64>,
    raw: Vec<f64>,
    floor: Vec<f64>,
    bytes: usize,
    /// Daemon CPU per request over the whole part (all three methods).
    cpu_per_request_ms: f64,
    load: String,
}

/// Runs the anchor and the measured run and prints both side by side.
pub(crate) async fn scale(settings: Settings) -> anyhow::Result<()> {
    let sleep = which("sleep").context("`sleep` not found on PATH (coreutils)")?;
    // Per command tunnel the daemon holds two output pipes and a pidfd or so; the probes' sockets
    // (one per tunnel per second at most, briefly) and this process's listeners come on top.
    let needed = settings.tunnels.max(settings.anchor) as u64 * 4 + 1024;
    let open_files = ensure_open_files(needed)?;
    let ticks = clock_ticks();
    println!(
        "tunnelkeeper scale bench — the real daemon binary, loopback only, {} vCPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "  runs: anchor {} tunnels, then {} tunnels; {PER_SERVICE} tunnels per service (half \
         `direct`, half `command` running `{}`); probes every 1s (timeout 1s, rise 3, fall 3, \
         send/expect through an echo listener per service)",
        settings.anchor,
        settings.tunnels,
        sleep.display()
    );
    println!(
        "  window {} after warm-up {}; open-files limit (inherited by the daemon): {open_files}",
        fmt_d(settings.window),
        fmt_d(WARMUP)
    );
    println!("  load average at start: {}", load_average());

    let mut results = Vec::new();
    for (index, tunnels) in [settings.anchor, settings.tunnels].into_iter().enumerate() {
        println!(
            "\n== {tunnels} tunnels ({})",
            if index == 0 { "anchor" } else { "measured" }
        );
        let result = run(tunnels, settings.window, &sleep, ticks, index)
            .await
            .with_context(|| format!("the {tunnels}-tunnel run"))?;
        results.push(result);
    }
    if let [anchor, main] = results.as_slice() {
        print_summary(anchor, main);
    }
    Ok(())
}

/// One daemon with `tunnels` tunnels: start, wait until all are up, warm up, measure, stop.
async fn run(
    tunnels: usize,
    window: Duration,
    sleep: &Path,
    ticks: u64,
    index: usize,
) -> anyhow::Result<RunResult> {
    let services = tunnels.div_ceil(PER_SERVICE);
    let dir = TempDir::new(&format!("scale{index}"))?;
    let echoes = EchoThread::start(services).await?;
    let socket = dir.0.join("control.sock");
    let config = dir.0.join("scale.yaml");
    std::fs::write(&config, config_text(&dir.0, tunnels, &echoes.addrs, sleep))
        .with_context(|| format!("writing {}", config.display()))?;
    let spawned = Instant::now();
    let daemon =
        DaemonProcess::start(&config, &socket, &dir.0.join("daemon.log"), SOCKET_LIMIT).await?;
    let startup = wait_all_up(&daemon.client, tunnels, spawned)
        .await
        .with_context(|| format!("waiting for every tunnel to be up\n{}", daemon.log_tail()))?;
    let children = descendants_of(daemon.pid);
    let (threads, fds) = threads_and_fds(daemon.pid);
    println!(
        "   all {tunnels} tunnels up {} after spawning the daemon; it has {threads} threads, {fds} \
         open fds, {} child processes",
        fmt_d(startup),
        children.len()
    );
    tokio::time::sleep(WARMUP).await;
    let startup_counts = startup_events(&daemon.client).await?;
    println!(
        "   published before the window (start-up, then {} of warm-up): {}",
        fmt_d(WARMUP),
        fmt_counts(&startup_counts)
    );

    let window = measure_window(&daemon, window, ticks).await?;
    print_window(tunnels, &window);
    let status = status_latency(&daemon, ticks).await?;
    print_status(&status);

    let shutdown = match daemon.stop(STOP_LIMIT).await {
        Ok(took) => {
            println!(
                "   shutdown (SIGTERM → exit, every child stopped): {}",
                fmt_d(took)
            );
            Some(took)
        }
        Err(e) => {
            println!("   shutdown: {e:#}");
            None
        }
    };
    let left: Vec<u32> = children
        .iter()
        .copied()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    if !left.is_empty() {
        println!(
            "   warning: {} child processes still present after the shutdown",
            left.len()
        );
    }
    drop(echoes);
    Ok(RunResult {
        tunnels,
        services,
        children: children.len(),
        startup,
        threads,
        fds,
        window,
        status,
        shutdown,
    })
}

/// The generated configuration (YAML text, read by `tunnelkeeper run` like any other).
fn config_text(dir: &Path, tunnels: usize, echoes: &[SocketAddr], sleep: &Path) -> String {
    let mut text = crate::common::config_header(dir);
    for i in 0..tunnels {
        let (service, j) = (i / PER_SERVICE, i % PER_SERVICE);
        let echo = echoes.get(service).copied().unwrap_or(echoes[0]);
        if j == 0 {
            let _ = write!(text, "  - name: svc{service:04}\n    tunnels:\n");
        }
        if j % 2 == 0 {
            let _ = writeln!(
                text,
                "      - {{ name: d{j}, provider: direct, address: \"{echo}\" }}"
            );
        } else {
            let _ = writeln!(
                text,
                "      - {{ name: c{j}, provider: command, run: [{sleep}, \"1000000\"], \
                 endpoint: \"{echo}\", stop_grace: 1s }}",
                sleep = crate::common::quote(sleep)
            );
        }
    }
    text
}

/// Polls the status until every tunnel is up; returns the time since `spawned`.
async fn wait_all_up(
    client: &Client,
    tunnels: usize,
    spawned: Instant,
) -> anyhow::Result<Duration> {
    let limit = Duration::from_secs(60) + Duration::from_millis(30) * tunnels as u32;
    let deadline = spawned + limit;
    loop {
        let status = client.status().await?;
        let all: Vec<_> = status.services.iter().flat_map(|s| &s.tunnels).collect();
        let up = all.iter().filter(|t| t.state == TunnelState::Up).count();
        if all.len() == tunnels && up == tunnels {
            return Ok(spawned.elapsed());
        }
        if Instant::now() >= deadline {
            let mut states: BTreeMap<String, usize> = BTreeMap::new();
            for t in &all {
                *states.entry(format!("{:?}", t.state)).or_default() += 1;
            }
            bail!(
                "after {}: {up} of {tunnels} up ({} reported; states {states:?})",
                fmt_d(limit),
                all.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The idle window: CPU, memory, events and probes over `length`.
async fn measure_window(
    daemon: &DaemonProcess,
    length: Duration,
    ticks: u64,
) -> anyhow::Result<Window> {
    let seq_before = last_seq(&daemon.client).await?;
    let probes_before = probe_count(&daemon.client).await?;
    // The follower counts every line; the window's events are those after `seq_before`.
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let follower = {
        let client = daemon.client.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            client
                .events(seq_before, true, move |line| {
                    let kind = event_key(line);
                    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                    *counts.entry(kind).or_default() += 1;
                    Ok(())
                })
                .await
        })
    };
    // Let the follower connect before the window opens.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let load_before = load_average();
    if load_1min() > 1.0 {
        println!(
            "   note: 1-minute load average {} at the start of the window (> 1: other work shares \
             the vCPUs)",
            load_1min()
        );
    }
    let cpu_before = process_cpu(daemon.pid, ticks).context("the daemon is gone")?;
    let own_before = process_cpu(std::process::id(), ticks).unwrap_or_default();
    let started = Instant::now();
    let mut peak = ProcMemory::default();
    let mut last = ProcMemory::default();
    let mut first = None;
    let end = started + length;
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next).await;
        last = ProcMemory::of(daemon.pid).context("the daemon is gone")?;
        first.get_or_insert(last);
        peak = peak.max(last);
    }
    let cpu_after = process_cpu(daemon.pid, ticks).context("the daemon is gone")?;
    let own_after = process_cpu(std::process::id(), ticks).unwrap_or_default();
    let wall = started.elapsed();
    let load_after = load_average();
    let probes_after = probe_count(&daemon.client).await?;
    let seq_after = last_seq(&daemon.client).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    follower.abort();
    let event_types = counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Window {
        wall,
        cpu: cpu_after.saturating_sub(cpu_before),
        own_cpu: own_after.saturating_sub(own_before),
        last,
        peak,
        first: first.unwrap_or_default(),
        events: event_types.values().sum(),
        event_types,
        seq_delta: seq_after.saturating_sub(seq_before),
        probes: probes_after - probes_before,
        load_before,
        load_after,
    })
}

/// An event line's type, with the first word of the reason for `primary_changed`.
fn event_key(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return "?".into();
    };
    let kind = v["type"].as_str().unwrap_or("?");
    match v["reason"].as_str() {
        Some(reason) if kind == "primary_changed" => {
            let word = reason.split([' ', '(']).next().unwrap_or(reason);
            format!("{kind} ({word})")
        }
        _ => kind.to_string(),
    }
}

/// The events published so far (as far as the journal reaches), counted by [`event_key`].
async fn startup_events(client: &Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    let replay = client.events(0, false, |line| {
        *counts.entry(event_key(line)).or_default() += 1;
        Ok(())
    });
    tokio::time::timeout(REQUEST_LIMIT, replay)
        .await
        .context("replaying the journal timed out")??;
    Ok(counts)
}

/// `daemon.last_seq` from `/v1/status`.
async fn last_seq(client: &Client) -> anyhow::Result<u64> {
    let status = client.status_json().await?;
    status["daemon"]["last_seq"]
        .as_u64()
        .context("no daemon.last_seq in the status")
}

/// Successful probes so far: `tunnelkeeper_tunnel_latency_seconds_count` summed over tunnels.
async fn probe_count(client: &Client) -> anyhow::Result<f64> {
    let response = client.request(Method::GET, "/metrics", None).await?;
    let body = tunnelkeeper::http_client::read_body(response, MAX_STATUS).await?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tunnelkeeper_tunnel_latency_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// `STATUS_REQUESTS` rounds of: the floor, a raw status request, a [`Client`] status request.
async fn status_latency(daemon: &DaemonProcess, ticks: u64) -> anyhow::Result<StatusLatency> {
    let socket = daemon.client.socket().to_path_buf();
    let load = load_average();
    let cpu_before = process_cpu(daemon.pid, ticks).context("the daemon is gone")?;
    let deadline = Instant::now() + STATUS_PHASE_LIMIT;
    let (mut client, mut raw, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for round in 0..STATUS_REQUESTS {
        if Instant::now() >= deadline {
            println!(
                "   status part stopped after {round} rounds ({} limit)",
                fmt_d(STATUS_PHASE_LIMIT)
            );
            break;
        }
        let started = Instant::now();
        let (code, _) = raw_get(&socket, "/v1/no-such-endpoint").await?;
        if code != 404 {
            bail!("the floor request got {code}, expected 404");
        }
        floor.push(ms(started.elapsed()));

        let started = Instant::now();
        let (code, n) = raw_get(&socket, "/v1/status").await?;
        if code != 200 {
            bail!("a raw status request got {code}");
        }
        raw.push(ms(started.elapsed()));

        let started = Instant::now();
        let body = tokio::time::timeout(REQUEST_LIMIT, async {
            let response = daemon
                .client
                .request(Method::GET, "/v1/status", None)
                .await?;
            tunnelkeeper::http_client::read_body(response, MAX_STATUS).await
        })
        .await
        .context("a status request timed out")??;
        client.push(ms(started.elapsed()));
        bytes = body.len().max(n);
    }
    let cpu = process_cpu(daemon.pid, ticks)
        .context("the daemon is gone")?
        .saturating_sub(cpu_before);
    let requests = (client.len() + raw.len() + floor.len()).max(1);
    Ok(StatusLatency {
        client,
        raw,
        floor,
        bytes,
        cpu_per_request_ms: ms(cpu) / requests as f64,
        load,
    })
}

/// `GET PATH` written by hand on a fresh connection, read to EOF (`Connection: close`); returns
/// the status code and the body size (the bytes after the head).
async fn raw_get(socket: &Path, path: &str) -> anyhow::Result<(u16, usize)> {
    let work = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut answer = Vec::with_capacity(64 * 1024);
        stream.read_to_end(&mut answer).await?;
        let code = answer
            .get(9..12)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u16>().ok())
            .context("not an HTTP answer")?;
        let head = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .unwrap_or(answer.len());
        Ok::<_, anyhow::Error>((code, answer.len() - head))
    };
    tokio::time::timeout(REQUEST_LIMIT, work)
        .await
        .with_context(|| format!("GET {path} timed out"))?
}

fn print_window(tunnels: usize, w: &Window) {
    println!(
        "   window {} (load average before {}, after {}):",
        fmt_d(w.wall),
        w.load_before,
        w.load_after
    );
    println!(
        "     daemon CPU {:.3} cores ({:.1} % of one core); {:.0} successful probes/s ({:.2} per \
         tunnel per second) → {:.1} µs of daemon CPU per probe",
        w.cores(),
        w.cores() * 100.0,
        w.probes_per_second(),
        w.probes_per_second() / tunnels.max(1) as f64,
        w.cpu_per_probe_us()
    );
    println!(
        "     daemon memory: VmRSS {} (peak {}), RssAnon {} (peak {}); {:.1} KiB VmRSS per tunnel; \
         a second into the window VmRSS {}, RssAnon {}",
        fmt_kib(w.last.rss),
        fmt_kib(w.peak.rss),
        fmt_kib(w.last.anon),
        fmt_kib(w.peak.anon),
        w.last.rss as f64 / tunnels.max(1) as f64,
        fmt_kib(w.first.rss),
        fmt_kib(w.first.anon)
    );
    println!(
        "     events: {} received on /v1/events?follow=true ({:.2}/s){}; last_seq delta {}",
        w.events,
        w.events_per_second(),
        if w.event_types.is_empty() {
            String::new()
        } else {
            format!(" [{}]", fmt_counts(&w.event_types))
        },
        w.seq_delta
    );
    println!(
        "     this process (echo listeners, event follower): {:.3} cores",
        w.own_cpu.as_secs_f64() / w.wall.as_secs_f64().max(1e-9)
    );
}

fn print_status(s: &StatusLatency) {
    println!(
        "   GET /v1/status latency, {} sequential requests per method, interleaved (load {}); \
         body {:.1} KiB:",
        s.client.len(),
        s.load,
        s.bytes as f64 / 1024.0
    );
    let floor = Stats::of(s.floor.iter().copied());
    for (label, values) in [
        ("Client::request + body (figure)", &s.client),
        ("raw GET /v1/status on a UnixStream", &s.raw),
        ("floor: raw GET of an unknown path (404)", &s.floor),
    ] {
        let st = Stats::of(values.iter().copied());
        println!(
            "     {label:<42} p50 {:>8}  p99 {:>8}  max {:>8}  (p50 {:.1} × floor)",
            fmt_ms(st.p50),
            fmt_ms(st.p99),
            fmt_ms(st.max),
            st.p50 / floor.p50
        );
    }
    let client = Stats::of(s.client.iter().copied());
    println!(
        "     target p99 ≤ {}: {}; daemon CPU {:.2} ms per request (all three kinds averaged)",
        fmt_ms(STATUS_TARGET_MS),
        verdict(client.p99, STATUS_TARGET_MS),
        s.cpu_per_request_ms
    );
}

fn print_summary(anchor: &RunResult, main: &RunResult) {
    let scale = main.tunnels as f64 / anchor.tunnels.max(1) as f64;
    println!(
        "\n== summary: {} tunnels against the {}-tunnel anchor ({scale:.0} × the tunnels)",
        main.tunnels, anchor.tunnels
    );
    println!(
        "   {:<44} {:>12} {:>12} {:>10}",
        "figure", "anchor", "measured", "ratio"
    );
    let row = |label: &str, a: f64, m: f64, unit: &str| {
        println!(
            "   {label:<44} {:>12} {:>12} {:>10}",
            format!("{a:.3}{unit}"),
            format!("{m:.3}{unit}"),
            if a > 0.0 {
                format!("{:.2}", m / a)
            } else {
                "—".to_string()
            }
        );
    };
    println!(
        "   {:<44} {:>12} {:>12} {:>10}",
        "services / child processes",
        format!("{} / {}", anchor.services, anchor.children),
        format!("{} / {}", main.services, main.children),
        ""
    );
    row(
        "daemon CPU (cores)",
        anchor.window.cores(),
        main.window.cores(),
        "",
    );
    row(
        "successful probes/s",
        anchor.window.probes_per_second(),
        main.window.probes_per_second(),
        "",
    );
    row(
        "daemon CPU per probe (µs)",
        anchor.window.cpu_per_probe_us(),
        main.window.cpu_per_probe_us(),
        "",
    );
    row(
        "VmRSS (MiB)",
        anchor.window.last.rss as f64 / 1024.0,
        main.window.last.rss as f64 / 1024.0,
        "",
    );
    row(
        "RssAnon (MiB)",
        anchor.window.last.anon as f64 / 1024.0,
        main.window.last.anon as f64 / 1024.0,
        "",
    );
    let added = main.tunnels.saturating_sub(anchor.tunnels).max(1) as f64;
    println!(
        "   {:<44} {:>12} {:>12}",
        "VmRSS per added tunnel (KiB)",
        "",
        format!(
            "{:.1}",
            (main.window.last.rss as f64 - anchor.window.last.rss as f64) / added
        )
    );
    row(
        "events/s in the window",
        anchor.window.events_per_second(),
        main.window.events_per_second(),
        "",
    );
    let (sa, sm) = (
        Stats::of(anchor.status.client.iter().copied()),
        Stats::of(main.status.client.iter().copied()),
    );
    let (fa, fm) = (
        Stats::of(anchor.status.floor.iter().copied()),
        Stats::of(main.status.floor.iter().copied()),
    );
    row("/v1/status p50 (ms)", sa.p50, sm.p50, "");
    row("/v1/status p99 (ms)", sa.p99, sm.p99, "");
    row("floor (404) p50 (ms)", fa.p50, fm.p50, "");
    row("floor (404) p99 (ms)", fa.p99, fm.p99, "");
    row(
        "status body (KiB)",
        anchor.status.bytes as f64 / 1024.0,
        main.status.bytes as f64 / 1024.0,
        "",
    );
    row(
        "start-up to all up (s)",
        anchor.startup.as_secs_f64(),
        main.startup.as_secs_f64(),
        "",
    );
    if let (Some(a), Some(m)) = (anchor.shutdown, main.shutdown) {
        row("shutdown (s)", a.as_secs_f64(), m.as_secs_f64(), "");
    }
    println!(
        "   {:<44} {:>12} {:>12}",
        "daemon threads / open fds",
        format!("{} / {}", anchor.threads, anchor.fds),
        format!("{} / {}", main.threads, main.fds)
    );
    println!(
        "   targets at {} tunnels: CPU ≤ {CPU_TARGET_CORES} core: {} ({:.3}); status p99 ≤ {}: {} \
         ({}); load average during the window {} → {}",
        main.tunnels,
        verdict(main.window.cores(), CPU_TARGET_CORES),
        main.window.cores(),
        fmt_ms(STATUS_TARGET_MS),
        verdict(sm.p99, STATUS_TARGET_MS),
        fmt_ms(sm.p99),
        main.window.load_before,
        main.window.load_after
    );
}

/// `type N, type N`.
fn fmt_counts(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".to_string();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// KiB for people: `12.3 MiB`.
fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The services' echo listeners, on a thread and runtime of their own (so that serving the
/// probes does not delay this process's status requests on its own workers).
struct EchoThread {
    addrs: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoThread {
    async fn start(count: usize) -> anyhow::Result<EchoThread> {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<anyhow::Result<Vec<SocketAddr>>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = addr_tx
                            .send(Err(anyhow::Error::new(e)
                                .context("starting the echo listeners' runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut echoes = Vec::with_capacity(count);
                    for _ in 0..count {
                        match Echo::start().await {
                            Ok(echo) => echoes.push(echo),
                            Err(e) => {
                                let _ = addr_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    let _ = addr_tx.send(Ok(echoes.iter().map(|e| e.addr).collect()));
                    let _ = stop_rx.await;
                    drop(echoes);
                });
            })
            .context("spawning the echo listeners' thread")?;
        let addrs = addr_rx
            .await
            .context("the echo listeners' thread ended early")??;
        if addrs.is_empty() {
            bail!("no echo listener");
        }
        Ok(EchoThread {
            addrs,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for EchoThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_splits_tunnels_half_and_half() {
        let echoes = vec![SocketAddr::from(([127, 0, 0, 1], 9)); 2];
        let text = config_text(Path::new("/tmp/x"), 20, &echoes, Path::new("/bin/sleep"));
        assert_eq!(text.matches("provider: direct").count(), 10);
        assert_eq!(text.matches("provider: command").count(), 10);
        assert_eq!(text.matches("- name: svc").count(), 2);
        let parsed = tunnelkeeper::config::parse(&text, Path::new("/tmp/x/scale.yaml"));
        assert!(parsed.is_ok(), "{text}");
    }
}
