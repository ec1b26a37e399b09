//! `reflink`: FICLONE shares the image's extents with the clone, so cloning
//! costs O(1) in the image's size and blocks are copied only when the guest
//! writes them (XFS with `reflink=1`, btrfs).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    remove_file_if_present, CloneError, CloneRequest, CloneStrategy, RootDisk, StrategyKind,
    ROOT_DISK_FILE,
};

/// `_IOW(0x94, 9, int)` from `linux/fs.h`.
const FICLONE: u64 = 0x4004_9409;

#[derive(Debug, Default, Clone, Copy)]
pub struct Reflink;

/// Clones `source` into the new file `destination` with FICLONE. On error
/// the destination is removed.
///
/// # Errors
/// [`CloneError::Reflink`] when the file system cannot share extents
/// (`EOPNOTSUPP`, `EXDEV` across file systems, `EINVAL`).
pub fn reflink_file(source: &Path, destination: &Path) -> Result<(), CloneError> {
    let input = File::open(source).map_err(|error| CloneError::Open {
        path: source.to_owned(),
        source: error,
    })?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(destination)
        .map_err(|error| CloneError::Open {
            path: destination.to_owned(),
            source: error,
        })?;
    if let Err(error) = ficlone(&output, &input) {
        drop(output);
        let _ = std::fs::remove_file(destination);
        return Err(CloneError::Reflink {
            source_path: source.to_owned(),
            destination: destination.to_owned(),
            source: error,
        });
    }
    Ok(())
}

#[allow(unsafe_code)]
fn ficlone(destination: &File, source: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and
    // touches no memory of ours; both descriptors stay open for the call.
    #[allow(clippy::cast_possible_truncation)]
    let result = unsafe {
        libc::ioctl(
            destination.as_raw_fd(),
            FICLONE as libc::Ioctl,
            source.as_raw_fd(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether FICLONE works in `directory`: clones a one-block probe file and
/// removes both files. The error is a reason fit for a status line.
///
/// # Errors
/// A human-readable reason when reflinks do not work there.
pub fn probe_reflink(directory: &Path) -> Result<(), String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let source = directory.join(format!(".reflink-probe-{unique}"));
    let destination = directory.join(format!(".reflink-probe-{unique}.clone"));
    let result = std::fs::write(&source, [0x5a_u8; 4096])
        .map_err(|error| {
            format!(
                "cannot write a probe file in {}: {error}",
                directory.display()
            )
        })
        .and_then(|()| {
            reflink_file(&source, &destination).map_err(|error| {
                let cause =
                    std::error::Error::source(&error).map_or_else(String::new, ToString::to_string);
                format!("FICLONE fails in {}: {cause}", directory.display())
            })
        });
    let _ = std::fs::remove_file(&destination);
    let _ = std::fs::remove_file(&source);
    result
}

impl CloneStrategy for Reflink {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Reflink
    }

    fn describe(&self) -> String {
        "reflink (FICLONE: O(1) copy-on-write clone sharing the image's extents)".to_owned()
    }

    fn clone_image(&self, request: &CloneRequest<'_>) -> Result<RootDisk, CloneError> {
        let destination = request.vm_dir.join(ROOT_DISK_FILE);
        reflink_file(request.image, &destination)?;
        Ok(RootDisk {
            strategy: StrategyKind::Reflink,
            path: destination,
            file_backed: true,
        })
    }

    fn attach(&self, _vm_id: &str, _image: &Path, vm_dir: &Path) -> Result<RootDisk, CloneError> {
        super::copy::existing_file_disk(StrategyKind::Reflink, vm_dir)
    }

    fn remove(&self, _vm_id: &str, vm_dir: &Path) -> Result<(), CloneError> {
        remove_file_if_present(&vm_dir.join(ROOT_DISK_FILE))
    }
}
