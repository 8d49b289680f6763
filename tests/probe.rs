//! Integration tests of [`tunnelkeeper::probe::probe`] against real loopback servers, dialled
//! through a real `direct` tunnel: send/expect (echo, banner, chunked reply, early close,
//! blackhole), dial failures, every extra check (`tcp`, `http`, `exec`, `dns`), the rule that all
//! checks must pass, and [`Counter`] fed by real probe results.
//!
//! Everything runs on 127.0.0.1 with servers started by the test itself. Timeouts are generous
//! wherever timing is not the point, so the tests hold on a loaded two-core machine; where
//! timing *is* the point (blackhole, exec timeout) the bounds are wide on the upper side.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnelkeeper::config::spec::{ExtraCheck, ProbeSpec};
use tunnelkeeper::probe::{probe, probe_within, Counter, Transition};
use tunnelkeeper_providers::direct::{DirectProvider, DirectSpec};
use tunnelkeeper_providers::{Provider, Resolver, StartContext, Tunnel};

/// Where timing is not the point: long enough that a slow CI box never trips it.
const GENEROUS: Duration = Duration::from_secs(5);

/// A probe spec with only the timeout set; tests add send/expect/checks.
fn spec(timeout: Duration) -> ProbeSpec {
    ProbeSpec {
        interval: Duration::from_secs(1),
        timeout,
        rise: 1,
        fall: 1,
        fast_interval: Duration::from_millis(100),
        down_interval: Duration::from_secs(1),
        min_timeout: Duration::from_millis(200),
        send: None,
        expect: None,
        checks: Vec::new(),
    }
}

/// `spec` with `send: "ping\n"` and `expect: "ping"`, the usual echo probe.
fn ping_spec(timeout: Duration) -> ProbeSpec {
    ProbeSpec {
        send: Some(b"ping\n".to_vec()),
        expect: Some(b"ping".to_vec()),
        ..spec(timeout)
    }
}

/// The system resolver: IP literals and `localhost` need no network.
fn resolver() -> Resolver {
    Resolver::new(&[]).expect("system resolver")
}

/// A real `direct` tunnel to `addr`, started the way the supervisor starts it.
async fn direct(addr: SocketAddr, resolver: &Resolver) -> Arc<dyn Tunnel> {
    DirectProvider::new(DirectSpec {
        address: addr.to_string(),
    })
    .start(&StartContext {
        tunnel: "t".to_string(),
        service: "s".to_string(),
        resolver: resolver.clone(),
    })
    .await
    .expect("a direct tunnel to a literal address starts")
}

/// A loopback port nothing listens on (bound a moment ago, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads from `s` until `want` bytes arrived or EOF. Reading the whole request before closing
/// matters: closing a socket with unread data sends RST instead of FIN.
async fn read_at_least(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < want {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// Starts a server that runs `handle` on every accepted connection; returns its address and
/// the accept task (abort it to close the listening socket).
async fn serve<F, Fut>(handle: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(handle(s));
        }
    });
    (addr, task)
}

/// An echo server.
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve(|mut s| async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// A server that writes `banner` on accept, then waits for the client to close.
async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    serve(move |mut s| async move {
        let _ = s.write_all(banner).await;
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .0
}

/// A tiny HTTP/1.1 server answering every request with `status`; records each request head.
async fn http_server(status: u16) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let (addr, _) = serve(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let reason = if status == 200 {
                "OK"
            } else {
                "Internal Server Error"
            };
            let reply = format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n");
            let _ = s.write_all(reply.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    (addr, heads)
}

/// Runs one probe of a fresh `direct` tunnel to `addr`, timing it.
async fn probe_once(
    addr: SocketAddr,
    spec: &ProbeSpec,
    resolver: &Resolver,
) -> (Result<Duration, String>, Duration) {
    let tunnel = direct(addr, resolver).await;
    let started = Instant::now();
    let result = bounded_probe(tunnel.as_ref(), spec, resolver).await;
    (result, started.elapsed())
}

/// [`probe`], with a watchdog: a probe that fails to bound itself fails the test instead of
/// hanging it.
async fn bounded_probe(
    tunnel: &dyn Tunnel,
    spec: &ProbeSpec,
    resolver: &Resolver,
) -> Result<Duration, String> {
    let watchdog = spec.timeout * 3 + Duration::from_secs(5);
    tokio::time::timeout(watchdog, probe(tunnel, spec, resolver, "test"))
        .await
        .unwrap_or_else(|_| panic!("the probe ran past {watchdog:?}: not bounded by its timeout"))
}

fn err_of(result: Result<Duration, String>) -> String {
    match result {
        Ok(latency) => panic!("expected the probe to fail, it passed in {latency:?}"),
        Err(e) => e,
    }
}

// ---- send / expect ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_expect_against_an_echo_server_measures_latency() {
    let (addr, _) = echo_server().await;
    let spec = ping_spec(GENEROUS);
    let (result, _) = probe_once(addr, &spec, &resolver()).await;
    let latency = result.expect("echo answers ping");
    assert!(latency > Duration::ZERO, "{latency:?}");
    assert!(latency < spec.timeout, "{latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_alone_accepts_a_matching_banner() {
    let addr = banner_server(b"SSH-2.0-test\r\n").await;
    let spec = ProbeSpec {
        expect: Some(b"SSH-2.0".to_vec()),
        ..spec(GENEROUS)
    };
    let (result, _) = probe_once(addr, &spec, &resolver()).await;
    result.expect("an SSH banner matches SSH-2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_alone_rejects_a_wrong_banner() {
    let addr = banner_server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    let spec = ProbeSpec {
        expect: Some(b"SSH-2.0".to_vec()),
        ..spec(GENEROUS)
    };
    let (result, elapsed) = probe_once(addr, &spec, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains("unexpected reply"), "{err}");
    assert!(
        err.contains("HTTP/1"),
        "the message shows what came back: {err}"
    );
    // A mismatch is decided on the first bytes, not by waiting for the timeout.
    assert!(elapsed < spec.timeout, "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_in_small_chunks_still_matches() {
    // Two writes 20ms apart on a NODELAY socket arrive as two reads: a probe that decided on
    // the first read alone would fail here.
    let (addr, _) = serve(|mut s| async move {
        read_at_least(&mut s, 5).await;
        let _ = s.write_all(b"pi").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = s.write_all(b"ng").await;
        read_at_least(&mut s, usize::MAX).await;
    })
    .await;
    let (result, _) = probe_once(addr, &ping_spec(GENEROUS), &resolver()).await;
    result.expect("pi + ng is ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_reply_that_diverges_later_fails() {
    // The prefix matches, the second chunk does not: every chunk must be compared.
    let (addr, _) = serve(|mut s| async move {
        read_at_least(&mut s, 5).await;
        let _ = s.write_all(b"pi").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = s.write_all(b"xx").await;
        read_at_least(&mut s, usize::MAX).await;
    })
    .await;
    let (result, _) = probe_once(addr, &ping_spec(GENEROUS), &resolver()).await;
    let err = err_of(result);
    assert!(err.contains("unexpected reply"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_without_replying_fails() {
    // It reads the request first, so the close is a clean FIN rather than a reset.
    let (addr, _) = serve(|mut s| async move {
        read_at_least(&mut s, 5).await;
    })
    .await;
    let spec = ping_spec(GENEROUS);
    let (result, elapsed) = probe_once(addr, &spec, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains("closed"), "{err}");
    assert!(elapsed < spec.timeout, "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_is_caught_only_by_expect_at_the_timeout() {
    // Bound with a backlog but never accepting: the kernel completes the handshake, like a
    // hung relay, so the dial succeeds and only the missing reply gives it away.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blackhole.local_addr().unwrap();
    let resolver = resolver();
    let timeout = Duration::from_millis(300);

    // Without expect the probe cannot tell: connect and send both succeed.
    let send_only = ProbeSpec {
        send: Some(b"ping\n".to_vec()),
        ..spec(timeout)
    };
    let (result, _) = probe_once(addr, &send_only, &resolver).await;
    result.expect("the kernel backlog accepts the connection");

    let (result, elapsed) = probe_once(addr, &ping_spec(timeout), &resolver).await;
    let err = err_of(result);
    assert!(err.contains("timed out"), "{err}");
    assert!(elapsed >= timeout.mul_f64(0.9), "{elapsed:?}");
    assert!(elapsed < timeout * 3, "{elapsed:?}");
    drop(blackhole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_timeout_bounds_the_probe_and_only_a_timeout_says_so() {
    // The supervisor hands `probe_within` the timeout it derived from the round trip; that
    // one, not `spec.timeout`, bounds the probe, and the failure says it ran out of time (the
    // estimator backs off only then).
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blackhole.local_addr().unwrap();
    let resolver = resolver();
    let tunnel = direct(addr, &resolver).await;
    let spec = ping_spec(GENEROUS);
    let adaptive = Duration::from_millis(200);
    let started = Instant::now();
    let failure = probe_within(tunnel.as_ref(), &spec, adaptive, &resolver, "test")
        .await
        .expect_err("a blackhole never answers");
    let elapsed = started.elapsed();
    assert!(failure.timed_out, "{failure:?}");
    assert!(
        failure.reason.contains("timed out after 200ms"),
        "{failure:?}"
    );
    assert!(elapsed >= adaptive.mul_f64(0.9), "{elapsed:?}");
    assert!(
        elapsed < spec.timeout / 2,
        "bounded by 200ms, not 5s: {elapsed:?}"
    );
    drop(blackhole);

    // A refused dial is an error, not a timeout.
    let closed: SocketAddr = ([127, 0, 0, 1], closed_port()).into();
    let tunnel = direct(closed, &resolver).await;
    let failure = probe_within(tunnel.as_ref(), &spec, adaptive, &resolver, "test")
        .await
        .expect_err("nothing listens");
    assert!(!failure.timed_out, "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_a_closed_port_fails_fast() {
    let addr: SocketAddr = ([127, 0, 0, 1], closed_port()).into();
    let spec = ping_spec(GENEROUS);
    let (result, elapsed) = probe_once(addr, &spec, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains(&addr.to_string()), "{err}");
    // Refused at once, not waited out.
    assert!(elapsed < spec.timeout / 2, "{elapsed:?}");
}

// ---- extra checks ----

/// Probes an echo server with `checks` (so the end-to-end part passes) and returns the result.
async fn probe_with_checks(
    checks: Vec<ExtraCheck>,
    timeout: Duration,
    resolver: &Resolver,
) -> (Result<Duration, String>, Duration) {
    let (addr, _) = echo_server().await;
    let spec = ProbeSpec {
        checks,
        ..ping_spec(timeout)
    };
    probe_once(addr, &spec, resolver).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_passes_on_a_listening_port() {
    let (target, _) = echo_server().await;
    let (result, _) = probe_with_checks(
        vec![ExtraCheck::Tcp(target.to_string())],
        GENEROUS,
        &resolver(),
    )
    .await;
    result.expect("the tcp target listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_fails_on_a_closed_port_naming_the_target() {
    let target = format!("127.0.0.1:{}", closed_port());
    let (result, _) =
        probe_with_checks(vec![ExtraCheck::Tcp(target.clone())], GENEROUS, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains(&format!("tcp {target}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_passes_on_200_and_sends_a_get() {
    let (server, heads) = http_server(200).await;
    let url = format!("http://{server}/health");
    let check = ExtraCheck::Http { url, status: None };
    let (result, _) = probe_with_checks(vec![check], GENEROUS, &resolver()).await;
    result.expect("200 is a 2xx");
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("GET /health HTTP/1.1\r\n"),
        "{heads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_fails_on_500_with_the_status_in_the_message() {
    let (server, _) = http_server(500).await;
    let url = format!("http://{server}/health");
    let check = ExtraCheck::Http {
        url: url.clone(),
        status: None,
    };
    let (result, _) = probe_with_checks(vec![check], GENEROUS, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("status 500"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_passes_on_500_when_500_is_expected() {
    let (server, _) = http_server(500).await;
    let check = ExtraCheck::Http {
        url: format!("http://{server}/health"),
        status: Some(500),
    };
    let (result, _) = probe_with_checks(vec![check], GENEROUS, &resolver()).await;
    result.expect("500 is the expected status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_expecting_500_fails_on_200() {
    // An explicit status is exact, not "any 2xx or that".
    let (server, _) = http_server(200).await;
    let check = ExtraCheck::Http {
        url: format!("http://{server}/"),
        status: Some(500),
    };
    let (result, _) = probe_with_checks(vec![check], GENEROUS, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains("status 200"), "{err}");
}

fn exec(argv: &[&str]) -> ExtraCheck {
    ExtraCheck::Exec(argv.iter().map(|s| s.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_check_true_passes() {
    let (result, _) = probe_with_checks(vec![exec(&["true"])], GENEROUS, &resolver()).await;
    result.expect("true exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_check_false_fails_with_its_exit_status() {
    let (result, _) = probe_with_checks(vec![exec(&["false"])], GENEROUS, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains("exec false"), "{err}");
    assert!(err.contains("exited with status 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_check_that_hangs_fails_at_the_probe_timeout() {
    let timeout = Duration::from_millis(500);
    let (result, elapsed) =
        probe_with_checks(vec![exec(&["sleep", "5"])], timeout, &resolver()).await;
    let err = err_of(result);
    assert!(err.contains("timed out"), "{err}");
    // Whichever timer fires first, the message names what hung.
    assert!(err.contains("exec sleep 5"), "{err}");
    // Bounded by the probe's timeout, not by the command's own five seconds.
    assert!(elapsed >= timeout.mul_f64(0.9), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // And the command is killed, not left running (no other test here runs `sleep`).
    let deadline = Instant::now() + Duration::from_secs(3);
    while !running_children("sleep").is_empty() {
        assert!(
            Instant::now() < deadline,
            "sleep still running: {:?}",
            running_children("sleep")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pids of this process's children named `comm` that are still running (not zombies).
fn running_children(comm: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split at the last `)`.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, n)| n);
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if name == comm && ppid == Some(me.as_str()) && state != Some("Z") {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_check_resolves_localhost() {
    let check = ExtraCheck::Dns("localhost".to_string());
    let (result, _) = probe_with_checks(vec![check], GENEROUS, &resolver()).await;
    result.expect("localhost resolves offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_check_fails_with_a_dead_nameserver() {
    // A port that was free a moment ago: queries to it are refused (or time out).
    let dead_addr: SocketAddr = {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.local_addr().unwrap()
    };
    let dead = Resolver::with_nameserver_addrs(&[dead_addr])
        .expect("a resolver with an explicit nameserver builds");

    // The same resolver passes without the check (the tunnel's address is a literal), so the
    // failures below are the dns check's own.
    let (result, _) = probe_with_checks(Vec::new(), GENEROUS, &dead).await;
    result.expect("no dns check, no query");

    // `.invalid` is answered NXDOMAIN by the resolver itself (RFC 6761), without a query.
    let check = ExtraCheck::Dns("nonexistent.invalid".to_string());
    let (result, _) = probe_with_checks(vec![check], GENEROUS, &dead).await;
    let err = err_of(result);
    assert!(err.contains("dns nonexistent.invalid"), "{err}");

    // An ordinary name does go to the nameserver. The dead one never answers (refusals of
    // unconnected UDP go unnoticed), so the lookup runs into the probe's timeout: a short one
    // here, since a failure is the expected outcome either way.
    let name = "tunnelkeeper-probe-test.example.com";
    let timeout = Duration::from_secs(1);
    let check = ExtraCheck::Dns(name.to_string());
    let (result, elapsed) = probe_with_checks(vec![check], timeout, &dead).await;
    let err = err_of(result);
    // The dns check's own timeout and the probe's fire together; either may report it.
    assert!(
        err.contains(&format!("dns {name}")) || err.contains("probe timed out"),
        "{err}"
    );
    assert!(elapsed < timeout * 3, "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_check_fails_the_probe_even_when_the_rest_pass() {
    let (target, _) = echo_server().await;
    let (http, _) = http_server(200).await;
    let passing = vec![
        ExtraCheck::Tcp(target.to_string()),
        ExtraCheck::Http {
            url: format!("http://{http}/"),
            status: None,
        },
        exec(&["true"]),
        ExtraCheck::Dns("localhost".to_string()),
    ];
    let resolver = resolver();

    // Control: all of them together pass, with send/expect passing too.
    let (result, _) = probe_with_checks(passing.clone(), GENEROUS, &resolver).await;
    result.expect("every check passes");

    // One failing check in the middle fails the whole probe.
    let mut checks = passing;
    checks.insert(2, exec(&["false"]));
    let (result, _) = probe_with_checks(checks, GENEROUS, &resolver).await;
    let err = err_of(result);
    assert!(err.contains("exec false"), "{err}");
}

// ---- Counter fed by real probes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_goes_down_after_fall_real_failures() {
    let (addr, server) = echo_server().await;
    let resolver = resolver();
    let tunnel = direct(addr, &resolver).await;
    let spec = ProbeSpec {
        rise: 2,
        fall: 3,
        ..ping_spec(GENEROUS)
    };
    let mut counter = Counter::new(spec.rise, spec.fall);

    // Up after exactly `rise` successes.
    let mut transitions = Vec::new();
    for _ in 0..spec.rise {
        let ok = bounded_probe(tunnel.as_ref(), &spec, &resolver)
            .await
            .is_ok();
        transitions.push(counter.record(ok));
    }
    assert_eq!(transitions, [None, Some(Transition::Up)]);
    assert!(counter.is_up());

    // Stop answering: closing the listening socket makes every further dial refused.
    server.abort();
    let _ = server.await;

    let mut transitions = Vec::new();
    for _ in 0..spec.fall + 1 {
        let result = bounded_probe(tunnel.as_ref(), &spec, &resolver).await;
        assert!(result.is_err(), "the server is gone: {result:?}");
        transitions.push(counter.record(result.is_ok()));
    }
    // Down at the `fall`-th failure, and only once.
    assert_eq!(transitions, [None, None, Some(Transition::Down), None]);
    assert!(!counter.is_up());
    assert_eq!(counter.failures(), spec.fall + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_goes_down_when_the_server_stops_replying() {
    // The harder case: the server still accepts but no longer answers, so each failure is a
    // probe timeout rather than a refused dial.
    let answering = Arc::new(AtomicBool::new(true));
    let flag = answering.clone();
    let (addr, _) = serve(move |mut s| {
        let flag = flag.clone();
        async move {
            let got = read_at_least(&mut s, 5).await;
            if flag.load(Ordering::SeqCst) {
                let _ = s.write_all(&got).await;
            }
            read_at_least(&mut s, usize::MAX).await;
        }
    })
    .await;
    let resolver = resolver();
    let tunnel = direct(addr, &resolver).await;
    let spec = ProbeSpec {
        rise: 1,
        fall: 2,
        ..ping_spec(Duration::from_millis(300))
    };
    let mut counter = Counter::new(spec.rise, spec.fall);

    let result = bounded_probe(tunnel.as_ref(), &spec, &resolver).await;
    assert_eq!(
        counter.record(result.is_ok()),
        Some(Transition::Up),
        "{result:?}"
    );

    answering.store(false, Ordering::SeqCst);
    let mut transitions = Vec::new();
    for _ in 0..spec.fall {
        let result = bounded_probe(tunnel.as_ref(), &spec, &resolver).await;
        let err = err_of(result.clone());
        assert!(err.contains("timed out"), "{err}");
        transitions.push(counter.record(result.is_ok()));
    }
    assert_eq!(transitions, [None, Some(Transition::Down)]);
}
