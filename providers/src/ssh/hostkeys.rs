//! Host key verification against an OpenSSH `known_hosts` file.
//!
//! russh ships a known_hosts reader, but it splits on single spaces only, skips `@revoked`,
//! fails the whole check when any unrelated line does not parse, and reports a changed key as
//! soon as one line of the same type differs (OpenSSH accepts if any line matches, which is how
//! key rotation works). So this module has its own small matcher with OpenSSH's rules:
//!
//! - a line is `[@marker] patterns keytype base64 [comment]`, fields separated by blanks;
//! - a host is looked up as `host` on port 22 and as `[host]:port` otherwise;
//! - patterns are comma separated, may be hashed (`|1|salt|hmac-sha1`), may use `*` and `?`
//!   wildcards, and may be negated with `!` (a negated match excludes the line);
//! - `@revoked` lines refuse their key for every host; `@cert-authority` lines are ignored
//!   (host certificates are not requested, see [`crate::ssh::session`]).
//!
//! Unknown keys are refused with the key's SHA256 fingerprint and the exact line to add;
//! [`HostKeyPolicy::AcceptNew`] appends that line instead (the file is created `0600` if
//! missing). A key that differs from a recorded key of the same host is always refused.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};
use sha1::Sha1;

use super::spec::HostKeyPolicy;
use crate::util::lock;

/// Serialises appends to known_hosts files within the daemon: two sessions to a new host that
/// accept its key at the same moment must not both append the line.
static APPEND_LOCK: Mutex<()> = Mutex::new(());

/// What known_hosts says about one presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A line for this host records exactly this key.
    Known,
    /// No line for this host records a key of this type (nor of any type).
    Unknown,
    /// The host is recorded with a different key.
    Changed {
        /// 1-based line number of the first conflicting entry.
        line: usize,
        /// What that line records, as `type SHA256:...`.
        recorded: String,
    },
    /// The key is listed under `@revoked`.
    Revoked {
        /// 1-based line number of the `@revoked` entry.
        line: usize,
    },
}

/// The name a host is recorded under: `host` on port 22, `[host]:port` otherwise.
pub(crate) fn host_entry_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Key algorithms of every key recorded for `host:port` (so the client can ask the server for a
/// key it can actually check, as OpenSSH does). Unreadable files give an empty list.
pub(crate) fn known_algorithms(path: &Path, host: &str, port: u16) -> Vec<Algorithm> {
    let Ok(content) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let name = host_entry_name(host, port);
    let mut found: Vec<Algorithm> = Vec::new();
    for entry in entries(&content) {
        if entry.marker.is_none() && patterns_match(entry.patterns, &name) {
            if let Some(key) = entry.key {
                let algorithm = key.algorithm();
                if !found.iter().any(|a| same_type(a, &algorithm)) {
                    found.push(algorithm);
                }
            }
        }
    }
    found
}

/// Checks `key` for `host:port` against the known_hosts text.
pub(crate) fn check(content: &str, host: &str, port: u16, key: &PublicKey) -> Verdict {
    let name = host_entry_name(host, port);
    let presented = key.algorithm();
    // First conflicting line of the same key type, and first conflicting line of any type.
    let mut same_type_line: Option<(usize, String)> = None;
    let mut other_line: Option<(usize, String)> = None;
    let mut known = false;
    for entry in entries(content) {
        let Some(recorded) = entry.key else { continue };
        match entry.marker {
            // A revoked key is refused whatever host it is presented by.
            Some(Marker::Revoked) => {
                if recorded.key_data() == key.key_data() {
                    return Verdict::Revoked { line: entry.line };
                }
                continue;
            }
            Some(Marker::CertAuthority) => continue,
            None => {}
        }
        if !patterns_match(entry.patterns, &name) {
            continue;
        }
        if recorded.key_data() == key.key_data() {
            known = true;
        } else if same_type(&recorded.algorithm(), &presented) {
            same_type_line.get_or_insert_with(|| (entry.line, describe(&recorded)));
        } else {
            other_line.get_or_insert_with(|| (entry.line, describe(&recorded)));
        }
    }
    if known {
        return Verdict::Known;
    }
    match same_type_line.or(other_line) {
        // The host is recorded, but not with this key. A different key *type* is treated the
        // same as a changed key: the client asks for the recorded types first, so a server
        // that no longer offers them is exactly what a man in the middle looks like.
        Some((line, recorded)) => Verdict::Changed { line, recorded },
        None => Verdict::Unknown,
    }
}

/// `type SHA256:...` of a key, for messages.
pub(crate) fn describe(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm().as_str(),
        key.fingerprint(HashAlg::Sha256)
    )
}

/// The known_hosts line that records `key` for `host:port`.
pub(crate) fn entry_line(host: &str, port: u16, key: &PublicKey) -> String {
    let mut bare = key.clone();
    // The server's key has no comment, but never copy one into someone's known_hosts.
    bare.set_comment("");
    let encoded = bare
        .to_openssh()
        .unwrap_or_else(|_| format!("{} <unencodable key>", key.algorithm().as_str()));
    format!("{} {}", host_entry_name(host, port), encoded.trim_end())
}

/// How a presented host key was judged, with everything needed for the messages.
#[derive(Debug, Clone)]
pub(crate) struct HostKeyCheck {
    /// The host as looked up (after ssh_config `HostName`).
    pub host: String,
    /// The port connected to.
    pub port: u16,
    /// The known_hosts file.
    pub path: PathBuf,
    /// Strict or accept-new.
    pub policy: HostKeyPolicy,
}

impl HostKeyCheck {
    /// Reads the file and judges `key`; records it when the policy allows. Returns `Ok` when
    /// the connection may proceed, or the full refusal message. Blocking file I/O: run it off
    /// the async workers.
    pub(crate) fn verify(&self, key: &PublicKey) -> Result<Accepted, String> {
        let content = match std::fs::read_to_string(&self.path) {
            Ok(content) => content,
            // A missing file is an empty one: everything is unknown.
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(err) => {
                return Err(format!(
                    "cannot read known_hosts {}: {err}",
                    self.path.display()
                ))
            }
        };
        match check(&content, &self.host, self.port, key) {
            Verdict::Known => Ok(Accepted::Known),
            Verdict::Revoked { line } => Err(format!(
                "host key for {} is REVOKED ({}, {} line {line}); connection refused",
                host_entry_name(&self.host, self.port),
                describe(key),
                self.path.display(),
            )),
            Verdict::Changed { line, recorded } => Err(format!(
                "HOST KEY CHANGED for {name}: the server presented {presented} but {path} line \
                 {line} records {recorded}. Someone may be intercepting the connection \
                 (man-in-the-middle), or the server's key was replaced; connection refused. If \
                 the change is legitimate, replace line {line} with: {entry}",
                name = host_entry_name(&self.host, self.port),
                presented = describe(key),
                path = self.path.display(),
                entry = entry_line(&self.host, self.port, key),
            )),
            Verdict::Unknown => match self.policy {
                HostKeyPolicy::Strict => Err(format!(
                    "host key for {name} is not in {path} (server presented {presented}); \
                     connection refused. If this is the right server, add this line to {path}: \
                     {entry}",
                    name = host_entry_name(&self.host, self.port),
                    path = self.path.display(),
                    presented = describe(key),
                    entry = entry_line(&self.host, self.port, key),
                )),
                HostKeyPolicy::AcceptNew => self.record(key),
            },
        }
    }

    /// Appends the key's line (accept-new), re-checking under the lock so concurrent sessions
    /// record it once, and so a key recorded meanwhile by someone else is judged properly.
    fn record(&self, key: &PublicKey) -> Result<Accepted, String> {
        let _guard = lock(&APPEND_LOCK);
        let content = std::fs::read_to_string(&self.path).unwrap_or_default();
        match check(&content, &self.host, self.port, key) {
            Verdict::Known => return Ok(Accepted::Known),
            Verdict::Unknown => {}
            // Someone recorded a different key between the two reads: judge again, strictly.
            _ => {
                return HostKeyCheck {
                    policy: HostKeyPolicy::Strict,
                    ..self.clone()
                }
                .verify(key)
            }
        }
        let line = entry_line(&self.host, self.port, key);
        self.append(&content, &line).map_err(|err| {
            format!(
                "host key for {} is new and accept_new is set, but it cannot be recorded in {}: \
                 {err}",
                host_entry_name(&self.host, self.port),
                self.path.display()
            )
        })?;
        Ok(Accepted::Recorded(line))
    }

    fn append(&self, content: &str, line: &str) -> io::Result<()> {
        if let Some(parent) = self.path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)?;
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        let mut text = String::new();
        if !content.is_empty() && !content.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()
    }
}

/// A host key that may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// It was already recorded.
    Known,
    /// It was new and has just been recorded (accept-new); the line that was appended.
    Recorded(String),
}

/// `@marker` at the start of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Revoked,
    CertAuthority,
}

/// One parsed line.
struct Entry<'a> {
    line: usize,
    marker: Option<Marker>,
    patterns: &'a str,
    /// `None` when the key part does not parse (an algorithm this build does not know).
    key: Option<PublicKey>,
}

/// The usable lines of a known_hosts file; comments, blanks and malformed lines are skipped,
/// as OpenSSH does.
fn entries(content: &str) -> impl Iterator<Item = Entry<'_>> {
    content.lines().enumerate().filter_map(|(index, raw)| {
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            return None;
        }
        let mut fields = text.split_ascii_whitespace();
        let mut first = fields.next()?;
        let marker = match first {
            "@revoked" => Some(Marker::Revoked),
            "@cert-authority" => Some(Marker::CertAuthority),
            other if other.starts_with('@') => return None,
            _ => None,
        };
        if marker.is_some() {
            first = fields.next()?;
        }
        let key_type = fields.next()?;
        let blob = fields.next()?;
        let key = PublicKey::from_openssh(&format!("{key_type} {blob}")).ok();
        Some(Entry {
            line: index + 1,
            marker,
            patterns: first,
            key,
        })
    })
}

/// OpenSSH's pattern-list rule: any negated match excludes, else any positive match includes.
fn patterns_match(list: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let mut matched = false;
    for pattern in list.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let hit = if pattern.starts_with("|1|") {
            hashed_match(pattern, &name)
        } else {
            glob(&pattern.to_ascii_lowercase(), &name)
        };
        if hit {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `|1|base64(salt)|base64(hmac-sha1(salt, name))`, as written by `ssh-keygen -H`.
fn hashed_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.trim_start_matches("|1|").split('|');
    let (Some(salt), Some(hash)) = (parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// `*` (any run) and `?` (any one character) wildcards; everything else literal.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position after the last `*` and the text position it is trying, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((after, tried)) => {
                    pi = after;
                    ti = tried + 1;
                    star = Some((after, tried + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether two algorithms are the same key type (all RSA signature variants are one key type).
pub(crate) fn same_type(a: &Algorithm, b: &Algorithm) -> bool {
    let rsa = |x: &Algorithm| matches!(x, Algorithm::Rsa { .. });
    (rsa(a) && rsa(b)) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

    fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).expect("test key")
    }

    #[test]
    fn plain_and_bracketed_names() {
        let file = format!("example.com {KEY_A}\n[example.com]:2222 {KEY_B}\n");
        assert_eq!(check(&file, "example.com", 22, &key(KEY_A)), Verdict::Known);
        assert_eq!(
            check(&file, "example.com", 2222, &key(KEY_B)),
            Verdict::Known
        );
        assert!(matches!(
            check(&file, "example.com", 2222, &key(KEY_A)),
            Verdict::Changed { line: 2, .. }
        ));
        assert_eq!(check(&file, "other.com", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn any_matching_line_wins_during_rotation() {
        let file = format!("h {KEY_B}\nh {KEY_A}\n");
        assert_eq!(check(&file, "h", 22, &key(KEY_A)), Verdict::Known);
    }

    #[test]
    fn tabs_comments_and_garbage_are_tolerated() {
        let file = format!("# comment\n\ngarbage\nx ssh-ed25519 !!!\nh\t{KEY_A}  comment here\n");
        assert_eq!(check(&file, "h", 22, &key(KEY_A)), Verdict::Known);
    }

    #[test]
    fn hashed_entries_match() {
        // `ssh-keygen -H` output for "[127.0.0.1]:2222" with a fixed salt, computed here.
        let salt = [7u8; 20];
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt)
            .expect("hmac key")
            .chain_update(b"[127.0.0.1]:2222")
            .finalize()
            .into_bytes();
        let file = format!(
            "|1|{}|{} {KEY_A}\n",
            BASE64.encode(&salt),
            BASE64.encode(&mac)
        );
        assert_eq!(check(&file, "127.0.0.1", 2222, &key(KEY_A)), Verdict::Known);
        assert_eq!(check(&file, "127.0.0.1", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_negation() {
        let file = format!("*.example.com,!bad.example.com {KEY_A}\n");
        assert_eq!(
            check(&file, "a.example.com", 22, &key(KEY_A)),
            Verdict::Known
        );
        assert_eq!(
            check(&file, "bad.example.com", 22, &key(KEY_A)),
            Verdict::Unknown
        );
        assert!(glob("h?st*", "host-1"));
        assert!(!glob("h?st", "hoost"));
        assert!(glob("*", ""));
    }

    #[test]
    fn revoked_keys_are_refused() {
        let file = format!("@revoked * {KEY_A}\nh {KEY_A}\n");
        assert_eq!(
            check(&file, "h", 22, &key(KEY_A)),
            Verdict::Revoked { line: 1 }
        );
    }

    #[test]
    fn entry_line_format() {
        assert_eq!(
            entry_line("127.0.0.1", 2222, &key(KEY_A)),
            format!("[127.0.0.1]:2222 {KEY_A}")
        );
        assert_eq!(entry_line("h", 22, &key(KEY_A)), format!("h {KEY_A}"));
    }
}
