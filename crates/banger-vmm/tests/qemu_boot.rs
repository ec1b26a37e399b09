//! Boots real guests with the QEMU backend: the host's Debian kernel under
//! TCG (or KVM where usable) with an initramfs built here around a static
//! busybox. Skips loudly when QEMU, a kernel or busybox is missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_disk::initramfs::KernelModules;
use banger_vmm::qemu::{Accel, Qemu, QemuConfig, AGENT_SOCKET_FILE};
use banger_vmm::{DriveSpec, ExitStatusInfo, LaunchSpec, StopOutcome, Vmm, CONSOLE_LOG_FILE};
use tokio::io::AsyncBufReadExt;

const BOOT_DEADLINE: Duration = Duration::from_secs(90);
/// What the guest needs, built in or as modules; the load order (and the
/// dependencies, such as `virtio_ring`) come from the kernel's `modules.dep`
/// through banger's own resolver, as in the product's initramfs.
const REQUIRED_MODULES: [&str; 3] = ["virtio_mmio", "virtio_blk", "virtio_console"];
/// The ACPI power button and its input events, for the graceful-stop test.
const POWER_BUTTON_MODULES: [&str; 2] = ["button", "evdev"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in /modules/*; do insmod "$module"; done
for i in $(seq 50); do [ -e /sys/block/vdb ] && break; sleep 0.1; done
echo "BANGER-MARKER uptime=$(cut -d' ' -f1 /proc/uptime) vda=$(cat /sys/block/vda/serial 2>/dev/null) vdb=$(cat /sys/block/vdb/serial 2>/dev/null)"
for port in /sys/class/virtio-ports/*; do
  # In the background: a write blocks until the host end is connected.
  [ "$(cat "$port/name" 2>/dev/null)" = banger.agent ] && (echo hello-from-guest > "/dev/${port##*/}" &)
done
case " $(cat /proc/cmdline) " in
*" banger.test=poweroff "*) poweroff -f ;;
esac
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho BANGER-POWER-BUTTON\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -f -d -c /etc/acpi &
# A press before acpid listens would be lost.
for i in $(seq 100); do ls -l /proc/$!/fd 2>/dev/null | grep -q /dev/input/event && break; sleep 0.1; done
echo BANGER-WAITING
while true; do sleep 1; done
"#;

struct Host {
    kernel: PathBuf,
    busybox: PathBuf,
    /// Module files in load order (dependencies first).
    modules: Vec<PathBuf>,
    /// Whether the guest has the ACPI button and evdev (built in or loaded).
    has_power_button: bool,
}

/// The host's kernel, busybox and QEMU, or `None` after printing why the
/// test is skipped.
fn require_qemu(test: &str) -> Option<Host> {
    let skip = |reason: &str| {
        eprintln!("SKIPPED {test}: {reason}");
        None
    };
    let qemu_runs = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !qemu_runs {
        return skip("qemu-system-x86_64 is not installed");
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64"))
        })
        .collect();
    kernels.sort();
    let Some(kernel) = kernels.pop() else {
        return skip("no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)");
    };
    if std::fs::File::open(&kernel).is_err() {
        return skip("the kernel in /boot is not readable");
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
    else {
        return skip("busybox is not installed (apt-get install busybox-static)");
    };
    let version = kernel
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("vmlinuz-"))
        .unwrap_or_default();
    let modules_directory = Path::new("/lib/modules").join(version);
    let kernel_modules = match KernelModules::open(&modules_directory) {
        Ok(kernel_modules) => kernel_modules,
        Err(error) => return skip(&format!("the kernel's modules cannot be read: {error}")),
    };
    let resolved = kernel_modules
        .resolve(&REQUIRED_MODULES, &POWER_BUTTON_MODULES)
        .unwrap_or_else(|error| panic!("{}: {error}", modules_directory.display()));
    let has_power_button = POWER_BUTTON_MODULES.iter().all(|name| {
        kernel_modules.is_builtin(name) || resolved.iter().any(|module| module.name == *name)
    });
    let modules = resolved
        .iter()
        .map(|module| modules_directory.join(&module.relative_path))
        .collect();
    Some(Host {
        kernel,
        busybox,
        modules,
        has_power_button,
    })
}

/// An uncompressed `newc` cpio archive, which the kernel takes as an
/// initramfs as it is.
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            inode: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.inode += 1;
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

fn build_initramfs(host: &Host, path: &Path) {
    let mut cpio = Cpio::new();
    for directory in ["bin", "dev", "proc", "sys", "etc", "modules"] {
        cpio.entry(directory, 0o040_755, &[]);
    }
    cpio.entry("init", 0o100_755, INIT.as_bytes());
    cpio.entry(
        "bin/busybox",
        0o100_755,
        &std::fs::read(&host.busybox).unwrap(),
    );
    for (index, module) in host.modules.iter().enumerate() {
        let name = module.file_name().unwrap().to_str().unwrap();
        // Zero-padded: the init script loads them in glob (name) order.
        cpio.entry(
            &format!("modules/{index:03}-{name}"),
            0o100_644,
            &std::fs::read(module).unwrap(),
        );
    }
    std::fs::write(path, cpio.finish()).unwrap();
}

struct Guest {
    _dir: tempfile::TempDir,
    runtime_dir: PathBuf,
    spec: LaunchSpec,
}

fn guest(host: &Host, vm_id: &str, mode: &str) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let runtime_dir = dir.path().join("run");
    std::fs::create_dir(&runtime_dir).unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    build_initramfs(host, &initrd);
    let mut drives = Vec::new();
    for (id, is_root) in [("seed", false), ("rootfs", true)] {
        let path = dir.path().join(format!("{id}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1024 * 1024)
            .unwrap();
        drives.push(DriveSpec {
            id: id.into(),
            path,
            is_root,
            read_only: !is_root,
        });
    }
    let spec = LaunchSpec {
        vm_id: vm_id.into(),
        vm_name: format!("{vm_id}-name"),
        runtime_dir: runtime_dir.clone(),
        vcpus: 1,
        memory_mib: 256,
        kernel_path: host.kernel.clone(),
        initrd_path: Some(initrd),
        kernel_cmdline: format!("console=ttyS0 panic=-1 banger.test={mode}"),
        drives,
        network_interfaces: Vec::new(),
        vsock: None,
    };
    Guest {
        _dir: dir,
        runtime_dir,
        spec,
    }
}

/// Adds a writable 1 MiB drive `work` (a work disk's place) to the guest.
fn with_work_drive(guest: &mut Guest) {
    let path = guest.runtime_dir.with_file_name("work.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1024 * 1024)
        .unwrap();
    guest.spec.drives.push(DriveSpec {
        id: "work".into(),
        path,
        is_root: false,
        read_only: false,
    });
}

/// Kills the guest's QEMU if the test panics: it runs in its own session
/// and would outlive the test.
struct KillOnDrop(banger_vmm::VmmHandle);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.process().signal(nix::sys::signal::Signal::SIGKILL);
    }
}

fn backend() -> Qemu {
    Qemu::new(QemuConfig {
        accel: Accel::Auto,
        ..QemuConfig::default()
    })
}

/// Waits for a console line containing `marker` and returns it.
async fn wait_for_console(runtime_dir: &Path, marker: &str) -> String {
    let path = runtime_dir.join(CONSOLE_LOG_FILE);
    let deadline = Instant::now() + BOOT_DEADLINE;
    loop {
        let console = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(line) = console.lines().find(|line| line.contains(marker)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no {marker} on the console within {BOOT_DEADLINE:?}:\n{console}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn guest_boots_to_its_marker_and_powers_off() {
    let Some(host) = require_qemu("guest_boots_to_its_marker_and_powers_off") else {
        return;
    };
    let guest = guest(&host, "vm-qemu-boot", "poweroff");
    let vmm = backend();
    let choice = vmm.accel_choice().await;
    eprintln!("accel: {} ({})", choice.accel, choice.reason);

    let handle = vmm.spawn(&guest.spec).await.unwrap();
    let _guard = KillOnDrop(handle.clone());
    // The agent port's host end exists before the guest runs.
    let agent = tokio::net::UnixStream::connect(guest.runtime_dir.join(AGENT_SOCKET_FILE))
        .await
        .unwrap();
    let started = Instant::now();
    vmm.boot(&handle).await.unwrap();
    let marker = wait_for_console(&guest.runtime_dir, "BANGER-MARKER").await;
    let boot_time = started.elapsed();
    eprintln!("boot to marker: {boot_time:?} ({marker})");

    // Root drive first, whatever the spec's order; serials are ids.
    assert!(marker.contains("vda=rootfs vdb=seed"), "{marker}");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::BufReader::new(agent).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(line, "hello-from-guest\n");

    let status = tokio::time::timeout(BOOT_DEADLINE, handle.wait_exit())
        .await
        .expect("QEMU exits when the guest powers off");
    assert_eq!(status, ExitStatusInfo::Exited { code: 0 });
    vmm.release(&guest.runtime_dir);
    assert!(!guest.runtime_dir.join("qmp.sock").exists());
    assert!(!guest.runtime_dir.join(AGENT_SOCKET_FILE).exists());
}

#[tokio::test]
async fn stop_presses_the_power_button_of_a_running_guest() {
    let Some(host) = require_qemu("stop_presses_the_power_button_of_a_running_guest") else {
        return;
    };
    let guest = guest(&host, "vm-qemu-stop", "stay");
    let vmm = backend();
    let handle = vmm.spawn(&guest.spec).await.unwrap();
    let _guard = KillOnDrop(handle.clone());
    vmm.boot(&handle).await.unwrap();
    wait_for_console(&guest.runtime_dir, "BANGER-WAITING").await;

    let adopted = vmm
        .adopt(&guest.spec.vm_id, &guest.runtime_dir, handle.pid())
        .await
        .unwrap()
        .expect("the running QEMU is recognised");
    assert_eq!(adopted.pid(), handle.pid());

    let started = Instant::now();
    let outcome = vmm.stop(&adopted, Duration::from_secs(30)).await.unwrap();
    eprintln!("stop: {outcome:?} in {:?}", started.elapsed());
    let console = std::fs::read_to_string(guest.runtime_dir.join(CONSOLE_LOG_FILE)).unwrap();
    if host.has_power_button {
        assert!(outcome.was_graceful(), "{outcome:?}\n{console}");
        assert!(console.contains("BANGER-POWER-BUTTON"), "{console}");
    } else {
        // Without the ACPI button driver nothing hears the press.
        assert!(matches!(outcome, StopOutcome::Killed { .. }));
    }
    assert!(handle.has_exited());
    assert!(!guest.runtime_dir.join("qmp.sock").exists());
}

#[tokio::test]
async fn an_unopenable_drive_is_reported_in_qemus_words() {
    let Some(host) = require_qemu("an_unopenable_drive_is_reported_in_qemus_words") else {
        return;
    };
    let mut guest = guest(&host, "vm-qemu-bad-drive", "poweroff");
    guest.spec.drives[0].path = PathBuf::from("/nonexistent/seed.img");
    let vmm = backend();
    let error = vmm.spawn(&guest.spec).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with("The qemu process of VM vm-qemu-bad-drive-name exited during startup"),
        "{message}"
    );
    assert!(message.contains("/nonexistent/seed.img"), "{message}");
    assert!(!guest.runtime_dir.join("qmp.sock").exists());
    assert!(!guest.runtime_dir.join(AGENT_SOCKET_FILE).exists());
}

#[tokio::test]
async fn a_paused_guest_is_snapshotted_and_restored_into_a_new_qemu() {
    let Some(host) = require_qemu("a_paused_guest_is_snapshotted_and_restored_into_a_new_qemu")
    else {
        return;
    };
    let mut source = guest(&host, "vm-qemu-snap-src", "stay");
    // A writable second disk, as a work disk is: the copy needs its own.
    with_work_drive(&mut source);
    let vmm = backend();
    let handle = vmm.spawn(&source.spec).await.unwrap();
    let _guard = KillOnDrop(handle.clone());
    vmm.boot(&handle).await.unwrap();
    wait_for_console(&source.runtime_dir, "BANGER-WAITING").await;

    vmm.pause(&handle).await.unwrap();
    let snapshot_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let info = vmm.snapshot(&handle, snapshot_dir.path()).await.unwrap();
    eprintln!(
        "snapshot in {:?}: {} bytes",
        started.elapsed(),
        std::fs::metadata(&info.memory_path).unwrap().len()
    );
    assert_eq!(info.backend, banger_vmm::Backend::Qemu);
    assert!(
        info.backend_version.starts_with(char::is_numeric),
        "{info:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&info.memory_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The source runs on after its snapshot.
    vmm.resume(&handle).await.unwrap();
    vmm.kill(&handle).await.unwrap();

    // Another version is refused, and leaves nothing running.
    let mut copy = guest(&host, "vm-qemu-snap-copy", "stay");
    let other = banger_vmm::SnapshotInfo {
        backend_version: "1.0.0".into(),
        ..info.clone()
    };
    let error = vmm.restore(&copy.spec, &other).await.unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("Snapshot was taken with qemu 1.0.0; this host runs qemu "),
        "{error}"
    );
    assert!(!copy.runtime_dir.join("qmp.sock").exists());

    // The device state holds the work disk: a copy without one is refused.
    let error = vmm.restore(&copy.spec, &info).await.unwrap_err();
    eprintln!("restore without the work disk: {error}");
    assert!(!copy.runtime_dir.join("qmp.sock").exists());
    with_work_drive(&mut copy);

    // The copy runs the source's memory in its own QEMU, on its own disks.
    let started = Instant::now();
    let restored = vmm.restore(&copy.spec, &info).await.unwrap();
    let _guard = KillOnDrop(restored.clone());
    eprintln!("restore in {:?}", started.elapsed());
    let status = vmm.client(&restored).query_status().await.unwrap();
    assert!(status.running, "{status:?}");
    let console = std::fs::read_to_string(copy.runtime_dir.join(CONSOLE_LOG_FILE)).unwrap();
    assert!(
        !console.contains("BANGER-MARKER"),
        "no boot in the copy:\n{console}"
    );
    let outcome = vmm.stop(&restored, Duration::from_secs(30)).await.unwrap();
    if host.has_power_button {
        // The acpid of the source, restored, hears the copy's button.
        let console = std::fs::read_to_string(copy.runtime_dir.join(CONSOLE_LOG_FILE)).unwrap();
        assert!(outcome.was_graceful(), "{outcome:?}\n{console}");
        assert!(console.contains("BANGER-POWER-BUTTON"), "{console}");
    }
    assert!(restored.has_exited());
}
