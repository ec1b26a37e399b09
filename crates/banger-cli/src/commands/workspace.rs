//! `banger vm workspace prepare|export`, and the `workspace` stage of
//! `vm create --workspace`.
//!
//! All of this runs in the CLI, not in the daemon: the CLI is the process
//! that may read the user's files (it runs as the user, who owns them); the
//! daemon never reads or writes them. The guest side goes through the
//! agent, relayed by the daemon (`vm.agent`).
//!
//! Prepare:
//! 1. Find the repository: PATH (default: the current directory) up to its
//!    git top level. Its HEAD is the base commit (`none` on an unborn branch).
//! 2. In the guest, refuse when DEST exists and is not an empty directory,
//!    unless `--force`, which removes it first.
//! 3. List what to send: `git ls-files -z --cached --others
//!    --exclude-standard` (tracked files with their working-tree content,
//!    untracked files that are not ignored), the same in every nested
//!    checkout (submodules, whose `.git` files point into `.git/modules`),
//!    and everything under `.git`.
//! 4. Stream it all as one tar, built by a blocking task writing through
//!    `SyncIoBridge`, into the agent's `copy_in DEST`; the base commit goes
//!    last, as `.git/banger-workspace-base`.
//! 5. One exec then makes the symlinks the agent refuses to unpack
//!    (absolute targets, or targets outside DEST) and, for a user other than
//!    root, `chown -R`s DEST.
//!
//! Export (git runs in the guest, where nothing changes but a temporary
//! index and a temporary ref, both removed):
//! 1. Read the base from `.git/banger-workspace-base`.
//! 2. Make a tree of the guest's working state with a temporary index
//!    (`GIT_INDEX_FILE=TMP git add -A; git write-tree`), so untracked files
//!    that are not ignored count and the guest's own index is not touched.
//! 3. `--patch`: `git diff --binary --full-index BASE TREE` is the patch.
//! 4. `--branch`: the host repository must have BASE and must not have the
//!    branch. The guest makes a commit of TREE on top of its HEAD
//!    (`commit-tree`; none when nothing is uncommitted) and bundles
//!    BASE..commit through a temporary ref; the CLI copies the bundle out,
//!    `git bundle unbundle`s it into the host repository and creates the
//!    branch with `update-ref`. The host's working tree, index and HEAD are
//!    not touched.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _};
use banger_agent::client::{AgentClient, ExecOutput};
use banger_proto::agent::ExecRequest;
use banger_proto::{StageEvent, StageStatus, Vm, VmState};
use tokio::io::AsyncWriteExt;

use super::vm::StageView;
use crate::args::{WorkspaceCommand, WorkspaceExportArgs, WorkspacePrepareArgs};
use crate::client::Client;
use crate::error::{hinted, Hint as _, UsageError};
use crate::printer::Printer;

/// Where prepare records the commit the workspace was made from.
const BASE_FILE: &str = ".git/banger-workspace-base";
/// The stage name, as `vm create` shows it.
const STAGE: &str = "workspace";

pub async fn run(socket: &Path, printer: Printer, command: WorkspaceCommand) -> anyhow::Result<()> {
    match command {
        WorkspaceCommand::Prepare(args) => prepare_command(socket, printer, args).await,
        WorkspaceCommand::Export(args) => export_command(socket, printer, args).await,
    }
}

// ---- errors and small helpers ----

/// Git's complaint on one line.
fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("hint:"))
        .collect();
    if lines.is_empty() {
        "no message".to_owned()
    } else {
        lines.join("; ")
    }
}

/// A guest directory: absolute, no `..`, not `/`; trailing slashes dropped.
fn check_dest(dest: &str) -> anyhow::Result<String> {
    let trimmed = dest.trim_end_matches('/');
    let path = Path::new(trimmed);
    let valid = path.is_absolute()
        && path.components().count() > 1
        && path
            .components()
            .all(|component| matches!(component, Component::RootDir | Component::Normal(_)));
    if valid {
        Ok(trimmed.to_owned())
    } else {
        Err(anyhow!("Invalid workspace directory `{dest}`: it must be an absolute guest path below `/`, without `..`"))
    }
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

/// `git -C DIR`, with no optional locks (prepare and export only read the
/// host repository's index, and must not refresh it).
fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null());
    command
}

fn run_git(dir: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    git(dir)
        .args(args)
        .output()
        .context("Cannot run git")
        .hint("install git (apt install git)")
}

/// Runs git in `dir`; its stdout, or an error quoting git.
fn git_stdout(dir: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let output = run_git(dir, args)?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(anyhow!(
            "`git {}` failed in {}: {}",
            args.join(" "),
            dir.display(),
            one_line(&output.stderr)
        ))
    }
}

fn trimmed(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// A host git repository's working tree and git directory.
struct HostRepo {
    top: PathBuf,
    git_dir: PathBuf,
}

/// The repository holding `start` (default: the current directory).
fn find_repo(start: Option<&Path>, hint: &str) -> anyhow::Result<HostRepo> {
    let start = match start {
        Some(path) => path.to_owned(),
        None => std::env::current_dir().context("Cannot read the current directory")?,
    };
    if !start.is_dir() {
        return Err(anyhow!("`{}` is not a directory", start.display()));
    }
    let output = run_git(
        &start,
        &["rev-parse", "--show-toplevel", "--absolute-git-dir"],
    )?;
    if !output.status.success() {
        return Err(hinted(
            anyhow!("`{}` is not in a git working tree", start.display()),
            hint,
        ));
    }
    let mut lines = output
        .stdout
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| PathBuf::from(OsStr::from_bytes(line)));
    let (Some(top), Some(git_dir)) = (lines.next(), lines.next()) else {
        return Err(anyhow!(
            "`git rev-parse` gave no top level for {}",
            start.display()
        ));
    };
    let dot_git = top.join(".git");
    let same = dot_git.is_dir()
        && std::fs::canonicalize(&dot_git).ok() == std::fs::canonicalize(&git_dir).ok();
    if !same {
        return Err(hinted(
            anyhow!(
                "{} keeps its git directory elsewhere ({}): linked worktrees and submodule checkouts cannot be sent on their own",
                top.display(),
                git_dir.display()
            ),
            "prepare the main repository, whose .git is a directory",
        ));
    }
    Ok(HostRepo { top, git_dir })
}

/// The commit HEAD points to; `None` on an unborn branch.
fn head_commit(repo: &Path) -> anyhow::Result<Option<String>> {
    let output = run_git(repo, &["rev-parse", "-q", "--verify", "HEAD^{commit}"])?;
    Ok(output
        .status
        .success()
        .then(|| trimmed(&output.stdout))
        .filter(|commit| !commit.is_empty()))
}

/// A command in the guest with its output collected.
async fn guest_exec(
    agent: &AgentClient,
    vm: &str,
    request: ExecRequest,
) -> anyhow::Result<ExecOutput> {
    agent
        .exec(request)
        .await
        .map_err(|error| super::guest::agent_error(vm, error))?
        .output()
        .await
        .map_err(|error| super::guest::agent_error(vm, error))
}

/// `sh -c SCRIPT banger-workspace ARGS...`.
fn shell(script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "banger-workspace".to_owned(),
    ];
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    argv
}

// ---- prepare ----

/// One file, symlink or directory of the tar, in the order sent.
struct Item {
    path: PathBuf,
    /// Its name in the archive, relative to DEST.
    name: PathBuf,
    /// Bytes of content (regular files).
    size: u64,
}

/// What prepare sends.
#[derive(Default)]
struct Plan {
    items: Vec<Item>,
    bytes: u64,
    /// Symlinks made by an exec after the stream: (target, name).
    links: Vec<(String, String)>,
    /// Special files (sockets, FIFOs, devices) and unrepresentable names.
    skipped: Vec<PathBuf>,
}

impl Plan {
    /// Adds `name` (relative to `root`) as it is on disk; a missing path (a
    /// tracked file deleted in the working tree) is not an error.
    fn add(&mut self, root: &Path, name: &Path) -> anyhow::Result<Option<std::fs::FileType>> {
        let path = root.join(name);
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("Cannot read {}", path.display()))
            }
        };
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("Cannot read the link {}", path.display()))?;
            if banger_agent::files::check_symlink_target(name, &target).is_err() {
                // The agent refuses links out of DEST; they are made afterwards.
                match (target.to_str(), name.to_str()) {
                    (Some(target), Some(name)) => {
                        self.links.push((target.to_owned(), name.to_owned()));
                    }
                    _ => self.skipped.push(name.to_owned()),
                }
                return Ok(Some(file_type));
            }
        } else if file_type.is_file() {
            self.bytes += metadata.len();
        } else if !file_type.is_dir() {
            self.skipped.push(name.to_owned());
            return Ok(Some(file_type));
        }
        if !name.as_os_str().is_empty() {
            self.items.push(Item {
                path,
                name: name.to_owned(),
                size: if file_type.is_file() {
                    metadata.len()
                } else {
                    0
                },
            });
        }
        Ok(Some(file_type))
    }

    /// Adds `name` and, for a directory, everything below it.
    fn add_tree(&mut self, root: &Path, name: &Path) -> anyhow::Result<()> {
        if !self.add(root, name)?.is_some_and(|kind| kind.is_dir()) {
            return Ok(());
        }
        let dir = root.join(name);
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("Cannot read {}", dir.display()))?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("Cannot read {}", dir.display()))?;
        children.sort();
        for child in children {
            let child = name.join(child);
            // Written fresh at the end of the stream.
            if child == Path::new(BASE_FILE) {
                continue;
            }
            self.add_tree(root, &child)?;
        }
        Ok(())
    }

    /// Adds the files git lists in the checkout at `name` (relative to
    /// `root`), and each nested checkout (submodule) as it is checked out,
    /// its `.git` included.
    fn add_checkout(
        &mut self,
        root: &Path,
        name: &Path,
        include_ignored: bool,
    ) -> anyhow::Result<()> {
        let dir = root.join(name);
        let mut args = vec!["ls-files", "-z", "--cached", "--others"];
        if !include_ignored {
            args.push("--exclude-standard");
        }
        let listed = git_stdout(&dir, &args)?;
        let mut seen = HashSet::new();
        for entry in listed.split(|byte| *byte == 0) {
            // Unmerged paths are listed once per stage.
            if entry.is_empty() || !seen.insert(entry) {
                continue;
            }
            let relative = name.join(OsStr::from_bytes(entry));
            let kind = self.add(root, &relative)?;
            // A directory here is a gitlink (submodule) or a nested repository.
            if kind.is_some_and(|kind| kind.is_dir()) {
                let dot_git = relative.join(".git");
                if root.join(&dot_git).symlink_metadata().is_ok() {
                    self.add_checkout(root, &relative, include_ignored)?;
                    self.add_tree(root, &dot_git)?;
                }
            }
        }
        Ok(())
    }
}

/// Counts what the packing task has sent.
#[derive(Default)]
struct Counters {
    files: AtomicU64,
    bytes: AtomicU64,
}

/// Writes the items, then the base record, as one tar.
fn pack(
    items: &[Item],
    base: Option<&str>,
    writer: impl io::Write,
    counters: &Counters,
) -> io::Result<()> {
    // Each write into the bridge is a trip into the runtime: batch the
    // headers, small files and padding.
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(256 * 1024, writer));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    for item in items {
        builder
            .append_path_with_name(&item.path, &item.name)
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("Cannot pack {}: {error}", item.path.display()),
                )
            })?;
        counters.files.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(item.size, Ordering::Relaxed);
    }
    if let Some(base) = base {
        let record = format!("{base}\n");
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(record.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
        );
        builder.append_data(&mut header, BASE_FILE, record.as_bytes())?;
    }
    builder.into_inner()?.flush()
}

/// What `prepare` takes.
pub(crate) struct PrepareOptions<'a> {
    pub source: Option<&'a Path>,
    pub dest: &'a str,
    pub user: &'a str,
    pub force: bool,
    pub include_ignored: bool,
    pub no_git: bool,
}

/// What `prepare` did.
pub(crate) struct Prepared {
    pub source: PathBuf,
    /// `None` with `--no-git`; `Some("none")` for an unborn branch.
    pub base: Option<String>,
    pub files: u64,
    pub bytes: u64,
    pub skipped: Vec<PathBuf>,
}

/// The `workspace` stage shown like the daemon's stages.
struct Stage<'a> {
    view: &'a mut StageView,
    operation_id: &'a str,
    started: Instant,
}

impl Stage<'_> {
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
            operation_id: self.operation_id.to_owned(),
            stage: STAGE.to_owned(),
            status,
            elapsed_ms,
            message,
            bytes,
            total,
        });
    }
}

/// Refuses a non-empty DEST (removes it with `force`) and checks the user.
async fn claim_dest(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    force: bool,
) -> anyhow::Result<()> {
    const SCRIPT: &str = r#"dest=$1 force=$2 user=$3
if [ "$user" != root ] && ! id -u "$user" >/dev/null 2>&1; then exit 5; fi
if [ -e "$dest" ] || [ -L "$dest" ]; then
  if [ -d "$dest" ] && [ ! -L "$dest" ] && [ -z "$(ls -A "$dest")" ]; then exit 0; fi
  if [ "$force" = 1 ]; then exec rm -rf -- "$dest"; fi
  if [ -f "$dest/.git/banger-workspace-base" ]; then exit 4; fi
  exit 3
fi"#;
    let output = guest_exec(
        agent,
        vm,
        ExecRequest {
            argv: shell(SCRIPT, &[dest, if force { "1" } else { "0" }, user]),
            ..ExecRequest::default()
        },
    )
    .await?;
    let hint = "`--force` replaces it (everything there is removed first)";
    match output.status.code {
        Some(0) => Ok(()),
        Some(3) => Err(hinted(
            anyhow!("VM `{vm}` already has files at {dest}"),
            hint,
        )),
        Some(4) => Err(hinted(
            anyhow!("VM `{vm}` already has a workspace at {dest}"),
            hint,
        )),
        Some(5) => Err(anyhow!("VM `{vm}` has no user `{user}`")),
        _ => Err(anyhow!(
            "Cannot clear {dest} in VM `{vm}`: {}",
            one_line(&output.stderr)
        )),
    }
}

/// Makes the symlinks the tar could not carry, and hands DEST to `user`.
async fn finish_dest(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    links: &[(String, String)],
) -> anyhow::Result<()> {
    const SCRIPT: &str = r#"dest=$1 owner=$2
shift 2
while [ $# -ge 2 ]; do
  mkdir -p -- "$(dirname -- "$dest/$2")" && ln -sfn -- "$1" "$dest/$2" || exit 1
  shift 2
done
if [ "$owner" != root ]; then chown -R -h -- "$owner:" "$dest"; fi"#;
    if links.is_empty() && user == "root" {
        return Ok(());
    }
    let mut args = vec![dest, user];
    for (target, name) in links {
        args.push(target);
        args.push(name);
    }
    let output = guest_exec(
        agent,
        vm,
        ExecRequest {
            argv: shell(SCRIPT, &args),
            ..ExecRequest::default()
        },
    )
    .await?;
    if output.status.code == Some(0) {
        Ok(())
    } else {
        Err(anyhow!(
            "Cannot finish {dest} in VM `{vm}` (symlinks, owner): {}",
            one_line(&output.stderr)
        ))
    }
}

/// Lists what to send (blocking: runs git and walks the tree).
fn plan(
    options_source: Option<&Path>,
    include_ignored: bool,
    no_git: bool,
) -> anyhow::Result<(PathBuf, Plan, Option<String>)> {
    let mut plan = Plan::default();
    if no_git {
        let source = match options_source {
            Some(path) => path.to_owned(),
            None => std::env::current_dir().context("Cannot read the current directory")?,
        };
        if !source.is_dir() {
            return Err(anyhow!("`{}` is not a directory", source.display()));
        }
        plan.add_tree(&source, Path::new(""))?;
        return Ok((source, plan, None));
    }
    let repo = find_repo(
        options_source,
        "pass --no-git to copy a directory that is not a git repository as plain files",
    )?;
    let base = head_commit(&repo.top)?.unwrap_or_else(|| "none".to_owned());
    plan.add_checkout(&repo.top, Path::new(""), include_ignored)?;
    plan.add_tree(&repo.top, Path::new(".git"))?;
    Ok((repo.top, plan, Some(base)))
}

/// Checks, before a VM is made for it, that `path` can be prepared.
pub(crate) fn check_source(path: &Path) -> anyhow::Result<()> {
    find_repo(
        Some(path),
        "`vm create --workspace` takes a git working tree; use `vm cp` for other directories",
    )
    .map(|_| ())
}

/// Prepares the workspace, reporting it as the `workspace` stage.
async fn prepare(
    agent: &AgentClient,
    vm: &str,
    options: &PrepareOptions<'_>,
    stage: &mut Stage<'_>,
) -> anyhow::Result<Prepared> {
    let dest = check_dest(options.dest)?;
    let source = options.source.map(Path::to_owned);
    let (include_ignored, no_git) = (options.include_ignored, options.no_git);
    let (root, plan, base) =
        tokio::task::spawn_blocking(move || plan(source.as_deref(), include_ignored, no_git))
            .await
            .context("Listing task failed")??;
    claim_dest(agent, vm, &dest, options.user, options.force).await?;

    let total_files = plan.items.len() as u64;
    let total_bytes = plan.bytes;
    let counters = Arc::new(Counters::default());
    let (reader, writer) = tokio::io::duplex(1024 * 1024);
    let Plan {
        items,
        links,
        skipped,
        ..
    } = plan;
    let packer = {
        let counters = Arc::clone(&counters);
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let writer = tokio_util::io::SyncIoBridge::new(writer);
            pack(&items, base.as_deref(), writer, &counters)
        })
    };
    let copy = agent.copy_in(&dest, reader);
    tokio::pin!(copy);
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let copied = loop {
        tokio::select! {
            copied = &mut copy => break copied,
            _ = ticks.tick() => stage.event(
                StageStatus::Progress,
                Some(format!("{}/{total_files} files", counters.files.load(Ordering::Relaxed))),
                Some(counters.bytes.load(Ordering::Relaxed)),
                Some(total_bytes),
            ),
        }
    };
    let packed = packer.await.context("Packing task failed")?;
    match (copied, packed) {
        (Ok(_), Ok(())) => {}
        // The agent stopped reading: its answer says why.
        (Err(error), Err(packing)) if packing.kind() == io::ErrorKind::BrokenPipe => {
            return Err(super::guest::agent_error(vm, error));
        }
        (_, Err(error)) => return Err(error.into()),
        (Err(error), Ok(())) => return Err(super::guest::agent_error(vm, error)),
    }
    finish_dest(agent, vm, &dest, options.user, &links).await?;
    Ok(Prepared {
        source: root,
        base,
        files: total_files,
        bytes: total_bytes,
        skipped,
    })
}

/// Runs `prepare` between the stage's `started` and `finished`/`failed`.
async fn prepare_stage(
    agent: &AgentClient,
    vm: &str,
    options: &PrepareOptions<'_>,
    view: &mut StageView,
    operation_id: &str,
) -> anyhow::Result<Prepared> {
    let mut stage = Stage {
        view,
        operation_id,
        started: Instant::now(),
    };
    stage.event(StageStatus::Started, None, None, None);
    let result = prepare(agent, vm, options, &mut stage).await;
    match &result {
        Ok(prepared) => {
            let seconds = stage.started.elapsed().as_secs_f64().max(0.001);
            let mut message = format!(
                "{} files, {:.1} MiB, {:.0} MiB/s",
                prepared.files,
                mebibytes(prepared.bytes),
                mebibytes(prepared.bytes) / seconds
            );
            if !prepared.skipped.is_empty() {
                message.push_str(&format!(
                    ", {} special files skipped",
                    prepared.skipped.len()
                ));
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
    result
}

async fn connect(socket: &Path, vm: &str) -> anyhow::Result<AgentClient> {
    Ok(Client::connect(socket).await?.agent(vm).await?)
}

async fn prepare_command(
    socket: &Path,
    printer: Printer,
    args: WorkspacePrepareArgs,
) -> anyhow::Result<()> {
    let agent = connect(socket, &args.name.vm).await?;
    let options = PrepareOptions {
        source: args.path.as_deref(),
        dest: &args.dest,
        user: &args.user,
        force: args.force,
        include_ignored: args.include_ignored,
        no_git: args.no_git,
    };
    let mut view = StageView::new(printer, false);
    let prepared = prepare_stage(&agent, &args.name.vm, &options, &mut view, "").await;
    view.clear();
    // The stage line already said it; the error line says it again with its hint.
    let prepared = prepared.context("Workspace not prepared")?;
    for path in &prepared.skipped {
        printer.message(&format!(
            "skipped {} (not a file, directory or symlink)",
            path.display()
        ));
    }
    let base = match prepared.base.as_deref() {
        None => "no git".to_owned(),
        Some("none") => "no commit yet".to_owned(),
        Some(base) => format!("base {}", short(base)),
    };
    printer.message(&format!(
        "Prepared {}:{} from {} ({base})",
        args.name.vm,
        check_dest(&args.dest)?,
        prepared.source.display()
    ));
    Ok(())
}

/// The `workspace` stage of `vm create --workspace`, once the VM runs.
pub(crate) async fn create_stage(
    socket: &Path,
    view: &mut StageView,
    operation_id: &str,
    vm: &Vm,
    path: &Path,
    dest: &str,
) -> anyhow::Result<()> {
    if vm.state != VmState::Running {
        return Ok(());
    }
    let retry = format!(
        "the VM is running; retry with `banger vm workspace prepare {} {}`",
        vm.name,
        path.display()
    );
    let agent = connect(socket, &vm.name).await.hint(retry.clone())?;
    let options = PrepareOptions {
        source: Some(path),
        dest,
        user: "root",
        force: false,
        include_ignored: false,
        no_git: false,
    };
    prepare_stage(&agent, &vm.name, &options, view, operation_id)
        .await
        .map(|_| ())
        .context("Workspace not prepared")
        .hint(retry)
}

// ---- export ----

/// Runs in the guest's workspace directory. `$1` is the mode: `base` prints
/// the base; `patch` prints the patch; `commit` prints `commit SHA` and, when
/// the host needs objects, `bundle PATH` and `ref REF`. Exit 3: no workspace.
const EXPORT_SCRIPT: &str = r#"set -eu
mode=$1
command -v git >/dev/null 2>&1 || { echo "git is not installed in the VM" >&2; exit 127; }
[ -f .git/banger-workspace-base ] || { echo "no workspace here" >&2; exit 3; }
base=$(cat .git/banger-workspace-base)
if [ "$mode" = base ]; then printf '%s\n' "$base"; exit 0; fi
gitdir=$(git rev-parse --absolute-git-dir)
index=$(mktemp "$gitdir/banger-export-index.XXXXXX")
ref=refs/banger-export/${index##*.}
bundle=
bundled=
cleanup() {
  rm -f -- "$index" "$index.lock"
  git update-ref -d "$ref" >/dev/null 2>&1 || true
  if [ -n "$bundle" ] && [ -z "$bundled" ]; then rm -f -- "$bundle"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# A copy of the real index: same entries, and git add only rehashes what changed.
if [ -f "$gitdir/index" ]; then cp -- "$gitdir/index" "$index"; else rm -f -- "$index"; fi
GIT_INDEX_FILE=$index git add -A
tree=$(GIT_INDEX_FILE=$index git write-tree)
if [ "$base" = none ]; then from=$(git hash-object -t tree /dev/null); else from=$base; fi
case $mode in
patch)
  git diff --binary --full-index --no-color --no-ext-diff --no-textconv \
    --src-prefix=a/ --dst-prefix=b/ -M "$from" "$tree"
  ;;
commit)
  head=$(git rev-parse -q --verify 'HEAD^{commit}' || true)
  if [ -n "$head" ] && [ "$(git rev-parse "$head^{tree}")" = "$tree" ]; then
    commit=$head
  else
    if ! git config user.name >/dev/null; then
      GIT_AUTHOR_NAME=$BANGER_GIT_NAME GIT_COMMITTER_NAME=$BANGER_GIT_NAME
      export GIT_AUTHOR_NAME GIT_COMMITTER_NAME
    fi
    if ! git config user.email >/dev/null; then
      GIT_AUTHOR_EMAIL=$BANGER_GIT_EMAIL GIT_COMMITTER_EMAIL=$BANGER_GIT_EMAIL
      export GIT_AUTHOR_EMAIL GIT_COMMITTER_EMAIL
    fi
    commit=$(git commit-tree ${head:+-p "$head"} -m "$2" "$tree")
  fi
  echo "commit $commit"
  # The host has the base and all its history already.
  if [ "$base" != none ] && git merge-base --is-ancestor "$commit" "$base"; then exit 0; fi
  bundle=$(mktemp "$gitdir/banger-export-bundle.XXXXXX")
  git update-ref "$ref" "$commit"
  if [ "$base" = none ]; then
    git bundle create -q "$bundle" "$ref"
  else
    git bundle create -q "$bundle" "$ref" "^$base"
  fi
  bundled=1
  echo "bundle $bundle"
  echo "ref $ref"
  ;;
esac"#;

fn export_request(
    dest: &str,
    user: &str,
    mode: &str,
    message: &str,
    env: Vec<(String, String)>,
) -> ExecRequest {
    ExecRequest {
        argv: shell(EXPORT_SCRIPT, &[mode, message]),
        env,
        cwd: Some(dest.to_owned()),
        user: Some(user.to_owned()),
        pty: None,
    }
}

fn export_failure(vm: &str, dest: &str, output: &ExecOutput) -> anyhow::Error {
    match output.status.code {
        Some(3) => hinted(
            anyhow!("VM `{vm}` has no workspace at {dest} ({BASE_FILE} is missing)"),
            "make one with `banger vm workspace prepare` (not with --no-git)",
        ),
        _ => anyhow!("Export in VM `{vm}` failed: {}", one_line(&output.stderr)),
    }
}

async fn export_command(
    socket: &Path,
    printer: Printer,
    args: WorkspaceExportArgs,
) -> anyhow::Result<()> {
    let dest = check_dest(&args.dest)?;
    let vm = args.name.vm.clone();
    match (&args.patch, &args.branch) {
        (Some(file), None) => {
            if file.exists() && !args.force {
                return Err(hinted(
                    anyhow!("{} already exists", file.display()),
                    "`--force` replaces it",
                ));
            }
            let agent = connect(socket, &vm).await?;
            let written = export_patch(&agent, &vm, &dest, &args.user, file).await?;
            if written == 0 {
                printer.message(&format!(
                    "No changes in {vm}:{dest} since its base; {} is empty",
                    file.display()
                ));
            } else {
                printer.message(&format!(
                    "Wrote {} ({written} bytes): the changes in {vm}:{dest} since its base",
                    file.display()
                ));
            }
            Ok(())
        }
        (None, Some(branch)) => {
            let repo = find_repo(
                args.path.as_deref(),
                "run it in the host repository, or pass its path; `--patch FILE` needs none",
            )?;
            check_branch(&repo, branch, args.force)?;
            let agent = connect(socket, &vm).await?;
            let (commit, base) =
                export_branch(&agent, &vm, &dest, &args.user, &repo, branch, args.force).await?;
            let count = match base.as_str() {
                "none" => trimmed(&git_stdout(&repo.top, &["rev-list", "--count", &commit])?),
                base => trimmed(&git_stdout(
                    &repo.top,
                    &["rev-list", "--count", &format!("{base}..{commit}")],
                )?),
            };
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
        _ => {
            Err(UsageError("Pass exactly one of --patch FILE and --branch NAME".to_owned()).into())
        }
    }
}

/// Streams the guest's patch into `file` (through a temporary file beside
/// it, renamed at the end); returns its size.
async fn export_patch(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    file: &Path,
) -> anyhow::Result<u64> {
    let name = file
        .file_name()
        .ok_or_else(|| anyhow!("`{}` is not a file name", file.display()))?;
    let partial = file.with_file_name(format!(
        ".{}.banger-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_patch(agent, vm, dest, user, &partial).await;
    let renamed = result.and_then(|size| {
        std::fs::rename(&partial, file)
            .map(|()| size)
            .with_context(|| format!("Cannot write {}", file.display()))
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    renamed
}

async fn write_patch(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    partial: &Path,
) -> anyhow::Result<u64> {
    let mut out = tokio::fs::File::create(partial)
        .await
        .with_context(|| format!("Cannot create {}", partial.display()))?;
    let session = agent
        .exec(export_request(dest, user, "patch", "", Vec::new()))
        .await
        .map_err(|error| super::guest::agent_error(vm, error))?;
    let banger_agent::client::ExecSession {
        mut stdin,
        mut stdout,
        mut stderr,
        exit,
        ..
    } = session;
    stdin.close();
    let copy = async {
        let mut size = 0_u64;
        while let Some(chunk) = stdout.recv().await {
            out.write_all(&chunk).await?;
            size += chunk.len() as u64;
        }
        out.flush().await?;
        out.sync_all().await?;
        Ok::<u64, io::Error>(size)
    };
    let (written, errors) = tokio::join!(copy, stderr.read_to_end());
    let status = exit
        .wait()
        .await
        .map_err(|error| super::guest::agent_error(vm, error))?;
    let output = ExecOutput {
        stdout: Vec::new(),
        stderr: errors,
        status,
    };
    if status.code != Some(0) {
        return Err(export_failure(vm, dest, &output));
    }
    written.with_context(|| format!("Cannot write {}", partial.display()))
}

/// Refuses an invalid, existing (without `force`) or checked-out branch.
fn check_branch(repo: &HostRepo, branch: &str, force: bool) -> anyhow::Result<()> {
    let reference = format!("refs/heads/{branch}");
    let valid = !branch.starts_with('-')
        && run_git(&repo.top, &["check-ref-format", &reference])?
            .status
            .success();
    if !valid {
        return Err(anyhow!("`{branch}` is not a valid branch name"));
    }
    let exists = run_git(&repo.top, &["rev-parse", "-q", "--verify", &reference])?
        .status
        .success();
    if exists && !force {
        return Err(hinted(
            anyhow!("Branch `{branch}` already exists in {}", repo.top.display()),
            "`--force` replaces it, or pick another name",
        ));
    }
    // Also an unborn one: making it would change what HEAD shows.
    let worktrees = git_stdout(&repo.top, &["worktree", "list", "--porcelain"])?;
    let checked_out = String::from_utf8_lossy(&worktrees)
        .lines()
        .any(|line| line.strip_prefix("branch ") == Some(reference.as_str()));
    if checked_out {
        return Err(hinted(
            anyhow!(
                "Branch `{branch}` is checked out in {}; export would change its working tree",
                repo.top.display()
            ),
            "export to another branch name",
        ));
    }
    Ok(())
}

fn git_identity(repo: &Path) -> Vec<(String, String)> {
    let value = |key: &str, fallback: &str| {
        run_git(repo, &["config", key])
            .ok()
            .filter(|output| output.status.success())
            .map(|output| trimmed(&output.stdout))
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| fallback.to_owned())
    };
    vec![
        ("BANGER_GIT_NAME".to_owned(), value("user.name", "banger")),
        (
            "BANGER_GIT_EMAIL".to_owned(),
            value("user.email", "banger@localhost"),
        ),
    ]
}

/// Makes the branch; returns its commit and the workspace's base.
async fn export_branch(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    repo: &HostRepo,
    branch: &str,
    force: bool,
) -> anyhow::Result<(String, String)> {
    let output = guest_exec(
        agent,
        vm,
        export_request(dest, user, "base", "", Vec::new()),
    )
    .await?;
    if output.status.code != Some(0) {
        return Err(export_failure(vm, dest, &output));
    }
    let base = trimmed(&output.stdout);
    if base != "none" {
        let known = run_git(
            &repo.top,
            &["cat-file", "-e", &format!("{base}^{{commit}}")],
        )?
        .status
        .success();
        if !known {
            return Err(hinted(
                anyhow!(
                    "The host repository {} does not have the workspace's base commit {base}",
                    repo.top.display()
                ),
                "the workspace was prepared from another repository, or that commit is gone; `--patch FILE` needs no host repository",
            ));
        }
    }
    let message = format!("Uncommitted changes in {vm}:{dest}");
    let output = guest_exec(
        agent,
        vm,
        export_request(dest, user, "commit", &message, git_identity(&repo.top)),
    )
    .await?;
    if output.status.code != Some(0) {
        return Err(export_failure(vm, dest, &output));
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key).map(|rest| rest.trim().to_owned()))
    };
    let commit =
        field("commit ").ok_or_else(|| anyhow!("Export in VM `{vm}` printed no commit"))?;
    if let Some(bundle) = field("bundle ") {
        let fetched = fetch_bundle(agent, vm, repo, &bundle).await;
        // The bundle is the guest's only leftover.
        let removed = guest_exec(
            agent,
            vm,
            ExecRequest {
                argv: vec!["rm".into(), "-f".into(), "--".into(), bundle.clone()],
                ..ExecRequest::default()
            },
        )
        .await;
        fetched?;
        removed?;
    }
    let command = if force { "update" } else { "create" };
    let mut child = git(&repo.top)
        .args(["update-ref", "--stdin", "-m", "banger workspace export"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("Cannot run git")?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, "{command} refs/heads/{branch} {commit}");
    }
    let output = child.wait_with_output().context("Cannot run git")?;
    if !output.status.success() {
        return Err(anyhow!(
            "Cannot create branch `{branch}`: {}",
            one_line(&output.stderr)
        ));
    }
    Ok((commit, base))
}

/// Copies the guest's bundle out into a scratch directory in the host's git
/// directory and unbundles it (objects only; no ref changes).
async fn fetch_bundle(
    agent: &AgentClient,
    vm: &str,
    repo: &HostRepo,
    bundle: &str,
) -> anyhow::Result<()> {
    let scratch = repo.git_dir.join(format!(
        "banger-export-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&scratch)
        .with_context(|| format!("Cannot create {}", scratch.display()))?;
    let result = async {
        let stream = agent
            .copy_out(bundle)
            .await
            .map_err(|error| super::guest::agent_error(vm, error))?;
        let target = scratch.clone();
        tokio::task::spawn_blocking(move || {
            let reader = tokio_util::io::SyncIoBridge::new(stream);
            banger_agent::files::unpack(reader, &target)
        })
        .await
        .context("Unpacking task failed")?
        .with_context(|| format!("Copy of the bundle from VM `{vm}` failed"))?;
        let name = Path::new(bundle)
            .file_name()
            .ok_or_else(|| anyhow!("Bad bundle path `{bundle}`"))?;
        let file = scratch.join(name);
        let file = file
            .to_str()
            .ok_or_else(|| anyhow!("Bundle path {} is not UTF-8", file.display()))?;
        git_stdout(&repo.top, &["bundle", "unbundle", file]).map(|_| ())
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_must_be_absolute_and_below_root() {
        assert_eq!(check_dest("/root/repo/").unwrap(), "/root/repo");
        assert!(check_dest("/").is_err());
        assert!(check_dest("relative").is_err());
        assert!(check_dest("/root/../etc").is_err());
    }

    #[test]
    fn git_messages_fit_one_line() {
        assert_eq!(
            one_line(b"fatal: bad thing\nhint: try this\n\nerror: more\n"),
            "fatal: bad thing; error: more"
        );
        assert_eq!(one_line(b""), "no message");
    }
}
