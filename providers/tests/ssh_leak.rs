//! No per-channel growth on long-lived sessions, against a real OpenSSH sshd: after thousands
//! of probe-style channels (open, one round trip, drop — the client closes first), the entries
//! the client keeps per channel, ours and russh's, are back to the channels still open. Sessions
//! that carry a remote forward (never recycled while the tunnel runs) are covered the same way.
//!
//! russh 0.65.1 kept every channel the client closed first in its session's table (about 5 KB
//! each); the fix is in vendor/russh. Its table is mirrored by `TargetStats::ssh_channels`
//! (russh calls our `channel_close` exactly when it drops an entry).

mod common;
use tunnelkeeper_test_support::sshd;

use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, eventually, round_trip, PATIENCE};
use sshd::Sshd;
use tokio::net::TcpStream;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec, TargetStats};
use tunnelkeeper_providers::{Provider, Tunnel};

const PROBES: usize = 2000;

fn only_target(pool: &SshPool) -> TargetStats {
    let stats = pool.stats();
    assert_eq!(stats.targets.len(), 1, "{stats:?}");
    stats.targets[0].clone()
}

/// Waits until every per-channel entry is gone again (no channel is in use after the probes).
async fn assert_back_to_open(pool: &SshPool) {
    let flat = eventually(Duration::from_secs(20), || async {
        let t = only_target(pool);
        t.channels == 0 && t.tracked_channels == 0 && t.ssh_channels == 0
    })
    .await;
    let t = only_target(pool);
    assert!(
        flat,
        "channel entries left behind after {PROBES} probes: {t:?}"
    );
    assert_eq!(t.sessions, 1, "all probes rode one session: {t:?}");
}

async fn start(spec: SshSpec, pool: &SshPool) -> Arc<dyn Tunnel> {
    SshProvider::new(spec, pool.clone())
        .start(&ctx())
        .await
        .expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_local_probe_channels_leave_nothing_behind() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = start(
        SshSpec {
            target: server.target(),
            forward: Forward::Local {
                to: echo.to_string(),
            },
        },
        &pool,
    )
    .await;
    for i in 0..PROBES {
        let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
        let message = format!("probe {i}");
        assert_eq!(
            round_trip(&mut stream, message.as_bytes()).await,
            message.as_bytes()
        );
        // Dropped with the channel still open: the client closes first, as probes do.
    }
    assert_back_to_open(&pool).await;
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_carrying_a_remote_forward_stays_flat() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = start(
        SshSpec {
            target: server.target(),
            forward: Forward::Remote {
                bind: "127.0.0.1:0".to_string(),
                to: echo.to_string(),
            },
        },
        &pool,
    )
    .await;
    let display = tunnel.endpoint().display;
    let port: u16 = display
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("endpoint port");
    for i in 0..PROBES {
        let message = format!("probe {i}");
        if i % 2 == 0 {
            // The probe path: a direct-tcpip channel to the server's port, which comes back as
            // a forwarded-tcpip channel on the same session.
            let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
            assert_eq!(
                round_trip(&mut stream, message.as_bytes()).await,
                message.as_bytes()
            );
        } else {
            // A client of the server's port, as users reach a reverse tunnel.
            let mut client = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            assert_eq!(
                round_trip(&mut client, message.as_bytes()).await,
                message.as_bytes()
            );
        }
    }
    assert_back_to_open(&pool).await;
    let t = only_target(&pool);
    assert_eq!(t.tunnels, 1, "the forward still holds its session: {t:?}");
    tunnel.stop().await;
}
