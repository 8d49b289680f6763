//! The `tailscale` provider against the CLI emulator (`tests/emulators/tailscale`), which
//! prints the real CLI's fixture outputs and switches state (`running`, `needslogin`,
//! `peer-offline`, `ping-timeout`, `derp`, `direct`) whenever a test rewrites its state file.
//! Everything stays on loopback: the emulator rewrites the peer's Tailscale IPv4 to 127.0.0.1,
//! so "the peer" is a local echo server.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, eventually, round_trip, PATIENCE};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tunnelkeeper_providers::tailscale::{
    Handler, TailscaleMode, TailscaleProvider, TailscaleSettings, TailscaleSpec,
};
use tunnelkeeper_providers::{Provider, ProviderError, Resolver, StartContext, Tunnel};

/// The status watcher's period in these tests: short, so hard signals arrive quickly.
const WATCH: Duration = Duration::from_millis(200);
/// The Self node's MagicDNS name in the fixtures: where serve/funnel URLs point.
const SELF_HOST: &str = "edgebox.tail1234.ts.net";
/// The login URL in the NeedsLogin fixture.
const AUTH_URL: &str = "https://login.tailscale.com/a/0123456789abc";

fn emulator() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulators/tailscale")
}

/// One emulated `tailscale` CLI with its own state and argv log, in a temp dir.
struct Emu {
    dir: tempfile::TempDir,
    /// The CLI as the provider runs it: a symlink to the emulator, which finds its settings
    /// in `emulator.json` beside the link.
    binary: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl Emu {
    fn new(state: &str) -> Emu {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("tailscale");
        std::os::unix::fs::symlink(emulator(), &binary).expect("symlink emulator");
        let state_file = dir.path().join("state");
        let log = dir.path().join("argv.log");
        let settings = serde_json::json!({
            "EMU_STATE": state_file,
            "EMU_ARGV_LOG": log,
            "EMU_PEER_IP": "127.0.0.1",
        });
        std::fs::write(dir.path().join("emulator.json"), settings.to_string()).expect("settings");
        let emu = Emu {
            dir,
            binary,
            state: state_file,
            log,
        };
        emu.set(state);
        emu
    }

    /// Adds an emulator setting (`EMU_*`) to `emulator.json`.
    fn setting(&self, key: &str, value: &str) {
        let path = self.dir.path().join("emulator.json");
        let mut settings: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("settings")).expect("json");
        settings[key] = serde_json::Value::String(value.to_string());
        std::fs::write(&path, settings.to_string()).expect("settings");
    }

    /// Stands for handlers the operator configured by hand: written as the serve config.
    fn preset_serve(&self, config: serde_json::Value) {
        std::fs::write(
            format!("{}.serve", self.state.display()),
            config.to_string(),
        )
        .expect("serve config");
    }

    /// Switches the state atomically, so no invocation reads a half-written file.
    fn set(&self, state: &str) {
        let tmp = self.dir.path().join("state.tmp");
        std::fs::write(&tmp, state).expect("write state");
        std::fs::rename(&tmp, &self.state).expect("rename state");
    }

    /// Every command line run so far, without the program.
    fn calls(&self) -> Vec<Vec<String>> {
        match std::fs::read_to_string(&self.log) {
            Ok(text) => text
                .lines()
                .map(|l| serde_json::from_str(l).expect("argv line"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The emulator's serve/funnel configuration (`{}` when nothing is exposed).
    fn serve_config(&self) -> serde_json::Value {
        let path = PathBuf::from(format!("{}.serve", self.state.display()));
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).expect("serve config"),
            Err(_) => serde_json::json!({}),
        }
    }

    fn spec(&self, mode: TailscaleMode, port: u16) -> TailscaleSpec {
        let mut spec = TailscaleSpec::new(mode, port);
        spec.binary = Some(self.binary.display().to_string());
        spec.status_interval = WATCH;
        spec
    }

    fn peer_spec(&self, peer: &str, port: u16) -> TailscaleSpec {
        self.spec(TailscaleMode::peer(peer), port)
    }
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

async fn start(spec: TailscaleSpec) -> Result<Arc<dyn Tunnel>, ProviderError> {
    tokio::time::timeout(PATIENCE, TailscaleProvider::new(spec).start(&ctx()))
        .await
        .expect("start returns in time")
}

async fn start_ok(spec: TailscaleSpec) -> Arc<dyn Tunnel> {
    match start(spec).await {
        Ok(tunnel) => tunnel,
        Err(err) => panic!("start failed: {err}"),
    }
}

async fn start_err(spec: TailscaleSpec) -> ProviderError {
    match start(spec).await {
        Ok(tunnel) => panic!("start succeeded with endpoint {}", tunnel.endpoint()),
        Err(err) => err,
    }
}

const STATUS: &[&str] = &["status", "--json"];

#[tokio::test]
async fn peer_up_has_its_endpoint_and_dials_through_to_the_service() {
    let echo = echo_server().await;
    let emu = Emu::new("running");
    let tunnel = start_ok(emu.peer_spec("homebox", echo.port())).await;
    assert_eq!(
        tunnel.endpoint().display,
        format!("127.0.0.1:{}", echo.port())
    );
    assert_eq!(tunnel.pid(), None);
    assert_eq!(emu.calls()[0], argv(STATUS));

    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(
        round_trip(&mut stream, b"through the tailnet").await,
        b"through the tailnet"
    );
    tunnel.stop().await;
}

#[tokio::test]
async fn peer_is_found_by_magicdns_name_and_tailscale_ip() {
    let echo = echo_server().await;
    let emu = Emu::new("running");
    for peer in [
        "HOMEBOX",
        "homebox.tail1234.ts.net",
        "homebox.tail1234.ts.net.",
        "fd7a:115c:a1e0::abcd:ef01",
        "127.0.0.1",
    ] {
        let tunnel = start_ok(emu.peer_spec(peer, echo.port())).await;
        // Whatever names it, dials go to its IPv4 Tailscale address.
        assert_eq!(
            tunnel.endpoint().display,
            format!("127.0.0.1:{}", echo.port()),
            "{peer}"
        );
        let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
        assert_eq!(round_trip(&mut stream, b"x").await, b"x");
        tunnel.stop().await;
    }
    match start_err(emu.peer_spec("nosuchbox", 22)).await {
        ProviderError::Unhealthy(msg) => {
            assert!(msg.contains("peer nosuchbox is not in"), "{msg}");
            assert!(msg.contains("homebox, old-laptop"), "{msg}");
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
}

#[tokio::test]
async fn check_reports_direct_and_derp_pings_with_their_latency() {
    let emu = Emu::new("direct");
    let tunnel = start_ok(emu.peer_spec("homebox", 22)).await;

    let health = tunnel.check().await.expect("check");
    assert_eq!(health.latency, Some(Duration::from_millis(5)));
    assert_eq!(health.detail.as_deref(), Some("direct"));

    emu.set("derp");
    let health = tunnel.check().await.expect("check");
    assert_eq!(health.latency, Some(Duration::from_millis(23)));
    assert_eq!(health.detail.as_deref(), Some("via DERP(fra)"));

    // Exactly what was run for a check: status, then one ping that does not insist on a
    // direct path, with a timeout that leaves room within the 5 s per-call default.
    let ping = argv(&[
        "ping",
        "--c",
        "1",
        "--until-direct=false",
        "--timeout",
        "3500ms",
        "127.0.0.1",
    ]);
    let calls = emu.calls();
    let pings: Vec<_> = calls.iter().filter(|c| c[0] == "ping").collect();
    assert_eq!(pings, [&ping, &ping]);
    let check_status = calls
        .iter()
        .rposition(|c| *c == argv(STATUS))
        .expect("status");
    assert!(check_status > 0);
    tunnel.stop().await;
}

#[tokio::test]
async fn ping_timeout_is_an_error_but_not_a_hard_signal() {
    let emu = Emu::new("ping-timeout");
    // The default 5 s per call: the ping gets `--timeout 3500ms`, the rest is headroom.
    let tunnel = start_ok(emu.peer_spec("homebox", 22)).await;
    match tunnel.check().await {
        // The CLI printed `ping "<ip>" timed out` after its `--timeout`...
        Err(ProviderError::Timeout { what, after })
            if what == "tailscale ping 127.0.0.1 (homebox)" =>
        {
            assert_eq!(after, Duration::from_millis(3500))
        }
        // ...or, on a box so loaded that the emulator could not even get that far within the
        // per-call limit, the call was killed: a timeout of the ping all the same.
        Err(ProviderError::Timeout { what, after }) if what.starts_with("`tailscale ping") => {
            assert_eq!(after, Duration::from_secs(5))
        }
        other => panic!("expected a ping timeout, got {other:?}"),
    }
    assert!(emu.calls().contains(&argv(&[
        "ping",
        "--c",
        "1",
        "--until-direct=false",
        "--timeout",
        "3500ms",
        "127.0.0.1"
    ])));
    // The peer is still online, so the tunnel stays open and dialable.
    assert!(
        tokio::time::timeout(WATCH * 5, tunnel.closed())
            .await
            .is_err(),
        "a slow ping closed the tunnel"
    );
    tunnel.stop().await;
}

#[tokio::test]
async fn needs_login_fails_start_with_the_auth_url() {
    let emu = Emu::new("needslogin");
    for spec in [
        emu.peer_spec("homebox", 22),
        emu.spec(TailscaleMode::serve(), 8080),
    ] {
        match start_err(spec).await {
            ProviderError::Unhealthy(reason) => {
                assert!(reason.contains("NeedsLogin"), "{reason}");
                assert!(reason.contains(AUTH_URL), "{reason}");
                assert!(reason.contains("You are logged out."), "{reason}");
            }
            other => panic!("expected Unhealthy, got {other:?}"),
        }
    }
    // Nothing was exposed for a node that is logged out.
    assert!(emu
        .calls()
        .iter()
        .all(|c| c[0] == "status" || c[0] == "version"));
}

#[tokio::test]
async fn offline_peer_fails_start() {
    let emu = Emu::new("peer-offline");
    match start_err(emu.peer_spec("homebox", 22)).await {
        ProviderError::Unhealthy(reason) => {
            assert!(reason.starts_with("peer homebox is offline"), "{reason}")
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
}

#[tokio::test]
async fn peer_going_offline_is_a_hard_signal_within_seconds() {
    let echo = echo_server().await;
    let emu = Emu::new("running");
    let mut spec = emu.peer_spec("homebox", echo.port());
    // The confirming ping waits 1 s for its pong.
    spec.check_timeout = Duration::from_secs(2);
    let tunnel = start_ok(spec).await;
    let watcher = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.closed().await })
    };
    emu.set("peer-offline");
    let switched = Instant::now();
    let reason = tokio::time::timeout(PATIENCE, watcher)
        .await
        .expect("closed in time")
        .expect("join");
    assert!(
        switched.elapsed() < Duration::from_secs(5),
        "hard signal took {:?}",
        switched.elapsed()
    );
    assert!(reason.starts_with("peer homebox is offline"), "{reason}");
    assert!(
        reason.contains("does not answer tailscale ping"),
        "{reason}"
    );
    match tunnel.check().await {
        Err(ProviderError::Closed(why)) => assert_eq!(why, reason),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
    // Resolves again, at once, for a second caller.
    assert_eq!(tunnel.closed().await, reason);
    tunnel.stop().await;
}

#[tokio::test]
async fn check_reading_an_offline_peer_fails_and_closes() {
    let emu = Emu::new("running");
    let mut spec = emu.peer_spec("homebox", 22);
    // Slow watcher: the check must see it first.
    spec.status_interval = Duration::from_secs(600);
    let tunnel = start_ok(spec).await;
    emu.set("peer-offline");
    match tunnel.check().await {
        Err(ProviderError::Unhealthy(reason)) => {
            assert!(reason.starts_with("peer homebox is offline"), "{reason}")
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
    let reason = tokio::time::timeout(Duration::from_secs(1), tunnel.closed())
        .await
        .expect("closed at once");
    assert!(reason.contains("offline"), "{reason}");
    tunnel.stop().await;
}

#[tokio::test]
async fn logging_out_while_up_closes_with_the_auth_url() {
    let emu = Emu::new("running");
    let tunnel = start_ok(emu.peer_spec("homebox", 22)).await;
    emu.set("needslogin");
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed in time");
    assert!(reason.contains("NeedsLogin"), "{reason}");
    assert!(reason.contains(AUTH_URL), "{reason}");
    tunnel.stop().await;
}

#[tokio::test]
async fn stop_ends_the_status_watcher() {
    let emu = Emu::new("running");
    let tunnel = start_ok(emu.peer_spec("homebox", 22)).await;
    // The watcher polls on its own.
    assert!(
        eventually(PATIENCE, || async {
            emu.calls().iter().filter(|c| **c == argv(STATUS)).count() >= 3
        })
        .await,
        "the status watcher never polled"
    );
    tunnel.stop().await;
    assert_eq!(tunnel.closed().await, "stopped");
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
    let after_stop = emu.calls().len();
    tokio::time::sleep(WATCH * 5).await;
    assert_eq!(emu.calls().len(), after_stop, "the watcher outlived stop");
    tunnel.stop().await; // idempotent
    assert_eq!(emu.calls().len(), after_stop);
}

#[tokio::test]
async fn serve_exposes_the_port_reads_the_url_and_turns_it_off_on_stop() {
    let echo = echo_server().await;
    let dns = dns_server(Ipv4Addr::LOCALHOST).await;
    let emu = Emu::new("running");
    let mut spec = emu.spec(TailscaleMode::serve(), 8080);
    // The URL's host resolves (through the daemon's resolver) to loopback, where the echo
    // server stands in for Tailscale's HTTPS proxy: tests cannot bind 443.
    spec.dial_address = Some(format!("{SELF_HOST}:{}", echo.port()));
    let ctx = StartContext {
        resolver: Resolver::with_nameserver_addrs(&[dns]).expect("resolver"),
        ..ctx()
    };
    let tunnel = TailscaleProvider::new(spec)
        .start(&ctx)
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, format!("https://{SELF_HOST}/"));
    assert_eq!(
        emu.calls()[..4],
        [
            argv(&["version"]),
            argv(STATUS),
            argv(&["serve", "status", "--json"]),
            argv(&["serve", "--bg", "--https=443", "--set-path=/", "8080"])
        ]
    );
    assert_eq!(emu.serve_config()["443"]["/"]["mode"], "serve");
    assert_eq!(
        emu.serve_config()["443"]["/"]["proxy"],
        "http://127.0.0.1:8080"
    );

    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"served").await, b"served");
    assert_eq!(tunnel.check().await.expect("check"), Default::default());

    tunnel.stop().await;
    assert_eq!(
        emu.calls().last(),
        Some(&argv(&["serve", "--https=443", "--set-path=/", "off"]))
    );
    assert_eq!(emu.serve_config(), serde_json::json!({}));
    tunnel.stop().await; // idempotent: `off` is not run twice
    let offs = emu
        .calls()
        .iter()
        .filter(|c| c.last().map(String::as_str) == Some("off"))
        .count();
    assert_eq!(offs, 1);
}

#[tokio::test]
async fn funnel_exposes_to_the_internet_and_turns_it_off_on_stop() {
    let dns = dns_server(Ipv4Addr::LOCALHOST).await;
    let emu = Emu::new("running");
    let ctx = StartContext {
        resolver: Resolver::with_nameserver_addrs(&[dns]).expect("resolver"),
        ..ctx()
    };
    let tunnel = TailscaleProvider::new(emu.spec(TailscaleMode::funnel(), 3000))
        .start(&ctx)
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, format!("https://{SELF_HOST}/"));
    assert!(emu.calls().contains(&argv(&[
        "funnel",
        "--bg",
        "--https=443",
        "--set-path=/",
        "3000"
    ])));
    assert_eq!(emu.serve_config()["443"]["/"]["mode"], "funnel");

    // Without `dial_address`, a dial goes to the URL's host (resolved by the daemon's
    // resolver) on 443, the port Tailscale's proxy listens on.
    match tunnel.dial(PATIENCE).await {
        Err(ProviderError::Dial { target, .. }) => assert_eq!(target, "127.0.0.1:443"),
        Err(other) => panic!("expected a refused dial to 127.0.0.1:443, got {other:?}"),
        Ok(_) => {} // something listens on 443 on this box: the target was right all the same
    }

    // The backend going away is the hard signal for an exposure too.
    emu.set("needslogin");
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed in time");
    assert!(reason.contains(AUTH_URL), "{reason}");
    emu.set("running");

    tunnel.stop().await;
    assert_eq!(
        emu.calls().last(),
        Some(&argv(&["funnel", "--https=443", "--set-path=/", "off"]))
    );
    assert_eq!(emu.serve_config(), serde_json::json!({}));
}

#[tokio::test]
async fn ping_goes_to_the_peers_ip_whatever_name_is_configured() {
    // The real CLI resolves only the MagicDNS label, the DNSName with its trailing dot, or an
    // IP: an FQDN without the dot would fail every ping while dials work.
    let echo = echo_server().await;
    let emu = Emu::new("direct");
    let tunnel = start_ok(emu.peer_spec("homebox.tail1234.ts.net", echo.port())).await;
    let health = tunnel.check().await.expect("a working path reads healthy");
    assert_eq!(health.detail.as_deref(), Some("direct"));
    let pings: Vec<_> = emu.calls().into_iter().filter(|c| c[0] == "ping").collect();
    assert_eq!(pings.len(), 1);
    assert_eq!(pings[0].last().map(String::as_str), Some("127.0.0.1"));
    // The stand-in refuses what the real CLI cannot resolve.
    let out = std::process::Command::new(&emu.binary)
        .args(["ping", "--c", "1", "homebox.tail1234.ts.net"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such host"));
    tunnel.stop().await;
}

#[tokio::test]
async fn a_peer_offline_at_the_coordination_server_that_answers_stays_up() {
    let echo = echo_server().await;
    let emu = Emu::new("running");
    let tunnel = start_ok(emu.peer_spec("homebox", echo.port())).await;
    // A control-plane blip: the status says Online false, the data path still works.
    emu.set("offline-reachable");
    assert!(
        tokio::time::timeout(WATCH * 15, tunnel.closed())
            .await
            .is_err(),
        "a control-plane blip closed a working path"
    );
    let health = tunnel.check().await.expect("answers its ping");
    assert!(
        health
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("offline at the coordination server")),
        "{health:?}"
    );
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"still").await, b"still");
    tunnel.stop().await;
    // And a start during such a blip succeeds.
    let tunnel = start_ok(emu.peer_spec("homebox", echo.port())).await;
    tunnel.stop().await;
}

#[tokio::test]
async fn stopping_serve_leaves_the_operators_own_handlers() {
    let emu = Emu::new("running");
    let operator =
        serde_json::json!({"443": {"/": {"mode": "serve", "proxy": "http://127.0.0.1:9000"}}});
    emu.preset_serve(operator.clone());
    let spec = emu.spec(
        TailscaleMode::Serve(Handler {
            path: "/tk".to_string(),
            ..Handler::default()
        }),
        8080,
    );
    let tunnel = start_ok(spec).await;
    assert_eq!(
        tunnel.endpoint().display,
        format!("https://{SELF_HOST}/tk/")
    );
    assert_eq!(emu.serve_config()["443"]["/"], operator["443"]["/"]);
    assert_eq!(
        emu.serve_config()["443"]["/tk"]["proxy"],
        "http://127.0.0.1:8080"
    );
    tunnel.stop().await;
    assert_eq!(
        emu.serve_config(),
        operator,
        "stop removed more than its own handler"
    );
}

#[tokio::test]
async fn a_handler_someone_else_holds_is_not_overwritten() {
    let emu = Emu::new("running");
    let operator =
        serde_json::json!({"443": {"/": {"mode": "serve", "proxy": "http://127.0.0.1:9000"}}});
    emu.preset_serve(operator.clone());
    match start_err(emu.spec(TailscaleMode::serve(), 8080)).await {
        ProviderError::Config(msg) => {
            assert!(msg.contains("http://127.0.0.1:9000"), "{msg}");
            assert!(msg.contains("serve_path"), "{msg}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_eq!(emu.serve_config(), operator);
    assert!(!emu.calls().iter().any(|c| c.contains(&"--bg".to_string())));
}

#[tokio::test]
async fn funnel_not_enabled_on_the_tailnet_fails_with_the_enable_url() {
    let emu = Emu::new("running");
    emu.setting("EMU_SERVE_ENABLE", "never");
    let mut spec = emu.spec(TailscaleMode::funnel(), 3000);
    spec.check_timeout = Duration::from_secs(2);
    match start_err(spec.clone()).await {
        ProviderError::Spawn(msg) => {
            assert!(msg.contains("not enabled on this tailnet"), "{msg}");
            assert!(
                msg.contains("https://login.tailscale.com/f/funnel?node=n1111CNTRL"),
                "{msg}"
            );
        }
        other => panic!("expected the enable URL, got {other:?}"),
    }
    assert_eq!(emu.serve_config(), serde_json::json!({}));
    // Enabled while the CLI waits: it goes on and the start succeeds.
    emu.setting("EMU_SERVE_ENABLE", "after:0.3");
    let tunnel = start_ok(spec).await;
    assert_eq!(tunnel.endpoint().display, format!("https://{SELF_HOST}/"));
    tunnel.stop().await;
}

#[tokio::test]
async fn serve_below_the_version_floor_is_refused_naming_the_minimum() {
    let emu = Emu::new("running");
    emu.setting("EMU_VERSION", "1.50.1");
    match start_err(emu.spec(TailscaleMode::serve(), 8080)).await {
        ProviderError::Config(msg) => {
            assert!(msg.contains("1.50.1") && msg.contains("1.52.0"), "{msg}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_eq!(emu.calls(), [argv(&["version"])]);
}

#[tokio::test]
async fn dropping_an_exposure_without_stop_still_turns_it_off() {
    let emu = Emu::new("running");
    let tunnel = start_ok(emu.spec(TailscaleMode::funnel(), 3000)).await;
    drop(tunnel);
    assert!(
        eventually(PATIENCE, || async {
            emu.serve_config() == serde_json::json!({})
        })
        .await,
        "a dropped funnel stayed on"
    );
}

#[tokio::test]
async fn socket_flag_goes_on_every_call_and_a_dead_socket_is_a_hard_signal() {
    let emu = Emu::new("running");
    let socket = emu.dir.path().join("tailscaled.sock");
    std::fs::write(&socket, b"").expect("stand-in socket");
    let flag = format!("--socket={}", socket.display());

    let mut spec = emu.peer_spec("homebox", 22);
    spec.socket = Some(socket.clone());
    let tunnel = start_ok(spec).await;
    tunnel.check().await.expect("check");
    let calls = emu.calls();
    assert_eq!(calls[0], argv(&[&flag, "status", "--json"]));
    assert!(calls.iter().all(|c| c[0] == flag), "{calls:?}");
    assert!(calls.iter().any(|c| c[1] == "ping"));

    // tailscaled goes away: every status call fails, and after three in a row the path is
    // declared dead.
    std::fs::remove_file(&socket).expect("remove socket");
    let reason = tokio::time::timeout(PATIENCE, tunnel.closed())
        .await
        .expect("closed in time");
    assert!(reason.contains("failed 3 times in a row"), "{reason}");
    assert!(
        reason.contains("failed to connect to local tailscaled"),
        "{reason}"
    );
    tunnel.stop().await;

    let mut spec = emu.spec(TailscaleMode::serve(), 8080);
    spec.socket = Some(socket);
    match start_err(spec).await {
        ProviderError::Unhealthy(reason) => {
            assert!(reason.contains(&flag), "{reason}");
            assert!(
                reason.contains("failed to connect to local tailscaled"),
                "{reason}"
            );
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_binary_is_named_with_an_install_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let absent = dir.path().join("tailscale").display().to_string();
    let mut spec = TailscaleSpec::new(TailscaleMode::peer("homebox"), 22);
    spec.binary = Some(absent.clone());
    match start_err(spec.clone()).await {
        ProviderError::MissingBinary { binary, hint } => {
            assert_eq!(binary, absent);
            assert!(hint.contains("https://tailscale.com/download"), "{hint}");
        }
        other => panic!("expected MissingBinary, got {other:?}"),
    }
    // The default looks up `tailscale` in PATH; only testable where it is not installed.
    let installed = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("tailscale").exists()));
    if !installed {
        spec.binary = None;
        match start_err(spec).await {
            ProviderError::MissingBinary { binary, .. } => assert_eq!(binary, "tailscale"),
            other => panic!("expected MissingBinary, got {other:?}"),
        }
    }
}

#[test]
fn settings_that_cannot_work_cannot_be_built() {
    // What start used to refuse before running the CLI cannot be a spec at all.
    let peer = |peer: Option<&str>, mode: &str, port: u16| TailscaleSettings {
        mode: Some(mode.to_string()),
        peer: peer.map(str::to_string),
        port: Some(port),
        ..TailscaleSettings::default()
    };
    for (settings, key) in [
        (peer(None, "peer", 22), "peer"),
        (peer(Some("  "), "peer", 22), "peer"),
        (peer(Some("--help"), "peer", 22), "peer"),
        (peer(Some("homebox"), "peer", 0), "port"),
        (peer(Some("homebox"), "serve", 8080), "peer"),
    ] {
        match settings.clone().parse() {
            Err(errors) => {
                assert_eq!(errors.len(), 1, "{settings:?}: {errors:?}");
                assert_eq!(errors[0].key, key, "{settings:?}");
            }
            Ok(spec) => panic!("built {spec:?}"),
        }
    }
}

#[tokio::test]
async fn the_emulator_refuses_what_the_real_cli_refuses() {
    let emu = Emu::new("running");
    let run = |args: &[&str]| {
        std::process::Command::new(&emu.binary)
            .args(args)
            .output()
            .expect("run emulator")
    };
    let out = run(&["ping", "--count", "1", "homebox"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flag provided but not defined: -count"));
    let out = run(&["status", "--json", "--peers=false"]);
    assert_eq!(out.status.code(), Some(1));
    // `funnel <port> off` is the pre-1.52 syntax, refused by the real CLI.
    let out = run(&["funnel", "--bg", "3000", "off"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the CLI for serve and funnel has changed")
    );
    // Turning off what is not on fails, as it does for real.
    let out = run(&["serve", "--https=443", "off"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("handler does not exist"));
    let out = run(&["version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1.103.0"));
}

/// A DNS server on loopback that answers every A query with `answer` (and AAAA with no
/// records): enough for the daemon's resolver to find a tailnet name offline.
async fn dns_server(answer: Ipv4Addr) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
    let addr = socket.local_addr().expect("dns addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = dns_reply(&buf[..n], answer) {
                let _ = socket.send_to(&reply, from).await;
            }
        }
    });
    addr
}

fn dns_reply(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    if question_end > query.len() {
        return None;
    }
    let is_a = qtype == 1;
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    reply.extend_from_slice(&[0x81, 0x80]); // response, recursion desired + available
    reply.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if is_a {
        // Name by pointer to the question, A, IN, TTL 60, 4 bytes.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&answer.octets());
    }
    Some(reply)
}
