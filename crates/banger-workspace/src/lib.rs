//! Workspaces: a git working tree copied into a VM, and the work brought
//! back (see README "Workspaces").
//!
//! The work is split by who may do it:
//! - [`host`] runs in the CLI, as the user who owns the repository: it finds
//!   the repository, lists and packs the files, and writes what comes back
//!   (a patch file, a branch from a bundle) into the user's files.
//! - [`guest`] runs in the daemon, over the VM's agent connection: it claims
//!   and finishes the destination and runs git in the guest for export.
//! - [`stream`] is the framed byte stream between the two, on the control
//!   connection after a `vm.workspace.*` call was answered.
//!
//! The daemon never opens a user's file; the CLI never talks to the agent
//! for a workspace.

pub mod guest;
pub mod host;
pub mod stream;
