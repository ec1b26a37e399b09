//! Image import: copies an ext4 source, or unpacks any other and builds an
//! ext4 image of it, then moves it into `images/` and registers it (steps
//! 2-3 of the import protocol in the module doc).

use std::path::{Path, PathBuf};

use banger_proto::{Image, ImportImageParams};

use super::{open_source, ImageError, ImageService, OpenSource, RemoveOnDrop};
use crate::access::Peer;
use crate::files;
use crate::ids::{new_id, now, validate_artifact_name};

impl ImageService {
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
            let source = open_source(&peer, &params.path, "image", None)?;
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
        crate::fault::pause_at(|| "image import:copy".to_owned());
        let is_ext4 =
            !is_directory && files::is_ext4(&file, &source).map_err(ImageError::ReadImage)?;
        let (digest, description) = if is_ext4 {
            let metadata = file.metadata().map_err(|error| {
                ImageError::ReadImage(files::FileError::Read {
                    path: source.clone(),
                    source: error,
                })
            })?;
            // The copy keeps holes: the source's data is what it needs.
            files::check_free_space(
                &self.paths.tmp(),
                files::allocated_bytes(&metadata),
                "the image",
            )?;
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
        crate::fault::pause_at(|| "image import:move".to_owned());
        let destination = self.paths.images().join(format!("{id}.ext4"));
        std::fs::rename(&temporary, &destination).map_err(ImageError::MoveImage)?;
        temporary_guard.disarm();
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        crate::fault::pause_at(|| "image import:register".to_owned());
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
            // Read through its descriptor: name the file as the caller did.
            source: match error {
                unpack::UnpackError::UnknownFormat { .. } => unpack::UnpackError::UnknownFormat {
                    path: source.to_owned(),
                },
                other => other,
            },
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
}
