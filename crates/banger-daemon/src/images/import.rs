//! Image import: copies an ext4 source (stage `copy image`, with bytes), or
//! unpacks any other (`unpack image`, with the bytes of a tarball) and
//! builds an ext4 image of it (`build image`), then moves it into `images/`
//! and registers it (`register image`): steps 2-3 of the import protocol in
//! the module doc, as an operation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_proto::image::OperationStarted;
use banger_proto::{Image, ImportImageParams};

use super::operation::{copy_file, spawn_import, stage};
use super::{open_source, ImageError, ImageService, OpenSource, RemoveOnDrop};
use crate::access::Peer;
use crate::files;
use crate::ids::{new_id, now, validate_artifact_name};
use crate::operations::{LiveOperation, OperationRegistry};

impl ImageService {
    /// `image.import`: checks the name and the source (opened as the
    /// caller; its format, and the free space an ext4 copy needs), then
    /// imports it as an operation (see [`super::operation`]).
    pub async fn start_image_import(
        &self,
        peer: Peer,
        params: ImportImageParams,
        operations: &Arc<OperationRegistry>,
    ) -> Result<OperationStarted, ImageError> {
        validate_artifact_name("image", &params.name)?;
        if self.store.find_image(&params.name)?.is_some() {
            return Err(ImageError::ImageExists { name: params.name });
        }
        let this = self.clone();
        let source = tokio::task::spawn_blocking(move || {
            let source = open_source(&peer, &params.path, "image", None)?;
            this.check_image_source(&peer, source)
        })
        .await
        .map_err(|source| ImageError::Task {
            task: "Image import",
            source,
        })??;
        let this = self.clone();
        let name = params.name;
        spawn_import(operations, "image", &name.clone(), move |operation| {
            this.import_image_blocking(&name, source, operation)
        })
    }

    /// What can be known of an import's source before it is copied: a
    /// directory only root may import, an archive's format, an ext4
    /// image's room in `tmp/`.
    fn check_image_source(
        &self,
        peer: &Peer,
        source: OpenSource,
    ) -> Result<CheckedSource, ImageError> {
        if source.is_directory && peer.uid != 0 {
            return Err(ImageError::DirectoryNeedsRoot { path: source.path });
        }
        let is_ext4 = !source.is_directory
            && files::is_ext4(&source.file, &source.path).map_err(ImageError::ReadImage)?;
        if is_ext4 {
            let metadata = source.file.metadata().map_err(|error| {
                ImageError::ReadImage(files::FileError::Read {
                    path: source.path.clone(),
                    source: error,
                })
            })?;
            // The copy keeps holes: the source's data is what it needs.
            files::check_free_space(
                &self.paths.tmp(),
                files::allocated_bytes(&metadata),
                "the image",
            )?;
            return Ok(CheckedSource {
                source,
                length: Some(metadata.len()),
            });
        }
        banger_disk::unpack::detect(&readable(&source))
            .map_err(|error| unknown_format(&source.path, error))?;
        Ok(CheckedSource {
            source,
            length: None,
        })
    }

    fn import_image_blocking(
        &self,
        name: &str,
        checked: CheckedSource,
        operation: &Arc<LiveOperation>,
    ) -> Result<Image, ImageError> {
        let CheckedSource { mut source, length } = checked;
        let id = new_id();
        let temporary = self.paths.tmp().join(format!("image-{id}.ext4"));
        let mut temporary_guard = RemoveOnDrop(Some(temporary.clone()));
        crate::fault::pause_at(|| "image import:copy".to_owned());
        let (digest, description) = match length {
            Some(total) => stage(operation, "copy image", |stage| {
                let mut meter = operation.meter(stage);
                let copied = copy_file(
                    operation,
                    &mut meter,
                    (0, total),
                    &mut source.file,
                    &source.path,
                    &temporary,
                );
                meter.finish();
                let digest = copied.map_err(|error| ImageError::CopyImage {
                    path: source.path.clone(),
                    source: error,
                })?;
                Ok((digest, "ext4 image".to_owned()))
            })?,
            None => {
                let staging = self.paths.tmp().join(format!("unpack-{id}"));
                let _staging_guard = RemoveOnDrop(Some(staging.clone()));
                let kind = stage(operation, "unpack image", |stage| {
                    let mut meter = operation.meter(stage);
                    let unpacked = self.unpack_image(&source, &staging, &mut |read, total| {
                        meter.update(read, Some(total));
                        !operation.is_cancelled()
                    });
                    meter.finish();
                    unpacked
                })?;
                stage(operation, "build image", |_| {
                    banger_disk::ext4::build_from_directory(
                        &staging,
                        &temporary,
                        &banger_disk::ext4::BuildOptions::default(),
                    )
                    .map_err(|error| ImageError::BuildExt4(Box::new(error)))?;
                    let mut built =
                        std::fs::File::open(&temporary).map_err(ImageError::OpenBuiltImage)?;
                    let digest = files::digest(&mut built, &temporary)
                        .map_err(ImageError::HashBuiltImage)?;
                    Ok((digest, kind))
                })?
            }
        };
        stage(operation, "register image", |_| {
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
                id: id.clone(),
                name: name.to_owned(),
                path: destination.display().to_string(),
                size_bytes,
                digest,
                source: format!("{} ({description})", source.path.display()),
                created_at: now(),
            };
            self.store.insert_image(&image)?;
            destination_guard.disarm();
            Ok(image)
        })
    }

    /// Unpacks a non-ext4 source (tarball, OCI layout, `docker save`
    /// archive, directory; [`Self::check_image_source`] checked it) into
    /// the new directory `staging`, refusing hostile entries; `progress`
    /// hears the bytes of a tarball read. Returns what the source was.
    fn unpack_image(
        &self,
        source: &OpenSource,
        staging: &Path,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<String, ImageError> {
        use banger_disk::unpack;
        let readable = readable(source);
        let kind =
            unpack::detect(&readable).map_err(|error| unknown_format(&source.path, error))?;
        let options = unpack::UnpackOptions {
            allow_devices: self.allow_device_nodes,
            ..unpack::UnpackOptions::default()
        };
        unpack::unpack_reporting(&readable, staging, &options, progress).map_err(|error| {
            ImageError::Unpack {
                path: source.path.clone(),
                source: error,
            }
        })?;
        Ok(kind.describe().to_owned())
    }
}

/// A source checked before its import starts; `length` is an ext4 image's
/// (`None`: it is unpacked and built).
struct CheckedSource {
    source: OpenSource,
    length: Option<u64>,
}

/// The path the unpacker reads: an archive through the descriptor opened
/// as the caller; a directory tree by its path, file by file as root (so
/// only root may import one).
fn readable(source: &OpenSource) -> PathBuf {
    use std::os::fd::AsRawFd;
    if source.is_directory {
        source.path.clone()
    } else {
        PathBuf::from(format!("/proc/self/fd/{}", source.file.as_raw_fd()))
    }
}

/// A source no unpacker recognises. It is read through its descriptor
/// (`/proc/self/fd/N`): the error names the file as the caller did.
fn unknown_format(path: &Path, error: banger_disk::unpack::UnpackError) -> ImageError {
    use banger_disk::unpack::UnpackError;
    ImageError::UnknownFormat {
        path: path.to_owned(),
        source: match error {
            UnpackError::UnknownFormat { .. } => UnpackError::UnknownFormat {
                path: path.to_owned(),
            },
            other => other,
        },
    }
}
