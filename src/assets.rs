//! The man page and shell completions, generated from the command line's clap definitions so
//! they cannot drift from it. `tunnelkeeper package-assets --out DIR` (hidden) writes them; the
//! Debian package ships them (docs/PACKAGING.md).

use std::path::Path;

use anyhow::Context;
use clap_complete::Shell;

/// Writes `tunnelkeeper.1` (man section 1) and the bash, zsh and fish completions
/// (`tunnelkeeper.bash`, `_tunnelkeeper`, `tunnelkeeper.fish`) into `out`; returns the exit code.
pub fn write_all(command: clap::Command, out: &Path) -> u8 {
    match write(command, out) {
        Ok(()) => crate::cli::EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            crate::cli::EXIT_RUNTIME
        }
    }
}

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
