//! Helpers shared by the tests of every workspace package and by the benches: one throwaway
//! OpenSSH server ([`sshd::Sshd`]), one throwaway dropbear ([`dropbear::Dropbear`]), loopback servers and ports ([`net`]), and process-tree
//! lookups through `/proc` ([`procs`]), and the rule for a test that cannot run here
//! ([`skip()`]: SKIPPED locally, a failure under `CI=true`).
//!
//! Not published; a dev-dependency of the packages whose tests need it (and a dependency of the
//! bench binary). The fallible functions return errors so the bench can report them; the
//! convenience wrappers meant for tests panic with a clear message instead.

#![forbid(unsafe_code)]

pub mod dropbear;
pub mod net;
pub mod procs;
pub mod skip;
pub mod sshd;

pub use net::{echo_server, free_port, try_free_port};
pub use procs::descendants_of;
pub use skip::skip;
pub use sshd::{current_user, Sshd, SshdOptions, SSHD};
