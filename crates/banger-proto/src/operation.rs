//! Long-running operations (`vm.create`, imports, pulls) and the frames
//! their watchers receive.

use serde::{Deserialize, Serialize};

use crate::vm::Vm;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Started,
    Finished,
    Failed,
    /// The stage's effects were undone during rollback.
    RolledBack,
    /// Bytes moved so far by a running stage (downloads, copies): sent
    /// live at most ten times a second; only each stage's last count is
    /// kept in the operation's history.
    Progress,
}

/// One step of an operation's progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageEvent {
    pub operation_id: String,
    pub stage: String,
    pub status: StageStatus,
    /// Milliseconds since the stage started (0 for `started`).
    pub elapsed_ms: u64,
    /// The same, in microseconds: stages of a fast create take less than
    /// a millisecond. Absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For `progress` events: bytes done and, when known, in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// An operation as `operation.status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Operation {
    pub id: String,
    /// What it does, e.g. `vm.create`, `image.pull`.
    pub kind: String,
    /// The VM it acts on (empty for image and kernel pulls).
    pub vm_id: String,
    pub vm_name: String,
    /// What it acts on, for people: `vm dev`, `image debian-12`.
    #[serde(default)]
    pub subject: String,
    pub state: OperationState,
    pub stages: Vec<StageEvent>,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// Parameters naming an operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OperationRef {
    pub id: String,
}

/// Parameters of `operation.list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OperationParams {
    /// Only operations still running.
    #[serde(default)]
    pub running: bool,
}

/// The answer of a call that turns the connection into a stream
/// (`operation.watch`); the frames follow it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamStarted {
    pub streaming: bool,
}

/// A frame of a streamed call, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StreamFrame {
    Stage(StageEvent),
    /// Terminal: the operation ended. `vm` is the VM as it ended up, when it still exists.
    Done {
        operation: Operation,
        vm: Option<Box<Vm>>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_frame_is_tagged() {
        let frame = StreamFrame::Stage(StageEvent {
            operation_id: "op".into(),
            stage: "clone root disk".into(),
            status: StageStatus::Finished,
            elapsed_ms: 12,
            elapsed_us: None,
            message: None,
            bytes: None,
            total: None,
        });
        let value = serde_json::to_value(&frame).unwrap();
        assert_eq!(value["event"], "stage");
        assert_eq!(value["stage"], "clone root disk");
        assert_eq!(value["status"], "finished");
        let back: StreamFrame = serde_json::from_value(value).unwrap();
        assert_eq!(back, frame);
    }
}
