//! cloudflared's command line and output: the argv of each mode, the `--grace-period` it gets,
//! and reading its log lines (the quick tunnel's banner, the line that says why it failed).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::CloudflareMode;
use crate::process::ExitInfo;
use crate::util::quote;

/// cloudflared's own ceiling for `--grace-period`.
const MAX_GRACE_PERIOD: Duration = Duration::from_secs(180);
/// Room left between cloudflared's grace period and our `SIGKILL`, at most.
const GRACE_MARGIN: Duration = Duration::from_secs(1);

/// cloudflared's `--grace-period` for a tunnel stopped with `stop_grace`: just below it (a
/// quarter of it, at most a second, kept for cloudflared to exit), and within cloudflared's
/// 3 minute ceiling.
pub fn grace_period(stop_grace: Duration) -> Duration {
    let margin = GRACE_MARGIN.min(stop_grace / 4);
    stop_grace.saturating_sub(margin).min(MAX_GRACE_PERIOD)
}

/// A duration as Go's `time.ParseDuration` reads it: milliseconds.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The command line, with `local` as the metrics address (tunnel) or the listener (access)
/// and `grace` as the drain time on `SIGTERM` (tunnel modes; `access` has no such flag).
pub(super) fn argv(
    mode: &CloudflareMode,
    binary: &str,
    local: SocketAddr,
    grace: Duration,
) -> Vec<String> {
    let mut argv = vec![binary.to_string()];
    // The flags both tunnel modes take, before their own.
    let tunnel = |argv: &mut Vec<String>| {
        argv.extend([
            "tunnel".into(),
            "--no-autoupdate".into(),
            "--metrics".into(),
            local.to_string(),
            "--grace-period".into(),
            go_duration(grace),
        ]);
    };
    match mode {
        CloudflareMode::Named { token_file, .. } => {
            tunnel(&mut argv);
            // The path, not the token: cloudflared reads the file itself (never argv).
            argv.extend([
                "run".into(),
                "--token-file".into(),
                token_file.display().to_string(),
            ]);
        }
        CloudflareMode::Quick { url } => {
            tunnel(&mut argv);
            argv.extend(["--url".into(), url.clone()]);
        }
        CloudflareMode::Access { hostname, .. } => argv.extend([
            "access".into(),
            "tcp".into(),
            "--hostname".into(),
            hostname.to_string(),
            "--url".into(),
            local.to_string(),
        ]),
    }
    argv
}

/// The hostname in a quick-tunnel banner line (`|  https://<words>.trycloudflare.com  |`).
pub(super) fn banner_hostname(line: &str) -> Option<String> {
    let start = line.find("https://")? + "https://".len();
    let host: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    host.ends_with(".trycloudflare.com").then_some(host)
}

/// How cloudflared ended (`when` says when, if that matters), with the line that best says why.
pub(super) fn describe_exit(info: &ExitInfo, lines: &[String], when: &str) -> String {
    let line = telling_line(lines);
    let mut text = format!("cloudflared {info}{when}; last log line: {}", quote(line));
    if line.is_some_and(|l| l.contains("flag provided but not defined: -token-file")) {
        text.push_str(" (this cloudflared predates `--token-file`: upgrade it)");
    }
    text
}

/// The output line that best explains a failure. cloudflared ends a usage error with a
/// "See 'cloudflared ... --help'." hint, an unknown flag with a page of help after the
/// "Incorrect Usage:" line, and a dying tunnel often with info lines after the error.
pub(super) fn telling_line(lines: &[String]) -> Option<&str> {
    if let Some(usage) = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Incorrect Usage:"))
    {
        return Some(usage);
    }
    let last = lines
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty() && !is_help_hint(l))?;
    if matches!(level(last), Some(Level::Quiet)) {
        if let Some(error) = lines
            .iter()
            .rev()
            .find(|l| matches!(level(l), Some(Level::Error)))
        {
            return Some(error);
        }
    }
    Some(last)
}

fn is_help_hint(line: &str) -> bool {
    line.starts_with("See 'cloudflared ") && line.ends_with("--help'.")
}

/// The two kinds of log level that matter when picking a reason.
enum Level {
    /// Debug, info, warning.
    Quiet,
    /// Error, fatal, panic.
    Error,
}

/// The level of a cloudflared log line: text (`<time> INF ...`) or JSON (`"level":"info"`).
fn level(line: &str) -> Option<Level> {
    let word = if line.starts_with('{') {
        serde_json::from_str::<Value>(line)
            .ok()?
            .get("level")?
            .as_str()?
            .to_ascii_lowercase()
    } else {
        line.split_whitespace().nth(1)?.to_ascii_lowercase()
    };
    match word.as_str() {
        "dbg" | "inf" | "wrn" | "debug" | "info" | "warn" => Some(Level::Quiet),
        "err" | "ftl" | "error" | "fatal" | "panic" => Some(Level::Error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cloudflare::DEFAULT_STOP_GRACE;
    use crate::spec::Hostname;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn grace_period_stays_below_the_stop_grace() {
        assert_eq!(grace_period(Duration::from_secs(5)), Duration::from_secs(4));
        assert_eq!(
            grace_period(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            grace_period(Duration::from_millis(400)),
            Duration::from_millis(300)
        );
        assert_eq!(grace_period(Duration::from_secs(600)), MAX_GRACE_PERIOD);
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn banner_line_yields_the_hostname() {
        let line = "2026-11-20T10:15:02Z INF |  https://fancy-river-sound-example.trycloudflare.com                                       |";
        assert_eq!(
            banner_hostname(line).as_deref(),
            Some("fancy-river-sound-example.trycloudflare.com")
        );
        assert_eq!(banner_hostname("INF Visit https://example.com/"), None);
    }

    #[test]
    fn telling_line_skips_help_and_prefers_errors() {
        let usage = lines(&[
            "Provided Tunnel token is not valid.",
            "See 'cloudflared tunnel run --help'.",
        ]);
        assert_eq!(
            telling_line(&usage),
            Some("Provided Tunnel token is not valid.")
        );
        let flag = lines(&[
            "Incorrect Usage: flag provided but not defined: -token-file",
            "",
            "NAME:",
            "   cloudflared tunnel run - Proxy a local web server by running the given tunnel",
        ]);
        assert_eq!(
            telling_line(&flag),
            Some("Incorrect Usage: flag provided but not defined: -token-file")
        );
        let runtime = lines(&[
            "2026-11-20T10:15:02Z INF Starting tunnel tunnelID=x",
            "2026-11-20T10:15:03Z ERR Unable to establish connection with Cloudflare edge",
            "2026-11-20T10:15:03Z INF Retrying connection in up to 1s",
        ]);
        assert_eq!(
            telling_line(&runtime),
            Some("2026-11-20T10:15:03Z ERR Unable to establish connection with Cloudflare edge")
        );
        let json = lines(&[
            r#"{"level":"error","message":"boom","time":"t"}"#,
            r#"{"level":"info","message":"bye","time":"t"}"#,
        ]);
        assert_eq!(telling_line(&json), Some(json[0].as_str()));
        assert_eq!(telling_line(&[]), None);
    }

    #[test]
    fn command_lines_are_the_documented_ones() {
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 20241));
        let grace = grace_period(DEFAULT_STOP_GRACE);
        let named = CloudflareMode::Named {
            token_file: "/etc/tk/cf".into(),
            hostname: Hostname::parse("h").expect("host"),
        };
        assert_eq!(
            argv(&named, "cloudflared", local, grace).join(" "),
            "cloudflared tunnel --no-autoupdate --metrics 127.0.0.1:20241 --grace-period 4000ms run --token-file /etc/tk/cf"
        );
        let quick = CloudflareMode::Quick {
            url: "http://localhost:8080".into(),
        };
        assert_eq!(
            argv(&quick, "cloudflared", local, grace).join(" "),
            "cloudflared tunnel --no-autoupdate --metrics 127.0.0.1:20241 --grace-period 4000ms --url http://localhost:8080"
        );
        let access = CloudflareMode::Access {
            hostname: Hostname::parse("ssh.example.com").expect("host"),
            service_token: None,
        };
        assert_eq!(
            argv(&access, "cloudflared", local, grace).join(" "),
            "cloudflared access tcp --hostname ssh.example.com --url 127.0.0.1:20241"
        );
    }
}
