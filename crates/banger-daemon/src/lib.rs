//! `bangerd`: the daemon that owns banger's state and VMM processes.
//!
//! [`run`] is the composition root: it loads the config, takes the state
//! dir's lock, opens the store, builds the services with their seams (the
//! VMM backend, the store), reconciles, and serves the control socket until
//! SIGINT/SIGTERM. VMs keep running when the daemon stops; the next daemon
//! re-adopts them.

pub mod access;
pub mod agents;
pub mod backends;
pub mod capabilities;
pub mod catalog;
pub mod config;
pub mod disks;
pub mod doctor;
pub mod error;
pub mod fault;
pub mod files;
pub mod ids;
pub mod images;
pub mod network;
pub mod operations;
pub mod paths;
pub mod relay;
pub mod server;
pub mod vms;
pub mod workspace;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use banger_store::Store;
use tokio::net::UnixListener;

use crate::access::AccessPolicy;
use crate::agents::Agents;
use crate::backends::Backends;
use crate::capabilities::agent::AgentCapability;
use crate::capabilities::network::{DnsCapability, NatCapability, NetworkCapability};
use crate::capabilities::work_disk::WorkDiskCapability;
use crate::capabilities::Capabilities;
use crate::config::Config;
use crate::disks::WorkDisks;
use crate::images::ImageService;
use crate::network::Network;
use crate::operations::OperationRegistry;
use crate::paths::StatePaths;
use crate::server::{Daemon, DaemonInfo};
use crate::vms::{VmService, VmServiceParts};

/// Where the daemon keeps things; every path is overridable by flag and env.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// Whether `config` must exist (it was named explicitly).
    pub config_required: bool,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(options: DaemonOptions) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(&options.config, options.config_required)?);
    let paths = StatePaths::new(&options.state_dir);
    paths
        .create()
        .with_context(|| format!("Failed to create state dir {}", paths.root.display()))?;
    let _state_lock = lock_state_dir(&paths)?;
    clear_dir(&paths.tmp())?;
    let store = Store::open(&paths.database())?;

    let backends = crate::backends::Backends::from_config(&config, &paths).await?;
    tracing::info!(backend = %backends.default, reason = %backends.reason, "default VMM backend");
    let (clone, clone_reason) =
        banger_disk::clone::select_strategy(&config.storage.clone, &paths.root)?;
    tracing::info!(strategy = %clone.kind(), reason = %clone_reason, "root disk clone strategy");
    let operations = Arc::new(OperationRegistry::new(store.clone()));
    let images = ImageService::new(
        store.clone(),
        paths.clone(),
        config.storage.allow_device_nodes,
    )
    .with_agent_path(config.agent.path.clone());
    let catalog = Arc::new(crate::catalog::CatalogService::new(
        &config.catalog,
        paths.clone(),
        images.clone(),
        Arc::clone(&operations),
    )?);
    let network = crate::network::Network::start(&config.network, store.clone()).await?;
    let backends = Arc::new(backends);
    let agents = Arc::new(Agents::default());
    let disks = Arc::new(
        WorkDisks::new(store.clone(), paths.disks()).with_max_bytes(config.vm.max_disk_bytes()),
    );
    let vms = VmService::new(VmServiceParts {
        store,
        paths: paths.clone(),
        config: Arc::clone(&config),
        images: images.clone(),
        backends: Arc::clone(&backends),
        clone: Arc::from(clone),
        catalog: Arc::clone(&catalog),
        operations: Arc::clone(&operations),
        capabilities: capabilities(&config, network.as_ref(), &disks, &agents, &backends),
        agents,
    });
    let report = vms.reconcile().await?;
    let removed_warm = vms.warm_pool().reconcile();
    tracing::info!(
        adopted = ?report.adopted,
        crashed = ?report.crashed,
        removed_interrupted = ?report.removed_interrupted,
        removed_orphan_dirs = ?report.removed_orphan_dirs,
        stopped = ?report.stopped,
        unresolved = ?report.unresolved,
        killed_orphan_processes = ?report.killed_orphan_processes,
        removed_orphan_files = ?report.removed_orphan_files,
        released_devices = %report.released_devices,
        removed_warm_pool_leftovers = ?removed_warm,
        "reconciled state"
    );

    let access = AccessPolicy::new(&config.access.group);
    let listener = bind_socket(&options.socket, &access)?;
    let daemon = Arc::new(Daemon {
        config: Arc::clone(&config),
        paths: paths.clone(),
        vms,
        images,
        catalog,
        operations,
        network: network.clone(),
        disks,
        workspace: crate::workspace::WorkspaceService::new(),
        access,
        info: DaemonInfo {
            socket: options.socket.display().to_string(),
            state_dir: paths.root.display().to_string(),
            config: options.config.display().to_string(),
            started: Instant::now(),
            clone_reason,
        },
    });
    tracing::info!(
        socket = %options.socket.display(),
        state_dir = %paths.root.display(),
        version = banger_proto::VERSION,
        "bangerd serving"
    );
    server::serve(listener, shutdown_signal(), daemon).await;
    if let Some(network) = network {
        network.shutdown().await;
    }
    let _ = std::fs::remove_file(&options.socket);
    tracing::info!("bangerd stopped; VMs keep running");
    Ok(())
}

/// The capabilities every VM gets, in the order their hooks run: prepares
/// (and their create stages) in this order, undos and deletes in reverse.
fn capabilities(
    config: &Config,
    network: Option<&Arc<Network>>,
    disks: &Arc<WorkDisks>,
    agents: &Arc<Agents>,
    backends: &Arc<Backends>,
) -> Capabilities {
    let mut list: Capabilities = vec![Arc::new(WorkDiskCapability::new(Arc::clone(disks)))];
    if let Some(network) = network {
        list.push(Arc::new(NetworkCapability::new(Arc::clone(network))));
        list.push(Arc::new(DnsCapability::new(Arc::clone(network))));
        list.push(Arc::new(NatCapability::new(Arc::clone(network))));
    }
    list.push(Arc::new(AgentCapability::new(
        Arc::clone(agents),
        Arc::clone(backends) as Arc<dyn crate::capabilities::agent::AgentEndpoints>,
        config.agent.wait,
        config.agent.ready_timeout(),
    )));
    list
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

/// One daemon per state dir: an exclusive `flock` held for the process's life.
fn lock_state_dir(paths: &StatePaths) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = paths.lock_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("Failed to open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            anyhow::anyhow!(
                "Another bangerd is using state dir {} ({errno})",
                paths.root.display()
            )
        },
    )
}

fn clear_dir(path: &Path) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(path).with_context(|| format!("Failed to read {}", path.display()))?
    {
        let entry = entry?;
        let removed = if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
        removed.with_context(|| format!("Failed to remove {}", entry.path().display()))?;
    }
    Ok(())
}

/// Binds the control socket: refuses if another daemon answers on it,
/// replaces a stale file, then sets mode 0660 and the access group.
fn bind_socket(path: &Path, access: &AccessPolicy) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("Failed to create {}", parent.display()))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("Failed to set mode of {}", parent.display()))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("Another bangerd is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("Failed to remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("Failed to bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("Failed to set mode of {}", path.display()))?;
    match access.group_id {
        Some(gid) if nix::unistd::geteuid().is_root() => {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).with_context(
                || {
                    format!(
                        "Failed to give {} to group {}",
                        path.display(),
                        access.group_name
                    )
                },
            )?;
        }
        Some(_) => {}
        None => tracing::warn!(
            group = %access.group_name,
            "access group does not exist; only root can use the daemon"
        ),
    }
    Ok(listener)
}
