//! The `ngrok` provider against the ngrok agent emulator (`tests/emulators/ngrok`): real child
//! processes, the agent's local API and JSON log on loopback, and a relay standing in for
//! ngrok's edge in front of a local echo server.
//!
//! Each test gets its own emulator wrapper script (so its controls live in the child's
//! environment, not in this process's, which every test shares), its own authtoken (a fresh
//! random string, so a leak check cannot be fooled by another test) and its own state dir.

mod common;

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use common::{ctx, echo_server, eventually, free_port, gone, round_trip, PATIENCE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnelkeeper_providers::ngrok::{NgrokProto, NgrokProvider, NgrokSettings, NgrokSpec};
use tunnelkeeper_providers::process::{self, ExitInfo, RunSpec};
use tunnelkeeper_providers::{Provider, ProviderError, Tunnel};

/// The fixture's `err` for a malformed authtoken (fixtures/ngrok/log-json-error.ndjson).
const MALFORMED_TOKEN_ERR: &str = "authentication failed: The authtoken you specified does not look like a proper ngrok tunnel authtoken.";

// ---------------------------------------------------------------------------------------------
// Every tracing event of this test binary, as text: the leak checks search it for the token.

static CAPTURED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A subscriber that keeps every event and span field as a line of text.
struct Capture {
    next_span: AtomicU64,
}

/// Collects an event's fields as `name=value` text.
struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

fn keep(line: String) {
    CAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(line);
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = Fields(format!("span {}", attrs.metadata().name()));
        attrs.record(&mut fields);
        keep(fields.0);
        tracing::span::Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut fields = Fields("span record".to_string());
        values.record(&mut fields);
        keep(fields.0);
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(event.metadata().target().to_string());
        event.record(&mut fields);
        keep(fields.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// Installs the capturing subscriber for the whole test binary (once).
fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Capture {
            next_span: AtomicU64::new(0),
        })
        .expect("no other global subscriber in this test binary");
    });
}

fn captured() -> Vec<String> {
    CAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

// ---------------------------------------------------------------------------------------------
// The emulator, wrapped per test.

fn emulator() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulators/ngrok")
}

/// A fresh random authtoken in the shape the agent accepts (letters and digits, long).
fn random_token() -> String {
    let mut token = "tk".to_string();
    for i in 0..2u64 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(i);
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        let _ = write!(token, "{:016x}", hasher.finish());
    }
    token
}

/// One test's emulator setup: a wrapper script that sets the emulator's controls, a control
/// file, an argv log, a token file and a state dir.
struct Harness {
    dir: tempfile::TempDir,
    token: String,
    token_file: PathBuf,
    wrapper: PathBuf,
    control: PathBuf,
    argv_log: PathBuf,
}

impl Harness {
    fn new(env: &[(&str, &str)]) -> Harness {
        Harness::with_token(&random_token(), env)
    }

    fn with_token(token: &str, env: &[(&str, &str)]) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control");
        let argv_log = dir.path().join("argv.log");
        let token_file = dir.path().join("ngrok_token");
        fs::write(&control, "ok\n").expect("control file");
        fs::write(&token_file, format!("{token}\n")).expect("token file");
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut script = String::from("#!/bin/sh\n");
        let mut vars = vec![
            ("EMU_CONTROL", control.display().to_string()),
            ("EMU_ARGV_LOG", argv_log.display().to_string()),
        ];
        vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        for (name, value) in vars {
            assert!(!value.contains('\''), "no quotes in test paths: {value}");
            let _ = writeln!(script, "export {name}='{value}'");
        }
        let _ = writeln!(script, "exec '{}' \"$@\"", emulator().display());
        let wrapper = dir.path().join("ngrok");
        // Written and closed before any spawn; all spawns go through the process module's
        // single spawner thread, so no forked child holds this file open for writing while
        // it is exec'd (ETXTBSY).
        fs::write(&wrapper, script).expect("wrapper");
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
        Harness {
            dir,
            token: token.to_string(),
            token_file,
            wrapper,
            control,
            argv_log,
        }
    }

    /// Where the provider writes its config files (does not exist until the first start).
    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("state").join("ngrok")
    }

    fn spec(&self, proto: NgrokProto, to: &str) -> NgrokSpec {
        let mut spec = NgrokSpec::new(proto, to, &self.token_file, self.config_dir());
        spec.binary = Some(self.wrapper.display().to_string());
        spec
    }

    fn provider(&self, proto: NgrokProto, to: &str) -> NgrokProvider {
        NgrokProvider::new(self.spec(proto, to))
    }

    /// Starts a tunnel with the default settings; it must come up.
    async fn up(&self, proto: NgrokProto, to: &str) -> std::sync::Arc<dyn Tunnel> {
        self.provider(proto, to).start(&ctx()).await.expect("start")
    }

    /// Tells the emulator what to do; written whole, then renamed, so it never reads half.
    fn control(&self, word: &str) {
        let tmp = self.dir.path().join("control.tmp");
        fs::write(&tmp, word).expect("control tmp");
        fs::rename(&tmp, &self.control).expect("control rename");
    }

    /// Every start of the emulator so far: its pid and argv (without the program).
    fn starts(&self) -> Vec<(u32, Vec<String>)> {
        let Ok(text) = fs::read_to_string(&self.argv_log) else {
            return Vec::new();
        };
        text.lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).expect("argv log line");
                let pid = value["pid"].as_u64().expect("pid") as u32;
                let argv = value["argv"]
                    .as_array()
                    .expect("argv")
                    .iter()
                    .map(|a| a.as_str().expect("arg").to_string())
                    .collect();
                (pid, argv)
            })
            .collect()
    }

    /// The config files currently in the config dir.
    fn config_files(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.config_dir()) {
            Ok(entries) => entries
                .map(|e| e.expect("dir entry").path())
                .collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        }
    }
}

/// Every process whose command line contains `needle`: (pid, command line).
fn cmdlines_containing(needle: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        // Processes come and go during the scan; a vanished one has nothing to leak.
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            found.push((name, line));
        }
    }
    found
}

fn endpoint_port(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, port)| port.trim_end_matches('/').parse().ok())
        .expect("endpoint names a port")
}

async fn closed_within(tunnel: &dyn Tunnel, limit: Duration) -> String {
    tokio::time::timeout(limit, tunnel.closed())
        .await
        .expect("closed() resolves in time")
}

fn describe(result: &Result<std::sync::Arc<dyn Tunnel>, ProviderError>) -> String {
    match result {
        Ok(tunnel) => format!("a running tunnel at {}", tunnel.endpoint()),
        Err(err) => format!("{err:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn tcp_tunnel_is_up_with_the_api_url_carries_bytes_and_reports_latency() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let to = echo.to_string();
    let tunnel = harness
        .provider(NgrokProto::Tcp, &to)
        .start(&ctx())
        .await
        .expect("start");

    let endpoint = tunnel.endpoint().display;
    assert!(endpoint.starts_with("tcp://127.0.0.1:"), "{endpoint}");
    let pid = tunnel.pid().expect("pid");

    // Exactly the documented command line, once.
    let starts = harness.starts();
    assert_eq!(starts.len(), 1, "{starts:?}");
    let (emu_pid, argv) = &starts[0];
    assert_eq!(*emu_pid, pid);
    let config = harness.config_files();
    assert_eq!(config.len(), 1, "{config:?}");
    let config = config[0].display().to_string();
    assert_eq!(
        argv,
        &[
            "tcp",
            to.as_str(),
            "--config",
            config.as_str(),
            "--log",
            "stdout",
            "--log-format",
            "json"
        ]
    );

    // Bytes go through the emulator's relay (the "edge") to the echo server.
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"hello through ngrok").await,
        b"hello through ngrok"
    );
    drop(stream);

    // Native latency: the session leg of /api/status (87ms in the fixture).
    let health = tunnel.check().await.expect("healthy");
    assert_eq!(health.latency, Some(Duration::from_millis(87)));
    assert!(
        health.detail.as_deref().unwrap_or("").contains("au"),
        "{health:?}"
    );

    tunnel.stop().await;
    let reason = closed_within(tunnel.as_ref(), PATIENCE).await;
    assert!(reason.contains("ngrok exited"), "{reason}");
    assert!(gone(pid));
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Closed(_))
    ));
    tunnel.stop().await; // idempotent
}

#[tokio::test]
async fn config_file_is_private_unique_per_tunnel_and_removed_on_stop() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let provider = harness.provider(NgrokProto::Tcp, &echo.to_string());
    let first = provider.start(&ctx()).await.expect("first start");
    let second = provider.start(&ctx()).await.expect("second start");

    // The provider created the config dir for the owner only.
    let dir_mode = fs::metadata(harness.config_dir())
        .expect("config dir")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "config dir mode {dir_mode:o}");

    let files = harness.config_files();
    assert_eq!(files.len(), 2, "one file per tunnel: {files:?}");
    let mut web_addrs = Vec::new();
    for file in &files {
        let mode = fs::metadata(file).expect("config").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{} mode {mode:o}", file.display());
        let text = fs::read_to_string(file).expect("read config");
        assert!(text.contains("version: 3\n"), "{text}");
        assert!(
            text.contains(&format!("agent:\n  authtoken: \"{}\"\n", harness.token)),
            "{text}"
        );
        let web_addr = text
            .lines()
            .find_map(|l| l.strip_prefix("  web_addr: "))
            .expect("web_addr")
            .to_string();
        assert!(web_addr.starts_with("127.0.0.1:"), "{web_addr}");
        web_addrs.push(web_addr);
    }
    assert_ne!(
        web_addrs[0], web_addrs[1],
        "each agent gets its own API port"
    );
    let mut configs_in_argv: Vec<String> = harness
        .starts()
        .into_iter()
        .map(|(_, argv)| {
            argv[argv.iter().position(|a| a == "--config").expect("--config") + 1].clone()
        })
        .collect();
    configs_in_argv.sort();
    let mut configs: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    configs.sort();
    assert_eq!(configs_in_argv, configs);

    first.stop().await;
    assert_eq!(
        harness.config_files().len(),
        1,
        "stop removes its own file only"
    );
    second.stop().await;
    assert!(
        harness.config_files().is_empty(),
        "{:?}",
        harness.config_files()
    );
}

#[tokio::test]
async fn token_is_in_no_command_line_and_no_log_line() {
    capture_logs();
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let provider = harness.provider(NgrokProto::Tcp, &echo.to_string());
    assert!(!format!("{provider:?}").contains(&harness.token));
    let tunnel = provider.start(&ctx()).await.expect("start");
    let pid = tunnel.pid().expect("pid");

    // The scan sees the agent (its config path is on its command line) but not the token.
    let config = harness.config_files().pop().expect("config file");
    let seen = cmdlines_containing(&config.display().to_string());
    assert!(
        seen.iter().any(|(p, _)| *p == pid.to_string()),
        "the scan must see the agent: {seen:?}"
    );
    assert_eq!(cmdlines_containing(&harness.token), Vec::new());
    // Nor in its environment.
    let environ = fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(!String::from_utf8_lossy(&environ).contains(&harness.token));

    // Exercise the chatty paths too: traffic, a check, an error line, stop.
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"x").await, b"x");
    tunnel.check().await.expect("check");
    harness.control("error");
    assert!(
        eventually(PATIENCE, || async {
            captured()
                .iter()
                .any(|l| l.contains("reconnected by itself"))
        })
        .await,
        "the blip was not watched through"
    );
    assert_eq!(cmdlines_containing(&harness.token), Vec::new());
    tunnel.stop().await;

    let lines = captured();
    // The capture works: the agent's own output lines were forwarded to tracing.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("started tunnel") && l.contains(&tunnel.endpoint().display)),
        "agent output was not captured"
    );
    let leaks: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&harness.token))
        .collect();
    assert!(leaks.is_empty(), "token in log lines: {leaks:?}");
}

#[tokio::test]
async fn error_log_line_is_a_blip_the_agent_reconnects_from() {
    // The real agent logs `lvl=eror msg="session closed, starting reconnect loop"` on a network
    // blip and reconnects by itself with the same URL: that is not a dead tunnel.
    let echo = echo_server().await;
    let harness = Harness::new(&[("EMU_RECONNECT_MS", "1500")]);
    let tunnel = harness.up(NgrokProto::Tcp, &echo.to_string()).await;
    let pid = tunnel.pid().expect("pid");
    let url = tunnel.endpoint().display;
    let watcher = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.closed().await })
    };

    harness.control("error");
    // Soft while it reconnects: health says so, with the agent's err.
    assert!(
        eventually(PATIENCE, || async {
            matches!(tunnel.check().await, Err(ProviderError::Unhealthy(why)) if why.contains("session closed"))
        })
        .await,
        "check() never reported the reconnecting session"
    );
    // Then it is back by itself: same agent, same URL, bytes flow, never closed.
    assert!(
        eventually(PATIENCE, || async { tunnel.check().await.is_ok() }).await,
        "the agent never came back online"
    );
    assert!(!watcher.is_finished(), "closed() resolved on a blip");
    assert_eq!(tunnel.pid(), Some(pid));
    assert_eq!(tunnel.endpoint().display, url);
    assert_eq!(harness.starts().len(), 1);
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial after the blip");
    assert_eq!(round_trip(&mut stream, b"still here").await, b"still here");
    drop(stream);
    tunnel.stop().await;
    assert!(gone(pid));
    let reason = tokio::time::timeout(PATIENCE, watcher)
        .await
        .expect("closed after stop")
        .expect("join");
    assert!(reason.contains("ngrok exited"), "{reason}");
    assert!(harness.config_files().is_empty());
}

#[tokio::test]
async fn agent_offline_past_the_reconnect_grace_closes_the_tunnel() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let mut spec = harness.spec(NgrokProto::Tcp, &echo.to_string());
    spec.reconnect_grace = Duration::from_secs(2);
    let tunnel = NgrokProvider::new(spec).start(&ctx()).await.expect("start");
    let pid = tunnel.pid().expect("pid");

    let down_at = Instant::now();
    harness.control("down no route to host");
    let reason = closed_within(tunnel.as_ref(), PATIENCE).await;
    let took = down_at.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "closed after {took:?}, before the grace"
    );
    assert!(
        reason.contains("no route to host") && reason.contains("not online again"),
        "{reason}"
    );
    // The agent still runs; the daemon's restart (stop, start) is what replaces it.
    assert!(!gone(pid));
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
    tunnel.stop().await;
    assert!(gone(pid));
}

#[tokio::test]
async fn http_dial_is_refused_while_offline_though_the_edge_answers() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let tunnel = harness.up(NgrokProto::Http, &echo.to_string()).await;
    let port = endpoint_port(&tunnel.endpoint().display);
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial while online");
    assert_eq!(
        round_trip(&mut stream, b"GET / HTTP/1.0\r\n").await,
        b"GET / HTTP/1.0\r\n"
    );
    drop(stream);

    harness.control("down");
    // The edge still accepts on the public port and answers with its error page...
    assert!(
        eventually(PATIENCE, || async {
            let Ok(mut raw) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            let _ = raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut page = Vec::new();
            // Until the emulator notices, the relay still echoes and never closes: read briefly.
            let _ =
                tokio::time::timeout(Duration::from_millis(500), raw.read_to_end(&mut page)).await;
            String::from_utf8_lossy(&page).contains("ERR_NGROK_3200")
        })
        .await,
        "the stand-in edge does not serve ERR_NGROK_3200 while offline"
    );
    // ...so a connect proves nothing: dial asks the agent first.
    assert!(
        eventually(PATIENCE, || async {
            matches!(
                tunnel.dial(PATIENCE).await,
                Err(ProviderError::Unhealthy(_))
            )
        })
        .await,
        "dial succeeded against an offline endpoint"
    );
    tunnel.stop().await;
}

#[tokio::test]
async fn http_inspection_is_off_so_local_users_read_no_requests() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let tunnel = harness.up(NgrokProto::Http, &echo.to_string()).await;
    let (_, argv) = harness.starts().pop().expect("started");
    assert!(argv.contains(&"--inspect=false".to_string()), "{argv:?}");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    let secret_request = b"GET /private?session=abc HTTP/1.0\r\n";
    assert_eq!(
        round_trip(&mut stream, secret_request).await,
        secret_request
    );
    drop(stream);

    // What any local user can ask the agent's API for.
    let config = fs::read_to_string(&harness.config_files()[0]).expect("config");
    let web_addr: std::net::SocketAddr = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("web_addr: "))
        .expect("web_addr")
        .parse()
        .expect("addr");
    let (status, body) =
        tunnelkeeper_providers::http::get_json(web_addr, "/api/requests/http", PATIENCE)
            .await
            .expect("api");
    assert_eq!(status, 200);
    assert_eq!(body["requests"].as_array().map(Vec::len), Some(0), "{body}");
    tunnel.stop().await;
}

#[tokio::test]
async fn an_agent_below_the_version_floor_is_refused_naming_the_minimum() {
    let echo = echo_server().await;
    let harness = Harness::new(&[("EMU_VERSION", "3.15.1")]);
    let result = harness
        .provider(NgrokProto::Tcp, &echo.to_string())
        .start(&ctx())
        .await;
    match &result {
        Err(ProviderError::Config(msg)) => {
            assert!(msg.contains("3.15.1") && msg.contains("3.16.0"), "{msg}")
        }
        other => panic!("expected a config error, got {}", describe(other)),
    }
    // Refused before the agent ran a tunnel, and before the token was copied anywhere.
    assert!(harness.starts().is_empty());
    assert!(harness.config_files().is_empty());

    let ok = Harness::new(&[("EMU_VERSION", "3.16.0")]);
    let tunnel = ok
        .provider(NgrokProto::Tcp, &echo.to_string())
        .start(&ctx())
        .await
        .expect("3.16.0 is enough");
    tunnel.stop().await;
}

#[tokio::test]
async fn token_copies_left_by_a_crash_are_removed_at_start() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let dir = harness.config_dir();
    fs::create_dir_all(&dir).expect("dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    // What a daemon killed with -9 leaves: its tunnel's file, and another tunnel's.
    let leftover = dir.join("tunnelkeeper-ngrok-svc_t-4242-0.yml");
    let other = dir.join("tunnelkeeper-ngrok-svc_t2-4242-1.yml");
    fs::write(&leftover, "authtoken: old copy").expect("leftover");
    fs::write(&other, "authtoken: other tunnel").expect("other");
    // And one in the state directory, where earlier versions wrote it.
    let old_dir = harness.dir.path().join("old-state-ngrok");
    fs::create_dir_all(&old_dir).expect("old dir");
    let old = old_dir.join("tunnelkeeper-ngrok-svc_t-777-3.yml");
    fs::write(&old, "authtoken: older copy").expect("old");
    let mut spec = harness.spec(NgrokProto::Tcp, &echo.to_string());
    spec.old_config_dirs = vec![old_dir];
    let tunnel = NgrokProvider::new(spec).start(&ctx()).await.expect("start");
    assert!(
        !leftover.exists(),
        "the crashed run's token copy is still there"
    );
    assert!(
        !old.exists(),
        "the copy in the old state directory is still there"
    );
    assert!(
        other.exists(),
        "another tunnel's file is its own start's business"
    );
    assert_eq!(harness.config_files().len(), 2);
    tunnel.stop().await;
}

#[tokio::test]
async fn agent_death_resolves_closed_at_once() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let provider = harness.provider(NgrokProto::Tcp, &echo.to_string());

    // The agent exits by itself.
    let tunnel = provider.start(&ctx()).await.expect("start");
    let died_at = Instant::now();
    harness.control("die");
    let reason = closed_within(tunnel.as_ref(), PATIENCE).await;
    assert!(
        died_at.elapsed() < Duration::from_secs(3),
        "hard signal took {:?}",
        died_at.elapsed()
    );
    assert!(reason.contains("exited with status 1"), "{reason}");
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Closed(_))
    ));
    tunnel.stop().await;

    // The agent is killed from outside.
    harness.control("ok");
    let tunnel = provider.start(&ctx()).await.expect("restart");
    let pid = tunnel.pid().expect("pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
    let reason = closed_within(tunnel.as_ref(), PATIENCE).await;
    assert!(reason.contains("killed by signal 9"), "{reason}");
    tunnel.stop().await;
    assert!(harness.config_files().is_empty());
}

#[tokio::test]
async fn malformed_authtoken_fails_start_with_the_agents_err() {
    capture_logs();
    let bad = format!("not-a-proper.token/{}", random_token());
    let harness = Harness::with_token(&bad, &[]);
    let result = harness
        .provider(NgrokProto::Tcp, "127.0.0.1:9")
        .start(&ctx())
        .await;
    match &result {
        Err(ProviderError::Spawn(msg)) => {
            assert!(msg.contains(MALFORMED_TOKEN_ERR), "{msg}");
            assert!(!msg.contains(&bad), "{msg}");
        }
        other => panic!("expected a start failure, got {}", describe(other)),
    }
    // Nothing left behind: no agent, no config file holding the token.
    let starts = harness.starts();
    assert_eq!(starts.len(), 1, "{starts:?}");
    let pid = starts[0].0;
    assert!(
        eventually(PATIENCE, || async { gone(pid) }).await,
        "agent {pid} outlived a failed start"
    );
    assert!(harness.config_files().is_empty());
    let leaks: Vec<String> = captured()
        .into_iter()
        .filter(|l| l.contains(&bad))
        .collect();
    assert!(leaks.is_empty(), "token in log lines: {leaks:?}");
}

#[tokio::test]
async fn missing_or_empty_authtoken_file_is_a_config_error() {
    let harness = Harness::new(&[]);
    let mut spec = harness.spec(NgrokProto::Tcp, "127.0.0.1:9");
    spec.authtoken_file = harness.dir.path().join("no-such-token");
    match NgrokProvider::new(spec).start(&ctx()).await {
        Err(ProviderError::Config(msg)) => assert!(msg.contains("no-such-token"), "{msg}"),
        other => panic!("expected a config error, got {}", describe(&other)),
    }

    fs::write(&harness.token_file, "  \n").expect("empty token");
    match harness
        .provider(NgrokProto::Tcp, "127.0.0.1:9")
        .start(&ctx())
        .await
    {
        Err(ProviderError::Config(msg)) => assert!(msg.contains("is empty"), "{msg}"),
        other => panic!("expected a config error, got {}", describe(&other)),
    }

    // Two lines would let the file add keys to the agent config.
    fs::write(&harness.token_file, "abc\nweb_addr: 0.0.0.0:80\n").expect("two lines");
    match harness
        .provider(NgrokProto::Tcp, "127.0.0.1:9")
        .start(&ctx())
        .await
    {
        Err(ProviderError::Config(msg)) => {
            assert!(msg.contains("one line"), "{msg}");
            assert!(!msg.contains("abc"), "{msg}");
        }
        other => panic!("expected a config error, got {}", describe(&other)),
    }
    assert!(harness.starts().is_empty(), "no agent was started");
    assert!(harness.config_files().is_empty());
}

#[tokio::test]
async fn emulator_fails_like_the_agent_without_an_authtoken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.yml");
    let web = free_port();
    fs::write(
        &config,
        format!("version: 3\nagent:\n  web_addr: 127.0.0.1:{web}\n"),
    )
    .expect("config");
    let out = process::run(RunSpec::new(vec![
        emulator().display().to_string(),
        "tcp".to_string(),
        "22".to_string(),
        "--config".to_string(),
        config.display().to_string(),
        "--log".to_string(),
        "stdout".to_string(),
        "--log-format".to_string(),
        "json".to_string(),
    ]))
    .await
    .expect("run emulator");
    assert_eq!(out.status, ExitInfo::Code(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let error_line = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["lvl"] == "eror")
        .unwrap_or_else(|| panic!("no eror line in {stdout}"));
    assert_eq!(
        error_line["err"],
        "authentication failed: Usage of ngrok requires a verified account and authtoken."
    );
    assert_eq!(error_line["msg"], "session closing");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("ERROR:  authentication failed"));
}

#[tokio::test]
async fn emulator_refuses_what_the_agent_refuses() {
    let cases: &[(&[&str], &str)] = &[
        (&["tcp", "22", "--bogus", "x"], "unknown flag: --bogus"),
        (
            &["tcp", "22", "--url=tcp://x:1", "--inspect", "false"],
            "unknown flag: --inspect",
        ),
        (&["udp", "22"], "unknown command \"udp\""),
        (&["tcp"], "requires exactly one argument"),
        (&["tcp", "22", "23"], "requires exactly one argument"),
        (&["tcp", "22", "--log-format", "xml"], "invalid log format"),
        (
            &["tcp", "22", "--config"],
            "flag needs an argument: --config",
        ),
    ];
    for (args, expected) in cases {
        let mut argv = vec![emulator().display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let out = process::run(RunSpec::new(argv))
            .await
            .expect("run emulator");
        assert_eq!(out.status, ExitInfo::Code(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("ERROR:  ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn http_tunnel_with_reserved_url_and_region() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    // The emulator serves a loopback `--url` on its own port, so dial reaches the relay.
    let url = format!("https://127.0.0.1:{}", free_port());
    let mut spec = harness.spec(NgrokProto::Http, &echo.to_string());
    spec.url = Some(url.clone());
    spec.region = Some("eu".to_string());
    capture_logs();
    let tunnel = NgrokProvider::new(spec).start(&ctx()).await.expect("start");
    assert_eq!(tunnel.endpoint().display, url);
    // Deprecated by ngrok: still passed, with a warning.
    assert!(
        captured()
            .iter()
            .any(|l| l.contains("region") && l.contains("deprecated")),
        "no deprecation warning for `region`"
    );
    let (_, argv) = harness.starts().pop().expect("started");
    assert_eq!(argv[..2], ["http".to_string(), echo.to_string()]);
    assert_eq!(
        argv[argv.len() - 4..],
        [
            "--url".to_string(),
            url.clone(),
            "--region".to_string(),
            "eu".to_string()
        ]
    );
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"GET / HTTP/1.0\r\n").await,
        b"GET / HTTP/1.0\r\n"
    );
    tunnel.stop().await;
}

#[tokio::test]
async fn http_tunnel_dials_the_port_its_url_names() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let tunnel = harness.up(NgrokProto::Http, &echo.to_string()).await;
    let endpoint = tunnel.endpoint().display;
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    assert_ne!(endpoint_port(&endpoint), 443);
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"abc").await, b"abc");
    tunnel.stop().await;
}

#[tokio::test]
async fn started_tunnel_log_line_is_the_fallback_when_the_api_is_silent() {
    let echo = echo_server().await;
    let harness = Harness::new(&[("EMU_NO_API", "1")]);
    let tunnel = harness
        .provider(NgrokProto::Tcp, &echo.to_string())
        .start(&ctx())
        .await
        .expect("start from the log line");
    let endpoint = tunnel.endpoint().display;
    assert!(endpoint.starts_with("tcp://127.0.0.1:"), "{endpoint}");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"fallback").await, b"fallback");
    // Without the API there is no native health.
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Unhealthy(_))
    ));
    tunnel.stop().await;
}

#[tokio::test]
async fn start_times_out_when_no_url_appears() {
    let harness = Harness::new(&[("EMU_TUNNEL_DELAY_MS", "600000")]);
    let mut spec = harness.spec(NgrokProto::Tcp, "127.0.0.1:9");
    spec.start_timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let result = NgrokProvider::new(spec).start(&ctx()).await;
    match &result {
        Err(ProviderError::StartTimeout { after, detail }) => {
            assert_eq!(*after, Duration::from_millis(1500));
            assert!(detail.contains("/api/tunnels"), "{detail}");
            assert!(detail.contains("no tunnel listed yet"), "{detail}");
        }
        other => panic!("expected StartTimeout, got {}", describe(other)),
    }
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert!(started.elapsed() < PATIENCE);
    let pid = harness.starts().pop().expect("started").0;
    assert!(
        eventually(PATIENCE, || async { gone(pid) }).await,
        "agent {pid} outlived a failed start"
    );
    assert!(harness.config_files().is_empty());
}

#[tokio::test]
async fn missing_binary_is_named_with_an_install_hint() {
    let harness = Harness::new(&[]);
    let mut spec = harness.spec(NgrokProto::Tcp, "127.0.0.1:9");
    spec.binary = Some("/nonexistent/tunnelkeeper-test/ngrok".to_string());
    match NgrokProvider::new(spec).start(&ctx()).await {
        Err(ProviderError::MissingBinary { binary, hint }) => {
            assert_eq!(binary, "/nonexistent/tunnelkeeper-test/ngrok");
            assert!(hint.contains("ngrok.com/download"), "{hint}");
        }
        other => panic!("expected MissingBinary, got {}", describe(&other)),
    }
    assert!(harness.config_files().is_empty());

    // The default is `ngrok` from PATH; only checked where no real agent could be started.
    let in_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("ngrok").exists()))
        .unwrap_or(false);
    if !in_path {
        let mut spec = harness.spec(NgrokProto::Tcp, "127.0.0.1:9");
        spec.binary = None;
        match NgrokProvider::new(spec).start(&ctx()).await {
            Err(ProviderError::MissingBinary { binary, .. }) => assert_eq!(binary, "ngrok"),
            other => panic!("expected MissingBinary, got {}", describe(&other)),
        }
    }
}

#[test]
fn arguments_the_agent_would_misread_are_refused() {
    // What start used to refuse before running the agent cannot be a spec at all.
    for (to, url, key) in [
        ("--authtoken=x", None, "to"),
        ("127.0.0.1:22 --inspect", None, "to"),
        ("", None, "to"),
        ("127.0.0.1:22", Some("-x"), "url"),
    ] {
        let settings = NgrokSettings {
            to: Some(to.to_string()),
            url: url.map(str::to_string),
            authtoken_file: Some("/t".into()),
            ..NgrokSettings::default()
        };
        match settings.parse() {
            Err(errors) => {
                assert_eq!(errors.len(), 1, "{to:?}: {errors:?}");
                assert_eq!(errors[0].key, key, "{to:?}");
            }
            Ok(spec) => panic!("built {spec:?}"),
        }
    }
}

#[tokio::test]
async fn a_config_dir_others_can_read_is_refused() {
    let echo = echo_server().await;
    let harness = Harness::new(&[]);
    let dir = harness.config_dir();
    fs::create_dir_all(&dir).expect("dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let result = harness
        .provider(NgrokProto::Tcp, &echo.to_string())
        .start(&ctx())
        .await;
    match &result {
        Err(ProviderError::Config(msg)) => assert!(msg.contains("mode 755"), "{msg}"),
        other => panic!("expected a config error, got {}", describe(other)),
    }
    assert!(harness.config_files().is_empty());
}
