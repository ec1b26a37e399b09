//! The work-disk capability: a persistent ext4 disk made or attached at
//! create (stage `work disk`; a restore copies the snapshot's), given to
//! the VMM at every launch, deleted or kept detached at delete. The disks
//! themselves are [`WorkDisks`].

use std::sync::Arc;

use async_trait::async_trait;
use banger_proto::Vm;
use banger_vmm::LaunchSpec;

use super::{Capability, CapabilityError, CreateOptions, DeleteOptions, Prepared, Undo};
use crate::disks::WorkDisks;

pub struct WorkDiskCapability {
    disks: Arc<WorkDisks>,
}

impl WorkDiskCapability {
    pub fn new(disks: Arc<WorkDisks>) -> Self {
        Self { disks }
    }
}

#[async_trait]
impl Capability for WorkDiskCapability {
    fn name(&self) -> &'static str {
        "work disk"
    }

    fn check(&self, vm_name: &str, options: &CreateOptions) -> Result<(), CapabilityError> {
        if options.restore_work_disk.is_some() {
            return Ok(self.disks.check_copy(vm_name)?);
        }
        match &options.work_disk {
            Some(spec) => Ok(self.disks.check(vm_name, spec)?),
            None => Ok(()),
        }
    }

    fn prepare_stage(&self, options: &CreateOptions) -> Option<&'static str> {
        (options.work_disk.is_some() || options.restore_work_disk.is_some()).then_some("work disk")
    }

    async fn prepare(
        &self,
        vm: &mut Vm,
        options: &CreateOptions,
    ) -> Result<Prepared, CapabilityError> {
        let prepared = match (&options.restore_work_disk, &options.work_disk) {
            (Some(copy), _) => self.disks.copy_from(vm, copy).await?,
            (None, Some(spec)) => self.disks.prepare(vm, spec).await?,
            (None, None) => return Ok(Prepared::default()),
        };
        let detail = format!(
            "{} {} ({} MiB)",
            match (&options.restore_work_disk, prepared.created) {
                (Some(_), _) => "copied from the snapshot:",
                (None, true) => "made",
                (None, false) => "attached",
            },
            prepared.disk.name,
            prepared.disk.size_bytes >> 20
        );
        vm.work_disk = Some(prepared.disk.name.clone());
        let disks = Arc::clone(&self.disks);
        let (vm_id, created) = (vm.id.clone(), prepared.created);
        Ok(Prepared {
            detail: Some(detail),
            // A disk the create made is deleted; one it attached is detached.
            undo: Some(Undo::new(async move {
                if let Err(error) = disks.release(&vm_id, !created) {
                    tracing::error!(%error, "rollback failed to release the work disk");
                }
            })),
        })
    }

    async fn launch(&self, vm: &Vm, spec: &mut LaunchSpec) -> Result<(), CapabilityError> {
        spec.drives.extend(self.disks.drive(&vm.id)?);
        Ok(())
    }

    async fn on_delete(&self, vm: &Vm, options: DeleteOptions) -> Result<(), CapabilityError> {
        Ok(self
            .disks
            .release(&vm.id, options.keep_work_disk)
            .map(drop)?)
    }

    async fn on_interrupted_create(&self, vm: &Vm) -> Result<(), CapabilityError> {
        Ok(self.disks.release_interrupted(vm)?)
    }

    async fn reconcile(&self) -> Result<Vec<String>, CapabilityError> {
        Ok(self
            .disks
            .remove_orphans()?
            .into_iter()
            .map(|path| path.display().to_string())
            .collect())
    }
}
