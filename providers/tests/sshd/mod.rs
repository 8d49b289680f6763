//! A real OpenSSH `sshd` for the SSH provider tests.
//!
//! Each [`Sshd`] runs `/usr/sbin/sshd -D -e -f <config>` on `127.0.0.1:<free port>` with a
//! throwaway ed25519 host key and an `authorized_keys` holding a throwaway client key, all in
//! a temporary directory, logging (VERBOSE) to `sshd.log` there. It can be killed the hard way
//! — the listener and every per-connection process it forked (OpenSSH puts those in their own
//! sessions, so a process-group kill would miss them: they are found through `/proc`) — and
//! started again on the same port with the same host key.
//!
//! Tests call [`Sshd::start`], which returns `None` (after printing why) when sshd is not
//! installed, so the suite skips cleanly on such a machine.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tunnelkeeper_providers::ssh::SshTarget;

/// Where Debian's openssh-server puts the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to accept connections after being started.
const READY_WAIT: Duration = Duration::from_secs(10);

/// One running (or killed) sshd.
pub struct Sshd {
    dir: tempfile::TempDir,
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
    config: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    /// Starts sshd with the default test configuration plus `extra` lines (which come first:
    /// for most sshd keywords the first value wins). `None` if sshd is not installed.
    pub async fn start(extra: &str) -> Option<Sshd> {
        if !Path::new(SSHD).exists() {
            eprintln!("SKIPPED: {SSHD} is not installed (apt-get install openssh-server)");
            return None;
        }
        // The privilege separation directory; Debian creates it at boot only.
        if let Err(err) = fs::create_dir_all("/run/sshd") {
            eprintln!("note: cannot create /run/sshd: {err}");
        }
        let mut dir = tempfile::tempdir().expect("tempdir");
        let host_key = keygen(dir.path(), "host_ed25519", "ed25519");
        let client_key = keygen(dir.path(), "id_ed25519", "ed25519");
        let authorized = dir.path().join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).expect("authorized_keys");
        let host_public = public_key_text(&host_key.with_extension("pub"));
        // Commands run with HOME set to an empty directory, so the login account's shell
        // start-up files stay out of the tests: a `~/.bashrc` that runs `pyenv rehash` takes a
        // lock file that a shell killed along with sshd leaves behind, and every later shell
        // then waits a minute for it.
        let home = dir.path().join("home");
        fs::create_dir_all(&home).expect("home directory");
        let extra = if extra.contains("SetEnv") {
            extra.to_owned()
        } else {
            format!("SetEnv HOME={}\n{extra}", home.display())
        };
        let extra = extra.as_str();

        // A port nobody listens on; retried if another test grabs it before sshd binds it.
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("sshd_config");
            fs::write(
                &config,
                config_text(dir.path(), port, &host_key, &authorized, extra),
            )
            .expect("sshd_config");
            let known_hosts = dir.path().join("known_hosts");
            let host_line = format!("[127.0.0.1]:{port} {host_public}");
            fs::write(&known_hosts, format!("{host_line}\n")).expect("known_hosts");
            let mut sshd = Sshd {
                dir,
                port,
                client_key: client_key.clone(),
                known_hosts,
                host_line,
                host_public: host_public.clone(),
                config,
                child: None,
            };
            if sshd.spawn().await {
                return Some(sshd);
            }
            let log = sshd.log();
            if !log.contains("Address already in use") {
                panic!("sshd did not start; its log:\n{log}");
            }
            dir = sshd.take_dir();
        }
        panic!("sshd: no free port after 5 attempts");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill_now();
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// The temporary directory (keys, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A target for this server: root (or whoever runs the tests) with the client key, strict
    /// host key checking against the prepared known_hosts, and timeouts generous enough for a
    /// loaded two-core box.
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

    /// A new key pair in the directory (`kind`: ed25519, ecdsa, rsa); returns the private key.
    pub fn keygen(&self, name: &str, kind: &str) -> PathBuf {
        keygen(self.dir.path(), name, kind)
    }

    /// Adds a public key to authorized_keys.
    pub fn authorize(&self, private_key: &Path) {
        let public = fs::read_to_string(private_key.with_extension("pub")).expect("public key");
        let path = self.dir.path().join("authorized_keys");
        let mut all = fs::read_to_string(&path).expect("authorized_keys");
        all.push_str(&public);
        fs::write(&path, all).expect("authorized_keys");
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
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
        self.kill_now();
    }

    /// Starts sshd again on the same port with the same host key.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: sshd still running");
        // The old listener's port may linger briefly; sshd sets SO_REUSEADDR, so retry a bit.
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if self.spawn().await {
                return;
            }
            if Instant::now() >= deadline {
                panic!("sshd did not restart; its log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs sshd and waits until it answers with its banner. False if it exited first.
    async fn spawn(&mut self) -> bool {
        // sshd writes its pid file once it listens: proof that *this* sshd owns the port (a
        // banner alone could come from another test's server that got the same port).
        let pid_file = self.dir.path().join("sshd.pid");
        let _ = fs::remove_file(&pid_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sshd.log"))
            .expect("sshd.log");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sshd");
        self.child = Some(child);
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            let ours = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
                == self.pid();
            if ours && banner(self.port).await {
                return true;
            }
            if Instant::now() >= deadline {
                self.kill_now();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill_now(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Collect the whole tree first: once the listener dies its children are re-parented
        // and could no longer be found.
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
        self.kill_now();
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

fn config_text(dir: &Path, port: u16, host_key: &Path, authorized: &Path, extra: &str) -> String {
    let mut text = String::new();
    text.push_str(extra);
    text.push('\n');
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
    if sshd_version() >= (9, 8) {
        text.push_str("PerSourcePenalties no\n");
    }
    text
}

/// `(major, minor)` of the installed sshd, from `sshd -V`.
fn sshd_version() -> (u32, u32) {
    let output = Command::new(SSHD).arg("-V").output();
    let text = match output {
        Ok(output) => format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(_) => return (0, 0),
    };
    let Some(rest) = text.split("OpenSSH_").nth(1) else {
        return (0, 0);
    };
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// `ssh-keygen -t kind -N '' -f dir/name`; returns the private key path.
fn keygen(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let path = dir.join(name);
    let mut command = Command::new("ssh-keygen");
    command
        .args(["-q", "-t", kind, "-N", "", "-C", "", "-f"])
        .arg(&path);
    if kind == "rsa" {
        command.args(["-b", "2048"]);
    }
    let status = command.status().expect("ssh-keygen");
    assert!(status.success(), "ssh-keygen -t {kind} failed");
    path
}

/// `type base64` of a public key file, without its comment.
fn public_key_text(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("public key");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The user running the tests (sshd is configured to let it in with the client key).
pub fn current_user() -> String {
    let uid = nix::unistd::Uid::current();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_else(|| "root".to_string())
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// All descendants of `root`, from the parent links in `/proc/*/stat`.
pub fn descendants_of(root: u32) -> Vec<u32> {
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
