//! Checks of single values: names, principals, host names, `host:port`, URLs, regexes.
//!
//! Each function takes the text as written and says precisely why it is not acceptable, without
//! quoting the whole input (callers add the key and the value).

use std::net::Ipv6Addr;

use nix::unistd::{Group, User};
use regex_lite::Regex;
use tunnelkeeper_providers::spec::Hostname;

use super::spec::Reader;

/// Names end up in URLs (`/v1/services/NAME/pin`), environment variables and file names, so
/// only a conservative character set is allowed.
pub(super) fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "`{name}` cannot be a {what} name: it means a directory in URLs and paths"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{what} name `{name}` contains {bad:?}: names may only use letters, digits, `_`, \
             `.` and `-` (they appear in URLs and environment variables)"
        ));
    }
    Ok(())
}

/// `uid:N`, `gid:N`, `user:NAME` or `group:NAME`; names are resolved now so a typo fails
/// `check` rather than silently locking someone out.
pub(super) fn parse_reader(text: &str) -> Result<Reader, String> {
    let expected = "expected uid:N, gid:N, user:NAME or group:NAME";
    let Some((kind, value)) = text.split_once(':') else {
        return Err(format!("`{text}` is not a reader: {expected}"));
    };
    let number = |what: &str| {
        value
            .parse::<u32>()
            .map_err(|_| format!("`{value}` in `{text}` is not a numeric {what}"))
    };
    match kind {
        "uid" => number("uid").map(Reader::Uid),
        "gid" => number("gid").map(Reader::Gid),
        "user" if value.is_empty() => Err(format!("`{text}` names no user")),
        "group" if value.is_empty() => Err(format!("`{text}` names no group")),
        "user" => match User::from_name(value) {
            Ok(Some(user)) => Ok(Reader::Uid(user.uid.as_raw())),
            Ok(None) => Err(format!("unknown user `{value}` in `{text}`")),
            Err(errno) => Err(format!("cannot look up user `{value}`: {errno}")),
        },
        "group" => match Group::from_name(value) {
            Ok(Some(group)) => Ok(Reader::Gid(group.gid.as_raw())),
            Ok(None) => Err(format!("unknown group `{value}` in `{text}`")),
            Err(errno) => Err(format!("cannot look up group `{value}`: {errno}")),
        },
        _ => Err(format!(
            "`{kind}` in `{text}` is not a reader kind: {expected}"
        )),
    }
}

/// A host name (RFC 1123 labels, underscores tolerated for internal names) or an IPv4
/// address, by the providers crate's one rule. Says why not, without quoting the input
/// (callers do).
pub(super) fn check_hostname(host: &str) -> Result<(), String> {
    Hostname::parse(host).map(drop)
}

/// `host:port` where host is a name, an IPv4 address or a bracketed IPv6 address.
pub(super) fn check_host_port(text: &str) -> Result<(), String> {
    let port = if let Some(rest) = text.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err(format!("`{text}` is not host:port: `]` is missing"));
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!("`{ip}` in `{text}` is not an IPv6 address"));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!(
                "`{text}` has no port: expected [IPv6]:port, e.g. [::1]:22"
            ));
        };
        port
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("`{text}` has no port: expected host:port"));
        };
        if host.contains(':') {
            return Err(format!(
                "`{text}`: an IPv6 address must be written in brackets, e.g. [::1]:22"
            ));
        }
        check_hostname(host).map_err(|why| format!("`{text}` is not host:port: {why}"))?;
        port
    };
    check_port(port, text)
}

/// A listener address: an absolute path is a Unix socket, anything else must be an IP address
/// with a port (`127.0.0.1:2222`, `[::1]:2222`) — a listener binds, so a name would be ambiguous.
pub(super) fn parse_listen(text: &str) -> Result<super::spec::ListenAddress, String> {
    use super::spec::ListenAddress;
    if text.starts_with('/') {
        return if text.len() > 107 {
            Err(format!(
                "`{text}` is longer than a Unix socket path may be (107 bytes)"
            ))
        } else {
            Ok(ListenAddress::Unix(text.into()))
        };
    }
    match text.parse::<std::net::SocketAddr>() {
        Ok(addr) => Ok(ListenAddress::Tcp(addr)),
        Err(_) => Err(format!(
            "`{text}` is not an IP address with a port (e.g. 127.0.0.1:2222 or [::1]:2222) nor \
             an absolute Unix socket path"
        )),
    }
}

/// The `bind` of a remote forward: `host:port` where port 0 asks the server to pick one.
pub(super) fn check_bind_address(text: &str) -> Result<(), String> {
    match text.rsplit_once(':') {
        Some((host, "0")) => {
            check_host_port(&format!("{host}:1")).map_err(|e| e.replace(":1`", ":0`"))
        }
        _ => check_host_port(text),
    }
}

/// A secret file path: `$CREDENTIALS_DIRECTORY/NAME` (or `${CREDENTIALS_DIRECTORY}/NAME`) is
/// expanded from the environment systemd sets for `LoadCredential=`, so tokens and keys need
/// not be readable by anyone but the service.
pub(super) fn credential_path(path: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let text = path.to_string_lossy();
    let rest = text
        .strip_prefix("$CREDENTIALS_DIRECTORY/")
        .or_else(|| text.strip_prefix("${CREDENTIALS_DIRECTORY}/"));
    let Some(rest) = rest else {
        return Ok(path.to_path_buf());
    };
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Ok(std::path::Path::new(&dir).join(rest)),
        None => Err(format!(
            "`{text}` names a systemd credential, but $CREDENTIALS_DIRECTORY is not set (add \
             LoadCredential= to the unit, or use a plain path)"
        )),
    }
}

/// A decimal port 1-65535; `whole` is the address it came from, for the message.
pub(super) fn check_port(port: &str, whole: &str) -> Result<(), String> {
    if port.is_empty() {
        return Err(format!("`{whole}` has an empty port"));
    }
    if !port.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("port `{port}` in `{whole}` is not a number"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "port {port} in `{whole}` is out of range (1-65535)"
        )),
    }
}

/// An `http://` URL with a host and an optional port. https is refused with a reason rather
/// than as a malformed URL: the probe has no TLS client yet.
pub(super) fn check_http_url(url: &str) -> Result<(), String> {
    let scheme_is = |scheme: &str| {
        url.get(..scheme.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
    };
    if scheme_is("https://") {
        return Err(format!(
            "`{url}`: https is not supported by the http probe (only http:// URLs); check TLS \
             endpoints with an `exec` probe such as curl instead"
        ));
    }
    if !scheme_is("http://") {
        return Err(format!("`{url}` is not an http:// URL"));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(format!("`{url}` contains whitespace"));
    }
    let rest = url.get("http://".len()..).unwrap_or_default();
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!("`{url}`: credentials in the URL are not supported"));
    }
    if authority.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    // With no port after the host, check it as if the default port had been written.
    let has_port = match authority.rfind(']') {
        Some(bracket) => authority
            .get(bracket + 1..)
            .is_some_and(|s| s.starts_with(':')),
        None => authority.contains(':'),
    };
    let with_port = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    check_host_port(&with_port)
        .map_err(|_| format!("`{url}` does not have a valid host[:port] (`{authority}`)"))
}

/// Compiles `endpoint_regex` and makes sure it can actually yield an endpoint: the provider
/// takes the first capture group (or the whole match without one) of the first matching output
/// line, so a pattern that matches an empty line would take any line, even a blank one.
pub(super) fn compile_endpoint_regex(pattern: &str) -> Result<Regex, String> {
    let regex = Regex::new(pattern).map_err(|err| {
        // regex's syntax errors span several lines (pattern, caret, reason); a diagnostic is
        // one line, and the reason is the useful part.
        let text = err.to_string();
        let reason = text
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("invalid")
            .trim()
            .trim_start_matches("error: ")
            .to_owned();
        format!("`{pattern}` is not a valid regex: {reason}")
    })?;
    if regex.is_match("") {
        return Err(format!(
            "`{pattern}` matches an empty line, so any line of output would be taken for the \
             endpoint"
        ));
    }
    Ok(regex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("home-ssh_1.a", "service").is_ok());
        assert!(check_name("", "service").is_err());
        assert!(check_name("..", "service").is_err());
        let err = check_name("a b", "tunnel").unwrap_err();
        assert!(err.contains("' '"), "{err}");
    }

    #[test]
    fn host_port() {
        for ok in [
            "127.0.0.1:22",
            "localhost:1",
            "relay.example.com:65535",
            "[::1]:8080",
            "[2001:db8::1]:22",
            "my_host.lan.:22",
        ] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for (bad, needle) in [
            ("127.0.0.1", "no port"),
            ("127.0.0.1:70000", "out of range"),
            ("127.0.0.1:0", "out of range"),
            ("127.0.0.1:", "empty port"),
            ("host:ssh", "not a number"),
            ("::1:22", "brackets"),
            ("[::1]", "no port"),
            ("[::1:22", "`]` is missing"),
            ("[nope]:22", "not an IPv6"),
            ("300.1.1.1:22", "IPv4"),
            ("bad host:22", "not allowed"),
            (":22", "empty"),
            ("-a.example.com:22", "starts or ends"),
            ("a..b:22", "empty label"),
        ] {
            let err = check_host_port(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn http_urls() {
        for ok in [
            "http://127.0.0.1:8080/health",
            "http://example.com",
            "HTTP://example.com/?q=1",
            "http://[::1]/x",
            "http://[::1]:81",
        ] {
            assert_eq!(check_http_url(ok), Ok(()), "{ok}");
        }
        for (bad, needle) in [
            ("https://example.com/", "https is not supported"),
            ("ftp://example.com/", "not an http://"),
            ("http://", "no host"),
            ("http://u:p@example.com/", "credentials"),
            ("http://example.com:99999/", "valid host"),
            ("http://exa mple.com/", "whitespace"),
            ("é", "not an http://"),
        ] {
            let err = check_http_url(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn endpoint_regexes() {
        assert!(compile_endpoint_regex(r"listening at ([^\s]+)").is_ok());
        let err = compile_endpoint_regex("(unclosed").unwrap_err();
        assert!(
            err.contains("not a valid regex") && !err.contains('\n'),
            "{err}"
        );
        assert!(compile_endpoint_regex(r"[a-z.]+:\d+").is_ok());
        assert!(compile_endpoint_regex(r"(\S*)")
            .unwrap_err()
            .contains("empty line"));
    }

    #[test]
    fn readers() {
        assert_eq!(parse_reader("uid:1000"), Ok(Reader::Uid(1000)));
        assert_eq!(parse_reader("gid:0"), Ok(Reader::Gid(0)));
        assert_eq!(parse_reader("user:root"), Ok(Reader::Uid(0)));
        assert_eq!(parse_reader("group:root"), Ok(Reader::Gid(0)));
        assert!(parse_reader("uid:abc").unwrap_err().contains("numeric uid"));
        assert!(parse_reader("user:no-such-user-tk")
            .unwrap_err()
            .contains("unknown user"));
        assert!(parse_reader("group:no-such-group-tk")
            .unwrap_err()
            .contains("unknown group"));
        assert!(parse_reader("admin").unwrap_err().contains("not a reader"));
        assert!(parse_reader("role:x")
            .unwrap_err()
            .contains("not a reader kind"));
        assert!(parse_reader("user:").unwrap_err().contains("names no user"));
        assert!(parse_reader("user:a\0b")
            .unwrap_err()
            .contains("unknown user"));
    }
}
