//! The fake VMM: owns the microVM's configuration and its state machine.
//!
//! The HTTP layer turns each request into one [`VmmAction`]; [`Vmm::handle`]
//! decides whether that action is legal now and applies it. The lifecycle:
//!
//! 1. Not started: every `PUT` configuration action is accepted (and
//!    validated); `InstanceStart` needs a boot source.
//! 2. `InstanceStart` succeeds: the state is Running, and from here on the
//!    configuration actions answer "not supported after starting".
//! 3. Running ⇄ Paused through `PATCH /vm`; `SendCtrlAltDel` and
//!    `FlushMetrics` are post-boot only.
//! 4. `PUT /snapshot/create` only while Paused: writes the state file (the
//!    configuration as JSON, see [`snapshot::SnapshotState`]) and the memory file
//!    (sparse, `mem_size_mib` long, the source's id at its start).
//! 5. `PUT /snapshot/load` only on a fresh VMM (nothing configured but the
//!    logger and metrics): reads both files, reopens the drives recorded in
//!    the state, applies the network and vsock overrides, binds the vsock
//!    socket; with `resume_vm` the guest runs (as after `InstanceStart`),
//!    else it is Paused until `PATCH /vm` `Resumed`.
//!
//! Host side effects that the real VMM performs at configuration time are
//! performed here too, so their failures surface at the same request: the
//! kernel, initrd and drive files are opened, the logger and metrics files
//! are opened for append, and the vsock socket is bound.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

mod snapshot;

pub use snapshot::SnapshotState;

use super::models::{
    ActionType, BootSource, Drive, FirecrackerVersion, FullVmConfiguration, HugePages,
    InstanceInfo, InstanceState, Logger, MachineConfiguration, MachineConfigurationUpdate, Metrics,
    NetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm, VmState, Vsock,
};

/// The version the fake claims to be, as in `GET /version`.
pub const FIRECRACKER_VERSION: &str = "1.17.0";

/// The longest kernel command line accepted (`x86_64` `COMMAND_LINE_SIZE`,
/// less the terminating NUL).
const MAX_BOOT_ARGS_LEN: usize = 2047;
/// `IFNAMSIZ` less the terminating NUL.
const MAX_HOST_DEV_NAME_LEN: usize = 15;
const MAX_VCPU_COUNT: u64 = 32;
const MIN_MTU: u64 = 68;
const MAX_MTU: u64 = 65535;
const MIN_GUEST_CID: u64 = 3;

/// One parsed API request.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfiguration,
    GetFullVmConfiguration,
    Action(ActionType),
    PutBootSource(BootSource),
    PutDrive(Drive),
    PutMachineConfiguration(MachineConfiguration),
    PatchMachineConfiguration(MachineConfigurationUpdate),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutNetworkInterface(NetworkInterface),
    PutVsock(Vsock),
    PatchVm(Vm),
    CreateSnapshot(SnapshotCreateParams),
    LoadSnapshot(SnapshotLoadParams),
}

/// When an action is legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Any,
    PreBoot,
    PostBoot,
}

impl VmmAction {
    fn phase(&self) -> Phase {
        match self {
            Self::GetInstanceInfo
            | Self::GetVersion
            | Self::GetMachineConfiguration
            | Self::GetFullVmConfiguration => Phase::Any,
            Self::Action(ActionType::InstanceStart)
            | Self::PutBootSource(_)
            | Self::PutDrive(_)
            | Self::PutMachineConfiguration(_)
            | Self::PatchMachineConfiguration(_)
            | Self::PutLogger(_)
            | Self::PutMetrics(_)
            | Self::PutNetworkInterface(_)
            | Self::PutVsock(_)
            | Self::LoadSnapshot(_) => Phase::PreBoot,
            Self::Action(ActionType::SendCtrlAltDel | ActionType::FlushMetrics)
            | Self::PatchVm(_)
            | Self::CreateSnapshot(_) => Phase::PostBoot,
        }
    }
}

/// What the caller must do beyond answering, because the VMM does not own
/// the process, stdout or the async runtime.
#[derive(Debug)]
pub enum Effect {
    /// The guest "booted": print the console lines, arm the crash timer,
    /// start the vsock bridge.
    Booted(Boot),
    /// The guest asked to reboot: Firecracker exits cleanly.
    CtrlAltDel,
}

/// What the server needs to play a booted guest.
#[derive(Debug)]
pub struct Boot {
    pub kernel_image_path: String,
    pub boot_args: Option<String>,
    /// The vsock socket bound at `PUT /vsock`, to serve from now on.
    pub vsock_listener: Option<UnixListener>,
}

/// The result of a legal action.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `Some` for a `200` JSON answer, `None` for `204 No Content`.
    pub body: Option<serde_json::Value>,
    pub effect: Option<Effect>,
}

impl Outcome {
    fn empty() -> Self {
        Self::default()
    }

    fn json<T: serde::Serialize>(value: &T) -> Self {
        Self {
            body: Some(serde_json::to_value(value).expect("response models serialize")),
            effect: None,
        }
    }
}

/// Why an action was refused; the message chain becomes `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("The requested operation is not supported after starting the microVM.")]
    NotSupportedAfterBoot,
    #[error("The requested operation is not supported before starting the microVM.")]
    NotSupportedBeforeBoot,
    #[error("Cannot start microvm without kernel configuration.")]
    MissingKernelConfig,
    #[error("The kernel file {path} cannot be opened")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The initrd file {path} cannot be opened")]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The kernel command line is invalid: {reason}")]
    InvalidBootArgs { reason: String },
    #[error(
        "The vCPU number {vcpu_count} is invalid! The vCPU number must be between 1 and 32, and can only be 1 or an even number when SMT is enabled."
    )]
    InvalidVcpuCount { vcpu_count: u64 },
    #[error("The memory size (MiB) is invalid.")]
    InvalidMemorySize,
    #[error("The memory size (MiB) {mem_size_mib} is not a multiple of the configured page size (2 MiB).")]
    MemorySizeNotPageMultiple { mem_size_mib: u64 },
    #[error("A root block device already exists!")]
    RootDeviceExists,
    #[error("Drive {drive_id}: `path_on_host` is required for a virtio-block drive (or give `socket` for vhost-user-block).")]
    DriveMissingPath { drive_id: String },
    #[error("Drive {drive_id}: `is_read_only` is required for a virtio-block drive.")]
    DriveMissingReadOnly { drive_id: String },
    #[error("Drive {drive_id}: a vhost-user-block drive (`socket`) must omit `{field}`.")]
    VhostUserFieldGiven {
        drive_id: String,
        field: &'static str,
    },
    #[error("Unable to open the block device backing file {path}")]
    OpenDrive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The vhost-user-block socket {path} does not exist")]
    MissingVhostUserSocket { path: PathBuf },
    #[error("Invalid host device name {name:?}: it must be 1 to 15 bytes long.")]
    InvalidHostDevName { name: String },
    #[error("Invalid guest MAC address {mac:?}: expected six colon-separated hex bytes.")]
    InvalidGuestMac { mac: String },
    #[error("Invalid MTU {mtu}: it must be between 68 and 65535.")]
    InvalidMtu { mtu: u64 },
    #[error("The guest MAC address {mac} is already in use.")]
    GuestMacInUse { mac: String },
    #[error("The host device {name} is already in use.")]
    HostDevNameInUse { name: String },
    #[error("Invalid guest CID {guest_cid}: it must be at least 3 and fit in 32 bits.")]
    InvalidGuestCid { guest_cid: u64 },
    #[error("Cannot create backend for vsock device: cannot bind {path}")]
    BindVsock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Create snapshot error: Cannot save the microVM state: the vCPUs are running; pause the microVM first.")]
    SnapshotWhileRunning,
    #[error("Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")]
    DiffSnapshotNotTracked,
    #[error("Create snapshot error: Cannot write {path}")]
    WriteSnapshot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Loading a microVM snapshot not allowed after configuring boot-specific resources.")]
    LoadSnapshotNotAllowed,
    #[error(
        "Load snapshot error: exactly one of `mem_file_path` and `mem_backend` must be given."
    )]
    LoadSnapshotMemory,
    #[error("fake-firecracker does not implement the Uffd memory backend.")]
    UffdNotImplemented,
    #[error("Load snapshot error: Cannot open the snapshot file {path}")]
    OpenSnapshot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Load snapshot error: Cannot deserialize the microVM state in {path}")]
    ParseSnapshot {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Load snapshot error: Cannot open the memory file {path}")]
    OpenMemory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Load snapshot error: Failed to restore devices: network override for unknown interface {iface_id}")]
    UnknownNetworkOverride { iface_id: String },
    #[error("Load snapshot error: Failed to restore devices: block device {drive_id}")]
    RestoreDrive {
        drive_id: String,
        #[source]
        source: Box<VmmError>,
    },
    #[error("Reinitialization of logger not allowed.")]
    LoggerAlreadyInitialized,
    #[error("Cannot open the log file {path}")]
    OpenLogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Reinitialization of metrics not allowed.")]
    MetricsAlreadyInitialized,
    #[error("Cannot open the metrics file {path}")]
    OpenMetricsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write metrics to {path}")]
    WriteMetrics {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A configured vsock device and the socket bound for it.
#[derive(Debug)]
struct VsockDevice {
    config: Vsock,
    /// Taken when the guest boots.
    listener: Option<UnixListener>,
}

#[derive(Debug)]
struct MetricsSink {
    config: Metrics,
    file: File,
    flush_count: u64,
}

#[derive(Debug)]
struct LoggerSink {
    config: Logger,
    file: Option<File>,
}

/// The fake microVM.
#[derive(Debug)]
pub struct Vmm {
    instance_id: String,
    state: InstanceState,
    boot_source: Option<BootSource>,
    drives: Vec<Drive>,
    machine: MachineConfiguration,
    logger: Option<LoggerSink>,
    metrics: Option<MetricsSink>,
    network_interfaces: Vec<NetworkInterface>,
    vsock: Option<VsockDevice>,
    /// A boot-specific resource was configured: a snapshot may no longer be
    /// loaded.
    configured: bool,
    /// A snapshot loaded without `resume_vm`: the guest starts at the first
    /// `PATCH /vm` `Resumed`.
    pending_boot: Option<Boot>,
}

impl Vmm {
    /// A fresh, unconfigured VMM with the documented machine defaults
    /// (1 vCPU, 128 MiB, SMT off).
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            state: InstanceState::NotStarted,
            boot_source: None,
            drives: Vec::new(),
            machine: MachineConfiguration {
                cpu_template: None,
                smt: Some(false),
                mem_size_mib: 128,
                track_dirty_pages: Some(false),
                vcpu_count: 1,
                huge_pages: Some(HugePages::None),
            },
            logger: None,
            metrics: None,
            network_interfaces: Vec::new(),
            vsock: None,
            configured: false,
            pending_boot: None,
        }
    }

    /// The current lifecycle state, as `GET /` reports it.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// Checks that `action` is legal in the current state, then applies it.
    ///
    /// # Errors
    /// The action is not legal now, or its body fails validation; nothing
    /// was changed.
    pub fn handle(&mut self, action: VmmAction) -> Result<Outcome, VmmError> {
        let booted = self.state != InstanceState::NotStarted;
        match (action.phase(), booted) {
            (Phase::PreBoot, true) => return Err(VmmError::NotSupportedAfterBoot),
            (Phase::PostBoot, false) => return Err(VmmError::NotSupportedBeforeBoot),
            _ => {}
        }
        if matches!(
            action,
            VmmAction::PutBootSource(_)
                | VmmAction::PutDrive(_)
                | VmmAction::PutMachineConfiguration(_)
                | VmmAction::PatchMachineConfiguration(_)
                | VmmAction::PutNetworkInterface(_)
                | VmmAction::PutVsock(_)
        ) {
            // Set even when the request is refused below: the real VMM
            // decides on the request kind.
            self.configured = true;
        }
        match action {
            VmmAction::GetInstanceInfo => Ok(Outcome::json(&InstanceInfo {
                app_name: "Firecracker".to_owned(),
                id: self.instance_id.clone(),
                state: self.state,
                vmm_version: FIRECRACKER_VERSION.to_owned(),
            })),
            VmmAction::GetVersion => Ok(Outcome::json(&FirecrackerVersion {
                firecracker_version: FIRECRACKER_VERSION.to_owned(),
            })),
            VmmAction::GetMachineConfiguration => Ok(Outcome::json(&self.machine)),
            VmmAction::GetFullVmConfiguration => Ok(Outcome::json(&self.full_configuration())),
            VmmAction::Action(ActionType::InstanceStart) => self.start(),
            VmmAction::Action(ActionType::SendCtrlAltDel) => Ok(Outcome {
                body: None,
                effect: Some(Effect::CtrlAltDel),
            }),
            VmmAction::Action(ActionType::FlushMetrics) => self.flush_metrics(),
            VmmAction::PutBootSource(boot_source) => self.put_boot_source(boot_source),
            VmmAction::PutDrive(drive) => self.put_drive(drive),
            VmmAction::PutMachineConfiguration(config) => self.put_machine_configuration(config),
            VmmAction::PatchMachineConfiguration(update) => {
                self.patch_machine_configuration(&update)
            }
            VmmAction::PutLogger(logger) => self.put_logger(logger),
            VmmAction::PutMetrics(metrics) => self.put_metrics(metrics),
            VmmAction::PutNetworkInterface(interface) => self.put_network_interface(interface),
            VmmAction::PutVsock(vsock) => self.put_vsock(vsock),
            VmmAction::PatchVm(vm) => {
                self.state = match vm.state {
                    VmState::Paused => InstanceState::Paused,
                    VmState::Resumed => InstanceState::Running,
                };
                self.log(&format!("microVM state set to {}", self.state));
                let effect = if self.state == InstanceState::Running {
                    self.pending_boot.take().map(Effect::Booted)
                } else {
                    None
                };
                Ok(Outcome { body: None, effect })
            }
            VmmAction::CreateSnapshot(params) => self.create_snapshot(&params),
            VmmAction::LoadSnapshot(params) => self.load_snapshot(params),
        }
    }

    fn start(&mut self) -> Result<Outcome, VmmError> {
        let boot_source = self
            .boot_source
            .as_ref()
            .ok_or(VmmError::MissingKernelConfig)?;
        let boot = Boot {
            kernel_image_path: boot_source.kernel_image_path.clone(),
            boot_args: boot_source.boot_args.clone(),
            vsock_listener: self
                .vsock
                .as_mut()
                .and_then(|device| device.listener.take()),
        };
        self.state = InstanceState::Running;
        self.log("Successfully started microvm");
        Ok(Outcome {
            body: None,
            effect: Some(Effect::Booted(boot)),
        })
    }

    fn flush_metrics(&mut self) -> Result<Outcome, VmmError> {
        let state = self.state;
        let instance_id = self.instance_id.clone();
        // Flushing without a metrics sink is a no-op for the real VMM too.
        let Some(sink) = self.metrics.as_mut() else {
            return Ok(Outcome::empty());
        };
        sink.flush_count += 1;
        let mut line = serde_json::json!({
            "utc_timestamp_ms": SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis()),
            "vmm": { "state": state.to_string() },
            "fake_firecracker": { "flush_count": sink.flush_count },
        });
        if sink.config.emit_id == Some(true) {
            line["id"] = serde_json::Value::String(instance_id);
        }
        if let Some(properties) = &sink.config.properties {
            line["properties"] = serde_json::json!(properties);
        }
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        sink.file
            .write_all(&bytes)
            .map_err(|source| VmmError::WriteMetrics {
                path: PathBuf::from(&sink.config.metrics_path),
                source,
            })?;
        Ok(Outcome::empty())
    }

    fn put_boot_source(&mut self, boot_source: BootSource) -> Result<Outcome, VmmError> {
        let kernel = Path::new(&boot_source.kernel_image_path);
        File::open(super::host_path(kernel)).map_err(|source| VmmError::OpenKernel {
            path: kernel.to_owned(),
            source,
        })?;
        if let Some(initrd) = &boot_source.initrd_path {
            File::open(super::host_path(initrd)).map_err(|source| VmmError::OpenInitrd {
                path: PathBuf::from(initrd),
                source,
            })?;
        }
        if let Some(boot_args) = &boot_source.boot_args {
            validate_boot_args(boot_args)?;
        }
        self.boot_source = Some(boot_source);
        Ok(Outcome::empty())
    }

    fn put_drive(&mut self, drive: Drive) -> Result<Outcome, VmmError> {
        validate_drive_kind(&drive)?;
        if drive.is_root_device
            && self
                .drives
                .iter()
                .any(|other| other.is_root_device && other.drive_id != drive.drive_id)
        {
            return Err(VmmError::RootDeviceExists);
        }
        if let Some(path_on_host) = &drive.path_on_host {
            let read_only = drive.is_read_only == Some(true);
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(super::host_path(path_on_host))
                .map_err(|source| VmmError::OpenDrive {
                    path: PathBuf::from(path_on_host),
                    source,
                })?;
        }
        if let Some(socket) = &drive.socket {
            if !super::host_path(socket).exists() {
                return Err(VmmError::MissingVhostUserSocket {
                    path: PathBuf::from(socket),
                });
            }
        }
        match self
            .drives
            .iter_mut()
            .find(|existing| existing.drive_id == drive.drive_id)
        {
            Some(existing) => *existing = drive,
            None => self.drives.push(drive),
        }
        Ok(Outcome::empty())
    }

    fn put_machine_configuration(
        &mut self,
        config: MachineConfiguration,
    ) -> Result<Outcome, VmmError> {
        // Omitted optional fields reset to their defaults (yaml, PUT).
        let config = MachineConfiguration {
            smt: Some(config.smt.unwrap_or(false)),
            track_dirty_pages: Some(config.track_dirty_pages.unwrap_or(false)),
            huge_pages: Some(config.huge_pages.unwrap_or(HugePages::None)),
            ..config
        };
        validate_machine_configuration(&config)?;
        self.machine = config;
        Ok(Outcome::empty())
    }

    fn patch_machine_configuration(
        &mut self,
        update: &MachineConfigurationUpdate,
    ) -> Result<Outcome, VmmError> {
        let current = &self.machine;
        let config = MachineConfiguration {
            cpu_template: update.cpu_template.or(current.cpu_template),
            smt: update.smt.or(current.smt),
            mem_size_mib: update.mem_size_mib.unwrap_or(current.mem_size_mib),
            track_dirty_pages: update.track_dirty_pages.or(current.track_dirty_pages),
            vcpu_count: update.vcpu_count.unwrap_or(current.vcpu_count),
            huge_pages: update.huge_pages.or(current.huge_pages),
        };
        validate_machine_configuration(&config)?;
        self.machine = config;
        Ok(Outcome::empty())
    }

    fn put_logger(&mut self, config: Logger) -> Result<Outcome, VmmError> {
        if self.logger.is_some() {
            return Err(VmmError::LoggerAlreadyInitialized);
        }
        let file = match &config.log_path {
            Some(path) => Some(open_append(path).map_err(|source| VmmError::OpenLogFile {
                path: PathBuf::from(path),
                source,
            })?),
            None => None,
        };
        self.logger = Some(LoggerSink { config, file });
        self.log(&format!(
            "Running Firecracker v{FIRECRACKER_VERSION} (fake-firecracker)"
        ));
        Ok(Outcome::empty())
    }

    fn put_metrics(&mut self, config: Metrics) -> Result<Outcome, VmmError> {
        if self.metrics.is_some() {
            return Err(VmmError::MetricsAlreadyInitialized);
        }
        let file =
            open_append(&config.metrics_path).map_err(|source| VmmError::OpenMetricsFile {
                path: PathBuf::from(&config.metrics_path),
                source,
            })?;
        self.metrics = Some(MetricsSink {
            config,
            file,
            flush_count: 0,
        });
        Ok(Outcome::empty())
    }

    fn put_network_interface(&mut self, interface: NetworkInterface) -> Result<Outcome, VmmError> {
        let name = &interface.host_dev_name;
        if name.is_empty() || name.len() > MAX_HOST_DEV_NAME_LEN {
            return Err(VmmError::InvalidHostDevName { name: name.clone() });
        }
        if let Some(mac) = &interface.guest_mac {
            if !is_valid_mac(mac) {
                return Err(VmmError::InvalidGuestMac { mac: mac.clone() });
            }
        }
        if let Some(mtu) = interface.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(VmmError::InvalidMtu { mtu });
            }
        }
        let others = self
            .network_interfaces
            .iter()
            .filter(|other| other.iface_id != interface.iface_id);
        for other in others {
            if other.host_dev_name == interface.host_dev_name {
                return Err(VmmError::HostDevNameInUse { name: name.clone() });
            }
            if let (Some(mac), Some(other_mac)) = (&interface.guest_mac, &other.guest_mac) {
                if mac.eq_ignore_ascii_case(other_mac) {
                    return Err(VmmError::GuestMacInUse { mac: mac.clone() });
                }
            }
        }
        match self
            .network_interfaces
            .iter_mut()
            .find(|existing| existing.iface_id == interface.iface_id)
        {
            Some(existing) => *existing = interface,
            None => self.network_interfaces.push(interface),
        }
        Ok(Outcome::empty())
    }

    fn put_vsock(&mut self, config: Vsock) -> Result<Outcome, VmmError> {
        if config.guest_cid < MIN_GUEST_CID || u32::try_from(config.guest_cid).is_err() {
            return Err(VmmError::InvalidGuestCid {
                guest_cid: config.guest_cid,
            });
        }
        // Re-configuring on the same path releases the old socket first, or
        // the new bind would find the path taken by ourselves.
        let same_path = self
            .vsock
            .as_ref()
            .is_some_and(|device| device.config.uds_path == config.uds_path);
        if same_path {
            self.release_vsock();
        }
        let listener = bind_vsock(&config.uds_path)?;
        self.release_vsock();
        self.vsock = Some(VsockDevice {
            config,
            listener: Some(listener),
        });
        Ok(Outcome::empty())
    }

    /// Drops the vsock device being replaced and removes the socket it bound.
    fn release_vsock(&mut self) {
        if let Some(device) = self.vsock.take() {
            drop(device.listener);
            // Best effort: the path may already be gone; nothing to undo.
            let _ = std::fs::remove_file(super::host_path(&device.config.uds_path));
        }
    }

    fn full_configuration(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot_source.clone(),
            drives: self.drives.clone(),
            machine_config: self.machine.clone(),
            logger: self.logger.as_ref().map(|sink| sink.config.clone()),
            metrics: self.metrics.as_ref().map(|sink| sink.config.clone()),
            network_interfaces: self.network_interfaces.clone(),
            vsock: self.vsock.as_ref().map(|device| device.config.clone()),
        }
    }

    /// Appends one line to the configured log file, if any. Losing a log
    /// line must not fail an API call, as with the real logger.
    fn log(&mut self, message: &str) {
        let Some(file) = self.logger.as_mut().and_then(|sink| sink.file.as_mut()) else {
            return;
        };
        let line = format!("[{}:main] {message}\n", self.instance_id);
        let _ = file.write_all(line.as_bytes());
    }
}

fn open_append(path: &str) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(super::host_path(path))
}

fn bind_vsock(path: &str) -> Result<UnixListener, VmmError> {
    let bind_error = |source| VmmError::BindVsock {
        path: PathBuf::from(path),
        source,
    };
    let listener = UnixListener::bind(super::host_path(path)).map_err(bind_error)?;
    // Served by tokio after boot, which requires non-blocking mode.
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

/// A virtio-block drive names a backing file; a vhost-user-block drive names
/// a backend socket and omits the virtio-block fields (yaml, `Drive`).
fn validate_drive_kind(drive: &Drive) -> Result<(), VmmError> {
    let drive_id = || drive.drive_id.clone();
    if drive.socket.is_some() {
        let given = [
            ("path_on_host", drive.path_on_host.is_some()),
            ("is_read_only", drive.is_read_only.is_some()),
            ("rate_limiter", drive.rate_limiter.is_some()),
            ("io_engine", drive.io_engine.is_some()),
        ];
        if let Some((field, _)) = given.iter().find(|(_, present)| *present) {
            return Err(VmmError::VhostUserFieldGiven {
                drive_id: drive_id(),
                field,
            });
        }
        return Ok(());
    }
    if drive.path_on_host.is_none() {
        return Err(VmmError::DriveMissingPath {
            drive_id: drive_id(),
        });
    }
    if drive.is_read_only.is_none() {
        return Err(VmmError::DriveMissingReadOnly {
            drive_id: drive_id(),
        });
    }
    Ok(())
}

fn validate_machine_configuration(config: &MachineConfiguration) -> Result<(), VmmError> {
    let vcpu_count = config.vcpu_count;
    let smt = config.smt == Some(true);
    if vcpu_count == 0
        || vcpu_count > MAX_VCPU_COUNT
        || (smt && vcpu_count > 1 && vcpu_count % 2 == 1)
    {
        return Err(VmmError::InvalidVcpuCount { vcpu_count });
    }
    if config.mem_size_mib == 0 {
        return Err(VmmError::InvalidMemorySize);
    }
    if config.huge_pages == Some(HugePages::Hugetlbfs2M) && !config.mem_size_mib.is_multiple_of(2) {
        return Err(VmmError::MemorySizeNotPageMultiple {
            mem_size_mib: config.mem_size_mib,
        });
    }
    Ok(())
}

/// The kernel command line must be printable ASCII and fit the `x86_64` limit.
fn validate_boot_args(boot_args: &str) -> Result<(), VmmError> {
    if boot_args.len() > MAX_BOOT_ARGS_LEN {
        return Err(VmmError::InvalidBootArgs {
            reason: format!(
                "it is {} bytes long, the limit is {MAX_BOOT_ARGS_LEN}",
                boot_args.len()
            ),
        });
    }
    if let Some(bad) = boot_args.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(VmmError::InvalidBootArgs {
            reason: format!("character {bad:?} is not printable ASCII"),
        });
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`, hex digits in either case.
fn is_valid_mac(mac: &str) -> bool {
    let groups: Vec<&str> = mac.split(':').collect();
    groups.len() == 6
        && groups
            .iter()
            .all(|group| group.len() == 2 && group.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_firecracker::models::CacheType;

    struct Fixture {
        dir: tempfile::TempDir,
        vmm: Vmm,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
            std::fs::write(dir.path().join("rootfs.ext4"), b"rootfs").unwrap();
            Self {
                dir,
                vmm: Vmm::new("test-vm"),
            }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).to_str().unwrap().to_owned()
        }

        fn boot_source(&self) -> VmmAction {
            VmmAction::PutBootSource(BootSource {
                boot_args: Some("console=ttyS0 reboot=k panic=1".to_owned()),
                initrd_path: None,
                kernel_image_path: self.path("vmlinux"),
            })
        }

        fn drive(&self, id: &str, root: bool) -> Drive {
            Drive {
                drive_id: id.to_owned(),
                partuuid: None,
                is_root_device: root,
                cache_type: Some(CacheType::Unsafe),
                is_read_only: Some(false),
                path_on_host: Some(self.path("rootfs.ext4")),
                rate_limiter: None,
                io_engine: None,
                socket: None,
            }
        }
    }

    fn message(error: &VmmError) -> String {
        error.to_string()
    }

    #[test]
    fn start_requires_a_boot_source() {
        let mut fixture = Fixture::new();
        let error = fixture
            .vmm
            .handle(VmmAction::Action(ActionType::InstanceStart))
            .unwrap_err();
        assert_eq!(
            message(&error),
            "Cannot start microvm without kernel configuration."
        );
        assert_eq!(fixture.vmm.state(), InstanceState::NotStarted);
    }

    #[test]
    fn configuration_is_refused_after_start_and_start_only_once() {
        let mut fixture = Fixture::new();
        let boot_source = fixture.boot_source();
        fixture.vmm.handle(boot_source.clone()).unwrap();
        let outcome = fixture
            .vmm
            .handle(VmmAction::Action(ActionType::InstanceStart))
            .unwrap();
        assert!(matches!(outcome.effect, Some(Effect::Booted(_))));
        assert_eq!(fixture.vmm.state(), InstanceState::Running);
        for action in [
            boot_source,
            VmmAction::PutDrive(fixture.drive("rootfs", true)),
            VmmAction::Action(ActionType::InstanceStart),
        ] {
            let error = fixture.vmm.handle(action).unwrap_err();
            assert!(matches!(error, VmmError::NotSupportedAfterBoot), "{error}");
        }
    }

    #[test]
    fn post_boot_actions_are_refused_before_start() {
        let mut fixture = Fixture::new();
        for action in [
            VmmAction::Action(ActionType::SendCtrlAltDel),
            VmmAction::Action(ActionType::FlushMetrics),
            VmmAction::PatchVm(Vm {
                state: VmState::Paused,
            }),
        ] {
            let error = fixture.vmm.handle(action).unwrap_err();
            assert!(matches!(error, VmmError::NotSupportedBeforeBoot), "{error}");
        }
    }

    #[test]
    fn pause_and_resume_change_the_reported_state() {
        let mut fixture = Fixture::new();
        let boot_source = fixture.boot_source();
        fixture.vmm.handle(boot_source).unwrap();
        fixture
            .vmm
            .handle(VmmAction::Action(ActionType::InstanceStart))
            .unwrap();
        fixture
            .vmm
            .handle(VmmAction::PatchVm(Vm {
                state: VmState::Paused,
            }))
            .unwrap();
        let info = fixture.vmm.handle(VmmAction::GetInstanceInfo).unwrap();
        assert_eq!(info.body.unwrap()["state"], "Paused");
        fixture
            .vmm
            .handle(VmmAction::PatchVm(Vm {
                state: VmState::Resumed,
            }))
            .unwrap();
        assert_eq!(fixture.vmm.state(), InstanceState::Running);
    }

    #[test]
    fn missing_kernel_is_refused_at_boot_source() {
        let mut fixture = Fixture::new();
        let error = fixture
            .vmm
            .handle(VmmAction::PutBootSource(BootSource {
                boot_args: None,
                initrd_path: None,
                kernel_image_path: fixture.path("missing"),
            }))
            .unwrap_err();
        assert!(matches!(error, VmmError::OpenKernel { .. }), "{error}");
    }

    #[test]
    fn only_one_root_drive_but_the_same_one_may_be_updated() {
        let mut fixture = Fixture::new();
        let root = fixture.drive("rootfs", true);
        fixture
            .vmm
            .handle(VmmAction::PutDrive(root.clone()))
            .unwrap();
        fixture.vmm.handle(VmmAction::PutDrive(root)).unwrap();
        let error = fixture
            .vmm
            .handle(VmmAction::PutDrive(fixture.drive("other", true)))
            .unwrap_err();
        assert_eq!(message(&error), "A root block device already exists!");
        fixture
            .vmm
            .handle(VmmAction::PutDrive(fixture.drive("data", false)))
            .unwrap();
        let config = fixture
            .vmm
            .handle(VmmAction::GetFullVmConfiguration)
            .unwrap();
        assert_eq!(config.body.unwrap()["drives"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn virtio_drive_needs_path_and_read_only() {
        let mut fixture = Fixture::new();
        let mut drive = fixture.drive("rootfs", true);
        drive.is_read_only = None;
        let error = fixture.vmm.handle(VmmAction::PutDrive(drive)).unwrap_err();
        assert!(matches!(error, VmmError::DriveMissingReadOnly { .. }));
        let mut drive = fixture.drive("rootfs", true);
        drive.path_on_host = Some(fixture.path("nope.ext4"));
        let error = fixture.vmm.handle(VmmAction::PutDrive(drive)).unwrap_err();
        assert!(matches!(error, VmmError::OpenDrive { .. }));
    }

    #[test]
    fn machine_configuration_ranges() {
        let mut fixture = Fixture::new();
        let config = |vcpu_count, mem_size_mib, smt| MachineConfiguration {
            cpu_template: None,
            smt,
            mem_size_mib,
            track_dirty_pages: None,
            vcpu_count,
            huge_pages: None,
        };
        for (vcpu_count, mem, smt) in [(0, 128, None), (33, 128, None), (3, 128, Some(true))] {
            let error = fixture
                .vmm
                .handle(VmmAction::PutMachineConfiguration(config(
                    vcpu_count, mem, smt,
                )))
                .unwrap_err();
            assert!(
                matches!(error, VmmError::InvalidVcpuCount { .. }),
                "{error}"
            );
        }
        let error = fixture
            .vmm
            .handle(VmmAction::PutMachineConfiguration(config(1, 0, None)))
            .unwrap_err();
        assert!(matches!(error, VmmError::InvalidMemorySize));
        fixture
            .vmm
            .handle(VmmAction::PutMachineConfiguration(config(32, 1024, None)))
            .unwrap();
        fixture
            .vmm
            .handle(VmmAction::PatchMachineConfiguration(
                MachineConfigurationUpdate {
                    mem_size_mib: Some(2048),
                    ..MachineConfigurationUpdate::default()
                },
            ))
            .unwrap();
        let machine = fixture
            .vmm
            .handle(VmmAction::GetMachineConfiguration)
            .unwrap();
        let machine = machine.body.unwrap();
        assert_eq!(machine["vcpu_count"], 32);
        assert_eq!(machine["mem_size_mib"], 2048);
        assert_eq!(machine["smt"], false);
    }

    #[test]
    fn network_interface_checks() {
        let mut fixture = Fixture::new();
        let interface = |id: &str, tap: &str, mac: Option<&str>| NetworkInterface {
            guest_mac: mac.map(str::to_owned),
            host_dev_name: tap.to_owned(),
            iface_id: id.to_owned(),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let error = fixture
            .vmm
            .handle(VmmAction::PutNetworkInterface(interface(
                "eth0",
                "tap0",
                Some("zz:00"),
            )))
            .unwrap_err();
        assert!(matches!(error, VmmError::InvalidGuestMac { .. }));
        let error = fixture
            .vmm
            .handle(VmmAction::PutNetworkInterface(interface(
                "eth0",
                "a-very-long-tap-name",
                None,
            )))
            .unwrap_err();
        assert!(matches!(error, VmmError::InvalidHostDevName { .. }));
        fixture
            .vmm
            .handle(VmmAction::PutNetworkInterface(interface(
                "eth0",
                "tap0",
                Some("06:00:AC:10:00:02"),
            )))
            .unwrap();
        let error = fixture
            .vmm
            .handle(VmmAction::PutNetworkInterface(interface(
                "eth1", "tap0", None,
            )))
            .unwrap_err();
        assert!(matches!(error, VmmError::HostDevNameInUse { .. }));
    }

    #[test]
    fn vsock_binds_its_socket_and_refuses_low_cids() {
        let mut fixture = Fixture::new();
        let uds_path = fixture.path("vsock.sock");
        let error = fixture
            .vmm
            .handle(VmmAction::PutVsock(Vsock {
                guest_cid: 2,
                uds_path: uds_path.clone(),
                vsock_id: None,
            }))
            .unwrap_err();
        assert!(matches!(error, VmmError::InvalidGuestCid { guest_cid: 2 }));
        let vsock = Vsock {
            guest_cid: 3,
            uds_path: uds_path.clone(),
            vsock_id: None,
        };
        fixture
            .vmm
            .handle(VmmAction::PutVsock(vsock.clone()))
            .unwrap();
        assert!(Path::new(&uds_path).exists());
        // Updating on the same path re-binds rather than failing.
        fixture.vmm.handle(VmmAction::PutVsock(vsock)).unwrap();
        // A stale socket left by someone else is refused, as by the real VMM.
        let stale = fixture.path("stale.sock");
        std::fs::write(&stale, b"").unwrap();
        let error = fixture
            .vmm
            .handle(VmmAction::PutVsock(Vsock {
                guest_cid: 3,
                uds_path: stale,
                vsock_id: None,
            }))
            .unwrap_err();
        assert!(matches!(error, VmmError::BindVsock { .. }));
    }

    #[test]
    fn metrics_once_and_flush_writes_a_json_line() {
        let mut fixture = Fixture::new();
        let metrics_path = fixture.path("metrics.json");
        let metrics = Metrics {
            metrics_path: metrics_path.clone(),
            emit_id: Some(true),
            properties: None,
        };
        fixture
            .vmm
            .handle(VmmAction::PutMetrics(metrics.clone()))
            .unwrap();
        let error = fixture
            .vmm
            .handle(VmmAction::PutMetrics(metrics))
            .unwrap_err();
        assert!(matches!(error, VmmError::MetricsAlreadyInitialized));
        let boot_source = fixture.boot_source();
        fixture.vmm.handle(boot_source).unwrap();
        fixture
            .vmm
            .handle(VmmAction::Action(ActionType::InstanceStart))
            .unwrap();
        fixture
            .vmm
            .handle(VmmAction::Action(ActionType::FlushMetrics))
            .unwrap();
        let written = std::fs::read_to_string(metrics_path).unwrap();
        let line: serde_json::Value = serde_json::from_str(written.trim_end()).unwrap();
        assert_eq!(line["id"], "test-vm");
        assert_eq!(line["vmm"]["state"], "Running");
    }

    #[test]
    fn boot_args_must_be_printable_ascii() {
        assert!(validate_boot_args("console=ttyS0 root=/dev/vda").is_ok());
        assert!(validate_boot_args("console=ttyS0\n").is_err());
        assert!(validate_boot_args(&"x".repeat(4096)).is_err());
    }
}
