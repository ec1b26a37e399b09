//! Bridge and tap devices, through rtnetlink (never the `ip` binary).
//!
//! Every host side effect goes through the [`HostNetwork`] trait:
//! [`LinuxHostNetwork`] is the real implementation, [`RecordingHostNetwork`]
//! a fake that records typed calls, keeps a model of the links it was asked
//! to make, and can fail the Nth call. Callers receive the implementation
//! explicitly (`Arc<dyn HostNetwork>`); nothing switches on `cfg!(test)`.
//!
//! Naming: a VM's tap is `bgtap<N>` ([`tap_name`]), a pre-created tap
//! waiting in the pool is `bgpool<N>` ([`pool_tap_name`]), both at most 15
//! bytes (`IFNAMSIZ - 1`). Indexes are chosen by the daemon, not derived
//! from the VM id. A pooled tap handed to a VM is renamed to the VM's name,
//! so the name alone says which role a tap has: reconciliation recognises
//! banger's own by [`parse_tap_name`] / [`parse_pool_tap_name`], deletes
//! `bgtap<N>` no VM record claims and keeps (up to the pool size) the
//! `bgpool<N>` ones.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteType};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkUnspec, RouteMessageBuilder};

use crate::ipam::Subnet;

/// The default bridge name.
pub const DEFAULT_BRIDGE: &str = "banger0";
/// The prefix of every tap banger creates.
pub const TAP_PREFIX: &str = "bgtap";
/// Linux interface names are at most 15 bytes.
pub const MAX_INTERFACE_NAME: usize = 15;

/// The prefix of the taps waiting in the pool.
pub const POOL_TAP_PREFIX: &str = "bgpool";

/// The name of VM tap number `index`: `bgtap0`, `bgtap1`, ….
#[must_use]
pub fn tap_name(index: u32) -> String {
    format!("{TAP_PREFIX}{index}")
}

/// The index of a banger VM tap name, `None` for any other interface name.
/// Only the canonical spelling counts (`bgtap01` is not banger's).
#[must_use]
pub fn parse_tap_name(name: &str) -> Option<u32> {
    parse_indexed(name, TAP_PREFIX)
}

/// The name of pool tap number `index`: `bgpool0`, `bgpool1`, ….
#[must_use]
pub fn pool_tap_name(index: u32) -> String {
    format!("{POOL_TAP_PREFIX}{index}")
}

/// The index of a pool tap name, `None` for any other interface name.
#[must_use]
pub fn parse_pool_tap_name(name: &str) -> Option<u32> {
    parse_indexed(name, POOL_TAP_PREFIX)
}

fn parse_indexed(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    let index: u32 = digits.parse().ok()?;
    (digits.bytes().all(|byte| byte.is_ascii_digit()) && format!("{prefix}{index}") == name)
        .then_some(index)
}

/// Whether `name` can be a Linux interface name.
#[must_use]
pub fn is_valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'/' && byte != b':')
}

/// The bridge: its name and its address (the subnet's gateway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub subnet: Subnet,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_BRIDGE.to_owned(),
            subnet: Subnet::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("Invalid interface name `{name}`")]
    InvalidName { name: String },
    #[error("Failed to open a netlink socket")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to list network links")]
    ListLinks {
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to list routes")]
    ListRoutes {
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Network link `{name}` does not exist")]
    FindLink { name: String },
    #[error("`{name}` exists but is not a bridge")]
    NotABridge { name: String },
    #[error("Failed to create bridge `{name}`")]
    CreateBridge {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to add address {address} to `{name}`")]
    AddAddress {
        name: String,
        address: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to bring `{name}` up")]
    SetUp {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to create tap `{name}`")]
    CreateTap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to delete `{name}`")]
    DeleteLink {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to attach `{name}` to bridge `{bridge}`")]
    AttachLink {
        name: String,
        bridge: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to rename `{name}` to `{new_name}`")]
    RenameLink {
        name: String,
        new_name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to set `{name}` down")]
    SetDown {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to enable IPv4 forwarding")]
    EnableForwarding {
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to enable route_localnet on {link}")]
    EnableRouteLocalnet {
        link: String,
        #[source]
        source: std::io::Error,
    },
    /// Only [`RecordingHostNetwork`] returns this (the kernel's EEXIST
    /// comes as [`NetlinkError::RenameLink`]).
    #[error("Network link `{name}` already exists")]
    LinkExists { name: String },
    /// Only [`RecordingHostNetwork`] returns this.
    #[error("Injected failure of call {call}")]
    Injected { call: usize },
}

/// The host network side effects banger needs.
#[async_trait]
pub trait HostNetwork: Send + Sync {
    /// Creates the bridge if missing, adds the gateway address if missing,
    /// and brings it up. Idempotent.
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetlinkError>;

    /// Creates a persistent tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
    /// owned by root) that outlives this process. Existing taps of the same
    /// name are reused.
    async fn create_tap(&self, name: &str) -> Result<(), NetlinkError>;

    /// Makes `link` a port of `bridge` and brings it up. `isolated` sets the
    /// bridge port's isolated flag: isolated ports cannot talk to each other
    /// at layer 2, only to non-isolated ports (the bridge's own address).
    async fn attach_to_bridge(
        &self,
        link: &str,
        bridge: &str,
        isolated: bool,
    ) -> Result<(), NetlinkError>;

    /// Deletes a tap, bridge or other link. Absent links are fine.
    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError>;

    /// Names of the links whose name starts with `prefix`, sorted.
    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetlinkError>;

    /// The interface of the IPv4 default route (lowest metric), where NAT
    /// sends guest traffic. `None` when there is no default route.
    async fn default_route_interface(&self) -> Result<Option<String>, NetlinkError>;

    /// Writes 1 to `/proc/sys/net/ipv4/ip_forward`.
    async fn enable_ip_forwarding(&self) -> Result<(), NetlinkError>;

    /// Writes 1 to `/proc/sys/net/ipv4/conf/LINK/route_localnet`, so
    /// connections to 127.0.0.1 that published ports DNAT to a guest may
    /// be routed out of `link`.
    async fn enable_route_localnet(&self, _link: &str) -> Result<(), NetlinkError> {
        Ok(())
    }

    /// The state of link `name`, `None` when it does not exist.
    async fn link_status(&self, name: &str) -> Result<Option<LinkStatus>, NetlinkError>;

    /// Sets `name` down. A bridge forgets the addresses it learned on a port
    /// that goes down.
    async fn set_link_down(&self, name: &str) -> Result<(), NetlinkError>;

    /// Renames `name` to `new_name`, setting it down first if it is up
    /// (Linux renames only down links); with `up` the renamed link is
    /// brought up in the same request as the rename.
    async fn rename_link(&self, name: &str, new_name: &str, up: bool) -> Result<(), NetlinkError>;
}

/// What [`HostNetwork::link_status`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Administratively up.
    pub up: bool,
    /// For a tap: a process (a VMM) has it open.
    pub carrier: bool,
    /// The bridge the link is a port of.
    pub controller: Option<String>,
}

/// The real implementation over an rtnetlink socket.
///
/// The socket belongs to the network namespace of the thread that called
/// [`LinuxHostNetwork::connect`]; taps are created through `/dev/net/tun`
/// and the sysctl is written from the calling thread, so they act on that
/// thread's namespace too (tests rely on this).
#[derive(Clone)]
pub struct LinuxHostNetwork {
    handle: rtnetlink::Handle,
}

impl LinuxHostNetwork {
    /// Opens the netlink socket and spawns its connection task on the
    /// current tokio runtime.
    ///
    /// # Errors
    /// The socket cannot be opened.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Connect { source })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn find_link(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        if !is_valid_interface_name(name) {
            return Err(NetlinkError::InvalidName {
                name: name.to_owned(),
            });
        }
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(error) if errno(&error) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(NetlinkError::ListLinks { source }),
        }
    }

    async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.find_link(name)
            .await?
            .map(|link| link.header.index)
            .ok_or_else(|| NetlinkError::FindLink {
                name: name.to_owned(),
            })
    }

    async fn set_up(&self, name: &str, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|source| NetlinkError::SetUp {
                name: name.to_owned(),
                source,
            })
    }

    async fn has_address(
        &self,
        index: u32,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<bool, NetlinkError> {
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(|source| NetlinkError::ListLinks { source })?
        {
            let matches = message.header.prefix_len == prefix_len
                && message
                    .attributes
                    .iter()
                    .any(|attribute| matches!(attribute, AddressAttribute::Address(IpAddr::V4(found)) if *found == address));
            if matches {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl HostNetwork for LinuxHostNetwork {
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetlinkError> {
        let name = bridge.name.as_str();
        let index = match self.find_link(name).await? {
            Some(link) if is_bridge(&link) => link.header.index,
            Some(_) => {
                return Err(NetlinkError::NotABridge {
                    name: name.to_owned(),
                })
            }
            None => {
                let created = self
                    .handle
                    .link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await;
                match created {
                    // Someone else (a concurrent ensure) made it: fine.
                    Err(error) if errno(&error) != Some(libc::EEXIST) => {
                        return Err(NetlinkError::CreateBridge {
                            name: name.to_owned(),
                            source: error,
                        })
                    }
                    _ => {}
                }
                self.link_index(name).await?
            }
        };
        let gateway = bridge.subnet.gateway();
        let prefix_len = bridge.subnet.prefix_len();
        if !self.has_address(index, gateway, prefix_len).await? {
            let added = self
                .handle
                .address()
                .add(index, IpAddr::V4(gateway), prefix_len)
                .execute()
                .await;
            match added {
                Err(error) if errno(&error) != Some(libc::EEXIST) => {
                    return Err(NetlinkError::AddAddress {
                        name: name.to_owned(),
                        address: bridge.subnet.to_string(),
                        source: error,
                    })
                }
                _ => {}
            }
        }
        self.set_up(name, index).await
    }

    async fn create_tap(&self, name: &str) -> Result<(), NetlinkError> {
        if !is_valid_interface_name(name) {
            return Err(NetlinkError::InvalidName {
                name: name.to_owned(),
            });
        }
        // Three short ioctls: not worth a blocking-pool hop, and doing them
        // on this thread keeps them in this thread's network namespace.
        tun::create_persistent_tap(name).map_err(|source| NetlinkError::CreateTap {
            name: name.to_owned(),
            source,
        })
    }

    async fn attach_to_bridge(
        &self,
        link: &str,
        bridge: &str,
        isolated: bool,
    ) -> Result<(), NetlinkError> {
        let bridge_index = self.link_index(bridge).await?;
        let index = self.link_index(link).await?;
        let attach_error = |source| NetlinkError::AttachLink {
            name: link.to_owned(),
            bridge: bridge.to_owned(),
            source,
        };
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .build(),
            )
            .execute()
            .await
            .map_err(attach_error)?;
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).isolated(isolated).build())
            .execute()
            .await
            .map_err(attach_error)?;
        self.set_up(link, index).await
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(link) = self.find_link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.header.index).execute().await {
            Err(error) if errno(&error) != Some(libc::ENODEV) => Err(NetlinkError::DeleteLink {
                name: name.to_owned(),
                source: error,
            }),
            _ => Ok(()),
        }
    }

    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetlinkError> {
        let mut links = self.handle.link().get().execute();
        let mut names = Vec::new();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|source| NetlinkError::ListLinks { source })?
        {
            if let Some(name) = link_name(&link) {
                if name.starts_with(prefix) {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    async fn default_route_interface(&self) -> Result<Option<String>, NetlinkError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut best: Option<(u32, u32)> = None;
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|source| NetlinkError::ListRoutes { source })?
        {
            let table = route
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Table(table) => Some(*table),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            if route.header.destination_prefix_length != 0
                || route.header.kind != RouteType::Unicast
                || table != u32::from(RouteHeader::RT_TABLE_MAIN)
            {
                continue;
            }
            let mut interface = None;
            let mut metric = 0;
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Oif(index) => interface = Some(*index),
                    RouteAttribute::Priority(priority) => metric = *priority,
                    _ => {}
                }
            }
            if let Some(interface) = interface {
                if best.is_none_or(|(best_metric, _)| metric < best_metric) {
                    best = Some((metric, interface));
                }
            }
        }
        let Some((_, index)) = best else {
            return Ok(None);
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| NetlinkError::ListLinks { source })?;
        Ok(link.as_ref().and_then(link_name).map(str::to_owned))
    }

    async fn enable_ip_forwarding(&self) -> Result<(), NetlinkError> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1\n")
            .map_err(|source| NetlinkError::EnableForwarding { source })
    }

    async fn enable_route_localnet(&self, link: &str) -> Result<(), NetlinkError> {
        let error = |source| NetlinkError::EnableRouteLocalnet {
            link: link.to_owned(),
            source,
        };
        if !is_valid_interface_name(link) || link.contains('/') {
            return Err(error(std::io::Error::from(
                std::io::ErrorKind::InvalidInput,
            )));
        }
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{link}/route_localnet"),
            b"1\n",
        )
        .map_err(error)
    }

    async fn link_status(&self, name: &str) -> Result<Option<LinkStatus>, NetlinkError> {
        let Some(link) = self.find_link(name).await? else {
            return Ok(None);
        };
        let mut status = LinkStatus {
            up: link.header.flags.contains(LinkFlags::Up),
            ..LinkStatus::default()
        };
        let mut controller = None;
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Carrier(carrier) => status.carrier = *carrier != 0,
                LinkAttribute::Controller(index) => controller = Some(*index),
                _ => {}
            }
        }
        if let Some(index) = controller {
            let mut links = self.handle.link().get().match_index(index).execute();
            let link = links
                .try_next()
                .await
                .map_err(|source| NetlinkError::ListLinks { source })?;
            status.controller = link.as_ref().and_then(link_name).map(str::to_owned);
        }
        Ok(Some(status))
    }

    async fn set_link_down(&self, name: &str) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|source| NetlinkError::SetDown {
                name: name.to_owned(),
                source,
            })
    }

    async fn rename_link(&self, name: &str, new_name: &str, up: bool) -> Result<(), NetlinkError> {
        if !is_valid_interface_name(new_name) {
            return Err(NetlinkError::InvalidName {
                name: new_name.to_owned(),
            });
        }
        let link = self
            .find_link(name)
            .await?
            .ok_or_else(|| NetlinkError::FindLink {
                name: name.to_owned(),
            })?;
        let index = link.header.index;
        if link.header.flags.contains(LinkFlags::Up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).down().build())
                .execute()
                .await
                .map_err(|source| NetlinkError::SetDown {
                    name: name.to_owned(),
                    source,
                })?;
        }
        // The kernel applies the new name before the flags, so one request
        // renames the down link and brings it up.
        let message = LinkUnspec::new_with_index(index).name(new_name);
        let message = if up { message.up() } else { message };
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .map_err(|source| NetlinkError::RenameLink {
                name: name.to_owned(),
                new_name: new_name.to_owned(),
                source,
            })
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        })
}

fn is_bridge(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|attribute| match attribute {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

/// The errno of a netlink error reply.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// `/dev/net/tun` ioctls.
mod tun {
    use std::fs::OpenOptions;
    use std::io;
    use std::os::fd::AsRawFd;

    /// Creates (or reattaches to) tap `name` and marks it persistent, so it
    /// survives the file descriptor closing at the end of this function.
    #[allow(unsafe_code)]
    pub(super) fn create_persistent_tap(name: &str) -> io::Result<()> {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            // The name was checked to be at most 15 bytes, so the last byte
            // stays NUL.
            *slot = byte as libc::c_char;
        }
        #[allow(clippy::cast_possible_truncation)]
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        request.ifr_ifru.ifru_flags = flags;
        // SAFETY: `tun` is an open /dev/net/tun descriptor and `request` a
        // valid ifreq that lives across the call; TUNSETIFF reads and writes
        // only within it.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &raw mut request) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETOWNER takes the uid as an integer argument.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER as _, 0 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETPERSIST takes a boolean integer argument.
        if unsafe {
            libc::ioctl(
                tun.as_raw_fd(),
                libc::TUNSETPERSIST as _,
                1 as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One call made to a [`RecordingHostNetwork`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostNetworkCall {
    EnsureBridge {
        bridge: BridgeConfig,
    },
    CreateTap {
        name: String,
    },
    AttachToBridge {
        link: String,
        bridge: String,
        isolated: bool,
    },
    DeleteLink {
        name: String,
    },
    ListLinks {
        prefix: String,
    },
    DefaultRouteInterface,
    EnableIpForwarding,
    LinkStatus {
        name: String,
    },
    SetLinkDown {
        name: String,
    },
    RenameLink {
        name: String,
        new_name: String,
        up: bool,
    },
}

/// What the fake believes a link is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeLink {
    Bridge {
        subnet: Subnet,
    },
    Tap {
        controller: Option<String>,
        isolated: bool,
        up: bool,
        /// A process has the tap open.
        carrier: bool,
    },
}

impl FakeLink {
    /// A tap as `create_tap` makes it: down, on no bridge, not open.
    #[must_use]
    pub fn new_tap() -> Self {
        Self::Tap {
            controller: None,
            isolated: false,
            up: false,
            carrier: false,
        }
    }
}

#[derive(Default)]
struct RecordingState {
    calls: Vec<HostNetworkCall>,
    links: BTreeMap<String, FakeLink>,
    fail_calls: Vec<usize>,
    default_route_interface: Option<String>,
    ip_forwarding: bool,
}

/// A [`HostNetwork`] that records calls and models links in memory.
#[derive(Clone, Default)]
pub struct RecordingHostNetwork {
    state: Arc<Mutex<RecordingState>>,
}

impl RecordingHostNetwork {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The interface `default_route_interface` reports.
    #[must_use]
    pub fn with_default_route(self, interface: &str) -> Self {
        self.state().default_route_interface = Some(interface.to_owned());
        self
    }

    /// Makes call number `call` (0-based, counting every call) fail with
    /// [`NetlinkError::Injected`], without side effects.
    pub fn fail_call(&self, call: usize) {
        self.state().fail_calls.push(call);
    }

    /// Pretends a link exists (a leftover for reconciliation tests).
    pub fn add_link(&self, name: &str, link: FakeLink) {
        self.state().links.insert(name.to_owned(), link);
    }

    /// Pretends a process opened (or closed) tap `name`.
    pub fn set_carrier(&self, name: &str, on: bool) {
        if let Some(FakeLink::Tap { carrier, .. }) = self.state().links.get_mut(name) {
            *carrier = on;
        }
    }

    #[must_use]
    pub fn calls(&self) -> Vec<HostNetworkCall> {
        self.state().calls.clone()
    }

    #[must_use]
    pub fn links(&self) -> BTreeMap<String, FakeLink> {
        self.state().links.clone()
    }

    #[must_use]
    pub fn ip_forwarding(&self) -> bool {
        self.state().ip_forwarding
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RecordingState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `call`; returns the state to apply it to, or the injected
    /// failure.
    fn record(
        &self,
        call: HostNetworkCall,
    ) -> Result<std::sync::MutexGuard<'_, RecordingState>, NetlinkError> {
        let mut state = self.state();
        let number = state.calls.len();
        state.calls.push(call);
        if state.fail_calls.contains(&number) {
            return Err(NetlinkError::Injected { call: number });
        }
        Ok(state)
    }
}

#[async_trait]
impl HostNetwork for RecordingHostNetwork {
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::EnsureBridge {
            bridge: bridge.clone(),
        })?;
        match state.links.get(&bridge.name) {
            Some(FakeLink::Tap { .. }) => Err(NetlinkError::NotABridge {
                name: bridge.name.clone(),
            }),
            _ => {
                state.links.insert(
                    bridge.name.clone(),
                    FakeLink::Bridge {
                        subnet: bridge.subnet,
                    },
                );
                Ok(())
            }
        }
    }

    async fn create_tap(&self, name: &str) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::CreateTap {
            name: name.to_owned(),
        })?;
        if !is_valid_interface_name(name) {
            return Err(NetlinkError::InvalidName {
                name: name.to_owned(),
            });
        }
        state
            .links
            .entry(name.to_owned())
            .or_insert_with(FakeLink::new_tap);
        Ok(())
    }

    async fn attach_to_bridge(
        &self,
        link: &str,
        bridge: &str,
        isolated: bool,
    ) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::AttachToBridge {
            link: link.to_owned(),
            bridge: bridge.to_owned(),
            isolated,
        })?;
        if !matches!(state.links.get(bridge), Some(FakeLink::Bridge { .. })) {
            return Err(NetlinkError::FindLink {
                name: bridge.to_owned(),
            });
        }
        match state.links.get_mut(link) {
            Some(FakeLink::Tap {
                controller,
                isolated: port_isolated,
                up,
                ..
            }) => {
                *controller = Some(bridge.to_owned());
                *port_isolated = isolated;
                *up = true;
                Ok(())
            }
            _ => Err(NetlinkError::FindLink {
                name: link.to_owned(),
            }),
        }
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::DeleteLink {
            name: name.to_owned(),
        })?;
        if matches!(state.links.remove(name), Some(FakeLink::Bridge { .. })) {
            // Like the kernel: deleting a bridge releases its ports.
            for link in state.links.values_mut() {
                if let FakeLink::Tap { controller, .. } = link {
                    if controller.as_deref() == Some(name) {
                        *controller = None;
                    }
                }
            }
        }
        Ok(())
    }

    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetlinkError> {
        let state = self.record(HostNetworkCall::ListLinks {
            prefix: prefix.to_owned(),
        })?;
        Ok(state
            .links
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn default_route_interface(&self) -> Result<Option<String>, NetlinkError> {
        let state = self.record(HostNetworkCall::DefaultRouteInterface)?;
        Ok(state.default_route_interface.clone())
    }

    async fn enable_ip_forwarding(&self) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::EnableIpForwarding)?;
        state.ip_forwarding = true;
        Ok(())
    }

    async fn link_status(&self, name: &str) -> Result<Option<LinkStatus>, NetlinkError> {
        let state = self.record(HostNetworkCall::LinkStatus {
            name: name.to_owned(),
        })?;
        Ok(state.links.get(name).map(|link| match link {
            FakeLink::Bridge { .. } => LinkStatus {
                up: true,
                carrier: true,
                controller: None,
            },
            FakeLink::Tap {
                controller,
                up,
                carrier,
                ..
            } => LinkStatus {
                up: *up,
                carrier: *carrier,
                controller: controller.clone(),
            },
        }))
    }

    async fn set_link_down(&self, name: &str) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::SetLinkDown {
            name: name.to_owned(),
        })?;
        match state.links.get_mut(name) {
            Some(FakeLink::Tap { up, .. }) => {
                *up = false;
                Ok(())
            }
            Some(FakeLink::Bridge { .. }) => Ok(()),
            None => Err(NetlinkError::FindLink {
                name: name.to_owned(),
            }),
        }
    }

    async fn rename_link(&self, name: &str, new_name: &str, up: bool) -> Result<(), NetlinkError> {
        let mut state = self.record(HostNetworkCall::RenameLink {
            name: name.to_owned(),
            new_name: new_name.to_owned(),
            up,
        })?;
        if !is_valid_interface_name(new_name) {
            return Err(NetlinkError::InvalidName {
                name: new_name.to_owned(),
            });
        }
        if state.links.contains_key(new_name) {
            return Err(NetlinkError::LinkExists {
                name: new_name.to_owned(),
            });
        }
        let mut link = state
            .links
            .remove(name)
            .ok_or_else(|| NetlinkError::FindLink {
                name: name.to_owned(),
            })?;
        if let FakeLink::Tap { up: link_up, .. } = &mut link {
            *link_up = up;
        }
        state.links.insert(new_name.to_owned(), link);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_parse_back() {
        assert_eq!(tap_name(0), "bgtap0");
        assert_eq!(tap_name(u32::MAX).len(), MAX_INTERFACE_NAME);
        assert!(is_valid_interface_name(&tap_name(u32::MAX)));
        for index in [0, 7, 42, u32::MAX] {
            assert_eq!(parse_tap_name(&tap_name(index)), Some(index));
        }
        for other in [
            "bgtap",
            "bgtap01",
            "bgtap-1",
            "bgtap+1",
            "bgtapx",
            "eth0",
            "banger0",
            "bgtap99999999999",
        ] {
            assert_eq!(parse_tap_name(other), None, "{other}");
        }
        assert!(!is_valid_interface_name("a/b"));
        assert!(!is_valid_interface_name("sixteen-chars-xx"));
    }

    #[tokio::test]
    async fn fake_models_links_and_records_calls() {
        let network = RecordingHostNetwork::new().with_default_route("eth0");
        let bridge = BridgeConfig::default();
        network.ensure_bridge(&bridge).await.unwrap();
        network.create_tap("bgtap0").await.unwrap();
        network
            .attach_to_bridge("bgtap0", "banger0", true)
            .await
            .unwrap();
        network.create_tap("bgtap1").await.unwrap();
        assert_eq!(
            network.list_links(TAP_PREFIX).await.unwrap(),
            ["bgtap0", "bgtap1"]
        );
        assert_eq!(
            network.default_route_interface().await.unwrap().as_deref(),
            Some("eth0")
        );
        network.delete_link("bgtap1").await.unwrap();
        network.delete_link("bgtap1").await.unwrap();
        assert_eq!(
            network.links().get("bgtap0"),
            Some(&FakeLink::Tap {
                controller: Some("banger0".to_owned()),
                isolated: true,
                up: true,
                carrier: false,
            })
        );
        assert_eq!(
            network.calls()[..3],
            [
                HostNetworkCall::EnsureBridge { bridge },
                HostNetworkCall::CreateTap {
                    name: "bgtap0".to_owned()
                },
                HostNetworkCall::AttachToBridge {
                    link: "bgtap0".to_owned(),
                    bridge: "banger0".to_owned(),
                    isolated: true
                },
            ]
        );
    }

    #[test]
    fn pool_and_vm_tap_names_never_overlap() {
        assert_eq!(pool_tap_name(3), "bgpool3");
        assert_eq!(pool_tap_name(u32::MAX).len(), 16);
        for index in [0, 7, 42] {
            let pooled = pool_tap_name(index);
            assert_eq!(parse_pool_tap_name(&pooled), Some(index));
            assert_eq!(parse_tap_name(&pooled), None);
            assert_eq!(parse_pool_tap_name(&tap_name(index)), None);
        }
        for other in ["bgpool", "bgpool01", "bgpoolx", "bgpool-1"] {
            assert_eq!(parse_pool_tap_name(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn fake_renames_and_reports_link_state() {
        let network = RecordingHostNetwork::new();
        network
            .ensure_bridge(&BridgeConfig::default())
            .await
            .unwrap();
        network.create_tap("bgpool0").await.unwrap();
        network.create_tap("bgtap1").await.unwrap();
        network
            .attach_to_bridge("bgpool0", "banger0", true)
            .await
            .unwrap();
        network.set_link_down("bgpool0").await.unwrap();
        assert_eq!(
            network.link_status("bgpool0").await.unwrap(),
            Some(LinkStatus {
                up: false,
                carrier: false,
                controller: Some("banger0".to_owned())
            })
        );
        assert!(matches!(
            network.rename_link("bgpool0", "bgtap1", true).await,
            Err(NetlinkError::LinkExists { .. })
        ));
        network
            .rename_link("bgpool0", "bgtap0", true)
            .await
            .unwrap();
        network.set_carrier("bgtap0", true);
        assert_eq!(network.link_status("bgpool0").await.unwrap(), None);
        let status = network.link_status("bgtap0").await.unwrap().unwrap();
        assert!(status.up && status.carrier);
    }

    #[tokio::test]
    async fn fake_fails_the_chosen_call_without_side_effects() {
        let network = RecordingHostNetwork::new();
        network.fail_call(1);
        network.create_tap("bgtap0").await.unwrap();
        let error = network.create_tap("bgtap1").await.unwrap_err();
        assert!(matches!(error, NetlinkError::Injected { call: 1 }));
        assert_eq!(network.list_links("").await.unwrap(), ["bgtap0"]);
    }
}
