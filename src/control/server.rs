//! The control socket server: accept, authorize, route, answer.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Delivery};
use crate::config::spec::Reader;
use crate::http_reply::{error, json, Body};
use crate::server::{HttpLimits, Quota, QuotaSlot, Server, Shutdown, WhenFull};
use crate::status::DaemonStatus;

/// Connections served at once; more are closed at once (after the credential check).
pub const MAX_CONNECTIONS: usize = 64;
/// Of [`MAX_CONNECTIONS`], how many only root and the daemon's own uid may take: readers can
/// never crowd out `pin`, `reload` or root's `status`.
pub const WRITER_RESERVE: usize = 8;
/// Connections one reader uid may hold at once.
pub const PER_UID: usize = 8;
/// A client must send its request head within this time; heads are at most 16 KiB.
const HTTP: HttpLimits = HttpLimits {
    header_timeout: Duration::from_secs(5),
    max_head: 16 * 1024,
    lifetime: None,
};
/// On shutdown, how long open connections may take to finish the request in flight.
const DRAIN: Duration = Duration::from_secs(2);
/// Request bodies (a pin's JSON) larger than this are refused.
const MAX_BODY: usize = 4 * 1024;
/// A client must send its body within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// A write that the daemon does not answer within this time fails with 503 (a reload waits
/// for changed tunnels to stop, each bounded by its own grace).
const OP_TIMEOUT: Duration = Duration::from_secs(120);

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads and writes.
    Full,
    /// Reads only.
    Read,
    /// Nothing.
    Denied,
}

/// Decides access from a peer's credentials: root and the daemon's own uid get everything,
/// `readers` may read. A `gid:`/`group:` reader matches the peer's primary group or any of its
/// supplementary `groups`.
pub fn access_for(uid: u32, gid: u32, groups: &[u32], own_uid: u32, readers: &[Reader]) -> Access {
    if uid == 0 || uid == own_uid {
        return Access::Full;
    }
    let listed = readers.iter().any(|r| match r {
        Reader::Uid(u) => *u == uid,
        Reader::Gid(g) => *g == gid || groups.contains(g),
    });
    if listed {
        Access::Read
    } else {
        Access::Denied
    }
}

/// The configured readers, replaced by a reload; open connections re-check their access on
/// every request and whenever the list changes (an `events -f` of a removed reader ends).
pub struct Readers {
    list: std::sync::RwLock<Vec<Reader>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Readers {
    /// Starts with `list`.
    pub fn new(list: Vec<Reader>) -> Readers {
        Readers {
            list: std::sync::RwLock::new(list),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The current list.
    pub fn get(&self) -> Vec<Reader> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the list and wakes every open connection to re-check.
    pub fn set(&self, list: Vec<Reader>) {
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = list;
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The credentials the kernel recorded for a connection's peer at `connect(2)`.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Effective (primary) gid.
    pub gid: u32,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

/// How a connection's access is decided: from its peer against the current readers, or fixed
/// (fuzzing and tests drive [`serve_connection`] without a socket).
#[derive(Clone)]
enum Who {
    Fixed(Access),
    Peer(Arc<Peer>, u32),
}

impl Who {
    fn access(&self, state: &ControlState) -> Access {
        match self {
            Who::Fixed(access) => *access,
            Who::Peer(p, own_uid) => {
                access_for(p.uid, p.gid, &p.groups, *own_uid, &state.readers.get())
            }
        }
    }
}

/// The kernel's record of who connected: uid and gid (`SO_PEERCRED`) and supplementary groups
/// (`SO_PEERGROUPS`, taken at connect time, so neither a pid race nor a group database lookup
/// is involved). Without the groups, group readers match the primary gid only.
fn peer_of(stream: &tokio::net::UnixStream) -> Option<Peer> {
    use std::os::fd::AsFd;
    let cred = stream.peer_cred().ok()?;
    let groups = match tunnelkeeper_providers::sys::peer_groups(stream.as_fd()) {
        Ok(groups) => groups,
        Err(e) => {
            tracing::debug!("SO_PEERGROUPS: {e}; matching the primary group only");
            Vec::new()
        }
    };
    Some(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    })
}

/// Connection slots: [`MAX_CONNECTIONS`] in all, the last [`WRITER_RESERVE`] for writers only,
/// and at most [`PER_UID`] per reader uid. Taken only after the credential check, and never
/// waited for: a peer that finds no slot is closed at once instead of queueing.
#[derive(Default)]
struct Slots {
    total: Quota<()>,
    per_uid: Quota<u32>,
}

/// A taken slot, given back when the connection ends.
struct Slot {
    _total: QuotaSlot<()>,
    _mine: QuotaSlot<u32>,
}

impl Slots {
    fn take(&self, uid: u32, access: Access) -> Option<Slot> {
        let (limit, per_uid) = match access {
            Access::Full => (MAX_CONNECTIONS, MAX_CONNECTIONS),
            Access::Read => (MAX_CONNECTIONS - WRITER_RESERVE, PER_UID),
            Access::Denied => return None,
        };
        let total = self.total.take((), limit)?;
        let mine = self.per_uid.take(uid, per_uid)?;
        Some(Slot {
            _total: total,
            _mine: mine,
        })
    }
}

/// What the server needs from the daemon.
pub struct ControlState {
    /// The event bus (for `/v1/events`).
    pub bus: Arc<Bus>,
    /// Produces the current status.
    pub status: Box<dyn Fn() -> DaemonStatus + Send + Sync>,
    /// Produces the Prometheus text exposition for `GET /metrics`.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// Read-only principals (replaced by a reload).
    pub readers: Readers,
    /// Where writes go: the daemon's main loop applies them one at a time.
    pub ops: mpsc::Sender<Op>,
}

/// A write request for the daemon's main loop; the answer comes back on `reply`.
#[derive(Debug)]
pub enum Op {
    /// Pin `service` to `tunnel`, or unpin it (None).
    Pin {
        /// Service name.
        service: String,
        /// Tunnel name, or None to unpin.
        tunnel: Option<String>,
        /// The outcome.
        reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, OpError>>,
    },
    /// Reload the configuration file.
    Reload {
        /// What changed, or why nothing did.
        reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, OpError>>,
    },
    /// Act on one tunnel: restart, drain, undrain or probe it.
    Tunnel {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// What to do.
        action: TunnelAction,
        /// The outcome.
        reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, OpError>>,
    },
    /// Close every pooled SSH session to a target (`user@host:port`).
    SshReset {
        /// The target, as `/v1/status`'s `ssh_pool` names it.
        target: String,
        /// How many sessions were closed.
        reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, OpError>>,
    },
}

/// What an operator does to one tunnel at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelAction {
    /// Stop it and start it again now.
    Restart,
    /// Take it out of service: not elected, no new connections, open ones kept.
    Drain,
    /// Put a drained tunnel back into service.
    Undrain,
    /// Run one probe now and report its timing.
    Probe,
}

/// Why a write was refused, with the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// HTTP status code.
    pub status: u16,
    /// Message for the operator.
    pub message: String,
}

impl OpError {
    /// 404: an unknown service or tunnel.
    pub fn not_found(message: impl Into<String>) -> OpError {
        OpError {
            status: 404,
            message: message.into(),
        }
    }

    /// 422: a request that is well formed but cannot be applied (e.g. an invalid config file).
    pub fn unprocessable(message: impl Into<String>) -> OpError {
        OpError {
            status: 422,
            message: message.into(),
        }
    }

    /// 500: the daemon failed.
    pub fn internal(message: impl Into<String>) -> OpError {
        OpError {
            status: 500,
            message: message.into(),
        }
    }
}

/// Binds the control socket at `path` (mode 0660), replacing a stale socket left by a crashed
/// daemon but refusing to steal a live one or to touch anything that is not a socket
/// ([`crate::socket_file::clear_stale`]).
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    crate::socket_file::prepare_dir(path).context("daemon.control_socket")?;
    crate::socket_file::clear_stale(path)
        .await
        .context("daemon.control_socket (stop the other daemon or set another path)")?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(listener)
}

/// Serves connections until `cancel` fires, on the daemon's bounded [`Server`]. Each peer's
/// credentials are checked right after `accept`, before it takes a slot: a denied peer is closed
/// without a word of HTTP, and one that finds no free slot (64 in all, 8 kept for writers, 8 per
/// reader uid) is closed too, so no local user can fill the socket. On `cancel`, open
/// connections finish the request in flight (an `events -f` stream ends) and close, within 2 s.
pub async fn serve(listener: UnixListener, state: Arc<ControlState>, cancel: CancellationToken) {
    let own_uid = nix::unistd::geteuid().as_raw();
    let slots = Slots::default();
    let server = Server::new("control socket", MAX_CONNECTIONS, WhenFull::Refuse);
    let _accepting = server.serve(listener, move |stream, shutdown: &Shutdown| {
        let peer = peer_of(&stream)?;
        let uid = peer.uid;
        let who = Who::Peer(Arc::new(peer), own_uid);
        let access = who.access(&state);
        if access == Access::Denied {
            tracing::debug!(uid, "control socket: peer is not a reader; closed");
            return None;
        }
        let Some(slot) = slots.take(uid, access) else {
            tracing::debug!(uid, "control socket: no free slot for this peer; closed");
            return None;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        Some(async move {
            serve_as(stream, who, state, shutdown).await;
            drop(slot);
        })
    });
    cancel.cancelled().await;
    server.shutdown(DRAIN).await;
}

/// Serves HTTP/1.1 requests on one connection whose peer has `access`, until it closes. Heads
/// are bounded in size and in the time they may take to arrive. Public so that the request
/// handling can be exercised without a socket (fuzzing, tests).
pub async fn serve_connection<IO>(
    io: IO,
    access: Access,
    state: Arc<ControlState>,
    cancel: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_as(io, Who::Fixed(access), state, Shutdown::at(cancel)).await
}

/// Serves one connection; its access is re-decided for every request, so a reload that removes
/// a reader takes effect on its open connections too.
async fn serve_as<IO>(io: IO, who: Who, state: Arc<ControlState>, shutdown: Shutdown)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // An event stream ends when the server starts draining, so its connection can close.
    let draining = shutdown.drain().clone();
    crate::server::http1(io, HTTP, &shutdown, move |req| {
        let state = state.clone();
        let cancel = draining.clone();
        let who = who.clone();
        async move { route(req, who, &state, cancel).await }
    })
    .await
}

async fn route(
    req: Request<Incoming>,
    who: Who,
    state: &Arc<ControlState>,
    cancel: CancellationToken,
) -> Response<Body> {
    let access = who.access(state);
    if access == Access::Denied {
        return error(StatusCode::FORBIDDEN, "permission denied");
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let write = |access: Access| {
        (access != Access::Full).then(|| {
            error(
                StatusCode::FORBIDDEN,
                "read-only access: changes need root or the daemon's own user",
            )
        })
    };
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["v1", "status"]) => json(StatusCode::OK, &(state.status)()),
        (Method::GET, ["v1", "events"]) => match EventsQuery::parse(&query) {
            Ok(q) => events(state, q, who, cancel),
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (Method::GET, ["metrics"]) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", crate::metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from((state.metrics)())).boxed())
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response")),
        (Method::POST, ["v1", "services", service, "pin"]) => {
            if let Some(denied) = write(access) {
                return denied;
            }
            let service = service.to_string();
            let tunnel = match name_body(req, "tunnel").await {
                Ok(tunnel) => tunnel,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            let op = Op::Pin {
                service,
                tunnel: Some(tunnel),
                reply,
            };
            submit(state, op, answer).await
        }
        (Method::DELETE, ["v1", "services", service, "pin"]) => {
            if let Some(denied) = write(access) {
                return denied;
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            let op = Op::Pin {
                service: service.to_string(),
                tunnel: None,
                reply,
            };
            submit(state, op, answer).await
        }
        (Method::POST, ["v1", "reload"]) => {
            if let Some(denied) = write(access) {
                return denied;
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            submit(state, Op::Reload { reply }, answer).await
        }
        (method, ["v1", "services", service, "tunnels", tunnel, verb]) => {
            let action = match (&method, *verb) {
                (&Method::POST, "restart") => TunnelAction::Restart,
                (&Method::POST, "drain") => TunnelAction::Drain,
                (&Method::DELETE, "drain") => TunnelAction::Undrain,
                (&Method::POST, "probe") => TunnelAction::Probe,
                (_, "restart" | "drain" | "probe") => {
                    return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
                }
                _ => return error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
            };
            if let Some(denied) = write(access) {
                return denied;
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            let op = Op::Tunnel {
                service: service.to_string(),
                tunnel: tunnel.to_string(),
                action,
                reply,
            };
            submit(state, op, answer).await
        }
        (Method::POST, ["v1", "ssh", "reset"]) => {
            if let Some(denied) = write(access) {
                return denied;
            }
            let target = match name_body(req, "target").await {
                Ok(target) => target,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            submit(state, Op::SshReset { target, reply }, answer).await
        }
        (_, ["v1", "status"])
        | (_, ["v1", "events"])
        | (_, ["metrics"])
        | (_, ["v1", "reload"])
        | (_, ["v1", "ssh", "reset"])
        | (_, ["v1", "services", _, "pin"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

/// Reads `{"KEY": "NAME"}` (`tunnel` of a pin, `target` of an SSH reset), bounded in size and
/// time.
async fn name_body(req: Request<Incoming>, key: &str) -> Result<String, String> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => return Err(format!("reading the body: {e} (at most {MAX_BODY} bytes)")),
        Err(_) => return Err("the body did not arrive in time".into()),
    };
    let expected = || format!("expected {{\"{key}\": \"NAME\"}}");
    let body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", expected()))?;
    if let Some(unknown) = body.keys().find(|k| *k != key) {
        return Err(format!("{}: unknown field `{unknown}`", expected()));
    }
    match body.get(key) {
        Some(serde_json::Value::String(name)) if !name.is_empty() => Ok(name.clone()),
        Some(serde_json::Value::String(_)) => Err(format!("{key} must not be empty")),
        _ => Err(format!("{}: missing or not a string", expected())),
    }
}

/// Hands a write to the daemon's main loop and turns its answer into a response.
async fn submit(
    state: &ControlState,
    op: Op,
    answer: tokio::sync::oneshot::Receiver<Result<serde_json::Value, OpError>>,
) -> Response<Body> {
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is not taking changes now",
        )
    };
    if state.ops.try_send(op).is_err() {
        return unavailable();
    }
    match tokio::time::timeout(OP_TIMEOUT, answer).await {
        Ok(Ok(Ok(value))) => json(StatusCode::OK, &value),
        Ok(Ok(Err(e))) => error(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &e.message,
        ),
        _ => unavailable(),
    }
}

/// Query of `GET /v1/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsQuery {
    /// Replay events with a larger seq (default 0: everything kept).
    pub since: u64,
    /// Keep streaming new events.
    pub follow: bool,
}

impl EventsQuery {
    /// Parses `since=N&follow=true`; unknown parameters are errors so typos don't go unnoticed.
    pub fn parse(query: &str) -> Result<EventsQuery, String> {
        let mut q = EventsQuery {
            since: 0,
            follow: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "since" => {
                    q.since = v
                        .parse()
                        .map_err(|_| format!("since must be a sequence number, got {v:?}"))?
                }
                "follow" => {
                    q.follow = match v {
                        "" | "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("follow must be true or false, got {v:?}")),
                    }
                }
                _ => return Err(format!("unknown parameter {k:?}")),
            }
        }
        Ok(q)
    }
}

fn events(
    state: &Arc<ControlState>,
    q: EventsQuery,
    who: Who,
    cancel: CancellationToken,
) -> Response<Body> {
    let replay = state.bus.replay(q.since);
    let mut readers_changed = state.readers.changed.subscribe();
    let state = state.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut subscription = replay.subscription;
    let backlog = replay.events;
    let missed = replay.missed;
    tokio::spawn(async move {
        if missed > 0 && tx.send(lagged_line(missed)).await.is_err() {
            return;
        }
        for event in backlog {
            if tx.send(ndjson(&*event)).await.is_err() {
                return;
            }
        }
        if !q.follow {
            return;
        }
        loop {
            let line = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                // A reload may have removed this reader: a follower that lost access stops.
                _ = readers_changed.changed() => {
                    if who.access(&state) == Access::Denied {
                        tracing::info!("events: the follower is no longer a reader; stream closed");
                        return;
                    }
                    continue;
                }
                d = subscription.next() => match d {
                    Some(Delivery::Event(e)) => ndjson(&*e),
                    Some(Delivery::Lagged(n)) => lagged_line(n),
                    None => return,
                },
            };
            // A client that stops reading fills the channel; it is then dropped rather than
            // holding a subscription (and memory) forever.
            match tokio::time::timeout(Duration::from_secs(30), tx.send(line)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

fn lagged_line(missed: u64) -> Bytes {
    ndjson(&serde_json::json!({ "type": "lagged", "missed": missed }))
}

fn ndjson<T: serde::Serialize + ?Sized>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let readers = [Reader::Uid(1000), Reader::Gid(4)];
        assert_eq!(access_for(0, 0, &[], 500, &readers), Access::Full);
        assert_eq!(access_for(500, 500, &[], 500, &readers), Access::Full);
        assert_eq!(access_for(1000, 1000, &[], 500, &readers), Access::Read);
        assert_eq!(access_for(1001, 4, &[], 500, &readers), Access::Read);
        assert_eq!(access_for(1001, 1001, &[], 500, &readers), Access::Denied);
        // A supplementary group counts like the primary one.
        assert_eq!(
            access_for(1001, 1001, &[27, 4], 500, &readers),
            Access::Read
        );
        assert_eq!(access_for(1001, 1001, &[27], 500, &readers), Access::Denied);
    }

    #[test]
    fn slots_reserve_room_for_writers_and_cap_each_reader() {
        let slots = Slots::default();
        let mut held = Vec::new();
        // One reader uid stops at its own cap.
        while let Some(slot) = slots.take(1000, Access::Read) {
            held.push(slot);
        }
        assert_eq!(held.len(), PER_UID);
        // Many reader uids together stop short of the writers' reserve.
        for uid in 2000.. {
            match slots.take(uid, Access::Read) {
                Some(slot) => held.push(slot),
                None => break,
            }
        }
        assert_eq!(held.len(), MAX_CONNECTIONS - WRITER_RESERVE);
        for _ in 0..WRITER_RESERVE {
            held.push(slots.take(0, Access::Full).expect("writer slot"));
        }
        assert!(slots.take(0, Access::Full).is_none());
        assert!(slots.take(1, Access::Denied).is_none());
        held.clear();
        assert!(slots.take(1000, Access::Read).is_some());
    }

    #[test]
    fn events_query() {
        assert_eq!(
            EventsQuery::parse("").unwrap(),
            EventsQuery {
                since: 0,
                follow: false
            }
        );
        assert_eq!(
            EventsQuery::parse("since=12&follow=true").unwrap(),
            EventsQuery {
                since: 12,
                follow: true
            }
        );
        assert!(EventsQuery::parse("since=x").is_err());
        assert!(EventsQuery::parse("follow=maybe").is_err());
        assert!(EventsQuery::parse("sinse=1").is_err());
    }
}
