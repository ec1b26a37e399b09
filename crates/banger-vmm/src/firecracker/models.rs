//! Request and response bodies of the Firecracker API, written from its
//! swagger definition (`shared/reference/firecracker-api.yaml`, v1.17), which
//! is the contract: field names and enum spellings are the swagger's, and
//! optional fields are left out of the JSON when unset.
//!
//! Only the definitions banger uses are modelled.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Swagger `InstanceActionInfo`: body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// Swagger `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// Swagger `BootSource`: body of `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// Swagger `Drive`: body of `PUT /drives/{drive_id}`. `is_read_only` and
/// `path_on_host` are required for virtio-block drives (the only kind banger
/// uses); `socket` is for vhost-user-block drives only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// Swagger `Drive.cache_type` (Firecracker's default: `Unsafe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// Swagger `Drive.io_engine` (Firecracker's default: `Sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// Swagger `RateLimiter`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    /// Bytes as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// Swagger `TokenBucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket.
    pub refill_time: u64,
    pub size: u64,
}

/// Swagger `MachineConfiguration`: body of `PUT /machine-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// 1 to 32; with SMT, 1 or even.
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Deprecated by Firecracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// Swagger `CpuTemplate` (deprecated by Firecracker).
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

/// Swagger `MachineConfiguration.huge_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    TwoMebibytes,
}

/// Swagger `Logger`: body of `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Named pipe or file; Firecracker does not create it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Swagger `Logger.level`. Firecracker accepts any letter case; banger sends
/// the swagger's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl LogLevel {
    pub const ALL: [Self; 6] = [
        Self::Error,
        Self::Warning,
        Self::Info,
        Self::Debug,
        Self::Trace,
        Self::Off,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "Error",
            Self::Warning => "Warning",
            Self::Info => "Info",
            Self::Debug => "Debug",
            Self::Trace => "Trace",
            Self::Off => "Off",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The string is not one of the swagger's log levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Unknown Firecracker log level {value:?} (expected Error, Warning, Info, Debug, Trace or Off)"
)]
pub struct ParseLogLevelError {
    pub value: String,
}

impl FromStr for LogLevel {
    type Err = ParseLogLevelError;

    /// Case-insensitive, like Firecracker.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(value))
            .ok_or_else(|| ParseLogLevelError {
                value: value.to_owned(),
            })
    }
}

/// Swagger `Metrics`: body of `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Named pipe or file; Firecracker does not create it.
    pub metrics_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// Swagger `NetworkInterface`: body of `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// Name of the host tap device.
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// Swagger `Vsock`: body of `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// At least 3.
    pub guest_cid: u32,
    /// Firecracker creates, binds and listens on this socket for
    /// host-initiated connections (`CONNECT <port>\n`); guest-initiated ones
    /// go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
    /// Deprecated by Firecracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// Swagger `InstanceInfo`: response of `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
}

/// Swagger `InstanceInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// Swagger `Vm`: body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub state: VmState,
}

/// Swagger `Vm.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// Swagger `SnapshotCreateParams`: body of `PUT /snapshot/create` (only
/// while the microVM is paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub mem_file_path: PathBuf,
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Swagger `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// Swagger `SnapshotLoadParams`: body of `PUT /snapshot/load` (only on a
/// fresh process, before any resource but the logger and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// Swagger `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

/// Swagger `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// Swagger `NetworkOverride`: the tap a restored interface uses instead of
/// the one recorded in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// Swagger `VsockOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// Swagger `Error`: body of every error response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_fields_are_left_out() {
        let drive = Drive {
            drive_id: "rootfs".into(),
            is_root_device: true,
            is_read_only: Some(false),
            path_on_host: Some("/var/lib/banger/vm/rootfs.ext4".into()),
            ..Drive::default()
        };
        assert_eq!(
            serde_json::to_value(&drive).unwrap(),
            json!({
                "drive_id": "rootfs",
                "is_root_device": true,
                "is_read_only": false,
                "path_on_host": "/var/lib/banger/vm/rootfs.ext4",
            })
        );
        let boot_source = BootSource {
            kernel_image_path: "/k".into(),
            boot_args: None,
            initrd_path: None,
        };
        assert_eq!(
            serde_json::to_value(&boot_source).unwrap(),
            json!({"kernel_image_path": "/k"})
        );
    }

    #[test]
    fn enum_spellings_follow_the_swagger() {
        for (action, name) in [
            (ActionType::FlushMetrics, "FlushMetrics"),
            (ActionType::InstanceStart, "InstanceStart"),
            (ActionType::SendCtrlAltDel, "SendCtrlAltDel"),
        ] {
            assert_eq!(
                serde_json::to_value(InstanceActionInfo {
                    action_type: action
                })
                .unwrap(),
                json!({ "action_type": name })
            );
        }
        assert_eq!(
            serde_json::to_value(HugePages::TwoMebibytes).unwrap(),
            json!("2M")
        );
        assert_eq!(
            serde_json::to_value(LogLevel::Warning).unwrap(),
            json!("Warning")
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "app_name": "Firecracker",
            "id": "vm-1",
            "state": "Not started",
            "vmm_version": "1.17.0",
        }))
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
    }

    #[test]
    fn log_levels_parse_case_insensitively() {
        assert_eq!("warning".parse::<LogLevel>().unwrap(), LogLevel::Warning);
        assert_eq!("TRACE".parse::<LogLevel>().unwrap(), LogLevel::Trace);
        assert_eq!(
            "loud".parse::<LogLevel>().unwrap_err().to_string(),
            "Unknown Firecracker log level \"loud\" (expected Error, Warning, Info, Debug, Trace or Off)"
        );
    }

    #[test]
    fn error_body_tolerates_a_missing_fault_message() {
        let body: ErrorResponse = serde_json::from_str("{}").unwrap();
        assert_eq!(body.fault_message, None);
    }
}
