//! Go's `time.Duration` text, as the agents print it (`87ms`, `1.5s`, `850µs`, `1m2.5s`, `0s`).

use std::time::Duration;

/// A Go duration string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration")]
pub struct BadDuration(pub String);

/// Parses a non-negative Go duration the way `time.ParseDuration` does: one or more
/// `<number><unit>` parts, a number with an optional fraction, units `ns`, `us`/`µs`/`μs`,
/// `ms`, `s`, `m`, `h`; a bare `0` is zero. Integer arithmetic, so `1.000000001s` is exact.
pub fn parse_go_duration(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(text.to_string());
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(bad());
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int_digits, after) = rest.split_at(int_len);
        let (frac_digits, after) = match after.strip_prefix('.') {
            Some(after) => {
                let frac_len = after
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(after.len());
                after.split_at(frac_len)
            }
            None => ("", after),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let whole: u128 = if int_digits.is_empty() {
            0
        } else {
            int_digits.parse().map_err(|_| bad())?
        };
        // Digits past the nanosecond cannot change the result; 30 keep the power in range.
        let frac_digits = &frac_digits[..frac_digits.len().min(30)];
        let frac: u128 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| bad())?
        };
        let scale = 10u128.pow(u32::try_from(frac_digits.len()).map_err(|_| bad())?);
        let part = whole
            .checked_mul(per_unit)
            .and_then(|n| n.checked_add(frac.checked_mul(per_unit)? / scale))
            .ok_or_else(bad)?;
        nanos = nanos.checked_add(part).ok_or_else(bad)?;
        rest = after;
    }
    let nanos = u64::try_from(nanos).map_err(|_| bad())?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Option<Duration> {
        parse_go_duration(text).ok()
    }

    #[test]
    fn reads_what_ngrok_prints() {
        assert_eq!(ok("87ms"), Some(Duration::from_millis(87)));
        assert_eq!(ok("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(ok("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(ok("250us"), Some(Duration::from_micros(250)));
        assert_eq!(ok("1m2.5s"), Some(Duration::from_millis(62_500)));
        assert_eq!(ok("0s"), Some(Duration::ZERO));
        assert_eq!(ok("0"), Some(Duration::ZERO));
        assert_eq!(ok("12.345678ms"), Some(Duration::from_nanos(12_345_678)));
        assert_eq!(ok(""), None);
        assert_eq!(ok("fast"), None);
        assert_eq!(ok("87 ms"), None);
        assert_eq!(ok("12"), None);
        assert_eq!(ok("-5ms"), None);
    }

    #[test]
    fn reads_what_tailscale_ping_prints() {
        assert_eq!(ok("850µs"), Some(Duration::from_micros(850)));
        assert_eq!(ok("850μs"), Some(Duration::from_micros(850)));
        assert_eq!(ok("23ms"), Some(Duration::from_millis(23)));
        assert_eq!(ok("1.204s"), Some(Duration::from_millis(1204)));
        assert_eq!(ok("2h45m"), Some(Duration::from_secs(9900)));
        assert_eq!(ok("ms"), None);
        assert_eq!(ok("5"), None);
        assert_eq!(ok("5parsecs"), None);
        assert_eq!(ok("."), None);
        assert_eq!(ok("1..5s"), None);
    }

    #[test]
    fn is_exact_where_floats_are_not() {
        // 1.000000001 s as f64 seconds rounds to 1.000000000999... s.
        assert_eq!(ok("1.000000001s"), Some(Duration::new(1, 1)));
        assert_eq!(ok("0.1s"), Some(Duration::from_millis(100)));
        assert_eq!(ok(".5s"), Some(Duration::from_millis(500)));
        assert_eq!(ok("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(ok("99999999999999999999h"), None);
        assert_eq!(
            parse_go_duration("5x").unwrap_err().to_string(),
            "\"5x\" is not a duration"
        );
    }
}
