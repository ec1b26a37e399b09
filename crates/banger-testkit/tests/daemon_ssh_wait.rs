//! `vm create --wait-ssh` and `vm ssh` wait, through the guest agent, until
//! a socket in the guest listens on the SSH port (host keys exist before
//! sshd listens). In the agent's host test mode the "guest" socket table is
//! this host's, so a listener the test opens late stands for a late sshd.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{require_root, TestDaemon};

/// A free port, and a thread that listens on it after `delay` for `hold`.
fn late_listener(delay: Duration, hold: Duration) -> (u16, std::thread::JoinHandle<()>) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(delay);
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::thread::sleep(hold);
        drop(listener);
    });
    (port, thread)
}

fn agent_daemon() -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    daemon
}

#[test]
fn create_wait_ssh_is_a_stage_that_ends_when_the_port_listens() {
    let daemon = agent_daemon();
    let delay = Duration::from_secs(3);
    let (port, listener) = late_listener(delay, Duration::from_secs(20));
    let started = Instant::now();
    let output = daemon
        .command()
        .args([
            "vm", "create", "late", "--image", "image", "--kernel", "kernel",
        ])
        .arg(format!("--wait-ssh={port}"))
        .arg("--json")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        elapsed >= delay,
        "create returned after {elapsed:?}: {stdout}"
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let ssh: Vec<&serde_json::Value> = events
        .iter()
        .filter(|event| event["stage"] == "ssh ready")
        .collect();
    assert_eq!(ssh.len(), 2, "{stdout}");
    assert_eq!(ssh[0]["status"], "started");
    assert_eq!(ssh[1]["status"], "finished");
    assert_eq!(ssh[1]["message"], format!("port {port} listens"));
    // The stage comes after the daemon's stages, before the closing frames.
    let ssh_at = events
        .iter()
        .position(|event| event["stage"] == "ssh ready")
        .unwrap();
    let agent_at = events
        .iter()
        .position(|event| event["stage"] == "agent ready")
        .unwrap();
    assert!(agent_at < ssh_at, "{stdout}");

    // Listening already: no wait.
    let started = Instant::now();
    let output = daemon
        .command()
        .args([
            "vm", "create", "early", "--image", "image", "--kernel", "kernel",
        ])
        .arg(format!("--wait-ssh={port}"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ssh ready"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
    listener.join().unwrap();

    let error = daemon.banger_err(&["vm", "create", "x", "--no-start", "--wait-ssh"]);
    assert!(error.contains("--wait-ssh"), "{error}");
    daemon.banger_ok(&["vm", "delete", "--force", "late"]);
    daemon.banger_ok(&["vm", "delete", "--force", "early"]);
    daemon.assert_no_leaks();
}

/// A user that exists only for the test (`vm ssh` installs keys in its home).
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
fn vm_ssh_waits_for_a_late_sshd_saying_so() {
    if !require_root("vm_ssh_waits_for_a_late_sshd_saying_so") {
        return;
    }
    let daemon = agent_daemon();
    daemon.banger_ok(&[
        "vm", "create", "box", "--image", "image", "--kernel", "kernel",
    ]);
    let home = daemon.dir.path().join("guest-home");
    let user = TemporaryUser {
        name: format!("bgs{}", std::process::id() % 100_000),
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
    std::fs::create_dir_all(&host_home).unwrap();

    let delay = Duration::from_secs(3);
    let (port, listener) = late_listener(delay, Duration::from_secs(10));
    let started = Instant::now();
    let output = daemon
        .command()
        .env("HOME", &host_home)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .args([
            "vm",
            "ssh",
            "box",
            "-u",
            &user.name,
            "-p",
            &port.to_string(),
        ])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "waiting up to 90 s for box to listen on port {port}"
        )),
        "{stderr}"
    );
    assert!(
        elapsed >= delay,
        "ssh went ahead after {elapsed:?}: {stderr}"
    );
    // Past the wait, the test daemon's VMs have no network for ssh itself.
    assert!(stderr.contains("has no network interface"), "{stderr}");
    listener.join().unwrap();
    daemon.banger_ok(&["vm", "delete", "--force", "box"]);
    daemon.assert_no_leaks();
}
