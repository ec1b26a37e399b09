//! Agents: the daemon's connection to each running VM's guest agent.
//!
//! 1. After boot, [`Agents::wait_ready`] connects to the VM's
//!    [`AgentEndpoint`] until the agent answers `hello`, the deadline passes
//!    or the VMM exits. On Firecracker it listens on `<uds_path>_1025`
//!    first, where the agent's announcement (a guest-initiated vsock
//!    connection) arrives the moment it serves, and connects then. On QEMU
//!    the first attempt connects (the port's host socket exists once QMP
//!    answers) and the `hello` waits on that connection: the agent writes
//!    its announcement line on the port the moment it opens it, then the
//!    reply, which the daemon reads as soon as they arrive. Agents that do
//!    not announce (older ones) are found by connection attempts with
//!    exponential backoff from 1 ms (docs/agent-protocol.md,
//!    "Readiness"). The connection is
//!    kept per VM; every session of every client of that VM is multiplexed on
//!    it (QEMU's virtio-serial port carries one connection only).
//! 2. [`Agents::client`] returns the kept connection, connecting again when
//!    it is gone (after a daemon restart the adopted VM's agent is reached
//!    this way).
//! 3. [`Agents::forget`] drops it when the VM stops, crashes or is deleted.
//! 4. A VM restored from a snapshot runs a copy of another VM's guest: its
//!    restore registers the new VM's identity ([`Agents::expect_identity`]),
//!    and the first connection that reaches its agent hands it over
//!    (`identity`) before anyone else uses the connection. A connection
//!    whose agent does not take it counts as failed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_agent_proto::client::{AgentClient, ClientError};
use banger_proto::agent::IdentityRequest;
use banger_proto::ErrorKind;
use banger_vmm::AgentEndpoint;

use crate::error::{chain, RpcFailure};

/// The first pause after a refused connection while a guest boots; each
/// next one doubles, up to [`RETRY_BACKOFF_CAP`]. An announcement ends any pause.
const RETRY_BACKOFF_START: Duration = Duration::from_millis(1);
const RETRY_BACKOFF_CAP: Duration = Duration::from_millis(100);
/// Host random bytes a restored guest's pool is given.
const IDENTITY_ENTROPY_BYTES: usize = 64;
/// How long [`Agents::client`] tries to reach the agent of a running VM.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Console lines quoted when the agent never answers.
const CONSOLE_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("The VMM exited before the guest agent answered")]
    VmmExited,
    #[error("The guest agent did not answer before the deadline")]
    Deadline {
        /// Why the last connection attempt failed, if one was made.
        #[source]
        last_attempt: Option<ClientError>,
    },
    /// [`Agents::wait_ready`] gave up. The console's tail goes in the
    /// message, after the reason: a create operation keeps only the
    /// message chain, and the tail must end it, so the reason is written
    /// out here instead of being the source.
    #[error("{} (waited {waited_seconds:.1} s); {console}", chain(.reason.as_ref()))]
    NotReady {
        reason: Box<AgentError>,
        waited_seconds: f64,
        /// The console's last lines, or why there are none.
        console: String,
    },
    #[error("The guest agent did not take the VM's new identity")]
    Identity(#[source] ClientError),
    #[error("The guest agent of VM `{vm}` does not answer")]
    NotAnswering {
        vm: String,
        #[source]
        source: Box<AgentError>,
    },
}

impl RpcFailure for AgentError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Failed
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::VmmExited => {
                Some("`banger vm logs NAME` shows the console up to the exit".to_owned())
            }
            Self::Deadline { .. } | Self::NotReady { .. } => Some(
                "`banger vm logs NAME` shows the guest's boot; a slow host needs a larger `[agent] ready_timeout_seconds`"
                    .to_owned(),
            ),
            Self::NotAnswering { vm, .. } => Some(format!(
                "the guest may still be booting or may not carry the agent; `banger vm show {vm}` and its console log say more"
            )),
            _ => None,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
pub struct Agents {
    connections: Mutex<HashMap<String, AgentClient>>,
    /// Serialises connection attempts per VM, so two callers never open two
    /// connections (a virtio-serial port serves one).
    connecting: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// Identities to hand to restored VMs' agents, by VM id.
    identities: Mutex<HashMap<String, IdentityRequest>>,
    /// The generation each VM's agent took last, by VM id.
    generations: Mutex<HashMap<String, u64>>,
}

impl Agents {
    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentClient>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn connect_lock(&self, vm_id: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .connecting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::sync::Arc::clone(locks.entry(vm_id.to_owned()).or_default())
    }

    /// Registers the identity the agent of restored VM `vm_id` is to take:
    /// `cmdline` is the kernel command line the VM would boot with;
    /// `regen_host_keys` has the guest replace its SSH host keys.
    pub fn expect_identity(&self, vm_id: &str, cmdline: &str, regen_host_keys: bool) {
        use rand::RngCore;
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut entropy = vec![0_u8; IDENTITY_ENTROPY_BYTES];
        rand::thread_rng().fill_bytes(&mut entropy);
        let request = IdentityRequest {
            // The host clock at the restore: later restores hand out larger ones.
            generation: unix_nanos,
            vm_id: vm_id.to_owned(),
            cmdline: cmdline.to_owned(),
            unix_nanos,
            entropy,
            regen_host_keys,
        };
        lock(&self.identities).insert(vm_id.to_owned(), request);
    }

    /// The generation of the identity VM `vm_id`'s agent took, if any.
    pub fn identity_generation(&self, vm_id: &str) -> Option<u64> {
        lock(&self.generations).get(vm_id).copied()
    }

    /// Hands a pending identity to the agent behind `client`.
    async fn hand_identity(&self, vm_id: &str, client: &AgentClient) -> Result<(), AgentError> {
        let Some(mut request) = lock(&self.identities).get(vm_id).cloned() else {
            return Ok(());
        };
        // The clock as it is now, not at the restore.
        request.unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let generation = request.generation;
        let applied = client
            .identity(request)
            .await
            .map_err(AgentError::Identity)?;
        tracing::info!(
            vm = vm_id,
            generation,
            ?applied,
            "guest took the VM's identity"
        );
        lock(&self.identities).remove(vm_id);
        lock(&self.generations).insert(vm_id.to_owned(), generation);
        Ok(())
    }

    /// The kept connection, if it is still open.
    pub fn cached(&self, vm_id: &str) -> Option<AgentClient> {
        let mut connections = self.connections();
        match connections.get(vm_id) {
            Some(client) if !client.is_closed() => Some(client.clone()),
            Some(_) => {
                connections.remove(vm_id);
                None
            }
            None => None,
        }
    }

    /// Waits until the agent answers `hello` (connecting as often as it
    /// takes), up to `timeout`, and keeps the connection. Gives up early when
    /// `gone` resolves (the VMM exited). The error quotes the console log.
    pub async fn wait_ready(
        &self,
        vm_id: &str,
        endpoint: &AgentEndpoint,
        console_log: &Path,
        timeout: Duration,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<AgentClient, AgentError> {
        let started = Instant::now();
        // Bound before the first attempt: an agent that announced earlier
        // already serves, so that attempt finds it.
        let announcements = announcement_listener(endpoint);
        let outcome = tokio::select! {
            outcome = self.connect_until(vm_id, endpoint, started + timeout, announcements.as_ref().map(|a| &a.listener), RETRY_BACKOFF_CAP) => outcome,
            () = gone => Err(AgentError::VmmExited),
        };
        outcome.map_err(|reason| {
            let tail = banger_vmm::process::read_log_tail(console_log, CONSOLE_TAIL_LINES);
            let console = if tail.trim().is_empty() {
                format!(
                    "the console log {} is empty (does the kernel boot, and does its initramfs carry the agent? `banger kernel import --from-debian` makes one that does)",
                    console_log.display()
                )
            } else {
                format!(
                    "last console lines ({}):\n{}",
                    console_log.display(),
                    tail.trim_end()
                )
            };
            AgentError::NotReady {
                reason: Box::new(reason),
                waited_seconds: started.elapsed().as_secs_f64(),
                console,
            }
        })
    }

    async fn connect_until(
        &self,
        vm_id: &str,
        endpoint: &AgentEndpoint,
        deadline: Instant,
        announcements: Option<&tokio::net::UnixListener>,
        backoff_cap: Duration,
    ) -> Result<AgentClient, AgentError> {
        let lock = self.connect_lock(vm_id);
        let _guard = lock.lock().await;
        if let Some(client) = self.cached(vm_id) {
            return Ok(client);
        }
        let mut last_error: Option<ClientError> = None;
        let mut backoff = RETRY_BACKOFF_START;
        let mut announced = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(AgentError::Deadline {
                    last_attempt: last_error,
                });
            }
            match tokio::time::timeout(remaining, connect(endpoint)).await {
                Ok(Ok(client)) => {
                    self.hand_identity(vm_id, &client).await?;
                    tracing::info!(vm = vm_id, announced, agent = %client.hello().agent_version, kernel = %client.hello().kernel_release, "guest agent ready");
                    self.connections().insert(vm_id.to_owned(), client.clone());
                    return Ok(client);
                }
                Ok(Err(error)) => {
                    tracing::debug!(vm = vm_id, %error, "guest agent not reachable yet");
                    last_error = Some(error);
                    let pause = tokio::time::sleep(backoff.min(remaining));
                    backoff = (backoff * 2).min(backoff_cap);
                    match announcements {
                        Some(listener) => tokio::select! {
                            () = pause => {}
                            accepted = listener.accept() => {
                                if accepted.is_ok() {
                                    tracing::debug!(vm = vm_id, "guest agent announced");
                                    announced = true;
                                    // It serves now: should this attempt
                                    // still miss it, the next comes soon.
                                    backoff = RETRY_BACKOFF_START;
                                }
                            }
                        },
                        None => pause.await,
                    }
                }
                Err(_elapsed) => {}
            }
        }
    }

    /// The connection to a running VM's agent, reconnecting if it is gone.
    pub async fn client(
        &self,
        vm_id: &str,
        vm_name: &str,
        endpoint: &AgentEndpoint,
    ) -> Result<AgentClient, AgentError> {
        if let Some(client) = self.cached(vm_id) {
            return Ok(client);
        }
        self.connect_until(
            vm_id,
            endpoint,
            Instant::now() + RECONNECT_TIMEOUT,
            None,
            RETRY_BACKOFF_CAP,
        )
        .await
        .map_err(|source| AgentError::NotAnswering {
            vm: vm_name.to_owned(),
            source: Box::new(source),
        })
    }

    /// Drops the kept connection (the VM stopped, crashed or was deleted).
    pub fn forget(&self, vm_id: &str) {
        self.connections().remove(vm_id);
        lock(&self.identities).remove(vm_id);
        lock(&self.generations).remove(vm_id);
        self.connecting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vm_id);
    }
}

/// The host end of the agent's announcement: a Unix socket at
/// `<uds_path>_<ANNOUNCE_VSOCK_PORT>` (where Firecracker forwards the
/// guest's connection to host port 1025), removed when dropped.
struct AnnouncementListener {
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
}

impl Drop for AnnouncementListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens for the agent's announcement where the endpoint has one
/// (Firecracker's vsock). The socket is given to the owner of its
/// directory: in a jail, the unprivileged VMM that connects to it. A
/// failure only costs the announcement (the connection attempts go on).
fn announcement_listener(endpoint: &AgentEndpoint) -> Option<AnnouncementListener> {
    let AgentEndpoint::FirecrackerVsock { uds_path, .. } = endpoint else {
        return None;
    };
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{}", banger_proto::agent::ANNOUNCE_VSOCK_PORT));
    let path = std::path::PathBuf::from(path);
    let bound = (|| {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let listener = AnnouncementListener {
            listener,
            path: path.clone(),
        };
        let owner = std::fs::metadata(path.parent().unwrap_or(Path::new("/")))?;
        std::os::unix::fs::chown(
            &path,
            Some(std::os::unix::fs::MetadataExt::uid(&owner)),
            Some(std::os::unix::fs::MetadataExt::gid(&owner)),
        )?;
        std::io::Result::Ok(listener)
    })();
    match bound {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(socket = %path.display(), %error, "cannot listen for the guest agent's announcement");
            None
        }
    }
}

async fn connect(endpoint: &AgentEndpoint) -> Result<AgentClient, ClientError> {
    match endpoint {
        AgentEndpoint::Unix(path) => AgentClient::connect_unix(path).await,
        AgentEndpoint::FirecrackerVsock { uds_path, port } => {
            AgentClient::connect_firecracker_vsock(uds_path, *port).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_that_never_answers_is_reported_with_the_console_tail() {
        let directory = tempfile::tempdir().unwrap();
        let console = directory.path().join("console.log");
        std::fs::write(&console, "booting\nKernel panic\n").unwrap();
        let endpoint = AgentEndpoint::Unix(directory.path().join("agent.sock"));
        let agents = Agents::default();
        let error = agents
            .wait_ready(
                "vm",
                &endpoint,
                &console,
                Duration::from_millis(150),
                std::future::pending(),
            )
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Failed);
        let text = chain(&error);
        assert!(
            text.starts_with("The guest agent did not answer before the deadline: "),
            "{text}"
        );
        assert!(text.contains(" s); last console lines ("), "{text}");
        assert!(text.ends_with(":\nbooting\nKernel panic"), "{text}");
    }

    #[tokio::test]
    async fn an_announcement_ends_the_wait() {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("agent.sock");
        let announcements =
            tokio::net::UnixListener::bind(directory.path().join("vsock.sock_1025")).unwrap();
        let endpoint = AgentEndpoint::Unix(socket.clone());
        // The agent comes up after 1.1 s and announces. Without the
        // announcement the backoff (1, 2, 4, ... ms, uncapped here) would
        // next try at about 2 s.
        let agent = {
            let announce = directory.path().join("vsock.sock_1025");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let listener = tokio::net::UnixListener::bind(&socket).unwrap();
                let agent = banger_agent_test_double(listener);
                tokio::net::UnixStream::connect(announce).await.unwrap();
                agent.await
            })
        };
        let started = Instant::now();
        let agents = Agents::default();
        agents
            .connect_until(
                "vm",
                &endpoint,
                started + Duration::from_secs(30),
                Some(&announcements),
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1100), "{waited:?}");
        assert!(waited < Duration::from_millis(1700), "{waited:?}");
        agent.abort();
    }

    #[tokio::test]
    async fn a_qemu_agent_announcing_on_its_port_is_read_at_once() {
        // QEMU's side of the virtio-serial port: a listening socket that
        // exists before the wait starts. The guest agent writes its
        // announcement line first, then speaks the protocol.
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("agent.sock");
        let port = tokio::net::UnixListener::bind(&socket).unwrap();
        let guest = tokio::spawn(async move {
            let (mut stream, _) = port.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"READY 0.1.0\n")
                .await
                .unwrap();
            let announced = Instant::now();
            let agent = banger_agent::server::Agent::new(
                banger_agent::system::SystemPaths::default(),
                false,
                banger_agent::reaper::Reaper::start(banger_agent::reaper::ReapMode::OwnChildren)
                    .unwrap(),
            );
            let serving = tokio::spawn(banger_agent::server::serve_connection(agent, stream));
            (announced, serving)
        });
        let agents = Agents::default();
        let client = agents
            .wait_ready(
                "vm",
                &AgentEndpoint::Unix(socket),
                &directory.path().join("console.log"),
                Duration::from_secs(30),
                std::future::pending(),
            )
            .await
            .unwrap();
        let ready = Instant::now();
        let (announced, serving) = guest.await.unwrap();
        assert_eq!(client.hello().agent_version, banger_proto::VERSION);
        let late = ready.saturating_duration_since(announced);
        assert!(
            late < Duration::from_millis(200),
            "ready {late:?} after the announcement"
        );
        serving.abort();
    }

    /// A guest agent in this process (host test mode) serving `listener`.
    async fn banger_agent_test_double(listener: tokio::net::UnixListener) {
        use banger_agent::reaper::{ReapMode, Reaper};
        let agent = banger_agent::server::Agent::new(
            banger_agent::system::SystemPaths::default(),
            false,
            Reaper::start(ReapMode::OwnChildren).unwrap(),
        );
        let _ = banger_agent::serve_unix(listener, agent, std::future::pending()).await;
    }

    #[tokio::test]
    async fn a_vmm_that_exits_first_ends_the_wait() {
        let directory = tempfile::tempdir().unwrap();
        let console = directory.path().join("console.log");
        let endpoint = AgentEndpoint::Unix(directory.path().join("agent.sock"));
        let error = Agents::default()
            .wait_ready("vm", &endpoint, &console, Duration::from_secs(30), async {})
            .await
            .unwrap_err();
        let text = chain(&error);
        assert!(
            text.starts_with(
                "The VMM exited before the guest agent answered (waited 0.0 s); the console log "
            ),
            "{text}"
        );
        assert!(text.ends_with("is empty (does the kernel boot, and does its initramfs carry the agent? `banger kernel import --from-debian` makes one that does)"), "{text}");
    }
}
