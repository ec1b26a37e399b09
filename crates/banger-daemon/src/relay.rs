//! The `vm.agent` relay: a CLI speaks the guest agent protocol to the
//! daemon, which relays it onto the VM's one agent connection.
//!
//! 1. The CLI's `hello` is answered with the agent's own `hello_reply`.
//! 2. Each `open` becomes a raw session on the agent connection (a fresh
//!    agent-side id); a task forwards the agent's frames for it back with the
//!    CLI's id, ending after its `done`/`failed`.
//! 3. The CLI's `data`/`eof`/`credit`/`resize`/`signal` frames are forwarded
//!    to the matching agent session. Credit flows end to end, so the daemon
//!    buffers at most one window per stream and a slow CLI stalls only its
//!    own streams, never the VM's other sessions.
//! 4. When the CLI goes away, its unfinished sessions are cancelled (the
//!    agent kills their commands).
//!
//! Nothing here buffers without bound: a raw session holds at most one
//! window per output stream ([`banger_agent_proto::client::RawFrames`]; a
//! guest that sends beyond it loses its agent connection), frames for
//! sessions the CLI did not open are dropped, a CLI that sends stdin beyond
//! the guest's window or stops reading while its queue fills
//! ([`banger_agent_proto::protocol::WRITE_QUEUE_LIMIT`]) is disconnected.
//!
//! Only operations a VM's user may start are relayed: `shutdown` and
//! `clock_sync` belong to the daemon.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use banger_agent_proto::client::{AgentClient, RawSendError, RawSender};
use banger_agent_proto::protocol::{read_frame, send_frame, spawn_writer, FrameSender, Outgoing};
use banger_proto::agent::{AgentError, AgentErrorKind, Frame, Operation, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite};

type Sessions = Arc<Mutex<HashMap<u64, RawSender>>>;

/// Relays frames between the CLI's stream and `agent` until the CLI closes.
pub async fn relay<R, W>(agent: AgentClient, mut reader: R, writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (to_cli, writer_task) = spawn_writer(writer);
    let sessions: Sessions = Arc::default();
    loop {
        let read = tokio::select! {
            read = read_frame(&mut reader) => read,
            () = to_cli.overflowed() => {
                tracing::debug!("agent relay: client does not read, disconnecting it");
                break;
            }
        };
        let (frame, payload) = match read {
            Ok(Some(read)) => read,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, "agent relay: client stream ended");
                break;
            }
        };
        match frame {
            Frame::Hello {
                protocol_version, ..
            } => {
                let reply = if protocol_version == PROTOCOL_VERSION {
                    Frame::HelloReply(agent.hello().clone())
                } else {
                    failed(
                        0,
                        AgentErrorKind::Protocol,
                        format!(
                            "Client spoke protocol version {protocol_version}, the agent speaks {PROTOCOL_VERSION}"
                        ),
                    )
                };
                send_frame(&to_cli, reply);
            }
            Frame::Open { session, operation } => {
                open(&agent, &to_cli, &sessions, session, operation);
            }
            Frame::Data { session, .. }
            | Frame::Eof { session, .. }
            | Frame::Credit { session, .. }
            | Frame::Resize { session, .. }
            | Frame::Signal { session, .. }
            | Frame::Cancel { session } => {
                let sender = lock(&sessions).get(&session).cloned();
                if let Some(sender) = sender {
                    if let Err(RawSendError::WindowOverrun) = sender.send(frame, payload) {
                        tracing::debug!(
                            session,
                            "agent relay: client overran the stdin window, disconnecting it"
                        );
                        to_cli.shut_down();
                        break;
                    }
                }
            }
            // Frames only an agent sends.
            _ => {}
        }
    }
    let abandoned: Vec<RawSender> = lock(&sessions).drain().map(|(_, sender)| sender).collect();
    for sender in abandoned {
        sender.cancel();
    }
    drop(to_cli);
    // The forwarding tasks hold the writer until their sessions end.
    drop(writer_task);
}

fn lock(sessions: &Sessions) -> std::sync::MutexGuard<'_, HashMap<u64, RawSender>> {
    sessions.lock().unwrap_or_else(PoisonError::into_inner)
}

fn failed(session: u64, kind: AgentErrorKind, message: String) -> Frame {
    Frame::Failed {
        session,
        error: AgentError { kind, message },
    }
}

fn open(
    agent: &AgentClient,
    to_cli: &FrameSender,
    sessions: &Sessions,
    session: u64,
    operation: Operation,
) {
    if matches!(
        operation,
        Operation::Shutdown | Operation::ClockSync { .. } | Operation::Identity(_)
    ) {
        send_frame(
            to_cli,
            failed(
                session,
                AgentErrorKind::PermissionDenied,
                "Only the daemon shuts a guest down or sets its clock (use `banger vm stop`)"
                    .to_owned(),
            ),
        );
        return;
    }
    if session == 0 || lock(sessions).contains_key(&session) {
        send_frame(
            to_cli,
            failed(
                session,
                AgentErrorKind::Protocol,
                format!("Session id {session} is reserved or in use"),
            ),
        );
        return;
    }
    let raw = match agent.open_raw(operation) {
        Ok(raw) => raw,
        Err(error) => {
            send_frame(
                to_cli,
                failed(session, AgentErrorKind::Io, error.to_string()),
            );
            return;
        }
    };
    lock(sessions).insert(session, raw.sender.clone());
    let to_cli = to_cli.clone();
    let sessions = Arc::clone(sessions);
    let mut frames = raw.frames;
    let sender = raw.sender;
    tokio::spawn(async move {
        while let Some((frame, payload)) = frames.recv().await {
            let (frame, last) = match frame {
                Frame::Data { stream, .. } => (Frame::Data { session, stream }, false),
                Frame::Eof { stream, .. } => (Frame::Eof { session, stream }, false),
                Frame::Credit { stream, bytes, .. } => (
                    Frame::Credit {
                        session,
                        stream,
                        bytes,
                    },
                    false,
                ),
                Frame::Done { result, .. } => (Frame::Done { session, result }, true),
                Frame::Failed { error, .. } => (Frame::Failed { session, error }, true),
                _ => continue,
            };
            if to_cli.send(Outgoing { frame, payload }).is_err() {
                // The client is gone: nobody will read the rest.
                sender.cancel();
                break;
            }
            if last {
                break;
            }
        }
        lock(&sessions).remove(&session);
    });
}
