//! The agent's private config file: the authtoken read from its file, written 0600 into a
//! private directory with the agent's local API address, removed on drop, and the copies a
//! crashed run left behind cleaned up.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::util::lock;
use crate::ProviderError;

use super::*;

/// Why the private agent config could not be prepared. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConfigFileError {
    #[error("cannot read authtoken_file {path}: {source}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("authtoken_file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("authtoken_file {path} must hold the token on one line, without control characters")]
    MalformedToken { path: PathBuf },
    #[error("cannot create the ngrok config directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the ngrok config file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the ngrok config directory {path} {why}: it must be a directory of this user's with \
         mode 0700 (it receives a copy of the authtoken)"
    )]
    UnsafeDir { path: PathBuf, why: String },
    #[error("cannot pick a free loopback port for the agent's web_addr: {0}")]
    WebAddr(#[source] io::Error),
}

impl From<ConfigFileError> for ProviderError {
    fn from(err: ConfigFileError) -> Self {
        match err {
            // The operator has to fix these; retrying will not help.
            ConfigFileError::ReadToken { .. }
            | ConfigFileError::EmptyToken { .. }
            | ConfigFileError::MalformedToken { .. }
            | ConfigFileError::UnsafeDir { .. } => ProviderError::Config(err.to_string()),
            // Disk full, a directory that appears later, a port race: worth a retry.
            _ => ProviderError::Spawn(err.to_string()),
        }
    }
}

/// The authtoken, kept only to scrub it from messages the agent might echo it in. Its `Debug`
/// prints nothing of it.
pub(super) struct Secret(pub(super) String);

impl Secret {
    /// `text` with every occurrence of the token replaced by `MASKED`.
    pub(super) fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "MASKED")
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Reads and checks the token. Errors name the file, never its content.
pub(super) fn read_authtoken(path: &Path) -> Result<Secret, ConfigFileError> {
    let raw = fs::read_to_string(path).map_err(|source| ConfigFileError::ReadToken {
        path: path.to_path_buf(),
        source,
    })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(ConfigFileError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    // A newline inside would let the file's content add YAML keys to the agent config.
    if token.chars().any(char::is_control) {
        return Err(ConfigFileError::MalformedToken {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret(token.to_string()))
}

/// The agent config, in the v3 layout: `version: 3`, then `agent.authtoken` and
/// `agent.web_addr`.
pub(super) fn config_yaml(token: &Secret, web_addr: SocketAddr) -> String {
    // Double-quoted YAML: the only characters that need escaping there are `\` and `"`
    // (control characters were refused when the token was read).
    let quoted = token.0.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "# Written by tunnelkeeper for one ngrok agent; removed when the tunnel stops.\n\
         version: 3\n\
         agent:\n  \
           authtoken: \"{quoted}\"\n  \
           web_addr: {web_addr}\n"
    )
}

/// Refuses a config directory another user could read or swap files in (a pre-made one in a
/// shared place, a symlink): the token copy goes there.
pub(super) fn check_private_dir(dir: &Path) -> Result<(), ConfigFileError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |why: String| ConfigFileError::UnsafeDir {
        path: dir.to_path_buf(),
        why,
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| ConfigFileError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(unsafe_dir(
            "is not a directory (or is a symlink)".to_string(),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!("has mode {:o}", meta.mode() & 0o7777)));
    }
    Ok(())
}

/// Distinguishes config files of tunnels started by one daemon process.
pub(super) static CONFIG_SEQ: AtomicU64 = AtomicU64::new(0);

/// The config files this process has written and not yet removed: everything else with our
/// prefix in the directory is a leftover of a run that crashed.
pub(super) static LIVE_CONFIGS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The file-name-safe form of a tunnel tag.
pub(super) fn file_stem(tag: &str) -> String {
    tag.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Removes config files of `stem` left in `dir` by an earlier daemon that crashed (a copy of
/// the token each): every file with our prefix and this tunnel's stem that no live tunnel of
/// this process owns. Returns how many were removed.
pub(super) fn remove_leftovers(dir: &Path, stem: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let ours = format!("{CONFIG_PREFIX}{stem}-");
    let live = lock(&LIVE_CONFIGS).clone();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // `<stem>-<pid>-<seq>.yml`: the part after our stem must be digits, so that a tunnel
        // whose name extends this one's (`a` and `a-b`) is not taken for it.
        let Some(rest) = name.strip_prefix(&ours) else {
            continue;
        };
        let shape_ok = rest.strip_suffix(".yml").is_some_and(|ids| {
            ids.split('-').count() == 2
                && ids
                    .split('-')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        });
        let path = entry.path();
        if !shape_ok || live.contains(&path) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                removed += 1;
                tracing::warn!(path = %path.display(), "removed an ngrok config file (a token copy) left by an earlier run");
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot remove a leftover ngrok config file")
            }
        }
    }
    removed
}

/// The private agent config file. Removed when dropped, so no path (failed start, stop, a
/// dropped tunnel) leaves the token behind.
#[derive(Debug)]
pub(super) struct ConfigFile {
    pub(super) path: PathBuf,
}

impl ConfigFile {
    /// Creates a new file in `dir` holding `contents`, readable and writable by the owner only
    /// from the moment it exists.
    pub(super) fn create(
        dir: &Path,
        tag: &str,
        contents: &str,
    ) -> Result<ConfigFile, ConfigFileError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ConfigFileError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        check_private_dir(dir)?;
        let stem = file_stem(tag);
        // A file left by a daemon that crashed with the same pid must not be reused (nor
        // followed, were it a symlink): `create_new` refuses it, and the next name is tried.
        let mut attempts = 0;
        let (path, mut file) = loop {
            let seq = CONFIG_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(
                "{CONFIG_PREFIX}{stem}-{}-{seq}.yml",
                std::process::id()
            ));
            let opened = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match opened {
                Ok(file) => break (path, file),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                    attempts += 1;
                }
                Err(source) => return Err(ConfigFileError::Write { path, source }),
            }
        };
        lock(&LIVE_CONFIGS).push(path.clone());
        let guard = ConfigFile { path };
        let written = file
            // The umask can only have removed bits; make it exactly owner read/write.
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(contents.as_bytes()))
            .and_then(|()| file.flush());
        match written {
            Ok(()) => Ok(guard),
            // Dropping the guard removes the partial file.
            Err(source) => Err(ConfigFileError::Write {
                path: guard.path.clone(),
                source,
            }),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        lock(&LIVE_CONFIGS).retain(|p| p != &self.path);
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "cannot remove the ngrok config file")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_is_version_3_with_agent_keys() {
        let addr: SocketAddr = "127.0.0.1:4040".parse().expect("addr");
        assert_eq!(
            config_yaml(&Secret("abc_123".to_string()), addr),
            "# Written by tunnelkeeper for one ngrok agent; removed when the tunnel stops.\n\
             version: 3\nagent:\n  authtoken: \"abc_123\"\n  web_addr: 127.0.0.1:4040\n"
        );
        assert!(
            config_yaml(&Secret(r#"a"b\c"#.to_string()), addr).contains(r#"authtoken: "a\"b\\c""#)
        );
    }

    #[test]
    fn secrets_are_masked() {
        let secret = Secret("s3cr3t".to_string());
        assert_eq!(format!("{secret:?}"), "MASKED");
        assert_eq!(
            secret.redact("Your authtoken: s3cr3t."),
            "Your authtoken: MASKED."
        );
    }
}
