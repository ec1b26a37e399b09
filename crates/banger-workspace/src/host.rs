//! The host side of a workspace. The CLI runs it, as the user who owns the
//! repository: the daemon never opens these files.
//!
//! Prepare:
//! 1. [`find_repo`]: PATH (default: the current directory) up to its git top
//!    level; its HEAD is the base commit (`none` on an unborn branch).
//! 2. [`Plan::list`]: what to send. `git ls-files -z --cached --others
//!    --exclude-standard` (tracked files with their working-tree content,
//!    untracked files that are not ignored), the same in every nested
//!    checkout (submodules, whose `.git` files point into `.git/modules`),
//!    and everything under `.git`. Symlinks the guest's unpacker refuses
//!    (absolute, or leaving the destination) are set aside as links to make
//!    afterwards.
//! 3. [`upload`]: one tar, built by a blocking task writing through
//!    `SyncIoBridge`, sent as `Data` frames, then the links in the `End`
//!    frame; the daemon's answer is the last frame read.
//!
//! Export:
//! 1. [`receive_patch`] writes the patch the daemon streams into a file
//!    (through a temporary file beside it, renamed at the end).
//! 2. [`check_branch`] refuses an invalid, existing (without `force`) or
//!    checked-out branch before anything runs in the guest;
//!    [`receive_branch`] stores the bundle in a scratch directory of the
//!    host's git directory, checks the host has the base, `git bundle
//!    unbundle`s it (objects only) and creates the branch with `update-ref`
//!    (`create`, so a branch made meanwhile is not overwritten). The host's
//!    working tree, index and HEAD are not touched.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use banger_proto::workspace::{
    UploadTrailer, WorkspaceExported, WorkspaceLink, WorkspacePrepared, BASE_FILE,
};
use banger_proto::RpcError;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::stream::{self, Frame, StreamError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("Cannot read the current directory")]
    CurrentDir(#[source] io::Error),
    #[error("`{}` is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("`{}` does not name a file", path.display())]
    NotAFile { path: PathBuf },
    #[error("`{}` is not in a git working tree", path.display())]
    NotAWorkTree { path: PathBuf },
    #[error("{} keeps its git directory elsewhere ({}): linked worktrees and submodule checkouts cannot be sent on their own", top.display(), git_dir.display())]
    ExternalGitDir { top: PathBuf, git_dir: PathBuf },
    #[error("`git rev-parse` gave no top level for {}", path.display())]
    NoTopLevel { path: PathBuf },
    #[error("Cannot run git")]
    RunGit(#[source] io::Error),
    #[error("`git {args}` failed in {}: {message}", dir.display())]
    Git {
        args: String,
        dir: PathBuf,
        message: String,
    },
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot pack {}", path.display())]
    Pack {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("A background task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("The stream to or from the daemon failed")]
    Stream(#[source] StreamError),
    #[error("Sending to the daemon failed")]
    Send(#[source] io::Error),
    /// The daemon gave up; its error (message, kind, hint) as it sent it.
    #[error("{}", .0.message)]
    Daemon(RpcError),
    #[error("`{branch}` is not a valid branch name")]
    InvalidBranch { branch: String },
    #[error("Branch `{branch}` already exists in {}", repo.display())]
    BranchExists { branch: String, repo: PathBuf },
    #[error("Branch `{branch}` is checked out in {}; export would change its working tree", repo.display())]
    BranchCheckedOut { branch: String, repo: PathBuf },
    #[error("The host repository {} does not have the workspace's base commit {base}", repo.display())]
    MissingBase { repo: PathBuf, base: String },
    #[error("The daemon sent no commit or base for the branch")]
    NoCommit,
    #[error("Cannot create branch `{branch}`: {message}")]
    UpdateRef { branch: String, message: String },
}

impl HostError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            Self::RunGit(_) => "install git (apt install git)",
            Self::ExternalGitDir { .. } => "prepare the main repository, whose .git is a directory",
            Self::BranchExists { .. } => "`--force` replaces it, or pick another name",
            Self::BranchCheckedOut { .. } => "export to another branch name",
            Self::MissingBase { .. } => "the workspace was prepared from another repository, or that commit is gone; `--patch FILE` needs no host repository",
            Self::NotADirectory { .. } => "pass the repository's directory",
            Self::InvalidBranch { .. } => "pick a name `git check-ref-format --branch NAME` accepts",
            Self::Read { .. } => "check that you can read it",
            Self::Write { .. } => "check that you can write there",
            Self::Daemon(error) => return error.hint().map(str::to_owned),
            _ => return None,
        };
        Some(hint.to_owned())
    }
}

/// Git's complaint on one line.
fn one_line(stderr: &[u8]) -> String {
    crate::guest::one_line(stderr)
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

fn run_git(dir: &Path, args: &[&str]) -> Result<std::process::Output, HostError> {
    git(dir).args(args).output().map_err(HostError::RunGit)
}

/// Runs git in `dir`; its stdout, or an error quoting git.
fn git_stdout(dir: &Path, args: &[&str]) -> Result<Vec<u8>, HostError> {
    let output = run_git(dir, args)?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(HostError::Git {
            args: args.join(" "),
            dir: dir.to_owned(),
            message: one_line(&output.stderr),
        })
    }
}

fn trimmed(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

fn current_dir_or(start: Option<&Path>) -> Result<PathBuf, HostError> {
    let start = match start {
        Some(path) => path.to_owned(),
        None => std::env::current_dir().map_err(HostError::CurrentDir)?,
    };
    if start.is_dir() {
        Ok(start)
    } else {
        Err(HostError::NotADirectory { path: start })
    }
}

/// A host git repository's working tree and git directory.
#[derive(Debug, Clone)]
pub struct HostRepo {
    pub top: PathBuf,
    pub git_dir: PathBuf,
}

/// The repository holding `start` (default: the current directory).
pub fn find_repo(start: Option<&Path>) -> Result<HostRepo, HostError> {
    let start = current_dir_or(start)?;
    let output = run_git(
        &start,
        &["rev-parse", "--show-toplevel", "--absolute-git-dir"],
    )?;
    if !output.status.success() {
        return Err(HostError::NotAWorkTree { path: start });
    }
    let mut lines = output
        .stdout
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| PathBuf::from(OsStr::from_bytes(line)));
    let (Some(top), Some(git_dir)) = (lines.next(), lines.next()) else {
        return Err(HostError::NoTopLevel { path: start });
    };
    let dot_git = top.join(".git");
    let same = dot_git.is_dir()
        && std::fs::canonicalize(&dot_git).ok() == std::fs::canonicalize(&git_dir).ok();
    if !same {
        return Err(HostError::ExternalGitDir { top, git_dir });
    }
    Ok(HostRepo { top, git_dir })
}

/// The commit HEAD points to; `None` on an unborn branch.
pub fn head_commit(repo: &Path) -> Result<Option<String>, HostError> {
    let output = run_git(repo, &["rev-parse", "-q", "--verify", "HEAD^{commit}"])?;
    Ok(output
        .status
        .success()
        .then(|| trimmed(&output.stdout))
        .filter(|commit| !commit.is_empty()))
}

/// One file, symlink or directory of the tar, in the order sent.
#[derive(Debug)]
struct Item {
    path: PathBuf,
    /// Its name in the archive, relative to DEST.
    name: PathBuf,
    /// Bytes of content (regular files).
    size: u64,
    /// Bytes of the link target (symlinks).
    link_len: usize,
}

/// What prepare sends.
#[derive(Debug, Default)]
pub struct Plan {
    /// The directory sent: the repository's top level, or the plain directory.
    pub source: PathBuf,
    /// `None` with `no_git`; `Some("none")` for an unborn branch.
    pub base: Option<String>,
    items: Vec<Item>,
    /// Bytes of file content.
    pub bytes: u64,
    /// Symlinks made in the guest after the tar.
    pub links: Vec<WorkspaceLink>,
    /// Special files (sockets, FIFOs, devices) and unrepresentable names.
    pub skipped: Vec<PathBuf>,
}

impl Plan {
    /// Lists what to send (blocking: runs git and walks the tree). With
    /// `no_git`, `source` is any directory, sent whole.
    pub fn list(
        source: Option<&Path>,
        include_ignored: bool,
        no_git: bool,
    ) -> Result<Self, HostError> {
        if no_git {
            let source = current_dir_or(source)?;
            let mut plan = Self {
                source,
                ..Self::default()
            };
            let root = plan.source.clone();
            plan.add_tree(&root, Path::new(""))?;
            return Ok(plan);
        }
        let repo = find_repo(source)?;
        let mut plan = Self {
            base: Some(head_commit(&repo.top)?.unwrap_or_else(|| "none".to_owned())),
            source: repo.top.clone(),
            ..Self::default()
        };
        plan.add_checkout(&repo.top, Path::new(""), include_ignored)?;
        plan.add_tree(&repo.top, Path::new(".git"))?;
        Ok(plan)
    }

    /// Files, directories and symlinks in the tar.
    pub fn entries(&self) -> u64 {
        self.items.len() as u64
    }

    /// About how many bytes the tar has: a header per entry, GNU long-name
    /// records for long names and link targets, content padded to 512, and
    /// the two closing blocks.
    pub fn tar_size(&self) -> u64 {
        let padded = |bytes: u64| bytes.div_ceil(512) * 512;
        let long = |bytes: usize| {
            if bytes > 100 {
                512 + padded(bytes as u64 + 1)
            } else {
                0
            }
        };
        self.items
            .iter()
            .map(|item| {
                512 + padded(item.size) + long(item.name.as_os_str().len()) + long(item.link_len)
            })
            .sum::<u64>()
            + 1024
    }

    /// Adds `name` (relative to `root`) as it is on disk; a missing path (a
    /// tracked file deleted in the working tree) is not an error.
    fn add(&mut self, root: &Path, name: &Path) -> Result<Option<std::fs::FileType>, HostError> {
        let path = root.join(name);
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HostError::Read { path, source }),
        };
        let file_type = metadata.file_type();
        let mut link_len = 0;
        if file_type.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|source| HostError::Read {
                path: path.clone(),
                source,
            })?;
            if !banger_agent_proto::files::symlink_resolves_inside(root, name, &target) {
                // The agent refuses links out of DEST (resolved against the
                // tree, as here against the same tree on disk); they are
                // made afterwards.
                match (target.to_str(), name.to_str()) {
                    (Some(target), Some(name)) => self.links.push(WorkspaceLink {
                        target: target.to_owned(),
                        name: name.to_owned(),
                    }),
                    _ => self.skipped.push(name.to_owned()),
                }
                return Ok(Some(file_type));
            }
            link_len = target.as_os_str().len();
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
                link_len,
            });
        }
        Ok(Some(file_type))
    }

    /// Adds `name` and, for a directory, everything below it.
    fn add_tree(&mut self, root: &Path, name: &Path) -> Result<(), HostError> {
        if !self.add(root, name)?.is_some_and(|kind| kind.is_dir()) {
            return Ok(());
        }
        let dir = root.join(name);
        let unreadable = |source| HostError::Read {
            path: dir.clone(),
            source,
        };
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(unreadable)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<_, _>>()
            .map_err(unreadable)?;
        children.sort();
        for child in children {
            let child = name.join(child);
            // Written fresh by the guest at the end.
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
    ) -> Result<(), HostError> {
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
#[derive(Debug, Default)]
pub struct Counters {
    pub entries: AtomicU64,
    /// Bytes of file content.
    pub bytes: AtomicU64,
}

/// Writes the items as one tar.
fn pack(items: &[Item], writer: impl io::Write, counters: &Counters) -> Result<(), HostError> {
    let closed = |source: io::Error| HostError::Send(source);
    // Each write into the bridge is a trip into the runtime: batch the
    // headers, small files and padding.
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(256 * 1024, writer));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    for item in items {
        builder
            .append_path_with_name(&item.path, &item.name)
            .map_err(|source| {
                // The reading end went away: that is not this file's fault.
                if source.kind() == io::ErrorKind::BrokenPipe {
                    HostError::Send(source)
                } else {
                    HostError::Pack {
                        path: item.path.clone(),
                        source,
                    }
                }
            })?;
        counters.entries.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(item.size, Ordering::Relaxed);
    }
    builder
        .into_inner()
        .map_err(closed)?
        .flush()
        .map_err(closed)
}

/// Sends `plan` as an upload on a connection whose `vm.workspace.prepare`
/// or `vm.workspace.upload` call was answered, and returns the daemon's
/// result. The daemon may answer early (the guest refused the tar): its
/// answer wins over the broken upload it causes.
pub async fn upload<R, W>(
    plan: Plan,
    mut reader: R,
    mut writer: W,
    counters: Arc<Counters>,
) -> Result<WorkspacePrepared, HostError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Plan {
        items,
        links,
        skipped,
        ..
    } = plan;
    let (mut pipe, pipe_writer) = tokio::io::duplex(1024 * 1024);
    let packer = tokio::task::spawn_blocking(move || {
        let writer = tokio_util::io::SyncIoBridge::new(pipe_writer);
        pack(&items, writer, &counters)
    });
    let send = async {
        let sent = stream::copy_as_data(&mut pipe, &mut writer, |_| {}).await;
        // The packer ends once the pipe is read to its end or dropped.
        drop(pipe);
        let packed = packer.await.map_err(HostError::Task)?;
        match (packed, sent) {
            (Err(error @ HostError::Pack { .. }), _) => {
                // Tell the daemon why, so the guest side stops too.
                let rpc = RpcError::new(banger_proto::ErrorKind::Failed, chain(&error));
                let _ = stream::write_error(&mut writer, &rpc).await;
                Err(error)
            }
            (Err(error), _) => Err(error),
            (Ok(()), Err(error)) => Err(HostError::Send(error)),
            (Ok(()), Ok(_)) => {
                let trailer = UploadTrailer {
                    links,
                    skipped: skipped.len() as u64,
                };
                stream::write_end(&mut writer, &trailer)
                    .await
                    .map_err(HostError::Send)
            }
        }
    };
    let answer = stream::read_frame(&mut reader);
    tokio::pin!(answer);
    let sent = tokio::select! {
        sent = send => sent,
        answer = &mut answer => return prepared(answer),
    };
    match sent {
        Ok(()) => prepared(answer.await),
        // The daemon's reason, if it gave one, says more than a broken pipe.
        Err(error @ (HostError::Send(_) | HostError::Task(_))) => match answer.await {
            Ok(Some(Frame::Error(rpc))) => Err(HostError::Daemon(rpc)),
            _ => Err(error),
        },
        Err(error) => Err(error),
    }
}

fn prepared(answer: Result<Option<Frame>, StreamError>) -> Result<WorkspacePrepared, HostError> {
    answer
        .map_err(HostError::Stream)?
        .ok_or(HostError::Stream(StreamError::Ended))?
        .decode_end()
        .map_err(HostError::Stream)?
        .map_err(HostError::Daemon)
}

/// The error and its causes on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads `Data` frames into `out` until the closing frame; returns it.
async fn receive<R, W>(
    reader: &mut R,
    out: &mut W,
    path: &Path,
) -> Result<WorkspaceExported, HostError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let write_error = |source| HostError::Write {
        path: path.to_owned(),
        source,
    };
    loop {
        match stream::read_frame(reader)
            .await
            .map_err(HostError::Stream)?
        {
            Some(Frame::Data(bytes)) => out.write_all(&bytes).await.map_err(write_error)?,
            Some(frame) => {
                out.flush().await.map_err(write_error)?;
                return frame
                    .decode_end()
                    .map_err(HostError::Stream)?
                    .map_err(HostError::Daemon);
            }
            None => return Err(HostError::Stream(StreamError::Ended)),
        }
    }
}

/// Writes the patch the daemon streams into `file`, through a temporary
/// file beside it renamed at the end (removed on failure).
pub async fn receive_patch<R: AsyncRead + Unpin>(
    mut reader: R,
    file: &Path,
) -> Result<WorkspaceExported, HostError> {
    let name = file.file_name().ok_or_else(|| HostError::NotAFile {
        path: file.to_owned(),
    })?;
    let partial = file.with_file_name(format!(
        ".{}.banger-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut created = false;
    let result = async {
        // A new file: never through a link someone left at that name.
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .await
            .map_err(|source| HostError::Write {
                path: partial.clone(),
                source,
            })?;
        created = true;
        let exported = receive(&mut reader, &mut out, &partial).await?;
        out.sync_all().await.map_err(|source| HostError::Write {
            path: partial.clone(),
            source,
        })?;
        std::fs::rename(&partial, file).map_err(|source| HostError::Write {
            path: file.to_owned(),
            source,
        })?;
        Ok(exported)
    }
    .await;
    if result.is_err() && created {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Refuses an invalid, existing (without `force`) or checked-out branch.
pub fn check_branch(repo: &HostRepo, branch: &str, force: bool) -> Result<(), HostError> {
    let reference = format!("refs/heads/{branch}");
    let valid = !branch.starts_with('-')
        && run_git(&repo.top, &["check-ref-format", &reference])?
            .status
            .success();
    if !valid {
        return Err(HostError::InvalidBranch {
            branch: branch.to_owned(),
        });
    }
    let exists = run_git(&repo.top, &["rev-parse", "-q", "--verify", &reference])?
        .status
        .success();
    if exists && !force {
        return Err(HostError::BranchExists {
            branch: branch.to_owned(),
            repo: repo.top.clone(),
        });
    }
    // Also an unborn one: making it would change what HEAD shows.
    let worktrees = git_stdout(&repo.top, &["worktree", "list", "--porcelain"])?;
    let checked_out = String::from_utf8_lossy(&worktrees)
        .lines()
        .any(|line| line.strip_prefix("branch ") == Some(reference.as_str()));
    if checked_out {
        return Err(HostError::BranchCheckedOut {
            branch: branch.to_owned(),
            repo: repo.top.clone(),
        });
    }
    Ok(())
}

/// The host repository's git identity (for the guest's commit when the
/// guest has none), with banger's fallbacks.
pub fn git_identity(repo: &Path) -> (String, String) {
    let value = |key: &str, fallback: &str| {
        run_git(repo, &["config", key])
            .ok()
            .filter(|output| output.status.success())
            .map(|output| trimmed(&output.stdout))
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| fallback.to_owned())
    };
    (
        value("user.name", "banger"),
        value("user.email", "banger@localhost"),
    )
}

/// Commits from `base` (or from nothing, for `none`) to `commit`.
pub fn count_commits(repo: &HostRepo, base: &str, commit: &str) -> Result<String, HostError> {
    let range = match base {
        "none" => commit.to_owned(),
        base => format!("{base}..{commit}"),
    };
    Ok(trimmed(&git_stdout(
        &repo.top,
        &["rev-list", "--count", &range],
    )?))
}

/// Stores the bundle the daemon streams, then makes `branch` from it (see
/// the module docs); returns the daemon's result. The scratch directory is
/// removed whatever happens.
pub async fn receive_branch<R: AsyncRead + Unpin>(
    mut reader: R,
    repo: &HostRepo,
    branch: &str,
    force: bool,
) -> Result<WorkspaceExported, HostError> {
    let scratch = repo.git_dir.join(format!(
        "banger-export-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&scratch).map_err(|source| HostError::Write {
        path: scratch.clone(),
        source,
    })?;
    let bundle = scratch.join("export.bundle");
    let result = async {
        let mut out =
            tokio::fs::File::create(&bundle)
                .await
                .map_err(|source| HostError::Write {
                    path: bundle.clone(),
                    source,
                })?;
        let exported = receive(&mut reader, &mut out, &bundle).await?;
        drop(out);
        let (Some(commit), Some(base)) = (&exported.commit, &exported.base) else {
            return Err(HostError::NoCommit);
        };
        if base != "none" {
            let known = run_git(
                &repo.top,
                &["cat-file", "-e", &format!("{base}^{{commit}}")],
            )?
            .status
            .success();
            if !known {
                return Err(HostError::MissingBase {
                    repo: repo.top.clone(),
                    base: base.clone(),
                });
            }
        }
        if exported.bytes > 0 {
            unbundle(repo, &bundle)?;
        }
        update_ref(repo, branch, commit, force)?;
        Ok(exported)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Stores the bundle's objects in the repository (no ref changes).
fn unbundle(repo: &HostRepo, bundle: &Path) -> Result<(), HostError> {
    let output = git(&repo.top)
        .args(["bundle", "unbundle"])
        .arg(bundle)
        .output()
        .map_err(HostError::RunGit)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HostError::Git {
            args: format!("bundle unbundle {}", bundle.display()),
            dir: repo.top.clone(),
            message: one_line(&output.stderr),
        })
    }
}

fn update_ref(repo: &HostRepo, branch: &str, commit: &str, force: bool) -> Result<(), HostError> {
    let command = if force { "update" } else { "create" };
    let mut child = git(&repo.top)
        .args(["update-ref", "--stdin", "-m", "banger workspace export"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(HostError::RunGit)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, "{command} refs/heads/{branch} {commit}");
    }
    let output = child.wait_with_output().map_err(HostError::RunGit)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HostError::UpdateRef {
            branch: branch.to_owned(),
            message: one_line(&output.stderr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_in(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "a")
            .env("GIT_AUTHOR_EMAIL", "a@example.org")
            .env("GIT_COMMITTER_NAME", "a")
            .env("GIT_COMMITTER_EMAIL", "a@example.org")
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    #[test]
    fn a_plan_lists_what_git_lists_and_sets_links_aside() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("sub")).unwrap();
        git_in(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("tracked.txt"), "one\n").unwrap();
        std::fs::write(repo.join(".gitignore"), "*.log\n").unwrap();
        git_in(&repo, &["add", "."]);
        git_in(&repo, &["commit", "-q", "-m", "one"]);
        std::fs::write(repo.join("sub/untracked.txt"), "two\n").unwrap();
        std::fs::write(repo.join("noise.log"), "ignored\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", repo.join("absolute")).unwrap();
        std::os::unix::fs::symlink("tracked.txt", repo.join("relative")).unwrap();
        // Lexically inside, but `sub/up` is the root: the chain climbs out.
        std::os::unix::fs::symlink("..", repo.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("sub/up/..", repo.join("chain")).unwrap();
        // A stale base record is never sent: the guest writes its own.
        std::fs::write(repo.join(BASE_FILE), "stale\n").unwrap();

        let plan = Plan::list(Some(&repo.join("sub")), false, false).unwrap();
        assert_eq!(plan.source, repo);
        let base = plan.base.clone().unwrap();
        assert_eq!(base.len(), 40);
        let names: Vec<&Path> = plan.items.iter().map(|item| item.name.as_path()).collect();
        assert!(names.contains(&Path::new("tracked.txt")));
        assert!(names.contains(&Path::new("sub/untracked.txt")));
        assert!(names.contains(&Path::new("relative")));
        assert!(names.contains(&Path::new(".git/HEAD")));
        assert!(!names.contains(&Path::new("noise.log")));
        assert!(!names.contains(&Path::new(BASE_FILE)));
        let mut links = plan.links.clone();
        links.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            links,
            [
                WorkspaceLink {
                    target: "/etc/hostname".into(),
                    name: "absolute".into()
                },
                WorkspaceLink {
                    target: "sub/up/..".into(),
                    name: "chain".into()
                }
            ]
        );
        assert!(names.contains(&Path::new("sub/up")));
        assert!(plan.tar_size() > plan.bytes);

        let with_ignored = Plan::list(Some(&repo), true, false).unwrap();
        assert!(with_ignored
            .items
            .iter()
            .any(|item| item.name == Path::new("noise.log")));

        let plain = Plan::list(Some(&repo.join("sub")), false, true).unwrap();
        assert_eq!(plain.base, None);
        assert_eq!(plain.entries(), 1);
    }

    #[test]
    fn a_directory_outside_git_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = find_repo(Some(dir.path())).unwrap_err();
        assert!(matches!(error, HostError::NotAWorkTree { .. }), "{error}");
        let error = find_repo(Some(&dir.path().join("missing"))).unwrap_err();
        assert!(matches!(error, HostError::NotADirectory { .. }), "{error}");
    }

    #[test]
    fn tar_size_matches_the_packed_tar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("small"), "x").unwrap();
        std::fs::write(root.join("block"), vec![1_u8; 512]).unwrap();
        let deep = root.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("long-name.txt"), "y").unwrap();
        std::os::unix::fs::symlink("f".repeat(150), root.join("long-link")).unwrap();
        let plan = Plan::list(Some(root), false, true).unwrap();
        let mut tar = Vec::new();
        pack(&plan.items, &mut tar, &Counters::default()).unwrap();
        assert_eq!(plan.tar_size(), tar.len() as u64);
    }
}
