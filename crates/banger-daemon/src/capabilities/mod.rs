//! Capabilities: what a VM gets besides its VMM process and root disk
//! (a network identity, a DNS name, egress, a work disk, an agent
//! connection), each as one [`Capability`] with hooks at fixed points of the
//! VM lifecycle.
//!
//! The list is built in the composition root (`lib.rs::run`) and handed to
//! the VM service, which calls every capability's hook, in list order, at
//! these points:
//!
//! 0. **check** (create, before anything is made): refuses what cannot be
//!    honoured.
//! 1. **prepare** (create, after the root disk is cloned): makes the VM's
//!    host resources, records them in the VM row, and returns an [`Undo`].
//!    A capability with a [`Capability::prepare_stage`] reports as that
//!    create stage; one without runs silently. When a later create step
//!    fails or is cancelled, the undos run once each, in reverse order.
//! 2. **launch** (create and start, before the VMM spawns): adds to the
//!    [`LaunchSpec`] (drives, NICs, kernel arguments), getting back what the
//!    host lost since prepare (a tap after a host reboot).
//! 3. **after boot** (create and start): the guest runs; a capability with a
//!    [`Capability::after_boot_stage`] reports as that create stage.
//! 4. **before stop** (a graceful stop, before the VMM is asked).
//! 5. **after exit** (the VMM process is gone: stopped, killed, crashed).
//! 6. **delete**: releases the VM's resources for good.
//! 7. **reconcile** (daemon start): an interrupted create's leftovers are
//!    released ([`Capability::on_interrupted_create`]), then each
//!    capability removes orphans of its own ([`Capability::reconcile`]).
//!
//! Adding a capability is its own file and one line in the list.

pub mod agent;
pub mod network;
pub mod work_disk;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use banger_proto::Vm;
use banger_vmm::{LaunchSpec, VmmHandle};

use crate::error::DaemonResult;

/// The caller's choices a create's capabilities act on.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Created stopped: no VMM, no after-boot hooks.
    pub no_start: bool,
    /// `--work-disk`: a size or a detached disk's name.
    pub work_disk: Option<String>,
}

/// What `vm delete` asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteOptions {
    /// Keep the work disk, detached.
    pub keep_work_disk: bool,
}

/// Work to run if a later create step fails: a future that is only polled
/// at rollback (futures do nothing until polled), so it is made where the
/// thing it undoes was made.
pub struct Undo(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Undo {
    pub fn new(work: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Box::pin(work))
    }

    pub async fn run(self) {
        self.0.await;
    }
}

/// What a prepare made: the stage's detail line and its undo.
#[derive(Default)]
pub struct Prepared {
    pub detail: Option<String>,
    pub undo: Option<Undo>,
}

/// One capability's lifecycle hooks. Every hook has a default that does
/// nothing, so a capability implements only the points it cares about.
#[async_trait]
pub trait Capability: Send + Sync {
    /// A short name, for logs.
    fn name(&self) -> &'static str;

    /// Create, before anything is made: refuses choices this capability
    /// cannot honour (a taken work-disk name).
    fn check(&self, _vm_name: &str, _options: &CreateOptions) -> DaemonResult<()> {
        Ok(())
    }

    /// The create stage this capability's prepare reports as, or `None` to
    /// run without a stage of its own.
    fn prepare_stage(&self, _options: &CreateOptions) -> Option<&'static str> {
        None
    }

    /// Create: makes the VM's resources and records them in `vm` (the VM
    /// service stores it). Cleans up after itself when it fails.
    async fn prepare(&self, _vm: &mut Vm, _options: &CreateOptions) -> DaemonResult<Prepared> {
        Ok(Prepared::default())
    }

    /// Create and start: adds to the launch spec.
    async fn launch(&self, _vm: &Vm, _spec: &mut LaunchSpec) -> DaemonResult<()> {
        Ok(())
    }

    /// The create stage of [`Self::after_boot`], or `None` when it has no
    /// after-boot work (it is then not called).
    fn after_boot_stage(&self) -> Option<&'static str> {
        None
    }

    /// Create and start, once the guest runs: returns the stage's detail.
    async fn after_boot(&self, _vm: &Vm, _vmm: &VmmHandle) -> DaemonResult<Option<String>> {
        Ok(None)
    }

    /// A graceful stop is about to ask the VMM.
    async fn before_stop(&self, _vm: &Vm) {}

    /// The VM's VMM process is gone.
    fn after_exit(&self, _vm_id: &str) {}

    /// Delete: releases the VM's resources for good.
    async fn on_delete(&self, _vm: &Vm, _options: DeleteOptions) -> DaemonResult<()> {
        Ok(())
    }

    /// Reconciliation found a create the daemon died in: release whatever
    /// prepare may have made (its undo did not run).
    async fn on_interrupted_create(&self, _vm: &Vm) -> DaemonResult<()> {
        Ok(())
    }

    /// Reconciliation, after every VM was looked at: removes leftovers no
    /// VM accounts for; returns what was removed.
    async fn reconcile(&self) -> DaemonResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// Fills in what the VM record shows that only this capability knows
    /// (its DNS name).
    fn describe(&self, _vm: &mut Vm) {}
}

/// The capability list the VM service runs.
pub type Capabilities = Vec<Arc<dyn Capability>>;

#[cfg(test)]
pub mod recording {
    //! A capability that records its hook calls and fails where told.

    use std::sync::{Arc, Mutex};

    use super::{async_trait, Capability, CreateOptions, DeleteOptions, Prepared, Undo, Vm};
    use crate::error::{DaemonError, DaemonResult};
    use banger_vmm::{LaunchSpec, VmmHandle};

    /// The calls made, across every recording capability sharing it.
    #[derive(Clone, Default)]
    pub struct Journal(Arc<Mutex<Vec<String>>>);

    impl Journal {
        pub fn push(&self, entry: String) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(entry);
        }

        pub fn entries(&self) -> Vec<String> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }

        pub fn clear(&self) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }

    pub struct RecordingCapability {
        pub name: &'static str,
        pub journal: Journal,
        /// The hook (`prepare`, `launch`, `after_boot`) that fails.
        pub fail: Mutex<Option<&'static str>>,
        pub after_boot_stage: Option<&'static str>,
    }

    impl RecordingCapability {
        pub fn new(name: &'static str, journal: &Journal) -> Self {
            Self {
                name,
                journal: journal.clone(),
                fail: Mutex::new(None),
                after_boot_stage: None,
            }
        }

        pub fn fail_at(&self, hook: Option<&'static str>) {
            *self
                .fail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
        }

        fn call(&self, hook: &str) -> DaemonResult<()> {
            self.journal.push(format!("{}.{hook}", self.name));
            let fail = *self
                .fail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if fail == Some(hook) {
                return Err(DaemonError::invalid_state(format!(
                    "{} fails at {hook}",
                    self.name
                )));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Capability for RecordingCapability {
        fn name(&self) -> &'static str {
            self.name
        }

        fn prepare_stage(&self, _options: &CreateOptions) -> Option<&'static str> {
            Some(self.name)
        }

        async fn prepare(&self, _vm: &mut Vm, _options: &CreateOptions) -> DaemonResult<Prepared> {
            self.call("prepare")?;
            let journal = self.journal.clone();
            let name = self.name;
            Ok(Prepared {
                detail: None,
                undo: Some(Undo::new(async move {
                    journal.push(format!("{name}.undo"));
                })),
            })
        }

        async fn launch(&self, _vm: &Vm, spec: &mut LaunchSpec) -> DaemonResult<()> {
            self.call("launch")?;
            spec.kernel_cmdline.push_str(&format!(" {}=1", self.name));
            Ok(())
        }

        fn after_boot_stage(&self) -> Option<&'static str> {
            self.after_boot_stage
        }

        async fn after_boot(&self, _vm: &Vm, _vmm: &VmmHandle) -> DaemonResult<Option<String>> {
            self.call("after_boot").map(|()| None)
        }

        async fn before_stop(&self, _vm: &Vm) {
            let _ = self.call("before_stop");
        }

        fn after_exit(&self, _vm_id: &str) {
            let _ = self.call("after_exit");
        }

        async fn on_delete(&self, _vm: &Vm, _options: DeleteOptions) -> DaemonResult<()> {
            self.call("on_delete")
        }

        async fn on_interrupted_create(&self, _vm: &Vm) -> DaemonResult<()> {
            self.call("on_interrupted_create")
        }
    }
}
