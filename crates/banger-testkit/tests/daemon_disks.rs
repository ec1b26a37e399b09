//! Work disks and root-disk growth through bangerd and the CLI, with
//! fake-firecracker as the VMM: what the VMM is given, what is kept,
//! attached, refused, grown and cleaned up.

use std::path::{Path, PathBuf};

use banger_testkit::test_daemon::TestDaemon;
use serde_json::Value;

fn disk_files(daemon: &TestDaemon) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(daemon.state_dir.join("disks"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn disk(daemon: &TestDaemon, name: &str) -> Value {
    daemon
        .banger_json(&["disk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|disk| disk["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no disk {name}"))
}

/// Block count and block size from `dumpe2fs -h`.
fn ext4_bytes(path: &Path) -> u64 {
    let output = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
    };
    field("Block count:") * field("Block size:")
}

/// Puts `e2fsck` and `resize2fs` shims first on the daemon's PATH that log
/// each call to the returned file, then run the real tool.
fn record_fsck_and_resize(daemon: &mut TestDaemon) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let shims = daemon.dir.path().join("shims");
    let calls = daemon.dir.path().join("fs-tool-calls.log");
    std::fs::create_dir_all(&shims).unwrap();
    for tool in ["e2fsck", "fsck.ext4", "resize2fs"] {
        let shim = shims.join(tool);
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> '{}'\nPATH=/usr/sbin:/sbin:/usr/bin:/bin exec {tool} \"$@\"\n",
                calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    daemon.set_env("PATH", &format!("{}:{path}", shims.display()));
    calls
}

fn fs_tool_calls(calls: &Path) -> String {
    std::fs::read_to_string(calls).unwrap_or_default()
}

#[test]
fn work_disks_attach_detach_survive_and_grow() {
    let mut daemon = TestDaemon::new(&[]);
    let calls = record_fsck_and_resize(&mut daemon);
    daemon.start();
    daemon.import_fixtures();

    // A VM with a new disk: made, labelled, handed to the VMM as a second drive.
    daemon.banger_ok(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "alpha",
        "--work-disk",
        "128M",
    ]);
    let vm = daemon.vm("alpha");
    assert_eq!(vm["work_disk"], "alpha-work");
    let work = disk(&daemon, "alpha-work");
    assert_eq!(work["vm"], "alpha");
    assert_eq!(work["size_bytes"], 128 << 20);
    let path = PathBuf::from(work["path"].as_str().unwrap());
    let label = std::process::Command::new("e2label")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "banger-work");
    let drives: Vec<Value> = daemon
        .requests_of(vm["id"].as_str().unwrap())
        .into_iter()
        .filter(|request| {
            request["path"]
                .as_str()
                .unwrap_or("")
                .starts_with("/drives/")
        })
        .collect();
    assert_eq!(drives.len(), 2, "{drives:?}");
    assert_eq!(drives[1]["path"], "/drives/work");
    if daemon.jailed() {
        // Hard-linked into the VM's chroot.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(drives[1]["body"]["path_on_host"], "/drive-work");
        let linked = daemon
            .jail_root(vm["id"].as_str().unwrap())
            .join("drive-work");
        assert_eq!(
            std::fs::metadata(linked).unwrap().ino(),
            std::fs::metadata(&path).unwrap().ino()
        );
    } else {
        assert_eq!(
            drives[1]["body"]["path_on_host"],
            path.display().to_string()
        );
    }
    assert_eq!(drives[1]["body"]["is_root_device"], false);

    // Attached: not removable, not attachable elsewhere, not resizable while running.
    let error = daemon.banger_err(&["disk", "rm", "alpha-work"]);
    assert!(error.contains("attached to VM `alpha`"), "{error}");
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "beta",
        "--work-disk",
        "alpha-work",
    ]);
    assert!(error.contains("attached to VM `alpha`"), "{error}");
    assert!(
        daemon
            .banger_json(&["vm", "list"])
            .as_array()
            .unwrap()
            .len()
            == 1
    );
    let error = daemon.banger_err(&["disk", "resize", "alpha-work", "256M"]);
    assert!(error.contains("running"), "{error}");
    // A second VM asking for a new disk under a taken name is refused up front.
    daemon.banger_ok(&["disk", "create", "beta-work", "64M"]);
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "beta",
        "--work-disk",
        "1G",
    ]);
    assert!(error.contains("`beta-work` exists"), "{error}");
    daemon.banger_ok(&["disk", "rm", "beta-work"]);

    // Delete keeping the disk: detached, the file stays.
    daemon.banger_ok(&["vm", "delete", "--force", "--keep-work-disk", "alpha"]);
    assert_eq!(disk(&daemon, "alpha-work")["vm"], Value::Null);
    assert!(path.exists());

    // Reattach to a new VM; grow it while that VM is stopped; shrinking is refused.
    daemon.banger_ok(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "gamma",
        "--work-disk",
        "alpha-work",
    ]);
    assert_eq!(daemon.vm("gamma")["work_disk"], "alpha-work");
    daemon.banger_ok(&["vm", "stop", "gamma"]);
    // Growing lengthens the file; the file system is the guest's to grow
    // (its agent does at the next boot), so no e2fsck or resize2fs runs on
    // the host.
    let _ = std::fs::remove_file(&calls);
    let fs_before = ext4_bytes(&path);
    daemon.banger_ok(&["disk", "resize", "alpha-work", "256M"]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 << 20);
    assert_eq!(disk(&daemon, "alpha-work")["size_bytes"], 256 << 20);
    assert_eq!(ext4_bytes(&path), fs_before);
    assert_eq!(fs_tool_calls(&calls), "", "disk resize ran host fs tools");
    // More than the state dir's file system has free is refused up front.
    let error = daemon.banger_err(&["disk", "resize", "alpha-work", "15T"]);
    assert!(error.contains("No space for a disk of 15T"), "{error}");
    let error = daemon.banger_err(&["disk", "create", "huge", "15T"]);
    assert!(error.contains("No space for a disk of 15T"), "{error}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 << 20);
    let error = daemon.banger_err(&["disk", "resize", "alpha-work", "64M"]);
    assert!(error.contains("never shrink"), "{error}");

    // The root disk grows too (stopped VM only), never shrinks.
    let root = daemon
        .state_dir
        .join("vms")
        .join(daemon.vm("gamma")["id"].as_str().unwrap())
        .join("rootfs.ext4");
    let fs_before = ext4_bytes(&root);
    daemon.banger_ok(&["vm", "set", "gamma", "--disk-size", "96M"]);
    assert_eq!(daemon.vm("gamma")["disk_bytes"], 96 << 20);
    assert_eq!(std::fs::metadata(&root).unwrap().len(), 96 << 20);
    assert_eq!(ext4_bytes(&root), fs_before);
    assert_eq!(
        fs_tool_calls(&calls),
        "",
        "vm set --disk-size ran host fs tools"
    );
    let error = daemon.banger_err(&["vm", "set", "gamma", "--disk-size", "32M"]);
    assert!(error.contains("never shrink"), "{error}");
    daemon.banger_ok(&["vm", "start", "gamma"]);
    let error = daemon.banger_err(&["vm", "set", "gamma", "--disk-size", "128M"]);
    assert!(error.contains("stopped VMs only"), "{error}");

    // Bad input: one clear line each.
    let error = daemon.banger_err(&["disk", "create", "tiny", "1M"]);
    assert!(error.contains("out of range"), "{error}");
    let error = daemon.banger_err(&["disk", "create", "weird", "ten"]);
    assert!(error.contains("not a size"), "{error}");
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "delta",
        "--work-disk",
        "nope",
    ]);
    assert!(error.contains("No work disk named `nope`"), "{error}");

    // Deleting without --keep-work-disk deletes it.
    daemon.banger_ok(&["vm", "delete", "--force", "gamma"]);
    assert!(!path.exists());
    assert!(daemon
        .banger_json(&["disk", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(disk_files(&daemon).is_empty());

    // A disk file no row accounts for is removed at the next start.
    let orphan = daemon.state_dir.join("disks").join("orphan.ext4");
    std::fs::write(&orphan, b"left by an interrupted create").unwrap();
    daemon.kill9();
    daemon.start();
    assert!(!orphan.exists());
    daemon.assert_no_leaks();
}

#[test]
fn a_failed_create_releases_the_work_disk_it_made_or_attached() {
    // The boot fails: the new disk is deleted, an attached one detached.
    let daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_FAIL", "PUT /actions")]);
    daemon.import_fixtures();
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "fails",
        "--work-disk",
        "64M",
    ]);
    assert!(error.contains("boot"), "{error}");
    assert!(daemon
        .banger_json(&["disk", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(disk_files(&daemon).is_empty());
    daemon.banger_ok(&["vm", "delete", "fails"]);

    daemon.banger_ok(&["disk", "create", "keepme", "64M"]);
    daemon.banger_err(&[
        "vm",
        "create",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "fails2",
        "--work-disk",
        "keepme",
    ]);
    let kept = disk(&daemon, "keepme");
    assert_eq!(kept["vm"], Value::Null);
    assert!(Path::new(kept["path"].as_str().unwrap()).exists());
    daemon.banger_ok(&["vm", "delete", "fails2"]);
    daemon.banger_ok(&["disk", "rm", "keepme"]);
    assert!(disk_files(&daemon).is_empty());
    daemon.assert_no_leaks();
}

/// Starts `vm create NAME ARGS` with the VMM stalled, waits for the `start
/// vmm` stage, and kills the daemon there.
fn kill_daemon_during_create(daemon: &mut TestDaemon, name: &str, args: &[&str]) {
    use std::io::{BufRead, BufReader};
    let mut child = daemon
        .command()
        .args([
            "vm", "create", name, "--image", "image", "--kernel", "kernel", "--json",
        ])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let event: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if event["stage"] == "start vmm" && event["status"] == "started" {
            break;
        }
    }
    daemon.kill9();
    let _ = child.wait();
}

#[test]
fn a_create_the_daemon_died_in_deletes_the_disk_it_made_and_keeps_an_attached_one() {
    let mut daemon =
        TestDaemon::start_with(&[("FAKE_FIRECRACKER_DELAY", "PUT /machine-config=20000")]);
    daemon.import_fixtures();
    daemon.banger_ok(&["disk", "create", "older", "64M"]);
    kill_daemon_during_create(&mut daemon, "made", &["--work-disk", "64M"]);
    daemon.start();
    kill_daemon_during_create(&mut daemon, "attached", &["--work-disk", "older"]);
    daemon.remove_env("FAKE_FIRECRACKER_DELAY");
    daemon.start();
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
    let disks = daemon.banger_json(&["disk", "list"]);
    let names: Vec<&str> = disks
        .as_array()
        .unwrap()
        .iter()
        .map(|disk| disk["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["older"], "{disks}");
    assert_eq!(disk(&daemon, "older")["vm"], Value::Null);
    assert_eq!(disk_files(&daemon).len(), 1);
    daemon.assert_no_leaks();
}
