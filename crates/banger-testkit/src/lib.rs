//! Test support for banger. Dev-only: nothing here ships in a release.
//!
//! - [`fake_firecracker`]: the `fake-firecracker` binary, a stand-in for the
//!   Firecracker VMM that serves and enforces the same HTTP API.
//! - [`fake_jailer`]: the `fake-jailer` binary, a stand-in for Firecracker's
//!   jailer that takes the same flags and builds the same jail.
//! - [`host_state`]: a snapshot of what a daemon made on the host (links,
//!   nft, mounts, loop devices, processes, files, store rows) and its diff.
//! - [`netns`]: a network namespace for daemons with their network on.
//! - [`test_daemon`]: a real `bangerd` in a temp dir, driven through the
//!   real `banger` CLI, with leak checks.

pub mod fake_firecracker;
pub mod fake_jailer;
pub mod host_state;
pub mod netns;
pub mod test_daemon;
