//! Work disks: persistent ext4 disks mounted at `/root` in the guest.
//!
//! A capability like the network one: a plain struct holding the store and
//! its directory, hooked into the VM lifecycle by `VmService`:
//! - create: [`WorkDisks::prepare`] makes a new disk (`--work-disk 10G`) or
//!   attaches a detached one (`--work-disk NAME`); a restore from a snapshot
//!   holding a work disk gets a copy of it ([`WorkDisks::copy_from`]); undone
//!   by [`WorkDisks::release`] if a later stage fails;
//! - launch: [`WorkDisks::drive`] adds it as the second drive, labelled
//!   [`WORK_DISK_LABEL`] so the agent finds it whatever the device order;
//! - delete: [`WorkDisks::release`] deletes it, or detaches it with
//!   `--keep-work-disk`;
//! - reconciliation: [`WorkDisks::release_interrupted`] undoes an
//!   interrupted create's disk, [`WorkDisks::remove_orphans`] deletes disk
//!   files no row accounts for.
//!
//! A disk is attached to at most one VM (a unique column). Disks only grow,
//! and only while no VMM has them open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_disk::ext4::Ext4Error;
use banger_proto::{parse_size, validate_vm_name, ErrorKind, NameError, Vm, VmState, WorkDisk};
use banger_store::{Store, StoreError};
use banger_vmm::DriveSpec;

use crate::error::{RpcFailure, StoreFailure};
use crate::ids::{new_id, now};

/// The file system label of every work disk; the agent mounts the disk
/// carrying it at `/root`.
pub const WORK_DISK_LABEL: &str = "banger-work";
/// Drive id of the work disk in a launch.
pub const WORK_DRIVE_ID: &str = "work";
/// Smallest work disk (ext4 needs room for its journal).
pub const MIN_WORK_DISK_BYTES: u64 = 64 << 20;
/// Largest work disk (a sparse file; this is a sanity bound).
pub const MAX_WORK_DISK_BYTES: u64 = 16 << 40;

pub struct WorkDisks {
    store: Store,
    dir: PathBuf,
    /// `[vm] max_disk_size`.
    max_bytes: Option<u64>,
    /// Held while a disk is resized or attached, so a create never attaches
    /// (and boots) a disk whose file is being lengthened.
    busy: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkDiskError {
    #[error("No work disk named `{name}`")]
    NotFound { name: String },
    #[error("Invalid work disk name")]
    InvalidName(#[source] NameError),
    /// Not a size at all (`parse_size`'s own words).
    #[error("{reason}")]
    InvalidSize { reason: String },
    #[error("Work disk size `{size}` is out of range (64M to 16T)")]
    SizeOutOfRange { size: String },
    #[error("Disk size {size} is more than the configured maximum {max} (`[vm] max_disk_size`)")]
    OverMaximum { size: String, max: String },
    #[error(
        "No space for a disk of {size}: it needs {needed} more in {dir}, which has {free} free"
    )]
    OverFreeSpace {
        size: String,
        needed: String,
        free: String,
        dir: PathBuf,
    },
    #[error("A work disk named `{name}` exists")]
    Exists { name: String },
    /// A create asked for a disk another VM has.
    #[error("Work disk `{disk}` is attached to VM `{vm}`")]
    AttachedElsewhere { disk: String, vm: String },
    /// `disk rm` of a disk a VM has.
    #[error("Work disk `{disk}` is attached to VM `{vm}`")]
    StillAttached { disk: String, vm: String },
    #[error("Work disk `{disk}` was attached to a VM meanwhile")]
    AttachedMeanwhile { disk: String },
    #[error("Work disk `{disk}` is in use by VM `{vm}`, which is {state}")]
    InUse {
        disk: String,
        vm: String,
        state: VmState,
    },
    #[error("Work disk `{disk}` is {size_bytes} bytes; disks grow but never shrink")]
    Shrink { disk: String, size_bytes: u64 },
    #[error("Failed to create {path}")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to make the work disk")]
    Make(#[source] Box<Ext4Error>),
    #[error("Failed to copy the snapshot's work disk {}", path.display())]
    Copy {
        path: PathBuf,
        #[source]
        source: Box<banger_disk::clone::CloneError>,
    },
    #[error("Failed to grow {path}")]
    Grow {
        path: PathBuf,
        #[source]
        source: Box<Ext4Error>,
    },
    #[error("Failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{task} task failed")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(transparent)]
    Store(#[from] StoreFailure),
}

impl From<StoreError> for WorkDiskError {
    fn from(error: StoreError) -> Self {
        Self::Store(error.into())
    }
}

impl RpcFailure for WorkDiskError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::InvalidName(_)
            | Self::InvalidSize { .. }
            | Self::SizeOutOfRange { .. }
            | Self::OverMaximum { .. }
            | Self::OverFreeSpace { .. }
            | Self::Shrink { .. } => ErrorKind::InvalidParams,
            Self::Exists { .. } => ErrorKind::AlreadyExists,
            Self::AttachedElsewhere { .. }
            | Self::StillAttached { .. }
            | Self::AttachedMeanwhile { .. }
            | Self::InUse { .. } => ErrorKind::InvalidState,
            Self::Store(error) => error.kind(),
            Self::CreateDirectory { .. }
            | Self::Make(_)
            | Self::Copy { .. }
            | Self::Grow { .. }
            | Self::Remove { .. }
            | Self::Task { .. } => ErrorKind::Failed,
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::NotFound { .. } => "`banger disk list` shows the work disks".to_owned(),
            Self::Exists { name } => format!(
                "attach it with `--work-disk {name}`, or remove it with `banger disk rm {name}`"
            ),
            Self::AttachedElsewhere { .. } => {
                "a work disk is attached to one VM at a time".to_owned()
            }
            Self::StillAttached { vm, .. } => format!(
                "delete the VM with `banger vm delete {vm} --keep-work-disk` to detach it first"
            ),
            Self::InUse { vm, .. } => format!("stop it first with `banger vm stop {vm}`"),
            Self::InvalidName(_) => {
                "names are DNS labels: lowercase letters, digits and `-`".to_owned()
            }
            Self::OverMaximum { .. } => {
                "pass a smaller size, or raise `[vm] max_disk_size` in the daemon's config"
                    .to_owned()
            }
            Self::OverFreeSpace { dir, .. } => {
                format!("pass a smaller size, or free space in {}", dir.display())
            }
            Self::AttachedMeanwhile { .. } => {
                "`banger disk list` shows which VM has it now".to_owned()
            }
            Self::Shrink { .. } => {
                "pass a size larger than the disk's; `banger disk list` shows it".to_owned()
            }
            Self::InvalidSize { .. } | Self::SizeOutOfRange { .. } => {
                "a size is a number with K, M, G or T: `10G`, `512M` (64M to 16T)".to_owned()
            }
            Self::Store(error) => return error.hint(),
            _ => return None,
        })
    }
}

/// What [`WorkDisks::prepare`] did, for the undo.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub disk: WorkDisk,
    pub created: bool,
}

fn size_of(text: &str) -> Result<u64, WorkDiskError> {
    let bytes = parse_size(text).map_err(|reason| WorkDiskError::InvalidSize { reason })?;
    if !(MIN_WORK_DISK_BYTES..=MAX_WORK_DISK_BYTES).contains(&bytes) {
        return Err(WorkDiskError::SizeOutOfRange {
            size: text.to_owned(),
        });
    }
    Ok(bytes)
}

/// Whether `text` asks for a new disk (a size) rather than naming one.
fn is_size(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_digit())
}

impl WorkDisks {
    pub fn new(store: Store, dir: PathBuf) -> Self {
        Self {
            store,
            dir,
            max_bytes: None,
            busy: std::sync::Mutex::default(),
        }
    }

    async fn hold(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = Arc::clone(
            self.busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(id.to_owned())
                .or_default(),
        );
        lock.lock_owned().await
    }

    pub fn list(&self) -> Result<Vec<WorkDisk>, WorkDiskError> {
        Ok(self.store.list_work_disks()?)
    }

    pub fn find(&self, name: &str) -> Result<WorkDisk, WorkDiskError> {
        self.store
            .find_work_disk(name)?
            .ok_or_else(|| WorkDiskError::NotFound {
                name: name.to_owned(),
            })
    }

    /// Makes a new detached disk.
    pub async fn create(&self, name: &str, size: &str) -> Result<WorkDisk, WorkDiskError> {
        validate_vm_name(name).map_err(WorkDiskError::InvalidName)?;
        let bytes = size_of(size)?;
        self.make(name, bytes, None).await
    }

    /// Caps every work disk at `max_bytes` (`[vm] max_disk_size`).
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: Option<u64>) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    async fn make(
        &self,
        name: &str,
        bytes: u64,
        vm_id: Option<&str>,
    ) -> Result<WorkDisk, WorkDiskError> {
        if self.store.find_work_disk(name)?.is_some() {
            return Err(WorkDiskError::Exists {
                name: name.to_owned(),
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| WorkDiskError::CreateDirectory {
            path: self.dir.clone(),
            source,
        })?;
        check_disk_size(&self.dir, 0, bytes, self.max_bytes)?;
        let id = new_id();
        let path = self.dir.join(format!("{id}.ext4"));
        let disk = WorkDisk {
            id,
            name: name.to_owned(),
            path: path.display().to_string(),
            size_bytes: bytes,
            vm_id: vm_id.map(str::to_owned),
            vm: None,
            created_at: now(),
        };
        let file = path.clone();
        tokio::task::spawn_blocking(move || {
            banger_disk::ext4::create_empty(&file, bytes, WORK_DISK_LABEL)
        })
        .await
        .map_err(|source| WorkDiskError::Task {
            task: "Work disk",
            source,
        })?
        .map_err(|error| WorkDiskError::Make(Box::new(error)))?;
        if let Err(error) = self.store.insert_work_disk(&disk) {
            let _ = std::fs::remove_file(&path);
            return Err(error.into());
        }
        Ok(disk)
    }

    /// Deletes a detached disk and its file.
    pub fn remove(&self, name: &str) -> Result<WorkDisk, WorkDiskError> {
        let disk = self.find(name)?;
        if let Some(vm) = &disk.vm {
            return Err(WorkDiskError::StillAttached {
                disk: name.to_owned(),
                vm: vm.clone(),
            });
        }
        // The row goes first, and only while still detached: a create that
        // attached it meanwhile wins. A file left by a failed unlink has no
        // row and goes at the next reconciliation.
        if !self.store.delete_detached_work_disk(&disk.id)? {
            return Err(WorkDiskError::AttachedMeanwhile {
                disk: name.to_owned(),
            });
        }
        remove_file_if_present(Path::new(&disk.path))?;
        Ok(disk)
    }

    fn delete(&self, disk: &WorkDisk) -> Result<(), WorkDiskError> {
        remove_file_if_present(Path::new(&disk.path))?;
        self.store.delete_work_disk(&disk.id)?;
        Ok(())
    }

    /// Grows a disk that no running VM uses (the file only: the guest agent
    /// grows the file system at the next boot); never shrinks.
    /// The caller holds the lock of the VM the disk is attached to, if any
    /// (so the VM cannot start meanwhile).
    pub async fn resize(&self, name: &str, size: &str) -> Result<WorkDisk, WorkDiskError> {
        let disk = self.find(name)?;
        let _busy = self.hold(&disk.id).await;
        let mut disk = self.find(name)?;
        let bytes = size_of(size)?;
        if let Some(vm_id) = &disk.vm_id {
            if let Some(vm) = self.store.get_vm(vm_id)? {
                if vm.state.has_process() || vm.state == VmState::Creating {
                    return Err(WorkDiskError::InUse {
                        disk: name.to_owned(),
                        vm: vm.name,
                        state: vm.state,
                    });
                }
            }
        }
        if bytes < disk.size_bytes {
            return Err(WorkDiskError::Shrink {
                disk: name.to_owned(),
                size_bytes: disk.size_bytes,
            });
        }
        check_disk_size(&self.dir, disk.size_bytes, bytes, self.max_bytes)?;
        crate::fault::pause_at(|| "disk resize:grow".to_owned());
        grow(Path::new(&disk.path), bytes).await?;
        crate::fault::pause_at(|| "disk resize:record".to_owned());
        self.store.set_work_disk_size(&disk.id, bytes)?;
        disk.size_bytes = bytes;
        Ok(disk)
    }

    /// The create hook: `spec` is a size (a new disk named `VM-work`) or the
    /// name of a detached disk to attach.
    pub async fn prepare(&self, vm: &Vm, spec: &str) -> Result<Prepared, WorkDiskError> {
        if is_size(spec) {
            let bytes = size_of(spec)?;
            let disk = self
                .make(&format!("{}-work", vm.name), bytes, Some(&vm.id))
                .await?;
            return Ok(Prepared {
                disk,
                created: true,
            });
        }
        let disk = self.find(spec)?;
        let _busy = self.hold(&disk.id).await;
        if !self.store.set_work_disk_vm(&disk.id, Some(&vm.id))? {
            return Err(WorkDiskError::AttachedElsewhere {
                disk: spec.to_owned(),
                vm: disk.vm.unwrap_or_default(),
            });
        }
        Ok(Prepared {
            disk,
            created: false,
        })
    }

    /// The create hook of a restore from a snapshot that holds a work disk:
    /// a new disk `VM-work`, made by this create, whose file is a copy of
    /// `from` (a reflink where the file system has them, else a sparse
    /// copy).
    pub async fn copy_from(&self, vm: &Vm, from: &Path) -> Result<Prepared, WorkDiskError> {
        let name = format!("{}-work", vm.name);
        if self.store.find_work_disk(&name)?.is_some() {
            return Err(WorkDiskError::Exists { name });
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| WorkDiskError::CreateDirectory {
            path: self.dir.clone(),
            source,
        })?;
        let copy_error = |source| WorkDiskError::Copy {
            path: from.to_owned(),
            source: Box::new(source),
        };
        let metadata = std::fs::metadata(from).map_err(|source| {
            copy_error(banger_disk::clone::CloneError::Open {
                path: from.to_owned(),
                source,
            })
        })?;
        // A sparse copy needs the allocated bytes; a reflink needs none.
        let allocated = crate::files::allocated_bytes(&metadata);
        check_disk_size(&self.dir, 0, allocated, None)?;
        let id = new_id();
        let path = self.dir.join(format!("{id}.ext4"));
        let disk = WorkDisk {
            id,
            name,
            path: path.display().to_string(),
            size_bytes: metadata.len(),
            vm_id: Some(vm.id.clone()),
            vm: None,
            created_at: now(),
        };
        let (source, destination) = (from.to_owned(), path.clone());
        let copied = tokio::task::spawn_blocking(move || {
            if banger_disk::clone::reflink_file(&source, &destination).is_err() {
                let _ = std::fs::remove_file(&destination);
                banger_disk::clone::sparse_copy(&source, &destination, &|| false)?;
            }
            Ok(())
        })
        .await
        .map_err(|source| WorkDiskError::Task {
            task: "Work disk copy",
            source,
        })?
        .map_err(copy_error);
        if let Err(error) = copied.and_then(|()| Ok(self.store.insert_work_disk(&disk)?)) {
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        Ok(Prepared {
            disk,
            created: true,
        })
    }

    /// Validates a restore's work disk (`VM-work` must be free) before
    /// anything is made.
    pub fn check_copy(&self, vm_name: &str) -> Result<(), WorkDiskError> {
        let name = format!("{vm_name}-work");
        if self.store.find_work_disk(&name)?.is_some() {
            return Err(WorkDiskError::Exists { name });
        }
        Ok(())
    }

    /// Validates a create's `--work-disk` before anything is made.
    pub fn check(&self, vm_name: &str, spec: &str) -> Result<(), WorkDiskError> {
        if is_size(spec) {
            size_of(spec)?;
            let name = format!("{vm_name}-work");
            if self.store.find_work_disk(&name)?.is_some() {
                return Err(WorkDiskError::Exists { name });
            }
            return Ok(());
        }
        let disk = self.find(spec)?;
        if let Some(vm) = disk.vm {
            return Err(WorkDiskError::AttachedElsewhere {
                disk: spec.to_owned(),
                vm,
            });
        }
        Ok(())
    }

    /// The VM's work disk as a launch drive, if it has one.
    pub fn drive(&self, vm_id: &str) -> Result<Option<DriveSpec>, WorkDiskError> {
        Ok(self.store.work_disk_of_vm(vm_id)?.map(|disk| DriveSpec {
            id: WORK_DRIVE_ID.to_owned(),
            path: PathBuf::from(disk.path),
            is_root: false,
            read_only: false,
        }))
    }

    /// The delete hook (and the create undo): delete the VM's disk, or keep
    /// it detached.
    pub fn release(&self, vm_id: &str, keep: bool) -> Result<Option<WorkDisk>, WorkDiskError> {
        let Some(disk) = self.store.work_disk_of_vm(vm_id)? else {
            return Ok(None);
        };
        if keep {
            self.store.set_work_disk_vm(&disk.id, None)?;
        } else {
            self.delete(&disk)?;
        }
        Ok(Some(disk))
    }

    /// Reconciliation of a create the daemon died in: a disk that create made
    /// is deleted, one it attached is kept, detached.
    pub fn release_interrupted(&self, vm: &Vm) -> Result<(), WorkDiskError> {
        let Some(disk) = self.store.work_disk_of_vm(&vm.id)? else {
            return Ok(());
        };
        let made = self.store.work_disk_made_by_create(&disk.id)?;
        self.release(&vm.id, !made).map(drop)
    }

    /// Deletes disk files in the directory that no row accounts for (a
    /// create interrupted between mkfs and the insert); returns them.
    /// Also records the size of a disk file grown by a resize the daemon
    /// did not live to record (the file only ever grows, so it is right).
    pub fn remove_orphans(&self) -> Result<Vec<PathBuf>, WorkDiskError> {
        let disks = self.store.list_work_disks()?;
        for disk in &disks {
            let Ok(metadata) = std::fs::metadata(&disk.path) else {
                continue;
            };
            if metadata.len() > disk.size_bytes {
                tracing::warn!(disk = %disk.name, recorded = disk.size_bytes, actual = metadata.len(), "recording the size of an interrupted resize");
                self.store.set_work_disk_size(&disk.id, metadata.len())?;
            }
        }
        let known: std::collections::HashSet<String> =
            disks.into_iter().map(|disk| disk.path).collect();
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(removed);
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !known.contains(&path.display().to_string()) && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

fn remove_file_if_present(path: &Path) -> Result<(), WorkDiskError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(WorkDiskError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Refuses a disk of `requested` bytes (now `current`) that is over `max`
/// or would need more than the free space of the file system holding `dir`
/// (disk files are sparse, but a guest can fill them).
pub fn check_disk_size(
    dir: &Path,
    current: u64,
    requested: u64,
    max: Option<u64>,
) -> Result<(), WorkDiskError> {
    if let Some(max) = max {
        if requested > max {
            return Err(WorkDiskError::OverMaximum {
                size: human_size(requested),
                max: human_size(max),
            });
        }
    }
    let needed = requested.saturating_sub(current);
    if needed == 0 {
        return Ok(());
    }
    // The directory may not exist yet: its nearest existing ancestor is on
    // the same file system.
    let existing = dir
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    let free = nix::sys::statvfs::statvfs(existing)
        .map(|stat| stat.blocks_available().saturating_mul(stat.fragment_size()))
        .map_err(|errno| WorkDiskError::CreateDirectory {
            path: existing.to_owned(),
            source: errno.into(),
        })?;
    if needed > free {
        return Err(WorkDiskError::OverFreeSpace {
            size: human_size(requested),
            needed: human_size(needed),
            free: human_size(free),
            dir: existing.to_owned(),
        });
    }
    Ok(())
}

/// `1536` → `1.5K`, in binary units.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut unit = 0;
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}")
    } else if value.fract() == 0.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// Grows an ext4 disk file (not in use) to `bytes`.
pub async fn grow(path: &Path, bytes: u64) -> Result<(), WorkDiskError> {
    let file = path.to_owned();
    tokio::task::spawn_blocking(move || banger_disk::ext4::grow(&file, bytes))
        .await
        .map_err(|source| WorkDiskError::Task {
            task: "Resize",
            source,
        })?
        .map_err(|source| WorkDiskError::Grow {
            path: path.to_owned(),
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_before_anything_is_made() {
        let error = size_of("lots").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidParams);
        assert_eq!(error.to_string(), "`lots` is not a size (e.g. 10G, 512M)");
        let error = size_of("1M").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidParams);
        assert_eq!(
            error.to_string(),
            "Work disk size `1M` is out of range (64M to 16T)"
        );
        assert_eq!(size_of("1G").unwrap(), 1 << 30);
    }

    #[test]
    fn disk_sizes_are_bounded_by_the_cap_and_the_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let error = check_disk_size(dir.path(), 0, 3 << 30, Some(2 << 30)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Disk size 3G is more than the configured maximum 2G (`[vm] max_disk_size`)"
        );
        assert_eq!(error.kind(), ErrorKind::InvalidParams);
        let free = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let free = free.blocks_available() * free.fragment_size();
        let missing = dir.path().join("not").join("yet");
        let error = check_disk_size(&missing, 0, free + (1 << 30), None).unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("No space for a disk of "), "{text}");
        assert!(text.ends_with(" free"), "{text}");
        assert!(
            text.contains(&format!("more in {}, which has", dir.path().display())),
            "{text}"
        );
        // Growing by what is free is fine; the same size needs nothing.
        check_disk_size(dir.path(), 1 << 40, (1 << 40) + (1 << 20), None).unwrap();
        check_disk_size(dir.path(), 1 << 50, 1 << 50, None).unwrap();
        assert_eq!(human_size(1536), "1.5K");
        assert_eq!(human_size(64 << 20), "64M");
    }

    #[test]
    fn an_attached_disk_says_what_helps_where_it_was_asked_for() {
        let attach = WorkDiskError::AttachedElsewhere {
            disk: "data".to_owned(),
            vm: "alpha".to_owned(),
        };
        let remove = WorkDiskError::StillAttached {
            disk: "data".to_owned(),
            vm: "alpha".to_owned(),
        };
        assert_eq!(attach.to_string(), remove.to_string());
        assert_eq!(attach.kind(), ErrorKind::InvalidState);
        assert_eq!(
            attach.hint().as_deref(),
            Some("a work disk is attached to one VM at a time")
        );
        assert_eq!(
            remove.hint().as_deref(),
            Some("delete the VM with `banger vm delete alpha --keep-work-disk` to detach it first")
        );
    }
}
