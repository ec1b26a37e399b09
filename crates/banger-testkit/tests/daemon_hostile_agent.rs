//! A guest whose agent is hostile: it floods the daemon with frames for
//! sessions that do not exist, overruns a relayed session's window and
//! sends an oversized frame. The daemon must drop that agent connection,
//! keep its memory bounded and keep serving other VMs and RPCs.
//!
//! The hostile agent is a Python script speaking the frame protocol; the
//! other VM gets the real `banger-agent` (fake-firecracker starts the same
//! binary for every VM, so the script execs the real agent unless a flag
//! file exists when it starts).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{binary, TestDaemon};

const HOSTILE_AGENT: &str = r#"#!/usr/bin/python3
import json, os, socket, struct, sys

if not os.path.exists(os.environ["HOSTILE_FLAG"]):
    os.execv(os.environ["REAL_AGENT"], [os.environ["REAL_AGENT"]] + sys.argv[1:])

path = sys.argv[sys.argv.index("--listen-unix") + 1]
log = open(os.environ["HOSTILE_LOG"], "a", buffering=1)

def frame(header, payload=b""):
    header = json.dumps(header).encode()
    return struct.pack(">II", len(header), len(payload)) + header + payload

def read_exact(conn, length):
    data = b""
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            return None
        data += chunk
    return data

def read_frame(conn):
    lengths = read_exact(conn, 8)
    if lengths is None:
        return None
    header_len, payload_len = struct.unpack(">II", lengths)
    header = json.loads(read_exact(conn, header_len))
    read_exact(conn, payload_len)
    return header

def wait_closed(conn):
    while read_frame(conn) is not None:
        pass

def hello(conn):
    read_frame(conn)
    conn.sendall(frame({"type": "hello_reply", "agent_version": "hostile",
        "protocol_version": 1, "kernel_release": "evil", "distro": "evil",
        "hostname": "evil", "boot_time_unix": 0, "is_init": False}))

def next_open(conn, op):
    while True:
        header = read_frame(conn)
        if header is None:
            return None
        if header["type"] != "open":
            continue
        if header["operation"]["op"] == op:
            return header["session"]
        conn.sendall(frame({"type": "failed", "session": header["session"],
            "error": {"kind": "invalid_request", "message": "no"}}))

server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
connections = 0
while True:
    conn, _ = server.accept()
    connections += 1
    hello(conn)
    if connections == 1:
        # Tiny frames for sessions that do not exist, never reading what
        # the host sends back: answers would pile up in the daemon.
        block = b"".join(
            frame({"type": "data", "session": 1000 + i, "stream": "stdout"}, b"x")
            + frame({"type": "credit", "session": 1000 + i, "stream": "stdin", "bytes": 1})
            for i in range(1000))
        for _ in range(int(os.environ["HOSTILE_ROUNDS"])):
            conn.sendall(block)
        log.write("flooded\n")
        session = next_open(conn, "exec")
        log.write("exec opened\n")
        chunk = frame({"type": "data", "session": session, "stream": "stdout"}, b"y" * 65536)
        try:
            # 16 MiB against a window of 256 KiB, ignoring credit.
            for _ in range(256):
                conn.sendall(chunk)
        except OSError:
            pass
        wait_closed(conn)
        log.write("disconnected after overrun\n")
    elif connections == 2:
        next_open(conn, "exec")
        conn.sendall(struct.pack(">II", 0xFFFFFFF0, 0))
        wait_closed(conn)
        log.write("disconnected after oversized frame\n")
    else:
        wait_closed(conn)
    conn.close()
"#;

fn daemon_pid(daemon: &TestDaemon) -> u32 {
    let needle = daemon.state_dir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let program = cmdline.split('\0').next().unwrap_or_default();
        if program.ends_with("/bangerd") && cmdline.contains(&needle) {
            return pid;
        }
    }
    panic!("bangerd of {needle} not found");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn wait_for_line(log: &Path, line: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|existing| existing == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the hostile agent never logged `{line}`; its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hostile_agent_loses_its_connection_and_the_daemon_serves_on() {
    let mut daemon = TestDaemon::new(&[]);
    daemon.with_agent();
    let script = daemon.dir.path().join("hostile-agent");
    std::fs::write(&script, HOSTILE_AGENT).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let flag = daemon.dir.path().join("hostile");
    let hostile_log = daemon.dir.path().join("hostile.log");
    daemon.set_env(
        "FAKE_FIRECRACKER_GUEST_AGENT_BIN",
        &script.display().to_string(),
    );
    daemon.set_env("REAL_AGENT", &binary("banger-agent").display().to_string());
    daemon.set_env("HOSTILE_FLAG", &flag.display().to_string());
    daemon.set_env("HOSTILE_LOG", &hostile_log.display().to_string());
    // 500 rounds of 2000 frames: a million frames, about 70 MB.
    daemon.set_env("HOSTILE_ROUNDS", "500");
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "good", "--image", "image", "--kernel", "kernel",
    ]);
    let pid = daemon_pid(&daemon);
    let before = rss_kib(pid);

    std::fs::write(&flag, "").unwrap();
    daemon.banger_ok(&[
        "vm", "create", "evil", "--image", "image", "--kernel", "kernel",
    ]);
    std::fs::remove_file(&flag).unwrap();
    wait_for_line(&hostile_log, "flooded", Duration::from_secs(300));
    let after_flood = rss_kib(pid);

    // Other VMs and RPCs are served meanwhile.
    let output = daemon.banger(&["vm", "run", "good", "--", "echo", "still here"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "still here\n");
    assert_eq!(daemon.vm("evil")["state"], "running");

    // A relayed session whose output overruns its window while the CLI
    // does not read: the daemon drops the agent connection (holding at most
    // one window) and the command fails.
    let mut stalled = daemon
        .command()
        .args(["vm", "run", "evil", "--", "cat", "/dev/zero"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(
        &hostile_log,
        "disconnected after overrun",
        Duration::from_secs(30),
    );
    let mut stdout = stalled.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let output = stalled.wait_with_output().unwrap();
    let relayed = reader.join().unwrap().unwrap();
    assert!(!output.status.success(), "{output:?}");
    // The guest sent 16 MiB; what reached the CLI is one window beyond what
    // the stalled CLI took (its pipe and the chunk it was writing).
    assert!(
        relayed < 1024 * 1024,
        "the CLI got {relayed} of the 16 MiB the guest sent"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("window"), "{stderr}");

    // The VM keeps running; the next use reconnects, and an oversized frame
    // ends that connection too.
    assert_eq!(daemon.vm("evil")["state"], "running");
    let output = daemon.banger(&["vm", "run", "evil", "--", "true"]);
    assert!(!output.status.success(), "{output:?}");
    wait_for_line(
        &hostile_log,
        "disconnected after oversized frame",
        Duration::from_secs(30),
    );
    assert_eq!(daemon.vm("evil")["state"], "running");

    let output = daemon.banger(&["vm", "run", "good", "--", "echo", "still here"]);
    assert!(output.status.success(), "{output:?}");
    daemon.banger_ok(&["vm", "list"]);
    let after = rss_kib(pid);
    eprintln!(
        "bangerd RSS: {before} KiB before the hostile agent, {after_flood} KiB after its flood, {after} KiB at the end"
    );
    assert!(
        after_flood < before + 32 * 1024 && after < before + 32 * 1024,
        "bangerd grew from {before} KiB to {after_flood} / {after} KiB"
    );

    daemon.banger_ok(&["vm", "delete", "--force", "evil"]);
    daemon.banger_ok(&["vm", "delete", "--force", "good"]);
    daemon.assert_no_leaks();
}

/// A "guest" that prints 256 KiB on its console (fake-firecracker's stdout,
/// which is `console.log`) each time the file named by `SPAM_FLAG` appears.
const CONSOLE_SPAMMER: &str = r#"#!/usr/bin/python3
import os, sys, time
# Drop the arguments naming the state dir: a restarted daemon kills
# processes that name it and that no VM accounts for.
if len(sys.argv) > 1:
    os.execv(sys.executable, [sys.executable, sys.argv[0]])
flag = os.environ["SPAM_FLAG"]
while True:
    if os.path.exists(flag):
        os.remove(flag)
        sys.stdout.write(("guest console line " + "z" * 100 + "\n") * 2100)
        sys.stdout.flush()
    time.sleep(0.05)
"#;

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_flooding_its_console_is_capped_also_after_a_daemon_restart() {
    let mut daemon = TestDaemon::new(&[]);
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        config.replace("[vm]\n", "[vm]\nconsole_log_max = \"64K\"\n"),
    )
    .unwrap();
    let script = daemon.dir.path().join("console-spammer");
    std::fs::write(&script, CONSOLE_SPAMMER).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let flag = daemon.dir.path().join("spam");
    daemon.set_env(
        "FAKE_FIRECRACKER_GUEST_AGENT_BIN",
        &script.display().to_string(),
    );
    daemon.set_env("SPAM_FLAG", &flag.display().to_string());
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "noisy", "--image", "image", "--kernel", "kernel",
    ]);
    let dir = daemon
        .state_dir
        .join("vms")
        .join(daemon.vm("noisy")["id"].as_str().unwrap());
    let console = dir.join("console.log");
    let rotated = dir.join("console.log.1");
    let size = |path: &Path| std::fs::metadata(path).map_or(0, |metadata| metadata.len());
    let cap = 64 * 1024;

    for round in ["first boot", "after a daemon restart"] {
        let _ = std::fs::remove_file(&rotated);
        std::fs::write(&flag, "").unwrap();
        wait_until("the guest to print", Duration::from_secs(10), || {
            !flag.exists()
        });
        wait_until(
            &format!("console.log to be rotated ({round})"),
            Duration::from_secs(10),
            || size(&rotated) == cap && size(&console) <= cap,
        );
        eprintln!(
            "{round}: the guest printed 256 KiB; console.log is {} bytes, console.log.1 {} bytes",
            size(&console),
            size(&rotated)
        );
        let tail = std::fs::read_to_string(&rotated).unwrap();
        assert!(tail.ends_with("z\n"), "{}", &tail[tail.len() - 40..]);
        // The VMM outlives the daemon; the restarted daemon adopts it and
        // watches its console again.
        daemon.kill9();
        daemon.start();
        assert_eq!(
            daemon.vm("noisy")["state"],
            "running",
            "{}",
            daemon.log_text()
        );
    }
    daemon.banger_ok(&["vm", "delete", "--force", "noisy"]);
    daemon.assert_no_leaks();
}
