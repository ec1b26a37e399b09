//! ImageService: registers root filesystem images and guest kernels.
//!
//! Import protocol, the same for both kinds:
//! 1. Check the name and that the caller may read the source.
//! 2. Copy the source into `STATE_DIR/tmp/` (sparse) if it is an ext4
//!    image; otherwise unpack it there (tarball, OCI layout, `docker save`
//!    archive, directory; hostile entries refused) and build an ext4 image
//!    of it with `mkfs.ext4 -d`.
//! 3. Rename it into place (`images/` or `kernels/`), then insert the row.
//!    A failure at any step removes what steps 2-3 made, so a failed import
//!    registers nothing and leaves no file behind.
//!
//! A kernel imported `--from-debian` takes the kernel image and modules of a
//! Debian kernel package (installed, or unpacked in a directory), builds an
//! initramfs with the modules and the static guest agent
//! (`banger_disk::initramfs`) in `STATE_DIR/tmp/`, and then registers both
//! as an import with an initrd does; the temporary initramfs is removed
//! whatever happens.

use std::path::{Path, PathBuf};

use banger_disk::ext4::Ext4Error;
use banger_disk::initramfs::{
    self, DebianKernel, InitramfsError, KernelModules, LocateKernelError,
};
use banger_disk::unpack::UnpackError;
use banger_disk::vmlinux::VmlinuxError;
use banger_proto::{ErrorKind, Image, ImportImageParams, ImportKernelParams, Kernel};
use banger_store::{Store, StoreError};

use crate::access::{open_as_peer, Peer};
use crate::error::{RpcFailure, StoreFailure};
use crate::files::{self, FileError};
use crate::ids::{new_id, now, validate_artifact_name, InvalidArtifactName};
use crate::paths::StatePaths;

/// Kernel arguments used when an imported kernel gives none: serial console,
/// reboot on triple fault/panic so the VMM exits instead of hanging.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// The same for Debian kernels, whose initramfs mounts `root=`.
pub const DEBIAN_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";
/// Where the static guest agent is looked for last (after `[agent] path`
/// and the directory of `bangerd`).
pub const AGENT_INSTALL_PATH: &str = "/usr/local/lib/banger/banger-agent";

/// What can go wrong finding, importing, registering and removing images
/// and kernels.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("No image named `{name}`")]
    ImageNotFound { name: String },
    #[error("No kernel named `{name}`")]
    KernelNotFound { name: String },
    #[error(transparent)]
    InvalidName(#[from] InvalidArtifactName),
    #[error("Image `{name}` already exists")]
    ImageExists { name: String },
    #[error("Kernel `{name}` already exists")]
    KernelExists { name: String },
    #[error("Kernel command line must be one line")]
    MultilineCommandLine,
    #[error("A kernel imported from Debian takes no kernel file or initrd")]
    DebianKernelWithFiles,

    // The source of an import, opened as the caller.
    #[error("The {what} path {path} is not absolute")]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("Cannot read {what} {path}")]
    OpenSource {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot stat {what} {path}")]
    StatSource {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The {what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },

    // Images.
    #[error("Importing the directory {path} needs root")]
    DirectoryNeedsRoot { path: PathBuf },
    #[error("Cannot import {path}")]
    UnknownFormat {
        path: PathBuf,
        #[source]
        source: UnpackError,
    },
    #[error("Refused to import {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: UnpackError,
    },
    #[error("Failed to build the ext4 image")]
    BuildExt4(#[source] Box<Ext4Error>),
    #[error("Failed to read the image")]
    ReadImage(#[source] FileError),
    #[error("Failed to copy {path}")]
    CopyImage {
        path: PathBuf,
        #[source]
        source: FileError,
    },
    #[error("Failed to open the built image")]
    OpenBuiltImage(#[source] std::io::Error),
    #[error("Failed to hash the built image")]
    HashBuiltImage(#[source] FileError),
    #[error("Failed to read the new image")]
    StatNewImage(#[source] std::io::Error),
    #[error("Failed to move image into place")]
    MoveImage(#[source] std::io::Error),

    // Catalog downloads.
    #[error("Failed to open the download")]
    OpenDownload(#[source] std::io::Error),
    #[error("Failed to read the download")]
    ReadDownload(#[source] FileError),
    #[error("Failed to stat the download")]
    StatDownload(#[source] std::io::Error),
    #[error("The catalog's image `{name}` is not an ext4 filesystem image")]
    DownloadNotExt4 { name: String },
    #[error("The catalog's kernel `{name}` is neither an ELF vmlinux nor a bzImage")]
    DownloadNotAKernel { name: String },

    // Kernels.
    #[error("{path} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("Failed to read kernel")]
    ReadKernel(#[source] FileError),
    #[error("Failed to create the kernel dir")]
    CreateKernelDirectory(#[source] std::io::Error),
    #[error("Failed to create kernel staging dir")]
    CreateKernelStaging(#[source] std::io::Error),
    #[error("Failed to copy kernel")]
    CopyKernel(#[source] FileError),
    #[error("Failed to copy initrd")]
    CopyInitrd(#[source] FileError),
    #[error("Failed to move kernel into place")]
    MoveKernel(#[source] std::io::Error),
    #[error("Failed to move initrd into place")]
    MoveInitrd(#[source] std::io::Error),
    #[error(transparent)]
    LocateDebianKernel(#[from] LocateKernelError),
    #[error("Failed to build the initramfs for kernel {release}")]
    BuildInitramfs {
        release: String,
        #[source]
        source: InitramfsError,
    },
    #[error("No static guest agent found (looked at {})", list_paths(.candidates))]
    AgentNotFound { candidates: Vec<PathBuf> },
    #[error("Failed to unpack the vmlinux from {path}")]
    UnpackVmlinux {
        path: PathBuf,
        #[source]
        source: VmlinuxError,
    },

    // Files of either.
    #[error("Failed to create {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to reopen {path}")]
    ReopenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{task} task failed")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(transparent)]
    Store(#[from] StoreFailure),
}

impl From<StoreError> for ImageError {
    fn from(error: StoreError) -> Self {
        Self::Store(error.into())
    }
}

impl RpcFailure for ImageError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::ImageNotFound { .. } | Self::KernelNotFound { .. } => ErrorKind::NotFound,
            Self::ImageExists { .. } | Self::KernelExists { .. } => ErrorKind::AlreadyExists,
            Self::OpenSource { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ErrorKind::NotAllowed
            }
            Self::DirectoryNeedsRoot { .. } => ErrorKind::NotAllowed,
            Self::InvalidName(_)
            | Self::MultilineCommandLine
            | Self::DebianKernelWithFiles
            | Self::RelativePath { .. }
            | Self::OpenSource { .. }
            | Self::NotAFile { .. }
            | Self::UnknownFormat { .. }
            | Self::Unpack { .. }
            | Self::NotAKernel { .. }
            | Self::LocateDebianKernel(_) => ErrorKind::InvalidParams,
            Self::Store(error) => error.kind(),
            _ => ErrorKind::Failed,
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::ImageNotFound { .. } => {
                "`banger image list` shows the images; `banger image import` adds one".to_owned()
            }
            Self::KernelNotFound { .. } => {
                "`banger kernel list` shows the kernels; `banger kernel import` adds one".to_owned()
            }
            Self::ImageExists { name } => format!("remove it first with `banger image rm {name}`"),
            Self::KernelExists { name } => {
                format!("remove it first with `banger kernel rm {name}`")
            }
            Self::DirectoryNeedsRoot { path } => format!(
                "pack it first: `tar -C {} -cf rootfs.tar .`, then import rootfs.tar",
                path.display()
            ),
            Self::UnknownFormat { .. } => "images are ext4 files, tarballs (plain, gzip, zstd), OCI layouts, `docker save` archives or directories".to_owned(),
            Self::AgentNotFound { .. } => {
                "build it with scripts/build-agent.sh and set `[agent] path` or install it there"
                    .to_owned()
            }
            Self::Store(error) => return error.hint(),
            _ => return None,
        })
    }
}

/// `a, b, c`, for a message.
fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone)]
pub struct ImageService {
    store: Store,
    paths: StatePaths,
    /// Let imported archives create device nodes and FIFOs.
    allow_device_nodes: bool,
    /// `[agent] path`: the static agent packed into generated initramfs images.
    agent_path: Option<PathBuf>,
}

/// Removes a path when dropped unless disarmed: the undo of an import step.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

impl ImageService {
    pub fn new(store: Store, paths: StatePaths, allow_device_nodes: bool) -> Self {
        Self {
            store,
            paths,
            allow_device_nodes,
            agent_path: None,
        }
    }

    /// Uses `path` (`[agent] path`) as the guest agent instead of searching.
    #[must_use]
    pub fn with_agent_path(mut self, path: Option<PathBuf>) -> Self {
        self.agent_path = path;
        self
    }

    pub fn list_images(&self) -> Result<Vec<Image>, ImageError> {
        Ok(self.store.list_images()?)
    }

    pub fn image(&self, name: &str) -> Result<Image, ImageError> {
        self.store
            .find_image(name)?
            .ok_or_else(|| ImageError::ImageNotFound {
                name: name.to_owned(),
            })
    }

    pub fn list_kernels(&self) -> Result<Vec<Kernel>, ImageError> {
        Ok(self.store.list_kernels()?)
    }

    pub fn kernel(&self, name: &str) -> Result<Kernel, ImageError> {
        self.store
            .find_kernel(name)?
            .ok_or_else(|| ImageError::KernelNotFound {
                name: name.to_owned(),
            })
    }

    pub async fn import_image(
        &self,
        peer: Peer,
        params: ImportImageParams,
    ) -> Result<Image, ImageError> {
        validate_artifact_name("image", &params.name)?;
        if self.store.find_image(&params.name)?.is_some() {
            return Err(ImageError::ImageExists { name: params.name });
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let source = open_source(&peer, &params.path, "image", true)?;
            this.import_image_blocking(&peer, &params.name, source)
        })
        .await
        .map_err(|source| ImageError::Task {
            task: "Image import",
            source,
        })?
    }

    fn import_image_blocking(
        &self,
        peer: &Peer,
        name: &str,
        source: OpenSource,
    ) -> Result<Image, ImageError> {
        let OpenSource {
            path: source,
            mut file,
            is_directory,
        } = source;
        let id = new_id();
        let temporary = self.paths.tmp().join(format!("image-{id}.ext4"));
        let mut temporary_guard = RemoveOnDrop(Some(temporary.clone()));
        let is_ext4 =
            !is_directory && files::is_ext4(&file, &source).map_err(ImageError::ReadImage)?;
        let (digest, description) = if is_ext4 {
            let digest =
                files::copy_with_digest(&mut file, &source, &temporary).map_err(|error| {
                    ImageError::CopyImage {
                        path: source.clone(),
                        source: error,
                    }
                })?;
            (digest, "ext4 image".to_owned())
        } else {
            let kind = self.build_image(peer, &source, &file, is_directory, &id, &temporary)?;
            let mut built = std::fs::File::open(&temporary).map_err(ImageError::OpenBuiltImage)?;
            let digest =
                files::digest(&mut built, &temporary).map_err(ImageError::HashBuiltImage)?;
            (digest, kind)
        };
        let size_bytes = std::fs::metadata(&temporary)
            .map_err(ImageError::StatNewImage)?
            .len();
        let destination = self.paths.images().join(format!("{id}.ext4"));
        std::fs::rename(&temporary, &destination).map_err(ImageError::MoveImage)?;
        temporary_guard.disarm();
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        let image = Image {
            id,
            name: name.to_owned(),
            path: destination.display().to_string(),
            size_bytes,
            digest,
            source: format!("{} ({description})", source.display()),
            created_at: now(),
        };
        self.store.insert_image(&image)?;
        destination_guard.disarm();
        Ok(image)
    }

    /// Unpacks a non-ext4 source (tarball, OCI layout, `docker save`
    /// archive, directory) into a staging dir, refusing hostile entries, and
    /// builds an ext4 image of it at `output`. Returns what the source was.
    fn build_image(
        &self,
        peer: &Peer,
        source: &Path,
        file: &std::fs::File,
        is_directory: bool,
        id: &str,
        output: &Path,
    ) -> Result<String, ImageError> {
        use banger_disk::unpack;
        use std::os::fd::AsRawFd;
        // Archives are read through the descriptor opened as the caller.
        // A directory tree is read as root file by file, so only root may
        // import one.
        let readable = if is_directory {
            if peer.uid != 0 {
                return Err(ImageError::DirectoryNeedsRoot {
                    path: source.to_owned(),
                });
            }
            source.to_owned()
        } else {
            PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
        };
        let kind = unpack::detect(&readable).map_err(|error| ImageError::UnknownFormat {
            path: source.to_owned(),
            source: error,
        })?;
        let staging = self.paths.tmp().join(format!("unpack-{id}"));
        let _staging_guard = RemoveOnDrop(Some(staging.clone()));
        let options = unpack::UnpackOptions {
            allow_devices: self.allow_device_nodes,
            ..unpack::UnpackOptions::default()
        };
        unpack::unpack(&readable, &staging, &options).map_err(|error| ImageError::Unpack {
            path: source.to_owned(),
            source: error,
        })?;
        banger_disk::ext4::build_from_directory(
            &staging,
            output,
            &banger_disk::ext4::BuildOptions::default(),
        )
        .map_err(|error| ImageError::BuildExt4(Box::new(error)))?;
        Ok(kind.describe().to_owned())
    }

    /// Registers a verified download sitting in `STATE_DIR/tmp/` as image
    /// `name`: checks it is ext4, moves it into place, inserts the row. The
    /// file is gone afterwards whatever happens.
    pub fn register_downloaded_image(
        &self,
        name: &str,
        downloaded: &Path,
        digest: String,
        source: String,
    ) -> Result<Image, ImageError> {
        let mut downloaded_guard = RemoveOnDrop(Some(downloaded.to_owned()));
        validate_artifact_name("image", name)?;
        let file = std::fs::File::open(downloaded).map_err(ImageError::OpenDownload)?;
        if !files::is_ext4(&file, downloaded).map_err(ImageError::ReadDownload)? {
            return Err(ImageError::DownloadNotExt4 {
                name: name.to_owned(),
            });
        }
        let size_bytes = file.metadata().map_err(ImageError::StatDownload)?.len();
        let id = new_id();
        let destination = self.paths.images().join(format!("{id}.ext4"));
        std::fs::rename(downloaded, &destination).map_err(ImageError::MoveImage)?;
        downloaded_guard.disarm();
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        let image = Image {
            id,
            name: name.to_owned(),
            path: destination.display().to_string(),
            size_bytes,
            digest,
            source,
            created_at: now(),
        };
        self.store.insert_image(&image)?;
        destination_guard.disarm();
        Ok(image)
    }

    /// Registers a verified kernel (and initrd) download from
    /// `STATE_DIR/tmp/` as kernel `name`. The files are gone afterwards
    /// whatever happens.
    pub fn register_downloaded_kernel(
        &self,
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: Option<String>,
        source: String,
    ) -> Result<Kernel, ImageError> {
        let _kernel_guard = RemoveOnDrop(Some(kernel.to_owned()));
        let _initrd_guard = RemoveOnDrop(initrd.map(Path::to_owned));
        validate_artifact_name("kernel", name)?;
        let file = std::fs::File::open(kernel).map_err(ImageError::OpenDownload)?;
        if !files::is_kernel_image(&file, kernel).map_err(ImageError::ReadDownload)? {
            return Err(ImageError::DownloadNotAKernel {
                name: name.to_owned(),
            });
        }
        let id = new_id();
        let destination = self.paths.kernels().join(&id);
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        std::fs::create_dir(&destination).map_err(ImageError::CreateKernelDirectory)?;
        std::fs::rename(kernel, destination.join("vmlinux")).map_err(ImageError::MoveKernel)?;
        if let Some(initrd) = initrd {
            std::fs::rename(initrd, destination.join("initrd")).map_err(ImageError::MoveInitrd)?;
        }
        let record = Kernel {
            id,
            name: name.to_owned(),
            kernel_path: destination.join("vmlinux").display().to_string(),
            initrd_path: initrd.map(|_| destination.join("initrd").display().to_string()),
            cmdline: cmdline.unwrap_or_else(|| DEFAULT_KERNEL_CMDLINE.to_owned()),
            source,
            created_at: now(),
        };
        self.store.insert_kernel(&record)?;
        destination_guard.disarm();
        Ok(record)
    }

    /// Removes files under `images/` and `kernels/` that no row references
    /// (an import interrupted between moving the file into place and
    /// registering it). Returns what was removed.
    pub fn remove_unreferenced_files(&self) -> Result<Vec<String>, ImageError> {
        let mut referenced: Vec<PathBuf> = self
            .store
            .list_images()?
            .into_iter()
            .map(|image| PathBuf::from(image.path))
            .collect();
        referenced.extend(
            self.store
                .list_kernels()?
                .into_iter()
                .filter_map(|kernel| Path::new(&kernel.kernel_path).parent().map(Path::to_owned)),
        );
        let mut removed = Vec::new();
        for directory in [self.paths.images(), self.paths.kernels()] {
            let Ok(entries) = std::fs::read_dir(&directory) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if referenced.contains(&path) {
                    continue;
                }
                let outcome = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match outcome {
                    Ok(()) => removed.push(path.display().to_string()),
                    Err(error) => {
                        tracing::error!(path = %path.display(), %error, "failed to remove unreferenced file");
                    }
                }
            }
        }
        Ok(removed)
    }

    pub fn remove_image(&self, name: &str) -> Result<Image, ImageError> {
        let image = self.image(name)?;
        self.store.delete_image(name)?;
        remove_file_if_present(Path::new(&image.path))?;
        Ok(image)
    }

    pub async fn import_kernel(
        &self,
        peer: Peer,
        params: ImportKernelParams,
    ) -> Result<Kernel, ImageError> {
        validate_artifact_name("kernel", &params.name)?;
        if self.store.find_kernel(&params.name)?.is_some() {
            return Err(ImageError::KernelExists { name: params.name });
        }
        let default_cmdline = if params.from_debian.is_some() {
            DEBIAN_KERNEL_CMDLINE
        } else {
            DEFAULT_KERNEL_CMDLINE
        };
        let cmdline = params
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline.to_owned());
        if cmdline.contains('\n') {
            return Err(ImageError::MultilineCommandLine);
        }
        if let Some(source) = params.from_debian.clone() {
            if !params.path.is_empty() || params.initrd.is_some() {
                return Err(ImageError::DebianKernelWithFiles);
            }
            let this = self.clone();
            return tokio::task::spawn_blocking(move || {
                this.import_debian_kernel_blocking(&peer, &params.name, &source, cmdline)
            })
            .await
            .map_err(|source| ImageError::Task {
                task: "Kernel import",
                source,
            })?;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let kernel = open_source(&peer, &params.path, "kernel", false)?;
            let initrd = params
                .initrd
                .as_deref()
                .map(|path| open_source(&peer, path, "initrd", false))
                .transpose()?;
            this.import_kernel_blocking(&params.name, kernel, initrd, cmdline)
        })
        .await
        .map_err(|source| ImageError::Task {
            task: "Kernel import",
            source,
        })?
    }

    fn import_debian_kernel_blocking(
        &self,
        peer: &Peer,
        name: &str,
        source: &str,
        cmdline: String,
    ) -> Result<Kernel, ImageError> {
        if source.starts_with('/') {
            // The package directory is read with the caller's rights.
            open_source(peer, source, "kernel package", true)?;
        }
        let located = DebianKernel::locate(Path::new("/"), source)?;
        let mut kernel = open_source(peer, &located.kernel.to_string_lossy(), "kernel", false)?;
        let agent = find_agent(&agent_candidates(self.agent_path.as_deref()))?;
        let initrd_path = self.paths.tmp().join(format!("initrd-{}", new_id()));
        let _initrd_guard = RemoveOnDrop(Some(initrd_path.clone()));
        // Stored as the ELF vmlinux: Firecracker boots nothing else, and
        // QEMU's microvm boots it through its PVH note.
        let vmlinux_path = self.paths.tmp().join(format!("vmlinux-{}", new_id()));
        let _vmlinux_guard = RemoveOnDrop(Some(vmlinux_path.clone()));
        if let Some(file) = unpack_vmlinux(&mut kernel, &vmlinux_path)? {
            kernel.file = file;
        }
        let build_error = |source: InitramfsError| ImageError::BuildInitramfs {
            release: located.release.clone(),
            source,
        };
        let modules = KernelModules::open(&located.modules).map_err(build_error)?;
        let (archive, _) = initramfs::build_agent_initramfs(
            &modules,
            initramfs::REQUIRED_MODULES,
            initramfs::OPTIONAL_MODULES,
            &agent,
        )
        .map_err(build_error)?;
        let output =
            std::fs::File::create(&initrd_path).map_err(|source| ImageError::CreateFile {
                path: initrd_path.clone(),
                source,
            })?;
        archive
            .write_gzip(std::io::BufWriter::new(output))
            .map_err(build_error)?;
        let file = std::fs::File::open(&initrd_path).map_err(|source| ImageError::ReopenFile {
            path: initrd_path.clone(),
            source,
        })?;
        let initrd = OpenSource {
            path: initrd_path.clone(),
            file,
            is_directory: false,
        };
        self.import_kernel_blocking(name, kernel, Some(initrd), cmdline)
    }

    fn import_kernel_blocking(
        &self,
        name: &str,
        mut kernel: OpenSource,
        initrd: Option<OpenSource>,
        cmdline: String,
    ) -> Result<Kernel, ImageError> {
        if !files::is_kernel_image(&kernel.file, &kernel.path).map_err(ImageError::ReadKernel)? {
            return Err(ImageError::NotAKernel { path: kernel.path });
        }
        let id = new_id();
        let staging = self.paths.tmp().join(format!("kernel-{id}"));
        let mut staging_guard = RemoveOnDrop(Some(staging.clone()));
        std::fs::create_dir(&staging).map_err(ImageError::CreateKernelStaging)?;
        files::copy_with_digest(&mut kernel.file, &kernel.path, &staging.join("vmlinux"))
            .map_err(ImageError::CopyKernel)?;
        let has_initrd = initrd.is_some();
        if let Some(mut initrd) = initrd {
            files::copy_with_digest(&mut initrd.file, &initrd.path, &staging.join("initrd"))
                .map_err(ImageError::CopyInitrd)?;
        }
        let destination = self.paths.kernels().join(&id);
        std::fs::rename(&staging, &destination).map_err(ImageError::MoveKernel)?;
        staging_guard.disarm();
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        let record = Kernel {
            id,
            name: name.to_owned(),
            kernel_path: destination.join("vmlinux").display().to_string(),
            initrd_path: has_initrd.then(|| destination.join("initrd").display().to_string()),
            cmdline,
            source: kernel.path.display().to_string(),
            created_at: now(),
        };
        self.store.insert_kernel(&record)?;
        destination_guard.disarm();
        Ok(record)
    }

    pub fn remove_kernel(&self, name: &str) -> Result<Kernel, ImageError> {
        let kernel = self.kernel(name)?;
        self.store.delete_kernel(name)?;
        if let Some(directory) = Path::new(&kernel.kernel_path).parent() {
            match std::fs::remove_dir_all(directory) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ImageError::Remove {
                        path: directory.to_owned(),
                        source,
                    })
                }
            }
        }
        Ok(kernel)
    }
}

/// Writes the ELF vmlinux inside bzImage `kernel` to `output` and returns it
/// opened; `None` when `kernel` already is an ELF, or is compressed in a
/// format banger does not unpack (it is then kept as it is: QEMU boots a
/// bzImage, Firecracker will not).
fn unpack_vmlinux(
    kernel: &mut OpenSource,
    output: &Path,
) -> Result<Option<std::fs::File>, ImageError> {
    use std::io::{Read, Seek, Write};
    let mut image = Vec::new();
    kernel
        .file
        .read_to_end(&mut image)
        .and_then(|_| kernel.file.rewind())
        .map_err(|source| ImageError::ReadFile {
            path: kernel.path.clone(),
            source,
        })?;
    if banger_disk::vmlinux::is_elf(&image) {
        return Ok(None);
    }
    let vmlinux = match banger_disk::vmlinux::extract(&image) {
        Ok(vmlinux) => vmlinux,
        Err(banger_disk::vmlinux::VmlinuxError::Unsupported { format }) => {
            tracing::warn!(kernel = %kernel.path.display(), format, "kept the bzImage: Firecracker cannot boot it");
            return Ok(None);
        }
        Err(source) => {
            return Err(ImageError::UnpackVmlinux {
                path: kernel.path.clone(),
                source,
            })
        }
    };
    let write_error = |source| ImageError::WriteFile {
        path: output.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(write_error)?;
    file.write_all(&vmlinux).map_err(write_error)?;
    file.rewind().map_err(write_error)?;
    Ok(Some(file))
}

/// Where the static guest agent is looked for, in order: `[agent] path`
/// alone when set; else next to the running `bangerd`, then
/// [`AGENT_INSTALL_PATH`].
pub fn agent_candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = configured {
        return vec![path.to_owned()];
    }
    let mut candidates = Vec::new();
    if let Some(directory) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        candidates.push(directory.join("banger-agent"));
    }
    candidates.push(PathBuf::from(AGENT_INSTALL_PATH));
    candidates
}

/// The first candidate that is a file.
pub fn find_agent(candidates: &[PathBuf]) -> Result<PathBuf, ImageError> {
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| ImageError::AgentNotFound {
            candidates: candidates.to_vec(),
        })
}

/// An import source, opened once with the caller's rights; everything
/// after reads this descriptor.
struct OpenSource {
    path: PathBuf,
    file: std::fs::File,
    is_directory: bool,
}

/// Opens the source of an import: an absolute path to a regular file the
/// caller may read (checked by the kernel as the caller, see
/// [`open_as_peer`]).
fn open_source(
    peer: &Peer,
    path: &str,
    what: &'static str,
    directory_allowed: bool,
) -> Result<OpenSource, ImageError> {
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(ImageError::RelativePath { what, path });
    }
    let file = match open_as_peer(peer, &path) {
        Ok(file) => file,
        Err(source) => return Err(ImageError::OpenSource { what, path, source }),
    };
    let metadata = match file.metadata() {
        Ok(metadata) => metadata,
        Err(source) => return Err(ImageError::StatSource { what, path, source }),
    };
    let is_directory = metadata.is_dir() && directory_allowed;
    if !metadata.is_file() && !is_directory {
        return Err(ImageError::NotAFile { what, path });
    }
    Ok(OpenSource {
        path,
        file,
        is_directory,
    })
}

fn remove_file_if_present(path: &Path) -> Result<(), ImageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ImageError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_the_configured_path_or_next_to_bangerd_then_installed() {
        assert_eq!(
            agent_candidates(Some(Path::new("/opt/agent"))),
            [PathBuf::from("/opt/agent")]
        );
        let candidates = agent_candidates(None);
        assert_eq!(candidates.last().unwrap(), Path::new(AGENT_INSTALL_PATH));
        assert!(candidates[0].ends_with("banger-agent"));

        let directory = tempfile::tempdir().unwrap();
        let missing = [directory.path().join("a"), directory.path().join("b")];
        let error = find_agent(&missing).unwrap_err();
        assert_eq!(
            crate::error::chain(&error),
            format!(
                "No static guest agent found (looked at {}, {})",
                missing[0].display(),
                missing[1].display()
            )
        );
        assert_eq!(error.kind(), ErrorKind::Failed);
        assert!(error.hint().unwrap().contains("build-agent.sh"));
        std::fs::write(&missing[1], "agent").unwrap();
        assert_eq!(find_agent(&missing).unwrap(), missing[1]);
    }

    #[test]
    fn an_unreadable_source_is_not_allowed_and_a_missing_one_invalid() {
        let open = |kind: std::io::ErrorKind| ImageError::OpenSource {
            what: "image",
            path: PathBuf::from("/x.ext4"),
            source: std::io::Error::from(kind),
        };
        let refused = open(std::io::ErrorKind::PermissionDenied);
        assert_eq!(refused.kind(), ErrorKind::NotAllowed);
        assert!(crate::error::chain(&refused).starts_with("Cannot read image /x.ext4: "));
        assert_eq!(
            open(std::io::ErrorKind::NotFound).kind(),
            ErrorKind::InvalidParams
        );
    }
}
