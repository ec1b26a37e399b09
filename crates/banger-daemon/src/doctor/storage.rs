//! Checks of storage: free space and filesystem of the state dir, and the
//! clone strategy it allows.

use std::path::Path;

use banger_proto::status::{Check, CheckStatus};

use super::{check, Doctor};

/// Below this much free space in the state dir, creates will soon fail.
const LOW_SPACE_BYTES: u64 = 5 << 30;
const CRITICAL_SPACE_BYTES: u64 = 1 << 30;

impl Doctor<'_> {
    pub(super) fn state_dir(&self) -> Check {
        let root = &self.paths.root;
        match nix::sys::statvfs::statvfs(root) {
            Ok(stats) => {
                let free = stats.blocks_available() * stats.fragment_size();
                let detail = format!(
                    "{} on {}, {:.1} GiB free",
                    root.display(),
                    filesystem_name(root),
                    free as f64 / f64::from(1_u32 << 30)
                );
                if free < CRITICAL_SPACE_BYTES {
                    check(
                        "state dir",
                        CheckStatus::Fail,
                        detail,
                        Some("free space or move the state dir (--state-dir)"),
                    )
                } else if free < LOW_SPACE_BYTES {
                    check(
                        "state dir",
                        CheckStatus::Warn,
                        detail,
                        Some("every VM's root disk lives here; free some space"),
                    )
                } else {
                    check("state dir", CheckStatus::Ok, detail, None)
                }
            }
            Err(error) => check(
                "state dir",
                CheckStatus::Fail,
                format!("cannot stat {}: {error}", root.display()),
                None,
            ),
        }
    }

    /// What snapshots hold on disk (`STATE_DIR/snapshots/*`).
    pub(super) fn snapshot_space(&self) -> Check {
        let dirs: Vec<_> = std::fs::read_dir(self.paths.root.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .collect();
        let bytes: u64 = dirs
            .iter()
            .map(|dir| crate::vms::snapshot::bytes_on_disk(dir))
            .sum();
        check(
            "snapshots",
            CheckStatus::Ok,
            format!(
                "{} in the state dir, {} MiB on disk",
                dirs.len(),
                bytes.div_ceil(1 << 20)
            ),
            None,
        )
    }

    pub(super) fn clone_strategy(&self) -> Check {
        if self.clone_reason.starts_with("copy") {
            check(
                "clone strategy",
                CheckStatus::Warn,
                self.clone_reason.to_owned(),
                Some("put the state dir on XFS (mkfs.xfs -m reflink=1) or btrfs for O(1) clones"),
            )
        } else {
            check(
                "clone strategy",
                CheckStatus::Ok,
                self.clone_reason.to_owned(),
                None,
            )
        }
    }
}

/// The filesystem type of `path`, by statfs magic.
fn filesystem_name(path: &Path) -> String {
    match nix::sys::statfs::statfs(path) {
        Ok(stats) => {
            let magic = stats.filesystem_type().0 as u64;
            match magic {
                0x5846_5342 => "xfs".to_owned(),
                0x9123_683e => "btrfs".to_owned(),
                0xef53 => "ext4".to_owned(),
                0x0102_1994 => "tmpfs".to_owned(),
                0x794c_7630 => "overlayfs".to_owned(),
                other => format!("filesystem 0x{other:x}"),
            }
        }
        Err(_) => "unknown filesystem".to_owned(),
    }
}
