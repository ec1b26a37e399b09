//! Imports as operations. `image.import` and `kernel.import` check what
//! they can before answering (the name, the source opened as the caller,
//! its format, a `--from-debian` package read as the caller and the agent),
//! so a mistake is an immediate error with its hint; then they answer with
//! an operation id and do the rest in a task whose stages report the bytes
//! they copy (`progress` events, see [`crate::operations::ProgressMeter`]).
//! Cancelling stops a copy between chunks; what the import made is removed
//! as for any failure.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use banger_proto::image::OperationStarted;
use banger_proto::OperationState;

use super::ImageError;
use crate::error::chain;
use crate::files::{self, FileError};
use crate::operations::{LiveOperation, OperationRegistry, ProgressMeter, Stage};

/// Registers a `KIND.import` operation on `name` and runs `work` for it on a
/// blocking thread; the operation ends with `work`'s outcome.
pub(super) fn spawn_import<T: Send + 'static>(
    operations: &Arc<OperationRegistry>,
    kind: &'static str,
    name: &str,
    work: impl FnOnce(&Arc<LiveOperation>) -> Result<T, ImageError> + Send + 'static,
) -> Result<OperationStarted, ImageError> {
    let operation =
        operations.begin_on(&format!("{kind}.import"), "", "", format!("{kind} {name}"))?;
    let started = OperationStarted {
        operation_id: operation.id.clone(),
    };
    let operations = Arc::clone(operations);
    tokio::spawn(async move {
        let for_work = Arc::clone(&operation);
        let outcome = tokio::task::spawn_blocking(move || work(&for_work))
            .await
            .map_err(|source| ImageError::Task {
                task: "Import",
                source,
            })
            .and_then(|outcome| outcome);
        match outcome {
            Ok(_) => operation.finish(OperationState::Succeeded, None, None),
            Err(error) if operation.is_cancelled() => {
                operation.finish(OperationState::Cancelled, Some(chain(&error)), None);
            }
            Err(error) => operation.finish(OperationState::Failed, Some(chain(&error)), None),
        }
        operations.retire(&operation.id);
    });
    Ok(started)
}

/// Runs `step` as stage `name` (not at all once the operation is
/// cancelled), reporting it started, then finished or failed.
pub(super) fn stage<T>(
    operation: &Arc<LiveOperation>,
    name: &'static str,
    step: impl FnOnce(&Stage) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    if operation.is_cancelled() {
        return Err(operation.cancelled_error().into());
    }
    let stage = operation.start_stage(name);
    // A copy that stopped for a cancel says so, not how the copy ended.
    let outcome = step(&stage).map_err(|error| {
        if operation.is_cancelled() {
            operation.cancelled_error().into()
        } else {
            error
        }
    });
    match &outcome {
        Ok(_) => operation.finish_stage(&stage, None),
        Err(error) => operation.fail_stage(&stage, error),
    }
    outcome
}

/// One file of a stage's copy: [`files::copy_with_digest`] counting into
/// `meter` from `base` bytes (what earlier files of the stage moved) of
/// `total`, stopping when the operation is cancelled.
pub(super) fn copy_file(
    operation: &LiveOperation,
    meter: &mut ProgressMeter,
    (base, total): (u64, u64),
    input: &mut File,
    source: &Path,
    destination: &Path,
) -> Result<String, FileError> {
    files::copy_with_digest_reporting(input, source, destination, &mut |bytes| {
        meter.update(base + bytes, Some(total));
        !operation.is_cancelled()
    })
}
