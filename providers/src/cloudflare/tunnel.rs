//! A running cloudflared: where its streams go, its health, and the end of it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::api::{listening_in_procfs, read_ready};
use super::{describe_exit, drain, Recent, API_TIMEOUT, READY_CACHE};
use crate::process::{ExitInfo, Supervised};
use crate::util::lock;
use crate::{dial_tcp, Dial, Endpoint, Health, ProviderError, Resolver, Tunnel};

/// Where a running tunnel's streams go.
#[derive(Debug)]
pub(super) enum Route {
    /// Through Cloudflare's edge to the public hostname; health from the metrics server.
    Edge {
        metrics: SocketAddr,
        /// `hostname:port`, resolved afresh on every dial.
        target: String,
    },
    /// Through the local `cloudflared access tcp` listener.
    Access { listener: SocketAddr },
}

/// A running cloudflared.
pub(super) struct CloudflareTunnel {
    pub(super) child: Supervised,
    pub(super) hostname: String,
    pub(super) route: Route,
    pub(super) resolver: Resolver,
    pub(super) stop_grace: Duration,
    /// When `/ready` last said ready (edge dials within [`READY_CACHE`] of it skip asking).
    pub(super) ready_at: std::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for CloudflareTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareTunnel")
            .field("pid", &self.child.pid())
            .field("hostname", &self.hostname)
            .field("route", &self.route)
            .finish()
    }
}

impl CloudflareTunnel {
    /// Why the tunnel is gone: how cloudflared ended, and its telling last words.
    async fn describe(&self, info: &ExitInfo) -> String {
        let mut lines = self.child.lines();
        let mut seen = Recent::default();
        drain(&mut lines, &mut seen).await;
        describe_exit(info, &seen.as_vec(), "")
    }
}

#[async_trait]
impl Tunnel for CloudflareTunnel {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.hostname.clone(),
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(info) = self.child.try_exited() {
            return Err(ProviderError::Closed(self.describe(&info).await));
        }
        match &self.route {
            Route::Edge { target, metrics } => {
                // The edge answers with error 1033 while no connector is registered: only
                // cloudflared's own readiness says the hostname leads to the service.
                let fresh = lock(&self.ready_at).is_some_and(|at| at.elapsed() < READY_CACHE);
                if !fresh {
                    read_ready(*metrics, API_TIMEOUT)
                        .await
                        .map_err(ProviderError::Unhealthy)?;
                    *lock(&self.ready_at) = Some(Instant::now());
                }
                // Names are looked up afresh: Cloudflare's anycast answers may change.
                self.resolver.dial(target, timeout).await
            }
            Route::Access { listener } => dial_tcp(*listener, timeout).await,
        }
    }

    async fn check(&self) -> crate::Result<Health> {
        if let Some(info) = self.child.try_exited() {
            return Err(ProviderError::Closed(self.describe(&info).await));
        }
        match &self.route {
            Route::Edge { metrics, .. } => match read_ready(*metrics, API_TIMEOUT).await {
                Ok(n) => Ok(Health {
                    latency: None,
                    detail: Some(format!("{n} edge connections")),
                }),
                Err(why) => Err(ProviderError::Unhealthy(why)),
            },
            Route::Access { listener } => match listening_in_procfs(*listener) {
                Ok(false) => Err(ProviderError::Unhealthy(format!(
                    "cloudflared no longer listens on {listener}"
                ))),
                // Without procfs there is no side-effect-free check; the child is alive.
                Ok(true) | Err(_) => Ok(Health::default()),
            },
        }
    }

    async fn closed(&self) -> String {
        let info = self.child.exited().await;
        self.describe(&info).await
    }

    async fn stop(&self) {
        self.child.terminate(self.stop_grace).await;
    }
}
