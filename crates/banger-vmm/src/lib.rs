//! The VMM backend seam of banger: what `bangerd` asks of a virtual machine
//! monitor, and the implementations of it.
//!
//! A VM's monitor process goes through these steps, whatever the backend:
//!
//! 1. [`Vmm::spawn`] starts the monitor process in its own session (so a
//!    Ctrl-C on the daemon's terminal does not reach it, and it outlives a
//!    daemon restart), with its console appended to
//!    `<runtime_dir>/console.log`, and applies all pre-boot configuration.
//!    If any part fails the process is killed and reaped before the error is
//!    returned: nothing is left running.
//! 2. [`Vmm::boot`] starts the guest.
//! 3. The daemon watches the returned [`VmmHandle`]: [`VmmHandle::wait_exit`]
//!    resolves (for any number of concurrent waiters) as soon as the process
//!    is gone, whoever ended it.
//! 4. [`Vmm::stop`] asks the guest to shut down and kills the process if it
//!    has not exited within the grace period; [`Vmm::kill`] kills it at once.
//! 5. After a daemon restart, [`Vmm::adopt`] re-attaches to a monitor started
//!    by the previous daemon instance, given the pid the daemon recorded. It
//!    checks the process's command line so a reused pid is never mistaken for
//!    the VM.
//!
//! 6. [`Vmm::pause`] and [`Vmm::resume`] stop and run the vCPUs;
//!    [`Vmm::snapshot`] writes a paused guest's memory and device state to
//!    a directory, and [`Vmm::restore`] starts a new monitor from such a
//!    directory instead of spawning and booting one.
//!
//! Backends: [`firecracker::Firecracker`] and [`qemu::Qemu`]. Host process
//! handling shared by all backends lives in [`process`].

pub mod firecracker;
pub mod jail;
pub mod process;
pub mod qemu;
pub mod socket_wait;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use banger_proto::Backend;

pub use process::{ExitStatusInfo, ProcessError, ProcessHandle};

/// Name of the file in a VM's runtime directory that receives the monitor's
/// stdout and stderr (for Firecracker this includes the guest serial console).
pub const CONSOLE_LOG_FILE: &str = "console.log";

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Stable id of the VM; Firecracker also receives it as `--id`, which is
    /// how [`Vmm::adopt`] recognises the process later.
    pub vm_id: String,
    /// Human name of the VM, used in error messages.
    pub vm_name: String,
    /// Per-VM directory that already exists. The API socket, console log and
    /// the monitor's own log and metrics files are created in it.
    pub runtime_dir: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel_path: PathBuf,
    pub initrd_path: Option<PathBuf>,
    pub kernel_cmdline: String,
    /// Block devices, in the order the guest should see them. The first drive
    /// with `is_root = true` is the root device.
    pub drives: Vec<DriveSpec>,
    pub network_interfaces: Vec<NetworkInterfaceSpec>,
    pub vsock: Option<VsockSpec>,
}

/// One block device of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// Device id, unique within the VM (ASCII letters, digits, `_`, `-`).
    pub id: String,
    /// Host file or block device backing the drive.
    pub path: PathBuf,
    pub is_root: bool,
    pub read_only: bool,
}

/// One virtio-net device of a VM, backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterfaceSpec {
    /// Interface id, unique within the VM.
    pub id: String,
    /// Name of the host tap device, which must already exist.
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// The vsock device through which the daemon talks to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// Guest context id, at least 3.
    pub guest_cid: u32,
    /// Host Unix socket that proxies host-initiated connections into the
    /// guest. Created by the monitor; a stale file is removed before spawn.
    pub uds_path: PathBuf,
}

/// Where the host reaches a VM's guest agent; which one depends on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket that is the guest's byte stream (QEMU's virtio-serial
    /// chardev).
    Unix(PathBuf),
    /// Firecracker's vsock Unix socket: connect, send `CONNECT <port>\n`,
    /// read `OK <host port>\n`, then it is the guest's stream.
    FirecrackerVsock { uds_path: PathBuf, port: u32 },
}

/// Name of the Firecracker vsock socket in a VM's runtime directory.
pub const VSOCK_SOCKET_FILE: &str = "vsock.sock";
/// Guest context id of every Firecracker VM (each VM's vsock is its own
/// Unix socket, so ids need not differ between VMs).
pub const GUEST_CID: u32 = 3;

/// How [`Vmm::stop`] ended the monitor process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The process exited on its own (normally because the guest shut down)
    /// within the grace period, or had already exited.
    Graceful { status: ExitStatusInfo },
    /// The process was still running after the grace period, or the guest
    /// could not be asked to shut down, and was killed with `SIGKILL`.
    Killed { status: ExitStatusInfo },
}

impl StopOutcome {
    #[must_use]
    pub fn was_graceful(&self) -> bool {
        matches!(self, Self::Graceful { .. })
    }

    #[must_use]
    pub fn status(&self) -> ExitStatusInfo {
        match self {
            Self::Graceful { status } | Self::Killed { status } => *status,
        }
    }
}

/// A running (or exited) VMM process. Cheap to clone; all clones observe the
/// same process.
#[derive(Clone)]
pub struct VmmHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    backend: Backend,
    vm_id: String,
    runtime_dir: PathBuf,
    api_socket: PathBuf,
    process: ProcessHandle,
}

impl VmmHandle {
    /// Whether both handles are clones of one handle (the same spawn or
    /// adoption). Unlike comparing pids, this cannot confuse a process with a
    /// later one that reused its pid.
    #[must_use]
    pub fn same_as(&self, other: &VmmHandle) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Wraps a watched process. Backends build handles; tests with a fake
    /// [`Vmm`] can build them around any process.
    #[must_use]
    pub fn new(
        backend: Backend,
        vm_id: impl Into<String>,
        runtime_dir: impl Into<PathBuf>,
        api_socket: impl Into<PathBuf>,
        process: ProcessHandle,
    ) -> Self {
        Self {
            inner: Arc::new(HandleInner {
                backend,
                vm_id: vm_id.into(),
                runtime_dir: runtime_dir.into(),
                api_socket: api_socket.into(),
                process,
            }),
        }
    }

    #[must_use]
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    #[must_use]
    pub fn vm_id(&self) -> &str {
        &self.inner.vm_id
    }

    #[must_use]
    pub fn runtime_dir(&self) -> &Path {
        &self.inner.runtime_dir
    }

    /// The monitor's control socket (Firecracker's HTTP API socket, QEMU's
    /// QMP socket).
    #[must_use]
    pub fn api_socket(&self) -> &Path {
        &self.inner.api_socket
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.inner.process.pid()
    }

    /// Whether the process was adopted (started by an earlier daemon
    /// instance) rather than spawned by this one. The exit status of an
    /// adopted process is unknown unless this process happens to be its
    /// parent.
    #[must_use]
    pub fn is_adopted(&self) -> bool {
        self.inner.process.is_adopted()
    }

    #[must_use]
    pub fn process(&self) -> &ProcessHandle {
        &self.inner.process
    }

    /// Resolves once the process has exited. Any number of tasks may wait at
    /// the same time; all see the same status.
    pub async fn wait_exit(&self) -> ExitStatusInfo {
        self.inner.process.wait_exit().await
    }

    #[must_use]
    pub fn has_exited(&self) -> bool {
        self.inner.process.has_exited()
    }

    /// The exit status, once the process has exited.
    #[must_use]
    pub fn exit_status(&self) -> Option<ExitStatusInfo> {
        self.inner.process.exit_status()
    }
}

impl fmt::Debug for VmmHandle {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("VmmHandle")
            .field("backend", &self.inner.backend)
            .field("vm_id", &self.inner.vm_id)
            .field("runtime_dir", &self.inner.runtime_dir)
            .field("api_socket", &self.inner.api_socket)
            .field("process", &self.inner.process)
            .finish()
    }
}

/// A VMM backend. Implementations: [`firecracker::Firecracker`],
/// [`qemu::Qemu`].
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// Spawn the VMM process and apply all pre-boot configuration. On any
    /// error the process is killed and reaped before returning: nothing is
    /// left running.
    async fn spawn(&self, spec: &LaunchSpec) -> Result<VmmHandle, VmmError>;

    /// Start the guest.
    async fn boot(&self, handle: &VmmHandle) -> Result<(), VmmError>;

    /// Graceful stop: ask the guest to shut down, wait up to `grace` for the
    /// process to exit, then `SIGKILL`. Says whether it ended gracefully or
    /// was killed.
    async fn stop(&self, handle: &VmmHandle, grace: Duration) -> Result<StopOutcome, VmmError>;

    /// `SIGKILL` the process and wait until it is gone.
    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError>;

    /// Remove what a VMM process leaves behind in `runtime_dir` once it is
    /// gone (its control sockets). Called after a crash; stop and kill
    /// already do it.
    fn release(&self, runtime_dir: &Path);

    /// Where the guest agent of a VM whose runtime directory is `runtime_dir`
    /// is reached, and the vsock device the launch needs for it (if any).
    fn agent_endpoint(&self, runtime_dir: &Path) -> (AgentEndpoint, Option<VsockSpec>);

    /// Re-attach to a VMM process started by an earlier daemon instance.
    /// `Ok(Some)` if `pid` is alive and is this VM's monitor (its command
    /// line carries `--id <vm_id>`), `Ok(None)` if it is gone or is some
    /// other process (the pid was reused).
    async fn adopt(
        &self,
        vm_id: &str,
        runtime_dir: &Path,
        pid: u32,
    ) -> Result<Option<VmmHandle>, VmmError>;

    /// Stops the guest's vCPUs; its devices and connections stay.
    async fn pause(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            backend: handle.backend(),
            operation: "pause",
        })
    }

    /// Runs the vCPUs of a paused guest again.
    async fn resume(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            backend: handle.backend(),
            operation: "resume",
        })
    }

    /// Writes the memory and device state of a *paused* guest to
    /// `<dir>/vmstate` and `<dir>/memory` (`dir` exists and is empty), mode
    /// 0600, owned by root. The guest stays paused.
    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<SnapshotInfo, VmmError> {
        let _ = dir;
        Err(VmmError::Unsupported {
            backend: handle.backend(),
            operation: "snapshot",
        })
    }

    /// Starts a monitor for the VM of `spec` from `snapshot` instead of
    /// [`Vmm::spawn`] and [`Vmm::boot`]: its devices are `spec`'s (drives by
    /// id, network interfaces by id, vsock), its memory and vCPU state the
    /// snapshot's; the guest runs when this returns. The snapshot's files are
    /// only read. On error nothing is left running.
    async fn restore(
        &self,
        spec: &LaunchSpec,
        snapshot: &SnapshotInfo,
    ) -> Result<VmmHandle, VmmError> {
        let _ = (spec, snapshot);
        Err(VmmError::Unsupported {
            backend: self.backend(),
            operation: "restore",
        })
    }
}

/// The files of a VM snapshot written by [`Vmm::snapshot`], in the
/// directory it was given.
pub const SNAPSHOT_STATE_FILE: &str = "vmstate";
pub const SNAPSHOT_MEMORY_FILE: &str = "memory";

/// What [`Vmm::snapshot`] wrote, and what [`Vmm::restore`] needs to check it
/// can load it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub backend: Backend,
    /// The monitor's version, as it reports it; a snapshot is only restored
    /// by the same backend and version.
    pub backend_version: String,
    /// Device and vCPU state (`<dir>/vmstate`).
    pub state_path: PathBuf,
    /// Guest memory (`<dir>/memory`).
    pub memory_path: PathBuf,
}

impl SnapshotInfo {
    /// Refuses a snapshot that another backend, or another version of this
    /// one, wrote. `version` is `None` before the monitor is running to say it.
    pub fn check_restorable_by(
        &self,
        backend: Backend,
        version: Option<&str>,
    ) -> Result<(), VmmError> {
        let same_version = version.is_none_or(|version| version == self.backend_version);
        if self.backend == backend && same_version {
            return Ok(());
        }
        Err(VmmError::SnapshotVersion {
            snapshot_backend: self.backend,
            snapshot_version: self.backend_version.clone(),
            backend,
            version: version.unwrap_or_default().to_owned(),
        })
    }

    /// The files a snapshot in `dir` has.
    #[must_use]
    pub fn in_dir(backend: Backend, backend_version: impl Into<String>, dir: &Path) -> Self {
        Self {
            backend,
            backend_version: backend_version.into(),
            state_path: dir.join(SNAPSHOT_STATE_FILE),
            memory_path: dir.join(SNAPSHOT_MEMORY_FILE),
        }
    }
}

/// A failure talking to a monitor's control channel (Firecracker's HTTP API,
/// QEMU's QMP).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Firecracker(#[from] firecracker::ClientError),
    #[error(transparent)]
    Qmp(#[from] qemu::QmpError),
}

/// Errors of the [`Vmm`] operations.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Could not prepare {} for VM {vm_name}", path.display())]
    PrepareRuntimeFile {
        vm_name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not prepare the jail of VM {vm_name}")]
    Jail {
        vm_name: String,
        #[source]
        source: jail::JailError,
    },
    #[error("Could not start {backend} for VM {vm_name}")]
    SpawnProcess {
        backend: Backend,
        vm_name: String,
        #[source]
        source: ProcessError,
    },
    #[error(
        "The {backend} process of VM {vm_name} exited during startup ({status}){}",
        format_console_tail(console_tail)
    )]
    ExitDuringStartup {
        backend: Backend,
        vm_name: String,
        status: ExitStatusInfo,
        /// The last lines the process wrote to its console log.
        console_tail: String,
    },
    #[error("The {backend} API of VM {vm_name} did not become ready")]
    WaitForApi {
        backend: Backend,
        vm_name: String,
        #[source]
        source: ControlError,
    },
    #[error("Could not configure VM {vm_name}")]
    ConfigureVm {
        vm_name: String,
        #[source]
        source: ControlError,
    },
    #[error("Could not boot VM {vm_id}")]
    BootVm {
        vm_id: String,
        #[source]
        source: ControlError,
    },
    #[error("The {backend} backend cannot {operation} a VM")]
    Unsupported {
        backend: Backend,
        operation: &'static str,
    },
    #[error("Could not {operation} VM {vm_id}")]
    Control {
        vm_id: String,
        operation: &'static str,
        #[source]
        source: ControlError,
    },
    #[error("Could not move the snapshot file {} of VM {vm_id}", path.display())]
    SnapshotFile {
        vm_id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "Snapshot was taken with {snapshot_backend} {snapshot_version}; this host runs {backend} {version}"
    )]
    SnapshotVersion {
        snapshot_backend: Backend,
        snapshot_version: String,
        backend: Backend,
        version: String,
    },
    #[error("Restoring a snapshot needs a jailed Firecracker: an unjailed one would reopen the source VM's disks")]
    RestoreNeedsJail,
    #[error("Could not kill the VMM process {pid} of VM {vm_id}")]
    KillProcess {
        vm_id: String,
        pid: u32,
        #[source]
        source: ProcessError,
    },
    #[error("Could not check whether process {pid} is the VMM of VM {vm_id}")]
    AdoptProcess {
        vm_id: String,
        pid: u32,
        #[source]
        source: ProcessError,
    },
    #[error("The process {pid} the jailer started for VM {vm_name} is not its Firecracker")]
    NotJailedFirecracker { vm_name: String, pid: u32 },
}

fn format_console_tail(console_tail: &str) -> String {
    if console_tail.trim().is_empty() {
        "; its console log is empty".to_owned()
    } else {
        format!("; its console log ends with:\n{}", console_tail.trim_end())
    }
}
