//! The daemon running the provider CLIs' real command lines against emulators of cloudflared,
//! tailscale and ngrok (providers/tests/emulators, written from the documented flags, outputs
//! and local APIs): each tunnel comes up with its endpoint and carries the probe's bytes, its
//! death or loss of health is a failover to the backup, and its secret shows up in no command
//! line and no log line.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

fn emulator(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("providers/tests/emulators")
        .join(name);
    assert!(path.exists(), "{} missing", path.display());
    path.display().to_string()
}

/// The emulator behind a wrapper script in `dir` that exports its `EMU_*` controls: the daemon
/// starts children with a cleared environment, so the controls cannot come from its own.
fn emulator_with(dir: &std::path::Path, name: &str, env: &[(&str, String)]) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mut script = String::from("#!/bin/sh\n");
    for (key, value) in env {
        assert!(!value.contains('\''), "no quotes in test values: {value}");
        script.push_str(&format!("export {key}='{value}'\n"));
    }
    script.push_str(&format!("exec '{}' \"$@\"\n", emulator(name)));
    let wrapper = dir.join(name);
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper.display().to_string()
}

fn config(tunnel: &str, echo: std::net::SocketAddr) -> String {
    with_direct_backup("svc", tunnel, echo)
}

/// The secret must not be in any process's argv nor in the daemon's log.
fn assert_secret_hidden(daemon: &Daemon, secret: &str) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(secret),
            "secret in the argv of {:?}",
            entry.path()
        );
    }
    assert!(!daemon.log().contains(secret), "secret in the daemon's log");
}

fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngrok_tunnel_up_then_its_death_fails_over() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let token = format!("2tkNGROK{}secretToken", std::process::id());
    let token_file = dir.path().join("ngrok_token");
    std::fs::write(&token_file, &token).unwrap();
    let control = dir.path().join("control");
    write(&control, "ok");
    let public = free_port().to_string();
    let tunnel = format!(
        r#"      - name: ng
        provider: ngrok
        priority: 10
        binary: "{}"
        proto: tcp
        to: "{echo}"
        authtoken_file: "{}""#,
        emulator_with(
            dir.path(),
            "ngrok",
            &[
                ("EMU_CONTROL", control.display().to_string()),
                ("EMU_PUBLIC_PORT", public.clone()),
            ]
        ),
        token_file.display()
    );
    let daemon = Daemon::start(&config(&tunnel, echo)).await;
    let mut events = daemon.follow();
    let (_, up) = events
        .wait(
            Duration::from_secs(30),
            "ng up",
            tunnel_event("tunnel_up", "ng"),
        )
        .await;
    assert_eq!(up["endpoint"], format!("tcp://127.0.0.1:{public}"));
    events
        .wait(
            Duration::from_secs(20),
            "ng primary",
            primary_changed(Some("ng"), None),
        )
        .await;
    assert_secret_hidden(&daemon, &token);

    write(&control, "die");
    let (_, e) = events
        .wait(
            Duration::from_secs(10),
            "failover",
            primary_changed(Some("lan"), Some("ng")),
        )
        .await;
    assert!(e["reason"].as_str().unwrap().contains("hard"), "{e}");
    assert_secret_hidden(&daemon, &token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailscale_peer_up_then_offline_fails_over() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    write(&state, "running");
    let tunnel = format!(
        r#"      - name: ts
        provider: tailscale
        priority: 10
        binary: "{}"
        mode: peer
        peer: homebox
        port: {}"#,
        emulator_with(
            dir.path(),
            "tailscale",
            &[
                ("EMU_STATE", state.display().to_string()),
                ("EMU_PEER_IP", "127.0.0.1".to_string()),
            ]
        ),
        echo.port()
    );
    let daemon = Daemon::start(&config(&tunnel, echo)).await;
    let mut events = daemon.follow();
    let (_, up) = events
        .wait(
            Duration::from_secs(30),
            "ts up",
            tunnel_event("tunnel_up", "ts"),
        )
        .await;
    assert_eq!(up["endpoint"], format!("127.0.0.1:{}", echo.port()));
    events
        .wait(
            Duration::from_secs(20),
            "ts primary",
            primary_changed(Some("ts"), None),
        )
        .await;

    write(&state, "peer-offline");
    let (_, e) = events
        .wait(
            Duration::from_secs(15),
            "failover",
            primary_changed(Some("lan"), Some("ts")),
        )
        .await;
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.contains("offline"), "{reason}");
    let status = daemon.status().await;
    let ts = &status.services[0].tunnels[0];
    assert!(
        ts.reason.as_deref().unwrap_or("").contains("offline"),
        "{ts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_tunnel_up_then_not_ready_and_death_fail_over() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    // A well-formed tunnel token (base64 JSON with account, tunnel id and secret).
    let token = "eyJhIjoiNGE0YTVhM2EzNDY0NjBiODkxOWJlMDNhNDM3ZDVhMzEiLCJ0IjoiNDJiYmQzYzUtNDE3MS00MTAzLTgwZDktNzI1ZmRmZTRjYTllIiwicyI6ImRoUjNpVUVmYzlEd25Vdmxvc1g1SDZHbVBubE9GUG96MEpxbjhmbDZrM0E9In0=";
    let token_file = dir.path().join("cf_token");
    std::fs::write(&token_file, token).unwrap();
    let control = dir.path().join("control");
    write(&control, "ok");
    let public = free_port();
    let tunnel = format!(
        r#"      - name: cf
        provider: cloudflare
        priority: 10
        binary: "{}"
        token_file: "{}"
        hostname: 127.0.0.1
        port: {public}"#,
        emulator_with(
            dir.path(),
            "cloudflared",
            &[
                ("EMU_CONTROL", control.display().to_string()),
                ("EMU_PUBLIC_PORT", public.to_string()),
                ("EMU_ORIGIN", echo.to_string()),
            ]
        ),
        token_file.display()
    );
    let daemon = Daemon::start(&config(&tunnel, echo)).await;
    let mut events = daemon.follow();
    let (_, up) = events
        .wait(
            Duration::from_secs(30),
            "cf up",
            tunnel_event("tunnel_up", "cf"),
        )
        .await;
    assert_eq!(up["endpoint"], "127.0.0.1");
    events
        .wait(
            Duration::from_secs(20),
            "cf primary",
            primary_changed(Some("cf"), None),
        )
        .await;
    assert_secret_hidden(&daemon, token);

    // Not ready: the edge stops carrying traffic, so the end-to-end probe fails → soft failover.
    write(&control, "notready");
    events
        .wait(
            Duration::from_secs(10),
            "failover",
            primary_changed(Some("lan"), Some("cf")),
        )
        .await;
    write(&control, "ok");
    events
        .wait(
            Duration::from_secs(20),
            "failback",
            primary_changed(Some("cf"), Some("lan")),
        )
        .await;

    // Death: a hard signal.
    write(&control, "die");
    let (_, e) = events
        .wait(
            Duration::from_secs(10),
            "hard failover",
            primary_changed(Some("lan"), Some("cf")),
        )
        .await;
    assert!(e["reason"].as_str().unwrap().contains("hard"), "{e}");
    assert_secret_hidden(&daemon, token);
}
