//! Lifecycle end to end through the real binary: the start-up election picks the best tunnel
//! however the tunnels race (and says so once), and a frozen tunnel process is restarted.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;
use tunnelkeeper::status::TunnelState;

/// The daemon's event journal so far (no follow).
async fn journal(daemon: &Daemon) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    daemon
        .client
        .events(0, false, |line| {
            out.push(serde_json::from_str(line)?);
            Ok(())
        })
        .await
        .unwrap();
    out
}

/// Polls the status until every tunnel of the first service is up.
async fn wait_all_up(daemon: &Daemon, run: usize) -> tunnelkeeper::status::ServiceStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.status().await;
        let service = status.services[0].clone();
        if service.tunnels.iter().all(|t| t.state == TunnelState::Up) {
            return service;
        }
        assert!(
            Instant::now() < deadline,
            "run {run}: not every tunnel came up: {service:?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Four tunnels race at every start: the best one (priority 10) is a socat process, which is
/// the slowest to come up; the three `direct` ones (20, 30, 40) pass their first probe within
/// milliseconds. Twenty daemon starts in a row (a fresh process each time, so each start is a
/// new race with its own timing): the primary is `best` every time, announced by exactly one
/// `primary_changed` with reason `initial`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_racing_tunnels_elect_the_best_once_at_every_start() {
    assert_socat();
    let echo = echo_server().await;
    for run in 0..20 {
        let config = format!(
            r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 2, fall: 2, send: "ping\n", expect: "ping" }}
  # A backstop only: the election waits for the four first verdicts, which take ~0.2 s. It
  # is long so that a slow socat start on a loaded machine cannot end the wait early.
  failover: {{ settle: 10s }}
services:
  - name: web
    tunnels:{best}
      - {{ name: t20, provider: direct, priority: 20, address: "{echo}" }}
      - {{ name: t30, provider: direct, priority: 30, address: "{echo}" }}
      - {{ name: t40, provider: direct, priority: 40, address: "{echo}" }}
"#,
            best = socat_tunnel("best", 10, free_port(), echo),
        );
        let mut daemon = Daemon::start(&config).await;
        let service = wait_all_up(&daemon, run).await;
        assert_eq!(service.primary.as_deref(), Some("best"), "run {run}");
        assert!(
            !service.starting && !service.degraded,
            "run {run}: {service:?}"
        );
        let changes: Vec<serde_json::Value> = journal(&daemon)
            .await
            .into_iter()
            .filter(|e| e["type"] == "primary_changed")
            .collect();
        assert_eq!(changes.len(), 1, "run {run}: {changes:?}");
        assert_eq!(changes[0]["to"], "best", "run {run}");
        assert_eq!(changes[0]["reason"], "initial", "run {run}");
        daemon.terminate();
    }
}

/// A `command` tunnel frozen with SIGSTOP stays alive, so only probes see it: once they have
/// held it down for `restart.when_down`, it is stopped (SIGTERM, then SIGKILL after its stop
/// grace: a stopped process cannot act on SIGTERM) and restarted, and the event says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_command_tunnel_is_restarted_after_when_down() {
    assert_socat();
    let echo = echo_server().await;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 2, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 200ms }}
  restart: {{ initial: 100ms, max: 1s, when_down: 1s }}
services:
  - name: web
    tunnels:{frozen}
      - {{ name: lan, provider: direct, priority: 20, address: "{echo}" }}
"#,
        frozen = socat_tunnel("relay", 10, free_port(), echo),
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "relay elected",
            primary_changed(Some("relay"), None),
        )
        .await;
    let pid = daemon.tunnel_pid("web", "relay").await;
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();

    let (down_at, _) = events
        .wait(
            Duration::from_secs(20),
            "relay down by probes",
            tunnel_event("tunnel_down", "relay"),
        )
        .await;
    let (wedged_at, wedged) = events
        .wait(Duration::from_secs(20), "relay restarted", |e| {
            e["type"] == "tunnel_down"
                && e["tunnel"] == "relay"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("restart.when_down"))
        })
        .await;
    assert_eq!(wedged["hard"], true, "{wedged}");
    let waited = wedged_at - down_at;
    assert!(
        waited >= Duration::from_millis(900),
        "restarted after {waited:?}"
    );
    events
        .wait(
            Duration::from_secs(20),
            "relay back",
            tunnel_event("tunnel_up", "relay"),
        )
        .await;
    let status = daemon.status().await;
    let relay = &status.services[0].tunnels[0];
    assert_ne!(relay.pid, Some(pid), "the same frozen process");
    assert!(relay.restarts >= 1, "{relay:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the frozen process {pid} is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.terminate();
}
