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
