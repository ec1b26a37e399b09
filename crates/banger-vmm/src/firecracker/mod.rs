//! The Firecracker backend.
//!
//! Boot protocol, as [`Firecracker`] runs it for one VM (all files live in
//! the VM's runtime directory, see [`RuntimeFiles`]):
//!
//! 1. Remove a stale API socket (and a stale vsock socket) left by an
//!    earlier run; create `firecracker.log` and `firecracker.metrics`,
//!    because Firecracker opens but does not create them.
//! 2. Spawn `<binary> --api-sock <runtime_dir>/firecracker.sock --id <vm_id>`
//!    detached from the daemon (see [`crate::process`]), stdout and stderr
//!    appended to `console.log`: the guest serial console goes there.
//! 3. Wait for the API socket to accept connections, at most
//!    [`FirecrackerConfig::startup_timeout`]. If the process exits first the
//!    error carries the tail of `console.log`, which says why.
//! 4. Configure, in this order: `PUT /logger`, `PUT /metrics`,
//!    `PUT /machine-config` (SMT off), `PUT /boot-source`,
//!    `PUT /drives/{id}` per drive, `PUT /network-interfaces/{id}` per
//!    interface, `PUT /vsock` when the VM has one.
//! 5. If any of 2–4 fails: `SIGKILL`, wait until the process is reaped,
//!    remove the API socket, return the error.
//! 6. [`Vmm::boot`]: `PUT /actions` `InstanceStart`.
//! 7. [`Vmm::stop`]: `PUT /actions` `SendCtrlAltDel`; wait up to the grace
//!    period for Firecracker to exit (it exits when the guest resets), then
//!    `SIGKILL`. If the guest cannot be asked (the API call fails while the
//!    process is still alive, e.g. on aarch64 where the action does not
//!    exist) it is killed at once, since nothing else would end it. The API
//!    socket is removed once the process is gone.
//! 8. [`Vmm::adopt`] after a daemon restart: the pid is this VM's Firecracker
//!    only if its command line carries both `--id <vm_id>` and
//!    `--api-sock <runtime_dir>/firecracker.sock` (the same path strings the
//!    spawn used).
//!
//! Jailed (the default in `bangerd`, [`FirecrackerConfig::jail`]), step 2
//! is instead:
//!
//! 2. Build the jail ([`crate::jail`]): a fresh chroot under the chroot
//!    base, the `jail` symlink in the runtime directory, the kernel, initrd,
//!    drives, log and metrics files hard-linked into it. Spawn `jailer --id
//!    <vm_id> --exec-file <binary> --uid U --gid G --chroot-base-dir B
//!    --new-pid-ns [cgroup flags] -- --api-sock /firecracker.sock` with its
//!    output appended to `console.log`. The jailer exits once Firecracker
//!    runs (as init of a new PID namespace, in a new mount namespace, as
//!    uid:gid, seccomp on); its pid is read from `<chroot>/firecracker.pid`.
//!    The daemon is a child subreaper ([`crate::process::become_subreaper`]),
//!    so the orphaned Firecracker becomes its child and its exit status is
//!    known; it is watched from then on (the jailer writes the pid before
//!    its child has exec'd Firecracker, so nothing is polled for), and once
//!    its API socket is up (step 3) its command line must be this VM's
//!    jailed Firecracker, else it is killed. Step 4 then names every file by its path inside the chroot, and
//!    the daemon reaches both sockets through `<runtime_dir>/jail/`.
//!    Whenever the process is gone (stop, kill, a failed start,
//!    [`Vmm::release`]) the chroot and the VM's cgroups are removed.
//!    [`Vmm::adopt`] of a jailed Firecracker matches `--id <vm_id>` and
//!    `--api-sock /firecracker.sock`.

pub mod client;
pub mod models;
#[cfg(test)]
mod test_server;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

pub use client::{wait_for_socket, ClientError, FirecrackerClient};
pub use models::ParseLogLevelError;
use models::{
    BootSource, Drive, LogLevel, Logger, MachineConfiguration, MemoryBackend, MemoryBackendType,
    Metrics, NetworkInterface, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VmState, Vsock, VsockOverride,
};

use crate::jail::{self, JailConfig, JailPaths};
use crate::process::{self, has_flag_value, read_log_tail};
use crate::{
    Backend, ControlError, ExitStatusInfo, LaunchSpec, SnapshotInfo, StopOutcome, Vmm, VmmError,
    VmmHandle, CONSOLE_LOG_FILE, SNAPSHOT_MEMORY_FILE, SNAPSHOT_STATE_FILE,
};

/// This backend, as [`Vmm::backend`] reports it.
pub const BACKEND: Backend = Backend::Firecracker;
/// File names inside a VM's runtime directory.
pub const API_SOCKET_FILE: &str = "firecracker.sock";
pub const LOG_FILE: &str = "firecracker.log";
pub const METRICS_FILE: &str = "firecracker.metrics";
/// The API socket as a jailed Firecracker sees it.
pub const JAILED_API_SOCKET: &str = "/firecracker.sock";

/// Lines of `console.log` quoted when Firecracker dies during startup.
const CONSOLE_TAIL_LINES: usize = 20;
/// After a failed API call, how long to give the exit watcher to report a
/// process that died, before concluding it is alive.
const EXIT_SETTLE_TIME: Duration = Duration::from_millis(100);

/// How banger runs Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerConfig {
    /// The `firecracker` executable; a bare name is looked up in `PATH`.
    pub binary: PathBuf,
    /// Timeout of each API request.
    pub api_timeout: Duration,
    /// How long Firecracker may take to open its API socket.
    pub startup_timeout: Duration,
    /// Firecracker's own log level (`Error`, `Warning`, `Info`, `Debug`,
    /// `Trace`, `Off`; any letter case).
    pub log_level: String,
    /// Run Firecracker under its jailer; `None` runs it directly, as the
    /// daemon's user.
    pub jail: Option<JailConfig>,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("firecracker"),
            api_timeout: FirecrackerClient::DEFAULT_TIMEOUT,
            startup_timeout: Duration::from_secs(5),
            log_level: LogLevel::Warning.to_string(),
            jail: None,
        }
    }
}

/// The files Firecracker uses in a VM's runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeFiles {
    pub api_socket: PathBuf,
    pub console_log: PathBuf,
    pub log: PathBuf,
    pub metrics: PathBuf,
}

impl RuntimeFiles {
    #[must_use]
    pub fn new(runtime_dir: &Path) -> Self {
        Self {
            api_socket: runtime_dir.join(API_SOCKET_FILE),
            console_log: runtime_dir.join(CONSOLE_LOG_FILE),
            log: runtime_dir.join(LOG_FILE),
            metrics: runtime_dir.join(METRICS_FILE),
        }
    }

    /// The files of a jailed Firecracker: the API socket is in the chroot,
    /// reached through the runtime directory's `jail` link.
    #[must_use]
    pub fn jailed(runtime_dir: &Path) -> Self {
        Self {
            api_socket: runtime_dir.join(jail::JAIL_LINK).join(API_SOCKET_FILE),
            ..Self::new(runtime_dir)
        }
    }
}

/// The paths Firecracker is given in its configuration: the host's, or the
/// chroot's when jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VmmPaths {
    log: PathBuf,
    metrics: PathBuf,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    drives: Vec<PathBuf>,
    vsock: Option<PathBuf>,
}

impl VmmPaths {
    fn unjailed(spec: &LaunchSpec, files: &RuntimeFiles) -> Self {
        Self {
            log: files.log.clone(),
            metrics: files.metrics.clone(),
            kernel: spec.kernel_path.clone(),
            initrd: spec.initrd_path.clone(),
            drives: spec.drives.iter().map(|drive| drive.path.clone()).collect(),
            vsock: spec.vsock.as_ref().map(|vsock| vsock.uds_path.clone()),
        }
    }
}

/// The Firecracker [`Vmm`] backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    config: FirecrackerConfig,
    log_level: LogLevel,
}

impl Firecracker {
    /// # Errors
    /// When `config.log_level` is not a Firecracker log level.
    pub fn new(config: FirecrackerConfig) -> Result<Self, ParseLogLevelError> {
        let log_level = config.log_level.parse()?;
        if config.jail.is_some() {
            // A jailed Firecracker is the jailer's child; this makes it ours
            // once the jailer exits, so its exit status is known.
            if let Err(error) = process::become_subreaper() {
                tracing::warn!(%error, "could not become a child subreaper; exit statuses of jailed VMMs will be unknown");
            }
        }
        Ok(Self { config, log_level })
    }

    /// The runtime files of a VM, jailed or not as configured.
    #[must_use]
    pub fn runtime_files(&self, runtime_dir: &Path) -> RuntimeFiles {
        if self.config.jail.is_some() {
            RuntimeFiles::jailed(runtime_dir)
        } else {
            RuntimeFiles::new(runtime_dir)
        }
    }

    #[must_use]
    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// An API client for the VM behind `handle`, with the configured
    /// request timeout.
    #[must_use]
    pub fn client(&self, handle: &VmmHandle) -> FirecrackerClient {
        self.client_for(handle.api_socket())
    }

    fn client_for(&self, socket: &Path) -> FirecrackerClient {
        FirecrackerClient::new(socket).with_timeout(self.config.api_timeout)
    }

    /// Step 1 of the boot protocol.
    fn prepare_runtime_files(spec: &LaunchSpec, files: &RuntimeFiles) -> Result<(), VmmError> {
        let prepare_error = |path: &Path| {
            let vm_name = spec.vm_name.clone();
            let path = path.to_owned();
            move |source| VmmError::PrepareRuntimeFile {
                vm_name,
                path,
                source,
            }
        };
        remove_file_if_exists(&files.api_socket).map_err(prepare_error(&files.api_socket))?;
        if let Some(vsock) = &spec.vsock {
            remove_file_if_exists(&vsock.uds_path).map_err(prepare_error(&vsock.uds_path))?;
        }
        for path in [&files.log, &files.metrics] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(prepare_error(path))?;
        }
        Ok(())
    }

    /// Step 3: the socket becoming ready, the process exiting, or the
    /// timeout, whichever comes first; jailed, then the process is checked
    /// to be Firecracker.
    async fn wait_until_ready(
        &self,
        spec: &LaunchSpec,
        files: &RuntimeFiles,
        handle: &VmmHandle,
    ) -> Result<(), VmmError> {
        let ready = tokio::select! {
            ready = wait_for_socket(&files.api_socket, self.config.startup_timeout) => {
                ready.map_err(|source| VmmError::WaitForApi {
                    backend: BACKEND,
                    vm_name: spec.vm_name.clone(),
                    source: source.into(),
                })
            }
            status = handle.wait_exit() => Err(exited_during_startup(spec, files, status)),
        };
        if ready.is_ok() && self.config.jail.is_some() {
            return Self::confirm_jailed(spec, handle);
        }
        ready
    }

    /// Step 4.
    async fn configure(
        &self,
        spec: &LaunchSpec,
        files: &RuntimeFiles,
        paths: &VmmPaths,
    ) -> Result<(), ClientError> {
        let client = self.client_for(&files.api_socket);
        self.configure_sinks(&client, paths).await?;
        client
            .put_machine_config(&MachineConfiguration {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
                smt: Some(false),
                track_dirty_pages: None,
                cpu_template: None,
                huge_pages: None,
            })
            .await?;
        client
            .put_boot_source(&BootSource {
                kernel_image_path: paths.kernel.clone(),
                boot_args: Some(spec.kernel_cmdline.clone()),
                initrd_path: paths.initrd.clone(),
            })
            .await?;
        let root_index = spec.drives.iter().position(|drive| drive.is_root);
        for (index, drive) in spec.drives.iter().enumerate() {
            client
                .put_drive(&Drive {
                    drive_id: drive.id.clone(),
                    is_root_device: Some(index) == root_index,
                    is_read_only: Some(drive.read_only),
                    path_on_host: paths.drives.get(index).cloned(),
                    ..Drive::default()
                })
                .await?;
        }
        for interface in &spec.network_interfaces {
            client
                .put_network_interface(&NetworkInterface {
                    iface_id: interface.id.clone(),
                    host_dev_name: interface.tap.clone(),
                    guest_mac: Some(interface.mac.clone()),
                    ..NetworkInterface::default()
                })
                .await?;
        }
        if let (Some(vsock), Some(uds_path)) = (&spec.vsock, &paths.vsock) {
            client
                .put_vsock(&Vsock {
                    guest_cid: vsock.guest_cid,
                    uds_path: uds_path.clone(),
                    vsock_id: None,
                })
                .await?;
        }
        Ok(())
    }

    /// The logger and metrics: the only configuration a snapshot load
    /// accepts before it.
    async fn configure_sinks(
        &self,
        client: &FirecrackerClient,
        paths: &VmmPaths,
    ) -> Result<(), ClientError> {
        client
            .put_logger(&Logger {
                level: Some(self.log_level),
                log_path: Some(paths.log.clone()),
                show_level: Some(true),
                show_log_origin: Some(false),
                module: None,
            })
            .await?;
        client
            .put_metrics(&Metrics {
                metrics_path: paths.metrics.clone(),
                emit_id: None,
                properties: None,
            })
            .await
    }

    /// Restore after the spawn: the logger and metrics, the version check,
    /// the snapshot files linked into the jail, `PUT /snapshot/load`.
    async fn load(
        &self,
        spec: &LaunchSpec,
        jail: &JailConfig,
        files: &RuntimeFiles,
        paths: &VmmPaths,
        snapshot: &SnapshotInfo,
    ) -> Result<(), VmmError> {
        let control = |source: ClientError| VmmError::Control {
            vm_id: spec.vm_id.clone(),
            operation: "restore",
            source: source.into(),
        };
        let client = self.client_for(&files.api_socket);
        self.configure_sinks(&client, paths)
            .await
            .map_err(control)?;
        let version = client
            .describe_instance()
            .await
            .map_err(control)?
            .vmm_version;
        snapshot.check_restorable_by(BACKEND, Some(&version))?;
        let jail_paths =
            jail::jail_of(&jail.chroot_base, &spec.runtime_dir).ok_or_else(|| VmmError::Jail {
                vm_name: spec.vm_name.clone(),
                source: jail::JailError::Prepare {
                    path: spec.runtime_dir.join(jail::JAIL_LINK),
                    source: io::Error::from(io::ErrorKind::NotFound),
                },
            })?;
        let link = |host: &Path, name: &str| {
            jail::link_read_only_for_vmm(jail, &jail_paths, host, name).map_err(|source| {
                VmmError::Jail {
                    vm_name: spec.vm_name.clone(),
                    source,
                }
            })
        };
        let state = link(&snapshot.state_path, SNAPSHOT_STATE_FILE)?;
        let memory = link(&snapshot.memory_path, SNAPSHOT_MEMORY_FILE)?;
        let network_overrides = spec
            .network_interfaces
            .iter()
            .map(|interface| NetworkOverride {
                iface_id: interface.id.clone(),
                host_dev_name: interface.tap.clone(),
            })
            .collect::<Vec<_>>();
        client
            .load_snapshot(&SnapshotLoadParams {
                snapshot_path: state,
                mem_backend: Some(MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: memory,
                }),
                track_dirty_pages: None,
                resume_vm: Some(true),
                network_overrides: (!network_overrides.is_empty()).then_some(network_overrides),
                vsock_override: paths
                    .vsock
                    .clone()
                    .map(|uds_path| VsockOverride { uds_path }),
            })
            .await
            .map_err(control)
    }

    /// Step 5: nothing may be left running when spawn fails.
    async fn abandon(&self, handle: &VmmHandle) {
        if let Err(error) = handle.process().kill().await {
            tracing::error!(
                vm_id = handle.vm_id(),
                pid = handle.pid(),
                error = %error,
                "could not kill Firecracker after a failed start"
            );
        }
        self.gone(handle.vm_id(), handle.runtime_dir());
    }

    /// Cleans up after a Firecracker that is gone: its API socket, and its
    /// jail and cgroups when it was jailed.
    fn gone(&self, vm_id: &str, runtime_dir: &Path) {
        for api_socket in [
            RuntimeFiles::new(runtime_dir).api_socket,
            RuntimeFiles::jailed(runtime_dir).api_socket,
        ] {
            if let Err(error) = remove_file_if_exists(&api_socket) {
                if error.raw_os_error() != Some(libc::ENOENT)
                    && error.raw_os_error() != Some(libc::ENOTDIR)
                {
                    tracing::warn!(vm_id, path = %api_socket.display(), %error, "could not remove the Firecracker API socket");
                }
            }
        }
        let Some(jail) = &self.config.jail else {
            return;
        };
        if let Some(paths) = jail::jail_of(&jail.chroot_base, runtime_dir) {
            if let Err(error) = jail::remove_jail(&paths, jail.cgroups.as_ref(), vm_id) {
                tracing::warn!(vm_id, error = %banger_proto::error_chain(&error), "could not remove the jail of a VMM that is gone");
            }
        }
    }

    /// Step 2 jailed: builds the jail, runs the jailer, and finds the
    /// Firecracker it started. On error nothing is left running and the jail
    /// is removed.
    async fn spawn_jailed(
        &self,
        spec: &LaunchSpec,
        jail: &JailConfig,
        files: &RuntimeFiles,
    ) -> Result<(VmmHandle, VmmPaths), VmmError> {
        let jail_error = |source| VmmError::Jail {
            vm_name: spec.vm_name.clone(),
            source,
        };
        let binary = jail::find_executable(&self.config.binary).ok_or_else(|| {
            jail_error(jail::JailError::BinaryNotFound {
                binary: self.config.binary.clone(),
            })
        })?;
        let jailer = jail::find_executable(&jail.jailer).ok_or_else(|| {
            jail_error(jail::JailError::JailerNotFound {
                jailer: jail.jailer.clone(),
            })
        })?;
        let exec_file_name = binary.file_name().unwrap_or_default().to_owned();
        let paths = JailPaths::new(
            &jail.chroot_base,
            &exec_file_name,
            &spec.vm_id,
            &spec.runtime_dir,
        );
        let vmm_paths = match Self::fill_jail(spec, jail, files, &paths) {
            Ok(vmm_paths) => vmm_paths,
            Err(error) => {
                self.gone(&spec.vm_id, &spec.runtime_dir);
                return Err(jail_error(error));
            }
        };

        let mut args: Vec<std::ffi::OsString> = vec![
            "--id".into(),
            spec.vm_id.clone().into(),
            "--exec-file".into(),
            binary.clone().into(),
            "--uid".into(),
            jail.uid.to_string().into(),
            "--gid".into(),
            jail.gid.to_string().into(),
            "--chroot-base-dir".into(),
            jail.chroot_base.clone().into(),
            "--new-pid-ns".into(),
        ];
        if let Some(cgroups) = &jail.cgroups {
            args.extend(
                cgroups
                    .jailer_args(spec.vcpus, spec.memory_mib)
                    .into_iter()
                    .map(Into::into),
            );
        }
        args.extend(["--".into(), "--api-sock".into(), JAILED_API_SOCKET.into()]);
        let jailer_process =
            process::spawn(&jailer, &args, &files.console_log).map_err(|source| {
                self.gone(&spec.vm_id, &spec.runtime_dir);
                VmmError::SpawnProcess {
                    backend: BACKEND,
                    vm_name: spec.vm_name.clone(),
                    source,
                }
            })?;
        // The jailer exits as soon as Firecracker runs in its namespace.
        let status =
            match tokio::time::timeout(self.config.startup_timeout, jailer_process.wait_exit())
                .await
            {
                Ok(status) => status,
                Err(_) => {
                    let status = jailer_process
                        .kill()
                        .await
                        .unwrap_or(ExitStatusInfo::Unknown);
                    self.gone(&spec.vm_id, &spec.runtime_dir);
                    return Err(exited_during_startup(spec, files, status));
                }
            };
        let pid_file = paths
            .root
            .join(format!("{}.pid", exec_file_name.to_string_lossy()));
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        let process = match (status.code(), pid) {
            (Some(0), Some(pid)) => Self::attach_jailed(pid, &spec.vm_id).ok_or(pid),
            _ => Err(0),
        };
        let process = match process {
            Ok(process) => process,
            Err(pid) => {
                // Firecracker died at once: reap it if it became our child.
                let status = if pid == 0 {
                    status
                } else {
                    process::kill_and_reap_if_child(pid).unwrap_or(status)
                };
                self.gone(&spec.vm_id, &spec.runtime_dir);
                return Err(exited_during_startup(spec, files, status));
            }
        };
        let handle = VmmHandle::new(
            BACKEND,
            spec.vm_id.clone(),
            spec.runtime_dir.clone(),
            files.api_socket.clone(),
            process,
        );
        Ok((handle, vmm_paths))
    }

    /// Attaches to the process the jailer started as `pid`, whatever it
    /// runs yet: the jailer writes the pid before its child has exec'd
    /// Firecracker. The process is our child (we are its subreaper) or the
    /// jailer's, so its pid is not reused meanwhile; that it runs this VM's
    /// Firecracker is checked once its API socket is up
    /// ([`Self::confirm_jailed`]), which only Firecracker makes.
    fn attach_jailed(pid: u32, vm_id: &str) -> Option<process::ProcessHandle> {
        match process::adopt_descendant(pid) {
            Ok(process) => process,
            Err(error) => {
                tracing::warn!(pid, vm_id, %error, "could not attach to the jailed Firecracker");
                None
            }
        }
    }

    /// Checks that the process behind `handle` is the jailed Firecracker of
    /// the VM (its command line), once its API socket is up.
    fn confirm_jailed(spec: &LaunchSpec, handle: &VmmHandle) -> Result<(), VmmError> {
        let command_line =
            process::read_command_line(handle.pid()).map_err(|source| VmmError::AdoptProcess {
                vm_id: spec.vm_id.clone(),
                pid: handle.pid(),
                source,
            })?;
        if command_line.is_some_and(|args| is_jailed_firecracker(&args, &spec.vm_id)) {
            return Ok(());
        }
        Err(VmmError::NotJailedFirecracker {
            vm_name: spec.vm_name.clone(),
            pid: handle.pid(),
        })
    }

    /// Links everything Firecracker opens into the jail.
    fn fill_jail(
        spec: &LaunchSpec,
        jail: &JailConfig,
        files: &RuntimeFiles,
        paths: &JailPaths,
    ) -> Result<VmmPaths, jail::JailError> {
        jail::create_jail(paths)?;
        let log = jail::link_into(jail, paths, &files.log, LOG_FILE, true)?;
        let metrics = jail::link_into(jail, paths, &files.metrics, METRICS_FILE, true)?;
        let kernel = jail::link_into(jail, paths, &spec.kernel_path, "vmlinux", false)?;
        let initrd = spec
            .initrd_path
            .as_ref()
            .map(|initrd| jail::link_into(jail, paths, initrd, "initrd", false))
            .transpose()?;
        let drives = spec
            .drives
            .iter()
            .map(|drive| {
                jail::link_into(
                    jail,
                    paths,
                    &drive.path,
                    &format!("drive-{}", drive.id),
                    !drive.read_only,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        for interface in &spec.network_interfaces {
            // A tap made for the VMM user needs nothing; else it is given to
            // it. If that fails, Firecracker's own refusal to open the tap
            // will say so at `PUT /network-interfaces`.
            if !jail::tap_owned_by(&interface.tap, jail.uid) {
                if let Err(error) = jail::set_tap_owner(&interface.tap, jail.uid, jail.gid) {
                    tracing::warn!(
                        vm_id = spec.vm_id,
                        tap = interface.tap,
                        error = %banger_proto::error_chain(&error),
                        "could not give the tap to the VMM user"
                    );
                }
            }
        }
        let vsock = spec.vsock.as_ref().map(|vsock| {
            paths
                .inside(&vsock.uds_path)
                .unwrap_or_else(|| Path::new("/").join(crate::VSOCK_SOCKET_FILE))
        });
        Ok(VmmPaths {
            log,
            metrics,
            kernel,
            initrd,
            drives,
            vsock,
        })
    }
}

/// Whether `args` is the command line of the jailed Firecracker of `vm_id`.
fn is_jailed_firecracker(args: &[std::ffi::OsString], vm_id: &str) -> bool {
    has_flag_value(args, "--id", OsStr::new(vm_id))
        && has_flag_value(args, "--api-sock", OsStr::new(JAILED_API_SOCKET))
}

#[async_trait]
impl Vmm for Firecracker {
    fn backend(&self) -> Backend {
        BACKEND
    }

    fn agent_endpoint(
        &self,
        runtime_dir: &Path,
    ) -> (crate::AgentEndpoint, Option<crate::VsockSpec>) {
        let uds_path = if self.config.jail.is_some() {
            runtime_dir
                .join(jail::JAIL_LINK)
                .join(crate::VSOCK_SOCKET_FILE)
        } else {
            runtime_dir.join(crate::VSOCK_SOCKET_FILE)
        };
        (
            crate::AgentEndpoint::FirecrackerVsock {
                uds_path: uds_path.clone(),
                port: banger_proto::agent::DEFAULT_VSOCK_PORT,
            },
            Some(crate::VsockSpec {
                guest_cid: crate::GUEST_CID,
                uds_path,
            }),
        )
    }

    async fn spawn(&self, spec: &LaunchSpec) -> Result<VmmHandle, VmmError> {
        let files = self.runtime_files(&spec.runtime_dir);
        Self::prepare_runtime_files(spec, &files)?;

        let (handle, paths) = if let Some(jail) = &self.config.jail {
            self.spawn_jailed(spec, jail, &files).await?
        } else {
            let args = [
                OsStr::new("--api-sock"),
                files.api_socket.as_os_str(),
                OsStr::new("--id"),
                OsStr::new(&spec.vm_id),
            ];
            let process = process::spawn(&self.config.binary, args, &files.console_log).map_err(
                |source| VmmError::SpawnProcess {
                    backend: BACKEND,
                    vm_name: spec.vm_name.clone(),
                    source,
                },
            )?;
            let handle = VmmHandle::new(
                BACKEND,
                spec.vm_id.clone(),
                spec.runtime_dir.clone(),
                files.api_socket.clone(),
                process,
            );
            (handle, VmmPaths::unjailed(spec, &files))
        };
        tracing::debug!(
            vm_id = spec.vm_id,
            pid = handle.pid(),
            jailed = self.config.jail.is_some(),
            "spawned firecracker"
        );

        if let Err(error) = self.wait_until_ready(spec, &files, &handle).await {
            self.abandon(&handle).await;
            return Err(error);
        }
        if let Err(source) = self.configure(spec, &files, &paths).await {
            // A refusal leaves Firecracker running; any other failure may
            // mean it died, and then its console says why.
            let exited = tokio::time::timeout(EXIT_SETTLE_TIME, handle.wait_exit()).await;
            self.abandon(&handle).await;
            return Err(match exited {
                Ok(status) => exited_during_startup(spec, &files, status),
                Err(_) => VmmError::ConfigureVm {
                    vm_name: spec.vm_name.clone(),
                    source: source.into(),
                },
            });
        }
        Ok(handle)
    }

    async fn boot(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.client(handle)
            .instance_start()
            .await
            .map_err(|source| VmmError::BootVm {
                vm_id: handle.vm_id().to_owned(),
                source: source.into(),
            })
    }

    async fn stop(&self, handle: &VmmHandle, grace: Duration) -> Result<StopOutcome, VmmError> {
        let outcome = if let Some(status) = handle.exit_status() {
            StopOutcome::Graceful { status }
        } else {
            match self.client(handle).send_ctrl_alt_del().await {
                Ok(()) => match tokio::time::timeout(grace, handle.wait_exit()).await {
                    Ok(status) => StopOutcome::Graceful { status },
                    Err(_) => StopOutcome::Killed {
                        status: kill_process(handle).await?,
                    },
                },
                Err(error) => {
                    match tokio::time::timeout(EXIT_SETTLE_TIME, handle.wait_exit()).await {
                        // The API failed because the process is already gone.
                        Ok(status) => StopOutcome::Graceful { status },
                        Err(_) => {
                            tracing::warn!(
                                vm_id = handle.vm_id(),
                                error = %error,
                                "could not ask the guest to shut down; killing firecracker"
                            );
                            StopOutcome::Killed {
                                status: kill_process(handle).await?,
                            }
                        }
                    }
                }
            }
        };
        self.gone(handle.vm_id(), handle.runtime_dir());
        Ok(outcome)
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        kill_process(handle).await?;
        self.gone(handle.vm_id(), handle.runtime_dir());
        Ok(())
    }

    fn release(&self, runtime_dir: &Path) {
        let vm_id = runtime_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let vm_id = jail::jail_of(
            self.config
                .jail
                .as_ref()
                .map_or(Path::new(""), |jail| jail.chroot_base.as_path()),
            runtime_dir,
        )
        .and_then(|paths| {
            paths
                .vm_dir
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or(vm_id);
        self.gone(&vm_id, runtime_dir);
    }

    async fn pause(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.client(handle)
            .patch_vm(VmState::Paused)
            .await
            .map_err(|source| control_error(handle, "pause", source))
    }

    async fn resume(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.client(handle)
            .patch_vm(VmState::Resumed)
            .await
            .map_err(|source| control_error(handle, "resume", source))
    }

    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<SnapshotInfo, VmmError> {
        let client = self.client(handle);
        let version = client
            .describe_instance()
            .await
            .map_err(|source| control_error(handle, "snapshot", source))?
            .vmm_version;
        let info = SnapshotInfo::in_dir(BACKEND, version, dir);
        // A jailed Firecracker writes inside its chroot; the files are
        // moved out once written.
        let jailed = handle.api_socket() == RuntimeFiles::jailed(handle.runtime_dir()).api_socket;
        let (written, given) = if jailed {
            let root = handle.runtime_dir().join(jail::JAIL_LINK);
            (
                [
                    root.join(SNAPSHOT_STATE_FILE),
                    root.join(SNAPSHOT_MEMORY_FILE),
                ],
                [
                    Path::new("/").join(SNAPSHOT_STATE_FILE),
                    Path::new("/").join(SNAPSHOT_MEMORY_FILE),
                ],
            )
        } else {
            let files = [info.state_path.clone(), info.memory_path.clone()];
            (files.clone(), files)
        };
        let [state_given, memory_given] = given;
        if jailed {
            // A restored VM's jail holds read-only links to the snapshot it
            // was restored from under these names: unlinked (its VMM keeps
            // its mapping), never written through.
            for path in &written {
                remove_file_if_exists(path).map_err(|source| VmmError::SnapshotFile {
                    vm_id: handle.vm_id().to_owned(),
                    path: path.clone(),
                    source,
                })?;
            }
        }
        let created = client
            .create_snapshot(&SnapshotCreateParams {
                mem_file_path: memory_given,
                snapshot_path: state_given,
                snapshot_type: Some(SnapshotType::Full),
            })
            .await;
        let moved = created
            .map_err(|source| control_error(handle, "snapshot", source))
            .and_then(|()| {
                for (from, to) in written.iter().zip([&info.state_path, &info.memory_path]) {
                    settle_snapshot_file(from, to).map_err(|source| VmmError::SnapshotFile {
                        vm_id: handle.vm_id().to_owned(),
                        path: to.clone(),
                        source,
                    })?;
                }
                Ok(())
            });
        if let Err(error) = moved {
            for path in written.iter().chain([&info.state_path, &info.memory_path]) {
                let _ = remove_file_if_exists(path);
            }
            return Err(error);
        }
        Ok(info)
    }

    async fn restore(
        &self,
        spec: &LaunchSpec,
        snapshot: &SnapshotInfo,
    ) -> Result<VmmHandle, VmmError> {
        snapshot.check_restorable_by(BACKEND, None)?;
        let Some(jail) = &self.config.jail else {
            return Err(VmmError::RestoreNeedsJail);
        };
        let files = self.runtime_files(&spec.runtime_dir);
        Self::prepare_runtime_files(spec, &files)?;
        let (handle, paths) = self.spawn_jailed(spec, jail, &files).await?;
        if let Err(error) = self.wait_until_ready(spec, &files, &handle).await {
            self.abandon(&handle).await;
            return Err(error);
        }
        if let Err(error) = self.load(spec, jail, &files, &paths, snapshot).await {
            let exited = tokio::time::timeout(EXIT_SETTLE_TIME, handle.wait_exit()).await;
            self.abandon(&handle).await;
            return Err(match exited {
                Ok(status) => exited_during_startup(spec, &files, status),
                Err(_) => error,
            });
        }
        Ok(handle)
    }

    async fn adopt(
        &self,
        vm_id: &str,
        runtime_dir: &Path,
        pid: u32,
    ) -> Result<Option<VmmHandle>, VmmError> {
        // Either form, whatever the configuration says now: a VM started
        // before `jailed` changed keeps running as it was started.
        let files = RuntimeFiles::new(runtime_dir);
        let mut jailed = false;
        let is_this_vm = |args: &[std::ffi::OsString]| {
            jailed = is_jailed_firecracker(args, vm_id);
            jailed
                || (has_flag_value(args, "--id", OsStr::new(vm_id))
                    && has_flag_value(args, "--api-sock", files.api_socket.as_os_str()))
        };
        let process = process::adopt(pid, is_this_vm).map_err(|source| VmmError::AdoptProcess {
            vm_id: vm_id.to_owned(),
            pid,
            source,
        })?;
        let api_socket = if jailed {
            RuntimeFiles::jailed(runtime_dir).api_socket
        } else {
            files.api_socket
        };
        Ok(process.map(|process| VmmHandle::new(BACKEND, vm_id, runtime_dir, api_socket, process)))
    }
}

async fn kill_process(handle: &VmmHandle) -> Result<ExitStatusInfo, VmmError> {
    handle
        .process()
        .kill()
        .await
        .map_err(|source| VmmError::KillProcess {
            vm_id: handle.vm_id().to_owned(),
            pid: handle.pid(),
            source,
        })
}

fn control_error(handle: &VmmHandle, operation: &'static str, source: ClientError) -> VmmError {
    VmmError::Control {
        vm_id: handle.vm_id().to_owned(),
        operation,
        source: ControlError::from(source),
    }
}

/// Moves a file Firecracker wrote to where the snapshot keeps it (a rename,
/// or a copy across filesystems) and makes it root's, mode 0600: it holds
/// guest memory.
fn settle_snapshot_file(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if from != to {
        match std::fs::rename(from, to) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
                std::fs::copy(from, to)?;
                std::fs::remove_file(from)?;
            }
            Err(error) => return Err(error),
        }
    }
    std::os::unix::fs::chown(to, Some(0), Some(0))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))
}

fn exited_during_startup(
    spec: &LaunchSpec,
    files: &RuntimeFiles,
    status: ExitStatusInfo,
) -> VmmError {
    VmmError::ExitDuringStartup {
        backend: BACKEND,
        vm_name: spec.vm_name.clone(),
        status,
        console_tail: read_log_tail(&files.console_log, CONSOLE_TAIL_LINES),
    }
}

fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{default_response, RecordedRequest, TestApiServer};
    use super::*;
    use crate::{DriveSpec, NetworkInterfaceSpec, VsockSpec};
    use hyper::StatusCode;
    use nix::sys::signal::Signal;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// A stand-in for the firecracker binary that opens no socket: it logs
    /// its arguments to the console, publishes its pid in
    /// `<runtime_dir>/started` for the test to serve the API socket, and
    /// idles without child processes (blocked reading a FIFO it holds open
    /// for writing too), so killing it leaves nothing behind. The test plays Firecracker's API with [`TestApiServer`].
    const IDLE_FIRECRACKER: &str = r#"#!/bin/sh
dir=$(dirname "$2")
echo "fake firecracker starting: $*"
echo $$ > "$dir/started.tmp" && mv "$dir/started.tmp" "$dir/started"
mkfifo "$dir/idle.fifo"
read -r never <> "$dir/idle.fifo"
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        runtime_dir: PathBuf,
        vmm: Firecracker,
    }

    fn fixture(script: &str, startup_timeout: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("fake-firecracker");
        std::fs::write(&binary, script).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runtime_dir = dir.path().join("run");
        std::fs::create_dir(&runtime_dir).unwrap();
        let vmm = Firecracker::new(FirecrackerConfig {
            binary,
            api_timeout: Duration::from_secs(2),
            startup_timeout,
            log_level: "warning".into(),
            jail: None,
        })
        .unwrap();
        Fixture {
            _dir: dir,
            runtime_dir,
            vmm,
        }
    }

    fn launch_spec(runtime_dir: &Path) -> LaunchSpec {
        LaunchSpec {
            vm_id: "vm-0123abcd".into(),
            vm_name: "devbox".into(),
            runtime_dir: runtime_dir.to_owned(),
            vcpus: 2,
            memory_mib: 1024,
            kernel_path: "/var/lib/banger/kernels/vmlinux".into(),
            initrd_path: None,
            kernel_cmdline: "console=ttyS0 reboot=k panic=1".into(),
            drives: vec![
                DriveSpec {
                    id: "rootfs".into(),
                    path: "/var/lib/banger/vms/devbox/rootfs.ext4".into(),
                    is_root: true,
                    read_only: false,
                },
                DriveSpec {
                    id: "seed".into(),
                    path: "/var/lib/banger/vms/devbox/seed.img".into(),
                    is_root: false,
                    read_only: true,
                },
            ],
            network_interfaces: vec![NetworkInterfaceSpec {
                id: "eth0".into(),
                tap: "bgr-0123abcd".into(),
                mac: "06:00:0a:c8:00:02".into(),
            }],
            vsock: Some(VsockSpec {
                guest_cid: 3,
                uds_path: runtime_dir.join("vsock.sock"),
            }),
        }
    }

    /// Plays the API side once the fake has started: binds the API socket
    /// with a responder built from the fake's pid.
    fn serve_when_started<R>(
        runtime_dir: &Path,
        responder: impl FnOnce(u32) -> R + Send + 'static,
    ) -> tokio::task::JoinHandle<(TestApiServer, u32)>
    where
        R: Fn(&RecordedRequest) -> (StatusCode, String) + Send + Sync + 'static,
    {
        let started = runtime_dir.join("started");
        let socket = runtime_dir.join(API_SOCKET_FILE);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            let pid: u32 = loop {
                if let Ok(text) = std::fs::read_to_string(&started) {
                    break text.trim().parse().unwrap();
                }
                assert!(Instant::now() < deadline, "the fake never started");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            (TestApiServer::start_with(&socket, responder(pid)), pid)
        })
    }

    /// Executing a script just written can fail with ETXTBSY when another
    /// test forks while the script's write descriptor is still open; retry.
    async fn spawn_retrying(vmm: &Firecracker, spec: &LaunchSpec) -> Result<VmmHandle, VmmError> {
        for _ in 0..10 {
            match vmm.spawn(spec).await {
                Err(VmmError::SpawnProcess { source, .. })
                    if matches!(
                        &source,
                        crate::ProcessError::SpawnProcess { source, .. }
                            if source.raw_os_error() == Some(libc::ETXTBSY)
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
        panic!("the fake firecracker stayed busy");
    }

    fn process_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    fn put(path: &str, body: serde_json::Value) -> RecordedRequest {
        RecordedRequest {
            method: "PUT".into(),
            path: path.into(),
            content_type: Some("application/json".into()),
            body: Some(body),
        }
    }

    #[tokio::test]
    async fn spawn_configures_in_order_then_boots_and_stops_gracefully() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_secs(10));
        let spec = launch_spec(&fixture.runtime_dir);
        // A stale socket from an earlier run must not be mistaken for ours.
        std::fs::write(fixture.runtime_dir.join(API_SOCKET_FILE), "").unwrap();
        std::fs::write(fixture.runtime_dir.join("vsock.sock"), "").unwrap();
        // Ctrl-Alt-Del makes the guest reset, and Firecracker exit.
        let server = serve_when_started(&fixture.runtime_dir, |pid| {
            move |request: &RecordedRequest| {
                if request.body == Some(json!({"action_type": "SendCtrlAltDel"})) {
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
                    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
                }
                default_response(request)
            }
        });

        let handle = spawn_retrying(&fixture.vmm, &spec).await.unwrap();
        let (server, pid) = server.await.unwrap();
        assert_eq!(handle.pid(), pid);
        assert_eq!(handle.backend(), Backend::Firecracker);
        assert_eq!(handle.vm_id(), "vm-0123abcd");
        assert_eq!(
            handle.api_socket(),
            fixture.runtime_dir.join("firecracker.sock")
        );
        assert!(!handle.has_exited());

        let files = RuntimeFiles::new(&fixture.runtime_dir);
        assert!(files.log.exists() && files.metrics.exists());
        assert!(!spec.vsock.as_ref().unwrap().uds_path.exists());
        let console = std::fs::read_to_string(&files.console_log).unwrap();
        assert_eq!(
            console.lines().next().unwrap(),
            format!(
                "fake firecracker starting: --api-sock {} --id vm-0123abcd",
                files.api_socket.display()
            )
        );

        let run = fixture.runtime_dir.display();
        let configuration = vec![
            put(
                "/logger",
                json!({
                    "level": "Warning",
                    "log_path": format!("{run}/firecracker.log"),
                    "show_level": true,
                    "show_log_origin": false,
                }),
            ),
            put(
                "/metrics",
                json!({"metrics_path": format!("{run}/firecracker.metrics")}),
            ),
            put(
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}),
            ),
            put(
                "/boot-source",
                json!({
                    "kernel_image_path": "/var/lib/banger/kernels/vmlinux",
                    "boot_args": "console=ttyS0 reboot=k panic=1",
                }),
            ),
            put(
                "/drives/rootfs",
                json!({
                    "drive_id": "rootfs",
                    "is_root_device": true,
                    "is_read_only": false,
                    "path_on_host": "/var/lib/banger/vms/devbox/rootfs.ext4",
                }),
            ),
            put(
                "/drives/seed",
                json!({
                    "drive_id": "seed",
                    "is_root_device": false,
                    "is_read_only": true,
                    "path_on_host": "/var/lib/banger/vms/devbox/seed.img",
                }),
            ),
            put(
                "/network-interfaces/eth0",
                json!({
                    "iface_id": "eth0",
                    "host_dev_name": "bgr-0123abcd",
                    "guest_mac": "06:00:0a:c8:00:02",
                }),
            ),
            put(
                "/vsock",
                json!({"guest_cid": 3, "uds_path": format!("{run}/vsock.sock")}),
            ),
        ];
        assert_eq!(server.requests(), configuration);

        fixture.vmm.boot(&handle).await.unwrap();
        assert_eq!(
            server.requests().last(),
            Some(&put("/actions", json!({"action_type": "InstanceStart"})))
        );

        let started = Instant::now();
        let outcome = fixture
            .vmm
            .stop(&handle, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            outcome,
            StopOutcome::Graceful {
                status: ExitStatusInfo::Signaled {
                    signal: libc::SIGTERM
                }
            }
        );
        assert!(handle.has_exited());
        assert!(!files.api_socket.exists());
        assert!(!process_exists(pid));
    }

    #[tokio::test]
    async fn adopt_recognises_only_this_vms_firecracker() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_secs(10));
        let spec = launch_spec(&fixture.runtime_dir);
        let server = serve_when_started(&fixture.runtime_dir, |_| default_response);
        let handle = spawn_retrying(&fixture.vmm, &spec).await.unwrap();
        let _server = server.await.unwrap();

        let adopted = fixture
            .vmm
            .adopt(&spec.vm_id, &fixture.runtime_dir, handle.pid())
            .await
            .unwrap()
            .expect("our own firecracker is adopted");
        assert_eq!(adopted.pid(), handle.pid());
        assert_eq!(adopted.api_socket(), handle.api_socket());
        assert!(adopted.is_adopted());
        assert_eq!(
            adopted.process().exit_status(),
            None,
            "adopted process is alive"
        );

        let other_vm = fixture
            .vmm
            .adopt("vm-someone-else", &fixture.runtime_dir, handle.pid())
            .await
            .unwrap();
        assert!(other_vm.is_none());
        let other_dir = fixture
            .vmm
            .adopt(&spec.vm_id, Path::new("/run/elsewhere"), handle.pid())
            .await
            .unwrap();
        assert!(other_dir.is_none());

        // Killing through the adopted handle is seen by both handles.
        fixture.vmm.kill(&adopted).await.unwrap();
        let status = tokio::time::timeout(Duration::from_millis(500), handle.wait_exit())
            .await
            .unwrap();
        assert_eq!(
            status,
            ExitStatusInfo::Signaled {
                signal: libc::SIGKILL
            }
        );
        assert!(!handle.api_socket().exists());

        let gone = fixture
            .vmm
            .adopt(&spec.vm_id, &fixture.runtime_dir, handle.pid())
            .await
            .unwrap();
        assert!(gone.is_none());
    }

    #[tokio::test]
    async fn stop_kills_when_the_guest_ignores_ctrl_alt_del() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_secs(10));
        let server = serve_when_started(&fixture.runtime_dir, |_| default_response);
        let handle = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap();
        let (server, _) = server.await.unwrap();

        let started = Instant::now();
        let outcome = fixture
            .vmm
            .stop(&handle, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            outcome,
            StopOutcome::Killed {
                status: ExitStatusInfo::Signaled {
                    signal: libc::SIGKILL
                }
            }
        );
        assert_eq!(
            server.requests().last(),
            Some(&put("/actions", json!({"action_type": "SendCtrlAltDel"})))
        );
        assert!(!handle.api_socket().exists());
    }

    #[tokio::test]
    async fn stop_kills_at_once_when_the_guest_cannot_be_asked() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_secs(10));
        let server = serve_when_started(&fixture.runtime_dir, |_| {
            |request: &RecordedRequest| {
                if request.path == "/actions" {
                    let fault = json!({"fault_message": "SendCtrlAltDel is not supported"});
                    (StatusCode::BAD_REQUEST, fault.to_string())
                } else {
                    default_response(request)
                }
            }
        });
        let handle = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap();
        let _server = server.await.unwrap();

        let started = Instant::now();
        let outcome = fixture
            .vmm
            .stop(&handle, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!outcome.was_graceful());
    }

    #[tokio::test]
    async fn stop_of_an_exited_process_is_graceful() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_secs(10));
        let server = serve_when_started(&fixture.runtime_dir, |_| default_response);
        let handle = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap();
        let (server, _) = server.await.unwrap();
        drop(server);
        handle.process().signal(Signal::SIGTERM).unwrap();
        handle.wait_exit().await;

        let outcome = fixture
            .vmm
            .stop(&handle, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(outcome.was_graceful());
        assert_eq!(outcome.status().signal(), Some(libc::SIGTERM));
    }

    #[tokio::test]
    async fn refused_configuration_kills_and_reaps_firecracker() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_secs(10));
        let server = serve_when_started(&fixture.runtime_dir, |_| {
            |request: &RecordedRequest| {
                if request.path == "/drives/rootfs" {
                    let fault = json!({"fault_message": "Unable to open the backing file"});
                    (StatusCode::BAD_REQUEST, fault.to_string())
                } else {
                    default_response(request)
                }
            }
        });
        let error = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap_err();
        let (server, pid) = server.await.unwrap();

        assert_eq!(error.to_string(), "Could not configure VM devbox");
        let VmmError::ConfigureVm {
            source: crate::ControlError::Firecracker(source),
            ..
        } = &error
        else {
            panic!("unexpected error {error:?}");
        };
        assert_eq!(
            source.to_string(),
            "Firecracker refused PUT /drives/rootfs: Unable to open the backing file"
        );
        assert!(!process_exists(pid), "firecracker was left running");
        assert!(!fixture.runtime_dir.join(API_SOCKET_FILE).exists());
        assert_eq!(server.requests().last().unwrap().path, "/drives/rootfs");
    }

    #[tokio::test]
    async fn exit_during_startup_reports_the_console() {
        let fixture = fixture(
            "#!/bin/sh\necho 'Error creating the vmm: /dev/kvm: No such file or directory' >&2\nexit 1\n",
            Duration::from_secs(10),
        );
        let started = Instant::now();
        let error = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        let VmmError::ExitDuringStartup {
            status,
            console_tail,
            ..
        } = &error
        else {
            panic!("unexpected error {error:?}");
        };
        assert_eq!(*status, ExitStatusInfo::Exited { code: 1 });
        assert_eq!(
            console_tail,
            "Error creating the vmm: /dev/kvm: No such file or directory"
        );
        assert_eq!(
            error.to_string(),
            "The firecracker process of VM devbox exited during startup (exited with code 1); \
             its console log ends with:\n\
             Error creating the vmm: /dev/kvm: No such file or directory"
        );
    }

    #[tokio::test]
    async fn silent_startup_times_out_and_leaves_nothing_running() {
        let fixture = fixture(IDLE_FIRECRACKER, Duration::from_millis(300));
        let error = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap_err();
        assert!(matches!(error, VmmError::WaitForApi { .. }), "{error:?}");
        let pid: u32 = std::fs::read_to_string(fixture.runtime_dir.join("started"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!process_exists(pid), "firecracker was left running");
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Firecracker::new(FirecrackerConfig {
            binary: "/nonexistent/firecracker".into(),
            ..FirecrackerConfig::default()
        })
        .unwrap();
        let error = vmm.spawn(&launch_spec(dir.path())).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "Could not start firecracker for VM devbox"
        );
    }

    #[test]
    fn unknown_log_level_is_refused() {
        let error = Firecracker::new(FirecrackerConfig {
            log_level: "chatty".into(),
            ..FirecrackerConfig::default()
        })
        .unwrap_err();
        assert_eq!(error.value, "chatty");
    }
}
