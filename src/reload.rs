//! What a reload changes, decided before anything is touched.
//!
//! [`plan`] compares the configuration that runs with the one just read and says, per
//! service, per tunnel, per listener and per router, what must start, stop, restart or be
//! updated in place. It is pure (no I/O, no clock), so every rule of a reload is unit-tested
//! here; the daemon ([`crate::daemon`]) and each service ([`crate::service`]) only carry the
//! plan out: bind, stop, start.

use crate::config::spec::{Config, ListenAddress, ServiceSpec, TunnelSpec};

/// Everything a reload does, in the order the daemon applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Services that stop (first: they may free addresses and ports the others need).
    pub removed_services: Vec<String>,
    /// Every service of the new configuration, in its order, with what happens to it.
    pub services: Vec<ServicePlan>,
    /// Routers: started, stopped, restarted with new settings.
    pub routers: Changes,
    /// Whether `daemon.readers` changed (open control connections re-check their access).
    pub readers_changed: bool,
}

/// What happens to one service of the new configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    /// Service name.
    pub name: String,
    /// What happens to it.
    pub step: ServiceStep,
}

/// What happens to one service.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceStep {
    /// New: started (its listener, if any, is bound first).
    Start,
    /// Same settings, same tunnels: left alone.
    Keep,
    /// Updated in place.
    Update(ServiceUpdate),
}

/// How a kept service changes in place.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUpdate {
    /// A service-level setting (policy, settle, listener, hooks, …) changed.
    pub settings_changed: bool,
    /// Its tunnels.
    pub tunnels: TunnelPlan,
    /// Its listener.
    pub listener: ListenerStep,
    /// Its hooks changed: they are restarted.
    pub hooks_changed: bool,
}

/// What happens to a service's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerStep {
    /// It has none, before or after.
    None,
    /// Same address: new settings (if any) apply to new connections.
    Update,
    /// It moves to a new address; the connections it holds go on.
    Rebind,
    /// A listener where there was none.
    Start,
    /// No listener any more: no new connections, the open ones go on.
    Retire,
}

/// What happens to each tunnel of a kept service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelPlan {
    /// Per tunnel of the new spec, in its order.
    pub steps: Vec<TunnelStep>,
    /// Indexes (in the old spec) of the tunnels that stop for good.
    pub removed: Vec<usize>,
}

/// What happens to one tunnel of the new spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelStep {
    /// Unchanged: the tunnel at this index of the old spec keeps its task, process and state.
    Keep(usize),
    /// Changed: the tunnel at this index of the old spec stops, then starts afresh.
    Restart(usize),
    /// New: starts.
    Start,
}

/// Names that were added, removed or changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Changes {
    /// Added.
    pub added: Vec<String>,
    /// Removed.
    pub removed: Vec<String>,
    /// Changed.
    pub changed: Vec<String>,
}

impl Changes {
    fn extend(&mut self, other: Changes) {
        self.added.extend(other.added);
        self.removed.extend(other.removed);
        self.changed.extend(other.changed);
    }
}

/// Decides what a reload from `old` (what runs) to `new` (the file just read) does.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let removed_services = old
        .services
        .iter()
        .filter(|s| !new.services.iter().any(|n| n.name == s.name))
        .map(|s| s.name.clone())
        .collect();
    let services = new
        .services
        .iter()
        .map(|spec| ServicePlan {
            name: spec.name.clone(),
            step: match old.services.iter().find(|s| s.name == spec.name) {
                None => ServiceStep::Start,
                Some(running) if running == spec => ServiceStep::Keep,
                Some(running) => ServiceStep::Update(service_update(running, spec)),
            },
        })
        .collect();
    let mut routers = Changes::default();
    for spec in &new.routers {
        match old.routers.iter().find(|r| r.name == spec.name) {
            None => routers.added.push(spec.name.clone()),
            Some(running) if running != spec => routers.changed.push(spec.name.clone()),
            Some(_) => {}
        }
    }
    routers.removed = old
        .routers
        .iter()
        .filter(|r| !new.routers.iter().any(|n| n.name == r.name))
        .map(|r| r.name.clone())
        .collect();
    Plan {
        removed_services,
        services,
        routers,
        readers_changed: old.daemon.readers != new.daemon.readers,
    }
}

/// How `running` becomes `next`, two specs of the same service.
pub fn service_update(running: &ServiceSpec, next: &ServiceSpec) -> ServiceUpdate {
    let settings = |s: &ServiceSpec| ServiceSpec {
        tunnels: Vec::new(),
        ..s.clone()
    };
    let listener = match (&running.listen, &next.listen) {
        (None, None) => ListenerStep::None,
        (Some(_), None) => ListenerStep::Retire,
        (None, Some(_)) => ListenerStep::Start,
        (Some(a), Some(b)) if a.address == b.address => ListenerStep::Update,
        (Some(_), Some(_)) => ListenerStep::Rebind,
    };
    ServiceUpdate {
        settings_changed: settings(running) != settings(next),
        tunnels: tunnels(&running.tunnels, &next.tunnels),
        listener,
        hooks_changed: running.hooks != next.hooks,
    }
}

/// Matches tunnels by name: equal settings keep their task, different ones restart, the rest
/// start or stop.
pub fn tunnels(running: &[TunnelSpec], next: &[TunnelSpec]) -> TunnelPlan {
    let steps = next
        .iter()
        .map(|t| match running.iter().position(|r| r.name == t.name) {
            Some(i) if running[i] == *t => TunnelStep::Keep(i),
            Some(i) => TunnelStep::Restart(i),
            None => TunnelStep::Start,
        })
        .collect();
    let removed = running
        .iter()
        .enumerate()
        .filter(|(_, r)| !next.iter().any(|t| t.name == r.name))
        .map(|(i, _)| i)
        .collect();
    TunnelPlan { steps, removed }
}

impl TunnelPlan {
    /// The tunnels it starts, removes and restarts, named `SERVICE/TUNNEL`.
    pub fn changes(&self, service: &str, running: &[TunnelSpec], next: &[TunnelSpec]) -> Changes {
        let qualified = |t: &TunnelSpec| format!("{service}/{}", t.name);
        let mut changes = Changes::default();
        for (step, tunnel) in self.steps.iter().zip(next) {
            match step {
                TunnelStep::Keep(_) => {}
                TunnelStep::Restart(_) => changes.changed.push(qualified(tunnel)),
                TunnelStep::Start => changes.added.push(qualified(tunnel)),
            }
        }
        changes.removed = self
            .removed
            .iter()
            .filter_map(|&i| running.get(i))
            .map(qualified)
            .collect();
        changes
    }
}

impl Plan {
    /// What the reload reports: services (`NAME`), tunnels (`SERVICE/TUNNEL`) and routers
    /// (`router:NAME`) added, removed and changed (settings of their own, or restarted).
    pub fn changes(&self, old: &Config, new: &Config) -> Changes {
        let mut all = Changes {
            removed: self.removed_services.clone(),
            ..Changes::default()
        };
        for (service, spec) in self.services.iter().zip(&new.services) {
            match &service.step {
                ServiceStep::Start => all.added.push(service.name.clone()),
                ServiceStep::Keep => {}
                ServiceStep::Update(update) => {
                    if update.settings_changed {
                        all.changed.push(service.name.clone());
                    }
                    let running = old
                        .services
                        .iter()
                        .find(|s| s.name == service.name)
                        .map_or(&[][..], |s| &s.tunnels[..]);
                    all.extend(update.tunnels.changes(&service.name, running, &spec.tunnels));
                }
            }
        }
        let router = |names: &[String]| names.iter().map(|n| format!("router:{n}")).collect();
        all.extend(Changes {
            added: router(&self.routers.added),
            removed: router(&self.routers.removed),
            changed: router(&self.routers.changed),
        });
        all
    }

    /// Services whose new listener address must be bound before anything changes, so that a
    /// taken port refuses the whole reload. An address one of the running listeners holds is
    /// not among them: it is rebound once its holder has let it go.
    pub fn binds_first<'a>(&self, old: &Config, new: &'a Config) -> Vec<(&'a str, &'a ListenAddress)> {
        let held: Vec<&ListenAddress> = old
            .services
            .iter()
            .filter_map(|s| s.listen.as_ref().map(|l| &l.address))
            .collect();
        self.services
            .iter()
            .zip(&new.services)
            .filter(|(plan, _)| match &plan.step {
                ServiceStep::Start => true,
                ServiceStep::Keep => false,
                ServiceStep::Update(u) => {
                    matches!(u.listener, ListenerStep::Rebind | ListenerStep::Start)
                }
            })
            .filter_map(|(_, spec)| Some((spec.name.as_str(), &spec.listen.as_ref()?.address)))
            .filter(|(_, address)| !held.contains(address))
            .collect()
    }
}

/// Daemon settings a reload cannot apply in place, where the file (`new`) differs from what
/// runs (`booted`, the configuration the daemon started with); they take effect at the next
/// start. Compared against what runs, not the previous file: a setting changed and then
/// reverted before a restart needs no restart.
pub fn restart_required(booted: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if booted.daemon.control_socket != new.daemon.control_socket {
        keys.push("daemon.control_socket".to_owned());
    }
    if booted.daemon.state_dir != new.daemon.state_dir {
        keys.push("daemon.state_dir".to_owned());
    }
    if booted.daemon.metrics_listen != new.daemon.metrics_listen {
        keys.push("daemon.metrics_listen".to_owned());
    }
    if booted.nameservers != new.nameservers {
        keys.push("dns.nameservers".to_owned());
    }
    keys
}
