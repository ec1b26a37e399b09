//! The VMM backends the daemon runs, and which one new VMs get.
//!
//! Every VM records its backend; the daemon runs all of them, so VMs made
//! with one backend keep working after the default changes. `auto` picks
//! Firecracker when its binary is present and KVM is usable (decided by the
//! QEMU backend's probe, which times a tiny guest), else QEMU.
//!
//! VMMs do not run as root. Firecracker runs under its jailer (a chroot per
//! VM under `STATE_DIR/jail`, PID and mount namespaces, seccomp, cgroup
//! limits), QEMU with `-runas` and `-sandbox`; both as the system user
//! [`VMM_USER`], which the daemon creates at start when it is missing. One
//! user for every VM: each VM's files are reachable only inside its own
//! chroot (Firecracker) or were opened before the privilege drop (QEMU),
//! and both VMMs' seccomp filters refuse `ptrace`, so a per-VM uid would
//! add little besides bookkeeping of a uid range.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use banger_proto::Backend;
use banger_vmm::firecracker::{Firecracker, FirecrackerConfig};
use banger_vmm::jail::{Cgroups, JailConfig};
use banger_vmm::qemu::{Accel, Qemu, QemuConfig};
use banger_vmm::{Vmm, VmmHandle};

use crate::config::{BackendSetting, Config};
use crate::doctor::find_executable;
use crate::paths::StatePaths;

/// The unprivileged system user jailed VMMs run as.
pub const VMM_USER: &str = "banger-vmm";

pub struct Backends {
    firecracker: Arc<dyn Vmm>,
    qemu: Arc<Qemu>,
    /// The backend new VMs get.
    pub default: Backend,
    /// Why it is the default.
    pub reason: String,
    /// How Firecracker is jailed, `None` when it is not.
    pub firecracker_jail: Option<JailConfig>,
    /// Whether QEMU drops privileges, as what.
    pub qemu_user: Option<String>,
    /// Why VMMs are not jailed although the config asks for it.
    pub unjailed_reason: Option<String>,
}

/// Looks up [`VMM_USER`], creating it (a system user with its own group, no
/// home, no login shell) when missing. Returns its uid and gid.
fn ensure_vmm_user() -> anyhow::Result<(u32, u32)> {
    let lookup = || nix::unistd::User::from_name(VMM_USER).ok().flatten();
    if lookup().is_none() {
        let status = std::process::Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "banger VMM processes",
                VMM_USER,
            ])
            .status()
            .with_context(|| format!("Failed to run useradd to create the user {VMM_USER}"))?;
        // A concurrent start may have made it meanwhile.
        if !status.success() && lookup().is_none() {
            anyhow::bail!("useradd could not create the user {VMM_USER} ({status})");
        }
        tracing::info!(user = VMM_USER, "created the VMM user");
    }
    let user = lookup().with_context(|| format!("The user {VMM_USER} does not exist"))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

impl Backends {
    pub async fn from_config(config: &Config, paths: &StatePaths) -> anyhow::Result<Self> {
        let wants_jail = config.firecracker.jailed || config.qemu.jailed;
        let (user, unjailed_reason) = if !wants_jail {
            (None, None)
        } else if nix::unistd::geteuid().is_root() {
            (Some(ensure_vmm_user()?), None)
        } else {
            let reason = "the daemon does not run as root, so VMMs run as its user".to_owned();
            tracing::warn!("{reason}");
            (None, Some(reason))
        };
        let firecracker_jail = user
            .filter(|_| config.firecracker.jailed)
            .map(|(uid, gid)| JailConfig {
                jailer: config.firecracker.jailer.clone(),
                chroot_base: paths.jail(),
                uid,
                gid,
                cgroups: Cgroups::detect(),
            });
        let qemu_user = user
            .filter(|_| config.qemu.jailed)
            .map(|_| VMM_USER.to_owned());
        let firecracker = Arc::new(Firecracker::new(FirecrackerConfig {
            binary: config.firecracker.binary.clone(),
            api_timeout: Duration::from_millis(config.firecracker.api_timeout_ms),
            startup_timeout: Duration::from_millis(config.firecracker.startup_timeout_ms),
            log_level: config.firecracker.log_level.clone(),
            jail: firecracker_jail.clone(),
        })?);
        let qemu = Arc::new(Qemu::new(QemuConfig {
            binary: config.qemu.binary.clone(),
            accel: match config.qemu.accel.as_str() {
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                _ => Accel::Auto,
            },
            startup_timeout: Duration::from_millis(config.qemu.startup_timeout_ms),
            run_as: qemu_user.clone(),
            sandbox: config.qemu.jailed,
            cgroups: qemu_user.as_ref().and_then(|_| Cgroups::detect()),
            ..QemuConfig::default()
        }));
        let (default, reason) = match config.vmm.backend {
            BackendSetting::Fixed(backend) => (backend, "configured".to_owned()),
            BackendSetting::Auto => {
                if find_executable(&config.firecracker.binary).is_none() {
                    (
                        Backend::Qemu,
                        format!(
                            "auto: Firecracker binary `{}` not found",
                            config.firecracker.binary.display()
                        ),
                    )
                } else {
                    let choice = qemu.accel_choice().await;
                    if choice.accel == Accel::Kvm {
                        (
                            Backend::Firecracker,
                            "auto: Firecracker found and KVM usable".to_owned(),
                        )
                    } else {
                        (Backend::Qemu, format!("auto: {}", choice.reason))
                    }
                }
            }
        };
        Ok(Self {
            firecracker,
            qemu,
            default,
            reason,
            firecracker_jail,
            qemu_user,
            unjailed_reason,
        })
    }

    /// Backends with `firecracker` standing in for Firecracker (a fake in
    /// tests), and the default QEMU.
    #[must_use]
    pub fn with_firecracker(firecracker: Arc<dyn Vmm>) -> Self {
        Self {
            firecracker,
            qemu: Arc::new(Qemu::new(QemuConfig::default())),
            default: Backend::Firecracker,
            reason: "configured".to_owned(),
            firecracker_jail: None,
            qemu_user: None,
            unjailed_reason: None,
        }
    }

    /// The implementation of `backend`.
    pub fn get(&self, backend: Backend) -> Arc<dyn Vmm> {
        match backend {
            Backend::Firecracker => Arc::clone(&self.firecracker),
            Backend::Qemu => Arc::clone(&self.qemu) as Arc<dyn Vmm>,
        }
    }

    /// The backend that made `handle`.
    pub fn of(&self, handle: &VmmHandle) -> Arc<dyn Vmm> {
        self.get(handle.backend())
    }

    /// QEMU's accelerator choice and why, for `doctor`.
    pub async fn qemu_accel(&self) -> String {
        let choice = self.qemu.accel_choice().await;
        format!("{:?}: {}", choice.accel, choice.reason).to_lowercase()
    }
}
