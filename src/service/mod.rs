//! A service: its tunnels' tasks, its election loop, its listener and its hooks.
//!
//! [`ServiceHandle`] owns the running parts: one task per tunnel ([`crate::supervisor`]), the
//! election loop (`elector.rs`, the only place where a primary is chosen), the failover listener
//! and the hooks. It hands the data plane its [`Routes`].
//!
//! A reload reconfigures a running service in place ([`ServiceHandle::reconfigure`], carrying
//! out a [`reload::TunnelPlan`]): tunnels whose settings are unchanged keep their task, process
//! and status entry; only added, removed and changed ones are started or stopped. Operators can
//! restart one tunnel, drain it, or probe it now.

mod elector;
mod entry;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::{Provider, Resolver, StartContext};

use crate::bus::Bus;
use crate::config::model::Standby;
use crate::config::spec::{ServiceSpec, TunnelSpec};
use crate::forward::{Acceptor, Listener, ListenerStats};
use crate::metrics::Metrics;
use crate::reload::{self, TunnelStep};
use crate::routes::{Primary, Route, Routes};
use crate::status::{self, ServiceStatus, SharedStatus};
use crate::supervisor::{next_slot_id, LiveTunnel, SlotId, TaggedReport, TunnelTask};
use elector::{Command, Elector};

/// One running tunnel task, owned by its service.
struct Slot {
    id: SlotId,
    spec: TunnelSpec,
    provider: Arc<dyn Provider>,
    route: Route,
    kick: Arc<Notify>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// One probe run on an operator's request (`tunnelkeeper probe`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeOutcome {
    /// Service name.
    pub service: String,
    /// Tunnel name.
    pub tunnel: String,
    /// Whether the probe passed.
    pub ok: bool,
    /// The end-to-end latency it measured, when it passed.
    pub latency_ms: Option<f64>,
    /// How long the whole probe took (dial, exchange and extra checks).
    pub elapsed_ms: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// Shared by every tunnel task a service starts.
struct TaskContext {
    service: String,
    bus: Arc<Bus>,
    metrics: Arc<Metrics>,
    resolver: Resolver,
    reports: mpsc::UnboundedSender<TaggedReport>,
    cancel: CancellationToken,
}

impl TaskContext {
    /// Spawns the task of one tunnel under a chosen id and standby switch.
    fn spawn(
        &self,
        id: SlotId,
        wanted: watch::Receiver<bool>,
        tunnel: &TunnelSpec,
        provider: Arc<dyn Provider>,
    ) -> Slot {
        let live = LiveTunnel::default();
        let (passive_tx, passive_rx) = mpsc::unbounded_channel();
        let cancel = self.cancel.child_token();
        let kick = Arc::new(Notify::new());
        let task = TunnelTask {
            slot: id,
            service: self.service.clone(),
            spec: tunnel.clone(),
            provider: provider.clone(),
            ctx: StartContext {
                tunnel: tunnel.name.clone(),
                service: self.service.clone(),
                resolver: self.resolver.clone(),
            },
            bus: self.bus.clone(),
            reports: self.reports.clone(),
            cancel: cancel.clone(),
            live: live.clone(),
            wanted,
            kick: kick.clone(),
            metrics: self.metrics.clone(),
        };
        Slot {
            id,
            spec: tunnel.clone(),
            provider,
            route: Route::new(tunnel.name.clone(), live, passive_tx),
            kick,
            cancel,
            task: tokio::spawn(task.run(passive_rx)),
        }
    }
}

/// A fresh task id and the standby switch of a tunnel about to start: hot tunnels run at once,
/// cold ones wait for the election loop to wake them.
fn new_slot(tunnel: &TunnelSpec) -> (SlotId, watch::Sender<bool>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(tunnel.standby == Standby::Hot);
    (next_slot_id(), tx, rx)
}

/// A running service.
pub struct ServiceHandle {
    /// Its resolved settings.
    pub spec: ServiceSpec,
    /// Its status, kept current by the election loop.
    pub status: SharedStatus,
    /// Its primary, for whoever steers traffic.
    pub primary: watch::Receiver<Primary>,
    /// Its tunnels, for the data plane.
    pub routes: Routes,
    tasks: TaskContext,
    slots: Vec<Slot>,
    commands: mpsc::UnboundedSender<Command>,
    election: JoinHandle<()>,
    hooks: JoinSet<()>,
    listener: Option<Listener>,
    /// Listeners a reload removed, still carrying the connections they had accepted.
    retired: Vec<Listener>,
}

impl ServiceHandle {
    /// Starts the service's tunnels and its election loop.
    /// `acceptor` is the service's bound failover listener, if it has `listen:`.
    pub fn start(
        spec: ServiceSpec,
        providers: Vec<Arc<dyn Provider>>,
        acceptor: Option<Acceptor>,
        bus: Arc<Bus>,
        metrics: Arc<Metrics>,
        resolver: Resolver,
        parent: &CancellationToken,
    ) -> ServiceHandle {
        let cancel = parent.child_token();
        let status = Arc::new(RwLock::new(Elector::initial_status(&spec)));
        let (primary_tx, primary_rx) = watch::channel(Primary::default());
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let tasks = TaskContext {
            service: spec.name.clone(),
            bus: bus.clone(),
            metrics,
            resolver,
            reports: reports_tx,
            cancel: cancel.clone(),
        };
        let mut switches = Vec::with_capacity(spec.tunnels.len());
        let slots: Vec<Slot> = spec
            .tunnels
            .iter()
            .zip(providers)
            .map(|(tunnel, provider)| {
                let (id, tx, rx) = new_slot(tunnel);
                switches.push((id, tx));
                tasks.spawn(id, rx, tunnel, provider)
            })
            .collect();
        let routes = Routes::new(
            slots.iter().map(|s| s.route.clone()).collect(),
            primary_rx.clone(),
        );
        let hooks = crate::hooks::start(&spec.name, &spec.hooks, &bus, cancel.child_token());
        let listener = match (acceptor, &spec.listen) {
            (Some(acceptor), Some(listen)) => {
                Some(Listener::start(acceptor, &spec, listen, routes.clone()))
            }
            _ => None,
        };
        let election = Elector::new(&spec, switches, bus, status.clone(), primary_tx, cancel);
        let election = tokio::spawn(election.run(reports_rx, commands_rx));
        ServiceHandle {
            spec,
            status,
            primary: primary_rx,
            routes,
            tasks,
            slots,
            commands,
            election,
            hooks,
            listener,
            retired: Vec::new(),
        }
    }

    /// A handle on the listener's figures, if the service has a listener.
    pub fn listener_stats(&self) -> Option<ListenerStats> {
        self.listener.as_ref().map(Listener::stats)
    }

    /// A copy of the current status.
    pub fn status(&self) -> ServiceStatus {
        let mut status = status::read(&self.status);
        status.listener = self.listener.as_ref().map(|l| l.stats().status());
        status
    }

    /// An error naming the tunnels when `tunnel` is not one of them.
    pub fn check_tunnel(&self, tunnel: &str) -> Result<(), String> {
        if self.spec.tunnels.iter().any(|t| t.name == tunnel) {
            return Ok(());
        }
        let known: Vec<&str> = self.spec.tunnels.iter().map(|t| t.name.as_str()).collect();
        Err(format!(
            "service `{}` has no tunnel `{tunnel}` (tunnels: {})",
            self.spec.name,
            known.join(", ")
        ))
    }

    /// Pins the primary to `tunnel` (None unpins). The pinned tunnel is primary whenever it is
    /// up; returns once the election has run. An unknown tunnel is an error.
    pub async fn pin(&self, tunnel: Option<&str>) -> Result<(), String> {
        if let Some(name) = tunnel {
            self.check_tunnel(name)?;
        }
        let (done, elected) = oneshot::channel();
        let _ = self
            .commands
            .send(Command::Pin(tunnel.map(str::to_owned), done));
        let _ = elected.await;
        Ok(())
    }

    /// Takes `tunnel` out of service (`drained`) or gives it back: a drained tunnel keeps
    /// running and carrying its open connections, but is never elected and new connections do
    /// not dial it. Returns once the election has run.
    pub async fn set_drained(&self, tunnel: &str, drained: bool) -> Result<(), String> {
        self.check_tunnel(tunnel)?;
        let (done, elected) = oneshot::channel();
        let _ = self
            .commands
            .send(Command::Drain(tunnel.to_owned(), drained, done));
        let _ = elected.await;
        Ok(())
    }

    /// Stops `tunnel` and starts it again at once, with the same settings and a fresh state
    /// (as a reload that changed it would). Returns once the new task runs.
    pub async fn restart(&mut self, tunnel: &str) -> Result<(), String> {
        self.check_tunnel(tunnel)?;
        let Some(index) = self.slots.iter().position(|s| s.spec.name == tunnel) else {
            return Err(format!("tunnel `{tunnel}` is not running"));
        };
        let (id, switch, wanted) = new_slot(&self.slots[index].spec);
        let mut switch = Some(switch);
        let handover = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == index {
                    (id, switch.take())
                } else {
                    (s.id, None)
                }
            })
            .collect();
        // As for a reload: the election forgets the old task first, so its `stopped` is not
        // counted as a failure, and the old task has stopped before the new one starts (a
        // restarted child may need the same port).
        let _ = self.commands.send(Command::Reconfigure {
            spec: Box::new(self.spec.clone()),
            slots: handover,
        });
        let old = self.slots.remove(index);
        let (spec, provider) = (old.spec.clone(), old.provider.clone());
        stop_slots(vec![old]).await;
        let fresh = self.tasks.spawn(id, wanted, &spec, provider);
        self.slots.insert(index, fresh);
        self.routes
            .replace(self.slots.iter().map(|s| s.route.clone()).collect());
        tracing::info!(service = %self.spec.name, tunnel, "tunnel restarted on request");
        Ok(())
    }

    /// Runs one probe of `tunnel` now, as its task would, and says how it went. The result is
    /// only reported: the tunnel's own probes alone decide whether it is up.
    pub fn probe_now(
        &self,
        tunnel: &str,
    ) -> Result<impl std::future::Future<Output = ProbeOutcome> + Send + 'static, String> {
        self.check_tunnel(tunnel)?;
        let spec = self
            .spec
            .tunnels
            .iter()
            .find(|t| t.name == tunnel)
            .map(|t| t.probe.clone())
            .ok_or_else(|| format!("no tunnel `{tunnel}`"))?;
        let Some((_, running)) = self.routes.get(tunnel) else {
            let state = status::read(&self.status)
                .tunnels
                .iter()
                .find(|t| t.name == tunnel)
                .map(|t| format!("{:?}", t.state).to_lowercase())
                .unwrap_or_default();
            return Err(format!(
                "tunnel `{}/{tunnel}` is not started (state: {state}); nothing to probe",
                self.spec.name
            ));
        };
        let resolver = self.tasks.resolver.clone();
        let (service, tunnel) = (self.spec.name.clone(), tunnel.to_owned());
        Ok(async move {
            let tag = tunnelkeeper_providers::util::log_tag(&service, &tunnel);
            let started = Instant::now();
            let result = crate::probe::probe(&*running, &spec, &resolver, &tag).await;
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            let (ok, latency_ms, error) = match result {
                Ok(latency) => (true, Some(latency.as_secs_f64() * 1000.0), None),
                Err(e) => (false, None, Some(e)),
            };
            ProbeOutcome {
                service,
                tunnel,
                ok,
                latency_ms,
                elapsed_ms,
                error,
            }
        })
    }

    /// Restarts the tunnels that depend on `router` at once, skipping any backoff.
    pub fn kick_via_router(&self, router: &str) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.spec.via_router.as_deref() == Some(router))
            .map(|s| {
                s.kick.notify_waiters();
                s.spec.name.clone()
            })
            .collect()
    }

    /// The names of the running tunnels, in config order.
    pub fn tunnel_names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.spec.name.clone()).collect()
    }

    /// Applies a reloaded spec of the same service, as [`reload::service_update`] plans it:
    /// tunnels whose settings are equal keep running untouched (same task, same process, same
    /// status `since`); changed ones are restarted, removed ones stopped, added ones started.
    /// The listener keeps its open connections and counters: new settings apply to new
    /// connections, and it is rebound only when its address moved (`acceptor`: the already
    /// bound new address); hooks are restarted only when they changed. `provider_for` builds
    /// new tunnels' providers.
    pub async fn reconfigure(
        &mut self,
        spec: ServiceSpec,
        acceptor: Option<Acceptor>,
        provider_for: &dyn Fn(&TunnelSpec) -> Arc<dyn Provider>,
    ) -> anyhow::Result<()> {
        let update = reload::service_update(&self.spec, &spec);
        let plan = &update.tunnels;
        let mut old: Vec<Option<Slot>> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(Some)
            .collect();
        // Kept tunnels hand over their slot; the others get a new id (and standby switch).
        enum Next {
            Keep(Box<Slot>),
            Start(SlotId, watch::Receiver<bool>),
        }
        let mut next = Vec::with_capacity(spec.tunnels.len());
        let mut handover = Vec::with_capacity(spec.tunnels.len());
        let mut retired: Vec<Slot> = plan.removed.iter().filter_map(|&i| old[i].take()).collect();
        for (step, tunnel) in plan.steps.iter().zip(&spec.tunnels) {
            let kept = match *step {
                TunnelStep::Keep(i) => old[i].take(),
                TunnelStep::Restart(i) => {
                    retired.extend(old[i].take());
                    None
                }
                TunnelStep::Start => None,
            };
            match kept {
                Some(slot) => {
                    handover.push((slot.id, None));
                    next.push(Next::Keep(Box::new(slot)));
                }
                None => {
                    let (id, switch, wanted) = new_slot(tunnel);
                    handover.push((id, Some(switch)));
                    next.push(Next::Start(id, wanted));
                }
            }
        }
        // The election switches to the new slots first, so the retired tunnels' last reports
        // (their `stopped`) are ignored rather than counted as failures. They are stopped
        // before their successors start: a restarted child may need the same port.
        let _ = self.commands.send(Command::Reconfigure {
            spec: Box::new(spec.clone()),
            slots: handover,
        });
        stop_slots(retired).await;
        self.slots = next
            .into_iter()
            .zip(&spec.tunnels)
            .map(|(next, tunnel)| match next {
                Next::Keep(slot) => *slot,
                Next::Start(id, wanted) => {
                    self.tasks.spawn(id, wanted, tunnel, provider_for(tunnel))
                }
            })
            .collect();
        self.routes
            .replace(self.slots.iter().map(|s| s.route.clone()).collect());

        if update.hooks_changed {
            self.hooks.shutdown().await;
            self.hooks = crate::hooks::start(
                &spec.name,
                &spec.hooks,
                &self.tasks.bus,
                self.tasks.cancel.child_token(),
            );
        }
        self.spec = spec;
        // A listener is only rebound when its address moves, and even then the connections it
        // holds go on; any other setting applies to new connections. Tunnels come and go
        // without touching it (the default `retries` follows them at dial time).
        use reload::ListenerStep;
        match (update.listener, self.listener.as_mut(), &self.spec.listen) {
            (ListenerStep::Rebind, Some(listener), Some(listen)) => {
                let acceptor = bound(acceptor, listen, &self.spec.name).await?;
                listener.rebind(acceptor).await;
                listener.update(&self.spec, listen);
            }
            (ListenerStep::Update, Some(listener), Some(listen)) => {
                listener.update(&self.spec, listen);
            }
            (ListenerStep::Retire, Some(_), None) => {
                // No new connections; the open ones go on until they end or the service stops.
                if let Some(mut listener) = self.listener.take() {
                    listener.retire().await;
                    self.retired.push(listener);
                }
            }
            (ListenerStep::Start, None, Some(listen)) => {
                let acceptor = bound(acceptor, listen, &self.spec.name).await?;
                self.listener = Some(Listener::start(
                    acceptor,
                    &self.spec,
                    listen,
                    self.routes.clone(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Stops the listener (and any a reload removed): no new connections; open ones may
    /// finish for up to `grace`.
    pub async fn drain(&mut self, grace: Duration) {
        let listeners = self
            .listener
            .take()
            .into_iter()
            .chain(self.retired.drain(..));
        futures_util::future::join_all(listeners.map(|l| l.stop(grace))).await;
    }

    /// Stops every tunnel (each bounded by its provider's grace) and the election loop.
    pub async fn stop(mut self) {
        self.drain(Duration::ZERO).await;
        self.tasks.cancel.cancel();
        stop_slots(std::mem::take(&mut self.slots)).await;
        drop(self.commands);
        let _ = self.election.await;
        // A hook still running is killed (its process group) as its task is dropped.
        let mut hooks = self.hooks;
        hooks.shutdown().await;
    }
}

/// The acceptor the daemon bound for a listener's new address, or one bound here (an address
/// another listener of this daemon held until now).
async fn bound(
    acceptor: Option<Acceptor>,
    listen: &crate::config::spec::ListenSpec,
    service: &str,
) -> anyhow::Result<Acceptor> {
    match acceptor {
        Some(a) => Ok(a),
        None => Acceptor::bind(&listen.address)
            .await
            .map_err(|e| anyhow::anyhow!("service `{service}`: {e:#}")),
    }
}

/// Cancels tunnel tasks and waits until each has stopped its tunnel.
async fn stop_slots(slots: Vec<Slot>) {
    for slot in &slots {
        slot.cancel.cancel();
    }
    futures_util::future::join_all(slots.into_iter().map(|s| s.task)).await;
}
