//! The russh client handler of one connection: checks the host key during key exchange, hands
//! server-opened `forwarded-tcpip` channels to the remote forward they belong to, refuses every
//! other channel a server may try to open (session, x11, agent, direct-tcpip, streamlocal: we
//! never ask for them, and russh would accept them by default), tracks which channels the server
//! closed, and records why the connection ended.
//!
//! It lives on russh's session task, so dropping it (when that task ends, however it ends) is
//! the most reliable "connection gone" signal: it cancels [`Shared::closed`] on drop.

use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, DisconnectReason, Msg};
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::hostkeys::{self, Accepted, HostKeyCheck};
use super::session::{Incoming, Shared};

/// What the handler can fail with: russh's own errors, or a refused host key (kept apart so
/// the caller gets the full message instead of russh's "Unknown server key").
#[derive(Debug)]
pub(crate) enum HandlerError {
    /// A protocol or I/O error.
    Ssh(russh::Error),
    /// The host key was refused; the message says why and what to do.
    HostKey(String),
}

impl From<russh::Error> for HandlerError {
    fn from(err: russh::Error) -> Self {
        HandlerError::Ssh(err)
    }
}

/// The russh client handler of one connection. It lives on russh's session task, so dropping
/// it (when that task ends, however it ends) is the most reliable "connection gone" signal.
pub(crate) struct ClientHandler {
    host_check: HostKeyCheck,
    shared: Arc<Shared>,
    /// Cancels [`Shared::closed`] when the handler is dropped.
    _closed_on_drop: DropGuard,
}

impl ClientHandler {
    /// A handler for a new connection; `closed` is cancelled when it is dropped.
    pub(crate) fn new(
        host_check: HostKeyCheck,
        shared: Arc<Shared>,
        closed: CancellationToken,
    ) -> ClientHandler {
        ClientHandler {
            host_check,
            shared,
            _closed_on_drop: closed.drop_guard(),
        }
    }
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // Host certificates are never requested (no `@cert-authority` support), so a
            // certificate here is unexpected: refuse rather than guess.
            PublicKeyOrCertificate::Certificate(_) => {
                return Err(HandlerError::HostKey(format!(
                    "{} presented a host certificate, which tunnelkeeper does not verify; \
                     connection refused",
                    hostkeys::host_entry_name(&self.host_check.host, self.host_check.port)
                )))
            }
        };
        let check = self.host_check.clone();
        // known_hosts is read (and maybe appended to) with blocking file I/O.
        match tokio::task::spawn_blocking(move || check.verify(&key)).await {
            Ok(Ok(Accepted::Known)) => Ok(true),
            Ok(Ok(Accepted::Recorded(line))) => {
                tracing::warn!(
                    target = %self.shared.key,
                    known_hosts = %self.host_check.path.display(),
                    %line,
                    "new host key accepted and recorded (host_key_policy: accept_new)"
                );
                Ok(true)
            }
            Ok(Err(message)) => Err(HandlerError::HostKey(message)),
            Err(err) => Err(HandlerError::HostKey(format!(
                "host key check did not complete: {err}"
            ))),
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.shared.channel_opened(channel.id());
        match self.shared.route_for(connected_address, connected_port) {
            Some(sink) => sink(Incoming {
                channel,
                reply,
                originator: format!("{originator_address}:{originator_port}"),
            }),
            None => {
                tracing::debug!(
                    target = %self.shared.key,
                    address = connected_address,
                    port = connected_port,
                    "forwarded connection for a port no tunnel holds; rejected"
                );
                let id = channel.id();
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                self.shared.channel_rejected(id);
            }
        }
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("session", reply).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11", reply).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("auth-agent@openssh.com", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("forwarded-streamlocal@openssh.com", reply)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("direct-streamlocal@openssh.com", reply).await;
        Ok(())
    }

    async fn channel_open_confirmation(
        &mut self,
        id: ChannelId,
        _max_packet_size: u32,
        _window_size: u32,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Runs on russh's task, but russh 0.65 wakes the opener first: the opener may have
        // registered the channel already (see `Shared::channel_token`).
        self.shared.channel_opened(id);
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.shared.channel_closed(id);
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!("the server disconnected: {}", info.message)
            }
            DisconnectReason::Error(err) => describe_handler_error(err, self.shared.keepalive),
        };
        self.shared
            .set_reason(format!("ssh session to {} lost: {text}", self.shared.key));
        self.shared.closed.cancel();
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(err) => Err(err),
        }
    }
}

impl ClientHandler {
    /// Rejects a channel the server opened that we never asked for.
    async fn refuse(&self, kind: &str, reply: client::ChannelOpenHandle) {
        tracing::warn!(
            target = %self.shared.key,
            channel = kind,
            "the server tried to open a channel tunnelkeeper never requested; refused"
        );
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
    }
}

/// Words for a russh error that ended or failed a connection.
pub(crate) fn describe_error(err: &russh::Error, keepalive: (Duration, u32)) -> String {
    let (interval, max) = keepalive;
    match err {
        russh::Error::KeepaliveTimeout => {
            format!("no answer to {max} keepalives sent {interval:?} apart")
        }
        russh::Error::InactivityTimeout => {
            format!(
                "nothing received for {:?}",
                inactivity_timeout(interval, max)
            )
        }
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::SendError => {
            "connection closed by the server".to_string()
        }
        russh::Error::IO(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "connection closed by the server".to_string()
        }
        russh::Error::IO(io) => format!("connection error: {io}"),
        other => other.to_string(),
    }
}

fn describe_handler_error(err: &HandlerError, keepalive: (Duration, u32)) -> String {
    match err {
        HandlerError::Ssh(err) => describe_error(err, keepalive),
        HandlerError::HostKey(message) => message.clone(),
    }
}

/// russh's inactivity limit. Keepalives detect a silent server after `max` unanswered ones,
/// i.e. `interval × (max + 1)` after the last sign of life; this backstop is one interval
/// later, so the clearer keepalive reason is the one reported, and it still ends a session
/// whose keepalives are disabled (`keepalive_max: 0`) once the server stops answering.
pub(crate) fn inactivity_timeout(interval: Duration, max: u32) -> Duration {
    interval.saturating_mul(max.saturating_add(2))
}
