//! The trust boundaries of issue 19, each shown against the real daemon binary: who may hold
//! the control socket (real uids and groups via `setpriv`/`runuser`), what a socket path may
//! be, what children inherit, what a hook can leave behind, how long a silent client may hold a
//! listener slot, and what a compromised router can put on the operator's terminal.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnelkeeper_test_support::sshd;

const BIN: &str = env!("CARGO_BIN_EXE_tunnelkeeper");

/// One service with a direct tunnel to `echo`; `extra_daemon` goes into the daemon section and
/// `service_extra` into the service (YAML lines at service indentation).
fn direct_config(echo: std::net::SocketAddr, extra_daemon: &str, service_extra: &str) -> String {
    format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state"{extra_daemon} }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 3, send: "x", expect: "x" }}
services:
  - name: web
{service_extra}
    tunnels:
      - {{ name: lan, provider: direct, address: "{echo}" }}
"#
    )
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Lets `nobody` reach the socket file, so only the daemon's own checks stand in the way.
fn open_socket_path(daemon: &Daemon) {
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
}

/// Python run as `nobody` (plus `groups`): opens `count` connections to `socket`, waits (up to
/// 4 s) until `expect_closed` of them have been closed by the daemon, then reports
/// `closed=N http=M` (connections closed, and how many of those said anything first) and holds
/// the open ones until its stdin closes.
fn flood_as_nobody(
    socket: &Path,
    count: usize,
    expect_closed: usize,
    groups: &str,
) -> std::process::Child {
    let script = format!(
        r#"
import socket, sys, select
conns = []
for _ in range({count}):
    s = socket.socket(socket.AF_UNIX)
    s.connect({socket:?})
    conns.append(s)
import time
deadline = time.time() + 4
while True:
    r, _, _ = select.select(conns, [], [], 0.1)
    if len(r) >= {expect_closed} or time.time() > deadline:
        break
time.sleep(0.3)
r, _, _ = select.select(conns, [], [], 0)
closed = http = 0
for s in r:
    closed += 1
    try:
        if s.recv(4096):
            http += 1
    except OSError:
        pass
print(f"closed={{closed}} http={{http}}", flush=True)
sys.stdin.read()
"#,
        socket = socket.display().to_string()
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=nobody",
        "--regid=nogroup",
        &format!("--groups={groups}"),
        "--",
        "/usr/bin/python3",
        "-c",
        &script,
    ]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv and python3")
}

fn first_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

fn nogroup() -> u32 {
    nix::unistd::Group::from_name("nogroup")
        .ok()
        .flatten()
        .or_else(|| nix::unistd::Group::from_name("nobody").ok().flatten())
        .expect("a nogroup group")
        .gid
        .as_raw()
}

/// `tunnelkeeper status` as root, timed.
fn root_status(socket: &Path) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["20", BIN, "status", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    (out, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_users_cannot_fill_the_control_socket() {
    if !as_root() {
        tunnelkeeper_test_support::skip("needs root to act as nobody");
        return;
    }
    let echo = echo_server().await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    // A denied peer: every connection is closed at once, without a word of HTTP, and root is
    // served while it holds 70 of them open.
    let daemon = Daemon::start(&direct_config(echo, "", "")).await;
    open_socket_path(&daemon);
    let mut flood = flood_as_nobody(&daemon.socket, 70, 70, &nogroup().to_string());
    assert_eq!(first_line(&mut flood), "closed=70 http=0");
    let (out, took) = root_status(&daemon.socket);
    assert!(out.status.success(), "root's status: {out:?}");
    assert!(took < Duration::from_secs(5), "root waited {took:?}");
    drop(flood.stdin.take());
    let _ = flood.wait();

    // A reader: at most its per-uid share stays open, and root still has room.
    let daemon = Daemon::start(&direct_config(
        echo,
        &format!(", readers: [\"uid:{nobody}\"]"),
        "",
    ))
    .await;
    open_socket_path(&daemon);
    let per_uid = tunnelkeeper::control::server::PER_UID;
    let mut flood = flood_as_nobody(&daemon.socket, 70, 70 - per_uid, &nogroup().to_string());
    let report = first_line(&mut flood);
    let closed: usize = report
        .strip_prefix("closed=")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(closed, 70 - per_uid, "{report}");
    assert!(report.ends_with("http=0"), "{report}");
    let (out, took) = root_status(&daemon.socket);
    assert!(out.status.success(), "root's status: {out:?}");
    assert!(took < Duration::from_secs(5), "root waited {took:?}");
    drop(flood.stdin.take());
    let _ = flood.wait();
}

/// A throwaway group, deleted on drop.
struct TempGroup(String);

impl TempGroup {
    fn create() -> TempGroup {
        let name = format!("tk-sec-{}", std::process::id());
        let out = Command::new("groupadd")
            .arg(&name)
            .output()
            .expect("groupadd");
        assert!(out.status.success(), "groupadd: {out:?}");
        TempGroup(name)
    }

    fn gid(&self) -> u32 {
        nix::unistd::Group::from_name(&self.0)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.0).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplementary_groups_make_readers_and_a_reload_takes_access_away() {
    if !as_root() {
        tunnelkeeper_test_support::skip("needs root for groupadd and setpriv");
        return;
    }
    let group = TempGroup::create();
    let echo = echo_server().await;
    let readers = format!(", readers: [\"group:{}\"]", group.0);
    let daemon = Daemon::start(&direct_config(echo, &readers, "")).await;
    open_socket_path(&daemon);
    // nobody with primary group nogroup and the reader group only as a supplementary one.
    let as_member = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=nobody",
            "--regid=nogroup",
            &format!("--groups={}", group.gid()),
            "--",
            BIN,
        ])
        .args(args)
        .arg("--socket")
        .arg(&daemon.socket);
        cmd
    };
    let out = as_member(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "a member through a supplementary group was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An open `events -f` of that member streams until a reload removes the group.
    let mut follower = as_member(&["events", "-f", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = first_line(&mut follower);
    assert!(line.contains("\"seq\""), "{line}");
    let config = daemon.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&readers, "");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(BIN)
        .args(["reload", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "reload: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while follower.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the removed reader's events -f kept streaming"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = as_member(&["status"]).output().unwrap();
    assert!(!out.status.success(), "still a reader after the reload");
}

/// Runs `tunnelkeeper run -c` on `config` (with `@DIR@` = `dir`) and expects it to fail.
fn run_expecting_failure(dir: &Path, config: &str) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(&path, config.replace("@DIR@", &dir.display().to_string())).unwrap();
    let out = Command::new("timeout")
        .args(["20", BIN, "run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "run succeeded: {out:?}");
    assert_ne!(out.status.code(), Some(124), "run hung");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_never_deletes_what_is_not_a_stale_socket() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let important = dir.path().join("important.txt");
    std::fs::write(&important, "keep me").unwrap();

    // The control socket path names a regular file: refused, file untouched.
    let config = direct_config(echo, "", "").replace("@DIR@/control.sock", "@DIR@/important.txt");
    let stderr = run_expecting_failure(dir.path(), &config);
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "keep me");
    // `check` says so too, instead of "ok".
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(dir.path().join("config.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("daemon.control_socket") && stderr.contains("not a socket"),
        "{stderr}"
    );

    // The same for a Unix failover listener.
    let config = direct_config(echo, "", "    listen: \"@DIR@/important.txt\"");
    let stderr = run_expecting_failure(dir.path(), &config);
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "keep me");

    // A start that fails after binding (a listener's port is taken) removes its sockets.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "{}  - name: other\n    listen: {}\n    tunnels:\n      - {{ name: lan2, provider: direct, address: \"{echo}\" }}\n",
        direct_config(echo, "", "    listen: \"@DIR@/web.sock\""),
        taken.local_addr().unwrap()
    );
    let stderr = run_expecting_failure(dir.path(), &config);
    assert!(stderr.contains("binding"), "{stderr}");
    assert!(
        !dir.path().join("control.sock").exists(),
        "control socket left behind"
    );
    assert!(
        !dir.path().join("web.sock").exists(),
        "listener socket left behind"
    );

    // A stale socket (nobody answers: ECONNREFUSED) is still replaced.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("control.sock")).unwrap());
    let mut daemon = {
        let config = direct_config(echo, "", "");
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            config.replace("@DIR@", &dir.path().display().to_string()),
        )
        .unwrap();
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let client = tunnelkeeper::control::client::Client::new(dir.path().join("control.sock"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.status_json().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the stale socket was not replaced"
        );
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// Polls for `path` to exist and hold something.
async fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                // The writer may still be writing: give it one more look after a pause.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return std::fs::read_to_string(path).unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_get_an_allowlisted_environment_and_secrets_from_env_file() {
    let echo = echo_server().await;
    let dir_env = tempfile::tempdir().unwrap();
    let env_file = dir_env.path().join("bore.env");
    std::fs::write(
        &env_file,
        "# the command's secret\nBORE_TOKEN=from-the-file-7f3a\n",
    )
    .unwrap();
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state" }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 3, send: "x", expect: "x" }}
services:
  - name: web
    hooks:
      - on: [primary_changed]
        run: [sh, -c, 'env > "@DIR@/hook.env"']
    tunnels:
      - name: cmd
        provider: command
        run: [sh, -c, 'env > "@DIR@/tunnel.env"; exec sleep 600']
        endpoint: "{echo}"
        env: {{ OWN: mine }}
        env_file: "{}"
        stop_grace: 1s
"#,
        env_file.display()
    );
    let daemon = Daemon::start_with_env(
        &config,
        &[
            ("LEAKY_TOKEN", "daemon-secret-91c2".as_ref()),
            ("SSH_AUTH_SOCK", "/tmp/agent.sock".as_ref()),
            ("TK_SITE", "lab".as_ref()),
        ],
    )
    .await;
    for (file, own) in [
        ("tunnel.env", "OWN=mine"),
        ("hook.env", "TK_EVENT=primary_changed"),
    ] {
        let env = wait_file(&daemon.dir.path().join(file)).await;
        assert!(env.contains(own), "{file}: {env}");
        assert!(
            env.contains("TK_SITE=lab"),
            "{file}: TK_* not passed: {env}"
        );
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{file}: {env}");
        for leaked in ["LEAKY_TOKEN", "SSH_AUTH_SOCK", "RUST_LOG"] {
            assert!(!env.contains(leaked), "{file}: {leaked} leaked: {env}");
        }
        if file == "tunnel.env" {
            assert!(env.contains("BORE_TOKEN=from-the-file-7f3a"), "{env}");
        } else {
            assert!(
                !env.contains("BORE_TOKEN"),
                "the tunnel's secret reached a hook"
            );
        }
    }
    // The secret from the file is never logged.
    assert!(!daemon.log().contains("from-the-file-7f3a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_hook_leaves_behind_with_setsid_dies_with_the_daemon() {
    let echo = echo_server().await;
    let config = direct_config(
        echo,
        "",
        "    hooks:\n      - on: [primary_changed]\n        run: [sh, -c, 'setsid sh -c \"echo \\$$ > @DIR@/orphan.pid; exec sleep 77\" & while [ ! -s @DIR@/orphan.pid ]; do sleep 0.05; done']",
    );
    let mut daemon = Daemon::start(&config).await;
    let pid: u32 = wait_file(&daemon.dir.path().join("orphan.pid"))
        .await
        .trim()
        .parse()
        .unwrap();
    let is_sleep = |pid: u32| {
        alive(pid)
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"sleep\x0077"))
    };
    // The hook has ended and its group was killed; the escaped sleep was adopted by the daemon.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == daemon.child.id() && is_sleep(pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphan {pid} has parent {ppid}, not the daemon {}: {stat:?}\n{}",
            daemon.child.id(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(daemon.terminate().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_sleep(pid) {
        assert!(
            Instant::now() < deadline,
            "setsid sleep 77 outlived the daemon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_cannot_hold_listener_slots() {
    let echo = echo_server().await;
    let port = free_port();
    let config = direct_config(
        echo,
        "",
        &format!("    listen: 127.0.0.1:{port}\n    max_connections: 2\n    idle_timeout: 1s"),
    );
    let daemon = Daemon::start(&config).await;
    daemon.follow().wait_elected(&["web"]).await;
    let addr = format!("127.0.0.1:{port}");
    // Two clients take both slots and say nothing: each is closed after the idle timeout.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let started = Instant::now();
    for mut s in silent {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("a silent client kept its slot")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // The slots are free again: a talking client is served.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_output_cannot_drive_the_operators_terminal() {
    let sshd = sshd::Sshd::start("")
        .await
        .expect("sshd (scripts/test installs it)");
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    // A compromised router answers with a title-setting OSC, a screen clear and a fake line.
    std::fs::write(
        dir.path().join("boot_id"),
        "\x1b]0;pwned\x07boot\x1b[2J\rfake line\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("verify"), "x\x1b[31mred\n").unwrap();
    let d = dir.path().display();
    let router = router_yaml(
        sshd.port,
        &sshd::current_user(),
        &sshd.client_key,
        &sshd.known_hosts,
        "connect_timeout: 5s, auth_timeout: 5s",
        &format!(
            r#"    boot_id_command: "cat {d}/boot_id"
    check_interval: 1s
    verify: [{{ name: drift, command: "cat {d}/verify", expect: "ok" }}]
    verify_interval: 1s
    command_timeout: 5s
"#
        ),
    );
    let config =
        direct_config(echo, "", "").replacen("services:", &format!("{router}services:"), 1);
    let daemon = Daemon::start(&config).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = daemon.status().await;
        let r = &status.routers[0];
        if r.boot_id.is_some() && r.checks.first().is_some_and(|c| c.got.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "router never read: {:?}",
            status.routers
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.bytes().any(|b| b == 0x1b || b == 0x07 || b == b'\r'),
        "raw control bytes reached the terminal: {text:?}"
    );
    assert!(text.contains("\\x1b]0;pwned\\x07boot"), "{text}");
    assert!(text.contains("\\x1b[31mred"), "{text}");
    // The JSON form is escaped by JSON itself and keeps the exact bytes.
    let status = daemon.status().await;
    assert!(status.routers[0]
        .boot_id
        .as_deref()
        .unwrap()
        .contains('\x1b'));
}
