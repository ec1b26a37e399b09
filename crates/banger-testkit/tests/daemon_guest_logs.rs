//! `vm logs --guest`: the guest's journal through the agent, which runs
//! `journalctl` in the guest. The guest is a `banger-agent` in host test
//! mode whose command `PATH` starts with a stand-in `journalctl` script.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::TestDaemon;

/// A `journalctl` that prints its arguments and two lines (one with an
/// escape sequence) and, with `--follow`, a third after a moment, then
/// waits to be interrupted, with its own directory as working directory
/// (how the test finds it: its pid is another PID namespace's when the
/// agent is jailed).
const JOURNALCTL: &str = r#"#!/bin/sh
cd "$(dirname "$0")"
echo "args: $*"
printf '2026-01-01T00:00:00+0000 guest banger-agent[1]: ready \033[2J\n'
case " $* " in
*" --follow "*)
    sleep 1
    echo "2026-01-01T00:00:01+0000 guest sshd[42]: Server listening"
    exec sleep 600
    ;;
esac
"#;

/// The processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}

fn daemon_with_journal(command_dir: &Path, with_journalctl: bool) -> TestDaemon {
    std::fs::create_dir_all(command_dir).unwrap();
    if with_journalctl {
        let script = command_dir.join("journalctl");
        std::fs::write(&script, JOURNALCTL).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    // Only the stand-in directory, then what sh, sleep and dirname need.
    let path = if with_journalctl {
        format!("{}:/usr/bin:/bin", command_dir.display())
    } else {
        command_dir.display().to_string()
    };
    daemon.set_env("FAKE_FIRECRACKER_GUEST_AGENT_COMMAND_PATH", &path);
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "box", "--image", "image", "--kernel", "kernel",
    ]);
    daemon
}

#[test]
fn guest_logs_print_the_journal_and_follow_until_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let commands = dir.path().join("guest-bin");
    let daemon = daemon_with_journal(&commands, true);

    let out = daemon.banger_ok(&["vm", "logs", "--guest", "box", "--tail", "5"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "args: --no-pager --boot --output=short-iso --lines=5",
        "{out}"
    );
    // The guest's escape sequence is made visible, as for the console.
    assert_eq!(
        lines[1],
        "2026-01-01T00:00:00+0000 guest banger-agent[1]: ready \\x1b[2J"
    );

    let json = daemon.banger_ok(&["vm", "logs", "--guest", "box", "--json"]);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["line"], "args: --no-pager --boot --output=short-iso");

    // -f: lines arrive as written; Ctrl-C ends it (exit 0) and the guest's
    // journalctl with it.
    let mut child = daemon
        .command()
        .args(["vm", "logs", "--guest", "-f", "box"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    let started = Instant::now();
    while !seen
        .iter()
        .any(|line: &String| line.contains("Server listening"))
    {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "ended early: {seen:?}"
        );
        seen.push(line);
        assert!(started.elapsed() < Duration::from_secs(20), "{seen:?}");
    }
    assert!(seen[0].contains("--follow"), "{seen:?}");
    assert!(
        !processes_in(&commands).is_empty(),
        "no guest journalctl found"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "vm logs -f did not end on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_in(&commands).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the guest's journalctl is still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.banger_ok(&["vm", "delete", "--force", "box"]);
    daemon.assert_no_leaks();
}

#[test]
fn a_guest_without_journalctl_gets_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_with_journal(&dir.path().join("empty-bin"), false);
    let error = daemon.banger_err(&["vm", "logs", "--guest", "box"]);
    assert!(error.contains("The guest has no journalctl"), "{error}");
    assert!(error.contains("hint: its init is not systemd"), "{error}");
    daemon.banger_ok(&["vm", "delete", "--force", "box"]);
}
