//! Host key checking and login against a real OpenSSH sshd: unknown and changed host keys are
//! refused with the fingerprint and the line to add, accept_new records the key, hashed
//! known_hosts entries work, the recorded key type is asked for first, a wrong client key is an
//! authentication failure with a clear reason, and RSA, ECDSA, encrypted keys and ssh_config
//! aliases log in.

mod common;
use tunnelkeeper_test_support::sshd;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{ctx, echo_server, PATIENCE};
use sshd::Sshd;
use tunnelkeeper_providers::ssh::{
    Forward, HostKeyPolicy, SshPool, SshProvider, SshSpec, SshTarget,
};
use tunnelkeeper_providers::{Provider, ProviderError};

async fn start(target: SshTarget, pool: &SshPool) -> Result<(), ProviderError> {
    let echo = echo_server().await;
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
    .await?;
    // Prove the session works end to end, not just that login passed.
    tunnel.dial(PATIENCE).await?;
    tunnel.stop().await;
    Ok(())
}

/// `SHA256:...` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint(public_key: &Path) -> String {
    let output = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(public_key)
        .output()
        .expect("ssh-keygen -l");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no fingerprint in {text:?}"))
        .to_string()
}

fn expect_err(result: Result<(), ProviderError>) -> ProviderError {
    match result {
        Ok(()) => panic!("expected a refusal"),
        Err(err) => err,
    }
}

#[tokio::test]
async fn unknown_host_key_is_refused_with_fingerprint_and_line_to_add() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    fs::write(&server.known_hosts, "").expect("empty known_hosts");
    let pool = SshPool::new();
    let err = expect_err(start(server.target(), &pool).await);
    let message = err.to_string();
    eprintln!("{message}");
    assert!(matches!(err, ProviderError::HostKey(_)), "{err:?}");
    let fp = fingerprint(&server.dir().join("host_ed25519.pub"));
    assert!(message.contains(&fp), "fingerprint {fp} missing: {message}");
    assert!(
        message.contains(&format!(
            "add this line to {}",
            server.known_hosts.display()
        )),
        "{message}"
    );
    assert!(message.ends_with(&server.host_line), "{message}");
    assert_eq!(pool.stats().sessions, 0);
    // The line really is the one to add: with it, the same start works.
    fs::write(&server.known_hosts, format!("{}\n", server.host_line)).expect("write");
    start(server.target(), &pool)
        .await
        .expect("start once the line is added");
}

#[tokio::test]
async fn changed_host_key_is_refused_even_with_accept_new() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let impostor = server.keygen("other_host", "ed25519");
    let other = fs::read_to_string(impostor.with_extension("pub")).expect("pub");
    let other: Vec<&str> = other.split_whitespace().take(2).collect();
    fs::write(
        &server.known_hosts,
        format!(
            "# recorded earlier\n[127.0.0.1]:{} {}\n",
            server.port,
            other.join(" ")
        ),
    )
    .expect("known_hosts");
    let pool = SshPool::new();
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let mut target = server.target();
        target.host_key_policy = policy;
        let err = expect_err(start(target, &pool).await);
        let message = err.to_string();
        eprintln!("{message}");
        assert!(matches!(err, ProviderError::HostKey(_)), "{err:?}");
        assert!(message.contains("HOST KEY CHANGED"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(
            message.contains(&fingerprint(&server.dir().join("host_ed25519.pub"))),
            "{message}"
        );
    }
    // accept_new did not overwrite or add anything.
    let after = fs::read_to_string(&server.known_hosts).expect("read");
    assert_eq!(after.lines().count(), 2, "{after}");
}

#[tokio::test]
async fn accept_new_records_the_key_then_strict_works() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let path = server.dir().join("fresh").join("known_hosts");
    let pool = SshPool::new();
    let mut target = server.target();
    target.known_hosts = path.clone();
    target.host_key_policy = HostKeyPolicy::AcceptNew;
    start(target.clone(), &pool).await.expect("accept_new");
    let recorded = fs::read_to_string(&path).expect("known_hosts created");
    assert_eq!(recorded, format!("{}\n", server.host_line));
    let mode = fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "known_hosts mode {mode:o}");

    // A fresh pool (new session) with strict checking accepts the recorded key, and a second
    // accept_new connection does not record it twice.
    let strict_pool = SshPool::new();
    target.host_key_policy = HostKeyPolicy::Strict;
    start(target.clone(), &strict_pool)
        .await
        .expect("strict after recording");
    target.host_key_policy = HostKeyPolicy::AcceptNew;
    start(target, &SshPool::new())
        .await
        .expect("accept_new again");
    assert_eq!(fs::read_to_string(&path).expect("read").lines().count(), 1);
}

#[tokio::test]
async fn hashed_known_hosts_entries_work() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let status = Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&server.known_hosts)
        .status()
        .expect("ssh-keygen -H");
    assert!(status.success());
    let hashed = fs::read_to_string(&server.known_hosts).expect("read");
    assert!(hashed.starts_with("|1|"), "not hashed: {hashed}");
    assert!(!hashed.contains("127.0.0.1"), "not hashed: {hashed}");
    start(server.target(), &SshPool::new())
        .await
        .expect("hashed entry accepted");
}

#[tokio::test]
async fn the_recorded_host_key_type_is_asked_for_first() {
    // The server has an ed25519 key (preferred by default) and an ECDSA key; known_hosts only
    // records the ECDSA one. OpenSSH asks for recorded types first; so must we.
    let keys = tempfile::tempdir().expect("tempdir");
    let ecdsa = keys.path().join("host_ecdsa");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ecdsa", "-N", "", "-C", "", "-f"])
        .arg(&ecdsa)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let Some(server) = Sshd::start(&format!("HostKey {}", ecdsa.display())).await else {
        return;
    };
    let public = fs::read_to_string(ecdsa.with_extension("pub")).expect("pub");
    let public: Vec<&str> = public.split_whitespace().take(2).collect();
    fs::write(
        &server.known_hosts,
        format!("[127.0.0.1]:{} {}\n", server.port, public.join(" ")),
    )
    .expect("known_hosts");
    start(server.target(), &SshPool::new())
        .await
        .expect("the ECDSA host key was negotiated and accepted");
}

#[tokio::test]
async fn wrong_client_key_is_an_authentication_failure() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let wrong = server.keygen("not_authorized", "ed25519");
    let mut target = server.target();
    target.identity_file = Some(wrong.clone());
    let pool = SshPool::new();
    let err = expect_err(start(target, &pool).await);
    let message = err.to_string();
    eprintln!("{message}");
    assert!(matches!(err, ProviderError::Auth(_)), "{err:?}");
    assert!(
        message.starts_with(&format!(
            "authentication failed for {}@127.0.0.1:{} (tried: publickey {})",
            sshd::current_user(),
            server.port,
            wrong.display()
        )),
        "{message}"
    );
    assert_eq!(pool.stats().sessions, 0);
}

#[tokio::test]
async fn rsa_and_ecdsa_client_keys_log_in() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    for kind in ["rsa", "ecdsa"] {
        let key = server.keygen(&format!("id_{kind}"), kind);
        server.authorize(&key);
        let mut target = server.target();
        target.identity_file = Some(key);
        start(target, &SshPool::new())
            .await
            .unwrap_or_else(|err| panic!("{kind} key: {err}"));
    }
    // RSA signed with SHA-2, never the legacy SHA-1 `ssh-rsa`.
    let log = server.log();
    assert!(
        log.contains("Accepted publickey") && log.contains("RSA SHA256:"),
        "{log}"
    );
}

#[tokio::test]
async fn encrypted_key_needs_and_uses_its_passphrase_file() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let key = server.dir().join("id_locked");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "correct horse", "-C", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    server.authorize(&key);
    let mut target = server.target();
    target.identity_file = Some(key.clone());

    let err = expect_err(start(target.clone(), &SshPool::new()).await);
    assert!(matches!(err, ProviderError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("set passphrase_file"), "{err}");

    let passphrase = server.dir().join("passphrase");
    fs::write(&passphrase, "correct horse\n").expect("passphrase");
    target.passphrase_file = Some(passphrase);
    start(target, &SshPool::new()).await.expect("unlocked key");
}

#[tokio::test]
async fn ssh_config_alias_supplies_host_port_user_and_key() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let config = server.dir().join("ssh_config");
    fs::write(
        &config,
        format!(
            "Host box\n  HostName 127.0.0.1\n  Port {}\n  User {}\n  IdentityFile {}\n  ServerAliveInterval 5\n",
            server.port,
            sshd::current_user(),
            server.client_key.display()
        ),
    )
    .expect("ssh_config");
    let mut target = SshTarget::new("box", &server.known_hosts);
    target.ssh_config = Some(config);
    let pool = SshPool::new();
    start(target, &pool).await.expect("alias");
    let stats = pool.stats();
    assert_eq!(
        stats.targets[0].target,
        format!("{}@127.0.0.1:{}", sshd::current_user(), server.port)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_share_one_refusal() {
    let Some(server) = Sshd::start("").await else {
        return;
    };
    fs::write(&server.known_hosts, "").expect("empty known_hosts");
    let pool = SshPool::new();
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let (target, pool) = (server.target(), pool.clone());
            tokio::spawn(async move { start(target, &pool).await })
        })
        .collect();
    for started in starts {
        let err = expect_err(started.await.expect("task"));
        assert!(matches!(err, ProviderError::HostKey(_)), "{err:?}");
    }
    // Waiters shared the first attempt's outcome instead of each connecting in turn.
    let connections = server.log().matches("Connection from").count();
    assert!(connections < 8, "{connections} connections for 8 starts");
}

#[tokio::test]
async fn sha1_rsa_host_key_signatures_are_not_offered() {
    // The server signs with `ssh-rsa` (SHA-1) only. Its RSA key is recorded, so the only thing
    // that can refuse it is the algorithm: the client no longer offers `ssh-rsa`.
    let keys = tempfile::tempdir().expect("tempdir");
    let rsa = keys.path().join("host_rsa");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-C", "", "-f"])
        .arg(&rsa)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let extra = format!("HostKey {}\nHostKeyAlgorithms ssh-rsa", rsa.display());
    let Some(server) = Sshd::start(&extra).await else {
        return;
    };
    let public = fs::read_to_string(rsa.with_extension("pub")).expect("pub");
    let public: Vec<&str> = public.split_whitespace().take(2).collect();
    fs::write(
        &server.known_hosts,
        format!("[127.0.0.1]:{} {}\n", server.port, public.join(" ")),
    )
    .expect("known_hosts");
    let err = expect_err(start(server.target(), &SshPool::new()).await);
    let text = err.to_string();
    assert!(
        matches!(err, ProviderError::Ssh { .. }) && text.contains("key exchange failed"),
        "{text}"
    );

    // The same key signed with SHA-2 is fine.
    drop(server);
    let extra = format!(
        "HostKey {}\nHostKeyAlgorithms rsa-sha2-512,rsa-sha2-256",
        rsa.display()
    );
    let Some(server) = Sshd::start(&extra).await else {
        return;
    };
    fs::write(
        &server.known_hosts,
        format!("[127.0.0.1]:{} {}\n", server.port, public.join(" ")),
    )
    .expect("known_hosts");
    start(server.target(), &SshPool::new())
        .await
        .expect("rsa-sha2 host key signatures are accepted");
}

#[tokio::test]
async fn a_strict_target_never_rides_a_session_accepted_on_first_use() {
    // Two targets for the same user@host:port and key: a tunnel that trusts on first use, and
    // a router whose known_hosts does not know the server. The router's commands must not run
    // over the session the tunnel's policy accepted.
    let Some(server) = Sshd::start("").await else {
        return;
    };
    let files = tempfile::tempdir().expect("tempdir");
    let pool = SshPool::new();
    let echo = echo_server().await;
    let mut lenient = server.target();
    lenient.known_hosts = files.path().join("tunnel_known_hosts");
    lenient.host_key_policy = HostKeyPolicy::AcceptNew;
    let tunnel = SshProvider::new(
        SshSpec {
            target: lenient,
            forward: Forward::Local {
                to: echo.to_string(),
            },
        },
        pool.clone(),
    )
    .start(&ctx())
    .await
    .expect("accept_new records the key and starts");
    tunnel.dial(PATIENCE).await.expect("dial");
    assert_eq!(pool.stats().sessions, 1);

    let mut strict = server.target();
    strict.known_hosts = files.path().join("router_known_hosts");
    let err = pool
        .exec(&strict, "echo ran", PATIENCE, 64)
        .await
        .expect_err("a strict target with an unknown host key must not run commands");
    assert!(matches!(err, ProviderError::HostKey(_)), "{err}");
    tunnel.stop().await;
}
