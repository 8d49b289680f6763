//! The SSH provider against a real dropbear (Debian `dropbear-bin`, the server of OpenWrt and
//! most routers), started by the tests on loopback with throwaway keys in a private mount
//! namespace (see `tunnelkeeper_test_support::dropbear`): `-L` and `-R` forwards, exec with
//! output and exit status, a frozen server noticed by keepalives, and the leak check of issue
//! 13 (dropbear closes channels in its own order).
//!
//! Differences from OpenSSH found here (docs/DESIGN.md): dropbear reads the login user's
//! `~/.ssh/authorized_keys` only (no `AuthorizedKeysFile`); it answers keepalives
//! (`keepalive@openssh.com` global requests) with a failure, which still counts as an answer.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, eventually, round_trip, PATIENCE};
use tokio::net::TcpStream;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec, SshTarget};
use tunnelkeeper_providers::{Provider, Tunnel};
use tunnelkeeper_test_support::dropbear::Dropbear;

async fn start(target: SshTarget, forward: Forward, pool: &SshPool) -> Arc<dyn Tunnel> {
    SshProvider::new(SshSpec { target, forward }, pool.clone())
        .start(&ctx())
        .await
        .expect("start")
}

fn endpoint_port(tunnel: &Arc<dyn Tunnel>) -> u16 {
    let display = tunnel.endpoint().display;
    display
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("endpoint `{display}` has no port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_forwards_and_exec_work_against_dropbear() {
    let Some(server) = Dropbear::start().await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();

    let local = start(
        server.target(),
        Forward::Local {
            to: echo.to_string(),
        },
        &pool,
    )
    .await;
    let mut stream = local.dial(PATIENCE).await.expect("-L dial");
    assert_eq!(round_trip(&mut stream, b"through -L").await, b"through -L");
    drop(stream);

    let remote = start(
        server.target(),
        Forward::Remote {
            bind: "127.0.0.1:0".to_string(),
            to: echo.to_string(),
        },
        &pool,
    )
    .await;
    let port = endpoint_port(&remote);
    assert_ne!(port, 0, "dropbear reports the port it picked");
    let mut client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to dropbear's forwarded port");
    assert_eq!(round_trip(&mut client, b"through -R").await, b"through -R");
    drop(client);
    let mut stream = remote.dial(PATIENCE).await.expect("-R dial");
    assert_eq!(round_trip(&mut stream, b"-R dial").await, b"-R dial");
    drop(stream);

    let output = pool
        .exec(
            &server.target(),
            "echo out; echo err >&2; exit 4",
            PATIENCE,
            1024,
        )
        .await
        .expect("exec");
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.exit_status, Some(4));
    let boot_id = pool
        .exec(
            &server.target(),
            "cat /proc/sys/kernel/random/boot_id",
            PATIENCE,
            1024,
        )
        .await
        .expect("boot id");
    assert_eq!(String::from_utf8_lossy(&boot_id.stdout).trim().len(), 36);

    // Many probe channels, then nothing left behind (dropbear's close order differs).
    for i in 0..300 {
        let mut stream = local.dial(PATIENCE).await.expect("dial");
        let message = format!("probe {i}");
        assert_eq!(
            round_trip(&mut stream, message.as_bytes()).await,
            message.as_bytes()
        );
    }
    let flat = eventually(Duration::from_secs(20), || async {
        let stats = pool.stats();
        stats
            .targets
            .iter()
            .all(|t| t.channels == 0 && t.tracked_channels == 0 && t.ssh_channels == 0)
    })
    .await;
    assert!(flat, "{:?}", pool.stats());
    local.stop().await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_dropbear_is_noticed_by_keepalives() {
    let Some(server) = Dropbear::start().await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.keepalive_interval = Duration::from_millis(500);
    target.keepalive_max = 2;
    let tunnel = start(
        target,
        Forward::Local {
            to: echo.to_string(),
        },
        &pool,
    )
    .await;
    // Keepalives are answered while it runs (dropbear replies with a failure, which counts).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(10), tunnel.closed())
            .await
            .is_err(),
        "the session survives answered keepalives"
    );
    server.freeze(true);
    let started = tokio::time::Instant::now();
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed() resolves once keepalives go unanswered");
    server.freeze(false);
    eprintln!(
        "frozen dropbear noticed after {:?}: {reason}",
        started.elapsed()
    );
    assert!(
        reason.contains("keepalive") || reason.contains("nothing received"),
        "{reason}"
    );
}
