//! File transfer as tar streams.
//!
//! Whoever unpacks a stream treats it as hostile: the agent unpacking what
//! the host sends (copy-in), the CLI unpacking what a guest sends (`vm cp
//! VM:/path DEST`). [`unpack_with`] is the only writer and checks every
//! entry before anything of it is written:
//!
//! 1. Entry paths must be relative, without `..` or NUL; `.` and empty
//!    components are dropped.
//! 2. The parents are walked one component at a time with `lstat`: a
//!    missing one is created, a directory is entered, and a symlink (or
//!    anything else) refuses the entry. Nothing is ever written through a
//!    link, so a chain like `d/up -> ..`, `e -> d/up/..` cannot carry a
//!    later `e/x` out of the destination.
//! 3. The final component is replaced, never followed: what is there is
//!    removed (a directory is kept for a directory entry), then the new
//!    object is made with `O_CREAT|O_EXCL` / `symlink`.
//! 4. Symlinks: with [`Symlinks::Contained`] (copy-in) the target is
//!    resolved against the tree unpacked so far (links met on the way
//!    followed, `..` may not climb above the destination) and one that
//!    leaves it is refused, then every link is checked again over the
//!    finished tree; with [`Symlinks::AsIs`] (copy-out: `cp -P`) a link is
//!    made as it is, since step 2 never follows it.
//! 5. Hard links must name an existing non-directory inside the
//!    destination, reached without crossing a symlink.
//! 6. Device nodes, FIFOs and other entry types are refused.
//! 7. Modes are masked ([`UnpackOptions::mode_mask`]: copy-out drops
//!    set-id and sticky bits and applies the caller's umask), owners kept
//!    only when asked (and then by `lchown`, which needs root); a
//!    directory's mode and mtime are set after its contents.
//!
//! [`pack_with`] sends a file or tree, following symlinks only when asked
//! (`vm cp -L`), without looping on a link to an ancestor.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

/// Symlinks followed while resolving one target before giving up (like ELOOP).
const MAXIMUM_LINK_HOPS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("Refused archive entry {entry}: {reason}")]
    UnsafeEntry { entry: String, reason: String },
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

/// What a symlink in the stream may point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks {
    /// Only inside the destination (resolved against the unpacked tree).
    Contained,
    /// Anywhere: the link is made as it is and never followed.
    AsIs,
}

/// How [`unpack_with`] writes what it unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackOptions {
    pub symlinks: Symlinks,
    /// Mode bits kept from the archive (e.g. `0o777 & !umask`).
    pub mode_mask: u32,
    /// Give entries the archive's numeric owners (needs root).
    pub preserve_owners: bool,
}

impl UnpackOptions {
    /// Copy-in, in the guest: contained links, modes as sent.
    pub const COPY_IN: Self = Self {
        symlinks: Symlinks::Contained,
        mode_mask: 0o7777,
        preserve_owners: false,
    };

    /// Copy-out to the host for a caller with `umask`: links as they are,
    /// no set-id or sticky bits, the umask applied, owned by the caller.
    #[must_use]
    pub fn copy_out(umask: u32) -> Self {
        Self {
            symlinks: Symlinks::AsIs,
            mode_mask: 0o777 & !umask,
            preserve_owners: false,
        }
    }
}

/// Unpacks `archive` into `dest` (created if missing) as copy-in does;
/// returns the entry count.
pub fn unpack(archive: impl Read, dest: &Path) -> Result<u64, FilesError> {
    unpack_with(archive, dest, &UnpackOptions::COPY_IN)
}

/// Unpacks `archive` into `dest` (created if missing) following the module
/// protocol; returns the entry count.
pub fn unpack_with(
    archive: impl Read,
    dest: &Path,
    options: &UnpackOptions,
) -> Result<u64, FilesError> {
    fs::create_dir_all(dest).map_err(|source| FilesError::CreateDestination {
        path: dest.to_owned(),
        source,
    })?;
    let root = fs::canonicalize(dest).map_err(|source| FilesError::CreateDestination {
        path: dest.to_owned(),
        source,
    })?;
    let mut writer = Writer {
        root,
        options: *options,
        directories: Vec::new(),
    };
    let mut archive = tar::Archive::new(archive);
    let mut count = 0;
    for entry in archive.entries().map_err(FilesError::ReadArchive)? {
        let mut entry = entry.map_err(FilesError::ReadArchive)?;
        writer.entry(&mut entry)?;
        count += 1;
    }
    if options.symlinks == Symlinks::Contained {
        writer.check_all_symlinks()?;
    }
    writer.finish_directories()?;
    Ok(count)
}

/// A normalised path below the destination.
type Components = Vec<OsString>;

fn display(path: &[OsString]) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    path.iter()
        .map(|component| component.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Step 1 of the module protocol.
fn parse_entry_path(raw: &[u8]) -> Result<Components, FilesError> {
    let refuse = |reason: &str| FilesError::UnsafeEntry {
        entry: String::from_utf8_lossy(raw).into_owned(),
        reason: reason.to_owned(),
    };
    if raw.first() == Some(&b'/') {
        return Err(refuse("absolute path"));
    }
    if raw.contains(&0) {
        return Err(refuse("NUL byte in path"));
    }
    let mut components = Vec::new();
    for component in raw.split(|&byte| byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(refuse("path contains '..'")),
            name => components.push(OsStr::from_bytes(name).to_owned()),
        }
    }
    Ok(components)
}

struct Writer {
    root: PathBuf,
    options: UnpackOptions,
    /// Directories made or kept, with the mode and mtime to give them last.
    directories: Vec<(PathBuf, u32, Option<SystemTime>)>,
}

impl Writer {
    fn absolute(&self, path: &[OsString]) -> PathBuf {
        let mut absolute = self.root.clone();
        absolute.extend(path);
        absolute
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), FilesError> {
        let path = parse_entry_path(&entry.path_bytes())?;
        let name = display(&path);
        let refuse = |reason: String| FilesError::UnsafeEntry {
            entry: name.clone(),
            reason,
        };
        let unpack_error = |source| FilesError::Unpack {
            entry: name.clone(),
            source,
        };
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(FilesError::ReadArchive)? & self.options.mode_mask;
        let owner = if self.options.preserve_owners {
            Some((
                u32::try_from(header.uid().map_err(FilesError::ReadArchive)?)
                    .map_err(|_| refuse("uid out of range".to_owned()))?,
                u32::try_from(header.gid().map_err(FilesError::ReadArchive)?)
                    .map_err(|_| refuse("gid out of range".to_owned()))?,
            ))
        } else {
            None
        };
        let modified = header
            .mtime()
            .ok()
            .map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
        match kind {
            EntryType::Directory => {
                let absolute = self.absolute(&path);
                if !path.is_empty() {
                    self.walk_parents(&path, &name, true)?;
                    if !self.clear_slot(&absolute, true).map_err(unpack_error)? {
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&absolute)
                            .map_err(unpack_error)?;
                    }
                    if let Some((uid, gid)) = owner {
                        std::os::unix::fs::lchown(&absolute, Some(uid), Some(gid))
                            .map_err(unpack_error)?;
                    }
                    // Writable until its contents are in; its mode comes last.
                    fs::set_permissions(&absolute, fs::Permissions::from_mode(0o700))
                        .map_err(unpack_error)?;
                    self.directories.push((absolute, mode, modified));
                }
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                if path.is_empty() {
                    return Err(refuse("a file in place of the destination".to_owned()));
                }
                self.walk_parents(&path, &name, true)?;
                let absolute = self.absolute(&path);
                self.clear_slot(&absolute, false).map_err(unpack_error)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&absolute)
                    .map_err(unpack_error)?;
                if kind == EntryType::GNUSparse {
                    // Holes stay holes: a tiny stream declaring a huge hole
                    // takes no disk.
                    copy_sparse(entry, &mut file).map_err(unpack_error)?;
                } else {
                    io::copy(entry, &mut file).map_err(unpack_error)?;
                }
                if let Some(modified) = modified {
                    file.set_modified(modified).map_err(unpack_error)?;
                }
                drop(file);
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&absolute, Some(uid), Some(gid))
                        .map_err(unpack_error)?;
                }
                // After chown, which clears set-id bits.
                fs::set_permissions(&absolute, fs::Permissions::from_mode(mode))
                    .map_err(unpack_error)?;
            }
            EntryType::Symlink => {
                if path.is_empty() {
                    return Err(refuse("a symlink in place of the destination".to_owned()));
                }
                let target = match entry.link_name_bytes() {
                    Some(bytes) if !bytes.is_empty() && !bytes.contains(&0) => {
                        PathBuf::from(OsStr::from_bytes(&bytes))
                    }
                    _ => return Err(refuse("symlink without a target".to_owned())),
                };
                if self.options.symlinks == Symlinks::Contained {
                    self.check_symlink(&path, &target)?;
                }
                self.walk_parents(&path, &name, true)?;
                let absolute = self.absolute(&path);
                self.clear_slot(&absolute, false).map_err(unpack_error)?;
                std::os::unix::fs::symlink(&target, &absolute).map_err(unpack_error)?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&absolute, Some(uid), Some(gid))
                        .map_err(unpack_error)?;
                }
            }
            EntryType::Link => {
                let target = match entry.link_name_bytes() {
                    Some(bytes) if !bytes.is_empty() => parse_entry_path(&bytes)
                        .map_err(|_| refuse("hard link target outside the destination".into()))?,
                    _ => return Err(refuse("hard link without a target".to_owned())),
                };
                if path.is_empty() || target.is_empty() {
                    return Err(refuse("hard link to or in place of the destination".into()));
                }
                let missing = || {
                    refuse(format!(
                        "hard link to `{}`, which does not exist",
                        display(&target)
                    ))
                };
                if !self.walk_parents(&target, &name, false)? {
                    return Err(missing());
                }
                let target_absolute = self.absolute(&target);
                match fs::symlink_metadata(&target_absolute) {
                    Ok(metadata) if metadata.is_dir() => {
                        return Err(refuse(format!(
                            "hard link to the directory `{}`",
                            display(&target)
                        )));
                    }
                    Ok(_) => {}
                    Err(_) => return Err(missing()),
                }
                if path != target {
                    self.walk_parents(&path, &name, true)?;
                    let absolute = self.absolute(&path);
                    self.clear_slot(&absolute, false).map_err(unpack_error)?;
                    fs::hard_link(&target_absolute, &absolute).map_err(unpack_error)?;
                }
            }
            _ => return Err(refuse("entry type not allowed".to_owned())),
        }
        Ok(())
    }

    /// Step 2: makes sure the parents of `path` are real directories
    /// (creating missing ones when `create`); `false` if one is missing.
    fn walk_parents(
        &mut self,
        path: &[OsString],
        name: &str,
        create: bool,
    ) -> Result<bool, FilesError> {
        let mut current = self.root.clone();
        let count = path.len().saturating_sub(1);
        for (index, component) in path[..count].iter().enumerate() {
            current.push(component);
            let refuse = |reason: String| FilesError::UnsafeEntry {
                entry: name.to_owned(),
                reason,
            };
            match fs::symlink_metadata(&current) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(refuse(format!(
                        "would write through the symlink `{}`",
                        display(&path[..=index])
                    )));
                }
                Ok(_) => {
                    return Err(refuse(format!(
                        "parent `{}` is not a directory",
                        display(&path[..=index])
                    )));
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&current)
                        .map_err(|source| FilesError::Unpack {
                            entry: name.to_owned(),
                            source,
                        })?;
                    self.directories
                        .push((current.clone(), 0o755 & self.options.mode_mask, None));
                }
                Err(source) => {
                    return Err(FilesError::Unpack {
                        entry: name.to_owned(),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Step 3: clears the slot for a new object; returns whether a directory
    /// was kept (a directory entry over an existing directory).
    fn clear_slot(&self, absolute: &Path, new_is_dir: bool) -> io::Result<bool> {
        match fs::symlink_metadata(absolute) {
            Ok(metadata) if metadata.is_dir() => {
                if new_is_dir {
                    return Ok(true);
                }
                fs::remove_dir_all(absolute)?;
            }
            Ok(_) => fs::remove_file(absolute)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(false)
    }

    /// Step 4: resolves `target` of the link at `path` against the tree.
    fn check_symlink(&self, path: &[OsString], target: &Path) -> Result<(), FilesError> {
        resolve_inside(&self.root, path, target).map_err(|reason| FilesError::UnsafeEntry {
            entry: display(path),
            reason: reason.to_owned(),
        })
    }

    /// Step 4 again over the finished tree: a later entry can change how an
    /// earlier link resolves.
    fn check_all_symlinks(&self) -> Result<(), FilesError> {
        let mut pending: Vec<Components> = vec![Vec::new()];
        while let Some(directory) = pending.pop() {
            let entries =
                fs::read_dir(self.absolute(&directory)).map_err(|source| FilesError::Unpack {
                    entry: display(&directory),
                    source,
                })?;
            for entry in entries {
                let entry = entry.map_err(|source| FilesError::Unpack {
                    entry: display(&directory),
                    source,
                })?;
                let mut child = directory.clone();
                child.push(entry.file_name());
                let file_type = entry.file_type().map_err(|source| FilesError::Unpack {
                    entry: display(&child),
                    source,
                })?;
                if file_type.is_dir() {
                    pending.push(child);
                } else if file_type.is_symlink() {
                    let target =
                        fs::read_link(entry.path()).map_err(|source| FilesError::Unpack {
                            entry: display(&child),
                            source,
                        })?;
                    self.check_symlink(&child, &target)?;
                }
            }
        }
        Ok(())
    }

    /// Gives directories their modes and mtimes, deepest first.
    fn finish_directories(&mut self) -> Result<(), FilesError> {
        let mut directories = std::mem::take(&mut self.directories);
        directories.sort_by_key(|(path, _, _)| std::cmp::Reverse(path.components().count()));
        for (path, mode, modified) in directories {
            let error = |source| FilesError::Unpack {
                entry: path.display().to_string(),
                source,
            };
            // Still a directory of ours (a later entry may have replaced it).
            match fs::symlink_metadata(&path) {
                Ok(metadata) if metadata.is_dir() => {}
                _ => continue,
            }
            if let Some(modified) = modified {
                fs::File::open(&path)
                    .and_then(|directory| directory.set_modified(modified))
                    .map_err(error)?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(error)?;
        }
        Ok(())
    }
}

/// Resolves `target` of a link at `link` (components below `root`) against
/// the tree on disk at `root`: links met on the way are followed, `..` may
/// not climb above `root`, and an absolute target leaves it.
fn resolve_inside(root: &Path, link: &[OsString], target: &Path) -> Result<(), &'static str> {
    if target.is_absolute() {
        return Err("symlink target is absolute");
    }
    let mut stack: Vec<OsString> = link[..link.len().saturating_sub(1)].to_vec();
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front_components(&mut pending, target);
    let mut hops = 0;
    while let Some(component) = pending.pop_front() {
        if component == ".." {
            if stack.pop().is_none() {
                return Err("symlink escapes the destination");
            }
            continue;
        }
        stack.push(component);
        let mut here = root.to_owned();
        here.extend(&stack);
        if let Ok(next) = fs::read_link(&here) {
            hops += 1;
            if hops > MAXIMUM_LINK_HOPS {
                // A loop stays inside; whoever follows it gets ELOOP.
                return Ok(());
            }
            if next.is_absolute() {
                return Err("symlink escapes the destination");
            }
            stack.pop();
            push_front_components(&mut pending, &next);
        }
    }
    Ok(())
}

/// Whether the symlink at `link` (relative to `root`) pointing at `target`
/// stays inside `root` when resolved against the tree on disk there, as
/// copy-in checks it: what a sender uses to set aside the links the agent
/// would refuse.
#[must_use]
pub fn symlink_resolves_inside(root: &Path, link: &Path, target: &Path) -> bool {
    let components: Vec<OsString> = link
        .components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.to_owned()),
            _ => None,
        })
        .collect();
    resolve_inside(root, &components, target).is_ok()
}

/// Copies `content` into `file`, seeking over blocks of zeros.
fn copy_sparse(content: &mut impl Read, file: &mut fs::File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut total: u64 = 0;
    let mut ends_in_hole = false;
    loop {
        let read = match content.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if buffer[..read].iter().all(|byte| *byte == 0) {
            file.seek(SeekFrom::Current(i64::try_from(read).unwrap_or(i64::MAX)))?;
            ends_in_hole = true;
        } else {
            file.write_all(&buffer[..read])?;
            ends_in_hole = false;
        }
        total += read as u64;
    }
    if ends_in_hole {
        file.set_len(total)?;
    }
    Ok(total)
}

/// Queues `target`'s components before the pending ones.
fn push_front_components(pending: &mut VecDeque<OsString>, target: &Path) {
    let components: Vec<OsString> = target
        .components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    for component in components.into_iter().rev() {
        pending.push_front(component);
    }
}

/// Writes `source` (file, symlink or directory tree) as a tar to `out`, its
/// entries named after the source's last component. Symlinks are sent as
/// links.
pub fn pack(source: &Path, out: impl Write) -> Result<(), FilesError> {
    pack_with(source, out, false)
}

/// [`pack`], following symlinks (the source's and those in the tree) when
/// `follow_links`: a dangling link is sent as a link, and a directory that
/// is its own ancestor is sent empty rather than looped through.
pub fn pack_with(source: &Path, out: impl Write, follow_links: bool) -> Result<(), FilesError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |error| FilesError::ReadSource {
            path: path.clone(),
            source: error,
        }
    };
    let metadata = if follow_links {
        fs::metadata(source)
    } else {
        fs::symlink_metadata(source)
    }
    .map_err(read_error(source))?;
    let name = source
        .file_name()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(follow_links);
    builder.mode(tar::HeaderMode::Complete);
    if follow_links {
        append_following(&mut builder, source, &name, &metadata, &mut Vec::new())?;
    } else if metadata.is_dir() {
        builder
            .append_dir_all(&name, source)
            .map_err(read_error(source))?;
    } else {
        builder
            .append_path_with_name(source, &name)
            .map_err(read_error(source))?;
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(FilesError::WriteArchive)
}

/// Appends `path` (whose followed metadata is `metadata`) as `name`;
/// `ancestors` are the (device, inode) of the directories above it.
fn append_following<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    metadata: &fs::Metadata,
    ancestors: &mut Vec<(u64, u64)>,
) -> Result<(), FilesError> {
    let read_error = |error| FilesError::ReadSource {
        path: path.to_owned(),
        source: error,
    };
    if !metadata.is_dir() {
        return builder
            .append_path_with_name(path, name)
            .map_err(read_error);
    }
    builder.append_dir(name, path).map_err(read_error)?;
    let identity = (metadata.dev(), metadata.ino());
    if ancestors.contains(&identity) {
        return Ok(());
    }
    ancestors.push(identity);
    let mut children: Vec<fs::DirEntry> = fs::read_dir(path)
        .map_err(read_error)?
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    children.sort_by_key(fs::DirEntry::file_name);
    for child in children {
        let child_path = child.path();
        let child_name = name.join(child.file_name());
        match fs::metadata(&child_path) {
            Ok(child_metadata) => {
                append_following(
                    builder,
                    &child_path,
                    &child_name,
                    &child_metadata,
                    ancestors,
                )?;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                // A dangling link: sent as it is.
                let target =
                    fs::read_link(&child_path).map_err(|source| FilesError::ReadSource {
                        path: child_path.clone(),
                        source,
                    })?;
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder
                    .append_link(&mut header, &child_name, &target)
                    .map_err(|source| FilesError::ReadSource {
                        path: child_path.clone(),
                        source,
                    })?;
            }
            Err(source) => {
                return Err(FilesError::ReadSource {
                    path: child_path,
                    source,
                })
            }
        }
    }
    ancestors.pop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_resolved_against_the_tree_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink("..", root.join("a/up")).unwrap();
        let inside = |link: &str, target: &str| {
            symlink_resolves_inside(root, Path::new(link), Path::new(target))
        };
        assert!(inside("a/link", "../b"));
        assert!(inside("a/link", "sibling"));
        assert!(inside("a/link", "up"));
        assert!(!inside("a/link", "../../b"));
        assert!(!inside("link", "/etc"));
        assert!(!inside("link", ".."));
        // Lexically `a`, but `a/up` is the root.
        assert!(!inside("e", "a/up/.."));
        assert!(!inside("a/b/e", "../up/.."));
    }

    /// A tar built entry by entry (names as given, nothing checked).
    struct Corpus(tar::Builder<Vec<u8>>);

    impl Corpus {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(size);
            header.set_mtime(1_000_000);
            header
        }

        fn dir(mut self, name: &str) -> Self {
            let mut header = Self::header(EntryType::Directory, 0o755, 0);
            self.0.append_data(&mut header, name, io::empty()).unwrap();
            self
        }

        fn file(mut self, name: &str, mode: u32, content: &[u8]) -> Self {
            let mut header = Self::header(EntryType::Regular, mode, content.len() as u64);
            self.0.append_data(&mut header, name, content).unwrap();
            self
        }

        fn link(mut self, kind: EntryType, name: &str, target: &str) -> Self {
            let mut header = Self::header(kind, 0o777, 0);
            self.0.append_link(&mut header, name, target).unwrap();
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut pending = vec![root.to_owned()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                found.push(path.strip_prefix(root).unwrap().display().to_string());
                if entry.file_type().unwrap().is_dir() {
                    pending.push(path);
                }
            }
        }
        found.sort();
        found
    }

    /// Archives whose later entries try to reach outside DEST through
    /// links made by earlier ones. Run with both link policies: nothing
    /// may appear outside DEST, and the archive is refused.
    #[test]
    fn symlink_chains_never_write_outside_the_destination() {
        let corpus = |outside: &str| -> Vec<(&str, Vec<u8>)> {
            vec![
                (
                    "d/up -> .., e -> d/up/.., e/x",
                    Corpus::new()
                        .dir("d")
                        .link(EntryType::Symlink, "d/up", "..")
                        .link(EntryType::Symlink, "e", "d/up/..")
                        .file("e/x", 0o644, b"escaped")
                        .bytes(),
                ),
                (
                    "up -> ., a -> up/up/../.., a/x",
                    Corpus::new()
                        .link(EntryType::Symlink, "up", ".")
                        .link(EntryType::Symlink, "a", "up/up/../..")
                        .file("a/x", 0o644, b"escaped")
                        .bytes(),
                ),
                (
                    "absolute link, then a file through it",
                    Corpus::new()
                        .link(EntryType::Symlink, "l", outside)
                        .file("l/x", 0o644, b"escaped")
                        .bytes(),
                ),
                (
                    "a hard link through a symlinked directory",
                    Corpus::new()
                        .link(EntryType::Symlink, "l", outside)
                        .link(EntryType::Link, "h", "l/secret")
                        .bytes(),
                ),
                (
                    "a symlink replaced by a directory entry keeps no link",
                    Corpus::new()
                        .link(EntryType::Symlink, "k", outside)
                        .dir("k/sub")
                        .bytes(),
                ),
            ]
        };
        for symlinks in [Symlinks::AsIs, Symlinks::Contained] {
            let scratch = tempfile::tempdir().unwrap();
            let outside = scratch.path().join("outside");
            for (what, archive) in corpus(&outside.display().to_string()) {
                let _ = fs::remove_dir_all(&outside);
                fs::create_dir(&outside).unwrap();
                fs::write(outside.join("secret"), b"host").unwrap();
                let dest = scratch.path().join("dest");
                let _ = fs::remove_dir_all(&dest);
                let options = UnpackOptions {
                    symlinks,
                    ..UnpackOptions::copy_out(0o022)
                };
                let result = unpack_with(&archive[..], &dest, &options);
                assert!(
                    matches!(result, Err(FilesError::UnsafeEntry { .. })),
                    "{what} ({symlinks:?}): {result:?}"
                );
                assert_eq!(tree(&outside), vec!["secret"], "{what} ({symlinks:?})");
                assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host", "{what}");
                assert_eq!(
                    tree(scratch.path())
                        .iter()
                        .filter(|name| name.ends_with('x'))
                        .count(),
                    0,
                    "{what} ({symlinks:?}): {:?}",
                    tree(scratch.path())
                );
            }
        }
    }

    #[test]
    fn copy_out_keeps_links_as_they_are() {
        let scratch = tempfile::tempdir().unwrap();
        let archive = Corpus::new()
            .link(EntryType::Symlink, "os-release", "../usr/lib/os-release")
            .bytes();
        unpack_with(
            &archive[..],
            scratch.path(),
            &UnpackOptions::copy_out(0o022),
        )
        .unwrap();
        assert_eq!(
            fs::read_link(scratch.path().join("os-release")).unwrap(),
            Path::new("../usr/lib/os-release")
        );
        // Copy-in still refuses it.
        let error = unpack(&archive[..], &scratch.path().join("in")).unwrap_err();
        assert!(error.to_string().contains("escapes"), "{error}");
    }

    #[test]
    fn copy_out_drops_set_id_bits_and_applies_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let scratch = tempfile::tempdir().unwrap();
        let archive = Corpus::new()
            .dir("tree")
            .file("tree/setuid", 0o4755, b"#!/bin/sh\n")
            .file("tree/setgid", 0o2777, b"x")
            .file("tree/open", 0o666, b"x")
            .link(EntryType::Link, "tree/hard", "tree/setuid")
            .bytes();
        unpack_with(
            &archive[..],
            scratch.path(),
            &UnpackOptions::copy_out(0o027),
        )
        .unwrap();
        let mode = |name: &str| {
            fs::symlink_metadata(scratch.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("tree/setuid"), 0o750);
        assert_eq!(mode("tree/setgid"), 0o750);
        assert_eq!(mode("tree/open"), 0o640);
        assert_eq!(mode("tree/hard"), 0o750);
        assert_eq!(mode("tree"), 0o750);
        // Copy-in keeps what the host sent.
        let inside = scratch.path().join("in");
        unpack(&archive[..], &inside).unwrap();
        assert_eq!(
            fs::metadata(inside.join("tree/setuid"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o4755
        );
    }

    #[test]
    fn a_hole_from_a_guest_takes_no_disk() {
        let scratch = tempfile::tempdir().unwrap();
        let mut header = Corpus::header(EntryType::GNUSparse, 0o644, 512);
        let gnu = header.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset((256 << 20) - 512);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(256 << 20);
        let mut archive = Corpus::new();
        archive
            .0
            .append_data(&mut header, "hole", &[b'x'; 512][..])
            .unwrap();
        let archive = archive.bytes();
        assert!(archive.len() < 4096);
        unpack_with(
            &archive[..],
            scratch.path(),
            &UnpackOptions::copy_out(0o022),
        )
        .unwrap();
        let metadata = fs::metadata(scratch.path().join("hole")).unwrap();
        assert_eq!(metadata.len(), 256 << 20);
        assert!(
            metadata.blocks() * 512 < 1 << 20,
            "{} blocks",
            metadata.blocks()
        );
    }

    #[test]
    fn read_only_directories_are_filled_before_their_mode_is_set() {
        let scratch = tempfile::tempdir().unwrap();
        let mut archive = Corpus::new();
        let mut header = Corpus::header(EntryType::Directory, 0o555, 0);
        archive
            .0
            .append_data(&mut header, "ro", io::empty())
            .unwrap();
        let archive = archive.file("ro/f", 0o444, b"x").bytes();
        unpack_with(
            &archive[..],
            scratch.path(),
            &UnpackOptions::copy_out(0o022),
        )
        .unwrap();
        assert_eq!(fs::read(scratch.path().join("ro/f")).unwrap(), b"x");
        let _ = fs::set_permissions(scratch.path().join("ro"), fs::Permissions::from_mode(0o755));
    }

    #[test]
    fn following_links_sends_targets_and_survives_loops() {
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path().join("src");
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("usr/lib/os-release"), b"ID=debian\n").unwrap();
        std::os::unix::fs::symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
        std::os::unix::fs::symlink("..", root.join("etc/loop")).unwrap();
        std::os::unix::fs::symlink("missing", root.join("etc/dangling")).unwrap();

        let mut archive = Vec::new();
        pack_with(&root.join("etc/os-release"), &mut archive, true).unwrap();
        let out = scratch.path().join("one");
        unpack_with(&archive[..], &out, &UnpackOptions::copy_out(0o022)).unwrap();
        assert_eq!(fs::read(out.join("os-release")).unwrap(), b"ID=debian\n");

        let mut archive = Vec::new();
        pack_with(&root.join("etc"), &mut archive, true).unwrap();
        let out = scratch.path().join("tree");
        unpack_with(&archive[..], &out, &UnpackOptions::copy_out(0o022)).unwrap();
        assert_eq!(
            fs::read(out.join("etc/os-release")).unwrap(),
            b"ID=debian\n"
        );
        assert!(fs::symlink_metadata(out.join("etc/dangling"))
            .unwrap()
            .file_type()
            .is_symlink());
        // `loop` is the parent of `etc`: sent once, its `etc` empty.
        assert!(out.join("etc/loop/usr/lib/os-release").is_file());
        assert_eq!(
            fs::read_dir(out.join("etc/loop/etc/loop"))
                .map(Iterator::count)
                .unwrap_or(0),
            0
        );

        let mut archive = Vec::new();
        pack(&root.join("etc/os-release"), &mut archive).unwrap();
        let out = scratch.path().join("link");
        unpack_with(&archive[..], &out, &UnpackOptions::copy_out(0o022)).unwrap();
        assert!(fs::symlink_metadata(out.join("os-release"))
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
