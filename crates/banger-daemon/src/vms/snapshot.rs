//! Pause, resume and snapshots (`vm.pause`, `vm.resume`, `vm.snapshot`,
//! `snapshot.{list,show,rm}`).
//!
//! A snapshot is a directory `STATE_DIR/snapshots/ID/` (mode 0700, files
//! 0600, root's: it holds guest memory) and a row in the store:
//!
//! 1. The VM's lock is taken; the directory is made, holding the marker
//!    [`PAUSED_MARKER_FILE`] (the VM's id) when the VM runs; a running VM
//!    is paused (state `paused`).
//! 2. The backend writes `vmstate` and `memory` ([`banger_vmm::Vmm::snapshot`]).
//! 3. The root disk (and the work disk, if any) are copied as they are at
//!    the pause: a reflink where the filesystem has them, else a sparse
//!    copy. The guest's unwritten page cache is in `memory`, so memory and
//!    disks agree.
//! 4. The row is inserted; the VM is resumed (or stopped with `--stop`);
//!    the marker goes.
//!
//! A failure at any step resumes the VM and removes the directory: nothing
//! is registered. The row is not tied to the VM's: a snapshot survives its
//! source. A daemon killed meanwhile leaves a directory with the marker:
//! reconciliation ([`VmService::reconcile_snapshots`]) resumes the VM it
//! names and removes a directory no row accounts for. Fault points
//! ([`crate::fault`]): `snapshot:pause`, `snapshot:write`, `snapshot:copy
//! disks`, `snapshot:register`, `snapshot:resume`.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_disk::clone::RootDisk;
use banger_disk::clone::{
    dm_name, reflink_file, sparse_copy, CloneError, StrategyKind, ROOT_DISK_FILE,
};
use banger_proto::{CreateVmParams, ErrorKind, Kernel, Snapshot, SnapshotVmParams, Vm, VmState};
use banger_vmm::{SnapshotInfo, VmmError, VmmHandle};

use super::create::Step;
use super::state::{self, Decision, Request};
use super::{VmError, VmService};
use crate::capabilities::CreateOptions;
use crate::error::RpcFailure;
use crate::ids::{new_id, now, validate_artifact_name, InvalidArtifactName};

/// File name of the work disk's copy in a snapshot directory.
pub const WORK_DISK_FILE: &str = "work.ext4";
/// While a snapshot is taken of a running VM: a file in its directory
/// naming the VM it paused (see the module docs).
pub const PAUSED_MARKER_FILE: &str = "paused-vm";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("No snapshot named `{name}`")]
    NotFound { name: String },
    #[error(transparent)]
    InvalidName(#[from] InvalidArtifactName),
    #[error("Snapshot `{name}` already exists")]
    Exists { name: String },
    #[error("VM `{name}` has no VMM process")]
    NoProcess { name: String },
    #[error("Could not pause VM `{name}`")]
    Pause {
        name: String,
        #[source]
        source: Box<VmmError>,
    },
    #[error("Could not resume VM `{name}`")]
    Resume {
        name: String,
        #[source]
        source: Box<VmmError>,
    },
    #[error("Could not write the snapshot of VM `{name}`")]
    Write {
        name: String,
        #[source]
        source: Box<VmmError>,
    },
    #[error("Could not copy the disk {} into the snapshot", path.display())]
    CopyDisk {
        path: PathBuf,
        #[source]
        source: Box<CloneError>,
    },
    #[error("Could not make the snapshot directory {}", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Could not remove the snapshot directory {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("A background task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("A VM restored from snapshot `{name}` cannot take {what}: it has the snapshot's")]
    RestoreConflict { name: String, what: &'static str },
    #[error("--regen-host-keys needs --from-snapshot: a booted VM makes its own keys")]
    RegenWithoutSnapshot,
    #[error("Restoring snapshots needs the reflink or copy clone strategy, not dm-snapshot")]
    RestoreDmSnapshot,
    #[error("Could not restore VM `{name}` from snapshot `{snapshot}`")]
    Restore {
        name: String,
        snapshot: String,
        #[source]
        source: Box<VmmError>,
    },
}

impl RpcFailure for SnapshotError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::InvalidName(_) | Self::RestoreConflict { .. } | Self::RegenWithoutSnapshot => {
                ErrorKind::InvalidParams
            }
            Self::RestoreDmSnapshot => ErrorKind::InvalidState,
            Self::Exists { .. } => ErrorKind::AlreadyExists,
            Self::NoProcess { .. } | Self::Task(_) => ErrorKind::Internal,
            _ => ErrorKind::Failed,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NotFound { .. } => Some("list snapshots with `banger snapshot list`".to_owned()),
            Self::Exists { .. } => {
                Some("pick another name, or `banger snapshot rm` the old snapshot".to_owned())
            }
            Self::InvalidName(_) => Some(
                "names are lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit"
                    .to_owned(),
            ),
            Self::RestoreConflict { what, .. } => Some(format!("drop the option that sets {what}")),
            Self::RestoreDmSnapshot => Some(
                "set `[storage] clone = \"copy\"` (or reflink on a file system that has it) in the daemon's config"
                    .to_owned(),
            ),
            _ => None,
        }
    }
}

impl VmService {
    /// Stops the VM's vCPUs; it keeps its VMM, devices and agent connection.
    pub async fn pause(self: &Arc<Self>, reference: &str) -> Result<Vm, VmError> {
        let (mut vm, _guard) = self.locked_for(reference, Request::Pause).await?;
        if vm.state == VmState::Paused {
            return Ok(vm);
        }
        let handle = self.process_for(&vm)?;
        self.pause_vmm(&mut vm, &handle).await?;
        Ok(vm)
    }

    /// Runs a paused VM's vCPUs again.
    pub async fn resume(self: &Arc<Self>, reference: &str) -> Result<Vm, VmError> {
        let (mut vm, _guard) = self.locked_for(reference, Request::Resume).await?;
        if vm.state == VmState::Running {
            return Ok(vm);
        }
        let handle = self.process_for(&vm)?;
        self.resume_vmm(&mut vm, &handle).await?;
        Ok(vm)
    }

    /// Writes a snapshot of the VM (see the module's steps).
    pub async fn snapshot(
        self: &Arc<Self>,
        params: &SnapshotVmParams,
    ) -> Result<Snapshot, VmError> {
        let (mut vm, guard) = self.locked_for(&params.vm, Request::Snapshot).await?;
        let name = match &params.name {
            Some(name) => name.clone(),
            None => self.free_snapshot_name(&vm.name)?,
        };
        validate_artifact_name("snapshot", &name).map_err(SnapshotError::from)?;
        if self.store.find_snapshot(&name)?.is_some() {
            return Err(SnapshotError::Exists { name }.into());
        }
        let handle = self.process_for(&vm)?;
        let was_running = vm.state == VmState::Running;
        let snapshots_dir = self.paths.root.join("snapshots");
        self.check_snapshot_space(&vm, &snapshots_dir)?;
        let id = new_id();
        let dir = snapshots_dir.join(&id);
        make_private_dir(&dir)?;
        let marker = dir.join(PAUSED_MARKER_FILE);
        if was_running {
            if let Err(source) = std::fs::write(&marker, &vm.id) {
                remove_dir(&dir);
                return Err(SnapshotError::Directory {
                    path: marker,
                    source,
                }
                .into());
            }
            crate::fault::pause_at(|| "snapshot:pause".to_owned());
            if let Err(error) = self.pause_vmm(&mut vm, &handle).await {
                remove_dir(&dir);
                return Err(error);
            }
        }
        let written = self.write_snapshot(&vm, &handle, &dir).await;
        let registered = written.and_then(|(info, has_work_disk)| {
            crate::fault::pause_at(|| "snapshot:register".to_owned());
            let snapshot = Snapshot {
                id: id.clone(),
                name: name.clone(),
                source_vm_id: vm.id.clone(),
                source_vm: vm.name.clone(),
                image: vm.image.clone(),
                kernel: vm.kernel.clone(),
                backend: info.backend,
                backend_version: info.backend_version,
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
                disk_bytes: vm.disk_bytes,
                has_work_disk,
                size_bytes: bytes_on_disk(&dir),
                dir: dir.display().to_string(),
                created_at: now(),
            };
            self.store.insert_snapshot(&snapshot)?;
            Ok(snapshot)
        });
        if params.stop && registered.is_ok() {
            remove_marker(&marker);
            drop(guard);
            self.stop(&vm.id, false).await?;
            return registered;
        }
        if was_running {
            crate::fault::pause_at(|| "snapshot:resume".to_owned());
            let resumed = self.resume_vmm(&mut vm, &handle).await;
            if resumed.is_ok() {
                remove_marker(&marker);
            }
            if registered.is_err() {
                remove_dir(&dir);
            }
            resumed?;
        } else if registered.is_err() {
            remove_dir(&dir);
        }
        registered
    }

    pub fn snapshots(&self) -> Result<Vec<Snapshot>, VmError> {
        Ok(self.store.list_snapshots()?)
    }

    pub fn find_snapshot(&self, name: &str) -> Result<Snapshot, VmError> {
        self.store.find_snapshot(name)?.ok_or_else(|| {
            SnapshotError::NotFound {
                name: name.to_owned(),
            }
            .into()
        })
    }

    /// Removes a snapshot's files and row. VMs restored from it are not
    /// affected: their disks are their own clones, and a running restored
    /// Firecracker holds its own link to the memory file, which it mapped
    /// privately.
    pub async fn remove_snapshot(&self, name: &str) -> Result<Snapshot, VmError> {
        let snapshot = self.find_snapshot(name)?;
        // Restores of this snapshot hold its lock while they read it.
        let lock = self.lock_of(&snapshot.id);
        let _guard = lock.lock().await;
        let dir = PathBuf::from(&snapshot.dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SnapshotError::Remove { path: dir, source }.into()),
        }
        self.store.delete_snapshot(&snapshot.id)?;
        self.forget_lock(&snapshot.id);
        Ok(snapshot)
    }

    /// The VM under its lock, if the state machine lets `request` proceed
    /// (or says it is already done).
    async fn locked_for(
        &self,
        reference: &str,
        request: Request,
    ) -> Result<(Vm, tokio::sync::OwnedMutexGuard<()>), VmError> {
        let vm = self.find(reference)?;
        if vm.state == VmState::Creating {
            return Err(self.refused(&vm, Decision::BusyCreating, request));
        }
        let guard = self.lock_vm(&vm.id).await;
        let vm = self.reload(&vm)?;
        match state::decide(vm.state, request) {
            Decision::Proceed | Decision::AlreadyDone => Ok((vm, guard)),
            decision => Err(self.refused(&vm, decision, request)),
        }
    }

    fn process_for(&self, vm: &Vm) -> Result<VmmHandle, VmError> {
        self.process_of(&vm.id).ok_or_else(|| {
            SnapshotError::NoProcess {
                name: vm.name.clone(),
            }
            .into()
        })
    }

    async fn pause_vmm(&self, vm: &mut Vm, handle: &VmmHandle) -> Result<(), VmError> {
        self.backends
            .of(handle)
            .pause(handle)
            .await
            .map_err(|source| SnapshotError::Pause {
                name: vm.name.clone(),
                source: Box::new(source),
            })?;
        vm.state = VmState::Paused;
        self.store.update_vm(vm)?;
        Ok(())
    }

    async fn resume_vmm(&self, vm: &mut Vm, handle: &VmmHandle) -> Result<(), VmError> {
        self.backends
            .of(handle)
            .resume(handle)
            .await
            .map_err(|source| SnapshotError::Resume {
                name: vm.name.clone(),
                source: Box::new(source),
            })?;
        vm.state = VmState::Running;
        self.store.update_vm(vm)?;
        Ok(())
    }

    /// Steps 2 and 3: the backend's files, then the disks. Says whether a
    /// work disk was copied.
    async fn write_snapshot(
        &self,
        vm: &Vm,
        handle: &VmmHandle,
        dir: &Path,
    ) -> Result<(SnapshotInfo, bool), VmError> {
        crate::fault::pause_at(|| "snapshot:write".to_owned());
        let info = self
            .backends
            .of(handle)
            .snapshot(handle, dir)
            .await
            .map_err(|source| SnapshotError::Write {
                name: vm.name.clone(),
                source: Box::new(source),
            })?;
        let copies: Vec<(PathBuf, PathBuf)> = self
            .disks_to_copy(vm)?
            .into_iter()
            .map(|(from, name)| (from, dir.join(name)))
            .collect();
        let has_work_disk = copies.len() > 1;
        crate::fault::pause_at(|| "snapshot:copy disks".to_owned());
        tokio::task::spawn_blocking(move || {
            for (from, to) in copies {
                copy_disk(&from, &to)?;
            }
            Ok::<_, SnapshotError>(())
        })
        .await
        .map_err(SnapshotError::Task)??;
        Ok((info, has_work_disk))
    }

    /// The VM's disks a snapshot copies, with their file names in it: the
    /// root disk, then the work disk if it has one.
    fn disks_to_copy(&self, vm: &Vm) -> Result<Vec<(PathBuf, &'static str)>, VmError> {
        let root_disk = if self.clone.kind() == StrategyKind::DmSnapshot {
            Path::new("/dev/mapper").join(dm_name(&vm.id))
        } else {
            Path::new(&vm.dir).join(ROOT_DISK_FILE)
        };
        let mut disks = vec![(root_disk, ROOT_DISK_FILE)];
        if let Some(disk) = self.store.work_disk_of_vm(&vm.id)? {
            disks.push((PathBuf::from(&disk.path), WORK_DISK_FILE));
        }
        Ok(disks)
    }

    /// Refuses a snapshot the state dir has no room for, before the VM is
    /// paused: the guest's memory, plus the disks' allocated bytes unless
    /// they are reflinked (a block device is read whole).
    fn check_snapshot_space(&self, vm: &Vm, dir: &Path) -> Result<(), VmError> {
        let mut needed = u64::from(vm.memory_mib) << 20;
        if self.clone.kind() != StrategyKind::Reflink {
            for (disk, _) in self.disks_to_copy(vm)? {
                needed += std::fs::metadata(&disk).map_or(0, |metadata| {
                    if metadata.is_file() {
                        crate::files::allocated_bytes(&metadata)
                    } else {
                        vm.disk_bytes
                    }
                });
            }
        }
        crate::files::check_free_space(dir, needed, "the snapshot")?;
        Ok(())
    }

    /// `VM-1`, `VM-2`, …: the first name no snapshot has.
    fn free_snapshot_name(&self, vm_name: &str) -> Result<String, VmError> {
        let taken: Vec<String> = self
            .store
            .list_snapshots()?
            .into_iter()
            .map(|snapshot| snapshot.name)
            .collect();
        Ok((1..)
            .map(|number| format!("{vm_name}-{number}"))
            .find(|name| !taken.contains(name))
            .unwrap_or_default())
    }
}

/// A create from a snapshot: `StartVmm` and `Boot` become `Restore`.
pub(super) fn restore_plan(steps: &mut Vec<Step>) {
    steps.retain(|step| *step != Step::Boot);
    for step in steps.iter_mut() {
        if *step == Step::StartVmm {
            *step = Step::Restore;
        }
    }
}

impl VmService {
    /// The snapshot a `vm create --from-snapshot` names, if this create can
    /// restore it.
    pub(super) fn restorable_snapshot(
        &self,
        name: &str,
        params: &CreateVmParams,
        has_guest_stage: bool,
    ) -> Result<Snapshot, VmError> {
        let snapshot = self.find_snapshot(name)?;
        let conflict = |what| SnapshotError::RestoreConflict {
            name: snapshot.name.clone(),
            what,
        };
        let differs = [
            (
                params
                    .image
                    .as_ref()
                    .is_some_and(|image| *image != snapshot.image),
                "another image",
            ),
            (
                params
                    .kernel
                    .as_ref()
                    .is_some_and(|kernel| *kernel != snapshot.kernel),
                "another kernel",
            ),
            (
                params.vcpus.is_some_and(|vcpus| vcpus != snapshot.vcpus),
                "another vCPU count",
            ),
            (
                params
                    .memory_mib
                    .is_some_and(|memory| memory != snapshot.memory_mib),
                "another memory size",
            ),
            (
                params
                    .backend
                    .is_some_and(|backend| backend != snapshot.backend),
                "another backend",
            ),
            (params.work_disk.is_some(), "a work disk"),
            (params.no_start, "--no-start"),
            (has_guest_stage, "a workspace"),
        ];
        if let Some((_, what)) = differs.into_iter().find(|(differs, _)| *differs) {
            return Err(conflict(what).into());
        }
        if self.clone.kind() == StrategyKind::DmSnapshot {
            return Err(SnapshotError::RestoreDmSnapshot.into());
        }
        Ok(snapshot)
    }

    /// The `restore` step: the VM's launch spec (its own disks, tap and
    /// vsock) loaded with the snapshot's memory and device state; the VMM
    /// is recorded and supervised as a spawned one is, and the VM runs.
    pub(super) async fn restore_vmm(
        self: &Arc<Self>,
        vm: &mut Vm,
        kernel: &Kernel,
        root_disk: &RootDisk,
        snapshot: &Snapshot,
        options: &CreateOptions,
    ) -> Result<VmmHandle, VmError> {
        let spec = self.launch_spec(vm, kernel, root_disk).await?;
        let info = SnapshotInfo::in_dir(
            snapshot.backend,
            snapshot.backend_version.clone(),
            Path::new(&snapshot.dir),
        );
        let handle = self
            .backends
            .get(vm.backend)
            .restore(&spec, &info)
            .await
            .map_err(|source| SnapshotError::Restore {
                name: vm.name.clone(),
                snapshot: snapshot.name.clone(),
                source: Box::new(source),
            })?;
        self.processes().insert(vm.id.clone(), handle.clone());
        vm.pid = Some(handle.pid());
        vm.state = VmState::Running;
        vm.started_at = Some(now());
        vm.error = None;
        if let Err(error) = self.store.update_vm(vm) {
            self.discard_process(&vm.id, &handle).await;
            vm.pid = None;
            return Err(error.into());
        }
        // The guest is its source's copy until its agent takes this VM's identity.
        self.agents
            .expect_identity(&vm.id, &spec.kernel_cmdline, options.regen_host_keys);
        self.supervise(&vm.id, handle.clone());
        Ok(handle)
    }
}

/// A copy of a disk file that shares its extents when the filesystem can
/// (FICLONE), else a sparse copy; mode 0600.
fn copy_disk(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::PermissionsExt;
    let copy_error = |source| SnapshotError::CopyDisk {
        path: from.to_owned(),
        source: Box::new(source),
    };
    if reflink_file(from, to).is_err() {
        let _ = std::fs::remove_file(to);
        sparse_copy(from, to, &|| false).map_err(copy_error)?;
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        copy_error(CloneError::Write {
            path: to.to_owned(),
            source,
        })
    })
}

fn make_private_dir(dir: &Path) -> Result<(), SnapshotError> {
    let make = |path: &Path, recursive: bool| {
        std::fs::DirBuilder::new()
            .recursive(recursive)
            .mode(0o700)
            .create(path)
            .map_err(|source| SnapshotError::Directory {
                path: path.to_owned(),
                source,
            })
    };
    if let Some(parent) = dir.parent() {
        make(parent, true)?;
    }
    make(dir, false)
}

fn remove_marker(marker: &Path) {
    if let Err(error) = std::fs::remove_file(marker) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(path = %marker.display(), %error, "could not remove a snapshot's pause marker");
        }
    }
}

impl VmService {
    /// Reconciliation of snapshots a killed daemon was taking: the VM a
    /// directory's pause marker names is resumed if it is still paused (a
    /// failure is logged: `vm resume` is left to the user); a directory
    /// no row accounts for is removed. Returns the directories removed.
    pub(super) async fn reconcile_snapshots(&self) -> Result<Vec<String>, VmError> {
        let known: std::collections::HashSet<String> = self
            .store
            .list_snapshots()?
            .into_iter()
            .map(|snapshot| snapshot.dir)
            .collect();
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.paths.root.join("snapshots")) else {
            return Ok(removed);
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let marker = dir.join(PAUSED_MARKER_FILE);
            if let Ok(vm_id) = std::fs::read_to_string(&marker) {
                self.resume_interrupted(vm_id.trim()).await;
                remove_marker(&marker);
            }
            if !known.contains(&dir.display().to_string()) {
                tracing::warn!(path = %dir.display(), "removing an interrupted snapshot");
                remove_dir(&dir);
                removed.push(dir.display().to_string());
            }
        }
        Ok(removed)
    }

    /// Resumes the VM an interrupted snapshot paused, if it runs: its row
    /// may say `paused`, or still `running` if the daemon died between the
    /// pause and recording it.
    async fn resume_interrupted(&self, vm_id: &str) {
        let Ok(Some(mut vm)) = self.store.get_vm(vm_id) else {
            return;
        };
        let Some(handle) = self.process_of(&vm.id) else {
            return;
        };
        if !matches!(vm.state, VmState::Paused | VmState::Running) {
            return;
        }
        match self.resume_vmm(&mut vm, &handle).await {
            Ok(()) => {
                tracing::info!(vm = %vm.name, "resumed the VM an interrupted snapshot paused")
            }
            Err(error) => {
                tracing::error!(vm = %vm.name, error = %crate::error::chain(&error), "could not resume the VM an interrupted snapshot paused");
            }
        }
    }
}

fn remove_dir(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(path = %dir.display(), %error, "could not remove a snapshot directory");
        }
    }
}

/// Bytes the files of `dir` take on disk (allocated blocks: sparse parts
/// and shared extents are counted as the filesystem reports them).
pub fn bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name() != PAUSED_MARKER_FILE)
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.blocks() * 512)
        .sum()
}
