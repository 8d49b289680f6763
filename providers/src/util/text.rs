//! Text for log lines and messages: the tag naming a tunnel, and a child's output line quoted.

/// The tag of every log line about one tunnel: `service/tunnel`.
pub fn log_tag(service: &str, tunnel: &str) -> String {
    format!("{service}/{tunnel}")
}

/// An output line quoted for a message (escapes shown, so control characters cannot forge
/// lines), or `(none)` when there was none.
pub fn quote(line: Option<&str>) -> String {
    match line {
        Some(line) => format!("{line:?}"),
        None => "(none)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_quotes() {
        assert_eq!(log_tag("home", "cf"), "home/cf");
        assert_eq!(quote(Some("bad \"token\"\n")), r#""bad \"token\"\n""#);
        assert_eq!(quote(None), "(none)");
    }
}
