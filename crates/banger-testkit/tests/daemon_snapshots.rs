//! Pause, resume and snapshots through the real daemon and CLI, against
//! fake-firecracker (jailed by fake-jailer when run as root).

use std::path::PathBuf;
use std::time::Duration;

use banger_testkit::host_state::HostState;
use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

fn requests(daemon: &TestDaemon, vm_id: &str) -> Vec<String> {
    daemon
        .requests_of(vm_id)
        .iter()
        .map(|request| {
            format!(
                "{} {}",
                request["method"].as_str().unwrap_or_default(),
                request["path"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

fn snapshot_dirs(daemon: &TestDaemon) -> Vec<PathBuf> {
    std::fs::read_dir(daemon.state_dir.join("snapshots"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

#[test]
fn pause_resume_snapshot_list_show_rm() {
    if !require_root("pause_resume_snapshot_list_show_rm") {
        return;
    }
    let daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "src", "--image", "image", "--kernel", "kernel",
    ]);
    let id = daemon.vm("src")["id"].as_str().unwrap().to_owned();

    let paused = daemon.banger_json(&["vm", "pause", "src"]);
    assert_eq!(paused["state"], "paused");
    // Pausing twice is done already; the agent is refused while paused.
    assert_eq!(
        daemon.banger_json(&["vm", "pause", "src"])["state"],
        "paused"
    );
    let error = daemon.banger_err(&["vm", "run", "src", "--", "true"]);
    assert!(error.contains("VM `src` is paused"), "{error}");
    assert!(error.contains("banger vm resume src"), "{error}");
    assert_eq!(
        daemon.banger_json(&["vm", "resume", "src"])["state"],
        "running"
    );

    let snapshot = daemon.banger_json(&["vm", "snapshot", "src", "first"]);
    assert_eq!(snapshot["name"], "first");
    assert_eq!(snapshot["source_vm"], "src");
    assert_eq!(snapshot["image"], "image");
    assert_eq!(snapshot["kernel"], "kernel");
    assert_eq!(snapshot["backend"], "firecracker");
    assert_eq!(snapshot["backend_version"], "1.17.0");
    assert_eq!(snapshot["has_work_disk"], false);
    assert!(snapshot["size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(daemon.vm("src")["state"], "running");
    let tail: Vec<_> = requests(&daemon, &id)
        .into_iter()
        .rev()
        .take(6)
        .rev()
        .collect();
    assert_eq!(
        tail,
        [
            "PATCH /vm",
            "PATCH /vm",
            "PATCH /vm",
            "GET /",
            "PUT /snapshot/create",
            "PATCH /vm",
        ]
    );
    let dir = PathBuf::from(snapshot["dir"].as_str().unwrap());
    for file in ["vmstate", "memory", "rootfs.ext4"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is private: {mode:o}");
    }
    // A default name, then a taken one.
    let second = daemon.banger_json(&["vm", "snapshot", "src"]);
    assert_eq!(second["name"], "src-1");
    let error = daemon.banger_err(&["vm", "snapshot", "src", "first"]);
    assert!(error.contains("Snapshot `first` already exists"), "{error}");

    let list = daemon.banger_json(&["snapshot", "list"]);
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, [Value::from("first"), Value::from("src-1")]);
    let text = daemon.banger_ok(&["snapshot", "list"]);
    assert!(text.contains("SIZE") && text.contains("first"), "{text}");
    // `doctor` reports the space snapshots take.
    let output = daemon.banger(&["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "snapshots")
        .cloned()
        .unwrap();
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .starts_with("2 in the state dir, "),
        "{check}"
    );

    // The snapshot survives its source.
    daemon.banger_ok(&["vm", "delete", "src", "--force"]);
    assert_eq!(
        daemon.banger_json(&["snapshot", "show", "first"])["source_vm_id"],
        id
    );
    assert!(dir.join("memory").exists());

    daemon.banger_ok(&["snapshot", "rm", "first"]);
    daemon.banger_ok(&["snapshot", "rm", "src-1"]);
    let error = daemon.banger_err(&["snapshot", "show", "first"]);
    assert!(error.contains("No snapshot named `first`"), "{error}");
    assert_eq!(snapshot_dirs(&daemon), Vec::<PathBuf>::new());
    daemon.assert_no_leaks();
}

#[test]
fn a_failed_snapshot_resumes_the_vm_and_registers_nothing() {
    if !require_root("a_failed_snapshot_resumes_the_vm_and_registers_nothing") {
        return;
    }
    let daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_FAIL", "PUT /snapshot/create")]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "src", "--image", "image", "--kernel", "kernel",
    ]);
    let error = daemon.banger_err(&["vm", "snapshot", "src", "broken"]);
    assert!(
        error.contains("Could not write the snapshot of VM `src`"),
        "{error}"
    );
    assert!(error.contains("injected failure"), "{error}");
    assert_eq!(daemon.vm("src")["state"], "running");
    let id = daemon.vm("src")["id"].as_str().unwrap().to_owned();
    assert_eq!(requests(&daemon, &id).last().unwrap(), "PATCH /vm");
    assert_eq!(
        daemon.banger_json(&["snapshot", "list"]),
        Value::Array(vec![])
    );
    assert_eq!(snapshot_dirs(&daemon), Vec::<PathBuf>::new());

    // A stopped VM has nothing to snapshot.
    daemon.banger_ok(&["vm", "stop", "src"]);
    let error = daemon.banger_err(&["vm", "snapshot", "src"]);
    assert!(error.contains("VM `src` is stopped"), "{error}");
    daemon.banger_ok(&["vm", "delete", "src"]);
    let _ = Duration::ZERO;
    daemon.assert_no_leaks();
}

fn body_of(daemon: &TestDaemon, vm_id: &str, path: &str) -> Value {
    daemon
        .requests_of(vm_id)
        .into_iter()
        .find(|request| request["path"] == path)
        .map(|request| request["body"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn create_from_snapshot_restores_with_its_own_disk_and_survives_snapshot_rm() {
    if !require_root("create_from_snapshot_restores_with_its_own_disk_and_survives_snapshot_rm") {
        return;
    }
    let daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "src", "--image", "image", "--kernel", "kernel",
    ]);
    let snapshot = daemon.banger_json(&["vm", "snapshot", "src", "base"]);

    // Everything but the name is the snapshot's.
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "bad",
        "--from-snapshot",
        "base",
        "--memory",
        "512",
    ]);
    assert!(error.contains("cannot be used with"), "{error}");
    let error = daemon.banger_err(&["vm", "create", "bad", "--from-snapshot", "nothing"]);
    assert!(error.contains("No snapshot named `nothing`"), "{error}");

    let output = daemon.banger_ok(&["vm", "create", "copy", "--from-snapshot", "base", "--json"]);
    let stages: Vec<String> = output
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|frame| frame["status"] == "finished")
        .filter_map(|frame| frame["stage"].as_str().map(str::to_owned))
        .collect();
    assert!(stages.contains(&"restore".to_owned()), "{output}");
    assert!(!stages.contains(&"boot".to_owned()), "{output}");
    let copy = daemon.vm("copy");
    assert_eq!(copy["state"], "running");
    assert_eq!(copy["image"], "image");
    assert_eq!(copy["memory_mib"], snapshot["memory_mib"]);
    let copy_id = copy["id"].as_str().unwrap().to_owned();
    assert_eq!(
        requests(&daemon, &copy_id),
        ["PUT /logger", "PUT /metrics", "GET /", "PUT /snapshot/load"]
    );
    let load = body_of(&daemon, &copy_id, "/snapshot/load");
    assert_eq!(load["resume_vm"], true);
    assert_eq!(load["mem_backend"]["backend_type"], "File");
    assert_eq!(load["vsock_override"]["uds_path"], "/vsock.sock");
    // Its root disk is its own clone of the snapshot's copy.
    let copy_disk = PathBuf::from(copy["dir"].as_str().unwrap()).join("rootfs.ext4");
    let snapshot_disk = PathBuf::from(snapshot["dir"].as_str().unwrap()).join("rootfs.ext4");
    assert_eq!(
        std::fs::read(&copy_disk).unwrap(),
        std::fs::read(&snapshot_disk).unwrap()
    );

    // A snapshot of the copy is a new one: the files the copy was
    // restored from (linked into its jail) are not written over.
    let memory = PathBuf::from(snapshot["dir"].as_str().unwrap()).join("memory");
    let original = std::fs::read(&memory).unwrap();
    let second = daemon.banger_json(&["vm", "snapshot", "copy", "of-copy"]);
    assert_eq!(std::fs::read(&memory).unwrap(), original);
    let second_memory = PathBuf::from(second["dir"].as_str().unwrap()).join("memory");
    assert!(
        String::from_utf8_lossy(&std::fs::read(&second_memory).unwrap())
            .starts_with(&format!("fake guest memory of {copy_id}")),
        "the copy's own memory"
    );
    assert_eq!(daemon.vm("copy")["state"], "running");
    daemon.banger_ok(&["snapshot", "rm", "of-copy"]);

    // Removing the snapshot is safe while the copy runs: the copy keeps
    // its own disk and its own link to the memory.
    daemon.banger_ok(&["snapshot", "rm", "base"]);
    assert!(copy_disk.exists());
    assert_eq!(daemon.vm("copy")["state"], "running");
    let pid = daemon.vm("copy")["pid"].as_u64().unwrap() as u32;
    assert!(daemon.vmm_pids().contains(&pid));
    daemon.banger_ok(&["vm", "stop", "copy"]);
    daemon.banger_ok(&["vm", "start", "copy"]);
    assert_eq!(daemon.vm("copy")["state"], "running");

    for vm in ["copy", "src"] {
        daemon.banger_ok(&["vm", "delete", vm, "--force"]);
    }
    daemon.assert_no_leaks();
}

#[test]
fn fork_makes_copies_and_a_failed_load_rolls_back() {
    if !require_root("fork_makes_copies_and_a_failed_load_rolls_back") {
        return;
    }
    let mut daemon = TestDaemon::new(&[]);
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "src", "--image", "image", "--kernel", "kernel",
    ]);
    daemon.banger_ok(&["vm", "fork", "src", "twin", "--count", "2"]);
    for name in ["twin-1", "twin-2"] {
        assert_eq!(daemon.vm(name)["state"], "running", "{name}");
    }
    assert_eq!(daemon.vm("src")["state"], "running");
    // The fork's snapshot is gone again.
    assert_eq!(
        daemon.banger_json(&["snapshot", "list"]),
        Value::Array(vec![])
    );
    assert_eq!(snapshot_dirs(&daemon), Vec::<PathBuf>::new());

    // A load Firecracker refuses: the create fails and is rolled back.
    daemon.banger_ok(&["vm", "snapshot", "src", "base"]);
    daemon.terminate();
    daemon.set_env("FAKE_FIRECRACKER_FAIL", "PUT /snapshot/load");
    daemon.start();
    let error = daemon.banger_err(&["vm", "create", "broken", "--from-snapshot", "base"]);
    assert!(
        error.contains("Could not restore VM `broken` from snapshot `base`"),
        "{error}"
    );
    assert!(error.contains("injected failure"), "{error}");
    let broken = daemon.vm("broken");
    assert_eq!(broken["state"], "failed");
    assert!(
        !PathBuf::from(broken["dir"].as_str().unwrap()).exists(),
        "its files are gone"
    );
    daemon.banger_ok(&["vm", "delete", "broken"]);
    daemon.banger_ok(&["snapshot", "rm", "base"]);
    for vm in ["twin-1", "twin-2", "src"] {
        daemon.banger_ok(&["vm", "delete", vm, "--force"]);
    }
    let _ = Duration::ZERO;
    daemon.assert_no_leaks();
}

/// The finished `agent ready` stage frame of a create or start's `--json` output.
fn agent_ready(output: &str) -> String {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|frame| frame["status"] == "finished" && frame["stage"] == "agent ready")
        .map(|frame| frame.to_string())
        .unwrap_or_default()
}

#[test]
fn a_restored_vms_agent_takes_its_identity_before_it_is_ready() {
    if !require_root("a_restored_vms_agent_takes_its_identity_before_it_is_ready") {
        return;
    }
    let mut daemon = TestDaemon::new(&[]);
    // The test agents' stand-in for /etc/ssh (every fake guest shares it).
    let ssh_dir = daemon.with_agent();
    let host_key = || std::fs::read_to_string(ssh_dir.join("ssh_host_ed25519_key.pub")).unwrap();
    let source_key = host_key();
    daemon.start();
    daemon.import_fixtures();
    let output = daemon.banger_ok(&[
        "vm", "create", "src", "--image", "image", "--kernel", "kernel", "--json",
    ]);
    // A booted VM is itself: nothing to hand over.
    let ready = agent_ready(&output);
    assert!(!ready.is_empty(), "{output}");
    assert!(!ready.contains("identity"), "{ready}");
    daemon.banger_ok(&["vm", "snapshot", "src", "base"]);

    let output = daemon.banger_ok(&["vm", "create", "copy", "--from-snapshot", "base", "--json"]);
    let ready = agent_ready(&output);
    assert!(ready.contains("identity applied (generation "), "{output}");
    // The copy's agent serves as usual once it took the identity.
    let run = daemon.banger_ok(&["vm", "run", "copy", "--", "echo", "copy"]);
    assert_eq!(run.trim(), "copy");
    // By default the copy keeps the snapshot's SSH host keys.
    assert_eq!(host_key(), source_key);

    // With --regen-host-keys the agent makes new ones before it is ready.
    let error = daemon.banger_err(&["vm", "create", "plain", "--regen-host-keys"]);
    assert!(error.contains("--from-snapshot"), "{error}");
    daemon.banger_ok(&[
        "vm",
        "create",
        "rekeyed",
        "--from-snapshot",
        "base",
        "--regen-host-keys",
    ]);
    let new_key = host_key();
    assert_ne!(new_key, source_key);
    assert!(new_key.starts_with("ssh-ed25519 "), "{new_key}");
    assert!(new_key.trim_end().ends_with(" root@rekeyed"), "{new_key}");
    assert!(ssh_dir.join("ssh_host_ed25519_key").is_file());
    daemon.banger_ok(&["vm", "delete", "rekeyed", "--force"]);

    // Started again, it boots as itself.
    daemon.banger_ok(&["vm", "stop", "copy"]);
    daemon.banger_ok(&["vm", "start", "copy"]);
    let run = daemon.banger_ok(&["vm", "run", "copy", "--", "echo", "again"]);
    assert_eq!(run.trim(), "again");

    for vm in ["copy", "src"] {
        daemon.banger_ok(&["vm", "delete", vm, "--force"]);
    }
    daemon.banger_ok(&["snapshot", "rm", "base"]);
    daemon.assert_no_leaks();
}

fn work_disk(daemon: &TestDaemon, name: &str) -> Option<Value> {
    daemon
        .banger_json(&["disk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|disk| disk["name"] == name)
        .cloned()
}

#[test]
fn a_snapshot_with_a_work_disk_restores_into_a_copy_of_it() {
    if !require_root("a_snapshot_with_a_work_disk_restores_into_a_copy_of_it") {
        return;
    }
    let mut daemon = TestDaemon::new(&[]);
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm",
        "create",
        "src",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--work-disk",
        "64M",
    ]);
    // What the guest wrote to its work disk before the snapshot.
    let source_disk = PathBuf::from(
        work_disk(&daemon, "src-work").unwrap()["path"]
            .as_str()
            .unwrap(),
    );
    {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&source_disk)
            .unwrap();
        file.seek(std::io::SeekFrom::Start(40 << 20)).unwrap();
        file.write_all(b"written before the snapshot").unwrap();
    }
    let snapshot = daemon.banger_json(&["vm", "snapshot", "src", "base"]);
    assert_eq!(snapshot["has_work_disk"], true);
    let snapshot_disk = PathBuf::from(snapshot["dir"].as_str().unwrap()).join("work.ext4");
    assert_eq!(
        std::fs::read(&snapshot_disk).unwrap(),
        std::fs::read(&source_disk).unwrap()
    );

    // A work disk of its own cannot be asked for: it has the snapshot's.
    let error = daemon.banger_err(&[
        "vm",
        "create",
        "bad",
        "--from-snapshot",
        "base",
        "--work-disk",
        "64M",
    ]);
    assert!(error.contains("cannot be used with"), "{error}");

    let output = daemon.banger_ok(&["vm", "create", "copy", "--from-snapshot", "base", "--json"]);
    assert!(
        output.contains("copied from the snapshot: copy-work"),
        "{output}"
    );
    let copy = daemon.vm("copy");
    assert_eq!(copy["state"], "running");
    assert_eq!(copy["work_disk"], "copy-work");
    let disk = work_disk(&daemon, "copy-work").unwrap();
    assert_eq!(disk["vm"], "copy");
    let copy_disk = PathBuf::from(disk["path"].as_str().unwrap());
    assert_ne!(copy_disk, source_disk);
    assert_eq!(
        std::fs::read(&copy_disk).unwrap(),
        std::fs::read(&snapshot_disk).unwrap()
    );
    // Firecracker reopened the drives the snapshot recorded: the copy's, in its jail.
    let copy_id = copy["id"].as_str().unwrap().to_owned();
    assert_eq!(
        requests(&daemon, &copy_id).last().unwrap(),
        "PUT /snapshot/load"
    );
    // Its disk is its own: the source's writes after the snapshot are not in it.
    std::fs::write(&source_disk, b"after").unwrap();
    assert_ne!(std::fs::read(&copy_disk).unwrap(), b"after");

    // A failed restore rolls its work disk back with the rest.
    daemon.terminate();
    daemon.set_env("FAKE_FIRECRACKER_FAIL", "PUT /snapshot/load");
    daemon.start();
    let before = HostState::capture(&daemon).without(&["store:operations", "store:vms"]);
    let error = daemon.banger_err(&["vm", "create", "broken", "--from-snapshot", "base"]);
    assert!(error.contains("Could not restore VM `broken`"), "{error}");
    assert_eq!(work_disk(&daemon, "broken-work"), None);
    // A failed create keeps only its row (with the error), as a failed
    // plain create does: no files, disks, processes or devices.
    assert_eq!(daemon.vm("broken")["state"], "failed");
    before.assert_same(
        &HostState::capture(&daemon).without(&["store:operations", "store:vms"]),
        "failed restore",
    );
    daemon.banger_ok(&["vm", "delete", "broken"]);
    daemon.terminate();
    daemon.remove_env("FAKE_FIRECRACKER_FAIL");
    daemon.start();

    // Deleted with its VM.
    daemon.banger_ok(&["vm", "delete", "copy", "--force"]);
    assert_eq!(work_disk(&daemon, "copy-work"), None);
    assert!(!copy_disk.exists());
    daemon.banger_ok(&["vm", "delete", "src", "--force"]);
    daemon.banger_ok(&["snapshot", "rm", "base"]);
    daemon.assert_no_leaks();
}
