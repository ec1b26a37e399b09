//! IPv4 address management for the bridge subnet.
//!
//! The subnet is given as the gateway's CIDR (`172.30.0.1/24` by default):
//! the gateway is the bridge's own address, VMs get the other host addresses
//! of the subnet, never the network or broadcast address.
//!
//! The allocator is pure: [`Subnet::allocate`] picks the lowest assignable
//! address for which `is_leased` says no. The daemon keeps the leases (in
//! SQLite) and calls it inside the transaction that records the new lease,
//! so an address is never handed to two live VMs:
//!
//! 1. begin a write transaction,
//! 2. read the leased addresses,
//! 3. `subnet.allocate(|ip| leased.contains(&ip))`,
//! 4. insert the lease (a unique constraint on the address is the backstop),
//! 5. commit.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The default bridge address and prefix.
pub const DEFAULT_GATEWAY_CIDR: &str = "172.30.0.1/24";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    /// Not `a.b.c.d/len`.
    #[error("Invalid subnet `{value}`: expected the gateway address with a prefix length, like 172.30.0.1/24")]
    ParseCidr { value: String },
    /// /31 and /32 leave no address for VMs.
    #[error("Subnet prefix /{prefix_len} is too long: at most /30 leaves room for VMs")]
    PrefixTooLong { prefix_len: u8 },
    /// The gateway must be a host address of its own subnet.
    #[error("Gateway {gateway} is the network or broadcast address of {network}/{prefix_len}")]
    GatewayNotHost {
        gateway: Ipv4Addr,
        network: Ipv4Addr,
        prefix_len: u8,
    },
    /// Every assignable address is leased.
    #[error(
        "No free IP address left in {network}/{prefix_len} ({capacity} addresses, all leased)"
    )]
    Exhausted {
        network: Ipv4Addr,
        prefix_len: u8,
        capacity: u32,
    },
}

/// An IPv4 subnet with its gateway (the bridge address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    gateway: Ipv4Addr,
    prefix_len: u8,
}

impl Subnet {
    /// A subnet given by its gateway and prefix length.
    ///
    /// # Errors
    /// The prefix is longer than /30, or the gateway is the network or
    /// broadcast address.
    pub fn new(gateway: Ipv4Addr, prefix_len: u8) -> Result<Self, IpamError> {
        if prefix_len > 30 {
            return Err(IpamError::PrefixTooLong { prefix_len });
        }
        let subnet = Self {
            gateway,
            prefix_len,
        };
        if gateway == subnet.network() || gateway == subnet.broadcast() {
            return Err(IpamError::GatewayNotHost {
                gateway,
                network: subnet.network(),
                prefix_len,
            });
        }
        Ok(subnet)
    }

    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    #[must_use]
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix_len))
    }

    #[must_use]
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & mask(self.prefix_len))
    }

    #[must_use]
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) | !mask(self.prefix_len))
    }

    /// The network in CIDR notation, `172.30.0.0/24`.
    #[must_use]
    pub fn network_cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix_len)
    }

    #[must_use]
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix_len) == u32::from(self.network())
    }

    /// Whether `address` may be given to a VM: inside the subnet, and not the
    /// network, broadcast or gateway address.
    #[must_use]
    pub fn is_assignable(&self, address: Ipv4Addr) -> bool {
        self.contains(address)
            && address != self.network()
            && address != self.broadcast()
            && address != self.gateway
    }

    /// How many addresses VMs can get.
    #[must_use]
    pub fn capacity(&self) -> u32 {
        // Host addresses minus the gateway.
        (1_u32 << (32 - u32::from(self.prefix_len))) - 3
    }

    /// The assignable addresses, lowest first (`.2`, `.3`, … with the
    /// default subnet).
    pub fn assignable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .filter(|address| *address != self.gateway)
    }

    /// The lowest assignable address that is not leased.
    ///
    /// # Errors
    /// [`IpamError::Exhausted`] when every assignable address is leased.
    pub fn allocate(&self, is_leased: impl Fn(Ipv4Addr) -> bool) -> Result<Ipv4Addr, IpamError> {
        self.assignable()
            .find(|address| !is_leased(*address))
            .ok_or(IpamError::Exhausted {
                network: self.network(),
                prefix_len: self.prefix_len,
                capacity: self.capacity(),
            })
    }
}

impl Default for Subnet {
    fn default() -> Self {
        Self {
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            prefix_len: 24,
        }
    }
}

/// The gateway CIDR, `172.30.0.1/24`.
impl fmt::Display for Subnet {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.gateway, self.prefix_len)
    }
}

/// Parses the gateway CIDR, `172.30.0.1/24`.
impl FromStr for Subnet {
    type Err = IpamError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (gateway, prefix_len) = parse_cidr(value).ok_or_else(|| IpamError::ParseCidr {
            value: value.to_owned(),
        })?;
        Self::new(gateway, prefix_len)
    }
}

/// `a.b.c.d/len` with `len` ≤ 32.
pub(crate) fn parse_cidr(value: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, prefix_len) = value.split_once('/')?;
    let address = address.parse().ok()?;
    if prefix_len.is_empty() || !prefix_len.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let prefix_len: u8 = prefix_len.parse().ok()?;
    (prefix_len <= 32).then_some((address, prefix_len))
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn default_subnet_shape() {
        let subnet: Subnet = DEFAULT_GATEWAY_CIDR.parse().unwrap();
        assert_eq!(subnet, Subnet::default());
        assert_eq!(subnet.gateway(), ip("172.30.0.1"));
        assert_eq!(subnet.network(), ip("172.30.0.0"));
        assert_eq!(subnet.broadcast(), ip("172.30.0.255"));
        assert_eq!(subnet.netmask(), ip("255.255.255.0"));
        assert_eq!(subnet.network_cidr(), "172.30.0.0/24");
        assert_eq!(subnet.to_string(), "172.30.0.1/24");
        assert_eq!(subnet.capacity(), 253);
        assert_eq!(subnet.assignable().count(), 253);
        assert!(subnet.is_assignable(ip("172.30.0.2")));
        assert!(subnet.is_assignable(ip("172.30.0.254")));
        for not_assignable in [
            "172.30.0.0",
            "172.30.0.1",
            "172.30.0.255",
            "172.30.1.2",
            "10.0.0.2",
        ] {
            assert!(
                !subnet.is_assignable(ip(not_assignable)),
                "{not_assignable}"
            );
        }
    }

    #[test]
    fn allocates_lowest_free_from_dot_two() {
        let subnet = Subnet::default();
        let mut leased = BTreeSet::new();
        assert_eq!(
            subnet.allocate(|address| leased.contains(&address)),
            Ok(ip("172.30.0.2"))
        );
        leased.extend([ip("172.30.0.2"), ip("172.30.0.3"), ip("172.30.0.5")]);
        assert_eq!(
            subnet.allocate(|address| leased.contains(&address)),
            Ok(ip("172.30.0.4"))
        );
        leased.insert(ip("172.30.0.4"));
        assert_eq!(
            subnet.allocate(|address| leased.contains(&address)),
            Ok(ip("172.30.0.6"))
        );
        // A released address is reused first.
        leased.remove(&ip("172.30.0.3"));
        assert_eq!(
            subnet.allocate(|address| leased.contains(&address)),
            Ok(ip("172.30.0.3"))
        );
    }

    #[test]
    fn full_subnet_is_a_clear_error() {
        let subnet: Subnet = "10.9.8.1/29".parse().unwrap();
        let handed: Vec<Ipv4Addr> = subnet.assignable().collect();
        assert_eq!(
            handed,
            ["10.9.8.2", "10.9.8.3", "10.9.8.4", "10.9.8.5", "10.9.8.6"].map(ip)
        );
        let error = subnet.allocate(|_| true).unwrap_err();
        assert_eq!(
            error,
            IpamError::Exhausted {
                network: ip("10.9.8.0"),
                prefix_len: 29,
                capacity: 5
            }
        );
        assert_eq!(
            error.to_string(),
            "No free IP address left in 10.9.8.0/29 (5 addresses, all leased)"
        );
    }

    #[test]
    fn gateway_in_the_middle_is_skipped() {
        let subnet: Subnet = "192.168.7.4/29".parse().unwrap();
        assert_eq!(
            subnet.assignable().collect::<Vec<_>>(),
            [
                "192.168.7.1",
                "192.168.7.2",
                "192.168.7.3",
                "192.168.7.5",
                "192.168.7.6"
            ]
            .map(ip)
        );
        let subnet: Subnet = "192.168.7.2/30".parse().unwrap();
        assert_eq!(subnet.capacity(), 1);
        assert_eq!(subnet.allocate(|_| false), Ok(ip("192.168.7.1")));
        assert!(matches!(
            subnet.allocate(|address| address == ip("192.168.7.1")),
            Err(IpamError::Exhausted { capacity: 1, .. })
        ));
    }

    #[test]
    fn rejects_bad_subnets() {
        for bad in [
            "172.30.0.1",
            "172.30.0.1/",
            "172.30.0.1/33",
            "172.30.0.1/+4",
            "x/24",
            "172.30.0.1/24/1",
        ] {
            assert!(
                matches!(bad.parse::<Subnet>(), Err(IpamError::ParseCidr { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            "172.30.0.1/31".parse::<Subnet>(),
            Err(IpamError::PrefixTooLong { prefix_len: 31 })
        );
        assert!(matches!(
            "172.30.0.0/24".parse::<Subnet>(),
            Err(IpamError::GatewayNotHost { .. })
        ));
        assert!(matches!(
            "172.30.0.255/24".parse::<Subnet>(),
            Err(IpamError::GatewayNotHost { .. })
        ));
    }
}
