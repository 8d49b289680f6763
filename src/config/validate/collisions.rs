//! The one rule about addresses that clash: a listener (a service's `listen`, the metrics
//! listener) must not be a tunnel's endpoint or another listener.
//!
//! A failover listener on a tunnel's own endpoint dials itself (or, for a `command` tunnel
//! such as socat, makes the program fail with "Address already in use" forever); two
//! listeners on one address cannot both bind. `check` reports these through validation, and
//! `check --deep` calls [`collisions`] on the resolved configuration, so the rule lives here
//! only.

use std::net::{IpAddr, SocketAddr};

use tunnelkeeper_providers::command::EndpointSource;

use crate::config::spec::{Config, ListenAddress, ProviderSpec};

/// One clash: the listener that is in the way, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    /// Index in `services` of the service whose `listen` clashes; `None` for the metrics
    /// listener (`daemon.metrics_listen`).
    pub service: Option<usize>,
    /// What it clashes with, in words (names the other side and its address).
    pub message: String,
}

/// A TCP address as written in a config: an IP literal or a host name, and a port.
fn host_port(text: &str) -> Option<(String, u16)> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = text.rsplit_once(':')?;
    Some((host.to_ascii_lowercase(), port.parse().ok()?))
}

/// Whether a listener bound to `listen` takes the address `host:port` written elsewhere: the
/// same port, and the same IP, or a wildcard listener, or `localhost` for a loopback one.
fn takes(listen: SocketAddr, host: &str, port: u16) -> bool {
    // Port 0 asks the kernel for a free port: it never takes anyone's.
    if listen.port() != port || port == 0 {
        return false;
    }
    if listen.ip().is_unspecified() {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == listen.ip() || ip.is_unspecified(),
        Err(_) => host == "localhost" && listen.ip().is_loopback(),
    }
}

/// Every clash in `config`, in file order (services first, then the metrics listener).
pub fn collisions(config: &Config) -> Vec<Collision> {
    // Listeners: (owner, address, how to name it).
    let mut listeners: Vec<(Option<usize>, ListenAddress, String)> = config
        .services
        .iter()
        .enumerate()
        .filter_map(|(i, service)| {
            let listen = service.listen.as_ref()?;
            Some((
                Some(i),
                listen.address.clone(),
                format!("the listener of service `{}`", service.name),
            ))
        })
        .collect();
    if let Some(metrics) = config.daemon.metrics_listen {
        listeners.push((
            None,
            ListenAddress::Tcp(metrics),
            "the metrics listener (daemon.metrics_listen)".to_owned(),
        ));
    }

    let mut found = Vec::new();
    for (index, (owner, address, _)) in listeners.iter().enumerate() {
        // Another listener on the same address, reported at the later one.
        for (_, other, other_name) in &listeners[..index] {
            let clash = match (address, other) {
                (ListenAddress::Tcp(a), ListenAddress::Tcp(b)) => {
                    takes(*a, &b.ip().to_string(), b.port())
                        || takes(*b, &a.ip().to_string(), a.port())
                }
                (ListenAddress::Unix(a), ListenAddress::Unix(b)) => a == b,
                _ => false,
            };
            if clash {
                found.push(Collision {
                    service: *owner,
                    message: format!("{address} is also the address of {other_name}"),
                });
            }
        }
        let ListenAddress::Tcp(listen) = address else {
            continue;
        };
        for service in &config.services {
            for tunnel in &service.tunnels {
                let endpoint = match &tunnel.provider {
                    ProviderSpec::Direct(direct) => Some(direct.address.as_str()),
                    ProviderSpec::Command(command) => match &command.endpoint {
                        EndpointSource::Fixed(endpoint) => Some(endpoint.as_str()),
                        EndpointSource::Regex(_) => None,
                    },
                    _ => None,
                };
                let Some((host, port)) = endpoint.and_then(host_port) else {
                    continue;
                };
                if takes(*listen, &host, port) {
                    found.push(Collision {
                        service: *owner,
                        message: format!(
                            "{listen} is also the endpoint of tunnel `{}` of service `{}` \
                             ({}): the listener would take the tunnel's own address",
                            tunnel.name,
                            service.name,
                            endpoint.unwrap_or_default()
                        ),
                    });
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a socket address")
    }

    #[test]
    fn a_listener_takes_the_same_port_on_its_address_or_any() {
        assert!(takes(addr("127.0.0.1:2222"), "127.0.0.1", 2222));
        assert!(takes(addr("127.0.0.1:2222"), "localhost", 2222));
        assert!(takes(addr("0.0.0.0:2222"), "192.0.2.1", 2222));
        assert!(takes(addr("127.0.0.1:2222"), "0.0.0.0", 2222));
        assert!(!takes(addr("127.0.0.1:2222"), "127.0.0.1", 2223));
        assert!(!takes(addr("127.0.0.1:2222"), "127.0.0.2", 2222));
        assert!(!takes(addr("127.0.0.1:2222"), "relay.example.com", 2222));
        assert!(takes(addr("[::1]:22"), "::1", 22));
        // Port 0 is "any free port": two listeners on it get two different ports.
        assert!(!takes(addr("127.0.0.1:0"), "127.0.0.1", 0));
    }
}
