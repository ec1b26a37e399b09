//! Start, stop, restart, delete and set. Each takes the VM's lock, reloads
//! the row, asks the state machine ([`super::state::decide`]) and acts on
//! its answer, calling the capabilities' hooks on the way.

use std::path::Path;
use std::sync::Arc;

use banger_proto::{parse_size, SetVmParams, Vm, VmState};

use super::state::{self, Decision, Request};
use super::{validate_size, VmError, VmService};
use crate::capabilities::DeleteOptions;
use crate::error::chain;

impl VmService {
    pub async fn start(self: &Arc<Self>, reference: &str) -> Result<Vm, VmError> {
        let vm = self.find(reference)?;
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.reload(&vm)?;
        match state::decide(vm.state, Request::Start) {
            Decision::Proceed => {}
            Decision::AlreadyDone => return Ok(vm),
            decision => return Err(self.refused(&vm, decision, Request::Start)),
        }
        let root_disk = self.attach_root_disk(&vm).await?;
        let kernel = self.images.kernel(&vm.kernel)?;
        vm.state = VmState::Starting;
        vm.error = None;
        self.store.update_vm(&vm)?;
        crate::fault::pause_at(|| "start:spawn vmm".to_owned());
        let outcome = match self.spawn_vmm(&mut vm, &kernel, &root_disk).await {
            Ok(handle) => {
                crate::fault::pause_at(|| "start:boot".to_owned());
                let booted = match self.boot_vmm(&mut vm, &handle).await {
                    Ok(()) => {
                        crate::fault::pause_at(|| "start:after boot".to_owned());
                        self.after_boot(&vm, &handle).await
                    }
                    outcome => outcome,
                };
                if booted.is_err() {
                    self.discard_process(&vm.id, &handle).await;
                }
                booted
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => Ok(vm),
            Err(error) => {
                vm.state = VmState::Failed;
                vm.pid = None;
                vm.error = Some(chain(&error));
                self.store.update_vm(&vm)?;
                Err(error)
            }
        }
    }

    pub async fn stop(self: &Arc<Self>, reference: &str, force: bool) -> Result<Vm, VmError> {
        let vm = self.find(reference)?;
        // Refused before waiting for the lock, which the create holds.
        if vm.state == VmState::Creating {
            return Err(self.refused(&vm, Decision::BusyCreating, Request::Stop));
        }
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.reload(&vm)?;
        match state::decide(vm.state, Request::Stop) {
            Decision::Proceed => {}
            Decision::AlreadyDone => return Ok(vm),
            Decision::Record(next) => {
                vm.state = next;
                self.store.update_vm(&vm)?;
                return Ok(vm);
            }
            decision => return Err(self.refused(&vm, decision, Request::Stop)),
        }
        if let Some(handle) = self.process_of(&vm.id) {
            if vm.state == VmState::Paused && !force {
                // A paused guest cannot hear the shutdown request.
                if let Err(error) = self.backends.of(&handle).resume(&handle).await {
                    tracing::warn!(vm = %vm.name, %error, "could not resume the paused VM to stop it");
                }
            }
            vm.state = VmState::Stopping;
            self.store.update_vm(&vm)?;
            crate::fault::pause_at(|| "stop:stop vmm".to_owned());
            if !force {
                for capability in &self.capabilities {
                    capability.before_stop(&vm).await;
                }
            }
            let backend = self.backends.of(&handle);
            let outcome = if force {
                backend.kill(&handle).await.map(|()| None)
            } else {
                backend
                    .stop(&handle, self.config.stop_grace())
                    .await
                    .map(Some)
            };
            if let Err(error) = outcome {
                tracing::warn!(vm = %vm.name, %error, "graceful stop failed; killing");
                backend
                    .kill(&handle)
                    .await
                    .map_err(|error| VmError::KillVmm(Box::new(error)))?;
            }
            self.forget_process(&vm.id, &handle);
            self.exited(&vm.id);
            crate::fault::pause_at(|| "stop:record".to_owned());
        }
        vm.state = VmState::Stopped;
        vm.pid = None;
        vm.started_at = None;
        self.store.update_vm(&vm)?;
        Ok(vm)
    }

    pub async fn restart(self: &Arc<Self>, reference: &str) -> Result<Vm, VmError> {
        let vm = self.stop(reference, false).await?;
        self.start(&vm.id).await
    }

    pub async fn delete(
        self: &Arc<Self>,
        reference: &str,
        force: bool,
        keep_work_disk: bool,
    ) -> Result<Vm, VmError> {
        let request = Request::Delete { force };
        let vm = self.find(reference)?;
        // Decided before waiting for the lock, which a create holds.
        match state::decide(vm.state, request) {
            Decision::CancelCreate => {
                if let Some(operation) = self.operations.running_for_vm(&vm.id) {
                    self.operations.cancel(&operation.id)?;
                }
            }
            Decision::BusyCreating => {
                return Err(self.refused(&vm, Decision::BusyCreating, request))
            }
            _ => {}
        }
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let Some(vm) = self.store.get_vm(&vm.id)? else {
            // A cancelled create removed it while we waited.
            return Ok(vm);
        };
        match state::decide(vm.state, request) {
            Decision::Proceed | Decision::CancelCreate => {}
            decision => return Err(self.refused(&vm, decision, request)),
        }
        crate::fault::pause_at(|| "delete:discard process".to_owned());
        if let Some(handle) = self.process_of(&vm.id) {
            self.discard_process(&vm.id, &handle).await;
        }
        crate::fault::pause_at(|| "delete:release".to_owned());
        let options = DeleteOptions { keep_work_disk };
        // Newest first, as a rollback would.
        for capability in self.capabilities.iter().rev() {
            capability.on_delete(&vm, options).await?;
        }
        crate::fault::pause_at(|| "delete:remove disk".to_owned());
        self.remove_disk(&vm.id, Path::new(&vm.dir)).await?;
        crate::fault::pause_at(|| "delete:forget row".to_owned());
        self.store.delete_vm(&vm.id)?;
        self.forget_lock(&vm.id);
        Ok(vm)
    }

    pub async fn set(self: &Arc<Self>, params: SetVmParams) -> Result<Vm, VmError> {
        if params.vcpus.is_none() && params.memory_mib.is_none() && params.disk_size.is_none() {
            return Err(VmError::NothingToChange);
        }
        let disk_bytes = params
            .disk_size
            .as_deref()
            .map(|size| parse_size(size).map_err(|reason| VmError::InvalidSize { reason }))
            .transpose()?;
        let vm = self.find(&params.vm)?;
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.reload(&vm)?;
        let decision = state::decide(vm.state, Request::Change);
        if decision != Decision::Proceed {
            return Err(self.refused(&vm, decision, Request::Change));
        }
        let vcpus = params.vcpus.unwrap_or(vm.vcpus);
        let memory_mib = params.memory_mib.unwrap_or(vm.memory_mib);
        validate_size(vcpus, memory_mib)?;
        if let Some(bytes) = disk_bytes {
            self.grow_root_disk(&vm, bytes).await?;
            vm.disk_bytes = bytes;
        }
        vm.vcpus = vcpus;
        vm.memory_mib = memory_mib;
        self.store.update_vm(&vm)?;
        Ok(vm)
    }

    /// Grows a stopped VM's root disk file (the guest agent grows its file
    /// system at the next boot).
    async fn grow_root_disk(&self, vm: &Vm, bytes: u64) -> Result<(), VmError> {
        if bytes < vm.disk_bytes {
            return Err(VmError::ShrinkRootDisk {
                name: vm.name.clone(),
                size_mib: vm.disk_bytes >> 20,
            });
        }
        if self.clone.kind() == banger_disk::clone::StrategyKind::DmSnapshot {
            return Err(VmError::GrowDmSnapshot {
                name: vm.name.clone(),
            });
        }
        let path = Path::new(&vm.dir).join(banger_disk::clone::ROOT_DISK_FILE);
        crate::disks::check_disk_size(
            Path::new(&vm.dir),
            vm.disk_bytes,
            bytes,
            self.config.vm.max_disk_bytes(),
        )?;
        crate::disks::grow(&path, bytes).await?;
        crate::fault::pause_at(|| "vm resize:record".to_owned());
        Ok(())
    }
}
