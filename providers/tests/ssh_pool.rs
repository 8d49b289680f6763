//! The shared session pool against a real OpenSSH sshd: extra sessions when a server caps
//! channels (`MaxSessions`), exec with captured output, exit status and a time limit, idle and
//! aged sessions closing, and the latencies of connect, dial and exec.

mod common;
use tunnelkeeper_test_support::sshd;

use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, eventually, round_trip, PATIENCE};
use sshd::Sshd;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec, SshTarget};
use tunnelkeeper_providers::{Provider, ProviderError, Tunnel};

async fn local_tunnel(target: SshTarget, to: &str, pool: &SshPool) -> Arc<dyn Tunnel> {
    SshProvider::new(
        SshSpec {
            target,
            forward: Forward::Local { to: to.to_string() },
        },
        pool.clone(),
    )
    .start(&ctx())
    .await
    .expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_2_spreads_five_concurrent_dials_over_sessions() {
    let Some(server) = Sshd::start("MaxSessions 2").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    // The operator mirrors the server's MaxSessions in max_channels (OpenSSH does not count
    // direct-tcpip channels against MaxSessions, so the pool's own limit is what spreads them).
    let mut target = server.target();
    target.max_channels = 2;
    let tunnel = local_tunnel(target, &echo.to_string(), &pool).await;
    let dials: Vec<_> = (0..5)
        .map(|_| {
            let tunnel = tunnel.clone();
            tokio::spawn(async move { tunnel.dial(PATIENCE).await })
        })
        .collect();
    let mut streams = Vec::new();
    for dial in dials {
        streams.push(dial.await.expect("task").expect("dial"));
    }
    let stats = pool.stats();
    eprintln!("{stats:?}");
    assert!(stats.sessions >= 3, "{stats:?}");
    assert_eq!(stats.channels_in_use, 5);
    for (i, stream) in streams.iter_mut().enumerate() {
        let message = format!("stream {i}");
        assert_eq!(
            round_trip(stream, message.as_bytes()).await,
            message.as_bytes()
        );
    }
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_2_refusals_move_channels_to_new_sessions() {
    let Some(server) = Sshd::start("MaxSessions 2").await else {
        return;
    };
    let pool = SshPool::new();
    // max_channels stays at its default (10): the server's refusals are what the pool hears.
    let runs: Vec<_> = (0..5)
        .map(|i| {
            let (pool, target) = (pool.clone(), server.target());
            tokio::spawn(async move {
                pool.exec(&target, &format!("sleep 1; echo {i}"), PATIENCE, 64)
                    .await
            })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let output = run.await.expect("task").expect("exec");
        assert_eq!(output.stdout, format!("{i}\n").as_bytes());
    }
    let stats = pool.stats();
    eprintln!("{stats:?}");
    assert!(stats.sessions >= 3, "{stats:?}");
}

#[tokio::test]
async fn exec_returns_stdout_stderr_and_exit_status() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let pool = SshPool::new();
    let output = pool
        .exec(
            &server.target(),
            "echo hi; echo err >&2; exit 3",
            PATIENCE,
            1024,
        )
        .await
        .expect("exec");
    assert_eq!(output.stdout, b"hi\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.exit_status, Some(3));
    assert_eq!(output.exit_signal, None);
    assert!(!output.success());

    let output = pool
        .exec(&server.target(), "kill -TERM $$", PATIENCE, 1024)
        .await
        .expect("exec");
    assert_eq!(output.exit_status, None);
    assert_eq!(output.exit_signal.as_deref(), Some("TERM"));
}

#[tokio::test]
async fn exec_output_is_capped() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let output = SshPool::new()
        .exec(
            &server.target(),
            "head -c 300000 /dev/zero; head -c 5000 /dev/zero >&2",
            PATIENCE,
            1000,
        )
        .await
        .expect("exec");
    assert_eq!(output.stdout.len(), 1000);
    assert_eq!(output.stderr.len(), 1000);
    assert_eq!(output.exit_status, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_past_its_timeout_fails_with_a_timeout() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let pool = SshPool::new();
    let limit = Duration::from_millis(700);
    let started = Instant::now();
    let err = pool
        .exec(&server.target(), "sleep 37", limit, 1024)
        .await
        .expect_err("timeout");
    let elapsed = started.elapsed();
    assert!(matches!(err, ProviderError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("exec `sleep 37`"), "{err}");
    assert!(elapsed < limit + Duration::from_secs(2), "{elapsed:?}");
    // The remote command was sent SIGKILL. OpenSSH honours that only for non-root logins:
    // root sessions run without privilege separation and sshd refuses to signal them, so as
    // root the command runs on to its own end (documented on `SshPool::exec`).
    if sshd::current_user() != "root" {
        let sleeping = || {
            server.descendants().into_iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .map(|cmd| cmd.contains("sleep") && cmd.contains("37"))
                    .unwrap_or(false)
            })
        };
        assert!(
            eventually(PATIENCE, || async { !sleeping() }).await,
            "the remote `sleep 37` is still running; sshd log:\n{}",
            server.log()
        );
    }
    // Its channel was given back, and the session stays usable.
    assert!(
        eventually(PATIENCE, || async { pool.stats().channels_in_use == 0 }).await,
        "{:?}",
        pool.stats()
    );
    // The session is still good for the next command.
    let output = pool
        .exec(&server.target(), "echo ok", PATIENCE, 64)
        .await
        .expect("exec after a timeout");
    assert_eq!(output.stdout, b"ok\n");
}

#[tokio::test]
async fn idle_sessions_close_after_idle_timeout() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let pool = SshPool::new();
    let mut target = server.target();
    target.idle_timeout = Duration::from_millis(300);
    pool.exec(&target, "true", PATIENCE, 64)
        .await
        .expect("exec");
    assert_eq!(pool.stats().sessions, 1);
    let started = Instant::now();
    assert!(
        eventually(PATIENCE, || async { pool.stats().sessions == 0 }).await,
        "{:?}",
        pool.stats()
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "closed too early: {elapsed:?}"
    );
    let stats = pool.stats();
    assert_eq!((stats.opened, stats.closed), (1, 1), "{stats:?}");
    // Closing an idle session is not a loss: the next one is not a reconnect.
    pool.exec(&target, "true", PATIENCE, 64)
        .await
        .expect("exec");
    assert_eq!(pool.stats().reconnects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_keep_sessions_open_past_idle_timeout() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.idle_timeout = Duration::from_millis(200);
    let tunnel = local_tunnel(target, &echo.to_string(), &pool).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pool.stats().sessions, 1, "a tunnel's session is never idle");
    tunnel.check().await.expect("still healthy");
    tunnel.stop().await;
    assert!(eventually(PATIENCE, || async { pool.stats().sessions == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aged_sessions_take_no_new_work_and_close_once_idle() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.max_age = Duration::from_millis(400);
    let tunnel = local_tunnel(target, &echo.to_string(), &pool).await;
    let mut old_stream = tunnel.dial(PATIENCE).await.expect("dial");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The first session is past max_age: the next dial gets a fresh session, and the tunnel's
    // lease moves there, so the old session closes once its last channel is done.
    let mut new_stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(pool.stats().opened, 2, "{:?}", pool.stats());
    assert_eq!(round_trip(&mut old_stream, b"old").await, b"old");
    assert_eq!(round_trip(&mut new_stream, b"new").await, b"new");
    drop(old_stream);
    assert!(
        eventually(PATIENCE, || async { pool.stats().sessions == 1 }).await,
        "{:?}",
        pool.stats()
    );
    // The tunnel did not see the planned close as a failure.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tunnel.closed())
            .await
            .is_err(),
        "closed() fired for a planned session replacement"
    );
    drop(new_stream);
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_of_connect_dial_and_exec() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let started = Instant::now();
    let tunnel = local_tunnel(server.target(), &echo.to_string(), &pool).await;
    let connect = started.elapsed();

    let mut dials = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
        dials.push(started.elapsed());
        assert_eq!(round_trip(&mut stream, b"x").await, b"x");
    }
    let mut execs = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        pool.exec(&server.target(), "true", PATIENCE, 64)
            .await
            .expect("exec");
        execs.push(started.elapsed());
    }
    dials.sort();
    execs.sort();
    let stats = pool.stats();
    eprintln!(
        "TIMINGS connect+kex+auth {connect:?}; dial p50 {:?} max {:?}; exec p50 {:?} max {:?}; acquire p50 {:?}us p99 {:?}us",
        dials[dials.len() / 2],
        dials[dials.len() - 1],
        execs[execs.len() / 2],
        execs[execs.len() - 1],
        stats.acquire_p50_us,
        stats.acquire_p99_us,
    );
    assert_eq!(stats.opened, 1, "everything shared one session: {stats:?}");
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_bounds_sessions_and_queues_dials_first_come_first_served() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.max_channels = 5;
    target.max_sessions = 2;
    let tunnel = local_tunnel(target, &echo.to_string(), &pool).await;

    // 40 connections at once, each held for 1.5 s: 10 fit (2 sessions × 5 channels), the rest
    // queue; a dial waits at most 1 s, so some of those get in as the first ones finish... or
    // not, and then they must fail naming the limit. Nothing may hang.
    const CONNECTIONS: usize = 40;
    const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
    const HOLD: Duration = Duration::from_millis(1500);
    let most_sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watching = tokio::spawn({
        let (pool, most) = (pool.clone(), most_sessions.clone());
        async move {
            loop {
                most.fetch_max(pool.stats().sessions, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let connections: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let tunnel = tunnel.clone();
            tokio::spawn(async move {
                let mut stream = tunnel.dial(DIAL_TIMEOUT).await?;
                let message = format!("connection {i}");
                assert_eq!(
                    round_trip(&mut stream, message.as_bytes()).await,
                    message.as_bytes()
                );
                tokio::time::sleep(HOLD).await;
                Ok::<_, ProviderError>(())
            })
        })
        .collect();
    let everything = async {
        let mut results = Vec::new();
        for connection in connections {
            results.push(connection.await.expect("task"));
        }
        results
    };
    let results = tokio::time::timeout(Duration::from_secs(60), everything)
        .await
        .expect("every connection was served or refused: nothing hung");
    watching.abort();
    let served = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    for error in &refused {
        assert!(
            error.contains("ssh.max_sessions") && error.contains("the 2 sessions"),
            "refused with another error: {error}"
        );
    }
    eprintln!(
        "served {served}, refused {}, stats {:?}",
        refused.len(),
        pool.stats()
    );
    assert!(served >= 10, "at least the first 10 fit");
    assert!(
        !refused.is_empty(),
        "the 1 s queue wait must run out for some"
    );
    assert!(
        most_sessions.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "never more than 2 sessions"
    );
    // At the server too: every session ever opened logged in once.
    let logins = server.log().matches("Accepted publickey").count();
    assert!(logins <= 2, "sshd saw {logins} logins");
    let stats = pool.stats();
    let t = &stats.targets[0];
    assert_eq!(t.max_sessions, 2);
    assert!(t.queued_total >= 30, "{t:?}");
    assert_eq!(t.queue_timeouts as usize, refused.len(), "{t:?}");
    assert_eq!(t.queued, 0, "{t:?}");
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_dials_are_served_in_arrival_order() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.max_channels = 1;
    target.max_sessions = 1;
    let tunnel = local_tunnel(target, &echo.to_string(), &pool).await;
    let first = tunnel.dial(PATIENCE).await.expect("first dial");
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for i in 0..5 {
        let (tunnel, order) = (tunnel.clone(), order.clone());
        waiting.push(tokio::spawn(async move {
            let stream = tunnel.dial(PATIENCE).await.expect("queued dial");
            order.lock().expect("order").push(i);
            // Hold briefly so the next one really has to wait for this one.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(stream);
        }));
        // Each joins the queue before the next one starts.
        assert!(
            eventually(PATIENCE, || async { pool.stats().queued == i + 1 }).await,
            "{:?}",
            pool.stats()
        );
    }
    let stats = pool.stats();
    assert!(stats.targets[0].queued_wait_ms.is_some(), "{stats:?}");
    drop(first);
    for task in waiting {
        task.await.expect("task");
    }
    assert_eq!(*order.lock().expect("order"), vec![0, 1, 2, 3, 4]);
    assert_eq!(pool.stats().sessions, 1);
    tunnel.stop().await;
}
