//! Values that are correct by construction: ports that are not 0, durations with a unit and a
//! sane size, counts of at least one.
//!
//! The model ([`super::model`]) holds these types, so each rule is written once, here, with
//! one message, and applies wherever a key of that kind appears (parse, don't validate). The
//! messages name the accepted range and, for durations, the format.

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The longest duration any key accepts. Nothing the daemon waits for is measured in months;
/// a larger value is a typo (`99999999999d`) that would leave a tunnel waiting forever.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// [`MAX_DURATION`] as an operator writes it.
const MAX_DURATION_TEXT: &str = "30d";

/// How a duration is written, for messages.
const DURATION_FORMAT: &str = "a number and a unit, e.g. 500ms, 30s, 5m or 2h";

/// The one message for a number outside its type's range. Inside the config reader the problem
/// is recorded and `stand_in` read in its place (see `super::de::report`).
fn out_of_range<T, E: de::Error>(
    value: impl fmt::Display,
    expected: &dyn de::Expected,
    stand_in: T,
) -> Result<T, E> {
    let message = format!("{value} is out of range: expected {expected}");
    if super::de::report(&message) {
        Ok(stand_in)
    } else {
        Err(E::custom(message))
    }
}

/// A whole number type of the model whose zero is refused: the newtype, the non-zero integer it
/// wraps, its plain integer, serde's method and visit names, and the expected range in words.
macro_rules! nonzero {
    ($(#[$doc:meta])* $name:ident($nonzero:ty, $int:ty, $deserialize:ident, $visit:ident, $expected:expr)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name($nonzero);

        impl $name {
            /// The number.
            pub fn get(self) -> $int {
                self.0.get()
            }
        }

        impl From<$name> for $int {
            fn from(value: $name) -> $int {
                value.get()
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct NonZeroVisitor;
                impl Visitor<'_> for NonZeroVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(&$expected)
                    }
                    fn $visit<E: de::Error>(self, value: $int) -> Result<$name, E> {
                        match <$nonzero>::new(value) {
                            Some(value) => Ok($name(value)),
                            None => out_of_range(0, &self, $name(<$nonzero>::MIN)),
                        }
                    }
                    fn visit_u64<E: de::Error>(self, value: u64) -> Result<$name, E> {
                        match <$int>::try_from(value) {
                            Ok(value) => self.$visit(value),
                            Err(_) => out_of_range(value, &self, $name(<$nonzero>::MIN)),
                        }
                    }
                    fn visit_i64<E: de::Error>(self, value: i64) -> Result<$name, E> {
                        match <$int>::try_from(value) {
                            Ok(value) => self.$visit(value),
                            Err(_) => out_of_range(value, &self, $name(<$nonzero>::MIN)),
                        }
                    }
                }
                deserializer.$deserialize(NonZeroVisitor)
            }
        }
    };
}

nonzero!(
    /// A TCP port, 1-65535.
    Port(NonZeroU16, u16, deserialize_u16, visit_u16, "a port from 1 to 65535")
);

nonzero!(
    /// A count of at least one (probes in a row, channels per session, connections).
    Count(
        NonZeroU32,
        u32,
        deserialize_u32,
        visit_u32,
        format!("a whole number from 1 to {}", u32::MAX)
    )
);

/// Reads a duration written as text (`500ms`, `1m 30s`), at most [`MAX_DURATION`].
fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(duration) if duration > MAX_DURATION => Err(format!(
            "`{text}` is too long: a duration may be at most {MAX_DURATION_TEXT}"
        )),
        Ok(duration) => Ok(duration),
        Err(humantime::DurationError::NumberOverflow) => Err(format!(
            "`{text}` is too long: a duration may be at most {MAX_DURATION_TEXT}"
        )),
        Err(_) => Err(format!(
            "`{text}` is not a duration: write {DURATION_FORMAT}"
        )),
    }
}

/// Reads a duration from a scalar; numbers are read as their text so that `interval: 5` gets
/// the "needs a unit" message rather than a type error.
fn deserialize_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
    positive: bool,
) -> Result<Duration, D::Error> {
    struct DurationVisitor(bool);
    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a duration: {DURATION_FORMAT}")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            let checked = parse_duration(text).and_then(|duration| {
                if self.0 && duration.is_zero() {
                    Err(format!(
                        "`{text}` is zero: this duration must be greater than 0"
                    ))
                } else {
                    Ok(duration)
                }
            });
            match checked {
                Ok(duration) => Ok(duration),
                // Inside the config reader: recorded, and one second stands in.
                Err(message) if super::de::report(&message) => Ok(Duration::from_secs(1)),
                Err(message) => Err(E::custom(message)),
            }
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
            self.visit_str(&n.to_string())
        }
    }
    deserializer.deserialize_str(DurationVisitor(positive))
}

/// A duration newtype of the model: its name, whether zero is refused, and its doc.
macro_rules! duration {
    ($(#[$doc:meta])* $name:ident, positive: $positive:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Duration);

        impl $name {
            /// The duration.
            pub fn get(self) -> Duration {
                self.0
            }
        }

        impl From<$name> for Duration {
            fn from(duration: $name) -> Duration {
                duration.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_duration(deserializer, $positive).map($name)
            }
        }
    };
}

duration!(
    /// A duration greater than zero and at most [`MAX_DURATION`]: timeouts, intervals, delays.
    PositiveDuration,
    positive: true
);

duration!(
    /// A duration that may be zero (`0s`: at once, or never, as the key says), at most
    /// [`MAX_DURATION`].
    Delay,
    positive: false
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_name_their_format_and_bound() {
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30d"), Ok(MAX_DURATION));
        let err = parse_duration("-1s").unwrap_err();
        assert_eq!(
            err,
            "`-1s` is not a duration: write a number and a unit, e.g. 500ms, 30s, 5m or 2h"
        );
        assert_eq!(
            parse_duration("31d").unwrap_err(),
            "`31d` is too long: a duration may be at most 30d"
        );
        assert!(parse_duration("99999999999999999999999d")
            .unwrap_err()
            .contains("too long"));
    }
}
