//! Zero-copy forwarding between two TCP sockets with `splice(2)`.
//!
//! Bytes move socket → pipe → socket inside the kernel; userspace only waits for readiness
//! and counts what each `splice` call moved, so there is no per-byte work on the hot path. Each
//! direction has its own pipe and ends with a half-close (`shutdown(SHUT_WR)`) on the other
//! socket, so a client that has finished sending still receives the rest of the reply.
//!
//! The pipe is made only once a direction has bytes to move: in a short exchange (a request,
//! its answer, close) both directions usually have nothing left by the time streaming starts,
//! and a one-byte `MSG_PEEK` that sees the end of stream is cheaper than creating, resizing and
//! closing a pipe.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::socket::{shutdown, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Tally;

/// Pipe capacity asked for: larger chunks mean fewer splices and wake-ups per gigabyte. The
/// kernel may grant less (`/proc/sys/fs/pipe-max-size` for unprivileged users); the actual
/// capacity is read back.
const PIPE_SIZE: usize = 1024 * 1024;
/// The default pipe capacity (16 pages), used when resizing is refused.
const DEFAULT_PIPE: usize = 64 * 1024;

/// Copies `from` → `to` until `from` reaches end of stream, then half-closes `to`. Adds every
/// chunk moved to `counter` (the listener's total and the tunnel's) and calls `touch` (idle
/// tracking) once per chunk.
pub async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    counter: Tally<'_>,
    touch: &(dyn Fn() + Sync),
) -> io::Result<()> {
    if from.peek(&mut [0u8; 1]).await? == 0 {
        let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
        return Ok(());
    }
    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let chunk = match nix::fcntl::fcntl(
        &pipe_w,
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32),
    ) {
        Ok(granted) if granted > 0 => granted as usize,
        _ => DEFAULT_PIPE,
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let moved = fill(from, &pipe_w, chunk, flags).await?;
        if moved == 0 {
            // End of stream from `from`: pass the half-close on and keep the other direction.
            let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
            return Ok(());
        }
        drain(&pipe_r, to, moved, flags).await?;
        counter.add(moved);
        touch();
    }
}

/// Moves what `from` has into the (empty) pipe; 0 means end of stream.
async fn fill(
    from: &TcpStream,
    pipe_w: &OwnedFd,
    chunk: usize,
    flags: SpliceFFlags,
) -> io::Result<usize> {
    loop {
        from.readable().await?;
        let result = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe_w.as_fd(), None, chunk, flags).map_err(io::Error::from)
        });
        match result {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Moves `len` bytes from the pipe into `to`, waiting whenever `to`'s send buffer is full.
async fn drain(
    pipe_r: &OwnedFd,
    to: &TcpStream,
    mut len: usize,
    flags: SpliceFFlags,
) -> io::Result<()> {
    while len > 0 {
        to.writable().await?;
        let result = to.try_io(Interest::WRITABLE, || {
            splice(pipe_r.as_fd(), None, to.as_fd(), None, len, flags).map_err(io::Error::from)
        });
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
