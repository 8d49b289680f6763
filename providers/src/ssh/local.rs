//! Local forwards (`-L` without a local port): every `dial()` opens a `direct-tcpip` channel to
//! `to` as seen from the server, on a pooled session, and hands it over as a byte stream.
//!
//! The tunnel holds a lease on one session so that it has something to watch: when that
//! session dies, [`Tunnel::closed`] resolves at once. Dials go wherever the pool has room; when
//! the held session has passed `max_age`, the lease moves to the session of the next dial, so
//! the old one can close once its channels are done.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::Resolved;
use super::pool::{ChannelKind, Lease, SshPool};
use super::provider::{ping, split_host_port};
use super::session::Session;
use super::stream::SshStream;
use crate::util::lock;
use crate::{Dial, Endpoint, Health, ProviderError, Tunnel};

/// A running local forward.
pub(crate) struct LocalTunnel {
    pool: SshPool,
    resolved: Arc<Resolved>,
    to: String,
    to_host: String,
    to_port: u16,
    lease: Mutex<Option<Lease>>,
    /// The session the lease is on (`None` once stopped), for `closed()` watchers.
    current: watch::Sender<Option<Arc<Session>>>,
    stopped: CancellationToken,
}

impl LocalTunnel {
    /// Gets (or opens) a session to the server; no channel is opened until the first dial.
    pub(crate) async fn start(
        pool: &SshPool,
        resolved: Arc<Resolved>,
        to: &str,
    ) -> crate::Result<LocalTunnel> {
        let (to_host, to_port) = split_host_port(to, "local_forward.to", false)?;
        let lease = pool.lease(&resolved).await?;
        let (current, _) = watch::channel(Some(lease.session.clone()));
        Ok(LocalTunnel {
            pool: pool.clone(),
            resolved,
            to: to.to_string(),
            to_host,
            to_port,
            lease: Mutex::new(Some(lease)),
            current,
            stopped: CancellationToken::new(),
        })
    }

    fn lease(&self) -> MutexGuard<'_, Option<Lease>> {
        lock(&self.lease)
    }

    /// The held session, if the tunnel is usable.
    fn session(&self) -> crate::Result<Arc<Session>> {
        if self.stopped.is_cancelled() {
            return Err(ProviderError::Closed("stopped".to_string()));
        }
        let session = self
            .lease()
            .as_ref()
            .map(|lease| lease.session.clone())
            .ok_or_else(|| ProviderError::Closed("stopped".to_string()))?;
        if session.shared.closed.is_cancelled() {
            return Err(ProviderError::Closed(session.shared.reason()));
        }
        Ok(session)
    }

    /// Moves the lease to `fresh` when the held session is past `max_age`.
    fn maybe_move_lease(&self, fresh: &Arc<Session>) {
        let mut slot = self.lease();
        let Some(held) = slot.as_ref() else { return };
        if Arc::ptr_eq(&held.session, fresh)
            || Instant::now() < held.session.shared.created + self.resolved.target.max_age
        {
            return;
        }
        if let Some(lease) = Lease::on(fresh) {
            *slot = Some(lease);
            self.current.send_replace(Some(fresh.clone()));
        }
    }
}

#[async_trait]
impl Tunnel for LocalTunnel {
    /// `to`, the address the server connects to.
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.to.clone(),
        }
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        self.session()?;
        let (host, port) = (self.to_host.clone(), self.to_port);
        let what = format!("direct-tcpip channel to {}", self.to);
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
        self.maybe_move_lease(&session);
        Ok(Dial::Stream(Box::new(SshStream::new(
            channel,
            &session.shared,
            guard,
        ))))
    }

    async fn check(&self) -> crate::Result<Health> {
        let session = self.session()?;
        ping(&session, &self.resolved).await
    }

    async fn closed(&self) -> String {
        let mut current = self.current.subscribe();
        loop {
            let Some(session) = current.borrow_and_update().clone() else {
                return "stopped".to_string();
            };
            tokio::select! {
                _ = session.shared.closed.cancelled() => {
                    let still_held = current
                        .borrow()
                        .as_ref()
                        .is_some_and(|held| Arc::ptr_eq(held, &session));
                    if still_held {
                        return session.shared.reason();
                    }
                }
                changed = current.changed() => {
                    if changed.is_err() {
                        return "stopped".to_string();
                    }
                }
                _ = self.stopped.cancelled() => return "stopped".to_string(),
            }
        }
    }

    async fn stop(&self) {
        self.stopped.cancel();
        let lease = self.lease().take();
        self.current.send_replace(None);
        drop(lease);
    }
}
