//! Where a catalog comes from, and its on-disk cache.
//!
//! # Loading
//!
//! 1. The cache holds, per source, the last document fetched
//!    (`catalog-KEY.document`) and when (`catalog-KEY.json`), KEY being a
//!    digest of the source URL so several catalogs can share a cache dir.
//! 2. `load(max_age)` returns the cached catalog while it is younger than
//!    `max_age` (a fetch time in the future counts as stale).
//! 3. Otherwise it fetches the source. A document that fetches and validates
//!    replaces the cache (written to a temp file and renamed) and is returned.
//! 4. When the fetch fails (the source is unreachable, answers an HTTP error,
//!    or the file is gone) and a cached copy exists, the cached copy is
//!    returned marked [`Freshness::Fallback`] and a warning is logged. With no
//!    cached copy the fetch error is returned.
//! 5. A plain-`http:` source is refused, cache and all, unless the
//!    downloader allows http ([`Downloader::allowing_http`]).
//! 6. A document that fetches but does not validate is an error, never
//!    cached, and never hidden by the fallback: a broken catalog should be
//!    loud.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_proto::error_chain;
use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::download::{DownloadError, Downloader};
use crate::format::{Catalog, CatalogError};

/// The largest catalog document accepted.
const DOCUMENT_LIMIT: u64 = 16 * 1024 * 1024;

/// A catalog's location: an `http`/`https` URL, a `file://` URL, or a plain
/// (absolute or relative) path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSource {
    url: Url,
}

/// Why a catalog source was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogSourceError {
    #[error("Unsupported catalog URL `{text}`: use http, https, file or a path")]
    UnsupportedScheme { text: String },
    #[error("Invalid catalog URL `{text}`")]
    InvalidUrl {
        text: String,
        #[source]
        source: url::ParseError,
    },
    #[error("Could not make catalog path `{text}` absolute")]
    ResolvePath {
        text: String,
        #[source]
        source: io::Error,
    },
}

impl CatalogSource {
    /// A source from a URL.
    pub fn from_url(url: Url) -> Result<Self, CatalogSourceError> {
        match url.scheme() {
            "http" | "https" | "file" => Ok(Self { url }),
            _ => Err(CatalogSourceError::UnsupportedScheme {
                text: url.to_string(),
            }),
        }
    }

    /// A source from a local path; relative paths resolve against the
    /// current directory.
    pub fn from_path(path: &Path) -> Result<Self, CatalogSourceError> {
        let text = path.display().to_string();
        let absolute =
            std::path::absolute(path).map_err(|source| CatalogSourceError::ResolvePath {
                text: text.clone(),
                source,
            })?;
        let url = Url::from_file_path(&absolute)
            .map_err(|()| CatalogSourceError::UnsupportedScheme { text })?;
        Ok(Self { url })
    }

    /// The URL every relative entry URL resolves against.
    #[must_use]
    pub fn url(&self) -> &Url {
        &self.url
    }

    fn cache_key(&self) -> String {
        Sha256Digest::of(self.url.as_str().as_bytes()).to_string()[..16].to_owned()
    }
}

impl FromStr for CatalogSource {
    type Err = CatalogSourceError;

    /// `http://…`, `https://…` and `file://…` are URLs; anything without a
    /// scheme is a path.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let has_scheme = text.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'))
        });
        if has_scheme {
            let url = Url::parse(text).map_err(|source| CatalogSourceError::InvalidUrl {
                text: text.to_owned(),
                source,
            })?;
            Self::from_url(url)
        } else {
            Self::from_path(Path::new(text))
        }
    }
}

impl fmt::Display for CatalogSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.url, formatter)
    }
}

/// How current a loaded catalog is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// Fetched from the source just now.
    Fetched,
    /// The cached copy, younger than the allowed age.
    Cached,
    /// The cached copy, stale, because the source could not be fetched;
    /// `reason` is the fetch error's whole chain.
    Fallback { reason: String },
}

/// A catalog and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedCatalog {
    pub catalog: Catalog,
    pub source: CatalogSource,
    pub fetched_at: SystemTime,
    pub freshness: Freshness,
}

impl LoadedCatalog {
    /// A line to show the user when the catalog may be out of date.
    #[must_use]
    pub fn warning(&self) -> Option<String> {
        match &self.freshness {
            Freshness::Fallback { reason } => Some(format!(
                "Catalog {} is unreachable ({reason}); using the copy cached {} ago",
                self.source,
                describe_age(self.fetched_at)
            )),
            Freshness::Fetched | Freshness::Cached => None,
        }
    }
}

fn describe_age(fetched_at: SystemTime) -> String {
    let seconds = SystemTime::now()
        .duration_since(fetched_at)
        .unwrap_or_default()
        .as_secs();
    match seconds {
        0..=119 => format!("{seconds}s"),
        120..=7199 => format!("{}m", seconds / 60),
        7200..=172_799 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86400),
    }
}

/// Why a catalog could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogLoadError {
    #[error("Refused catalog {url}: plain http is not allowed")]
    InsecureHttp { url: String },
    #[error("Could not fetch catalog {source_url}")]
    Fetch {
        source_url: String,
        #[source]
        source: DownloadError,
    },
    #[error(transparent)]
    Invalid(#[from] CatalogError),
    #[error("Could not write the catalog cache {path}")]
    WriteCache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A catalog source with its cache directory.
#[derive(Debug, Clone)]
pub struct CatalogCache {
    source: CatalogSource,
    cache_dir: PathBuf,
    downloader: Downloader,
}

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    source: String,
    fetched_at_unix_ms: u64,
}

struct Cached {
    catalog: Catalog,
    fetched_at: SystemTime,
}

impl CatalogCache {
    #[must_use]
    pub fn new(
        source: CatalogSource,
        cache_dir: impl Into<PathBuf>,
        downloader: Downloader,
    ) -> Self {
        Self {
            source,
            cache_dir: cache_dir.into(),
            downloader,
        }
    }

    #[must_use]
    pub fn source(&self) -> &CatalogSource {
        &self.source
    }

    /// The catalog, from the cache while younger than `max_age`, else
    /// fetched, else (source unreachable) the stale cached copy. See the
    /// module docs.
    pub async fn load(&self, max_age: Duration) -> Result<LoadedCatalog, CatalogLoadError> {
        // Before the cache too: an http catalog cached earlier is not served.
        if self.source.url().scheme() == "http" && !self.downloader.allows_http() {
            return Err(CatalogLoadError::InsecureHttp {
                url: self.source.to_string(),
            });
        }
        let cached = self.read_cache().await;
        if let Some(cached) = &cached {
            let fresh = SystemTime::now()
                .duration_since(cached.fetched_at)
                .is_ok_and(|age| age < max_age);
            if fresh {
                return Ok(self.loaded(
                    cached.catalog.clone(),
                    cached.fetched_at,
                    Freshness::Cached,
                ));
            }
        }
        let document = match self
            .downloader
            .fetch_bytes(self.source.url(), DOCUMENT_LIMIT)
            .await
        {
            Ok(document) => document,
            Err(error) => {
                let error = CatalogLoadError::Fetch {
                    source_url: self.source.to_string(),
                    source: error,
                };
                return match cached {
                    Some(cached) => {
                        let reason = error_chain(&error);
                        tracing::warn!(source = %self.source, %reason, "catalog unreachable; using the cached copy");
                        Ok(self.loaded(
                            cached.catalog,
                            cached.fetched_at,
                            Freshness::Fallback { reason },
                        ))
                    }
                    None => Err(error),
                };
            }
        };
        let catalog = Catalog::parse(&document, self.source.url())?;
        let fetched_at = SystemTime::now();
        self.write_cache(&document, fetched_at).await?;
        Ok(self.loaded(catalog, fetched_at, Freshness::Fetched))
    }

    fn loaded(
        &self,
        catalog: Catalog,
        fetched_at: SystemTime,
        freshness: Freshness,
    ) -> LoadedCatalog {
        LoadedCatalog {
            catalog,
            source: self.source.clone(),
            fetched_at,
            freshness,
        }
    }

    fn document_path(&self) -> PathBuf {
        self.cache_dir
            .join(format!("catalog-{}.document", self.source.cache_key()))
    }

    fn record_path(&self) -> PathBuf {
        self.cache_dir
            .join(format!("catalog-{}.json", self.source.cache_key()))
    }

    /// The cached catalog, or `None` when there is none usable (missing,
    /// for another source, or no longer valid — logged).
    async fn read_cache(&self) -> Option<Cached> {
        let record = tokio::fs::read(self.record_path()).await.ok()?;
        let record: CacheRecord = serde_json::from_slice(&record).ok()?;
        if record.source != self.source.url().as_str() {
            return None;
        }
        let document = tokio::fs::read(self.document_path()).await.ok()?;
        match Catalog::parse(&document, self.source.url()) {
            Ok(catalog) => Some(Cached {
                catalog,
                fetched_at: UNIX_EPOCH + Duration::from_millis(record.fetched_at_unix_ms),
            }),
            Err(error) => {
                tracing::warn!(source = %self.source, %error, "ignoring an invalid cached catalog");
                None
            }
        }
    }

    async fn write_cache(
        &self,
        document: &[u8],
        fetched_at: SystemTime,
    ) -> Result<(), CatalogLoadError> {
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| CatalogLoadError::WriteCache { path, source }
        };
        tokio::fs::create_dir_all(&self.cache_dir)
            .await
            .map_err(write_error(&self.cache_dir))?;
        let record = CacheRecord {
            source: self.source.url().to_string(),
            fetched_at_unix_ms: u64::try_from(
                fetched_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
        };
        let record = serde_json::to_vec_pretty(&record).unwrap_or_default();
        // The document first, then the record that vouches for it: a crash
        // in between leaves an older record, which at worst refetches.
        write_atomically(&self.document_path(), document)
            .await
            .map_err(write_error(&self.document_path()))?;
        write_atomically(&self.record_path(), &record)
            .await
            .map_err(write_error(&self.record_path()))?;
        Ok(())
    }
}

async fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    tokio::fs::write(&temporary, contents).await?;
    tokio::fs::rename(&temporary, path).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{Behaviour, TestServer};

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn document(version: &str) -> String {
        format!(
            "[[images]]\nname = \"debian-12\"\nversion = \"{version}\"\nurl = \"images/debian.ext4\"\nsize = 10\nsha256 = \"{DIGEST}\"\n"
        )
    }

    fn cache(source: CatalogSource, directory: &Path) -> CatalogCache {
        CatalogCache::new(source, directory, Downloader::allowing_http().unwrap())
    }

    fn catalog_requests(server: &TestServer) -> usize {
        server
            .requests()
            .iter()
            .filter(|(path, _)| path == "/stable/catalog")
            .count()
    }

    #[tokio::test]
    async fn caches_until_stale_then_refetches() {
        let server = TestServer::start();
        server.route("/stable/catalog", document("1"), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let cache = cache(
            CatalogSource::from_url(server.url("/stable/catalog")).unwrap(),
            directory.path(),
        );
        let first = cache.load(Duration::from_secs(3600)).await.unwrap();
        assert_eq!(first.freshness, Freshness::Fetched);
        assert_eq!(
            first.catalog.images[0].url,
            server.url("/stable/images/debian.ext4")
        );
        server.route("/stable/catalog", document("2"), Behaviour::Correct);
        let second = cache.load(Duration::from_secs(3600)).await.unwrap();
        assert_eq!(second.freshness, Freshness::Cached);
        assert_eq!(second.catalog.images[0].version, "1");
        assert_eq!(catalog_requests(&server), 1);
        assert!(second.warning().is_none());

        let third = cache.load(Duration::ZERO).await.unwrap();
        assert_eq!(third.freshness, Freshness::Fetched);
        assert_eq!(third.catalog.images[0].version, "2");
        assert_eq!(catalog_requests(&server), 2);

        // A fresh cache object over the same directory sees the same cache.
        let again = cache_for(&server, directory.path())
            .load(Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(again.freshness, Freshness::Cached);
        assert_eq!(again.catalog.images[0].version, "2");
    }

    fn cache_for(server: &TestServer, directory: &Path) -> CatalogCache {
        cache(
            CatalogSource::from_url(server.url("/stable/catalog")).unwrap(),
            directory,
        )
    }

    #[tokio::test]
    async fn falls_back_to_the_cached_copy_when_unreachable() {
        let mut server = TestServer::start();
        server.route("/stable/catalog", document("1"), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let cache = cache_for(&server, directory.path());
        cache.load(Duration::ZERO).await.unwrap();

        server.set_behaviour("/stable/catalog", Behaviour::Status(503));
        let loaded = cache.load(Duration::ZERO).await.unwrap();
        let Freshness::Fallback { reason } = &loaded.freshness else {
            panic!("{:?}", loaded.freshness)
        };
        assert!(reason.contains("answered HTTP 503"), "{reason}");

        server.stop();
        let loaded = cache.load(Duration::ZERO).await.unwrap();
        assert!(matches!(loaded.freshness, Freshness::Fallback { .. }));
        assert_eq!(loaded.catalog.images[0].version, "1");
        let warning = loaded.warning().unwrap();
        assert!(warning.contains("is unreachable"), "{warning}");
        assert!(warning.contains("using the copy cached"), "{warning}");

        let empty = tempfile::tempdir().unwrap();
        let error = cache_for(&server, empty.path())
            .load(Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(error, CatalogLoadError::Fetch { .. }), "{error}");
    }

    #[tokio::test]
    async fn an_invalid_catalog_is_an_error_and_is_not_cached() {
        let server = TestServer::start();
        server.route("/stable/catalog", document("1"), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let cache = cache_for(&server, directory.path());
        cache.load(Duration::ZERO).await.unwrap();
        server.route(
            "/stable/catalog",
            document("bad version"),
            Behaviour::Correct,
        );
        let error = cache.load(Duration::ZERO).await.unwrap_err();
        assert!(
            error.to_string().contains("image `debian-12` (entry 1)"),
            "{error}"
        );
        let cached = cache.load(Duration::from_secs(3600)).await.unwrap();
        assert_eq!(cached.catalog.images[0].version, "1");
    }

    #[tokio::test]
    async fn reads_local_paths_and_file_urls() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("catalog.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"kernels": [{{"name": "generic", "version": "6.1", "url": "k/vmlinux",
                   "size": 3, "sha256": "{DIGEST}", "signature_url": "k/vmlinux.sig"}}]}}"#
            ),
        )
        .unwrap();
        let by_path: CatalogSource = path.to_str().unwrap().parse().unwrap();
        let by_url: CatalogSource = Url::from_file_path(&path)
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert_eq!(by_path, by_url);
        let cache_dir = directory.path().join("cache");
        let loaded = cache(by_path, &cache_dir)
            .load(Duration::ZERO)
            .await
            .unwrap();
        let kernel = &loaded.catalog.kernels[0];
        assert_eq!(
            kernel.url,
            Url::from_file_path(directory.path().join("k/vmlinux")).unwrap()
        );
        assert_eq!(
            kernel.signature_url.as_ref().unwrap(),
            &Url::from_file_path(directory.path().join("k/vmlinux.sig")).unwrap()
        );

        std::fs::remove_file(&path).unwrap();
        let loaded = cache(by_url, &cache_dir)
            .load(Duration::ZERO)
            .await
            .unwrap();
        assert!(matches!(loaded.freshness, Freshness::Fallback { .. }));
    }

    #[test]
    fn refuses_other_schemes() {
        assert!(matches!(
            "ftp://127.0.0.1/catalog".parse::<CatalogSource>(),
            Err(CatalogSourceError::UnsupportedScheme { .. })
        ));
        assert!("relative/catalog.toml".parse::<CatalogSource>().is_ok());
    }

    #[tokio::test]
    async fn plain_http_needs_a_downloader_that_allows_it() {
        let server = TestServer::start();
        server.route("/stable/catalog", document("1"), Behaviour::Correct);
        let directory = tempfile::tempdir().unwrap();
        let source = CatalogSource::from_url(server.url("/stable/catalog")).unwrap();
        let strict =
            CatalogCache::new(source.clone(), directory.path(), Downloader::new().unwrap());
        let error = strict.load(Duration::ZERO).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "Refused catalog {}: plain http is not allowed",
                server.url("/stable/catalog")
            )
        );
        assert_eq!(catalog_requests(&server), 0);

        let loaded = cache(source, directory.path())
            .load(Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(loaded.freshness, Freshness::Fetched);
        // Now cached: still refused without the opt-in, not served stale.
        let error = strict.load(Duration::from_secs(3600)).await.unwrap_err();
        assert!(
            matches!(error, CatalogLoadError::InsecureHttp { .. }),
            "{error}"
        );

        // Artifacts too: a download or fetch of an http URL is refused.
        let strict = Downloader::new().unwrap();
        let error = strict
            .fetch_bytes(&server.url("/stable/catalog"), 1024)
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "Refused plain-http URL {}: only https and file are allowed",
                server.url("/stable/catalog")
            )
        );
        let request = crate::DownloadRequest {
            url: server.url("/stable/catalog"),
            expected_size: None,
            expected_sha256: Sha256Digest::of(document("1").as_bytes()),
            dest_dir: directory.path().join("downloads"),
            file_name: "catalog".to_owned(),
            keep_partial: false,
        };
        let error = strict
            .download(&request, &crate::CancellationToken::new(), |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(error, DownloadError::InsecureHttp { .. }),
            "{error}"
        );
        assert_eq!(catalog_requests(&server), 1);
    }
}
