//! The real Firecracker under the real jailer, launched the way banger
//! launches it: it must answer on its API socket inside the chroot, as an
//! unprivileged user, in its own PID namespace and cgroups, and accept
//! banger's whole configuration, its tap included. A guest cannot boot on hosts whose KVM
//! runs no ordinary guest (such as the machines this is developed on), so
//! `InstanceStart` is sent and either outcome accepted; the test then stops
//! the VM (killing it when the guest does not react) and checks that the
//! jail and the cgroups are gone.
//!
//! The binaries: `$BANGER_FIRECRACKER_DIR/{firecracker,jailer}`, else
//! `../shared/tools/firecracker/` beside the workspace. Skips with a printed
//! reason when they, root or `/dev/kvm` are missing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_vmm::firecracker::{Firecracker, FirecrackerConfig};
use banger_vmm::jail::{Cgroups, JailConfig};
use banger_vmm::{DriveSpec, LaunchSpec, NetworkInterfaceSpec, Vmm, VsockSpec};

/// A persistent tap in the host namespace, removed on drop.
struct Tap {
    name: String,
}

impl Tap {
    fn create(name: &str) -> Self {
        let status = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])
            .status()
            .expect("ip is needed (apt install iproute2)");
        assert!(status.success(), "could not create tap {name}");
        Self {
            name: name.to_owned(),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

const NOBODY: u32 = 65534;

fn tools(test: &str) -> Option<PathBuf> {
    let skip = |reason: String| {
        eprintln!("SKIPPED {test}: {reason}");
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root (the jailer does)".to_owned());
    }
    if !Path::new("/dev/kvm").exists() {
        return skip("no /dev/kvm".to_owned());
    }
    let dir = std::env::var_os("BANGER_FIRECRACKER_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/firecracker"),
        PathBuf::from,
    );
    if !dir.join("firecracker").exists() || !dir.join("jailer").exists() {
        return skip(format!(
            "no firecracker and jailer in {} (set BANGER_FIRECRACKER_DIR)",
            dir.display()
        ));
    }
    Some(dir)
}

fn uid_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Uid:").map(str::to_owned))
        .unwrap()
        .split_whitespace()
        .map(|id| id.parse().unwrap())
        .collect()
}

#[tokio::test]
async fn the_real_jailer_runs_firecracker_as_banger_launches_it() {
    let Some(tools) = tools("the_real_jailer_runs_firecracker_as_banger_launches_it") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let chroot_base = dir.path().join("jail");
    let runtime_dir = dir.path().join("vms").join("0123456789abcdef");
    std::fs::create_dir_all(&chroot_base).unwrap();
    std::fs::create_dir_all(&runtime_dir).unwrap();
    // A kernel Firecracker opens but never runs here, and a root disk.
    let kernel = dir.path().join("vmlinux");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(4096, 0);
    std::fs::write(&kernel, elf).unwrap();
    let rootfs = runtime_dir.join("rootfs.ext4");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    // A root-owned persistent tap, as banger's network makes them: the
    // backend gives it to the VMM's user.
    let tap = Tap::create(&format!("bgjt{}", std::process::id() % 100_000));
    let cgroups = Cgroups::detect();
    let vmm = Firecracker::new(FirecrackerConfig {
        binary: tools.join("firecracker"),
        startup_timeout: Duration::from_secs(10),
        jail: Some(JailConfig {
            jailer: tools.join("jailer"),
            chroot_base: chroot_base.clone(),
            uid: NOBODY,
            gid: NOBODY,
            cgroups: cgroups.clone(),
        }),
        ..FirecrackerConfig::default()
    })
    .unwrap();
    let (_, vsock) = vmm.agent_endpoint(&runtime_dir);
    let vsock: VsockSpec = vsock.unwrap();
    assert_eq!(vsock.uds_path, runtime_dir.join("jail/vsock.sock"));
    let spec = LaunchSpec {
        vm_id: "0123456789abcdef".into(),
        vm_name: "jailed".into(),
        runtime_dir: runtime_dir.clone(),
        vcpus: 1,
        memory_mib: 128,
        kernel_path: kernel.clone(),
        initrd_path: None,
        kernel_cmdline: "console=ttyS0 reboot=k panic=1".into(),
        drives: vec![DriveSpec {
            id: "rootfs".into(),
            path: rootfs.clone(),
            is_root: true,
            read_only: false,
        }],
        network_interfaces: vec![NetworkInterfaceSpec {
            id: "eth0".into(),
            tap: tap.name.clone(),
            mac: "06:00:0a:c8:00:02".into(),
        }],
        vsock: Some(vsock),
    };

    // Spawn = jailer, API socket in the chroot, every configuration call
    // (logger, metrics, machine-config, boot-source, drive, network
    // interface on the tap, vsock) accepted.
    let handle = match vmm.spawn(&spec).await {
        Ok(handle) => handle,
        Err(error) => panic!(
            "{}\nconsole:\n{}",
            banger_proto::error_chain(&error),
            std::fs::read_to_string(runtime_dir.join("console.log")).unwrap_or_default()
        ),
    };
    let pid = handle.pid();
    let root = chroot_base
        .join("firecracker")
        .join("0123456789abcdef")
        .join("root");
    // The layout fake-jailer copies.
    assert_eq!(
        handle.api_socket(),
        runtime_dir.join("jail/firecracker.sock")
    );
    assert_eq!(std::fs::read_link(runtime_dir.join("jail")).unwrap(), root);
    assert!(root.join("firecracker.sock").exists());
    assert!(
        root.join("vsock.sock").exists(),
        "vsock socket inside the chroot"
    );
    assert!(root.join("dev/kvm").exists() && root.join("dev/net/tun").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("firecracker.pid")).unwrap(),
        pid.to_string()
    );
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), NOBODY);
    assert_eq!(
        std::fs::metadata(root.join("drive-rootfs")).unwrap().ino(),
        std::fs::metadata(&rootfs).unwrap().ino()
    );
    // The tap was given to the VMM's user, which opened it.
    assert!(banger_vmm::jail::tap_owned_by(&tap.name, NOBODY));
    // Unprivileged, in its own PID namespace (init there).
    assert_eq!(uid_of(pid), vec![NOBODY; 4]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ns_pid = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .unwrap();
    assert_eq!(ns_pid.split_whitespace().last(), Some("1"), "{ns_pid}");
    // The jailer exited; its VMM is now ours (we are a child subreaper, as
    // bangerd is), so its exit status is known.
    let parent = status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(parent, std::process::id().to_string());
    // Its command line is what fake-jailer gives fake-firecracker, so
    // adoption after a daemon restart recognises it.
    let argv = banger_vmm::process::read_command_line(pid)
        .unwrap()
        .unwrap();
    eprintln!("jailed firecracker argv: {argv:?}");
    assert_eq!(argv[0], "/firecracker");
    let adopted = vmm
        .adopt("0123456789abcdef", &runtime_dir, pid)
        .await
        .unwrap()
        .expect("the jailed firecracker is adopted");
    assert_eq!(adopted.api_socket(), handle.api_socket());
    // Firecracker's log and metrics are the runtime dir's files, linked in
    // and given to the VMM's user so it can write them.
    for file in ["firecracker.log", "firecracker.metrics"] {
        let inside = std::fs::metadata(root.join(file)).unwrap();
        assert_eq!(
            inside.ino(),
            std::fs::metadata(runtime_dir.join(file)).unwrap().ino()
        );
        assert_eq!(inside.uid(), NOBODY);
    }
    if let Some(cgroups) = &cgroups {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(own.contains("/banger/0123456789abcdef"), "{own}");
        for cgroup in cgroups.vm_cgroups("0123456789abcdef") {
            assert!(cgroup.exists(), "{}", cgroup.display());
        }
    }

    // No guest runs on this KVM: InstanceStart may fail; either is fine.
    match vmm.boot(&handle).await {
        Ok(()) => eprintln!("InstanceStart accepted"),
        Err(error) => eprintln!(
            "InstanceStart failed (expected where KVM runs no guest): {}",
            banger_proto::error_chain(&error)
        ),
    }
    let outcome = vmm.stop(&handle, Duration::from_secs(1)).await.unwrap();
    eprintln!("stopped: {outcome:?}");
    assert!(handle.has_exited());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "firecracker left running"
    );
    assert!(!root.parent().unwrap().exists(), "jail left behind");
    assert!(runtime_dir.join("jail").symlink_metadata().is_err());
    if let Some(cgroups) = &cgroups {
        for cgroup in cgroups.vm_cgroups("0123456789abcdef") {
            assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
        }
    }
}
