//! The JSON-RPC 2.0 server on the control socket.
//!
//! Per connection:
//! 1. Read the peer's credentials (`SO_PEERCRED`) and decide once whether it
//!    is served ([`crate::access`]).
//! 2. Read one request per line (at most [`MAX_REQUEST_BYTES`]). Malformed
//!    JSON, a non-request, an unknown method or bad params each get a JSON-RPC
//!    error on that line and the connection goes on. Requests without an id
//!    are notifications and get no answer.
//! 3. An unauthorised peer gets a `not_allowed` error for its first request
//!    and the connection is closed.
//! 4. `operation.watch` answers, then turns the connection into a stream of
//!    frames and closes it after the terminal frame.
//! 5. `vm.agent` answers with the guest agent's hello, then the connection
//!    carries the agent protocol, relayed to the VM ([`crate::relay`]).
//! 6. `vm.workspace.*` answer, then the connection carries a workspace
//!    upload or export stream ([`crate::workspace`]).
//!
//! [`serve`] takes its listener and shutdown signal from outside, so tests run
//! it on a temporary socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use banger_proto::method;
use banger_proto::{
    CreateDiskParams, CreateVmParams, DaemonStatus, DeleteVmParams, ErrorKind, ImportImageParams,
    ImportKernelParams, OperationParams, OperationRef, RemoveParams, Request, ResizeDiskParams,
    Response, RpcError, SetVmParams, StopVmParams, StreamFrame, VmRef, VmState,
};
use serde::de::DeserializeOwned;
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
    let credentials = stream.peer_cred()?;
    let peer = Peer {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid: credentials.pid(),
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
        if request.method == method::OPERATION_WATCH {
            return watch(&daemon, request.params, id.unwrap_or(Value::Null), write).await;
        }
        if request.method == method::VM_AGENT {
            let id = id.unwrap_or(Value::Null);
            let agent = match params::<VmRef>(request.params) {
                Ok(reference) => daemon.vms.agent(&reference.vm).await,
                Err(error) => Err(error),
            };
            return match agent {
                Ok((_, client)) => {
                    send(
                        &mut write,
                        &Response::success(
                            id,
                            serde_json::to_value(client.hello()).unwrap_or(Value::Null),
                        ),
                    )
                    .await?;
                    // Bytes the reader buffered past the request line are the first frames.
                    crate::relay::relay(client, reader, write).await;
                    Ok(())
                }
                Err(error) => send(&mut write, &Response::failure(id, error.to_rpc())).await,
            };
        }
        // ---- workspace service: `vm.workspace.*` stream on the connection ----
        if let Some(call) = crate::workspace::Call::parse(&request.method) {
            let id = id.unwrap_or(Value::Null);
            return daemon
                .workspace
                .serve(
                    call,
                    daemon.vms.as_ref(),
                    peer,
                    request.params,
                    id,
                    reader,
                    write,
                )
                .await;
        }
        // ---- end workspace service ----
        let outcome = dispatch(&daemon, peer, &request.method, request.params).await;
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

fn params<T: DeserializeOwned>(params: Option<Value>) -> DaemonResult<T> {
    let value = match params {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(value) => value,
    };
    serde_json::from_value(value)
        .map_err(|error| DaemonError::invalid_params(format!("Invalid params: {error}")))
}

fn no_params(params: Option<Value>) -> DaemonResult<()> {
    match params {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(map)) if map.is_empty() => Ok(()),
        Some(Value::Array(list)) if list.is_empty() => Ok(()),
        Some(other) => Err(DaemonError::invalid_params(format!(
            "Invalid params: this method takes none, got {other}"
        ))),
    }
}

fn to_value(value: impl Serialize) -> DaemonResult<Value> {
    serde_json::to_value(value)
        .map_err(|error| DaemonError::failed("Failed to encode the result", error))
}

async fn dispatch(
    daemon: &Daemon,
    peer: Peer,
    method_name: &str,
    raw: Option<Value>,
) -> DaemonResult<Value> {
    match method_name {
        method::DAEMON_STATUS => {
            no_params(raw)?;
            to_value(status(daemon)?)
        }
        method::DAEMON_DOCTOR => {
            no_params(raw)?;
            let doctor = crate::doctor::Doctor {
                backends: daemon.vms.backends(),
                clone_reason: &daemon.info.clone_reason,
                config: &daemon.config,
                paths: &daemon.paths,
                images: &daemon.images,
                access: &daemon.access,
                network: daemon.network.as_deref(),
                catalog: &daemon.catalog,
            };
            to_value(doctor.run().await)
        }
        method::VM_CREATE => {
            let create: CreateVmParams = params(raw)?;
            // ---- workspace service: the create's `workspace` stage, for this caller ----
            let workspace: Option<Box<dyn crate::vms::GuestStage>> = match &create.workspace {
                Some(spec) => Some(Box::new(daemon.workspace.create_stage(
                    spec,
                    create.no_start,
                    peer.uid,
                )?)),
                None => None,
            };
            // ---- end workspace service ----
            to_value(daemon.vms.create(create, workspace).await?)
        }
        method::VM_LIST => {
            no_params(raw)?;
            to_value(daemon.vms.list()?)
        }
        method::VM_SHOW => to_value(daemon.vms.find(&params::<VmRef>(raw)?.vm)?),
        method::VM_START => to_value(daemon.vms.start(&params::<VmRef>(raw)?.vm).await?),
        method::VM_STOP => {
            let stop: StopVmParams = params(raw)?;
            to_value(daemon.vms.stop(&stop.vm, stop.force).await?)
        }
        method::VM_RESTART => to_value(daemon.vms.restart(&params::<VmRef>(raw)?.vm).await?),
        method::VM_DELETE => {
            let delete: DeleteVmParams = params(raw)?;
            to_value(
                daemon
                    .vms
                    .delete(&delete.vm, delete.force, delete.keep_work_disk)
                    .await?,
            )
        }
        method::VM_SET => to_value(daemon.vms.set(params::<SetVmParams>(raw)?).await?),
        method::VM_STATS => to_value(daemon.vms.stats(&params::<VmRef>(raw)?.vm).await?),
        method::DISK_CREATE => {
            let create: CreateDiskParams = params(raw)?;
            to_value(daemon.disks.create(&create.name, &create.size).await?)
        }
        method::DISK_LIST => {
            no_params(raw)?;
            to_value(daemon.disks.list()?)
        }
        method::DISK_REMOVE => to_value(daemon.disks.remove(&params::<RemoveParams>(raw)?.name)?),
        method::DISK_RESIZE => {
            let resize: ResizeDiskParams = params(raw)?;
            // The lock of the VM the disk is attached to: that VM cannot
            // start while `resize2fs` runs.
            let attached_to = daemon.disks.find(&resize.name)?.vm_id;
            let _guard = match &attached_to {
                Some(vm_id) => Some(daemon.vms.lock_vm(vm_id).await),
                None => None,
            };
            to_value(daemon.disks.resize(&resize.name, &resize.size).await?)
        }
        method::IMAGE_IMPORT => to_value(
            daemon
                .images
                .import_image(peer, params::<ImportImageParams>(raw)?)
                .await?,
        ),
        method::IMAGE_PULL => to_value(
            daemon
                .catalog
                .start_pull(crate::catalog::PullKind::Image, params(raw)?)
                .await?,
        ),
        method::KERNEL_PULL => to_value(
            daemon
                .catalog
                .start_pull(crate::catalog::PullKind::Kernel, params(raw)?)
                .await?,
        ),
        method::IMAGE_LIST => {
            no_params(raw)?;
            to_value(daemon.images.list_images()?)
        }
        method::IMAGE_SHOW => to_value(daemon.images.image(&params::<RemoveParams>(raw)?.name)?),
        method::IMAGE_REMOVE => to_value(
            daemon
                .images
                .remove_image(&params::<RemoveParams>(raw)?.name)?,
        ),
        method::KERNEL_IMPORT => to_value(
            daemon
                .images
                .import_kernel(peer, params::<ImportKernelParams>(raw)?)
                .await?,
        ),
        method::KERNEL_LIST => {
            no_params(raw)?;
            to_value(daemon.images.list_kernels()?)
        }
        method::KERNEL_SHOW => to_value(daemon.images.kernel(&params::<RemoveParams>(raw)?.name)?),
        method::KERNEL_REMOVE => to_value(
            daemon
                .images
                .remove_kernel(&params::<RemoveParams>(raw)?.name)?,
        ),
        method::OPERATION_LIST => {
            let filter: OperationParams = params(raw)?;
            let mut operations = daemon.operations.list()?;
            if filter.running {
                operations.retain(|operation| !operation.state.is_terminal());
            }
            to_value(operations)
        }
        method::OPERATION_STATUS => {
            to_value(daemon.operations.status(&params::<OperationRef>(raw)?.id)?)
        }
        method::OPERATION_CANCEL => {
            to_value(daemon.operations.cancel(&params::<OperationRef>(raw)?.id)?)
        }
        other => Err(DaemonError::new(
            ErrorKind::MethodNotFound,
            format!("Unknown method `{other}`"),
        )),
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

async fn watch(
    daemon: &Daemon,
    raw: Option<Value>,
    id: Value,
    mut write: OwnedWriteHalf,
) -> std::io::Result<()> {
    let subscription = params::<OperationRef>(raw).and_then(|reference| {
        daemon
            .operations
            .subscribe(&reference.id, |vm_id| daemon.vms.get(vm_id))
    });
    let subscription = match subscription {
        Ok(subscription) => subscription,
        Err(error) => return send(&mut write, &Response::failure(id, error.to_rpc())).await,
    };
    send(
        &mut write,
        &Response::success(id, serde_json::json!({ "streaming": true })),
    )
    .await?;
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
