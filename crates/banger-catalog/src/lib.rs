//! Image and kernel catalogs for `bangerd`.
//!
//! - [`mod@format`]: the catalog document (TOML or JSON), its validation and URL
//!   resolution. The format is documented there, with an example.
//! - [`source`]: where a catalog comes from ([`CatalogSource`]) and the
//!   on-disk cache with staleness and offline fallback ([`CatalogCache`]).
//! - [`download`]: verified, resumable, cancellable downloads of artifacts
//!   into place ([`Downloader::download`]).
//! - [`signature`]: detached PGP signatures checked with `gpgv`.
//!
//! A pull, as the daemon runs it:
//!
//! 1. `CatalogCache::load(max_age)` gives the catalog (warning when it fell
//!    back to a stale copy).
//! 2. `catalog.image(name, version)` picks the entry.
//! 3. `Downloader::download` streams it into `DEST/NAME.part`, verifies size
//!    and SHA-256 and renames it to `DEST/NAME`; only then does the daemon
//!    register it.
//! 4. For each file with a signature (`signature_url` of an image or kernel,
//!    `initrd_signature_url`), `verify_signature_from_url` fetches it and
//!    checks the downloaded file with `gpgv` before the daemon registers it
//!    (removing the file if it fails). With keyrings configured the daemon
//!    refuses entries with any file unsigned (`unsigned_files`).
//!
//! [`Downloader::new`] refuses plain `http:` URLs (and redirects to them);
//! [`Downloader::allowing_http`] is the explicit opt-in.

pub mod digest;
pub mod download;
pub mod format;
pub mod signature;
pub mod source;

#[cfg(test)]
mod test_server;

pub use digest::{ParseDigestError, Sha256Digest};
pub use download::{DownloadError, DownloadRequest, Downloaded, Downloader, Progress};
pub use format::{
    Catalog, CatalogError, CatalogFormat, EntryKind, ImageEntry, InitrdEntry, KernelEntry,
};
pub use signature::{
    verify_signature, verify_signature_from_url, verify_signature_with, RemoteSignatureError,
    SignatureError, VerifiedSignature,
};
pub use source::{
    CatalogCache, CatalogLoadError, CatalogSource, CatalogSourceError, Freshness, LoadedCatalog,
};
pub use tokio_util::sync::CancellationToken;
pub use url::Url;
