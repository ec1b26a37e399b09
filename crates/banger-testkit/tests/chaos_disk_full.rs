//! Disk full: the daemon's state dir is a small ext4 file system on a loop
//! device the test makes (root only; CI runs as root). With a ballast file
//! leaving too little free, image import, create (root disk copy) and work
//! disk create each fail with a "No space" error naming the directory and
//! the size needed; nothing is registered or left; the daemon keeps
//! serving; with the ballast gone the same command succeeds.
//!
//! `vm snapshot` the same way: refused before the VM is paused, naming the
//! snapshot dir and the memory + disk size; the source runs on; nothing
//! is registered.

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_testkit::host_state::HostState;
use banger_testkit::test_daemon::{make_ext4, require_root, write_fake_kernel, TestDaemon};

/// A daemon whose state dir is a mounted loop file system of `size_mib`;
/// unmounted after the daemon is gone.
struct SmallStateDir {
    daemon: Option<TestDaemon>,
    mount_point: PathBuf,
}

impl SmallStateDir {
    fn new(size_mib: u64) -> Self {
        let daemon = TestDaemon::new(&[]);
        let backing = daemon.dir.path().join("state.img");
        make_ext4(&backing, size_mib);
        std::fs::create_dir_all(&daemon.state_dir).expect("create state dir");
        let status = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&backing)
            .arg(&daemon.state_dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mount -o loop failed");
        let mount_point = daemon.state_dir.clone();
        let _ = std::fs::remove_dir(mount_point.join("lost+found"));
        let mut this = Self {
            daemon: Some(daemon),
            mount_point,
        };
        this.daemon().start();
        this
    }

    fn daemon(&mut self) -> &mut TestDaemon {
        self.daemon.as_mut().expect("daemon")
    }

    fn free(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(&self.mount_point).expect("statvfs");
        stat.blocks_available() * stat.fragment_size()
    }

    /// Fills the file system until `left` bytes are free.
    fn fill_leaving(&self, left: u64) -> PathBuf {
        let ballast = self.mount_point.join("ballast");
        let size = self.free().saturating_sub(left);
        let status = Command::new("fallocate")
            .args(["-l", &size.to_string()])
            .arg(&ballast)
            .status()
            .expect("fallocate");
        assert!(status.success(), "fallocate failed");
        ballast
    }
}

impl Drop for SmallStateDir {
    fn drop(&mut self) {
        // The daemon stops, the file system goes (lazily, after the VMMs
        // the daemon's drop kills), then the temp dir with the mount point.
        let mut daemon = self.daemon.take();
        if let Some(daemon) = daemon.as_mut() {
            daemon.kill9();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
        drop(daemon);
    }
}

/// What a sparse copy of `path` needs: its allocated bytes.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).expect("stat");
    metadata.len().min(metadata.blocks() * 512)
}

fn assert_no_space(stderr: &str, dir: &Path, needed: &str) {
    // One error line names it all (progress lines may come before it).
    let line = stderr
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        line.contains("No space") && line.contains(&dir.display().to_string()),
        "not a no-space error naming {}: {stderr}",
        dir.display()
    );
    assert!(
        line.contains(needed),
        "the size needed ({needed}) is not named: {stderr}"
    );
}

#[test]
fn full_state_dir_refuses_import_create_and_work_disk_cleanly_then_recovers() {
    if !require_root("full_state_dir_refuses_import_create_and_work_disk_cleanly_then_recovers") {
        return;
    }
    let mut small = SmallStateDir::new(320);
    let state_dir = small.daemon().state_dir.clone();
    // An image with 30 MiB of data (copies keep holes, so data is what
    // they need).
    let content = small.daemon().dir.path().join("content");
    std::fs::create_dir(&content).expect("content dir");
    let mut data = vec![0_u8; 30 << 20];
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = u8::try_from(index * 7 % 251).expect("byte") | 1;
    }
    std::fs::write(content.join("data"), &data).expect("write data");
    let image = small.daemon().dir.path().join("image.ext4");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(48 << 20))
        .expect("size image");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .status()
        .expect("mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 -d failed");
    let image_size = allocated(&image);
    let kernel = small.daemon().dir.path().join("vmlinux");
    write_fake_kernel(&kernel);
    let image_arg = image.to_str().expect("utf-8");
    small.daemon().banger_ok(&[
        "kernel",
        "import",
        "kernel",
        kernel.to_str().expect("utf-8"),
    ]);

    // Image import.
    let ballast = small.fill_leaving(10 << 20);
    let before = HostState::capture(small.daemon()).without(&["store:operations"]);
    let error = small
        .daemon()
        .banger_err(&["image", "import", "image", image_arg]);
    assert_no_space(&error, &state_dir.join("tmp"), &image_size.to_string());
    small.daemon().banger_ok(&["vm", "list"]);
    before.assert_same(
        &HostState::capture(small.daemon()).without(&["store:operations"]),
        "failed image import",
    );
    std::fs::remove_file(&ballast).expect("remove ballast");
    small
        .daemon()
        .banger_ok(&["image", "import", "image", image_arg]);

    // Create: the root disk is a copy of the image (no reflink on ext4).
    let ballast = small.fill_leaving(10 << 20);
    let before = HostState::capture(small.daemon()).without(&["store:operations"]);
    let create = [
        "vm", "create", "full", "--image", "image", "--kernel", "kernel",
    ];
    let imported = small.daemon().banger_json(&["image", "show", "image"])["path"]
        .as_str()
        .expect("path")
        .to_owned();
    let error = small.daemon().banger_err(&create);
    assert_no_space(
        &error,
        &state_dir.join("vms"),
        &allocated(Path::new(&imported)).to_string(),
    );
    assert_eq!(
        small.daemon().banger_json(&["vm", "list"]),
        serde_json::json!([])
    );
    before.assert_same(
        &HostState::capture(small.daemon()).without(&["store:operations"]),
        "failed create",
    );
    std::fs::remove_file(&ballast).expect("remove ballast");
    small.daemon().banger_ok(&create);
    small
        .daemon()
        .banger_ok(&["vm", "delete", "full", "--force"]);

    // Work disk (64M at least).
    let ballast = small.fill_leaving(10 << 20);
    let before = HostState::capture(small.daemon()).without(&["store:operations"]);
    let error = small
        .daemon()
        .banger_err(&["disk", "create", "scratch", "64M"]);
    assert_no_space(&error, &state_dir.join("disks"), "64M");
    assert_eq!(
        small.daemon().banger_json(&["disk", "list"]),
        serde_json::json!([])
    );
    before.assert_same(
        &HostState::capture(small.daemon()).without(&["store:operations"]),
        "failed work disk create",
    );
    std::fs::remove_file(&ballast).expect("remove ballast");
    small
        .daemon()
        .banger_ok(&["disk", "create", "scratch", "64M"]);
    small.daemon().banger_ok(&["disk", "rm", "scratch"]);

    // Snapshot: the guest's memory and a copy of the root disk.
    small.daemon().banger_ok(&[
        "vm", "create", "src", "--image", "image", "--kernel", "kernel", "--memory", "128",
    ]);
    let src = small.daemon().vm("src");
    let root_disk = Path::new(src["dir"].as_str().expect("dir")).join("rootfs.ext4");
    let needed = (128 << 20) + allocated(&root_disk);
    small
        .daemon()
        .banger_ok(&["vm", "snapshot", "src", "first"]);
    small.daemon().banger_ok(&["snapshot", "rm", "first"]);
    let ballast = small.fill_leaving(10 << 20);
    let before = HostState::capture(small.daemon()).without(&["store:operations"]);
    let error = small
        .daemon()
        .banger_err(&["vm", "snapshot", "src", "full"]);
    assert_no_space(&error, &state_dir.join("snapshots"), &needed.to_string());
    assert_eq!(small.daemon().vm("src")["state"], "running");
    assert_eq!(
        small.daemon().banger_json(&["snapshot", "list"]),
        serde_json::json!([])
    );
    before.assert_same(
        &HostState::capture(small.daemon()).without(&["store:operations"]),
        "failed snapshot",
    );
    std::fs::remove_file(&ballast).expect("remove ballast");
    small.daemon().banger_ok(&["vm", "snapshot", "src", "full"]);
    small.daemon().banger_ok(&["snapshot", "rm", "full"]);
    small
        .daemon()
        .banger_ok(&["vm", "delete", "src", "--force"]);
    small.daemon().banger_ok(&["image", "rm", "image"]);
}
