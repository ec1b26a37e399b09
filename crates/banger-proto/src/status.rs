//! `daemon.status`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub socket: String,
    pub state_dir: String,
    pub config: String,
    /// Backend used for new VMs.
    pub backend: String,
    /// How root disks are made from images.
    pub clone_strategy: String,
    /// VM counts by state name; every state is present.
    pub vms: BTreeMap<String, u64>,
    /// Host networking, when enabled.
    #[serde(default)]
    pub network: Option<NetworkStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub bridge: String,
    pub subnet: String,
    pub domain: String,
    pub leases_used: u64,
    pub leases_free: u64,
}

/// How a `doctor` check came out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Warn,
    Fail,
}

/// One `doctor` check: what was looked at, what was found, how to fix it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Result of `daemon.doctor`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// The worst status of all checks.
    pub fn worst(&self) -> CheckStatus {
        self.checks
            .iter()
            .map(|check| check.status)
            .max()
            .unwrap_or(CheckStatus::Ok)
    }
}
