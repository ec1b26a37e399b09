//! Unpacking untrusted image sources into a staging directory.
//!
//! [`unpack`] takes a tarball (plain, gzip or zstd, sniffed by magic; e.g.
//! `docker export` output), a directory tree, an OCI image layout directory
//! or a `docker save` archive, and writes the root file system it describes
//! into a new staging directory. The staging tree then goes to
//! `ext4::build_from_directory`.
//!
//! Protocol:
//! 1. [`detect`] the source kind.
//! 2. Create the staging directory (it must not exist).
//! 3. Feed every entry (every layer's, in order, for OCI and `docker save`)
//!    through the tree writer, which validates paths and links itself
//!    (see `tree.rs`): the tar crate only iterates entries, it never writes.
//!    Each tar stream is bounded before the tar crate reads it (see
//!    `archive.rs`): its length, the size of each long-name and PAX header
//!    (watched on the raw blocks, so no huge header is ever buffered), and
//!    the content files declare (sparse files at their real size) against
//!    [`UnpackOptions::maximum_content_bytes`]. Runs of zeros are written
//!    as holes.
//!    Layers honour whiteouts (`.wh.NAME`) and opaque directories
//!    (`.wh..wh..opq`) against lower layers; OCI blobs are checked against
//!    their sha256 digests.
//! 4. Re-check every symlink in the finished tree.
//! 5. Any error removes the staging directory: nothing partial is left.

mod archive;
mod directory;
mod oci;
mod tree;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("Refused entry `{entry}`: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read entry `{entry}`")]
    ReadEntry {
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to set extended attribute {name} on {path}")]
    Xattr {
        path: PathBuf,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Staging directory {path} already exists")]
    StagingExists { path: PathBuf },
    #[error("{path} is an ext4 image; import it as it is")]
    Ext4Image { path: PathBuf },
    #[error("{path} is not a tar archive (plain, gzip or zstd), a directory, or an OCI layout")]
    UnknownFormat { path: PathBuf },
    #[error("Invalid image {path}: {reason}")]
    InvalidImage { path: PathBuf, reason: String },
    #[error("Unpacked content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("Entry `{entry}` declares {declared} bytes of content, which takes the image over the limit of {limit} bytes")]
    EntryTooLarge {
        entry: String,
        declared: u64,
        limit: u64,
    },
    #[error("Archive header {what} of {size} bytes exceeds the limit of {limit} bytes")]
    HeaderTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("Blob {digest} does not match its digest (got {actual})")]
    DigestMismatch { digest: String, actual: String },
}

impl UnpackError {
    pub(crate) fn unsafe_entry(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::UnsafeEntry {
            entry: entry.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::InvalidImage {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Create device nodes and FIFOs instead of refusing them.
    pub allow_devices: bool,
    /// Give files their archive's numeric owners (needs root); otherwise
    /// they belong to the caller.
    pub preserve_owners: bool,
    /// Refuse a tar stream (one layer, after decompression) longer than
    /// this, so a decompression bomb cannot fill the disk. `None`: no limit.
    pub maximum_stream_bytes: Option<u64>,
    /// Refuse an import whose files declare more content than this, all
    /// layers together: a file's declared size counts (for a sparse file its
    /// real size, holes included), not the bytes it takes in the archive, so
    /// a tiny archive with a huge hole is refused before it is written.
    /// `None`: no limit.
    pub maximum_content_bytes: Option<u64>,
    /// Refuse a long-name, long-link or PAX extended header larger than
    /// this, checked on the raw stream before the tar reader buffers it.
    pub maximum_header_bytes: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            allow_devices: false,
            preserve_owners: true,
            maximum_stream_bytes: Some(64 << 30),
            maximum_content_bytes: Some(64 << 30),
            maximum_header_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What an import source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// An ext4 image: imported as it is, not unpacked.
    Ext4,
    /// A root file system tarball (`docker export`).
    Tar(Compression),
    Directory,
    /// A directory with `oci-layout` and `index.json`.
    OciLayout,
    /// A `docker save` tar (top-level `manifest.json`).
    DockerArchive,
}

impl SourceKind {
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4 image",
            Self::Tar(Compression::None) => "tar archive",
            Self::Tar(Compression::Gzip) => "gzip tar archive",
            Self::Tar(Compression::Zstd) => "zstd tar archive",
            Self::Directory => "directory",
            Self::OciLayout => "OCI image layout",
            Self::DockerArchive => "docker save archive",
        }
    }
}

/// What [`unpack`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackReport {
    pub kind: SourceKind,
    /// Layers applied (1 for a plain tarball or directory).
    pub layers: usize,
    /// Entries written, including whiteouts.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Tells what `source` is by looking at it (magic numbers, marker files).
///
/// # Errors
/// [`UnpackError::Read`] or [`UnpackError::UnknownFormat`].
pub fn detect(source: &Path) -> Result<SourceKind, UnpackError> {
    let read_error = |error| UnpackError::Read {
        path: source.to_owned(),
        source: error,
    };
    let metadata = std::fs::metadata(source).map_err(read_error)?;
    if metadata.is_dir() {
        return Ok(
            if source.join("oci-layout").is_file() && source.join("index.json").is_file() {
                SourceKind::OciLayout
            } else {
                SourceKind::Directory
            },
        );
    }
    let file = File::open(source).map_err(read_error)?;
    let mut head = [0_u8; 1082];
    let filled = read_up_to(&file, &mut head).map_err(read_error)?;
    let head = &head[..filled];
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xEF] {
        return Ok(SourceKind::Ext4);
    }
    if head.starts_with(&GZIP_MAGIC) {
        return Ok(SourceKind::Tar(Compression::Gzip));
    }
    if head.starts_with(&ZSTD_MAGIC) {
        return Ok(SourceKind::Tar(Compression::Zstd));
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(if archive::has_top_level_file(source, "manifest.json")? {
            SourceKind::DockerArchive
        } else {
            SourceKind::Tar(Compression::None)
        });
    }
    Err(UnpackError::UnknownFormat {
        path: source.to_owned(),
    })
}

fn read_up_to(file: &File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], filled as u64)? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

/// Wraps `reader` in a decompressor chosen by its first bytes.
pub(crate) fn decompressed<'a>(
    mut reader: Box<dyn BufRead + 'a>,
    name: &Path,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let head = reader.fill_buf().map_err(|source| UnpackError::Read {
        path: name.to_owned(),
        source,
    })?;
    if head.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&ZSTD_MAGIC) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
            .map_err(|error| UnpackError::invalid(name, format!("bad zstd stream: {error}")))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(reader))
    }
}

/// A reader telling `progress` how many bytes were read through it; an
/// error when `progress` answers `false`.
struct Counting<'a, R> {
    inner: R,
    read: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64) -> bool,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.read += count as u64;
        if (self.progress)(self.read, self.total) {
            Ok(count)
        } else {
            Err(std::io::Error::other("stopped"))
        }
    }
}

/// Removes the staging directory when dropped unless disarmed.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Unpacks `source` into the new directory `staging` (see the module
/// protocol). On error `staging` is gone.
///
/// # Errors
/// [`UnpackError::UnsafeEntry`] naming the first refused entry, or the
/// I/O or format error met.
pub fn unpack(
    source: &Path,
    staging: &Path,
    options: &UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    unpack_reporting(source, staging, options, &mut |_, _| true)
}

/// [`unpack`], calling `progress(bytes of the archive read, its length)`
/// as a tarball (plain or compressed) is read; OCI layouts, `docker save`
/// archives and directories report nothing. When `progress` answers
/// `false` the unpack stops with a read error (and `staging` is gone).
///
/// # Errors
/// As [`unpack`].
pub fn unpack_reporting(
    source: &Path,
    staging: &Path,
    options: &UnpackOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<UnpackReport, UnpackError> {
    let kind = detect(source)?;
    if kind == SourceKind::Ext4 {
        return Err(UnpackError::Ext4Image {
            path: source.to_owned(),
        });
    }
    match std::fs::create_dir(staging) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(UnpackError::StagingExists {
                path: staging.to_owned(),
            })
        }
        Err(error) => {
            return Err(UnpackError::Write {
                path: staging.to_owned(),
                source: error,
            })
        }
    }
    let mut guard = RemoveOnDrop(Some(staging));
    let mut tree = tree::Tree::new(staging.to_owned(), options);
    let layers = match kind {
        SourceKind::Tar(_) => {
            let file = File::open(source).map_err(|error| UnpackError::Read {
                path: source.to_owned(),
                source: error,
            })?;
            let total = file.metadata().map_or(0, |metadata| metadata.len());
            let counted = Counting {
                inner: file,
                read: 0,
                total,
                progress,
            };
            let reader =
                decompressed(Box::new(BufReader::with_capacity(1 << 20, counted)), source)?;
            archive::apply(reader, &mut tree, false)?;
            1
        }
        SourceKind::Directory => {
            directory::copy_tree(source, &mut tree)?;
            1
        }
        SourceKind::OciLayout => oci::apply_layout(source, &mut tree)?,
        SourceKind::DockerArchive => oci::apply_docker_archive(source, &mut tree)?,
        SourceKind::Ext4 => unreachable!("refused above"),
    };
    tree.check_all_symlinks()?;
    let report = UnpackReport {
        kind,
        layers,
        entries: tree.entries,
        bytes: tree.bytes,
    };
    guard.0 = None;
    Ok(report)
}
