//! Name resolution that honours the daemon's `dns.nameservers`.
//!
//! Tunnel endpoints are often names (`vps.example.com:22`, a tailnet host such as `homebox`, an
//! ngrok URL), and some of them only resolve through a particular nameserver (Tailscale's
//! `100.100.100.100`). A [`Resolver`] wraps one hickory resolver configured either from the
//! system (`/etc/resolv.conf` and `/etc/hosts`) or from an explicit nameserver list, so every
//! provider resolves names the same way. IP literals never cause a query, `localhost` works
//! offline, and every lookup is bounded by the caller's timeout.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use tokio::time::Instant;

use crate::util::{connect_any, ConnectFailure};
use crate::{Dial, ProviderError};

/// How long one query to one nameserver may take before the next attempt. Short, so that a dead
/// first nameserver leaves time for the next one within a probe's one-second budget.
const PER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A shared, cheaply clonable name resolver.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
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
    /// Builds a resolver. An empty `nameservers` list means the system configuration
    /// (`/etc/resolv.conf`, and the hosts file); if that cannot be read, the resolver still
    /// answers from `/etc/hosts` and for IP literals, and reports every other name as
    /// unresolvable. Otherwise each address is asked on port 53 (UDP, then TCP).
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
        let provider = TokioRuntimeProvider::default();
        let (mut builder, source) = if nameservers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => (builder, "system".to_string()),
                Err(err) => {
                    // A box without resolv.conf (a minimal container) still has /etc/hosts and
                    // literals; failing the whole daemon for that would help nobody.
                    tracing::warn!(error = %err, "cannot read the system DNS configuration; only /etc/hosts and IP literals will resolve");
                    (
                        TokioResolver::builder_with_config(ResolverConfig::default(), provider),
                        "none (system configuration unreadable)".to_string(),
                    )
                }
            }
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            let listed = nameservers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            (
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    provider,
                ),
                listed,
            )
        };
        let options = builder.options_mut();
        options.timeout = options.timeout.min(PER_QUERY_TIMEOUT);
        // Both families, IPv4 listed first: relays and local listeners are far more often
        // reachable over IPv4, and `dial` falls back to the rest anyway.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let inner = builder.build().map_err(|err| {
            ProviderError::Config(format!("cannot build the DNS resolver ({source}): {err}"))
        })?;
        Ok(Resolver {
            inner: Arc::new(inner),
            source: source.into(),
        })
    }

    /// Looks up the addresses of `name` within `timeout`. IP literals (also `[v6]`) are returned
    /// as they are, without any query.
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
        let failed = |detail: String| ProviderError::Resolve {
            name: name.to_string(),
            detail,
        };
        let lookup = tokio::time::timeout(timeout, self.inner.lookup_ip(bare))
            .await
            .map_err(|_| {
                failed(format!(
                    "no answer within {timeout:?} (nameservers: {})",
                    self.source
                ))
            })?
            .map_err(|err| failed(format!("{err} (nameservers: {})", self.source)))?;
        let addrs: Vec<IpAddr> = lookup.iter().collect();
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
    use super::split_host_port;

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
