//! What the data plane reads of a service: its tunnels as they run and the current primary.
//!
//! The service ([`crate::service`]) writes these; the listener ([`crate::forward`]) only reads
//! them. Keeping them apart from both is what lets the two modules not know each other.

use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, watch};
use tunnelkeeper_providers::Tunnel;

/// The running instance of a tunnel, shared between its task (which sets it while it runs)
/// and the data plane (which dials through it).
pub type LiveTunnel = Arc<RwLock<Option<Arc<dyn Tunnel>>>>;

/// The current primary of a service, published for the data plane (and tests).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Primary {
    /// Elected tunnel name.
    pub tunnel: Option<String>,
    /// True when it is only a fallback.
    pub degraded: bool,
    /// The order in which a new connection tries tunnels (see [`crate::election::dial_order`]).
    pub order: Vec<String>,
}

/// One tunnel as the data plane sees it: its running instance and where to report failures
/// that real traffic meets on it.
#[derive(Clone)]
pub struct Route {
    /// Tunnel name.
    pub name: String,
    live: LiveTunnel,
    passive: mpsc::UnboundedSender<String>,
}

impl Route {
    /// A route to the tunnel `name`, running as `live`; failures go to `passive`.
    pub fn new(name: String, live: LiveTunnel, passive: mpsc::UnboundedSender<String>) -> Route {
        Route {
            name,
            live,
            passive,
        }
    }

    /// The running instance, if the tunnel is started.
    pub fn tunnel(&self) -> Option<Arc<dyn Tunnel>> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reports a failure real traffic met on this tunnel; it counts like a failed probe, and a
    /// tunnel that was up is probed at once (see `supervisor::TunnelTask::run`).
    pub fn report_failure(&self, reason: String) {
        let _ = self.passive.send(reason);
    }
}

/// What the data plane needs of a service: its tunnels as they run (the table follows
/// reloads), and the current primary and dial order.
#[derive(Clone)]
pub struct Routes {
    table: Arc<RwLock<Vec<Route>>>,
    /// Primary and dial order.
    pub primary: watch::Receiver<Primary>,
}

impl Routes {
    /// A table of `routes` following `primary`.
    pub fn new(routes: Vec<Route>, primary: watch::Receiver<Primary>) -> Routes {
        Routes {
            table: Arc::new(RwLock::new(routes)),
            primary,
        }
    }

    /// The route and running instance of the tunnel called `name`, if it is started.
    pub fn get(&self, name: &str) -> Option<(Route, Arc<dyn Tunnel>)> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let route = table.iter().find(|r| r.name == name)?;
        let tunnel = route.tunnel()?;
        Some((route.clone(), tunnel))
    }

    /// Tunnel names in config order.
    pub fn names(&self) -> Vec<String> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.iter().map(|r| r.name.clone()).collect()
    }

    /// Replaces the table (after a reload or a restart of one tunnel).
    pub fn replace(&self, routes: Vec<Route>) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = routes;
    }
}
