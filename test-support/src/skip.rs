//! The one place a test decides it cannot run here. On a developer's machine a missing tool
//! (sshd, dropbear, root, network namespaces) makes the test print a loud `SKIPPED:` line and
//! pass, so `cargo test` still works on a laptop without OpenSSH. Under `CI=true` — the README's
//! test command, which installs every tool first and also sets `TK_REQUIRE_TOOLS=1` — the same
//! test fails instead: a tool that went missing there is a broken pipeline, not a reason to pass
//! silently.

/// Whether every tool must be present: under `CI=true` (set by CI systems) or
/// `TK_REQUIRE_TOOLS=1` (set by `scripts/test` after installing them). Missing tools then fail.
pub fn required() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| value == "true" || value == "1");
    set("CI") || set("TK_REQUIRE_TOOLS")
}

/// Reports that the calling test cannot run here because of `why`: prints `SKIPPED: why` and
/// returns, or panics with the same reason when [`required`] (under `CI=true`).
#[track_caller]
pub fn skip(why: impl std::fmt::Display) {
    if required() {
        panic!("cannot run this test here, and CI=true requires it: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "CI=true requires it: sshd is not installed")]
    fn when_tools_are_required_a_skip_is_a_failure() {
        // The only test of this crate that touches the environment.
        std::env::set_var("TK_REQUIRE_TOOLS", "1");
        super::skip("sshd is not installed");
    }
}
