//! Helpers shared by the benches: order statistics, duration formatting, a loopback echo
//! server, and a private temporary directory.

use std::net::SocketAddr;
use std::path::PathBuf;
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
