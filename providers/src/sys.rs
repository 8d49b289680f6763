//! The one place this crate talks to the kernel in ways the type system cannot check.
//!
//! Tying a child's life to the daemon's needs code that runs in the forked child between
//! `fork(2)` and `exec(2)`, which Rust only allows through the `unsafe` `pre_exec` hook. Keeping
//! it here, small and documented, lets the rest of the crate deny `unsafe` outright.

#![allow(unsafe_code)]

use std::io;

use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};

/// Arranges for the child spawned by `cmd` to receive `SIGKILL` when the thread that forks it
/// dies (`PR_SET_PDEATHSIG`), so a crashed daemon leaves no tunnel process behind.
///
/// The kernel ties the signal to the *forking thread*, not the process: callers must spawn from
/// a thread that lives as long as the daemon (see [`crate::process`]). If the daemon is already
/// gone by the time the child runs this hook, the child refuses to start at all.
pub(crate) fn kill_child_with_parent(cmd: &mut tokio::process::Command) {
    let parent = getpid();
    let hook = move || -> io::Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
        // The parent may have died between fork and prctl; then the death signal was never
        // armed, and the child has been re-parented (to init or a subreaper).
        if getppid() != parent {
            return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe work
    // is allowed. It makes two plain syscalls (prctl(2), getppid(2)), takes no locks, and builds
    // errors from raw errno values, which does not allocate. It captures only a `Pid` (Copy).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups the peer of a Unix socket had when it
/// connected. `libc` does not export it; 59 is its value in `asm-generic/socket.h`, which every
/// architecture uses except alpha, mips, parisc and sparc (their own headers differ; Rust
/// targets exist only for mips and sparc, which get the fallback below).
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const SO_PEERGROUPS: nix::libc::c_int = 59;

/// The supplementary group ids of the process at the other end of the connected Unix socket
/// `fd`, as the kernel recorded them at `connect(2)` — the same credentials it checked against
/// the socket file's mode, and immune to the peer exiting and its pid being reused.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
pub fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // NGROUPS_MAX is 65536; start small and grow to what the kernel asks for (ERANGE).
    let mut groups: Vec<nix::libc::gid_t> = vec![0; 64];
    loop {
        let mut len =
            (groups.len() * std::mem::size_of::<nix::libc::gid_t>()) as nix::libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes; the kernel writes at
        // most `len` bytes into it and stores the size it used (or needs) in `len`, which is a
        // valid `socklen_t` we own. `fd` is borrowed, so it stays open for the call.
        let rc = unsafe {
            nix::libc::getsockopt(
                fd.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let used = len as usize / std::mem::size_of::<nix::libc::gid_t>();
        if rc == 0 {
            groups.truncate(used);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(nix::libc::ERANGE) && used > groups.len() {
            groups.resize(used, 0);
            continue;
        }
        return Err(err);
    }
}

/// Fallback where `SO_PEERGROUPS` has another number: no supplementary groups are known, so
/// `group:`/`gid:` readers match the primary group only (failing closed).
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
pub fn peer_groups(_fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
