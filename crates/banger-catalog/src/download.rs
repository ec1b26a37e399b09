//! Verified, resumable downloads of catalog artifacts.
//!
//! # Protocol
//!
//! 1. The artifact streams into `DEST_DIR/NAME.part`, never into `NAME`.
//! 2. If `NAME.part` already exists (an earlier attempt was interrupted and
//!    kept it, or the daemon died mid-download), the download asks for the
//!    rest with `Range: bytes=LEN-`. A `206` whose `Content-Range` starts at
//!    `LEN` is appended; a `200` means the server ignores ranges, so the part
//!    file is truncated and the download starts over; a `416` drops the part
//!    file and starts over.
//! 3. Every byte, including those already in the part file, goes through
//!    SHA-256. The download stops as soon as it exceeds the expected size.
//! 4. At the end the size and digest are compared with the catalog's; on a
//!    match the part file is synced and renamed to `NAME` (atomic within a
//!    directory), so `NAME` either does not exist or is complete and verified.
//! 5. On a mismatch the part file is removed, always. If the mismatching
//!    bytes came partly from a resumed part file, the download runs once more
//!    from zero before giving up: the part file may have come from an older
//!    artifact.
//! 6. On an interruption (connection refused or dropped, HTTP error status,
//!    cancellation, the future being dropped) the part file is removed,
//!    unless the request sets `keep_partial`, in which case it stays for the
//!    next attempt to resume.
//!
//! `file://` URLs are copied with the same part file, verification and
//! rename, without resuming. Two downloads into the same destination at once
//! are the caller's to prevent (the daemon holds a per-artifact lock).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::digest::Sha256Digest;

/// What to download and what it must turn out to be.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    pub url: Url,
    /// The size in bytes, when the catalog states it.
    pub expected_size: Option<u64>,
    pub expected_sha256: Sha256Digest,
    /// Where the file lands; created if missing. The part file lives here
    /// too, so the final rename never crosses a file system.
    pub dest_dir: PathBuf,
    /// The final file name inside `dest_dir`; a single path component.
    pub file_name: String,
    /// Keep `NAME.part` after an interruption so the next attempt resumes.
    pub keep_partial: bool,
}

/// Reported after the request is answered and after every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in the part file so far, including resumed ones.
    pub downloaded: u64,
    /// The expected size, else the size the server announced, if any.
    pub total: Option<u64>,
}

/// A finished, verified download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: Sha256Digest,
    /// How many bytes came from an earlier part file (0 for a fresh start).
    pub resumed_from: u64,
}

/// Why a download or fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("Could not build the HTTP client")]
    BuildClient {
        #[source]
        source: reqwest::Error,
    },
    #[error("Invalid download file name `{name}`: it must be one path component")]
    InvalidFileName { name: String },
    #[error("Unsupported URL {url}: use http, https or file")]
    UnsupportedUrl { url: Url },
    #[error("Refused plain-http URL {url}: only https and file are allowed")]
    InsecureHttp { url: Url },
    #[error("Could not create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not fetch {url}")]
    Request {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}")]
    HttpStatus { url: Url, status: u16 },
    #[error("Download of {url} was interrupted after {received} of {} bytes", describe_total(*.total))]
    Interrupted {
        url: Url,
        received: u64,
        total: Option<u64>,
        #[source]
        source: reqwest::Error,
    },
    #[error("Download of {url} was cancelled after {received} bytes")]
    Cancelled { url: Url, received: u64 },
    #[error("{url} announces {announced} bytes, expected {expected}")]
    AnnouncedSizeMismatch {
        url: Url,
        expected: u64,
        announced: u64,
    },
    #[error("{url} sent more than the expected {expected} bytes")]
    Oversized { url: Url, expected: u64 },
    #[error("Size mismatch for {url}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        url: Url,
        expected: u64,
        actual: u64,
    },
    #[error("SHA-256 mismatch for {url}: expected {expected}, got {actual}")]
    DigestMismatch {
        url: Url,
        // Boxed to keep every `Result` carrying this error small.
        expected: Box<Sha256Digest>,
        actual: Box<Sha256Digest>,
    },
    #[error("{url} is larger than the {limit} bytes allowed")]
    TooLarge { url: Url, limit: u64 },
}

fn describe_total(total: Option<u64>) -> String {
    total.map_or_else(
        || "an unknown number of".to_owned(),
        |total| total.to_string(),
    )
}

impl DownloadError {
    /// The bytes received were proven wrong (size or digest).
    #[must_use]
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            Self::AnnouncedSizeMismatch { .. }
                | Self::Oversized { .. }
                | Self::SizeMismatch { .. }
                | Self::DigestMismatch { .. }
        )
    }

    /// The transfer stopped before the end without proving anything wrong;
    /// a retry may resume.
    #[must_use]
    pub fn is_interruption(&self) -> bool {
        matches!(
            self,
            Self::Request { .. }
                | Self::HttpStatus { .. }
                | Self::Interrupted { .. }
                | Self::Cancelled { .. }
        )
    }
}

/// Downloads over HTTPS with rustls (plain HTTP only when built with
/// [`Downloader::allowing_http`]), and copies `file://` URLs. Cheap to
/// clone; clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    allow_http: bool,
}

/// How long to wait for a TCP/TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stalled transfer may go without a byte before it counts as
/// dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const READ_BUFFER: usize = 256 * 1024;

impl Downloader {
    /// A downloader with banger's user agent and timeouts that refuses
    /// plain `http:` URLs, and redirects to them.
    pub fn new() -> Result<Self, DownloadError> {
        Self::build(false)
    }

    /// [`Self::new`], but plain `http:` is allowed too: anyone on the path
    /// can then change what is fetched (sizes and digests still hold only
    /// as far as the catalog document itself was not changed).
    pub fn allowing_http() -> Result<Self, DownloadError> {
        Self::build(true)
    }

    fn build(allow_http: bool) -> Result<Self, DownloadError> {
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if !allow_http && attempt.url().scheme() == "http" {
                let refused = format!("refused redirect to plain-http {}", attempt.url());
                attempt.error(refused)
            } else if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(redirects)
            .build()
            .map_err(|source| DownloadError::BuildClient { source })?;
        Ok(Self { client, allow_http })
    }

    /// A downloader using a client the caller configured (proxies, roots,
    /// redirects); `allow_http` as for [`Self::allowing_http`].
    #[must_use]
    pub fn with_client(client: reqwest::Client, allow_http: bool) -> Self {
        Self { client, allow_http }
    }

    /// Whether plain `http:` URLs are fetched.
    #[must_use]
    pub fn allows_http(&self) -> bool {
        self.allow_http
    }

    /// Refuses `http:` unless allowed.
    fn check_transport(&self, url: &Url) -> Result<(), DownloadError> {
        if url.scheme() == "http" && !self.allow_http {
            return Err(DownloadError::InsecureHttp { url: url.clone() });
        }
        Ok(())
    }

    /// Fetches a small document (a catalog, a signature) into memory,
    /// refusing more than `limit` bytes.
    pub async fn fetch_bytes(&self, url: &Url, limit: u64) -> Result<Vec<u8>, DownloadError> {
        self.check_transport(url)?;
        let mut body = match url.scheme() {
            "file" => Body::File(open_source(url).await?),
            "http" | "https" => Body::Http(self.send(url, None).await?),
            _ => return Err(DownloadError::UnsupportedUrl { url: url.clone() }),
        };
        if let Body::Http(response) = &body {
            if !response.status().is_success() {
                return Err(DownloadError::HttpStatus {
                    url: url.clone(),
                    status: response.status().as_u16(),
                });
            }
        }
        let mut document = Vec::new();
        while let Some(chunk) = body.next_chunk(url).await? {
            document.extend_from_slice(&chunk);
            if document.len() as u64 > limit {
                return Err(DownloadError::TooLarge {
                    url: url.clone(),
                    limit,
                });
            }
        }
        Ok(document)
    }

    /// Downloads `request.url` into `request.dest_dir/request.file_name`,
    /// verified, following the protocol in the module docs. `cancel` stops
    /// it between chunks; dropping the future stops it too.
    pub async fn download(
        &self,
        request: &DownloadRequest,
        cancel: &CancellationToken,
        mut progress: impl FnMut(Progress),
    ) -> Result<Downloaded, DownloadError> {
        validate_file_name(&request.file_name)?;
        self.check_transport(&request.url)?;
        tokio::fs::create_dir_all(&request.dest_dir)
            .await
            .map_err(|source| DownloadError::CreateDir {
                path: request.dest_dir.clone(),
                source,
            })?;
        let final_path = request.dest_dir.join(&request.file_name);
        let part_path = request.dest_dir.join(format!("{}.part", request.file_name));
        let mut guard = PartGuard {
            path: part_path.clone(),
            keep: request.keep_partial,
        };
        let mut result = self
            .attempt(request, &part_path, &final_path, cancel, &mut progress)
            .await;
        if let Err(failure) = &result {
            if failure.resumed_from > 0 && failure.error.is_mismatch() {
                tracing::warn!(
                    url = %request.url,
                    error = %failure.error,
                    "resumed download failed verification; starting over"
                );
                remove_if_present(&part_path).await?;
                result = self
                    .attempt(request, &part_path, &final_path, cancel, &mut progress)
                    .await;
            }
        }
        match result {
            Ok(downloaded) => {
                guard.keep = true;
                Ok(downloaded)
            }
            Err(failure) => {
                if failure.error.is_mismatch() || !failure.error.is_interruption() {
                    guard.keep = false;
                }
                drop(guard);
                Err(failure.error)
            }
        }
    }

    async fn send(
        &self,
        url: &Url,
        offset: Option<u64>,
    ) -> Result<reqwest::Response, DownloadError> {
        let mut builder = self.client.get(url.clone());
        if let Some(offset) = offset {
            builder = builder.header(RANGE, format!("bytes={offset}-"));
        }
        builder
            .send()
            .await
            .map_err(|source| DownloadError::Request {
                url: url.clone(),
                source,
            })
    }

    async fn attempt(
        &self,
        request: &DownloadRequest,
        part_path: &Path,
        final_path: &Path,
        cancel: &CancellationToken,
        progress: &mut impl FnMut(Progress),
    ) -> Result<Downloaded, Failure> {
        let url = &request.url;
        let (body, offset, announced) = match url.scheme() {
            "file" => {
                let file = open_source(url).await.map_err(Failure::fresh)?;
                let length = file.metadata().await.ok().map(|metadata| metadata.len());
                (Body::File(file), 0, length)
            }
            "http" | "https" => self
                .open_http(request, part_path, cancel)
                .await
                .map_err(Failure::fresh)?,
            _ => {
                return Err(Failure::fresh(DownloadError::UnsupportedUrl {
                    url: url.clone(),
                }))
            }
        };
        let failure = |error| Failure {
            error,
            resumed_from: offset,
        };
        if let (Some(expected), Some(announced)) = (request.expected_size, announced) {
            if expected != announced {
                return Err(failure(DownloadError::AnnouncedSizeMismatch {
                    url: url.clone(),
                    expected,
                    announced,
                }));
            }
        }
        let mut hasher = Sha256::new();
        let file = if offset > 0 {
            hash_existing(part_path, &mut hasher)
                .await
                .map_err(failure)?;
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(part_path)
                .await
        } else {
            tokio::fs::File::create(part_path).await
        };
        let mut file = file.map_err(|source| {
            failure(DownloadError::WriteFile {
                path: part_path.to_owned(),
                source,
            })
        })?;
        let total = request.expected_size.or(announced);
        let size = copy_body(
            body,
            &mut file,
            &mut hasher,
            Transfer {
                url,
                part_path,
                offset,
                total,
                expected_size: request.expected_size,
            },
            cancel,
            progress,
        )
        .await
        .map_err(failure)?;
        let sha256 = Sha256Digest::from_hasher(hasher);
        if let Some(expected) = request.expected_size {
            if size != expected {
                return Err(failure(DownloadError::SizeMismatch {
                    url: url.clone(),
                    expected,
                    actual: size,
                }));
            }
        }
        if sha256 != request.expected_sha256 {
            return Err(failure(DownloadError::DigestMismatch {
                url: url.clone(),
                expected: Box::new(request.expected_sha256),
                actual: Box::new(sha256),
            }));
        }
        file.sync_all().await.map_err(|source| {
            failure(DownloadError::WriteFile {
                path: part_path.to_owned(),
                source,
            })
        })?;
        drop(file);
        tokio::fs::rename(part_path, final_path)
            .await
            .map_err(|source| {
                failure(DownloadError::Rename {
                    from: part_path.to_owned(),
                    to: final_path.to_owned(),
                    source,
                })
            })?;
        // The rename is atomic already; syncing the directory only makes it
        // durable across a power loss, so a failure here is not worth
        // failing a verified download for.
        if let Ok(directory) = tokio::fs::File::open(&request.dest_dir).await {
            let _ = directory.sync_all().await;
        }
        Ok(Downloaded {
            path: final_path.to_owned(),
            size,
            sha256,
            resumed_from: offset,
        })
    }

    /// Sends the request, with a range when a part file exists, and decides
    /// whether the answer continues the part file. Returns the body, the
    /// offset it starts at, and the full size the server announced.
    async fn open_http(
        &self,
        request: &DownloadRequest,
        part_path: &Path,
        cancel: &CancellationToken,
    ) -> Result<(Body, u64, Option<u64>), DownloadError> {
        let url = &request.url;
        let mut offset = match tokio::fs::metadata(part_path).await {
            Ok(metadata) => metadata.len(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(DownloadError::ReadFile {
                    path: part_path.to_owned(),
                    source,
                })
            }
        };
        if request
            .expected_size
            .is_some_and(|expected| offset > expected)
        {
            offset = 0;
        }
        loop {
            let range = (offset > 0).then_some(offset);
            let response = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    return Err(DownloadError::Cancelled { url: url.clone(), received: offset });
                }
                response = self.send(url, range) => response?,
            };
            let status = response.status();
            let length = response.content_length();
            if offset > 0 && status == StatusCode::PARTIAL_CONTENT {
                if content_range_start(&response) == Some(offset) {
                    tracing::info!(%url, offset, "resuming download");
                    return Ok((
                        Body::Http(response),
                        offset,
                        length.map(|length| offset + length),
                    ));
                }
                tracing::warn!(%url, "server answered a different range; starting over");
            } else if offset > 0 && status == StatusCode::RANGE_NOT_SATISFIABLE {
                tracing::warn!(%url, offset, "server refused the resume range; starting over");
            } else if status.is_success() {
                // A 200 to a range request: the server ignores ranges, so the
                // body starts at zero and the part file is rewritten.
                return Ok((Body::Http(response), 0, length));
            } else {
                return Err(DownloadError::HttpStatus {
                    url: url.clone(),
                    status: status.as_u16(),
                });
            }
            remove_if_present(part_path).await?;
            offset = 0;
        }
    }
}

/// What `copy_body` needs to know about the transfer besides the streams.
struct Transfer<'request> {
    url: &'request Url,
    part_path: &'request Path,
    offset: u64,
    total: Option<u64>,
    expected_size: Option<u64>,
}

/// Streams the body into the part file; returns the part file's final size.
async fn copy_body(
    mut body: Body,
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    transfer: Transfer<'_>,
    cancel: &CancellationToken,
    progress: &mut impl FnMut(Progress),
) -> Result<u64, DownloadError> {
    let url = transfer.url;
    let mut received = transfer.offset;
    progress(Progress {
        downloaded: received,
        total: transfer.total,
    });
    loop {
        let chunk = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                return Err(DownloadError::Cancelled { url: url.clone(), received });
            }
            chunk = body.next_chunk(url) => chunk,
        };
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(DownloadError::Request { url, source }) => {
                return Err(DownloadError::Interrupted {
                    url,
                    received,
                    total: transfer.total,
                    source,
                })
            }
            Err(error) => return Err(error),
        };
        received += chunk.len() as u64;
        if let Some(expected) = transfer.expected_size {
            if received > expected {
                return Err(DownloadError::Oversized {
                    url: url.clone(),
                    expected,
                });
            }
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|source| DownloadError::WriteFile {
                path: transfer.part_path.to_owned(),
                source,
            })?;
        progress(Progress {
            downloaded: received,
            total: transfer.total,
        });
    }
    file.flush()
        .await
        .map_err(|source| DownloadError::WriteFile {
            path: transfer.part_path.to_owned(),
            source,
        })?;
    Ok(received)
}

/// A failed attempt and how many of its bytes came from a resumed part file.
struct Failure {
    error: DownloadError,
    resumed_from: u64,
}

impl Failure {
    fn fresh(error: DownloadError) -> Self {
        Self {
            error,
            resumed_from: 0,
        }
    }
}

enum Body {
    Http(reqwest::Response),
    File(tokio::fs::File),
}

impl Body {
    async fn next_chunk(&mut self, url: &Url) -> Result<Option<Bytes>, DownloadError> {
        match self {
            Self::Http(response) => {
                response
                    .chunk()
                    .await
                    .map_err(|source| DownloadError::Request {
                        url: url.clone(),
                        source,
                    })
            }
            Self::File(file) => {
                let mut buffer = vec![0; READ_BUFFER];
                let read =
                    file.read(&mut buffer)
                        .await
                        .map_err(|source| DownloadError::ReadFile {
                            path: url.to_file_path().unwrap_or_default(),
                            source,
                        })?;
                if read == 0 {
                    return Ok(None);
                }
                buffer.truncate(read);
                Ok(Some(Bytes::from(buffer)))
            }
        }
    }
}

/// Removes the part file when dropped unless told to keep it: this is what
/// cleans up when the download future is dropped mid-transfer.
struct PartGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(error) = std::fs::remove_file(&self.path) {
                if error.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), %error, "could not remove part file");
                }
            }
        }
    }
}

fn validate_file_name(name: &str) -> Result<(), DownloadError> {
    let single_component =
        !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
    if single_component {
        Ok(())
    } else {
        Err(DownloadError::InvalidFileName {
            name: name.to_owned(),
        })
    }
}

async fn open_source(url: &Url) -> Result<tokio::fs::File, DownloadError> {
    let path = url
        .to_file_path()
        .map_err(|()| DownloadError::UnsupportedUrl { url: url.clone() })?;
    tokio::fs::File::open(&path)
        .await
        .map_err(|source| DownloadError::ReadFile { path, source })
}

async fn hash_existing(path: &Path, hasher: &mut Sha256) -> Result<(), DownloadError> {
    let read_error = |source| DownloadError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let mut buffer = vec![0; READ_BUFFER];
    loop {
        let read = file.read(&mut buffer).await.map_err(read_error)?;
        if read == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..read]);
    }
}

async fn remove_if_present(path: &Path) -> Result<(), DownloadError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DownloadError::WriteFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The first byte position of a `Content-Range: bytes FIRST-LAST/SIZE`.
fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{Behaviour, TestServer};

    const SIZE: usize = 300_000;

    fn payload() -> Vec<u8> {
        (0..SIZE).map(|index| (index % 251) as u8).collect()
    }

    fn request(url: Url, directory: &Path) -> DownloadRequest {
        DownloadRequest {
            url,
            expected_size: Some(SIZE as u64),
            expected_sha256: Sha256Digest::of(&payload()),
            dest_dir: directory.to_owned(),
            file_name: "rootfs.ext4".to_owned(),
            keep_partial: false,
        }
    }

    fn listing(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn run(request: &DownloadRequest) -> (Result<Downloaded, DownloadError>, Vec<Progress>) {
        let mut seen = Vec::new();
        let result = Downloader::allowing_http()
            .unwrap()
            .download(request, &CancellationToken::new(), |progress| {
                seen.push(progress)
            })
            .await;
        (result, seen)
    }

    #[tokio::test]
    async fn futures_are_send_so_the_daemon_can_spawn_them() {
        fn assert_send<T: Send>(_: &T) {}
        let downloader = Downloader::allowing_http().unwrap();
        let request = request(
            Url::parse("http://127.0.0.1:9/a").unwrap(),
            Path::new("/nonexistent"),
        );
        let cancel = CancellationToken::new();
        assert_send(&downloader.download(&request, &cancel, |_| {}));
        assert_send(&downloader.fetch_bytes(&request.url, 1));
        let cache = crate::source::CatalogCache::new(
            crate::source::CatalogSource::from_url(request.url.clone()).unwrap(),
            "/nonexistent",
            downloader.clone(),
        );
        assert_send(&cache.load(Duration::ZERO));
        assert_send(&crate::signature::verify_signature_from_url(
            &downloader,
            Path::new("/nonexistent"),
            &request.url,
            &[Path::new("/nonexistent")],
        ));
    }

    #[tokio::test]
    async fn good_pull_lands_in_place_with_progress() {
        let server = TestServer::start();
        server.route("/a.ext4", payload(), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let request = request(server.url("/a.ext4"), directory.path());
        let (result, seen) = run(&request).await;
        let downloaded = result.unwrap();
        assert_eq!(downloaded.path, directory.path().join("rootfs.ext4"));
        assert_eq!(downloaded.size, SIZE as u64);
        assert_eq!(downloaded.resumed_from, 0);
        assert_eq!(std::fs::read(&downloaded.path).unwrap(), payload());
        assert_eq!(listing(directory.path()), ["rootfs.ext4"]);
        assert_eq!(seen.first().unwrap().downloaded, 0);
        assert_eq!(
            *seen.last().unwrap(),
            Progress {
                downloaded: SIZE as u64,
                total: Some(SIZE as u64)
            }
        );
        assert!(seen
            .windows(2)
            .all(|pair| pair[0].downloaded <= pair[1].downloaded));
    }

    #[tokio::test]
    async fn wrong_checksum_leaves_nothing_and_names_both_digests() {
        let server = TestServer::start();
        let mut corrupted = payload();
        corrupted[1000] ^= 0xff;
        server.route("/a.ext4", corrupted.clone(), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let (result, _) = run(&request(server.url("/a.ext4"), directory.path())).await;
        let error = result.unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, DownloadError::DigestMismatch { .. }),
            "{message}"
        );
        assert!(
            message.contains(&Sha256Digest::of(&payload()).to_string()),
            "{message}"
        );
        assert!(
            message.contains(&Sha256Digest::of(&corrupted).to_string()),
            "{message}"
        );
        assert!(listing(directory.path()).is_empty());

        // Proven-wrong bytes are never kept for resuming.
        let mut keeping = request(server.url("/a.ext4"), directory.path());
        keeping.keep_partial = true;
        let (result, _) = run(&keeping).await;
        assert!(result.unwrap_err().is_mismatch());
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn wrong_size_leaves_nothing_and_says_expected_and_actual() {
        let server = TestServer::start();
        server.route("/short", payload()[..1000].to_vec(), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let (result, _) = run(&request(server.url("/short"), directory.path())).await;
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("announces 1000 bytes, expected 300000"),
            "{message}"
        );
        assert!(listing(directory.path()).is_empty());

        // Without an expected size the short body gets through to the size
        // check... and the digest check catches it.
        let mut request = request(server.url("/short"), directory.path());
        request.expected_size = None;
        let (result, _) = run(&request).await;
        assert!(matches!(result, Err(DownloadError::DigestMismatch { .. })));
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn truncated_body_leaves_nothing_and_says_how_far_it_got() {
        let server = TestServer::start();
        server.route("/a", payload(), Behaviour::Truncate { after: 100_000 });
        let directory = tempfile::tempdir().unwrap();
        let (result, _) = run(&request(server.url("/a"), directory.path())).await;
        let error = result.unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(
                error,
                DownloadError::Interrupted {
                    received: 100_000,
                    ..
                }
            ),
            "{message}"
        );
        assert!(
            message.contains("interrupted after 100000 of 300000 bytes"),
            "{message}"
        );
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn dropped_connection_leaves_nothing() {
        let server = TestServer::start();
        server.route("/a", payload(), Behaviour::DropMidStream { after: 50_000 });
        let directory = tempfile::tempdir().unwrap();
        let (result, _) = run(&request(server.url("/a"), directory.path())).await;
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("interrupted after 50000 of 300000 bytes"),
            "{message}"
        );
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn http_errors_and_unreachable_hosts_leave_nothing() {
        let server = TestServer::start();
        server.route("/gone", payload(), Behaviour::Status(503));
        let directory = tempfile::tempdir().unwrap();
        let (result, _) = run(&request(server.url("/gone"), directory.path())).await;
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("{} answered HTTP 503", server.url("/gone"))
        );
        let (result, _) = run(&request(server.url("/missing"), directory.path())).await;
        assert!(matches!(
            result,
            Err(DownloadError::HttpStatus { status: 404, .. })
        ));
        let mut stopped = TestServer::start();
        let url = stopped.url("/a");
        stopped.stop();
        let (result, _) = run(&request(url, directory.path())).await;
        assert!(matches!(result, Err(DownloadError::Request { .. })));
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn cancellation_stops_the_transfer_and_leaves_nothing() {
        let server = TestServer::start();
        server.route(
            "/a",
            payload(),
            Behaviour::Stall {
                after: 64_000,
                pause: Duration::from_secs(5),
            },
        );
        let directory = tempfile::tempdir().unwrap();
        let request = request(server.url("/a"), directory.path());
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let started = std::time::Instant::now();
        let result = Downloader::allowing_http()
            .unwrap()
            .download(&request, &cancel, |progress| {
                if progress.downloaded > 0 {
                    trigger.cancel();
                }
            })
            .await;
        let error = result.unwrap_err();
        assert!(matches!(error, DownloadError::Cancelled { .. }), "{error}");
        assert!(error.to_string().contains("was cancelled after"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn dropping_the_future_leaves_nothing() {
        let server = TestServer::start();
        server.route(
            "/a",
            payload(),
            Behaviour::Stall {
                after: 64_000,
                pause: Duration::from_secs(5),
            },
        );
        let directory = tempfile::tempdir().unwrap();
        let request = request(server.url("/a"), directory.path());
        let downloader = Downloader::allowing_http().unwrap();
        let cancel = CancellationToken::new();
        let download = downloader.download(&request, &cancel, |_| {});
        let timed_out = tokio::time::timeout(Duration::from_millis(500), download).await;
        assert!(timed_out.is_err());
        assert!(listing(directory.path()).is_empty());
    }

    #[tokio::test]
    async fn resume_after_an_interruption_fetches_only_the_rest() {
        let server = TestServer::start();
        server.route("/a", payload(), Behaviour::DropMidStream { after: 120_000 });
        let directory = tempfile::tempdir().unwrap();
        let mut request = request(server.url("/a"), directory.path());
        request.keep_partial = true;
        let (result, _) = run(&request).await;
        assert!(result.unwrap_err().is_interruption());
        assert_eq!(listing(directory.path()), ["rootfs.ext4.part"]);
        assert_eq!(
            std::fs::metadata(directory.path().join("rootfs.ext4.part"))
                .unwrap()
                .len(),
            120_000
        );
        assert_eq!(server.body_bytes(), 120_000);

        server.set_behaviour("/a", Behaviour::Correct);
        let (result, seen) = run(&request).await;
        let downloaded = result.unwrap();
        assert_eq!(downloaded.resumed_from, 120_000);
        assert_eq!(seen.first().unwrap().downloaded, 120_000);
        assert_eq!(server.body_bytes(), SIZE as u64, "only the rest was sent");
        assert_eq!(server.requests().last().unwrap().1, Some(120_000));
        assert_eq!(std::fs::read(&downloaded.path).unwrap(), payload());
        assert_eq!(listing(directory.path()), ["rootfs.ext4"]);
    }

    #[tokio::test]
    async fn a_server_without_ranges_restarts_from_zero() {
        let server = TestServer::start();
        server.set_ranges(false);
        server.route("/a", payload(), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(
            directory.path().join("rootfs.ext4.part"),
            &payload()[..70_000],
        )
        .unwrap();
        let (result, _) = run(&request(server.url("/a"), directory.path())).await;
        let downloaded = result.unwrap();
        assert_eq!(downloaded.resumed_from, 0);
        assert_eq!(
            server.requests()[0].1,
            Some(70_000),
            "it did ask for a range"
        );
        assert_eq!(server.body_bytes(), SIZE as u64);
        assert_eq!(std::fs::read(&downloaded.path).unwrap(), payload());
        assert_eq!(listing(directory.path()), ["rootfs.ext4"]);
    }

    #[tokio::test]
    async fn a_stale_part_file_that_fails_verification_is_refetched_whole() {
        let server = TestServer::start();
        server.route("/a", payload(), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(
            directory.path().join("rootfs.ext4.part"),
            vec![7_u8; 90_000],
        )
        .unwrap();
        let (result, _) = run(&request(server.url("/a"), directory.path())).await;
        let downloaded = result.unwrap();
        assert_eq!(downloaded.resumed_from, 0);
        assert_eq!(server.body_bytes(), (SIZE - 90_000 + SIZE) as u64);
        assert_eq!(std::fs::read(&downloaded.path).unwrap(), payload());
        assert_eq!(listing(directory.path()), ["rootfs.ext4"]);
    }

    #[tokio::test]
    async fn a_complete_part_file_gets_416_and_starts_over() {
        let server = TestServer::start();
        server.route("/a", payload(), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let mut request = request(server.url("/a"), directory.path());
        request.expected_size = None;
        std::fs::write(directory.path().join("rootfs.ext4.part"), payload()).unwrap();
        let (result, _) = run(&request).await;
        assert_eq!(result.unwrap().resumed_from, 0);
        assert_eq!(server.requests().len(), 2);
        assert_eq!(listing(directory.path()), ["rootfs.ext4"]);
    }

    #[tokio::test]
    async fn local_files_copy_with_the_same_verification() {
        let source = tempfile::tempdir().unwrap();
        let path = source.path().join("image.ext4");
        std::fs::write(&path, payload()).unwrap();
        let directory = tempfile::tempdir().unwrap();
        let url = Url::from_file_path(&path).unwrap();
        let (result, seen) = run(&request(url.clone(), directory.path())).await;
        assert_eq!(std::fs::read(result.unwrap().path).unwrap(), payload());
        assert_eq!(seen.last().unwrap().downloaded, SIZE as u64);

        let target = tempfile::tempdir().unwrap();
        let mut bad = request(url, target.path());
        bad.expected_sha256 = Sha256Digest::of(b"something else");
        let (result, _) = run(&bad).await;
        assert!(matches!(result, Err(DownloadError::DigestMismatch { .. })));
        assert!(listing(target.path()).is_empty());

        let missing = Url::from_file_path(source.path().join("nope")).unwrap();
        let (result, _) = run(&request(missing, target.path())).await;
        assert!(matches!(result, Err(DownloadError::ReadFile { .. })));
        assert!(listing(target.path()).is_empty());
    }

    #[tokio::test]
    async fn refuses_file_names_that_leave_the_directory() {
        let directory = tempfile::tempdir().unwrap();
        let url = Url::parse("http://127.0.0.1:9/a").unwrap();
        for name in ["", ".", "..", "../x", "a/b"] {
            let mut request = request(url.clone(), directory.path());
            request.file_name = name.to_owned();
            let (result, _) = run(&request).await;
            assert!(
                matches!(result, Err(DownloadError::InvalidFileName { .. })),
                "{name}"
            );
        }
    }
}
