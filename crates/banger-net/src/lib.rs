//! banger's host networking.
//!
//! Every VM gets a tap device on one bridge, an IPv4 address from the
//! bridge's subnet, a MAC derived from its id, a DNS name served by the
//! daemon, and egress through NAT. This crate holds the pieces; the daemon
//! composes them into its network service.
//!
//! Pure parts (no I/O, built without the default `host` feature so the guest
//! agent can use them):
//! - [`cmdline`]: the `banger.net=` kernel command line argument,
//! - [`ipam`]: the subnet and the "lowest free address" allocator,
//! - [`mac`]: stable MAC addresses derived from VM ids.
//!
//! Host side effects (feature `host`):
//! - [`netlink`]: bridge, taps, link listing and the default-route interface
//!   through rtnetlink, behind the [`netlink::HostNetwork`] trait,
//! - [`nat`]: the `inet banger` (NAT, forward and input filtering) and
//!   `bridge banger` (per-tap anti-spoofing) nftables tables, behind
//!   [`nat::Nft`],
//! - [`dns`]: the `<vm>.banger` DNS server that forwards everything else,
//! - [`pool`]: pre-created taps handed to VMs by renaming,
//! - [`resolved`]: telling systemd-resolved to send `~banger` queries to
//!   the DNS server, behind [`resolved::Resolved`],
//! - [`setup`]: the steps the daemon runs (bring up, prepare a tap,
//!   reconcile, tear down) over those seams.

pub mod cmdline;
pub mod ipam;
pub mod mac;

#[cfg(feature = "host")]
pub mod dns;
#[cfg(feature = "host")]
pub mod nat;
#[cfg(feature = "host")]
pub mod netlink;
#[cfg(feature = "host")]
pub mod pool;
#[cfg(feature = "host")]
pub mod resolved;
#[cfg(feature = "host")]
pub mod setup;

pub use cmdline::{CmdlineError, GuestNetwork};
pub use ipam::{IpamError, Subnet};
pub use mac::MacAddress;
