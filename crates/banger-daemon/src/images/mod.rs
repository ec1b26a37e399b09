//! ImageService: registers root filesystem images and guest kernels.
//!
//! Import protocol, the same for both kinds:
//! 1. Check the name and that the caller may read the source (and what
//!    else can be checked before copying); then answer with an operation
//!    whose stages do steps 2-3, reporting the bytes copied
//!    ([`operation`]).
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
//!
//! One room per job:
//! - this file: the service, lookups, removal (of one image or kernel, and
//!   of files no row references), and the pieces every import shares
//!   (opening a source as the caller, removing what a failed step made);
//! - [`import`]: image import: copying an ext4 image, or unpacking a source
//!   and building one;
//! - [`kernel`]: kernel import, `--from-debian`, and where the guest agent
//!   is found;
//! - [`downloads`]: registering images and kernels the catalog downloaded;
//! - [`operation`]: imports as operations with stages and byte progress;
//! - [`error`]: [`ImageError`], what all of these fail with.

mod downloads;
mod error;
mod import;
mod kernel;
mod operation;

use std::path::{Path, PathBuf};

use banger_proto::{Image, Kernel};
use banger_store::Store;

use crate::access::{open_as_peer, Peer};
use crate::paths::StatePaths;

pub use error::ImageError;
pub use kernel::{
    agent_candidates, find_agent, AGENT_INSTALL_PATHS, DEBIAN_KERNEL_CMDLINE,
    DEFAULT_KERNEL_CMDLINE,
};

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

/// An import source, opened once with the caller's rights; everything
/// after reads this descriptor.
struct OpenSource {
    path: PathBuf,
    file: std::fs::File,
    is_directory: bool,
}

/// Opens the source of an import: an absolute path to a regular file the
/// caller may read (checked by the kernel as the caller, see
/// [`open_as_peer`]), of at most `limit` bytes when one is given. Image
/// imports (`limit` `None`) also take a directory.
fn open_source(
    peer: &Peer,
    path: &str,
    what: &'static str,
    limit: Option<u64>,
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
    let is_directory = metadata.is_dir() && limit.is_none();
    if !metadata.is_file() && !is_directory {
        return Err(ImageError::NotAFile { what, path });
    }
    if let Some(limit) = limit {
        if metadata.len() > limit {
            return Err(ImageError::SourceTooLarge { what, path, limit });
        }
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
