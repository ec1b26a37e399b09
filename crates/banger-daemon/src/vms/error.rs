//! The VM service's error: what a lookup, a create, a lifecycle step or
//! reconciliation can fail with. Errors of the services it calls are
//! wrapped whole (their kind and hint are theirs).

use std::path::PathBuf;

use banger_agent_proto::client::ClientError;
use banger_disk::clone::CloneError;
use banger_proto::{ErrorKind, NameError, VmState};
use banger_store::StoreError;
use banger_vmm::VmmError;

use crate::agents::AgentError;
use crate::capabilities::CapabilityError;
use crate::catalog::CatalogError;
use crate::config::{MAX_VCPUS, MIN_MEMORY_MIB};
use crate::disks::WorkDiskError;
use crate::error::{DaemonError, RpcFailure, StoreFailure};
use crate::images::ImageError;
use crate::operations::OperationError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    // Lookups.
    #[error("No VM named `{reference}`")]
    NotFound { reference: String },
    #[error("`{reference}` matches several VMs: {}", .names.join(", "))]
    Ambiguous {
        reference: String,
        names: Vec<String>,
    },
    /// Deleted while the caller waited for its lock.
    #[error("VM `{name}` was deleted")]
    Deleted { name: String },

    // Requests the state machine refused (`state::decide`).
    #[error("VM `{name}` is being created")]
    BeingCreated {
        name: String,
        /// The create operation, to cancel.
        operation: String,
    },
    #[error("VM `{name}` is {state}; the guest agent answers only while it runs")]
    NotRunning { name: String, state: VmState },
    #[error("VM `{name}` is {state}; `vm set` changes stopped VMs only")]
    ChangeNeedsStop { name: String, state: VmState },
    #[error("VM `{name}` is {state}")]
    StopFirst { name: String, state: VmState },
    #[error("VM `{name}` is {state}")]
    InTransition { name: String, state: VmState },
    #[error("VM `{name}` is paused")]
    Paused { name: String },
    #[error(transparent)]
    Snapshot(#[from] super::snapshot::SnapshotError),

    // What a create or `vm set` asked for.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("vcpus must be between 1 and {max}, not {vcpus}", max = MAX_VCPUS)]
    Vcpus { vcpus: u8 },
    #[error("memory must be at least {min} MiB, not {memory_mib}", min = MIN_MEMORY_MIB)]
    Memory { memory_mib: u32 },
    #[error("vcpus {vcpus} is more than the host's {host_cpus} CPUs")]
    VcpusOverHost { vcpus: u8, host_cpus: u32 },
    #[error("memory_mib {memory_mib} is more than the host's memory (MemTotal {host_mib} MiB)")]
    MemoryOverHost { memory_mib: u32, host_mib: u64 },
    /// Not a size at all (`parse_size`'s own words).
    #[error("{reason}")]
    InvalidSize { reason: String },
    #[error("Nothing to change: give vcpus, memory_mib and/or disk_size")]
    NothingToChange,
    #[error("VM `{name}` already exists")]
    DuplicateName { name: String },
    #[error("No image named `{name}`")]
    NoImage { name: String },
    #[error("No kernel named `{name}`")]
    NoKernel { name: String },
    #[error("{path} is missing from the state dir")]
    MissingArtifact { path: PathBuf },
    #[error("VM `{name}` has a {size_mib} MiB root disk; disks grow but never shrink")]
    ShrinkRootDisk { name: String, size_mib: u64 },
    #[error("VM `{name}` has a dm-snapshot root disk, which is as large as its image")]
    GrowDmSnapshot { name: String },

    // Root disks.
    #[error("Failed to create {path}")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to clone root disk")]
    CloneRootDisk(#[source] Box<CloneError>),
    #[error(transparent)]
    NoSpace(#[from] crate::files::NoSpace),
    #[error("VM `{name}` has no usable root disk (did it fail during create?)")]
    NoUsableRootDisk {
        name: String,
        #[source]
        source: Box<CloneError>,
    },
    #[error("Failed to remove the root disk")]
    RemoveRootDisk(#[source] Box<CloneError>),
    #[error("Failed to remove {path}")]
    RemoveDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("No root disk before the VMM start")]
    NoRootDisk,

    // The VMM and the guest.
    #[error("Failed to start the VMM")]
    StartVmm(#[source] Box<VmmError>),
    #[error("Failed to boot the VM")]
    Boot(#[source] Box<VmmError>),
    #[error("The VMM exited right after boot")]
    ExitedAfterBoot,
    #[error("No VMM process to boot")]
    NoVmmProcess,
    #[error("Failed to kill the VMM")]
    KillVmm(#[source] Box<VmmError>),
    #[error("Failed to check the VMM process")]
    CheckVmm(#[source] Box<VmmError>),
    #[error("Could not read the console log {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The guest agent of VM `{name}` could not report stats")]
    GuestStats {
        name: String,
        #[source]
        source: ClientError,
    },

    #[error("{task} task failed")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },

    // What the services and capabilities the VM service calls returned.
    /// A create's guest stage (the workspace copy) failed; its error is
    /// kept whole.
    #[error(transparent)]
    GuestStage(DaemonError),
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Operation(#[from] OperationError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    WorkDisk(#[from] WorkDiskError),
    #[error(transparent)]
    Store(#[from] StoreFailure),
}

impl From<StoreError> for VmError {
    fn from(error: StoreError) -> Self {
        Self::Store(error.into())
    }
}

impl RpcFailure for VmError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. }
            | Self::Deleted { .. }
            | Self::NoImage { .. }
            | Self::NoKernel { .. } => ErrorKind::NotFound,
            Self::Ambiguous { .. }
            | Self::InvalidName(_)
            | Self::Vcpus { .. }
            | Self::Memory { .. }
            | Self::VcpusOverHost { .. }
            | Self::MemoryOverHost { .. }
            | Self::InvalidSize { .. }
            | Self::NothingToChange
            | Self::ShrinkRootDisk { .. } => ErrorKind::InvalidParams,
            Self::BeingCreated { .. }
            | Self::NotRunning { .. }
            | Self::ChangeNeedsStop { .. }
            | Self::StopFirst { .. }
            | Self::InTransition { .. }
            | Self::Paused { .. }
            | Self::GrowDmSnapshot { .. }
            | Self::NoUsableRootDisk { .. } => ErrorKind::InvalidState,
            Self::DuplicateName { .. } => ErrorKind::AlreadyExists,
            Self::NoRootDisk | Self::NoVmmProcess => ErrorKind::Internal,
            Self::MissingArtifact { .. }
            | Self::CreateDirectory { .. }
            | Self::CloneRootDisk(_)
            | Self::NoSpace(_)
            | Self::RemoveRootDisk(_)
            | Self::RemoveDirectory { .. }
            | Self::StartVmm(_)
            | Self::Boot(_)
            | Self::ExitedAfterBoot
            | Self::KillVmm(_)
            | Self::CheckVmm(_)
            | Self::GuestStats { .. }
            | Self::ConsoleLog { .. }
            | Self::Task { .. } => ErrorKind::Failed,
            Self::GuestStage(error) => error.kind,
            Self::Capability(error) => error.kind(),
            Self::Image(error) => error.kind(),
            Self::Catalog(error) => error.kind(),
            Self::Operation(error) => error.kind(),
            Self::Agent(error) => error.kind(),
            Self::WorkDisk(error) => error.kind(),
            Self::Store(error) => error.kind(),
            Self::Snapshot(error) => error.kind(),
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::NotFound { .. } | Self::Deleted { .. } => {
                "`banger vm list` shows the VMs".to_owned()
            }
            Self::Ambiguous { .. } => "give the full name; `banger vm list` shows them".to_owned(),
            Self::InTransition { name, .. } => {
                format!("try again when it is done; `banger vm show {name}` shows its state")
            }
            Self::InvalidName(_) => {
                "names are DNS labels: lowercase letters, digits and `-`".to_owned()
            }
            Self::Vcpus { .. } => format!("pass --vcpus between 1 and {MAX_VCPUS}"),
            Self::Memory { .. } => format!("pass --memory {MIN_MEMORY_MIB} or more (MiB)"),
            Self::VcpusOverHost { host_cpus, .. } => {
                format!("pass --vcpus {host_cpus} or fewer")
            }
            Self::MemoryOverHost { .. } => {
                "pass a smaller --memory (MiB), or set a smaller `[vm] memory_mib` default"
                    .to_owned()
            }
            Self::InvalidSize { .. } => {
                "a size is a number with K, M, G or T: `20G`, `512M`".to_owned()
            }
            Self::NothingToChange => "pass --vcpus, --memory and/or --disk-size".to_owned(),
            Self::ShrinkRootDisk { size_mib, .. } => {
                format!("pass a --disk-size larger than {size_mib} MiB")
            }
            Self::NoSpace(_) => {
                "free space in the daemon's state dir, or delete VMs and images you no longer need"
                    .to_owned()
            }
            Self::StartVmm(_) | Self::Boot(_) | Self::ExitedAfterBoot => {
                "`banger vm logs NAME` shows the VMM's output and the console; `banger doctor` checks the host"
                    .to_owned()
            }
            Self::GuestStats { name, .. } => {
                format!("`banger vm logs {name}` shows whether the guest booted")
            }
            Self::BeingCreated { operation, .. } => format!(
                "wait for it, cancel it with `banger operation cancel {operation}`, or pass --force to delete"
            ),
            Self::NotRunning { name, .. } => format!("start it with `banger vm start {name}`"),
            Self::Paused { name } => format!("resume it with `banger vm resume {name}`"),
            Self::ChangeNeedsStop { name, .. } => {
                format!("stop it first with `banger vm stop {name}`")
            }
            Self::StopFirst { name, .. } => {
                format!("stop it first with `banger vm stop {name}`, or pass --force")
            }
            Self::DuplicateName { .. } => {
                "pick another name, or `banger vm delete` the old VM".to_owned()
            }
            Self::NoImage { .. } => "`banger image list` shows the images; `banger image import` or `banger image pull` adds one".to_owned(),
            Self::NoKernel { .. } => "`banger kernel list` shows the kernels; `banger kernel import` or `banger kernel pull` adds one".to_owned(),
            Self::MissingArtifact { .. } => {
                "remove and import the image or kernel again".to_owned()
            }
            Self::GrowDmSnapshot { .. } => {
                "import a larger image, or use a work disk (`--work-disk`) for space".to_owned()
            }
            Self::NoUsableRootDisk { name, .. } => {
                format!("delete it with `banger vm delete {name}` and create it again")
            }
            Self::GuestStage(error) => return error.hint().map(str::to_owned),
            Self::Capability(error) => return error.hint(),
            Self::Image(error) => return error.hint(),
            Self::Catalog(error) => return error.hint(),
            Self::Operation(error) => return error.hint(),
            Self::Agent(error) => return error.hint(),
            Self::WorkDisk(error) => return error.hint(),
            Self::Store(error) => return error.hint(),
            Self::Snapshot(error) => return error.hint(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_would_help() {
        let busy = VmError::BeingCreated {
            name: "dev".to_owned(),
            operation: "0123".to_owned(),
        };
        assert_eq!(busy.to_string(), "VM `dev` is being created");
        assert_eq!(busy.kind(), ErrorKind::InvalidState);
        assert_eq!(
            busy.hint().as_deref(),
            Some("wait for it, cancel it with `banger operation cancel 0123`, or pass --force to delete")
        );
        let running = VmError::ChangeNeedsStop {
            name: "dev".to_owned(),
            state: VmState::Running,
        };
        assert_eq!(
            running.to_string(),
            "VM `dev` is running; `vm set` changes stopped VMs only"
        );
        let transition = VmError::InTransition {
            name: "dev".to_owned(),
            state: VmState::Stopping,
        };
        assert_eq!(
            transition.hint().as_deref(),
            Some("try again when it is done; `banger vm show dev` shows its state")
        );
    }

    #[test]
    fn sizes_name_their_bounds() {
        assert_eq!(
            VmError::Vcpus { vcpus: 0 }.to_string(),
            format!("vcpus must be between 1 and {MAX_VCPUS}, not 0")
        );
        assert_eq!(
            VmError::Memory { memory_mib: 1 }.to_string(),
            format!("memory must be at least {MIN_MEMORY_MIB} MiB, not 1")
        );
    }

    #[test]
    fn wrapped_errors_keep_their_kind_and_hint() {
        let error = VmError::from(ImageError::KernelNotFound {
            name: "k".to_owned(),
        });
        assert_eq!(error.to_string(), "No kernel named `k`");
        assert_eq!(error.kind(), ErrorKind::NotFound);
        assert!(error.hint().unwrap().starts_with("`banger kernel list`"));
        let stage = VmError::GuestStage(
            DaemonError::invalid_state("VM `v` already has files at /root/repo")
                .with_hint("`--force` replaces it"),
        );
        assert_eq!(stage.kind(), ErrorKind::InvalidState);
        let rpc: DaemonError = stage.into();
        assert_eq!(
            rpc.to_rpc().message,
            "VM `v` already has files at /root/repo"
        );
        assert_eq!(rpc.hint(), Some("`--force` replaces it"));
    }
}
