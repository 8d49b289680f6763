//! Remote forwards (`-R`): the server listens on `bind`, and every connection it accepts there
//! comes back over the session as a `forwarded-tcpip` channel, which is bridged to a fresh TCP
//! connection to `to`.
//!
//! The forward lives on one session, held by a lease for the tunnel's whole life (a forward
//! cannot move to another session without a gap, so `max_age` does not apply to it). When that
//! session dies, [`Tunnel::closed`] resolves at once; the supervisor then starts the tunnel
//! again, which asks the server anew. A server that refuses the port (typically because the old
//! session's listener is still bound) fails the start with a clear reason, and the supervisor
//! retries with backoff, like OpenSSH's `ExitOnForwardFailure`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use russh::ChannelOpenFailure;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::config::Resolved;
use super::pool::{ChannelKind, Lease, SshPool};
use super::provider::{join_host_port, ping, split_host_port};
use super::session::{Incoming, IncomingSink, Session, Shared};
use super::stream::{bridge, SshStream};
use crate::util::lock;
use crate::{Dial, Endpoint, Health, ProviderError, Resolver, StartContext, Tunnel};

/// Forwarded connections one tunnel bridges at once; more are refused (resource shortage)
/// rather than piling up tasks and sockets.
const MAX_FORWARDED_CONNECTIONS: usize = 1024;
/// How long stop waits for the server to confirm the forward's cancellation.
const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// Route ids are unique per process, so a late cancellation never removes a newer route.
static NEXT_ROUTE: AtomicU64 = AtomicU64::new(1);

/// A running remote forward.
pub(crate) struct RemoteTunnel {
    pool: SshPool,
    resolved: Arc<Resolved>,
    /// The address as sent in `tcpip-forward` (`""` for all interfaces).
    request_host: String,
    /// The port the server listens on.
    port: u16,
    /// Where `dial()` connects on the server to reach the forward.
    dial_host: String,
    route: u64,
    session: Arc<Session>,
    lease: Mutex<Option<Lease>>,
    /// Cancelled by `stop()`: ends the bridges.
    stopped: CancellationToken,
}

impl RemoteTunnel {
    /// Asks the server to listen on `bind` and routes its connections to `to`.
    pub(crate) async fn start(
        pool: &SshPool,
        resolved: Arc<Resolved>,
        bind: &str,
        to: &str,
        ctx: &StartContext,
    ) -> crate::Result<RemoteTunnel> {
        let (bind_host, bind_port) = split_host_port(bind, "remote_forward.bind", true)?;
        // Validate `to` now: a typo should fail the start, not every forwarded connection.
        split_host_port(to, "remote_forward.to", false)?;
        // OpenSSH's client sends "" for "all interfaces" whether written `*` or left empty.
        let request_host = if bind_host == "*" {
            String::new()
        } else {
            bind_host.clone()
        };
        let dial_host = match request_host.as_str() {
            "" | "0.0.0.0" => "127.0.0.1".to_string(),
            "::" => "::1".to_string(),
            other => other.to_string(),
        };

        let lease = pool.lease(&resolved).await?;
        let session = lease.session.clone();
        let stopped = CancellationToken::new();
        let route = NEXT_ROUTE.fetch_add(1, Ordering::Relaxed);
        let forwarder = Arc::new(Forwarder {
            to: to.to_string(),
            resolver: ctx.resolver.clone(),
            connect_timeout: resolved.target.connect_timeout,
            limit: Arc::new(Semaphore::new(MAX_FORWARDED_CONNECTIONS)),
            shared: Arc::downgrade(&session.shared),
            stopped: stopped.clone(),
            tag: ctx.tag(),
        });
        let sink: IncomingSink = Arc::new(move |incoming| {
            let forwarder = forwarder.clone();
            tokio::spawn(async move { forwarder.serve(incoming).await });
        });
        session
            .shared
            .add_route(route, &request_host, u32::from(bind_port), sink);

        let requested = join_host_port(&bind_host, bind_port);
        let result = tokio::time::timeout(
            resolved.target.connect_timeout,
            session.tcpip_forward(&request_host, bind_port),
        )
        .await;
        let failed = |detail: String| ProviderError::Ssh {
            target: resolved.key.to_string(),
            detail,
        };
        let port = match result {
            Ok(Ok(port)) => port,
            Ok(Err(russh::Error::RequestDenied)) => {
                session.shared.remove_route(route);
                return Err(failed(format!(
                    "remote port {requested} refused by the server (still bound?)"
                )));
            }
            Ok(Err(err)) => {
                session.shared.remove_route(route);
                let detail = if session.shared.closed.is_cancelled() {
                    session.shared.reason()
                } else {
                    err.to_string()
                };
                return Err(failed(format!("remote forward {requested}: {detail}")));
            }
            Err(_) => {
                session.shared.remove_route(route);
                return Err(ProviderError::Timeout {
                    what: format!("remote forward {requested} on {}", resolved.key),
                    after: resolved.target.connect_timeout,
                });
            }
        };
        session.shared.set_route_port(route, u32::from(port));
        tracing::info!(
            target = %resolved.key,
            bind = %join_host_port(&bind_host, port),
            to,
            "remote forward up"
        );
        Ok(RemoteTunnel {
            pool: pool.clone(),
            resolved,
            request_host,
            port,
            dial_host,
            route,
            session,
            lease: Mutex::new(Some(lease)),
            stopped,
        })
    }

    fn check_usable(&self) -> crate::Result<()> {
        if self.stopped.is_cancelled() {
            return Err(ProviderError::Closed("stopped".to_string()));
        }
        if self.session.shared.closed.is_cancelled() {
            return Err(ProviderError::Closed(self.session.shared.reason()));
        }
        Ok(())
    }
}

impl Drop for RemoteTunnel {
    /// A tunnel dropped without `stop()` still releases its port on the server.
    fn drop(&mut self) {
        if self.stopped.is_cancelled() {
            return;
        }
        self.stopped.cancel();
        self.session.shared.remove_route(self.route);
        let lease = lock(&self.lease).take();
        if let (Some(lease), Ok(runtime)) = (lease, tokio::runtime::Handle::try_current()) {
            let (host, port) = (self.request_host.clone(), self.port);
            runtime.spawn(async move {
                let _ = tokio::time::timeout(
                    CANCEL_WAIT,
                    lease.session.cancel_tcpip_forward(&host, port),
                )
                .await;
            });
        }
    }
}

#[async_trait]
impl Tunnel for RemoteTunnel {
    /// The server's host and the port it listens on.
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: join_host_port(&self.resolved.key.host, self.port),
        }
    }

    /// A `direct-tcpip` channel to the forwarded port as seen from the server: the stream goes
    /// into the server's listener, back through the forward, and on to `to` — the whole path.
    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        self.check_usable()?;
        let host = self.dial_host.clone();
        let port = self.port;
        let what = format!(
            "direct-tcpip channel to {} (the forwarded port)",
            join_host_port(&host, port)
        );
        let (channel, guard, session) = self
            .pool
            .open_channel_within(
                &self.resolved,
                ChannelKind::DirectTcpip,
                what,
                timeout,
                move |session| {
                    let host = host.clone();
                    async move { session.open_direct_tcpip(&host, port).await }
                },
            )
            .await?;
        Ok(Dial::Stream(Box::new(SshStream::new(
            channel,
            &session.shared,
            guard,
        ))))
    }

    async fn check(&self) -> crate::Result<Health> {
        self.check_usable()?;
        ping(&self.session, &self.resolved).await
    }

    async fn closed(&self) -> String {
        tokio::select! {
            _ = self.session.shared.closed.cancelled() => self.session.shared.reason(),
            _ = self.stopped.cancelled() => "stopped".to_string(),
        }
    }

    /// Cancels the forward on the server (bounded), ends the bridges, releases the session.
    async fn stop(&self) {
        let lease = lock(&self.lease).take();
        let Some(lease) = lease else { return };
        self.stopped.cancel();
        self.session.shared.remove_route(self.route);
        if !self.session.shared.closed.is_cancelled() {
            let cancel = lease
                .session
                .cancel_tcpip_forward(&self.request_host, self.port);
            if let Ok(Err(err)) = tokio::time::timeout(CANCEL_WAIT, cancel).await {
                tracing::debug!(target = %self.resolved.key, port = self.port, error = %err, "cancel of remote forward failed");
            }
        }
        drop(lease);
    }
}

/// Serves the connections of one remote forward.
struct Forwarder {
    to: String,
    resolver: Resolver,
    connect_timeout: Duration,
    limit: Arc<Semaphore>,
    /// Weak: the route lives inside the session's shared state.
    shared: std::sync::Weak<Shared>,
    stopped: CancellationToken,
    tag: String,
}

impl Forwarder {
    /// Dials `to` first and only then accepts the channel (as OpenSSH does), so a client of
    /// the server's port sees a dead target as a refused connection, not as silence.
    async fn serve(&self, incoming: Incoming) {
        let Incoming {
            channel,
            reply,
            originator,
        } = incoming;
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let id = channel.id();
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            tracing::warn!(tunnel = %self.tag, %originator, "too many forwarded connections; refused");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            shared.channel_rejected(id);
            return;
        };
        let guard = shared.track_channel();
        let dial = tokio::select! {
            dial = self.resolver.dial(&self.to, self.connect_timeout) => Some(dial),
            _ = self.stopped.cancelled() => None,
            _ = shared.closed.cancelled() => None,
        };
        let tcp = match dial {
            Some(Ok(Dial::Tcp(tcp))) => tcp,
            Some(Ok(Dial::Stream(_))) => {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                shared.channel_rejected(id);
                return;
            }
            Some(Err(err)) => {
                tracing::debug!(tunnel = %self.tag, to = %self.to, %originator, error = %err, "forwarded connection: target unreachable");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                shared.channel_rejected(id);
                return;
            }
            None => {
                // Dropping the reply rejects the channel.
                drop(reply);
                shared.channel_rejected(id);
                return;
            }
        };
        reply.accept().await;
        let stream = SshStream::new(channel, &shared, guard);
        drop(shared);
        bridge(stream, tcp, self.stopped.clone()).await;
        drop(permit);
    }
}
