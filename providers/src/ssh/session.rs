//! One SSH connection: connecting (TCP, key exchange, host key check, login) within the
//! configured time limits, and the bookkeeping the pool needs (channels in use, tunnels
//! attached, why it closed). The russh handler it runs with is in `handler`.
//!
//! The moment the connection ends — the server went away, keepalives went unanswered, or the
//! pool closed it — [`Shared::closed`] is cancelled. Everything attached to a session (tunnels,
//! bridges, the pool's monitor) selects on that token, which is what makes a disconnect a hard
//! signal for every tunnel on it at once.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::Algorithm;
use russh::{Channel, ChannelId, Disconnect, Preferred};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth;
use super::config::{PoolKey, Resolved};
use super::handler::{describe_error, inactivity_timeout, ClientHandler, HandlerError};
use super::hostkeys::{self, HostKeyCheck};
use super::net;
use crate::util::lock;
use crate::{ProviderError, Resolver};

/// How long a polite close (SSH `DISCONNECT`) may take before the socket is shut down under it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A connection handed a server-initiated `forwarded-tcpip` channel to this callback.
pub(crate) struct Incoming {
    /// The channel (usable once `reply` accepted it).
    pub channel: Channel<Msg>,
    /// Accept or reject; dropping it rejects.
    pub reply: client::ChannelOpenHandle,
    /// Who connected to the server's port, for logs.
    pub originator: String,
}

/// Receives the connections of one remote forward. Called on the session's own task: it must
/// hand the work off (spawn) and return at once.
pub(crate) type IncomingSink = Arc<dyn Fn(Incoming) + Send + Sync>;

/// One remote forward listening on the server, as registered on its session.
struct Route {
    id: u64,
    address: String,
    /// The port the server listens on; 0 while the `tcpip-forward` reply is outstanding.
    port: u32,
    sink: IncomingSink,
}

/// Channels and tunnels currently using a session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    /// Open channels (dials, execs, forwarded connections).
    pub channels: u32,
    /// Tunnels holding the session (a remote forward lives on it; a local tunnel watches it).
    pub leases: u32,
    /// Since when nothing has used the session.
    pub idle_since: Instant,
    /// The server refused a channel for lack of room (OpenSSH `MaxSessions`): take no more
    /// channels until one of ours closes.
    pub saturated: bool,
    /// Taken out of service (idle or too old): no new channels or leases.
    pub retired: bool,
}

/// State shared between a session, its handler (which runs on russh's task), and the guards
/// handed out for its channels. It holds no russh handle, so guards do not keep a dead
/// connection alive.
pub(crate) struct Shared {
    /// Pool-unique number, for logs.
    pub id: u64,
    /// Who the session is logged in as, where.
    pub key: PoolKey,
    /// When the session was established.
    pub created: Instant,
    /// Channels the session carries before the pool opens another.
    pub max_channels: u32,
    usage: Mutex<Usage>,
    /// Signalled whenever [`Usage`] changes, for the pool's idle monitor.
    pub usage_changed: Notify,
    /// The target's "room may have appeared" signal (shared by its sessions), woken on every
    /// usage change, for dials queued at `max_sessions`.
    pub room: Arc<Notify>,
    routes: Mutex<Vec<Route>>,
    /// One token per open channel, cancelled when the server closes the channel (or the
    /// connection ends: they are children of `closed`). russh gives a writer no signal when
    /// the channel it waits on for window space is gone; these do.
    channel_tokens: Mutex<HashMap<ChannelId, CancellationToken>>,
    /// Channels open at the SSH level: confirmed (or accepted) and not yet ended by the
    /// server's CLOSE. This mirrors the channel table russh keeps on its session task (it
    /// removes an entry exactly when it calls `channel_close`), so a count that stays above
    /// the channels in use is a leak there.
    ssh_channels: Mutex<HashSet<ChannelId>>,
    /// Cancelled when the connection has ended.
    pub closed: CancellationToken,
    reason: Mutex<Option<String>>,
    /// Set when the pool closed the session on purpose (idle, too old), so the loss is not
    /// counted as a reconnect-worthy failure.
    closed_on_purpose: AtomicBool,
    /// Keepalive interval and count, for messages.
    pub keepalive: (Duration, u32),
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("target", &self.key.to_string())
            .field("usage", &self.usage())
            .field("closed", &self.closed.is_cancelled())
            .finish()
    }
}

impl Shared {
    /// A snapshot of the usage counters.
    pub fn usage(&self) -> Usage {
        *lock(&self.usage)
    }

    /// Changes the usage counters under the lock; notifies the monitor if `change` says it
    /// changed something.
    pub fn update(&self, change: impl FnOnce(&mut Usage) -> bool) -> bool {
        let changed = {
            let mut usage = lock(&self.usage);
            let changed = change(&mut usage);
            if changed && usage.channels == 0 && usage.leases == 0 {
                usage.idle_since = Instant::now();
            }
            changed
        };
        if changed {
            self.usage_changed.notify_one();
            self.room.notify_waiters();
        }
        changed
    }

    /// Counts a channel the server opened (a forwarded connection) until the guard drops.
    pub fn track_channel(self: &Arc<Self>) -> ChannelGuard {
        self.update(|usage| {
            usage.channels += 1;
            true
        });
        ChannelGuard::reserved(self.clone())
    }

    /// Why the session ended (or "open").
    pub fn reason(&self) -> String {
        lock(&self.reason)
            .clone()
            .unwrap_or_else(|| "ssh session closed".to_string())
    }

    /// Records why the session ended; the first reason wins (it is the cause, later ones are
    /// consequences).
    pub(super) fn set_reason(&self, reason: String) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
    }

    /// Whether the pool itself closed the session.
    pub fn closed_on_purpose(&self) -> bool {
        self.closed_on_purpose.load(Ordering::SeqCst)
    }

    /// Whether the session can take another channel of ours.
    pub fn has_room(&self, usage: &Usage, max_age_end: Instant, now: Instant) -> bool {
        usage.channels < self.max_channels
            && !usage.saturated
            && self.usable(usage, max_age_end, now)
    }

    /// Whether the session may take new work at all (channels or tunnels).
    pub fn usable(&self, usage: &Usage, max_age_end: Instant, now: Instant) -> bool {
        !usage.retired && now < max_age_end && !self.closed.is_cancelled()
    }

    /// The token that is cancelled when the server closes channel `id` (or the session ends).
    ///
    /// The opener may get here before the handler has registered the channel: russh 0.65 hands
    /// the opener its channel first and calls `channel_open_confirmation` after, so "not
    /// registered yet" must not read as "closed" (it did, and under load one dial in a few
    /// hundred failed on its first write; found by the chaos test).
    pub fn channel_token(&self, id: ChannelId) -> CancellationToken {
        lock(&self.channel_tokens)
            .entry(id)
            .or_insert_with(|| self.closed.child_token())
            .clone()
    }

    pub(super) fn channel_opened(&self, id: ChannelId) {
        lock(&self.channel_tokens)
            .entry(id)
            .or_insert_with(|| self.closed.child_token());
        lock(&self.ssh_channels).insert(id);
    }

    /// Forgets a server-opened channel that was rejected (it never became open).
    pub(super) fn channel_rejected(&self, id: ChannelId) {
        lock(&self.channel_tokens).remove(&id);
        lock(&self.ssh_channels).remove(&id);
    }

    /// How many per-channel entries the session keeps: (ours, open at the SSH level). Both
    /// fall back to the channels in use once the others are closed; see [`Shared::ssh_channels`].
    pub fn tracked_channels(&self) -> (usize, usize) {
        (
            lock(&self.channel_tokens).len(),
            lock(&self.ssh_channels).len(),
        )
    }

    /// Drops the bookkeeping of a channel its user is done with (a no-op once it was closed).
    pub(super) fn forget_channel(&self, id: ChannelId) {
        lock(&self.channel_tokens).remove(&id);
    }

    pub(super) fn channel_closed(&self, id: ChannelId) {
        lock(&self.ssh_channels).remove(&id);
        if let Some(token) = lock(&self.channel_tokens).remove(&id) {
            token.cancel();
        }
    }

    /// Registers a remote forward's sink; `port` 0 while the server has not said which port.
    pub fn add_route(&self, id: u64, address: &str, port: u32, sink: IncomingSink) {
        lock(&self.routes).push(Route {
            id,
            address: address.to_string(),
            port,
            sink,
        });
    }

    /// Sets the port of a route once the server allocated it.
    pub fn set_route_port(&self, id: u64, port: u32) {
        if let Some(route) = lock(&self.routes).iter_mut().find(|r| r.id == id) {
            route.port = port;
        }
    }

    /// Unregisters a remote forward.
    pub fn remove_route(&self, id: u64) {
        lock(&self.routes).retain(|r| r.id != id);
    }

    /// The sink for a connection the server reports as arriving on `address:port`. OpenSSH
    /// echoes the address as it was requested, but be lenient: an exact match first, then the
    /// only forward on that port, then the only forward still waiting for its port number
    /// (a connection can beat the `tcpip-forward` reply to our task).
    pub(super) fn route_for(&self, address: &str, port: u32) -> Option<IncomingSink> {
        let routes = lock(&self.routes);
        if let Some(route) = routes
            .iter()
            .find(|r| r.port == port && r.address == address)
        {
            return Some(route.sink.clone());
        }
        let mut same_port = routes.iter().filter(|r| r.port == port);
        if let (Some(route), None) = (same_port.next(), same_port.next()) {
            return Some(route.sink.clone());
        }
        let mut pending = routes.iter().filter(|r| r.port == 0);
        if let (Some(route), None) = (pending.next(), pending.next()) {
            return Some(route.sink.clone());
        }
        None
    }
}

/// One channel counted against its session; dropping it frees the slot.
pub(crate) struct ChannelGuard {
    shared: Arc<Shared>,
    /// Already given back (by [`ChannelGuard::refused`]).
    released: bool,
}

impl ChannelGuard {
    /// The session this channel belongs to.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Counts a channel the pool reserved (the count was already raised under its lock).
    pub(crate) fn reserved(shared: Arc<Shared>) -> ChannelGuard {
        ChannelGuard {
            shared,
            released: false,
        }
    }

    /// The server refused this channel for lack of room: frees the slot and marks the session
    /// full in one step (a plain drop would mark it as having room again).
    pub(crate) fn refused(mut self) {
        self.released = true;
        self.shared.update(|usage| {
            usage.channels = usage.channels.saturating_sub(1);
            usage.saturated = true;
            true
        });
    }
}

impl fmt::Debug for ChannelGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelGuard(session {})", self.shared.id)
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.shared.update(|usage| {
            usage.channels = usage.channels.saturating_sub(1);
            // A slot freed up on the server too: worth trying this session again.
            usage.saturated = false;
            true
        });
    }
}

/// An established, logged-in SSH connection.
pub(crate) struct Session {
    /// State shared with the handler and the guards.
    pub shared: Arc<Shared>,
    handle: Handle<ClientHandler>,
    /// A duplicate of the connection's socket: shutting it down ends russh's task even if it
    /// is stuck writing to a dead peer.
    socket: std::net::TcpStream,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl Session {
    /// Opens a `direct-tcpip` channel to `host:port` as seen from the server.
    pub async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Channel<Msg>, russh::Error> {
        self.handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
    }

    /// Opens a `session` channel (for exec).
    pub async fn open_session(&self) -> Result<Channel<Msg>, russh::Error> {
        self.handle.channel_open_session().await
    }

    /// Asks the server to listen on `address:port`; returns the port it listens on.
    pub async fn tcpip_forward(&self, address: &str, port: u16) -> Result<u16, russh::Error> {
        let allocated = self.handle.tcpip_forward(address, u32::from(port)).await?;
        // The server only reports the port when it picked one (port 0 requested).
        if port == 0 {
            u16::try_from(allocated).map_err(|_| russh::Error::Inconsistent)
        } else {
            Ok(port)
        }
    }

    /// Asks the server to stop listening on `address:port`.
    pub async fn cancel_tcpip_forward(&self, address: &str, port: u16) -> Result<(), russh::Error> {
        self.handle
            .cancel_tcpip_forward(address, u32::from(port))
            .await
    }

    /// One SSH round trip (a global request the server must answer). russh reports success
    /// even when the connection died while waiting, so the caller checks `closed` after.
    pub async fn ping(&self) -> Result<(), russh::Error> {
        self.handle.send_ping().await
    }

    /// Closes the connection on purpose: a polite `DISCONNECT`, then the socket is shut down if
    /// the connection has not ended within [`CLOSE_GRACE`].
    pub async fn close(&self, why: &str) {
        self.shared.closed_on_purpose.store(true, Ordering::SeqCst);
        self.shared.set_reason(format!("ssh session closed: {why}"));
        // `disconnect` only queues a message; bounded in case russh's queue is full.
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            self.handle.disconnect(Disconnect::ByApplication, why, "en"),
        )
        .await;
        let closed = self.shared.closed.clone();
        let socket = self.socket.try_clone();
        tokio::spawn(async move {
            if tokio::time::timeout(CLOSE_GRACE, closed.cancelled())
                .await
                .is_err()
            {
                if let Ok(socket) = socket {
                    let _ = socket.shutdown(Shutdown::Both);
                }
            }
        });
    }
}

/// Host key algorithms to ask for, those already recorded for this host first (as OpenSSH
/// does): a server with several keys then presents the one we can check. `ssh-rsa` (RSA
/// signatures over SHA-1) is never offered: an RSA host key is still accepted, signed with
/// `rsa-sha2-512`/`rsa-sha2-256` (OpenSSH 7.2+, dropbear 2020.79+).
fn preferred_algorithms(known: &[Algorithm]) -> Preferred {
    let mut preferred = Preferred::default();
    let all: Vec<Algorithm> = preferred
        .key
        .iter()
        .filter(|a| !matches!(a, Algorithm::Rsa { hash: None }))
        .cloned()
        .collect();
    let is_known = |a: &Algorithm| known.iter().any(|k| hostkeys::same_type(k, a));
    let mut ordered: Vec<Algorithm> = all.iter().filter(|a| is_known(a)).cloned().collect();
    ordered.extend(all.iter().filter(|a| !is_known(a)).cloned());
    // With nothing known, `ordered` is `all` in russh's order.
    preferred.key = Cow::Owned(ordered);
    preferred
}

/// Connects, verifies the host key, and logs in, within `connect_timeout` (TCP and key
/// exchange) and `auth_timeout` (login).
pub(crate) async fn connect(
    resolved: &Resolved,
    resolver: Option<&Resolver>,
    id: u64,
    room: Arc<Notify>,
) -> Result<Session, ProviderError> {
    let target = &resolved.target;
    let key = &resolved.key;
    let failed = |detail: String| ProviderError::Ssh {
        target: key.to_string(),
        detail,
    };
    let connect_deadline = Instant::now() + target.connect_timeout;

    let tcp = net::tcp_connect(key, resolver, target.connect_timeout, connect_deadline).await?;
    let std_socket = tcp
        .into_std()
        .map_err(|err| failed(format!("socket: {err}")))?;
    let killer = std_socket
        .try_clone()
        .map_err(|err| failed(format!("socket: {err}")))?;
    let tcp = TcpStream::from_std(std_socket).map_err(|err| failed(format!("socket: {err}")))?;
    let tcp = net::QuickAck::new(tcp);

    let known_hosts = target.known_hosts.clone();
    let (host, port) = (key.host.clone(), key.port);
    let known =
        tokio::task::spawn_blocking(move || hostkeys::known_algorithms(&known_hosts, &host, port))
            .await
            .unwrap_or_default();

    let keepalive = (target.keepalive_interval, target.keepalive_max);
    let interval = (!target.keepalive_interval.is_zero()).then_some(target.keepalive_interval);
    let config = client::Config {
        keepalive_interval: interval,
        keepalive_max: usize::try_from(target.keepalive_max).unwrap_or(usize::MAX),
        inactivity_timeout: interval.map(|i| inactivity_timeout(i, target.keepalive_max)),
        nodelay: true,
        preferred: preferred_algorithms(&known),
        ..client::Config::default()
    };

    let closed = CancellationToken::new();
    let shared = Arc::new(Shared {
        id,
        key: key.clone(),
        created: Instant::now(),
        max_channels: target.max_channels.max(1),
        usage: Mutex::new(Usage {
            channels: 0,
            leases: 0,
            idle_since: Instant::now(),
            saturated: false,
            retired: false,
        }),
        usage_changed: Notify::new(),
        room,
        routes: Mutex::new(Vec::new()),
        channel_tokens: Mutex::new(HashMap::new()),
        ssh_channels: Mutex::new(HashSet::new()),
        closed: closed.clone(),
        reason: Mutex::new(None),
        closed_on_purpose: AtomicBool::new(false),
        keepalive,
    });
    let handler = ClientHandler::new(
        HostKeyCheck {
            host: key.host.clone(),
            port: key.port,
            path: target.known_hosts.clone(),
            policy: target.host_key_policy,
        },
        shared.clone(),
        closed.clone(),
    );

    // Whatever fails from here on, the socket is shut down so russh's task ends with it.
    let abort = |socket: &std::net::TcpStream| {
        let _ = socket.shutdown(Shutdown::Both);
    };
    let remaining = connect_deadline.saturating_duration_since(Instant::now());
    let handshake = tokio::time::timeout(
        remaining,
        client::connect_stream(Arc::new(config), tcp, handler),
    )
    .await;
    let mut handle = match handshake {
        Ok(Ok(handle)) => handle,
        Ok(Err(HandlerError::HostKey(message))) => {
            abort(&killer);
            return Err(ProviderError::HostKey(message));
        }
        Ok(Err(HandlerError::Ssh(err))) => {
            abort(&killer);
            return Err(failed(format!(
                "key exchange failed: {}",
                describe_error(&err, keepalive)
            )));
        }
        Err(_) => {
            abort(&killer);
            return Err(ProviderError::Timeout {
                what: format!("ssh connect to {key} (TCP and key exchange)"),
                after: target.connect_timeout,
            });
        }
    };

    match tokio::time::timeout(
        target.auth_timeout,
        auth::authenticate(&mut handle, resolved),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            abort(&killer);
            return Err(err);
        }
        Err(_) => {
            abort(&killer);
            return Err(ProviderError::Timeout {
                what: format!("ssh authentication to {key}"),
                after: target.auth_timeout,
            });
        }
    }
    Ok(Session {
        shared,
        handle,
        socket: killer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_algorithms_go_first() {
        let preferred = preferred_algorithms(&[Algorithm::Rsa { hash: None }]);
        assert!(matches!(preferred.key[0], Algorithm::Rsa { hash: Some(_) }));
        assert!(matches!(preferred.key[1], Algorithm::Rsa { hash: Some(_) }));
        assert_eq!(preferred.key.len(), Preferred::default().key.len() - 1);
        let untouched = preferred_algorithms(&[]);
        assert_eq!(untouched.key[0], Algorithm::Ed25519);
    }

    #[test]
    fn sha1_rsa_is_never_offered() {
        for known in [&[][..], &[Algorithm::Rsa { hash: None }][..]] {
            let preferred = preferred_algorithms(known);
            assert!(
                !preferred
                    .key
                    .iter()
                    .any(|a| matches!(a, Algorithm::Rsa { hash: None })),
                "{:?}",
                preferred.key
            );
        }
    }
}
