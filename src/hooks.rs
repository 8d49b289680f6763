//! Hooks: operator commands run on events.
//!
//! Each hook of a service gets its own task and a small queue, so runs of one hook are
//! serialized (a DNS updater never races itself) while different hooks and the daemon proceed
//! independently. The event is written as JSON on the hook's stdin and summarized in `TK_EVENT`,
//! `TK_SERVICE`, `TK_TUNNEL`, `TK_FROM`, `TK_TO`, `TK_SEQ`, on top of the allowlisted part of the
//! daemon's environment (`process::child_env`: nothing else of the daemon's reaches a hook). A
//! run is killed (its whole process group) at its timeout; a failing, slow or flooded hook is
//! logged and never stalls anything.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::process::{self, RunSpec};

use crate::bus::{Bus, Delivery, Event, EventKind};
use crate::config::spec::HookSpec;

/// Queued runs per hook beyond which new events are dropped (with a warning) rather than piling
/// up behind a slow hook.
pub const QUEUE: usize = 32;

/// Starts the hook tasks of one service; they end when `cancel` fires.
pub fn start(
    service: &str,
    hooks: &[HookSpec],
    bus: &Arc<Bus>,
    cancel: CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    if hooks.is_empty() {
        return tasks;
    }
    let mut queues = Vec::new();
    for (index, hook) in hooks.iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Arc<Event>>(QUEUE);
        let tag = format!("{service}/hook{index}");
        tasks.spawn(run_hook(hook.clone(), tag, rx, cancel.clone()));
        queues.push((hook.on.clone(), tx));
    }
    let mut subscription = bus.subscribe();
    let service = service.to_string();
    tasks.spawn(async move {
        loop {
            let delivery = tokio::select! {
                _ = cancel.cancelled() => break,
                d = subscription.next() => d,
            };
            let event = match delivery {
                Some(Delivery::Event(e)) => e,
                Some(Delivery::Lagged(n)) => {
                    tracing::warn!(%service, missed = n, "hooks fell behind the event bus");
                    continue;
                }
                None => break,
            };
            if event.kind.service().is_some_and(|s| s != service) {
                continue;
            }
            for (on, tx) in &queues {
                if on.iter().any(|t| t == event.type_name()) && tx.try_send(event.clone()).is_err()
                {
                    tracing::warn!(%service, seq = event.seq, "hook queue full; event not delivered to hook");
                }
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

/// The `TK_*` environment of a hook run.
pub fn hook_env(event: &Event) -> Vec<(String, String)> {
    let mut env = vec![
        ("TK_EVENT".to_string(), event.type_name().to_string()),
        ("TK_SEQ".to_string(), event.seq.to_string()),
    ];
    let mut add = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            env.push((k.to_string(), v.to_string()));
        }
    };
    add("TK_SERVICE", event.kind.service());
    add("TK_TUNNEL", event.kind.tunnel());
    if let EventKind::PrimaryChanged { from, to, .. } = &event.kind {
        add("TK_FROM", from.as_deref());
        add("TK_TO", to.as_deref());
    }
    env
}
