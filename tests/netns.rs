//! A real link going down: the daemon runs in a network namespace of its own, its best tunnel
//! crosses a veth pair to a service in a second namespace, its backup stays inside its own
//! namespace. Link down (on either side) → failover to the backup; link up → failback after
//! the hold. Clients reach the service through the failover listener on a Unix socket, which
//! (a file) is reachable from the test's namespace.
//!
//! The namespaces are the test's own (`tk-a-PID-N`, `tk-b-PID-N`, addresses 10.200.N.0/30 only
//! inside them) and are deleted afterwards, also when the test fails. Without root, or where
//! `ip netns add` is not permitted (an unprivileged container), the test prints `SKIPPED:` and
//! passes — except under `CI=true`, where it fails (test-support's `skip`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnelkeeper::control::client::Client;

/// Where the service listens inside namespace b (across the link).
const FAR_PORT: u16 = 7007;
/// The backup service on namespace a's own loopback.
const NEAR_PORT: u16 = 7008;
/// The jitter relay in namespace b, where the kernel has no netem.
const JITTER_PORT: u16 = 7009;

/// A relay adding 50–150 ms to every chunk in each direction, in order: `tc netem delay 100ms
/// 50ms` in user space, for kernels built without netem. Arguments: listen host and port,
/// target host and port.
const JITTER_RELAY: &str = r#"
import asyncio, random, sys
host, port, to_host, to_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def pipe(reader, writer):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    async def drain():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    task = asyncio.ensure_future(drain())
    last = 0.0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            last = max(last, loop.time() + random.uniform(0.05, 0.15))
            queue.put_nowait((last, data))
    finally:
        queue.put_nowait((0.0, None))
        await asyncio.gather(task, return_exceptions=True)
async def handle(client_reader, client_writer):
    try:
        up_reader, up_writer = await asyncio.open_connection(to_host, to_port)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer),
                         return_exceptions=True)
    client_writer.close()
    up_writer.close()
async def main():
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

/// Two namespaces joined by a veth pair, and the processes started in them; all removed on
/// drop (processes first: a namespace lives as long as a process in it).
struct Namespaces {
    a: String,
    b: String,
    /// Interface names inside a and b.
    a_if: &'static str,
    b_if: &'static str,
    /// 10.200.N.1 (in a) and 10.200.N.2 (in b).
    a_ip: String,
    b_ip: String,
    children: Vec<Child>,
}

impl Namespaces {
    /// Creates both namespaces and the link, or says why it cannot.
    fn create() -> Result<Namespaces, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("not root: network namespaces need CAP_SYS_ADMIN".to_string());
        }
        let pid = std::process::id();
        // Tests of this binary run in parallel: each pair of namespaces needs its own names.
        static PAIRS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = PAIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let a = format!("tk-a-{pid}-{n}");
        let b = format!("tk-b-{pid}-{n}");
        ip(&["netns", "add", &a]).map_err(|e| format!("`ip netns add` refused: {e}"))?;
        let subnet = pid % 250;
        // From here on, Drop cleans up whatever was created.
        let mut ns = Namespaces {
            a: a.clone(),
            b: String::new(),
            a_if: "veth-a",
            b_if: "veth-b",
            a_ip: format!("10.200.{subnet}.1"),
            b_ip: format!("10.200.{subnet}.2"),
            children: Vec::new(),
        };
        ip(&["netns", "add", &b])?;
        ns.b = b.clone();
        let a_cidr = format!("{}/30", ns.a_ip);
        let b_cidr = format!("{}/30", ns.b_ip);
        for args in [
            vec!["-n", &a, "link", "set", "lo", "up"],
            vec!["-n", &b, "link", "set", "lo", "up"],
            vec![
                "-n", &a, "link", "add", ns.a_if, "type", "veth", "peer", "name", ns.b_if, "netns",
                &b,
            ],
            vec!["-n", &a, "addr", "add", &a_cidr, "dev", ns.a_if],
            vec!["-n", &b, "addr", "add", &b_cidr, "dev", ns.b_if],
            vec!["-n", &a, "link", "set", ns.a_if, "up"],
            vec!["-n", &b, "link", "set", ns.b_if, "up"],
        ] {
            ip(&args)?;
        }
        Ok(ns)
    }

    /// Runs `argv` inside namespace `ns`, in its own process group (killed on drop).
    fn spawn_in(&mut self, ns: &str, argv: &[&str]) {
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("ip netns exec");
        self.children.push(child);
    }

    /// `ip link set IF up|down` inside `ns`.
    fn link(&self, ns: &str, interface: &str, state: &str) {
        ip(&["-n", ns, "link", "set", interface, state]).expect("ip link set");
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
        for ns in [&self.a, &self.b] {
            if !ns.is_empty() {
                if let Err(e) = ip(&["netns", "del", ns]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}

/// Runs `ip ARGS`; the error carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    iproute2("ip", args)
}

/// Runs an iproute2 `program` (`ip`, `tc`) with `args`; the error carries its stderr.
fn iproute2(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program} (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A socat server on `bind:port` answering every line with `tag-` + the line (so a reply
/// names the path it took).
fn tagged_echo(bind: &str, port: u16, tag: &str) -> Vec<String> {
    vec![
        SOCAT.to_string(),
        format!("TCP-LISTEN:{port},bind={bind},fork,reuseaddr"),
        format!("SYSTEM:sed -u s/^/{tag}-/"),
    ]
}

/// Starts the real binary inside namespace `ns` with `config`, as [`Daemon::start`] does on
/// the host.
async fn daemon_in(ns: &str, config: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config.replace("@DIR@", &dir.path().display().to_string());
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, text).unwrap();
    let socket = dir.path().join("control.sock");
    // `ip netns exec` execs the program itself: the child is the daemon.
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_tunnelkeeper"),
            "run",
            "-c",
        ])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("daemon.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let client = Client::new(&socket);
    let log = |dir: &Path| std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.status_json().await.is_err() {
        if let Ok(Some(exit)) = child.try_wait() {
            panic!(
                "daemon exited ({exit}) before answering:\n{}",
                log(dir.path())
            );
        }
        assert!(
            Instant::now() < deadline,
            "daemon never answered on its socket:\n{}",
            log(dir.path())
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

/// One line through the failover listener; returns the reply line.
async fn exchange(listener: &Path, line: &str) -> String {
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(listener).await?;
        s.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).await? == 1 && byte[0] != b'\n' {
            reply.push(byte[0]);
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&reply).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("exchange timed out")
        .expect("exchange failed")
}

/// The test's namespaces, or `None` (having said why) where they cannot be made.
fn namespaces() -> Option<Namespaces> {
    match Namespaces::create() {
        Ok(ns) => Some(ns),
        Err(why) => {
            tunnelkeeper_test_support::skip(format!("network namespaces unavailable: {why}"));
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_fails_over_to_the_local_path_and_back() {
    assert_socat();
    let Some(mut ns) = namespaces() else {
        return;
    };
    let (a, b) = (ns.a.clone(), ns.b.clone());
    let far = tagged_echo(&ns.b_ip, FAR_PORT, "far");
    ns.spawn_in(&b, &far.iter().map(String::as_str).collect::<Vec<_>>());
    let near = tagged_echo("127.0.0.1", NEAR_PORT, "near");
    ns.spawn_in(&a, &near.iter().map(String::as_str).collect::<Vec<_>>());

    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state", shutdown_grace: 2s }}
defaults:
  probe: {{ interval: 200ms, timeout: 200ms, rise: 2, fall: 3, send: "ping\n" }}
  failover: {{ failback_hold: 1s }}
  restart: {{ initial: 100ms, max: 1s }}
services:
  - name: far
    listen: "@DIR@/far.sock"
    connect_timeout: 500ms
    tunnels:
      - {{ name: link, provider: direct, priority: 10, address: "{b_ip}:{FAR_PORT}", probe: {{ expect: "far-ping" }} }}
      - {{ name: local, provider: direct, priority: 20, address: "127.0.0.1:{NEAR_PORT}", probe: {{ expect: "near-ping" }} }}
"#,
        b_ip = ns.b_ip,
    );
    let mut daemon = daemon_in(&a, &config).await;
    let listener: PathBuf = daemon.dir.path().join("far.sock");
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(20),
            "link elected",
            primary_changed(Some("link"), None),
        )
        .await;
    events.wait_up(&["local"]).await;
    assert_eq!(exchange(&listener, "hello").await, "far-hello");

    // Down on the far side first (the near end loses its carrier: packets vanish), then on the
    // near side (the route goes: dials fail at once). Either way only probes notice; the second
    // failure within 10 minutes doubles the link's hold.
    for (side, interface, min_hold) in [(&b, ns.b_if, 950u64), (&a, ns.a_if, 1900)] {
        let down_at = Instant::now();
        ns.link(side, interface, "down");
        let (at, e) = events
            .wait(
                Duration::from_secs(10),
                "failover to local",
                primary_changed(Some("local"), Some("link")),
            )
            .await;
        let reason = e["reason"].as_str().unwrap_or_default();
        assert!(
            !reason.contains("hard"),
            "a dead link is noticed by probes, not a hard signal: {reason}"
        );
        let took = at - down_at;
        eprintln!("{interface} down in {side}: failover after {took:?} ({reason})");
        assert!(took < Duration::from_secs(5), "failover took {took:?}");
        assert_eq!(exchange(&listener, "during").await, "near-during");

        ns.link(side, interface, "up");
        let (up_at, _) = events
            .wait(
                Duration::from_secs(20),
                "link back up",
                tunnel_event("tunnel_up", "link"),
            )
            .await;
        let (back_at, e) = events
            .wait(
                Duration::from_secs(20),
                "failback to link",
                primary_changed(Some("link"), Some("local")),
            )
            .await;
        assert!(
            e["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("failback"),
            "{e}"
        );
        let hold = back_at - up_at;
        eprintln!("{interface} up in {side}: failback {hold:?} after the link's tunnel_up");
        assert!(
            hold >= Duration::from_millis(min_hold),
            "failback after {hold:?}, before the hold"
        );
        assert_eq!(exchange(&listener, "after").await, "far-after");
    }

    let status = daemon.status().await;
    assert_eq!(status.services[0].primary.as_deref(), Some("link"));
    let exit = daemon.terminate();
    assert!(exit.success(), "daemon exit: {exit:?}\n{}", daemon.log());
}

/// Delays everything leaving `interface` in `ns` by 100 ms ± 50 ms (`tc netem delay 100ms
/// 50ms`); the error says why not (a kernel without `sch_netem`).
fn netem(ns: &str, interface: &str) -> Result<(), String> {
    iproute2(
        "tc",
        &[
            "-n", ns, "qdisc", "add", "dev", interface, "root", "netem", "delay", "100ms", "50ms",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jittery_link_never_goes_down_at_the_default_settings() {
    assert_socat();
    let Some(mut ns) = namespaces() else {
        return;
    };
    let b = ns.b.clone();
    let far = tagged_echo(&ns.b_ip, FAR_PORT, "far");
    ns.spawn_in(&b, &far.iter().map(String::as_str).collect::<Vec<_>>());
    // The link jitters: netem on b's side of the veth (replies and handshakes are delayed
    // 50–150 ms, reordered as netem does), or, where the kernel has no netem, a relay in b
    // that delays every chunk 50–150 ms each way.
    let port = match netem(&b, ns.b_if) {
        Ok(()) => {
            eprintln!("jitter: tc netem delay 100ms 50ms on {}", ns.b_if);
            FAR_PORT
        }
        Err(why) => {
            eprintln!("jitter: no netem ({why}); a user-space relay in {b} instead");
            let (port, far_port) = (JITTER_PORT.to_string(), FAR_PORT.to_string());
            let b_ip = ns.b_ip.clone();
            ns.spawn_in(
                &b,
                &[
                    "python3",
                    "-c",
                    JITTER_RELAY,
                    &b_ip,
                    &port,
                    &b_ip,
                    &far_port,
                ],
            );
            JITTER_PORT
        }
    };
    // Every timing is the built-in default.
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state", shutdown_grace: 2s }}
defaults:
  probe: {{ send: "ping\n", expect: "far-ping" }}
services:
  - name: far
    tunnels:
      - {{ name: link, provider: direct, address: "{b_ip}:{port}" }}
"#,
        b_ip = ns.b_ip,
    );
    let mut daemon = daemon_in(&ns.a, &config).await;
    let mut events = daemon.follow();
    events
        .wait(
            Duration::from_secs(30),
            "link up",
            tunnel_event("tunnel_up", "link"),
        )
        .await;
    let window = std::env::var("TK_JITTER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    eprintln!("watching the jittery link for {window:?}");
    // A window of time is what is being tested here, not a condition to wait for.
    tokio::time::sleep(window).await;
    let journal = daemon.journal().await;
    eprintln!("probe_failed: {:#?}", of_type(&journal, "probe_failed"));
    assert_eq!(
        of_type(&journal, "tunnel_down"),
        Vec::<String>::new(),
        "false failovers"
    );
    let status = daemon.status().await;
    let link = &status.services[0].tunnels[0];
    let latency = link.latency_ms.unwrap_or_default();
    eprintln!("link smoothed latency {latency:.0} ms");
    // The jitter was really on the path (at least 50 ms each way, or one way under netem).
    assert!(latency >= 50.0, "{link:?}");
    assert_eq!(link.state, tunnelkeeper::status::TunnelState::Up);
    let exit = daemon.terminate();
    assert!(exit.success(), "daemon exit: {exit:?}\n{}", daemon.log());
}
