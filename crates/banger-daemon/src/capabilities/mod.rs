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
//!
//! A hook fails with a [`CapabilityError`]: the capability's own module
//! error (`WorkDiskError`, `NetworkError`, `AgentError`), kept whole with its
//! kind and hint. It boxes any [`RpcFailure`] rather than being an enum with
//! a variant per capability, because the set of capabilities is open: a new
//! one brings its own error and changes nothing here.

pub mod agent;
pub mod network;
pub mod work_disk;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use banger_proto::{ErrorKind, Vm};
use banger_vmm::{LaunchSpec, VmmHandle};

use crate::error::RpcFailure;

/// What a capability hook fails with; see the module docs. Its message,
/// causes, kind and hint are those of the error it holds.
#[derive(Debug)]
pub struct CapabilityError(Box<dyn RpcFailure>);

impl<E: RpcFailure> From<E> for CapabilityError {
    fn from(error: E) -> Self {
        Self(Box::new(error))
    }
}

impl CapabilityError {
    pub fn kind(&self) -> ErrorKind {
        self.0.kind()
    }

    pub fn hint(&self) -> Option<String> {
        self.0.hint()
    }
}

impl std::fmt::Display for CapabilityError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(formatter)
    }
}

impl std::error::Error for CapabilityError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The caller's choices a create's capabilities act on.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Created stopped: no VMM, no after-boot hooks.
    pub no_start: bool,
    /// `--work-disk`: a size or a detached disk's name.
    pub work_disk: Option<String>,
    /// `-p`: host ports to forward to the VM.
    pub ports: Vec<banger_proto::PublishedPort>,
    /// `--egress`; allow-all when absent.
    pub egress: Option<banger_proto::EgressPolicy>,
    /// `--network-group`.
    pub network_group: Option<String>,
    /// `--from-snapshot` with `--regen-host-keys`: the restored guest
    /// replaces its SSH host keys.
    pub regen_host_keys: bool,
    /// A restore from a snapshot holding a work disk: its copy there, which
    /// the new VM's own work disk starts as.
    pub restore_work_disk: Option<std::path::PathBuf>,
}

impl CreateOptions {
    /// Whether the caller asked for anything only the network gives.
    pub fn wants_network(&self) -> bool {
        !self.ports.is_empty() || self.egress.is_some() || self.network_group.is_some()
    }
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
    fn check(&self, _vm_name: &str, _options: &CreateOptions) -> Result<(), CapabilityError> {
        Ok(())
    }

    /// The create stage this capability's prepare reports as, or `None` to
    /// run without a stage of its own.
    fn prepare_stage(&self, _options: &CreateOptions) -> Option<&'static str> {
        None
    }

    /// Create: makes the VM's resources and records them in `vm` (the VM
    /// service stores it). Cleans up after itself when it fails.
    async fn prepare(
        &self,
        _vm: &mut Vm,
        _options: &CreateOptions,
    ) -> Result<Prepared, CapabilityError> {
        Ok(Prepared::default())
    }

    /// Create and start: adds to the launch spec.
    async fn launch(&self, _vm: &Vm, _spec: &mut LaunchSpec) -> Result<(), CapabilityError> {
        Ok(())
    }

    /// The create stage of [`Self::after_boot`], or `None` when it has no
    /// after-boot work (it is then not called).
    fn after_boot_stage(&self) -> Option<&'static str> {
        None
    }

    /// Create and start, once the guest runs: returns the stage's detail.
    async fn after_boot(
        &self,
        _vm: &Vm,
        _vmm: &VmmHandle,
    ) -> Result<Option<String>, CapabilityError> {
        Ok(None)
    }

    /// A graceful stop is about to ask the VMM.
    async fn before_stop(&self, _vm: &Vm) {}

    /// The VM's VMM process is gone.
    fn after_exit(&self, _vm_id: &str) {}

    /// Delete: releases the VM's resources for good.
    async fn on_delete(&self, _vm: &Vm, _options: DeleteOptions) -> Result<(), CapabilityError> {
        Ok(())
    }

    /// Reconciliation found a create the daemon died in: release whatever
    /// prepare may have made (its undo did not run).
    async fn on_interrupted_create(&self, _vm: &Vm) -> Result<(), CapabilityError> {
        Ok(())
    }

    /// Reconciliation, after every VM was looked at: removes leftovers no
    /// VM accounts for; returns what was removed.
    async fn reconcile(&self) -> Result<Vec<String>, CapabilityError> {
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

    use super::{
        async_trait, Capability, CapabilityError, CreateOptions, DeleteOptions, ErrorKind,
        Prepared, Undo, Vm,
    };
    use crate::error::RpcFailure;
    use banger_vmm::{LaunchSpec, VmmHandle};

    /// The failure a recording capability was told to have.
    #[derive(Debug, thiserror::Error)]
    #[error("{capability} fails at {hook}")]
    pub struct InjectedFailure {
        capability: &'static str,
        hook: String,
    }

    impl RpcFailure for InjectedFailure {
        fn kind(&self) -> ErrorKind {
            ErrorKind::InvalidState
        }
    }

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

        fn call(&self, hook: &str) -> Result<(), InjectedFailure> {
            self.journal.push(format!("{}.{hook}", self.name));
            let fail = *self
                .fail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if fail == Some(hook) {
                return Err(InjectedFailure {
                    capability: self.name,
                    hook: hook.to_owned(),
                });
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

        async fn prepare(
            &self,
            _vm: &mut Vm,
            _options: &CreateOptions,
        ) -> Result<Prepared, CapabilityError> {
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

        async fn launch(&self, _vm: &Vm, spec: &mut LaunchSpec) -> Result<(), CapabilityError> {
            self.call("launch")?;
            spec.kernel_cmdline.push_str(&format!(" {}=1", self.name));
            Ok(())
        }

        fn after_boot_stage(&self) -> Option<&'static str> {
            self.after_boot_stage
        }

        async fn after_boot(
            &self,
            _vm: &Vm,
            _vmm: &VmmHandle,
        ) -> Result<Option<String>, CapabilityError> {
            self.call("after_boot")?;
            Ok(None)
        }

        async fn before_stop(&self, _vm: &Vm) {
            let _ = self.call("before_stop");
        }

        fn after_exit(&self, _vm_id: &str) {
            let _ = self.call("after_exit");
        }

        async fn on_delete(
            &self,
            _vm: &Vm,
            _options: DeleteOptions,
        ) -> Result<(), CapabilityError> {
            Ok(self.call("on_delete")?)
        }

        async fn on_interrupted_create(&self, _vm: &Vm) -> Result<(), CapabilityError> {
            Ok(self.call("on_interrupted_create")?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::WorkDiskError;
    use crate::error::{chain, DaemonError};

    #[test]
    fn a_capability_error_is_the_error_it_holds() {
        let error = CapabilityError::from(WorkDiskError::Remove {
            path: "/disks/x.ext4".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert_eq!(error.kind(), ErrorKind::Failed);
        assert_eq!(error.to_string(), "Failed to remove /disks/x.ext4");
        assert_eq!(
            chain(&error),
            "Failed to remove /disks/x.ext4: permission denied"
        );
        let exists = CapabilityError::from(WorkDiskError::Exists {
            name: "dev-work".to_owned(),
        });
        let error: DaemonError = crate::vms::VmError::from(exists).into();
        let rpc = error.to_rpc();
        assert_eq!(rpc.kind(), ErrorKind::AlreadyExists);
        assert_eq!(rpc.message, "A work disk named `dev-work` exists");
        assert_eq!(
            rpc.hint(),
            Some("attach it with `--work-disk dev-work`, or remove it with `banger disk rm dev-work`")
        );
    }
}
