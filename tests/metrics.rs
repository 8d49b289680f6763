//! The metrics endpoint over real TCP: `GET /metrics` answers the OpenMetrics exposition that
//! `Metrics::render` builds from a real bus and a status snapshot, other paths get a JSON 404,
//! and clients that connect and stall never hold up a scrape.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnelkeeper::bus::{Bus, EventKind};
use tunnelkeeper::metrics::{self, Metrics};
use tunnelkeeper::status::DaemonStatus;

/// Bound on every network wait: generous for a loaded machine, never reached when things work.
const WAIT: Duration = Duration::from_secs(30);

/// One service `web` with tunnels `a` (up, primary) and `b` (down); built through serde so
/// that status fields added later with defaults don't break the test.
fn status() -> DaemonStatus {
    let tunnel = |name: &str, state: &str| {
        serde_json::json!({
            "name": name, "provider": "direct", "priority": 10, "state": state,
            "reason": null, "endpoint": null, "latency_ms": 1.5, "pid": null,
            "restarts": 0, "since": "2024-01-01T00:00:00.000Z", "hold_ms": 0,
        })
    };
    serde_json::from_value(serde_json::json!({
        "daemon": { "version": "0", "pid": 1, "config": "c.yaml",
                    "started": "2024-01-01T00:00:00.000Z", "uptime_s": 1, "last_seq": 0 },
        "services": [{
            "name": "web", "primary": "a", "degraded": false, "reason": "initial", "pin": null,
            "mode": "priority", "tunnels": [tunnel("a", "up"), tunnel("b", "down")],
            "listener": null,
        }],
        "ssh_pool": { "sessions": 2 },
    }))
    .expect("a valid status")
}

struct Server {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves metrics that saw one failover and one restart of `web`.
    async fn start() -> Server {
        let bus = Bus::new(64);
        let metrics = Metrics::new();
        let counting = CancellationToken::new();
        let collector = metrics.spawn_collector(bus.clone(), counting.clone());
        bus.publish(EventKind::PrimaryChanged {
            service: "web".into(),
            from: None,
            to: Some("b".into()),
            reason: "initial".into(),
        });
        bus.publish(EventKind::PrimaryChanged {
            service: "web".into(),
            from: Some("b".into()),
            to: Some("a".into()),
            reason: "primary_down".into(),
        });
        bus.publish(EventKind::TunnelRestarting {
            service: "web".into(),
            tunnel: "b".into(),
            attempt: 1,
            delay_ms: 500,
        });
        // The collector counts what was queued before the cancel, then ends: the scrapes below
        // see every event without waiting on the scheduler.
        counting.cancel();
        collector.await.expect("the collector panicked");
        metrics.observe_latency("web", "a", Duration::from_millis(2));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let status = status();
        let render: Arc<dyn Fn() -> String + Send + Sync> = {
            let bus = bus.clone();
            Arc::new(move || metrics.render(&status, &bus))
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(metrics::serve_tcp(listener, render, cancel.clone()));
        Server { addr, cancel, task }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the server did not stop on cancel")
            .expect("the server panicked");
    }
}

/// A response: status code, lower-cased headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole answer.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("receive");
        raw
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("no answer in time");
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric}: unexpected {other:?}"),
        })
}

/// Scrapes `/metrics` and checks the answer is a complete, parseable exposition.
async fn scrape(addr: SocketAddr) -> Scrape {
    let answer = request(addr, "GET", "/metrics").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("content-type"), Some(metrics::CONTENT_TYPE));
    assert!(answer.body.ends_with("# EOF\n"), "{}", answer.body);
    Scrape::parse(answer.body.lines().map(|l| Ok(l.to_string()))).expect("parseable")
}

#[tokio::test]
async fn get_metrics_serves_the_exposition() {
    let server = Server::start().await;
    let scrape = scrape(server.addr).await;
    let web = [("service", "web")];
    let (a, b) = (
        [("service", "web"), ("tunnel", "a")],
        [("service", "web"), ("tunnel", "b")],
    );
    assert_eq!(
        value(&scrape, "tunnelkeeper_failovers_total", &web),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "tunnelkeeper_tunnel_restarts_total", &b),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "tunnelkeeper_primary", &a), Some(1.0));
    assert_eq!(value(&scrape, "tunnelkeeper_primary", &b), Some(0.0));
    assert_eq!(
        value(
            &scrape,
            "tunnelkeeper_tunnel_up",
            &[("service", "web"), ("tunnel", "a"), ("provider", "direct")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "tunnelkeeper_tunnel_up", &b), Some(0.0));
    assert_eq!(
        value(&scrape, "tunnelkeeper_tunnel_latency_seconds_count", &a),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "tunnelkeeper_ssh_sessions", &[]), Some(2.0));
    assert_eq!(
        value(&scrape, "tunnelkeeper_events_dropped_total", &[]),
        Some(0.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn other_paths_and_methods_get_a_json_error() {
    let server = Server::start().await;
    for (method, path, status) in [
        ("GET", "/", 404),
        ("GET", "/v1/status", 404),
        ("POST", "/metrics", 405),
    ] {
        let answer = request(server.addr, method, path).await;
        assert_eq!(answer.status, status, "{method} {path}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
        assert!(body["error"].is_string(), "{body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn stalled_clients_do_not_block_a_scrape() {
    let server = Server::start().await;
    // One client sends nothing, another half a request head; neither is ever finished.
    let silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut partial = TcpStream::connect(server.addr).await.expect("connect");
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: te")
        .await
        .expect("send");
    let scrape = scrape(server.addr).await;
    assert_eq!(
        value(
            &scrape,
            "tunnelkeeper_failovers_total",
            &[("service", "web")]
        ),
        Some(1.0)
    );
    // The scrape was served while both still held their connections (the server closes them
    // only after its 5 s header timeout): it did not queue behind them.
    let mut byte = [0u8; 1];
    for stalled in [&silent, &partial] {
        match stalled.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a stalled connection was already answered or closed: {other:?}"),
        }
    }
    // Shutdown does not wait for them either.
    server.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_several_scrapes_on_one_connection() {
    let server = Server::start().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    for _ in 0..3 {
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("send");
        // Read up to and including the body announced by content-length.
        let mut raw = Vec::new();
        let complete = async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("receive");
                assert!(n > 0, "closed early");
                raw.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&raw);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .expect("content-length");
                    if body.len() >= length {
                        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                        assert!(body.ends_with("# EOF\n"));
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, complete)
            .await
            .expect("no answer in time");
    }
    server.stop().await;
}

/// The real daemon: `/metrics` on the control socket and on `metrics_listen` carry the live
/// tunnels, the primary, probe latencies and the failover a pin causes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_metrics_on_its_socket_and_on_metrics_listen() {
    let echo = support::echo_server().await;
    let port = support::free_port();
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state", metrics_listen: "127.0.0.1:{port}" }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 2, send: "x", expect: "x" }}
  failover: {{ failback_hold: 500ms }}
services:
  - name: web
    tunnels:
      - {{ name: a, provider: direct, priority: 10, address: "{echo}" }}
      - {{ name: b, provider: direct, priority: 20, address: "{echo}" }}
"#
    );
    let mut daemon = support::Daemon::start(&config).await;
    let mut events = daemon.follow();
    events.wait_up(&["a", "b"]).await;
    events
        .seen_or_wait(WAIT, "a elected", support::primary_changed(Some("a"), None))
        .await;
    daemon.client.pin("web", "b").await.unwrap();
    events
        .wait(
            WAIT,
            "pinned",
            support::primary_changed(Some("b"), Some("a")),
        )
        .await;

    let tcp = scrape(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let up = |scrape: &Scrape, t: &str| value(scrape, "tunnelkeeper_tunnel_up", &[("tunnel", t)]);
    assert_eq!(up(&tcp, "a"), Some(1.0));
    assert_eq!(up(&tcp, "b"), Some(1.0));
    let primary = |t: &str| {
        value(
            &tcp,
            "tunnelkeeper_primary",
            &[("service", "web"), ("tunnel", t)],
        )
    };
    assert_eq!(primary("b"), Some(1.0));
    assert_eq!(primary("a"), Some(0.0));
    // A pin is a primary change of reason `pin`, not a failover; a failback (if `b` happened to
    // be elected first) is a `failback`.
    let moves = events
        .seen
        .iter()
        .filter(|(_, v)| v["type"] == "primary_changed" && !v["from"].is_null())
        .count();
    assert!(moves >= 1);
    let changes = |reason: &str| {
        value(
            &tcp,
            "tunnelkeeper_primary_changes_total",
            &[("service", "web"), ("reason", reason)],
        )
    };
    assert_eq!(changes("pin"), Some(1.0));
    assert_eq!(changes("failback"), Some(moves as f64 - 1.0));
    assert_eq!(changes("failover"), Some(0.0));
    assert_eq!(
        value(&tcp, "tunnelkeeper_failovers_total", &[("service", "web")]),
        Some(0.0)
    );
    let probes = tcp
        .samples
        .iter()
        .find(|s| {
            s.metric == "tunnelkeeper_tunnel_latency_seconds" && s.labels.get("tunnel") == Some("a")
        })
        .map(|s| match &s.value {
            Value::Histogram(buckets) => buckets.last().map(|b| b.count).unwrap_or(0.0),
            other => panic!("latency: unexpected {other:?}"),
        })
        .expect("a latency histogram for a");
    assert!(probes >= 1.0, "{probes}");

    // The same exposition over the control socket.
    let response = daemon
        .client
        .request(hyper::Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        metrics::CONTENT_TYPE
    );
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let unix = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parseable");
    assert_eq!(up(&unix, "a"), Some(1.0));
    assert!(daemon.terminate().success());
}

/// The metric names an exposition declares (`# TYPE` lines), each with the sample names it
/// may produce (`_total`, `_bucket`, ...).
fn exported_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let family = rest.split_whitespace().next().unwrap_or_default();
            names.insert(family.to_owned());
            for suffix in ["_total", "_bucket", "_count", "_sum", "_info", "_created"] {
                names.insert(format!("{family}{suffix}"));
            }
        }
    }
    names
}

/// Every `tunnelkeeper_*` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let pattern = regex::Regex::new(r"tunnelkeeper_[a-z0-9_]+").unwrap();
    pattern
        .find_iter(text)
        .map(|m| m.as_str().to_owned())
        .collect()
}

fn contrib(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shipped Grafana dashboard is valid JSON with panels that Grafana can place, and every
/// query (and every alert rule) names a metric a live daemon — with a listener, a router and a
/// reload behind it — exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_the_daemon_exports() {
    let echo = support::echo_server().await;
    let port = support::free_port();
    let listen = support::free_port();
    let router_port = support::free_port();
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "@DIR@/control.sock", state_dir: "@DIR@/state", metrics_listen: "127.0.0.1:{port}" }}
defaults:
  probe: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 2 }}
routers:
  - name: rtr
    ssh: {{ host: 127.0.0.1, port: {router_port}, user: root, identity_file: "@DIR@/key",
           known_hosts: "@DIR@/known_hosts", connect_timeout: 1s }}
services:
  - name: web
    listen: "127.0.0.1:{listen}"
    tunnels:
      - {{ name: a, provider: direct, address: "{echo}" }}
"#
    );
    let mut daemon = support::Daemon::start(&config).await;
    let mut events = daemon.follow();
    events.wait_elected(&["web"]).await;
    daemon.client.reload().await.unwrap();
    let answer = request(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/metrics").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let exported = exported_names(&answer.body);

    let dashboard: serde_json::Value =
        serde_json::from_str(&contrib("contrib/grafana/tunnelkeeper.json"))
            .expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "tunnelkeeper");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut queried = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel title");
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr} names no metric");
            queried.extend(names);
        }
    }
    let alerts = contrib("contrib/prometheus/alerts.yml");
    // Its YAML and PromQL are parsed by promtool in the test below.
    queried.extend(metric_names(&alerts));
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\n{}",
        answer.body
    );
    // The panels cover the issue's list: service state, probe failures, primary changes,
    // listener figures (bytes per tunnel too), routers and reloads.
    for wanted in [
        "tunnelkeeper_service_state",
        "tunnelkeeper_probe_failures_total",
        "tunnelkeeper_primary_changes_total",
        "tunnelkeeper_listener_failed_dials_total",
        "tunnelkeeper_listener_bytes_total",
        "tunnelkeeper_tunnel_bytes_total",
        "tunnelkeeper_router_connected",
        "tunnelkeeper_router_last_verify_timestamp_seconds",
        "tunnelkeeper_router_provision_failures_total",
        "tunnelkeeper_config_last_reload_success",
    ] {
        assert!(
            queried.iter().any(|q| q == wanted),
            "no panel shows {wanted}"
        );
    }
    assert!(daemon.terminate().success());
}

/// `contrib/prometheus/alerts.yml` passes its `promtool test rules` unit tests. promtool comes
/// with Debian's `prometheus` package, which scripts/test installs.
#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus");
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian package `prometheus`; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}
