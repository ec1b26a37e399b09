//! File transfer as tar streams.
//!
//! Copy-in refuses, before anything of the entry is written:
//! 1. entry paths that are absolute or contain `..`;
//! 2. symlinks whose target is absolute or climbs out of the destination
//!    (resolved lexically from the link's own directory);
//! 3. hard links whose target is absolute or contains `..`;
//! 4. device nodes and FIFOs.
//!
//! `tar`'s `unpack_in` then also refuses to write through a directory whose
//! canonical path leaves the destination (a symlink already there).
//! Modes, mtimes and symlinks are preserved. Copy-out never follows symlinks.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("Refused archive entry {entry}: {reason}")]
    UnsafeEntry { entry: String, reason: &'static str },
    #[error("Failed to create destination {path}")]
    CreateDestination {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to read the archive")]
    ReadArchive(#[source] io::Error),
    #[error("Failed to unpack {entry}")]
    Unpack {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("Failed to read {path}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to write the archive")]
    WriteArchive(#[source] io::Error),
}

/// Unpacks `archive` into `dest` (created if missing); returns the entry count.
pub fn unpack(archive: impl Read, dest: &Path) -> Result<u64, FilesError> {
    fs::create_dir_all(dest).map_err(|source| FilesError::CreateDestination {
        path: dest.to_owned(),
        source,
    })?;
    let dest = fs::canonicalize(dest).map_err(|source| FilesError::CreateDestination {
        path: dest.to_owned(),
        source,
    })?;
    let mut archive = tar::Archive::new(archive);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut count = 0;
    for entry in archive.entries().map_err(FilesError::ReadArchive)? {
        let mut entry = entry.map_err(FilesError::ReadArchive)?;
        let path = entry.path().map_err(FilesError::ReadArchive)?.into_owned();
        let name = path.display().to_string();
        let refuse = |reason| FilesError::UnsafeEntry {
            entry: name.clone(),
            reason,
        };
        check_entry_path(&path).map_err(refuse)?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::GNUSparse => {}
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(FilesError::ReadArchive)?
                    .ok_or_else(|| refuse("symlink without a target"))?;
                check_symlink_target(&path, &target).map_err(refuse)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(FilesError::ReadArchive)?
                    .ok_or_else(|| refuse("hard link without a target"))?;
                check_entry_path(&target)
                    .map_err(|_| refuse("hard link target outside the destination"))?;
            }
            _ => return Err(refuse("entry type not allowed")),
        }
        let unpacked = entry.unpack_in(&dest).map_err(|source| {
            // tar's own containment check (a directory on the way resolves outside).
            if source.to_string().contains("outside of destination") {
                refuse("path resolves outside the destination")
            } else {
                FilesError::Unpack {
                    entry: name.clone(),
                    source,
                }
            }
        })?;
        if !unpacked {
            return Err(refuse("path outside the destination"));
        }
        count += 1;
    }
    Ok(count)
}

/// An entry path must be relative and stay below the destination.
pub fn check_entry_path(path: &Path) -> Result<(), &'static str> {
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(())
}

/// A symlink at `link` (relative to the destination) may point only inside it.
pub fn check_symlink_target(link: &Path, target: &Path) -> Result<(), &'static str> {
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|parent| {
            parent
                .components()
                .filter_map(|component| match component {
                    Component::Normal(name) => Some(name),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for component in target.components() {
        match component {
            Component::Normal(name) => depth.push(name),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return Err("symlink escapes the destination");
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err("symlink target is absolute"),
        }
    }
    Ok(())
}

/// Writes `source` (file, symlink or directory tree) as a tar to `out`, its
/// entries named after the source's last component.
pub fn pack(source: &Path, out: impl Write) -> Result<(), FilesError> {
    let read_error = |error| FilesError::ReadSource {
        path: source.to_owned(),
        source: error,
    };
    let metadata = fs::symlink_metadata(source).map_err(read_error)?;
    let name = source
        .file_name()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    if metadata.is_dir() {
        builder.append_dir_all(&name, source).map_err(read_error)?;
    } else {
        builder
            .append_path_with_name(source, &name)
            .map_err(read_error)?;
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(FilesError::WriteArchive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_must_be_relative_and_contained() {
        assert!(check_entry_path(Path::new("a/b/c")).is_ok());
        assert!(check_entry_path(Path::new("./a")).is_ok());
        assert!(check_entry_path(Path::new("../x")).is_err());
        assert!(check_entry_path(Path::new("a/../../x")).is_err());
        assert!(check_entry_path(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn symlink_targets_must_stay_inside() {
        assert!(check_symlink_target(Path::new("a/link"), Path::new("../b")).is_ok());
        assert!(check_symlink_target(Path::new("a/link"), Path::new("sibling")).is_ok());
        assert!(check_symlink_target(Path::new("a/link"), Path::new("../../b")).is_err());
        assert!(check_symlink_target(Path::new("link"), Path::new("/etc")).is_err());
        assert!(check_symlink_target(Path::new("link"), Path::new("..")).is_err());
    }
}
