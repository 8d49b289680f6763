//! Many concurrent forwarded channels across pooled sessions.
//!
//! One local-forward tunnel ([`SshProvider`] with `Forward::Local { to: ECHO }`) on a pool
//! whose target carries at most `max_channels` channels per session. A wave opens `count`
//! `dial()`s at once (each a `direct-tcpip` channel to a loopback echo server), holds them all,
//! proves each one carries data (one echoed line), then drops them. The first wave finds one
//! session (the tunnel's) and has to open the rest; the later waves find them open. Each dial
//! is timed from the call to the stream in hand (acquire + channel open, which includes sshd
//! connecting to the echo server); the pool's own acquire percentiles (`PoolStats`) time only
//! getting a session slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::{Forward, PoolStats, SshPool, SshProvider, SshSpec, SshTarget};
use tunnelkeeper_providers::{Dial, Provider, Resolver, StartContext, Tunnel};

/// Limit for one dial (the first wave's wait for sessions being opened one at a time).
const DIAL_LIMIT: Duration = Duration::from_secs(60);
/// Limit for a whole wave (dials, echo checks).
const WAVE_LIMIT: Duration = Duration::from_secs(180);
/// Limit for one echo round trip while a wave is held.
const ECHO_LIMIT: Duration = Duration::from_secs(20);
/// Limit for the pool to see every dropped channel closed.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// One wave of concurrent dials.
pub(crate) struct Wave {
    /// `cold` or `warm N`.
    pub(crate) label: String,
    /// Per-dial latency (call to stream in hand).
    pub(crate) dials: Vec<Duration>,
    /// From the first dial started to the last one done.
    pub(crate) wall: Duration,
    /// Sessions and channels while the wave was held.
    pub(crate) held: PoolStats,
    /// Channels that echoed their line back.
    pub(crate) echoed: usize,
    /// Growth of the kernel's `ListenOverflows` counter during the wave (system-wide): SYNs
    /// dropped because a listener's accept queue was full, each costing a 1 s retransmission.
    pub(crate) listen_overflows: Option<u64>,
}

/// What the channels part measured.
pub(crate) struct Channels {
    /// Channels per wave.
    pub(crate) count: usize,
    /// `max_channels` of the target.
    pub(crate) max_channels: u32,
    /// The waves, cold first.
    pub(crate) waves: Vec<Wave>,
    /// Pool stats after the cold wave (acquisitions: the tunnel's lease and the cold wave).
    pub(crate) after_cold: PoolStats,
    /// Pool stats after the last warm wave (its acquire window, the most recent 1024
    /// acquisitions, then holds warm acquisitions only).
    pub(crate) after_warm: PoolStats,
    /// One dial at a time on the open sessions (each dropped before the next): the unloaded
    /// cost of a dial.
    pub(crate) sequential: Vec<Duration>,
}

/// A context for starting tunnels outside the daemon.
pub(crate) fn start_context(name: &str) -> anyhow::Result<StartContext> {
    Ok(StartContext {
        tunnel: name.to_string(),
        service: "bench".to_string(),
        resolver: Resolver::new(&[]).context("building a resolver")?,
    })
}

/// Starts a local-forward tunnel to `to` on `pool`.
pub(crate) async fn local_tunnel(
    pool: &SshPool,
    target: SshTarget,
    to: SocketAddr,
    name: &str,
) -> anyhow::Result<Arc<dyn Tunnel>> {
    let spec = SshSpec {
        target,
        forward: Forward::Local { to: to.to_string() },
    };
    SshProvider::new(spec, pool.clone())
        .start(&start_context(name)?)
        .await
        .with_context(|| format!("starting the ssh local forward to {to}"))
}

/// Runs one cold and `warm_waves` warm waves of `count` concurrent dials, then `sequential`
/// single dials.
pub(crate) async fn measure(
    target: SshTarget,
    echo: SocketAddr,
    count: usize,
    warm_waves: usize,
    sequential: u32,
) -> anyhow::Result<Channels> {
    let pool = SshPool::new();
    let max_channels = target.max_channels;
    let tunnel = local_tunnel(&pool, target, echo, "channels").await?;
    let mut waves = Vec::new();
    let mut after_cold = PoolStats::default();
    for index in 0..=warm_waves {
        let label = if index == 0 {
            "cold".to_string()
        } else {
            format!("warm {index}")
        };
        let wave = wave(&tunnel, &pool, count, label).await?;
        print_wave(&wave);
        waves.push(wave);
        if index == 0 {
            after_cold = pool.stats();
        }
    }
    let after_warm = pool.stats();

    let mut singles = Vec::new();
    for _ in 0..sequential {
        let started = Instant::now();
        let dial = tunnel.dial(DIAL_LIMIT).await.context("sequential dial")?;
        singles.push(started.elapsed());
        drop(dial);
    }
    tunnel.stop().await;
    Ok(Channels {
        count,
        max_channels,
        waves,
        after_cold,
        after_warm,
        sequential: singles,
    })
}

/// Opens `count` dials at once, holds them, checks each with an echo, drops them all, and
/// waits until the pool has seen them closed.
async fn wave(
    tunnel: &Arc<dyn Tunnel>,
    pool: &SshPool,
    count: usize,
    label: String,
) -> anyhow::Result<Wave> {
    let overflows_before = listen_overflows();
    let deadline = Instant::now() + WAVE_LIMIT;
    let started = Instant::now();
    let mut dials = JoinSet::new();
    for _ in 0..count {
        let tunnel = tunnel.clone();
        dials.spawn(async move {
            let started = Instant::now();
            let dial = tunnel.dial(DIAL_LIMIT).await;
            (started.elapsed(), dial)
        });
    }
    let mut latencies = Vec::with_capacity(count);
    let mut streams: Vec<Dial> = Vec::with_capacity(count);
    let mut failures = Vec::new();
    while let Some(joined) = tokio::time::timeout_at(deadline, dials.join_next())
        .await
        .with_context(|| format!("{label} wave: dials still pending after {WAVE_LIMIT:?}"))?
    {
        let (took, dial) = joined.context("a dial task failed")?;
        match dial {
            Ok(dial) => {
                latencies.push(took);
                streams.push(dial);
            }
            Err(err) => failures.push(err.to_string()),
        }
    }
    let wall = started.elapsed();
    let overflows = listen_overflows()
        .zip(overflows_before)
        .map(|(after, before)| after.saturating_sub(before));
    if !failures.is_empty() {
        bail!(
            "{label} wave: {} of {count} dials failed; first: {}",
            failures.len(),
            failures[0]
        );
    }
    let held = pool.stats();

    // Every channel carries data while all of them are open: one line each, concurrently.
    let mut checks = JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        checks.spawn(async move {
            let line = format!("{i:06}\n");
            let ok = tokio::time::timeout(ECHO_LIMIT, async {
                stream.write_all(line.as_bytes()).await?;
                let mut back = vec![0u8; line.len()];
                stream.read_exact(&mut back).await?;
                std::io::Result::Ok(back == line.as_bytes())
            })
            .await;
            (matches!(ok, Ok(Ok(true))), stream)
        });
    }
    let mut echoed = 0;
    let mut held_streams = Vec::with_capacity(count);
    while let Some(joined) = tokio::time::timeout_at(deadline, checks.join_next())
        .await
        .with_context(|| format!("{label} wave: echo checks still pending"))?
    {
        let (ok, stream) = joined.context("an echo task failed")?;
        echoed += usize::from(ok);
        held_streams.push(stream);
    }
    drop(held_streams);
    wait_drained(pool).await?;
    Ok(Wave {
        label,
        dials: latencies,
        wall,
        held,
        echoed,
        listen_overflows: overflows,
    })
}

/// The kernel's `TcpExt: ListenOverflows` counter, from `/proc/net/netstat` (a header line of
/// names followed by a line of values).
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let index = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// Waits until the pool counts no channel in use (dropped streams release their slots).
pub(crate) async fn wait_drained(pool: &SshPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let stats = pool.stats();
        if stats.channels_in_use == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} channels still counted in use {DRAIN_LIMIT:?} after being dropped",
                stats.channels_in_use
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One line per wave, as it finishes.
fn print_wave(wave: &Wave) {
    let stats = crate::common::Stats::of(wave.dials.iter().map(|d| crate::common::ms(*d)));
    println!(
        "   {:<7} {} dials in {}: p50 {}  p99 {}  max {}; held {} sessions, {} channels; {} echoed; listen overflows {}",
        wave.label,
        wave.dials.len(),
        crate::common::fmt_d(wave.wall),
        crate::common::fmt_ms(stats.p50),
        crate::common::fmt_ms(stats.p99),
        crate::common::fmt_ms(stats.max),
        wave.held.sessions,
        wave.held.channels_in_use,
        wave.echoed,
        wave.listen_overflows
            .map_or("unknown".to_string(), |n| n.to_string()),
    );
}
