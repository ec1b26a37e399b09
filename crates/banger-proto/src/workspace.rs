//! The workspace methods (`vm.workspace.*`) and their byte streams.
//!
//! Each method is answered with one response line; after a success response
//! the connection carries binary frames (not JSON lines), because what moves
//! is bytes:
//!
//! ```text
//! +---------+----------------+------------------+
//! | kind u8 | length u32 (BE)| payload (length) |
//! +---------+----------------+------------------+
//! ```
//!
//! | kind | payload | limit |
//! |---|---|---|
//! | [`FrameKind::Data`] | bytes of the stream (a tar, a patch, a bundle) | [`MAX_DATA_FRAME`] |
//! | [`FrameKind::End`] | JSON: what the sender has to say after the bytes | [`MAX_END_FRAME`] |
//! | [`FrameKind::Error`] | JSON [`crate::RpcError`]: the sender gives up | [`MAX_ERROR_FRAME`] |
//!
//! Upload (`vm.workspace.prepare`, `vm.workspace.upload`), CLI to daemon:
//! 1. The CLI sends the tar as `Data` frames, then `End` with an
//!    [`UploadTrailer`] (the symlinks the guest's unpacker refuses), or
//!    `Error` when it cannot go on (a file it cannot read).
//! 2. The daemon answers with one frame: `End` with [`WorkspacePrepared`], or
//!    `Error`. It may answer before the upload ends (the guest refused the
//!    tar); it then stops reading.
//!
//! Export (`vm.workspace.export`), daemon to CLI:
//! 1. The daemon sends the patch or the bundle as `Data` frames, then `End`
//!    with [`WorkspaceExported`], or `Error`.
//!
//! The method types follow the shape `Method { NAME, Params, Result, STREAMS }`:
//! one params struct and one result type (the response line) per method.

use serde::{Deserialize, Serialize};

/// Largest `Data` payload either side sends or accepts.
pub const MAX_DATA_FRAME: u32 = 256 * 1024;
/// Largest `End` payload (an [`UploadTrailer`] with many links).
pub const MAX_END_FRAME: u32 = 8 * 1024 * 1024;
/// Largest `Error` payload.
pub const MAX_ERROR_FRAME: u32 = 64 * 1024;
/// Most symlinks an [`UploadTrailer`] may carry.
pub const MAX_LINKS: usize = 65_536;
/// Longest link name or target, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Where the guest records the commit a workspace was made from, relative
/// to the workspace directory.
pub const BASE_FILE: &str = ".git/banger-workspace-base";
/// The create stage's name.
pub const STAGE: &str = "workspace";

/// The kind byte of a workspace stream frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Data,
    End,
    Error,
}

impl FrameKind {
    pub fn byte(self) -> u8 {
        match self {
            Self::Data => 1,
            Self::End => 2,
            Self::Error => 3,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Data),
            2 => Some(Self::End),
            3 => Some(Self::Error),
            _ => None,
        }
    }

    /// The largest payload a frame of this kind may have.
    pub fn limit(self) -> u32 {
        match self {
            Self::Data => MAX_DATA_FRAME,
            Self::End => MAX_END_FRAME,
            Self::Error => MAX_ERROR_FRAME,
        }
    }
}

/// Where and how a workspace goes into a VM: part of `vm.workspace.prepare`
/// and of `vm.create` (`workspace`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Guest directory: absolute, below `/`, without `..`.
    pub dest: String,
    /// Guest user who owns the copy.
    #[serde(default = "root")]
    pub user: String,
    /// Remove what is at `dest` first.
    #[serde(default)]
    pub force: bool,
    /// The commit the workspace is made from, recorded in [`BASE_FILE`]:
    /// 40 or 64 hex digits, or `none` (an unborn branch). Absent for a plain
    /// directory (`--no-git`).
    #[serde(default)]
    pub base: Option<String>,
}

fn root() -> String {
    "root".to_owned()
}

/// Parameters of `vm.workspace.prepare`: copy a workspace into a running VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrepareWorkspaceParams {
    pub vm: String,
    pub workspace: WorkspaceSpec,
}

/// Result of `vm.workspace.prepare`: the destination is claimed; the upload
/// may begin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrepareWorkspaceResult {
    /// The VM's name.
    pub vm: String,
    /// The destination, normalised.
    pub dest: String,
}

/// Parameters of `vm.workspace.upload`: the upload of the `workspace` stage
/// of a `vm create` the caller started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UploadWorkspaceParams {
    pub operation_id: String,
    /// About how many bytes the tar will have, for the stage's progress.
    #[serde(default)]
    pub total_bytes: Option<u64>,
}

/// Result of `vm.workspace.upload`: the stage will read the upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadWorkspaceResult {
    pub operation_id: String,
}

/// A symlink the guest's tar unpacker refuses (absolute, or leaving the
/// destination), made after the tar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceLink {
    pub target: String,
    /// Relative to the destination.
    pub name: String,
}

/// The `End` frame of an upload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UploadTrailer {
    #[serde(default)]
    pub links: Vec<WorkspaceLink>,
    /// Special files (sockets, FIFOs, devices) the CLI did not send.
    #[serde(default)]
    pub skipped: u64,
}

/// The daemon's `End` frame after an upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspacePrepared {
    /// Entries the guest unpacked (files, directories, links).
    pub entries: u64,
    /// Bytes of tar received.
    pub bytes: u64,
    pub elapsed_ms: u64,
}

/// What `vm.workspace.export` brings back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportMode {
    /// A `git apply`-able binary patch from the base to the guest's working state.
    Patch,
    /// A git bundle of the base..commit, the commit being the guest's HEAD
    /// plus one commit with its uncommitted changes.
    Branch,
}

/// Parameters of `vm.workspace.export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportWorkspaceParams {
    pub vm: String,
    pub dest: String,
    /// Guest user who runs git.
    #[serde(default = "root")]
    pub user: String,
    pub mode: ExportMode,
    /// Author of the commit of uncommitted changes when the guest's git
    /// has none configured (`branch` only).
    #[serde(default)]
    pub git_name: Option<String>,
    #[serde(default)]
    pub git_email: Option<String>,
}

/// Result of `vm.workspace.export`: the stream follows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportWorkspaceResult {
    pub vm: String,
    pub dest: String,
}

/// The daemon's `End` frame after an export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspaceExported {
    /// `branch`: the workspace's base commit, or `none`.
    #[serde(default)]
    pub base: Option<String>,
    /// `branch`: the commit the branch points to.
    #[serde(default)]
    pub commit: Option<String>,
    /// Bytes sent (the patch, or the bundle; 0 when the host needs no objects).
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kinds_round_trip() {
        for kind in [FrameKind::Data, FrameKind::End, FrameKind::Error] {
            assert_eq!(FrameKind::from_byte(kind.byte()), Some(kind));
        }
        assert_eq!(FrameKind::from_byte(0), None);
        assert_eq!(FrameKind::from_byte(4), None);
    }

    #[test]
    fn spec_defaults_to_root_and_refuses_unknown_fields() {
        let spec: WorkspaceSpec = serde_json::from_str(r#"{"dest":"/root/repo"}"#).unwrap();
        assert_eq!(spec.user, "root");
        assert!(!spec.force);
        assert_eq!(spec.base, None);
        assert!(serde_json::from_str::<WorkspaceSpec>(r#"{"dest":"/x","owner":"a"}"#).is_err());
    }

    #[test]
    fn export_mode_is_lowercase() {
        assert_eq!(
            serde_json::to_value(ExportMode::Branch).unwrap(),
            serde_json::Value::from("branch")
        );
    }
}
