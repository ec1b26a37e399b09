//! The Firecracker backend's pause, snapshot and restore, driven against
//! `fake-firecracker` under `fake-jailer` (restores need the jail: the
//! snapshot names drives by their chroot paths) and checked against the
//! fake's request log. Skips with a printed reason when not root (the
//! jailer needs it).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_vmm::firecracker::{Firecracker, FirecrackerConfig};
use banger_vmm::jail::JailConfig;
use banger_vmm::{DriveSpec, LaunchSpec, NetworkInterfaceSpec, SnapshotInfo, Vmm, VmmError};
use serde_json::{json, Value};

const NOBODY: u32 = 65534;

struct Setup {
    dir: tempfile::TempDir,
    vmm: Firecracker,
    log: PathBuf,
}

fn setup(test: &str) -> Option<Setup> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: needs root (the jailer does)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // One log for the whole binary (the fakes inherit the environment),
    // writable by the VMM user; each test's VMs have their own ids.
    static LOG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let log = LOG
        .get_or_init(|| {
            let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
                "banger-firecracker-snapshot-{}.jsonl",
                std::process::id()
            ));
            std::fs::write(&log, b"").unwrap();
            std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
            std::env::set_var("FAKE_FIRECRACKER_REQUEST_LOG", &log);
            log
        })
        .clone();
    std::fs::create_dir_all(dir.path().join("jail")).unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
    let vmm = Firecracker::new(FirecrackerConfig {
        binary: env!("CARGO_BIN_EXE_fake-firecracker").into(),
        startup_timeout: Duration::from_secs(10),
        jail: Some(JailConfig {
            jailer: env!("CARGO_BIN_EXE_fake-jailer").into(),
            chroot_base: dir.path().join("jail"),
            uid: NOBODY,
            gid: NOBODY,
            cgroups: None,
        }),
        ..FirecrackerConfig::default()
    })
    .unwrap();
    Some(Setup { dir, vmm, log })
}

impl Setup {
    fn spec(&self, vm_id: &str, tap: &str) -> LaunchSpec {
        let runtime_dir = self.dir.path().join("vms").join(vm_id);
        std::fs::create_dir_all(&runtime_dir).unwrap();
        let rootfs = runtime_dir.join("rootfs.ext4");
        std::fs::write(&rootfs, vm_id).unwrap();
        let (_, vsock) = self.vmm.agent_endpoint(&runtime_dir);
        LaunchSpec {
            vm_id: vm_id.into(),
            vm_name: vm_id.into(),
            runtime_dir,
            vcpus: 1,
            memory_mib: 128,
            kernel_path: self.dir.path().join("vmlinux"),
            initrd_path: None,
            kernel_cmdline: "console=ttyS0".into(),
            drives: vec![DriveSpec {
                id: "rootfs".into(),
                path: rootfs,
                is_root: true,
                read_only: false,
            }],
            network_interfaces: vec![NetworkInterfaceSpec {
                id: "eth0".into(),
                tap: tap.into(),
                mac: "06:00:0a:c8:00:02".into(),
            }],
            vsock,
        }
    }

    /// `(method path, body)` of every request to VM `id`, in order.
    fn requests(&self, id: &str) -> Vec<(String, Value)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|entry| entry["id"] == id)
            .map(|entry| {
                (
                    format!(
                        "{} {}",
                        entry["method"].as_str().unwrap(),
                        entry["path"].as_str().unwrap()
                    ),
                    entry["body"].clone(),
                )
            })
            .collect()
    }

    fn jail_of(&self, vm_id: &str) -> PathBuf {
        self.dir.path().join("jail/fake-firecracker").join(vm_id)
    }
}

fn snapshot_dir(setup: &Setup) -> PathBuf {
    let dir = setup.dir.path().join("snapshots/one");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn pause_snapshot_resume_then_restore_with_the_new_vms_devices() {
    let Some(setup) = setup("pause_snapshot_resume_then_restore_with_the_new_vms_devices") else {
        return;
    };
    let source_spec = setup.spec("source-vm", "bgsrc0");
    let source = setup.vmm.spawn(&source_spec).await.unwrap();
    setup.vmm.boot(&source).await.unwrap();
    let dir = snapshot_dir(&setup);

    // Snapshot of a running VM: Firecracker refuses, nothing is left.
    let error = setup.vmm.snapshot(&source, &dir).await.unwrap_err();
    assert!(
        banger_proto::error_chain(&error).contains("pause the microVM first"),
        "{}",
        banger_proto::error_chain(&error)
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(setup.jail_of("source-vm").join("root"))
            .unwrap()
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name == "vmstate" || name == "memory"
            })
            .count(),
        0
    );

    setup.vmm.pause(&source).await.unwrap();
    let info = setup.vmm.snapshot(&source, &dir).await.unwrap();
    setup.vmm.resume(&source).await.unwrap();
    assert_eq!(
        info,
        SnapshotInfo::in_dir(banger_vmm::Backend::Firecracker, "1.17.0", &dir)
    );
    for path in [&info.state_path, &info.memory_path] {
        let metadata = std::fs::metadata(path).unwrap();
        assert_eq!(metadata.mode() & 0o777, 0o600, "{}", path.display());
        assert_eq!((metadata.uid(), metadata.gid()), (0, 0));
    }
    let source_requests = setup.requests("source-vm");
    let tail: Vec<_> = source_requests
        .iter()
        .rev()
        .take(4)
        .rev()
        .cloned()
        .collect();
    assert_eq!(
        tail,
        vec![
            ("PATCH /vm".to_owned(), json!({"state": "Paused"})),
            ("GET /".to_owned(), Value::Null),
            (
                "PUT /snapshot/create".to_owned(),
                json!({"snapshot_path": "/vmstate", "mem_file_path": "/memory", "snapshot_type": "Full"})
            ),
            ("PATCH /vm".to_owned(), json!({"state": "Resumed"})),
        ]
    );

    // Restore into a new VM: its own jail, disks, tap and vsock.
    let new_spec = setup.spec("new-vm", "bgnew0");
    let restored = setup.vmm.restore(&new_spec, &info).await.unwrap();
    let requests = setup.requests("new-vm");
    let names: Vec<_> = requests.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["PUT /logger", "PUT /metrics", "GET /", "PUT /snapshot/load"]
    );
    assert_eq!(
        requests[3].1,
        json!({
            "snapshot_path": "/vmstate",
            "mem_backend": {"backend_type": "File", "backend_path": "/memory"},
            "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "bgnew0"}],
            "vsock_override": {"uds_path": "/vsock.sock"},
        })
    );
    // The snapshot's files are linked in read-only for the VMM's group.
    let linked = setup.jail_of("new-vm").join("root/memory");
    let metadata = std::fs::metadata(&linked).unwrap();
    assert_eq!(
        metadata.ino(),
        std::fs::metadata(&info.memory_path).unwrap().ino()
    );
    assert_eq!(
        (metadata.uid(), metadata.gid(), metadata.mode() & 0o777),
        (0, NOBODY, 0o640)
    );
    // The restored VMM runs the guest.
    let state = setup
        .vmm
        .client(&restored)
        .describe_instance()
        .await
        .unwrap()
        .state;
    assert_eq!(format!("{state:?}"), "Running");

    setup.vmm.kill(&restored).await.unwrap();
    setup.vmm.kill(&source).await.unwrap();
    assert!(!setup.jail_of("new-vm").exists());
    // The snapshot outlives both.
    assert!(info.memory_path.exists() && info.state_path.exists());
}

#[tokio::test]
async fn failed_restores_leave_nothing_running() {
    let Some(setup) = setup("failed_restores_leave_nothing_running") else {
        return;
    };
    let source = setup
        .vmm
        .spawn(&setup.spec("src-b", "bgsrcb"))
        .await
        .unwrap();
    setup.vmm.boot(&source).await.unwrap();
    setup.vmm.pause(&source).await.unwrap();
    let dir = snapshot_dir(&setup);
    let info = setup.vmm.snapshot(&source, &dir).await.unwrap();
    setup.vmm.kill(&source).await.unwrap();

    // Another Firecracker version: refused before loading.
    let other = SnapshotInfo {
        backend_version: "1.16.0".into(),
        ..info.clone()
    };
    let error = setup
        .vmm
        .restore(&setup.spec("new-b", "bgnewb"), &other)
        .await
        .unwrap_err();
    assert!(
        matches!(error, VmmError::SnapshotVersion { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "Snapshot was taken with firecracker 1.16.0; this host runs firecracker 1.17.0"
    );
    assert!(!setup
        .requests("new-b")
        .iter()
        .any(|(name, _)| name == "PUT /snapshot/load"));
    assert!(!setup.jail_of("new-b").exists(), "jail removed");

    // The memory file gone: the load fails, the VMM is killed.
    std::fs::remove_file(&info.memory_path).unwrap();
    let error = setup
        .vmm
        .restore(&setup.spec("new-c", "bgnewc"), &info)
        .await
        .unwrap_err();
    assert!(
        !setup.jail_of("new-c").exists(),
        "jail removed after {error:?}"
    );
    let gone = setup.dir.path().join("vms/new-c/jail");
    assert!(!gone.exists(), "jail link removed");
    assert!(
        Path::new(&info.state_path).exists(),
        "the snapshot is not touched"
    );
}
