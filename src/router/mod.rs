//! Router reboot recovery and drift healing.
//!
//! A router (or any SSH-managed host the tunnels depend on) is watched over the shared
//! [`SshPool`] by two tasks:
//!
//! - the **watcher** (module `watch`) reads the boot id on every check (every `check_interval`,
//!   every half second or so while the router cannot be reached, and at once when the pool
//!   reports a session to the router lost or opened, whoever's command found it), tracks
//!   reachability (`router_connection_dropped` / `router_reconnected`), and
//!   publishes `router_rebooted` when the boot id differs from the one persisted in
//!   `state_dir/routers/NAME.boot_id` — so a daemon restart is not a reboot, and a reboot while
//!   the daemon was down still is one. Without a usable boot id, `/proc/uptime` running
//!   backwards stands in for it.
//! - the **recovery** task (module `recovery`) is a bus subscriber: `router_rebooted` and
//!   `router_drift_detected` for its router make it run the `provision` commands (retried with
//!   backoff on failure) and then the `verify` checks. It also runs `verify` every
//!   `verify_interval`; a failing check is published as drift and healed. Events that arrive
//!   together, and drift found by several checks of one round, make one provision.
//!
//! The two share a **boot gate**: the session counters ([`SessionEvents`]) the watcher last
//! read the boot id after. Recovery runs nothing on the router until the gate has caught up
//! with the pool (a session lost or opened since means: boot id first), and discards a verify
//! round during which a session was lost or opened — so a reboot is always reported as
//! `router_rebooted` and healed with cause `reboot`, never as drift. After a reconnect with an
//! unchanged boot id the watcher asks for a verify round at once.
//!
//! [`Routers`] owns those tasks for every configured router and applies reloads as a diff;
//! [`RouterBoard`] is the cheap, cloneable status reader for `/v1/status`.

mod command;
mod recovery;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::ssh::{SessionEvents, SshPool};
// Every update of a router's state is a handful of field assignments: a poisoned lock is
// still usable.
use tunnelkeeper_providers::util::lock;

use crate::bus::Bus;
use crate::config::spec::RouterSpec;

/// One router in the status.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RouterStatus {
    /// Router name.
    pub name: String,
    /// Whether the last attempt to reach it succeeded.
    pub connected: bool,
    /// The boot id last read (`uptime:boot@TIME` when only `/proc/uptime` is available).
    pub boot_id: Option<String>,
    /// When a reboot was last detected (RFC 3339).
    pub last_reboot: Option<String>,
    /// The outcome of the last provisioning run.
    pub last_provision: Option<ProvisionStatus>,
    /// The `verify` checks, in config order, with their last result.
    pub checks: Vec<CheckStatus>,
    /// What is wrong, if anything: unreachable, a failed provision, unreadable boot id, ...
    pub reason: Option<String>,
}

/// The outcome of one provisioning run.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ProvisionStatus {
    /// Every command succeeded.
    pub ok: bool,
    /// When it ended (RFC 3339).
    pub at: String,
    /// What triggered it: `reboot`, `first_contact`, `drift`.
    pub cause: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// The last result of one `verify` check.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CheckStatus {
    /// Check name.
    pub name: String,
    /// Passed, failed, or not run yet.
    pub ok: Option<bool>,
    /// What it printed, or how it failed.
    pub got: Option<String>,
    /// When it last ran (RFC 3339).
    pub at: Option<String>,
}

/// Why the `provision` commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Cause {
    /// A `verify` check failed (also at start-up, for a router seen before).
    Drift,
    /// The router was never seen before and its checks failed.
    FirstContact,
    /// Its boot id changed.
    Reboot,
}

impl Cause {
    /// The name used in events and status.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Cause::Drift => "drift",
            Cause::FirstContact => "first_contact",
            Cause::Reboot => "reboot",
        }
    }

    /// Folds a new reason to provision into a pending one: one run serves both, and it is named
    /// after the weightier (a reboot explains drift; a first contact explains failing checks).
    pub(crate) fn merge(pending: Option<Cause>, new: Cause) -> Cause {
        pending.map_or(new, |old| old.max(new))
    }
}

/// One router's status and the notes its tasks keep about what is wrong. The watcher owns the
/// link and boot fields, the recovery task the provision and check fields.
#[derive(Debug)]
struct State {
    status: RouterStatus,
    /// Why the router cannot be reached (watcher).
    link_problem: Option<String>,
    /// Why reboots cannot be detected or recorded (watcher).
    boot_problem: Option<String>,
    /// A failed provision or failing checks (recovery).
    recovery_problem: Option<String>,
}

impl State {
    fn new(spec: &RouterSpec) -> State {
        State {
            status: RouterStatus {
                name: spec.name.clone(),
                connected: false,
                boot_id: None,
                last_reboot: None,
                last_provision: None,
                checks: spec
                    .verify
                    .iter()
                    .map(|check| CheckStatus {
                        name: check.name.clone(),
                        ok: None,
                        got: None,
                        at: None,
                    })
                    .collect(),
                reason: None,
            },
            link_problem: None,
            boot_problem: None,
            recovery_problem: None,
        }
    }

    /// A restarted router (changed spec) keeps what is still true about the machine: its boot
    /// id and history, and the results of checks that still exist.
    fn carried_over(spec: &RouterSpec, old: &State) -> State {
        let mut state = State::new(spec);
        let previous = &old.status;
        state.status.boot_id = previous.boot_id.clone();
        state.status.last_reboot = previous.last_reboot.clone();
        state.status.last_provision = previous.last_provision.clone();
        for check in &mut state.status.checks {
            if let Some(seen) = previous.checks.iter().find(|c| c.name == check.name) {
                *check = seen.clone();
            }
        }
        state
    }

    fn snapshot(&self) -> RouterStatus {
        let mut status = self.status.clone();
        status.reason = self
            .link_problem
            .clone()
            .or_else(|| self.recovery_problem.clone())
            .or_else(|| self.boot_problem.clone());
        status
    }
}

type SharedState = Arc<Mutex<State>>;

/// A cheap, cloneable reader of every router's status; it follows reconfigurations.
#[derive(Clone, Default)]
pub struct RouterBoard {
    routers: Arc<RwLock<Vec<SharedState>>>,
}

impl std::fmt::Debug for RouterBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterBoard")
            .field("routers", &self.read().len())
            .finish()
    }
}

impl RouterBoard {
    /// Every router's status, in config order.
    pub fn snapshot(&self) -> Vec<RouterStatus> {
        self.read().iter().map(|s| lock(s).snapshot()).collect()
    }

    /// Whether the router `name` was reachable at its last check (`None`: no such router).
    pub fn connected(&self, name: &str) -> Option<bool> {
        self.read().iter().find_map(|s| {
            let state = lock(s);
            (state.status.name == name).then_some(state.status.connected)
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<SharedState>> {
        // Only whole-vector replacements happen under the write lock.
        self.routers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn replace(&self, states: Vec<SharedState>) {
        *self.routers.write().unwrap_or_else(PoisonError::into_inner) = states;
    }
}

/// What every router's tasks share: the pool, the bus and where boot ids are kept.
#[derive(Clone)]
struct Context {
    pool: SshPool,
    bus: Arc<Bus>,
    state_dir: PathBuf,
}

/// The tasks of one router.
struct Running {
    spec: RouterSpec,
    state: SharedState,
    cancel: CancellationToken,
    watcher: JoinHandle<()>,
    recovery: JoinHandle<()>,
}

impl Running {
    /// Starts the watcher and the recovery subscriber. Must run inside a tokio runtime.
    fn start(spec: &RouterSpec, state: State, cx: &Context, parent: &CancellationToken) -> Running {
        let spec_arc = Arc::new(spec.clone());
        let state = Arc::new(Mutex::new(state));
        let cancel = parent.child_token();
        let (link_tx, link_rx) = tokio_watch::channel(false);
        let (verify_tx, verify_rx) = mpsc::unbounded_channel();
        // The pool's session counters for the router's target (a target the pool cannot
        // resolve has no sessions: its commands fail with the config error anyway).
        let sessions = cx.pool.session_events(&spec.ssh).ok();
        let (gate_tx, gate_rx) = tokio_watch::channel(SessionEvents::default());
        let probe_now = Arc::new(Notify::new());
        // Subscribe before the watcher can publish anything, so that not even the first
        // `router_rebooted` can slip past the recovery task.
        let subscription = cx.bus.subscribe();
        let recovery = tokio::spawn(
            recovery::Recovery {
                spec: spec_arc.clone(),
                pool: cx.pool.clone(),
                bus: cx.bus.clone(),
                state: state.clone(),
                subscription,
                link: link_rx,
                verify_requests: verify_rx,
                sessions: sessions.clone(),
                gate: gate_rx,
                probe_now: probe_now.clone(),
                cancel: cancel.clone(),
            }
            .run(),
        );
        let watcher = tokio::spawn(
            watch::Watcher {
                spec: spec_arc,
                pool: cx.pool.clone(),
                bus: cx.bus.clone(),
                state: state.clone(),
                file: boot_id_file(&cx.state_dir, &spec.name),
                link: link_tx,
                verify_requests: verify_tx,
                sessions,
                gate: gate_tx,
                probe_now,
                cancel: cancel.clone(),
            }
            .run(),
        );
        Running {
            spec: spec.clone(),
            state,
            cancel,
            watcher,
            recovery,
        }
    }

    /// Cancels both tasks and waits for them (their bus subscription is gone afterwards).
    async fn stop(self) {
        self.cancel.cancel();
        for (what, task) in [("watcher", self.watcher), ("recovery", self.recovery)] {
            if let Err(err) = task.await {
                if err.is_panic() {
                    tracing::error!(router = %self.spec.name, task = what, "router task panicked");
                }
            }
        }
    }
}

/// Where a router's last boot id is kept.
pub fn boot_id_file(state_dir: &Path, router: &str) -> PathBuf {
    state_dir.join("routers").join(format!("{router}.boot_id"))
}

/// The watcher and recovery tasks of every configured router.
pub struct Routers {
    cx: Context,
    parent: CancellationToken,
    running: Vec<Running>,
    board: RouterBoard,
}

impl std::fmt::Debug for Routers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.running.iter().map(|r| r.spec.name.as_str()).collect();
        f.debug_struct("Routers").field("routers", &names).finish()
    }
}

impl Routers {
    /// Starts a watcher + recovery subscriber per router. Must be called inside a tokio
    /// runtime; the tasks end when `parent` is cancelled or [`Routers::stop`] is called.
    pub fn start(
        specs: &[RouterSpec],
        pool: SshPool,
        bus: Arc<Bus>,
        state_dir: PathBuf,
        parent: &CancellationToken,
    ) -> Routers {
        let cx = Context {
            pool,
            bus,
            state_dir,
        };
        let running: Vec<Running> = specs
            .iter()
            .map(|spec| Running::start(spec, State::new(spec), &cx, parent))
            .collect();
        let board = RouterBoard::default();
        board.replace(running.iter().map(|r| r.state.clone()).collect());
        Routers {
            cx,
            parent: parent.clone(),
            running,
            board,
        }
    }

    /// Applies a reloaded `routers:` list: added start, removed stop, changed (spec != old)
    /// restart, unchanged untouched. Returns (added, removed, changed) names.
    pub async fn reconfigure(
        &mut self,
        specs: &[RouterSpec],
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut old: Vec<Running> = std::mem::take(&mut self.running);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        let mut next = Vec::with_capacity(specs.len());
        for spec in specs {
            match old.iter().position(|r| r.spec.name == spec.name) {
                Some(i) => {
                    let running = old.swap_remove(i);
                    if running.spec == *spec {
                        next.push(running);
                        continue;
                    }
                    changed.push(spec.name.clone());
                    let state = State::carried_over(spec, &lock(&running.state));
                    // The old tasks end before the new ones start: never two watchers writing
                    // one boot id file, never two provisioning runs on one router.
                    running.stop().await;
                    next.push(Running::start(spec, state, &self.cx, &self.parent));
                }
                None => {
                    added.push(spec.name.clone());
                    next.push(Running::start(
                        spec,
                        State::new(spec),
                        &self.cx,
                        &self.parent,
                    ));
                }
            }
        }
        for running in old {
            removed.push(running.spec.name.clone());
            running.stop().await;
        }
        self.board
            .replace(next.iter().map(|r| r.state.clone()).collect());
        self.running = next;
        (added, removed, changed)
    }

    /// A cloneable, cheap status reader that follows reconfigurations.
    pub fn board(&self) -> RouterBoard {
        self.board.clone()
    }

    /// Number of running watcher tasks (for the reload-leak test).
    pub fn watchers(&self) -> usize {
        self.running
            .iter()
            .filter(|r| !r.watcher.is_finished())
            .count()
    }

    /// The configured router names, in config order.
    pub fn names(&self) -> Vec<String> {
        self.running.iter().map(|r| r.spec.name.clone()).collect()
    }

    /// Stops every router's tasks and waits for them.
    pub async fn stop(self) {
        for running in &self.running {
            running.cancel.cancel();
        }
        for running in self.running {
            running.stop().await;
        }
        self.board.replace(Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_cause_is_named_after_the_weightier_one() {
        assert_eq!(Cause::merge(None, Cause::Drift), Cause::Drift);
        assert_eq!(
            Cause::merge(Some(Cause::Drift), Cause::Reboot),
            Cause::Reboot
        );
        assert_eq!(
            Cause::merge(Some(Cause::Reboot), Cause::Drift),
            Cause::Reboot
        );
        assert_eq!(
            Cause::merge(Some(Cause::FirstContact), Cause::Drift),
            Cause::FirstContact
        );
    }
}
