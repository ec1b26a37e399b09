//! Reading files that a caller pointed at: beneath one directory, regular
//! files only, bounded in size.
//!
//! A [`ConfinedDir`] is a directory opened once. Every file under it is
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative
//! to that descriptor, so neither `..` nor a symlink (absolute, or relative
//! climbing out) nor a `/proc` magic link leads anywhere outside it, and
//! renaming the path afterwards changes nothing. Opens never block
//! (`O_NONBLOCK`, so a FIFO cannot hang the reader), and a file is refused
//! unless `fstat` says it is a regular file no larger than the caller's
//! limit; reads stop at that limit even if the file grows meanwhile.
//!
//! Opens use the calling thread's filesystem identity: a daemon reading for
//! a less privileged caller runs these on a thread with the caller's
//! credentials, so the kernel checks every component as the caller.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Why a file under a [`ConfinedDir`] was not read.
#[derive(Debug, thiserror::Error)]
pub enum ConfinedError {
    #[error("Cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} leads outside {directory} (through `..` or a symlink); refused")]
    Escapes { path: PathBuf, directory: PathBuf },
    #[error("{path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is larger than the {limit} bytes allowed")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConfinedError {
    /// The file does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A directory opened once; files beneath it are read through it.
#[derive(Debug)]
pub struct ConfinedDir {
    fd: OwnedFd,
    path: PathBuf,
}

const READ_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_NOCTTY)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_CLOEXEC);

impl ConfinedDir {
    /// Opens directory `path` (absolute, or relative to the current
    /// directory), following symlinks but no magic links.
    ///
    /// # Errors
    /// It cannot be opened, or is not a directory.
    pub fn open(path: &Path) -> Result<Self, ConfinedError> {
        let how = OpenHow::new()
            .flags(READ_FLAGS | OFlag::O_DIRECTORY)
            .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match nix::fcntl::openat2(libc::AT_FDCWD, path, how) {
            Ok(fd) => fd,
            Err(Errno::ENOTDIR) => {
                return Err(ConfinedError::NotADirectory {
                    path: path.to_owned(),
                })
            }
            Err(errno) => {
                return Err(ConfinedError::Open {
                    path: path.to_owned(),
                    source: errno.into(),
                })
            }
        };
        Ok(Self {
            fd: owned(fd),
            path: path.to_owned(),
        })
    }

    /// The path it was opened by, for messages.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_beneath(&self, relative: &Path, flags: OFlag) -> Result<OwnedFd, ConfinedError> {
        let path = self.path.join(relative);
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match nix::fcntl::openat2(self.fd.as_raw_fd(), relative, how) {
            Ok(fd) => Ok(owned(fd)),
            Err(Errno::EXDEV) => Err(ConfinedError::Escapes {
                path,
                directory: self.path.clone(),
            }),
            Err(Errno::ENOTDIR) if flags.contains(OFlag::O_DIRECTORY) => {
                Err(ConfinedError::NotADirectory { path })
            }
            Err(errno) => Err(ConfinedError::Open {
                path,
                source: errno.into(),
            }),
        }
    }

    /// The directory `relative` beneath this one.
    ///
    /// # Errors
    /// It cannot be opened beneath this directory, or is not a directory.
    pub fn subdirectory(&self, relative: &Path) -> Result<Self, ConfinedError> {
        let fd = self.open_beneath(relative, READ_FLAGS | OFlag::O_DIRECTORY)?;
        Ok(Self {
            fd,
            path: self.path.join(relative),
        })
    }

    /// Opens regular file `relative` of at most `limit` bytes.
    ///
    /// # Errors
    /// It cannot be opened beneath this directory, is not a regular file
    /// (a FIFO, device, socket or directory), or is larger than `limit`.
    pub fn open_file(&self, relative: &Path, limit: u64) -> Result<File, ConfinedError> {
        let file = File::from(self.open_beneath(relative, READ_FLAGS)?);
        check_regular(&file, &self.path.join(relative), limit)?;
        Ok(file)
    }

    /// The contents of regular file `relative`, at most `limit` bytes.
    ///
    /// # Errors
    /// As [`Self::open_file`], or reading fails or finds more than `limit`.
    pub fn read(&self, relative: &Path, limit: u64) -> Result<Vec<u8>, ConfinedError> {
        let file = self.open_file(relative, limit)?;
        read_limited(file, &self.path.join(relative), limit)
    }

    /// Whether `relative` is a regular file beneath this directory.
    #[must_use]
    pub fn has_file(&self, relative: &Path) -> bool {
        self.open_beneath(relative, OFlag::O_PATH | OFlag::O_CLOEXEC)
            .ok()
            .and_then(|fd| nix::sys::stat::fstat(fd.as_raw_fd()).ok())
            .is_some_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFREG)
    }

    /// The names in directory `relative` (empty when it is missing).
    #[must_use]
    pub fn names(&self, relative: &Path) -> Vec<String> {
        let Ok(directory) = self.subdirectory(relative) else {
            return Vec::new();
        };
        // `Dir` owns the descriptor from here, and closes it even on failure.
        let Ok(mut listing) = nix::dir::Dir::from_fd(directory.fd.into_raw_fd()) else {
            return Vec::new();
        };
        listing
            .iter()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().ok().map(str::to_owned))
            .filter(|name| name != "." && name != "..")
            .collect()
    }
}

/// Refuses anything but a regular file of at most `limit` bytes, naming
/// `path` and what it is.
///
/// # Errors
/// `fstat` fails, the file is not regular, or it is larger than `limit`.
pub fn check_regular(file: &File, path: &Path, limit: u64) -> Result<(), ConfinedError> {
    let metadata = file.metadata().map_err(|source| ConfinedError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() {
            "a character device"
        } else if file_type.is_block_device() {
            "a block device"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(ConfinedError::NotAFile {
            path: path.to_owned(),
            kind,
        });
    }
    if metadata.len() > limit {
        return Err(ConfinedError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(())
}

/// Reads `reader` to the end, refusing more than `limit` bytes.
///
/// # Errors
/// Reading fails, or there is more than `limit`.
pub fn read_limited(reader: impl Read, path: &Path, limit: u64) -> Result<Vec<u8>, ConfinedError> {
    let mut contents = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut contents)
        .map_err(|source| ConfinedError::Read {
            path: path.to_owned(),
            source,
        })?;
    if contents.len() as u64 > limit {
        return Err(ConfinedError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(contents)
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    #[allow(unsafe_code)]
    // SAFETY: `openat2` just returned this descriptor, owned by nobody else.
    unsafe {
        OwnedFd::from_raw_fd(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_beneath_are_read_and_nothing_else() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        let path = root.path();
        std::fs::create_dir(path.join("sub")).unwrap();
        std::fs::write(path.join("sub/file"), b"hello").unwrap();
        std::os::unix::fs::symlink("file", path.join("sub/inside")).unwrap();
        std::os::unix::fs::symlink(&secret, path.join("absolute")).unwrap();
        let climbing = format!(
            "../{}/secret",
            outside.path().file_name().unwrap().to_str().unwrap()
        );
        std::os::unix::fs::symlink(format!("../{climbing}"), path.join("sub/climbing")).unwrap();
        nix::unistd::mkfifo(
            &path.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", path.join("zero")).unwrap();
        let big = File::create(path.join("big")).unwrap();
        big.set_len(1 << 40).unwrap();

        let directory = ConfinedDir::open(path).unwrap();
        assert_eq!(directory.read(Path::new("sub/file"), 5).unwrap(), b"hello");
        assert_eq!(
            directory.read(Path::new("sub/inside"), 5).unwrap(),
            b"hello"
        );
        assert!(directory.has_file(Path::new("sub/file")));
        assert!(!directory.has_file(Path::new("sub")));
        assert!(!directory.has_file(Path::new("absolute")));
        for escaping in ["absolute", "sub/climbing", "../secret", "sub/../../x"] {
            let error = directory.read(Path::new(escaping), 100).unwrap_err();
            assert!(
                matches!(error, ConfinedError::Escapes { .. }),
                "{escaping}: {error}"
            );
        }
        // Bounded in time and size: none of these block or read much.
        let started = std::time::Instant::now();
        let error = directory.read(Path::new("fifo"), 100).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} is a FIFO, not a regular file",
                path.join("fifo").display()
            )
        );
        assert!(matches!(
            directory.read(Path::new("zero"), 100),
            Err(ConfinedError::Escapes { .. })
        ));
        let error = directory.read(Path::new("big"), 1 << 20).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} is larger than the 1048576 bytes allowed",
                path.join("big").display()
            )
        );
        assert!(matches!(
            directory.read(Path::new("sub/file"), 4),
            Err(ConfinedError::TooLarge { .. })
        ));
        assert!(matches!(
            directory.read(Path::new("sub"), 4),
            Err(ConfinedError::NotAFile {
                kind: "a directory",
                ..
            })
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(directory
            .read(Path::new("missing"), 4)
            .unwrap_err()
            .is_not_found());

        // The device itself, reached as a directory's member, is refused too.
        let dev = ConfinedDir::open(Path::new("/dev")).unwrap();
        assert!(matches!(
            dev.read(Path::new("zero"), 100),
            Err(ConfinedError::NotAFile {
                kind: "a character device",
                ..
            })
        ));
        let mut names = directory.names(Path::new("sub"));
        names.sort();
        assert_eq!(names, ["climbing", "file", "inside"]);
        assert!(directory.names(Path::new("nothing")).is_empty());
        assert!(matches!(
            ConfinedDir::open(&path.join("sub/file")),
            Err(ConfinedError::NotADirectory { .. })
        ));
    }
}
