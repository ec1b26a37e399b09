//! The catalog document: a TOML or JSON index of images and kernels.
//!
//! # Format
//!
//! A catalog lists `images` and `kernels`. Both formats carry the same keys;
//! TOML writes each entry as an `[[images]]` / `[[kernels]]` table, JSON as
//! objects in `"images"` / `"kernels"` arrays.
//!
//! ```toml
//! format = 1                       # optional; this crate reads version 1
//!
//! [[images]]
//! name = "debian-12"               # lowercase letters, digits, `.`, `_`, `-`; up to 64
//! version = "2026.11.1"            # letters, digits, `.`, `_`, `-`, `+`, `~`; up to 64
//! url = "images/debian-12.ext4"    # relative URLs resolve against the catalog's URL
//! size = 1073741824                # bytes, > 0
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! description = "Debian 12 developer image"   # optional
//! default_user = "root"                         # optional
//! signature_url = "images/debian-12.ext4.sig"   # optional detached PGP signature
//!
//! [[kernels]]
//! name = "generic"
//! version = "6.1.119"
//! url = "kernels/vmlinux-6.1.119"
//! size = 41234560
//! sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
//! initrd_url = "kernels/initrd-6.1.119.img"    # optional
//! initrd_sha256 = "fd61a03af4f77d870fc21e05e7e80678095c92d808cfb3b5c279ee04c74aca13"
//! initrd_size = 8123456                         # optional even with an initrd
//! cmdline = "console=ttyS0 reboot=k panic=1"    # optional default command line
//! signature_url = "kernels/vmlinux-6.1.119.sig" # optional detached PGP signature
//! initrd_signature_url = "kernels/initrd-6.1.119.img.sig"  # optional, over the initrd
//! ```
//!
//! The same catalog in JSON (digests shortened here):
//!
//! ```json
//! {"images": [{"name": "debian-12", "version": "2026.11.1",
//!              "url": "images/debian-12.ext4", "size": 1073741824,
//!              "sha256": "9f86…0a08"}],
//!  "kernels": [{"name": "generic", "version": "6.1.119", "url": "…", "size": 41234560,
//!               "sha256": "6030…c752", "signature_url": "kernels/vmlinux-6.1.119.sig"}]}
//! ```
//!
//! # Rules
//!
//! 1. The document is sniffed: a URL or path ending in `.json` or `.toml`
//!    decides, otherwise a document whose first non-blank character is `{` is
//!    JSON and anything else TOML.
//! 2. Every URL (`url`, `initrd_url`, `signature_url`,
//!    `initrd_signature_url`) is resolved against the
//!    catalog's own URL, so a catalog and its artifacts can move together.
//!    Entries may use `http`, `https` and `file` URLs, except that a catalog
//!    fetched over HTTP(S) may not point at local files.
//! 3. Names follow the daemon's image/kernel name rule, digests are 64 hex
//!    digits, sizes are positive, and a `name`/`version` pair appears at most
//!    once per kind. Every violation is reported naming the entry (kind,
//!    name when known, and its 1-based position).
//! 4. Unknown keys are ignored, so newer catalogs stay readable.

use std::cmp::Ordering;
use std::fmt;

use reqwest::Url;
use serde::Deserialize;

use crate::digest::Sha256Digest;

/// The catalog format version this crate reads.
pub const FORMAT_VERSION: u32 = 1;

/// A parsed, validated catalog with every URL absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub images: Vec<ImageEntry>,
    pub kernels: Vec<KernelEntry>,
}

/// One image: an ext4 root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    pub name: String,
    pub version: String,
    pub url: Url,
    pub size: u64,
    pub sha256: Sha256Digest,
    pub description: Option<String>,
    pub default_user: Option<String>,
    /// A detached PGP signature over the image file.
    pub signature_url: Option<Url>,
}

impl ImageEntry {
    /// The files of this entry that have no signature (empty when all do).
    #[must_use]
    pub fn unsigned_files(&self) -> Vec<&'static str> {
        if self.signature_url.is_none() {
            vec!["image"]
        } else {
            Vec::new()
        }
    }
}

/// One kernel, optionally with an initramfs, a default command line and a
/// detached signature over the kernel file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub name: String,
    pub version: String,
    pub url: Url,
    pub size: u64,
    pub sha256: Sha256Digest,
    pub initrd: Option<InitrdEntry>,
    pub cmdline: Option<String>,
    pub signature_url: Option<Url>,
    pub description: Option<String>,
}

impl KernelEntry {
    /// The files of this entry that have no signature (empty when all do).
    #[must_use]
    pub fn unsigned_files(&self) -> Vec<&'static str> {
        let mut unsigned = Vec::new();
        if self.signature_url.is_none() {
            unsigned.push("kernel");
        }
        if self
            .initrd
            .as_ref()
            .is_some_and(|initrd| initrd.signature_url.is_none())
        {
            unsigned.push("initrd");
        }
        unsigned
    }
}

/// A kernel's initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitrdEntry {
    pub url: Url,
    pub size: Option<u64>,
    pub sha256: Sha256Digest,
    /// A detached PGP signature over the initrd file.
    pub signature_url: Option<Url>,
}

/// Which syntax a catalog document uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogFormat {
    Toml,
    Json,
}

/// Which list an entry sits in; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Image,
    Kernel,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Image => "image",
            Self::Kernel => "kernel",
        })
    }
}

/// Why a catalog document was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("Catalog {origin} is not UTF-8 text")]
    NotUtf8 { origin: String },
    #[error("Catalog {origin} is not valid TOML")]
    ParseToml {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("Catalog {origin} is not valid JSON")]
    ParseJson {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "Catalog {origin} has format version {found}; this banger reads version {FORMAT_VERSION}"
    )]
    UnsupportedFormat { origin: String, found: u32 },
    #[error("Catalog {origin}: {entry}: {problem}")]
    InvalidEntry {
        origin: String,
        kind: EntryKind,
        /// The entry as a person finds it: `image `debian-12` (entry 2)`.
        entry: String,
        problem: String,
    },
}

impl CatalogFormat {
    /// Decides the format from the document's URL or path, then its content.
    #[must_use]
    pub fn sniff(location: &str, text: &str) -> Self {
        let path = location.split(['?', '#']).next().unwrap_or(location);
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".json") {
            return Self::Json;
        }
        if lower.ends_with(".toml") {
            return Self::Toml;
        }
        if text.trim_start().starts_with('{') {
            Self::Json
        } else {
            Self::Toml
        }
    }
}

impl Catalog {
    /// Parses a document fetched from `base`, sniffing its format, resolving
    /// relative URLs against `base` and validating every entry.
    pub fn parse(document: &[u8], base: &Url) -> Result<Self, CatalogError> {
        let origin = base.to_string();
        let text = std::str::from_utf8(document).map_err(|_| CatalogError::NotUtf8 {
            origin: origin.clone(),
        })?;
        let format = CatalogFormat::sniff(base.path(), text);
        Self::parse_as(text, format, base)
    }

    /// Parses a document whose format is already known.
    pub fn parse_as(text: &str, format: CatalogFormat, base: &Url) -> Result<Self, CatalogError> {
        let origin = base.to_string();
        let raw: RawCatalog = match format {
            CatalogFormat::Toml => {
                toml::from_str(text).map_err(|source| CatalogError::ParseToml {
                    origin: origin.clone(),
                    source,
                })?
            }
            CatalogFormat::Json => {
                serde_json::from_str(text).map_err(|source| CatalogError::ParseJson {
                    origin: origin.clone(),
                    source,
                })?
            }
        };
        if let Some(found) = raw.format {
            if found != FORMAT_VERSION {
                return Err(CatalogError::UnsupportedFormat { origin, found });
            }
        }
        let validator = Validator { origin, base };
        let images = raw
            .images
            .into_iter()
            .enumerate()
            .map(|(index, raw)| validator.image(index, raw))
            .collect::<Result<Vec<_>, _>>()?;
        let kernels = raw
            .kernels
            .into_iter()
            .enumerate()
            .map(|(index, raw)| validator.kernel(index, raw))
            .collect::<Result<Vec<_>, _>>()?;
        validator.unique(
            EntryKind::Image,
            images.iter().map(|image| (&image.name, &image.version)),
        )?;
        validator.unique(
            EntryKind::Kernel,
            kernels.iter().map(|kernel| (&kernel.name, &kernel.version)),
        )?;
        Ok(Self { images, kernels })
    }

    /// The image `name` at `version`, or its highest version when `version`
    /// is `None`.
    #[must_use]
    pub fn image(&self, name: &str, version: Option<&str>) -> Option<&ImageEntry> {
        pick(
            self.images.iter().filter(|image| image.name == name),
            version,
            |image| &image.version,
        )
    }

    /// The kernel `name` at `version`, or its highest version when `version`
    /// is `None`.
    #[must_use]
    pub fn kernel(&self, name: &str, version: Option<&str>) -> Option<&KernelEntry> {
        pick(
            self.kernels.iter().filter(|kernel| kernel.name == name),
            version,
            |kernel| &kernel.version,
        )
    }
}

fn pick<'entry, Entry>(
    candidates: impl Iterator<Item = &'entry Entry>,
    version: Option<&str>,
    version_of: impl Fn(&Entry) -> &String,
) -> Option<&'entry Entry> {
    match version {
        Some(wanted) => candidates
            .into_iter()
            .find(|entry| version_of(entry) == wanted),
        None => {
            candidates.max_by(|left, right| compare_versions(version_of(left), version_of(right)))
        }
    }
}

/// Orders versions piecewise: runs of digits compare as numbers, everything
/// else as text, so `6.10` is newer than `6.9`.
#[must_use]
pub fn compare_versions(left: &str, right: &str) -> Ordering {
    let mut left_pieces = version_pieces(left);
    let mut right_pieces = version_pieces(right);
    loop {
        match (left_pieces.next(), right_pieces.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(left_piece), Some(right_piece)) => {
                let order = match (left_piece.parse::<u128>(), right_piece.parse::<u128>()) {
                    (Ok(left_number), Ok(right_number)) => left_number.cmp(&right_number),
                    _ => left_piece.cmp(right_piece),
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

fn version_pieces(version: &str) -> impl Iterator<Item = &str> {
    let mut rest = version;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let numeric = first.is_ascii_digit();
        let end = rest
            .find(|character: char| character.is_ascii_digit() != numeric)
            .unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

#[derive(Deserialize)]
struct RawCatalog {
    format: Option<u32>,
    #[serde(default)]
    images: Vec<RawImage>,
    #[serde(default)]
    kernels: Vec<RawKernel>,
}

#[derive(Deserialize)]
struct RawImage {
    name: Option<String>,
    version: Option<String>,
    url: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
    description: Option<String>,
    default_user: Option<String>,
    signature_url: Option<String>,
}

#[derive(Deserialize)]
struct RawKernel {
    name: Option<String>,
    version: Option<String>,
    url: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
    initrd_url: Option<String>,
    initrd_sha256: Option<String>,
    initrd_size: Option<u64>,
    initrd_signature_url: Option<String>,
    cmdline: Option<String>,
    signature_url: Option<String>,
    description: Option<String>,
}

struct Validator<'base> {
    origin: String,
    base: &'base Url,
}

/// Names one entry for error messages.
struct Label {
    kind: EntryKind,
    text: String,
}

impl Validator<'_> {
    fn label(kind: EntryKind, index: usize, name: Option<&str>) -> Label {
        let position = index + 1;
        let text = match name {
            Some(name) => format!("{kind} `{name}` (entry {position})"),
            None => format!("{kind} entry {position}"),
        };
        Label { kind, text }
    }

    fn invalid(&self, label: &Label, problem: impl Into<String>) -> CatalogError {
        CatalogError::InvalidEntry {
            origin: self.origin.clone(),
            kind: label.kind,
            entry: label.text.clone(),
            problem: problem.into(),
        }
    }

    fn required<T>(&self, label: &Label, field: &str, value: Option<T>) -> Result<T, CatalogError> {
        value.ok_or_else(|| self.invalid(label, format!("`{field}` is missing")))
    }

    fn name(&self, label: &Label, name: Option<String>) -> Result<String, CatalogError> {
        let name = self.required(label, "name", name)?;
        let valid = name.len() <= 64
            && name
                .bytes()
                .next()
                .is_some_and(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
            && name.bytes().all(|byte| {
                byte.is_ascii_lowercase()
                    || byte.is_ascii_digit()
                    || matches!(byte, b'.' | b'_' | b'-')
            });
        if valid {
            Ok(name)
        } else {
            Err(self.invalid(
                label,
                "`name` must be up to 64 lowercase letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            ))
        }
    }

    fn version(&self, label: &Label, version: Option<String>) -> Result<String, CatalogError> {
        let version = self.required(label, "version", version)?;
        let valid = !version.is_empty()
            && version.len() <= 64
            && version.bytes().all(|byte| {
                byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b'+' | b'~')
            });
        if valid {
            Ok(version)
        } else {
            Err(self.invalid(
                label,
                format!("`version` `{version}` must be 1 to 64 letters, digits, `.`, `_`, `-`, `+` or `~`"),
            ))
        }
    }

    fn url(&self, label: &Label, field: &str, url: &str) -> Result<Url, CatalogError> {
        let resolved = self.base.join(url).map_err(|error| {
            self.invalid(label, format!("`{field}` `{url}` is not a URL: {error}"))
        })?;
        let remote_catalog = matches!(self.base.scheme(), "http" | "https");
        match resolved.scheme() {
            "http" | "https" => Ok(resolved),
            "file" if !remote_catalog => Ok(resolved),
            "file" => Err(self.invalid(
                label,
                format!(
                    "`{field}` `{url}` points at a local file, which a remote catalog may not do"
                ),
            )),
            scheme => Err(self.invalid(
                label,
                format!("`{field}` `{url}` uses `{scheme}`; use http, https or file"),
            )),
        }
    }

    fn size(&self, label: &Label, field: &str, size: u64) -> Result<u64, CatalogError> {
        if size == 0 {
            Err(self.invalid(label, format!("`{field}` must be more than 0 bytes")))
        } else {
            Ok(size)
        }
    }

    fn digest(
        &self,
        label: &Label,
        field: &str,
        digest: &str,
    ) -> Result<Sha256Digest, CatalogError> {
        digest.parse().map_err(|_| {
            self.invalid(
                label,
                format!("`{field}` `{digest}` is not 64 hexadecimal digits"),
            )
        })
    }

    fn image(&self, index: usize, raw: RawImage) -> Result<ImageEntry, CatalogError> {
        let label = Self::label(EntryKind::Image, index, raw.name.as_deref());
        let url = self.required(&label, "url", raw.url)?;
        let size = self.required(&label, "size", raw.size)?;
        let sha256 = self.required(&label, "sha256", raw.sha256)?;
        Ok(ImageEntry {
            name: self.name(&label, raw.name)?,
            version: self.version(&label, raw.version)?,
            url: self.url(&label, "url", &url)?,
            size: self.size(&label, "size", size)?,
            sha256: self.digest(&label, "sha256", &sha256)?,
            description: raw.description,
            default_user: raw.default_user,
            signature_url: raw
                .signature_url
                .map(|signature_url| self.url(&label, "signature_url", &signature_url))
                .transpose()?,
        })
    }

    fn kernel(&self, index: usize, raw: RawKernel) -> Result<KernelEntry, CatalogError> {
        let label = Self::label(EntryKind::Kernel, index, raw.name.as_deref());
        let url = self.required(&label, "url", raw.url)?;
        let size = self.required(&label, "size", raw.size)?;
        let sha256 = self.required(&label, "sha256", raw.sha256)?;
        let initrd = match (raw.initrd_url, raw.initrd_sha256) {
            (None, None) if raw.initrd_size.is_none() && raw.initrd_signature_url.is_none() => None,
            (Some(initrd_url), Some(initrd_sha256)) => Some(InitrdEntry {
                url: self.url(&label, "initrd_url", &initrd_url)?,
                size: raw
                    .initrd_size
                    .map(|size| self.size(&label, "initrd_size", size))
                    .transpose()?,
                sha256: self.digest(&label, "initrd_sha256", &initrd_sha256)?,
                signature_url: raw
                    .initrd_signature_url
                    .map(|url| self.url(&label, "initrd_signature_url", &url))
                    .transpose()?,
            }),
            (Some(_), None) => {
                return Err(self.invalid(&label, "`initrd_url` needs `initrd_sha256`"));
            }
            _ => {
                return Err(self.invalid(
                    &label,
                    "`initrd_sha256`/`initrd_size`/`initrd_signature_url` need `initrd_url`",
                ))
            }
        };
        Ok(KernelEntry {
            name: self.name(&label, raw.name)?,
            version: self.version(&label, raw.version)?,
            url: self.url(&label, "url", &url)?,
            size: self.size(&label, "size", size)?,
            sha256: self.digest(&label, "sha256", &sha256)?,
            initrd,
            cmdline: raw.cmdline,
            signature_url: raw
                .signature_url
                .map(|signature_url| self.url(&label, "signature_url", &signature_url))
                .transpose()?,
            description: raw.description,
        })
    }

    fn unique<'entry>(
        &self,
        kind: EntryKind,
        entries: impl Iterator<Item = (&'entry String, &'entry String)>,
    ) -> Result<(), CatalogError> {
        let mut seen = std::collections::HashSet::new();
        for (index, (name, version)) in entries.enumerate() {
            if !seen.insert((name, version)) {
                let label = Self::label(kind, index, Some(name));
                return Err(self.invalid(&label, format!("version `{version}` is listed twice")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE_DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const KERNEL_DIGEST: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn base() -> Url {
        Url::parse("http://127.0.0.1:8080/catalogs/stable/catalog.toml").unwrap()
    }

    fn toml_catalog() -> String {
        format!(
            r#"
format = 1

[[images]]
name = "debian-12"
version = "2026.11.1"
url = "images/debian-12.ext4"
size = 1073741824
sha256 = "{IMAGE_DIGEST}"
default_user = "root"

[[images]]
name = "debian-12"
version = "2026.9.3"
url = "/mirror/debian-12-old.ext4"
size = 1000
sha256 = "{IMAGE_DIGEST}"
future_key = "ignored"

[[kernels]]
name = "generic"
version = "6.1.119"
url = "../../kernels/vmlinux"
size = 41234560
sha256 = "{KERNEL_DIGEST}"
initrd_url = "kernels/initrd.img"
initrd_sha256 = "{IMAGE_DIGEST}"
cmdline = "console=ttyS0 reboot=k panic=1"
signature_url = "https://mirror.example/vmlinux.sig"
"#
        )
    }

    #[test]
    fn parses_toml_and_resolves_relative_urls() {
        let catalog = Catalog::parse(toml_catalog().as_bytes(), &base()).unwrap();
        assert_eq!(catalog.images.len(), 2);
        let image = &catalog.images[0];
        assert_eq!(
            image.url.as_str(),
            "http://127.0.0.1:8080/catalogs/stable/images/debian-12.ext4"
        );
        assert_eq!(image.sha256.to_string(), IMAGE_DIGEST);
        assert_eq!(image.default_user.as_deref(), Some("root"));
        assert_eq!(
            catalog.images[1].url.as_str(),
            "http://127.0.0.1:8080/mirror/debian-12-old.ext4"
        );
        let kernel = &catalog.kernels[0];
        assert_eq!(kernel.url.as_str(), "http://127.0.0.1:8080/kernels/vmlinux");
        let initrd = kernel.initrd.as_ref().unwrap();
        assert_eq!(
            initrd.url.as_str(),
            "http://127.0.0.1:8080/catalogs/stable/kernels/initrd.img"
        );
        assert_eq!(initrd.size, None);
        assert_eq!(
            kernel.signature_url.as_ref().unwrap().as_str(),
            "https://mirror.example/vmlinux.sig"
        );
        assert_eq!(
            kernel.cmdline.as_deref(),
            Some("console=ttyS0 reboot=k panic=1")
        );
    }

    #[test]
    fn parses_json_by_extension_and_by_content() {
        let json = format!(
            r#"{{"images": [{{"name": "alpine", "version": "3.20", "url": "alpine.ext4",
                "size": 5, "sha256": "{IMAGE_DIGEST}"}}], "kernels": []}}"#
        );
        let by_content = Catalog::parse(
            json.as_bytes(),
            &Url::parse("http://127.0.0.1/catalog").unwrap(),
        )
        .unwrap();
        assert_eq!(
            by_content.images[0].url.as_str(),
            "http://127.0.0.1/alpine.ext4"
        );
        let by_extension = Catalog::parse(
            json.as_bytes(),
            &Url::parse("file:///srv/c/index.json").unwrap(),
        )
        .unwrap();
        assert_eq!(
            by_extension.images[0].url.as_str(),
            "file:///srv/c/alpine.ext4"
        );
        assert_eq!(
            CatalogFormat::sniff("/x/catalog.TOML?x=1", "{"),
            CatalogFormat::Toml
        );
    }

    #[test]
    fn picks_the_highest_version_unless_one_is_named() {
        let catalog = Catalog::parse(toml_catalog().as_bytes(), &base()).unwrap();
        assert_eq!(
            catalog.image("debian-12", None).unwrap().version,
            "2026.11.1"
        );
        assert_eq!(
            catalog.image("debian-12", Some("2026.9.3")).unwrap().size,
            1000
        );
        assert!(catalog.image("debian-12", Some("1")).is_none());
        assert!(catalog.kernel("generic", None).is_some());
        assert_eq!(compare_versions("6.10", "6.9"), Ordering::Greater);
        assert_eq!(compare_versions("1.0", "1.0.1"), Ordering::Less);
        assert_eq!(compare_versions("1.0-rc1", "1.0-rc2"), Ordering::Less);
    }

    fn error_of(document: &str) -> String {
        Catalog::parse(document.as_bytes(), &base())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn validation_errors_name_the_entry() {
        let good = format!(
            r#"name = "ok"
version = "1"
url = "ok.ext4"
size = 1
sha256 = "{IMAGE_DIGEST}""#
        );
        let cases = [
            (
                format!("[[images]]\n{good}\n[[images]]\nname = \"bad\"\nversion = \"1\"\nurl = \"b\"\nsize = 1\nsha256 = \"abc\""),
                "image `bad` (entry 2): `sha256` `abc` is not 64 hexadecimal digits",
            ),
            (
                format!("[[images]]\nname = \"Big\"\nversion = \"1\"\nurl = \"b\"\nsize = 1\nsha256 = \"{IMAGE_DIGEST}\""),
                "image `Big` (entry 1): `name` must be",
            ),
            (
                format!("[[images]]\nname = \"z\"\nversion = \"1\"\nurl = \"b\"\nsize = 0\nsha256 = \"{IMAGE_DIGEST}\""),
                "image `z` (entry 1): `size` must be more than 0 bytes",
            ),
            (
                format!("[[kernels]]\nversion = \"1\"\nurl = \"b\"\nsize = 1\nsha256 = \"{IMAGE_DIGEST}\""),
                "kernel entry 1: `name` is missing",
            ),
            (
                format!("[[kernels]]\nname = \"k\"\nversion = \"1\"\nsize = 1\nsha256 = \"{IMAGE_DIGEST}\""),
                "kernel `k` (entry 1): `url` is missing",
            ),
            (
                format!("[[kernels]]\n{good}\ninitrd_url = \"i\""),
                "kernel `ok` (entry 1): `initrd_url` needs `initrd_sha256`",
            ),
            (
                format!("[[images]]\n{good}\n[[images]]\n{good}"),
                "image `ok` (entry 2): version `1` is listed twice",
            ),
            (
                format!("[[images]]\nname = \"f\"\nversion = \"1\"\nurl = \"file:///etc/shadow\"\nsize = 1\nsha256 = \"{IMAGE_DIGEST}\""),
                "image `f` (entry 1): `url` `file:///etc/shadow` points at a local file",
            ),
            (
                format!("[[images]]\nname = \"v\"\nversion = \"1 2\"\nurl = \"u\"\nsize = 1\nsha256 = \"{IMAGE_DIGEST}\""),
                "image `v` (entry 1): `version` `1 2` must be",
            ),
            ("format = 2".to_owned(), "has format version 2"),
        ];
        for (document, expected) in cases {
            let message = error_of(&document);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn syntax_errors_keep_the_parser_as_the_cause() {
        let error = Catalog::parse(b"[[images]\n", &base()).unwrap_err();
        assert!(matches!(error, CatalogError::ParseToml { .. }));
        assert!(std::error::Error::source(&error).is_some());
        let json_base = Url::parse("http://127.0.0.1/catalog.json").unwrap();
        let error = Catalog::parse(b"{\"images\": 3}", &json_base).unwrap_err();
        assert!(matches!(error, CatalogError::ParseJson { .. }));
    }

    #[test]
    fn signatures_are_listed_per_file() {
        let catalog = Catalog::parse(toml_catalog().as_bytes(), &base()).unwrap();
        assert_eq!(catalog.images[0].unsigned_files(), ["image"]);
        assert_eq!(catalog.kernels[0].unsigned_files(), ["initrd"]);
        let signed = format!(
            r#"
[[images]]
name = "debian-12"
version = "1"
url = "images/debian-12.ext4"
size = 10
sha256 = "{IMAGE_DIGEST}"
signature_url = "images/debian-12.ext4.sig"

[[kernels]]
name = "generic"
version = "1"
url = "vmlinux"
size = 10
sha256 = "{KERNEL_DIGEST}"
signature_url = "vmlinux.sig"
initrd_url = "initrd"
initrd_sha256 = "{IMAGE_DIGEST}"
initrd_signature_url = "initrd.sig"
"#
        );
        let catalog = Catalog::parse(signed.as_bytes(), &base()).unwrap();
        assert!(catalog.images[0].unsigned_files().is_empty());
        assert_eq!(
            catalog.images[0].signature_url.as_ref().unwrap().as_str(),
            "http://127.0.0.1:8080/catalogs/stable/images/debian-12.ext4.sig"
        );
        assert!(catalog.kernels[0].unsigned_files().is_empty());
        assert_eq!(
            catalog.kernels[0]
                .initrd
                .as_ref()
                .unwrap()
                .signature_url
                .as_ref()
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/catalogs/stable/initrd.sig"
        );
        let orphan = signed
            .replace("initrd_url = \"initrd\"\n", "")
            .replace(&format!("initrd_sha256 = \"{IMAGE_DIGEST}\"\n"), "");
        let error = Catalog::parse(orphan.as_bytes(), &base()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("`initrd_signature_url` need `initrd_url`"),
            "{error}"
        );
    }
}
