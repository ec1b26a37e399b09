//! Wire types shared by the `banger` CLI and `bangerd`.
//!
//! The control protocol, as the daemon serves it on its Unix socket:
//!
//! 1. The client connects and writes one JSON-RPC 2.0 request per line
//!    ([`Request`]); the daemon answers each with one [`Response`] line, in
//!    order. A connection may carry any number of calls.
//! 2. Each method is a type implementing [`method::Method`]: its name, its
//!    params and its result. A call whose method streams
//!    ([`method::Method::STREAMS`]) is answered with a normal response
//!    first; after it the connection carries that method's stream:
//!    newline-delimited [`StreamFrame`]s up to a terminal frame for
//!    `operation.watch` (then the daemon closes it), the guest agent
//!    protocol for `vm.agent`, binary frames ([`workspace`]) for
//!    `vm.workspace.*`.
//! 3. Errors are JSON-RPC errors whose `data` carries a stable [`ErrorKind`]
//!    and an optional hint; the message is the whole cause chain.
//!
//! Nothing in this crate performs I/O.

pub mod agent;
pub mod backend;
mod chain;
pub mod image;
pub mod jsonrpc;
pub mod method;
pub mod name;
pub mod netpolicy;
pub mod operation;
pub mod sanitize;
pub mod snapshot;
pub mod status;
pub mod vm;
pub mod workspace;

pub use backend::{Backend, UnknownBackend};
pub use chain::error_chain;
pub use image::{Image, ImportImageParams, ImportKernelParams, Kernel, RemoveParams};
pub use jsonrpc::{ErrorData, ErrorKind, Request, Response, RpcError};
pub use method::{Method, NoParams};
pub use name::{validate_vm_name, NameError};
pub use netpolicy::{EgressPolicy, EgressRule, Protocol, PublishedPort};
pub use operation::{
    Operation, OperationParams, OperationRef, OperationState, StageEvent, StageStatus, StreamFrame,
    StreamStarted,
};
pub use snapshot::{Snapshot, SnapshotRef, SnapshotVmParams};
pub use status::DaemonStatus;
pub use vm::{
    parse_size, CreateDiskParams, CreateVmParams, CreateVmResult, DeleteVmParams, ResizeDiskParams,
    SetVmParams, StopVmParams, Vm, VmRef, VmState, VmStats, VmmProcessStats, WorkDisk,
};

/// Version of the banger programs, reported by `daemon.status` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
