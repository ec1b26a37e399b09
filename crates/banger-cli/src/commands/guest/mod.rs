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
use crate::error::hinted;

pub use cp::cp;
pub use exec::run;
pub use logs::{guest_logs, logs};
pub use ssh::{authsync, ssh, ssh_config, ssh_proxy};
pub(crate) use ssh::{wait_listening, SSH_WAIT};
pub use stats::stats;

/// A failure of the agent of VM `vm`, with what to do about its kind.
pub(crate) fn agent_error(
    vm: &str,
    error: banger_agent_proto::client::ClientError,
) -> anyhow::Error {
    let hint = agent_hint(vm, &error);
    let error = anyhow::Error::new(error).context(format!("VM `{vm}`"));
    match hint {
        Some(hint) => hinted(error, hint),
        None => error,
    }
}

fn agent_hint(vm: &str, error: &banger_agent_proto::client::ClientError) -> Option<String> {
    use banger_agent_proto::client::ClientError;
    use banger_proto::agent::AgentErrorKind;
    match error {
        ClientError::Agent(refusal) => match refusal.kind {
            AgentErrorKind::InvalidRequest => {
                Some("check the command and paths: they are looked up in the guest".to_owned())
            }
            AgentErrorKind::UnsafeArchive => Some(
                "the copy holds a link or entry pointing outside it; `-L` copies what links point to"
                    .to_owned(),
            ),
            AgentErrorKind::PermissionDenied => Some(format!(
                "check the owner and mode of the path in the guest: `banger vm run {vm} -- ls -ld PATH`"
            )),
            AgentErrorKind::Protocol => Some(
                "the guest's agent is older or newer than this banger: recreate the VM, or import the kernel again to pack the current agent"
                    .to_owned(),
            ),
            AgentErrorKind::Io => None,
        },
        ClientError::Connect { .. }
        | ClientError::VsockHandshake(_)
        | ClientError::Frame(_)
        | ClientError::NoHelloReply
        | ClientError::ConnectionClosed => Some(format!(
            "the guest may have stopped or be rebooting: `banger vm show {vm}`, `banger vm logs {vm}`"
        )),
        ClientError::UnexpectedResult { .. } | ClientError::ReadLocal(_) => None,
    }
}

pub(crate) async fn connect(socket: &Path, vm: &str) -> anyhow::Result<AgentClient> {
    Ok(Client::connect(socket).await?.agent(vm).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_agent_proto::client::ClientError;
    use banger_proto::agent::{AgentError, AgentErrorKind};

    fn refusal(kind: AgentErrorKind) -> ClientError {
        ClientError::Agent(AgentError {
            kind,
            message: "Failed to start x: No such file or directory".to_owned(),
        })
    }

    #[test]
    fn agent_errors_keep_their_message_and_get_the_hint_of_their_kind() {
        let error = agent_error("dev", refusal(AgentErrorKind::InvalidRequest));
        assert_eq!(
            banger_proto::error_chain(error.as_ref()),
            "VM `dev`: Agent refused: Failed to start x: No such file or directory"
        );
        assert_eq!(
            crate::error::hint(&error).as_deref(),
            Some("check the command and paths: they are looked up in the guest")
        );
        let gone = agent_error("dev", ClientError::ConnectionClosed);
        assert!(crate::error::hint(&gone)
            .unwrap()
            .contains("`banger vm logs dev`"));
        let io = agent_error("dev", refusal(AgentErrorKind::Io));
        assert_eq!(crate::error::hint(&io), None);
    }
}
