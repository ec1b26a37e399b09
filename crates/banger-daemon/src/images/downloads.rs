//! Registering images and kernels the catalog downloaded and verified into
//! `STATE_DIR/tmp/`: checked, moved into place and inserted, or removed.

use std::path::Path;

use banger_proto::{Image, Kernel};

use super::{ImageError, ImageService, RemoveOnDrop, DEFAULT_KERNEL_CMDLINE};
use crate::files;
use crate::ids::{new_id, now, validate_artifact_name};

impl ImageService {
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
}
