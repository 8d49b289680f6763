//! What goes wrong when a configuration is loaded, in a form an operator can act on.
//!
//! Every problem with the content of a file is a [`Diagnostic`] that names the file, the
//! 1-based line and column, the dotted key path (`services[0].tunnels[1].priority`) and what is
//! wrong with the value found there. One [`ConfigError`] carries all of them, so a single
//! `tunnelkeeper check` shows every semantic mistake at once instead of one per edit-run cycle.
//! The only other failure is a file that cannot be read at all.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// One problem in a configuration file, pinned to the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as it was given to [`super::load`] or [`super::parse`].
    pub file: PathBuf,
    /// 1-based line of the key (or of its nearest existing ancestor when the key is absent).
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// Dotted key path such as `services[0].tunnels[1].priority`; `(root)` for the document.
    pub key: String,
    /// What is wrong, naming the offending value.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `FILE:LINE:COLUMN: KEY: MESSAGE`, the shape editors and `grep -n` users recognise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.key,
            self.message
        )
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The file was read but its content is wrong: one diagnostic per problem, in file order.
    /// A YAML syntax or type error stops parsing, so it comes alone; semantic problems are all
    /// reported together.
    #[error("{}", Lines(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// The problems found in the content; empty for an I/O error.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Io { .. } => &[],
            ConfigError::Invalid(diagnostics) => diagnostics,
        }
    }
}

/// Displays diagnostics one per line, without a trailing newline (callers add their own).
struct Lines<'a>(&'a [Diagnostic]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(line: usize, key: &str, message: &str) -> Diagnostic {
        Diagnostic {
            file: PathBuf::from("/etc/tunnelkeeper/config.yaml"),
            line,
            column: 7,
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    #[test]
    fn display_is_one_line_per_diagnostic() {
        let err = ConfigError::Invalid(vec![
            diag(4, "version", "unsupported version 2"),
            diag(9, "services[0].name", "must not be empty"),
        ]);
        assert_eq!(
            err.to_string(),
            "/etc/tunnelkeeper/config.yaml:4:7: version: unsupported version 2\n\
             /etc/tunnelkeeper/config.yaml:9:7: services[0].name: must not be empty"
        );
        assert_eq!(err.diagnostics().len(), 2);
    }

    #[test]
    fn io_error_names_the_file() {
        let err = ConfigError::Io {
            path: PathBuf::from("/nonexistent.yaml"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(err
            .to_string()
            .starts_with("cannot read /nonexistent.yaml: "));
        assert!(err.diagnostics().is_empty());
    }
}
