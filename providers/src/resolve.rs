//! Name resolution that honours the daemon's `dns.nameservers`.
//!
//! Tunnel endpoints are often names (`vps.example.com:22`, a tailnet host such as `homebox`, an
//! ngrok URL), and some of them only resolve through a particular nameserver (Tailscale's
//! `100.100.100.100`). A [`Resolver`] resolves either the system's way or through an explicit
//! nameserver list, so every provider resolves names the same way:
//! - without nameservers, the C library's resolver (`getaddrinfo`: `/etc/hosts`, the search list
//!   and `ndots` of `/etc/resolv.conf`, nsswitch, systemd-resolved);
//! - with nameservers, `/etc/hosts` first, then the small stub resolver in `dns.rs`, which asks
//!   the listed servers in order for A and AAAA records (names are asked as given: no search
//!   list).
//!
//! IP literals never cause a query, `localhost` (and `*.localhost`, RFC 6761 §6.3) is the
//! loopback without any query, every lookup is bounded by the caller's timeout, and addresses
//! come IPv4 first (relays and local listeners are far more often reachable over IPv4, and
//! `dial` falls back to the rest anyway).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::dns;
use crate::util::{connect_any, ConnectFailure};
use crate::{Dial, ProviderError};

/// The hosts file consulted before the listed nameservers (getaddrinfo reads it in system mode).
const HOSTS_FILE: &str = "/etc/hosts";

/// A shared, cheaply clonable name resolver.
#[derive(Clone)]
pub struct Resolver {
    /// The nameservers to ask; empty for the system's resolver.
    nameservers: Arc<[SocketAddr]>,
    /// What the resolver asks, for `Debug` and error messages.
    source: Arc<str>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("nameservers", &self.source)
            .finish()
    }
}

impl Resolver {
    /// Builds a resolver. An empty `nameservers` list means the system's resolver (the C
    /// library's `getaddrinfo`: `/etc/hosts`, `/etc/resolv.conf`, nsswitch). Otherwise
    /// `/etc/hosts` is read first and then each address is asked on port 53 (UDP, and TCP when a
    /// reply is truncated).
    pub fn new(nameservers: &[IpAddr]) -> Result<Resolver, ProviderError> {
        let addrs: Vec<SocketAddr> = nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect();
        Self::with_nameserver_addrs(&addrs)
    }

    /// Like [`Resolver::new`], but with an explicit port per nameserver (a local stub resolver
    /// on a non-standard port, or a test pointing at an unused port).
    pub fn with_nameserver_addrs(nameservers: &[SocketAddr]) -> Result<Resolver, ProviderError> {
        let source = if nameservers.is_empty() {
            "system".to_string()
        } else {
            nameservers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        Ok(Resolver {
            nameservers: nameservers.into(),
            source: source.into(),
        })
    }

    /// Looks up the addresses of `name` within `timeout`, IPv4 first. IP literals (also `[v6]`)
    /// are returned as they are, without any query.
    pub async fn lookup_ip(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Vec<IpAddr>, ProviderError> {
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        if is_localhost(bare) {
            return Ok(vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]);
        }
        let failed = |detail: String| ProviderError::Resolve {
            name: name.to_string(),
            detail: format!("{detail} (nameservers: {})", self.source),
        };
        let addrs = if self.nameservers.is_empty() {
            lookup_system(bare, timeout).await.map_err(failed)?
        } else {
            let deadline = Instant::now() + timeout;
            match hosts_file_lookup(bare).await {
                Some(addrs) => addrs,
                None => dns::lookup(bare, &self.nameservers, deadline)
                    .await
                    .map_err(|err| failed(err.to_string()))?,
            }
        };
        if addrs.is_empty() {
            return Err(failed("no addresses".to_string()));
        }
        Ok(addrs)
    }

    /// Resolves `host:port`, `[v6]:port` or `1.2.3.4:5` to one socket address within `timeout`
    /// (the first of [`Resolver::resolve_sockets`]).
    pub async fn resolve_socket(
        &self,
        host_port: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, ProviderError> {
        let addrs = self.resolve_sockets(host_port, timeout).await?;
        addrs
            .first()
            .copied()
            .ok_or_else(|| ProviderError::Resolve {
                name: host_port.to_string(),
                detail: "no addresses".to_string(),
            })
    }

    /// Resolves `host:port`, `[v6]:port` or `1.2.3.4:5` to every socket address of the host,
    /// IPv4 first, within `timeout`. A URL scheme is stripped (`tcp://host:port`, since tunnel
    /// tools print URLs), along with any path; `http://` and `https://` URLs without a port get
    /// 80 and 443.
    pub async fn resolve_sockets(
        &self,
        host_port: &str,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, ProviderError> {
        let (host, port) = split_host_port(host_port)?;
        let ips = self.lookup_ip(host, timeout).await?;
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    /// Resolves `host_port` and connects over TCP to the first of its addresses that accepts,
    /// all within `timeout` (a name may have an address that does not listen, e.g. `localhost`
    /// has `::1` while a service binds `127.0.0.1` only).
    pub async fn dial(&self, host_port: &str, timeout: Duration) -> Result<Dial, ProviderError> {
        let deadline = Instant::now() + timeout;
        let addrs = self.resolve_sockets(host_port, timeout).await?;
        match connect_any(&addrs, deadline).await {
            Ok(stream) => Ok(Dial::Tcp(stream)),
            Err(ConnectFailure::Failed(addr, source)) => Err(ProviderError::Dial {
                target: addr.to_string(),
                source,
            }),
            Err(ConnectFailure::NoAnswer(addr, after)) => Err(ProviderError::Timeout {
                what: format!("connect to {addr}"),
                after,
            }),
            Err(ConnectFailure::NotTried) => Err(ProviderError::Timeout {
                what: format!("connect to {host_port}"),
                after: timeout,
            }),
        }
    }
}

/// `localhost` and names under it, which RFC 6761 §6.3 reserves for the loopback.
fn is_localhost(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// The system's way: the C library's `getaddrinfo`, run by tokio on its blocking pool. When
/// `timeout` fires first, the call cannot be cancelled: it finishes in the background (bounded by
/// the C library's own resolv.conf timeout and attempts) and its result is dropped.
async fn lookup_system(name: &str, timeout: Duration) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, 0))).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(err)) => Err(err.to_string()),
        // getaddrinfo lists each address once per socket type: `ipv4_first` removes repeats.
        Ok(Ok(addrs)) => Ok(dns::ipv4_first(addrs.map(|addr| addr.ip()))),
    }
}

/// The addresses `/etc/hosts` gives `name`, if it names it (`None` when the file is missing).
async fn hosts_file_lookup(name: &str) -> Option<Vec<IpAddr>> {
    let hosts = tokio::fs::read_to_string(HOSTS_FILE).await.ok()?;
    hosts_lookup(&hosts, name)
}

/// The addresses a hosts file (`hosts(5)`: an address, then names; `#` comments) gives `name`,
/// IPv4 first; `None` if no line names it. Names compare without case and trailing dot.
fn hosts_lookup(hosts: &str, name: &str) -> Option<Vec<IpAddr>> {
    let wanted = name.strip_suffix('.').unwrap_or(name);
    let mut addrs = Vec::new();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|n| {
            n.strip_suffix('.')
                .unwrap_or(n)
                .eq_ignore_ascii_case(wanted)
        }) {
            addrs.push(ip);
        }
    }
    (!addrs.is_empty()).then(|| dns::ipv4_first(addrs))
}

/// Splits an endpoint as printed by a tunnel tool into host and port.
fn split_host_port(endpoint: &str) -> Result<(&str, u16), ProviderError> {
    let invalid = |why: &str| {
        ProviderError::Config(format!("endpoint `{endpoint}` is not host:port ({why})"))
    };
    let trimmed = endpoint.trim();
    let (default_port, rest) = match trimmed.split_once("://") {
        Some((scheme, rest)) => {
            let port = match scheme.to_ascii_lowercase().as_str() {
                "http" | "ws" => Some(80),
                "https" | "wss" => Some(443),
                _ => None,
            };
            (port, rest)
        }
        None => (None, trimmed),
    };
    // Drop a path, query or fragment: only the authority names the socket.
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    // Userinfo (`user@host`) has no place in a socket address either.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);

    let (host, port) = if let Some(after_bracket) = authority.strip_prefix('[') {
        let (v6, tail) = after_bracket
            .split_once(']')
            .ok_or_else(|| invalid("unclosed `[`"))?;
        match tail.strip_prefix(':') {
            Some(port) => (v6, Some(port)),
            None if tail.is_empty() => (v6, None),
            None => return Err(invalid("junk after `]`")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(invalid("IPv6 addresses need brackets: [addr]:port"))
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    let port = match (port, default_port) {
        (Some(port), _) => port
            .parse::<u16>()
            .map_err(|_| invalid("port is not a number from 0 to 65535"))?,
        (None, Some(port)) => port,
        (None, None) => return Err(invalid("missing port")),
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::{hosts_lookup, is_localhost, split_host_port};

    #[test]
    fn reads_a_hosts_file() {
        let hosts = "127.0.0.1 localhost\n# 10.9.9.9 router\n::1 ip6-localhost router.lan\n\
                     10.0.0.1\trouter.lan router # the box\nnot-an-ip router\n";
        let ips = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>();
        assert_eq!(
            hosts_lookup(hosts, "Router.LAN."),
            Some(ips(&["10.0.0.1", "::1"]))
        );
        assert_eq!(hosts_lookup(hosts, "router"), Some(ips(&["10.0.0.1"])));
        assert_eq!(hosts_lookup(hosts, "box"), None);
        assert_eq!(hosts_lookup(hosts, "elsewhere"), None);
    }

    #[test]
    fn knows_the_localhost_names() {
        for name in ["localhost", "LOCALHOST.", "a.localhost"] {
            assert!(is_localhost(name), "{name}");
        }
        for name in ["localhost.example", "notlocalhost", "mylocalhost"] {
            assert!(!is_localhost(name), "{name}");
        }
    }

    #[test]
    fn splits_the_forms_tunnel_tools_print() {
        fn ok(s: &str) -> Option<(&str, u16)> {
            split_host_port(s).ok()
        }
        assert_eq!(ok("1.2.3.4:5"), Some(("1.2.3.4", 5)));
        assert_eq!(ok("[::1]:22"), Some(("::1", 22)));
        assert_eq!(
            ok("tcp://0.tcp.ngrok.io:12345"),
            Some(("0.tcp.ngrok.io", 12345))
        );
        assert_eq!(
            ok("https://x.trycloudflare.com"),
            Some(("x.trycloudflare.com", 443))
        );
        assert_eq!(ok("http://h:8080/path?q"), Some(("h", 8080)));
        assert_eq!(ok("bore.pub:4242"), Some(("bore.pub", 4242)));
        assert_eq!(ok("host"), None);
        assert_eq!(ok("::1:22"), None);
        assert_eq!(ok("host:99999"), None);
        assert_eq!(ok(":22"), None);
    }
}
