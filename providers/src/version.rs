//! Agent version floors: ask a provider's CLI for its version at start and refuse one older
//! than the features tunnelkeeper passes it need, naming the minimum (instead of a silent
//! misbehaviour, or a usage error that does not say "too old"). The floors themselves, and the
//! upstream changelog each comes from, are in docs/PROVIDERS.md.

use std::fmt;
use std::time::Duration;

use crate::process::{self, RunSpec};
use crate::ProviderError;

/// How long a `version` call may take: it only prints a string.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A `major.minor.patch` version (calendar versions such as cloudflared's `2025.4.0` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The first word of `text` that starts with `X.Y.Z` (digits), ignoring a suffix after it
/// (`1.103.0-t1234abcd`, `3.39.0-beta`). Reads `ngrok version 3.39.0`,
/// `cloudflared version 2026.8.2 (built ...)` and tailscale's `1.103.0` first line alike.
pub fn find_version(text: &str) -> Option<Version> {
    text.split_whitespace().find_map(|word| {
        let mut parts = word.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let rest = parts.next()?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let patch = digits.parse().ok()?;
        Some(Version(major, minor, patch))
    })
}

/// Runs `argv` (a CLI's version command, from its spec's `version_argv`) and returns the
/// version its first line names, if any: for `tunnelkeeper check --deep`, which reports
/// versions without knowing any provider's flags.
pub async fn probe(argv: Vec<String>, tag: &str) -> Result<Option<Version>, ProviderError> {
    let (status, first_line) = run_version(argv, tag).await?;
    Ok(find_version(&first_line).filter(|_| status.success()))
}

/// Runs a version command: its exit status, and the first line it printed (stdout, else
/// stderr).
async fn run_version(
    argv: Vec<String>,
    tag: &str,
) -> Result<(process::ExitInfo, String), ProviderError> {
    let mut spec = RunSpec::new(argv);
    spec.timeout = VERSION_TIMEOUT;
    spec.output_cap = 16 * 1024;
    spec.tag = tag.to_string();
    let out = process::run(spec).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_line = stdout.lines().chain(stderr.lines()).next().unwrap_or("");
    Ok((out.status, first_line.to_owned()))
}

/// Runs `argv` (the CLI's version command) and checks that its version is at least `floor`.
/// `needs` says what needs that version, for the message.
pub async fn require(
    argv: Vec<String>,
    tag: &str,
    floor: Version,
    needs: &str,
) -> Result<Version, ProviderError> {
    let shown = argv.join(" ");
    let (status, first_line) = run_version(argv, tag).await?;
    let found = if status.success() {
        find_version(&first_line)
    } else {
        None
    };
    match found {
        Some(version) if version >= floor => Ok(version),
        Some(version) => Err(ProviderError::Config(format!(
            "`{shown}` says {version}; tunnelkeeper needs at least {floor} ({needs}): upgrade it"
        ))),
        None => Err(ProviderError::Config(format!(
            "`{shown}` {} and printed no version ({:?}); tunnelkeeper needs at least {floor} \
             ({needs})",
            status,
            first_line.chars().take(200).collect::<String>()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_each_cli() {
        assert_eq!(
            find_version("ngrok version 3.39.0"),
            Some(Version(3, 39, 0))
        );
        assert_eq!(
            find_version("cloudflared version 2026.8.2 (built 2026-08-14-12:17 UTC)"),
            Some(Version(2026, 8, 2))
        );
        assert_eq!(
            find_version("1.103.0-t1234abcd-g5678"),
            Some(Version(1, 103, 0))
        );
        assert_eq!(find_version("version unknown"), None);
        assert!(Version(3, 9, 0) < Version(3, 16, 0));
        assert!(Version(2025, 4, 0) > Version(2025, 2, 1));
    }
}
