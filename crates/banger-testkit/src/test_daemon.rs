//! A real `bangerd` in a temporary directory, driven through the real
//! `banger` CLI, with `fake-firecracker` as its Firecracker binary, jailed
//! by `fake-jailer` when the tests run as root (as the daemon's default).
//!
//! The binaries are taken from the cargo target dir the test runs from
//! (`cargo test --workspace` builds them all) or from `BANGER_BIN_DIR`.
//! Dropping a [`TestDaemon`] kills the daemon and every VMM process under
//! its state dir, so a failing test does not leak processes into the next.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Directory holding `bangerd`, `banger` and `fake-firecracker`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BANGER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("test executable dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of one of the workspace's binaries; panics with how to build it.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// Prints why a root-only test is skipped and returns false when not root.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root (CI runs as root)");
    false
}

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// Where fake-firecracker appends every API request it receives.
    pub request_log: PathBuf,
    /// Where bangerd's log goes.
    pub log: PathBuf,
    /// Run bangerd inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestDaemon {
    /// A daemon (not yet started) using fake-firecracker; `env` is passed to
    /// bangerd and thus to every fake-firecracker it spawns.
    pub fn new(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("banger-test-")
            .tempdir()
            .expect("temp dir");
        // Searchable by everyone, so tests that connect as another uid work.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let state_dir = dir.path().join("state");
        let socket = dir.path().join("bangerd.sock");
        let config = dir.path().join("config.toml");
        let request_log = dir.path().join("firecracker-requests.jsonl");
        let log = dir.path().join("bangerd.log");
        std::fs::write(
            &config,
            format!(
                "[network]\nenabled = false\n\n[vmm]\nbackend = \"firecracker\"\n\n[firecracker]\nbinary = \"{}\"\njailer = \"{}\"\njailed = {}\n\n[vm]\nstop_grace_seconds = 3\nmemory_mib = 256\nvcpus = 1\n\n[agent]\nwait = false\n",
                binary("fake-firecracker").display(),
                binary("fake-jailer").display(),
                nix::unistd::geteuid().is_root(),
            ),
        )
        .expect("write config");
        // A jailed fake-firecracker runs unprivileged and appends here.
        std::fs::write(&request_log, "").expect("create request log");
        std::fs::set_permissions(&request_log, std::fs::Permissions::from_mode(0o666))
            .expect("chmod request log");
        let mut all_env: Vec<(String, String)> = vec![(
            "FAKE_FIRECRACKER_REQUEST_LOG".to_owned(),
            request_log.display().to_string(),
        )];
        all_env.extend(
            env.iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned())),
        );
        Self {
            dir,
            state_dir,
            socket,
            config,
            request_log,
            log,
            netns: None,
            env: all_env,
            child: None,
        }
    }

    /// Gives every fake-firecracker VM a guest: a `banger-agent` in host test
    /// mode started at boot, reached through the VM's vsock socket, gone when
    /// the VM stops. Makes create/start wait for it (call before `start`).
    /// Returns the directory the agents read SSH host keys from.
    pub fn with_agent(&mut self) -> PathBuf {
        let ssh = self.dir.path().join("agent-ssh");
        std::fs::create_dir_all(&ssh).expect("create agent ssh dir");
        std::fs::write(
            ssh.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@guest\n",
        )
        .expect("write host key");
        self.set_env(
            "FAKE_FIRECRACKER_GUEST_AGENT_BIN",
            &binary("banger-agent").display().to_string(),
        );
        self.set_env(
            "FAKE_FIRECRACKER_GUEST_AGENT_SSH_DIR",
            &ssh.display().to_string(),
        );
        let config = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(
            &self.config,
            config.replace(
                "[agent]\nwait = false\n",
                "[agent]\nwait = true\nready_timeout_seconds = 10\n",
            ),
        )
        .expect("write config");
        ssh
    }

    /// Starts `new(env)` and waits until it serves.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let mut daemon = Self::new(env);
        daemon.start();
        daemon
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(existing, _)| existing != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn remove_env(&mut self, key: &str) {
        self.env.retain(|(existing, _)| existing != key);
    }

    /// Spawns bangerd and waits (up to 20 s) until its socket answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns])
                    .arg(binary("bangerd"));
                command
            }
            None => Command::new(binary("bangerd")),
        };
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env("BANGER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        // Its own process group, so that `kill9` can kill all of it, as a
        // service manager or a terminal's Ctrl-C would.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("spawn bangerd");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("poll bangerd") {
                panic!(
                    "bangerd exited at start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bangerd did not serve within 20 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGKILLs the daemon's whole process group (the daemon and whatever
    /// it runs in its group at that moment); VMs and their guests, in
    /// sessions of their own, keep running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERMs the daemon and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        child.wait().expect("wait bangerd")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `banger` command pointed at this daemon.
    pub fn command(&self) -> Command {
        let mut command = Command::new(binary("banger"));
        command
            .arg("--socket")
            .arg(&self.socket)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    /// Runs `banger ARGS` to completion.
    pub fn banger(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run banger")
    }

    /// Runs `banger ARGS`, asserts success, returns stdout.
    pub fn banger_ok(&self, args: &[&str]) -> String {
        let output = self.banger(args);
        assert!(
            output.status.success(),
            "banger {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_text()
        );
        String::from_utf8(output.stdout).expect("utf-8 stdout")
    }

    /// Runs `banger ARGS --json` and parses stdout as one JSON value.
    pub fn banger_json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let stdout = self.banger_ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("banger {all:?} printed no JSON ({error}): {stdout}"))
    }

    /// Runs `banger ARGS --json` (a long command: an event stream) and
    /// parses each line of stdout as one JSON value.
    pub fn banger_json_lines(&self, args: &[&str]) -> Vec<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let stdout = self.banger_ok(&all);
        stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|error| {
                    panic!("banger {all:?} printed a line that is not JSON ({error}): {line}")
                })
            })
            .collect()
    }

    /// Runs `banger ARGS`, asserts failure, returns stderr.
    pub fn banger_err(&self, args: &[&str]) -> String {
        let output = self.banger(args);
        assert!(
            !output.status.success(),
            "banger {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).expect("utf-8 stderr")
    }

    /// The VM as `vm show --json` reports it.
    pub fn vm(&self, name: &str) -> Value {
        self.banger_json(&["vm", "show", name])
    }

    /// Polls `vm show` until `state` (or panics after `timeout`).
    pub fn wait_for_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let vm = self.vm(name);
            if vm["state"] == state {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name} did not become {state} within {timeout:?}: {vm}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Registers a small real ext4 image (`mkfs.ext4`) and a stand-in kernel
    /// as `image` / `kernel`, the names the tests use.
    pub fn import_fixtures(&self) {
        let image = self.dir.path().join("fixture.ext4");
        make_ext4(&image, 64);
        let kernel = self.dir.path().join("vmlinux");
        write_fake_kernel(&kernel);
        self.banger_ok(&["image", "import", "image", image.to_str().expect("utf-8")]);
        self.banger_ok(&[
            "kernel",
            "import",
            "kernel",
            kernel.to_str().expect("utf-8"),
        ]);
    }

    /// Every request fake-firecracker logged, in order.
    pub fn requests(&self) -> Vec<Value> {
        let Ok(file) = std::fs::File::open(&self.request_log) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map(|line| serde_json::from_str(&line.expect("read request log")).expect("JSON line"))
            .collect()
    }

    /// Requests logged by the fake-firecracker of VM `vm_id`.
    pub fn requests_of(&self, vm_id: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|request| request["id"] == vm_id)
            .collect()
    }

    /// Pids of VMM processes (Firecracker or QEMU) whose command line points
    /// into this state dir, or whose executable is in its jail.
    pub fn vmm_pids(&self) -> Vec<u32> {
        // A jailer's command line carries the VMM's flags too: a jailer still
        // starting a VMM, or fake-jailer's guest launcher, is not a VMM.
        let mut pids = self.pids_matching(|cmdline| {
            (cmdline.contains("--api-sock") || cmdline.contains("qmp.sock"))
                && !cmdline.contains("--chroot-base-dir")
        });
        for pid in self.jailed_vmm_pids() {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Whether VMMs run jailed (by `fake-jailer`): when the tests run as root.
    pub fn jailed(&self) -> bool {
        std::fs::read_to_string(&self.config).is_ok_and(|config| config.contains("jailed = true"))
    }

    /// The chroot of VM `vm_id`'s jailed fake-firecracker.
    pub fn jail_root(&self, vm_id: &str) -> PathBuf {
        self.state_dir
            .join("jail")
            .join("fake-firecracker")
            .join(vm_id)
            .join("root")
    }

    /// Pids of processes running an executable from this state dir's jail
    /// (a jailed fake-firecracker runs its copy in the chroot).
    pub fn jailed_vmm_pids(&self) -> Vec<u32> {
        let jail = self.state_dir.join("jail");
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe.starts_with(&jail))
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// Pids of the `banger-agent --listen-unix` guests fake-firecracker
    /// started for VMs in this state dir. A VMM killed with SIGKILL leaves
    /// its guest agent running (a real guest dies with its VMM).
    /// Jailed, the agent runs in its VMM's pid namespace with a path
    /// inside the jail, so it is found by that namespace instead.
    pub fn guest_agent_pids(&self) -> Vec<u32> {
        let mut pids = self.pids_matching(|cmdline| cmdline.contains("--listen-unix"));
        let pid_namespace = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        let jailed: Vec<PathBuf> = self
            .jailed_vmm_pids()
            .into_iter()
            .filter_map(pid_namespace)
            .collect();
        if jailed.is_empty() {
            return pids;
        }
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let is_agent = std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("--listen-unix"));
            if is_agent
                && !pids.contains(&pid)
                && pid_namespace(pid).is_some_and(|namespace| jailed.contains(&namespace))
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// Runs VMMs unjailed (fake-firecracker spawned by bangerd directly),
    /// as when the tests do not run as root. Call before `start`.
    pub fn without_jail(&mut self) {
        let config = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(
            &self.config,
            config.replace("jailed = true", "jailed = false"),
        )
        .expect("write config");
    }

    /// Pids of processes whose command line names this state dir and
    /// passes `matches`.
    fn pids_matching(&self, matches: impl Fn(&str) -> bool) -> Vec<u32> {
        let needle = self.state_dir.display().to_string();
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if matches(&cmdline) && cmdline.contains(&needle) {
                // Zombies have an empty cmdline, so a match is a live process.
                pids.push(pid);
            }
        }
        pids
    }

    /// Entries left under `state/vms`, `state/tmp` and the jails
    /// (`state/jail/<binary>/`).
    pub fn leftover_files(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.state_dir.join("vms"), self.state_dir.join("tmp")];
        if let Ok(binaries) = std::fs::read_dir(self.state_dir.join("jail")) {
            dirs.extend(binaries.flatten().map(|entry| entry.path()));
        }
        let mut leftovers = Vec::new();
        for dir in dirs {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                leftovers.extend(entries.flatten().map(|entry| entry.path()));
            }
        }
        leftovers
    }

    /// Asserts no VMM process and no VM/temp file remains.
    pub fn assert_no_leaks(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.vmm_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.vmm_pids(), Vec::<u32>::new(), "VMM processes leaked");
        assert_eq!(self.leftover_files(), Vec::<PathBuf>::new(), "files leaked");
    }

    /// One raw JSON-RPC exchange on a fresh connection: sends `line`, returns
    /// the first response line parsed.
    pub fn raw_call(&self, line: &str) -> Value {
        let mut stream = UnixStream::connect(&self.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // The daemon may answer and hang up before reading all of an
        // oversized request; the answer is still there to read.
        let _ = stream.write_all(line.as_bytes());
        let _ = stream.write_all(b"\n");
        let mut reader = BufReader::new(stream);
        let mut response = String::new();
        reader.read_line(&mut response).expect("read response");
        serde_json::from_str(&response).expect("response is JSON")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
        let pids: Vec<u32> = self
            .vmm_pids()
            .into_iter()
            .chain(self.guest_agent_pids())
            .collect();
        for &pid in &pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The jailed VMs' cgroups outlive the temp dir: remove them once
        // their VMMs are gone.
        let Some(cgroups) = banger_vmm::jail::Cgroups::detect() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while pids.iter().any(|&pid| banger_vmm::process::is_running(pid))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let Ok(binaries) = std::fs::read_dir(self.state_dir.join("jail")) else {
            return;
        };
        for vm in binaries
            .flatten()
            .filter_map(|binary| std::fs::read_dir(binary.path()).ok())
            .flatten()
            .flatten()
        {
            for dir in cgroups.vm_cgroups(&vm.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Makes a real ext4 filesystem image of `size_mib` with `mkfs.ext4`.
pub fn make_ext4(path: &Path, size_mib: u64) {
    let file = std::fs::File::create(path).expect("create image");
    file.set_len(size_mib << 20).expect("size image");
    drop(file);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("mkfs.ext4 is needed (apt install e2fsprogs)");
    assert!(status.success(), "mkfs.ext4 failed");
}

/// A stand-in kernel: an ELF header, enough for banger's format check and
/// for fake-firecracker, which does not boot it.
pub fn write_fake_kernel(path: &Path) {
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.resize(4096, 0);
    std::fs::write(path, bytes).expect("write kernel");
}

/// A stand-in static guest agent: an ELF64 executable header for this
/// machine's architecture with one `PT_LOAD` and no `PT_INTERP`, enough for
/// the daemon's static-executable check; nothing runs it.
pub fn write_static_agent_stub(path: &Path) {
    let machine: u16 = if cfg!(target_arch = "aarch64") {
        183
    } else {
        62
    };
    let mut bytes = b"\x7fELF\x02\x01\x01\x00".to_vec();
    bytes.resize(16, 0);
    bytes.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    bytes.extend_from_slice(&machine.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes()); // e_version
    bytes.extend_from_slice(&0x40_1000u64.to_le_bytes()); // e_entry
    bytes.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    bytes.extend_from_slice(&[0; 12]); // e_shoff, e_flags
    bytes.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    bytes.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    bytes.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    bytes.extend_from_slice(&[0; 6]);
    bytes.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    bytes.extend_from_slice(&5u32.to_le_bytes()); // R+X
    bytes.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    bytes.extend_from_slice(&0x40_0000u64.to_le_bytes()); // p_vaddr
    bytes.extend_from_slice(&0x40_0000u64.to_le_bytes()); // p_paddr
    bytes.extend_from_slice(&120u64.to_le_bytes()); // p_filesz
    bytes.extend_from_slice(&120u64.to_le_bytes()); // p_memsz
    bytes.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    std::fs::write(path, bytes).expect("write agent stub");
}

/// A minimal HTTP/1.1 server on a loopback port serving the files of a
/// directory (`GET /NAME`), one connection at a time, `Connection: close`.
/// Stands in for a catalog host; dropped with the test process.
pub fn serve_directory(root: &Path) -> u16 {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local address").port();
    let root = root.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut byte = [0_u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            let request = String::from_utf8_lossy(&request);
            let path = request
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_owned();
            let file = root.join(&path);
            let response = match (path.contains(".."), std::fs::read(&file)) {
                (false, Ok(body)) => {
                    let mut response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    response.extend(body);
                    response
                }
                _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    port
}

/// `sha256sum` of a file, as 64 hex digits.
pub fn sha256_hex(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}
