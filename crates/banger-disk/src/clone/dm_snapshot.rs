//! `dm-snapshot`: a device-mapper `snapshot` target over a read-only loop
//! device on the image (the origin) and a loop device on a sparse exception
//! store in the VM dir. Cloning is O(1); the guest's writes land in the
//! store.
//!
//! Clone, each step undone in reverse if a later one fails:
//! 1. `losetup --find --show --read-only IMAGE` → origin loop.
//! 2. Create `VM_DIR/rootfs.cow` sparse, as large as the image plus the
//!    store's metadata, so the snapshot can never overflow.
//! 3. `losetup --find --show VM_DIR/rootfs.cow` → store loop.
//! 4. `dmsetup create banger-<vm id> --table "0 SECTORS snapshot ORIGIN STORE P 8"`
//!    (persistent store, 4 KiB chunks) → `/dev/mapper/banger-<vm id>`.
//!
//! Removal: read the dm device's slaves from sysfs, `dmsetup remove --retry`,
//! detach those loops and any unheld loop still on the store, remove the
//! store file. Because the store is persistent, [`CloneStrategy::attach`]
//! re-creates the device after a host reboot with the guest's data intact.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::devices::{detach_loop, find_dm_device, scan};
use super::{
    remove_file_if_present, CloneError, CloneRequest, CloneStrategy, RootDisk, StrategyKind,
    COW_FILE,
};
use crate::command::{arguments, tool_exists, CommandRunner};

pub(crate) const DM_CONTROL: &str = "/dev/mapper/control";
pub(crate) const DM_PREFIX: &str = "banger-";
/// Snapshot chunk size in 512-byte sectors.
const CHUNK_SECTORS: u64 = 8;

/// The dm device name of a VM's root disk.
#[must_use]
pub fn dm_name(vm_id: &str) -> String {
    format!("{DM_PREFIX}{vm_id}")
}

#[derive(Debug, Clone)]
pub struct DmSnapshot {
    runner: Arc<dyn CommandRunner>,
    sysfs: PathBuf,
    dev_mapper: PathBuf,
}

impl DmSnapshot {
    #[must_use]
    pub fn new(runner: Arc<dyn CommandRunner>) -> Self {
        Self::with_paths(runner, PathBuf::from("/sys"), PathBuf::from("/dev/mapper"))
    }

    /// With sysfs and `/dev/mapper` elsewhere (tests point them at a temp dir).
    #[must_use]
    pub fn with_paths(runner: Arc<dyn CommandRunner>, sysfs: PathBuf, dev_mapper: PathBuf) -> Self {
        Self {
            runner,
            sysfs,
            dev_mapper,
        }
    }

    fn disk(&self, vm_id: &str) -> RootDisk {
        RootDisk {
            strategy: StrategyKind::DmSnapshot,
            path: self.dev_mapper.join(dm_name(vm_id)),
            file_backed: false,
        }
    }

    fn snapshot_exists(&self, vm_id: &str) -> Option<super::devices::DmDevice> {
        find_dm_device(&self.sysfs, &dm_name(vm_id))
    }

    /// Steps 1, 3 and 4 of the module protocol for an existing store file.
    fn activate(&self, vm_id: &str, image: &Path, cow: &Path) -> Result<(), CloneError> {
        let length = image_length(image)?;
        let failed = |source| CloneError::CreateSnapshot {
            vm_id: vm_id.to_owned(),
            source,
        };
        let origin = self
            .runner
            .run(
                "losetup",
                &arguments([
                    OsString::from("--find"),
                    "--show".into(),
                    "--read-only".into(),
                    image.into(),
                ]),
            )
            .map_err(failed)?;
        let origin = PathBuf::from(origin.trim());
        let store = match self.runner.run(
            "losetup",
            &arguments([OsString::from("--find"), "--show".into(), cow.into()]),
        ) {
            Ok(store) => PathBuf::from(store.trim()),
            Err(source) => {
                let _ = detach_loop(self.runner.as_ref(), &origin);
                return Err(failed(source));
            }
        };
        let table = format!(
            "0 {} snapshot {} {} P {CHUNK_SECTORS}",
            length / 512,
            origin.display(),
            store.display()
        );
        if let Err(source) = self.runner.run(
            "dmsetup",
            &arguments(["create", dm_name(vm_id).as_str(), "--table", table.as_str()]),
        ) {
            let _ = detach_loop(self.runner.as_ref(), &store);
            let _ = detach_loop(self.runner.as_ref(), &origin);
            return Err(failed(source));
        }
        Ok(())
    }
}

fn image_length(image: &Path) -> Result<u64, CloneError> {
    let length = std::fs::metadata(image)
        .map_err(|source| CloneError::Open {
            path: image.to_owned(),
            source,
        })?
        .len();
    if length % 512 != 0 || length == 0 {
        return Err(CloneError::UnalignedImage {
            path: image.to_owned(),
            length,
        });
    }
    Ok(length)
}

/// The exception store's size: every chunk may be copied once, plus one
/// metadata chunk per 256 data chunks (16-byte entries in 4 KiB chunks) and
/// the header.
fn store_size(image_length: u64) -> u64 {
    image_length + image_length / 128 + (1 << 20)
}

/// Whether device-mapper can be used: the control node opens read-write and
/// `dmsetup version` reaches the driver. The error is a reason.
pub(crate) fn probe(runner: &dyn CommandRunner, control: &Path) -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(control)
        .map_err(|error| format!("cannot open {}: {error}", control.display()))?;
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control is missing (no loop device support)".to_owned());
    }
    for tool in ["dmsetup", "losetup"] {
        if !tool_exists(tool) {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    runner
        .run("dmsetup", &arguments(["version"]))
        .map_err(|error| format!("{error}"))?;
    Ok(())
}

impl CloneStrategy for DmSnapshot {
    fn kind(&self) -> StrategyKind {
        StrategyKind::DmSnapshot
    }

    fn describe(&self) -> String {
        "dm-snapshot (device-mapper snapshot over loop devices: O(1) clone, writes go to a sparse exception store)".to_owned()
    }

    fn clone_image(&self, request: &CloneRequest<'_>) -> Result<RootDisk, CloneError> {
        let length = image_length(request.image)?;
        let cow = request.vm_dir.join(COW_FILE);
        let file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&cow)
            .map_err(|source| CloneError::Open {
                path: cow.clone(),
                source,
            })?;
        // A zeroed header makes dm initialise a new persistent store.
        if let Err(source) = file.set_len(store_size(length)) {
            let _ = std::fs::remove_file(&cow);
            return Err(CloneError::Write { path: cow, source });
        }
        drop(file);
        if let Err(error) = self.activate(request.vm_id, request.image, &cow) {
            let _ = std::fs::remove_file(&cow);
            return Err(error);
        }
        Ok(self.disk(request.vm_id))
    }

    fn attach(&self, vm_id: &str, image: &Path, vm_dir: &Path) -> Result<RootDisk, CloneError> {
        if self.snapshot_exists(vm_id).is_none() {
            let cow = vm_dir.join(COW_FILE);
            std::fs::metadata(&cow).map_err(|source| CloneError::Open {
                path: cow.clone(),
                source,
            })?;
            self.activate(vm_id, image, &cow)?;
        }
        Ok(self.disk(vm_id))
    }

    fn remove(&self, vm_id: &str, vm_dir: &Path) -> Result<(), CloneError> {
        let cow = vm_dir.join(COW_FILE);
        if let Some(device) = self.snapshot_exists(vm_id) {
            self.runner
                .run(
                    "dmsetup",
                    &arguments(["remove", "--retry", device.name.as_str()]),
                )
                .map_err(|source| CloneError::RemoveSnapshot {
                    vm_id: vm_id.to_owned(),
                    source,
                })?;
            for slave in device.slaves.iter().filter(|name| name.starts_with("loop")) {
                detach_loop(self.runner.as_ref(), &Path::new("/dev").join(slave))?;
            }
        }
        // A create interrupted between steps 3 and 4 leaves the store's loop.
        if let Ok(canonical_cow) = std::fs::canonicalize(&cow) {
            let state_dir = canonical_cow.parent().unwrap_or(Path::new("/"));
            for device in scan(&self.sysfs, state_dir)?.loop_devices {
                if device.backing_file == canonical_cow && !device.held {
                    detach_loop(self.runner.as_ref(), &device.device)?;
                }
            }
        }
        remove_file_if_present(&cow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::fake::RecordingRunner;

    fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let directory = tempfile::tempdir().unwrap();
        let image = directory.path().join("image.ext4");
        std::fs::write(&image, vec![0_u8; 1 << 20]).unwrap();
        let vm_dir = directory.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let sysfs = directory.path().join("sys");
        std::fs::create_dir_all(sysfs.join("block")).unwrap();
        (directory, image, vm_dir, sysfs)
    }

    #[test]
    fn clone_runs_the_protocol_and_remove_undoes_it() {
        let (directory, image, vm_dir, sysfs) = fixture();
        let runner = Arc::new(RecordingRunner::default());
        let strategy = DmSnapshot::with_paths(
            runner.clone(),
            sysfs.clone(),
            directory.path().join("mapper"),
        );
        let disk = strategy
            .clone_image(&CloneRequest {
                vm_id: "abc",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            })
            .unwrap();
        assert_eq!(disk.path, directory.path().join("mapper/banger-abc"));
        assert!(!disk.file_backed);
        let cow = vm_dir.join(COW_FILE);
        assert_eq!(std::fs::metadata(&cow).unwrap().len(), store_size(1 << 20));
        assert_eq!(
            *runner.calls.lock().unwrap(),
            vec![
                format!("losetup --find --show --read-only {}", image.display()),
                format!("losetup --find --show {}", cow.display()),
                "dmsetup create banger-abc --table 0 2048 snapshot /dev/loop7 /dev/loop8 P 8"
                    .to_owned(),
            ]
        );
        // What the kernel would show for that device.
        let dm = sysfs.join("block/dm-0");
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::write(dm.join("dm/name"), "banger-abc\n").unwrap();
        for slave in ["loop7", "loop8"] {
            std::fs::create_dir_all(dm.join("slaves").join(slave)).unwrap();
        }
        runner.calls.lock().unwrap().clear();
        strategy.remove("abc", &vm_dir).unwrap();
        assert_eq!(
            *runner.calls.lock().unwrap(),
            vec![
                "dmsetup remove --retry banger-abc".to_owned(),
                "losetup -d /dev/loop7".to_owned(),
                "losetup -d /dev/loop8".to_owned(),
            ]
        );
        assert!(!cow.exists());
    }

    #[test]
    fn failed_dmsetup_detaches_loops_and_removes_the_store() {
        let (directory, image, vm_dir, sysfs) = fixture();
        let runner = Arc::new(RecordingRunner {
            fail_on: Some("dmsetup create"),
            ..RecordingRunner::default()
        });
        let strategy =
            DmSnapshot::with_paths(runner.clone(), sysfs, directory.path().join("mapper"));
        let error = strategy
            .clone_image(&CloneRequest {
                vm_id: "abc",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            })
            .unwrap_err();
        assert!(
            matches!(error, CloneError::CreateSnapshot { .. }),
            "{error}"
        );
        let calls = runner.calls.lock().unwrap();
        assert_eq!(
            calls[3..],
            [
                "losetup -d /dev/loop8".to_owned(),
                "losetup -d /dev/loop7".to_owned()
            ]
        );
        assert_eq!(std::fs::read_dir(&vm_dir).unwrap().count(), 0);
    }

    #[test]
    fn unaligned_images_are_refused() {
        let (directory, image, vm_dir, sysfs) = fixture();
        std::fs::write(&image, b"odd").unwrap();
        let runner = Arc::new(RecordingRunner::default());
        let strategy =
            DmSnapshot::with_paths(runner.clone(), sysfs, directory.path().join("mapper"));
        let error = strategy
            .clone_image(&CloneRequest {
                vm_id: "abc",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            })
            .unwrap_err();
        assert!(
            matches!(error, CloneError::UnalignedImage { length: 3, .. }),
            "{error}"
        );
        assert!(runner.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn attach_recreates_a_missing_device_from_the_store_and_reuses_a_live_one() {
        let (directory, image, vm_dir, sysfs) = fixture();
        let runner = Arc::new(RecordingRunner::default());
        let strategy = DmSnapshot::with_paths(
            runner.clone(),
            sysfs.clone(),
            directory.path().join("mapper"),
        );
        let error = strategy.attach("abc", &image, &vm_dir).unwrap_err();
        assert!(matches!(error, CloneError::Open { .. }), "{error}");
        std::fs::write(vm_dir.join(COW_FILE), b"kept exceptions").unwrap();
        let disk = strategy.attach("abc", &image, &vm_dir).unwrap();
        assert_eq!(disk.path, directory.path().join("mapper/banger-abc"));
        assert_eq!(runner.calls.lock().unwrap().len(), 3);
        assert_eq!(
            std::fs::read(vm_dir.join(COW_FILE)).unwrap(),
            b"kept exceptions"
        );
        let dm = sysfs.join("block/dm-4/dm");
        std::fs::create_dir_all(&dm).unwrap();
        std::fs::write(dm.join("name"), "banger-abc\n").unwrap();
        strategy.attach("abc", &image, &vm_dir).unwrap();
        assert_eq!(runner.calls.lock().unwrap().len(), 3);
    }
}
