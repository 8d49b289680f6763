//! Router recovery through the real daemon, with a real OpenSSH sshd standing in for the
//! router: a reboot is provisioned once and the tunnel that goes through the router restarts
//! at once instead of waiting out its backoff; reloads never pile up watchers or subscribers.

use tunnelkeeper_test_support::sshd;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// The router section: the boot id is a file the test controls, provisioning creates a
/// marker (and logs each run), verify checks the marker.
fn router(sshd: &sshd::Sshd, dir: &Path, check_interval: &str) -> String {
    let d = dir.display();
    format!(
        r#"routers:
  - name: rtr
    ssh: {{ host: 127.0.0.1, port: {port}, user: {user}, identity_file: "{key}", known_hosts: "{known}",
           keepalive_interval: 1s, keepalive_max: 2, connect_timeout: 5s, auth_timeout: 5s }}
    boot_id_command: "cat {d}/boot_id"
    check_interval: {check_interval}
    provision: ["touch {d}/marker && echo run >> {d}/provision.log"]
    verify: [{{ name: marker, command: "test -f {d}/marker && echo yes", expect: "yes" }}]
    verify_interval: 1s
    command_timeout: 5s
"#,
        port = sshd.port,
        user = sshd::current_user(),
        key = sshd.client_key.display(),
        known = sshd.known_hosts.display(),
    )
}

/// An `ssh` tunnel through the router with a 20 s restart backoff, and a direct backup.
fn config(sshd: &sshd::Sshd, dir: &Path, echo: std::net::SocketAddr, check: &str) -> String {
    let tunnel = format!(
        r#"      - name: vps
        provider: ssh
        priority: 10
        via_router: rtr
        restart: {{ initial: 20s, max: 60s }}
        ssh: {{ host: 127.0.0.1, port: {}, user: {}, identity_file: "{}", known_hosts: "{}",
               keepalive_interval: 1s, keepalive_max: 2 }}
        local_forward: {{ to: "{echo}" }}"#,
        sshd.port,
        sshd::current_user(),
        sshd.client_key.display(),
        sshd.known_hosts.display(),
    );
    let base = with_direct_backup("box", &tunnel, echo);
    base.replacen(
        "services:",
        &format!("{}services:", router(sshd, dir, check)),
        1,
    )
}

fn provision_runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("provision.log"))
        .unwrap_or_default()
        .lines()
        .count()
}

fn of_router(kind: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |v| v["type"] == kind && v["router"] == "rtr"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_is_provisioned_once_and_the_dependent_tunnel_restarts_without_backoff() {
    let mut sshd = sshd::Sshd::start("")
        .await
        .expect("sshd (scripts/test installs it)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").unwrap();
    let echo = echo_server().await;
    let mut daemon = Daemon::start(&config(&sshd, dir.path(), echo, "1s")).await;
    let mut events = daemon.follow();
    // First contact: no boot id on record, verify fails (no marker) → provisioned once.
    let (_, first) = events
        .wait(
            Duration::from_secs(30),
            "first provision",
            of_router("router_provisioned"),
        )
        .await;
    assert_eq!(first["cause"], "first_contact");
    events
        .wait(
            Duration::from_secs(30),
            "verified",
            of_router("router_verified"),
        )
        .await;
    events
        .wait(
            Duration::from_secs(30),
            "vps elected",
            primary_changed(Some("vps"), None),
        )
        .await;
    assert_eq!(provision_runs(dir.path()), 1);

    // The "router" reboots: sshd and its sessions die, a new boot id, the state is lost.
    sshd.kill();
    std::fs::write(dir.path().join("boot_id"), "boot-2\n").unwrap();
    std::fs::remove_file(dir.path().join("marker")).unwrap();
    events
        .wait(
            Duration::from_secs(10),
            "failover",
            primary_changed(Some("lan"), Some("vps")),
        )
        .await;
    let (_, dropped) = events
        .seen_or_wait(
            Duration::from_secs(10),
            "dropped",
            of_router("router_connection_dropped"),
        )
        .await;
    let (_, restarting) = events
        .seen_or_wait(
            Duration::from_secs(10),
            "vps backing off",
            tunnel_event("tunnel_restarting", "vps"),
        )
        .await;
    assert!(
        restarting["delay_ms"].as_u64().unwrap() >= 16_000,
        "{restarting}"
    );
    // While the router is away, status blames it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.status().await;
        let vps = &status.services[0].tunnels[0];
        if vps
            .reason
            .as_deref()
            .unwrap_or("")
            .starts_with("router `rtr` unreachable")
        {
            assert!(!status.routers[0].connected);
            break;
        }
        assert!(Instant::now() < deadline, "no blame on the router: {vps:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    sshd.restart().await;
    let back = Instant::now();
    let (_, rebooted) = events
        .wait(
            Duration::from_secs(10),
            "rebooted",
            of_router("router_rebooted"),
        )
        .await;
    let seq = |v: &serde_json::Value| v["seq"].as_u64().unwrap();
    assert!(
        events
            .seen
            .iter()
            .any(|(_, v)| of_router("router_reconnected")(v)
                && seq(v) > seq(&dropped)
                && seq(v) < seq(&rebooted)),
        "no router_reconnected between the drop and the reboot"
    );
    assert_eq!(rebooted["old_boot_id"], "boot-1");
    assert_eq!(rebooted["new_boot_id"], "boot-2");
    let (_, provisioned) = events
        .wait(
            Duration::from_secs(10),
            "provisioned",
            of_router("router_provisioned"),
        )
        .await;
    assert_eq!(provisioned["cause"], "reboot");
    events
        .wait(
            Duration::from_secs(10),
            "verified",
            of_router("router_verified"),
        )
        .await;
    // The tunnel did not wait out its 16–20 s backoff.
    events
        .seen_or_wait(Duration::from_secs(10), "vps up again", |v| {
            tunnel_event("tunnel_up", "vps")(v) && v["seq"].as_u64() > rebooted["seq"].as_u64()
        })
        .await;
    assert!(
        back.elapsed() < Duration::from_secs(12),
        "{:?}",
        back.elapsed()
    );
    assert!(dir.path().join("marker").exists());
    // Several check rounds later: still exactly one provisioning for the reboot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(provision_runs(dir.path()), 2);
    let status = daemon.status().await;
    let rtr = &status.routers[0];
    assert!(rtr.connected);
    assert_eq!(rtr.boot_id.as_deref(), Some("boot-2"));
    assert!(rtr.last_reboot.is_some());
    assert!(rtr.last_provision.as_ref().unwrap().ok);
    assert_eq!(rtr.checks[0].ok, Some(true));
    let table = tunnelkeeper::cli::render_status(&status);
    assert!(
        table.contains("router rtr  connected  boot id: boot-2")
            && table.contains("last provision: ok (reboot")
            && table.contains("check marker"),
        "{table}"
    );
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_leave_watchers_subscribers_and_descriptors_flat() {
    let sshd = sshd::Sshd::start("")
        .await
        .expect("sshd (scripts/test installs it)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").unwrap();
    let echo = echo_server().await;
    let mut daemon = Daemon::start(&config(&sshd, dir.path(), echo, "1s")).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(30),
            "verified",
            of_router("router_verified"),
        )
        .await;
    events.wait_elected(&["box"]).await;
    let path = daemon.dir.path().join("config.yaml");
    let one = std::fs::read_to_string(&path).unwrap();
    let other = one.replace("check_interval: 1s", "check_interval: 2s");
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let pid = daemon.child.id();
    let before = daemon.status().await;
    let fds_before = fds(pid);
    for i in 0..100 {
        // Every fourth round changes the router (its watcher restarts); the others change
        // nothing, or change it back.
        let text = if i % 4 == 0 { &other } else { &one };
        std::fs::write(&path, text).unwrap();
        let answer = daemon.client.reload().await.unwrap();
        assert!(answer["ok"] == true, "{answer}");
    }
    std::fs::write(&path, &one).unwrap();
    daemon.client.reload().await.unwrap();
    let after = daemon.status().await;
    assert_eq!(after.routers.len(), 1);
    assert_eq!(
        after.daemon.subscribers, before.daemon.subscribers,
        "bus subscribers grew over 100 reloads"
    );
    let fds_after = fds(pid);
    assert!(
        fds_after <= fds_before + 4,
        "descriptors {fds_before} → {fds_after}"
    );
    // The service was never touched; its tunnel kept its state.
    assert_eq!(
        after.services[0].tunnels[0].restarts,
        before.services[0].tunnels[0].restarts
    );
    assert!(daemon.terminate().success());
}
