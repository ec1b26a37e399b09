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

use banger_disk::initramfs::{self, DebianKernel, InitramfsError, KernelModules};
use banger_proto::{ErrorKind, Image, ImportImageParams, ImportKernelParams, Kernel};
use banger_store::Store;

use crate::access::{open_as_peer, Peer};
use crate::error::{DaemonError, DaemonResult};
use crate::files;
use crate::ids::{new_id, now, validate_artifact_name};
use crate::paths::StatePaths;

/// Kernel arguments used when an imported kernel gives none: serial console,
/// reboot on triple fault/panic so the VMM exits instead of hanging.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// The same for Debian kernels, whose initramfs mounts `root=`.
pub const DEBIAN_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";
/// Where the static guest agent is looked for last (after `[agent] path`
/// and the directory of `bangerd`).
pub const AGENT_INSTALL_PATH: &str = "/usr/local/lib/banger/banger-agent";

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

    pub fn list_images(&self) -> DaemonResult<Vec<Image>> {
        Ok(self.store.list_images()?)
    }

    pub fn image(&self, name: &str) -> DaemonResult<Image> {
        self.store.find_image(name)?.ok_or_else(|| {
            DaemonError::not_found(format!("No image named `{name}`"))
                .with_hint("`banger image list` shows the images; `banger image import` adds one")
        })
    }

    pub fn list_kernels(&self) -> DaemonResult<Vec<Kernel>> {
        Ok(self.store.list_kernels()?)
    }

    pub fn kernel(&self, name: &str) -> DaemonResult<Kernel> {
        self.store.find_kernel(name)?.ok_or_else(|| {
            DaemonError::not_found(format!("No kernel named `{name}`")).with_hint(
                "`banger kernel list` shows the kernels; `banger kernel import` adds one",
            )
        })
    }

    pub async fn import_image(&self, peer: Peer, params: ImportImageParams) -> DaemonResult<Image> {
        validate_artifact_name("image", &params.name).map_err(DaemonError::invalid_params)?;
        if self.store.find_image(&params.name)?.is_some() {
            return Err(DaemonError::new(
                ErrorKind::AlreadyExists,
                format!("Image `{}` already exists", params.name),
            )
            .with_hint(format!(
                "remove it first with `banger image rm {}`",
                params.name
            )));
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let source = open_source(&peer, &params.path, "image", true)?;
            this.import_image_blocking(&peer, &params.name, source)
        })
        .await
        .map_err(|error| DaemonError::failed("Image import task failed", error))?
    }

    fn import_image_blocking(
        &self,
        peer: &Peer,
        name: &str,
        source: OpenSource,
    ) -> DaemonResult<Image> {
        let OpenSource {
            path: source,
            mut file,
            is_directory,
        } = source;
        let id = new_id();
        let temporary = self.paths.tmp().join(format!("image-{id}.ext4"));
        let mut temporary_guard = RemoveOnDrop(Some(temporary.clone()));
        let is_ext4 = !is_directory
            && files::is_ext4(&file, &source)
                .map_err(|error| DaemonError::failed("Failed to read the image", error))?;
        let (digest, description) = if is_ext4 {
            let digest =
                files::copy_with_digest(&mut file, &source, &temporary).map_err(|error| {
                    DaemonError::failed(format!("Failed to copy {}", source.display()), error)
                })?;
            (digest, "ext4 image".to_owned())
        } else {
            let kind = self.build_image(peer, &source, &file, is_directory, &id, &temporary)?;
            let mut built = std::fs::File::open(&temporary)
                .map_err(|error| DaemonError::failed("Failed to open the built image", error))?;
            let digest = files::digest(&mut built, &temporary)
                .map_err(|error| DaemonError::failed("Failed to hash the built image", error))?;
            (digest, kind)
        };
        let size_bytes = std::fs::metadata(&temporary)
            .map_err(|error| DaemonError::failed("Failed to read the new image", error))?
            .len();
        let destination = self.paths.images().join(format!("{id}.ext4"));
        std::fs::rename(&temporary, &destination)
            .map_err(|error| DaemonError::failed("Failed to move image into place", error))?;
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
    ) -> DaemonResult<String> {
        use banger_disk::unpack;
        use std::os::fd::AsRawFd;
        // Archives are read through the descriptor opened as the caller.
        // A directory tree is read as root file by file, so only root may
        // import one.
        let readable = if is_directory {
            if peer.uid != 0 {
                return Err(DaemonError::new(
                    ErrorKind::NotAllowed,
                    format!("Importing the directory {} needs root", source.display()),
                )
                .with_hint(format!(
                    "pack it first: `tar -C {} -cf rootfs.tar .`, then import rootfs.tar",
                    source.display()
                )));
            }
            source.to_owned()
        } else {
            PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
        };
        let kind = unpack::detect(&readable).map_err(|error| {
            DaemonError::invalid_params(format!("Cannot import {}", source.display()))
                .with_source(error)
                .with_hint("images are ext4 files, tarballs (plain, gzip, zstd), OCI layouts, `docker save` archives or directories")
        })?;
        let staging = self.paths.tmp().join(format!("unpack-{id}"));
        let _staging_guard = RemoveOnDrop(Some(staging.clone()));
        let options = unpack::UnpackOptions {
            allow_devices: self.allow_device_nodes,
            ..unpack::UnpackOptions::default()
        };
        unpack::unpack(&readable, &staging, &options).map_err(|error| {
            DaemonError::invalid_params(format!("Refused to import {}", source.display()))
                .with_source(error)
        })?;
        banger_disk::ext4::build_from_directory(
            &staging,
            output,
            &banger_disk::ext4::BuildOptions::default(),
        )
        .map_err(|error| DaemonError::failed("Failed to build the ext4 image", error))?;
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
    ) -> DaemonResult<Image> {
        let mut downloaded_guard = RemoveOnDrop(Some(downloaded.to_owned()));
        validate_artifact_name("image", name).map_err(DaemonError::invalid_params)?;
        let file = std::fs::File::open(downloaded)
            .map_err(|error| DaemonError::failed("Failed to open the download", error))?;
        if !files::is_ext4(&file, downloaded)
            .map_err(|error| DaemonError::failed("Failed to read the download", error))?
        {
            return Err(DaemonError::new(
                ErrorKind::Failed,
                format!("The catalog's image `{name}` is not an ext4 filesystem image"),
            ));
        }
        let size_bytes = file
            .metadata()
            .map_err(|error| DaemonError::failed("Failed to stat the download", error))?
            .len();
        let id = new_id();
        let destination = self.paths.images().join(format!("{id}.ext4"));
        std::fs::rename(downloaded, &destination)
            .map_err(|error| DaemonError::failed("Failed to move image into place", error))?;
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
    ) -> DaemonResult<Kernel> {
        let _kernel_guard = RemoveOnDrop(Some(kernel.to_owned()));
        let _initrd_guard = RemoveOnDrop(initrd.map(Path::to_owned));
        validate_artifact_name("kernel", name).map_err(DaemonError::invalid_params)?;
        let file = std::fs::File::open(kernel)
            .map_err(|error| DaemonError::failed("Failed to open the download", error))?;
        if !files::is_kernel_image(&file, kernel)
            .map_err(|error| DaemonError::failed("Failed to read the download", error))?
        {
            return Err(DaemonError::new(
                ErrorKind::Failed,
                format!("The catalog's kernel `{name}` is neither an ELF vmlinux nor a bzImage"),
            ));
        }
        let id = new_id();
        let destination = self.paths.kernels().join(&id);
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        std::fs::create_dir(&destination)
            .map_err(|error| DaemonError::failed("Failed to create the kernel dir", error))?;
        std::fs::rename(kernel, destination.join("vmlinux"))
            .map_err(|error| DaemonError::failed("Failed to move kernel into place", error))?;
        if let Some(initrd) = initrd {
            std::fs::rename(initrd, destination.join("initrd"))
                .map_err(|error| DaemonError::failed("Failed to move initrd into place", error))?;
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
    pub fn remove_unreferenced_files(&self) -> DaemonResult<Vec<String>> {
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

    pub fn remove_image(&self, name: &str) -> DaemonResult<Image> {
        let image = self.image(name)?;
        self.store.delete_image(name)?;
        remove_file_if_present(Path::new(&image.path))?;
        Ok(image)
    }

    pub async fn import_kernel(
        &self,
        peer: Peer,
        params: ImportKernelParams,
    ) -> DaemonResult<Kernel> {
        validate_artifact_name("kernel", &params.name).map_err(DaemonError::invalid_params)?;
        if self.store.find_kernel(&params.name)?.is_some() {
            return Err(DaemonError::new(
                ErrorKind::AlreadyExists,
                format!("Kernel `{}` already exists", params.name),
            )
            .with_hint(format!(
                "remove it first with `banger kernel rm {}`",
                params.name
            )));
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
            return Err(DaemonError::invalid_params(
                "Kernel command line must be one line",
            ));
        }
        if let Some(source) = params.from_debian.clone() {
            if !params.path.is_empty() || params.initrd.is_some() {
                return Err(DaemonError::invalid_params(
                    "A kernel imported from Debian takes no kernel file or initrd",
                ));
            }
            let this = self.clone();
            return tokio::task::spawn_blocking(move || {
                this.import_debian_kernel_blocking(&peer, &params.name, &source, cmdline)
            })
            .await
            .map_err(|error| DaemonError::failed("Kernel import task failed", error))?;
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
        .map_err(|error| DaemonError::failed("Kernel import task failed", error))?
    }

    fn import_debian_kernel_blocking(
        &self,
        peer: &Peer,
        name: &str,
        source: &str,
        cmdline: String,
    ) -> DaemonResult<Kernel> {
        if source.starts_with('/') {
            // The package directory is read with the caller's rights.
            open_source(peer, source, "kernel package", true)?;
        }
        let located = DebianKernel::locate(Path::new("/"), source)
            .map_err(|error| DaemonError::invalid_params(error.to_string()))?;
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
        let build_error = |error: InitramfsError| {
            DaemonError::failed(
                format!(
                    "Failed to build the initramfs for kernel {}",
                    located.release
                ),
                error,
            )
        };
        let modules = KernelModules::open(&located.modules).map_err(build_error)?;
        let (archive, _) = initramfs::build_agent_initramfs(
            &modules,
            initramfs::REQUIRED_MODULES,
            initramfs::OPTIONAL_MODULES,
            &agent,
        )
        .map_err(build_error)?;
        let output = std::fs::File::create(&initrd_path).map_err(|error| {
            DaemonError::failed(format!("Failed to create {}", initrd_path.display()), error)
        })?;
        archive
            .write_gzip(std::io::BufWriter::new(output))
            .map_err(build_error)?;
        let file = std::fs::File::open(&initrd_path).map_err(|error| {
            DaemonError::failed(format!("Failed to reopen {}", initrd_path.display()), error)
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
    ) -> DaemonResult<Kernel> {
        if !files::is_kernel_image(&kernel.file, &kernel.path)
            .map_err(|error| DaemonError::failed("Failed to read kernel", error))?
        {
            return Err(DaemonError::invalid_params(format!(
                "{} is neither an ELF vmlinux nor a bzImage",
                kernel.path.display()
            )));
        }
        let id = new_id();
        let staging = self.paths.tmp().join(format!("kernel-{id}"));
        let mut staging_guard = RemoveOnDrop(Some(staging.clone()));
        std::fs::create_dir(&staging)
            .map_err(|error| DaemonError::failed("Failed to create kernel staging dir", error))?;
        files::copy_with_digest(&mut kernel.file, &kernel.path, &staging.join("vmlinux"))
            .map_err(|error| DaemonError::failed("Failed to copy kernel", error))?;
        let has_initrd = initrd.is_some();
        if let Some(mut initrd) = initrd {
            files::copy_with_digest(&mut initrd.file, &initrd.path, &staging.join("initrd"))
                .map_err(|error| DaemonError::failed("Failed to copy initrd", error))?;
        }
        let destination = self.paths.kernels().join(&id);
        std::fs::rename(&staging, &destination)
            .map_err(|error| DaemonError::failed("Failed to move kernel into place", error))?;
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

    pub fn remove_kernel(&self, name: &str) -> DaemonResult<Kernel> {
        let kernel = self.kernel(name)?;
        self.store.delete_kernel(name)?;
        if let Some(directory) = Path::new(&kernel.kernel_path).parent() {
            match std::fs::remove_dir_all(directory) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(DaemonError::failed(
                        format!("Failed to remove {}", directory.display()),
                        error,
                    ))
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
fn unpack_vmlinux(kernel: &mut OpenSource, output: &Path) -> DaemonResult<Option<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let mut image = Vec::new();
    kernel
        .file
        .read_to_end(&mut image)
        .and_then(|_| kernel.file.rewind())
        .map_err(|error| {
            DaemonError::failed(format!("Failed to read {}", kernel.path.display()), error)
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
        Err(error) => {
            return Err(DaemonError::failed(
                format!(
                    "Failed to unpack the vmlinux from {}",
                    kernel.path.display()
                ),
                error,
            ))
        }
    };
    let write_error =
        |error| DaemonError::failed(format!("Failed to write {}", output.display()), error);
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
pub fn find_agent(candidates: &[PathBuf]) -> DaemonResult<PathBuf> {
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates
                .iter()
                .map(|path| path.display().to_string())
                .collect();
            DaemonError::new(
                ErrorKind::Failed,
                format!(
                    "No static guest agent found (looked at {})",
                    looked.join(", ")
                ),
            )
            .with_hint(
                "build it with scripts/build-agent.sh and set `[agent] path` or install it there",
            )
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
    what: &str,
    directory_allowed: bool,
) -> DaemonResult<OpenSource> {
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(DaemonError::invalid_params(format!(
            "The {what} path {} is not absolute",
            path.display()
        )));
    }
    let file = open_as_peer(peer, &path).map_err(|error| {
        let kind = if error.kind() == std::io::ErrorKind::PermissionDenied {
            ErrorKind::NotAllowed
        } else {
            ErrorKind::InvalidParams
        };
        DaemonError::new(kind, format!("Cannot read {what} {}", path.display())).with_source(error)
    })?;
    let metadata = file.metadata().map_err(|error| {
        DaemonError::failed(format!("Cannot stat {what} {}", path.display()), error)
    })?;
    let is_directory = metadata.is_dir() && directory_allowed;
    if !metadata.is_file() && !is_directory {
        return Err(DaemonError::invalid_params(format!(
            "The {what} {} is not a regular file",
            path.display()
        )));
    }
    Ok(OpenSource {
        path,
        file,
        is_directory,
    })
}

fn remove_file_if_present(path: &Path) -> DaemonResult<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(DaemonError::failed(
            format!("Failed to remove {}", path.display()),
            error,
        )),
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
            error.chain(),
            format!(
                "No static guest agent found (looked at {}, {})",
                missing[0].display(),
                missing[1].display()
            )
        );
        std::fs::write(&missing[1], "agent").unwrap();
        assert_eq!(find_agent(&missing).unwrap(), missing[1]);
    }
}
