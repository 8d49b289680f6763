//! Small helpers every provider shares, each written once: Go durations, quoting output lines
//! in messages, `host:port`, a free loopback port, dialling the first address that accepts,
//! locking through a poisoned mutex, and the `service/tunnel` tag of log lines.

pub mod duration;
pub mod net;
pub mod sync;
pub mod text;

pub use duration::{parse_go_duration, BadDuration};
pub use net::{connect_any, free_loopback_addr, host_port, ConnectFailure};
pub use sync::lock;
pub use text::{log_tag, quote};
