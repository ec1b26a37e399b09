//! Shared by the test binaries and the bench: tar fixtures and root-only
//! helpers (XFS loop mounts) that clean up after themselves.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{Builder, EntryType, Header};

/// Says loudly that `test` skips and why. Written to the stderr handle
/// directly, which the test harness does not capture, so it shows in a plain
/// `cargo test` run.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// Skips (loudly) and returns false unless root with all `tools` installed.
pub fn require_root_and_tools(test: &str, tools: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        skip(test, "needs root");
        return false;
    }
    for tool in tools {
        if !banger_disk::command::tool_exists(tool) {
            skip(test, &format!("`{tool}` is not installed"));
            return false;
        }
    }
    true
}

pub fn run(program: &str, arguments: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(program).args(arguments).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {arguments:?}: {output:?}"
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An XFS file system with reflink=1 on a sparse file, on a loop device,
/// mounted in a temp dir. Drop unmounts, detaches and deletes.
pub struct XfsMount {
    pub directory: tempfile::TempDir,
    pub mount_point: PathBuf,
    pub loop_device: String,
    mounted: bool,
}

impl XfsMount {
    pub fn new(size: u64) -> Self {
        let directory = tempfile::tempdir().unwrap();
        let backing = directory.path().join("xfs.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                backing.as_os_str(),
            ],
        );
        let loop_device = run(
            "losetup",
            &["--find".as_ref(), "--show".as_ref(), backing.as_os_str()],
        )
        .trim()
        .to_owned();
        let mount_point = directory.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let mut mount = Self {
            directory,
            mount_point,
            loop_device,
            mounted: false,
        };
        run(
            "mount",
            &[mount.loop_device.as_ref(), mount.mount_point.as_os_str()],
        );
        mount.mounted = true;
        mount
    }

    /// Bytes used on the file system (`df`).
    pub fn used(&self) -> u64 {
        let statistics = nix::sys::statvfs::statvfs(&self.mount_point).unwrap();
        (statistics.blocks() - statistics.blocks_free()) * statistics.fragment_size()
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mount_point).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
    }
}

/// Whether `filefrag -v` reports shared extents for `path`.
pub fn has_shared_extents(path: &Path) -> bool {
    run("filefrag", &["-v".as_ref(), path.as_os_str()]).contains("shared")
}

/// Builds a tar in memory.
pub struct TarBuilder(pub Builder<Vec<u8>>);

pub fn header(kind: EntryType, size: u64, mode: u32) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header
}

/// Writes `name` into the header verbatim (the builder refuses `..`).
pub fn set_raw_name(header: &mut Header, name: &[u8]) {
    let old = header.as_old_mut();
    old.name = [0; 100];
    old.name[..name.len()].copy_from_slice(name);
}

impl TarBuilder {
    pub fn new() -> Self {
        Self(Builder::new(Vec::new()))
    }

    pub fn raw(&mut self, mut header: Header, name: &[u8], data: &[u8]) -> &mut Self {
        set_raw_name(&mut header, name);
        header.set_cksum();
        self.0.append(&header, data).unwrap();
        self
    }

    pub fn directory(&mut self, name: &str) -> &mut Self {
        self.raw(header(EntryType::Directory, 0, 0o755), name.as_bytes(), &[])
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(
            header(EntryType::Regular, data.len() as u64, 0o644),
            name.as_bytes(),
            data,
        )
    }

    pub fn link(&mut self, kind: EntryType, name: &str, target: &[u8]) -> &mut Self {
        let mut header = header(kind, 0, 0o777);
        header.set_link_name_literal(target).unwrap();
        self.raw(header, name.as_bytes(), &[])
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, name, target.as_bytes())
    }

    pub fn hard_link(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, name, target.as_bytes())
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.0, Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::File::create(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}
