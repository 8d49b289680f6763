//! Shared helpers for integration tests: a loopback echo server, free ports, and the real
//! `tunnelkeeper` binary started as a daemon with a generated config, observed through its
//! control socket exactly as an operator would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tunnelkeeper::control::client::Client;
use tunnelkeeper::status::DaemonStatus;

/// The loopback helpers every test package shares (not every test binary uses both).
#[allow(unused_imports)]
pub use tunnelkeeper_test_support::{echo_server, free_port};

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A daemon started from the real binary.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub client: Client,
}

impl Daemon {
    /// Writes `config` (with `@DIR@` replaced by a temp dir) and runs `tunnelkeeper run -c`.
    pub async fn start(config: &str) -> Daemon {
        Self::start_with_env(config, &[]).await
    }

    /// Like [`Daemon::start`] with extra environment variables for the daemon.
    pub async fn start_with_env(config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let text = config.replace("@DIR@", &dir.path().display().to_string());
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        let socket = dir.path().join("control.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_tunnelkeeper"))
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("daemon.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut child = child;
        let client = Client::new(&socket);
        let deadline = Instant::now() + Duration::from_secs(20);
        let log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
        while client.status_json().await.is_err() {
            if let Ok(Some(exit)) = child.try_wait() {
                panic!("daemon exited ({exit}) before answering:\n{}", log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon never answered on its socket:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Daemon {
            child,
            dir,
            socket,
            client,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub async fn status(&self) -> DaemonStatus {
        self.client.status().await.unwrap()
    }

    /// Every event in the daemon's journal so far (from seq 0, not following).
    pub async fn journal(&self) -> Vec<serde_json::Value> {
        let mut journal = Vec::new();
        self.client
            .events(0, false, |line| {
                journal.push(serde_json::from_str(line)?);
                Ok(())
            })
            .await
            .unwrap();
        journal
    }

    /// Follows `/v1/events` from seq 0 into a channel of parsed JSON events.
    pub fn follow(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client
                .events(0, true, |line| {
                    let v: serde_json::Value = serde_json::from_str(line)?;
                    let _ = tx.send((Instant::now(), v));
                    Ok(())
                })
                .await;
        });
        Events {
            rx,
            seen: Vec::new(),
        }
    }

    /// Pid of a tunnel's child once it has one.
    pub async fn tunnel_pid(&self, service: &str, tunnel: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status().await;
            let pid = status
                .services
                .iter()
                .find(|s| s.name == service)
                .and_then(|s| s.tunnels.iter().find(|t| t.name == tunnel))
                .and_then(|t| t.pid);
            if let Some(pid) = pid {
                return pid;
            }
            assert!(Instant::now() < deadline, "{tunnel} never got a pid");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon (SIGTERM, clean exit) and runs it again on the same config and
    /// directory, waiting until it answers: what an operator's `systemctl restart` does.
    pub async fn restart(&mut self) {
        assert!(self.terminate().success(), "{}", self.log());
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        self.child = Command::new(env!("CARGO_BIN_EXE_tunnelkeeper"))
            .args(["run", "-c"])
            .arg(self.dir.path().join("config.yaml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.client.status_json().await.is_err() {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("daemon exited ({exit}) after a restart:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no answer after a restart:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn socket_exists(&self) -> bool {
        Path::new(&self.socket).exists()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Events received from `/v1/events`, with the instant each arrived.
pub struct Events {
    rx: mpsc::UnboundedReceiver<(Instant, serde_json::Value)>,
    pub seen: Vec<(Instant, serde_json::Value)>,
}

impl Events {
    /// Waits (up to `limit`) for an event matching `want`; returns it with its arrival time.
    pub async fn wait(
        &mut self,
        limit: Duration,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> (Instant, serde_json::Value) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((at, v))) => {
                    self.seen.push((at, v.clone()));
                    if want(&v) {
                        return (at, v);
                    }
                }
                Ok(None) => panic!("event stream ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; saw:\n{}",
                    self.seen
                        .iter()
                        .map(|(_, v)| v.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }
}

impl Events {
    /// Like [`Events::wait`], but an event already seen counts too: for events whose order
    /// relative to the last one waited for is not fixed.
    pub async fn seen_or_wait(
        &mut self,
        limit: Duration,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> (Instant, serde_json::Value) {
        if let Some(hit) = self.seen.iter().find(|(_, v)| want(v)) {
            return hit.clone();
        }
        self.wait(limit, what, want).await
    }

    /// Waits until every tunnel in `names` has sent `tunnel_up`, in any order.
    pub async fn wait_up(&mut self, names: &[&str]) {
        let mut missing: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        missing.retain(|n| {
            !self
                .seen
                .iter()
                .any(|(_, v)| v["type"] == "tunnel_up" && v["tunnel"] == n.as_str())
        });
        while !missing.is_empty() {
            let (_, v) = self
                .wait(Duration::from_secs(20), "tunnels up", |v| {
                    v["type"] == "tunnel_up"
                })
                .await;
            missing.retain(|n| v["tunnel"] != n.as_str());
        }
    }
}

impl Events {
    /// Waits until every service in `names` has elected a primary, in any order.
    pub async fn wait_elected(&mut self, names: &[&str]) {
        let elected = |v: &serde_json::Value, n: &str| {
            v["type"] == "primary_changed" && v["service"] == n && !v["to"].is_null()
        };
        let mut missing: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        missing.retain(|n| !self.seen.iter().any(|(_, v)| elected(v, n)));
        while !missing.is_empty() {
            let (_, v) = self
                .wait(Duration::from_secs(20), "services elected", |v| {
                    v["type"] == "primary_changed"
                })
                .await;
            missing.retain(|n| !elected(&v, n));
        }
    }
}

/// A config with one service holding `tunnel` (YAML lines of a tunnel at priority 10) and a
/// `direct` backup `lan` (priority 20) to `echo`; 300 ms send/expect probes, 1 s failback hold.
pub fn with_direct_backup(service: &str, tunnel: &str, echo: SocketAddr) -> String {
    format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 300ms, timeout: 300ms, rise: 2, fall: 3, send: "ping\n", expect: "ping" }}
  failover: {{ failback_hold: 1s }}
  restart: {{ initial: 200ms, max: 1s }}
services:
  - name: {service}
    tunnels:
{tunnel}
      - {{ name: lan, provider: direct, priority: 20, address: "{echo}" }}
"#
    )
}

/// A `routers:` section with one router `rtr` reached over SSH at 127.0.0.1:`port` (extra
/// `ssh` keys in `ssh_extra`), followed by `body` (its other keys, at router indentation).
pub fn router_yaml(
    port: u16,
    user: &str,
    key: &Path,
    known_hosts: &Path,
    ssh_extra: &str,
    body: &str,
) -> String {
    format!(
        r#"routers:
  - name: rtr
    ssh: {{ host: 127.0.0.1, port: {port}, user: {user}, identity_file: "{}", known_hosts: "{}",
           {ssh_extra} }}
{body}"#,
        key.display(),
        known_hosts.display(),
    )
}

/// Matches `primary_changed` to `to` (and optionally from `from`).
pub fn primary_changed<'a>(
    to: Option<&'a str>,
    from: Option<&'a str>,
) -> impl Fn(&serde_json::Value) -> bool + 'a {
    move |v| {
        v["type"] == "primary_changed"
            && to.is_none_or(|t| v["to"] == t)
            && from.is_none_or(|f| v["from"] == f)
    }
}

/// The events of `kind` in `events`, as JSON text (for messages).
pub fn of_type(events: &[serde_json::Value], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|v| v["type"] == kind)
        .map(|v| v.to_string())
        .collect()
}

/// Matches an event of `kind` for `tunnel`.
pub fn tunnel_event<'a>(
    kind: &'a str,
    tunnel: &'a str,
) -> impl Fn(&serde_json::Value) -> bool + 'a {
    move |v| v["type"] == kind && v["tunnel"] == tunnel
}

/// Debian's socat, installed by the README's test command.
pub const SOCAT: &str = "/usr/bin/socat";

/// Fails clearly when socat is missing.
pub fn assert_socat() {
    assert!(
        Path::new(SOCAT).exists(),
        "socat is required (the README's test command installs it)"
    );
}

/// YAML lines of a `command` tunnel: a socat relay from 127.0.0.1:`port` to `echo`.
pub fn socat_tunnel(name: &str, priority: u32, port: u16, echo: SocketAddr) -> String {
    format!(
        r#"
      - name: {name}
        provider: command
        priority: {priority}
        run: ["{SOCAT}", "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", "TCP:{echo}"]
        endpoint: 127.0.0.1:{port}
        stop_grace: 1s"#
    )
}

/// Runs the real `tunnelkeeper` CLI with `args` against the daemon at `socket`.
pub fn cli(args: &[&str], socket: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tunnelkeeper"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}
