//! `tunnelkeeper demo`: the real daemon on a generated loopback setup, with faults injected.
//!
//! An in-process echo server is the service; three real child processes (this binary in its
//! hidden `relay` mode, started by the `command` provider) are the tunnels. The daemon runs from
//! `config/demo.yaml` through the normal config path. The demo then kills the primary with
//! SIGKILL (a hard failure: noticed from the child's exit), freezes it with SIGSTOP (a
//! blackhole: the kernel still accepts TCP connections, so only the send/expect probe notices),
//! lets it recover, and measures every failover and failback from the event bus. It prints the
//! events live, the status table between phases, and a summary; it ends within a minute and
//! leaves no process behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::bus::{Delivery, Event, EventKind, Subscription};
use crate::daemon::Daemon;

/// The demo's configuration template.
pub const TEMPLATE: &str = include_str!("../config/demo.yaml");

/// The service name in the template.
const SERVICE: &str = "demo";
/// The preferred tunnel in the template.
const PREFERRED: &str = "alpha";

/// One measured fault.
struct Measurement {
    fault: &'static str,
    failover: Duration,
    failback_hold: Duration,
    failback_total: Duration,
}

/// Runs the demo; `quick` runs one round of each fault instead of two.
pub async fn run(quick: bool) -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let echo = start_echo().await?;
    let me = std::env::current_exe().context("locating the tunnelkeeper binary")?;
    let text = TEMPLATE
        .replace("@DIR@", &dir.0.display().to_string())
        .replace("@SELF@", &me.display().to_string())
        .replace("@ECHO@", &echo.to_string());
    let config = crate::config::parse(&text, &dir.0.join("demo.yaml"))
        .map_err(|e| anyhow::anyhow!("the embedded demo config is invalid:\n{e}"))?;

    println!("tunnelkeeper demo — everything on 127.0.0.1, nothing to install");
    println!("  service `{SERVICE}`: an echo server at {echo}");
    println!("  tunnels: alpha (priority 10), beta (20), gamma (30) — real child processes");
    println!("  probes: every 200ms, send \"ping\" expect \"ping\", rise 2, fall 3; failback hold 1s (grows when a tunnel flaps)");
    println!(
        "  control socket: {} (try `tunnelkeeper status --socket ...` meanwhile)\n",
        config.daemon.control_socket.display()
    );

    let daemon = Daemon::start(config).await?;
    let mut view = View::new(daemon.bus().subscribe());
    let listen = daemon.status().services[0]
        .listener
        .as_ref()
        .map(|l| l.address.clone())
        .context("the demo service has no listener")?;
    println!("  failover listener: {listen} — a client exchanges a line through it every 20 ms\n");
    let client = Client::start(listen.parse().context("listener address")?);
    let result = script(&daemon, &mut view, if quick { 1 } else { 2 }).await;
    let (ok, failed) = client.stop().await;
    let pids: Vec<u32> = daemon.status().services[0]
        .tunnels
        .iter()
        .filter_map(|t| t.pid)
        .collect();
    daemon.shutdown().await;
    view.drain();
    let leftovers: Vec<u32> = pids
        .into_iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    let measurements = result?;
    summary(&measurements);
    println!(
        "\n   client through the listener: {ok} exchanges, {failed} failed{}",
        if failed == 0 {
            " — every connection reached the service through whichever tunnel was best"
        } else {
            ""
        }
    );
    if leftovers.is_empty() {
        println!("\nshut down cleanly: every child process stopped, control socket removed.");
        Ok(())
    } else {
        bail!("child processes left behind: {leftovers:?}")
    }
}

async fn script(
    daemon: &Daemon,
    view: &mut View,
    rounds: usize,
) -> anyhow::Result<Vec<Measurement>> {
    println!("== waiting for the tunnels to come up and `{PREFERRED}` to be elected");
    view.until(Duration::from_secs(15), |e| is_primary(e, PREFERRED))
        .await
        .context("alpha was never elected")?;
    let mut up = std::collections::BTreeSet::new();
    for t in &daemon.status().services[0].tunnels {
        if t.state == crate::status::TunnelState::Up {
            up.insert(t.name.clone());
        }
    }
    while up.len() < 3 {
        let e = view
            .until(Duration::from_secs(15), |e| {
                matches!(e.kind, EventKind::TunnelUp { .. })
            })
            .await
            .context("not every tunnel came up")?;
        if let Some(t) = e.kind.tunnel() {
            up.insert(t.to_string());
        }
    }
    print_table(daemon);
    let mut measurements = Vec::new();
    for round in 1..=rounds {
        for fault in [Fault::Kill, Fault::Stop] {
            println!("\n== round {round}: {}", fault.describe());
            measurements.push(inject(daemon, view, fault).await?);
            print_table(daemon);
        }
    }
    Ok(measurements)
}

#[derive(Clone, Copy)]
enum Fault {
    Kill,
    Stop,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 the primary (hard failure)",
            Fault::Stop => "SIGSTOP the primary (blackhole: TCP still connects, nothing answers)",
        }
    }
}

async fn inject(daemon: &Daemon, view: &mut View, fault: Fault) -> anyhow::Result<Measurement> {
    let pid = primary_pid(daemon).context("the primary has no pid")?;
    let pid = Pid::from_raw(pid as i32);
    let injected = Instant::now();
    let signal = match fault {
        Fault::Kill => Signal::SIGKILL,
        Fault::Stop => Signal::SIGSTOP,
    };
    kill(pid, signal).with_context(|| format!("sending {signal} to {pid}"))?;
    view.note(&format!("sent {signal} to {PREFERRED} (pid {pid})"));
    view.until(
        Duration::from_secs(10),
        |e| matches!(&e.kind, EventKind::PrimaryChanged { from: Some(f), .. } if f == PREFERRED),
    )
    .await
    .context("no failover happened")?;
    let failover = injected.elapsed();
    if let Fault::Stop = fault {
        kill(pid, Signal::SIGCONT).with_context(|| format!("sending SIGCONT to {pid}"))?;
        view.note(&format!("sent SIGCONT to {PREFERRED}: it answers again"));
    }
    view.until(
        Duration::from_secs(20),
        |e| matches!(&e.kind, EventKind::TunnelUp { tunnel, .. } if tunnel == PREFERRED),
    )
    .await
    .context("alpha never came back up")?;
    let back_up = Instant::now();
    view.until(Duration::from_secs(30), |e| is_primary(e, PREFERRED))
        .await
        .context("no failback to alpha")?;
    Ok(Measurement {
        fault: match fault {
            Fault::Kill => "kill -9",
            Fault::Stop => "SIGSTOP",
        },
        failover,
        failback_hold: back_up.elapsed(),
        failback_total: injected.elapsed(),
    })
}

fn is_primary(e: &Event, tunnel: &str) -> bool {
    matches!(&e.kind, EventKind::PrimaryChanged { to: Some(t), .. } if t == tunnel)
}

fn primary_pid(daemon: &Daemon) -> Option<u32> {
    let status = daemon.status();
    let service = status.services.first()?;
    let primary = service.primary.as_deref()?;
    service.tunnels.iter().find(|t| t.name == primary)?.pid
}

fn print_table(daemon: &Daemon) {
    let status = daemon.status();
    for s in &status.services {
        let tunnels: Vec<String> = s
            .tunnels
            .iter()
            .map(|t| {
                let latency = t
                    .latency_ms
                    .map(|ms| format!(" {ms:.2}ms"))
                    .unwrap_or_default();
                let mark = if s.primary.as_deref() == Some(&t.name) {
                    "*"
                } else {
                    ""
                };
                format!(
                    "{mark}{} {}{latency} hold {}ms",
                    t.name,
                    format!("{:?}", t.state).to_lowercase(),
                    t.hold_ms
                )
            })
            .collect();
        println!("   status │ {} │ {}", s.summary(), tunnels.join(" │ "));
    }
}

fn summary(measurements: &[Measurement]) {
    println!("\n== summary (measured from the moment the signal was sent)");
    println!(
        "   {:<8} {:>12} {:>22} {:>16}",
        "fault", "failover", "back up → failback", "back on alpha"
    );
    for m in measurements {
        println!(
            "   {:<8} {:>12} {:>22} {:>16}",
            m.fault,
            fmt(m.failover),
            fmt(m.failback_hold),
            fmt(m.failback_total)
        );
    }
    println!("   failover: kill -9 is noticed from the child's exit at once; SIGSTOP needs fall (3) failed");
    println!("   probes at 200ms. Failback waits for the hold, which doubles each time alpha fails again");
    println!("   (dampening), so a flapping tunnel cannot drag traffic back and forth. Meanwhile");
    println!("   beta carries the traffic: the only gap is the failover column.");
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// Prints events as they arrive, relative to the start of the demo.
struct View {
    events: Subscription,
    start: Instant,
}

impl View {
    fn new(events: Subscription) -> View {
        View {
            events,
            start: Instant::now(),
        }
    }

    fn stamp(&self) -> String {
        format!("{:>7.3}s", self.start.elapsed().as_secs_f64())
    }

    fn note(&self, text: &str) {
        println!("  {} ⚡ {text}", self.stamp());
    }

    /// Prints events until one matches `want` (returned) or `limit` passes.
    async fn until(
        &mut self,
        limit: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<Arc<Event>> {
        let deadline = Instant::now() + limit;
        loop {
            let delivery = tokio::time::timeout_at(deadline, self.events.next())
                .await
                .map_err(|_| anyhow::anyhow!("timed out after {limit:?}"))?;
            match delivery {
                Some(Delivery::Event(e)) => {
                    self.print(&e);
                    if want(&e) {
                        return Ok(e);
                    }
                }
                Some(Delivery::Lagged(n)) => println!("  ({n} events not shown)"),
                None => bail!("the event bus closed"),
            }
        }
    }

    /// Prints whatever is already queued.
    fn drain(&mut self) {
        while let Some(Some(Delivery::Event(e))) =
            futures_util::FutureExt::now_or_never(self.events.next())
        {
            self.print(&e);
        }
    }

    fn print(&self, e: &Event) {
        let text = match &e.kind {
            EventKind::TunnelStarting { tunnel, .. } => format!("{tunnel}: starting"),
            EventKind::TunnelUp {
                tunnel, endpoint, ..
            } => format!("{tunnel}: up at {endpoint}"),
            EventKind::TunnelDown {
                tunnel,
                reason,
                hard,
                ..
            } => format!(
                "{tunnel}: DOWN ({}) {reason}",
                if *hard { "hard" } else { "probes" }
            ),
            EventKind::TunnelRestarting {
                tunnel,
                attempt,
                delay_ms,
                ..
            } => format!("{tunnel}: restart #{attempt} in {delay_ms}ms"),
            EventKind::ProbeFailed { tunnel, reason, .. } => {
                format!("{tunnel}: probe failed: {reason}")
            }
            EventKind::ProbeRecovered { tunnel, .. } => format!("{tunnel}: probe recovered"),
            EventKind::PrimaryChanged {
                from, to, reason, ..
            } => format!(
                "PRIMARY {} → {}  ({reason})",
                from.as_deref().unwrap_or("none"),
                to.as_deref().unwrap_or("none")
            ),
            EventKind::NoHealthyTunnel { fallback, .. } => format!(
                "NO HEALTHY TUNNEL (fallback: {})",
                fallback.as_deref().unwrap_or("none")
            ),
            EventKind::ConfigReloaded { .. } => "config reloaded".into(),
            EventKind::DaemonStopping {} => "daemon stopping".into(),
            // The demo has no routers.
            other => other.type_name().replace('_', " "),
        };
        println!("  {}  #{:<3} {text}", self.stamp(), e.seq);
    }
}

/// A client that keeps exchanging lines with the service through the failover listener.
struct Client {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Client {
    fn start(address: std::net::SocketAddr) -> Client {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            // Bounded: the demo ends well within this many exchanges.
            for n in 0..100_000u64 {
                if token.is_cancelled() {
                    break;
                }
                let exchange = async {
                    let mut s = tokio::net::TcpStream::connect(address).await?;
                    let line = format!("hello {n}\n");
                    s.write_all(line.as_bytes()).await?;
                    let mut back = vec![0u8; line.len()];
                    s.read_exact(&mut back).await?;
                    Ok::<bool, std::io::Error>(back == line.as_bytes())
                };
                match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                    Ok(Ok(true)) => ok += 1,
                    _ => failed += 1,
                }
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            (ok, failed)
        });
        Client { stop, task }
    }

    /// Stops the client; returns (successful, failed) exchanges.
    async fn stop(self) -> (u64, u64) {
        self.stop.cancel();
        self.task.await.unwrap_or((0, 0))
    }
}

/// Echo server: the demo's "service".
async fn start_echo() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
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
    Ok(addr)
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        TempDir::create(&base.join(format!("tunnelkeeper-demo-{}", std::process::id())))
    }

    /// Creates `dir` itself, mode 0700. In a shared `/tmp` the name is guessable, so a
    /// directory (or symlink) someone made there first is an error, never adopted: the demo's
    /// socket and config must not live where another user can reach them.
    fn create(dir: &Path) -> anyhow::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {} (remove it if a demo crashed)", dir.display()))?;
        Ok(TempDir(dir.to_path_buf()))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_demo_directory_is_private_and_never_a_pre_made_one() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("tunnelkeeper-demo-1");
        let made = TempDir::create(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "mode {mode:o}");
        drop(made);
        assert!(!dir.exists());

        // Someone else got there first (a directory, or a symlink to theirs): refused.
        let planted = base.path().join("tunnelkeeper-demo-2");
        std::fs::create_dir(&planted).unwrap();
        let err = TempDir::create(&planted)
            .err()
            .expect("a pre-made directory was adopted");
        assert!(
            format!("{err:#}").contains("tunnelkeeper-demo-2"),
            "{err:#}"
        );
        assert!(planted.exists(), "the planted directory must be left alone");
        let link = base.path().join("tunnelkeeper-demo-3");
        std::os::unix::fs::symlink(&planted, &link).unwrap();
        assert!(TempDir::create(&link).is_err());
    }
}
