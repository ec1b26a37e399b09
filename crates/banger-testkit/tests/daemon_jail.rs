//! Jailed Firecracker end to end: a real `bangerd` runs fake-firecracker
//! under fake-jailer (the default when root), and the VMM process really is
//! unprivileged, in its chroot, in its own PID and mount namespaces and
//! cgroups; stop, restart-adopt and delete leave nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_testkit::test_daemon::{require_root, TestDaemon};

/// `Uid:` and `Gid:` (real, effective, saved, fs) of a process.
fn ids(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"))
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn vmm_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name("banger-vmm")
        .unwrap()
        .expect("the daemon creates the banger-vmm user");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// The VM's cgroups the daemon asked the jailer for, from the VMM's
/// `/proc/PID/cgroup` (`banger/<id>` in the cpu and memory hierarchies).
fn cgroup_lines(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Asserts everything that makes the VMM of `id` (pid `pid`) jailed.
fn assert_jailed(daemon: &TestDaemon, id: &str, pid: u32) {
    let (uid, gid) = vmm_user();
    assert_ne!(uid, 0);
    let (uids, gids) = ids(pid);
    assert_eq!(uids, vec![uid; 4], "the VMM runs as banger-vmm");
    assert_eq!(gids, vec![gid; 4]);
    let root = daemon.jail_root(id);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        root,
        "the VMM works in its chroot"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        root.join("fake-firecracker"),
        "the VMM runs the jailer's copy of the binary"
    );
    // The chroot is the VMM's, and holds what it was given by hard link.
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), uid);
    assert_eq!(
        std::fs::read_to_string(root.join("fake-firecracker.pid")).unwrap(),
        pid.to_string()
    );
    let vm_dir = daemon.state_dir.join("vms").join(id);
    assert_eq!(std::fs::read_link(vm_dir.join("jail")).unwrap(), root);
    assert_eq!(
        std::fs::metadata(root.join("drive-rootfs")).unwrap().ino(),
        std::fs::metadata(vm_dir.join("rootfs.ext4")).unwrap().ino()
    );
    assert!(root.join("firecracker.sock").exists());
    assert!(root.join("dev/kvm").exists() && root.join("dev/net/tun").exists());
    // Its own PID namespace (it is init there) and mount namespace.
    let pid_text = pid.to_string();
    assert_ne!(namespace(&pid_text, "pid"), namespace("self", "pid"));
    assert_ne!(namespace(&pid_text, "mnt"), namespace("self", "mnt"));
    let ns_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:").map(str::to_owned))
        .unwrap();
    assert_eq!(ns_pid.split_whitespace().last(), Some("1"), "{ns_pid}");
    // Its own cgroup with limits, where the host has cpu and memory.
    if let Some(cgroups) = banger_vmm::jail::Cgroups::detect() {
        let lines = cgroup_lines(pid);
        let own = format!("/banger/{id}");
        assert!(lines.iter().any(|line| line.ends_with(&own)), "{lines:?}");
        for dir in cgroups.vm_cgroups(id) {
            assert!(dir.exists(), "{}", dir.display());
        }
        match cgroups {
            banger_vmm::jail::Cgroups::V2 { root } => {
                let dir = root.join("banger").join(id);
                assert_eq!(
                    std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim(),
                    "200000 100000"
                );
            }
            banger_vmm::jail::Cgroups::V1 { cpu, memory } => {
                let quota = cpu.join("banger").join(id).join("cpu.cfs_quota_us");
                assert_eq!(std::fs::read_to_string(quota).unwrap().trim(), "200000");
                let limit = memory.join("banger").join(id).join("memory.limit_in_bytes");
                assert_eq!(
                    std::fs::read_to_string(limit).unwrap().trim(),
                    ((512 + 128) << 20).to_string()
                );
            }
        }
    } else {
        eprintln!("no cpu and memory cgroup controllers here: cgroup limits not checked");
    }
}

fn assert_unjailed_leftovers_gone(daemon: &TestDaemon, id: &str) {
    assert!(
        !daemon.jail_root(id).parent().unwrap().exists(),
        "jail left"
    );
    assert!(daemon
        .state_dir
        .join("vms")
        .join(id)
        .join("jail")
        .symlink_metadata()
        .is_err());
    if let Some(cgroups) = banger_vmm::jail::Cgroups::detect() {
        for dir in cgroups.vm_cgroups(id) {
            assert!(!dir.exists(), "cgroup left: {}", dir.display());
        }
    }
}

#[test]
fn jailed_vmm_create_stop_start_adopt_delete() {
    if !require_root("jailed_vmm_create_stop_start_adopt_delete") {
        return;
    }
    let mut daemon = TestDaemon::start_with(&[]);
    assert!(daemon.jailed());
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "jailed", "--image", "image", "--kernel", "kernel", "--vcpus", "2",
        "--memory", "512",
    ]);
    let vm = daemon.vm("jailed");
    let id = vm["id"].as_str().unwrap().to_owned();
    let pid = u32::try_from(vm["pid"].as_u64().unwrap()).unwrap();
    assert_eq!(daemon.vmm_pids(), vec![pid]);
    assert_jailed(&daemon, &id, pid);

    // Logs: the console (the VMM's stdout) and Firecracker's own log, which
    // it writes inside the jail, are in the VM's directory.
    let vm_dir = daemon.state_dir.join("vms").join(&id);
    let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap();
    assert!(console.contains("guest running"), "{console}");
    let log = std::fs::read_to_string(vm_dir.join("firecracker.log")).unwrap();
    assert!(log.contains("Running Firecracker"), "{log}");

    // Stop: the VMM, its jail and its cgroups are gone.
    daemon.banger_ok(&["vm", "stop", "jailed"]);
    assert!(daemon.vmm_pids().is_empty());
    assert_unjailed_leftovers_gone(&daemon, &id);

    // Start again, then the daemon dies and a new one adopts the VMM.
    daemon.banger_ok(&["vm", "start", "jailed"]);
    let pid = u32::try_from(daemon.vm("jailed")["pid"].as_u64().unwrap()).unwrap();
    assert_jailed(&daemon, &id, pid);
    daemon.kill9();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM outlives the daemon"
    );
    daemon.start();
    let vm = daemon.vm("jailed");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["pid"].as_u64().unwrap(), u64::from(pid));
    assert_jailed(&daemon, &id, pid);
    // The adopted VMM is reached inside its jail: stop asks it over the API.
    let stopped = daemon.requests_of(&id).len();
    daemon.banger_ok(&["vm", "stop", "jailed"]);
    let requests = daemon.requests_of(&id);
    assert_eq!(requests.len(), stopped + 1);
    assert_eq!(requests[stopped]["body"]["action_type"], "SendCtrlAltDel");
    assert_unjailed_leftovers_gone(&daemon, &id);

    // A crash while running also cleans up the jail.
    daemon.banger_ok(&["vm", "start", "jailed"]);
    let pid = daemon.vm("jailed")["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    daemon.wait_for_state("jailed", "crashed", Duration::from_secs(5));
    assert_unjailed_leftovers_gone(&daemon, &id);

    daemon.banger_ok(&["vm", "delete", "jailed"]);
    daemon.assert_no_leaks();
}

#[test]
fn a_failed_jailed_start_leaves_no_jail() {
    if !require_root("a_failed_jailed_start_leaves_no_jail") {
        return;
    }
    let daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_FAIL", "PUT /drives/rootfs")]);
    daemon.import_fixtures();
    let error = daemon.banger_err(&[
        "vm", "create", "broken", "--image", "image", "--kernel", "kernel",
    ]);
    assert!(error.contains("injected failure"), "{error}");
    assert!(daemon.vmm_pids().is_empty());
    let id = daemon.vm("broken")["id"].as_str().unwrap().to_owned();
    assert_unjailed_leftovers_gone(&daemon, &id);
    daemon.banger_ok(&["vm", "delete", "broken"]);
    daemon.assert_no_leaks();
}

#[test]
fn a_missing_jailer_is_a_clear_error_and_doctor_says_so() {
    if !require_root("a_missing_jailer_is_a_clear_error_and_doctor_says_so") {
        return;
    }
    let mut daemon = TestDaemon::new(&[]);
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    let jailer = banger_testkit::test_daemon::binary("fake-jailer");
    std::fs::write(
        &daemon.config,
        config.replace(&jailer.display().to_string(), "/nonexistent/jailer"),
    )
    .unwrap();
    daemon.start();
    daemon.import_fixtures();
    let output = daemon.banger(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("doctor JSON");
    let checks = report["checks"].as_array().unwrap();
    let jail = checks
        .iter()
        .find(|check| check["name"] == "vmm jail")
        .expect("a vmm jail check");
    assert_eq!(jail["status"], "fail", "{jail}");
    assert!(
        jail["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/jailer"),
        "{jail}"
    );
    let error = daemon.banger_err(&[
        "vm", "create", "nojail", "--image", "image", "--kernel", "kernel",
    ]);
    assert!(
        error.contains("The jailer `/nonexistent/jailer` was not found"),
        "{error}"
    );
    let _ = daemon.banger(&["vm", "delete", "nojail"]);
    daemon.assert_no_leaks();
}
