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
