//! The files in `systemd/`, checked with systemd's own offline tools (no running systemd needed):
//! `systemd-analyze verify` on the unit (a copy whose `ExecStart=` and `ExecReload=` point at the
//! binary cargo built, since verify insists the command exists), `systemd-analyze security --offline=true`
//! against the exposure figure recorded in docs/SYSTEMD.md, and `systemd-sysusers` /
//! `systemd-tmpfiles` applied to a scratch root directory.
//!
//! The tools come with Debian's `systemd` package, which `scripts/test` installs when missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_tunnelkeeper");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The highest acceptable `systemd-analyze security` exposure, in tenths (13 = 1.3 "OK"):
/// the value measured with systemd 252 when the unit was last tightened. A change that raises
/// it must be a deliberate one: update this, the unit's comment and docs/SYSTEMD.md together.
const MAX_EXPOSURE_TENTHS: u32 = 13;

/// The unit's `ExecStart=` / `ExecReload=` binary, replaced by the cargo-built one in the staged
/// copy.
const INSTALLED_BIN: &str = "/usr/bin/tunnelkeeper";

/// Service settings that systemd 247 (Ubuntu 22.04), the oldest the unit supports, does not
/// know; each with the version that added it. 252 here would only warn about them, 247 too, and
/// then run the service differently (`Type=notify-reload` falls back to `Type=simple`: no
/// readiness, no reload).
const NEWER_THAN_247: &[(&str, u32)] = &[
    ("Type=notify-reload", 253),
    ("ReloadSignal=", 253),
    ("OpenFile=", 253),
    ("MemoryKSM=", 254),
    ("RestartSteps=", 254),
    ("RestartMaxDelaySec=", 254),
    ("RestartMode=", 254),
    ("SurviveFinalKillSignal=", 255),
    ("ProtectControlGroups=private", 257),
    ("PrivateUsers=full", 257),
    ("ProtectHostname=private", 257),
    ("PrivatePIDs=", 257),
];

fn repo_file(path: &str) -> String {
    let path = Path::new(ROOT).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs a systemd tool; a missing tool fails the test with what to do about it.
fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_LOG_LOCATION", "0")
        .output()
        .unwrap_or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!(
                    "`{tool}` is not installed. Run `bash scripts/test`: it installs Debian's \
                     `systemd` package, whose offline tools these tests use (no running systemd \
                     is needed)."
                )
            }
            panic!("running {tool}: {e}")
        })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes the unit (with `edit` applied) as DIR/tunnelkeeper.service with `ExecStart=` pointing
/// at the cargo-built binary.
fn stage_unit(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let unit = repo_file("systemd/tunnelkeeper.service");
    let exec = format!("ExecStart={INSTALLED_BIN} ");
    assert_eq!(
        unit.matches(&exec).count(),
        1,
        "the unit must have exactly one `{exec}...` line"
    );
    let unit = edit(unit.replace(INSTALLED_BIN, BIN));
    let path = dir.join("tunnelkeeper.service");
    std::fs::write(&path, unit).expect("writing the staged unit");
    path
}

/// `systemd-analyze verify`; returns the diagnostics that concern our files (they name
/// `tunnelkeeper`), after printing every line. Fails on a non-zero exit.
fn verify(unit: &Path) -> Vec<String> {
    let out = run(
        "systemd-analyze",
        &["verify", "--man=no", unit.to_str().expect("UTF-8 path")],
    );
    let stderr = text(&out.stderr);
    eprintln!("systemd-analyze verify {}:\n{stderr}", unit.display());
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    stderr
        .lines()
        .filter(|l| l.contains("tunnelkeeper"))
        .map(str::to_string)
        .collect()
}

#[test]
fn unit_verifies_without_warnings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = stage_unit(dir.path(), |u| u);
    let problems = verify(&unit);
    assert!(
        problems.is_empty(),
        "systemd-analyze verify complains about the unit:\n{}",
        problems.join("\n")
    );
}

#[test]
fn verify_is_not_blind() {
    // The harness itself: a misspelt directive must be reported.
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = stage_unit(dir.path(), |u| {
        u.replace("[Service]\n", "[Service]\nProtectSystm=strict\n")
    });
    let problems = verify(&unit);
    assert!(
        problems
            .iter()
            .any(|l| l.contains("Unknown key") && l.contains("ProtectSystm")),
        "a misspelt key went unnoticed: {problems:?}"
    );
}

#[test]
fn unit_uses_nothing_newer_than_systemd_247() {
    let unit = repo_file("systemd/tunnelkeeper.service");
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for (setting, since) in NEWER_THAN_247 {
        assert!(
            !settings.iter().any(|l| l.starts_with(setting)),
            "`{setting}` needs systemd {since}; the unit must run on 247 too"
        );
    }
    // Readiness and a synchronous reload the way every supported version does them.
    assert_eq!(unit_value(&unit, "Type"), "notify");
    let start = unit_value(&unit, "ExecStart");
    let config = start
        .split_once(" -c ")
        .map(|(_, c)| c.trim())
        .unwrap_or_else(|| panic!("ExecStart= names no -c CONFIG: {start}"));
    assert_eq!(
        unit_value(&unit, "ExecReload"),
        format!("{INSTALLED_BIN} reload -c {config}"),
        "ExecReload= must ask the daemon over its control socket (synchronous, non-zero exit \
         when the file is refused), for the file ExecStart= runs"
    );
    assert!(
        !unit.contains("/bin/kill"),
        "no /bin/kill on a minimal Debian"
    );
}

#[test]
fn directory_modes_agree_between_unit_and_tmpfiles() {
    // systemd checks ConfigurationDirectory= at every start and warns when the mode differs
    // from ConfigurationDirectoryMode= (default 0755).
    let unit = repo_file("systemd/tunnelkeeper.service");
    let tmpfiles = repo_file("systemd/tunnelkeeper.tmpfiles");
    let dir = format!("/etc/{}", unit_value(&unit, "ConfigurationDirectory"));
    let line: Vec<&str> = tmpfiles
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[0] == "d" && f[1] == dir)
        .unwrap_or_else(|| panic!("tunnelkeeper.tmpfiles has no `d {dir}` line"));
    let unit_mode = unit
        .lines()
        .find_map(|l| l.strip_prefix("ConfigurationDirectoryMode="))
        .unwrap_or("0755");
    assert_eq!(
        u32::from_str_radix(unit_mode, 8).ok(),
        u32::from_str_radix(line[2], 8).ok(),
        "ConfigurationDirectoryMode={unit_mode} vs tmpfiles {}",
        line[2]
    );
}

/// Parses `→ Overall exposure level for tunnelkeeper.service: 1.3 OK 🙂` into tenths.
fn overall_exposure_tenths(table: &str) -> u32 {
    let line = table
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{table}"));
    let score = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("cannot read the score from {line:?}"));
    let (whole, tenth) = score
        .split_once('.')
        .unwrap_or_else(|| panic!("cannot read the score from {line:?}"));
    match (whole.parse::<u32>(), tenth.parse::<u32>()) {
        (Ok(whole), Ok(tenth)) if tenth < 10 => whole * 10 + tenth,
        _ => panic!("cannot read the score from {line:?}"),
    }
}

#[test]
fn security_exposure_stays_at_the_recorded_level() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = stage_unit(dir.path(), |u| u);
    let unit = unit.to_str().expect("UTF-8 path");

    let out = run(
        "systemd-analyze",
        &["security", "--offline=true", "--no-pager", unit],
    );
    let table = text(&out.stdout);
    println!("{table}");
    assert!(
        out.status.success(),
        "systemd-analyze security --offline=true failed ({}):\n{}",
        out.status,
        text(&out.stderr)
    );
    let tenths = overall_exposure_tenths(&table);
    assert!(
        tenths <= MAX_EXPOSURE_TENTHS,
        "exposure {}.{} is above the recorded {}.{}:\n{table}",
        tenths / 10,
        tenths % 10,
        MAX_EXPOSURE_TENTHS / 10,
        MAX_EXPOSURE_TENTHS % 10
    );

    // Every check that still counts against the unit is a deliberate choice, named (with its
    // reason) in docs/SYSTEMD.md.
    let out = run(
        "systemd-analyze",
        &["security", "--offline=true", "--json=short", unit],
    );
    let checks: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("systemd-analyze security --json=short");
    // (`|` is escaped as `\|` inside a Markdown table.)
    let docs = repo_file("docs/SYSTEMD.md").replace("\\|", "|");
    let undocumented: Vec<String> = checks
        .as_array()
        .expect("a JSON array of checks")
        .iter()
        .filter(|c| {
            c["exposure"]
                .as_str()
                .and_then(|e| e.parse::<f64>().ok())
                .is_some_and(|e| e > 0.0)
        })
        .filter_map(|c| c["name"].as_str())
        .filter(|name| !docs.contains(&format!("`{name}`")))
        .map(str::to_string)
        .collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not explained in docs/SYSTEMD.md (\"Not applied\"): {undocumented:?}"
    );
}

/// The value of `Key=` in the unit (first occurrence).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

#[test]
fn sysusers_and_tmpfiles_apply_to_a_fresh_root() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    let root = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(root.path().join("etc")).expect("etc");
    let root_arg = format!("--root={}", root.path().display());
    let sysusers = Path::new(ROOT).join("systemd/tunnelkeeper.sysusers");
    let tmpfiles = Path::new(ROOT).join("systemd/tunnelkeeper.tmpfiles");

    let out = run(
        "systemd-sysusers",
        &[&root_arg, sysusers.to_str().expect("UTF-8 path")],
    );
    let stderr = text(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("tunnelkeeper.sysusers:"),
        "systemd-sysusers ({}):\n{stderr}",
        out.status
    );

    // The account matches the unit: same name, home in its StateDirectory, no login shell.
    let unit = repo_file("systemd/tunnelkeeper.service");
    let user = unit_value(&unit, "User");
    assert_eq!(unit_value(&unit, "Group"), user);
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    let entry: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == user)
        .unwrap_or_else(|| panic!("no {user} in passwd:\n{passwd}"));
    let state_dir = format!("/var/lib/{}", unit_value(&unit, "StateDirectory"));
    assert_eq!(entry[5], state_dir, "home directory");
    assert!(entry[6].ends_with("/nologin"), "shell: {}", entry[6]);
    let group = std::fs::read_to_string(root.path().join("etc/group")).expect("group");
    let gid: u32 = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == user)
        .and_then(|f| f[2].parse().ok())
        .unwrap_or_else(|| panic!("no {user} group:\n{group}"));

    // tmpfiles resolves the group inside the scratch root; only root may chown.
    let out = run(
        "systemd-tmpfiles",
        &[
            "--create",
            &root_arg,
            tmpfiles.to_str().expect("UTF-8 path"),
        ],
    );
    let stderr = text(&out.stderr);
    let is_root = nix::unistd::geteuid().is_root();
    if is_root {
        assert!(
            out.status.success(),
            "systemd-tmpfiles ({}):\n{stderr}",
            out.status
        );
    } else {
        let other: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("Operation not permitted"))
            .collect();
        assert!(other.is_empty(), "systemd-tmpfiles:\n{stderr}");
    }
    let etc = std::fs::metadata(root.path().join("etc/tunnelkeeper")).expect("/etc/tunnelkeeper");
    assert!(etc.is_dir());
    assert_eq!(etc.permissions().mode() & 0o7777, 0o750);
    if is_root {
        assert_eq!((etc.uid(), etc.gid()), (0, gid), "owner root:{user}");
    }
}
