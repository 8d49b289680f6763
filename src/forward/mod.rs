//! The failover listener: a stable local address that always leads to a working path.
//!
//! A service with `listen:` accepts connections (TCP on IPv4/IPv6, or a Unix socket). Each
//! connection dials the tunnels in the service's dial order — the primary first — through their
//! own [`Tunnel::dial`](tunnelkeeper_providers::Tunnel::dial), each within `connect_timeout`;
//! a failed dial moves on to the next tunnel within the same client connection (up to
//! `retries` more) and counts as a failed probe of that tunnel. Until the first reply byte, what
//! the client sent is kept (up to [`REPLAY_LIMIT`]): if the tunnel fails before answering, the
//! next one gets the same bytes, so a primary killed mid-request is invisible to the client.
//! After that, bytes flow with `splice(2)` when both sides are TCP sockets and with a plain
//! buffered copy otherwise (SSH channels), half-closes passed through in each direction.
//!
//! `idle_timeout` runs from accept to close, so a client that connects and never speaks (or a
//! tunnel that never answers) gives its slot back too.
//! The accept loop is the daemon's bounded [`Server`]: `max_connections` is enforced by not
//! accepting (the kernel backlog holds the rest), `EMFILE`/`ENFILE` make it back off instead of
//! spinning. `on_failover: close` closes connections left on a tunnel that is no longer
//! primary. On shutdown the listener stops accepting and drains open connections for up to the
//! shutdown grace.
//!
//! A reload never cuts a connection: [`Listener::update`] applies new settings to the
//! connections accepted from then on, and [`Listener::rebind`] (only when the address moved)
//! starts accepting on the new socket before it closes the old one, while the connections
//! already accepted go on untouched. The counters belong to the listener, not to its socket, so
//! they survive both.
//!
//! Bytes are counted per direction for the listener and, once a dial succeeded, for the tunnel
//! that carries the connection too (its counters are looked up once per dial; each chunk is two
//! atomic adds), as they move: a long-lived connection shows while it is open.

mod splice;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::Dial;

use crate::config::model::OnFailover;
use crate::config::spec::{ListenAddress, ListenSpec, ServiceSpec};
use crate::routes::{Primary, Route, Routes};
use crate::server::{Accept, Accepting, Server, Shutdown, WhenFull};

/// Client bytes kept for a replay while no reply has arrived. Requests bigger than this are not
/// replayed: they go through unbuffered once the limit is reached.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Buffer of the non-splice copy path, per direction.
const COPY_BUFFER: usize = 64 * 1024;
/// Largest read while waiting for the first reply, per direction.
const FIRST_READ: usize = 16 * 1024;

/// A bound listening socket, ready to serve. A Unix socket's file is removed when it is
/// dropped (the listener stopped, or moved to another address).
pub enum Acceptor {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket.
    Unix(UnixListener, PathBuf),
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Acceptor::Unix(_, path) = self {
            crate::socket_file::remove(path);
        }
    }
}

impl Acceptor {
    /// Binds `address`. A stale Unix socket is replaced; a live one, or a path that is not a
    /// socket, is an error ([`crate::socket_file::clear_stale`]).
    pub async fn bind(address: &ListenAddress) -> anyhow::Result<Acceptor> {
        match address {
            ListenAddress::Tcp(addr) => {
                Ok(Acceptor::Tcp(bind_tcp(*addr).with_context(|| {
                    format!("binding the failover listener on {addr}")
                })?))
            }
            ListenAddress::Unix(path) => {
                crate::socket_file::clear_stale(path).await?;
                let listener = UnixListener::bind(path).with_context(|| {
                    format!("binding the failover listener on {}", path.display())
                })?;
                Ok(Acceptor::Unix(listener, path.clone()))
            }
        }
    }

    /// The bound address, for status and logs (a TCP port 0 resolved to the real one).
    pub fn local_address(&self) -> String {
        match self {
            Acceptor::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Acceptor::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

impl Accept for Acceptor {
    type Conn = Dial;

    async fn accept(&self) -> io::Result<Dial> {
        match self {
            Acceptor::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Dial::Tcp(stream))
            }
            Acceptor::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                Ok(Dial::Stream(Box::new(stream)))
            }
        }
    }
}

/// Pending connections the kernel queues for us. tokio's default (128) overflows under a burst
/// of clients, and each dropped SYN costs the client a one-second retransmit; the kernel caps
/// this at `net.core.somaxconn` anyway.
const BACKLOG: u32 = 4096;

fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted daemon must be able to rebind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Live counters of one listener.
#[derive(Debug, Default)]
pub struct Counters {
    active: AtomicU64,
    total: AtomicU64,
    replayed: AtomicU64,
    unserved: AtomicU64,
    to_service: AtomicU64,
    to_client: AtomicU64,
    /// Per tunnel name (names follow reloads, so not an index).
    failed_dials: Mutex<BTreeMap<String, u64>>,
    /// Bytes per tunnel name, looked up once per dial (never per chunk).
    per_tunnel: Mutex<BTreeMap<String, Arc<TunnelTraffic>>>,
}

impl Counters {
    /// The byte counters of `tunnel`, made on its first connection.
    fn tunnel(&self, tunnel: &str) -> Arc<TunnelTraffic> {
        let mut map = self.per_tunnel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(traffic) = map.get(tunnel) {
            return traffic.clone();
        }
        let traffic = Arc::new(TunnelTraffic::default());
        map.insert(tunnel.to_owned(), traffic.clone());
        traffic
    }
}

/// The bytes one tunnel carried for a listener, per direction.
#[derive(Debug, Default)]
struct TunnelTraffic {
    to_service: AtomicU64,
    to_client: AtomicU64,
}

/// Where the bytes of one connection go once a tunnel's dial succeeded: the listener's totals
/// and that tunnel's counters, both added to as the bytes move (an open connection shows).
struct Traffic<'a> {
    counters: &'a Counters,
    tunnel: Arc<TunnelTraffic>,
}

impl<'a> Traffic<'a> {
    /// Looks up `tunnel`'s counters, once per connection attempt.
    fn new(counters: &'a Counters, tunnel: &str) -> Traffic<'a> {
        Traffic {
            counters,
            tunnel: counters.tunnel(tunnel),
        }
    }

    /// Client → service.
    fn to_service(&self) -> Tally<'_> {
        Tally {
            listener: &self.counters.to_service,
            tunnel: &self.tunnel.to_service,
        }
    }

    /// Service → client.
    fn to_client(&self) -> Tally<'_> {
        Tally {
            listener: &self.counters.to_client,
            tunnel: &self.tunnel.to_client,
        }
    }

    /// A replayed request: sent through this tunnel too, but counted in the listener's total
    /// when the client first sent it.
    fn replayed(&self, n: usize) {
        self.tunnel
            .to_service
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One direction of one connection: each chunk moved is added to the listener's total and to
/// the tunnel's, two relaxed atomic adds and nothing else.
#[derive(Clone, Copy)]
struct Tally<'a> {
    listener: &'a AtomicU64,
    tunnel: &'a AtomicU64,
}

impl Tally<'_> {
    fn add(&self, n: usize) {
        self.listener.fetch_add(n as u64, Ordering::Relaxed);
        self.tunnel.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The bytes one tunnel carried for a listener, in `/v1/status`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunnelBytes {
    /// Bytes from clients to the service through this tunnel.
    pub to_service: u64,
    /// Bytes from the service to clients through this tunnel.
    pub to_client: u64,
}

/// The listener figures in `/v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ListenerStatus {
    /// Where it accepts.
    pub address: String,
    /// Connections open now.
    pub active: u64,
    /// Connections accepted since start.
    pub total: u64,
    /// Connections that no tunnel could take.
    pub unserved: u64,
    /// Connections moved to another tunnel after a failure before the first reply.
    pub replayed: u64,
    /// Bytes from clients to the service.
    pub bytes_to_service: u64,
    /// Bytes from the service to clients.
    pub bytes_to_client: u64,
    /// Failed dials (and failures before the first reply) per tunnel.
    pub failed_dials: BTreeMap<String, u64>,
    /// Bytes per tunnel: every configured tunnel (0 until it carries a connection) and any
    /// tunnel that carried bytes since the listener started (a reload may have removed it).
    /// Each client byte counts once in `bytes_to_service` but against every tunnel it was sent
    /// through: a request replayed after a failure counts against both tunnels.
    #[serde(default)]
    pub bytes_per_tunnel: BTreeMap<String, TunnelBytes>,
}

/// A cheap handle on a listener's figures, for the status document.
#[derive(Clone)]
pub struct ListenerStats {
    address: String,
    counters: Arc<Counters>,
    routes: Routes,
}

/// A running listener.
pub struct Listener {
    stats: ListenerStats,
    /// Slots, accept loops and open connections, across rebinds.
    server: Server,
    /// The accept loop of the current socket.
    accepting: Accepting,
    /// The settings new connections get; replaced by [`Listener::update`].
    current: Current,
}

/// What each new connection is served with: the listener's settings of the moment.
type Current = Arc<std::sync::RwLock<Arc<Shared>>>;

/// Everything a connection needs, shared by all of them.
struct Shared {
    service: String,
    spec: ListenSpec,
    connect_timeout: Duration,
    on_failover: OnFailover,
    routes: Routes,
    counters: Arc<Counters>,
    /// Open connections: id → (tunnel name, its cancel token), for `on_failover: close`.
    open: Arc<Mutex<HashMap<u64, (String, CancellationToken)>>>,
    next_id: Arc<AtomicU64>,
    epoch: Instant,
}

impl Shared {
    /// The same listener (counters, open connections) with a reloaded service's settings.
    fn with_settings(&self, service: &ServiceSpec, listen: &ListenSpec) -> Shared {
        Shared {
            service: service.name.clone(),
            spec: listen.clone(),
            connect_timeout: service.connect_timeout,
            on_failover: service.on_failover,
            routes: self.routes.clone(),
            counters: self.counters.clone(),
            open: self.open.clone(),
            next_id: self.next_id.clone(),
            epoch: self.epoch,
        }
    }
}

impl Listener {
    /// Starts serving `acceptor` for `service`.
    pub fn start(
        acceptor: Acceptor,
        service: &ServiceSpec,
        listen: &ListenSpec,
        routes: Routes,
    ) -> Listener {
        let counters = Arc::new(Counters::default());
        let address = acceptor.local_address();
        let stats_routes = routes.clone();
        let shared = Arc::new(Shared {
            service: service.name.clone(),
            spec: listen.clone(),
            connect_timeout: service.connect_timeout,
            on_failover: service.on_failover,
            routes,
            counters: counters.clone(),
            open: Arc::default(),
            next_id: Arc::default(),
            epoch: Instant::now(),
        });
        let current: Current = Arc::new(std::sync::RwLock::new(shared));
        let server = Server::new(
            format!("service {} listener", service.name),
            listen.max_connections as usize,
            WhenFull::Wait,
        );
        let accepting = accept(&server, acceptor, current.clone());
        tokio::spawn(close_on_failover(
            current.clone(),
            server.shutdown_signal().close().clone(),
        ));
        tracing::info!(service = %service.name, %address, "failover listener ready");
        Listener {
            stats: ListenerStats {
                address,
                counters,
                routes: stats_routes,
            },
            server,
            accepting,
            current,
        }
    }

    /// Applies a reloaded service's settings to the connections accepted from now on; open
    /// connections keep theirs. The socket and the counters stay.
    pub fn update(&self, service: &ServiceSpec, listen: &ListenSpec) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        self.server.resize(listen.max_connections as usize);
        *current = Arc::new(current.with_settings(service, listen));
    }

    /// Moves the listener to a new, already bound socket: the new one accepts before the old
    /// one closes, and connections accepted on the old one go on untouched.
    pub async fn rebind(&mut self, acceptor: Acceptor) {
        let address = acceptor.local_address();
        let accepting = accept(&self.server, acceptor, self.current.clone());
        std::mem::replace(&mut self.accepting, accepting)
            .stop()
            .await;
        tracing::info!(from = %self.stats.address, to = %address, "failover listener moved");
        self.stats.address = address;
    }

    /// A handle on the listener's figures.
    pub fn stats(&self) -> ListenerStats {
        self.stats.clone()
    }

    /// Stops accepting and returns once the address is free (a reload may bind it again);
    /// open connections go on untouched until they end or [`Listener::stop`].
    pub async fn retire(&mut self) {
        self.accepting.stop().await;
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then closes the rest.
    /// Returns as soon as none is open.
    pub async fn stop(self, grace: Duration) {
        self.server.shutdown(grace).await;
    }
}

impl ListenerStats {
    /// The figures for `/v1/status`.
    pub fn status(&self) -> ListenerStatus {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ListenerStatus {
            address: self.address.clone(),
            active: load(&c.active),
            total: load(&c.total),
            unserved: load(&c.unserved),
            replayed: load(&c.replayed),
            bytes_to_service: load(&c.to_service),
            bytes_to_client: load(&c.to_client),
            failed_dials: {
                let failed = c.failed_dials.lock().unwrap_or_else(|p| p.into_inner());
                self.routes
                    .names()
                    .into_iter()
                    .map(|n| {
                        let count = failed.get(&n).copied().unwrap_or(0);
                        (n, count)
                    })
                    .collect()
            },
            bytes_per_tunnel: {
                let per_tunnel = c.per_tunnel.lock().unwrap_or_else(|p| p.into_inner());
                let mut bytes: BTreeMap<String, TunnelBytes> = self
                    .routes
                    .names()
                    .into_iter()
                    .map(|n| (n, TunnelBytes::default()))
                    .collect();
                for (name, traffic) in per_tunnel.iter() {
                    bytes.insert(
                        name.clone(),
                        TunnelBytes {
                            to_service: load(&traffic.to_service),
                            to_client: load(&traffic.to_client),
                        },
                    );
                }
                bytes
            },
        }
    }
}

/// Serves `acceptor` on `server`: each connection gets the settings of the moment and a token
/// of its own (`on_failover: close` cancels it, and so does the end of the drain grace).
fn accept(server: &Server, acceptor: Acceptor, current: Current) -> Accepting {
    server.serve(acceptor, move |client, shutdown: &Shutdown| {
        let shared = current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let token = shutdown.close().child_token();
        Some(async move { serve(client, &shared, token).await })
    })
}

/// `on_failover: close`: when the primary changes, connections on other tunnels are closed so
/// their clients reconnect through the new primary.
async fn close_on_failover(current: Current, stop: CancellationToken) {
    let shared = current.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut primary = shared.routes.primary.clone();
    let mut current_primary = primary.borrow().tunnel.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = primary.changed() => if changed.is_err() { return },
        }
        let now = primary.borrow_and_update().tunnel.clone();
        if now == current_primary {
            continue;
        }
        current_primary = now;
        // The setting of the moment: a reload may switch it either way.
        let shared = current.read().unwrap_or_else(|p| p.into_inner()).clone();
        if shared.on_failover != OnFailover::Close {
            continue;
        }
        let Some(keep) = current_primary.as_deref() else {
            continue;
        };
        let open = shared.open.lock().unwrap_or_else(|p| p.into_inner());
        for (tunnel, token) in open.values() {
            if tunnel != keep {
                token.cancel();
            }
        }
    }
}

/// Removes a connection from the registry and the active count when it ends, however it ends.
struct Guard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.shared.counters.active.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// How the wait for the first reply ended.
enum FirstReply {
    /// The tunnel answered (and the answer was passed on): stream from here.
    Answered,
    /// No answer yet, but the request can no longer be replayed: stream from here.
    Unbuffered,
    /// The tunnel failed before answering.
    Failed(String),
    /// Both sides finished without a reply (a one-way exchange), or the client went away.
    Done,
}

/// When a connection last moved a byte either way, in ms since [`Shared::epoch`]: the idle
/// clock that runs from accept to close.
struct Activity<'a> {
    shared: &'a Shared,
    last: AtomicU64,
}

impl Activity<'_> {
    fn touch(&self) {
        let ms = self.shared.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle_timeout` (never without one).
    async fn idle(&self) {
        let Some(limit) = self.shared.spec.idle_timeout else {
            return std::future::pending::<()>().await;
        };
        loop {
            let now = self.shared.epoch.elapsed().as_millis() as u64;
            let since =
                Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)));
            if since >= limit {
                return;
            }
            tokio::time::sleep(limit - since).await;
        }
    }
}

/// Serves one accepted connection. `idle_timeout` applies from accept on: a client that
/// connects and says nothing (or a tunnel that never answers) cannot hold a slot for longer.
async fn serve(client: Dial, shared: &Shared, token: CancellationToken) {
    let counters = &shared.counters;
    counters.active.fetch_add(1, Ordering::Relaxed);
    counters.total.fetch_add(1, Ordering::Relaxed);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let _guard = Guard { shared, id };
    let activity = Activity {
        shared,
        last: AtomicU64::new(0),
    };
    activity.touch();
    tokio::select! {
        _ = relay_connection(client, shared, id, &token, &activity) => {}
        _ = activity.idle() => tracing::debug!(service = %shared.service, "closing an idle connection"),
    }
}

/// Dials through the tunnels in order (replaying what the client sent when one fails before
/// answering), then streams both ways.
async fn relay_connection(
    mut client: Dial,
    shared: &Shared,
    id: u64,
    token: &CancellationToken,
    activity: &Activity<'_>,
) {
    let counters = &shared.counters;

    let (order, mut first) = dial_order_when_ready(shared).await;
    // Without `retries`, every tunnel in the dial order may be tried.
    let tries = shared.spec.retries.map_or(usize::MAX, |r| r as usize + 1);
    let attempts = order.iter().enumerate().take(tries);
    let mut sent: Vec<u8> = Vec::new();
    let mut replayable = shared.spec.replay_unanswered;
    let mut client_done = false;
    let mut tried = 0usize;
    for (index, name) in attempts {
        // The first running tunnel was looked up while waiting for one: not again.
        let found = match first.take() {
            Some((at, found)) if at == index => Some(found),
            Some(other) => {
                first = Some(other);
                None
            }
            None => shared.routes.get(name),
        };
        let Some((route, tunnel)) = found else {
            continue;
        };
        tried += 1;
        let mut upstream = match tunnel.dial(shared.connect_timeout).await {
            Ok(stream) => stream,
            Err(e) => {
                fail(shared, &route, format!("dial: {e}"));
                continue;
            }
        };
        if tried > 1 {
            counters.replayed.fetch_add(1, Ordering::Relaxed);
        }
        let traffic = Traffic::new(counters, &route.name);
        shared
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (route.name.clone(), token.clone()));
        if let Err(e) = resend(&mut upstream, &sent, client_done).await {
            fail(shared, &route, format!("replay: {e}"));
            continue;
        }
        traffic.replayed(sent.len());
        let first = tokio::select! {
            _ = token.cancelled() => return,
            r = first_reply(&mut client, &mut upstream, &mut sent, &mut replayable, &mut client_done, &traffic, activity) => r,
            // A blackholed tunnel accepts and then says nothing; once the service declares it
            // down, a connection still waiting for its first reply moves on (the request is
            // replayed), instead of hanging until the client gives up.
            _ = went_down(shared.routes.primary.clone(), name) => {
                FirstReply::Failed("tunnel went down while waiting for a reply".into())
            }
        };
        match first {
            FirstReply::Answered | FirstReply::Unbuffered => {
                stream(client, upstream, client_done, &traffic, token, activity).await;
                return;
            }
            FirstReply::Done => return,
            FirstReply::Failed(reason) if replayable => {
                fail(shared, &route, reason);
                continue;
            }
            FirstReply::Failed(reason) => {
                fail(shared, &route, reason);
                return;
            }
        }
    }
    counters.unserved.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        service = %shared.service,
        tried,
        "no tunnel could take a connection; closing it"
    );
}

/// A running tunnel of the dial order: its place in the order, its route and instance.
type Found = (usize, (Route, Arc<dyn tunnelkeeper_providers::Tunnel>));

/// The dial order and its first running tunnel, waiting up to `connect_timeout` when none is
/// running yet (a client that connects while the daemon is still starting its tunnels should
/// wait for one, not be turned away).
async fn dial_order_when_ready(shared: &Shared) -> (Vec<String>, Option<Found>) {
    let mut primary = shared.routes.primary.clone();
    let mut deadline = None;
    loop {
        let order = primary.borrow_and_update().order.clone();
        let found = order
            .iter()
            .enumerate()
            .find_map(|(i, name)| Some((i, shared.routes.get(name)?)));
        if found.is_some() {
            return (order, found);
        }
        let deadline =
            *deadline.get_or_insert_with(|| tokio::time::Instant::now() + shared.connect_timeout);
        match tokio::time::timeout_at(deadline, primary.changed()).await {
            Ok(Ok(())) => continue,
            _ => return (order, None),
        }
    }
}

/// Resolves once `tunnel` has left the service's dial order (it is down).
async fn went_down(mut primary: tokio::sync::watch::Receiver<Primary>, tunnel: &str) {
    loop {
        if primary.changed().await.is_err() {
            return std::future::pending().await;
        }
        if !primary
            .borrow_and_update()
            .order
            .iter()
            .any(|t| t == tunnel)
        {
            return;
        }
    }
}

/// A failure real traffic met: counted, logged, and fed to the tunnel's probe counter.
fn fail(shared: &Shared, route: &Route, reason: String) {
    *shared
        .counters
        .failed_dials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(route.name.clone())
        .or_default() += 1;
    tracing::debug!(service = %shared.service, tunnel = %route.name, "connection through tunnel failed: {reason}");
    route.report_failure(reason);
}

/// Sends a new upstream what the client already sent (and its half-close, if any).
async fn resend(upstream: &mut Dial, sent: &[u8], client_done: bool) -> io::Result<()> {
    if !sent.is_empty() {
        upstream.write_all(sent).await?;
    }
    if client_done {
        upstream.shutdown().await?;
    }
    Ok(())
}

/// Relays client bytes (keeping a copy) until the upstream's first reply byte arrives.
async fn first_reply(
    client: &mut Dial,
    upstream: &mut Dial,
    sent: &mut Vec<u8>,
    replayable: &mut bool,
    client_done: &mut bool,
    traffic: &Traffic<'_>,
    activity: &Activity<'_>,
) -> FirstReply {
    // Client bytes are read straight into the replay copy, and neither buffer is zeroed: most
    // connections only ever see one request and one answer here.
    let mut from_upstream = Vec::with_capacity(FIRST_READ);
    loop {
        if !*replayable {
            return FirstReply::Unbuffered;
        }
        if sent.capacity() - sent.len() < FIRST_READ / 4 {
            sent.reserve(FIRST_READ);
        }
        let before = sent.len();
        tokio::select! {
            r = client.read_buf(sent), if !*client_done => match r {
                Ok(0) => {
                    *client_done = true;
                    if let Err(e) = upstream.shutdown().await {
                        return FirstReply::Failed(format!("half-close: {e}"));
                    }
                }
                Ok(n) => {
                    activity.touch();
                    if let Err(e) = upstream.write_all(&sent[before..]).await {
                        return FirstReply::Failed(format!("write: {e}"));
                    }
                    traffic.to_service().add(n);
                    if sent.len() > REPLAY_LIMIT {
                        // Too big to keep: what was sent cannot be replayed.
                        *replayable = false;
                        *sent = Vec::new();
                    }
                }
                Err(_) => return FirstReply::Done,
            },
            r = upstream.read_buf(&mut from_upstream) => match r {
                Ok(0) if *client_done => {
                    // A one-way exchange that ended normally: nothing to replay.
                    let _ = client.shutdown().await;
                    return FirstReply::Done;
                }
                Ok(0) => return FirstReply::Failed("closed before replying".into()),
                Ok(n) => {
                    activity.touch();
                    if client.write_all(&from_upstream).await.is_err() {
                        return FirstReply::Done;
                    }
                    traffic.to_client().add(n);
                    return FirstReply::Answered;
                }
                Err(e) => return FirstReply::Failed(format!("read: {e}")),
            },
        }
    }
}

/// Streams both ways until both directions are done or the connection is cancelled
/// (`on_failover: close`, shutdown); every byte resets the idle clock [`serve`] watches.
async fn stream(
    client: Dial,
    upstream: Dial,
    client_done: bool,
    traffic: &Traffic<'_>,
    token: &CancellationToken,
    activity: &Activity<'_>,
) {
    let touch = || activity.touch();
    touch();
    let copy = async {
        match (client, upstream) {
            (Dial::Tcp(c), Dial::Tcp(u)) => {
                let up = async {
                    if !client_done {
                        splice::one_way(&c, &u, traffic.to_service(), &touch).await?;
                    }
                    Ok::<(), io::Error>(())
                };
                let down = splice::one_way(&u, &c, traffic.to_client(), &touch);
                let _ = tokio::try_join!(up, down);
            }
            (c, u) => {
                let (mut cr, mut cw) = tokio::io::split(c);
                let (mut ur, mut uw) = tokio::io::split(u);
                let up = async {
                    if !client_done {
                        copy_one_way(&mut cr, &mut uw, traffic.to_service(), &touch).await?;
                    }
                    Ok::<(), io::Error>(())
                };
                let down = copy_one_way(&mut ur, &mut cw, traffic.to_client(), &touch);
                let _ = tokio::try_join!(up, down);
            }
        }
    };
    tokio::select! {
        _ = copy => {}
        _ = token.cancelled() => {}
    }
}

/// The buffered copy for streams that are not two TCP sockets: read, write, count, repeat; on
/// end of stream, half-close the writer.
async fn copy_one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: Tally<'_>,
    touch: &(dyn Fn() + Sync),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        counter.add(n);
        touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::LiveTunnel;

    /// Polls `done` until it holds, for up to 10 s (a loaded machine may be slow to schedule).
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn load(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// A connected loopback pair: (the end the test drives, the end the listener would hold).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    #[tokio::test]
    async fn the_copy_path_counts_for_the_listener_and_the_tunnel_while_open() {
        let counters = Counters::default();
        let traffic = Traffic::new(&counters, "a");
        let (mut client, listener_side) = tokio::io::duplex(4096);
        let (mut reader, _) = tokio::io::split(listener_side);
        let mut sink = tokio::io::sink();
        let copy = copy_one_way(&mut reader, &mut sink, traffic.to_client(), &|| {});
        let drive = async {
            client.write_all(&[7u8; 3000]).await.unwrap();
            eventually("3000 bytes counted while open", || {
                load(&traffic.tunnel.to_client) == 3000
            })
            .await;
            assert_eq!(load(&counters.to_client), 3000);
            client.write_all(&[7u8; 1234]).await.unwrap();
            drop(client);
        };
        let (copied, ()) = tokio::join!(copy, drive);
        copied.unwrap();
        assert_eq!(load(&counters.to_client), 4234);
        assert_eq!(load(&counters.tunnel("a").to_client), 4234);
        assert_eq!(load(&counters.to_service), 0);
        assert_eq!(load(&counters.tunnel("a").to_service), 0);
    }

    #[tokio::test]
    async fn the_splice_path_counts_for_the_listener_and_the_tunnel_while_open() {
        let counters = Counters::default();
        let traffic = Traffic::new(&counters, "b");
        let (mut client, from) = tcp_pair().await;
        let (mut service, to) = tcp_pair().await;
        let copy = splice::one_way(&from, &to, traffic.to_service(), &|| {});
        let drive = async {
            let chunk = vec![1u8; 100_000];
            client.write_all(&chunk).await.unwrap();
            let mut got = vec![0u8; chunk.len()];
            service.read_exact(&mut got).await.unwrap();
            eventually("100000 bytes counted while open", || {
                load(&traffic.tunnel.to_service) == 100_000
            })
            .await;
            assert_eq!(load(&counters.to_service), 100_000);
            client.write_all(&chunk[..777]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            service.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest.len(), 777);
        };
        let (copied, ()) = tokio::join!(copy, drive);
        copied.unwrap();
        assert_eq!(load(&counters.to_service), 100_777);
        assert_eq!(load(&counters.tunnel("b").to_service), 100_777);
        assert_eq!(load(&counters.tunnel("b").to_client), 0);
    }

    #[test]
    fn status_lists_bytes_per_tunnel_and_a_replay_counts_against_each_tunnel() {
        let (_primary, watch) = tokio::sync::watch::channel(Primary::default());
        let (passive, _reports) = tokio::sync::mpsc::unbounded_channel();
        let route = |name: &str| Route::new(name.into(), LiveTunnel::default(), passive.clone());
        let routes = Routes::new(vec![route("a"), route("b"), route("c")], watch);
        let stats = ListenerStats {
            address: "127.0.0.1:1".into(),
            counters: Arc::default(),
            routes,
        };
        // A 10-byte request through `a`, which fails before answering; replayed through `b`,
        // which answers 25 bytes; then `gone` (no longer configured) carried 5 + 6.
        let a = Traffic::new(&stats.counters, "a");
        a.to_service().add(10);
        let b = Traffic::new(&stats.counters, "b");
        b.replayed(10);
        b.to_client().add(25);
        let gone = Traffic::new(&stats.counters, "gone");
        gone.to_service().add(5);
        gone.to_client().add(6);

        let status = stats.status();
        let bytes = |to_service, to_client| TunnelBytes {
            to_service,
            to_client,
        };
        assert_eq!(
            status.bytes_per_tunnel,
            BTreeMap::from([
                ("a".to_owned(), bytes(10, 0)),
                ("b".to_owned(), bytes(10, 25)),
                ("c".to_owned(), bytes(0, 0)),
                ("gone".to_owned(), bytes(5, 6)),
            ])
        );
        assert_eq!((status.bytes_to_service, status.bytes_to_client), (15, 31));

        // A status document from before per-tunnel bytes still parses.
        let mut old = serde_json::to_value(&status).unwrap();
        old.as_object_mut().unwrap().remove("bytes_per_tunnel");
        let parsed: ListenerStatus = serde_json::from_value(old).unwrap();
        assert!(parsed.bytes_per_tunnel.is_empty());
    }
}
