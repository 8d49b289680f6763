//! Router reboot recovery and drift healing against a real OpenSSH sshd standing in for the
//! router: its "boot id" is a file the test controls (`cat DIR/boot_id`), provisioning touches a
//! marker file and appends to `provision.log` (so runs can be counted), and the `verify` check
//! looks for the marker. A reboot is sshd killed with all its sessions, the boot id changed and
//! the marker removed, then sshd started again on the same port.

use tunnelkeeper_test_support::dropbear::Dropbear;
use tunnelkeeper_test_support::sshd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelkeeper::bus::{Bus, Delivery, Event, EventKind, Subscription};
use tunnelkeeper::config::spec::{RouterSpec, VerifySpec};
use tunnelkeeper::router::{boot_id_file, Routers};
use tunnelkeeper_providers::ssh::SshPool;

/// Generous: a loaded two-core machine may be slow, and waits end as soon as the event comes.
const WAIT: Duration = Duration::from_secs(20);

/// The router's files (boot id, marker, provision log) and the daemon's state directory.
struct Lab {
    files: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Lab {
    fn new(boot_id: &str) -> Lab {
        let b = Lab {
            files: tempfile::tempdir().expect("tempdir"),
            state: tempfile::tempdir().expect("tempdir"),
        };
        b.set_boot_id(boot_id);
        b
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    fn set_boot_id(&self, id: &str) {
        std::fs::write(self.path("boot_id"), format!("{id}\n")).expect("write boot_id");
    }

    fn marker(&self) -> PathBuf {
        self.path("marker")
    }

    fn remove_marker(&self) {
        std::fs::remove_file(self.marker()).expect("remove marker");
    }

    /// How many provisioning runs completed.
    fn provision_runs(&self) -> usize {
        std::fs::read_to_string(self.path("provision.log"))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    fn persisted_boot_id(&self, router: &str) -> Option<String> {
        std::fs::read_to_string(boot_id_file(self.state.path(), router))
            .ok()
            .map(|text| text.trim().to_string())
    }

    /// The router: boot id from the file, a provision that creates the marker (and logs the
    /// run), a check for the marker.
    fn spec(&self, name: &str, sshd: &sshd::Sshd) -> RouterSpec {
        self.spec_for(name, sshd.target())
    }

    /// [`Lab::spec`] for any SSH server (dropbear).
    fn spec_for(&self, name: &str, ssh: tunnelkeeper_providers::ssh::SshTarget) -> RouterSpec {
        let dir = self.files.path().display();
        RouterSpec {
            name: name.to_string(),
            ssh,
            boot_id_command: format!("cat {dir}/boot_id"),
            check_interval: Duration::from_secs(1),
            provision: vec![format!(
                "touch {dir}/marker && echo run >> {dir}/provision.log"
            )],
            verify: vec![VerifySpec {
                name: "marker".to_string(),
                command: format!("test -f {dir}/marker && echo yes"),
                expect: Some("yes".to_string()),
            }],
            verify_interval: Duration::from_secs(2),
            command_timeout: Duration::from_secs(10),
        }
    }

    fn start(&self, specs: &[RouterSpec], bus: &Arc<Bus>, cancel: &CancellationToken) -> Routers {
        Routers::start(
            specs,
            SshPool::new(),
            bus.clone(),
            self.state.path().to_path_buf(),
            cancel,
        )
    }
}

/// The bus as seen by the test: waits for events in order, keeping all of them for messages.
struct Events {
    subscription: Subscription,
    seen: Vec<Arc<Event>>,
}

impl Events {
    fn new(bus: &Arc<Bus>) -> Events {
        Events {
            subscription: bus.subscribe(),
            seen: Vec::new(),
        }
    }

    async fn next(&mut self, until: Instant) -> Option<Arc<Event>> {
        match tokio::time::timeout_at(until, self.subscription.next()).await {
            Ok(Some(Delivery::Event(event))) => {
                self.seen.push(event.clone());
                Some(event)
            }
            Ok(Some(Delivery::Lagged(n))) => panic!("the test fell {n} events behind"),
            Ok(None) => panic!("bus gone"),
            Err(_) => None,
        }
    }

    /// The next event matching `pred` (the ones before it are skipped), within [`WAIT`].
    async fn wait(&mut self, what: &str, pred: impl Fn(&EventKind) -> bool) -> Arc<Event> {
        let until = Instant::now() + WAIT;
        while let Some(event) = self.next(until).await {
            if pred(&event.kind) {
                return event;
            }
        }
        panic!("no {what} within {WAIT:?}; events so far:\n{}", self.log());
    }

    /// Every event published during `period`.
    async fn during(&mut self, period: Duration) -> Vec<Arc<Event>> {
        let until = Instant::now() + period;
        let mut events = Vec::new();
        while let Some(event) = self.next(until).await {
            events.push(event);
        }
        events
    }

    fn log(&self) -> String {
        self.seen
            .iter()
            .map(|e| serde_json::to_string(&**e).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn is(kind: &EventKind, type_name: &str) -> bool {
    kind.type_name() == type_name
}

fn count(events: &[Arc<Event>], type_name: &str) -> usize {
    events.iter().filter(|e| e.type_name() == type_name).count()
}

fn provisioned_cause(kind: &EventKind) -> Option<&str> {
    match kind {
        EventKind::RouterProvisioned { cause, .. } => Some(cause),
        _ => None,
    }
}

/// Waits for the first-contact sequence of a router whose checks fail at first: reconnected,
/// drift, provisioned (first_contact), verified — and no reboot.
async fn first_contact_with_provision(events: &mut Events) {
    events
        .wait("router_reconnected", |k| is(k, "router_reconnected"))
        .await;
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("first_contact"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert_eq!(
        count(&events.seen, "router_rebooted"),
        0,
        "{}",
        events.log()
    );
}

fn in_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_is_detected_once_and_healed_once() {
    let Some(mut sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let router = Lab::new("boot-1");
    let bus = Bus::new(4096);
    let mut events = Events::new(&bus);
    let cancel = CancellationToken::new();
    let routers = router.start(&[router.spec("r1", &sshd)], &bus, &cancel);

    // First contact: the id is recorded, not reported as a reboot; the missing marker is
    // provisioned as first_contact.
    first_contact_with_provision(&mut events).await;
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-1"));
    assert_eq!(router.provision_runs(), 1);
    assert_eq!(routers.board().connected("r1"), Some(true));

    // The "reboot": sshd and its sessions gone, a new boot id, provisioned state lost.
    sshd.kill();
    events
        .wait("router_connection_dropped", |k| {
            is(k, "router_connection_dropped")
        })
        .await;
    assert_eq!(routers.board().connected("r1"), Some(false));
    router.set_boot_id("boot-2");
    router.remove_marker();
    let before = events.seen.len();
    sshd.restart().await;

    events
        .wait("router_reconnected", |k| is(k, "router_reconnected"))
        .await;
    let rebooted = events
        .wait("router_rebooted", |k| is(k, "router_rebooted"))
        .await;
    assert_eq!(
        rebooted.kind,
        EventKind::RouterRebooted {
            router: "r1".into(),
            old_boot_id: Some("boot-1".into()),
            new_boot_id: "boot-2".into(),
        }
    );
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("reboot"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert!(router.marker().exists());

    // Several more check and verify intervals: nothing is provisioned a second time.
    events.during(Duration::from_millis(4500)).await;
    let after = &events.seen[before..];
    assert_eq!(count(after, "router_rebooted"), 1, "{}", events.log());
    assert_eq!(count(after, "router_provisioned"), 1, "{}", events.log());
    assert_eq!(
        count(after, "router_provision_failed"),
        0,
        "{}",
        events.log()
    );
    assert_eq!(
        router.provision_runs(),
        2,
        "{}",
        in_file(&router.path("provision.log"))
    );
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-2"));

    let status = routers.board().snapshot();
    assert_eq!(status.len(), 1);
    let r1 = &status[0];
    assert!(r1.connected);
    assert_eq!(r1.boot_id.as_deref(), Some("boot-2"));
    assert!(r1.last_reboot.is_some());
    let last = r1.last_provision.as_ref().expect("last_provision");
    assert!(last.ok && last.cause == "reboot", "{last:?}");
    assert_eq!(r1.checks[0].ok, Some(true));
    assert_eq!(r1.reason, None);
    routers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_found_by_several_checks_is_healed_by_one_provision() {
    let Some(sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let router = Lab::new("boot-1");
    // Two checks on one state directory, which the test removes at once (a rename), so one
    // verify round finds both failing.
    let dir = router.files.path().display().to_string();
    let mut spec = router.spec("r1", &sshd);
    spec.provision = vec![format!(
        "mkdir -p {dir}/state && touch {dir}/state/marker && echo ok > {dir}/state/flag \
         && echo run >> {dir}/provision.log"
    )];
    spec.verify = vec![
        VerifySpec {
            name: "marker".into(),
            command: format!("test -f {dir}/state/marker && echo yes"),
            expect: Some("yes".into()),
        },
        VerifySpec {
            name: "flag".into(),
            command: format!("cat {dir}/state/flag"),
            expect: Some("ok".into()),
        },
    ];
    let bus = Bus::new(4096);
    let mut events = Events::new(&bus);
    let cancel = CancellationToken::new();
    let routers = router.start(&[spec], &bus, &cancel);
    first_contact_with_provision(&mut events).await;
    assert_eq!(router.provision_runs(), 1);

    let before = events.seen.len();
    std::fs::rename(router.path("state"), router.path("state.gone")).expect("rename");
    let drift = events
        .wait("router_drift_detected", |k| is(k, "router_drift_detected"))
        .await;
    match &drift.kind {
        EventKind::RouterDriftDetected {
            router, expected, ..
        } => {
            assert_eq!(router, "r1");
            assert!(expected == "yes" || expected == "ok", "{expected}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("drift"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert!(router.path("state/marker").exists());

    // A few more verify rounds: all pass, nothing more is provisioned.
    events.during(Duration::from_millis(4500)).await;
    let after = &events.seen[before..];
    // Normally both checks fail in one round (two events); a round already under way during
    // the rename may see only the second one, and its provision heals both.
    let drifts = count(after, "router_drift_detected");
    assert!((1..=2).contains(&drifts), "{}", events.log());
    assert_eq!(count(after, "router_provisioned"), 1, "{}", events.log());
    assert!(count(after, "router_verified") >= 2, "{}", events.log());
    assert_eq!(router.provision_runs(), 2);
    routers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_is_not_a_reboot_but_a_reboot_while_down_is() {
    let Some(sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let router = Lab::new("boot-1");
    std::fs::write(router.marker(), "").expect("marker");
    let spec = router.spec("r1", &sshd);
    let bus = Bus::new(4096);
    let mut events = Events::new(&bus);
    let baseline = bus.subscriber_count();
    let cancel = CancellationToken::new();

    // First run: first contact, checks pass, nothing provisioned.
    let routers = router.start(std::slice::from_ref(&spec), &bus, &cancel);
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-1"));
    routers.stop().await;
    assert_eq!(bus.subscriber_count(), baseline);

    // Restart with the same boot id: reconnected and verified, never rebooted.
    let before = events.seen.len();
    let routers = router.start(std::slice::from_ref(&spec), &bus, &cancel);
    events
        .wait("router_reconnected", |k| is(k, "router_reconnected"))
        .await;
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    events.during(Duration::from_millis(3500)).await;
    let after = &events.seen[before..];
    assert_eq!(count(after, "router_rebooted"), 0, "{}", events.log());
    assert_eq!(count(after, "router_provisioned"), 0, "{}", events.log());
    routers.stop().await;

    // The router reboots while the daemon is down: exactly one router_rebooted on start.
    router.set_boot_id("boot-2");
    let before = events.seen.len();
    let routers = router.start(std::slice::from_ref(&spec), &bus, &cancel);
    let rebooted = events
        .wait("router_rebooted", |k| is(k, "router_rebooted"))
        .await;
    assert_eq!(
        rebooted.kind,
        EventKind::RouterRebooted {
            router: "r1".into(),
            old_boot_id: Some("boot-1".into()),
            new_boot_id: "boot-2".into(),
        }
    );
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("reboot"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    events.during(Duration::from_millis(3500)).await;
    let after = &events.seen[before..];
    assert_eq!(count(after, "router_rebooted"), 1, "{}", events.log());
    assert_eq!(count(after, "router_provisioned"), 1, "{}", events.log());
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-2"));
    assert_eq!(router.provision_runs(), 1);
    routers.stop().await;
    assert_eq!(bus.subscriber_count(), baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provision_is_reported_with_its_stderr_and_retried() {
    let Some(sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let router = Lab::new("boot-1");
    let dir = router.files.path().display().to_string();
    // Fails on its first run only (a counter file), as a flaky router script would.
    let flaky = format!(
        "n=$(cat {dir}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {dir}/count; \
         if [ $n -lt 2 ]; then echo boom >&2; exit 3; fi"
    );
    let mut spec = router.spec("r1", &sshd);
    spec.provision.insert(0, flaky.clone());
    let bus = Bus::new(4096);
    let mut events = Events::new(&bus);
    let cancel = CancellationToken::new();
    let routers = router.start(&[spec], &bus, &cancel);

    let failed = events
        .wait("router_provision_failed", |k| {
            is(k, "router_provision_failed")
        })
        .await;
    match &failed.kind {
        EventKind::RouterProvisionFailed {
            router,
            command,
            exit_status,
            reason,
            retry_in_ms,
        } => {
            assert_eq!(router, "r1");
            assert_eq!(command, &flaky);
            assert_eq!(*exit_status, Some(3));
            assert!(reason.contains("boom"), "{reason}");
            assert_eq!(*retry_in_ms, 1000);
        }
        other => panic!("unexpected {other:?}"),
    }
    let status = routers.board().snapshot();
    let last = status[0].last_provision.as_ref().expect("last_provision");
    assert!(!last.ok && last.error.as_deref().is_some_and(|e| e.contains("boom")));

    // The retry succeeds: the second command ran once, the checks pass.
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("first_contact"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert_eq!(count(&events.seen, "router_provision_failed"), 1);
    assert_eq!(router.provision_runs(), 1);
    assert_eq!(in_file(&router.path("count")).trim(), "2");
    let status = routers.board().snapshot();
    assert!(status[0].last_provision.as_ref().is_some_and(|p| p.ok));
    routers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfiguring_leaks_no_task_and_leaves_unchanged_routers_alone() {
    let Some(sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let router = Lab::new("boot-1");
    std::fs::write(router.marker(), "").expect("marker");
    let a = router.spec("r1", &sshd);
    let mut a_changed = a.clone();
    a_changed.check_interval = Duration::from_secs(2);
    let bus = Bus::new(4096);
    let mut events = Events::new(&bus);
    let baseline = bus.subscriber_count();
    let cancel = CancellationToken::new();
    let mut routers = router.start(std::slice::from_ref(&a), &bus, &cancel);
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert_eq!(routers.watchers(), 1);
    let with_router = bus.subscriber_count();
    assert_eq!(with_router, baseline + 1);

    // 100 reloads: changed, unchanged, changed back, unchanged, ...
    let mut restarts = 0;
    for i in 0..100 {
        let spec = if (i / 2) % 2 == 0 { &a_changed } else { &a };
        let (added, removed, changed) = routers.reconfigure(std::slice::from_ref(spec)).await;
        assert!(added.is_empty() && removed.is_empty(), "reload {i}");
        if i % 2 == 0 {
            assert_eq!(changed, ["r1"], "reload {i}");
            restarts += 1;
        } else {
            assert!(changed.is_empty(), "reload {i}: {changed:?}");
        }
        assert_eq!(routers.watchers(), 1, "reload {i}");
        assert_eq!(bus.subscriber_count(), with_router, "reload {i}");
    }
    assert_eq!(restarts, 50);

    // Let the last restarted router make contact, then reload it unchanged: no new contact.
    let until = Instant::now() + WAIT;
    while routers.board().connected("r1") != Some(true) {
        assert!(
            Instant::now() < until,
            "r1 never reachable after the reloads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    events.during(Duration::from_millis(1000)).await;
    let unchanged = routers.reconfigure(std::slice::from_ref(&a)).await;
    assert_eq!(unchanged, (vec![], vec![], vec![]));
    let quiet = events.during(Duration::from_millis(3500)).await;
    assert_eq!(count(&quiet, "router_reconnected"), 0, "{}", events.log());
    assert_eq!(routers.board().connected("r1"), Some(true));

    // A router added and removed again.
    let b = router.spec("r2", &sshd);
    let (added, removed, changed) = routers.reconfigure(&[a.clone(), b.clone()]).await;
    assert_eq!(
        (added, removed, changed),
        (vec!["r2".to_string()], vec![], vec![])
    );
    assert_eq!(routers.watchers(), 2);
    assert_eq!(bus.subscriber_count(), with_router + 1);
    events
        .wait("r2 reachable", |k| {
            is(k, "router_reconnected") && k.router() == Some("r2")
        })
        .await;
    let names: Vec<String> = routers
        .board()
        .snapshot()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["r1", "r2"]);
    let (added, removed, changed) = routers.reconfigure(std::slice::from_ref(&a)).await;
    assert_eq!(
        (added, removed, changed),
        (vec![], vec!["r2".to_string()], vec![])
    );
    assert_eq!(routers.watchers(), 1);
    assert_eq!(bus.subscriber_count(), with_router);
    assert_eq!(routers.board().connected("r2"), None);

    routers.stop().await;
    assert_eq!(bus.subscriber_count(), baseline);
}

/// Router `r1` on `ssh` with the given boot id check and verify intervals, running past its
/// first contact (provisioned as `first_contact`, verified).
struct Running {
    router: Lab,
    events: Events,
    routers: Routers,
    _bus: Arc<Bus>,
    _cancel: CancellationToken,
}

async fn running(
    ssh: tunnelkeeper_providers::ssh::SshTarget,
    check: Duration,
    verify: Duration,
) -> Running {
    let router = Lab::new("boot-1");
    let bus = Bus::new(4096);
    let mut events = Events::new(&bus);
    let cancel = CancellationToken::new();
    let mut spec = router.spec_for("r1", ssh);
    spec.check_interval = check;
    spec.verify_interval = verify;
    let routers = router.start(&[spec], &bus, &cancel);
    first_contact_with_provision(&mut events).await;
    Running {
        router,
        events,
        routers,
        _bus: bus,
        _cancel: cancel,
    }
}

/// Kills sshd (every session), then lets `change` alter the router, then starts sshd again
/// 1.5 s later: a quick reboot (or sshd restart) between two checks.
async fn bounce(sshd: &mut sshd::Sshd, change: impl FnOnce()) {
    sshd.kill();
    change();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sshd.restart().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_reboot_found_by_a_verify_round_is_a_reboot_not_drift() {
    // The verify round comes first: verify every 2 s, boot id checks only every 30 s. The
    // pool tells the watcher when the session dies and when the next one opens; the boot id is
    // read before the round's checks count.
    let Some(mut sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let Running {
        router,
        mut events,
        routers,
        ..
    } = running(
        sshd.target(),
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    let before = events.seen.len();

    bounce(&mut sshd, || {
        router.set_boot_id("boot-2");
        router.remove_marker();
    })
    .await;
    events
        .wait("router_connection_dropped", |k| {
            is(k, "router_connection_dropped")
        })
        .await;
    events
        .wait("router_reconnected", |k| is(k, "router_reconnected"))
        .await;
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(
        provisioned_cause(&provisioned.kind),
        Some("reboot"),
        "{}",
        events.log()
    );
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    let after = &events.seen[before..];
    assert_eq!(count(after, "router_rebooted"), 1, "{}", events.log());
    assert_eq!(
        count(after, "router_drift_detected"),
        0,
        "a reboot is never drift: {}",
        events.log()
    );
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-2"));
    routers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_the_same_boot_id_is_verified_at_once() {
    // The boot id check comes first: checks every second, verify only every 5 minutes. sshd
    // restarts with the same boot id but the provisioned state gone: it must be verified (and
    // healed as drift) right after the reconnect, not 5 minutes later.
    let Some(mut sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let Running {
        router,
        mut events,
        routers,
        ..
    } = running(
        sshd.target(),
        Duration::from_secs(1),
        Duration::from_secs(300),
    )
    .await;
    let before = events.seen.len();

    bounce(&mut sshd, || router.remove_marker()).await;
    events
        .wait("router_reconnected", |k| is(k, "router_reconnected"))
        .await;
    events
        .wait("router_drift_detected", |k| is(k, "router_drift_detected"))
        .await;
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("drift"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    assert!(router.marker().exists());
    let after = &events.seen[before..];
    assert_eq!(count(after, "router_rebooted"), 0, "{}", events.log());
    assert!(
        count(after, "router_connection_dropped") >= 1,
        "{}",
        events.log()
    );
    routers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_and_back_between_two_checks_is_a_drop_and_a_reconnect() {
    // Both intervals a minute long: only the pool's word (the session was lost) can reveal the
    // bounce in time. The watcher checks at once, finds the router gone, then back within half
    // a second of sshd's return, reads the boot id first and reports the reboot.
    let Some(mut sshd) = sshd::Sshd::start("").await else {
        return;
    };
    let Running {
        router,
        mut events,
        routers,
        ..
    } = running(
        sshd.target(),
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .await;
    let before = events.seen.len();
    bounce(&mut sshd, || {
        router.set_boot_id("boot-2");
        router.remove_marker();
    })
    .await;
    let started = Instant::now();
    events
        .wait("router_rebooted", |k| is(k, "router_rebooted"))
        .await;
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("reboot"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "seen long before the 60 s check interval"
    );
    let after = &events.seen[before..];
    assert!(
        count(after, "router_connection_dropped") >= 1,
        "{}",
        events.log()
    );
    assert!(count(after, "router_reconnected") >= 1, "{}", events.log());
    assert_eq!(count(after, "router_drift_detected"), 0, "{}", events.log());
    routers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropbear_router_is_provisioned_verified_and_its_reboot_healed() {
    // OpenWrt runs dropbear: boot id read, provision, verify and a reboot against the real one.
    let Some(mut server) = Dropbear::start().await else {
        return;
    };
    let Running {
        router,
        mut events,
        routers,
        ..
    } = running(
        server.target(),
        Duration::from_secs(1),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-1"));
    assert!(router.marker().exists());
    let before = events.seen.len();

    server.kill();
    router.set_boot_id("boot-2");
    router.remove_marker();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart().await;
    events
        .wait("router_rebooted", |k| is(k, "router_rebooted"))
        .await;
    let provisioned = events
        .wait("router_provisioned", |k| is(k, "router_provisioned"))
        .await;
    assert_eq!(provisioned_cause(&provisioned.kind), Some("reboot"));
    events
        .wait("router_verified", |k| is(k, "router_verified"))
        .await;
    let after = &events.seen[before..];
    assert_eq!(count(after, "router_rebooted"), 1, "{}", events.log());
    assert_eq!(count(after, "router_drift_detected"), 0, "{}", events.log());
    assert_eq!(router.persisted_boot_id("r1").as_deref(), Some("boot-2"));
    routers.stop().await;
}
