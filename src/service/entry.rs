//! One tunnel as its service's election loop knows it: everything about it in one place.
//!
//! A [`TunnelEntry`] holds the id of the task reporting for the tunnel, its election inputs
//! (contender, dampening, first verdict), its cold-standby switch, whether it runs, whether an
//! operator drained it, and its status line. A report from the tunnel's task is folded into its
//! entry by [`TunnelEntry::apply`]; the service's status board is built from the entries.

use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::model::Standby;
use crate::config::spec::TunnelSpec;
use crate::election::{Contender, Dampening, FirstVerdict};
use crate::probe::Transition;
use crate::status::{self, TunnelState, TunnelStatus};
use crate::supervisor::{Report, SlotId};

/// One tunnel of a running service, as the election loop keeps it.
pub(super) struct TunnelEntry {
    /// The id of the task that reports for this tunnel (a new one after a restart).
    pub slot: SlotId,
    /// Its settings.
    pub spec: TunnelSpec,
    /// Its election input.
    pub contender: Contender,
    /// Its flap history, which grows its failback hold.
    pub dampening: Dampening,
    /// Whether it should run (flipped for `standby: cold` only).
    pub wanted: watch::Sender<bool>,
    /// Started or starting (not parked in standby, not stopped).
    pub running: bool,
    /// What it has said so far, for the first election.
    pub verdict: FirstVerdict,
    /// Failed probes in a row before its first verdict (`fall` of them is one).
    pub early_failures: u32,
    /// Taken out of service by an operator: never elected, not dialled by new connections.
    pub drained: bool,
    /// Its line in the status.
    pub status: TunnelStatus,
}

impl TunnelEntry {
    /// A tunnel whose task `slot` has just been started and has not reported yet.
    pub fn new(
        slot: SlotId,
        spec: &TunnelSpec,
        hold: Duration,
        wanted: watch::Sender<bool>,
    ) -> TunnelEntry {
        TunnelEntry {
            slot,
            spec: spec.clone(),
            contender: Contender {
                name: spec.name.clone(),
                priority: spec.priority,
                up: false,
                latency: None,
                up_since: None,
                hold,
                last_down: None,
                last_down_hard: false,
                first_up: true,
            },
            dampening: Dampening::default(),
            wanted,
            running: false,
            verdict: FirstVerdict::Pending,
            early_failures: 0,
            drained: false,
            status: initial_status(spec, hold),
        }
    }

    /// Whether it is a cold-standby tunnel (started only when needed).
    pub fn is_cold(&self) -> bool {
        self.spec.standby == Standby::Cold
    }

    /// Its contender as the election sees it: a drained tunnel never counts as up.
    pub fn contender_view(&self) -> Contender {
        let mut c = self.contender.clone();
        if self.drained {
            c.up = false;
            c.up_since = None;
        }
        c
    }

    /// Takes (or gives back) the tunnel out of service.
    pub fn set_drained(&mut self, drained: bool) {
        self.drained = drained;
        self.status.drained = drained;
    }

    /// Folds one report of its task into the entry; `base_hold` is the service's failback hold.
    pub fn apply(&mut self, report: Report, base_hold: Duration, now: Instant) {
        let fall = self.spec.probe.fall.max(1);
        self.verdict = first_verdict(self.verdict, &mut self.early_failures, &report, fall);
        self.running = !matches!(report, Report::Standby | Report::Stopped);
        let was_up = self.contender.up;
        let (contender, dampening, t) =
            (&mut self.contender, &mut self.dampening, &mut self.status);
        match report {
            Report::Starting => set_state(t, TunnelState::Starting),
            Report::Standby => {
                contender.up = false;
                contender.up_since = None;
                contender.latency = None;
                t.latency_ms = None;
                t.pid = None;
                t.reason = Some("cold standby: not needed while a better tunnel is up".into());
                set_state(t, TunnelState::Standby);
            }
            Report::Started { endpoint, pid } => {
                t.endpoint = Some(endpoint);
                t.pid = pid;
                set_state(t, TunnelState::Probing);
            }
            Report::Probe {
                latency,
                error,
                transition,
            } => {
                contender.latency = latency;
                t.latency_ms = latency.map(|d| d.as_secs_f64() * 1000.0);
                match transition {
                    Some(Transition::Up) => {
                        contender.up = true;
                        contender.up_since = Some(now);
                        t.reason = None;
                        set_state(t, TunnelState::Up);
                    }
                    Some(Transition::Down) => {
                        let reason = format!(
                            "probe: {} consecutive failures, last: {}",
                            self.spec.probe.fall,
                            error.as_deref().unwrap_or("?")
                        );
                        mark_down(contender, dampening, now, reason.clone(), false);
                        t.reason = Some(reason);
                        set_state(t, TunnelState::Down);
                    }
                    None => {
                        if let Some(e) = error {
                            t.reason = Some(e);
                        }
                    }
                }
            }
            Report::Died { reason } => {
                mark_down(contender, dampening, now, reason.clone(), true);
                contender.latency = None;
                t.latency_ms = None;
                t.pid = None;
                t.reason = Some(reason);
                set_state(t, TunnelState::Down);
            }
            Report::Restarting { .. } => {
                t.restarts += 1;
                set_state(t, TunnelState::Restarting);
            }
            Report::Stopped => {
                contender.up = false;
                contender.up_since = None;
                t.pid = None;
                set_state(t, TunnelState::Stopped);
            }
        }
        if was_up && !contender.up {
            // Whatever comes next is a return, not a first up.
            contender.first_up = false;
        }
        self.refresh_hold(base_hold, now);
    }

    /// Recomputes its failback hold from its flap history.
    pub fn refresh_hold(&mut self, base_hold: Duration, now: Instant) {
        self.contender.hold = self.dampening.hold(base_hold, now);
        self.status.hold_ms = hold_ms(self.contender.hold);
    }
}

/// The status line of a tunnel that has not reported yet.
pub(super) fn initial_status(spec: &TunnelSpec, hold: Duration) -> TunnelStatus {
    TunnelStatus {
        name: spec.name.clone(),
        provider: format!("{:?}", spec.provider.kind()).to_lowercase(),
        priority: spec.priority,
        state: TunnelState::Starting,
        reason: None,
        endpoint: None,
        latency_ms: None,
        pid: None,
        restarts: 0,
        since: status::rfc3339(SystemTime::now()),
        hold_ms: hold_ms(hold),
        via_router: spec.via_router.clone(),
        drained: false,
    }
}

fn hold_ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn set_state(t: &mut TunnelStatus, state: TunnelState) {
    if t.state != state {
        t.state = state;
        t.since = status::rfc3339(SystemTime::now());
    }
}

/// Folds one report into a tunnel's first verdict (see [`crate::election::settle`]).
/// `failures` counts failed probes in a row before the first verdict; `fall` of them say
/// "not up".
fn first_verdict(
    verdict: FirstVerdict,
    failures: &mut u32,
    report: &Report,
    fall: u32,
) -> FirstVerdict {
    if verdict != FirstVerdict::Pending {
        return verdict;
    }
    match report {
        Report::Probe {
            transition: Some(Transition::Up),
            ..
        } => FirstVerdict::Up,
        Report::Probe {
            transition: Some(Transition::Down),
            ..
        } => FirstVerdict::NotUp,
        Report::Probe { error: Some(_), .. } => {
            *failures = failures.saturating_add(1);
            if *failures >= fall {
                FirstVerdict::NotUp
            } else {
                FirstVerdict::Pending
            }
        }
        Report::Probe { error: None, .. } => {
            *failures = 0;
            FirstVerdict::Pending
        }
        Report::Died { .. } | Report::Standby | Report::Stopped => FirstVerdict::NotUp,
        Report::Starting | Report::Started { .. } | Report::Restarting { .. } => {
            FirstVerdict::Pending
        }
    }
}

fn mark_down(
    contender: &mut Contender,
    dampening: &mut Dampening,
    now: Instant,
    reason: String,
    hard: bool,
) {
    if contender.up {
        dampening.record_down(now);
    }
    contender.up = false;
    contender.up_since = None;
    contender.last_down = Some(reason);
    contender.last_down_hard = hard;
}
