//! Per-VM root disks as copy-on-write clones of an image.
//!
//! A [`CloneStrategy`] turns an image file into a VM's root disk and removes
//! it again. The clone's location follows from the VM id and VM directory
//! alone, so a restarted daemon can remove or re-attach a clone from what the
//! store records:
//!
//! | strategy | root disk the VMM opens | files in the VM dir |
//! |---|---|---|
//! | `reflink` | `VM_DIR/rootfs.ext4` (extents shared with the image) | `rootfs.ext4` |
//! | `dm-snapshot` | `/dev/mapper/banger-<vm id>` | `rootfs.cow` |
//! | `copy` | `VM_DIR/rootfs.ext4` (sparse copy) | `rootfs.ext4` |
//!
//! [`select_strategy`] resolves the configured strategy (`auto` probes the
//! host: reflink, then dm-snapshot, then copy) and says why it chose.
//! [`devices`] scans the host for banger's loop and dm devices so
//! reconciliation can release leaked ones.

mod copy;
pub mod devices;
mod dm_snapshot;
mod reflink;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub use copy::{sparse_copy, Copy};
pub use dm_snapshot::{dm_name, DmSnapshot};
pub use reflink::{probe_reflink, reflink_file, Reflink};

use crate::command::{CommandError, CommandRunner, HostCommands};

/// File name of a file-backed root disk inside the VM directory.
pub const ROOT_DISK_FILE: &str = "rootfs.ext4";
/// File name of the dm-snapshot exception store inside the VM directory.
pub const COW_FILE: &str = "rootfs.cow";

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("Unknown clone strategy `{0}` (expected auto, reflink, dm-snapshot or copy)")]
    UnknownStrategy(String),
    #[error("Clone strategy `{strategy}` is not usable here: {reason}")]
    Unavailable {
        strategy: StrategyKind,
        reason: String,
    },
    #[error("Failed to open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to reflink {source_path} to {destination}")]
    Reflink {
        source_path: PathBuf,
        destination: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Image {path} is {length} bytes, not a whole number of 512-byte sectors")]
    UnalignedImage { path: PathBuf, length: u64 },
    #[error("Failed to set up the device-mapper snapshot for VM {vm_id}")]
    CreateSnapshot {
        vm_id: String,
        #[source]
        source: CommandError,
    },
    #[error("Failed to tear down the device-mapper snapshot for VM {vm_id}")]
    RemoveSnapshot {
        vm_id: String,
        #[source]
        source: CommandError,
    },
    #[error("Failed to detach loop device {device}")]
    DetachLoop {
        device: String,
        #[source]
        source: CommandError,
    },
    #[error("Failed to remove device-mapper device {name}")]
    RemoveDm {
        name: String,
        #[source]
        source: CommandError,
    },
    #[error("Failed to scan {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Clone to {path} was cancelled")]
    Cancelled { path: PathBuf },
}

/// The three ways to make a root disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    Reflink,
    DmSnapshot,
    Copy,
}

impl StrategyKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::DmSnapshot => "dm-snapshot",
            Self::Copy => "copy",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The `[disk] clone_strategy` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyConfig {
    Auto,
    Fixed(StrategyKind),
}

impl FromStr for StrategyConfig {
    type Err = CloneError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "auto" => Ok(Self::Auto),
            "reflink" => Ok(Self::Fixed(StrategyKind::Reflink)),
            "dm-snapshot" => Ok(Self::Fixed(StrategyKind::DmSnapshot)),
            "copy" => Ok(Self::Fixed(StrategyKind::Copy)),
            other => Err(CloneError::UnknownStrategy(other.to_owned())),
        }
    }
}

/// What to clone and where.
pub struct CloneRequest<'a> {
    /// The VM id; names the dm device (`banger-<id>`).
    pub vm_id: &'a str,
    /// The image file (ext4), never modified.
    pub image: &'a Path,
    /// The VM's directory, which must exist; clone files go here.
    pub vm_dir: &'a Path,
    /// Polled during long copies; returning true aborts with [`CloneError::Cancelled`].
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

/// A VM's root disk as made by a strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    pub strategy: StrategyKind,
    /// What the VMM opens as its root drive.
    pub path: PathBuf,
    /// Whether `path` is a regular file (which `ext4::grow` can enlarge).
    /// A dm-snapshot disk is a block device as large as the image.
    pub file_backed: bool,
}

/// Makes and removes per-VM root disks.
pub trait CloneStrategy: Send + Sync + fmt::Debug {
    fn kind(&self) -> StrategyKind;

    /// One line for `doctor` and `daemon status`.
    fn describe(&self) -> String;

    /// Clones `request.image` into a new root disk for `request.vm_id`. On
    /// error nothing it made is left behind.
    ///
    /// # Errors
    /// [`CloneError`] naming the step that failed.
    fn clone_image(&self, request: &CloneRequest<'_>) -> Result<RootDisk, CloneError>;

    /// [`Self::clone_image`], calling `progress(bytes copied, bytes to
    /// copy)` as a copying strategy moves data. Strategies that copy nothing
    /// (reflink, dm-snapshot) never call it.
    ///
    /// # Errors
    /// As [`Self::clone_image`].
    fn clone_image_reporting(
        &self,
        request: &CloneRequest<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RootDisk, CloneError> {
        let _ = progress;
        self.clone_image(request)
    }

    /// [`Self::clone_image_reporting`], but a copy's data may still be on
    /// its way to the disk: `true` with the disk when the caller must make
    /// it durable ([`sync_root_disk`]) before relying on it, so that the
    /// flush can run alongside other work.
    ///
    /// # Errors
    /// As [`Self::clone_image`].
    fn clone_image_unsynced(
        &self,
        request: &CloneRequest<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(RootDisk, bool), CloneError> {
        self.clone_image_reporting(request, progress)
            .map(|disk| (disk, false))
    }

    /// Makes an existing clone usable again, e.g. after a host reboot removed
    /// a dm device but kept its exception store. File-backed clones only
    /// check that the file exists.
    ///
    /// # Errors
    /// [`CloneError`] when the clone is missing or cannot be re-attached.
    fn attach(&self, vm_id: &str, image: &Path, vm_dir: &Path) -> Result<RootDisk, CloneError>;

    /// Removes a VM's clone (devices, then files). Idempotent: missing parts
    /// are not errors, so it is also the undo of a half-made clone.
    ///
    /// # Errors
    /// [`CloneError`] when a device or file exists but cannot be removed.
    fn remove(&self, vm_id: &str, vm_dir: &Path) -> Result<(), CloneError>;
}

/// Flushes a root disk file's data to the disk (`fsync`), for a clone made
/// by [`CloneStrategy::clone_image_unsynced`].
///
/// # Errors
/// [`CloneError::Write`] when the file cannot be opened or flushed.
pub fn sync_root_disk(disk: &RootDisk) -> Result<(), CloneError> {
    std::fs::File::open(&disk.path)
        .and_then(|file| file.sync_all())
        .map_err(|source| CloneError::Write {
            path: disk.path.clone(),
            source,
        })
}

/// Picks the clone strategy for `config` (`auto`, `reflink`, `dm-snapshot`,
/// `copy`). `auto` tries a reflink of a probe file in `state_dir`, then
/// whether `/dev/mapper/control` answers, then falls back to copy. A named
/// strategy that cannot work here is an error, not a silent fallback.
/// Returns the strategy and a sentence saying why it was chosen.
///
/// # Errors
/// [`CloneError::UnknownStrategy`] or [`CloneError::Unavailable`].
pub fn select_strategy(
    config: &str,
    state_dir: &Path,
) -> Result<(Box<dyn CloneStrategy>, String), CloneError> {
    let runner: Arc<dyn CommandRunner> = Arc::new(HostCommands);
    select_strategy_with(
        config.parse()?,
        state_dir,
        runner,
        Path::new(dm_snapshot::DM_CONTROL),
    )
}

/// [`select_strategy`] with the command runner and the device-mapper control
/// node given explicitly (tests pass fakes).
///
/// # Errors
/// [`CloneError::Unavailable`] when a named strategy cannot work here.
pub fn select_strategy_with(
    config: StrategyConfig,
    state_dir: &Path,
    runner: Arc<dyn CommandRunner>,
    dm_control: &Path,
) -> Result<(Box<dyn CloneStrategy>, String), CloneError> {
    let reflink = || probe_reflink(state_dir);
    let dm = || dm_snapshot::probe(runner.as_ref(), dm_control);
    match config {
        StrategyConfig::Fixed(StrategyKind::Copy) => Ok((
            Box::new(Copy),
            "copy: configured (sparse copy, cost grows with the image's data)".to_owned(),
        )),
        StrategyConfig::Fixed(StrategyKind::Reflink) => match reflink() {
            Ok(()) => Ok((
                Box::new(Reflink),
                format!(
                    "reflink: configured, FICLONE works in {}",
                    state_dir.display()
                ),
            )),
            Err(reason) => Err(CloneError::Unavailable {
                strategy: StrategyKind::Reflink,
                reason,
            }),
        },
        StrategyConfig::Fixed(StrategyKind::DmSnapshot) => match dm() {
            Ok(()) => Ok((
                Box::new(DmSnapshot::new(runner.clone())),
                "dm-snapshot: configured, device-mapper answers".to_owned(),
            )),
            Err(reason) => Err(CloneError::Unavailable {
                strategy: StrategyKind::DmSnapshot,
                reason,
            }),
        },
        StrategyConfig::Auto => {
            let reflink_reason = match reflink() {
                Ok(()) => {
                    return Ok((
                        Box::new(Reflink),
                        format!("reflink: auto, FICLONE works in {}", state_dir.display()),
                    ))
                }
                Err(reason) => reason,
            };
            let dm_reason = match dm() {
                Ok(()) => {
                    return Ok((
                        Box::new(DmSnapshot::new(runner.clone())),
                        format!("dm-snapshot: auto, reflink unavailable ({reflink_reason}); device-mapper answers"),
                    ))
                }
                Err(reason) => reason,
            };
            Ok((
                Box::new(Copy),
                format!(
                    "copy: auto, reflink unavailable ({reflink_reason}); dm-snapshot unavailable ({dm_reason})"
                ),
            ))
        }
    }
}

/// Removes a file; a missing file is fine.
pub(crate) fn remove_file_if_present(path: &Path) -> Result<(), CloneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CloneError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_refuses_unknown_names() {
        assert_eq!(
            "auto".parse::<StrategyConfig>().unwrap(),
            StrategyConfig::Auto
        );
        assert_eq!(
            "dm-snapshot".parse::<StrategyConfig>().unwrap(),
            StrategyConfig::Fixed(StrategyKind::DmSnapshot)
        );
        let error = "zfs".parse::<StrategyConfig>().unwrap_err();
        assert!(error.to_string().contains("`zfs`"), "{error}");
    }

    #[test]
    fn auto_falls_back_and_says_why() {
        let state = tempfile::tempdir().unwrap();
        let (strategy, reason) = select_strategy_with(
            StrategyConfig::Auto,
            state.path(),
            Arc::new(HostCommands),
            &state.path().join("no-such-control"),
        )
        .unwrap();
        // The test temp dir may be on a reflink-capable file system.
        match strategy.kind() {
            StrategyKind::Reflink => assert!(reason.starts_with("reflink: auto"), "{reason}"),
            StrategyKind::Copy => {
                assert!(reason.contains("reflink unavailable"), "{reason}");
                assert!(reason.contains("dm-snapshot unavailable"), "{reason}");
            }
            StrategyKind::DmSnapshot => panic!("no dm control node, yet {reason}"),
        }
        let error = select_strategy_with(
            StrategyConfig::Fixed(StrategyKind::DmSnapshot),
            state.path(),
            Arc::new(HostCommands),
            &state.path().join("no-such-control"),
        )
        .unwrap_err();
        assert!(matches!(error, CloneError::Unavailable { .. }), "{error}");
        assert_eq!(
            std::fs::read_dir(state.path()).unwrap().count(),
            0,
            "probe left files"
        );
    }
}
