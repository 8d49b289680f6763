//! The daemon with `ssh` tunnels against a real OpenSSH sshd: end-to-end probes through local
//! and remote forwards, immediate failover when sshd dies (listener and sessions), and failback
//! once it is back.

use tunnelkeeper_test_support::sshd;
mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ssh_section(sshd: &sshd::Sshd) -> String {
    format!(
        "{{ host: 127.0.0.1, port: {}, user: {}, identity_file: \"{}\", known_hosts: \"{}\", \
         keepalive_interval: 1s, keepalive_max: 2, connect_timeout: 5s, auth_timeout: 5s }}",
        sshd.port,
        sshd::current_user(),
        sshd.client_key.display(),
        sshd.known_hosts.display()
    )
}

fn config(tunnel: &str, echo: std::net::SocketAddr) -> String {
    with_direct_backup("box", tunnel, echo)
}

/// Kills sshd (listener and sessions): the tunnel must fail over at once, then come back and
/// fail back after the hold once sshd is up again.
async fn kill_and_restore(daemon: &Daemon, events: &mut Events, sshd: &mut sshd::Sshd) {
    let killed = Instant::now();
    sshd.kill();
    let (at, e) = events
        .wait(
            Duration::from_secs(10),
            "failover to lan",
            primary_changed(Some("lan"), Some("vps")),
        )
        .await;
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("hard"),
        "an SSH disconnect is a hard signal: {reason}"
    );
    assert!(
        at - killed < Duration::from_secs(1),
        "failover took {:?}",
        at - killed
    );

    sshd.restart().await;
    let (up, _) = events
        .wait(
            Duration::from_secs(20),
            "vps back up",
            tunnel_event("tunnel_up", "vps"),
        )
        .await;
    let (back, _) = events
        .wait(
            Duration::from_secs(20),
            "failback to vps",
            primary_changed(Some("vps"), Some("lan")),
        )
        .await;
    assert!(
        back - up >= Duration::from_millis(950),
        "failback after {:?}",
        back - up
    );
    let status = daemon.status().await;
    assert!(
        status.ssh_pool["reconnects"].as_u64().unwrap_or(0) >= 1,
        "{:?}",
        status.ssh_pool
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_forward_fails_over_when_sshd_dies_and_fails_back() {
    let Some(mut sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let tunnel = format!(
        "      - name: vps\n        provider: ssh\n        priority: 10\n        ssh: {}\n        local_forward: {{ to: \"{echo}\" }}",
        ssh_section(&sshd)
    );
    let daemon = Daemon::start(&config(&tunnel, echo)).await;
    let mut events = daemon.follow();
    events
        .wait(Duration::from_secs(30), "vps elected", |v| {
            v["type"] == "primary_changed" && v["to"] == "vps"
        })
        .await;
    let status = daemon.status().await;
    let vps = &status.services[0].tunnels[0];
    assert!(vps.latency_ms.is_some_and(|ms| ms > 0.0), "{vps:?}");
    assert!(
        status.ssh_pool["sessions"].as_u64().unwrap_or(0) >= 1,
        "{:?}",
        status.ssh_pool
    );

    kill_and_restore(&daemon, &mut events, &mut sshd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forward_exposes_the_service_and_survives_an_sshd_restart() {
    let Some(mut sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let bind = free_port();
    let tunnel = format!(
        "      - name: vps\n        provider: ssh\n        priority: 10\n        ssh: {}\n        remote_forward: {{ bind: \"127.0.0.1:{bind}\", to: \"{echo}\" }}",
        ssh_section(&sshd)
    );
    let daemon = Daemon::start(&config(&tunnel, echo)).await;
    let mut events = daemon.follow();
    events
        .wait(Duration::from_secs(30), "vps elected", |v| {
            v["type"] == "primary_changed" && v["to"] == "vps"
        })
        .await;

    // The server side really listens and leads back to the local service.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", bind))
        .await
        .unwrap();
    stream.write_all(b"through the forward").await.unwrap();
    let mut buf = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"through the forward");
    drop(stream);

    kill_and_restore(&daemon, &mut events, &mut sshd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_key_is_a_clear_per_tunnel_reason() {
    let Some(sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let echo = echo_server().await;
    let empty_known_hosts = sshd.dir().join("empty_known_hosts");
    std::fs::write(&empty_known_hosts, "").unwrap();
    let section = ssh_section(&sshd).replace(
        &sshd.known_hosts.display().to_string(),
        &empty_known_hosts.display().to_string(),
    );
    let tunnel = format!(
        "      - name: vps\n        provider: ssh\n        priority: 10\n        ssh: {section}\n        local_forward: {{ to: \"{echo}\" }}"
    );
    let daemon = Daemon::start(&config(&tunnel, echo)).await;
    let mut events = daemon.follow();
    let (_, e) = events
        .wait(Duration::from_secs(20), "vps down", |v| {
            v["type"] == "tunnel_down" && v["tunnel"] == "vps"
        })
        .await;
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("SHA256:"),
        "names the fingerprint: {reason}"
    );
    assert!(
        reason.contains(&sshd.host_public),
        "gives the line to add: {reason}"
    );
    events
        .wait(
            Duration::from_secs(20),
            "lan serves",
            primary_changed(Some("lan"), None),
        )
        .await;
}
