//! VMService: VM lifecycle, per-VM locks, create operations, supervision of
//! VMM processes, and reconciliation at start.
//!
//! Lock order (see docs/ARCHITECTURE.md): a per-VM async lock is taken first
//! and may be held across awaits for as long as the lifecycle step runs; the
//! short std mutexes (`locks`, `processes`, the store's connection) are taken
//! after it, never held across an await, and never two at once. No lock spans
//! more than one VM, so operations on different VMs run in parallel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_agent::client::AgentClient;
use banger_proto::{
    parse_size, validate_vm_name, CreateVmParams, CreateVmResult, ErrorKind, Image, Kernel,
    OperationState, SetVmParams, Vm, VmState, VmStats, VmmProcessStats, WorkDisk,
};
use banger_store::{Store, VmLookup};
use banger_vmm::{AgentEndpoint, DriveSpec, LaunchSpec, VmmHandle};

use crate::agents::Agents;
use crate::backends::Backends;
use crate::disks::WorkDisks;
use tokio::sync::OwnedMutexGuard;

use crate::catalog::CatalogService;
use crate::config::{Config, MAX_VCPUS, MIN_MEMORY_MIB};
use crate::error::{DaemonError, DaemonResult};
use crate::ids::{new_id, now};
use crate::images::ImageService;
use crate::network::{Attachment, Network};
use crate::operations::{LiveOperation, OperationRegistry};
use crate::paths::StatePaths;
use banger_catalog::{ImageEntry, KernelEntry};
use banger_disk::clone::{CloneError, CloneRequest, CloneStrategy, RootDisk};

type VmLock = Arc<tokio::sync::Mutex<()>>;

pub struct VmService {
    store: Store,
    paths: StatePaths,
    config: Arc<Config>,
    images: ImageService,
    backends: Backends,
    clone: Arc<dyn CloneStrategy>,
    catalog: Arc<CatalogService>,
    network: Option<Arc<Network>>,
    operations: Arc<OperationRegistry>,
    /// Connections to the guest agents of running VMs.
    agents: Agents,
    /// The work-disk capability.
    disks: WorkDisks,
    locks: Mutex<HashMap<String, VmLock>>,
    /// The live VMM process of each VM that has one.
    processes: Mutex<HashMap<String, VmmHandle>>,
}

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
    no_start: bool,
    /// `--work-disk`: a size or a detached disk's name.
    work_disk: Option<String>,
}

/// The caller's choices the create stages act on.
struct Choices<'a> {
    no_start: bool,
    /// `--work-disk`: a size or a detached disk's name.
    work_disk: Option<&'a str>,
}

/// What a create step made, undone in reverse order if a later step fails.
enum Undo {
    /// The VM's clone and its directory.
    RemoveDisk {
        stage: &'static str,
        vm_id: String,
        path: PathBuf,
    },
    KillProcess {
        stage: &'static str,
        handle: VmmHandle,
    },
    /// The work disk the create made (deleted) or attached (detached).
    ReleaseWorkDisk {
        stage: &'static str,
        vm_id: String,
        created: bool,
    },
    /// The VM's lease, tap and DNS record.
    ReleaseNetwork {
        stage: &'static str,
        vm_id: String,
        vm_name: String,
    },
}

/// What [`VmService`] is built from: its seams and the services it uses.
pub struct VmServiceParts {
    pub store: Store,
    pub paths: StatePaths,
    pub config: Arc<Config>,
    pub images: ImageService,
    pub backends: Backends,
    pub clone: Arc<dyn CloneStrategy>,
    pub catalog: Arc<CatalogService>,
    /// The network capability; `None` when `[network] enabled = false`.
    pub network: Option<Arc<Network>>,
    pub operations: Arc<OperationRegistry>,
}

impl VmService {
    pub fn new(parts: VmServiceParts) -> Arc<Self> {
        let VmServiceParts {
            store,
            paths,
            config,
            images,
            backends,
            clone,
            catalog,
            network,
            operations,
        } = parts;
        let disks = WorkDisks::new(store.clone(), paths.disks());
        Arc::new(Self {
            store,
            paths,
            config,
            images,
            backends,
            clone,
            catalog,
            network,
            operations,
            agents: Agents::default(),
            disks,
            locks: Mutex::new(HashMap::new()),
            processes: Mutex::new(HashMap::new()),
        })
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The clone strategy's one-line description.
    pub fn clone_strategy(&self) -> String {
        self.clone.describe()
    }

    fn lock_of(&self, vm_id: &str) -> VmLock {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(vm_id.to_owned()).or_default())
    }

    fn processes(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmmHandle>> {
        self.processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn process_of(&self, vm_id: &str) -> Option<VmmHandle> {
        self.processes().get(vm_id).cloned()
    }

    // ---- reads ----

    pub fn list(&self) -> DaemonResult<Vec<Vm>> {
        Ok(self
            .store
            .list_vms()?
            .into_iter()
            .map(|vm| self.with_dns_name(vm))
            .collect())
    }

    fn with_dns_name(&self, mut vm: Vm) -> Vm {
        if let (Some(network), Some(lease)) = (&self.network, vm.network.as_mut()) {
            lease.dns_name = network.dns_name(&vm.name);
        }
        vm
    }

    pub fn network(&self) -> Option<&Arc<Network>> {
        self.network.as_ref()
    }

    /// Resolves a name or unique id prefix.
    pub fn find(&self, reference: &str) -> DaemonResult<Vm> {
        match self.store.lookup_vm(reference)? {
            VmLookup::Found(vm) => Ok(self.with_dns_name(*vm)),
            VmLookup::NotFound => Err(DaemonError::not_found(format!("No VM named `{reference}`"))
                .with_hint("`banger vm list` shows the VMs")),
            VmLookup::Ambiguous(names) => Err(DaemonError::invalid_params(format!(
                "`{reference}` matches several VMs: {}",
                names.join(", ")
            ))),
        }
    }

    pub fn get(&self, vm_id: &str) -> Option<Vm> {
        self.store.get_vm(vm_id).ok().flatten()
    }

    /// Reloads `vm` under its lock; it may have changed while we waited.
    fn reload(&self, vm: &Vm) -> DaemonResult<Vm> {
        self.store
            .get_vm(&vm.id)?
            .ok_or_else(|| DaemonError::not_found(format!("VM `{}` was deleted", vm.name)))
    }

    // ---- create ----

    /// Validates, reserves the name (a `creating` row), and starts the create
    /// operation in the background.
    pub async fn create(self: &Arc<Self>, params: CreateVmParams) -> DaemonResult<CreateVmResult> {
        validate_vm_name(&params.name)
            .map_err(|error| DaemonError::invalid_params(error.to_string()))?;
        let vcpus = params.vcpus.unwrap_or(self.config.vm.vcpus);
        let memory_mib = params.memory_mib.unwrap_or(self.config.vm.memory_mib);
        validate_size(vcpus, memory_mib)?;
        if let Some(spec) = &params.work_disk {
            self.disks.check(&params.name, spec)?;
        }
        let image_name = params.image.as_deref().unwrap_or(&self.config.vm.image);
        let image = match self.store.find_image(image_name)? {
            Some(image) => Artifact::Local(image),
            None => Artifact::Catalog(self.catalog.image_entry(image_name, None).await?.ok_or_else(
                || {
                    DaemonError::not_found(format!("No image named `{image_name}`")).with_hint(
                        "`banger image list` shows the images; `banger image import` or `banger image pull` adds one",
                    )
                },
            )?),
        };
        let backend = params.backend.unwrap_or(self.backends.default);
        let kernel_name = params.kernel.as_deref().unwrap_or(&self.config.vm.kernel);
        let kernel = match self.store.find_kernel(kernel_name)? {
            Some(kernel) => Artifact::Local(kernel),
            None => Artifact::Catalog(
                self.catalog
                    .kernel_entry(kernel_name, None)
                    .await?
                    .ok_or_else(|| {
                        DaemonError::not_found(format!("No kernel named `{kernel_name}`")).with_hint(
                            "`banger kernel list` shows the kernels; `banger kernel import` or `banger kernel pull` adds one",
                        )
                    })?,
            ),
        };
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
            disk_bytes: match &image {
                Artifact::Local(image) => image.size_bytes,
                Artifact::Catalog(entry) => entry.size,
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
                    return Err(duplicate_name(&vm.name));
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
                return Err(error);
            }
        };
        let result = CreateVmResult {
            operation_id: operation.id.clone(),
            vm_id: vm.id.clone(),
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.run_create(
                operation,
                vm,
                CreateInputs {
                    image,
                    kernel,
                    inserted,
                    no_start: params.no_start,
                    work_disk: params.work_disk,
                },
                guard,
            )
            .await;
        });
        Ok(result)
    }

    fn insert_new_vm(&self, vm: &Vm) -> DaemonResult<()> {
        self.store.insert_vm(vm).map_err(|error| {
            self.forget_lock(&vm.id);
            let error = DaemonError::from(error);
            if error.kind == ErrorKind::AlreadyExists {
                duplicate_name(&vm.name)
            } else {
                error
            }
        })
    }

    /// Pulls what the catalog must supply, as stages of the create.
    async fn pull_inputs(
        &self,
        operation: &Arc<LiveOperation>,
        image: Artifact<Image, ImageEntry>,
        kernel: Artifact<Kernel, KernelEntry>,
    ) -> DaemonResult<(Image, Kernel)> {
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
            self.create_steps(
                &operation,
                &mut vm,
                Path::new(&image.path),
                &kernel,
                Choices {
                    no_start: inputs.no_start,
                    work_disk: inputs.work_disk.as_deref(),
                },
                &mut undo,
            )
            .await
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(vm = %vm.name, state = %vm.state, "created VM");
                operation.finish(OperationState::Succeeded, None, Some(vm));
            }
            Err(error) => {
                let cancelled = operation.is_cancelled();
                self.roll_back(&operation, undo).await;
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
                    operation.finish(state, Some(error.chain()), None);
                } else {
                    tracing::warn!(vm = %vm.name, error = %error, "create failed; rolled back");
                    vm.state = VmState::Failed;
                    vm.error = Some(error.chain());
                    if let Err(store_error) = self.store.update_vm(&vm) {
                        tracing::error!(vm = %vm.name, %store_error, "failed to record failed VM");
                    }
                    operation.finish(OperationState::Failed, Some(error.chain()), Some(vm));
                }
            }
        }
        self.operations.retire(&operation.id);
    }

    /// The create stages, in order. Each pushes its undo before the next runs.
    async fn create_steps(
        self: &Arc<Self>,
        operation: &Arc<LiveOperation>,
        vm: &mut Vm,
        image_path: &Path,
        kernel: &Kernel,
        choices: Choices<'_>,
        undo: &mut Vec<Undo>,
    ) -> DaemonResult<()> {
        let Choices {
            no_start,
            work_disk,
        } = choices;
        let stage = begin_stage(operation, "resolve image")?;
        let outcome = check_artifacts(image_path, kernel);
        end_stage(operation, &stage, outcome, None)?;

        let stage = begin_stage(operation, "clone root disk")?;
        let directory = PathBuf::from(&vm.dir);
        let outcome = self
            .clone_root_disk(operation, &vm.id, image_path, &directory, undo)
            .await;
        let root_disk = end_stage(
            operation,
            &stage,
            outcome,
            Some(self.clone.kind().to_string()),
        )?;

        if let Some(spec) = work_disk {
            let stage = begin_stage(operation, "work disk")?;
            let outcome = self.disks.prepare(vm, spec).await;
            let detail = outcome.as_ref().ok().map(|prepared| {
                format!(
                    "{} {} ({} MiB)",
                    if prepared.created { "made" } else { "attached" },
                    prepared.disk.name,
                    prepared.disk.size_bytes >> 20
                )
            });
            let prepared = end_stage(operation, &stage, outcome, detail)?;
            undo.push(Undo::ReleaseWorkDisk {
                stage: "work disk",
                vm_id: vm.id.clone(),
                created: prepared.created,
            });
            vm.work_disk = Some(prepared.disk.name.clone());
        }

        let attachment = match &self.network {
            Some(network) => {
                let stage = begin_stage(operation, "network")?;
                undo.push(Undo::ReleaseNetwork {
                    stage: "network",
                    vm_id: vm.id.clone(),
                    vm_name: vm.name.clone(),
                });
                let outcome = network.prepare(&vm.id, &vm.name).await;
                let attachment = end_stage(operation, &stage, outcome, None)?;
                vm.network = self.store.get_vm(&vm.id)?.and_then(|stored| stored.network);
                Some(attachment)
            }
            None => None,
        };

        if no_start {
            vm.state = VmState::Stopped;
            self.store.update_vm(vm)?;
            let stage = begin_stage(operation, "ready")?;
            return end_stage(
                operation,
                &stage,
                Ok(()),
                Some("created stopped".to_owned()),
            );
        }

        vm.state = VmState::Starting;
        self.store.update_vm(vm)?;
        let stage = begin_stage(operation, "start vmm")?;
        let outcome = self
            .spawn_vmm(vm, kernel, &root_disk, attachment.as_ref())
            .await;
        let handle = end_stage(operation, &stage, outcome, None)?;
        undo.push(Undo::KillProcess {
            stage: "start vmm",
            handle: handle.clone(),
        });

        let stage = begin_stage(operation, "boot")?;
        let cancellation = operation.cancellation();
        let outcome = tokio::select! {
            outcome = self.boot_vmm(vm, &handle) => outcome,
            () = cancellation.cancelled() => Err(operation.cancelled_error()),
        };
        end_stage(operation, &stage, outcome, None)?;

        if self.config.agent.wait {
            let stage = begin_stage(operation, "agent ready")?;
            let outcome = tokio::select! {
                outcome = self.wait_for_agent(vm, &handle) => outcome,
                () = cancellation.cancelled() => Err(operation.cancelled_error()),
            };
            let detail = outcome.as_ref().ok().map(|client| {
                let hello = client.hello();
                format!("{} on {}", hello.distro, hello.kernel_release)
            });
            end_stage(operation, &stage, outcome, detail)?;
        }

        let stage = begin_stage(operation, "ready")?;
        end_stage(operation, &stage, Ok(()), None)
    }

    /// Where the VM's agent is reached.
    fn agent_endpoint(&self, vm: &Vm) -> DaemonResult<AgentEndpoint> {
        Ok(self
            .backends
            .get(vm.backend)
            .agent_endpoint(Path::new(&vm.dir))
            .0)
    }

    /// The `agent ready` wait: hello within `[agent] ready_timeout_seconds`,
    /// or an error quoting the console; then the guest clock is set.
    async fn wait_for_agent(&self, vm: &Vm, handle: &VmmHandle) -> DaemonResult<AgentClient> {
        let endpoint = self.agent_endpoint(vm)?;
        let console = Path::new(&vm.dir).join(banger_vmm::CONSOLE_LOG_FILE);
        let client = self
            .agents
            .wait_ready(
                &vm.id,
                &endpoint,
                &console,
                self.config.agent.ready_timeout(),
                async {
                    handle.wait_exit().await;
                },
            )
            .await?;
        // A guest that was stopped (or restored) has a stale clock.
        if let Err(error) = client.sync_clock(std::time::SystemTime::now()).await {
            tracing::warn!(vm = %vm.name, %error, "could not set the guest clock");
        }
        Ok(client)
    }

    /// The guest's and the VMM process's resource use.
    pub async fn stats(&self, reference: &str) -> DaemonResult<VmStats> {
        let (vm, client) = self.agent(reference).await?;
        let guest = client.stats().await.map_err(|error| {
            DaemonError::failed(
                format!("The guest agent of VM `{}` could not report stats", vm.name),
                error,
            )
        })?;
        let vmm = vm
            .pid
            .and_then(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                vmm_process_stats(pid, &stat)
            })
            .unwrap_or_default();
        Ok(VmStats { vm, guest, vmm })
    }

    /// The agent connection of a running VM.
    pub async fn agent(&self, reference: &str) -> DaemonResult<(Vm, AgentClient)> {
        let vm = self.find(reference)?;
        if vm.state != VmState::Running {
            return Err(DaemonError::invalid_state(format!(
                "VM `{}` is {}; the guest agent answers only while it runs",
                vm.name, vm.state
            ))
            .with_hint(format!("start it with `banger vm start {}`", vm.name)));
        }
        let endpoint = self.agent_endpoint(&vm)?;
        let client = self.agents.client(&vm.id, &vm.name, &endpoint).await?;
        Ok((vm, client))
    }

    async fn clone_root_disk(
        &self,
        operation: &Arc<LiveOperation>,
        vm_id: &str,
        image_path: &Path,
        directory: &Path,
        undo: &mut Vec<Undo>,
    ) -> DaemonResult<RootDisk> {
        std::fs::create_dir(directory).map_err(|error| {
            DaemonError::failed(format!("Failed to create {}", directory.display()), error)
        })?;
        undo.push(Undo::RemoveDisk {
            stage: "clone root disk",
            vm_id: vm_id.to_owned(),
            path: directory.to_owned(),
        });
        let strategy = Arc::clone(&self.clone);
        let (vm_id, image, directory) = (
            vm_id.to_owned(),
            image_path.to_owned(),
            directory.to_owned(),
        );
        let cancellation = operation.cancellation();
        let cloned = tokio::task::spawn_blocking(move || {
            strategy.clone_image(&CloneRequest {
                vm_id: &vm_id,
                image: &image,
                vm_dir: &directory,
                cancelled: &|| cancellation.is_cancelled(),
            })
        })
        .await
        .map_err(|error| DaemonError::failed("Root disk clone task failed", error))?;
        match cloned {
            Ok(root_disk) => Ok(root_disk),
            Err(CloneError::Cancelled { .. }) => Err(operation.cancelled_error()),
            Err(error) => Err(DaemonError::failed("Failed to clone root disk", error)),
        }
    }

    /// [`Self::remove_disk`] for reconciliation: logs instead of failing.
    async fn remove_leftover_disk(&self, vm_id: &str, directory: &Path) {
        if let Err(error) = self.remove_disk(vm_id, directory).await {
            tracing::error!(path = %directory.display(), %error, "failed to remove leftover; remove it by hand");
        }
    }

    /// Removes a VM's clone (devices first) and then its directory.
    async fn remove_disk(&self, vm_id: &str, directory: &Path) -> DaemonResult<()> {
        let strategy = Arc::clone(&self.clone);
        let (vm_id, owned_directory) = (vm_id.to_owned(), directory.to_owned());
        tokio::task::spawn_blocking(move || strategy.remove(&vm_id, &owned_directory))
            .await
            .map_err(|error| DaemonError::failed("Root disk removal task failed", error))?
            .map_err(|error| DaemonError::failed("Failed to remove the root disk", error))?;
        remove_dir_if_present(directory).map_err(|error| {
            DaemonError::failed(format!("Failed to remove {}", directory.display()), error)
        })
    }

    async fn roll_back(&self, operation: &LiveOperation, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::ReleaseNetwork {
                    stage,
                    vm_id,
                    vm_name,
                } => {
                    if let Some(network) = &self.network {
                        if let Err(error) = network.release(&vm_id, &vm_name).await {
                            tracing::error!(%error, "rollback failed to release the network");
                        }
                    }
                    operation.rolled_back(stage);
                }
                Undo::KillProcess { stage, handle } => {
                    self.discard_process(&operation.snapshot().vm_id, &handle)
                        .await;
                    operation.rolled_back(stage);
                }
                Undo::ReleaseWorkDisk {
                    stage,
                    vm_id,
                    created,
                } => {
                    if let Err(error) = self.disks.release(&vm_id, !created) {
                        tracing::error!(%error, "rollback failed to release the work disk");
                    }
                    operation.rolled_back(stage);
                }
                Undo::RemoveDisk { stage, vm_id, path } => {
                    if let Err(error) = self.remove_disk(&vm_id, &path).await {
                        tracing::error!(path = %path.display(), %error, "rollback failed to remove the root disk");
                    }
                    operation.rolled_back(stage);
                }
            }
        }
    }

    // ---- VMM process handling shared by create and start ----

    fn launch_spec(
        &self,
        vm: &Vm,
        kernel: &Kernel,
        root_disk: &RootDisk,
        attachment: Option<&Attachment>,
    ) -> DaemonResult<LaunchSpec> {
        let directory = PathBuf::from(&vm.dir);
        let (_, vsock) = self.backends.get(vm.backend).agent_endpoint(&directory);
        Ok(LaunchSpec {
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            runtime_dir: directory.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel_path: PathBuf::from(&kernel.kernel_path),
            initrd_path: kernel.initrd_path.as_ref().map(PathBuf::from),
            kernel_cmdline: match attachment {
                Some(attachment) => format!(
                    "{} banger.name={} {}",
                    kernel.cmdline, vm.name, attachment.kernel_argument
                ),
                None => format!("{} banger.name={}", kernel.cmdline, vm.name),
            },
            drives: std::iter::once(DriveSpec {
                id: "rootfs".to_owned(),
                path: root_disk.path.clone(),
                is_root: true,
                read_only: false,
            })
            .chain(self.disks.drive(&vm.id)?)
            .collect(),
            network_interfaces: attachment
                .map(|attachment| vec![attachment.interface.clone()])
                .unwrap_or_default(),
            vsock,
        })
    }

    /// Spawns and configures the VMM, records its pid, and starts
    /// supervising it. Nothing is left running on error.
    async fn spawn_vmm(
        self: &Arc<Self>,
        vm: &mut Vm,
        kernel: &Kernel,
        root_disk: &RootDisk,
        attachment: Option<&Attachment>,
    ) -> DaemonResult<VmmHandle> {
        let spec = self.launch_spec(vm, kernel, root_disk, attachment)?;
        let handle = self
            .backends
            .get(vm.backend)
            .spawn(&spec)
            .await
            .map_err(|error| DaemonError::failed("Failed to start the VMM", error))?;
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

    async fn boot_vmm(&self, vm: &mut Vm, handle: &VmmHandle) -> DaemonResult<()> {
        self.backends
            .of(handle)
            .boot(handle)
            .await
            .map_err(|error| DaemonError::failed("Failed to boot the VM", error))?;
        if handle.has_exited() {
            return Err(DaemonError::new(
                ErrorKind::Failed,
                "The VMM exited right after boot",
            ));
        }
        vm.state = VmState::Running;
        vm.started_at = Some(now());
        vm.error = None;
        self.store.update_vm(vm)?;
        Ok(())
    }

    /// Kills a VMM process we no longer want and forgets it.
    async fn discard_process(&self, vm_id: &str, handle: &VmmHandle) {
        self.forget_process(vm_id, handle);
        self.agents.forget(vm_id);
        if let Err(error) = self.backends.of(handle).kill(handle).await {
            tracing::error!(vm = vm_id, pid = handle.pid(), %error, "failed to kill VMM");
        }
    }

    fn forget_process(&self, vm_id: &str, handle: &VmmHandle) {
        let mut processes = self.processes();
        if processes
            .get(vm_id)
            .is_some_and(|current| current.same_as(handle))
        {
            processes.remove(vm_id);
        }
    }

    fn forget_lock(&self, vm_id: &str) {
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vm_id);
    }

    /// Watches a VMM process: when it exits while it is still the VM's
    /// process (nobody stopped or discarded it), the VM becomes `crashed`.
    fn supervise(self: &Arc<Self>, vm_id: &str, handle: VmmHandle) {
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
            this.agents.forget(&vm_id);
            let Some(mut vm) = this.get(&vm_id) else {
                return;
            };
            if vm.state.has_process() {
                // Resources first, so whoever sees the new state sees them gone.
                this.backends.of(&handle).release(handle.runtime_dir());
                vm.pid = None;
                vm.started_at = None;
                if exit.code() == Some(0) && vm.state == VmState::Running {
                    // The guest powered itself off: a clean stop.
                    tracing::info!(vm = %vm.name, "guest shut down");
                    vm.state = VmState::Stopped;
                } else {
                    tracing::warn!(vm = %vm.name, pid = handle.pid(), ?exit, "VMM exited unexpectedly");
                    vm.state = VmState::Crashed;
                    vm.error = Some(format!(
                        "The VMM process {} exited unexpectedly ({exit})",
                        handle.pid()
                    ));
                }
                if let Err(error) = this.store.update_vm(&vm) {
                    tracing::error!(vm = %vm.name, %error, "failed to record VMM exit");
                }
            }
        });
    }

    // ---- lifecycle ----

    pub async fn start(self: &Arc<Self>, reference: &str) -> DaemonResult<Vm> {
        let vm = self.find(reference)?;
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.reload(&vm)?;
        match vm.state {
            VmState::Running => return Ok(vm),
            VmState::Stopped | VmState::Crashed | VmState::Failed => {}
            state => {
                return Err(DaemonError::invalid_state(format!(
                    "VM `{}` is {state}",
                    vm.name
                )))
            }
        }
        let image = self.images.image(&vm.image)?;
        let strategy = Arc::clone(&self.clone);
        let (vm_id, directory) = (vm.id.clone(), PathBuf::from(&vm.dir));
        let attached = tokio::task::spawn_blocking(move || {
            strategy.attach(&vm_id, Path::new(&image.path), &directory)
        })
        .await
        .map_err(|error| DaemonError::failed("Root disk attach task failed", error))?;
        let root_disk = attached.map_err(|error| {
            DaemonError::invalid_state(format!(
                "VM `{}` has no usable root disk (did it fail during create?)",
                vm.name
            ))
            .with_source(error)
            .with_hint(format!(
                "delete it with `banger vm delete {}` and create it again",
                vm.name
            ))
        })?;
        let kernel = self.images.kernel(&vm.kernel)?;
        let attachment = match &self.network {
            Some(network) => network.attach(&vm.id, vm.network.as_ref()).await?,
            None => None,
        };
        vm.state = VmState::Starting;
        vm.error = None;
        self.store.update_vm(&vm)?;
        let outcome = match self
            .spawn_vmm(&mut vm, &kernel, &root_disk, attachment.as_ref())
            .await
        {
            Ok(handle) => {
                let booted = match self.boot_vmm(&mut vm, &handle).await {
                    Ok(()) if self.config.agent.wait => {
                        self.wait_for_agent(&vm, &handle).await.map(drop)
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
                vm.error = Some(error.chain());
                self.store.update_vm(&vm)?;
                Err(error)
            }
        }
    }

    pub async fn stop(self: &Arc<Self>, reference: &str, force: bool) -> DaemonResult<Vm> {
        let vm = self.find(reference)?;
        if vm.state == VmState::Creating {
            return Err(self.busy_creating(&vm));
        }
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.reload(&vm)?;
        match vm.state {
            VmState::Stopped | VmState::Failed => return Ok(vm),
            VmState::Crashed => {
                vm.state = VmState::Stopped;
                self.store.update_vm(&vm)?;
                return Ok(vm);
            }
            _ => {}
        }
        if let Some(handle) = self.process_of(&vm.id) {
            vm.state = VmState::Stopping;
            self.store.update_vm(&vm)?;
            if !force {
                // The agent powers the guest off cleanly on any backend (a
                // minimal guest ignores the VMM's ACPI or Ctrl-Alt-Del request).
                if let Some(client) = self.agents.cached(&vm.id) {
                    let asked =
                        tokio::time::timeout(std::time::Duration::from_secs(2), client.shutdown())
                            .await;
                    if !matches!(asked, Ok(Ok(()))) {
                        tracing::debug!(vm = %vm.name, "the guest agent did not take the shutdown request");
                    }
                }
            }
            self.agents.forget(&vm.id);
            let outcome = if force {
                self.backends.of(&handle).kill(&handle).await.map(|()| None)
            } else {
                self.backends
                    .of(&handle)
                    .stop(&handle, self.config.stop_grace())
                    .await
                    .map(Some)
            };
            if let Err(error) = outcome {
                tracing::warn!(vm = %vm.name, %error, "graceful stop failed; killing");
                self.backends
                    .of(&handle)
                    .kill(&handle)
                    .await
                    .map_err(|error| DaemonError::failed("Failed to kill the VMM", error))?;
            }
            self.forget_process(&vm.id, &handle);
        }
        vm.state = VmState::Stopped;
        vm.pid = None;
        vm.started_at = None;
        self.store.update_vm(&vm)?;
        Ok(vm)
    }

    pub async fn restart(self: &Arc<Self>, reference: &str) -> DaemonResult<Vm> {
        let vm = self.stop(reference, false).await?;
        self.start(&vm.id).await
    }

    pub async fn delete(
        self: &Arc<Self>,
        reference: &str,
        force: bool,
        keep_work_disk: bool,
    ) -> DaemonResult<Vm> {
        let vm = self.find(reference)?;
        if vm.state == VmState::Creating {
            if !force {
                return Err(self.busy_creating(&vm));
            }
            if let Some(operation) = self.operations.running_for_vm(&vm.id) {
                self.operations.cancel(&operation.id)?;
            }
        }
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let Some(vm) = self.store.get_vm(&vm.id)? else {
            // A cancelled create removed it while we waited.
            return Ok(vm);
        };
        if vm.state.has_process() && !force {
            return Err(
                DaemonError::invalid_state(format!("VM `{}` is {}", vm.name, vm.state)).with_hint(
                    format!(
                        "stop it first with `banger vm stop {}`, or pass --force",
                        vm.name
                    ),
                ),
            );
        }
        if let Some(handle) = self.process_of(&vm.id) {
            self.discard_process(&vm.id, &handle).await;
        }
        if let Some(network) = &self.network {
            network.release(&vm.id, &vm.name).await?;
        }
        self.disks.release(&vm.id, keep_work_disk)?;
        self.remove_disk(&vm.id, Path::new(&vm.dir)).await?;
        self.store.delete_vm(&vm.id)?;
        self.forget_lock(&vm.id);
        Ok(vm)
    }

    pub async fn set(self: &Arc<Self>, params: SetVmParams) -> DaemonResult<Vm> {
        if params.vcpus.is_none() && params.memory_mib.is_none() && params.disk_size.is_none() {
            return Err(DaemonError::invalid_params(
                "Nothing to change: give vcpus, memory_mib and/or disk_size",
            ));
        }
        let disk_bytes = params
            .disk_size
            .as_deref()
            .map(|size| parse_size(size).map_err(DaemonError::invalid_params))
            .transpose()?;
        let vm = self.find(&params.vm)?;
        let lock = self.lock_of(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.reload(&vm)?;
        if !matches!(vm.state, VmState::Stopped | VmState::Crashed) {
            return Err(DaemonError::invalid_state(format!(
                "VM `{}` is {}; `vm set` changes stopped VMs only",
                vm.name, vm.state
            ))
            .with_hint(format!("stop it first with `banger vm stop {}`", vm.name)));
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

    /// Grows a stopped VM's root disk file and its file system.
    async fn grow_root_disk(&self, vm: &Vm, bytes: u64) -> DaemonResult<()> {
        if bytes < vm.disk_bytes {
            return Err(DaemonError::invalid_params(format!(
                "VM `{}` has a {} MiB root disk; disks grow but never shrink",
                vm.name,
                vm.disk_bytes >> 20
            )));
        }
        if self.clone.kind() == banger_disk::clone::StrategyKind::DmSnapshot {
            return Err(DaemonError::invalid_state(format!(
                "VM `{}` has a dm-snapshot root disk, which is as large as its image",
                vm.name
            ))
            .with_hint("import a larger image, or use a work disk (`--work-disk`) for space"));
        }
        let path = Path::new(&vm.dir).join(banger_disk::clone::ROOT_DISK_FILE);
        crate::disks::grow(&path, bytes).await
    }

    /// `disk.resize`: holds the lock of the VM the disk is attached to, so
    /// that VM cannot start while `resize2fs` runs.
    pub async fn resize_work_disk(&self, name: &str, size: &str) -> DaemonResult<WorkDisk> {
        let vm_lock = self
            .disks
            .find(name)?
            .vm_id
            .map(|vm_id| self.lock_of(&vm_id));
        let _guard = match &vm_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        self.disks.resize(name, size).await
    }

    /// The work-disk capability (`disk.*` methods).
    pub fn disks(&self) -> &WorkDisks {
        &self.disks
    }

    fn busy_creating(&self, vm: &Vm) -> DaemonError {
        let operation = self
            .operations
            .running_for_vm(&vm.id)
            .map(|operation| operation.id.clone())
            .unwrap_or_default();
        DaemonError::invalid_state(format!("VM `{}` is being created", vm.name)).with_hint(
            format!("wait for it, cancel it with `banger operation cancel {operation}`, or pass --force to delete"),
        )
    }

    // ---- reconciliation ----

    async fn adopt(&self, vm: &Vm, directory: &Path, pid: u32) -> DaemonResult<Option<VmmHandle>> {
        self.backends
            .get(vm.backend)
            .adopt(&vm.id, directory, pid)
            .await
            .map_err(|error| DaemonError::failed("Failed to check the VMM process", error))
    }

    /// Brings the store and the host back in line after a (re)start:
    /// re-adopts VMM processes that still run, marks dead ones `crashed`,
    /// finishes interrupted stops, removes leftovers of interrupted creates,
    /// orphaned VM directories and VMM processes no row accounts for.
    /// Failures to remove a leftover are logged and do not stop the daemon.
    pub async fn reconcile(self: &Arc<Self>) -> DaemonResult<ReconcileReport> {
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
        for mut vm in self.store.list_vms()? {
            let directory = PathBuf::from(&vm.dir);
            let adopted = match vm.pid {
                Some(pid) => match self.adopt(&vm, &directory, pid).await {
                    Ok(found) => found,
                    Err(error) => {
                        // Whether it still runs is unknown: leave the VM as
                        // recorded rather than risk a second VMM on its disk.
                        tracing::warn!(vm = %vm.name, pid, %error, "cannot check the VMM; leaving the VM as recorded");
                        report.unresolved.push(vm.name);
                        continue;
                    }
                },
                None => None,
            };
            if interrupted_creates.contains(&vm.id) {
                vm.state = VmState::Creating;
            }
            match (vm.state, adopted) {
                (VmState::Creating, adopted) => {
                    // An interrupted create leaves nothing.
                    if let Some(handle) = adopted {
                        let _ = self.backends.of(&handle).kill(&handle).await;
                    }
                    if let Some(network) = &self.network {
                        if let Err(error) = network.release(&vm.id, &vm.name).await {
                            tracing::error!(vm = %vm.name, %error, "failed to release the network of an interrupted create");
                        }
                    }
                    if let Err(error) = self.disks.release_interrupted(&vm) {
                        tracing::error!(vm = %vm.name, %error, "failed to release the work disk of an interrupted create");
                    }
                    self.remove_leftover_disk(&vm.id, &directory).await;
                    self.store.delete_vm(&vm.id)?;
                    report.removed_interrupted.push(vm.name);
                }
                (VmState::Running, Some(handle)) => {
                    self.processes().insert(vm.id.clone(), handle.clone());
                    self.supervise(&vm.id, handle);
                    report.adopted.push(vm.name);
                }
                (VmState::Stopping, adopted) => {
                    // The user asked for a stop; finish it.
                    if let Some(handle) = adopted {
                        let _ = self.backends.of(&handle).kill(&handle).await;
                    }
                    self.backends.get(vm.backend).release(&directory);
                    vm.state = VmState::Stopped;
                    vm.pid = None;
                    vm.started_at = None;
                    self.store.update_vm(&vm)?;
                    report.stopped.push(vm.name);
                }
                (VmState::Starting | VmState::Running, adopted) => {
                    // Dead, or a start interrupted before boot finished.
                    if let Some(handle) = adopted {
                        let _ = self.backends.of(&handle).kill(&handle).await;
                    }
                    self.backends.get(vm.backend).release(&directory);
                    vm.state = VmState::Crashed;
                    vm.pid = None;
                    vm.started_at = None;
                    vm.error =
                        Some("The VMM process ended while the daemon was not running".to_owned());
                    self.store.update_vm(&vm)?;
                    report.crashed.push(vm.name);
                }
                (_, _) => {
                    if vm.pid.is_some() {
                        vm.pid = None;
                        self.store.update_vm(&vm)?;
                    }
                }
            }
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
        for pid in vmm_processes_under(&self.paths.vms()) {
            if !adopted_pids.contains(&pid) {
                tracing::warn!(pid, "killing a VMM process no VM accounts for");
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(raw),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                report.killed_orphan_processes.push(pid);
            }
        }
        report.removed_orphan_files = self.images.remove_unreferenced_files()?;
        report.removed_orphan_files.extend(
            self.disks
                .remove_orphans()?
                .into_iter()
                .map(|path| path.display().to_string()),
        );
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
}

/// Processes whose command line names a socket in a VM directory under
/// `vms_dir` (`--api-sock DIR/ID/firecracker.sock`, `unix:DIR/ID/qmp.sock`):
/// VMM processes of this state dir, whoever started them.
fn vmm_processes_under(vms_dir: &Path) -> Vec<u32> {
    let prefix = format!("{}/", vms_dir.display());
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
        // `--api-sock PATH` (Firecracker), `-chardev socket,...,path=PATH,...` (QEMU).
        let names_vm_socket = cmdline.split(|&byte| byte == 0).any(|argument| {
            String::from_utf8_lossy(argument).split(',').any(|part| {
                let path = part.strip_prefix("path=").unwrap_or(part);
                let path = path.strip_prefix("unix:").unwrap_or(path);
                path.starts_with(&prefix) && path.ends_with(".sock")
            })
        });
        if names_vm_socket && pid != own {
            pids.push(pid);
        }
    }
    pids
}

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

/// Parses `/proc/PID/stat` (fields after the command's closing parenthesis).
fn vmm_process_stats(pid: u32, stat: &str) -> Option<VmmProcessStats> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // Field n of proc(5) is fields[n - 3] here.
    let number = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|field| field.parse::<u64>().ok())
    };
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096);
    #[allow(clippy::cast_precision_loss)]
    let cpu_seconds = (number(14)? + number(15)?) as f64 / ticks as f64;
    Some(VmmProcessStats {
        pid,
        rss_bytes: number(24)?.saturating_mul(u64::try_from(page).unwrap_or(4096)),
        cpu_seconds,
        threads: u32::try_from(number(20)?).unwrap_or(u32::MAX),
    })
}

fn duplicate_name(name: &str) -> DaemonError {
    DaemonError::new(
        ErrorKind::AlreadyExists,
        format!("VM `{name}` already exists"),
    )
    .with_hint("pick another name, or `banger vm delete` the old VM")
}

fn validate_size(vcpus: u8, memory_mib: u32) -> DaemonResult<()> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(DaemonError::invalid_params(format!(
            "vcpus must be between 1 and {MAX_VCPUS}, not {vcpus}"
        )));
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(DaemonError::invalid_params(format!(
            "memory must be at least {MIN_MEMORY_MIB} MiB, not {memory_mib}"
        )));
    }
    Ok(())
}

fn check_artifacts(image_path: &Path, kernel: &Kernel) -> DaemonResult<()> {
    let mut required = vec![image_path.to_owned(), PathBuf::from(&kernel.kernel_path)];
    required.extend(kernel.initrd_path.as_ref().map(PathBuf::from));
    for path in required {
        if !path.is_file() {
            return Err(DaemonError::new(
                ErrorKind::Failed,
                format!("{} is missing from the state dir", path.display()),
            )
            .with_hint("remove and import the image or kernel again"));
        }
    }
    Ok(())
}

fn begin_stage(
    operation: &LiveOperation,
    name: &'static str,
) -> DaemonResult<crate::operations::Stage> {
    if operation.is_cancelled() {
        return Err(operation.cancelled_error());
    }
    Ok(operation.start_stage(name))
}

fn end_stage<T>(
    operation: &LiveOperation,
    stage: &crate::operations::Stage,
    outcome: DaemonResult<T>,
    message: Option<String>,
) -> DaemonResult<T> {
    match &outcome {
        Ok(_) => operation.finish_stage(stage, message),
        Err(error) => operation.fail_stage(stage, error),
    }
    outcome
}

fn remove_dir_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vmm_process_stats_reads_proc_stat() {
        let stat = "4242 (qemu (x86) S) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 2560 18446744073709551615";
        let stats = super::vmm_process_stats(4242, stat).unwrap();
        assert_eq!(stats.threads, 7);
        assert!(stats.cpu_seconds > 0.0);
        assert_eq!(stats.rss_bytes % 2560, 0);
        assert!(stats.rss_bytes >= 2560 * 4096);
        assert!(super::vmm_process_stats(1, "garbage").is_none());
    }
}
