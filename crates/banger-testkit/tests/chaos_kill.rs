//! Kill at every step: bangerd, started with `BANGER_FAULT_PAUSE_AT=POINT`,
//! pauses at that point of an operation (a create step, start, stop,
//! delete, disk resize, image or kernel import) and says so on stderr; the
//! test then `kill -9`s it there, restarts it, and checks:
//! - the VM that was running before still runs with the same VMM pid;
//! - the interrupted operation completed or left nothing (settled by the
//!   matching command where it completed);
//! - the host state ([`HostState`]) is what it was before, except for
//!   what the VM the operation targeted owns, and except the operation log.
//!
//! Each point runs `BANGER_CHAOS_ITERATIONS` times (5 unless set; 100 in
//! the long run).
//!
//! Snapshots: every step of `vm snapshot` (of `survivor`, which must then
//! run again: resumed) and of `vm create --from-snapshot` (of a snapshot
//! holding a work disk).

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::host_state::HostState;
use banger_testkit::test_daemon::TestDaemon;

const PAUSE_VAR: &str = "BANGER_FAULT_PAUSE_AT";

fn iterations() -> usize {
    std::env::var("BANGER_CHAOS_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5)
}

/// A daemon with fixtures and one VM, `survivor`, running throughout.
struct Harness {
    daemon: TestDaemon,
    survivor_pid: u64,
    kills: usize,
}

impl Harness {
    fn new() -> Self {
        let mut daemon = TestDaemon::start_with(&[]);
        daemon.import_fixtures();
        daemon.banger_ok(&[
            "vm", "create", "survivor", "--image", "image", "--kernel", "kernel",
        ]);
        let survivor_pid = daemon.vm("survivor")["pid"].as_u64().expect("pid");
        // The daemon restarts below with and without the pause point.
        daemon.kill9();
        daemon.start();
        Self {
            daemon,
            survivor_pid,
            kills: 0,
        }
    }

    fn snapshot(&self) -> HostState {
        HostState::capture(&self.daemon).without(&["store:operations"])
    }

    /// Restarts the daemon paused at `point`, runs `banger ARGS`, waits
    /// until the daemon reports the point reached, kills it with SIGKILL
    /// and restarts it without the point.
    fn kill_at(&mut self, point: &str, args: &[&str]) {
        self.daemon.kill9();
        self.daemon.set_env(PAUSE_VAR, point);
        self.daemon.start();
        let offset = self.daemon.log_text().len();
        let mut client: Child = self
            .daemon
            .command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run banger");
        let announcement = format!("fault point {point} reached");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.daemon.log_text();
            if log
                .get(offset..)
                .unwrap_or_default()
                .contains(&announcement)
            {
                break;
            }
            if let Ok(Some(status)) = client.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = client.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!(
                    "banger {args:?} ended ({status}) before {point} was reached: {stderr}\nlog:\n{}",
                    log.get(offset..).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{point} not reached within 20 s; log:\n{}",
                log.get(offset..).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.daemon.kill9();
        let _ = client.kill();
        let _ = client.wait();
        self.kills += 1;
        self.daemon.remove_env(PAUSE_VAR);
        self.daemon.start();
        let survivor = self.daemon.vm("survivor");
        assert_eq!(survivor["state"], "running", "{point}: {survivor}");
        assert_eq!(
            survivor["pid"].as_u64(),
            Some(self.survivor_pid),
            "{point}: the surviving VM's VMM changed"
        );
    }

    fn vm_names(&self) -> Vec<String> {
        self.daemon
            .banger_json(&["vm", "list"])
            .as_array()
            .expect("array")
            .iter()
            .map(|vm| vm["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn has_vm(&self, name: &str) -> bool {
        self.vm_names().iter().any(|existing| existing == name)
    }

    fn vm_id(&self, name: &str) -> String {
        self.daemon.vm(name)["id"].as_str().expect("id").to_owned()
    }

    /// No VMM process runs for `id`, jailed or not.
    fn assert_no_vmm_for(&self, id: &str, context: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let processes = HostState::capture(&self.daemon).lines("process");
            let left: Vec<&String> = processes.iter().filter(|line| line.contains(id)).collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: processes of {id} left: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn create_args(name: &str) -> Vec<String> {
    [
        "vm",
        "create",
        name,
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--work-disk",
        "64M",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The create steps with the fake (no network, no agent wait): every
/// capability's prepare, the VMM, boot, ready.
const CREATE_STEPS: [&str; 7] = [
    "resolve image",
    "clone root disk",
    "prepare work disk",
    "prepare agent",
    "start vmm",
    "boot",
    "ready",
];

/// Kills the daemon at `create:STEP{suffix}` for every step; the victim
/// create is gone each time and the host as it was.
fn kill_at_every_create_step(suffix: &str) {
    let mut harness = Harness::new();
    let args = create_args("victim");
    for step in CREATE_STEPS {
        let point = format!("create:{step}{suffix}");
        for round in 0..iterations() {
            let context = format!("{point} #{round}");
            let before = harness.snapshot();
            harness.kill_at(&point, &strs(&args));
            // An interrupted create is removed with all it made.
            assert!(!harness.has_vm("victim"), "{context}: victim survived");
            before.assert_same(&harness.snapshot(), &context);
        }
    }
    // And a create runs normally afterwards.
    harness.daemon.banger_ok(&strs(&args));
    harness
        .daemon
        .banger_ok(&["vm", "delete", "victim", "--force"]);
    eprintln!("create{suffix}: {} kills survived", harness.kills);
}

#[test]
fn kill_as_each_create_step_begins_leaves_nothing_but_finished_vms() {
    kill_at_every_create_step("");
}

#[test]
fn kill_as_each_create_step_ends_leaves_nothing_but_finished_vms() {
    kill_at_every_create_step(":done");
}

#[test]
fn kill_during_start_stop_and_delete_keeps_the_vm_consistent() {
    let mut harness = Harness::new();
    let mut kills = 0;
    harness.daemon.banger_ok(&[
        "vm",
        "create",
        "target",
        "--image",
        "image",
        "--kernel",
        "kernel",
        "--no-start",
    ]);
    for point in ["start:spawn vmm", "start:boot", "start:after boot"] {
        for round in 0..iterations() {
            let context = format!("{point} #{round}");
            let id = harness.vm_id("target");
            let before = harness.snapshot();
            harness.kill_at(point, &["vm", "start", "target"]);
            kills += 1;
            let vm = harness.daemon.vm("target");
            match vm["state"].as_str().unwrap_or_default() {
                "running" => {
                    harness.daemon.banger_ok(&["vm", "stop", "target"]);
                }
                // The start did not finish: no VMM of it remains.
                _ => harness.assert_no_vmm_for(&id, &context),
            }
            // It can start and stop again.
            harness.daemon.banger_ok(&["vm", "start", "target"]);
            harness.daemon.banger_ok(&["vm", "stop", "target"]);
            assert_eq!(harness.daemon.vm("target")["state"], "stopped", "{context}");
            harness.assert_no_vmm_for(&id, &context);
            // What the VM owns (its row, its logs) may differ.
            before.clone().without_lines_containing(&[&id]).assert_same(
                &harness.snapshot().without_lines_containing(&[&id]),
                &context,
            );
        }
    }
    // `vm set --disk-size` between growing the file and recording it.
    for round in 0..iterations() {
        let context = format!("vm resize:record #{round}");
        let id = harness.vm_id("target");
        let size = harness.daemon.vm("target")["disk_bytes"]
            .as_u64()
            .expect("disk_bytes");
        let text = format!("{}M", (size >> 20) + 1);
        harness.kill_at(
            "vm resize:record",
            &["vm", "set", "target", "--disk-size", &text],
        );
        kills += 1;
        let recorded = harness.daemon.vm("target")["disk_bytes"]
            .as_u64()
            .expect("disk_bytes");
        let root = harness
            .daemon
            .state_dir
            .join("vms")
            .join(&id)
            .join("rootfs.ext4");
        let actual = std::fs::metadata(&root).expect("root disk").len();
        assert_eq!(
            actual, recorded,
            "{context}: the root disk and its row disagree"
        );
    }
    for point in ["stop:stop vmm", "stop:record"] {
        for round in 0..iterations() {
            let context = format!("{point} #{round}");
            harness.daemon.banger_ok(&["vm", "start", "target"]);
            let id = harness.vm_id("target");
            let before = harness.snapshot();
            harness.kill_at(point, &["vm", "stop", "target"]);
            kills += 1;
            let vm = harness.daemon.vm("target");
            match vm["state"].as_str().unwrap_or_default() {
                "running" => {
                    // Still running: the same VMM, re-adopted.
                    let pid = vm["pid"].as_u64().expect("pid");
                    assert!(
                        banger_vmm::process::is_running(u32::try_from(pid).unwrap()),
                        "{context}: {vm}"
                    );
                }
                _ => harness.assert_no_vmm_for(&id, &context),
            }
            harness.daemon.banger_ok(&["vm", "stop", "target"]);
            harness.assert_no_vmm_for(&id, &context);
            before.clone().without_lines_containing(&[&id]).assert_same(
                &harness.snapshot().without_lines_containing(&[&id]),
                &context,
            );
        }
    }
    for point in [
        "delete:discard process",
        "delete:release",
        "delete:remove disk",
        "delete:forget row",
    ] {
        for round in 0..iterations() {
            let context = format!("{point} #{round}");
            let before = harness.snapshot();
            harness.daemon.banger_ok(&strs(&create_args("doomed")));
            let id = harness.vm_id("doomed");
            harness.kill_at(point, &["vm", "delete", "doomed", "--force"]);
            kills += 1;
            if harness.has_vm("doomed") {
                // Not deleted yet: the delete completes now.
                harness
                    .daemon
                    .banger_ok(&["vm", "delete", "doomed", "--force"]);
            }
            harness.assert_no_vmm_for(&id, &context);
            before.assert_same(&harness.snapshot(), &context);
        }
    }
    harness.daemon.banger_ok(&["vm", "delete", "target"]);
    eprintln!("start/stop/delete: {kills} kills survived");
}

#[test]
fn kill_during_disk_resize_and_imports_leaves_nothing_half_done() {
    let mut harness = Harness::new();
    let mut kills = 0;
    harness
        .daemon
        .banger_ok(&["disk", "create", "scratch", "64M"]);
    let mut size: u64 = 64 << 20;
    for point in ["disk resize:grow", "disk resize:record"] {
        for round in 0..iterations() {
            let context = format!("{point} #{round}");
            let new_size = size + (1 << 20);
            let text = format!("{}M", new_size >> 20);
            harness.kill_at(point, &["disk", "resize", "scratch", &text]);
            kills += 1;
            let disks = harness.daemon.banger_json(&["disk", "list"]);
            let disk = disks
                .as_array()
                .expect("array")
                .iter()
                .find(|disk| disk["name"] == "scratch")
                .expect("the disk is still there")
                .clone();
            let recorded = disk["size_bytes"].as_u64().expect("size_bytes");
            let path = disk["path"].as_str().expect("path");
            let actual = std::fs::metadata(path).expect("disk file").len();
            assert!(
                recorded == size || recorded == new_size,
                "{context}: recorded {recorded}"
            );
            assert_eq!(
                actual, recorded,
                "{context}: the disk file and its row disagree on its size"
            );
            // The resize can be asked again and completes.
            harness
                .daemon
                .banger_ok(&["disk", "resize", "scratch", &text]);
            size = new_size;
        }
    }
    harness.daemon.banger_ok(&["disk", "rm", "scratch"]);

    let image = harness.daemon.dir.path().join("chaos.ext4");
    banger_testkit::test_daemon::make_ext4(&image, 16);
    let kernel = harness.daemon.dir.path().join("chaos-vmlinux");
    banger_testkit::test_daemon::write_fake_kernel(&kernel);
    let imports = [
        (
            "image",
            image.to_str().expect("utf-8"),
            [
                "image import:copy",
                "image import:move",
                "image import:register",
            ]
            .as_slice(),
        ),
        (
            "kernel",
            kernel.to_str().expect("utf-8"),
            ["kernel import:copy", "kernel import:register"].as_slice(),
        ),
    ];
    for (kind, source, points) in imports {
        for point in points {
            for round in 0..iterations() {
                let context = format!("{point} #{round}");
                let before = harness.snapshot();
                harness.kill_at(point, &[kind, "import", "chaos", source]);
                kills += 1;
                let listed = harness.daemon.banger_json(&[kind, "list"]);
                let registered = listed
                    .as_array()
                    .expect("array")
                    .iter()
                    .any(|item| item["name"] == "chaos");
                if registered {
                    harness.daemon.banger_ok(&[kind, "rm", "chaos"]);
                }
                before.assert_same(&harness.snapshot(), &context);
                // The import works afterwards.
                harness.daemon.banger_ok(&[kind, "import", "chaos", source]);
                harness.daemon.banger_ok(&[kind, "rm", "chaos"]);
            }
        }
    }
    eprintln!("disk resize/imports: {kills} kills survived");
}

/// The last `PATCH /vm` the VM's Firecracker took set this state.
fn last_vm_state(harness: &Harness, vm_id: &str) -> String {
    harness
        .daemon
        .requests_of(vm_id)
        .iter()
        .rev()
        .find(|request| request["method"] == "PATCH" && request["path"] == "/vm")
        .and_then(|request| request["body"]["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn kill_at_each_snapshot_step_resumes_the_source_and_registers_whole_snapshots_only() {
    let mut harness = Harness::new();
    let mut kills = 0;
    let survivor_id = harness.vm_id("survivor");
    // The snapshots directory itself stays once made.
    harness
        .daemon
        .banger_ok(&["vm", "snapshot", "survivor", "chaos"]);
    harness.daemon.banger_ok(&["snapshot", "rm", "chaos"]);
    for point in [
        "snapshot:pause",
        "snapshot:write",
        "snapshot:copy disks",
        "snapshot:register",
        "snapshot:resume",
    ] {
        for round in 0..iterations() {
            let context = format!("{point} #{round}");
            let before = harness.snapshot();
            // `kill_at` checks the source runs again with the same VMM.
            harness.kill_at(point, &["vm", "snapshot", "survivor", "chaos"]);
            kills += 1;
            assert_eq!(
                last_vm_state(&harness, &survivor_id),
                "Resumed",
                "{context}: the source's vCPUs were left paused"
            );
            let snapshots = harness.daemon.banger_json(&["snapshot", "list"]);
            let registered = snapshots.as_array().expect("array");
            if let Some(snapshot) = registered.first() {
                // Registered means whole.
                assert_eq!(point, "snapshot:resume", "{context}: {snapshot}");
                let dir = std::path::PathBuf::from(snapshot["dir"].as_str().expect("dir"));
                for file in ["vmstate", "memory", "rootfs.ext4"] {
                    assert!(dir.join(file).is_file(), "{context}: no {file}");
                }
                assert!(!dir.join("paused-vm").exists(), "{context}: marker left");
                harness.daemon.banger_ok(&["snapshot", "rm", "chaos"]);
            }
            // The VM row may differ in its state's history only.
            before.assert_same(&harness.snapshot(), &context);
            // And a snapshot works afterwards.
            harness
                .daemon
                .banger_ok(&["vm", "snapshot", "survivor", "chaos"]);
            harness.daemon.banger_ok(&["snapshot", "rm", "chaos"]);
        }
    }
    eprintln!("snapshot: {kills} kills survived");
}

/// The steps of a create from a snapshot that holds a work disk.
const RESTORE_STEPS: [&str; 6] = [
    "resolve image",
    "clone root disk",
    "prepare work disk",
    "prepare agent",
    "restore",
    "ready",
];

#[test]
fn kill_at_each_restore_step_leaves_nothing_but_finished_vms() {
    let mut harness = Harness::new();
    let mut kills = 0;
    harness.daemon.banger_ok(&strs(&create_args("source")));
    harness
        .daemon
        .banger_ok(&["vm", "snapshot", "source", "base", "--stop"]);
    harness
        .daemon
        .banger_ok(&["vm", "delete", "source", "--force"]);
    let args = ["vm", "create", "victim", "--from-snapshot", "base"];
    for step in RESTORE_STEPS {
        for suffix in ["", ":done"] {
            let point = format!("create:{step}{suffix}");
            for round in 0..iterations() {
                let context = format!("{point} #{round}");
                let before = harness.snapshot();
                harness.kill_at(&point, &args);
                kills += 1;
                assert!(!harness.has_vm("victim"), "{context}: victim survived");
                before.assert_same(&harness.snapshot(), &context);
            }
        }
    }
    // A restore runs normally afterwards, and the snapshot is intact.
    harness.daemon.banger_ok(&args);
    assert_eq!(harness.daemon.vm("victim")["state"], "running");
    harness
        .daemon
        .banger_ok(&["vm", "delete", "victim", "--force"]);
    harness.daemon.banger_ok(&["snapshot", "rm", "base"]);
    eprintln!("restore: {kills} kills survived");
}
