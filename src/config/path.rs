//! Key paths (`services[0].tunnels[1].priority`) and source positions: how every diagnostic
//! names the place it concerns.

use std::fmt;

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A mapping key.
    Key(String),
    /// A sequence index (0-based, as written in key paths).
    Index(usize),
}

/// A path from the document root to a key, displayed as `services[0].tunnels[1].priority`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The document itself.
    pub(crate) fn root() -> Self {
        KeyPath(Vec::new())
    }

    /// This path extended by a mapping key.
    pub(crate) fn key(&self, key: &str) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_owned()));
        KeyPath(segments)
    }

    /// This path extended by a sequence index.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        KeyPath(segments)
    }

    /// This path without its last step (the root stays the root).
    pub(crate) fn parent(&self) -> Self {
        let mut segments = self.0.clone();
        segments.pop();
        KeyPath(segments)
    }

    /// The steps from the root.
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.0
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(root)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    // An empty key (`"": 1`) must still be visible in the message.
                    f.write_str(if key.is_empty() { "\"\"" } else { key })?;
                }
            }
        }
        Ok(())
    }
}

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// 1-based line.
    pub(crate) line: usize,
    /// 1-based column, in characters.
    pub(crate) column: usize,
}

impl Position {
    /// The start of the document: where anything unplaceable is reported.
    pub(crate) const START: Position = Position { line: 1, column: 1 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_display() {
        let root = KeyPath::root();
        assert_eq!(root.to_string(), "(root)");
        assert_eq!(root.key("version").to_string(), "version");
        assert_eq!(
            root.key("services")
                .index(0)
                .key("tunnels")
                .index(1)
                .key("priority")
                .to_string(),
            "services[0].tunnels[1].priority"
        );
        assert_eq!(root.key("env").key("").to_string(), "env.\"\"");
    }
}
