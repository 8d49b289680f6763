//! A server that opens channels the client never asked for: session, x11, agent and
//! direct-tcpip. russh's client accepts all of them by default; tunnelkeeper must refuse them.
//!
//! OpenSSH's sshd never opens these towards a client that did not request X11 or agent
//! forwarding, so the hostile server here is russh's own server (a real SSH implementation on a
//! loopback socket), scripted to open each kind right after the client logs in.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ctx, echo_server, PATIENCE};
use russh::keys::PrivateKey;
use russh::server::{self, Auth, Session};
use russh::ChannelOpenFailure;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec, SshTarget};
use tunnelkeeper_providers::Provider;

/// What the server got back for each channel it tried to open.
type Outcome = (&'static str, Result<(), Option<ChannelOpenFailure>>);

struct Hostile {
    results: mpsc::UnboundedSender<Outcome>,
}

impl server::Handler for Hostile {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let handle = session.handle();
        let results = self.results.clone();
        // Not on the session's own task: opening waits for the client's answer.
        tokio::spawn(async move {
            let outcome = |r: Result<russh::Channel<server::Msg>, russh::Error>| match r {
                Ok(_) => Ok(()),
                Err(russh::Error::ChannelOpenFailure(reason)) => Err(Some(reason)),
                Err(_) => Err(None),
            };
            let _ = results.send(("session", outcome(handle.channel_open_session().await)));
            let _ = results.send((
                "x11",
                outcome(handle.channel_open_x11("127.0.0.1", 6010).await),
            ));
            let _ = results.send(("agent", outcome(handle.channel_open_agent().await)));
            let _ = results.send((
                "direct-tcpip",
                outcome(
                    handle
                        .channel_open_direct_tcpip("127.0.0.1", 22, "127.0.0.1", 5555)
                        .await,
                ),
            ));
        });
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_the_server_opens_uninvited_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host_key_file = dir.path().join("host_ed25519");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(&host_key_file)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let host_key: PrivateKey =
        russh::keys::load_secret_key(&host_key_file, None).expect("load host key");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{port} {}\n",
            host_key.public_key().to_openssh().expect("openssh")
        ),
    )
    .expect("known_hosts");
    let client_key = dir.path().join("id_ed25519");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(&client_key)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = Arc::new(server::Config {
        keys: vec![host_key],
        ..server::Config::default()
    });
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        let session = server::run_stream(config, socket, Hostile { results: tx })
            .await
            .expect("handshake");
        let _ = session.await;
    });

    let mut target = SshTarget::new("127.0.0.1", &known_hosts);
    target.port = Some(port);
    target.user = Some("tester".to_string());
    target.identity_file = Some(client_key);
    let echo = echo_server().await;
    let pool = SshPool::new();
    let tunnel = SshProvider::new(
        SshSpec {
            target,
            forward: Forward::Local {
                to: echo.to_string(),
            },
        },
        pool.clone(),
    )
    .start(&ctx())
    .await
    .expect("start against the hostile server");

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let outcome = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("the server's channel opens were answered")
            .expect("results");
        seen.push(outcome);
    }
    for (kind, result) in &seen {
        assert_eq!(
            result,
            &Err(Some(ChannelOpenFailure::AdministrativelyProhibited)),
            "{kind} channel"
        );
    }
    // None of them is left in the client's tables.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = pool.stats();
    assert_eq!(stats.targets[0].ssh_channels, 0, "{stats:?}");
    tunnel.stop().await;
    server.abort();
}
