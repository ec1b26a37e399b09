//! `banger vm logs`: the console log of a fake-firecracker VM, its tail, its
//! following across rotations, and what reaches the terminal.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::TestDaemon;

const HOSTILE: &str = "\x1b]0;owned\x07hostile\x1b[2J";

fn daemon_with_vm(name: &str) -> (TestDaemon, PathBuf) {
    let mut daemon = TestDaemon::new(&[]);
    daemon.set_env("FAKE_FIRECRACKER_CONSOLE_TEXT", HOSTILE);
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        config.replace("[vm]\n", "[vm]\nconsole_log_max = \"64K\"\n"),
    )
    .unwrap();
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", name, "--image", "image", "--kernel", "kernel",
    ]);
    let dir = PathBuf::from(daemon.vm(name)["dir"].as_str().unwrap());
    let console = dir.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("hostile")
    {
        assert!(Instant::now() < deadline, "no boot lines in {console:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (daemon, console)
}

fn append(console: &PathBuf, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(console)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// A running `banger vm logs -f` and what it printed so far.
struct Following {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Following {
    fn start(daemon: &TestDaemon, name: &str) -> Self {
        let mut child = daemon
            .command()
            .args(["vm", "logs", "-f", name])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut buffer = [0_u8; 8192];
            while let Ok(read) = stdout.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buffer[..read]);
            }
        });
        Self { child, output }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "`vm logs -f` never printed {needle:?}; it printed:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("`vm logs -f` did not end:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn logs_print_the_console_sanitised_its_tail_and_refuse_unknown_vms() {
    let (daemon, console) = daemon_with_vm("talk");
    let logs = daemon.banger_ok(&["vm", "logs", "talk"]);
    assert!(logs.contains("fake-firecracker: guest running\n"), "{logs}");
    // Escape sequences are made visible.
    assert!(logs.contains("\\x1b]0;owned\\x07hostile\\x1b[2J"), "{logs}");
    assert!(!logs.contains('\x1b') && !logs.contains('\x07'), "{logs:?}");
    // --raw passes the bytes as they are.
    let raw = daemon
        .command()
        .args(["vm", "logs", "--raw", "talk"])
        .output()
        .unwrap();
    assert!(raw.status.success());
    assert!(String::from_utf8_lossy(&raw.stdout).contains(HOSTILE));

    append(&console, "line-a\nline-b\nline-c\n");
    let tail = daemon.banger_ok(&["vm", "logs", "--tail", "2", "talk"]);
    assert_eq!(tail, "line-b\nline-c\n");
    let json = daemon.banger_ok(&["vm", "logs", "--tail", "2", "--json", "talk"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"line": "line-b"}),
            serde_json::json!({"line": "line-c"})
        ]
    );

    // A stopped VM's log is still there; -f prints it and ends.
    daemon.banger_ok(&["vm", "stop", "--force", "talk"]);
    let mut stopped = Following::start(&daemon, "talk");
    assert!(stopped.wait_exit().success());
    assert!(stopped.text().ends_with("line-c\n"), "{}", stopped.text());

    let error = daemon.banger_err(&["vm", "logs", "nope"]);
    let first = error.lines().next().unwrap_or_default();
    assert_eq!(first, "error: No VM named `nope`", "{error}");
    daemon.banger_ok(&["vm", "delete", "talk"]);
    daemon.assert_no_leaks();
}

#[test]
fn follow_prints_appended_text_across_rotation_and_ends_when_the_vm_stops() {
    let (daemon, console) = daemon_with_vm("chatty");
    let mut following = Following::start(&daemon, "chatty");
    following.wait_for("guest running");
    append(&console, "after-the-call\n");
    following.wait_for("after-the-call\n");

    // Over the 64K cap: the daemon rotates console.log into console.log.1.
    let big: String = (0..3000)
        .map(|index| format!("before-{index:05}-padding-padding\n"))
        .collect();
    append(&console, &big);
    let rotated = console.with_file_name("console.log.1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(rotated.exists() && std::fs::metadata(&console).unwrap().len() < 64 * 1024) {
        assert!(
            Instant::now() < deadline,
            "console.log ({} bytes) was not rotated; daemon log:\n{}",
            std::fs::metadata(&console).unwrap().len(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for index in 0..200 {
        append(&console, &format!("after-{index:03}\n"));
        if index % 50 == 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    following.wait_for("after-199\n");
    let text = following.text();
    // Nothing appended after the rotation is lost or repeated, and the
    // follower saw the end of what was rotated away.
    for index in 0..200 {
        assert_eq!(
            text.matches(&format!("after-{index:03}\n")).count(),
            1,
            "after-{index:03}"
        );
    }
    assert_eq!(text.matches("before-02999-padding").count(), 1);
    assert_eq!(text.matches("after-the-call\n").count(), 1);

    daemon.banger_ok(&["vm", "stop", "--force", "chatty"]);
    assert!(following.wait_exit().success(), "{}", following.text());
    daemon.banger_ok(&["vm", "delete", "chatty"]);
    daemon.assert_no_leaks();
}
