//! `-L` throughput: a bulk transfer to a loopback sink, three ways, in turn.
//!
//! - **direct**: a plain TCP connection to the sink (the ceiling);
//! - **russh channel**: a `dial()`ed `direct-tcpip` channel of a local-forward tunnel (what the
//!   daemon's listener splices a client onto), through sshd to the sink;
//! - **`ssh -L`**: the OpenSSH client's local forward, through the same sshd to the same sink.
//!
//! The sender writes until its byte count or its time limit is reached, then half-closes; the
//! sink counts what arrives and, at end-of-file, answers with the count (8 bytes, big endian).
//! The clock stops when that answer is read, so every byte is known to have arrived.
//!
//! Loopback throughput is bound by CPU, and on a small shared machine other work moves it a
//! lot; so each transfer also records the CPU time used meanwhile by every process on the path
//! (this one — sender, sink, and for the russh route the encryption —, sshd's processes, and
//! the `ssh -L` client): CPU seconds per GB moved hardly depend on what else runs.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::SshPool;

use super::channels::local_tunnel;
use super::tools::{clock_ticks, cpu_time, with_args};
use tunnelkeeper_test_support::{try_free_port, Sshd};

/// Bytes per write.
const CHUNK: usize = 256 * 1024;
/// Extra time allowed after the sender's limit for the tail to arrive and the count to return.
const FINISH_LIMIT: Duration = Duration::from_secs(30);
/// Limit for `ssh -L` to start listening.
const FORWARD_LIMIT: Duration = Duration::from_secs(10);

/// The three routes to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Plain TCP to the sink.
    Direct,
    /// A `dial()`ed `direct-tcpip` channel.
    Russh,
    /// OpenSSH's `ssh -L` port.
    OpenSsh,
}

impl Route {
    /// Table labels.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct loopback TCP",
            Route::Russh => "russh channel (dial)",
            Route::OpenSsh => "OpenSSH `ssh -L`",
        }
    }
}

/// One transfer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    /// Bytes the sink counted.
    pub(crate) bytes: u64,
    /// From the first write to the sink's count read back.
    pub(crate) elapsed: Duration,
    /// Stopped by the time limit before the byte count.
    pub(crate) time_bound: bool,
    /// CPU time used by every process on the path during the transfer.
    pub(crate) cpu: Option<Duration>,
}

impl Transfer {
    /// Megabytes (10^6 bytes) per second.
    pub(crate) fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// CPU seconds per gigabyte (10^9 bytes) moved, all processes on the path; NaN if unknown.
    pub(crate) fn cpu_per_gb(&self) -> f64 {
        self.cpu.map_or(f64::NAN, |cpu| {
            cpu.as_secs_f64() / (self.bytes as f64 / 1e9)
        })
    }
}

/// What the throughput part measured.
pub(crate) struct Throughput {
    /// Every transfer with its route, in run order.
    pub(crate) runs: Vec<(Route, Transfer)>,
}

impl Throughput {
    /// The transfers of one route.
    pub(crate) fn of(&self, route: Route) -> Vec<Transfer> {
        self.runs
            .iter()
            .filter(|(r, _)| *r == route)
            .map(|(_, t)| *t)
            .collect()
    }
}

/// `reps` rounds of one transfer per route, each of `bytes` or `limit`, whichever comes first.
pub(crate) async fn measure(
    sshd: &Sshd,
    bytes: u64,
    limit: Duration,
    reps: u32,
) -> anyhow::Result<Throughput> {
    let sink = Sink::start().await?;
    let pool = SshPool::new();
    let tunnel = local_tunnel(&pool, sshd.target(), sink.addr, "throughput").await?;
    let forward = OpenSshForward::start(sshd, sink.addr).await?;
    let mut data = vec![0u8; CHUNK];
    // Incompressible, in case a compressing cipher suite is ever negotiated.
    rand::rng().fill_bytes(&mut data);
    let ticks = clock_ticks();
    let path_cpu = || -> Option<Duration> {
        let mut pids = sshd.descendants();
        pids.extend(forward.child.id());
        let others = pids
            .iter()
            .map(|pid| cpu_time(Some(*pid), ticks).unwrap_or_default());
        Some(cpu_time(None, ticks)? + others.sum::<Duration>())
    };
    let mut runs = Vec::new();
    for round in 0..reps {
        for route in [Route::Direct, Route::Russh, Route::OpenSsh] {
            let cpu_before = path_cpu();
            let transfer = match route {
                Route::Direct => {
                    let stream = TcpStream::connect(sink.addr)
                        .await
                        .context("connecting to the sink")?;
                    send(stream, &data, bytes, limit).await
                }
                Route::Russh => {
                    let stream = tunnel
                        .dial(Duration::from_secs(10))
                        .await
                        .context("dialling the sink through the tunnel")?;
                    send(stream, &data, bytes, limit).await
                }
                Route::OpenSsh => {
                    let stream = TcpStream::connect(forward.addr)
                        .await
                        .context("connecting to ssh -L's port")?;
                    send(stream, &data, bytes, limit).await
                }
            }
            .with_context(|| format!("{} transfer, round {}", route.label(), round + 1))?;
            let cpu = path_cpu()
                .zip(cpu_before)
                .map(|(after, before)| after.saturating_sub(before));
            let transfer = Transfer { cpu, ..transfer };
            println!(
                "   round {} {:<22} {:>8.1} MB/s  {:>5.2} CPU-s/GB  ({} MiB in {}{})",
                round + 1,
                route.label(),
                transfer.mb_per_s(),
                transfer.cpu_per_gb(),
                transfer.bytes / (1024 * 1024),
                crate::common::fmt_d(transfer.elapsed),
                if transfer.time_bound {
                    ", time-bounded"
                } else {
                    ""
                }
            );
            runs.push((route, transfer));
        }
    }
    tunnel.stop().await;
    forward.stop().await;
    Ok(Throughput { runs })
}

/// Writes `data` over and over until `bytes` or `limit`, half-closes, and reads the sink's
/// count.
async fn send<S>(
    mut stream: S,
    data: &[u8],
    bytes: u64,
    limit: Duration,
) -> anyhow::Result<Transfer>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let stop_sending = started + limit;
    let give_up = stop_sending + FINISH_LIMIT;
    let mut sent: u64 = 0;
    while sent < bytes && Instant::now() < stop_sending {
        let n = usize::try_from(bytes - sent)
            .unwrap_or(usize::MAX)
            .min(data.len());
        tokio::time::timeout_at(give_up, stream.write_all(&data[..n]))
            .await
            .context("a write stalled")?
            .context("writing")?;
        sent += n as u64;
    }
    let time_bound = sent < bytes;
    let mut count = [0u8; 8];
    tokio::time::timeout_at(give_up, async {
        stream.shutdown().await?;
        stream.read_exact(&mut count).await
    })
    .await
    .context("the sink's count did not come back")?
    .context("half-closing and reading the sink's count")?;
    let elapsed = started.elapsed();
    let received = u64::from_be_bytes(count);
    if received != sent {
        bail!("sent {sent} bytes but the sink counted {received}");
    }
    Ok(Transfer {
        bytes: received,
        elapsed,
        time_bound,
        cpu: None,
    })
}

/// Counts what arrives on each connection and answers with the count at end-of-file.
struct Sink {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Sink {
    /// Starts it on `127.0.0.1:0`.
    async fn start() -> anyhow::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the sink on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("reading the sink's address")?;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; CHUNK];
                    let mut total: u64 = 0;
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = stream.write_all(&total.to_be_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Sink { addr, task })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `ssh -N -L 127.0.0.1:PORT:SINK`, held as our child process.
struct OpenSshForward {
    addr: SocketAddr,
    child: Child,
}

impl OpenSshForward {
    /// Starts the forward and waits until its port accepts connections.
    async fn start(sshd: &Sshd, sink: SocketAddr) -> anyhow::Result<OpenSshForward> {
        let port = try_free_port().context("finding a free loopback port")?;
        let spec = format!("127.0.0.1:{port}:{}:{}", sink.ip(), sink.port());
        let args: Vec<OsString> = with_args(
            &sshd.client_args(),
            ["-N", "-o", "ExitOnForwardFailure=yes", "-L", spec.as_str()],
        );
        let args = with_args(&args, [sshd.destination()]);
        let mut child = tokio::process::Command::new("ssh")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning ssh -L")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + FORWARD_LIMIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("ssh -L exited ({status}) before listening on {addr}");
            }
            // A successful probe connection reaches the sink, which counts 0 bytes: harmless.
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(OpenSshForward { addr, child });
            }
            if Instant::now() >= deadline {
                bail!("ssh -L did not listen on {addr} within {FORWARD_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the client (its forward has no other way to end).
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
