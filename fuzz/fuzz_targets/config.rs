//! Fuzz target `config`: `tunnelkeeper::config::parse` on arbitrary text.
//!
//! The input bytes are converted to UTF-8 lossily (a config file is read with
//! `read_to_string`, so non-UTF-8 never reaches `parse`). `parse` must never panic, and:
//! - on `Err`, the rendered error is not empty and every line of it is a diagnostic
//!   `FILE:LINE:COLUMN: KEY: MESSAGE` for this file, with 1-based line and column;
//! - the outcome is deterministic: parsing the same text again gives the same result.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tunnelkeeper::config::{parse, ConfigError};

const FILE: &str = "/etc/tunnelkeeper/fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new(FILE);
    let first = parse(&text, path);
    match &first {
        Err(err) => check_error(&text, err),
        Ok(_) => {}
    }
    let second = parse(&text, path);
    match (&first, &second) {
        // Debug rather than PartialEq: `Config` has none, and a NaN float would never equal
        // itself. (Debug masks secrets such as env values; fine for a determinism check.)
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "parse not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "errors not deterministic"),
        _ => panic!("parse not deterministic: {first:?} then {second:?}"),
    }
});

fn check_error(text: &str, err: &ConfigError) {
    let rendered = err.to_string();
    assert!(!rendered.is_empty(), "empty error for {text:?}");
    let diagnostics = err.diagnostics();
    assert!(!diagnostics.is_empty(), "error without diagnostics: {err:?}");
    let prefix = format!("{FILE}:");
    for line in rendered.lines() {
        assert!(
            line.starts_with(&prefix),
            "error line does not start with the file: {line:?}\nwhole error: {rendered:?}"
        );
    }
    // An upper bound on the lines as YAML counts them (any of its line breaks, CR LF counted
    // twice), plus one: a position may point past the last line (end of input).
    let breaks = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    let lines = text.chars().filter(|c| breaks.contains(c)).count() + 2;
    for d in diagnostics {
        assert!(d.line >= 1 && d.column >= 1, "position not 1-based: {d:?}");
        assert!(d.line <= lines, "line {} past the end ({lines} lines): {d:?}", d.line);
        assert!(!d.key.is_empty(), "empty key: {d:?}");
    }
}
