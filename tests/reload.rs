//! Hot reload and pins, end to end through the real binary: only the tunnels a reload changes
//! are touched, an invalid file leaves the running configuration alone, and a pin survives a
//! daemon restart.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;
use tunnelkeeper::status::DaemonStatus;

const BIN: &str = env!("CARGO_BIN_EXE_tunnelkeeper");

fn header(state_dir: &str) -> String {
    format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "{state_dir}", shutdown_grace: 5s }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 2, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 500ms }}
  restart: {{ initial: 100ms, max: 1s }}
services:
  - name: echo
    tunnels:"#
    )
}

fn cli(args: &[&str], socket: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

fn tunnel<'a>(status: &'a DaemonStatus, name: &str) -> &'a tunnelkeeper::status::TunnelStatus {
    status.services[0]
        .tunnels
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tunnel {name} in {status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_touches_only_the_added_changed_and_removed_tunnels() {
    assert_socat();
    let echo = echo_server().await;
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let before = format!(
        "{}{}{}{}\n",
        header("@DIR@/state"),
        socat_tunnel("keep", 10, ports[0], echo),
        socat_tunnel("change", 20, ports[1], echo),
        socat_tunnel("drop", 30, ports[2], echo),
    );
    let mut daemon = Daemon::start(&before).await;
    let mut events = daemon.follow();
    events.wait_up(&["keep", "change", "drop"]).await;
    let keep_pid = daemon.tunnel_pid("echo", "keep").await;
    let change_pid = daemon.tunnel_pid("echo", "change").await;
    let drop_pid = daemon.tunnel_pid("echo", "drop").await;
    let keep_since = tunnel(&daemon.status().await, "keep").since.clone();

    // `change` moves to another priority; `drop` goes; `add` arrives.
    let after = format!(
        "{}{}{}{}\n",
        header("@DIR@/state"),
        socat_tunnel("keep", 10, ports[0], echo),
        socat_tunnel("change", 25, ports[1], echo),
        socat_tunnel("add", 40, ports[3], echo),
    );
    let path = daemon.dir.path().join("config.yaml");
    let after = after.replace("@DIR@", &daemon.dir.path().display().to_string());
    std::fs::write(&path, after).unwrap();
    let out = cli(&["reload"], &daemon.socket);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("added echo/add; removed echo/drop; changed echo/change"),
        "{stdout}"
    );
    let (_, reloaded) = events
        .wait(Duration::from_secs(20), "config_reloaded", |v| {
            v["type"] == "config_reloaded"
        })
        .await;
    assert_eq!(reloaded["added"], serde_json::json!(["echo/add"]));
    assert_eq!(reloaded["removed"], serde_json::json!(["echo/drop"]));
    assert_eq!(reloaded["changed"], serde_json::json!(["echo/change"]));
    events
        .wait(
            Duration::from_secs(20),
            "add up",
            tunnel_event("tunnel_up", "add"),
        )
        .await;

    let status = daemon.status().await;
    let names: Vec<&str> = status.services[0]
        .tunnels
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["keep", "change", "add"]);
    assert_eq!(
        tunnel(&status, "keep").pid,
        Some(keep_pid),
        "unchanged tunnel restarted"
    );
    assert_eq!(
        tunnel(&status, "keep").since,
        keep_since,
        "unchanged tunnel's state reset"
    );
    assert_eq!(tunnel(&status, "keep").restarts, 0);
    assert!(alive(keep_pid));
    assert!(!alive(drop_pid), "removed tunnel's child still runs");
    assert!(!alive(change_pid), "changed tunnel's old child still runs");
    let new_change = daemon.tunnel_pid("echo", "change").await;
    assert_ne!(new_change, change_pid);
    assert_eq!(tunnel(&status, "change").priority, 25);
    assert_eq!(status.services[0].primary.as_deref(), Some("keep"));
    let last = status.daemon.last_reload.expect("last_reload in status");
    assert!(last.ok);
    // No tunnel event for `keep` after the reload started: it was not touched at all.
    let touched: Vec<_> = events
        .seen
        .iter()
        .skip_while(|(_, v)| v["type"] != "config_reloaded")
        .filter(|(_, v)| v["tunnel"] == "keep")
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_and_the_running_config_stays() {
    assert_socat();
    let echo = echo_server().await;
    let port = free_port();
    let config = format!(
        "{}{}\n",
        header("@DIR@/state"),
        socat_tunnel("only", 10, port, echo)
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events.wait_up(&["only"]).await;
    let pid = daemon.tunnel_pid("echo", "only").await;
    let path = daemon.dir.path().join("config.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("priority: 10", "priority: 10\n        colour: red"),
    )
    .unwrap();

    // Through the CLI: exit 2 and the exact place of the error.
    let out = cli(&["reload"], &daemon.socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("config.yaml:") && stderr.contains("colour"),
        "{stderr}"
    );
    let (_, failed) = events
        .wait(Duration::from_secs(20), "config_reload_failed", |v| {
            v["type"] == "config_reload_failed"
        })
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("colour"),
        "{failed}"
    );

    // Through SIGHUP: the same refusal, reported as an event and in the status.
    kill(Pid::from_raw(daemon.child.id() as i32), Signal::SIGHUP).unwrap();
    events
        .wait(
            Duration::from_secs(20),
            "second config_reload_failed",
            |v| v["type"] == "config_reload_failed",
        )
        .await;
    let status = daemon.status().await;
    let last = status.daemon.last_reload.clone().unwrap();
    assert!(!last.ok);
    assert!(last.error.unwrap().contains("colour"));
    assert_eq!(tunnel(&status, "only").pid, Some(pid));
    assert!(alive(pid));

    // A good file again: SIGHUP applies it (nothing changed, nothing touched).
    std::fs::write(&path, good).unwrap();
    kill(Pid::from_raw(daemon.child.id() as i32), Signal::SIGHUP).unwrap();
    let (_, ok) = events
        .wait(Duration::from_secs(20), "config_reloaded", |v| {
            v["type"] == "config_reloaded"
        })
        .await;
    assert_eq!(ok["changed"], serde_json::json!([]));
    assert_eq!(daemon.tunnel_pid("echo", "only").await, pid);
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_moves_the_primary_and_survives_a_restart() {
    let echo = echo_server().await;
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{}
      - {{ name: a, provider: direct, priority: 10, address: "{echo}" }}
      - {{ name: b, provider: direct, priority: 20, address: "{echo}" }}
"#,
        header(&state.path().display().to_string())
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "a elected",
            primary_changed(Some("a"), None),
        )
        .await;
    events.wait_up(&["b"]).await;

    let out = cli(&["pin", "echo", "b"], &daemon.socket);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("primary now: b"));
    let (_, pinned) = events
        .wait(
            Duration::from_secs(20),
            "pinned",
            primary_changed(Some("b"), Some("a")),
        )
        .await;
    assert_eq!(pinned["reason"], "pinned");
    assert_eq!(daemon.status().await.services[0].pin.as_deref(), Some("b"));

    // Unknown names are the operator's error: exit 2 with a 404 message.
    let out = cli(&["pin", "echo", "zzz"], &daemon.socket);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tunnel `zzz`"));
    // Bodies are bounded and must be exactly {"tunnel": NAME}.
    let huge = serde_json::json!({ "tunnel": "b".repeat(10_000) });
    let err = daemon
        .client
        .request(hyper::Method::POST, "/v1/services/echo/pin", Some(huge))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("400") && err.to_string().contains("at most"),
        "{err}"
    );
    let wrong = serde_json::json!({ "tunel": "b" });
    let err = daemon
        .client
        .request(hyper::Method::POST, "/v1/services/echo/pin", Some(wrong))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("400") && err.to_string().contains("unknown field"),
        "{err}"
    );
    let out = cli(&["unpin", "nope"], &daemon.socket);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service `nope`"));
    assert!(daemon.terminate().success());
    drop(daemon);

    // A new daemon with the same state directory comes up pinned.
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    let (_, first) = events
        .wait(
            Duration::from_secs(20),
            "b elected",
            primary_changed(Some("b"), None),
        )
        .await;
    assert_eq!(first["reason"], "pinned");
    events.wait_up(&["a"]).await;
    // Let `a` outlive its failback hold (500 ms), so the unpin alone decides.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = cli(&["unpin", "echo"], &daemon.socket);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, unpinned) = events
        .wait(
            Duration::from_secs(20),
            "unpinned",
            primary_changed(Some("a"), Some("b")),
        )
        .await;
    assert_eq!(unpinned["reason"], "unpinned");
    assert_eq!(
        std::fs::read_to_string(state.path().join("pins.json"))
            .unwrap()
            .trim(),
        "{}"
    );
    assert!(daemon.terminate().success());
}

/// A service with a failover listener on `listen`, a short drain grace, and `tunnels`.
fn listener_config(listen: &str, connect_timeout: &str, tunnels: &str) -> String {
    let service = format!(
        "    listen: \"{listen}\"\n    connect_timeout: {connect_timeout}\n    tunnels:{tunnels}\n"
    );
    header("@DIR@/state")
        .replace("shutdown_grace: 5s", "shutdown_grace: 300ms")
        .replace("    tunnels:", &service)
}

fn direct_tunnel(name: &str, priority: u32, to: std::net::SocketAddr) -> String {
    format!(
        "\n      - {{ name: {name}, provider: direct, priority: {priority}, address: \"{to}\" }}"
    )
}

/// Writes `config` as the daemon's file and reloads it through the CLI; returns the answer.
fn reload_with(daemon: &Daemon, config: &str) -> String {
    let path = daemon.dir.path().join("config.yaml");
    let text = config.replace("@DIR@", &daemon.dir.path().display().to_string());
    std::fs::write(&path, text).unwrap();
    let out = cli(&["reload"], &daemon.socket);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One round trip on an open connection through the listener (the echo server answers).
async fn round_trip(stream: &mut tokio::net::TcpStream, line: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(line.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write {line:?}: {e}"));
    let mut got = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("no echo of {line:?}"))
        .unwrap_or_else(|e| panic!("reading the echo of {line:?}: {e}"));
    assert_eq!(got, line.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_counters_survive_reloads_that_add_remove_and_change_tunnels() {
    assert_socat();
    let echo = echo_server().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let keep = socat_tunnel("keep", 10, free_port(), echo);
    let first = format!("{keep}{}", direct_tunnel("drop", 30, echo));
    let mut daemon = Daemon::start(&listener_config(&listen, "1s", &first)).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "keep elected",
            primary_changed(Some("keep"), None),
        )
        .await;

    // A busy connection and an idle keep-alive one, both through `keep`.
    let mut busy = tokio::net::TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut busy, "first\n").await;
    let mut idle = tokio::net::TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut idle, "hello\n").await;
    let before = daemon.status().await.services[0].listener.clone().unwrap();
    assert_eq!((before.total, before.active), (2, 2), "{before:?}");

    // Add a tunnel (the tunnel count, and with it the default `retries`, changes).
    let added = format!("{first}{}", direct_tunnel("add", 40, echo));
    let out = reload_with(&daemon, &listener_config(&listen, "1s", &added));
    assert!(out.contains("added echo/add"), "{out}");
    round_trip(&mut busy, "after add\n").await;
    // Remove one.
    let removed = format!("{keep}{}", direct_tunnel("add", 40, echo));
    let out = reload_with(&daemon, &listener_config(&listen, "1s", &removed));
    assert!(out.contains("removed echo/drop"), "{out}");
    round_trip(&mut busy, "after remove\n").await;
    // Change one, and a listener setting that is not its address.
    let changed = format!("{keep}{}", direct_tunnel("add", 45, echo));
    let out = reload_with(&daemon, &listener_config(&listen, "2s", &changed));
    assert!(out.contains("changed echo, echo/add"), "{out}");
    round_trip(&mut busy, "after change\n").await;

    // Well past the drain grace (300 ms) the old code closed what it had retired: both
    // connections must still work, the idle one without a reset.
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < quiet_until {
        round_trip(&mut busy, "tick\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    round_trip(&mut idle, "still here\n").await;
    assert!(
        !daemon.log().contains("drain grace over"),
        "a reload drained the listener:\n{}",
        daemon.log()
    );
    // The same listener, still counting: nothing reset, both connections open.
    let after = daemon.status().await.services[0].listener.clone().unwrap();
    assert_eq!((after.total, after.active), (2, 2), "{after:?}");
    assert_eq!(after.address, before.address);
    assert!(
        after.bytes_to_service > before.bytes_to_service,
        "{after:?}"
    );
    // New connections are served too.
    let mut fresh = tokio::net::TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut fresh, "new\n").await;
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listener_accepts_on_the_new_address_while_old_connections_go_on() {
    let echo = echo_server().await;
    let old = format!("127.0.0.1:{}", free_port());
    let new = format!("127.0.0.1:{}", free_port());
    let tunnels = direct_tunnel("lan", 10, echo);
    let mut daemon = Daemon::start(&listener_config(&old, "1s", &tunnels)).await;
    let mut events = daemon.follow();
    events.wait_elected(&["echo"]).await;
    let mut held = tokio::net::TcpStream::connect(&old).await.unwrap();
    round_trip(&mut held, "before\n").await;

    let out = reload_with(&daemon, &listener_config(&new, "1s", &tunnels));
    assert!(out.contains("changed echo"), "{out}");
    let mut moved = tokio::net::TcpStream::connect(&new).await.unwrap();
    round_trip(&mut moved, "new address\n").await;
    assert!(
        tokio::net::TcpStream::connect(&old).await.is_err(),
        "the old address still accepts"
    );
    // Past the drain grace, the connection accepted on the old socket still works.
    tokio::time::sleep(Duration::from_millis(800)).await;
    round_trip(&mut held, "after\n").await;
    let listener = daemon.status().await.services[0].listener.clone().unwrap();
    assert_eq!(listener.address, new);
    assert_eq!((listener.total, listener.active), (2, 2), "{listener:?}");

    // The listener removed altogether: nothing accepts, but what it carried goes on.
    let without = format!(
        "{}{tunnels}\n",
        header("@DIR@/state").replace("shutdown_grace: 5s", "shutdown_grace: 300ms")
    );
    reload_with(&daemon, &without);
    assert!(tokio::net::TcpStream::connect(&new).await.is_err());
    tokio::time::sleep(Duration::from_millis(800)).await;
    round_trip(&mut held, "still\n").await;
    round_trip(&mut moved, "still\n").await;
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_required_compares_the_file_with_what_runs() {
    let echo = echo_server().await;
    let config = format!(
        "{}\n      - {{ name: lan, provider: direct, address: \"{echo}\" }}\n",
        header("@DIR@/state")
    );
    let mut daemon = Daemon::start(&config).await;
    let moved = config.replace("@DIR@/control.sock", "@DIR@/other.sock");
    let out = reload_with(&daemon, &moved);
    assert!(
        out.contains("takes effect at the next restart: daemon.control_socket"),
        "{out}"
    );
    // Reverted before any restart: nothing is pending any more.
    let out = reload_with(&daemon, &config);
    assert!(!out.contains("next restart"), "{out}");
    let last = daemon.status().await.daemon.last_reload.unwrap();
    assert!(last.ok && last.restart_required.is_empty(), "{last:?}");
    daemon.terminate();
}
