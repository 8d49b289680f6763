//! What provider specs are built from: the error a setting that cannot work is reported with,
//! and the value types whose constructors hold a rule (a host name).
//!
//! The specs of the CLI providers (`cloudflare`, `tailscale`, `ngrok`) are correct by
//! construction: each is built once, by its `Settings::parse`, from the keys as written, and
//! a provider never checks them again. Each rule lives in that parse and nowhere else; the
//! config layer maps a [`SpecError`]'s key to the key's position in the file.

use std::fmt;

/// A setting that cannot work: the key it is about, and one message saying why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct SpecError {
    /// The key (as in the config file) the message is about.
    pub key: &'static str,
    /// What is wrong and how to fix it, without the key's position.
    pub message: String,
}

impl SpecError {
    /// A problem with `key`.
    pub fn new(key: &'static str, message: impl Into<String>) -> SpecError {
        SpecError {
            key,
            message: message.into(),
        }
    }
}

/// Collects the problems of one spec, so that every broken key is reported at once.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<SpecError>);

impl Problems {
    /// Records a problem with `key`.
    pub(crate) fn add(&mut self, key: &'static str, message: impl Into<String>) {
        self.0.push(SpecError::new(key, message));
    }

    /// Records the error of a parse, if any, and passes the value on.
    pub(crate) fn take<T>(&mut self, key: &'static str, parsed: Result<T, String>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(message) => {
                self.add(key, message);
                None
            }
        }
    }

    /// `value` when nothing was recorded, else every problem.
    pub(crate) fn finish<T>(self, value: Option<T>) -> Result<T, Vec<SpecError>> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            // A `None` always comes with a recorded problem; say something true if not.
            None if self.0.is_empty() => {
                Err(vec![SpecError::new("provider", "incomplete settings")])
            }
            _ => Err(self.0),
        }
    }
}

/// A `binary` setting: `None` (the provider's default program in `PATH`) or a non-empty path.
pub(crate) fn binary(problems: &mut Problems, binary: Option<String>) -> Option<String> {
    if binary.as_deref().is_some_and(str::is_empty) {
        problems.add(
            "binary",
            "is empty: give the program's path, or leave `binary` out",
        );
    }
    binary.filter(|b| !b.is_empty())
}

/// A non-zero port (`0` names no port a peer can be reached on).
pub(crate) fn port(problems: &mut Problems, key: &'static str, port: u16) -> u16 {
    if port == 0 {
        problems.add(key, "0 is not a valid port (1-65535)");
    }
    port
}

/// A host name (RFC 1123 labels, underscores tolerated for internal names, an optional
/// trailing dot) or an IPv4 address: what cloudflared, the resolver and an SSH server take.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hostname(String);

impl Hostname {
    /// Checks `host`; the error says why not, without quoting the input (callers do).
    pub fn parse(host: &str) -> Result<Hostname, String> {
        if host.is_empty() {
            return Err("the host is empty".to_owned());
        }
        if host.parse::<std::net::Ipv4Addr>().is_ok() {
            return Ok(Hostname(host.to_owned()));
        }
        if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!("`{host}` is not a valid IPv4 address"));
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        if name.len() > 253 {
            return Err("a host name may have at most 253 characters".to_owned());
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(format!("`{host}` has an empty label"));
            }
            if label.len() > 63 {
                return Err(format!("label `{label}` is longer than 63 characters"));
            }
            if let Some(bad) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
            {
                return Err(format!("{bad:?} is not allowed in a host name"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!("label `{label}` starts or ends with `-`"));
            }
        }
        Ok(Hostname(host.to_owned()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_follow_rfc_1123() {
        for good in [
            "ssh.example.com",
            "127.0.0.1",
            "home_box",
            "a-b.c.",
            "localhost",
        ] {
            assert_eq!(
                Hostname::parse(good).map(|h| h.to_string()),
                Ok(good.to_owned())
            );
        }
        let why = |host: &str| Hostname::parse(host).unwrap_err();
        assert_eq!(why(""), "the host is empty");
        assert_eq!(why("300.1.1.1"), "`300.1.1.1` is not a valid IPv4 address");
        assert_eq!(why("a..b"), "`a..b` has an empty label");
        assert_eq!(
            why("https://x.example.com"),
            "':' is not allowed in a host name"
        );
        assert_eq!(
            why("x.example.com/path"),
            "'/' is not allowed in a host name"
        );
        assert_eq!(why("-x.com"), "label `-x` starts or ends with `-`");
        assert!(why(&"a".repeat(64)).contains("longer than 63"));
        assert!(why(&["a"; 128].join(".")).contains("253"));
    }

    #[test]
    fn problems_keep_every_message_once() {
        let mut problems = Problems::default();
        assert_eq!(binary(&mut problems, Some(String::new())), None);
        assert_eq!(port(&mut problems, "port", 0), 0);
        let errors = problems.finish(Some(())).unwrap_err();
        assert_eq!(
            errors.iter().map(|e| e.key).collect::<Vec<_>>(),
            ["binary", "port"]
        );
        assert_eq!(
            errors[1].to_string(),
            "`port`: 0 is not a valid port (1-65535)"
        );
        assert_eq!(Problems::default().finish(Some(7)), Ok(7));
    }
}
