//! The network capability through a real daemon, inside a network namespace
//! the test creates (the host is untouched): leases, taps on the bridge, the
//! NIC and `banger.net=` handed to the VMM, DNS answers for VM names, NAT
//! rules that do not pile up across restarts, the tap pool (filled at
//! start, taken by creates, given back by deletes, rebuilt after a kill -9),
//! the network checks of `doctor`, and nothing leaked on delete. Root only
//! (CI runs as root), except the disabled-network check.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

/// A network namespace with an uplink and a default route through it.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        // A namespace left by an interrupted earlier run.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let run = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        run(&["netns", "add", name]);
        let namespace = Self(name.to_owned());
        run(&["-n", name, "link", "set", "lo", "up"]);
        // A veth pair stands in for the uplink (no dummy module everywhere).
        run(&[
            "-n", name, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ]);
        run(&["-n", name, "addr", "add", "192.0.2.1/24", "dev", "uplink0"]);
        run(&["-n", name, "link", "set", "uplink0", "up"]);
        run(&["-n", name, "link", "set", "uplink1", "up"]);
        run(&["-n", name, "route", "add", "default", "via", "192.0.2.254"]);
        namespace
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(
            output.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Every link: name to (index, `ip -d -o link show` line).
    fn links(&self) -> BTreeMap<String, (u32, String)> {
        let text = self.run("ip", &["-d", "-o", "link", "show"]);
        text.lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ": ");
                let index = fields.next()?.trim().parse().ok()?;
                let name = fields.next()?;
                let name = name.split('@').next().unwrap_or(name).to_owned();
                Some((name, (index, line.to_owned())))
            })
            .collect()
    }

    fn links_named(&self, prefix: &str) -> Vec<String> {
        self.links()
            .into_keys()
            .filter(|name| name.starts_with(prefix))
            .collect()
    }

    /// The VMs' taps.
    fn taps(&self) -> Vec<String> {
        self.links_named("bgtap")
    }

    fn pool_taps(&self) -> Vec<String> {
        self.links_named("bgpool")
    }

    /// Waits (up to 10 s) until the pool holds `size` taps; returns them.
    fn wait_for_pool(&self, size: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pool = self.pool_taps();
            if pool.len() == size || Instant::now() > deadline {
                return pool;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts every pool tap is a down, isolated port of the bridge.
    fn assert_pool_clean(&self) {
        for (name, (_, line)) in self.links() {
            if name.starts_with("bgpool") {
                assert!(line.contains("master banger0"), "{line}");
                assert!(line.contains("isolated on"), "{line}");
                assert!(line.contains("state DOWN"), "{line}");
                assert!(!line.contains(",UP"), "{line}");
            }
        }
    }

    fn taps_on_bridge(&self) -> usize {
        self.run("ip", &["-o", "link", "show", "master", "banger0"])
            .lines()
            .count()
    }

    fn banger_tables(&self) -> usize {
        let json: Value =
            serde_json::from_str(&self.run("nft", &["-j", "list", "tables"])).unwrap();
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|item| item["table"]["name"] == "banger")
            .count()
    }

    fn banger_rules(&self) -> usize {
        let json: Value =
            serde_json::from_str(&self.run("nft", &["-j", "list", "table", "inet", "banger"]))
                .unwrap();
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|item| item.get("rule").is_some())
            .count()
    }

    /// The elements of the bridge table's guest set: `TAP MAC IP` each.
    fn guest_elements(&self) -> Vec<String> {
        let json: Value = serde_json::from_str(
            &self.run("nft", &["-j", "list", "set", "bridge", "banger", "guests"]),
        )
        .unwrap();
        let set = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|item| item.get("set"))
            .expect("guests set")
            .clone();
        let mut elements: Vec<String> = set["elem"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|element| {
                element["concat"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|part| part.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        elements.sort();
        elements
    }

    /// Asks the daemon's DNS server (on the gateway, inside the namespace)
    /// for `name`'s A record.
    fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        let netns = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        let name = name.to_owned();
        std::thread::spawn(move || {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in name.split('.') {
                query.push(u8::try_from(label.len()).unwrap());
                query.extend(label.as_bytes());
            }
            query.extend([0, 0, 1, 0, 1]);
            socket.send_to(&query, "172.30.0.1:53").unwrap();
            let mut answer = [0_u8; 512];
            let length = socket.recv(&mut answer).unwrap();
            let answers = u16::from_be_bytes([answer[6], answer[7]]);
            let rcode = answer[3] & 0x0f;
            (rcode == 0 && answers > 0).then(|| {
                let tail = &answer[length - 4..length];
                Ipv4Addr::new(tail[0], tail[1], tail[2], tail[3])
            })
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn vms_get_addresses_taps_dns_and_nat_without_leaks() {
    if !require_root("vms_get_addresses_taps_dns_and_nat_without_leaks") {
        return;
    }
    let netns = Netns::new("banger-test-net");
    let mut daemon = TestDaemon::new(&[]);
    let config = std::fs::read_to_string(&daemon.config).unwrap().replace(
        "[network]\nenabled = false\n",
        "[network]\nenabled = true\ndns_upstreams = [\"127.0.0.1:5353\"]\n",
    );
    std::fs::write(&daemon.config, config).unwrap();
    daemon.netns = Some(netns.0.clone());
    daemon.start();
    daemon.import_fixtures();

    // 20 concurrent creates: 20 distinct addresses and taps.
    let children: Vec<_> = (0..20)
        .map(|index| {
            daemon
                .command()
                .args([
                    "vm",
                    "create",
                    &format!("net{index}"),
                    "--image",
                    "image",
                    "--kernel",
                    "kernel",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
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
    let vms = daemon.banger_json(&["vm", "list"]);
    let vms = vms.as_array().unwrap();
    let mut ips: Vec<&str> = vms
        .iter()
        .map(|vm| vm["network"]["ip"].as_str().unwrap())
        .collect();
    let mut taps: Vec<&str> = vms
        .iter()
        .map(|vm| vm["network"]["tap"].as_str().unwrap())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    taps.sort_unstable();
    taps.dedup();
    assert_eq!((ips.len(), taps.len()), (20, 20));
    assert_eq!(netns.taps().len(), 20);
    // The pool (default 4) is refilled after the takes.
    assert_eq!(netns.wait_for_pool(4).len(), 4);
    assert_eq!(netns.taps_on_bridge(), 24);
    let status = daemon.banger_json(&["daemon", "status"]);
    assert_eq!(status["network"]["bridge"], "banger0");
    assert_eq!(status["network"]["leases_used"], 20);
    assert_eq!(status["network"]["leases_free"], 253 - 20);

    // What the VMM got: the tap, the MAC, and banger.net= on the command line.
    let vm = daemon.vm("net3");
    assert_eq!(vm["network"]["dns_name"], "net3.banger");
    let requests = daemon.requests_of(vm["id"].as_str().unwrap());
    let nic = requests
        .iter()
        .find(|request| request["path"] == "/network-interfaces/eth0")
        .expect("network interface configured");
    assert_eq!(nic["body"]["host_dev_name"], vm["network"]["tap"]);
    assert_eq!(nic["body"]["guest_mac"], vm["network"]["mac"]);
    let boot = requests
        .iter()
        .find(|request| request["path"] == "/boot-source")
        .unwrap();
    let expected = format!(
        "banger.net=ip={}/24,gw=172.30.0.1",
        vm["network"]["ip"].as_str().unwrap()
    );
    assert!(
        boot["body"]["boot_args"]
            .as_str()
            .unwrap()
            .contains(&expected),
        "{boot}"
    );

    // DNS answers VM names with their addresses, and nothing for strangers.
    let answer = netns.resolve("net3.banger").expect("net3.banger resolves");
    assert_eq!(answer.to_string(), vm["network"]["ip"].as_str().unwrap());
    assert_eq!(netns.resolve("ghost.banger"), None);

    // Each running VM's tap may send as the VM: one element each.
    let expected_elements = |vms: &[Value]| {
        let mut elements: Vec<String> = vms
            .iter()
            .map(|vm| {
                let network = &vm["network"];
                format!(
                    "{} {} {}",
                    network["tap"].as_str().unwrap(),
                    network["mac"].as_str().unwrap(),
                    network["ip"].as_str().unwrap()
                )
            })
            .collect();
        elements.sort();
        elements
    };
    let elements = netns.guest_elements();
    assert_eq!(elements, expected_elements(vms));

    // NAT and filtering: one inet and one bridge table, and restarts add
    // neither rules nor elements; a set emptied behind the daemon's back
    // is rebuilt from the leases at the next start.
    assert_eq!(netns.banger_tables(), 2);
    let rules = netns.banger_rules();
    for _ in 0..3 {
        daemon.kill9();
        netns.run("nft", &["flush", "set", "bridge", "banger", "guests"]);
        daemon.start();
    }
    assert_eq!(netns.banger_tables(), 2);
    assert_eq!(netns.banger_rules(), rules);
    assert_eq!(netns.guest_elements(), elements);
    // A stop and start re-adds the element without duplicating it.
    daemon.banger_ok(&["vm", "stop", "net3"]);
    daemon.banger_ok(&["vm", "start", "net3"]);
    assert_eq!(netns.guest_elements(), elements);
    // DNS records come back from the leases after a restart.
    assert!(netns.resolve("net3.banger").is_some());

    for index in 0..20 {
        daemon.banger_ok(&["vm", "delete", &format!("net{index}"), "--force"]);
    }
    assert_eq!(netns.taps(), Vec::<String>::new(), "taps leaked");
    assert_eq!(
        netns.guest_elements(),
        Vec::<String>::new(),
        "guest elements leaked"
    );
    assert_eq!(netns.pool_taps().len(), 4, "pool grew past its size");
    assert_eq!(netns.resolve("net3.banger"), None);
    daemon.assert_no_leaks();
    // A new VM gets the lowest address again: leases were released.
    daemon.banger_ok(&[
        "vm", "create", "again", "--image", "image", "--kernel", "kernel",
    ]);
    assert_eq!(daemon.vm("again")["network"]["ip"], "172.30.0.2");
    daemon.banger_ok(&["vm", "delete", "again", "--force"]);
    drop(daemon);
}

/// A daemon in `netns` with networking on and a pool of `pool_size` taps.
fn network_daemon(netns: &Netns, pool_size: usize) -> TestDaemon {
    let mut daemon = TestDaemon::new(&[]);
    let config = std::fs::read_to_string(&daemon.config).unwrap().replace(
        "[network]\nenabled = false\n",
        &format!(
            "[network]\nenabled = true\ndns_upstreams = [\"127.0.0.1:5353\"]\ntap_pool_size = {pool_size}\n"
        ),
    );
    std::fs::write(&daemon.config, config).unwrap();
    daemon.netns = Some(netns.0.clone());
    daemon
}

/// The pid of the bangerd serving `daemon`'s state dir.
fn daemon_pid(daemon: &TestDaemon) -> u32 {
    let state_dir = daemon.state_dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|byte| *byte == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            args.first()
                .is_some_and(|program| program.ends_with("/bangerd"))
                && args.contains(&state_dir)
        })
        .expect("bangerd is running")
}

/// Makes `/dev/net/tun` unusable for the running daemon only (`ip netns
/// exec` gave it a mount namespace of its own): no tap can be created, so a
/// tap a create gets can only come from the pool, and the pool cannot be
/// topped up. Gone with the daemon.
fn block_tap_creation(daemon: &TestDaemon) {
    let pid = daemon_pid(daemon).to_string();
    let status = Command::new("nsenter")
        .args([
            "-t",
            &pid,
            "-m",
            "mount",
            "--bind",
            "/dev/null",
            "/dev/net/tun",
        ])
        .status()
        .expect("nsenter");
    assert!(status.success(), "could not block /dev/net/tun");
}

fn leased_taps(daemon: &TestDaemon) -> BTreeSet<String> {
    daemon
        .banger_json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|vm| vm["network"]["tap"].as_str().map(str::to_owned))
        .collect()
}

fn create(daemon: &TestDaemon, name: &str) -> std::process::Output {
    daemon.banger(&[
        "vm", "create", name, "--image", "image", "--kernel", "kernel",
    ])
}

#[test]
fn tap_pool_is_filled_taken_returned_and_rebuilt_after_kill9() {
    if !require_root("tap_pool_is_filled_taken_returned_and_rebuilt_after_kill9") {
        return;
    }
    let netns = Netns::new("banger-test-pool");
    let mut daemon = network_daemon(&netns, 2);
    daemon.start();
    daemon.import_fixtures();

    // Filled at start: down, isolated ports of the bridge.
    assert_eq!(netns.wait_for_pool(2), ["bgpool0", "bgpool1"]);
    netns.assert_pool_clean();
    let rules = netns.banger_rules();
    let pooled_indexes: BTreeSet<u32> = netns
        .links()
        .into_iter()
        .filter(|(name, _)| name.starts_with("bgpool"))
        .map(|(_, (index, _))| index)
        .collect();

    // With tap creation blocked, a create can only get a pooled tap, and
    // the pool cannot be topped up behind it.
    block_tap_creation(&daemon);
    let output = create(&daemon, "one");
    assert!(output.status.success(), "{output:?}");
    let tap = daemon.vm("one")["network"]["tap"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(tap, "bgtap0");
    let links = netns.links();
    let (index, line) = &links[&tap];
    assert!(pooled_indexes.contains(index), "not a pooled tap: {line}");
    assert!(
        line.contains(",UP") && line.contains("master banger0"),
        "{line}"
    );
    assert_eq!(netns.pool_taps().len(), 1);

    // Delete gives it back: the same device, renamed, down, on the bridge.
    daemon.banger_ok(&["vm", "delete", "one", "--force"]);
    assert_eq!(netns.taps(), Vec::<String>::new());
    let returned = netns
        .links()
        .into_iter()
        .find(|(_, (found, _))| found == index)
        .map(|(name, _)| name)
        .expect("the VM's tap was deleted, not returned");
    assert!(returned.starts_with("bgpool"), "{returned}");
    assert_eq!(netns.pool_taps().len(), 2);
    netns.assert_pool_clean();

    // Two creates empty the pool; a third cannot make a tap and fails
    // cleanly, without keeping a lease.
    for name in ["two", "three"] {
        let output = create(&daemon, name);
        assert!(output.status.success(), "{output:?}");
    }
    assert_eq!(netns.pool_taps(), Vec::<String>::new());
    let output = create(&daemon, "four");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Failed to set up tap bgtap2"), "{stderr}");
    assert!(daemon.vm("four")["network"].is_null());
    daemon.banger_ok(&["vm", "delete", "four", "--force"]);

    // kill -9, plus leftovers: a leaked VM tap, a surplus pool tap (up, on
    // no bridge), and a stranger that only shares the prefix.
    daemon.kill9();
    netns.run("ip", &["tuntap", "add", "bgtap9", "mode", "tap"]);
    netns.run("ip", &["tuntap", "add", "bgpool7", "mode", "tap"]);
    netns.run("ip", &["link", "set", "bgpool7", "up"]);
    netns.run("ip", &["tuntap", "add", "bgpoolside", "mode", "tap"]);
    daemon.start();
    let kept = leased_taps(&daemon);
    assert_eq!(kept.len(), 2);
    assert_eq!(netns.wait_for_pool(3).len(), 3, "{:?}", netns.pool_taps());
    assert!(netns.pool_taps().contains(&"bgpoolside".to_owned()));
    assert_eq!(netns.taps().into_iter().collect::<BTreeSet<_>>(), kept);
    netns.run("ip", &["link", "del", "bgpoolside"]);
    netns.assert_pool_clean();
    assert_eq!(netns.banger_tables(), 2);
    assert_eq!(netns.banger_rules(), rules);

    // kill -9 in the middle of creates: after the restart only the taps of
    // VMs that exist remain, plus the pool.
    let children: Vec<_> = (0..6)
        .map(|index| {
            daemon
                .command()
                .args([
                    "vm",
                    "create",
                    &format!("burst{index}"),
                    "--image",
                    "image",
                    "--kernel",
                    "kernel",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    daemon.kill9();
    for mut child in children {
        let _ = child.wait();
    }
    daemon.start();
    let pool = netns.wait_for_pool(2);
    assert_eq!(pool.len(), 2, "{pool:?}");
    let kept = leased_taps(&daemon);
    assert_eq!(
        netns.taps().into_iter().collect::<BTreeSet<_>>(),
        kept,
        "taps and leases disagree"
    );
    netns.assert_pool_clean();
    assert_eq!(netns.banger_rules(), rules);

    let names: Vec<String> = daemon
        .banger_json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_owned())
        .collect();
    for name in &names {
        daemon.banger_ok(&["vm", "delete", name, "--force"]);
    }
    assert_eq!(netns.taps(), Vec::<String>::new(), "taps leaked");
    assert_eq!(netns.wait_for_pool(2).len(), 2);
    daemon.assert_no_leaks();
    drop(daemon);
}

#[test]
fn doctor_checks_the_network() {
    if !require_root("doctor_checks_the_network") {
        return;
    }
    let netns = Netns::new("banger-test-doctor");
    let mut daemon = network_daemon(&netns, 2);
    daemon.start();
    netns.wait_for_pool(2);
    let checks = doctor(&daemon);
    for (name, status) in [
        ("netlink", "ok"),
        ("nft", "ok"),
        ("ip_forward", "ok"),
        ("dns port", "ok"),
        ("bridge", "ok"),
        ("tap pool", "ok"),
    ] {
        assert_eq!(checks[name]["status"], status, "{name}: {}", checks[name]);
    }
    assert_eq!(checks["tap pool"]["detail"], "2 of 2 taps ready");
    // The daemon runs in its own network namespace: resolved is left alone
    // and the check says how else the host could resolve VM names.
    let resolution = &checks["host resolves VM names"];
    assert!(
        resolution["detail"]
            .as_str()
            .unwrap()
            .contains("NAME.banger")
            || resolution["status"] == "ok",
        "{resolution}"
    );

    // What breaks shows up with a fix.
    netns.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=0"]);
    netns.run("ip", &["link", "set", "banger0", "down"]);
    let checks = doctor(&daemon);
    assert_eq!(checks["ip_forward"]["status"], "fail");
    assert!(checks["ip_forward"]["hint"]
        .as_str()
        .unwrap()
        .contains("sysctl"));
    assert_eq!(checks["bridge"]["status"], "fail");
    netns.run("ip", &["link", "del", "banger0"]);
    assert!(doctor(&daemon)["bridge"]["detail"]
        .as_str()
        .unwrap()
        .contains("missing"));
    daemon.kill9();

    // Another DNS server on the port: the daemon still starts, doctor says
    // why VM names do not resolve.
    let blocker = {
        let netns_file = std::fs::File::open(format!("/var/run/netns/{}", netns.0)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(netns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            UdpSocket::bind("0.0.0.0:53").unwrap()
        })
        .join()
        .unwrap()
    };
    daemon.start();
    let checks = doctor(&daemon);
    assert_eq!(
        checks["dns port"]["status"], "fail",
        "{}",
        checks["dns port"]
    );
    assert!(checks["dns port"]["hint"]
        .as_str()
        .unwrap()
        .contains("bind-interfaces"));
    drop(blocker);
    drop(daemon);
}

/// `banger doctor --json` as name to check (it exits 1 when a check fails).
fn doctor(daemon: &TestDaemon) -> BTreeMap<String, Value> {
    let output = daemon.banger(&["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "doctor printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| (check["name"].as_str().unwrap().to_owned(), check.clone()))
        .collect()
}

#[test]
fn doctor_with_networking_disabled_says_so() {
    let daemon = TestDaemon::start_with(&[]);
    let checks = doctor(&daemon);
    assert_eq!(checks["network"]["status"], "ok");
    assert!(checks["network"]["detail"]
        .as_str()
        .unwrap()
        .contains("enabled = false"));
    assert!(!checks.contains_key("bridge"));
}

/// `prlimit --nofile=SOFT:` on this test process (children inherit it).
fn set_own_open_file_limit(soft: &str) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={soft}:"),
        ])
        .status()
        .expect("prlimit");
    assert!(status.success(), "prlimit failed");
}

/// A field of `/proc/PID/status`, e.g. `VmRSS`.
fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The soft and hard open file limits of `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

/// A TCP connection from `source` to the DNS server on the gateway, or
/// `None` when it does not open within two seconds. The calling thread
/// must be in the daemon's namespace.
fn dns_connection(source: Ipv4Addr) -> Option<std::net::TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind((source, 0).into()).ok()?;
        let stream = tokio::time::timeout(
            Duration::from_secs(2),
            socket.connect("172.30.0.1:53".parse().unwrap()),
        )
        .await
        .ok()?
        .ok()?;
        let stream = stream.into_std().ok()?;
        stream.set_nonblocking(false).ok()?;
        Some(stream)
    })
}

/// A query for `name`'s A record; with `tcp`, framed with its length.
fn dns_query(name: &str, tcp: bool) -> Vec<u8> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).unwrap());
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    if tcp {
        let mut framed = u16::try_from(query.len()).unwrap().to_be_bytes().to_vec();
        framed.extend(query);
        framed
    } else {
        query
    }
}

/// The address in an answer with exactly one A record.
fn answered_address(answer: &[u8]) -> Option<Ipv4Addr> {
    let answers = u16::from_be_bytes([answer[6], answer[7]]);
    (answer[3] & 0x0f == 0 && answers == 1).then(|| {
        let tail = &answer[answer.len() - 4..];
        Ipv4Addr::new(tail[0], tail[1], tail[2], tail[3])
    })
}

/// Resolves `name` from `source` over TCP and over UDP; the calling
/// thread must be in the daemon's namespace.
fn resolve_from(source: Ipv4Addr, name: &str) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
    use std::io::{Read, Write};
    let tcp = dns_connection(source).and_then(|mut stream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream.write_all(&dns_query(name, true)).ok()?;
        let mut length = [0_u8; 2];
        stream.read_exact(&mut length).ok()?;
        let mut answer = vec![0_u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut answer).ok()?;
        answered_address(&answer)
    });
    let socket = UdpSocket::bind((source, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket
        .send_to(&dns_query(name, false), "172.30.0.1:53")
        .unwrap();
    let mut answer = [0_u8; 512];
    let udp = socket
        .recv(&mut answer)
        .ok()
        .and_then(|length| answered_address(&answer[..length]));
    (tcp, udp)
}

#[test]
fn a_dns_flood_from_one_source_leaves_others_resolving_and_the_daemon_answering() {
    if !require_root("a_dns_flood_from_one_source_leaves_others_resolving_and_the_daemon_answering")
    {
        return;
    }
    let netns = Netns::new("banger-test-dnsflood");
    let mut daemon = network_daemon(&netns, 0);
    // The daemon starts with the soft limit a system service usually gets.
    let (_, hard) = open_file_limits(std::process::id());
    set_own_open_file_limit("1024");
    daemon.start();
    set_own_open_file_limit(&hard);
    let pid = daemon_pid(&daemon);
    assert_eq!(
        open_file_limits(pid),
        (hard.clone(), hard.clone()),
        "bangerd did not raise its open file limit"
    );
    daemon.import_fixtures();
    daemon.banger_ok(&[
        "vm", "create", "dev", "--image", "image", "--kernel", "kernel",
    ]);
    let address: Ipv4Addr = daemon.vm("dev")["network"]["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let rss_before = proc_status(pid, "VmRSS");

    // One source opens 3000 connections to the DNS port and holds them.
    let netns_file = std::fs::File::open(format!("/var/run/netns/{}", netns.0)).unwrap();
    let (flood_tx, flood_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let flooder = std::thread::spawn(move || {
        nix::sched::setns(netns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let flood: Vec<_> = (0..3000)
            .filter_map(|_| dns_connection(Ipv4Addr::new(127, 0, 0, 2)))
            .collect();
        flood_tx.send(flood.len()).unwrap();
        let _ = release_rx.recv();
        drop(flood);
    });
    let opened = flood_rx.recv().unwrap();
    // Give the daemon time to accept (and close) what it will.
    std::thread::sleep(Duration::from_millis(500));
    let rss_flooded = proc_status(pid, "VmRSS");
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    println!(
        "flood: {opened} connections opened; bangerd RSS {rss_before} before, \
         {rss_flooded} during; {descriptors} descriptors open"
    );

    // Another source still resolves, over TCP and UDP...
    let netns_file = std::fs::File::open(format!("/var/run/netns/{}", netns.0)).unwrap();
    let resolved = std::thread::spawn(move || {
        nix::sched::setns(netns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        resolve_from(Ipv4Addr::new(127, 0, 0, 3), "dev.banger")
    })
    .join()
    .unwrap();
    // ...and the control socket answers.
    let status = daemon.banger(&["daemon", "status"]);
    let _ = release_tx.send(());
    flooder.join().unwrap();
    assert_eq!(
        resolved,
        (Some(address), Some(address)),
        "another source could not resolve during the flood"
    );
    assert!(
        status.status.success(),
        "the control socket did not answer during the flood: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        descriptors < 500,
        "the flood holds {descriptors} of the daemon's descriptors"
    );
    daemon.banger_ok(&["vm", "delete", "dev", "--force"]);
    daemon.assert_no_leaks();
    drop(daemon);
}
