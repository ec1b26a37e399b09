//! Snapshots of VMs: guest memory, device state and copies of the disks,
//! from which new VMs start (`vm create --from-snapshot`, `vm fork`).

use serde::{Deserialize, Serialize};

use crate::Backend;

/// A snapshot as the daemon reports it. It outlives its source VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    /// Id and name of the VM it was taken from (which may be gone).
    pub source_vm_id: String,
    pub source_vm: String,
    /// Image and kernel names of the source VM.
    pub image: String,
    pub kernel: String,
    /// The VMM that wrote it, and its version: only the same restores it.
    pub backend: Backend,
    pub backend_version: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Root disk size of the source VM.
    pub disk_bytes: u64,
    /// Whether the source had a work disk (a copy of it is in the snapshot).
    pub has_work_disk: bool,
    /// Bytes the snapshot's files take on disk.
    pub size_bytes: u64,
    /// Its directory on the host (`STATE_DIR/snapshots/ID`).
    pub dir: String,
    /// RFC 3339.
    pub created_at: String,
}

/// Parameters of `vm.snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotVmParams {
    /// The VM, by name or id.
    pub vm: String,
    /// The snapshot's name; `VM-N` (the first free N) when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Stop the VM after the snapshot instead of resuming it.
    #[serde(default)]
    pub stop: bool,
}

/// Parameters of `snapshot.show` and `snapshot.rm`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    pub name: String,
}
