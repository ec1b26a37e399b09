//! `doctor`: honest checks of the host and configuration, each ok / warn /
//! fail with a fix hint. Runs in the daemon, which sees the host as root.
//!
//! One file per group of checks, each a few methods of [`Doctor`] or
//! functions returning a [`Check`]:
//! - this file: [`Doctor`] and the report, in the order the checks run;
//! - [`storage`]: the state dir's free space and filesystem, the clone
//!   strategy;
//! - [`backends`]: Firecracker and QEMU;
//! - [`host`]: `/dev/kvm`, the host tools, the access group, and finding
//!   and running host programs;
//! - [`catalog`]: the catalog and the default image and kernel;
//! - [`network`]: netlink permission, nft, forwarding, DNS, the bridge, the
//!   tap pool and how the host resolves VM names.

mod backends;
mod catalog;
mod host;
mod network;
mod storage;

use banger_proto::status::{Check, CheckStatus, DoctorReport};

use crate::access::AccessPolicy;
use crate::config::Config;
use crate::images::ImageService;
use crate::network::Network;
use crate::paths::StatePaths;

pub use host::find_executable;
use host::{kvm, tool};

pub struct Doctor<'a> {
    pub backends: &'a crate::backends::Backends,
    pub clone_reason: &'a str,
    pub config: &'a Config,
    pub paths: &'a StatePaths,
    pub images: &'a ImageService,
    pub access: &'a AccessPolicy,
    /// The network capability; `None` when networking is disabled.
    pub network: Option<&'a Network>,
    pub catalog: &'a crate::catalog::CatalogService,
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
            self.vmm_jail(),
            kvm(),
            self.qemu().await,
            tool("mkfs.ext4", "apt install e2fsprogs"),
            tool(
                "gpgv",
                "apt install gpgv (checks kernel signatures from the catalog)",
            ),
            self.clone_strategy(),
            self.snapshot_space(),
        ];
        let catalog = self.catalog.catalog().await;
        checks.push(self.catalog_check(&catalog));
        let catalog = catalog.ok().flatten();
        checks.push(self.default_artifact("image", catalog.as_ref()));
        checks.push(self.default_artifact("kernel", catalog.as_ref()));
        checks.push(self.access_group());
        checks.extend(self.network_checks().await);
        DoctorReport { checks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
