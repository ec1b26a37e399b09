//! `copy`: a sparse copy of the image, the fallback that works everywhere.
//! Only data segments (`SEEK_DATA`/`SEEK_HOLE`) are copied, so holes stay
//! holes and the cost is the image's data, not its size. Each segment goes
//! by `copy_file_range` (in the kernel, no round trip through the daemon's
//! memory; a file system that can share extents may do so); where that is
//! refused (across file systems on old kernels, some file systems) by
//! reads and writes, with all-zero chunks left as holes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{
    remove_file_if_present, CloneError, CloneRequest, CloneStrategy, RootDisk, StrategyKind,
    ROOT_DISK_FILE,
};

/// Bytes per read and write where the kernel does not copy.
const CHUNK: usize = 1 << 20;
/// Bytes per `copy_file_range` call (cancellation is checked between calls).
const KERNEL_CHUNK: usize = 64 << 20;

#[derive(Debug, Default, Clone, Copy)]
pub struct Copy;

impl CloneStrategy for Copy {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Copy
    }

    fn describe(&self) -> String {
        "copy (sparse copy: time and space grow with the image's data)".to_owned()
    }

    fn clone_image(&self, request: &CloneRequest<'_>) -> Result<RootDisk, CloneError> {
        self.clone_image_reporting(request, &mut |_, _| {})
    }

    fn clone_image_reporting(
        &self,
        request: &CloneRequest<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RootDisk, CloneError> {
        let (disk, _) = self.clone_image_unsynced(request, progress)?;
        if let Err(error) = super::sync_root_disk(&disk) {
            let _ = std::fs::remove_file(&disk.path);
            return Err(error);
        }
        Ok(disk)
    }

    fn clone_image_unsynced(
        &self,
        request: &CloneRequest<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(RootDisk, bool), CloneError> {
        let destination = request.vm_dir.join(ROOT_DISK_FILE);
        if let Err(error) = copy_sparse(request.image, &destination, request.cancelled, progress) {
            // create_new failing means the file was someone else's: keep it.
            if !matches!(error, CloneError::Open { ref path, .. } if path == &destination) {
                let _ = std::fs::remove_file(&destination);
            }
            return Err(error);
        }
        Ok((
            RootDisk {
                strategy: StrategyKind::Copy,
                path: destination,
                file_backed: true,
            },
            true,
        ))
    }

    fn attach(&self, _vm_id: &str, _image: &Path, vm_dir: &Path) -> Result<RootDisk, CloneError> {
        existing_file_disk(StrategyKind::Copy, vm_dir)
    }

    fn remove(&self, _vm_id: &str, vm_dir: &Path) -> Result<(), CloneError> {
        remove_file_if_present(&vm_dir.join(ROOT_DISK_FILE))
    }
}

pub(super) fn existing_file_disk(
    strategy: StrategyKind,
    vm_dir: &Path,
) -> Result<RootDisk, CloneError> {
    let path = vm_dir.join(ROOT_DISK_FILE);
    std::fs::metadata(&path).map_err(|source| CloneError::Open {
        path: path.clone(),
        source,
    })?;
    Ok(RootDisk {
        strategy,
        path,
        file_backed: true,
    })
}

/// Copies `source` to the new file `destination`, keeping holes. Returns the
/// length. `cancelled` is polled between chunks.
///
/// # Errors
/// [`CloneError`] with the path that failed, or [`CloneError::Cancelled`].
pub fn sparse_copy(
    source: &Path,
    destination: &Path,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<u64, CloneError> {
    sparse_copy_reporting(source, destination, cancelled, &mut |_, _| {})
}

/// [`sparse_copy`], calling `progress(data bytes copied, data bytes in
/// all)` after each chunk (holes are neither copied nor counted).
///
/// # Errors
/// As [`sparse_copy`].
pub fn sparse_copy_reporting(
    source: &Path,
    destination: &Path,
    cancelled: &(dyn Fn() -> bool + Sync),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, CloneError> {
    let (length, output) = copy_sparse(source, destination, cancelled, progress)?;
    output.sync_all().map_err(|error| CloneError::Write {
        path: destination.to_owned(),
        source: error,
    })?;
    Ok(length)
}

/// [`sparse_copy_reporting`] without the final `fsync`: returns the length
/// and the new file.
fn copy_sparse(
    source: &Path,
    destination: &Path,
    cancelled: &(dyn Fn() -> bool + Sync),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, File), CloneError> {
    let read_error = |error| CloneError::Read {
        path: source.to_owned(),
        source: error,
    };
    let write_error = |error| CloneError::Write {
        path: destination.to_owned(),
        source: error,
    };
    let input = File::open(source).map_err(|error| CloneError::Open {
        path: source.to_owned(),
        source: error,
    })?;
    let length = input.metadata().map_err(read_error)?.len();
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(destination)
        .map_err(|error| CloneError::Open {
            path: destination.to_owned(),
            source: error,
        })?;
    output.set_len(length).map_err(write_error)?;
    let total = data_bytes(&input, length).map_err(read_error)?;
    let mut done = 0_u64;
    let mut buffer = Vec::new();
    let mut in_kernel = true;
    let mut offset = 0_u64;
    while offset < length {
        let Some((data_start, data_end)) =
            next_data_segment(&input, offset, length).map_err(read_error)?
        else {
            break;
        };
        let mut position = data_start;
        while position < data_end {
            if cancelled() {
                return Err(CloneError::Cancelled {
                    path: destination.to_owned(),
                });
            }
            let want = usize::try_from((data_end - position).min(KERNEL_CHUNK as u64))
                .unwrap_or(KERNEL_CHUNK);
            if in_kernel {
                match copy_in_kernel(&input, &output, position, want) {
                    Ok(0) => break,
                    Ok(copied) => {
                        position += copied as u64;
                        done += copied as u64;
                        progress(done, total);
                        continue;
                    }
                    Err(
                        nix::errno::Errno::EXDEV
                        | nix::errno::Errno::ENOSYS
                        | nix::errno::Errno::EINVAL
                        | nix::errno::Errno::EOPNOTSUPP,
                    ) => in_kernel = false,
                    Err(errno) => return Err(write_error(errno.into())),
                }
            }
            if buffer.is_empty() {
                buffer = vec![0_u8; CHUNK];
            }
            let want = want.min(CHUNK);
            let read = input
                .read_at(&mut buffer[..want], position)
                .map_err(read_error)?;
            if read == 0 {
                break;
            }
            if buffer[..read].iter().any(|&byte| byte != 0) {
                output
                    .write_all_at(&buffer[..read], position)
                    .map_err(write_error)?;
            }
            position += read as u64;
            done += read as u64;
            progress(done, total);
        }
        offset = data_end;
    }
    Ok((length, output))
}

/// The bytes in `file`'s data segments: what a sparse copy moves.
fn data_bytes(file: &File, length: u64) -> std::io::Result<u64> {
    let mut total = 0;
    let mut offset = 0;
    while offset < length {
        let Some((start, end)) = next_data_segment(file, offset, length)? else {
            break;
        };
        total += end.saturating_sub(start);
        offset = end.max(offset + 1);
    }
    Ok(total)
}

/// Copies up to `length` bytes at `position` from `input` to the same
/// offset of `output` in the kernel; returns the bytes copied (0 at the end
/// of `input`).
fn copy_in_kernel(
    input: &File,
    output: &File,
    position: u64,
    length: usize,
) -> Result<usize, nix::errno::Errno> {
    let start = i64::try_from(position).map_err(|_| nix::errno::Errno::EINVAL)?;
    let (mut from, mut to) = (start, start);
    nix::fcntl::copy_file_range(input, Some(&mut from), output, Some(&mut to), length)
}

/// The next `[start, end)` data range at or after `offset`, or `None` when
/// only a hole remains. Without `SEEK_DATA` the rest counts as data.
fn next_data_segment(file: &File, offset: u64, length: u64) -> std::io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let Ok(signed_offset) = i64::try_from(offset) else {
        return Ok(None);
    };
    let start = match nix::unistd::lseek(fd, signed_offset, nix::unistd::Whence::SeekData) {
        Ok(start) => start,
        Err(nix::errno::Errno::ENXIO) => return Ok(None),
        Err(nix::errno::Errno::EINVAL) => return Ok(Some((offset, length))),
        Err(errno) => return Err(errno.into()),
    };
    let end = nix::unistd::lseek(fd, start, nix::unistd::Whence::SeekHole)?;
    Ok(Some((
        u64::try_from(start).unwrap_or(offset),
        u64::try_from(end).unwrap_or(length).min(length),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copy_strategy_keeps_content_and_holes_and_removes() {
        let directory = tempfile::tempdir().unwrap();
        let image = directory.path().join("image.ext4");
        let file = File::create(&image).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(b"middle", 32 << 20).unwrap();
        file.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(file);
        let vm_dir = directory.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let disk = Copy
            .clone_image(&CloneRequest {
                vm_id: "vm1",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            })
            .unwrap();
        assert!(disk.file_backed);
        assert_eq!(
            std::fs::read(&image).unwrap(),
            std::fs::read(&disk.path).unwrap()
        );
        let allocated = std::fs::metadata(&disk.path).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
        assert_eq!(Copy.attach("vm1", &image, &vm_dir).unwrap(), disk);
        Copy.remove("vm1", &vm_dir).unwrap();
        Copy.remove("vm1", &vm_dir).unwrap();
        assert_eq!(std::fs::read_dir(&vm_dir).unwrap().count(), 0);
    }

    #[test]
    fn an_unsynced_copy_says_its_flush_is_owed_and_the_flush_succeeds() {
        let directory = tempfile::tempdir().unwrap();
        let image = directory.path().join("image.ext4");
        let file = File::create(&image).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(b"data", 4 << 20).unwrap();
        drop(file);
        let vm_dir = directory.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let (disk, owed) = Copy
            .clone_image_unsynced(
                &CloneRequest {
                    vm_id: "vm1",
                    image: &image,
                    vm_dir: &vm_dir,
                    cancelled: &|| false,
                },
                &mut |_, _| {},
            )
            .unwrap();
        assert!(owed, "a copy's flush is the caller's");
        assert_eq!(
            std::fs::read(&image).unwrap(),
            std::fs::read(&disk.path).unwrap()
        );
        super::super::sync_root_disk(&disk).unwrap();
        std::fs::remove_file(&disk.path).unwrap();
        let error = super::super::sync_root_disk(&disk).unwrap_err();
        assert!(
            matches!(&error, CloneError::Write { path, .. } if path == &disk.path),
            "{error}"
        );
    }

    #[test]
    fn copy_reports_data_bytes_up_to_the_total() {
        let directory = tempfile::tempdir().unwrap();
        let image = directory.path().join("image.ext4");
        let file = File::create(&image).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&vec![7_u8; 3 << 20], 0).unwrap();
        file.write_all_at(&vec![9_u8; 1 << 20], 40 << 20).unwrap();
        drop(file);
        let vm_dir = directory.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let mut reports = Vec::new();
        Copy.clone_image_reporting(
            &CloneRequest {
                vm_id: "vm1",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            },
            &mut |done, total| reports.push((done, total)),
        )
        .unwrap();
        let (last, total) = *reports.last().expect("progress was reported");
        assert_eq!(last, total);
        // The data, not the holes (a file system may round to its blocks).
        assert!((4 << 20..8 << 20).contains(&total), "{total}");
        assert!(reports.windows(2).all(|pair| pair[0].0 <= pair[1].0));
        assert!(reports.iter().all(|&(_, each)| each == total));
    }

    #[test]
    fn cancelled_copy_leaves_nothing() {
        let directory = tempfile::tempdir().unwrap();
        let image = directory.path().join("image");
        std::fs::write(&image, vec![1_u8; 3 << 20]).unwrap();
        let vm_dir = directory.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let error = Copy
            .clone_image(&CloneRequest {
                vm_id: "vm1",
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| true,
            })
            .unwrap_err();
        assert!(matches!(error, CloneError::Cancelled { .. }), "{error}");
        assert_eq!(std::fs::read_dir(&vm_dir).unwrap().count(), 0);
    }
}
