//! Boots a real guest the way banger's Debian kernels do: the host's cloud
//! kernel under QEMU microvm, an initramfs built by `banger_disk::initramfs`
//! around the static agent (`BANGER_AGENT_STATIC`, made by
//! `scripts/build-agent.sh`), and a busybox root disk without an init, so
//! the agent switches to the root and stays PID 1. The test then talks to
//! it over the virtio-serial port. Skips loudly when anything is missing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_agent_proto::client::AgentClient;
use banger_disk::initramfs::{self, KernelModules};
use banger_proto::agent::ExecRequest;
use banger_vmm::qemu::{Accel, Qemu, QemuConfig, AGENT_SOCKET_FILE};
use banger_vmm::{
    DriveSpec, ExitStatusInfo, LaunchSpec, NetworkInterfaceSpec, Vmm, CONSOLE_LOG_FILE,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(120);
const APPLETS: &[&str] = &["sh", "cat", "uname", "ip", "ls", "hostname", "mount"];
const GUEST_MAC: &str = "06:00:ac:1e:00:05";
const GUEST_NETWORK: &str =
    "banger.net=ip=172.30.0.5/24,gw=172.30.0.1,dns=172.30.0.1,mac=06:00:ac:1e:00:05,domain=banger";

struct Host {
    agent: PathBuf,
    kernel: PathBuf,
    release: String,
    busybox: PathBuf,
}

fn require_host(test: &str) -> Option<Host> {
    let skip = |reason: &str| {
        eprintln!("SKIPPED {test}: {reason}");
        None
    };
    let Some(agent) = std::env::var_os("BANGER_AGENT_STATIC").map(PathBuf::from) else {
        return skip("BANGER_AGENT_STATIC is not set (scripts/build-agent.sh prints the path)");
    };
    if !agent.is_file() {
        return skip(&format!(
            "BANGER_AGENT_STATIC={} is not a file",
            agent.display()
        ));
    }
    let qemu_runs = Command::new("qemu-system-x86_64")
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
    let release = kernel
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    if !Path::new("/lib/modules")
        .join(&release)
        .join("modules.dep")
        .exists()
    {
        return skip(&format!("/lib/modules/{release}/modules.dep is missing"));
    }
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
    let mkfs = Command::new("mkfs.ext4").arg("-V").output();
    if !mkfs.is_ok_and(|output| output.status.success()) {
        return skip("mkfs.ext4 is not installed");
    }
    Some(Host {
        agent,
        kernel,
        release,
        busybox,
    })
}

/// A root disk with busybox, passwd and group, and no `/sbin/init`.
fn build_root_disk(host: &Host, directory: &Path) -> PathBuf {
    let tree = directory.join("tree");
    for sub in ["bin", "etc", "dev", "proc", "sys", "run", "tmp", "root"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    std::fs::copy(&host.busybox, tree.join("bin/busybox")).unwrap();
    std::fs::set_permissions(
        tree.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(
        tree.join("etc/os-release"),
        "NAME=\"banger test root\"\nID=bangertest\n",
    )
    .unwrap();
    let image = directory.join("rootfs.ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "banger-root", "-d"])
        .arg(&tree)
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.ext4 failed");
    image
}

/// A tap for the guest's NIC (root only), deleted on drop.
struct Tap(String);

impl Tap {
    fn create() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
            return None;
        }
        let name = format!("bgat{}", std::process::id() % 100_000);
        let created = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .is_ok_and(|status| status.success());
        created.then_some(Self(name))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .status();
    }
}

/// Kills QEMU if the test panics: it runs in its own session.
struct KillOnDrop(banger_vmm::VmmHandle);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.process().signal(nix::sys::signal::Signal::SIGKILL);
    }
}

async fn connect(socket: &Path, runtime_dir: &Path) -> AgentClient {
    let deadline = Instant::now() + BOOT_DEADLINE;
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(10), AgentClient::connect_unix(socket)).await;
        match attempt {
            Ok(Ok(client)) => return client,
            Ok(Err(error)) => eprintln!("agent not ready: {error}"),
            Err(_) => eprintln!("agent not ready: no hello within 10 s"),
        }
        if Instant::now() >= deadline {
            let console =
                std::fs::read_to_string(runtime_dir.join(CONSOLE_LOG_FILE)).unwrap_or_default();
            panic!("the agent never answered hello:\n{console}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run(client: &AgentClient, argv: &[&str]) -> String {
    let output = client
        .exec(ExecRequest {
            argv: argv.iter().map(|&word| word.to_owned()).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            pty: None,
        })
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.code == Some(0),
        "{argv:?} failed: {:?}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn agent_boots_a_busybox_root_from_its_initramfs() {
    let test = "agent_boots_a_busybox_root_from_its_initramfs";
    let Some(host) = require_host(test) else {
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let modules = KernelModules::open(&Path::new("/lib/modules").join(&host.release)).unwrap();
    let (archive, summary) = initramfs::build_agent_initramfs(
        &modules,
        initramfs::REQUIRED_MODULES,
        initramfs::OPTIONAL_MODULES,
        &host.agent,
    )
    .unwrap();
    let initrd = directory.path().join("initrd");
    archive
        .write_gzip(std::fs::File::create(&initrd).unwrap())
        .unwrap();
    eprintln!(
        "initramfs: {} bytes, {} modules: {}",
        std::fs::metadata(&initrd).unwrap().len(),
        summary.modules.len(),
        summary
            .modules
            .iter()
            .filter_map(|path| path.rsplit('/').next())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let root_disk = build_root_disk(&host, directory.path());

    let tap = Tap::create();
    if tap.is_none() {
        eprintln!("{test}: not root or no /dev/net/tun: the network part is skipped");
    }
    let runtime_dir = directory.path().join("run");
    std::fs::create_dir(&runtime_dir).unwrap();
    let mut kernel_cmdline = "console=ttyS0 panic=-1 banger.name=initramfs-guest".to_owned();
    if tap.is_some() {
        kernel_cmdline.push(' ');
        kernel_cmdline.push_str(GUEST_NETWORK);
    }
    let spec = LaunchSpec {
        vm_id: "vm-agent-initramfs".into(),
        vm_name: "agent-initramfs".into(),
        runtime_dir: runtime_dir.clone(),
        vcpus: 1,
        memory_mib: 256,
        kernel_path: host.kernel.clone(),
        initrd_path: Some(initrd),
        kernel_cmdline,
        drives: vec![DriveSpec {
            id: "rootfs".into(),
            path: root_disk,
            is_root: true,
            read_only: false,
        }],
        network_interfaces: tap
            .iter()
            .map(|tap| NetworkInterfaceSpec {
                id: "eth0".into(),
                tap: tap.0.clone(),
                mac: GUEST_MAC.into(),
            })
            .collect(),
        vsock: None,
    };
    let vmm = Qemu::new(QemuConfig {
        accel: Accel::Auto,
        ..QemuConfig::default()
    });
    let choice = vmm.accel_choice().await;
    eprintln!("accel: {} ({})", choice.accel, choice.reason);
    let handle = vmm.spawn(&spec).await.unwrap();
    let _guard = KillOnDrop(handle.clone());
    let started = Instant::now();
    vmm.boot(&handle).await.unwrap();
    let client = connect(&runtime_dir.join(AGENT_SOCKET_FILE), &runtime_dir).await;
    eprintln!("boot to hello: {:?}", started.elapsed());

    let hello = client.hello().clone();
    assert!(hello.is_init, "{hello:?}");
    assert_eq!(hello.kernel_release, host.release);
    assert_eq!(hello.hostname, "initramfs-guest");
    assert_eq!(hello.distro, "banger test root");

    assert_eq!(run(&client, &["uname", "-r"]).await.trim(), host.release);
    let mounts = run(&client, &["cat", "/proc/mounts"]).await;
    let root = mounts
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some("/"))
        .unwrap_or_else(|| panic!("no / in /proc/mounts:\n{mounts}"));
    let fields: Vec<&str> = root.split_whitespace().collect();
    assert_eq!(&fields[..3], ["/dev/vda", "/", "ext4"], "{mounts}");
    assert!(fields[3].starts_with("rw"), "{mounts}");
    for target in ["/proc", "/sys", "/dev", "/run"] {
        assert!(
            mounts
                .lines()
                .any(|line| line.split_whitespace().nth(1) == Some(target)),
            "{target} not mounted:\n{mounts}"
        );
    }
    // The initramfs is gone; the agent's copy lives on the root's /run.
    let listing = run(&client, &["ls", "/", "/run/banger"]).await;
    assert!(!listing.contains("newroot"), "{listing}");
    assert!(listing.contains("agent"), "{listing}");

    if tap.is_some() {
        let addresses = run(&client, &["ip", "-4", "addr", "show"]).await;
        assert!(addresses.contains("inet 172.30.0.5/24"), "{addresses}");
        let routes = run(&client, &["ip", "route"]).await;
        assert!(routes.contains("default via 172.30.0.1"), "{routes}");
        let mac = run(&client, &["cat", "/sys/class/net/eth0/address"]).await;
        assert_eq!(mac.trim(), GUEST_MAC);
        let resolv = run(&client, &["cat", "/etc/resolv.conf"]).await;
        assert!(
            resolv.contains("search banger\nnameserver 172.30.0.1\n"),
            "{resolv}"
        );
    }

    client.shutdown().await.unwrap();
    let status = tokio::time::timeout(BOOT_DEADLINE, handle.wait_exit())
        .await
        .expect("QEMU exits when the guest powers off");
    assert_eq!(status, ExitStatusInfo::Exited { code: 0 });
    vmm.release(&runtime_dir);
    let console = std::fs::read_to_string(runtime_dir.join(CONSOLE_LOG_FILE)).unwrap();
    for line in console.lines().filter(|line| line.contains("banger_agent")) {
        eprintln!("console: {line}");
    }
    assert!(console.contains("switched root"), "{console}");
}
