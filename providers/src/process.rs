//! Child-process supervision shared by every CLI-based provider (and the daemon's hooks and
//! exec probes).
//!
//! Every child runs in its own process group, so a signal reaches whatever it started too, and
//! gets `SIGKILL` if the daemon dies (`PR_SET_PDEATHSIG`). That death signal is tied to the
//! *thread* that forked, so all forks happen on one dedicated, never-ending spawner thread:
//! forking from a tokio worker or blocking thread that later retires would kill the child for
//! no reason. The spawner enters the caller's runtime for each request, so the child is reaped
//! by the runtime that asked for it.
//!
//! [`spawn`] starts a long-running child and returns a [`Supervised`] handle: its output lines
//! go to tracing and to any number of watchers ([`Supervised::lines`]), its exit can be awaited
//! from many tasks ([`Supervised::exited`]), and [`Supervised::terminate`] stops the whole group
//! (`SIGTERM`, then `SIGKILL` after a grace period). [`run`] runs a command to completion with a
//! timeout and captured, capped output. Either way no process outlives its handle: when the
//! group leader exits, or the handle is dropped, the rest of the group is killed.
//!
//! Every child starts from a cleared environment plus an allowlist ([`child_env`]), and the
//! daemon becomes a child subreaper ([`become_subreaper`]) so that what escapes a process group
//! with `setsid` is still ours to reap and to kill on the way out ([`kill_orphans`]).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, oneshot, watch};

use crate::util::lock;
use crate::ProviderError;

/// Where tracing puts child output and lifecycle lines.
const LOG_TARGET: &str = "tunnelkeeper::child";
/// Longest output line kept; the rest of an overlong line is dropped (a child printing a
/// megabyte without a newline must not make us buffer it).
const MAX_LINE: usize = 8 * 1024;
/// Lines remembered for watchers that subscribe late (a provider subscribes right after
/// spawning, and the child may already have printed its endpoint).
const HISTORY: usize = 256;
/// How long to wait for the kernel to reap a group after `SIGKILL` before giving up and
/// logging (a process stuck in uninterruptible sleep cannot be helped).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long `run` keeps reading output after the command exited, in case something outside
/// its group still holds the pipes.
const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// The hint given when a program is not installed. Generic: it also reaches `command` tunnels,
/// hooks and `exec` probes, which have no `binary:` key (agents' providers give their own).
const MISSING_HINT: &str =
    "install it, or name it by its full path (`run[0]` of a command tunnel, `binary:` of an \
     agent); `tunnelkeeper check --deep` finds every missing program";

/// What to start as a long-running child.
#[derive(Clone, Default)]
pub struct SpawnSpec {
    /// The program and its arguments, run directly (no shell).
    pub argv: Vec<String>,
    /// The child's own environment variables (the place for secrets), on top of the
    /// allowlisted part of the daemon's ([`child_env`]).
    pub env: Vec<(String, String)>,
    /// The working directory, if not the daemon's.
    pub cwd: Option<PathBuf>,
    /// Who the child is, for log lines, e.g. `service/tunnel`.
    pub tag: String,
    /// Secrets the child might echo (a token it rejects, say): replaced by `MASKED` in every
    /// output line before it is logged or kept.
    pub redact: Vec<String>,
}

impl fmt::Debug for SpawnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnSpec")
            .field("argv", &self.argv)
            .field("env", &EnvNames(&self.env))
            .field("cwd", &self.cwd)
            .field("tag", &self.tag)
            .finish()
    }
}

/// What to run to completion.
#[derive(Clone)]
pub struct RunSpec {
    /// The program and its arguments, run directly (no shell).
    pub argv: Vec<String>,
    /// The command's own environment variables, on top of the allowlisted part of the
    /// daemon's ([`child_env`]).
    pub env: Vec<(String, String)>,
    /// Bytes fed to the command's stdin (then closed); `None` gives it `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// How long the command may run before its group is killed.
    pub timeout: Duration,
    /// How many bytes of stdout, and of stderr, to keep; the rest is read and dropped.
    pub output_cap: usize,
    /// Who runs it, for log lines, e.g. `hook/notify`.
    pub tag: String,
}

impl RunSpec {
    /// A spec with no extra environment, no stdin, a 10 s timeout and a 64 KiB output cap.
    pub fn new(argv: Vec<String>) -> RunSpec {
        RunSpec {
            argv,
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(10),
            output_cap: 64 * 1024,
            tag: String::new(),
        }
    }
}

impl fmt::Debug for RunSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunSpec")
            .field("argv", &self.argv)
            .field("env", &EnvNames(&self.env))
            .field("stdin", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .field("output_cap", &self.output_cap)
            .field("tag", &self.tag)
            .finish()
    }
}

/// Prints environment variable names only: values are where secrets live.
struct EnvNames<'a>(&'a [(String, String)]);

impl fmt::Debug for EnvNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("{name}=MASKED")))
            .finish()
    }
}

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitInfo {
    /// It exited by itself with this status.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
    /// Its end could not be observed (waiting failed, or supervision was torn down).
    Unknown(String),
}

impl ExitInfo {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitInfo::Code(0))
    }
}

impl From<ExitStatus> for ExitInfo {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo::Code(code),
            (None, Some(signal)) => ExitInfo::Signal(signal),
            (None, None) => ExitInfo::Unknown(status.to_string()),
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exited with status {code}"),
            ExitInfo::Signal(signal) => match Signal::try_from(*signal) {
                Ok(name) => write!(f, "killed by signal {signal} ({})", name.as_str()),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            ExitInfo::Unknown(why) => write!(f, "exit unknown: {why}"),
        }
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// One line a child printed, without its line ending (invalid UTF-8 replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// The pipe it came from.
    pub stream: OutputStream,
    /// The text.
    pub text: String,
}

/// A child's output lines as they arrive, for one watcher. Created by [`Supervised::lines`].
#[derive(Debug)]
pub struct Lines {
    backlog: VecDeque<OutputLine>,
    live: Option<broadcast::Receiver<OutputLine>>,
}

impl Lines {
    /// The next line, or `None` once the child closed both pipes and every line was seen. A
    /// watcher too slow to keep up skips the lines it missed rather than stall the child.
    pub async fn next(&mut self) -> Option<OutputLine> {
        if let Some(line) = self.backlog.pop_front() {
            return Some(line);
        }
        let live = self.live.as_mut()?;
        loop {
            match live.recv().await {
                Ok(line) => return Some(line),
                // Missed lines are gone; carry on with the ones that follow.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    self.live = None;
                    return None;
                }
            }
        }
    }
}

/// Output shared between the pipe readers and the watchers. One lock covers both the history
/// and the live channel so a watcher that subscribes sees every line exactly once.
struct OutputState {
    history: VecDeque<OutputLine>,
    /// Dropped when both pipes are closed, which ends every watcher's stream.
    live: Option<broadcast::Sender<OutputLine>>,
    open_pipes: u8,
}

type SharedOutput = Arc<Mutex<OutputState>>;

/// A running child in its own process group. Dropping it kills the group if it still runs.
pub struct Supervised {
    pid: u32,
    tag: String,
    exit: watch::Receiver<Option<ExitInfo>>,
    output: SharedOutput,
}

impl fmt::Debug for Supervised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervised")
            .field("pid", &self.pid)
            .field("tag", &self.tag)
            .field("exit", &*self.exit.borrow())
            .finish()
    }
}

impl Supervised {
    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How the child ended, if it has.
    pub fn try_exited(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Resolves once the child has exited and been reaped; at once if it already has. May be
    /// awaited repeatedly and from many tasks.
    pub async fn exited(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        let info = match exit.wait_for(Option::is_some).await {
            Ok(seen) => seen.clone(),
            Err(_) => None,
        };
        // The reaper only goes away without a verdict when its runtime shuts down, and then
        // tokio's kill-on-drop has already killed the child.
        info.unwrap_or_else(|| ExitInfo::Unknown("supervision ended".to_string()))
    }

    /// Every output line from now on, preceded by up to the last 256 lines printed before the
    /// call.
    pub fn lines(&self) -> Lines {
        let output = lock(&self.output);
        Lines {
            backlog: output.history.clone(),
            live: output.live.as_ref().map(broadcast::Sender::subscribe),
        }
    }

    /// The last line the child printed on either pipe, if any (for error messages).
    pub fn last_line(&self) -> Option<String> {
        lock(&self.output).history.back().map(|l| l.text.clone())
    }

    /// Stops the whole group: `SIGTERM`, then `SIGKILL` if the leader has not exited after
    /// `grace`, then waits for the reap. Returns at once if the child already exited.
    /// Idempotent, and safe to call from several tasks.
    pub async fn terminate(&self, grace: Duration) {
        if self.try_exited().is_some() {
            return;
        }
        signal_group(self.pid, Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_ok() {
            return;
        }
        tracing::warn!(target: LOG_TARGET, tunnel = %self.tag, pid = self.pid, "still running {grace:?} after SIGTERM; sending SIGKILL");
        signal_group(self.pid, Signal::SIGKILL);
        if tokio::time::timeout(KILL_WAIT, self.exited())
            .await
            .is_err()
        {
            tracing::error!(target: LOG_TARGET, tunnel = %self.tag, pid = self.pid, "not reaped {KILL_WAIT:?} after SIGKILL");
        }
    }

    /// Sends `signal` to the child's whole process group, unless it already exited (then the
    /// group id may soon belong to someone else).
    pub fn signal(&self, signal: Signal) {
        if self.try_exited().is_none() {
            signal_group(self.pid, signal);
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.try_exited().is_none() {
            signal_group(self.pid, Signal::SIGKILL);
        }
    }
}

/// Signals a process group, ignoring "no such group" (it is already gone, which is the goal).
fn signal_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else {
        return;
    };
    if let Err(err) = killpg(Pid::from_raw(raw), signal) {
        if err != nix::errno::Errno::ESRCH {
            tracing::warn!(target: LOG_TARGET, pgid, %err, "cannot send {} to process group", signal.as_str());
        }
    }
}

/// Kills a process group when dropped: whatever `run` started goes away with it, whether it
/// returned normally or its future was cancelled.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

/// Starts a long-running child: own process group, `SIGKILL` on daemon death, stdin from
/// `/dev/null`, stdout and stderr read line by line into tracing and [`Supervised::lines`].
pub async fn spawn(spec: SpawnSpec) -> Result<Supervised, ProviderError> {
    let SpawnSpec {
        argv,
        env,
        cwd,
        tag,
        redact,
    } = spec;
    let redact: Arc<[String]> = redact.into_iter().filter(|s| !s.is_empty()).collect();
    let mut cmd = command(&argv, &env, cwd.clone())?;
    cmd.stdin(Stdio::null());
    let mut child = spawn_on_spawner(cmd, &argv, cwd.as_ref()).await?;
    let pid = child_pid(&child)?;
    tracing::info!(target: LOG_TARGET, tunnel = %tag, pid, "started {:?}", argv);

    let (live, _) = broadcast::channel(HISTORY);
    let output = Arc::new(Mutex::new(OutputState {
        history: VecDeque::new(),
        live: Some(live),
        open_pipes: 2,
    }));
    let pipes = [
        (
            OutputStream::Stdout,
            child.stdout.take().map(|p| Box::new(p) as BoxedPipe),
        ),
        (
            OutputStream::Stderr,
            child.stderr.take().map(|p| Box::new(p) as BoxedPipe),
        ),
    ];
    for (stream, pipe) in pipes {
        tokio::spawn(forward_lines(
            pipe,
            stream,
            tag.clone(),
            output.clone(),
            redact.clone(),
        ));
    }

    let (exit_tx, exit) = watch::channel(None);
    tokio::spawn(reap(child, pid, tag.clone(), exit_tx));
    Ok(Supervised {
        pid,
        tag,
        exit,
        output,
    })
}

type BoxedPipe = Box<dyn AsyncRead + Send + Unpin>;

/// Waits for the group leader, sweeps the rest of its group, and publishes how it ended.
async fn reap(mut child: Child, pid: u32, tag: String, exit_tx: watch::Sender<Option<ExitInfo>>) {
    let info = match child.wait().await {
        Ok(status) => ExitInfo::from(status),
        Err(err) => ExitInfo::Unknown(format!("wait failed: {err}")),
    };
    // The leader is gone; anything it left running in its group would be an orphan. While a
    // member remains, the kernel keeps the group id reserved, so this cannot hit a stranger.
    signal_group(pid, Signal::SIGKILL);
    tracing::info!(target: LOG_TARGET, tunnel = %tag, pid, "{info}");
    exit_tx.send_replace(Some(info));
}

/// Removes terminal colour and cursor sequences (`ESC [ ... letter`): many tunnel clients colour
/// their logs even into a pipe, and the codes would end up in the journal and in endpoints
/// captured by `endpoint_regex`.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, up to the final byte (a letter, @ to ~).
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads one pipe line by line into tracing and the shared output.
async fn forward_lines(
    pipe: Option<BoxedPipe>,
    stream: OutputStream,
    tag: String,
    output: SharedOutput,
    redact: Arc<[String]>,
) {
    if let Some(pipe) = pipe {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            match read_line_capped(&mut reader, &mut buf).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => {
                    tracing::debug!(target: LOG_TARGET, tunnel = %tag, stream = stream.as_str(), %err, "cannot read child output");
                    break;
                }
            }
            let mut text = strip_ansi(&String::from_utf8_lossy(&buf));
            for secret in redact.iter() {
                if text.contains(secret.as_str()) {
                    text = text.replace(secret.as_str(), "MASKED");
                }
            }
            tracing::info!(target: LOG_TARGET, tunnel = %tag, stream = stream.as_str(), "{text}");
            let line = OutputLine { stream, text };
            let mut state = lock(&output);
            if state.history.len() == HISTORY {
                state.history.pop_front();
            }
            state.history.push_back(line.clone());
            if let Some(live) = &state.live {
                // No watcher is fine: the line is in the history.
                let _ = live.send(line);
            }
        }
    }
    let mut state = lock(&output);
    state.open_pipes = state.open_pipes.saturating_sub(1);
    if state.open_pipes == 0 {
        state.live = None;
    }
}

/// Reads one line into `buf` (without the line ending, at most [`MAX_LINE`] bytes kept).
/// Returns `false` at end of input with nothing read.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    buf.clear();
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        read_any = true;
        let (chunk, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(read_any)
}

/// How a command run to completion by [`run`] ended.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// How it ended (`Signal(9)` if it was killed at the timeout).
    pub status: ExitInfo,
    /// The first `output_cap` bytes of its stdout.
    pub stdout: Vec<u8>,
    /// The first `output_cap` bytes of its stderr.
    pub stderr: Vec<u8>,
    /// Whether it was killed for running past its timeout.
    pub timed_out: bool,
}

/// Runs a command to completion in its own process group (killed with it if the daemon dies),
/// feeding it `stdin`, keeping the first `output_cap` bytes of each output, and killing the
/// group at `timeout`. Whatever the command left running in its group is killed when it ends.
pub async fn run(spec: RunSpec) -> Result<RunOutput, ProviderError> {
    let RunSpec {
        argv,
        env,
        stdin,
        timeout,
        output_cap,
        tag,
    } = spec;
    let mut cmd = command(&argv, &env, None)?;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = spawn_on_spawner(cmd, &argv, None).await?;
    let pid = child_pid(&child)?;
    let _group = GroupGuard(pid);
    tracing::debug!(target: LOG_TARGET, tunnel = %tag, pid, "running {:?}", argv);

    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            // A command that does not read its input closes the pipe early; that is its call.
            let _ = pipe.write_all(&input).await;
        });
    }
    let stdout = tokio::spawn(read_capped(child.stdout.take(), output_cap));
    let stderr = tokio::spawn(read_capped(child.stderr.take(), output_cap));

    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(waited) => (exit_info(waited), false),
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            match tokio::time::timeout(KILL_WAIT, child.wait()).await {
                Ok(waited) => (exit_info(waited), true),
                Err(_) => (
                    ExitInfo::Unknown(format!("not reaped {KILL_WAIT:?} after SIGKILL")),
                    true,
                ),
            }
        }
    };
    // Close the pipes held by anything the command left behind, so the readers see EOF.
    signal_group(pid, Signal::SIGKILL);
    let stdout = collect(stdout).await;
    let stderr = collect(stderr).await;
    tracing::debug!(target: LOG_TARGET, tunnel = %tag, pid, timed_out, "{status}");
    Ok(RunOutput {
        status,
        stdout,
        stderr,
        timed_out,
    })
}

fn exit_info(waited: io::Result<ExitStatus>) -> ExitInfo {
    match waited {
        Ok(status) => ExitInfo::from(status),
        Err(err) => ExitInfo::Unknown(format!("wait failed: {err}")),
    }
}

/// Reads a pipe to its end, keeping the first `cap` bytes: the rest must still be read, or a
/// chatty command would block on a full pipe.
async fn read_capped<R: AsyncRead + Unpin>(pipe: Option<R>, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    kept
}

/// Waits a little for a pipe reader; whatever escaped the group may hold the pipe forever.
async fn collect(reader: tokio::task::JoinHandle<Vec<u8>>) -> Vec<u8> {
    let abort = reader.abort_handle();
    match tokio::time::timeout(DRAIN_WAIT, reader).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => Vec::new(),
        Err(_) => {
            abort.abort();
            Vec::new()
        }
    }
}

/// Variables of the daemon's own environment that every child inherits. Everything else —
/// `SSH_AUTH_SOCK`, `CREDENTIALS_DIRECTORY`, `NOTIFY_SOCKET`, a token someone exported for the
/// daemon — stays with the daemon: children are third-party binaries and operator scripts.
pub const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TZ"];
/// Daemon variables with this prefix are inherited too (the operator's own settings for hooks).
pub const INHERITED_ENV_PREFIX: &str = "TK_";

/// The whole environment of a child: the allowlisted part of the daemon's environment
/// ([`INHERITED_ENV`], `TK_*`), then the child's `own` variables, which win on a clash. The one
/// place that decides what a child sees; every spawn goes through it.
pub fn child_env(own: &[(String, String)]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(name, _)| {
            let name = name.to_string_lossy();
            INHERITED_ENV.contains(&name.as_ref()) || name.starts_with(INHERITED_ENV_PREFIX)
        })
        .collect();
    env.extend(own.iter().map(|(k, v)| (k.into(), v.into())));
    env
}

/// Builds the command: argv without a shell, a cleared environment plus [`child_env`], own
/// process group, death signal,
/// piped output, and kill-on-drop as a last resort if the reaping runtime goes away.
fn command(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<PathBuf>,
) -> Result<Command, ProviderError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(ProviderError::Config(
            "the command is empty: give at least the program to run".to_string(),
        ));
    };
    if program.is_empty() {
        return Err(ProviderError::Config(
            "the program name is empty".to_string(),
        ));
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(child_env(env))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    crate::sys::kill_child_with_parent(&mut cmd);
    Ok(cmd)
}

fn child_pid(child: &Child) -> Result<u32, ProviderError> {
    child.id().ok_or_else(|| {
        ProviderError::Spawn("the child was reaped before its pid was read".to_string())
    })
}

/// A fork request for the spawner thread.
struct SpawnRequest {
    cmd: Command,
    /// The runtime that will reap the child and drive its pipes.
    runtime: Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The channel to the spawner thread, started on first use and never stopped.
static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

/// Hands `cmd` to the spawner thread and maps the outcome to a [`ProviderError`].
async fn spawn_on_spawner(
    cmd: Command,
    argv: &[String],
    cwd: Option<&PathBuf>,
) -> Result<Child, ProviderError> {
    let runtime = Handle::try_current()
        .map_err(|err| ProviderError::Spawn(format!("spawning needs a tokio runtime: {err}")))?;
    let (reply, answer) = oneshot::channel();
    send_to_spawner(SpawnRequest {
        cmd,
        runtime,
        reply,
    })?;
    let spawned = answer
        .await
        .map_err(|_| ProviderError::Spawn("the spawner thread did not answer".to_string()))?;
    spawned.map_err(|err| spawn_error(err, argv, cwd))
}

fn send_to_spawner(request: SpawnRequest) -> Result<(), ProviderError> {
    let mut spawner = lock(&SPAWNER);
    let sender = match spawner.as_ref() {
        Some(sender) => sender.clone(),
        None => {
            let (sender, requests) = mpsc::channel();
            std::thread::Builder::new()
                .name("tk-spawner".to_string())
                .spawn(move || spawner_loop(requests))
                .map_err(|err| {
                    ProviderError::Spawn(format!("cannot start the spawner thread: {err}"))
                })?;
            spawner.insert(sender).clone()
        }
    };
    drop(spawner);
    sender
        .send(request)
        .map_err(|_| ProviderError::Spawn("the spawner thread is gone".to_string()))
}

/// The spawner thread's life: fork whatever is asked, inside the asker's runtime. It never
/// returns while the daemon runs, because the sender lives in a static.
fn spawner_loop(requests: mpsc::Receiver<SpawnRequest>) {
    for request in requests {
        // A panic inside one spawn (say, a runtime caught mid-shutdown) must not take the
        // spawner down for everyone else; the asker then sees its reply dropped.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(request)));
        if served.is_err() {
            tracing::error!(target: LOG_TARGET, "spawning a child panicked");
        }
    }
}

/// Forks one child inside the asker's runtime and hands it over.
fn serve(request: SpawnRequest) {
    let SpawnRequest {
        mut cmd,
        runtime,
        reply,
    } = request;
    let _entered = runtime.enter();
    if let Err(Ok(child)) = reply.send(cmd.spawn()) {
        // The asker gave up (its future was dropped); nobody will supervise this child.
        if let Some(pid) = child.id() {
            signal_group(pid, Signal::SIGKILL);
        }
        drop(child);
    }
}

/// Turns a failed spawn into the error kind callers match on.
fn spawn_error(err: io::Error, argv: &[String], cwd: Option<&PathBuf>) -> ProviderError {
    let program = argv.first().cloned().unwrap_or_default();
    match err.kind() {
        io::ErrorKind::NotFound => match cwd {
            Some(dir) if !dir.is_dir() => ProviderError::Spawn(format!(
                "cannot start `{program}`: working directory {} does not exist",
                dir.display()
            )),
            _ => ProviderError::MissingBinary {
                binary: program,
                hint: MISSING_HINT.to_string(),
            },
        },
        io::ErrorKind::PermissionDenied => {
            ProviderError::Spawn(format!("cannot start `{program}`: not executable ({err})"))
        }
        _ => ProviderError::Spawn(format!("cannot start `{program}`: {err}")),
    }
}

/// Makes this process the reaper of whatever its children leave behind
/// (`PR_SET_CHILD_SUBREAPER`): a hook that runs `setsid sleep 77 &` escapes the process-group
/// kill, but its orphan is re-parented to us instead of to init, so [`reap_orphans`] can collect
/// it and [`kill_orphans`] can end it with the daemon. Call once, early, from the daemon.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// The orphans adopted so far. Our own children are forked by the spawner thread and listed
/// under it; the kernel hands orphans to the first live thread of the reaper — the main thread,
/// which never forks — so its `children` list is exactly the adopted ones.
fn adopted() -> Vec<i32> {
    let me = std::process::id();
    std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Collects adopted orphans that have exited, so they do not linger as zombies. Never touches
/// the daemon's own children (their runtime reaps them).
pub fn reap_orphans() {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    for pid in adopted() {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if zombie {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Ends every adopted orphan (and its process group, if it leads one): `SIGTERM`, then
/// `SIGKILL` for whatever is still there after `grace`; orphans of orphans are adopted in turn
/// and get the same. Returns how many were signalled. For the daemon's way out.
pub async fn kill_orphans(grace: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + grace;
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        reap_orphans();
        let live = adopted();
        if live.is_empty() {
            return signalled.len();
        }
        let signal = if tokio::time::Instant::now() < deadline {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        for pid in live {
            if signal == Signal::SIGKILL || signalled.insert(pid) {
                tracing::info!(target: LOG_TARGET, pid, "ending a process a child left behind");
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                if nix::unistd::getpgid(Some(Pid::from_raw(pid))) == Ok(Pid::from_raw(pid)) {
                    let _ = killpg(Pid::from_raw(pid), signal);
                }
            }
        }
        if tokio::time::Instant::now() > deadline + KILL_WAIT {
            tracing::warn!(target: LOG_TARGET, "processes left behind by children survive SIGKILL");
            return signalled.len();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strips_colour_codes_and_keeps_text() {
        let line =
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m listening at 127.0.0.1:40121\u{1b}[0m";
        assert_eq!(strip_ansi(line), "2026  INFO listening at 127.0.0.1:40121");
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
