//! A tiny TCP relay: the stand-in tunnel of `tunnelkeeper demo`.
//!
//! `tunnelkeeper relay --to HOST:PORT` listens on a free loopback port, prints
//! `relay listening at 127.0.0.1:PORT` (which the demo's `endpoint_regex` captures), and copies
//! bytes both ways for every connection. Being a real child process, it can be killed with
//! SIGKILL or frozen with SIGSTOP, exactly like a real tunnel client.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Runs the relay until the process is killed.
pub async fn run(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr()?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("relay listening at {local}\n").as_bytes())
        .await?;
    out.flush().await?;
    loop {
        let (mut client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(to).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
