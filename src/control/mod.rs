//! The control API: HTTP/1.1 over a Unix socket.
//!
//! `curl --unix-socket SOCK http://localhost/v1/status` works. Every connection's peer
//! credentials (SO_PEERCRED, supplementary groups by SO_PEERGROUPS) are checked right after
//! accept, before it takes a slot: root and the daemon's own uid may do everything, configured
//! `readers` may only read, everyone else is closed without an answer. Slots are reserved for
//! writers and capped per reader uid; access is re-checked per request and on reload. Requests
//! are small and bounded (header size, header read time, connections at once), so a stuck or
//! hostile client never holds up the daemon. Routing is a plain `match` in [`server`]. Writes
//! (pin, unpin, reload, and a tunnel's restart, drain, undrain and probe, an SSH target's
//! reset) are handed to the daemon's main loop as [`Op`]s and applied one at a
//! time there, so two operators can never interleave a reload with a pin.

pub mod client;
pub mod server;

pub use server::{serve, Access, ControlState, Op, OpError, TunnelAction};
