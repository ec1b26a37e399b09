//! The VM state machine, stated once: which requests each state allows and
//! what they lead to. Lifecycle code asks [`decide`] (under the VM's lock,
//! with a freshly read state) and acts on the answer; supervision and
//! reconciliation ask [`after_exit`] and [`after_restart`].
//!
//! ```text
//! creating ─▶ starting ─▶ running ─▶ stopping ─▶ stopped
//!     │  (--no-start) ──────────────────────────────▲ │
//!     ▼                     │ VMM exits              │ ▼ start
//!  (gone)                 crashed ─── stop ──────────┘ starting
//! failed: any step of create/start failed; start and delete allowed.
//! running ⇄ paused (pause, resume); a paused VM is snapshotted, stopped,
//! or deleted with --force like a running one.
//! ```

use banger_proto::VmState;

/// What a caller asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Start,
    Stop,
    Delete {
        force: bool,
    },
    /// `vm set`: change vCPUs, memory or disk size.
    Change,
    /// Reach the guest agent (`vm run`, `cp`, `stats`, workspaces).
    UseAgent,
    /// Stop the vCPUs.
    Pause,
    /// Run a paused VM's vCPUs again.
    Resume,
    /// Write a snapshot (pausing a running VM for it).
    Snapshot,
}

/// The answer for one state and request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do the work.
    Proceed,
    /// Nothing to do: the VM is already where the request leads.
    AlreadyDone,
    /// Nothing runs; only the recorded state changes (a crashed VM that is
    /// stopped becomes `stopped`).
    Record(VmState),
    /// Cancel the running create first, then proceed (`delete --force`).
    CancelCreate,
    /// The VM is being created; the caller waits or cancels.
    BusyCreating,
    /// Refused in this state.
    Refuse(Refusal),
}

/// Why a request is refused, which says what would help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It must be stopped first.
    StopFirst,
    /// It must be started first.
    StartFirst,
    /// A lifecycle step is under way; try again when it ends.
    InTransition,
    /// It is paused; resume it first.
    ResumeFirst,
}

/// The legal transitions of a VM's state machine.
#[must_use]
pub fn decide(state: VmState, request: Request) -> Decision {
    use Decision::{AlreadyDone, BusyCreating, CancelCreate, Proceed, Record, Refuse};
    use VmState::{Crashed, Creating, Failed, Paused, Running, Starting, Stopped, Stopping};
    match (request, state) {
        (Request::Start, Running | Paused) => AlreadyDone,
        (Request::Start, Stopped | Crashed | Failed) => Proceed,
        (Request::Start, Creating) => BusyCreating,
        (Request::Start, Starting | Stopping) => Refuse(Refusal::InTransition),

        (Request::Stop, Creating) => BusyCreating,
        (Request::Stop, Stopped | Failed) => AlreadyDone,
        (Request::Stop, Crashed) => Record(Stopped),
        (Request::Stop, Starting | Running | Stopping | Paused) => Proceed,

        (Request::Delete { force: false }, Creating) => BusyCreating,
        (Request::Delete { force: true }, Creating) => CancelCreate,
        (Request::Delete { force: false }, Starting | Running | Stopping | Paused) => {
            Refuse(Refusal::StopFirst)
        }
        (Request::Delete { .. }, _) => Proceed,

        (Request::Change, Stopped | Crashed) => Proceed,
        (Request::Change, Creating) => BusyCreating,
        (Request::Change, _) => Refuse(Refusal::StopFirst),

        (Request::UseAgent, Running) => Proceed,
        (Request::UseAgent, Creating) => BusyCreating,
        (Request::UseAgent, Paused) => Refuse(Refusal::ResumeFirst),
        (Request::UseAgent, _) => Refuse(Refusal::StartFirst),

        (Request::Pause | Request::Snapshot, Running) => Proceed,
        (Request::Pause, Paused) => AlreadyDone,
        (Request::Snapshot, Paused) => Proceed,
        (Request::Resume, Paused) => Proceed,
        (Request::Resume, Running) => AlreadyDone,
        (Request::Pause | Request::Resume | Request::Snapshot, Creating) => BusyCreating,
        (Request::Pause | Request::Resume | Request::Snapshot, Starting | Stopping) => {
            Refuse(Refusal::InTransition)
        }
        (Request::Pause | Request::Resume | Request::Snapshot, Stopped | Failed | Crashed) => {
            Refuse(Refusal::StartFirst)
        }
    }
}

/// The state a VM takes when its VMM process exits while the daemon
/// watches it, or `None` when the exit changes nothing (the VM had no
/// process). A clean exit of a running guest is the guest powering itself
/// off.
#[must_use]
pub fn after_exit(state: VmState, clean_exit: bool) -> Option<VmState> {
    match state {
        VmState::Running if clean_exit => Some(VmState::Stopped),
        state if state.has_process() => Some(VmState::Crashed),
        _ => None,
    }
}

/// The state a VM takes when a new daemon finds it (reconciliation):
/// `adopted` says whether its VMM process still runs. `None`: unchanged.
/// An interrupted create is not here: it is removed, whatever its state.
#[must_use]
pub fn after_restart(state: VmState, adopted: bool) -> Option<VmState> {
    match (state, adopted) {
        (VmState::Running | VmState::Paused, true) => None,
        // The user asked for a stop; it is finished.
        (VmState::Stopping, _) => Some(VmState::Stopped),
        // Dead, or a start interrupted before boot finished.
        (VmState::Starting | VmState::Running | VmState::Paused, _) => Some(VmState::Crashed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{AlreadyDone, BusyCreating, CancelCreate, Proceed, Record, Refuse};
    use Refusal::{InTransition, ResumeFirst, StartFirst, StopFirst};
    use VmState::{Crashed, Creating, Failed, Paused, Running, Starting, Stopped, Stopping};

    #[test]
    fn every_state_and_request_has_its_decision() {
        let requests = [
            Request::Start,
            Request::Stop,
            Request::Delete { force: false },
            Request::Delete { force: true },
            Request::Change,
            Request::UseAgent,
            Request::Pause,
            Request::Resume,
            Request::Snapshot,
        ];
        // One row per state, one column per request, in the order above.
        let table: [(VmState, [Decision; 9]); 8] = [
            (
                Creating,
                [
                    BusyCreating,
                    BusyCreating,
                    BusyCreating,
                    CancelCreate,
                    BusyCreating,
                    BusyCreating,
                    BusyCreating,
                    BusyCreating,
                    BusyCreating,
                ],
            ),
            (
                Starting,
                [
                    Refuse(InTransition),
                    Proceed,
                    Refuse(StopFirst),
                    Proceed,
                    Refuse(StopFirst),
                    Refuse(StartFirst),
                    Refuse(InTransition),
                    Refuse(InTransition),
                    Refuse(InTransition),
                ],
            ),
            (
                Running,
                [
                    AlreadyDone,
                    Proceed,
                    Refuse(StopFirst),
                    Proceed,
                    Refuse(StopFirst),
                    Proceed,
                    Proceed,
                    AlreadyDone,
                    Proceed,
                ],
            ),
            (
                Stopping,
                [
                    Refuse(InTransition),
                    Proceed,
                    Refuse(StopFirst),
                    Proceed,
                    Refuse(StopFirst),
                    Refuse(StartFirst),
                    Refuse(InTransition),
                    Refuse(InTransition),
                    Refuse(InTransition),
                ],
            ),
            (
                Stopped,
                [
                    Proceed,
                    AlreadyDone,
                    Proceed,
                    Proceed,
                    Proceed,
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                ],
            ),
            (
                Failed,
                [
                    Proceed,
                    AlreadyDone,
                    Proceed,
                    Proceed,
                    Refuse(StopFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                ],
            ),
            (
                Crashed,
                [
                    Proceed,
                    Record(Stopped),
                    Proceed,
                    Proceed,
                    Proceed,
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                    Refuse(StartFirst),
                ],
            ),
            (
                Paused,
                [
                    AlreadyDone,
                    Proceed,
                    Refuse(StopFirst),
                    Proceed,
                    Refuse(StopFirst),
                    Refuse(ResumeFirst),
                    AlreadyDone,
                    Proceed,
                    Proceed,
                ],
            ),
        ];
        assert_eq!(table.len(), VmState::ALL.len());
        for (state, decisions) in table {
            for (request, expected) in requests.iter().zip(decisions) {
                assert_eq!(decide(state, *request), expected, "{state} + {request:?}");
            }
        }
    }

    #[test]
    fn exits_and_restarts_lead_where_the_lifecycle_says() {
        assert_eq!(after_exit(Running, true), Some(Stopped));
        assert_eq!(after_exit(Running, false), Some(Crashed));
        assert_eq!(after_exit(Starting, true), Some(Crashed));
        assert_eq!(after_exit(Stopping, true), Some(Crashed));
        for state in [Creating, Stopped, Failed, Crashed] {
            assert_eq!(after_exit(state, false), None, "{state}");
        }
        assert_eq!(after_restart(Running, true), None);
        assert_eq!(after_restart(Running, false), Some(Crashed));
        assert_eq!(after_restart(Starting, true), Some(Crashed));
        assert_eq!(after_restart(Stopping, true), Some(Stopped));
        assert_eq!(after_restart(Stopping, false), Some(Stopped));
        assert_eq!(after_exit(Paused, true), Some(Crashed));
        assert_eq!(after_restart(Paused, true), None);
        assert_eq!(after_restart(Paused, false), Some(Crashed));
        for state in [Stopped, Failed, Crashed] {
            assert_eq!(after_restart(state, false), None, "{state}");
        }
    }
}
