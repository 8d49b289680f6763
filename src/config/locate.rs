//! Finds where a key sits in the YAML text.
//!
//! serde throws source positions away, so semantic checks only know a key path such as
//! `services[0].tunnels[1].priority`. This module re-reads the document with yaml-rust2's
//! event parser, which reports a [`Marker`] for every scalar and collection, builds a small
//! tree of positions, and walks it along the path. A key that is absent (a required key left
//! out, a default that is wrong) is reported at its nearest existing ancestor, so the operator
//! is still sent to the right block.
//!
//! The tree is built once per file and shared by every diagnostic. It is bounded in depth, and
//! a document yaml-rust2 cannot fully parse still yields the part it read: locating is best
//! effort and never fails, it only gets less precise.

use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// Nesting deeper than this is not recorded. Real configurations nest six or seven levels;
/// the bound keeps garbage input from building (and recursively dropping) a deep tree.
const MAX_DEPTH: usize = 64;

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

    /// The steps from the root.
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.0
    }
}

impl From<&serde_path_to_error::Path> for KeyPath {
    fn from(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        let mut segments = Vec::new();
        for segment in path.iter() {
            match segment {
                S::Seq { index } => segments.push(Segment::Index(*index)),
                S::Map { key } | S::Enum { variant: key } => {
                    segments.push(Segment::Key(key.clone()))
                }
                // Unknown steps (a key that was not a string) cannot be followed in the
                // document; stopping there keeps the location at the last known ancestor.
                S::Unknown => break,
            }
        }
        KeyPath(segments)
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
    const START: Position = Position { line: 1, column: 1 };

    fn from_marker(marker: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Position {
            line: marker.line().max(1),
            column: marker.col().saturating_add(1),
        }
    }
}

/// What the tree records of one YAML node: where it starts and what it contains.
#[derive(Debug)]
enum Node {
    /// A scalar, an alias, or a collection deeper than [`MAX_DEPTH`].
    Leaf(Position),
    /// A sequence and its items.
    Seq(Position, Vec<Node>),
    /// A mapping: (key text if the key is a scalar, key position, value).
    Map(Position, Vec<(Option<String>, Position, Node)>),
}

impl Node {
    /// Where the node's content begins. yaml-rust2 marks a block mapping *after* its first
    /// key, so a mapping is placed at its first key instead, which is also where a reader's
    /// eye goes for "the second tunnel".
    fn position(&self) -> Position {
        match self {
            Node::Leaf(at) | Node::Seq(at, _) => *at,
            Node::Map(at, entries) => entries.first().map_or(*at, |(_, key_at, _)| *key_at),
        }
    }
}

/// A collection being read, while the parser is inside it.
enum Frame {
    Seq(Position, Vec<Node>),
    /// Entries so far, and a key waiting for its value.
    Map(
        Position,
        Vec<(Option<String>, Position, Node)>,
        Option<(Option<String>, Position)>,
    ),
    /// A collection past [`MAX_DEPTH`]: only its nesting is tracked, to find its end.
    Skipped(Position, usize),
}

/// Positions of every key of one document, ready to answer [`Locator::locate`].
#[derive(Debug)]
pub(crate) struct Locator {
    root: Option<Node>,
}

impl Locator {
    /// Reads `text`. Never fails: a document yaml-rust2 rejects keeps what was read before the
    /// error, and an empty one places everything at 1:1.
    pub(crate) fn new(text: &str) -> Self {
        Locator { root: build(text) }
    }

    /// The position of the last key of `path`, or of its nearest ancestor present in the
    /// document.
    pub(crate) fn locate(&self, path: &KeyPath) -> Position {
        let Some(mut node) = self.root.as_ref() else {
            return Position::START;
        };
        let mut best = node.position();
        for segment in path.segments() {
            let next = match (segment, node) {
                (Segment::Key(key), Node::Map(_, entries)) => entries
                    .iter()
                    // The last occurrence wins, as it does for most YAML loaders.
                    .rev()
                    .find(|(k, _, _)| k.as_deref() == Some(key.as_str()))
                    .map(|(_, key_at, value)| (*key_at, value)),
                (Segment::Index(index), Node::Seq(_, items)) => {
                    items.get(*index).map(|item| (item.position(), item))
                }
                _ => None,
            };
            match next {
                Some((at, child)) => {
                    best = at;
                    node = child;
                }
                None => break,
            }
        }
        best
    }

    /// The position of the second occurrence of `key` in the mapping at `path`: where serde
    /// complains about a duplicate field, without saying where.
    pub(crate) fn locate_duplicate(&self, path: &KeyPath, key: &str) -> Option<Position> {
        let mut node = self.root.as_ref()?;
        for segment in path.segments() {
            node = match (segment, node) {
                (Segment::Key(k), Node::Map(_, entries)) => entries
                    .iter()
                    .find(|(name, _, _)| name.as_deref() == Some(k.as_str()))
                    .map(|(_, _, value)| value)?,
                (Segment::Index(index), Node::Seq(_, items)) => items.get(*index)?,
                _ => return None,
            };
        }
        let Node::Map(_, entries) = node else {
            return None;
        };
        entries
            .iter()
            .filter(|(name, _, _)| name.as_deref() == Some(key))
            .nth(1)
            .map(|(_, at, _)| *at)
    }
}

/// Builds the position tree of the first document of `text` (serde_yaml rejects files with
/// more than one, so later ones never matter).
fn build(text: &str) -> Option<Node> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    loop {
        let (event, marker) = match parser.next_token() {
            Ok(next) => next,
            // Keep what was read: a partial tree still places keys before the error.
            Err(_) => return unwind(stack),
        };
        let at = Position::from_marker(marker);
        let finished = match event {
            Event::StreamEnd | Event::DocumentEnd => return unwind(stack),
            Event::Nothing | Event::StreamStart | Event::DocumentStart => continue,
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if let Some(Frame::Skipped(_, depth)) = stack.last_mut() {
                    *depth = depth.saturating_add(1);
                } else if stack.len() >= MAX_DEPTH {
                    stack.push(Frame::Skipped(at, 0));
                } else if matches!(event, Event::SequenceStart(..)) {
                    stack.push(Frame::Seq(at, Vec::new()));
                } else {
                    stack.push(Frame::Map(at, Vec::new(), None));
                }
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Frame::Skipped(_, depth)) = stack.last_mut() {
                    if *depth > 0 {
                        *depth -= 1;
                        continue;
                    }
                }
                match stack.pop() {
                    Some(frame) => close(frame),
                    None => return None,
                }
            }
            Event::Scalar(value, ..) => {
                // A scalar in key position is remembered as the pending key, not as a node.
                if let Some(Frame::Map(_, _, pending @ None)) = stack.last_mut() {
                    *pending = Some((Some(value), at));
                    continue;
                }
                Node::Leaf(at)
            }
            Event::Alias(_) => Node::Leaf(at),
        };
        match attach(&mut stack, finished) {
            Some(root) => return Some(root),
            None => continue,
        }
    }
}

/// Turns a closed frame into its node.
fn close(frame: Frame) -> Node {
    match frame {
        Frame::Seq(at, items) => Node::Seq(at, items),
        Frame::Map(at, entries, _) => Node::Map(at, entries),
        Frame::Skipped(at, _) => Node::Leaf(at),
    }
}

/// Adds a finished node to the collection it belongs to. Returns it when it is the root.
fn attach(stack: &mut [Frame], node: Node) -> Option<Node> {
    match stack.last_mut() {
        None => Some(node),
        Some(Frame::Seq(_, items)) => {
            items.push(node);
            None
        }
        Some(Frame::Map(_, entries, pending)) => {
            match pending.take() {
                Some((key, key_at)) => entries.push((key, key_at, node)),
                // A collection used as a key: it has no name to look up, but its value
                // must still pair with it, so it becomes an anonymous pending key.
                None => *pending = Some((None, node.position())),
            }
            None
        }
        // Inside a skipped collection nothing is recorded.
        Some(Frame::Skipped(..)) => None,
    }
}

/// Closes every open collection (end of input or a parse error) and returns the root.
fn unwind(mut stack: Vec<Frame>) -> Option<Node> {
    let mut node = close(stack.pop()?);
    loop {
        if let Some(root) = attach(&mut stack, node) {
            return Some(root);
        }
        node = close(stack.pop()?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
version: 1
services:
  - name: home
    tunnels:
      - { name: lan, provider: direct, priority: 10 }
      - name: bore
        provider: command
        run: [bore, local]
  - name: web
    tunnels: []
";

    fn path(steps: &[&str]) -> KeyPath {
        let mut path = KeyPath::root();
        for step in steps {
            path = match step.parse::<usize>() {
                Ok(index) => path.index(index),
                Err(_) => path.key(step),
            };
        }
        path
    }

    fn at(line: usize, column: usize) -> Position {
        Position { line, column }
    }

    #[test]
    fn key_path_display() {
        assert_eq!(path(&[]).to_string(), "(root)");
        assert_eq!(path(&["version"]).to_string(), "version");
        assert_eq!(
            path(&["services", "0", "tunnels", "1", "priority"]).to_string(),
            "services[0].tunnels[1].priority"
        );
    }

    #[test]
    fn finds_keys_in_block_and_flow_style() {
        let locator = Locator::new(DOC);
        assert_eq!(locator.locate(&path(&["version"])), at(1, 1));
        assert_eq!(locator.locate(&path(&["services"])), at(2, 1));
        assert_eq!(locator.locate(&path(&["services", "0"])), at(3, 5));
        assert_eq!(
            locator.locate(&path(&["services", "0", "tunnels"])),
            at(4, 5)
        );
        assert_eq!(
            locator.locate(&path(&["services", "0", "tunnels", "0", "priority"])),
            at(5, 40)
        );
        assert_eq!(
            locator.locate(&path(&["services", "0", "tunnels", "1", "provider"])),
            at(7, 9)
        );
        assert_eq!(
            locator.locate(&path(&["services", "0", "tunnels", "1", "run", "1"])),
            at(8, 21)
        );
        assert_eq!(
            locator.locate(&path(&["services", "1", "tunnels"])),
            at(10, 5)
        );
    }

    #[test]
    fn falls_back_to_the_nearest_ancestor() {
        let locator = Locator::new(DOC);
        // A key left out is reported where its parent is.
        assert_eq!(
            locator.locate(&path(&["services", "0", "tunnels", "1", "address"])),
            at(6, 9)
        );
        assert_eq!(
            locator.locate(&path(&["services", "1", "tunnels", "0"])),
            at(10, 5)
        );
        assert_eq!(locator.locate(&path(&["services", "7", "name"])), at(2, 1));
        assert_eq!(locator.locate(&path(&["daemon"])), at(1, 1));
        // Walking "into" a scalar stops at the scalar's key.
        assert_eq!(locator.locate(&path(&["version", "0"])), at(1, 1));
    }

    #[test]
    fn finds_the_second_occurrence_of_a_duplicate_key() {
        let locator = Locator::new("version: 1\nservices: []\nversion: 2\n");
        assert_eq!(
            locator.locate_duplicate(&KeyPath::root(), "version"),
            Some(at(3, 1))
        );
        assert_eq!(locator.locate_duplicate(&KeyPath::root(), "services"), None);
    }

    #[test]
    fn empty_or_broken_documents_place_at_the_start_or_keep_the_prefix() {
        assert_eq!(Locator::new("").locate(&path(&["version"])), at(1, 1));
        assert_eq!(Locator::new("# nothing\n").locate(&path(&["a"])), at(1, 1));
        let broken = Locator::new("version: 1\nservices:\n  - name: a\n    x: [\n");
        assert_eq!(broken.locate(&path(&["services", "0", "name"])), at(3, 5));
    }

    #[test]
    fn deep_nesting_is_bounded() {
        // Deeper than MAX_DEPTH but within yaml-rust2's own limit: the shallow part is kept.
        let deep = format!("a: {}1{}\nb: 2\n", "[".repeat(200), "]".repeat(200));
        let locator = Locator::new(&deep);
        assert_eq!(locator.locate(&path(&["a", "0", "0"])), at(1, 6));
        assert_eq!(locator.locate(&path(&["b"])), at(2, 1));
        // Past yaml-rust2's limit the parse stops early; locating still answers.
        let deeper = format!("a: {}1{}\n", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            Locator::new(&deeper).locate(&path(&["a", "0", "0"])),
            at(1, 1)
        );
        let unclosed = "[".repeat(10_000);
        assert_eq!(Locator::new(&unclosed).locate(&path(&["0"])), at(1, 1));
    }

    #[test]
    fn complex_keys_do_not_shift_the_pairing() {
        let locator = Locator::new("? [a, b]\n: 1\nname: x\n");
        assert_eq!(locator.locate(&path(&["name"])), at(3, 1));
    }
}
