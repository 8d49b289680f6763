//! Command latency: `true` run over SSH three ways, side by side against one sshd.
//!
//! - **pooled**: [`SshPool::exec`] on the pool's already open session (one `session` channel
//!   per command, as router recovery does);
//! - **fresh `ssh`**: one OpenSSH client process per command (TCP, key exchange, login, command);
//! - **ControlMaster**: one `ssh -M -S SOCK -N` master started once, then `ssh -S SOCK ... true`
//!   per command (a client process that hands the command to the master over a Unix socket).
//!
//! The methods take turns within each round, in an order that rotates from round to round, so
//! a burst of load on the machine hits all three alike instead of skewing one block of runs.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Child;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::SshPool;

use super::tools::{run_ssh, with_args, Memory};
use tunnelkeeper_test_support::Sshd;

/// Limit for one command, whichever way it runs.
const COMMAND_LIMIT: Duration = Duration::from_secs(10);
/// Limit for the ControlMaster to come up (and to go away at the end).
const MASTER_LIMIT: Duration = Duration::from_secs(10);
/// Output kept per pooled command (`true` prints nothing).
const OUTPUT_CAP: usize = 4096;
/// Untimed runs per method first: the pool's session, the master's, the page cache for `ssh`.
const WARMUP: u32 = 3;

/// The three ways of running a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// [`SshPool::exec`] on an open session.
    Pooled,
    /// A new `ssh` process and connection per command.
    Fresh,
    /// `ssh -S SOCK` through a running ControlMaster.
    Master,
}

impl Method {
    /// Table labels.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Method::Pooled => "pooled exec (SshPool::exec)",
            Method::Fresh => "fresh `ssh` per command",
            Method::Master => "ControlMaster (`ssh -S`)",
        }
    }
}

/// What the latency part measured.
pub(crate) struct Latency {
    /// Per-command latencies of each method, in run order.
    pub(crate) pooled: Vec<Duration>,
    /// See [`Method::Fresh`].
    pub(crate) fresh: Vec<Duration>,
    /// See [`Method::Master`].
    pub(crate) master: Vec<Duration>,
    /// The ControlMaster process's memory after all its commands (an anchor for the memory
    /// part: one OpenSSH connection held open).
    pub(crate) master_memory: Option<Memory>,
    /// Rounds skipped because the time limit ran out (0 normally).
    pub(crate) cut_short: u32,
}

impl Latency {
    /// The samples of one method.
    pub(crate) fn samples(&self, method: Method) -> &[Duration] {
        match method {
            Method::Pooled => &self.pooled,
            Method::Fresh => &self.fresh,
            Method::Master => &self.master,
        }
    }
}

/// Runs `runs` rounds (each method once per round), within `limit` overall.
pub(crate) async fn measure(
    sshd: &Sshd,
    dir: &Path,
    runs: u32,
    limit: Duration,
) -> anyhow::Result<Latency> {
    let pool = SshPool::new();
    let target = sshd.target();
    let args = sshd.client_args();
    let destination = sshd.destination();
    let fresh_args = with_args(&args, [destination.as_str(), "true"]);

    let socket = dir.join("cm.sock");
    let mut master = Master::start(&args, &destination, &socket).await?;
    let master_args = with_args(
        &args,
        [OsString::from("-S"), socket.clone().into_os_string()],
    );
    let master_args = with_args(&master_args, [destination.as_str(), "true"]);

    let run = |method: Method| {
        let (pool, target) = (pool.clone(), target.clone());
        let (fresh_args, master_args) = (fresh_args.clone(), master_args.clone());
        async move {
            let started = Instant::now();
            match method {
                Method::Pooled => {
                    let output = pool
                        .exec(&target, "true", COMMAND_LIMIT, OUTPUT_CAP)
                        .await
                        .context("pooled exec of `true`")?;
                    if !output.success() {
                        bail!("pooled exec of `true` did not succeed: {output:?}");
                    }
                }
                Method::Fresh => run_ssh(&fresh_args, COMMAND_LIMIT)
                    .await
                    .context("fresh `ssh ... true`")?,
                Method::Master => run_ssh(&master_args, COMMAND_LIMIT)
                    .await
                    .context("`ssh -S SOCK ... true`")?,
            }
            anyhow::Ok(started.elapsed())
        }
    };

    for method in [Method::Pooled, Method::Fresh, Method::Master] {
        for _ in 0..WARMUP {
            run(method).await.context("warm-up")?;
        }
    }

    let mut latency = Latency {
        pooled: Vec::new(),
        fresh: Vec::new(),
        master: Vec::new(),
        master_memory: None,
        cut_short: 0,
    };
    let deadline = Instant::now() + limit;
    let orders = [
        [Method::Pooled, Method::Fresh, Method::Master],
        [Method::Fresh, Method::Master, Method::Pooled],
        [Method::Master, Method::Pooled, Method::Fresh],
    ];
    for round in 0..runs {
        if Instant::now() >= deadline {
            latency.cut_short = runs - round;
            println!(
                "   time limit reached after {round} rounds; {} skipped",
                latency.cut_short
            );
            break;
        }
        for method in orders[round as usize % orders.len()] {
            let took = run(method).await?;
            match method {
                Method::Pooled => latency.pooled.push(took),
                Method::Fresh => latency.fresh.push(took),
                Method::Master => {
                    // A vanished master would make `ssh -S` quietly fall back to a fresh
                    // connection, and the figure would be that of the wrong method.
                    master.check_alive()?;
                    latency.master.push(took);
                }
            }
        }
        if (round + 1) % 50 == 0 && round + 1 < runs {
            println!("   {} of {runs} rounds done", round + 1);
        }
    }
    latency.master_memory = master.child.id().and_then(|pid| Memory::of_pid(pid).ok());
    master.stop(&args, &destination, &socket).await;
    Ok(latency)
}

/// The OpenSSH ControlMaster, held as our child process.
struct Master {
    child: Child,
}

impl Master {
    /// Starts `ssh -M -S SOCK -N` and waits until `ssh -O check` answers. It stays in the
    /// foreground as our child (rather than `-f`, which forks it away) so that it is killed on
    /// every way out of the bench; the master process and what it does are the same.
    async fn start(args: &[OsString], destination: &str, socket: &Path) -> anyhow::Result<Master> {
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(args)
            .args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
            .arg(socket)
            .arg(destination)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut master = Master {
            child: command.spawn().context("spawning the ssh ControlMaster")?,
        };
        let check = with_args(args, [OsString::from("-S"), socket.as_os_str().to_owned()]);
        let check = with_args(&check, ["-O", "check", destination]);
        let deadline = Instant::now() + MASTER_LIMIT;
        loop {
            master.check_alive()?;
            if run_ssh(&check, MASTER_LIMIT).await.is_ok() {
                return Ok(master);
            }
            if Instant::now() >= deadline {
                bail!("the ssh ControlMaster did not come up within {MASTER_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails once the master has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("the ssh ControlMaster exited ({status})"),
            Err(err) => Err(err).context("checking on the ssh ControlMaster"),
        }
    }

    /// Asks the master to exit (`-O exit`), and kills it if it does not.
    async fn stop(mut self, args: &[OsString], destination: &str, socket: &Path) {
        let exit = with_args(args, [OsString::from("-S"), socket.as_os_str().to_owned()]);
        let exit = with_args(&exit, ["-O", "exit", destination]);
        let _ = run_ssh(&exit, MASTER_LIMIT).await;
        if tokio::time::timeout(MASTER_LIMIT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}
