//! `doctor`: honest checks of the host and configuration, each ok / warn /
//! fail with a fix hint. Runs in the daemon, which sees the host as root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::status::{Check, CheckStatus, DoctorReport};

use crate::access::AccessPolicy;
use crate::config::Config;
use crate::images::ImageService;
use crate::network::{Network, ResolvedState};
use crate::paths::StatePaths;

/// Below this much free space in the state dir, creates will soon fail.
const LOW_SPACE_BYTES: u64 = 5 << 30;
const CRITICAL_SPACE_BYTES: u64 = 1 << 30;

pub struct Doctor<'a> {
    pub backends: &'a crate::backends::Backends,
    pub clone_reason: &'a str,
    pub config: &'a Config,
    pub paths: &'a StatePaths,
    pub images: &'a ImageService,
    pub access: &'a AccessPolicy,
    /// The network capability; `None` when networking is disabled.
    pub network: Option<&'a Network>,
    pub catalog: &'a crate::catalog::CatalogService,
}

fn check(name: &str, status: CheckStatus, detail: String, hint: Option<&str>) -> Check {
    Check {
        name: name.to_owned(),
        status,
        detail,
        hint: hint.map(str::to_owned),
    }
}

impl Doctor<'_> {
    pub async fn run(&self) -> DoctorReport {
        let mut checks = vec![
            self.state_dir(),
            check(
                "default backend",
                CheckStatus::Ok,
                format!("{} ({})", self.backends.default, self.backends.reason),
                None,
            ),
            self.firecracker().await,
            kvm(),
            self.qemu().await,
            tool("mkfs.ext4", "apt install e2fsprogs"),
            tool("resize2fs", "apt install e2fsprogs"),
            tool("e2fsck", "apt install e2fsprogs"),
            tool(
                "gpgv",
                "apt install gpgv (checks kernel signatures from the catalog)",
            ),
            self.clone_strategy(),
        ];
        let catalog = self.catalog.catalog().await;
        checks.push(self.catalog_check(&catalog));
        let catalog = catalog.ok().flatten();
        checks.push(self.default_artifact("image", catalog.as_ref()));
        checks.push(self.default_artifact("kernel", catalog.as_ref()));
        checks.push(self.access_group());
        checks.extend(self.network_checks().await);
        DoctorReport { checks }
    }

    /// Netlink permission, nft, IPv4 forwarding, the DNS port, the bridge,
    /// the tap pool and how the host resolves VM names.
    async fn network_checks(&self) -> Vec<Check> {
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
        checks
    }

    fn state_dir(&self) -> Check {
        let root = &self.paths.root;
        match nix::sys::statvfs::statvfs(root) {
            Ok(stats) => {
                let free = stats.blocks_available() * stats.fragment_size();
                let detail = format!(
                    "{} on {}, {:.1} GiB free",
                    root.display(),
                    filesystem_name(root),
                    free as f64 / f64::from(1_u32 << 30)
                );
                if free < CRITICAL_SPACE_BYTES {
                    check(
                        "state dir",
                        CheckStatus::Fail,
                        detail,
                        Some("free space or move the state dir (--state-dir)"),
                    )
                } else if free < LOW_SPACE_BYTES {
                    check(
                        "state dir",
                        CheckStatus::Warn,
                        detail,
                        Some("every VM's root disk lives here; free some space"),
                    )
                } else {
                    check("state dir", CheckStatus::Ok, detail, None)
                }
            }
            Err(error) => check(
                "state dir",
                CheckStatus::Fail,
                format!("cannot stat {}: {error}", root.display()),
                None,
            ),
        }
    }

    async fn firecracker(&self) -> Check {
        let binary = &self.config.firecracker.binary;
        let Some(path) = find_executable(binary) else {
            return check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} not found", binary.display()),
                Some("install Firecracker and set `[firecracker] binary` in the config"),
            );
        };
        let output = version_output(&path).await;
        match output {
            Ok(Ok(output)) if output.status.success() => {
                let version = String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                check(
                    "firecracker",
                    CheckStatus::Ok,
                    format!("{} ({version})", path.display()),
                    None,
                )
            }
            Ok(Ok(output)) => check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} --version failed ({})", path.display(), output.status),
                None,
            ),
            Ok(Err(error)) => check(
                "firecracker",
                CheckStatus::Fail,
                format!("cannot run {}: {error}", path.display()),
                None,
            ),
            Err(_) => check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} --version did not answer within 5 s", path.display()),
                None,
            ),
        }
    }

    fn clone_strategy(&self) -> Check {
        if self.clone_reason.starts_with("copy") {
            check(
                "clone strategy",
                CheckStatus::Warn,
                self.clone_reason.to_owned(),
                Some("put the state dir on XFS (mkfs.xfs -m reflink=1) or btrfs for O(1) clones"),
            )
        } else {
            check(
                "clone strategy",
                CheckStatus::Ok,
                self.clone_reason.to_owned(),
                None,
            )
        }
    }

    async fn qemu(&self) -> Check {
        match find_executable(&self.config.qemu.binary) {
            None => check(
                "qemu",
                CheckStatus::Warn,
                format!("{} not found", self.config.qemu.binary.display()),
                Some("apt install qemu-system-x86 (needed where Firecracker cannot run)"),
            ),
            Some(path) => check(
                "qemu",
                CheckStatus::Ok,
                format!(
                    "{}; accelerator {}",
                    path.display(),
                    self.backends.qemu_accel().await
                ),
                None,
            ),
        }
    }

    fn catalog_check(
        &self,
        catalog: &Result<Option<banger_catalog::Catalog>, crate::catalog::CatalogError>,
    ) -> Check {
        let url = &self.config.catalog.url;
        match catalog {
            Ok(None) => check(
                "catalog",
                CheckStatus::Ok,
                "none configured; images and kernels are imported".to_owned(),
                None,
            ),
            Ok(Some(catalog)) => check(
                "catalog",
                CheckStatus::Ok,
                format!(
                    "{url}: {} image(s), {} kernel(s)",
                    catalog.images.len(),
                    catalog.kernels.len()
                ),
                None,
            ),
            Err(error) => check(
                "catalog",
                CheckStatus::Fail,
                format!("{url} cannot be loaded: {}", crate::error::chain(error)),
                Some("check `[catalog] url` and that the host reaches it"),
            ),
        }
    }

    fn default_artifact(&self, kind: &str, catalog: Option<&banger_catalog::Catalog>) -> Check {
        let (name, found, hint) = if kind == "image" {
            let name = &self.config.vm.image;
            (
                name,
                self.images.image(name).is_ok(),
                format!("`banger image import {name} FILE`"),
            )
        } else {
            let name = &self.config.vm.kernel;
            (
                name,
                self.images.kernel(name).is_ok(),
                format!("`banger kernel import {name} FILE`"),
            )
        };
        let label = format!("default {kind}");
        let in_catalog = catalog.is_some_and(|catalog| {
            if kind == "image" {
                catalog.image(name, None).is_some()
            } else {
                catalog.kernel(name, None).is_some()
            }
        });
        if !found && in_catalog {
            return check(
                &label,
                CheckStatus::Ok,
                format!("`{name}` is not local but is in the catalog (`vm create` pulls it)"),
                None,
            );
        }
        if found {
            check(
                &label,
                CheckStatus::Ok,
                format!("`{name}` is registered"),
                None,
            )
        } else {
            check(
                &label,
                CheckStatus::Warn,
                format!("`{name}` is not registered; `vm create` needs --{kind}"),
                Some(&hint),
            )
        }
    }

    fn access_group(&self) -> Check {
        match self.access.group_id {
            Some(gid) => check(
                "access group",
                CheckStatus::Ok,
                format!(
                    "root and members of `{}` (gid {gid}) may use the socket",
                    self.access.group_name
                ),
                None,
            ),
            None => check(
                "access group",
                CheckStatus::Warn,
                format!(
                    "group `{}` does not exist: only root can use banger",
                    self.access.group_name
                ),
                Some(&format!(
                    "`groupadd {}` and add users to it",
                    self.access.group_name
                )),
            ),
        }
    }
}

fn kvm() -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => check(
            "kvm",
            CheckStatus::Ok,
            "/dev/kvm is accessible".to_owned(),
            None,
        ),
        Err(error) => check(
            "kvm",
            CheckStatus::Fail,
            format!("cannot open /dev/kvm: {error}"),
            Some("enable virtualization in firmware and load kvm_intel or kvm_amd"),
        ),
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
            "with dnsmasq, add `{dnsmasq_line}` (e.g. /etc/dnsmasq.d/banger.conf); without, put `nameserver {}` first in /etc/resolv.conf (bangerd forwards other names to the servers after it)",
            server.ip()
        )
    } else {
        format!("with dnsmasq, add `{dnsmasq_line}` (e.g. /etc/dnsmasq.d/banger.conf); resolv.conf cannot name a port other than 53")
    };
    check(
        NAME,
        CheckStatus::Warn,
        format!("{why}: the host does not resolve NAME.{domain} (guests do)"),
        Some(&hint),
    )
}

/// `PROGRAM --version`, given 5 s.
async fn version_output(
    program: &Path,
) -> Result<std::io::Result<std::process::Output>, tokio::time::error::Elapsed> {
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(program)
            .arg("--version")
            .output(),
    )
    .await
}

fn tool(name: &str, install: &str) -> Check {
    match find_executable(Path::new(name)) {
        Some(path) => check(name, CheckStatus::Ok, path.display().to_string(), None),
        None => check(
            name,
            CheckStatus::Warn,
            format!("{name} not found in PATH"),
            Some(install),
        ),
    }
}

/// `binary` itself if it has a slash, else the first match in `PATH`.
pub fn find_executable(binary: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 {
        return is_executable(binary).then(|| binary.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

/// The filesystem type of `path`, by statfs magic.
fn filesystem_name(path: &Path) -> String {
    match nix::sys::statfs::statfs(path) {
        Ok(stats) => {
            let magic = stats.filesystem_type().0 as u64;
            match magic {
                0x5846_5342 => "xfs".to_owned(),
                0x9123_683e => "btrfs".to_owned(),
                0xef53 => "ext4".to_owned(),
                0x0102_1994 => "tmpfs".to_owned(),
                0x794c_7630 => "overlayfs".to_owned(),
                other => format!("filesystem 0x{other:x}"),
            }
        }
        Err(_) => "unknown filesystem".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_executable_searches_path_and_checks_mode() {
        assert!(find_executable(Path::new("sh")).is_some());
        assert!(find_executable(Path::new("definitely-not-a-banger-tool")).is_none());
        assert_eq!(
            find_executable(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert!(find_executable(Path::new("/etc/passwd")).is_none());
    }

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

    #[test]
    fn worst_status_wins() {
        let report = DoctorReport {
            checks: vec![
                check("a", CheckStatus::Ok, String::new(), None),
                check("b", CheckStatus::Warn, String::new(), None),
            ],
        };
        assert_eq!(report.worst(), CheckStatus::Warn);
    }
}
