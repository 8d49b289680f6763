//! Configuration: the YAML file operators write, and the resolved settings the daemon runs on.
//!
//! [`load`] and [`parse`] go from text to [`spec::Config`] in three steps: serde_yaml reads the
//! text into [`model::ConfigFile`] (every unknown key is an error), `validate` layers defaults
//! and checks meaning, and `locate` turns the key path of every problem into a line and
//! column. A syntax or type error stops at that one error; semantic problems are all reported
//! together. Either way the result is a [`ConfigError`] whose lines read
//! `FILE:LINE:COLUMN: KEY: MESSAGE`.

pub mod collisions;
pub mod model;
pub mod spec;

mod error;
mod locate;
mod validate;
mod values;

use std::path::Path;

pub use error::{ConfigError, Diagnostic};

use locate::{KeyPath, Locator, Position, Segment};
use model::ConfigFile;

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<spec::Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Reads only `daemon.control_socket` from a config file (the built-in default when it is not
/// set), tolerating errors anywhere else in the file: the CLI needs the daemon's socket
/// exactly when the file is broken. Fails only when the file cannot be read.
pub fn control_socket(path: &Path) -> Result<std::path::PathBuf, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let socket = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(value) => value
            .get("daemon")
            .and_then(|d| d.get("control_socket"))
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_owned),
        // Not even YAML: look for the key by its text.
        Err(_) => scan_control_socket(text),
    };
    Ok(socket
        .unwrap_or_else(|| spec::default::CONTROL_SOCKET.to_owned())
        .into())
}

/// The value of a `control_socket:` key found by its text, block or flow style, for a file
/// that does not parse as YAML at all.
fn scan_control_socket(text: &str) -> Option<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let (_, rest) = line.split_once("control_socket:")?;
            let value = rest.split([',', '}', '#']).next()?.trim();
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            (!value.is_empty()).then(|| value.to_owned())
        })
}

/// Same from a string (path used for messages only) — used by tests, `check`, the demo and the
/// reload path.
pub fn parse(text: &str, path: &Path) -> Result<spec::Config, ConfigError> {
    // Editors do not count a byte-order mark as a column; neither do the diagnostics.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let file: ConfigFile = serde_path_to_error::deserialize(deserializer)
        .map_err(|err| ConfigError::Invalid(vec![serde_diagnostic(text, path, &err)]))?;
    validate::validate(&file, path).map_err(|issues| {
        let locator = Locator::new(text);
        let mut diagnostics: Vec<Diagnostic> = issues
            .into_iter()
            .map(|issue| {
                let at = locator.locate(&issue.path);
                diagnostic(path, at, &issue.path, issue.message)
            })
            .collect();
        // Stable, so issues at one position keep the order validation found them in.
        diagnostics.sort_by_key(|d| (d.line, d.column));
        ConfigError::Invalid(diagnostics)
    })
}

fn diagnostic(file: &Path, at: Position, key: &KeyPath, message: String) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line: at.line,
        column: at.column,
        key: one_line(&key.to_string()),
        message: one_line(&message),
    }
}

/// Escapes line breaks and other control characters, so that every diagnostic stays on one
/// line: a key or value holding a newline must not split a message, or forge another one.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Turns serde's error into a diagnostic: the key path from serde_path_to_error, the position
/// from serde_yaml where it has one that fits, and the message without the path and position
/// serde_yaml already wrote into it.
fn serde_diagnostic(
    text: &str,
    file: &Path,
    err: &serde_path_to_error::Error<serde_yaml::Error>,
) -> Diagnostic {
    let mut path = KeyPath::from(err.path());
    let inner = err.inner();
    let reported = inner.location().map(|location| Position {
        line: location.line(),
        column: location.column(),
    });
    let message = clean_message(&inner.to_string(), reported, &err.path().to_string());
    let locator = Locator::new(text);

    if let Some(field) = quoted_after(&message, "unknown field `") {
        // The path usually ends in the unknown key already; make sure it does.
        if path.segments().last() != Some(&Segment::Key(field.to_owned())) {
            path = path.key(field);
        }
        return diagnostic(file, locator.locate(&path), &path, message);
    }
    if let Some(field) = quoted_after(&message, "missing field `") {
        // Reported at the mapping that lacks it, under the name of the key to add.
        let at = locator.locate(&path);
        let key = path.key(field);
        let message = if is_empty_document(text) {
            "the file is empty: a configuration needs at least `version: 1` and one service"
                .to_owned()
        } else {
            message
        };
        return diagnostic(file, at, &key, message);
    }
    if let Some(field) = quoted_after(&message, "duplicate field `") {
        let at = locator
            .locate_duplicate(&path, field)
            .or(reported)
            .unwrap_or_else(|| locator.locate(&path));
        return diagnostic(file, at, &path.key(field), message);
    }
    let at = reported.unwrap_or_else(|| locator.locate(&path));
    diagnostic(file, at, &path, message)
}

/// The text between `prefix` and the next backtick.
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let start = message.find(prefix)? + prefix.len();
    let rest = message.get(start..)?;
    rest.split('`').next()
}

/// serde_yaml's message minus what the diagnostic already says: the leading key path it adds
/// itself and the trailing "at line L column C"; and with Rust type names replaced by words an
/// operator knows.
fn clean_message(raw: &str, at: Option<Position>, path: &str) -> String {
    let mut message = raw.to_owned();
    if let Some(at) = at {
        let suffix = format!(" at line {} column {}", at.line, at.column);
        if let Some(index) = message.find(&suffix) {
            message.replace_range(index..index + suffix.len(), "");
        }
    }
    // serde_yaml prefixes "PATH: " where PATH is where it was (a prefix of the full path).
    if let Some((head, tail)) = message.split_once(": ") {
        if !head.is_empty() && !head.contains(' ') && path.starts_with(head) {
            message = tail.to_owned();
        }
    }
    if let Some(index) = message.find("expected struct ") {
        let end = message
            .get(index + "expected struct ".len()..)
            .and_then(|rest| rest.find(|c: char| !c.is_alphanumeric() && c != '_'))
            .map_or(message.len(), |len| index + "expected struct ".len() + len);
        message.replace_range(index..end, "expected a mapping");
    }
    // Rust type names mean nothing to an operator.
    for (rust, words) in [
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number of at least 0"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected field identifier", "expected a key name"),
    ] {
        if let Some(head) = message.strip_suffix(rust) {
            message = format!("{head}{words}");
        }
    }
    if message.contains("untagged enum HookCommand") {
        message =
            "expected a command line (a string) or an argv list (a list of strings)".to_owned();
    }
    message
}

/// Whether the text holds no YAML value at all (empty, blank, or only comments).
fn is_empty_document(text: &str) -> bool {
    matches!(
        serde_yaml::from_str::<serde_yaml::Value>(text),
        Ok(serde_yaml::Value::Null)
    )
}

#[cfg(test)]
mod control_socket_tests {
    use super::*;

    fn socket_of(text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tk-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!(
            "{:x}.yaml",
            text.len() * 31 + text.bytes().map(usize::from).sum::<usize>()
        ));
        std::fs::write(&file, text).unwrap();
        let socket = control_socket(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        socket
    }

    #[test]
    fn the_socket_is_read_from_a_file_that_does_not_validate_or_parse() {
        // An unknown key (a typo) elsewhere: valid YAML, invalid config.
        let typo = "version: 1\ndaemon:\n  control_socket: /tmp/a.sock\nservices:\n  - nmae: x\n";
        assert!(parse(typo, Path::new("typo.yaml")).is_err());
        assert_eq!(socket_of(typo), Path::new("/tmp/a.sock"));
        // Not YAML at all (a tab and an unclosed bracket), flow style.
        let broken =
            "daemon: { control_socket: \"/tmp/b.sock\", state_dir: /x }\nservices: [\n\t- x";
        assert!(serde_yaml::from_str::<serde_yaml::Value>(broken).is_err());
        assert_eq!(socket_of(broken), Path::new("/tmp/b.sock"));
        // Not set: the built-in default.
        assert_eq!(
            socket_of("services: []\n"),
            Path::new(spec::default::CONTROL_SOCKET)
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use tunnelkeeper_providers::command::EndpointSource;

    use super::model::{OnFailover, Standby};
    use super::spec::{default, ExtraCheck, ProviderSpec, Reader};
    use super::*;
    use crate::election::{Failback, Mode};

    const MINIMAL: &str = "\
version: 1
services:
  - name: home
    tunnels:
      - { name: lan, provider: direct, address: 127.0.0.1:22 }
";

    fn file() -> PathBuf {
        PathBuf::from("test.yaml")
    }

    fn ok(text: &str) -> spec::Config {
        match parse(text, &file()) {
            Ok(config) => config,
            Err(err) => panic!("expected a valid config, got:\n{err}"),
        }
    }

    fn errors(text: &str) -> Vec<Diagnostic> {
        match parse(text, &file()) {
            Ok(config) => panic!("expected errors, got {config:?}"),
            Err(err) => err.diagnostics().to_vec(),
        }
    }

    /// The single diagnostic of `text`, as `LINE:COLUMN KEY: MESSAGE`.
    fn one_error(text: &str) -> String {
        let diagnostics = errors(text);
        assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
        let d = &diagnostics[0];
        format!("{}:{} {}: {}", d.line, d.column, d.key, d.message)
    }

    #[test]
    fn minimal_config_gets_builtin_defaults() {
        let config = ok(MINIMAL);
        assert_eq!(config.source, file());
        assert_eq!(
            config.daemon.control_socket,
            PathBuf::from(default::CONTROL_SOCKET)
        );
        assert_eq!(config.daemon.state_dir, PathBuf::from(default::STATE_DIR));
        assert_eq!(config.daemon.shutdown_grace, default::SHUTDOWN_GRACE);
        assert!(config.daemon.readers.is_empty());
        assert!(config.nameservers.is_empty());
        let service = &config.services[0];
        assert_eq!(service.name, "home");
        assert_eq!(service.policy.mode, Mode::Priority);
        assert_eq!(service.policy.failback, Failback::Auto);
        assert_eq!(service.policy.tolerance, default::TOLERANCE);
        assert_eq!(service.policy.max_latency, default::MAX_LATENCY);
        assert_eq!(service.policy.failback_hold, default::FAILBACK_HOLD);
        assert_eq!(service.connect_timeout, default::CONNECT_TIMEOUT);
        assert_eq!(service.on_failover, OnFailover::Keep);
        let tunnel = &service.tunnels[0];
        assert_eq!(tunnel.priority, 10);
        assert_eq!(tunnel.standby, Standby::Hot);
        assert_eq!(tunnel.probe.interval, default::PROBE_INTERVAL);
        assert_eq!(tunnel.probe.timeout, default::PROBE_TIMEOUT);
        assert_eq!(tunnel.probe.rise, default::PROBE_RISE);
        assert_eq!(tunnel.probe.fall, default::PROBE_FALL);
        assert_eq!(tunnel.probe.send, None);
        assert_eq!(tunnel.probe.expect, None);
        assert!(tunnel.probe.checks.is_empty());
        assert_eq!(tunnel.restart.initial, default::RESTART_INITIAL);
        assert_eq!(tunnel.restart.max, default::RESTART_MAX);
        assert_eq!(tunnel.restart.multiplier, default::RESTART_MULTIPLIER);
        assert_eq!(tunnel.restart.jitter, default::RESTART_JITTER);
        match &tunnel.provider {
            ProviderSpec::Direct(direct) => assert_eq!(direct.address, "127.0.0.1:22"),
            other => panic!("expected direct, got {other:?}"),
        }
    }

    #[test]
    fn layering_is_field_by_field() {
        let config = ok("\
version: 1
defaults:
  probe: { interval: 4s, timeout: 3s, rise: 5, fall: 6, expect: SSH-2.0 }
  failover: { mode: latency, tolerance: 20ms, failback_hold: 1m }
  restart: { initial: 1s, max: 2m, multiplier: 3.0, jitter: 0.5 }
services:
  - name: svc
    probe: { timeout: 2s, fall: 2, tcp: 127.0.0.1:80 }
    failover: { failback: manual, tolerance: 5ms }
    restart: { max: 30s, jitter: 0.1 }
    tunnels:
      - name: inherits
        provider: direct
        address: 127.0.0.1:22
      - name: overrides
        provider: direct
        address: 127.0.0.1:23
        priority: 5
        probe: { timeout: 1s, rise: 1, expect: 'HTTP/1.1', send: \"GET / HTTP/1.0\\r\\n\\r\\n\" }
        restart: { initial: 250ms, multiplier: 1.5 }
");
        let service = &config.services[0];
        // failover: defaults < service
        assert_eq!(service.policy.mode, Mode::Latency);
        assert_eq!(service.policy.tolerance, Duration::from_millis(5));
        assert_eq!(service.policy.max_latency, default::MAX_LATENCY);
        assert_eq!(service.policy.failback, Failback::Manual);
        assert_eq!(service.policy.failback_hold, Duration::from_secs(60));

        let inherits = &service.tunnels[0];
        assert_eq!(inherits.priority, 10);
        assert_eq!(inherits.probe.interval, Duration::from_secs(4)); // defaults
        assert_eq!(inherits.probe.timeout, Duration::from_secs(2)); // service
        assert_eq!(inherits.probe.rise, 5); // defaults
        assert_eq!(inherits.probe.fall, 2); // service
        assert_eq!(inherits.probe.expect.as_deref(), Some(&b"SSH-2.0"[..]));
        assert_eq!(inherits.probe.send, None);
        assert_eq!(
            inherits.probe.checks,
            vec![ExtraCheck::Tcp("127.0.0.1:80".into())]
        );
        assert_eq!(inherits.restart.initial, Duration::from_secs(1)); // defaults
        assert_eq!(inherits.restart.max, Duration::from_secs(30)); // service
        assert_eq!(inherits.restart.multiplier, 3.0); // defaults
        assert_eq!(inherits.restart.jitter, 0.1); // service

        let overrides = &service.tunnels[1];
        assert_eq!(overrides.priority, 5);
        assert_eq!(overrides.probe.interval, Duration::from_secs(4)); // defaults
        assert_eq!(overrides.probe.timeout, Duration::from_secs(1)); // tunnel
        assert_eq!(overrides.probe.rise, 1); // tunnel
        assert_eq!(overrides.probe.fall, 2); // service
        assert_eq!(overrides.probe.expect.as_deref(), Some(&b"HTTP/1.1"[..]));
        assert_eq!(
            overrides.probe.send.as_deref(),
            Some(&b"GET / HTTP/1.0\r\n\r\n"[..])
        );
        assert_eq!(overrides.restart.initial, Duration::from_millis(250)); // tunnel
        assert_eq!(overrides.restart.max, Duration::from_secs(30)); // service
        assert_eq!(overrides.restart.multiplier, 1.5); // tunnel
        assert_eq!(overrides.restart.jitter, 0.1); // service
    }

    #[test]
    fn default_priority_follows_position() {
        let config = ok("\
version: 1
services:
  - name: s
    tunnels:
      - { name: a, provider: direct, address: 127.0.0.1:1 }
      - { name: b, provider: direct, address: 127.0.0.1:2, priority: 1 }
      - { name: c, provider: direct, address: 127.0.0.1:3 }
");
        let priorities: Vec<i64> = config.services[0]
            .tunnels
            .iter()
            .map(|t| t.priority)
            .collect();
        assert_eq!(priorities, vec![10, 1, 30]);
    }

    #[test]
    fn command_tunnel_resolves_into_its_spec() {
        let config = ok(r#"
version: 1
daemon:
  readers: [uid:1000, gid:4, user:root, group:root]
dns:
  nameservers: [127.0.0.53, "::1"]
services:
  - name: s
    hooks:
      - { on: [primary_changed], run: "echo $TK_EVENT" }
      - { on: [tunnel_up, tunnel_down], run: [/bin/true, x], timeout: 2s }
    tunnels:
      - name: bore
        provider: command
        run: [bore, local, "22", --to, relay.example.com]
        endpoint_regex: 'listening at ([^\s]+)'
        start_timeout: 20s
        env: { B: "2", A: "1" }
      - name: socat
        provider: command
        run: [socat, TCP-LISTEN:2200, TCP:127.0.0.1:22]
        endpoint: 127.0.0.1:2200
        stop_grace: 1s
"#);
        assert_eq!(
            config.daemon.readers,
            vec![
                Reader::Uid(1000),
                Reader::Gid(4),
                Reader::Uid(0),
                Reader::Gid(0)
            ]
        );
        assert_eq!(config.nameservers.len(), 2);
        let service = &config.services[0];
        assert_eq!(
            service.hooks[0].argv,
            vec!["/bin/sh", "-c", "echo $TK_EVENT"]
        );
        assert_eq!(service.hooks[0].timeout, default::HOOK_TIMEOUT);
        assert_eq!(service.hooks[1].argv, vec!["/bin/true", "x"]);
        assert_eq!(service.hooks[1].timeout, Duration::from_secs(2));
        let ProviderSpec::Command(bore) = &service.tunnels[0].provider else {
            panic!("expected command");
        };
        assert_eq!(bore.run[0], "bore");
        assert!(
            matches!(&bore.endpoint, EndpointSource::Regex(re) if re.as_str() == r"listening at ([^\s]+)")
        );
        assert_eq!(
            bore.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(bore.start_timeout, Duration::from_secs(20));
        assert_eq!(bore.stop_grace, default::STOP_GRACE);
        let ProviderSpec::Command(socat) = &service.tunnels[1].provider else {
            panic!("expected command");
        };
        assert!(matches!(&socat.endpoint, EndpointSource::Fixed(e) if e == "127.0.0.1:2200"));
        assert_eq!(socat.start_timeout, default::START_TIMEOUT);
        assert_eq!(socat.stop_grace, Duration::from_secs(1));
        assert!(socat.env.is_empty());
    }

    #[test]
    fn serde_errors_carry_path_and_position() {
        let text = "version: 1\nservices:\n  - name: a\n    bogus: 1\n";
        assert_eq!(
            one_error(text),
            "4:5 services[0].bogus: unknown field `bogus`, expected one of `name`, `listen`, \
             `connect_timeout`, `on_failover`, `retries`, `max_connections`, `idle_timeout`, \
             `replay_unanswered`, `standby`, `failover`, `probe`, `restart`, `hooks`, `tunnels`"
        );
        let text = "version: 1\nservices:\n  - name: a\n    tunnels:\n      - { name: x, provider: wireguard }\n";
        let error = one_error(text);
        assert!(
            error.starts_with("5:30 services[0].tunnels[0].provider: unknown variant `wireguard`"),
            "{error}"
        );
        let text = "version: 1\nservices:\n  - name: a\n    probe: { interval: 5 parsecs }\n";
        let error = one_error(text);
        assert!(
            error.starts_with(
                "4:24 services[0].probe.interval: invalid value: string \"5 parsecs\""
            ),
            "{error}"
        );
        let text = "version: 1\nservices:\n  - tunnels: []\n";
        assert_eq!(
            one_error(text),
            "3:5 services[0].name: missing field `name`"
        );
        let text = "version: 1\nservices:\n  - name: a\n    probe: 5\n";
        assert_eq!(
            one_error(text),
            "4:12 services[0].probe: invalid type: integer `5`, expected a mapping"
        );
        let text =
            "version: 1\nservices:\n  - name: a\n    hooks: [{ on: [tunnel_up], run: {a: 1} }]\n";
        let error = one_error(text);
        assert!(error.starts_with("4:13 services[0].hooks[0]"), "{error}");
        assert!(
            error.ends_with(
                "expected a command line (a string) or an argv list (a list of strings)"
            ),
            "{error}"
        );
        let text = "version: 1\nservices: []\nversion: 2\n";
        assert_eq!(one_error(text), "3:1 version: duplicate field `version`");
    }

    #[test]
    fn empty_and_non_yaml_files() {
        for empty in ["", "\n\n", "# just a comment\n"] {
            assert_eq!(
                one_error(empty),
                "1:1 version: the file is empty: a configuration needs at least `version: 1` \
                 and one service"
            );
        }
        let error = one_error("version: 1\nservices: [\n");
        assert_eq!(
            error,
            "3:1 services: did not find expected node content, while parsing a flow node"
        );
        let error = one_error("just some words");
        assert_eq!(
            error,
            "1:1 (root): invalid type: string \"just some words\", expected a mapping"
        );
        let error = one_error("\u{0}\u{1}binary");
        assert!(error.starts_with("1:1 (root): "), "{error}");
    }

    #[test]
    fn all_semantic_errors_are_reported_in_file_order() {
        let text = "\
version: 2
services:
  - name: bad name
    tunnels:
      - { name: a, provider: direct, address: 127.0.0.1:70000 }
      - { name: a, provider: command, run: [] , endpoint: x }
";
        let diagnostics = errors(text);
        let found: Vec<String> = diagnostics
            .iter()
            .map(|d| format!("{}:{} {}", d.line, d.column, d.key))
            .collect();
        assert_eq!(
            found,
            vec![
                "1:1 version",
                "3:5 services[0].name",
                "5:38 services[0].tunnels[0].address",
                "6:11 services[0].tunnels[1].name",
                "6:39 services[0].tunnels[1].run",
                "6:49 services[0].tunnels[1].endpoint",
            ],
            "{diagnostics:#?}"
        );
        let rendered = ConfigError::Invalid(diagnostics).to_string();
        assert_eq!(rendered.lines().count(), 6);
        assert!(rendered.starts_with("test.yaml:1:1: version: unsupported version 2"));
    }

    #[test]
    fn inherited_timeout_names_the_tunnel_and_the_other_side() {
        let text = "\
version: 1
defaults:
  probe: { timeout: 2s }
services:
  - name: s
    tunnels:
      - { name: a, provider: direct, address: 127.0.0.1:1, probe: { interval: 1500ms } }
";
        assert_eq!(
            one_error(text),
            "3:12 defaults.probe.timeout: probe timeout 2s is longer than the probe interval \
             1s 500ms for tunnel `a` of service `s` (interval set at \
             services[0].tunnels[0].probe.interval): a probe must end before the next one starts"
        );
    }

    #[test]
    fn provider_specs_compare_secrets_too() {
        let text = |secret: &str, regex: &str| {
            format!(
                "version: 1\nservices:\n  - name: s\n    tunnels:\n      - name: c\n        \
                 provider: command\n        run: [prog]\n        endpoint_regex: '{regex}'\n        \
                 env: {{ TOKEN: {secret} }}\n"
            )
        };
        let tunnel =
            |secret: &str, regex: &str| ok(&text(secret, regex)).services[0].tunnels[0].clone();
        assert_eq!(tunnel("a", "at (\\S+)"), tunnel("a", "at (\\S+)"));
        // Debug masks env values; a rotated secret must still count as a change.
        assert_ne!(tunnel("a", "at (\\S+)"), tunnel("b", "at (\\S+)"));
        assert_ne!(tunnel("a", "at (\\S+)"), tunnel("a", "on (\\S+)"));
    }

    #[test]
    fn load_reads_files_and_reports_unreadable_ones() {
        let dir = std::env::temp_dir().join(format!("tk-config-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let good = dir.join("good.yaml");
        std::fs::write(&good, MINIMAL).expect("write temp file");
        assert!(load(&good).is_ok());
        let missing = dir.join("missing.yaml");
        let err = load(&missing).expect_err("missing file");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}: ", missing.display())),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ngrok_token_copy_goes_to_the_runtime_dir_and_cloudflare_access_takes_a_service_token() {
        let config = ok(r#"
version: 1
daemon: { control_socket: /run/tk-test/control.sock, state_dir: /var/lib/tk-test }
services:
  - name: home
    tunnels:
      - name: ng
        provider: ngrok
        to: 127.0.0.1:22
        authtoken_file: /etc/tk/ngrok
        reconnect_grace: 45s
      - name: cf
        provider: cloudflare
        mode: access
        hostname: ssh.example.com
        service_token_id_file: /etc/tk/cf_id
        service_token_secret_file: /etc/tk/cf_secret
"#);
        let service = &config.services[0];
        let ProviderSpec::Ngrok(ngrok) = &service.tunnels[0].provider else {
            panic!("expected ngrok");
        };
        assert_eq!(ngrok.config_dir, PathBuf::from("/run/tk-test/ngrok"));
        assert_eq!(
            ngrok.old_config_dirs,
            [PathBuf::from("/var/lib/tk-test/ngrok")]
        );
        assert_eq!(ngrok.reconnect_grace, Duration::from_secs(45));
        let ProviderSpec::Cloudflare(cf) = &service.tunnels[1].provider else {
            panic!("expected cloudflare");
        };
        assert_eq!(
            cf.service_token,
            Some((
                PathBuf::from("/etc/tk/cf_id"),
                PathBuf::from("/etc/tk/cf_secret")
            ))
        );
        let only_one = errors(
            r#"
version: 1
services:
  - name: home
    tunnels:
      - name: cf
        provider: cloudflare
        mode: access
        hostname: ssh.example.com
        service_token_id_file: /etc/tk/cf_id
"#,
        );
        assert_eq!(only_one.len(), 1, "{only_one:#?}");
        assert!(
            only_one[0].message.contains("service_token_secret_file"),
            "{only_one:#?}"
        );
    }
}
