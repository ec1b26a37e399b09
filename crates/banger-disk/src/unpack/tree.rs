//! The only writer of the staging tree. Every path comes in as untrusted
//! bytes and is checked here, whatever the source:
//!
//! 1. Normalise: `.` and empty components dropped; `..` and absolute paths
//!    refused outright (also after long-name and PAX expansion, which the
//!    tar crate has already applied to the bytes we see).
//! 2. Walk the parents one component at a time with `lstat`: a missing one
//!    is created (0755), a directory is entered, a symlink or anything else
//!    refuses the entry, so nothing is ever written through a link.
//! 3. The final component is replaced, never followed: whatever is there is
//!    unlinked (a directory only when the new entry is not one), then the
//!    new object is created with `O_CREAT|O_EXCL|O_NOFOLLOW` / `symlinkat`.
//! 4. Symlink targets are resolved inside the root (absolute targets from
//!    the root, `..` may not climb above it, links met on the way followed);
//!    one that escapes is refused. Because a later entry can change how an
//!    earlier link resolves, [`Tree::check_all_symlinks`] repeats the check
//!    over the finished tree.
//! 5. Hard links must name an existing non-directory inside the root,
//!    reached without crossing a symlink.
//! 6. Device nodes and FIFOs are refused unless allowed.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use super::{UnpackError, UnpackOptions};

/// Symlinks followed while resolving one target before giving up (like ELOOP).
const MAXIMUM_LINK_HOPS: usize = 40;

/// A normalised path relative to the staging root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RelativePath(pub(crate) Vec<OsString>);

impl RelativePath {
    /// Step 1 of the module protocol. `entry` is the name for errors.
    pub(crate) fn parse(raw: &[u8]) -> Result<Self, UnpackError> {
        let display = String::from_utf8_lossy(raw).into_owned();
        if raw.first() == Some(&b'/') {
            return Err(UnpackError::unsafe_entry(display, "absolute path"));
        }
        if raw.contains(&0) {
            return Err(UnpackError::unsafe_entry(display, "NUL byte in path"));
        }
        let mut components = Vec::new();
        for component in raw.split(|&byte| byte == b'/') {
            match component {
                b"" | b"." => {}
                b".." => {
                    return Err(UnpackError::unsafe_entry(display, "`..` path component"));
                }
                name => components.push(OsStr::from_bytes(name).to_owned()),
            }
        }
        Ok(Self(components))
    }

    pub(crate) fn display(&self) -> String {
        let mut text = String::new();
        for (index, component) in self.0.iter().enumerate() {
            if index > 0 {
                text.push('/');
            }
            text.push_str(&component.to_string_lossy());
        }
        if text.is_empty() {
            text.push('.');
        }
        text
    }

    fn to_path(&self) -> PathBuf {
        self.0.iter().collect()
    }

    pub(crate) fn parent(&self) -> Option<Self> {
        (!self.0.is_empty()).then(|| Self(self.0[..self.0.len() - 1].to_vec()))
    }

    pub(crate) fn file_name(&self) -> Option<&OsStr> {
        self.0.last().map(OsString::as_os_str)
    }
}

/// Ownership, mode, times and extended attributes of a new object.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metadata {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mode: u32,
    pub(crate) modified: Option<SystemTime>,
    pub(crate) xattrs: Vec<(OsString, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpecialKind {
    Character,
    Block,
    Fifo,
}

/// A whiteout seen in a layer, applied when the layer ends.
#[derive(Debug)]
enum Whiteout {
    Remove(RelativePath),
    Opaque(RelativePath),
}

pub(crate) struct Tree<'a> {
    root: PathBuf,
    options: &'a UnpackOptions,
    /// Paths (and their ancestors) written by the current layer.
    layer_paths: HashSet<RelativePath>,
    whiteouts: Vec<Whiteout>,
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
    /// Content declared so far (sparse files at their real size).
    declared: u64,
}

impl<'a> Tree<'a> {
    pub(crate) fn new(root: PathBuf, options: &'a UnpackOptions) -> Self {
        Self {
            root,
            options,
            layer_paths: HashSet::new(),
            whiteouts: Vec::new(),
            entries: 0,
            bytes: 0,
            declared: 0,
        }
    }

    pub(crate) fn maximum_stream_bytes(&self) -> Option<u64> {
        self.options.maximum_stream_bytes
    }

    pub(crate) fn maximum_header_bytes(&self) -> u64 {
        self.options.maximum_header_bytes
    }

    /// Counts `declared` bytes of content for the entry at `path` against
    /// [`UnpackOptions::maximum_content_bytes`], before any is written.
    pub(crate) fn check_content(
        &mut self,
        path: &RelativePath,
        declared: u64,
    ) -> Result<(), UnpackError> {
        let total = self.declared.saturating_add(declared);
        if let Some(limit) = self.options.maximum_content_bytes {
            if total > limit {
                return Err(UnpackError::EntryTooLarge {
                    entry: path.display(),
                    declared,
                    limit,
                });
            }
        }
        self.declared = total;
        Ok(())
    }

    fn absolute(&self, path: &RelativePath) -> PathBuf {
        self.root.join(path.to_path())
    }

    fn io_error(&self, path: &RelativePath) -> impl Fn(std::io::Error) -> UnpackError + '_ {
        let absolute = self.absolute(path);
        move |source| UnpackError::Write {
            path: absolute.clone(),
            source,
        }
    }

    fn record(&mut self, path: &RelativePath) {
        self.entries += 1;
        let mut current = path.clone();
        loop {
            if !self.layer_paths.insert(current.clone()) {
                break;
            }
            match current.parent() {
                Some(parent) => current = parent,
                None => break,
            }
        }
    }

    /// Step 2: makes sure the parents of `path` are real directories.
    fn prepare_parents(&mut self, path: &RelativePath, create: bool) -> Result<bool, UnpackError> {
        let mut current = self.root.clone();
        let count = path.0.len().saturating_sub(1);
        for (index, component) in path.0[..count].iter().enumerate() {
            current.push(component);
            match std::fs::symlink_metadata(&current) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(UnpackError::unsafe_entry(
                        path.display(),
                        format!(
                            "would write through the symlink `{}`",
                            RelativePath(path.0[..=index].to_vec()).display()
                        ),
                    ));
                }
                Ok(_) => {
                    return Err(UnpackError::unsafe_entry(
                        path.display(),
                        format!(
                            "parent `{}` is not a directory",
                            RelativePath(path.0[..=index].to_vec()).display()
                        ),
                    ));
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    std::fs::create_dir(&current).map_err(|source| UnpackError::Write {
                        path: current.clone(),
                        source,
                    })?;
                    std::fs::set_permissions(&current, std::fs::Permissions::from_mode(0o755))
                        .map_err(|source| UnpackError::Write {
                            path: current.clone(),
                            source,
                        })?;
                }
                Err(source) => {
                    return Err(UnpackError::Write {
                        path: current.clone(),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Step 3: clears the slot for a new object. Returns whether a directory
    /// was kept (a directory entry over an existing directory).
    fn clear_slot(&self, path: &RelativePath, new_is_dir: bool) -> Result<bool, UnpackError> {
        let absolute = self.absolute(path);
        match std::fs::symlink_metadata(&absolute) {
            Ok(metadata) if metadata.is_dir() => {
                if new_is_dir {
                    return Ok(true);
                }
                std::fs::remove_dir_all(&absolute).map_err(self.io_error(path))?;
            }
            Ok(_) => std::fs::remove_file(&absolute).map_err(self.io_error(path))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(self.io_error(path)(error)),
        }
        Ok(false)
    }

    fn apply_metadata(
        &self,
        path: &RelativePath,
        metadata: &Metadata,
        is_symlink: bool,
    ) -> Result<(), UnpackError> {
        let absolute = self.absolute(path);
        if self.options.preserve_owners {
            std::os::unix::fs::lchown(&absolute, Some(metadata.uid), Some(metadata.gid))
                .map_err(self.io_error(path))?;
        }
        if !is_symlink {
            // After chown, which clears set-id bits.
            std::fs::set_permissions(
                &absolute,
                std::fs::Permissions::from_mode(metadata.mode & 0o7777),
            )
            .map_err(self.io_error(path))?;
        }
        // After chown, which clears security.capability.
        for (name, value) in &metadata.xattrs {
            set_xattr(&absolute, name, value).map_err(|source| UnpackError::Xattr {
                path: absolute.clone(),
                name: name.to_string_lossy().into_owned(),
                source,
            })?;
        }
        Ok(())
    }

    pub(crate) fn directory(
        &mut self,
        path: &RelativePath,
        metadata: &Metadata,
    ) -> Result<(), UnpackError> {
        if !path.0.is_empty() {
            self.prepare_parents(path, true)?;
            if !self.clear_slot(path, true)? {
                std::fs::create_dir(self.absolute(path)).map_err(self.io_error(path))?;
            }
        }
        self.apply_metadata(path, metadata, false)?;
        self.record(path);
        Ok(())
    }

    /// A regular file of `declared` bytes (what the archive or directory
    /// says; `content` yields at most that many). Runs of zeros become holes.
    pub(crate) fn file(
        &mut self,
        path: &RelativePath,
        metadata: &Metadata,
        declared: u64,
        content: &mut dyn Read,
    ) -> Result<(), UnpackError> {
        if path.0.is_empty() {
            return Err(UnpackError::unsafe_entry(
                ".",
                "a file in place of the root",
            ));
        }
        self.check_content(path, declared)?;
        self.prepare_parents(path, true)?;
        self.clear_slot(path, false)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.absolute(path))
            .map_err(self.io_error(path))?;
        let written =
            copy_sparse(&mut content.take(declared), &mut file).map_err(|error| match error {
                CopyError::Read(source) => UnpackError::ReadEntry {
                    entry: path.display(),
                    source,
                },
                CopyError::Write(source) => self.io_error(path)(source),
            })?;
        if let Some(modified) = metadata.modified {
            file.set_modified(modified).map_err(self.io_error(path))?;
        }
        drop(file);
        self.bytes += written;
        self.apply_metadata(path, metadata, false)?;
        self.record(path);
        Ok(())
    }

    pub(crate) fn symlink(
        &mut self,
        path: &RelativePath,
        target: &Path,
        metadata: &Metadata,
    ) -> Result<(), UnpackError> {
        if path.0.is_empty() {
            return Err(UnpackError::unsafe_entry(
                ".",
                "a symlink in place of the root",
            ));
        }
        if target.as_os_str().is_empty() || target.as_os_str().as_bytes().contains(&0) {
            return Err(UnpackError::unsafe_entry(
                path.display(),
                "empty symlink target",
            ));
        }
        self.check_symlink_target(path, target)?;
        self.prepare_parents(path, true)?;
        self.clear_slot(path, false)?;
        std::os::unix::fs::symlink(target, self.absolute(path)).map_err(self.io_error(path))?;
        self.apply_metadata(path, metadata, true)?;
        self.record(path);
        Ok(())
    }

    pub(crate) fn hard_link(
        &mut self,
        path: &RelativePath,
        target: &RelativePath,
    ) -> Result<(), UnpackError> {
        let refuse = |reason: String| UnpackError::unsafe_entry(path.display(), reason);
        if path.0.is_empty() || target.0.is_empty() {
            return Err(refuse("hard link to or in place of the root".to_owned()));
        }
        if !self.prepare_parents(target, false)? {
            return Err(refuse(format!(
                "hard link to `{}`, which does not exist",
                target.display()
            )));
        }
        let target_absolute = self.absolute(target);
        match std::fs::symlink_metadata(&target_absolute) {
            Ok(metadata) if metadata.is_dir() => {
                return Err(refuse(format!(
                    "hard link to the directory `{}`",
                    target.display()
                )));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(refuse(format!(
                    "hard link to `{}`, which does not exist",
                    target.display()
                )));
            }
        }
        if path == target {
            self.record(path);
            return Ok(());
        }
        self.prepare_parents(path, true)?;
        self.clear_slot(path, false)?;
        std::fs::hard_link(&target_absolute, self.absolute(path)).map_err(self.io_error(path))?;
        self.record(path);
        Ok(())
    }

    pub(crate) fn special(
        &mut self,
        path: &RelativePath,
        kind: SpecialKind,
        device: (u32, u32),
        metadata: &Metadata,
    ) -> Result<(), UnpackError> {
        let what = match kind {
            SpecialKind::Character => "character device",
            SpecialKind::Block => "block device",
            SpecialKind::Fifo => "FIFO",
        };
        if !self.options.allow_devices {
            return Err(UnpackError::unsafe_entry(
                path.display(),
                format!("{what} (device nodes are not allowed)"),
            ));
        }
        if path.0.is_empty() {
            return Err(UnpackError::unsafe_entry(
                ".",
                format!("{what} in place of the root"),
            ));
        }
        self.prepare_parents(path, true)?;
        self.clear_slot(path, false)?;
        let flag = match kind {
            SpecialKind::Character => nix::sys::stat::SFlag::S_IFCHR,
            SpecialKind::Block => nix::sys::stat::SFlag::S_IFBLK,
            SpecialKind::Fifo => nix::sys::stat::SFlag::S_IFIFO,
        };
        nix::sys::stat::mknod(
            &self.absolute(path),
            flag,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(u64::from(device.0), u64::from(device.1)),
        )
        .map_err(|errno| self.io_error(path)(errno.into()))?;
        self.apply_metadata(path, metadata, false)?;
        self.record(path);
        Ok(())
    }

    /// Notes an OCI whiteout (`.wh.NAME` or `.wh..wh..opq` in `directory`);
    /// applied by [`Tree::end_layer`].
    pub(crate) fn whiteout(&mut self, path: &RelativePath) -> Result<(), UnpackError> {
        let Some(name) = path.file_name().map(OsStr::as_bytes) else {
            return Ok(());
        };
        let directory = path.parent().unwrap_or(RelativePath(Vec::new()));
        if name == b".wh..wh..opq" {
            self.whiteouts.push(Whiteout::Opaque(directory));
            return Ok(());
        }
        let hidden = &name[b".wh.".len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(UnpackError::unsafe_entry(
                path.display(),
                "whiteout of no name",
            ));
        }
        let mut target = directory;
        target.0.push(OsStr::from_bytes(hidden).to_owned());
        self.whiteouts.push(Whiteout::Remove(target));
        self.entries += 1;
        Ok(())
    }

    /// Applies the layer's whiteouts to what lower layers left (never to the
    /// layer's own entries) and starts a new layer.
    pub(crate) fn end_layer(&mut self) -> Result<(), UnpackError> {
        for whiteout in std::mem::take(&mut self.whiteouts) {
            match whiteout {
                Whiteout::Remove(target) => {
                    if self.layer_paths.contains(&target)
                        || !self.prepare_parents(&target, false)?
                    {
                        continue;
                    }
                    self.clear_slot(&target, false)?;
                }
                Whiteout::Opaque(directory) => {
                    if !directory.0.is_empty() && !self.prepare_parents(&directory, false)? {
                        continue;
                    }
                    self.remove_lower_children(&directory)?;
                }
            }
        }
        self.layer_paths.clear();
        Ok(())
    }

    fn remove_lower_children(&self, directory: &RelativePath) -> Result<(), UnpackError> {
        let absolute = self.absolute(directory);
        match std::fs::symlink_metadata(&absolute) {
            Ok(metadata) if metadata.is_dir() => {}
            _ => return Ok(()),
        }
        for entry in std::fs::read_dir(&absolute).map_err(self.io_error(directory))? {
            let entry = entry.map_err(self.io_error(directory))?;
            let mut child = directory.clone();
            child.0.push(entry.file_name());
            if !self.layer_paths.contains(&child) {
                self.clear_slot(&child, false)?;
            } else if entry.file_type().map_err(self.io_error(&child))?.is_dir() {
                self.remove_lower_children(&child)?;
            }
        }
        Ok(())
    }

    /// Step 4 for one link at `path` pointing at `target`.
    fn check_symlink_target(&self, path: &RelativePath, target: &Path) -> Result<(), UnpackError> {
        let mut stack: Vec<OsString> = path.parent().map(|parent| parent.0).unwrap_or_default();
        let mut pending: VecDeque<OsString> = VecDeque::new();
        push_front_components(&mut stack, &mut pending, target);
        let mut hops = 0;
        while let Some(component) = pending.pop_front() {
            if component == ".." {
                if stack.pop().is_none() {
                    return Err(UnpackError::unsafe_entry(
                        path.display(),
                        format!("symlink to `{}` escapes the root", target.display()),
                    ));
                }
                continue;
            }
            stack.push(component);
            let here = self.root.join(stack.iter().collect::<PathBuf>());
            if let Ok(next) = std::fs::read_link(&here) {
                hops += 1;
                if hops > MAXIMUM_LINK_HOPS {
                    // A loop stays inside the root; the guest sees ELOOP.
                    return Ok(());
                }
                stack.pop();
                push_front_components(&mut stack, &mut pending, &next);
            }
        }
        Ok(())
    }

    /// Step 4 again over the whole finished tree.
    pub(crate) fn check_all_symlinks(&self) -> Result<(), UnpackError> {
        let mut pending = vec![RelativePath(Vec::new())];
        while let Some(directory) = pending.pop() {
            let absolute = self.absolute(&directory);
            for entry in std::fs::read_dir(&absolute).map_err(self.io_error(&directory))? {
                let entry = entry.map_err(self.io_error(&directory))?;
                let mut child = directory.clone();
                child.0.push(entry.file_name());
                let file_type = entry.file_type().map_err(self.io_error(&child))?;
                if file_type.is_dir() {
                    pending.push(child);
                } else if file_type.is_symlink() {
                    let target = std::fs::read_link(entry.path()).map_err(self.io_error(&child))?;
                    self.check_symlink_target(&child, &target)?;
                }
            }
        }
        Ok(())
    }
}

enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies `content` into `file`, seeking over blocks of zeros so that
/// holes (a sparse entry's, or any run of zeros) take no disk space.
fn copy_sparse(content: &mut dyn Read, file: &mut std::fs::File) -> Result<u64, CopyError> {
    use std::io::{Seek, SeekFrom, Write};
    const CHUNK: usize = 64 * 1024;
    let mut buffer = vec![0_u8; CHUNK];
    let mut total: u64 = 0;
    let mut ends_in_hole = false;
    loop {
        let read = match content.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(CopyError::Read(error)),
        };
        let chunk = &buffer[..read];
        if chunk.iter().all(|byte| *byte == 0) {
            file.seek(SeekFrom::Current(read as i64))
                .map_err(CopyError::Write)?;
            ends_in_hole = true;
        } else {
            file.write_all(chunk).map_err(CopyError::Write)?;
            ends_in_hole = false;
        }
        total += read as u64;
    }
    if ends_in_hole {
        file.set_len(total).map_err(CopyError::Write)?;
    }
    Ok(total)
}

/// Queues `target`'s components before the pending ones; an absolute
/// target restarts from the root.
fn push_front_components(
    stack: &mut Vec<OsString>,
    pending: &mut VecDeque<OsString>,
    target: &Path,
) {
    let mut components = Vec::new();
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => stack.clear(),
            Component::CurDir => {}
            Component::ParentDir => components.push(OsString::from("..")),
            Component::Normal(name) => components.push(name.to_owned()),
        }
    }
    for component in components.into_iter().rev() {
        pending.push_front(component);
    }
}

#[allow(unsafe_code)]
fn set_xattr(path: &Path, name: &OsStr, value: &[u8]) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated CStrings and `value` is a valid
    // slice; all outlive the call, which only reads them. `lsetxattr` does
    // not follow a symlink at `path`.
    let result = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The extended attributes of `path` (not following a symlink there), for
/// copying a directory source. A file system without xattrs has none.
#[allow(unsafe_code)]
pub(crate) fn read_xattrs(path: &Path) -> std::io::Result<Vec<(OsString, Vec<u8>)>> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut names = vec![0_u8; 4096];
    // SAFETY: `path` is NUL-terminated and `names` is writable for the
    // length passed; both outlive the call.
    let length = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let Ok(length) = usize::try_from(length) else {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(error),
        };
    };
    let mut attributes = Vec::new();
    for name in names[..length]
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
    {
        let name = std::ffi::CString::new(name)?;
        let mut value = vec![0_u8; 65536];
        // SAFETY: as above; `name` is NUL-terminated, `value` writable for its length.
        let size = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let Ok(size) = usize::try_from(size) else {
            return Err(std::io::Error::last_os_error());
        };
        value.truncate(size);
        attributes.push((OsStr::from_bytes(name.as_bytes()).to_owned(), value));
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_or_refused() {
        let parse = |raw: &str| RelativePath::parse(raw.as_bytes()).map(|path| path.display());
        assert_eq!(parse("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(parse("./").unwrap(), ".");
        for hostile in ["../a", "a/../b", "a/..", "/etc/passwd", "//x"] {
            let error = parse(hostile).unwrap_err();
            assert!(error.to_string().contains(hostile), "{error}");
        }
    }

    #[test]
    fn symlink_targets_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let options = UnpackOptions::default();
        let tree = Tree::new(root.path().to_owned(), &options);
        let at = |path: &str| RelativePath::parse(path.as_bytes()).unwrap();
        let check =
            |link: &str, target: &str| tree.check_symlink_target(&at(link), Path::new(target));
        check("a/b/l", "../../x").unwrap();
        check("l", "/usr/bin/../lib").unwrap();
        check("l", "/").unwrap();
        check("a/l", "../../x").unwrap_err();
        check("l", "/..").unwrap_err();
        check("l", "a/../../x").unwrap_err();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::os::unix::fs::symlink("/", root.path().join("d/top")).unwrap();
        check("l", "d/top/x").unwrap();
        check("l", "d/top/..").unwrap_err();
        std::os::unix::fs::symlink("loop", root.path().join("loop")).unwrap();
        check("l", "loop/x").unwrap();
    }
}
