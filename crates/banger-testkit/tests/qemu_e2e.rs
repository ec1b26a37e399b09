//! banger end to end with real guests: QEMU (TCG where KVM cannot boot a
//! normal guest), the host's Debian cloud kernel with banger's generated
//! initramfs and the static agent, the golden image, and the daemon's
//! networking, all inside network namespaces the test makes (one for the
//! daemon and its guests, one standing for the outside world with an HTTP
//! server). Driven only through `bangerd` and the `banger` CLI.
//!
//! Needs root, `qemu-system-x86_64`, `/boot/vmlinuz-*-cloud-amd64`, the
//! static agent (`BANGER_AGENT_STATIC`, set by scripts/test.sh) and the
//! golden image (`BANGER_GOLDEN_IMAGE`, also set by scripts/test.sh); skips
//! with the reason otherwise. Prints each phase's time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

const NETNS: &str = "banger-e2e";
const WORLD: &str = "banger-e2e-world";
const WORLD_IP: &str = "192.0.2.254";

struct Inputs {
    agent: PathBuf,
    golden: PathBuf,
}

fn inputs() -> Result<Inputs, String> {
    let found = |name: &str| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|dir| dir.join(name).exists())
    };
    for tool in ["qemu-system-x86_64", "ssh", "python3", "nft"] {
        if !found(tool) {
            return Err(format!(
                "{tool} not found (scripts/setup-host.sh installs it)"
            ));
        }
    }
    let cloud = std::fs::read_dir("/boot")
        .map_err(|error| format!("cannot read /boot: {error}"))?
        .flatten()
        .any(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
        });
    if !cloud {
        return Err("no /boot/vmlinuz-*-cloud-amd64 (apt install linux-image-cloud-amd64)".into());
    }
    let agent = std::env::var_os("BANGER_AGENT_STATIC")
        .map(PathBuf::from)
        .filter(|path| path.exists())
        .ok_or("BANGER_AGENT_STATIC is not set to the static agent (scripts/test.sh builds it)")?;
    let golden = std::env::var_os("BANGER_GOLDEN_IMAGE")
        .map(PathBuf::from)
        .filter(|path| path.exists())
        .ok_or("BANGER_GOLDEN_IMAGE is not set to a built golden image (scripts/test.sh builds it with images/golden/build.sh --minimal)")?;
    Ok(Inputs { agent, golden })
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// The daemon's namespace (uplink `uplink0`, default route to the world)
/// and the world's (an HTTP server on 192.0.2.254:8080).
struct Namespaces {
    server: Child,
}

impl Namespaces {
    fn new(site: &Path) -> Self {
        for name in [NETNS, WORLD] {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", name]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", NETNS, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ]);
        ip(&["-n", NETNS, "link", "set", "uplink1", "netns", WORLD]);
        ip(&["-n", NETNS, "addr", "add", "192.0.2.1/24", "dev", "uplink0"]);
        ip(&["-n", NETNS, "link", "set", "uplink0", "up"]);
        ip(&[
            "-n",
            WORLD,
            "addr",
            "add",
            &format!("{WORLD_IP}/24"),
            "dev",
            "uplink1",
        ]);
        ip(&["-n", WORLD, "link", "set", "uplink1", "up"]);
        ip(&["-n", NETNS, "route", "add", "default", "via", WORLD_IP]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                WORLD,
                "python3",
                "-m",
                "http.server",
                "8080",
            ])
            .args(["--bind", WORLD_IP, "--directory"])
            .arg(site)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the world's HTTP server");
        Self { server }
    }

    fn run(namespace: &str, program: &str, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", namespace, program])
            .args(args)
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn banger_taps() -> Vec<String> {
        Self::run(NETNS, "ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with("bgtap"))
            .collect()
    }

    fn nft_rules() -> usize {
        Self::run(NETNS, "nft", &["-a", "list", "ruleset"])
            .lines()
            .filter(|line| {
                line.contains("# handle")
                    && !line.trim_start().starts_with("table")
                    && !line.trim_start().starts_with("chain")
            })
            .count()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for name in [NETNS, WORLD] {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn phase(name: &str, started: Instant) {
    eprintln!("phase {name}: {:.1} s", started.elapsed().as_secs_f64());
}

/// `banger vm run VM -- sh -c SCRIPT`: (exit code, stdout, stderr).
fn sh(daemon: &TestDaemon, vm: &str, script: &str) -> (i32, String, String) {
    let output = daemon.banger(&["vm", "run", vm, "--", "sh", "-c", script]);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Polls SCRIPT in the guest until it exits 0.
fn wait_in_guest(daemon: &TestDaemon, vm: &str, script: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        let (code, out, err) = sh(daemon, vm, script);
        if code == 0 {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "`{script}` in {vm} never succeeded: {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn create(daemon: &TestDaemon, args: &[&str]) -> Value {
    let started = Instant::now();
    let mut all = vec!["vm", "create"];
    all.extend_from_slice(args);
    daemon.banger_ok(&all);
    phase(&format!("create {}", args[0]), started);
    daemon.vm(args[0])
}

#[test]
#[allow(clippy::too_many_lines)]
fn real_guests_run_copy_ssh_resolve_reach_out_keep_work_and_leave_nothing() {
    const TEST: &str = "real_guests_run_copy_ssh_resolve_reach_out_keep_work_and_leave_nothing";
    if !require_root(TEST) {
        return;
    }
    let inputs = match inputs() {
        Ok(inputs) => inputs,
        Err(reason) => {
            eprintln!("SKIPPED {TEST}: {reason}");
            return;
        }
    };
    let whole = Instant::now();
    let mut daemon = TestDaemon::new(&[]);
    let site = daemon.dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "hello from the outside world\n").unwrap();
    let _namespaces = Namespaces::new(&site);
    std::fs::write(
        &daemon.config,
        format!(
            "[network]\nenabled = true\ndns_upstreams = [\"{WORLD_IP}:53\"]\n\n\
             [vmm]\nbackend = \"qemu\"\n\n\
             [vm]\nmemory_mib = 768\nvcpus = 1\nstop_grace_seconds = 30\nimage = \"golden\"\nkernel = \"debian\"\n\n\
             [agent]\npath = \"{}\"\nready_timeout_seconds = 240\n",
            inputs.agent.display()
        ),
    )
    .unwrap();
    daemon.netns = Some(NETNS.to_owned());
    daemon.start();
    let baseline_rules = Namespaces::nft_rules();

    let started = Instant::now();
    daemon.banger_ok(&["kernel", "import", "debian", "--from-debian"]);
    daemon.banger_ok(&["image", "import", "golden", inputs.golden.to_str().unwrap()]);
    phase("import kernel and image", started);
    // Stored as the ELF vmlinux (what Firecracker needs; QEMU boots it by PVH).
    let kernel = daemon.banger_json(&["kernel", "show", "debian"]);
    let head = std::fs::read(kernel["kernel_path"].as_str().unwrap()).unwrap();
    assert!(head.starts_with(b"\x7fELF"), "{kernel}");

    // Create: agent ready; the guest runs the host's kernel.
    let alpha = create(&daemon, &["alpha", "--work-disk", "256M"]);
    let release =
        String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let (code, out, _) = sh(&daemon, "alpha", "uname -r; uname -n");
    assert_eq!(code, 0);
    let kernel = std::fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64"))
        .max()
        .unwrap()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    assert_eq!(out, format!("{kernel}\nalpha\n"), "host runs {release}");

    // The guest's journal right after create: `vm logs --guest` waits for
    // journald (the agent answers long before it runs), and the agent's own
    // log reaches the journal once it does.
    let started = Instant::now();
    let output = daemon.banger(&["vm", "logs", "alpha", "--guest"]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("No journal files"), "{stderr}");
    assert!(!output.stdout.is_empty(), "{stderr}");
    loop {
        let journal = daemon.banger_ok(&["vm", "logs", "alpha", "--guest"]);
        if journal.contains(" banger-agent[") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no banger-agent lines in the guest's journal:\n{journal}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    phase("guest journal", started);

    // Exit codes and signals pass through; stdin flows.
    let started = Instant::now();
    assert_eq!(sh(&daemon, "alpha", "exit 3").0, 3);
    assert_eq!(sh(&daemon, "alpha", "kill -TERM $$").0, 143);
    let mut child = daemon
        .command()
        .args(["vm", "run", "alpha", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; 1 << 20]).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let local = Command::new("sh")
        .args(["-c", "head -c 1048576 /dev/zero | tr '\\0' x | sha256sum"])
        .output()
        .unwrap();
    assert_eq!(output.stdout, local.stdout);
    phase("run, exit codes, stdin", started);

    // vm cp both ways: a tree with a symlink and an executable.
    let started = Instant::now();
    let tree = daemon.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/data.txt"), "data\n").unwrap();
    std::fs::write(tree.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/data.txt", tree.join("link")).unwrap();
    daemon.banger_ok(&["vm", "cp", tree.to_str().unwrap(), "alpha:/root/"]);
    let (code, out, _) = sh(
        &daemon,
        "alpha",
        "/root/tree/run.sh && cat /root/tree/link && readlink /root/tree/link",
    );
    assert_eq!((code, out.as_str()), (0, "ran\ndata\nsub/data.txt\n"));
    sh(
        &daemon,
        "alpha",
        "echo made-in-guest > /root/tree/sub/new.txt",
    );
    let back = daemon.dir.path().join("back");
    daemon.banger_ok(&["vm", "cp", "alpha:/root/tree", back.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(back.join("sub/new.txt")).unwrap(),
        "made-in-guest\n"
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("sub/data.txt")
    );
    assert_eq!(
        std::fs::metadata(back.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    phase("cp both ways", started);

    // A second VM: names resolve through the daemon's DNS, the outside world
    // is reached through NAT.
    let beta = create(&daemon, &["beta"]);
    let started = Instant::now();
    let (code, out, err) = sh(&daemon, "alpha", "getent hosts alpha.banger beta.banger");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{} ", alpha["network"]["ip"].as_str().unwrap())),
        "{out}"
    );
    assert!(
        out.contains(&format!("{} ", beta["network"]["ip"].as_str().unwrap())),
        "{out}"
    );
    // bash's /dev/tcp: the minimal image has no curl.
    let output = daemon.banger(&[
        "vm",
        "run",
        "alpha",
        "--",
        "bash",
        "-c",
        &format!(
            "exec 3<>/dev/tcp/{WORLD_IP}/8080; printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
        ),
    ]);
    let (code, out, err) = (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello from the outside world"), "{out}");
    phase("dns and nat", started);

    // A published port: an HTTP server started by `vm run` in beta (the
    // minimal image has systemd's socket activation, not python), reached
    // on the host's 127.0.0.1 through the DNAT rule.
    let started = Instant::now();
    daemon.banger_ok(&["vm", "port", "beta", "add", "8090:8000"]);
    // systemd may still be starting under TCG: systemd-run needs its bus.
    wait_in_guest(
        &daemon,
        "beta",
        "systemctl show-environment >/dev/null",
        Duration::from_secs(120),
    );
    let (code, _, err) = sh(
        &daemon,
        "beta",
        "systemd-run --unit=banger-web -- systemd-socket-activate -l 8000 --inetd -a \
         /bin/sh -c 'printf \"HTTP/1.0 200 OK\\r\\n\\r\\nhello from the guest\\n\"'",
    );
    assert_eq!(code, 0, "{err}");
    let mut served = String::new();
    for _ in 0..60 {
        let output = Namespaces::run(
            NETNS,
            "bash",
            &[
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/8090 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3 || true",
            ],
        );
        if output.contains("hello from the guest") {
            served = output;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(served.contains("hello from the guest"), "{served:?}");
    assert_eq!(daemon.vm("beta")["network"]["ports"][0]["host_port"], 8090);
    phase("published port", started);

    // One snapshot of beta, two VMs restored from it: each has the disk and
    // memory of the moment of the snapshot, and its own name, address and
    // DNS name (its agent took the new VM's identity).
    let started = Instant::now();
    let (code, _, err) = sh(&daemon, "beta", "echo before > /root/before.txt && sync");
    assert_eq!(code, 0, "{err}");
    // The image makes its SSH host keys at first boot (slow under TCG):
    // the snapshot is to hold them.
    wait_in_guest(
        &daemon,
        "beta",
        "systemctl is-active -q banger-ssh-keygen.service && test -s /etc/ssh/ssh_host_ed25519_key.pub",
        Duration::from_secs(300),
    );
    daemon.banger_ok(&["vm", "snapshot", "beta", "beta-snap"]);
    phase("snapshot", started);
    let (code, _, err) = sh(&daemon, "beta", "echo after > /root/after.txt && sync");
    assert_eq!(code, 0, "{err}");
    let forks = [
        create(&daemon, &["fork-1", "--from-snapshot", "beta-snap"]),
        create(
            &daemon,
            &[
                "fork-2",
                "--from-snapshot",
                "beta-snap",
                "--regen-host-keys",
            ],
        ),
    ];
    let started = Instant::now();
    let beta_ip = beta["network"]["ip"].as_str().unwrap();
    let mut fork_ips = Vec::new();
    for fork in &forks {
        let name = fork["name"].as_str().unwrap();
        let ip = fork["network"]["ip"].as_str().unwrap();
        assert_ne!(ip, beta_ip);
        let (code, out, err) = sh(
            &daemon,
            name,
            "hostname; cat /root/before.txt; test -e /root/after.txt && echo after-is-here; \
             ip -4 -o addr show scope global",
        );
        assert_eq!(code, 0, "{err}");
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(name), "{out}");
        assert_eq!(lines.next(), Some("before"), "{out}");
        let addresses = lines.collect::<Vec<_>>().join("\n");
        assert!(addresses.contains(&format!(" {ip}/")), "{out}");
        assert!(!addresses.contains(&format!(" {beta_ip}/")), "{out}");
        assert!(!out.contains("after-is-here"), "{out}");
        fork_ips.push(ip.to_owned());
    }
    assert_ne!(fork_ips[0], fork_ips[1]);
    // fork-1 kept beta's SSH host key; fork-2 (--regen-host-keys) has its
    // own, and its sshd serves it.
    let host_key = |vm: &str| {
        let (code, out, err) = sh(
            &daemon,
            vm,
            "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub",
        );
        assert_eq!(code, 0, "{vm}: {err}");
        out.trim().to_owned()
    };
    let beta_key = host_key("beta");
    assert!(!beta_key.is_empty());
    assert_eq!(host_key("fork-1"), beta_key);
    let fork_key = host_key("fork-2");
    assert_ne!(fork_key, beta_key);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scanned = Namespaces::run(NETNS, "ssh-keyscan", &["-t", "ed25519", &fork_ips[1]]);
        if scanned.contains(&fork_key) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fork-2's sshd does not serve its new key: {scanned:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // Each name resolves to its own VM's address.
    let (code, out, err) = sh(&daemon, "alpha", "getent hosts fork-1.banger fork-2.banger");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{} ", fork_ips[0])), "{out}");
    assert!(out.contains(&format!("{} ", fork_ips[1])), "{out}");
    // The server beta ran before the snapshot answers in each copy, on the
    // copy's own address.
    for ip in &fork_ips {
        let output = Namespaces::run(
            NETNS,
            "bash",
            &[
                "-c",
                &format!("exec 3<>/dev/tcp/{ip}/8000 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3 || true"),
            ],
        );
        assert!(output.contains("hello from the guest"), "{ip}: {output:?}");
    }
    // Removing the snapshot under running copies is safe: each runs on its
    // own clone of the disk and on the memory its QEMU loaded.
    daemon.banger_ok(&["snapshot", "rm", "beta-snap"]);
    assert_eq!(sh(&daemon, "fork-1", "echo still-here").1, "still-here\n");
    for fork in ["fork-1", "fork-2"] {
        daemon.banger_ok(&["vm", "delete", "--force", fork]);
    }
    phase("forks", started);

    // OpenSSH with banger's key and pinned host keys (sshd may still be starting under TCG).
    let started = Instant::now();
    wait_in_guest(
        &daemon,
        "alpha",
        "systemctl is-active ssh",
        Duration::from_secs(180),
    );
    let home = daemon.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // The guests' subnet is only reachable inside the daemon's namespace.
    let output = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .arg(banger_testkit::test_daemon::binary("banger"))
        .arg("--socket")
        .arg(&daemon.socket)
        .env("HOME", &home)
        .args(["vm", "ssh", "alpha", "--", "echo", "over-ssh"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "over-ssh\n");
    phase("ssh", started);

    // Work disk: survives stop/start, and delete --keep-work-disk + reattach.
    let started = Instant::now();
    sh(&daemon, "alpha", "echo kept > /root/work.txt && sync");
    let (_, root_bytes, _) = sh(&daemon, "alpha", "blockdev --getsize64 /dev/vda");
    let root_mib = root_bytes.trim().parse::<u64>().expect("root disk size") >> 20;
    let (_, root_fs_before, _) = sh(&daemon, "alpha", "df --output=size -k / | tail -n 1");
    daemon.banger_ok(&["vm", "stop", "alpha"]);
    phase("stop", started);
    // Both disks grow while the VM is stopped: the host only lengthens the
    // files; the guest's agent grows the file systems online at boot.
    daemon.banger_ok(&["disk", "resize", "alpha-work", "512M"]);
    let grown_root = format!("{}M", root_mib + 512);
    daemon.banger_ok(&["vm", "set", "alpha", "--disk-size", &grown_root]);
    let started = Instant::now();
    daemon.banger_ok(&["vm", "start", "alpha"]);
    phase("start", started);
    assert_eq!(sh(&daemon, "alpha", "cat /root/work.txt").1, "kept\n");
    let (_, work_fs, _) = sh(&daemon, "alpha", "df --output=size -k /root | tail -n 1");
    let work_fs_kib: u64 = work_fs.trim().parse().expect("df size");
    assert!(
        work_fs_kib > 400 * 1024,
        "the work disk's file system did not grow in the guest: {work_fs_kib} KiB"
    );
    let (_, root_fs_after, _) = sh(&daemon, "alpha", "df --output=size -k / | tail -n 1");
    let before: u64 = root_fs_before.trim().parse().expect("df size");
    let after: u64 = root_fs_after.trim().parse().expect("df size");
    assert!(
        after >= before + 400 * 1024,
        "the root file system did not grow in the guest: {before} KiB -> {after} KiB"
    );
    let started = Instant::now();
    daemon.banger_ok(&["vm", "restart", "alpha"]);
    phase("restart", started);
    assert_eq!(sh(&daemon, "alpha", "cat /root/work.txt").1, "kept\n");
    daemon.banger_ok(&["vm", "delete", "--force", "--keep-work-disk", "alpha"]);
    create(&daemon, &["gamma", "--work-disk", "alpha-work"]);
    assert_eq!(sh(&daemon, "gamma", "cat /root/work.txt").1, "kept\n");

    // The daemon dies with guests running; the next one adopts them and
    // reaches their agents again.
    let started = Instant::now();
    daemon.kill9();
    daemon.start();
    assert_eq!(daemon.vm("gamma")["state"], "running");
    assert_eq!(sh(&daemon, "gamma", "echo still-here").1, "still-here\n");
    assert_eq!(sh(&daemon, "beta", "echo still-here").1, "still-here\n");
    phase("daemon kill -9 and adoption", started);

    // The VMM dies behind banger's back: crashed.
    let pid = daemon.vm("beta")["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    daemon.wait_for_state("beta", "crashed", Duration::from_secs(10));

    // Delete everything: no tap, lease, nft rule, clone, disk, process or
    // socket left (gamma's work disk goes with it without --keep-work-disk).
    for vm in ["beta", "gamma"] {
        daemon.banger_ok(&["vm", "delete", "--force", vm]);
    }
    assert!(daemon
        .banger_json(&["disk", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(
        Namespaces::banger_taps().is_empty(),
        "{:?}",
        Namespaces::banger_taps()
    );
    assert_eq!(Namespaces::nft_rules(), baseline_rules);
    let status = daemon.banger_json(&["daemon", "status"]);
    assert_eq!(status["network"]["leases_used"], 0, "{status}");
    assert!(daemon.vmm_pids().is_empty());
    daemon.assert_no_leaks();
    phase("whole suite", whole);
}
