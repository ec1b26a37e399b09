//! Inputs the cases make: ext4 images, a stand-in kernel, generated trees,
//! and a few shell-level helpers.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Cheap deterministic bytes that do not compress (xorshift64).
pub struct Noise(u64);

impl Noise {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `bytes` of noise to a new file.
///
/// # Errors
/// The file cannot be written.
pub fn write_noise(path: &Path, bytes: u64, seed: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut noise = Noise::new(seed);
    let mut buffer = vec![0_u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let length = usize::try_from(left.min(buffer.len() as u64)).unwrap_or(buffer.len());
        noise.fill(&mut buffer[..length]);
        file.write_all(&buffer[..length])?;
        left -= length as u64;
    }
    file.flush()?;
    Ok(())
}

/// An ext4 file system of `size_mib` (a sparse file), filled from
/// `contents` when given (`mkfs.ext4 -d`). No journal: nothing mounts it
/// on the host, and a journal would be most of what a small one holds,
/// which a thousand clones of it would pay for in space.
///
/// # Errors
/// `mkfs.ext4` is missing or fails.
pub fn make_ext4(path: &Path, size_mib: u64, contents: Option<&Path>) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(size_mib << 20)?;
    drop(file);
    let mut command = Command::new("mkfs.ext4");
    command.args(["-q", "-F", "-O", "^has_journal"]);
    if let Some(contents) = contents {
        command.arg("-d").arg(contents);
    }
    run(command.arg(path)).context("mkfs.ext4 (apt install e2fsprogs)")?;
    Ok(())
}

/// A stand-in kernel: an ELF header, enough for banger's format check and
/// for fake-firecracker, which does not boot it.
///
/// # Errors
/// The file cannot be written.
pub fn write_fake_kernel(path: &Path) -> anyhow::Result<()> {
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.resize(4096, 0);
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

/// The image and kernel every fake case registers as `default`.
///
/// # Errors
/// They cannot be made.
pub fn fake_defaults(directory: &Path, image_mib: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    let image = directory.join("image.ext4");
    make_ext4(&image, image_mib, None)?;
    let kernel = directory.join("vmlinux");
    write_fake_kernel(&kernel)?;
    Ok((image, kernel))
}

/// Mostly small files in 100 directories plus a few large ones: `files` in
/// all, `bytes` in all, noise so nothing compresses.
///
/// # Errors
/// The tree cannot be written.
pub fn generate_tree(root: &Path, files: usize, bytes: u64) -> anyhow::Result<()> {
    let large = (files / 200).max(1);
    let small = files.saturating_sub(large).max(1);
    let small_size = (bytes / 3) / small as u64;
    let large_size = (bytes - small_size * small as u64) / large as u64;
    for index in 0..files {
        let directory = root.join("src").join(format!("d{:03}", index % 100));
        std::fs::create_dir_all(&directory)?;
        let size = if index < large {
            large_size
        } else {
            small_size
        };
        write_noise(
            &directory.join(format!("f{index:05}.dat")),
            size,
            index as u64 + 1,
        )?;
    }
    Ok(())
}

/// Makes `tree` a git repository with everything committed.
///
/// # Errors
/// git is missing or fails.
pub fn commit_tree(tree: &Path) -> anyhow::Result<()> {
    let git = |args: &[&str]| {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(tree)
            .args([
                "-c",
                "gc.auto=0",
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@localhost",
            ])
            .args(args);
        run(&mut command).context("git")
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "tree"])?;
    Ok(())
}

/// Bytes under `path` (`du -sb`).
///
/// # Errors
/// du fails.
pub fn disk_usage(path: &Path) -> anyhow::Result<u64> {
    let output = run(Command::new("du").arg("-sb").arg(path))?;
    output
        .split_whitespace()
        .next()
        .and_then(|bytes| bytes.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("du printed {output:?}"))
}

/// Runs a command to completion; fails with its stderr unless it exits 0.
/// Returns stdout.
///
/// # Errors
/// It cannot be run or exits non-zero.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            command,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with a reason unless the file system holding `path` has
/// `needed` bytes free for this run (none of the cases may fill a disk).
///
/// # Errors
/// Too little space, or statvfs fails.
pub fn require_free(path: &Path, needed: u64) -> Result<(), String> {
    let statistics = nix::sys::statvfs::statvfs(path)
        .map_err(|error| format!("statvfs {}: {error}", path.display()))?;
    let free = statistics.blocks_available() * statistics.fragment_size();
    if free < needed {
        return Err(format!(
            "needs about {:.1} GiB free under {}, which has {:.1} GiB (TMPDIR picks another place)",
            gib(needed),
            path.display(),
            gib(free)
        ));
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 30)
}

/// The type of the file system holding `path`, as `stat -f` names it
/// (`ext2/ext3`, `tmpfs`, `xfs`).
#[must_use]
pub fn file_system_type(path: &Path) -> String {
    run(Command::new("stat").args(["-f", "-c", "%T"]).arg(path))
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Removes a directory tree if it exists.
///
/// # Errors
/// It exists and cannot be removed.
pub fn remove_tree(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
