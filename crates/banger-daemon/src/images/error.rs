//! [`ImageError`]: what finding, importing, registering and removing images
//! and kernels fails with, and its RPC error code and hint.

use std::path::PathBuf;

use banger_disk::confined::ConfinedError;
use banger_disk::ext4::Ext4Error;
use banger_disk::initramfs::{InitramfsError, LocateKernelError};
use banger_disk::unpack::UnpackError;
use banger_disk::vmlinux::VmlinuxError;
use banger_proto::ErrorKind;
use banger_store::StoreError;

use crate::error::{RpcFailure, StoreFailure};
use crate::files::FileError;
use crate::ids::InvalidArtifactName;

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
    #[error("The {what} {path} is larger than the {limit} bytes allowed")]
    SourceTooLarge {
        what: &'static str,
        path: PathBuf,
        limit: u64,
    },
    #[error("Could not take the caller's identity to read their files")]
    AssumeIdentity(#[source] std::io::Error),
    /// A file of a kernel package, read beneath the package as the caller.
    #[error(transparent)]
    PackageFile(#[from] ConfinedError),

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
    #[error(transparent)]
    NoSpace(#[from] crate::files::NoSpace),
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
    #[error("Failed to read the guest agent {path}")]
    ReadAgent {
        path: PathBuf,
        #[source]
        source: ConfinedError,
    },
    #[error("No static guest agent found (looked at {}{})", list_paths(.candidates), skipped_agents(.skipped))]
    AgentNotFound {
        candidates: Vec<PathBuf>,
        /// `path: why`, for each file that was not a static executable.
        skipped: Vec<String>,
    },
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
    /// The import's operation: registering it, or cancelled.
    #[error(transparent)]
    Operation(#[from] crate::operations::OperationError),
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
            Self::PackageFile(ConfinedError::Open { source, .. })
            | Self::BuildInitramfs {
                source: InitramfsError::File(ConfinedError::Open { source, .. }),
                ..
            } if source.kind() == std::io::ErrorKind::PermissionDenied => ErrorKind::NotAllowed,
            Self::BuildInitramfs {
                source:
                    InitramfsError::File(_)
                    | InitramfsError::DecompressedTooLarge { .. }
                    | InitramfsError::Decompress { .. }
                    | InitramfsError::ParseModulesDep { .. }
                    | InitramfsError::UnknownModule { .. }
                    | InitramfsError::NotAModule { .. },
                ..
            } => ErrorKind::InvalidParams,
            Self::InvalidName(_)
            | Self::MultilineCommandLine
            | Self::DebianKernelWithFiles
            | Self::RelativePath { .. }
            | Self::OpenSource { .. }
            | Self::NotAFile { .. }
            | Self::SourceTooLarge { .. }
            | Self::PackageFile(_)
            | Self::UnknownFormat { .. }
            | Self::Unpack { .. }
            | Self::NotAKernel { .. }
            | Self::LocateDebianKernel(_) => ErrorKind::InvalidParams,
            Self::Store(error) => error.kind(),
            Self::Operation(error) => error.kind(),
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
            Self::InvalidName(_) => "pick a name such as `debian-12` or `golden.v2`".to_owned(),
            Self::MultilineCommandLine => "pass --cmdline as one line of kernel arguments".to_owned(),
            Self::DebianKernelWithFiles => "drop the kernel file and --initrd, or drop --from-debian".to_owned(),
            Self::RelativePath { .. } => "pass an absolute path; `banger` makes relative paths absolute for you".to_owned(),
            Self::OpenSource { source, .. } | Self::StatSource { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                "the file is read as you: make it readable by you, or copy it somewhere you can read".to_owned()
            }
            Self::OpenSource { .. } | Self::StatSource { .. } => {
                "check the path; it is read by you, from this directory".to_owned()
            }
            Self::NotAFile { .. } => "pass a regular file (not a device, pipe or socket)".to_owned(),
            Self::SourceTooLarge { .. } => "pass a smaller file; a kernel and its initrd are tens of MiB at most".to_owned(),
            Self::NotAKernel { .. } => "pass the kernel image itself (`/boot/vmlinuz-*` or a vmlinux), or use `banger kernel import NAME --from-debian`".to_owned(),
            Self::LocateDebianKernel(_) => "install one (`apt install linux-image-cloud-amd64`), or pass --from-debian a release from `ls /lib/modules` or an unpacked package (`dpkg-deb -x`)".to_owned(),
            Self::Unpack {
                source: UnpackError::UnsafeEntry { .. },
                ..
            } => "repack the archive without that entry".to_owned(),
            Self::Unpack {
                source: UnpackError::TooLarge { .. } | UnpackError::EntryTooLarge { .. },
                ..
            } => "trim the tree (caches, build outputs) before packing it, or import an ext4 image".to_owned(),
            Self::NoSpace(_) => "free space in the daemon's state dir, or remove images and VMs you no longer need".to_owned(),
            Self::DownloadNotExt4 { .. } | Self::DownloadNotAKernel { .. } => "the catalog entry is wrong; tell its publisher, or `banger image import` a local file".to_owned(),
            Self::UnknownFormat { .. } => "images are ext4 files, tarballs (plain, gzip, zstd), OCI layouts, `docker save` archives or directories".to_owned(),
            Self::AgentNotFound { .. } => {
                "build a static one with scripts/build-agent.sh and set `[agent] path` or install it there"
                    .to_owned()
            }
            Self::Store(error) => return error.hint(),
            Self::Operation(error) => return error.hint(),
            _ => return None,
        })
    }
}

/// `; skipped a: why, b: why`, or nothing.
fn skipped_agents(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!("; skipped {}", skipped.join(", "))
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

#[cfg(test)]
mod tests {
    use super::*;

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
