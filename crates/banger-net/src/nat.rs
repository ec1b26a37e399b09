//! NAT and filtering for guests, in two nftables tables owned by banger:
//! `inet banger` (routed traffic: NAT, forward, input) and `bridge banger`
//! (frames entering the bridge from a guest's tap). Nothing else of the
//! host's ruleset is touched. Applying works like this:
//!
//! 1. [`ruleset`] renders both tables from a [`NatConfig`] as an `nft -f`
//!    script that first declares each table (a no-op if it exists), then
//!    deletes it, then defines it afresh.
//! 2. [`Nft::run_script`] feeds the script to `nft -f -`. nft applies one
//!    script as one transaction, so the tables are replaced atomically and N
//!    applies leave exactly one copy of each rule; a failed apply leaves the
//!    previous tables in place.
//! 3. [`remove_script`] deletes the tables the same way (declare, delete),
//!    so removing absent tables succeeds.
//!
//! Every base chain keeps `policy accept`: a drop policy would also drop the
//! host's other traffic (Docker, libvirt, the host's own services). What is
//! not for banger's bridge is never matched; what is, and is not explicitly
//! accepted, hits an explicit drop scoped to the bridge.
//!
//! `inet banger`:
//! - `input` (filter): from the bridge, only established/related traffic,
//!   DNS (UDP and TCP) to the gateway on the DNS port, and pings of the
//!   gateway; everything else a guest sends to any host address is dropped.
//! - `forward` (filter): bridge → uplink from the subnet is accepted,
//!   uplink → bridge only for established/related connections; bridge →
//!   bridge (a guest routing to another through the gateway) is accepted
//!   only without `isolate_vms`; anything else into or out of the bridge is
//!   dropped: other host interfaces (docker0, a VPN, libvirt's bridges),
//!   sources outside the subnet, and connections opened from outside.
//! - `postrouting` (nat, srcnat): traffic from the subnet leaving through
//!   the uplink is masqueraded.
//!
//! `bridge banger`, per tap ([`GuestPort`], one element of the set
//! `guests`, added when the VM starts and removed when it is deleted; the
//! whole set is re-rendered at every apply, so reconciling never
//! duplicates):
//! The bridge table recognises guests' ports by name: `bgtap<N>` (a VM's
//! tap) and `bgpool<N>` (a pooled tap), the only ports banger attaches.
//! (`meta ibrname`, the bridge a port belongs to, needs
//! `CONFIG_NFT_BRIDGE_META`, which not every kernel has.)
//!
//! - `prerouting`: a frame entering from a guest's port must be IPv4
//!   or ARP, and its (port, source MAC, source IP) — for ARP also the
//!   sender MAC and IP inside the packet — must be a `guests` element: a
//!   guest sends only as itself, and a port with no element (a pooled tap)
//!   sends nothing. With `isolate_vms`, ARP may only ask for the gateway.
//! - `forward`: with `isolate_vms`, frames switched from one guest port
//!   to another are dropped.
//!
//! Isolation between VMs therefore has three layers: the bridge port
//! `isolated` flag ([`crate::netlink::HostNetwork::attach_to_bridge`]),
//! the bridge `forward` drop (for a port attached without the flag), and
//! the `inet` forward drop for the routed path.
//!
//! Published ports, egress policies and network groups ([`Policy`],
//! rendered by [`ruleset_with`]):
//! - `inet banger` `prerouting` (nat, dstnat) and `output` (nat, for the
//!   host's own connections): one `dnat` rule per published port, matching
//!   the host address (`fib daddr type local` for 0.0.0.0) and port;
//!   `postrouting` masquerades connections from 127.0.0.0/8 leaving
//!   through the bridge (with `route_localnet` on the bridge), and the
//!   `forward` chain accepts DNATed connections into the bridge.
//! - egress: the set `egress_limited` holds every guest under `none` or
//!   `allow=`; in `forward`, such a guest's packets pass only to an
//!   (address . network) element of `egress_networks` or an (address .
//!   address) element of `egress_learned`, which the DNS server fills with
//!   the answers for allowed names, each with its answer's TTL as timeout.
//!   Established connections pass without that check only while their
//!   conntrack mark is the guest's current limit's (`egress_epoch`,
//!   `egress_current`), so a changed policy checks live connections again
//!   and cuts what it no longer allows. Replies of published ports'
//!   connections (`ct status dnat`) pass.
//! - network groups: ordered (address . address) pairs of guests in one
//!   group, in the set `group_peers` of both tables, are accepted in the
//!   inet and bridge `forward` chains and in the bridge ARP target check,
//!   before the isolation drops; such guests' taps are attached without the
//!   `isolated` port flag.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::ipam::Subnet;
use crate::mac::MacAddress;
use crate::netlink::{POOL_TAP_PREFIX, TAP_PREFIX};

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "banger";
/// The family of the table filtering frames from the taps.
pub const BRIDGE_TABLE_FAMILY: &str = "bridge";
/// The set in the bridge table naming each guest's port, MAC and address.
pub const GUEST_SET: &str = "guests";

/// The transport of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn keyword(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A host address and port DNATed to a guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortForward {
    pub transport: Transport,
    /// `0.0.0.0`: every local address.
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

impl PortForward {
    /// The `dnat` rule (for `prerouting` and `output`).
    fn rule(&self) -> String {
        let destination = if self.host_ip.is_unspecified() {
            "fib daddr type local".to_owned()
        } else {
            format!("ip daddr {}", self.host_ip)
        };
        format!(
            "{destination} {} dport {} dnat ip to {}:{}",
            self.transport.keyword(),
            self.host_port,
            self.guest,
            self.guest_port
        )
    }
}

/// Published ports, egress limits and network groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub forwards: BTreeSet<PortForward>,
    /// Guests under an egress limit.
    pub egress: BTreeMap<Ipv4Addr, EgressLimit>,
    /// (guest, destination) pairs the DNS server allowed, until when.
    pub learned: BTreeMap<(Ipv4Addr, Ipv4Addr), Instant>,
    /// Ordered (guest, guest) pairs of one network group.
    pub group_peers: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
}

/// What a guest under an egress limit may reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressLimit {
    /// Networks it may reach (empty: none beyond DNS and learned
    /// addresses).
    pub networks: Vec<(Ipv4Addr, u8)>,
    /// The conntrack mark of connections opened under this limit
    /// (nonzero, different for a different limit): connections opened
    /// under another one are checked again, packet by packet.
    pub epoch: u32,
}

/// The set of guests under an egress limit.
pub const EGRESS_LIMITED_SET: &str = "egress_limited";
/// The set of (guest . network) an egress-limited guest may reach.
pub const EGRESS_NETWORKS_SET: &str = "egress_networks";
/// The set of (guest . address) the DNS server learned, with timeouts.
pub const EGRESS_LEARNED_SET: &str = "egress_learned";
/// The map of guest to the conntrack mark of its limit's connections.
pub const EGRESS_EPOCH_MAP: &str = "egress_epoch";
/// The set of (guest . mark) of current limits.
pub const EGRESS_CURRENT_SET: &str = "egress_current";
/// The set of (guest . guest) pairs of one network group.
pub const GROUP_PEERS_SET: &str = "group_peers";

fn elements_line(elements: &[String]) -> String {
    if elements.is_empty() {
        String::new()
    } else {
        format!("\t\telements = {{ {} }}\n", elements.join(", "))
    }
}

/// What a guest's tap may send from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPort {
    pub tap: String,
    pub mac: MacAddress,
    pub address: Ipv4Addr,
}

impl GuestPort {
    /// The set element, `"TAP" . MAC . ADDRESS`.
    fn element(&self) -> String {
        format!("\"{}\" . {} . {}", self.tap, self.mac, self.address)
    }
}

/// What the tables are made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// The bridge the guests' taps are attached to.
    pub bridge: String,
    pub subnet: Subnet,
    /// The interface guest traffic leaves through, usually
    /// [`crate::netlink::HostNetwork::default_route_interface`].
    pub uplink: String,
    /// Drop traffic between VMs.
    pub isolate_vms: bool,
    /// The port the DNS server listens on at the gateway.
    pub dns_port: u16,
    /// The guests' ports.
    pub guests: BTreeSet<GuestPort>,
}

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("Failed to run `{program}`")]
    SpawnNft {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the ruleset: {stderr}")]
    ApplyRuleset { stderr: String },
    #[error("Failed to list the nftables ruleset: {stderr}")]
    ListRuleset { stderr: String },
    #[error("nft printed JSON that could not be read")]
    ParseJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("Interface name `{name}` cannot be used in a ruleset")]
    InvalidInterface { name: String },
    /// Only [`RecordingNft`] returns this.
    #[error("Injected nft failure")]
    Injected,
}

fn check_interface(name: &str) -> Result<(), NatError> {
    if !crate::netlink::is_valid_interface_name(name) || name.contains('"') || name.contains('\\') {
        return Err(NatError::InvalidInterface {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The nft script that (re)creates banger's tables from `config`.
///
/// # Errors
/// An interface name that is not a valid interface name (it would be
/// interpolated into the script).
pub fn ruleset(config: &NatConfig) -> Result<String, NatError> {
    ruleset_with(config, &Policy::default(), Instant::now())
}

/// [`ruleset`] with published ports, egress limits and network groups;
/// learned addresses get the time they have left after `now`.
///
/// # Errors
/// An interface name that is not a valid interface name.
pub fn ruleset_with(config: &NatConfig, policy: &Policy, now: Instant) -> Result<String, NatError> {
    check_interface(&config.bridge)?;
    check_interface(&config.uplink)?;
    for guest in &config.guests {
        check_interface(&guest.tap)?;
    }
    let NatConfig {
        bridge,
        uplink,
        isolate_vms,
        dns_port,
        guests,
        ..
    } = config;
    let network = config.subnet.network_cidr();
    let gateway = config.subnet.gateway();
    let ports = format!("{{ \"{TAP_PREFIX}*\", \"{POOL_TAP_PREFIX}*\" }}");
    let (routed_between_guests, switched_between_guests, arp_targets) = if *isolate_vms {
        (
            "drop",
            format!("\t\tiifname {ports} oifname {ports} drop\n"),
            format!("\t\tiifname {ports} arp daddr ip != {gateway} drop\n"),
        )
    } else {
        ("accept", String::new(), String::new())
    };
    let elements = if guests.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = guests.iter().map(GuestPort::element).collect();
        format!("\t\telements = {{ {} }}\n", list.join(", "))
    };
    let forwards: String = policy
        .forwards
        .iter()
        .map(|forward| format!("\t\t{}\n", forward.rule()))
        .collect();
    let limited: Vec<String> = policy.egress.keys().map(ToString::to_string).collect();
    let epochs: Vec<String> = policy
        .egress
        .iter()
        .map(|(guest, limit)| format!("{guest} : {:#x}", limit.epoch))
        .collect();
    let current: Vec<String> = policy
        .egress
        .iter()
        .map(|(guest, limit)| format!("{guest} . {:#x}", limit.epoch))
        .collect();
    let networks: Vec<String> = policy
        .egress
        .iter()
        .flat_map(|(guest, limit)| {
            limit
                .networks
                .iter()
                .map(move |(address, prefix)| format!("{guest} . {address}/{prefix}"))
        })
        .collect();
    let learned: Vec<String> = policy
        .learned
        .iter()
        .filter(|(_, until)| **until > now)
        .map(|((guest, address), until)| {
            learned_element(*guest, *address, until.saturating_duration_since(now))
        })
        .collect();
    let peers: Vec<String> = policy
        .group_peers
        .iter()
        .map(|(from, to)| format!("{from} . {to}"))
        .collect();
    let limited = elements_line(&limited);
    let epochs = elements_line(&epochs);
    let current = elements_line(&current);
    let networks = elements_line(&networks);
    let learned = elements_line(&learned);
    let peers = elements_line(&peers);
    let (arp_group, switched_group) = if *isolate_vms {
        (
            format!("\t\tiifname {ports} ether type arp arp saddr ip . arp daddr ip @{GROUP_PEERS_SET} accept\n"),
            format!(
                "\t\tether type ip ip saddr . ip daddr @{GROUP_PEERS_SET} accept\n\
                 \t\tether type arp arp saddr ip . arp daddr ip @{GROUP_PEERS_SET} accept\n"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let mut script = String::new();
    for family in [TABLE_FAMILY, BRIDGE_TABLE_FAMILY] {
        let _ = write!(
            script,
            "table {family} {TABLE_NAME}\ndelete table {family} {TABLE_NAME}\n"
        );
    }
    let _ = write!(
        script,
        "table {TABLE_FAMILY} {TABLE_NAME} {{\n\
         \tset {EGRESS_LIMITED_SET} {{\n\
         \t\ttype ipv4_addr\n\
         {limited}\
         \t}}\n\
         \tmap {EGRESS_EPOCH_MAP} {{\n\
         \t\ttype ipv4_addr : mark\n\
         {epochs}\
         \t}}\n\
         \tset {EGRESS_CURRENT_SET} {{\n\
         \t\ttype ipv4_addr . mark\n\
         {current}\
         \t}}\n\
         \tset {EGRESS_NETWORKS_SET} {{\n\
         \t\ttype ipv4_addr . ipv4_addr\n\
         \t\tflags interval\n\
         {networks}\
         \t}}\n\
         \tset {EGRESS_LEARNED_SET} {{\n\
         \t\ttype ipv4_addr . ipv4_addr\n\
         \t\tflags timeout\n\
         {learned}\
         \t}}\n\
         \tset {GROUP_PEERS_SET} {{\n\
         \t\ttype ipv4_addr . ipv4_addr\n\
         {peers}\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" ct state established,related accept\n\
         \t\tiifname \"{bridge}\" ip saddr {network} ip daddr {gateway} udp dport {dns_port} accept\n\
         \t\tiifname \"{bridge}\" ip saddr {network} ip daddr {gateway} tcp dport {dns_port} accept\n\
         \t\tiifname \"{bridge}\" ip saddr {network} ip daddr {gateway} icmp type echo-request accept\n\
         \t\tiifname \"{bridge}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" oifname \"{bridge}\" ip saddr . ip daddr @{GROUP_PEERS_SET} accept\n\
         \t\tiifname \"{bridge}\" ct status dnat accept\n\
         \t\tiifname \"{bridge}\" ip saddr @{EGRESS_LIMITED_SET} ct state established,related ip saddr . ct mark @{EGRESS_CURRENT_SET} accept\n\
         \t\tiifname \"{bridge}\" ip saddr @{EGRESS_LIMITED_SET} ip saddr . ip daddr @{EGRESS_NETWORKS_SET} ct mark set ip saddr map @{EGRESS_EPOCH_MAP} accept\n\
         \t\tiifname \"{bridge}\" ip saddr @{EGRESS_LIMITED_SET} ip saddr . ip daddr @{EGRESS_LEARNED_SET} ct mark set ip saddr map @{EGRESS_EPOCH_MAP} accept\n\
         \t\tiifname \"{bridge}\" ip saddr @{EGRESS_LIMITED_SET} drop\n\
         \t\tiifname \"{bridge}\" oifname \"{bridge}\" ip saddr {network} ip daddr {network} {routed_between_guests}\n\
         \t\tiifname \"{bridge}\" oifname \"{uplink}\" ip saddr {network} accept\n\
         \t\tiifname \"{uplink}\" oifname \"{bridge}\" ip daddr {network} ct state established,related accept\n\
         \t\tiifname != \"{bridge}\" oifname \"{bridge}\" ip daddr {network} ct status dnat accept\n\
         \t\tiifname \"{bridge}\" drop\n\
         \t\toifname \"{bridge}\" drop\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         {forwards}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         {forwards}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{uplink}\" ip saddr {network} masquerade\n\
         \t\toifname \"{bridge}\" ip saddr 127.0.0.0/8 ct status dnat masquerade\n\
         \t}}\n\
         }}\n\
         table {BRIDGE_TABLE_FAMILY} {TABLE_NAME} {{\n\
         \tset {GUEST_SET} {{\n\
         \t\ttype ifname . ether_addr . ipv4_addr\n\
         {elements}\
         \t}}\n\
         \tset {GROUP_PEERS_SET} {{\n\
         \t\ttype ipv4_addr . ipv4_addr\n\
         {peers}\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority filter; policy accept;\n\
         \t\tiifname {ports} ether type != {{ ip, arp }} drop\n\
         \t\tiifname {ports} ether type ip iifname . ether saddr . ip saddr != @{GUEST_SET} drop\n\
         \t\tiifname {ports} ether type arp iifname . ether saddr . arp saddr ip != @{GUEST_SET} drop\n\
         \t\tiifname {ports} ether type arp iifname . arp saddr ether . arp saddr ip != @{GUEST_SET} drop\n\
         {arp_group}\
         {arp_targets}\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         {switched_group}\
         {switched_between_guests}\
         \t}}\n\
         }}\n"
    );
    Ok(script)
}

/// The set element of a learned (guest, address) pair.
fn learned_element(guest: Ipv4Addr, address: Ipv4Addr, left: Duration) -> String {
    format!("{guest} . {address} timeout {}s", left.as_secs().max(1))
}

/// The nft script that lets `guest` reach `address` for `ttl` (refreshing
/// the timeout of an element that is already there).
#[must_use]
pub fn learn_script(guest: Ipv4Addr, address: Ipv4Addr, ttl: Duration) -> String {
    let element = learned_element(guest, address, ttl);
    let key = format!("{guest} . {address}");
    format!(
        "add element {TABLE_FAMILY} {TABLE_NAME} {EGRESS_LEARNED_SET} {{ {key} }}\n\
         delete element {TABLE_FAMILY} {TABLE_NAME} {EGRESS_LEARNED_SET} {{ {key} }}\n\
         add element {TABLE_FAMILY} {TABLE_NAME} {EGRESS_LEARNED_SET} {{ {element} }}\n"
    )
}

/// The nft script that deletes banger's tables; succeeds if they are
/// absent.
#[must_use]
pub fn remove_script() -> String {
    format!(
        "table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n\
         table {BRIDGE_TABLE_FAMILY} {TABLE_NAME}\ndelete table {BRIDGE_TABLE_FAMILY} {TABLE_NAME}\n"
    )
}

/// The nft script that lets `guest` send from its tap (a no-op if it
/// already may).
///
/// # Errors
/// The tap name cannot be used in a ruleset.
pub fn add_guest_script(guest: &GuestPort) -> Result<String, NatError> {
    check_interface(&guest.tap)?;
    Ok(format!(
        "add element {BRIDGE_TABLE_FAMILY} {TABLE_NAME} {GUEST_SET} {{ {} }}\n",
        guest.element()
    ))
}

/// The nft script that takes `guest`'s element out of the set (adding it
/// first, so an absent element is no error). Fails only if the bridge
/// table is gone, which took the element with it.
///
/// # Errors
/// The tap name cannot be used in a ruleset.
pub fn remove_guest_script(guest: &GuestPort) -> Result<String, NatError> {
    let add = add_guest_script(guest)?;
    Ok(format!(
        "{add}delete element {BRIDGE_TABLE_FAMILY} {TABLE_NAME} {GUEST_SET} {{ {} }}\n",
        guest.element()
    ))
}

/// What `nft -j list ruleset` says about banger's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSummary {
    /// How many `banger` tables exist in the `inet` and `bridge` families
    /// (2 when all is well, unless something is badly wrong).
    pub tables: usize,
    pub chains: usize,
    pub rules: usize,
    /// Elements of the `guests` set.
    pub guests: usize,
}

impl TableSummary {
    /// Both tables are there.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.tables >= 2
    }
}

/// Counts banger's tables, chains, rules and guest elements in `nft -j list
/// ruleset` output.
///
/// # Errors
/// The text is not JSON.
pub fn summarize(ruleset_json: &str) -> Result<TableSummary, NatError> {
    let value: serde_json::Value =
        serde_json::from_str(ruleset_json).map_err(|source| NatError::ParseJson { source })?;
    let ours = |object: &serde_json::Value| {
        matches!(
            object.get("family").and_then(serde_json::Value::as_str),
            Some(TABLE_FAMILY | BRIDGE_TABLE_FAMILY)
        ) && (object.get("table").or_else(|| object.get("name")))
            .and_then(serde_json::Value::as_str)
            == Some(TABLE_NAME)
    };
    let mut summary = TableSummary::default();
    let items = value
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for item in items {
        if let Some(table) = item.get("table") {
            summary.tables += usize::from(ours(table));
        } else if let Some(chain) = item.get("chain") {
            summary.chains += usize::from(chain.get("table").is_some() && ours(chain));
        } else if let Some(rule) = item.get("rule") {
            summary.rules += usize::from(ours(rule));
        } else if let Some(set) = item.get("set") {
            if ours(set) && set.get("name").and_then(serde_json::Value::as_str) == Some(GUEST_SET) {
                summary.guests += set
                    .get("elem")
                    .and_then(serde_json::Value::as_array)
                    .map_or(0, Vec::len);
            }
        }
    }
    Ok(summary)
}

/// The elements of the `egress_learned` set in `nft -j list ruleset`
/// output: (guest, address, time left), for carrying them across a
/// re-render at daemon start. Elements without an expiry are left out.
///
/// # Errors
/// The text is not JSON.
pub fn learned_elements(
    ruleset_json: &str,
) -> Result<Vec<(Ipv4Addr, Ipv4Addr, Duration)>, NatError> {
    let value: serde_json::Value =
        serde_json::from_str(ruleset_json).map_err(|source| NatError::ParseJson { source })?;
    let mut learned = Vec::new();
    let items = value
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for item in items {
        let Some(set) = item.get("set") else {
            continue;
        };
        if set.get("family").and_then(serde_json::Value::as_str) != Some(TABLE_FAMILY)
            || set.get("table").and_then(serde_json::Value::as_str) != Some(TABLE_NAME)
            || set.get("name").and_then(serde_json::Value::as_str) != Some(EGRESS_LEARNED_SET)
        {
            continue;
        }
        for element in set
            .get("elem")
            .and_then(serde_json::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Some(inner) = element.get("elem") else {
                continue;
            };
            let parts = inner
                .get("val")
                .and_then(|val| val.get("concat"))
                .and_then(serde_json::Value::as_array);
            let expires = inner.get("expires").and_then(serde_json::Value::as_u64);
            let (Some([guest, address]), Some(expires)) = (parts.map(Vec::as_slice), expires)
            else {
                continue;
            };
            let parse = |value: &serde_json::Value| value.as_str()?.parse::<Ipv4Addr>().ok();
            if let (Some(guest), Some(address)) = (parse(guest), parse(address)) {
                learned.push((guest, address, Duration::from_secs(expires)));
            }
        }
    }
    Ok(learned)
}

/// Running nft.
#[async_trait]
pub trait Nft: Send + Sync {
    /// Applies a script as one transaction (`nft -f -`).
    async fn run_script(&self, script: &str) -> Result<(), NatError>;

    /// `nft -j list ruleset`.
    async fn list_ruleset_json(&self) -> Result<String, NatError>;
}

/// Replaces banger's table with the one `config` describes.
///
/// # Errors
/// The ruleset cannot be rendered or nft refuses it.
pub async fn apply(nft: &dyn Nft, config: &NatConfig) -> Result<(), NatError> {
    nft.run_script(&ruleset(config)?).await
}

/// Replaces banger's tables with those `config` and `policy` describe.
///
/// # Errors
/// The ruleset cannot be rendered or nft refuses it.
pub async fn apply_with(
    nft: &dyn Nft,
    config: &NatConfig,
    policy: &Policy,
) -> Result<(), NatError> {
    nft.run_script(&ruleset_with(config, policy, Instant::now())?)
        .await
}

/// Deletes banger's table (on daemon shutdown / teardown).
///
/// # Errors
/// nft fails.
pub async fn remove(nft: &dyn Nft) -> Result<(), NatError> {
    nft.run_script(&remove_script()).await
}

/// Lets `guest` send from its tap.
///
/// # Errors
/// nft fails (the bridge table is missing, say).
pub async fn add_guest(nft: &dyn Nft, guest: &GuestPort) -> Result<(), NatError> {
    nft.run_script(&add_guest_script(guest)?).await
}

/// Stops `guest`'s tap from sending.
///
/// # Errors
/// nft fails (the bridge table is missing, which removed the element too).
pub async fn remove_guest(nft: &dyn Nft, guest: &GuestPort) -> Result<(), NatError> {
    nft.run_script(&remove_guest_script(guest)?).await
}

/// The real nft binary.
///
/// It runs in the network namespace of the thread that spawns it.
#[derive(Clone, Debug)]
pub struct NftCommand {
    program: String,
}

impl NftCommand {
    /// `nft` from `PATH`.
    #[must_use]
    pub fn new() -> Self {
        Self::with_program("nft")
    }

    #[must_use]
    pub fn with_program(program: &str) -> Self {
        Self {
            program: program.to_owned(),
        }
    }

    fn spawn_error(&self, source: std::io::Error) -> NatError {
        NatError::SpawnNft {
            program: self.program.clone(),
            source,
        }
    }
}

impl Default for NftCommand {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Nft for NftCommand {
    async fn run_script(&self, script: &str) -> Result<(), NatError> {
        let mut child = tokio::process::Command::new(&self.program)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|source| self.spawn_error(source))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(NatError::ApplyRuleset {
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    async fn list_ruleset_json(&self) -> Result<String, NatError> {
        let output = tokio::process::Command::new(&self.program)
            .args(["-j", "list", "ruleset"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(NatError::ListRuleset {
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// An [`Nft`] that records scripts and answers listings with a canned
/// ruleset.
#[derive(Clone, Default)]
pub struct RecordingNft {
    scripts: Arc<Mutex<Vec<String>>>,
    fail: Arc<Mutex<bool>>,
    listing: Arc<Mutex<String>>,
}

impl RecordingNft {
    #[must_use]
    pub fn new() -> Self {
        Self {
            listing: Arc::new(Mutex::new("{\"nftables\": []}".to_owned())),
            ..Self::default()
        }
    }

    /// Every script run so far.
    #[must_use]
    pub fn scripts(&self) -> Vec<String> {
        lock(&self.scripts).clone()
    }

    /// Makes the following `run_script` calls fail.
    pub fn fail_scripts(&self, fail: bool) {
        *lock(&self.fail) = fail;
    }

    /// What `list_ruleset_json` returns.
    pub fn set_listing(&self, json: &str) {
        json.clone_into(&mut lock(&self.listing));
    }
}

#[async_trait]
impl Nft for RecordingNft {
    async fn run_script(&self, script: &str) -> Result<(), NatError> {
        lock(&self.scripts).push(script.to_owned());
        if *lock(&self.fail) {
            return Err(NatError::Injected);
        }
        Ok(())
    }

    async fn list_ruleset_json(&self) -> Result<String, NatError> {
        Ok(lock(&self.listing).clone())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> GuestPort {
        GuestPort {
            tap: "bgtap0".to_owned(),
            mac: MacAddress([0x06, 0, 0, 0, 0, 0xa1]),
            address: Ipv4Addr::new(172, 30, 0, 2),
        }
    }

    fn config(isolate_vms: bool) -> NatConfig {
        NatConfig {
            bridge: "banger0".to_owned(),
            subnet: Subnet::default(),
            uplink: "eth0".to_owned(),
            isolate_vms,
            dns_port: 53,
            guests: BTreeSet::from([guest()]),
        }
    }

    #[test]
    fn ruleset_text() {
        let isolated = ruleset(&config(true)).unwrap();
        assert!(isolated.starts_with(
            "table inet banger\ndelete table inet banger\n\
             table bridge banger\ndelete table bridge banger\n"
        ));
        for line in [
            // Never a drop policy: other forwarded traffic is not ours.
            "type filter hook forward priority filter; policy accept;",
            "iifname \"banger0\" ip saddr 172.30.0.0/24 ip daddr 172.30.0.1 udp dport 53 accept",
            "iifname \"banger0\" ip saddr 172.30.0.0/24 ip daddr 172.30.0.1 tcp dport 53 accept",
            "iifname \"banger0\" oifname \"banger0\" ip saddr 172.30.0.0/24 ip daddr 172.30.0.0/24 drop",
            "iifname \"banger0\" oifname \"eth0\" ip saddr 172.30.0.0/24 accept",
            "iifname \"eth0\" oifname \"banger0\" ip daddr 172.30.0.0/24 ct state established,related accept",
            "\t\tiifname \"banger0\" drop\n\t\toifname \"banger0\" drop\n\t}",
            "oifname \"eth0\" ip saddr 172.30.0.0/24 masquerade",
            "elements = { \"bgtap0\" . 06:00:00:00:00:a1 . 172.30.0.2 }",
            "iifname { \"bgtap*\", \"bgpool*\" } ether type ip iifname . ether saddr . ip saddr != @guests drop",
            "iifname { \"bgtap*\", \"bgpool*\" } arp daddr ip != 172.30.0.1 drop",
            "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tether type ip ip saddr . ip daddr @group_peers accept\n\
             \t\tether type arp arp saddr ip . arp daddr ip @group_peers accept\n\
             \t\tiifname { \"bgtap*\", \"bgpool*\" } oifname { \"bgtap*\", \"bgpool*\" } drop\n",
        ] {
            assert!(isolated.contains(line), "missing {line:?} in\n{isolated}");
        }
        assert!(!isolated.contains("policy drop"));
        // The input chain accepts nothing but DNS and pings to the gateway.
        let input = isolated.split("chain forward").next().unwrap();
        assert_eq!(input.matches(" accept\n").count(), 4, "{input}");

        let open = ruleset(&NatConfig {
            guests: BTreeSet::new(),
            ..config(false)
        })
        .unwrap();
        assert!(open.contains(
            "iifname \"banger0\" oifname \"banger0\" ip saddr 172.30.0.0/24 ip daddr 172.30.0.0/24 accept"
        ));
        assert!(!open.contains("oifname { \"bgtap*\""));
        assert!(!open.contains("arp daddr"));
        assert!(!open.contains("elements"));
    }

    fn policy() -> Policy {
        let guest = Ipv4Addr::new(172, 30, 0, 2);
        let peer = Ipv4Addr::new(172, 30, 0, 3);
        Policy {
            forwards: BTreeSet::from([
                PortForward {
                    transport: Transport::Tcp,
                    host_ip: Ipv4Addr::LOCALHOST,
                    host_port: 8080,
                    guest,
                    guest_port: 80,
                },
                PortForward {
                    transport: Transport::Udp,
                    host_ip: Ipv4Addr::UNSPECIFIED,
                    host_port: 5353,
                    guest,
                    guest_port: 53,
                },
            ]),
            egress: BTreeMap::from([(
                guest,
                EgressLimit {
                    networks: vec![(Ipv4Addr::new(10, 0, 0, 0), 8)],
                    epoch: 0x2a,
                },
            )]),
            learned: BTreeMap::from([
                (
                    (guest, Ipv4Addr::new(192, 0, 2, 9)),
                    Instant::now() + Duration::from_secs(300),
                ),
                ((guest, Ipv4Addr::new(192, 0, 2, 10)), Instant::now()),
            ]),
            group_peers: BTreeSet::from([(guest, peer), (peer, guest)]),
        }
    }

    #[test]
    fn policy_ruleset_text() {
        let script = ruleset_with(&config(true), &policy(), Instant::now()).unwrap();
        if let Ok(path) = std::env::var("BANGER_WRITE_RULESET") {
            std::fs::write(path, &script).unwrap();
        }
        for line in [
            "\t\tip daddr 127.0.0.1 tcp dport 8080 dnat ip to 172.30.0.2:80\n",
            "\t\tfib daddr type local udp dport 5353 dnat ip to 172.30.0.2:53\n",
            "elements = { 172.30.0.2 }",
            "elements = { 172.30.0.2 . 10.0.0.0/8 }",
            "elements = { 172.30.0.2 : 0x2a }",
            "elements = { 172.30.0.2 . 0x2a }",
            "oifname \"banger0\" ip saddr 127.0.0.0/8 ct status dnat masquerade",
            "iifname \"banger0\" ip saddr @egress_limited drop",
            "iifname != \"banger0\" oifname \"banger0\" ip daddr 172.30.0.0/24 ct status dnat accept",
            "elements = { 172.30.0.2 . 172.30.0.3, 172.30.0.3 . 172.30.0.2 }",
            "ether type ip ip saddr . ip daddr @group_peers accept",
        ] {
            assert!(script.contains(line), "missing {line:?} in\n{script}");
        }
        // Each forward is in prerouting and output; expired learned
        // addresses are left out.
        assert_eq!(script.matches("dnat ip to 172.30.0.2:80").count(), 2);
        assert!(script.contains("172.30.0.2 . 192.0.2.9 timeout 29"));
        assert!(!script.contains("192.0.2.10"));
        // Without a policy the sets are empty and nothing is forwarded.
        let plain = ruleset(&config(true)).unwrap();
        assert!(!plain.contains("dnat ip to"));
        assert_eq!(plain.matches("elements").count(), 1);
    }

    #[test]
    fn learned_elements_are_read_back() {
        let json = r#"{"nftables": [
            {"set": {"family": "inet", "name": "egress_learned", "table": "banger",
              "type": ["ipv4_addr", "ipv4_addr"], "flags": ["timeout"],
              "elem": [{"elem": {"val": {"concat": ["172.30.0.2", "192.0.2.10"]},
                                 "timeout": 60, "expires": 42}}]}},
            {"set": {"family": "inet", "name": "egress_learned", "table": "other",
              "elem": [{"elem": {"val": {"concat": ["10.0.0.1", "10.0.0.2"]},
                                 "timeout": 60, "expires": 42}}]}}
        ]}"#;
        assert_eq!(
            learned_elements(json).unwrap(),
            [(
                Ipv4Addr::new(172, 30, 0, 2),
                Ipv4Addr::new(192, 0, 2, 10),
                Duration::from_secs(42)
            )]
        );
        assert!(learned_elements("nope").is_err());
    }

    #[test]
    fn learn_script_refreshes_the_timeout() {
        assert_eq!(
            learn_script(
                Ipv4Addr::new(172, 30, 0, 2),
                Ipv4Addr::new(192, 0, 2, 9),
                Duration::from_secs(60)
            ),
            "add element inet banger egress_learned { 172.30.0.2 . 192.0.2.9 }\n\
             delete element inet banger egress_learned { 172.30.0.2 . 192.0.2.9 }\n\
             add element inet banger egress_learned { 172.30.0.2 . 192.0.2.9 timeout 60s }\n"
        );
    }

    #[test]
    fn guest_scripts_are_idempotent() {
        assert_eq!(
            add_guest_script(&guest()).unwrap(),
            "add element bridge banger guests { \"bgtap0\" . 06:00:00:00:00:a1 . 172.30.0.2 }\n"
        );
        let remove = remove_guest_script(&guest()).unwrap();
        assert!(remove.starts_with(&add_guest_script(&guest()).unwrap()));
        assert!(remove.ends_with(
            "delete element bridge banger guests { \"bgtap0\" . 06:00:00:00:00:a1 . 172.30.0.2 }\n"
        ));
        let bad = GuestPort {
            tap: "x\" accept".to_owned(),
            ..guest()
        };
        assert!(add_guest_script(&bad).is_err());
        assert!(ruleset(&NatConfig {
            guests: BTreeSet::from([bad]),
            ..config(true)
        })
        .is_err());
    }

    #[test]
    fn ruleset_refuses_interface_names_that_could_inject() {
        for uplink in ["eth0\" accept", "", "a\\b", "sixteen-chars-xx"] {
            let config = NatConfig {
                uplink: uplink.to_owned(),
                ..config(false)
            };
            assert!(
                matches!(ruleset(&config), Err(NatError::InvalidInterface { .. })),
                "{uplink}"
            );
        }
    }

    #[test]
    fn remove_script_tolerates_an_absent_table() {
        assert_eq!(
            remove_script(),
            "table inet banger\ndelete table inet banger\n\
             table bridge banger\ndelete table bridge banger\n"
        );
    }

    #[test]
    fn summarize_counts_only_bangers_table() {
        let json = r#"{"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "banger", "handle": 1}},
            {"table": {"family": "ip", "name": "banger", "handle": 2}},
            {"table": {"family": "inet", "name": "filter", "handle": 3}},
            {"chain": {"family": "inet", "table": "banger", "name": "forward", "handle": 1}},
            {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1}},
            {"rule": {"family": "inet", "table": "banger", "chain": "forward", "handle": 3, "expr": []}},
            {"rule": {"family": "inet", "table": "banger", "chain": "forward", "handle": 4, "expr": []}},
            {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 5, "expr": []}},
            {"table": {"family": "bridge", "name": "banger", "handle": 6}},
            {"set": {"family": "bridge", "table": "banger", "name": "guests", "elem": [1, 2]}}
        ]}"#;
        let summary = summarize(json).unwrap();
        assert_eq!(
            summary,
            TableSummary {
                tables: 2,
                chains: 1,
                rules: 2,
                guests: 2,
            }
        );
        assert!(summary.complete());
        assert!(summarize("nope").is_err());
    }

    #[tokio::test]
    async fn apply_and_remove_go_through_nft() {
        let nft = RecordingNft::new();
        apply(&nft, &config(true)).await.unwrap();
        remove(&nft).await.unwrap();
        assert_eq!(
            nft.scripts(),
            [ruleset(&config(true)).unwrap(), remove_script()]
        );
        nft.fail_scripts(true);
        assert!(matches!(
            apply(&nft, &config(true)).await,
            Err(NatError::Injected)
        ));
    }
}
