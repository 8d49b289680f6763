//! A real dropbear SSH server (Debian `dropbear-bin`) for the tests: the server most routers
//! (OpenWrt) run.
//!
//! dropbear has no `AuthorizedKeysFile`: it reads the login user's `~/.ssh/authorized_keys`.
//! So that the machine's own keys are never read or touched, each [`Dropbear`] runs in a
//! private mount namespace (`unshare -m`) with a temporary home bound over the user's home
//! directory: the throwaway client key is the only one it accepts, and commands run with that
//! empty home (no shell start-up files). Host key: a throwaway ed25519 key from `dropbearkey`.
//! It listens on `127.0.0.1:<free port>`, logs to `dropbear.log`, and can be killed the hard
//! way (listener and every per-connection process), frozen (SIGSTOP) and restarted on the same
//! port with the same host key.
//!
//! [`Dropbear::start`] returns `None` (after printing why) when dropbear or `unshare` is
//! missing or mount namespaces are not allowed, so the suite skips cleanly on such a machine.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;
use tunnelkeeper_providers::ssh::SshTarget;

use crate::procs::descendants_of;
use crate::sshd::current_user;

/// Where Debian's dropbear-bin puts the server.
pub const DROPBEAR: &str = "/usr/sbin/dropbear";
/// How long dropbear may take to accept connections after being started.
const READY_WAIT: Duration = Duration::from_secs(10);

/// One running (or killed) dropbear.
pub struct Dropbear {
    dir: tempfile::TempDir,
    /// The port it listens on (kept across restarts).
    pub port: u16,
    /// An authorized ed25519 client key (private key file, OpenSSH format).
    pub client_key: PathBuf,
    /// A known_hosts file with the host key's `[127.0.0.1]:PORT` line.
    pub known_hosts: PathBuf,
    /// The login user's home directory, which the temporary home is bound over.
    user_home: PathBuf,
    child: Option<Child>,
}

impl Dropbear {
    /// Starts dropbear; `None` if it cannot run here (see [`crate::skip()`]).
    pub async fn start() -> Option<Dropbear> {
        for tool in [DROPBEAR, "/usr/bin/dropbearkey", "/usr/bin/unshare"] {
            if !Path::new(tool).exists() {
                crate::skip(format!(
                    "{tool} is not installed (apt-get install dropbear-bin util-linux)"
                ));
                return None;
            }
        }
        let probe = Command::new("unshare")
            .args(["-m", "true"])
            .stderr(Stdio::null())
            .status();
        if !matches!(probe, Ok(status) if status.success()) {
            crate::skip("no private mount namespace here (unshare -m needs CAP_SYS_ADMIN)");
            return None;
        }
        let user_home = nix::unistd::User::from_name(&current_user())
            .ok()
            .flatten()
            .map(|u| u.dir)
            .expect("the login user's home directory");
        let dir = tempfile::tempdir().expect("tempdir");
        let host_key = dir.path().join("host_ed25519");
        let status = Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&host_key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("dropbearkey");
        assert!(status.success(), "dropbearkey failed");
        let output = Command::new("dropbearkey")
            .args(["-y", "-f"])
            .arg(&host_key)
            .output()
            .expect("dropbearkey -y");
        let host_public: String = String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|l| l.starts_with("ssh-"))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .expect("dropbearkey -y prints the public key");
        let client_key = dir.path().join("id_ed25519");
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
            .arg(&client_key)
            .status()
            .expect("ssh-keygen");
        assert!(status.success(), "ssh-keygen failed");
        // dropbear insists on a home and ~/.ssh nobody else can write to.
        let home = dir.path().join("home");
        let ssh_dir = home.join(".ssh");
        fs::create_dir_all(&ssh_dir).expect("home/.ssh");
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700)).expect("chmod .ssh");
        let authorized = ssh_dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).expect("authorized_keys");
        fs::set_permissions(&authorized, fs::Permissions::from_mode(0o600)).expect("chmod");

        let mut dropbear = Dropbear {
            dir,
            port: 0,
            client_key,
            known_hosts: PathBuf::new(),
            user_home,
            child: None,
        };
        for _ in 0..5 {
            dropbear.port = crate::free_port();
            dropbear.known_hosts = dropbear.dir.path().join("known_hosts");
            fs::write(
                &dropbear.known_hosts,
                format!("[127.0.0.1]:{} {host_public}\n", dropbear.port),
            )
            .expect("known_hosts");
            if dropbear.spawn().await {
                return Some(dropbear);
            }
        }
        panic!("dropbear did not start; its log:\n{}", dropbear.log());
    }

    /// The temporary directory (keys, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A target for this server, like [`crate::Sshd::target`]: the test user with the client
    /// key, strict host key checking, generous timeouts.
    pub fn target(&self) -> SshTarget {
        let mut target = SshTarget::new("127.0.0.1", &self.known_hosts);
        target.port = Some(self.port);
        target.user = Some(current_user());
        target.identity_file = Some(self.client_key.clone());
        target.connect_timeout = Duration::from_secs(10);
        target.auth_timeout = Duration::from_secs(10);
        target.keepalive_interval = Duration::from_secs(2);
        target.keepalive_max = 3;
        target
    }

    /// dropbear's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dropbear.log")).unwrap_or_default()
    }

    /// The listener's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The listener and every connection process it forked.
    pub fn processes(&self) -> Vec<u32> {
        match self.pid() {
            Some(pid) => {
                let mut all = vec![pid];
                all.extend(descendants_of(pid));
                all
            }
            None => Vec::new(),
        }
    }

    /// SIGSTOPs (`true`) or SIGCONTs the listener and every connection process: a frozen box.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        for pid in self.processes() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
            }
        }
    }

    /// SIGKILLs the listener and every process it forked, at once.
    pub fn kill(&mut self) {
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

    /// Starts dropbear again on the same port with the same host key.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: dropbear still running");
        let deadline = Instant::now() + READY_WAIT;
        while !self.spawn().await {
            if Instant::now() >= deadline {
                panic!("dropbear did not restart; its log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs dropbear in its own mount namespace and waits for its banner. False if it exited.
    async fn spawn(&mut self) -> bool {
        let dir = self.dir.path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dropbear.log"))
            .expect("dropbear.log");
        // `unshare` and `sh` exec in turn: the child's pid is dropbear's. -F: foreground,
        // -E: log to stderr, -s: no password logins, -p: loopback only, -r: host key.
        let script =
            "mount --bind \"$1\" \"$2\" && exec \"$3\" -F -E -s -p \"127.0.0.1:$4\" -r \"$5\"";
        let child = Command::new("unshare")
            .args(["-m", "sh", "-c", script, "sh"])
            .arg(dir.join("home"))
            .arg(&self.user_home)
            .arg(DROPBEAR)
            .arg(self.port.to_string())
            .arg(dir.join("host_ed25519"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn dropbear");
        self.child = Some(child);
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if crate::sshd::banner(self.port).await {
                return true;
            }
            if Instant::now() >= deadline {
                self.kill();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        self.kill();
    }
}
