//! Memory per idle pooled session, with one idle OpenSSH client connection as the anchor.
//!
//! The pool opens a session only when the open ones are full, so N idle sessions come from a
//! target with `max_channels: 1`: N dials held at once need N sessions; dropping the dials
//! leaves N idle sessions (they close only after `idle_timeout`, set far beyond the bench).
//! This process's `VmRSS` and `RssAnon` are read before and after each step; the growth divided
//! by the sessions added is the cost of one idle session. sshd's side (the processes it forked
//! for those connections) is read the same way. Runs first, before the other parts have grown
//! the heap, so that freed-but-kept allocator memory does not hide the growth.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::SshPool;

use super::channels::{local_tunnel, wait_drained};
use super::tools::{with_args, Memory};
use tunnelkeeper_test_support::Sshd;

/// Limit for one dial (sessions are opened one at a time, so the last waits for all).
const DIAL_LIMIT: Duration = Duration::from_secs(120);
/// Pause after a step before reading memory (sessions closing their channels, tasks settling).
const SETTLE: Duration = Duration::from_millis(500);
/// Limit for the `ssh -N` anchor to log in.
const ANCHOR_LIMIT: Duration = Duration::from_secs(10);

/// Memory after one step.
pub(crate) struct Step {
    /// Open (idle) sessions in the pool.
    pub(crate) sessions: usize,
    /// This process.
    pub(crate) own: Memory,
    /// sshd's processes (listener excluded).
    pub(crate) server: Memory,
    /// How many processes sshd had forked.
    pub(crate) server_processes: usize,
}

/// What the memory part measured.
pub(crate) struct MemoryReport {
    /// Baseline (one session open and used once), then each step.
    pub(crate) steps: Vec<Step>,
    /// One idle `ssh -N` client process, logged in.
    pub(crate) ssh_client: Option<Memory>,
}

impl MemoryReport {
    /// KiB per session between consecutive steps: (own RSS, own anon, sshd RSS, sshd anon).
    pub(crate) fn per_session(&self) -> Vec<(usize, usize, [f64; 4])> {
        self.steps
            .windows(2)
            .filter(|pair| pair[1].sessions > pair[0].sessions)
            .map(|pair| {
                let (a, b) = (&pair[0], &pair[1]);
                let added = (b.sessions - a.sessions) as f64;
                let delta = |x: u64, y: u64| (y as f64 - x as f64) / added;
                (
                    a.sessions,
                    b.sessions,
                    [
                        delta(a.own.rss, b.own.rss),
                        delta(a.own.anon, b.own.anon),
                        delta(a.server.rss, b.server.rss),
                        delta(a.server.anon, b.server.anon),
                    ],
                )
            })
            .collect()
    }
}

/// Grows the pool to each total in `totals` (idle sessions) and reads memory after each step.
pub(crate) async fn measure(
    sshd: &Sshd,
    echo: SocketAddr,
    totals: &[usize],
) -> anyhow::Result<MemoryReport> {
    let pool = SshPool::new();
    let mut target = sshd.target();
    target.max_channels = 1;
    // Measures the cost per session: as many as dials held (no `max_sessions` cap).
    target.max_sessions = 0;
    target.idle_timeout = Duration::from_secs(3600);
    target.max_age = Duration::from_secs(7200);
    let tunnel = local_tunnel(&pool, target, echo, "memory").await?;
    // The baseline has one session that has carried a channel, so one-time costs (the first
    // channel, lazily built tables) are in it rather than in the per-session growth.
    drop(tunnel.dial(DIAL_LIMIT).await.context("first dial")?);
    wait_drained(&pool).await?;
    let mut steps = vec![read_step(&pool, sshd).await?];
    for &total in totals {
        let mut dials = JoinSet::new();
        for _ in 0..total {
            let tunnel = tunnel.clone();
            dials.spawn(async move { tunnel.dial(DIAL_LIMIT).await });
        }
        let mut held = Vec::with_capacity(total);
        while let Some(joined) = dials.join_next().await {
            held.push(
                joined
                    .context("a dial task failed")?
                    .context("dial for an idle session")?,
            );
        }
        drop(held);
        wait_drained(&pool).await?;
        let step = read_step(&pool, sshd).await?;
        println!(
            "   {:>4} idle sessions: own VmRSS {} KiB (RssAnon {}), sshd {} processes VmRSS {} KiB (RssAnon {})",
            step.sessions,
            step.own.rss,
            step.own.anon,
            step.server_processes,
            step.server.rss,
            step.server.anon
        );
        steps.push(step);
    }
    tunnel.stop().await;
    drop(pool);
    let ssh_client = match ssh_anchor(sshd).await {
        Ok(memory) => Some(memory),
        Err(err) => {
            println!("   idle `ssh -N` anchor not measured: {err:#}");
            None
        }
    };
    Ok(MemoryReport { steps, ssh_client })
}

/// Reads both sides' memory after letting the step settle.
async fn read_step(pool: &SshPool, sshd: &Sshd) -> anyhow::Result<Step> {
    tokio::time::sleep(SETTLE).await;
    let server_pids = sshd.descendants();
    Ok(Step {
        sessions: pool.stats().sessions,
        own: Memory::of_self()?,
        server: Memory::sum(&server_pids),
        server_processes: server_pids.len(),
    })
}

/// The memory of one idle, logged-in `ssh -N` process.
async fn ssh_anchor(sshd: &Sshd) -> anyhow::Result<Memory> {
    let args: Vec<OsString> = with_args(&sshd.client_args(), ["-v", "-N"]);
    let args = with_args(&args, [sshd.destination()]);
    let mut child = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning ssh -N")?;
    let stderr = child.stderr.take().context("ssh -N has no stderr pipe")?;
    let mut lines = BufReader::new(stderr).lines();
    // `-v` logs "Authenticated to HOST" once logged in: from then on the process is idle.
    let deadline = Instant::now() + ANCHOR_LIMIT;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("ssh -N did not log in in time")?
            .context("reading ssh -N's log")?;
        match line {
            Some(line) if line.starts_with("Authenticated to") => break,
            Some(_) => {}
            None => bail!("ssh -N exited before logging in"),
        }
    }
    // Keep reading its log, so the pipe never fills while we wait.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    tokio::time::sleep(SETTLE).await;
    let pid = child.id().context("ssh -N exited")?;
    let memory = Memory::of_pid(pid);
    let _ = child.start_kill();
    let _ = child.wait().await;
    drain.abort();
    memory
}
