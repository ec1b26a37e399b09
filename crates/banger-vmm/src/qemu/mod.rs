//! The QEMU backend: `qemu-system-x86_64 -M microvm`, controlled over QMP.
//!
//! Boot protocol, as [`Qemu`] runs it for one VM (files in the VM's runtime
//! directory, see [`RuntimeFiles`]):
//!
//! 1. Resolve the accelerator once per [`Qemu`]: [`Accel::Auto`] runs
//!    [`detect_accel`]; under TCG also measure the host TSC frequency (see
//!    [`accel::measure_tsc_khz`]).
//! 2. Remove stale `qmp.sock` and `agent.sock` left by an earlier run.
//! 3. Spawn QEMU paused (`-S`) with the whole machine on its command line
//!    ([`command_line`]), detached from the daemon (see [`crate::process`]),
//!    stdout and stderr appended to `console.log`; the guest's serial port
//!    is appended to the same file.
//! 4. Wait until QMP answers `query-status` (greeting and
//!    `qmp_capabilities` first), at most [`QemuConfig::startup_timeout`].
//!    If QEMU exits first (a missing tap, an unreadable disk) the error
//!    carries the tail of `console.log`, where QEMU said why. On any
//!    failure: `SIGKILL`, reap, remove the sockets.
//! 5. [`Vmm::boot`]: QMP `cont`.
//! 6. [`Vmm::stop`]: QMP `system_powerdown` (an ACPI power-button press; the
//!    guest needs a handler such as systemd-logind or `acpid`, and the
//!    `button` and `evdev` drivers), wait up to the grace period for QEMU
//!    to exit (it exits when the guest powers off), then `SIGKILL`. A guest
//!    that is not running (still paused) cannot react and is killed at
//!    once, as is one whose QMP does not answer.
//! 7. [`Vmm::adopt`] after a daemon restart: the pid is this VM's QEMU only
//!    if its command line carries both `-name banger-<vm_id>` and the QMP
//!    `-chardev` of `<runtime_dir>/qmp.sock`.
//!
//! Devices: every drive is a `virtio-blk-device` (virtio-mmio) with
//! `serial=<drive id>`, the root drive first, and `root=/dev/vda rw|ro` is
//! appended to the kernel command line as Firecracker does; every interface
//! a `virtio-net-device` on `-netdev tap`. The guest agent talks over the
//! virtio-serial port `banger.agent`, whose host end is the Unix socket
//! `agent.sock`. [`LaunchSpec::vsock`] becomes a `vhost-vsock-device` only
//! when `/dev/vhost-vsock` exists (the host then reaches the guest with
//! `AF_VSOCK` on the guest CID, not through `uds_path`); otherwise it is
//! ignored. The guest kernel needs the virtio-mmio drivers (`virtio_mmio`
//! is a module in Debian's kernels) and `console=ttyS0`, which is the
//! caller's to add.

pub mod accel;
pub mod qmp;
mod snapshot;

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;

pub use accel::{detect_accel, Accel, AccelChoice, KvmProbeError};
pub use qmp::{QmpClient, QmpConnection, QmpError, QmpEvent, StatusInfo};

use crate::process::{self, has_flag_value, read_log_tail};
use crate::SnapshotInfo;
use crate::{
    Backend, ExitStatusInfo, LaunchSpec, StopOutcome, Vmm, VmmError, VmmHandle, CONSOLE_LOG_FILE,
};

/// This backend, as [`Vmm::backend`] reports it.
pub const BACKEND: Backend = Backend::Qemu;
/// File names inside a VM's runtime directory.
pub const QMP_SOCKET_FILE: &str = "qmp.sock";
pub const AGENT_SOCKET_FILE: &str = "agent.sock";
/// Name of the guest agent's virtio-serial port
/// (`/dev/virtio-ports/banger.agent` in a guest with udev).
pub const AGENT_PORT_NAME: &str = "banger.agent";
const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

/// Lines of `console.log` quoted when QEMU dies during startup.
const CONSOLE_TAIL_LINES: usize = 20;
/// After a failed QMP call, how long to give the exit watcher to report a
/// process that died, before concluding it is alive.
const EXIT_SETTLE_TIME: Duration = Duration::from_millis(100);
/// The pause after a failed QMP attempt on a socket that listens (the
/// wait for the socket itself is woken by its creation).
const QMP_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How banger runs QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// The `qemu-system-x86_64` executable; a bare name is looked up in
    /// `PATH`.
    pub binary: PathBuf,
    pub accel: Accel,
    /// How long QEMU may take to answer on QMP after it was started.
    pub startup_timeout: Duration,
    /// Timeout of each QMP step (handshake, each command).
    pub qmp_timeout: Duration,
    /// The user QEMU switches to once it has opened everything (`-runas`,
    /// or `-run-with user=` where QEMU has it); `None` keeps the daemon's.
    pub run_as: Option<String>,
    /// Confine QEMU with its seccomp filter (`-sandbox on,...`).
    pub sandbox: bool,
    /// Put each VM's QEMU in its own cgroups with CPU and memory limits.
    pub cgroups: Option<crate::jail::Cgroups>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            startup_timeout: Duration::from_secs(10),
            qmp_timeout: QmpClient::DEFAULT_TIMEOUT,
            run_as: None,
            sandbox: true,
            cgroups: None,
        }
    }
}

/// Memory a QEMU process needs besides the guest's RAM (TCG's translation
/// cache is the largest part).
pub const QEMU_MEMORY_OVERHEAD_MIB: u64 = 512;

/// The files QEMU uses in a VM's runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeFiles {
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
}

impl RuntimeFiles {
    #[must_use]
    pub fn new(runtime_dir: &Path) -> Self {
        Self {
            qmp_socket: runtime_dir.join(QMP_SOCKET_FILE),
            agent_socket: runtime_dir.join(AGENT_SOCKET_FILE),
            console_log: runtime_dir.join(CONSOLE_LOG_FILE),
        }
    }
}

/// What the host offers, as [`command_line`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSetup {
    /// [`Accel::Kvm`] or [`Accel::Tcg`].
    pub accel: Accel,
    /// Host TSC frequency to hand a TCG guest (`tsc_early_khz=`).
    pub tsc_khz: Option<u64>,
    /// Whether `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
    /// The user to drop to, and whether this QEMU has `-run-with` (9.1 and
    /// later; older ones have `-runas`).
    pub run_as: Option<(String, bool)>,
    /// `-sandbox on` with everything denied that QEMU does not need.
    pub sandbox: bool,
}

/// Kernel arguments for a TCG guest that keep it from waking when idle
/// (each added unless the command line already sets it).
pub const TCG_IDLE_ARGUMENTS: [&str; 2] = ["tsc=reliable", "nowatchdog"];

/// The `-name` value that identifies a VM's QEMU for [`Vmm::adopt`].
#[must_use]
pub fn process_name(vm_id: &str) -> OsString {
    escape_option_value(OsStr::new(&format!("banger-{vm_id}")))
}

fn qmp_chardev(files: &RuntimeFiles) -> OsString {
    option_list(&[
        OsStr::new("socket,id=qmp,path="),
        &escape_option_value(files.qmp_socket.as_os_str()),
        OsStr::new(",server=on,wait=off"),
    ])
}

/// QEMU's arguments (without the program) for `spec` on `host`, in the
/// order of the module docs.
#[must_use]
pub fn command_line(spec: &LaunchSpec, host: &HostSetup) -> Vec<OsString> {
    let files = RuntimeFiles::new(&spec.runtime_dir);
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |values: &[&OsStr]| args.extend(values.iter().map(|value| (*value).to_owned()));
    let tcg = host.accel != Accel::Kvm;

    push(&[OsStr::new("-name"), &process_name(&spec.vm_id)]);
    push(&[
        "-machine".as_ref(),
        "microvm,acpi=on".as_ref(),
        "-accel".as_ref(),
        if tcg { "tcg" } else { "kvm" }.as_ref(),
        "-cpu".as_ref(),
        if tcg { "max" } else { "host" }.as_ref(),
        "-smp".as_ref(),
        spec.vcpus.to_string().as_ref(),
        "-m".as_ref(),
        format!("{}M", spec.memory_mib).as_ref(),
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
        "-display".as_ref(),
        "none".as_ref(),
        "-no-reboot".as_ref(),
        "-S".as_ref(),
        "-chardev".as_ref(),
        &qmp_chardev(&files),
        "-mon".as_ref(),
        "chardev=qmp,mode=control".as_ref(),
        "-chardev".as_ref(),
        &option_list(&[
            OsStr::new("file,id=console,path="),
            &escape_option_value(files.console_log.as_os_str()),
            OsStr::new(",append=on"),
        ]),
        "-serial".as_ref(),
        "chardev:console".as_ref(),
        "-kernel".as_ref(),
        spec.kernel_path.as_os_str(),
    ]);
    if let Some(initrd) = &spec.initrd_path {
        push(&["-initrd".as_ref(), initrd.as_os_str()]);
    }

    // Firecracker's rule: the root drive is attached first and named on
    // the command line.
    let root_index = spec.drives.iter().position(|drive| drive.is_root);
    let mut cmdline = spec.kernel_cmdline.clone();
    if let Some(root) = root_index.map(|index| &spec.drives[index]) {
        let mode = if root.read_only { "ro" } else { "rw" };
        cmdline.push_str(&format!(" root=/dev/vda {mode}"));
    }
    if let (true, Some(khz)) = (tcg, host.tsc_khz) {
        if !cmdline.contains("tsc_early_khz=") {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        // Without a second clock to check it against (microvm has no HPET
        // or PM timer) the kernel rejects TCG's TSC and keeps time with
        // jiffies, which needs the periodic tick even when idle. The
        // lockup watchdog's timers wake an idle guest too.
        for argument in TCG_IDLE_ARGUMENTS {
            let key = argument.split('=').next().unwrap_or(argument);
            if !cmdline
                .split_whitespace()
                .any(|word| word.split('=').next() == Some(key))
            {
                cmdline.push(' ');
                cmdline.push_str(argument);
            }
        }
    }
    push(&["-append".as_ref(), cmdline.trim_start().as_ref()]);

    let drives = root_index
        .map(|index| &spec.drives[index])
        .into_iter()
        .chain(
            spec.drives
                .iter()
                .enumerate()
                .filter(|(index, _)| Some(*index) != root_index)
                .map(|(_, drive)| drive),
        );
    for drive in drives {
        let id = escape_option_value(OsStr::new(&format!("drive-{}", drive.id)));
        let mut options = vec![OsStr::new("id="), &id, OsStr::new(",file=")];
        let file = escape_option_value(drive.path.as_os_str());
        options.push(&file);
        // `-drive` defaults to auto-read-only, which makes QEMU reopen the
        // file by path when a snapshot's migration hands the disk over; the
        // unprivileged VMM cannot reach the path, so keep the fd it has.
        options.push(OsStr::new(
            ",format=raw,if=none,cache=writeback,discard=unmap,auto-read-only=off",
        ));
        if drive.read_only {
            options.push(OsStr::new(",readonly=on"));
        }
        let serial = escape_option_value(OsStr::new(&drive.id));
        push(&[
            "-drive".as_ref(),
            &option_list(&options),
            "-device".as_ref(),
            &option_list(&[
                OsStr::new("virtio-blk-device,drive="),
                &id,
                OsStr::new(",serial="),
                &serial,
            ]),
        ]);
    }
    for interface in &spec.network_interfaces {
        let id = escape_option_value(OsStr::new(&format!("net-{}", interface.id)));
        push(&[
            "-netdev".as_ref(),
            &option_list(&[
                OsStr::new("tap,id="),
                &id,
                OsStr::new(",ifname="),
                &escape_option_value(OsStr::new(&interface.tap)),
                OsStr::new(",script=no,downscript=no"),
            ]),
            "-device".as_ref(),
            &option_list(&[
                OsStr::new("virtio-net-device,netdev="),
                &id,
                OsStr::new(",mac="),
                &escape_option_value(OsStr::new(&interface.mac)),
            ]),
        ]);
    }
    push(&[
        "-device".as_ref(),
        "virtio-serial-device".as_ref(),
        "-chardev".as_ref(),
        &option_list(&[
            OsStr::new("socket,id=agent,path="),
            &escape_option_value(files.agent_socket.as_os_str()),
            OsStr::new(",server=on,wait=off"),
        ]),
        "-device".as_ref(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}").as_ref(),
    ]);
    if let (Some(vsock), true) = (&spec.vsock, host.vhost_vsock) {
        push(&[
            "-device".as_ref(),
            format!("vhost-vsock-device,guest-cid={}", vsock.guest_cid).as_ref(),
        ]);
    }
    match &host.run_as {
        Some((user, true)) => push(&[
            "-run-with".as_ref(),
            &option_list(&[OsStr::new("user="), &escape_option_value(OsStr::new(user))]),
        ]),
        Some((user, false)) => push(&["-runas".as_ref(), user.as_ref()]),
        None => {}
    }
    if host.sandbox {
        // The user switch is a setuid(2) made after the filter is in place,
        // so it needs `elevateprivileges=allow`; having switched all of its
        // uids, QEMU cannot regain root, and `spawn=deny` stops it from
        // executing anything set-uid.
        let elevate = if host.run_as.is_some() {
            "allow"
        } else {
            "deny"
        };
        push(&[
            "-sandbox".as_ref(),
            format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
                .as_ref(),
        ]);
    }
    args
}

/// Whether `binary` has `-run-with` (QEMU 9.1 and later), from its `-help`.
async fn has_run_with(binary: &Path) -> bool {
    let help = tokio::process::Command::new(binary)
        .arg("-help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(Duration::from_secs(5), help).await {
        Ok(Ok(output)) => String::from_utf8_lossy(&output.stdout).contains("-run-with"),
        _ => false,
    }
}

/// QEMU option values separate options with commas; a literal comma is
/// written twice.
fn escape_option_value(value: &OsStr) -> OsString {
    let mut escaped = Vec::with_capacity(value.len());
    for byte in value.as_bytes() {
        escaped.push(*byte);
        if *byte == b',' {
            escaped.push(b',');
        }
    }
    OsString::from_vec(escaped)
}

fn option_list(parts: &[&OsStr]) -> OsString {
    parts.iter().copied().collect()
}

/// The QEMU [`Vmm`] backend.
#[derive(Debug)]
pub struct Qemu {
    config: QemuConfig,
    host: OnceCell<HostSetup>,
    accel_choice: OnceCell<AccelChoice>,
}

impl Qemu {
    #[must_use]
    pub fn new(config: QemuConfig) -> Self {
        Self {
            config,
            host: OnceCell::new(),
            accel_choice: OnceCell::new(),
        }
    }

    #[must_use]
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator VMs get, and why (the configured one, or what
    /// [`detect_accel`] found). Probes once; later calls reuse the answer.
    pub async fn accel_choice(&self) -> AccelChoice {
        self.accel_choice
            .get_or_init(|| async {
                match self.config.accel {
                    Accel::Auto => tokio::task::spawn_blocking(detect_accel)
                        .await
                        .unwrap_or_else(|error| AccelChoice {
                            accel: Accel::Tcg,
                            reason: format!("The KVM probe failed ({error}), using TCG"),
                        }),
                    configured => AccelChoice {
                        accel: configured,
                        reason: format!("{configured} is configured"),
                    },
                }
            })
            .await
            .clone()
    }

    /// Step 1 of the boot protocol.
    async fn host_setup(&self) -> HostSetup {
        self.host
            .get_or_init(|| async {
                let accel = self.accel_choice().await.accel;
                let tsc_khz = if accel == Accel::Tcg {
                    tokio::task::spawn_blocking(accel::measure_tsc_khz)
                        .await
                        .unwrap_or(None)
                } else {
                    None
                };
                let run_as = match &self.config.run_as {
                    Some(user) => Some((user.clone(), has_run_with(&self.config.binary).await)),
                    None => None,
                };
                HostSetup {
                    accel,
                    tsc_khz,
                    vhost_vsock: Path::new(VHOST_VSOCK_DEVICE).exists(),
                    run_as,
                    sandbox: self.config.sandbox,
                }
            })
            .await
            .clone()
    }

    /// A QMP client for the VM behind `handle`, with the configured
    /// timeout.
    #[must_use]
    pub fn client(&self, handle: &VmmHandle) -> QmpClient {
        QmpClient::new(handle.api_socket()).with_timeout(self.config.qmp_timeout)
    }

    /// Step 4: QMP answering, the process exiting, or the timeout.
    async fn wait_until_ready(
        &self,
        spec: &LaunchSpec,
        files: &RuntimeFiles,
        handle: &VmmHandle,
    ) -> Result<(), VmmError> {
        let client = QmpClient::new(&files.qmp_socket).with_timeout(self.config.qmp_timeout);
        let startup_timeout = self.config.startup_timeout;
        let ready = async {
            let mut last_error = None;
            let deadline = tokio::time::Instant::now() + startup_timeout;
            loop {
                // Woken by the socket's creation, not a poll interval.
                let mut socket_error = None;
                let listening =
                    crate::socket_wait::until_listening(&files.qmp_socket, &mut socket_error);
                if tokio::time::timeout_at(deadline, listening).await.is_err() {
                    return Err(last_error.unwrap_or(QmpError::TimedOut {
                        step: "the QMP handshake".to_owned(),
                        timeout: startup_timeout,
                    }));
                }
                let attempt = tokio::time::timeout_at(deadline, client.query_status()).await;
                match attempt {
                    Ok(Ok(_status)) => return Ok(()),
                    Ok(Err(error)) => last_error = Some(error),
                    Err(_) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(last_error.unwrap_or(QmpError::TimedOut {
                        step: "the QMP handshake".to_owned(),
                        timeout: startup_timeout,
                    }));
                }
                tokio::time::sleep(QMP_POLL_INTERVAL).await;
            }
        };
        tokio::select! {
            ready = ready => ready.map_err(|source| VmmError::WaitForApi {
                backend: BACKEND,
                vm_name: spec.vm_name.clone(),
                source: source.into(),
            }),
            status = handle.wait_exit() => Err(exited_during_startup(spec, files, status)),
        }
    }

    /// Nothing may be left running when spawn fails.
    async fn abandon(&self, handle: &VmmHandle) {
        if let Err(error) = handle.process().kill().await {
            tracing::error!(
                vm_id = handle.vm_id(),
                pid = handle.pid(),
                error = %error,
                "could not kill QEMU after a failed start"
            );
        }
        self.gone(handle.vm_id(), handle.runtime_dir());
    }

    /// Cleans up after a QEMU that is gone: its sockets and its cgroups.
    fn gone(&self, vm_id: &str, runtime_dir: &Path) {
        remove_sockets(runtime_dir);
        if let Some(cgroups) = &self.config.cgroups {
            if let Err(error) = crate::jail::remove_cgroups(cgroups, vm_id) {
                tracing::warn!(vm_id, error = %banger_proto::error_chain(&error), "could not remove the cgroups of a QEMU that is gone");
            }
        }
    }

    /// Asks the guest to power off; `Ok(false)` when it cannot react
    /// because its vCPUs are not running.
    async fn request_powerdown(&self, handle: &VmmHandle) -> Result<bool, QmpError> {
        let mut connection = self.client(handle).connect().await?;
        if !connection.query_status().await?.running {
            return Ok(false);
        }
        connection.execute("system_powerdown", None).await?;
        Ok(true)
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn backend(&self) -> Backend {
        BACKEND
    }

    fn agent_endpoint(
        &self,
        runtime_dir: &Path,
    ) -> (crate::AgentEndpoint, Option<crate::VsockSpec>) {
        (
            crate::AgentEndpoint::Unix(RuntimeFiles::new(runtime_dir).agent_socket),
            None,
        )
    }

    async fn spawn(&self, spec: &LaunchSpec) -> Result<VmmHandle, VmmError> {
        self.spawn_with(spec, &[]).await
    }

    async fn pause(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.client(handle)
            .stop()
            .await
            .map_err(|source| control_error(handle, "pause", source))
    }

    async fn resume(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.client(handle)
            .cont()
            .await
            .map_err(|source| control_error(handle, "resume", source))
    }

    async fn snapshot(&self, handle: &VmmHandle, dir: &Path) -> Result<SnapshotInfo, VmmError> {
        self.write_snapshot(handle, dir).await
    }

    async fn restore(
        &self,
        spec: &LaunchSpec,
        snapshot: &SnapshotInfo,
    ) -> Result<VmmHandle, VmmError> {
        self.restore_snapshot(spec, snapshot).await
    }

    async fn boot(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.client(handle)
            .cont()
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
            match self.request_powerdown(handle).await {
                Ok(true) => match tokio::time::timeout(grace, handle.wait_exit()).await {
                    Ok(status) => StopOutcome::Graceful { status },
                    Err(_) => StopOutcome::Killed {
                        status: kill_process(handle).await?,
                    },
                },
                Ok(false) => StopOutcome::Killed {
                    status: kill_process(handle).await?,
                },
                Err(error) => {
                    match tokio::time::timeout(EXIT_SETTLE_TIME, handle.wait_exit()).await {
                        // QMP failed because QEMU is already gone.
                        Ok(status) => StopOutcome::Graceful { status },
                        Err(_) => {
                            tracing::warn!(
                                vm_id = handle.vm_id(),
                                error = %error,
                                "could not ask the guest to power off; killing qemu"
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
        // The daemon's runtime directories are named after their VM.
        let vm_id = runtime_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.gone(&vm_id, runtime_dir);
    }

    async fn adopt(
        &self,
        vm_id: &str,
        runtime_dir: &Path,
        pid: u32,
    ) -> Result<Option<VmmHandle>, VmmError> {
        let files = RuntimeFiles::new(runtime_dir);
        let is_this_vm = |args: &[OsString]| {
            has_flag_value(args, "-name", &process_name(vm_id))
                && has_flag_value(args, "-chardev", &qmp_chardev(&files))
        };
        let process = process::adopt(pid, is_this_vm).map_err(|source| VmmError::AdoptProcess {
            vm_id: vm_id.to_owned(),
            pid,
            source,
        })?;
        Ok(process.map(|process| {
            VmmHandle::new(
                BACKEND,
                vm_id,
                runtime_dir,
                files.qmp_socket.clone(),
                process,
            )
        }))
    }
}

impl Qemu {
    /// Spawn with `extra` arguments after the usual command line.
    async fn spawn_with(&self, spec: &LaunchSpec, extra: &[&OsStr]) -> Result<VmmHandle, VmmError> {
        let host = self.host_setup().await;
        let files = RuntimeFiles::new(&spec.runtime_dir);
        for path in [&files.qmp_socket, &files.agent_socket] {
            remove_file_if_exists(path).map_err(|source| VmmError::PrepareRuntimeFile {
                vm_name: spec.vm_name.clone(),
                path: path.clone(),
                source,
            })?;
        }
        let mut args = command_line(spec, &host);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let process =
            process::spawn(&self.config.binary, &args, &files.console_log).map_err(|source| {
                VmmError::SpawnProcess {
                    backend: BACKEND,
                    vm_name: spec.vm_name.clone(),
                    source,
                }
            })?;
        let handle = VmmHandle::new(
            BACKEND,
            spec.vm_id.clone(),
            spec.runtime_dir.clone(),
            files.qmp_socket.clone(),
            process,
        );
        tracing::debug!(
            vm_id = spec.vm_id,
            pid = handle.pid(),
            accel = %host.accel,
            "spawned qemu"
        );
        // Still paused (`-S`): the guest runs only inside its limits.
        if let Some(cgroups) = &self.config.cgroups {
            let memory_mib = u64::from(spec.memory_mib) + QEMU_MEMORY_OVERHEAD_MIB;
            if let Err(source) = cgroups.enter(&spec.vm_id, handle.pid(), spec.vcpus, memory_mib) {
                self.abandon(&handle).await;
                return Err(VmmError::Jail {
                    vm_name: spec.vm_name.clone(),
                    source,
                });
            }
        }
        if let Err(error) = self.wait_until_ready(spec, &files, &handle).await {
            // QMP failing may mean QEMU is dying; then its console says why.
            let error = match (
                &error,
                tokio::time::timeout(EXIT_SETTLE_TIME, handle.wait_exit()).await,
            ) {
                (VmmError::WaitForApi { .. }, Ok(status)) => {
                    exited_during_startup(spec, &files, status)
                }
                _ => error,
            };
            self.abandon(&handle).await;
            return Err(error);
        }
        Ok(handle)
    }
}

fn control_error(handle: &VmmHandle, operation: &'static str, source: QmpError) -> VmmError {
    VmmError::Control {
        vm_id: handle.vm_id().to_owned(),
        operation,
        source: source.into(),
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

/// A killed QEMU leaves its listening sockets behind.
fn remove_sockets(runtime_dir: &Path) {
    let files = RuntimeFiles::new(runtime_dir);
    for path in [&files.qmp_socket, &files.agent_socket] {
        if let Err(error) = remove_file_if_exists(path) {
            tracing::warn!(path = %path.display(), %error, "could not remove a QEMU socket");
        }
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
    use super::qmp::test_server::{Answer, FakeQmp};
    use super::*;
    use crate::{DriveSpec, NetworkInterfaceSpec, VsockSpec};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    fn launch_spec(runtime_dir: &Path) -> LaunchSpec {
        LaunchSpec {
            vm_id: "vm-0123abcd".into(),
            vm_name: "devbox".into(),
            runtime_dir: runtime_dir.to_owned(),
            vcpus: 2,
            memory_mib: 1024,
            kernel_path: "/var/lib/banger/kernels/vmlinux".into(),
            initrd_path: Some("/var/lib/banger/kernels/initrd".into()),
            kernel_cmdline: "console=ttyS0 reboot=k panic=1".into(),
            drives: vec![
                DriveSpec {
                    id: "seed".into(),
                    path: "/var/lib/banger/vms/devbox/seed,1.img".into(),
                    is_root: false,
                    read_only: true,
                },
                DriveSpec {
                    id: "rootfs".into(),
                    path: "/var/lib/banger/vms/devbox/rootfs.ext4".into(),
                    is_root: true,
                    read_only: false,
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

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|arg| arg.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn command_line_for_a_tcg_guest() {
        let spec = launch_spec(Path::new("/run/vms/devbox"));
        let host = HostSetup {
            accel: Accel::Tcg,
            tsc_khz: Some(2_100_000),
            vhost_vsock: false,
            run_as: None,
            sandbox: false,
        };
        #[rustfmt::skip]
        let expected = [
            "-name", "banger-vm-0123abcd",
            "-machine", "microvm,acpi=on",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "2",
            "-m", "1024M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
            "-chardev", "socket,id=qmp,path=/run/vms/devbox/qmp.sock,server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", "file,id=console,path=/run/vms/devbox/console.log,append=on",
            "-serial", "chardev:console",
            "-kernel", "/var/lib/banger/kernels/vmlinux",
            "-initrd", "/var/lib/banger/kernels/initrd",
            "-append", "console=ttyS0 reboot=k panic=1 root=/dev/vda rw tsc_early_khz=2100000 tsc=reliable nowatchdog",
            "-drive", "id=drive-rootfs,file=/var/lib/banger/vms/devbox/rootfs.ext4,format=raw,if=none,cache=writeback,discard=unmap,auto-read-only=off",
            "-device", "virtio-blk-device,drive=drive-rootfs,serial=rootfs",
            "-drive", "id=drive-seed,file=/var/lib/banger/vms/devbox/seed,,1.img,format=raw,if=none,cache=writeback,discard=unmap,auto-read-only=off,readonly=on",
            "-device", "virtio-blk-device,drive=drive-seed,serial=seed",
            "-netdev", "tap,id=net-eth0,ifname=bgr-0123abcd,script=no,downscript=no",
            "-device", "virtio-net-device,netdev=net-eth0,mac=06:00:0a:c8:00:02",
            "-device", "virtio-serial-device",
            "-chardev", "socket,id=agent,path=/run/vms/devbox/agent.sock,server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=banger.agent",
        ];
        assert_eq!(strings(&command_line(&spec, &host)), expected);
    }

    #[test]
    fn a_tcg_guest_gets_the_idle_arguments_unless_its_command_line_sets_them() {
        let mut spec = launch_spec(Path::new("/run/vms/devbox"));
        spec.drives.retain(|drive| !drive.is_root);
        spec.kernel_cmdline = "console=ttyS0 tsc=unstable".into();
        let host = HostSetup {
            accel: Accel::Tcg,
            tsc_khz: Some(2_100_000),
            vhost_vsock: false,
            run_as: None,
            sandbox: false,
        };
        let args = strings(&command_line(&spec, &host));
        let index = args.iter().position(|arg| arg == "-append").unwrap();
        assert_eq!(
            args[index + 1],
            "console=ttyS0 tsc=unstable tsc_early_khz=2100000 nowatchdog"
        );
    }

    #[test]
    fn command_line_for_a_kvm_guest_with_vhost_vsock() {
        let mut spec = launch_spec(Path::new("/run/vms/devbox"));
        spec.drives.retain(|drive| !drive.is_root);
        let host = HostSetup {
            accel: Accel::Kvm,
            tsc_khz: Some(2_100_000),
            vhost_vsock: true,
            run_as: Some(("banger-vmm".to_owned(), false)),
            sandbox: true,
        };
        let args = strings(&command_line(&spec, &host));
        let value_of = |flag: &str| {
            let index = args.iter().position(|arg| arg == flag).unwrap();
            args[index + 1].clone()
        };
        assert_eq!(value_of("-accel"), "kvm");
        assert_eq!(value_of("-cpu"), "host");
        // No root drive, no TSC hint under KVM.
        assert_eq!(value_of("-append"), "console=ttyS0 reboot=k panic=1");
        assert_eq!(
            args[args.len() - 6..],
            [
                "-device",
                "vhost-vsock-device,guest-cid=3",
                "-runas",
                "banger-vmm",
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
            ]
        );
        // QEMU 9.1 and later: `-run-with`. Without a user to switch to,
        // set*id stays denied.
        let newer = HostSetup {
            run_as: Some(("banger-vmm".to_owned(), true)),
            ..host.clone()
        };
        let args = strings(&command_line(&spec, &newer));
        assert!(args
            .windows(2)
            .any(|pair| pair == ["-run-with", "user=banger-vmm"]));
        let unprivileged = HostSetup {
            run_as: None,
            ..host
        };
        let args = strings(&command_line(&spec, &unprivileged));
        assert!(!args.contains(&"-runas".to_owned()));
        assert_eq!(
            args.last().unwrap(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        runtime_dir: PathBuf,
        vmm: Qemu,
    }

    /// A stand-in for QEMU: logs its arguments, publishes its pid in
    /// `<runtime_dir>/started` and idles blocked on a FIFO, so killing it
    /// leaves nothing behind. The test plays QMP with [`FakeQmp`].
    const IDLE_QEMU: &str = r#"#!/bin/sh
for arg; do
  case "$arg" in file,id=console,path=*) log=${arg#file,id=console,path=}; log=${log%,append=on};; esac
done
dir=$(dirname "$log")
echo "fake qemu starting"
echo $$ > "$dir/started.tmp" && mv "$dir/started.tmp" "$dir/started"
mkfifo "$dir/idle.fifo"
read -r never <> "$dir/idle.fifo"
"#;

    fn fixture(script: &str, startup_timeout: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("fake-qemu");
        std::fs::write(&binary, script).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runtime_dir = dir.path().join("run");
        std::fs::create_dir(&runtime_dir).unwrap();
        let vmm = Qemu::new(QemuConfig {
            binary,
            accel: Accel::Tcg,
            startup_timeout,
            qmp_timeout: Duration::from_secs(2),
            ..QemuConfig::default()
        });
        Fixture {
            _dir: dir,
            runtime_dir,
            vmm,
        }
    }

    /// Executing a script just written can fail with ETXTBSY when another
    /// test forks while the script's write descriptor is still open; retry.
    async fn spawn_retrying(vmm: &Qemu, spec: &LaunchSpec) -> Result<VmmHandle, VmmError> {
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
        panic!("the fake qemu stayed busy");
    }

    /// Serves QMP once the fake has started, like QEMU would.
    fn serve_when_started(
        runtime_dir: &Path,
        script: impl Fn(&str) -> Answer + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<(FakeQmp, u32)> {
        let started = runtime_dir.join("started");
        let socket = runtime_dir.join(QMP_SOCKET_FILE);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            let pid: u32 = loop {
                if let Ok(text) = std::fs::read_to_string(&started) {
                    break text.trim().parse().unwrap();
                }
                assert!(Instant::now() < deadline, "the fake never started");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            (FakeQmp::start(&socket, script), pid)
        })
    }

    fn running_status(command: &str) -> Answer {
        if command == "query-status" {
            Answer {
                before: Vec::new(),
                reply: Some(serde_json::json!({"return": {"status": "running", "running": true}})),
            }
        } else {
            Answer::ok()
        }
    }

    #[tokio::test]
    async fn spawn_waits_for_qmp_then_boots_adopts_and_stops() {
        let fixture = fixture(IDLE_QEMU, Duration::from_secs(10));
        let mut spec = launch_spec(&fixture.runtime_dir);
        spec.vsock = None;
        std::fs::write(fixture.runtime_dir.join(AGENT_SOCKET_FILE), "").unwrap();
        let server = serve_when_started(&fixture.runtime_dir, running_status);

        let handle = spawn_retrying(&fixture.vmm, &spec).await.unwrap();
        let (server, pid) = server.await.unwrap();
        assert_eq!(handle.pid(), pid);
        assert_eq!(handle.backend(), Backend::Qemu);
        assert_eq!(handle.api_socket(), fixture.runtime_dir.join("qmp.sock"));
        assert!(!fixture.runtime_dir.join(AGENT_SOCKET_FILE).exists());

        fixture.vmm.boot(&handle).await.unwrap();
        assert_eq!(server.command_names().last().unwrap(), "cont");

        let adopted = fixture
            .vmm
            .adopt(&spec.vm_id, &fixture.runtime_dir, pid)
            .await
            .unwrap()
            .expect("our own qemu is adopted");
        assert!(adopted.is_adopted());
        assert!(fixture
            .vmm
            .adopt("vm-someone-else", &fixture.runtime_dir, pid)
            .await
            .unwrap()
            .is_none());
        assert!(fixture
            .vmm
            .adopt(&spec.vm_id, Path::new("/run/elsewhere"), pid)
            .await
            .unwrap()
            .is_none());

        // The fake ignores the power button: killed after the grace period.
        let started = Instant::now();
        let outcome = fixture
            .vmm
            .stop(&handle, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            outcome,
            StopOutcome::Killed {
                status: ExitStatusInfo::Signaled {
                    signal: libc::SIGKILL
                }
            }
        );
        let names = server.command_names();
        assert_eq!(
            names[names.len() - 2..],
            ["query-status", "system_powerdown"]
        );
        assert!(!fixture.runtime_dir.join(QMP_SOCKET_FILE).exists());
    }

    #[tokio::test]
    async fn stop_of_a_paused_guest_kills_at_once() {
        let fixture = fixture(IDLE_QEMU, Duration::from_secs(10));
        let server = serve_when_started(&fixture.runtime_dir, |command| {
            if command == "query-status" {
                Answer {
                    before: Vec::new(),
                    reply: Some(
                        serde_json::json!({"return": {"status": "prelaunch", "running": false}}),
                    ),
                }
            } else {
                Answer::ok()
            }
        });
        let handle = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap();
        let (server, _) = server.await.unwrap();
        let started = Instant::now();
        let outcome = fixture
            .vmm
            .stop(&handle, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!outcome.was_graceful());
        assert!(!server
            .command_names()
            .contains(&"system_powerdown".to_owned()));
    }

    #[tokio::test]
    async fn exit_during_startup_reports_the_console() {
        let fixture = fixture(
            "#!/bin/sh\necho \"qemu-system-x86_64: -netdev tap,id=net-eth0,ifname=bgr-0123abcd: could not open /dev/net/tun: No such device\" >&2\nexit 1\n",
            Duration::from_secs(10),
        );
        let error = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap_err();
        let VmmError::ExitDuringStartup {
            status,
            console_tail,
            ..
        } = &error
        else {
            panic!("unexpected error {error:?}");
        };
        assert_eq!(*status, ExitStatusInfo::Exited { code: 1 });
        assert!(console_tail.contains("could not open /dev/net/tun"));
        assert!(error.to_string().starts_with(
            "The qemu process of VM devbox exited during startup (exited with code 1)"
        ));
    }

    #[tokio::test]
    async fn silent_startup_times_out_and_leaves_nothing_running() {
        let fixture = fixture(IDLE_QEMU, Duration::from_millis(300));
        let error = spawn_retrying(&fixture.vmm, &launch_spec(&fixture.runtime_dir))
            .await
            .unwrap_err();
        assert!(matches!(error, VmmError::WaitForApi { .. }), "{error:?}");
        let pid: u32 = std::fs::read_to_string(fixture.runtime_dir.join("started"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Qemu::new(QemuConfig {
            binary: "/nonexistent/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            ..QemuConfig::default()
        });
        let error = vmm.spawn(&launch_spec(dir.path())).await.unwrap_err();
        assert_eq!(error.to_string(), "Could not start qemu for VM devbox");
        let choice = vmm.accel_choice().await;
        assert_eq!(choice.reason, "tcg is configured");
    }
}
