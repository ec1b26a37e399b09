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
}
