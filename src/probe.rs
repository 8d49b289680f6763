//! Probes: is a tunnel carrying traffic end to end, and how fast?
//!
//! A probe dials the service *through the tunnel's own* [`Tunnel::dial`], optionally writes
//! `send`, and requires the reply (or the banner) to start with `expect`. A TCP connect alone
//! proves little: a hung relay still completes handshakes from the kernel backlog, so only a
//! reply catches a blackhole. Extra checks (`tcp`, `http`, `exec`, `dns`) must pass too. The whole
//! probe is bounded by a timeout: `timeout`, or the adaptive one [`schedule`] derives from the
//! tunnel's round trip, with when the next probe runs.
//!
//! [`Counter`] turns single results into up/down transitions (`rise`/`fall`), and [`Ewma`]
//! smooths the measured latency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tunnelkeeper_providers::process::{self, RunSpec};
use tunnelkeeper_providers::{Resolver, Tunnel};

use crate::config::spec::{ExtraCheck, ProbeSpec};
use crate::http_client;

pub mod schedule;

/// Runs one probe of `tunnel` within `spec.timeout`; returns the end-to-end latency or why it
/// failed.
pub async fn probe(
    tunnel: &dyn Tunnel,
    spec: &ProbeSpec,
    resolver: &Resolver,
    tag: &str,
) -> Result<Duration, String> {
    probe_within(tunnel, spec, spec.timeout, resolver, tag)
        .await
        .map_err(|f| f.reason)
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// For people: what failed, or what hung.
    pub reason: String,
    /// Whether it ran out of time (rather than getting an error or a wrong reply): only this
    /// says anything about the round trip (see [`schedule::RttEstimator::timed_out`]).
    pub timed_out: bool,
}

/// Runs one probe of `tunnel`, the whole of it (dial, exchange, checks) bounded by `timeout`
/// rather than `spec.timeout` (the supervisor adapts it to the tunnel's round trip).
pub async fn probe_within(
    tunnel: &dyn Tunnel,
    spec: &ProbeSpec,
    timeout: Duration,
    resolver: &Resolver,
    tag: &str,
) -> Result<Duration, ProbeFailure> {
    let started = Instant::now();
    let deadline = started + timeout;
    // Which step is running (0: the end-to-end dial, i + 1: checks[i]), so that a timeout can
    // say what hung. An atomic keeps the future Send.
    let step = AtomicUsize::new(0);
    let work = async {
        let latency = end_to_end(tunnel, spec, timeout, started).await?;
        for (i, check) in spec.checks.iter().enumerate() {
            step.store(i + 1, Ordering::Relaxed);
            let left = deadline.saturating_duration_since(Instant::now());
            extra_check(check, resolver, left, tag).await?;
        }
        Ok(latency)
    };
    match tokio::time::timeout_at(deadline, work).await {
        // A dial that gave up on its own timer (a connect into a blackhole) ran out of time too.
        Ok(result) => result.map_err(|reason| ProbeFailure {
            reason,
            timed_out: Instant::now() >= deadline,
        }),
        Err(_) => {
            let during = match step.load(Ordering::Relaxed) {
                0 => "the end-to-end exchange".to_string(),
                n => spec
                    .checks
                    .get(n - 1)
                    .map(describe)
                    .unwrap_or_else(|| "a check".into()),
            };
            Err(ProbeFailure {
                reason: format!(
                    "probe timed out after {} (during {during})",
                    fmt_ms(timeout)
                ),
                timed_out: true,
            })
        }
    }
}

/// A short name for a check, for messages.
fn describe(check: &ExtraCheck) -> String {
    match check {
        ExtraCheck::Tcp(t) => format!("tcp {t}"),
        ExtraCheck::Http { url, .. } => format!("http {url}"),
        ExtraCheck::Exec(argv) => format!("exec {}", argv.join(" ")),
        ExtraCheck::Dns(name) => format!("dns {name}"),
    }
}

async fn end_to_end(
    tunnel: &dyn Tunnel,
    spec: &ProbeSpec,
    timeout: Duration,
    started: Instant,
) -> Result<Duration, String> {
    let mut stream = tunnel.dial(timeout).await.map_err(|e| e.to_string())?;
    if let Some(send) = &spec.send {
        stream
            .write_all(send)
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    if let Some(expect) = &spec.expect {
        let mut got = Vec::with_capacity(expect.len());
        let mut buf = [0u8; 512];
        while got.len() < expect.len() {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "connection closed after {} of {} expected bytes",
                    got.len(),
                    expect.len()
                ));
            }
            got.extend_from_slice(&buf[..n]);
            let common = got.len().min(expect.len());
            if got[..common] != expect[..common] {
                return Err(format!(
                    "unexpected reply {:?} (expected {:?})",
                    String::from_utf8_lossy(&got[..common]),
                    String::from_utf8_lossy(expect)
                ));
            }
        }
    }
    let latency = started.elapsed();
    // Closing politely matters: some services log abrupt resets as errors.
    let _ = stream.shutdown().await;
    Ok(latency)
}

async fn extra_check(
    check: &ExtraCheck,
    resolver: &Resolver,
    left: Duration,
    tag: &str,
) -> Result<(), String> {
    match check {
        ExtraCheck::Tcp(target) => {
            let addr = resolver
                .resolve_socket(target, left)
                .await
                .map_err(|e| format!("tcp {target}: {e}"))?;
            tunnelkeeper_providers::dial_tcp(addr, left)
                .await
                .map(drop)
                .map_err(|e| format!("tcp {target}: {e}"))
        }
        ExtraCheck::Http { url, status } => {
            let got = http_client::get_url(url, resolver, left)
                .await
                .map_err(|e| format!("http {url}: {e:#}"))?;
            let ok = match status {
                Some(want) => got == *want,
                None => (200..300).contains(&got),
            };
            if ok {
                Ok(())
            } else {
                Err(format!("http {url}: status {got}"))
            }
        }
        ExtraCheck::Exec(argv) => {
            let out = process::run(RunSpec {
                argv: argv.clone(),
                env: Vec::new(),
                stdin: None,
                timeout: left,
                output_cap: 4096,
                tag: tag.to_string(),
            })
            .await
            .map_err(|e| format!("exec {}: {e}", argv.join(" ")))?;
            if out.timed_out {
                Err(format!("exec {}: timed out", argv.join(" ")))
            } else if out.status.success() {
                Ok(())
            } else {
                Err(format!("exec {}: {}", argv.join(" "), out.status))
            }
        }
        ExtraCheck::Dns(name) => resolver
            .lookup_ip(name, left)
            .await
            .map(drop)
            .map_err(|e| format!("dns {name}: {e}")),
    }
}

/// A change of a tunnel's probe verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `rise` consecutive successes.
    Up,
    /// `fall` consecutive failures.
    Down,
}

/// Counts consecutive results into up/down transitions.
#[derive(Debug, Clone)]
pub struct Counter {
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
    up: bool,
}

impl Counter {
    /// A counter that starts down: a new tunnel must prove itself `rise` times.
    pub fn new(rise: u32, fall: u32) -> Counter {
        Counter {
            rise: rise.max(1),
            fall: fall.max(1),
            successes: 0,
            failures: 0,
            up: false,
        }
    }

    /// Whether the verdict is currently up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records one result; returns the transition it caused, if any.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= self.rise {
                self.up = true;
                return Some(Transition::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.fall {
                self.up = false;
                return Some(Transition::Down);
            }
        }
        None
    }

    /// Forces the verdict down (a hard signal) and restarts counting.
    pub fn reset(&mut self) {
        self.up = false;
        self.successes = 0;
        self.failures = 0;
    }
}

/// Exponentially weighted moving average of latency samples.
#[derive(Debug, Clone, Default)]
pub struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    /// Weight of a new sample: high enough that a real shift shows within a few probes, low
    /// enough that one slow probe does not trip `max_latency`.
    pub const ALPHA: f64 = 0.3;

    /// Adds a sample and returns the smoothed value.
    pub fn add(&mut self, sample: Duration) -> Duration {
        let s = sample.as_secs_f64();
        let v = match self.value {
            Some(v) => v + Self::ALPHA * (s - v),
            None => s,
        };
        self.value = Some(v);
        Duration::from_secs_f64(v)
    }

    /// The smoothed value, if any sample was added.
    pub fn get(&self) -> Option<Duration> {
        self.value.map(Duration::from_secs_f64)
    }

    /// Forgets all samples (a restarted tunnel may take another path).
    pub fn clear(&mut self) {
        self.value = None;
    }
}

/// Formats a duration as milliseconds for messages.
pub fn fmt_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_needs_rise_successes_and_fall_failures() {
        let mut c = Counter::new(2, 3);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::Up));
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None, "a success breaks the failure streak");
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Transition::Down));
        assert_eq!(c.record(false), None, "no repeated down");
        assert!(!c.is_up());
    }

    #[test]
    fn counter_reset_forces_down_and_requires_rise_again() {
        let mut c = Counter::new(2, 1);
        c.record(true);
        c.record(true);
        c.reset();
        assert!(!c.is_up());
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::Up));
    }

    #[test]
    fn ewma_smooths_and_tracks_shifts() {
        let mut e = Ewma::default();
        assert_eq!(e.get(), None);
        assert_eq!(e.add(Duration::from_millis(10)), Duration::from_millis(10));
        let v = e.add(Duration::from_millis(110));
        assert!((v.as_secs_f64() - 0.040).abs() < 1e-9, "{v:?}");
        for _ in 0..30 {
            e.add(Duration::from_millis(110));
        }
        assert!((e.get().unwrap().as_secs_f64() - 0.110).abs() < 1e-3);
        e.clear();
        assert_eq!(e.get(), None);
    }
}
