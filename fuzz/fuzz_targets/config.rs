//! Fuzz target `config`: `tunnelkeeper::config::parse` on arbitrary text.
//!
//! The input bytes are converted to UTF-8 lossily (a config file is read with
//! `read_to_string`, so non-UTF-8 never reaches `parse`). `parse` must never panic, and:
//! - on `Err`, the rendered error is not empty and has exactly one line per diagnostic, each
//!   `FILE:LINE:COLUMN: KEY: MESSAGE` for this file, with a 1-based line and column within the
//!   text and a non-empty key;
//! - the outcome is deterministic: parsing the same text again gives the same result.
//!
//! Open findings are tolerated unless `TK_FUZZ_STRICT=1` (see `TOLERATE_KNOWN_FINDINGS`).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tunnelkeeper::config::{parse, ConfigError, Diagnostic};

const FILE: &str = "/etc/tunnelkeeper/fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new(FILE);
    let first = parse(&text, path);
    if let Err(err) = &first {
        check_error(&text, err);
    }
    let second = parse(&text, path);
    match (&first, &second) {
        // Debug rather than PartialEq: `Config` has none, and a NaN float would never equal
        // itself. (Debug masks secrets such as env values; fine for a determinism check.)
        (Ok(a), Ok(b)) => assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "parse not deterministic"
        ),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "errors not deterministic"),
        _ => panic!("parse not deterministic: {first:?} then {second:?}"),
    }
});

/// Known findings whose fix belongs in src/ (see docs/FUZZING.md, "Findings"). While they are
/// open the target tolerates them so that fuzzing can go on past them; `TK_FUZZ_STRICT=1`
/// turns the tolerance off, e.g. to check a fix with
/// `TK_FUZZ_STRICT=1 cargo fuzz run config fuzz/regressions/config -- -runs=0`.
/// Once the fixes are in, set this to false (the regressions then guard them).
const TOLERATE_KNOWN_FINDINGS: bool = false;

fn tolerate_known_findings() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    TOLERATE_KNOWN_FINDINGS
        && !*STRICT.get_or_init(|| {
            std::env::var_os("TK_FUZZ_STRICT").is_some_and(|v| !v.is_empty() && v != "0")
        })
}

/// Finding 1 (fuzz/regressions/config/empty-top-level-key): a top-level key that is the empty
/// string gives an empty key path.
fn finding_empty_key(d: &Diagnostic) -> bool {
    d.key.is_empty() && d.message.starts_with("unknown key ``")
}

/// Finding 2 (fuzz/regressions/config/line-break-in-key): a quoted key holding a line break
/// is copied raw into the key path and the message, so the diagnostic spans several lines.
fn finding_line_break(d: &Diagnostic) -> bool {
    let raw = |s: &str| s.chars().any(|c| c.is_control());
    raw(&d.key) || raw(&d.message)
}

fn check_error(text: &str, err: &ConfigError) {
    let tolerate = tolerate_known_findings();
    let rendered = err.to_string();
    assert!(!rendered.is_empty(), "empty error for {text:?}");
    let diagnostics = err.diagnostics();
    assert!(
        !diagnostics.is_empty(),
        "error without diagnostics: {err:?}"
    );
    let prefix = format!("{FILE}:");
    let multi_line_tolerated = tolerate && diagnostics.iter().any(finding_line_break);
    if !multi_line_tolerated {
        assert_eq!(
            rendered.lines().count(),
            diagnostics.len(),
            "not one line per diagnostic: {rendered:?}"
        );
        for line in rendered.lines() {
            assert!(
                line.starts_with(&prefix),
                "error line does not start with the file: {line:?}\nwhole error: {rendered:?}"
            );
        }
    }
    // An upper bound on the lines as YAML counts them (any of its line breaks, CR LF counted
    // twice), plus one: a position may point past the last line (end of input).
    let breaks = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    let lines = text.chars().filter(|c| breaks.contains(c)).count() + 2;
    for d in diagnostics {
        assert!(
            d.to_string().starts_with(&prefix),
            "diagnostic without the file: {d:?}"
        );
        assert!(d.line >= 1 && d.column >= 1, "position not 1-based: {d:?}");
        assert!(
            d.line <= lines,
            "line {} past the end ({lines} lines): {d:?}",
            d.line
        );
        assert!(
            !d.key.is_empty() || (tolerate && finding_empty_key(d)),
            "empty key: {d:?}"
        );
    }
}
