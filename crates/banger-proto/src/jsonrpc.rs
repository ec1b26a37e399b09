//! JSON-RPC 2.0 envelopes and banger's error vocabulary.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A JSON-RPC 2.0 request. `id` is absent for notifications, which banger
/// does not use but tolerates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Request {
    pub fn new(id: u64, method: &str, params: Value) -> Self {
        Self {
            jsonrpc: "2.0".to_owned(),
            method: method.to_owned(),
            params: Some(params),
            id: Some(Value::from(id)),
        }
    }
}

/// A JSON-RPC 2.0 response: exactly one of `result` and `error` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
    pub id: Value,
}

impl Response {
    pub fn success(id: Value, result: Value) -> Self {
        Self {
            jsonrpc: "2.0".to_owned(),
            result: Some(result),
            error: None,
            id,
        }
    }

    pub fn failure(id: Value, error: RpcError) -> Self {
        Self {
            jsonrpc: "2.0".to_owned(),
            result: None,
            error: Some(error),
            id,
        }
    }
}

/// The JSON-RPC error object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ErrorData>,
}

/// banger's extension of the error object: a stable kind and a hint for the user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorData {
    pub kind: ErrorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Stable error classes. Each maps to one JSON-RPC code.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    NotAllowed,
    NotFound,
    AlreadyExists,
    InvalidState,
    Cancelled,
    Failed,
}

impl ErrorKind {
    pub fn code(self) -> i64 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::Internal => -32603,
            Self::NotAllowed => -32001,
            Self::NotFound => -32004,
            Self::AlreadyExists => -32009,
            Self::InvalidState => -32010,
            Self::Cancelled => -32011,
            Self::Failed => -32020,
        }
    }
}

impl RpcError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            code: kind.code(),
            message: message.into(),
            data: Some(ErrorData { kind, hint: None }),
        }
    }

    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        let kind = self.kind();
        self.data = Some(ErrorData {
            kind,
            hint: Some(hint.into()),
        });
        self
    }

    /// The error's kind; errors from peers that do not send `data` are
    /// classified by their code.
    pub fn kind(&self) -> ErrorKind {
        if let Some(data) = &self.data {
            return data.kind;
        }
        match self.code {
            -32700 => ErrorKind::ParseError,
            -32600 => ErrorKind::InvalidRequest,
            -32601 => ErrorKind::MethodNotFound,
            -32602 => ErrorKind::InvalidParams,
            -32001 => ErrorKind::NotAllowed,
            -32004 => ErrorKind::NotFound,
            -32009 => ErrorKind::AlreadyExists,
            -32010 => ErrorKind::InvalidState,
            -32011 => ErrorKind::Cancelled,
            -32020 => ErrorKind::Failed,
            _ => ErrorKind::Internal,
        }
    }

    pub fn hint(&self) -> Option<&str> {
        self.data.as_ref().and_then(|data| data.hint.as_deref())
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for RpcError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trips_with_kind_and_hint() {
        let error = RpcError::new(ErrorKind::NotFound, "No VM named x").with_hint("banger vm list");
        let text =
            serde_json::to_string(&Response::failure(Value::from(7), error.clone())).unwrap();
        let back: Response = serde_json::from_str(&text).unwrap();
        let back_error = back.error.unwrap();
        assert_eq!(back_error, error);
        assert_eq!(back_error.code, -32004);
        assert_eq!(back_error.kind(), ErrorKind::NotFound);
        assert_eq!(back_error.hint(), Some("banger vm list"));
        assert!(back.result.is_none());
    }

    #[test]
    fn kind_falls_back_to_code() {
        let error = RpcError {
            code: -32601,
            message: "x".into(),
            data: None,
        };
        assert_eq!(error.kind(), ErrorKind::MethodNotFound);
    }
}
