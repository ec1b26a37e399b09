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

    /// Whether VMMs run jailed, and whether the jailer is there.
    pub(super) fn vmm_jail(&self) -> Check {
        let qemu = match &self.backends.qemu_user {
            Some(user) => format!("QEMU runs as {user} with -sandbox"),
            None => "QEMU runs as the daemon's user".to_owned(),
        };
        if !self.config.firecracker.jailed {
            return check(
                "vmm jail",
                CheckStatus::Warn,
                format!("Firecracker is not jailed and runs as the daemon's user; {qemu}"),
                Some("set `[firecracker] jailed = true`"),
            );
        }
        let Some(jail) = &self.backends.firecracker_jail else {
            let reason = self
                .backends
                .unjailed_reason
                .clone()
                .unwrap_or_else(|| "jailing is off".to_owned());
            return check(
                "vmm jail",
                CheckStatus::Warn,
                format!("VMMs are not jailed: {reason}"),
                Some("run bangerd as root"),
            );
        };
        let Some(jailer) = find_executable(&jail.jailer) else {
            return check(
                "vmm jail",
                CheckStatus::Fail,
                format!(
                    "jailer `{}` not found: Firecracker VMs cannot start jailed",
                    jail.jailer.display()
                ),
                Some("install Firecracker's jailer (same release as firecracker) and set `[firecracker] jailer`, or set `[firecracker] jailed = false`"),
            );
        };
        let cgroups = match &jail.cgroups {
            Some(banger_vmm::jail::Cgroups::V2 { .. }) => "cgroup v2 CPU and memory limits",
            Some(banger_vmm::jail::Cgroups::V1 { .. }) => "cgroup v1 CPU and memory limits",
            None => "no cgroup limits (no cpu and memory controllers found)",
        };
        check(
            "vmm jail",
            if jail.cgroups.is_some() {
                CheckStatus::Ok
            } else {
                CheckStatus::Warn
            },
            format!(
                "Firecracker jailed by {} as {} (uid {}), {cgroups}; {qemu}",
                jailer.display(),
                crate::backends::VMM_USER,
                jail.uid
            ),
            None,
        )
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
