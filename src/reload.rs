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
        let qualified = |t: &TunnelSpec| tunnelkeeper_providers::util::log_tag(service, &t.name);
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
                    all.extend(
                        update
                            .tunnels
                            .changes(&service.name, running, &spec.tunnels),
                    );
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
    pub fn binds_first<'a>(
        &self,
        old: &Config,
        new: &'a Config,
    ) -> Vec<(&'a str, &'a ListenAddress)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A configuration with services given as YAML list items and routers as YAML text.
    fn config(services: &str, routers: &str, extra_daemon: &str) -> Config {
        let text = format!(
            "version: 1\n\
             daemon: {{ control_socket: /run/tk.sock, state_dir: /var/lib/tk{extra_daemon} }}\n\
             services:\n{services}\n{routers}"
        );
        crate::config::parse(&text, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn service(name: &str, listen: Option<&str>, tunnels: &[(&str, u32)]) -> String {
        let listen = listen
            .map(|l| format!("    listen: \"{l}\"\n"))
            .unwrap_or_default();
        let tunnels: String = tunnels
            .iter()
            .map(|(t, port)| {
                format!(
                    "      - {{ name: {t}, provider: direct, priority: {port}, address: \"127.0.0.1:{port}\" }}\n"
                )
            })
            .collect();
        format!("  - name: {name}\n{listen}    tunnels:\n{tunnels}")
    }

    fn router(name: &str, host: &str) -> String {
        format!(
            "  - name: {name}\n    ssh: {{ host: {host}, user: root, identity_file: /k, known_hosts: /kh }}\n"
        )
    }

    #[test]
    fn an_unchanged_file_plans_nothing() {
        let a = config(&service("web", Some("127.0.0.1:8080"), &[("a", 1)]), "", "");
        let plan = plan(&a, &a);
        assert!(plan.removed_services.is_empty());
        assert_eq!(plan.services[0].step, ServiceStep::Keep);
        assert_eq!(plan.routers, Changes::default());
        assert!(!plan.readers_changed);
        assert_eq!(plan.changes(&a, &a), Changes::default());
        assert!(plan.binds_first(&a, &a).is_empty());
    }

    #[test]
    fn tunnels_are_kept_restarted_started_and_stopped_by_name_and_settings() {
        let old = config(
            &service("web", None, &[("keep", 1), ("change", 2), ("drop", 3)]),
            "",
            "",
        );
        let new = config(
            &service("web", None, &[("add", 4), ("change", 5), ("keep", 1)]),
            "",
            "",
        );
        let plan = plan(&old, &new);
        let ServiceStep::Update(update) = &plan.services[0].step else {
            panic!("{plan:?}");
        };
        assert!(!update.settings_changed, "only tunnels changed");
        assert!(!update.hooks_changed);
        assert_eq!(update.listener, ListenerStep::None);
        assert_eq!(
            update.tunnels.steps,
            [
                TunnelStep::Start,
                TunnelStep::Restart(1),
                TunnelStep::Keep(0)
            ]
        );
        assert_eq!(update.tunnels.removed, [2]);
        assert_eq!(
            plan.changes(&old, &new),
            Changes {
                added: vec!["web/add".into()],
                removed: vec!["web/drop".into()],
                changed: vec!["web/change".into()],
            }
        );
    }

    #[test]
    fn services_come_and_go_and_a_setting_of_their_own_is_a_change() {
        let old = config(
            &format!(
                "{}{}",
                service("gone", None, &[("a", 1)]),
                service("web", None, &[("a", 1)])
            ),
            "",
            "",
        );
        let mut new = config(
            &format!(
                "{}{}",
                service("web", None, &[("a", 1)]),
                service("new", None, &[("b", 2)])
            ),
            "",
            "",
        );
        new.services[0].settle = old.services[1].settle * 2;
        let plan = plan(&old, &new);
        assert_eq!(plan.removed_services, ["gone"]);
        let ServiceStep::Update(update) = &plan.services[0].step else {
            panic!("{plan:?}");
        };
        assert!(update.settings_changed);
        assert_eq!(update.tunnels.steps, [TunnelStep::Keep(0)]);
        assert_eq!(plan.services[1].step, ServiceStep::Start);
        assert_eq!(
            plan.changes(&old, &new),
            Changes {
                added: vec!["new".into()],
                removed: vec!["gone".into()],
                changed: vec!["web".into()],
            }
        );
    }

    #[test]
    fn listeners_move_start_retire_and_only_free_new_addresses_are_bound_first() {
        let old = config(
            &format!(
                "{}{}{}",
                service("a", Some("127.0.0.1:1001"), &[("t", 1)]),
                service("b", Some("127.0.0.1:1002"), &[("t", 1)]),
                service("c", None, &[("t", 1)]),
            ),
            "",
            "",
        );
        // a moves to a free address, b retires, c takes the address b held, d is new with a
        // free address.
        let new = config(
            &format!(
                "{}{}{}{}",
                service("a", Some("127.0.0.1:2001"), &[("t", 1)]),
                service("b", None, &[("t", 1)]),
                service("c", Some("127.0.0.1:1002"), &[("t", 1)]),
                service("d", Some("127.0.0.1:2004"), &[("t", 1)]),
            ),
            "",
            "",
        );
        let plan = plan(&old, &new);
        let listener = |i: usize| match &plan.services[i].step {
            ServiceStep::Update(u) => u.listener.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(listener(0), ListenerStep::Rebind);
        assert_eq!(listener(1), ListenerStep::Retire);
        assert_eq!(listener(2), ListenerStep::Start);
        assert_eq!(plan.services[3].step, ServiceStep::Start);
        let first: Vec<&str> = plan
            .binds_first(&old, &new)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(first, ["a", "d"], "c's address is held until b lets it go");
    }

    #[test]
    fn routers_are_diffed_by_name_and_settings() {
        let services = service("web", None, &[("a", 1)]);
        let old = config(
            &services,
            &format!(
                "routers:\n{}{}",
                router("r1", "10.0.0.1"),
                router("r2", "10.0.0.2")
            ),
            "",
        );
        let new = config(
            &services,
            &format!(
                "routers:\n{}{}",
                router("r2", "10.0.0.9"),
                router("r3", "10.0.0.3")
            ),
            "",
        );
        let plan = plan(&old, &new);
        assert_eq!(
            plan.routers,
            Changes {
                added: vec!["r3".into()],
                removed: vec!["r1".into()],
                changed: vec!["r2".into()],
            }
        );
        assert_eq!(
            plan.changes(&old, &new).changed,
            ["router:r2"],
            "routers are named router:NAME"
        );
    }

    #[test]
    fn readers_and_restart_only_settings_are_told_apart() {
        let services = service("web", None, &[("a", 1)]);
        let old = config(&services, "", "");
        let new = config(
            &services,
            "",
            ", readers: [\"uid:1000\"], metrics_listen: \"127.0.0.1:9\"",
        );
        let plan = plan(&old, &new);
        assert!(plan.readers_changed);
        assert_eq!(plan.services[0].step, ServiceStep::Keep);
        assert_eq!(restart_required(&old, &new), ["daemon.metrics_listen"]);
        assert!(restart_required(&old, &old).is_empty());
    }
}
