//! Login through an ssh-agent (`agent: true`, keys from `$SSH_AUTH_SOCK`) against a real
//! OpenSSH sshd and ssh-agent.
//!
//! This is its own test binary with a single test: the agent is found through a process-wide
//! environment variable, which is set here before any runtime or other thread exists.

mod common;
use tunnelkeeper_test_support::sshd;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ctx, echo_server, PATIENCE};
use sshd::Sshd;
use tunnelkeeper_providers::ssh::{Forward, SshPool, SshProvider, SshSpec, SshTarget};
use tunnelkeeper_providers::{Provider, ProviderError};

/// An `ssh-agent -D` on a socket in `dir`; killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(socket: &Path) -> Option<Agent> {
    let child = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        tunnelkeeper_test_support::skip(
            "ssh-agent is not installed (apt-get install openssh-client)",
        );
        return None;
    };
    let agent = Agent(child);
    for _ in 0..200 {
        if socket.exists() {
            return Some(agent);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("ssh-agent did not create {}", socket.display());
}

async fn start(target: SshTarget) -> Result<(), ProviderError> {
    let echo = echo_server().await;
    let tunnel = SshProvider::new(
        SshSpec {
            target,
            forward: Forward::Local {
                to: echo.to_string(),
            },
        },
        SshPool::new(),
    )
    .start(&ctx())
    .await?;
    tunnel.dial(PATIENCE).await?;
    tunnel.stop().await;
    Ok(())
}

#[test]
fn agent_keys_log_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let Some(_agent) = start_agent(&socket) else {
        return;
    };
    // Before any thread of ours reads the environment (the runtime is built below).
    std::env::set_var("SSH_AUTH_SOCK", &socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let Some(server) = Sshd::start("").await else {
            return;
        };
        let mut target = server.target();
        target.identity_file = None;
        target.agent = true;

        // An empty agent: a clear reason.
        let err = start(target.clone())
            .await
            .expect_err("no keys in the agent");
        assert!(matches!(err, ProviderError::Auth(_)), "{err:?}");
        assert!(
            err.to_string().contains("agent (the agent holds no keys)"),
            "{err}"
        );

        // Unrelated keys first, then the authorized one: each is offered in turn.
        let other = server.keygen("unrelated", "ed25519");
        for key in [&other, &server.client_key] {
            let status = Command::new("ssh-add")
                .arg("-q")
                .arg(key)
                .env("SSH_AUTH_SOCK", &socket)
                .stderr(Stdio::null())
                .status()
                .expect("ssh-add");
            assert!(status.success(), "ssh-add {}", key.display());
        }
        start(target).await.expect("login with an agent key");
    });
}
