//! Hooks: operator commands run on events.
//!
//! Service hooks (`services[].hooks`) run on their own service's events; top-level hooks
//! (`hooks:`) run on router and daemon events (and on service events of every service, when
//! they list any), each event once. Each hook gets its own task and a small queue, so runs of
//! one hook are serialized (a DNS updater never races itself) while different hooks and the
//! daemon proceed independently. The event is written as JSON on the hook's stdin, and each of
//! its fields is in the environment as `TK_<FIELD>` (`TK_EVENT`, `TK_SEQ`, `TK_SERVICE`,
//! `TK_TUNNEL`, `TK_ROUTER`, `TK_FROM`, `TK_TO`, `TK_REASON`, ...; see [`hook_env`]), on top of
//! the allowlisted part of the daemon's environment (`process::child_env`: nothing else of the
//! daemon's reaches a hook). A run is killed (its whole process group) at its timeout; a
//! failing, slow or flooded hook is logged and never stalls anything.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::process::{self, RunSpec};

use crate::bus::{Bus, Delivery, Event};
use crate::config::spec::HookSpec;

/// Queued runs per hook beyond which new events are dropped (with a warning) rather than piling
/// up behind a slow hook.
pub const QUEUE: usize = 32;

/// Starts the hook tasks of one service, which see that service's events only; they end when
/// `cancel` fires.
pub fn start(
    service: &str,
    hooks: &[HookSpec],
    bus: &Arc<Bus>,
    cancel: CancellationToken,
) -> JoinSet<()> {
    let owner = service.to_string();
    dispatch(
        service,
        hooks,
        bus,
        cancel,
        CancellationToken::new(),
        move |event| event.kind.service() == Some(owner.as_str()),
    )
}

/// The top-level hooks: every event they list runs them once, whatever it concerns.
pub struct DaemonHooks {
    tasks: JoinSet<()>,
    /// Ends the dispatcher once it has queued what the bus already published.
    finish: CancellationToken,
    /// Ends everything at once.
    cancel: CancellationToken,
}

impl DaemonHooks {
    /// Starts the top-level hooks; they end when `cancel` fires or at [`DaemonHooks::finish`].
    pub fn start(hooks: &[HookSpec], bus: &Arc<Bus>, cancel: CancellationToken) -> DaemonHooks {
        let finish = CancellationToken::new();
        let tasks = dispatch("hooks", hooks, bus, cancel.clone(), finish.clone(), |_| {
            true
        });
        DaemonHooks {
            tasks,
            finish,
            cancel,
        }
    }

    /// Runs what is queued (e.g. `daemon_stopping`, published just before) for at most
    /// `grace`, then stops; a run still going then is killed with its process group.
    pub async fn finish(mut self, grace: Duration) {
        self.finish.cancel();
        let drained = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                ?grace,
                "hooks still running at the end of the shutdown grace"
            );
        }
        self.cancel.cancel();
        self.tasks.shutdown().await;
    }

    /// Stops at once (a reload replacing the hooks); a running hook is killed.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        self.tasks.shutdown().await;
    }
}

/// One task per hook plus a dispatcher feeding them the events that pass `wanted`. `finish`
/// makes the dispatcher queue what is already published and end, which closes the queues, so
/// the hook tasks end once they have run what they hold.
fn dispatch(
    owner: &str,
    hooks: &[HookSpec],
    bus: &Arc<Bus>,
    cancel: CancellationToken,
    finish: CancellationToken,
    wanted: impl Fn(&Event) -> bool + Send + 'static,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    if hooks.is_empty() {
        return tasks;
    }
    let mut queues = Vec::new();
    for (index, hook) in hooks.iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Arc<Event>>(QUEUE);
        let tag = format!("{owner}/hook{index}");
        tasks.spawn(run_hook(hook.clone(), tag, rx, cancel.clone()));
        queues.push((hook.on.clone(), tx));
    }
    let mut subscription = bus.subscribe();
    let owner = owner.to_string();
    let deliver = move |delivery: Delivery| {
        let event = match delivery {
            Delivery::Event(e) => e,
            Delivery::Lagged(n) => {
                tracing::warn!(hooks = %owner, missed = n, "hooks fell behind the event bus");
                return;
            }
        };
        if !wanted(&event) {
            return;
        }
        for (on, tx) in &queues {
            if on.iter().any(|t| t == event.type_name()) && tx.try_send(event.clone()).is_err() {
                tracing::warn!(hooks = %owner, seq = event.seq, "hook queue full; event not delivered to hook");
            }
        }
    };
    tasks.spawn(async move {
        loop {
            let delivery = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = finish.cancelled() => {
                    // What is published now, no more: publishers may keep going.
                    for _ in 0..crate::bus::DEFAULT_JOURNAL {
                        match futures_util::FutureExt::now_or_never(subscription.next()) {
                            Some(Some(delivery)) => deliver(delivery),
                            _ => break,
                        }
                    }
                    break;
                }
                d = subscription.next() => d,
            };
            match delivery {
                Some(delivery) => deliver(delivery),
                None => break,
            }
        }
    });
    tasks
}

async fn run_hook(
    hook: HookSpec,
    tag: String,
    mut queue: mpsc::Receiver<Arc<Event>>,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = queue.recv() => match e { Some(e) => e, None => return },
        };
        let spec = RunSpec {
            argv: hook.argv.clone(),
            env: hook_env(&event),
            stdin: Some(serde_json::to_vec(&*event).unwrap_or_default()),
            timeout: hook.timeout,
            output_cap: 8192,
            tag: tag.clone(),
        };
        match process::run(spec).await {
            Ok(out) if out.timed_out => {
                tracing::warn!(hook = %tag, seq = event.seq, timeout = ?hook.timeout, "hook killed at its timeout")
            }
            Ok(out) if !out.status.success() => tracing::warn!(
                hook = %tag,
                seq = event.seq,
                status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "hook failed"
            ),
            Ok(_) => tracing::debug!(hook = %tag, seq = event.seq, "hook ran"),
            Err(e) => tracing::warn!(hook = %tag, seq = event.seq, "hook could not run: {e}"),
        }
    }
}

/// The `TK_*` environment of a hook run: every field of the event as `TK_<FIELD>` (upper
/// case), with the event's type as `TK_EVENT` and its sequence number as `TK_SEQ`. Strings are
/// passed as they are, numbers and booleans as text, lists as JSON; a null field (`from` of a
/// first election) is left out. NUL bytes, which no environment can hold, are dropped.
pub fn hook_env(event: &Event) -> Vec<(String, String)> {
    crate::bus::event_fields(event)
        .into_iter()
        .filter_map(|(key, value)| {
            let text = match value {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            Some((
                format!("TK_{}", key.to_ascii_uppercase()),
                text.replace('\0', ""),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EventKind;

    fn env_of(kind: EventKind) -> Vec<(String, String)> {
        let bus = Bus::new(16);
        let event = bus.publish(kind);
        let mut env = hook_env(&event);
        env.sort();
        env
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn every_event_field_is_in_the_environment() {
        assert_eq!(
            env_of(EventKind::RouterProvisionFailed {
                router: "gw".into(),
                command: "nft -f x".into(),
                exit_status: Some(1),
                reason: "bad\0 rule".into(),
                retry_in_ms: 500,
            }),
            pairs(&[
                ("TK_EVENT", "router_provision_failed"),
                ("TK_SEQ", "1"),
                ("TK_ROUTER", "gw"),
                ("TK_COMMAND", "nft -f x"),
                ("TK_EXIT_STATUS", "1"),
                ("TK_REASON", "bad rule"),
                ("TK_RETRY_IN_MS", "500"),
            ])
        );
        assert_eq!(
            env_of(EventKind::PrimaryChanged {
                service: "web".into(),
                from: None,
                to: Some("a".into()),
                reason: "initial".into(),
            }),
            pairs(&[
                ("TK_EVENT", "primary_changed"),
                ("TK_SEQ", "1"),
                ("TK_SERVICE", "web"),
                ("TK_TO", "a"),
                ("TK_REASON", "initial"),
            ])
        );
        assert_eq!(
            env_of(EventKind::ConfigReloaded {
                added: vec!["web".into()],
                removed: vec![],
                changed: vec![],
            }),
            pairs(&[
                ("TK_EVENT", "config_reloaded"),
                ("TK_SEQ", "1"),
                ("TK_ADDED", "[\"web\"]"),
                ("TK_REMOVED", "[]"),
                ("TK_CHANGED", "[]"),
            ])
        );
    }

    #[test]
    fn top_level_hooks_parse_and_service_hooks_keep_service_events() {
        let base = "version: 1\ndaemon: { control_socket: /tmp/tk.sock, state_dir: /tmp/tk }\n";
        let service = "services:\n  - name: web\n    tunnels: [{ name: a, provider: direct, address: \"127.0.0.1:1\" }]\n";
        let path = std::path::Path::new("tk.yaml");
        let text = format!("{base}hooks:\n  - {{ on: [router_rebooted, daemon_stopping], run: /bin/true }}\n{service}");
        let config = crate::config::parse(&text, path).expect("valid");
        assert_eq!(config.hooks.len(), 1);
        assert_eq!(config.hooks[0].on, ["router_rebooted", "daemon_stopping"]);

        let text = format!(
            "{base}{service}    hooks: [{{ on: [tunnel_up, router_rebooted], run: /bin/true }}]\n"
        );
        let error =
            crate::config::parse(&text, path).expect_err("a router event on a service hook");
        let error = error.to_string();
        assert!(
            error.contains("services[0].hooks[0].on[1]")
                && error.contains("`router_rebooted` is not an event of a service"),
            "{error}"
        );
    }
}
