//! The recovery task: a bus subscriber that re-provisions a router after a reboot or drift and
//! verifies the result; it also runs the periodic `verify` rounds.
//!
//! Everything that asks for a provision — `router_rebooted`, `router_drift_detected` (one per
//! failing check), the start-up verify round — only sets a *pending cause*; one provisioning run
//! then serves every request that came before it started. Three things make that hold:
//!
//! - before acting, the task takes in every event already published (without waiting), so a
//!   burst such as `router_reconnected` + `router_rebooted` is one decision;
//! - drift events published before a successful provision ended (including those of the
//!   task's own verify rounds, which it acts on directly) are already answered by it: their
//!   `seq` is at most the bus position recorded when it ended, and they are ignored;
//! - rounds and runs are serialized on this one task, and it only starts them while the
//!   watcher reports the router reachable (the watcher publishes a reboot before it says so).
//!
//! Nothing runs on the router before the watcher has read the boot id on the pool's current
//! sessions (the boot gate, see the module `router`): after a reconnect a reboot is seen as one,
//! never as drift. A verify round during which a session was lost or opened proves nothing
//! (it may straddle a reboot): it is dropped and run again once the gate has caught up.
//!
//! A failed run is retried after a backoff (1 s doubling to 30 s), or as soon as the router is
//! reachable again when it failed for want of a connection. Checks that still fail right after
//! a successful run count as a failure too (the run did not heal them), so a provision that
//! cannot fix the state does not loop without pause.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::ssh::{SessionEvents, SshPool};

use super::command::{self, Ran, Verdict};
use super::{lock, Cause, ProvisionStatus, SharedState};
use crate::bus::{Bus, Delivery, EventKind, Subscription};
use crate::config::spec::RouterSpec;
use crate::status::rfc3339;

/// First retry delay after a failed provisioning run.
pub(super) const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest wait before a verify round that could not reach the router is tried again.
const VERIFY_RETRY: Duration = Duration::from_secs(1);

/// The delay before retry number `failures` (1-based): 1 s, 2 s, 4 s, ... at most 30 s.
pub(super) fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_INITIAL
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

/// What the recovery task intends to do next.
#[derive(Debug)]
struct Plan {
    /// A provisioning run is owed, for this reason.
    pending: Option<Cause>,
    /// Consecutive runs that failed (or did not heal the checks); reset by a passing round.
    failures: u32,
    /// Not before this (backoff after a failure); `None`: at once.
    retry_at: Option<Instant>,
    /// The last run could not reach the router: retry as soon as the watcher sees it again.
    retry_on_link: bool,
    /// Drift events up to this bus `seq` are already answered.
    drift_covered: u64,
    /// When the next verify round is due.
    verify_due: Instant,
    /// What drift found by the next round is provisioned as.
    verify_cause: Cause,
}

impl Plan {
    fn new(verify_due: Instant) -> Plan {
        Plan {
            pending: None,
            failures: 0,
            retry_at: None,
            retry_on_link: false,
            drift_covered: 0,
            verify_due,
            verify_cause: Cause::Drift,
        }
    }

    /// Records a reason to provision. A reboot is a fresh start: whatever failed before was
    /// about the previous boot, so it is acted on at once.
    fn demand(&mut self, cause: Cause) {
        if cause == Cause::Reboot {
            self.failures = 0;
            self.retry_at = None;
            self.retry_on_link = false;
        } else if self.pending.is_none() {
            self.retry_at = None;
        }
        self.pending = Some(Cause::merge(self.pending, cause));
    }

    /// Asks for a verify round now, whose drift is provisioned as `cause`.
    fn request_verify(&mut self, cause: Cause) {
        self.verify_due = Instant::now();
        self.verify_cause = self.verify_cause.max(cause);
    }

    /// Records a failed run (or one that did not heal) and schedules the retry.
    fn failed(&mut self, unreachable: bool) -> Duration {
        self.failures += 1;
        let delay = backoff(self.failures);
        self.retry_at = Some(Instant::now() + delay);
        self.retry_on_link = unreachable;
        delay
    }
}

/// How a verify round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Every check passed (`router_verified` published).
    Passed,
    /// At least one failed (`router_drift_detected` published for each).
    Drift,
    /// The router could not be reached mid-round: nothing concluded, nothing published.
    Inconclusive,
}

/// The recovery task of one router.
pub(super) struct Recovery {
    pub spec: Arc<RouterSpec>,
    pub pool: SshPool,
    pub bus: Arc<Bus>,
    pub state: SharedState,
    /// Made before the watcher started, so no event of this router is missed.
    pub subscription: Subscription,
    /// Whether the watcher last found the router reachable.
    pub link: watch::Receiver<bool>,
    /// The watcher's verify requests (start-up, reconnect with the same boot id).
    pub verify_requests: mpsc::UnboundedReceiver<Cause>,
    /// The pool's session counters for the router's target (`None`: unresolvable target).
    pub sessions: Option<watch::Receiver<SessionEvents>>,
    /// The boot gate: the counters as of the watcher's last boot id read.
    pub gate: watch::Receiver<SessionEvents>,
    /// Asks the watcher for a check now.
    pub probe_now: Arc<Notify>,
    pub cancel: CancellationToken,
}

/// What the boot gate said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// The boot id was read on the current sessions: go ahead.
    Open,
    /// The watcher has not caught up in time (the router is likely out of reach): not now.
    Closed,
    /// The task is being cancelled.
    Cancelled,
}

impl Recovery {
    /// Runs until cancelled (or the bus is gone).
    pub(super) async fn run(mut self) {
        let mut plan = Plan::new(Instant::now() + self.spec.verify_interval);
        let mut requests_open = true;
        let mut link_open = true;
        loop {
            if self.cancel.is_cancelled() || !self.take_in(&mut plan, &mut requests_open) {
                return;
            }
            let connected = *self.link.borrow();
            let now = Instant::now();
            let mut deadline = None;
            if connected {
                match plan.pending {
                    Some(cause) if plan.retry_at.is_none_or(|at| at <= now) => {
                        if !self.provision(&mut plan, cause).await {
                            return;
                        }
                        continue;
                    }
                    Some(_) => deadline = plan.retry_at,
                    None if plan.verify_due <= now => {
                        if !self.scheduled_round(&mut plan).await {
                            return;
                        }
                        continue;
                    }
                    None => deadline = Some(plan.verify_due),
                }
            }
            // Nothing to do now: wait for an event, the watcher, or the next due time (while
            // the router is unreachable, only the watcher can make something due).
            let far = now + Duration::from_secs(86_400);
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                delivery = self.subscription.next() => match delivery {
                    Some(delivery) => self.handle(&mut plan, delivery),
                    None => return,
                },
                request = self.verify_requests.recv(), if requests_open => match request {
                    Some(cause) => plan.request_verify(cause),
                    None => requests_open = false,
                },
                changed = self.link.changed(), if link_open => match changed {
                    Ok(()) => {
                        if *self.link.borrow_and_update() && plan.retry_on_link {
                            plan.retry_at = None;
                            plan.retry_on_link = false;
                        }
                    }
                    Err(_) => link_open = false,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => {}
            }
        }
    }

    /// Takes in every event and request already waiting, without blocking. False once the bus
    /// is gone.
    fn take_in(&mut self, plan: &mut Plan, requests_open: &mut bool) -> bool {
        while let Some(delivery) = self.subscription.next().now_or_never() {
            match delivery {
                Some(delivery) => self.handle(plan, delivery),
                None => return false,
            }
        }
        loop {
            match self.verify_requests.try_recv() {
                Ok(cause) => plan.request_verify(cause),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    *requests_open = false;
                    break;
                }
            }
        }
        true
    }

    fn handle(&self, plan: &mut Plan, delivery: Delivery) {
        let event = match delivery {
            Delivery::Event(event) => event,
            Delivery::Lagged(missed) => {
                // A reboot or drift event may be among the missed ones: a verify round finds
                // out whether anything needs healing.
                tracing::warn!(router = %self.spec.name, missed, "router recovery fell behind the event bus; verifying");
                plan.request_verify(Cause::Drift);
                return;
            }
        };
        if event.kind.router() != Some(self.spec.name.as_str()) {
            return;
        }
        match &event.kind {
            EventKind::RouterRebooted { .. } => plan.demand(Cause::Reboot),
            EventKind::RouterDriftDetected { .. } if event.seq > plan.drift_covered => {
                plan.demand(Cause::Drift)
            }
            _ => {}
        }
    }

    /// The pool's session counters now.
    fn sessions_now(&self) -> SessionEvents {
        self.sessions
            .as_ref()
            .map(|s| *s.borrow())
            .unwrap_or_default()
    }

    /// Waits (at most `command_timeout`) until the watcher has read the boot id after the last
    /// session change, asking it to check now.
    async fn boot_gate(&self) -> Gate {
        let mut gate = self.gate.clone();
        let until = Instant::now() + self.spec.command_timeout;
        loop {
            let now = self.sessions_now();
            let checked = *gate.borrow_and_update();
            if now.opened <= checked.opened && now.lost <= checked.lost {
                return Gate::Open;
            }
            self.probe_now.notify_one();
            tokio::select! {
                _ = self.cancel.cancelled() => return Gate::Cancelled,
                changed = gate.changed() => if changed.is_err() { return Gate::Cancelled },
                _ = tokio::time::sleep_until(until) => return Gate::Closed,
            }
        }
    }

    /// A periodic or requested verify round; drift makes a provision due at once.
    async fn scheduled_round(&self, plan: &mut Plan) -> bool {
        if self.spec.verify.is_empty() {
            // Nothing to check: no round, no event every verify_interval.
            plan.verify_due = Instant::now() + self.spec.verify_interval;
            plan.verify_cause = Cause::Drift;
            return true;
        }
        let Some(round) = self.verify(plan).await else {
            return false;
        };
        match round {
            Round::Passed => plan.failures = 0,
            Round::Drift => plan.demand(plan.verify_cause),
            Round::Inconclusive => return true,
        }
        plan.verify_cause = Cause::Drift;
        true
    }

    /// Runs every `provision` command in order, then verifies. False if cancelled.
    async fn provision(&self, plan: &mut Plan, cause: Cause) -> bool {
        let name = &self.spec.name;
        match self.boot_gate().await {
            Gate::Open => {}
            Gate::Cancelled => return false,
            Gate::Closed => {
                // The watcher is still finding out (reboot? gone?): its events decide.
                plan.retry_at = Some(Instant::now() + VERIFY_RETRY);
                return true;
            }
        }
        let started = Instant::now();
        tracing::info!(router = %name, cause = cause.as_str(), commands = self.spec.provision.len(), "provisioning");
        for command in &self.spec.provision {
            let ran = tokio::select! {
                _ = self.cancel.cancelled() => return false,
                ran = command::run(&self.pool, &self.spec.ssh, command, self.spec.command_timeout) => ran,
            };
            let (exit_status, reason, unreachable) = match ran {
                Ran::Finished(output) if output.success() => continue,
                Ran::Finished(output) => (output.exit_status, command::failure(&output), false),
                Ran::TimedOut(reason) => (None, reason, false),
                Ran::Unreachable(reason) => (None, reason, true),
            };
            let delay = plan.failed(unreachable);
            tracing::warn!(router = %name, cause = cause.as_str(), %command, %reason,
                retry_in = ?delay, "provisioning failed");
            {
                let mut state = lock(&self.state);
                state.status.last_provision = Some(ProvisionStatus {
                    ok: false,
                    at: rfc3339(SystemTime::now()),
                    cause: cause.as_str().to_string(),
                    error: Some(format!("`{command}`: {reason}")),
                });
                state.recovery_problem = Some(format!(
                    "provisioning ({}) failed: `{command}`: {reason}",
                    cause.as_str()
                ));
            }
            self.bus.publish(EventKind::RouterProvisionFailed {
                router: name.clone(),
                command: command.clone(),
                exit_status,
                reason,
                retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            });
            return true;
        }
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        plan.pending = None;
        plan.retry_at = None;
        plan.retry_on_link = false;
        {
            let mut state = lock(&self.state);
            state.status.last_provision = Some(ProvisionStatus {
                ok: true,
                at: rfc3339(SystemTime::now()),
                cause: cause.as_str().to_string(),
                error: None,
            });
            state.recovery_problem = None;
        }
        self.bus.publish(EventKind::RouterProvisioned {
            router: name.clone(),
            cause: cause.as_str().to_string(),
            duration_ms,
            commands: self.spec.provision.len(),
        });
        // Drift reported before this point is answered by this run (and the round below).
        plan.drift_covered = self.bus.last_seq();
        let Some(round) = self.verify(plan).await else {
            return false;
        };
        match round {
            Round::Passed => plan.failures = 0,
            Round::Drift => {
                // The run did not heal the checks: try again, but after a backoff.
                plan.pending = Some(Cause::Drift);
                let delay = plan.failed(false);
                tracing::warn!(router = %name, retry_in = ?delay, "checks still fail after provisioning");
            }
            Round::Inconclusive => {}
        }
        true
    }

    /// Runs every check, then publishes the round's drift events back to back (or one
    /// `router_verified`). `None` if cancelled.
    async fn verify(&self, plan: &mut Plan) -> Option<Round> {
        let name = &self.spec.name;
        match self.boot_gate().await {
            Gate::Open => {}
            Gate::Cancelled => return None,
            Gate::Closed => {
                plan.verify_due = Instant::now() + VERIFY_RETRY;
                return Some(Round::Inconclusive);
            }
        }
        let sessions_before = self.sessions_now();
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(self.spec.verify.len());
        for check in &self.spec.verify {
            let ran = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                ran = command::run(&self.pool, &self.spec.ssh, &check.command, self.spec.command_timeout) => ran,
            };
            let expect = check.expect.as_deref();
            verdicts.push(match ran {
                Ran::Finished(output) => command::evaluate(expect, &output),
                Ran::TimedOut(error) => command::not_finished(expect, error),
                Ran::Unreachable(reason) => {
                    // Not the router's state: nothing can be concluded. Try again soon; the
                    // watcher reports the connection.
                    tracing::debug!(router = %name, check = %check.name, %reason, "verify round interrupted");
                    plan.verify_due = Instant::now() + self.spec.check_interval.min(VERIFY_RETRY);
                    return Some(Round::Inconclusive);
                }
            });
        }
        if self.sessions_now() != sessions_before {
            // A session was lost or opened mid-round: the answers may come from either side
            // of a reboot. Run the round again once the boot id has been read.
            tracing::debug!(router = %name, "ssh session changed during the verify round; verifying again");
            plan.verify_due = Instant::now();
            return Some(Round::Inconclusive);
        }
        let at = rfc3339(SystemTime::now());
        let failing: Vec<(&str, &Verdict)> = self
            .spec
            .verify
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| !v.pass)
            .map(|(check, v)| (check.name.as_str(), v))
            .collect();
        {
            let mut state = lock(&self.state);
            for (status, verdict) in state.status.checks.iter_mut().zip(&verdicts) {
                status.ok = Some(verdict.pass);
                status.got = Some(verdict.got.clone());
                status.at = Some(at.clone());
            }
            state.recovery_problem = failing.first().map(|(check, v)| {
                format!(
                    "drift: check `{check}` expected {:?}, got {:?}",
                    v.expected, v.got
                )
            });
        }
        plan.verify_due = Instant::now() + self.spec.verify_interval;
        if failing.is_empty() {
            self.bus.publish(EventKind::RouterVerified {
                router: name.clone(),
                checks: verdicts.len(),
            });
            return Some(Round::Passed);
        }
        for (check, verdict) in &failing {
            tracing::warn!(router = %name, %check, expected = %verdict.expected, got = %verdict.got, "router drift");
            self.bus.publish(EventKind::RouterDriftDetected {
                router: name.clone(),
                check: check.to_string(),
                expected: verdict.expected.clone(),
                got: verdict.got.clone(),
            });
        }
        // This round's drift is acted on by the caller, not again when it comes back round.
        plan.drift_covered = self.bus.last_seq();
        Some(Round::Drift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let delays: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn requests_coalesce_into_one_pending_run() {
        let mut plan = Plan::new(Instant::now());
        plan.demand(Cause::Drift);
        plan.demand(Cause::Drift);
        plan.demand(Cause::Drift);
        assert_eq!(plan.pending, Some(Cause::Drift));
        // A failure keeps the backoff when more drift is reported...
        plan.failed(false);
        let retry_at = plan.retry_at;
        plan.demand(Cause::Drift);
        assert_eq!(plan.retry_at, retry_at);
        assert_eq!(plan.failures, 1);
        // ...but a reboot is a fresh start, and names the run.
        plan.demand(Cause::Reboot);
        assert_eq!(plan.pending, Some(Cause::Reboot));
        assert_eq!(plan.retry_at, None);
        assert_eq!(plan.failures, 0);
    }
}
