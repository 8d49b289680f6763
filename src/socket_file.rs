//! Claiming and releasing the path of a Unix listening socket (the control socket and Unix
//! failover listeners).
//!
//! A path named in the config may already hold something. Only a *socket* that nobody answers
//! on (`connect(2)` fails with `ECONNREFUSED`: a crashed daemon's leftover) is ours to replace;
//! a live socket is another process's, and anything else — a regular file, a directory, a
//! symlink — is refused without touching it, so a typo in `control_socket:` can never delete a
//! file. [`SocketFile`] removes what we bound if the start fails or the socket is let go.
//!
//! The socket's directory is created only the way systemd's `RuntimeDirectory=` would create
//! it: the last directory of the path, under a parent that exists, and the daemon says so
//! ([`prepare_dir`]). A longer missing path is a typo more often than not, and is refused.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Why `path` can never be ours to bind, without touching it: something that is not a socket
/// is there. `None` when nothing is there or it is a socket (live or stale, `clear_stale` tells).
/// Also used by `check`, so a config that `run` would refuse does not pass.
pub fn not_a_socket(path: &Path) -> Option<String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Some(format!(
            "{} exists and is not a socket; refusing to replace it (choose another path)",
            path.display()
        )),
        _ => None,
    }
}

/// Makes sure the directory of socket `path` exists. Only its last component is created (mode
/// 0750, as the unit's `RuntimeDirectoryMode=`), and only when its parent exists: that is what
/// `RuntimeDirectory=` does for `/run/tunnelkeeper`, so running outside systemd works the same,
/// while a mistyped path (`/rnu/tunnelkeeper/control.sock`) is refused instead of built.
pub fn prepare_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !parent.as_os_str().is_empty() && !parent.is_dir() {
        bail!(
            "the directory {} of socket {} does not exist, nor does its parent {}: create it \
             first or choose another path (tunnelkeeper creates only the last directory, as \
             systemd's RuntimeDirectory= does)",
            dir.display(),
            path.display(),
            parent.display()
        );
    }
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(dir)
        .with_context(|| format!("creating socket directory {}", dir.display()))?;
    tracing::info!(
        "created socket directory {} (mode 0750), as systemd's RuntimeDirectory= would",
        dir.display()
    );
    Ok(())
}

/// Makes `path` free for `bind(2)`: nothing there, or a stale socket that is then removed.
/// Errors name the path and say why it was left alone.
pub async fn clear_stale(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    if let Some(why) = not_a_socket(path) {
        bail!(why);
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => bail!("{} is in use by another process", path.display()),
        Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
            tracing::info!("replaced stale socket {}", path.display());
            Ok(())
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "{} is a socket that could not be checked; leaving it alone",
                path.display()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_directory_is_created() {
        let temp = tempfile::tempdir().expect("temp dir");
        let one = temp.path().join("run").join("control.sock");
        prepare_dir(&one).expect("the last directory is created");
        assert!(temp.path().join("run").is_dir());
        // Already there: nothing to do.
        prepare_dir(&one).expect("existing directory");
        let deep = temp.path().join("a").join("b").join("control.sock");
        let err = prepare_dir(&deep).expect_err("two missing levels");
        assert!(
            err.to_string()
                .contains("does not exist, nor does its parent"),
            "{err}"
        );
        assert!(!temp.path().join("a").exists(), "nothing was created");
    }
}

/// Removes `path` if it is (still) a socket; anything else that appeared there is kept.
pub fn remove(path: &Path) {
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", path.display());
            }
        }
    }
}

/// A socket path we bound: removed when dropped unless [`SocketFile::keep`] was called, so a
/// start that fails after binding leaves nothing behind.
#[derive(Debug)]
pub struct SocketFile(Option<PathBuf>);

impl SocketFile {
    /// Takes charge of `path`.
    pub fn new(path: PathBuf) -> SocketFile {
        SocketFile(Some(path))
    }

    /// The start succeeded: the owner now removes the socket itself.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            remove(&path);
        }
    }
}
