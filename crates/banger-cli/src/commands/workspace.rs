//! `banger vm workspace prepare|export`, and the upload of `vm create
//! --workspace`.
//!
//! The CLI does the host side (`banger_workspace::host`): it runs as the
//! user who owns the repository, lists and packs it, and writes what comes
//! back. The daemon does the guest side (`vm.workspace.*`; the stream is in
//! `banger_proto::workspace`) and never opens these files.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::method;
use banger_proto::workspace::{
    ExportMode, ExportWorkspaceParams, ExportWorkspaceResult, PrepareWorkspaceParams,
    PrepareWorkspaceResult, UploadWorkspaceParams, UploadWorkspaceResult, WorkspaceSpec, STAGE,
};
use banger_proto::{StageEvent, StageStatus};
use banger_workspace::guest::check_dest;
use banger_workspace::host::{self, Counters, HostError, Plan};

use super::vm::StageView;
use crate::args::{WorkspaceCommand, WorkspaceExportArgs, WorkspacePrepareArgs};
use crate::client::Client;
use crate::error::{hinted, Hint as _, UsageError};
use crate::printer::Printer;
use anyhow::{anyhow, Context as _};

/// Hints for a PATH that is not in a git working tree, per command.
const PREPARE_NEEDS_GIT: &str =
    "pass --no-git to copy a directory that is not a git repository as plain files";
const CREATE_NEEDS_GIT: &str =
    "`vm create --workspace` takes a git working tree; use `vm cp` for other directories";
const BRANCH_NEEDS_GIT: &str =
    "run it in the host repository, or pass its path; `--patch FILE` needs none";

pub async fn run(socket: &Path, printer: Printer, command: WorkspaceCommand) -> anyhow::Result<()> {
    match command {
        WorkspaceCommand::Prepare(args) => prepare_command(socket, printer, args).await,
        WorkspaceCommand::Export(args) => export_command(socket, printer, args).await,
    }
}

/// The error with its causes on one line, and its hint; `needs_git` is the
/// hint for a PATH outside git, which depends on the command.
fn host_error(error: HostError, needs_git: &str) -> anyhow::Error {
    let hint = match &error {
        HostError::NotAWorkTree { .. } => Some(needs_git.to_owned()),
        other => other.hint(),
    };
    match hint {
        Some(hint) => hinted(error, hint),
        None => error.into(),
    }
}

/// `check_dest` with its hint.
fn checked_dest(dest: &str) -> anyhow::Result<String> {
    check_dest(dest).map_err(|error| match error.hint() {
        Some(hint) => hinted(error, hint),
        None => error.into(),
    })
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

fn mebibytes(bytes: u64) -> f64 {
    // Display only: precision loss above 2^52 bytes does not matter.
    #[allow(clippy::cast_precision_loss)]
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

/// Lists what to send, off the async runtime (git and a tree walk).
async fn list(
    source: Option<&Path>,
    include_ignored: bool,
    no_git: bool,
    needs_git: &str,
) -> anyhow::Result<Plan> {
    let source = source.map(Path::to_owned);
    tokio::task::spawn_blocking(move || Plan::list(source.as_deref(), include_ignored, no_git))
        .await
        .context("Listing task failed")?
        .map_err(|error| host_error(error, needs_git))
}

// ---- prepare ----

/// A `workspace` stage the CLI reports itself (`vm workspace prepare`),
/// shown like the daemon's stages.
struct LocalStage<'a> {
    view: &'a mut StageView,
    started: Instant,
}

impl LocalStage<'_> {
    fn event(
        &mut self,
        status: StageStatus,
        message: Option<String>,
        bytes: Option<u64>,
        total: Option<u64>,
    ) {
        let elapsed_ms = if status == StageStatus::Started {
            0
        } else {
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
        };
        self.view.stage(&StageEvent {
            operation_id: String::new(),
            stage: STAGE.to_owned(),
            status,
            elapsed_ms,
            elapsed_us: None,
            message,
            bytes,
            total,
        });
    }
}

/// Claims DEST through the daemon and uploads `plan`; returns the
/// destination as the daemon normalised it.
async fn prepare(
    socket: &Path,
    vm: &str,
    spec: WorkspaceSpec,
    plan: Plan,
    stage: &mut LocalStage<'_>,
) -> anyhow::Result<String> {
    let (total_entries, total_bytes) = (plan.entries(), plan.bytes);
    let (answer, reader, writer): (PrepareWorkspaceResult, _, _) = Client::connect(socket)
        .await?
        .call_streaming::<method::VmWorkspacePrepare>(PrepareWorkspaceParams {
            vm: vm.to_owned(),
            workspace: spec,
        })
        .await?;
    let counters = Arc::new(Counters::default());
    let upload = host::upload(plan, reader, writer, Arc::clone(&counters));
    tokio::pin!(upload);
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let uploaded = loop {
        tokio::select! {
            uploaded = &mut upload => break uploaded,
            _ = ticks.tick() => stage.event(
                StageStatus::Progress,
                Some(format!("{}/{total_entries} files", counters.entries.load(Ordering::Relaxed))),
                Some(counters.bytes.load(Ordering::Relaxed)),
                Some(total_bytes),
            ),
        }
    };
    uploaded.map_err(|error| host_error(error, PREPARE_NEEDS_GIT))?;
    Ok(answer.dest)
}

async fn prepare_command(
    socket: &Path,
    printer: Printer,
    args: WorkspacePrepareArgs,
) -> anyhow::Result<()> {
    let dest = checked_dest(&args.dest)?;
    let mut view = StageView::new(printer, args.json.json);
    let mut stage = LocalStage {
        view: &mut view,
        started: Instant::now(),
    };
    stage.event(StageStatus::Started, None, None, None);
    let listed = list(
        args.path.as_deref(),
        args.include_ignored,
        args.no_git,
        PREPARE_NEEDS_GIT,
    )
    .await;
    let (source, base, entries, bytes, skipped) = match &listed {
        Ok(plan) => (
            plan.source.clone(),
            plan.base.clone(),
            plan.entries(),
            plan.bytes,
            plan.skipped.clone(),
        ),
        Err(_) => Default::default(),
    };
    let prepared = match listed {
        Ok(plan) => {
            let spec = WorkspaceSpec {
                dest,
                user: args.user.clone(),
                force: args.force,
                base: base.clone(),
            };
            prepare(socket, &args.name.vm, spec, plan, &mut stage).await
        }
        Err(error) => Err(error),
    };
    match &prepared {
        Ok(_) => {
            let seconds = stage.started.elapsed().as_secs_f64().max(0.001);
            let mut message = format!(
                "{entries} files, {:.1} MiB, {:.0} MiB/s",
                mebibytes(bytes),
                mebibytes(bytes) / seconds
            );
            if !skipped.is_empty() {
                message.push_str(&format!(", {} special files skipped", skipped.len()));
            }
            stage.event(StageStatus::Finished, Some(message), None, None);
        }
        Err(error) => stage.event(
            StageStatus::Failed,
            Some(banger_proto::error_chain(error.as_ref())),
            None,
            None,
        ),
    }
    view.clear();
    // The stage line already said it; the error line says it again with its hint.
    let dest = prepared.context("Workspace not prepared")?;
    for path in &skipped {
        printer.message(&format!(
            "skipped {} (not a file, directory or symlink)",
            path.display()
        ));
    }
    if args.json.json {
        printer.json_line(&serde_json::json!({
            "vm": args.name.vm,
            "source": source,
            "dest": dest,
            "base": base,
            "skipped": skipped,
        }));
        return Ok(());
    }
    let base = match base.as_deref() {
        None => "no git".to_owned(),
        Some("none") => "no commit yet".to_owned(),
        Some(base) => format!("base {}", short(base)),
    };
    printer.message(&format!(
        "Prepared {}:{dest} from {} ({base})",
        args.name.vm,
        source.display()
    ));
    Ok(())
}

// ---- vm create --workspace ----

/// Lists `path` for `vm create --workspace`, before there is a VM: a
/// workspace that cannot be sent is refused first.
pub(crate) async fn create_plan(path: &Path) -> anyhow::Result<Plan> {
    list(Some(path), false, false, CREATE_NEEDS_GIT).await
}

/// What `vm.create` is asked to do with the workspace.
pub(crate) fn create_spec(plan: &Plan, dest: &str) -> anyhow::Result<WorkspaceSpec> {
    Ok(WorkspaceSpec {
        dest: checked_dest(dest)?,
        user: "root".to_owned(),
        force: false,
        base: plan.base.clone(),
    })
}

/// Sends the `workspace` stage's upload of operation `operation_id`. The
/// stage reports progress and failure through the operation; this only
/// moves the bytes, and its error matters only if the operation says
/// nothing better.
pub(crate) async fn create_upload(
    socket: PathBuf,
    operation_id: String,
    plan: Plan,
) -> anyhow::Result<()> {
    let total_bytes = Some(plan.tar_size());
    let (_, reader, writer): (UploadWorkspaceResult, _, _) = Client::connect(&socket)
        .await?
        .call_streaming::<method::VmWorkspaceUpload>(UploadWorkspaceParams {
            operation_id,
            total_bytes,
        })
        .await?;
    host::upload(plan, reader, writer, Arc::default())
        .await
        .map(drop)
        .map_err(|error| host_error(error, CREATE_NEEDS_GIT))
}

// ---- export ----

async fn export_command(
    socket: &Path,
    printer: Printer,
    args: WorkspaceExportArgs,
) -> anyhow::Result<()> {
    let dest = checked_dest(&args.dest)?;
    let vm = args.name.vm.clone();
    let params = |mode, identity: Option<(String, String)>| {
        let (git_name, git_email) = identity.unzip();
        ExportWorkspaceParams {
            vm: vm.clone(),
            dest: dest.clone(),
            user: args.user.clone(),
            mode,
            git_name,
            git_email,
        }
    };
    match (&args.patch, &args.branch) {
        (Some(file), None) => {
            if file.exists() && !args.force {
                return Err(hinted(
                    anyhow!("{} already exists", file.display()),
                    "`--force` replaces it",
                ));
            }
            let (answer, reader, _writer): (ExportWorkspaceResult, _, _) = Client::connect(socket)
                .await?
                .call_streaming::<method::VmWorkspaceExport>(params(ExportMode::Patch, None))
                .await?;
            let exported = host::receive_patch(reader, file)
                .await
                .map_err(|error| host_error(error, BRANCH_NEEDS_GIT))?;
            if args.json.json {
                printer.json(&serde_json::json!({
                    "vm": vm,
                    "dest": answer.dest,
                    "patch": file,
                    "bytes": exported.bytes,
                }));
            } else if exported.bytes == 0 {
                printer.message(&format!(
                    "No changes in {vm}:{} since its base; {} is empty",
                    answer.dest,
                    file.display()
                ));
            } else {
                printer.message(&format!(
                    "Wrote {} ({} bytes): the changes in {vm}:{} since its base",
                    file.display(),
                    exported.bytes,
                    answer.dest
                ));
            }
            Ok(())
        }
        (None, Some(branch)) => {
            let repo = host::find_repo(args.path.as_deref())
                .map_err(|error| host_error(error, BRANCH_NEEDS_GIT))?;
            host::check_branch(&repo, branch, args.force)
                .map_err(|error| host_error(error, BRANCH_NEEDS_GIT))?;
            let identity = host::git_identity(&repo.top);
            let (_, reader, _writer): (ExportWorkspaceResult, _, _) = Client::connect(socket)
                .await?
                .call_streaming::<method::VmWorkspaceExport>(params(
                    ExportMode::Branch,
                    Some(identity),
                ))
                .await?;
            let exported = host::receive_branch(reader, &repo, branch, args.force)
                .await
                .map_err(|error| host_error(error, BRANCH_NEEDS_GIT))?;
            let (Some(base), Some(commit)) = (exported.base, exported.commit) else {
                return Err(anyhow!("The daemon sent no commit for the branch"));
            };
            let count = host::count_commits(&repo, &base, &commit)
                .map_err(|error| host_error(error, BRANCH_NEEDS_GIT))?;
            if args.json.json {
                printer.json(&serde_json::json!({
                    "vm": vm,
                    "branch": branch,
                    "commit": commit,
                    "base": base,
                    "commits": count,
                }));
                return Ok(());
            }
            printer.message(&format!(
                "Created branch {branch} at {} ({count} commits on top of {})",
                short(&commit),
                if base == "none" {
                    "nothing"
                } else {
                    short(&base)
                }
            ));
            Ok(())
        }
        _ => Err(UsageError(
            "Pass exactly one of --patch FILE and --branch NAME".to_owned(),
        ))
        .hint("--patch writes a patch file; --branch makes a git branch in the repository"),
    }
}
