//! The command line's clap definitions: what `main.rs` parses, and what the packaging tool
//! (`packaging/assets`) renders into the man page and the shell completions, so neither can
//! drift from the other and the daemon's binary carries no man-page generator.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Keeps services reachable through several tunnels at once.
#[derive(Parser, Debug)]
#[command(name = "tunnelkeeper", version, about)]
pub struct Cli {
    /// Log format: auto (journal under systemd, else text), text, json or journal.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TUNNELKEEPER_LOG_FORMAT",
        default_value_t = crate::logging::LogFormat::Auto
    )]
    pub log_format: crate::logging::LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = crate::cli::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file (exit 0 when valid, 2 when not).
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = crate::cli::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also check what the file points to: files and their modes, programs and versions,
        /// known_hosts entries, listen collisions.
        #[arg(long)]
        deep: bool,
        /// With --deep: also try a login to every SSH target and router.
        #[arg(long, requires = "deep")]
        connect: bool,
    },
    /// Show services, primaries and tunnels of the running daemon.
    Status {
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
        /// Where the daemon's control socket is.
        #[command(flatten)]
        socket: crate::cli::SocketArgs,
    },
    /// Print events (NDJSON with --json, else one readable line each).
    Events {
        /// Keep following new events.
        #[arg(short, long)]
        follow: bool,
        /// Only events with a larger sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print raw NDJSON.
        #[arg(long)]
        json: bool,
        /// Where the daemon's control socket is.
        #[command(flatten)]
        socket: crate::cli::SocketArgs,
    },
    /// Make TUNNEL the primary of SERVICE whenever it is up (kept across restarts).
    Pin {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        /// Where the daemon's control socket is.
        #[command(flatten)]
        socket: crate::cli::SocketArgs,
    },
    /// Remove the pin of SERVICE: the election rules choose again.
    Unpin {
        /// Service name.
        service: String,
        /// Where the daemon's control socket is.
        #[command(flatten)]
        socket: crate::cli::SocketArgs,
    },
    /// Stop TUNNEL of SERVICE and start it again now (a fresh state, as after a reload).
    Restart(crate::cli::TunnelArgs),
    /// Take TUNNEL out of service: never elected, no new connections, open ones kept (kept
    /// across restarts, shown in status).
    Drain(crate::cli::TunnelArgs),
    /// Put a drained TUNNEL back into service.
    Undrain(crate::cli::TunnelArgs),
    /// Run one probe of TUNNEL now and print its timing, or why it failed (exit 1).
    Probe(crate::cli::TunnelArgs),
    /// Close every pooled SSH session to TARGET (`user@host:port`, as in `status --json`).
    SshReset {
        /// The SSH target.
        target: String,
        /// Where the daemon's control socket is.
        #[command(flatten)]
        socket: crate::cli::SocketArgs,
    },
    /// Make the daemon re-read its configuration file (like SIGHUP); exit 2 if it refuses it.
    Reload {
        /// Where the daemon's control socket is.
        #[command(flatten)]
        socket: crate::cli::SocketArgs,
    },
    /// Run a self-contained demonstration on loopback (no root, no network, nothing to install).
    Demo {
        /// Shorter fault schedule (used by the tests).
        #[arg(long)]
        quick: bool,
    },
    /// Relay TCP from a free loopback port to TO (the demo's stand-in tunnel).
    #[command(hide = true)]
    Relay {
        /// Where to relay to.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}
