//! End-to-end failover with real child processes: three `socat` relays in front of a loopback
//! echo server, run by the real daemon binary and observed through its control socket.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;
use tunnelkeeper::status::TunnelState;

fn config(echo: std::net::SocketAddr, ports: [u16; 3], hold: &str) -> String {
    format!(
        r#"version: 1
daemon:
  control_socket: "@DIR@/control.sock"
  state_dir: "@DIR@/state"
  shutdown_grace: 5s
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 2, fall: 3, send: "ping\n", expect: "ping" }}
  failover: {{ mode: priority, failback_hold: {hold} }}
  restart: {{ initial: 100ms, max: 1s }}
services:
  - name: echo
    tunnels:{}{}{}
"#,
        socat_tunnel("a", 10, ports[0], echo),
        socat_tunnel("b", 20, ports[1], echo),
        socat_tunnel("c", 30, ports[2], echo),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_blackhole_fail_over_and_fail_back_after_the_hold() {
    assert_socat();
    let echo = echo_server().await;
    let ports = [free_port(), free_port(), free_port()];
    let mut daemon = Daemon::start(&config(echo, ports, "1500ms")).await;
    let mut events = daemon.follow();

    events
        .wait(
            Duration::from_secs(20),
            "a elected",
            primary_changed(Some("a"), None),
        )
        .await;
    // Let every tunnel come up so that failover has somewhere to go.
    events.wait_up(&["b", "c"]).await;

    // Hard failure: kill -9 the primary's child. Noticed from its exit, not from probes.
    let pid = daemon.tunnel_pid("echo", "a").await;
    let killed = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let (at, e) = events
        .wait(
            Duration::from_secs(10),
            "failover after kill",
            primary_changed(Some("b"), Some("a")),
        )
        .await;
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.contains("hard"), "reason should say hard: {reason}");
    assert!(
        reason.contains("signal 9"),
        "reason should name the signal: {reason}"
    );
    // Far below one probe interval: the probes had no part in it.
    assert!(
        at - killed < Duration::from_millis(190),
        "took {:?}",
        at - killed
    );

    // a is restarted, comes back, and takes over again only after the hold.
    let (up_at, _) = events
        .wait(
            Duration::from_secs(10),
            "a back up",
            tunnel_event("tunnel_up", "a"),
        )
        .await;
    let (back_at, e) = events
        .wait(
            Duration::from_secs(10),
            "failback",
            primary_changed(Some("a"), Some("b")),
        )
        .await;
    assert!(e["reason"].as_str().unwrap().starts_with("failback"), "{e}");
    assert!(
        back_at - up_at >= Duration::from_millis(1450),
        "failback after {:?}",
        back_at - up_at
    );

    // Blackhole: SIGSTOP. The kernel still completes TCP handshakes on the listening socket, so
    // only the send/expect probe notices: after about fall × interval.
    let pid = daemon.tunnel_pid("echo", "a").await;
    let stopped = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let (at, e) = events
        .wait(
            Duration::from_secs(10),
            "failover after SIGSTOP",
            primary_changed(Some("b"), Some("a")),
        )
        .await;
    let reason = e["reason"].as_str().unwrap();
    assert!(
        !reason.contains("hard"),
        "a blackhole is a soft failure: {reason}"
    );
    assert!(reason.contains("probe"), "{reason}");
    let took = at - stopped;
    assert!(
        took >= Duration::from_millis(400),
        "too fast to be probe-driven: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // SIGCONT: a answers again, but flapped twice now, so its hold has grown (dampening).
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    let (up_at, _) = events
        .wait(
            Duration::from_secs(10),
            "a up after SIGCONT",
            tunnel_event("tunnel_up", "a"),
        )
        .await;
    let status = daemon.status().await;
    let hold = status.services[0].tunnels[0].hold_ms;
    assert!(
        hold >= 3000,
        "hold should have doubled after a second failure: {hold}ms"
    );
    let (back_at, _) = events
        .wait(
            Duration::from_secs(15),
            "second failback",
            primary_changed(Some("a"), Some("b")),
        )
        .await;
    assert!(
        back_at - up_at >= Duration::from_millis(2950),
        "failback after {:?}, before the grown hold",
        back_at - up_at
    );

    // Events arrived in order with strictly increasing seq.
    let seqs: Vec<u64> = events
        .seen
        .iter()
        .map(|(_, v)| v["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Status shows every tunnel up with a measured latency and a's restart.
    let status = daemon.status().await;
    let service = &status.services[0];
    assert_eq!(service.primary.as_deref(), Some("a"));
    for t in &service.tunnels {
        assert_eq!(t.state, TunnelState::Up, "{t:?}");
        assert!(
            t.latency_ms.is_some_and(|ms| ms > 0.0 && ms < 200.0),
            "{t:?}"
        );
        assert!(t.endpoint.is_some());
    }
    assert!(service.tunnels[0].restarts >= 1);

    // SIGTERM: clean exit, no child left, socket removed.
    let pids: Vec<u32> = service.tunnels.iter().filter_map(|t| t.pid).collect();
    assert_eq!(pids.len(), 3);
    let exit = daemon.terminate();
    assert!(exit.success(), "daemon exit: {exit:?}\n{}", daemon.log());
    for pid in pids {
        assert!(!alive(pid), "child {pid} survived the daemon");
    }
    assert!(!daemon.socket_exists(), "control socket left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_tunnels_report_clear_reasons_while_the_good_one_serves() {
    assert_socat();
    let echo = echo_server().await;
    let port = free_port();
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 2, send: "ping\n", expect: "ping" }}
services:
  - name: svc
    tunnels:
      - name: missing
        provider: command
        priority: 1
        run: ["/nonexistent/cloudflared-xyz", "tunnel", "run"]
        endpoint: 127.0.0.1:9
      - name: crashing
        provider: command
        priority: 2
        run: ["/bin/sh", "-c", "exit 3"]
        endpoint: 127.0.0.1:9
        restart: {{ initial: 50ms, max: 400ms, jitter: 0.0 }}
      - name: silent
        provider: command
        priority: 3
        run: ["/bin/sh", "-c", "echo starting up; exec sleep 600"]
        endpoint_regex: 'listening at (\S+)'
        start_timeout: 500ms
        stop_grace: 500ms
      - name: good
        provider: command
        priority: 4
        run: ["{SOCAT}", "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", "TCP:{echo}"]
        endpoint: 127.0.0.1:{port}
"#
    );
    let mut daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "good elected",
            primary_changed(Some("good"), None),
        )
        .await;

    // Watch the crash loop for a while: backoff must grow to the cap and stay there.
    let daemon_pid = daemon.child.id();
    let cpu_before = cpu_ticks(daemon_pid);
    let window = Instant::now();
    let mut delays = Vec::new();
    while window.elapsed() < Duration::from_secs(3) {
        let (_, e) = events
            .wait(Duration::from_secs(5), "crash restarts", |v| {
                v["type"] == "tunnel_restarting" && v["tunnel"] == "crashing"
            })
            .await;
        delays.push(e["delay_ms"].as_u64().unwrap());
    }
    let cpu_used = cpu_ticks(daemon_pid) - cpu_before;
    assert!(
        delays.windows(2).all(|w| w[0] <= w[1]),
        "backoff must not shrink: {delays:?}"
    );
    assert_eq!(
        *delays.last().unwrap(),
        400,
        "backoff reaches the cap: {delays:?}"
    );
    assert!(
        delays.len() <= 12,
        "crash loop restarted too often: {delays:?}"
    );
    // Clock ticks are 1/100 s: well under half a core over a 3 s window.
    assert!(cpu_used < 150, "daemon used {cpu_used} ticks of CPU in 3s");

    let status = daemon.status().await;
    let svc = &status.services[0];
    let reason = |name: &str| {
        svc.tunnels
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        reason("missing").contains("/nonexistent/cloudflared-xyz"),
        "{}",
        reason("missing")
    );
    assert!(
        reason("missing").contains("not found"),
        "{}",
        reason("missing")
    );
    assert!(
        reason("crashing").contains("status 3"),
        "{}",
        reason("crashing")
    );
    assert!(
        reason("silent").contains("timed out"),
        "{}",
        reason("silent")
    );
    assert!(
        reason("silent").contains("starting up"),
        "names the last output: {}",
        reason("silent")
    );
    assert_eq!(svc.primary.as_deref(), Some("good"));
    let good = svc.tunnels.iter().find(|t| t.name == "good").unwrap();
    assert_eq!(good.state, TunnelState::Up);

    assert!(daemon.terminate().success());
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based) → indexes 11, 12.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_get_the_event_and_a_stuck_hook_stalls_nothing() {
    assert_socat();
    let echo = echo_server().await;
    let ports = [free_port(), free_port()];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hook.out");
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 2, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 0s }}
services:
  - name: svc
    hooks:
      - on: [primary_changed]
        run: 'echo "$TK_EVENT $TK_SERVICE from=$TK_FROM to=$TK_TO" >> {out}; cat >> {out}; echo >> {out}'
        timeout: 5s
      - on: [primary_changed, tunnel_up]
        run: ["/bin/sleep", "600"]
        timeout: 300ms
    tunnels:{}{}
"#,
        socat_tunnel("a", 10, ports[0], echo),
        socat_tunnel("b", 20, ports[1], echo),
        out = out.display(),
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
    let pid = daemon.tunnel_pid("svc", "a").await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    events
        .wait(
            Duration::from_secs(10),
            "failover",
            primary_changed(Some("b"), Some("a")),
        )
        .await;
    events
        .wait(
            Duration::from_secs(10),
            "failback",
            primary_changed(Some("a"), Some("b")),
        )
        .await;

    // The writing hook ran for every change the bus announced, in order, with env and JSON on
    // stdin, even though the other hook hangs until killed at its timeout every time. (With a
    // zero hold the start may go b → a before the kill, so the expectation comes from the bus.)
    let expected: Vec<String> = events
        .seen
        .iter()
        .filter(|(_, v)| v["type"] == "primary_changed")
        .map(|(_, v)| {
            format!(
                "primary_changed svc from={} to={}",
                v["from"].as_str().unwrap_or(""),
                v["to"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(expected.len() >= 3, "{expected:?}");
    assert!(expected.contains(&"primary_changed svc from=a to=b".to_string()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        // Complete runs only: the JSON line is the last thing a run writes, newline-terminated.
        let complete = text.matches("}\n").count();
        if complete >= expected.len() || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("primary_changed"))
        .collect();
    assert_eq!(lines, expected, "{text}");
    let json: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), expected.len(), "{text}");
    assert!(
        json.iter().all(|v| v["type"] == "primary_changed"),
        "{text}"
    );
    assert!(
        json.windows(2)
            .all(|w| w[1]["seq"].as_u64() > w[0]["seq"].as_u64()),
        "{text}"
    );
    assert!(
        daemon.log().contains("hook killed at its timeout"),
        "{}",
        daemon.log()
    );
    assert!(daemon.terminate().success());
}

/// Pids of processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_standby_tunnel_runs_only_while_the_better_one_is_down() {
    assert_socat();
    let echo = echo_server().await;
    let (hot_port, cold_port) = (free_port(), free_port());
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 2, fall: 3, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 1s }}
services:
  - name: svc
    tunnels:
      - name: hot
        provider: command
        priority: 10
        run: ["{SOCAT}", "TCP-LISTEN:{hot_port},bind=127.0.0.1,fork,reuseaddr", "TCP:{echo}"]
        endpoint: 127.0.0.1:{hot_port}
        restart: {{ initial: 1500ms, max: 2s, jitter: 0.0 }}
      - name: cold
        provider: command
        priority: 50
        standby: cold
        run: ["{SOCAT}", "TCP-LISTEN:{cold_port},bind=127.0.0.1,fork,reuseaddr", "TCP:{echo}"]
        endpoint: 127.0.0.1:{cold_port}
"#
    );
    let cold_marker = format!("TCP-LISTEN:{cold_port},");
    let daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "hot elected",
            primary_changed(Some("hot"), None),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        processes_with(&cold_marker).is_empty(),
        "cold tunnel started while hot is up"
    );
    let status = daemon.status().await;
    assert_eq!(status.services[0].tunnels[1].state, TunnelState::Standby);

    // The better tunnel dies: the cold one is started and takes over.
    let pid = daemon.tunnel_pid("svc", "hot").await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    events
        .wait(
            Duration::from_secs(10),
            "cold starting",
            tunnel_event("tunnel_starting", "cold"),
        )
        .await;
    events
        .wait(
            Duration::from_secs(10),
            "cold primary",
            primary_changed(Some("cold"), None),
        )
        .await;
    assert_eq!(processes_with(&cold_marker).len(), 1);

    // The better tunnel recovers and holds its place for the hold: the cold one is stopped.
    events
        .wait(
            Duration::from_secs(10),
            "failback",
            primary_changed(Some("hot"), Some("cold")),
        )
        .await;
    let (_, e) = events
        .wait(
            Duration::from_secs(10),
            "cold parked",
            tunnel_event("tunnel_down", "cold"),
        )
        .await;
    assert!(
        e["reason"].as_str().unwrap().contains("cold standby"),
        "{e}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&cold_marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "cold tunnel's process still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = daemon.status().await;
    assert_eq!(status.services[0].tunnels[1].state, TunnelState::Standby);
}
