//! The daemon: wires config, bus, services and the control socket together.
//!
//! [`Daemon::start`] brings everything up and returns a handle (used by `run`, the demo and the
//! tests alike); [`run`] adds the process-level concerns: signals, sd-notify and the watchdog.
//! Shutdown is injected as a future so tests can drive it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnelkeeper_providers::cloudflare::CloudflareProvider;
use tunnelkeeper_providers::command::CommandProvider;
use tunnelkeeper_providers::direct::DirectProvider;
use tunnelkeeper_providers::ngrok::NgrokProvider;
use tunnelkeeper_providers::ssh::{SshPool, SshProvider};
use tunnelkeeper_providers::tailscale::TailscaleProvider;
use tunnelkeeper_providers::{Provider, Resolver};

use crate::bus::{Bus, EventKind, DEFAULT_JOURNAL};
use crate::config::spec::{Config, ProviderSpec};
use crate::control::{self, ControlState};
use crate::forward::{Acceptor, ListenerStats};
use crate::service::ServiceHandle;
use crate::status::{self, DaemonInfo, DaemonStatus, SharedStatus};
use crate::systemd;

/// A running daemon.
pub struct Daemon {
    config: Config,
    bus: Arc<Bus>,
    services: Vec<ServiceHandle>,
    cancel: CancellationToken,
    control: JoinHandle<()>,
    status: Arc<dyn Fn() -> DaemonStatus + Send + Sync>,
    socket: PathBuf,
}

/// Builds the provider for one tunnel. The only place that maps settings to provider types.
pub fn provider_for(spec: &ProviderSpec, ssh: &SshPool) -> Arc<dyn Provider> {
    match spec {
        ProviderSpec::Direct(s) => Arc::new(DirectProvider::new(s.clone())),
        ProviderSpec::Command(s) => Arc::new(CommandProvider::new(s.clone())),
        ProviderSpec::Ssh(s) => Arc::new(SshProvider::new(s.clone(), ssh.clone())),
        ProviderSpec::Cloudflare(s) => Arc::new(CloudflareProvider::new(s.clone())),
        ProviderSpec::Tailscale(s) => Arc::new(TailscaleProvider::new(s.clone())),
        ProviderSpec::Ngrok(s) => Arc::new(NgrokProvider::new(s.clone())),
    }
}

impl Daemon {
    /// Binds the control socket, then starts every service (tunnels come up in the background).
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        let resolver = Resolver::new(&config.nameservers).context("setting up the DNS resolver")?;
        let bus = Bus::new(DEFAULT_JOURNAL);
        let ssh = SshPool::with_resolver(resolver.clone());
        let cancel = CancellationToken::new();
        let socket = config.daemon.control_socket.clone();
        let listener = control::server::bind(&socket).await?;

        // Every listener is bound before anything starts: a taken address fails the start
        // cleanly, with nothing to tear down.
        let mut acceptors = Vec::new();
        for spec in &config.services {
            acceptors.push(match &spec.listen {
                Some(listen) => Some(
                    Acceptor::bind(&listen.address)
                        .await
                        .with_context(|| format!("service `{}`", spec.name))?,
                ),
                None => None,
            });
        }
        let services: Vec<ServiceHandle> = config
            .services
            .iter()
            .zip(acceptors)
            .map(|(spec, acceptor)| {
                let providers = spec
                    .tunnels
                    .iter()
                    .map(|t| provider_for(&t.provider, &ssh))
                    .collect();
                ServiceHandle::start(
                    spec.clone(),
                    providers,
                    acceptor,
                    bus.clone(),
                    resolver.clone(),
                    &cancel,
                )
            })
            .collect();

        let status = status_source(&config, &bus, &services, &ssh);
        let state = Arc::new(ControlState {
            bus: bus.clone(),
            status: {
                let status = status.clone();
                Box::new(move || status())
            },
            readers: config.daemon.readers.clone(),
        });
        let control = tokio::spawn(control::serve(listener, state, cancel.child_token()));
        Ok(Daemon {
            config,
            bus,
            services,
            cancel,
            control,
            status,
            socket,
        })
    }

    /// The event bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// The running services.
    pub fn services(&self) -> &[ServiceHandle] {
        &self.services
    }

    /// The status document served on `/v1/status`.
    pub fn status(&self) -> DaemonStatus {
        (self.status)()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops every tunnel (children get SIGTERM, then SIGKILL after their grace), bounded by
    /// `daemon.shutdown_grace`, then closes and removes the control socket.
    pub async fn shutdown(mut self) {
        self.bus.publish(EventKind::DaemonStopping {});
        let grace = self.config.daemon.shutdown_grace;
        // Listeners first: stop accepting and let open connections finish, while the tunnels
        // they use are still up.
        futures_util::future::join_all(self.services.iter_mut().map(|s| s.drain(grace))).await;
        let stops = futures_util::future::join_all(self.services.into_iter().map(|s| s.stop()));
        if tokio::time::timeout(grace, stops).await.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown grace elapsed; some tunnels were still stopping"
            );
        }
        self.cancel.cancel();
        let _ = self.control.await;
        if let Err(e) = std::fs::remove_file(&self.socket) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.socket.display());
            }
        }
    }
}

fn status_source(
    config: &Config,
    bus: &Arc<Bus>,
    services: &[ServiceHandle],
    ssh: &SshPool,
) -> Arc<dyn Fn() -> DaemonStatus + Send + Sync> {
    let ssh = ssh.clone();
    let shared: Vec<(SharedStatus, Option<ListenerStats>)> = services
        .iter()
        .map(|s| (s.status.clone(), s.listener_stats()))
        .collect();
    let bus = bus.clone();
    let config_path = config.source.display().to_string();
    let started_wall = status::rfc3339(SystemTime::now());
    let started = Instant::now();
    Arc::new(move || DaemonStatus {
        daemon: DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            config: config_path.clone(),
            started: started_wall.clone(),
            uptime_s: started.elapsed().as_secs(),
            last_seq: bus.last_seq(),
        },
        services: shared
            .iter()
            .map(|(status, listener)| {
                let mut s = status::read(status);
                s.listener = listener.as_ref().map(ListenerStats::status);
                s
            })
            .collect(),
        ssh_pool: serde_json::to_value(ssh.stats()).unwrap_or_default(),
    })
}

/// Runs the daemon until `shutdown` resolves: READY=1 once the socket is bound, STATUS= on every
/// primary change, WATCHDOG=1 from this loop (so a stalled loop stops petting), STOPPING=1 on the
/// way out.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let daemon = Daemon::start(config).await?;
    systemd::ready();
    tracing::info!(
        socket = %daemon.socket.display(),
        services = daemon.services.len(),
        "tunnelkeeper ready"
    );
    // Subscribe before the first STATUS=: whatever happened earlier is in that first line.
    let mut events = daemon.bus.subscribe();
    let report_status = |daemon: &Daemon| {
        let lines: Vec<String> = daemon
            .services
            .iter()
            .map(|s| s.status().summary())
            .collect();
        systemd::status(&lines.join("; "));
    };
    report_status(&daemon);
    let watchdog = systemd::watchdog_period();
    let mut pet = tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // Tunnel states reach the status board just after their events; a slow refresh catches up.
    let mut refresh = tokio::time::interval(std::time::Duration::from_secs(5));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = refresh.tick() => report_status(&daemon),
            _ = pet.tick() => if watchdog.is_some() { systemd::watchdog() },
            _ = hangup.recv() => tracing::warn!(
                "SIGHUP: configuration reload is not available in this build yet; \
                 restart the daemon to apply a changed configuration"
            ),
            _ = events.next() => report_status(&daemon),
        }
    }
    systemd::stopping();
    tracing::info!("shutting down");
    daemon.shutdown().await;
    Ok(())
}
