//! Storms against one daemon with its network on, in a namespace of its own
//! (root only; CI runs as root):
//! - 50 clients at once, each creating a VM, stopping and starting it,
//!   listing, and (every other one) deleting it, while a watcher lists VMs
//!   throughout: never two VMs with the same name, address, tap, MAC or
//!   vsock socket; at the end the host is as it was at the start.
//! - Daemon restarts (kill -9 and SIGTERM, alternately) with VMs running:
//!   each time the same VMM pids, exactly one `banger` table per nft family
//!   with the same rules, and one DNS listener per protocol.
//!   `BANGER_CHAOS_RESTARTS` sets the count (10 unless set; 100 in the long
//!   run).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_testkit::host_state::HostState;
use banger_testkit::netns::TestNetns;
use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

/// Panics with what is duplicated among the listed VMs.
fn assert_unique(vms: &[Value], context: &str) {
    for (field, value) in [
        (
            "name",
            (|vm: &Value| vm["name"].as_str().map(str::to_owned)) as fn(&Value) -> _,
        ),
        ("address", |vm: &Value| {
            vm["network"]["ip"].as_str().map(str::to_owned)
        }),
        ("tap", |vm: &Value| {
            vm["network"]["tap"].as_str().map(str::to_owned)
        }),
        ("MAC", |vm: &Value| {
            vm["network"]["mac"].as_str().map(str::to_owned)
        }),
        // Each VM's vsock is its own Unix socket in its own directory (the
        // guest CID is the same for every Firecracker VM by design).
        ("vsock socket", |vm: &Value| {
            vm["dir"].as_str().map(|dir| format!("{dir}/vsock.sock"))
        }),
    ] {
        let values: Vec<String> = vms.iter().filter_map(value).collect();
        let unique: BTreeSet<&String> = values.iter().collect();
        assert_eq!(
            unique.len(),
            values.len(),
            "{context}: duplicate {field} among {values:?}"
        );
    }
}

fn networked_daemon(netns: &TestNetns) -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    netns.enable_network_of(&mut daemon);
    daemon.start();
    daemon.import_fixtures();
    daemon
}

/// Waits (up to 10 s) until `check` holds.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fifty_concurrent_creates_deletes_stops_starts_and_lists_keep_everything_unique() {
    if !require_root(
        "fifty_concurrent_creates_deletes_stops_starts_and_lists_keep_everything_unique",
    ) {
        return;
    }
    let netns = TestNetns::new("banger-chaos-storm");
    let daemon = Arc::new(networked_daemon(&netns));
    // What the first VM makes once (the jail's base directory) is there
    // before the storm.
    daemon.banger_ok(&[
        "vm", "create", "warmup", "--image", "image", "--kernel", "kernel",
    ]);
    daemon.banger_ok(&["vm", "delete", "warmup", "--force"]);
    // The default pool size.
    let pool = 4;
    eventually("the tap pool refilling", || {
        netns.links_named("bgpool").len() == pool
    });
    let before = HostState::capture(&daemon).without(&["store:operations"]);

    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (daemon, done) = (Arc::clone(&daemon), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut lists = 0;
            while !done.load(Ordering::SeqCst) {
                let vms = daemon.banger_json(&["vm", "list"]);
                assert_unique(vms.as_array().expect("array"), "during the storm");
                lists += 1;
            }
            lists
        })
    };
    let clients: Vec<_> = (0..50)
        .map(|index| {
            let daemon = Arc::clone(&daemon);
            std::thread::spawn(move || {
                let name = format!("storm{index}");
                daemon.banger_ok(&[
                    "vm", "create", &name, "--image", "image", "--kernel", "kernel",
                ]);
                daemon.banger_ok(&["vm", "list"]);
                if index % 3 == 0 {
                    daemon.banger_ok(&["vm", "stop", &name]);
                    daemon.banger_ok(&["vm", "start", &name]);
                }
                if index % 2 == 0 {
                    daemon.banger_ok(&["vm", "delete", &name, "--force"]);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    done.store(true, Ordering::SeqCst);
    let lists = watcher.join().expect("watcher");
    let vms = daemon.banger_json(&["vm", "list"]);
    let vms = vms.as_array().expect("array");
    assert_eq!(vms.len(), 25);
    assert!(vms.iter().all(|vm| vm["state"] == "running"), "{vms:?}");
    assert_unique(vms, "after the storm");
    assert_eq!(
        netns.links_named("bgtap").len(),
        25,
        "one tap per running VM"
    );
    assert_eq!(daemon.vmm_pids().len(), 25, "one VMM per running VM");

    for vm in vms {
        daemon.banger_ok(&[
            "vm",
            "delete",
            vm["name"].as_str().expect("name"),
            "--force",
        ]);
    }
    eventually("the tap pool refilling", || {
        netns.links_named("bgpool").len() == pool
    });
    let after = HostState::capture(&daemon).without(&["store:operations"]);
    // Pool taps are interchangeable: only their number counts.
    let pool_free = |state: HostState| state.without_lines_containing(&["bgpool"]);
    pool_free(before).assert_same(&pool_free(after), "after the storm");
    eprintln!("storm: 50 clients, {lists} concurrent lists, no duplicates");
}

#[test]
fn restarts_with_vms_running_keep_one_nft_table_and_one_dns_listener() {
    if !require_root("restarts_with_vms_running_keep_one_nft_table_and_one_dns_listener") {
        return;
    }
    let restarts: usize = std::env::var("BANGER_CHAOS_RESTARTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10);
    let netns = TestNetns::new("banger-chaos-restart");
    let mut daemon = networked_daemon(&netns);
    for name in ["r1", "r2", "r3"] {
        daemon.banger_ok(&[
            "vm", "create", name, "--image", "image", "--kernel", "kernel",
        ]);
    }
    let pids = |daemon: &TestDaemon| -> Vec<Value> {
        ["r1", "r2", "r3"]
            .iter()
            .map(|name| daemon.vm(name)["pid"].clone())
            .collect()
    };
    let expected_pids = pids(&daemon);
    let tables = netns.banger_tables();
    assert_eq!(tables.len(), 2, "{tables:?}");
    let rules = netns.banger_rule_count();
    let listeners = netns.dns_listeners();
    assert!(!listeners.is_empty(), "no DNS listener");
    for round in 0..restarts {
        if round % 2 == 0 {
            daemon.kill9();
        } else {
            daemon.terminate();
        }
        daemon.start();
        assert_eq!(pids(&daemon), expected_pids, "restart {round}: VMM pids");
        assert_eq!(netns.banger_tables(), tables, "restart {round}: nft tables");
        assert_eq!(
            netns.banger_rule_count(),
            rules,
            "restart {round}: nft rules"
        );
        eventually("one DNS listener per protocol", || {
            netns.dns_listeners() == listeners
        });
    }
    for name in ["r1", "r2", "r3"] {
        daemon.banger_ok(&["vm", "delete", name, "--force"]);
    }
    daemon.assert_no_leaks();
    eprintln!("restarts: {restarts} with 3 VMs running");
}
