//! Adaptive probing against the real daemon binary at its DEFAULT probe settings (interval 1 s,
//! timeout 1 s, fall 3, and the adaptive `fast_interval`, `down_interval`, `min_timeout`):
//!
//! - paths whose latency jitters never go down: one relay adds 0–150 ms of random delay to
//!   every chunk in each direction (a round trip of 0–300 ms), another 300 ms plus 0–200 ms (a
//!   satellite or congested LTE link: 600–1000 ms a round trip, against the 1 s ceiling). The
//!   window is 60 s here; `TK_JITTER_SECS=600` makes it the issue's ten minutes (run once and
//!   recorded in docs/BENCHMARKS.md);
//! - a silent failure of a fast path is still confirmed quickly: a frozen relay (SIGSTOP) is
//!   down well inside 2 s, where fixed 1 s probes needed at least 3 s.
//!
//! Everything runs on 127.0.0.1; the relays are tokio tasks of this test, the daemon the real
//! binary.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The delay a relay adds to each chunk: `base` plus a uniformly random part of `jitter`.
#[derive(Debug, Clone, Copy)]
struct Delay {
    base: Duration,
    jitter: Duration,
}

impl Delay {
    fn draw(self) -> Duration {
        self.base + self.jitter.mul_f64(rand::rng().random::<f64>())
    }
}

/// A relay on 127.0.0.1 to `to` that holds every chunk for a fresh [`Delay::draw`] in each
/// direction, keeping the byte order (a chunk never overtakes the one before, like a queue on
/// a link). Returns its address and the count of chunks it delayed.
async fn jitter_relay(to: SocketAddr, delay: Delay) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let chunks = Arc::new(AtomicU64::new(0));
    let count = chunks.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::join!(
                    delayed_copy(cr, uw, delay, chunks.clone()),
                    delayed_copy(ur, cw, delay, chunks),
                );
            });
        }
    });
    (addr, count)
}

/// Copies `from` to `to`, each chunk held until its due time (never before the last one's).
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Delay,
    chunks: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut last_due = tokio::time::Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    last_due = last_due.max(tokio::time::Instant::now() + delay.draw());
                    chunks.fetch_add(1, Ordering::Relaxed);
                    if tx.send((last_due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// How long the jittery paths are watched: 60 s, or `TK_JITTER_SECS`.
fn window() -> Duration {
    let secs = std::env::var("TK_JITTER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jittery_paths_never_go_down_at_the_default_settings() {
    let echo = echo_server().await;
    let (lossy, lossy_chunks) = jitter_relay(
        echo,
        Delay {
            base: ms(0),
            jitter: ms(150),
        },
    )
    .await;
    let (satellite, satellite_chunks) = jitter_relay(
        echo,
        Delay {
            base: ms(300),
            jitter: ms(200),
        },
    )
    .await;
    // Only `send`/`expect` are set: every timing is the built-in default.
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ send: "ping\n", expect: "ping" }}
services:
  - name: jitter
    tunnels:
      - {{ name: lossy, provider: direct, priority: 10, address: "{lossy}" }}
      - {{ name: satellite, provider: direct, priority: 20, address: "{satellite}" }}
"#
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events.wait_up(&["lossy", "satellite"]).await;

    let window = window();
    eprintln!("watching both jittery paths for {window:?}");
    // A window of time is what is being tested here, not a condition to wait for.
    tokio::time::sleep(window).await;
    let journal = daemon.journal().await;
    eprintln!(
        "{} probe_failed event(s): {:#?}",
        of_type(&journal, "probe_failed").len(),
        of_type(&journal, "probe_failed")
    );
    assert_eq!(
        of_type(&journal, "tunnel_down"),
        Vec::<String>::new(),
        "false failovers"
    );
    assert_eq!(of_type(&journal, "tunnel_up").len(), 2, "{journal:#?}");

    // The probes did cross the relays, and the smoothed latencies show the delays.
    let status = daemon.status().await;
    let tunnels = &status.services[0].tunnels;
    let latency = |name: &str| {
        tunnels
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.latency_ms)
            .unwrap_or_else(|| panic!("{name} has no latency: {tunnels:?}"))
    };
    eprintln!(
        "smoothed latency: lossy {:.0} ms, satellite {:.0} ms; chunks delayed {} / {}",
        latency("lossy"),
        latency("satellite"),
        lossy_chunks.load(Ordering::Relaxed),
        satellite_chunks.load(Ordering::Relaxed)
    );
    assert!(latency("satellite") >= 590.0, "{tunnels:?}");
    let probes = window.as_secs() * 2 * 9 / 10;
    assert!(lossy_chunks.load(Ordering::Relaxed) >= probes);
    assert!(satellite_chunks.load(Ordering::Relaxed) >= probes);
    assert!(tunnels
        .iter()
        .all(|t| t.state == tunnelkeeper::status::TunnelState::Up));
    let exit = daemon.terminate();
    assert!(exit.success(), "{exit:?}\n{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_fast_path_is_down_within_two_seconds_at_the_default_settings() {
    let echo = echo_server().await;
    let relay = env!("CARGO_BIN_EXE_tunnelkeeper");
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ send: "ping\n", expect: "ping" }}
  restart: {{ when_down: 0s }}
services:
  - name: fast
    tunnels:
      - name: relay
        provider: command
        priority: 10
        run: ["{relay}", "relay", "--to", "{echo}"]
        endpoint_regex: 'relay listening at (\S+)'
        stop_grace: 1s
      - {{ name: lan, provider: direct, priority: 20, address: "{echo}" }}
"#
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events.wait_up(&["relay", "lan"]).await;
    let pid = daemon.tunnel_pid("fast", "relay").await;
    let mut took = Vec::new();
    for round in 0..3 {
        // A random phase of the probe cycle, as a real fault would land.
        let phase = ms(rand::rng().random_range(0..1000));
        tokio::time::sleep(phase).await;
        let stopped = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        let (at, down) = events
            .wait(
                Duration::from_secs(10),
                "relay down",
                tunnel_event("tunnel_down", "relay"),
            )
            .await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGCONT,
        )
        .unwrap();
        let elapsed = at - stopped;
        eprintln!("round {round}: down after {elapsed:?}: {}", down["reason"]);
        // The round-trip timeout (200 ms, a little more when a loaded box slows loopback),
        // not the 1 s ceiling.
        let reason = down["reason"].as_str().unwrap_or_default();
        let timeout_ms: u64 = reason
            .split("timed out after ")
            .nth(1)
            .and_then(|rest| rest.split("ms").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a probe timeout: {down}"));
        assert!((200..500).contains(&timeout_ms), "{down}");
        took.push(elapsed);
        events
            .wait(
                Duration::from_secs(20),
                "relay up again",
                tunnel_event("tunnel_up", "relay"),
            )
            .await;
    }
    // Arithmetic: worst 1 s + 200 ms + 2 × 200 ms = 1.6 s, plus the event's way to this test;
    // fixed 1 s probes could not do better than 3 s.
    for elapsed in &took {
        assert!(*elapsed < ms(2500), "{took:?}");
    }
    let exit = daemon.terminate();
    assert!(exit.success(), "{exit:?}\n{}", daemon.log());
}
