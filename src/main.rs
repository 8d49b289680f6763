//! The `tunnelkeeper` command: parses the command line and calls into the library.

// No `unwrap`/`expect` in shipped code: a bad input is an error with context, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser as _;
use tunnelkeeper::args::{Cli, Command};
use tunnelkeeper::cli::TunnelVerb;

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
    };
    ExitCode::from(code)
}
