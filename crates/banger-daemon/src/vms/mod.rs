//! VMService: the VMs' lifecycle, one room per job:
//! - this file: the service, its parts, the per-VM locks, the process table,
//!   lookups, and access to running guests' agents;
//! - [`state`]: the state machine (legal transitions, stated once);
//! - [`create`]: the create operation as a list of named steps with undos;
//! - [`lifecycle`]: start, stop, restart, delete, set;
//! - [`supervise`]: launching the VMM and watching it exit;
//! - [`reconcile`]: bringing store and host back in line at daemon start;
//! - [`error`]: [`VmError`], what all of these fail with.
//!
//! Capabilities (`crate::capabilities`) hook into each of these; the list is
//! built in the composition root and handed over in [`VmServiceParts`].
//!
//! Lock order (see docs/ARCHITECTURE.md): a per-VM async lock is taken first
//! and may be held across awaits for as long as the lifecycle step runs; the
//! short std mutexes (`locks`, `processes`, the store's connection) are taken
//! after it, never held across an await, and never two at once. No lock spans
//! more than one VM, so operations on different VMs run in parallel.

pub mod console;
mod create;
mod error;
mod lifecycle;
mod reconcile;
pub mod snapshot;
pub mod state;
mod supervise;
pub mod warm_pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use banger_agent_proto::client::AgentClient;
use banger_proto::{Vm, VmStats, VmmProcessStats};
use banger_store::{Store, VmLookup};
use banger_vmm::{AgentEndpoint, VmmHandle};
use tokio::sync::OwnedMutexGuard;

use crate::agents::Agents;
use crate::backends::Backends;
use crate::capabilities::agent::AgentEndpoints;
use crate::capabilities::Capabilities;
use crate::catalog::CatalogService;
use crate::config::{Config, MAX_VCPUS, MIN_MEMORY_MIB};
use crate::error::{DaemonError, DaemonResult};
use crate::images::ImageService;
use crate::operations::OperationRegistry;
use crate::paths::StatePaths;
use banger_disk::clone::CloneStrategy;

pub use create::{AgentWait, GuestStage};
pub use error::VmError;
pub use reconcile::ReconcileReport;
use state::{Decision, Refusal, Request};

type VmLock = Arc<tokio::sync::Mutex<()>>;

pub struct VmService {
    store: Store,
    paths: StatePaths,
    config: Arc<Config>,
    images: ImageService,
    backends: Arc<Backends>,
    clone: Arc<dyn CloneStrategy>,
    catalog: Arc<CatalogService>,
    operations: Arc<OperationRegistry>,
    /// Hooked into every lifecycle step, in this order.
    capabilities: Capabilities,
    /// Connections to the guest agents of running VMs (`vm.agent`, stats).
    agents: Arc<Agents>,
    locks: Mutex<HashMap<String, VmLock>>,
    /// The live VMM process of each VM that has one.
    processes: Mutex<HashMap<String, VmmHandle>>,
    /// The rotations of the VMs' console logs.
    consoles: console::Consoles,
    /// Root disks of the default image cloned ahead of time.
    warm_pool: Arc<warm_pool::WarmPool>,
}

/// What [`VmService`] is built from: its seams and the services it uses.
pub struct VmServiceParts {
    pub store: Store,
    pub paths: StatePaths,
    pub config: Arc<Config>,
    pub images: ImageService,
    pub backends: Arc<Backends>,
    pub clone: Arc<dyn CloneStrategy>,
    pub catalog: Arc<CatalogService>,
    pub operations: Arc<OperationRegistry>,
    pub capabilities: Capabilities,
    pub agents: Arc<Agents>,
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
            operations,
            capabilities,
            agents,
        } = parts;
        let warm_pool = Arc::new(warm_pool::WarmPool::new(
            &paths.root,
            config.vm.warm_pool,
            &config.vm.image,
            Arc::clone(&clone),
            store.clone(),
        ));
        Arc::new(Self {
            store,
            paths,
            config,
            images,
            backends,
            clone,
            catalog,
            operations,
            capabilities,
            agents,
            locks: Mutex::new(HashMap::new()),
            processes: Mutex::new(HashMap::new()),
            consoles: console::Consoles::default(),
            warm_pool,
        })
    }

    /// The warm pool of default-image root disks.
    pub fn warm_pool(&self) -> &Arc<warm_pool::WarmPool> {
        &self.warm_pool
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

    /// Holds the VM's lock: no lifecycle step of that VM runs meanwhile
    /// (`disk.resize` holds it so the VM cannot boot mid-resize).
    pub async fn lock_vm(&self, vm_id: &str) -> OwnedMutexGuard<()> {
        self.lock_of(vm_id).lock_owned().await
    }

    fn forget_lock(&self, vm_id: &str) {
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vm_id);
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

    pub fn list(&self) -> Result<Vec<Vm>, VmError> {
        Ok(self
            .store
            .list_vms()?
            .into_iter()
            .map(|vm| self.described(vm))
            .collect())
    }

    /// The VM as users see it: what the capabilities add to the row.
    fn described(&self, mut vm: Vm) -> Vm {
        for capability in &self.capabilities {
            capability.describe(&mut vm);
        }
        vm
    }

    /// Resolves a name or unique id prefix.
    pub fn find(&self, reference: &str) -> Result<Vm, VmError> {
        match self.store.lookup_vm(reference)? {
            VmLookup::Found(vm) => Ok(self.described(*vm)),
            VmLookup::NotFound => Err(VmError::NotFound {
                reference: reference.to_owned(),
            }),
            VmLookup::Ambiguous(names) => Err(VmError::Ambiguous {
                reference: reference.to_owned(),
                names,
            }),
        }
    }

    pub fn get(&self, vm_id: &str) -> Option<Vm> {
        self.store.get_vm(vm_id).ok().flatten()
    }

    /// Reloads `vm` under its lock; it may have changed while we waited.
    fn reload(&self, vm: &Vm) -> Result<Vm, VmError> {
        self.store.get_vm(&vm.id)?.ok_or_else(|| VmError::Deleted {
            name: vm.name.clone(),
        })
    }

    /// The error for a request [`state::decide`] refused.
    fn refused(&self, vm: &Vm, decision: Decision, request: Request) -> VmError {
        let (name, state) = (vm.name.clone(), vm.state);
        match decision {
            Decision::BusyCreating => VmError::BeingCreated {
                name,
                operation: self
                    .operations
                    .running_for_vm(&vm.id)
                    .map(|operation| operation.id.clone())
                    .unwrap_or_default(),
            },
            Decision::Refuse(Refusal::StartFirst) => VmError::NotRunning { name, state },
            Decision::Refuse(Refusal::StopFirst) if request == Request::Change => {
                VmError::ChangeNeedsStop { name, state }
            }
            Decision::Refuse(Refusal::StopFirst) => VmError::StopFirst { name, state },
            Decision::Refuse(Refusal::ResumeFirst) => VmError::Paused { name },
            _ => VmError::InTransition { name, state },
        }
    }

    // ---- running guests ----

    /// The agent connection of a running VM. A [`DaemonResult`]: the RPC
    /// layer matches it against its own parsing of the params.
    pub async fn agent(&self, reference: &str) -> DaemonResult<(Vm, AgentClient)> {
        Ok(self.agent_client(reference).await?)
    }

    async fn agent_client(&self, reference: &str) -> Result<(Vm, AgentClient), VmError> {
        let vm = self.find(reference)?;
        let decision = state::decide(vm.state, Request::UseAgent);
        if decision != Decision::Proceed {
            return Err(self.refused(&vm, decision, Request::UseAgent));
        }
        let endpoint = self.backends.agent_endpoint(&vm);
        let client = self.agents.client(&vm.id, &vm.name, &endpoint).await?;
        Ok((vm, client))
    }

    /// The agent of a VM whose VMM `handle` runs: the kept connection, or
    /// one waited for as `agent ready` does (within `[agent]
    /// ready_timeout_seconds`, giving up if the VMM exits).
    async fn agent_of(&self, vm: &Vm, handle: &VmmHandle) -> DaemonResult<AgentClient> {
        let endpoint = self.backends.agent_endpoint(vm);
        let console = std::path::Path::new(&vm.dir).join(banger_vmm::CONSOLE_LOG_FILE);
        self.agents
            .wait_ready(
                &vm.id,
                &endpoint,
                &console,
                self.config.agent.ready_timeout(),
                async {
                    handle.wait_exit().await;
                },
            )
            .await
            .map_err(DaemonError::from)
    }

    /// A VM's console log (`console.log` in its directory, also when the
    /// VMM is jailed), where its rotation is recorded, and its VMM process
    /// when it has one and `follow` is asked. Returns what the log holds.
    pub fn console_log(
        &self,
        reference: &str,
        follow: bool,
    ) -> Result<(Vm, console::Follower, Vec<u8>, Option<VmmHandle>), VmError> {
        let vm = self.find(reference)?;
        let handle = self.process_of(&vm.id).filter(|_| follow);
        let path = std::path::Path::new(&vm.dir).join(banger_vmm::CONSOLE_LOG_FILE);
        let rotation = self.consoles.of(&path);
        let (follower, bytes) = console::Follower::open(path.clone(), rotation, handle.is_some())
            .map_err(|source| VmError::ConsoleLog { path, source })?;
        Ok((vm, follower, bytes, handle))
    }

    /// The guest's and the VMM process's resource use.
    pub async fn stats(&self, reference: &str) -> Result<VmStats, VmError> {
        let (vm, client) = self.agent_client(reference).await?;
        let guest = client.stats().await.map_err(|source| VmError::GuestStats {
            name: vm.name.clone(),
            source,
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
}

impl AgentEndpoints for Backends {
    fn agent_endpoint(&self, vm: &Vm) -> AgentEndpoint {
        self.get(vm.backend)
            .agent_endpoint(std::path::Path::new(&vm.dir))
            .0
    }
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

fn validate_size(vcpus: u8, memory_mib: u32) -> Result<(), VmError> {
    validate_size_on(vcpus, memory_mib, &HostResources::read())
}

/// What a VM may not exceed on this host.
#[derive(Debug, Clone, Copy)]
struct HostResources {
    cpus: u32,
    /// `MemTotal` of `/proc/meminfo`; `None` when unreadable.
    memory_mib: Option<u64>,
}

impl HostResources {
    fn read() -> Self {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |cpus| u32::try_from(cpus.get()).unwrap_or(u32::MAX));
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|meminfo| mem_total_mib(&meminfo));
        Self { cpus, memory_mib }
    }
}

fn mem_total_mib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
}

fn validate_size_on(vcpus: u8, memory_mib: u32, host: &HostResources) -> Result<(), VmError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(VmError::Vcpus { vcpus });
    }
    if u32::from(vcpus) > host.cpus {
        return Err(VmError::VcpusOverHost {
            vcpus,
            host_cpus: host.cpus,
        });
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(VmError::Memory { memory_mib });
    }
    if let Some(host_mib) = host.memory_mib {
        if u64::from(memory_mib) > host_mib {
            return Err(VmError::MemoryOverHost {
                memory_mib,
                host_mib,
            });
        }
    }
    Ok(())
}

fn remove_dir_if_present(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use crate::error::RpcFailure;

    #[test]
    fn vcpus_and_memory_are_bounded_by_the_host() {
        let host = super::HostResources {
            cpus: 2,
            memory_mib: Some(4000),
        };
        assert!(super::validate_size_on(2, 4000, &host).is_ok());
        let error = super::validate_size_on(3, 512, &host).unwrap_err();
        assert_eq!(error.to_string(), "vcpus 3 is more than the host's 2 CPUs");
        let error = super::validate_size_on(1, 4001, &host).unwrap_err();
        assert_eq!(
            error.to_string(),
            "memory_mib 4001 is more than the host's memory (MemTotal 4000 MiB)"
        );
        assert_eq!(error.kind(), banger_proto::ErrorKind::InvalidParams);
        assert_eq!(
            super::mem_total_mib("MemFree: 1 kB\nMemTotal:        4030120 kB\n"),
            Some(3935)
        );
        // This host: more memory than it has is refused.
        let error = super::validate_size(1, u32::MAX).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("memory_mib 4294967295 is more than the host's memory (MemTotal "),
            "{error}"
        );
    }

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

#[cfg(test)]
mod create_tests;
