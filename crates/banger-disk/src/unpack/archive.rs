//! Tar streams: entries read with the tar crate, written by the tree.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use super::tree::{Metadata, RelativePath, SpecialKind, Tree};
use super::UnpackError;

const XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Applies one tar stream to the tree. With `layer`, `.wh.` entries are
/// whiteouts and the layer is closed at the end.
pub(crate) fn apply(
    reader: impl Read,
    tree: &mut Tree<'_>,
    layer: bool,
) -> Result<(), UnpackError> {
    let limit = tree.maximum_stream_bytes();
    let exceeded = std::rc::Rc::new(std::cell::Cell::new(false));
    let limited = Limited {
        inner: reader,
        remaining: limit.unwrap_or(u64::MAX),
        exceeded: exceeded.clone(),
    };
    let result = apply_entries(limited, tree, layer);
    match (result, limit) {
        (Err(_), Some(limit)) if exceeded.get() => Err(UnpackError::TooLarge { limit }),
        (result, _) => result,
    }
}

/// A reader that fails once more than `remaining` bytes have been read.
struct Limited<R> {
    inner: R,
    remaining: u64,
    exceeded: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        match self.remaining.checked_sub(read as u64) {
            Some(remaining) => {
                self.remaining = remaining;
                Ok(read)
            }
            None => {
                self.exceeded.set(true);
                Err(std::io::Error::other("size limit exceeded"))
            }
        }
    }
}

fn apply_entries(reader: impl Read, tree: &mut Tree<'_>, layer: bool) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let archive_error = |source| UnpackError::ReadEntry {
        entry: "(archive)".to_owned(),
        source,
    };
    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let path = RelativePath::parse(&entry.path_bytes())?;
        let entry_type = entry.header().entry_type();
        if layer
            && path
                .file_name()
                .is_some_and(|name| name.as_bytes().starts_with(b".wh."))
        {
            tree.whiteout(&path)?;
            continue;
        }
        let metadata = metadata_of(&mut entry, &path)?;
        match entry_type {
            EntryType::Directory => tree.directory(&path, &metadata)?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                tree.file(&path, &metadata, &mut entry)?;
            }
            EntryType::Symlink => {
                let target = link_name(&entry, &path)?;
                tree.symlink(&path, &target, &metadata)?;
            }
            EntryType::Link => {
                let target = link_name(&entry, &path)?;
                let target = RelativePath::parse(target.as_os_str().as_bytes()).map_err(
                    |error| match error {
                        UnpackError::UnsafeEntry { reason, .. } => UnpackError::unsafe_entry(
                            path.display(),
                            format!("hard link to `{}`: {reason}", target.display()),
                        ),
                        other => other,
                    },
                )?;
                tree.hard_link(&path, &target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let kind = match entry_type {
                    EntryType::Char => SpecialKind::Character,
                    EntryType::Block => SpecialKind::Block,
                    _ => SpecialKind::Fifo,
                };
                let header = entry.header();
                let device = (
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                tree.special(&path, kind, device, &metadata)?;
            }
            // Global PAX headers carry nothing a root file system needs.
            EntryType::XGlobalHeader => {}
            other => {
                return Err(UnpackError::unsafe_entry(
                    path.display(),
                    format!("unsupported entry type {:?}", other.as_byte() as char),
                ));
            }
        }
    }
    if layer {
        tree.end_layer()?;
    }
    Ok(())
}

fn link_name<R: Read>(
    entry: &tar::Entry<'_, R>,
    path: &RelativePath,
) -> Result<PathBuf, UnpackError> {
    match entry.link_name_bytes() {
        Some(bytes) if !bytes.is_empty() => Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes))),
        _ => Err(UnpackError::unsafe_entry(
            path.display(),
            "link without a target",
        )),
    }
}

fn metadata_of<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &RelativePath,
) -> Result<Metadata, UnpackError> {
    let read_error = |source| UnpackError::ReadEntry {
        entry: path.display(),
        source,
    };
    let header = entry.header();
    let mut metadata = Metadata {
        uid: u32::try_from(header.uid().map_err(read_error)?)
            .map_err(|_| UnpackError::unsafe_entry(path.display(), "uid out of range"))?,
        gid: u32::try_from(header.gid().map_err(read_error)?)
            .map_err(|_| UnpackError::unsafe_entry(path.display(), "gid out of range"))?,
        mode: header.mode().map_err(read_error)?,
        modified: header
            .mtime()
            .ok()
            .map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)),
        xattrs: Vec::new(),
    };
    if let Some(extensions) = entry.pax_extensions().map_err(read_error)? {
        for extension in extensions {
            let extension = extension.map_err(read_error)?;
            let Ok(key) = extension.key() else { continue };
            if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                metadata
                    .xattrs
                    .push((OsString::from(name), extension.value_bytes().to_vec()));
            }
        }
    }
    Ok(metadata)
}

/// Whether the plain tar at `path` has a regular file `name` at its top level.
pub(crate) fn has_top_level_file(path: &Path, name: &str) -> Result<bool, UnpackError> {
    Ok(index(path)?.contains_key(name))
}

/// A regular file or symlink inside an outer archive.
#[derive(Debug, Clone)]
pub(crate) enum Member {
    File { offset: u64, size: u64 },
    Symlink { target: PathBuf },
}

/// Maps normalised member names of the plain tar at `path` to where their
/// data is, reading headers only.
pub(crate) fn index(path: &Path) -> Result<std::collections::HashMap<String, Member>, UnpackError> {
    let read_error = |source| UnpackError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut archive = tar::Archive::new(file);
    let mut members = std::collections::HashMap::new();
    for entry in archive.entries_with_seek().map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let Ok(name) = RelativePath::parse(&entry.path_bytes()) else {
            continue;
        };
        let member = match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous => Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            EntryType::Symlink => match entry.link_name_bytes() {
                Some(target) => Member::Symlink {
                    target: PathBuf::from(std::ffi::OsStr::from_bytes(&target)),
                },
                None => continue,
            },
            _ => continue,
        };
        members.insert(name.display(), member);
    }
    Ok(members)
}
