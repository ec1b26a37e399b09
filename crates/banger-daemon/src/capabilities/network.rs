//! The network capabilities, over the host network ([`Network`]):
//! - [`NetworkCapability`]: an address, a tap and a MAC, the published
//!   ports, egress policy and network group (stage `network`); the NIC and
//!   the `banger.net=` kernel argument at every launch, when the VM's ports
//!   start being forwarded (until its VMM exits);
//! - [`DnsCapability`]: the VM's `NAME.DOMAIN` record;
//! - [`NatCapability`]: egress; before each create's VMM starts, banger's
//!   NAT table is put back if something flushed it.

use std::sync::Arc;

use async_trait::async_trait;
use banger_proto::Vm;
use banger_vmm::LaunchSpec;

use super::{Capability, CapabilityError, CreateOptions, DeleteOptions, Prepared, Undo};
use crate::network::{Network, NetworkError};

pub struct NetworkCapability {
    network: Arc<Network>,
}

impl NetworkCapability {
    pub fn new(network: Arc<Network>) -> Self {
        Self { network }
    }
}

#[async_trait]
impl Capability for NetworkCapability {
    fn name(&self) -> &'static str {
        "network"
    }

    fn check(&self, _vm_name: &str, options: &CreateOptions) -> Result<(), CapabilityError> {
        if let Some(group) = &options.network_group {
            banger_proto::netpolicy::validate_group(group).map_err(|_| {
                NetworkError::InvalidGroup {
                    group: group.clone(),
                }
            })?;
        }
        Ok(self.network.check_ports(&options.ports)?)
    }

    fn prepare_stage(&self, _options: &CreateOptions) -> Option<&'static str> {
        Some("network")
    }

    async fn prepare(
        &self,
        vm: &mut Vm,
        options: &CreateOptions,
    ) -> Result<Prepared, CapabilityError> {
        let lease = self.network.prepare(&vm.id, &vm.name).await?;
        let detail = format!("{} on {}", lease.ip, lease.tap);
        vm.network = Some(lease);
        let network = Arc::clone(&self.network);
        let (vm_id, vm_name) = (vm.id.clone(), vm.name.clone());
        if let Err(error) = self
            .network
            .record_policy(
                &vm.id,
                &options.ports,
                &options.egress.clone().unwrap_or_default(),
                options.network_group.as_deref(),
            )
            .await
        {
            if let Err(error) = network.release(&vm_id, &vm_name).await {
                tracing::error!(vm = %vm_name, %error, "rollback failed to release the network");
            }
            vm.network = None;
            return Err(error.into());
        }
        Ok(Prepared {
            detail: Some(detail),
            undo: Some(Undo::new(async move {
                if let Err(error) = network.release(&vm_id, &vm_name).await {
                    tracing::error!(vm = %vm_name, %error, "rollback failed to release the network");
                }
            })),
        })
    }

    async fn launch(&self, vm: &Vm, spec: &mut LaunchSpec) -> Result<(), CapabilityError> {
        if let Some(attachment) = self.network.attach(&vm.id, vm.network.as_ref()).await? {
            spec.kernel_cmdline.push(' ');
            spec.kernel_cmdline.push_str(&attachment.kernel_argument);
            spec.network_interfaces.push(attachment.interface);
        }
        Ok(())
    }

    fn after_exit(&self, vm_id: &str) {
        let network = Arc::clone(&self.network);
        let vm_id = vm_id.to_owned();
        tokio::spawn(async move { network.deactivate(&vm_id).await });
    }

    async fn on_delete(&self, vm: &Vm, _options: DeleteOptions) -> Result<(), CapabilityError> {
        Ok(self.network.release(&vm.id, &vm.name).await?)
    }

    async fn on_interrupted_create(&self, vm: &Vm) -> Result<(), CapabilityError> {
        Ok(self.network.release(&vm.id, &vm.name).await?)
    }

    async fn reconcile(&self) -> Result<Vec<String>, CapabilityError> {
        // Reconciliation settled which VMs run: only theirs are forwarded.
        self.network.set_active_from_store().await?;
        Ok(Vec::new())
    }

    fn describe(&self, vm: &mut Vm) {
        if let Some(lease) = vm.network.as_mut() {
            self.network.describe_policy(&vm.id, lease);
        }
    }
}

pub struct DnsCapability {
    network: Arc<Network>,
}

impl DnsCapability {
    pub fn new(network: Arc<Network>) -> Self {
        Self { network }
    }
}

#[async_trait]
impl Capability for DnsCapability {
    fn name(&self) -> &'static str {
        "dns"
    }

    async fn prepare(
        &self,
        vm: &mut Vm,
        _options: &CreateOptions,
    ) -> Result<Prepared, CapabilityError> {
        let Some(lease) = &vm.network else {
            return Ok(Prepared::default());
        };
        self.network.add_record(&vm.name, lease).await;
        let network = Arc::clone(&self.network);
        let name = vm.name.clone();
        Ok(Prepared {
            detail: None,
            undo: Some(Undo::new(async move { network.remove_record(&name) })),
        })
    }

    async fn on_delete(&self, vm: &Vm, _options: DeleteOptions) -> Result<(), CapabilityError> {
        self.network.remove_record(&vm.name);
        Ok(())
    }

    async fn on_interrupted_create(&self, vm: &Vm) -> Result<(), CapabilityError> {
        self.network.remove_record(&vm.name);
        Ok(())
    }

    fn describe(&self, vm: &mut Vm) {
        if let Some(lease) = vm.network.as_mut() {
            lease.dns_name = self.network.dns_name(&vm.name);
        }
    }
}

pub struct NatCapability {
    network: Arc<Network>,
}

impl NatCapability {
    pub fn new(network: Arc<Network>) -> Self {
        Self { network }
    }
}

#[async_trait]
impl Capability for NatCapability {
    fn name(&self) -> &'static str {
        "nat"
    }

    async fn prepare(
        &self,
        _vm: &mut Vm,
        options: &CreateOptions,
    ) -> Result<Prepared, CapabilityError> {
        if !options.no_start {
            self.network.ensure_nat().await?;
        }
        Ok(Prepared::default())
    }
}
