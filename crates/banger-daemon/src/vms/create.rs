//! The create operation: validation and name reservation up front, then the
//! create steps as a named, ordered list run in the background.
//!
//! 1. [`VmService::create`] checks the request, reserves the name (a
//!    `creating` row, or, when the catalog must supply the image or kernel,
//!    only a check until the pulls end), and starts the operation.
//! 2. The pulls run as stages (`pull image`, `pull kernel`).
//! 3. [`VmService::plan`] lists the steps for this create; each runs as the
//!    stage it names (some capability prepares run silently; a
//!    [`GuestStage`] such as the workspace copy reports itself) and, when it
//!    made something, leaves an [`Undo`].
//! 4. On failure or cancellation the undos run once each, newest first, and
//!    each stage that had one is reported rolled back; a cancelled create (or
//!    one that failed before its row existed) leaves no row, a failed one
//!    leaves a `failed` row with the error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use banger_agent_proto::client::AgentClient;
use banger_catalog::{ImageEntry, KernelEntry};
use banger_disk::clone::{CloneError, CloneRequest, RootDisk};
use banger_proto::{
    validate_vm_name, CreateVmParams, CreateVmResult, Image, Kernel, OperationState, Vm, VmState,
};
use banger_store::{StoreError, VmLookup};
use banger_vmm::VmmHandle;
use tokio::sync::OwnedMutexGuard;

use super::{remove_dir_if_present, validate_size, VmError, VmService};
use crate::capabilities::{CreateOptions, Undo};
use crate::error::{chain, DaemonResult};
use crate::ids::{new_id, now};
use crate::operations::{LiveOperation, OperationError, Stage};

/// An image or kernel: registered, or to be pulled from the catalog.
enum Artifact<Local, Entry> {
    Local(Local),
    Catalog(Entry),
}

/// What a create works from, decided before its operation starts.
struct CreateInputs {
    image: Artifact<Image, ImageEntry>,
    kernel: Artifact<Kernel, KernelEntry>,
    /// Whether the VM row exists yet (it waits for pulls).
    inserted: bool,
    options: CreateOptions,
    /// Another service's work in the guest (the workspace copy).
    guest_stage: Option<Box<dyn GuestStage>>,
    /// `--from-snapshot`: the snapshot, locked against removal meanwhile.
    snapshot: Option<(banger_proto::Snapshot, OwnedMutexGuard<()>)>,
}

/// Work another service does in the guest as a stage of create, after the
/// capabilities' after-boot work (the workspace copy: `WorkspaceService`).
/// A seam the VM service defines; the stage reports its own stage events.
#[async_trait]
pub trait GuestStage: Send {
    /// The create's operation exists: the stage may accept what it waits
    /// for under that id (the caller's upload).
    fn bind(&mut self, operation_id: &str);

    /// Runs the stage. `agent` resolves to the guest agent's connection,
    /// waited for inside the stage.
    async fn run(
        self: Box<Self>,
        operation: &LiveOperation,
        vm: &Vm,
        agent: AgentWait<'_>,
    ) -> DaemonResult<()>;
}

/// The guest agent's connection, as a future a [`GuestStage`] awaits.
pub type AgentWait<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = DaemonResult<AgentClient>> + Send + 'a>>;

/// One step of create, in the order [`VmService::plan`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The image and kernel files are where their rows say.
    ResolveImage,
    /// The root disk: a copy-on-write clone of the image.
    CloneRootDisk,
    /// Capability `n`'s prepare.
    Prepare(usize),
    /// Spawn and configure the VMM (capabilities add to the launch spec).
    StartVmm,
    /// Start the VMM from a snapshot instead of `StartVmm` and `Boot`.
    Restore,
    /// Start the guest.
    Boot,
    /// Capability `n`'s after-boot work (`agent ready`).
    AfterBoot(usize),
    /// The create's [`GuestStage`] (`workspace`), which reports itself.
    Guest,
    /// The VM is what was asked for: running, or stopped with `--no-start`.
    Ready,
}

/// What the steps share while they run.
struct CreateRun<'a> {
    operation: &'a Arc<LiveOperation>,
    vm: &'a mut Vm,
    image_path: PathBuf,
    kernel: Kernel,
    options: &'a CreateOptions,
    root_disk: Option<RootDisk>,
    /// A copied root disk's flush to the disk, run alongside the next
    /// steps and awaited by `Ready`.
    disk_flush: Option<tokio::task::JoinHandle<Result<(), CloneError>>>,
    vmm: Option<VmmHandle>,
    guest_stage: Option<Box<dyn GuestStage>>,
    snapshot: Option<banger_proto::Snapshot>,
}

/// What a finished step reports and leaves for rollback.
#[derive(Default)]
struct StepDone {
    detail: Option<String>,
    undo: Option<Undo>,
}

impl VmService {
    /// Validates, reserves the name (a `creating` row), and starts the create
    /// operation in the background.
    pub async fn create(
        self: &Arc<Self>,
        params: CreateVmParams,
        mut guest_stage: Option<Box<dyn GuestStage>>,
    ) -> Result<CreateVmResult, VmError> {
        validate_vm_name(&params.name)?;
        let snapshot = match &params.from_snapshot {
            Some(name) => Some(self.restorable_snapshot(name, &params, guest_stage.is_some())?),
            None if params.regen_host_keys => {
                return Err(super::snapshot::SnapshotError::RegenWithoutSnapshot.into())
            }
            None => None,
        };
        let mut params = params;
        if let Some(snapshot) = &snapshot {
            params.image = Some(snapshot.image.clone());
            params.kernel = Some(snapshot.kernel.clone());
            params.vcpus = Some(snapshot.vcpus);
            params.memory_mib = Some(snapshot.memory_mib);
            params.backend = Some(snapshot.backend);
        }
        let vcpus = params.vcpus.unwrap_or(self.config.vm.vcpus);
        let memory_mib = params.memory_mib.unwrap_or(self.config.vm.memory_mib);
        validate_size(vcpus, memory_mib)?;
        let options = CreateOptions {
            no_start: params.no_start,
            work_disk: params.work_disk,
            ports: params.ports,
            egress: params.egress,
            network_group: params.network_group,
            regen_host_keys: params.regen_host_keys,
            restore_work_disk: snapshot
                .as_ref()
                .filter(|snapshot| snapshot.has_work_disk)
                .map(|snapshot| Path::new(&snapshot.dir).join(super::snapshot::WORK_DISK_FILE)),
        };
        if options.wants_network() && !self.capabilities.iter().any(|c| c.name() == "network") {
            return Err(crate::capabilities::CapabilityError::from(
                crate::network::NetworkError::Disabled,
            )
            .into());
        }
        for capability in &self.capabilities {
            capability.check(&params.name, &options)?;
        }
        let image_name = params.image.as_deref().unwrap_or(&self.config.vm.image);
        let image = match self.store.find_image(image_name)? {
            Some(image) => Artifact::Local(image),
            None => Artifact::Catalog(
                self.catalog
                    .image_entry(image_name, None)
                    .await?
                    .ok_or_else(|| VmError::NoImage {
                        name: image_name.to_owned(),
                    })?,
            ),
        };
        let backend = params.backend.unwrap_or(self.backends.default);
        let kernel_name = params.kernel.as_deref().unwrap_or(&self.config.vm.kernel);
        let kernel = match self.store.find_kernel(kernel_name)? {
            Some(kernel) => Artifact::Local(kernel),
            None => Artifact::Catalog(
                self.catalog
                    .kernel_entry(kernel_name, None)
                    .await?
                    .ok_or_else(|| VmError::NoKernel {
                        name: kernel_name.to_owned(),
                    })?,
            ),
        };
        if let Artifact::Local(image) = &image {
            self.check_clone_space(image)?;
        }
        let id = new_id();
        let vm = Vm {
            dir: self.paths.vm_dir(&id).display().to_string(),
            id,
            name: params.name,
            state: VmState::Creating,
            image: image_name.to_owned(),
            kernel: kernel_name.to_owned(),
            backend,
            vcpus,
            memory_mib,
            disk_bytes: match (&snapshot, &image) {
                (Some(snapshot), _) => snapshot.disk_bytes,
                (None, Artifact::Local(image)) => image.size_bytes,
                (None, Artifact::Catalog(entry)) => entry.size,
            },
            pid: None,
            created_at: now(),
            started_at: None,
            error: None,
            network: None,
            work_disk: None,
        };
        // Taken before the row is visible, so a concurrent delete of the new
        // name waits for the create to finish (or be cancelled) first.
        let guard = Arc::clone(&self.lock_of(&vm.id)).lock_owned().await;
        // The row references the image and kernel, so with a pull it is
        // inserted after the pull stages; the name is checked now anyway.
        let pulls = matches!(image, Artifact::Catalog(_)) || matches!(kernel, Artifact::Catalog(_));
        let inserted = if pulls {
            if let VmLookup::Found(existing) = self.store.lookup_vm(&vm.name)? {
                if existing.name == vm.name {
                    self.forget_lock(&vm.id);
                    return Err(VmError::DuplicateName { name: vm.name });
                }
            }
            false
        } else {
            self.insert_new_vm(&vm)?;
            true
        };
        let operation = match self.operations.begin("vm.create", &vm) {
            Ok(operation) => operation,
            Err(error) => {
                let _ = self.store.delete_vm(&vm.id);
                self.forget_lock(&vm.id);
                return Err(error.into());
            }
        };
        let result = CreateVmResult {
            operation_id: operation.id.clone(),
            vm_id: vm.id.clone(),
        };
        if let Some(stage) = guest_stage.as_mut() {
            stage.bind(&operation.id);
        }
        let snapshot = match snapshot {
            Some(snapshot) => {
                let lock = self.lock_of(&snapshot.id).lock_owned().await;
                Some((snapshot, lock))
            }
            None => None,
        };
        let inputs = CreateInputs {
            image,
            kernel,
            inserted,
            options,
            guest_stage,
            snapshot,
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.run_create(operation, vm, inputs, guard).await;
        });
        Ok(result)
    }

    /// A copied root disk needs the image's data free where VMs live (the
    /// copy keeps holes); refused before anything is made (a
    /// copy-on-write clone needs none).
    fn check_clone_space(&self, image: &Image) -> Result<(), VmError> {
        if self.clone.kind() == banger_disk::clone::StrategyKind::Copy {
            let needed = std::fs::metadata(&image.path).map_or(image.size_bytes, |metadata| {
                crate::files::allocated_bytes(&metadata)
            });
            crate::files::check_free_space(&self.paths.vms(), needed, "the root disk")?;
        }
        Ok(())
    }

    fn insert_new_vm(&self, vm: &Vm) -> Result<(), VmError> {
        self.store.insert_vm(vm).map_err(|error| {
            self.forget_lock(&vm.id);
            match error {
                StoreError::AlreadyExists { .. } => VmError::DuplicateName {
                    name: vm.name.clone(),
                },
                error => error.into(),
            }
        })
    }

    /// Pulls what the catalog must supply, as stages of the create.
    async fn pull_inputs(
        &self,
        operation: &Arc<LiveOperation>,
        image: Artifact<Image, ImageEntry>,
        kernel: Artifact<Kernel, KernelEntry>,
    ) -> Result<(Image, Kernel), VmError> {
        let image = match image {
            Artifact::Local(image) => image,
            Artifact::Catalog(entry) => {
                let stage = begin_stage(operation, "pull image")?;
                let outcome = self.catalog.pull_image(&entry, operation, &stage).await;
                end_stage(operation, &stage, outcome, Some(entry.url.to_string()))?
            }
        };
        let kernel = match kernel {
            Artifact::Local(kernel) => kernel,
            Artifact::Catalog(entry) => {
                let stage = begin_stage(operation, "pull kernel")?;
                let outcome = self.catalog.pull_kernel(&entry, operation, &stage).await;
                end_stage(operation, &stage, outcome, Some(entry.url.to_string()))?
            }
        };
        Ok((image, kernel))
    }

    async fn run_create(
        self: Arc<Self>,
        operation: Arc<LiveOperation>,
        mut vm: Vm,
        inputs: CreateInputs,
        _guard: OwnedMutexGuard<()>,
    ) {
        let mut undo = Vec::new();
        let mut inserted = inputs.inserted;
        let result = async {
            let (image, kernel) = self
                .pull_inputs(&operation, inputs.image, inputs.kernel)
                .await?;
            if !inserted {
                self.insert_new_vm(&vm)?;
                inserted = true;
            }
            let (snapshot, _snapshot_lock) = inputs.snapshot.unzip();
            let mut run = CreateRun {
                operation: &operation,
                vm: &mut vm,
                // A restore's root disk is cloned from the snapshot's copy.
                image_path: match &snapshot {
                    Some(snapshot) => {
                        Path::new(&snapshot.dir).join(banger_disk::clone::ROOT_DISK_FILE)
                    }
                    None => PathBuf::from(&image.path),
                },
                kernel,
                options: &inputs.options,
                root_disk: None,
                disk_flush: None,
                vmm: None,
                guest_stage: inputs.guest_stage,
                snapshot,
            };
            self.run_steps(&mut run, &mut undo).await
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(vm = %vm.name, state = %vm.state, "created VM");
                operation.finish(OperationState::Succeeded, None, Some(vm));
            }
            Err(error) => {
                let cancelled = operation.is_cancelled();
                roll_back(&operation, undo).await;
                vm.pid = None;
                if cancelled || !inserted {
                    tracing::info!(vm = %vm.name, %error, "create ended before the VM existed, or was cancelled; rolled back");
                    if inserted {
                        if let Err(error) = self.store.delete_vm(&vm.id) {
                            tracing::error!(vm = %vm.name, %error, "failed to delete row of cancelled VM");
                        }
                    }
                    self.forget_lock(&vm.id);
                    let state = if cancelled {
                        OperationState::Cancelled
                    } else {
                        OperationState::Failed
                    };
                    operation.finish(state, Some(chain(&error)), None);
                } else {
                    tracing::warn!(vm = %vm.name, error = %error, "create failed; rolled back");
                    vm.state = VmState::Failed;
                    vm.error = Some(chain(&error));
                    if let Err(store_error) = self.store.update_vm(&vm) {
                        tracing::error!(vm = %vm.name, %store_error, "failed to record failed VM");
                    }
                    operation.finish(OperationState::Failed, Some(chain(&error)), Some(vm));
                }
            }
        }
        self.operations.retire(&operation.id);
    }

    /// The create steps for these choices, in order: the root disk, every
    /// capability's prepare, the VMM and boot, every capability's
    /// after-boot work, ready.
    pub(super) fn plan(&self, options: &CreateOptions, has_guest_stage: bool) -> Vec<Step> {
        let mut steps = vec![Step::ResolveImage, Step::CloneRootDisk];
        steps.extend((0..self.capabilities.len()).map(Step::Prepare));
        if !options.no_start {
            steps.extend([Step::StartVmm, Step::Boot]);
            steps.extend(
                self.capabilities
                    .iter()
                    .enumerate()
                    .filter(|(_, capability)| capability.after_boot_stage().is_some())
                    .map(|(index, _)| Step::AfterBoot(index)),
            );
            if has_guest_stage {
                steps.push(Step::Guest);
            }
        }
        steps.push(Step::Ready);
        steps
    }

    /// The stage a step reports as; `None` for a capability prepare that
    /// runs silently and for the guest stage, which reports itself.
    fn stage_of(&self, step: Step, options: &CreateOptions) -> Option<&'static str> {
        match step {
            Step::ResolveImage => Some("resolve image"),
            Step::CloneRootDisk => Some("clone root disk"),
            Step::Prepare(index) => self.capabilities[index].prepare_stage(options),
            Step::StartVmm => Some("start vmm"),
            Step::Restore => Some("restore"),
            Step::Boot => Some("boot"),
            Step::AfterBoot(index) => self.capabilities[index].after_boot_stage(),
            Step::Guest => None,
            Step::Ready => Some("ready"),
        }
    }

    /// The step's name at fault points ([`crate::fault`]).
    fn step_name(&self, step: Step) -> String {
        match step {
            Step::Prepare(index) => format!("prepare {}", self.capabilities[index].name()),
            Step::AfterBoot(index) => format!("after boot {}", self.capabilities[index].name()),
            Step::Guest => "guest".to_owned(),
            step => self
                .stage_of(step, &CreateOptions::default())
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// Runs the plan; each step's undo is kept (with its stage) before the
    /// next step runs.
    async fn run_steps(
        self: &Arc<Self>,
        run: &mut CreateRun<'_>,
        undo: &mut Vec<(Option<&'static str>, Undo)>,
    ) -> Result<(), VmError> {
        let mut steps = self.plan(run.options, run.guest_stage.is_some());
        if run.snapshot.is_some() {
            super::snapshot::restore_plan(&mut steps);
        }
        for step in steps {
            let operation = run.operation;
            let stage_name = self.stage_of(step, run.options);
            let point = || format!("create:{}", self.step_name(step));
            crate::fault::pause_at(point);
            let done = match stage_name {
                Some(name) => {
                    let stage = begin_stage(operation, name)?;
                    let mut outcome = self.run_step(step, run).await;
                    let detail = outcome.as_mut().ok().and_then(|done| done.detail.take());
                    end_stage(operation, &stage, outcome, detail)?
                }
                None => {
                    if operation.is_cancelled() {
                        return Err(operation.cancelled_error().into());
                    }
                    self.run_step(step, run).await?
                }
            };
            if let Some(step_undo) = done.undo {
                undo.push((stage_name, step_undo));
            }
            crate::fault::pause_at(|| format!("{}:done", point()));
        }
        Ok(())
    }

    async fn run_step(
        self: &Arc<Self>,
        step: Step,
        run: &mut CreateRun<'_>,
    ) -> Result<StepDone, VmError> {
        let cancellation = run.operation.cancellation();
        match step {
            Step::ResolveImage => {
                check_artifacts(&run.image_path, &run.kernel)?;
                Ok(StepDone::default())
            }
            Step::CloneRootDisk => {
                let (root_disk, from_pool, unsynced) = self
                    .clone_root_disk(
                        run.operation,
                        &run.vm.id,
                        &run.image_path,
                        Path::new(&run.vm.dir),
                    )
                    .await?;
                if unsynced {
                    let disk = root_disk.clone();
                    run.disk_flush = Some(tokio::task::spawn_blocking(move || {
                        banger_disk::clone::sync_root_disk(&disk)
                    }));
                }
                run.root_disk = Some(root_disk);
                let this = Arc::clone(self);
                let (vm_id, directory) = (run.vm.id.clone(), PathBuf::from(&run.vm.dir));
                Ok(StepDone {
                    detail: Some(super::warm_pool::clone_detail(
                        self.clone.kind(),
                        from_pool,
                        &self.paths.root,
                    )),
                    undo: Some(Undo::new(async move {
                        if let Err(error) = this.remove_disk(&vm_id, &directory).await {
                            tracing::error!(path = %directory.display(), %error, "rollback failed to remove the root disk");
                        }
                    })),
                })
            }
            Step::Prepare(index) => {
                let prepared = self.capabilities[index]
                    .prepare(run.vm, run.options)
                    .await?;
                Ok(StepDone {
                    detail: prepared.detail,
                    undo: prepared.undo,
                })
            }
            Step::StartVmm => {
                run.vm.state = VmState::Starting;
                self.store.update_vm(run.vm)?;
                let root_disk = run.root_disk.as_ref().ok_or(VmError::NoRootDisk)?;
                let handle = self.spawn_vmm(run.vm, &run.kernel, root_disk).await?;
                run.vmm = Some(handle.clone());
                let this = Arc::clone(self);
                let vm_id = run.vm.id.clone();
                Ok(StepDone {
                    detail: None,
                    undo: Some(Undo::new(async move {
                        this.discard_process(&vm_id, &handle).await;
                    })),
                })
            }
            Step::Restore => {
                let snapshot = run.snapshot.clone().ok_or(VmError::NoVmmProcess)?;
                let root_disk = run.root_disk.clone().ok_or(VmError::NoRootDisk)?;
                run.vm.state = VmState::Starting;
                self.store.update_vm(run.vm)?;
                // Not raced against a cancel: a restore takes milliseconds,
                // and dropped halfway it could leave a VMM behind.
                let handle = self
                    .restore_vmm(run.vm, &run.kernel, &root_disk, &snapshot, run.options)
                    .await?;
                run.vmm = Some(handle.clone());
                let this = Arc::clone(self);
                let vm_id = run.vm.id.clone();
                Ok(StepDone {
                    detail: Some(format!("from {}", snapshot.name)),
                    undo: Some(Undo::new(async move {
                        this.discard_process(&vm_id, &handle).await;
                    })),
                })
            }
            Step::Boot => {
                let handle = running_vmm(run)?;
                tokio::select! {
                    outcome = self.boot_vmm(run.vm, &handle) => outcome?,
                    () = cancellation.cancelled() => return Err(run.operation.cancelled_error().into()),
                }
                Ok(StepDone::default())
            }
            Step::AfterBoot(index) => {
                let handle = running_vmm(run)?;
                let capability = &self.capabilities[index];
                let detail = tokio::select! {
                    outcome = capability.after_boot(run.vm, &handle) => outcome?,
                    () = cancellation.cancelled() => return Err(run.operation.cancelled_error().into()),
                };
                Ok(StepDone { detail, undo: None })
            }
            Step::Guest => {
                let handle = running_vmm(run)?;
                let Some(stage) = run.guest_stage.take() else {
                    return Ok(StepDone::default());
                };
                stage
                    .run(
                        run.operation,
                        run.vm,
                        Box::pin(self.agent_of(run.vm, &handle)),
                    )
                    .await
                    .map_err(VmError::GuestStage)?;
                Ok(StepDone::default())
            }
            Step::Ready => {
                if let Some(flush) = run.disk_flush.take() {
                    flush
                        .await
                        .map_err(|source| VmError::Task {
                            task: "Root disk flush",
                            source,
                        })?
                        .map_err(|error| VmError::CloneRootDisk(Box::new(error)))?;
                }
                if run.options.no_start {
                    run.vm.state = VmState::Stopped;
                    self.store.update_vm(run.vm)?;
                    return Ok(StepDone {
                        detail: Some("created stopped".to_owned()),
                        undo: None,
                    });
                }
                Ok(StepDone::default())
            }
        }
    }

    /// Makes the VM's directory and clones the image into it (or takes a
    /// clone from the warm pool: then the first `true`); removes the
    /// directory again when the clone fails. The second `true`: a copy whose
    /// data the caller must still flush ([`banger_disk::clone::sync_root_disk`]).
    async fn clone_root_disk(
        &self,
        operation: &Arc<LiveOperation>,
        vm_id: &str,
        image_path: &Path,
        directory: &Path,
    ) -> Result<(RootDisk, bool, bool), VmError> {
        std::fs::create_dir(directory).map_err(|source| VmError::CreateDirectory {
            path: directory.to_owned(),
            source,
        })?;
        if let Some(root_disk) = self.warm_pool.take(image_path, directory) {
            return Ok((root_disk, true, false));
        }
        let strategy = Arc::clone(&self.clone);
        let (owned_vm_id, image, owned_directory) = (
            vm_id.to_owned(),
            image_path.to_owned(),
            directory.to_owned(),
        );
        let cancellation = operation.cancellation();
        // A copy reports its bytes; a reflink or dm-snapshot clone none.
        let mut meter = operation.meter_named("clone root disk");
        let cloned = tokio::task::spawn_blocking(move || {
            let cloned = strategy.clone_image_unsynced(
                &CloneRequest {
                    vm_id: &owned_vm_id,
                    image: &image,
                    vm_dir: &owned_directory,
                    cancelled: &|| cancellation.is_cancelled(),
                },
                &mut |bytes, total| meter.update(bytes, Some(total)),
            );
            meter.finish();
            cloned
        })
        .await
        .map_err(|source| VmError::Task {
            task: "Root disk clone",
            source,
        });
        let outcome = match cloned {
            Ok(Ok((root_disk, unsynced))) => return Ok((root_disk, false, unsynced)),
            Ok(Err(CloneError::Cancelled { .. })) => Err(operation.cancelled_error().into()),
            Ok(Err(error)) => Err(VmError::CloneRootDisk(Box::new(error))),
            Err(error) => Err(error),
        };
        if let Err(error) = self.remove_disk(vm_id, directory).await {
            tracing::error!(path = %directory.display(), %error, "failed to remove a failed clone");
        }
        outcome
    }

    /// [`Self::remove_disk`] for reconciliation: logs instead of failing.
    pub(super) async fn remove_leftover_disk(&self, vm_id: &str, directory: &Path) {
        if let Err(error) = self.remove_disk(vm_id, directory).await {
            tracing::error!(path = %directory.display(), %error, "failed to remove leftover; remove it by hand");
        }
    }

    /// Removes a VM's clone (devices first) and then its directory.
    pub(super) async fn remove_disk(&self, vm_id: &str, directory: &Path) -> Result<(), VmError> {
        let strategy = Arc::clone(&self.clone);
        let (vm_id, owned_directory) = (vm_id.to_owned(), directory.to_owned());
        tokio::task::spawn_blocking(move || strategy.remove(&vm_id, &owned_directory))
            .await
            .map_err(|source| VmError::Task {
                task: "Root disk removal",
                source,
            })?
            .map_err(|error| VmError::RemoveRootDisk(Box::new(error)))?;
        remove_dir_if_present(directory).map_err(|source| VmError::RemoveDirectory {
            path: directory.to_owned(),
            source,
        })
    }
}

fn running_vmm(run: &CreateRun<'_>) -> Result<VmmHandle, VmError> {
    run.vmm.clone().ok_or(VmError::NoVmmProcess)
}

/// Runs the undos newest first, each once; a stage whose undo ran is
/// reported rolled back.
async fn roll_back(operation: &LiveOperation, undo: Vec<(Option<&'static str>, Undo)>) {
    for (stage, step_undo) in undo.into_iter().rev() {
        step_undo.run().await;
        if let Some(stage) = stage {
            operation.rolled_back(stage);
        }
    }
}

fn check_artifacts(image_path: &Path, kernel: &Kernel) -> Result<(), VmError> {
    let mut required = vec![image_path.to_owned(), PathBuf::from(&kernel.kernel_path)];
    required.extend(kernel.initrd_path.as_ref().map(PathBuf::from));
    for path in required {
        if !path.is_file() {
            return Err(VmError::MissingArtifact { path });
        }
    }
    Ok(())
}

fn begin_stage(operation: &LiveOperation, name: &'static str) -> Result<Stage, OperationError> {
    if operation.is_cancelled() {
        return Err(operation.cancelled_error());
    }
    Ok(operation.start_stage(name))
}

fn end_stage<T, E: std::error::Error>(
    operation: &LiveOperation,
    stage: &Stage,
    outcome: Result<T, E>,
    message: Option<String>,
) -> Result<T, E> {
    match &outcome {
        Ok(_) => operation.finish_stage(stage, message),
        Err(error) => operation.fail_stage(stage, error),
    }
    outcome
}
