//! Reconciliation at daemon start: brings the store and the host back in
//! line after a (re)start.
//!
//! 1. Every VM row: re-adopt its VMM process if it still runs; an
//!    interrupted create (its operation never ended) is removed with
//!    everything it made (capabilities' `on_interrupted_create`, the root
//!    disk, the row); other rows take the state
//!    [`super::state::after_restart`] gives.
//! 2. VM directories and VMM processes no row accounts for are removed and
//!    killed; images' and capabilities' orphans are removed.
//! 3. Snapshots a killed daemon was taking: their VMs resumed, directories
//!    no row accounts for removed ([`VmService::reconcile_snapshots`]).
//! 4. Leaked dm and loop devices are released; operations left running are
//!    marked failed.
//!
//! Failures to remove a leftover are logged and do not stop the daemon.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_proto::{OperationState, Vm, VmState};
use banger_vmm::VmmHandle;

use super::{state, VmError, VmService};

/// What reconciliation did, for the log and tests.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub adopted: Vec<String>,
    pub crashed: Vec<String>,
    pub stopped: Vec<String>,
    /// VMs whose VMM could not be checked; left as recorded.
    pub unresolved: Vec<String>,
    pub killed_orphan_processes: Vec<u32>,
    pub removed_orphan_files: Vec<String>,
    /// Leaked dm and loop devices that were released.
    pub released_devices: String,
    pub removed_interrupted: Vec<String>,
    pub removed_orphan_dirs: Vec<String>,
}

impl VmService {
    async fn adopt(
        &self,
        vm: &Vm,
        directory: &Path,
        pid: u32,
    ) -> Result<Option<VmmHandle>, VmError> {
        self.backends
            .get(vm.backend)
            .adopt(&vm.id, directory, pid)
            .await
            .map_err(|error| VmError::CheckVmm(Box::new(error)))
    }

    /// See the module docs.
    pub async fn reconcile(self: &Arc<Self>) -> Result<ReconcileReport, VmError> {
        let mut report = ReconcileReport::default();
        // VMs whose create operation never ended: the create was interrupted.
        let interrupted_creates: Vec<String> = self
            .operations
            .list()?
            .into_iter()
            .filter(|operation| {
                operation.kind == "vm.create" && operation.state == OperationState::Running
            })
            .map(|operation| operation.vm_id)
            .collect();
        for vm in self.store.list_vms()? {
            self.reconcile_vm(vm, &interrupted_creates, &mut report)
                .await?;
        }
        let known: Vec<String> = self.store.list_vms()?.into_iter().map(|vm| vm.id).collect();
        if let Ok(entries) = std::fs::read_dir(self.paths.vms()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    self.remove_leftover_disk(&name, &entry.path()).await;
                    report.removed_orphan_dirs.push(name);
                }
            }
        }
        let adopted_pids: Vec<u32> = self.processes().values().map(VmmHandle::pid).collect();
        // VMMs (and jailers still starting one) no row accounts for; then
        // jailed VMMs, found by their jail's pid file once no jailer can
        // start another.
        let kill = |pid: u32, report: &mut ReconcileReport| {
            if adopted_pids.contains(&pid) {
                return false;
            }
            tracing::warn!(pid, "killing a VMM process no VM accounts for");
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            report.killed_orphan_processes.push(pid);
            true
        };
        let mut killed = Vec::new();
        for pid in vmm_processes_under(&self.paths.vms(), &self.paths.jail()) {
            if kill(pid, &mut report) {
                killed.push(pid);
            }
        }
        wait_until_gone(&killed).await;
        let jailed = jailed_vmms_under(&self.paths.jail());
        killed.clear();
        for pid in jailed.iter().filter_map(|(pid, _)| *pid) {
            if kill(pid, &mut report) {
                killed.push(pid);
            }
        }
        wait_until_gone(&killed).await;
        // Jails (and their cgroups) of VMMs that are gone or were just killed.
        let cgroups = self
            .backends
            .firecracker_jail
            .as_ref()
            .and_then(|jail| jail.cgroups.clone());
        for (pid, jail_dir) in jailed {
            if pid.is_some_and(|pid| adopted_pids.contains(&pid)) {
                continue;
            }
            let vm_id = jail_dir
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let paths = banger_vmm::jail::JailPaths {
                root: jail_dir.join("root"),
                link: self.paths.vm_dir(&vm_id).join(banger_vmm::jail::JAIL_LINK),
                vm_dir: jail_dir.clone(),
            };
            match banger_vmm::jail::remove_jail(&paths, cgroups.as_ref(), &vm_id) {
                Ok(()) => report
                    .removed_orphan_dirs
                    .push(jail_dir.display().to_string()),
                Err(error) => {
                    tracing::warn!(path = %jail_dir.display(), %error, "could not remove an orphaned jail");
                }
            }
        }
        report
            .removed_orphan_dirs
            .extend(self.reconcile_snapshots().await?);
        report.removed_orphan_files = self.images.remove_unreferenced_files()?;
        for capability in &self.capabilities {
            report
                .removed_orphan_files
                .extend(capability.reconcile().await?);
        }
        let state_dir = self.paths.root.clone();
        let live: Vec<String> = known.clone();
        let released = tokio::task::spawn_blocking(move || {
            banger_disk::clone::devices::release_leaked(
                &banger_disk::command::HostCommands,
                Path::new("/sys"),
                &state_dir,
                &|vm_id| live.iter().any(|known| known == vm_id),
            )
        })
        .await;
        match released {
            Ok(Ok(released)) => report.released_devices = format!("{released:?}"),
            Ok(Err(error)) => tracing::error!(%error, "failed to release leaked disk devices"),
            Err(error) => tracing::error!(%error, "disk device release task failed"),
        }
        self.operations
            .fail_orphans("Interrupted: the daemon stopped during the operation")?;
        Ok(report)
    }

    /// A root disk file grown by `vm set --disk-size` whose new size the
    /// daemon did not live to record: the file only ever grows, so it is
    /// right.
    fn record_grown_root_disk(&self, vm: &mut Vm) -> Result<(), VmError> {
        if self.clone.kind() == banger_disk::clone::StrategyKind::DmSnapshot {
            return Ok(());
        }
        let path = Path::new(&vm.dir).join(banger_disk::clone::ROOT_DISK_FILE);
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.len() > vm.disk_bytes => {
                tracing::warn!(vm = %vm.name, recorded = vm.disk_bytes, actual = metadata.len(), "recording the root disk size of an interrupted resize");
                vm.disk_bytes = metadata.len();
                self.store.update_vm(vm)?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn reconcile_vm(
        self: &Arc<Self>,
        mut vm: Vm,
        interrupted_creates: &[String],
        report: &mut ReconcileReport,
    ) -> Result<(), VmError> {
        let directory = PathBuf::from(&vm.dir);
        let adopted = match vm.pid {
            Some(pid) => match self.adopt(&vm, &directory, pid).await {
                Ok(found) => found,
                Err(error) => {
                    // Whether it still runs is unknown: leave the VM as
                    // recorded rather than risk a second VMM on its disk.
                    tracing::warn!(vm = %vm.name, pid, %error, "cannot check the VMM; leaving the VM as recorded");
                    report.unresolved.push(vm.name);
                    return Ok(());
                }
            },
            None => None,
        };
        if interrupted_creates.contains(&vm.id) || vm.state == VmState::Creating {
            // An interrupted create leaves nothing.
            if let Some(handle) = adopted {
                let _ = self.backends.of(&handle).kill(&handle).await;
            }
            for capability in self.capabilities.iter().rev() {
                if let Err(error) = capability.on_interrupted_create(&vm).await {
                    tracing::error!(vm = %vm.name, capability = capability.name(), %error, "failed to release what an interrupted create made");
                }
            }
            self.remove_leftover_disk(&vm.id, &directory).await;
            self.store.delete_vm(&vm.id)?;
            report.removed_interrupted.push(vm.name);
            return Ok(());
        }
        self.record_grown_root_disk(&mut vm)?;
        let Some(next) = state::after_restart(vm.state, adopted.is_some()) else {
            match adopted {
                Some(handle) if matches!(vm.state, VmState::Running | VmState::Paused) => {
                    self.processes().insert(vm.id.clone(), handle.clone());
                    self.supervise(&vm.id, handle);
                    report.adopted.push(vm.name);
                }
                _ if vm.pid.is_some() => {
                    vm.pid = None;
                    self.store.update_vm(&vm)?;
                }
                _ => {}
            }
            return Ok(());
        };
        if let Some(handle) = adopted {
            let _ = self.backends.of(&handle).kill(&handle).await;
        }
        self.backends.get(vm.backend).release(&directory);
        if next == VmState::Crashed {
            vm.error = Some("The VMM process ended while the daemon was not running".to_owned());
            report.crashed.push(vm.name.clone());
        } else {
            report.stopped.push(vm.name.clone());
        }
        vm.state = next;
        vm.pid = None;
        vm.started_at = None;
        self.store.update_vm(&vm)?;
        Ok(())
    }
}

/// Waits (at most a second) until none of `pids` runs any more.
async fn wait_until_gone(pids: &[u32]) {
    for _ in 0..100 {
        if !pids.iter().any(|&pid| banger_vmm::process::is_running(pid)) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Every jail under `jail_dir` (`<binary>/<ID>`) with the pid of its
/// Firecracker if that still runs (its pid file names a live process whose
/// command line carries `--id <ID>`).
fn jailed_vmms_under(jail_dir: &Path) -> Vec<(Option<u32>, PathBuf)> {
    let mut jails = Vec::new();
    let Ok(binaries) = std::fs::read_dir(jail_dir) else {
        return jails;
    };
    for binary in binaries.flatten() {
        let Ok(vms) = std::fs::read_dir(binary.path()) else {
            continue;
        };
        let pid_file = format!("{}.pid", binary.file_name().to_string_lossy());
        for vm in vms.flatten() {
            let pid = std::fs::read_to_string(vm.path().join("root").join(&pid_file))
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
                .filter(|&pid| {
                    banger_vmm::process::read_command_line(pid)
                        .ok()
                        .flatten()
                        .is_some_and(|args| {
                            banger_vmm::process::has_flag_value(&args, "--id", &vm.file_name())
                        })
                });
            jails.push((pid, vm.path()));
        }
    }
    jails
}

/// Processes that are VMMs of this state dir, whoever started them: see
/// [`is_vmm_of`].
fn vmm_processes_under(vms_dir: &Path, jail_dir: &Path) -> Vec<u32> {
    let own = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let arguments: Vec<std::ffi::OsString> = cmdline
            .split(|&byte| byte == 0)
            .map(|argument| std::ffi::OsStr::from_bytes(argument).to_owned())
            .collect();
        if pid != own && is_vmm_of(&arguments, vms_dir, jail_dir) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a command line is a VMM (or a jailer starting one) of this state
/// dir: Firecracker's `--api-sock VMS_DIR/ID/….sock`, QEMU's
/// `-chardev socket,…,path=VMS_DIR/ID/….sock` or `-qmp unix:VMS_DIR/ID/….sock,…`,
/// or a jailer's `--chroot-base-dir JAIL_DIR`. Only those VMM flags count:
/// another program that merely names a socket there (a host-mode guest
/// agent's `--listen-unix`, a user's `socat`) is not a VMM.
fn is_vmm_of(arguments: &[std::ffi::OsString], vms_dir: &Path, jail_dir: &Path) -> bool {
    let prefix = format!("{}/", vms_dir.display());
    let vm_socket = |path: &str| path.starts_with(&prefix) && path.ends_with(".sock");
    let firecracker = arguments
        .windows(2)
        .any(|pair| pair[0] == "--api-sock" && vm_socket(&pair[1].to_string_lossy()));
    let qemu = arguments.windows(2).any(|pair| {
        let flag = pair[0].to_string_lossy();
        (flag == "-chardev" || flag == "-qmp")
            && pair[1].to_string_lossy().split(',').any(|part| {
                part.strip_prefix("path=")
                    .or_else(|| part.strip_prefix("unix:"))
                    .is_some_and(vm_socket)
            })
    });
    let jailer =
        banger_vmm::process::has_flag_value(arguments, "--chroot-base-dir", jail_dir.as_os_str());
    firecracker || qemu || jailer
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn args(line: &[&str]) -> Vec<OsString> {
        line.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_vmm_flags_make_a_process_a_vmm_of_this_state_dir() {
        let vms = Path::new("/var/lib/banger/vms");
        let jail = Path::new("/var/lib/banger/jail");
        let is_vmm = |line: &[&str]| is_vmm_of(&args(line), vms, jail);
        assert!(is_vmm(&[
            "firecracker",
            "--api-sock",
            "/var/lib/banger/vms/abc/firecracker.sock"
        ]));
        assert!(is_vmm(&[
            "qemu-system-x86_64",
            "-chardev",
            "socket,id=qmp,path=/var/lib/banger/vms/abc/qmp.sock,server=on,wait=off"
        ]));
        assert!(is_vmm(&[
            "qemu-system-x86_64",
            "-qmp",
            "unix:/var/lib/banger/vms/abc/qmp.sock,server"
        ]));
        assert!(is_vmm(&[
            "jailer",
            "--id",
            "abc",
            "--chroot-base-dir",
            "/var/lib/banger/jail"
        ]));
        // Programs that merely name a socket there are not VMMs.
        assert!(!is_vmm(&[
            "banger-agent",
            "--listen-unix",
            "/var/lib/banger/vms/abc/agent.sock"
        ]));
        assert!(!is_vmm(&[
            "socat",
            "-",
            "UNIX-CONNECT:/var/lib/banger/vms/abc/firecracker.sock"
        ]));
        // Another state dir's VMMs are not ours.
        assert!(!is_vmm(&[
            "firecracker",
            "--api-sock",
            "/srv/other/vms/abc/firecracker.sock"
        ]));
        assert!(!is_vmm(&["jailer", "--chroot-base-dir", "/srv/other/jail"]));
    }
}
