//! A real tunnel no one here wrote: `bore` (crates.io `bore-cli`) run by the `command` provider
//! against a local `bore server`, its endpoint read from its own `listening at` log line and
//! its secret passed in the environment, never in argv.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `bore` from PATH or cargo's bin directory (where `cargo install bore-cli` puts it).
fn bore() -> Option<String> {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = [
        format!("{home}/.cargo/bin/bore"),
        "/usr/local/bin/bore".into(),
    ];
    if let Ok(out) = Command::new("sh").args(["-c", "command -v bore"]).output() {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !path.is_empty() {
            return Some(path);
        }
    }
    candidates
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bore_carries_bytes_and_fails_over_when_killed() {
    let Some(bore) = bore() else {
        panic!("bore is required (the README's test command runs `cargo install bore-cli`)");
    };
    let secret = format!("tk-secret-{}", std::process::id());
    let min_port = free_port();
    let _server = Server(
        Command::new(&bore)
            .args(["server", "--bind-addr", "127.0.0.1", "--min-port"])
            .arg(min_port.to_string())
            .arg("--max-port")
            .arg((min_port + 200).to_string())
            .env("BORE_SECRET", &secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The control port is fixed (7835); wait until the server accepts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect("127.0.0.1:7835")
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "bore server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let echo = echo_server().await;
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 500ms, timeout: 500ms, rise: 2, fall: 3, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 1s }}
services:
  - name: svc
    tunnels:
      - name: bore
        provider: command
        priority: 10
        run: ["{bore}", "local", "{}", "--local-host", "127.0.0.1", "--to", "127.0.0.1"]
        env: {{ BORE_SECRET: "{secret}" }}
        endpoint_regex: 'listening at ([^\s]+)'
        start_timeout: 10s
      - {{ name: lan, provider: direct, priority: 20, address: "{echo}" }}
"#,
        echo.port()
    );
    let daemon = Daemon::start(&config).await;
    let mut events = daemon.follow();
    let (_, up) = events
        .wait(
            Duration::from_secs(30),
            "bore up",
            tunnel_event("tunnel_up", "bore"),
        )
        .await;
    let endpoint = up["endpoint"].as_str().unwrap().to_string();
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    assert!(endpoint.starts_with("127.0.0.1:"), "{endpoint}");
    assert!((min_port..=min_port + 200).contains(&port), "{endpoint}");
    events
        .wait(
            Duration::from_secs(20),
            "bore primary",
            primary_changed(Some("bore"), None),
        )
        .await;

    // Bytes really go through bore's server and client to the echo service.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);

    // The secret went by environment only.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&secret),
            "secret in the argv of {:?}",
            entry.path()
        );
    }

    let pid = daemon.tunnel_pid("svc", "bore").await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let (_, e) = events
        .wait(
            Duration::from_secs(10),
            "failover",
            primary_changed(Some("lan"), Some("bore")),
        )
        .await;
    assert!(e["reason"].as_str().unwrap().contains("hard"), "{e}");
}
