//! The operation registry: long-running work (`vm.create`) with an id, named
//! stages, status, cancel, and watchers.
//!
//! Watch protocol:
//! 1. A watcher takes the operation's state lock, copies the stage history,
//!    and subscribes to its broadcast channel before releasing the lock, so
//!    no event falls between history and live frames.
//! 2. It replays the history, then forwards live events until the terminal
//!    [`StreamFrame::Done`].
//! 3. Operations that already ended (also before a daemon restart) are read
//!    from the store: history plus `Done`.
//!
//! Every stage event is also written to the store, so `operation.status`
//! survives a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_proto::{
    ErrorKind, Operation, OperationState, StageEvent, StageStatus, StreamFrame, Vm,
};
use banger_store::{Store, StoreError};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::{DaemonResult, RpcFailure, StoreFailure};
use crate::ids::{new_id, now};

#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error("No operation with id `{id}`")]
    NotFound { id: String },
    #[error("Operation `{id}` already ended ({})", .state.as_str())]
    AlreadyEnded { id: String, state: OperationState },
    /// What a step returns when it noticed the operation was cancelled.
    #[error("Operation was cancelled")]
    Cancelled,
    #[error(transparent)]
    Store(#[from] StoreFailure),
}

impl From<StoreError> for OperationError {
    fn from(error: StoreError) -> Self {
        Self::Store(error.into())
    }
}

impl RpcFailure for OperationError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::AlreadyEnded { .. } => ErrorKind::InvalidState,
            Self::Cancelled => ErrorKind::Cancelled,
            Self::Store(error) => error.kind(),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NotFound { .. } => {
                Some("`banger operation list` shows the operations and their ids".to_owned())
            }
            Self::AlreadyEnded { .. } => {
                Some("only a running operation can be cancelled".to_owned())
            }
            Self::Store(error) => error.hint(),
            Self::Cancelled => None,
        }
    }
}

pub struct OperationRegistry {
    store: Store,
    live: Mutex<HashMap<String, Arc<LiveOperation>>>,
}

/// An operation in progress.
pub struct LiveOperation {
    pub id: String,
    record: Mutex<Operation>,
    events: broadcast::Sender<StreamFrame>,
    cancel: CancellationToken,
    store: Store,
}

/// What a watcher gets: frames so far, and the live feed if the operation is
/// still running.
pub struct Subscription {
    pub history: Vec<StreamFrame>,
    pub live: Option<broadcast::Receiver<StreamFrame>>,
}

/// A started stage; finishing it reports the elapsed time.
pub struct Stage {
    name: &'static str,
    started: Instant,
}

impl OperationRegistry {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveOperation>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers and persists a new running operation on `vm`.
    pub fn begin(&self, kind: &str, vm: &Vm) -> Result<Arc<LiveOperation>, OperationError> {
        self.begin_on(kind, &vm.id, &vm.name, format!("vm {}", vm.name))
    }

    /// Registers and persists a new running operation; `vm_id`/`vm_name`
    /// are empty for operations that act on no VM.
    pub fn begin_on(
        &self,
        kind: &str,
        vm_id: &str,
        vm_name: &str,
        subject: String,
    ) -> Result<Arc<LiveOperation>, OperationError> {
        let record = Operation {
            id: new_id(),
            kind: kind.to_owned(),
            vm_id: vm_id.to_owned(),
            vm_name: vm_name.to_owned(),
            subject,
            state: OperationState::Running,
            stages: Vec::new(),
            error: None,
            created_at: now(),
            finished_at: None,
        };
        self.store.save_operation(&record)?;
        let (events, _) = broadcast::channel(256);
        let operation = Arc::new(LiveOperation {
            id: record.id.clone(),
            record: Mutex::new(record),
            events,
            cancel: CancellationToken::new(),
            store: self.store.clone(),
        });
        self.live()
            .insert(operation.id.clone(), Arc::clone(&operation));
        Ok(operation)
    }

    /// Forgets a finished operation (its record stays in the store).
    pub fn retire(&self, id: &str) {
        self.live().remove(id);
    }

    pub fn status(&self, id: &str) -> Result<Operation, OperationError> {
        if let Some(operation) = self.live().get(id) {
            return Ok(operation.snapshot());
        }
        self.store
            .get_operation(id)?
            .ok_or_else(|| OperationError::NotFound { id: id.to_owned() })
    }

    pub fn list(&self) -> Result<Vec<Operation>, OperationError> {
        Ok(self.store.list_operations()?)
    }

    /// The running operation on `vm_id`, if any.
    pub fn running_for_vm(&self, vm_id: &str) -> Option<Arc<LiveOperation>> {
        self.live()
            .values()
            .find(|operation| operation.snapshot().vm_id == vm_id)
            .cloned()
    }

    /// Asks a running operation to stop; it rolls back what it made.
    pub fn cancel(&self, id: &str) -> Result<Operation, OperationError> {
        if let Some(operation) = self.live().get(id) {
            operation.cancel.cancel();
            return Ok(operation.snapshot());
        }
        match self.store.get_operation(id)? {
            Some(operation) => Err(OperationError::AlreadyEnded {
                id: id.to_owned(),
                state: operation.state,
            }),
            None => Err(OperationError::NotFound { id: id.to_owned() }),
        }
    }

    /// See the module docs. `vm_of` supplies the VM for the `Done` frame of
    /// operations that are no longer live. A [`DaemonResult`]: the RPC
    /// layer chains it onto its own parsing of the params.
    pub fn subscribe(
        &self,
        id: &str,
        vm_of: impl FnOnce(&str) -> Option<Vm>,
    ) -> DaemonResult<Subscription> {
        Ok(self.subscription(id, vm_of)?)
    }

    fn subscription(
        &self,
        id: &str,
        vm_of: impl FnOnce(&str) -> Option<Vm>,
    ) -> Result<Subscription, OperationError> {
        let live = self.live().get(id).cloned();
        let record = match live {
            Some(operation) => {
                let record = operation.lock_record();
                if !record.state.is_terminal() {
                    let history = record
                        .stages
                        .iter()
                        .cloned()
                        .map(StreamFrame::Stage)
                        .collect();
                    let receiver = operation.events.subscribe();
                    drop(record);
                    return Ok(Subscription {
                        history,
                        live: Some(receiver),
                    });
                }
                // Finished but not yet retired: its Done was already sent.
                record.clone()
            }
            None => self
                .store
                .get_operation(id)?
                .ok_or_else(|| OperationError::NotFound { id: id.to_owned() })?,
        };
        let mut history: Vec<StreamFrame> = record
            .stages
            .iter()
            .cloned()
            .map(StreamFrame::Stage)
            .collect();
        let vm = if record.state == OperationState::Cancelled {
            None
        } else {
            vm_of(&record.vm_id).map(Box::new)
        };
        history.push(StreamFrame::Done {
            operation: record,
            vm,
        });
        Ok(Subscription {
            history,
            live: None,
        })
    }

    /// Marks operations the store says are running but no task runs (the
    /// daemon was restarted mid-operation) as failed.
    pub fn fail_orphans(&self, reason: &str) -> Result<usize, OperationError> {
        let live: Vec<String> = self.live().keys().cloned().collect();
        let mut count = 0;
        for mut operation in self.store.list_operations()? {
            if operation.state == OperationState::Running && !live.contains(&operation.id) {
                operation.state = OperationState::Failed;
                operation.error = Some(reason.to_owned());
                operation.finished_at = Some(now());
                self.store.save_operation(&operation)?;
                count += 1;
            }
        }
        Ok(count)
    }
}

impl LiveOperation {
    fn lock_record(&self) -> std::sync::MutexGuard<'_, Operation> {
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn snapshot(&self) -> Operation {
        self.lock_record().clone()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The error a step returns when it noticed cancellation.
    pub fn cancelled_error(&self) -> OperationError {
        OperationError::Cancelled
    }

    fn record_event(
        &self,
        stage: &str,
        status: StageStatus,
        elapsed: Duration,
        message: Option<String>,
    ) {
        self.record(StageEvent {
            operation_id: self.id.clone(),
            stage: stage.to_owned(),
            status,
            elapsed_ms: whole_ms(elapsed),
            elapsed_us: Some(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)),
            message,
            bytes: None,
            total: None,
        });
    }

    /// Keeps `event` in the history and the store, and sends it live.
    fn record(&self, event: StageEvent) {
        let mut record = self.lock_record();
        record.stages.push(event.clone());
        if let Err(error) = self.store.save_operation(&record) {
            tracing::warn!(operation = %self.id, %error, "failed to persist stage event");
        }
        // Sent under the record lock so subscribers see history and live
        // events without gap or repeat.
        let _ = self.events.send(StreamFrame::Stage(event));
    }

    pub fn start_stage(&self, name: &'static str) -> Stage {
        self.record_event(name, StageStatus::Started, Duration::ZERO, None);
        Stage {
            name,
            started: Instant::now(),
        }
    }

    pub fn finish_stage(&self, stage: &Stage, message: Option<String>) {
        self.record_event(
            stage.name,
            StageStatus::Finished,
            stage.started.elapsed(),
            message,
        );
    }

    /// Reports the stage failed; its message is the error's chain.
    pub fn fail_stage(&self, stage: &Stage, error: &dyn std::error::Error) {
        self.record_event(
            stage.name,
            StageStatus::Failed,
            stage.started.elapsed(),
            Some(crate::error::chain(error)),
        );
    }

    /// Reports bytes moved by a running stage to live watchers only (not
    /// kept in the history or the store); [`Self::meter`] rate-limits and
    /// keeps the last count.
    pub fn progress(&self, stage: &Stage, bytes: u64, total: Option<u64>) {
        let _ = self.events.send(StreamFrame::Stage(StageEvent {
            operation_id: self.id.clone(),
            stage: stage.name.to_owned(),
            status: StageStatus::Progress,
            elapsed_ms: whole_ms(stage.started.elapsed()),
            elapsed_us: None,
            message: None,
            bytes: Some(bytes),
            total,
        }));
    }

    /// A rate-limited reporter of the bytes a running stage moves.
    pub fn meter(self: &Arc<Self>, stage: &Stage) -> ProgressMeter {
        ProgressMeter {
            operation: Arc::clone(self),
            stage: stage.name,
            started: stage.started,
            last_sent: None,
            last: None,
        }
    }

    /// [`Self::meter`] for a stage started elsewhere (its name only).
    pub fn meter_named(self: &Arc<Self>, stage: &'static str) -> ProgressMeter {
        ProgressMeter {
            operation: Arc::clone(self),
            stage,
            started: Instant::now(),
            last_sent: None,
            last: None,
        }
    }

    pub fn rolled_back(&self, stage: &str) {
        self.record_event(stage, StageStatus::RolledBack, Duration::ZERO, None);
    }

    /// Ends the operation: persists the outcome and sends `Done`.
    pub fn finish(&self, state: OperationState, error: Option<String>, vm: Option<Vm>) {
        let mut record = self.lock_record();
        record.state = state;
        record.error = error;
        record.finished_at = Some(now());
        if let Err(error) = self.store.save_operation(&record) {
            tracing::warn!(operation = %self.id, %error, "failed to persist operation outcome");
        }
        let _ = self.events.send(StreamFrame::Done {
            operation: record.clone(),
            vm: vm.map(Box::new),
        });
    }
}

/// At most this many live `progress` events per second and stage.
pub const PROGRESS_EVENTS_PER_SECOND: u32 = 10;

/// Reports the bytes a stage moved: live `progress` events at most
/// [`PROGRESS_EVENTS_PER_SECOND`] (and whenever the total is reached), and,
/// at [`ProgressMeter::finish`], the last count kept in the history, so a
/// watcher that came late and `operation status` see what was moved.
/// Cheap to call per chunk: it only compares a clock.
pub struct ProgressMeter {
    operation: Arc<LiveOperation>,
    stage: &'static str,
    started: Instant,
    last_sent: Option<Instant>,
    /// The newest count: bytes and total.
    last: Option<(u64, Option<u64>)>,
}

impl ProgressMeter {
    pub fn update(&mut self, bytes: u64, total: Option<u64>) {
        self.last = Some((bytes, total));
        let interval = Duration::from_secs(1) / PROGRESS_EVENTS_PER_SECOND;
        let due = self.last_sent.is_none_or(|sent| sent.elapsed() >= interval);
        if due || Some(bytes) == total {
            self.last_sent = Some(Instant::now());
            let _ = self
                .operation
                .events
                .send(StreamFrame::Stage(self.event(bytes, total, None)));
        }
    }

    /// Keeps the last count in the operation's history (nothing when no
    /// bytes were reported: a reflink clone, say).
    pub fn finish(self) {
        if let Some((bytes, total)) = self.last {
            let elapsed = self.started.elapsed();
            let event = self.event(
                bytes,
                total,
                Some(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)),
            );
            self.operation.record(event);
        }
    }

    fn event(&self, bytes: u64, total: Option<u64>, elapsed_us: Option<u64>) -> StageEvent {
        StageEvent {
            operation_id: self.operation.id.clone(),
            stage: self.stage.to_owned(),
            status: StageStatus::Progress,
            elapsed_ms: whole_ms(self.started.elapsed()),
            elapsed_us,
            message: None,
            bytes: Some(bytes),
            total,
        }
    }
}

fn whole_ms(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::VmState;

    fn vm() -> Vm {
        Vm {
            id: "0123456789abcdef".into(),
            name: "dev".into(),
            state: VmState::Creating,
            image: "img".into(),
            kernel: "krn".into(),
            backend: banger_proto::Backend::Firecracker,
            vcpus: 1,
            memory_mib: 128,
            disk_bytes: 0,
            pid: None,
            created_at: now(),
            started_at: None,
            error: None,
            dir: "/x".into(),
            network: None,
            work_disk: None,
        }
    }

    #[tokio::test]
    async fn watchers_get_history_then_live_then_done() {
        let registry = OperationRegistry::new(Store::open_in_memory().unwrap());
        let operation = registry.begin("vm.create", &vm()).unwrap();
        let stage = operation.start_stage("clone root disk");
        operation.finish_stage(&stage, None);
        let mut subscription = registry.subscribe(&operation.id, |_| None).unwrap();
        assert_eq!(subscription.history.len(), 2);
        let _stage = operation.start_stage("boot");
        operation.finish(OperationState::Succeeded, None, Some(vm()));
        registry.retire(&operation.id);
        let live = subscription.live.as_mut().unwrap();
        assert!(
            matches!(live.recv().await.unwrap(), StreamFrame::Stage(event) if event.stage == "boot")
        );
        assert!(
            matches!(live.recv().await.unwrap(), StreamFrame::Done { operation, vm: Some(_) } if operation.state == OperationState::Succeeded)
        );

        // After retirement the store answers, ending with Done.
        let late = registry.subscribe(&operation.id, |_| Some(vm())).unwrap();
        assert!(late.live.is_none());
        assert_eq!(late.history.len(), 4);
        assert!(matches!(
            late.history.last(),
            Some(StreamFrame::Done { .. })
        ));
    }

    #[test]
    fn stage_times_are_kept_to_the_microsecond() {
        let registry = OperationRegistry::new(Store::open_in_memory().unwrap());
        let operation = registry.begin("vm.create", &vm()).unwrap();
        let stage = operation.start_stage("resolve image");
        std::thread::sleep(Duration::from_micros(1500));
        operation.finish_stage(&stage, None);
        operation.finish(OperationState::Succeeded, None, Some(vm()));
        registry.retire(&operation.id);
        let stored = registry.subscribe(&operation.id, |_| None).unwrap();
        let finished = stored
            .history
            .iter()
            .find_map(|frame| match frame {
                StreamFrame::Stage(event) if event.status == StageStatus::Finished => {
                    Some(event.clone())
                }
                _ => None,
            })
            .unwrap();
        let micros = finished.elapsed_us.unwrap();
        assert!(micros >= 1500, "{micros} µs");
        assert_eq!(finished.elapsed_ms, micros / 1000);
    }

    #[test]
    fn watcher_arriving_between_finish_and_retire_gets_done() {
        let registry = OperationRegistry::new(Store::open_in_memory().unwrap());
        let operation = registry.begin("vm.create", &vm()).unwrap();
        operation.finish(OperationState::Succeeded, None, Some(vm()));
        let subscription = registry.subscribe(&operation.id, |_| Some(vm())).unwrap();
        assert!(subscription.live.is_none());
        assert!(matches!(
            subscription.history.last(),
            Some(StreamFrame::Done { operation, vm: Some(_) }) if operation.state == OperationState::Succeeded
        ));
    }

    #[test]
    fn cancel_reaches_running_and_refuses_finished() {
        let registry = OperationRegistry::new(Store::open_in_memory().unwrap());
        let operation = registry.begin("vm.create", &vm()).unwrap();
        assert!(!operation.is_cancelled());
        registry.cancel(&operation.id).unwrap();
        assert!(operation.is_cancelled());
        operation.finish(OperationState::Cancelled, None, None);
        registry.retire(&operation.id);
        let ended = registry.cancel(&operation.id).unwrap_err();
        assert_eq!(ended.kind(), ErrorKind::InvalidState);
        assert_eq!(
            ended.to_string(),
            format!("Operation `{}` already ended (cancelled)", operation.id)
        );
        let missing = registry.cancel("nope").unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert_eq!(missing.to_string(), "No operation with id `nope`");
        assert_eq!(
            registry.status(&operation.id).unwrap().state,
            OperationState::Cancelled
        );
    }

    #[tokio::test]
    async fn meters_limit_live_events_and_keep_the_last_count() {
        let registry = OperationRegistry::new(Store::open_in_memory().unwrap());
        let operation = registry.begin("image.import", &vm()).unwrap();
        let mut subscription = registry.subscribe(&operation.id, |_| None).unwrap();
        let stage = operation.start_stage("copy image");
        let mut meter = operation.meter(&stage);
        let total = 1_000_000;
        for bytes in (1..=1000).map(|chunk| chunk * 1000) {
            meter.update(bytes, Some(total));
        }
        meter.finish();
        operation.finish_stage(&stage, None);
        let live = subscription.live.as_mut().unwrap();
        let mut progress = Vec::new();
        while let Ok(StreamFrame::Stage(event)) = live.try_recv() {
            if event.status == StageStatus::Progress {
                progress.push(event.bytes.unwrap());
            }
        }
        // The first, the last (reaching the total), and the kept one: a
        // thousand updates in well under 100 ms send no more.
        assert!(progress.len() <= 4, "{progress:?}");
        assert_eq!(progress.first(), Some(&1000));
        assert_eq!(progress.last(), Some(&total));
        let kept: Vec<_> = operation
            .snapshot()
            .stages
            .into_iter()
            .filter(|event| event.status == StageStatus::Progress)
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].bytes, kept[0].total), (Some(total), Some(total)));
    }

    #[test]
    fn orphans_are_failed() {
        let store = Store::open_in_memory().unwrap();
        let registry = OperationRegistry::new(store.clone());
        let operation = registry.begin("vm.create", &vm()).unwrap();
        let fresh = OperationRegistry::new(store);
        assert_eq!(fresh.fail_orphans("interrupted").unwrap(), 1);
        let record = fresh.status(&operation.id).unwrap();
        assert_eq!(record.state, OperationState::Failed);
        assert_eq!(record.error.as_deref(), Some("interrupted"));
        assert_eq!(fresh.fail_orphans("interrupted").unwrap(), 0);
    }
}
