//! The `footprint` bench: what the daemon costs at rest holding a few SSH forwards, against
//! autossh holding the same forwards.
//!
//! A real OpenSSH sshd on 127.0.0.1 (the ssh bench's helper, module `sshd`: throwaway keys,
//! strict host key checking) and an echo listener in this process stand in for the far side.
//!
//! - **tunnelkeeper**: `tunnelkeeper run -c GENERATED` (the binary next to this one) with 8
//!   services, each with a failover listener on `127.0.0.1:0` and one `ssh` tunnel: 4 with
//!   `local_forward: { to: ECHO }` and 4 with `remote_forward: { bind: 127.0.0.1:0, to: ECHO }`,
//!   each probed end to end every second (`send`/`expect` through a `direct-tcpip` channel; for
//!   a `-R` tunnel that channel goes to the server's port and comes back as a `forwarded-tcpip`
//!   channel), SSH keepalive every 1 s with 3 allowed misses. The pool shares SSH sessions among
//!   the tunnels (same user, host, port and key): that is the design.
//! - **autossh** (the anchor): 8 × `autossh -M 0 -N -o ServerAliveInterval=1
//!   -o ServerAliveCountMax=3 ... -p SSHD user@127.0.0.1`, 4 with `-L 127.0.0.1:PORT:ECHO` and 4
//!   with `-R 127.0.0.1:PORT:ECHO`, each an autossh process supervising one `ssh`: 16
//!   processes, 8 SSH connections.
//!
//! Each side is started alone, checked (a line echoes through every local port), left to settle,
//! and then watched for `--secs` (60 by default): CPU is utime + stime from `/proc/PID/stat` over
//! the wall time (in % of one core; summed over every autossh and ssh process for the anchor),
//! memory is `VmRSS`, `RssAnon` and `Pss` (sampled every second; summed for the anchor, where
//! `Pss` does not count the shared libraries once per process). sshd's side of the connections
//! is read the same way, for context; VmRSS is also printed at five points of the window, to tell
//! a plateau from growth, and the RssAnon growth from minute 5 to the end of the window (the
//! issue-13 target: ≤ 0.2 MB over a 30-minute window). The daemon's probes are real traffic through the forward every second;
//! autossh's ssh only answers keepalives, so the comparison favours the anchor. After each
//! window, 50 rounds of one echo connection through every local port, one after another, check
//! that the forwards still work and count the connections that fail.

// The ssh bench's sshd helper.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tunnelkeeper::status::TunnelState;

use crate::common::{
    clock_ticks, descendants_of, fmt_d, load_1min, load_average, processes_cpu, rss_by_mapping,
    which, DaemonProcess, Echo, ProcMemory, TempDir,
};
use tunnelkeeper_test_support::{try_free_port, Sshd};

/// Local (`-L`) forwards held by each side.
const LOCAL_FORWARDS: usize = 4;
/// Remote (`-R`) forwards held by each side.
const REMOTE_FORWARDS: usize = 4;
/// Forwards held by each side.
const FORWARDS: usize = LOCAL_FORWARDS + REMOTE_FORWARDS;
/// Where the growth window starts: RssAnon growth is measured from here to the end.
const GROWTH_FROM: Duration = Duration::from_secs(300);
/// Target: RssAnon growth from [`GROWTH_FROM`] to the end of a 30-minute window (issue 13).
const GROWTH_TARGET_MB: f64 = 0.2;
/// Target: the daemon's resident memory (issue 8), in bytes (decimal megabytes).
const RSS_TARGET_BYTES: f64 = 15e6;
/// Target: the daemon's CPU at rest (issue 8), in % of one core.
const CPU_TARGET_PERCENT: f64 = 0.5;
/// Left alone after the forwards work, before the window.
const WARMUP: Duration = Duration::from_secs(5);
/// How long either side may take to bring every forward up.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);
/// Limit of one echo check through a forward.
const ECHO_LIMIT: Duration = Duration::from_secs(5);
/// Echoes through each local port after the window.
const CHECKS_AFTER: usize = 50;

/// What to run, from the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Length of the daemon's measurement window.
    pub(crate) window: Duration,
    /// Length of the anchor's (autossh) window.
    pub(crate) anchor_window: Duration,
}

/// One side's window.
struct Footprint {
    label: &'static str,
    processes: usize,
    wall: Duration,
    cpu: Duration,
    last: ProcMemory,
    peak: ProcMemory,
    server_cpu: Duration,
    server: ProcMemory,
    server_processes: usize,
    load_before: String,
    load_after: String,
    notes: Vec<String>,
}

impl Footprint {
    fn cpu_percent(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9) * 100.0
    }

    fn server_cpu_percent(&self) -> f64 {
        self.server_cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9) * 100.0
    }
}

/// Runs both sides one after the other against the same sshd and prints them side by side.
pub(crate) async fn footprint(settings: Settings) -> anyhow::Result<()> {
    let dir = TempDir::new("footprint")?;
    let sshd = crate::ssh::start_sshd(&dir.0, &[], false)
        .await
        .context("starting sshd")?;
    let echo = Echo::start().await?;
    let ticks = clock_ticks();
    println!(
        "tunnelkeeper footprint bench — {LOCAL_FORWARDS} SSH local + {REMOTE_FORWARDS} remote \
         forwards to a loopback sshd, window {} per side after {} of warm-up",
        fmt_d(settings.window),
        fmt_d(WARMUP)
    );
    println!("  sshd: {}", sshd.version);
    println!("  autossh: {}", autossh_version());
    println!("  load average at start: {}", load_average());

    println!(
        "\n== tunnelkeeper: {FORWARDS} services × (listener + one `ssh` tunnel: \
         {LOCAL_FORWARDS} -L, {REMOTE_FORWARDS} -R), probes every 1s"
    );
    let daemon = measure_daemon(&dir.0, &sshd, echo.addr, settings.window, ticks).await?;
    print_footprint(&daemon);

    println!(
        "\n== anchor: {FORWARDS} × autossh -M 0 + ssh -N ({LOCAL_FORWARDS} -L, {REMOTE_FORWARDS} -R; \
         ServerAliveInterval=1, ServerAliveCountMax=3)"
    );
    let anchor = match which("autossh") {
        Some(autossh) => {
            let anchor = measure_autossh(
                &dir.0,
                &autossh,
                &sshd,
                echo.addr,
                settings.anchor_window,
                ticks,
            )
            .await?;
            print_footprint(&anchor);
            Some(anchor)
        }
        None => {
            println!("   not measured: `autossh` is not on PATH (apt-get install autossh)");
            None
        }
    };
    print_summary(&daemon, anchor.as_ref());
    Ok(())
}

/// `autossh -V`.
fn autossh_version() -> String {
    Command::new("autossh")
        .arg("-V")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&o.stderr).lines())
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".to_string())
}

/// How the daemon logs in to sshd.
struct Login<'a> {
    port: u16,
    user: &'a str,
    key: &'a Path,
    known_hosts: &'a Path,
}

/// The daemon's configuration: one service per forward.
fn config_text(dir: &Path, login: &Login<'_>, echo: SocketAddr) -> String {
    let mut text = crate::common::config_header(dir);
    for i in 1..=FORWARDS {
        let (name, forward) = if i <= LOCAL_FORWARDS {
            (
                format!("fwd{i}"),
                format!("local_forward: {{ to: \"{echo}\" }}"),
            )
        } else {
            (
                format!("rev{}", i - LOCAL_FORWARDS),
                format!("remote_forward: {{ bind: \"127.0.0.1:0\", to: \"{echo}\" }}"),
            )
        };
        let _ = write!(
            text,
            "  - name: {name}
    listen: \"127.0.0.1:0\"
    tunnels:
      - name: ssh
        provider: ssh
        ssh: {{ host: 127.0.0.1, port: {port}, user: {user}, identity_file: {key}, \
known_hosts: {known}, keepalive_interval: 1s, keepalive_max: 3 }}
        {forward}
",
            port = login.port,
            user = serde_json::to_string(login.user).unwrap_or_default(),
            key = crate::common::quote(login.key),
            known = crate::common::quote(login.known_hosts),
        );
    }
    text
}

async fn measure_daemon(
    dir: &Path,
    sshd: &Sshd,
    echo: SocketAddr,
    window: Duration,
    ticks: u64,
) -> anyhow::Result<Footprint> {
    let config = dir.join("footprint.yaml");
    let login = Login {
        port: sshd.port,
        user: &sshd.user,
        key: &sshd.client_key,
        known_hosts: &sshd.known_hosts,
    };
    std::fs::write(&config, config_text(dir, &login, echo))
        .with_context(|| format!("writing {}", config.display()))?;
    let daemon = DaemonProcess::start(
        &config,
        &dir.join("control.sock"),
        &dir.join("daemon.log"),
        STARTUP_LIMIT,
    )
    .await?;
    let started = Instant::now();
    let listeners = loop {
        let status = daemon.client.status().await?;
        let up = status
            .services
            .iter()
            .flat_map(|s| &s.tunnels)
            .filter(|t| t.state == TunnelState::Up)
            .count();
        let listeners: Vec<String> = status
            .services
            .iter()
            .filter_map(|s| s.listener.as_ref().map(|l| l.address.clone()))
            .collect();
        if up == FORWARDS && listeners.len() == FORWARDS {
            break listeners;
        }
        if started.elapsed() >= STARTUP_LIMIT {
            bail!(
                "{up} of {FORWARDS} tunnels up after {}; the daemon's log:\n{}",
                fmt_d(STARTUP_LIMIT),
                daemon.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Retried like autossh's ports below; a failed attempt is a finding, reported with the
    // listener's own counters.
    let mut failed = Vec::new();
    for address in &listeners {
        let addr: SocketAddr = address
            .parse()
            .with_context(|| format!("listener address {address}"))?;
        loop {
            match echo_through(addr).await {
                Ok(()) => break,
                Err(e) if started.elapsed() >= STARTUP_LIMIT => {
                    return Err(e.context(format!(
                        "no echo through the daemon's listener {addr} within {}; its log:\n{}",
                        fmt_d(STARTUP_LIMIT),
                        daemon.log_tail()
                    )));
                }
                Err(e) => {
                    failed.push(format!("{addr}: {e:#}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    if !failed.is_empty() {
        let status = daemon.client.status_json().await?;
        let counters: Vec<String> = status["services"]
            .as_array()
            .map(|services| {
                services
                    .iter()
                    .map(|s| {
                        let l = &s["listener"];
                        format!(
                            "{} primary {} total {} unserved {} replayed {} failed_dials {}",
                            s["name"],
                            s["primary"],
                            l["total"],
                            l["unserved"],
                            l["replayed"],
                            l["failed_dials"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "   {} echo attempt(s) through the listeners failed before every listener answered: {}\n   \
             listeners: {}\n   daemon log (tail):\n{}",
            failed.len(),
            failed.join("; "),
            counters.join("; "),
            daemon.log_tail()
        );
    }
    println!(
        "   all {FORWARDS} tunnels up {} after the socket answered; a line echoes through each \
         listener ({})",
        fmt_d(started.elapsed()),
        listeners.join(", ")
    );
    tokio::time::sleep(WARMUP).await;
    let seq_before = daemon.client.status_json().await?["daemon"]["last_seq"].as_u64();
    let mut footprint = watch("tunnelkeeper", || vec![daemon.pid], sshd, window, ticks).await?;
    let seq_after = daemon.client.status_json().await?["daemon"]["last_seq"].as_u64();
    if let (Some(before), Some(after)) = (seq_before, seq_after) {
        // At rest nothing should happen: a `probe_failed` here would be a probe that failed.
        footprint.notes.push(format!(
            "events published during the window: {}",
            after.saturating_sub(before)
        ));
    }
    let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|a| a.parse().ok()).collect();
    footprint.notes.push(after_window(&addrs).await);
    let mappings: Vec<String> = rss_by_mapping(daemon.pid)
        .into_iter()
        .take(5)
        .map(|(name, kib)| {
            let name = name.rsplit('/').next().unwrap_or(&name).to_string();
            format!("{name} {:.2}", mb(kib))
        })
        .collect();
    footprint.notes.push(format!(
        "VmRSS by mapping, largest first (MB): {}",
        mappings.join(", ")
    ));
    let status = daemon.client.status_json().await?;
    footprint.notes.push(format!(
        "SSH pool: {} session(s) open, {} opened in all",
        status["ssh_pool"]["sessions"], status["ssh_pool"]["opened"]
    ));
    let restarts: u64 = status["services"]
        .as_array()
        .map(|services| {
            services
                .iter()
                .flat_map(|s| s["tunnels"].as_array().cloned().unwrap_or_default())
                .filter_map(|t| t["restarts"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    footprint
        .notes
        .push(format!("tunnel restarts during the run: {restarts}"));
    match daemon.stop(Duration::from_secs(30)).await {
        Ok(took) => footprint
            .notes
            .push(format!("shutdown took {}", fmt_d(took))),
        Err(e) => footprint.notes.push(format!("shutdown: {e:#}")),
    }
    Ok(footprint)
}

/// Four autossh processes, each with its ssh; killed (with their children) when dropped.
struct Autossh {
    children: Vec<Child>,
}

impl Autossh {
    /// Every autossh process and everything it started.
    fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for child in &self.children {
            pids.push(child.id());
            pids.extend(descendants_of(child.id()));
        }
        pids
    }
}

impl Drop for Autossh {
    fn drop(&mut self) {
        let pids = self.pids();
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

async fn measure_autossh(
    dir: &Path,
    autossh: &Path,
    sshd: &Sshd,
    echo: SocketAddr,
    window: Duration,
    ticks: u64,
) -> anyhow::Result<Footprint> {
    let mut group = Autossh {
        children: Vec::new(),
    };
    let mut ports = Vec::new();
    for i in 1..=FORWARDS {
        let port = try_free_port().context("finding a free loopback port")?;
        let log_path = dir.join(format!("autossh{i}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(autossh)
            .args(["-M", "0", "-N"])
            .args(sshd.client_args())
            .args([
                "-o",
                "ServerAliveInterval=1",
                "-o",
                "ServerAliveCountMax=3",
                "-o",
                "ExitOnForwardFailure=yes",
                if i <= LOCAL_FORWARDS { "-L" } else { "-R" },
            ])
            .arg(format!("127.0.0.1:{port}:{echo}"))
            .arg(sshd.destination())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", autossh.display()))?;
        group.children.push(child);
        ports.push(port);
    }
    let started = Instant::now();
    for &port in &ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            match echo_through(addr).await {
                Ok(()) => break,
                Err(e) if started.elapsed() >= STARTUP_LIMIT => {
                    return Err(e.context(format!(
                        "no echo through autossh's forwarded port {port} within {}",
                        fmt_d(STARTUP_LIMIT)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let pids = group.pids();
    println!(
        "   a line echoes through all {FORWARDS} forwarded ports {} after starting autossh; {} processes \
         (autossh + ssh)",
        fmt_d(started.elapsed()),
        pids.len()
    );
    tokio::time::sleep(WARMUP).await;
    let mut footprint = watch("autossh + ssh", || group.pids(), sshd, window, ticks).await?;
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    footprint.notes.push(after_window(&addrs).await);
    let after = group.pids();
    if after != pids {
        footprint.notes.push(format!(
            "the process set changed during the run ({} → {} processes): ssh was restarted",
            pids.len(),
            after.len()
        ));
    } else {
        footprint
            .notes
            .push("no ssh was restarted during the run".to_string());
    }
    drop(group);
    Ok(footprint)
}

/// After the window: [`CHECKS_AFTER`] echoes through each local port, one at a time (the forwards
/// still work, and how often a connection fails); the answer is a note.
async fn after_window(addrs: &[SocketAddr]) -> String {
    let mut failures = Vec::new();
    let started = Instant::now();
    for round in 0..CHECKS_AFTER {
        for addr in addrs {
            if let Err(e) = echo_through(*addr).await {
                failures.push(format!("round {round} {addr}: {e:#}"));
            }
        }
    }
    let total = CHECKS_AFTER * addrs.len();
    let mut note = format!(
        "after the window: {} of {total} echoes through the local ports failed ({} in all)",
        failures.len(),
        fmt_d(started.elapsed())
    );
    if !failures.is_empty() {
        let shown: Vec<&str> = failures.iter().take(5).map(String::as_str).collect();
        note.push_str(&format!(": {}", shown.join("; ")));
    }
    note
}

/// One line through a local forward to the echo listener, and back.
async fn echo_through(addr: SocketAddr) -> anyhow::Result<()> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"footprint\n").await?;
        let mut buf = [0u8; 10];
        stream.read_exact(&mut buf).await?;
        if &buf != b"footprint\n" {
            bail!("unexpected answer {buf:?}");
        }
        Ok(())
    };
    tokio::time::timeout(ECHO_LIMIT, work)
        .await
        .context("timed out")?
}

/// Watches the processes `pids()` names (read at the start and the end of the window; CPU over
/// the set at the start) and sshd's connection processes for `window`.
async fn watch(
    label: &'static str,
    pids: impl Fn() -> Vec<u32>,
    sshd: &Sshd,
    window: Duration,
    ticks: u64,
) -> anyhow::Result<Footprint> {
    let watched = pids();
    if watched.is_empty() {
        bail!("no process to watch");
    }
    let server = sshd.descendants();
    let load_before = load_average();
    if load_1min() > 1.0 {
        println!(
            "   note: 1-minute load average {} at the start of the window (> 1: other work shares \
             the vCPUs)",
            load_1min()
        );
    }
    let cpu_before = processes_cpu(&watched, ticks);
    let server_before = processes_cpu(&server, ticks);
    let started = Instant::now();
    let end = started + window;
    let (mut last, mut peak) = (ProcMemory::default(), ProcMemory::default());
    let mut samples = Vec::new();
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next).await;
        last = ProcMemory::sum(&watched);
        peak = peak.max(last);
        samples.push(last);
    }
    // VmRSS over the window, to tell a plateau from growth.
    let trajectory: Vec<String> = [
        0,
        samples.len() / 4,
        samples.len() / 2,
        samples.len() * 3 / 4,
    ]
    .into_iter()
    .chain(std::iter::once(samples.len().saturating_sub(1)))
    .filter_map(|i| samples.get(i).map(|m| (i, m)))
    .map(|(i, m)| format!("{}s {:.2}/{:.2}", i + 1, mb(m.rss), mb(m.anon)))
    .collect();
    let mut notes = vec![format!(
        "VmRSS/RssAnon (MB) over the window: {}",
        trajectory.join(", ")
    )];
    notes.push(growth_note(&samples));
    let cpu = processes_cpu(&watched, ticks).saturating_sub(cpu_before);
    let server_cpu = processes_cpu(&server, ticks).saturating_sub(server_before);
    let wall = started.elapsed();
    Ok(Footprint {
        label,
        processes: watched.len(),
        wall,
        cpu,
        last,
        peak,
        server_cpu,
        server: ProcMemory::sum(&server),
        server_processes: server.len(),
        load_before,
        load_after: load_average(),
        notes,
    })
}

/// RssAnon growth from [`GROWTH_FROM`] (one sample a second) to the last sample, with the
/// target verdict for windows of 30 minutes or more; shorter windows start at a sixth in.
fn growth_note(samples: &[ProcMemory]) -> String {
    let Some(last) = samples.last() else {
        return "RssAnon growth: no samples".to_string();
    };
    let from_secs = GROWTH_FROM.as_secs() as usize;
    let from = if samples.len() > from_secs * 6 {
        from_secs
    } else {
        samples.len() / 6
    };
    let Some(start) = samples.get(from) else {
        return "RssAnon growth: no samples".to_string();
    };
    let growth = mb(last.anon) - mb(start.anon);
    let verdict = if samples.len() >= 1800 {
        if growth <= GROWTH_TARGET_MB {
            format!(" (target ≤ {GROWTH_TARGET_MB} MB: PASS)")
        } else {
            format!(" (target ≤ {GROWTH_TARGET_MB} MB: MISS)")
        }
    } else {
        String::new()
    };
    format!(
        "RssAnon growth from {}s to {}s: {growth:+.3} MB ({:.2} → {:.2}){verdict}",
        from + 1,
        samples.len(),
        mb(start.anon),
        mb(last.anon)
    )
}

/// KiB as decimal megabytes.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn print_footprint(f: &Footprint) {
    println!(
        "   window {} (load average before {}, after {}), {} process(es):",
        fmt_d(f.wall),
        f.load_before,
        f.load_after,
        f.processes
    );
    println!(
        "     CPU {:.3} % of one core ({} of CPU time); VmRSS {:.2} MB (peak {:.2}; of it \
         RssAnon {:.2} MB, the rest file-backed: code and libraries), Pss {:.2} MB",
        f.cpu_percent(),
        fmt_d(f.cpu),
        mb(f.last.rss),
        mb(f.peak.rss),
        mb(f.last.anon),
        mb(f.last.pss)
    );
    println!(
        "     sshd's side: {} processes, CPU {:.3} %, VmRSS {:.2} MB, Pss {:.2} MB",
        f.server_processes,
        f.server_cpu_percent(),
        mb(f.server.rss),
        mb(f.server.pss)
    );
    for note in &f.notes {
        println!("     {note}");
    }
}

fn print_summary(daemon: &Footprint, anchor: Option<&Footprint>) {
    println!("\n== summary ({LOCAL_FORWARDS} -L + {REMOTE_FORWARDS} -R forwards, MB = 10^6 bytes, CPU in % of one core)");
    println!(
        "   {:<16} {:>9} {:>10} {:>10} {:>10} {:>8} {:>12}",
        "", "processes", "VmRSS MB", "Pss MB", "RssAnon MB", "CPU %", "sshd CPU %"
    );
    for f in std::iter::once(daemon).chain(anchor) {
        println!(
            "   {:<16} {:>9} {:>10.2} {:>10.2} {:>10.2} {:>8.3} {:>12.3}",
            f.label,
            f.processes,
            mb(f.last.rss),
            mb(f.last.pss),
            mb(f.last.anon),
            f.cpu_percent(),
            f.server_cpu_percent()
        );
    }
    if let Some(a) = anchor {
        let cpu = if a.cpu.is_zero() {
            "— (the anchor used no measurable CPU: under one clock tick)".to_string()
        } else {
            format!("{:.2} ×", daemon.cpu_percent() / a.cpu_percent())
        };
        println!(
            "   tunnelkeeper ÷ autossh: VmRSS {:.2} ×, Pss {:.2} ×, RssAnon {:.2} ×, CPU {cpu}",
            mb(daemon.last.rss) / mb(a.last.rss).max(1e-9),
            mb(daemon.last.pss) / mb(a.last.pss).max(1e-9),
            mb(daemon.last.anon) / mb(a.last.anon).max(1e-9),
        );
    }
    let rss_bytes = daemon.peak.rss as f64 * 1024.0;
    println!(
        "   targets: VmRSS ≤ 15 MB: {} (peak {:.2} MB); CPU ≤ {CPU_TARGET_PERCENT} %: {} ({:.3} %)",
        if rss_bytes <= RSS_TARGET_BYTES {
            "PASS"
        } else {
            "MISS"
        },
        rss_bytes / 1e6,
        if daemon.cpu_percent() <= CPU_TARGET_PERCENT {
            "PASS"
        } else {
            "MISS"
        },
        daemon.cpu_percent()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid() {
        let login = Login {
            port: 2222,
            user: "root",
            key: Path::new("/tmp/x/id_ed25519"),
            known_hosts: Path::new("/tmp/x/known_hosts"),
        };
        let echo = SocketAddr::from(([127, 0, 0, 1], 9));
        let text = config_text(Path::new("/tmp/x"), &login, echo);
        assert_eq!(text.matches("provider: ssh").count(), FORWARDS);
        assert_eq!(text.matches("remote_forward").count(), REMOTE_FORWARDS);
        let parsed = tunnelkeeper::config::parse(&text, Path::new("/tmp/x/footprint.yaml"));
        assert!(parsed.is_ok(), "{text}\n{:?}", parsed.err());
    }
}
