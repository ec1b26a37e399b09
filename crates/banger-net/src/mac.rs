//! Stable MAC addresses for VMs.
//!
//! A VM's MAC is `06:` followed by the first five bytes of
//! `SHA-256("banger-mac:" + vm_id)`. `0x06` has the locally administered bit
//! set and the multicast bit clear, so the address is a valid unicast address
//! that can never clash with a vendor-assigned one, and the same VM id always
//! gets the same MAC (the guest keeps its address across restarts, and
//! reconciliation can recompute it).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The first byte of every MAC banger derives.
pub const MAC_PREFIX: u8 = 0x06;

/// An Ethernet (EUI-48) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

/// A string that is not `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid MAC address `{value}`")]
pub struct ParseMacError {
    pub value: String,
}

impl MacAddress {
    /// The MAC of the VM with this id.
    #[must_use]
    pub fn for_vm(vm_id: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(b"banger-mac:")
            .chain_update(vm_id.as_bytes())
            .finalize();
        let mut bytes = [0_u8; 6];
        bytes[0] = MAC_PREFIX;
        bytes[1..].copy_from_slice(&digest[..5]);
        Self(bytes)
    }

    #[must_use]
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    #[must_use]
    pub fn is_unicast(self) -> bool {
        self.0[0] & 0x01 == 0
    }

    #[must_use]
    pub fn is_locally_administered(self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, f] = self.0;
        write!(formatter, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = ParseMacError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = || ParseMacError {
            value: value.to_owned(),
        };
        let mut bytes = [0_u8; 6];
        let mut parts = value.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 {
                return Err(error());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let first = MacAddress::for_vm("0123456789abcdef");
        assert_eq!(first, MacAddress::for_vm("0123456789abcdef"));
        assert_ne!(first, MacAddress::for_vm("0123456789abcdee"));
        assert_eq!(first.octets()[0], 0x06);
        assert!(first.is_unicast());
        assert!(first.is_locally_administered());
        // Pinned: the daemon may store or recompute MACs, so the derivation
        // must never change silently.
        assert_eq!(first.to_string(), "06:66:1d:d7:6e:7f");
        let many: std::collections::HashSet<_> = (0..1000)
            .map(|index| MacAddress::for_vm(&format!("{index:016x}")))
            .collect();
        assert_eq!(many.len(), 1000);
    }

    #[test]
    fn display_and_parse_round_trip() {
        let mac = MacAddress([0x06, 0xab, 0x00, 0x10, 0xff, 0x01]);
        assert_eq!(mac.to_string(), "06:ab:00:10:ff:01");
        assert_eq!("06:AB:00:10:ff:01".parse::<MacAddress>(), Ok(mac));
        for bad in [
            "",
            "06:ab:00:10:ff",
            "06:ab:00:10:ff:01:02",
            "6:ab:00:10:ff:01",
            "zz:ab:00:10:ff:01",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }
}
