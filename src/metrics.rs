//! Prometheus metrics: counters fed by the event bus, gauges read from the status snapshot.
//!
//! [`Metrics`] keeps what must accumulate over the daemon's life — failovers, tunnel restarts,
//! router reboots (counted from the [`Bus`] by one collector task) and probe latencies (a
//! histogram fed by the service tasks). Everything that describes the present — tunnel up,
//! primary, open listener connections, SSH sessions, events dropped — is built fresh on each
//! [`Metrics::render`] from a [`DaemonStatus`], so tunnels and services removed by a reload
//! disappear from the gauges at once instead of lingering with their last value.
//!
//! The exposition is OpenMetrics text (`prometheus_client::encoding::text::encode`); counters
//! get the `_total` suffix from the encoder. Metric names and labels are a public contract:
//!
//! | metric | labels | kind |
//! |---|---|---|
//! | `tunnelkeeper_tunnel_up` | service, tunnel, provider | gauge, 1 when the state is `up` |
//! | `tunnelkeeper_tunnel_latency_seconds` | service, tunnel | histogram of successful probes |
//! | `tunnelkeeper_primary` | service, tunnel | gauge, 1 for the primary, 0 for the others |
//! | `tunnelkeeper_service_state` | service, state | gauge, 1 for the service's state (`starting`, `ok`, `degraded`, `no_primary`), 0 for the others |
//! | `tunnelkeeper_primary_backup` | service | gauge, 1 while the primary is not the service's first tunnel by priority |
//! | `tunnelkeeper_primary_changes_total` | service, reason | counter: `reason` is `failover`, `failback` or `pin` |
//! | `tunnelkeeper_failovers_total` | service | counter, the `failover` primary changes only |
//! | `tunnelkeeper_probe_failures_total` | service, tunnel | counter, every failed probe |
//! | `tunnelkeeper_tunnel_restarts_total` | service, tunnel | counter (`tunnel_restarting`) |
//! | `tunnelkeeper_listener_connections` | service | gauge, open connections |
//! | `tunnelkeeper_listener_accepted_total` | service | counter, connections accepted |
//! | `tunnelkeeper_listener_unserved_total` | service | counter, connections no tunnel could take |
//! | `tunnelkeeper_listener_failed_dials_total` | service, tunnel | counter, dials of the tunnel that failed |
//! | `tunnelkeeper_listener_bytes_total` | service, direction | counter, `to_service` / `to_client` |
//! | `tunnelkeeper_tunnel_bytes_total` | service, tunnel, direction | counter, bytes the listener relayed through the tunnel, `to_service` / `to_client` (a replayed request counts against each tunnel it was sent through) |
//! | `tunnelkeeper_ssh_sessions` | | gauge, open sessions of the SSH pool |
//! | `tunnelkeeper_router_connected` | router | gauge, 1 while the router answers |
//! | `tunnelkeeper_router_last_verify_timestamp_seconds` | router | gauge, when every `verify` check last passed (0: never) |
//! | `tunnelkeeper_router_provision_failures_total` | router | counter (`router_provision_failed`) |
//! | `tunnelkeeper_router_reboots_total` | router | counter (`router_rebooted`) |
//! | `tunnelkeeper_config_reloads_total` | result | counter, `ok` / `failed` |
//! | `tunnelkeeper_config_last_reload_success` | | gauge, 1 when the last reload succeeded (1 before any) |
//! | `tunnelkeeper_config_last_reload_timestamp_seconds` | | gauge, when the last reload was tried |
//! | `tunnelkeeper_events_dropped_total` | | counter, events lost by lagging subscribers |
//! | `tunnelkeeper_build_info` | version | info, always 1 |
//!
//! A primary change counts when the `primary_changed` event's `from` is set and differs from
//! `to` (the first election does not); its `reason` label is [`change_class`] of the event's
//! reason: `pin` for a pin or unpin, `failback` for a move to a better tunnel while the primary
//! was fine, `failover` for everything that leaves a failing primary. Listener figures are
//! read from the listener's own counters (they restart from 0 when a reload replaces the
//! listener, which `rate()` handles as a counter reset). Counters and the latency histogram keep the
//! series of removed tunnels until the daemon restarts (a counter must not go back); the
//! counters of configured services and tunnels are exported from 0 so that `increase()` sees
//! their first event.
//!
//! [`serve_tcp`] serves `GET /metrics` on `daemon.metrics_listen`, bounded like the control
//! socket: header read timeout, request head size, connections at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Delivery, EventKind};
use crate::forward::TunnelBytes;
use crate::status::{DaemonStatus, TunnelState};

/// Upper bounds of the latency histogram, in seconds: 0.1 ms to 2 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];

/// What the text encoder produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    state: String,
}

/// The values of `tunnelkeeper_service_state`'s `state` label: before the first election, with
/// a healthy primary, with a failing primary kept as a fallback, and with none at all.
const SERVICE_STATES: [&str; 4] = ["starting", "ok", "degraded", "no_primary"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    service: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    service: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelDirectionLabels {
    service: String,
    tunnel: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// The class of a primary change, from the `reason` of its `primary_changed` event (whose first
/// word is `election::Reason::word`): `pin` (pinned, unpinned), `failback` (a better tunnel
/// while the primary was fine: failback, better, better_latency) or `failover` (primary_down,
/// primary_degraded, no_candidate, anything else).
pub fn change_class(reason: &str) -> &'static str {
    let word = reason
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or_default();
    match word {
        "pinned" | "unpinned" => "pin",
        "failback" | "better" | "better_latency" => "failback",
        _ => "failover",
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    service: String,
    tunnel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpLabels {
    service: String,
    tunnel: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouterLabels {
    router: String,
}

type HistogramFamily = Family<TunnelLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The daemon's metrics. One per daemon, shared behind an `Arc`; `Send + Sync`.
#[derive(Debug)]
pub struct Metrics {
    failovers: Family<ServiceLabels, Counter>,
    changes: Family<ChangeLabels, Counter>,
    probe_failures: Family<TunnelLabels, Counter>,
    restarts: Family<TunnelLabels, Counter>,
    router_reboots: Family<RouterLabels, Counter>,
    provision_failures: Family<RouterLabels, Counter>,
    last_verify: Family<RouterLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    reloads: Family<ResultLabels, Counter>,
    last_reload_ok: Gauge,
    last_reload_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    latency: HistogramFamily,
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Arc<Metrics> {
        let last_reload_ok = Gauge::default();
        last_reload_ok.set(1);
        Arc::new(Metrics {
            failovers: Family::default(),
            changes: Family::default(),
            probe_failures: Family::default(),
            restarts: Family::default(),
            router_reboots: Family::default(),
            provision_failures: Family::default(),
            last_verify: Family::default(),
            reloads: Family::default(),
            last_reload_ok,
            last_reload_time: Gauge::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        })
    }

    /// Counts events from the bus until `cancel`: one subscriber for the daemon's life. The
    /// subscription is taken before this returns, so every event published afterwards is
    /// counted; events already queued when `cancel` fires are still counted before the task
    /// ends. A lag (events lost to a slow collector) is logged; the bus counts the loss itself
    /// (`tunnelkeeper_events_dropped_total`).
    pub fn spawn_collector(
        self: &Arc<Self>,
        bus: Arc<Bus>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut subscription = bus.subscribe();
        drop(bus);
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {
                        // Drain what is queued now, no more: publishers may keep going.
                        for _ in 0..crate::bus::DEFAULT_JOURNAL {
                            match futures_util::FutureExt::now_or_never(subscription.next()) {
                                Some(Some(delivery)) => metrics.count(delivery),
                                _ => break,
                            }
                        }
                        return;
                    }
                    delivery = subscription.next() => match delivery {
                        Some(delivery) => metrics.count(delivery),
                        None => return,
                    },
                }
            }
        })
    }

    fn count(&self, delivery: Delivery) {
        let event = match delivery {
            Delivery::Event(event) => event,
            Delivery::Lagged(n) => {
                tracing::warn!(missed = n, "metrics fell behind the event bus");
                return;
            }
        };
        match &event.kind {
            EventKind::PrimaryChanged {
                service,
                from,
                to,
                reason,
            } if from.is_some() && from != to => {
                let class = change_class(reason);
                self.changes
                    .get_or_create(&ChangeLabels {
                        service: service.clone(),
                        reason: class.to_owned(),
                    })
                    .inc();
                if class == "failover" {
                    self.failovers
                        .get_or_create(&ServiceLabels {
                            service: service.clone(),
                        })
                        .inc();
                }
            }
            EventKind::RouterProvisionFailed { router, .. } => {
                self.provision_failures
                    .get_or_create(&RouterLabels {
                        router: router.clone(),
                    })
                    .inc();
            }
            EventKind::RouterVerified { router, .. } => {
                self.last_verify
                    .get_or_create(&RouterLabels {
                        router: router.clone(),
                    })
                    .set(unix_now());
            }
            EventKind::ConfigReloaded { .. } | EventKind::ConfigReloadFailed { .. } => {
                let ok = matches!(event.kind, EventKind::ConfigReloaded { .. });
                self.reloads
                    .get_or_create(&ResultLabels {
                        result: if ok { "ok" } else { "failed" }.to_owned(),
                    })
                    .inc();
                self.last_reload_ok.set(i64::from(ok));
                self.last_reload_time.set(unix_now());
            }
            EventKind::TunnelRestarting {
                service, tunnel, ..
            } => {
                self.restarts
                    .get_or_create(&TunnelLabels {
                        service: service.clone(),
                        tunnel: tunnel.clone(),
                    })
                    .inc();
            }
            EventKind::RouterRebooted { router, .. } => {
                self.router_reboots
                    .get_or_create(&RouterLabels {
                        router: router.clone(),
                    })
                    .inc();
            }
            _ => {}
        }
    }

    /// Counts one failed probe (called by the tunnel task, for every failure: the
    /// `probe_failed` event only announces the first of a streak).
    pub fn count_probe_failure(&self, service: &str, tunnel: &str) {
        self.probe_failures
            .get_or_create(&TunnelLabels {
                service: service.to_string(),
                tunnel: tunnel.to_string(),
            })
            .inc();
    }

    /// Records one successful probe's latency (called by the service task).
    pub fn observe_latency(&self, service: &str, tunnel: &str, latency: Duration) {
        self.latency
            .get_or_create(&TunnelLabels {
                service: service.to_string(),
                tunnel: tunnel.to_string(),
            })
            .observe(latency.as_secs_f64());
    }

    /// Renders the text exposition: the counters and histograms accumulated so far, plus gauges
    /// built from this status snapshot and `bus.dropped()`.
    pub fn render(&self, status: &DaemonStatus, bus: &Bus) -> String {
        let mut registry = Registry::default();

        let up = Family::<UpLabels, Gauge>::default();
        let primary = Family::<TunnelLabels, Gauge>::default();
        let connections = Family::<ServiceLabels, Gauge>::default();
        let accepted = Family::<ServiceLabels, Counter>::default();
        let unserved = Family::<ServiceLabels, Counter>::default();
        let failed_dials = Family::<TunnelLabels, Counter>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();
        let tunnel_bytes = Family::<TunnelDirectionLabels, Counter>::default();
        let backup = Family::<ServiceLabels, Gauge>::default();
        let states = Family::<StateLabels, Gauge>::default();
        for service in &status.services {
            let service_labels = ServiceLabels {
                service: service.name.clone(),
            };
            let state = if service.starting {
                "starting"
            } else if service.primary.is_none() {
                "no_primary"
            } else if service.degraded {
                "degraded"
            } else {
                "ok"
            };
            let first = service.tunnels.iter().min_by_key(|t| t.priority);
            let on_backup = service
                .primary
                .as_deref()
                .is_some_and(|primary| first.is_some_and(|first| first.name != primary));
            backup
                .get_or_create(&service_labels)
                .set(i64::from(on_backup));
            // Exported from 0, so that the first change shows as an increase.
            for class in ["failover", "failback", "pin"] {
                let _ = self.changes.get_or_create(&ChangeLabels {
                    service: service.name.clone(),
                    reason: class.to_owned(),
                });
            }
            for name in SERVICE_STATES {
                states
                    .get_or_create(&StateLabels {
                        service: service.name.clone(),
                        state: name.to_owned(),
                    })
                    .set(i64::from(name == state));
            }
            // Exported from 0, so that the first failover shows as an increase.
            let _ = self.failovers.get_or_create(&service_labels);
            for tunnel in &service.tunnels {
                let labels = TunnelLabels {
                    service: service.name.clone(),
                    tunnel: tunnel.name.clone(),
                };
                up.get_or_create(&UpLabels {
                    service: service.name.clone(),
                    tunnel: tunnel.name.clone(),
                    provider: tunnel.provider.clone(),
                })
                .set(i64::from(tunnel.state == TunnelState::Up));
                let is_primary = service.primary.as_deref() == Some(tunnel.name.as_str());
                primary.get_or_create(&labels).set(i64::from(is_primary));
                let _ = self.restarts.get_or_create(&labels);
                let _ = self.probe_failures.get_or_create(&labels);
            }
            if let Some(listener) = &service.listener {
                connections
                    .get_or_create(&service_labels)
                    .set(i64::try_from(listener.active).unwrap_or(i64::MAX));
                accepted
                    .get_or_create(&service_labels)
                    .inc_by(listener.total);
                unserved
                    .get_or_create(&service_labels)
                    .inc_by(listener.unserved);
                for tunnel in &service.tunnels {
                    failed_dials
                        .get_or_create(&TunnelLabels {
                            service: service.name.clone(),
                            tunnel: tunnel.name.clone(),
                        })
                        .inc_by(
                            listener
                                .failed_dials
                                .get(&tunnel.name)
                                .copied()
                                .unwrap_or(0),
                        );
                }
                for (direction, value) in [
                    ("to_service", listener.bytes_to_service),
                    ("to_client", listener.bytes_to_client),
                ] {
                    bytes
                        .get_or_create(&DirectionLabels {
                            service: service.name.clone(),
                            direction: direction.to_owned(),
                        })
                        .inc_by(value);
                }
                // Configured tunnels from 0, then what the listener counted (which may name a
                // tunnel a reload removed since).
                let mut per_tunnel: std::collections::BTreeMap<&str, TunnelBytes> = service
                    .tunnels
                    .iter()
                    .map(|t| (t.name.as_str(), TunnelBytes::default()))
                    .collect();
                per_tunnel.extend(
                    listener
                        .bytes_per_tunnel
                        .iter()
                        .map(|(name, carried)| (name.as_str(), *carried)),
                );
                for (tunnel, carried) in per_tunnel {
                    for (direction, value) in [
                        ("to_service", carried.to_service),
                        ("to_client", carried.to_client),
                    ] {
                        tunnel_bytes
                            .get_or_create(&TunnelDirectionLabels {
                                service: service.name.clone(),
                                tunnel: tunnel.to_owned(),
                                direction: direction.to_owned(),
                            })
                            .inc_by(value);
                    }
                }
            }
        }
        let ssh_sessions = Gauge::<i64>::default();
        ssh_sessions.set(
            status
                .ssh_pool
                .get("sessions")
                .and_then(|v| v.as_i64())
                .unwrap_or(0),
        );
        let dropped = Counter::<u64>::default();
        dropped.inc_by(bus.dropped());
        let router_connected = Family::<RouterLabels, Gauge>::default();
        for router in &status.routers {
            let labels = RouterLabels {
                router: router.name.clone(),
            };
            router_connected
                .get_or_create(&labels)
                .set(i64::from(router.connected));
            let _ = self.provision_failures.get_or_create(&labels);
            let _ = self.router_reboots.get_or_create(&labels);
            // 0 until the first pass of every check: an alert on its age fires for a router
            // never verified too.
            let _ = self.last_verify.get_or_create(&labels);
        }
        for result in ["ok", "failed"] {
            let _ = self.reloads.get_or_create(&ResultLabels {
                result: result.to_owned(),
            });
        }

        registry.register(
            "tunnelkeeper_build",
            "The running version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "tunnelkeeper_tunnel_up",
            "1 when the tunnel is up (eligible for election), else 0",
            up,
        );
        registry.register_with_unit(
            "tunnelkeeper_tunnel_latency",
            "Latency of successful end-to-end probes",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "tunnelkeeper_primary",
            "1 for the service's current primary, 0 for its other tunnels",
            primary,
        );
        registry.register(
            "tunnelkeeper_service_state",
            "1 for the service's state: starting (first election pending), ok or degraded",
            states,
        );
        registry.register(
            "tunnelkeeper_primary_backup",
            "1 while the primary is not the service's first tunnel by priority",
            backup,
        );
        registry.register(
            "tunnelkeeper_primary_changes",
            "Primary changes away from an existing primary, by reason: failover, failback, pin",
            self.changes.clone(),
        );
        registry.register(
            "tunnelkeeper_failovers",
            "Primary changes away from a failing primary (not failbacks, not pins)",
            self.failovers.clone(),
        );
        registry.register(
            "tunnelkeeper_probe_failures",
            "Failed probes",
            self.probe_failures.clone(),
        );
        registry.register(
            "tunnelkeeper_tunnel_restarts",
            "Tunnel restarts scheduled by the supervisor",
            self.restarts.clone(),
        );
        registry.register(
            "tunnelkeeper_listener_connections",
            "Connections open through the service's failover listener",
            connections,
        );
        registry.register(
            "tunnelkeeper_listener_accepted",
            "Connections accepted by the service's failover listener",
            accepted,
        );
        registry.register(
            "tunnelkeeper_listener_unserved",
            "Connections the service's listener accepted but no tunnel could take",
            unserved,
        );
        registry.register(
            "tunnelkeeper_listener_failed_dials",
            "Dials of the tunnel by the service's listener that failed",
            failed_dials,
        );
        registry.register_with_unit(
            "tunnelkeeper_listener",
            "Bytes relayed by the service's listener, to_service or to_client",
            Unit::Bytes,
            bytes,
        );
        registry.register_with_unit(
            "tunnelkeeper_tunnel",
            "Bytes the service's listener relayed through the tunnel, to_service or to_client",
            Unit::Bytes,
            tunnel_bytes,
        );
        registry.register(
            "tunnelkeeper_ssh_sessions",
            "Open sessions of the shared SSH pool",
            ssh_sessions,
        );
        registry.register(
            "tunnelkeeper_router_reboots",
            "Router reboots detected (boot id changed)",
            self.router_reboots.clone(),
        );
        registry.register(
            "tunnelkeeper_router_connected",
            "1 while the router answers over SSH",
            router_connected,
        );
        registry.register_with_unit(
            "tunnelkeeper_router_last_verify_timestamp",
            "When every verify check of the router last passed (Unix time)",
            Unit::Seconds,
            self.last_verify.clone(),
        );
        registry.register(
            "tunnelkeeper_router_provision_failures",
            "Failed provision commands of the router",
            self.provision_failures.clone(),
        );
        registry.register(
            "tunnelkeeper_config_reloads",
            "Configuration reloads, by result: ok or failed",
            self.reloads.clone(),
        );
        registry.register(
            "tunnelkeeper_config_last_reload_success",
            "1 when the last reload succeeded (or none was tried), 0 when it failed",
            self.last_reload_ok.clone(),
        );
        registry.register_with_unit(
            "tunnelkeeper_config_last_reload_timestamp",
            "When the last reload was tried (Unix time; 0 before any)",
            Unit::Seconds,
            self.last_reload_time.clone(),
        );
        registry.register(
            "tunnelkeeper_events_dropped",
            "Events lost by event-bus subscribers that fell behind",
            dropped,
        );

        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            // Writing to a String cannot fail; an encoder bug must not take the daemon down.
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

/// Bounds of the metrics HTTP server.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Connections served at once; more are closed on accept.
    max_connections: usize,
    /// Connections one source address may hold at once (a scraper needs one): no single host
    /// can take every slot.
    per_ip: usize,
    /// A client must send its request headers within this time (also bounds idle keep-alive).
    header_timeout: Duration,
    /// Request heads larger than this are refused.
    max_head: usize,
    /// A connection is closed after this long (after the answer in flight, if the client reads
    /// it within `header_timeout`): a keep-alive client that never reads cannot hold a slot.
    lifetime: Duration,
}

const LIMITS: Limits = Limits {
    max_connections: 64,
    per_ip: 4,
    header_timeout: Duration::from_secs(5),
    max_head: 16 * 1024,
    lifetime: Duration::from_secs(10),
};

/// Serves `GET /metrics` (200, OpenMetrics text from `render`) and a JSON `{"error": ..}`
/// otherwise, on `listener` until `cancel`. Each connection has its own task and one of 64
/// slots, at most 4 per source address (more are closed on accept); a client that sends nothing
/// or half a request head is dropped after the 5 s header timeout, one that never reads its
/// answer after the 10 s connection lifetime (+5 s), and neither blocks other scrapes. A client
/// that half-closes after its request still gets the answer. When `cancel` fires, open
/// connections finish the scrape in flight (within 2 s) and close. No authentication: binding
/// anything but loopback is logged as a warning.
pub async fn serve_tcp(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    cancel: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "daemon.metrics_listen is not a loopback address: anyone who can reach it reads \
                 the metrics (tunnel names, endpoints' health); firewall it or bind 127.0.0.1"
            );
        }
    }
    serve_with(listener, render, cancel, LIMITS).await
}

/// On shutdown, how long open connections may take to finish the scrape in flight.
const DRAIN: Duration = Duration::from_secs(2);

/// The accept loop is the daemon's bounded [`Server`](crate::server::Server) (connections over
/// the limit closed on accept); what is metrics' own is the per-address quota and the routes.
async fn serve_with(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    cancel: CancellationToken,
    limits: Limits,
) {
    use crate::server::{HttpLimits, Quota, Server, Shutdown, WhenFull};
    let server = Server::new("metrics", limits.max_connections, WhenFull::Refuse);
    let sources = Quota::default();
    let http = HttpLimits {
        header_timeout: limits.header_timeout,
        max_head: limits.max_head,
        lifetime: Some(limits.lifetime),
    };
    let _accepting = server.serve(listener, move |(stream, peer), shutdown: &Shutdown| {
        // Over its source's share: closed at once, never queued.
        let Some(source) = sources.take(peer.ip(), limits.per_ip) else {
            tracing::debug!(%peer, "metrics: too many connections from this address; closed");
            return None;
        };
        let render = render.clone();
        let shutdown = shutdown.clone();
        Some(async move {
            crate::server::http1(stream, http, &shutdown, move |req| {
                std::future::ready(route(&req, &*render))
            })
            .await;
            drop(source);
        })
    });
    cancel.cancelled().await;
    server.shutdown(DRAIN).await;
}

type Body = crate::server::Body;

fn route(req: &Request<Incoming>, render: &(dyn Fn() -> String + Send + Sync)) -> Response<Body> {
    use crate::http_reply::error;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(Bytes::from(render())).boxed())
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response")),
        (_, "/metrics") => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        (_, path) => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::ListenerStatus;
    use crate::status::{ServiceStatus, TunnelStatus};
    use prometheus_parse::{Scrape, Value};

    fn tunnel(name: &str, state: TunnelState) -> TunnelStatus {
        serde_json::from_value(serde_json::json!({
            "name": name, "provider": "direct", "priority": 10, "state": state,
            "reason": null, "endpoint": null, "latency_ms": null, "pid": null,
            "restarts": 0, "since": "2024-01-01T00:00:00.000Z", "hold_ms": 0,
        }))
        .unwrap()
    }

    fn service(name: &str, primary: Option<&str>, tunnels: Vec<TunnelStatus>) -> ServiceStatus {
        serde_json::from_value(serde_json::json!({
            "name": name, "primary": primary, "degraded": false, "reason": "", "pin": null,
            "mode": "priority", "tunnels": tunnels, "listener": null,
        }))
        .unwrap()
    }

    /// Status values are built through serde so that fields added later with defaults don't
    /// break the tests.
    fn daemon(services: Vec<ServiceStatus>) -> DaemonStatus {
        serde_json::from_value(serde_json::json!({
            "daemon": { "version": "0", "pid": 1, "config": "c.yaml",
                        "started": "2024-01-01T00:00:00.000Z", "uptime_s": 1, "last_seq": 0 },
            "services": services,
            "ssh_pool": { "sessions": 3, "channels_in_use": 5 },
        }))
        .unwrap()
    }

    /// `web` (primary `a` up, `b` down, a listener with 4 open connections) and `db` (no
    /// primary; `x` down, `y` probing).
    fn two_services() -> DaemonStatus {
        let mut web = service(
            "web",
            Some("a"),
            vec![tunnel("a", TunnelState::Up), tunnel("b", TunnelState::Down)],
        );
        web.listener = Some(ListenerStatus {
            address: "127.0.0.1:2222".into(),
            active: 4,
            total: 9,
            ..ListenerStatus::default()
        });
        let db = service(
            "db",
            None,
            vec![
                tunnel("x", TunnelState::Down),
                tunnel("y", TunnelState::Probing),
            ],
        );
        daemon(vec![web, db])
    }

    fn parse(text: &str) -> Scrape {
        assert!(text.ends_with("# EOF\n"), "{text}");
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn matches(s: &prometheus_parse::Sample, metric: &str, labels: &[(&str, &str)]) -> bool {
        s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    }

    /// The value of the sample named `metric` with (at least) `labels`.
    fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| matches(s, metric, labels))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{metric}: unexpected {other:?}"),
            })
    }

    fn changed(service: &str, from: Option<&str>, to: Option<&str>) -> EventKind {
        changed_for(service, from, to, "primary_down (hard: killed by signal 9)")
    }

    fn changed_for(service: &str, from: Option<&str>, to: Option<&str>, reason: &str) -> EventKind {
        EventKind::PrimaryChanged {
            service: service.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
            reason: reason.into(),
        }
    }

    fn restarting(service: &str, tunnel: &str) -> EventKind {
        EventKind::TunnelRestarting {
            service: service.into(),
            tunnel: tunnel.into(),
            attempt: 1,
            delay_ms: 500,
        }
    }

    fn rebooted(router: &str) -> EventKind {
        EventKind::RouterRebooted {
            router: router.into(),
            old_boot_id: Some("old".into()),
            new_boot_id: "new".into(),
        }
    }

    /// Publishes `events` to a fresh collector and waits until it has counted all of them.
    async fn collect(metrics: &Arc<Metrics>, bus: &Arc<Bus>, events: Vec<EventKind>) {
        let cancel = CancellationToken::new();
        let collector = metrics.spawn_collector(bus.clone(), cancel.clone());
        for event in events {
            bus.publish(event);
        }
        // Events queued before the cancel are drained before the task ends.
        cancel.cancel();
        collector.await.unwrap();
    }

    #[tokio::test]
    async fn counts_bus_events_and_renders_gauges_from_the_snapshot() {
        let bus = Bus::new(64);
        let metrics = Metrics::new();
        collect(
            &metrics,
            &bus,
            vec![
                changed("web", None, Some("a")), // first election: not a failover
                changed("web", Some("a"), Some("b")),
                changed_for("web", Some("b"), Some("a"), "failback"),
                changed_for("web", Some("a"), Some("b"), "pinned"),
                changed_for("web", Some("b"), Some("a"), "unpinned"),
                changed_for("web", Some("a"), Some("b"), "better_latency"),
                changed_for("web", Some("b"), Some("a"), "primary_degraded"),
                changed("db", None, Some("x")),
                changed("db", Some("x"), None), // lost with no replacement
                restarting("web", "b"),
                restarting("web", "b"),
                restarting("db", "x"),
                rebooted("home-router"),
                rebooted("home-router"),
                EventKind::DaemonStopping {},
            ],
        )
        .await;
        metrics.observe_latency("web", "a", Duration::from_micros(900));
        metrics.observe_latency("web", "a", Duration::from_millis(3));

        let scrape = parse(&metrics.render(&two_services(), &bus));
        let v = |m: &str, l: &[(&str, &str)]| value(&scrape, m, l);
        let web = [("service", "web")];
        let (web_a, web_b) = (
            [("service", "web"), ("tunnel", "a")],
            [("service", "web"), ("tunnel", "b")],
        );
        let (db_x, db_y) = (
            [("service", "db"), ("tunnel", "x")],
            [("service", "db"), ("tunnel", "y")],
        );

        // Failbacks and pins are primary changes, not failovers.
        assert_eq!(v("tunnelkeeper_failovers_total", &web), Some(2.0));
        let change = |service: &str, reason: &str| {
            v(
                "tunnelkeeper_primary_changes_total",
                &[("service", service), ("reason", reason)],
            )
        };
        assert_eq!(change("web", "failover"), Some(2.0));
        assert_eq!(change("web", "failback"), Some(2.0));
        assert_eq!(change("web", "pin"), Some(2.0));
        assert_eq!(change("db", "failover"), Some(1.0));
        assert_eq!(change("db", "pin"), Some(0.0));
        assert_eq!(
            v("tunnelkeeper_failovers_total", &[("service", "db")]),
            Some(1.0)
        );
        assert_eq!(v("tunnelkeeper_tunnel_restarts_total", &web_b), Some(2.0));
        assert_eq!(v("tunnelkeeper_tunnel_restarts_total", &db_x), Some(1.0));
        // Configured tunnels are exported from 0.
        assert_eq!(v("tunnelkeeper_tunnel_restarts_total", &web_a), Some(0.0));
        assert_eq!(
            v(
                "tunnelkeeper_router_reboots_total",
                &[("router", "home-router")]
            ),
            Some(2.0)
        );

        assert_eq!(v("tunnelkeeper_primary", &web_a), Some(1.0));
        assert_eq!(v("tunnelkeeper_primary", &web_b), Some(0.0));
        assert_eq!(v("tunnelkeeper_primary", &db_x), Some(0.0));
        assert_eq!(v("tunnelkeeper_primary", &db_y), Some(0.0));
        assert_eq!(
            v(
                "tunnelkeeper_tunnel_up",
                &[("service", "web"), ("tunnel", "a"), ("provider", "direct")]
            ),
            Some(1.0)
        );
        assert_eq!(v("tunnelkeeper_tunnel_up", &web_b), Some(0.0));
        assert_eq!(
            v("tunnelkeeper_tunnel_up", &db_y),
            Some(0.0),
            "probing is not up"
        );
        assert_eq!(v("tunnelkeeper_listener_connections", &web), Some(4.0));
        assert_eq!(
            v("tunnelkeeper_listener_connections", &[("service", "db")]),
            None,
            "db has no listener"
        );
        assert_eq!(v("tunnelkeeper_ssh_sessions", &[]), Some(3.0));
        assert_eq!(v("tunnelkeeper_events_dropped_total", &[]), Some(0.0));
        assert_eq!(
            v(
                "tunnelkeeper_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );

        assert_eq!(
            v("tunnelkeeper_tunnel_latency_seconds_count", &web_a),
            Some(2.0)
        );
        let sum = v("tunnelkeeper_tunnel_latency_seconds_sum", &web_a).unwrap();
        assert!((sum - 0.0039).abs() < 1e-9, "sum {sum}");
        let histogram = scrape
            .samples
            .iter()
            .find(|s| matches(s, "tunnelkeeper_tunnel_latency_seconds", &web_a))
            .expect("the latency histogram");
        let Value::Histogram(buckets) = &histogram.value else {
            panic!("not a histogram: {histogram:?}");
        };
        let le = |bound: f64| {
            buckets
                .iter()
                .find(|b| b.less_than == bound)
                .map(|b| b.count)
        };
        assert_eq!(le(0.0005), Some(0.0));
        assert_eq!(le(0.001), Some(1.0));
        assert_eq!(le(0.005), Some(2.0));
        assert_eq!(le(f64::INFINITY), Some(2.0));
        assert_eq!(
            v("tunnelkeeper_tunnel_latency_seconds_count", &web_b),
            None,
            "no probe observed"
        );
    }

    #[tokio::test]
    async fn removed_tunnels_and_services_disappear_from_the_gauges() {
        let bus = Bus::new(64);
        let metrics = Metrics::new();
        collect(&metrics, &bus, vec![restarting("web", "b")]).await;
        let before = parse(&metrics.render(&two_services(), &bus));
        let web_b = [("service", "web"), ("tunnel", "b")];
        assert_eq!(value(&before, "tunnelkeeper_tunnel_up", &web_b), Some(0.0));

        // After a reload: `web` lost `b` and its listener, `db` is gone.
        let mut status = two_services();
        status.services.truncate(1);
        status.services[0].tunnels.truncate(1);
        status.services[0].listener = None;
        let after = parse(&metrics.render(&status, &bus));
        for gauge in ["tunnelkeeper_tunnel_up", "tunnelkeeper_primary"] {
            assert_eq!(value(&after, gauge, &web_b), None, "{gauge}");
            assert_eq!(value(&after, gauge, &[("service", "db")]), None, "{gauge}");
            assert_eq!(
                value(&after, gauge, &[("service", "web"), ("tunnel", "a")]),
                Some(1.0),
                "{gauge}"
            );
        }
        assert_eq!(
            value(&after, "tunnelkeeper_listener_connections", &[]),
            None
        );
        // A counter never goes back: the removed tunnel's restarts stay exported.
        assert_eq!(
            value(&after, "tunnelkeeper_tunnel_restarts_total", &web_b),
            Some(1.0)
        );
    }

    #[tokio::test]
    async fn a_lagging_collector_counts_what_it_received_and_the_loss_is_exported() {
        // Current-thread runtime: the collector cannot run before the burst is published.
        let bus = Bus::new(16);
        let metrics = Metrics::new();
        collect(&metrics, &bus, vec![restarting("web", "a"); 100]).await;
        assert_eq!(bus.dropped(), 84);
        let scrape = parse(&metrics.render(&two_services(), &bus));
        assert_eq!(
            value(&scrape, "tunnelkeeper_events_dropped_total", &[]),
            Some(84.0)
        );
        assert_eq!(
            value(
                &scrape,
                "tunnelkeeper_tunnel_restarts_total",
                &[("service", "web"), ("tunnel", "a")]
            ),
            Some(16.0)
        );
    }

    #[tokio::test]
    async fn the_collector_stops_on_cancel_and_unsubscribes() {
        let bus = Bus::new(16);
        let metrics = Metrics::new();
        let cancel = CancellationToken::new();
        let collector = metrics.spawn_collector(bus.clone(), cancel.clone());
        assert_eq!(bus.subscriber_count(), 1);
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), collector)
            .await
            .expect("the collector did not stop")
            .unwrap();
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[test]
    fn the_service_state_says_starting_ok_or_degraded() {
        let mut status = two_services();
        let mut starting = service("new", None, vec![tunnel("z", TunnelState::Probing)]);
        starting.starting = true;
        status.services.push(starting);
        let text = Metrics::new().render(&status, &Bus::new(4));
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let state = |service: &str| -> Vec<String> {
            scrape
                .samples
                .iter()
                .filter(|s| {
                    s.metric == "tunnelkeeper_service_state"
                        && s.labels.get("service") == Some(service)
                        && matches!(s.value, Value::Gauge(v) if v == 1.0)
                })
                .filter_map(|s| s.labels.get("state").map(str::to_owned))
                .collect()
        };
        assert_eq!(state("web"), ["ok"]);
        assert_eq!(state("db"), ["no_primary"]);
        assert_eq!(state("new"), ["starting"]);
    }

    #[test]
    fn latency_buckets_span_a_tenth_of_a_millisecond_to_two_seconds() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS[0], 0.0001);
        assert_eq!(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1], 2.0);
    }

    #[tokio::test]
    async fn a_keep_alive_connection_is_closed_after_its_lifetime() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let limits = Limits {
            header_timeout: Duration::from_secs(120),
            lifetime: Duration::from_millis(200),
            ..LIMITS
        };
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| "# EOF\n".to_string());
        let server = tokio::spawn(serve_with(listener, render, cancel.clone(), limits));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        // Keep-alive: the answer, then the close at the end of the lifetime — far sooner than
        // the header timeout would.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut answer))
            .await
            .expect("the connection outlived its lifetime")
            .unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("# EOF\n"), "{answer}");
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_client_is_dropped_after_the_header_timeout() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            ..LIMITS
        };
        let server = tokio::spawn(serve_with(
            listener,
            Arc::new(String::new),
            cancel.clone(),
            limits,
        ));
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        // The server closes the connection (maybe after a 408); generous bound for a loaded box,
        // far below the 60 s connection lifetime.
        tokio::time::timeout(Duration::from_secs(30), idle.read_to_end(&mut buf))
            .await
            .expect("the idle connection was not closed")
            .ok();
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_slot() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let limits = Limits {
            header_timeout: Duration::from_secs(120),
            lifetime: Duration::from_secs(120),
            ..LIMITS
        };
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| "# EOF\n".to_string());
        let server = tokio::spawn(serve_with(listener, render, cancel.clone(), limits));
        let from = |ip: &str| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(addr)
        };
        // Silent connections from 127.0.0.1 up to its share, each one accepted and held.
        let mut held = Vec::new();
        for _ in 0..LIMITS.per_ip {
            held.push(from("127.0.0.1").await.unwrap());
        }
        let scrape = |mut c: tokio::net::TcpStream| async move {
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .ok();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut answer))
                .await
                .expect("no answer and no close")
                .ok();
            String::from_utf8_lossy(&answer).into_owned()
        };
        // One more from the same address is closed without an answer …
        let over = scrape(from("127.0.0.1").await.unwrap()).await;
        assert_eq!(over, "", "a connection over the per-address cap was served");
        // … while another address is still served.
        let other = scrape(from("127.0.0.2").await.unwrap()).await;
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
        drop(held);
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn probe_failures_routers_reloads_listener_figures_and_the_backup_gauge() {
        let bus = Bus::new(64);
        let metrics = Metrics::new();
        collect(
            &metrics,
            &bus,
            vec![
                EventKind::RouterProvisionFailed {
                    router: "gw".into(),
                    command: "x".into(),
                    exit_status: Some(1),
                    reason: "no".into(),
                    retry_in_ms: 1000,
                },
                EventKind::RouterProvisionFailed {
                    router: "gw".into(),
                    command: "x".into(),
                    exit_status: Some(1),
                    reason: "no".into(),
                    retry_in_ms: 2000,
                },
                EventKind::RouterVerified {
                    router: "gw".into(),
                    checks: 2,
                },
                EventKind::ConfigReloaded {
                    added: vec![],
                    removed: vec![],
                    changed: vec![],
                },
                EventKind::ConfigReloadFailed {
                    error: "bad".into(),
                },
            ],
        )
        .await;
        for _ in 0..3 {
            metrics.count_probe_failure("web", "b");
        }
        let mut status = two_services();
        // `web` runs on `b`, its second tunnel by priority.
        status.services[0].primary = Some("b".into());
        status.services[0].tunnels[1].priority = 20;
        if let Some(listener) = &mut status.services[0].listener {
            listener.failed_dials.insert("a".into(), 5);
            listener.bytes_to_service = 100;
            listener.bytes_to_client = 2000;
            listener.unserved = 1;
            // `a` carried 30 + 500 bytes, then `b` the rest; `b` also got a 10-byte replay,
            // and `old` (removed by a reload since) carried some before.
            let carried = |to_service, to_client| crate::forward::TunnelBytes {
                to_service,
                to_client,
            };
            listener.bytes_per_tunnel = [
                ("a".to_owned(), carried(30, 500)),
                ("b".to_owned(), carried(80, 1400)),
                ("old".to_owned(), carried(0, 100)),
            ]
            .into();
        }
        let mut router: crate::router::RouterStatus = serde_json::from_value(serde_json::json!({
            "name": "gw", "connected": true, "boot_id": null, "last_reboot": null,
            "last_provision": null, "checks": [], "reason": null,
        }))
        .unwrap();
        status.routers.push(router.clone());
        router.name = "down".into();
        router.connected = false;
        status.routers.push(router);
        let scrape = parse(&metrics.render(&status, &bus));
        let v = |m: &str, l: &[(&str, &str)]| value(&scrape, m, l);
        let web = [("service", "web")];
        assert_eq!(
            v(
                "tunnelkeeper_probe_failures_total",
                &[("service", "web"), ("tunnel", "b")]
            ),
            Some(3.0)
        );
        assert_eq!(
            v(
                "tunnelkeeper_probe_failures_total",
                &[("service", "db"), ("tunnel", "x")]
            ),
            Some(0.0)
        );
        assert_eq!(v("tunnelkeeper_primary_backup", &web), Some(1.0));
        assert_eq!(
            v("tunnelkeeper_primary_backup", &[("service", "db")]),
            Some(0.0)
        );
        assert_eq!(v("tunnelkeeper_listener_accepted_total", &web), Some(9.0));
        assert_eq!(v("tunnelkeeper_listener_unserved_total", &web), Some(1.0));
        assert_eq!(
            v(
                "tunnelkeeper_listener_failed_dials_total",
                &[("service", "web"), ("tunnel", "a")]
            ),
            Some(5.0)
        );
        assert_eq!(
            v(
                "tunnelkeeper_listener_failed_dials_total",
                &[("service", "web"), ("tunnel", "b")]
            ),
            Some(0.0)
        );
        assert_eq!(
            v(
                "tunnelkeeper_listener_bytes_total",
                &[("service", "web"), ("direction", "to_client")]
            ),
            Some(2000.0)
        );
        for (tunnel, direction, bytes) in [
            ("a", "to_service", 30.0),
            ("a", "to_client", 500.0),
            ("b", "to_service", 80.0),
            ("b", "to_client", 1400.0),
            ("old", "to_service", 0.0),
            ("old", "to_client", 100.0),
        ] {
            let labels = [
                ("service", "web"),
                ("tunnel", tunnel),
                ("direction", direction),
            ];
            assert_eq!(
                v("tunnelkeeper_tunnel_bytes_total", &labels),
                Some(bytes),
                "{labels:?}"
            );
        }
        // No listener, no byte series.
        assert_eq!(
            v(
                "tunnelkeeper_tunnel_bytes_total",
                &[
                    ("service", "db"),
                    ("tunnel", "x"),
                    ("direction", "to_client")
                ]
            ),
            None
        );
        assert_eq!(
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == "tunnelkeeper_tunnel_bytes_total")
                .count(),
            6
        );
        assert_eq!(
            v("tunnelkeeper_router_connected", &[("router", "gw")]),
            Some(1.0)
        );
        assert_eq!(
            v("tunnelkeeper_router_connected", &[("router", "down")]),
            Some(0.0)
        );
        assert_eq!(
            v(
                "tunnelkeeper_router_provision_failures_total",
                &[("router", "gw")]
            ),
            Some(2.0)
        );
        assert_eq!(
            v(
                "tunnelkeeper_router_provision_failures_total",
                &[("router", "down")]
            ),
            Some(0.0)
        );
        let verified = v(
            "tunnelkeeper_router_last_verify_timestamp_seconds",
            &[("router", "gw")],
        )
        .expect("a verify time");
        assert!(verified > 1.7e9, "{verified}");
        assert_eq!(
            v("tunnelkeeper_config_reloads_total", &[("result", "ok")]),
            Some(1.0)
        );
        assert_eq!(
            v("tunnelkeeper_config_reloads_total", &[("result", "failed")]),
            Some(1.0)
        );
        assert_eq!(v("tunnelkeeper_config_last_reload_success", &[]), Some(0.0));
        assert!(v("tunnelkeeper_config_last_reload_timestamp_seconds", &[]).unwrap() > 1.7e9);
    }

    #[test]
    fn primary_changes_are_classed_by_the_reason_word() {
        for (reason, class) in [
            ("primary_down (hard: killed by signal 9)", "failover"),
            ("primary_down", "failover"),
            ("primary_degraded", "failover"),
            ("no_candidate", "failover"),
            ("failback", "failback"),
            ("better", "failback"),
            ("better_latency", "failback"),
            ("pinned", "pin"),
            ("unpinned", "pin"),
        ] {
            assert_eq!(change_class(reason), class, "{reason}");
        }
    }
}
