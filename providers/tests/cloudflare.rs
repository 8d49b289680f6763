//! The `cloudflare` provider against an emulated cloudflared (`tests/emulators/cloudflared`),
//! run as a real child process on loopback: a local port stands in for Cloudflare's edge and
//! relays to an echo server, and a control file switches the emulator to not-ready, failing or
//! dead. Each test gets its own wrapper script named `cloudflared` that sets the emulator's
//! environment, so tests never touch the shared process environment.

mod common;

use std::fmt::{self, Write as _};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::{argv, ctx, echo_server, eventually, free_port, round_trip, PATIENCE};
use data_encoding::BASE64;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnelkeeper_providers::cloudflare::{
    CloudflareMode, CloudflareProvider, CloudflareSettings, CloudflareSpec,
};
use tunnelkeeper_providers::process::{self, ExitInfo, RunSpec};
use tunnelkeeper_providers::spec::Hostname;
use tunnelkeeper_providers::{Provider, ProviderError, Tunnel};

/// The emulator script, run through each test's wrapper.
const EMULATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/emulators/cloudflared");
/// The hostname the emulator gives a quick tunnel unless told otherwise (fixtures).
const FIXTURE_QUICK_HOSTNAME: &str = "fancy-river-sound-example.trycloudflare.com";

// ---------------------------------------------------------------------------------------------
// Log capture: every tracing event of this test binary, as text, so tests can prove a secret
// never reached a log line (child output is forwarded into tracing by the process module).

static CAPTURED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the capturing subscriber once for the whole test binary.
fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Another subscriber cannot be installed in this binary; if it were, the log
        // assertions below would fail loudly (they also require a known line to be captured).
        let _ = tracing::subscriber::set_global_default(Capture::default());
    });
}

fn captured() -> Vec<String> {
    CAPTURED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A minimal subscriber that keeps every event and span field as one line of text.
#[derive(Default)]
struct Capture {
    next_span: AtomicU64,
}

#[derive(Default)]
struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

fn keep(line: String) {
    CAPTURED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(line);
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = Fields::default();
        span.record(&mut fields);
        keep(format!("span {}{}", span.metadata().name(), fields.0));
        tracing::span::Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        keep(format!("record{}", fields.0));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        keep(format!(
            "{} {}{}",
            event.metadata().level(),
            event.metadata().target(),
            fields.0
        ));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

// ---------------------------------------------------------------------------------------------
// The emulated cloudflared

/// One emulated cloudflared: a wrapper script named `cloudflared` in a private directory, its
/// control file, and the port standing in for Cloudflare's edge.
struct Emu {
    dir: tempfile::TempDir,
    binary: PathBuf,
    control: PathBuf,
    public_port: u16,
}

impl Emu {
    /// A wrapper that runs the emulator with `env` plus the control file and edge port.
    fn new(env: &[(&str, String)]) -> Emu {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control");
        let public_port = free_port();
        let mut script = String::from("#!/bin/sh\n");
        let mut all: Vec<(&str, String)> = vec![
            ("EMU_CONTROL", control.display().to_string()),
            ("EMU_PUBLIC_PORT", public_port.to_string()),
        ];
        all.extend(env.iter().cloned());
        for (name, value) in all {
            script.push_str(&format!(
                "export {name}='{}'\n",
                value.replace('\'', "'\\''")
            ));
        }
        // This process's TUNNEL_TOKEN (set by the one test about an inherited token) reaches
        // only that test's cloudflared: every other test stays independent of it.
        script.push_str("[ \"$EMU_KEEP_TUNNEL_TOKEN\" = 1 ] || unset TUNNEL_TOKEN\n");
        script.push_str(&format!("exec '{EMULATOR}' \"$@\"\n"));
        let binary = dir.path().join("cloudflared");
        std::fs::write(&binary, script).expect("write wrapper");
        make_executable(&binary);
        Emu {
            dir,
            binary,
            control,
            public_port,
        }
    }

    /// Switches the emulator (`ok`, `notready`, `fail`, `die`); written whole, then renamed, so
    /// the emulator never reads half a word.
    fn control(&self, word: &str) {
        let tmp = self.dir.path().join("control.tmp");
        std::fs::write(&tmp, word).expect("write control");
        std::fs::rename(&tmp, &self.control).expect("rename control");
    }

    /// A token file in the private directory.
    fn token_file(&self, content: &str) -> PathBuf {
        let path = self.dir.path().join("cf_token");
        std::fs::write(&path, content).expect("write token");
        path
    }

    fn spec(&self, mode: CloudflareMode) -> CloudflareSpec {
        let mut spec = CloudflareSpec::new(mode);
        spec.binary = Some(self.binary.display().to_string());
        spec.port = self.public_port;
        // Generous for loaded CI boxes; the happy path takes well under a second.
        spec.ready_timeout = Duration::from_secs(20);
        spec.stop_grace = Duration::from_secs(5);
        spec
    }

    /// A named tunnel whose public hostname is the loopback "edge".
    fn named(&self, token: &str) -> CloudflareSpec {
        self.spec(CloudflareMode::Named {
            token_file: self.token_file(token),
            hostname: host("127.0.0.1"),
        })
    }
}

/// A host name the tests know to be valid.
fn host(name: &str) -> Hostname {
    Hostname::parse(name).expect("a valid host name")
}

/// The token file of a named tunnel's spec.
fn token_file_of(spec: &CloudflareSpec) -> PathBuf {
    match &spec.mode {
        CloudflareMode::Named { token_file, .. } => token_file.clone(),
        other => panic!("not a named tunnel: {other:?}"),
    }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).expect("metadata").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms).expect("chmod");
}

/// `n` random bytes from the kernel.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_uuid() -> String {
    let h = hex(&random_bytes(16));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A well-formed, unique tunnel token (base64 of `{"a","t","s"}` as cloudflared expects).
fn fresh_token() -> String {
    let json = format!(
        r#"{{"a":"{}","t":"{}","s":"{}"}}"#,
        hex(&random_bytes(16)),
        random_uuid(),
        BASE64.encode(&random_bytes(32))
    );
    BASE64.encode(json.as_bytes())
}

/// The arguments of a running process (NUL-separated in procfs).
fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read cmdline");
    raw.split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// The trailing arguments after the program (the emulator runs under a python interpreter,
/// so the head of the command line varies).
fn args_tail(pid: u32, n: usize) -> Vec<String> {
    let all = cmdline(pid);
    all[all.len().saturating_sub(n)..].to_vec()
}

/// Every process whose command line contains `needle`.
fn processes_with_in_cmdline(needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return hits;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes come and go, and some are not ours to read: skip those.
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&raw).replace('\0', " ");
            if text.contains(needle) {
                hits.push(format!("{pid}: {text}"));
            }
        }
    }
    hits
}

/// Starts a tunnel that must come up.
async fn up(spec: CloudflareSpec) -> Arc<dyn Tunnel> {
    CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start")
}

/// Whether the check currently fails with `Unhealthy`.
async fn unhealthy(tunnel: &Arc<dyn Tunnel>) -> Option<String> {
    match tunnel.check().await {
        Err(ProviderError::Unhealthy(why)) => Some(why),
        _ => None,
    }
}

/// Whether a fresh stream through the tunnel echoes bytes back.
async fn echoes(tunnel: &Arc<dyn Tunnel>) -> bool {
    let Ok(mut stream) = tunnel.dial(Duration::from_secs(2)).await else {
        return false;
    };
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"ping"
    )
}

fn show(result: &Result<Arc<dyn Tunnel>, ProviderError>) -> String {
    match result {
        Ok(tunnel) => format!("a running tunnel to {}", tunnel.endpoint()),
        Err(err) => format!("{err:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tunnel mode with a token

#[tokio::test]
async fn named_tunnel_comes_up_with_its_hostname_and_carries_bytes() {
    capture_logs();
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_ORIGIN", echo.to_string())]);
    let spec = emu.named(&fresh_token());
    let token_file = token_file_of(&spec);
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, "127.0.0.1");
    let pid = tunnel.pid().expect("pid");

    // The documented command line, with the token file's path (never the token).
    let tail = args_tail(pid, 9);
    assert_eq!(&tail[..3], &["tunnel", "--no-autoupdate", "--metrics"]);
    assert!(tail[3].starts_with("127.0.0.1:"), "{tail:?}");
    assert_eq!(
        &tail[4..],
        &[
            "--grace-period",
            "4000ms",
            "run",
            "--token-file",
            &token_file.display().to_string()
        ]
    );

    let health = tunnel.check().await.expect("healthy");
    assert_eq!(health.detail.as_deref(), Some("4 edge connections"));
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"through the edge").await,
        b"through the edge"
    );
    // Nothing in flight: cloudflared's drain ends at once.
    drop(stream);

    tunnel.stop().await;
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed after stop");
    // cloudflared exits 0 after a graceful shutdown.
    assert!(reason.contains("exited with status 0"), "{reason}");
    assert!(
        reason.contains("Unregistered tunnel connection"),
        "{reason}"
    );
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Closed(_))
    ));
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
    tunnel.stop().await; // idempotent
}

#[tokio::test]
async fn not_ready_fails_the_check_then_recovers() {
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_ORIGIN", echo.to_string())]);
    let tunnel = up(emu.named(&fresh_token())).await;
    assert!(echoes(&tunnel).await);

    emu.control("notready");
    assert!(
        eventually(PATIENCE, || async { unhealthy(&tunnel).await.is_some() }).await,
        "check never failed after the edge connections went away"
    );
    let why = unhealthy(&tunnel).await.expect("still unhealthy");
    assert!(
        why.contains("503") && why.contains("readyConnections=0"),
        "{why}"
    );
    assert!(!echoes(&tunnel).await, "bytes still flow while not ready");

    emu.control("ok");
    assert!(
        eventually(PATIENCE, || async { tunnel.check().await.is_ok() }).await,
        "check never recovered"
    );
    assert!(
        eventually(PATIENCE, || echoes(&tunnel)).await,
        "bytes never flowed again"
    );
    tunnel.stop().await;
}

#[tokio::test]
async fn kill_9_resolves_closed_at_once() {
    let emu = Emu::new(&[]);
    let tunnel = up(emu.named(&fresh_token())).await;
    let pid = tunnel.pid().expect("pid");
    let watcher = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.closed().await })
    };
    let killed_at = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
    let reason = tokio::time::timeout(PATIENCE, watcher)
        .await
        .expect("closed in time")
        .expect("join");
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "hard signal took {:?}",
        killed_at.elapsed()
    );
    assert!(reason.contains("killed by signal 9"), "{reason}");
    assert_eq!(tunnel.closed().await, reason);
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Closed(_))
    ));
}

#[tokio::test]
async fn die_resolves_closed_at_once() {
    let emu = Emu::new(&[]);
    let tunnel = up(emu.named(&fresh_token())).await;
    let watcher = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.closed().await })
    };
    let died_at = Instant::now();
    emu.control("die");
    let reason = tokio::time::timeout(PATIENCE, watcher)
        .await
        .expect("closed in time")
        .expect("join");
    // The emulator polls its control file every 50 ms.
    assert!(
        died_at.elapsed() < Duration::from_secs(2),
        "hard signal took {:?}",
        died_at.elapsed()
    );
    assert!(reason.contains("exited with status 2"), "{reason}");
}

#[tokio::test]
async fn runtime_failure_is_reported_with_cloudflareds_error_line() {
    let emu = Emu::new(&[]);
    let tunnel = up(emu.named(&fresh_token())).await;
    emu.control("fail");
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed in time");
    assert!(reason.contains("exited with status 1"), "{reason}");
    assert!(
        reason.contains("ERR Unable to establish connection with Cloudflare edge"),
        "{reason}"
    );
}

#[tokio::test]
async fn bad_token_fails_start_at_once_with_cloudflareds_reason() {
    capture_logs();
    let emu = Emu::new(&[]);
    let bad = format!("not-a-token-{}", hex(&random_bytes(16)));
    let started = Instant::now();
    let result = CloudflareProvider::new(emu.named(&bad)).start(&ctx()).await;
    let msg = match &result {
        Err(ProviderError::Spawn(msg)) => msg.clone(),
        _ => panic!("expected a spawn error, got {}", show(&result)),
    };
    assert!(msg.contains("Provided Tunnel token is not valid."), "{msg}");
    // cli.Exit(msg, -1): status 255.
    assert!(msg.contains("exited with status 255"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited for the ready timeout instead of the exit: {:?}",
        started.elapsed()
    );
    assert!(!msg.contains(&bad), "the error quotes the token: {msg}");
    let leaked: Vec<String> = captured()
        .into_iter()
        .filter(|l| l.contains(&bad))
        .collect();
    assert!(leaked.is_empty(), "the token reached the logs: {leaked:?}");
}

#[tokio::test]
async fn token_the_edge_refuses_times_out_with_the_edge_error() {
    let emu = Emu::new(&[]);
    // Well-formed base64 JSON, but no secret: cloudflared accepts it and the edge refuses it.
    let token = BASE64.encode(
        format!(
            r#"{{"a":"{}","t":"{}"}}"#,
            hex(&random_bytes(16)),
            random_uuid()
        )
        .as_bytes(),
    );
    let mut spec = emu.named(&token);
    spec.ready_timeout = Duration::from_secs(2);
    let result = CloudflareProvider::new(spec).start(&ctx()).await;
    match &result {
        Err(ProviderError::StartTimeout { after, detail }) => {
            assert_eq!(*after, Duration::from_secs(2));
            assert!(detail.contains("503"), "{detail}");
            assert!(
                detail.contains("Unauthorized: Tunnel not found"),
                "{detail}"
            );
        }
        _ => panic!("expected StartTimeout, got {}", show(&result)),
    }
}

#[tokio::test]
async fn never_ready_times_out_and_leaves_no_process() {
    let emu = Emu::new(&[]);
    emu.control("notready");
    let mut spec = emu.named(&fresh_token());
    // Long enough for the emulator's metrics server to answer 503 on a loaded box (python
    // alone can take a second to start there, and a whole test run competes for the cores).
    spec.ready_timeout = Duration::from_secs(6);
    let marker = token_file_of(&spec).display().to_string();
    let started = Instant::now();
    let result = CloudflareProvider::new(spec).start(&ctx()).await;
    match &result {
        Err(ProviderError::StartTimeout { detail, .. }) => {
            assert!(detail.contains("readyConnections=0"), "{detail}");
            assert!(detail.contains("last log line"), "{detail}");
        }
        _ => panic!("expected StartTimeout, got {}", show(&result)),
    }
    assert!(started.elapsed() >= Duration::from_secs(6));
    assert!(
        eventually(PATIENCE, || async {
            processes_with_in_cmdline(&marker).is_empty()
        })
        .await,
        "cloudflared outlived a failed start: {:?}",
        processes_with_in_cmdline(&marker)
    );
}

#[tokio::test]
async fn cloudflared_below_the_token_file_floor_is_refused_naming_the_minimum() {
    let argv_log = tempfile::NamedTempFile::new().expect("argv log");
    let log = argv_log.path().display().to_string();
    let emu = Emu::new(&[
        ("EMU_VERSION", "2025.2.1".to_string()),
        ("EMU_ARGV_LOG", log.clone()),
    ]);
    let result = CloudflareProvider::new(emu.named(&fresh_token()))
        .start(&ctx())
        .await;
    match &result {
        Err(ProviderError::Config(msg)) => {
            assert!(msg.contains("2025.2.1"), "{msg}");
            assert!(msg.contains("2025.4.0"), "{msg}");
            assert!(msg.contains("upgrade"), "{msg}");
        }
        _ => panic!("expected a config error, got {}", show(&result)),
    }
    // Only the version was asked: no tunnel was run.
    let runs = std::fs::read_to_string(&log).expect("argv log");
    assert_eq!(runs.lines().count(), 1, "{runs}");
    assert!(runs.contains("--version"), "{runs}");

    // The floor itself is enough.
    let emu = Emu::new(&[("EMU_VERSION", "2025.4.0".to_string())]);
    let tunnel = CloudflareProvider::new(emu.named(&fresh_token()))
        .start(&ctx())
        .await
        .expect("2025.4.0 has --token-file");
    tunnel.stop().await;
}

#[tokio::test]
async fn an_inherited_tunnel_token_does_not_override_the_token_file() {
    // A TUNNEL_TOKEN in the daemon's environment (here: this test process's) wins over
    // --token-file in cloudflared. This one names a tunnel the edge refuses: if it reached
    // cloudflared, the tunnel would never be ready.
    let refused = BASE64.encode(format!(r#"{{"t":"{}"}}"#, random_uuid()).as_bytes());
    std::env::set_var("TUNNEL_TOKEN", &refused);
    let argv_log = tempfile::NamedTempFile::new().expect("argv log");
    let echo = echo_server().await;
    let emu = Emu::new(&[
        ("EMU_ORIGIN", echo.to_string()),
        ("EMU_ARGV_LOG", argv_log.path().display().to_string()),
        ("EMU_KEEP_TUNNEL_TOKEN", "1".to_string()),
    ]);
    let mut spec = emu.named(&fresh_token());
    spec.ready_timeout = Duration::from_secs(5);
    let result = CloudflareProvider::new(spec).start(&ctx()).await;
    let tunnel = match result {
        Ok(tunnel) => tunnel,
        Err(err) => panic!("the inherited TUNNEL_TOKEN reached cloudflared: {err:?}"),
    };
    assert!(echoes(&tunnel).await);
    let runs = std::fs::read_to_string(argv_log.path()).expect("argv log");
    let run = runs
        .lines()
        .find(|l| l.contains("--token-file"))
        .expect("the tunnel run");
    assert!(run.contains(r#""tunnel_token_env": false"#), "{run}");
    tunnel.stop().await;
}

#[tokio::test]
async fn stop_lets_a_request_in_flight_drain_and_cloudflared_exit_by_itself() {
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_ORIGIN", echo.to_string())]);
    let mut spec = emu.named(&fresh_token());
    spec.stop_grace = Duration::from_secs(2);
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    let tail = args_tail(tunnel.pid().expect("pid"), 5);
    assert_eq!(&tail[..2], &["--grace-period", "1500ms"], "{tail:?}");

    // A long request in flight when stop comes.
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"before").await, b"before");
    let stopping = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.stop().await })
    };
    // It keeps flowing while cloudflared drains...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(round_trip(&mut stream, b"during").await, b"during");
    // ...and new requests get the edge's error page, not the service.
    let mut fresh = tokio::net::TcpStream::connect(("127.0.0.1", emu.public_port))
        .await
        .expect("the edge accepts");
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut page = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, fresh.read_to_end(&mut page)).await;
    assert!(String::from_utf8_lossy(&page).contains("1033"), "{page:?}");

    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stop in time")
        .expect("join");
    let reason = tunnel.closed().await;
    // cloudflared ended its own drain within our grace: exit 0, not our SIGKILL.
    assert!(reason.contains("exited with status 0"), "{reason}");
}

#[tokio::test]
async fn edge_answers_1033_while_down_so_dial_asks_cloudflared_first() {
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_ORIGIN", echo.to_string())]);
    let tunnel = up(emu.named(&fresh_token())).await;
    assert!(echoes(&tunnel).await);
    emu.control("notready");
    assert!(
        eventually(PATIENCE, || async { unhealthy(&tunnel).await.is_some() }).await,
        "never unready"
    );
    // The edge still accepts on its port and serves the 1033 page...
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", emu.public_port))
        .await
        .expect("the edge accepts while the tunnel is down");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut page = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut page)).await;
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.starts_with("HTTP/1.1 530") && page.contains("1033"),
        "{page}"
    );
    // ...so dial does not take the connect for a path.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    match tunnel.dial(PATIENCE).await {
        Err(ProviderError::Unhealthy(why)) => assert!(why.contains("readyConnections=0"), "{why}"),
        other => panic!("expected Unhealthy, got {other:?}"),
    }
    tunnel.stop().await;
}

#[tokio::test]
async fn token_is_in_no_cmdline_environment_log_line_or_debug_output() {
    capture_logs();
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_ORIGIN", echo.to_string())]);
    let token = fresh_token();
    let spec = emu.named(&token);
    let token_path = token_file_of(&spec).display().to_string();
    let provider = CloudflareProvider::new(spec.clone());
    let tunnel = provider.start(&ctx()).await.expect("start");
    assert!(echoes(&tunnel).await);
    let pid = tunnel.pid().expect("pid");

    // The scan works: cloudflared's command line names the token file...
    assert!(
        !processes_with_in_cmdline(&token_path).is_empty(),
        "the /proc scan missed cloudflared"
    );
    // ...but no command line holds the token.
    let in_cmdline = processes_with_in_cmdline(&token);
    assert!(
        in_cmdline.is_empty(),
        "token on a command line: {in_cmdline:?}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    assert!(
        !String::from_utf8_lossy(&environ).contains(&token),
        "token in cloudflared's environment"
    );
    for debug in [format!("{spec:?}"), format!("{provider:?}")] {
        assert!(!debug.contains(&token), "token in Debug output: {debug}");
        assert!(
            debug.contains(&token_path),
            "Debug should name the path: {debug}"
        );
    }

    emu.control("notready");
    assert!(eventually(PATIENCE, || async { unhealthy(&tunnel).await.is_some() }).await);
    tunnel.stop().await;
    let reason = tunnel.closed().await;
    assert!(!reason.contains(&token));

    let logs = captured();
    // The capture works: cloudflared's start line (with the token file's path) is there...
    assert!(
        logs.iter().any(|l| l.contains(&token_path)),
        "the capture missed this tunnel's start line"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("Registered tunnel connection")),
        "the capture missed cloudflared's output"
    );
    // ...and the token is not.
    let leaked: Vec<&String> = logs.iter().filter(|l| l.contains(&token)).collect();
    assert!(leaked.is_empty(), "the token reached the logs: {leaked:?}");
}

#[tokio::test]
async fn missing_or_empty_token_file_is_a_config_error() {
    let emu = Emu::new(&[]);
    let mut spec = emu.named("");
    let result = CloudflareProvider::new(spec.clone()).start(&ctx()).await;
    match &result {
        Err(ProviderError::Config(msg)) => assert!(msg.contains("empty"), "{msg}"),
        _ => panic!("expected a config error, got {}", show(&result)),
    }
    spec.mode = CloudflareMode::Named {
        token_file: emu.dir.path().join("no-such-token"),
        hostname: host("127.0.0.1"),
    };
    let result = CloudflareProvider::new(spec).start(&ctx()).await;
    match &result {
        Err(ProviderError::Config(msg)) => assert!(msg.contains("no-such-token"), "{msg}"),
        _ => panic!("expected a config error, got {}", show(&result)),
    }
}

// ---------------------------------------------------------------------------------------------
// Quick tunnels

#[tokio::test]
async fn quick_tunnel_hostname_comes_from_quicktunnel() {
    let echo = echo_server().await;
    // No banner: the hostname can only come from GET /quicktunnel.
    let emu = Emu::new(&[("EMU_QUICK_BANNER", "0".to_string())]);
    let url = format!("http://{echo}");
    let spec = emu.spec(CloudflareMode::Quick { url: url.clone() });
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, FIXTURE_QUICK_HOSTNAME);
    let tail = args_tail(tunnel.pid().expect("pid"), 8);
    assert_eq!(&tail[..3], &["tunnel", "--no-autoupdate", "--metrics"]);
    assert!(tail[3].starts_with("127.0.0.1:"), "{tail:?}");
    assert_eq!(
        &tail[4..],
        &["--grace-period", "4000ms", "--url", url.as_str()]
    );
    tunnel.check().await.expect("healthy");
    tunnel.stop().await;
}

#[tokio::test]
async fn quick_tunnel_carries_bytes_to_its_url() {
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_QUICK_HOSTNAME", "localhost".to_string())]);
    let spec = emu.spec(CloudflareMode::Quick {
        url: format!("http://{echo}"),
    });
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, "localhost");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"quick").await, b"quick");
    tunnel.stop().await;
}

#[tokio::test]
async fn quick_tunnel_falls_back_to_the_banner_without_quicktunnel_route() {
    let emu = Emu::new(&[
        ("EMU_NO_QUICKTUNNEL_ROUTE", "1".to_string()),
        (
            "EMU_QUICK_HOSTNAME",
            "banner-only-words-example.trycloudflare.com".to_string(),
        ),
    ]);
    let spec = emu.spec(CloudflareMode::Quick {
        url: "http://127.0.0.1:9".to_string(),
    });
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(
        tunnel.endpoint().display,
        "banner-only-words-example.trycloudflare.com"
    );
    tunnel.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Access mode

#[tokio::test]
async fn access_mode_dials_the_local_listener() {
    let echo = echo_server().await;
    let emu = Emu::new(&[("EMU_ORIGIN", echo.to_string())]);
    let spec = emu.spec(CloudflareMode::Access {
        hostname: host("ssh.example.com"),
        service_token: None,
    });
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, "ssh.example.com");
    let tail = args_tail(tunnel.pid().expect("pid"), 6);
    assert_eq!(
        &tail[..5],
        &["access", "tcp", "--hostname", "ssh.example.com", "--url"]
    );
    assert!(tail[5].starts_with("127.0.0.1:"), "{tail:?}");

    tunnel.check().await.expect("listening");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"behind access").await,
        b"behind access"
    );

    emu.control("fail");
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed in time");
    assert!(reason.contains("exited with status 1"), "{reason}");
    assert!(reason.contains("Error on Websocket listener"), "{reason}");
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
}

#[tokio::test]
async fn access_service_token_reaches_cloudflared_in_its_environment_only() {
    let echo = echo_server().await;
    let id = format!("{}.access", hex(&random_bytes(8)));
    let secret = hex(&random_bytes(16));
    let emu = Emu::new(&[
        ("EMU_ORIGIN", echo.to_string()),
        ("EMU_ACCESS_TOKEN", format!("{id}:{secret}")),
    ]);
    let id_file = emu.dir.path().join("cf_id");
    let secret_file = emu.dir.path().join("cf_secret");
    std::fs::write(&id_file, format!("{id}\n")).expect("id");
    std::fs::write(&secret_file, format!("{secret}\n")).expect("secret");
    let spec = emu.spec(CloudflareMode::Access {
        hostname: host("ssh.example.com"),
        service_token: Some((id_file, secret_file)),
    });
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"with a token").await,
        b"with a token"
    );
    assert!(processes_with_in_cmdline(&secret).is_empty());
    tunnel.stop().await;

    // Without the token the stand-in refuses the stream, as Access would.
    let spec = emu.spec(CloudflareMode::Access {
        hostname: host("ssh.example.com"),
        service_token: None,
    });
    let tunnel = CloudflareProvider::new(spec)
        .start(&ctx())
        .await
        .expect("start");
    assert!(!echoes(&tunnel).await);
    tunnel.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Setup errors

#[tokio::test]
async fn missing_binary_names_cloudflared_and_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let absent = dir.path().join("cloudflared").display().to_string();
    let mut spec = CloudflareSpec::new(CloudflareMode::Quick {
        url: "http://127.0.0.1:8080".to_string(),
    });
    spec.binary = Some(absent.clone());
    let result = CloudflareProvider::new(spec.clone()).start(&ctx()).await;
    match &result {
        Err(ProviderError::MissingBinary { binary, hint }) => {
            assert_eq!(binary, &absent);
            assert!(hint.contains("install cloudflared"), "{hint}");
            assert!(hint.contains("binary:"), "{hint}");
        }
        _ => panic!("expected MissingBinary, got {}", show(&result)),
    }

    // The default program is `cloudflared` from PATH; only assertable where it is not installed.
    let installed = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("cloudflared").exists())
    });
    if installed {
        eprintln!("cloudflared is installed here; skipping the PATH lookup case");
        return;
    }
    spec.binary = None;
    let result = CloudflareProvider::new(spec).start(&ctx()).await;
    match &result {
        Err(err @ ProviderError::MissingBinary { binary, .. }) => {
            assert_eq!(binary, "cloudflared");
            assert!(err
                .to_string()
                .starts_with("`cloudflared` not found: install cloudflared"));
        }
        _ => panic!("expected MissingBinary, got {}", show(&result)),
    }
}

#[test]
fn settings_that_cannot_work_cannot_be_built() {
    // What start used to refuse before spawning cannot be a spec at all: each rule says so
    // once, at its key.
    let access = CloudflareSettings {
        mode: Some("access".to_string()),
        binary: Some("/nonexistent/cloudflared".to_string()),
        ..CloudflareSettings::default()
    };
    match access.parse() {
        Err(errors) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].key, "hostname");
        }
        Ok(spec) => panic!("built {spec:?}"),
    }
    let tunnel = CloudflareSettings {
        binary: Some("/nonexistent/cloudflared".to_string()),
        ..CloudflareSettings::default()
    };
    match tunnel.parse() {
        Err(errors) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            let message = &errors[0].message;
            assert!(
                message.contains("token_file") && message.contains("url"),
                "{message}"
            );
        }
        Ok(spec) => panic!("built {spec:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The emulator itself behaves like the real CLI

#[tokio::test]
async fn emulator_prints_version_and_rejects_unknown_flags_like_cloudflared() {
    let version = process::run(RunSpec::new(argv(&[EMULATOR, "--version"])))
        .await
        .expect("run --version");
    assert_eq!(version.status, ExitInfo::Code(0));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        "cloudflared version 2026.8.2 (built 2026-08-14-12:17 UTC)\n"
    );

    // cloudflared 2026.8.2 prints the usage error and help on stdout and exits 0.
    let bogus = process::run(RunSpec::new(argv(&[
        EMULATOR,
        "tunnel",
        "--no-autoupdate",
        "run",
        "--bogus",
    ])))
    .await
    .expect("run with an unknown flag");
    assert_eq!(bogus.status, ExitInfo::Code(0));
    let out = String::from_utf8_lossy(&bogus.stdout);
    assert!(
        out.starts_with("Incorrect Usage: flag provided but not defined: -bogus\n"),
        "{out}"
    );
    assert!(out.contains("cloudflared tunnel run"), "{out}");

    // Run-level flags are not tunnel-level flags, as in the real CLI.
    let misplaced = process::run(RunSpec::new(argv(&[
        EMULATOR,
        "tunnel",
        "run",
        "--metrics",
        "127.0.0.1:1",
    ])))
    .await
    .expect("run with a misplaced flag");
    assert!(String::from_utf8_lossy(&misplaced.stdout)
        .starts_with("Incorrect Usage: flag provided but not defined: -metrics"));
}
