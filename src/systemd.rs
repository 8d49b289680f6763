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
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
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
