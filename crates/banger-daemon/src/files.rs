//! File helpers: sparse copies, digests, format sniffing. Errors carry the path.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
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
    #[error("Copy to {path} was cancelled")]
    Cancelled { path: PathBuf },
}

const CHUNK: usize = 1 << 20;

/// Copies `source` to a new file `destination`, keeping holes: only the data
/// segments (found with `SEEK_DATA`/`SEEK_HOLE`) are read and written, so a
/// mostly empty 4 GiB image costs what its data costs. Returns the length.
/// `cancelled` is polled between chunks.
pub fn sparse_copy(
    source: &Path,
    destination: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<u64, FileError> {
    let input = File::open(source).map_err(|error| FileError::Open {
        path: source.to_owned(),
        source: error,
    })?;
    let length = input
        .metadata()
        .map_err(|error| FileError::Read {
            path: source.to_owned(),
            source: error,
        })?
        .len();
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(destination)
        .map_err(|error| FileError::Open {
            path: destination.to_owned(),
            source: error,
        })?;
    let write_error = |error| FileError::Write {
        path: destination.to_owned(),
        source: error,
    };
    output.set_len(length).map_err(write_error)?;
    let mut buffer = vec![0_u8; CHUNK];
    let mut offset = 0_u64;
    while offset < length {
        let Some((data_start, data_end)) =
            next_data_segment(&input, offset, length).map_err(|error| FileError::Read {
                path: source.to_owned(),
                source: error,
            })?
        else {
            break;
        };
        let mut position = data_start;
        while position < data_end {
            if cancelled() {
                return Err(FileError::Cancelled {
                    path: destination.to_owned(),
                });
            }
            let want = usize::try_from((data_end - position).min(CHUNK as u64)).unwrap_or(CHUNK);
            let read = input
                .read_at(&mut buffer[..want], position)
                .map_err(|error| FileError::Read {
                    path: source.to_owned(),
                    source: error,
                })?;
            if read == 0 {
                break;
            }
            // All-zero chunks stay holes in the copy.
            if buffer[..read].iter().any(|&byte| byte != 0) {
                output
                    .write_all_at(&buffer[..read], position)
                    .map_err(write_error)?;
            }
            position += read as u64;
        }
        offset = data_end;
    }
    output.sync_all().map_err(write_error)?;
    Ok(length)
}

/// The next `[start, end)` data range at or after `offset`, or `None` if only
/// a hole remains. Filesystems without `SEEK_DATA` report the whole rest as data.
fn next_data_segment(file: &File, offset: u64, length: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
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

/// Copies the open file `input` (read from its current offset; `source`
/// names it in errors) to `destination` (created new) and returns the
/// sha256 of the content as `sha256:<hex>`.
pub fn copy_with_digest(
    input: &mut File,
    source: &Path,
    destination: &Path,
) -> Result<String, FileError> {
    input
        .seek(SeekFrom::Start(0))
        .map_err(|error| FileError::Read {
            path: source.to_owned(),
            source: error,
        })?;
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(destination)
        .map_err(|error| FileError::Open {
            path: destination.to_owned(),
            source: error,
        })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; CHUNK];
    loop {
        let read = input.read(&mut buffer).map_err(|error| FileError::Read {
            path: source.to_owned(),
            source: error,
        })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        if buffer[..read].iter().all(|&byte| byte == 0) {
            // Keep zero runs as holes; set_len below fixes the final size.
            output
                .seek(SeekFrom::Current(read as i64))
                .map_err(|error| FileError::Write {
                    path: destination.to_owned(),
                    source: error,
                })?;
        } else {
            output
                .write_all(&buffer[..read])
                .map_err(|error| FileError::Write {
                    path: destination.to_owned(),
                    source: error,
                })?;
        }
    }
    let length = output.stream_position().map_err(|error| FileError::Write {
        path: destination.to_owned(),
        source: error,
    })?;
    output
        .set_len(length)
        .and_then(|()| output.sync_all())
        .map_err(|error| FileError::Write {
            path: destination.to_owned(),
            source: error,
        })?;
    Ok(format!("sha256:{:x}", hasher.finalize()))
}

/// Whether `file` holds an ext2/3/4 filesystem (superblock magic 0xEF53 at byte 1080).
pub fn is_ext4(file: &File, path: &Path) -> Result<bool, FileError> {
    let mut magic = [0_u8; 2];
    match file.read_exact_at(&mut magic, 1080) {
        Ok(()) => Ok(magic == [0x53, 0xEF]),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(FileError::Read {
            path: path.to_owned(),
            source: error,
        }),
    }
}

/// Whether `file` looks like a kernel Firecracker or QEMU can boot: an ELF
/// `vmlinux` or an x86 `bzImage` (setup header magic `HdrS` at 0x202).
pub fn is_kernel_image(file: &File, path: &Path) -> Result<bool, FileError> {
    let mut head = [0_u8; 0x206];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) => {
                return Err(FileError::Read {
                    path: path.to_owned(),
                    source: error,
                })
            }
        }
    }
    let elf = filled >= 4 && head[..4] == *b"\x7fELF";
    let bzimage = filled >= 0x206 && head[0x202..0x206] == *b"HdrS";
    Ok(elf || bzimage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let file = File::create(&source).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(b"middle", 32 << 20).unwrap();
        file.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(file);
        let destination = dir.path().join("copy");
        let length = sparse_copy(&source, &destination, &|| false).unwrap();
        assert_eq!(length, 64 << 20);
        assert_eq!(
            std::fs::read(&source).unwrap(),
            std::fs::read(&destination).unwrap()
        );
        let allocated = std::fs::metadata(&destination).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
    }

    #[test]
    fn sparse_copy_stops_when_cancelled_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::write(&source, vec![1_u8; 3 << 20]).unwrap();
        let destination = dir.path().join("copy");
        let error = sparse_copy(&source, &destination, &|| true).unwrap_err();
        assert!(matches!(error, FileError::Cancelled { .. }));
        let error = sparse_copy(&source, &destination, &|| false).unwrap_err();
        assert!(matches!(error, FileError::Open { .. }), "{error}");
    }

    #[test]
    fn digest_and_format_checks() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("a");
        std::fs::write(&source, b"abc").unwrap();
        let mut input = File::open(&source).unwrap();
        let digest = copy_with_digest(&mut input, &source, &dir.path().join("b")).unwrap();
        assert_eq!(
            digest,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"abc");
        assert!(!is_ext4(&input, &source).unwrap());
        let mut superblock = vec![0_u8; 2048];
        superblock[1080] = 0x53;
        superblock[1081] = 0xEF;
        std::fs::write(dir.path().join("fs"), &superblock).unwrap();
        let fs = dir.path().join("fs");
        assert!(is_ext4(&File::open(&fs).unwrap(), &fs).unwrap());
        std::fs::write(dir.path().join("elf"), b"\x7fELF\x02\x01").unwrap();
        let elf = dir.path().join("elf");
        assert!(is_kernel_image(&File::open(&elf).unwrap(), &elf).unwrap());
        assert!(!is_kernel_image(&input, &source).unwrap());
    }
}
