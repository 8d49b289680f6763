//! The `ssh` provider: brings up a remote (`-R`) or local (`-L`) forward on a pooled session.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::config::{self, Resolved};
use super::pool::SshPool;
use super::session::Session;
use super::spec::{Forward, SshSpec};
use super::{local, remote};
use crate::{Health, Provider, ProviderError, StartContext, Tunnel};

/// Brings up `ssh` tunnels on the shared [`SshPool`].
#[derive(Debug)]
pub struct SshProvider {
    spec: SshSpec,
    pool: SshPool,
}

impl SshProvider {
    /// A provider for one tunnel's settings, using the daemon's pool.
    pub fn new(spec: SshSpec, pool: SshPool) -> Self {
        SshProvider { spec, pool }
    }
}

#[async_trait]
impl Provider for SshProvider {
    /// Gets a session to the server (connecting and logging in if the pool has none), then sets
    /// up the forward: a remote forward asks the server to listen; a local forward needs nothing
    /// more until the first dial.
    async fn start(&self, ctx: &StartContext) -> crate::Result<Arc<dyn Tunnel>> {
        let resolved = Arc::new(config::resolve(&self.spec.target)?);
        match &self.spec.forward {
            Forward::Remote { bind, to } => {
                let tunnel =
                    remote::RemoteTunnel::start(&self.pool, resolved, bind, to, ctx).await?;
                Ok(Arc::new(tunnel))
            }
            Forward::Local { to } => {
                let tunnel = local::LocalTunnel::start(&self.pool, resolved, to).await?;
                Ok(Arc::new(tunnel))
            }
        }
    }
}

/// Splits `host:port` (`[v6]:port`); `allow_empty_host` admits `:port` and `*:port` (a remote
/// bind address meaning "all interfaces").
pub(crate) fn split_host_port(
    value: &str,
    what: &str,
    allow_empty_host: bool,
) -> Result<(String, u16), ProviderError> {
    let invalid =
        |why: &str| ProviderError::Config(format!("{what} `{value}` is not host:port ({why})"));
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| invalid("unclosed `[`"))?;
        let port = tail
            .strip_prefix(':')
            .ok_or_else(|| invalid("missing port"))?;
        (host, port)
    } else {
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| invalid("missing port"))?;
        if host.contains(':') {
            return Err(invalid("IPv6 addresses need brackets: [addr]:port"));
        }
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid("port is not a number from 0 to 65535"))?;
    if host.is_empty() && !allow_empty_host {
        return Err(invalid("empty host"));
    }
    Ok((host.to_string(), port))
}

/// `host:port`, bracketing IPv6 hosts.
pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The native check: one SSH round trip on the tunnel's session, as its latency.
pub(crate) async fn ping(session: &Session, resolved: &Resolved) -> crate::Result<Health> {
    if session.shared.closed.is_cancelled() {
        return Err(ProviderError::Closed(session.shared.reason()));
    }
    // A healthy server answers within a keepalive interval; allow the connect budget too.
    let limit = resolved
        .target
        .keepalive_interval
        .max(resolved.target.connect_timeout)
        .max(Duration::from_millis(100));
    let started = Instant::now();
    match tokio::time::timeout(limit, session.ping()).await {
        Ok(Ok(())) if !session.shared.closed.is_cancelled() => Ok(Health {
            latency: Some(started.elapsed()),
            detail: None,
        }),
        // russh reports success when the connection died while waiting.
        Ok(_) => Err(ProviderError::Closed(session.shared.reason())),
        Err(_) => Err(ProviderError::Unhealthy(format!(
            "no answer to an ssh ping from {} within {limit:?}",
            resolved.key
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:22", "to", false).expect("v4"),
            ("127.0.0.1".to_string(), 22)
        );
        assert_eq!(
            split_host_port("[::1]:2222", "to", false).expect("v6"),
            ("::1".to_string(), 2222)
        );
        assert_eq!(
            split_host_port(":0", "bind", true).expect("empty"),
            (String::new(), 0)
        );
        assert!(split_host_port(":22", "to", false).is_err());
        assert!(split_host_port("host", "to", false).is_err());
        assert!(split_host_port("::1:22", "to", false).is_err());
        assert!(split_host_port("h:99999", "to", false).is_err());
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
    }
}
