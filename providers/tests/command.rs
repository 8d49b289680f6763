//! The `command` provider against real programs: socat as a relay, shell scripts as tools that
//! print their endpoint, misbehave, or refuse to die.

mod common;

use std::time::{Duration, Instant};

use common::{argv, ctx, echo_server, eventually, free_port, gone, round_trip, PATIENCE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use regex_lite::Regex;
use tunnelkeeper_providers::command::{CommandProvider, CommandSpec, EndpointSource};
use tunnelkeeper_providers::{Provider, ProviderError};

fn provider(run: &[&str], endpoint: EndpointSource) -> CommandProvider {
    CommandProvider::new(CommandSpec::new(argv(run), endpoint))
}

fn regex(re: &str) -> EndpointSource {
    EndpointSource::Regex(Regex::new(re).expect("regex"))
}

fn socat_relay(to: std::net::SocketAddr) -> (CommandProvider, String) {
    let port = free_port();
    let listen = format!("TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1");
    let connect = format!("TCP:{to}");
    let endpoint = format!("127.0.0.1:{port}");
    (
        provider(
            &["socat", &listen, &connect],
            EndpointSource::Fixed(endpoint.clone()),
        ),
        endpoint,
    )
}

#[tokio::test]
async fn socat_relay_with_fixed_endpoint_carries_bytes() {
    let echo = echo_server().await;
    let (provider, endpoint) = socat_relay(echo);
    let tunnel = provider.start(&ctx()).await.expect("start");
    assert_eq!(tunnel.endpoint().display, endpoint);
    assert!(tunnel.pid().is_some());
    tunnel.check().await.expect("healthy");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"ping through socat").await,
        b"ping through socat"
    );
    tunnel.stop().await;
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed after stop");
    // socat catches SIGTERM and exits with 128 + 15.
    assert!(
        reason.contains("signal 15") || reason.contains("status 143"),
        "{reason}"
    );
    assert!(tunnel.dial(PATIENCE).await.is_err());
}

#[tokio::test]
async fn kill_9_resolves_closed_at_once() {
    let echo = echo_server().await;
    let (provider, _) = socat_relay(echo);
    let tunnel = provider.start(&ctx()).await.expect("start");
    let pid = tunnel.pid().expect("pid");
    let watcher = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.closed().await })
    };
    let killed_at = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
    let reason = tokio::time::timeout(PATIENCE, watcher)
        .await
        .expect("closed in time")
        .expect("join");
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "hard signal took {:?}",
        killed_at.elapsed()
    );
    assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    // Resolves again, at once, for a second caller.
    assert_eq!(tunnel.closed().await, reason);
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Closed(_))
    ));
}

#[tokio::test]
async fn program_that_exits_during_start_is_a_spawn_error() {
    let dead_port = free_port();
    for endpoint in [
        EndpointSource::Fixed(format!("127.0.0.1:{dead_port}")),
        regex("listening at (\\S+)"),
    ] {
        let provider = provider(&["sh", "-c", "echo giving up; exit 3"], endpoint);
        match tokio::time::timeout(PATIENCE, provider.start(&ctx()))
            .await
            .expect("start returns")
        {
            Err(ProviderError::Spawn(msg)) => {
                assert!(msg.contains("exited with status 3"), "{msg}");
                assert!(msg.contains("giving up"), "{msg}");
            }
            other => panic!(
                "expected a spawn error, got {:?}",
                other.map(|t| t.endpoint())
            ),
        }
    }
}

#[tokio::test]
async fn missing_binary_is_named() {
    let provider = provider(
        &["tk-no-such-tunnel-tool", "up"],
        EndpointSource::Fixed("127.0.0.1:1".into()),
    );
    match provider.start(&ctx()).await {
        Err(ProviderError::MissingBinary { binary, .. }) => {
            assert_eq!(binary, "tk-no-such-tunnel-tool")
        }
        other => panic!(
            "expected MissingBinary, got {:?}",
            other.map(|t| t.endpoint())
        ),
    }
}

#[tokio::test]
async fn endpoint_regex_capture_becomes_the_endpoint() {
    let echo = echo_server().await;
    let script = format!("echo starting >&2; echo 'listening at {echo}'; exec sleep 1000");
    let provider = provider(&["sh", "-c", &script], regex(r"listening at (\S+)"));
    let tunnel = provider.start(&ctx()).await.expect("start");
    assert_eq!(tunnel.endpoint().display, echo.to_string());
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"abc").await, b"abc");
    tunnel.stop().await;
}

#[tokio::test]
async fn endpoint_regex_without_group_uses_whole_match_and_strips_scheme_on_dial() {
    let echo = echo_server().await;
    let script = format!("echo 'url=tcp://{echo} ready' >&2; exec sleep 1000");
    let provider = provider(&["sh", "-c", &script], regex(r"tcp://\S+"));
    let tunnel = provider.start(&ctx()).await.expect("start");
    assert_eq!(tunnel.endpoint().display, format!("tcp://{echo}"));
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"xyz").await, b"xyz");
}

#[tokio::test]
async fn regex_that_never_matches_times_out_clearly() {
    let mut spec = CommandSpec::new(
        argv(&["sh", "-c", "echo 'nothing useful here'; exec sleep 1000"]),
        regex(r"listening at (\S+)"),
    );
    // Short, yet long enough for a loaded box to get `sh` to its first echo.
    spec.start_timeout = Duration::from_secs(1);
    let started = Instant::now();
    match CommandProvider::new(spec).start(&ctx()).await {
        Err(ProviderError::StartTimeout { after, detail }) => {
            assert_eq!(after, Duration::from_secs(1));
            assert!(detail.contains("never matched"), "{detail}");
            assert!(detail.contains("nothing useful here"), "{detail}");
        }
        other => panic!(
            "expected StartTimeout, got {:?}",
            other.map(|t| t.endpoint())
        ),
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < PATIENCE);
}

#[tokio::test]
async fn failed_start_leaves_no_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 1000", pid_file.display());
    let mut spec = CommandSpec::new(argv(&["sh", "-c", &script]), regex("never"));
    spec.start_timeout = Duration::from_secs(2);
    assert!(CommandProvider::new(spec).start(&ctx()).await.is_err());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        eventually(PATIENCE, || async { gone(pid) }).await,
        "child {pid} outlived a failed start"
    );
}

#[tokio::test]
async fn stop_kills_a_child_that_ignores_sigterm_after_grace() {
    let mut spec = CommandSpec::new(
        argv(&[
            "sh",
            "-c",
            "trap '' TERM; echo 'listening at 127.0.0.1:9'; exec sleep 1000",
        ]),
        regex(r"listening at (\S+)"),
    );
    spec.stop_grace = Duration::from_millis(300);
    let tunnel = CommandProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    let pid = tunnel.pid().expect("pid");
    let started = Instant::now();
    tunnel.stop().await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "stopped before grace: {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < PATIENCE);
    let reason = tunnel.closed().await;
    assert!(reason.contains("signal 9"), "{reason}");
    assert!(gone(pid));
    tunnel.stop().await; // idempotent
}

#[tokio::test]
async fn stop_kills_grandchildren() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("bg");
    let script = format!(
        "sleep 1000 & echo $! > {}; echo 'listening at 127.0.0.1:9'; sleep 1000",
        pid_file.display()
    );
    let tunnel = provider(&["sh", "-c", &script], regex(r"listening at (\S+)"))
        .start(&ctx())
        .await
        .expect("start");
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let leader = tunnel.pid().expect("pid");
    assert!(!gone(grandchild));
    tunnel.stop().await;
    assert!(
        eventually(PATIENCE, || async { gone(grandchild) && gone(leader) }).await,
        "leader {leader} or grandchild {grandchild} survived stop"
    );
}

#[tokio::test]
async fn exit_after_start_resolves_closed_with_last_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let script = format!(
        "echo 'listening at 127.0.0.1:9'; while [ ! -e {} ]; do sleep 0.05; done; echo 'relay lost' >&2; exit 7",
        go.display()
    );
    let tunnel = provider(&["sh", "-c", &script], regex(r"listening at (\S+)"))
        .start(&ctx())
        .await
        .expect("start");
    tunnel.check().await.expect("alive");
    std::fs::write(&go, b"").expect("touch");
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed in time");
    assert!(reason.contains("exited with status 7"), "{reason}");
    assert!(reason.contains("relay lost"), "{reason}");
}

#[tokio::test]
async fn fixed_endpoint_that_never_listens_times_out() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let mut spec = CommandSpec::new(
        argv(&["sleep", "1000"]),
        EndpointSource::Fixed(endpoint.clone()),
    );
    spec.start_timeout = Duration::from_millis(500);
    match CommandProvider::new(spec).start(&ctx()).await {
        Err(ProviderError::StartTimeout { detail, .. }) => {
            assert!(detail.contains(&endpoint), "{detail}");
            assert!(detail.contains("never accepted a connection"), "{detail}");
        }
        other => panic!(
            "expected StartTimeout, got {:?}",
            other.map(|t| t.endpoint())
        ),
    }
}
