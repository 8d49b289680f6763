//! The shared SSH session pool: one per daemon, shared by every SSH tunnel, probe and router
//! command, keyed by (user, host, port, identity) after ssh_config resolution and by the trust a
//! session carries (known_hosts, host key policy, login methods; see `config::PoolKey`).
//!
//! - A session carries up to `max_channels` channels; past that, or when the server refuses a
//!   channel while others are open on the session (OpenSSH's `MaxSessions` caps `session`
//!   channels, i.e. execs; OpenSSH 9.x answers "connect failed"), the pool marks the session
//!   full until one of its channels closes and puts the channel on another session, opening
//!   one if needed. A refusal on a session with nothing else open is final.
//! - Sessions to one target are opened one at a time: a burst of 200 dials opens the sessions
//!   it needs in turn instead of 200 connections at once (which would also trip OpenSSH's
//!   `MaxStartups`). Waiters share the outcome, so a refused host key or login fails them all
//!   at once instead of one connect timeout after another.
//! - Each session has a monitor task: it closes the session after `idle_timeout` without
//!   channels or tunnels, closes it once idle when it is older than `max_age` (new work goes to
//!   a fresh session meanwhile), and removes it from the pool when the connection ends. The
//!   task ends with the session, or when the pool is dropped (it then closes the session).
//! - A new session to a target that lost one (not closed on purpose) counts as a reconnect.
//! - Users learn at once when a session of their target is lost and when a new one is opened
//!   ([`SshPool::session_events`]): the router watcher re-reads the boot id on every reconnect,
//!   whoever's command found the drop.
//! - At most `max_sessions` sessions per target (0: no limit). When every one is full, a channel
//!   waits in a first-come-first-served queue until room appears (a channel closes, a session
//!   ends) or its own deadline passes; it then fails with an error naming the limit. Once
//!   someone waits, newcomers queue behind them.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::Msg;
use russh::{Channel, ChannelOpenFailure};
use serde::Serialize;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{PoolKey, Resolved};
use super::session::{self, ChannelGuard, Session};
use super::spec::SshTarget;
use crate::util::lock;
use crate::{ProviderError, Resolver};

/// How many acquire latencies the percentiles are computed over (the most recent ones).
const LATENCY_SAMPLES: usize = 1024;
/// How many sessions one channel open may try before giving up (each refusal for lack of room
/// moves it to another session).
const MAX_OPEN_ATTEMPTS: usize = 6;
/// How many times an acquirer re-checks for room after others opened sessions, before it opens
/// one itself (bounds the loop when a burst keeps filling every new session).
const MAX_RESERVE_ROUNDS: usize = 8;
/// How long an abandoned channel open (its caller timed out) may still wait for the server.
/// OpenSSH answers a `direct-tcpip` open once its own connect finishes, which the kernel bounds.
const ABANDONED_OPEN_LIMIT: Duration = Duration::from_secs(300);
/// How much longer than its own deadline a caller waits for a queued channel open, so the
/// queue's "limit reached" error (which names the cause) arrives before a bare timeout.
const QUEUE_ERROR_GRACE: Duration = Duration::from_millis(250);

/// Snapshot of the pool, for `/v1/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolStats {
    /// Open sessions (SSH connections).
    pub sessions: usize,
    /// Channels open on them (dials, execs, forwarded connections).
    pub channels_in_use: usize,
    /// Sessions opened since the pool was created.
    pub opened: u64,
    /// Sessions closed since the pool was created (idle, too old, or lost).
    pub closed: u64,
    /// Sessions opened to a target that had lost one.
    pub reconnects: u64,
    /// Channels waiting for room at `max_sessions`, over every target.
    pub queued: usize,
    /// Median time to get a session slot for a channel or tunnel, in microseconds, over the
    /// most recent acquisitions (includes opening a session when one was needed).
    pub acquire_p50_us: Option<u64>,
    /// 99th percentile of the same.
    pub acquire_p99_us: Option<u64>,
    /// Per pool key.
    pub targets: Vec<TargetStats>,
}

/// Pool usage of one target (pool key).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetStats {
    /// `user@host:port`.
    pub target: String,
    /// The identity file of the key, if any (two keys to one server are two pool keys).
    pub identity: Option<String>,
    /// Open sessions.
    pub sessions: usize,
    /// Channels open on them.
    pub channels: usize,
    /// Tunnels attached to them.
    pub tunnels: usize,
    /// Per-channel entries the sessions keep (close signals): back to at most `channels`
    /// once the others are closed. More means a leak in our bookkeeping.
    pub tracked_channels: usize,
    /// Channels open at the SSH level, as russh's table holds them (confirmed and not yet
    /// closed by the server). Back to at most `channels` once the others are closed.
    pub ssh_channels: usize,
    /// `max_sessions` of the target (0: no limit).
    pub max_sessions: u32,
    /// Channels waiting now for room (every session full, `max_sessions` reached).
    pub queued: usize,
    /// How long the longest-waiting of them has waited, in milliseconds.
    pub queued_wait_ms: Option<u64>,
    /// Channels that ever had to wait.
    pub queued_total: u64,
    /// Of them, those whose deadline passed in the queue (they failed naming the limit).
    pub queue_timeouts: u64,
    /// The longest wait in the queue that ended with room, in milliseconds.
    pub queue_wait_max_ms: u64,
}

/// Session changes of one target, as counters that only grow: a watcher compares them with
/// the values it last acted on. See [`SshPool::session_events`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionEvents {
    /// Sessions opened to the target so far.
    pub opened: u64,
    /// Sessions that ended without the pool closing them (the server went away, keepalives
    /// went unanswered).
    pub lost: u64,
}

/// The shared session pool: one per daemon. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct SshPool {
    inner: Arc<PoolInner>,
}

impl Default for SshPool {
    fn default() -> Self {
        SshPool::new()
    }
}

impl fmt::Debug for SshPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.stats();
        f.debug_struct("SshPool")
            .field("sessions", &stats.sessions)
            .field("channels_in_use", &stats.channels_in_use)
            .field("targets", &stats.targets.len())
            .finish()
    }
}

struct PoolInner {
    /// Name resolution for server host names (`None`: the system's).
    resolver: Option<Resolver>,
    targets: Mutex<HashMap<PoolKey, Arc<Target>>>,
    counters: Arc<Counters>,
    /// Cancelled when the pool is dropped: monitors then close their sessions.
    shutdown: CancellationToken,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Counters shared with the monitor tasks (which must not keep the pool alive).
#[derive(Default)]
struct Counters {
    next_id: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    reconnects: AtomicU64,
    latency: Mutex<Reservoir>,
}

/// The sessions of one pool key.
struct Target {
    /// `max_sessions` as last configured for this key (0: no limit).
    max_sessions: std::sync::atomic::AtomicU32,
    /// Woken whenever a session's usage changes or a session ends: room may have appeared.
    room: Arc<Notify>,
    /// Channels waiting for room, first come first served.
    queue: Mutex<Queue>,
    /// Sessions opened and lost, for [`SshPool::session_events`].
    events: watch::Sender<SessionEvents>,
    state: Mutex<TargetState>,
    /// Held while a session to this target is being opened (one at a time).
    opener: tokio::sync::Mutex<OpenerState>,
    /// Mirrors `OpenerState::generation`, readable without waiting for the opener.
    generation: AtomicU64,
}

#[derive(Default)]
struct TargetState {
    sessions: Vec<Arc<Session>>,
    /// A session ended without the pool closing it; the next one opened is a reconnect.
    lost: bool,
}

/// The waiting line of one target.
#[derive(Default)]
struct Queue {
    next_ticket: u64,
    /// Tickets and when they joined, oldest first.
    waiting: VecDeque<(u64, Instant)>,
    total: u64,
    timeouts: u64,
    wait_max: Duration,
}

/// A place in a target's queue; leaving it (however the wait ends) lets the next one try.
struct Ticket {
    target: Arc<Target>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.target.queue)
            .waiting
            .retain(|(id, _)| *id != self.id);
        self.target.room.notify_waiters();
    }
}

#[derive(Default)]
struct OpenerState {
    /// Bumped after every open attempt.
    generation: u64,
    /// The last attempt's error, shared with everyone who waited for it.
    last_failure: Option<ProviderError>,
}

/// A tunnel's hold on a session: keeps it open (never idle) until dropped.
pub(crate) struct Lease {
    /// The session held.
    pub session: Arc<Session>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease").field(&self.session).finish()
    }
}

impl Lease {
    /// An extra lease on a session already in use (by a channel of the caller), unless it was
    /// taken out of service.
    pub(crate) fn on(session: &Arc<Session>) -> Option<Lease> {
        let closed = session.shared.closed.is_cancelled();
        let taken = session.shared.update(|usage| {
            if usage.retired || closed {
                return false;
            }
            usage.leases += 1;
            true
        });
        taken.then(|| Lease {
            session: session.clone(),
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.session.shared.update(|usage| {
            usage.leases = usage.leases.saturating_sub(1);
            true
        });
    }
}

/// The kind of channel being opened, which decides what a refusal means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelKind {
    /// A `session` channel (exec). OpenSSH caps these per connection (`MaxSessions`, default
    /// 10) and refuses the next one with "connect failed" (OpenSSH 9.x) or "administratively
    /// prohibited" (other servers).
    Session,
    /// A `direct-tcpip` channel (dials). OpenSSH does not count these against `MaxSessions`;
    /// "connect failed" means the target did not accept, which another session cannot fix.
    DirectTcpip,
}

impl ChannelKind {
    /// Whether `reason` may mean "this connection is full" rather than a definite no.
    fn may_be_full(self, reason: &ChannelOpenFailure) -> bool {
        match reason {
            ChannelOpenFailure::AdministrativelyProhibited
            | ChannelOpenFailure::ResourceShortage => true,
            ChannelOpenFailure::ConnectFailed => self == ChannelKind::Session,
            _ => false,
        }
    }
}

/// What an acquirer wants from a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Channel,
    Lease,
}

impl SshPool {
    /// An empty pool resolving server names with the system resolver.
    pub fn new() -> SshPool {
        SshPool::build(None)
    }

    /// An empty pool resolving server names with the daemon's resolver (`dns.nameservers`).
    pub fn with_resolver(resolver: Resolver) -> SshPool {
        SshPool::build(Some(resolver))
    }

    fn build(resolver: Option<Resolver>) -> SshPool {
        SshPool {
            inner: Arc::new(PoolInner {
                resolver,
                targets: Mutex::new(HashMap::new()),
                counters: Arc::new(Counters::default()),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Snapshot for `/v1/status`.
    pub fn stats(&self) -> PoolStats {
        let counters = &self.inner.counters;
        let targets: Vec<(PoolKey, Arc<Target>)> = lock(&self.inner.targets)
            .iter()
            .map(|(key, target)| (key.clone(), target.clone()))
            .collect();
        let mut stats = PoolStats {
            opened: counters.opened.load(Ordering::Relaxed),
            closed: counters.closed.load(Ordering::Relaxed),
            reconnects: counters.reconnects.load(Ordering::Relaxed),
            ..PoolStats::default()
        };
        {
            let latency = lock(&counters.latency);
            stats.acquire_p50_us = latency.percentile(50);
            stats.acquire_p99_us = latency.percentile(99);
        }
        for (key, target) in targets {
            let mut entry = TargetStats {
                target: key.to_string(),
                identity: key.identity.as_ref().map(|p| p.display().to_string()),
                max_sessions: target.max_sessions.load(Ordering::Relaxed),
                ..TargetStats::default()
            };
            {
                let queue = lock(&target.queue);
                entry.queued = queue.waiting.len();
                entry.queued_wait_ms = queue
                    .waiting
                    .front()
                    .map(|(_, since)| millis(since.elapsed()));
                entry.queued_total = queue.total;
                entry.queue_timeouts = queue.timeouts;
                entry.queue_wait_max_ms = millis(queue.wait_max);
            }
            stats.queued += entry.queued;
            let state = lock(&target.state);
            for session in state
                .sessions
                .iter()
                .filter(|s| !s.shared.closed.is_cancelled())
            {
                let usage = session.shared.usage();
                entry.sessions += 1;
                entry.channels += usage.channels as usize;
                entry.tunnels += usage.leases as usize;
                let (ours, ssh) = session.shared.tracked_channels();
                entry.tracked_channels += ours;
                entry.ssh_channels += ssh;
            }
            stats.sessions += entry.sessions;
            stats.channels_in_use += entry.channels;
            stats.targets.push(entry);
        }
        stats.targets.sort_by(|a, b| a.target.cmp(&b.target));
        stats
    }

    /// Closes every open session to `target` (`user@host:port`, as [`TargetStats::target`]
    /// names it) on purpose, e.g. after the server's keys or limits changed; whoever used them
    /// reconnects. Returns how many were closed, or None when the pool has no such target.
    pub async fn reset(&self, target: &str, why: &str) -> Option<usize> {
        let targets: Vec<Arc<Target>> = lock(&self.inner.targets)
            .iter()
            .filter(|(key, _)| key.to_string() == target)
            .map(|(_, target)| target.clone())
            .collect();
        if targets.is_empty() {
            return None;
        }
        let sessions: Vec<Arc<Session>> = targets
            .iter()
            .flat_map(|t| lock(&t.state).sessions.clone())
            .filter(|s| !s.shared.closed.is_cancelled())
            .collect();
        for session in &sessions {
            session.close(why).await;
        }
        Some(sessions.len())
    }

    /// Follows the sessions of `target`: the receiver changes whenever one is opened or lost
    /// (resolves the target, so only a config error fails). Opens nothing by itself.
    pub fn session_events(
        &self,
        target: &SshTarget,
    ) -> Result<watch::Receiver<SessionEvents>, ProviderError> {
        let resolved = super::config::resolve(target)?;
        Ok(self.target(&resolved.key).events.subscribe())
    }

    /// A hold on a session to `resolved` for a tunnel (opens one if needed).
    pub(crate) async fn lease(&self, resolved: &Resolved) -> Result<Lease, ProviderError> {
        let deadline =
            Instant::now() + resolved.target.connect_timeout + resolved.target.auth_timeout;
        let session = self.acquire(resolved, Slot::Lease, deadline).await?;
        Ok(Lease { session })
    }

    /// Opens a channel with `open` on a pooled session to `resolved`, moving to another session
    /// when the server refuses it for lack of room. `what` names the channel in errors. A wait
    /// for room at `max_sessions` ends at `deadline`.
    pub(crate) async fn open_channel<T, F, Fut>(
        &self,
        resolved: &Resolved,
        kind: ChannelKind,
        what: &str,
        deadline: Instant,
        open: F,
    ) -> Result<(T, ChannelGuard, Arc<Session>), ProviderError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = Result<T, russh::Error>>,
    {
        let failed = |detail: String| ProviderError::Ssh {
            target: resolved.key.to_string(),
            detail,
        };
        let mut last = None;
        for _ in 0..MAX_OPEN_ATTEMPTS {
            let session = self.acquire(resolved, Slot::Channel, deadline).await?;
            let guard = ChannelGuard::reserved(session.shared.clone());
            match open(session.clone()).await {
                Ok(value) => return Ok((value, guard, session)),
                Err(russh::Error::ChannelOpenFailure(reason)) => {
                    // Others on this session (open or being opened) mean the refusal may be
                    // a per-connection limit; alone on it, the server simply says no.
                    let others = session.shared.usage().channels.saturating_sub(1);
                    if kind.may_be_full(&reason) && others > 0 {
                        guard.refused();
                        tracing::debug!(
                            target = %resolved.key,
                            session = session.shared.id,
                            open = others,
                            "server refused a channel (MaxSessions?); trying another session"
                        );
                        last = Some(format!(
                            "{what} refused by the server ({}) on every session tried",
                            describe_refusal(&reason)
                        ));
                        continue;
                    }
                    return Err(failed(format!(
                        "{what} refused by the server ({})",
                        describe_refusal(&reason)
                    )));
                }
                Err(err) if session.shared.closed.is_cancelled() => {
                    // The session died under us: another one may be fine.
                    last = Some(format!("{what}: {}", session.shared.reason()));
                    tracing::debug!(target = %resolved.key, error = %err, "session lost while opening a channel");
                }
                Err(err) => return Err(failed(format!("{what}: {err}"))),
            }
        }
        Err(failed(last.unwrap_or_else(|| {
            format!("{what}: no session could take it")
        })))
    }

    /// [`SshPool::open_channel`] bounded by `timeout`. russh cannot cancel a channel open
    /// (russh issue 329): dropping the future would leave the channel half-open on the server
    /// for the life of the session. So the open runs on its own task; if the caller has given
    /// up by the time it completes, the task closes the channel and frees the slot.
    pub(crate) async fn open_channel_within<F, Fut>(
        &self,
        resolved: &Arc<Resolved>,
        kind: ChannelKind,
        what: String,
        timeout: Duration,
        open: F,
    ) -> Result<(Channel<Msg>, ChannelGuard, Arc<Session>), ProviderError>
    where
        F: Fn(Arc<Session>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Channel<Msg>, russh::Error>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let pool = self.clone();
        let task_resolved = resolved.clone();
        let task_what = what.clone();
        let deadline = Instant::now() + timeout;
        tokio::spawn(async move {
            let opening = pool.open_channel(&task_resolved, kind, &task_what, deadline, open);
            let Ok(result) = tokio::time::timeout(ABANDONED_OPEN_LIMIT, opening).await else {
                return;
            };
            if let Err(Ok((channel, guard, _session))) = tx.send(result) {
                // Nobody waits for it any more.
                let _ = channel.close().await;
                drop(guard);
            }
        });
        match tokio::time::timeout(timeout + QUEUE_ERROR_GRACE, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProviderError::Timeout {
                what: format!("{what} on {}", resolved.key),
                after: ABANDONED_OPEN_LIMIT,
            }),
            Err(_) => Err(ProviderError::Timeout {
                what: format!("{what} on {}", resolved.key),
                after: timeout,
            }),
        }
    }

    /// Runs the acquisition, recording its latency.
    async fn acquire(
        &self,
        resolved: &Resolved,
        slot: Slot,
        deadline: Instant,
    ) -> Result<Arc<Session>, ProviderError> {
        let started = Instant::now();
        let result = self.acquire_inner(resolved, slot, deadline).await;
        if result.is_ok() {
            lock(&self.inner.counters.latency).record(started.elapsed());
        }
        result
    }

    async fn acquire_inner(
        &self,
        resolved: &Resolved,
        slot: Slot,
        deadline: Instant,
    ) -> Result<Arc<Session>, ProviderError> {
        let target = self.target(&resolved.key);
        target
            .max_sessions
            .store(resolved.target.max_sessions, Ordering::Relaxed);
        for _ in 0..MAX_RESERVE_ROUNDS {
            if target.someone_waits() {
                // First come, first served: behind those already waiting.
                return self.wait_for_room(&target, resolved, slot, deadline).await;
            }
            if let Some(session) = target.try_reserve(slot, resolved.target.max_age) {
                return Ok(session);
            }
            if target.at_limit() {
                return self.wait_for_room(&target, resolved, slot, deadline).await;
            }
            let seen = target.generation.load(Ordering::SeqCst);
            let mut opener = target.opener.lock().await;
            if opener.generation != seen {
                // Someone finished an open attempt while we waited: share a failure, or look
                // for room on the session they opened.
                if let Some(err) = &opener.last_failure {
                    return Err(clone_error(err));
                }
                continue;
            }
            match self
                .open_session(&target, &mut opener, resolved, slot)
                .await?
            {
                Some(session) => return Ok(session),
                None => {
                    drop(opener);
                    return self.wait_for_room(&target, resolved, slot, deadline).await;
                }
            }
        }
        // Every round someone else's new session filled up before we got to it: open our own.
        let mut opener = target.opener.lock().await;
        match self
            .open_session(&target, &mut opener, resolved, slot)
            .await?
        {
            Some(session) => Ok(session),
            None => {
                drop(opener);
                self.wait_for_room(&target, resolved, slot, deadline).await
            }
        }
    }

    /// Waits in the target's queue until, first in line, a slot is free on a session or a new
    /// session may be opened; fails at `deadline` with an error naming `max_sessions`.
    async fn wait_for_room(
        &self,
        target: &Arc<Target>,
        resolved: &Resolved,
        slot: Slot,
        deadline: Instant,
    ) -> Result<Arc<Session>, ProviderError> {
        let joined = Instant::now();
        let ticket = target.enqueue(joined);
        loop {
            // Registered before looking, so a wake-up between the look and the wait is kept.
            let notified = target.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if target.is_first(ticket.id) {
                if let Some(session) = target.try_reserve(slot, resolved.target.max_age) {
                    target.waited(joined.elapsed());
                    return Ok(session);
                }
                if !target.at_limit() {
                    let mut opener = target.opener.lock().await;
                    if let Some(session) = self
                        .open_session(target, &mut opener, resolved, slot)
                        .await?
                    {
                        target.waited(joined.elapsed());
                        return Ok(session);
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let waiting = lock(&target.queue).waiting.len();
                    lock(&target.queue).timeouts += 1;
                    let max = target.max_sessions.load(Ordering::Relaxed);
                    return Err(ProviderError::Ssh {
                        target: resolved.key.to_string(),
                        detail: format!(
                            "no room: the {max} sessions allowed by ssh.max_sessions are all \
                             full ({} channels each, ssh.max_channels); waited {:?} in a queue \
                             of {waiting}",
                            resolved.target.max_channels.max(1),
                            joined.elapsed(),
                        ),
                    });
                }
            }
        }
    }

    /// Opens a session (the caller holds the target's opener lock), adds it to the pool with a
    /// slot reserved for the caller, and starts its monitor.
    async fn open_session(
        &self,
        target: &Arc<Target>,
        opener: &mut OpenerState,
        resolved: &Resolved,
        slot: Slot,
    ) -> Result<Option<Arc<Session>>, ProviderError> {
        // Room may have appeared while we waited for the lock (a channel closed).
        if let Some(session) = target.try_reserve(slot, resolved.target.max_age) {
            return Ok(Some(session));
        }
        if target.at_limit() {
            return Ok(None);
        }
        let counters = &self.inner.counters;
        let id = counters.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let result = session::connect(
            resolved,
            self.inner.resolver.as_ref(),
            id,
            target.room.clone(),
        )
        .await;
        opener.generation += 1;
        target.generation.store(opener.generation, Ordering::SeqCst);
        let session = match result {
            Ok(session) => Arc::new(session),
            Err(err) => {
                opener.last_failure = Some(clone_error(&err));
                return Err(err);
            }
        };
        opener.last_failure = None;
        session.shared.update(|usage| {
            match slot {
                Slot::Channel => usage.channels += 1,
                Slot::Lease => usage.leases += 1,
            }
            true
        });
        let reconnect = {
            let mut state = lock(&target.state);
            state.sessions.push(session.clone());
            std::mem::take(&mut state.lost)
        };
        counters.opened.fetch_add(1, Ordering::Relaxed);
        target.events.send_modify(|events| events.opened += 1);
        if reconnect {
            counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            target = %resolved.key,
            session = id,
            reconnect,
            "ssh session established"
        );
        tokio::spawn(monitor(
            target.clone(),
            session.clone(),
            self.inner.counters.clone(),
            self.inner.shutdown.clone(),
            resolved.target.idle_timeout,
            resolved.target.max_age,
        ));
        Ok(Some(session))
    }

    /// The pool entry of a key, created on first use.
    fn target(&self, key: &PoolKey) -> Arc<Target> {
        lock(&self.inner.targets)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Target {
                    max_sessions: std::sync::atomic::AtomicU32::new(0),
                    room: Arc::new(Notify::new()),
                    queue: Mutex::new(Queue::default()),
                    events: watch::Sender::new(SessionEvents::default()),
                    state: Mutex::new(TargetState::default()),
                    opener: tokio::sync::Mutex::new(OpenerState::default()),
                    generation: AtomicU64::new(0),
                })
            })
            .clone()
    }
}

impl Target {
    /// Whether another session would exceed `max_sessions`. Sessions still open count, even
    /// when taken out of service: they are open at the server until they close.
    fn at_limit(&self) -> bool {
        let max = self.max_sessions.load(Ordering::Relaxed);
        if max == 0 {
            return false;
        }
        let open = lock(&self.state)
            .sessions
            .iter()
            .filter(|s| !s.shared.closed.is_cancelled())
            .count();
        open >= max as usize
    }

    fn someone_waits(&self) -> bool {
        !lock(&self.queue).waiting.is_empty()
    }

    /// Joins the queue.
    fn enqueue(self: &Arc<Self>, now: Instant) -> Ticket {
        let mut queue = lock(&self.queue);
        queue.next_ticket += 1;
        let id = queue.next_ticket;
        queue.waiting.push_back((id, now));
        queue.total += 1;
        Ticket {
            target: self.clone(),
            id,
        }
    }

    fn is_first(&self, ticket: u64) -> bool {
        lock(&self.queue).waiting.front().map(|(id, _)| *id) == Some(ticket)
    }

    /// Records how long a wait that ended with room took.
    fn waited(&self, took: Duration) {
        let mut queue = lock(&self.queue);
        queue.wait_max = queue.wait_max.max(took);
    }

    /// Reserves a slot on the oldest session with room (packing keeps the session count low;
    /// idle ones then close).
    fn try_reserve(&self, slot: Slot, max_age: Duration) -> Option<Arc<Session>> {
        let state = lock(&self.state);
        let now = Instant::now();
        for session in &state.sessions {
            let shared = &session.shared;
            let max_age_end = shared.created + max_age;
            let reserved = shared.update(|usage| match slot {
                Slot::Channel if shared.has_room(usage, max_age_end, now) => {
                    usage.channels += 1;
                    true
                }
                Slot::Lease if shared.usable(usage, max_age_end, now) => {
                    usage.leases += 1;
                    true
                }
                _ => false,
            });
            if reserved {
                return Some(session.clone());
            }
        }
        None
    }
}

/// Watches one session: closes it when idle or too old, removes it when it ends.
async fn monitor(
    target: Arc<Target>,
    session: Arc<Session>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    idle_timeout: Duration,
    max_age: Duration,
) {
    let shared = session.shared.clone();
    let max_age_end = shared.created + max_age;
    loop {
        let usage = shared.usage();
        let now = Instant::now();
        let idle = usage.channels == 0 && usage.leases == 0;
        let expired = now >= max_age_end;
        if idle && (expired || now >= usage.idle_since + idle_timeout) {
            // Retire under the target lock, so no acquirer can reserve it in between.
            let retired = {
                let _state = lock(&target.state);
                shared.update(|usage| {
                    if usage.channels == 0 && usage.leases == 0 && !usage.retired {
                        usage.retired = true;
                        true
                    } else {
                        false
                    }
                })
            };
            if retired {
                let why = if expired {
                    format!("max_age {max_age:?} reached")
                } else {
                    format!("idle for {idle_timeout:?}")
                };
                session.close(&why).await;
                break;
            }
            continue;
        }
        let wake = if idle {
            (usage.idle_since + idle_timeout).min(max_age_end)
        } else {
            // Busy: nothing to do until usage changes.
            now + Duration::from_secs(3600)
        };
        tokio::select! {
            _ = shared.closed.cancelled() => break,
            _ = shared.usage_changed.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => {
                session.close("the session pool was dropped").await;
                break;
            }
        }
    }
    let lost = !shared.closed_on_purpose();
    {
        let mut state = lock(&target.state);
        state.sessions.retain(|s| !Arc::ptr_eq(s, &session));
        if lost {
            state.lost = true;
        }
    }
    // One session fewer: a queued channel may open a new one.
    target.room.notify_waiters();
    if lost {
        target.events.send_modify(|events| events.lost += 1);
    }
    counters.closed.fetch_add(1, Ordering::Relaxed);
    if lost {
        tracing::warn!(target = %shared.key, session = shared.id, reason = %shared.reason(), "ssh session lost");
    } else {
        tracing::info!(target = %shared.key, session = shared.id, reason = %shared.reason(), "ssh session closed");
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Words for a channel refusal.
fn describe_refusal(reason: &ChannelOpenFailure) -> String {
    match reason {
        ChannelOpenFailure::AdministrativelyProhibited => "administratively prohibited".to_string(),
        ChannelOpenFailure::ConnectFailed => "connect failed".to_string(),
        ChannelOpenFailure::UnknownChannelType => "unknown channel type".to_string(),
        ChannelOpenFailure::ResourceShortage => "resource shortage".to_string(),
        ChannelOpenFailure::Other { code, reason } => format!("code {code}: {reason}"),
    }
}

/// A copy of an error, to hand one failed open attempt to everyone who waited for it.
pub(crate) fn clone_error(err: &ProviderError) -> ProviderError {
    match err {
        ProviderError::Config(m) => ProviderError::Config(m.clone()),
        ProviderError::HostKey(m) => ProviderError::HostKey(m.clone()),
        ProviderError::Auth(m) => ProviderError::Auth(m.clone()),
        ProviderError::Ssh { target, detail } => ProviderError::Ssh {
            target: target.clone(),
            detail: detail.clone(),
        },
        ProviderError::Timeout { what, after } => ProviderError::Timeout {
            what: what.clone(),
            after: *after,
        },
        ProviderError::Resolve { name, detail } => ProviderError::Resolve {
            name: name.clone(),
            detail: detail.clone(),
        },
        other => ProviderError::Closed(other.to_string()),
    }
}

/// The most recent acquisition latencies, for percentiles.
#[derive(Default)]
struct Reservoir {
    samples: Vec<u64>,
    next: usize,
}

impl Reservoir {
    fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if self.samples.len() < LATENCY_SAMPLES {
            self.samples.push(micros);
        } else {
            self.samples[self.next] = micros;
        }
        self.next = (self.next + 1) % LATENCY_SAMPLES;
    }

    /// Nearest-rank percentile (`p` in 1..=100).
    fn percentile(&self, p: usize) -> Option<u64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
        sorted.get(rank - 1).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_a_bounded_window() {
        let mut reservoir = Reservoir::default();
        assert_eq!(reservoir.percentile(50), None);
        for us in 1..=100u64 {
            reservoir.record(Duration::from_micros(us));
        }
        assert_eq!(reservoir.percentile(50), Some(50));
        assert_eq!(reservoir.percentile(99), Some(99));
        for _ in 0..LATENCY_SAMPLES {
            reservoir.record(Duration::from_micros(7));
        }
        assert_eq!(reservoir.samples.len(), LATENCY_SAMPLES);
        assert_eq!(reservoir.percentile(99), Some(7));
    }
}
