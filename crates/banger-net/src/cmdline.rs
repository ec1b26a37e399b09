//! The `banger.net=` kernel command line argument: how the daemon tells the
//! guest agent its network configuration (nothing depends on DHCP).
//!
//! Format:
//!
//! ```text
//! banger.net=ip=172.30.0.5/24,gw=172.30.0.1,dns=172.30.0.1,mac=06:1f:2e:3d:4c:5b,domain=banger
//! ```
//!
//! 1. The argument is one whitespace-free token of the kernel command line,
//!    `banger.net=` followed by comma-separated `key=value` pairs. If the
//!    token appears more than once, the last one wins (as the kernel does for
//!    its own parameters).
//! 2. `ip` (required): the guest's IPv4 address with the subnet's prefix
//!    length, `a.b.c.d/len`.
//! 3. `gw` (required): the default gateway (the bridge address); it must be
//!    inside the `ip` subnet.
//! 4. `dns` (optional, repeatable, in order): a nameserver for
//!    `/etc/resolv.conf`.
//! 5. `mac` (optional): the MAC of the interface to configure, lowercase
//!    `xx:xx:xx:xx:xx:xx`. The agent configures the interface with this MAC,
//!    or the first non-loopback interface when absent.
//! 6. `domain` (optional): the search domain for `/etc/resolv.conf`
//!    (banger's DNS domain, `banger` by default).
//! 7. Unknown keys are ignored, so an older agent boots with a newer daemon's
//!    command line; a repeated non-repeatable key, a pair without `=`, or a
//!    malformed value is an error.
//!
//! [`GuestNetwork::to_kernel_argument`] writes keys in the order above;
//! [`GuestNetwork::from_kernel_cmdline`] and [`GuestNetwork::parse_value`]
//! read them back. Both are pure so the agent can reuse them.

use std::fmt;
use std::net::Ipv4Addr;

use crate::ipam::parse_cidr;
use crate::mac::MacAddress;

/// The kernel command line key.
pub const KEY: &str = "banger.net";

/// A guest's network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mac: Option<MacAddress>,
    pub domain: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("banger.net= has no `{key}`")]
    MissingKey { key: &'static str },
    #[error("banger.net= has `{key}` twice")]
    DuplicateKey { key: String },
    #[error("banger.net= has `{pair}`, which is not key=value")]
    MalformedPair { pair: String },
    #[error("banger.net= has an invalid `{key}`: `{value}`")]
    InvalidValue { key: &'static str, value: String },
    #[error("banger.net= gateway {gateway} is outside {address}/{prefix_len}")]
    GatewayOutsideSubnet {
        gateway: Ipv4Addr,
        address: Ipv4Addr,
        prefix_len: u8,
    },
}

impl GuestNetwork {
    /// The whole argument, `banger.net=ip=…`.
    #[must_use]
    pub fn to_kernel_argument(&self) -> String {
        format!("{KEY}={self}")
    }

    /// Finds and parses the `banger.net=` token in a whole kernel command
    /// line (the contents of `/proc/cmdline`). `Ok(None)` when absent.
    ///
    /// # Errors
    /// The token is present but malformed.
    pub fn from_kernel_cmdline(cmdline: &str) -> Result<Option<Self>, CmdlineError> {
        let prefix = format!("{KEY}=");
        cmdline
            .split_ascii_whitespace()
            .rev()
            .find_map(|token| token.strip_prefix(&prefix))
            .map(Self::parse_value)
            .transpose()
    }

    /// Parses the value after `banger.net=`.
    ///
    /// # Errors
    /// See the module docs for what is refused.
    pub fn parse_value(value: &str) -> Result<Self, CmdlineError> {
        let mut cidr = None;
        let mut gateway = None;
        let mut dns = Vec::new();
        let mut mac = None;
        let mut domain = None;
        for pair in value.split(',').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| CmdlineError::MalformedPair {
                    pair: pair.to_owned(),
                })?;
            match key {
                "ip" => set_once(
                    &mut cidr,
                    key,
                    parse_cidr(value).ok_or_else(|| invalid("ip", value))?,
                )?,
                "gw" => set_once(
                    &mut gateway,
                    key,
                    value.parse().map_err(|_| invalid("gw", value))?,
                )?,
                "dns" => dns.push(value.parse().map_err(|_| invalid("dns", value))?),
                "mac" => set_once(
                    &mut mac,
                    key,
                    value.parse().map_err(|_| invalid("mac", value))?,
                )?,
                "domain" => {
                    if !is_domain(value) {
                        return Err(invalid("domain", value));
                    }
                    set_once(&mut domain, key, value.to_owned())?;
                }
                _ => {}
            }
        }
        let (address, prefix_len) = cidr.ok_or(CmdlineError::MissingKey { key: "ip" })?;
        let gateway = gateway.ok_or(CmdlineError::MissingKey { key: "gw" })?;
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len))
        };
        if u32::from(address) & mask != u32::from(gateway) & mask {
            return Err(CmdlineError::GatewayOutsideSubnet {
                gateway,
                address,
                prefix_len,
            });
        }
        Ok(Self {
            address,
            prefix_len,
            gateway,
            dns,
            mac,
            domain,
        })
    }
}

/// The value after `banger.net=`.
impl fmt::Display for GuestNetwork {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "ip={}/{},gw={}",
            self.address, self.prefix_len, self.gateway
        )?;
        for server in &self.dns {
            write!(formatter, ",dns={server}")?;
        }
        if let Some(mac) = self.mac {
            write!(formatter, ",mac={mac}")?;
        }
        if let Some(domain) = &self.domain {
            write!(formatter, ",domain={domain}")?;
        }
        Ok(())
    }
}

fn invalid(key: &'static str, value: &str) -> CmdlineError {
    CmdlineError::InvalidValue {
        key,
        value: value.to_owned(),
    }
}

fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), CmdlineError> {
    if slot.is_some() {
        return Err(CmdlineError::DuplicateKey {
            key: key.to_owned(),
        });
    }
    *slot = Some(value);
    Ok(())
}

/// DNS labels separated by dots; nothing that could break resolv.conf or the
/// command line.
fn is_domain(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestNetwork {
        GuestNetwork {
            address: Ipv4Addr::new(172, 30, 0, 5),
            prefix_len: 24,
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            dns: vec![Ipv4Addr::new(172, 30, 0, 1)],
            mac: Some(MacAddress([0x06, 0x1f, 0x2e, 0x3d, 0x4c, 0x5b])),
            domain: Some("banger".to_owned()),
        }
    }

    #[test]
    fn formats_the_documented_example() {
        assert_eq!(
            sample().to_kernel_argument(),
            "banger.net=ip=172.30.0.5/24,gw=172.30.0.1,dns=172.30.0.1,mac=06:1f:2e:3d:4c:5b,domain=banger"
        );
    }

    #[test]
    fn round_trips_through_a_whole_cmdline() {
        for network in [
            sample(),
            GuestNetwork {
                dns: vec![],
                mac: None,
                domain: None,
                ..sample()
            },
            GuestNetwork {
                dns: vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
                ..sample()
            },
        ] {
            let cmdline = format!(
                "console=ttyS0 reboot=k panic=1 {} banger.name=dev quiet",
                network.to_kernel_argument()
            );
            assert_eq!(
                GuestNetwork::from_kernel_cmdline(&cmdline),
                Ok(Some(network))
            );
        }
    }

    #[test]
    fn absent_last_wins_and_unknown_keys_ignored() {
        assert_eq!(
            GuestNetwork::from_kernel_cmdline("console=ttyS0 banger.netx=1"),
            Ok(None)
        );
        let parsed = GuestNetwork::from_kernel_cmdline(
            "banger.net=ip=10.0.0.9/8,gw=10.0.0.1 banger.net=ip=172.30.0.5/24,gw=172.30.0.1,mtu=1400,",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.address, Ipv4Addr::new(172, 30, 0, 5));
        assert!(parsed.dns.is_empty());
    }

    #[test]
    fn refuses_malformed_values() {
        let cases: [(&str, CmdlineError); 8] = [
            ("gw=172.30.0.1", CmdlineError::MissingKey { key: "ip" }),
            ("ip=172.30.0.5/24", CmdlineError::MissingKey { key: "gw" }),
            ("ip=172.30.0.5,gw=172.30.0.1", invalid("ip", "172.30.0.5")),
            (
                "ip=172.30.0.5/24,gw=172.30.0.1,dns=nope",
                invalid("dns", "nope"),
            ),
            (
                "ip=172.30.0.5/24,gw=172.30.0.1,mac=06:00",
                invalid("mac", "06:00"),
            ),
            (
                "ip=172.30.0.5/24,gw=172.30.0.1,domain=a b",
                invalid("domain", "a b"),
            ),
            (
                "ip=172.30.0.5/24,ip=172.30.0.6/24,gw=172.30.0.1",
                CmdlineError::DuplicateKey {
                    key: "ip".to_owned(),
                },
            ),
            (
                "ip=172.30.0.5/24,gw",
                CmdlineError::MalformedPair {
                    pair: "gw".to_owned(),
                },
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(GuestNetwork::parse_value(value), Err(expected), "{value}");
        }
        assert!(matches!(
            GuestNetwork::parse_value("ip=172.30.0.5/24,gw=172.31.0.1"),
            Err(CmdlineError::GatewayOutsideSubnet { .. })
        ));
    }
}
