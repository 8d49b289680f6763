//! Addresses and connecting: `host:port`, a free loopback port, and the first of several
//! addresses that accepts within a deadline.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// `host:port`, with brackets around an IPv6 literal.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A loopback address with a port nothing listens on right now (bound, then released: the
/// program it is handed to may lose it to another process, and has to be retried then).
pub fn free_loopback_addr() -> io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|listener| listener.local_addr())
}

/// Why no address of a [`connect_any`] accepted: what the last one tried answered.
#[derive(Debug)]
pub enum ConnectFailure {
    /// There was no address, or the deadline had passed before the first try.
    NotTried,
    /// The last address tried refused or failed.
    Failed(SocketAddr, io::Error),
    /// The last address tried did not answer within its share of the time.
    NoAnswer(SocketAddr, Duration),
}

/// Connects over TCP to the first of `addrs` that accepts before `deadline`, with
/// `TCP_NODELAY` set (interactive protocols suffer from Nagle; bulk transfer does not mind).
/// What is left of the time is shared fairly among the addresses not yet tried, so that one
/// black-holed address cannot starve the others (`localhost` has `::1` while a service may
/// bind `127.0.0.1` only).
pub async fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<TcpStream, ConnectFailure> {
    let mut last = ConnectFailure::NotTried;
    for (i, addr) in addrs.iter().enumerate() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let left = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        let share = remaining / left;
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(err)) => last = ConnectFailure::Failed(*addr, err),
            Err(_) => last = ConnectFailure::NoAnswer(*addr, share),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_brackets_ipv6() {
        assert_eq!(host_port("ssh.example.com", 443), "ssh.example.com:443");
        assert_eq!(host_port("127.0.0.1", 22), "127.0.0.1:22");
        assert_eq!(host_port("::1", 22), "[::1]:22");
    }

    #[test]
    fn a_free_port_can_be_bound() {
        let addr = free_loopback_addr().expect("free port");
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        TcpListener::bind(addr).expect("still free");
    }

    #[tokio::test]
    async fn connects_to_the_first_address_that_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        // A port just released: nothing listens there, the connect is refused at once.
        let closed = free_loopback_addr().expect("free port");
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = connect_any(&[closed, open], deadline)
            .await
            .expect("connect");
        assert_eq!(stream.peer_addr().expect("peer"), open);
        assert!(stream.nodelay().expect("nodelay"));
        match connect_any(&[closed], deadline).await {
            Err(ConnectFailure::Failed(addr, _)) => assert_eq!(addr, closed),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            connect_any(&[], deadline).await,
            Err(ConnectFailure::NotTried)
        ));
        assert!(matches!(
            connect_any(&[open], Instant::now()).await,
            Err(ConnectFailure::NotTried)
        ));
    }
}
