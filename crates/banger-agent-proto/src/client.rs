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
    HelloInfo, HostKey, Operation, OperationResult, StreamId, WindowSize, CONNECTION_SESSION,
    PROTOCOL_VERSION,
};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{
    read_frame, receive_stream, send_frame, spawn_writer, FrameError, FrameSender, ReceiveStream,
    SendWindow, StreamInlet,
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
type WeakFrameSender = mpsc::WeakUnboundedSender<crate::protocol::Outgoing>;

/// Where the reader delivers a raw session's frames, unchanged.
type RawInlet = mpsc::UnboundedSender<(Frame, Bytes)>;

struct Route {
    /// Set for a raw session: every frame goes here instead of the typed parts.
    raw: Option<RawInlet>,
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
        Self::connect(stream).await
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
        let (inlet, frames) = mpsc::unbounded_channel();
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
                    raw: Some(inlet),
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
            },
            frames,
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
        let (frame, payload) = match read_frame(&mut reader).await {
            Ok(Some(read)) => read,
            Ok(None) | Err(_) => break None,
        };
        if forward_raw(&shared, &frame, &payload) {
            continue;
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
                let delivered = inlet.map(|inlet| inlet.deliver(payload.clone()));
                match delivered {
                    Some(Ok(())) => {}
                    Some(Err(true)) => {
                        break Some(AgentError {
                            kind: AgentErrorKind::Protocol,
                            message: format!("Agent overran the window of session {session}"),
                        })
                    }
                    // Nobody reads it any more: let the agent go on.
                    Some(Err(false)) | None => {
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
            let _ = raw.send((
                Frame::Failed {
                    session: CONNECTION_SESSION,
                    error,
                },
                Bytes::new(),
            ));
        }
        route.stdin.close();
        if let Some(done) = route.done.take() {
            let _ = done.send(Err(failure
                .clone()
                .map_or(ClientError::ConnectionClosed, ClientError::Agent)));
        }
    }
}

/// Hands a raw session's frame to its owner; false when the frame is not a
/// raw session's. The session's route goes with its `Done` or `Failed`.
fn forward_raw(shared: &Shared, frame: &Frame, payload: &Bytes) -> bool {
    let session = frame.session();
    if session == CONNECTION_SESSION {
        return false;
    }
    let mut routes = shared.routes();
    let Some(raw) = routes.get(&session).and_then(|route| route.raw.clone()) else {
        return false;
    };
    if matches!(frame, Frame::Done { .. } | Frame::Failed { .. }) {
        routes.remove(&session);
    }
    drop(routes);
    let _ = raw.send((frame.clone(), payload.clone()));
    true
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
    /// The agent's frames for this session, as sent (session id included).
    /// A `Failed` with session 0 means the connection ended.
    pub frames: mpsc::UnboundedReceiver<(Frame, Bytes)>,
}

impl RawSession {
    pub fn id(&self) -> u64 {
        self.sender.session
    }
}

/// The sending half of a [`RawSession`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct RawSender {
    session: u64,
    sender: FrameSender,
}

impl RawSender {
    /// The session's id on the agent connection.
    pub fn id(&self) -> u64 {
        self.session
    }

    /// Sends `frame` (its session id replaced by this session's) to the agent.
    /// Only frames a host may send for a session are forwarded; false when
    /// the connection is gone.
    pub fn send(&self, frame: Frame, payload: Bytes) -> bool {
        let session = self.session;
        let frame = match frame {
            Frame::Data { stream, .. } => Frame::Data { session, stream },
            Frame::Eof { stream, .. } => Frame::Eof { session, stream },
            Frame::Credit { stream, bytes, .. } => Frame::Credit {
                session,
                stream,
                bytes,
            },
            Frame::Resize { size, .. } => Frame::Resize { session, size },
            Frame::Signal { signal, .. } => Frame::Signal { session, signal },
            Frame::Cancel { .. } => Frame::Cancel { session },
            _ => return true,
        };
        self.sender
            .send(crate::protocol::Outgoing { frame, payload })
            .is_ok()
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
