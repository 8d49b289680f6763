//! Name resolution without the network: literals, localhost, a dead nameserver, and the stub
//! resolver against a scripted nameserver on loopback (UDP and TCP on one port).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use tunnelkeeper_providers::{ProviderError, Resolver};

/// A nameserver address where nothing answers (a UDP port just released).
fn dead_nameserver() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

#[tokio::test]
async fn literals_need_no_query() {
    // Even a resolver with only a dead nameserver answers literals.
    let resolver = Resolver::with_nameserver_addrs(&[dead_nameserver()]).expect("resolver");
    let t = Duration::from_millis(200);
    assert_eq!(
        resolver.lookup_ip("192.0.2.7", t).await.expect("v4"),
        [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))]
    );
    assert_eq!(
        resolver.lookup_ip("[::1]", t).await.expect("v6"),
        [IpAddr::V6(Ipv6Addr::LOCALHOST)]
    );
    assert_eq!(
        resolver
            .resolve_socket("1.2.3.4:5", t)
            .await
            .expect("socket"),
        "1.2.3.4:5".parse().expect("addr")
    );
    assert_eq!(
        resolver
            .resolve_socket("[::1]:22", t)
            .await
            .expect("socket"),
        "[::1]:22".parse().expect("addr")
    );
    assert_eq!(
        resolver
            .resolve_socket("tcp://10.0.0.1:4242", t)
            .await
            .expect("url"),
        "10.0.0.1:4242".parse().expect("addr")
    );
}

#[tokio::test]
async fn localhost_resolves_offline() {
    for resolver in [
        Resolver::new(&[]).expect("system resolver"),
        Resolver::with_nameserver_addrs(&[dead_nameserver()]).expect("dead resolver"),
    ] {
        let addrs = resolver
            .lookup_ip("localhost", Duration::from_secs(5))
            .await
            .expect("localhost");
        assert!(addrs.iter().all(IpAddr::is_loopback), "{addrs:?}");
        let socket = resolver
            .resolve_socket("localhost:8080", Duration::from_secs(5))
            .await
            .expect("socket");
        assert!(socket.ip().is_loopback());
        assert_eq!(socket.port(), 8080);
    }
}

#[tokio::test]
async fn dead_nameserver_gives_a_clear_error_within_the_timeout() {
    let dead = dead_nameserver();
    let resolver = Resolver::with_nameserver_addrs(&[dead]).expect("resolver");
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let result = resolver
        .lookup_ip("tunnelkeeper-test.invalid", timeout)
        .await;
    let took = started.elapsed();
    match result {
        Err(ProviderError::Resolve { name, detail }) => {
            assert_eq!(name, "tunnelkeeper-test.invalid");
            assert!(!detail.is_empty());
        }
        other => panic!("expected a resolve error, got {other:?}"),
    }
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    let err = resolver
        .resolve_socket("tunnelkeeper-test.invalid:22", timeout)
        .await;
    assert!(matches!(err, Err(ProviderError::Resolve { .. })), "{err:?}");
}

#[tokio::test]
async fn malformed_endpoints_are_config_errors() {
    let resolver = Resolver::new(&[]).expect("resolver");
    for bad in ["host-without-port", "::1:22", "host:notaport", ":80"] {
        let err = resolver.resolve_socket(bad, Duration::from_secs(1)).await;
        assert!(
            matches!(err, Err(ProviderError::Config(_))),
            "{bad}: {err:?}"
        );
    }
}

#[test]
fn debug_names_the_nameservers() {
    let resolver =
        Resolver::new(&[IpAddr::V4(Ipv4Addr::new(100, 100, 100, 100))]).expect("resolver");
    assert!(format!("{resolver:?}").contains("100.100.100.100:53"));
}

// ---------------------------------------------------------------------------------------------
// The stub resolver against a scripted nameserver.

const V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10);
/// What a forged or stale reply offers; never to be taken.
const BOGUS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

/// How the scripted nameserver answers over UDP (over TCP it always answers).
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// A and AAAA records.
    Answer,
    /// First a reply with another id, then one with another question (both offering BOGUS),
    /// then the real one.
    ForgedFirst,
    /// An empty reply with the TC bit: the client must ask again over TCP.
    Truncate,
    /// NXDOMAIN.
    NxDomain,
    /// SERVFAIL.
    ServFail,
}

struct Nameserver {
    addr: SocketAddr,
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
}

/// Starts a nameserver on 127.0.0.1 (UDP and TCP on the same free port) that follows `script`.
async fn nameserver(script: Script) -> Nameserver {
    let (udp_socket, listener) = loop {
        let udp_socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp_socket.local_addr().expect("udp addr");
        if let Ok(listener) = TcpListener::bind(addr).await {
            break (udp_socket, listener);
        }
    };
    let addr = udp_socket.local_addr().expect("udp addr");
    let (udp, tcp) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let count = udp.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp_socket.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::SeqCst);
            let Some(query) = Query::parse(&buf[..n]) else {
                continue;
            };
            let reply = match script {
                Script::Answer => query.reply(0, false, V4, V6),
                Script::Truncate => query.reply(0, true, V4, V6),
                Script::NxDomain => query.reply(3, false, V4, V6),
                Script::ServFail => query.reply(2, false, V4, V6),
                Script::ForgedFirst => {
                    let mut wrong_id = query.reply(0, false, BOGUS, Ipv6Addr::LOCALHOST);
                    wrong_id[0] ^= 0xFF;
                    let _ = udp_socket.send_to(&wrong_id, from).await;
                    let mut other = query.clone();
                    other.question[1] = b'z'; // another name (`homebox` → `zomebox`)
                    let _ = udp_socket
                        .send_to(&other.reply(0, false, BOGUS, Ipv6Addr::LOCALHOST), from)
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    query.reply(0, false, V4, V6)
                }
            };
            let _ = udp_socket.send_to(&reply, from).await;
        }
    });
    let count = tcp.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.ok()?;
                let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut message).await.ok()?;
                let reply = Query::parse(&message)?.reply(0, false, V4, V6);
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                stream.write_all(&framed).await.ok()
            });
        }
    });
    Nameserver { addr, udp, tcp }
}

/// A query as the nameserver reads it: id, the question's bytes, its type.
#[derive(Clone)]
struct Query {
    id: [u8; 2],
    rd: bool,
    question: Vec<u8>,
    qtype: u16,
}

impl Query {
    fn parse(message: &[u8]) -> Option<Query> {
        let mut at = 12;
        loop {
            let len = usize::from(*message.get(at)?);
            at += 1 + len;
            if len == 0 {
                break;
            }
        }
        let question = message.get(12..at + 4)?.to_vec();
        Some(Query {
            id: [message[0], message[1]],
            rd: message[2] & 0x01 != 0,
            qtype: u16::from_be_bytes([message[at], message[at + 1]]),
            question,
        })
    }

    /// The reply: `rcode`, the TC bit, and (NOERROR, not truncated) the record the type asks.
    fn reply(&self, rcode: u8, truncated: bool, v4: Ipv4Addr, v6: Ipv6Addr) -> Vec<u8> {
        assert!(self.rd, "the stub resolver asks for recursion");
        let rdata = match self.qtype {
            1 => v4.octets().to_vec(),
            28 => v6.octets().to_vec(),
            _ => Vec::new(),
        };
        let answer = rcode == 0 && !truncated && !rdata.is_empty();
        let mut m = self.id.to_vec();
        m.push(0x81 | if truncated { 0x02 } else { 0 });
        m.push(0x80 | rcode);
        m.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
        m.extend_from_slice(&self.question);
        if answer {
            m.extend_from_slice(&[0xC0, 12]);
            m.extend_from_slice(&self.qtype.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0, 60, 0, rdata.len() as u8]);
            m.extend_from_slice(&rdata);
        }
        m
    }
}

fn both() -> Vec<IpAddr> {
    vec![IpAddr::V4(V4), IpAddr::V6(V6)]
}

/// Looks `name` up through `nameservers` within `timeout`; also returns how long it took.
async fn lookup(
    nameservers: &[SocketAddr],
    name: &str,
    timeout: Duration,
) -> (Result<Vec<IpAddr>, ProviderError>, Duration) {
    let resolver = Resolver::with_nameserver_addrs(nameservers).expect("resolver");
    let started = Instant::now();
    let result = resolver.lookup_ip(name, timeout).await;
    (result, started.elapsed())
}

const FIVE_S: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_and_aaaa_come_from_the_listed_nameserver() {
    let server = nameserver(Script::Answer).await;
    let (addrs, took) = lookup(&[server.addr], "homebox.tailnet.example", FIVE_S).await;
    assert_eq!(addrs.expect("answered"), both());
    assert!(took < Duration::from_secs(2), "{took:?}");
    let queries = server.udp.load(Ordering::SeqCst);
    assert_eq!(queries, 2, "one A and one AAAA query");
    assert_eq!(server.tcp.load(Ordering::SeqCst), 0);
    let resolver = Resolver::with_nameserver_addrs(&[server.addr]).expect("resolver");
    let sockets = resolver
        .resolve_sockets("homebox.tailnet.example:22", FIVE_S)
        .await
        .expect("sockets");
    let want = [(IpAddr::V4(V4), 22).into(), (IpAddr::V6(V6), 22).into()];
    assert_eq!(sockets, want);
}

#[tokio::test]
async fn forged_replies_are_ignored_and_the_real_one_taken() {
    let server = nameserver(Script::ForgedFirst).await;
    let (addrs, _) = lookup(&[server.addr], "homebox.example", FIVE_S).await;
    let addrs = addrs.expect("answered");
    assert_eq!(
        addrs,
        both(),
        "a reply with another id or question was taken"
    );
}

#[tokio::test]
async fn a_truncated_reply_is_asked_again_over_tcp() {
    let server = nameserver(Script::Truncate).await;
    let (addrs, _) = lookup(&[server.addr], "big.example", FIVE_S).await;
    assert_eq!(addrs.expect("answered over TCP"), both());
    assert_eq!(server.tcp.load(Ordering::SeqCst), 2, "A and AAAA over TCP");
}

#[tokio::test]
async fn nxdomain_is_a_clear_error_and_no_other_nameserver_is_asked() {
    let nx = nameserver(Script::NxDomain).await;
    let next = nameserver(Script::Answer).await;
    let (result, _) = lookup(&[nx.addr, next.addr], "nothing.example", FIVE_S).await;
    let text = result.expect_err("NXDOMAIN").to_string();
    assert!(text.contains("nothing.example"), "{text}");
    assert!(text.contains("no such name"), "{text}");
    assert!(text.contains(&nx.addr.to_string()), "{text}");
    assert_eq!(next.udp.load(Ordering::SeqCst), 0, "asked past an NXDOMAIN");
}

#[tokio::test]
async fn a_dead_or_failing_nameserver_gives_way_to_the_next() {
    let failing = nameserver(Script::ServFail).await;
    let good = nameserver(Script::Answer).await;
    let (addrs, took) = lookup(&[failing.addr, good.addr], "homebox.example", FIVE_S).await;
    assert_eq!(addrs.expect("the second answers"), both());
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A dead one costs at most the per-query timeout (2 s), then the next answers.
    let dead = dead_nameserver();
    let (addrs, took) = lookup(&[dead, good.addr], "homebox.example", FIVE_S).await;
    assert_eq!(addrs.expect("the second answers"), both());
    assert!(took < Duration::from_secs(4), "{took:?}");

    // When all fail, the error names each nameserver and what it did, within the timeout.
    let budget = Duration::from_millis(800);
    let (result, took) = lookup(&[failing.addr, dead], "homebox.example", budget).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    let text = result.expect_err("nobody answers").to_string();
    assert!(text.contains("SERVFAIL"), "{text}");
    assert!(
        text.contains(&format!("{dead}: no answer within")),
        "{text}"
    );
}
