//! The SSH provider's forwards against a real OpenSSH sshd: remote (-R) and local (-L) forwards
//! carrying data intact both ways, under concurrency, with half-close, refused ports, stop, and
//! the native latency check.

mod common;
use tunnelkeeper_test_support::sshd;

use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, eventually, PATIENCE};
use sshd::Sshd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec, SshTarget};
use tunnelkeeper_providers::{Provider, ProviderError, Tunnel};

const MIB: usize = 1024 * 1024;

fn remote(target: SshTarget, bind: &str, to: &str, pool: &SshPool) -> SshProvider {
    SshProvider::new(
        SshSpec {
            target,
            forward: Forward::Remote {
                bind: bind.to_string(),
                to: to.to_string(),
            },
        },
        pool.clone(),
    )
}

fn local(target: SshTarget, to: &str, pool: &SshPool) -> SshProvider {
    SshProvider::new(
        SshSpec {
            target,
            forward: Forward::Local { to: to.to_string() },
        },
        pool.clone(),
    )
}

/// Deterministic, incompressible-looking bytes (xorshift), so a shifted or dropped chunk shows.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Writes `data` while reading, half-closes, and reads until end-of-file; returns what came
/// back. An echo server behind the stream must return exactly `data`, then close.
async fn echo_through<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sent = data.to_vec();
    let write = tokio::spawn(async move {
        writer.write_all(&sent).await.expect("write");
        // Half-close: the echo server sees end-of-file and closes its side after echoing.
        writer.shutdown().await.expect("shutdown");
        writer
    });
    let mut back = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    let _writer = write.await.expect("writer task");
    back
}

/// The server-side port of a remote tunnel (its endpoint is `127.0.0.1:PORT` here).
fn endpoint_port(tunnel: &Arc<dyn Tunnel>) -> u16 {
    let display = tunnel.endpoint().display;
    display
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("endpoint `{display}` has no port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forward_carries_a_mebibyte_both_ways() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = remote(server.target(), "127.0.0.1:0", &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start");
    let port = endpoint_port(&tunnel);
    assert_ne!(port, 0, "the server-allocated port is reported");
    assert_eq!(tunnel.endpoint().display, format!("127.0.0.1:{port}"));

    // From the outside: a plain client of the server's port, through the forward, to `to`.
    let data = payload(MIB, 1);
    let client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    assert!(
        echo_through(client, &data).await == data,
        "-R via the server port"
    );

    // dial(): server → forward → back through the session → `to`, the whole loop.
    let data = payload(MIB, 2);
    let stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert!(echo_through(stream, &data).await == data, "-R via dial()");
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_forward_carries_a_mebibyte_both_ways() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = local(server.target(), &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, echo.to_string());
    for seed in 3..5 {
        let data = payload(MIB, seed);
        let stream = tunnel.dial(PATIENCE).await.expect("dial");
        assert!(echo_through(stream, &data).await == data, "-L round trip");
    }
    tunnel.stop().await;
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forward_serves_200_concurrent_connections() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = remote(server.target(), "127.0.0.1:0", &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start");
    let port = endpoint_port(&tunnel);
    let started = Instant::now();
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            tokio::spawn(async move {
                let data = payload(4096, 100 + i);
                let client = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect");
                echo_through(client, &data).await == data
            })
        })
        .collect();
    for client in clients {
        assert!(client.await.expect("client task"), "a connection lost data");
    }
    eprintln!("-R: 200 concurrent connections in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_forward_serves_200_concurrent_dials() {
    let Some(server) = Sshd::start("MaxSessions 250").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let mut target = server.target();
    target.max_channels = 50;
    let tunnel = local(target, &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start");
    let started = Instant::now();
    // All 200 channels open at once (held until every dial is done)...
    let dials: Vec<_> = (0..200u64)
        .map(|_| {
            let tunnel = tunnel.clone();
            tokio::spawn(async move { tunnel.dial(PATIENCE).await.expect("dial") })
        })
        .collect();
    let mut streams = Vec::new();
    for dial in dials {
        streams.push(dial.await.expect("dial task"));
    }
    let dialled = started.elapsed();
    let stats = pool.stats();
    assert_eq!(stats.channels_in_use, 200, "{stats:?}");
    // 200 channels at 50 per session.
    assert!(stats.sessions >= 4, "{stats:?}");
    // ...then each carries its own data concurrently.
    let exchanges: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            tokio::spawn(async move {
                let data = payload(4096, 500 + i as u64);
                echo_through(stream, &data).await == data
            })
        })
        .collect();
    for exchange in exchanges {
        assert!(
            exchange.await.expect("exchange task"),
            "a channel lost data"
        );
    }
    let elapsed = started.elapsed();
    eprintln!(
        "-L: 200 concurrent dials in {dialled:?}, data through all in {elapsed:?}; {stats:?}"
    );
    assert!(elapsed < Duration::from_secs(60));
    assert!(stats.acquire_p50_us.is_some() && stats.acquire_p99_us.is_some());
    assert!(
        eventually(PATIENCE, || async { pool.stats().channels_in_use == 0 }).await,
        "channels are released when streams drop: {:?}",
        pool.stats()
    );
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_port_taken_is_refused_then_succeeds_once_free() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    // Something on the server already listens on the port.
    let squatter = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = squatter.local_addr().expect("addr").port();
    let bind = format!("127.0.0.1:{port}");
    let provider = remote(server.target(), &bind, &echo.to_string(), &pool);

    let err = match provider.start(&ctx()).await {
        Ok(_) => panic!("start succeeded on a taken port"),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(matches!(err, ProviderError::Ssh { .. }), "{err:?}");
    assert!(
        message.contains(&format!(
            "remote port 127.0.0.1:{port} refused by the server (still bound?)"
        )),
        "{message}"
    );

    // The port frees: the next attempt (the supervisor's retry) succeeds.
    drop(squatter);
    let tunnel = provider
        .start(&ctx())
        .await
        .expect("start after the port freed");
    assert_eq!(endpoint_port(&tunnel), port);
    let data = payload(10_000, 7);
    let client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    assert!(echo_through(client, &data).await == data);

    // stop() cancels the forward: the server no longer listens there.
    tunnel.stop().await;
    assert!(
        eventually(PATIENCE, || async {
            TcpStream::connect(("127.0.0.1", port)).await.is_err()
        })
        .await,
        "the forward was not cancelled"
    );
    // And the same port can be forwarded again at once.
    let again = provider.start(&ctx()).await.expect("start again");
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_connection_to_a_dead_target_is_refused_cleanly() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let pool = SshPool::new();
    let dead = format!("127.0.0.1:{}", tunnelkeeper_test_support::free_port());
    let tunnel = remote(server.target(), "127.0.0.1:0", &dead, &pool)
        .start(&ctx())
        .await
        .expect("start");
    let port = endpoint_port(&tunnel);
    // The server accepts, asks us, we cannot reach `to`, the channel is refused: the client
    // sees the connection closed without data.
    let mut client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, client.read_to_end(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    // The tunnel itself is fine.
    tunnel.check().await.expect("healthy");
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dial_to_a_closed_port_names_the_refusal() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let pool = SshPool::new();
    let dead = format!("127.0.0.1:{}", tunnelkeeper_test_support::free_port());
    let tunnel = local(server.target(), &dead, &pool)
        .start(&ctx())
        .await
        .expect("start");
    let err = tunnel
        .dial(PATIENCE)
        .await
        .expect_err("dial to a closed port");
    let message = err.to_string();
    assert!(
        message.contains(&format!("direct-tcpip channel to {dead}"))
            && message.contains("refused by the server (connect failed)"),
        "{message}"
    );
    // One refusal does not make the pool open more sessions.
    assert_eq!(pool.stats().sessions, 1);
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_measures_an_ssh_round_trip() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = local(server.target(), &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start");
    for _ in 0..5 {
        let health = tunnel.check().await.expect("check");
        let rtt = health.latency.expect("an RTT");
        eprintln!("ssh ping RTT: {rtt:?}");
        assert!(rtt > Duration::ZERO && rtt < PATIENCE);
    }
    tunnel.stop().await;
    assert!(tunnel.check().await.is_err());
    assert_eq!(tunnel.closed().await, "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_to_one_server_share_a_session() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let pool = SshPool::new();
    let first = local(server.target(), &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start -L");
    let second = remote(server.target(), "127.0.0.1:0", &echo.to_string(), &pool)
        .start(&ctx())
        .await
        .expect("start -R");
    let output = pool
        .exec(&server.target(), "true", PATIENCE, 1024)
        .await
        .expect("exec");
    assert_eq!(output.exit_status, Some(0));
    let stats = pool.stats();
    assert_eq!(stats.sessions, 1, "{stats:?}");
    assert_eq!(stats.opened, 1, "{stats:?}");
    assert_eq!(stats.targets.len(), 1);
    assert_eq!(stats.targets[0].tunnels, 2, "{stats:?}");
    assert_eq!(
        stats.targets[0].target,
        format!("{}@127.0.0.1:{}", sshd::current_user(), server.port)
    );
    first.stop().await;
    second.stop().await;
}
