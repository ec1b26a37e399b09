//! The JSON-RPC 2.0 server on the control socket.
//!
//! Per connection:
//! 1. Read the peer's credentials (`SO_PEERCRED`, `SO_PEERGROUPS`) once and
//!    decide once whether it is served ([`crate::access`]).
//! 2. Read one request per line (at most [`MAX_REQUEST_BYTES`]). Malformed
//!    JSON, a non-request, an unknown method or bad params each get a JSON-RPC
//!    error on that line and the connection goes on. Requests without an id
//!    are notifications and get no answer.
//! 3. An unauthorised peer gets a `not_allowed` error for its first request
//!    and the connection is closed.
//! 4. Every other request names a method type of `banger_proto::method`;
//!    [`handle`] decodes its params (`invalid_params` with serde's message)
//!    and encodes its result, so each arm of [`dispatch`] only calls a
//!    service. An unknown name is `method_not_found`.
//! 5. A streaming method (`Method::STREAMS`) owns the rest of the
//!    connection: `operation.watch` answers, then sends frames and closes
//!    after the terminal one; `vm.agent` answers with the guest agent's
//!    hello, then relays the agent protocol to the VM ([`crate::relay`]);
//!    `vm.workspace.*` answer, then carry a workspace upload or export
//!    stream ([`crate::workspace`]); `vm.logs` answers, then sends the
//!    console log as workspace-style `Data` frames (following it while the
//!    VMM runs, when asked) and an `End` frame.
//!
//! [`serve`] takes its listener and shutdown signal from outside, so tests run
//! it on a temporary socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use banger_proto::method::{self, Method, NoParams};
use banger_proto::{
    DaemonStatus, ErrorKind, Request, Response, RpcError, StreamFrame, StreamStarted, VmState,
};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};

use crate::access::{AccessPolicy, Peer};
use crate::error::{DaemonError, DaemonResult};
use crate::images::ImageService;
use crate::operations::OperationRegistry;
use crate::vms::VmService;

/// Longest request line accepted; longer ones are refused and the
/// connection is closed.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Everything the RPC layer dispatches to; built in the composition root.
pub struct Daemon {
    pub config: Arc<crate::config::Config>,
    pub paths: crate::paths::StatePaths,
    pub vms: Arc<VmService>,
    pub images: ImageService,
    pub catalog: Arc<crate::catalog::CatalogService>,
    pub operations: Arc<OperationRegistry>,
    /// The host network; `None` when `[network] enabled = false`.
    pub network: Option<Arc<crate::network::Network>>,
    pub disks: Arc<crate::disks::WorkDisks>,
    /// Workspace prepare/export and the create's `workspace` stage.
    pub workspace: Arc<crate::workspace::WorkspaceService>,
    pub access: AccessPolicy,
    pub info: DaemonInfo,
}

/// Static facts `daemon.status` reports.
pub struct DaemonInfo {
    pub socket: String,
    pub state_dir: String,
    pub config: String,
    pub started: Instant,
    /// Why the clone strategy was chosen.
    pub clone_reason: String,
}

/// Serves connections from `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
    daemon: Arc<Daemon>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = Arc::clone(&daemon);
                    tokio::spawn(async move {
                        if let Err(error) = handle_connection(stream, daemon).await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
}

async fn handle_connection(stream: UnixStream, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let peer = {
        use std::os::fd::AsFd;
        Peer::of_socket(stream.as_fd())?
    };
    let allowed = daemon.access.allows(&peer);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST_BYTES {
            let error = RpcError::new(
                ErrorKind::InvalidRequest,
                format!("Request is longer than {MAX_REQUEST_BYTES} bytes"),
            );
            return send(&mut write, &Response::failure(Value::Null, error)).await;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = match parse_request(&line) {
            Ok(request) => request,
            Err((id, error)) => {
                send(&mut write, &Response::failure(id, error)).await?;
                if !allowed {
                    return Ok(());
                }
                continue;
            }
        };
        let id = request.id.clone();
        if !allowed {
            tracing::warn!(uid = peer.uid, method = %request.method, "refused unauthorised peer");
            let error = RpcError::new(
                ErrorKind::NotAllowed,
                format!(
                    "User {} is not allowed to use banger: only root and members of group `{}` are",
                    peer.uid, daemon.access.group_name
                ),
            )
            .with_hint(format!(
                "ask an administrator to run `usermod -aG {} $USER`, then log in again",
                daemon.access.group_name
            ));
            return send(
                &mut write,
                &Response::failure(id.unwrap_or(Value::Null), error),
            )
            .await;
        }
        if method::is_streaming(&request.method) {
            let id = id.unwrap_or(Value::Null);
            return serve_stream(
                &daemon,
                peer,
                &request.method,
                request.params,
                id,
                reader,
                write,
            )
            .await;
        }
        let outcome = dispatch(&daemon, peer.clone(), &request.method, request.params).await;
        if let Some(id) = id {
            let response = match outcome {
                Ok(result) => Response::success(id, result),
                Err(error) => Response::failure(id, error.to_rpc()),
            };
            send(&mut write, &response).await?;
        }
    }
}

/// Parses a request line; on failure returns the id to answer with (when the
/// line was JSON with one) and the error.
fn parse_request(line: &[u8]) -> Result<Request, (Value, RpcError)> {
    let value: Value = serde_json::from_slice(line).map_err(|error| {
        (
            Value::Null,
            RpcError::new(ErrorKind::ParseError, format!("Invalid JSON: {error}")),
        )
    })?;
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let request: Request = serde_json::from_value(value).map_err(|error| {
        (
            id.clone(),
            RpcError::new(
                ErrorKind::InvalidRequest,
                format!("Not a JSON-RPC request: {error}"),
            ),
        )
    })?;
    if request.jsonrpc != "2.0" {
        return Err((
            id,
            RpcError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "Unsupported jsonrpc version {:?}; use \"2.0\"",
                    request.jsonrpc
                ),
            ),
        ));
    }
    Ok(request)
}

async fn send(write: &mut OwnedWriteHalf, message: &impl Serialize) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

/// Decodes a request's params as `M`'s; absent or `null` params decode as
/// `{}`, so methods whose params are all optional need none.
fn params<M: Method>(raw: Option<Value>) -> DaemonResult<M::Params> {
    let value = match raw {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(value) => value,
    };
    serde_json::from_value(value).map_err(|error| {
        DaemonError::invalid_params(format!("Invalid params: {error}")).with_hint(VERSION_HINT)
    })
}

/// For a request this daemon cannot read: a client of another version.
const VERSION_HINT: &str =
    "the client and the daemon may be different versions: compare `banger --version` with `banger daemon status`, and restart bangerd after an upgrade";

fn encode<M: Method>(result: &M::Result) -> DaemonResult<Value> {
    serde_json::to_value(result)
        .map_err(|error| DaemonError::failed("Failed to encode the result", error))
}

/// Runs method `M`: decodes its params, awaits `handler` on them and
/// encodes the result.
async fn handle<M: Method, F, E>(
    raw: Option<Value>,
    handler: impl FnOnce(M::Params) -> F,
) -> DaemonResult<Value>
where
    F: Future<Output = Result<M::Result, E>>,
    DaemonError: From<E>,
{
    let result = handler(params::<M>(raw)?).await?;
    encode::<M>(&result)
}

/// The network and the VM `reference` names, for the methods on published
/// ports and egress.
fn network_and_vm<'a>(
    daemon: &'a Daemon,
    reference: &str,
) -> DaemonResult<(&'a crate::network::Network, banger_proto::Vm)> {
    let network = daemon
        .network
        .as_deref()
        .ok_or(crate::network::NetworkError::Disabled)?;
    let vm = daemon.vms.find(reference)?;
    if vm.network.is_none() {
        return Err(crate::network::NetworkError::NoLease { vm: vm.name }.into());
    }
    Ok((network, vm))
}

async fn dispatch(
    daemon: &Daemon,
    peer: Peer,
    method_name: &str,
    raw: Option<Value>,
) -> DaemonResult<Value> {
    use banger_proto::method::{
        DaemonDoctor, DiskCreate, DiskList, DiskRemove, DiskResize, ImageImport, ImageList,
        ImagePull, ImageRemove, ImageShow, KernelImport, KernelList, KernelPull, KernelRemove,
        KernelShow, OperationCancel, OperationList, OperationStatus, VmCreate, VmDelete, VmList,
        VmRestart, VmSet, VmShow, VmStart, VmStats, VmStop,
    };
    let vms = &daemon.vms;
    match method_name {
        method::DaemonStatus::NAME => {
            handle::<method::DaemonStatus, _, _>(raw, |NoParams| async { status(daemon) }).await
        }
        DaemonDoctor::NAME => {
            handle::<DaemonDoctor, _, _>(raw, |NoParams| async {
                let doctor = crate::doctor::Doctor {
                    backends: vms.backends(),
                    clone_reason: &daemon.info.clone_reason,
                    config: &daemon.config,
                    paths: &daemon.paths,
                    images: &daemon.images,
                    access: &daemon.access,
                    network: daemon.network.as_deref(),
                    catalog: &daemon.catalog,
                };
                Ok::<_, DaemonError>(doctor.run().await)
            })
            .await
        }
        VmCreate::NAME => {
            handle::<VmCreate, _, _>(raw, |create| async move {
                // The create's `workspace` stage, for this caller.
                let workspace: Option<Box<dyn crate::vms::GuestStage>> = match &create.workspace {
                    Some(spec) => Some(Box::new(daemon.workspace.create_stage(
                        spec,
                        create.no_start,
                        peer.uid,
                    )?)),
                    None => None,
                };
                vms.create(create, workspace)
                    .await
                    .map_err(DaemonError::from)
            })
            .await
        }
        VmList::NAME => handle::<VmList, _, _>(raw, |NoParams| async { vms.list() }).await,
        VmShow::NAME => handle::<VmShow, _, _>(raw, |show| async move { vms.find(&show.vm) }).await,
        VmStart::NAME => {
            handle::<VmStart, _, _>(raw, |start| async move { vms.start(&start.vm).await }).await
        }
        VmStop::NAME => {
            handle::<VmStop, _, _>(
                raw,
                |stop| async move { vms.stop(&stop.vm, stop.force).await },
            )
            .await
        }
        VmRestart::NAME => {
            handle::<VmRestart, _, _>(raw, |restart| async move { vms.restart(&restart.vm).await })
                .await
        }
        VmDelete::NAME => {
            handle::<VmDelete, _, _>(raw, |delete| async move {
                vms.delete(&delete.vm, delete.force, delete.keep_work_disk)
                    .await
            })
            .await
        }
        VmSet::NAME => handle::<VmSet, _, _>(raw, |set| vms.set(set)).await,
        method::VmPortAdd::NAME => {
            handle::<method::VmPortAdd, _, _>(raw, |add| async move {
                let (network, vm) = network_and_vm(daemon, &add.vm)?;
                let _guard = vms.lock_vm(&vm.id).await;
                Ok::<_, DaemonError>(network.add_port(&vm.id, add.port).await?)
            })
            .await
        }
        method::VmPortRemove::NAME => {
            handle::<method::VmPortRemove, _, _>(raw, |remove| async move {
                let (network, vm) = network_and_vm(daemon, &remove.vm)?;
                let _guard = vms.lock_vm(&vm.id).await;
                Ok::<_, DaemonError>(network.remove_port(&vm.id, remove.port).await?)
            })
            .await
        }
        method::VmPortList::NAME => {
            handle::<method::VmPortList, _, _>(raw, |list| async move {
                let (network, vm) = network_and_vm(daemon, &list.vm)?;
                Ok::<_, DaemonError>(network.ports_of(&vm.id)?)
            })
            .await
        }
        method::VmEgressSet::NAME => {
            handle::<method::VmEgressSet, _, _>(raw, |set| async move {
                let (network, vm) = network_and_vm(daemon, &set.vm)?;
                let _guard = vms.lock_vm(&vm.id).await;
                network.set_egress(&vm.id, &set.egress).await?;
                Ok::<_, DaemonError>(vms.find(&vm.id)?)
            })
            .await
        }
        VmStats::NAME => {
            handle::<VmStats, _, _>(raw, |stats| async move { vms.stats(&stats.vm).await }).await
        }
        DiskCreate::NAME => {
            handle::<DiskCreate, _, _>(raw, |create| async move {
                daemon.disks.create(&create.name, &create.size).await
            })
            .await
        }
        DiskList::NAME => {
            handle::<DiskList, _, _>(raw, |NoParams| async { daemon.disks.list() }).await
        }
        DiskRemove::NAME => {
            handle::<DiskRemove, _, _>(
                raw,
                |remove| async move { daemon.disks.remove(&remove.name) },
            )
            .await
        }
        DiskResize::NAME => {
            handle::<DiskResize, _, _>(raw, |resize| async move {
                // The lock of the VM the disk is attached to: that VM cannot
                // start while the disk's file is lengthened.
                let attached_to = daemon.disks.find(&resize.name)?.vm_id;
                let _guard = match &attached_to {
                    Some(vm_id) => Some(vms.lock_vm(vm_id).await),
                    None => None,
                };
                daemon.disks.resize(&resize.name, &resize.size).await
            })
            .await
        }
        ImageImport::NAME => {
            handle::<ImageImport, _, _>(raw, |import| {
                daemon
                    .images
                    .start_image_import(peer, import, &daemon.operations)
            })
            .await
        }
        ImagePull::NAME => {
            handle::<ImagePull, _, _>(raw, |pull| {
                daemon
                    .catalog
                    .start_pull(crate::catalog::PullKind::Image, pull)
            })
            .await
        }
        KernelPull::NAME => {
            handle::<KernelPull, _, _>(raw, |pull| {
                daemon
                    .catalog
                    .start_pull(crate::catalog::PullKind::Kernel, pull)
            })
            .await
        }
        ImageList::NAME => {
            handle::<ImageList, _, _>(raw, |NoParams| async { daemon.images.list_images() }).await
        }
        ImageShow::NAME => {
            handle::<ImageShow, _, _>(raw, |show| async move { daemon.images.image(&show.name) })
                .await
        }
        ImageRemove::NAME => {
            handle::<ImageRemove, _, _>(raw, |remove| async move {
                let image = daemon.images.remove_image(&remove.name)?;
                let pool = daemon.vms.warm_pool();
                pool.forget_image(std::path::Path::new(&image.path));
                pool.refill();
                Ok::<_, crate::images::ImageError>(image)
            })
            .await
        }
        KernelImport::NAME => {
            handle::<KernelImport, _, _>(raw, |import| {
                daemon
                    .images
                    .start_kernel_import(peer, import, &daemon.operations)
            })
            .await
        }
        KernelList::NAME => {
            handle::<KernelList, _, _>(raw, |NoParams| async { daemon.images.list_kernels() }).await
        }
        KernelShow::NAME => {
            handle::<KernelShow, _, _>(raw, |show| async move { daemon.images.kernel(&show.name) })
                .await
        }
        KernelRemove::NAME => {
            handle::<KernelRemove, _, _>(raw, |remove| async move {
                daemon.images.remove_kernel(&remove.name)
            })
            .await
        }
        OperationList::NAME => {
            handle::<OperationList, _, _>(raw, |filter| async move {
                let mut operations = daemon.operations.list()?;
                if filter.running {
                    operations.retain(|operation| !operation.state.is_terminal());
                }
                Ok::<_, DaemonError>(operations)
            })
            .await
        }
        OperationStatus::NAME => {
            handle::<OperationStatus, _, _>(raw, |reference| async move {
                daemon.operations.status(&reference.id)
            })
            .await
        }
        OperationCancel::NAME => {
            handle::<OperationCancel, _, _>(raw, |reference| async move {
                daemon.operations.cancel(&reference.id)
            })
            .await
        }
        other => snapshot_dispatch(daemon, other, raw).await,
    }
}

/// Pause, resume and snapshots.
async fn snapshot_dispatch(
    daemon: &Daemon,
    method_name: &str,
    raw: Option<Value>,
) -> DaemonResult<Value> {
    use banger_proto::method::{
        SnapshotList, SnapshotRemove, SnapshotShow, VmPause, VmResume, VmSnapshot,
    };
    let vms = &daemon.vms;
    match method_name {
        VmPause::NAME => {
            handle::<VmPause, _, _>(raw, |vm| async move { vms.pause(&vm.vm).await }).await
        }
        VmResume::NAME => {
            handle::<VmResume, _, _>(raw, |vm| async move { vms.resume(&vm.vm).await }).await
        }
        VmSnapshot::NAME => {
            handle::<VmSnapshot, _, _>(raw, |params| async move { vms.snapshot(&params).await })
                .await
        }
        SnapshotList::NAME => {
            handle::<SnapshotList, _, _>(raw, |NoParams| async { vms.snapshots() }).await
        }
        SnapshotShow::NAME => {
            handle::<SnapshotShow, _, _>(raw, |reference| async move {
                vms.find_snapshot(&reference.name)
            })
            .await
        }
        SnapshotRemove::NAME => {
            handle::<SnapshotRemove, _, _>(raw, |reference| async move {
                vms.remove_snapshot(&reference.name).await
            })
            .await
        }
        other => Err(DaemonError::new(
            ErrorKind::MethodNotFound,
            format!("Unknown method `{other}`"),
        )
        .with_hint(VERSION_HINT)),
    }
}

fn status(daemon: &Daemon) -> DaemonResult<DaemonStatus> {
    let mut vms: std::collections::BTreeMap<String, u64> = VmState::ALL
        .iter()
        .map(|state| (state.as_str().to_owned(), 0))
        .collect();
    for vm in daemon.vms.list()? {
        *vms.entry(vm.state.as_str().to_owned()).or_default() += 1;
    }
    Ok(DaemonStatus {
        version: banger_proto::VERSION.to_owned(),
        pid: std::process::id(),
        uptime_seconds: daemon.info.started.elapsed().as_secs(),
        socket: daemon.info.socket.clone(),
        state_dir: daemon.info.state_dir.clone(),
        config: daemon.info.config.clone(),
        backend: format!(
            "{} ({})",
            daemon.vms.backends().default,
            daemon.vms.backends().reason
        ),
        clone_strategy: daemon.info.clone_reason.clone(),
        vms,
        network: daemon
            .network
            .as_ref()
            .map(|network| network.status())
            .transpose()?,
    })
}

/// Serves a streaming method (`Method::STREAMS`), which owns the rest of
/// the connection. `reader` may hold bytes buffered past the request line.
async fn serve_stream(
    daemon: &Daemon,
    peer: Peer,
    method_name: &str,
    raw: Option<Value>,
    id: Value,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: OwnedWriteHalf,
) -> std::io::Result<()> {
    match method_name {
        method::OperationWatch::NAME => watch(daemon, raw, id, write).await,
        method::VmLogs::NAME => logs(daemon, raw, id, reader, write).await,
        method::VmAgent::NAME => {
            let agent = match params::<method::VmAgent>(raw) {
                Ok(reference) => daemon.vms.agent(&reference.vm).await,
                Err(error) => Err(error),
            };
            match agent.and_then(|(_, client)| {
                let hello = encode::<method::VmAgent>(client.hello())?;
                Ok((client, hello))
            }) {
                Ok((client, hello)) => {
                    send(&mut write, &Response::success(id, hello)).await?;
                    // Bytes the reader buffered past the request line are the first frames.
                    crate::relay::relay(client, reader, write).await;
                    Ok(())
                }
                Err(error) => send(&mut write, &Response::failure(id, error.to_rpc())).await,
            }
        }
        method::VmWorkspacePrepare::NAME
        | method::VmWorkspaceUpload::NAME
        | method::VmWorkspaceExport::NAME => match crate::workspace::Call::parse(method_name) {
            Some(call) => {
                daemon
                    .workspace
                    .serve(call, daemon.vms.as_ref(), peer, raw, id, reader, write)
                    .await
            }
            None => {
                let error = DaemonError::new(
                    ErrorKind::Internal,
                    format!("Streaming method `{method_name}` has no handler"),
                );
                send(&mut write, &Response::failure(id, error.to_rpc())).await
            }
        },
        other => {
            let error = DaemonError::new(
                ErrorKind::Internal,
                format!("Streaming method `{other}` has no handler"),
            );
            send(&mut write, &Response::failure(id, error.to_rpc())).await
        }
    }
}

async fn watch(
    daemon: &Daemon,
    raw: Option<Value>,
    id: Value,
    mut write: OwnedWriteHalf,
) -> std::io::Result<()> {
    let subscription = params::<method::OperationWatch>(raw).and_then(|reference| {
        daemon
            .operations
            .subscribe(&reference.id, |vm_id| daemon.vms.get(vm_id))
    });
    let subscription = match subscription {
        Ok(subscription) => subscription,
        Err(error) => return send(&mut write, &Response::failure(id, error.to_rpc())).await,
    };
    let started = StreamStarted { streaming: true };
    match encode::<method::OperationWatch>(&started) {
        Ok(started) => send(&mut write, &Response::success(id, started)).await?,
        Err(error) => return send(&mut write, &Response::failure(id, error.to_rpc())).await,
    }
    for frame in &subscription.history {
        send(&mut write, frame).await?;
        if matches!(frame, StreamFrame::Done { .. }) {
            return Ok(());
        }
    }
    let Some(mut live) = subscription.live else {
        return Ok(());
    };
    loop {
        match live.recv().await {
            Ok(frame) => {
                let done = matches!(frame, StreamFrame::Done { .. });
                send(&mut write, &frame).await?;
                if done {
                    return Ok(());
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                tracing::warn!(skipped, "watcher lagged behind its operation");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// `vm.logs`: what the console log holds (its last `tail` lines), then,
/// with `follow` and a running VMM, what the guest appends until the VMM
/// exits or the client hangs up.
async fn logs(
    daemon: &Daemon,
    raw: Option<Value>,
    id: Value,
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: OwnedWriteHalf,
) -> std::io::Result<()> {
    use banger_workspace::stream::{write_data, write_end, write_error};
    let opened = params::<method::VmLogs>(raw).and_then(|params| {
        daemon
            .vms
            .console_log(&params.vm, params.follow)
            .map(|opened| (params, opened))
            .map_err(DaemonError::from)
    });
    let (params, (vm, mut follower, existing, handle)) = match opened {
        Ok(opened) => opened,
        Err(error) => return send(&mut write, &Response::failure(id, error.to_rpc())).await,
    };
    let started = banger_proto::vm::LogsStarted {
        vm: vm.name.clone(),
        following: handle.is_some(),
    };
    match encode::<method::VmLogs>(&started) {
        Ok(started) => send(&mut write, &Response::success(id, started)).await?,
        Err(error) => return send(&mut write, &Response::failure(id, error.to_rpc())).await,
    }
    let first = crate::vms::console::last_lines(&existing, params.tail);
    write_data(&mut write, first).await?;
    let mut sent = first.len() as u64;
    if let Some(handle) = handle {
        let exited = handle.wait_exit();
        tokio::pin!(exited);
        // The client sends nothing more; a read returning means it left.
        let mut ignored = [0_u8; 512];
        loop {
            let vmm_running = tokio::select! {
                () = follower.changed() => true,
                _ = &mut exited => false,
                read = reader.read(&mut ignored) => match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
            };
            let read = follower.read_new();
            match read {
                Ok(bytes) => {
                    write_data(&mut write, &bytes).await?;
                    sent += bytes.len() as u64;
                }
                Err(error) => {
                    let error = DaemonError::failed("Could not read the console log", error);
                    return write_error(&mut write, &error.to_rpc()).await;
                }
            }
            if !vmm_running {
                break;
            }
        }
    }
    write_end(&mut write, &banger_proto::vm::LogsEnded { bytes: sent }).await
}
