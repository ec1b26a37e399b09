//! Request and response bodies, transcribed by hand from the Firecracker
//! v1.17 swagger file (`firecracker-api.yaml`), `definitions:` section.
//!
//! Deliberately independent of the client's types in `banger-vmm`: if both
//! sides shared one model, a misspelt field would be misspelt on both and no
//! test would notice. Transcription rules:
//!
//! 1. Every request body is `deny_unknown_fields`, so a field the contract
//!    does not define is refused with serde's "unknown field `x`" message.
//! 2. Fields in the schema's `required:` list are plain types (a missing one
//!    is refused with "missing field `x`"); the others are `Option`.
//! 3. `enum:` lists become Rust enums with the exact spelling of the yaml.
//! 4. Integers are unsigned where the yaml says `minimum: 0` or higher, so a
//!    negative number is refused by the parser; other range limits
//!    (`vcpu_count` 1..=32, `mtu`, `guest_cid`) are checked by the VMM,
//!    which is where the real Firecracker checks them too.
//!
//! Only the definitions of implemented endpoints are here; see the module
//! docs of `fake_firecracker` for the list.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `InstanceActionInfo`: body of `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `BootSource`: body of `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    pub kernel_image_path: String,
}

/// `Drive.cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// `Drive.io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `TokenBucket`. All three integers are `int64` with `minimum: 0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
    pub size: u64,
}

/// `RateLimiter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `Drive`: body of `PUT /drives/{drive_id}`.
///
/// A drive is either virtio-block (`path_on_host` and `is_read_only`
/// required) or vhost-user-block (`socket` required, the virtio-block
/// fields omitted); the VMM checks which one the body describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `CpuTemplate` (deprecated in the yaml, still accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// `MachineConfiguration.huge_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `MachineConfiguration`: body of `PUT /machine-config`, and what
/// `GET /machine-config` answers.
///
/// `vcpu_count` is parsed as a wide integer so that 0 and 33 get the VMM's
/// range message rather than a parser message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    pub mem_size_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    pub vcpu_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// Body of `PATCH /machine-config`: the yaml reuses `MachineConfiguration`
/// but describes the operation as a partial update, so nothing is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    #[serde(default)]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub vcpu_count: Option<u64>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigurationUpdate {
    /// True when the body named no field at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `Logger.level`. The yaml says the values are case-insensitive, so the
/// parser accepts any case and the fake answers with the yaml's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl LogLevel {
    const NAMES: &'static [&'static str] = &["Error", "Warning", "Info", "Debug", "Trace", "Off"];
    const ALL: [Self; 6] = [
        Self::Error,
        Self::Warning,
        Self::Info,
        Self::Debug,
        Self::Trace,
        Self::Off,
    ];

    /// Parses a level name in any case.
    pub fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .position(|candidate| candidate.eq_ignore_ascii_case(name))
            .map(|index| Self::ALL[index])
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::parse(&name).ok_or_else(|| serde::de::Error::unknown_variant(&name, Self::NAMES))
    }
}

/// `Logger`: body of `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `Metrics`: body of `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// `NetworkInterface`: body of `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    pub host_dev_name: String,
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `Vsock`: body of `PUT /vsock`. `guest_cid` is parsed wide so the VMM
/// can give its own "at least 3" message; it must also fit a `u32`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `Vm.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `Vm`: body of `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmState,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `SnapshotCreateParams`: body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub mem_file_path: String,
    pub snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: String,
}

/// `NetworkOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `VsockOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `SnapshotLoadParams.huge_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotHugePages {
    Snapshot,
    None,
    Transparent,
    #[serde(rename = "2M")]
    TwoMebibytes,
}

/// `SnapshotLoadParams`: body of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    pub snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<SnapshotHugePages>,
}

/// `InstanceInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

impl fmt::Display for InstanceState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::NotStarted => "Not started",
            Self::Running => "Running",
            Self::Paused => "Paused",
        })
    }
}

/// `InstanceInfo`: answer of `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
}

/// `FirecrackerVersion`: answer of `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// `FullVmConfiguration`: answer of `GET /vm/config`, limited to the
/// resources the fake implements. Unconfigured single resources are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullVmConfiguration {
    #[serde(rename = "boot-source")]
    pub boot_source: Option<BootSource>,
    pub drives: Vec<Drive>,
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfiguration,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
}

/// `Error`: the body of every 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_refused_and_named() {
        let error = serde_json::from_str::<BootSource>(
            r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#,
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("unknown field `kernel_args`"), "{message}");
        assert!(message.contains("`boot_args`"), "{message}");
    }

    #[test]
    fn missing_required_field_is_refused() {
        let error = serde_json::from_str::<Drive>(r#"{"drive_id": "rootfs"}"#).unwrap_err();
        assert!(error.to_string().contains("missing field `is_root_device`"));
    }

    #[test]
    fn wrong_type_is_refused() {
        let error = serde_json::from_str::<MachineConfiguration>(
            r#"{"vcpu_count": "2", "mem_size_mib": 512}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("invalid type"), "{error}");
    }

    #[test]
    fn negative_integer_is_refused() {
        let error =
            serde_json::from_str::<TokenBucket>(r#"{"refill_time": -1, "size": 10}"#).unwrap_err();
        assert!(error.to_string().contains("-1"), "{error}");
    }

    #[test]
    fn enum_values_are_exact() {
        assert!(
            serde_json::from_str::<InstanceActionInfo>(r#"{"action_type": "instancestart"}"#)
                .is_err()
        );
        let huge: MachineConfiguration =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 512, "huge_pages": "2M"}"#)
                .unwrap();
        assert_eq!(huge.huge_pages, Some(HugePages::Hugetlbfs2M));
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id": "a", "is_root_device": false, "cache_type": "WriteBack"}"#
        )
        .is_err());
    }

    #[test]
    fn log_level_is_case_insensitive() {
        let logger: Logger = serde_json::from_str(r#"{"level": "debug"}"#).unwrap();
        assert_eq!(logger.level, Some(LogLevel::Debug));
        let error = serde_json::from_str::<Logger>(r#"{"level": "verbose"}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown variant `verbose`"),
            "{error}"
        );
    }

    #[test]
    fn instance_state_uses_the_yaml_spelling() {
        let json = serde_json::to_value(InstanceState::NotStarted).unwrap();
        assert_eq!(json, "Not started");
    }

    #[test]
    fn empty_machine_configuration_update_is_detected() {
        let update: MachineConfigurationUpdate = serde_json::from_str("{}").unwrap();
        assert!(update.is_empty());
        let update: MachineConfigurationUpdate = serde_json::from_str(r#"{"smt": false}"#).unwrap();
        assert!(!update.is_empty());
    }
}
