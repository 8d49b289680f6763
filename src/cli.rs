//! The command-line edge: turns subcommands into library calls, errors into messages and exit
//! codes (0 ok, 1 runtime error, 2 usage or config error), and sets up logging.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::control::client::{ApiError, Client};
use crate::status::{DaemonStatus, TunnelState};

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/tunnelkeeper/config.yaml";

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: runtime error.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_CONFIG: u8 = 2;

/// How the CLI finds the control socket: `--socket`, `$TUNNELKEEPER_SOCKET`, the
/// `daemon.control_socket` of `--config` (or of the default config if it exists), or the
/// built-in default. Only that key is read, so a file with errors elsewhere (the very file a
/// `reload` is about to be refused for) still leads to the daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct SocketArgs {
    /// Control socket path.
    #[arg(long, env = "TUNNELKEEPER_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Configuration file whose `daemon.control_socket` to use.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

impl SocketArgs {
    fn client(&self) -> Result<Client, u8> {
        if let Some(s) = &self.socket {
            return Ok(Client::new(s));
        }
        let config = match &self.config {
            Some(c) => Some(c.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
        };
        match config {
            Some(path) => match crate::config::control_socket(&path) {
                Ok(socket) => Ok(Client::new(socket)),
                Err(e) => {
                    eprintln!("{e}");
                    Err(EXIT_CONFIG)
                }
            },
            None => Ok(Client::new(crate::config::spec::default::CONTROL_SOCKET)),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            EXIT_RUNTIME
        })
}

/// `tunnelkeeper check -c FILE`
pub fn check(path: &Path) -> u8 {
    match crate::config::load(path) {
        Ok(config) => {
            // `run` refuses a socket path that holds anything but a socket: so does `check`.
            let sockets = std::iter::once((
                "daemon.control_socket".to_string(),
                config.daemon.control_socket.clone(),
            ))
            .chain(config.services.iter().filter_map(|s| {
                match s.listen.as_ref().map(|l| &l.address) {
                    Some(crate::config::spec::ListenAddress::Unix(p)) => {
                        Some((format!("service `{}` listen", s.name), p.clone()))
                    }
                    _ => None,
                }
            }));
            let mut refused = false;
            for (key, socket) in sockets {
                if let Some(why) = crate::socket_file::not_a_socket(&socket) {
                    eprintln!("{}: {key}: {why}", path.display());
                    refused = true;
                }
            }
            if refused {
                return EXIT_CONFIG;
            }
            let tunnels: usize = config.services.iter().map(|s| s.tunnels.len()).sum();
            println!(
                "{}: ok ({} services, {} tunnels, {} routers)",
                path.display(),
                config.services.len(),
                tunnels,
                config.routers.len()
            );
            for service in &config.services {
                println!("  {}", crate::probe::schedule::describe_detection(service));
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_CONFIG
        }
    }
}

/// `tunnelkeeper run -c FILE`
pub fn run(path: &Path, log_format: crate::logging::LogFormat) -> u8 {
    if let Err(e) = crate::logging::init(log_format) {
        eprintln!("error: {e:#}");
        return EXIT_CONFIG;
    }
    let config = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(crate::daemon::run(config, shutdown_signal())) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            EXIT_RUNTIME
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// `tunnelkeeper status [--json]`
pub fn status(socket: &SocketArgs, json: bool) -> u8 {
    with_client(socket, |client| async move {
        if json {
            let v = client.status_json().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", render_status(&client.status().await?));
        }
        Ok(())
    })
}

/// Finds the daemon's socket, runs `f` with a client for it, and turns the outcome into an exit
/// code.
fn with_client<F, Fut>(socket: &SocketArgs, f: F) -> u8
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let client = match socket.client() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match runtime() {
        Ok(rt) => report(rt.block_on(f(client))),
        Err(code) => code,
    }
}

/// Makes text from outside safe for a terminal: every control character (C0, DEL, C1 — escape
/// sequences, carriage returns, newlines that would fake a line) is shown as `\xNN`/`\u{NNNN}`
/// instead of being sent to the operator's terminal. Verify output, boot ids, endpoints and
/// reasons come from routers, agents and children, which may be compromised.
pub fn escape_controls(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A copy of `value` with every string escaped by [`escape_controls`].
fn escape_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) if s.chars().any(char::is_control) => {
            *s = escape_controls(s);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(escape_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(escape_json),
        _ => {}
    }
}

/// The readable status table of `tunnelkeeper status`. Every string in it is escaped first
/// ([`escape_controls`]), so nothing a router or child reported can drive the terminal.
pub fn render_status(status: &DaemonStatus) -> String {
    let escaped = serde_json::to_value(status).ok().and_then(|mut v| {
        escape_json(&mut v);
        serde_json::from_value::<DaemonStatus>(v).ok()
    });
    render_escaped(escaped.as_ref().unwrap_or(status))
}

fn render_escaped(status: &DaemonStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let d = &status.daemon;
    let _ = writeln!(
        out,
        "tunnelkeeper {} (pid {}, up {}s, config {}, last event #{})",
        d.version, d.pid, d.uptime_s, d.config, d.last_seq
    );
    for s in &status.services {
        let _ = writeln!(
            out,
            "\nservice {}  primary: {}{}  mode: {}  reason: {}{}",
            s.name,
            s.primary.as_deref().unwrap_or("-"),
            if s.degraded { " (degraded)" } else { "" },
            s.mode,
            s.reason,
            s.pin
                .as_deref()
                .map(|p| format!("  pinned: {p}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  {:<1} {:<14} {:<9} {:>5} {:<10} {:>9} {:<24} {:>8} {:>7}  REASON",
            "", "TUNNEL", "PROVIDER", "PRIO", "STATE", "LATENCY", "ENDPOINT", "RESTARTS", "PID",
        );
        if let Some(l) = &s.listener {
            let failed: Vec<String> = l
                .failed_dials
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(t, n)| format!("{t}={n}"))
                .collect();
            let by_tunnel: Vec<String> = l
                .bytes_per_tunnel
                .iter()
                .filter(|(_, b)| b.to_service + b.to_client > 0)
                .map(|(t, b)| format!("{t}={}/{}", b.to_service, b.to_client))
                .collect();
            let _ = writeln!(
                out,
                "  listener {}: {} open, {} total, {} moved, {} unserved, {} B in, {} B out{}{}",
                l.address,
                l.active,
                l.total,
                l.replayed,
                l.unserved,
                l.bytes_to_service,
                l.bytes_to_client,
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(", failed dials: {}", failed.join(" "))
                },
                if by_tunnel.is_empty() {
                    String::new()
                } else {
                    format!(", B in/out by tunnel: {}", by_tunnel.join(" "))
                }
            );
        }
        for t in &s.tunnels {
            let mark = if s.primary.as_deref() == Some(t.name.as_str()) {
                "*"
            } else {
                ""
            };
            let state = format!("{:?}", t.state).to_lowercase();
            let latency = t
                .latency_ms
                .filter(|_| t.state != TunnelState::Stopped)
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".into());
            // Drained is not a state: the tunnel runs on, only the election and new
            // connections leave it alone.
            let reason = match (t.drained, t.reason.as_deref()) {
                (true, Some(why)) => format!("drained (no new connections); {why}"),
                (true, None) => "drained (no new connections)".to_owned(),
                (false, why) => why.unwrap_or("").to_owned(),
            };
            let _ = writeln!(
                out,
                "  {:<1} {:<14} {:<9} {:>5} {:<10} {:>9} {:<24} {:>8} {:>7}  {}",
                mark,
                t.name,
                t.provider,
                t.priority,
                state,
                latency,
                t.endpoint.as_deref().unwrap_or("-"),
                t.restarts,
                t.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                reason
            );
        }
    }
    for r in &status.routers {
        let provision = r
            .last_provision
            .as_ref()
            .map(|p| {
                format!(
                    "{} ({}, {})",
                    if p.ok { "ok" } else { "FAILED" },
                    p.cause,
                    p.at
                )
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "\nrouter {}  {}  boot id: {}  last reboot: {}  last provision: {}{}",
            r.name,
            if r.connected {
                "connected"
            } else {
                "UNREACHABLE"
            },
            r.boot_id.as_deref().unwrap_or("-"),
            r.last_reboot.as_deref().unwrap_or("-"),
            provision,
            r.reason
                .as_deref()
                .map(|why| format!("  reason: {why}"))
                .unwrap_or_default()
        );
        for c in &r.checks {
            let result = match c.ok {
                Some(true) => "ok",
                Some(false) => "DRIFT",
                None => "not run",
            };
            let _ = writeln!(
                out,
                "  check {:<16} {:<7} {}",
                c.name,
                result,
                c.got.as_deref().unwrap_or("")
            );
        }
    }
    out
}

/// `tunnelkeeper events [-f] [--since N] [--json]`
pub fn events(socket: &SocketArgs, follow: bool, since: u64, json: bool) -> u8 {
    with_client(socket, |client| async move {
        client
            .events(since, follow, |line| {
                let mut out = std::io::stdout().lock();
                if json {
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{}", render_event_line(line))?;
                }
                out.flush()?;
                Ok(())
            })
            .await
    })
}

/// One readable line for an NDJSON event: `#seq time type key=value ...`.
pub fn render_event_line(line: &str) -> String {
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(line)
    else {
        return escape_controls(line);
    };
    map.values_mut().for_each(escape_json);
    let get = |k: &str| map.get(k).map(plain).unwrap_or_default();
    let mut text = format!("#{} {} {}", get("seq"), get("time"), get("type"));
    for (k, v) in &map {
        if !matches!(k.as_str(), "seq" | "time" | "type") && !v.is_null() {
            text.push_str(&format!(" {k}={}", plain(v)));
        }
    }
    text
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `tunnelkeeper demo`
pub fn demo(quick: bool) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    report(rt.block_on(crate::demo::run(quick)))
}

/// `tunnelkeeper relay --to ADDR`
pub fn relay(listen: std::net::SocketAddr, to: std::net::SocketAddr) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    report(rt.block_on(crate::relay::run(listen, to)))
}

fn report(result: anyhow::Result<()>) -> u8 {
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            // The daemon refusing a request for what it says (an invalid config file, an
            // unknown service or tunnel) is the operator's input error, like `check`'s.
            match e.downcast_ref::<ApiError>().map(|a| a.status.as_u16()) {
                Some(400 | 404 | 422) => EXIT_CONFIG,
                _ => EXIT_RUNTIME,
            }
        }
    }
}

/// `tunnelkeeper pin SERVICE TUNNEL`
pub fn pin(socket: &SocketArgs, service: &str, tunnel: &str) -> u8 {
    with_client(socket, |client| async move {
        let answer = client.pin(service, tunnel).await?;
        println!(
            "{service}: pinned to {tunnel} (primary now: {})",
            answer["primary"].as_str().unwrap_or("none")
        );
        Ok(())
    })
}

/// `tunnelkeeper unpin SERVICE`
pub fn unpin(socket: &SocketArgs, service: &str) -> u8 {
    with_client(socket, |client| async move {
        let answer = client.unpin(service).await?;
        println!(
            "{service}: unpinned (primary now: {})",
            answer["primary"].as_str().unwrap_or("none")
        );
        Ok(())
    })
}

/// `tunnelkeeper reload`: exit 0 when applied, 2 when the daemon refused the file (it keeps
/// running the previous configuration), 1 when it could not be asked.
pub fn reload(socket: &SocketArgs) -> u8 {
    with_client(socket, |client| async move {
        let answer = client.reload().await?;
        let list = |key: &str| {
            let items: Vec<&str> = answer[key]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.join(", ")
            }
        };
        println!(
            "reloaded: added {}; removed {}; changed {}",
            list("added"),
            list("removed"),
            list("changed")
        );
        if answer["restart_required"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            println!(
                "takes effect at the next restart: {}",
                list("restart_required")
            );
        }
        Ok(())
    })
}

/// `SERVICE TUNNEL` and the socket options of `restart`, `drain`, `undrain` and `probe`.
#[derive(clap::Args, Debug, Clone)]
pub struct TunnelArgs {
    /// Service name.
    pub service: String,
    /// Tunnel name.
    pub tunnel: String,
    /// Where the daemon's control socket is.
    #[command(flatten)]
    pub socket: SocketArgs,
}

/// What an operator does to one tunnel from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelVerb {
    /// Stop it and start it again now.
    Restart,
    /// Take it out of service (not elected, no new connections, open ones kept).
    Drain,
    /// Put it back into service.
    Undrain,
    /// Run one probe now and print its timing.
    Probe,
}

impl TunnelVerb {
    fn name(self) -> &'static str {
        match self {
            TunnelVerb::Restart => "restart",
            TunnelVerb::Drain => "drain",
            TunnelVerb::Undrain => "undrain",
            TunnelVerb::Probe => "probe",
        }
    }
}

/// `tunnelkeeper restart|drain|undrain|probe SERVICE TUNNEL`. A failed probe exits 1 after
/// printing why.
pub fn tunnel(args: &TunnelArgs, verb: TunnelVerb) -> u8 {
    let (socket, service, tunnel) = (&args.socket, args.service.as_str(), args.tunnel.as_str());
    let mut probe_failed = false;
    let code = with_client(socket, |client| {
        let probe_failed = &mut probe_failed;
        async move {
            let answer = client.tunnel(service, tunnel, verb.name()).await?;
            let primary = answer["primary"].as_str().unwrap_or("none");
            match verb {
                TunnelVerb::Restart => {
                    println!("{service}/{tunnel}: restarted (primary now: {primary})")
                }
                TunnelVerb::Drain => println!(
                    "{service}/{tunnel}: drained: not elected, no new connections; open ones go on \
                     (primary now: {primary})"
                ),
                TunnelVerb::Undrain => {
                    println!("{service}/{tunnel}: back in service (primary now: {primary})")
                }
                TunnelVerb::Probe => {
                    println!("{}", escape_controls(&render_probe(&answer)));
                    *probe_failed = answer["ok"] != serde_json::Value::Bool(true);
                }
            }
            Ok(())
        }
    });
    if code == EXIT_OK && probe_failed {
        EXIT_RUNTIME
    } else {
        code
    }
}

/// One line for the answer of a probe: `svc/t: ok in 3.2ms (latency 2.9ms)` or
/// `svc/t: failed after 1000.0ms: REASON`.
pub fn render_probe(answer: &serde_json::Value) -> String {
    let name = format!(
        "{}/{}",
        answer["service"].as_str().unwrap_or("?"),
        answer["tunnel"].as_str().unwrap_or("?")
    );
    let elapsed = answer["elapsed_ms"].as_f64().unwrap_or_default();
    if answer["ok"] == serde_json::Value::Bool(true) {
        let latency = answer["latency_ms"].as_f64().unwrap_or_default();
        format!("{name}: ok in {elapsed:.1}ms (end-to-end latency {latency:.1}ms)")
    } else {
        format!(
            "{name}: failed after {elapsed:.1}ms: {}",
            answer["error"].as_str().unwrap_or("unknown reason")
        )
    }
}

/// `tunnelkeeper ssh-reset TARGET`
pub fn ssh_reset(socket: &SocketArgs, target: &str) -> u8 {
    with_client(socket, |client| async move {
        let answer = client.ssh_reset(target).await?;
        println!(
            "{target}: {} session(s) closed; their users reconnect",
            answer["closed"].as_u64().unwrap_or_default()
        );
        Ok(())
    })
}
