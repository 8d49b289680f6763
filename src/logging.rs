//! Logging: `tracing` events to stderr as human text, JSON lines, or journald's stderr protocol.
//!
//! The filter comes from `$TUNNELKEEPER_LOG`, else `$RUST_LOG`, else `info`: a default level
//! and per-target levels, e.g. `info,tunnelkeeper::probe=debug` (`tracing-subscriber`'s
//! `Targets`; a target without a default level leaves the others at `info`). Span and field
//! directives of `EnvFilter` are not taken: they would cost the daemon a regex engine. `TUNNELKEEPER_LOG` exists because child
//! processes inherit the environment: `RUST_LOG=debug` would also make Rust-written tunnel
//! clients (such as `bore`) verbose, `TUNNELKEEPER_LOG=debug` affects only the daemon.
//!
//! Formats (`--log-format`):
//! - `text`: the human `tracing-subscriber` format, with colours only when stderr is a terminal;
//! - `json`: one JSON object a line with `timestamp`, `level`, `target`, `message` and every
//!   field of the event and of its spans at the top level;
//! - `journal`: what journald parses from a service's stderr: each line starts with the syslog
//!   priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace) so `journalctl -p`
//!   filters by level; no colours and no timestamp (journald records its own); fields as
//!   `key=value`;
//! - `auto` (default): `journal` when stderr is the journal stream systemd announced in
//!   `$JOURNAL_STREAM` (its `device:inode` is compared with stderr's, as systemd.exec(5)
//!   recommends), else `text`.
//!
//! Bus events (target `tunnelkeeper::event`) carry their JSON in the [`EVENT_FIELDS`] field:
//! the JSON format flattens it into the line (every event field a top-level key, the message
//! the event type), the text formats leave it out, their message already says `TYPE key=value`
//! with only the fields the event has.

use std::fmt::Write as _;
use std::io::IsTerminal;

use anyhow::Context as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{DefaultVisitor, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

/// The environment variable read first for the log filter (then `RUST_LOG`).
pub const FILTER_ENV: &str = "TUNNELKEEPER_LOG";

/// The filter used when neither [`FILTER_ENV`] nor `RUST_LOG` is set.
pub const DEFAULT_FILTER: &str = "info";

/// The field in which the bus passes an event's JSON object to the formatters (see
/// `bus::log_event`).
pub const EVENT_FIELDS: &str = "event_fields";

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `journal` when stderr is connected to journald, else `text`.
    #[default]
    Auto,
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
    /// Lines with a `<N>` syslog priority prefix, as journald parses them from stderr.
    Journal,
}

impl LogFormat {
    /// Replaces `Auto` by the format it stands for in this process: `Journal` when stderr is
    /// the stream named by `$JOURNAL_STREAM`, else `Text`. Other formats are returned as is.
    pub fn resolve(self) -> LogFormat {
        match self {
            LogFormat::Auto if stderr_is_journal() => LogFormat::Journal,
            LogFormat::Auto => LogFormat::Text,
            other => other,
        }
    }
}

/// Installs the global `tracing` subscriber writing to stderr in `format`, filtered by
/// `$TUNNELKEEPER_LOG` / `$RUST_LOG` (default `info`); `log` records of dependencies are
/// forwarded too. Fails on an invalid filter or when a subscriber is already installed.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = filter(env_value(FILTER_ENV)?, env_value("RUST_LOG")?)?;
    let format = format.resolve();
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    tracing_subscriber::registry()
        .with(filter)
        .with(layer(format, ansi, std::io::stderr))
        .try_init()
        .context("installing the logger")
}

/// The formatting layer for `format` writing to `writer` (`ansi` is honoured by `Text` only;
/// `Auto` is taken as `Text`, call [`LogFormat::resolve`] first). Public so that tests and
/// tools can capture the daemon's log lines with their own `MakeWriter`.
pub fn layer<S, W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let base = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Json => base
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .boxed(),
        LogFormat::Journal => base
            .with_ansi(false)
            .fmt_fields(TextFields)
            .event_format(JournalLines)
            .boxed(),
        LogFormat::Text | LogFormat::Auto => base.with_ansi(ansi).fmt_fields(TextFields).boxed(),
    }
}

/// The filter from the value of `$TUNNELKEEPER_LOG` (preferred) or `$RUST_LOG`; empty values
/// count as unset.
fn filter(tunnelkeeper_log: Option<String>, rust_log: Option<String>) -> anyhow::Result<Targets> {
    let (name, value) = match (tunnelkeeper_log, rust_log) {
        (Some(value), _) => (FILTER_ENV, value),
        (None, Some(value)) => ("RUST_LOG", value),
        (None, None) => (FILTER_ENV, DEFAULT_FILTER.to_owned()),
    };
    let targets: Targets = value.parse().with_context(|| {
        format!(
            "invalid log filter {name}={value:?}: give a level (trace, debug, info, warn, error,              off) and/or TARGET=LEVEL pairs, comma-separated"
        )
    })?;
    Ok(match targets.default_level() {
        Some(_) => targets,
        None => targets.with_default(LevelFilter::INFO),
    })
}

/// An environment variable's value; None when unset or empty.
fn env_value(name: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("{name} is not valid UTF-8"),
    }
}

/// Whether stderr is the journal stream systemd connected (`$JOURNAL_STREAM` = `DEV:INODE` of
/// stderr). A process that merely inherited the variable but logs elsewhere gets `false`.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    value
        .to_str()
        .is_some_and(|value| is_journal_stream(value, &std::fs::File::from(fd)))
}

/// Whether `file` is the stream a `$JOURNAL_STREAM` value names.
fn is_journal_stream(value: &str, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (parse_journal_stream(value), file.metadata()) {
        (Some((dev, ino)), Ok(meta)) => meta.dev() == dev && meta.ino() == ino,
        _ => false,
    }
}

/// Parses `$JOURNAL_STREAM` (`DEVICE:INODE`, both decimal).
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority journald reads from a `<N>` line prefix.
fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The target of an event: the original `log` target for records forwarded from the `log`
/// crate (which arrive with target `log` and a `log.target` field), else the metadata's.
fn event_target(event: &Event<'_>) -> String {
    struct LogTarget(Option<String>);
    impl Visit for LogTarget {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "log.target" {
                self.0 = Some(value.to_string());
            }
        }
        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }
    let target = event.metadata().target();
    if target != "log" {
        return target.to_string();
    }
    let mut visitor = LogTarget(None);
    event.record(&mut visitor);
    visitor.0.unwrap_or_else(|| target.to_string())
}

/// Journald's stderr protocol: `<N>span{k=v}: target: message k=v`, one priority prefix per
/// line (a multi-line message becomes several entries, each with the right priority).
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalLines;

impl<S, N> FormatEvent<S, N> for JournalLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut text = String::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                text.push_str(span.name());
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(text, "{{{fields}}}")?;
                    }
                }
                text.push_str(": ");
            }
        }
        write!(text, "{}: ", event_target(event))?;
        ctx.format_fields(Writer::new(&mut text), event)?;
        let priority = syslog_priority(event.metadata().level());
        for line in text.lines() {
            writeln!(writer, "<{priority}>{line}")?;
        }
        Ok(())
    }
}

/// One JSON object per line: `timestamp` (RFC 3339, UTC), `level`, `target`, `message`, then
/// the fields of every enclosing span (outermost first) and of the event, all at the top level
/// (an inner span's or the event's field wins over an outer one of the same name; the four
/// fixed keys win over fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut object = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() {
                    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                        object.extend(fields);
                    }
                }
            }
        }
        let mut visitor = JsonVisitor(&mut object, None);
        event.record(&mut visitor);
        if let Some(Value::Object(fields)) = visitor.1 {
            // A bus event: its own fields, and its type as the message.
            let kind = fields.get("event").cloned();
            object.extend(fields);
            if let Some(kind) = kind {
                object.insert("message".into(), kind);
            }
        }
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        object.insert("timestamp".into(), Value::String(timestamp));
        object.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        object.insert("target".into(), Value::String(event_target(event)));
        object
            .entry("message")
            .or_insert_with(|| Value::String(String::new()));
        let line = serde_json::to_string(&object).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Records event fields as JSON values (numbers and booleans keep their type); a bus event's
/// [`EVENT_FIELDS`] is parsed into the second member, for the caller to flatten.
struct JsonVisitor<'a>(&'a mut Map<String, Value>, Option<Value>);

impl JsonVisitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        if field.name() == EVENT_FIELDS {
            if let Value::String(json) = &value {
                self.1 = serde_json::from_str(json).ok();
            }
            return;
        }
        // `log.target`, `log.file`, ... are the `log` crate's metadata, not fields.
        if !field.name().starts_with("log.") {
            self.0.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value)
            .map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.insert(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            let _ = write!(text, ": {cause}");
            source = cause.source();
        }
        self.insert(field, Value::String(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.insert(field, Value::String(format!("{value:?}")));
    }
}

/// The field format of the text and journal lines: `tracing-subscriber`'s default
/// (`message key=value ...`, escapes neutralised) without [`EVENT_FIELDS`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        use tracing_subscriber::field::VisitOutput as _;
        let mut visitor = SkipEventFields(DefaultVisitor::new(writer, true));
        fields.record(&mut visitor);
        visitor.0.finish()
    }
}

/// Passes every field but [`EVENT_FIELDS`] to the default visitor.
struct SkipEventFields<'w>(DefaultVisitor<'w>);

impl Visit for SkipEventFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.record_f64(field, value)
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.record_i64(field, value)
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.record_u64(field, value)
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        self.0.record_i128(field, value)
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        self.0.record_u128(field, value)
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.record_bool(field, value)
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.record_str(field, value)
    }
    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.0.record_bytes(field, value)
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.record_error(field, value)
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() != EVENT_FIELDS {
            self.0.record_debug(field, value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `MakeWriter` appending to a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// Runs `emit` under a subscriber in `format` (filter `trace`) and returns what it wrote.
    fn capture(format: LogFormat, ansi: bool, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(Targets::new().with_default(LevelFilter::TRACE))
            .with(layer(format, ansi, buffer.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8(bytes).expect("log output is UTF-8")
    }

    fn sample() {
        let service = tracing::info_span!("service", service = "home-ssh");
        let _service = service.enter();
        let tunnel = tracing::info_span!("tunnel", tunnel = "vps", attempt = 3u64);
        let _tunnel = tunnel.enter();
        tracing::info!(latency_ms = 12u64, up = true, "primary changed");
        tracing::warn!(reason = "timeout", "probe failed");
    }

    #[test]
    fn json_has_the_fixed_keys_and_flattened_span_and_event_fields() {
        let out = capture(LogFormat::Json, false, sample);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let first: Value = serde_json::from_str(lines[0]).expect("a JSON object");
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], module_path!());
        assert_eq!(first["message"], "primary changed");
        assert_eq!(first["service"], "home-ssh");
        assert_eq!(first["tunnel"], "vps");
        assert_eq!(first["attempt"], 3);
        assert_eq!(first["latency_ms"], 12);
        assert_eq!(first["up"], true);
        let timestamp = first["timestamp"].as_str().expect("timestamp is a string");
        assert!(
            timestamp.len() >= 20 && timestamp.ends_with('Z') && timestamp.contains('T'),
            "RFC 3339 UTC timestamp: {timestamp}"
        );
        let second: Value = serde_json::from_str(lines[1]).expect("a JSON object");
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["reason"], "timeout");
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn json_without_a_message_still_has_the_key() {
        let out = capture(LogFormat::Json, false, || tracing::info!(tunnel = "lan"));
        let value: Value = serde_json::from_str(out.trim()).expect("a JSON object");
        assert_eq!(value["message"], "");
        assert_eq!(value["tunnel"], "lan");
    }

    #[test]
    fn journal_lines_carry_the_syslog_priority_and_no_timestamp_or_colour() {
        let out = capture(LogFormat::Journal, true, || {
            sample();
            tracing::error!("boom");
            tracing::debug!("detail");
            tracing::trace!("noise");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[0].starts_with("<6>"), "{}", lines[0]);
        assert!(lines[1].starts_with("<4>"), "{}", lines[1]);
        assert!(lines[2].starts_with("<3>"), "{}", lines[2]);
        assert!(lines[3].starts_with("<7>"), "{}", lines[3]);
        assert!(lines[4].starts_with("<7>"), "{}", lines[4]);
        assert_eq!(
            lines[0],
            format!(
                "<6>service{{service=\"home-ssh\"}}: tunnel{{tunnel=\"vps\" attempt=3}}: {}: \
                 primary changed latency_ms=12 up=true",
                module_path!()
            )
        );
        assert!(!out.contains('\x1b'), "no ANSI escapes: {out:?}");
        // No timestamp: nothing that looks like a date or a time of day.
        let year = regex::Regex::new(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}").expect("regex");
        assert!(!year.is_match(&out), "no timestamp: {out}");
        assert!(!out.contains("INFO") && !out.contains("WARN"), "{out}");
    }

    #[test]
    fn journal_prefixes_every_line_of_a_multiline_message() {
        let out = capture(LogFormat::Journal, false, || {
            tracing::warn!("first\nsecond\x1b[31m")
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines.iter().all(|l| l.starts_with("<4>")), "{out}");
        assert!(
            !out.contains('\x1b'),
            "escape sequences are neutralised: {out:?}"
        );
    }

    #[test]
    fn text_has_colours_only_when_asked() {
        let plain = capture(LogFormat::Text, false, sample);
        assert!(
            plain.contains("INFO") && plain.contains("primary changed"),
            "{plain}"
        );
        assert!(plain.contains("service{service=\"home-ssh\"}"), "{plain}");
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let coloured = capture(LogFormat::Text, true, sample);
        assert!(coloured.contains('\x1b'), "{coloured:?}");
    }

    fn publish_primary_changed() {
        let bus = crate::bus::Bus::new(16);
        bus.publish(crate::bus::EventKind::PrimaryChanged {
            service: "web".into(),
            from: Some("a".into()),
            to: Some("b".into()),
            reason: "primary_down (hard: killed by signal 9)".into(),
        });
        bus.publish(crate::bus::EventKind::RouterReconnected {
            router: "gw".into(),
        });
    }

    #[test]
    fn json_lines_carry_every_event_field_as_a_field() {
        let out = capture(LogFormat::Json, false, publish_primary_changed);
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object"))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        let first = &lines[0];
        assert_eq!(first["target"], "tunnelkeeper::event");
        assert_eq!(first["message"], "primary_changed");
        assert_eq!(first["event"], "primary_changed");
        assert_eq!(first["seq"], 1);
        assert_eq!(first["service"], "web");
        assert_eq!(first["from"], "a");
        assert_eq!(first["to"], "b");
        assert_eq!(first["reason"], "primary_down (hard: killed by signal 9)");
        assert!(first.get(EVENT_FIELDS).is_none(), "{first}");
        let second = &lines[1];
        assert_eq!(second["router"], "gw");
        assert!(second.get("service").is_none(), "{second}");
        assert!(second.get("tunnel").is_none(), "{second}");
    }

    #[test]
    fn text_and_journal_lines_show_only_the_fields_an_event_has() {
        for format in [LogFormat::Text, LogFormat::Journal] {
            let out = capture(format, false, publish_primary_changed);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 2, "{out}");
            assert!(
                lines[0].ends_with(
                    "tunnelkeeper::event: primary_changed seq=1 service=web from=a \
                     reason=\"primary_down (hard: killed by signal 9)\" to=b"
                ),
                "{out}"
            );
            assert!(
                lines[1].ends_with("tunnelkeeper::event: router_reconnected seq=2 router=gw"),
                "{out}"
            );
            assert!(!out.contains(EVENT_FIELDS), "{out}");
        }
    }

    #[test]
    fn events_published_from_many_threads_are_logged_in_seq_order() {
        let buffer = Buffer::default();
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::registry()
                .with(Targets::new().with_default(LevelFilter::INFO))
                .with(layer(LogFormat::Json, false, buffer.clone())),
        );
        let bus = crate::bus::Bus::new(4096);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (bus, dispatch) = (&bus, &dispatch);
                scope.spawn(move || {
                    tracing::dispatcher::with_default(dispatch, || {
                        for _ in 0..300 {
                            bus.publish(crate::bus::EventKind::RouterReconnected {
                                router: format!("r{t}"),
                            });
                        }
                    })
                });
            }
        });
        let bytes = buffer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let seqs: Vec<u64> = String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["seq"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=1200).collect::<Vec<_>>());
    }

    #[test]
    fn explicit_formats_resolve_to_themselves() {
        for format in [LogFormat::Text, LogFormat::Json, LogFormat::Journal] {
            assert_eq!(format.resolve(), format);
        }
        assert_ne!(LogFormat::Auto.resolve(), LogFormat::Auto);
        assert_eq!(LogFormat::default(), LogFormat::Auto);
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream("81234"), None);
    }

    #[test]
    fn journal_stream_must_name_the_very_file() {
        use std::os::unix::fs::MetadataExt as _;
        let file = tempfile::tempfile().expect("temp file");
        let meta = file.metadata().expect("metadata");
        let same = format!("{}:{}", meta.dev(), meta.ino());
        let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
        assert!(is_journal_stream(&same, &file));
        assert!(!is_journal_stream(&other, &file));
        assert!(!is_journal_stream("garbage", &file));
    }

    #[test]
    fn filter_prefers_tunnelkeeper_log_and_rejects_nonsense() {
        assert!(filter(None, None).is_ok());
        let f = filter(Some("debug".into()), Some("error".into())).expect("valid");
        assert_eq!(f.default_level(), Some(LevelFilter::DEBUG));
        let f = filter(None, Some("warn".into())).expect("valid");
        assert_eq!(f.default_level(), Some(LevelFilter::WARN));
        // A target alone leaves everything else at info (rather than silencing it).
        let f = filter(Some("tunnelkeeper::probe=debug".into()), None).expect("valid");
        assert_eq!(f.default_level(), Some(LevelFilter::INFO));
        assert!(f.would_enable("tunnelkeeper::probe", &tracing::Level::DEBUG));
        assert!(!f.would_enable("russh", &tracing::Level::DEBUG));
        let err = filter(Some("tunnelkeeper=loud".into()), None).expect_err("invalid level");
        assert!(err.to_string().contains("TUNNELKEEPER_LOG"), "{err}");
    }

    #[test]
    fn global_flag_as_main_rs_declares_it() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
            log_format: LogFormat,
            #[command(subcommand)]
            command: Command,
        }
        #[derive(clap::Subcommand)]
        enum Command {
            Run,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|cli| (cli.log_format, matches!(cli.command, Command::Run)))
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse(&["tk", "run"]), Ok((LogFormat::Auto, true)));
        assert_eq!(
            parse(&["tk", "--log-format", "json", "run"]),
            Ok((LogFormat::Json, true))
        );
        assert_eq!(
            parse(&["tk", "run", "--log-format=journal"]),
            Ok((LogFormat::Journal, true))
        );
        assert!(parse(&["tk", "run", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn clap_value_names() {
        use clap::ValueEnum as _;
        let names: Vec<String> = LogFormat::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        assert_eq!(names, ["auto", "text", "json", "journal"]);
    }
}
