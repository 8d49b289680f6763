//! A real OpenSSH `sshd` on loopback, for the SSH tests and benches.
//!
//! Each [`Sshd`] runs `/usr/sbin/sshd -D -e -f <config>` on `127.0.0.1:<free port>` with a
//! throwaway ed25519 host key and an `authorized_keys` holding a throwaway client key, all in
//! one directory (a temporary one unless the caller gives its own), logging (VERBOSE) to
//! `sshd.log` there. It can be killed the hard way — the listener and every per-connection
//! process it forked (OpenSSH puts those in their own sessions, so a process-group kill would
//! miss them: they are found through `/proc`) — and started again on the same port with the
//! same host key.
//!
//! Tests call [`Sshd::start`], which returns `None` (after printing why) when sshd is not
//! installed, so the suite skips cleanly on such a machine, and panics on any other failure.
//! The benches call [`Sshd::launch`], which reports every failure as an error.

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

use crate::net::try_free_port;
use crate::procs::{descendants_of, kill_tree};

/// Where Debian's openssh-server puts the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to accept connections after being started.
const READY_WAIT: Duration = Duration::from_secs(10);

/// How to start an [`Sshd`].
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// Where the keys, config and log go; `None`: a temporary directory removed on drop.
    pub dir: Option<PathBuf>,
    /// Config lines put before the defaults (for most sshd keywords the first value wins).
    pub extra: Vec<String>,
    /// Keep the login account's `HOME`. By default commands run with `HOME` set to an empty
    /// directory, so the account's shell start-up files stay out: a `~/.bashrc` can cost more
    /// than the round trip being measured, and one that runs `pyenv rehash` takes a lock file
    /// that a shell killed along with sshd leaves behind (every later shell then waits a
    /// minute for it). Ignored when `extra` sets `SetEnv` itself.
    pub login_home: bool,
}

/// One running (or killed) sshd; killed with every process it forked when dropped.
pub struct Sshd {
    dir: PathBuf,
    temp: Option<tempfile::TempDir>,
    /// The port it listens on (kept across restarts).
    pub port: u16,
    /// An authorized ed25519 client key (private key file).
    pub client_key: PathBuf,
    /// A known_hosts file with the host key's `[127.0.0.1]:PORT` line.
    pub known_hosts: PathBuf,
    /// That line.
    pub host_line: String,
    /// The host key's public half (`ssh-ed25519 AAAA...`).
    pub host_public: String,
    /// The login user: whoever runs the tests (sshd lets it in with the client key).
    pub user: String,
    /// `sshd -V`, e.g. `OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19 ...`.
    pub version: String,
    config: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    /// For tests: starts sshd in a temporary directory with the default configuration plus
    /// `extra` lines (which come first). `None` if sshd is not installed (see [`crate::skip()`]: a failure under `CI=true`); panics on any other
    /// failure.
    pub async fn start(extra: &str) -> Option<Sshd> {
        if !Path::new(SSHD).exists() {
            crate::skip(format!(
                "{SSHD} is not installed (apt-get install openssh-server)"
            ));
            return None;
        }
        let options = SshdOptions {
            extra: extra.lines().map(str::to_owned).collect(),
            ..SshdOptions::default()
        };
        match Sshd::launch(options).await {
            Ok(sshd) => Some(sshd),
            Err(err) => panic!("{err:#}"),
        }
    }

    /// Starts sshd as `options` say and waits until it answers with its banner.
    pub async fn launch(options: SshdOptions) -> anyhow::Result<Sshd> {
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} is not installed (apt-get install openssh-server)");
        }
        // The privilege separation directory; Debian creates it at boot only.
        fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let (temp, dir) = match options.dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir().context("creating a temporary directory")?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let version = sshd_version();
        let host_key = keygen(&dir, "host_ed25519", "ed25519")?;
        let client_key = keygen(&dir, "id_ed25519", "ed25519")?;
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized)
            .with_context(|| format!("writing {}", authorized.display()))?;
        let host_public = public_key_text(&host_key.with_extension("pub"))?;
        let mut lines = Vec::new();
        if !options.login_home && !options.extra.iter().any(|l| l.contains("SetEnv")) {
            let home = dir.join("home");
            fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
            let home = home.to_str().filter(|h| !h.contains([' ', '"', '\t']));
            let home =
                home.context("the sshd directory's path must be plain text without spaces")?;
            lines.push(format!("SetEnv HOME={home}"));
        }
        lines.extend(options.extra);

        // A port nobody listens on; retried if someone grabs it before sshd binds it.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = try_free_port().context("finding a free loopback port")?;
            let config = dir.join("sshd_config");
            let text = config_text(&dir, port, &host_key, &authorized, &lines, &version);
            fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
            let known_hosts = dir.join("known_hosts");
            let host_line = format!("[127.0.0.1]:{port} {host_public}");
            fs::write(&known_hosts, format!("{host_line}\n"))
                .with_context(|| format!("writing {}", known_hosts.display()))?;
            let mut sshd = Sshd {
                dir: dir.clone(),
                temp: None,
                port,
                client_key: client_key.clone(),
                known_hosts,
                host_line,
                host_public: host_public.clone(),
                user: current_user(),
                version: version.clone(),
                config,
                child: None,
            };
            if sshd.spawn().await? {
                sshd.temp = temp;
                return Ok(sshd);
            }
            last_log = sshd.log();
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        bail!("sshd did not start; its log:\n{last_log}")
    }

    /// The directory with the keys, config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A target for this server with the provider's defaults: the login user with the client
    /// key and strict host key checking against the prepared known_hosts.
    pub fn plain_target(&self) -> SshTarget {
        let mut target = SshTarget::new("127.0.0.1", &self.known_hosts);
        target.port = Some(self.port);
        target.user = Some(self.user.clone());
        target.identity_file = Some(self.client_key.clone());
        target
    }

    /// [`Sshd::plain_target`] with timeouts generous enough for a loaded two-core box and a
    /// quick keepalive (what the tests want).
    pub fn target(&self) -> SshTarget {
        let mut target = self.plain_target();
        target.connect_timeout = Duration::from_secs(10);
        target.auth_timeout = Duration::from_secs(10);
        target.keepalive_interval = Duration::from_secs(2);
        target.keepalive_max = 3;
        target
    }

    /// The OpenSSH client's options for this server (before the destination). `-F /dev/null`
    /// keeps the machine's and the user's ssh_config out (no stray ControlMaster, GSSAPI or
    /// agent settings); `IdentitiesOnly` keeps an agent's keys out.
    pub fn client_args(&self) -> Vec<OsString> {
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
    pub fn destination(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// A new key pair in the directory (`kind`: ed25519, ecdsa, rsa); returns the private key.
    /// Panics on failure (tests).
    pub fn keygen(&self, name: &str, kind: &str) -> PathBuf {
        keygen(&self.dir, name, kind).unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// Adds a public key to authorized_keys. Panics on failure (tests).
    pub fn authorize(&self, private_key: &Path) {
        let public = fs::read_to_string(private_key.with_extension("pub")).expect("public key");
        let path = self.dir.join("authorized_keys");
        let mut all = fs::read_to_string(&path).expect("authorized_keys");
        all.push_str(&public);
        fs::write(&path, all).expect("authorized_keys");
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// The listener's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every process sshd forked (per-connection monitors, their commands, ...).
    pub fn descendants(&self) -> Vec<u32> {
        match self.pid() {
            Some(pid) => descendants_of(pid),
            None => Vec::new(),
        }
    }

    /// SIGKILLs the listener and every process it forked, at once: the server vanishes the way
    /// a crashed or rebooted box does (the kernel closes the sockets).
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        kill_tree(child.id());
        let _ = child.wait();
    }

    /// Starts sshd again on the same port with the same host key. Panics when it does not
    /// come back (tests).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: sshd still running");
        // The old listener's port may linger briefly; sshd sets SO_REUSEADDR, so retry a bit.
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if matches!(self.spawn().await, Ok(true)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("sshd did not restart; its log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs sshd and waits until it answers with its banner. `Ok(false)` if it exited first.
    async fn spawn(&mut self) -> anyhow::Result<bool> {
        // sshd writes its pid file once it listens: proof that *this* sshd owns the port (a
        // banner alone could come from another test's server that got the same port).
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
            .arg(&self.config)
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
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether something on `port` sends an SSH banner.
pub(crate) async fn banner(port: u16) -> bool {
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

/// The generated sshd_config: `extra` first, then the defaults.
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
         LogLevel VERBOSE\n",
        host_key = host_key.display(),
        pid = dir.join("sshd.pid").display(),
        authorized = authorized.display(),
    ));
    // OpenSSH 9.8+ penalises addresses with failed logins (the wrong-key test would then lock
    // out 127.0.0.1 for the other tests); older versions reject the keyword.
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

/// `ssh-keygen -t kind -N '' -f dir/name`; returns the private key path.
fn keygen(dir: &Path, name: &str, kind: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let mut command = Command::new("ssh-keygen");
    command
        .args(["-q", "-t", kind, "-N", "", "-C", "", "-f"])
        .arg(&path)
        .stdin(Stdio::null());
    if kind == "rsa" {
        command.args(["-b", "2048"]);
    }
    let status = command
        .status()
        .context("running ssh-keygen (apt-get install openssh-client)")?;
    if !status.success() {
        bail!(
            "ssh-keygen -t {kind} for {} failed: {status}",
            path.display()
        );
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

/// The user running the tests (sshd is configured to let it in with the client key).
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_else(|| "root".to_string())
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
