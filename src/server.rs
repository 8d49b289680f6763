//! One bounded server for every socket the daemon accepts on: the control socket, the metrics
//! endpoint and each service's failover listener. Each of them supplies only its
//! per-connection handler (admission and the work); the rules below live here once.
//!
//! - **Backpressure.** At most `max_connections` connections are open at once. With
//!   [`WhenFull::Wait`] the server stops accepting until one ends (the kernel's backlog holds the
//!   rest: the failover listener, whose clients should wait rather than be refused); with
//!   [`WhenFull::Refuse`] it accepts and closes at once (control and metrics: no local user can
//!   queue work that the daemon would then serve late).
//! - **`EMFILE`/`ENFILE` backoff.** A failing `accept` (out of descriptors or memory) waits
//!   10 ms, doubling up to 1 s, instead of spinning; the next success resets the wait.
//! - **Per-key limits.** [`Quota`] caps the connections of one key (a uid, a source address).
//! - **HTTP/1.1 connections** ([`http1`]): a bounded request head (size and arrival time), an
//!   optional lifetime, and half-close: a client that shuts down its sending side after its
//!   request (`printf 'GET …' | socat - UNIX-CONNECT:…`) still gets the answer (found by fuzzing
//!   the control socket).
//! - **Graceful shutdown** ([`Server::shutdown`]): accepting stops and the sockets close, open
//!   connections are asked to drain ([`Shutdown::drain`]: an HTTP connection finishes the request
//!   in flight and closes), and whatever is still open after the grace is closed
//!   ([`Shutdown::close`]).
//! - **Rebinding.** [`Server::serve`] may run on several sockets in turn (the listener moving to
//!   a new address): they share the connection slots and the open connections, and
//!   [`Accepting::stop`] closes one socket without touching the connections it accepted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The first wait after a failed `accept`; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between failed `accept`s.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket the server can accept on.
pub trait Accept: Send + Sync + 'static {
    /// What one accepted connection is.
    type Conn: Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);

    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;

    async fn accept(&self) -> io::Result<Self::Conn> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// What the server does with a connection while `max_connections` are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop accepting until one ends; the kernel's backlog holds the rest.
    Wait,
    /// Accept it and close it at once.
    Refuse,
}

/// The two stages of a shutdown, as an open connection sees them.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    drain: CancellationToken,
    close: CancellationToken,
}

impl Shutdown {
    /// One token for both stages: the connection is closed as soon as it is asked to drain
    /// (for serving a connection without a [`Server`], e.g. fuzzing the control socket).
    pub fn at(token: CancellationToken) -> Shutdown {
        Shutdown {
            drain: token.clone(),
            close: token,
        }
    }

    /// Cancelled when the server stops: finish what is in flight, take nothing new.
    pub fn drain(&self) -> &CancellationToken {
        &self.drain
    }

    /// Cancelled when the drain grace is over (or at once with [`Shutdown::at`]): close now.
    pub fn close(&self) -> &CancellationToken {
        &self.close
    }
}

/// A bounded server: connection slots, the accept loops of its sockets, the open connections.
pub struct Server {
    name: Arc<str>,
    when_full: WhenFull,
    slots: Arc<Semaphore>,
    /// The current `max_connections` (see [`Server::resize`]).
    max: Mutex<usize>,
    /// Cancels every accept loop.
    accepting: CancellationToken,
    loops: TaskTracker,
    connections: TaskTracker,
    shutdown: Shutdown,
}

/// One socket being served; [`Accepting::stop`] closes it.
pub struct Accepting {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Accepting {
    /// Stops accepting on this socket and returns once it is closed (its address may be bound
    /// again). The connections it accepted go on. Calling it again does nothing.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Server {
    /// A server called `name` (for logs) with `max_connections` slots.
    pub fn new(name: impl Into<Arc<str>>, max_connections: usize, when_full: WhenFull) -> Server {
        Server {
            name: name.into(),
            when_full,
            slots: Arc::new(Semaphore::new(max_connections)),
            max: Mutex::new(max_connections),
            accepting: CancellationToken::new(),
            loops: TaskTracker::new(),
            connections: TaskTracker::new(),
            shutdown: Shutdown::default(),
        }
    }

    /// Accepts on `acceptor` until [`Accepting::stop`] or [`Server::shutdown`]. For each
    /// connection that gets a slot, `handler` decides: `None` closes it at once (a peer that may
    /// not connect, a quota used up), `Some(work)` runs `work` on a task of its own, which holds
    /// the slot until it ends. The handler runs on the accept loop, so it must not block.
    pub fn serve<A, H, F>(&self, acceptor: A, handler: H) -> Accepting
    where
        A: Accept,
        H: FnMut(A::Conn, &Shutdown) -> Option<F> + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.accepting.child_token();
        let task = self.loops.spawn(accept_loop(
            AcceptLoop {
                name: self.name.clone(),
                when_full: self.when_full,
                slots: self.slots.clone(),
                stop: stop.clone(),
                connections: self.connections.clone(),
                shutdown: self.shutdown.clone(),
            },
            acceptor,
            handler,
        ));
        Accepting {
            stop,
            task: Some(task),
        }
    }

    /// Changes `max_connections` for the connections accepted from now on. Growing takes effect
    /// at once; shrinking takes the surplus slots as open connections give theirs back.
    pub fn resize(&self, max_connections: usize) {
        let mut max = self.max.lock().unwrap_or_else(|p| p.into_inner());
        let before = *max;
        *max = max_connections;
        if max_connections > before {
            self.slots.add_permits(max_connections - before);
        } else if max_connections < before {
            let surplus = u32::try_from(before - max_connections).unwrap_or(u32::MAX);
            let slots = self.slots.clone();
            let close = self.shutdown.close.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = close.cancelled() => {}
                    permits = slots.acquire_many_owned(surplus) => {
                        if let Ok(permits) = permits {
                            permits.forget();
                        }
                    }
                }
            });
        }
    }

    /// What the open connections watch (for work that is not a connection but should end with
    /// them, like the listener's `on_failover: close` watcher).
    pub fn shutdown_signal(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Stops accepting on every socket (returning once they are closed), asks the open
    /// connections to drain, waits up to `grace` for them to end, then closes the rest.
    pub async fn shutdown(&self, grace: Duration) {
        self.accepting.cancel();
        self.loops.close();
        self.loops.wait().await;
        self.connections.close();
        self.shutdown.drain.cancel();
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_err()
        {
            tracing::info!(
                server = %self.name,
                open = self.connections.len(),
                "drain grace over; closing the remaining connections"
            );
        }
        self.shutdown.close.cancel();
        self.connections.wait().await;
    }
}

/// What an accept loop shares with its server.
struct AcceptLoop {
    name: Arc<str>,
    when_full: WhenFull,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    connections: TaskTracker,
    shutdown: Shutdown,
}

async fn accept_loop<A, H, F>(ctx: AcceptLoop, acceptor: A, mut handler: H)
where
    A: Accept,
    H: FnMut(A::Conn, &Shutdown) -> Option<F> + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut backoff = BACKOFF_FIRST;
    loop {
        // Backpressure first: while every slot is taken, do not even accept.
        let waited = match ctx.when_full {
            WhenFull::Wait => tokio::select! {
                _ = ctx.stop.cancelled() => break,
                permit = ctx.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
            },
            WhenFull::Refuse => None,
        };
        let accepted = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        match accepted {
            Ok(conn) => {
                backoff = BACKOFF_FIRST;
                let permit = match waited {
                    Some(permit) => permit,
                    None => match ctx.slots.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => {
                            tracing::debug!(server = %ctx.name, "no free connection slot; closed");
                            continue;
                        }
                    },
                };
                if let Some(work) = handler(conn, &ctx.shutdown) {
                    ctx.connections.spawn(async move {
                        work.await;
                        drop(permit);
                    });
                }
            }
            Err(e) => {
                // Out of descriptors or memory: wait for connections to close rather than
                // spinning on an accept that keeps failing.
                tracing::warn!(server = %ctx.name, "accept: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = ctx.stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    // The socket closes here (a Unix socket's file goes with its owner's `Drop`).
    drop(acceptor);
}

/// Connection counts per key (a uid, a source address); a [`QuotaSlot`] gives its count back
/// when dropped.
pub struct Quota<K>(Arc<Mutex<HashMap<K, usize>>>);

impl<K> Default for Quota<K> {
    fn default() -> Self {
        Quota(Arc::default())
    }
}

impl<K> Clone for Quota<K> {
    fn clone(&self) -> Self {
        Quota(self.0.clone())
    }
}

/// One connection counted against a [`Quota`].
pub struct QuotaSlot<K: Eq + Hash> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Quota<K> {
    /// Counts one more connection for `key`, if it has fewer than `limit`.
    pub fn take(&self, key: K, limit: usize) -> Option<QuotaSlot<K>> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key.clone()).or_default();
        if *n >= limit {
            if *n == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(QuotaSlot {
            counts: self.0.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash> Drop for QuotaSlot<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

pub use crate::http_reply::Body;

/// Bounds of one HTTP/1.1 connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A client must send a request head within this time (also bounds an idle keep-alive, and
    /// how long a closing connection may take to hand over its last answer).
    pub header_timeout: Duration,
    /// Request heads larger than this are refused.
    pub max_head: usize,
    /// After this long the connection finishes the request in flight and closes (none: it lives
    /// until the client or a shutdown ends it).
    pub lifetime: Option<Duration>,
}

/// Serves HTTP/1.1 on one connection with `handle` until the client closes it, its lifetime
/// ends or the server shuts down (the request in flight is answered first, bounded by the
/// header timeout; cut at once on [`Shutdown::close`]).
pub async fn http1<IO, F, Fut>(io: IO, limits: HttpLimits, shutdown: &Shutdown, handle: F)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let answer = handle(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head)
        .half_close(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let lifetime = async {
        match limits.lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shutdown.drain.cancelled() => {}
        _ = lifetime => {}
    }
    // Finish the request in flight, if any, then close; a client that does not read its answer
    // is cut off.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = tokio::time::sleep(limits.header_timeout) => {}
        _ = shutdown.close.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    /// Generous bound for a condition on a loaded 2-core box.
    const PATIENCE: Duration = Duration::from_secs(30);

    async fn bound() -> (TcpListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    type Work = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
    type TcpConn = (TcpStream, std::net::SocketAddr);

    /// A handler that reports each connection it starts and holds it until told to let go.
    fn holding(
        started: mpsc::UnboundedSender<()>,
        release: Arc<tokio::sync::Notify>,
    ) -> impl FnMut(TcpConn, &Shutdown) -> Option<Work> + Send + 'static {
        move |(stream, _), _| {
            let started = started.clone();
            let release = release.clone();
            Some(Box::pin(async move {
                let _ = started.send(());
                release.notified().await;
                drop(stream);
            }))
        }
    }

    #[tokio::test]
    async fn wait_mode_stops_accepting_at_max_connections() {
        let (listener, addr) = bound().await;
        let server = Server::new("test", 2, WhenFull::Wait);
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let _accepting = server.serve(listener, holding(started_tx, release.clone()));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..2 {
            tokio::time::timeout(PATIENCE, started.recv())
                .await
                .expect("a connection within the limit was not served");
        }
        // The third waits in the backlog: connected (the kernel completed the handshake) but
        // not served while both slots are held …
        assert!(
            tokio::time::timeout(Duration::from_millis(300), started.recv())
                .await
                .is_err(),
            "a connection over max_connections was served"
        );
        // … and is served as soon as one slot is given back, without reconnecting.
        release.notify_one();
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .expect("the waiting connection was not served once a slot was free");
        release.notify_waiters();
        server.shutdown(Duration::ZERO).await;
    }

    #[tokio::test]
    async fn refuse_mode_closes_over_the_limit_at_once() {
        let (listener, addr) = bound().await;
        let server = Server::new("test", 1, WhenFull::Refuse);
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let _accepting = server.serve(listener, holding(started_tx, release.clone()));
        let _held = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(PATIENCE, over.read_to_end(&mut buf))
            .await
            .expect("the connection over the limit was neither served nor closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.try_recv().is_err(), "over the limit, yet served");
        release.notify_waiters();
        server.shutdown(Duration::ZERO).await;
    }

    /// Fails `accept` with EMFILE according to `script` (true = fail), recording when each call
    /// came; after the script, waits forever.
    struct Scripted {
        script: Mutex<std::collections::VecDeque<bool>>,
        calls: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    impl Accept for Scripted {
        type Conn = ();

        async fn accept(&self) -> io::Result<()> {
            self.calls.lock().unwrap().push(tokio::time::Instant::now());
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(true) => Err(io::Error::from_raw_os_error(nix::libc::EMFILE)),
                Some(false) => Ok(()),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn emfile_backs_off_doubling_and_resets_after_a_success() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        // Six failures, a success, two failures.
        let script = [true, true, true, true, true, true, false, true, true];
        let acceptor = Scripted {
            script: Mutex::new(script.into_iter().collect()),
            calls: calls.clone(),
        };
        let served = Arc::new(AtomicUsize::new(0));
        let server = Server::new("test", 4, WhenFull::Wait);
        let counted = served.clone();
        let _accepting = server.serve(acceptor, move |(), _| {
            counted.fetch_add(1, Ordering::Relaxed);
            Some(async {})
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while calls.lock().unwrap().len() < script.len() + 1 {
            assert!(tokio::time::Instant::now() < deadline, "the loop stalled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let calls = calls.lock().unwrap().clone();
        let gaps: Vec<u64> = calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect();
        // 10 ms doubling after each failure (capped at 1 s), no wait after the success, and
        // 10 ms again after the next failure.
        assert_eq!(gaps, [10, 20, 40, 80, 160, 320, 0, 10, 20]);
        assert_eq!(served.load(Ordering::Relaxed), 1);
        server.shutdown(Duration::ZERO).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_is_capped_at_one_second() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let acceptor = Scripted {
            script: Mutex::new(std::iter::repeat_n(true, 12).collect()),
            calls: calls.clone(),
        };
        let server = Server::new("test", 4, WhenFull::Refuse);
        let _accepting = server.serve(acceptor, |(), _| Some(async {}));
        while calls.lock().unwrap().len() < 13 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let calls = calls.lock().unwrap().clone();
        let last = calls[12] - calls[11];
        assert_eq!(last, BACKOFF_MAX);
        server.shutdown(Duration::ZERO).await;
    }

    #[tokio::test]
    async fn shutdown_closes_the_socket_drains_then_closes() {
        let (listener, addr) = bound().await;
        let server = Server::new("test", 8, WhenFull::Wait);
        let (started_tx, mut started) = mpsc::unbounded_channel::<&'static str>();
        // Connection 1 ends when asked to drain; connection 2 only when closed.
        let n = Arc::new(AtomicUsize::new(0));
        let _accepting = server.serve(listener, move |(stream, _), shutdown: &Shutdown| {
            let shutdown = shutdown.clone();
            let started = started_tx.clone();
            let polite = n.fetch_add(1, Ordering::Relaxed) == 0;
            Some(async move {
                let _ = started.send("started");
                if polite {
                    shutdown.drain().cancelled().await;
                } else {
                    shutdown.close().cancelled().await;
                }
                drop(stream);
            })
        });
        let mut polite = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .unwrap();
        let mut stubborn = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .unwrap();
        let began = std::time::Instant::now();
        let grace = Duration::from_millis(500);
        let shutdown = server.shutdown(grace);
        tokio::pin!(shutdown);
        // The polite one is closed while the grace still runs …
        let mut buf = Vec::new();
        tokio::select! {
            _ = &mut shutdown => panic!("shut down before the drain"),
            r = tokio::time::timeout(PATIENCE, polite.read_to_end(&mut buf)) => {
                assert_eq!(r.expect("not drained").unwrap_or(0), 0);
            }
        }
        // … the stubborn one when the grace is over, and then the shutdown is complete.
        tokio::time::timeout(PATIENCE, &mut shutdown)
            .await
            .expect("shutdown did not finish");
        assert!(began.elapsed() >= grace);
        let n = tokio::time::timeout(PATIENCE, stubborn.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The socket is closed: nobody accepts any more.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_without_open_connections_does_not_wait_for_the_grace() {
        let (listener, _addr) = bound().await;
        let server = Server::new("test", 8, WhenFull::Wait);
        let _accepting = server.serve(listener, |(_stream, _), _| Some(async {}));
        let began = std::time::Instant::now();
        server.shutdown(Duration::from_secs(120)).await;
        assert!(began.elapsed() < PATIENCE, "waited for the grace");
    }

    #[tokio::test]
    async fn a_second_socket_shares_the_slots_and_stopping_the_first_keeps_its_connections() {
        let (first, first_addr) = bound().await;
        let (second, second_addr) = bound().await;
        let server = Server::new("test", 1, WhenFull::Wait);
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let mut one = server.serve(first, holding(started_tx.clone(), release.clone()));
        let _two = server.serve(second, holding(started_tx, release.clone()));
        let mut held = TcpStream::connect(first_addr).await.unwrap();
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .unwrap();
        // The only slot is taken: the second socket does not serve either.
        let _waiting = TcpStream::connect(second_addr).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), started.recv())
                .await
                .is_err()
        );
        // Closing the first socket leaves its connection open …
        one.stop().await;
        one.stop().await;
        assert!(TcpStream::connect(first_addr).await.is_err());
        held.write_all(b"x").await.unwrap();
        // … and its slot, once given back, serves the second socket's client.
        release.notify_one();
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .expect("the second socket's client was not served");
        release.notify_waiters();
        server.shutdown(Duration::ZERO).await;
    }

    #[tokio::test]
    async fn resize_grows_and_shrinks_the_slots() {
        let server = Server::new("test", 2, WhenFull::Wait);
        server.resize(5);
        assert_eq!(server.slots.available_permits(), 5);
        server.resize(3);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while server.slots.available_permits() != 3 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn a_quota_caps_each_key_and_gives_back_on_drop() {
        let quota = Quota::default();
        let a1 = quota.take("a", 2).unwrap();
        let a2 = quota.take("a", 2).unwrap();
        assert!(quota.take("a", 2).is_none());
        assert!(quota.take("b", 2).is_some());
        assert!(quota.take("c", 0).is_none());
        drop(a1);
        assert!(quota.take("a", 2).is_some());
        drop(a2);
        // Nothing is left behind for keys with no connection.
        let left: Vec<(&str, usize)> = quota.0.lock().unwrap().clone().into_iter().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    fn ok_handler(_req: Request<Incoming>) -> std::future::Ready<Response<Body>> {
        use http_body_util::{BodyExt, Full};
        std::future::ready(Response::new(
            Full::new(bytes::Bytes::from("fine\n")).boxed(),
        ))
    }

    const LIMITS: HttpLimits = HttpLimits {
        header_timeout: Duration::from_secs(30),
        max_head: 16 * 1024,
        lifetime: None,
    };

    #[tokio::test]
    async fn http_answers_a_client_that_half_closed_after_its_request() {
        let (listener, addr) = bound().await;
        let server = Server::new("test", 4, WhenFull::Refuse);
        // An answer that takes a moment (a reload, a status built under load): the client's
        // end of stream arrives before it, and must not cancel it.
        let slow = |req| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ok_handler(req).await
        };
        let _accepting = server.serve(listener, move |(stream, _), shutdown: &Shutdown| {
            let shutdown = shutdown.clone();
            Some(async move { http1(stream, LIMITS, &shutdown, slow).await })
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, client.read_to_end(&mut answer))
            .await
            .expect("no answer and no close")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("fine\n"), "{answer}");
        server.shutdown(Duration::ZERO).await;
    }

    #[tokio::test]
    async fn http_shutdown_closes_an_idle_keep_alive_connection_at_once() {
        let (listener, addr) = bound().await;
        let server = Server::new("test", 4, WhenFull::Refuse);
        let _accepting = server.serve(listener, |(stream, _), shutdown: &Shutdown| {
            let shutdown = shutdown.clone();
            Some(async move { http1(stream, LIMITS, &shutdown, ok_handler).await })
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        // Keep-alive and idle: the drain closes it without waiting for the grace.
        let began = std::time::Instant::now();
        server.shutdown(Duration::from_secs(120)).await;
        assert!(began.elapsed() < PATIENCE);
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, client.read_to_end(&mut rest))
            .await
            .expect("not closed");
    }
}
