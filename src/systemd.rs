//! systemd integration through sd-notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING.
//!
//! Every call is a no-op when the daemon does not run under systemd (`NOTIFY_SOCKET` unset), so
//! the same code path serves `tunnelkeeper run` from a shell, the demo and the tests.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the daemon is ready (config loaded, control socket bound).
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// Sets the one-line-per-service status shown by `systemctl status`.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// Pets the watchdog.
pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// Tells systemd a reload has begun (`Type=notify-reload` needs MONOTONIC_USEC with it);
/// [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("reading CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
}

/// Tells systemd the daemon is shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// How often to pet the watchdog: half of `WatchdogSec`, or None when no watchdog is set.
/// Follows `sd_watchdog_enabled(3)`: `WATCHDOG_USEC` is the interval, and `WATCHDOG_PID`, when
/// present, must be this process (when absent the watchdog is ours).
pub fn watchdog_period() -> Option<Duration> {
    watchdog_period_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_period_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(pid) if pid.trim().parse::<u32>().ok() != Some(own_pid) => None,
        _ => Some(Duration::from_micros(usec / 2)),
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_period_is_half_the_interval_and_only_for_this_process() {
        let half = Some(Duration::from_millis(15_000));
        assert_eq!(watchdog_period_from(Some("30000000"), None, 7), half);
        assert_eq!(watchdog_period_from(Some("30000000"), Some("7"), 7), half);
        assert_eq!(watchdog_period_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_period_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period_from(None, Some("7"), 7), None);
    }
}
