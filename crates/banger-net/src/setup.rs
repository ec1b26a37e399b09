//! The host network as the daemon drives it: the steps of bringing it up,
//! preparing a VM's tap, reconciling, and tearing down, written against the
//! [`HostNetwork`] and [`Nft`] seams so they run against the recording fakes
//! in tests.
//!
//! Daemon start:
//! 1. [`bring_up`]: ensure the bridge (address, up), enable IPv4 forwarding,
//!    find the uplink (configured, else the default-route interface), and
//!    apply the NAT table. Safe to repeat (reconciliation may call it
//!    periodically: the NAT apply is idempotent).
//! 2. [`remove_leaked_taps`] with the taps the store's VMs claim, then
//!    [`crate::pool::TapPool::adopt`] and fill the pool in the background.
//! 3. Start [`crate::dns::DnsServer`] on the gateway address, port 53, and
//!    tell systemd-resolved about it ([`crate::resolved`]).
//!
//! VM create (the `network` stage), its undo in brackets:
//! 1. allocate the IP in the store ([`crate::Subnet::allocate`]) [release it],
//! 2. pick a tap name with [`next_tap_name`] and get the tap from
//!    [`crate::pool::TapPool::take`] (a pooled tap renamed, or a new one)
//!    [`crate::pool::TapPool::give_back`],
//! 3. pass [`guest_network`]`(…).to_kernel_argument()` on the kernel command
//!    line and the tap + [`crate::MacAddress::for_vm`] to the VMM,
//! 4. insert the DNS record [remove it].
//!
//! VM start: [`crate::nat::add_guest`] lets the VM's tap send as the VM;
//! VM delete: [`crate::nat::remove_guest`]. [`bring_up`] renders every
//! leased VM's element, so a daemon restart reconciles them.
//!
//! Daemon shutdown: [`tear_down`] removes the NAT table, and the bridge too
//! when asked (`teardown_on_exit`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::cmdline::GuestNetwork;
use crate::mac::MacAddress;
use crate::nat::{self, GuestPort, NatConfig, NatError, Nft};
use crate::netlink::{
    parse_tap_name, tap_name, BridgeConfig, HostNetwork, NetlinkError, TAP_PREFIX,
};

/// The network configuration the daemon reads from its config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSettings {
    pub bridge: BridgeConfig,
    /// The interface NAT sends traffic out of; `None` means the interface of
    /// the default route, looked up at every [`bring_up`].
    pub uplink: Option<String>,
    /// Stop VMs from reaching each other.
    pub isolate_vms: bool,
    /// The DNS domain of VM names.
    pub domain: String,
    /// The port of the DNS server on the gateway: the one host port guests
    /// may reach.
    pub dns_port: u16,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            bridge: BridgeConfig::default(),
            uplink: None,
            isolate_vms: true,
            domain: crate::dns::DEFAULT_DOMAIN.to_owned(),
            dns_port: 53,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("Failed to set up bridge `{bridge}`")]
    SetUpBridge {
        bridge: String,
        #[source]
        source: NetlinkError,
    },
    #[error("Failed to find the host's uplink")]
    FindUplink {
        #[source]
        source: NetlinkError,
    },
    /// No default route and no configured uplink: guests would have no way
    /// out. The daemon can add a hint: set `[network] uplink`.
    #[error("The host has no IPv4 default route to send guest traffic out of")]
    NoUplink,
    #[error("Failed to apply the NAT table")]
    ApplyNat {
        #[source]
        source: NatError,
    },
    #[error("Failed to remove the NAT table")]
    RemoveNat {
        #[source]
        source: NatError,
    },
    #[error("Failed to delete bridge `{bridge}`")]
    DeleteBridge {
        bridge: String,
        #[source]
        source: NetlinkError,
    },
}

/// Brings the host network up (steps 1 of the module docs), letting
/// `guests` send from their taps. Returns the NAT configuration that was
/// applied.
///
/// # Errors
/// Any step fails; earlier steps are left in place (they are idempotent and
/// harmless, and the next attempt reuses them).
pub async fn bring_up(
    host: &dyn HostNetwork,
    nft: &dyn Nft,
    settings: &NetworkSettings,
    guests: BTreeSet<GuestPort>,
) -> Result<NatConfig, SetupError> {
    let bridge_error = |source| SetupError::SetUpBridge {
        bridge: settings.bridge.name.clone(),
        source,
    };
    host.ensure_bridge(&settings.bridge)
        .await
        .map_err(bridge_error)?;
    host.enable_ip_forwarding().await.map_err(bridge_error)?;
    host.enable_route_localnet(&settings.bridge.name)
        .await
        .map_err(bridge_error)?;
    let uplink = match &settings.uplink {
        Some(uplink) => uplink.clone(),
        None => host
            .default_route_interface()
            .await
            .map_err(|source| SetupError::FindUplink { source })?
            .ok_or(SetupError::NoUplink)?,
    };
    let config = NatConfig {
        bridge: settings.bridge.name.clone(),
        subnet: settings.bridge.subnet,
        uplink,
        isolate_vms: settings.isolate_vms,
        dns_port: settings.dns_port,
        guests,
    };
    nat::apply(nft, &config)
        .await
        .map_err(|source| SetupError::ApplyNat { source })?;
    Ok(config)
}

/// Removes the NAT table, and the bridge when `delete_bridge`.
///
/// # Errors
/// nft or netlink fails.
pub async fn tear_down(
    host: &dyn HostNetwork,
    nft: &dyn Nft,
    settings: &NetworkSettings,
    delete_bridge: bool,
) -> Result<(), SetupError> {
    nat::remove(nft)
        .await
        .map_err(|source| SetupError::RemoveNat { source })?;
    if delete_bridge {
        host.delete_link(&settings.bridge.name)
            .await
            .map_err(|source| SetupError::DeleteBridge {
                bridge: settings.bridge.name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Creates tap `name` (if missing) and attaches it to the bridge, isolated
/// when the settings say so.
///
/// # Errors
/// Netlink fails; a tap created here is not removed (the caller's undo
/// deletes it by name).
pub async fn prepare_tap(
    host: &dyn HostNetwork,
    settings: &NetworkSettings,
    name: &str,
) -> Result<(), NetlinkError> {
    host.create_tap(name).await?;
    host.attach_to_bridge(name, &settings.bridge.name, settings.isolate_vms)
        .await
}

/// The lowest tap index not in use.
#[must_use]
pub fn lowest_free_tap_index(in_use: impl Fn(u32) -> bool) -> u32 {
    (0..=u32::MAX)
        .find(|index| !in_use(*index))
        .unwrap_or(u32::MAX)
}

/// Deletes every banger tap (`bgtap<N>`) that `claimed` does not name;
/// returns the deleted names. Other interfaces are never touched, even when
/// they share the prefix.
///
/// # Errors
/// Listing or a deletion fails (deletions before it stay done).
pub async fn remove_leaked_taps(
    host: &dyn HostNetwork,
    claimed: &BTreeSet<String>,
) -> Result<Vec<String>, NetlinkError> {
    let mut removed = Vec::new();
    for name in host.list_links(TAP_PREFIX).await? {
        if parse_tap_name(&name).is_some() && !claimed.contains(&name) {
            host.delete_link(&name).await?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// The `banger.net=` configuration of the VM with `vm_id` at `address`: the
/// gateway is also its DNS server.
#[must_use]
pub fn guest_network(settings: &NetworkSettings, address: Ipv4Addr, vm_id: &str) -> GuestNetwork {
    let subnet = settings.bridge.subnet;
    GuestNetwork {
        address,
        prefix_len: subnet.prefix_len(),
        gateway: subnet.gateway(),
        dns: vec![subnet.gateway()],
        mac: Some(MacAddress::for_vm(vm_id)),
        domain: Some(settings.domain.clone()),
    }
}

/// `tap_name(lowest_free_tap_index(…))` against a set of names in use.
#[must_use]
pub fn next_tap_name(in_use: &BTreeSet<String>) -> String {
    tap_name(lowest_free_tap_index(|index| {
        in_use.contains(&tap_name(index))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::RecordingNft;
    use crate::netlink::{FakeLink, HostNetworkCall, RecordingHostNetwork};

    #[tokio::test]
    async fn bring_up_uses_the_default_route_and_applies_nat() {
        let host = RecordingHostNetwork::new().with_default_route("wlan0");
        let nft = RecordingNft::new();
        let settings = NetworkSettings::default();
        let config = bring_up(&host, &nft, &settings, BTreeSet::new())
            .await
            .unwrap();
        assert_eq!(config.uplink, "wlan0");
        assert!(config.isolate_vms);
        assert!(host.ip_forwarding());
        assert_eq!(
            host.calls(),
            [
                HostNetworkCall::EnsureBridge {
                    bridge: settings.bridge.clone()
                },
                HostNetworkCall::EnableIpForwarding,
                HostNetworkCall::DefaultRouteInterface,
            ]
        );
        assert_eq!(nft.scripts(), [nat::ruleset(&config).unwrap()]);
    }

    #[tokio::test]
    async fn bring_up_without_a_way_out_fails_clearly() {
        let host = RecordingHostNetwork::new();
        let nft = RecordingNft::new();
        let error = bring_up(&host, &nft, &NetworkSettings::default(), BTreeSet::new())
            .await
            .unwrap_err();
        assert!(matches!(error, SetupError::NoUplink));
        assert!(nft.scripts().is_empty());
        // A configured uplink needs no default route.
        let settings = NetworkSettings {
            uplink: Some("eth1".to_owned()),
            ..NetworkSettings::default()
        };
        assert_eq!(
            bring_up(&host, &nft, &settings, BTreeSet::new())
                .await
                .unwrap()
                .uplink,
            "eth1"
        );
    }

    #[tokio::test]
    async fn bring_up_stops_at_the_first_failure() {
        let host = RecordingHostNetwork::new().with_default_route("eth0");
        host.fail_call(0);
        let nft = RecordingNft::new();
        let error = bring_up(&host, &nft, &NetworkSettings::default(), BTreeSet::new())
            .await
            .unwrap_err();
        assert!(matches!(error, SetupError::SetUpBridge { .. }));
        assert_eq!(host.calls().len(), 1);
        assert!(nft.scripts().is_empty());
    }

    #[tokio::test]
    async fn taps_are_prepared_reconciled_and_torn_down() {
        let host = RecordingHostNetwork::new().with_default_route("eth0");
        let nft = RecordingNft::new();
        let settings = NetworkSettings::default();
        bring_up(&host, &nft, &settings, BTreeSet::new())
            .await
            .unwrap();
        let mut in_use = BTreeSet::new();
        for _ in 0..3 {
            let name = next_tap_name(&in_use);
            prepare_tap(&host, &settings, &name).await.unwrap();
            in_use.insert(name);
        }
        assert_eq!(
            in_use.iter().map(String::as_str).collect::<Vec<_>>(),
            ["bgtap0", "bgtap1", "bgtap2"]
        );
        assert_eq!(
            host.links().get("bgtap1"),
            Some(&FakeLink::Tap {
                controller: Some("banger0".to_owned()),
                isolated: true,
                up: true,
                carrier: false,
            })
        );
        // Someone else's interface that merely shares the prefix.
        host.add_link("bgtapestry", FakeLink::new_tap());
        in_use.remove("bgtap1");
        assert_eq!(next_tap_name(&in_use), "bgtap1");
        let removed = remove_leaked_taps(&host, &in_use).await.unwrap();
        assert_eq!(removed, ["bgtap1"]);
        assert!(host.links().contains_key("bgtapestry"));

        tear_down(&host, &nft, &settings, true).await.unwrap();
        assert_eq!(nft.scripts().last(), Some(&nat::remove_script()));
        assert!(!host.links().contains_key("banger0"));
    }

    #[test]
    fn guest_network_points_at_the_gateway() {
        let settings = NetworkSettings::default();
        let network = guest_network(&settings, Ipv4Addr::new(172, 30, 0, 7), "00000000000000ff");
        assert_eq!(
            network.to_kernel_argument(),
            format!(
                "banger.net=ip=172.30.0.7/24,gw=172.30.0.1,dns=172.30.0.1,mac={},domain=banger",
                MacAddress::for_vm("00000000000000ff")
            )
        );
    }
}
