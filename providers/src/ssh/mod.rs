//! The `ssh` provider and the shared SSH session pool, on russh (no `ssh` binary is spawned).
//!
//! - [`SshPool`]: one per daemon. Every tunnel, probe and router command to the same server
//!   (same user, host, port and identity after ssh_config resolution, and the same known_hosts,
//!   host key policy and login methods) shares its sessions.
//!   [`SshPool::exec`] runs router commands; [`SshPool::stats`] feeds `/v1/status`.
//! - [`SshProvider`]: a remote forward (`-R`, the server listens and connections come back to
//!   a local `to`) or a local forward (`-L`, `dial()` opens a `direct-tcpip` channel to `to`
//!   through the server; no local port).
//!
//! Host keys are checked strictly against known_hosts (module `hostkeys`); a session's death is
//! the hard signal of every tunnel on it ([`crate::Tunnel::closed`] resolves at once).
//!
//! Modules, one job each: [`spec`] (settings), `config` (ssh_config aliases, pool key),
//! `hostkeys` (known_hosts), `auth` (login), `session` (one connection), `handler` (russh's callbacks), `net` (its TCP socket), `pool` (sharing,
//! limits, idle/age), `stream` (channel streams, bridging), `remote` / `local` (the two
//! forwards), `provider` (the [`crate::Provider`]), `exec` (commands).

mod auth;
mod config;
mod exec;
mod handler;
mod hostkeys;
mod local;
mod net;
mod pool;
mod provider;
mod remote;
mod session;
pub mod spec;
mod stream;

pub use exec::ExecOutput;

/// Whether `known_hosts` records a key for `host:port` (for `tunnelkeeper check --deep`; an
/// unreadable file records nothing).
pub fn has_known_host(known_hosts: &std::path::Path, host: &str, port: u16) -> bool {
    !hostkeys::known_algorithms(known_hosts, host, port).is_empty()
}
pub use pool::{PoolStats, SessionEvents, SshPool, TargetStats};
pub use provider::SshProvider;
pub use spec::*;
