//! Byte streams over SSH channels: the stream `dial()` hands out, and the bridge that joins a
//! forwarded channel to a local TCP connection.
//!
//! [`SshStream`] wraps russh's channel stream with two things russh lacks: it frees the pool's
//! channel slot when dropped, and its writes fail (instead of waiting forever for window space)
//! once the server has closed the channel or the connection is gone.
//!
//! Known limit (russh 0.65): russh grants the server more window as soon as data arrives, not
//! when it is read, and hands data to each channel through a bounded queue. A reader that stops
//! reading therefore stalls, after about a hundred packets, every channel of its session until
//! it reads again. Bridges here always read promptly; a stream handed to the daemon should be
//! read or dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use russh::client::Msg;
use russh::{Channel, ChannelStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::session::{ChannelGuard, Shared};

/// One SSH channel as a byte stream.
pub(crate) struct SshStream {
    inner: ChannelStream<Msg>,
    /// Resolves when the server closed the channel or the connection ended.
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    token: CancellationToken,
    id: russh::ChannelId,
    guard: ChannelGuard,
}

impl Drop for SshStream {
    fn drop(&mut self) {
        self.guard.shared().forget_channel(self.id);
    }
}

impl SshStream {
    /// Wraps an open channel of `shared`'s session; `guard` is its pool slot.
    pub(crate) fn new(channel: Channel<Msg>, shared: &Shared, guard: ChannelGuard) -> SshStream {
        let id = channel.id();
        let token = shared.channel_token(id);
        SshStream {
            inner: channel.into_stream(),
            closed: Box::pin(token.clone().cancelled_owned()),
            token,
            id,
            guard,
        }
    }

    /// The token cancelled when the channel is gone.
    pub(crate) fn closed_token(&self) -> CancellationToken {
        self.token.clone()
    }

    fn check_closed(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "ssh channel closed by the server",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for SshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // No close check: data the server sent before closing is still queued and must be
        // read; the queue ends with end-of-file.
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_closed(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.check_closed(cx).is_err() {
            // Nothing left to half-close.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways between a channel and a TCP connection until both directions are done,
/// passing each end-of-file on as a half-close. Ends early when `stop` is cancelled. Once the
/// server closes the channel, the TCP→channel direction stops (nothing more can be sent), while
/// data the server sent before closing is still delivered.
pub(crate) async fn bridge(channel: SshStream, tcp: TcpStream, stop: CancellationToken) {
    let channel_gone = channel.closed_token();
    let (mut channel_read, mut channel_write) = tokio::io::split(channel);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let down = async {
        let _ = tokio::io::copy(&mut channel_read, &mut tcp_write).await;
        let _ = tcp_write.shutdown().await;
    };
    let up = async {
        tokio::select! {
            _ = tokio::io::copy(&mut tcp_read, &mut channel_write) => {
                let _ = channel_write.shutdown().await;
            }
            _ = channel_gone.cancelled() => {}
        }
    };
    tokio::select! {
        _ = async { tokio::join!(down, up) } => {}
        _ = stop.cancelled() => {}
    }
}
