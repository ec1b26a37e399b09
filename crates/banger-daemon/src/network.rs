//! The network capability: gives each VM an address, a tap on the bridge, a
//! MAC, a `banger.net=` kernel argument and a DNS name, built on
//! `banger-net` and hooked into the VM lifecycle:
//!
//! 1. daemon start ([`Network::start`]): bridge, forwarding, NAT table,
//!    leaked taps removed, DNS server on the gateway with a record per lease;
//! 2. create (stage `network`, [`Network::prepare`]): lease address and tap
//!    in the store, create and attach the tap, add the DNS record; undone by
//!    [`Network::release`];
//! 3. start: [`Network::attach`] re-creates the tap of an existing lease if
//!    it is gone (host reboot);
//! 4. delete: [`Network::release`] deletes the tap, the lease and the record.
//!
//! With `[network] enabled = false` there is no capability: VMs get no NIC.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use banger_net::dns::{DnsConfig, DnsRecords, DnsServer};
use banger_net::nat::{Nft, NftCommand};
use banger_net::netlink::{BridgeConfig, HostNetwork, LinuxHostNetwork};
use banger_net::setup::{self, NetworkSettings};
use banger_net::{MacAddress, Subnet};
use banger_proto::vm::VmNetwork;
use banger_store::Store;
use banger_vmm::NetworkInterfaceSpec;

use crate::config::NetworkConfig;
use crate::error::{DaemonError, DaemonResult};

pub struct Network {
    settings: NetworkSettings,
    host: Arc<dyn HostNetwork>,
    nft: Arc<dyn Nft>,
    store: Store,
    records: DnsRecords,
    dns: tokio::sync::Mutex<Option<DnsServer>>,
    teardown_on_exit: bool,
}

/// What the VMM and the guest need from a lease.
pub struct Attachment {
    pub interface: NetworkInterfaceSpec,
    /// `banger.net=...` for the kernel command line.
    pub kernel_argument: String,
}

impl Network {
    /// Brings the host network up; `None` when networking is disabled.
    pub async fn start(config: &NetworkConfig, store: Store) -> anyhow::Result<Option<Arc<Self>>> {
        if !config.enabled {
            return Ok(None);
        }
        let subnet: Subnet = config.subnet.parse().map_err(|error| {
            anyhow::anyhow!("Invalid [network] subnet {:?}: {error}", config.subnet)
        })?;
        let settings = NetworkSettings {
            bridge: BridgeConfig {
                name: config.bridge.clone(),
                subnet,
            },
            uplink: (!config.uplink.is_empty()).then(|| config.uplink.clone()),
            isolate_vms: config.isolate_vms,
            domain: config.domain.clone(),
        };
        let host: Arc<dyn HostNetwork> = Arc::new(LinuxHostNetwork::connect()?);
        let nft: Arc<dyn Nft> = Arc::new(NftCommand::new());
        setup::bring_up(host.as_ref(), nft.as_ref(), &settings).await?;
        let leases = store.list_leases()?;
        let claimed: BTreeSet<String> = leases
            .iter()
            .map(|(_, _, network)| network.tap.clone())
            .collect();
        let removed = setup::remove_leaked_taps(host.as_ref(), &claimed).await?;
        if !removed.is_empty() {
            tracing::warn!(?removed, "removed leaked taps");
        }
        let records = DnsRecords::new();
        for (_, name, network) in &leases {
            if let Ok(address) = network.ip.parse() {
                records.insert(name, address);
            }
        }
        let gateway = subnet.gateway();
        let upstreams: Vec<SocketAddr> = if config.dns_upstreams.is_empty() {
            banger_net::dns::upstreams_from_resolv_conf(
                std::path::Path::new("/etc/resolv.conf"),
                &[IpAddr::V4(gateway)],
            )
            .unwrap_or_default()
        } else {
            config
                .dns_upstreams
                .iter()
                .map(|upstream| {
                    upstream
                        .parse::<SocketAddr>()
                        .or_else(|_| upstream.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .map_err(|_| {
                            anyhow::anyhow!("Invalid [network] dns_upstreams entry {upstream:?}")
                        })
                })
                .collect::<anyhow::Result<_>>()?
        };
        let mut dns_config = DnsConfig::new(upstreams);
        dns_config.domain = config.domain.clone();
        let dns = DnsServer::bind(
            SocketAddr::new(IpAddr::V4(gateway), config.dns_port),
            dns_config,
            records.clone(),
        )
        .await?;
        tracing::info!(bridge = %config.bridge, subnet = %config.subnet, dns = %dns.local_address(), "network up");
        Ok(Some(Arc::new(Self {
            settings,
            host,
            nft,
            store,
            records,
            dns: tokio::sync::Mutex::new(Some(dns)),
            teardown_on_exit: config.teardown_on_exit,
        })))
    }

    pub fn domain(&self) -> &str {
        &self.settings.domain
    }

    fn attachment(&self, vm_id: &str, lease: &VmNetwork) -> DaemonResult<Attachment> {
        let address: Ipv4Addr = lease.ip.parse().map_err(|error| {
            DaemonError::failed(format!("Corrupt lease address {}", lease.ip), error)
        })?;
        Ok(Attachment {
            interface: NetworkInterfaceSpec {
                id: "eth0".to_owned(),
                tap: lease.tap.clone(),
                mac: lease.mac.clone(),
            },
            kernel_argument: setup::guest_network(&self.settings, address, vm_id)
                .to_kernel_argument(),
        })
    }

    /// Leases an address and a tap to the VM and sets the tap up.
    pub async fn prepare(&self, vm_id: &str, vm_name: &str) -> DaemonResult<Attachment> {
        let subnet = self.settings.bridge.subnet;
        let leased = self
            .store
            .insert_lease(vm_id, |ips, taps| {
                let address = subnet
                    .allocate(|candidate| ips.iter().any(|ip| ip == &candidate.to_string()))
                    .map_err(|error| error.to_string())?;
                let taps: BTreeSet<String> = taps.iter().cloned().collect();
                Ok((
                    address.to_string(),
                    setup::next_tap_name(&taps),
                    MacAddress::for_vm(vm_id).to_string(),
                ))
            })?
            .map_err(|refusal| {
                DaemonError::invalid_state(format!("No address left for VM `{vm_name}`: {refusal}"))
                    .with_hint(
                        "delete VMs you no longer need, or configure a larger [network] subnet",
                    )
            })?;
        if let Err(error) =
            setup::prepare_tap(self.host.as_ref(), &self.settings, &leased.tap).await
        {
            let _ = self.host.delete_link(&leased.tap).await;
            let _ = self.store.delete_lease(vm_id);
            return Err(DaemonError::failed(
                format!("Failed to set up tap {}", leased.tap),
                error,
            ));
        }
        if let Ok(address) = leased.ip.parse() {
            self.records.insert(vm_name, address);
        }
        self.attachment(vm_id, &leased)
    }

    /// The attachment of an existing lease, re-creating its tap if the host
    /// lost it; `None` if the VM has no lease.
    pub async fn attach(
        &self,
        vm_id: &str,
        lease: Option<&VmNetwork>,
    ) -> DaemonResult<Option<Attachment>> {
        let Some(lease) = lease else {
            return Ok(None);
        };
        let present = self
            .host
            .list_links(&lease.tap)
            .await
            .map_err(|error| DaemonError::failed("Failed to list links", error))?
            .contains(&lease.tap);
        if !present {
            setup::prepare_tap(self.host.as_ref(), &self.settings, &lease.tap)
                .await
                .map_err(|error| {
                    DaemonError::failed(format!("Failed to set up tap {}", lease.tap), error)
                })?;
        }
        self.attachment(vm_id, lease).map(Some)
    }

    /// Deletes the VM's tap, lease and DNS record. Missing parts are fine.
    pub async fn release(&self, vm_id: &str, vm_name: &str) -> DaemonResult<()> {
        let lease = self
            .store
            .list_leases()?
            .into_iter()
            .find(|(id, _, _)| id == vm_id);
        if let Some((_, _, network)) = lease {
            self.host.delete_link(&network.tap).await.map_err(|error| {
                DaemonError::failed(format!("Failed to delete tap {}", network.tap), error)
            })?;
        }
        self.store.delete_lease(vm_id)?;
        self.records.remove(vm_name);
        Ok(())
    }

    /// Bridge, subnet and how many addresses are leased and free.
    pub fn status(&self) -> DaemonResult<banger_proto::status::NetworkStatus> {
        let used = self.store.list_leases()?.len() as u64;
        let capacity = self.settings.bridge.subnet.assignable().count() as u64;
        Ok(banger_proto::status::NetworkStatus {
            bridge: self.settings.bridge.name.clone(),
            subnet: self.settings.bridge.subnet.to_string(),
            domain: self.settings.domain.clone(),
            leases_used: used,
            leases_free: capacity.saturating_sub(used),
        })
    }

    /// `NAME.DOMAIN` for `vm_name`.
    pub fn dns_name(&self, vm_name: &str) -> String {
        format!("{vm_name}.{}", self.settings.domain)
    }

    /// Stops the DNS server; removes the NAT table (and the bridge when
    /// configured) only with `teardown_on_exit`, so VMs that keep running
    /// keep their network.
    pub async fn shutdown(&self) {
        if let Some(dns) = self.dns.lock().await.take() {
            let _ = dns.shutdown().await;
        }
        if self.teardown_on_exit {
            if let Err(error) =
                setup::tear_down(self.host.as_ref(), self.nft.as_ref(), &self.settings, true).await
            {
                tracing::warn!(%error, "network teardown failed");
            }
        }
    }
}
