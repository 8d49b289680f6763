//! A minimal DNS stub resolver: A and AAAA lookups through an explicit list of nameservers.
//!
//! Used when the operator lists `dns.nameservers` (e.g. Tailscale's `100.100.100.100`); without
//! that list the daemon uses the C library's resolver (see `resolve.rs`). It exists because a
//! general resolver library (hickory, with its protocol crate, caches, URL and IDNA tables) cost
//! about half a megabyte of the shipped binary, while the daemon only ever asks "which A and
//! AAAA addresses does this host name have". It follows RFC 1035 §4.1 (message format: header,
//! question, resource records) and §4.1.4 (name compression), RFC 3596 (the AAAA record), and
//! RFC 7766 (DNS over TCP with a two-byte length prefix, used when a UDP reply is truncated).
//! There is no cache, no EDNS(0), no search list and no DNSSEC: names are asked as given.
//!
//! Every byte of a reply is read with bounds checks; compression pointers must point backwards
//! and are followed at most [`MAX_POINTER_JUMPS`] times, so no input can make it panic or loop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

/// How long one query to one nameserver may take before the next nameserver is asked. Short, so
/// that a dead first nameserver leaves time for the next one.
pub(crate) const PER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many compression pointers are followed in one name (RFC 1035 §4.1.4 sets no
/// limit; a real name has a handful, and a name has at most 127 labels anyway).
pub(crate) const MAX_POINTER_JUMPS: usize = 64;

/// Record type A (RFC 1035 §3.2.2).
pub(crate) const TYPE_A: u16 = 1;
/// Record type AAAA (RFC 3596 §2.1).
pub(crate) const TYPE_AAAA: u16 = 28;
/// Class IN (RFC 1035 §3.2.4).
const CLASS_IN: u16 = 1;
/// Enough for any UDP reply without EDNS(0) (512 bytes, RFC 1035 §4.2.1) and for servers that
/// send more anyway.
const UDP_BUFFER: usize = 4096;

/// Why a lookup through the listed nameservers found no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DnsError {
    /// The name cannot be put in a query (empty label, label over 63 bytes, not ASCII, ...).
    InvalidName(String),
    /// A nameserver answered NXDOMAIN: the name does not exist (asking another would not help).
    NoSuchName(SocketAddr),
    /// A nameserver knows the name but it has neither an A nor an AAAA record.
    NoAddresses(SocketAddr),
    /// No nameserver gave a usable answer; one line per nameserver asked.
    Failed(Vec<String>),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::InvalidName(why) => write!(f, "not a valid DNS name: {why}"),
            DnsError::NoSuchName(server) => write!(f, "no such name (NXDOMAIN from {server})"),
            DnsError::NoAddresses(server) => {
                write!(f, "{server} knows the name but it has no A or AAAA record")
            }
            DnsError::Failed(why) => write!(f, "no nameserver answered: {}", why.join("; ")),
        }
    }
}

/// Looks up the A and AAAA addresses of `name` through `nameservers`, in order, finishing by
/// `deadline`. IPv4 addresses come first, duplicates removed.
pub(crate) async fn lookup(
    name: &str,
    nameservers: &[SocketAddr],
    deadline: Instant,
) -> Result<Vec<IpAddr>, DnsError> {
    let qname = encode_name(name).map_err(DnsError::InvalidName)?;
    let mut failures = Vec::new();
    for &server in nameservers {
        if Instant::now() >= deadline {
            failures.push(format!("{server}: not asked (out of time)"));
            continue;
        }
        // Both questions at once: a lookup costs one round trip, not two.
        let (v4, v6) = tokio::join!(
            query(server, &qname, TYPE_A, deadline),
            query(server, &qname, TYPE_AAAA, deadline)
        );
        if matches!(&v4, Ok(r) if r.rcode == Rcode::NxDomain)
            || matches!(&v6, Ok(r) if r.rcode == Rcode::NxDomain)
        {
            return Err(DnsError::NoSuchName(server));
        }
        let mut addrs = Vec::new();
        for reply in [&v4, &v6].into_iter().flatten() {
            if reply.rcode == Rcode::NoError {
                addrs.extend_from_slice(&reply.addrs);
            }
        }
        if !addrs.is_empty() {
            return Ok(ipv4_first(addrs));
        }
        let answered = |r: &Result<Reply, String>| matches!(r, Ok(r) if r.rcode == Rcode::NoError);
        if answered(&v4) && answered(&v6) {
            return Err(DnsError::NoAddresses(server));
        }
        let describe = |r: &Result<Reply, String>| match r {
            Ok(reply) => reply.rcode.to_string(),
            Err(why) => why.clone(),
        };
        let (v4, v6) = (describe(&v4), describe(&v6));
        failures.push(if v4 == v6 {
            format!("{server}: {v4}")
        } else {
            format!("{server}: A {v4}, AAAA {v6}")
        });
    }
    Err(DnsError::Failed(failures))
}

/// `addrs` with IPv4 first, each address once, otherwise in the order given.
pub(crate) fn ipv4_first(addrs: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for addr in addrs {
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    // A stable sort keeps each family's order.
    out.sort_by_key(|addr| addr.is_ipv6());
    out
}

/// One question asked of one nameserver: over UDP, and again over TCP if the reply is truncated.
/// `Err` says why the nameserver gave no usable reply (the next one is worth asking).
async fn query(
    server: SocketAddr,
    qname: &[u8],
    qtype: u16,
    deadline: Instant,
) -> Result<Reply, String> {
    let udp_deadline = deadline.min(Instant::now() + PER_QUERY_TIMEOUT);
    let budget = whole_ms(udp_deadline.saturating_duration_since(Instant::now()));
    match timeout_at(udp_deadline, query_udp(server, qname, qtype)).await {
        Err(_) => Err(format!("no answer within {budget:?}")),
        Ok(Err(err)) => Err(err),
        Ok(Ok(Response::Reply(reply))) => Ok(reply),
        Ok(Ok(Response::Truncated)) => {
            let tcp_deadline = deadline.min(Instant::now() + PER_QUERY_TIMEOUT);
            let budget = whole_ms(tcp_deadline.saturating_duration_since(Instant::now()));
            match timeout_at(tcp_deadline, query_tcp(server, qname, qtype)).await {
                Err(_) => Err(format!(
                    "truncated over UDP, no answer over TCP within {budget:?}"
                )),
                Ok(result) => result,
            }
        }
    }
}

/// `d` rounded down to whole milliseconds, for messages (`2s`, not `1.999999873s`).
fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends one query from an unconnected socket and waits (unbounded: the caller bounds it) for the
/// reply that matches: from the address asked, with the query's id and question. Anything else
/// (a late reply to an earlier query, a spoofing attempt, garbage) is ignored.
async fn query_udp(server: SocketAddr, qname: &[u8], qtype: u16) -> Result<Response, String> {
    let id: u16 = rand::random();
    let message = encode_query(id, qname, qtype);
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    socket
        .send_to(&message, server)
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let (len, from) = socket
            .recv_from(&mut buf)
            .await
            .map_err(|e| format!("cannot receive: {e}"))?;
        // Address and port only: an IPv6 reply may carry a scope id or flow label we did not set.
        if from.ip() != server.ip() || from.port() != server.port() {
            continue;
        }
        let Some(reply) = buf.get(..len) else {
            continue;
        };
        if let Ok(response) = parse_response(reply, id, qname, qtype) {
            return Ok(response);
        }
    }
}

/// Asks one question over TCP (RFC 7766: each message prefixed with its two-byte length).
async fn query_tcp(server: SocketAddr, qname: &[u8], qtype: u16) -> Result<Reply, String> {
    let id: u16 = rand::random();
    let message = encode_query(id, qname, qtype);
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| format!("truncated over UDP, cannot connect over TCP: {e}"))?;
    let len = u16::try_from(message.len()).map_err(|_| "query too long".to_string())?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&message);
    let io = |e: std::io::Error| format!("truncated over UDP, TCP exchange failed: {e}");
    stream.write_all(&framed).await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).await.map_err(io)?;
    match parse_response(&reply, id, qname, qtype) {
        Ok(Response::Reply(reply)) => Ok(reply),
        Ok(Response::Truncated) => Err("truncated even over TCP".to_string()),
        Err(err) => Err(format!("unusable reply over TCP: {err}")),
    }
}

/// The response code of a reply (RFC 1035 §4.1.1, RCODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rcode {
    /// 0: the answer section holds the answer (possibly none).
    NoError,
    /// 2: the server could not get an answer.
    ServFail,
    /// 3: the name does not exist.
    NxDomain,
    /// 5: the server will not answer this client.
    Refused,
    /// Any other code (FORMERR, NOTIMP, ...).
    Other(u8),
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rcode::NoError => f.write_str("answered without an address"),
            Rcode::ServFail => f.write_str("SERVFAIL"),
            Rcode::NxDomain => f.write_str("NXDOMAIN"),
            Rcode::Refused => f.write_str("REFUSED"),
            Rcode::Other(code) => write!(f, "response code {code}"),
        }
    }
}

/// A reply to our question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// Its response code.
    pub(crate) rcode: Rcode,
    /// Every A and AAAA record of class IN in the answer section, in order. A CNAME chain needs
    /// no following: the server puts the records of the chain's target in the same section.
    pub(crate) addrs: Vec<IpAddr>,
}

/// What a reply that matches our query says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Response {
    /// A complete reply.
    Reply(Reply),
    /// The TC bit: the reply did not fit a UDP datagram; ask again over TCP.
    Truncated,
}

/// Why a datagram is not a usable reply to our query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// The message ends inside a field.
    Short,
    /// Not a response, or to another query (id, opcode or question differ).
    NotOurs,
    /// A name with a reserved label type, a forward or looping pointer, or over 255 bytes.
    BadName,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::Short => "message ends inside a field",
            ParseError::NotOurs => "not a reply to the query",
            ParseError::BadName => "malformed name",
        })
    }
}

/// `name` (dotted, one trailing dot allowed) in wire format: length-prefixed labels ending with
/// the root's zero byte, lower-cased.
pub(crate) fn encode_name(name: &str) -> Result<Vec<u8>, String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err("empty name".to_string());
    }
    if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{name}` has a space, control or non-ASCII character"
        ));
    }
    let mut wire = Vec::with_capacity(trimmed.len() + 2);
    for label in trimmed.split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|len| (1..=63).contains(len))
            .ok_or_else(|| format!("`{name}` has an empty label or one over 63 bytes"))?;
        wire.push(len);
        wire.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    wire.push(0);
    if wire.len() > 255 {
        return Err(format!("`{name}` is over 255 bytes"));
    }
    Ok(wire)
}

/// A standard query (RFC 1035 §4.1.1): id, RD set, one question of `qtype`, class IN.
pub(crate) fn encode_query(id: u16, qname: &[u8], qtype: u16) -> Vec<u8> {
    let mut message = Vec::with_capacity(12 + qname.len() + 4);
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&[0x01, 0x00]); // QR=0, OPCODE=0 (query), RD=1; RA, Z, RCODE 0
    message.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1; AN, NS, AR 0
    message.extend_from_slice(qname);
    message.extend_from_slice(&qtype.to_be_bytes());
    message.extend_from_slice(&CLASS_IN.to_be_bytes());
    message
}

/// Reads `message` as the reply to query `id` for (`qname` in wire format, `qtype`, IN).
pub(crate) fn parse_response(
    message: &[u8],
    id: u16,
    qname: &[u8],
    qtype: u16,
) -> Result<Response, ParseError> {
    let mut r = Reader { message, pos: 0 };
    let reply_id = r.u16()?;
    let flags = r.u16()?;
    let qdcount = r.u16()?;
    let ancount = r.u16()?;
    r.u16()?; // NSCOUNT
    r.u16()?; // ARCOUNT
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0x0F;
    if reply_id != id || !is_response || opcode != 0 || qdcount != 1 {
        return Err(ParseError::NotOurs);
    }
    // The question must be echoed (RFC 5452 §9.1: accept a reply only when it is).
    let name = r.name()?;
    if !name.eq_ignore_ascii_case(qname) || r.u16()? != qtype || r.u16()? != CLASS_IN {
        return Err(ParseError::NotOurs);
    }
    if flags & 0x0200 != 0 {
        return Ok(Response::Truncated);
    }
    let rcode = match flags & 0x000F {
        0 => Rcode::NoError,
        2 => Rcode::ServFail,
        3 => Rcode::NxDomain,
        5 => Rcode::Refused,
        // Four bits: the cast cannot lose anything.
        other => Rcode::Other(other as u8),
    };
    let mut addrs = Vec::new();
    if rcode == Rcode::NoError {
        for _ in 0..ancount {
            r.name()?; // the owner: the question's name or a CNAME target
            let rtype = r.u16()?;
            let class = r.u16()?;
            r.bytes(4)?; // TTL
            let rdlength = usize::from(r.u16()?);
            let rdata = r.bytes(rdlength)?;
            if class != CLASS_IN {
                continue;
            }
            match (rtype, rdata.len()) {
                (TYPE_A, 4) => {
                    let mut octets = [0u8; 4];
                    octets.copy_from_slice(rdata);
                    addrs.push(IpAddr::from(octets));
                }
                (TYPE_AAAA, 16) => {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(rdata);
                    addrs.push(IpAddr::from(octets));
                }
                _ => {} // CNAME and anything else: only the addresses matter
            }
        }
    }
    Ok(Response::Reply(Reply { rcode, addrs }))
}

/// A bounds-checked cursor over a message.
struct Reader<'a> {
    message: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: usize) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(len).ok_or(ParseError::Short)?;
        let bytes = self.message.get(self.pos..end).ok_or(ParseError::Short)?;
        self.pos = end;
        Ok(bytes)
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        let bytes = self.bytes(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// Reads a possibly compressed name at the cursor (RFC 1035 §4.1.4) and returns it in wire
    /// format without pointers; the cursor moves past the name's bytes at this position.
    fn name(&mut self) -> Result<Vec<u8>, ParseError> {
        let mut name = Vec::new();
        let mut pos = self.pos;
        let mut resume = None;
        let mut jumps = 0;
        loop {
            let len = *self.message.get(pos).ok_or(ParseError::Short)?;
            match len & 0xC0 {
                0x00 if len == 0 => {
                    name.push(0);
                    if name.len() > 255 {
                        return Err(ParseError::BadName);
                    }
                    self.pos = resume.unwrap_or(pos + 1);
                    return Ok(name);
                }
                0x00 => {
                    let start = pos + 1;
                    let label = self
                        .message
                        .get(start..start + usize::from(len))
                        .ok_or(ParseError::Short)?;
                    name.push(len);
                    name.extend_from_slice(label);
                    if name.len() > 255 {
                        return Err(ParseError::BadName);
                    }
                    pos = start + usize::from(len);
                }
                0xC0 => {
                    let low = *self.message.get(pos + 1).ok_or(ParseError::Short)?;
                    let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                    // Backwards only: a pointer to itself or ahead could loop.
                    jumps += 1;
                    if target >= pos || jumps > MAX_POINTER_JUMPS {
                        return Err(ParseError::BadName);
                    }
                    resume.get_or_insert(pos + 2);
                    pos = target;
                }
                _ => return Err(ParseError::BadName), // 0x40, 0x80: reserved label types
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `www.example.com` with a CNAME to `web.example.net`, which has two A records; every name
    /// after the question is compressed.
    fn cname_reply(id: u16) -> Vec<u8> {
        let qname = encode_name("www.example.com").unwrap();
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 3, 0, 0, 0, 0]);
        m.extend_from_slice(&qname); // at offset 12
        m.extend_from_slice(&[0, 1, 0, 1]);
        // www.example.com CNAME web.example.net: owner is a pointer to 12.
        m.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60]);
        let target_at = m.len() + 2;
        let rdata = [
            3, b'w', b'e', b'b', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3,
        ];
        let rdata_len = rdata.len() + 3 + 1;
        m.extend_from_slice(&(rdata_len as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
        m.extend_from_slice(b"net");
        m.push(0);
        // web.example.net A 192.0.2.1 and A 192.0.2.2: owner is a pointer to the CNAME target.
        for last in [1u8, 2] {
            m.extend_from_slice(&[0xC0, target_at as u8, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            m.extend_from_slice(&[192, 0, 2, last]);
        }
        m
    }

    fn reply_with(id: u16, name: &str, qtype: u16, flags: [u8; 2], records: &[&[u8]]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&flags);
        m.extend_from_slice(&[0, 1, 0, records.len() as u8, 0, 0, 0, 0]);
        m.extend_from_slice(&encode_name(name).unwrap());
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        for rdata in records {
            m.extend_from_slice(&[0xC0, 12]);
            m.extend_from_slice(&qtype.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    /// What `parse_response` returns for a NOERROR reply with `addrs`.
    fn answer(addrs: &[&str]) -> Result<Response, ParseError> {
        Ok(Response::Reply(Reply {
            rcode: Rcode::NoError,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }))
    }

    #[test]
    fn encodes_a_query_as_rfc_1035_describes() {
        let qname = encode_name("Host.Example.").unwrap();
        assert_eq!(qname, b"\x04host\x07example\x00");
        let query = encode_query(0xBEEF, &qname, TYPE_AAAA);
        let mut expected = vec![0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b"\x04host\x07example\x00");
        expected.extend_from_slice(&[0, 28, 0, 1]);
        assert_eq!(query, expected);
    }

    #[test]
    fn refuses_names_that_do_not_fit_a_query() {
        for bad in ["", ".", "a..b", "héllo.example", "a b", &"x".repeat(64)] {
            assert!(encode_name(bad).is_err(), "{bad:?}");
        }
        let long = ["abcdefghi"; 26].join(".");
        assert!(encode_name(&long).is_err(), "over 255 bytes");
        assert!(encode_name(&"x".repeat(63)).is_ok());
        assert!(encode_name("_srv.x-y.example").is_ok());
    }

    #[test]
    fn parses_a_and_aaaa_answers() {
        let qname = encode_name("h.example").unwrap();
        let a = reply_with(7, "h.example", TYPE_A, [0x81, 0x80], &[&[10, 0, 0, 1]]);
        assert_eq!(parse_response(&a, 7, &qname, TYPE_A), answer(&["10.0.0.1"]));
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let aaaa = reply_with(8, "H.EXAMPLE", TYPE_AAAA, [0x81, 0x80], &[&v6.octets()]);
        assert_eq!(
            parse_response(&aaaa, 8, &qname, TYPE_AAAA),
            answer(&["2001:db8::5"])
        );
    }

    #[test]
    fn follows_compressed_names_through_a_cname_answer() {
        let qname = encode_name("www.example.com").unwrap();
        let reply = cname_reply(0x1234);
        assert_eq!(
            parse_response(&reply, 0x1234, &qname, TYPE_A),
            answer(&["192.0.2.1", "192.0.2.2"])
        );
        // The CNAME target, read through the pointer, is the expanded name.
        let mut r = Reader {
            message: &reply,
            pos: reply.len() - 16,
        };
        assert_eq!(r.name().unwrap(), b"\x03web\x07example\x03net\x00");
        assert_eq!(r.pos, reply.len() - 14);
    }

    #[test]
    fn rejects_replies_to_other_queries() {
        let qname = encode_name("h.example").unwrap();
        let ok = reply_with(7, "h.example", TYPE_A, [0x81, 0x80], &[&[10, 0, 0, 1]]);
        assert_eq!(
            parse_response(&ok, 8, &qname, TYPE_A),
            Err(ParseError::NotOurs)
        );
        assert_eq!(
            parse_response(&ok, 7, &qname, TYPE_AAAA),
            Err(ParseError::NotOurs)
        );
        let other = encode_name("i.example").unwrap();
        assert_eq!(
            parse_response(&ok, 7, &other, TYPE_A),
            Err(ParseError::NotOurs)
        );
        let query = encode_query(7, &qname, TYPE_A);
        assert_eq!(
            parse_response(&query, 7, &qname, TYPE_A),
            Err(ParseError::NotOurs)
        );
    }

    #[test]
    fn reads_truncation_and_response_codes() {
        let qname = encode_name("h.example").unwrap();
        let tc = reply_with(1, "h.example", TYPE_A, [0x83, 0x80], &[]);
        assert_eq!(
            parse_response(&tc, 1, &qname, TYPE_A),
            Ok(Response::Truncated)
        );
        for (code, rcode) in [
            (2, Rcode::ServFail),
            (3, Rcode::NxDomain),
            (5, Rcode::Refused),
            (4, Rcode::Other(4)),
        ] {
            let reply = reply_with(1, "h.example", TYPE_A, [0x81, 0x80 | code], &[]);
            assert_eq!(
                parse_response(&reply, 1, &qname, TYPE_A),
                Ok(Response::Reply(Reply {
                    rcode,
                    addrs: vec![]
                }))
            );
        }
    }

    #[test]
    fn refuses_looping_and_forward_pointers() {
        let qname = encode_name("h.example").unwrap();
        // A question name that is a pointer to itself, and one that points ahead.
        for pointer in [[0xC0, 12], [0xC0, 14]] {
            let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&pointer);
            m.extend_from_slice(&[1, b'h', 0, 0, 1, 0, 1]);
            assert_eq!(
                parse_response(&m, 1, &qname, TYPE_A),
                Err(ParseError::BadName)
            );
        }
        // Reserved label types 0x40 and 0x80.
        for first in [0x41, 0x81] {
            let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, first, b'h', 0];
            m.extend_from_slice(&[0, 1, 0, 1]);
            assert_eq!(
                parse_response(&m, 1, &qname, TYPE_A),
                Err(ParseError::BadName)
            );
        }
    }

    #[test]
    fn a_long_pointer_chain_is_cut_off() {
        // Labels `a` at 12.., each followed by a pointer to the previous one: a legal-looking
        // backwards chain longer than the guard allows.
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let mut previous = 12usize;
        for _ in 0..(MAX_POINTER_JUMPS + 2) {
            let here = m.len();
            m.extend_from_slice(&[0xC0 | (previous >> 8) as u8, previous as u8]);
            previous = here;
        }
        let mut r = Reader {
            message: &m,
            pos: previous,
        };
        assert_eq!(r.name(), Err(ParseError::BadName));
    }

    #[test]
    fn no_truncation_or_byte_flip_makes_the_parser_panic() {
        let qname = encode_name("www.example.com").unwrap();
        let valid = cname_reply(0x1234);
        for len in 0..valid.len() {
            // A cut message is never taken for the full answer.
            let parsed = parse_response(&valid[..len], 0x1234, &qname, TYPE_A);
            assert!(
                !matches!(&parsed, Ok(Response::Reply(r)) if r.addrs.len() == 2),
                "{len}: {parsed:?}"
            );
        }
        // Deterministic pseudo-random flips (xorshift), bounded in count.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut m = valid.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % m.len() as u64) as usize;
                m[at] = next() as u8;
            }
            let cut = (next() % (m.len() as u64 + 1)) as usize;
            let _ = parse_response(&m[..cut], 0x1234, &qname, TYPE_A);
            let _ = parse_response(&m, 0x1234, &qname, TYPE_A);
        }
    }

    #[test]
    fn ipv4_comes_first_and_duplicates_go() {
        let ips: Vec<IpAddr> = ["::1", "10.0.0.2", "::1", "10.0.0.1", "10.0.0.2", "::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let want: Vec<IpAddr> = ["10.0.0.2", "10.0.0.1", "::1", "::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ipv4_first(ips), want);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_parsed_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)
        ) {
            let qname = encode_name("www.example.com").unwrap();
            let _ = parse_response(&bytes, 0x1234, &qname, TYPE_A);
            let mut r = Reader { message: &bytes, pos: 0 };
            let _ = r.name();
        }
    }
}
