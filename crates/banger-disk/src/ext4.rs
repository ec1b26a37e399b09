//! ext4 disk files: images built from a directory with `mkfs.ext4 -d`, empty
//! work disks, and growing a disk file (never shrinking; the guest grows the
//! file system in it).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::command::{arguments, CommandError, CommandRunner, HostCommands};

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to resize {path}")]
    Resize {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to make an ext4 file system in {path}")]
    Mkfs {
        path: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("{path} is {current} bytes; disks only grow, {requested} bytes would shrink it")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("{path} is not an ext4 file system")]
    NotExt4 { path: PathBuf },
    #[error("Invalid file system label `{0}` (at most 16 bytes, no NUL)")]
    Label(String),
}

/// How [`build_from_directory`] sizes the image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Volume label (`-L`), at most 16 bytes.
    pub label: String,
    /// Free space on top of the content, as a percentage of it.
    pub headroom_percent: u64,
    /// Free space on top of the content, in bytes, added to the percentage.
    pub headroom_bytes: u64,
    /// The image is never smaller than this.
    pub minimum_bytes: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            label: "banger-root".to_owned(),
            headroom_percent: 20,
            headroom_bytes: 256 * MIB,
            minimum_bytes: 512 * MIB,
        }
    }
}

/// Space the tree under `directory` needs on ext4: file data rounded to
/// 4 KiB blocks plus an inode and directory entry per file. Does not follow
/// symlinks; hard-linked files count once.
///
/// # Errors
/// [`Ext4Error::Read`] naming the entry that could not be read.
pub fn content_size(directory: &Path) -> Result<u64, Ext4Error> {
    let mut total = 0_u64;
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![directory.to_owned()];
    while let Some(current) = pending.pop() {
        let read_error = |source| Ext4Error::Read {
            path: current.clone(),
            source,
        };
        let metadata = std::fs::symlink_metadata(&current).map_err(read_error)?;
        if metadata.nlink() > 1
            && !metadata.is_dir()
            && !seen.insert((metadata.dev(), metadata.ino()))
        {
            continue;
        }
        // Inode (256 B) plus a directory entry, generously rounded.
        total += 512 + metadata.len().div_ceil(4096) * 4096;
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&current).map_err(read_error)? {
                pending.push(entry.map_err(read_error)?.path());
            }
        }
    }
    Ok(total)
}

/// The image size for `content` bytes under `options`, rounded up to MiB.
#[must_use]
pub fn image_size(content: u64, options: &BuildOptions) -> u64 {
    // ext4 metadata (inode tables, journal, reserved blocks) is roughly
    // 10% plus a journal of up to 64 MiB at these sizes.
    let wanted = content
        + content / 10
        + content * options.headroom_percent / 100
        + options.headroom_bytes
        + 64 * MIB;
    wanted.max(options.minimum_bytes).div_ceil(MIB) * MIB
}

fn check_label(label: &str) -> Result<(), Ext4Error> {
    if label.len() > 16 || label.contains('\0') {
        return Err(Ext4Error::Label(label.to_owned()));
    }
    Ok(())
}

/// Builds the new file `output` as an ext4 image holding `directory`, with
/// the root directory owned by 0:0. Returns the image size. On error
/// `output` is removed.
///
/// # Errors
/// [`Ext4Error`] naming the step; `Mkfs` carries `mkfs.ext4`'s stderr.
pub fn build_from_directory(
    directory: &Path,
    output: &Path,
    options: &BuildOptions,
) -> Result<u64, Ext4Error> {
    check_label(&options.label)?;
    let size = image_size(content_size(directory)?, options);
    make_file(output, size)?;
    let result = HostCommands.run(
        "mkfs.ext4",
        &arguments([
            OsString::from("-q"),
            "-F".into(),
            "-t".into(),
            "ext4".into(),
            "-L".into(),
            options.label.clone().into(),
            "-E".into(),
            "root_owner=0:0".into(),
            "-d".into(),
            directory.into(),
            output.into(),
        ]),
    );
    if let Err(source) = result {
        let _ = std::fs::remove_file(output);
        return Err(Ext4Error::Mkfs {
            path: output.to_owned(),
            source,
        });
    }
    Ok(size)
}

/// Creates the new file `output` of `size` bytes holding an empty ext4 file
/// system (a work disk). On error `output` is removed.
///
/// # Errors
/// [`Ext4Error`] naming the step.
pub fn create_empty(output: &Path, size: u64, label: &str) -> Result<(), Ext4Error> {
    check_label(label)?;
    make_file(output, size)?;
    let result = HostCommands.run(
        "mkfs.ext4",
        &arguments([
            OsString::from("-q"),
            "-F".into(),
            "-t".into(),
            "ext4".into(),
            "-L".into(),
            label.into(),
            "-E".into(),
            "root_owner=0:0".into(),
            output.into(),
        ]),
    );
    if let Err(source) = result {
        let _ = std::fs::remove_file(output);
        return Err(Ext4Error::Mkfs {
            path: output.to_owned(),
            source,
        });
    }
    Ok(())
}

fn make_file(output: &Path, size: u64) -> Result<(), Ext4Error> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(|source| Ext4Error::Create {
            path: output.to_owned(),
            source,
        })?;
    if let Err(source) = file.set_len(size) {
        let _ = std::fs::remove_file(output);
        return Err(Ext4Error::Create {
            path: output.to_owned(),
            source,
        });
    }
    Ok(())
}

/// Grows the disk file `path` (not in use by a VM) to `new_size` bytes. The
/// file system in it is not touched: the guest agent grows it online when
/// it next mounts it (`banger-agent`'s `grow`). No `e2fsck` or `resize2fs`
/// runs on the host, because the file system is the guest's (or an image
/// author's) and its metadata may be crafted to attack those tools. The
/// same size is a no-op; a smaller one is [`Ext4Error::Shrink`].
///
/// # Errors
/// [`Ext4Error`] naming the step.
pub fn grow(path: &Path, new_size: u64) -> Result<(), Ext4Error> {
    if !is_ext4(path)? {
        return Err(Ext4Error::NotExt4 {
            path: path.to_owned(),
        });
    }
    let current = std::fs::metadata(path)
        .map_err(|source| Ext4Error::Read {
            path: path.to_owned(),
            source,
        })?
        .len();
    if new_size < current {
        return Err(Ext4Error::Shrink {
            path: path.to_owned(),
            current,
            requested: new_size,
        });
    }
    if new_size > current {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|file| file.set_len(new_size))
            .map_err(|source| Ext4Error::Resize {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Whether `path` holds an ext2/3/4 file system (magic 0xEF53 at byte 1080).
///
/// # Errors
/// [`Ext4Error::Read`] when the file cannot be read.
pub fn is_ext4(path: &Path) -> Result<bool, Ext4Error> {
    let read_error = |source| Ext4Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut magic = [0_u8; 2];
    match file.read_exact_at(&mut magic, 1080) {
        Ok(()) => Ok(magic == [0x53, 0xEF]),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(read_error(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn debugfs(image: &Path, request: &str) -> String {
        let output = std::process::Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn builds_an_image_holding_the_tree() {
        let directory = tempfile::tempdir().unwrap();
        let tree = directory.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "banger\n").unwrap();
        std::fs::write(tree.join("big"), vec![7_u8; 3 << 20]).unwrap();
        std::os::unix::fs::symlink("etc/hostname", tree.join("link")).unwrap();
        std::fs::set_permissions(
            tree.join("etc/hostname"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let image = directory.path().join("image.ext4");
        let options = BuildOptions {
            label: "test-root".to_owned(),
            ..BuildOptions::default()
        };
        let size = build_from_directory(&tree, &image, &options).unwrap();
        assert_eq!(size, 512 * MIB);
        assert!(is_ext4(&image).unwrap());
        assert_eq!(debugfs(&image, "cat /etc/hostname"), "banger\n");
        let stat = debugfs(&image, "stat /etc/hostname");
        assert!(stat.contains("Mode:  0640"), "{stat}");
        assert!(debugfs(&image, "stat /link").contains("Fast link dest: \"etc/hostname\""));
        let root = debugfs(&image, "stat /");
        assert!(root.contains("User:     0   Group:     0"), "{root}");
        let label = std::process::Command::new("e2label")
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "test-root");
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(&image)
            .output()
            .unwrap();
        assert!(fsck.status.success(), "{fsck:?}");
        // Growing lengthens the file only: the file system (the guest's
        // to grow) is left as it was. Shrinking is refused; the same size is
        // a no-op.
        let block_count = |stats: &str| {
            stats
                .lines()
                .find(|line| line.starts_with("Block count:"))
                .map(str::to_owned)
                .unwrap()
        };
        let before = block_count(&debugfs(&image, "stats"));
        let head_before = std::fs::read(&image).unwrap()[..64 * 1024].to_vec();
        grow(&image, 768 * MIB).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 768 * MIB);
        assert_eq!(block_count(&debugfs(&image, "stats")), before);
        assert_eq!(std::fs::read(&image).unwrap()[..64 * 1024], head_before[..]);
        assert_eq!(debugfs(&image, "cat /etc/hostname"), "banger\n");
        let error = grow(&image, 600 * MIB).unwrap_err();
        assert!(matches!(error, Ext4Error::Shrink { .. }), "{error}");
        assert!(error.to_string().contains("only grow"), "{error}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 768 * MIB);
        grow(&image, 768 * MIB).unwrap();
        drop(directory);
    }

    #[test]
    fn empty_work_disk_and_failures_leave_nothing() {
        let directory = tempfile::tempdir().unwrap();
        let disk = directory.path().join("work.ext4");
        create_empty(&disk, 64 * MIB, "work").unwrap();
        assert!(is_ext4(&disk).unwrap());
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 * MIB);
        let error = create_empty(&directory.path().join("tiny"), 4096, "work").unwrap_err();
        assert!(matches!(error, Ext4Error::Mkfs { .. }), "{error}");
        assert!(!directory.path().join("tiny").exists());
        let error = create_empty(
            &directory.path().join("x"),
            64 * MIB,
            "a-label-far-too-long",
        )
        .unwrap_err();
        assert!(matches!(error, Ext4Error::Label(_)), "{error}");
        std::fs::write(directory.path().join("plain"), vec![0_u8; 4096]).unwrap();
        assert!(!is_ext4(&directory.path().join("plain")).unwrap());
        let error = grow(&directory.path().join("plain"), 8192).unwrap_err();
        assert!(matches!(error, Ext4Error::NotExt4 { .. }), "{error}");
        std::fs::remove_file(&disk).unwrap();
        std::fs::remove_file(directory.path().join("plain")).unwrap();
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 0);
    }
}
