//! The VM's work disk: the block device whose ext4 label is
//! [`WORK_DISK_LABEL`] is mounted at `/root` before the image's init runs.
//! Found by label, not by device name, because device order differs
//! between VMMs.

use std::io::Read;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// The label `bangerd` gives every work disk.
pub const WORK_DISK_LABEL: &str = "banger-work";
/// Where the work disk is mounted.
pub const WORK_DISK_MOUNT: &str = "/root";

const SUPERBLOCK_OFFSET: usize = 1024;
const MAGIC_OFFSET: usize = SUPERBLOCK_OFFSET + 0x38;
const LABEL_OFFSET: usize = SUPERBLOCK_OFFSET + 0x78;
const EXT_MAGIC: u16 = 0xEF53;

#[derive(Debug, thiserror::Error)]
pub enum WorkDiskError {
    #[error("Failed to create {path}")]
    CreateMountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to mount the work disk {device} on {target}")]
    Mount {
        device: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The volume label of an ext2/3/4 file system from its first 2 KiB.
#[must_use]
pub fn ext4_label(head: &[u8]) -> Option<String> {
    let magic = head.get(MAGIC_OFFSET..MAGIC_OFFSET + 2)?;
    if u16::from_le_bytes([magic[0], magic[1]]) != EXT_MAGIC {
        return None;
    }
    let raw = head.get(LABEL_OFFSET..LABEL_OFFSET + 16)?;
    let end = raw.iter().position(|byte| *byte == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// Whole-disk block devices (`/sys/block/*`, loop and ram devices left out).
fn block_devices(sys_block: &Path) -> Vec<PathBuf> {
    let mut devices: Vec<PathBuf> = std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with("loop") && !name.starts_with("ram"))
        .map(|name| Path::new("/dev").join(name))
        .collect();
    devices.sort();
    devices
}

/// The device carrying `label`, if any.
#[must_use]
pub fn find_by_label(label: &str) -> Option<PathBuf> {
    block_devices(Path::new("/sys/block"))
        .into_iter()
        .find(|device| {
            let mut head = vec![0_u8; 2048];
            std::fs::File::open(device)
                .and_then(|mut file| file.read_exact(&mut head))
                .is_ok()
                && ext4_label(&head).as_deref() == Some(label)
        })
}

/// Mounts the work disk at `/root` when the VM has one; `Ok(None)` otherwise.
pub fn mount() -> Result<Option<PathBuf>, WorkDiskError> {
    let Some(device) = find_by_label(WORK_DISK_LABEL) else {
        return Ok(None);
    };
    let target = Path::new(WORK_DISK_MOUNT);
    std::fs::create_dir_all(target).map_err(|source| WorkDiskError::CreateMountPoint {
        path: target.to_owned(),
        source,
    })?;
    nix::mount::mount(
        Some(&device),
        target,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| WorkDiskError::Mount {
        device: device.clone(),
        target: target.to_owned(),
        source,
    })?;
    // A fresh disk's root directory is 0755; a home is private.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700));
    Ok(Some(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_from_ext_superblocks_only() {
        let mut head = vec![0_u8; 2048];
        assert_eq!(ext4_label(&head), None);
        head[MAGIC_OFFSET..MAGIC_OFFSET + 2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        head[LABEL_OFFSET..LABEL_OFFSET + 11].copy_from_slice(b"banger-work");
        assert_eq!(ext4_label(&head).as_deref(), Some("banger-work"));
        assert_eq!(ext4_label(&head[..1100]), None);
    }

    #[test]
    fn a_real_mkfs_label_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let status = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", WORK_DISK_LABEL])
            .arg(&image)
            .status();
        let Ok(status) = status else {
            eprintln!("SKIPPED a_real_mkfs_label_is_found: mkfs.ext4 not found");
            return;
        };
        assert!(status.success());
        let mut head = vec![0_u8; 2048];
        std::fs::File::open(&image)
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert_eq!(ext4_label(&head).as_deref(), Some(WORK_DISK_LABEL));
    }
}
