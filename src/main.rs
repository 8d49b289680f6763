//! The `tunnelkeeper` command: parses the command line and calls into the library.

// No `unwrap`/`expect` in shipped code: a bad input is an error with context, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tunnelkeeper::cli::TunnelVerb;

/// Keeps services reachable through several tunnels at once.
#[derive(Parser, Debug)]
#[command(name = "tunnelkeeper", version, about)]
struct Cli {
    /// Log format: auto (journal under systemd, else text), text, json or journal.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TUNNELKEEPER_LOG_FORMAT",
        default_value_t = tunnelkeeper::logging::LogFormat::Auto
    )]
    log_format: tunnelkeeper::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = tunnelkeeper::cli::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file (exit 0 when valid, 2 when not).
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = tunnelkeeper::cli::DEFAULT_CONFIG)]
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
        #[command(flatten)]
        socket: tunnelkeeper::cli::SocketArgs,
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
        #[command(flatten)]
        socket: tunnelkeeper::cli::SocketArgs,
    },
    /// Make TUNNEL the primary of SERVICE whenever it is up (kept across restarts).
    Pin {
        /// Service name.
        service: String,
        /// Tunnel name.
        tunnel: String,
        #[command(flatten)]
        socket: tunnelkeeper::cli::SocketArgs,
    },
    /// Remove the pin of SERVICE: the election rules choose again.
    Unpin {
        /// Service name.
        service: String,
        #[command(flatten)]
        socket: tunnelkeeper::cli::SocketArgs,
    },
    /// Stop TUNNEL of SERVICE and start it again now (a fresh state, as after a reload).
    Restart(tunnelkeeper::cli::TunnelArgs),
    /// Take TUNNEL out of service: never elected, no new connections, open ones kept (kept
    /// across restarts, shown in status).
    Drain(tunnelkeeper::cli::TunnelArgs),
    /// Put a drained TUNNEL back into service.
    Undrain(tunnelkeeper::cli::TunnelArgs),
    /// Run one probe of TUNNEL now and print its timing, or why it failed (exit 1).
    Probe(tunnelkeeper::cli::TunnelArgs),
    /// Close every pooled SSH session to TARGET (`user@host:port`, as in `status --json`).
    SshReset {
        /// The SSH target.
        target: String,
        #[command(flatten)]
        socket: tunnelkeeper::cli::SocketArgs,
    },
    /// Make the daemon re-read its configuration file (like SIGHUP); exit 2 if it refuses it.
    Reload {
        #[command(flatten)]
        socket: tunnelkeeper::cli::SocketArgs,
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
    /// Write the man page and the bash/zsh/fish completions into OUT (used to build the package).
    #[command(hide = true)]
    PackageAssets {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check {
            config,
            deep: false,
            ..
        } => tunnelkeeper::cli::check(&config),
        Command::Check {
            config, connect, ..
        } => tunnelkeeper::preflight::check(&config, connect),
        Command::Run { config } => tunnelkeeper::cli::run(&config, cli.log_format),
        Command::Status { json, socket } => tunnelkeeper::cli::status(&socket, json),
        Command::Events {
            follow,
            since,
            json,
            socket,
        } => tunnelkeeper::cli::events(&socket, follow, since, json),
        Command::Pin {
            service,
            tunnel,
            socket,
        } => tunnelkeeper::cli::pin(&socket, &service, &tunnel),
        Command::Unpin { service, socket } => tunnelkeeper::cli::unpin(&socket, &service),
        Command::Reload { socket } => tunnelkeeper::cli::reload(&socket),
        Command::Restart(args) => tunnelkeeper::cli::tunnel(&args, TunnelVerb::Restart),
        Command::Drain(args) => tunnelkeeper::cli::tunnel(&args, TunnelVerb::Drain),
        Command::Undrain(args) => tunnelkeeper::cli::tunnel(&args, TunnelVerb::Undrain),
        Command::Probe(args) => tunnelkeeper::cli::tunnel(&args, TunnelVerb::Probe),
        Command::SshReset { target, socket } => tunnelkeeper::cli::ssh_reset(&socket, &target),
        Command::Demo { quick } => tunnelkeeper::cli::demo(quick),
        Command::Relay { to, listen } => tunnelkeeper::cli::relay(listen, to),
        Command::PackageAssets { out } => tunnelkeeper::assets::write_all(Cli::command(), &out),
    };
    ExitCode::from(code)
}
