//! What a VM's network lets in and out: published ports (host port to
//! guest port), the egress policy, and the network group.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The address a published port binds to when none is given.
pub const DEFAULT_PUBLISH_ADDRESS: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A host port forwarded to a guest port:
/// `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The host address it answers on; `0.0.0.0` is every host address.
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl PublishedPort {
    /// Parses `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]` (TCP and 127.0.0.1
    /// when left out).
    ///
    /// # Errors
    /// A one-line reason naming what was wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (spec, protocol) = match text.rsplit_once('/') {
            Some((spec, protocol)) => (
                spec,
                Protocol::parse(&protocol.to_ascii_lowercase()).ok_or_else(|| {
                    format!("`{text}`: protocol `{protocol}` is neither tcp nor udp")
                })?,
            ),
            None => (text, Protocol::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts.as_slice() {
            [host, guest] => (DEFAULT_PUBLISH_ADDRESS, *host, *guest),
            [ip, host, guest] => (
                ip.parse::<Ipv4Addr>()
                    .map_err(|_| format!("`{text}`: `{ip}` is not an IPv4 address"))?,
                *host,
                *guest,
            ),
            _ => {
                return Err(format!(
                    "`{text}` is not [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]"
                ))
            }
        };
        let port = |value: &str| {
            value
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| format!("`{text}`: `{value}` is not a port (1-65535)"))
        };
        Ok(Self {
            host_ip,
            host_port: port(host_port)?,
            guest_port: port(guest_port)?,
            protocol,
        })
    }
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}:{}:{}/{}",
            self.host_ip, self.host_port, self.guest_port, self.protocol
        )
    }
}

/// One destination an `allow=` egress policy lets a VM reach.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EgressRule {
    /// An IPv4 network (`10.0.0.0/8`; a bare address is a /32).
    Network { address: Ipv4Addr, prefix: u8 },
    /// A domain name, matched exactly (lowercase, no trailing dot).
    Name(String),
    /// `*.example.org`: every name below `example.org` (not the name
    /// itself).
    Suffix(String),
}

impl EgressRule {
    /// # Errors
    /// A one-line reason naming what was wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some((address, prefix)) = text.split_once('/') {
            let address: Ipv4Addr = address
                .parse()
                .map_err(|_| format!("`{text}` is not an IPv4 network"))?;
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|prefix| *prefix <= 32)
                .ok_or_else(|| format!("`{text}` has a prefix length outside 0-32"))?;
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            return Ok(Self::Network {
                address: Ipv4Addr::from(u32::from(address) & mask),
                prefix,
            });
        }
        if let Ok(address) = text.parse::<Ipv4Addr>() {
            return Ok(Self::Network {
                address,
                prefix: 32,
            });
        }
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        let (suffix, name) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, name),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
            });
        if !valid {
            return Err(format!(
                "`{text}` is neither an IPv4 network nor a domain name"
            ));
        }
        Ok(if suffix {
            Self::Suffix(name)
        } else {
            Self::Name(name)
        })
    }

    /// Whether `name` (any case, trailing dot or not) is allowed by this rule.
    pub fn matches_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self {
            Self::Network { .. } => false,
            Self::Name(allowed) => name == *allowed,
            Self::Suffix(parent) => name
                .strip_suffix(parent.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Network { address, prefix } => write!(formatter, "{address}/{prefix}"),
            Self::Name(name) => formatter.write_str(name),
            Self::Suffix(parent) => write!(formatter, "*.{parent}"),
        }
    }
}

/// Where a VM may send traffic (the host's DNS server is always allowed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum EgressPolicy {
    /// Anything the uplink reaches (the default).
    #[default]
    AllowAll,
    /// Nothing but the host's DNS server.
    None,
    /// The listed networks, and the addresses the DNS server gave out for
    /// the listed names (for as long as their answers' TTL); other names
    /// do not resolve.
    Allow(Vec<EgressRule>),
}

impl EgressPolicy {
    /// Parses `allow-all`, `none` or `allow=RULE,RULE,...`.
    ///
    /// # Errors
    /// A one-line reason naming what was wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "allow-all" => Ok(Self::AllowAll),
            "none" => Ok(Self::None),
            other => {
                let Some(list) = other.strip_prefix("allow=") else {
                    return Err(format!(
                        "`{text}` is not an egress policy (allow-all, none or allow=LIST)"
                    ));
                };
                let rules = list
                    .split(',')
                    .filter(|rule| !rule.trim().is_empty())
                    .map(EgressRule::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                if rules.is_empty() {
                    return Err(format!(
                        "`{text}` allows nothing; use `--egress none` for that"
                    ));
                }
                Ok(Self::Allow(rules))
            }
        }
    }

    /// Whether DNS names are resolved for the VM: always for `allow-all`,
    /// never for `none`, for listed names with `allow=`.
    pub fn allows_name(&self, name: &str) -> bool {
        match self {
            Self::AllowAll => true,
            Self::None => false,
            Self::Allow(rules) => rules.iter().any(|rule| rule.matches_name(name)),
        }
    }

    /// The networks of an `allow=` list.
    pub fn networks(&self) -> Vec<(Ipv4Addr, u8)> {
        match self {
            Self::Allow(rules) => rules
                .iter()
                .filter_map(|rule| match rule {
                    EgressRule::Network { address, prefix } => Some((*address, *prefix)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for EgressPolicy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AllowAll => formatter.write_str("allow-all"),
            Self::None => formatter.write_str("none"),
            Self::Allow(rules) => {
                let list: Vec<String> = rules.iter().map(ToString::to_string).collect();
                write!(formatter, "allow={}", list.join(","))
            }
        }
    }
}

impl Serialize for EgressPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Checks a network group name: a DNS-label-like word.
///
/// # Errors
/// A one-line reason.
pub fn validate_group(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a network group name (1-32 of a-z, 0-9, -)"
        ))
    }
}

/// Parameters of `vm.port.add` and `vm.port.remove`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmPortParams {
    pub vm: String,
    pub port: PublishedPort,
}

/// Parameters of `vm.egress.set`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetEgressParams {
    pub vm: String,
    pub egress: EgressPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse() {
        assert_eq!(
            PublishedPort::parse("8080:80").unwrap(),
            PublishedPort {
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: 8080,
                guest_port: 80,
                protocol: Protocol::Tcp,
            }
        );
        let udp = PublishedPort::parse("0.0.0.0:5353:53/udp").unwrap();
        assert_eq!(udp.host_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(udp.protocol, Protocol::Udp);
        assert_eq!(udp.to_string(), "0.0.0.0:5353:53/udp");
        assert_eq!(PublishedPort::parse(&udp.to_string()).unwrap(), udp);
        for bad in ["80", "0:80", "8080:70000", "x:1:2", "1:2/sctp", "a:b:c:d"] {
            assert!(PublishedPort::parse(bad).is_err(), "{bad}");
        }
        assert!(PublishedPort::parse("1:2/sctp")
            .unwrap_err()
            .contains("sctp"));
    }

    #[test]
    fn egress_policies_parse_and_match() {
        assert_eq!(
            EgressPolicy::parse("allow-all").unwrap(),
            EgressPolicy::AllowAll
        );
        assert_eq!(EgressPolicy::parse("none").unwrap(), EgressPolicy::None);
        let policy =
            EgressPolicy::parse("allow=*.example.org,git.example.com,10.1.2.3/8,192.0.2.7")
                .unwrap();
        assert_eq!(
            policy.to_string(),
            "allow=*.example.org,git.example.com,10.0.0.0/8,192.0.2.7/32"
        );
        assert!(policy.allows_name("pkg.example.org."));
        assert!(policy.allows_name("A.B.Example.org"));
        assert!(!policy.allows_name("example.org"));
        assert!(!policy.allows_name("badexample.org"));
        assert!(policy.allows_name("git.example.com"));
        assert!(!policy.allows_name("x.git.example.com"));
        assert_eq!(
            policy.networks(),
            [
                (Ipv4Addr::new(10, 0, 0, 0), 8),
                (Ipv4Addr::new(192, 0, 2, 7), 32)
            ]
        );
        for bad in [
            "allow=",
            "deny",
            "allow=10.0.0.0/33",
            "allow=a..b",
            "allow=x y",
        ] {
            assert!(EgressPolicy::parse(bad).is_err(), "{bad}");
        }
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(serde_json::from_str::<EgressPolicy>(&json).unwrap(), policy);
    }

    #[test]
    fn group_names() {
        assert!(validate_group("team-a").is_ok());
        assert!(validate_group("").is_err());
        assert!(validate_group("Team").is_err());
    }
}
