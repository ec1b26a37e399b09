//! The agent capability: after boot, the `agent ready` stage waits for the
//! guest agent's hello (within `[agent] ready_timeout_seconds`, or an error
//! quoting the console) and sets the guest clock; a graceful stop asks the
//! agent to power the guest off first; the kept connection is dropped when
//! the VMM exits. The connections themselves are [`Agents`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use banger_proto::Vm;
use banger_vmm::{AgentEndpoint, VmmHandle};

use super::{Capability, CapabilityError};
use crate::agents::Agents;

/// How long a stop waits for the agent to take the shutdown request.
const SHUTDOWN_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a VM's agent is reached: a seam the capability defines, which the
/// VMM backends implement.
pub trait AgentEndpoints: Send + Sync {
    fn agent_endpoint(&self, vm: &Vm) -> AgentEndpoint;
}

pub struct AgentCapability {
    agents: Arc<Agents>,
    endpoints: Arc<dyn AgentEndpoints>,
    /// `[agent] wait`: whether create and start wait for the hello.
    wait: bool,
    ready_timeout: Duration,
}

impl AgentCapability {
    pub fn new(
        agents: Arc<Agents>,
        endpoints: Arc<dyn AgentEndpoints>,
        wait: bool,
        ready_timeout: Duration,
    ) -> Self {
        Self {
            agents,
            endpoints,
            wait,
            ready_timeout,
        }
    }
}

#[async_trait]
impl Capability for AgentCapability {
    fn name(&self) -> &'static str {
        "agent"
    }

    fn after_boot_stage(&self) -> Option<&'static str> {
        self.wait.then_some("agent ready")
    }

    async fn after_boot(
        &self,
        vm: &Vm,
        vmm: &VmmHandle,
    ) -> Result<Option<String>, CapabilityError> {
        let endpoint = self.endpoints.agent_endpoint(vm);
        let console = Path::new(&vm.dir).join(banger_vmm::CONSOLE_LOG_FILE);
        let client = self
            .agents
            .wait_ready(&vm.id, &endpoint, &console, self.ready_timeout, async {
                vmm.wait_exit().await;
            })
            .await?;
        // A guest that was stopped (or restored) has a stale clock.
        if let Err(error) = client.sync_clock(SystemTime::now()).await {
            tracing::warn!(vm = %vm.name, %error, "could not set the guest clock");
        }
        let hello = client.hello();
        let identity = self
            .agents
            .identity_generation(&vm.id)
            .map(|generation| format!("; identity applied (generation {generation})"))
            .unwrap_or_default();
        Ok(Some(format!(
            "{} on {}{identity}",
            hello.distro, hello.kernel_release
        )))
    }

    async fn before_stop(&self, vm: &Vm) {
        // The agent powers the guest off cleanly on any backend (a minimal
        // guest ignores the VMM's ACPI or Ctrl-Alt-Del request).
        if let Some(client) = self.agents.cached(&vm.id) {
            let asked = tokio::time::timeout(SHUTDOWN_REQUEST_TIMEOUT, client.shutdown()).await;
            if !matches!(asked, Ok(Ok(()))) {
                tracing::debug!(vm = %vm.name, "the guest agent did not take the shutdown request");
            }
        }
    }

    fn after_exit(&self, vm_id: &str) {
        self.agents.forget(vm_id);
    }
}
