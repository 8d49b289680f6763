//! Helpers shared by the provider integration tests: real sockets, real processes, and
//! poll-with-deadline waits instead of fixed sleeps (the tests run on loaded CI boxes).

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tunnelkeeper_providers::{Resolver, StartContext};

/// The loopback helpers every test package shares (not every test binary uses both).
#[allow(unused_imports)]
pub use tunnelkeeper_test_support::{echo_server, free_port};

/// Generous upper bound for anything that should happen "at once".
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Owned argv from string literals.
pub fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// A start context with the system resolver (tests only resolve literals and localhost).
pub fn ctx() -> StartContext {
    StartContext {
        tunnel: "t".to_string(),
        service: "svc".to_string(),
        resolver: Resolver::new(&[]).expect("resolver"),
    }
}

/// Whether a process no longer runs: gone from /proc, or a zombie nobody reaped yet (PID 1 in
/// a container does not always reap).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
    }
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `payload` to `stream` and reads the same number of bytes back.
pub async fn round_trip<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    stream: &mut S,
    payload: &[u8],
) -> Vec<u8> {
    stream.write_all(payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read echo");
    back
}
