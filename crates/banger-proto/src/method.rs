//! The methods of the control protocol, one type each.
//!
//! A method is a unit struct implementing [`Method`]: its JSON-RPC name, the
//! type of its params, the type of its result, and whether it streams. The
//! daemon decodes params and encodes results through these types and the
//! CLI calls `client.call::<method::VmList>(NoParams)`, so both sides agree
//! on the shapes by construction.
//!
//! A new method is a struct here, an `impl Method`, an entry in [`ALL`] and
//! an arm in the daemon's dispatch.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::agent::HelloInfo;
use crate::image::{OperationStarted, PullParams};
use crate::operation::StreamStarted;
use crate::status::DoctorReport;
use crate::{
    CreateDiskParams, CreateVmParams, CreateVmResult, DeleteVmParams, Image, ImportImageParams,
    ImportKernelParams, Kernel, Operation, OperationParams, OperationRef, RemoveParams,
    ResizeDiskParams, SetVmParams, Snapshot, SnapshotRef, SnapshotVmParams, StopVmParams, Vm,
    VmRef, WorkDisk,
};

/// A method of the control protocol.
pub trait Method {
    /// The JSON-RPC method name.
    const NAME: &'static str;
    type Params: Serialize + DeserializeOwned;
    type Result: Serialize + DeserializeOwned;
    /// Whether a successful call turns the connection into a stream.
    const STREAMS: bool = false;
}

/// The params of a method that takes none. Absent params, `null`, `{}` and
/// `[]` are accepted; anything else is refused. Sent as `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoParams;

impl Serialize for NoParams {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        serializer.serialize_map(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for NoParams {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Null => Ok(Self),
            Value::Object(map) if map.is_empty() => Ok(Self),
            Value::Array(list) if list.is_empty() => Ok(Self),
            other => Err(serde::de::Error::custom(format!(
                "this method takes none, got {other}"
            ))),
        }
    }
}

/// What [`ALL`] lists about each method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    pub name: &'static str,
    pub streams: bool,
}

impl MethodInfo {
    pub const fn of<M: Method>() -> Self {
        Self {
            name: M::NAME,
            streams: M::STREAMS,
        }
    }
}

/// Every method of the protocol.
pub const ALL: &[MethodInfo] = &[
    MethodInfo::of::<DaemonStatus>(),
    MethodInfo::of::<DaemonDoctor>(),
    MethodInfo::of::<VmCreate>(),
    MethodInfo::of::<VmList>(),
    MethodInfo::of::<VmShow>(),
    MethodInfo::of::<VmStart>(),
    MethodInfo::of::<VmStop>(),
    MethodInfo::of::<VmRestart>(),
    MethodInfo::of::<VmDelete>(),
    MethodInfo::of::<VmSet>(),
    MethodInfo::of::<VmPortAdd>(),
    MethodInfo::of::<VmPortRemove>(),
    MethodInfo::of::<VmPortList>(),
    MethodInfo::of::<VmEgressSet>(),
    MethodInfo::of::<VmAgent>(),
    MethodInfo::of::<VmStats>(),
    MethodInfo::of::<VmLogs>(),
    MethodInfo::of::<VmWorkspacePrepare>(),
    MethodInfo::of::<VmWorkspaceUpload>(),
    MethodInfo::of::<VmWorkspaceExport>(),
    MethodInfo::of::<DiskCreate>(),
    MethodInfo::of::<DiskList>(),
    MethodInfo::of::<DiskRemove>(),
    MethodInfo::of::<DiskResize>(),
    MethodInfo::of::<ImageImport>(),
    MethodInfo::of::<ImageList>(),
    MethodInfo::of::<ImagePull>(),
    MethodInfo::of::<ImageShow>(),
    MethodInfo::of::<ImageRemove>(),
    MethodInfo::of::<KernelImport>(),
    MethodInfo::of::<KernelList>(),
    MethodInfo::of::<KernelPull>(),
    MethodInfo::of::<KernelShow>(),
    MethodInfo::of::<KernelRemove>(),
    MethodInfo::of::<OperationList>(),
    MethodInfo::of::<OperationStatus>(),
    MethodInfo::of::<OperationCancel>(),
    MethodInfo::of::<OperationWatch>(),
    MethodInfo::of::<VmPause>(),
    MethodInfo::of::<VmResume>(),
    MethodInfo::of::<VmSnapshot>(),
    MethodInfo::of::<SnapshotList>(),
    MethodInfo::of::<SnapshotShow>(),
    MethodInfo::of::<SnapshotRemove>(),
];

/// Whether a successful call of the method named `name` turns the
/// connection into a stream.
pub fn is_streaming(name: &str) -> bool {
    ALL.iter()
        .any(|method| method.name == name && method.streams)
}

// ---- daemon ----

/// Version, uptime, paths, backend and VM counts.
pub struct DaemonStatus;
impl Method for DaemonStatus {
    const NAME: &'static str = "daemon.status";
    type Params = NoParams;
    type Result = crate::status::DaemonStatus;
}

/// Checks the host and configuration.
pub struct DaemonDoctor;
impl Method for DaemonDoctor {
    const NAME: &'static str = "daemon.doctor";
    type Params = NoParams;
    type Result = DoctorReport;
}

// ---- vm ----

/// Starts the create operation of a VM; watch it with [`OperationWatch`].
pub struct VmCreate;
impl Method for VmCreate {
    const NAME: &'static str = "vm.create";
    type Params = CreateVmParams;
    type Result = CreateVmResult;
}

pub struct VmList;
impl Method for VmList {
    const NAME: &'static str = "vm.list";
    type Params = NoParams;
    type Result = Vec<Vm>;
}

pub struct VmShow;
impl Method for VmShow {
    const NAME: &'static str = "vm.show";
    type Params = VmRef;
    type Result = Vm;
}

pub struct VmStart;
impl Method for VmStart {
    const NAME: &'static str = "vm.start";
    type Params = VmRef;
    type Result = Vm;
}

pub struct VmStop;
impl Method for VmStop {
    const NAME: &'static str = "vm.stop";
    type Params = StopVmParams;
    type Result = Vm;
}

pub struct VmRestart;
impl Method for VmRestart {
    const NAME: &'static str = "vm.restart";
    type Params = VmRef;
    type Result = Vm;
}

/// Returns the VM as it was before it was deleted.
pub struct VmDelete;
impl Method for VmDelete {
    const NAME: &'static str = "vm.delete";
    type Params = DeleteVmParams;
    type Result = Vm;
}

/// Changes a stopped VM's vCPUs, memory or root disk size.
pub struct VmSet;
impl Method for VmSet {
    const NAME: &'static str = "vm.set";
    type Params = SetVmParams;
    type Result = Vm;
}

/// Publishes a host port to a VM (running or not); returns its ports.
pub struct VmPortAdd;
impl Method for VmPortAdd {
    const NAME: &'static str = "vm.port.add";
    type Params = crate::netpolicy::VmPortParams;
    type Result = Vec<crate::PublishedPort>;
}

/// Stops publishing a host port; returns the VM's ports.
pub struct VmPortRemove;
impl Method for VmPortRemove {
    const NAME: &'static str = "vm.port.remove";
    type Params = crate::netpolicy::VmPortParams;
    type Result = Vec<crate::PublishedPort>;
}

/// A VM's published ports.
pub struct VmPortList;
impl Method for VmPortList {
    const NAME: &'static str = "vm.port.list";
    type Params = VmRef;
    type Result = Vec<crate::PublishedPort>;
}

/// Changes a VM's egress policy, running or not.
pub struct VmEgressSet;
impl Method for VmEgressSet {
    const NAME: &'static str = "vm.egress.set";
    type Params = crate::netpolicy::SetEgressParams;
    type Result = Vm;
}

/// Relays a running VM's guest agent: after the success response (the
/// agent's [`HelloInfo`]) the connection carries agent protocol frames
/// (docs/agent-protocol.md), starting with the client's `hello`.
pub struct VmAgent;
impl Method for VmAgent {
    const NAME: &'static str = "vm.agent";
    type Params = VmRef;
    type Result = HelloInfo;
    const STREAMS: bool = true;
}

/// The guest's resource use (from its agent) and the VMM process's.
pub struct VmStats;
impl Method for VmStats {
    const NAME: &'static str = "vm.stats";
    type Params = VmRef;
    type Result = crate::VmStats;
}

/// A VM's console log, answered with the VM's name; then `Data` frames of
/// the log's bytes and an `End` frame (the framing of
/// [`crate::workspace`]). With `follow`, the stream goes on with what the
/// guest appends until its VMM exits.
pub struct VmLogs;
impl Method for VmLogs {
    const NAME: &'static str = "vm.logs";
    type Params = crate::vm::LogsParams;
    type Result = crate::vm::LogsStarted;
    const STREAMS: bool = true;
}

/// Copies a workspace into a running VM, answered once the destination is
/// claimed; then the CLI's tar upload and the daemon's result frame (see
/// [`crate::workspace`]).
pub struct VmWorkspacePrepare;
impl Method for VmWorkspacePrepare {
    const NAME: &'static str = "vm.workspace.prepare";
    type Params = crate::workspace::PrepareWorkspaceParams;
    type Result = crate::workspace::PrepareWorkspaceResult;
    const STREAMS: bool = true;
}

/// The upload of a `vm create --workspace` operation's `workspace` stage;
/// then the same stream as `vm.workspace.prepare`.
pub struct VmWorkspaceUpload;
impl Method for VmWorkspaceUpload {
    const NAME: &'static str = "vm.workspace.upload";
    type Params = crate::workspace::UploadWorkspaceParams;
    type Result = crate::workspace::UploadWorkspaceResult;
    const STREAMS: bool = true;
}

/// Brings a workspace's changes back; then the patch or bundle as a stream
/// (see [`crate::workspace`]).
pub struct VmWorkspaceExport;
impl Method for VmWorkspaceExport {
    const NAME: &'static str = "vm.workspace.export";
    type Params = crate::workspace::ExportWorkspaceParams;
    type Result = crate::workspace::ExportWorkspaceResult;
    const STREAMS: bool = true;
}

// ---- work disks ----

pub struct DiskCreate;
impl Method for DiskCreate {
    const NAME: &'static str = "disk.create";
    type Params = CreateDiskParams;
    type Result = WorkDisk;
}

pub struct DiskList;
impl Method for DiskList {
    const NAME: &'static str = "disk.list";
    type Params = NoParams;
    type Result = Vec<WorkDisk>;
}

/// Removes a detached work disk.
pub struct DiskRemove;
impl Method for DiskRemove {
    const NAME: &'static str = "disk.rm";
    type Params = RemoveParams;
    type Result = WorkDisk;
}

/// Grows a work disk whose VM (if any) is stopped.
pub struct DiskResize;
impl Method for DiskResize {
    const NAME: &'static str = "disk.resize";
    type Params = ResizeDiskParams;
    type Result = WorkDisk;
}

// ---- images ----

/// Starts an operation that imports an image file, archive or directory.
pub struct ImageImport;
impl Method for ImageImport {
    const NAME: &'static str = "image.import";
    type Params = ImportImageParams;
    type Result = OperationStarted;
}

pub struct ImageList;
impl Method for ImageList {
    const NAME: &'static str = "image.list";
    type Params = NoParams;
    type Result = Vec<Image>;
}

/// Starts an operation that downloads a catalog image.
pub struct ImagePull;
impl Method for ImagePull {
    const NAME: &'static str = "image.pull";
    type Params = PullParams;
    type Result = OperationStarted;
}

pub struct ImageShow;
impl Method for ImageShow {
    const NAME: &'static str = "image.show";
    type Params = RemoveParams;
    type Result = Image;
}

pub struct ImageRemove;
impl Method for ImageRemove {
    const NAME: &'static str = "image.rm";
    type Params = RemoveParams;
    type Result = Image;
}

// ---- kernels ----

/// Starts an operation that imports a kernel (and initrd).
pub struct KernelImport;
impl Method for KernelImport {
    const NAME: &'static str = "kernel.import";
    type Params = ImportKernelParams;
    type Result = OperationStarted;
}

pub struct KernelList;
impl Method for KernelList {
    const NAME: &'static str = "kernel.list";
    type Params = NoParams;
    type Result = Vec<Kernel>;
}

/// Starts an operation that downloads a catalog kernel.
pub struct KernelPull;
impl Method for KernelPull {
    const NAME: &'static str = "kernel.pull";
    type Params = PullParams;
    type Result = OperationStarted;
}

pub struct KernelShow;
impl Method for KernelShow {
    const NAME: &'static str = "kernel.show";
    type Params = RemoveParams;
    type Result = Kernel;
}

pub struct KernelRemove;
impl Method for KernelRemove {
    const NAME: &'static str = "kernel.rm";
    type Params = RemoveParams;
    type Result = Kernel;
}

// ---- operations ----

pub struct OperationList;
impl Method for OperationList {
    const NAME: &'static str = "operation.list";
    type Params = OperationParams;
    type Result = Vec<Operation>;
}

pub struct OperationStatus;
impl Method for OperationStatus {
    const NAME: &'static str = "operation.status";
    type Params = OperationRef;
    type Result = Operation;
}

/// Asks a running operation to stop; it rolls back what it made.
pub struct OperationCancel;
impl Method for OperationCancel {
    const NAME: &'static str = "operation.cancel";
    type Params = OperationRef;
    type Result = Operation;
}

/// Streams the operation's stage events (history first, then live) and a
/// final [`crate::StreamFrame::Done`].
pub struct OperationWatch;
impl Method for OperationWatch {
    const NAME: &'static str = "operation.watch";
    type Params = OperationRef;
    type Result = StreamStarted;
    const STREAMS: bool = true;
}

pub struct VmPause;
impl Method for VmPause {
    const NAME: &'static str = "vm.pause";
    type Params = VmRef;
    type Result = Vm;
}

pub struct VmResume;
impl Method for VmResume {
    const NAME: &'static str = "vm.resume";
    type Params = VmRef;
    type Result = Vm;
}

/// Pauses the VM, writes a snapshot, resumes it (or stops it).
pub struct VmSnapshot;
impl Method for VmSnapshot {
    const NAME: &'static str = "vm.snapshot";
    type Params = SnapshotVmParams;
    type Result = Snapshot;
}

pub struct SnapshotList;
impl Method for SnapshotList {
    const NAME: &'static str = "snapshot.list";
    type Params = NoParams;
    type Result = Vec<Snapshot>;
}

pub struct SnapshotShow;
impl Method for SnapshotShow {
    const NAME: &'static str = "snapshot.show";
    type Params = SnapshotRef;
    type Result = Snapshot;
}

/// Returns the snapshot as it was before it was removed.
pub struct SnapshotRemove;
impl Method for SnapshotRemove {
    const NAME: &'static str = "snapshot.rm";
    type Params = SnapshotRef;
    type Result = Snapshot;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_params_accepts_only_nothing() {
        for accepted in ["null", "{}", "[]"] {
            assert_eq!(
                serde_json::from_str::<NoParams>(accepted).unwrap(),
                NoParams
            );
        }
        let error = serde_json::from_value::<NoParams>(serde_json::json!({"vm": "x"}))
            .unwrap_err()
            .to_string();
        assert_eq!(error, r#"this method takes none, got {"vm":"x"}"#);
        assert!(serde_json::from_value::<NoParams>(Value::from(5)).is_err());
        assert_eq!(serde_json::to_string(&NoParams).unwrap(), "{}");
    }

    #[test]
    fn names_are_unique_and_the_streaming_methods_are_known() {
        let mut names: Vec<&str> = ALL.iter().map(|method| method.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        let streaming: Vec<&str> = ALL
            .iter()
            .filter(|method| method.streams)
            .map(|method| method.name)
            .collect();
        assert_eq!(
            streaming,
            [
                "vm.agent",
                "vm.logs",
                "vm.workspace.prepare",
                "vm.workspace.upload",
                "vm.workspace.export",
                "operation.watch"
            ]
        );
        assert!(is_streaming("operation.watch"));
        assert!(!is_streaming("vm.list"));
        assert!(!is_streaming("vm.explode"));
    }
}
