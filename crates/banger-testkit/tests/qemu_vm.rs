//! A real guest under QEMU (TCG on hosts without usable KVM), driven through
//! bangerd and the CLI: the host's Debian cloud kernel and initrd, and an
//! image imported from a busybox tarball whose init prints a marker.
//! Skips, saying why, where QEMU, the kernel or busybox is missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::TestDaemon;

const MARKER: &str = "banger-guest-up";

struct GuestParts {
    kernel: PathBuf,
    initrd: PathBuf,
    busybox: PathBuf,
}

fn guest_parts() -> Result<GuestParts, String> {
    if banger_daemon_tool("qemu-system-x86_64").is_none() {
        return Err("qemu-system-x86_64 not found (apt install qemu-system-x86)".into());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .ok_or("busybox not found (apt install busybox-static)")?;
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|error| format!("cannot read /boot: {error}"))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
        })
        .collect();
    kernels.sort();
    let kernel = kernels
        .pop()
        .ok_or("no /boot/vmlinuz-*-cloud-amd64 (apt install linux-image-cloud-amd64)")?;
    let version = kernel
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let initrd = PathBuf::from(format!("/boot/initrd.img-{version}"));
    if !initrd.exists() {
        return Err(format!("{} is missing", initrd.display()));
    }
    Ok(GuestParts {
        kernel,
        initrd,
        busybox,
    })
}

fn banger_daemon_tool(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
}

/// A root filesystem tarball: busybox and an init that prints the marker.
fn busybox_rootfs(dir: &Path, busybox: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for sub in ["bin", "sbin", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    std::fs::write(
        root.join("sbin/init"),
        format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox echo \"{MARKER} $(/bin/busybox uname -r)\"\nexec /bin/busybox sleep 1000000\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let tarball = dir.join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    tarball
}

fn markers(daemon: &TestDaemon, vm_id: &str) -> usize {
    let log = daemon.state_dir.join("vms").join(vm_id).join("console.log");
    std::fs::read(&log)
        .map(|bytes| String::from_utf8_lossy(&bytes).matches(MARKER).count())
        .unwrap_or(0)
}

fn wait_for_markers(daemon: &TestDaemon, vm_id: &str, count: usize) -> Duration {
    let started = Instant::now();
    while markers(daemon, vm_id) < count {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "guest printed no marker within 180 s; console:\n{}",
            std::fs::read_to_string(daemon.state_dir.join("vms").join(vm_id).join("console.log"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_real_guest_boots_stops_restarts_survives_the_daemon_and_crashes() {
    let parts = match guest_parts() {
        Ok(parts) => parts,
        Err(reason) => {
            eprintln!("SKIPPED a_real_guest_boots_stops_restarts_survives_the_daemon_and_crashes: {reason}");
            return;
        }
    };
    let mut daemon = TestDaemon::new(&[]);
    std::fs::write(
        &daemon.config,
        "[network]\nenabled = false\n\n[vmm]\nbackend = \"qemu\"\n\n[vm]\nmemory_mib = 512\nvcpus = 1\nstop_grace_seconds = 3\n\n# The host initrd carries no agent.\n[agent]\nwait = false\n",
    )
    .unwrap();
    daemon.start();
    let tarball = busybox_rootfs(daemon.dir.path(), &parts.busybox);
    daemon.banger_ok(&["image", "import", "busybox", tarball.to_str().unwrap()]);
    daemon.banger_ok(&[
        "kernel",
        "import",
        "cloud",
        parts.kernel.to_str().unwrap(),
        "--initrd",
        parts.initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 panic=1",
    ]);

    let started = Instant::now();
    daemon.banger_ok(&[
        "vm", "create", "real", "--image", "busybox", "--kernel", "cloud",
    ]);
    eprintln!("phase create: {:?}", started.elapsed());
    let vm = daemon.vm("real");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["backend"], "qemu");
    let id = vm["id"].as_str().unwrap().to_owned();
    eprintln!(
        "phase boot to init: {:?}",
        wait_for_markers(&daemon, &id, 1)
    );

    // QEMU dropped root for the VMM user, runs under its seccomp filter, and
    // sits in the VM's own cgroups.
    let pid = vm["pid"].as_u64().unwrap();
    assert_qemu_confined(pid, &id);

    // The daemon dies; the guest does not, and the next daemon adopts it.
    daemon.kill9();
    daemon.start();
    let vm = daemon.vm("real");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["pid"].as_u64().unwrap(), pid);

    let started = Instant::now();
    daemon.banger_ok(&["vm", "stop", "real"]);
    eprintln!("phase stop: {:?}", started.elapsed());
    assert_eq!(daemon.vm("real")["state"], "stopped");
    assert!(daemon.vmm_pids().is_empty());

    daemon.banger_ok(&["vm", "start", "real"]);
    eprintln!("phase second boot: {:?}", wait_for_markers(&daemon, &id, 2));

    // The VMM is killed behind banger's back: the VM is crashed.
    let pid = daemon.vm("real")["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    daemon.wait_for_state("real", "crashed", Duration::from_secs(5));
    if let Some(cgroups) = banger_vmm::jail::Cgroups::detect() {
        for dir in cgroups.vm_cgroups(&id) {
            assert!(!dir.exists(), "cgroup left: {}", dir.display());
        }
    }
    daemon.banger_ok(&["vm", "delete", "real"]);
    daemon.assert_no_leaks();
}

/// QEMU `pid` runs as `banger-vmm` (every uid), with seccomp filtering, in
/// VM `id`'s cgroups where the host has cpu and memory controllers.
fn assert_qemu_confined(pid: u64, id: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: QEMU keeps the daemon's user");
        return;
    }
    let user = nix::unistd::User::from_name("banger-vmm").unwrap().unwrap();
    assert_eq!(field("Uid:"), vec![user.uid.to_string(); 4], "{status}");
    assert_eq!(field("Seccomp:"), ["2"], "{status}");
    if banger_vmm::jail::Cgroups::detect().is_some() {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(cgroups.contains(&format!("/banger/{id}")), "{cgroups}");
    }
}
