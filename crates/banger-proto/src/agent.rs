//! Frames of the guest agent protocol (`docs/agent-protocol.md`).
//!
//! The protocol runs over one byte stream (vsock, virtio-serial or a Unix
//! socket) and carries many sessions at once:
//!
//! 1. Every frame is `u32 header_len (BE) | u32 payload_len (BE) | header |
//!    payload`. The header is one JSON [`Frame`]; the payload is raw bytes and
//!    is only non-empty for [`Frame::Data`].
//! 2. The host sends [`Frame::Hello`] first; the agent answers
//!    [`Frame::HelloReply`] (or [`Frame::Failed`] with session 0 when the
//!    protocol versions differ) before anything else.
//! 3. The host opens a session with [`Frame::Open`] and a session id it has not
//!    used on this connection. Both sides may then send [`Frame::Data`] and
//!    [`Frame::Eof`] on the session's streams.
//! 4. Each direction of each stream has a window of [`INITIAL_WINDOW`] bytes.
//!    A sender may have at most that many bytes sent but not yet credited;
//!    the receiver returns credit with [`Frame::Credit`] as its consumer takes
//!    the bytes, so a slow reader stalls only its own stream.
//! 5. The agent ends every session with exactly one [`Frame::Done`] or
//!    [`Frame::Failed`], after the last `Data`/`Eof` it sends for it.
//!
//! Nothing in this module performs I/O.

use serde::{Deserialize, Serialize};

/// Version of the frame format and operation set; the handshake refuses a mismatch.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest header a peer accepts.
pub const MAX_HEADER_LEN: u32 = 1024 * 1024;
/// Largest payload of one `Data` frame.
pub const MAX_PAYLOAD_LEN: u32 = 64 * 1024;
/// Credit each stream direction starts with.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Session id used for connection-level frames (hello, handshake errors).
pub const CONNECTION_SESSION: u64 = 0;
/// Default vsock port the agent listens on.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;
/// Host vsock port (CID 2) the agent connects to once it serves, to announce it.
pub const ANNOUNCE_VSOCK_PORT: u32 = 1025;
/// Name of the virtio-serial port the agent uses under QEMU.
pub const SERIAL_PORT_NAME: &str = "banger.agent";

/// A byte stream of a session. `stdin` flows host → agent; `stdout` and
/// `stderr` flow agent → host. Copy-in sends its tar on `stdin`, copy-out
/// receives its tar on `stdout`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum StreamId {
    Stdin,
    Stdout,
    Stderr,
}

/// The header of one frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// Host → agent, first frame of a connection.
    Hello {
        protocol_version: u32,
        host_version: String,
    },
    /// Agent → host, answer to `Hello`.
    HelloReply(HelloInfo),
    /// Host → agent: start `operation` as session `session`.
    Open { session: u64, operation: Operation },
    /// Bytes of a stream; they travel in the frame's payload.
    Data { session: u64, stream: StreamId },
    /// The sender will send no more bytes on this stream.
    Eof { session: u64, stream: StreamId },
    /// The receiver consumed `bytes` more bytes of this stream.
    Credit {
        session: u64,
        stream: StreamId,
        bytes: u32,
    },
    /// Host → agent: new terminal size of a pty exec.
    Resize { session: u64, size: WindowSize },
    /// Host → agent: deliver a signal (Linux number) to an exec's process group.
    Signal { session: u64, signal: i32 },
    /// Host → agent: the host abandons the session. Its exec's process group
    /// is killed, its output windows close and its stdin ends; the session
    /// still ends with `Done` or `Failed`.
    Cancel { session: u64 },
    /// Agent → host: the session ended successfully.
    Done {
        session: u64,
        result: OperationResult,
    },
    /// Agent → host: the session (or, with session 0, the connection) failed.
    Failed { session: u64, error: AgentError },
}

impl Frame {
    /// The session a frame belongs to; connection-level frames belong to 0.
    pub fn session(&self) -> u64 {
        match self {
            Self::Hello { .. } | Self::HelloReply(_) => CONNECTION_SESSION,
            Self::Open { session, .. }
            | Self::Data { session, .. }
            | Self::Eof { session, .. }
            | Self::Credit { session, .. }
            | Self::Resize { session, .. }
            | Self::Signal { session, .. }
            | Self::Cancel { session }
            | Self::Done { session, .. }
            | Self::Failed { session, .. } => *session,
        }
    }
}

/// What the agent says about itself and its guest in the handshake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloInfo {
    pub agent_version: String,
    pub protocol_version: u32,
    /// `uname -r`.
    pub kernel_release: String,
    /// `PRETTY_NAME` (or `NAME`/`ID`) from `/etc/os-release`; empty when absent.
    pub distro: String,
    pub hostname: String,
    /// Boot time in seconds since the Unix epoch (`btime` in `/proc/stat`).
    pub boot_time_unix: u64,
    /// Whether the agent runs as the guest's PID 1.
    pub is_init: bool,
    /// The generation of the last [`Operation::Identity`] the agent applied
    /// (0: none since it started, i.e. the guest still is the VM it booted as).
    #[serde(default)]
    pub generation: u64,
    /// The VM whose identity that was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
}

/// An operation a session runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    Exec(ExecRequest),
    /// Unpack the tar arriving on `stdin` into the directory `dest`.
    CopyIn {
        dest: String,
    },
    /// Send `path` (file or directory) as a tar on `stdout`, its entries named
    /// after the path's last component; symlinks (`path` itself and those in
    /// the tree) are followed with `follow_links`, else sent as links.
    CopyOut {
        path: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        follow_links: bool,
    },
    Stats,
    /// Set the guest's realtime clock.
    ClockSync {
        unix_nanos: u64,
    },
    AuthSync(AuthSyncRequest),
    HostKeys,
    /// Whether a TCP socket in the guest listens on `port` (any address).
    Listening {
        port: u16,
    },
    /// Power the guest off (or, in test mode, stop serving).
    Shutdown,
    /// Become another VM: a guest restored from a snapshot is a copy of the
    /// VM the snapshot was taken of.
    Identity(IdentityRequest),
}

/// The identity of the VM a restored guest now is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityRequest {
    /// Grows with every identity a host hands out; the agent reports the
    /// last one it applied in [`HelloInfo::generation`].
    pub generation: u64,
    pub vm_id: String,
    /// The kernel command line the VM would boot with: the hostname from
    /// `banger.name=`, the network (address, gateway, MAC, resolver) from
    /// `banger.net=`.
    pub cmdline: String,
    /// The host's clock, set in the guest.
    pub unix_nanos: u64,
    /// Host random bytes mixed into the guest's pool and credited
    /// (`RNDADDENTROPY`): a copy starts with its source's pool.
    pub entropy: Vec<u8>,
    /// Replace the SSH host keys with new ones (and have a running sshd
    /// take them); kept, the copy answers with its source's keys.
    #[serde(default)]
    pub regen_host_keys: bool,
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Set on top of the base environment (`PATH`, `HOME`, `USER`, `LOGNAME`,
    /// `SHELL`, and `TERM` with a pty).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Run as this user (by name); the agent's own user when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size; output then all arrives on `stdout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<WindowSize>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended: exactly one of `code` and `signal` is set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

/// Keys and git identity to install for a guest user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthSyncRequest {
    pub user: String,
    /// Lines of `~user/.ssh/authorized_keys`; the file is replaced.
    pub authorized_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_email: Option<String>,
}

/// What a finished session produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum OperationResult {
    Exited(ExitStatus),
    CopiedIn {
        entries: u64,
    },
    CopiedOut,
    Stats(GuestStats),
    ClockSynced {
        /// Guest clock minus host clock before the change, in nanoseconds.
        offset_nanos: i64,
    },
    AuthSynced,
    HostKeys {
        keys: Vec<HostKey>,
    },
    Listening {
        listening: bool,
    },
    ShuttingDown,
    /// What [`Operation::Identity`] changed (`hostname`, `network`, `clock`,
    /// `entropy`); empty in host test mode, where the agent only records it.
    IdentityApplied {
        applied: Vec<String>,
    },
}

/// A point-in-time view of the guest's resources, from `/proc` and `statvfs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestStats {
    pub uptime_seconds: f64,
    pub load_average: [f64; 3],
    pub cpu_count: u32,
    /// Cumulative CPU time over all CPUs, in clock ticks (USER_HZ).
    pub cpu: CpuTimes,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    /// The root filesystem.
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

/// One SSH host public key of the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostKey {
    /// e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The base64 key blob.
    pub key: String,
    /// The file it was read from.
    pub path: String,
}

/// Why an operation (or the connection) failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentError {
    pub kind: AgentErrorKind,
    /// The whole cause chain.
    pub message: String,
}

/// Stable classes of agent failures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorKind {
    /// The request is malformed or names something that does not exist.
    InvalidRequest,
    /// A tar entry would escape the destination or is of a refused type.
    UnsafeArchive,
    /// The operation needs privileges the agent does not have.
    PermissionDenied,
    /// The protocol was violated (bad frame, window overrun, version mismatch).
    Protocol,
    /// Anything else the guest reported.
    Io,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_tagged_and_round_trip() {
        let frame = Frame::Open {
            session: 7,
            operation: Operation::Exec(ExecRequest {
                argv: vec!["true".into()],
                pty: Some(WindowSize { rows: 24, cols: 80 }),
                ..ExecRequest::default()
            }),
        };
        let value = serde_json::to_value(&frame).unwrap();
        assert_eq!(value["type"], "open");
        assert_eq!(value["operation"]["op"], "exec");
        assert_eq!(value["operation"]["pty"]["cols"], 80);
        assert_eq!(serde_json::from_value::<Frame>(value).unwrap(), frame);

        let done = Frame::Done {
            session: 7,
            result: OperationResult::Exited(ExitStatus {
                code: None,
                signal: Some(2),
            }),
        };
        let value = serde_json::to_value(&done).unwrap();
        assert_eq!(value["result"]["result"], "exited");
        assert_eq!(value["result"]["signal"], 2);
        assert_eq!(serde_json::from_value::<Frame>(value).unwrap(), done);
    }

    #[test]
    fn shell_code_adds_128_to_signals() {
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
        };
        assert_eq!(killed.shell_code(), 137);
        let exited = ExitStatus {
            code: Some(42),
            signal: None,
        };
        assert_eq!(exited.shell_code(), 42);
    }
}
