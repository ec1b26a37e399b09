//! Wire types shared by the `banger` CLI and `bangerd`.
//!
//! The control protocol, as the daemon serves it on its Unix socket:
//!
//! 1. The client connects and writes one JSON-RPC 2.0 request per line
//!    ([`Request`]); the daemon answers each with one [`Response`] line, in
//!    order. A connection may carry any number of calls.
//! 2. A call whose method streams (see [`method::is_streaming`]) is answered
//!    with a normal response first; after it the connection carries
//!    newline-delimited [`StreamFrame`]s until a terminal frame, and is then
//!    closed by the daemon.
//! 3. Errors are JSON-RPC errors whose `data` carries a stable [`ErrorKind`]
//!    and an optional hint; the message is the whole cause chain.
//!
//! Nothing in this crate performs I/O.

pub mod agent;
mod chain;
pub mod image;
pub mod jsonrpc;
pub mod method;
pub mod name;
pub mod operation;
pub mod status;
pub mod vm;

pub use chain::error_chain;
pub use image::{Image, ImportImageParams, ImportKernelParams, Kernel, RemoveParams};
pub use jsonrpc::{ErrorData, ErrorKind, Request, Response, RpcError};
pub use name::{validate_vm_name, NameError};
pub use operation::{
    Operation, OperationParams, OperationRef, OperationState, StageEvent, StageStatus, StreamFrame,
};
pub use status::DaemonStatus;
pub use vm::{
    parse_size, CreateDiskParams, CreateVmParams, CreateVmResult, DeleteVmParams, ResizeDiskParams,
    SetVmParams, StopVmParams, Vm, VmRef, VmState, VmStats, VmmProcessStats, WorkDisk,
};

/// Version of the banger programs, reported by `daemon.status` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
