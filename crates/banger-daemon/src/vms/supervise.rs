//! The VMM process of a VM, shared by create and start:
//!
//! 1. [`VmService::spawn_vmm`] builds the launch spec (kernel, root disk,
//!    vsock, then each capability's `launch` hook: NIC and `banger.net=`,
//!    work disk), spawns the VMM, records its pid in the process table and
//!    the row, and starts watching it. Nothing is left running on error.
//! 2. [`VmService::boot_vmm`] starts the guest; the VM is `running`.
//! 3. [`VmService::after_boot`] runs the capabilities' after-boot hooks
//!    (`agent ready`) for start; create runs them as stages.
//! 4. The watcher ([`VmService::supervise`]): when the process exits while it
//!    is still the VM's process (nobody stopped or discarded it), the VM
//!    takes the state [`super::state::after_exit`] gives.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_disk::clone::RootDisk;
use banger_proto::{Kernel, Vm, VmState};
use banger_vmm::{DriveSpec, LaunchSpec, VmmHandle};

use super::{state, VmError, VmService};
use crate::ids::now;

impl VmService {
    /// The launch spec: the VM's own parts, then every capability's.
    pub(super) async fn launch_spec(
        &self,
        vm: &Vm,
        kernel: &Kernel,
        root_disk: &RootDisk,
    ) -> Result<LaunchSpec, VmError> {
        let directory = PathBuf::from(&vm.dir);
        let (_, vsock) = self.backends.get(vm.backend).agent_endpoint(&directory);
        let mut spec = LaunchSpec {
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            runtime_dir: directory,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel_path: PathBuf::from(&kernel.kernel_path),
            initrd_path: kernel.initrd_path.as_ref().map(PathBuf::from),
            kernel_cmdline: format!("{} banger.name={}", kernel.cmdline, vm.name),
            drives: vec![DriveSpec {
                id: "rootfs".to_owned(),
                path: root_disk.path.clone(),
                is_root: true,
                read_only: false,
            }],
            network_interfaces: Vec::new(),
            vsock,
        };
        for capability in &self.capabilities {
            capability.launch(vm, &mut spec).await?;
        }
        Ok(spec)
    }

    /// Spawns and configures the VMM, records its pid, and starts
    /// supervising it. Nothing is left running on error.
    pub(super) async fn spawn_vmm(
        self: &Arc<Self>,
        vm: &mut Vm,
        kernel: &Kernel,
        root_disk: &RootDisk,
    ) -> Result<VmmHandle, VmError> {
        let spec = self.launch_spec(vm, kernel, root_disk).await?;
        let handle = self
            .backends
            .get(vm.backend)
            .spawn(&spec)
            .await
            .map_err(|error| VmError::StartVmm(Box::new(error)))?;
        self.processes().insert(vm.id.clone(), handle.clone());
        vm.pid = Some(handle.pid());
        if let Err(error) = self.store.update_vm(vm) {
            self.discard_process(&vm.id, &handle).await;
            vm.pid = None;
            return Err(error.into());
        }
        self.supervise(&vm.id, handle.clone());
        Ok(handle)
    }

    pub(super) async fn boot_vmm(&self, vm: &mut Vm, handle: &VmmHandle) -> Result<(), VmError> {
        self.backends
            .of(handle)
            .boot(handle)
            .await
            .map_err(|error| VmError::Boot(Box::new(error)))?;
        if handle.has_exited() {
            return Err(VmError::ExitedAfterBoot);
        }
        vm.state = VmState::Running;
        vm.started_at = Some(now());
        vm.error = None;
        self.store.update_vm(vm)?;
        Ok(())
    }

    /// Every capability's after-boot work, in list order (start's
    /// equivalent of create's after-boot stages).
    pub(super) async fn after_boot(&self, vm: &Vm, handle: &VmmHandle) -> Result<(), VmError> {
        for capability in &self.capabilities {
            if capability.after_boot_stage().is_some() {
                capability.after_boot(vm, handle).await?;
            }
        }
        Ok(())
    }

    /// Kills a VMM process we no longer want and forgets it.
    pub(super) async fn discard_process(&self, vm_id: &str, handle: &VmmHandle) {
        self.forget_process(vm_id, handle);
        self.exited(vm_id);
        if let Err(error) = self.backends.of(handle).kill(handle).await {
            tracing::error!(vm = vm_id, pid = handle.pid(), %error, "failed to kill VMM");
        }
    }

    /// The capabilities' after-exit hooks.
    pub(super) fn exited(&self, vm_id: &str) {
        for capability in &self.capabilities {
            capability.after_exit(vm_id);
        }
    }

    pub(super) fn forget_process(&self, vm_id: &str, handle: &VmmHandle) {
        let mut processes = self.processes();
        if processes
            .get(vm_id)
            .is_some_and(|current| current.same_as(handle))
        {
            processes.remove(vm_id);
        }
    }

    /// Watches a VMM process: when it exits while it is still the VM's
    /// process (nobody stopped or discarded it), the VM becomes `stopped`
    /// (the guest powered itself off) or `crashed`.
    pub(super) fn supervise(self: &Arc<Self>, vm_id: &str, handle: VmmHandle) {
        // The console log is capped for as long as the process runs.
        let watched = handle.clone();
        let console = handle.runtime_dir().join(banger_vmm::CONSOLE_LOG_FILE);
        tokio::spawn(super::console::rotate_until(
            console.clone(),
            self.config.vm.console_log_max_bytes(),
            self.consoles.of(&console),
            async move {
                watched.wait_exit().await;
            },
        ));
        let this = Arc::clone(self);
        let vm_id = vm_id.to_owned();
        tokio::spawn(async move {
            let exit = handle.wait_exit().await;
            let still_current = this
                .process_of(&vm_id)
                .is_some_and(|current| current.same_as(&handle));
            if !still_current {
                return;
            }
            let lock = this.lock_of(&vm_id);
            let _guard = lock.lock().await;
            if this
                .process_of(&vm_id)
                .is_none_or(|current| !current.same_as(&handle))
            {
                return;
            }
            this.forget_process(&vm_id, &handle);
            this.exited(&vm_id);
            let Some(mut vm) = this.get(&vm_id) else {
                return;
            };
            let Some(next) = state::after_exit(vm.state, exit.code() == Some(0)) else {
                return;
            };
            // Resources first, so whoever sees the new state sees them gone.
            this.backends.of(&handle).release(handle.runtime_dir());
            vm.pid = None;
            vm.started_at = None;
            if next == VmState::Stopped {
                tracing::info!(vm = %vm.name, "guest shut down");
            } else {
                tracing::warn!(vm = %vm.name, pid = handle.pid(), ?exit, "VMM exited unexpectedly");
                vm.error = Some(format!(
                    "The VMM process {} exited unexpectedly ({exit})",
                    handle.pid()
                ));
            }
            vm.state = next;
            if let Err(error) = this.store.update_vm(&vm) {
                tracing::error!(vm = %vm.name, %error, "failed to record VMM exit");
            }
        });
    }

    /// Attaches the root disk of an existing VM (start).
    pub(super) async fn attach_root_disk(&self, vm: &Vm) -> Result<RootDisk, VmError> {
        let image = self.images.image(&vm.image)?;
        let strategy = Arc::clone(&self.clone);
        let (vm_id, directory) = (vm.id.clone(), PathBuf::from(&vm.dir));
        let attached = tokio::task::spawn_blocking(move || {
            strategy.attach(&vm_id, Path::new(&image.path), &directory)
        })
        .await
        .map_err(|source| VmError::Task {
            task: "Root disk attach",
            source,
        })?;
        attached.map_err(|source| VmError::NoUsableRootDisk {
            name: vm.name.clone(),
            source: Box::new(source),
        })
    }
}
