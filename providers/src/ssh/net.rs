//! The TCP side of an SSH connection: connecting within a deadline, and a socket wrapper that
//! keeps the kernel from delaying ACKs.
//!
//! OpenSSH's server does not disable Nagle's algorithm on its side of the connection (it only
//! does for sessions with a terminal). So when it sends two small packets in a row — say the
//! `CLOSE` of a finished channel, then the answer to our next request — the second one waits
//! until the first is acknowledged, and Linux delays that ACK by up to 40 ms. Every such stall
//! would show up as latency in probes and dials. Re-arming `TCP_QUICKACK` after each read makes
//! our side acknowledge at once; the flag is not sticky, hence the wrapper.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::config::PoolKey;
use crate::util::{connect_any, ConnectFailure};
use crate::{ProviderError, Resolver};

/// Resolves the host and connects to the first address that accepts, before `deadline`.
pub(crate) async fn tcp_connect(
    key: &PoolKey,
    resolver: Option<&Resolver>,
    limit: Duration,
    deadline: Instant,
) -> Result<TcpStream, ProviderError> {
    let addrs: Vec<SocketAddr> = match resolver {
        Some(resolver) => resolver
            .lookup_ip(&key.host, limit)
            .await?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, key.port))
            .collect(),
        None => {
            let lookup = tokio::net::lookup_host((key.host.as_str(), key.port));
            match tokio::time::timeout(limit, lookup).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(err)) => {
                    return Err(ProviderError::Resolve {
                        name: key.host.clone(),
                        detail: err.to_string(),
                    })
                }
                Err(_) => {
                    return Err(ProviderError::Timeout {
                        what: format!("resolving {}", key.host),
                        after: limit,
                    })
                }
            }
        }
    };
    let last_error = match connect_any(&addrs, deadline).await {
        Ok(stream) => return Ok(stream),
        Err(ConnectFailure::Failed(addr, err)) => Some(format!("{addr}: {err}")),
        Err(ConnectFailure::NoAnswer(addr, _)) => Some(format!("{addr}: no answer")),
        Err(ConnectFailure::NotTried) => None,
    };
    match last_error {
        Some(detail) if Instant::now() < deadline => Err(ProviderError::Ssh {
            target: key.to_string(),
            detail: format!("cannot connect: {detail}"),
        }),
        _ => Err(ProviderError::Timeout {
            what: format!("ssh connect to {key}"),
            after: limit,
        }),
    }
}

/// A TCP stream that acknowledges received data immediately (see the module docs).
pub(crate) struct QuickAck {
    inner: TcpStream,
}

impl QuickAck {
    /// Wraps a connected stream.
    pub(crate) fn new(inner: TcpStream) -> QuickAck {
        let quick = QuickAck { inner };
        quick.rearm();
        quick
    }

    fn rearm(&self) {
        // Best effort: a failure only means ACKs may be delayed.
        let _ = SockRef::from(&self.inner).set_tcp_quickack(true);
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > filled {
            self.rearm();
        }
        result
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
