//! Settings of SSH targets and SSH tunnels, as resolved by the daemon's config validation.
//!
//! These are plain data: the daemon fills them in from YAML (with defaults), the ssh module acts
//! on them. Secrets are never held here, only the paths of the files that contain them.

use std::path::PathBuf;
use std::time::Duration;

/// What to do with a host key that is not in `known_hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HostKeyPolicy {
    /// Refuse unknown keys (the default), with the fingerprint and the line to add.
    #[default]
    Strict,
    /// Accept and record an unknown key (trust on first use). A changed key is still refused.
    AcceptNew,
}

/// How to reach and log in to one SSH server. Two targets with the same pool key share sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct SshTarget {
    /// Host name, address, or an ssh_config `Host` alias (when `ssh_config` is set).
    pub host: String,
    /// Port (None: from ssh_config, else 22).
    pub port: Option<u16>,
    /// Login user (None: from ssh_config, else the daemon's user name).
    pub user: Option<String>,
    /// Private key file (ed25519, ecdsa, RSA with SHA-2).
    pub identity_file: Option<PathBuf>,
    /// File holding the identity's passphrase.
    pub passphrase_file: Option<PathBuf>,
    /// File holding a password for password authentication.
    pub password_file: Option<PathBuf>,
    /// Try the keys of the ssh-agent at `$SSH_AUTH_SOCK`.
    pub agent: bool,
    /// known_hosts file checked strictly (hashed entries and `[host]:port` supported).
    pub known_hosts: PathBuf,
    /// Unknown host keys: refuse (default) or record.
    pub host_key_policy: HostKeyPolicy,
    /// ssh_config file whose `Host` aliases (HostName, User, Port, IdentityFile) apply.
    pub ssh_config: Option<PathBuf>,
    /// Limit for TCP connect plus key exchange.
    pub connect_timeout: Duration,
    /// Limit for authentication.
    pub auth_timeout: Duration,
    /// Keepalive interval; the session is declared dead after `keepalive_max` unanswered ones.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the session is dead.
    pub keepalive_max: u32,
    /// Channels one session carries before the pool opens another (OpenSSH MaxSessions).
    pub max_channels: u32,
    /// Sessions the pool opens to this target at most (0: no limit). Past that, a channel
    /// waits in a FIFO queue for room until its own timeout.
    pub max_sessions: u32,
    /// An unused session closes after this long.
    pub idle_timeout: Duration,
    /// A session is replaced (once idle) after this long.
    pub max_age: Duration,
}

impl SshTarget {
    /// Defaults for everything but the host and known_hosts.
    pub fn new(host: impl Into<String>, known_hosts: impl Into<PathBuf>) -> SshTarget {
        SshTarget {
            host: host.into(),
            port: None,
            user: None,
            identity_file: None,
            passphrase_file: None,
            password_file: None,
            agent: false,
            known_hosts: known_hosts.into(),
            host_key_policy: HostKeyPolicy::Strict,
            ssh_config: None,
            connect_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_max: 3,
            max_channels: 10,
            max_sessions: 4,
            idle_timeout: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
        }
    }
}

/// Which forward an SSH tunnel holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    /// `-R`: the server listens on `bind` and every connection is dialled locally to `to`.
    Remote {
        /// `host:port` the server binds (port 0: the server picks one).
        bind: String,
        /// Local `host:port` each forwarded connection goes to.
        to: String,
    },
    /// `-L`: `dial()` opens a `direct-tcpip` channel to `to` as seen from the server.
    Local {
        /// `host:port` as seen from the server.
        to: String,
    },
}

/// One `ssh` tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct SshSpec {
    /// The server.
    pub target: SshTarget,
    /// The forward it holds.
    pub forward: Forward,
}
