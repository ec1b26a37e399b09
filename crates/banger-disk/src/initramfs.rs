//! Initramfs images that boot an arbitrary root file system with the guest
//! agent as `/init`.
//!
//! An image is a gzip-compressed `newc` cpio archive. Building one for a
//! Debian kernel:
//!
//! 1. [`KernelModules::read`] reads `modules.dep` and `modules.builtin` of a
//!    modules directory (`/lib/modules/<release>`).
//! 2. [`KernelModules::resolve`] turns the wanted module names (by default
//!    [`REQUIRED_MODULES`] and [`OPTIONAL_MODULES`]) into files in load
//!    order: every module after its dependencies, each once, modules built
//!    into the kernel skipped. A required module that is neither a module
//!    nor built in is an error.
//! 3. [`read_modules`] reads those files, and [`agent_initramfs`] packs
//!    `/init` (the static agent), the module files under
//!    `/lib/modules/<release>/`, and [`MODULE_LIST_PATH`] naming
//!    them one absolute path per line in load order. `.ko.gz` and `.ko.zst`
//!    are decompressed while packing (the whole archive is gzipped anyway);
//!    `.ko.xz` is kept and the agent loads it with `finit_module`'s
//!    `MODULE_INIT_COMPRESSED_FILE`, which Debian kernels that ship xz
//!    modules support.
//! 4. [`Initramfs::write_gzip`] writes the archive; parents of every entry
//!    are created implicitly, so adding a file is one call.
//!
//! Every file of a modules directory or kernel package is read through a
//! [`ConfinedDir`]: beneath the directory (no `..`, absolute or escaping
//! symlinks, or magic links), regular files only, at most
//! [`MODULE_INDEX_LIMIT`] / [`MODULE_LIMIT`] bytes (decompressed too), with
//! the calling thread's rights. A daemon building one for a caller runs
//! steps 1-2 and [`read_modules`] on a thread with the caller's filesystem
//! identity.
//!
//! The `newc` writer is small and written here: the archive needs only
//! directories, regular files and device nodes, and the crates that offer
//! one add nothing over these few lines. [`parse_newc`] reads an archive
//! back, for tests and inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::confined::{read_limited, ConfinedDir, ConfinedError};

/// Modules the agent needs to find its root disk, network, console port and
/// vsock, and to mount ext4. Each is packed (with its dependencies) unless the
/// kernel has it built in.
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "ext4",
    "af_packet",
];

/// Packed when the kernel has them as modules; skipped silently otherwise.
/// ext4 asks for `crc32c` through the crypto API, which would need modprobe.
pub const OPTIONAL_MODULES: &[&str] = &["crc32c_generic", "crc32c_intel"];

/// The most bytes read of `modules.dep` or `modules.builtin` (Debian's are
/// well under a megabyte).
pub const MODULE_INDEX_LIMIT: u64 = 16 * 1024 * 1024;
/// The most bytes of one module file, compressed or decompressed (the
/// largest Debian modules are a few tens of megabytes).
pub const MODULE_LIMIT: u64 = 128 * 1024 * 1024;
/// The most bytes of the guest agent packed as `/init`.
pub const AGENT_LIMIT: u64 = 256 * 1024 * 1024;

/// The module list inside the archive (no leading slash).
pub const MODULE_LIST_PATH: &str = "banger/modules";

const NEWC_MAGIC: &[u8; 6] = b"070701";
const NEWC_HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const MODE_DIRECTORY: u32 = 0o040_000;
const MODE_REGULAR: u32 = 0o100_000;
const MODE_CHAR_DEVICE: u32 = 0o020_000;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line} is not `module.ko: dependencies`")]
    ParseModulesDep { path: PathBuf, line: usize },
    #[error("Kernel module {name} is neither in modules.dep nor built in ({directory})")]
    UnknownModule { name: String, directory: PathBuf },
    #[error("modules.dep in {directory} names {path}, which is not a kernel module file")]
    NotAModule { directory: PathBuf, path: String },
    #[error(transparent)]
    File(#[from] ConfinedError),
    #[error("Kernel module {path} decompresses to more than {limit} bytes")]
    DecompressedTooLarge { path: PathBuf, limit: u64 },
    #[error("Failed to decompress kernel module {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid archive path `{path}`")]
    InvalidPath { path: String },
    #[error("{path} in the archive is {size} bytes, more than newc can hold")]
    TooLarge { path: String, size: usize },
    #[error("Failed to write the initramfs")]
    Write(#[source] std::io::Error),
    #[error("Malformed newc archive at byte {offset}")]
    Malformed { offset: usize },
}

/// One module file to load, relative to the modules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Normalised name (`-` as `_`, no suffix), as `lsmod` shows it.
    pub name: String,
    /// Path relative to the modules directory, as `modules.dep` has it.
    pub relative_path: String,
}

/// The modules of one kernel release.
#[derive(Debug, Clone)]
pub struct KernelModules {
    directory: PathBuf,
    /// Module name → its file and the files it depends on.
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

impl KernelModules {
    /// Reads `modules.dep` and `modules.builtin` (absent = nothing built in)
    /// of `directory`, opened as the calling thread (see [`Self::read`]).
    ///
    /// # Errors
    /// A file cannot be read, or `modules.dep` is malformed.
    pub fn open(directory: &Path) -> Result<Self, InitramfsError> {
        Self::read(&ConfinedDir::open(directory)?)
    }

    /// Reads `modules.dep` and `modules.builtin` (absent = nothing built in)
    /// of `directory`: regular files beneath it of at most
    /// [`MODULE_INDEX_LIMIT`] bytes.
    ///
    /// # Errors
    /// A file cannot be read or is refused, or `modules.dep` is malformed.
    pub fn read(directory: &ConfinedDir) -> Result<Self, InitramfsError> {
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        let modules_dep = text(directory.read(Path::new("modules.dep"), MODULE_INDEX_LIMIT)?);
        let modules_builtin = match directory.read(Path::new("modules.builtin"), MODULE_INDEX_LIMIT)
        {
            Ok(bytes) => text(bytes),
            Err(error) if error.is_not_found() => String::new(),
            Err(error) => return Err(error.into()),
        };
        Self::parse(directory.path(), &modules_dep, &modules_builtin)
    }

    /// Parses the two files' contents; `directory` is only for messages and
    /// for [`Self::directory`].
    ///
    /// # Errors
    /// `modules.dep` is malformed.
    pub fn parse(
        directory: &Path,
        modules_dep: &str,
        modules_builtin: &str,
    ) -> Result<Self, InitramfsError> {
        let mut modules = BTreeMap::new();
        for (index, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (file, dependencies) =
                line.split_once(':')
                    .ok_or_else(|| InitramfsError::ParseModulesDep {
                        path: directory.join("modules.dep"),
                        line: index + 1,
                    })?;
            let file = file.trim();
            let name = module_name(file).ok_or_else(|| InitramfsError::NotAModule {
                directory: directory.to_owned(),
                path: file.to_owned(),
            })?;
            let dependencies = dependencies.split_whitespace().map(str::to_owned).collect();
            modules.insert(name, (file.to_owned(), dependencies));
        }
        let builtin = modules_builtin
            .lines()
            .filter_map(|line| module_name(line.trim()))
            .collect();
        Ok(Self {
            directory: directory.to_owned(),
            modules,
            builtin,
        })
    }

    #[must_use]
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The kernel release: the directory's name.
    #[must_use]
    pub fn release(&self) -> String {
        self.directory
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether the kernel has `name` built in.
    #[must_use]
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalise(name))
    }

    /// The files to load for `required` and `optional` modules, in load
    /// order (dependencies first), each once.
    ///
    /// # Errors
    /// A required module is neither a module nor built in, or a dependency
    /// named in `modules.dep` has no entry of its own.
    pub fn resolve(
        &self,
        required: &[&str],
        optional: &[&str],
    ) -> Result<Vec<ModuleFile>, InitramfsError> {
        let mut ordered = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, is_required) in required
            .iter()
            .map(|name| (name, true))
            .chain(optional.iter().map(|name| (name, false)))
        {
            let name = normalise(name);
            if self.builtin.contains(&name) {
                continue;
            }
            if !self.modules.contains_key(&name) {
                if is_required {
                    return Err(self.unknown(name));
                }
                continue;
            }
            self.visit(&name, &mut seen, &mut ordered)?;
        }
        Ok(ordered)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        ordered: &mut Vec<ModuleFile>,
    ) -> Result<(), InitramfsError> {
        // Marked before the recursion: modules.dep has no cycles, and a
        // broken one must not recurse forever.
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let (file, dependencies) = self
            .modules
            .get(name)
            .ok_or_else(|| self.unknown(name.to_owned()))?;
        for dependency in dependencies {
            let dependency_name =
                module_name(dependency).ok_or_else(|| InitramfsError::NotAModule {
                    directory: self.directory.clone(),
                    path: dependency.clone(),
                })?;
            if !self.builtin.contains(&dependency_name) {
                self.visit(&dependency_name, seen, ordered)?;
            }
        }
        ordered.push(ModuleFile {
            name: name.to_owned(),
            relative_path: file.clone(),
        });
        Ok(())
    }

    fn unknown(&self, name: String) -> InitramfsError {
        InitramfsError::UnknownModule {
            name,
            directory: self.directory.clone(),
        }
    }
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/fs/ext4/ext4.ko.xz` → `ext4`; `None` for anything not a module.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))?;
    (!stem.is_empty()).then(|| normalise(stem))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EntryKind {
    Directory,
    File(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    path: String,
    permissions: u32,
    kind: EntryKind,
}

/// An archive being put together; written by [`Self::write_gzip`].
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
    directories: BTreeSet<String>,
}

impl Initramfs {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents, mode 0755).
    ///
    /// # Errors
    /// `path` is empty, or has `.`, `..` or empty components.
    pub fn directory(&mut self, path: &str, permissions: u32) -> Result<(), InitramfsError> {
        let path = clean(path)?;
        self.parents(&path);
        if self.directories.insert(path.clone()) {
            self.entries.push(Entry {
                path,
                permissions,
                kind: EntryKind::Directory,
            });
        }
        Ok(())
    }

    /// Adds a regular file (parents created as needed).
    ///
    /// # Errors
    /// An invalid path (see [`Self::directory`]), or more than 4 GiB.
    pub fn file(
        &mut self,
        path: &str,
        permissions: u32,
        contents: Vec<u8>,
    ) -> Result<(), InitramfsError> {
        let path = clean(path)?;
        if u32::try_from(contents.len()).is_err() {
            return Err(InitramfsError::TooLarge {
                path,
                size: contents.len(),
            });
        }
        self.parents(&path);
        self.entries.push(Entry {
            path,
            permissions,
            kind: EntryKind::File(contents),
        });
        Ok(())
    }

    /// Adds a copy of the host file `source`.
    ///
    /// # Errors
    /// `source` cannot be read, or [`Self::file`] refuses.
    pub fn file_from(
        &mut self,
        path: &str,
        permissions: u32,
        source: &Path,
    ) -> Result<(), InitramfsError> {
        let contents = std::fs::read(source).map_err(|error| InitramfsError::Read {
            path: source.to_owned(),
            source: error,
        })?;
        self.file(path, permissions, contents)
    }

    /// Adds a character device node.
    ///
    /// # Errors
    /// An invalid path.
    pub fn char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        let path = clean(path)?;
        self.parents(&path);
        self.entries.push(Entry {
            path,
            permissions,
            kind: EntryKind::CharDevice { major, minor },
        });
        Ok(())
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            if self.directories.insert(prefix.clone()) {
                self.entries.push(Entry {
                    path: prefix.clone(),
                    permissions: 0o755,
                    kind: EntryKind::Directory,
                });
            }
        }
    }

    /// Writes the uncompressed `newc` archive.
    ///
    /// # Errors
    /// `output` fails.
    pub fn write_newc<W: Write>(&self, mut output: W) -> Result<(), InitramfsError> {
        let mut writer = NewcWriter {
            output: &mut output,
            written: 0,
        };
        for (index, entry) in self.entries.iter().enumerate() {
            let inode = u32::try_from(index + 1).unwrap_or(u32::MAX);
            let (mode, contents, device) = match &entry.kind {
                EntryKind::Directory => (MODE_DIRECTORY, &[][..], (0, 0)),
                EntryKind::File(contents) => (MODE_REGULAR, contents.as_slice(), (0, 0)),
                EntryKind::CharDevice { major, minor } => {
                    (MODE_CHAR_DEVICE, &[][..], (*major, *minor))
                }
            };
            writer
                .entry(
                    &entry.path,
                    inode,
                    mode | (entry.permissions & 0o7777),
                    contents,
                    device,
                )
                .map_err(InitramfsError::Write)?;
        }
        writer
            .entry(TRAILER, 0, 0, &[], (0, 0))
            .map_err(InitramfsError::Write)?;
        output.flush().map_err(InitramfsError::Write)
    }

    /// Writes the archive gzip-compressed, as the kernel takes it.
    ///
    /// # Errors
    /// `output` fails.
    pub fn write_gzip<W: Write>(&self, output: W) -> Result<(), InitramfsError> {
        let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::default());
        self.write_newc(&mut encoder)?;
        encoder.finish().map_err(InitramfsError::Write)?;
        Ok(())
    }
}

fn clean(path: &str) -> Result<String, InitramfsError> {
    let trimmed = path.trim_start_matches('/');
    let valid = !trimmed.is_empty()
        && trimmed
            .split('/')
            .all(|component| !component.is_empty() && component != "." && component != "..")
        && !trimmed.contains('\0');
    if valid {
        Ok(trimmed.to_owned())
    } else {
        Err(InitramfsError::InvalidPath {
            path: path.to_owned(),
        })
    }
}

struct NewcWriter<'a, W: Write> {
    output: &'a mut W,
    written: usize,
}

impl<W: Write> NewcWriter<'_, W> {
    fn entry(
        &mut self,
        name: &str,
        inode: u32,
        mode: u32,
        contents: &[u8],
        (major, minor): (u32, u32),
    ) -> std::io::Result<()> {
        let links = if mode & 0o170_000 == MODE_DIRECTORY {
            2
        } else {
            1
        };
        let size = u32::try_from(contents.len()).unwrap_or(u32::MAX);
        let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check. mtime 0 keeps builds reproducible.
        let header = format!(
            "070701{inode:08x}{mode:08x}{:08x}{:08x}{links:08x}{:08x}{size:08x}{:08x}{:08x}{major:08x}{minor:08x}{name_size:08x}{:08x}",
            0, 0, 0, 0, 0, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(contents)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.output.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..padding])
    }
}

/// One entry read back by [`parse_newc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewcEntry {
    pub path: String,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub contents: Vec<u8>,
    /// `(rdevmajor, rdevminor)`.
    pub device: (u32, u32),
}

/// Reads an uncompressed `newc` archive up to its trailer.
///
/// # Errors
/// The bytes are not a well-formed `newc` archive.
pub fn parse_newc(bytes: &[u8]) -> Result<Vec<NewcEntry>, InitramfsError> {
    let mut entries = Vec::new();
    let mut offset = 0;
    loop {
        let malformed = InitramfsError::Malformed { offset };
        let header = bytes
            .get(offset..offset + NEWC_HEADER_LEN)
            .ok_or(InitramfsError::Malformed { offset })?;
        if &header[..6] != NEWC_MAGIC {
            return Err(malformed);
        }
        let field = |index: usize| -> Result<u32, InitramfsError> {
            let start = 6 + index * 8;
            std::str::from_utf8(&header[start..start + 8])
                .ok()
                .and_then(|text| u32::from_str_radix(text, 16).ok())
                .ok_or(InitramfsError::Malformed { offset })
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let device = (field(9)?, field(10)?);
        let name_size = field(11)? as usize;
        let name_start = offset + NEWC_HEADER_LEN;
        let name = bytes
            .get(name_start..name_start + name_size.saturating_sub(1))
            .ok_or(InitramfsError::Malformed { offset })?;
        let path = String::from_utf8(name.to_vec()).map_err(|_| malformed)?;
        let data_start = (name_start + name_size).next_multiple_of(4);
        let contents = bytes
            .get(data_start..data_start + size)
            .ok_or(InitramfsError::Malformed { offset })?
            .to_vec();
        offset = (data_start + size).next_multiple_of(4);
        if path == TRAILER {
            return Ok(entries);
        }
        entries.push(NewcEntry {
            path,
            mode,
            contents,
            device,
        });
    }
}

/// Ungzips an initramfs and parses it with [`parse_newc`].
///
/// # Errors
/// Not gzip, or not a well-formed archive.
pub fn parse_gzip(bytes: &[u8]) -> Result<Vec<NewcEntry>, InitramfsError> {
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut archive)
        .map_err(|source| InitramfsError::Read {
            path: PathBuf::from("<initramfs>"),
            source,
        })?;
    parse_newc(&archive)
}

/// What went into an agent initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInitramfs {
    pub release: String,
    /// Absolute paths inside the archive, in load order.
    pub modules: Vec<String>,
}

/// One module file read for packing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModule {
    /// Path relative to the modules directory, without the `.gz`/`.zst`
    /// suffix when it was decompressed.
    pub relative_path: String,
    pub contents: Vec<u8>,
}

/// Builds the archive that boots a root disk with the agent as `/init`: the
/// agent, the resolved modules of `modules` and the module list. Reads every
/// file as the calling thread; see [`read_modules`] and [`agent_initramfs`]
/// to read the modules and the agent with different rights.
///
/// # Errors
/// A module cannot be resolved or read, or the agent cannot be read.
pub fn build_agent_initramfs(
    modules: &KernelModules,
    required: &[&str],
    optional: &[&str],
    agent: &Path,
) -> Result<(Initramfs, AgentInitramfs), InitramfsError> {
    let resolved = modules.resolve(required, optional)?;
    let loaded = read_modules(&ConfinedDir::open(modules.directory())?, &resolved)?;
    let agent_file = std::fs::File::open(agent).map_err(|source| InitramfsError::Read {
        path: agent.to_owned(),
        source,
    })?;
    crate::confined::check_regular(&agent_file, agent, AGENT_LIMIT)?;
    let agent = read_limited(agent_file, agent, AGENT_LIMIT)?;
    agent_initramfs(&modules.release(), &loaded, agent)
}

/// Packs `agent` as `/init`, `modules` (in load order) under
/// `/lib/modules/<release>/`, and the module list.
///
/// # Errors
/// A path is invalid, or a file too large for the archive.
pub fn agent_initramfs(
    release: &str,
    modules: &[LoadedModule],
    agent: Vec<u8>,
) -> Result<(Initramfs, AgentInitramfs), InitramfsError> {
    let mut archive = Initramfs::new();
    for directory in ["dev", "proc", "sys", "run", "tmp", "newroot"] {
        archive.directory(directory, 0o755)?;
    }
    archive.char_device("dev/console", 0o600, 5, 1)?;
    archive.char_device("dev/null", 0o666, 1, 3)?;
    archive.file("init", 0o755, agent)?;
    let mut list = String::new();
    let mut loaded = Vec::new();
    for module in modules {
        let path = format!("/lib/modules/{release}/{}", module.relative_path);
        archive.file(&path, 0o644, module.contents.clone())?;
        list.push_str(&path);
        list.push('\n');
        loaded.push(path);
    }
    archive.file(MODULE_LIST_PATH, 0o644, list.into_bytes())?;
    Ok((
        archive,
        AgentInitramfs {
            release: release.to_owned(),
            modules: loaded,
        },
    ))
}

/// Reads the `modules` files beneath `directory` (a modules directory):
/// regular files only, at most [`MODULE_LIMIT`] bytes each, compressed and
/// decompressed.
///
/// # Errors
/// A file cannot be opened beneath `directory`, is refused, or does not
/// decompress.
pub fn read_modules(
    directory: &ConfinedDir,
    modules: &[ModuleFile],
) -> Result<Vec<LoadedModule>, InitramfsError> {
    modules
        .iter()
        .map(|module| {
            let file = directory.open_file(Path::new(&module.relative_path), MODULE_LIMIT)?;
            let source = directory.path().join(&module.relative_path);
            let (relative_path, contents) = read_module(file, &source, &module.relative_path)?;
            Ok(LoadedModule {
                relative_path,
                contents,
            })
        })
        .collect()
}

/// The module's bytes and its name in the archive: `.gz`/`.zst` decompressed
/// (the name loses the suffix), anything else as it is.
fn read_module(
    file: std::fs::File,
    source: &Path,
    relative_path: &str,
) -> Result<(String, Vec<u8>), InitramfsError> {
    let reader = std::io::BufReader::new(file.take(MODULE_LIMIT + 1));
    let decompress_error = |error| InitramfsError::Decompress {
        path: source.to_owned(),
        source: error,
    };
    let decompressed = |mut decoder: Box<dyn Read + '_>| {
        let mut contents = Vec::new();
        (&mut decoder)
            .take(MODULE_LIMIT + 1)
            .read_to_end(&mut contents)
            .map_err(decompress_error)?;
        if contents.len() as u64 > MODULE_LIMIT {
            return Err(InitramfsError::DecompressedTooLarge {
                path: source.to_owned(),
                limit: MODULE_LIMIT,
            });
        }
        Ok(contents)
    };
    if let Some(stem) = relative_path.strip_suffix(".gz") {
        let contents = decompressed(Box::new(flate2::bufread::GzDecoder::new(reader)))?;
        Ok((stem.to_owned(), contents))
    } else if let Some(stem) = relative_path.strip_suffix(".zst") {
        let decoder = ruzstd::decoding::StreamingDecoder::new(reader).map_err(|error| {
            decompress_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                error.to_string(),
            ))
        })?;
        let contents = decompressed(Box::new(decoder))?;
        Ok((stem.to_owned(), contents))
    } else {
        Ok((
            relative_path.to_owned(),
            read_limited(reader, source, MODULE_LIMIT)?,
        ))
    }
}

/// A Debian kernel package's files: the kernel image and its modules,
/// relative to the root they were found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianKernel {
    pub release: String,
    /// `boot/vmlinuz-<release>`.
    pub kernel: PathBuf,
    /// `lib/modules/<release>` (or `usr/lib/modules/<release>`).
    pub modules: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocateKernelError {
    #[error("No kernel with modules in {root}/boot and {root}/lib/modules")]
    NoKernel { root: PathBuf },
    #[error("Kernel {release} is not installed: {missing} is missing")]
    Missing { release: String, missing: PathBuf },
    #[error("Invalid kernel release `{release}`")]
    InvalidRelease { release: String },
}

impl DebianKernel {
    /// Where to look for `source`: empty for the newest kernel installed on
    /// the host, a release such as `6.1.0-48-cloud-amd64` for that one, or
    /// an absolute path to an unpacked package (`dpkg-deb -x`), in which
    /// the newest is taken. Returns the root to open (`/` or the package)
    /// and the release to pass to [`Self::locate`] (empty for the newest).
    ///
    /// # Errors
    /// A release that is not one path component.
    pub fn root_of(source: &str) -> Result<(PathBuf, String), LocateKernelError> {
        if source.starts_with('/') {
            return Ok((PathBuf::from(source), String::new()));
        }
        if source.contains('/') || source.starts_with('.') {
            return Err(LocateKernelError::InvalidRelease {
                release: source.to_owned(),
            });
        }
        Ok((PathBuf::from("/"), source.to_owned()))
    }

    /// Finds kernel `release` (empty: the newest that has modules) and its
    /// modules beneath `root`.
    ///
    /// # Errors
    /// Nothing matches, or the release has no kernel image or no modules.
    pub fn locate(root: &ConfinedDir, release: &str) -> Result<Self, LocateKernelError> {
        if release.is_empty() {
            return Self::newest(root);
        }
        if release.contains('/') || release.starts_with('.') {
            return Err(LocateKernelError::InvalidRelease {
                release: release.to_owned(),
            });
        }
        Self::release(root, release)
    }

    fn release(root: &ConfinedDir, release: &str) -> Result<Self, LocateKernelError> {
        let kernel = Path::new("boot").join(format!("vmlinuz-{release}"));
        if !root.has_file(&kernel) {
            return Err(LocateKernelError::Missing {
                release: release.to_owned(),
                missing: root.path().join(kernel),
            });
        }
        let candidates = [
            Path::new("lib/modules").join(release),
            Path::new("usr/lib/modules").join(release),
        ];
        let modules = candidates
            .iter()
            .find(|directory| root.has_file(&directory.join("modules.dep")))
            .cloned()
            .ok_or_else(|| LocateKernelError::Missing {
                release: release.to_owned(),
                missing: root.path().join(&candidates[0]).join("modules.dep"),
            })?;
        Ok(Self {
            release: release.to_owned(),
            kernel,
            modules,
        })
    }

    fn newest(root: &ConfinedDir) -> Result<Self, LocateKernelError> {
        let mut releases: Vec<String> = root
            .names(Path::new("boot"))
            .into_iter()
            .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
            .filter(|release| !release.is_empty() && !release.starts_with('.'))
            .collect();
        releases.sort_by(|left, right| compare_versions(left, right));
        releases
            .iter()
            .rev()
            .find_map(|release| Self::release(root, release).ok())
            .ok_or_else(|| LocateKernelError::NoKernel {
                root: root.path().to_owned(),
            })
    }
}

/// Orders `6.1.0-9` before `6.1.0-10`: digit runs compare as numbers.
fn compare_versions(left: &str, right: &str) -> std::cmp::Ordering {
    fn parts(text: &str) -> Vec<Result<u64, String>> {
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut digits = false;
        for character in text.chars() {
            if !current.is_empty() && character.is_ascii_digit() != digits {
                parts.push(std::mem::take(&mut current));
            }
            digits = character.is_ascii_digit();
            current.push(character);
        }
        if !current.is_empty() {
            parts.push(current);
        }
        parts
            .into_iter()
            .map(|part| part.parse::<u64>().map_err(|_| part))
            .collect()
    }
    parts(left).cmp(&parts(right))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES_DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/jbd2/jbd2.ko.zst:
kernel/fs/mbcache.ko.gz:
kernel/lib/crc16.ko.xz:
kernel/fs/ext4/ext4.ko.zst: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.gz kernel/fs/jbd2/jbd2.ko.zst
kernel/net/packet/af-packet.ko:
";

    fn sample(builtin: &str) -> KernelModules {
        KernelModules::parse(Path::new("/lib/modules/6.1.0-test"), MODULES_DEP, builtin).unwrap()
    }

    fn names(modules: &[ModuleFile]) -> Vec<&str> {
        modules.iter().map(|module| module.name.as_str()).collect()
    }

    #[test]
    fn debian_kernels_are_found_by_release_newest_or_package_dir() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let install = |release: &str, modules: &str| {
            std::fs::create_dir_all(root.join("boot")).unwrap();
            std::fs::write(root.join(format!("boot/vmlinuz-{release}")), "bz").unwrap();
            let directory = root.join(modules).join(release);
            std::fs::create_dir_all(&directory).unwrap();
            std::fs::write(directory.join("modules.dep"), "").unwrap();
        };
        let opened = || ConfinedDir::open(root).unwrap();
        assert_eq!(
            DebianKernel::locate(&opened(), ""),
            Err(LocateKernelError::NoKernel {
                root: root.to_owned()
            })
        );
        install("6.1.0-9-cloud-amd64", "lib/modules");
        install("6.1.0-10-cloud-amd64", "usr/lib/modules");
        // A kernel image without modules is not a candidate.
        std::fs::write(root.join("boot/vmlinuz-6.1.0-99-cloud-amd64"), "bz").unwrap();
        let newest = DebianKernel::locate(&opened(), "").unwrap();
        assert_eq!(newest.release, "6.1.0-10-cloud-amd64");
        assert_eq!(
            newest.modules,
            Path::new("usr/lib/modules/6.1.0-10-cloud-amd64")
        );
        assert_eq!(
            DebianKernel::root_of(root.to_str().unwrap()).unwrap(),
            (root.to_owned(), String::new())
        );
        assert_eq!(
            DebianKernel::root_of("6.1.0-9-cloud-amd64").unwrap(),
            (PathBuf::from("/"), "6.1.0-9-cloud-amd64".to_owned())
        );
        let chosen = DebianKernel::locate(&opened(), "6.1.0-9-cloud-amd64").unwrap();
        assert_eq!(chosen.kernel, Path::new("boot/vmlinuz-6.1.0-9-cloud-amd64"));
        assert_eq!(
            DebianKernel::locate(&opened(), "6.1.0-99-cloud-amd64")
                .unwrap_err()
                .to_string(),
            format!(
                "Kernel 6.1.0-99-cloud-amd64 is not installed: {}/lib/modules/6.1.0-99-cloud-amd64/modules.dep is missing",
                root.display()
            )
        );
        for invalid in ["../etc", "a/b", ".hidden"] {
            assert!(matches!(
                DebianKernel::root_of(invalid),
                Err(LocateKernelError::InvalidRelease { .. })
            ));
            assert!(matches!(
                DebianKernel::locate(&opened(), invalid),
                Err(LocateKernelError::InvalidRelease { .. })
            ));
        }
        // Symlinks leading out of the package do not count as its files.
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("7.0-x")).unwrap();
        std::fs::write(outside.path().join("7.0-x/modules.dep"), "").unwrap();
        std::os::unix::fs::symlink(outside.path().join("7.0-x"), root.join("lib/modules/7.0-x"))
            .unwrap();
        std::fs::write(root.join("boot/vmlinuz-7.0-x"), "bz").unwrap();
        assert!(matches!(
            DebianKernel::locate(&opened(), "7.0-x"),
            Err(LocateKernelError::Missing { .. })
        ));
        assert_eq!(DebianKernel::locate(&opened(), "").unwrap(), newest);
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let modules = sample("");
        let resolved = modules
            .resolve(&["virtio_net", "virtio_blk", "ext4", "virtio_mmio"], &[])
            .unwrap();
        assert_eq!(
            names(&resolved),
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net",
                "virtio_blk",
                "crc16",
                "mbcache",
                "jbd2",
                "ext4",
                "virtio_mmio"
            ]
        );
        assert_eq!(resolved[9].relative_path, "kernel/fs/ext4/ext4.ko.zst");
        assert_eq!(modules.release(), "6.1.0-test");
    }

    #[test]
    fn a_dependency_listed_after_its_user_still_loads_first() {
        // As in Debian's 6.1.0-57 kernels: virtio needs virtio_ring's
        // symbols, and modules.dep names virtio (and lists users' dependencies
        // in modprobe's reverse order) before virtio_ring's own line.
        let modules_dep = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
";
        let modules = KernelModules::parse(
            Path::new("/lib/modules/6.1.0-57-cloud-amd64"),
            modules_dep,
            "",
        )
        .unwrap();
        let resolved = modules
            .resolve(&["virtio", "virtio_ring", "virtio_mmio", "virtio_blk"], &[])
            .unwrap();
        assert_eq!(
            names(&resolved),
            ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
        );
        assert_eq!(
            names(&modules.resolve(&["virtio_blk"], &[]).unwrap()),
            ["virtio_ring", "virtio", "virtio_blk"]
        );
    }

    #[test]
    fn builtin_modules_and_their_dependencies_are_skipped() {
        let modules = sample("kernel/drivers/virtio/virtio.ko\nkernel/fs/ext4/ext4.ko\n");
        let resolved = modules
            .resolve(&["virtio", "virtio_mmio", "ext4", "af_packet"], &[])
            .unwrap();
        // A builtin module's own dependencies are builtin too; nothing of ext4's is loaded.
        assert_eq!(
            names(&resolved),
            ["virtio_ring", "virtio_mmio", "af_packet"]
        );
        assert!(modules.is_builtin("ext4"));
        assert!(!modules.is_builtin("jbd2"));
    }

    #[test]
    fn a_missing_required_module_names_itself_and_the_directory() {
        let modules = sample("");
        let error = modules.resolve(&["virtio", "vsock"], &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Kernel module vsock is neither in modules.dep nor built in (/lib/modules/6.1.0-test)"
        );
        let resolved = modules.resolve(&["virtio"], &["vsock", "crc16"]).unwrap();
        assert_eq!(names(&resolved), ["virtio", "crc16"]);
    }

    #[test]
    fn malformed_modules_dep_is_refused_with_its_line() {
        let error = KernelModules::parse(Path::new("/m"), "a.ko:\nnonsense\n", "").unwrap_err();
        assert_eq!(
            error.to_string(),
            "/m/modules.dep line 2 is not `module.ko: dependencies`"
        );
        assert!(matches!(
            KernelModules::parse(Path::new("/m"), "readme.txt:\n", ""),
            Err(InitramfsError::NotAModule { .. })
        ));
    }

    #[test]
    fn archive_round_trips_with_implicit_parents() {
        let mut archive = Initramfs::new();
        archive.file("/init", 0o755, b"#!agent".to_vec()).unwrap();
        archive.file("a/b/c.txt", 0o644, b"hello".to_vec()).unwrap();
        archive.directory("a", 0o700).unwrap();
        archive.char_device("dev/console", 0o600, 5, 1).unwrap();
        let mut bytes = Vec::new();
        archive.write_gzip(&mut bytes).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
        let entries = parse_gzip(&bytes).unwrap();
        let summary: Vec<(&str, u32)> = entries
            .iter()
            .map(|entry| (entry.path.as_str(), entry.mode))
            .collect();
        assert_eq!(
            summary,
            [
                ("init", 0o100_755),
                ("a", 0o040_755),
                ("a/b", 0o040_755),
                ("a/b/c.txt", 0o100_644),
                ("dev", 0o040_755),
                ("dev/console", 0o020_600)
            ]
        );
        assert_eq!(entries[0].contents, b"#!agent");
        assert_eq!(entries[3].contents, b"hello");
        assert_eq!(entries[5].device, (5, 1));
        // Same input, same bytes: nothing time-dependent goes in.
        let mut again = Vec::new();
        archive.write_gzip(&mut again).unwrap();
        assert_eq!(bytes, again);
    }

    #[test]
    fn archive_paths_must_stay_inside() {
        let mut archive = Initramfs::new();
        for path in ["", "/", "a/../b", "a//b", "./a"] {
            assert!(
                matches!(
                    archive.file(path, 0o644, Vec::new()),
                    Err(InitramfsError::InvalidPath { .. })
                ),
                "{path:?}"
            );
        }
    }

    #[test]
    fn agent_initramfs_packs_modules_in_order_decompressed() {
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path().join("6.1.0-test");
        let write = |relative: &str, contents: Vec<u8>| {
            let path = root.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        };
        let gzip = |data: &[u8]| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(data).unwrap();
            encoder.finish().unwrap()
        };
        // A zstd frame of raw blocks, written by hand: magic, descriptor
        // (single segment, 1-byte content size), one last raw block.
        let zstd = |data: &[u8]| {
            let mut frame = vec![
                0x28,
                0xb5,
                0x2f,
                0xfd,
                0x20,
                u8::try_from(data.len()).unwrap(),
            ];
            let block_header = (u32::try_from(data.len()).unwrap() << 3) | 1;
            frame.extend_from_slice(&block_header.to_le_bytes()[..3]);
            frame.extend_from_slice(data);
            frame
        };
        write("modules.dep", MODULES_DEP.as_bytes().to_vec());
        write(
            "modules.builtin",
            b"kernel/drivers/virtio/virtio.ko\n".to_vec(),
        );
        write("kernel/drivers/virtio/virtio_ring.ko", b"ring".to_vec());
        write("kernel/lib/crc16.ko.xz", b"xz-bytes".to_vec());
        write("kernel/fs/mbcache.ko.gz", gzip(b"mbcache"));
        write("kernel/fs/jbd2/jbd2.ko.zst", zstd(b"jbd2"));
        write("kernel/fs/ext4/ext4.ko.zst", zstd(b"ext4"));
        let agent = directory.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent").unwrap();

        let modules = KernelModules::open(&root).unwrap();
        let (archive, summary) =
            build_agent_initramfs(&modules, &["virtio_ring", "ext4"], &["nope"], &agent).unwrap();
        let mut bytes = Vec::new();
        archive.write_gzip(&mut bytes).unwrap();
        let entries = parse_gzip(&bytes).unwrap();
        let find = |path: &str| {
            entries
                .iter()
                .find(|entry| entry.path == path)
                .unwrap_or_else(|| panic!("{path} missing"))
        };
        let prefix = "/lib/modules/6.1.0-test/kernel";
        let expected = [
            format!("{prefix}/drivers/virtio/virtio_ring.ko"),
            format!("{prefix}/lib/crc16.ko.xz"),
            format!("{prefix}/fs/mbcache.ko"),
            format!("{prefix}/fs/jbd2/jbd2.ko"),
            format!("{prefix}/fs/ext4/ext4.ko"),
        ];
        assert_eq!(summary.modules, expected);
        assert_eq!(
            String::from_utf8(find(MODULE_LIST_PATH).contents.clone()).unwrap(),
            expected.join("\n") + "\n"
        );
        assert_eq!(find("init").mode, 0o100_755);
        assert_eq!(find("init").contents, b"\x7fELF agent");
        assert_eq!(find(&expected[2][1..]).contents, b"mbcache");
        assert_eq!(find(&expected[3][1..]).contents, b"jbd2");
        assert_eq!(find(&expected[1][1..]).contents, b"xz-bytes");
        assert_eq!(find("dev/console").device, (5, 1));
        assert!(entries.iter().any(|entry| entry.path == "newroot"));

        std::fs::remove_file(root.join("kernel/fs/mbcache.ko.gz")).unwrap();
        let error = build_agent_initramfs(&modules, &["ext4"], &[], &agent).unwrap_err();
        assert!(error.to_string().contains("mbcache.ko.gz"), "{error}");
    }

    #[test]
    fn hostile_module_files_are_refused_quickly() {
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path().join("6.1.0-test");
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        std::fs::write(
            root.join("modules.dep"),
            "kernel/link.ko:\nkernel/fifo.ko:\nkernel/zero.ko:\nkernel/huge.ko:\nkernel/bomb.ko.gz:\nkernel/dir.ko:\n",
        )
        .unwrap();
        let secret = directory.path().join("secret");
        std::fs::write(&secret, b"root-only").unwrap();
        std::os::unix::fs::symlink(&secret, root.join("kernel/link.ko")).unwrap();
        nix::unistd::mkfifo(
            &root.join("kernel/fifo.ko"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("kernel/zero.ko")).unwrap();
        std::fs::File::create(root.join("kernel/huge.ko"))
            .unwrap()
            .set_len(MODULE_LIMIT + 1)
            .unwrap();
        std::fs::create_dir(root.join("kernel/dir.ko")).unwrap();
        // A small gzip that inflates past the limit.
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(root.join("kernel/bomb.ko.gz")).unwrap(),
            flate2::Compression::best(),
        );
        let zeros = vec![0_u8; 1 << 20];
        for _ in 0..=(MODULE_LIMIT >> 20) {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.finish().unwrap();

        let opened = ConfinedDir::open(&root).unwrap();
        let modules = KernelModules::read(&opened).unwrap();
        let started = std::time::Instant::now();
        let read = |name: &str| {
            let resolved = modules.resolve(&[name], &[]).unwrap();
            read_modules(&opened, &resolved).unwrap_err().to_string()
        };
        let path = |file: &str| root.join("kernel").join(file).display().to_string();
        assert_eq!(
            read("link"),
            format!(
                "{} leads outside {} (through `..` or a symlink); refused",
                path("link.ko"),
                root.display()
            )
        );
        assert_eq!(
            read("fifo"),
            format!("{} is a FIFO, not a regular file", path("fifo.ko"))
        );
        assert!(read("zero").contains("leads outside"));
        assert_eq!(
            read("huge"),
            format!(
                "{} is larger than the {MODULE_LIMIT} bytes allowed",
                path("huge.ko")
            )
        );
        assert_eq!(
            read("bomb"),
            format!(
                "Kernel module {} decompresses to more than {MODULE_LIMIT} bytes",
                path("bomb.ko.gz")
            )
        );
        assert!(read("dir").contains("is a directory, not a regular file"));
        assert!(started.elapsed() < std::time::Duration::from_secs(30));

        // modules.dep itself must be a regular file beneath the directory.
        std::fs::remove_file(root.join("modules.dep")).unwrap();
        nix::unistd::mkfifo(
            &root.join("modules.dep"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert!(matches!(
            KernelModules::open(&root),
            Err(InitramfsError::File(ConfinedError::NotAFile { .. }))
        ));
    }
}
