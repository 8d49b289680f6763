//! Runtime controls end to end through the real binary and its CLI: restart one tunnel, drain
//! and undrain it (persisted across a daemon restart, open connections kept, new ones elsewhere),
//! probe it now, and reset an SSH target's pooled sessions against a real sshd.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tunnelkeeper::status::{DaemonStatus, TunnelState, TunnelStatus};
use tunnelkeeper_test_support::sshd;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn tunnel<'a>(status: &'a DaemonStatus, name: &str) -> &'a TunnelStatus {
    status.services[0]
        .tunnels
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tunnel {name} in {status:?}"))
}

/// Polls the status until `done` holds (or fails after `limit`, showing the last status).
async fn wait_for(
    daemon: &Daemon,
    limit: Duration,
    what: &str,
    done: impl Fn(&DaemonStatus) -> bool,
) -> DaemonStatus {
    let deadline = Instant::now() + limit;
    loop {
        let status = daemon.status().await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {status:#?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server that counts the connections whose first line starts with `hello` (clients
/// through the listener), apart from probes (`ping`).
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let clients = Arc::new(AtomicUsize::new(0));
    let count = clients.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut first = true;
                while let Ok(Some(line)) = lines.next_line().await {
                    if first && line.starts_with("hello") {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    first = false;
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, clients)
}

/// Sends `line` and reads its echo (bounded in time).
async fn exchange(stream: &mut tokio::net::TcpStream, line: &str) -> String {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; line.len() + 1];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .expect("no echo in time")
        .expect("connection ended");
    String::from_utf8(buf).unwrap()
}

fn config(state: &Path, listen: u16, relay_port: u16, best: SocketAddr, lan: SocketAddr) -> String {
    let dead = free_port();
    format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "{state}", shutdown_grace: 5s }}
defaults:
  probe: {{ interval: 300ms, timeout: 300ms, rise: 1, fall: 2, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 500ms }}
  restart: {{ initial: 100ms, max: 1s }}
services:
  - name: web
    listen: "127.0.0.1:{listen}"
    tunnels:{relay}
      - {{ name: lan, provider: direct, priority: 20, address: "{lan}" }}
      - {{ name: dead, provider: direct, priority: 30, address: "127.0.0.1:{dead}" }}
"#,
        state = state.display(),
        relay = socat_tunnel("best", 10, relay_port, best),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_drain_undrain_and_probe_one_tunnel_from_the_cli() {
    assert_socat();
    let (best_echo, best_clients) = counting_echo().await;
    let (lan_echo, lan_clients) = counting_echo().await;
    let state = tempfile::tempdir().unwrap();
    let listen = free_port();
    let config = config(state.path(), listen, free_port(), best_echo, lan_echo);
    let mut daemon = Daemon::start(&config).await;
    let up = |s: &DaemonStatus| {
        s.services[0].primary.as_deref() == Some("best")
            && tunnel(s, "lan").state == TunnelState::Up
    };
    wait_for(&daemon, Duration::from_secs(20), "best elected", up).await;

    // restart: a new child, the old one gone, the tunnel up and primary again.
    let old_pid = daemon.tunnel_pid("web", "best").await;
    let out = cli(&["restart", "web", "best"], &daemon.socket);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("web/best: restarted"), "{}", text(&out));
    assert!(
        !alive(old_pid),
        "the old child still runs after the restart"
    );
    let status = wait_for(&daemon, Duration::from_secs(20), "best back", |s| {
        let best = tunnel(s, "best");
        best.pid.is_some_and(|p| p != old_pid) && best.state == TunnelState::Up && up(s)
    })
    .await;
    let new_pid = tunnel(&status, "best").pid.unwrap_or_default();

    // A connection opened through the listener now goes through best.
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .unwrap();
    assert_eq!(exchange(&mut open, "hello before").await, "hello before\n");
    assert_eq!(best_clients.load(Ordering::SeqCst), 1);

    // drain: best is not elected any more, keeps running, and its open connection goes on;
    // new connections go through lan.
    let out = cli(&["drain", "web", "best"], &daemon.socket);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("primary now: lan"), "{}", text(&out));
    let status = daemon.status().await;
    let best = tunnel(&status, "best");
    assert!(best.drained, "{best:?}");
    assert_eq!(best.pid, Some(new_pid), "a drained tunnel keeps running");
    assert_eq!(status.services[0].primary.as_deref(), Some("lan"));
    assert_eq!(exchange(&mut open, "hello again").await, "hello again\n");
    for i in 0..5 {
        let mut fresh = tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .unwrap();
        let line = format!("hello {i}");
        assert_eq!(exchange(&mut fresh, &line).await, format!("{line}\n"));
    }
    assert_eq!(
        best_clients.load(Ordering::SeqCst),
        1,
        "a new connection went through the drained tunnel"
    );
    assert_eq!(lan_clients.load(Ordering::SeqCst), 5);
    let rendered = text(&cli(&["status"], &daemon.socket));
    assert!(rendered.contains("drained"), "{rendered}");

    // The drain is kept across a daemon restart (in state_dir), like a pin.
    assert!(state.path().join("drains.json").exists());
    drop(open);
    daemon.terminate();
    drop(daemon);
    let daemon = Daemon::start(&config).await;
    let status = wait_for(&daemon, Duration::from_secs(20), "restart settled", |s| {
        tunnel(s, "best").state == TunnelState::Up && s.services[0].primary.is_some()
    })
    .await;
    assert!(tunnel(&status, "best").drained, "drain lost in a restart");
    assert_eq!(status.services[0].primary.as_deref(), Some("lan"));

    // undrain: best is a contender again and, being better, becomes primary.
    let out = cli(&["undrain", "web", "best"], &daemon.socket);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(
        &daemon,
        Duration::from_secs(20),
        "best primary again",
        |s| !tunnel(s, "best").drained && s.services[0].primary.as_deref() == Some("best"),
    )
    .await;

    // probe: one probe now, with its timing; a failing one says why and exits 1.
    let out = cli(&["probe", "web", "best"], &daemon.socket);
    assert!(out.status.success(), "{}", text(&out));
    let line = text(&out);
    assert!(
        line.starts_with("web/best: ok in ") && line.contains("ms (end-to-end latency "),
        "{line}"
    );
    let out = cli(&["probe", "web", "dead"], &daemon.socket);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = text(&out);
    assert!(
        line.starts_with("web/dead: failed after ") && line.contains("refused"),
        "{line}"
    );

    // Unknown names are the operator's input error (exit 2), naming what exists.
    let out = cli(&["drain", "web", "nope"], &daemon.socket);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("no tunnel `nope` (tunnels: best, lan, dead)"),
        "{}",
        text(&out)
    );
    let out = cli(&["restart", "nope", "best"], &daemon.socket);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

fn ssh_section(sshd: &sshd::Sshd) -> String {
    format!(
        "{{ host: 127.0.0.1, port: {}, user: {}, identity_file: \"{}\", known_hosts: \"{}\", \
         keepalive_interval: 1s, keepalive_max: 2 }}",
        sshd.port,
        sshd::current_user(),
        sshd.client_key.display(),
        sshd.known_hosts.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_reset_closes_the_targets_sessions_and_the_tunnel_reconnects() {
    let sshd = sshd::Sshd::start("")
        .await
        .expect("sshd (scripts/test installs it)");
    let echo = echo_server().await;
    let tunnel_yaml = format!(
        "      - name: vps\n        provider: ssh\n        priority: 10\n        ssh: {}\n        local_forward: {{ to: \"{echo}\" }}",
        ssh_section(&sshd)
    );
    let daemon = Daemon::start(&with_direct_backup("box", &tunnel_yaml, echo)).await;
    let status = wait_for(&daemon, Duration::from_secs(30), "vps elected", |s| {
        s.services[0].primary.as_deref() == Some("vps")
            && s.ssh_pool["sessions"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let target = status.ssh_pool["targets"][0]["target"]
        .as_str()
        .expect("a pooled target")
        .to_owned();
    let opened = status.ssh_pool["opened"].as_u64().unwrap_or(0);
    let closed = status.ssh_pool["closed"].as_u64().unwrap_or(0);

    let out = cli(&["ssh-reset", &target], &daemon.socket);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{target}: 1 session(s) closed")),
        "{}",
        text(&out)
    );
    // The session is gone and a new one carries the tunnel again.
    wait_for(&daemon, Duration::from_secs(30), "a new session", |s| {
        s.ssh_pool["closed"].as_u64().unwrap_or(0) > closed
            && s.ssh_pool["opened"].as_u64().unwrap_or(0) > opened
            && s.ssh_pool["sessions"].as_u64().unwrap_or(0) >= 1
            && tunnel(s, "vps").state == TunnelState::Up
    })
    .await;

    let out = cli(&["ssh-reset", "nobody@127.0.0.1:1"], &daemon.socket);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("targets: {target}")),
        "{}",
        text(&out)
    );
}
