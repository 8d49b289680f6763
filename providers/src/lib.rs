//! Tunnel providers for tunnelkeeper.
//!
//! A [`Provider`] knows how to bring up one kind of path to a service (a TCP address, a child
//! process such as `bore` or `cloudflared`, an SSH forward) and hands back a running [`Tunnel`].
//! A tunnel can [`dial`](Tunnel::dial) a fresh byte stream to the service through that path,
//! report provider-native health with [`check`](Tunnel::check), resolve
//! [`closed`](Tunnel::closed) the moment the path dies (the *hard signal*), and
//! [`stop`](Tunnel::stop) gracefully.
//!
//! Providers know nothing of elections, buses or services: the daemon drives them through this
//! trait only, and they never learn why they were started or stopped.

// `unsafe` is denied everywhere except `sys`, the small syscall module that needs a `pre_exec` hook.
#![deny(unsafe_code)]
// No `unwrap`/`expect` in shipped code: a bad input is an error with context, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cloudflare;
pub mod command;
pub mod direct;
mod dns;
pub mod http;
pub mod process;
pub mod resolve;
pub mod spec;
pub mod ssh;
pub mod sys;
pub mod util;
pub mod version;

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use resolve::Resolver;

/// Errors a provider reports. Callers match on the kind: a `Config` error will not heal by
/// retrying, everything else may.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The tunnel's settings cannot work (bad regex, empty argv, ...).
    #[error("invalid settings: {0}")]
    Config(String),
    /// The program the provider runs is not installed.
    #[error("`{binary}` not found: {hint}")]
    MissingBinary {
        /// The program that was looked for.
        binary: String,
        /// How to get it.
        hint: String,
    },
    /// The child process could not be spawned or exited during start.
    #[error("{0}")]
    Spawn(String),
    /// Start did not finish in time (e.g. the endpoint never appeared in the output).
    #[error("start timed out after {after:?}: {detail}")]
    StartTimeout {
        /// How long start waited.
        after: Duration,
        /// What was missing.
        detail: String,
    },
    /// A name did not resolve.
    #[error("cannot resolve {name}: {detail}")]
    Resolve {
        /// The name looked up.
        name: String,
        /// The resolver's answer.
        detail: String,
    },
    /// Opening a stream through the tunnel failed.
    #[error("dial {target}: {source}")]
    Dial {
        /// Where the dial went.
        target: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Opening a stream or a check took longer than allowed.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// The tunnel is not (or no longer) usable.
    #[error("tunnel closed: {0}")]
    Closed(String),
    /// The provider's own health check failed.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
    /// An SSH server's host key was refused (unknown, changed or revoked). The message names
    /// the key's fingerprint and the known_hosts line to add or replace.
    #[error("{0}")]
    HostKey(String),
    /// An SSH server refused every authentication method that was tried.
    #[error("{0}")]
    Auth(String),
    /// An SSH connection, channel or request failed.
    #[error("ssh {target}: {detail}")]
    Ssh {
        /// `user@host:port` of the server.
        target: String,
        /// What went wrong.
        detail: String,
    },
}

impl ProviderError {
    /// A missing program reported with `hint` (how to install that provider's CLI); any other
    /// error unchanged.
    pub fn with_install_hint(self, hint: &str) -> ProviderError {
        match self {
            ProviderError::MissingBinary { binary, .. } => ProviderError::MissingBinary {
                binary,
                hint: hint.to_string(),
            },
            other => other,
        }
    }
}

/// Shorthand for provider results.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// Where a tunnel leads, as shown to operators and used by probes that need an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, a URL, or a hostname, exactly as the provider learned it.
    pub display: String,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// A bidirectional byte stream that is not a plain TCP socket (an SSH channel, a Unix socket).
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

/// A stream opened through a tunnel. Kept as an enum so the data plane can use zero-copy
/// `splice(2)` when both sides are TCP sockets.
pub enum Dial {
    /// A TCP connection to the tunnel's endpoint.
    Tcp(TcpStream),
    /// Any other byte stream.
    Stream(Box<dyn ByteStream>),
}

impl fmt::Debug for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dial::Tcp(s) => f
                .debug_tuple("Dial::Tcp")
                .field(&s.peer_addr().ok())
                .finish(),
            Dial::Stream(_) => f.write_str("Dial::Stream"),
        }
    }
}

impl AsyncRead for Dial {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Dial::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Dial::Stream(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Dial {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Dial::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Dial::Stream(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Dial::Tcp(s) => Pin::new(s).poll_flush(cx),
            Dial::Stream(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Dial::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Dial::Stream(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Provider-native health, as reported by [`Tunnel::check`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// A round trip measured by the provider itself (SSH keepalive, `tailscale ping`), if any.
    pub latency: Option<Duration>,
    /// Extra facts worth showing (e.g. "via DERP(fra)"), if any.
    pub detail: Option<String>,
}

/// What a provider needs to know about the tunnel it starts, beyond its own settings.
#[derive(Debug, Clone)]
pub struct StartContext {
    /// The tunnel's name, used to tag log lines.
    pub tunnel: String,
    /// The service the tunnel belongs to, used to tag log lines.
    pub service: String,
    /// Name resolution honouring the daemon's `dns.nameservers`.
    pub resolver: Resolver,
}

impl StartContext {
    /// The tag of this tunnel's log lines: `service/tunnel`.
    pub fn tag(&self) -> String {
        util::log_tag(&self.service, &self.tunnel)
    }
}

/// Something that can bring up tunnels of one kind.
#[async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// Brings the tunnel up. Returns once it is usable or has failed; a provider that waits for
    /// an endpoint to appear bounds that wait itself.
    async fn start(&self, ctx: &StartContext) -> Result<Arc<dyn Tunnel>>;
}

/// A running tunnel.
#[async_trait]
pub trait Tunnel: Send + Sync {
    /// Where the tunnel leads.
    fn endpoint(&self) -> Endpoint;

    /// The child process behind the tunnel, if there is one (shown in status, used by tests and
    /// the demo to inject faults).
    fn pid(&self) -> Option<u32> {
        None
    }

    /// Opens a fresh stream to the service through this tunnel, within `timeout`.
    async fn dial(&self, timeout: Duration) -> Result<Dial>;

    /// Provider-native health. The default says "alive" while the tunnel is not closed.
    async fn check(&self) -> Result<Health> {
        Ok(Health::default())
    }

    /// Resolves with a reason the moment the path dies (child exit, SSH disconnect). Must be
    /// callable repeatedly and from several tasks; once closed it resolves at once.
    async fn closed(&self) -> String;

    /// Stops the tunnel gracefully (bounded in time). Idempotent.
    async fn stop(&self);
}

/// Dials `target` over TCP within `timeout`, with `TCP_NODELAY` set: the building block of every
/// provider whose path ends in a TCP endpoint.
pub async fn dial_tcp(target: std::net::SocketAddr, timeout: Duration) -> Result<Dial> {
    let connect = TcpStream::connect(target);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => {
            // Interactive protocols (SSH) suffer from Nagle; bulk transfer does not mind.
            let _ = stream.set_nodelay(true);
            Ok(Dial::Tcp(stream))
        }
        Ok(Err(source)) => Err(ProviderError::Dial {
            target: target.to_string(),
            source,
        }),
        Err(_) => Err(ProviderError::Timeout {
            what: format!("connect to {target}"),
            after: timeout,
        }),
    }
}
pub mod ngrok;
pub mod tailscale;
