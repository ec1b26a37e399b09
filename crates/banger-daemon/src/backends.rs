//! The VMM backends the daemon runs, and which one new VMs get.
//!
//! Every VM records its backend; the daemon runs all of them, so VMs made
//! with one backend keep working after the default changes. `auto` picks
//! Firecracker when its binary is present and KVM is usable (decided by the
//! QEMU backend's probe, which times a tiny guest), else QEMU.

use std::sync::Arc;
use std::time::Duration;

use banger_proto::Backend;
use banger_vmm::firecracker::{Firecracker, FirecrackerConfig};
use banger_vmm::qemu::{Accel, Qemu, QemuConfig};
use banger_vmm::{Vmm, VmmHandle};

use crate::config::{BackendSetting, Config};
use crate::doctor::find_executable;

pub struct Backends {
    firecracker: Arc<dyn Vmm>,
    qemu: Arc<Qemu>,
    /// The backend new VMs get.
    pub default: Backend,
    /// Why it is the default.
    pub reason: String,
}

impl Backends {
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let firecracker = Arc::new(Firecracker::new(FirecrackerConfig {
            binary: config.firecracker.binary.clone(),
            api_timeout: Duration::from_millis(config.firecracker.api_timeout_ms),
            startup_timeout: Duration::from_millis(config.firecracker.startup_timeout_ms),
            log_level: config.firecracker.log_level.clone(),
        })?);
        let qemu = Arc::new(Qemu::new(QemuConfig {
            binary: config.qemu.binary.clone(),
            accel: match config.qemu.accel.as_str() {
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                _ => Accel::Auto,
            },
            startup_timeout: Duration::from_millis(config.qemu.startup_timeout_ms),
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
