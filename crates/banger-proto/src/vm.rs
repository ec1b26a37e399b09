//! VM records and the parameters of the `vm.*` methods.

use serde::{Deserialize, Serialize};

use crate::Backend;

/// Lifecycle state. `creating → starting → running → stopping → stopped`,
/// plus `failed` (the error is kept in [`Vm::error`]) and `crashed` (the VMM
/// process died without being asked to).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Crashed,
    /// The VMM runs with the guest's vCPUs stopped (`vm pause`).
    Paused,
}

impl VmState {
    pub const ALL: [VmState; 8] = [
        Self::Creating,
        Self::Starting,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Crashed,
        Self::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Crashed => "crashed",
            Self::Paused => "paused",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    /// States in which a VMM process may exist for the VM.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Stopping | Self::Paused
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A VM as the daemon reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub state: VmState,
    /// Image name.
    pub image: String,
    /// Kernel name.
    pub kernel: String,
    pub backend: Backend,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Root disk size in bytes.
    pub disk_bytes: u64,
    /// VMM process id while one exists.
    pub pid: Option<u32>,
    /// RFC 3339 timestamps.
    pub created_at: String,
    pub started_at: Option<String>,
    /// The last error, kept for `failed` and `crashed` VMs.
    pub error: Option<String>,
    /// Per-VM directory on the host (root disk, sockets, logs).
    pub dir: String,
    /// The VM's network identity, when networking is on.
    #[serde(default)]
    pub network: Option<VmNetwork>,
    /// Name of the work disk attached to the VM (mounted at /root in the guest).
    #[serde(default)]
    pub work_disk: Option<String>,
}

/// A persistent ext4 disk for a VM's work, mounted at `/root` in the guest.
/// It outlives the VM with `vm delete --keep-work-disk` and is attached to
/// at most one VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkDisk {
    pub id: String,
    pub name: String,
    /// The ext4 file on the host.
    pub path: String,
    pub size_bytes: u64,
    /// Id of the VM it is attached to.
    pub vm_id: Option<String>,
    /// Name of that VM (filled in by the daemon).
    #[serde(default)]
    pub vm: Option<String>,
    pub created_at: String,
}

/// Parameters of `disk.create`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateDiskParams {
    pub name: String,
    /// A size such as `10G`, `512M` or a byte count.
    pub size: String,
}

/// Parameters of `disk.resize` (grow only; the VM using it must be stopped).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResizeDiskParams {
    pub name: String,
    pub size: String,
}

/// Parses `10G`, `512M`, `1T`, `4096K` or a plain byte count (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(index) => text.split_at(index),
        None => (text, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 10G, 512M)"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{text}` has an unknown unit (use K, M, G or T)")),
    };
    number
        .checked_mul(1 << shift)
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("`{text}` is not a usable size"))
}

/// A VM's address, tap, MAC and DNS name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmNetwork {
    pub ip: String,
    pub mac: String,
    pub tap: String,
    /// `NAME.DOMAIN`, answered by the daemon's DNS server.
    #[serde(default)]
    pub dns_name: String,
    /// Host ports forwarded to the VM.
    #[serde(default)]
    pub ports: Vec<crate::netpolicy::PublishedPort>,
    /// Where the VM may send traffic.
    #[serde(default)]
    pub egress: crate::netpolicy::EgressPolicy,
    /// The network group whose VMs it may talk to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_group: Option<String>,
}

/// Parameters of `vm.create`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVmParams {
    pub name: String,
    /// Image name; the configured default when absent.
    #[serde(default)]
    pub image: Option<String>,
    /// Kernel name; the configured default when absent.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Create the VM stopped.
    #[serde(default)]
    pub no_start: bool,
    /// The daemon's default when absent.
    #[serde(default)]
    pub backend: Option<Backend>,
    /// A size (`10G`): a new work disk for the VM; or the name of a detached one.
    #[serde(default)]
    pub work_disk: Option<String>,
    /// Copy a workspace into the VM as the `workspace` stage, from the upload
    /// the caller sends with `vm.workspace.upload` (not with `no_start`).
    #[serde(default)]
    pub workspace: Option<crate::workspace::WorkspaceSpec>,
    /// Host ports to forward to the VM (`-p`).
    #[serde(default)]
    pub ports: Vec<crate::netpolicy::PublishedPort>,
    /// Where the VM may send traffic; allow-all when absent.
    #[serde(default)]
    pub egress: Option<crate::netpolicy::EgressPolicy>,
    /// Lets the VM talk to the other VMs of this group.
    #[serde(default)]
    pub network_group: Option<String>,
    /// Start from this snapshot's memory and disks instead of booting the
    /// image (image, kernel, size and backend are the snapshot's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// With `from_snapshot`: the guest regenerates its SSH host keys
    /// instead of keeping the snapshot's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub regen_host_keys: bool,
}

/// Result of `vm.create`: the operation to watch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateVmResult {
    pub operation_id: String,
    pub vm_id: String,
}

/// Result of `vm.stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStats {
    pub vm: Vm,
    /// What the guest agent reports.
    pub guest: crate::agent::GuestStats,
    /// The VMM process as the host sees it.
    pub vmm: VmmProcessStats,
}

/// A VMM process's resource use, from `/proc/PID`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VmmProcessStats {
    pub pid: u32,
    /// Resident memory of the whole VMM (guest memory it touched included).
    pub rss_bytes: u64,
    /// User plus system CPU time since the VMM started.
    pub cpu_seconds: f64,
    pub threads: u32,
}

/// A VM named by name or by a unique id prefix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub vm: String,
}

/// Parameters of `vm.stop`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StopVmParams {
    pub vm: String,
    /// Kill the VMM at once instead of asking the guest to shut down.
    #[serde(default)]
    pub force: bool,
}

/// Parameters of `vm.delete`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeleteVmParams {
    pub vm: String,
    /// Delete a VM that is running (killing it) or in a transitional state.
    #[serde(default)]
    pub force: bool,
    /// Detach the work disk and keep it instead of deleting it.
    #[serde(default)]
    pub keep_work_disk: bool,
}

/// Parameters of `vm.set` (stopped VMs only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetVmParams {
    pub vm: String,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Grow the root disk to this size (never shrinks).
    #[serde(default)]
    pub disk_size: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn state_names_round_trip() {
        for state in VmState::ALL {
            assert_eq!(VmState::parse(state.as_str()), Some(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::from(state.as_str())
            );
        }
        assert_eq!(VmState::parse("bogus"), None);
    }

    #[test]
    fn create_params_refuse_unknown_fields() {
        let error = serde_json::from_str::<CreateVmParams>(r#"{"name":"a","cpus":2}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `cpus`"),
            "{error}"
        );
    }

    #[test]
    fn create_params_refuse_unknown_backends() {
        let params: CreateVmParams =
            serde_json::from_str(r#"{"name":"a","backend":"qemu"}"#).unwrap();
        assert_eq!(params.backend, Some(Backend::Qemu));
        let error = serde_json::from_value::<CreateVmParams>(
            serde_json::json!({"name": "a", "backend": "foo"}),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "unknown variant `foo`, expected `firecracker` or `qemu`"
        );
    }
}

/// Parameters of `vm.logs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogsParams {
    pub vm: String,
    /// Only the last lines of what is there (across `console.log.1` and
    /// `console.log`); all of it when absent.
    #[serde(default)]
    pub tail: Option<u64>,
    /// Go on with what the guest appends until the VMM exits.
    #[serde(default)]
    pub follow: bool,
}

/// Result of `vm.logs`: the log's frames follow.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogsStarted {
    /// The VM's name.
    pub vm: String,
    /// Whether the stream follows a running VMM (`follow` and the VM runs).
    pub following: bool,
}

/// The `End` frame of `vm.logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogsEnded {
    /// Bytes sent.
    pub bytes: u64,
}
