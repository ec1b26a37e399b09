//! Files a caller names are read with the caller's rights, and only as
//! regular, bounded files: the root daemon must not read for a member of
//! the access group what that member could not read, nor hang or run out of
//! memory on what it is pointed at.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{
    require_root, write_fake_kernel, write_static_agent_stub, TestDaemon,
};

const RELEASE: &str = "6.1.0-test";

/// Every module the agent initramfs wants is built in except `virtio`,
/// which is `kernel/virtio.ko`: one file decides what gets packed.
const BUILTIN: &str = "\
kernel/virtio_ring.ko
kernel/virtio_mmio.ko
kernel/virtio_pci.ko
kernel/virtio_blk.ko
kernel/virtio_net.ko
kernel/virtio_console.ko
kernel/vsock.ko
kernel/vmw_vsock_virtio_transport_common.ko
kernel/vmw_vsock_virtio_transport.ko
kernel/ext4.ko
kernel/af_packet.ko
";

/// A daemon whose access group is `nogroup`, so uid 65534 (gid 65534) is a
/// member and no more.
fn group_daemon() -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    // The agent packed into initrds must be a static executable; the
    // `banger-agent` next to bangerd in a test build is not.
    let agent = daemon.dir.path().join("static-banger-agent");
    write_static_agent_stub(&agent);
    let config = std::fs::read_to_string(&daemon.config).unwrap().replace(
        "[agent]\n",
        &format!("[agent]\npath = \"{}\"\n", agent.display()),
    );
    std::fs::write(
        &daemon.config,
        format!("{config}\n[access]\ngroup = \"nogroup\"\n"),
    )
    .unwrap();
    daemon.start();
    daemon
}

/// An unpacked Debian kernel package in a world-readable directory, with
/// `kernel/virtio.ko` left for the test to make.
fn package(root: &Path) -> PathBuf {
    let modules = root.join("lib/modules").join(RELEASE);
    std::fs::create_dir_all(modules.join("kernel")).unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    write_fake_kernel(&root.join(format!("boot/vmlinuz-{RELEASE}")));
    std::fs::write(modules.join("modules.dep"), "kernel/virtio.ko:\n").unwrap();
    std::fs::write(modules.join("modules.builtin"), BUILTIN).unwrap();
    open_up(root);
    modules.join("kernel/virtio.ko")
}

/// Directories 0755 and files 0644 (not following symlinks).
fn open_up(path: &Path) {
    let metadata = std::fs::symlink_metadata(path).unwrap();
    if metadata.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(path).unwrap() {
            open_up(&entry.unwrap().path());
        }
    } else if metadata.is_file() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// `banger ARGS` as uid/gid 65534, killed (and the test failed) if it
/// takes longer than `limit`.
fn banger_as_member(daemon: &TestDaemon, args: &[&str], limit: Duration) -> Output {
    run_bounded(
        daemon
            .command()
            .args(args)
            .uid(65_534)
            .gid(65_534)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        limit,
        daemon,
    )
}

fn run_bounded(
    command: &mut std::process::Command,
    limit: Duration,
    daemon: &TestDaemon,
) -> Output {
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} still running after {limit:?}: the daemon hangs\ndaemon log:\n{}",
                daemon.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Whether `marker` is in any file under `directory`, plain or gunzipped.
fn found_in(directory: &Path, marker: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(directory) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let file_type = entry.file_type().unwrap();
        if file_type.is_dir() {
            found.extend(found_in(&path, marker));
            continue;
        }
        if !file_type.is_file() {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut inflated = Vec::new();
        let _ = flate2::read::GzDecoder::new(bytes.as_slice()).read_to_end(&mut inflated);
        if [bytes, inflated].iter().any(|contents| {
            contents
                .windows(marker.len())
                .any(|window| window == marker)
        }) {
            found.push(path);
        }
    }
    found
}

fn kernel_names(daemon: &TestDaemon) -> Vec<String> {
    daemon
        .banger_json(&["kernel", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|kernel| kernel["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_group_member_cannot_pack_root_only_files_into_an_initrd() {
    if !require_root("a_group_member_cannot_pack_root_only_files_into_an_initrd") {
        return;
    }
    let daemon = group_daemon();
    let site = tempfile::tempdir().unwrap();
    std::fs::set_permissions(site.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = format!("ROOT-ONLY-{}", std::process::id());
    let secret = site.path().join("secret");
    std::fs::write(&secret, &marker).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let root = site.path().join("package");
    let module = package(&root);
    let from = root.display().to_string();
    let import = |name: &str| {
        banger_as_member(
            &daemon,
            &["kernel", "import", name, "--from-debian", &from],
            Duration::from_secs(60),
        )
    };

    // A module that is a symlink to a root-only file outside the package.
    std::os::unix::fs::symlink(&secret, &module).unwrap();
    let output = import("outside");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} leads outside {}",
            module.display(),
            module.parent().unwrap().parent().unwrap().display()
        )),
        "{stderr}"
    );

    // A root-only file inside the package, reached by a relative symlink.
    std::fs::remove_file(&module).unwrap();
    let inside = module.with_file_name("private.ko");
    std::fs::write(&inside, &marker).unwrap();
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("private.ko", &module).unwrap();
    let output = import("inside");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // ... and the same file named directly.
    std::fs::remove_file(&module).unwrap();
    std::fs::rename(&inside, &module).unwrap();
    let output = import("direct");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");

    assert_eq!(kernel_names(&daemon), Vec::<String>::new());
    assert_eq!(
        found_in(&daemon.state_dir, marker.as_bytes()),
        Vec::<PathBuf>::new()
    );
    daemon.assert_no_leaks();

    // The member's own readable module is packed: the refusals above are
    // about rights, and the scan would have found the marker.
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = import("readable");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(kernel_names(&daemon), ["readable"]);
    let packed = found_in(&daemon.state_dir, marker.as_bytes());
    assert_eq!(packed.len(), 1, "{packed:?}");
    assert!(packed[0].ends_with("initrd"), "{packed:?}");
    daemon.banger_ok(&["kernel", "rm", "readable"]);
    daemon.assert_no_leaks();
}

#[test]
fn fifos_devices_and_huge_modules_are_refused_without_hanging() {
    if !require_root("fifos_devices_and_huge_modules_are_refused_without_hanging") {
        return;
    }
    let daemon = group_daemon();
    let site = tempfile::tempdir().unwrap();
    let root = site.path().join("package");
    let module = package(&root);
    let from = root.display().to_string();
    let import = |daemon: &TestDaemon| {
        banger_as_member(
            daemon,
            &["kernel", "import", "hostile", "--from-debian", &from],
            Duration::from_secs(60),
        )
    };
    let refused = |daemon: &TestDaemon, expected: &str| {
        let output = import(daemon);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    };

    // A FIFO nobody writes to: opening it as a plain file blocks forever.
    nix::unistd::mkfifo(&module, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    refused(
        &daemon,
        &format!("{} is a FIFO, not a regular file", module.display()),
    );
    std::fs::remove_file(&module).unwrap();

    // A /dev/zero of its own: endless bytes.
    nix::sys::stat::mknod(
        &module,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 5),
    )
    .unwrap();
    refused(
        &daemon,
        &format!(
            "{} is a character device, not a regular file",
            module.display()
        ),
    );
    std::fs::remove_file(&module).unwrap();

    // ... and the real one through a symlink.
    std::os::unix::fs::symlink("/dev/zero", &module).unwrap();
    refused(&daemon, "leads outside");
    std::fs::remove_file(&module).unwrap();

    // A sparse file far larger than any module.
    let huge = std::fs::File::create(&module).unwrap();
    huge.set_len(1 << 40).unwrap();
    drop(huge);
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&daemon, "bytes allowed");

    // A directory where modules.dep should be.
    std::fs::remove_file(&module).unwrap();
    let dep = module
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("modules.dep");
    std::fs::remove_file(&dep).unwrap();
    std::fs::create_dir(&dep).unwrap();
    let output = import(&daemon);
    assert_eq!(output.status.code(), Some(1));

    // The daemon still serves, and nothing was registered or left behind.
    assert_eq!(kernel_names(&daemon), Vec::<String>::new());
    daemon.assert_no_leaks();
}

#[test]
fn kernel_and_initrd_files_must_be_regular_and_bounded() {
    if !require_root("kernel_and_initrd_files_must_be_regular_and_bounded") {
        return;
    }
    let daemon = group_daemon();
    let site = tempfile::tempdir().unwrap();
    std::fs::set_permissions(site.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kernel = site.path().join("vmlinux");
    write_fake_kernel(&kernel);
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fifo = site.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let huge = site.path().join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    std::fs::set_permissions(&huge, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret = site.path().join("secret");
    write_fake_kernel(&secret);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let kernel_arg = kernel.display().to_string();
    for (args, expected) in [
        (
            vec![
                "kernel",
                "import",
                "k",
                &kernel_arg,
                "--initrd",
                "/dev/zero",
            ],
            "The initrd /dev/zero is not a regular file".to_owned(),
        ),
        (
            vec![
                "kernel",
                "import",
                "k",
                &kernel_arg,
                "--initrd",
                fifo.to_str().unwrap(),
            ],
            format!("The initrd {} is not a regular file", fifo.display()),
        ),
        (
            vec!["kernel", "import", "k", huge.to_str().unwrap()],
            format!("The kernel {} is larger than", huge.display()),
        ),
        (
            vec!["kernel", "import", "k", secret.to_str().unwrap()],
            format!("Cannot read kernel {}", secret.display()),
        ),
    ] {
        let output = banger_as_member(&daemon, &args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
    }
    let output = banger_as_member(
        &daemon,
        &["kernel", "import", "k", &kernel_arg],
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(kernel_names(&daemon), ["k"]);
    daemon.banger_ok(&["kernel", "rm", "k"]);
    daemon.assert_no_leaks();
}
