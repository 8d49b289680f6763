//! The event bus: every state change is published here, once, in order.
//!
//! A [`Bus`] numbers events with a monotonic `seq`, keeps the most recent ones in a bounded
//! journal so that `GET /v1/events?since=SEQ` can replay what a client missed, and fans them out
//! over a `tokio::sync::broadcast` channel. Publishing never waits for a subscriber: a slow one
//! lags, is told how many events it missed, and carries on — an election is never blocked by a
//! reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::broadcast;

/// How many events the journal keeps for replay by default.
pub const DEFAULT_JOURNAL: usize = 4096;

/// One published event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Monotonic sequence number, starting at 1.
    pub seq: u64,
    /// Wall-clock time of publication, RFC 3339 with milliseconds.
    pub time: String,
    /// What happened; serialized as `type` plus the variant's fields.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// The snake_case event type, as in `type`.
    pub fn type_name(&self) -> &'static str {
        self.kind.type_name()
    }
}

/// Everything the daemon announces. Field names are part of the public contract.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A provider is starting the tunnel.
    TunnelStarting {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
    },
    /// Probes passed `rise` times: the tunnel can carry traffic.
    TunnelUp {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// Where it leads.
        endpoint: String,
    },
    /// The tunnel stopped carrying traffic.
    TunnelDown {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// Why.
        reason: String,
        /// True for a hard signal (child exit, disconnect, failed start): acted on at once.
        hard: bool,
    },
    /// The supervisor will start the tunnel again after a backoff.
    TunnelRestarting {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// Consecutive restart attempt, from 1.
        attempt: u32,
        /// Backoff before the attempt, in milliseconds.
        delay_ms: u64,
    },
    /// A probe failed after a success (the first failure of a streak).
    ProbeFailed {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// What failed.
        reason: String,
    },
    /// A probe succeeded after a failure streak.
    ProbeRecovered {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// Failures in the streak that ended.
        failures: u32,
    },
    /// The service's primary changed.
    PrimaryChanged {
        /// Service name.
        service: String,
        /// Previous primary.
        from: Option<String>,
        /// New primary.
        to: Option<String>,
        /// Why, e.g. `primary_down (hard: killed by signal 9)`, `failback`, `pinned`.
        reason: String,
    },
    /// No tunnel of the service qualifies; `fallback` is what traffic is sent to meanwhile.
    NoHealthyTunnel {
        /// Service name.
        service: String,
        /// The last primary kept as a degraded fallback, if any.
        fallback: Option<String>,
    },
    /// The SSH connection to a router was lost.
    RouterConnectionDropped {
        /// Router name.
        router: String,
        /// Why.
        reason: String,
    },
    /// The SSH connection to a router is back (or made for the first time).
    RouterReconnected {
        /// Router name.
        router: String,
    },
    /// The router's boot id changed: it rebooted.
    RouterRebooted {
        /// Router name.
        router: String,
        /// The boot id seen before (persisted across daemon restarts), if any.
        old_boot_id: Option<String>,
        /// The boot id now.
        new_boot_id: String,
    },
    /// Every `provision` command succeeded.
    RouterProvisioned {
        /// Router name.
        router: String,
        /// What triggered it: `reboot`, `first_contact`, `drift`.
        cause: String,
        /// How long the commands took, in milliseconds.
        duration_ms: u64,
        /// How many commands ran.
        commands: usize,
    },
    /// A `provision` command failed; it is retried with backoff.
    RouterProvisionFailed {
        /// Router name.
        router: String,
        /// The command that failed.
        command: String,
        /// Its exit status, if it exited.
        exit_status: Option<u32>,
        /// Why, including the tail of its stderr.
        reason: String,
        /// Milliseconds until the retry.
        retry_in_ms: u64,
    },
    /// A `verify` check did not give the expected result.
    RouterDriftDetected {
        /// Router name.
        router: String,
        /// Check name.
        check: String,
        /// What it should print (`exit 0` when no `expect`).
        expected: String,
        /// What it printed or how it failed.
        got: String,
    },
    /// Every `verify` check passed.
    RouterVerified {
        /// Router name.
        router: String,
        /// How many checks ran.
        checks: usize,
    },
    /// The configuration was reloaded.
    ConfigReloaded {
        /// Added services (`NAME`), tunnels (`SERVICE/TUNNEL`) and routers (`router:NAME`).
        added: Vec<String>,
        /// Removed names.
        removed: Vec<String>,
        /// Changed names.
        changed: Vec<String>,
    },
    /// A reload was refused (invalid file, or a listener address that cannot be bound); the
    /// previous configuration keeps running.
    ConfigReloadFailed {
        /// Why, with every diagnostic (`FILE:LINE:COL: key: message`).
        error: String,
    },
    /// The daemon is shutting down.
    DaemonStopping {},
}

impl EventKind {
    /// The snake_case event type.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::TunnelStarting { .. } => "tunnel_starting",
            EventKind::TunnelUp { .. } => "tunnel_up",
            EventKind::TunnelDown { .. } => "tunnel_down",
            EventKind::TunnelRestarting { .. } => "tunnel_restarting",
            EventKind::ProbeFailed { .. } => "probe_failed",
            EventKind::ProbeRecovered { .. } => "probe_recovered",
            EventKind::PrimaryChanged { .. } => "primary_changed",
            EventKind::NoHealthyTunnel { .. } => "no_healthy_tunnel",
            EventKind::RouterConnectionDropped { .. } => "router_connection_dropped",
            EventKind::RouterReconnected { .. } => "router_reconnected",
            EventKind::RouterRebooted { .. } => "router_rebooted",
            EventKind::RouterProvisioned { .. } => "router_provisioned",
            EventKind::RouterProvisionFailed { .. } => "router_provision_failed",
            EventKind::RouterDriftDetected { .. } => "router_drift_detected",
            EventKind::RouterVerified { .. } => "router_verified",
            EventKind::ConfigReloaded { .. } => "config_reloaded",
            EventKind::ConfigReloadFailed { .. } => "config_reload_failed",
            EventKind::DaemonStopping {} => "daemon_stopping",
        }
    }

    /// The service the event concerns, if any.
    pub fn service(&self) -> Option<&str> {
        match self {
            EventKind::TunnelStarting { service, .. }
            | EventKind::TunnelUp { service, .. }
            | EventKind::TunnelDown { service, .. }
            | EventKind::TunnelRestarting { service, .. }
            | EventKind::ProbeFailed { service, .. }
            | EventKind::ProbeRecovered { service, .. }
            | EventKind::PrimaryChanged { service, .. }
            | EventKind::NoHealthyTunnel { service, .. } => Some(service),
            _ => None,
        }
    }

    /// The tunnel the event concerns, if any.
    pub fn tunnel(&self) -> Option<&str> {
        match self {
            EventKind::TunnelStarting { tunnel, .. }
            | EventKind::TunnelUp { tunnel, .. }
            | EventKind::TunnelDown { tunnel, .. }
            | EventKind::TunnelRestarting { tunnel, .. }
            | EventKind::ProbeFailed { tunnel, .. }
            | EventKind::ProbeRecovered { tunnel, .. } => Some(tunnel),
            _ => None,
        }
    }

    /// The router the event concerns, if any.
    pub fn router(&self) -> Option<&str> {
        match self {
            EventKind::RouterConnectionDropped { router, .. }
            | EventKind::RouterReconnected { router }
            | EventKind::RouterRebooted { router, .. }
            | EventKind::RouterProvisioned { router, .. }
            | EventKind::RouterProvisionFailed { router, .. }
            | EventKind::RouterDriftDetected { router, .. }
            | EventKind::RouterVerified { router, .. } => Some(router),
            _ => None,
        }
    }
}

/// Every event type name, for validating hook `on:` lists and documentation.
pub const EVENT_TYPES: &[&str] = &[
    "tunnel_starting",
    "tunnel_up",
    "tunnel_down",
    "tunnel_restarting",
    "probe_failed",
    "probe_recovered",
    "primary_changed",
    "no_healthy_tunnel",
    "router_connection_dropped",
    "router_reconnected",
    "router_rebooted",
    "router_provisioned",
    "router_provision_failed",
    "router_drift_detected",
    "router_verified",
    "config_reloaded",
    "config_reload_failed",
    "daemon_stopping",
];

struct Journal {
    next_seq: u64,
    ring: VecDeque<Arc<Event>>,
    capacity: usize,
}

/// The broadcast bus with its replay journal. Cheap to share behind an `Arc`.
pub struct Bus {
    journal: Mutex<Journal>,
    tx: broadcast::Sender<Arc<Event>>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("last_seq", &self.last_seq())
            .finish()
    }
}

impl Bus {
    /// A bus whose journal keeps `journal` events and whose subscribers may fall `journal`
    /// events behind before they lag.
    pub fn new(journal: usize) -> Arc<Bus> {
        let capacity = journal.max(16);
        let (tx, _) = broadcast::channel(capacity);
        Arc::new(Bus {
            journal: Mutex::new(Journal {
                next_seq: 1,
                ring: VecDeque::with_capacity(capacity),
                capacity,
            }),
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Numbers, journals, logs and broadcasts an event.
    pub fn publish(&self, kind: EventKind) -> Arc<Event> {
        let mut journal = self.lock();
        let event = Arc::new(Event {
            seq: journal.next_seq,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind,
        });
        journal.next_seq += 1;
        if journal.ring.len() == journal.capacity {
            journal.ring.pop_front();
        }
        journal.ring.push_back(event.clone());
        // Sent under the journal lock so that broadcast order equals seq order.
        let _ = self.tx.send(event.clone());
        drop(journal);
        log_event(&event);
        event
    }

    /// Sequence number of the last published event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Events lost by lagging subscribers, summed over all of them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Live subscriptions (hooks, routers, metrics, event streams): a reload must not grow it.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A live subscription starting after the current last event.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            bus: self.clone(),
        }
    }

    /// Atomically: the journaled events with `seq > since`, and a subscription that continues
    /// right after them, so nothing is missed or seen twice. If the journal no longer holds
    /// `since + 1`, the replay starts at the oldest event kept and `missed` says how many are gone.
    pub fn replay(self: &Arc<Self>, since: u64) -> Replay {
        let journal = self.lock();
        let events: Vec<Arc<Event>> = journal
            .ring
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect();
        let first_kept = journal
            .ring
            .front()
            .map(|e| e.seq)
            .unwrap_or(journal.next_seq);
        let missed = first_kept.saturating_sub(since + 1);
        let subscription = Subscription {
            rx: self.tx.subscribe(),
            bus: self.clone(),
        };
        drop(journal);
        Replay {
            events,
            missed,
            subscription,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding this lock cannot leave the journal inconsistent (every update is
        // a single push/pop), so a poisoned lock is still safe to use.
        tunnelkeeper_providers::util::lock(&self.journal)
    }
}

/// What [`Bus::replay`] returns.
pub struct Replay {
    /// Journaled events after `since`, oldest first.
    pub events: Vec<Arc<Event>>,
    /// Events after `since` that the journal no longer holds.
    pub missed: u64,
    /// Continues right after `events`.
    pub subscription: Subscription,
}

/// One item from a [`Subscription`].
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The next event.
    Event(Arc<Event>),
    /// The subscriber fell behind; this many events were skipped.
    Lagged(u64),
}

/// A live feed of events.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    bus: Arc<Bus>,
}

impl Subscription {
    /// The next event, a lag notice, or `None` once the bus is gone.
    pub async fn next(&mut self) -> Option<Delivery> {
        match self.rx.recv().await {
            Ok(event) => Some(Delivery::Event(event)),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.bus.dropped.fetch_add(n, Ordering::Relaxed);
                Some(Delivery::Lagged(n))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// Logs an event: its JSON as the message, and its type, service, tunnel and router as fields,
/// so `--log-format json` and journald can filter on them.
fn log_event(event: &Event) {
    let json = serde_json::to_string(&event.kind).unwrap_or_default();
    let kind = &event.kind;
    let (service, tunnel, router) = (
        kind.service().unwrap_or_default(),
        kind.tunnel().unwrap_or_default(),
        kind.router().unwrap_or_default(),
    );
    match kind {
        EventKind::TunnelDown { .. }
        | EventKind::NoHealthyTunnel { .. }
        | EventKind::ProbeFailed { .. }
        | EventKind::RouterConnectionDropped { .. }
        | EventKind::RouterProvisionFailed { .. }
        | EventKind::RouterDriftDetected { .. }
        | EventKind::ConfigReloadFailed { .. } => tracing::warn!(
            target: "tunnelkeeper::event",
            seq = event.seq, event = kind.type_name(), service, tunnel, router,
            "{json}"
        ),
        _ => tracing::info!(
            target: "tunnelkeeper::event",
            seq = event.seq, event = kind.type_name(), service, tunnel, router,
            "{json}"
        ),
    }
}
