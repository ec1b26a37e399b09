//! Grows a mounted ext4 file system to the size of its block device, online,
//! from inside the guest.
//!
//! The host only lengthens a disk file (`banger disk resize`, `vm set
//! --disk-size`): running `e2fsck`/`resize2fs` as root on the host over a
//! file system the guest wrote would expose the host's tools to crafted
//! metadata. The guest's kernel grows the file system instead, with the
//! `EXT4_IOC_RESIZE_FS` ioctl `resize2fs` itself uses for a mounted file
//! system, so the guest needs no e2fsprogs. The agent does this at boot for
//! `/` and the work disk.
//!
//! 1. The device is the one `stat(mount point).st_dev` names
//!    (`/sys/dev/block/MAJ:MIN/uevent`, `DEVNAME=`).
//! 2. Its size (seek to its end) divided by the file system's block size (from
//!    the superblock) is the new block count.
//! 3. When that is more than the superblock's block count, the ioctl on the
//!    mount point grows the file system.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const SUPERBLOCK_OFFSET: usize = 1024;
const EXT_MAGIC: u16 = 0xEF53;
/// `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
/// `s_feature_incompat` bit of 64-bit block numbers.
const INCOMPAT_64BIT: u32 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("Failed to find the block device of {mount_point}")]
    Device {
        mount_point: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read {device}")]
    Read {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{device} does not hold an ext2/3/4 file system")]
    NotExt4 { device: PathBuf },
    #[error("Failed to grow the file system on {mount_point} to {blocks} blocks")]
    Resize {
        mount_point: PathBuf,
        blocks: u64,
        #[source]
        source: std::io::Error,
    },
}

/// What [`grow_mounted`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub device: PathBuf,
    pub block_size: u64,
    pub blocks_before: u64,
    pub blocks_after: u64,
}

/// Block size and block count from an ext2/3/4 superblock (the device's
/// first 2 KiB); `None` when it is not one.
#[must_use]
pub fn superblock_geometry(head: &[u8]) -> Option<(u64, u64)> {
    let field = |offset: usize| -> Option<u32> {
        let bytes = head.get(SUPERBLOCK_OFFSET + offset..SUPERBLOCK_OFFSET + offset + 4)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };
    let magic = head.get(SUPERBLOCK_OFFSET + 0x38..SUPERBLOCK_OFFSET + 0x3A)?;
    if u16::from_le_bytes([magic[0], magic[1]]) != EXT_MAGIC {
        return None;
    }
    let log_block_size = field(0x18)?;
    if log_block_size > 6 {
        return None;
    }
    let block_size = 1024_u64 << log_block_size;
    let mut blocks = u64::from(field(0x04)?);
    if field(0x60)? & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(field(0x150)?) << 32;
    }
    Some((block_size, blocks))
}

/// The block device a mount point's file system is on.
pub fn device_of(mount_point: &Path) -> Result<PathBuf, GrowError> {
    let error = |source| GrowError::Device {
        mount_point: mount_point.to_owned(),
        source,
    };
    let stat = nix::sys::stat::stat(mount_point).map_err(|errno| error(errno.into()))?;
    let (major, minor) = (
        nix::sys::stat::major(stat.st_dev),
        nix::sys::stat::minor(stat.st_dev),
    );
    let uevent =
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).map_err(error)?;
    uevent
        .lines()
        .find_map(|line| line.strip_prefix("DEVNAME="))
        .map(|name| Path::new("/dev").join(name))
        .ok_or_else(|| {
            error(std::io::Error::other(format!(
                "device {major}:{minor} has no DEVNAME"
            )))
        })
}

/// Grows the ext4 file system mounted (read-write) on `mount_point` to fill
/// its block device; a no-op when it already does.
pub fn grow_mounted(mount_point: &Path) -> Result<Grown, GrowError> {
    let device = device_of(mount_point)?;
    let read_error = |source| GrowError::Read {
        device: device.clone(),
        source,
    };
    let mut file = File::open(&device).map_err(read_error)?;
    let mut head = vec![0_u8; 2048];
    file.read_exact(&mut head).map_err(read_error)?;
    let device_size = file.seek(SeekFrom::End(0)).map_err(read_error)?;
    drop(file);
    let (block_size, blocks_before) =
        superblock_geometry(&head).ok_or_else(|| GrowError::NotExt4 {
            device: device.clone(),
        })?;
    let blocks_after = device_size / block_size;
    if blocks_after > blocks_before {
        let directory = File::open(mount_point).map_err(|source| GrowError::Resize {
            mount_point: mount_point.to_owned(),
            blocks: blocks_after,
            source,
        })?;
        let count: u64 = blocks_after;
        // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which
        // points at `count`, alive for the call; the descriptor is open.
        #[allow(unsafe_code)]
        let result = unsafe {
            libc::ioctl(
                directory.as_raw_fd(),
                EXT4_IOC_RESIZE_FS,
                std::ptr::from_ref(&count),
            )
        };
        if result != 0 {
            return Err(GrowError::Resize {
                mount_point: mount_point.to_owned(),
                blocks: blocks_after,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(Grown {
        device,
        block_size,
        blocks_before,
        blocks_after: blocks_after.max(blocks_before),
    })
}

/// [`grow_mounted`] with the outcome logged; for the boot sequence.
pub fn grow_and_log(mount_point: &Path) {
    match grow_mounted(mount_point) {
        Ok(grown) if grown.blocks_after > grown.blocks_before => tracing::info!(
            mount_point = %mount_point.display(),
            device = %grown.device.display(),
            from_bytes = grown.blocks_before * grown.block_size,
            to_bytes = grown.blocks_after * grown.block_size,
            "file system grown to its disk"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!("{}", banger_proto::error_chain(&error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(program: &str, args: &[&str]) -> Option<String> {
        let output = std::process::Command::new(program)
            .args(args)
            .output()
            .ok()?;
        assert!(output.status.success(), "{program} {args:?}: {output:?}");
        Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    #[test]
    fn geometry_comes_from_ext_superblocks_only() {
        let mut head = vec![0_u8; 2048];
        assert_eq!(superblock_geometry(&head), None);
        head[SUPERBLOCK_OFFSET + 0x38..SUPERBLOCK_OFFSET + 0x3A]
            .copy_from_slice(&EXT_MAGIC.to_le_bytes());
        head[SUPERBLOCK_OFFSET + 0x04..SUPERBLOCK_OFFSET + 0x08]
            .copy_from_slice(&1000_u32.to_le_bytes());
        head[SUPERBLOCK_OFFSET + 0x18..SUPERBLOCK_OFFSET + 0x1C]
            .copy_from_slice(&2_u32.to_le_bytes());
        assert_eq!(superblock_geometry(&head), Some((4096, 1000)));
        head[SUPERBLOCK_OFFSET + 0x60..SUPERBLOCK_OFFSET + 0x64]
            .copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
        head[SUPERBLOCK_OFFSET + 0x150..SUPERBLOCK_OFFSET + 0x154]
            .copy_from_slice(&1_u32.to_le_bytes());
        assert_eq!(superblock_geometry(&head), Some((4096, (1 << 32) + 1000)));
    }

    /// What a guest sees after `banger disk resize`: a file system smaller
    /// than its (loop) device, mounted, grown by the agent's code.
    #[test]
    fn a_mounted_file_system_grows_to_its_lengthened_disk() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED a_mounted_file_system_grows_to_its_lengthened_disk: needs root (loop devices, mount)");
            return;
        }
        // ext4 grows only for CAP_SYS_RESOURCE (a guest's PID 1 has it; a
        // container's root may not).
        let effective = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|caps| u64::from_str_radix(caps.trim(), 16).ok())
            .unwrap_or(0);
        if effective & (1 << 24) == 0 {
            eprintln!("SKIPPED a_mounted_file_system_grows_to_its_lengthened_disk: needs CAP_SYS_RESOURCE");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.ext4");
        File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let image_arg = image.to_str().unwrap();
        if run("mkfs.ext4", &["-q", "-F", "-L", "banger-work", image_arg]).is_none() {
            eprintln!(
                "SKIPPED a_mounted_file_system_grows_to_its_lengthened_disk: mkfs.ext4 not found"
            );
            return;
        }
        // The host's part of a resize: the file gets longer, nothing else.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(192 << 20)
            .unwrap();
        let Some(loop_device) = run("losetup", &["--find", "--show", image_arg]) else {
            eprintln!(
                "SKIPPED a_mounted_file_system_grows_to_its_lengthened_disk: losetup not found"
            );
            return;
        };
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let mounted = nix::mount::mount(
            Some(Path::new(&loop_device)),
            &mount_point,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        let outcome = mounted.map(|()| {
            let before = nix::sys::statvfs::statvfs(&mount_point).unwrap();
            let grown = grow_mounted(&mount_point);
            let after = nix::sys::statvfs::statvfs(&mount_point).unwrap();
            let again = grow_mounted(&mount_point);
            let _ = nix::mount::umount(&mount_point);
            (before, grown, after, again)
        });
        run("losetup", &["-d", &loop_device]);
        let (before, grown, after, again) = outcome.expect("mount the loop device");
        let grown = grown.unwrap();
        assert_eq!(grown.device, PathBuf::from(&loop_device));
        assert_eq!(grown.blocks_before * grown.block_size, 64 << 20);
        assert_eq!(grown.blocks_after * grown.block_size, 192 << 20);
        let size = |stat: &nix::sys::statvfs::Statvfs| stat.blocks() * stat.fragment_size();
        assert!(size(&before) < 64 << 20, "{}", size(&before));
        assert!(size(&after) > 160 << 20, "{}", size(&after));
        let again = again.unwrap();
        assert_eq!(again.blocks_before, again.blocks_after);
    }
}
