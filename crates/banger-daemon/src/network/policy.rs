//! Published ports, egress policies and network groups over banger's
//! nft tables ([`banger_net::nat::Policy`]):
//!
//! - The store holds each VM's ports (`published_ports`) and its egress
//!   policy and group (`network_policies`); the rendered policy is rebuilt
//!   from it (and from which VMs run) at every change and applied with the
//!   rest of the tables in one nft transaction, so N applies leave one rule
//!   per published port.
//! - A port's DNAT rule exists while its VM runs (from launch to the
//!   VMM's exit); the port stays reserved in the store while the VM exists.
//!   A port is refused when another VM publishes an overlapping one, or
//!   when binding it on the host fails (something listens there).
//! - Egress limits apply to every leased VM, running or not; the DNS
//!   server asks [`PolicyState`] which names a guest may resolve and tells
//!   it the addresses it handed out, which go into the `egress_learned`
//!   set with the answer's TTL (at least [`MIN_LEARNED_TTL`]).
//! - A VM in a network group has its tap attached without the bridge's
//!   `isolated` flag, and (guest, guest) pairs of the group are accepted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use banger_net::dns::{NamePolicy, NameVerdict};
use banger_net::nat::{self, EgressLimit, Nft, PortForward, Transport};
use banger_proto::vm::VmNetwork;
use banger_proto::{EgressPolicy, Protocol, PublishedPort};

use super::{Network, NetworkError};

/// The shortest time a learned address stays allowed, so a guest whose
/// answer had a TTL of 0 or 1 can still connect.
pub const MIN_LEARNED_TTL: Duration = Duration::from_secs(10);

/// The policy as rendered, plus what the DNS server asks.
#[derive(Default)]
struct Inner {
    rendered: nat::Policy,
    /// Each leased guest's egress policy (allow-all ones too).
    egress: HashMap<Ipv4Addr, EgressPolicy>,
    /// VMs whose VMM runs: their ports are forwarded.
    active: BTreeSet<String>,
}

/// Shared by the network and the DNS server.
pub struct PolicyState {
    inner: Mutex<Inner>,
    nft: Arc<dyn Nft>,
    /// Serialises render-and-apply, so a later state is never overwritten
    /// by an earlier one.
    apply: tokio::sync::Mutex<()>,
}

impl PolicyState {
    pub fn new(nft: Arc<dyn Nft>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            nft,
            apply: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The conntrack mark of connections `guest` opens under `policy`:
    /// the same for the same policy (a daemon restart keeps connections),
    /// another for another (a change checks old connections again).
    fn epoch(guest: Ipv4Addr, policy: &EgressPolicy) -> u32 {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(format!("{guest} {policy}").as_bytes());
        let epoch = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        epoch.max(1)
    }

    pub fn rendered(&self) -> nat::Policy {
        self.lock().rendered.clone()
    }

    /// The egress policy the guest at `address` is under.
    pub fn egress_of(&self, address: Ipv4Addr) -> EgressPolicy {
        self.lock()
            .egress
            .get(&address)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait]
impl NamePolicy for PolicyState {
    fn verdict(&self, source: IpAddr, name: &str) -> NameVerdict {
        let IpAddr::V4(source) = source else {
            return NameVerdict::Forward;
        };
        match self.lock().egress.get(&source) {
            None | Some(EgressPolicy::AllowAll) => NameVerdict::Forward,
            Some(policy) if policy.allows_name(name) => NameVerdict::Learn,
            Some(_) => NameVerdict::Refuse,
        }
    }

    async fn learned(&self, source: IpAddr, addresses: Vec<(Ipv4Addr, u32)>) {
        let IpAddr::V4(guest) = source else {
            return;
        };
        let now = Instant::now();
        let mut script = String::new();
        {
            let mut inner = self.lock();
            if !matches!(inner.egress.get(&guest), Some(EgressPolicy::Allow(_))) {
                return;
            }
            inner.rendered.learned.retain(|_, until| *until > now);
            for (address, ttl) in addresses {
                let ttl = Duration::from_secs(u64::from(ttl)).max(MIN_LEARNED_TTL);
                let until = now + ttl;
                let entry = inner
                    .rendered
                    .learned
                    .entry((guest, address))
                    .or_insert(until);
                *entry = (*entry).max(until);
                script.push_str(&nat::learn_script(
                    guest,
                    address,
                    entry.saturating_duration_since(now),
                ));
            }
        }
        if let Err(error) = self.nft.run_script(&script).await {
            tracing::warn!(%guest, %error, "failed to allow resolved addresses");
        }
    }
}

fn transport(protocol: Protocol) -> Transport {
    match protocol {
        Protocol::Tcp => Transport::Tcp,
        Protocol::Udp => Transport::Udp,
    }
}

/// Why `port` cannot be published on this host (binding it fails):
/// something listens there, or the address is not the host's.
fn host_port_problem(port: &PublishedPort) -> Option<NetworkError> {
    let address = SocketAddr::new(IpAddr::V4(port.host_ip), port.host_port);
    let bound = match port.protocol {
        Protocol::Tcp => TcpListener::bind(address).map(drop),
        Protocol::Udp => UdpSocket::bind(address).map(drop),
    };
    let error = bound.err()?;
    Some(if error.kind() == std::io::ErrorKind::AddrInUse {
        NetworkError::PortTaken {
            port: *port,
            by: "a host socket".to_owned(),
        }
    } else {
        NetworkError::PortUnusable {
            port: *port,
            source: error,
        }
    })
}

impl Network {
    /// Checks `ports` can be published for a new VM, before anything is
    /// made: no overlaps among them or with other VMs' ports, and no host
    /// socket holds them. (Recording them checks other VMs' again, in one
    /// transaction.)
    pub fn check_ports(&self, ports: &[PublishedPort]) -> Result<(), NetworkError> {
        let names: HashMap<String, String> = self
            .store
            .list_vms()?
            .into_iter()
            .map(|vm| (vm.id, vm.name))
            .collect();
        let published = self.store.list_ports()?;
        for (index, port) in ports.iter().enumerate() {
            if let Some((vm_id, other)) = published
                .iter()
                .find(|(_, other)| banger_store::ports_overlap(other, port))
            {
                let vm = names.get(vm_id).map_or(vm_id.as_str(), String::as_str);
                return Err(NetworkError::PortTaken {
                    port: *port,
                    by: format!("VM `{vm}` ({other})"),
                });
            }
            if let Some(other) = ports[..index]
                .iter()
                .find(|other| banger_store::ports_overlap(other, port))
            {
                return Err(NetworkError::PortTaken {
                    port: *port,
                    by: format!("-p {other} of the same VM"),
                });
            }
            if let Some(error) = host_port_problem(port) {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Records a new VM's ports, egress policy and group (stage `network`);
    /// undone by the lease's release (the rows go with the VM's).
    pub async fn record_policy(
        &self,
        vm_id: &str,
        ports: &[PublishedPort],
        egress: &EgressPolicy,
        group: Option<&str>,
    ) -> Result<(), NetworkError> {
        for port in ports {
            self.reserve_port(vm_id, port)?;
        }
        self.store.set_network_policy(vm_id, egress, group)?;
        // Ports are forwarded from launch on; limits and groups at once.
        if *egress == EgressPolicy::AllowAll && group.is_none() {
            return Ok(());
        }
        self.apply_policy().await
    }

    fn reserve_port(&self, vm_id: &str, port: &PublishedPort) -> Result<(), NetworkError> {
        if let Err((vm, other)) = self.store.add_port(vm_id, port)? {
            return Err(NetworkError::PortTaken {
                port: *port,
                by: format!("VM `{vm}` ({other})"),
            });
        }
        Ok(())
    }

    /// Publishes `port` for a VM (running or not).
    pub async fn add_port(
        &self,
        vm_id: &str,
        port: PublishedPort,
    ) -> Result<Vec<PublishedPort>, NetworkError> {
        if self.store.ports_of(vm_id)?.contains(&port) {
            return Ok(self.store.ports_of(vm_id)?);
        }
        // Another VM's port first: its DNAT rule does not hold a socket.
        self.reserve_port(vm_id, &port)?;
        if let Some(error) = host_port_problem(&port) {
            self.store.remove_port(vm_id, &port)?;
            return Err(error);
        }
        self.apply_policy().await?;
        Ok(self.store.ports_of(vm_id)?)
    }

    /// Stops publishing `port`.
    pub async fn remove_port(
        &self,
        vm_id: &str,
        port: PublishedPort,
    ) -> Result<Vec<PublishedPort>, NetworkError> {
        if !self.store.remove_port(vm_id, &port)? {
            return Err(NetworkError::PortNotPublished { port });
        }
        self.apply_policy().await?;
        Ok(self.store.ports_of(vm_id)?)
    }

    pub fn ports_of(&self, vm_id: &str) -> Result<Vec<PublishedPort>, NetworkError> {
        Ok(self.store.ports_of(vm_id)?)
    }

    /// Changes a VM's egress policy; connections it no longer allows stop
    /// passing at once.
    pub async fn set_egress(&self, vm_id: &str, egress: &EgressPolicy) -> Result<(), NetworkError> {
        let (_, group) = self.store.network_policy(vm_id)?;
        self.store
            .set_network_policy(vm_id, egress, group.as_deref())?;
        self.apply_policy().await
    }

    /// Fills in the ports, egress policy and group of a VM's lease.
    pub fn describe_policy(&self, vm_id: &str, lease: &mut VmNetwork) {
        if let Ok(ports) = self.store.ports_of(vm_id) {
            lease.ports = ports;
        }
        if let Ok((egress, group)) = self.store.network_policy(vm_id) {
            lease.egress = egress;
            lease.network_group = group;
        }
    }

    /// The VM's VMM is about to start (or was adopted): its ports are
    /// forwarded.
    pub async fn activate(&self, vm_id: &str) -> Result<(), NetworkError> {
        if self.policy.lock().active.contains(vm_id) {
            return Ok(());
        }
        let ports = self.store.ports_of(vm_id)?;
        if ports.is_empty() {
            self.policy.lock().active.insert(vm_id.to_owned());
            return Ok(());
        }
        // What took a port while the VM was stopped keeps it.
        for port in ports {
            if let Some(error) = host_port_problem(&port) {
                return Err(error);
            }
        }
        self.policy.lock().active.insert(vm_id.to_owned());
        self.apply_policy().await
    }

    /// The VM's VMM is gone (or the VM deleted): its ports are no longer
    /// forwarded.
    pub async fn deactivate(&self, vm_id: &str) {
        let removed = self.policy.lock().active.remove(vm_id);
        let has_ports = self
            .store
            .ports_of(vm_id)
            .is_ok_and(|ports| !ports.is_empty());
        if removed && has_ports {
            if let Err(error) = self.apply_policy().await {
                tracing::warn!(vm = vm_id, %error, "failed to remove the VM's published ports");
            }
        }
    }

    /// The lease of `vm_id` (at `address`) is gone: its forwards, limits
    /// and group pairs go.
    pub(super) async fn policy_released(&self, vm_id: &str, address: Option<Ipv4Addr>) {
        self.policy.lock().active.remove(vm_id);
        let Some(address) = address else {
            return;
        };
        let rendered = self.policy.rendered();
        let referenced = rendered.egress.contains_key(&address)
            || rendered
                .forwards
                .iter()
                .any(|forward| forward.guest == address)
            || rendered
                .group_peers
                .iter()
                .any(|(from, to)| *from == address || *to == address);
        if referenced {
            if let Err(error) = self.apply_policy().await {
                tracing::warn!(vm = vm_id, %error, "failed to re-apply the network policy");
            }
        }
    }

    /// Which VMs run, as the store says (after reconciliation).
    pub async fn set_active_from_store(&self) -> Result<(), NetworkError> {
        let active: BTreeSet<String> = self
            .store
            .list_vms()?
            .into_iter()
            .filter(|vm| vm.state.has_process())
            .map(|vm| vm.id)
            .collect();
        self.policy.lock().active = active;
        self.apply_policy().await
    }

    /// What egress applies, for `doctor`: the VMs under a limit and theirs.
    pub fn egress_summary(&self) -> Result<String, NetworkError> {
        let names: HashMap<String, String> = self
            .store
            .list_leases()?
            .into_iter()
            .map(|(vm_id, name, _)| (vm_id, name))
            .collect();
        let limited: Vec<String> = self
            .store
            .list_network_policies()?
            .into_iter()
            .filter(|(_, egress, _)| *egress != EgressPolicy::AllowAll)
            .filter_map(|(vm_id, egress, _)| Some(format!("{} {egress}", names.get(&vm_id)?)))
            .collect();
        Ok(if limited.is_empty() {
            "every VM may reach anything (allow-all); --egress limits one".to_owned()
        } else {
            format!(
                "limited: {}; the others allow-all; DNS to the host always passes",
                limited.join(", ")
            )
        })
    }

    /// Whether the VM is in a network group (its tap is then attached
    /// without the `isolated` flag).
    pub fn in_group(&self, vm_id: &str) -> bool {
        self.store
            .network_policy(vm_id)
            .is_ok_and(|(_, group)| group.is_some())
    }

    /// At start: the addresses the previous daemon's DNS server let
    /// guests reach, read from the tables before they were replaced, are
    /// kept for the time they had left (a guest's resolver may still hold
    /// the answer).
    pub(super) fn seed_learned(
        &self,
        learned: Vec<(Ipv4Addr, Ipv4Addr, Duration)>,
    ) -> Result<(), NetworkError> {
        let leases: BTreeMap<String, Ipv4Addr> = self
            .store
            .list_leases()?
            .into_iter()
            .filter_map(|(vm_id, _, lease)| Some((vm_id, lease.ip.parse().ok()?)))
            .collect();
        let policies = self.store.list_network_policies()?;
        let now = Instant::now();
        let mut inner = self.policy.lock();
        for (vm_id, policy, _) in policies {
            if let Some(address) = leases.get(&vm_id) {
                inner.egress.insert(*address, policy);
            }
        }
        for (guest, address, left) in learned {
            if matches!(inner.egress.get(&guest), Some(EgressPolicy::Allow(_))) {
                inner.rendered.learned.insert((guest, address), now + left);
            }
        }
        Ok(())
    }

    /// Renders the policy from the store and applies the whole tables.
    pub async fn apply_policy(&self) -> Result<(), NetworkError> {
        let _serial = self.policy.apply.lock().await;
        self.rebuild_policy()?;
        let config = self.nat_guard().clone();
        let rendered = self.policy.rendered();
        nat::apply_with(self.nft.as_ref(), &config, &rendered)
            .await
            .map_err(NetworkError::ApplyPolicy)
    }

    /// Recomputes the rendered policy from the store.
    fn rebuild_policy(&self) -> Result<(), NetworkError> {
        let leases: BTreeMap<String, Ipv4Addr> = self
            .store
            .list_leases()?
            .into_iter()
            .filter_map(|(vm_id, _, lease)| Some((vm_id, lease.ip.parse().ok()?)))
            .collect();
        let ports = self.store.list_ports()?;
        let policies = self.store.list_network_policies()?;
        let mut inner = self.policy.lock();
        let forwards: BTreeSet<PortForward> = ports
            .iter()
            .filter(|(vm_id, _)| inner.active.contains(vm_id))
            .filter_map(|(vm_id, port)| {
                Some(PortForward {
                    transport: transport(port.protocol),
                    host_ip: port.host_ip,
                    host_port: port.host_port,
                    guest: *leases.get(vm_id)?,
                    guest_port: port.guest_port,
                })
            })
            .collect();
        let mut egress = HashMap::new();
        let mut limits = BTreeMap::new();
        let mut groups: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for (vm_id, policy, group) in policies {
            let Some(address) = leases.get(&vm_id).copied() else {
                continue;
            };
            if let Some(group) = group {
                groups.entry(group).or_default().push(address);
            }
            if policy != EgressPolicy::AllowAll {
                limits.insert(
                    address,
                    EgressLimit {
                        networks: policy.networks(),
                        epoch: PolicyState::epoch(address, &policy),
                    },
                );
            }
            egress.insert(address, policy);
        }
        let now = Instant::now();
        let previous = std::mem::take(&mut inner.egress);
        inner.rendered.learned.retain(|(guest, _), until| {
            *until > now
                && matches!(egress.get(guest), Some(EgressPolicy::Allow(_)))
                && previous.get(guest) == egress.get(guest)
        });
        inner.rendered.forwards = forwards;
        inner.rendered.egress = limits;
        inner.rendered.group_peers = groups
            .values()
            .flat_map(|members| {
                members.iter().flat_map(move |from| {
                    members
                        .iter()
                        .filter(move |to| *to != from)
                        .map(move |to| (*from, *to))
                })
            })
            .collect();
        inner.egress = egress;
        Ok(())
    }
}
