//! A running `tailscale` tunnel: the state it shares with its status watcher, the watcher
//! (the hard signal), dials, health and stop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::cli::{Cli, Exposed};
use super::status::{evaluate, Down, PeerView};
use super::MAX_STATUS_FAILURES;
use crate::util::lock;
use crate::{dial_tcp, Dial, Endpoint, Health, ProviderError, Resolver, Tunnel};

/// State shared by the tunnel and its status watcher.
pub(super) struct Shared {
    pub(super) cli: Cli,
    /// Peer mode: the node, as configured.
    pub(super) peer: Option<String>,
    pub(super) port: u16,
    /// Peer mode: where dials go, refreshed by every status read.
    pub(super) peer_addr: Mutex<Option<SocketAddr>>,
    /// The `--timeout` given to `tailscale ping`.
    pub(super) ping_wait: Duration,
    /// Serve/funnel: the handler this tunnel added (and alone removes).
    pub(super) handler: Option<Exposed>,
    /// Why the tunnel closed, once it has.
    pub(super) closed: watch::Sender<Option<String>>,
}

impl Shared {
    /// Records the first reason the tunnel closed; later ones change nothing.
    pub(super) fn close(&self, reason: String) {
        let first = self.closed.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if first {
            tracing::warn!(tunnel = %self.cli.tag, "tailscale tunnel closed: {reason}");
        }
    }

    pub(super) fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Reads the status once (and pings a peer the status shows offline). `Ok(Err(down))` is
    /// a definitive "the path is gone", and closes the tunnel; `Ok(Ok(Some(health)))` carries
    /// the confirming ping's answer; `Err` means the status could not be read at all.
    pub(super) async fn observe(&self) -> crate::Result<Result<Option<Health>, Down>> {
        let status = self.cli.status().await?;
        let seen = evaluate(&status, self.peer.as_deref(), self.port);
        let confirmed = match (seen, &self.peer) {
            (Ok(Some(view)), Some(name)) => {
                match confirm(&self.cli, name, &view, self.ping_wait).await {
                    Ok(health) => {
                        *lock(&self.peer_addr) = Some(view.addr);
                        Ok(health)
                    }
                    Err(down) => Err(down),
                }
            }
            (Ok(_), _) => Ok(None),
            (Err(down), _) => Err(down),
        };
        if let Err(down) = &confirmed {
            self.close(down.to_string());
        }
        Ok(confirmed)
    }
}

/// The status watcher: polls until the path is gone or the tunnel is stopped.
pub(super) async fn watch_status(shared: Arc<Shared>, stop: CancellationToken, interval: Duration) {
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        // Cancelling mid-call drops the run, which kills the CLI's process group.
        let observed = tokio::select! {
            _ = stop.cancelled() => return,
            observed = shared.observe() => observed,
        };
        match observed {
            Ok(Ok(_)) => failures = 0,
            Ok(Err(_down)) => return,
            Err(err) => {
                failures += 1;
                tracing::warn!(tunnel = %shared.cli.tag, failures, "cannot read tailscale status: {err}");
                if failures >= MAX_STATUS_FAILURES {
                    shared.close(format!(
                        "`tailscale status` failed {failures} times in a row; last: {err}"
                    ));
                    return;
                }
            }
        }
    }
}

/// A running `tailscale` tunnel.
pub(super) struct TailscaleTunnel {
    pub(super) shared: Arc<Shared>,
    /// Serve/funnel: the URL the CLI printed.
    pub(super) url: Option<String>,
    pub(super) dial_address: Option<String>,
    pub(super) resolver: Resolver,
    pub(super) stop: CancellationToken,
    /// Taken by the first `stop`.
    pub(super) watcher: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Whether `stop` finished, so `Drop` knows whether an exposure is left behind.
    pub(super) stopped: AtomicBool,
}

#[async_trait]
impl Tunnel for TailscaleTunnel {
    fn endpoint(&self) -> Endpoint {
        let display = match (&self.url, *lock(&self.shared.peer_addr)) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => addr.to_string(),
            (None, None) => String::new(),
        };
        Endpoint { display }
    }

    async fn dial(&self, timeout: Duration) -> crate::Result<Dial> {
        if let Some(reason) = self.shared.closed_reason() {
            return Err(ProviderError::Closed(reason));
        }
        if let Some(address) = &self.dial_address {
            return self.resolver.dial(address, timeout).await;
        }
        if let Some(url) = &self.url {
            // The resolver takes the host of `https://host/` and port 443.
            return self.resolver.dial(url, timeout).await;
        }
        let addr = *lock(&self.shared.peer_addr);
        match addr {
            Some(addr) => dial_tcp(addr, timeout).await,
            None => Err(ProviderError::Closed(
                "the peer's address is unknown".to_string(),
            )),
        }
    }

    async fn check(&self) -> crate::Result<Health> {
        if let Some(reason) = self.shared.closed_reason() {
            return Err(ProviderError::Closed(reason));
        }
        let confirmed = match self.shared.observe().await? {
            Ok(confirmed) => confirmed,
            Err(down) => return Err(ProviderError::Unhealthy(down.to_string())),
        };
        // A peer the status showed offline was pinged already: that answer is the health.
        if let Some(health) = confirmed {
            return Ok(health);
        }
        let addr = *lock(&self.shared.peer_addr);
        match (&self.shared.peer, addr) {
            (Some(peer), Some(addr)) => {
                self.shared
                    .cli
                    .ping(peer, addr.ip(), self.shared.ping_wait)
                    .await
            }
            _ => Ok(Health::default()),
        }
    }

    async fn closed(&self) -> String {
        let mut closed = self.shared.closed.subscribe();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // Cannot happen while `self` holds the sender; say something true anyway.
            Err(_) => "the tailscale tunnel is gone".to_string(),
        };
        reason
    }

    async fn stop(&self) {
        let mut watcher = self.watcher.lock().await;
        let Some(task) = watcher.take() else {
            return;
        };
        // Refuse new dials at once, then end the watcher, then undo what start set up.
        self.shared.close("stopped".to_string());
        self.stop.cancel();
        if let Err(err) = task.await {
            tracing::warn!(tunnel = %self.shared.cli.tag, "tailscale status watcher ended badly: {err}");
        }
        if let Some(handler) = &self.shared.handler {
            if let Err(err) = self.shared.cli.unexpose(handler).await {
                tracing::warn!(tunnel = %self.shared.cli.tag, "cannot turn tailscale {} off: {err}", handler.command);
            }
        }
        self.stopped.store(true, Ordering::SeqCst);
    }
}

impl Drop for TailscaleTunnel {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        // Dropped without `stop`: a funnel left on would keep the port open to the internet,
        // so turn it off in the background if there is still a runtime to do it.
        if let (Some(_), Ok(runtime)) = (
            self.shared.handler.as_ref(),
            tokio::runtime::Handle::try_current(),
        ) {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                if let Some(handler) = &shared.handler {
                    if let Err(err) = shared.cli.unexpose(handler).await {
                        tracing::warn!(tunnel = %shared.cli.tag, "cannot turn tailscale {} off: {err}", handler.command);
                    }
                }
            });
        }
    }
}

/// Confirms a peer the status shows offline with a ping of its Tailscale IP: an answer means
/// the data path works whatever the coordination server thinks (`Ok(Some(health))`). An online
/// peer needs no ping here (`Ok(None)`).
pub(super) async fn confirm(
    cli: &Cli,
    name: &str,
    view: &PeerView,
    wait: Duration,
) -> Result<Option<Health>, Down> {
    if view.online {
        return Ok(None);
    }
    let detail = view
        .last_seen
        .as_ref()
        .map(|at| format!(" (last seen {at})"))
        .unwrap_or_default();
    match cli.ping(name, view.addr.ip(), wait).await {
        Ok(mut health) => {
            tracing::info!(tunnel = %cli.tag, "peer {name} is offline at the coordination server{detail} but answers tailscale ping");
            let shown = health.detail.take().unwrap_or_default();
            health.detail = Some(
                format!("{shown}; offline at the coordination server")
                    .trim_start_matches("; ")
                    .to_string(),
            );
            Ok(Some(health))
        }
        Err(err) => Err(Down::PeerOffline {
            peer: name.to_string(),
            detail: format!("{detail} and does not answer tailscale ping ({err})"),
        }),
    }
}
