//! A running agent with its public URL: dials gated by the agent's own view, health, stop.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::process::{self, Supervised};
use crate::util::lock;
use crate::{Dial, Endpoint, Health, ProviderError, Resolver, Tunnel};

use super::*;

/// A running agent with its public URL.
pub(super) struct NgrokTunnel {
    pub(super) child: Supervised,
    /// The public URL, as the agent reported it.
    pub(super) url: String,
    /// `host:port` that `dial()` connects to.
    pub(super) target: String,
    /// The agent's local API.
    pub(super) web_addr: SocketAddr,
    pub(super) resolver: Resolver,
    pub(super) stop_grace: Duration,
    pub(super) log: watch::Receiver<LogState>,
    /// Set by the reconnect watch when the agent stayed offline past `reconnect_grace`.
    pub(super) dead: watch::Receiver<Option<String>>,
    /// The reconnect watch, ended on stop.
    pub(super) watch: tokio::task::JoinHandle<()>,
    /// When `/api/status` last said `online` (dials within [`ONLINE_CACHE`] of it skip asking).
    pub(super) online_at: Mutex<Option<Instant>>,
    /// Taken (and so removed) on stop; also removed if the tunnel is dropped unstopped.
    pub(super) config: Mutex<Option<ConfigFile>>,
    /// Only for scrubbing reasons.
    pub(super) token: Secret,
}

impl NgrokTunnel {
    /// Why the tunnel is unusable, if it is: the agent's exit, or a session that did not come
    /// back in time.
    pub(super) fn closed_now(&self) -> Option<String> {
        if let Some(info) = self.child.try_exited() {
            return Some(self.exit_reason(&info));
        }
        self.dead
            .borrow()
            .clone()
            .map(|why| self.token.redact(&why))
    }

    pub(super) fn exit_reason(&self, info: &process::ExitInfo) -> String {
        let mut reason = match self.child.last_line() {
            Some(line) => format!("ngrok {info}; last output line: {line:?}"),
            None => format!("ngrok {info}"),
        };
        if let Some(err) = self.log.borrow().error.clone() {
            reason.push_str(&format!("; its last error: {err}"));
        }
        self.token.redact(&reason)
    }

    /// The agent's `/api/status`, its last error line added to a failure.
    pub(super) async fn online(&self) -> crate::Result<Health> {
        let answer = agent_online(self.web_addr).await;
        match answer {
            Ok(health) => {
                *lock(&self.online_at) = Some(Instant::now());
                Ok(health)
            }
            Err(ProviderError::Unhealthy(why)) => {
                let err = self.log.borrow().error.clone();
                Err(ProviderError::Unhealthy(match err {
                    Some(err) => self.token.redact(&format!("{why}; last error: {err}")),
                    None => why,
                }))
            }
            Err(other) => Err(other),
        }
    }
}

#[async_trait]
impl Tunnel for NgrokTunnel {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            display: self.url.clone(),
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    /// Connects to the public address, but only while the agent says its session is
    /// `online`: ngrok's edge accepts for an offline endpoint too (ERR_NGROK_3200).
    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(reason) = self.closed_now() {
            return Err(ProviderError::Closed(reason));
        }
        let fresh = lock(&self.online_at).is_some_and(|at| at.elapsed() < ONLINE_CACHE);
        if !fresh {
            match self.online().await {
                // The agent says its session is down: the edge would only serve its error page.
                Err(ProviderError::Unhealthy(why)) if !why.contains(API_UNREACHABLE) => {
                    return Err(ProviderError::Unhealthy(why))
                }
                // Healthy, or no answer from the API at all: then the connect judges alone.
                _ => {}
            }
        }
        // Looked up afresh each time: the edge's addresses move.
        self.resolver.dial(&self.target, timeout).await
    }

    async fn check(&self) -> crate::Result<Health> {
        if let Some(reason) = self.closed_now() {
            return Err(ProviderError::Closed(reason));
        }
        self.online().await
    }

    async fn closed(&self) -> String {
        let mut dead = self.dead.clone();
        tokio::select! {
            info = self.child.exited() => self.exit_reason(&info),
            why = async {
                let seen = dead
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|why| why.clone());
                match seen {
                    Some(why) => why,
                    // The watch ended without a verdict: only the exit can answer.
                    None => std::future::pending().await,
                }
            } => self.token.redact(&why),
        }
    }

    async fn stop(&self) {
        self.watch.abort();
        self.child.terminate(self.stop_grace).await;
        let config = lock(&self.config).take();
        drop(config);
    }
}

impl Drop for NgrokTunnel {
    fn drop(&mut self) {
        self.watch.abort();
    }
}
