//! The `direct` provider against real local sockets.

mod common;

use std::time::Duration;

use common::{ctx, echo_server, free_port, round_trip, PATIENCE};
use tunnelkeeper_providers::direct::{DirectProvider, DirectSpec};
use tunnelkeeper_providers::{Provider, ProviderError};

fn direct(address: &str) -> DirectProvider {
    DirectProvider::new(DirectSpec {
        address: address.to_string(),
    })
}

#[tokio::test]
async fn dials_a_local_listener() {
    let echo = echo_server().await;
    let tunnel = direct(&echo.to_string())
        .start(&ctx())
        .await
        .expect("start");
    assert_eq!(tunnel.endpoint().display, echo.to_string());
    assert_eq!(tunnel.pid(), None);
    tunnel.check().await.expect("healthy");
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"direct").await, b"direct");
}

#[tokio::test]
async fn dial_to_a_closed_port_is_a_dial_error() {
    let address = format!("127.0.0.1:{}", free_port());
    let tunnel = direct(&address)
        .start(&ctx())
        .await
        .expect("start needs no listener");
    match tunnel.dial(PATIENCE).await {
        Err(ProviderError::Dial { target, .. }) => assert_eq!(target, address),
        other => panic!("expected a dial error, got {other:?}"),
    }
}

#[tokio::test]
async fn names_resolve_through_the_resolver() {
    let echo = echo_server().await;
    let address = format!("localhost:{}", echo.port());
    let tunnel = direct(&address).start(&ctx()).await.expect("start");
    assert_eq!(tunnel.endpoint().display, address);
    let mut stream = tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(round_trip(&mut stream, b"by name").await, b"by name");
}

#[tokio::test]
async fn bad_address_fails_start() {
    assert!(matches!(
        direct("no-port-here").start(&ctx()).await,
        Err(ProviderError::Config(_))
    ));
}

#[tokio::test]
async fn closed_waits_for_stop_and_stop_is_idempotent() {
    let tunnel = direct("127.0.0.1:9").start(&ctx()).await.expect("start");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), tunnel.closed())
            .await
            .is_err()
    );
    let watcher = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.closed().await })
    };
    tunnel.stop().await;
    tunnel.stop().await;
    let reason = tokio::time::timeout(PATIENCE, watcher)
        .await
        .expect("closed in time")
        .expect("join");
    assert_eq!(reason, "stopped");
    assert!(matches!(
        tunnel.check().await,
        Err(ProviderError::Closed(_))
    ));
    assert!(matches!(
        tunnel.dial(PATIENCE).await,
        Err(ProviderError::Closed(_))
    ));
}
