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
//!
//! Results and method are written up in `docs/BENCHMARKS.md`.

#![forbid(unsafe_code)]

mod common;
mod failover;
mod listener;
mod router;
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
    },
    /// Router reboot recovery: sshd accepting again → router_verified, vs 30 s polling.
    Router {
        /// Simulated reboots (default 10).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reps: u32,
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
        Command::Listener { quick } => rt.block_on(listener::listener(quick)),
        Command::Router { reps } => rt.block_on(router::router(reps)),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
