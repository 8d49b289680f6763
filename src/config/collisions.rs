//! Listen addresses that collide: a service's listener on the same address as a tunnel's
//! endpoint (the tunnel's own program, or the dialled service, would then fight the listener
//! for the port, as socat's "Address already in use" loop shows), as another listener, or as
//! `daemon.metrics_listen`. A pure function of the resolved configuration, for `check`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tunnelkeeper_providers::command::EndpointSource;

use super::spec::{Config, ListenAddress, ProviderSpec};

/// One collision: the key that is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    /// The listener's key, e.g. `services[0].listen`.
    pub key: String,
    /// What it collides with.
    pub message: String,
}

/// A `host:port` as a socket address when the host is an IP literal or `localhost`; other
/// names are not resolved (check must not depend on DNS).
fn literal(address: &str) -> Option<SocketAddr> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some(addr);
    }
    let (host, port) = address.rsplit_once(':')?;
    (host == "localhost").then_some(())?;
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        port.parse().ok()?,
    ))
}

/// Whether two TCP addresses take the same port on some interface (a wildcard address takes
/// it on every one).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Every collision of a listen address in `config`, in file order.
pub fn listen_collisions(config: &Config) -> Vec<Collision> {
    let mut found = Vec::new();
    let listeners: Vec<(usize, SocketAddr)> = config
        .services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.listen.as_ref().map(|l| &l.address) {
            Some(ListenAddress::Tcp(addr)) => Some((i, *addr)),
            _ => None,
        })
        .collect();
    for (i, listen) in &listeners {
        let key = format!("services[{i}].listen");
        for service in &config.services {
            for tunnel in &service.tunnels {
                let endpoint = match &tunnel.provider {
                    ProviderSpec::Direct(d) => Some(d.address.as_str()),
                    ProviderSpec::Command(c) => match &c.endpoint {
                        EndpointSource::Fixed(e) => Some(e.as_str()),
                        EndpointSource::Regex(_) => None,
                    },
                    _ => None,
                };
                // A wildcard listener takes the port on loopback too; another IP may be
                // another host, which check cannot tell.
                let same_port = |e: SocketAddr| {
                    e.port() == listen.port()
                        && (e.ip() == listen.ip()
                            || (listen.ip().is_unspecified() && e.ip().is_loopback()))
                };
                if let Some(endpoint) = endpoint.filter(|e| literal(e).is_some_and(same_port)) {
                    found.push(Collision {
                        key: key.clone(),
                        message: format!(
                            "{listen} is also the endpoint {endpoint} of tunnel `{}` of service \
                             `{}`: the listener and the tunnel would take the same port; move one",
                            tunnel.name, service.name
                        ),
                    });
                }
            }
        }
        for (j, other) in &listeners {
            if j < i && overlap(*listen, *other) {
                found.push(Collision {
                    key: key.clone(),
                    message: format!(
                        "{listen} is also the listener of service `{}`",
                        config.services[*j].name
                    ),
                });
            }
        }
        if let Some(metrics) = config
            .daemon
            .metrics_listen
            .filter(|m| overlap(*listen, *m))
        {
            found.push(Collision {
                key: key.clone(),
                message: format!("{listen} is also daemon.metrics_listen ({metrics})"),
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &str) -> Config {
        let text = format!(
            "version: 1\ndaemon: {{ control_socket: /tmp/tk.sock, state_dir: /tmp/tk, metrics_listen: \"127.0.0.1:9180\" }}\nservices:\n{services}"
        );
        crate::config::parse(&text, std::path::Path::new("tk.yaml")).expect("valid")
    }

    #[test]
    fn a_listener_on_a_tunnel_endpoint_another_listener_or_the_metrics_port_collides() {
        let found = listen_collisions(&config(
            r#"  - name: a
    listen: 127.0.0.1:2222
    tunnels:
      - { name: relay, provider: command, run: [socat, x, y], endpoint: "127.0.0.1:2222" }
      - { name: far, provider: direct, address: "192.168.1.10:2222" }
  - name: b
    listen: 0.0.0.0:2222
    tunnels: [{ name: lan, provider: direct, address: "localhost:22" }]
  - name: c
    listen: 127.0.0.1:9180
    tunnels: [{ name: lan, provider: direct, address: "127.0.0.1:22" }]
  - name: d
    listen: 127.0.0.1:3333
    tunnels: [{ name: lan, provider: direct, address: "127.0.0.1:22" }]
"#,
        ));
        let keys: Vec<&str> = found.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "services[0].listen",
                "services[1].listen",
                "services[1].listen",
                "services[2].listen"
            ],
            "{found:#?}"
        );
        assert!(
            found[0]
                .message
                .contains("endpoint 127.0.0.1:2222 of tunnel `relay`"),
            "{found:#?}"
        );
        assert!(
            found[2].message.contains("listener of service `a`"),
            "{found:#?}"
        );
        assert!(
            found[3].message.contains("daemon.metrics_listen"),
            "{found:#?}"
        );
    }
}
