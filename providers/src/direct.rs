//! The `direct` provider: the service is reachable at a plain `host:port` (a LAN address).
//!
//! There is nothing to run and nothing that can die on its own, so the tunnel is "up" as soon
//! as the address resolves, and only probes can tell whether the path works. The name is
//! resolved again on every dial, because a DHCP lease or a DNS record may move.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{Dial, Endpoint, Provider, ProviderError, Resolver, StartContext, Tunnel};

/// How long start may spend resolving the address.
const START_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of a `direct` tunnel.
#[derive(Debug, Clone)]
pub struct DirectSpec {
    /// `host:port` (or `[v6]:port`) of the service.
    pub address: String,
}

/// Brings up `direct` tunnels.
#[derive(Debug)]
pub struct DirectProvider {
    spec: DirectSpec,
}

impl DirectProvider {
    /// A provider for the given settings.
    pub fn new(spec: DirectSpec) -> Self {
        DirectProvider { spec }
    }
}

#[async_trait]
impl Provider for DirectProvider {
    /// Checks that the address resolves; no connection is made.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        ctx.resolver
            .resolve_socket(&self.spec.address, START_RESOLVE_TIMEOUT)
            .await?;
        Ok(Arc::new(DirectTunnel {
            address: self.spec.address.clone(),
            resolver: ctx.resolver.clone(),
            stopped: CancellationToken::new(),
        }))
    }
}

/// A running `direct` tunnel.
struct DirectTunnel {
    address: String,
    resolver: Resolver,
    stopped: CancellationToken,
}

#[async_trait]
impl Tunnel for DirectTunnel {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.address.clone(),
        }
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if self.stopped.is_cancelled() {
            return Err(ProviderError::Closed("stopped".to_string()));
        }
        self.resolver.dial(&self.address, timeout).await
    }

    async fn check(&self) -> crate::Result<crate::Health> {
        if self.stopped.is_cancelled() {
            return Err(ProviderError::Closed("stopped".to_string()));
        }
        Ok(crate::Health::default())
    }

    async fn closed(&self) -> String {
        self.stopped.cancelled().await;
        "stopped".to_string()
    }

    async fn stop(&self) {
        self.stopped.cancel();
    }
}
