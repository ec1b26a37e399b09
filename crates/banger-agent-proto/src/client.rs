//! The host's side of the agent protocol, as the daemon and the CLI use it.
//!
//! 1. [`AgentClient::connect`] (or `connect_unix` / `connect_firecracker_vsock`)
//!    sends `Hello`, waits for `HelloReply`, then starts a reader task.
//! 2. Each call opens a session with a fresh id. The reader task routes the
//!    agent's frames to the session: output chunks to its [`OutputStream`]s,
//!    credit to its stdin window, `Done`/`Failed` to whoever awaits the end.
//! 3. Output credit goes back to the agent only as the caller takes chunks,
//!    so a caller that stops reading stops that stream in the guest (at most
//!    one window buffered), and never the connection's other sessions.
//! 4. When the connection ends, every open session fails with
//!    [`ClientError::ConnectionClosed`].
//!
//! The agent is untrusted (a guest controls it), so what it can make the
//! host hold is bounded: frames for sessions the client does not know are
//! dropped without an answer; data beyond a stream's window, credit for
//! bytes never sent, an oversized frame or a write queue the agent lets
//! overflow ([`crate::protocol::WRITE_QUEUE_LIMIT`]) close the connection.
//!
//! `AgentClient` is cheap to clone; clones share the connection.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use banger_proto::agent::{
    AgentError, AgentErrorKind, AuthSyncRequest, ExecRequest, ExitStatus, Frame, GuestStats,
    HelloInfo, HostKey, IdentityRequest, Operation, OperationResult, StreamId, WindowSize,
    CONNECTION_SESSION, PROTOCOL_VERSION,
};
use banger_proto::agent::{INITIAL_WINDOW, MAX_PAYLOAD_LEN};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, Notify};

use crate::protocol::{
    read_frame, receive_stream, send_frame, spawn_writer, FrameError, FrameSender, Outgoing,
    ReceiveStream, SendWindow, StreamInlet, WeakFrameSender,
};
use crate::transport::{firecracker_vsock_handshake, VsockHandshakeError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Failed to connect to the agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Vsock handshake with Firecracker failed")]
    VsockHandshake(#[from] VsockHandshakeError),
    #[error("Agent connection failed")]
    Frame(#[from] FrameError),
    #[error("Agent did not answer hello")]
    NoHelloReply,
    #[error("Agent refused: {}", .0.message)]
    Agent(AgentError),
    #[error("Agent connection closed")]
    ConnectionClosed,
    #[error("Agent answered {operation} with an unexpected result")]
    UnexpectedResult { operation: &'static str },
    #[error("Failed to read the local tar stream")]
    ReadLocal(#[source] io::Error),
}

impl ClientError {
    /// The agent's error class, when the agent reported the failure.
    pub fn agent_kind(&self) -> Option<AgentErrorKind> {
        match self {
            Self::Agent(error) => Some(error.kind),
            _ => None,
        }
    }
}

type Outcome = Result<OperationResult, ClientError>;

struct Route {
    /// Set for a raw session: every frame goes here instead of the typed parts.
    raw: Option<Arc<RawInbox>>,
    stdout: Option<StreamInlet>,
    stderr: Option<StreamInlet>,
    stdin: Arc<SendWindow>,
    done: Option<oneshot::Sender<Outcome>>,
}

struct Shared {
    routes: Mutex<HashMap<u64, Route>>,
    next_session: AtomicU64,
    closed: Mutex<bool>,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection to one guest's agent.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
    /// Held only by the client, its clones and open sessions: when all are
    /// dropped the writer closes the connection.
    frames: FrameSender,
    hello: Arc<HelloInfo>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentClient")
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Connects to an agent serving on a Unix socket (`banger-agent --listen-unix`,
    /// or a QEMU virtio-serial chardev socket).
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::connect(crate::transport::SkipAnnouncement::new(stream)).await
    }

    /// Connects through Firecracker's vsock Unix socket (`uds_path` of the VM's
    /// vsock device) to the agent's vsock `port`.
    pub async fn connect_firecracker_vsock(
        uds_path: impl AsRef<Path>,
        port: u32,
    ) -> Result<Self, ClientError> {
        let path = uds_path.as_ref();
        let mut stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        firecracker_vsock_handshake(&mut stream, port).await?;
        Self::connect(stream).await
    }

    /// Speaks the protocol over any byte stream: handshake, then serve frames.
    pub async fn connect<S>(stream: S) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, writer) = tokio::io::split(stream);
        let (frames, _writer_task) = spawn_writer(writer);
        send_frame(
            &frames,
            Frame::Hello {
                protocol_version: PROTOCOL_VERSION,
                host_version: banger_proto::VERSION.to_owned(),
            },
        );
        let hello = match read_frame(&mut reader).await? {
            Some((Frame::HelloReply(hello), _)) => hello,
            Some((Frame::Failed { error, .. }, _)) => return Err(ClientError::Agent(error)),
            _ => return Err(ClientError::NoHelloReply),
        };
        let shared = Arc::new(Shared {
            routes: Mutex::default(),
            next_session: AtomicU64::new(CONNECTION_SESSION + 1),
            closed: Mutex::new(false),
        });
        tokio::spawn(read_loop(Arc::clone(&shared), frames.downgrade(), reader));
        Ok(Self {
            shared,
            frames,
            hello: Arc::new(hello),
        })
    }

    /// What the agent said about itself and the guest in the handshake.
    pub fn hello(&self) -> &HelloInfo {
        &self.hello
    }

    fn open(&self, operation: Operation) -> Result<OpenedSession, ClientError> {
        let session = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        let (stdout_inlet, stdout) = receive_stream(self.frames.clone(), session, StreamId::Stdout);
        let (stderr_inlet, stderr) = receive_stream(self.frames.clone(), session, StreamId::Stderr);
        let stdin = SendWindow::new();
        let (done_sender, done) = oneshot::channel();
        {
            // Checked under the routes lock: the reader fails every route it
            // finds when the connection closes, so none is left waiting.
            let mut routes = self.shared.routes();
            if *self
                .shared
                .closed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            {
                return Err(ClientError::ConnectionClosed);
            }
            routes.insert(
                session,
                Route {
                    raw: None,
                    stdout: Some(stdout_inlet),
                    stderr: Some(stderr_inlet),
                    stdin: Arc::clone(&stdin),
                    done: Some(done_sender),
                },
            );
        }
        if !send_frame(&self.frames, Frame::Open { session, operation }) {
            self.shared.routes().remove(&session);
            return Err(ClientError::ConnectionClosed);
        }
        Ok(OpenedSession {
            session,
            stdin: ExecStdin {
                frames: self.frames.clone(),
                session,
                window: stdin,
                closed: false,
            },
            stdout: OutputStream { stream: stdout },
            stderr: OutputStream { stream: stderr },
            done,
        })
    }

    /// Opens a session whose frames the caller handles itself: the agent's
    /// frames for it arrive unchanged on [`RawSession::frames`] (ending with
    /// its `Done` or `Failed`), and [`RawSession::send`] forwards the caller's.
    /// Flow control is the caller's: this is how the daemon relays a CLI's
    /// session, credit and all, end to end.
    pub fn open_raw(&self, operation: Operation) -> Result<RawSession, ClientError> {
        let session = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(RawInbox::default());
        {
            let mut routes = self.shared.routes();
            if *self
                .shared
                .closed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            {
                return Err(ClientError::ConnectionClosed);
            }
            routes.insert(
                session,
                Route {
                    raw: Some(Arc::clone(&inbox)),
                    stdout: None,
                    stderr: None,
                    stdin: SendWindow::new(),
                    done: None,
                },
            );
        }
        if !send_frame(&self.frames, Frame::Open { session, operation }) {
            self.shared.routes().remove(&session);
            return Err(ClientError::ConnectionClosed);
        }
        Ok(RawSession {
            sender: RawSender {
                session,
                sender: self.frames.clone(),
                inbox: Arc::clone(&inbox),
            },
            frames: RawFrames {
                session,
                inbox,
                ended: false,
            },
        })
    }

    /// Whether the connection to the agent has ended.
    pub fn is_closed(&self) -> bool {
        *self
            .shared
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn unary(&self, operation: Operation) -> Result<OperationResult, ClientError> {
        let opened = self.open(operation)?;
        let OpenedSession { done, .. } = opened;
        done.await.unwrap_or(Err(ClientError::ConnectionClosed))
    }

    /// Starts a command; its streams and exit are in the returned session.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        let opened = self.open(Operation::Exec(request))?;
        Ok(ExecSession {
            control: ExecControl {
                frames: self.frames.clone(),
                session: opened.session,
            },
            stdin: opened.stdin,
            stdout: opened.stdout,
            stderr: opened.stderr,
            exit: ExitWaiter { done: opened.done },
        })
    }

    /// Unpacks the tar read from `tar` into `dest_dir` in the guest; returns
    /// the number of entries unpacked.
    pub async fn copy_in<R>(&self, dest_dir: &str, mut tar: R) -> Result<u64, ClientError>
    where
        R: AsyncRead + Unpin,
    {
        let OpenedSession {
            mut stdin,
            mut done,
            ..
        } = self.open(Operation::CopyIn {
            dest: dest_dir.to_owned(),
        })?;
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let read = tar
                .read(&mut buffer)
                .await
                .map_err(ClientError::ReadLocal)?;
            if read == 0 {
                break;
            }
            if stdin
                .write(Bytes::copy_from_slice(&buffer[..read]))
                .await
                .is_err()
            {
                // The agent ended the session early; its answer says why.
                break;
            }
        }
        stdin.close();
        match (&mut done)
            .await
            .unwrap_or(Err(ClientError::ConnectionClosed))?
        {
            OperationResult::CopiedIn { entries } => Ok(entries),
            _ => Err(ClientError::UnexpectedResult {
                operation: "copy_in",
            }),
        }
    }

    /// `path` in the guest as a tar stream, its entries named after the
    /// path's last component. The stream fails at its end if the agent did.
    pub async fn copy_out(&self, path: &str) -> Result<CopyOutStream, ClientError> {
        self.copy_out_with(path, false).await
    }

    /// [`Self::copy_out`], the guest following symlinks when `follow_links`.
    pub async fn copy_out_with(
        &self,
        path: &str,
        follow_links: bool,
    ) -> Result<CopyOutStream, ClientError> {
        let opened = self.open(Operation::CopyOut {
            path: path.to_owned(),
            follow_links,
        })?;
        Ok(CopyOutStream {
            stdout: opened.stdout,
            current: Bytes::new(),
            done: Some(opened.done),
        })
    }

    pub async fn stats(&self) -> Result<GuestStats, ClientError> {
        match self.unary(Operation::Stats).await? {
            OperationResult::Stats(stats) => Ok(stats),
            _ => Err(ClientError::UnexpectedResult { operation: "stats" }),
        }
    }

    /// Sets the guest clock to `now`; returns guest minus host before, in nanoseconds.
    pub async fn sync_clock(&self, now: SystemTime) -> Result<i64, ClientError> {
        let unix_nanos = now
            .duration_since(UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        match self.unary(Operation::ClockSync { unix_nanos }).await? {
            OperationResult::ClockSynced { offset_nanos } => Ok(offset_nanos),
            _ => Err(ClientError::UnexpectedResult {
                operation: "clock_sync",
            }),
        }
    }

    pub async fn authsync(&self, request: AuthSyncRequest) -> Result<(), ClientError> {
        match self.unary(Operation::AuthSync(request)).await? {
            OperationResult::AuthSynced => Ok(()),
            _ => Err(ClientError::UnexpectedResult {
                operation: "authsync",
            }),
        }
    }

    /// The guest's SSH host public keys, for pinning in known_hosts.
    pub async fn host_keys(&self) -> Result<Vec<HostKey>, ClientError> {
        match self.unary(Operation::HostKeys).await? {
            OperationResult::HostKeys { keys } => Ok(keys),
            _ => Err(ClientError::UnexpectedResult {
                operation: "host_keys",
            }),
        }
    }

    /// Whether a TCP socket in the guest listens on `port`.
    pub async fn listening(&self, port: u16) -> Result<bool, ClientError> {
        match self.unary(Operation::Listening { port }).await? {
            OperationResult::Listening { listening } => Ok(listening),
            _ => Err(ClientError::UnexpectedResult {
                operation: "listening",
            }),
        }
    }

    /// Hands a restored guest its new identity; returns what the agent changed.
    pub async fn identity(&self, request: IdentityRequest) -> Result<Vec<String>, ClientError> {
        match self.unary(Operation::Identity(request)).await? {
            OperationResult::IdentityApplied { applied } => Ok(applied),
            _ => Err(ClientError::UnexpectedResult {
                operation: "identity",
            }),
        }
    }

    /// Asks the guest to power off; returns once the agent acknowledged.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        match self.unary(Operation::Shutdown).await? {
            OperationResult::ShuttingDown => Ok(()),
            _ => Err(ClientError::UnexpectedResult {
                operation: "shutdown",
            }),
        }
    }
}

struct OpenedSession {
    session: u64,
    stdin: ExecStdin,
    stdout: OutputStream,
    stderr: OutputStream,
    done: oneshot::Receiver<Outcome>,
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    frames: WeakFrameSender,
    mut reader: R,
) {
    let failure = loop {
        let read = tokio::select! {
            read = read_frame(&mut reader) => read,
            () = frames.overflowed() => {
                break Some(protocol_error(
                    "The agent does not read what the host sends it".to_owned(),
                ));
            }
        };
        let (frame, payload) = match read {
            Ok(Some(read)) => read,
            Ok(None) => break None,
            Err(error) => break Some(protocol_error(error_chain(&error))),
        };
        match forward_raw(&shared, &frame, &payload) {
            Forwarded::Yes => continue,
            Forwarded::Violation(message) => break Some(protocol_error(message)),
            Forwarded::No => {}
        }
        match frame {
            Frame::Data { session, stream } => {
                let inlet = {
                    let routes = shared.routes();
                    routes.get(&session).and_then(|route| match stream {
                        StreamId::Stdout => route.stdout.clone(),
                        StreamId::Stderr => route.stderr.clone(),
                        StreamId::Stdin => None,
                    })
                };
                // Data for a session or stream that is not open is dropped
                // unanswered: answering it would let the agent make the host
                // queue frames without bound.
                let Some(inlet) = inlet else { continue };
                match inlet.deliver(payload.clone()) {
                    Ok(()) => {}
                    Err(true) => {
                        break Some(protocol_error(format!(
                            "Agent overran the window of session {session}"
                        )))
                    }
                    // Nobody reads it any more: let the agent go on.
                    Err(false) => {
                        if let (Ok(bytes), Some(frames)) =
                            (u32::try_from(payload.len()), frames.upgrade())
                        {
                            send_frame(
                                &frames,
                                Frame::Credit {
                                    session,
                                    stream,
                                    bytes,
                                },
                            );
                        }
                    }
                }
            }
            Frame::Eof { session, stream } => {
                if let Some(route) = shared.routes().get_mut(&session) {
                    match stream {
                        StreamId::Stdout => route.stdout = None,
                        StreamId::Stderr => route.stderr = None,
                        StreamId::Stdin => {}
                    }
                }
            }
            Frame::Credit {
                session,
                stream: StreamId::Stdin,
                bytes,
            } => {
                if let Some(route) = shared.routes().get(&session) {
                    route.stdin.grant(bytes);
                }
            }
            Frame::Done { session, result } => finish(&shared, session, Ok(result)),
            Frame::Failed {
                session: CONNECTION_SESSION,
                error,
            } => break Some(error),
            Frame::Failed { session, error } => {
                finish(&shared, session, Err(ClientError::Agent(error)))
            }
            _ => {}
        }
    };
    // Both directions close: the writer stops even with frames queued.
    frames.shut_down();
    drop(reader);
    let routes: Vec<Route> = {
        let mut routes = shared.routes();
        *shared.closed.lock().unwrap_or_else(PoisonError::into_inner) = true;
        routes.drain().map(|(_, route)| route).collect()
    };
    for mut route in routes {
        if let Some(raw) = route.raw.take() {
            let error = failure.clone().unwrap_or_else(|| AgentError {
                kind: AgentErrorKind::Io,
                message: "Agent connection closed".to_owned(),
            });
            raw.end(Frame::Failed {
                session: CONNECTION_SESSION,
                error,
            });
        }
        route.stdin.close();
        if let Some(done) = route.done.take() {
            let _ = done.send(Err(failure
                .clone()
                .map_or(ClientError::ConnectionClosed, ClientError::Agent)));
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn protocol_error(message: String) -> AgentError {
    AgentError {
        kind: AgentErrorKind::Protocol,
        message,
    }
}

enum Forwarded {
    /// Not a raw session's frame.
    No,
    Yes,
    /// The agent broke the protocol; the connection closes.
    Violation(String),
}

/// Hands a raw session's frame to its inbox. The session's route goes with
/// its `Done` or `Failed`.
fn forward_raw(shared: &Shared, frame: &Frame, payload: &Bytes) -> Forwarded {
    let session = frame.session();
    if session == CONNECTION_SESSION {
        return Forwarded::No;
    }
    let mut routes = shared.routes();
    let Some(raw) = routes.get(&session).and_then(|route| route.raw.clone()) else {
        return Forwarded::No;
    };
    if matches!(frame, Frame::Done { .. } | Frame::Failed { .. }) {
        routes.remove(&session);
    }
    drop(routes);
    match raw.arrived(frame, payload) {
        Ok(()) => Forwarded::Yes,
        Err(message) => Forwarded::Violation(format!("Session {session}: {message}")),
    }
}

fn finish(shared: &Shared, session: u64, outcome: Outcome) {
    let route = shared.routes().remove(&session);
    if let Some(mut route) = route {
        route.stdin.close();
        if let Some(done) = route.done.take() {
            let _ = done.send(outcome);
        }
    }
}

/// A session relayed frame by frame (see [`AgentClient::open_raw`]).
#[derive(Debug)]
pub struct RawSession {
    /// Sends the caller's frames for this session.
    pub sender: RawSender,
    /// The agent's frames for this session.
    pub frames: RawFrames,
}

impl RawSession {
    pub fn id(&self) -> u64 {
        self.sender.session
    }
}

/// What the agent sent for one raw session and its caller has not taken
/// yet. It is bounded whatever the agent does: output bytes only within the
/// windows the caller granted, stdin credit only for bytes the caller sent
/// (summed, not queued), and one end.
#[derive(Debug, Default)]
struct RawInbox {
    state: Mutex<RawState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct RawState {
    stdout: RawOutput,
    stderr: RawOutput,
    /// Stdin bytes sent to the agent that it has not credited yet.
    stdin_unacknowledged: u64,
    /// Stdin credit from the agent not yet handed to the caller.
    stdin_credit: u64,
    /// The session's `Done`/`Failed`, or a `Failed` with session 0 when
    /// the connection ended.
    end: Option<Frame>,
}

#[derive(Debug, Default)]
struct RawOutput {
    buffered: BytesMut,
    /// Bytes the agent sent that the caller has not credited yet.
    outstanding: u64,
    eof: bool,
    eof_taken: bool,
}

impl RawInbox {
    fn state(&self) -> std::sync::MutexGuard<'_, RawState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in one of the agent's frames; `Err` names a protocol violation.
    fn arrived(&self, frame: &Frame, payload: &Bytes) -> Result<(), String> {
        let mut state = self.state();
        match frame {
            Frame::Data { stream, .. } => {
                let output = match stream {
                    StreamId::Stdout => &mut state.stdout,
                    StreamId::Stderr => &mut state.stderr,
                    StreamId::Stdin => return Err("the agent sent data on stdin".to_owned()),
                };
                if output.eof {
                    return Err(format!("the agent sent data on {stream:?} after its end"));
                }
                output.outstanding += payload.len() as u64;
                if output.outstanding > u64::from(INITIAL_WINDOW) {
                    return Err(format!(
                        "the agent sent {} bytes on {stream:?} against a window of {INITIAL_WINDOW}",
                        output.outstanding
                    ));
                }
                output.buffered.extend_from_slice(payload);
            }
            Frame::Eof { stream, .. } => match stream {
                StreamId::Stdout => state.stdout.eof = true,
                StreamId::Stderr => state.stderr.eof = true,
                StreamId::Stdin => {}
            },
            Frame::Credit {
                stream: StreamId::Stdin,
                bytes,
                ..
            } => {
                let bytes = u64::from(*bytes);
                if bytes > state.stdin_unacknowledged {
                    return Err(format!(
                        "the agent credited {bytes} stdin bytes, {} were sent",
                        state.stdin_unacknowledged
                    ));
                }
                state.stdin_unacknowledged -= bytes;
                state.stdin_credit += bytes;
            }
            Frame::Done { .. } | Frame::Failed { .. } => {
                if state.end.is_none() {
                    state.end = Some(frame.clone());
                }
            }
            _ => return Ok(()),
        }
        drop(state);
        self.changed.notify_one();
        Ok(())
    }

    /// The connection ended.
    fn end(&self, frame: Frame) {
        let mut state = self.state();
        if state.end.is_none() {
            state.end = Some(frame);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// The next frame to hand over, if there is one now.
    fn take(&self, session: u64) -> Option<(Frame, Bytes)> {
        let mut state = self.state();
        if state.stdin_credit > 0 {
            let bytes = u32::try_from(state.stdin_credit).unwrap_or(u32::MAX);
            state.stdin_credit -= u64::from(bytes);
            return Some((
                Frame::Credit {
                    session,
                    stream: StreamId::Stdin,
                    bytes,
                },
                Bytes::new(),
            ));
        }
        for stream in [StreamId::Stdout, StreamId::Stderr] {
            let output = match stream {
                StreamId::Stdout => &mut state.stdout,
                _ => &mut state.stderr,
            };
            if !output.buffered.is_empty() {
                let len = output.buffered.len().min(MAX_PAYLOAD_LEN as usize);
                let chunk = output.buffered.split_to(len).freeze();
                return Some((Frame::Data { session, stream }, chunk));
            }
            if output.eof && !output.eof_taken {
                output.eof_taken = true;
                return Some((Frame::Eof { session, stream }, Bytes::new()));
            }
        }
        state.end.take().map(|frame| (frame, Bytes::new()))
    }
}

/// The agent's frames of a [`RawSession`]: output as `Data`/`Eof`, stdin
/// credit as `Credit`, then the session's `Done` or `Failed` (a `Failed`
/// with session 0 when the connection ended). Output chunks may be split or
/// merged differently from how the agent sent them; the byte counts, and
/// so the credit the caller returns, are the same.
#[derive(Debug)]
pub struct RawFrames {
    session: u64,
    inbox: Arc<RawInbox>,
    ended: bool,
}

impl RawFrames {
    /// The next frame; `None` after the end.
    pub async fn recv(&mut self) -> Option<(Frame, Bytes)> {
        if self.ended {
            return None;
        }
        loop {
            let changed = self.inbox.changed.notified();
            if let Some((frame, payload)) = self.inbox.take(self.session) {
                if matches!(frame, Frame::Done { .. } | Frame::Failed { .. }) {
                    self.ended = true;
                }
                return Some((frame, payload));
            }
            changed.await;
        }
    }
}

/// Why [`RawSender::send`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RawSendError {
    #[error("The agent connection is closed")]
    ConnectionClosed,
    #[error("Stdin data beyond the window the agent granted")]
    WindowOverrun,
}

/// The sending half of a [`RawSession`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct RawSender {
    session: u64,
    sender: FrameSender,
    inbox: Arc<RawInbox>,
}

impl RawSender {
    /// The session's id on the agent connection.
    pub fn id(&self) -> u64 {
        self.session
    }

    /// Sends `frame` (its session id replaced by this session's) to the agent.
    /// Only frames a host may send for a session are forwarded. Stdin data
    /// must stay within the window the agent granted; output credit is
    /// passed on only for bytes the agent sent.
    pub fn send(&self, frame: Frame, payload: Bytes) -> Result<(), RawSendError> {
        let session = self.session;
        let frame = match frame {
            Frame::Data {
                stream: StreamId::Stdin,
                ..
            } => {
                let mut state = self.inbox.state();
                let unacknowledged = state.stdin_unacknowledged + payload.len() as u64;
                if unacknowledged > u64::from(INITIAL_WINDOW) {
                    return Err(RawSendError::WindowOverrun);
                }
                state.stdin_unacknowledged = unacknowledged;
                Frame::Data {
                    session,
                    stream: StreamId::Stdin,
                }
            }
            Frame::Eof { stream, .. } => Frame::Eof { session, stream },
            Frame::Credit { stream, bytes, .. } => {
                let mut state = self.inbox.state();
                let output = match stream {
                    StreamId::Stdout => &mut state.stdout,
                    StreamId::Stderr => &mut state.stderr,
                    StreamId::Stdin => return Ok(()),
                };
                let bytes = u64::from(bytes).min(output.outstanding);
                output.outstanding -= bytes;
                if bytes == 0 {
                    return Ok(());
                }
                Frame::Credit {
                    session,
                    stream,
                    bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
                }
            }
            Frame::Resize { size, .. } => Frame::Resize { session, size },
            Frame::Signal { signal, .. } => Frame::Signal { session, signal },
            Frame::Cancel { .. } => Frame::Cancel { session },
            _ => return Ok(()),
        };
        self.sender
            .send(Outgoing { frame, payload })
            .map_err(|_| RawSendError::ConnectionClosed)
    }

    /// Abandons the session (see [`Frame::Cancel`]).
    pub fn cancel(&self) -> bool {
        send_frame(
            &self.sender,
            Frame::Cancel {
                session: self.session,
            },
        )
    }
}

/// A running command in the guest. Its parts can be moved to separate tasks.
#[derive(Debug)]
pub struct ExecSession {
    pub stdin: ExecStdin,
    pub stdout: OutputStream,
    /// Empty with a pty: everything arrives on `stdout`.
    pub stderr: OutputStream,
    pub control: ExecControl,
    pub exit: ExitWaiter,
}

/// What [`ExecSession::output`] collects.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl ExecSession {
    /// Closes stdin, collects both outputs and waits for the exit.
    pub async fn output(self) -> Result<ExecOutput, ClientError> {
        let Self {
            mut stdin,
            mut stdout,
            mut stderr,
            exit,
            ..
        } = self;
        stdin.close();
        let (stdout, stderr) = tokio::join!(stdout.read_to_end(), stderr.read_to_end());
        let status = exit.wait().await?;
        Ok(ExecOutput {
            stdout,
            stderr,
            status,
        })
    }
}

/// The command's stdin. Dropping it closes the stream (the command sees EOF).
#[derive(Debug)]
pub struct ExecStdin {
    frames: FrameSender,
    session: u64,
    window: Arc<SendWindow>,
    closed: bool,
}

impl ExecStdin {
    /// Sends bytes, waiting while the guest has not consumed earlier ones.
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        if self
            .window
            .send(&self.frames, self.session, StreamId::Stdin, data.into())
            .await
        {
            Ok(())
        } else {
            Err(ClientError::ConnectionClosed)
        }
    }

    /// Sends end of stream.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            send_frame(
                &self.frames,
                Frame::Eof {
                    session: self.session,
                    stream: StreamId::Stdin,
                },
            );
        }
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        self.close();
    }
}

/// An output stream of a session. Taking a chunk returns its credit.
#[derive(Debug)]
pub struct OutputStream {
    stream: ReceiveStream,
}

impl OutputStream {
    /// The next chunk; `None` at end of stream.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.stream.recv().await
    }

    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await {
            all.extend_from_slice(&chunk);
        }
        all
    }
}

/// Resize and signal a running command.
#[derive(Debug, Clone)]
pub struct ExecControl {
    frames: FrameSender,
    session: u64,
}

impl ExecControl {
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.send(Frame::Resize {
            session: self.session,
            size: WindowSize { rows, cols },
        })
    }

    /// Sends a signal (Linux number, e.g. `libc::SIGINT`) to the command's process group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(Frame::Signal {
            session: self.session,
            signal,
        })
    }

    fn send(&self, frame: Frame) -> Result<(), ClientError> {
        if send_frame(&self.frames, frame) {
            Ok(())
        } else {
            Err(ClientError::ConnectionClosed)
        }
    }
}

/// The end of a command.
#[derive(Debug)]
pub struct ExitWaiter {
    done: oneshot::Receiver<Outcome>,
}

impl ExitWaiter {
    /// How the command ended; an error if it could not be started.
    pub async fn wait(self) -> Result<ExitStatus, ClientError> {
        match self
            .done
            .await
            .unwrap_or(Err(ClientError::ConnectionClosed))?
        {
            OperationResult::Exited(status) => Ok(status),
            _ => Err(ClientError::UnexpectedResult { operation: "exec" }),
        }
    }
}

/// A tar stream coming out of the guest.
#[derive(Debug)]
pub struct CopyOutStream {
    stdout: OutputStream,
    current: Bytes,
    done: Option<oneshot::Receiver<Outcome>>,
}

impl AsyncRead for CopyOutStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.current.is_empty() {
            match ready!(this.stdout.stream.poll_recv(context)) {
                Some(chunk) => this.current = chunk,
                None => {
                    // End of the tar: report the agent's failure instead of a short archive.
                    let Some(done) = this.done.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let outcome = ready!(Pin::new(done).poll(context));
                    this.done = None;
                    return Poll::Ready(
                        match outcome.unwrap_or(Err(ClientError::ConnectionClosed)) {
                            Ok(_) => Ok(()),
                            Err(error) => Err(io::Error::other(error)),
                        },
                    );
                }
            }
        }
        let len = buffer.remaining().min(this.current.len());
        buffer.put_slice(&this.current.split_to(len));
        Poll::Ready(Ok(()))
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use banger_proto::agent::{ExitStatus, HelloInfo};
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::protocol::write_frame;

    /// A hand-written agent: answers hello, then does what the test says.
    async fn connected() -> (AgentClient, DuplexStream) {
        let (host, mut guest) = tokio::io::duplex(1024 * 1024);
        let peer = tokio::spawn(async move {
            let (frame, _) = read_frame(&mut guest).await.unwrap().unwrap();
            assert!(matches!(frame, Frame::Hello { .. }));
            let hello = HelloInfo {
                agent_version: "test".to_owned(),
                protocol_version: PROTOCOL_VERSION,
                kernel_release: String::new(),
                distro: String::new(),
                hostname: String::new(),
                boot_time_unix: 0,
                is_init: false,
                generation: 0,
                vm_id: None,
            };
            write_frame(&mut guest, &Frame::HelloReply(hello), &[])
                .await
                .unwrap();
            guest.flush().await.unwrap();
            guest
        });
        let client = AgentClient::connect(host).await.unwrap();
        (client, peer.await.unwrap())
    }

    async fn send(guest: &mut DuplexStream, frame: Frame, payload: &[u8]) {
        write_frame(guest, &frame, payload).await.unwrap();
        guest.flush().await.unwrap();
    }

    /// Frames the client sends within `wait`, until it closes the connection.
    async fn frames_within(guest: &mut DuplexStream, wait: Duration) -> (Vec<Frame>, bool) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(wait, read_frame(guest)).await {
                Ok(Ok(Some((frame, _)))) => frames.push(frame),
                Ok(_) => return (frames, true),
                Err(_) => return (frames, false),
            }
        }
    }

    #[tokio::test]
    async fn frames_for_unknown_sessions_are_dropped_unanswered() {
        let (client, mut guest) = connected().await;
        for session in [0, 7, 1 << 40] {
            send(
                &mut guest,
                Frame::Data {
                    session,
                    stream: StreamId::Stdout,
                },
                &[1; 1000],
            )
            .await;
            send(
                &mut guest,
                Frame::Credit {
                    session,
                    stream: StreamId::Stdin,
                    bytes: 1000,
                },
                &[],
            )
            .await;
            send(
                &mut guest,
                Frame::Done {
                    session: session + 1,
                    result: OperationResult::Exited(ExitStatus {
                        code: Some(0),
                        signal: None,
                    }),
                },
                &[],
            )
            .await;
        }
        let (answers, closed) = frames_within(&mut guest, Duration::from_millis(200)).await;
        assert!(answers.is_empty(), "answered: {answers:?}");
        assert!(!closed);
        assert!(!client.is_closed());
    }

    fn raw_exec(client: &AgentClient) -> RawSession {
        client
            .open_raw(Operation::Exec(ExecRequest {
                argv: vec!["cat".to_owned()],
                ..ExecRequest::default()
            }))
            .unwrap()
    }

    #[tokio::test]
    async fn a_raw_session_holds_one_window_and_overrunning_it_closes_the_connection() {
        let (client, mut guest) = connected().await;
        let mut raw = raw_exec(&client);
        let (open, _) = read_frame(&mut guest).await.unwrap().unwrap();
        let session = open.session();
        let chunk = vec![7_u8; MAX_PAYLOAD_LEN as usize];
        for _ in 0..INITIAL_WINDOW / MAX_PAYLOAD_LEN {
            send(
                &mut guest,
                Frame::Data {
                    session,
                    stream: StreamId::Stdout,
                },
                &chunk,
            )
            .await;
        }
        // The whole window arrives; credit it, and the agent may send more.
        let mut received = 0;
        while received < INITIAL_WINDOW as usize {
            let (frame, payload) = raw.frames.recv().await.unwrap();
            assert!(matches!(frame, Frame::Data { .. }), "{frame:?}");
            received += payload.len();
        }
        assert_eq!(received, INITIAL_WINDOW as usize);
        raw.sender
            .send(
                Frame::Credit {
                    session: 0,
                    stream: StreamId::Stdout,
                    bytes: MAX_PAYLOAD_LEN,
                },
                Bytes::new(),
            )
            .unwrap();
        let (credit, _) = read_frame(&mut guest).await.unwrap().unwrap();
        assert_eq!(
            credit,
            Frame::Credit {
                session,
                stream: StreamId::Stdout,
                bytes: MAX_PAYLOAD_LEN
            }
        );
        // One window plus one byte, with only part of it credited: a violation.
        for _ in 0..INITIAL_WINDOW / MAX_PAYLOAD_LEN {
            send(
                &mut guest,
                Frame::Data {
                    session,
                    stream: StreamId::Stdout,
                },
                &chunk,
            )
            .await;
        }
        send(
            &mut guest,
            Frame::Data {
                session,
                stream: StreamId::Stdout,
            },
            b"x",
        )
        .await;
        let (_, closed) = frames_within(&mut guest, Duration::from_secs(5)).await;
        assert!(closed, "the connection stayed open");
        assert!(client.is_closed());
        let end = loop {
            let (frame, _) = raw.frames.recv().await.unwrap();
            if !matches!(frame, Frame::Data { .. }) {
                break frame;
            }
        };
        match end {
            Frame::Failed {
                session: CONNECTION_SESSION,
                error,
            } => assert!(error.message.contains("against a window of"), "{error:?}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(raw.frames.recv().await.is_none());
    }

    #[tokio::test]
    async fn credit_for_stdin_never_sent_closes_the_connection() {
        let (client, mut guest) = connected().await;
        let raw = raw_exec(&client);
        let (open, _) = read_frame(&mut guest).await.unwrap().unwrap();
        let session = open.session();
        raw.sender
            .send(
                Frame::Data {
                    session: 0,
                    stream: StreamId::Stdin,
                },
                Bytes::from_static(b"abc"),
            )
            .unwrap();
        send(
            &mut guest,
            Frame::Credit {
                session,
                stream: StreamId::Stdin,
                bytes: 3,
            },
            &[],
        )
        .await;
        send(
            &mut guest,
            Frame::Credit {
                session,
                stream: StreamId::Stdin,
                bytes: 1,
            },
            &[],
        )
        .await;
        let (frames, closed) = frames_within(&mut guest, Duration::from_secs(5)).await;
        assert!(closed, "the connection stayed open");
        assert!(matches!(frames[..], [Frame::Data { .. }]), "{frames:?}");
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn stdin_beyond_the_window_is_refused_before_it_is_sent() {
        let (client, _guest) = connected().await;
        let raw = raw_exec(&client);
        let window = Bytes::from(vec![0; INITIAL_WINDOW as usize]);
        let stdin = Frame::Data {
            session: 0,
            stream: StreamId::Stdin,
        };
        raw.sender.send(stdin.clone(), window).unwrap();
        assert_eq!(
            raw.sender.send(stdin, Bytes::from_static(b"x")),
            Err(RawSendError::WindowOverrun)
        );
    }

    #[tokio::test]
    async fn an_agent_that_floods_but_does_not_read_loses_the_connection() {
        let (client, mut guest) = connected().await;
        // Output nobody reads is credited at once; an agent that never
        // reads those credits fills the host's write queue.
        let session = client
            .exec(ExecRequest {
                argv: vec!["cat".to_owned()],
                ..ExecRequest::default()
            })
            .await
            .map(|exec| {
                drop(exec.stdout);
                drop(exec.stderr);
                exec.exit
            })
            .unwrap();
        let (open, _) = read_frame(&mut guest).await.unwrap().unwrap();
        let id = open.session();
        let frame = Frame::Data {
            session: id,
            stream: StreamId::Stdout,
        };
        let flood = async {
            loop {
                if write_frame(&mut guest, &frame, b"x").await.is_err() {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), flood)
            .await
            .expect("the host kept reading a peer that does not read");
        assert!(client.is_closed());
        assert!(session.wait().await.is_err());
    }
}
