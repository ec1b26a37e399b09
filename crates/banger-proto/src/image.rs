//! Image and kernel records and their method parameters.

use serde::{Deserialize, Serialize};

/// A root filesystem image registered with the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub name: String,
    /// Path of the ext4 file in the state dir.
    pub path: String,
    pub size_bytes: u64,
    /// `sha256:<hex>` of the ext4 file.
    pub digest: String,
    /// Where it came from (the imported path).
    pub source: String,
    pub created_at: String,
}

/// A guest kernel registered with the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kernel {
    pub id: String,
    pub name: String,
    pub kernel_path: String,
    pub initrd_path: Option<String>,
    /// Default kernel command line; banger appends its own arguments.
    pub cmdline: String,
    pub source: String,
    pub created_at: String,
}

/// Parameters of `image.import`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportImageParams {
    pub name: String,
    /// Absolute path on the host, readable by the caller.
    pub path: String,
}

/// Parameters of `kernel.import`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportKernelParams {
    pub name: String,
    /// The kernel image; empty with `from_debian`.
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Import a Debian kernel and generate its initramfs (modules and the
    /// guest agent): `""` for the newest installed on the host, a release
    /// (`6.1.0-48-cloud-amd64`), or an absolute path to an unpacked package.
    /// Excludes `path` and `initrd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_debian: Option<String>,
}

/// Parameters of `image.pull` and `kernel.pull`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PullParams {
    /// The catalog entry's name; also the local name.
    pub name: String,
    /// The catalog version; the highest when absent.
    #[serde(default)]
    pub version: Option<String>,
}

/// Result of calls that start an operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperationStarted {
    pub operation_id: String,
}

/// Parameters of `image.rm`, `kernel.rm`, `image.show`, `kernel.show`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    pub name: String,
}
