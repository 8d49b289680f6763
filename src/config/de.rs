//! Reads the typed model ([`super::model`]) from the YAML tree, reporting every type error of
//! the file instead of stopping at the first.
//!
//! serde stops at the first error, so this deserializer never lets one it finds itself escape:
//! a value of the wrong type, an out-of-range number, an unknown key or enum value, a repeated
//! key is recorded with its position and key path, and a stand-in ([`Placeholder`]: the
//! smallest valid value of the requested shape) is read in its place. The model's own types
//! (`super::scalar`: a zero port, a duration without a unit) do the same through [`report`].
//! What still escapes (a missing key, raised by serde's derive) is recorded where it surfaces,
//! the key is supplied as a stand-in, and the model is read again: every pass finds at least
//! one new error or ends the loop, and the number of passes is bounded.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};

use super::path::{KeyPath, Position};
use super::yaml::{Entry, Node, Value};

/// Passes at most: each one reveals at least one error that escaped (a missing key).
const MAX_PASSES: usize = 64;

/// The text a stand-in string holds: also a valid duration, so duration types accept it.
const PLACEHOLDER_TEXT: &str = "1s";

/// One type error: where, which key, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Position of the offending value (or key, for an unknown or repeated key).
    pub(crate) at: Position,
    /// The key path.
    pub(crate) path: KeyPath,
    /// What is wrong.
    pub(crate) message: String,
}

thread_local! {
    /// While [`read`] runs on this thread: the node being read and the rule violations its
    /// value's type reported through [`report`].
    static SOFT: RefCell<Option<Soft>> = const { RefCell::new(None) };
}

/// See [`SOFT`].
struct Soft {
    at: Position,
    path: KeyPath,
    problems: Vec<Problem>,
}

/// Called by a type of the model whose rule a value breaks (a zero port, a duration without a
/// unit). Inside [`read`] the problem is recorded at the value being read and `true` is
/// returned: the type then stands in a valid value and reading goes on in the same pass (a file
/// with a thousand such mistakes is read once, not a thousand times). Elsewhere `false`: the
/// type returns the error as usual.
pub(crate) fn report(message: &str) -> bool {
    SOFT.with(|soft| match soft.borrow_mut().as_mut() {
        Some(soft) => {
            let problem = Problem {
                at: soft.at,
                path: soft.path.clone(),
                message: message.to_owned(),
            };
            soft.problems.push(problem);
            true
        }
        None => false,
    })
}

/// Ends the [`SOFT`] collection when [`read`] returns, however it returns.
struct SoftGuard;

impl Drop for SoftGuard {
    fn drop(&mut self) {
        SOFT.with(|soft| soft.borrow_mut().take());
    }
}

/// Reads a `T` from `root`, or every problem found, in file order.
pub(crate) fn read<T: DeserializeOwned>(root: &Node) -> Result<T, Vec<Problem>> {
    let state = State::default();
    SOFT.with(|soft| {
        *soft.borrow_mut() = Some(Soft {
            at: root.at,
            path: KeyPath::root(),
            problems: Vec::new(),
        });
    });
    let _guard = SoftGuard;
    for _ in 0..MAX_PASSES {
        let marks = state.marks();
        let de = De {
            node: root,
            path: KeyPath::root(),
            state: &state,
        };
        let result = T::deserialize(de);
        let reported = SOFT.with(|soft| {
            soft.borrow_mut()
                .as_mut()
                .map(|soft| std::mem::take(&mut soft.problems))
                .unwrap_or_default()
        });
        for problem in reported {
            state.problem(problem.at, problem.path, problem.message);
        }
        match result {
            Ok(value) if state.problems.borrow().is_empty() => return Ok(value),
            Ok(_) => break,
            Err(error) => {
                if !error.recorded {
                    state.record(root, &KeyPath::root(), &error);
                }
                if state.marks() == marks {
                    // Nothing new to stand in for: another pass would fail the same way.
                    break;
                }
            }
        }
    }
    let mut problems = state.problems.into_inner();
    problems.sort_by_key(|p| (p.at.line, p.at.column));
    Err(problems)
}

/// What the passes share.
#[derive(Default)]
struct State {
    problems: RefCell<Vec<Problem>>,
    /// Nodes (by address: the tree does not move while it is read) read as stand-ins.
    poisoned: RefCell<HashSet<usize>>,
    /// Keys missing from a mapping, supplied as stand-ins.
    missing: RefCell<HashSet<(usize, &'static str)>>,
}

fn address(node: &Node) -> usize {
    std::ptr::from_ref(node) as usize
}

impl State {
    fn marks(&self) -> usize {
        self.poisoned.borrow().len() + self.missing.borrow().len()
    }

    fn problem(&self, at: Position, path: KeyPath, message: String) {
        let problem = Problem { at, path, message };
        let mut problems = self.problems.borrow_mut();
        // Later passes find earlier errors again.
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    }

    /// Records an error that escaped from reading `node` at `path`, and marks what to stand
    /// in for in the next pass.
    fn record(&self, node: &Node, path: &KeyPath, error: &Error) {
        match error.missing {
            Some(field) => {
                self.problem(node.start(), path.key(field), error.message.clone());
                self.missing.borrow_mut().insert((address(node), field));
            }
            None => {
                self.problem(node.at, path.clone(), error.message.clone());
                self.poisoned.borrow_mut().insert(address(node));
            }
        }
    }

    fn is_poisoned(&self, node: &Node) -> bool {
        self.poisoned.borrow().contains(&address(node))
    }
}

/// The error serde passes around while reading.
#[derive(Debug)]
pub(crate) struct Error {
    message: String,
    /// `Some(key)` for a missing key: recorded at the mapping, under the key's name.
    missing: Option<&'static str>,
    /// Already recorded by an inner reader: only passing through.
    recorded: bool,
}

impl Error {
    fn new(message: String) -> Self {
        Error {
            message,
            missing: None,
            recorded: false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Error::new(message.to_string())
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Error::new(format!(
            "expected {}, found {}",
            expected_words(expected),
            unexpected_words(&unexpected)
        ))
    }

    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        let expected = expected_words(expected);
        Error::new(match unexpected {
            Unexpected::Unsigned(n) => format!("{n} is out of range: expected {expected}"),
            Unexpected::Signed(n) => format!("{n} is out of range: expected {expected}"),
            Unexpected::Float(n) => format!("{n} is out of range: expected {expected}"),
            other => format!("{} is not {expected}", unexpected_words(&other)),
        })
    }

    fn missing_field(field: &'static str) -> Self {
        Error {
            message: format!("missing key `{field}`"),
            missing: Some(field),
            recorded: false,
        }
    }
}

/// serde's names for what a visitor expects, in words an operator knows.
fn expected_words(expected: &dyn Expected) -> String {
    let text = expected.to_string();
    let range = |min: i128, max: i128| format!("a whole number from {min} to {max}");
    match text.as_str() {
        "u8" => range(0, u8::MAX.into()),
        "u16" => range(0, u16::MAX.into()),
        "u32" => range(0, u32::MAX.into()),
        "u64" => range(0, u64::MAX.into()),
        "i8" => range(i8::MIN.into(), i8::MAX.into()),
        "i16" => range(i16::MIN.into(), i16::MAX.into()),
        "i32" => range(i32::MIN.into(), i32::MAX.into()),
        "i64" => range(i64::MIN.into(), i64::MAX.into()),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" => "`true` or `false`".to_owned(),
        "a string" | "a borrowed string" | "string or map" => "a text value".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        "option" => "a value".to_owned(),
        _ if text.starts_with("struct ") => "a mapping".to_owned(),
        _ => text,
    }
}

fn unexpected_words(unexpected: &Unexpected<'_>) -> String {
    match unexpected {
        Unexpected::Bool(b) => format!("`{b}`"),
        Unexpected::Unsigned(n) => format!("the number {n}"),
        Unexpected::Signed(n) => format!("the number {n}"),
        Unexpected::Float(n) => format!("the number {n}"),
        Unexpected::Str(s) => format!("the text `{}`", short(s)),
        Unexpected::Unit => "an empty value".to_owned(),
        Unexpected::Seq => "a list".to_owned(),
        Unexpected::Map => "a mapping".to_owned(),
        other => other.to_string(),
    }
}

/// At most 60 characters of `text`, for quoting in a message.
fn short(text: &str) -> String {
    if text.chars().count() <= 60 {
        text.to_owned()
    } else {
        let head: String = text.chars().take(57).collect();
        format!("{head}...")
    }
}

/// A plain scalar, read by YAML 1.2's core schema.
enum Resolved {
    Null,
    Bool(bool),
    /// An integer; `None` when it does not even fit 128 bits.
    Int(Option<i128>),
    Float(f64),
    Str,
}

fn resolve(node: &Node) -> Option<Resolved> {
    let Value::Scalar { text, plain } = &node.value else {
        return None;
    };
    if !plain {
        return Some(Resolved::Str);
    }
    if node.is_null() {
        return Some(Resolved::Null);
    }
    Some(match text.as_str() {
        "true" | "True" | "TRUE" => Resolved::Bool(true),
        "false" | "False" | "FALSE" => Resolved::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Resolved::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Resolved::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Resolved::Float(f64::NAN),
        _ => {
            if let Some(int) = integer(text) {
                Resolved::Int(int)
            } else if is_float(text) {
                text.parse().map_or(Resolved::Str, Resolved::Float)
            } else {
                Resolved::Str
            }
        }
    })
}

/// `Some(value)` for a core-schema integer (`-12`, `0x1f`, `0o17`), `Some(None)` when it is one
/// but too large for 128 bits, `None` when the text is not an integer.
fn integer(text: &str) -> Option<Option<i128>> {
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (digits, radix) = if let Some(hex) = rest.strip_prefix("0x") {
        (hex, 16)
    } else if let Some(octal) = rest.strip_prefix("0o") {
        (octal, 8)
    } else {
        (rest, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(digits, radix).ok();
    Some(magnitude.map(|m| if negative { -m } else { m }))
}

fn is_float(text: &str) -> bool {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let mantissa_ok = {
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        (!int.is_empty() || !frac.is_empty())
            && int.chars().all(|c| c.is_ascii_digit())
            && frac.chars().all(|c| c.is_ascii_digit())
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

/// What a node is, for "found …" in a message.
fn found(node: &Node) -> String {
    match &node.value {
        Value::Seq(_) => "a list".to_owned(),
        Value::Map(_) => "a mapping".to_owned(),
        Value::Scalar { text, .. } => match resolve(node) {
            Some(Resolved::Null) => "an empty value".to_owned(),
            Some(Resolved::Bool(_)) => format!("`{text}`"),
            Some(Resolved::Int(_) | Resolved::Float(_)) => format!("the number {text}"),
            _ => format!("the text `{}`", short(text)),
        },
    }
}

/// The closest of `candidates` to a misspelt `word`, if one is close enough to be meant.
pub(crate) fn did_you_mean<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&word.to_lowercase(), c), *c))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn one_of(candidates: &[&str]) -> String {
    let quoted: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
    quoted.join(", ")
}

/// The message for a key a section does not have.
pub(crate) fn unknown_key(key: &str, fields: &[&str]) -> String {
    match did_you_mean(key, fields) {
        Some(meant) => format!("unknown key `{key}`: did you mean `{meant}`?"),
        None => format!("unknown key `{key}`, expected one of {}", one_of(fields)),
    }
}

/// Reads one node.
struct De<'a> {
    node: &'a Node,
    path: KeyPath,
    state: &'a State,
}

impl De<'_> {
    /// Marks this node as the one being read, for [`report`].
    fn here(&self) {
        SOFT.with(|soft| {
            if let Some(soft) = soft.borrow_mut().as_mut() {
                soft.at = self.node.at;
                soft.path = self.path.clone();
            }
        });
    }

    fn problem(&self, message: String) {
        self.state.problem(self.node.at, self.path.clone(), message);
    }

    fn mismatch(&self, expected: &dyn Expected) {
        self.problem(format!(
            "expected {}, found {}",
            expected_words(expected),
            found(self.node)
        ));
    }

    /// The integer a node holds, checked against `T`'s range: `Err(())` once the problem is
    /// recorded.
    fn int<T: TryFrom<i128>>(&self, expected: &dyn Expected) -> Result<T, ()> {
        let text = self.node.as_str().unwrap_or_default();
        match resolve(self.node) {
            Some(Resolved::Int(Some(n))) => T::try_from(n).map_err(|_| {
                self.problem(format!(
                    "{n} is out of range: expected {}",
                    expected_words(expected)
                ));
            }),
            Some(Resolved::Int(None)) => {
                self.problem(format!(
                    "{text} is out of range: expected {}",
                    expected_words(expected)
                ));
                Err(())
            }
            _ => {
                self.mismatch(expected);
                Err(())
            }
        }
    }

    fn entries(&self) -> Option<&[Entry]> {
        match &self.node.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }
}

/// The methods both deserializers answer the same way: by the shape they stand for.
macro_rules! forwarded {
    () => {
        fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_f64(visitor)
        }

        fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_str(visitor)
        }

        fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_str(visitor)
        }

        fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_bytes(visitor)
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_unit(visitor)
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            _len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_seq(visitor)
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_seq(visitor)
        }

        fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_unit()
        }
    };
}

macro_rules! integers {
    ($($method:ident $visit:ident $ty:ty,)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.int::<$ty>(&visitor) {
                Ok(n) => {
                    self.here();
                    visitor.$visit(n)
                }
                Err(()) => Placeholder.$method(visitor),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for De<'_> {
    type Error = Error;

    forwarded!();

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.node.value {
            Value::Seq(items) => visitor.visit_seq(Seq::new(items, &self)),
            Value::Map(entries) => visitor.visit_map(Map::new(entries, &self, None)),
            Value::Scalar { text, .. } => match resolve(self.node) {
                Some(Resolved::Null) => visitor.visit_unit(),
                Some(Resolved::Bool(b)) => visitor.visit_bool(b),
                Some(Resolved::Int(Some(n))) => match u64::try_from(n) {
                    Ok(n) => visitor.visit_u64(n),
                    Err(_) => match i64::try_from(n) {
                        Ok(n) => visitor.visit_i64(n),
                        Err(_) => visitor.visit_i128(n),
                    },
                },
                Some(Resolved::Float(f)) => visitor.visit_f64(f),
                _ => visitor.visit_str(text),
            },
        }
    }

    integers! {
        deserialize_u8 visit_u8 u8,
        deserialize_u16 visit_u16 u16,
        deserialize_u32 visit_u32 u32,
        deserialize_u64 visit_u64 u64,
        deserialize_u128 visit_u128 u128,
        deserialize_i8 visit_i8 i8,
        deserialize_i16 visit_i16 i16,
        deserialize_i32 visit_i32 i32,
        deserialize_i64 visit_i64 i64,
        deserialize_i128 visit_i128 i128,
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match resolve(self.node) {
            Some(Resolved::Bool(b)) => visitor.visit_bool(b),
            _ => {
                self.mismatch(&visitor);
                Placeholder.deserialize_bool(visitor)
            }
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match resolve(self.node) {
            Some(Resolved::Float(f)) => visitor.visit_f64(f),
            // Precision is not an issue for the config's small factors.
            #[allow(clippy::cast_precision_loss)]
            Some(Resolved::Int(Some(n))) => visitor.visit_f64(n as f64),
            _ => {
                self.mismatch(&visitor);
                Placeholder.deserialize_f64(visitor)
            }
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mut chars = self.node.as_str().unwrap_or_default().chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor.visit_char(c),
            _ => {
                self.mismatch(&visitor);
                Placeholder.deserialize_char(visitor)
            }
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Any scalar reads as its text (`run: [sleep, 5]` is two strings), except nothing.
        match &self.node.value {
            Value::Scalar { text, .. } if !self.node.is_null() => {
                self.here();
                visitor.visit_str(text)
            }
            _ => {
                self.mismatch(&visitor);
                Placeholder.deserialize_str(visitor)
            }
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.mismatch(&visitor);
        Placeholder.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.node.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.node.is_null() {
            visitor.visit_unit()
        } else {
            self.mismatch(&visitor);
            Placeholder.deserialize_unit(visitor)
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.node.value {
            Value::Seq(items) => visitor.visit_seq(Seq::new(items, &self)),
            // `key:` with nothing after it is an empty list.
            _ if self.node.is_null() => visitor.visit_seq(Seq::new(&[], &self)),
            _ => {
                self.mismatch(&visitor);
                Placeholder.deserialize_seq(visitor)
            }
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.entries() {
            Some(entries) => visitor.visit_map(Map::new(entries, &self, None)),
            None if self.node.is_null() => visitor.visit_map(Map::new(&[], &self, None)),
            None => {
                self.mismatch(&visitor);
                Placeholder.deserialize_map(visitor)
            }
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.entries() {
            Some(entries) => visitor.visit_map(Map::new(entries, &self, Some(fields))),
            // `daemon:` with nothing after it: no settings.
            None if self.node.is_null() => visitor.visit_map(Map::new(&[], &self, Some(fields))),
            None => {
                self.mismatch(&visitor);
                Placeholder.deserialize_struct(name, fields, visitor)
            }
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.node.as_str().filter(|_| !self.node.is_null()) {
            Some(text) if variants.contains(&text) => visitor.visit_enum(text.into_deserializer()),
            Some(text) => {
                self.problem(match did_you_mean(text, variants) {
                    Some(meant) => format!("unknown value `{text}`: did you mean `{meant}`?"),
                    None => format!(
                        "unknown value `{text}`, expected one of {}",
                        one_of(variants)
                    ),
                });
                Placeholder.deserialize_enum(name, variants, visitor)
            }
            None => {
                self.problem(format!(
                    "expected one of {}, found {}",
                    one_of(variants),
                    found(self.node)
                ));
                Placeholder.deserialize_enum(name, variants, visitor)
            }
        }
    }
}

/// Reads `seed` from `node`, recording an error that escapes and marking the node.
fn read_value<'de, S: DeserializeSeed<'de>>(
    seed: S,
    node: &Node,
    path: KeyPath,
    state: &State,
) -> Result<S::Value, Error> {
    if state.is_poisoned(node) {
        return seed.deserialize(Placeholder);
    }
    let result = seed.deserialize(De {
        node,
        path: path.clone(),
        state,
    });
    result.map_err(|mut error| {
        if !error.recorded {
            state.record(node, &path, &error);
            error.recorded = true;
        }
        error
    })
}

/// The items of a sequence.
struct Seq<'a> {
    items: std::slice::Iter<'a, Node>,
    index: usize,
    path: KeyPath,
    state: &'a State,
}

impl<'a> Seq<'a> {
    fn new(items: &'a [Node], de: &De<'a>) -> Self {
        Seq {
            items: items.iter(),
            index: 0,
            path: de.path.clone(),
            state: de.state,
        }
    }
}

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let path = self.path.index(self.index);
        self.index += 1;
        read_value(seed, item, path, self.state).map(Some)
    }
}

/// The entries of a mapping. For a struct (`fields` given) unknown and repeated keys are
/// reported and left out, and keys marked missing are supplied as stand-ins.
struct Map<'a> {
    entries: Vec<(&'a str, &'a Node)>,
    missing: Vec<&'static str>,
    next: usize,
    value: Option<&'a Node>,
    path: KeyPath,
    state: &'a State,
}

impl<'a> Map<'a> {
    fn new(entries: &'a [Entry], de: &De<'a>, fields: Option<&'static [&'static str]>) -> Self {
        let mut kept = Vec::with_capacity(entries.len());
        let mut seen: HashMap<&str, Position> = HashMap::new();
        for entry in entries {
            let key = match &entry.key.value {
                Value::Scalar { text, .. } => text.as_str(),
                _ => {
                    de.state.problem(
                        entry.key.at,
                        de.path.clone(),
                        "a key must be a name, not a list or a mapping".to_owned(),
                    );
                    continue;
                }
            };
            if let Some(fields) = fields {
                if !fields.contains(&key) {
                    de.state
                        .problem(entry.key.at, de.path.key(key), unknown_key(key, fields));
                    continue;
                }
            }
            if let Some(first) = seen.get(key) {
                de.state.problem(
                    entry.key.at,
                    de.path.key(key),
                    format!("`{key}` is given twice (first at line {})", first.line),
                );
                continue;
            }
            seen.insert(key, entry.key.at);
            kept.push((key, &entry.value));
        }
        let missing = fields
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|field| {
                !seen.contains_key(field)
                    && de
                        .state
                        .missing
                        .borrow()
                        .contains(&(address(de.node), *field))
            })
            .collect();
        Map {
            entries: kept,
            missing,
            next: 0,
            value: None,
            path: de.path.clone(),
            state: de.state,
        }
    }
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let index = self.next;
        self.next += 1;
        if let Some((key, value)) = self.entries.get(index) {
            self.value = Some(value);
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
        match self.missing.get(index - self.entries.len()) {
            Some(field) => {
                self.value = None;
                seed.deserialize(field.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let index = self.next.saturating_sub(1);
        match (self.value.take(), self.entries.get(index)) {
            (Some(node), Some((key, _))) => read_value(seed, node, self.path.key(key), self.state),
            // A missing key's stand-in.
            _ => seed.deserialize(Placeholder),
        }
    }
}

/// The smallest valid value of whatever shape is asked for: what a broken value is read as,
/// so that reading goes on to find the next error. Never seen by validation: a file with a type
/// error stops before it.
struct Placeholder;

impl<'de> de::Deserializer<'de> for Placeholder {
    type Error = Error;

    forwarded!();

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str(PLACEHOLDER_TEXT)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(false)
    }

    // One is in range of every number type the model has (ports and counts start at 1).
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u8(1)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u16(1)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u32(1)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u64(1)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u128(1)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i8(1)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i16(1)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(1)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(1)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i128(1)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f64(1.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_char('x')
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str(PLACEHOLDER_TEXT)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_none()
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(de::value::SeqDeserializer::new(std::iter::empty::<
            Placeholder,
        >()))
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(de::value::MapDeserializer::new(std::iter::empty::<(
            Placeholder,
            Placeholder,
        )>()))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // Every field present, so a required one is never missing.
        visitor.visit_map(de::value::MapDeserializer::new(
            fields.iter().map(|field| (*field, Placeholder)),
        ))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let first = variants.first().copied().unwrap_or_default();
        visitor.visit_enum(first.into_deserializer())
    }
}

impl<'de> IntoDeserializer<'de, Error> for Placeholder {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}
