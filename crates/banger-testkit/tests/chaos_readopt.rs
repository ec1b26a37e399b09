//! A fake guest outlives its host daemon, as a real one does: after
//! `kill -9` of bangerd, the restarted daemon re-adopts the VM (same VMM
//! pid) and reaches the same guest agent (`vm run`).

use banger_testkit::test_daemon::TestDaemon;

#[test]
fn guest_agent_survives_kill9_of_the_daemon_and_vm_run_works_after_readoption() {
    guest_survives(false);
}

#[test]
fn unjailed_guest_agent_survives_kill9_of_the_daemon() {
    guest_survives(true);
}

fn guest_survives(unjailed: bool) {
    let mut daemon = TestDaemon::new(&[]);
    if unjailed {
        daemon.without_jail();
    }
    daemon.with_agent();
    daemon.start();
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "lasting", "--image", "image", "--kernel", "kernel",
    ]);
    let pid = daemon.vm("lasting")["pid"].as_u64().expect("pid");
    let agents = daemon.guest_agent_pids();
    let before = daemon.banger_ok(&["vm", "run", "lasting", "--", "echo", "before"]);
    assert_eq!(before, "before\n");

    for round in 0..3 {
        daemon.kill9();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            daemon.guest_agent_pids(),
            agents,
            "round {round}: the guest agent died with the daemon"
        );
        daemon.start();
        let vm = daemon.vm("lasting");
        assert_eq!(vm["state"], "running", "round {round}: {vm}");
        assert_eq!(
            vm["pid"].as_u64(),
            Some(pid),
            "round {round}: VMM pid changed"
        );
        let after = daemon.banger_ok(&["vm", "run", "lasting", "--", "echo", "after"]);
        assert_eq!(after, "after\n", "round {round}");
    }

    // The guest still ends with its VMM.
    daemon.banger_ok(&["vm", "delete", "lasting", "--force"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !daemon.guest_agent_pids().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        daemon.guest_agent_pids(),
        Vec::<u32>::new(),
        "guest outlived its VMM"
    );
    daemon.assert_no_leaks();
}
