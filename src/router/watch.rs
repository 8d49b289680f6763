//! The watcher: one task per router that reads its boot id, tracks whether it can be reached,
//! and publishes `router_connection_dropped`, `router_reconnected` and `router_rebooted`.
//!
//! Reachability is learnt by asking: every `check_interval` while the router answers, every
//! [`UNREACHABLE_RETRY`] (or `check_interval`, if shorter) while it does not, so that a router
//! coming back is seen within half a second — and at once whenever the pool reports a session
//! to the router lost or opened (by anyone: a verify round may be the first to find the drop).
//! A session lost between two checks is a dropped connection even when the next check already
//! reaches the router again: both events are published. After every such reconnect the boot id
//! is read first (the boot gate, see the module `router`), and when it is unchanged a verify
//! round is asked for at once.
//!
//! The boot id is compared with the last one seen, which is kept in
//! `state_dir/routers/NAME.boot_id` (written atomically): a daemon restart is not a reboot, and
//! a reboot while the daemon was down is still reported once. When `boot_id_command` gives
//! nothing usable, `/proc/uptime` stands in: a reboot shows as an uptime smaller than the last
//! one seen plus the time elapsed since (a plain "went backwards" test would miss a router that
//! was down for longer than it had been up).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::ssh::{SessionEvents, SshPool};

use super::command::{self, Ran};
use super::{lock, Cause, SharedState};
use crate::bus::{Bus, EventKind};
use crate::config::spec::RouterSpec;
use crate::status::rfc3339;

/// How often an unreachable router is tried again (at most; `check_interval` if shorter).
pub(super) const UNREACHABLE_RETRY: Duration = Duration::from_millis(500);
/// The fallback reboot detector's command.
const UPTIME_COMMAND: &str = "cat /proc/uptime";
/// First line of a persisted uptime sample (a boot id is persisted as itself).
const UPTIME_RECORD: &str = "uptime-sample";
/// Slack for the uptime comparison: the moments the uptime is read and the clock is read
/// differ by the command's round trip, and the two clocks drift apart a little.
const UPTIME_SLACK: Duration = Duration::from_secs(2);

/// What identifies the router's current boot.
#[derive(Debug, Clone)]
pub(super) enum Boot {
    /// What `boot_id_command` printed.
    Id(String),
    /// `/proc/uptime` (seconds) and when it was read.
    Uptime {
        secs: f64,
        wall: SystemTime,
        /// Set for samples taken by this process (immune to wall-clock steps).
        mono: Option<Instant>,
    },
}

impl Boot {
    /// How the boot is shown in events and status: the boot id, or `uptime:boot@TIME` with the
    /// boot time the uptime implies.
    pub(super) fn label(&self) -> String {
        match self {
            Boot::Id(id) => id.clone(),
            Boot::Uptime { secs, wall, .. } => {
                let booted = Duration::try_from_secs_f64(*secs)
                    .ok()
                    .and_then(|up| wall.checked_sub(up))
                    .unwrap_or(*wall);
                format!("uptime:boot@{}", humantime::format_rfc3339_seconds(booted))
            }
        }
    }

    /// The file content that persists it.
    pub(super) fn record(&self) -> String {
        match self {
            Boot::Id(id) => format!("{id}\n"),
            Boot::Uptime { secs, wall, .. } => {
                let at = wall
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                format!("{UPTIME_RECORD} {secs:.2} {at:.3}\n")
            }
        }
    }

    /// Reads a persisted record (`None`: empty or unreadable).
    pub(super) fn parse_record(text: &str) -> Option<Boot> {
        let line = text.trim();
        if line.is_empty() {
            return None;
        }
        if let Some(rest) = line.strip_prefix(UPTIME_RECORD) {
            let mut fields = rest.split_whitespace().map(str::parse::<f64>);
            let (Some(Ok(secs)), Some(Ok(at))) = (fields.next(), fields.next()) else {
                return None;
            };
            let wall = UNIX_EPOCH + Duration::try_from_secs_f64(at).ok()?;
            return Some(Boot::Uptime {
                secs,
                wall,
                mono: None,
            });
        }
        Some(Boot::Id(line.to_string()))
    }
}

/// What a new reading says compared with the last one known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judgement {
    /// Nothing known before: record it.
    First,
    /// The same boot.
    Same,
    /// A new boot.
    Rebooted,
    /// One is a boot id, the other an uptime: they cannot be compared; record the new one.
    Incomparable,
}

/// Compares a reading with the last known boot.
pub(super) fn judge(previous: Option<&Boot>, now: &Boot) -> Judgement {
    match (previous, now) {
        (None, _) => Judgement::First,
        (Some(Boot::Id(old)), Boot::Id(new)) => {
            if old == new {
                Judgement::Same
            } else {
                Judgement::Rebooted
            }
        }
        (
            Some(Boot::Uptime {
                secs: old,
                wall: old_wall,
                mono: old_mono,
            }),
            Boot::Uptime {
                secs: new,
                wall: new_wall,
                mono: new_mono,
            },
        ) => {
            let elapsed = match (old_mono, new_mono) {
                (Some(a), Some(b)) => b.saturating_duration_since(*a),
                // A sample from before a daemon restart: only the wall clock spans the gap (a
                // step back shortens it, which can hide a reboot but never invent one).
                _ => new_wall.duration_since(*old_wall).unwrap_or_default(),
            };
            if uptime_went_back(*old, elapsed, *new) {
                Judgement::Rebooted
            } else {
                Judgement::Same
            }
        }
        _ => Judgement::Incomparable,
    }
}

/// Whether an uptime of `now` seconds, read `elapsed` after one of `before` seconds, means the
/// machine booted in between: without a reboot it would be about `before + elapsed`.
pub(super) fn uptime_went_back(before: f64, elapsed: Duration, now: f64) -> bool {
    // The slack grows by 0.1 % of the gap, for clock-rate differences over long gaps.
    let slack = UPTIME_SLACK.as_secs_f64() + elapsed.as_secs_f64() / 1000.0;
    now + slack < before + elapsed.as_secs_f64()
}

/// Parses `/proc/uptime` (`12345.67 54321.00`).
pub(super) fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
}

/// What one check of the router found.
enum Probe {
    /// It did not answer (or the connection died mid-command).
    Unreachable(String),
    /// It answered; `boot` is unknown when neither the boot id nor the uptime could be read
    /// (`problem` then says why).
    Reachable {
        boot: Option<Boot>,
        problem: Option<String>,
    },
}

/// The watcher task of one router.
pub(super) struct Watcher {
    pub spec: Arc<RouterSpec>,
    pub pool: SshPool,
    pub bus: Arc<Bus>,
    pub state: SharedState,
    /// `state_dir/routers/NAME.boot_id`.
    pub file: PathBuf,
    /// Tells the recovery task whether the router is reachable; set only after this task's
    /// events for the change are published.
    pub link: watch::Sender<bool>,
    /// Asks the recovery task for a verify round (with the cause its drift gets): at start-up
    /// and after a reconnect with an unchanged boot id.
    pub verify_requests: mpsc::UnboundedSender<Cause>,
    /// The pool's session counters for the router's target (`None`: unresolvable target).
    pub sessions: Option<watch::Receiver<SessionEvents>>,
    /// The boot gate: the counters as of the last boot id read (published after its events).
    pub gate: watch::Sender<SessionEvents>,
    /// The recovery task asks for a check now (it waits at the gate).
    pub probe_now: Arc<Notify>,
    pub cancel: CancellationToken,
}

impl Watcher {
    /// Runs until cancelled.
    pub(super) async fn run(self) {
        let name = self.spec.name.clone();
        let mut known = self.load().await;
        let seen_before = known.is_some();
        // None until the first attempt: the first outcome is always announced.
        let mut link: Option<bool> = None;
        let mut contacted = false;
        let retry = self.spec.check_interval.min(UNREACHABLE_RETRY);
        let mut sessions = self.sessions.clone();
        // The session counters as of the last successful check.
        let mut checked = SessionEvents::default();
        loop {
            let started = Instant::now();
            let probe = tokio::select! {
                _ = self.cancel.cancelled() => return,
                probe = self.probe() => probe,
            };
            // Read after the check: a session it opened is one whose boot id it read.
            let now_sessions = sessions
                .as_mut()
                .map(|s| *s.borrow_and_update())
                .unwrap_or_default();
            let wait = match probe {
                Probe::Unreachable(reason) => {
                    {
                        let mut state = lock(&self.state);
                        state.status.connected = false;
                        state.link_problem = Some(format!("unreachable: {reason}"));
                    }
                    if link != Some(false) {
                        tracing::warn!(router = %name, %reason, "router unreachable");
                        self.bus.publish(EventKind::RouterConnectionDropped {
                            router: name.clone(),
                            reason,
                        });
                    } else {
                        tracing::debug!(router = %name, %reason, "router still unreachable");
                    }
                    link = Some(false);
                    self.set_link(false);
                    retry
                }
                Probe::Reachable { boot, problem } => {
                    let mut rebooted = None;
                    let mut persist_problem = None;
                    if let Some(boot) = boot {
                        let judgement = judge(known.as_ref(), &boot);
                        if judgement == Judgement::Rebooted {
                            let old = known.as_ref().map(Boot::label);
                            rebooted = Some((old, boot.label()));
                        }
                        if judgement == Judgement::Incomparable {
                            tracing::info!(router = %name, boot = %boot.label(),
                                "boot identification changed kind (boot id vs uptime); recorded anew");
                        }
                        if judgement != Judgement::Same {
                            persist_problem = self.persist(&boot).await.err();
                        }
                        known = Some(boot);
                    }
                    // A session died since the last check (whoever found it) while the router
                    // looked fine: the connection did drop, even if this check got through.
                    let lost_meanwhile = now_sessions.lost > checked.lost;
                    if lost_meanwhile && link == Some(true) {
                        let reason = "the ssh session to the router was lost".to_string();
                        tracing::warn!(router = %name, %reason, "router connection dropped");
                        self.bus.publish(EventKind::RouterConnectionDropped {
                            router: name.clone(),
                            reason,
                        });
                    }
                    let reconnected = link != Some(true) || lost_meanwhile;
                    {
                        let mut state = lock(&self.state);
                        state.status.connected = true;
                        state.link_problem = None;
                        state.status.boot_id = known.as_ref().map(Boot::label);
                        if rebooted.is_some() {
                            state.status.last_reboot = Some(rfc3339(SystemTime::now()));
                        }
                        state.boot_problem = problem.or(persist_problem);
                    }
                    // Published back to back, before the link flag changes: the recovery task
                    // sees the reboot by the time it sees the router back.
                    if reconnected {
                        tracing::info!(router = %name, "router reachable");
                        self.bus.publish(EventKind::RouterReconnected {
                            router: name.clone(),
                        });
                    }
                    if let Some((old_boot_id, new_boot_id)) = rebooted.clone() {
                        self.bus.publish(EventKind::RouterRebooted {
                            router: name.clone(),
                            old_boot_id,
                            new_boot_id,
                        });
                    }
                    link = Some(true);
                    self.set_link(true);
                    // The boot gate opens only now, after the events: recovery then sees the
                    // reboot before it runs anything on the new session.
                    checked = now_sessions;
                    self.gate.send_replace(now_sessions);
                    if contacted && reconnected && rebooted.is_none() {
                        // Same boot, but the router was out of reach: check it at once rather
                        // than at the next verify_interval.
                        let _ = self.verify_requests.send(Cause::Drift);
                    }
                    if !contacted {
                        contacted = true;
                        // A reboot brings its own provision and verify; otherwise check the
                        // router once now: it may have drifted while the daemon was away.
                        if rebooted.is_none() {
                            let cause = if seen_before {
                                Cause::Drift
                            } else {
                                Cause::FirstContact
                            };
                            let _ = self.verify_requests.send(cause);
                        }
                    }
                    self.spec.check_interval
                }
            };
            let session_change = async {
                match sessions.as_mut() {
                    Some(s) => {
                        if s.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(started + wait) => {}
                _ = session_change => {
                    tracing::debug!(router = %name, "ssh session to the router lost or opened; checking now");
                }
                _ = self.probe_now.notified() => {}
            }
        }
    }

    /// Tells the recovery task about a change of reachability (only a change wakes it).
    fn set_link(&self, up: bool) {
        self.link.send_if_modified(|current| {
            let changed = *current != up;
            *current = up;
            changed
        });
    }

    /// Reads the boot id, falling back to `/proc/uptime`.
    async fn probe(&self) -> Probe {
        let spec = &self.spec;
        let why_not = match command::run(
            &self.pool,
            &spec.ssh,
            &spec.boot_id_command,
            spec.command_timeout,
        )
        .await
        {
            Ran::Unreachable(reason) | Ran::TimedOut(reason) => return Probe::Unreachable(reason),
            Ran::Finished(output) => {
                let text = String::from_utf8_lossy(&output.stdout);
                let id = text.trim();
                if output.success() && !id.is_empty() {
                    return Probe::Reachable {
                        boot: Some(Boot::Id(id.to_string())),
                        problem: None,
                    };
                }
                if output.success() {
                    "printed nothing".to_string()
                } else {
                    command::failure(&output)
                }
            }
        };
        match command::run(&self.pool, &spec.ssh, UPTIME_COMMAND, spec.command_timeout).await {
            Ran::Unreachable(reason) | Ran::TimedOut(reason) => Probe::Unreachable(reason),
            Ran::Finished(output) => {
                let text = String::from_utf8_lossy(&output.stdout);
                match parse_uptime(&text).filter(|_| output.success()) {
                    Some(secs) => Probe::Reachable {
                        boot: Some(Boot::Uptime {
                            secs,
                            wall: SystemTime::now(),
                            mono: Some(Instant::now()),
                        }),
                        problem: Some(format!(
                            "boot_id_command {why_not}; reboots are detected from /proc/uptime"
                        )),
                    },
                    None => Probe::Reachable {
                        boot: None,
                        problem: Some(format!(
                            "reboots cannot be detected: boot_id_command {why_not}, and \
                             `{UPTIME_COMMAND}` gave {}",
                            if output.success() {
                                format!("{:?}", text.trim())
                            } else {
                                command::failure(&output)
                            }
                        )),
                    },
                }
            }
        }
    }

    /// The persisted boot, if any. An unreadable file is logged and treated as none (the worst
    /// outcome is one missed reboot, healed by the start-up verify round).
    async fn load(&self) -> Option<Boot> {
        let file = self.file.clone();
        let read = tokio::task::spawn_blocking(move || crate::state::read_optional(&file)).await;
        match read {
            Ok(Ok(text)) => text.as_deref().and_then(Boot::parse_record),
            Ok(Err(err)) => {
                tracing::warn!(router = %self.spec.name, error = %format!("{err:#}"), "cannot read the last boot id");
                None
            }
            Err(err) => {
                tracing::warn!(router = %self.spec.name, error = %err, "cannot read the last boot id");
                None
            }
        }
    }

    /// Writes the boot atomically (temp file, fsync, rename, fsync of the directory) off the
    /// async threads.
    async fn persist(&self, boot: &Boot) -> Result<(), String> {
        let file = self.file.clone();
        let record = boot.record();
        let written = tokio::task::spawn_blocking(move || {
            crate::state::write_atomic(&file, record.as_bytes())
        })
        .await;
        let result = match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("cannot persist the boot id: {err:#}")),
            Err(err) => Err(format!("cannot persist the boot id: {err}")),
        };
        if let Err(problem) = &result {
            tracing::warn!(router = %self.spec.name, "{problem}");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uptime(secs: f64, wall: SystemTime, mono: Option<Instant>) -> Boot {
        Boot::Uptime { secs, wall, mono }
    }

    #[test]
    fn uptime_behind_the_expected_value_is_a_reboot() {
        let minute = Duration::from_secs(60);
        // Same boot: 100 s + 60 s elapsed reads as 160 s (give or take the slack).
        assert!(!uptime_went_back(100.0, minute, 160.0));
        assert!(!uptime_went_back(100.0, minute, 158.5));
        // Went backwards.
        assert!(uptime_went_back(100.0, minute, 5.0));
        // Down longer than it had been up: the uptime is still larger than before, but far
        // below where it would be without a reboot.
        assert!(uptime_went_back(100.0, Duration::from_secs(600), 300.0));
        // Over a week the slack grows (0.1 %), so clock drift is no reboot.
        let week = Duration::from_secs(7 * 86_400);
        assert!(!uptime_went_back(
            1000.0,
            week,
            1000.0 + week.as_secs_f64() - 300.0
        ));
    }

    #[test]
    fn boot_ids_compare_by_equality_and_first_contact_is_no_reboot() {
        let a = Boot::Id("a".into());
        let b = Boot::Id("b".into());
        assert_eq!(judge(None, &a), Judgement::First);
        assert_eq!(judge(Some(&a), &a.clone()), Judgement::Same);
        assert_eq!(judge(Some(&a), &b), Judgement::Rebooted);
        let u = uptime(10.0, SystemTime::now(), None);
        assert_eq!(judge(Some(&a), &u), Judgement::Incomparable);
    }

    #[test]
    fn uptime_samples_compare_on_the_monotonic_clock_when_both_have_it() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let before = uptime(500.0, wall, Some(t0));
        let same = uptime(530.0, wall, Some(t0 + Duration::from_secs(30)));
        let rebooted = uptime(3.0, wall, Some(t0 + Duration::from_secs(30)));
        assert_eq!(judge(Some(&before), &same), Judgement::Same);
        assert_eq!(judge(Some(&before), &rebooted), Judgement::Rebooted);
        // A persisted sample (no monotonic instant) spans the gap on the wall clock.
        let persisted = uptime(500.0, wall - Duration::from_secs(3600), None);
        let later_same = uptime(4100.0, wall, Some(t0));
        let later_new = uptime(1800.0, wall, Some(t0));
        assert_eq!(judge(Some(&persisted), &later_same), Judgement::Same);
        assert_eq!(judge(Some(&persisted), &later_new), Judgement::Rebooted);
    }

    #[test]
    fn records_round_trip() {
        let id = Boot::Id("0b4f-77".into());
        assert_eq!(id.record(), "0b4f-77\n");
        assert!(matches!(Boot::parse_record(&id.record()), Some(Boot::Id(s)) if s == "0b4f-77"));
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let sample = uptime(123.45, wall, Some(Instant::now()));
        match Boot::parse_record(&sample.record()) {
            Some(Boot::Uptime {
                secs,
                wall: w,
                mono,
            }) => {
                assert!((secs - 123.45).abs() < 1e-9);
                assert_eq!(w, wall);
                assert!(mono.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Boot::parse_record("  \n").is_none());
        assert!(Boot::parse_record("uptime-sample x y").is_none());
        assert_eq!(sample.label(), "uptime:boot@2023-11-14T22:11:16Z");
    }

    #[test]
    fn proc_uptime_parses() {
        assert_eq!(parse_uptime("12345.67 54321.00\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("nan 1"), None);
        assert_eq!(parse_uptime("-3 1"), None);
    }
}
