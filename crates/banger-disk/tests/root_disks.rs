//! Root-only: real clones on a real XFS (reflink) file system, a real
//! dm-snapshot where device-mapper works, and the loop-device scan used by
//! reconciliation. Each test says `SKIPPED <name>: <reason>` when it cannot run.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use banger_disk::clone::devices::{release_leaked, scan};
use banger_disk::clone::{
    select_strategy, select_strategy_with, CloneRequest, CloneStrategy, Copy, DmSnapshot,
    StrategyConfig, StrategyKind,
};
use banger_disk::command::HostCommands;
use common::{has_shared_extents, require_root_and_tools, run, XfsMount};

const MIB: u64 = 1 << 20;

/// A file of `size` bytes with `data` bytes of non-zero pattern at the start.
fn make_image(path: &Path, size: u64, data: u64) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|index| (index % 251 + 1) as u8).collect();
    let mut offset = 0;
    while offset < data {
        file.write_all_at(&chunk, offset).unwrap();
        offset += MIB;
    }
    file.sync_all().unwrap();
}

#[test]
fn reflink_clone_on_xfs_is_constant_size_and_copy_on_write() {
    let name = "reflink_clone_on_xfs_is_constant_size_and_copy_on_write";
    if !require_root_and_tools(
        name,
        &["mkfs.xfs", "losetup", "mount", "umount", "filefrag"],
    ) {
        return;
    }
    let loop_device;
    let mount_root;
    {
        let xfs = XfsMount::new(2 << 30);
        loop_device = xfs.loop_device.clone();
        mount_root = xfs.directory.path().to_owned();
        let state = xfs.mount_point.join("state");
        let vm_dir = state.join("vms/vm1");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let image = state.join("image.ext4");
        make_image(&image, 512 * MIB, 128 * MIB);
        let (strategy, reason) = select_strategy("auto", &state).unwrap();
        assert_eq!(strategy.kind(), StrategyKind::Reflink, "{reason}");
        assert!(reason.starts_with("reflink: auto"), "{reason}");
        let used_before = xfs.used();
        let disk = strategy
            .clone_image(&CloneRequest {
                vm_id: "vm1",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            })
            .unwrap();
        let used_after = xfs.used();
        assert!(
            used_after.saturating_sub(used_before) < 4 * MIB,
            "clone of 128 MiB of data used {} bytes",
            used_after.saturating_sub(used_before)
        );
        assert!(
            has_shared_extents(&disk.path),
            "no shared extents after FICLONE"
        );
        assert!(has_shared_extents(&image));
        // Copy-on-write: the clone changes, the image does not.
        let original = std::fs::read(&image).unwrap();
        let clone = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .unwrap();
        clone.write_all_at(b"written by the guest", 4096).unwrap();
        clone.sync_all().unwrap();
        drop(clone);
        assert_eq!(std::fs::read(&image).unwrap(), original);
        let cloned = std::fs::read(&disk.path).unwrap();
        assert_eq!(&cloned[4096..4116], b"written by the guest");
        assert_eq!(cloned[..4096], original[..4096]);
        assert_eq!(cloned[4116..], original[4116..]);
        drop((original, cloned));
        assert_eq!(strategy.attach("vm1", &image, &vm_dir).unwrap(), disk);
        strategy.remove("vm1", &vm_dir).unwrap();
        assert!(!disk.path.exists());
        // Explicitly configured reflink outside XFS is refused, not faked.
        let elsewhere = tempfile::tempdir().unwrap();
        if select_strategy("reflink", elsewhere.path()).is_err() {
            assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        }
    }
    assert!(!mount_root.exists(), "mount dir left behind");
    let kernel_name = loop_device.trim_start_matches("/dev/");
    assert!(
        !Path::new("/sys/block")
            .join(kernel_name)
            .join("loop")
            .exists(),
        "{loop_device} still attached"
    );
}

#[test]
fn copy_clone_keeps_holes_on_a_real_image() {
    let directory = tempfile::tempdir().unwrap();
    let image = directory.path().join("image.ext4");
    make_image(&image, 256 * MIB, 8 * MIB);
    let vm_dir = directory.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let disk = Copy
        .clone_image(&CloneRequest {
            vm_id: "vm",
            image: &image,
            vm_dir: &vm_dir,
            cancelled: &|| false,
        })
        .unwrap();
    let metadata = std::fs::metadata(&disk.path).unwrap();
    assert_eq!(metadata.len(), 256 * MIB);
    assert!(
        metadata.blocks() * 512 <= 9 * MIB,
        "{} bytes allocated",
        metadata.blocks() * 512
    );
    Copy.remove("vm", &vm_dir).unwrap();
    let root = directory.path().to_owned();
    drop(directory);
    assert!(!root.exists());
}

#[test]
fn leaked_loop_devices_under_the_state_dir_are_found_and_released() {
    let name = "leaked_loop_devices_under_the_state_dir_are_found_and_released";
    if !require_root_and_tools(name, &["losetup"]) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let backing = state.path().join("images/leak.ext4");
    std::fs::create_dir_all(backing.parent().unwrap()).unwrap();
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let device = run(
        "losetup",
        &["--find".as_ref(), "--show".as_ref(), backing.as_os_str()],
    );
    let device = device.trim().to_owned();
    let found = scan(Path::new("/sys"), state.path()).unwrap();
    let leaked: Vec<_> = found
        .loop_devices
        .iter()
        .map(|found| found.device.display().to_string())
        .collect();
    if leaked != [device.clone()] {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &device])
            .status();
        panic!("scan found {leaked:?}, expected [{device}]");
    }
    assert!(found.dm_devices.is_empty());
    let released =
        release_leaked(&HostCommands, Path::new("/sys"), state.path(), &|_| true).unwrap();
    assert_eq!(
        released.loop_devices,
        vec![std::path::PathBuf::from(&device)]
    );
    assert!(scan(Path::new("/sys"), state.path())
        .unwrap()
        .loop_devices
        .is_empty());
    let root = state.path().to_owned();
    drop(state);
    assert!(!root.exists());
}

#[test]
fn dm_snapshot_clone_is_copy_on_write() {
    let name = "dm_snapshot_clone_is_copy_on_write";
    if !require_root_and_tools(name, &["dmsetup", "losetup", "mkfs.ext4"]) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let selected = select_strategy_with(
        StrategyConfig::Fixed(StrategyKind::DmSnapshot),
        state.path(),
        Arc::new(HostCommands),
        Path::new("/dev/mapper/control"),
    );
    let strategy = match selected {
        Ok((strategy, _)) => strategy,
        Err(error) => {
            common::skip(name, &error.to_string());
            return;
        }
    };
    assert_eq!(strategy.kind(), StrategyKind::DmSnapshot);
    let image = state.path().join("image.ext4");
    banger_disk::ext4::create_empty(&image, 64 * MIB, "dm-test").unwrap();
    let original = std::fs::read(&image).unwrap();
    let vm_dir = state.path().join("vms/dmtest");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm_id = format!("test{}", std::process::id());
    let disk = strategy
        .clone_image(&CloneRequest {
            vm_id: &vm_id,
            image: &image,
            vm_dir: &vm_dir,
            cancelled: &|| false,
        })
        .unwrap();
    let result = std::panic::catch_unwind(|| {
        let device = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .unwrap();
        device.write_all_at(&[0xab; 4096], 8 * MIB).unwrap();
        device.sync_all().unwrap();
        assert_eq!(std::fs::read(&image).unwrap(), original);
        let found = scan(Path::new("/sys"), state.path()).unwrap();
        assert_eq!(found.dm_devices.len(), 1);
    });
    DmSnapshot::new(Arc::new(HostCommands))
        .remove(&vm_id, &vm_dir)
        .unwrap();
    let found = scan(Path::new("/sys"), state.path()).unwrap();
    assert!(
        found.dm_devices.is_empty() && found.loop_devices.is_empty(),
        "{found:?}"
    );
    result.unwrap();
}
