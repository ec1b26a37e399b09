//! The network capability through a real daemon, inside a network namespace
//! the test creates (the host is untouched): leases, taps on the bridge, the
//! NIC and `banger.net=` handed to the VMM, DNS answers for VM names, NAT
//! rules that do not pile up across restarts, and nothing leaked on delete.
//! Root only (CI runs as root).

use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

/// A network namespace with an uplink and a default route through it.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
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

    fn taps(&self) -> Vec<String> {
        let text = self.run("ip", &["-o", "link", "show"]);
        let mut taps: Vec<String> = text
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with("bgtap"))
            .collect();
        taps.sort();
        taps
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
    assert_eq!(netns.taps_on_bridge(), 20);
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

    // NAT: one table, and restarts do not add rules.
    assert_eq!(netns.banger_tables(), 1);
    let rules = netns.banger_rules();
    for _ in 0..3 {
        daemon.kill9();
        daemon.start();
    }
    assert_eq!(netns.banger_tables(), 1);
    assert_eq!(netns.banger_rules(), rules);
    // DNS records come back from the leases after a restart.
    assert!(netns.resolve("net3.banger").is_some());

    for index in 0..20 {
        daemon.banger_ok(&["vm", "delete", &format!("net{index}"), "--force"]);
    }
    assert_eq!(netns.taps(), Vec::<String>::new(), "taps leaked");
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
