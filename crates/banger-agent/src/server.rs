//! The agent's side of a connection.
//!
//! 1. Read `Hello`, refuse another protocol version, answer `HelloReply`.
//! 2. Read frames until the host closes: `Open` registers a session route
//!    and spawns the operation's task; `Data`/`Eof` go to the session's stdin
//!    inlet; `Credit` to its output windows; `Resize`/`Signal` to its control
//!    channel. Frames for a session that already ended are dropped.
//! 3. An operation task ends its session with `Done` or `Failed`, after the
//!    frames it sent on its streams (one ordered writer queue).
//! 4. When the connection ends, every route is dropped: output windows close
//!    and exec's control channel closes, which kills the process group.
//! 5. A `Hello` in the middle of a connection is a new host on the same
//!    byte stream (a restored guest's virtio-serial port can change hands
//!    without the agent seeing a hang-up): as in 4, then back to 1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use banger_agent_proto::files;
use banger_agent_proto::protocol::{
    read_frame, receive_stream, send_frame, spawn_writer, FrameError, FrameSender, ReceiveStream,
    SendWindow, StreamInlet,
};
use banger_proto::agent::{
    AgentError, AgentErrorKind, Frame, Operation, OperationResult, StreamId, CONNECTION_SESSION,
    PROTOCOL_VERSION,
};
use banger_proto::error_chain;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use crate::exec::{self, Control, ExecIo};
use crate::reaper::Reaper;
use crate::system::{self, SystemPaths};

/// The agent's state shared by all connections.
#[derive(Debug)]
pub struct Agent {
    pub paths: SystemPaths,
    pub is_init: bool,
    /// Whether the agent serves a guest (else host test mode: an identity
    /// is recorded, not applied).
    in_guest: bool,
    /// The last identity applied: its generation and VM id.
    identity: Mutex<(u64, Option<String>)>,
    reaper: Arc<Reaper>,
    shutdown: watch::Sender<bool>,
}

impl Agent {
    /// An agent in host test mode.
    pub fn new(paths: SystemPaths, is_init: bool, reaper: Arc<Reaper>) -> Arc<Self> {
        Self::with_mode(paths, is_init, false, reaper)
    }

    /// An agent serving a guest.
    pub fn in_guest(paths: SystemPaths, is_init: bool, reaper: Arc<Reaper>) -> Arc<Self> {
        Self::with_mode(paths, is_init, true, reaper)
    }

    fn with_mode(
        paths: SystemPaths,
        is_init: bool,
        in_guest: bool,
        reaper: Arc<Reaper>,
    ) -> Arc<Self> {
        Arc::new(Self {
            paths,
            is_init,
            in_guest,
            identity: Mutex::new((0, None)),
            reaper,
            shutdown: watch::channel(false).0,
        })
    }

    fn hello_info(&self) -> banger_proto::agent::HelloInfo {
        let mut hello = system::hello_info(&self.paths, self.is_init);
        let identity = self.identity.lock().unwrap_or_else(PoisonError::into_inner);
        hello.generation = identity.0;
        hello.vm_id.clone_from(&identity.1);
        hello
    }

    async fn apply_identity(
        &self,
        request: banger_proto::agent::IdentityRequest,
    ) -> Result<OperationResult, AgentError> {
        let applied = if self.in_guest {
            crate::identity::apply(&request, &self.paths.ssh_config_dir)
                .await
                .map_err(|error| failure(AgentErrorKind::Io, &error))?
        } else if request.regen_host_keys && self.paths.ssh_config_dir != Path::new("/etc/ssh") {
            // Host test mode: only a test's stand-in directory, never the host's keys.
            let hostname = crate::init::parse_cmdline(&request.cmdline)
                .hostname
                .unwrap_or_else(|| "guest".to_owned());
            vec![
                crate::identity::regenerate_host_keys(&self.paths.ssh_config_dir, &hostname, &[])
                    .await
                    .map_err(|error| failure(AgentErrorKind::Io, &error))?,
            ]
        } else {
            Vec::new()
        };
        tracing::info!(generation = request.generation, vm = %request.vm_id, ?applied, "identity applied");
        *self.identity.lock().unwrap_or_else(PoisonError::into_inner) =
            (request.generation, Some(request.vm_id));
        Ok(OperationResult::IdentityApplied { applied })
    }

    /// Resolves once a host asked for shutdown.
    pub async fn shutdown_requested(&self) {
        let mut requested = self.shutdown.subscribe();
        let _ = requested.wait_for(|requested| *requested).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Connection failed")]
    Frame(#[from] FrameError),
    #[error("Host spoke protocol version {host}, the agent speaks {PROTOCOL_VERSION}")]
    VersionMismatch { host: u32 },
    #[error("Host did not start with hello")]
    NoHello,
    #[error("Host overran the window of session {session}")]
    WindowOverrun { session: u64 },
}

struct Route {
    stdin: Option<StreamInlet>,
    stdout: Arc<SendWindow>,
    stderr: Arc<SendWindow>,
    control: mpsc::UnboundedSender<Control>,
}

type Routes = Arc<Mutex<HashMap<u64, Route>>>;

/// Serves one connection until the host closes it.
pub async fn serve_connection<S>(agent: Arc<Agent>, stream: S) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (frames, writer_task) = spawn_writer(writer);
    let result = serve_frames(&agent, &mut reader, &frames).await;
    if let Err(error) = &result {
        send_frame(
            &frames,
            Frame::Failed {
                session: CONNECTION_SESSION,
                error: AgentError {
                    kind: AgentErrorKind::Protocol,
                    message: error_chain(error),
                },
            },
        );
    }
    drop(frames);
    let _ = writer_task.await;
    result
}

async fn serve_frames<R: AsyncRead + Unpin>(
    agent: &Arc<Agent>,
    reader: &mut R,
    frames: &FrameSender,
) -> Result<(), ServeError> {
    let mut next = read_frame(reader).await?.map(|(frame, _)| frame);
    loop {
        match next {
            Some(Frame::Hello {
                protocol_version, ..
            }) if protocol_version == PROTOCOL_VERSION => {
                send_frame(frames, Frame::HelloReply(agent.hello_info()));
            }
            Some(Frame::Hello {
                protocol_version, ..
            }) => {
                return Err(ServeError::VersionMismatch {
                    host: protocol_version,
                })
            }
            Some(_) => return Err(ServeError::NoHello),
            None => return Ok(()),
        }
        let routes: Routes = Arc::default();
        let result = route_frames(agent, reader, frames, &routes).await;
        // Dropping the routes closes stdin inlets and control channels: running
        // execs are killed, blocked senders give up.
        let dropped: Vec<Route> = routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, route)| route)
            .collect();
        for route in dropped {
            route.stdout.close();
            route.stderr.close();
        }
        match result {
            // Another host took over the byte stream without the agent
            // seeing the first one go (a restored guest's virtio-serial
            // port, handed to a new host while the old connection was
            // open): its sessions end and the new host is served.
            Ok(Some(hello)) => {
                tracing::info!("a new host said hello on this connection; serving it");
                next = Some(hello);
            }
            Ok(None) => return Ok(()),
            Err(error) => return Err(error),
        }
    }
}

async fn route_frames<R: AsyncRead + Unpin>(
    agent: &Arc<Agent>,
    reader: &mut R,
    frames: &FrameSender,
    routes: &Routes,
) -> Result<Option<Frame>, ServeError> {
    while let Some((frame, payload)) = read_frame(reader).await? {
        let lock = || routes.lock().unwrap_or_else(PoisonError::into_inner);
        match frame {
            hello @ Frame::Hello { .. } => return Ok(Some(hello)),
            Frame::Open { session, operation } => {
                open_session(agent, frames, routes, session, operation)
            }
            Frame::Data {
                session,
                stream: StreamId::Stdin,
            } => {
                let inlet = lock().get(&session).and_then(|route| route.stdin.clone());
                let delivered = inlet.map(|inlet| inlet.deliver(payload.clone()));
                match delivered {
                    Some(Err(true)) => return Err(ServeError::WindowOverrun { session }),
                    // Nobody reads this stream any more: hand the credit straight back.
                    Some(Err(false)) | None => return_credit(frames, session, &payload),
                    Some(Ok(())) => {}
                }
            }
            Frame::Eof {
                session,
                stream: StreamId::Stdin,
            } => {
                if let Some(route) = lock().get_mut(&session) {
                    route.stdin = None;
                }
            }
            Frame::Credit {
                session,
                stream,
                bytes,
            } => {
                if let Some(route) = lock().get(&session) {
                    match stream {
                        StreamId::Stdout => route.stdout.grant(bytes),
                        StreamId::Stderr => route.stderr.grant(bytes),
                        StreamId::Stdin => {}
                    }
                }
            }
            Frame::Resize { session, size } => {
                if let Some(route) = lock().get(&session) {
                    let _ = route.control.send(Control::Resize(size));
                }
            }
            Frame::Signal { session, signal } => {
                if let Some(route) = lock().get(&session) {
                    let _ = route.control.send(Control::Signal(signal));
                }
            }
            Frame::Cancel { session } => {
                let route = lock().remove(&session);
                if let Some(route) = route {
                    // Dropping the control channel kills an exec's group;
                    // dropping the inlet ends stdin.
                    route.stdout.close();
                    route.stderr.close();
                }
            }
            // Frames only the agent sends, or output streams the host cannot write.
            _ => {}
        }
    }
    Ok(None)
}

fn return_credit(frames: &FrameSender, session: u64, payload: &Bytes) {
    if let Ok(bytes) = u32::try_from(payload.len()) {
        if bytes > 0 {
            send_frame(
                frames,
                Frame::Credit {
                    session,
                    stream: StreamId::Stdin,
                    bytes,
                },
            );
        }
    }
}

fn open_session(
    agent: &Arc<Agent>,
    frames: &FrameSender,
    routes: &Routes,
    session: u64,
    operation: Operation,
) {
    let (inlet, stdin) = receive_stream(frames.clone(), session, StreamId::Stdin);
    let (control_sender, control) = mpsc::unbounded_channel();
    let stdout = SendWindow::new();
    let stderr = SendWindow::new();
    let route = Route {
        stdin: Some(inlet),
        stdout: Arc::clone(&stdout),
        stderr: Arc::clone(&stderr),
        control: control_sender,
    };
    {
        let mut routes = routes.lock().unwrap_or_else(PoisonError::into_inner);
        if session == CONNECTION_SESSION || routes.contains_key(&session) {
            drop(routes);
            send_frame(
                frames,
                Frame::Failed {
                    session,
                    error: AgentError {
                        kind: AgentErrorKind::Protocol,
                        message: format!("Session id {session} is reserved or in use"),
                    },
                },
            );
            return;
        }
        routes.insert(session, route);
    }
    let io = ExecIo {
        frames: frames.clone(),
        session,
        stdin,
        stdout,
        stderr,
        control,
    };
    let agent = Arc::clone(agent);
    let routes = Arc::clone(routes);
    tokio::spawn(async move {
        let frames = io.frames.clone();
        let result = run_operation(&agent, operation, io).await;
        if let Some(route) = routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session)
        {
            route.stdout.close();
            route.stderr.close();
        }
        let frame = match result {
            Ok(result) => Frame::Done { session, result },
            Err(error) => Frame::Failed { session, error },
        };
        send_frame(&frames, frame);
    });
}

fn failure(kind: AgentErrorKind, error: &(dyn std::error::Error + 'static)) -> AgentError {
    AgentError {
        kind,
        message: error_chain(error),
    }
}

async fn run_operation(
    agent: &Arc<Agent>,
    operation: Operation,
    io: ExecIo,
) -> Result<OperationResult, AgentError> {
    match operation {
        Operation::Exec(request) => {
            exec::run(&agent.reaper, request, io, &agent.paths.command_path)
                .await
                .map(OperationResult::Exited)
                .map_err(|error| {
                    let kind = match &error {
                        exec::ExecError::EmptyCommand | exec::ExecError::UnknownUser { .. } => {
                            AgentErrorKind::InvalidRequest
                        }
                        exec::ExecError::Spawn { source, .. }
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            AgentErrorKind::InvalidRequest
                        }
                        exec::ExecError::Spawn { source, .. }
                            if source.kind() == std::io::ErrorKind::PermissionDenied =>
                        {
                            AgentErrorKind::PermissionDenied
                        }
                        _ => AgentErrorKind::Io,
                    };
                    failure(kind, &error)
                })
        }
        Operation::CopyIn { dest } => copy_in(io, PathBuf::from(dest)).await,
        Operation::CopyOut { path, follow_links } => {
            copy_out(io, PathBuf::from(path), follow_links).await
        }
        Operation::Stats => {
            let paths = agent.paths.clone();
            blocking(move || {
                system::stats(&paths)
                    .map(OperationResult::Stats)
                    .map_err(|error| failure(AgentErrorKind::Io, &error))
            })
            .await
        }
        Operation::ClockSync { unix_nanos } => {
            blocking(move || {
                system::sync_clock(unix_nanos)
                    .map(|offset_nanos| OperationResult::ClockSynced { offset_nanos })
                    .map_err(|error| failure(AgentErrorKind::PermissionDenied, &error))
            })
            .await
        }
        Operation::AuthSync(request) => {
            blocking(move || {
                system::authsync(&request)
                    .map(|()| OperationResult::AuthSynced)
                    .map_err(|error| {
                        let kind = match error {
                            system::SystemError::UnknownUser { .. } => {
                                AgentErrorKind::InvalidRequest
                            }
                            _ => AgentErrorKind::Io,
                        };
                        failure(kind, &error)
                    })
            })
            .await
        }
        Operation::HostKeys => {
            let dir = agent.paths.ssh_config_dir.clone();
            blocking(move || {
                system::host_keys(&dir)
                    .map(|keys| OperationResult::HostKeys { keys })
                    .map_err(|error| failure(AgentErrorKind::Io, &error))
            })
            .await
        }
        Operation::Listening { port } => {
            let proc_net = agent.paths.proc.join("net");
            blocking(move || {
                system::listening(&proc_net, port)
                    .map(|listening| OperationResult::Listening { listening })
                    .map_err(|error| failure(AgentErrorKind::Io, &error))
            })
            .await
        }
        Operation::Identity(request) => agent.apply_identity(request).await,
        Operation::Shutdown => {
            let _ = agent.shutdown.send(true);
            Ok(OperationResult::ShuttingDown)
        }
    }
}

async fn blocking<F>(work: F) -> Result<OperationResult, AgentError>
where
    F: FnOnce() -> Result<OperationResult, AgentError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| {
            Err(AgentError {
                kind: AgentErrorKind::Io,
                message: format!("Operation task failed: {error}"),
            })
        })
}

async fn copy_in(io: ExecIo, dest: PathBuf) -> Result<OperationResult, AgentError> {
    let handle = tokio::runtime::Handle::current();
    let ExecIo { stdin, .. } = io;
    blocking(move || {
        let mut reader = ChannelReader {
            stream: stdin,
            current: Bytes::new(),
            handle,
        };
        let result = files::unpack(&mut reader, &dest);
        let entries = result.map_err(|error| {
            let kind = match &error {
                files::FilesError::UnsafeEntry { .. } => AgentErrorKind::UnsafeArchive,
                files::FilesError::Unpack { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    AgentErrorKind::PermissionDenied
                }
                _ => AgentErrorKind::Io,
            };
            failure(kind, &error)
        })?;
        // Take the rest (tar's zero blocks) so the host's stream ends cleanly.
        std::io::copy(&mut reader, &mut std::io::sink()).ok();
        Ok(OperationResult::CopiedIn { entries })
    })
    .await
}

async fn copy_out(
    io: ExecIo,
    path: PathBuf,
    follow_links: bool,
) -> Result<OperationResult, AgentError> {
    let handle = tokio::runtime::Handle::current();
    let frames = io.frames.clone();
    let session = io.session;
    let window = Arc::clone(&io.stdout);
    send_frame(
        &frames,
        Frame::Eof {
            session,
            stream: StreamId::Stderr,
        },
    );
    let result = blocking(move || {
        let writer = ChannelWriter {
            frames: frames.clone(),
            session,
            window,
            handle,
        };
        let writer = std::io::BufWriter::with_capacity(64 * 1024, writer);
        files::pack_with(&path, writer, follow_links).map_err(|error| {
            let kind = match &error {
                files::FilesError::ReadSource { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    AgentErrorKind::InvalidRequest
                }
                _ => AgentErrorKind::Io,
            };
            failure(kind, &error)
        })?;
        send_frame(
            &frames,
            Frame::Eof {
                session,
                stream: StreamId::Stdout,
            },
        );
        Ok(OperationResult::CopiedOut)
    })
    .await;
    drop(io);
    result
}

/// A session's stdin as a blocking `Read`, for the tar crate on a blocking thread.
struct ChannelReader {
    stream: ReceiveStream,
    current: Bytes,
    handle: tokio::runtime::Handle,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            match self.handle.block_on(self.stream.recv()) {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let len = buffer.len().min(self.current.len());
        buffer[..len].copy_from_slice(&self.current.split_to(len));
        Ok(len)
    }
}

/// A session's stdout as a blocking `Write` that waits for credit.
struct ChannelWriter {
    frames: FrameSender,
    session: u64,
    window: Arc<SendWindow>,
    handle: tokio::runtime::Handle,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let sent = self.handle.block_on(self.window.send(
            &self.frames,
            self.session,
            StreamId::Stdout,
            Bytes::copy_from_slice(data),
        ));
        if sent {
            Ok(data.len())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "host stopped reading",
            ))
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
