//! The hard signal: when the SSH server dies (listener and every session process SIGKILLed),
//! every tunnel on the lost session resolves `closed()` at once, and once the server is back
//! a new start succeeds and the pool counts the new session as a reconnect.

mod common;
use tunnelkeeper_test_support::sshd;

use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, eventually, gone, PATIENCE};
use sshd::Sshd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec};
use tunnelkeeper_providers::{Provider, ProviderError, Tunnel};

/// What "promptly" means for the hard signal (the daemon fails over on it).
const HARD_SIGNAL: Duration = Duration::from_secs(1);

fn provider(server: &Sshd, forward: Forward, pool: &SshPool) -> SshProvider {
    SshProvider::new(
        SshSpec {
            target: server.target(),
            forward,
        },
        pool.clone(),
    )
}

async fn closed_within(tunnel: &Arc<dyn Tunnel>, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let reason = tokio::time::timeout(limit, tunnel.closed())
        .await
        .unwrap_or_else(|_| panic!("closed() did not resolve within {limit:?}"));
    (reason, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_closes_every_tunnel_at_once_and_reconnects_after() {
    let Some(mut server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let remote_forward = Forward::Remote {
        bind: "127.0.0.1:0".to_string(),
        to: echo.to_string(),
    };
    let local_forward = Forward::Local {
        to: echo.to_string(),
    };
    let remote = provider(&server, remote_forward.clone(), &pool)
        .start(&ctx())
        .await
        .expect("start -R");
    let local = provider(&server, local_forward.clone(), &pool)
        .start(&ctx())
        .await
        .expect("start -L");
    // A stream in flight through the local tunnel.
    let mut stream = local.dial(PATIENCE).await.expect("dial");
    stream.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.expect("echo");
    assert_eq!(pool.stats().sessions, 1);
    let before = pool.stats();

    let session_processes = server.descendants();
    assert!(
        !session_processes.is_empty(),
        "sshd forked no session process?"
    );
    let watchers = [remote.clone(), local.clone()]
        .map(|tunnel| tokio::spawn(async move { closed_within(&tunnel, PATIENCE).await }));
    // Give the watchers a moment to be waiting before the server vanishes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed_at = Instant::now();
    server.kill();
    for watcher in watchers {
        let (reason, _) = watcher.await.expect("watcher");
        let elapsed = killed_at.elapsed();
        eprintln!("closed() after {elapsed:?}: {reason}");
        assert!(elapsed < HARD_SIGNAL, "closed() took {elapsed:?}");
        assert!(reason.contains("lost"), "{reason}");
    }
    // The kernel tears the killed session processes down on its own schedule (on a loaded
    // machine, after the client has already seen the connection end).
    let all_gone = || {
        let pids = session_processes.clone();
        async move { pids.iter().all(|pid| gone(*pid)) }
    };
    assert!(
        eventually(PATIENCE, all_gone).await,
        "sshd session processes left"
    );
    // The stream in flight ends too (end-of-file or an error), it does not hang.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "stream hung after the session died");
    // The dead tunnels say so.
    assert!(matches!(
        local.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
    assert!(matches!(
        remote.check().await,
        Err(ProviderError::Closed(_))
    ));
    assert!(
        eventually(PATIENCE, || async { pool.stats().sessions == 0 }).await,
        "{:?}",
        pool.stats()
    );

    // While the server is down, a start fails with a reason (the supervisor backs off).
    let err = match provider(&server, local_forward.clone(), &pool)
        .start(&ctx())
        .await
    {
        Ok(_) => panic!("start succeeded with the server down"),
        Err(err) => err,
    };
    eprintln!("start with the server down: {err}");

    // The server comes back: a new start works, on a new session counted as a reconnect.
    server.restart().await;
    let remote_again = provider(&server, remote_forward, &pool)
        .start(&ctx())
        .await
        .expect("start -R after restart");
    let local_again = provider(&server, local_forward, &pool)
        .start(&ctx())
        .await
        .expect("start -L after restart");
    let mut stream = local_again
        .dial(PATIENCE)
        .await
        .expect("dial after restart");
    stream.write_all(b"back").await.expect("write");
    stream.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"back");
    let after = pool.stats();
    assert_eq!(after.reconnects, before.reconnects + 1, "{after:?}");
    assert_eq!(after.opened, before.opened + 1, "{after:?}");
    assert!(after.closed > before.closed, "{after:?}");
    remote_again.stop().await;
    local_again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_death_ends_remote_forward_bridges() {
    let Some(mut server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let remote = provider(
        &server,
        Forward::Remote {
            bind: "127.0.0.1:0".to_string(),
            to: echo.to_string(),
        },
        &pool,
    )
    .start(&ctx())
    .await
    .expect("start");
    // A client through the forward holds a bridge open.
    let port: u16 = remote
        .endpoint()
        .display
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port");
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    client.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    client.read_exact(&mut one).await.expect("echo");
    assert_eq!(pool.stats().channels_in_use, 1);
    server.kill();
    let (_, elapsed) = closed_within(&remote, PATIENCE).await;
    assert!(elapsed < HARD_SIGNAL);
    // The bridge task let go of its channel slot; the stats show nothing in use.
    assert!(
        eventually(PATIENCE, || async { pool.stats().channels_in_use == 0 }).await,
        "{:?}",
        pool.stats()
    );
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_is_detected_by_keepalives() {
    let Some(mut server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.keepalive_interval = Duration::from_millis(300);
    target.keepalive_max = 2;
    let tunnel = SshProvider::new(
        SshSpec {
            target,
            forward: Forward::Local {
                to: echo.to_string(),
            },
        },
        pool.clone(),
    )
    .start(&ctx())
    .await
    .expect("start");
    // A server that stops answering without closing anything (a partition, a hung box): no
    // FIN, no RST, only silence.
    let mut frozen = server.descendants();
    frozen.extend(server.pid());
    for pid in &frozen {
        signal(*pid, nix::sys::signal::Signal::SIGSTOP);
    }
    let (reason, elapsed) = closed_within(&tunnel, PATIENCE).await;
    eprintln!("frozen server detected after {elapsed:?}: {reason}");
    // Two unanswered keepalives 300 ms apart, plus scheduling slack on a loaded box.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        reason.contains("keepalive") || reason.contains("nothing received"),
        "{reason}"
    );
    for pid in &frozen {
        signal(*pid, nix::sys::signal::Signal::SIGCONT);
    }
    server.kill();
    tunnel.stop().await;
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}
