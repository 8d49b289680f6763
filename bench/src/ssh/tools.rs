//! What the SSH bench measures with besides the pool: one OpenSSH client command run with a
//! time limit, and a process's memory and CPU time read from `/proc`. The server itself is the
//! shared test harness (`tunnelkeeper_test_support::Sshd`).

use std::ffi::OsString;
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    /// `VmRSS`: every resident page, shared library pages included.
    pub(crate) rss: u64,
    /// `RssAnon`: resident anonymous pages (heap, stacks): what the process itself allocated.
    pub(crate) anon: u64,
}

impl Memory {
    /// The memory of this process.
    pub(crate) fn of_self() -> anyhow::Result<Memory> {
        Memory::read("/proc/self/status")
    }

    /// The memory of process `pid`.
    pub(crate) fn of_pid(pid: u32) -> anyhow::Result<Memory> {
        Memory::read(&format!("/proc/{pid}/status"))
    }

    /// Parses `VmRSS` and `RssAnon` from a `/proc/.../status` file.
    fn read(path: &str) -> anyhow::Result<Memory> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            anon: field("RssAnon:")?,
        })
    }

    /// The summed memory of several processes (those that vanished meanwhile are skipped).
    pub(crate) fn sum(pids: &[u32]) -> Memory {
        pids.iter()
            .filter_map(|pid| Memory::of_pid(*pid).ok())
            .fold(Memory::default(), |total, m| Memory {
                rss: total.rss + m.rss,
                anon: total.anon + m.anon,
            })
    }
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/PID/stat`
/// (`None`: this process). `None` when the process is gone.
pub(crate) fn cpu_time(pid: Option<u32>, ticks_per_second: u64) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = fs::read_to_string(path).ok()?;
    // `pid (comm) state ppid ...`: utime and stime are fields 14 and 15, i.e. the 12th and
    // 13th after the closing parenthesis (comm may contain spaces and parentheses).
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    let ticks = user + system;
    let per_second = ticks_per_second.max(1);
    Some(
        Duration::from_secs(ticks / per_second)
            + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second),
    )
}

/// The unit of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on every common Linux).
pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
pub(crate) fn open_files_limit() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .context("no `Max open files` in /proc/self/limits")?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .context("no soft limit on the `Max open files` line")?;
    Ok(soft.parse::<u64>().unwrap_or(u64::MAX))
}

/// One OpenSSH client invocation (`ssh ARGS`), its output discarded; fails with its stderr
/// when it exits non-zero, and is killed when it takes longer than `limit`.
pub(crate) async fn run_ssh(args: &[OsString], limit: Duration) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("ssh")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning ssh")?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("ssh did not finish within {limit:?}"))?
        .context("waiting for ssh")?;
    if !output.status.success() {
        bail!(
            "ssh exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `args` followed by more arguments, for building command lines.
pub(crate) fn with_args<I, S>(args: &[OsString], more: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut all = args.to_vec();
    all.extend(more.into_iter().map(Into::into));
    all
}
