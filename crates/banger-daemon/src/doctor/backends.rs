//! Checks of the VMM backends: the Firecracker binary and its version,
//! QEMU and the accelerator it would use.

use banger_proto::status::{Check, CheckStatus};

use super::host::{find_executable, version_output};
use super::{check, Doctor};

impl Doctor<'_> {
    pub(super) async fn firecracker(&self) -> Check {
        let binary = &self.config.firecracker.binary;
        let Some(path) = find_executable(binary) else {
            return check(
                "firecracker",
                CheckStatus::Fail,
                format!("{} not found", binary.display()),
                Some("install Firecracker and set `[firecracker] binary` in the config"),
            );
        };
        let output = version_output(&path).await;
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

    pub(super) async fn qemu(&self) -> Check {
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
}
