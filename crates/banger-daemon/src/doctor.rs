//! `doctor`: honest checks of the host and configuration, each ok / warn /
//! fail with a fix hint. Runs in the daemon, which sees the host as root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::status::{Check, CheckStatus, DoctorReport};

use crate::access::AccessPolicy;
use crate::config::Config;
use crate::images::ImageService;
use crate::paths::StatePaths;

/// Below this much free space in the state dir, creates will soon fail.
const LOW_SPACE_BYTES: u64 = 5 << 30;
const CRITICAL_SPACE_BYTES: u64 = 1 << 30;

pub struct Doctor<'a> {
    pub backends: &'a crate::backends::Backends,
    pub clone_reason: &'a str,
    pub config: &'a Config,
    pub paths: &'a StatePaths,
    pub images: &'a ImageService,
    pub access: &'a AccessPolicy,
}

fn check(name: &str, status: CheckStatus, detail: String, hint: Option<&str>) -> Check {
    Check {
        name: name.to_owned(),
        status,
        detail,
        hint: hint.map(str::to_owned),
    }
}

impl Doctor<'_> {
    pub async fn run(&self) -> DoctorReport {
        let mut checks = vec![
            self.state_dir(),
            check(
                "default backend",
                CheckStatus::Ok,
                format!("{} ({})", self.backends.default, self.backends.reason),
                None,
            ),
            self.firecracker().await,
            kvm(),
            self.qemu().await,
            tool("mkfs.ext4", "apt install e2fsprogs"),
            self.clone_strategy(),
        ];
        checks.push(self.default_artifact("image"));
        checks.push(self.default_artifact("kernel"));
        checks.push(self.access_group());
        DoctorReport { checks }
    }

    fn state_dir(&self) -> Check {
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

    async fn firecracker(&self) -> Check {
        let binary = &self.config.firecracker.binary;
        let Some(path) = find_executable(binary) else {
            return check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} not found", binary.display()),
                Some("install Firecracker and set `[firecracker] binary` in the config"),
            );
        };
        let output = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new(&path)
                .arg("--version")
                .output(),
        )
        .await;
        match output {
            Ok(Ok(output)) if output.status.success() => {
                let version = String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                check(
                    "firecracker",
                    CheckStatus::Ok,
                    format!("{} ({version})", path.display()),
                    None,
                )
            }
            Ok(Ok(output)) => check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} --version failed ({})", path.display(), output.status),
                None,
            ),
            Ok(Err(error)) => check(
                "firecracker",
                CheckStatus::Fail,
                format!("cannot run {}: {error}", path.display()),
                None,
            ),
            Err(_) => check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} --version did not answer within 5 s", path.display()),
                None,
            ),
        }
    }

    fn clone_strategy(&self) -> Check {
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

    async fn qemu(&self) -> Check {
        match find_executable(&self.config.qemu.binary) {
            None => check(
                "qemu",
                CheckStatus::Warn,
                format!("{} not found", self.config.qemu.binary.display()),
                Some("apt install qemu-system-x86 (needed where Firecracker cannot run)"),
            ),
            Some(path) => check(
                "qemu",
                CheckStatus::Ok,
                format!(
                    "{}; accelerator {}",
                    path.display(),
                    self.backends.qemu_accel().await
                ),
                None,
            ),
        }
    }

    fn default_artifact(&self, kind: &str) -> Check {
        let (name, found, hint) = if kind == "image" {
            let name = &self.config.vm.image;
            (
                name,
                self.images.image(name).is_ok(),
                format!("`banger image import {name} FILE`"),
            )
        } else {
            let name = &self.config.vm.kernel;
            (
                name,
                self.images.kernel(name).is_ok(),
                format!("`banger kernel import {name} FILE`"),
            )
        };
        let label = format!("default {kind}");
        if found {
            check(
                &label,
                CheckStatus::Ok,
                format!("`{name}` is registered"),
                None,
            )
        } else {
            check(
                &label,
                CheckStatus::Warn,
                format!("`{name}` is not registered; `vm create` needs --{kind}"),
                Some(&hint),
            )
        }
    }

    fn access_group(&self) -> Check {
        match self.access.group_id {
            Some(gid) => check(
                "access group",
                CheckStatus::Ok,
                format!(
                    "root and members of `{}` (gid {gid}) may use the socket",
                    self.access.group_name
                ),
                None,
            ),
            None => check(
                "access group",
                CheckStatus::Warn,
                format!(
                    "group `{}` does not exist: only root can use banger",
                    self.access.group_name
                ),
                Some(&format!(
                    "`groupadd {}` and add users to it",
                    self.access.group_name
                )),
            ),
        }
    }
}

fn kvm() -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => check(
            "kvm",
            CheckStatus::Ok,
            "/dev/kvm is accessible".to_owned(),
            None,
        ),
        Err(error) => check(
            "kvm",
            CheckStatus::Fail,
            format!("cannot open /dev/kvm: {error}"),
            Some("enable virtualization in firmware and load kvm_intel or kvm_amd"),
        ),
    }
}

fn tool(name: &str, install: &str) -> Check {
    match find_executable(Path::new(name)) {
        Some(path) => check(name, CheckStatus::Ok, path.display().to_string(), None),
        None => check(
            name,
            CheckStatus::Warn,
            format!("{name} not found in PATH"),
            Some(install),
        ),
    }
}

/// `binary` itself if it has a slash, else the first match in `PATH`.
pub fn find_executable(binary: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 {
        return is_executable(binary).then(|| binary.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_executable_searches_path_and_checks_mode() {
        assert!(find_executable(Path::new("sh")).is_some());
        assert!(find_executable(Path::new("definitely-not-a-banger-tool")).is_none());
        assert_eq!(
            find_executable(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert!(find_executable(Path::new("/etc/passwd")).is_none());
    }

    #[test]
    fn worst_status_wins() {
        let report = DoctorReport {
            checks: vec![
                check("a", CheckStatus::Ok, String::new(), None),
                check("b", CheckStatus::Warn, String::new(), None),
            ],
        };
        assert_eq!(report.worst(), CheckStatus::Warn);
    }
}
