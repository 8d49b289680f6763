//! The `listener` bench: the failover listener's data plane against plain loopback, socat and
//! HAProxy, all in one run on one machine.
//!
//! One in-process [`Daemon`] (YAML text through `tunnelkeeper::config::parse`, the path
//! `tunnelkeeper run` takes) serves two services, each with `listen: 127.0.0.1:0` and a single
//! `direct` tunnel: `iperf` leads to an `iperf3 -s` server, `echo` to a 1-byte echo server that
//! runs on its own thread with its own runtime (so it does not share the daemon's workers). The
//! probes only dial (no `send`/`expect`: iperf3 is not an echo service), every second. Next to
//! it, `socat TCP-LISTEN:…,fork,reuseaddr` and `haproxy -db` (`mode tcp`, one frontend and one
//! backend, default settings otherwise) forward to the same two servers. Then:
//!
//! 1. **Throughput**: `iperf3 -c … -t N -P {1,8} -J` straight to the server and through each
//!    forwarder, in rounds (each round visits every route, in a rotated order); the figure is the
//!    median over the rounds of the receiver's `bits_per_second`.
//! 2. **New connections**: blocking clients on their own threads connect, write 1 byte, read it
//!    back and close, N times in a row (one client) and then from 8 clients at once; the figures
//!    are per-connection latency (connect → echo → close) and connections per second.
//! 3. **CPU per GB**: a fixed `iperf3 -n BYTES` transfer through each forwarder while its CPU
//!    time is read from `/proc` (this process for the listener, without the iperf3 clients it
//!    has reaped, minus an idle baseline; the
//!    socat parent including its reaped per-connection children; the haproxy process).
//! 4. **HTTP connection rate**: `wrk -t2 -c8 -H "Connection: close" --latency` against an HTTP
//!    backend that answers by itself (a one-thread `haproxy` in `mode http` with
//!    `http-request return`), straight and through the listener and HAProxy (`mode tcp`), in
//!    alternating rounds; the figures are requests (= connections) per second, latency p50/p99
//!    and CPU per connection of each forwarder. `--wrk-only` runs this part alone.
//!
//! Everything is on 127.0.0.1, every loop is bounded in count and time, and every child process
//! is killed when the bench ends. Results and method are written up in `docs/BENCHMARKS.md`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tunnelkeeper::daemon::Daemon;

use crate::common::{which, Echo, Stats, TempDir};
use tunnelkeeper_test_support::try_free_port;

/// The goal from issue 4: the listener keeps at least this share of direct loopback throughput.
const THROUGHPUT_GOAL: f64 = 0.90;
/// How long the daemon may take to bind, probe and elect both services' tunnels.
const STARTUP_LIMIT: Duration = Duration::from_secs(20);
/// How long a child server (iperf3, socat, haproxy) may take to start listening.
const LISTEN_LIMIT: Duration = Duration::from_secs(10);
/// Per-step limit of one client connection (connect, and the 1-byte read).
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
/// Clients of the concurrent new-connection variant.
const CONCURRENT_CLIENTS: usize = 8;
/// Unmeasured connections per route before the new-connection figures, to warm caches.
const WARMUP_CONNECTIONS: usize = 50;
/// Attempts per iperf3 run: a probe's bare connect can race the start of a test and fail it.
const IPERF_ATTEMPTS: u32 = 3;
/// Idle window for the in-process CPU baseline (probes, timers, the idle echo thread).
const BASELINE_WINDOW: Duration = Duration::from_secs(3);
/// wrk's load: threads and connections (`-t2 -c8`, the figure issue 17 set the goal with).
const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 8;
/// The routes of part 4 (socat's fork per connection is two orders of magnitude off here).
const WRK_ROUTES: [Route; 3] = [Route::Direct, Route::Listener, Route::Haproxy];

/// What one run does; `--quick` shrinks every count.
#[derive(Debug, Clone, Copy)]
struct Settings {
    quick: bool,
    /// `iperf3 -t`, seconds.
    seconds: u32,
    /// Throughput rounds (the figure is their median).
    rounds: u32,
    /// Sequential connections per route.
    sequential: usize,
    /// Connections per client in the concurrent variant.
    per_client: usize,
    /// Time limit of each new-connection measurement.
    connect_phase_limit: Duration,
    /// Bytes of each CPU-per-GB transfer (`iperf3 -n`).
    bulk_bytes: u64,
    /// Transfers per forwarder in the CPU phase (the figure is their median).
    bulk_reps: u32,
    /// Time limit of each bulk transfer.
    bulk_limit: Duration,
    /// `wrk -d`, seconds.
    wrk_seconds: u32,
    /// Rounds of part 4 (each visits every route of [`WRK_ROUTES`]; the figures are medians).
    wrk_rounds: u32,
}

impl Settings {
    fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                seconds: 1,
                rounds: 1,
                sequential: 200,
                per_client: 50,
                connect_phase_limit: Duration::from_secs(20),
                bulk_bytes: 256 << 20,
                bulk_reps: 1,
                bulk_limit: Duration::from_secs(30),
                wrk_seconds: 2,
                wrk_rounds: 1,
            }
        } else {
            Settings {
                quick,
                seconds: 5,
                rounds: 3,
                sequential: 2000,
                per_client: 1000,
                connect_phase_limit: Duration::from_secs(60),
                bulk_bytes: 4 << 30,
                bulk_reps: 3,
                bulk_limit: Duration::from_secs(60),
                wrk_seconds: 5,
                wrk_rounds: 5,
            }
        }
    }
}

/// The ways to reach a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Straight to the server.
    Direct,
    /// tunnelkeeper's failover listener (in this process).
    Listener,
    /// `socat`, one forked process per connection.
    Socat,
    /// `haproxy` in `mode tcp`.
    Haproxy,
}

/// Every route, in the order of the tables.
const ROUTES: [Route; 4] = [Route::Direct, Route::Listener, Route::Socat, Route::Haproxy];
/// The forwarders (the routes that can have a CPU cost of their own).
const FORWARDERS: [Route; 3] = [Route::Listener, Route::Socat, Route::Haproxy];

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Listener => "tunnelkeeper listener",
            Route::Socat => "socat (fork)",
            Route::Haproxy => "haproxy (mode tcp)",
        }
    }
}

/// The addresses of one server by every route.
#[derive(Debug, Clone, Copy)]
struct Targets {
    direct: SocketAddr,
    listener: SocketAddr,
    socat: SocketAddr,
    haproxy: SocketAddr,
}

impl Targets {
    fn get(&self, route: Route) -> SocketAddr {
        match route {
            Route::Direct => self.direct,
            Route::Listener => self.listener,
            Route::Socat => self.socat,
            Route::Haproxy => self.haproxy,
        }
    }
}

/// The forwarders of the iperf3 server whose CPU time part 3 reads.
struct Forwarders<'a> {
    /// The in-process daemon (its listener's byte counters).
    daemon: &'a Daemon,
    socat_iperf: &'a Child,
    haproxy_iperf: &'a Child,
}

/// Runs the four parts (or only part 4 with `wrk_only`) and prints their figures and a
/// summary.
pub(crate) async fn listener(quick: bool, wrk_only: bool) -> anyhow::Result<()> {
    let settings = Settings::new(quick);
    for (program, package) in [
        ("iperf3", "iperf3"),
        ("socat", "socat"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
    ] {
        which(program)
            .with_context(|| format!("`{program}` not found on PATH: apt-get install {package}"))?;
    }
    let dir = TempDir::new("listener")?;
    let ticks = clock_ticks();

    println!(
        "tunnelkeeper listener bench — loopback only{}",
        if quick {
            " (--quick: smoke counts)"
        } else {
            ""
        }
    );
    println!("  {}", tool_versions().await);
    println!(
        "  cores: {}, load average at start: {}",
        cores(),
        load_average()
    );

    // The servers.
    let iperf_port = try_free_port().context("finding a free loopback port")?;
    let iperf_log = dir.0.join("iperf3-server.log");
    let iperf_errors = dir.0.join("iperf3-server.err");
    let mut iperf_server = spawn(
        Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()])
            .arg("--logfile")
            .arg(&iperf_log)
            .arg("--forceflush")
            // Each probe is a bare connect that iperf3 reports as a failed test, on stderr.
            .stderr(log_file(&iperf_errors)?),
        "iperf3 -s",
    )?;
    let iperf_addr = SocketAddr::from(([127, 0, 0, 1], iperf_port));
    wait_listening(&mut iperf_server, iperf_port, "iperf3 -s").await?;
    let echo = EchoThread::start().await?;
    let (http_server, http_addr) = start_http_backend(&dir.0).await?;

    // The forwarders.
    let text = config_text(&dir.0, iperf_addr, echo.addr, http_addr);
    let config = tunnelkeeper::config::parse(&text, &dir.0.join("bench.yaml"))
        .map_err(|e| anyhow::anyhow!("the generated bench config is invalid:\n{e}"))?;
    let daemon = Daemon::start(config).await.context("starting the daemon")?;
    let servers = Servers {
        iperf: iperf_addr,
        echo: echo.addr,
        http: http_addr,
    };
    // Bounded as a whole too, and the daemon is shut down on every path; the other children
    // are killed when dropped (`kill_on_drop`).
    let report = tokio::time::timeout(
        Duration::from_secs(3600),
        measure(&settings, &dir.0, &daemon, servers, ticks, wrk_only),
    )
    .await;
    daemon.shutdown().await;
    drop(iperf_server);
    drop(http_server);
    drop(echo);
    let report =
        report.map_err(|_| anyhow::anyhow!("the bench did not finish within an hour"))??;
    print_summary(&settings, &report);
    println!("\n  load average at end: {}", load_average());
    Ok(())
}

/// Where the two servers listen.
#[derive(Debug, Clone, Copy)]
struct Servers {
    iperf: SocketAddr,
    echo: SocketAddr,
    /// The HTTP backend of part 4.
    http: SocketAddr,
}

/// Waits for the daemon, starts socat and haproxy for the servers, and runs the parts.
async fn measure(
    settings: &Settings,
    dir: &Path,
    daemon: &Daemon,
    servers: Servers,
    ticks: u64,
    wrk_only: bool,
) -> anyhow::Result<Report> {
    let (listen_iperf, listen_echo, listen_http) = wait_elected(daemon).await?;
    let (haproxy_http, haproxy_http_addr) = start_haproxy(dir, "http", servers.http).await?;
    let http = Targets {
        direct: servers.http,
        listener: listen_http,
        // Not measured in part 4.
        socat: servers.http,
        haproxy: haproxy_http_addr,
    };
    println!(
        "  HTTP backend {}; via: listener {listen_http}, haproxy {haproxy_http_addr}",
        servers.http
    );
    if wrk_only {
        let wrk = wrk_rate(settings, &http, &haproxy_http, ticks).await?;
        return Ok(Report {
            throughput: Vec::new(),
            sequential: Vec::new(),
            concurrent: Vec::new(),
            cpu: Vec::new(),
            wrk,
        });
    }
    let (socat_iperf, socat_iperf_addr) = start_socat(dir, "iperf", servers.iperf).await?;
    let (_socat_echo, socat_echo_addr) = start_socat(dir, "echo", servers.echo).await?;
    let (haproxy_iperf, haproxy_iperf_addr) = start_haproxy(dir, "iperf", servers.iperf).await?;
    let (_haproxy_echo, haproxy_echo_addr) = start_haproxy(dir, "echo", servers.echo).await?;
    let iperf = Targets {
        direct: servers.iperf,
        listener: listen_iperf,
        socat: socat_iperf_addr,
        haproxy: haproxy_iperf_addr,
    };
    let echo = Targets {
        direct: servers.echo,
        listener: listen_echo,
        socat: socat_echo_addr,
        haproxy: haproxy_echo_addr,
    };
    println!(
        "  iperf3 server {}; echo server {}",
        servers.iperf, servers.echo
    );
    println!(
        "  iperf3 via: listener {listen_iperf}, socat {socat_iperf_addr}, haproxy \
         {haproxy_iperf_addr}; echo via: listener {listen_echo}, socat {socat_echo_addr}, \
         haproxy {haproxy_echo_addr}"
    );
    let forwarders = Forwarders {
        daemon,
        socat_iperf: &socat_iperf,
        haproxy_iperf: &haproxy_iperf,
    };
    let throughput = throughput(settings, &iperf).await?;
    let (sequential, concurrent) = connections(settings, &echo).await?;
    let cpu = cpu_per_gb(settings, &iperf, &forwarders, ticks).await?;
    let wrk = wrk_rate(settings, &http, &haproxy_http, ticks).await?;
    Ok(Report {
        throughput,
        sequential,
        concurrent,
        cpu,
        wrk,
    })
}

/// Everything measured.
struct Report {
    /// Median Gbit/s per (streams, route).
    throughput: Vec<(u32, Route, f64)>,
    /// Sequential new-connection results per route.
    sequential: Vec<(Route, ConnectResult)>,
    /// Concurrent new-connection results per route.
    concurrent: Vec<(Route, ConnectResult)>,
    /// Median CPU seconds per GB per forwarder, with the median Gbit/s of those transfers.
    cpu: Vec<(Route, f64, f64)>,
    /// Every wrk run of part 4, in the order run.
    wrk: Vec<(Route, WrkRun)>,
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput

/// Part 1: rounds of iperf3 runs over every route, 1 and 8 streams; returns the medians.
async fn throughput(
    settings: &Settings,
    iperf: &Targets,
) -> anyhow::Result<Vec<(u32, Route, f64)>> {
    println!(
        "\n== throughput: iperf3 -t {} -P {{1,8}}, {} round(s), each visiting every route in a \
         rotated order; load average {}",
        settings.seconds,
        settings.rounds,
        load_average()
    );
    let mut samples: Vec<(u32, Route, f64)> = Vec::new();
    for round in 0..settings.rounds {
        for streams in [1u32, 8] {
            let mut order = ROUTES;
            // Rotating keeps any drift (other load coming and going) from always hitting the
            // same route at the same position.
            order.rotate_left(round as usize % ROUTES.len());
            for route in order {
                let args = [
                    "-t".to_string(),
                    settings.seconds.to_string(),
                    "-P".to_string(),
                    streams.to_string(),
                ];
                let limit = Duration::from_secs(u64::from(settings.seconds) + 30);
                let run = iperf_client(iperf.get(route), &args, limit)
                    .await
                    .with_context(|| format!("iperf3 -P {streams} via {}", route.label()))?;
                println!(
                    "   round {} -P {streams} {:<22} {:>7.2} Gbit/s  (iperf3 CPU: client {:.0}%, \
                     server {:.0}%){}",
                    round + 1,
                    route.label(),
                    run.gbps(),
                    run.host_cpu,
                    run.remote_cpu,
                    retried(run.attempts)
                );
                samples.push((streams, route, run.gbps()));
            }
        }
    }
    let mut medians = Vec::new();
    for streams in [1u32, 8] {
        for route in ROUTES {
            let values = samples
                .iter()
                .filter(|(s, r, _)| *s == streams && *r == route)
                .map(|(_, _, g)| *g);
            medians.push((streams, route, median(values)));
        }
    }
    Ok(medians)
}

/// One iperf3 client run.
struct IperfRun {
    /// Bytes the receiver counted.
    bytes: f64,
    /// The receiver's bits per second.
    bits_per_second: f64,
    /// The receiver's measured duration.
    seconds: f64,
    /// iperf3's own CPU figures (percent of one CPU, client and server).
    host_cpu: f64,
    remote_cpu: f64,
    /// Attempts it took.
    attempts: u32,
}

impl IperfRun {
    fn gbps(&self) -> f64 {
        self.bits_per_second / 1e9
    }
}

/// Runs `iperf3 -c ADDR -J ARGS` (retrying a failed start); parses the receiver's totals.
async fn iperf_client(
    addr: SocketAddr,
    args: &[String],
    limit: Duration,
) -> anyhow::Result<IperfRun> {
    let mut last = String::new();
    for attempt in 1..=IPERF_ATTEMPTS {
        let mut command = Command::new("iperf3");
        command
            .args([
                "-c",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
                "-J",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(limit, command.output()).await {
            Ok(output) => output.context("running iperf3 -c")?,
            Err(_) => bail!("iperf3 -c did not finish within {}s", limit.as_secs()),
        };
        match parse_iperf(&output.stdout) {
            Ok(mut run) if output.status.success() => {
                run.attempts = attempt;
                return Ok(run);
            }
            Ok(_) => last = format!("iperf3 exited with {}", output.status),
            Err(e) => last = format!("{e:#}"),
        }
        // The server needs a moment between tests, and a probe's bare connect landing while a
        // test sets up its streams fails that test: both are worth another try.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("iperf3 failed {IPERF_ATTEMPTS} times; last: {last}")
}

/// The receiver's totals from iperf3's JSON (`end.sum_received`), or its `error`.
fn parse_iperf(stdout: &[u8]) -> anyhow::Result<IperfRun> {
    let json: serde_json::Value =
        serde_json::from_slice(stdout).context("iperf3 printed no JSON")?;
    if let Some(error) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {error}");
    }
    let end = json.get("end").context("iperf3's JSON has no `end`")?;
    let received = end
        .get("sum_received")
        .context("iperf3's JSON has no `end.sum_received`")?;
    let number = |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_f64());
    let cpu = end.get("cpu_utilization_percent");
    Ok(IperfRun {
        bytes: number(received, "bytes").context("no received byte count")?,
        bits_per_second: number(received, "bits_per_second").context("no receiver rate")?,
        seconds: number(received, "seconds").unwrap_or(f64::NAN),
        host_cpu: cpu
            .and_then(|c| number(c, "host_total"))
            .unwrap_or(f64::NAN),
        remote_cpu: cpu
            .and_then(|c| number(c, "remote_total"))
            .unwrap_or(f64::NAN),
        attempts: 1,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. New connections

/// What one new-connection measurement produced.
struct ConnectResult {
    /// Latency of each completed connection, microseconds.
    latencies_us: Vec<f64>,
    /// Connections that failed (error or timeout).
    failures: usize,
    /// Wall time of the whole measurement.
    wall: Duration,
    /// Stopped by the time limit before the count.
    time_bound: bool,
}

impl ConnectResult {
    fn rate(&self) -> f64 {
        self.latencies_us.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Part 2: sequential, then concurrent, connect–echo–close loops over every route.
async fn connections(
    settings: &Settings,
    echo: &Targets,
) -> anyhow::Result<(Vec<(Route, ConnectResult)>, Vec<(Route, ConnectResult)>)> {
    println!(
        "\n== new connections: connect, write 1 byte, read it back, close; {} in a row, then {} \
         clients × {}; load average {}",
        settings.sequential,
        CONCURRENT_CLIENTS,
        settings.per_client,
        load_average()
    );
    let mut sequential = Vec::new();
    for route in ROUTES {
        let addr = echo.get(route);
        let limit = settings.connect_phase_limit;
        let count = settings.sequential;
        let result = tokio::task::spawn_blocking(move || {
            // Warm-up first: the first connections through a forwarder pay for lazy set-up
            // (socat's first fork, allocator growth) that a steady stream does not.
            let _ = connect_loop(addr, WARMUP_CONNECTIONS, Instant::now() + limit);
            let started = Instant::now();
            let (latencies_us, failures, time_bound) = connect_loop(addr, count, started + limit);
            ConnectResult {
                latencies_us,
                failures,
                wall: started.elapsed(),
                time_bound,
            }
        })
        .await
        .context("the sequential client thread panicked")?;
        print_connect("sequential", route, &result);
        sequential.push((route, result));
    }
    let mut concurrent = Vec::new();
    for route in ROUTES {
        let addr = echo.get(route);
        let limit = settings.connect_phase_limit;
        let per_client = settings.per_client;
        let result = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let deadline = started + limit;
            let parts: Vec<(Vec<f64>, usize, bool)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..CONCURRENT_CLIENTS)
                    .map(|_| scope.spawn(move || connect_loop(addr, per_client, deadline)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or((Vec::new(), per_client, true)))
                    .collect()
            });
            let wall = started.elapsed();
            let mut result = ConnectResult {
                latencies_us: Vec::new(),
                failures: 0,
                wall,
                time_bound: false,
            };
            for (latencies, failures, time_bound) in parts {
                result.latencies_us.extend(latencies);
                result.failures += failures;
                result.time_bound |= time_bound;
            }
            result
        })
        .await
        .context("the concurrent client threads panicked")?;
        print_connect(&format!("{CONCURRENT_CLIENTS} clients"), route, &result);
        concurrent.push((route, result));
    }
    Ok((sequential, concurrent))
}

/// Up to `count` connect–echo–close exchanges in a row, until `deadline`; returns the latencies
/// (µs) of those that worked, the number that failed, and whether the deadline cut it short.
fn connect_loop(addr: SocketAddr, count: usize, deadline: Instant) -> (Vec<f64>, usize, bool) {
    let mut latencies = Vec::with_capacity(count);
    let mut failures = 0;
    for _ in 0..count {
        if Instant::now() >= deadline {
            return (latencies, failures, true);
        }
        let started = Instant::now();
        match one_exchange(addr) {
            Ok(()) => latencies.push(started.elapsed().as_secs_f64() * 1e6),
            Err(_) => failures += 1,
        }
    }
    (latencies, failures, false)
}

/// Connect, write one byte, read it back, close (blocking, each step bounded).
fn one_exchange(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_LIMIT)?;
    stream.set_read_timeout(Some(CONNECT_LIMIT))?;
    stream.write_all(b"x")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    if byte != *b"x" {
        return Err(std::io::Error::other("wrong echo"));
    }
    drop(stream);
    Ok(())
}

fn print_connect(what: &str, route: Route, r: &ConnectResult) {
    let s = Stats::of(r.latencies_us.iter().copied());
    println!(
        "   {what:<11} {:<22} n {:>5}  p50 {:>7.1}µs  p99 {:>7.1}µs  max {:>8.1}µs  {:>7.0} conn/s  \
         failures {}{}",
        route.label(),
        s.n,
        s.p50,
        s.p99,
        s.max,
        r.rate(),
        r.failures,
        if r.time_bound { "  (cut by the time limit)" } else { "" }
    );
}

// ---------------------------------------------------------------------------------------------
// 3. CPU per GB

/// Part 3: a fixed bulk transfer through each forwarder while its CPU time is read.
async fn cpu_per_gb(
    settings: &Settings,
    iperf: &Targets,
    forwarders: &Forwarders<'_>,
    ticks: u64,
) -> anyhow::Result<Vec<(Route, f64, f64)>> {
    println!(
        "\n== CPU per GB: iperf3 -n {} MiB -P 1 through each forwarder, {} time(s) each; load \
         average {}",
        settings.bulk_bytes >> 20,
        settings.bulk_reps,
        load_average()
    );
    // The listener runs in this process, which also does other (small) things: probes, timers,
    // the idle echo thread, waiting for iperf3. Their rate is measured while nothing is
    // forwarded and subtracted.
    let before = cpu_seconds(None, ticks).context("reading /proc/self/stat")?;
    tokio::time::sleep(BASELINE_WINDOW).await;
    let after = cpu_seconds(None, ticks).context("reading /proc/self/stat")?;
    let baseline_rate = (after - before) / BASELINE_WINDOW.as_secs_f64();
    println!(
        "   in-process idle baseline: {:.2} ms CPU per second (over {}s)",
        baseline_rate * 1000.0,
        BASELINE_WINDOW.as_secs()
    );
    let args = [
        "-n".to_string(),
        settings.bulk_bytes.to_string(),
        "-P".to_string(),
        "1".to_string(),
    ];
    let socat_pid = forwarders.socat_iperf.id().context("socat has exited")?;
    let haproxy_pid = forwarders
        .haproxy_iperf
        .id()
        .context("haproxy has exited")?;
    let mut samples: Vec<(Route, f64, f64)> = Vec::new();
    for rep in 0..settings.bulk_reps {
        for route in FORWARDERS {
            let pid = match route {
                Route::Listener => None,
                Route::Socat => Some(socat_pid),
                _ => Some(haproxy_pid),
            };
            // socat's per-connection children count once reaped (cutime/cstime): none may be
            // left over from an earlier connection when the "before" figure is read.
            if route == Route::Socat {
                wait_no_children(socat_pid).await;
            }
            let counted_before = listener_bytes(forwarders.daemon);
            let cpu_before = cpu_seconds(pid, ticks).context("reading the forwarder's CPU time")?;
            let wall = Instant::now();
            let run = iperf_client(iperf.get(route), &args, settings.bulk_limit)
                .await
                .with_context(|| format!("bulk transfer via {}", route.label()))?;
            let elapsed = wall.elapsed();
            if route == Route::Socat {
                wait_no_children(socat_pid).await;
            }
            let cpu_after = cpu_seconds(pid, ticks).context("reading the forwarder's CPU time")?;
            let mut cpu = cpu_after - cpu_before;
            if route == Route::Listener {
                cpu -= baseline_rate * elapsed.as_secs_f64();
            }
            let gb = run.bytes / 1e9;
            let per_gb = cpu / gb;
            let counted = listener_bytes(forwarders.daemon) - counted_before;
            println!(
                "   rep {} {:<22} {:.2} GB in {:.2}s ({:.2} Gbit/s): CPU {:.3}s → {:.3} s/GB{}{}",
                rep + 1,
                route.label(),
                gb,
                run.seconds,
                run.gbps(),
                cpu,
                per_gb,
                if route == Route::Listener {
                    format!("  (listener counted {:.2} GB)", counted as f64 / 1e9)
                } else {
                    String::new()
                },
                retried(run.attempts)
            );
            samples.push((route, per_gb, run.gbps()));
        }
    }
    Ok(FORWARDERS
        .iter()
        .map(|&route| {
            let mine: Vec<&(Route, f64, f64)> = samples.iter().filter(|s| s.0 == route).collect();
            (
                route,
                median(mine.iter().map(|s| s.1)),
                median(mine.iter().map(|s| s.2)),
            )
        })
        .collect())
}

/// Bytes the `iperf` service's listener has moved (both ways), from the status document.
fn listener_bytes(daemon: &Daemon) -> u64 {
    daemon
        .status()
        .services
        .iter()
        .find(|s| s.name == "iperf")
        .and_then(|s| s.listener.as_ref())
        .map(|l| l.bytes_to_service + l.bytes_to_client)
        .unwrap_or(0)
}

/// CPU seconds used by `pid` including the children it has reaped (socat's per-connection
/// forks), or by this process alone: its reaped children are the bench's own load generators
/// (the iperf3 and wrk clients), whose CPU time is not the listener's.
fn cpu_seconds(pid: Option<u32>, ticks_per_second: u64) -> anyhow::Result<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // `pid (comm) state ppid …`: utime, stime, cutime, cstime are fields 14–17, i.e. the 12th to
    // 15th after the closing parenthesis (comm may contain spaces and parentheses).
    let (_, rest) = stat
        .rsplit_once(')')
        .with_context(|| format!("unexpected {path}"))?;
    let fields = if pid.is_some() { 4 } else { 2 };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(fields)
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(ticks as f64 / ticks_per_second.max(1) as f64)
}

/// Waits (up to 3s) until `pid` has no child processes, so their CPU time has been reaped
/// into its `cutime`/`cstime`.
async fn wait_no_children(pid: u32) {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match std::fs::read_to_string(&path) {
            Ok(children) if !children.trim().is_empty() => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The unit of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on every common Linux).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP connection rate (wrk)

/// One `wrk` run.
#[derive(Debug, Clone, Copy)]
struct WrkRun {
    /// Requests per second; with `Connection: close`, connections per second.
    rate: f64,
    /// Latency percentiles, microseconds.
    p50_us: f64,
    p99_us: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx answers.
    errors: u64,
    /// The forwarder's CPU time per connection, microseconds (NaN for `direct`).
    cpu_us_per_conn: f64,
}

/// Part 4: rounds of `wrk -t2 -c8 -H "Connection: close" --latency` over direct, the listener
/// and HAProxy, in an order rotated per round, while the forwarder's CPU time is read.
async fn wrk_rate(
    settings: &Settings,
    http: &Targets,
    haproxy_http: &Child,
    ticks: u64,
) -> anyhow::Result<Vec<(Route, WrkRun)>> {
    println!(
        "\n== HTTP connection rate: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{}s -H \"Connection: \
         close\" --latency, {} round(s) over {} routes in a rotated order; load average {}",
        settings.wrk_seconds,
        settings.wrk_rounds,
        WRK_ROUTES.len(),
        load_average()
    );
    let before = cpu_seconds(None, ticks).context("reading /proc/self/stat")?;
    tokio::time::sleep(BASELINE_WINDOW).await;
    let after = cpu_seconds(None, ticks).context("reading /proc/self/stat")?;
    let baseline_rate = (after - before) / BASELINE_WINDOW.as_secs_f64();
    let haproxy_pid = haproxy_http.id().context("haproxy has exited")?;
    let mut runs = Vec::new();
    for round in 0..settings.wrk_rounds {
        let mut order = WRK_ROUTES;
        order.rotate_left(round as usize % WRK_ROUTES.len());
        for route in order {
            let pid = match route {
                Route::Haproxy => Some(haproxy_pid),
                _ => None,
            };
            let cpu_before = cpu_seconds(pid, ticks)?;
            let wall = Instant::now();
            let mut run = wrk(http.get(route), settings.wrk_seconds)
                .await
                .with_context(|| format!("wrk via {}", route.label()))?;
            let elapsed = wall.elapsed().as_secs_f64();
            let mut cpu = cpu_seconds(pid, ticks)? - cpu_before;
            if route == Route::Listener {
                cpu -= baseline_rate * elapsed;
            }
            let connections = run.rate * f64::from(settings.wrk_seconds);
            run.cpu_us_per_conn = if route == Route::Direct || connections <= 0.0 {
                f64::NAN
            } else {
                cpu * 1e6 / connections
            };
            println!(
                "   round {} {:<22} {:>8.0} conn/s  p50 {:>7.1}µs  p99 {:>7.1}µs  CPU {:>5.1}µs/conn  \
                 errors {}",
                round + 1,
                route.label(),
                run.rate,
                run.p50_us,
                run.p99_us,
                run.cpu_us_per_conn,
                run.errors
            );
            runs.push((route, run));
        }
    }
    Ok(runs)
}

/// Runs wrk against `http://ADDR/` for `seconds`; parses its rate and latency distribution.
async fn wrk(addr: SocketAddr, seconds: u32) -> anyhow::Result<WrkRun> {
    let mut command = Command::new("wrk");
    command
        .args([
            format!("-t{WRK_THREADS}"),
            format!("-c{WRK_CONNECTIONS}"),
            format!("-d{seconds}s"),
            "-H".to_string(),
            "Connection: close".to_string(),
            "--latency".to_string(),
            format!("http://{addr}/"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .map_err(|_| anyhow::anyhow!("wrk did not finish within {}s", limit.as_secs()))?
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk exited with {}: {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text)
}

/// The figures of wrk's `--latency` report.
fn parse_wrk(text: &str) -> anyhow::Result<WrkRun> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::trim))
    };
    let rate: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let latency = |p: &str| {
        field(p)
            .and_then(wrk_duration_us)
            .with_context(|| format!("no {p} latency in wrk's output:\n{text}"))
    };
    // `Socket errors: connect 0, read 0, write 0, timeout 0` and `Non-2xx or 3xx responses: N`.
    let mut errors = 0;
    if let Some(rest) = field("Socket errors:") {
        errors += rest
            .split(',')
            .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(n) = field("Non-2xx or 3xx responses:").and_then(|v| v.parse::<u64>().ok()) {
        errors += n;
    }
    Ok(WrkRun {
        rate,
        p50_us: latency("50%")?,
        p99_us: latency("99%")?,
        errors,
        cpu_us_per_conn: f64::NAN,
    })
}

/// `412.00us`, `1.20ms`, `2.00s` → microseconds.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(number * scale)
}

// ---------------------------------------------------------------------------------------------
// Set-up

/// The daemon configuration: three services, each a listener on a free port and one `direct`
/// tunnel; probes dial only, every second.
fn config_text(dir: &Path, iperf: SocketAddr, echo: SocketAddr, http: SocketAddr) -> String {
    // JSON string literals are valid YAML double-quoted scalars: paths need no hand-escaping.
    let quote = |p: &Path| {
        serde_json::to_string(&p.display().to_string()).unwrap_or_else(|_| "\"\"".into())
    };
    format!(
        "version: 1
daemon:
  control_socket: {socket}
  state_dir: {state}
  shutdown_grace: 2s
defaults:
  # No send/expect: iperf3 is not an echo service, so a probe is a dial through the tunnel.
  probe: {{ interval: 1s, timeout: 1s, rise: 1, fall: 3 }}
services:
  - name: iperf
    listen: \"127.0.0.1:0\"
    tunnels:
      - {{ name: lan, provider: direct, address: \"{iperf}\" }}
  - name: echo
    listen: \"127.0.0.1:0\"
    tunnels:
      - {{ name: lan, provider: direct, address: \"{echo}\" }}
  - name: http
    listen: \"127.0.0.1:0\"
    tunnels:
      - {{ name: lan, provider: direct, address: \"{http}\" }}
",
        socket = quote(&dir.join("control.sock")),
        state = quote(&dir.join("state")),
    )
}

/// Polls the status until every service has elected its tunnel; returns the listeners'
/// addresses (`iperf`, `echo`, `http`).
async fn wait_elected(daemon: &Daemon) -> anyhow::Result<(SocketAddr, SocketAddr, SocketAddr)> {
    let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
    loop {
        let status = daemon.status();
        let ready = |name: &str| -> Option<SocketAddr> {
            let service = status.services.iter().find(|s| s.name == name)?;
            service.primary.as_ref()?;
            service.listener.as_ref()?.address.parse().ok()
        };
        if let (Some(iperf), Some(echo), Some(http)) =
            (ready("iperf"), ready("echo"), ready("http"))
        {
            return Ok((iperf, echo, http));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no primary elected within {}s: {:?}",
                STARTUP_LIMIT.as_secs(),
                status
                    .services
                    .iter()
                    .map(|s| (s.name.clone(), s.primary.clone()))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `socat TCP-LISTEN:P,fork,reuseaddr TCP:TARGET` on a free port.
async fn start_socat(
    dir: &Path,
    name: &str,
    target: SocketAddr,
) -> anyhow::Result<(Child, SocketAddr)> {
    let port = try_free_port().context("finding a free loopback port")?;
    let mut child = spawn(
        Command::new("socat")
            .args([
                format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
                format!("TCP:{target}"),
            ])
            // iperf3 resets its connections at the end of a test, which socat logs as errors.
            .stderr(log_file(&dir.join(format!("socat-{name}.log")))?),
        "socat",
    )?;
    wait_listening(&mut child, port, "socat").await?;
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Starts `haproxy -f CFG -db` in plain TCP mode (one frontend, one backend) on a free port.
async fn start_haproxy(
    dir: &Path,
    name: &str,
    target: SocketAddr,
) -> anyhow::Result<(Child, SocketAddr)> {
    let port = try_free_port().context("finding a free loopback port")?;
    // Defaults everywhere but the required timeouts: no splice options, default buffers and
    // thread count (one per CPU), as a plain `mode tcp` deployment would have.
    let text = format!(
        "global
    # Far above what the bench opens, and under the open-files limit (haproxy refuses to start
    # when it cannot raise the limit to about twice this).
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server target {target}
"
    );
    run_haproxy(dir, &format!("haproxy-{name}"), &text, port).await
}

/// Runs `haproxy -f DIR/FILE.cfg -db` with config `text` until it listens on `port`.
async fn run_haproxy(
    dir: &Path,
    file: &str,
    text: &str,
    port: u16,
) -> anyhow::Result<(Child, SocketAddr)> {
    let cfg = dir.join(format!("{file}.cfg"));
    std::fs::write(&cfg, text).with_context(|| format!("writing {}", cfg.display()))?;
    let log = dir.join(format!("{file}.log"));
    let mut child = spawn(
        Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stderr(log_file(&log)?),
        "haproxy",
    )?;
    if let Err(e) = wait_listening(&mut child, port, "haproxy").await {
        // The temporary directory goes away with the bench: show the log now.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(e.context(format!("haproxy's output:\n{}", text.trim_end())));
    }
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Starts the HTTP backend of part 4: a one-thread `haproxy` in `mode http` that answers every
/// request itself (`http-request return`), so the backend costs little and the same for every
/// route. Returns it and its address.
async fn start_http_backend(dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let port = try_free_port().context("finding a free loopback port")?;
    let text = format!(
        "global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend backend
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok
"
    );
    run_haproxy(dir, "haproxy-http-backend", &text, port).await
}

/// A new file for a child's output.
fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Spawns a server child: no stdin, output discarded unless set, killed when dropped.
fn spawn(command: &mut Command, what: &str) -> anyhow::Result<Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command.spawn().with_context(|| format!("starting {what}"))
}

/// Waits until something listens on `127.0.0.1:port`, from `/proc/net/tcp` — without
/// connecting, which iperf3 would take for a (broken) test.
async fn wait_listening(child: &mut Child, port: u16, what: &str) -> anyhow::Result<()> {
    let wanted = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + LISTEN_LIMIT;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?;
        // `sl local_address rem_address st …`; st 0A is LISTEN.
        let listening = table.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(wanted.as_str()) && fields.nth(1) == Some("0A")
        });
        if listening {
            return Ok(());
        }
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("checking on {what}"))?
        {
            bail!("{what} exited with {status} before listening on 127.0.0.1:{port}");
        }
        if Instant::now() >= deadline {
            bail!(
                "{what} is not listening on 127.0.0.1:{port} after {}s",
                LISTEN_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The echo server on a thread of its own with a single-threaded runtime, so that serving the
/// clients does not take the daemon's workers (as a separate service process would not).
struct EchoThread {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoThread {
    async fn start() -> anyhow::Result<EchoThread> {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<anyhow::Result<SocketAddr>>();
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
                        let _ =
                            addr_tx
                                .send(Err(anyhow::Error::new(e)
                                    .context("starting the echo server's runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match Echo::start().await {
                        Ok(echo) => {
                            let _ = addr_tx.send(Ok(echo.addr));
                            let _ = stop_rx.await;
                            drop(echo);
                        }
                        Err(e) => {
                            let _ = addr_tx.send(Err(e));
                        }
                    }
                });
            })
            .context("spawning the echo server's thread")?;
        let addr = addr_rx
            .await
            .context("the echo server's thread ended early")??;
        Ok(EchoThread {
            addr,
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

// ---------------------------------------------------------------------------------------------
// Output

fn print_summary(settings: &Settings, report: &Report) {
    println!(
        "\n== summary{}",
        if settings.quick {
            " (--quick: smoke counts, not figures)"
        } else {
            ""
        }
    );
    if !report.throughput.is_empty() {
        print_data_plane(settings, report);
    }
    print_wrk(settings, &report.wrk);
}

/// The summary of parts 1 to 3.
fn print_data_plane(settings: &Settings, report: &Report) {
    println!(
        "   throughput (iperf3 -t {}, median of {} round(s), Gbit/s; ratio vs direct)",
        settings.seconds, settings.rounds
    );
    for streams in [1u32, 8] {
        let get = |route: Route| {
            report
                .throughput
                .iter()
                .find(|(s, r, _)| *s == streams && *r == route)
                .map(|t| t.2)
                .unwrap_or(f64::NAN)
        };
        let direct = get(Route::Direct);
        let line: Vec<String> = ROUTES
            .iter()
            .map(|&r| format!("{} {:.2} ({:.3})", r.label(), get(r), get(r) / direct))
            .collect();
        println!("   -P {streams}: {}", line.join("  "));
        let listener = get(Route::Listener);
        println!(
            "        listener ≥ {THROUGHPUT_GOAL:.2} × direct: {}  ahead of socat: {}  ahead of \
             haproxy: {}",
            pass(listener >= THROUGHPUT_GOAL * direct),
            pass(listener > get(Route::Socat)),
            pass(listener > get(Route::Haproxy)),
        );
    }
    for (label, results) in [
        ("sequential", &report.sequential),
        ("concurrent", &report.concurrent),
    ] {
        println!("   new connections, {label} (µs; added = route − direct, p50 and p99 each)");
        let direct = results
            .iter()
            .find(|(r, _)| *r == Route::Direct)
            .map(|(_, c)| Stats::of(c.latencies_us.iter().copied()));
        for (route, result) in results {
            let s = Stats::of(result.latencies_us.iter().copied());
            let (added50, added99) = direct
                .as_ref()
                .map(|d| (s.p50 - d.p50, s.p99 - d.p99))
                .unwrap_or((f64::NAN, f64::NAN));
            println!(
                "     {:<22} p50 {:>7.1}  p99 {:>7.1}  added p50 {:>+7.1}  added p99 {:>+7.1}  \
                 {:>7.0} conn/s  failures {}",
                route.label(),
                s.p50,
                s.p99,
                added50,
                added99,
                result.rate(),
                result.failures
            );
        }
    }
    println!(
        "   CPU per GB forwarded (iperf3 -n {} MiB -P 1, median of {})",
        settings.bulk_bytes >> 20,
        settings.bulk_reps
    );
    let haproxy_per_gb = report
        .cpu
        .iter()
        .find(|c| c.0 == Route::Haproxy)
        .map_or(f64::NAN, |c| c.1);
    for (route, per_gb, gbps) in &report.cpu {
        println!(
            "     {:<22} {:.3} CPU-s/GB ({:.2} × haproxy)  (at {:.2} Gbit/s)",
            route.label(),
            per_gb,
            per_gb / haproxy_per_gb,
            gbps
        );
    }
}

/// The summary of part 4: medians per route, and the listener against HAProxy as the median of
/// the per-round ratios (each round runs both within seconds, so drift in the background load
/// cancels out better than in a ratio of medians).
fn print_wrk(settings: &Settings, runs: &[(Route, WrkRun)]) {
    println!(
        "   HTTP connection rate (wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{}s -H \"Connection: \
         close\", median of {} round(s); added = route − direct)",
        settings.wrk_seconds, settings.wrk_rounds
    );
    let of = |route: Route| runs.iter().filter(move |r| r.0 == route).map(|r| r.1);
    let med = |route: Route, f: fn(&WrkRun) -> f64| median(of(route).map(|r| f(&r)));
    let direct50 = med(Route::Direct, |r| r.p50_us);
    let direct99 = med(Route::Direct, |r| r.p99_us);
    for route in WRK_ROUTES {
        let errors: u64 = of(route).map(|r| r.errors).sum();
        println!(
            "     {:<22} {:>8.0} conn/s  p50 {:>7.1}µs  p99 {:>7.1}µs  added p50 {:>+7.1}  added \
             p99 {:>+7.1}  CPU {:>5.1}µs/conn  errors {errors}",
            route.label(),
            med(route, |r| r.rate),
            med(route, |r| r.p50_us),
            med(route, |r| r.p99_us),
            med(route, |r| r.p50_us) - direct50,
            med(route, |r| r.p99_us) - direct99,
            med(route, |r| r.cpu_us_per_conn),
        );
    }
    // Per round: the listener's figure over HAProxy's (rates), or their added p99 difference.
    let rounds: Vec<(WrkRun, WrkRun, WrkRun)> = (0..settings.wrk_rounds as usize)
        .filter_map(|i| {
            let nth = |route: Route| of(route).nth(i);
            Some((
                nth(Route::Direct)?,
                nth(Route::Listener)?,
                nth(Route::Haproxy)?,
            ))
        })
        .collect();
    let rate_ratio = median(rounds.iter().map(|(_, l, h)| l.rate / h.rate));
    let p99_ratio = median(
        rounds
            .iter()
            .map(|(d, l, h)| (l.p99_us - d.p99_us) / (h.p99_us - d.p99_us)),
    );
    let cpu_ratio = median(
        rounds
            .iter()
            .map(|(_, l, h)| l.cpu_us_per_conn / h.cpu_us_per_conn),
    );
    println!(
        "     listener ÷ haproxy, median of per-round ratios: rate {rate_ratio:.2} ×  added p99 \
         {p99_ratio:.2} ×  CPU per connection {cpu_ratio:.2} ×"
    );
    println!(
        "     rate ≥ haproxy: {}  added p99 ≤ haproxy: {}",
        pass(rate_ratio >= 1.0),
        pass(p99_ratio <= 1.0)
    );
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn retried(attempts: u32) -> String {
    if attempts > 1 {
        format!("  [{attempts} attempts]")
    } else {
        String::new()
    }
}

/// Median (nearest rank, lower middle) of finite values; NaN for none.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    Stats::of(values).p50
}

async fn tool_versions() -> String {
    let mut parts = Vec::new();
    for (program, arg) in [("iperf3", "--version"), ("socat", "-V"), ("haproxy", "-v")] {
        let line = Command::new(program)
            .arg(arg)
            .stdin(Stdio::null())
            .output()
            .await
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find(|l| !l.trim().is_empty() && !l.starts_with("socat by"))
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| format!("{program}: version unknown"));
        parts.push(line);
    }
    parts.join("; ")
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
