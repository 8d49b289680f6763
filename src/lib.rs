//! tunnelkeeper: keeps services reachable through several tunnels at once.
//!
//! The library holds the whole daemon; `main.rs` only parses the command line. Data flows one
//! way: [`config`] is resolved into specs; each [`service`] runs one [`supervisor`] task per
//! tunnel, which starts it through a provider (crate `tunnelkeeper-providers`), [`probe`]s it end
//! to end and reports to the service; the service runs the pure [`election`] and publishes every
//! change on the [`bus`], which feeds [`hooks`], the [`control`] socket and the journal.

#![forbid(unsafe_code)]
// No `unwrap`/`expect` in shipped code: a bad input is an error with context, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod args;
pub mod bus;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod election;
pub mod forward;
pub mod hooks;
pub mod http_client;
pub mod http_reply;
pub mod logging;
pub mod metrics;
pub mod pins;
pub mod preflight;
pub mod probe;
pub mod relay;
pub mod reload;
pub mod router;
pub mod routes;
pub mod server;
pub mod service;
pub mod socket_file;
pub mod standby;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod systemd;
