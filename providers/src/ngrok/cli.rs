//! The agent's command line and its JSON log: what each line means to the provider, and the
//! task that follows the log for the tunnel's life.

use std::path::Path;

use serde_json::Value;
use tokio::sync::watch;

use crate::process::Lines;

use super::*;

/// The exact command line: `ngrok <proto> <to> --config <file> --log stdout --log-format json`,
/// `--inspect=false` for http (no captured requests for local users to read through the API),
/// then `--url` and `--region` when set.
pub(super) fn command_line(spec: &NgrokSpec, config: &Path) -> Vec<String> {
    let mut argv = vec![
        spec.binary().to_string(),
        spec.proto.as_str().to_string(),
        spec.to.clone(),
        "--config".to_string(),
        config.display().to_string(),
        "--log".to_string(),
        "stdout".to_string(),
        "--log-format".to_string(),
        "json".to_string(),
    ];
    if spec.proto == NgrokProto::Http {
        argv.push("--inspect=false".to_string());
    }
    if let Some(url) = &spec.url {
        argv.push("--url".to_string());
        argv.push(url.clone());
    }
    if let Some(region) = &spec.region {
        argv.push("--region".to_string());
        argv.push(region.clone());
    }
    argv
}

/// What the agent's log has said so far.
#[derive(Debug, Clone, Default)]
pub(super) struct LogState {
    /// The `url` of the first `started tunnel` line.
    pub(super) url: Option<String>,
    /// The `err` (or, lacking one, the `msg`) of the latest `eror`/`crit` line.
    pub(super) error: Option<String>,
    /// How many `eror`/`crit` lines there were: a new one restarts the reconnect watch.
    pub(super) errors: u64,
}

/// One log line's meaning to the provider.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LogEvent {
    /// `started tunnel` with its public URL.
    Started(String),
    /// `lvl` `eror` or `crit`: the reason.
    Failure(String),
}

/// Reads one line of `--log-format json` output. Lines that are not JSON objects (the
/// `ERROR:` lines the CLI prints on stderr) mean nothing here.
pub(super) fn parse_log_line(line: &str) -> Option<LogEvent> {
    let value: Value = serde_json::from_str(line.trim()).ok()?;
    let record = value.as_object()?;
    let text = |key: &str| record.get(key).and_then(Value::as_str);
    match text("lvl") {
        Some("eror" | "crit") => {
            let reason = text("err")
                .or_else(|| text("msg"))
                .unwrap_or("an error without `err`");
            Some(LogEvent::Failure(reason.to_string()))
        }
        _ if text("msg") == Some("started tunnel") => text("url")
            .filter(|url| !url.is_empty())
            .map(|url| LogEvent::Started(url.to_string())),
        _ => None,
    }
}

/// Follows the agent's output for the tunnel's whole life, publishing what it learns. Ends
/// when the agent closes its output (it exited), which drops the sender.
pub(super) async fn follow_log(mut lines: Lines, state: watch::Sender<LogState>) {
    while let Some(line) = lines.next().await {
        match parse_log_line(&line.text) {
            Some(LogEvent::Started(url)) => {
                state.send_if_modified(|s| set_once(&mut s.url, url));
            }
            Some(LogEvent::Failure(reason)) => {
                // Not a verdict: the agent reconnects by itself after most errors.
                state.send_modify(|s| {
                    s.error = Some(reason);
                    s.errors += 1;
                });
            }
            None => {}
        }
    }
}

/// Sets `slot` unless it already holds a value; returns whether it changed.
pub(super) fn set_once(slot: &mut Option<String>, value: String) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(value);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = include_str!("../../tests/fixtures/ngrok/log-json.ndjson");
    const LOG_ERROR: &str = include_str!("../../tests/fixtures/ngrok/log-json-error.ndjson");

    #[test]
    fn log_fixtures_give_the_url_and_the_error() {
        let events: Vec<LogEvent> = LOG.lines().filter_map(parse_log_line).collect();
        assert_eq!(
            events,
            [LogEvent::Started("tcp://0.tcp.ngrok.io:53476".to_string())]
        );
        let events: Vec<LogEvent> = LOG_ERROR.lines().filter_map(parse_log_line).collect();
        assert_eq!(
            events,
            [LogEvent::Failure(
                "authentication failed: The authtoken you specified does not look like a proper ngrok tunnel authtoken."
                    .to_string()
            )]
        );
        assert_eq!(
            parse_log_line(r#"{"lvl":"crit","msg":"panic"}"#),
            Some(LogEvent::Failure("panic".to_string()))
        );
        assert_eq!(parse_log_line("ERROR:  authentication failed"), None);
        assert_eq!(parse_log_line(r#"{"lvl":"warn","err":"x"}"#), None);
    }
}
