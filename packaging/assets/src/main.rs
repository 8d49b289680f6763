//! `tunnelkeeper-assets --out DIR`: the man page and shell completions of the Debian package,
//! rendered from the command line's clap definitions ([`tunnelkeeper::args::Cli`]) so they
//! cannot drift from it. A tool of its own, so that the daemon's binary carries no man-page or
//! completion generator (scripts/package runs it; docs/PACKAGING.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use clap_complete::Shell;

/// Writes the man page and the bash, zsh and fish completions of `tunnelkeeper`.
#[derive(Parser)]
struct Args {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match write(tunnelkeeper::args::Cli::command(), &args.out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `tunnelkeeper.1` (man section 1) and `tunnelkeeper.bash`, `_tunnelkeeper`,
/// `tunnelkeeper.fish` into `out`, printing each path.
fn write(mut command: clap::Command, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    command.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .context("rendering the man page")?;
    let path = out.join("tunnelkeeper.1");
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut command, "tunnelkeeper", out)
            .with_context(|| format!("writing the {shell} completions into {}", out.display()))?;
        println!("{}", path.display());
    }
    println!("{}", out.join("tunnelkeeper.1").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_man_page_and_three_completions_naming_every_command() {
        let dir = std::env::temp_dir().join(format!("tk-assets-{}", std::process::id()));
        write(tunnelkeeper::args::Cli::command(), &dir).expect("written");
        let page = std::fs::read_to_string(dir.join("tunnelkeeper.1")).expect("man page");
        for command in [
            "run", "check", "status", "events", "pin", "drain", "reload", "demo",
        ] {
            assert!(page.contains(command), "the man page names `{command}`");
        }
        assert!(
            !page.contains("package-assets"),
            "no packaging command in the binary"
        );
        for file in ["tunnelkeeper.bash", "_tunnelkeeper", "tunnelkeeper.fish"] {
            let text = std::fs::read_to_string(dir.join(file)).expect(file);
            assert!(text.contains("ssh-reset"), "{file} completes ssh-reset");
        }
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }
}
