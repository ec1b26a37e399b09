//! Catalog pulls: images and kernels named in the configured catalog are
//! downloaded (verified size and sha256, and each file's detached signature
//! with `gpgv` when the entry has one), then registered like imports.
//!
//! Trust:
//! - With `[catalog] keyrings` set, every file of an entry (image; kernel
//!   and its initrd) must have a signature that verifies against them: an
//!   entry missing one is refused before anything is downloaded.
//! - Plain `http:` (the catalog, its artifacts, redirects) is refused unless
//!   `[catalog] allow_insecure_http` is set.
//!
//! Pull protocol:
//! 1. Load the catalog (cached for `[catalog] max_age_seconds`; the cached
//!    copy is used with a warning when the source is unreachable).
//! 2. Stream each file into `STATE_DIR/tmp/` as a `.part` file, reporting
//!    progress to the operation's watchers, verify it, rename it.
//! 3. Register it ([`ImageService`]), which moves it into place. Any failure
//!    removes the downloaded files: a failed pull registers nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use banger_catalog::{
    CatalogCache, CatalogLoadError, CatalogSource, DownloadError, DownloadRequest, Downloader,
    ImageEntry, KernelEntry, Progress, RemoteSignatureError, Url,
};
use banger_proto::image::{OperationStarted, PullParams};
use banger_proto::{ErrorKind, Image, Kernel, OperationState};

use crate::config::CatalogConfig;
use crate::error::{chain, RpcFailure};
use crate::ids::new_id;
use crate::images::{ImageError, ImageService};
use crate::operations::{LiveOperation, OperationError, OperationRegistry, Stage};
use crate::paths::StatePaths;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("No catalog is configured")]
    NotConfigured,
    #[error("Failed to load the catalog")]
    Load(#[source] Box<CatalogLoadError>),
    #[error("{} `{name}` is already registered", .kind.title())]
    AlreadyRegistered { kind: PullKind, name: String },
    #[error(
        "No {} `{name}`{} in the catalog",
        .kind.label(),
        .version.as_ref().map(|version| format!(" version {version}")).unwrap_or_default()
    )]
    NotInCatalog {
        kind: PullKind,
        name: String,
        version: Option<String>,
    },
    #[error("Failed to download {url}")]
    Download {
        url: Url,
        #[source]
        source: Box<DownloadError>,
    },
    #[error("{} `{name}` is signed but no keyring is configured", .kind.title())]
    NoKeyring { kind: PullKind, name: String },
    #[error(
        "{} `{name}` in the catalog has no signature for its {}, and `[catalog] keyrings` requires one",
        .kind.title(),
        .files.join(" and ")
    )]
    Unsigned {
        kind: PullKind,
        name: String,
        files: Vec<&'static str>,
    },
    #[error("{} `{name}` failed signature verification of its {file}", .kind.title())]
    Signature {
        kind: PullKind,
        name: String,
        file: &'static str,
        #[source]
        source: Box<RemoteSignatureError>,
    },
    #[error("{task} task failed")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// Registering the download.
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Operation(#[from] OperationError),
}

impl RpcFailure for CatalogError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotConfigured => ErrorKind::InvalidState,
            Self::AlreadyRegistered { .. } => ErrorKind::AlreadyExists,
            Self::NotInCatalog { .. } => ErrorKind::NotFound,
            Self::Image(error) => error.kind(),
            Self::Operation(error) => error.kind(),
            _ => ErrorKind::Failed,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NotConfigured => Some("set `[catalog] url` in the daemon's config".to_owned()),
            Self::AlreadyRegistered { kind, name } => Some(format!(
                "remove it first with `banger {} rm {name}`",
                kind.label()
            )),
            Self::NoKeyring { .. } => {
                Some("set `[catalog] keyrings` to the signing keys' keyring files".to_owned())
            }
            Self::Unsigned { .. } => Some(
                "ask the catalog's publisher to sign it (`signature_url`, `initrd_signature_url`), or remove `[catalog] keyrings` to accept unsigned entries"
                    .to_owned(),
            ),
            Self::Download { source, .. }
                if matches!(**source, DownloadError::InsecureHttp { .. }) =>
            {
                Some(
                    "use https, or set `[catalog] allow_insecure_http = true` in the daemon's config"
                        .to_owned(),
                )
            }
            Self::NotInCatalog { .. } => Some(
                "check the name and --catalog-version against the catalog at `[catalog] url`"
                    .to_owned(),
            ),
            Self::Download { .. } => Some(
                "check the host's network and the catalog's `[catalog] url`, then pull again"
                    .to_owned(),
            ),
            Self::Signature { .. } => Some(
                "the download or its signature was altered or the keyring is outdated; do not use it, and tell the catalog's publisher"
                    .to_owned(),
            ),
            Self::Image(error) => error.hint(),
            Self::Operation(error) => error.hint(),
            _ => None,
        }
    }
}

pub struct CatalogService {
    cache: Option<CatalogCache>,
    downloader: Downloader,
    keyrings: Vec<PathBuf>,
    max_age: Duration,
    paths: StatePaths,
    images: ImageService,
    operations: Arc<OperationRegistry>,
}

impl CatalogService {
    pub fn new(
        config: &CatalogConfig,
        paths: StatePaths,
        images: ImageService,
        operations: Arc<OperationRegistry>,
    ) -> anyhow::Result<Self> {
        let downloader = if config.allow_insecure_http {
            Downloader::allowing_http()?
        } else {
            Downloader::new()?
        };
        let cache = if config.url.is_empty() {
            None
        } else {
            let source: CatalogSource = config.url.parse()?;
            Some(CatalogCache::new(
                source,
                paths.root.join("catalog"),
                downloader.clone(),
            ))
        };
        Ok(Self {
            cache,
            downloader,
            keyrings: config.keyrings.clone(),
            max_age: Duration::from_secs(config.max_age_seconds),
            paths,
            images,
            operations,
        })
    }

    /// The catalog (fetched again when older than `max_age_seconds`); `None`
    /// when none is configured.
    pub async fn catalog(&self) -> Result<Option<banger_catalog::Catalog>, CatalogError> {
        let Some(cache) = &self.cache else {
            return Ok(None);
        };
        let loaded = cache
            .load(self.max_age)
            .await
            .map_err(|error| CatalogError::Load(Box::new(error)))?;
        if let Some(warning) = loaded.warning() {
            tracing::warn!("{warning}");
        }
        Ok(Some(loaded.catalog))
    }

    /// The catalog's entry for image `name`; `None` without a catalog or entry.
    pub async fn image_entry(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<ImageEntry>, CatalogError> {
        Ok(self
            .catalog()
            .await?
            .and_then(|catalog| catalog.image(name, version).cloned()))
    }

    pub async fn kernel_entry(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<KernelEntry>, CatalogError> {
        Ok(self
            .catalog()
            .await?
            .and_then(|catalog| catalog.kernel(name, version).cloned()))
    }

    /// With keyrings configured, refuses an entry with any file unsigned.
    fn require_signatures(
        &self,
        kind: PullKind,
        name: &str,
        unsigned: Vec<&'static str>,
    ) -> Result<(), CatalogError> {
        if self.keyrings.is_empty() || unsigned.is_empty() {
            return Ok(());
        }
        Err(CatalogError::Unsigned {
            kind,
            name: name.to_owned(),
            files: unsigned,
        })
    }

    /// Checks `file` against its detached signature at `signature_url`
    /// (none: nothing to check; [`Self::require_signatures`] decided
    /// whether that is allowed). Removes `file` when it fails.
    async fn verify(
        &self,
        kind: PullKind,
        name: &str,
        what: &'static str,
        file: &std::path::Path,
        signature_url: Option<&Url>,
    ) -> Result<(), CatalogError> {
        let Some(signature_url) = signature_url else {
            return Ok(());
        };
        let outcome = if self.keyrings.is_empty() {
            Err(CatalogError::NoKeyring {
                kind,
                name: name.to_owned(),
            })
        } else {
            banger_catalog::verify_signature_from_url(
                &self.downloader,
                file,
                signature_url,
                &self.keyrings,
            )
            .await
            .map(drop)
            .map_err(|source| CatalogError::Signature {
                kind,
                name: name.to_owned(),
                file: what,
                source: Box::new(source),
            })
        };
        if outcome.is_err() {
            let _ = std::fs::remove_file(file);
        }
        outcome
    }

    /// Downloads and verifies one file into `tmp/`, reporting progress.
    async fn download(
        &self,
        request: DownloadRequest,
        operation: &Arc<LiveOperation>,
        stage: &Stage,
    ) -> Result<banger_catalog::Downloaded, CatalogError> {
        let mut meter = operation.meter(stage);
        let downloaded = self
            .downloader
            .download(
                &request,
                &operation.cancellation(),
                |Progress { downloaded, total }| meter.update(downloaded, total),
            )
            .await;
        meter.finish();
        downloaded.map_err(|source| {
            if operation.is_cancelled() {
                operation.cancelled_error().into()
            } else {
                CatalogError::Download {
                    url: request.url.clone(),
                    source: Box::new(source),
                }
            }
        })
    }

    /// Downloads, verifies and registers image `entry` under its name.
    pub async fn pull_image(
        &self,
        entry: &ImageEntry,
        operation: &Arc<LiveOperation>,
        stage: &Stage,
    ) -> Result<Image, CatalogError> {
        self.require_signatures(PullKind::Image, &entry.name, entry.unsigned_files())?;
        let request = DownloadRequest {
            url: entry.url.clone(),
            expected_size: Some(entry.size),
            expected_sha256: entry.sha256,
            dest_dir: self.paths.tmp(),
            file_name: format!("pull-{}.ext4", new_id()),
            keep_partial: false,
        };
        let downloaded = self.download(request, operation, stage).await?;
        self.verify(
            PullKind::Image,
            &entry.name,
            "image",
            &downloaded.path,
            entry.signature_url.as_ref(),
        )
        .await?;
        let images = self.images.clone();
        let name = entry.name.clone();
        let source = format!("{} (catalog {} {})", entry.url, entry.name, entry.version);
        let digest = format!("sha256:{}", downloaded.sha256);
        tokio::task::spawn_blocking(move || {
            images.register_downloaded_image(&name, &downloaded.path, digest, source)
        })
        .await
        .map_err(|source| CatalogError::Task {
            task: "Image registration",
            source,
        })?
        .map_err(CatalogError::from)
    }

    /// Downloads, verifies (signature too, when the entry has one) and
    /// registers kernel `entry` under its name.
    pub async fn pull_kernel(
        &self,
        entry: &KernelEntry,
        operation: &Arc<LiveOperation>,
        stage: &Stage,
    ) -> Result<Kernel, CatalogError> {
        self.require_signatures(PullKind::Kernel, &entry.name, entry.unsigned_files())?;
        let id = new_id();
        let kernel = self
            .download(
                DownloadRequest {
                    url: entry.url.clone(),
                    expected_size: Some(entry.size),
                    expected_sha256: entry.sha256,
                    dest_dir: self.paths.tmp(),
                    file_name: format!("pull-{id}-vmlinux"),
                    keep_partial: false,
                },
                operation,
                stage,
            )
            .await?;
        let kernel_path = kernel.path.clone();
        let remove_kernel = || {
            let _ = std::fs::remove_file(&kernel_path);
        };
        self.verify(
            PullKind::Kernel,
            &entry.name,
            "kernel",
            &kernel_path,
            entry.signature_url.as_ref(),
        )
        .await?;
        let initrd = match &entry.initrd {
            Some(initrd) => match self
                .download(
                    DownloadRequest {
                        url: initrd.url.clone(),
                        expected_size: initrd.size,
                        expected_sha256: initrd.sha256,
                        dest_dir: self.paths.tmp(),
                        file_name: format!("pull-{id}-initrd"),
                        keep_partial: false,
                    },
                    operation,
                    stage,
                )
                .await
            {
                Ok(downloaded) => {
                    if let Err(error) = self
                        .verify(
                            PullKind::Kernel,
                            &entry.name,
                            "initrd",
                            &downloaded.path,
                            initrd.signature_url.as_ref(),
                        )
                        .await
                    {
                        remove_kernel();
                        return Err(error);
                    }
                    Some(downloaded.path)
                }
                Err(error) => {
                    remove_kernel();
                    return Err(error);
                }
            },
            None => None,
        };
        let images = self.images.clone();
        let name = entry.name.clone();
        let cmdline = entry.cmdline.clone();
        let source = format!("{} (catalog {} {})", entry.url, entry.name, entry.version);
        tokio::task::spawn_blocking(move || {
            images.register_downloaded_kernel(
                &name,
                &kernel_path,
                initrd.as_deref(),
                cmdline,
                source,
            )
        })
        .await
        .map_err(|source| CatalogError::Task {
            task: "Kernel registration",
            source,
        })?
        .map_err(CatalogError::from)
    }

    /// `image.pull` / `kernel.pull`: starts the pull as an operation.
    pub async fn start_pull(
        self: &Arc<Self>,
        kind: PullKind,
        params: PullParams,
    ) -> Result<OperationStarted, CatalogError> {
        let registered = match kind {
            PullKind::Image => self.images.image(&params.name).is_ok(),
            PullKind::Kernel => self.images.kernel(&params.name).is_ok(),
        };
        if registered {
            return Err(CatalogError::AlreadyRegistered {
                kind,
                name: params.name,
            });
        }
        if self.cache.is_none() {
            return Err(CatalogError::NotConfigured);
        }
        let version = params.version.as_deref();
        let missing = || CatalogError::NotInCatalog {
            kind,
            name: params.name.clone(),
            version: params.version.clone(),
        };
        let entry = match kind {
            PullKind::Image => PullEntry::Image(Box::new(
                self.image_entry(&params.name, version)
                    .await?
                    .ok_or_else(missing)?,
            )),
            PullKind::Kernel => PullEntry::Kernel(Box::new(
                self.kernel_entry(&params.name, version)
                    .await?
                    .ok_or_else(missing)?,
            )),
        };
        match &entry {
            PullEntry::Image(entry) => {
                self.require_signatures(kind, &entry.name, entry.unsigned_files())?;
            }
            PullEntry::Kernel(entry) => {
                self.require_signatures(kind, &entry.name, entry.unsigned_files())?;
            }
        }
        let label = kind.label();
        let operation = self.operations.begin_on(
            &format!("{label}.pull"),
            "",
            "",
            format!("{label} {}", params.name),
        )?;
        let started = OperationStarted {
            operation_id: operation.id.clone(),
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = match &entry {
                PullEntry::Image(entry) => {
                    let stage = operation.start_stage("pull image");
                    let outcome = this.pull_image(entry, &operation, &stage).await.map(drop);
                    end(&operation, &stage, outcome)
                }
                PullEntry::Kernel(entry) => {
                    let stage = operation.start_stage("pull kernel");
                    let outcome = this.pull_kernel(entry, &operation, &stage).await.map(drop);
                    end(&operation, &stage, outcome)
                }
            };
            match outcome {
                Ok(()) => operation.finish(OperationState::Succeeded, None, None),
                Err(error) if operation.is_cancelled() => {
                    operation.finish(OperationState::Cancelled, Some(chain(&error)), None);
                }
                Err(error) => operation.finish(OperationState::Failed, Some(chain(&error)), None),
            }
            this.operations.retire(&operation.id);
        });
        Ok(started)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum PullKind {
    Image,
    Kernel,
}

impl PullKind {
    /// `image` or `kernel`, as commands and operation kinds say it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Kernel => "kernel",
        }
    }

    /// The label starting a sentence.
    pub fn title(self) -> &'static str {
        match self {
            Self::Image => "Image",
            Self::Kernel => "Kernel",
        }
    }
}

enum PullEntry {
    Image(Box<ImageEntry>),
    Kernel(Box<KernelEntry>),
}

fn end(
    operation: &LiveOperation,
    stage: &Stage,
    outcome: Result<(), CatalogError>,
) -> Result<(), CatalogError> {
    match &outcome {
        Ok(()) => operation.finish_stage(stage, None),
        Err(error) => operation.fail_stage(stage, error),
    }
    outcome
}
