//! WorkspaceService: `vm.workspace.{prepare,upload,export}` and the
//! `workspace` stage of `vm create --workspace`.
//!
//! The daemon never opens a user's files: the CLI, running as the user,
//! packs the repository and writes what comes back; the daemon drives the
//! guest side (`banger_workspace::guest`) over the VM's agent connection.
//! Between them, after the method's response line, the connection carries
//! the frames of `banger_proto::workspace` (`kind u8 | length u32 |
//! payload`).
//!
//! `vm.workspace.prepare` (a running VM):
//! 1. Check the spec (destination, user, base), find the VM's agent, claim
//!    DEST in the guest (refuse one that is not empty unless `force`).
//! 2. Answer the call. The connection now carries the CLI's upload: `Data`
//!    frames (the tar), then `End` (the links to make) or `Error`.
//! 3. Unpack the tar through the agent's `copy_in` as it arrives; the
//!    socket's backpressure holds the CLI while the guest is slower.
//! 4. Make the links, write the base record, hand DEST to the user.
//! 5. Answer with one frame: `End` ([`WorkspacePrepared`]) or `Error`. An
//!    early `Error` (the guest refused the tar) ends the reading.
//!
//! The `workspace` stage of a create (after `agent ready`, before `ready`):
//! 1. `vm.create` with `workspace` makes a [`WorkspaceStage`]; once the
//!    operation exists it registers an upload slot under the operation's id
//!    with the caller's uid ([`GuestStage::bind`]). The slot
//!    lives as long as the create.
//! 2. The CLI calls `vm.workspace.upload {operation_id}` on a second
//!    connection. Only a peer with the creator's uid gets the slot, once; the
//!    call is answered and the connection handed to the stage. It may come
//!    before the stage runs: it then waits in the slot, unread, and the
//!    socket's backpressure holds the CLI.
//! 3. The stage claims DEST, waits for the upload (at most
//!    [`UPLOAD_WAIT`]), then runs steps 3-5 above, reporting the bytes as
//!    the stage's progress.
//! 4. Cancellation, an upload that stalls for [`IDLE_TIMEOUT`], or either
//!    side going away fails the stage; the create then rolls back like for
//!    any failed stage (the VMM is killed, its disk and the network released).
//!
//! `vm.workspace.export`:
//! 1. Check the request, find the VM's agent, answer the call.
//! 2. `patch`: stream the guest's patch as `Data` frames. `branch`: make the
//!    guest's commit, then stream its bundle (none when the host has the
//!    commit already).
//! 3. End with `End` ([`WorkspaceExported`]) or `Error`.
//!
//! Everything read from a caller is bounded: frame sizes (by kind), link
//! count and lengths, text that reaches a guest command line.
//!
//! The service's functions fail with a [`WorkspaceError`]. It becomes a
//! `DaemonError` at the service's edges: the answers it writes to a caller
//! (the call's response, the closing `Error` frame), `vm.create`'s `?` on
//! [`WorkspaceService::create_stage`], and [`GuestStage::run`], which
//! returns a `DaemonResult`. What the VM service answers (through
//! [`Guests`] and the stage's agent wait) is a `DaemonError` already, kept
//! whole in `WorkspaceError::Vm`.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_agent_proto::client::AgentClient;
use banger_proto::method::{self, Method as _};
use banger_proto::workspace::{
    ExportMode, ExportWorkspaceParams, ExportWorkspaceResult, PrepareWorkspaceParams,
    PrepareWorkspaceResult, UploadTrailer, UploadWorkspaceParams, UploadWorkspaceResult,
    WorkspaceExported, WorkspacePrepared, WorkspaceSpec, STAGE,
};
use banger_proto::{ErrorKind, Response, RpcError, Vm};
use banger_workspace::guest::{self, GuestError};
use banger_workspace::stream::{self, Frame, StreamError};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::access::Peer;
use crate::error::{DaemonError, DaemonResult, RpcFailure};
use crate::operations::{LiveOperation, OperationError, Stage};
use crate::vms::{AgentWait, GuestStage, VmService};

/// The running guests a workspace call reaches: a seam the workspace service
/// defines, which the VM service implements.
#[async_trait::async_trait]
pub trait Guests: Send + Sync {
    /// A running VM (by name or id prefix) and its agent connection.
    async fn agent(&self, reference: &str) -> DaemonResult<(Vm, AgentClient)>;
}

#[async_trait::async_trait]
impl Guests for VmService {
    async fn agent(&self, reference: &str) -> DaemonResult<(Vm, AgentClient)> {
        VmService::agent(self, reference).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    // What a caller asked for.
    #[error("Invalid params")]
    InvalidParams(#[source] serde_json::Error),
    #[error("A workspace needs a running VM: `workspace` and `no_start` exclude each other")]
    NoStart,

    // The upload slot of a create.
    #[error("No create operation `{operation}` is waiting for a workspace upload")]
    NoPendingUpload { operation: String },
    #[error(
        "Operation `{operation}` was started by another user; only they may upload its workspace"
    )]
    NotCreator { operation: String },
    #[error("Operation `{operation}` already has its workspace upload")]
    UploadTaken { operation: String },
    #[error("Operation `{operation}` ended before its workspace upload")]
    OperationEnded { operation: String },
    #[error("The workspace stage has no upload slot")]
    NoUploadSlot,
    #[error("No workspace upload arrived within {} s", .wait.as_secs())]
    NoUpload { wait: Duration },
    #[error("The workspace upload slot closed")]
    SlotClosed,

    // An upload.
    /// The caller broke the protocol, or its stream failed.
    #[error("The workspace upload failed")]
    Upload(#[source] StreamError),
    #[error("The workspace upload stalled: nothing arrived for {} s", .idle.as_secs())]
    UploadStalled { idle: Duration },
    /// The caller's `Error` frame.
    #[error("The caller gave up the upload")]
    CallerGaveUp(#[source] RpcError),
    #[error("The workspace upload ended early: the caller went away")]
    CallerGone,
    #[error("The guest agent of VM `{vm}` stopped reading the workspace early")]
    GuestStopped { vm: String },

    // An export.
    #[error("The caller stopped reading the export")]
    ExportUnread(#[source] io::Error),
    #[error("The caller read nothing of the export for {} s", .idle.as_secs())]
    ExportIdle { idle: Duration },

    // What the guest and the services this one calls returned.
    /// A check of the request, or the guest side of a workspace.
    #[error(transparent)]
    Guest(Box<GuestError>),
    /// The VM service's answer through [`Guests`] or a create's
    /// [`AgentWait`] (a lookup, a VM that is not running, its agent): a
    /// `DaemonResult` there, kept whole.
    #[error(transparent)]
    Vm(DaemonError),
    /// The create was cancelled.
    #[error(transparent)]
    Operation(#[from] OperationError),
}

impl From<GuestError> for WorkspaceError {
    fn from(error: GuestError) -> Self {
        Self::Guest(Box::new(error))
    }
}

impl RpcFailure for WorkspaceError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidParams(_) | Self::NoStart => ErrorKind::InvalidParams,
            Self::NoPendingUpload { .. } => ErrorKind::NotFound,
            Self::NotCreator { .. } => ErrorKind::NotAllowed,
            Self::UploadTaken { .. } | Self::OperationEnded { .. } => ErrorKind::InvalidState,
            Self::NoUploadSlot => ErrorKind::Internal,
            Self::Upload(error) => match error {
                StreamError::TooLarge { .. }
                | StreamError::UnknownKind { .. }
                | StreamError::Decode { .. }
                | StreamError::Unexpected { .. } => ErrorKind::InvalidRequest,
                StreamError::Io(_) | StreamError::Truncated | StreamError::Ended => {
                    ErrorKind::Failed
                }
            },
            Self::NoUpload { .. }
            | Self::SlotClosed
            | Self::UploadStalled { .. }
            | Self::CallerGaveUp(_)
            | Self::CallerGone
            | Self::GuestStopped { .. }
            | Self::ExportUnread(_)
            | Self::ExportIdle { .. } => ErrorKind::Failed,
            Self::Guest(error) => match &**error {
                error if error.is_invalid_request() => ErrorKind::InvalidParams,
                GuestError::DestHasFiles { .. } | GuestError::DestHasWorkspace { .. } => {
                    ErrorKind::AlreadyExists
                }
                GuestError::NoUser { .. } => ErrorKind::InvalidParams,
                GuestError::NoWorkspace { .. } => ErrorKind::NotFound,
                _ => ErrorKind::Failed,
            },
            Self::Vm(error) => error.kind,
            Self::Operation(error) => error.kind(),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NoUpload { .. } => Some(
                "`banger vm create --workspace` sends it; a client of `vm.create` sends it with `vm.workspace.upload`"
                    .to_owned(),
            ),
            Self::NoStart => Some("drop --no-start, or drop the workspace".to_owned()),
            Self::Guest(error) => error.hint().map(str::to_owned),
            Self::Vm(error) => error.hint().map(str::to_owned),
            Self::Operation(error) => error.hint(),
            _ => None,
        }
    }
}

/// How long the `workspace` stage waits for its upload to arrive.
pub const UPLOAD_WAIT: Duration = Duration::from_secs(60);
/// How long an upload may pause between frames, or an export's reader
/// leave a frame unread.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the stage reports the bytes received.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes buffered between the upload and the agent's `copy_in`.
const PIPE_BYTES: usize = 512 * 1024;

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A caller's connection after its call was answered.
pub struct Connection {
    reader: Reader,
    writer: Writer,
    /// About how many bytes the upload has (for progress).
    total_bytes: Option<u64>,
}

/// An upload slot: who may fill it, and where the connection goes.
struct PendingUpload {
    caller_uid: u32,
    deliver: Option<oneshot::Sender<Connection>>,
}

pub struct WorkspaceService {
    pending: Mutex<HashMap<String, PendingUpload>>,
    upload_wait: Duration,
    idle_timeout: Duration,
}

/// The methods this service serves on a connection of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Prepare,
    Upload,
    Export,
}

impl Call {
    pub fn parse(method_name: &str) -> Option<Self> {
        match method_name {
            method::VmWorkspacePrepare::NAME => Some(Self::Prepare),
            method::VmWorkspaceUpload::NAME => Some(Self::Upload),
            method::VmWorkspaceExport::NAME => Some(Self::Export),
            _ => None,
        }
    }
}

impl WorkspaceService {
    pub fn new() -> Arc<Self> {
        Self::with_timeouts(UPLOAD_WAIT, IDLE_TIMEOUT)
    }

    pub fn with_timeouts(upload_wait: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::default(),
            upload_wait,
            idle_timeout,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingUpload>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The `workspace` stage of a `vm.create` by `caller_uid`.
    pub fn create_stage(
        self: &Arc<Self>,
        spec: &WorkspaceSpec,
        no_start: bool,
        caller_uid: u32,
    ) -> Result<WorkspaceStage, WorkspaceError> {
        if no_start {
            return Err(WorkspaceError::NoStart);
        }
        Ok(WorkspaceStage {
            service: Arc::clone(self),
            spec: guest::check_spec(spec)?,
            caller_uid,
            operation_id: None,
            arrival: None,
        })
    }

    /// Serves a `vm.workspace.*` call; the connection is the call's from
    /// here (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub async fn serve<R, W>(
        &self,
        call: Call,
        vms: &dyn Guests,
        peer: Peer,
        params: Option<Value>,
        id: Value,
        reader: R,
        writer: W,
    ) -> io::Result<()>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let connection = Connection {
            reader: Box::new(reader),
            writer: Box::new(writer),
            total_bytes: None,
        };
        match call {
            Call::Prepare => self.serve_prepare(vms, params, id, connection).await,
            Call::Upload => self.serve_upload(peer, params, id, connection).await,
            Call::Export => self.serve_export(vms, params, id, connection).await,
        }
    }

    async fn serve_prepare(
        &self,
        vms: &dyn Guests,
        params: Option<Value>,
        id: Value,
        mut connection: Connection,
    ) -> io::Result<()> {
        let started = Instant::now();
        let claimed = async {
            let params: PrepareWorkspaceParams = parse(params)?;
            let spec = guest::check_spec(&params.workspace)?;
            let (vm, agent) = vms.agent(&params.vm).await.map_err(WorkspaceError::Vm)?;
            guest::claim_dest(&agent, &vm.name, &spec.dest, &spec.user, spec.force).await?;
            Ok::<_, WorkspaceError>((vm, agent, spec))
        }
        .await;
        let (vm, agent, spec) = match claimed {
            Ok(claimed) => claimed,
            Err(error) => {
                return respond(
                    &mut connection.writer,
                    &Response::failure(id, DaemonError::from(error).to_rpc()),
                )
                .await
            }
        };
        let result = PrepareWorkspaceResult {
            vm: vm.name.clone(),
            dest: spec.dest.clone(),
        };
        respond(
            &mut connection.writer,
            &Response::success(id, to_value(&result)),
        )
        .await?;
        let outcome = self
            .receive(&agent, &vm.name, &spec, &mut connection.reader, |_| {})
            .await
            .map(|received| received.prepared(started))
            .map_err(DaemonError::from);
        log_outcome(&vm.name, &spec.dest, &outcome);
        self.answer(&mut connection.writer, &outcome).await
    }

    async fn serve_upload(
        &self,
        peer: Peer,
        params: Option<Value>,
        id: Value,
        mut connection: Connection,
    ) -> io::Result<()> {
        let accepted = parse::<UploadWorkspaceParams>(params).and_then(|params| {
            let deliver = self.accept_upload(&params.operation_id, peer.uid)?;
            Ok((params, deliver))
        });
        let (params, deliver) = match accepted.map_err(DaemonError::from) {
            Ok(accepted) => accepted,
            Err(error) => {
                if error.kind == ErrorKind::NotAllowed {
                    tracing::warn!(uid = peer.uid, %error, "refused a workspace upload");
                }
                return respond(
                    &mut connection.writer,
                    &Response::failure(id, error.to_rpc()),
                )
                .await;
            }
        };
        let result = UploadWorkspaceResult {
            operation_id: params.operation_id.clone(),
        };
        respond(
            &mut connection.writer,
            &Response::success(id, to_value(&result)),
        )
        .await?;
        connection.total_bytes = params.total_bytes;
        if let Err(mut connection) = deliver.send(connection) {
            let error = DaemonError::from(WorkspaceError::OperationEnded {
                operation: params.operation_id,
            });
            return stream::write_error(&mut connection.writer, &error.to_rpc()).await;
        }
        Ok(())
    }

    /// Takes the upload slot of `operation_id` for a peer with `uid`.
    fn accept_upload(
        &self,
        operation_id: &str,
        uid: u32,
    ) -> Result<oneshot::Sender<Connection>, WorkspaceError> {
        let mut pending = self.pending();
        let Some(upload) = pending.get_mut(operation_id) else {
            return Err(WorkspaceError::NoPendingUpload {
                operation: operation_id.to_owned(),
            });
        };
        // Anyone in the access group may call; only the creator may fill
        // the VM it is creating.
        if upload.caller_uid != uid {
            return Err(WorkspaceError::NotCreator {
                operation: operation_id.to_owned(),
            });
        }
        upload
            .deliver
            .take()
            .ok_or_else(|| WorkspaceError::UploadTaken {
                operation: operation_id.to_owned(),
            })
    }

    async fn serve_export(
        &self,
        vms: &dyn Guests,
        params: Option<Value>,
        id: Value,
        mut connection: Connection,
    ) -> io::Result<()> {
        let checked = async {
            let params: ExportWorkspaceParams = parse(params)?;
            let spec = guest::check_spec(&WorkspaceSpec {
                dest: params.dest.clone(),
                user: params.user.clone(),
                force: false,
                base: None,
            })?;
            guest::check_identity(params.git_name.as_deref(), params.git_email.as_deref())?;
            let (vm, agent) = vms.agent(&params.vm).await.map_err(WorkspaceError::Vm)?;
            Ok::<_, WorkspaceError>((params, spec, vm, agent))
        }
        .await;
        let (params, spec, vm, agent) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                return respond(
                    &mut connection.writer,
                    &Response::failure(id, DaemonError::from(error).to_rpc()),
                )
                .await
            }
        };
        let result = ExportWorkspaceResult {
            vm: vm.name.clone(),
            dest: spec.dest.clone(),
        };
        respond(
            &mut connection.writer,
            &Response::success(id, to_value(&result)),
        )
        .await?;
        let outcome = self
            .export(&agent, &vm, &spec, &params, &mut connection.writer)
            .await
            .map_err(DaemonError::from);
        match &outcome {
            Ok(exported) => {
                tracing::info!(vm = %vm.name, dest = %spec.dest, mode = ?params.mode, bytes = exported.bytes, "exported workspace");
            }
            Err(error) => {
                tracing::info!(vm = %vm.name, dest = %spec.dest, mode = ?params.mode, %error, "workspace export failed");
            }
        }
        self.answer(&mut connection.writer, &outcome).await
    }

    async fn export(
        &self,
        agent: &AgentClient,
        vm: &Vm,
        spec: &WorkspaceSpec,
        params: &ExportWorkspaceParams,
        writer: &mut Writer,
    ) -> Result<WorkspaceExported, WorkspaceError> {
        match params.mode {
            ExportMode::Patch => {
                let output = guest::export_patch(agent, &vm.name, &spec.dest, &spec.user).await?;
                let bytes = self.forward(output, writer).await?;
                Ok(WorkspaceExported {
                    base: None,
                    commit: None,
                    bytes,
                })
            }
            ExportMode::Branch => {
                let message = format!("Uncommitted changes in {}:{}", vm.name, spec.dest);
                let identity = (
                    params.git_name.as_deref().unwrap_or("banger"),
                    params.git_email.as_deref().unwrap_or("banger@localhost"),
                );
                let commit = guest::export_commit(
                    agent, &vm.name, &spec.dest, &spec.user, &message, identity,
                )
                .await?;
                let bytes = if commit.needs_bundle {
                    let output = guest::export_bundle(
                        agent,
                        &vm.name,
                        &spec.dest,
                        &spec.user,
                        &commit.commit,
                    )
                    .await?;
                    self.forward(output, writer).await?
                } else {
                    0
                };
                Ok(WorkspaceExported {
                    base: Some(commit.base),
                    commit: Some(commit.commit),
                    bytes,
                })
            }
        }
    }

    /// Sends an export's output as `Data` frames, then waits for its end.
    async fn forward(
        &self,
        mut output: guest::ExportStream,
        writer: &mut Writer,
    ) -> Result<u64, WorkspaceError> {
        let mut bytes = 0_u64;
        while let Some(chunk) = output.next().await {
            match tokio::time::timeout(self.idle_timeout, stream::write_data(writer, &chunk)).await
            {
                Ok(Ok(())) => bytes += chunk.len() as u64,
                Ok(Err(error)) => return Err(WorkspaceError::ExportUnread(error)),
                Err(_) => {
                    return Err(WorkspaceError::ExportIdle {
                        idle: self.idle_timeout,
                    })
                }
            }
        }
        output.finish().await?;
        Ok(bytes)
    }

    /// Steps 3-4 of prepare: the upload into the guest, then the finish.
    async fn receive(
        &self,
        agent: &AgentClient,
        vm: &str,
        spec: &WorkspaceSpec,
        reader: &mut Reader,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<Received, WorkspaceError> {
        let (pipe, mut pipe_writer) = tokio::io::duplex(PIPE_BYTES);
        let idle = self.idle_timeout;
        // Owns the pipe's writing end: however it ends, the agent sees the
        // end of the tar and `copy_in` returns.
        let pump = async move {
            let mut bytes = 0_u64;
            loop {
                let frame = match tokio::time::timeout(idle, stream::read_frame(reader)).await {
                    Ok(frame) => {
                        frame.map_err(|error| Pump::Caller(WorkspaceError::Upload(error)))?
                    }
                    Err(_) => return Err(Pump::Caller(WorkspaceError::UploadStalled { idle })),
                };
                match frame {
                    Some(Frame::Data(chunk)) => {
                        if pipe_writer.write_all(&chunk).await.is_err() {
                            return Err(Pump::GuestStopped);
                        }
                        bytes += chunk.len() as u64;
                        progress(bytes);
                    }
                    Some(frame @ Frame::End(_)) => {
                        let trailer = frame
                            .decode_end::<UploadTrailer>()
                            .map_err(|error| Pump::Caller(WorkspaceError::Upload(error)))?
                            .map_err(|_| Pump::GuestStopped)?;
                        if pipe_writer.shutdown().await.is_err() {
                            return Err(Pump::GuestStopped);
                        }
                        return Ok((trailer, bytes));
                    }
                    Some(Frame::Error(error)) => {
                        return Err(Pump::Caller(WorkspaceError::CallerGaveUp(error)))
                    }
                    None => return Err(Pump::Caller(WorkspaceError::CallerGone)),
                }
            }
        };
        let copy = guest::unpack(agent, vm, &spec.dest, pipe);
        let (pumped, copied) = tokio::join!(pump, copy);
        let (trailer, bytes, entries) = match (pumped, copied) {
            (Ok((trailer, bytes)), Ok(entries)) => (trailer, bytes, entries),
            // The caller's failure explains the guest's (a cut tar).
            (Err(Pump::Caller(error)), _) => return Err(error),
            (_, Err(error)) => return Err(error.into()),
            (Err(Pump::GuestStopped), Ok(_)) => {
                return Err(WorkspaceError::GuestStopped { vm: vm.to_owned() })
            }
        };
        guest::check_trailer(&trailer)?;
        guest::finish_dest(agent, vm, spec, &trailer.links).await?;
        Ok(Received {
            entries,
            bytes,
            skipped: trailer.skipped,
        })
    }

    /// The closing frame to a caller: `End` with `outcome`, or `Error`.
    async fn answer<T: Serialize>(
        &self,
        writer: &mut Writer,
        outcome: &DaemonResult<T>,
    ) -> io::Result<()> {
        let written = async {
            match outcome {
                Ok(value) => stream::write_end(writer, value).await,
                Err(error) => stream::write_error(writer, &error.to_rpc()).await,
            }
        };
        tokio::time::timeout(self.idle_timeout, written)
            .await
            .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::TimedOut)))
    }
}

/// Why the upload's pump stopped early.
enum Pump {
    /// The caller failed, went away or broke the protocol.
    Caller(WorkspaceError),
    /// The agent stopped taking the tar; its own answer says why.
    GuestStopped,
}

/// What an upload left in the guest.
struct Received {
    entries: u64,
    bytes: u64,
    skipped: u64,
}

impl Received {
    fn prepared(&self, started: Instant) -> WorkspacePrepared {
        WorkspacePrepared {
            entries: self.entries,
            bytes: self.bytes,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The stage's closing message.
    fn summary(&self, started: Instant) -> String {
        // Display only: precision loss above 2^52 bytes does not matter.
        #[allow(clippy::cast_precision_loss)]
        let mebibytes = self.bytes as f64 / (1024.0 * 1024.0);
        let seconds = started.elapsed().as_secs_f64().max(0.001);
        let mut message = format!(
            "{} files, {mebibytes:.1} MiB, {:.0} MiB/s",
            self.entries,
            mebibytes / seconds
        );
        if self.skipped > 0 {
            message.push_str(&format!(", {} special files skipped", self.skipped));
        }
        message
    }
}

fn log_outcome(vm: &str, dest: &str, outcome: &DaemonResult<WorkspacePrepared>) {
    match outcome {
        Ok(prepared) => {
            tracing::info!(
                vm,
                dest,
                entries = prepared.entries,
                bytes = prepared.bytes,
                "prepared workspace"
            );
        }
        Err(error) => tracing::info!(vm, dest, %error, "workspace prepare failed"),
    }
}

/// The `workspace` stage of one create (see the module docs). Dropping it
/// closes its upload slot.
pub struct WorkspaceStage {
    service: Arc<WorkspaceService>,
    spec: WorkspaceSpec,
    caller_uid: u32,
    operation_id: Option<String>,
    arrival: Option<oneshot::Receiver<Connection>>,
}

/// The create's `workspace` step (see [`crate::vms::GuestStage`]).
#[async_trait::async_trait]
impl GuestStage for WorkspaceStage {
    /// Opens the upload slot under the create's operation id: from now
    /// until the stage is dropped, its caller may upload.
    fn bind(&mut self, operation_id: &str) {
        let (deliver, arrival) = oneshot::channel();
        self.service.pending().insert(
            operation_id.to_owned(),
            PendingUpload {
                caller_uid: self.caller_uid,
                deliver: Some(deliver),
            },
        );
        self.operation_id = Some(operation_id.to_owned());
        self.arrival = Some(arrival);
    }

    /// Runs the stage: `agent` is the VM's agent connection, awaited inside
    /// the stage. Cancelling the operation stops it at once.
    async fn run(
        mut self: Box<Self>,
        operation: &LiveOperation,
        vm: &Vm,
        agent: AgentWait<'_>,
    ) -> DaemonResult<()> {
        if operation.is_cancelled() {
            return Err(operation.cancelled_error().into());
        }
        let stage = operation.start_stage(STAGE);
        let started = Instant::now();
        let cancellation = operation.cancellation();
        let mut connection = None;
        let outcome = tokio::select! {
            outcome = self.prepare(operation, &stage, vm, agent, &mut connection) => outcome,
            () = cancellation.cancelled() => Err(operation.cancelled_error().into()),
        }
        .map_err(DaemonError::from);
        let answer = outcome
            .as_ref()
            .map(|received| received.prepared(started))
            .map_err(|error| DaemonError::new(error.kind, error.chain()));
        log_outcome(&vm.name, &self.spec.dest, &answer);
        // The uploader hears how it ended, if it came.
        if let Some(mut connection) = connection {
            if let Err(error) = self.service.answer(&mut connection.writer, &answer).await {
                tracing::debug!(%error, "could not tell the uploader how the stage ended");
            }
        }
        match outcome {
            Ok(received) => {
                operation.finish_stage(&stage, Some(received.summary(started)));
                Ok(())
            }
            Err(error) => {
                operation.fail_stage(&stage, &error);
                Err(error)
            }
        }
    }
}

impl WorkspaceStage {
    async fn prepare(
        &mut self,
        operation: &LiveOperation,
        stage: &Stage,
        vm: &Vm,
        agent: AgentWait<'_>,
        connection: &mut Option<Connection>,
    ) -> Result<Received, WorkspaceError> {
        let agent = agent.await.map_err(WorkspaceError::Vm)?;
        guest::claim_dest(
            &agent,
            &vm.name,
            &self.spec.dest,
            &self.spec.user,
            self.spec.force,
        )
        .await?;
        let arrival = self.arrival.take().ok_or(WorkspaceError::NoUploadSlot)?;
        let wait = self.service.upload_wait;
        let arrived = tokio::time::timeout(wait, arrival)
            .await
            .map_err(|_| WorkspaceError::NoUpload { wait })?
            .map_err(|_| WorkspaceError::SlotClosed)?;
        let connection = connection.insert(arrived);
        let total = connection.total_bytes;
        let mut reported = Instant::now();
        let progress = |bytes| {
            if reported.elapsed() >= PROGRESS_INTERVAL {
                reported = Instant::now();
                operation.progress(stage, bytes, total);
            }
        };
        self.service
            .receive(
                &agent,
                &vm.name,
                &self.spec,
                &mut connection.reader,
                progress,
            )
            .await
    }
}

impl Drop for WorkspaceStage {
    fn drop(&mut self) {
        if let Some(operation_id) = &self.operation_id {
            self.service.pending().remove(operation_id);
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(params: Option<Value>) -> Result<T, WorkspaceError> {
    let value = match params {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(value) => value,
    };
    serde_json::from_value(value).map_err(WorkspaceError::InvalidParams)
}

fn to_value(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Writes one response line.
async fn respond(writer: &mut Writer, response: &Response) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_agent::reaper::{ReapMode, Reaper};
    use banger_agent::server::{serve_connection, Agent};
    use banger_agent::system::SystemPaths;
    use banger_proto::workspace::{FrameKind, WorkspaceLink, MAX_LINKS};
    use banger_proto::{OperationState, StageStatus, VmState};

    /// A guest agent in this process (host test mode: guest paths are
    /// host paths), and a client connected to it.
    async fn agent() -> AgentClient {
        let (host, guest) = tokio::io::duplex(1 << 20);
        let agent = Agent::new(
            SystemPaths::default(),
            false,
            Reaper::start(ReapMode::OwnChildren).unwrap(),
        );
        tokio::spawn(serve_connection(agent, guest));
        AgentClient::connect(host).await.unwrap()
    }

    fn spec(dest: &std::path::Path) -> WorkspaceSpec {
        WorkspaceSpec {
            dest: dest.to_str().unwrap().to_owned(),
            user: "root".to_owned(),
            force: false,
            base: Some("none".to_owned()),
        }
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// A tar whose one entry the agent refuses: a link out of DEST.
    fn absolute_link_tar() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, "escape", "/etc/hostname")
            .unwrap();
        builder.into_inner().unwrap()
    }

    fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind.byte()];
        bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn trailer(links: Vec<WorkspaceLink>) -> Vec<u8> {
        serde_json::to_vec(&UploadTrailer { links, skipped: 1 }).unwrap()
    }

    /// Runs `receive` on an upload of `wire` into a fresh DEST.
    async fn receive(wire: Vec<u8>) -> (tempfile::TempDir, Result<Received, WorkspaceError>) {
        let dir = tempfile::tempdir().unwrap();
        let service = WorkspaceService::new();
        let agent = agent().await;
        let mut reader: Reader = Box::new(std::io::Cursor::new(wire));
        let spec = spec(&dir.path().join("repo"));
        let outcome = service
            .receive(&agent, "vm", &spec, &mut reader, |_| {})
            .await;
        (dir, outcome)
    }

    #[tokio::test]
    async fn an_upload_lands_with_its_links_and_base() {
        let mut wire = frame(FrameKind::Data, &tar_of(&[("a.txt", b"one\n")]));
        wire.extend(frame(
            FrameKind::End,
            &trailer(vec![WorkspaceLink {
                target: "/etc/hostname".into(),
                name: "deep/link".into(),
            }]),
        ));
        let (dir, outcome) = receive(wire).await;
        let received = outcome.unwrap();
        assert_eq!(received.entries, 1);
        assert_eq!(received.skipped, 1);
        let repo = dir.path().join("repo");
        assert_eq!(std::fs::read(repo.join("a.txt")).unwrap(), b"one\n");
        assert_eq!(
            std::fs::read_link(repo.join("deep/link")).unwrap(),
            std::path::Path::new("/etc/hostname")
        );
        assert_eq!(
            std::fs::read_to_string(repo.join(".git/banger-workspace-base")).unwrap(),
            "none\n"
        );
    }

    #[tokio::test]
    async fn hostile_uploads_are_refused() {
        let data = frame(FrameKind::Data, &tar_of(&[("a.txt", b"one\n")]));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // Ends without its closing frame: the caller went away.
            (data.clone(), "the caller went away"),
            // Cut in the middle of a frame.
            (data[..data.len() - 3].to_vec(), "middle of a frame"),
            // A length over the kind's limit.
            (
                [
                    vec![FrameKind::Data.byte()],
                    u32::MAX.to_be_bytes().to_vec(),
                ]
                .concat(),
                "over the limit",
            ),
            ([9_u8, 0, 0, 0, 0].to_vec(), "Unknown workspace frame kind"),
            (
                [data.clone(), frame(FrameKind::End, b"not json")].concat(),
                "not the expected JSON",
            ),
            // A link out of DEST, or too many.
            (
                [
                    data.clone(),
                    frame(
                        FrameKind::End,
                        &trailer(vec![WorkspaceLink {
                            target: "x".into(),
                            name: "../../escape".into(),
                        }]),
                    ),
                ]
                .concat(),
                "Invalid symlink",
            ),
            (
                [
                    data.clone(),
                    frame(
                        FrameKind::End,
                        &trailer(vec![
                            WorkspaceLink {
                                target: "x".into(),
                                name: "l".into(),
                            };
                            MAX_LINKS + 1
                        ]),
                    ),
                ]
                .concat(),
                "Too many symlinks",
            ),
            // The caller gives up, and says why.
            (
                [
                    data.clone(),
                    frame(
                        FrameKind::Error,
                        &serde_json::to_vec(&banger_proto::RpcError::new(
                            ErrorKind::Failed,
                            "Cannot pack x",
                        ))
                        .unwrap(),
                    ),
                ]
                .concat(),
                "The caller gave up the upload: Cannot pack x",
            ),
            // The guest refuses the tar itself.
            (
                [
                    frame(FrameKind::Data, &absolute_link_tar()),
                    frame(FrameKind::End, &trailer(Vec::new())),
                ]
                .concat(),
                "guest agent of VM `vm` failed",
            ),
        ];
        for (wire, expected) in cases {
            let (dir, outcome) = receive(wire).await;
            let error = crate::error::chain(&outcome.err().expect("refused"));
            assert!(error.contains(expected), "{error} (wanted {expected})");
            assert!(!dir.path().join("escape").exists());
            assert!(!dir.path().join("repo/.git/banger-workspace-base").exists());
        }
    }

    #[test]
    fn errors_keep_their_kind_and_hint() {
        let taken = WorkspaceError::from(GuestError::DestHasFiles {
            vm: "dev".to_owned(),
            dest: "/root/repo".to_owned(),
        });
        assert_eq!(taken.kind(), ErrorKind::AlreadyExists);
        let rpc = DaemonError::from(taken).to_rpc();
        assert_eq!(rpc.message, "VM `dev` already has files at /root/repo");
        assert_eq!(
            rpc.hint(),
            Some("`--force` replaces it (everything there is removed first)")
        );

        let refused = WorkspaceError::Vm(
            DaemonError::invalid_state("VM `dev` is stopped").with_hint("start it"),
        );
        assert_eq!(refused.kind(), ErrorKind::InvalidState);
        assert_eq!(refused.hint().as_deref(), Some("start it"));

        let gave_up = WorkspaceError::CallerGaveUp(banger_proto::RpcError::new(
            ErrorKind::Failed,
            "Cannot pack x",
        ));
        assert_eq!(
            crate::error::chain(&gave_up),
            "The caller gave up the upload: Cannot pack x"
        );
        assert_eq!(
            WorkspaceError::Upload(StreamError::Truncated).kind(),
            ErrorKind::Failed
        );
        assert_eq!(
            WorkspaceError::Upload(StreamError::UnknownKind { kind: 9 }).kind(),
            ErrorKind::InvalidRequest
        );
        let late = WorkspaceError::NoUpload {
            wait: Duration::from_secs(60),
        };
        assert_eq!(late.to_string(), "No workspace upload arrived within 60 s");
        assert!(late.hint().unwrap().contains("vm.workspace.upload"));
    }

    fn vm() -> Vm {
        Vm {
            id: "0123456789abcdef".into(),
            name: "dev".into(),
            state: VmState::Running,
            image: "img".into(),
            kernel: "krn".into(),
            backend: banger_proto::Backend::Firecracker,
            vcpus: 1,
            memory_mib: 128,
            disk_bytes: 0,
            pid: None,
            created_at: crate::ids::now(),
            started_at: None,
            error: None,
            dir: "/x".into(),
            network: None,
            work_disk: None,
        }
    }

    fn registry() -> crate::operations::OperationRegistry {
        crate::operations::OperationRegistry::new(banger_store::Store::open_in_memory().unwrap())
    }

    #[test]
    fn only_the_creator_uploads_and_only_once() {
        let service = WorkspaceService::new();
        let dest = std::path::Path::new("/root/repo");
        assert!(service.create_stage(&spec(dest), true, 1000).is_err());
        let mut bad = spec(dest);
        bad.dest = "relative".into();
        assert_eq!(
            service
                .create_stage(&bad, false, 1000)
                .err()
                .unwrap()
                .kind(),
            ErrorKind::InvalidParams
        );

        let stage = service
            .create_stage(&spec(dest), false, 1000)
            .unwrap()
            .bound("op");
        let kind = |result: Result<oneshot::Sender<Connection>, WorkspaceError>| {
            result.err().unwrap().kind()
        };
        assert_eq!(kind(service.accept_upload("op", 0)), ErrorKind::NotAllowed);
        assert_eq!(
            kind(service.accept_upload("op", 1001)),
            ErrorKind::NotAllowed
        );
        assert_eq!(
            kind(service.accept_upload("other", 1000)),
            ErrorKind::NotFound
        );
        assert!(service.accept_upload("op", 1000).is_ok());
        assert_eq!(
            kind(service.accept_upload("op", 1000)),
            ErrorKind::InvalidState
        );
        // The slot lives as long as the stage.
        drop(stage);
        assert_eq!(kind(service.accept_upload("op", 1000)), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn the_stage_waits_for_its_upload_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry();
        let operation = registry.begin("vm.create", &vm()).unwrap();
        let service = WorkspaceService::new();
        let stage = service
            .create_stage(&spec(&dir.path().join("repo")), false, 1000)
            .unwrap()
            .bound(&operation.id);
        let mut watch = registry.subscribe(&operation.id, |_| None).unwrap();

        // The upload arrives before the stage runs, and waits.
        let (client, server) = tokio::io::duplex(1 << 20);
        let (server_reader, server_writer) = tokio::io::split(server);
        service
            .accept_upload(&operation.id, 1000)
            .unwrap()
            .send(Connection {
                reader: Box::new(server_reader),
                writer: Box::new(server_writer),
                total_bytes: Some(10_000),
            })
            .ok()
            .unwrap();
        let (mut client_reader, mut client_writer) = tokio::io::split(client);
        let big = vec![5_u8; 600_000];
        let tar = tar_of(&[("big.bin", &big)]);
        let uploader = tokio::spawn(async move {
            for chunk in tar.chunks(50_000) {
                stream::write_data(&mut client_writer, chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            stream::write_end(&mut client_writer, &UploadTrailer::default())
                .await
                .unwrap();
            stream::read_answer::<_, WorkspacePrepared>(&mut client_reader)
                .await
                .unwrap()
        });
        Box::new(stage)
            .run(&operation, &vm(), Box::pin(agent_ready()))
            .await
            .unwrap();
        let prepared = uploader.await.unwrap().unwrap();
        assert_eq!(prepared.entries, 1);
        assert!(prepared.bytes > 600_000);
        assert_eq!(std::fs::read(dir.path().join("repo/big.bin")).unwrap(), big);
        let live = watch.live.as_mut().unwrap();
        let mut statuses = Vec::new();
        while let Ok(frame) = live.try_recv() {
            if let banger_proto::StreamFrame::Stage(event) = frame {
                assert_eq!(event.stage, STAGE);
                statuses.push(event.status);
            }
        }
        assert_eq!(statuses.first(), Some(&StageStatus::Started));
        assert!(statuses.contains(&StageStatus::Progress), "{statuses:?}");
        assert_eq!(statuses.last(), Some(&StageStatus::Finished));
        // The slot is gone with the stage.
        assert!(service.accept_upload(&operation.id, 1000).is_err());
        operation.finish(OperationState::Succeeded, None, None);
    }

    impl WorkspaceStage {
        /// [`GuestStage::bind`], chained.
        fn bound(mut self, operation_id: &str) -> Self {
            self.bind(operation_id);
            self
        }
    }

    async fn agent_ready() -> DaemonResult<AgentClient> {
        Ok(agent().await)
    }

    #[tokio::test]
    async fn the_stage_gives_up_without_an_upload_and_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry();
        let service = WorkspaceService::with_timeouts(Duration::from_millis(200), IDLE_TIMEOUT);

        // Nobody uploads.
        let operation = registry.begin("vm.create", &vm()).unwrap();
        let stage = service
            .create_stage(&spec(&dir.path().join("a")), false, 1000)
            .unwrap()
            .bound(&operation.id);
        let error = Box::new(stage)
            .run(&operation, &vm(), Box::pin(agent_ready()))
            .await
            .unwrap_err();
        assert!(
            error.chain().contains("No workspace upload arrived"),
            "{error}"
        );
        let record = operation.snapshot();
        assert_eq!(record.stages.last().unwrap().status, StageStatus::Failed);

        // Cancelled while it waits.
        let service = WorkspaceService::new();
        let operation = registry.begin("vm.create", &vm()).unwrap();
        let stage = service
            .create_stage(&spec(&dir.path().join("b")), false, 1000)
            .unwrap()
            .bound(&operation.id);
        let cancel = {
            let id = operation.id.clone();
            let registry = &registry;
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                registry.cancel(&id).unwrap();
            }
        };
        let vm = vm();
        let (outcome, ()) = tokio::join!(
            Box::new(stage).run(&operation, &vm, Box::pin(agent_ready())),
            cancel
        );
        assert_eq!(outcome.unwrap_err().kind, ErrorKind::Cancelled);
    }
}
