//! Operator-facing behaviour of a real daemon (issue 18): top-level hooks run once per router
//! and daemon event with the event's fields in their environment, and the event journal
//! survives a restart with its numbering continuing.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{echo_server, free_port, Daemon};

/// Bound on every wait: generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

/// Polls `path` until `done` holds for its lines; returns them.
async fn wait_lines(path: &Path, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if done(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// All journaled events, without following.
async fn journal(daemon: &Daemon) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    daemon
        .client
        .events(0, false, |line| {
            events.push(serde_json::from_str(line)?);
            Ok(())
        })
        .await
        .unwrap();
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_level_hooks_run_once_per_router_and_daemon_event() {
    let echo = echo_server().await;
    // Nothing listens on the router's port: the router is unreachable, which is an event.
    let router_port = free_port();
    let hook = r#"echo "$TK_EVENT router=${TK_ROUTER:-} seq=$TK_SEQ service=${TK_SERVICE:-}" >> "@DIR@/daemon-hook.log""#;
    let service_hook = r#"echo "$TK_EVENT $TK_SERVICE" >> "@DIR@/service-hook-$TK_SERVICE.log""#;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
hooks:
  - on: [router_connection_dropped, config_reloaded, daemon_stopping]
    run: '{hook}'
routers:
  - name: rtr
    ssh: {{ host: 127.0.0.1, port: {router_port}, user: root, identity_file: "@DIR@/key",
           known_hosts: "@DIR@/known_hosts", connect_timeout: 1s }}
    check_interval: 1h
services:
  - name: one
    hooks: [{{ on: [tunnel_up], run: '{service_hook}' }}]
    tunnels: [{{ name: lan, provider: direct, address: "{echo}" }}]
  - name: two
    hooks: [{{ on: [tunnel_up], run: '{service_hook}' }}]
    tunnels: [{{ name: lan, provider: direct, address: "{echo}" }}]
"#
    );
    let mut daemon = Daemon::start(&config).await;
    let dir = daemon.dir.path().to_owned();
    let log = dir.join("daemon-hook.log");
    wait_lines(&log, "the router hook", |l| !l.is_empty()).await;
    // A reload runs the same hook after the router event: once its line is there, every run
    // the router event caused is too (one queue per hook, in seq order).
    daemon.client.reload().await.unwrap();
    let lines = wait_lines(&log, "the reload hook", |l| {
        l.iter().any(|l| l.starts_with("config_reloaded"))
    })
    .await;
    let dropped: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("router_connection_dropped"))
        .collect();
    assert_eq!(dropped.len(), 1, "one run for two services: {lines:?}");
    assert!(
        dropped[0].contains("router=rtr seq=") && dropped[0].ends_with("service="),
        "{lines:?}"
    );
    // Service hooks keep their own service's events.
    for service in ["one", "two"] {
        let lines = wait_lines(
            &dir.join(format!("service-hook-{service}.log")),
            "the service hook",
            |l| !l.is_empty(),
        )
        .await;
        assert_eq!(lines, [format!("tunnel_up {service}")]);
    }
    // `daemon_stopping` runs before the daemon exits.
    assert!(daemon.terminate().success(), "{}", daemon.log());
    let lines = wait_lines(&log, "the stop hook", |_| true).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("daemon_stopping router= seq=")),
        "{lines:?}\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_journal_survives_a_restart() {
    let echo = echo_server().await;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
services:
  - name: web
    tunnels: [{{ name: lan, provider: direct, address: "{echo}" }}]
"#
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events.wait_elected(&["web"]).await;
    daemon.restart().await;
    // Replayed from seq 0: the first run's events, its stop, then the new run's election.
    let mut events = daemon.follow();
    events
        .wait(WAIT, "the first run's stop", |v| {
            v["type"] == "daemon_stopping"
        })
        .await;
    events
        .wait(WAIT, "the election after the restart", |v| {
            v["type"] == "primary_changed"
        })
        .await;

    let journal = journal(&daemon).await;
    let seqs: Vec<u64> = journal.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{journal:?}"
    );
    let types: Vec<&str> = journal
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    let stop = types
        .iter()
        .position(|t| *t == "daemon_stopping")
        .unwrap_or_else(|| panic!("the first run's stop is not in the journal: {types:?}"));
    let elected = |range: &[serde_json::Value]| {
        range
            .iter()
            .any(|e| e["type"] == "primary_changed" && e["to"] == "lan")
    };
    assert!(elected(&journal[..stop]), "before the restart: {types:?}");
    assert!(elected(&journal[stop..]), "after the restart: {types:?}");
    // `--since` reaches back across the restart.
    let mut since = Vec::new();
    daemon
        .client
        .events(stop as u64, false, |line| {
            since.push(serde_json::from_str::<serde_json::Value>(line)?);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(since[0]["type"], "daemon_stopping", "{since:?}");
}
