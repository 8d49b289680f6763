//! The control API: HTTP/1.1 over a Unix socket.
//!
//! `curl --unix-socket SOCK http://localhost/v1/status` works. Every connection's peer
//! credentials (SO_PEERCRED) are checked before a request is served: root and the daemon's own
//! uid may do everything, configured `readers` may only read, everyone else gets 403. Requests
//! are small and bounded (header size, header read time, connections at once), so a stuck or
//! hostile client never holds up the daemon. Routing is a plain `match` in [`server`]. Writes
//! (pin, unpin, reload) are handed to the daemon's main loop as [`Op`]s and applied one at a
//! time there, so two operators can never interleave a reload with a pin.

pub mod client;
pub mod server;

pub use server::{serve, Access, ControlState, Op, OpError};
