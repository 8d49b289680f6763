//! `bench`: benchmark harnesses for tunnelkeeper; they print figures, they do not pass or fail.
//!
//! - `bench failover [--reps N] [--quick]` (module `failover`): how long the real daemon takes
//!   to move a service off a failed primary (kill -9 and SIGSTOP of the primary's child).
//! - `bench ssh [--runs N] [--quick]` (module `ssh`): the SSH provider and session pool against
//!   a real OpenSSH `sshd` it starts on 127.0.0.1 — command latency (pooled exec vs a fresh
//!   `ssh` per command vs OpenSSH ControlMaster), 1000 concurrent forwarded channels (acquire
//!   latency, memory per idle session), and `-L` throughput vs direct loopback.
//! - `bench router [--reps N]` (module `router`): router reboot recovery against a real sshd —
//!   sshd accepting again → `router_verified` with `check_interval: 1s`, against the prior
//!   art's 30 s uptime polling (computed).
//! - `bench scale [--tunnels N] [--secs S]` (module `scale`): the real daemon binary with N
//!   tunnels (half `direct`, half `command` children) probed every second: CPU, memory,
//!   events/s and `/v1/status` latency, against a run with a tenth of the tunnels.
//! - `bench bus [--events N] [--secs S]` (module `bus`): publish rate of the event bus with no
//!   subscriber, 9 fast ones, and 9 fast + 1 slow one (which must lag, not slow the publisher).
//! - `bench footprint [--secs S] [--anchor-secs S]` (module `footprint`): the daemon at rest with 4 `-L` + 4 `-R` `ssh` forwards
//!   against 8 × autossh + ssh holding the same forwards to the same local sshd.
//!
//! Results and method are written up in `docs/BENCHMARKS.md`.

#![forbid(unsafe_code)]

mod bus;
mod common;
mod failover;
mod footprint;
mod listener;
mod router;
mod scale;
mod ssh;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Benchmark harnesses for tunnelkeeper (results are recorded in docs/BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Failover time after kill -9 and SIGSTOP of the primary's child, at two probe settings.
    Failover {
        /// Repetitions per scenario (default 20, or 3 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reps: Option<u32>,
        /// Smoke check: 3 repetitions of the 100ms probe setting only.
        #[arg(long)]
        quick: bool,
    },
    /// SSH pool against a local sshd: command latency, 1000 channels, memory, -L throughput.
    Ssh {
        /// Commands per method for the latency comparison (default 200, or 20 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        runs: Option<u32>,
        /// Smoke check: small counts everywhere (a few seconds of work per part).
        #[arg(long)]
        quick: bool,
        /// Run commands with the login account's real home directory, so its shell start-up
        /// files (~/.bashrc) run for every command. By default sshd sets HOME to an empty
        /// directory, so the figures are about SSH rather than about that account's dotfiles.
        #[arg(long)]
        login_home: bool,
        /// An extra sshd_config line for the server under test (repeatable; these come first,
        /// and for most keywords the first value wins), e.g. `--sshd-option 'UseDNS yes'`.
        #[arg(long = "sshd-option", value_name = "LINE")]
        sshd_options: Vec<String>,
    },
    /// Failover listener vs direct loopback, socat and HAProxy: throughput, connects, CPU/GB.
    Listener {
        /// Smoke check: 1s iperf3 runs, one round, a few hundred connections, 256 MiB bulk.
        #[arg(long)]
        quick: bool,
        /// Only part 4, `wrk -H "Connection: close"` against an HTTP backend, alternating the
        /// listener and HAProxy (for before/after comparisons of the accept path).
        #[arg(long)]
        wrk_only: bool,
    },
    /// Router reboot recovery: sshd accepting again → router_verified, vs 30 s polling.
    Router {
        /// Simulated reboots (default 10).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reps: u32,
    },
    /// The real daemon with many probed tunnels: CPU, RSS, events/s, /v1/status latency.
    Scale {
        /// Tunnels of the measured run (half direct, half command), 10 per service.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=5_000))]
        tunnels: u64,
        /// Tunnels of the anchor run (default: a tenth of --tunnels, at least 10).
        #[arg(long, value_parser = clap::value_parser!(u64).range(10..=5_000))]
        anchor: Option<u64>,
        /// Length of each measurement window, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
        secs: u64,
    },
    /// Event bus publish rate with 0, 9 fast, and 9 fast + 1 slow subscribers.
    Bus {
        /// Events per scenario at most.
        #[arg(long, default_value_t = 5_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        events: u64,
        /// Publishing time per scenario at most, in seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
        secs: u64,
        /// The slow subscriber's pause after each event, in milliseconds.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
        slow_ms: u64,
        /// Events per second of the paced scenario.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        paced: u64,
    },
    /// Idle RSS and CPU with 4 -L + 4 -R ssh forwards, against 8 × autossh + ssh.
    Footprint {
        /// Length of each side's measurement window, in seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        secs: u64,
        /// The anchor's (autossh) window, in seconds, when it should differ from `--secs`
        /// (a 30-minute growth window for the daemon needs no 30 minutes of autossh).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        anchor_secs: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        // Only on request: the daemon's logs (every event, every child line) would drown the
        // figures, and formatting them costs time on the paths being measured.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime");
    let result = runtime.and_then(|rt| match cli.command {
        Command::Failover { reps, quick } => {
            let reps = reps.unwrap_or(if quick { 3 } else { 20 });
            rt.block_on(failover::failover(reps, quick))
        }
        Command::Ssh {
            runs,
            quick,
            login_home,
            sshd_options,
        } => {
            let settings = ssh::Settings::new(runs, quick, login_home, sshd_options);
            rt.block_on(ssh::ssh(settings))
        }
        Command::Listener { quick, wrk_only } => rt.block_on(listener::listener(quick, wrk_only)),
        Command::Router { reps } => rt.block_on(router::router(reps)),
        Command::Scale {
            tunnels,
            anchor,
            secs,
        } => {
            let tunnels = tunnels as usize;
            let settings = scale::Settings {
                tunnels,
                anchor: anchor.map(|a| a as usize).unwrap_or((tunnels / 10).max(10)),
                window: std::time::Duration::from_secs(secs),
            };
            rt.block_on(scale::scale(settings))
        }
        Command::Bus {
            events,
            secs,
            slow_ms,
            paced,
        } => {
            let settings = bus::Settings {
                events,
                limit: std::time::Duration::from_secs(secs),
                slow: std::time::Duration::from_millis(slow_ms),
                paced,
            };
            rt.block_on(bus::bus(settings))
        }
        Command::Footprint { secs, anchor_secs } => {
            let settings = footprint::Settings {
                window: std::time::Duration::from_secs(secs),
                anchor_window: std::time::Duration::from_secs(anchor_secs.unwrap_or(secs)),
            };
            rt.block_on(footprint::footprint(settings))
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
