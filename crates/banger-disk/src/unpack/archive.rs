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
    let header_limit = tree.maximum_header_bytes();
    let oversize = std::rc::Rc::new(std::cell::Cell::new(None));
    let guarded = HeaderGuard::new(limited, header_limit, oversize.clone());
    let result = apply_entries(guarded, tree, layer);
    match (result, limit, oversize.get()) {
        (Err(_), Some(limit), _) if exceeded.get() => Err(UnpackError::TooLarge { limit }),
        (Err(_), _, Some((what, size))) => Err(UnpackError::HeaderTooLarge {
            what,
            size,
            limit: header_limit,
        }),
        (result, _, _) => result,
    }
}

const BLOCK: u64 = 512;

/// The header limit while indexing an outer archive (a `docker save` tar),
/// which is read before the options apply: the default's.
const OUTER_HEADER_LIMIT: u64 = 1 << 20;

/// Where [`HeaderGuard`] is in the tar framing.
enum Framing {
    /// Collecting a 512-byte header block.
    Header,
    /// Collecting a GNU sparse extension block; then `data` bytes follow.
    SparseExtension { data: u64 },
    /// Collecting a PAX extended header's records, then `padding`.
    Pax { remaining: u64, padding: u64 },
    /// Passing over an entry's data (padding included).
    Data { remaining: u64 },
    /// After the end-of-archive block: nothing more is looked at.
    Done,
}

/// Follows the tar framing of the raw stream (headers, GNU sparse
/// extension blocks, PAX records that change the next entry's size) and
/// fails the read, before the tar crate buffers anything, when a GNU
/// long-name/long-link or PAX header declares more than `limit` bytes.
/// It only watches: the bytes pass through unchanged.
struct HeaderGuard<R> {
    inner: R,
    limit: u64,
    framing: Framing,
    block: Vec<u8>,
    pax: Vec<u8>,
    /// A PAX `size` record for the next entry.
    pax_size: Option<u64>,
    oversize: std::rc::Rc<std::cell::Cell<Option<(&'static str, u64)>>>,
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// A tar numeric field: octal, or base-256 when the high bit is set.
fn numeric_field(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|byte| byte & 0x80 != 0) {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &byte in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(byte))?;
        }
        return Some(value);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .filter(|byte| *byte != 0 && *byte != b' ')
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

/// The `size` record of PAX extended header data, if any.
fn pax_size(records: &[u8]) -> Option<u64> {
    let mut rest = records;
    let mut size = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|byte| *byte == b' ')?;
        let length: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        let record = rest.get(space + 1..length)?;
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"size=") {
            size = std::str::from_utf8(value).ok()?.parse().ok();
        }
        rest = &rest[length..];
    }
    size
}

impl<R: Read> HeaderGuard<R> {
    fn new(
        inner: R,
        limit: u64,
        oversize: std::rc::Rc<std::cell::Cell<Option<(&'static str, u64)>>>,
    ) -> Self {
        Self {
            inner,
            limit,
            framing: Framing::Header,
            block: Vec::with_capacity(BLOCK as usize),
            pax: Vec::new(),
            pax_size: None,
            oversize,
        }
    }

    fn refuse(&self, what: &'static str, size: u64) -> std::io::Error {
        self.oversize.set(Some((what, size)));
        std::io::Error::other(format!("{what} of {size} bytes is too large"))
    }

    /// Reads one complete header block.
    fn header(&mut self) -> std::io::Result<()> {
        let block = std::mem::take(&mut self.block);
        if block.iter().all(|byte| *byte == 0) {
            self.framing = Framing::Done;
            return Ok(());
        }
        let kind = block[156];
        let size = numeric_field(&block[124..136])
            .ok_or_else(|| std::io::Error::other("invalid size field in a tar header"))?;
        let extension = match kind {
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link name"),
            b'x' => Some("PAX extended header"),
            b'g' => Some("PAX global header"),
            _ => None,
        };
        self.framing = match extension {
            Some(what) if size > self.limit => return Err(self.refuse(what, size)),
            Some(_) if kind == b'x' => Framing::Pax {
                remaining: size,
                padding: padded(size) - size,
            },
            Some(_) => Framing::Data {
                remaining: padded(size),
            },
            None => {
                let size = self.pax_size.take().unwrap_or(size);
                // GNU sparse with more map blocks after the header.
                if kind == b'S' && block[482] != 0 {
                    Framing::SparseExtension { data: padded(size) }
                } else {
                    Framing::Data {
                        remaining: padded(size),
                    }
                }
            }
        };
        Ok(())
    }

    /// Follows the framing over `bytes`, just read from the stream.
    fn watch(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.framing {
                Framing::Done => return Ok(()),
                Framing::Data { remaining } => {
                    let step = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *remaining -= step as u64;
                    bytes = &bytes[step..];
                    if *remaining == 0 {
                        self.framing = Framing::Header;
                    }
                }
                Framing::Pax { remaining, padding } => {
                    let step = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    self.pax.extend_from_slice(&bytes[..step]);
                    *remaining -= step as u64;
                    bytes = &bytes[step..];
                    if *remaining == 0 {
                        let padding = *padding;
                        self.pax_size = pax_size(&std::mem::take(&mut self.pax));
                        self.framing = if padding == 0 {
                            Framing::Header
                        } else {
                            Framing::Data { remaining: padding }
                        };
                    }
                }
                Framing::Header | Framing::SparseExtension { .. } => {
                    let step = (BLOCK as usize - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..step]);
                    bytes = &bytes[step..];
                    if self.block.len() == BLOCK as usize {
                        match self.framing {
                            Framing::SparseExtension { data } => {
                                let more = self.block[504] != 0;
                                self.block.clear();
                                if !more {
                                    self.framing = if data == 0 {
                                        Framing::Header
                                    } else {
                                        Framing::Data { remaining: data }
                                    };
                                }
                            }
                            _ => self.header()?,
                        }
                        if let Framing::Data { remaining: 0 } = self.framing {
                            self.framing = Framing::Header;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.watch(&buffer[..read])?;
        Ok(read)
    }
}

/// The tar crate seeks only forward over entry data (`SeekFrom::Current`);
/// the guard follows. Any other seek would lose the framing and is refused.
impl<R: Read + std::io::Seek> std::io::Seek for HeaderGuard<R> {
    fn seek(&mut self, position: std::io::SeekFrom) -> std::io::Result<u64> {
        let std::io::SeekFrom::Current(amount) = position else {
            return Err(std::io::Error::other("unexpected seek in a tar stream"));
        };
        let amount = u64::try_from(amount)
            .map_err(|_| std::io::Error::other("unexpected seek backwards in a tar stream"))?;
        match &mut self.framing {
            Framing::Data { remaining } if amount <= *remaining => {
                *remaining -= amount;
                if *remaining == 0 {
                    self.framing = Framing::Header;
                }
            }
            Framing::Done => {}
            _ if amount == 0 => {}
            _ => return Err(std::io::Error::other("unexpected seek in a tar stream")),
        }
        self.inner.seek(position)
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
                // For GNU sparse entries the tar crate reports the real size.
                let (declared, pax_sparse) = declared_size(&mut entry, &path)?;
                if pax_sparse {
                    tree.check_content(&path, declared)?;
                    return Err(UnpackError::unsafe_entry(
                        path.display(),
                        "PAX sparse file (GNU.sparse.* records) is not supported; \
                         make the archive without --sparse",
                    ));
                }
                tree.file(&path, &metadata, declared, &mut entry)?;
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

/// The content size an entry declares: its size, or for a PAX sparse file
/// (`GNU.sparse.*` records, which the tar crate does not expand) the real
/// size it names. A PAX sparse file is checked against the limit, then
/// refused: unpacked as it is it would be its sparse map, not its content.
fn declared_size<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &RelativePath,
) -> Result<(u64, bool), UnpackError> {
    let stored = entry.size();
    let read_error = |source| UnpackError::ReadEntry {
        entry: path.display(),
        source,
    };
    let Some(extensions) = entry.pax_extensions().map_err(read_error)? else {
        return Ok((stored, false));
    };
    let mut sparse = None;
    for extension in extensions {
        let extension = extension.map_err(read_error)?;
        let Ok(key) = extension.key() else { continue };
        if matches!(key, "GNU.sparse.realsize" | "GNU.sparse.size") {
            let real = extension
                .value()
                .ok()
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            sparse = Some(sparse.map_or(real, |known: u64| known.max(real)));
        } else if key.starts_with("GNU.sparse.") {
            sparse = Some(sparse.unwrap_or(0));
        }
    }
    Ok(match sparse {
        None => (stored, false),
        Some(real) => (real.max(stored), true),
    })
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
    let oversize = std::rc::Rc::new(std::cell::Cell::new(None));
    let guarded = HeaderGuard::new(file, OUTER_HEADER_LIMIT, oversize.clone());
    let mut archive = tar::Archive::new(guarded);
    let mut members = std::collections::HashMap::new();
    let failed = |source: std::io::Error| match oversize.get() {
        Some((what, size)) => UnpackError::HeaderTooLarge {
            what,
            size,
            limit: OUTER_HEADER_LIMIT,
        },
        None => read_error(source),
    };
    for entry in archive.entries_with_seek().map_err(failed)? {
        let entry = entry.map_err(failed)?;
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
