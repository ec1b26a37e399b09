//! Method names of the control protocol.

pub const DAEMON_STATUS: &str = "daemon.status";
/// Checks the host and configuration; returns a `DoctorReport`.
pub const DAEMON_DOCTOR: &str = "daemon.doctor";

pub const VM_CREATE: &str = "vm.create";
pub const VM_LIST: &str = "vm.list";
pub const VM_SHOW: &str = "vm.show";
pub const VM_START: &str = "vm.start";
pub const VM_STOP: &str = "vm.stop";
pub const VM_RESTART: &str = "vm.restart";
pub const VM_DELETE: &str = "vm.delete";
pub const VM_SET: &str = "vm.set";
/// Relays a running VM's guest agent: after the success response (the
/// agent's `HelloInfo`) the connection carries agent protocol frames
/// (docs/agent-protocol.md), starting with the client's `hello`.
pub const VM_AGENT: &str = "vm.agent";
/// The guest's resource use (from its agent) and the VMM process's; returns `VmStats`.
pub const VM_STATS: &str = "vm.stats";

/// Copies a workspace into a running VM: `PrepareWorkspaceParams`, answered
/// once the destination is claimed; then the CLI's tar upload and the
/// daemon's result frame (see [`crate::workspace`]).
pub const VM_WORKSPACE_PREPARE: &str = "vm.workspace.prepare";
/// The upload of a `vm create --workspace` operation's `workspace` stage:
/// `UploadWorkspaceParams`; then the same stream as `vm.workspace.prepare`.
pub const VM_WORKSPACE_UPLOAD: &str = "vm.workspace.upload";
/// Brings a workspace's changes back: `ExportWorkspaceParams`; then the
/// patch or bundle as a stream (see [`crate::workspace`]).
pub const VM_WORKSPACE_EXPORT: &str = "vm.workspace.export";

/// Work disks: `disk.create` (`CreateDiskParams`), `disk.list`, `disk.rm`
/// (`RemoveParams`), `disk.resize` (`ResizeDiskParams`).
pub const DISK_CREATE: &str = "disk.create";
pub const DISK_LIST: &str = "disk.list";
pub const DISK_REMOVE: &str = "disk.rm";
pub const DISK_RESIZE: &str = "disk.resize";

pub const IMAGE_IMPORT: &str = "image.import";
pub const IMAGE_LIST: &str = "image.list";
/// Starts an operation that downloads a catalog image; returns `OperationStarted`.
pub const IMAGE_PULL: &str = "image.pull";
pub const IMAGE_SHOW: &str = "image.show";
pub const IMAGE_REMOVE: &str = "image.rm";

pub const KERNEL_IMPORT: &str = "kernel.import";
pub const KERNEL_LIST: &str = "kernel.list";
/// Starts an operation that downloads a catalog kernel; returns `OperationStarted`.
pub const KERNEL_PULL: &str = "kernel.pull";
pub const KERNEL_SHOW: &str = "kernel.show";
pub const KERNEL_REMOVE: &str = "kernel.rm";

pub const OPERATION_LIST: &str = "operation.list";
pub const OPERATION_STATUS: &str = "operation.status";
pub const OPERATION_CANCEL: &str = "operation.cancel";
/// Streams the operation's stage events (history first, then live) and a
/// final [`crate::StreamFrame::Done`].
pub const OPERATION_WATCH: &str = "operation.watch";

/// Whether a successful call of `method` turns the connection into a stream.
pub fn is_streaming(method: &str) -> bool {
    method == OPERATION_WATCH
}
