//! The guest agent path end to end without a VM: bangerd and the real CLI,
//! fake-firecracker bridging each VM's vsock socket (Firecracker's
//! `CONNECT <port>` protocol) to a `banger-agent --listen-unix` process.
//! Commands therefore run on this host, in the agent's test mode.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use banger_testkit::test_daemon::{require_root, TestDaemon};
use sha2::{Digest, Sha256};

fn daemon_with_vm(name: &str) -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    let created = daemon.banger_ok(&[
        "vm", "create", name, "--image", "image", "--kernel", "kernel",
    ]);
    assert!(
        created.contains("agent ready") || daemon.vm(name)["state"] == "running",
        "create did not wait for the agent: {created}"
    );
    daemon
}

fn run(daemon: &TestDaemon, args: &[&str]) -> std::process::Output {
    daemon.banger(args)
}

#[test]
fn run_passes_output_and_exit_codes_through() {
    let daemon = daemon_with_vm("runner");
    let output = run(
        &daemon,
        &["vm", "run", "runner", "--", "echo", "hello from the guest"],
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello from the guest\n"
    );

    for code in [1, 42] {
        let output = run(
            &daemon,
            &[
                "vm",
                "run",
                "runner",
                "--",
                "sh",
                "-c",
                &format!("exit {code}"),
            ],
        );
        assert_eq!(output.status.code(), Some(code), "{output:?}");
    }
    // Killed by SIGTERM: 128 + 15, like a shell.
    let output = run(
        &daemon,
        &["vm", "run", "runner", "--", "sh", "-c", "kill -TERM $$"],
    );
    assert_eq!(output.status.code(), Some(143), "{output:?}");

    // stderr stays separate; env, cwd apply.
    let output = run(
        &daemon,
        &[
            "vm",
            "run",
            "-e",
            "GREETING=hi",
            "-w",
            "/tmp",
            "runner",
            "--",
            "sh",
            "-c",
            "echo $GREETING $(pwd); echo oops >&2",
        ],
    );
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi /tmp\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "oops\n");

    // A missing program is a clear error, exit 1.
    let output = run(
        &daemon,
        &["vm", "run", "runner", "--", "no-such-program-xyz"],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no-such-program-xyz"),
        "{output:?}"
    );

    // A stopped VM: a clear error naming its state.
    daemon.banger_ok(&["vm", "stop", "runner"]);
    let error = daemon.banger_err(&["vm", "run", "runner", "--", "true"]);
    assert!(error.contains("stopped"), "{error}");
    // Start waits for the agent again, and run works.
    daemon.banger_ok(&["vm", "start", "runner"]);
    let output = run(&daemon, &["vm", "run", "runner", "--", "true"]);
    assert!(output.status.success(), "{output:?}");
    daemon.banger_ok(&["vm", "delete", "--force", "runner"]);
    daemon.assert_no_leaks();
}

#[test]
fn stdin_pipelines_and_a_hundred_mebibytes_round_trip() {
    let daemon = daemon_with_vm("pipe");
    let mut child = daemon
        .command()
        .args(["vm", "run", "pipe", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi\n");

    const TOTAL: usize = 100 * 1024 * 1024;
    let mut child = daemon
        .command()
        .args(["vm", "run", "pipe", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut block = vec![0_u8; 1024 * 1024];
        for _ in 0..TOTAL / block.len() {
            for byte in &mut block {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            hasher.update(&block);
            stdin.write_all(&block).unwrap();
        }
        hasher.finalize()
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut hasher = Sha256::new();
    let mut received = 0;
    let mut buffer = vec![0_u8; 256 * 1024];
    loop {
        let read = stdout.read(&mut buffer).unwrap();
        if read == 0 {
            break;
        }
        received += read;
        hasher.update(&buffer[..read]);
    }
    let sent = writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(received, TOTAL);
    assert_eq!(hasher.finalize(), sent);
    eprintln!(
        "100 MiB through vm run -- cat: {:.1} s ({:.0} MiB/s)",
        started.elapsed().as_secs_f64(),
        100.0 / started.elapsed().as_secs_f64()
    );
}

#[test]
fn twenty_concurrent_runs_on_one_vm() {
    let daemon = daemon_with_vm("busy");
    let children: Vec<_> = (0..20)
        .map(|index| {
            daemon
                .command()
                .args([
                    "vm",
                    "run",
                    "busy",
                    "--",
                    "sh",
                    "-c",
                    &format!("sleep 0.3; echo run-{index}; exit {}", index % 3),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (index, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("run-{index}\n")
        );
        assert_eq!(
            output.status.code(),
            Some(i32::try_from(index % 3).unwrap())
        );
    }
}

#[test]
fn ctrl_c_reaches_the_command() {
    let daemon = daemon_with_vm("intr");
    let mut child = daemon
        .command()
        .args([
            "vm",
            "run",
            "intr",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0_u8; 1];
    while !String::from_utf8_lossy(&seen).contains("ready\n") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "stream ended early");
        seen.push(byte[0]);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got-int\n");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn a_tty_session_sees_the_terminal_size() {
    use nix::pty::{openpty, Winsize};
    let daemon = daemon_with_vm("term");
    let size = Winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = daemon
        .command()
        .args([
            "vm",
            "run",
            "-t",
            "term",
            "--",
            "sh",
            "-c",
            "stty size; tty; echo $TERM",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let mut master = std::fs::File::from(pty.master);
    // The child is gone and the test's own slave copies were moved into it.
    let mut output = Vec::new();
    let mut buffer = [0_u8; 4096];
    loop {
        match master.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => output.extend_from_slice(&buffer[..read]),
        }
    }
    let text = String::from_utf8_lossy(&output);
    assert!(status.success(), "{text}");
    assert!(text.contains("33 101"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("xterm-256color"), "{text}");
}

fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("src/nested")).unwrap();
    std::fs::write(root.join("README"), "top\n").unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(root.join("src/nested/data.bin"), [0_u8, 1, 2, 255]).unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        root.join("src/nested"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("link")).unwrap();
}

fn assert_same_tree(left: &Path, right: &Path) {
    for relative in ["README", "src/main.rs", "src/nested/data.bin", "run.sh"] {
        assert_eq!(
            std::fs::read(left.join(relative)).unwrap(),
            std::fs::read(right.join(relative)).unwrap(),
            "{relative}"
        );
        assert_eq!(
            std::fs::metadata(left.join(relative)).unwrap().mode() & 0o7777,
            std::fs::metadata(right.join(relative)).unwrap().mode() & 0o7777,
            "mode of {relative}"
        );
    }
    assert_eq!(
        std::fs::metadata(right.join("src/nested")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        std::fs::read_link(right.join("link")).unwrap(),
        Path::new("src/main.rs")
    );
}

#[test]
fn cp_round_trips_a_tree_both_ways() {
    let daemon = daemon_with_vm("files");
    let work = daemon.dir.path().join("cp");
    let source = work.join("project");
    write_tree(&source);
    // The "guest" is this host in the agent's test mode: its paths are ours.
    let guest_dir = work.join("guest");
    std::fs::create_dir_all(&guest_dir).unwrap();
    let guest = guest_dir.display().to_string();

    // Into an existing guest directory: lands as guest/project.
    daemon.banger_ok(&[
        "vm",
        "cp",
        source.to_str().unwrap(),
        &format!("files:{guest}"),
    ]);
    assert_same_tree(&source, &guest_dir.join("project"));
    // To a new name: lands renamed.
    daemon.banger_ok(&[
        "vm",
        "cp",
        source.join("README").to_str().unwrap(),
        &format!("files:{guest}/renamed.txt"),
    ]);
    assert_eq!(
        std::fs::read_to_string(guest_dir.join("renamed.txt")).unwrap(),
        "top\n"
    );

    // Back out: into an existing directory, and as a new name.
    let back = work.join("back");
    std::fs::create_dir_all(&back).unwrap();
    daemon.banger_ok(&[
        "vm",
        "cp",
        &format!("files:{guest}/project"),
        back.to_str().unwrap(),
    ]);
    assert_same_tree(&source, &back.join("project"));
    let renamed = work.join("copy-of-project");
    daemon.banger_ok(&[
        "vm",
        "cp",
        &format!("files:{guest}/project"),
        renamed.to_str().unwrap(),
    ]);
    assert_same_tree(&source, &renamed);
    // No staging directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(".banger-cp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Errors name what was wrong.
    let error = daemon.banger_err(&[
        "vm",
        "cp",
        &format!("files:{guest}/missing"),
        back.to_str().unwrap(),
    ]);
    assert!(error.contains("missing"), "{error}");
    let error = daemon.banger_err(&["vm", "cp", "a", "b"]);
    assert!(error.contains("Neither side"), "{error}");
}

#[test]
fn stats_come_from_the_agent_and_the_vmm() {
    let daemon = daemon_with_vm("stats");
    let stats = daemon.banger_json(&["vm", "stats", "stats"]);
    assert!(
        stats["guest"]["memory_total_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["guest"]["cpu_count"].as_u64().unwrap() >= 1);
    assert_eq!(stats["vmm"]["pid"], daemon.vm("stats")["pid"]);
    assert!(stats["vmm"]["rss_bytes"].as_u64().unwrap() > 0);
    let text = daemon.banger_ok(&["vm", "stats", "stats"]);
    assert!(text.contains("memory"), "{text}");
}

/// A user that exists only for the test (authsync writes into its home).
struct TemporaryUser {
    name: String,
}

impl Drop for TemporaryUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .arg(&self.name)
            .status();
    }
}

#[test]
fn authsync_installs_keys_and_git_identity() {
    if !require_root("authsync_installs_keys_and_git_identity") {
        return;
    }
    let daemon = daemon_with_vm("keys");
    let home = daemon.dir.path().join("guest-home");
    let user = TemporaryUser {
        name: format!("bgt{}", std::process::id() % 100_000),
    };
    let status = std::process::Command::new("useradd")
        .args(["-M", "-d"])
        .arg(&home)
        .arg(&user.name)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::create_dir_all(&home).unwrap();
    let host_home = daemon.dir.path().join("host-home");
    std::fs::create_dir_all(host_home.join(".ssh")).unwrap();
    std::fs::write(
        host_home.join(".ssh/id_test.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTUSERKEY me@laptop\n",
    )
    .unwrap();
    std::fs::write(
        host_home.join(".gitconfig"),
        "[user]\n\tname = Test Person\n\temail = test@example.org\n",
    )
    .unwrap();
    let output = daemon
        .command()
        .env("HOME", &host_home)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .args(["vm", "authsync", "keys", "-u", &user.name])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let keys = std::fs::read_to_string(home.join(".ssh/authorized_keys")).unwrap();
    assert!(keys.contains("HOSTUSERKEY"), "{keys}");
    assert!(keys.contains("banger-managed"), "{keys}");
    assert!(host_home
        .join(".local/share/banger/ssh/id_ed25519")
        .exists());
    let gitconfig = std::fs::read_to_string(home.join(".gitconfig")).unwrap();
    assert!(
        gitconfig.contains("Test Person") && gitconfig.contains("test@example.org"),
        "{gitconfig}"
    );

    let error = daemon.banger_err(&["vm", "authsync", "keys", "-u", "no-such-user-xyz"]);
    assert!(error.contains("no-such-user-xyz"), "{error}");
}

#[test]
fn an_agent_that_never_answers_fails_create_with_the_console_tail() {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    // The vsock bridge has nowhere to go: the agent never answers.
    daemon.remove_env("FAKE_FIRECRACKER_GUEST_AGENT_BIN");
    daemon.set_env("FAKE_FIRECRACKER_VSOCK_AGENT", "/nonexistent/agent.sock");
    let config = std::fs::read_to_string(&daemon.config)
        .unwrap()
        .replace("ready_timeout_seconds = 10", "ready_timeout_seconds = 2");
    std::fs::write(&daemon.config, config).unwrap();
    daemon.start();
    daemon.import_fixtures();
    let error = daemon.banger_err(&[
        "vm", "create", "mute", "--image", "image", "--kernel", "kernel",
    ]);
    assert!(error.contains("agent ready"), "{error}");
    assert!(error.contains("did not answer"), "{error}");
    assert!(
        error.contains("fake-firecracker"),
        "console tail missing: {error}"
    );
    // The failed VM holds no process.
    let vm = daemon.vm("mute");
    assert_eq!(vm["state"], "failed");
    assert!(daemon.vmm_pids().is_empty());
    daemon.banger_ok(&["vm", "delete", "mute"]);
    daemon.assert_no_leaks();
}

/// `banger ARGS` run with `umask` set first.
fn banger_with_umask(daemon: &TestDaemon, umask: &str, args: &[&str]) -> std::process::Output {
    let banger = daemon.command();
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask} && exec \"$@\""))
        .arg("sh")
        .arg(banger.get_program())
        .args(banger.get_args())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "banger {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn cp_out_copies_a_link_as_a_link_and_follows_it_with_dash_l() {
    let daemon = daemon_with_vm("links");
    let work = daemon.dir.path().join("links");
    let guest = work.join("guest");
    std::fs::create_dir_all(guest.join("etc")).unwrap();
    std::fs::create_dir_all(guest.join("usr/lib")).unwrap();
    std::fs::write(guest.join("usr/lib/os-release"), "ID=banger\n").unwrap();
    std::os::unix::fs::symlink("../usr/lib/os-release", guest.join("etc/os-release")).unwrap();
    let out = work.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let source = format!("links:{}/etc/os-release", guest.display());

    // Without -L: the link itself, never its target on the host.
    daemon.banger_ok(&["vm", "cp", &source, out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_link(out.join("os-release")).unwrap(),
        Path::new("../usr/lib/os-release")
    );
    std::fs::remove_file(out.join("os-release")).unwrap();

    // -L: the guest follows it; the host gets the file.
    daemon.banger_ok(&["vm", "cp", "-L", &source, out.to_str().unwrap()]);
    let copied = out.join("os-release");
    assert!(std::fs::symlink_metadata(&copied).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(&copied).unwrap(), "ID=banger\n");

    // -L on a tree follows the links inside it too.
    daemon.banger_ok(&[
        "vm",
        "cp",
        "-L",
        &format!("links:{}/etc", guest.display()),
        out.join("etc-copy").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(out.join("etc-copy/os-release")).unwrap(),
        "ID=banger\n"
    );
}

#[test]
fn cp_out_drops_set_id_bits_and_applies_the_callers_umask() {
    let daemon = daemon_with_vm("modes");
    let work = daemon.dir.path().join("modes");
    let tools = work.join("guest/tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("suid"), "#!/bin/sh\n").unwrap();
    std::fs::write(tools.join("open"), "x").unwrap();
    std::fs::set_permissions(tools.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(tools.join("open"), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&tools, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let owned_by_other =
        std::os::unix::fs::chown(tools.join("open"), Some(4321), Some(4321)).is_ok();
    let source = format!("modes:{}", tools.display());

    let plain = work.join("plain");
    banger_with_umask(
        &daemon,
        "027",
        &["vm", "cp", &source, plain.to_str().unwrap()],
    );
    assert_eq!(mode(&plain.join("suid")), 0o750);
    assert_eq!(mode(&plain.join("open")), 0o640);
    assert_eq!(mode(&plain), 0o750);
    let me = std::fs::metadata(&work).unwrap().uid();
    assert_eq!(std::fs::metadata(plain.join("open")).unwrap().uid(), me);

    // -a: modes as they are, still without set-id or sticky bits; owners
    // kept when the caller may (root).
    let archive = work.join("archive");
    banger_with_umask(
        &daemon,
        "027",
        &["vm", "cp", "-a", &source, archive.to_str().unwrap()],
    );
    assert_eq!(mode(&archive.join("suid")), 0o755);
    assert_eq!(mode(&archive.join("open")), 0o666);
    assert_eq!(mode(&archive), 0o777);
    if owned_by_other && me == 0 {
        assert_eq!(std::fs::metadata(archive.join("open")).unwrap().uid(), 4321);
    } else {
        eprintln!("skipping the owner check of -a: needs root");
    }
}

#[test]
fn guest_text_reaches_the_terminal_without_escape_sequences() {
    // An exec error quoting what the guest said.
    let daemon = daemon_with_vm("texts");
    let output = run(
        &daemon,
        &["vm", "run", "texts", "--", "no-such\x1b]0;owned\x07\x1b[2J"],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no-such\\x1b]0;owned\\x07\\x1b[2J"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b') && !stderr.contains('\x07'),
        "{stderr:?}"
    );
    daemon.banger_ok(&["vm", "delete", "--force", "texts"]);

    // A console tail quoted in a failed create and kept for `vm show`.
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.remove_env("FAKE_FIRECRACKER_GUEST_AGENT_BIN");
    // No agent, and the "VM" dies soon after boot, its console saying why.
    daemon.set_env("FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS", "300");
    daemon.set_env(
        "FAKE_FIRECRACKER_CONSOLE_TEXT",
        "\x1b]0;owned\x07\x1b[2Jkernel panic\u{9b}31m",
    );
    let config = std::fs::read_to_string(&daemon.config)
        .unwrap()
        .replace("ready_timeout_seconds = 10", "ready_timeout_seconds = 2");
    std::fs::write(&daemon.config, config).unwrap();
    daemon.start();
    daemon.import_fixtures();
    let output = daemon.banger(&[
        "vm", "create", "mute", "--image", "image", "--kernel", "kernel",
    ]);
    assert!(!output.status.success());
    let shown = daemon.banger_ok(&["vm", "show", "mute"]);
    let listed = daemon.banger_ok(&["vm", "list"]);
    let json = daemon.banger_ok(&["vm", "show", "mute", "--json"]);
    for text in [
        String::from_utf8_lossy(&output.stderr).into_owned(),
        shown.clone(),
        listed,
        json.clone(),
    ] {
        assert!(
            !text.contains('\x1b') && !text.contains('\x07') && !text.contains('\u{9b}'),
            "{text:?}"
        );
    }
    assert!(
        shown.contains("\\x1b]0;owned\\x07\\x1b[2Jkernel panic\\x9b31m"),
        "{shown}"
    );
    let vm: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        vm["error"]
            .as_str()
            .unwrap()
            .contains("\\x1b[2Jkernel panic"),
        "{vm}"
    );
    daemon.banger_ok(&["vm", "delete", "mute"]);
    daemon.assert_no_leaks();
}
