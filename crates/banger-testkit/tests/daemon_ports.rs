//! Published ports and egress policies through a real daemon, in network
//! namespaces the test makes (never any outside address):
//!
//! - `host`: where bangerd runs (bridge, nft tables), with an uplink veth
//!   whose other end is in `world`;
//! - `guest`: a fake guest: the VM's tap is replaced by a veth named like
//!   it on the bridge, whose peer (with the VM's MAC and address) lives
//!   here, so the guest's frames pass the bridge table as the VM's;
//! - `world`: the uplink's far end, serving DNS and TCP on 192.0.2.x.
//!
//! Root only (CI runs as root).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{require_root, TestDaemon};
use serde_json::Value;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_owned())
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

    /// Runs `work` on a thread inside the namespace.
    fn within<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            work()
        })
        .join()
        .unwrap()
    }

    /// Starts `work` on a thread inside the namespace, left running.
    fn spawn(&self, work: impl FnOnce() + Send + 'static) {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            work();
        });
    }

    /// How many rules of `chain` in `inet banger` hold `dnat`.
    fn dnat_rules(&self, chain: &str) -> usize {
        self.run("nft", &["list", "chain", "inet", "banger", chain])
            .lines()
            .filter(|line| line.contains("dnat ip to"))
            .count()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The daemon's namespace, the uplink to `world` and a world namespace.
struct Lab {
    host: Netns,
    guest: Netns,
    world: Netns,
}

impl Lab {
    fn new(prefix: &str) -> Self {
        let host = Netns::new(&format!("{prefix}-host"));
        let guest = Netns::new(&format!("{prefix}-guest"));
        let world = Netns::new(&format!("{prefix}-world"));
        ip(&[
            "-n", &host.0, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
            "netns", &world.0,
        ]);
        ip(&[
            "-n",
            &host.0,
            "addr",
            "add",
            "192.0.2.1/24",
            "dev",
            "uplink0",
        ]);
        ip(&["-n", &host.0, "link", "set", "uplink0", "up"]);
        ip(&[
            "-n",
            &host.0,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
        ]);
        for address in ["192.0.2.254/24", "192.0.2.10/24", "192.0.2.11/24"] {
            ip(&["-n", &world.0, "addr", "add", address, "dev", "uplink1"]);
        }
        ip(&["-n", &world.0, "link", "set", "uplink1", "up"]);
        Self { host, guest, world }
    }

    /// A daemon in `host` with DNS forwarded to `world`.
    fn daemon(&self) -> TestDaemon {
        let mut daemon = TestDaemon::new(&[]);
        let config = std::fs::read_to_string(&daemon.config).unwrap().replace(
            "[network]\nenabled = false\n",
            "[network]\nenabled = true\ndns_upstreams = [\"192.0.2.254:53\"]\ntap_pool_size = 0\n",
        );
        std::fs::write(&daemon.config, config).unwrap();
        daemon.netns = Some(self.host.0.clone());
        daemon.start();
        daemon.import_fixtures();
        daemon
    }

    /// Puts the fake guest behind VM `vm`'s tap: the tap is replaced by a
    /// veth of the same name on the bridge, whose peer in `guest` has the
    /// VM's MAC and address.
    fn plug_guest(&self, vm: &Value) {
        plug_guest_into(&self.host, &self.guest, vm);
    }
}

/// [`Lab::plug_guest`] with the fake guest in `guest`.
fn plug_guest_into(host_ns: &Netns, guest_ns: &Netns, vm: &Value) {
    {
        let network = &vm["network"];
        let tap = network["tap"].as_str().unwrap();
        let mac = network["mac"].as_str().unwrap();
        let address = network["ip"].as_str().unwrap();
        let host = &host_ns.0;
        ip(&["-n", host, "link", "del", tap]);
        ip(&[
            "-n",
            host,
            "link",
            "add",
            tap,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &guest_ns.0,
        ]);
        ip(&["-n", host, "link", "set", tap, "master", "banger0"]);
        ip(&["-n", host, "link", "set", tap, "up"]);
        let guest = &guest_ns.0;
        ip(&["-n", guest, "link", "set", "eth0", "address", mac]);
        ip(&[
            "-n",
            guest,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", guest, "link", "set", "eth0", "up"]);
        ip(&["-n", guest, "route", "add", "default", "via", "172.30.0.1"]);
    }
}

/// Serves TCP on `address`: each connection gets `greeting`, then every
/// line it sends back.
fn serve_tcp(address: &str, greeting: &'static str) -> impl FnOnce() + Send + 'static {
    let address = address.to_owned();
    move || {
        let listener = TcpListener::bind(&address).unwrap();
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.write_all(greeting.as_bytes());
                let mut buffer = [0_u8; 512];
                while let Ok(length) = stream.read(&mut buffer) {
                    if length == 0 || stream.write_all(&buffer[..length]).is_err() {
                        break;
                    }
                }
            });
        }
    }
}

/// Echoes UDP datagrams on `address`, prefixed with `prefix`.
fn serve_udp(address: &str, prefix: &'static str) -> impl FnOnce() + Send + 'static {
    let address = address.to_owned();
    move || {
        let socket = UdpSocket::bind(&address).unwrap();
        let mut buffer = [0_u8; 512];
        while let Ok((length, peer)) = socket.recv_from(&mut buffer) {
            let mut answer = prefix.as_bytes().to_vec();
            answer.extend_from_slice(&buffer[..length]);
            let _ = socket.send_to(&answer, peer);
        }
    }
}

/// The greeting of the TCP server at `address`, or `None` when the
/// connection does not open within two seconds.
fn tcp_greeting(address: &str) -> Option<String> {
    let address: SocketAddr = address.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buffer = [0_u8; 64];
    let length = stream.read(&mut buffer).ok()?;
    Some(String::from_utf8_lossy(&buffer[..length]).into_owned())
}

/// The answer to `message` sent to the UDP server at `address`.
fn udp_exchange(address: &str, message: &str) -> Option<String> {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(message.as_bytes(), address).unwrap();
    let mut buffer = [0_u8; 512];
    let length = socket.recv(&mut buffer).ok()?;
    Some(String::from_utf8_lossy(&buffer[..length]).into_owned())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create(daemon: &TestDaemon, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "vm", "create", name, "--image", "image", "--kernel", "kernel",
    ];
    args.extend_from_slice(extra);
    daemon.banger(&args)
}

#[test]
fn published_ports_reach_the_guest_over_tcp_and_udp_and_survive_restarts() {
    if !require_root("published_ports_reach_the_guest_over_tcp_and_udp_and_survive_restarts") {
        return;
    }
    let lab = Lab::new("bgports");
    let mut daemon = lab.daemon();
    let output = create(
        &daemon,
        "web",
        &[
            "-p",
            "8080:80",
            "-p",
            "0.0.0.0:9090:80",
            "-p",
            "0.0.0.0:5300:53/udp",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let vm = daemon.vm("web");
    let ports: Vec<String> = vm["network"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|port| {
            format!(
                "{}:{}:{}/{}",
                port["host_ip"].as_str().unwrap(),
                port["host_port"],
                port["guest_port"],
                port["protocol"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            "127.0.0.1:8080:80/tcp",
            "0.0.0.0:9090:80/tcp",
            "0.0.0.0:5300:53/udp"
        ]
        .map(String::from),
        "{vm}"
    );
    let listed = daemon.banger_json(&["vm", "list"]);
    assert_eq!(listed[0]["network"]["ports"], vm["network"]["ports"]);
    assert_eq!(vm["network"]["egress"], "allow-all");

    lab.plug_guest(&vm);
    lab.guest
        .spawn(serve_tcp("0.0.0.0:80", "hello from the guest\n"));
    lab.guest.spawn(serve_udp("0.0.0.0:53", "guest:"));
    std::thread::sleep(Duration::from_millis(200));

    let reach_all = |lab: &Lab| {
        lab.host.within(|| {
            [
                tcp_greeting("127.0.0.1:8080"),
                tcp_greeting("127.0.0.1:9090"),
                tcp_greeting("172.30.0.1:9090"),
                udp_exchange("127.0.0.1:5300", "ping"),
                udp_exchange("172.30.0.1:5300", "ping"),
            ]
        })
    };
    let greeting = Some("hello from the guest\n".to_owned());
    let echo = Some("guest:ping".to_owned());
    let expected = [
        greeting.clone(),
        greeting.clone(),
        greeting.clone(),
        echo.clone(),
        echo.clone(),
    ];
    assert_eq!(reach_all(&lab), expected);
    // Not published on 172.30.0.1: 8080 binds 127.0.0.1 only.
    assert_eq!(lab.host.within(|| tcp_greeting("172.30.0.1:8080")), None);

    // Another VM cannot publish a taken port, nor one a host socket holds;
    // neither create leaves a VM behind.
    let error = String::from_utf8(create(&daemon, "web2", &["-p", "8080:81"]).stderr).unwrap();
    assert!(
        error.contains("Host port 127.0.0.1:8080:81/tcp is taken by VM `web`"),
        "{error}"
    );
    let holder = lab
        .host
        .within(|| TcpListener::bind("127.0.0.1:7070").unwrap());
    let error = String::from_utf8(create(&daemon, "web3", &["-p", "7070:80"]).stderr).unwrap();
    assert!(error.contains("taken by a host socket"), "{error}");
    drop(holder);
    let names: Vec<Value> = daemon
        .banger_json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].clone())
        .collect();
    // Refused at the create's check: nothing was made.
    assert_eq!(names, [Value::from("web")]);

    // kill -9 and restarts: one rule per port, and they still work.
    assert_eq!(lab.host.dnat_rules("prerouting"), 3);
    assert_eq!(lab.host.dnat_rules("output"), 3);
    for _ in 0..2 {
        daemon.kill9();
        daemon.start();
    }
    assert_eq!(lab.host.dnat_rules("prerouting"), 3);
    assert_eq!(lab.host.dnat_rules("output"), 3);
    assert_eq!(reach_all(&lab), expected);

    // vm port on the running VM.
    daemon.banger_ok(&["vm", "port", "web", "rm", "8080:80"]);
    assert_eq!(lab.host.within(|| tcp_greeting("127.0.0.1:8080")), None);
    daemon.banger_ok(&["vm", "port", "web", "add", "8081:80"]);
    assert_eq!(lab.host.within(|| tcp_greeting("127.0.0.1:8081")), greeting);
    let listed = daemon.banger_json(&["vm", "port", "web", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    assert_eq!(lab.host.dnat_rules("prerouting"), 3);

    // Stop removes the rules (the port stays reserved), start brings them back.
    daemon.banger_ok(&["vm", "stop", "web"]);
    wait_until("rules removed after stop", || {
        lab.host.dnat_rules("prerouting") == 0
    });
    assert!(create(&daemon, "web4", &["-p", "8081:80"]).status.code() != Some(0));
    daemon.banger_ok(&["vm", "start", "web"]);
    assert_eq!(lab.host.dnat_rules("prerouting"), 3);
    assert_eq!(lab.host.within(|| tcp_greeting("127.0.0.1:8081")), greeting);

    daemon.banger_ok(&["vm", "delete", "web", "--force"]);
    if daemon
        .banger_json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .any(|vm| vm["name"] == "web4")
    {
        daemon.banger_ok(&["vm", "delete", "web4", "--force"]);
    }
    assert_eq!(lab.host.dnat_rules("prerouting"), 0);
    assert_eq!(lab.host.dnat_rules("output"), 0);
    daemon.assert_no_leaks();
    drop(daemon);
}

/// Answers A queries: `allowed.test` with 192.0.2.10, `other.test` with
/// 192.0.2.11 (TTL 60), anything else NXDOMAIN.
fn serve_world_dns() {
    let socket = UdpSocket::bind("192.0.2.254:53").unwrap();
    let mut buffer = [0_u8; 512];
    while let Ok((length, peer)) = socket.recv_from(&mut buffer) {
        let query = &buffer[..length];
        // The question name, lowercased, from offset 12.
        let mut labels = Vec::new();
        let mut offset = 12;
        while offset < length && query[offset] != 0 {
            let size = usize::from(query[offset]);
            labels.push(
                String::from_utf8_lossy(&query[offset + 1..offset + 1 + size]).to_lowercase(),
            );
            offset += size + 1;
        }
        let question_end = offset + 5;
        let address = match labels.join(".").as_str() {
            "allowed.test" => Some([192, 0, 2, 10]),
            "other.test" => Some([192, 0, 2, 11]),
            _ => None,
        };
        let mut answer = query[..question_end].to_vec();
        answer[2] = 0x81;
        answer[3] = if address.is_some() { 0x80 } else { 0x83 };
        answer[6] = 0;
        answer[7] = u8::from(address.is_some());
        answer[8..12].fill(0);
        if let Some(address) = address {
            answer.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            answer.extend(address);
        }
        let _ = socket.send_to(&answer, peer);
    }
}

/// Asks the daemon's DNS server for `name`: its address, or the rcode.
fn resolve(name: &str) -> Result<Ipv4Addr, u8> {
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
    let length = socket.recv(&mut answer).map_err(|_| 255)?;
    let rcode = answer[3] & 0x0f;
    let answers = u16::from_be_bytes([answer[6], answer[7]]);
    if rcode != 0 || answers == 0 {
        return Err(rcode);
    }
    let tail = &answer[length - 4..length];
    Ok(Ipv4Addr::new(tail[0], tail[1], tail[2], tail[3]))
}

/// Whether a line sent on `stream` comes back within two seconds.
fn still_echoes(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    if stream.write_all(b"again\n").is_err() {
        return false;
    }
    let mut buffer = [0_u8; 16];
    matches!(stream.read(&mut buffer), Ok(length) if length > 0)
}

#[test]
fn egress_allows_listed_names_only_and_tightening_cuts_connections() {
    if !require_root("egress_allows_listed_names_only_and_tightening_cuts_connections") {
        return;
    }
    let lab = Lab::new("bgegress");
    lab.world.spawn(serve_world_dns);
    lab.world
        .spawn(serve_tcp("0.0.0.0:80", "hello from the world\n"));
    let mut daemon = lab.daemon();
    let output = create(&daemon, "agent", &["--egress", "allow=allowed.test"]);
    assert!(output.status.success(), "{output:?}");
    let vm = daemon.vm("agent");
    assert_eq!(vm["network"]["egress"], "allow=allowed.test");
    lab.plug_guest(&vm);
    std::thread::sleep(Duration::from_millis(200));

    let world = Some("hello from the world\n".to_owned());
    let (allowed, other, by_name, by_raw_ip) = lab.guest.within(|| {
        let allowed = resolve("allowed.test");
        let other = resolve("other.test");
        let by_name = allowed
            .ok()
            .and_then(|address| tcp_greeting(&format!("{address}:80")));
        (allowed, other, by_name, tcp_greeting("192.0.2.11:80"))
    });
    assert_eq!(allowed, Ok(Ipv4Addr::new(192, 0, 2, 10)));
    assert_eq!(other, Err(3), "other.test must be NXDOMAIN");
    assert_eq!(by_name, world);
    assert_eq!(
        by_raw_ip, None,
        "a name that was not allowed is reachable by address"
    );
    // The learned address is in the VM's set with a timeout.
    let learned = lab
        .host
        .run("nft", &["list", "set", "inet", "banger", "egress_learned"]);
    assert!(learned.contains("192.0.2.10 timeout"), "{learned}");
    // A live connection survives a daemon restart (the policy and its
    // connections' mark are the same); `--egress none` then cuts it and
    // new ones, and names stop resolving.
    let (sender, receiver) = std::sync::mpsc::channel::<()>();
    let (result_sender, results) = std::sync::mpsc::channel::<bool>();
    lab.guest.spawn(move || {
        let _ = resolve("allowed.test");
        let mut stream =
            TcpStream::connect_timeout(&"192.0.2.10:80".parse().unwrap(), Duration::from_secs(2))
                .unwrap();
        let mut greeting = [0_u8; 64];
        let _ = stream.read(&mut greeting);
        result_sender.send(still_echoes(&mut stream)).unwrap();
        for _ in 0..2 {
            receiver.recv().unwrap();
            result_sender.send(still_echoes(&mut stream)).unwrap();
        }
    });
    assert!(
        results.recv().unwrap(),
        "the connection did not work before"
    );
    daemon.kill9();
    daemon.start();
    assert_eq!(lab.guest.within(|| resolve("other.test")), Err(3));
    // A new connection to the address learned before the restart, without
    // resolving again (a guest's resolver cache), still opens.
    assert_eq!(
        lab.guest.within(|| tcp_greeting("192.0.2.10:80")),
        Some("hello from the world\n".to_owned()),
        "the learned address was lost in the restart"
    );
    sender.send(()).unwrap();
    assert!(
        results.recv().unwrap(),
        "a daemon restart cut an allowed connection"
    );
    daemon.banger_ok(&["vm", "set", "agent", "--egress", "none"]);
    assert_eq!(daemon.vm("agent")["network"]["egress"], "none");
    sender.send(()).unwrap();
    assert!(
        !results.recv().unwrap(),
        "the live connection still passes after --egress none"
    );
    let (allowed, connect) = lab
        .guest
        .within(|| (resolve("allowed.test"), tcp_greeting("192.0.2.10:80")));
    assert_eq!(allowed, Err(3));
    assert_eq!(connect, None);
    // DNS for VM names still answers.
    assert_eq!(
        lab.guest.within(|| resolve("agent.banger")),
        Ok(vm["network"]["ip"].as_str().unwrap().parse().unwrap())
    );
    // Back to allow-all: the world is reachable by address again.
    daemon.banger_ok(&["vm", "set", "agent", "--egress", "allow-all"]);
    assert_eq!(lab.guest.within(|| tcp_greeting("192.0.2.11:80")), world);

    daemon.banger_ok(&["vm", "delete", "agent", "--force"]);
    daemon.assert_no_leaks();
    drop(daemon);
}

#[test]
fn vms_of_one_network_group_talk_and_others_stay_isolated() {
    if !require_root("vms_of_one_network_group_talk_and_others_stay_isolated") {
        return;
    }
    let lab = Lab::new("bggroup");
    let second = Netns::new("bggroup-second");
    let outsider = Netns::new("bggroup-outsider");
    let daemon = lab.daemon();
    for (name, extra) in [
        ("one", &["--network-group", "team"][..]),
        ("two", &["--network-group", "team"][..]),
        ("three", &[][..]),
    ] {
        let output = create(&daemon, name, extra);
        assert!(output.status.success(), "{output:?}");
    }
    let error =
        String::from_utf8(create(&daemon, "bad", &["--network-group", "Team!"]).stderr).unwrap();
    assert!(error.contains("is not a network group name"), "{error}");
    let [one, two, three] = ["one", "two", "three"].map(|name| daemon.vm(name));
    assert_eq!(one["network"]["network_group"], "team");
    assert!(three["network"]["network_group"].is_null());
    plug_guest_into(&lab.host, &lab.guest, &one);
    plug_guest_into(&lab.host, &second, &two);
    plug_guest_into(&lab.host, &outsider, &three);
    for namespace in [&lab.guest, &second, &outsider] {
        namespace.spawn(serve_tcp("0.0.0.0:7000", "hello from a guest\n"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let address = |vm: &Value| format!("{}:7000", vm["network"]["ip"].as_str().unwrap());
    let greeting = Some("hello from a guest\n".to_owned());
    let (to_two, to_three) = {
        let (two, three) = (address(&two), address(&three));
        lab.guest
            .within(move || (tcp_greeting(&two), tcp_greeting(&three)))
    };
    assert_eq!(to_two, greeting, "VMs of one group cannot talk");
    assert_eq!(to_three, None, "a VM outside the group is reachable");
    let to_one = {
        let one = address(&one);
        outsider.within(move || tcp_greeting(&one))
    };
    assert_eq!(to_one, None, "a VM outside the group reaches in");

    for name in ["one", "two", "three"] {
        daemon.banger_ok(&["vm", "delete", name, "--force"]);
    }
    let peers = lab
        .host
        .run("nft", &["list", "set", "inet", "banger", "group_peers"]);
    assert!(!peers.contains("elements"), "{peers}");
    daemon.assert_no_leaks();
    drop(daemon);
}
