//! Reads YAML text into a tree of [`Node`]s that remember where they start.
//!
//! One parse (granit-parser's event stream, a maintained YAML 1.2 parser that reports a source
//! span for every event) serves everything: the typed model is read from the tree
//! (`super::de`), and every diagnostic, syntactic, type or semantic, takes its line and column
//! from the same nodes ([`locate`]). Scalars keep their text and whether they were written
//! plain, so the reader decides what a plain `22` is from the type it expects there.
//!
//! A syntax error stops a YAML parser. To still report every syntax error of a file at once,
//! the line of each error is blanked and the text parsed again, as long as the next error is
//! further down the file; the errors are reported, never the tree of the patched text.
//!
//! Input is bounded: nesting is limited to [`MAX_DEPTH`] levels by the parser, and aliases may
//! not expand the document beyond [`MAX_NODES`] nodes (a "billion laughs" file is refused).

use std::borrow::Cow;
use std::collections::HashMap;

use granit_parser::{Event, Options, Parser, ScalarStyle, ScanError, Span};

use super::path::{KeyPath, Position, Segment};

/// Deepest nesting accepted. Real configurations nest six or seven levels.
pub(crate) const MAX_DEPTH: usize = 64;

/// Most nodes a document may hold once aliases are expanded.
pub(crate) const MAX_NODES: usize = 100_000;

/// Syntax errors reported at most for one file: past that, the file is probably not YAML.
const MAX_SYNTAX_ERRORS: usize = 20;

/// One YAML node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// Where the node's content starts (1-based line and column).
    pub(crate) at: Position,
    /// What the node holds.
    pub(crate) value: Value,
}

/// The content of a [`Node`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// A scalar, after escape processing. `plain` is true for an unquoted, untagged scalar:
    /// only those can mean a number, a boolean or nothing (null).
    Scalar {
        /// The text.
        text: String,
        /// Written without quotes or a `!!str` tag.
        plain: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, entries in file order (duplicates kept: the reader reports them).
    Map(Vec<Entry>),
}

/// One `key: value` of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The key node (a scalar in every sane document).
    pub(crate) key: Node,
    /// The value node.
    pub(crate) value: Node,
}

impl Node {
    /// Whether this is YAML's null: an empty plain scalar, `~` or `null`.
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The text of a scalar.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The value of `key` in a mapping (the last one, if the key is repeated).
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|entry| &entry.value)
    }

    fn entry(&self, key: &str) -> Option<&Entry> {
        match &self.value {
            Value::Map(entries) => entries.iter().rev().find(|e| e.key.as_str() == Some(key)),
            _ => None,
        }
    }

    /// Where a reader's eye goes for this node: a mapping's first key (a block mapping's own
    /// event may start elsewhere), else the node's start.
    pub(crate) fn start(&self) -> Position {
        match &self.value {
            Value::Map(entries) => entries.first().map_or(self.at, |e| e.key.at),
            _ => self.at,
        }
    }

    /// Levels of nesting in this subtree (1 for a scalar). Every tree held here is at most
    /// twice [`MAX_DEPTH`] deep, so the recursion is bounded.
    fn depth(&self) -> usize {
        1 + match &self.value {
            Value::Scalar { .. } => 0,
            Value::Seq(items) => items.iter().map(Node::depth).max().unwrap_or(0),
            Value::Map(entries) => entries
                .iter()
                .map(|e| e.key.depth().max(e.value.depth()))
                .max()
                .unwrap_or(0),
        }
    }

    /// Number of nodes in this subtree (bounded by the depth limit).
    fn size(&self) -> usize {
        1 + match &self.value {
            Value::Scalar { .. } => 0,
            Value::Seq(items) => items.iter().map(Node::size).sum(),
            Value::Map(entries) => entries.iter().map(|e| e.key.size() + e.value.size()).sum(),
        }
    }
}

/// A YAML syntax error: where, the key it interrupted, and what the parser said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    /// Where the parser stopped.
    pub(crate) at: Position,
    /// The key being read there (as far as the part before the error tells).
    pub(crate) path: KeyPath,
    /// What is wrong.
    pub(crate) message: String,
    /// Whether going on past it would make no sense (a second document, a size limit).
    terminal: bool,
}

/// Parses `text` (without a byte-order mark) into its root node, `None` for a document with
/// no content at all (empty, blank or only comments). On syntax errors, returns all of them
/// in file order.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, Vec<SyntaxError>> {
    let mut errors: Vec<SyntaxError> = Vec::new();
    let mut current = Cow::Borrowed(text);
    loop {
        let error = match parse_once(&current) {
            Ok(root) if errors.is_empty() => return Ok(root),
            Ok(_) => return Err(errors),
            Err(error) => error,
        };
        // Blanking a line can only move the next error down the file; an error at or above
        // the last one is a consequence of the patch, not a mistake of the operator's.
        if errors
            .last()
            .is_some_and(|last| error.at.line <= last.at.line)
        {
            return Err(errors);
        }
        let (line, terminal) = (error.at.line, error.terminal);
        errors.push(error);
        if terminal || errors.len() >= MAX_SYNTAX_ERRORS {
            return Err(errors);
        }
        current = Cow::Owned(blank_line(&current, line));
    }
}

/// `text` with line `line` (1-based) replaced by spaces, so positions further down stay put.
fn blank_line(text: &str, line: usize) -> String {
    text.split_inclusive('\n')
        .enumerate()
        .map(|(i, content)| {
            if i + 1 == line {
                content
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { c } else { ' ' })
                    .collect()
            } else {
                content.to_owned()
            }
        })
        .collect()
}

/// A collection being read.
enum Frame {
    Seq {
        at: Position,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        at: Position,
        anchor: usize,
        entries: Vec<Entry>,
        /// A key read, waiting for its value.
        pending: Option<Node>,
    },
}

/// Builds the tree from events.
struct Builder<'t> {
    text: &'t str,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    root: Option<Node>,
    documents: usize,
}

fn position(span: &Span) -> Position {
    // granit-parser counts lines from 1 and columns from 0, in characters.
    Position {
        line: span.start.line().max(1),
        column: span.start.col().saturating_add(1),
    }
}

fn parse_once(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut options = Options::default();
    options.flow_nesting_limit = MAX_DEPTH;
    options.block_nesting_limit = MAX_DEPTH;
    let parser = Parser::new_from_str_with_options(text, options);
    let mut builder = Builder {
        text,
        stack: Vec::new(),
        anchors: HashMap::new(),
        nodes: 0,
        root: None,
        documents: 0,
    };
    for item in parser {
        let (event, span) = item.map_err(|error| builder.syntax_error(&error))?;
        let at = position(&span);
        match event {
            Event::DocumentStart(..) => {
                builder.documents += 1;
                if builder.documents > 1 {
                    return Err(SyntaxError {
                        at,
                        path: KeyPath::root(),
                        message: "a second YAML document starts here: a configuration is one \
                                  document (remove the `---` and what follows, or merge them)"
                            .to_owned(),
                        terminal: true,
                    });
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag
                    .as_ref()
                    .is_some_and(|t| t.is_yaml_core_schema_tag("str"));
                let node = Node {
                    at,
                    value: Value::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain && !is_str_tag,
                    },
                };
                builder.add(node, anchor, at)?;
            }
            Event::SequenceStart(_, anchor, _) => builder.stack.push(Frame::Seq {
                at,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(_, anchor, _) => builder.stack.push(Frame::Map {
                at,
                anchor,
                entries: Vec::new(),
                pending: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match builder.stack.pop() {
                    Some(Frame::Seq { at, anchor, items }) => (
                        Node {
                            at,
                            value: Value::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        at,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            at,
                            value: Value::Map(entries),
                        },
                        anchor,
                    ),
                    None => continue,
                };
                builder.nodes = builder.nodes.saturating_sub(1);
                builder.add(node, anchor, at)?;
            }
            Event::Alias(id) => {
                let node = builder.anchors.get(&id).cloned().unwrap_or(Node {
                    at,
                    value: Value::Scalar {
                        text: String::new(),
                        plain: true,
                    },
                });
                // An alias inside an anchor inside an alias… could nest without end; the
                // tree (and every recursion over it) stays within twice the parser's limit.
                if builder.stack.len() + node.depth() > 2 * MAX_DEPTH {
                    return Err(SyntaxError {
                        at,
                        path: builder.path(),
                        message: format!(
                            "aliases nest the document deeper than {} levels",
                            2 * MAX_DEPTH
                        ),
                        terminal: true,
                    });
                }
                let extra = node.size().saturating_sub(1);
                builder.nodes = builder.nodes.saturating_add(extra);
                builder.add(node, 0, at)?;
            }
            _ => {}
        }
    }
    Ok(builder.root)
}

impl Builder<'_> {
    /// Adds a finished node to the open collection (or makes it the root), recording it
    /// under its anchor.
    fn add(&mut self, node: Node, anchor: usize, at: Position) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(1);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                at,
                path: self.path(),
                message: format!(
                    "the document holds more than {MAX_NODES} values once aliases are expanded"
                ),
                terminal: true,
            });
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries, pending, ..
            }) => match pending.take() {
                Some(key) => entries.push(Entry { key, value: node }),
                None => *pending = Some(node),
            },
        }
        Ok(())
    }

    /// The key path of what was being read: each open collection's current entry (a
    /// sequence that is not reading an item adds nothing).
    fn path(&self) -> KeyPath {
        let mut path = KeyPath::root();
        let last = self.stack.len().saturating_sub(1);
        for (depth, frame) in self.stack.iter().enumerate() {
            match frame {
                Frame::Seq { items, .. } if depth < last => path = path.index(items.len()),
                Frame::Seq { .. } => {}
                Frame::Map { pending, .. } => match pending.as_ref().and_then(Node::as_str) {
                    Some(key) => path = path.key(key),
                    None => break,
                },
            }
        }
        path
    }

    fn syntax_error(&self, error: &ScanError) -> SyntaxError {
        let marker = error.marker();
        let mut at = Position {
            line: marker.line().max(1),
            column: marker.col().saturating_add(1),
        };
        let message = error.info();
        let mut path = self.path();
        // A tab is often found while the scanner still reads the previous line's value; the
        // tab, and the key on its line, are what the operator must fix.
        if message.contains("tab") {
            if let Some(tab) = self.next_tab(at) {
                if tab.line > at.line && matches!(path.segments().last(), Some(Segment::Key(_))) {
                    path = path.parent();
                }
                at = tab;
            }
        }
        let line = self.text.lines().nth(at.line - 1).unwrap_or_default();
        let rest: String = line.chars().skip(at.column - 1).collect();
        // When the parser stops before a key on its line, that key is the one to blame, not
        // the last one read.
        let reading_key = match self.stack.last() {
            Some(Frame::Map { pending, .. }) => {
                pending.is_none() || path.segments().is_empty() || at.line > marker.line()
            }
            _ => false,
        };
        let reading_key = reading_key || message.contains("tab");
        if reading_key {
            if let Some((key, _)) = rest.trim_start().split_once(':') {
                let key = key.trim();
                if !key.is_empty() && !key.contains([' ', '{', '[', '#', '"', '\'', '\t']) {
                    path = path.key(key);
                }
            }
        }
        // Text after the root value: the file is probably not YAML (an INI file, say), and
        // every following line would be reported the same way.
        let trailing = message.contains("expected <document start>");
        let message = if trailing {
            "text after the end of the document: a configuration is one YAML mapping of \
             `key: value` lines (is this file YAML?)"
                .to_owned()
        } else if line.chars().take(at.column).any(|c| c == '\t') {
            "a tab indents this line: YAML indents with spaces only (replace the tab with \
             spaces)"
                .to_owned()
        } else {
            message
        };
        SyntaxError {
            at,
            path,
            message,
            terminal: trailing,
        }
    }

    /// The first tab at or after `from`, in this line or the next.
    fn next_tab(&self, from: Position) -> Option<Position> {
        self.text
            .lines()
            .enumerate()
            .skip(from.line - 1)
            .take(2)
            .find_map(|(index, line)| {
                let skip = if index + 1 == from.line {
                    from.column - 1
                } else {
                    0
                };
                line.chars()
                    .enumerate()
                    .skip(skip)
                    .find(|(_, c)| *c == '\t')
                    .map(|(column, _)| Position {
                        line: index + 1,
                        column: column + 1,
                    })
            })
    }
}

/// The position of the last key of `path` in the document, or of its nearest ancestor present
/// (a key left out is reported where its parent is).
pub(crate) fn locate(root: Option<&Node>, path: &KeyPath) -> Position {
    let Some(mut node) = root else {
        return Position::START;
    };
    let mut best = node.start();
    for segment in path.segments() {
        let next = match (segment, &node.value) {
            (Segment::Key(key), Value::Map(_)) => node.entry(key).map(|e| (e.key.at, &e.value)),
            (Segment::Index(index), Value::Seq(items)) => {
                items.get(*index).map(|item| (item.start(), item))
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

    fn root(text: &str) -> Option<Node> {
        parse(text).unwrap_or_else(|errors| panic!("{errors:#?}"))
    }

    #[test]
    fn finds_keys_in_block_and_flow_style() {
        let root = root(DOC);
        let locate = |steps: &[&str]| locate(root.as_ref(), &path(steps));
        assert_eq!(locate(&["version"]), at(1, 1));
        assert_eq!(locate(&["services"]), at(2, 1));
        assert_eq!(locate(&["services", "0"]), at(3, 5));
        assert_eq!(locate(&["services", "0", "tunnels"]), at(4, 5));
        assert_eq!(
            locate(&["services", "0", "tunnels", "0", "priority"]),
            at(5, 40)
        );
        assert_eq!(
            locate(&["services", "0", "tunnels", "1", "provider"]),
            at(7, 9)
        );
        assert_eq!(
            locate(&["services", "0", "tunnels", "1", "run", "1"]),
            at(8, 21)
        );
        assert_eq!(locate(&["services", "1", "tunnels"]), at(10, 5));
        // Absent keys: the nearest ancestor.
        assert_eq!(
            locate(&["services", "0", "tunnels", "1", "address"]),
            at(6, 9)
        );
        assert_eq!(locate(&["services", "7", "name"]), at(2, 1));
        assert_eq!(locate(&["daemon"]), at(1, 1));
        assert_eq!(locate(&["version", "0"]), at(1, 1));
    }

    #[test]
    fn scalars_keep_their_text_and_style() {
        let root = root("a: 22\nb: '22'\nc: !!str 22\nd:\ne: \"x\\ty\"\n").expect("a document");
        let scalar = |key: &str| match &root.get(key).expect("key").value {
            Value::Scalar { text, plain } => (text.clone(), *plain),
            other => panic!("{other:?}"),
        };
        assert_eq!(scalar("a"), ("22".to_owned(), true));
        assert_eq!(scalar("b"), ("22".to_owned(), false));
        assert_eq!(scalar("c"), ("22".to_owned(), false));
        assert!(root.get("d").expect("d").is_null());
        assert_eq!(scalar("e"), ("x\ty".to_owned(), false));
    }

    #[test]
    fn empty_documents_have_no_root() {
        for empty in ["", "\n\n", "# only a comment\n", "---\n"] {
            let root = parse(empty).expect("parses");
            assert!(
                root.is_none() || root.as_ref().is_some_and(Node::is_null),
                "{empty:?}"
            );
        }
    }

    #[test]
    fn every_syntax_error_is_reported() {
        let text = "version: 1\nservices:\n  - name: a\n\ttunnels: []\n  - name: b\n    x: [\n";
        let errors = parse(text).expect_err("two syntax errors");
        let found: Vec<(usize, String)> = errors
            .iter()
            .map(|e| (e.at.line, e.path.to_string()))
            .collect();
        assert_eq!(
            found[0],
            (4, "services[0].tunnels".to_owned()),
            "{errors:#?}"
        );
        assert!(errors[0].message.contains("tab"), "{errors:#?}");
        assert!(errors.len() >= 2, "{errors:#?}");
        assert!(errors[1].at.line >= 6, "{errors:#?}");
    }

    #[test]
    fn a_second_document_is_refused_where_it_starts() {
        let errors = parse("a: 1\n---\na: 2\n").expect_err("two documents");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].at, at(2, 1));
    }

    #[test]
    fn aliases_expand_within_a_budget() {
        let root = root("a: &x { k: 1 }\nb: *x\n").expect("a document");
        assert_eq!(
            root.get("b")
                .and_then(|b| b.get("k"))
                .and_then(Node::as_str),
            Some("1")
        );
        // Each level doubles the document: 2^20 nodes is over the budget.
        let mut laughs = String::from("l0: &l0 [x, x]\n");
        for i in 1..=20 {
            laughs.push_str(&format!("l{i}: &l{i} [*l{j}, *l{j}]\n", j = i - 1));
        }
        let errors = parse(&laughs).expect_err("too big");
        assert!(errors[0].message.contains("more than"), "{errors:#?}");
    }

    #[test]
    fn aliases_cannot_nest_without_end() {
        // Each anchor wraps the previous one in 60 more levels.
        let wrap = |inner: &str| format!("{}{inner}{}", "[".repeat(60), "]".repeat(60));
        let mut text = format!("a0: &a0 {}\n", wrap("1"));
        for i in 1..10 {
            text.push_str(&format!("a{i}: &a{i} {}\n", wrap(&format!("*a{}", i - 1))));
        }
        let errors = parse(&text).expect_err("too deep");
        assert!(errors[0].message.contains("deeper than"), "{errors:#?}");
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!("a: {}1{}\n", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(&deep).is_err());
        let unclosed = "[".repeat(10_000);
        assert!(parse(&unclosed).is_err());
    }
}
