//! The daemon's error type and its one conversion to a JSON-RPC error.

use banger_proto::{ErrorKind, RpcError};

/// An error a service returns to the RPC layer: a stable kind, a message
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

    pub fn to_rpc(&self) -> RpcError {
        let error = RpcError::new(self.kind, self.chain());
        match &self.hint {
            Some(hint) => error.with_hint(hint.clone()),
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

impl From<banger_store::StoreError> for DaemonError {
    fn from(error: banger_store::StoreError) -> Self {
        use banger_store::StoreError;
        match &error {
            StoreError::AlreadyExists { .. } => {
                Self::new(ErrorKind::AlreadyExists, error.to_string())
            }
            StoreError::InUse { .. } => Self::new(ErrorKind::InvalidState, error.to_string()),
            _ => Self::new(ErrorKind::Internal, "State database error").with_source(error),
        }
    }
}

pub type DaemonResult<T> = Result<T, DaemonError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_and_hint_reach_the_rpc_error() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let error = DaemonError::failed("Failed to copy root disk", io).with_hint("check space");
        let rpc = error.to_rpc();
        assert_eq!(rpc.message, "Failed to copy root disk: No such file");
        assert_eq!(rpc.kind(), ErrorKind::Failed);
        assert_eq!(rpc.hint(), Some("check space"));
    }
}
