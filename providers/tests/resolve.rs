//! Name resolution without the network: literals, localhost, and a dead nameserver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

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
