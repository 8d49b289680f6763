//! Logging in: identity file, ssh-agent, password, in that order.
//!
//! Secrets (key files, passphrases, passwords) are read from their files on every new session,
//! so a rotated credential is picked up without a restart. They are held only for the duration
//! of the attempt, never logged and never formatted into errors: messages name files and
//! methods, not contents.

use std::path::Path;
use std::sync::Arc;

use russh::client::AuthResult;
use russh::client::Handle;
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use russh::MethodSet;

use super::config::Resolved;
use super::handler::ClientHandler;
use crate::ProviderError;

/// What was tried so far, for the error message.
#[derive(Default)]
struct Attempts {
    tried: Vec<String>,
    /// Methods the server said it would still accept, from its last refusal.
    accepts: Option<MethodSet>,
}

impl Attempts {
    /// Records a result; true when logged in.
    fn record(&mut self, result: AuthResult, label: String) -> bool {
        match result {
            AuthResult::Success => true,
            AuthResult::Failure {
                remaining_methods,
                partial_success,
            } => {
                self.tried.push(if partial_success {
                    format!("{label} (accepted, but the server wants a further method)")
                } else {
                    label
                });
                self.accepts = Some(remaining_methods);
                false
            }
        }
    }
}

/// Tries every configured method until one succeeds.
pub(crate) async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    resolved: &Resolved,
) -> Result<(), ProviderError> {
    let target = &resolved.target;
    let user = resolved.key.user.as_str();
    let mut attempts = Attempts::default();

    if let Some(path) = &resolved.key.identity {
        let key = load_identity(path, target.passphrase_file.as_deref()).await?;
        let hash = if key.algorithm().is_rsa() {
            Some(rsa_hash(handle).await)
        } else {
            None
        };
        let label = match hash {
            Some(hash) => format!("publickey {} (rsa-{})", path.display(), hash_name(hash)),
            None => format!("publickey {}", path.display()),
        };
        let result = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
            .map_err(|err| lost(resolved, "publickey authentication", &err))?;
        if attempts.record(result, label) {
            return Ok(());
        }
    }

    if target.agent {
        match agent_login(handle, user).await {
            Ok((result, label)) => {
                if attempts.record(result, label) {
                    return Ok(());
                }
            }
            Err(detail) => attempts.tried.push(format!("agent ({detail})")),
        }
    }

    if let Some(path) = &target.password_file {
        let password = read_secret(path, "password_file").await?;
        let result = handle
            .authenticate_password(user, password)
            .await
            .map_err(|err| lost(resolved, "password authentication", &err))?;
        if attempts.record(result, format!("password from {}", path.display())) {
            return Ok(());
        }
    }

    if attempts.tried.is_empty() {
        return Err(ProviderError::Config(format!(
            "no authentication method for {}: set identity_file, agent or password_file",
            resolved.key
        )));
    }
    let accepts = attempts
        .accepts
        .filter(|methods| !methods.is_empty())
        .map(|methods| {
            let names: Vec<&str> = methods.iter().map(<&str>::from).collect();
            format!("; the server accepts: {}", names.join(","))
        })
        .unwrap_or_default();
    Err(ProviderError::Auth(format!(
        "authentication failed for {} (tried: {}){accepts}",
        resolved.key,
        attempts.tried.join(", ")
    )))
}

/// Reads and decrypts the private key.
async fn load_identity(
    path: &Path,
    passphrase_file: Option<&Path>,
) -> Result<PrivateKey, ProviderError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|err| {
        ProviderError::Config(format!(
            "cannot read identity_file {}: {err}",
            path.display()
        ))
    })?;
    let passphrase = match passphrase_file {
        Some(file) => Some(read_secret(file, "passphrase_file").await?),
        None => None,
    };
    russh::keys::decode_secret_key(&text, passphrase.as_deref()).map_err(|err| {
        let why = match (&err, passphrase.is_some()) {
            (russh::keys::Error::KeyIsEncrypted, false) => {
                "the key is encrypted: set passphrase_file".to_string()
            }
            (_, true) => format!("{err} (wrong passphrase?)"),
            (_, false) => err.to_string(),
        };
        ProviderError::Config(format!(
            "cannot load identity_file {}: {why}",
            path.display()
        ))
    })
}

/// A secret file's content without the trailing newline editors and `echo` add.
async fn read_secret(path: &Path, what: &str) -> Result<String, ProviderError> {
    let mut text = tokio::fs::read_to_string(path).await.map_err(|err| {
        ProviderError::Config(format!("cannot read {what} {}: {err}", path.display()))
    })?;
    while text.ends_with('\n') || text.ends_with('\r') {
        text.pop();
    }
    Ok(text)
}

/// The best RSA signature hash the server takes. SHA-1 (`ssh-rsa`) is never used: a server
/// that lists only it, or lists nothing, gets SHA-256, which every current OpenSSH accepts.
async fn rsa_hash(handle: &Handle<ClientHandler>) -> HashAlg {
    match handle.best_supported_rsa_hash().await {
        Ok(Some(Some(hash))) => hash,
        _ => HashAlg::Sha256,
    }
}

fn hash_name(hash: HashAlg) -> &'static str {
    match hash {
        HashAlg::Sha512 => "sha2-512",
        _ => "sha2-256",
    }
}

/// Tries each key of the agent at `$SSH_AUTH_SOCK`; returns the last result and a label.
async fn agent_login(
    handle: &mut Handle<ClientHandler>,
    user: &str,
) -> Result<(AuthResult, String), String> {
    let mut agent = AgentClient::connect_env()
        .await
        .map_err(|err| format!("cannot reach the agent at $SSH_AUTH_SOCK: {err}"))?;
    let identities = agent
        .request_identities()
        .await
        .map_err(|err| format!("the agent did not list its keys: {err}"))?;
    let keys: Vec<_> = identities
        .into_iter()
        .filter_map(|identity| match identity {
            AgentIdentity::PublicKey { key, .. } => Some(key),
            // Certificates need the server to trust their CA; plain keys are what we offer.
            AgentIdentity::Certificate { .. } => None,
        })
        .collect();
    if keys.is_empty() {
        return Err("the agent holds no keys".to_string());
    }
    let label = format!("agent ({} keys)", keys.len());
    let mut last = Err("the agent could not sign with any key".to_string());
    for key in keys {
        let hash = if key.algorithm().is_rsa() {
            Some(rsa_hash(handle).await)
        } else {
            None
        };
        match handle
            .authenticate_publickey_with(user, key, hash, &mut agent)
            .await
        {
            Ok(AuthResult::Success) => return Ok((AuthResult::Success, label)),
            Ok(failure) => last = Ok((failure, label.clone())),
            // The agent declined to sign (e.g. a confirm-constrained key): try the next one.
            Err(err) => tracing::debug!(error = %err, "ssh-agent could not sign"),
        }
    }
    last
}

/// The session died while authenticating.
fn lost(resolved: &Resolved, during: &str, err: &russh::Error) -> ProviderError {
    ProviderError::Ssh {
        target: resolved.key.to_string(),
        detail: format!("connection lost during {during}: {err}"),
    }
}
