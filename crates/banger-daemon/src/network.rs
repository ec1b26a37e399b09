//! The host network: gives each VM an address, a tap on the bridge, a MAC,
//! a `banger.net=` kernel argument and a DNS name, built on `banger-net`.
//! The network, DNS and NAT capabilities (`crate::capabilities::network`)
//! hook it into the VM lifecycle:
//!
//! 1. daemon start ([`Network::start`]): bridge, forwarding, NAT table,
//!    leaked VM taps removed, the tap pool's leftovers adopted and the pool
//!    filled in the background, DNS server on the gateway with a record per
//!    lease, and systemd-resolved told to route `~DOMAIN` there;
//! 2. create (stage `network`, [`Network::prepare`]): lease address and tap
//!    name in the store, take a tap from the pool (renamed to the lease's
//!    name) or create it; undone by [`Network::release`]. The DNS record
//!    ([`Network::add_record`]) and the NAT check ([`Network::ensure_nat`])
//!    follow;
//! 3. start: [`Network::attach`] gets the tap of an existing lease again if
//!    it is gone (host reboot) and adds the VM's (tap, MAC, IP) to the
//!    bridge table's guest set, so its tap may send as the VM (the set is
//!    rebuilt from all leases at daemon start);
//! 4. delete: [`Network::release`] takes the VM out of the guest set,
//!    returns the tap to the pool (or deletes it) and deletes the lease; [`Network::remove_record`] the DNS record;
//! 5. daemon stop ([`Network::shutdown`]): stops the pool filler and the DNS
//!    server, reverts resolved, and with `teardown_on_exit` deletes the pool,
//!    the NAT table and the bridge.
//!
//! The DNS server failing to bind (another server holds the port on every
//! address) does not stop the daemon: VMs still get addresses and egress,
//! `doctor` reports the port, and each create tries to bind again.
//!
//! With `[network] enabled = false` there is no network and none of its
//! capabilities: VMs get no NIC.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use banger_net::dns::{DnsConfig, DnsRecords, DnsServer};
use banger_net::nat::{self, GuestPort, NatConfig, NatError, Nft, NftCommand};
use banger_net::netlink::{BridgeConfig, HostNetwork, LinkStatus, LinuxHostNetwork, NetlinkError};
use banger_net::pool::{PoolStatus, TapPool};
use banger_net::resolved::{self, Presence, ResolvectlCommand, Resolved, ResolvedLink};
use banger_net::setup::{self, NetworkSettings};
use banger_net::{MacAddress, Subnet};
use banger_proto::vm::VmNetwork;
use banger_proto::ErrorKind;
use banger_store::{Store, StoreError};
use banger_vmm::NetworkInterfaceSpec;

use crate::config::NetworkConfig;

mod policy;

use crate::error::{RpcFailure, StoreFailure};
pub use policy::PolicyState;

/// What can go wrong giving VMs their network while the daemon runs
/// (bringing it up at start is `anyhow`: it ends the daemon).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("No address left for VM `{vm}`: {reason}")]
    NoAddressLeft { vm: String, reason: String },
    #[error("Failed to set up tap {tap}")]
    SetUpTap {
        tap: String,
        #[source]
        source: Box<NetlinkError>,
    },
    #[error("Failed to release tap {tap}")]
    ReleaseTap {
        tap: String,
        #[source]
        source: Box<NetlinkError>,
    },
    #[error("Failed to look up the VM's tap")]
    LookUpTap(#[source] Box<NetlinkError>),
    #[error("Failed to look at the bridge")]
    LookAtBridge(#[source] Box<NetlinkError>),
    #[error("Corrupt lease address {address}")]
    CorruptLease {
        address: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("Failed to list the nftables ruleset")]
    ListRuleset(#[source] NatError),
    #[error("Failed to restore the NAT table")]
    RestoreNat(#[source] NatError),
    #[error("Corrupt lease MAC address {mac}")]
    CorruptMac { mac: String },
    #[error("Failed to let tap {tap} send as its VM")]
    AllowGuest {
        tap: String,
        #[source]
        source: NatError,
    },
    #[error("Host port {port} is taken by {by}")]
    PortTaken {
        port: banger_proto::PublishedPort,
        by: String,
    },
    #[error("Host port {port} cannot be published on this host")]
    PortUnusable {
        port: banger_proto::PublishedPort,
        #[source]
        source: std::io::Error,
    },
    #[error("Networking is disabled: published ports, egress policies and network groups need it")]
    Disabled,
    #[error("`{group}` is not a network group name (1-32 of a-z, 0-9, -)")]
    InvalidGroup { group: String },
    #[error("VM `{vm}` has no network address")]
    NoLease { vm: String },
    #[error("Port {port} is not published")]
    PortNotPublished { port: banger_proto::PublishedPort },
    #[error("Failed to apply the published ports and egress policies")]
    ApplyPolicy(#[source] NatError),
    #[error(transparent)]
    Store(#[from] StoreFailure),
}

impl From<StoreError> for NetworkError {
    fn from(error: StoreError) -> Self {
        Self::Store(error.into())
    }
}

impl RpcFailure for NetworkError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NoAddressLeft { .. } => ErrorKind::InvalidState,
            Self::PortTaken { .. } => ErrorKind::AlreadyExists,
            Self::Disabled | Self::NoLease { .. } => ErrorKind::InvalidState,
            Self::PortUnusable { .. } => ErrorKind::InvalidParams,
            Self::InvalidGroup { .. } => ErrorKind::InvalidParams,
            Self::PortNotPublished { .. } => ErrorKind::NotFound,
            Self::Store(error) => error.kind(),
            _ => ErrorKind::Failed,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NoAddressLeft { .. } => Some(
                "delete VMs you no longer need, or configure a larger [network] subnet".to_owned(),
            ),
            Self::Disabled => {
                Some("set [network] enabled = true in the daemon's config".to_owned())
            }
            Self::PortTaken { .. } => {
                Some("pick another host port, or stop what holds it".to_owned())
            }
            Self::PortUnusable { .. } => Some(
                "give a host IP the host has (`ip -brief addr`), or leave it out for 0.0.0.0"
                    .to_owned(),
            ),
            Self::InvalidGroup { .. } => {
                Some("use 1 to 32 lowercase letters, digits and `-`".to_owned())
            }
            Self::NoLease { vm } => Some(format!(
                "start it with `banger vm start {vm}`; a VM gets its address when it starts"
            )),
            Self::PortNotPublished { .. } => {
                Some("`banger vm port NAME list` shows the published ports".to_owned())
            }
            Self::Store(error) => error.hint(),
            _ => None,
        }
    }
}

/// What became of telling systemd-resolved about the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedState {
    /// `[network] resolved = false`.
    Disabled,
    NotRunning,
    /// resolved runs in another network namespace than the daemon.
    OtherNamespace,
    Configured,
    /// Configuring failed; the error chain.
    Failed(String),
}

/// The DNS server, or why it is not serving.
enum DnsState {
    Serving(DnsServer),
    Unbound(String),
    Stopped,
}

pub struct Network {
    settings: NetworkSettings,
    host: Arc<dyn HostNetwork>,
    nft: Arc<dyn Nft>,
    resolved: Arc<dyn Resolved>,
    resolved_state: std::sync::Mutex<ResolvedState>,
    pool: Arc<TapPool>,
    filler: tokio::task::JoinHandle<()>,
    store: Store,
    records: DnsRecords,
    dns_address: SocketAddr,
    dns_config: DnsConfig,
    dns: tokio::sync::Mutex<DnsState>,
    teardown_on_exit: bool,
    /// The tables as applied at start, with the guests' ports as they are
    /// now, to restore them.
    nat: std::sync::Mutex<NatConfig>,
    /// Published ports, egress policies and groups.
    policy: Arc<PolicyState>,
}

/// What the VMM and the guest need from a lease.
pub struct Attachment {
    pub interface: NetworkInterfaceSpec,
    /// `banger.net=...` for the kernel command line.
    pub kernel_argument: String,
}

/// The host side effects the capability goes through.
pub struct NetworkSeams {
    pub host: Arc<dyn HostNetwork>,
    pub nft: Arc<dyn Nft>,
    pub resolved: Arc<dyn Resolved>,
    /// Whether (and how) systemd-resolved runs on this host.
    pub resolved_presence: Presence,
}

impl NetworkSeams {
    /// rtnetlink, `nft`, `resolvectl` and a probe of `/run/systemd/resolve`.
    pub fn linux() -> anyhow::Result<Self> {
        Ok(Self {
            host: Arc::new(LinuxHostNetwork::connect()?),
            nft: Arc::new(NftCommand::new()),
            resolved: Arc::new(ResolvectlCommand::new()),
            resolved_presence: resolved::probe(std::path::Path::new(resolved::RUN_DIR)),
        })
    }
}

impl Network {
    /// Brings the host network up; `None` when networking is disabled.
    pub async fn start(config: &NetworkConfig, store: Store) -> anyhow::Result<Option<Arc<Self>>> {
        if !config.enabled {
            return Ok(None);
        }
        Self::start_with(config, store, NetworkSeams::linux()?)
            .await
            .map(Some)
    }

    /// [`Network::start`] over explicit seams.
    pub async fn start_with(
        config: &NetworkConfig,
        store: Store,
        seams: NetworkSeams,
    ) -> anyhow::Result<Arc<Self>> {
        let NetworkSeams {
            host,
            nft,
            resolved,
            resolved_presence,
        } = seams;
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
            dns_port: config.dns_port,
        };
        let leases = store.list_leases()?;
        // Every leased VM's tap may send as its VM: VMs that kept running
        // across a restart keep their network, and the set is rebuilt from
        // the leases rather than added to, so it never holds duplicates.
        let guests = leases
            .iter()
            .filter_map(|(vm_id, name, network)| match guest_port(network) {
                Ok(guest) => Some(guest),
                Err(error) => {
                    tracing::warn!(vm = %name, %vm_id, %error, "lease left out of the guest set");
                    None
                }
            })
            .collect();
        // What the DNS server had let guests reach, before the tables are
        // replaced.
        let learned = match nft.list_ruleset_json().await {
            Ok(listing) => nat::learned_elements(&listing).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let nat = setup::bring_up(host.as_ref(), nft.as_ref(), &settings, guests).await?;
        let claimed: BTreeSet<String> = leases
            .iter()
            .map(|(_, _, network)| network.tap.clone())
            .collect();
        let removed = setup::remove_leaked_taps(host.as_ref(), &claimed).await?;
        if !removed.is_empty() {
            tracing::warn!(?removed, "removed leaked taps");
        }
        let pool = Arc::new(TapPool::new(
            Arc::clone(&host),
            &settings.bridge.name,
            settings.isolate_vms,
            config.tap_pool_size as usize,
        ));
        let adopted = pool.adopt().await?;
        if !adopted.is_empty() {
            tracing::info!(?adopted, "found pooled taps");
        }
        // Filling takes a few milliseconds per tap: not worth delaying the
        // socket for; creates meanwhile make their own taps.
        let filler = tokio::spawn(Arc::clone(&pool).run());

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
        let policy = PolicyState::new(Arc::clone(&nft));
        let mut dns_config = DnsConfig::new(upstreams);
        dns_config.domain = config.domain.clone();
        dns_config.policy = banger_net::dns::PolicyHandle(Some(
            Arc::clone(&policy) as Arc<dyn banger_net::dns::NamePolicy>
        ));
        let dns_address = SocketAddr::new(IpAddr::V4(gateway), config.dns_port);
        let network = Arc::new(Self {
            settings,
            host,
            nft,
            resolved,
            resolved_state: std::sync::Mutex::new(ResolvedState::Disabled),
            pool,
            filler,
            store,
            records,
            dns_address,
            dns_config,
            dns: tokio::sync::Mutex::new(DnsState::Stopped),
            teardown_on_exit: config.teardown_on_exit,
            nat: std::sync::Mutex::new(nat),
            policy,
        });
        // Ports of the VMs the store says run, egress limits and groups;
        // reconciliation corrects which VMs run.
        network.seed_learned(learned)?;
        network.set_active_from_store().await?;
        network.ensure_dns().await;
        let state = if config.resolved {
            network.configure_resolved(&resolved_presence).await
        } else {
            ResolvedState::Disabled
        };
        *network.resolved_state_guard() = state;
        tracing::info!(bridge = %config.bridge, subnet = %config.subnet, dns = %dns_address, "network up");
        Ok(network)
    }

    fn nat_guard(&self) -> std::sync::MutexGuard<'_, NatConfig> {
        self.nat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets the VM's tap send as the VM (its MAC and address); if the
    /// tables are gone, puts them back with it.
    async fn allow_guest(&self, lease: &VmNetwork) -> Result<(), NetworkError> {
        let guest = guest_port(lease)?;
        self.nat_guard().guests.insert(guest.clone());
        if let Err(error) = nat::add_guest(self.nft.as_ref(), &guest).await {
            tracing::warn!(%error, tap = %guest.tap, "adding the guest failed; re-applying the tables");
            let config = self.nat_guard().clone();
            nat::apply_with(self.nft.as_ref(), &config, &self.policy.rendered())
                .await
                .map_err(|source| NetworkError::AllowGuest {
                    tap: guest.tap.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Stops the tap of `lease` sending; a failure is logged (the only way
    /// it fails is the table being gone, which took the element along).
    async fn disallow_guest(&self, lease: &VmNetwork) {
        let Ok(guest) = guest_port(lease) else {
            return;
        };
        self.nat_guard().guests.remove(&guest);
        if let Err(error) = nat::remove_guest(self.nft.as_ref(), &guest).await {
            tracing::warn!(%error, tap = %guest.tap, "failed to remove the guest from the bridge table");
        }
    }

    fn resolved_state_guard(&self) -> std::sync::MutexGuard<'_, ResolvedState> {
        self.resolved_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Binds the DNS server if it is not serving yet. Failures are logged
    /// and kept for `doctor`.
    async fn ensure_dns(&self) {
        let mut dns = self.dns.lock().await;
        if matches!(*dns, DnsState::Serving(_)) {
            return;
        }
        match DnsServer::bind(
            self.dns_address,
            self.dns_config.clone(),
            self.records.clone(),
        )
        .await
        {
            Ok(server) => {
                if matches!(*dns, DnsState::Unbound(_)) {
                    tracing::info!(dns = %self.dns_address, "DNS server bound");
                }
                *dns = DnsState::Serving(server);
            }
            Err(error) => {
                let message = format!("{:#}", anyhow::Error::from(error));
                if !matches!(&*dns, DnsState::Unbound(previous) if *previous == message) {
                    tracing::error!(error = %message, "VM names will not resolve");
                }
                *dns = DnsState::Unbound(message);
            }
        }
    }

    fn resolved_link(&self) -> Option<ResolvedLink> {
        match self.dns_address {
            SocketAddr::V4(server) => Some(ResolvedLink {
                link: self.settings.bridge.name.clone(),
                server,
                domain: self.settings.domain.clone(),
            }),
            SocketAddr::V6(_) => None,
        }
    }

    async fn configure_resolved(&self, presence: &Presence) -> ResolvedState {
        match presence {
            Presence::NotRunning => return ResolvedState::NotRunning,
            Presence::OtherNamespace => return ResolvedState::OtherNamespace,
            Presence::Running => {}
        }
        let Some(link) = self.resolved_link() else {
            return ResolvedState::NotRunning;
        };
        match resolved::configure(self.resolved.as_ref(), &link).await {
            Ok(()) => {
                tracing::info!(link = %link.link, domain = %link.domain, "systemd-resolved routes the VM domain to the DNS server");
                ResolvedState::Configured
            }
            Err(error) => {
                let message = format!("{:#}", anyhow::Error::from(error));
                tracing::warn!(error = %message, "failed to configure systemd-resolved; the host will not resolve VM names");
                let _ = resolved::revert(self.resolved.as_ref(), &link.link).await;
                ResolvedState::Failed(message)
            }
        }
    }

    pub fn domain(&self) -> &str {
        &self.settings.domain
    }

    pub fn settings(&self) -> &NetworkSettings {
        &self.settings
    }

    /// Where the DNS server listens (or would).
    pub fn dns_address(&self) -> SocketAddr {
        self.dns_address
    }

    /// `Ok(())` while the DNS server serves; else why it does not.
    pub async fn dns_status(&self) -> Result<(), String> {
        match &*self.dns.lock().await {
            DnsState::Serving(_) => Ok(()),
            DnsState::Unbound(error) => Err(error.clone()),
            DnsState::Stopped => Err("the DNS server is stopped".to_owned()),
        }
    }

    pub fn pool_status(&self) -> PoolStatus {
        self.pool.status()
    }

    /// The bridge's state; `None` when it is gone.
    pub async fn bridge_status(&self) -> Result<Option<LinkStatus>, NetworkError> {
        self.host
            .link_status(&self.settings.bridge.name)
            .await
            .map_err(|error| NetworkError::LookAtBridge(Box::new(error)))
    }

    pub fn resolved_state(&self) -> ResolvedState {
        self.resolved_state_guard().clone()
    }

    /// Whether resolved still holds the bridge's settings (it drops them
    /// when it restarts); `None` unless they were applied.
    pub async fn resolved_routes(&self) -> Option<Result<bool, String>> {
        if self.resolved_state() != ResolvedState::Configured {
            return None;
        }
        let link = self.resolved_link()?;
        Some(
            resolved::query(self.resolved.as_ref(), &link.link)
                .await
                .map(|settings| settings.routes(&link))
                .map_err(|error| format!("{:#}", anyhow::Error::from(error))),
        )
    }

    fn attachment(&self, vm_id: &str, lease: &VmNetwork) -> Result<Attachment, NetworkError> {
        let address: Ipv4Addr = lease
            .ip
            .parse()
            .map_err(|source| NetworkError::CorruptLease {
                address: lease.ip.clone(),
                source,
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

    /// Leases an address and a tap to the VM and sets the tap up; returns
    /// the lease (stored with the VM).
    pub async fn prepare(&self, vm_id: &str, vm_name: &str) -> Result<VmNetwork, NetworkError> {
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
            .map_err(|reason| NetworkError::NoAddressLeft {
                vm: vm_name.to_owned(),
                reason,
            })?;
        match self.pool.take(&leased.tap).await {
            Ok(source) => tracing::debug!(vm = %vm_name, tap = %leased.tap, ?source, "tap ready"),
            Err(source) => {
                let _ = self.host.delete_link(&leased.tap).await;
                let _ = self.store.delete_lease(vm_id);
                return Err(NetworkError::SetUpTap {
                    tap: leased.tap,
                    source: Box::new(source),
                });
            }
        }
        Ok(leased)
    }

    /// Answers `NAME.DOMAIN` with the lease's address (binding the DNS
    /// server first if it is not serving yet).
    pub async fn add_record(&self, vm_name: &str, lease: &VmNetwork) {
        self.ensure_dns().await;
        if let Ok(address) = lease.ip.parse() {
            self.records.insert(vm_name, address);
        }
    }

    /// Stops answering `NAME.DOMAIN`.
    pub fn remove_record(&self, vm_name: &str) {
        self.records.remove(vm_name);
    }

    /// Puts banger's NAT table back if something removed it (a firewall
    /// reload that flushes the whole ruleset does); says whether it had to.
    pub async fn ensure_nat(&self) -> Result<bool, NetworkError> {
        let listing = self
            .nft
            .list_ruleset_json()
            .await
            .map_err(NetworkError::ListRuleset)?;
        match banger_net::nat::summarize(&listing) {
            Ok(summary) if summary.complete() => return Ok(false),
            Ok(_) => {}
            Err(error) => {
                // Unknown is not missing: leave the ruleset alone.
                tracing::warn!(%error, "cannot read the nftables ruleset");
                return Ok(false);
            }
        }
        let config = self.nat_guard().clone();
        banger_net::nat::apply_with(self.nft.as_ref(), &config, &self.policy.rendered())
            .await
            .map_err(NetworkError::RestoreNat)?;
        tracing::warn!("banger's nftables table was gone; restored it");
        Ok(true)
    }

    /// The attachment of an existing lease, getting its tap again if the
    /// host lost it; `None` if the VM has no lease.
    pub async fn attach(
        &self,
        vm_id: &str,
        lease: Option<&VmNetwork>,
    ) -> Result<Option<Attachment>, NetworkError> {
        let Some(lease) = lease else {
            return Ok(None);
        };
        let present = self
            .host
            .link_status(&lease.tap)
            .await
            .map_err(|error| NetworkError::LookUpTap(Box::new(error)))?
            .is_some();
        if !present {
            self.pool
                .take(&lease.tap)
                .await
                .map_err(|source| NetworkError::SetUpTap {
                    tap: lease.tap.clone(),
                    source: Box::new(source),
                })?;
        }
        let attachment = self.attachment(vm_id, lease)?;
        self.allow_guest(lease).await?;
        if self.in_group(vm_id) {
            // Its group's peers reach it through the bridge; the tables
            // still drop everyone else.
            self.host
                .attach_to_bridge(&lease.tap, &self.settings.bridge.name, false)
                .await
                .map_err(|source| NetworkError::SetUpTap {
                    tap: lease.tap.clone(),
                    source: Box::new(source),
                })?;
        }
        self.activate(vm_id).await?;
        Ok(Some(attachment))
    }

    /// Returns the VM's tap to the pool (or deletes it) and deletes the
    /// lease. Missing parts are fine.
    pub async fn release(&self, vm_id: &str, vm_name: &str) -> Result<(), NetworkError> {
        let lease = self
            .store
            .list_leases()?
            .into_iter()
            .find(|(id, _, _)| id == vm_id);
        let address = lease
            .as_ref()
            .and_then(|(_, _, network)| network.ip.parse().ok());
        // The tap goes before the lease: once the lease is gone its tap
        // name can be leased again.
        if let Some((_, _, network)) = lease {
            self.disallow_guest(&network).await;
            if self.in_group(vm_id) {
                // Back to the pool's isolation before the pool takes it.
                let _ = self
                    .host
                    .attach_to_bridge(
                        &network.tap,
                        &self.settings.bridge.name,
                        self.settings.isolate_vms,
                    )
                    .await;
            }
            let fate = self.pool.give_back(&network.tap).await.map_err(|source| {
                NetworkError::ReleaseTap {
                    tap: network.tap.clone(),
                    source: Box::new(source),
                }
            })?;
            tracing::debug!(vm = %vm_name, tap = %network.tap, ?fate, "tap released");
        }
        self.store.delete_lease(vm_id)?;
        self.store.remove_ports_of(vm_id)?;
        self.policy_released(vm_id, address).await;
        Ok(())
    }

    /// Bridge, subnet and how many addresses are leased and free.
    pub fn status(&self) -> Result<banger_proto::status::NetworkStatus, NetworkError> {
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

    /// Stops the pool filler and the DNS server and reverts resolved (the
    /// server it was told about is gone); removes the pool, the NAT table
    /// and the bridge only with `teardown_on_exit`, so VMs that keep
    /// running keep their network.
    pub async fn shutdown(&self) {
        self.filler.abort();
        let dns = std::mem::replace(&mut *self.dns.lock().await, DnsState::Stopped);
        if let DnsState::Serving(server) = dns {
            let _ = server.shutdown().await;
        }
        if self.resolved_state() == ResolvedState::Configured {
            if let Err(error) =
                resolved::revert(self.resolved.as_ref(), &self.settings.bridge.name).await
            {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(error)), "failed to revert systemd-resolved");
            }
            *self.resolved_state_guard() = ResolvedState::NotRunning;
        }
        if self.teardown_on_exit {
            if let Err(error) = self.pool.drain().await {
                tracing::warn!(%error, "failed to delete pooled taps");
            }
            if let Err(error) =
                setup::tear_down(self.host.as_ref(), self.nft.as_ref(), &self.settings, true).await
            {
                tracing::warn!(%error, "network teardown failed");
            }
        }
    }
}

/// What the tap of `lease` may send from.
fn guest_port(lease: &VmNetwork) -> Result<GuestPort, NetworkError> {
    Ok(GuestPort {
        tap: lease.tap.clone(),
        mac: lease.mac.parse().map_err(|_| NetworkError::CorruptMac {
            mac: lease.mac.clone(),
        })?,
        address: lease
            .ip
            .parse()
            .map_err(|source| NetworkError::CorruptLease {
                address: lease.ip.clone(),
                source,
            })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_net::nat::RecordingNft;
    use banger_net::netlink::RecordingHostNetwork;
    use banger_net::resolved::RecordingResolved;

    fn seams(presence: Presence) -> (RecordingHostNetwork, RecordingResolved, NetworkSeams) {
        let host = RecordingHostNetwork::new().with_default_route("eth0");
        let resolved = RecordingResolved::new();
        let seams = NetworkSeams {
            host: Arc::new(host.clone()),
            nft: Arc::new(RecordingNft::new()),
            resolved: Arc::new(resolved.clone()),
            resolved_presence: presence,
        };
        (host, resolved, seams)
    }

    fn config() -> NetworkConfig {
        NetworkConfig {
            // A documentation subnet no host has an address in: binding the
            // DNS server fails, which the daemon survives.
            subnet: "192.0.2.1/24".to_owned(),
            dns_port: 5399,
            tap_pool_size: 2,
            ..NetworkConfig::default()
        }
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn start_configures_resolved_where_it_runs_and_reverts_at_shutdown() {
        let (_dir, store) = store().await;
        let (_host, resolved, seams) = seams(Presence::Running);
        let network = Network::start_with(&config(), store, seams).await.unwrap();
        assert_eq!(network.resolved_state(), ResolvedState::Configured);
        assert_eq!(
            resolved.calls(),
            [
                ["dns", "banger0", "192.0.2.1:5399"],
                ["domain", "banger0", "~banger"],
                ["default-route", "banger0", "false"],
            ]
        );
        assert_eq!(network.resolved_routes().await, Some(Ok(true)));
        network.shutdown().await;
        assert_eq!(
            resolved.calls().last().unwrap(),
            &["revert".to_owned(), "banger0".to_owned()]
        );
    }

    #[tokio::test]
    async fn resolved_is_left_alone_where_it_does_not_run_or_is_not_ours() {
        for (presence, state) in [
            (Presence::NotRunning, ResolvedState::NotRunning),
            (Presence::OtherNamespace, ResolvedState::OtherNamespace),
        ] {
            let (_dir, store) = store().await;
            let (_host, resolved, seams) = seams(presence);
            let network = Network::start_with(&config(), store, seams).await.unwrap();
            assert_eq!(network.resolved_state(), state);
            network.shutdown().await;
            assert!(resolved.calls().is_empty());
        }
        let (_dir, store) = store().await;
        let (_host, resolved, seams) = seams(Presence::Running);
        let disabled = NetworkConfig {
            resolved: false,
            ..config()
        };
        let network = Network::start_with(&disabled, store, seams).await.unwrap();
        assert_eq!(network.resolved_state(), ResolvedState::Disabled);
        assert!(resolved.calls().is_empty());
    }

    #[tokio::test]
    async fn a_failing_resolved_is_reported_and_undone() {
        let (_dir, store) = store().await;
        let (_host, resolved, seams) = seams(Presence::Running);
        resolved.fail("domain");
        let network = Network::start_with(&config(), store, seams).await.unwrap();
        let ResolvedState::Failed(error) = network.resolved_state() else {
            panic!("{:?}", network.resolved_state());
        };
        assert!(
            error.contains("resolvectl domain banger0 ~banger"),
            "{error}"
        );
        assert_eq!(resolved.calls().last().unwrap()[0], "revert");
    }

    #[tokio::test]
    async fn a_started_vm_may_send_as_itself_until_deleted() {
        let (_dir, store) = store().await;
        let nft = RecordingNft::new();
        let seams = NetworkSeams {
            host: Arc::new(RecordingHostNetwork::new().with_default_route("eth0")),
            nft: Arc::new(nft.clone()),
            resolved: Arc::new(RecordingResolved::new()),
            resolved_presence: Presence::NotRunning,
        };
        let network = Network::start_with(&config(), store, seams).await.unwrap();
        // A lease as the network stage stores it.
        let lease = VmNetwork {
            ip: "192.0.2.2".to_owned(),
            mac: MacAddress::for_vm("00000000000000e1").to_string(),
            tap: "bgtap0".to_owned(),
            dns_name: String::new(),
            ..VmNetwork::default()
        };
        let guest = guest_port(&lease).unwrap();
        assert_eq!(guest.tap, "bgtap0");
        assert_eq!(guest.mac, MacAddress::for_vm("00000000000000e1"));
        assert_eq!(guest.address, Ipv4Addr::new(192, 0, 2, 2));
        network
            .attach("00000000000000e1", Some(&lease))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            nft.scripts().last(),
            Some(&nat::add_guest_script(&guest).unwrap())
        );
        // Tables flushed behind the daemon's back come back with the guest.
        assert!(network.ensure_nat().await.unwrap());
        let restored = nft.scripts().last().unwrap().clone();
        assert!(
            restored.contains("elements = { \"bgtap0\" . "),
            "{restored}"
        );
        // `release` takes it out (after looking the lease up in the store).
        network.disallow_guest(&lease).await;
        assert_eq!(
            nft.scripts().last(),
            Some(&nat::remove_guest_script(&guest).unwrap())
        );
        assert!(network.nat_guard().guests.is_empty());
        network.shutdown().await;
    }

    #[tokio::test]
    async fn an_unbindable_dns_port_does_not_stop_the_network() {
        let (_dir, store) = store().await;
        let (host, _resolved, seams) = seams(Presence::NotRunning);
        let network = Network::start_with(&config(), store, seams).await.unwrap();
        let error = network.dns_status().await.unwrap_err();
        assert!(error.contains("192.0.2.1:5399"), "{error}");
        // The pool fills in the background.
        for _ in 0..100 {
            if network.pool_status().ready == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(network.pool_status().ready, 2);
        assert!(host.links().contains_key("bgpool1"));
        network.shutdown().await;
    }
}
