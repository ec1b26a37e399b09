//! `banger-agent-proto`: the guest agent protocol as both ends speak it.
//!
//! The guest agent (`banger-agent`) serves it; the daemon and the CLI use
//! [`client::AgentClient`]. Neither side links the other's code: the guest's
//! init, mounts and exec server stay in `banger-agent`, and nothing here
//! knows about a guest. The frame types are `banger_proto::agent` (serde
//! only); the contract is `docs/agent-protocol.md`.
//!
//! A connection, and where each step lives:
//! 1. [`transport`]: the host reaches the guest's byte stream, a Unix
//!    socket (QEMU's virtio-serial chardev, a test agent) or Firecracker's
//!    vsock socket after its `CONNECT <port>` handshake.
//! 2. [`protocol`]: frames (`u32 header_len | u32 payload_len | JSON header
//!    | payload`) go over that stream, written from one queue per
//!    connection; data flows against per-stream credit.
//! 3. [`client`]: the host sends `hello`, waits for `hello_reply`, then
//!    multiplexes sessions (exec, copy in/out, stats, ...) on the connection.
//! 4. [`files`]: `copy_in`/`copy_out` carry tar streams; whoever unpacks one
//!    (the agent for copy-in, the CLI for copy-out) refuses entries that
//!    would land outside the destination.

pub mod client;
pub mod files;
pub mod protocol;
pub mod transport;
