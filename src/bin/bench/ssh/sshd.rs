//! A throwaway OpenSSH server for the SSH bench, and the OpenSSH client commands run against it.
//!
//! The same approach as the provider tests (`providers/tests/sshd`), rewritten here with errors
//! instead of panics (that helper uses `tempfile` and `expect`, which a binary should not):
//! `/usr/sbin/sshd -D -e -f <generated config>` on `127.0.0.1:<free port>` with a throwaway
//! ed25519 host key and an `authorized_keys` holding a throwaway client key, all in the bench's
//! private directory, logging to `sshd.log` there. The config raises `MaxSessions` and
//! `MaxStartups` so the pool, not sshd, decides how channels spread over sessions.
//!
//! Also here: the OpenSSH client's arguments for that server, running one `ssh` command with a
//! time limit, and reading a process's memory and CPU time from `/proc`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::SshTarget;

/// Where Debian's openssh-server puts the daemon.
const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to accept connections after being started.
const READY_WAIT: Duration = Duration::from_secs(10);

/// One running sshd; killed (with every process it forked) when dropped.
pub(crate) struct Sshd {
    dir: PathBuf,
    /// The port it listens on.
    pub(crate) port: u16,
    /// The authorized client key (private key file).
    pub(crate) client_key: PathBuf,
    /// A known_hosts file with the host key's `[127.0.0.1]:PORT` line.
    pub(crate) known_hosts: PathBuf,
    /// The login user (whoever runs the bench; root on the bench machine).
    pub(crate) user: String,
    /// `sshd -V`, e.g. `OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19 ...`.
    pub(crate) version: String,
    child: Option<Child>,
}

impl Sshd {
    /// Starts sshd with its files in `dir`. `extra` config lines come first (for most keywords
    /// the first value wins). Unless `login_home`, sessions get `HOME` set to an empty
    /// directory: bash sources `~/.bashrc` for every command run over SSH, and on a developer
    /// box that file can cost more than the SSH round trip being measured (see
    /// docs/BENCHMARKS.md).
    pub(crate) async fn start(
        dir: &Path,
        extra: &[String],
        login_home: bool,
    ) -> anyhow::Result<Sshd> {
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} is not installed (apt-get install openssh-server)");
        }
        which("ssh").context("the OpenSSH client is needed for the comparisons")?;
        which("ssh-keygen").context("ssh-keygen is needed for throwaway keys")?;
        // The privilege separation directory; Debian creates it at boot only.
        fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let version = sshd_version();
        let host_key = keygen(dir, "host_ed25519")?;
        let client_key = keygen(dir, "id_ed25519")?;
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized)
            .with_context(|| format!("writing {}", authorized.display()))?;
        let host_public = public_key_text(&host_key.with_extension("pub"))?;
        let home = dir.join("home");
        fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        let mut lines: Vec<String> = extra.to_vec();
        if !login_home {
            let home = home.to_str().filter(|h| !h.contains([' ', '"', '\t']));
            let home =
                home.context("the bench directory's path must be plain text without spaces")?;
            lines.push(format!("SetEnv HOME={home}"));
        }

        // A port nobody listens on; retried if someone grabs it before sshd binds it.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let config = dir.join("sshd_config");
            let text = config_text(dir, port, &host_key, &authorized, &lines, &version);
            fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
            let known_hosts = dir.join("known_hosts");
            fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_public}\n"))
                .with_context(|| format!("writing {}", known_hosts.display()))?;
            let mut sshd = Sshd {
                dir: dir.to_path_buf(),
                port,
                client_key: client_key.clone(),
                known_hosts,
                user: current_user(),
                version: version.clone(),
                child: None,
            };
            if sshd.spawn(&config).await? {
                return Ok(sshd);
            }
            last_log = sshd.log();
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        bail!("sshd did not start; its log:\n{last_log}")
    }

    /// A target for the pool: the current user with the client key, strict host key checking
    /// against the prepared known_hosts, and the provider's defaults otherwise.
    pub(crate) fn target(&self) -> SshTarget {
        let mut target = SshTarget::new("127.0.0.1", &self.known_hosts);
        target.port = Some(self.port);
        target.user = Some(self.user.clone());
        target.identity_file = Some(self.client_key.clone());
        target
    }

    /// The OpenSSH client's options for this server (before the destination). `-F /dev/null`
    /// keeps the machine's and the user's ssh_config out of the comparison (no stray
    /// ControlMaster, GSSAPI or agent settings); `IdentitiesOnly` keeps an agent's keys out.
    pub(crate) fn client_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["-F", "/dev/null", "-i"].map(OsString::from).to_vec();
        args.push(self.client_key.clone().into_os_string());
        let mut known = OsString::from("UserKnownHostsFile=");
        known.push(&self.known_hosts);
        for option in [
            known,
            "StrictHostKeyChecking=yes".into(),
            "BatchMode=yes".into(),
            "IdentitiesOnly=yes".into(),
        ] {
            args.push("-o".into());
            args.push(option);
        }
        args.push("-p".into());
        args.push(self.port.to_string().into());
        args
    }

    /// `user@127.0.0.1`.
    pub(crate) fn destination(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// sshd's log so far.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Every process sshd forked (one per connection, plus each command while it runs).
    pub(crate) fn descendants(&self) -> Vec<u32> {
        match &self.child {
            Some(child) => descendants_of(child.id()),
            None => Vec::new(),
        }
    }

    /// Runs sshd and waits until it answers with its banner. `Ok(false)` if it exited first.
    async fn spawn(&mut self, config: &Path) -> anyhow::Result<bool> {
        // sshd writes its pid file once it listens: proof that *this* sshd owns the port (a
        // banner alone could come from someone else's server that got the same port).
        let pid_file = self.dir.join("sshd.pid");
        let _ = fs::remove_file(&pid_file);
        let log_path = self.dir.join("sshd.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {SSHD}"))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return Ok(false);
                }
            }
            let ours = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
                == Some(pid);
            if ours && banner(self.port).await {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "sshd did not answer within {READY_WAIT:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the listener and every process it forked. OpenSSH puts per-connection processes
    /// in their own sessions, so a process-group kill would miss them: they are found through
    /// `/proc` before the listener dies (after that they would be re-parented).
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut pids = vec![child.id()];
        pids.extend(descendants_of(child.id()));
        for pid in &pids {
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether something on `port` sends an SSH banner.
async fn banner(port: u16) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_millis(500),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf.starts_with(b"SSH-2.0")
    )
}

/// The generated sshd_config: `extra` first, then the bench's settings.
fn config_text(
    dir: &Path,
    port: u16,
    host_key: &Path,
    authorized: &Path,
    extra: &[String],
    version: &str,
) -> String {
    let mut text = String::new();
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {host_key}\n\
         PidFile {pid}\n\
         AuthorizedKeysFile {authorized}\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitRootLogin yes\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         AllowTcpForwarding yes\n\
         GatewayPorts no\n\
         MaxSessions 2000\n\
         MaxStartups 100:30:200\n\
         LogLevel INFO\n",
        host_key = host_key.display(),
        pid = dir.join("sshd.pid").display(),
        authorized = authorized.display(),
    ));
    // OpenSSH 9.8+ penalises addresses with failed logins; older versions reject the keyword.
    if version_at_least(version, (9, 8)) {
        text.push_str("PerSourcePenalties no\n");
    }
    text
}

/// `sshd -V`'s first line (sshd prints its version on stderr and exits non-zero).
fn sshd_version() -> String {
    match Command::new(SSHD).arg("-V").output() {
        Ok(output) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => String::new(),
    }
}

/// Whether an `OpenSSH_X.Y...` version string is at least `(major, minor)`.
fn version_at_least(version: &str, want: (u32, u32)) -> bool {
    let Some(rest) = version.split("OpenSSH_").nth(1) else {
        return false;
    };
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= want
}

/// `ssh-keygen -t ed25519 -N '' -f dir/name`; returns the private key path.
fn keygen(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .status()
        .context("running ssh-keygen")?;
    if !status.success() {
        bail!("ssh-keygen for {} failed: {status}", path.display());
    }
    Ok(path)
}

/// `type base64` of a public key file, without its comment.
fn public_key_text(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// The user running the bench (sshd lets it in with the client key).
fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_else(|| "root".to_string())
}

/// A port nothing listens on right now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 for a port")?;
    Ok(listener
        .local_addr()
        .context("reading a bound address")?
        .port())
}

/// Fails when `program` is not on `PATH`.
fn which(program: &str) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(program).is_file()) {
        Ok(())
    } else {
        bail!("`{program}` not found on PATH (apt-get install openssh-client)")
    }
}

/// All descendants of `root`, from the parent links in `/proc/*/stat`.
fn descendants_of(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let _state = fields.next();
            if let Some(Ok(ppid)) = fields.next().map(str::parse::<u32>) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found: HashSet<u32> = HashSet::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, ppid) in &parents {
            if *ppid == parent && found.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    found.into_iter().collect()
}

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    /// `VmRSS`: every resident page, shared library pages included.
    pub(crate) rss: u64,
    /// `RssAnon`: resident anonymous pages (heap, stacks): what the process itself allocated.
    pub(crate) anon: u64,
}

impl Memory {
    /// The memory of this process.
    pub(crate) fn of_self() -> anyhow::Result<Memory> {
        Memory::read("/proc/self/status")
    }

    /// The memory of process `pid`.
    pub(crate) fn of_pid(pid: u32) -> anyhow::Result<Memory> {
        Memory::read(&format!("/proc/{pid}/status"))
    }

    /// Parses `VmRSS` and `RssAnon` from a `/proc/.../status` file.
    fn read(path: &str) -> anyhow::Result<Memory> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            anon: field("RssAnon:")?,
        })
    }

    /// The summed memory of several processes (those that vanished meanwhile are skipped).
    pub(crate) fn sum(pids: &[u32]) -> Memory {
        pids.iter()
            .filter_map(|pid| Memory::of_pid(*pid).ok())
            .fold(Memory::default(), |total, m| Memory {
                rss: total.rss + m.rss,
                anon: total.anon + m.anon,
            })
    }
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/PID/stat`
/// (`None`: this process). `None` when the process is gone.
pub(crate) fn cpu_time(pid: Option<u32>, ticks_per_second: u64) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = fs::read_to_string(path).ok()?;
    // `pid (comm) state ppid ...`: utime and stime are fields 14 and 15, i.e. the 12th and
    // 13th after the closing parenthesis (comm may contain spaces and parentheses).
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    let ticks = user + system;
    let per_second = ticks_per_second.max(1);
    Some(
        Duration::from_secs(ticks / per_second)
            + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second),
    )
}

/// The unit of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on every common Linux).
pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
pub(crate) fn open_files_limit() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .context("no `Max open files` in /proc/self/limits")?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .context("no soft limit on the `Max open files` line")?;
    Ok(soft.parse::<u64>().unwrap_or(u64::MAX))
}

/// One OpenSSH client invocation (`ssh ARGS`), its output discarded; fails with its stderr
/// when it exits non-zero, and is killed when it takes longer than `limit`.
pub(crate) async fn run_ssh(args: &[OsString], limit: Duration) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("ssh")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning ssh")?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("ssh did not finish within {limit:?}"))?
        .context("waiting for ssh")?;
    if !output.status.success() {
        bail!(
            "ssh exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `args` followed by more arguments, for building command lines.
pub(crate) fn with_args<I, S>(args: &[OsString], more: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut all = args.to_vec();
    all.extend(more.into_iter().map(Into::into));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert!(version_at_least("OpenSSH_9.8p1, OpenSSL 3", (9, 8)));
        assert!(version_at_least("OpenSSH_10.0p2", (9, 8)));
        assert!(!version_at_least("OpenSSH_9.2p1 Debian-2+deb12u10", (9, 8)));
        assert!(!version_at_least("", (9, 8)));
    }
}
