//! Commands that work inside a running guest through its agent, relayed by
//! the daemon (`vm.agent`): `vm run` ([`exec`]), `vm cp` ([`cp`]),
//! `vm authsync`, `vm ssh` and `ssh-config` ([`ssh`]), `vm stats`
//! ([`stats`]); and `vm logs` ([`logs`]), the guest's console log
//! (`vm.logs`, no agent needed) or its journal (`--guest`).
//!
//! Host files are read and written here, by the calling user's own process,
//! never by the daemon.

mod cp;
mod exec;
mod logs;
mod ssh;
mod stats;

use std::path::Path;

use banger_agent_proto::client::AgentClient;

use crate::client::Client;

pub use cp::cp;
pub use exec::run;
pub use logs::{guest_logs, logs};
pub use ssh::{authsync, ssh, ssh_config, ssh_proxy};
pub(crate) use ssh::{wait_listening, SSH_WAIT};
pub use stats::stats;

/// A failure of the agent of VM `vm`.
pub(crate) fn agent_error(
    vm: &str,
    error: banger_agent_proto::client::ClientError,
) -> anyhow::Error {
    anyhow::Error::new(error).context(format!("VM `{vm}`"))
}

pub(crate) async fn connect(socket: &Path, vm: &str) -> anyhow::Result<AgentClient> {
    Ok(Client::connect(socket).await?.agent(vm).await?)
}
