//! Test support for banger. Dev-only: nothing here ships in a release.
//!
//! - [`fake_firecracker`]: the `fake-firecracker` binary, a stand-in for the
//!   Firecracker VMM that serves and enforces the same HTTP API.
//! - [`test_daemon`]: a real `bangerd` in a temp dir, driven through the
//!   real `banger` CLI, with leak checks.

pub mod fake_firecracker;
pub mod test_daemon;
