//! The daemon end to end against fake-firecracker: a real `bangerd` in a
//! temp dir driven through the real `banger` CLI.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

fn methods_and_paths(requests: &[Value]) -> Vec<String> {
    requests
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

#[test]
fn create_list_show_stop_start_set_delete() {
    let daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();

    daemon.banger_ok(&[
        "vm", "create", "dev", "--image", "image", "--kernel", "kernel", "--vcpus", "2",
        "--memory", "512",
    ]);
    let list = daemon.banger_json(&["vm", "list"]);
    let vms = list.as_array().expect("array");
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    for field in [
        "id",
        "name",
        "state",
        "image",
        "kernel",
        "vcpus",
        "memory_mib",
        "pid",
        "created_at",
    ] {
        assert!(
            vm.get(field).is_some(),
            "vm list --json lacks {field}: {vm}"
        );
    }
    assert_eq!(vm["name"], "dev");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["image"], "image");
    assert_eq!(vm["kernel"], "kernel");
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["memory_mib"], 512);
    let id = vm["id"].as_str().unwrap().to_owned();
    let pid = vm["pid"].as_u64().expect("pid") as u32;
    assert_eq!(daemon.vmm_pids(), vec![pid]);

    // What banger sent Firecracker, in order, and the bodies.
    let requests = daemon.requests_of(&id);
    assert_eq!(
        methods_and_paths(&requests),
        [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /vsock",
            "PUT /actions"
        ]
    );
    assert!(
        requests.iter().all(|request| request["status"] == 204),
        "{requests:?}"
    );
    assert_eq!(requests[2]["body"]["vcpu_count"], 2);
    assert_eq!(requests[2]["body"]["mem_size_mib"], 512);
    let vm_dir = daemon.state_dir.join("vms").join(&id);
    assert_eq!(requests[4]["body"]["is_root_device"], true);
    assert_eq!(requests[5]["body"]["guest_cid"], 3);
    if daemon.jailed() {
        // Paths inside the chroot: the root disk hard-linked into it, the
        // guest agent's vsock socket made there.
        assert_eq!(requests[4]["body"]["path_on_host"], "/drive-rootfs");
        assert_eq!(requests[5]["body"]["uds_path"], "/vsock.sock");
        let chroot = daemon.jail_root(&id);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(chroot.join("drive-rootfs"))
                .unwrap()
                .ino(),
            std::fs::metadata(vm_dir.join("rootfs.ext4")).unwrap().ino()
        );
    } else {
        assert_eq!(
            requests[4]["body"]["path_on_host"],
            vm_dir.join("rootfs.ext4").display().to_string()
        );
        // The guest agent's channel: vsock with its host socket in the VM's dir.
        assert_eq!(
            requests[5]["body"]["uds_path"],
            vm_dir.join("vsock.sock").display().to_string()
        );
    }
    assert!(requests[3]["body"]["boot_args"]
        .as_str()
        .unwrap()
        .contains("banger.name=dev"));
    assert_eq!(requests[6]["body"]["action_type"], "InstanceStart");

    // Show by name and by id prefix.
    assert_eq!(daemon.vm("dev")["id"], id.as_str());
    assert_eq!(daemon.vm(&id[..8])["name"], "dev");

    // A running VM cannot be changed or deleted without force.
    let error = daemon.banger_err(&["vm", "set", "dev", "--vcpus", "4"]);
    assert!(error.contains("stopped VMs only"), "{error}");
    let error = daemon.banger_err(&["vm", "delete", "dev"]);
    assert!(error.contains("is running"), "{error}");

    daemon.banger_ok(&["vm", "stop", "dev"]);
    let vm = daemon.vm("dev");
    assert_eq!(vm["state"], "stopped");
    assert!(vm["pid"].is_null());
    assert!(daemon.vmm_pids().is_empty());
    let last = daemon.requests_of(&id).last().cloned().unwrap();
    assert_eq!(last["body"]["action_type"], "SendCtrlAltDel");

    // Sizes are bounded by the host: refused before anything changes.
    let error = daemon.banger_err(&["vm", "set", "dev", "--vcpus", "32"]);
    assert!(
        error.contains("vcpus 32 is more than the host's"),
        "{error}"
    );
    let error = daemon.banger_err(&["vm", "set", "dev", "--memory", "100000000"]);
    assert!(
        error.contains("memory_mib 100000000 is more than the host's memory (MemTotal"),
        "{error}"
    );
    let error = daemon.banger_err(&["vm", "set", "dev", "--disk-size", "1000T"]);
    assert!(error.contains("No space for a disk of 1000T"), "{error}");
    assert_eq!(daemon.vm("dev")["vcpus"], 2);

    daemon.banger_ok(&["vm", "set", "dev", "--vcpus", "1", "--memory", "1024"]);
    daemon.banger_ok(&["vm", "start", "dev"]);
    let vm = daemon.vm("dev");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpus"], 1);
    let machine_configs: Vec<Value> = daemon
        .requests_of(&id)
        .into_iter()
        .filter(|request| request["path"] == "/machine-config")
        .collect();
    assert_eq!(machine_configs.last().unwrap()["body"]["vcpu_count"], 1);
    assert_eq!(
        machine_configs.last().unwrap()["body"]["mem_size_mib"],
        1024
    );

    let old_pid = vm["pid"].as_u64().unwrap();
    daemon.banger_ok(&["vm", "restart", "dev"]);
    let vm = daemon.vm("dev");
    assert_eq!(vm["state"], "running");
    assert_ne!(vm["pid"].as_u64().unwrap(), old_pid);

    // Images and kernels in use cannot be removed.
    let error = daemon.banger_err(&["image", "rm", "image"]);
    assert!(error.contains("used by"), "{error}");

    daemon.banger_ok(&["vm", "delete", "dev", "--force"]);
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
    daemon.assert_no_leaks();
    daemon.banger_ok(&["image", "rm", "image"]);
    daemon.banger_ok(&["kernel", "rm", "kernel"]);
    assert_eq!(
        std::fs::read_dir(daemon.state_dir.join("images"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(daemon.state_dir.join("kernels"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn bad_names_duplicates_and_missing_artifacts_are_refused() {
    let daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    let error = daemon.banger_err(&[
        "vm", "create", "Bad_Name", "--image", "image", "--kernel", "kernel",
    ]);
    assert!(error.contains("Bad_Name"), "{error}");
    let error = daemon.banger_err(&[
        "vm", "create", "one", "--image", "nope", "--kernel", "kernel",
    ]);
    assert!(error.contains("No image named `nope`"), "{error}");
    daemon.banger_ok(&[
        "vm",
        "create",
        "one",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--no-start",
    ]);
    assert_eq!(daemon.vm("one")["state"], "stopped");
    assert!(daemon.vmm_pids().is_empty());
    let error = daemon.banger_err(&[
        "vm", "create", "one", "--image", "image", "--kernel", "kernel",
    ]);
    assert!(error.contains("already exists"), "{error}");
    let error = daemon.banger_err(&["image", "import", "bad", daemon.config.to_str().unwrap()]);
    assert!(error.contains("Cannot import"), "{error}");
    let error = daemon.banger_err(&["vm", "show", "ghost"]);
    assert!(error.contains("No VM named `ghost`"), "{error}");
    daemon.banger_ok(&["vm", "delete", "one"]);
    daemon.assert_no_leaks();
}

#[test]
fn ten_concurrent_creates_all_succeed() {
    let daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    let children: Vec<_> = (0..10)
        .map(|index| {
            daemon
                .command()
                .args([
                    "vm",
                    "create",
                    &format!("vm{index}"),
                    "--image",
                    "image",
                    "--kernel",
                    "kernel",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn banger")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let list = daemon.banger_json(&["vm", "list"]);
    let vms = list.as_array().unwrap();
    assert_eq!(vms.len(), 10);
    assert!(vms.iter().all(|vm| vm["state"] == "running"));
    let mut pids: Vec<u64> = vms.iter().map(|vm| vm["pid"].as_u64().unwrap()).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 10);
    assert_eq!(daemon.vmm_pids().len(), 10);
    for index in 0..10 {
        daemon.banger_ok(&["vm", "delete", &format!("vm{index}"), "--force"]);
    }
    daemon.assert_no_leaks();
}

#[test]
fn failed_firecracker_call_leaves_failed_vm_and_nothing_else() {
    let daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_FAIL", "PUT /drives/rootfs")]);
    daemon.import_fixtures();
    let output = daemon.banger(&[
        "vm", "create", "broken", "--image", "image", "--kernel", "kernel",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("injected failure"), "{stderr}");
    let vm = daemon.vm("broken");
    assert_eq!(vm["state"], "failed");
    assert!(
        vm["error"].as_str().unwrap().contains("injected failure"),
        "{vm}"
    );
    assert!(vm["pid"].is_null());
    // No process, no file: the operation rolled back.
    daemon.assert_no_leaks();
    let error = daemon.banger_err(&["vm", "start", "broken"]);
    assert!(error.contains("no usable root disk"), "{error}");
    daemon.banger_ok(&["vm", "delete", "broken"]);
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
}

#[test]
fn ctrl_c_mid_create_cancels_and_rolls_back() {
    let daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_DELAY", "PUT /actions=20000")]);
    daemon.import_fixtures();
    let mut child = daemon
        .command()
        .args([
            "vm", "create", "slow", "--image", "image", "--kernel", "kernel", "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // Wait until the boot stage has started: a VMM process exists then.
    loop {
        let line = lines.next().expect("stage events").unwrap();
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["stage"] == "boot" && event["status"] == "started" {
            break;
        }
    }
    assert_eq!(daemon.vmm_pids().len(), 1);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let rest: Vec<Value> = lines
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        rest.iter().any(|event| event["status"] == "rolled_back"),
        "{rest:?}"
    );
    assert!(rest
        .iter()
        .any(|event| event["event"] == "done" && event["operation"]["state"] == "cancelled"));
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
    daemon.assert_no_leaks();
}

#[test]
fn vmm_that_dies_marks_vm_crashed() {
    let daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS", "1000")]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "fragile", "--image", "image", "--kernel", "kernel",
    ]);
    let started = Instant::now();
    let vm = daemon.wait_for_state("fragile", "crashed", Duration::from_secs(10));
    eprintln!(
        "crash noticed {:?} after create returned",
        started.elapsed()
    );
    assert!(vm["pid"].is_null());
    assert!(
        vm["error"]
            .as_str()
            .unwrap()
            .contains("exited unexpectedly"),
        "{vm}"
    );
    assert!(daemon.vmm_pids().is_empty());
    // Its resources are released: the API socket the dead VMM left is gone.
    let api_socket = daemon
        .state_dir
        .join("vms")
        .join(vm["id"].as_str().unwrap())
        .join("firecracker.sock");
    assert!(!api_socket.exists(), "{} left behind", api_socket.display());
    // A crashed VM starts again.
    let mut daemon = daemon;
    daemon.kill9();
    daemon.remove_env("FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS");
    daemon.start();
    daemon.banger_ok(&["vm", "start", "fragile"]);
    assert_eq!(daemon.vm("fragile")["state"], "running");
    daemon.banger_ok(&["vm", "delete", "fragile", "--force"]);
    daemon.assert_no_leaks();
}

#[test]
fn sigkill_of_daemon_then_restart_readopts_running_vms() {
    let mut daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "survivor", "--image", "image", "--kernel", "kernel",
    ]);
    daemon.banger_ok(&[
        "vm", "create", "victim", "--image", "image", "--kernel", "kernel",
    ]);
    let survivor_pid = daemon.vm("survivor")["pid"].as_u64().unwrap();
    let victim_pid = daemon.vm("victim")["pid"].as_u64().unwrap();
    daemon.kill9();
    // While the daemon is down, one VMM dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    daemon.start();
    let survivor = daemon.vm("survivor");
    assert_eq!(survivor["state"], "running");
    assert_eq!(survivor["pid"].as_u64().unwrap(), survivor_pid);
    assert_eq!(daemon.vm("victim")["state"], "crashed");
    // The adopted VM is manageable: stop goes through its API socket.
    daemon.banger_ok(&["vm", "stop", "survivor"]);
    assert_eq!(daemon.vm("survivor")["state"], "stopped");
    assert!(daemon.vmm_pids().is_empty());
    daemon.banger_ok(&["vm", "delete", "survivor"]);
    daemon.banger_ok(&["vm", "delete", "victim"]);
    daemon.assert_no_leaks();
}

#[test]
fn adopted_vm_crash_is_still_noticed() {
    let mut daemon = TestDaemon::start_with(&[]);
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "adoptee", "--image", "image", "--kernel", "kernel",
    ]);
    let pid = daemon.vm("adoptee")["pid"].as_u64().unwrap();
    daemon.kill9();
    daemon.start();
    assert_eq!(daemon.vm("adoptee")["state"], "running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    daemon.wait_for_state("adoptee", "crashed", Duration::from_secs(5));
    daemon.banger_ok(&["vm", "delete", "adoptee"]);
    daemon.assert_no_leaks();
}

#[test]
fn create_interrupted_by_daemon_death_leaves_nothing() {
    let mut daemon = TestDaemon::start_with(&[("FAKE_FIRECRACKER_DELAY", "PUT /actions=20000")]);
    daemon.import_fixtures();
    let mut child = daemon
        .command()
        .args([
            "vm", "create", "halfway", "--image", "image", "--kernel", "kernel", "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let event: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if event["stage"] == "boot" && event["status"] == "started" {
            break;
        }
    }
    daemon.kill9();
    let _ = child.wait();
    daemon.remove_env("FAKE_FIRECRACKER_DELAY");
    daemon.start();
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
    daemon.assert_no_leaks();
    let operations = daemon.banger_json(&["operation", "list"]);
    assert_eq!(operations[0]["state"], "failed", "{operations}");
}

#[test]
fn malformed_rpc_gets_errors_and_the_daemon_keeps_serving() {
    let daemon = TestDaemon::start_with(&[]);
    let response = daemon.raw_call("this is not json");
    assert_eq!(response["error"]["code"], -32700);
    let response = daemon.raw_call(r#"{"jsonrpc":"2.0","id":1,"method":"vm.explode"}"#);
    assert_eq!(response["error"]["code"], -32601);
    assert_eq!(response["id"], 1);
    let response =
        daemon.raw_call(r#"{"jsonrpc":"2.0","id":2,"method":"vm.show","params":{"name":5}}"#);
    assert_eq!(response["error"]["code"], -32602);
    let response = daemon.raw_call(r#"{"jsonrpc":"1.0","id":3,"method":"vm.list"}"#);
    assert_eq!(response["error"]["code"], -32600);
    let response = daemon.raw_call(r#"[1,2,3]"#);
    assert_eq!(response["error"]["code"], -32600);
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":4,"method":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let response = daemon.raw_call(&huge);
    assert_eq!(response["error"]["code"], -32600);

    // Several calls on one connection, after a bad one.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    use std::io::Write;
    stream
        .write_all(b"{oops\n{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"daemon.status\"}\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let mut second = String::new();
    reader.read_line(&mut second).unwrap();
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["id"], 9);
    assert_eq!(second["result"]["version"], env!("CARGO_PKG_VERSION"));

    let status = daemon.banger_json(&["daemon", "status"]);
    assert!(
        status["backend"]
            .as_str()
            .unwrap()
            .starts_with("firecracker"),
        "{status}"
    );
    assert_eq!(status["vms"]["running"], 0);
    assert_eq!(status["state_dir"], daemon.state_dir.display().to_string());
}

#[test]
fn unauthorised_peer_is_refused_and_daemon_keeps_serving() {
    if !require_root("unauthorised_peer_is_refused_and_daemon_keeps_serving") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let daemon = TestDaemon::start_with(&[]);
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    // The mode keeps strangers out; open it up to reach the credential check.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = daemon
        .command()
        .args(["vm", "list"])
        .uid(65_534)
        .gid(65_534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not allowed"), "{stderr}");
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
}

#[test]
fn params_are_checked_against_the_method_types() {
    let daemon = TestDaemon::start_with(&[]);
    let response = daemon.raw_call(
        r#"{"jsonrpc":"2.0","id":1,"method":"vm.create","params":{"name":"x","backend":"foo"}}"#,
    );
    assert_eq!(response["error"]["code"], -32602, "{response}");
    assert_eq!(response["error"]["data"]["kind"], "invalid_params");
    assert_eq!(
        response["error"]["message"],
        "Invalid params: unknown variant `foo`, expected `firecracker` or `qemu`"
    );
    let response =
        daemon.raw_call(r#"{"jsonrpc":"2.0","id":2,"method":"vm.list","params":{"all":true}}"#);
    assert_eq!(response["error"]["code"], -32602, "{response}");
    assert_eq!(
        response["error"]["message"],
        r#"Invalid params: this method takes none, got {"all":true}"#
    );
    for accepted in [
        "",
        r#","params":null"#,
        r#","params":{}"#,
        r#","params":[]"#,
    ] {
        let response = daemon.raw_call(&format!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"vm.list"{accepted}}}"#
        ));
        assert_eq!(response["result"], Value::Array(vec![]), "{response}");
    }
    let response = daemon.raw_call(r#"{"jsonrpc":"2.0","id":4,"method":"vm.explode"}"#);
    assert_eq!(response["error"]["message"], "Unknown method `vm.explode`");
    // From the CLI, both mean a client of another version.
    assert!(
        response["error"]["data"]["hint"]
            .as_str()
            .is_some_and(|hint| hint.contains("banger --version")),
        "{response}"
    );
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
}

#[test]
fn bad_config_is_a_one_line_error_at_start() {
    let daemon = TestDaemon::new(&[]);
    std::fs::write(&daemon.config, "[vm]\nvcpus = 2\nturbo = true\n").unwrap();
    let output = std::process::Command::new(banger_testkit::test_daemon::binary("bangerd"))
        .arg("--state-dir")
        .arg(&daemon.state_dir)
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("--config")
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error"))
        .collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(error_lines[0].contains("unknown field `turbo`"), "{stderr}");
    assert!(!daemon.socket.exists());
}

#[test]
fn doctor_reports_checks_with_hints() {
    let daemon = TestDaemon::start_with(&[]);
    let output = daemon.banger(&["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).expect("doctor JSON");
    let checks = report["checks"].as_array().unwrap();
    let find = |name: &str| {
        checks
            .iter()
            .find(|check| check["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
    };
    let firecracker = find("firecracker");
    assert_eq!(firecracker["status"], "ok", "{firecracker}");
    assert!(firecracker["detail"]
        .as_str()
        .unwrap()
        .contains("Firecracker v1.17.0"));
    let image = find("default image");
    assert_eq!(image["status"], "warn");
    assert!(image["hint"]
        .as_str()
        .unwrap()
        .contains("banger image import default"));
    let any_fail = checks.iter().any(|check| check["status"] == "fail");
    assert_eq!(output.status.success(), !any_fail);
    daemon.import_fixtures();
    let text = String::from_utf8(daemon.banger(&["doctor"]).stdout).unwrap();
    assert!(text.contains("[ok  ] firecracker"), "{text}");
}

#[test]
fn daemon_death_while_the_vmm_is_being_configured_leaves_nothing() {
    // The pid is not recorded yet at this point: only the sweep of VMM
    // processes under the state dir can find this one.
    let mut daemon =
        TestDaemon::start_with(&[("FAKE_FIRECRACKER_DELAY", "PUT /machine-config=20000")]);
    daemon.import_fixtures();
    let mut child = daemon
        .command()
        .args([
            "vm", "create", "early", "--image", "image", "--kernel", "kernel", "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let event: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if event["stage"] == "start vmm" && event["status"] == "started" {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.vmm_pids().is_empty() {
        assert!(Instant::now() < deadline, "no VMM process appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill9();
    let _ = child.wait();
    daemon.remove_env("FAKE_FIRECRACKER_DELAY");
    daemon.start();
    assert_eq!(daemon.banger_json(&["vm", "list"]), Value::Array(vec![]));
    daemon.assert_no_leaks();
}

/// An XFS filesystem with reflink on a loop device, unmounted on drop.
struct XfsMount {
    dir: tempfile::TempDir,
    image: std::path::PathBuf,
}

impl XfsMount {
    fn new() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let image = dir.path().join("xfs.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(1 << 30))
            .map_err(|error| error.to_string())?;
        let run = |program: &str, args: &[&std::ffi::OsStr]| -> Result<(), String> {
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .map_err(|error| format!("{program}: {error}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        };
        run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                image.as_os_str(),
            ],
        )?;
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).map_err(|error| error.to_string())?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount_point.as_os_str(),
            ],
        )?;
        Ok(Self { dir, image })
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.path())
            .status();
        let _ = &self.image;
    }
}

#[test]
fn state_dir_on_xfs_clones_root_disks_by_reflink() {
    if !require_root("state_dir_on_xfs_clones_root_disks_by_reflink") {
        return;
    }
    let mount = match XfsMount::new() {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("SKIPPED state_dir_on_xfs_clones_root_disks_by_reflink: {reason}");
            return;
        }
    };
    {
        let mut daemon = TestDaemon::new(&[]);
        daemon.state_dir = mount.path().join("state");
        daemon.start();
        let status = daemon.banger_json(&["daemon", "status"]);
        assert!(
            status["clone_strategy"]
                .as_str()
                .unwrap()
                .starts_with("reflink"),
            "{status}"
        );
        daemon.import_fixtures();
        daemon.banger_ok(&[
            "vm", "create", "cow", "--image", "image", "--kernel", "kernel",
        ]);
        let operations = daemon.banger_json(&["operation", "list"]);
        let clone_stage = operations[0]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|stage| stage["stage"] == "clone root disk" && stage["status"] == "finished")
            .cloned()
            .unwrap();
        assert_eq!(clone_stage["message"], "reflink", "{clone_stage}");
        daemon.banger_ok(&["vm", "delete", "cow", "--force"]);
        daemon.assert_no_leaks();
    }
    drop(mount);
}

#[test]
fn images_import_from_tarballs_and_directories_and_refuse_escapes() {
    let daemon = TestDaemon::start_with(&[]);
    let tree = daemon.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "from-tar\n").unwrap();
    std::os::unix::fs::symlink("hostname", tree.join("etc/name-link")).unwrap();
    let tarball = daemon.dir.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let image =
        last(daemon.banger_json_lines(&["image", "import", "from-tar", tarball.to_str().unwrap()]));
    assert!(
        image["source"].as_str().unwrap().ends_with("(tar archive)"),
        "{image}"
    );
    assert!(image["digest"].as_str().unwrap().starts_with("sha256:"));
    // The built image holds the tree: read it back with debugfs.
    let listing = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/hostname"])
        .arg(image["path"].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listing.stdout), "from-tar\n");

    if nix::unistd::geteuid().is_root() {
        let image = last(daemon.banger_json_lines(&[
            "image",
            "import",
            "from-dir",
            tree.to_str().unwrap(),
        ]));
        assert!(
            image["source"].as_str().unwrap().ends_with("(directory)"),
            "{image}"
        );
    }

    // A tar whose entry climbs out of the root is refused, naming the entry,
    // and nothing is registered or left in the state dir.
    let hostile = daemon.dir.path().join("hostile.tar");
    {
        let mut builder = tar::Builder::new(std::fs::File::create(&hostile).unwrap());
        let mut header = tar::Header::new_gnu();
        let name = b"../escaped";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_size(4);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, &b"evil"[..]).unwrap();
        builder.finish().unwrap();
    }
    let error = daemon.banger_err(&["image", "import", "hostile", hostile.to_str().unwrap()]);
    assert!(error.contains("Refused to import"), "{error}");
    assert!(error.contains("escaped"), "{error}");
    let names: Vec<String> = daemon
        .banger_json(&["image", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|image| image["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.contains(&"hostile".to_owned()), "{names:?}");
    assert!(!daemon.dir.path().join("escaped").exists());
    assert!(!daemon.state_dir.join("escaped").exists());
    daemon.assert_no_leaks();
}

/// A catalog served over loopback HTTP: a real ext4 image and a stand-in
/// kernel, plus an entry whose checksum is wrong.
fn catalog_daemon() -> TestDaemon {
    catalog_daemon_with_defaults("default", "default")
}

/// A daemon whose catalog (served on loopback) lists images `base` and
/// `corrupt` and kernel `catkernel`; `image`/`kernel` are its defaults.
fn catalog_daemon_with_defaults(image: &str, kernel: &str) -> TestDaemon {
    use banger_testkit::test_daemon::{make_ext4, serve_directory, sha256_hex, write_fake_kernel};
    let mut daemon = TestDaemon::new(&[]);
    let site = daemon.dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    make_ext4(&site.join("base.ext4"), 32);
    write_fake_kernel(&site.join("vmlinux"));
    let image_sha = sha256_hex(&site.join("base.ext4"));
    let kernel_sha = sha256_hex(&site.join("vmlinux"));
    let image_size = std::fs::metadata(site.join("base.ext4")).unwrap().len();
    let catalog = format!(
        r#"[[images]]
name = "base"
version = "1"
url = "base.ext4"
size = {image_size}
sha256 = "{image_sha}"

[[images]]
name = "corrupt"
version = "1"
url = "base.ext4"
size = {image_size}
sha256 = "{zeros}"

[[kernels]]
name = "catkernel"
version = "6.1"
url = "vmlinux"
size = 4096
sha256 = "{kernel_sha}"
cmdline = "console=ttyS0 quiet"
"#,
        zeros = "0".repeat(64)
    );
    std::fs::write(site.join("catalog.toml"), catalog).unwrap();
    let port = serve_directory(&site);
    let mut config = std::fs::read_to_string(&daemon.config).unwrap().replace(
        "[vm]\n",
        &format!("[vm]\nimage = \"{image}\"\nkernel = \"{kernel}\"\n"),
    );
    config.push_str(&format!(
        "\n[catalog]\nurl = \"http://127.0.0.1:{port}/catalog.toml\"\nallow_insecure_http = true\n"
    ));
    std::fs::write(&daemon.config, config).unwrap();
    daemon.start();
    daemon
}

fn doctor_checks(daemon: &TestDaemon) -> Vec<Value> {
    let output = daemon.banger(&["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).expect("doctor JSON");
    report["checks"].as_array().unwrap().clone()
}

fn named<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

#[test]
fn doctor_checks_the_catalog_and_counts_pullable_defaults_as_ok() {
    let daemon = catalog_daemon_with_defaults("base", "nokernel");
    let checks = doctor_checks(&daemon);
    let catalog = named(&checks, "catalog");
    assert_eq!(catalog["status"], "ok", "{catalog}");
    assert!(
        catalog["detail"]
            .as_str()
            .unwrap()
            .contains("2 image(s), 1 kernel(s)"),
        "{catalog}"
    );
    let image = named(&checks, "default image");
    assert_eq!(image["status"], "ok", "{image}");
    assert!(
        image["detail"].as_str().unwrap().contains("in the catalog"),
        "{image}"
    );
    let kernel = named(&checks, "default kernel");
    assert_eq!(kernel["status"], "warn", "{kernel}");
    for tool in ["mkfs.ext4", "gpgv"] {
        let found = named(&checks, tool);
        assert!(
            found["status"] == "ok" || found["hint"].is_string(),
            "{found}"
        );
    }

    // A catalog nobody serves fails, naming the URL.
    let mut daemon = TestDaemon::new(&[]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut config = std::fs::read_to_string(&daemon.config).unwrap();
    config.push_str(&format!(
        "\n[catalog]\nurl = \"http://127.0.0.1:{port}/catalog.toml\"\nallow_insecure_http = true\n"
    ));
    std::fs::write(&daemon.config, config).unwrap();
    daemon.start();
    let checks = doctor_checks(&daemon);
    let catalog = named(&checks, "catalog");
    assert_eq!(catalog["status"], "fail", "{catalog}");
    assert!(
        catalog["detail"]
            .as_str()
            .unwrap()
            .contains(&port.to_string()),
        "{catalog}"
    );
    assert!(!daemon.banger(&["doctor"]).status.success());
}

#[test]
fn pulls_verify_and_register_or_leave_nothing() {
    let daemon = catalog_daemon();
    daemon.banger_ok(&["image", "pull", "base"]);
    let image = daemon.banger_json(&["image", "show", "base"]);
    let served = banger_testkit::test_daemon::sha256_hex(&daemon.dir.path().join("site/base.ext4"));
    assert_eq!(image["digest"], format!("sha256:{served}"));
    assert!(
        image["source"].as_str().unwrap().contains("catalog base 1"),
        "{image}"
    );
    let error = daemon.banger_err(&["image", "pull", "base"]);
    assert!(error.contains("already registered"), "{error}");

    let output = daemon.banger(&["image", "pull", "corrupt"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("mismatch"), "{stderr}");
    let error = daemon.banger_err(&["image", "show", "corrupt"]);
    assert!(error.contains("No image named `corrupt`"), "{error}");
    let error = daemon.banger_err(&["image", "pull", "nowhere"]);
    assert!(
        error.contains("No image `nowhere` in the catalog"),
        "{error}"
    );

    daemon.banger_ok(&["kernel", "pull", "catkernel"]);
    let kernel = daemon.banger_json(&["kernel", "show", "catkernel"]);
    assert_eq!(kernel["cmdline"], "console=ttyS0 quiet");
    let operations = daemon.banger_json(&["operation", "list"]);
    let kinds: Vec<(&str, &str)> = operations
        .as_array()
        .unwrap()
        .iter()
        .map(|operation| {
            (
                operation["kind"].as_str().unwrap(),
                operation["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(kinds.contains(&("image.pull", "failed")), "{kinds:?}");
    assert!(kinds.contains(&("kernel.pull", "succeeded")), "{kinds:?}");
    daemon.assert_no_leaks();
}

#[test]
fn create_pulls_a_catalog_image_as_a_stage() {
    let daemon = catalog_daemon();
    let output = daemon.banger(&[
        "vm",
        "create",
        "fresh",
        "--image",
        "base",
        "--kernel",
        "catkernel",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let finished: Vec<&str> = events
        .iter()
        .filter(|event| event["status"] == "finished")
        .map(|event| event["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        finished,
        [
            "pull image",
            "pull kernel",
            "resolve image",
            "clone root disk",
            "start vmm",
            "boot",
            "ready"
        ]
    );
    assert_eq!(daemon.vm("fresh")["state"], "running");
    assert!(daemon.banger_json(&["image", "show", "base"])["digest"].is_string());
    // A create whose pull fails leaves no VM and no image.
    let output = daemon.banger(&[
        "vm",
        "create",
        "broken",
        "--image",
        "corrupt",
        "--kernel",
        "catkernel",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(daemon
        .banger_err(&["vm", "show", "broken"])
        .contains("No VM named"));
    daemon.banger_ok(&["vm", "delete", "fresh", "--force"]);
    daemon.assert_no_leaks();
}

/// The last line of an event stream: what a long command made.
fn last(lines: Vec<serde_json::Value>) -> serde_json::Value {
    lines.into_iter().last().expect("an event stream")
}
