//! Import sources end to end: every kind unpacks to the expected tree, and a
//! corpus of hostile archives is refused with nothing left behind.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use banger_disk::unpack::{detect, unpack, Compression, SourceKind, UnpackError, UnpackOptions};
use common::{gzip, header, write_file, zstd, TarBuilder};
use sha2::{Digest, Sha256};
use tar::EntryType;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// A temp dir holding the source and where staging goes; checks on drop-in
/// `finish` that only the source is left.
struct Workspace {
    directory: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        Self {
            directory: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.directory.path().join(name)
    }

    fn finish(self) {
        let root = self.directory.path().to_owned();
        drop(self.directory);
        assert!(!root.exists(), "temp dir left behind");
    }
}

#[allow(unsafe_code)]
fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buffer = vec![0_u8; 256];
    // SAFETY: NUL-terminated strings and a buffer of the length passed, all
    // alive for the call.
    let length = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    let length = usize::try_from(length).ok()?;
    buffer.truncate(length);
    Some(buffer)
}

fn rootfs_tar() -> Vec<u8> {
    let mut tar = TarBuilder::new();
    tar.directory("./")
        .directory("./etc")
        .directory("./usr/bin");
    let mut owned = header(EntryType::Regular, 7, 0o4750);
    owned.set_uid(1000);
    owned.set_gid(1001);
    tar.0
        .append_pax_extensions([("SCHILY.xattr.user.banger", b"yes".as_slice())])
        .unwrap();
    tar.raw(owned, b"./etc/hostname", b"banger\n");
    tar.file("usr/bin/tool", b"#!/bin/sh\n")
        .symlink("bin", "usr/bin")
        .symlink("etc/alternative", "/usr/bin/tool")
        .hard_link("etc/hostname.hard", "etc/hostname")
        .hard_link("./etc/hostname.dot", "./etc/hostname");
    tar.finish()
}

fn check_rootfs(staging: &Path) {
    assert_eq!(read(&staging.join("etc/hostname")), "banger\n");
    let metadata = std::fs::symlink_metadata(staging.join("etc/hostname")).unwrap();
    assert_eq!((metadata.uid(), metadata.gid()), (1000, 1001));
    assert_eq!(metadata.permissions().mode() & 0o7777, 0o4750);
    assert_eq!(metadata.nlink(), 3);
    assert_eq!(
        std::fs::symlink_metadata(staging.join("etc/hostname.hard"))
            .unwrap()
            .ino(),
        metadata.ino()
    );
    assert_eq!(
        get_xattr(&staging.join("etc/hostname"), "user.banger").as_deref(),
        Some(b"yes".as_slice())
    );
    assert_eq!(
        std::fs::read_link(staging.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read_link(staging.join("etc/alternative")).unwrap(),
        Path::new("/usr/bin/tool")
    );
    assert_eq!(read(&staging.join("bin/tool")), "#!/bin/sh\n");
}

#[test]
fn plain_gzip_and_zstd_tarballs_unpack() {
    let workspace = Workspace::new();
    let tar = rootfs_tar();
    for (name, bytes, compression) in [
        ("plain.tar", tar.clone(), Compression::None),
        ("rootfs.tar.gz", gzip(&tar), Compression::Gzip),
        ("rootfs.tar.zst", zstd(&tar), Compression::Zstd),
    ] {
        let source = workspace.path(name);
        write_file(&source, &bytes);
        assert_eq!(detect(&source).unwrap(), SourceKind::Tar(compression));
        let staging = workspace.path(&format!("{name}.staging"));
        let report = unpack(&source, &staging, &UnpackOptions::default()).unwrap();
        assert_eq!(report.kind, SourceKind::Tar(compression));
        assert_eq!(report.bytes, 17);
        check_rootfs(&staging);
        std::fs::remove_dir_all(&staging).unwrap();
    }
    workspace.finish();
}

#[test]
fn directory_tree_is_copied_with_links_and_owners() {
    let workspace = Workspace::new();
    let source = workspace.path("tree");
    let staging = workspace.path("staging");
    unpack(
        &{
            let tar = workspace.path("seed.tar");
            write_file(&tar, &rootfs_tar());
            tar
        },
        &source,
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(detect(&source).unwrap(), SourceKind::Directory);
    let report = unpack(&source, &staging, &UnpackOptions::default()).unwrap();
    assert_eq!(report.kind, SourceKind::Directory);
    check_rootfs(&staging);
    // The source keeps working as a tree; an escaping link in it is refused.
    std::os::unix::fs::symlink("../../../etc/passwd", source.join("etc/escape")).unwrap();
    let error = unpack(
        &source,
        &workspace.path("staging2"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("etc/escape"), "{error}");
    assert!(!workspace.path("staging2").exists());
    workspace.finish();
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Writes a blob into an OCI layout, returns its descriptor.
fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = sha256(bytes);
    write_file(&layout.join("blobs/sha256").join(&hex), bytes);
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

fn layer_one() -> Vec<u8> {
    TarBuilder::new()
        .directory("a")
        .file("a/keep", b"keep")
        .file("a/gone", b"gone")
        .directory("a/gone-dir")
        .file("a/gone-dir/inner", b"x")
        .directory("opaque")
        .file("opaque/old", b"old")
        .directory("opaque/old-dir")
        .file("opaque/old-dir/deep", b"deep")
        .finish()
}

fn layer_two() -> Vec<u8> {
    TarBuilder::new()
        .file("a/.wh.gone", b"")
        .file("a/.wh.gone-dir", b"")
        .file("a/new", b"new")
        .directory("opaque")
        // Before the marker: whiteouts hide lower layers only, in any order.
        .file("opaque/early", b"early")
        .file("opaque/.wh..wh..opq", b"")
        .directory("opaque/old-dir")
        .file("opaque/old-dir/fresh", b"fresh")
        .file("opaque/added", b"added")
        .finish()
}

fn check_layers(staging: &Path) {
    assert_eq!(read(&staging.join("a/keep")), "keep");
    assert_eq!(read(&staging.join("a/new")), "new");
    assert!(!staging.join("a/gone").exists());
    assert!(!staging.join("a/gone-dir").exists());
    assert!(!staging.join("a/.wh.gone").exists());
    assert!(!staging.join("opaque/old").exists());
    assert!(!staging.join("opaque/old-dir/deep").exists());
    assert!(!staging.join("opaque/.wh..wh..opq").exists());
    assert_eq!(read(&staging.join("opaque/old-dir/fresh")), "fresh");
    assert_eq!(read(&staging.join("opaque/added")), "added");
    assert_eq!(read(&staging.join("opaque/early")), "early");
}

fn oci_layout(layout: &Path) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    write_file(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    let config = blob(layout, "application/vnd.oci.image.config.v1+json", b"{}");
    let first = blob(
        layout,
        "application/vnd.oci.image.layer.v1.tar",
        &layer_one(),
    );
    let second = blob(
        layout,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gzip(&layer_two()),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [first, second],
    });
    let mut descriptor = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    descriptor["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    write_file(&layout.join("index.json"), index.to_string().as_bytes());
}

#[test]
fn oci_layout_applies_layers_with_whiteouts_and_opaque_dirs() {
    let workspace = Workspace::new();
    let layout = workspace.path("layout");
    oci_layout(&layout);
    assert_eq!(detect(&layout).unwrap(), SourceKind::OciLayout);
    let staging = workspace.path("staging");
    let report = unpack(&layout, &staging, &UnpackOptions::default()).unwrap();
    assert_eq!((report.kind, report.layers), (SourceKind::OciLayout, 2));
    check_layers(&staging);
    // A blob that does not match its digest is refused before it is used.
    let entries: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .collect();
    for entry in entries {
        let bytes = std::fs::read(entry.path()).unwrap();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            write_file(
                &entry.path(),
                &gzip(&TarBuilder::new().file("a/evil", b"!").finish()),
            );
        }
    }
    let error = unpack(
        &layout,
        &workspace.path("staging2"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(error, UnpackError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(!workspace.path("staging2").exists());
    workspace.finish();
}

#[test]
fn docker_save_archive_applies_layers_in_manifest_order() {
    let workspace = Workspace::new();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["test:latest"],
        "Layers": ["first/layer.tar", "second/layer.tar", "again/layer.tar"],
    }]);
    let third = TarBuilder::new().file("third", b"3").finish();
    let archive = TarBuilder::new()
        // Members out of order: the manifest decides.
        .directory("second")
        .file("second/layer.tar", &zstd(&layer_two()))
        .directory("first")
        .file("first/layer.tar", &layer_one())
        .directory("third")
        .file("third/layer.tar", &third)
        .directory("again")
        .symlink("again/layer.tar", "../third/layer.tar")
        .file("config.json", b"{}")
        .file("manifest.json", manifest.to_string().as_bytes())
        .finish();
    let source = workspace.path("saved.tar");
    write_file(&source, &archive);
    assert_eq!(detect(&source).unwrap(), SourceKind::DockerArchive);
    let staging = workspace.path("staging");
    let report = unpack(&source, &staging, &UnpackOptions::default()).unwrap();
    assert_eq!((report.kind, report.layers), (SourceKind::DockerArchive, 3));
    check_layers(&staging);
    assert_eq!(read(&staging.join("third")), "3");
    workspace.finish();
}

#[test]
fn ext4_images_and_unknown_files_are_not_unpacked() {
    let workspace = Workspace::new();
    let mut superblock = vec![0_u8; 2048];
    superblock[1080] = 0x53;
    superblock[1081] = 0xEF;
    write_file(&workspace.path("image.ext4"), &superblock);
    assert_eq!(
        detect(&workspace.path("image.ext4")).unwrap(),
        SourceKind::Ext4
    );
    let error = unpack(
        &workspace.path("image.ext4"),
        &workspace.path("s"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(error, UnpackError::Ext4Image { .. }), "{error}");
    write_file(&workspace.path("junk"), b"hello");
    let error = unpack(
        &workspace.path("junk"),
        &workspace.path("s"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(error, UnpackError::UnknownFormat { .. }),
        "{error}"
    );
    std::fs::create_dir(workspace.path("exists")).unwrap();
    write_file(&workspace.path("ok.tar"), &rootfs_tar());
    let error = unpack(
        &workspace.path("ok.tar"),
        &workspace.path("exists"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(error, UnpackError::StagingExists { .. }),
        "{error}"
    );
    assert!(workspace.path("exists").exists());
    assert!(!workspace.path("s").exists());
    workspace.finish();
}

fn gnu_long_name(tar: &mut TarBuilder, name: &[u8], data: &[u8]) {
    let long = header(EntryType::GNULongName, name.len() as u64 + 1, 0o644);
    let mut with_nul = name.to_vec();
    with_nul.push(0);
    tar.raw(long, b"././@LongLink", &with_nul);
    tar.raw(
        header(EntryType::Regular, data.len() as u64, 0o644),
        b"truncated",
        data,
    );
}

/// Each case: a name, the archive, and a word its error must contain.
fn hostile_corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut cases = vec![
        (
            "dot-dot",
            TarBuilder::new().file("../evil", b"!").finish(),
            "`..`",
        ),
        (
            "absolute",
            TarBuilder::new().file("/tmp/banger-evil", b"!").finish(),
            "absolute",
        ),
        (
            "nested dot-dot",
            TarBuilder::new()
                .directory("a")
                .directory("a/b")
                .file("a/b/../../../evil", b"!")
                .finish(),
            "`..`",
        ),
        (
            "symlink escape then write through",
            TarBuilder::new()
                .symlink("escape", "../../../..")
                .file("escape/evil", b"!")
                .finish(),
            "escapes the root",
        ),
        (
            "write through an in-root symlink",
            TarBuilder::new()
                .directory("etc")
                .symlink("link", "/etc")
                .file("link/passwd", b"!")
                .finish(),
            "through the symlink",
        ),
        (
            "symlink replacing a directory, then write through",
            TarBuilder::new()
                .directory("d")
                .symlink("d", "/")
                .file("d/evil", b"!")
                .finish(),
            "through the symlink",
        ),
        (
            "absolute symlink climbing",
            TarBuilder::new().symlink("up", "/../etc").finish(),
            "escapes the root",
        ),
        (
            "symlink chain escape",
            TarBuilder::new()
                .directory("d")
                .symlink("d/up", "..")
                .symlink("chain", "d/up/..")
                .finish(),
            "escapes the root",
        ),
        (
            "symlink made to escape by a later link",
            TarBuilder::new()
                .directory("d")
                .symlink("late", "d/x/..")
                .symlink("d/x", "/")
                .finish(),
            "escapes the root",
        ),
        (
            "hard link to /etc/passwd",
            TarBuilder::new()
                .hard_link("passwd", "/etc/passwd")
                .finish(),
            "absolute",
        ),
        (
            "hard link climbing to /etc/passwd",
            TarBuilder::new()
                .hard_link("passwd", "../../../../etc/passwd")
                .finish(),
            "`..`",
        ),
        (
            "hard link to a missing file",
            TarBuilder::new().hard_link("passwd", "etc/passwd").finish(),
            "does not exist",
        ),
        (
            "hard link through a symlink",
            TarBuilder::new()
                .symlink("etc", "/etc")
                .hard_link("passwd", "etc/passwd")
                .finish(),
            "through the symlink",
        ),
        (
            "hard link to a directory",
            TarBuilder::new()
                .directory("d")
                .hard_link("passwd", "d")
                .finish(),
            "directory",
        ),
    ];
    let mut device = TarBuilder::new();
    let mut node = header(EntryType::Char, 0, 0o666);
    node.set_device_major(1).unwrap();
    node.set_device_minor(3).unwrap();
    device.raw(node, b"dev/null", &[]);
    cases.push(("device node", device.finish(), "device"));
    let mut fifo = TarBuilder::new();
    fifo.raw(header(EntryType::Fifo, 0, 0o644), b"pipe", &[]);
    cases.push(("fifo", fifo.finish(), "FIFO"));
    let mut long = TarBuilder::new();
    let mut long_name = b"deep/".repeat(30);
    long_name.extend_from_slice(&b"../".repeat(40));
    long_name.extend_from_slice(b"evil");
    gnu_long_name(&mut long, &long_name, b"!");
    cases.push(("GNU long name with ..", long.finish(), "`..`"));
    let mut pax = TarBuilder::new();
    pax.0
        .append_pax_extensions([("path", b"innocent/../../evil".as_slice())])
        .unwrap();
    pax.file("innocent", b"!");
    cases.push(("PAX path with ..", pax.finish(), "`..`"));
    cases
}

#[test]
fn hostile_archives_are_refused_with_nothing_left_behind() {
    let workspace = Workspace::new();
    let corpus = hostile_corpus();
    assert!(corpus.len() >= 8);
    // Staging sits two levels down so `../..` escapes would land in `outside`.
    let outside = workspace.path("outside");
    std::fs::create_dir_all(outside.join("x")).unwrap();
    for (index, (name, archive, expected)) in corpus.into_iter().enumerate() {
        for (suffix, bytes) in [("tar", archive.clone()), ("tar.gz", gzip(&archive))] {
            let source = workspace.path(&format!("case-{index}.{suffix}"));
            write_file(&source, &bytes);
            let staging = outside.join("x").join("staging");
            let error = unpack(&source, &staging, &UnpackOptions::default())
                .expect_err(&format!("{name} was accepted"));
            let message = error.to_string();
            assert!(
                matches!(error, UnpackError::UnsafeEntry { .. }) && message.contains(expected),
                "{name}: {message}"
            );
            assert!(message.starts_with("Refused entry `"), "{name}: {message}");
            assert!(!staging.exists(), "{name}: staging left behind");
            assert_eq!(
                std::fs::read_dir(outside.join("x")).unwrap().count(),
                0,
                "{name}"
            );
            assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1, "{name}");
            std::fs::remove_file(&source).unwrap();
        }
    }
    assert!(!Path::new("/tmp/banger-evil").exists());
    std::fs::remove_dir_all(&outside).unwrap();
    workspace.finish();
}

#[test]
fn fifos_and_devices_are_created_when_allowed() {
    let workspace = Workspace::new();
    let mut tar = TarBuilder::new();
    tar.raw(header(EntryType::Fifo, 0, 0o640), b"pipe", &[]);
    let source = workspace.path("fifo.tar");
    write_file(&source, &tar.finish());
    let staging = workspace.path("staging");
    let options = UnpackOptions {
        allow_devices: true,
        ..UnpackOptions::default()
    };
    unpack(&source, &staging, &options).unwrap();
    let metadata = std::fs::symlink_metadata(staging.join("pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &metadata.file_type()
    ));
    assert_eq!(metadata.permissions().mode() & 0o777, 0o640);
    workspace.finish();
}

#[test]
fn decompression_bombs_stop_at_the_limit() {
    let workspace = Workspace::new();
    let archive = TarBuilder::new().file("big", &vec![0_u8; 4 << 20]).finish();
    let source = workspace.path("bomb.tar.gz");
    write_file(&source, &gzip(&archive));
    assert!(std::fs::metadata(&source).unwrap().len() < 64 << 10);
    let options = UnpackOptions {
        maximum_stream_bytes: Some(1 << 20),
        ..UnpackOptions::default()
    };
    let error = unpack(&source, &workspace.path("staging"), &options).unwrap_err();
    assert!(
        matches!(error, UnpackError::TooLarge { limit: 1_048_576 }),
        "{error}"
    );
    assert!(!workspace.path("staging").exists());
    workspace.finish();
}

fn banger_proto_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// One PAX record, `LEN key=value\n`, LEN counting itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut length = body.len() + 1;
    while format!("{length}{body}").len() != length {
        length += 1;
    }
    format!("{length}{body}").into_bytes()
}

/// A GNU sparse entry: `data` stored at `offset` of a file of `real_size`
/// bytes, the rest a hole.
fn gnu_sparse(tar: &mut TarBuilder, name: &str, offset: u64, data: &[u8], real_size: u64) {
    let mut header = header(EntryType::GNUSparse, data.len() as u64, 0o644);
    let gnu = header.as_gnu_mut().unwrap();
    gnu.sparse[0].set_offset(offset);
    gnu.sparse[0].set_length(data.len() as u64);
    gnu.set_real_size(real_size);
    if offset + data.len() as u64 != real_size {
        // A trailing hole ends with an empty block at the real size.
        gnu.sparse[1].set_offset(real_size);
        gnu.sparse[1].set_length(0);
    }
    gnu.set_is_extended(false);
    tar.raw(header, name.as_bytes(), data);
}

#[test]
fn a_tiny_sparse_tar_declaring_a_huge_hole_is_refused() {
    let workspace = Workspace::new();
    let mut tar = TarBuilder::new();
    tar.file("etc/hostname", b"ok\n");
    gnu_sparse(&mut tar, "var/hole", (1 << 40) - 512, &[b'x'; 512], 1 << 40);
    let archive = tar.finish();
    assert!(archive.len() < 8 << 10, "{} bytes", archive.len());
    let source = workspace.path("hole.tar");
    write_file(&source, &archive);
    let staging = workspace.path("staging");
    let error = unpack(&source, &staging, &UnpackOptions::default()).unwrap_err();
    assert!(
        matches!(
            &error,
            UnpackError::EntryTooLarge { entry, declared, .. }
                if entry == "var/hole" && *declared == 1 << 40
        ),
        "{error}"
    );
    assert!(error.to_string().contains("limit"), "{error}");
    assert!(!staging.exists());
    workspace.finish();
}

#[test]
fn sparse_files_within_the_limit_keep_their_holes() {
    let workspace = Workspace::new();
    let mut tar = TarBuilder::new();
    gnu_sparse(&mut tar, "hole", (64 << 20) - 512, &[b'x'; 512], 64 << 20);
    let source = workspace.path("hole.tar");
    write_file(&source, &tar.finish());
    let staging = workspace.path("staging");
    let report = unpack(&source, &staging, &UnpackOptions::default())
        .map_err(|error| banger_proto_chain(&error))
        .unwrap();
    assert_eq!(report.bytes, 64 << 20);
    let metadata = std::fs::metadata(staging.join("hole")).unwrap();
    assert_eq!(metadata.len(), 64 << 20);
    // Only the data block takes space (a few file system blocks).
    assert!(
        metadata.blocks() * 512 < 1 << 20,
        "{} blocks",
        metadata.blocks()
    );
    let content = std::fs::read(staging.join("hole")).unwrap();
    assert!(content[..(64 << 20) - 512].iter().all(|byte| *byte == 0));
    assert!(content[(64 << 20) - 512..].iter().all(|byte| *byte == b'x'));
    drop(content);
    std::fs::remove_dir_all(&staging).unwrap();

    // Declared sizes add up across files: two halves of the limit pass, a
    // third file over it does not.
    let mut tar = TarBuilder::new();
    gnu_sparse(&mut tar, "a", 0, &[b'a'; 512], 512 << 10);
    gnu_sparse(&mut tar, "b", 0, &[b'b'; 512], 512 << 10);
    tar.file("c", b"one byte too many");
    write_file(&source, &tar.finish());
    let options = UnpackOptions {
        maximum_content_bytes: Some(1 << 20),
        ..UnpackOptions::default()
    };
    let error = unpack(&source, &staging, &options).unwrap_err();
    assert!(
        matches!(&error, UnpackError::EntryTooLarge { entry, .. } if entry == "c"),
        "{error}"
    );
    assert!(!staging.exists());
    workspace.finish();
}

#[test]
fn pax_sparse_files_count_their_real_size_and_are_refused() {
    let workspace = Workspace::new();
    for (real_size, expected) in [(1_u64 << 40, "over the limit"), (4096, "PAX sparse")] {
        let mut records = pax_record("GNU.sparse.major", "1");
        records.extend(pax_record("GNU.sparse.minor", "0"));
        records.extend(pax_record("GNU.sparse.name", "var/hole"));
        records.extend(pax_record("GNU.sparse.realsize", &real_size.to_string()));
        let mut tar = TarBuilder::new();
        tar.raw(
            header(EntryType::XHeader, records.len() as u64, 0o644),
            b"PaxHeaders/hole",
            &records,
        );
        // The sparse map then the data, as GNU tar writes format 1.0.
        let mut data = b"1\n4095\n1\n".to_vec();
        data.resize(512, 0);
        data.push(b'x');
        tar.raw(
            header(EntryType::Regular, data.len() as u64, 0o644),
            b"GNUSparseFile.0/hole",
            &data,
        );
        let source = workspace.path("pax-sparse.tar");
        write_file(&source, &tar.finish());
        let staging = workspace.path("staging");
        let error = unpack(&source, &staging, &UnpackOptions::default()).unwrap_err();
        let message = error.to_string();
        let matched = if real_size > 1 << 30 {
            matches!(error, UnpackError::EntryTooLarge { declared, .. } if declared == real_size)
                && message.contains("takes the image over the limit")
        } else {
            message.contains(expected)
        };
        assert!(matched, "{real_size}: {message}");
        assert!(!staging.exists());
    }
    workspace.finish();
}

#[test]
fn oversize_long_names_and_pax_headers_are_refused_before_they_are_read() {
    let workspace = Workspace::new();
    let limit = UnpackOptions::default().maximum_header_bytes;
    let big = usize::try_from(limit).unwrap() + 1024;
    let mut pax = Vec::new();
    while pax.len() < big {
        pax.extend(pax_record("comment", &"x".repeat(1000)));
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PAX extended header", {
            let mut tar = TarBuilder::new();
            tar.raw(
                header(EntryType::XHeader, pax.len() as u64, 0o644),
                b"PaxHeaders/f",
                &pax,
            );
            tar.file("f", b"data");
            tar.finish()
        }),
        ("GNU long name", {
            let mut tar = TarBuilder::new();
            let name = vec![b'n'; big];
            tar.raw(
                header(EntryType::GNULongName, name.len() as u64, 0o644),
                b"././@LongLink",
                &name,
            );
            tar.file("f", b"data");
            tar.finish()
        }),
        ("PAX extended header", {
            // A header that only claims to be huge: refused on its size
            // field, before a byte of it is buffered.
            let mut tar = TarBuilder::new();
            tar.raw(header(EntryType::Regular, 0, 0o644), b"first", &[]);
            let mut archive = tar.finish();
            let mut claim = header(EntryType::XHeader, 1 << 40, 0o644);
            common::set_raw_name(&mut claim, b"PaxHeaders/huge");
            claim.set_cksum();
            archive.truncate(archive.len() - 1024);
            archive.extend_from_slice(claim.as_bytes());
            archive.extend_from_slice(&[b'9'; 4096]);
            archive
        }),
    ];
    for (what, archive) in cases {
        let source = workspace.path("header.tar");
        write_file(&source, &archive);
        let staging = workspace.path("staging");
        let error = unpack(&source, &staging, &UnpackOptions::default()).unwrap_err();
        assert!(
            matches!(&error, UnpackError::HeaderTooLarge { what: found, .. } if *found == what),
            "{what}: {error}"
        );
        assert!(error.to_string().contains("exceeds the limit"), "{error}");
        assert!(!staging.exists());
    }
    // Headers within the limit still work (and a PAX size record moves the
    // framing the guard follows).
    let mut records = pax_record("path", &format!("{}/long-file", "d".repeat(200)));
    records.extend(pax_record("size", "5"));
    let mut tar = TarBuilder::new();
    tar.raw(
        header(EntryType::XHeader, records.len() as u64, 0o644),
        b"PaxHeaders/x",
        &records,
    );
    tar.raw(header(EntryType::Regular, 5, 0o644), b"short", b"hello");
    tar.file("after", b"still read\n");
    let source = workspace.path("ok.tar");
    write_file(&source, &tar.finish());
    let staging = workspace.path("staging");
    unpack(&source, &staging, &UnpackOptions::default()).unwrap();
    assert_eq!(
        read(&staging.join(format!("{}/long-file", "d".repeat(200)))),
        "hello"
    );
    assert_eq!(read(&staging.join("after")), "still read\n");
    workspace.finish();
}

#[test]
fn tarballs_report_the_archive_bytes_read_and_can_be_stopped() {
    let workspace = Workspace::new();
    let big: Vec<u8> = (0..3 << 20).map(|index| (index % 253) as u8).collect();
    let tarball = TarBuilder::new()
        .directory("./")
        .file("./big", &big)
        .file("./small", b"small")
        .finish();
    let source = workspace.path("rootfs.tar.gz");
    std::fs::write(&source, gzip(&tarball)).unwrap();
    let length = std::fs::metadata(&source).unwrap().len();
    let mut reports = Vec::new();
    banger_disk::unpack::unpack_reporting(
        &source,
        &workspace.path("staging"),
        &UnpackOptions::default(),
        &mut |read, total| {
            reports.push((read, total));
            true
        },
    )
    .unwrap();
    assert_eq!(reports.last(), Some(&(length, length)), "{reports:?}");
    assert!(reports.windows(2).all(|pair| pair[0].0 <= pair[1].0));
    assert_eq!(std::fs::read(workspace.path("staging/big")).unwrap(), big);

    // Answering false stops it, and the staging directory is gone.
    let error = banger_disk::unpack::unpack_reporting(
        &source,
        &workspace.path("stopped"),
        &UnpackOptions::default(),
        &mut |_, _| false,
    )
    .unwrap_err();
    assert!(!workspace.path("stopped").exists(), "{error}");
    std::fs::remove_dir_all(workspace.path("staging")).unwrap();
    std::fs::remove_file(&source).unwrap();
    workspace.finish();
}
