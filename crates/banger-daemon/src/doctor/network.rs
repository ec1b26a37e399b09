//! Checks of the host network: netlink permission, nft, IPv4 forwarding, the
//! DNS port, the bridge, the tap pool and how the host resolves VM names.

use std::path::{Path, PathBuf};

use banger_proto::status::{Check, CheckStatus};

use super::host::{find_executable, version_output};
use super::{check, Doctor};
use crate::network::{Network, ResolvedState};

impl Doctor<'_> {
    /// Netlink permission, nft, IPv4 forwarding, the DNS port, the bridge,
    /// the tap pool and how the host resolves VM names.
    pub(super) async fn network_checks(&self) -> Vec<Check> {
        let config = &self.config.network;
        if !config.enabled {
            return vec![check(
                "network",
                CheckStatus::Ok,
                "disabled ([network] enabled = false): VMs get no NIC".to_owned(),
                None,
            )];
        }
        let mut checks = vec![
            netlink_permission(
                &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
                Path::new("/dev/net/tun"),
            ),
            nft().await,
            ip_forward(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok()),
        ];
        let Some(network) = self.network else {
            checks.push(check(
                "bridge",
                CheckStatus::Fail,
                "the network capability is not running".to_owned(),
                Some("restart bangerd and read its log"),
            ));
            return checks;
        };
        checks.push(dns_port(network).await);
        checks.push(bridge(network).await);
        checks.push(tap_pool(network));
        checks.push(host_resolution(network).await);
        checks.push(match network.egress_summary() {
            Ok(summary) => check("egress", CheckStatus::Ok, summary, None),
            Err(error) => check("egress", CheckStatus::Warn, error.to_string(), None),
        });
        checks
    }
}

/// CAP_NET_ADMIN (from `/proc/self/status`) and `/dev/net/tun`: what
/// creating the bridge and taps needs.
fn netlink_permission(status: &str, tun: &Path) -> Check {
    const CAP_NET_ADMIN: u32 = 12;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|bits| u64::from_str_radix(bits.trim(), 16).ok());
    let hint = "run bangerd as root, or give it CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)";
    match effective {
        Some(bits) if bits & (1 << CAP_NET_ADMIN) == 0 => {
            return check(
                "netlink",
                CheckStatus::Fail,
                "bangerd lacks CAP_NET_ADMIN: it cannot create links".to_owned(),
                Some(hint),
            )
        }
        None => {
            return check(
                "netlink",
                CheckStatus::Warn,
                "cannot read bangerd's capabilities".to_owned(),
                Some(hint),
            )
        }
        Some(_) => {}
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(tun) {
        Ok(_) => check(
            "netlink",
            CheckStatus::Ok,
            format!("CAP_NET_ADMIN held, {} usable", tun.display()),
            None,
        ),
        Err(error) => check(
            "netlink",
            CheckStatus::Fail,
            format!("cannot open {}: {error}", tun.display()),
            Some("load the tun module (`modprobe tun`)"),
        ),
    }
}

async fn nft() -> Check {
    let Some(path) = find_executable(Path::new("nft")) else {
        return check(
            "nft",
            CheckStatus::Fail,
            "nft not found in PATH: no NAT for guests".to_owned(),
            Some("apt install nftables"),
        );
    };
    let output = version_output(&path).await;
    match output {
        Ok(Ok(output)) if output.status.success() => check(
            "nft",
            CheckStatus::Ok,
            format!(
                "{} ({})",
                path.display(),
                String::from_utf8_lossy(&output.stdout).trim()
            ),
            None,
        ),
        _ => check(
            "nft",
            CheckStatus::Fail,
            format!("{} --version failed", path.display()),
            Some("reinstall nftables"),
        ),
    }
}

/// `net.ipv4.ip_forward`, from the text of its /proc file.
fn ip_forward(value: Option<String>) -> Check {
    match value.as_deref().map(str::trim) {
        Some("1") => check(
            "ip_forward",
            CheckStatus::Ok,
            "net.ipv4.ip_forward = 1".to_owned(),
            None,
        ),
        Some(other) => check(
            "ip_forward",
            CheckStatus::Fail,
            format!("net.ipv4.ip_forward = {other}: guests have no egress"),
            Some("bangerd sets it at start and something reset it: `sysctl -w net.ipv4.ip_forward=1`, and find what turns it off"),
        ),
        None => check(
            "ip_forward",
            CheckStatus::Fail,
            "cannot read /proc/sys/net/ipv4/ip_forward".to_owned(),
            None,
        ),
    }
}

async fn dns_port(network: &Network) -> Check {
    let address = network.dns_address();
    match network.dns_status().await {
        Ok(()) => check(
            "dns port",
            CheckStatus::Ok,
            format!("bangerd serves DNS on {address}"),
            None,
        ),
        Err(error) => check(
            "dns port",
            CheckStatus::Fail,
            format!("not serving on {address}: {error}"),
            Some(&format!(
                "another DNS server holds port {} on every address: make it bind only its own interfaces (dnsmasq: `bind-interfaces` and `except-interface={}`); bangerd retries at the next create",
                address.port(),
                network.settings().bridge.name
            )),
        ),
    }
}

async fn bridge(network: &Network) -> Check {
    let bridge = &network.settings().bridge;
    match network.bridge_status().await {
        Ok(Some(status)) if status.up => check(
            "bridge",
            CheckStatus::Ok,
            format!("{} up with {}", bridge.name, bridge.subnet),
            None,
        ),
        Ok(Some(_)) => check(
            "bridge",
            CheckStatus::Fail,
            format!("{} is down: VMs are cut off", bridge.name),
            Some(&format!(
                "`ip link set {} up`, or restart bangerd",
                bridge.name
            )),
        ),
        Ok(None) => check(
            "bridge",
            CheckStatus::Fail,
            format!("{} is missing: VMs are cut off", bridge.name),
            Some("restart bangerd to create it again"),
        ),
        Err(error) => check(
            "bridge",
            CheckStatus::Fail,
            crate::error::chain(&error),
            None,
        ),
    }
}

fn tap_pool(network: &Network) -> Check {
    let pool = network.pool_status();
    if pool.size == 0 {
        check(
            "tap pool",
            CheckStatus::Ok,
            "disabled ([network] tap_pool_size = 0): creates make their own taps".to_owned(),
            None,
        )
    } else if pool.ready == 0 {
        check(
            "tap pool",
            CheckStatus::Warn,
            format!("0 of {} taps ready: creates make their own taps", pool.size),
            Some("a pool that stays empty cannot create taps: read the daemon log"),
        )
    } else {
        check(
            "tap pool",
            CheckStatus::Ok,
            format!("{} of {} taps ready", pool.ready, pool.size),
            None,
        )
    }
}

/// Whether the host resolves `NAME.DOMAIN`: through systemd-resolved where
/// bangerd configured it, else through a dnsmasq or resolv.conf entry.
async fn host_resolution(network: &Network) -> Check {
    const NAME: &str = "host resolves VM names";
    let settings = network.settings();
    let (domain, bridge) = (&settings.domain, &settings.bridge.name);
    let server = network.dns_address();
    let why = match network.resolved_state() {
        ResolvedState::Configured => {
            return match network.resolved_routes().await {
                Some(Ok(true)) | None => check(
                    NAME,
                    CheckStatus::Ok,
                    format!("systemd-resolved sends ~{domain} to {server} on {bridge}"),
                    None,
                ),
                Some(Ok(false)) => check(
                    NAME,
                    CheckStatus::Warn,
                    format!("systemd-resolved no longer routes ~{domain} on {bridge} (restarted?)"),
                    Some("restart bangerd to configure it again"),
                ),
                Some(Err(error)) => check(
                    NAME,
                    CheckStatus::Warn,
                    format!("cannot ask systemd-resolved: {error}"),
                    None,
                ),
            };
        }
        ResolvedState::Failed(error) => {
            return check(
                NAME,
                CheckStatus::Warn,
                format!("configuring systemd-resolved failed: {error}"),
                Some("check `resolvectl status`, then restart bangerd"),
            )
        }
        ResolvedState::Disabled => "[network] resolved = false",
        ResolvedState::NotRunning => "systemd-resolved is not running",
        ResolvedState::OtherNamespace => {
            "bangerd runs in another network namespace than systemd-resolved"
        }
    };
    let mut dnsmasq = Vec::new();
    for dir in ["/etc/dnsmasq.d", "/etc/NetworkManager/dnsmasq.d"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            dnsmasq.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    dnsmasq.push(PathBuf::from("/etc/dnsmasq.conf"));
    let texts: Vec<String> = dnsmasq
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .collect();
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    manual_resolution(why, &resolv_conf, &texts, domain, server)
}

/// The check for a host without systemd-resolved routing: ok when
/// resolv.conf names the DNS server or a dnsmasq file forwards the domain
/// to it, else a warning with both ways to set it up.
fn manual_resolution(
    why: &str,
    resolv_conf: &str,
    dnsmasq: &[String],
    domain: &str,
    server: std::net::SocketAddr,
) -> Check {
    const NAME: &str = "host resolves VM names";
    let dnsmasq_line = if server.port() == 53 {
        format!("server=/{domain}/{}", server.ip())
    } else {
        format!("server=/{domain}/{}#{}", server.ip(), server.port())
    };
    let in_dnsmasq = dnsmasq
        .iter()
        .flat_map(|text| text.lines())
        .any(|line| line.trim() == dnsmasq_line);
    let in_resolv_conf = server.port() == 53
        && resolv_conf.lines().any(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some("nameserver") && words.next() == Some(&server.ip().to_string())
        });
    if in_dnsmasq {
        return check(
            NAME,
            CheckStatus::Ok,
            format!("{why}; dnsmasq has `{dnsmasq_line}`"),
            None,
        );
    }
    if in_resolv_conf {
        return check(
            NAME,
            CheckStatus::Ok,
            format!("{why}; /etc/resolv.conf names {}", server.ip()),
            None,
        );
    }
    let hint = if server.port() == 53 {
        format!(
            "run scripts/host-dns.sh (a NetworkManager or dnsmasq drop-in), or with dnsmasq add `{dnsmasq_line}` (e.g. /etc/dnsmasq.d/banger.conf); without, put `nameserver {}` first in /etc/resolv.conf (bangerd forwards other names to the servers after it)",
            server.ip()
        )
    } else {
        format!("run scripts/host-dns.sh, or with dnsmasq add `{dnsmasq_line}` (e.g. /etc/dnsmasq.d/banger.conf); resolv.conf cannot name a port other than 53")
    };
    check(
        NAME,
        CheckStatus::Warn,
        format!("{why}: the host does not resolve NAME.{domain} (guests do)"),
        Some(&hint),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_permission_needs_cap_net_admin_and_tun() {
        let root = "Name:\tbangerd\nCapEff:\t000001ffffffffff\n";
        let unprivileged = "Name:\tbangerd\nCapEff:\t0000000000000000\n";
        let only_net_admin = "CapEff:\t0000000000001000\n";
        let tun = Path::new("/dev/null");
        assert_eq!(netlink_permission(root, tun).status, CheckStatus::Ok);
        assert_eq!(
            netlink_permission(only_net_admin, tun).status,
            CheckStatus::Ok
        );
        let refused = netlink_permission(unprivileged, tun);
        assert_eq!(refused.status, CheckStatus::Fail);
        assert!(refused.hint.unwrap().contains("CAP_NET_ADMIN"));
        assert_eq!(netlink_permission("", tun).status, CheckStatus::Warn);
        let missing = netlink_permission(root, Path::new("/nonexistent/tun"));
        assert_eq!(missing.status, CheckStatus::Fail);
        assert!(
            missing.detail.contains("/nonexistent/tun"),
            "{}",
            missing.detail
        );
    }

    #[test]
    fn ip_forward_must_be_on() {
        assert_eq!(ip_forward(Some("1\n".to_owned())).status, CheckStatus::Ok);
        let off = ip_forward(Some("0\n".to_owned()));
        assert_eq!(off.status, CheckStatus::Fail);
        assert!(off
            .hint
            .unwrap()
            .contains("sysctl -w net.ipv4.ip_forward=1"));
        assert_eq!(ip_forward(None).status, CheckStatus::Fail);
    }

    #[test]
    fn manual_resolution_accepts_dnsmasq_or_resolv_conf_and_hints_both() {
        let server: std::net::SocketAddr = "172.30.0.1:53".parse().unwrap();
        let why = "systemd-resolved is not running";
        let bare = manual_resolution(why, "nameserver 1.1.1.1\n", &[], "banger", server);
        assert_eq!(bare.status, CheckStatus::Warn);
        assert_eq!(
            bare.detail,
            "systemd-resolved is not running: the host does not resolve NAME.banger (guests do)"
        );
        let hint = bare.hint.unwrap();
        assert!(hint.contains("`server=/banger/172.30.0.1`"), "{hint}");
        assert!(hint.contains("`nameserver 172.30.0.1`"), "{hint}");
        let with_dnsmasq = manual_resolution(
            why,
            "",
            &["# banger\nserver=/banger/172.30.0.1\n".to_owned()],
            "banger",
            server,
        );
        assert_eq!(with_dnsmasq.status, CheckStatus::Ok);
        let with_resolv_conf = manual_resolution(
            why,
            "nameserver 172.30.0.1\nnameserver 1.1.1.1\n",
            &[],
            "banger",
            server,
        );
        assert_eq!(with_resolv_conf.status, CheckStatus::Ok);
        // Another port: resolv.conf cannot express it.
        let other_port: std::net::SocketAddr = "172.30.0.1:5353".parse().unwrap();
        let check = manual_resolution(why, "nameserver 172.30.0.1\n", &[], "banger", other_port);
        assert_eq!(check.status, CheckStatus::Warn);
        assert!(check
            .hint
            .unwrap()
            .contains("`server=/banger/172.30.0.1#5353`"));
    }
}
