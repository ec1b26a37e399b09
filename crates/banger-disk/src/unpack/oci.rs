//! OCI image layouts and `docker save` archives: find the image manifest,
//! then apply its layers in order as whiteout-aware tar layers.
//!
//! OCI layout:
//! 1. `index.json` → a manifest descriptor (this host's platform if the
//!    index says, else the first that is not an attestation); nested
//!    indexes are followed.
//! 2. Every blob read (index, manifest, layer) is first checked against its
//!    sha256 digest, so a blob cannot smuggle in content, and digests are
//!    validated before they become paths (`blobs/ALG/HEX`).
//! 3. Layers (tar, tar+gzip, tar+zstd; sniffed) are applied in order.
//!
//! `docker save`: the outer tar's headers are indexed once; `manifest.json`
//! lists the layer members (symlinked duplicates are resolved inside the
//! archive), each read in place by offset.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::archive::{self, Member};
use super::tree::{RelativePath, Tree};
use super::{decompressed, UnpackError};

/// JSON documents (indexes, manifests) larger than this are refused.
const MAXIMUM_JSON: u64 = 4 << 20;
const MAXIMUM_NESTING: usize = 4;

fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `sha256:HEX` → `DIR/blobs/sha256/HEX`, refusing anything else.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, UnpackError> {
    let valid = digest.strip_prefix("sha256:").filter(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase())
    });
    match valid {
        Some(hex) => Ok(layout.join("blobs").join("sha256").join(hex)),
        None => Err(UnpackError::invalid(
            layout,
            format!("unsupported or malformed digest `{digest}` (expected sha256:<64 hex>)"),
        )),
    }
}

fn open_blob(layout: &Path, digest: &str) -> Result<(PathBuf, File), UnpackError> {
    let path = blob_path(layout, digest)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| UnpackError::Read {
            path: path.clone(),
            source,
        })?;
    Ok((path, file))
}

fn verify_blob(layout: &Path, digest: &str) -> Result<(), UnpackError> {
    let (path, mut file) = open_blob(layout, digest)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| UnpackError::Read { path, source })?;
    let actual = format!("sha256:{:x}", hasher.finalize());
    if actual == digest {
        Ok(())
    } else {
        Err(UnpackError::DigestMismatch {
            digest: digest.to_owned(),
            actual,
        })
    }
}

fn parse_json(path: &Path, reader: impl Read) -> Result<Value, UnpackError> {
    let mut text = Vec::new();
    reader
        .take(MAXIMUM_JSON + 1)
        .read_to_end(&mut text)
        .map_err(|source| UnpackError::Read {
            path: path.to_owned(),
            source,
        })?;
    if text.len() as u64 > MAXIMUM_JSON {
        return Err(UnpackError::invalid(path, "JSON document over 4 MiB"));
    }
    serde_json::from_slice(&text)
        .map_err(|error| UnpackError::invalid(path, format!("bad JSON: {error}")))
}

fn read_blob_json(layout: &Path, digest: &str) -> Result<Value, UnpackError> {
    verify_blob(layout, digest)?;
    let (path, file) = open_blob(layout, digest)?;
    parse_json(&path, file)
}

fn is_index(document: &Value, descriptor_media_type: Option<&str>) -> bool {
    let media_type = document["mediaType"].as_str().or(descriptor_media_type);
    matches!(
        media_type,
        Some(
            "application/vnd.oci.image.index.v1+json"
                | "application/vnd.docker.distribution.manifest.list.v2+json"
        )
    ) || (document["manifests"].is_array() && !document["layers"].is_array())
}

fn choose_manifest<'v>(layout: &Path, index: &'v Value) -> Result<&'v Value, UnpackError> {
    let manifests = index["manifests"]
        .as_array()
        .filter(|manifests| !manifests.is_empty())
        .ok_or_else(|| UnpackError::invalid(layout, "the index lists no manifests"))?;
    let usable = |descriptor: &&Value| {
        descriptor["annotations"]["vnd.docker.reference.type"].as_str()
            != Some("attestation-manifest")
    };
    manifests
        .iter()
        .filter(usable)
        .find(|descriptor| {
            descriptor["platform"]["os"].as_str() == Some("linux")
                && descriptor["platform"]["architecture"].as_str() == Some(host_architecture())
        })
        .or_else(|| manifests.iter().find(usable))
        .ok_or_else(|| UnpackError::invalid(layout, "the index lists only attestations"))
}

/// Applies an OCI layout's image; returns the number of layers.
pub(crate) fn apply_layout(layout: &Path, tree: &mut Tree<'_>) -> Result<usize, UnpackError> {
    let index_path = layout.join("index.json");
    let index_file = File::open(&index_path).map_err(|source| UnpackError::Read {
        path: index_path.clone(),
        source,
    })?;
    let mut document = parse_json(&index_path, index_file)?;
    let mut nesting = 0;
    while is_index(&document, None) {
        nesting += 1;
        if nesting > MAXIMUM_NESTING {
            return Err(UnpackError::invalid(layout, "indexes nested too deeply"));
        }
        let descriptor = choose_manifest(layout, &document)?;
        let digest = descriptor["digest"]
            .as_str()
            .ok_or_else(|| UnpackError::invalid(layout, "a manifest descriptor has no digest"))?
            .to_owned();
        let media_type = descriptor["mediaType"].as_str().map(str::to_owned);
        document = read_blob_json(layout, &digest)?;
        if !is_index(&document, media_type.as_deref()) && document["layers"].is_null() {
            return Err(UnpackError::invalid(
                layout,
                format!("blob {digest} is not an image manifest"),
            ));
        }
    }
    let layers = document["layers"]
        .as_array()
        .ok_or_else(|| UnpackError::invalid(layout, "the manifest has no layers"))?;
    for layer in layers {
        let digest = layer["digest"]
            .as_str()
            .ok_or_else(|| UnpackError::invalid(layout, "a layer has no digest"))?;
        verify_blob(layout, digest)?;
        let (path, file) = open_blob(layout, digest)?;
        let reader = decompressed(Box::new(BufReader::with_capacity(1 << 20, file)), &path)?;
        archive::apply(reader, tree, true)?;
    }
    Ok(layers.len())
}

/// Follows symlinked members (docker save links duplicate layers).
fn resolve_member(
    archive_path: &Path,
    members: &std::collections::HashMap<String, Member>,
    name: &str,
) -> Result<(u64, u64), UnpackError> {
    let mut current = RelativePath::parse(name.as_bytes())?;
    for _ in 0..8 {
        match members.get(&current.display()) {
            Some(Member::File { offset, size }) => return Ok((*offset, *size)),
            Some(Member::Symlink { target }) => {
                let mut joined: Vec<u8> = Vec::new();
                if !target.is_absolute() {
                    if let Some(parent) = current.parent() {
                        joined.extend_from_slice(parent.display().as_bytes());
                        joined.push(b'/');
                    }
                }
                joined.extend_from_slice(target.as_os_str().as_encoded_bytes());
                current = normalise_lexically(&joined).ok_or_else(|| {
                    UnpackError::invalid(
                        archive_path,
                        format!("member `{name}` links outside the archive"),
                    )
                })?;
            }
            None => break,
        }
    }
    Err(UnpackError::invalid(
        archive_path,
        format!("layer `{name}` named in manifest.json is not in the archive"),
    ))
}

/// `a/b/../c` → `a/c`; `None` when `..` climbs above the top.
fn normalise_lexically(path: &[u8]) -> Option<RelativePath> {
    let mut components: Vec<std::ffi::OsString> = Vec::new();
    for component in path.split(|&byte| byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                components.pop()?;
            }
            name => components
                .push(std::ffi::OsStr::new(&String::from_utf8_lossy(name).into_owned()).to_owned()),
        }
    }
    Some(RelativePath(components))
}

/// Applies a `docker save` archive's first image; returns the number of layers.
pub(crate) fn apply_docker_archive(path: &Path, tree: &mut Tree<'_>) -> Result<usize, UnpackError> {
    let members = archive::index(path)?;
    let read_member = |offset: u64, size: u64| -> Result<std::io::Take<File>, UnpackError> {
        let mut file = File::open(path).map_err(|source| UnpackError::Read {
            path: path.to_owned(),
            source,
        })?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|source| UnpackError::Read {
                path: path.to_owned(),
                source,
            })?;
        Ok(file.take(size))
    };
    let (offset, size) = resolve_member(path, &members, "manifest.json")?;
    let manifest = parse_json(path, read_member(offset, size)?)?;
    let image = manifest
        .as_array()
        .and_then(|images| images.first())
        .ok_or_else(|| UnpackError::invalid(path, "manifest.json lists no image"))?;
    let layers = image["Layers"]
        .as_array()
        .ok_or_else(|| UnpackError::invalid(path, "manifest.json has no Layers"))?;
    for layer in layers {
        let name = layer
            .as_str()
            .ok_or_else(|| UnpackError::invalid(path, "a layer name is not a string"))?;
        let (offset, size) = resolve_member(path, &members, name)?;
        let reader = decompressed(
            Box::new(BufReader::with_capacity(
                1 << 20,
                read_member(offset, size)?,
            )),
            Path::new(name),
        )?;
        archive::apply(reader, tree, true)?;
    }
    Ok(layers.len())
}
