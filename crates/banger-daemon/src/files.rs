//! File helpers: digests and format sniffing. Errors carry the path.

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

/// Not enough free space for something about to be written.
#[derive(Debug, thiserror::Error)]
#[error("No space for {what}: {needed} bytes needed in {dir}, {free} bytes free")]
pub struct NoSpace {
    pub what: &'static str,
    pub dir: PathBuf,
    pub needed: u64,
    pub free: u64,
}

/// What a sparse copy of a file with `metadata` writes at most: its
/// allocated blocks, never more than its length.
pub fn allocated_bytes(metadata: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    metadata.len().min(metadata.blocks().saturating_mul(512))
}

/// Refuses (with [`NoSpace`]) to write `needed` bytes of `what` under `dir`
/// (or its nearest existing ancestor) when its file system has less free
/// for unprivileged use. A failing `statvfs` does not refuse: the write
/// then reports what is wrong.
pub fn check_free_space(dir: &Path, needed: u64, what: &'static str) -> Result<(), NoSpace> {
    let existing = dir
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    let Ok(stat) = nix::sys::statvfs::statvfs(existing) else {
        return Ok(());
    };
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    if needed > free {
        return Err(NoSpace {
            what,
            dir: dir.to_owned(),
            needed,
            free,
        });
    }
    Ok(())
}

/// Copies the open file `input` (read from its current offset; `source`
/// names it in errors) to `destination` (created new) and returns the
/// sha256 of the content as `sha256:<hex>`.
pub fn copy_with_digest(
    input: &mut File,
    source: &Path,
    destination: &Path,
) -> Result<String, FileError> {
    copy_with_digest_reporting(input, source, destination, &mut |_| true)
}

/// [`copy_with_digest`], calling `progress(bytes read so far)` after each
/// chunk; when it answers `false` the copy stops with
/// [`FileError::Cancelled`] (the caller removes `destination`).
pub fn copy_with_digest_reporting(
    input: &mut File,
    source: &Path,
    destination: &Path,
    progress: &mut dyn FnMut(u64) -> bool,
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
    let mut done = 0_u64;
    loop {
        let read = input.read(&mut buffer).map_err(|error| FileError::Read {
            path: source.to_owned(),
            source: error,
        })?;
        if read == 0 {
            break;
        }
        done += read as u64;
        if !progress(done) {
            return Err(FileError::Cancelled {
                path: destination.to_owned(),
            });
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

/// The sha256 of `file`'s content as `sha256:<hex>`; `path` names it in errors.
pub fn digest(file: &mut File, path: &Path) -> Result<String, FileError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; CHUNK];
    loop {
        let read = file.read(&mut buffer).map_err(|error| FileError::Read {
            path: path.to_owned(),
            source: error,
        })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
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
