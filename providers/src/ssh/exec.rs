//! Running a command on an SSH server (router recovery): a `session` channel from the pool,
//! `exec`, and the command's output and exit status, all within a time limit.

use std::sync::Arc;
use std::time::Duration;

use russh::client::Msg;
use russh::{Channel, ChannelMsg, Sig};
use tokio::time::Instant;

use super::config;
use super::pool::{ChannelKind, SshPool};
use super::spec::SshTarget;
use crate::ProviderError;

/// How long a timed-out command's channel may take to be signalled and closed in the
/// background.
const ABANDON_WAIT: Duration = Duration::from_secs(5);

/// What a command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status, if the server reported one (not when the command died of a signal).
    pub exit_status: Option<u32>,
    /// The signal that ended the command (e.g. `KILL`), if the server reported one.
    pub exit_signal: Option<String>,
    /// Standard output, at most `output_cap` bytes (the rest was read and dropped).
    pub stdout: Vec<u8>,
    /// Standard error, at most `output_cap` bytes.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

impl SshPool {
    /// Runs `command` on the target (through its login shell, as `ssh host command` does),
    /// within `timeout` including getting a session; stdout and stderr are each capped at
    /// `output_cap` bytes. A non-zero exit is not an error: check
    /// [`ExecOutput::exit_status`].
    ///
    /// At the deadline the call fails with [`ProviderError::Timeout`]; the command is sent
    /// `SIGKILL` and its channel closed. OpenSSH honours that signal for non-root logins only
    /// (root sessions run without privilege separation and sshd refuses to signal them), and
    /// closing a channel without a terminal does not stop a command either: as root, a timed-out
    /// command runs on to its own end. Give router commands their own bound (`timeout 10 ...`)
    /// where that matters.
    pub async fn exec(
        &self,
        target: &SshTarget,
        command: &str,
        timeout: Duration,
        output_cap: usize,
    ) -> Result<ExecOutput, ProviderError> {
        let deadline = Instant::now() + timeout;
        let resolved = Arc::new(config::resolve(target)?);
        let what = || format!("exec `{}` on {}", short(command), resolved.key);
        let (mut channel, guard, _session) = self
            .open_channel_within(
                &resolved,
                ChannelKind::Session,
                "session channel".to_string(),
                timeout,
                |session| async move { session.open_session().await },
            )
            .await
            .map_err(|err| match err {
                ProviderError::Timeout { .. } => ProviderError::Timeout {
                    what: what(),
                    after: timeout,
                },
                other => other,
            })?;
        tracing::debug!(target = %resolved.key, command = %short(command), "exec");
        match tokio::time::timeout_at(deadline, run(&mut channel, command, output_cap)).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(detail)) => Err(ProviderError::Ssh {
                target: resolved.key.to_string(),
                detail: format!("exec `{}`: {detail}", short(command)),
            }),
            Err(_) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(ABANDON_WAIT, async {
                        let _ = channel.signal(Sig::KILL).await;
                        let _ = channel.close().await;
                    })
                    .await;
                    drop(guard);
                });
                Err(ProviderError::Timeout {
                    what: what(),
                    after: timeout,
                })
            }
        }
    }
}

/// Starts the command and collects its output until the server closes the channel.
async fn run(channel: &mut Channel<Msg>, command: &str, cap: usize) -> Result<ExecOutput, String> {
    channel
        .exec(true, command)
        .await
        .map_err(|err| format!("cannot send the request: {err}"))?;
    let mut output = ExecOutput::default();
    while let Some(message) = channel.wait().await {
        match message {
            ChannelMsg::Data { data } => append_capped(&mut output.stdout, &data, cap),
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                append_capped(&mut output.stderr, &data, cap)
            }
            ChannelMsg::ExitStatus { exit_status } => output.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                output.exit_signal = Some(signal_name_text(&signal_name))
            }
            ChannelMsg::Failure => return Err("the server refused to run it".to_string()),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(output)
}

fn append_capped(buffer: &mut Vec<u8>, data: &[u8], cap: usize) {
    let room = cap.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

fn signal_name_text(signal: &Sig) -> String {
    match signal {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

/// The command as shown in logs and errors: its first line, at most 80 characters.
fn short(command: &str) -> String {
    let line = command.lines().next().unwrap_or("");
    let mut shown: String = line.chars().take(80).collect();
    if shown.len() < command.len() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped() {
        let mut buffer = Vec::new();
        append_capped(&mut buffer, b"hello", 3);
        append_capped(&mut buffer, b"world", 3);
        assert_eq!(buffer, b"hel");
    }

    #[test]
    fn long_commands_are_shortened() {
        assert_eq!(short("echo hi"), "echo hi");
        assert_eq!(short("a\nb"), "a…");
        assert_eq!(short(&"x".repeat(100)).chars().count(), 81);
    }
}
