//! Child-process supervision against real processes: groups, signals, output, exits, `run`.

mod common;

use std::time::{Duration, Instant};

use common::{argv, eventually, gone, PATIENCE};
use tunnelkeeper_providers::process::{
    self, ExitInfo, OutputLine, OutputStream, RunSpec, SpawnSpec,
};
use tunnelkeeper_providers::ProviderError;

fn spec(parts: &[&str]) -> SpawnSpec {
    SpawnSpec {
        argv: argv(parts),
        tag: "test/process".to_string(),
        ..SpawnSpec::default()
    }
}

#[tokio::test]
async fn output_lines_reach_every_watcher_with_their_stream() {
    let child = process::spawn(spec(&[
        "sh",
        "-c",
        "echo one; echo two >&2; echo three; exec sleep 1000",
    ]))
    .await
    .expect("spawn");
    let mut early = child.lines();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let line = tokio::time::timeout(PATIENCE, early.next())
            .await
            .expect("lines in time")
            .expect("stream open");
        seen.push(line);
    }
    let stdout: Vec<&str> = seen
        .iter()
        .filter(|l| l.stream == OutputStream::Stdout)
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(stdout, ["one", "three"]);
    assert!(seen.contains(&OutputLine {
        stream: OutputStream::Stderr,
        text: "two".to_string()
    }));

    // A watcher that subscribes later still gets what was printed before.
    let mut late = child.lines();
    let mut replay = Vec::new();
    for _ in 0..3 {
        replay.push(late.next().await.expect("backlog").text);
    }
    replay.sort();
    assert_eq!(replay, ["one", "three", "two"]);
    child.terminate(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn exit_is_seen_by_many_tasks_and_described() {
    let child = std::sync::Arc::new(
        process::spawn(spec(&["sh", "-c", "echo bye; exit 3"]))
            .await
            .expect("spawn"),
    );
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let child = child.clone();
            tokio::spawn(async move { child.exited().await })
        })
        .collect();
    for waiter in waiters {
        let info = tokio::time::timeout(PATIENCE, waiter)
            .await
            .expect("in time")
            .expect("join");
        assert_eq!(info, ExitInfo::Code(3));
    }
    assert_eq!(child.exited().await.to_string(), "exited with status 3");
    assert_eq!(child.try_exited(), Some(ExitInfo::Code(3)));
    let mut lines = child.lines();
    assert_eq!(lines.next().await.map(|l| l.text), Some("bye".to_string()));
    // Both pipes closed: the stream ends instead of hanging.
    assert_eq!(
        tokio::time::timeout(PATIENCE, lines.next())
            .await
            .expect("ends"),
        None
    );
    assert_eq!(
        ExitInfo::Signal(9).to_string(),
        "killed by signal 9 (SIGKILL)"
    );
}

#[tokio::test]
async fn terminate_escalates_to_sigkill_after_grace() {
    // SIG_IGN survives exec, so the `sleep` ignores SIGTERM too.
    let child = process::spawn(spec(&[
        "sh",
        "-c",
        "trap '' TERM; echo ready; exec sleep 1000",
    ]))
    .await
    .expect("spawn");
    let mut lines = child.lines();
    tokio::time::timeout(PATIENCE, lines.next())
        .await
        .expect("ready in time");
    let grace = Duration::from_millis(300);
    let started = Instant::now();
    child.terminate(grace).await;
    let took = started.elapsed();
    assert!(took >= grace, "killed before the grace ran out ({took:?})");
    assert!(took < grace + PATIENCE, "terminate took {took:?}");
    assert_eq!(child.try_exited(), Some(ExitInfo::Signal(9)));
    // Idempotent.
    child.terminate(grace).await;
}

#[tokio::test]
async fn terminate_kills_grandchildren_in_the_group() {
    let child = process::spawn(spec(&["sh", "-c", "sleep 1000 & echo $!; sleep 1000"]))
        .await
        .expect("spawn");
    let mut lines = child.lines();
    let grandchild: u32 = tokio::time::timeout(PATIENCE, lines.next())
        .await
        .expect("pid in time")
        .expect("a line")
        .text
        .parse()
        .expect("a pid");
    assert!(!gone(grandchild));
    child.terminate(Duration::from_secs(5)).await;
    assert_eq!(child.try_exited(), Some(ExitInfo::Signal(15)));
    assert!(
        eventually(PATIENCE, || async { gone(grandchild) }).await,
        "grandchild {grandchild} survived"
    );
    assert!(gone(child.pid()));
}

#[tokio::test]
async fn dropping_the_handle_kills_the_group() {
    let child = process::spawn(spec(&["sh", "-c", "sleep 1000 & echo $!; wait"]))
        .await
        .expect("spawn");
    let leader = child.pid();
    let mut lines = child.lines();
    let grandchild: u32 = tokio::time::timeout(PATIENCE, lines.next())
        .await
        .expect("pid in time")
        .expect("a line")
        .text
        .parse()
        .expect("a pid");
    drop(lines);
    drop(child);
    assert!(eventually(PATIENCE, || async { gone(leader) && gone(grandchild) }).await);
}

#[tokio::test]
async fn leader_exit_sweeps_what_it_left_behind() {
    let child = process::spawn(spec(&["sh", "-c", "sleep 1000 & echo $!"]))
        .await
        .expect("spawn");
    let mut lines = child.lines();
    let grandchild: u32 = tokio::time::timeout(PATIENCE, lines.next())
        .await
        .expect("pid in time")
        .expect("a line")
        .text
        .parse()
        .expect("a pid");
    assert_eq!(
        tokio::time::timeout(PATIENCE, child.exited())
            .await
            .expect("exit"),
        ExitInfo::Code(0)
    );
    assert!(
        eventually(PATIENCE, || async { gone(grandchild) }).await,
        "orphan {grandchild} survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_outlives_the_thread_that_asked_for_it() {
    // PR_SET_PDEATHSIG fires when the *forking thread* exits. Ask from a short-lived thread: the
    // child must survive it, because the fork happened on the spawner thread.
    let handle = tokio::runtime::Handle::current();
    let child =
        std::thread::spawn(move || handle.block_on(process::spawn(spec(&["sleep", "1000"]))))
            .join()
            .expect("thread")
            .expect("spawn");
    let survived = !eventually(Duration::from_millis(500), || async {
        child.try_exited().is_some()
    })
    .await;
    assert!(
        survived,
        "child died with the asking thread: {:?}",
        child.try_exited()
    );
    child.terminate(Duration::from_secs(5)).await;
    assert!(gone(child.pid()));
}

#[tokio::test]
async fn spawn_reports_missing_binary_and_empty_argv() {
    match process::spawn(spec(&["tk-no-such-program-xyz", "--flag"])).await {
        Err(ProviderError::MissingBinary { binary, hint }) => {
            assert_eq!(binary, "tk-no-such-program-xyz");
            assert!(hint.contains("binary:"), "{hint}");
        }
        other => panic!("expected MissingBinary, got {other:?}"),
    }
    assert!(matches!(
        process::spawn(spec(&[])).await,
        Err(ProviderError::Config(_))
    ));
}

#[tokio::test]
async fn spawn_passes_env_and_cwd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = process::spawn(SpawnSpec {
        argv: argv(&["sh", "-c", "echo \"$TK_SECRET $(pwd)\""]),
        env: vec![("TK_SECRET".to_string(), "s3cret".to_string())],
        cwd: Some(dir.path().to_path_buf()),
        tag: "test/env".to_string(),
        redact: Vec::new(),
    })
    .await
    .expect("spawn");
    let line = tokio::time::timeout(PATIENCE, child.lines().next())
        .await
        .expect("in time")
        .expect("line");
    let cwd = dir.path().canonicalize().expect("canonical");
    assert_eq!(line.text, format!("s3cret {}", cwd.display()));
}

fn run_spec(parts: &[&str]) -> RunSpec {
    RunSpec {
        tag: "test/run".to_string(),
        ..RunSpec::new(argv(parts))
    }
}

#[tokio::test]
async fn run_captures_status_and_output() {
    let out = process::run(run_spec(&["sh", "-c", "echo out; echo err >&2; exit 4"]))
        .await
        .expect("run");
    assert_eq!(out.status, ExitInfo::Code(4));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(!out.timed_out);
}

#[tokio::test]
async fn run_delivers_stdin() {
    let out = process::run(RunSpec {
        stdin: Some(b"hello\nworld\n".to_vec()),
        ..run_spec(&["cat"])
    })
    .await
    .expect("run");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"hello\nworld\n");
}

#[tokio::test]
async fn run_kills_the_group_at_timeout() {
    let started = Instant::now();
    let out = process::run(RunSpec {
        timeout: Duration::from_millis(300),
        ..run_spec(&["sh", "-c", "echo started; sleep 1000 & sleep 1000"])
    })
    .await
    .expect("run");
    assert!(out.timed_out);
    assert_eq!(out.status, ExitInfo::Signal(9));
    assert_eq!(out.stdout, b"started\n");
    // The background sleep held stdout too; the group kill closed it, so no drain wait.
    assert!(started.elapsed() < PATIENCE, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn run_caps_output_but_drains_it() {
    let out = process::run(RunSpec {
        output_cap: 1000,
        ..run_spec(&["sh", "-c", "head -c 1000000 /dev/zero; echo done >&2"])
    })
    .await
    .expect("run");
    assert!(out.status.success(), "{}", out.status);
    assert_eq!(out.stdout.len(), 1000);
    assert_eq!(out.stderr, b"done\n");
}

#[tokio::test]
async fn run_reports_missing_binary() {
    assert!(matches!(
        process::run(run_spec(&["/nonexistent/tk-tool"])).await,
        Err(ProviderError::MissingBinary { binary, .. }) if binary == "/nonexistent/tk-tool"
    ));
}

#[tokio::test]
async fn secrets_the_child_prints_are_masked_and_colours_stripped() {
    let mut spawn = spec(&[
        "sh",
        "-c",
        "printf 'bad token tk-0123456789abcdef\\n\\033[32mgreen\\033[0m\\n'; exec sleep 1000",
    ]);
    spawn.redact = vec!["tk-0123456789abcdef".to_string()];
    let child = process::spawn(spawn).await.expect("spawn");
    let mut lines = child.lines();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(PATIENCE, lines.next())
            .await
            .expect("lines in time")
            .expect("stream open");
        seen.push(line.text);
    }
    assert_eq!(seen, ["bad token MASKED", "green"]);
    child.terminate(std::time::Duration::from_secs(1)).await;
}
