//! `tunnelkeeper check --deep`: what the configuration points to, checked before the daemon
//! runs (the habit of `sshd -t` and `nginx -t`).
//!
//! Every referenced file must exist and be readable by the user running the check (run it as
//! the service user); secret files (keys, passphrases, passwords, tokens, `env_file`) must not
//! be group- or world-readable (OpenSSH refuses such keys too); each provider's program and each
//! `command` tunnel's `run[0]` must be found, with the version the providers crate reads from
//! it where it has one; every SSH host and router needs a known_hosts entry (the `ssh-keyscan`
//! line to add one is printed); listen addresses must not collide
//! ([`crate::config::collisions`], the rule `check` also applies). With `--connect`, a login to every SSH target and router is
//! tried. Each finding is one line; the exit status is 2 when any is a problem.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tunnelkeeper_providers::cloudflare::CloudflareMode;
use tunnelkeeper_providers::ssh::{SshPool, SshTarget};

use crate::config::spec::{Config, ProviderSpec};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// True for a problem (exit 2), false for information (a program found, its version).
    pub problem: bool,
    /// What it concerns, e.g. `services[0].tunnels[1] (web/vps) identity_file`.
    pub subject: String,
    /// What was found.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = if self.problem { "error" } else { "ok" };
        write!(f, "{level}: {}: {}", self.subject, self.message)
    }
}

/// Runs every check (and with `connect` the logins) and returns the findings in file order.
pub async fn run(config: &Config, connect: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    for collision in crate::config::collisions(config) {
        let key = match collision.service {
            Some(i) => format!("services[{i}].listen"),
            None => "daemon.metrics_listen".to_owned(),
        };
        out.push(problem(&key, collision.message));
    }
    let pool = SshPool::new();
    for (i, router) in config.routers.iter().enumerate() {
        let subject = format!("routers[{i}] ({})", router.name);
        ssh_target(&mut out, &subject, &router.ssh, connect.then_some(&pool)).await;
    }
    for (i, service) in config.services.iter().enumerate() {
        for (j, tunnel) in service.tunnels.iter().enumerate() {
            let subject = format!(
                "services[{i}].tunnels[{j}] ({}/{})",
                service.name, tunnel.name
            );
            // The agent CLIs: found, and their version (the floor is the provider's to judge).
            let agent = match &tunnel.provider {
                ProviderSpec::Cloudflare(spec) => Some(spec.version_argv()),
                ProviderSpec::Tailscale(spec) => Some(spec.version_argv()),
                ProviderSpec::Ngrok(spec) => Some(spec.version_argv()),
                ProviderSpec::Direct(_) | ProviderSpec::Command(_) | ProviderSpec::Ssh(_) => None,
            };
            if let Some(argv) = agent {
                let program = argv[0].clone();
                program_found(&mut out, &format!("{subject} binary"), &program, Some(argv)).await;
            }
            // Programs and files each provider reads.
            let mut secrets: Vec<(&str, &Path)> = Vec::new();
            match &tunnel.provider {
                ProviderSpec::Direct(_) | ProviderSpec::Tailscale(_) => {}
                ProviderSpec::Command(spec) => {
                    if let Some(program) = spec.run.first() {
                        program_found(&mut out, &format!("{subject} run[0]"), program, None).await;
                    }
                    if let Some(file) = &spec.env_file {
                        secrets.push(("env_file", file));
                    }
                }
                ProviderSpec::Ssh(spec) => {
                    ssh_target(&mut out, &subject, &spec.target, connect.then_some(&pool)).await;
                }
                ProviderSpec::Cloudflare(spec) => {
                    if let CloudflareMode::Named { token_file, .. } = &spec.mode {
                        secrets.push(("token_file", token_file));
                    }
                    if let Some((id, secret)) = spec.service_token() {
                        secrets.push(("service token id", id));
                        secrets.push(("service token secret", secret));
                    }
                }
                ProviderSpec::Ngrok(spec) => secrets.push(("authtoken_file", &spec.authtoken_file)),
            }
            for (what, file) in secrets {
                file_check(&mut out, &format!("{subject} {what}"), file, true);
            }
        }
    }
    out
}

fn problem(subject: &str, message: String) -> Finding {
    Finding {
        problem: true,
        subject: subject.to_owned(),
        message,
    }
}

fn info(subject: &str, message: String) -> Finding {
    Finding {
        problem: false,
        subject: subject.to_owned(),
        message,
    }
}

/// The files of an SSH target, its known_hosts entry, and with `pool` a login.
async fn ssh_target(
    out: &mut Vec<Finding>,
    subject: &str,
    target: &SshTarget,
    pool: Option<&SshPool>,
) {
    for (key, file, secret) in [
        ("identity_file", &target.identity_file, true),
        ("passphrase_file", &target.passphrase_file, true),
        ("password_file", &target.password_file, true),
        ("ssh_config", &target.ssh_config, false),
    ] {
        if let Some(file) = file {
            file_check(out, &format!("{subject} {key}"), file, secret);
        }
    }
    let known_hosts = &target.known_hosts;
    if file_check(out, &format!("{subject} known_hosts"), known_hosts, false) {
        let port = target.port.unwrap_or(22);
        if !tunnelkeeper_providers::ssh::has_known_host(known_hosts, &target.host, port) {
            let port_flag = if port == 22 {
                String::new()
            } else {
                format!("-p {port} ")
            };
            out.push(problem(
                &format!("{subject} known_hosts"),
                format!(
                    "{} has no key for {}; add it (after checking its fingerprint out of band): \
                     ssh-keyscan {port_flag}{} >> {}",
                    known_hosts.display(),
                    target.host,
                    target.host,
                    known_hosts.display()
                ),
            ));
        }
    }
    if let Some(pool) = pool {
        let who = format!(
            "{}@{}:{}",
            target.user.as_deref().unwrap_or("-"),
            target.host,
            target.port.unwrap_or(22)
        );
        let timeout = target.connect_timeout + target.auth_timeout + Duration::from_secs(5);
        match pool.exec(target, "true", timeout, 1024).await {
            Ok(_) => out.push(info(
                &format!("{subject} login"),
                format!("logged in to {who}"),
            )),
            Err(e) => out.push(problem(
                &format!("{subject} login"),
                format!("cannot log in to {who}: {e}"),
            )),
        }
    }
}

/// Whether `file` exists and is readable (a finding when not); a secret one must also not be
/// readable by group or others.
fn file_check(out: &mut Vec<Finding>, subject: &str, file: &Path, secret: bool) -> bool {
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(e) => {
            out.push(problem(subject, format!("{}: {e}", file.display())));
            return false;
        }
    };
    if let Err(e) = std::fs::File::open(file) {
        out.push(problem(
            subject,
            format!(
                "{}: not readable by uid {} ({e}); the daemon's user must read it",
                file.display(),
                nix::unistd::Uid::current()
            ),
        ));
        return false;
    }
    let mode = meta.permissions().mode() & 0o777;
    if secret && mode & 0o077 != 0 {
        out.push(problem(
            subject,
            format!(
                "{} is readable by group or others (mode {mode:04o}): a secret must be 0600 \
                 (chmod 600 {})",
                file.display(),
                file.display()
            ),
        ));
    }
    true
}

/// Whether `program` is found (a path, or a name in `PATH`), and with `version` the version it
/// reports.
async fn program_found(
    out: &mut Vec<Finding>,
    subject: &str,
    program: &str,
    version: Option<Vec<String>>,
) {
    let Some(path) = find_program(program) else {
        out.push(problem(
            subject,
            format!("`{program}` not found (in PATH or as a path): install it or fix the path"),
        ));
        return;
    };
    let found = match version {
        Some(argv) => match tunnelkeeper_providers::version::probe(argv, subject).await {
            Ok(Some(v)) => format!("{} version {v}", path.display()),
            Ok(None) => format!("{} (no version reported)", path.display()),
            Err(e) => format!("{} (version not read: {e})", path.display()),
        },
        None => path.display().to_string(),
    };
    out.push(info(subject, found));
}

/// `program` as a path, or looked up in `PATH` like `execvp`: the first executable file.
fn find_program(program: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// `tunnelkeeper check --deep [--connect] -c FILE`: the plain check, then the deep one; one
/// line per finding, exit 0 when there is no problem, 2 otherwise.
pub fn check(path: &Path, connect: bool) -> u8 {
    let plain = crate::cli::check(path);
    if plain != crate::cli::EXIT_OK {
        return plain;
    }
    let config = match crate::config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return crate::cli::EXIT_CONFIG;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return crate::cli::EXIT_RUNTIME;
        }
    };
    let findings = runtime.block_on(run(&config, connect));
    let problems = findings.iter().filter(|f| f.problem).count();
    for finding in &findings {
        println!("{}: {finding}", path.display());
    }
    if problems == 0 {
        println!("{}: deep check ok", path.display());
        crate::cli::EXIT_OK
    } else {
        println!("{}: {problems} problem(s)", path.display());
        crate::cli::EXIT_CONFIG
    }
}
