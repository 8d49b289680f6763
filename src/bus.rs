//! The event bus: every state change is published here, once, in order.
//!
//! A [`Bus`] numbers events with a monotonic `seq`, keeps the most recent ones in a bounded
//! journal so that `GET /v1/events?since=SEQ` can replay what a client missed, and fans them out
//! over a `tokio::sync::broadcast` channel. Publishing never waits for a subscriber: a slow one
//! lags, is told how many events it missed, and carries on — an election is never blocked by a
//! reader.
//!
//! A bus opened with [`Bus::open`] also persists its journal, one JSON line per event, in a
//! file (`state_dir/events.jsonl` for the daemon): a restarted daemon replays what happened
//! before it and numbers on from the last `seq`. The file is bounded: once it holds twice the
//! journal's capacity it is rewritten (atomically) with just the events the journal keeps.
//! Lines are not fsynced one by one, so a crash may lose the last few events, never the file.
//!
//! Every event is also logged, under the journal lock so that log lines come out in `seq`
//! order: the message is the event in `key=value` form (only the fields it has), and the
//! `event_fields` field carries its JSON, which the JSON log format flattens into the line.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many events the journal keeps for replay by default.
pub const DEFAULT_JOURNAL: usize = 4096;

/// The journal's file in `daemon.state_dir`.
pub const JOURNAL_FILE: &str = "events.jsonl";

/// One published event.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

/// The event types that concern one service (those whose [`EventKind::service`] is set): the
/// only ones a service's hooks may list.
// The first eight entries of `EVENT_TYPES`, which lists service events first.
const SERVICE_EVENT_TYPES: &[&str] = EVENT_TYPES.split_at(8).0;

/// Whether the event type `name` concerns a service (`Some(false)`: a router or daemon event;
/// `None`: no such event type).
pub fn is_service_event(name: &str) -> Option<bool> {
    EVENT_TYPES
        .contains(&name)
        .then(|| SERVICE_EVENT_TYPES.contains(&name))
}

struct Journal {
    next_seq: u64,
    ring: VecDeque<Arc<Event>>,
    capacity: usize,
    file: Option<JournalFile>,
}

/// The journal's file: appended to on every publish, compacted when it grows past twice the
/// journal's capacity.
struct JournalFile {
    path: PathBuf,
    out: std::fs::File,
    /// Lines in the file.
    lines: usize,
    /// Whether the last write failed (so a full disk is logged once, not on every event).
    failing: bool,
}

impl JournalFile {
    /// Opens `path` for appending, creating it (and its directory) if needed.
    fn open(path: &Path, lines: usize) -> anyhow::Result<JournalFile> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let out = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(JournalFile {
            path: path.to_owned(),
            out,
            lines,
            failing: false,
        })
    }

    /// Appends `event`; past twice `ring`'s capacity, rewrites the file with `ring` only.
    fn append(&mut self, event: &Event, ring: &VecDeque<Arc<Event>>, capacity: usize) {
        let written = (|| -> anyhow::Result<()> {
            if self.lines >= capacity.saturating_mul(2) {
                self.compact(ring)?;
                return Ok(());
            }
            let mut line = serde_json::to_vec(event)?;
            line.push(b'\n');
            self.out
                .write_all(&line)
                .with_context(|| format!("writing {}", self.path.display()))?;
            self.lines += 1;
            Ok(())
        })();
        match written {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!("event journal not persisted: {e:#}");
            }
            Err(_) => {}
        }
    }

    /// Replaces the file with the events of `ring` (which already holds the newest one).
    fn compact(&mut self, ring: &VecDeque<Arc<Event>>) -> anyhow::Result<()> {
        let mut text = Vec::new();
        for event in ring {
            text.extend(serde_json::to_vec(&**event)?);
            text.push(b'\n');
        }
        crate::state::write_atomic(&self.path, &text)?;
        *self = JournalFile::open(&self.path, ring.len())?;
        Ok(())
    }
}

/// Reads a journal file: the last `capacity` events, oldest first, and how many lines could not
/// be read (a line torn by a crash, or damage).
fn load_journal(path: &Path, capacity: usize) -> anyhow::Result<(VecDeque<Arc<Event>>, usize)> {
    let mut ring = VecDeque::with_capacity(capacity);
    let mut damaged = 0;
    let Some(text) = crate::state::read_optional(path)? else {
        return Ok((ring, 0));
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Event>(line) {
            // Out-of-order seqs would break replay's `seq > since`: keep increasing ones only.
            Ok(event)
                if ring
                    .back()
                    .is_none_or(|last: &Arc<Event>| last.seq < event.seq) =>
            {
                if ring.len() == capacity {
                    ring.pop_front();
                }
                ring.push_back(Arc::new(event));
            }
            _ => damaged += 1,
        }
    }
    Ok((ring, damaged))
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
                file: None,
            }),
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// A bus like [`Bus::new`] whose journal is persisted in `path`: the events already there
    /// are loaded (the newest `journal` of them) and numbering continues after the last one.
    /// Never fails: when the file cannot be read or written the bus runs with what it could
    /// load (possibly nothing, numbering from 1) and the problem is returned for the caller to
    /// log; damaged lines are skipped and reported the same way.
    pub fn open(journal: usize, path: &Path) -> (Arc<Bus>, Option<anyhow::Error>) {
        let bus = Bus::new(journal);
        let mut problem = None;
        let (ring, damaged) = {
            let capacity = bus.lock().capacity;
            match load_journal(path, capacity) {
                Ok(loaded) => loaded,
                Err(e) => {
                    // Appending to a file we could not read would mix two numberings.
                    return (
                        bus,
                        Some(e.context("event journal not restored nor persisted")),
                    );
                }
            }
        };
        if damaged > 0 {
            problem = Some(anyhow::anyhow!(
                "{}: skipped {damaged} unreadable line(s) of the event journal",
                path.display()
            ));
        }
        let mut guard = bus.lock();
        guard.next_seq = ring.back().map_or(1, |e| e.seq + 1);
        let lines = ring.len() + damaged;
        guard.ring = ring;
        let opened = JournalFile::open(path, lines).and_then(|mut file| {
            if damaged > 0 {
                // Drop the damage now: appending after a torn line would glue two events.
                file.compact(&guard.ring)?;
            }
            Ok(file)
        });
        match opened {
            Ok(file) => guard.file = Some(file),
            Err(e) => problem = Some(e.context("event journal not persisted")),
        }
        drop(guard);
        (bus, problem)
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
        let Journal {
            ring,
            capacity,
            file,
            ..
        } = &mut *journal;
        if let Some(file) = file {
            file.append(&event, ring, *capacity);
        }
        // Logged and sent under the journal lock so that log lines and broadcast order equal
        // seq order.
        log_event(&event);
        let _ = self.tx.send(event.clone());
        drop(journal);
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

/// Logs an event under the target `tunnelkeeper::event`: the message is the event's type
/// and the fields it has as `key=value` (see [`event_line`]); the `event_fields` field holds
/// the event's JSON for the JSON log format to flatten (the text formats leave it out).
fn log_event(event: &Event) {
    let fields = event_fields(event);
    let object: serde_json::Map<String, serde_json::Value> = fields.iter().cloned().collect();
    let json = serde_json::to_string(&object).unwrap_or_default();
    let line = event_line(&fields);
    match &event.kind {
        EventKind::TunnelDown { .. }
        | EventKind::NoHealthyTunnel { .. }
        | EventKind::ProbeFailed { .. }
        | EventKind::RouterConnectionDropped { .. }
        | EventKind::RouterProvisionFailed { .. }
        | EventKind::RouterDriftDetected { .. }
        | EventKind::ConfigReloadFailed { .. } => tracing::warn!(
            target: "tunnelkeeper::event",
            event_fields = %json,
            "{line}"
        ),
        _ => tracing::info!(
            target: "tunnelkeeper::event",
            event_fields = %json,
            "{line}"
        ),
    }
}

/// The fields an event is logged with, in order: `event` (its type), `seq`, then the
/// variant's own fields — `service`, `tunnel` and `router` first, the others by name (the log
/// line has its own timestamp, so `time` is left out).
pub fn event_fields(event: &Event) -> Vec<(String, serde_json::Value)> {
    const FIRST: [&str; 3] = ["service", "tunnel", "router"];
    let mut fields = vec![
        ("event".to_owned(), event.type_name().into()),
        ("seq".to_owned(), event.seq.into()),
    ];
    if let Ok(serde_json::Value::Object(kind)) = serde_json::to_value(&event.kind) {
        let mut rest: Vec<(String, serde_json::Value)> =
            kind.into_iter().filter(|(k, _)| k != "type").collect();
        rest.sort_by_key(|(k, _)| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()));
        fields.extend(rest);
    }
    fields
}

/// `TYPE key=value ...` for the text log formats: only the fields that have a value (a null
/// `from` is left out); strings are quoted when they hold a space, a quote, `=` or a control
/// character, or are empty.
pub fn event_line(fields: &[(String, serde_json::Value)]) -> String {
    use serde_json::Value;
    let mut line = String::new();
    for (key, value) in fields {
        let text = match value {
            Value::Null => continue,
            Value::String(s) if key == "event" => s.clone(),
            Value::String(s)
                if s.is_empty()
                    || s.chars()
                        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=') =>
            {
                format!("{key}={s:?}")
            }
            Value::String(s) => format!("{key}={s}"),
            other => format!("{key}={other}"),
        };
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnected(router: &str) -> EventKind {
        EventKind::RouterReconnected {
            router: router.into(),
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_journal_survives_a_restart_and_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(JOURNAL_FILE);
        let (bus, problem) = Bus::open(64, &path);
        assert!(problem.is_none(), "{problem:?}");
        bus.publish(reconnected("r1"));
        bus.publish(EventKind::PrimaryChanged {
            service: "web".into(),
            from: None,
            to: Some("a".into()),
            reason: "initial".into(),
        });
        bus.publish(EventKind::DaemonStopping {});
        drop(bus);

        let (bus, problem) = Bus::open(64, &path);
        assert!(problem.is_none(), "{problem:?}");
        assert_eq!(bus.last_seq(), 3);
        let replay = bus.replay(1);
        assert_eq!(replay.missed, 0);
        let kinds: Vec<_> = replay.events.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            [
                EventKind::PrimaryChanged {
                    service: "web".into(),
                    from: None,
                    to: Some("a".into()),
                    reason: "initial".into(),
                },
                EventKind::DaemonStopping {},
            ]
        );
        assert_eq!(bus.publish(reconnected("r2")).seq, 4);
        drop(bus);
        let (bus, _) = Bus::open(64, &path);
        assert_eq!(bus.replay(0).events.len(), 4);
        assert_eq!(lines(&path).len(), 4);
    }

    #[test]
    fn the_file_stays_bounded_and_keeps_the_newest_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let (bus, _) = Bus::open(16, &path);
        for _ in 0..100 {
            bus.publish(reconnected("r"));
            assert!(
                lines(&path).len() <= 32,
                "the file grows past twice the journal"
            );
        }
        drop(bus);
        let (bus, _) = Bus::open(16, &path);
        let replay = bus.replay(0);
        let seqs: Vec<u64> = replay.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (85..=100).collect::<Vec<_>>());
        assert_eq!(replay.missed, 84);
        assert_eq!(bus.publish(reconnected("r")).seq, 101);
    }

    #[test]
    fn damaged_lines_are_skipped_reported_and_dropped_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let (bus, _) = Bus::open(16, &path);
        bus.publish(reconnected("a"));
        bus.publish(reconnected("b"));
        drop(bus);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.insert_str(0, "not json\n");
        text.push_str("{\"seq\":3,\"time\":\"x\",\"type\":\"router_rec"); // torn by a crash
        std::fs::write(&path, text).unwrap();

        let (bus, problem) = Bus::open(16, &path);
        let problem = format!("{:#}", problem.expect("damage is reported"));
        assert!(
            problem.contains("skipped 2 unreadable line(s)"),
            "{problem}"
        );
        assert_eq!(bus.last_seq(), 2);
        assert_eq!(lines(&path).len(), 2, "the damage is gone from the file");
        bus.publish(reconnected("c"));
        drop(bus);
        let (bus, problem) = Bus::open(16, &path);
        assert!(problem.is_none(), "{problem:?}");
        assert_eq!(bus.last_seq(), 3);
    }

    #[test]
    fn an_unwritable_journal_does_not_stop_the_bus() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let (bus, problem) = Bus::open(16, &blocker.join(JOURNAL_FILE));
        assert!(problem.is_some());
        assert_eq!(bus.publish(reconnected("r")).seq, 1);
    }

    #[test]
    fn service_events_are_the_first_eight_types() {
        assert_eq!(SERVICE_EVENT_TYPES.last(), Some(&"no_healthy_tunnel"));
        assert_eq!(is_service_event("tunnel_starting"), Some(true));
        assert_eq!(is_service_event("router_connection_dropped"), Some(false));
        assert_eq!(is_service_event("daemon_stopping"), Some(false));
        assert_eq!(is_service_event("nope"), None);
    }

    #[test]
    fn text_lines_name_only_the_fields_an_event_has() {
        let bus = Bus::new(16);
        let event = bus.publish(EventKind::PrimaryChanged {
            service: "web".into(),
            from: None,
            to: Some("a b".into()),
            reason: "initial".into(),
        });
        assert_eq!(
            event_line(&event_fields(&event)),
            "primary_changed seq=1 service=web reason=initial to=\"a b\""
        );
        let event = bus.publish(reconnected("r1"));
        assert_eq!(
            event_line(&event_fields(&event)),
            "router_reconnected seq=2 router=r1"
        );
    }
}
