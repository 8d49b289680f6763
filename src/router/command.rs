//! One command run on a router through the pool, and how its result reads.
//!
//! The pool reports three different things through one call: the command ran (exit status or
//! signal), the router could not be reached or the connection died under the command (an error,
//! or a channel that closed without an exit status), or the time limit passed. Reboot detection
//! must tell "unreachable" from "ran and failed", so [`run`] sorts them out once for every
//! caller. The rest is pure: the stderr tail quoted in failures and the `verify` comparison.

use std::time::Duration;

use tunnelkeeper_providers::ssh::{ExecOutput, SshPool, SshTarget};
use tunnelkeeper_providers::ProviderError;

/// Output kept per stream: boot ids, uptimes and check results are tiny; a runaway command
/// must not grow the daemon.
pub(super) const OUTPUT_CAP: usize = 64 * 1024;
/// Bytes of stderr quoted in a failure: the end is where the error usually is.
pub(super) const STDERR_TAIL: usize = 400;
/// Characters of stdout quoted as a check's `got`.
const GOT_LIMIT: usize = 200;

/// How a command ended.
#[derive(Debug)]
pub(super) enum Ran {
    /// It ran to its end: it has an exit status or a signal.
    Finished(ExecOutput),
    /// No connection, no login, or the connection ended before the command did.
    Unreachable(String),
    /// Not finished within the time limit (which includes getting a session).
    TimedOut(String),
}

/// Runs `command` on `target` within `timeout`.
pub(super) async fn run(
    pool: &SshPool,
    target: &SshTarget,
    command: &str,
    timeout: Duration,
) -> Ran {
    classify(pool.exec(target, command, timeout, OUTPUT_CAP).await)
}

fn classify(result: Result<ExecOutput, ProviderError>) -> Ran {
    match result {
        // A channel that closes without an exit status or signal: the connection went away
        // (sshd always reports one or the other for a command that ended).
        Ok(output) if output.exit_status.is_none() && output.exit_signal.is_none() => {
            Ran::Unreachable("the connection ended before the command finished".to_string())
        }
        Ok(output) => Ran::Finished(output),
        Err(err @ ProviderError::Timeout { .. }) => Ran::TimedOut(err.to_string()),
        Err(err) => Ran::Unreachable(err.to_string()),
    }
}

/// How a finished command ended, in words: `exit 3`, `signal KILL`.
pub(super) fn describe_exit(output: &ExecOutput) -> String {
    match (&output.exit_status, &output.exit_signal) {
        (Some(status), _) => format!("exit {status}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit status".to_string(),
    }
}

/// Why a finished command counts as failed, with the end of its stderr: `exit 3: boom`.
pub(super) fn failure(output: &ExecOutput) -> String {
    let tail = stderr_tail(&output.stderr, STDERR_TAIL);
    if tail.is_empty() {
        describe_exit(output)
    } else {
        format!("{}: {tail}", describe_exit(output))
    }
}

/// The last `limit` bytes of `stderr` (never starting inside a UTF-8 character), trimmed.
pub(super) fn stderr_tail(stderr: &[u8], limit: usize) -> String {
    let mut start = stderr.len().saturating_sub(limit);
    // Skip continuation bytes (10xxxxxx) so the cut does not leave half a character.
    while start < stderr.len() && (stderr[start] & 0xC0) == 0x80 {
        start += 1;
    }
    String::from_utf8_lossy(&stderr[start..]).trim().to_string()
}

/// The result of one `verify` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verdict {
    /// Whether it passed.
    pub pass: bool,
    /// What it should give: the `expect` string, or `exit 0`.
    pub expected: String,
    /// What it gave: trimmed stdout, `exit N`, or how it failed.
    pub got: String,
}

/// Judges a finished check: with `expect`, the trimmed stdout must equal it; without, exit
/// status 0 passes.
pub(super) fn evaluate(expect: Option<&str>, output: &ExecOutput) -> Verdict {
    match expect {
        Some(expect) => {
            let text = String::from_utf8_lossy(&output.stdout);
            let stdout = text.trim();
            let got = if stdout.is_empty() && !output.success() {
                // "" says nothing; how the command ended does.
                describe_exit(output)
            } else {
                shorten(stdout)
            };
            Verdict {
                pass: stdout == expect.trim(),
                expected: expect.to_string(),
                got,
            }
        }
        None => Verdict {
            pass: output.success(),
            expected: "exit 0".to_string(),
            got: describe_exit(output),
        },
    }
}

/// A check that could not finish (timed out) fails with the error as `got`.
pub(super) fn not_finished(expect: Option<&str>, error: String) -> Verdict {
    Verdict {
        pass: false,
        expected: expect.map_or_else(|| "exit 0".to_string(), str::to_string),
        got: error,
    }
}

fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(GOT_LIMIT).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(status: Option<u32>, stdout: &str, stderr: &str) -> ExecOutput {
        ExecOutput {
            exit_status: status,
            exit_signal: None,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_stderr_tail_keeps_the_end_trimmed_and_whole_characters() {
        assert_eq!(stderr_tail(b"  boom\n", 400), "boom");
        let long = format!("{}END\n", "x".repeat(1000));
        let tail = stderr_tail(long.as_bytes(), 400);
        assert_eq!(tail.len(), 399);
        assert!(tail.ends_with("END"));
        // "é" is two bytes: a cut through it starts after it instead of emitting U+FFFD.
        let accents = "éééé".as_bytes();
        assert_eq!(stderr_tail(accents, 3), "é");
        assert_eq!(stderr_tail(b"", 400), "");
    }

    #[test]
    fn failures_name_the_exit_and_quote_stderr() {
        assert_eq!(failure(&output(Some(3), "", "boom\n")), "exit 3: boom");
        assert_eq!(failure(&output(Some(1), "", "")), "exit 1");
        let killed = ExecOutput {
            exit_signal: Some("KILL".into()),
            ..ExecOutput::default()
        };
        assert_eq!(failure(&killed), "signal KILL");
    }

    #[test]
    fn expect_compares_trimmed_stdout() {
        let v = evaluate(Some("yes"), &output(Some(0), "yes\n", ""));
        assert!(v.pass);
        assert_eq!(v.got, "yes");
        let v = evaluate(Some("up"), &output(Some(0), "down\n", ""));
        assert!(!v.pass);
        assert_eq!((v.expected.as_str(), v.got.as_str()), ("up", "down"));
        // Nothing printed and a failed exit: the exit is the telling part.
        let v = evaluate(Some("yes"), &output(Some(1), "", ""));
        assert!(!v.pass);
        assert_eq!(v.got, "exit 1");
        // The expectation is about the output only.
        assert!(evaluate(Some("1"), &output(Some(2), " 1 ", "")).pass);
    }

    #[test]
    fn without_expect_exit_zero_passes() {
        let v = evaluate(None, &output(Some(0), "whatever", ""));
        assert!(v.pass);
        assert_eq!(v.got, "exit 0");
        let v = evaluate(None, &output(Some(4), "", ""));
        assert!(!v.pass);
        assert_eq!((v.expected.as_str(), v.got.as_str()), ("exit 0", "exit 4"));
    }

    #[test]
    fn a_channel_closed_without_status_is_a_lost_connection() {
        assert!(matches!(
            classify(Ok(ExecOutput::default())),
            Ran::Unreachable(_)
        ));
        assert!(matches!(
            classify(Ok(output(Some(1), "", ""))),
            Ran::Finished(_)
        ));
        let timeout = ProviderError::Timeout {
            what: "exec".into(),
            after: Duration::from_secs(1),
        };
        assert!(matches!(classify(Err(timeout)), Ran::TimedOut(_)));
        let refused = ProviderError::Ssh {
            target: "root@r:22".into(),
            detail: "connection refused".into(),
        };
        assert!(matches!(classify(Err(refused)), Ran::Unreachable(_)));
    }
}
