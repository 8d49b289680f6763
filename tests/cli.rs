//! The operator's view: `tunnelkeeper status` / `events` and raw HTTP on the control socket,
//! against the real daemon binary, plus peer-credential checks with a real non-root uid.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_tunnelkeeper");

async fn daemon_with_one_direct_tunnel(readers: &str) -> (Daemon, Events) {
    let echo = echo_server().await;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state", readers: {readers} }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 2, send: "x", expect: "x" }}
services:
  - name: web
    tunnels:
      - {{ name: lan, provider: direct, address: "{echo}" }}
"#
    );
    let daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "lan elected",
            primary_changed(Some("lan"), None),
        )
        .await;
    (daemon, events)
}

fn cli(args: &[&str], socket: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

async fn raw_http(socket: &std::path::Path, request: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_events_commands_show_the_daemon() {
    let (daemon, _events) = daemon_with_one_direct_tunnel("[]").await;

    let out = cli(&["status"], &daemon.socket);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("service web  primary: lan"), "{text}");
    assert!(text.contains("* lan"), "{text}");
    assert!(text.contains("direct"), "{text}");
    assert!(text.contains(" up "), "{text}");

    let out = cli(&["status", "--json"], &daemon.socket);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"][0]["primary"], "lan");
    assert_eq!(v["services"][0]["tunnels"][0]["state"], "up");
    assert!(
        v["services"][0]["tunnels"][0]["latency_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // Without -f the journal is replayed and the command ends.
    let out = cli(&["events", "--json"], &daemon.socket);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|v| v["type"] == "primary_changed"));
    let seqs: Vec<u64> = lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // --since skips what was already seen; the readable form names type and fields.
    let out = cli(&["events", "--since", "1"], &daemon.socket);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("#1 "), "{text}");
    assert!(
        text.contains("primary_changed") && text.contains("to=lan"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_http_works_like_curl_and_errors_are_json() {
    let (daemon, _events) = daemon_with_one_direct_tunnel("[]").await;
    let ok = raw_http(
        &daemon.socket,
        "GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"primary\": \"lan\""), "{ok}");

    let missing = raw_http(
        &daemon.socket,
        "GET /v1/nothing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(missing.contains("\"error\""), "{missing}");

    let bad = raw_http(
        &daemon.socket,
        "GET /v1/events?since=abc HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

    let wrong = raw_http(
        &daemon.socket,
        "DELETE /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 405"), "{wrong}");

    // A client that half-closes after its request (`printf … | socat - UNIX-CONNECT:…`) still
    // gets its answer.
    let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    stream
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "half-closed client: {answer:?}"
    );

    // A client that never finishes its request does not stop others from being served.
    let _stuck = {
        let mut s = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        s.write_all(b"GET /v1/sta").await.unwrap();
        s
    };
    let out = cli(&["status"], &daemon.socket);
    assert!(out.status.success());

    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_credentials_decide_who_may_read() {
    if !nix::unistd::geteuid().is_root() || Command::new("runuser").arg("--help").output().is_err()
    {
        tunnelkeeper_test_support::skip("needs root and runuser to act as another uid");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    for (readers, allowed) in [
        ("[]".to_string(), false),
        (format!("[\"uid:{}\"]", nobody.uid), true),
    ] {
        let (daemon, _events) = daemon_with_one_direct_tunnel(&readers).await;
        // Open the file-system path so that only SO_PEERCRED stands between nobody and the API.
        std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--", BIN, "status", "--json", "--socket"])
            .arg(&daemon.socket)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if allowed {
            assert!(out.status.success(), "listed reader refused: {stderr}");
        } else {
            // Denied peers are closed without a word of HTTP (no 403 to keep them on).
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains("closed the connection") && stderr.contains("permission denied"),
                "{stderr}"
            );
        }
        // Writes need root or the daemon's own uid, whatever `readers` says.
        for write in [
            &["pin", "web", "lan"][..],
            &["unpin", "web"][..],
            &["reload"][..],
        ] {
            let out = Command::new("runuser")
                .args(["-u", "nobody", "--", BIN])
                .args(write)
                .arg("--socket")
                .arg(&daemon.socket)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{write:?} by nobody: {stderr}");
            let why = if allowed {
                "403"
            } else {
                "closed the connection"
            };
            let what = if allowed {
                "read-only access"
            } else {
                "permission denied"
            };
            assert!(
                stderr.contains(why) && stderr.contains(what),
                "{write:?}: {stderr}"
            );
        }
        assert!(daemon.status().await.services[0].pin.is_none());
        // Root may write.
        let out = cli(&["pin", "web", "lan"], &daemon.socket);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn status_without_a_daemon_is_a_clear_runtime_error() {
    let out = Command::new(BIN)
        .args(["status", "--socket", "/nonexistent/tk.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/tk.sock") && stderr.contains("is the daemon running"),
        "{stderr}"
    );
}

/// A socket the user may not open (EACCES) means the daemon runs and the user lacks the group:
/// the advice is the group and `readers`, not "is the daemon running". Runs as root (as the test
/// command does) to act as `nobody`.
#[test]
fn a_user_denied_by_the_socket_file_is_told_to_join_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", BIN, "status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("permission denied on {}", socket.display()))
            && stderr.contains("sudo usermod -aG root $USER")
            && stderr.contains("daemon.readers")
            && !stderr.contains("is the daemon running"),
        "{stderr}"
    );
}

#[test]
fn demo_runs_end_to_end_and_leaves_nothing_behind() {
    let out = Command::new(BIN)
        .args(["demo", "--quick"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PRIMARY alpha → beta"), "{stdout}");
    assert!(stdout.contains("== summary"), "{stdout}");
    assert!(
        stdout.contains("kill -9") && stdout.contains("SIGSTOP"),
        "{stdout}"
    );
    assert!(stdout.contains("shut down cleanly"), "{stdout}");
    assert!(stdout.contains(" exchanges, 0 failed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_after_the_socket_status_lines_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let echo = echo_server().await;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 2, send: "x", expect: "x" }}
services:
  - name: web
    tunnels:
      - {{ name: lan, provider: direct, address: "{echo}" }}
"#
    );
    let mut daemon = Daemon::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", notify_path.as_os_str()),
            // As systemd sets it for WatchdogSec=400ms: pets every 200 ms.
            ("WATCHDOG_USEC", std::ffi::OsStr::new("400000")),
        ],
    )
    .await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    // READY=1 comes first, and only once the control socket answers (Daemon::start waited).
    let first = recv(&notify, &mut buf).await;
    assert_eq!(first.trim(), "READY=1");
    while !got.iter().any(|m: &String| m.contains("STATUS=web: lan")) {
        got.push(recv(&notify, &mut buf).await);
    }
    let status = got.iter().rev().find(|m| m.starts_with("STATUS=")).unwrap();
    assert!(status.contains("1/1 up"), "{status}");
    // Before the first election a normal start reads as starting, not as an outage.
    assert!(
        got.iter()
            .filter(|m| m.starts_with("STATUS="))
            .all(|m| !m.contains("degraded") && !m.contains("no primary")),
        "{got:?}"
    );
    while !got.iter().any(|m| m.trim() == "WATCHDOG=1") {
        got.push(recv(&notify, &mut buf).await);
    }
    // SIGHUP (what `systemctl reload` sends under Type=notify-reload): RELOADING=1 with the
    // monotonic time in one message, then READY=1 once the reload is done.
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = loop {
        let m = recv(&notify, &mut buf).await;
        if m.contains("RELOADING=1") {
            break m;
        }
    };
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 10_000_000,
        "{usec} vs {now_usec}"
    );
    loop {
        let m = recv(&notify, &mut buf).await;
        if m.trim() == "READY=1" {
            break;
        }
    }
    assert!(daemon.terminate().success());
    let mut rest = Vec::new();
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), notify.recv(&mut buf)).await
    {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m.trim() == "STOPPING=1"), "{rest:?}");
}

async fn recv(notify: &tokio::net::UnixDatagram, buf: &mut [u8]) -> String {
    let n = tokio::time::timeout(Duration::from_secs(10), notify.recv(buf))
        .await
        .expect("no sd_notify message")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_every_event_with_its_fields() {
    let echo = echo_server().await;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 2, send: "x", expect: "x" }}
services:
  - name: web
    tunnels:
      - {{ name: lan, provider: direct, address: "{echo}" }}
"#
    );
    let format = std::ffi::OsStr::new("json");
    let mut daemon = Daemon::start_with_env(&config, &[("TUNNELKEEPER_LOG_FORMAT", format)]).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "lan elected",
            primary_changed(Some("lan"), None),
        )
        .await;
    assert!(daemon.terminate().success());
    let log = daemon.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let elected = lines
        .iter()
        .find(|v| v["event"] == "primary_changed")
        .unwrap_or_else(|| panic!("no primary_changed line in {log}"));
    assert_eq!(elected["service"], "web");
    assert_eq!(elected["level"], "INFO");
    assert!(elected["timestamp"].is_string(), "{elected}");
    assert!(lines.iter().any(|v| v["event"] == "daemon_stopping"));
}

/// Runs the CLI with `-c FILE` only: it must find the daemon through the file.
fn cli_with_config(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .env_remove("TUNNELKEEPER_SOCKET")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_reload_reach_the_daemon_through_a_broken_file() {
    let (daemon, mut events) = daemon_with_one_direct_tunnel("[]").await;
    let file = daemon.dir.path().join("config.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    // A typo in a key far from `daemon:`: the file no longer validates.
    std::fs::write(&file, good.replace("name: lan", "nmae: lan")).unwrap();

    let out = cli_with_config(&["status"], &file);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("service web  primary: lan"), "{text}");

    // `reload` asks the daemon, which refuses the file with its errors (exit 2) and keeps
    // running the previous configuration; the refusal is an event and `last_reload`.
    let out = cli_with_config(&["reload"], &file);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nmae"),
        "the daemon's answer names the key: {stderr}"
    );
    let (_, failed) = events
        .wait(Duration::from_secs(10), "config_reload_failed", |e| {
            e["type"] == "config_reload_failed"
        })
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("nmae"),
        "{failed}"
    );
    let status = daemon.status().await;
    let last = status.daemon.last_reload.expect("last_reload set");
    assert!(!last.ok, "{last:?}");
    assert_eq!(status.services[0].primary.as_deref(), Some("lan"));

    // Not even YAML any more: still the socket from the `daemon:` line.
    std::fs::write(&file, format!("{good}\n  - [\t")).unwrap();
    let out = cli_with_config(&["status", "--json"], &file);
    assert!(out.status.success(), "{out:?}");
}
