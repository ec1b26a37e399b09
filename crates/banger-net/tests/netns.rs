//! Root-only tests against the real kernel. Each test builds its own network
//! namespaces (`ip netns add`), runs the library in a thread that entered
//! the "host" namespace (netlink sockets, `/dev/net/tun`, nft and the
//! sysctl all act on the calling thread's namespace), and deletes every
//! namespace afterwards, which also deletes every link, tap and nft table
//! made in it. The host's own network is never touched.
//!
//! Topology of the NAT test:
//!
//! ```text
//!  guest ns            host ns                                  outside ns
//!  eth0 172.30.0.2 ── bgtap1 ─ banger0 172.30.0.1   up0 192.0.2.1 ── wan0 192.0.2.2 (HTTP)
//! ```

#![allow(clippy::missing_panics_doc)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use banger_net::nat::{self, GuestPort, NatConfig, Nft, NftCommand};
use banger_net::netlink::{BridgeConfig, HostNetwork, LinuxHostNetwork, TAP_PREFIX};
use banger_net::{GuestNetwork, MacAddress, Subnet};

/// Network tests run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn require_root(name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!("SKIPPED {name}: needs root");
        return false;
    }
    true
}

/// Named network namespaces, deleted on drop (also when a test panics).
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn new(test: &str, roles: &[&str]) -> Self {
        let mut namespaces = Self { names: Vec::new() };
        for role in roles {
            let name = format!("bnt{}-{test}-{role}", std::process::id());
            run("ip", &["netns", "add", &name]);
            namespaces.names.push(name.clone());
            ip(&name, &["link", "set", "lo", "up"]);
        }
        namespaces
    }

    fn name(&self, role: &str) -> &str {
        self.names
            .iter()
            .find(|name| name.ends_with(&format!("-{role}")))
            .expect("unknown role")
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn assert_gone(names: &[String]) {
    for name in names {
        assert!(
            !std::path::Path::new(&format!("/run/netns/{name}")).exists(),
            "namespace {name} leaked"
        );
    }
}

fn output(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("failed to run {program}: {error}"))
}

fn run(program: &str, args: &[&str]) -> String {
    let output = output(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ip -n NETNS ARGS`.
fn ip(netns: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `ip netns exec NETNS ARGS`.
fn exec(netns: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Whether `target` answers within a few tries: right after ports are
/// attached the first ARP exchange can be lost while the links settle.
fn reaches(netns: &str, target: Ipv4Addr) -> bool {
    (0..5).any(|_| pings(netns, target))
}

/// One ping, one second: for checks that something is unreachable, made
/// after [`reaches`] showed the links are live.
fn pings(netns: &str, target: Ipv4Addr) -> bool {
    let target = target.to_string();
    output(
        "ip",
        &[
            "netns", "exec", netns, "ping", "-c", "1", "-W", "1", &target,
        ],
    )
    .status
    .success()
}

/// Runs `body` on a thread that entered network namespace `netns`.
fn in_netns<T: Send + 'static>(netns: &str, body: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: `file` is an open namespace file; setns only changes this
        // thread's network namespace, which is what we want.
        #[allow(unsafe_code)]
        let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(result, 0, "setns: {}", std::io::Error::last_os_error());
        body()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs an async body on a current-thread runtime inside `netns`.
fn block_in_netns<F, T>(netns: &str, make: impl FnOnce() -> F + Send + 'static) -> T
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    in_netns(netns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(make())
    })
}

/// A veth pair: `host_end` in `host`, `eth0` in `guest`, configured from
/// the `banger.net=` argument the daemon would put on the kernel command
/// line (as the agent would).
fn add_guest(host: &str, guest: &str, host_end: &str, kernel_argument: &str) -> GuestNetwork {
    let cmdline = format!("console=ttyS0 {kernel_argument} banger.name=test");
    let network = GuestNetwork::from_kernel_cmdline(&cmdline)
        .unwrap()
        .unwrap();
    ip(
        host,
        &[
            "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", guest,
        ],
    );
    if let Some(mac) = network.mac {
        ip(guest, &["link", "set", "eth0", "address", &mac.to_string()]);
    }
    let cidr = format!("{}/{}", network.address, network.prefix_len);
    ip(guest, &["addr", "add", &cidr, "dev", "eth0"]);
    ip(guest, &["link", "set", "eth0", "up"]);
    ip(
        guest,
        &[
            "route",
            "add",
            "default",
            "via",
            &network.gateway.to_string(),
        ],
    );
    // Keep the routed-path checks deterministic: no ICMP redirects.
    exec(
        guest,
        &["sysctl", "-q", "-w", "net.ipv4.conf.all.accept_redirects=0"],
    );
    exec(
        guest,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.eth0.accept_redirects=0",
        ],
    );
    network
}

/// What the guest behind `host_end` may send from.
fn guest_port(network: &GuestNetwork, host_end: &str) -> GuestPort {
    GuestPort {
        tap: host_end.to_owned(),
        mac: network.mac.expect("guest MAC"),
        address: network.address,
    }
}

fn guest_argument(subnet: Subnet, address: Ipv4Addr, vm_id: &str) -> String {
    GuestNetwork {
        address,
        prefix_len: subnet.prefix_len(),
        gateway: subnet.gateway(),
        dns: vec![subnet.gateway()],
        mac: Some(MacAddress::for_vm(vm_id)),
        domain: Some("banger".to_owned()),
    }
    .to_kernel_argument()
}

#[test]
fn bridge_and_taps_are_created_and_attached() {
    if !require_root("bridge_and_taps_are_created_and_attached") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("taps", &["host"]);
    let host = namespaces.name("host").to_owned();

    let (listed, route) = block_in_netns(&host, || async {
        let network = LinuxHostNetwork::connect().unwrap();
        let bridge = BridgeConfig::default();
        for _ in 0..2 {
            network.ensure_bridge(&bridge).await.unwrap();
            network.create_tap("bgtap0").await.unwrap();
            network.create_tap("bgtap1").await.unwrap();
            network
                .attach_to_bridge("bgtap0", "banger0", true)
                .await
                .unwrap();
            network
                .attach_to_bridge("bgtap1", "banger0", false)
                .await
                .unwrap();
        }
        let listed = network.list_links(TAP_PREFIX).await.unwrap();
        let route = network.default_route_interface().await.unwrap();
        (listed, route)
    });
    assert_eq!(listed, ["bgtap0", "bgtap1"]);
    assert_eq!(route, None, "a fresh namespace has no default route");

    let addresses = ip(&host, &["-4", "addr", "show", "dev", "banger0"]);
    assert_eq!(
        addresses.matches("inet 172.30.0.1/24").count(),
        1,
        "{addresses}"
    );
    assert!(ip(&host, &["link", "show", "banger0"]).contains(",UP"));
    let tap0 = ip(&host, &["-d", "link", "show", "bgtap0"]);
    assert!(tap0.contains("master banger0"), "{tap0}");
    assert!(tap0.contains("isolated on"), "{tap0}");
    assert!(tap0.contains("tun type tap"), "{tap0}");
    assert!(tap0.contains("vnet_hdr on"), "{tap0}");
    assert!(tap0.contains("persist on"), "{tap0}");
    assert!(
        tap0.contains("user 0") || tap0.contains("user root"),
        "{tap0}"
    );
    let tap1 = ip(&host, &["-d", "link", "show", "bgtap1"]);
    assert!(
        tap1.contains("master banger0") && tap1.contains("isolated off"),
        "{tap1}"
    );

    let (after_tap_delete, after_bridge_delete) = block_in_netns(&host, || async {
        let network = LinuxHostNetwork::connect().unwrap();
        network.delete_link("bgtap1").await.unwrap();
        network.delete_link("bgtap1").await.unwrap();
        let after_tap_delete = network.list_links(TAP_PREFIX).await.unwrap();
        network.delete_link("bgtap0").await.unwrap();
        network.delete_link("banger0").await.unwrap();
        network.delete_link("banger0").await.unwrap();
        (after_tap_delete, network.list_links("b").await.unwrap())
    });
    assert_eq!(after_tap_delete, ["bgtap0"]);
    assert!(after_bridge_delete.is_empty(), "{after_bridge_delete:?}");

    let names = namespaces.names();
    drop(namespaces);
    assert_gone(&names);
}

/// An HTTP server in `netns` on `address` that answers one request with the
/// peer address it saw.
fn serve_peer_address(netns: &str, address: SocketAddr) -> std::thread::JoinHandle<Option<String>> {
    let path = format!("/run/netns/{netns}");
    let (ready, is_ready) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: see `in_netns`.
        #[allow(unsafe_code)]
        let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(result, 0);
        let listener = TcpListener::bind(address).unwrap();
        listener.set_nonblocking(true).unwrap();
        ready.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    stream.set_nonblocking(false).unwrap();
                    let mut request = [0_u8; 1024];
                    let _ = stream.read(&mut request);
                    let body = peer.ip().to_string();
                    let _ = write!(
                        stream,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    return Some(body);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        None
    });
    is_ready.recv().unwrap();
    handle
}

fn http_get(netns: &str, address: SocketAddr, timeout: Duration) -> Result<String, std::io::Error> {
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET / HTTP/1.0\r\nHost: outside\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
}

#[test]
fn guest_reaches_gateway_and_outside_through_nat() {
    if !require_root("guest_reaches_gateway_and_outside_through_nat") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("nat", &["host", "guest", "outside"]);
    let (host, guest, outside) = (
        namespaces.name("host").to_owned(),
        namespaces.name("guest").to_owned(),
        namespaces.name("outside").to_owned(),
    );
    // The uplink: the host's default route leads to the outside world.
    ip(
        &host,
        &[
            "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", &outside,
        ],
    );
    ip(&host, &["addr", "add", "192.0.2.1/24", "dev", "up0"]);
    ip(&host, &["link", "set", "up0", "up"]);
    ip(&host, &["route", "add", "default", "via", "192.0.2.2"]);
    ip(&outside, &["addr", "add", "192.0.2.2/24", "dev", "wan0"]);
    ip(&outside, &["link", "set", "wan0", "up"]);

    let subnet = Subnet::default();
    let address = subnet.allocate(|_| false).unwrap();
    assert_eq!(address, Ipv4Addr::new(172, 30, 0, 2));
    let guest_network = add_guest(
        &host,
        &guest,
        "bgtap1",
        &guest_argument(subnet, address, "00000000000000a1"),
    );

    let uplink = block_in_netns(&host, move || async move {
        let network = LinuxHostNetwork::connect().unwrap();
        network
            .ensure_bridge(&BridgeConfig {
                name: "banger0".to_owned(),
                subnet,
            })
            .await
            .unwrap();
        network
            .attach_to_bridge("bgtap1", "banger0", true)
            .await
            .unwrap();
        network.enable_ip_forwarding().await.unwrap();
        network.default_route_interface().await.unwrap()
    });
    assert_eq!(uplink.as_deref(), Some("up0"));
    assert_eq!(
        exec(&host, &["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    assert!(ip(&guest, &["link", "show", "eth0"])
        .contains(&MacAddress::for_vm("00000000000000a1").to_string()));

    assert!(
        reaches(&guest, guest_network.gateway),
        "guest cannot ping the gateway"
    );

    let server_address: SocketAddr = "192.0.2.2:8080".parse().unwrap();
    // Without NAT the outside world has no route back to the guest.
    assert!(http_get(&guest, server_address, Duration::from_secs(1)).is_err());

    let config = NatConfig {
        bridge: "banger0".to_owned(),
        subnet,
        uplink: uplink.unwrap(),
        isolate_vms: true,
        dns_port: 53,
        guests: BTreeSet::from([guest_port(&guest_network, "bgtap1")]),
    };
    block_in_netns(&host, move || async move {
        nat::apply(&NftCommand::new(), &config).await.unwrap();
    });
    let server = serve_peer_address(&outside, server_address);
    let response = http_get(&guest, server_address, Duration::from_secs(5))
        .expect("guest cannot reach outside");
    assert!(response.starts_with("HTTP/1.0 200 OK"), "{response}");
    assert!(
        response.ends_with("\r\n\r\n192.0.2.1"),
        "not masqueraded: {response}"
    );
    assert_eq!(server.join().unwrap().as_deref(), Some("192.0.2.1"));

    let names = namespaces.names();
    drop(namespaces);
    assert_gone(&names);
}

#[test]
fn isolated_guests_cannot_reach_each_other() {
    if !require_root("isolated_guests_cannot_reach_each_other") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("iso", &["host", "one", "two"]);
    let (host, one, two) = (
        namespaces.name("host").to_owned(),
        namespaces.name("one").to_owned(),
        namespaces.name("two").to_owned(),
    );
    let subnet = Subnet::default();
    let first = subnet.allocate(|_| false).unwrap();
    let second = subnet.allocate(|address| address == first).unwrap();
    let guest_one = add_guest(
        &host,
        &one,
        "bgtap1",
        &guest_argument(subnet, first, "00000000000000b1"),
    );
    let guest_two = add_guest(
        &host,
        &two,
        "bgtap2",
        &guest_argument(subnet, second, "00000000000000b2"),
    );
    let guests = BTreeSet::from([
        guest_port(&guest_one, "bgtap1"),
        guest_port(&guest_two, "bgtap2"),
    ]);
    // The uplink is only a name in the ruleset here; it need not exist.
    // Where br_netfilter is built in, bridged IPv4 also passes the inet
    // forward hook; turn that off so the bridge table alone must stop
    // switched frames between ports attached without the isolated flag.
    if std::path::Path::new("/proc/sys/net/bridge").exists() {
        exec(
            &host,
            &["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0"],
        );
    }

    let setup = |isolated_ports: bool, isolate_vms: bool| {
        let guests = guests.clone();
        block_in_netns(&host, move || async move {
            let network = LinuxHostNetwork::connect().unwrap();
            network
                .ensure_bridge(&BridgeConfig {
                    name: "banger0".to_owned(),
                    subnet,
                })
                .await
                .unwrap();
            network
                .attach_to_bridge("bgtap1", "banger0", isolated_ports)
                .await
                .unwrap();
            network
                .attach_to_bridge("bgtap2", "banger0", isolated_ports)
                .await
                .unwrap();
            network.enable_ip_forwarding().await.unwrap();
            let config = NatConfig {
                bridge: "banger0".to_owned(),
                subnet,
                uplink: "up0".to_owned(),
                isolate_vms,
                dns_port: 53,
                guests: guests.clone(),
            };
            nat::apply(&NftCommand::new(), &config).await.unwrap();
        });
    };

    // Control: without isolation (`isolate_vms = false`, the opt-in) the
    // guests talk.
    setup(false, false);
    assert!(
        reaches(&one, second),
        "control: guests should reach each other"
    );
    // A port attached without the isolated flag is still isolated by the
    // bridge table.
    setup(false, true);
    assert!(reaches(&one, subnet.gateway()));
    assert!(!pings(&one, second), "the bridge forwards between guests");
    assert!(!pings(&two, first), "the bridge forwards between guests");

    // Isolated bridge ports stop layer 2 traffic between guests...
    setup(true, false);
    assert!(reaches(&one, subnet.gateway()));
    assert!(reaches(&two, subnet.gateway()));
    assert!(!pings(&one, second), "isolated ports still switch frames");
    // ...but guests routing to each other through the gateway would still
    // get through (both directions: replies must be routed too).
    let gateway = subnet.gateway().to_string();
    ip(
        &one,
        &["route", "add", &format!("{second}/32"), "via", &gateway],
    );
    ip(
        &two,
        &["route", "add", &format!("{first}/32"), "via", &gateway],
    );
    assert!(
        reaches(&one, second),
        "control: routed path should work without the nft rule"
    );

    // isolate_vms closes the routed path too.
    setup(true, true);
    assert!(reaches(&one, subnet.gateway()));
    assert!(!pings(&one, second), "routed path between guests is open");
    assert!(!pings(&two, first), "routed path between guests is open");
    ip(&one, &["route", "del", &format!("{second}/32")]);
    ip(&two, &["route", "del", &format!("{first}/32")]);
    assert!(!pings(&one, second));
    assert!(!pings(&two, first));
    assert!(reaches(&one, subnet.gateway()));
    assert!(reaches(&two, subnet.gateway()));

    let names = namespaces.names();
    drop(namespaces);
    assert_gone(&names);
}

#[test]
fn applying_nat_repeatedly_keeps_one_table() {
    if !require_root("applying_nat_repeatedly_keeps_one_table") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("nft", &["host"]);
    let host = namespaces.name("host").to_owned();

    let (first, hundredth, removed, removed_twice) = block_in_netns(&host, || async {
        let nft = NftCommand::new();
        let config = NatConfig {
            bridge: "banger0".to_owned(),
            subnet: Subnet::default(),
            uplink: "eth0".to_owned(),
            isolate_vms: true,
            dns_port: 53,
            guests: BTreeSet::new(),
        };
        nat::apply(&nft, &config).await.unwrap();
        let first = nat::summarize(&nft.list_ruleset_json().await.unwrap()).unwrap();
        for _ in 1..100 {
            nat::apply(&nft, &config).await.unwrap();
        }
        let hundredth = nat::summarize(&nft.list_ruleset_json().await.unwrap()).unwrap();
        nat::remove(&nft).await.unwrap();
        let removed = nat::summarize(&nft.list_ruleset_json().await.unwrap()).unwrap();
        nat::remove(&nft).await.unwrap();
        let removed_twice = nat::summarize(&nft.list_ruleset_json().await.unwrap()).unwrap();
        (first, hundredth, removed, removed_twice)
    });
    assert_eq!(first.tables, 2);
    // inet: input, forward, prerouting, output, postrouting; bridge:
    // prerouting, forward.
    assert_eq!(first.chains, 7);
    assert_eq!(first.rules, 28);
    assert_eq!(hundredth, first);
    assert_eq!(removed, nat::TableSummary::default());
    assert_eq!(removed_twice, nat::TableSummary::default());

    let names = namespaces.names();
    drop(namespaces);
    assert_gone(&names);
}

#[test]
fn a_refused_ruleset_keeps_the_previous_table() {
    if !require_root("a_refused_ruleset_keeps_the_previous_table") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("nftfail", &["host"]);
    let host = namespaces.name("host").to_owned();
    let (before, error, after) = block_in_netns(&host, || async {
        let nft = NftCommand::new();
        let config = NatConfig {
            bridge: "banger0".to_owned(),
            subnet: Subnet::default(),
            uplink: "eth0".to_owned(),
            isolate_vms: false,
            dns_port: 53,
            guests: BTreeSet::new(),
        };
        nat::apply(&nft, &config).await.unwrap();
        let before = nat::summarize(&nft.list_ruleset_json().await.unwrap()).unwrap();
        // A script that fails half-way: the transaction is all or nothing.
        let broken = format!(
            "{}add rule inet banger nosuchchain accept\n",
            nat::ruleset(&config).unwrap()
        );
        let error = nft.run_script(&broken).await.unwrap_err();
        let after = nat::summarize(&nft.list_ruleset_json().await.unwrap()).unwrap();
        (before, error.to_string(), after)
    });
    assert!(error.starts_with("nft refused the ruleset"), "{error}");
    assert_eq!(before, after);
    assert_eq!(after.rules, 23);
    drop(namespaces);
}

/// A stand-in for the host's resolver: answers every query with 192.0.2.53.
async fn fake_upstream(address: SocketAddr) {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{rdata::A, RData, Record};
    let socket = tokio::net::UdpSocket::bind(address).await.unwrap();
    let mut buffer = vec![0_u8; 4096];
    while let Ok((length, peer)) = socket.recv_from(&mut buffer).await {
        let query = Message::from_vec(&buffer[..length]).unwrap();
        let mut response = Message::new();
        response
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .add_queries(query.queries().to_vec());
        let name = query.queries()[0].name().clone();
        response.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 53))),
        ));
        let _ = socket.send_to(&response.to_vec().unwrap(), peer).await;
    }
}

/// Asks `server` for the A record of `name` from inside `netns`.
fn resolve(
    netns: &str,
    server: SocketAddr,
    name: &str,
) -> (hickory_proto::op::ResponseCode, Vec<Ipv4Addr>) {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{rdata::A, Name, RData, RecordType};
    let name = name.to_owned();
    in_netns(netns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut message = Message::new();
        message
            .set_id(99)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(
                Name::from_ascii(&name).unwrap(),
                RecordType::A,
            ));
        socket.send_to(&message.to_vec().unwrap(), server).unwrap();
        let mut buffer = vec![0_u8; 4096];
        let (length, _) = socket.recv_from(&mut buffer).expect("no DNS answer");
        let answer = Message::from_vec(&buffer[..length]).unwrap();
        let addresses = answer
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(A(address)) => Some(*address),
                _ => None,
            })
            .collect();
        (answer.response_code(), addresses)
    })
}

#[test]
fn guest_resolves_vm_names_through_the_gateway() {
    use banger_net::dns::{DnsConfig, DnsRecords, DnsServer};
    use hickory_proto::op::ResponseCode;
    if !require_root("guest_resolves_vm_names_through_the_gateway") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("dns", &["host", "guest"]);
    let (host, guest) = (
        namespaces.name("host").to_owned(),
        namespaces.name("guest").to_owned(),
    );
    let subnet = Subnet::default();
    let address = subnet.allocate(|_| false).unwrap();
    let network = add_guest(
        &host,
        &guest,
        "bgtap1",
        &guest_argument(subnet, address, "00000000000000c1"),
    );
    let dns_server = SocketAddr::new(network.dns[0].into(), 53);

    let records = DnsRecords::new();
    records.insert("dev", address);
    let (ready, is_ready) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let host_side = {
        let records = records.clone();
        let host = host.clone();
        std::thread::spawn(move || {
            block_in_netns(&host, move || async move {
                let network = LinuxHostNetwork::connect().unwrap();
                network
                    .ensure_bridge(&BridgeConfig {
                        name: "banger0".to_owned(),
                        subnet,
                    })
                    .await
                    .unwrap();
                network
                    .attach_to_bridge("bgtap1", "banger0", true)
                    .await
                    .unwrap();
                let upstream: SocketAddr = "127.0.0.1:5353".parse().unwrap();
                tokio::spawn(fake_upstream(upstream));
                let server = DnsServer::bind(dns_server, DnsConfig::new(vec![upstream]), records)
                    .await
                    .unwrap();
                ready.send(()).unwrap();
                tokio::task::spawn_blocking(move || stopped.recv())
                    .await
                    .unwrap()
                    .ok();
                server.shutdown().await.unwrap();
            });
        })
    };
    is_ready.recv().expect("DNS server did not start");
    let results = std::panic::catch_unwind(|| {
        assert!(reaches(&guest, network.gateway));
        let local = resolve(&guest, dns_server, "dev.banger.");
        records.insert("late", Ipv4Addr::new(172, 30, 0, 9));
        let late = resolve(&guest, dns_server, "late.banger.");
        let unknown = resolve(&guest, dns_server, "nope.banger.");
        let forwarded = resolve(&guest, dns_server, "example.com.");
        (local, late, unknown, forwarded)
    });
    let _ = stop.send(());
    host_side.join().unwrap();
    let (local, late, unknown, forwarded) =
        results.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert_eq!(local, (ResponseCode::NoError, vec![address]));
    assert_eq!(
        late,
        (ResponseCode::NoError, vec![Ipv4Addr::new(172, 30, 0, 9)])
    );
    assert_eq!(unknown, (ResponseCode::NXDomain, vec![]));
    assert_eq!(
        forwarded,
        (ResponseCode::NoError, vec![Ipv4Addr::new(192, 0, 2, 53)])
    );

    let names = namespaces.names();
    drop(namespaces);
    assert_gone(&names);
}

/// The median of `samples`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
fn pooled_taps_are_renamed_returned_clean_and_faster_than_creating() {
    use banger_net::pool::{TapFate, TapPool, TapSource};
    if !require_root("pooled_taps_are_renamed_returned_clean_and_faster_than_creating") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let namespaces = Namespaces::new("pool", &["host"]);
    let host = namespaces.name("host").to_owned();
    const ROUNDS: usize = 40;

    let (pooled_times, created_times, pool_after) = block_in_netns(&host, || async {
        let network = Arc::new(LinuxHostNetwork::connect().unwrap());
        network
            .ensure_bridge(&BridgeConfig::default())
            .await
            .unwrap();
        let pool = TapPool::new(network.clone(), "banger0", true, ROUNDS);
        assert_eq!(pool.fill().await.unwrap(), ROUNDS);
        let mut pooled_times = Vec::new();
        for index in 0..ROUNDS {
            let name = format!("bgtap{index}");
            let started = Instant::now();
            assert_eq!(pool.take(&name).await.unwrap(), TapSource::Pool);
            pooled_times.push(started.elapsed());
        }
        let empty = TapPool::new(network.clone(), "banger0", true, 0);
        let mut created_times = Vec::new();
        for index in ROUNDS..2 * ROUNDS {
            let name = format!("bgtap{index}");
            let started = Instant::now();
            assert_eq!(empty.take(&name).await.unwrap(), TapSource::Created);
            created_times.push(started.elapsed());
        }
        for index in ROUNDS..2 * ROUNDS {
            empty.give_back(&format!("bgtap{index}")).await.unwrap();
        }
        // Half go back to the pool; the rest find it full.
        let small = TapPool::new(network.clone(), "banger0", true, ROUNDS / 2);
        let mut fates = Vec::new();
        for index in 0..ROUNDS {
            fates.push(small.give_back(&format!("bgtap{index}")).await.unwrap());
        }
        assert_eq!(
            fates
                .iter()
                .filter(|fate| **fate == TapFate::Pooled)
                .count(),
            ROUNDS / 2
        );
        let pool_after = network.list_links("bg").await.unwrap();
        (pooled_times, created_times, pool_after)
    });
    let pooled = median(pooled_times);
    let created = median(created_times);
    eprintln!(
        "tap attach, median of {ROUNDS}: pooled (rename + up) {pooled:?}, created (tun + bridge + up) {created:?}"
    );
    assert!(
        pooled < created,
        "a pooled tap ({pooled:?}) should be faster than a new one ({created:?})"
    );
    assert_eq!(pool_after.len(), ROUNDS / 2, "{pool_after:?}");
    assert!(pool_after.iter().all(|name| name.starts_with("bgpool")));
    // Returned clean: down, still an isolated port of the bridge.
    let details = ip(&host, &["-d", "link", "show", &pool_after[0]]);
    assert!(details.contains("master banger0"), "{details}");
    assert!(details.contains("isolated on"), "{details}");
    assert!(details.contains("state DOWN"), "{details}");
    assert!(!details.contains(",UP"), "{details}");

    let names = namespaces.names();
    drop(namespaces);
    assert_gone(&names);
}

/// A host with a bridge, an uplink to `outside` (which routes the VM subnet
/// back through the host, like a LAN neighbour with a static route), a
/// second host network `other` (as docker0 would be, 10.88.0.0/24), one
/// guest on tap `bgtap1`, and banger's tables applied.
///
/// ```text
///  guest ns          host ns                         outside ns
///  eth0 172.30.0.2 ─ bgtap1 ─ banger0 172.30.0.1    up0 192.0.2.1 ── wan0 192.0.2.2
///                             other0 10.88.0.1 ── eth0 10.88.0.2 (other ns)
///                             lo 198.51.100.1
/// ```
struct RoutedLab {
    namespaces: Namespaces,
    guest: GuestNetwork,
}

impl RoutedLab {
    fn new(test: &str) -> Self {
        let namespaces = Namespaces::new(test, &["host", "guest", "outside", "other"]);
        let host = namespaces.name("host").to_owned();
        let outside = namespaces.name("outside").to_owned();
        let other = namespaces.name("other").to_owned();
        ip(
            &host,
            &[
                "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", &outside,
            ],
        );
        ip(&host, &["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        ip(&host, &["link", "set", "up0", "up"]);
        ip(&host, &["route", "add", "default", "via", "192.0.2.2"]);
        ip(&outside, &["addr", "add", "192.0.2.2/24", "dev", "wan0"]);
        ip(&outside, &["link", "set", "wan0", "up"]);
        ip(
            &outside,
            &["route", "add", "172.30.0.0/24", "via", "192.0.2.1"],
        );
        ip(
            &host,
            &[
                "link", "add", "other0", "type", "veth", "peer", "name", "eth0", "netns", &other,
            ],
        );
        ip(&host, &["addr", "add", "10.88.0.1/24", "dev", "other0"]);
        ip(&host, &["link", "set", "other0", "up"]);
        ip(&other, &["addr", "add", "10.88.0.2/24", "dev", "eth0"]);
        ip(&other, &["link", "set", "eth0", "up"]);
        ip(&other, &["route", "add", "default", "via", "10.88.0.1"]);
        ip(&host, &["addr", "add", "198.51.100.1/32", "dev", "lo"]);

        let subnet = Subnet::default();
        let address = subnet.allocate(|_| false).unwrap();
        let guest = add_guest(
            &host,
            namespaces.name("guest"),
            "bgtap1",
            &guest_argument(subnet, address, "00000000000000d1"),
        );
        let guests = BTreeSet::from([guest_port(&guest, "bgtap1")]);
        block_in_netns(&host, move || async move {
            let network = LinuxHostNetwork::connect().unwrap();
            network
                .ensure_bridge(&BridgeConfig {
                    name: "banger0".to_owned(),
                    subnet,
                })
                .await
                .unwrap();
            network
                .attach_to_bridge("bgtap1", "banger0", true)
                .await
                .unwrap();
            network.enable_ip_forwarding().await.unwrap();
            let config = NatConfig {
                bridge: "banger0".to_owned(),
                subnet,
                uplink: "up0".to_owned(),
                isolate_vms: true,
                dns_port: 53,
                guests,
            };
            nat::apply(&NftCommand::new(), &config).await.unwrap();
        });
        assert!(reaches(namespaces.name("guest"), subnet.gateway()));
        Self { namespaces, guest }
    }

    fn name(&self, role: &str) -> String {
        self.namespaces.name(role).to_owned()
    }

    fn finish(self) {
        let names = self.namespaces.names();
        drop(self.namespaces);
        assert_gone(&names);
    }
}

/// A TCP listener bound in `netns`; the kernel completes handshakes into
/// its backlog without anyone accepting.
fn listen(netns: &str, address: SocketAddr) -> TcpListener {
    in_netns(netns, move || TcpListener::bind(address).unwrap())
}

/// Whether a TCP connection from `netns` to `address` opens within two
/// seconds.
fn connects(netns: &str, address: SocketAddr) -> bool {
    in_netns(netns, move || {
        TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
    })
}

#[test]
fn outside_cannot_open_connections_to_guests_nor_guests_reach_other_host_networks() {
    if !require_root(
        "outside_cannot_open_connections_to_guests_nor_guests_reach_other_host_networks",
    ) {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = RoutedLab::new("outside");
    let (host, guest, outside, other) = (
        lab.name("host"),
        lab.name("guest"),
        lab.name("outside"),
        lab.name("other"),
    );
    let guest_service = SocketAddr::new(lab.guest.address.into(), 8080);
    let _guest_listener = listen(&guest, guest_service);
    // The host itself may connect to its guests (ssh does).
    assert!(
        connects(&host, guest_service),
        "host cannot reach the guest"
    );
    // A machine on the uplink's side that routes the subnet via the host
    // cannot open a connection to a guest.
    assert!(
        !connects(&outside, guest_service),
        "outside opened a connection to a guest"
    );
    // Neither can a host network that is not the uplink (docker0, say).
    assert!(
        !connects(&other, guest_service),
        "another host network opened a connection to a guest"
    );

    // The guest reaches the outside, masqueraded...
    let server_address: SocketAddr = "192.0.2.2:8080".parse().unwrap();
    let server = serve_peer_address(&outside, server_address);
    let response = http_get(&guest, server_address, Duration::from_secs(5))
        .expect("guest cannot reach outside");
    assert!(response.ends_with("\r\n\r\n192.0.2.1"), "{response}");
    assert_eq!(server.join().unwrap().as_deref(), Some("192.0.2.1"));
    // ...but not the host's other networks.
    let _other_listener = listen(&other, "10.88.0.2:8080".parse().unwrap());
    assert!(connects(&host, "10.88.0.2:8080".parse().unwrap()));
    assert!(
        !connects(&guest, "10.88.0.2:8080".parse().unwrap()),
        "guest reached another host network"
    );
    lab.finish();
}

#[test]
fn guest_reaches_only_dns_on_the_host() {
    if !require_root("guest_reaches_only_dns_on_the_host") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = RoutedLab::new("input");
    let (host, guest) = (lab.name("host"), lab.name("guest"));
    let gateway = lab.guest.gateway;
    // DNS over TCP on the gateway, and an sshd-like service on every host
    // address.
    let _dns = listen(&host, SocketAddr::new(gateway.into(), 53));
    let _service = listen(&host, "0.0.0.0:2222".parse().unwrap());
    for address in [gateway, Ipv4Addr::new(192, 0, 2, 1)] {
        assert!(
            connects(&host, SocketAddr::new(address.into(), 2222)),
            "control: the service listens on {address}"
        );
    }
    assert!(
        connects(&guest, SocketAddr::new(gateway.into(), 53)),
        "guest cannot reach DNS on the gateway"
    );
    for address in [
        gateway,
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(198, 51, 100, 1),
        Ipv4Addr::new(10, 88, 0, 1),
    ] {
        assert!(
            !connects(&guest, SocketAddr::new(address.into(), 2222)),
            "guest reached a host service on {address}"
        );
    }
    // The gateway still answers pings (a guest's first network check).
    assert!(pings(&guest, gateway));
    lab.finish();
}

/// Sends raw Ethernet frames out of `interface` in `netns`.
fn send_frames(netns: &str, interface: &str, frames: Vec<Vec<u8>>) {
    let interface = std::ffi::CString::new(interface).unwrap();
    in_netns(netns, move || {
        #[allow(unsafe_code)]
        // SAFETY: plain socket calls on a descriptor owned here, with a
        // zero-initialised sockaddr_ll of the right size.
        unsafe {
            let index = libc::if_nametoindex(interface.as_ptr());
            assert_ne!(index, 0, "no such interface");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut address: libc::sockaddr_ll = std::mem::zeroed();
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = i32::try_from(index).unwrap();
            address.sll_halen = 6;
            for frame in &frames {
                let sent = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::addr_of!(address).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
                );
                assert_eq!(
                    usize::try_from(sent).ok(),
                    Some(frame.len()),
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

fn ethernet(destination: [u8; 6], source: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 UDP datagram (no UDP checksum, which IPv4 allows).
fn ipv4_udp(source: Ipv4Addr, destination: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_length = u16::try_from(8 + payload.len()).unwrap();
    let total = 20 + udp_length;
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    let sum: u32 = packet
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap();
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&40000_u16.to_be_bytes());
    packet.extend_from_slice(&port.to_be_bytes());
    packet.extend_from_slice(&udp_length.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    packet
}

/// An ARP request "who has `target`? tell `sender_ip` at `sender_mac`".
fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    packet.extend_from_slice(&sender_mac);
    packet.extend_from_slice(&sender_ip.octets());
    packet.extend_from_slice(&[0; 6]);
    packet.extend_from_slice(&target.octets());
    packet
}

fn mac_of(netns: &str, interface: &str) -> [u8; 6] {
    let text = exec(
        netns,
        &["cat", &format!("/sys/class/net/{interface}/address")],
    );
    text.trim().parse::<MacAddress>().unwrap().octets()
}

/// The host's neighbour entry for `address` on the bridge, if any.
fn neighbour(host: &str, address: Ipv4Addr) -> String {
    ip(
        host,
        &["neigh", "show", &address.to_string(), "dev", "banger0"],
    )
    .trim()
    .to_owned()
}

#[test]
fn guests_send_only_from_their_own_mac_and_address() {
    if !require_root("guests_send_only_from_their_own_mac_and_address") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = RoutedLab::new("spoof");
    let (host, guest) = (lab.name("host"), lab.name("guest"));
    let gateway = lab.guest.gateway;
    let own_ip = lab.guest.address;
    let own_mac = lab.guest.mac.unwrap().octets();
    let other_ip = Ipv4Addr::new(172, 30, 0, 3);
    let other_mac = [0x06, 0, 0, 0, 0, 0xee];
    let bridge_mac = mac_of(&host, "banger0");

    // UDP to the DNS port on the gateway, which the input chain accepts:
    // only the bridge table can drop these.
    let receiver = in_netns(&host, move || {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(gateway.into(), 53)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        socket
    });
    let datagram = |mac: [u8; 6], source: Ipv4Addr, label: &str| {
        ethernet(
            bridge_mac,
            mac,
            0x0800,
            &ipv4_udp(source, gateway, 53, label.as_bytes()),
        )
    };
    send_frames(
        &guest,
        "eth0",
        vec![
            datagram(own_mac, other_ip, "wrong-ip"),
            datagram(other_mac, own_ip, "wrong-mac"),
            datagram(own_mac, Ipv4Addr::new(10, 9, 9, 9), "foreign-ip"),
            datagram(own_mac, own_ip, "own"),
        ],
    );
    let mut received = Vec::new();
    let mut buffer = [0_u8; 64];
    while let Ok((length, peer)) = receiver.recv_from(&mut buffer) {
        received.push(format!(
            "{} from {}",
            String::from_utf8_lossy(&buffer[..length]),
            peer.ip()
        ));
    }
    assert_eq!(received, [format!("own from {own_ip}")]);

    // ARP: the host learns a neighbour from a request addressed to it,
    // so a spoofed request would poison its cache.
    ip(&host, &["neigh", "flush", "dev", "banger0"]);
    let broadcast = [0xff; 6];
    let arp = |mac: [u8; 6], sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr| {
        ethernet(
            broadcast,
            mac,
            0x0806,
            &arp_request(sender_mac, sender_ip, target),
        )
    };
    send_frames(
        &guest,
        "eth0",
        vec![
            // Claiming another address...
            arp(own_mac, own_mac, other_ip, gateway),
            // ...from another MAC...
            arp(other_mac, other_mac, own_ip, gateway),
            // ...or naming another MAC inside the packet.
            arp(own_mac, other_mac, own_ip, gateway),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        neighbour(&host, other_ip),
        "",
        "ARP claiming another address"
    );
    assert!(
        !neighbour(&host, own_ip).contains("06:00:00:00:00:ee"),
        "ARP with another MAC: {}",
        neighbour(&host, own_ip)
    );
    // The guest's own request is learned.
    send_frames(&guest, "eth0", vec![arp(own_mac, own_mac, own_ip, gateway)]);
    std::thread::sleep(Duration::from_millis(300));
    let learned = neighbour(&host, own_ip);
    assert!(
        learned.contains(&MacAddress(own_mac).to_string()),
        "{learned}"
    );
    // IPv6 (or anything but IPv4 and ARP) does not leave a guest.
    lab.finish();
}
