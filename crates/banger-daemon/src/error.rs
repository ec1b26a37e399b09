//! The daemon's error style and its one conversion to a JSON-RPC error.
//!
//! 1. Each service module has its own `thiserror` enum named after its
//!    subject (`ImageError`, `WorkDiskError`, `VmError`, ...): one variant
//!    per thing that failed or condition met, identifying data (names,
//!    paths, VMs) in fields, the cause as `#[source]`, never repeated in
//!    the message. A module that calls another wraps that module's error
//!    in a variant of its own (`#[error(transparent)]` when it adds
//!    nothing); state database errors are a [`StoreFailure`]. A capability
//!    hook fails with a `CapabilityError`, which holds the capability's own
//!    module error (`crate::capabilities` says why it is not an enum).
//! 2. Each enum implements [`RpcFailure`]: a `match` on its variants picks
//!    the stable [`ErrorKind`] the client sees and the hint, if any. A
//!    variant wrapping another error delegates both to it.
//! 3. The RPC layer turns any [`RpcFailure`] into a [`DaemonError`] with `?`
//!    (the one `From` impl below): its kind, the message chain ([`chain`]:
//!    the message and each cause, joined with `: `) and its hint.
//!    [`DaemonError::to_rpc`] makes the JSON-RPC error of it.
//!
//! The RPC layer also builds [`DaemonError`]s itself for the errors that
//! are its own (bad params, an unknown method).

use banger_proto::{ErrorKind, RpcError};
use banger_store::StoreError;

/// A module error as the RPC client sees it. The message chain comes from
/// [`std::error::Error`]; this adds what the client does with it.
pub trait RpcFailure: std::error::Error + Send + Sync + 'static {
    /// The stable error kind the client sees.
    fn kind(&self) -> ErrorKind;

    /// What the user can do about it.
    fn hint(&self) -> Option<String> {
        None
    }
}

/// The message of `error` followed by each of its causes, joined with `: `.
pub fn chain(error: &dyn std::error::Error) -> String {
    banger_proto::error_chain(error)
}

/// An error on its way to the RPC client: a stable kind, a message
/// (short, capitalised), an optional hint, and the cause chain.
#[derive(Debug)]
pub struct DaemonError {
    pub kind: ErrorKind,
    message: String,
    hint: Option<String>,
    source: Option<anyhow::Error>,
}

impl DaemonError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidState, message)
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParams, message)
    }

    /// An unexpected failure: the message says what was being done, the
    /// cause chain says why.
    pub fn failed(message: impl Into<String>, source: impl Into<anyhow::Error>) -> Self {
        Self::new(ErrorKind::Failed, message).with_source(source)
    }

    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    #[must_use]
    pub fn with_source(mut self, source: impl Into<anyhow::Error>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// The message followed by every cause, joined with `: `.
    pub fn chain(&self) -> String {
        match &self.source {
            Some(source) => format!(
                "{}: {}",
                self.message,
                banger_proto::error_chain(source.as_ref())
            ),
            None => self.message.clone(),
        }
    }

    /// The JSON-RPC error; its text may quote a guest, so it goes through
    /// `banger_proto::sanitize` on the way out.
    pub fn to_rpc(&self) -> RpcError {
        let error = RpcError::new(self.kind, banger_proto::sanitize::text(&self.chain()));
        match &self.hint {
            Some(hint) => error.with_hint(banger_proto::sanitize::text(hint)),
            None => error,
        }
    }
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.chain())
    }
}

/// The cause chain is already part of the message (see [`DaemonError::chain`]).
impl std::error::Error for DaemonError {}

/// The one conversion: every module error reaches the client this way.
impl<E: RpcFailure> From<E> for DaemonError {
    fn from(error: E) -> Self {
        Self {
            kind: error.kind(),
            message: chain(&error),
            hint: error.hint(),
            source: None,
        }
    }
}

pub type DaemonResult<T> = Result<T, DaemonError>;

/// A state database error as the client sees it: a taken name or a row
/// still in use keeps the store's own message; anything else is a "State
/// database error" caused by the store's error. The error of every module
/// that uses the store has a `Store` variant holding one.
#[derive(Debug, thiserror::Error)]
pub enum StoreFailure {
    /// A unique name is taken.
    #[error(transparent)]
    AlreadyExists(StoreError),
    /// A row others depend on (an image VMs use).
    #[error(transparent)]
    InUse(StoreError),
    #[error("State database error")]
    Database(#[source] StoreError),
}

impl From<StoreError> for StoreFailure {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::AlreadyExists { .. } => Self::AlreadyExists(error),
            StoreError::InUse { .. } => Self::InUse(error),
            _ => Self::Database(error),
        }
    }
}

impl RpcFailure for StoreFailure {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Self::InUse(_) => ErrorKind::InvalidState,
            Self::Database(_) => ErrorKind::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::InUse(StoreError::InUse { users, .. }) => Some(format!(
                "delete the VM(s) using it first (`banger vm delete NAME` for {users})"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum CopyError {
        #[error("Failed to copy root disk of VM `{vm}`")]
        CopyRootDisk {
            vm: String,
            #[source]
            source: std::io::Error,
        },
        #[error(transparent)]
        Store(#[from] StoreFailure),
    }

    impl RpcFailure for CopyError {
        fn kind(&self) -> ErrorKind {
            match self {
                Self::CopyRootDisk { .. } => ErrorKind::Failed,
                Self::Store(error) => error.kind(),
            }
        }

        fn hint(&self) -> Option<String> {
            match self {
                Self::CopyRootDisk { .. } => Some("check space".to_owned()),
                Self::Store(error) => error.hint(),
            }
        }
    }

    #[test]
    fn kind_chain_and_hint_reach_the_rpc_error() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let error = CopyError::CopyRootDisk {
            vm: "dev".to_owned(),
            source: io,
        };
        let rpc = DaemonError::from(error).to_rpc();
        assert_eq!(
            rpc.message,
            "Failed to copy root disk of VM `dev`: No such file"
        );
        assert_eq!(rpc.kind(), ErrorKind::Failed);
        assert_eq!(rpc.hint(), Some("check space"));
    }

    #[test]
    fn store_conflicts_keep_their_message_and_the_rest_is_internal() {
        let taken = CopyError::from(StoreFailure::from(StoreError::AlreadyExists {
            kind: "VM",
            name: "dev".to_owned(),
        }));
        let error = DaemonError::from(taken);
        assert_eq!(error.kind, ErrorKind::AlreadyExists);
        assert_eq!(error.chain(), "VM `dev` already exists");

        let in_use = DaemonError::from(StoreFailure::from(StoreError::InUse {
            kind: "Image",
            name: "base".to_owned(),
            users: "dev".to_owned(),
        }));
        assert_eq!(in_use.kind, ErrorKind::InvalidState);
        assert_eq!(in_use.chain(), "Image `base` is used by VM(s): dev");

        let missing = DaemonError::from(StoreFailure::from(StoreError::MissingVm {
            name: "dev".to_owned(),
        }));
        assert_eq!(missing.kind, ErrorKind::Internal);
        assert_eq!(
            missing.chain(),
            "State database error: VM `dev` is no longer in the database"
        );
    }

    #[test]
    fn errors_built_by_the_rpc_layer_keep_their_chain_and_hint() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let error = DaemonError::failed("Failed to encode the result", io).with_hint("retry");
        let rpc = error.to_rpc();
        assert_eq!(rpc.message, "Failed to encode the result: No such file");
        assert_eq!(rpc.kind(), ErrorKind::Failed);
        assert_eq!(rpc.hint(), Some("retry"));
    }
}
