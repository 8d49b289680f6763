//! Helpers shared by the benches: order statistics, duration formatting, a loopback echo
//! server, and a private temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

/// Nearest-rank percentile of sorted values (`p` in 0..=100); NaN for no values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted
        .get(rank.min(sorted.len()) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Order statistics of one set of samples (the unit is the caller's; milliseconds mostly).
pub(crate) struct Stats {
    /// Finite samples counted.
    pub(crate) n: usize,
    /// Smallest.
    pub(crate) min: f64,
    /// Median (nearest rank).
    pub(crate) p50: f64,
    /// 90th percentile (nearest rank).
    pub(crate) p90: f64,
    /// 99th percentile (nearest rank).
    pub(crate) p99: f64,
    /// Largest.
    pub(crate) max: f64,
    /// Arithmetic mean.
    pub(crate) mean: f64,
}

impl Stats {
    /// Statistics of `values`, ignoring NaN and infinities.
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let mean = if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        };
        Stats {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
            mean,
        }
    }
}

/// `PASS` when `p99` is at or under `target`, else `MISS`.
pub(crate) fn verdict(p99: f64, target: f64) -> &'static str {
    if p99 <= target {
        "PASS"
    } else {
        "MISS"
    }
}

/// A duration in (fractional) milliseconds.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds for people: `12.3ms`, or `1.234s` from a second on.
pub(crate) fn fmt_ms(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.3}s", v / 1000.0)
    } else {
        format!("{v:.1}ms")
    }
}

/// A duration for people (see [`fmt_ms`]).
pub(crate) fn fmt_d(d: Duration) -> String {
    fmt_ms(ms(d))
}

/// Listen backlog of the echo server (see [`Echo::start`]).
const ECHO_BACKLOG: u32 = 4096;

/// The loopback echo server standing in for the service; stopped when dropped.
pub(crate) struct Echo {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Echo {
    /// Starts it on `127.0.0.1:0`.
    pub(crate) async fn start() -> anyhow::Result<Echo> {
        let socket = TcpSocket::new_v4().context("creating the echo server's socket")?;
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("binding the echo server on 127.0.0.1")?;
        // `TcpListener::bind` listens with a backlog of 128: the ssh bench's bursts of 1000
        // connects (sshd dialling us for every channel at once) would overflow it, and every
        // dropped SYN costs its connection the 1 s retransmission timeout. The kernel caps
        // this at `net.core.somaxconn`.
        let listener = socket
            .listen(ECHO_BACKLOG)
            .context("listening on the echo server's socket")?;
        let addr = listener
            .local_addr()
            .context("reading the echo server's address")?;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Echo { addr, task })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A private directory (control socket, state, keys) removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Creates `tunnelkeeper-bench-PID-LABEL` under the runtime or temp directory.
    pub(crate) fn new(label: &str) -> anyhow::Result<TempDir> {
        // The runtime dir keeps the socket path short and private; /tmp is the fallback.
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("tunnelkeeper-bench-{}-{label}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes seen through `/proc`, and the real daemon binary run as a child (`scale`,
// `footprint`).

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` prints them (`?` if unreadable).
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The 1-minute load average (NaN if unreadable).
pub(crate) fn load_1min() -> f64 {
    load_average()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The unit of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on every common Linux).
pub(crate) fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time (user + system, every thread; reaped children not included) that `pid` has used,
/// from `/proc/PID/stat`; `None` once the process is gone.
pub(crate) fn process_cpu(pid: u32, ticks_per_second: u64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: utime and stime are fields 14 and 15, i.e. the 12th and 13th
    // after the closing parenthesis (comm may contain spaces and parentheses).
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / ticks_per_second.max(1) as f64,
    ))
}

/// CPU time summed over several processes (those gone are skipped: read the same set twice).
pub(crate) fn processes_cpu(pids: &[u32], ticks_per_second: u64) -> Duration {
    pids.iter()
        .filter_map(|&pid| process_cpu(pid, ticks_per_second))
        .sum()
}

/// Memory of a process, in KiB: `VmRSS` and `RssAnon` from `/proc/PID/status`, `Pss` from
/// `/proc/PID/smaps_rollup` (shared pages divided among the processes sharing them, so sums
/// over several processes do not count a shared library once per process).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcMemory {
    /// Every resident page, shared library pages included.
    pub(crate) rss: u64,
    /// Resident anonymous pages (heap, stacks).
    pub(crate) anon: u64,
    /// Proportional set size (0 when `smaps_rollup` is not readable).
    pub(crate) pss: u64,
}

impl ProcMemory {
    /// The memory of `pid`; `None` once the process is gone.
    pub(crate) fn of(pid: u32) -> Option<ProcMemory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        Some(ProcMemory {
            rss: kib_field(&status, "VmRSS:")?,
            anon: kib_field(&status, "RssAnon:").unwrap_or(0),
            pss: kib_field(&rollup, "Pss:").unwrap_or(0),
        })
    }

    /// The summed memory of several processes (those gone are skipped).
    pub(crate) fn sum(pids: &[u32]) -> ProcMemory {
        pids.iter()
            .filter_map(|&pid| ProcMemory::of(pid))
            .fold(ProcMemory::default(), |a, m| ProcMemory {
                rss: a.rss + m.rss,
                anon: a.anon + m.anon,
                pss: a.pss + m.pss,
            })
    }

    /// Field by field maximum (for peaks over samples).
    pub(crate) fn max(self, other: ProcMemory) -> ProcMemory {
        ProcMemory {
            rss: self.rss.max(other.rss),
            anon: self.anon.max(other.anon),
            pss: self.pss.max(other.pss),
        }
    }
}

/// The number in a `Name:   123 kB` line of a `/proc` file.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// `Threads:` of `/proc/PID/status` and the number of entries in `/proc/PID/fd`.
pub(crate) fn threads_and_fds(pid: u32) -> (u64, usize) {
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// Every descendant of a process (the shared helper).
pub(crate) use tunnelkeeper_test_support::descendants_of;

/// What [`ensure_open_files`] found and did.
pub(crate) struct OpenFiles {
    /// Soft limit before.
    pub(crate) before: u64,
    /// Soft limit now (inherited by every child started from here on).
    pub(crate) now: u64,
    /// Hard limit.
    pub(crate) hard: u64,
}

impl std::fmt::Display for OpenFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.now > self.before {
            write!(
                f,
                "raised from {} to {} (hard limit {})",
                self.before, self.now, self.hard
            )
        } else {
            write!(f, "{} (hard limit {}), not changed", self.now, self.hard)
        }
    }
}

/// Makes sure this process (and so every child it starts afterwards) may open `needed` files,
/// raising the soft `RLIMIT_NOFILE` up to the hard limit if it is lower. The workspace's `nix`
/// is built without its `resource` feature, and this binary forbids `unsafe`, so the raise is
/// done by util-linux's `prlimit --pid SELF` (setrlimit from outside; same effect).
pub(crate) fn ensure_open_files(needed: u64) -> anyhow::Result<OpenFiles> {
    let read = || -> anyhow::Result<(u64, u64)> {
        let text =
            std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
        let line = text
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .context("no `Max open files` in /proc/self/limits")?;
        let mut values = line.trim_start_matches("Max open files").split_whitespace();
        let mut value = || -> u64 {
            values
                .next()
                .map(|v| v.parse().unwrap_or(u64::MAX))
                .unwrap_or(0)
        };
        Ok((value(), value()))
    };
    let (before, hard) = read()?;
    if before >= needed {
        return Ok(OpenFiles {
            before,
            now: before,
            hard,
        });
    }
    if hard < needed {
        anyhow::bail!(
            "need about {needed} open files, and the hard limit is {hard}: raise it \
             (`ulimit -Hn {needed}` as root) or use fewer tunnels"
        );
    }
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={needed}:{hard}"))
        .status()
        .context("running prlimit (util-linux) to raise the open-files limit")?;
    let (now, hard) = read()?;
    if !status.success() || now < needed {
        anyhow::bail!("could not raise the open-files limit from {before} to {needed}");
    }
    Ok(OpenFiles { before, now, hard })
}

/// The `tunnelkeeper` binary next to this one. Under `cargo run` (which sets `CARGO`) it is
/// built first with the bench's own profile, since building the bench package does not build
/// the daemon's: a missing or stale daemon would otherwise be measured.
pub(crate) fn daemon_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()
        .context("locating the bench binary")?
        .with_file_name("tunnelkeeper");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let profile = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str())
            .map(|name| if name == "debug" { "dev" } else { name })
            .unwrap_or("release")
            .to_string();
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--profile",
                &profile,
                "-p",
                "tunnelkeeper",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .status()
            .context("running cargo build -p tunnelkeeper")?;
        if !status.success() {
            anyhow::bail!("cargo build -p tunnelkeeper --profile {profile} failed: {status}");
        }
    }
    if !path.is_file() {
        anyhow::bail!(
            "{} not found; build it first: `cargo build --release -p tunnelkeeper` \
             (or run the bench with `cargo run --release -p tunnelkeeper-bench -- ...`)",
            path.display()
        );
    }
    Ok(path)
}

/// A program's full path, from `PATH`.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `tunnelkeeper run -c CONFIG` as a child process (stderr to a log file), and a control-socket
/// client for it. SIGKILLed when dropped without [`DaemonProcess::stop`]; its children die
/// with it (PR_SET_PDEATHSIG).
pub(crate) struct DaemonProcess {
    child: Option<std::process::Child>,
    /// Its pid.
    pub(crate) pid: u32,
    /// A client for its control socket.
    pub(crate) client: tunnelkeeper::control::client::Client,
    log: PathBuf,
}

impl DaemonProcess {
    /// Starts the daemon and returns once its control socket answers `GET /v1/status` (the
    /// tunnels may still be starting), within `limit`.
    pub(crate) async fn start(
        config: &std::path::Path,
        socket: &std::path::Path,
        log: &std::path::Path,
        limit: Duration,
    ) -> anyhow::Result<DaemonProcess> {
        let binary = daemon_binary()?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = std::process::Command::new(&binary)
            .arg("--log-format")
            .arg("text")
            .arg("run")
            .arg("-c")
            .arg(config)
            // The daemon's own default level, whatever the bench was started with.
            .env("TUNNELKEEPER_LOG", "info")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let mut daemon = DaemonProcess {
            pid: child.id(),
            child: Some(child),
            client: tunnelkeeper::control::client::Client::new(socket),
            log: log.to_path_buf(),
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(child) = daemon.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    daemon.child = None;
                    anyhow::bail!(
                        "the daemon exited ({status}); its log:\n{}",
                        daemon.log_tail()
                    );
                }
            }
            if daemon.client.status_json().await.is_ok() {
                return Ok(daemon);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the daemon did not answer on its socket within {}; its log:\n{}",
                    fmt_d(limit),
                    daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of its log.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then waits up to `limit` for it to exit (SIGKILL after that); returns how long
    /// the shutdown took.
    pub(crate) async fn stop(mut self, limit: Duration) -> anyhow::Result<Duration> {
        let started = tokio::time::Instant::now();
        let Some(mut child) = self.child.take() else {
            anyhow::bail!("the daemon had already exited");
        };
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = started + limit;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(started.elapsed()),
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    anyhow::bail!("the daemon did not stop within {}; killed", fmt_d(limit));
                }
            }
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Resident KiB of `pid` per mapped file, from `/proc/PID/smaps`, largest first; anonymous
/// mappings are summed under `[anon]` (heap, stacks and the like keep their own names).
pub(crate) fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut sums: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut current = String::from("[anon]");
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        // A mapping's header: `start-end perms offset dev inode [path]`.
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            current = fields.nth(4).unwrap_or("[anon]").to_string();
        } else if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *sums.entry(current.clone()).or_default() += kib;
        }
    }
    let mut sums: Vec<(String, u64)> = sums.into_iter().filter(|(_, kib)| *kib > 0).collect();
    sums.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    sums
}

/// The head of a daemon config for the benches, up to `services:`: socket and state in `dir`,
/// 1 s send/expect probes.
pub fn config_header(dir: &std::path::Path) -> String {
    format!(
        "version: 1
daemon:
  control_socket: {socket}
  state_dir: {state}
  shutdown_grace: 5s
defaults:
  probe: {{ interval: 1s, timeout: 1s, rise: 3, fall: 3, send: \"ping\\n\", expect: \"ping\" }}
services:
",
        socket = quote(&dir.join("control.sock")),
        state = quote(&dir.join("state")),
    )
}

/// A path as a quoted YAML (JSON) string.
pub fn quote(p: &std::path::Path) -> String {
    serde_json::to_string(&p.display().to_string()).unwrap_or_else(|_| "\"\"".into())
}
