//! The guest side of a workspace, over a VM's [`AgentClient`]; the daemon
//! runs it. Nothing here touches the host's files.
//!
//! Prepare:
//! 1. [`check_spec`] and [`check_trailer`] refuse what a caller must not
//!    ask for (a destination outside `/`, a base that is not a commit id,
//!    links escaping the destination, more links than [`MAX_LINKS`]).
//! 2. [`claim_dest`]: refuse when DEST exists and is not an empty directory,
//!    unless `force`, which removes it first; refuse an unknown user.
//! 3. [`unpack`]: the tar into DEST through the agent's `copy_in`.
//! 4. [`finish_dest`]: the symlinks the agent refuses to unpack (absolute
//!    targets, or targets outside DEST), the base commit in [`BASE_FILE`],
//!    and `chown -R` for a user other than root.
//!
//! Export (git runs in the guest, where nothing changes but a temporary
//! index, a temporary ref and a temporary bundle, all removed):
//! 1. Read the base from [`BASE_FILE`].
//! 2. Make a tree of the guest's working state with a temporary index
//!    (`GIT_INDEX_FILE=TMP git add -A; git write-tree`), so untracked files
//!    that are not ignored count and the guest's own index is not touched.
//! 3. [`export_patch`]: `git diff --binary --full-index BASE TREE` on stdout.
//! 4. [`export_commit`]: a commit of TREE on top of the guest's HEAD
//!    (`commit-tree`; none when nothing is uncommitted), and whether the host
//!    needs objects for it; [`export_bundle`]: `BASE..commit` as a git
//!    bundle on stdout, made through a temporary ref.

use std::path::{Component, Path};

use banger_agent_proto::client::{AgentClient, ClientError, ExecOutput, OutputStream};
use banger_proto::agent::{ExecRequest, ExitStatus};
use banger_proto::workspace::{
    UploadTrailer, WorkspaceLink, WorkspaceSpec, BASE_FILE, MAX_LINKS, MAX_PATH_BYTES,
};
use bytes::Bytes;
use tokio::io::AsyncRead;

/// Longest user name, git identity or commit message accepted from a caller.
const MAX_TEXT_BYTES: usize = 1024;
/// Bytes of link arguments per `finish` exec, well under the kernel's
/// `ARG_MAX` (the whole argv) and `MAX_ARG_STRLEN` (one argument).
const FINISH_BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("Invalid workspace directory `{dest}`: it must be an absolute guest path below `/`, without `..`")]
    InvalidDest { dest: String },
    #[error("Invalid base commit `{base}`: it must be a commit id or `none`")]
    InvalidBase { base: String },
    #[error("Invalid {field}: {reason}")]
    InvalidText {
        field: &'static str,
        reason: &'static str,
    },
    #[error("Invalid symlink `{name}`: {reason}")]
    InvalidLink { name: String, reason: &'static str },
    #[error("Too many symlinks to make ({count}; at most {MAX_LINKS})")]
    TooManyLinks { count: usize },
    #[error("The guest agent of VM `{vm}` failed")]
    Agent {
        vm: String,
        #[source]
        source: ClientError,
    },
    #[error("VM `{vm}` already has files at {dest}")]
    DestHasFiles { vm: String, dest: String },
    #[error("VM `{vm}` already has a workspace at {dest}")]
    DestHasWorkspace { vm: String, dest: String },
    #[error("VM `{vm}` has no user `{user}`")]
    NoUser { vm: String, user: String },
    #[error("Cannot clear {dest} in VM `{vm}`: {message}")]
    Clear {
        vm: String,
        dest: String,
        message: String,
    },
    #[error("Cannot finish {dest} in VM `{vm}` (symlinks, base, owner): {message}")]
    Finish {
        vm: String,
        dest: String,
        message: String,
    },
    #[error("VM `{vm}` has no workspace at {dest} ({BASE_FILE} is missing)")]
    NoWorkspace { vm: String, dest: String },
    #[error("Export in VM `{vm}` failed: {message}")]
    Export { vm: String, message: String },
    #[error("Export in VM `{vm}` gave no {what}")]
    ExportOutput { vm: String, what: &'static str },
}

impl GuestError {
    fn agent(vm: &str, source: ClientError) -> Self {
        Self::Agent {
            vm: vm.to_owned(),
            source,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::DestHasFiles { .. } | Self::DestHasWorkspace { .. } => {
                Some("`--force` replaces it (everything there is removed first)")
            }
            Self::NoWorkspace { .. } => {
                Some("make one with `banger vm workspace prepare` (not with --no-git)")
            }
            Self::InvalidDest { .. } => Some("pass an absolute guest path such as /root/repo"),
            Self::NoUser { .. } => {
                Some("pass --user with a user the guest has, or add it in the guest first")
            }
            _ => None,
        }
    }

    /// Whether the caller asked for something invalid (as opposed to the
    /// guest failing).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::InvalidDest { .. }
                | Self::InvalidBase { .. }
                | Self::InvalidText { .. }
                | Self::InvalidLink { .. }
                | Self::TooManyLinks { .. }
        )
    }
}

/// A guest directory: absolute, no `..`, not `/`; trailing slashes dropped.
pub fn check_dest(dest: &str) -> Result<String, GuestError> {
    let trimmed = dest.trim_end_matches('/');
    let path = Path::new(trimmed);
    let valid = path.is_absolute()
        && path.components().count() > 1
        && trimmed.len() <= MAX_PATH_BYTES
        && !trimmed.contains('\0')
        && path
            .components()
            .all(|component| matches!(component, Component::RootDir | Component::Normal(_)));
    if valid {
        Ok(trimmed.to_owned())
    } else {
        Err(GuestError::InvalidDest {
            dest: dest.to_owned(),
        })
    }
}

/// Short text that goes into a guest command line: not empty, no NUL, not
/// an option, bounded.
fn check_text(field: &'static str, text: &str) -> Result<(), GuestError> {
    let reason = if text.is_empty() {
        "it is empty"
    } else if text.len() > MAX_TEXT_BYTES {
        "it is too long"
    } else if text.contains('\0') || text.contains('\n') {
        "it contains a NUL or newline"
    } else if text.starts_with('-') {
        "it starts with `-`"
    } else {
        return Ok(());
    };
    Err(GuestError::InvalidText { field, reason })
}

/// A commit id (40 or 64 hex digits, lowercase) or `none`.
fn check_base(base: &str) -> Result<(), GuestError> {
    let hex = matches!(base.len(), 40 | 64)
        && base
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    if hex || base == "none" {
        Ok(())
    } else {
        Err(GuestError::InvalidBase {
            base: base.chars().take(80).collect(),
        })
    }
}

/// Checks a caller's spec; returns it with DEST normalised.
pub fn check_spec(spec: &WorkspaceSpec) -> Result<WorkspaceSpec, GuestError> {
    let dest = check_dest(&spec.dest)?;
    check_text("user", &spec.user)?;
    if let Some(base) = &spec.base {
        check_base(base)?;
    }
    Ok(WorkspaceSpec {
        dest,
        user: spec.user.clone(),
        force: spec.force,
        base: spec.base.clone(),
    })
}

/// Checks the git identity a caller gives for an export's commit.
pub fn check_identity(name: Option<&str>, email: Option<&str>) -> Result<(), GuestError> {
    if let Some(name) = name {
        check_text("git user name", name)?;
    }
    if let Some(email) = email {
        check_text("git email", email)?;
    }
    Ok(())
}

/// Checks the links an upload's trailer asks for: bounded in number and
/// length, names relative and inside DEST, no NUL anywhere.
pub fn check_trailer(trailer: &UploadTrailer) -> Result<(), GuestError> {
    if trailer.links.len() > MAX_LINKS {
        return Err(GuestError::TooManyLinks {
            count: trailer.links.len(),
        });
    }
    for link in &trailer.links {
        check_link(link)?;
    }
    Ok(())
}

fn check_link(link: &WorkspaceLink) -> Result<(), GuestError> {
    let invalid = |reason| GuestError::InvalidLink {
        name: link.name.chars().take(200).collect(),
        reason,
    };
    if link.name.len() > MAX_PATH_BYTES || link.target.len() > MAX_PATH_BYTES {
        return Err(invalid("too long"));
    }
    if link.target.is_empty() || link.name.is_empty() {
        return Err(invalid("empty"));
    }
    if link.name.contains('\0') || link.target.contains('\0') {
        return Err(invalid("contains a NUL"));
    }
    let inside = Path::new(&link.name)
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    if !inside {
        return Err(invalid("its name must be relative, without `..`"));
    }
    Ok(())
}

/// `sh -c SCRIPT banger-workspace ARGS...`.
fn shell<S: AsRef<str>>(script: &str, args: &[S]) -> Vec<String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "banger-workspace".to_owned(),
    ];
    argv.extend(args.iter().map(|arg| arg.as_ref().to_owned()));
    argv
}

/// Git's (or a script's) complaint on one line.
pub fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("hint:"))
        .collect();
    if lines.is_empty() {
        "no message".to_owned()
    } else {
        banger_proto::sanitize::one_line(&lines.join("; "))
    }
}

/// A command in the guest with its output collected.
async fn exec(
    agent: &AgentClient,
    vm: &str,
    request: ExecRequest,
) -> Result<ExecOutput, GuestError> {
    agent
        .exec(request)
        .await
        .map_err(|error| GuestError::agent(vm, error))?
        .output()
        .await
        .map_err(|error| GuestError::agent(vm, error))
}

/// Refuses a non-empty DEST (removes it with `force`) and checks the user.
pub async fn claim_dest(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    force: bool,
) -> Result<(), GuestError> {
    const SCRIPT: &str = r#"dest=$1 force=$2 user=$3
if [ "$user" != root ] && ! id -u "$user" >/dev/null 2>&1; then exit 5; fi
if [ -e "$dest" ] || [ -L "$dest" ]; then
  if [ -d "$dest" ] && [ ! -L "$dest" ] && [ -z "$(ls -A "$dest")" ]; then exit 0; fi
  if [ "$force" = 1 ]; then exec rm -rf -- "$dest"; fi
  if [ -f "$dest/.git/banger-workspace-base" ]; then exit 4; fi
  exit 3
fi"#;
    let output = exec(
        agent,
        vm,
        ExecRequest {
            argv: shell(SCRIPT, &[dest, if force { "1" } else { "0" }, user]),
            ..ExecRequest::default()
        },
    )
    .await?;
    let (vm, dest) = (vm.to_owned(), dest.to_owned());
    match output.status.code {
        Some(0) => Ok(()),
        Some(3) => Err(GuestError::DestHasFiles { vm, dest }),
        Some(4) => Err(GuestError::DestHasWorkspace { vm, dest }),
        Some(5) => Err(GuestError::NoUser {
            vm,
            user: user.to_owned(),
        }),
        _ => Err(GuestError::Clear {
            vm,
            dest,
            message: one_line(&output.stderr),
        }),
    }
}

/// Unpacks the tar read from `tar` into DEST; returns the entries unpacked.
pub async fn unpack<R: AsyncRead + Unpin>(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    tar: R,
) -> Result<u64, GuestError> {
    agent
        .copy_in(dest, tar)
        .await
        .map_err(|error| GuestError::agent(vm, error))
}

/// Makes the symlinks the tar could not carry, records the base, and hands
/// DEST to `user`.
pub async fn finish_dest(
    agent: &AgentClient,
    vm: &str,
    spec: &WorkspaceSpec,
    links: &[WorkspaceLink],
) -> Result<(), GuestError> {
    const LINKS: &str = r#"dest=$1
shift
while [ $# -ge 2 ]; do
  mkdir -p -- "$(dirname -- "$dest/$2")" && ln -sfn -- "$1" "$dest/$2" || exit 1
  shift 2
done"#;
    const FINISH: &str = r#"dest=$1 owner=$2 base=$3
if [ -n "$base" ]; then
  mkdir -p -- "$dest/.git" && printf '%s\n' "$base" > "$dest/.git/banger-workspace-base" || exit 1
fi
if [ "$owner" != root ]; then chown -R -h -- "$owner:" "$dest"; fi"#;
    let run = |argv: Vec<String>| async move {
        let output = exec(
            agent,
            vm,
            ExecRequest {
                argv,
                ..ExecRequest::default()
            },
        )
        .await?;
        if output.status.code == Some(0) {
            Ok(())
        } else {
            Err(GuestError::Finish {
                vm: vm.to_owned(),
                dest: spec.dest.clone(),
                message: one_line(&output.stderr),
            })
        }
    };
    // In batches: one exec's arguments must fit the kernel's limit.
    let mut batch: Vec<&str> = vec![&spec.dest];
    let mut batch_bytes = 0;
    for link in links {
        if batch_bytes + link.target.len() + link.name.len() > FINISH_BATCH_BYTES {
            run(shell(LINKS, &batch)).await?;
            batch.truncate(1);
            batch_bytes = 0;
        }
        batch.push(&link.target);
        batch.push(&link.name);
        batch_bytes += link.target.len() + link.name.len() + 2;
    }
    if batch.len() > 1 {
        run(shell(LINKS, &batch)).await?;
    }
    if spec.base.is_some() || spec.user != "root" {
        let base = spec.base.as_deref().unwrap_or("");
        run(shell(FINISH, &[spec.dest.as_str(), &spec.user, base])).await?;
    }
    Ok(())
}

/// Runs in the guest's workspace directory. `$1` is the mode: `patch` prints
/// the patch; `commit MESSAGE` prints `base B`, `commit C` and `bundle
/// yes|no` (whether the host needs objects); `bundle COMMIT` prints the
/// bundle of BASE..COMMIT. Exit 3: no workspace.
const EXPORT_SCRIPT: &str = r#"set -eu
mode=$1
command -v git >/dev/null 2>&1 || { echo "git is not installed in the VM" >&2; exit 127; }
[ -f .git/banger-workspace-base ] || { echo "no workspace here" >&2; exit 3; }
base=$(cat .git/banger-workspace-base)
gitdir=$(git rev-parse --absolute-git-dir)
index=
ref=
bundle=
cleanup() {
  if [ -n "$index" ]; then rm -f -- "$index" "$index.lock"; fi
  if [ -n "$ref" ]; then git update-ref -d "$ref" >/dev/null 2>&1 || true; fi
  if [ -n "$bundle" ]; then rm -f -- "$bundle"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
if [ "$mode" = bundle ]; then
  bundle=$(mktemp "$gitdir/banger-export-bundle.XXXXXX")
  ref=refs/banger-export/${bundle##*.}
  git update-ref "$ref" "$2"
  if [ "$base" = none ]; then
    git bundle create -q "$bundle" "$ref"
  else
    git bundle create -q "$bundle" "$ref" "^$base"
  fi
  cat -- "$bundle"
  exit 0
fi
index=$(mktemp "$gitdir/banger-export-index.XXXXXX")
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
  echo "base $base"
  echo "commit $commit"
  # The host has the base and all its history already.
  if [ "$base" != none ] && git merge-base --is-ancestor "$commit" "$base"; then
    echo "bundle no"
  else
    echo "bundle yes"
  fi
  ;;
esac"#;

fn export_request(
    dest: &str,
    user: &str,
    args: &[&str],
    env: Vec<(String, String)>,
) -> ExecRequest {
    ExecRequest {
        argv: shell(EXPORT_SCRIPT, args),
        env,
        cwd: Some(dest.to_owned()),
        user: Some(user.to_owned()),
        pty: None,
    }
}

fn export_failure(vm: &str, dest: &str, status: ExitStatus, stderr: &[u8]) -> GuestError {
    match status.code {
        Some(3) => GuestError::NoWorkspace {
            vm: vm.to_owned(),
            dest: dest.to_owned(),
        },
        _ => GuestError::Export {
            vm: vm.to_owned(),
            message: one_line(stderr),
        },
    }
}

/// Output of an export script: the bytes as they come, then its end.
pub struct ExportStream {
    vm: String,
    dest: String,
    stdout: OutputStream,
    stderr: tokio::task::JoinHandle<Vec<u8>>,
    exit: banger_agent_proto::client::ExitWaiter,
}

impl ExportStream {
    async fn start(
        agent: &AgentClient,
        vm: &str,
        dest: &str,
        request: ExecRequest,
    ) -> Result<Self, GuestError> {
        let session = agent
            .exec(request)
            .await
            .map_err(|error| GuestError::agent(vm, error))?;
        let banger_agent_proto::client::ExecSession {
            mut stdin,
            stdout,
            mut stderr,
            exit,
            ..
        } = session;
        stdin.close();
        // Read apart from stdout, so a chatty stderr never stalls the stream.
        let stderr = tokio::spawn(async move { stderr.read_to_end().await });
        Ok(Self {
            vm: vm.to_owned(),
            dest: dest.to_owned(),
            stdout,
            stderr,
            exit,
        })
    }

    /// The next chunk of output; `None` at its end.
    pub async fn next(&mut self) -> Option<Bytes> {
        self.stdout.recv().await
    }

    /// Waits for the script; an error if it failed.
    pub async fn finish(self) -> Result<(), GuestError> {
        let status = self
            .exit
            .wait()
            .await
            .map_err(|error| GuestError::agent(&self.vm, error))?;
        let stderr = self.stderr.await.unwrap_or_default();
        if status.code == Some(0) {
            Ok(())
        } else {
            Err(export_failure(&self.vm, &self.dest, status, &stderr))
        }
    }
}

/// Starts the patch from the base to the guest's working state.
pub async fn export_patch(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
) -> Result<ExportStream, GuestError> {
    ExportStream::start(
        agent,
        vm,
        dest,
        export_request(dest, user, &["patch"], Vec::new()),
    )
    .await
}

/// What [`export_commit`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommit {
    /// The workspace's base, or `none`.
    pub base: String,
    pub commit: String,
    /// Whether the host needs objects (a bundle) to have `commit`.
    pub needs_bundle: bool,
}

/// Commits the guest's uncommitted changes on top of its HEAD (without
/// moving HEAD or touching its index).
pub async fn export_commit(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    message: &str,
    identity: (&str, &str),
) -> Result<GuestCommit, GuestError> {
    let env = vec![
        ("BANGER_GIT_NAME".to_owned(), identity.0.to_owned()),
        ("BANGER_GIT_EMAIL".to_owned(), identity.1.to_owned()),
    ];
    let output = exec(
        agent,
        vm,
        export_request(dest, user, &["commit", message], env),
    )
    .await?;
    if output.status.code != Some(0) {
        return Err(export_failure(vm, dest, output.status, &output.stderr));
    }
    parse_commit(vm, &String::from_utf8_lossy(&output.stdout))
}

fn parse_commit(vm: &str, text: &str) -> Result<GuestCommit, GuestError> {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key).map(|rest| rest.trim().to_owned()))
    };
    let missing = |what| GuestError::ExportOutput {
        vm: vm.to_owned(),
        what,
    };
    let base = field("base ").ok_or_else(|| missing("base"))?;
    let commit = field("commit ").ok_or_else(|| missing("commit"))?;
    check_base(&base).map_err(|_| missing("valid base"))?;
    check_base(&commit)
        .ok()
        .filter(|()| commit != "none")
        .ok_or_else(|| missing("valid commit"))?;
    Ok(GuestCommit {
        base,
        commit,
        needs_bundle: field("bundle ").as_deref() != Some("no"),
    })
}

/// Starts the bundle of `BASE..commit`.
pub async fn export_bundle(
    agent: &AgentClient,
    vm: &str,
    dest: &str,
    user: &str,
    commit: &str,
) -> Result<ExportStream, GuestError> {
    ExportStream::start(
        agent,
        vm,
        dest,
        export_request(dest, user, &["bundle", commit], Vec::new()),
    )
    .await
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
        assert!(check_dest("/root/re\0po").is_err());
    }

    #[test]
    fn git_messages_fit_one_line() {
        assert_eq!(
            one_line(b"fatal: bad thing\nhint: try this\n\nerror: more\n"),
            "fatal: bad thing; error: more"
        );
        assert_eq!(one_line(b""), "no message");
    }

    #[test]
    fn specs_from_callers_are_checked() {
        let spec = |user: &str, base: Option<&str>| WorkspaceSpec {
            dest: "/root/repo/".into(),
            user: user.into(),
            force: false,
            base: base.map(str::to_owned),
        };
        let checked = check_spec(&spec("dev", Some("none"))).unwrap();
        assert_eq!(checked.dest, "/root/repo");
        assert!(check_spec(&spec("dev", Some(&"a".repeat(40)))).is_ok());
        assert!(check_spec(&spec("dev", Some(&"0".repeat(64)))).is_ok());
        assert!(check_spec(&spec("dev", None)).is_ok());
        assert!(check_spec(&spec("dev", Some("HEAD"))).is_err());
        assert!(check_spec(&spec("dev", Some(&"A".repeat(40)))).is_err());
        assert!(check_spec(&spec("dev", Some("$(reboot)"))).is_err());
        assert!(check_spec(&spec("", None)).is_err());
        assert!(check_spec(&spec("-x", None)).is_err());
        assert!(check_spec(&spec(&"u".repeat(5000), None)).is_err());
        assert!(check_identity(Some("A Person"), Some("a@example.org")).is_ok());
        assert!(check_identity(Some("a\nb"), None).is_err());
    }

    #[test]
    fn trailers_from_callers_are_bounded() {
        let link = |target: &str, name: &str| WorkspaceLink {
            target: target.into(),
            name: name.into(),
        };
        let trailer = |links| UploadTrailer { links, skipped: 0 };
        assert!(check_trailer(&trailer(vec![link("/etc/hostname", "dir/link")])).is_ok());
        assert!(check_trailer(&trailer(vec![link("../../x", "up")])).is_ok());
        for bad in [
            link("/x", "../escape"),
            link("/x", "/absolute"),
            link("/x", "a/../../b"),
            link("/x", ""),
            link("", "empty-target"),
            link("/x\0", "nul"),
            link(&"x".repeat(MAX_PATH_BYTES + 1), "long"),
        ] {
            assert!(
                check_trailer(&trailer(vec![bad.clone()])).is_err(),
                "{bad:?}"
            );
        }
        let many = vec![link("/x", "a"); MAX_LINKS + 1];
        assert!(matches!(
            check_trailer(&trailer(many)),
            Err(GuestError::TooManyLinks { .. })
        ));
    }

    #[test]
    fn commit_output_is_parsed_and_checked() {
        let commit = "c".repeat(40);
        let text = format!("base none\ncommit {commit}\nbundle yes\n");
        assert_eq!(
            parse_commit("vm", &text).unwrap(),
            GuestCommit {
                base: "none".into(),
                commit: commit.clone(),
                needs_bundle: true
            }
        );
        let text = format!("base {commit}\ncommit {commit}\nbundle no\n");
        assert!(!parse_commit("vm", &text).unwrap().needs_bundle);
        assert!(parse_commit("vm", "base none\n").is_err());
        assert!(parse_commit("vm", "base none\ncommit none\n").is_err());
        assert!(parse_commit("vm", "base x\ncommit y\n").is_err());
    }
}
