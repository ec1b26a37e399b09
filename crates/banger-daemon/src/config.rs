//! `bangerd`'s TOML configuration. Every key has a default; unknown keys and
//! bad values are refused at start with one line naming the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::Backend;
use serde::{Deserialize, Deserializer};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/banger/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/banger";
pub const DEFAULT_SOCKET_PATH: &str = "/run/banger/bangerd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Failed to read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("Invalid config {path}: `{key}` {problem}")]
    Value {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub access: AccessConfig,
    pub vm: VmDefaults,
    pub vmm: VmmConfig,
    pub firecracker: FirecrackerConfig,
    pub qemu: QemuConfig,
    pub storage: StorageConfig,
    pub catalog: CatalogConfig,
    pub network: NetworkConfig,
    pub agent: AgentConfig,
}

/// The guest agent (see docs/agent-protocol.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Create and start wait for the agent's hello (the `agent ready`
    /// stage). Off for kernels and images that carry no agent.
    pub wait: bool,
    /// How long start waits for the hello before the VM counts as failed.
    pub ready_timeout_seconds: u64,
    /// The static agent binary packed into generated initramfs images
    /// (`kernel import --from-debian`); unset: `banger-agent` next to
    /// `bangerd`, then /usr/local/lib/banger/banger-agent, then
    /// /usr/lib/banger/banger-agent.
    pub path: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            wait: true,
            ready_timeout_seconds: 120,
            path: None,
        }
    }
}

impl AgentConfig {
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout_seconds)
    }
}

/// Host networking for VMs (see docs/networking.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Off: VMs get no NIC and the daemon touches no network setting.
    pub enabled: bool,
    pub bridge: String,
    /// The gateway address with the prefix, e.g. `172.30.0.1/24`.
    pub subnet: String,
    /// The interface NAT sends traffic out of; empty: the default route's.
    pub uplink: String,
    /// VMs cannot reach each other.
    pub isolate_vms: bool,
    /// VM names are answered as `NAME.DOMAIN`.
    pub domain: String,
    /// Where other names are forwarded; empty: the host's /etc/resolv.conf.
    pub dns_upstreams: Vec<String>,
    pub dns_port: u16,
    /// Remove the pooled taps, the NAT table and the bridge when the daemon
    /// stops.
    pub teardown_on_exit: bool,
    /// Taps kept ready on the bridge so creates need not make one; 0: none.
    pub tap_pool_size: u32,
    /// Where systemd-resolved runs, route `~DOMAIN` queries from the host
    /// to the daemon's DNS server.
    pub resolved: bool,
}

/// More pooled taps than this would only clutter the host's link list.
pub const MAX_TAP_POOL_SIZE: u32 = 64;

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bridge: "banger0".to_owned(),
            subnet: "172.30.0.1/24".to_owned(),
            uplink: String::new(),
            isolate_vms: true,
            domain: "banger".to_owned(),
            dns_upstreams: Vec::new(),
            dns_port: 53,
            teardown_on_exit: false,
            tap_pool_size: 4,
            resolved: true,
        }
    }
}

/// Where images and kernels can be pulled from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// The catalog: an http(s) URL, a `file://` URL or a path; empty for none.
    pub url: String,
    /// How long a fetched catalog is used before it is fetched again.
    pub max_age_seconds: u64,
    /// Keyrings (`gpg --export` output) that signatures are checked
    /// against. When set, every pulled file (image, kernel, initrd) must be
    /// signed by one of their keys.
    pub keyrings: Vec<PathBuf>,
    /// Fetch the catalog and its files over plain `http:` too (anyone on
    /// the network path can then change them). Off: only https and local
    /// files.
    pub allow_insecure_http: bool,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_age_seconds: 3600,
            keyrings: Vec::new(),
            allow_insecure_http: false,
        }
    }
}

/// Disks and image imports.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// How root disks are made from images: `auto` (reflink where the state
    /// dir's filesystem supports it, else dm-snapshot where device-mapper
    /// works, else copy), `reflink`, `dm-snapshot` or `copy`.
    pub clone: String,
    /// Let imported archives create device nodes and FIFOs.
    pub allow_device_nodes: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            clone: "auto".to_owned(),
            allow_device_nodes: false,
        }
    }
}

/// Who may use the control socket besides root.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    pub group: String,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            group: "banger".to_owned(),
        }
    }
}

/// Defaults for `vm create`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct VmDefaults {
    pub image: String,
    pub kernel: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// How long `vm stop` waits for the guest to shut down before killing it.
    pub stop_grace_seconds: u64,
    /// Largest disk (root or work) a VM may have, e.g. `"100G"`. Without it
    /// a disk may grow by at most the free space of the state directory's
    /// file system (which applies either way).
    pub max_disk_size: Option<String>,
    /// Size at which a VM's `console.log` is rotated to `console.log.1`
    /// (e.g. `"8M"`; at least 64K).
    pub console_log_max: String,
    /// Root disks of the default image to keep cloned ahead of time, so a
    /// create of that image does no copy on its path (0: none).
    pub warm_pool: usize,
}

/// Default of `[vm] console_log_max`.
pub const DEFAULT_CONSOLE_LOG_MAX: u64 = 8 << 20;
/// Smallest `[vm] console_log_max`.
pub const MIN_CONSOLE_LOG_MAX: u64 = 64 << 10;

impl VmDefaults {
    /// `max_disk_size` in bytes (validated when the config was loaded).
    pub fn max_disk_bytes(&self) -> Option<u64> {
        self.max_disk_size
            .as_deref()
            .and_then(|size| banger_proto::parse_size(size).ok())
    }

    /// `console_log_max` in bytes (validated when the config was loaded).
    pub fn console_log_max_bytes(&self) -> u64 {
        banger_proto::parse_size(&self.console_log_max).unwrap_or(DEFAULT_CONSOLE_LOG_MAX)
    }
}

impl Default for VmDefaults {
    fn default() -> Self {
        Self {
            image: "default".to_owned(),
            kernel: "default".to_owned(),
            vcpus: 2,
            memory_mib: 1024,
            stop_grace_seconds: 10,
            max_disk_size: None,
            console_log_max: "8M".to_owned(),
            warm_pool: 0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct VmmConfig {
    /// The backend new VMs use.
    pub backend: BackendSetting,
}

/// `[vmm] backend`: `auto`, `firecracker` or `qemu`. Anything else is
/// refused when the config is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendSetting {
    /// Firecracker when its binary is present and KVM is usable, else QEMU.
    #[default]
    Auto,
    Fixed(Backend),
}

impl std::str::FromStr for BackendSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            other => other
                .parse()
                .map(Self::Fixed)
                .map_err(|_| format!("must be one of auto, firecracker, qemu, not {other:?}")),
        }
    }
}

impl<'de> Deserialize<'de> for BackendSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(|problem| serde::de::Error::custom(format!("`vmm.backend` {problem}")))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`: a path, or a name looked up in `PATH`.
    pub binary: PathBuf,
    /// `auto` (KVM when a probe guest really runs under it, else TCG),
    /// `kvm` or `tcg`.
    pub accel: String,
    /// How long QEMU may take to answer on QMP after starting.
    pub startup_timeout_ms: u64,
    /// Drop QEMU's privileges (`-runas` the VMM user), confine it with
    /// `-sandbox`, and put it in its own cgroup.
    pub jailed: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: "auto".to_owned(),
            startup_timeout_ms: 10_000,
            jailed: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The Firecracker binary: a path, or a name looked up in `PATH`.
    pub binary: PathBuf,
    /// Timeout of one API request.
    pub api_timeout_ms: u64,
    /// How long a freshly spawned Firecracker may take to open its API socket.
    pub startup_timeout_ms: u64,
    /// Firecracker's own log level (`Error`, `Warning`, `Info`, `Debug`).
    pub log_level: String,
    /// Firecracker's jailer: a path, or a name looked up in `PATH`.
    pub jailer: PathBuf,
    /// Run Firecracker under the jailer (chroot, unprivileged user, PID and
    /// mount namespaces, cgroup limits).
    pub jailed: bool,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("firecracker"),
            api_timeout_ms: 5_000,
            startup_timeout_ms: 5_000,
            log_level: "Warning".to_owned(),
            jailer: PathBuf::from("jailer"),
            jailed: true,
        }
    }
}

pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEMORY_MIB: u32 = 128;

impl Config {
    /// Loads `path`. A missing file is the all-defaults config only when
    /// `required` is false (the default path); a path the user named must exist.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(&error, text),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, problem: String| ConfigError::Value {
            path: path.to_owned(),
            key,
            problem,
        };
        if self.vm.vcpus == 0 || self.vm.vcpus > MAX_VCPUS {
            return Err(bad(
                "vm.vcpus",
                format!("must be between 1 and {MAX_VCPUS}, not {}", self.vm.vcpus),
            ));
        }
        if let Some(size) = &self.vm.max_disk_size {
            banger_proto::parse_size(size).map_err(|problem| bad("vm.max_disk_size", problem))?;
        }
        match banger_proto::parse_size(&self.vm.console_log_max) {
            Ok(bytes) if bytes >= MIN_CONSOLE_LOG_MAX => {}
            Ok(_) => {
                return Err(bad(
                    "vm.console_log_max",
                    format!("must be at least 64K, not {}", self.vm.console_log_max),
                ))
            }
            Err(problem) => return Err(bad("vm.console_log_max", problem)),
        }
        if self.vm.memory_mib < MIN_MEMORY_MIB {
            return Err(bad(
                "vm.memory_mib",
                format!(
                    "must be at least {MIN_MEMORY_MIB}, not {}",
                    self.vm.memory_mib
                ),
            ));
        }
        if !["auto", "kvm", "tcg"].contains(&self.qemu.accel.as_str()) {
            return Err(bad(
                "qemu.accel",
                format!("must be one of auto, kvm, tcg, not {:?}", self.qemu.accel),
            ));
        }
        if self.agent.ready_timeout_seconds == 0 {
            return Err(bad(
                "agent.ready_timeout_seconds",
                "must be positive".to_owned(),
            ));
        }
        if self.firecracker.binary.as_os_str().is_empty() {
            return Err(bad("firecracker.binary", "must not be empty".to_owned()));
        }
        if self.firecracker.jailer.as_os_str().is_empty() {
            return Err(bad("firecracker.jailer", "must not be empty".to_owned()));
        }
        if self.firecracker.api_timeout_ms == 0 || self.firecracker.startup_timeout_ms == 0 {
            return Err(bad(
                "firecracker.api_timeout_ms",
                "and startup_timeout_ms must be positive".to_owned(),
            ));
        }
        if !["Error", "Warning", "Info", "Debug", "Trace", "Off"]
            .contains(&self.firecracker.log_level.as_str())
        {
            return Err(bad(
                "firecracker.log_level",
                format!(
                    "must be one of Error, Warning, Info, Debug, Trace, Off, not {:?}",
                    self.firecracker.log_level
                ),
            ));
        }
        if !["auto", "reflink", "dm-snapshot", "copy"].contains(&self.storage.clone.as_str()) {
            return Err(bad(
                "storage.clone",
                format!(
                    "must be one of auto, reflink, dm-snapshot, copy, not {:?}",
                    self.storage.clone
                ),
            ));
        }
        if self.network.tap_pool_size > MAX_TAP_POOL_SIZE {
            return Err(bad(
                "network.tap_pool_size",
                format!(
                    "must be at most {MAX_TAP_POOL_SIZE}, not {}",
                    self.network.tap_pool_size
                ),
            ));
        }
        let url = self.catalog.url.trim();
        let plain_http = url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
        if plain_http && !self.catalog.allow_insecure_http {
            return Err(bad(
                "catalog.url",
                format!(
                    "{url} is plain http; use https, or set `catalog.allow_insecure_http = true`"
                ),
            ));
        }
        if self.access.group.is_empty() {
            return Err(bad("access.group", "must not be empty".to_owned()));
        }
        Ok(())
    }

    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.vm.stop_grace_seconds)
    }
}

/// toml's errors span several lines with a source excerpt; the daemon reports
/// one line: `line N: message`.
fn one_line(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/banger/config.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.access.group, "banger");
        assert_eq!(config.vm.vcpus, 2);
        assert_eq!(config.firecracker.binary, PathBuf::from("firecracker"));
    }

    #[test]
    fn keys_override_defaults() {
        let config = parse(
            "[vm]\nvcpus = 4\nmemory_mib = 2048\n[firecracker]\nbinary = \"/opt/fc\"\n[access]\ngroup = \"wheel\"\n",
        )
        .unwrap();
        assert_eq!(config.vm.vcpus, 4);
        assert_eq!(config.vm.memory_mib, 2048);
        assert_eq!(config.vm.image, "default");
        assert_eq!(config.firecracker.binary, PathBuf::from("/opt/fc"));
        assert_eq!(config.access.group, "wheel");
    }

    #[test]
    fn unknown_key_is_one_line_naming_it() {
        let error = parse("[vm]\nvcpus = 2\ncpus = 4\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `cpus`"), "{error}");
        assert!(error.contains("line 3"), "{error}");
        assert!(!error.contains('\n'), "{error}");
        let error = parse("[turbo]\n").unwrap_err().to_string();
        assert!(error.contains("unknown field `turbo`"), "{error}");
    }

    #[test]
    fn bad_values_are_refused() {
        let error = parse("[vm]\nvcpus = 0\n").unwrap_err().to_string();
        assert_eq!(
            error,
            "Invalid config /etc/banger/config.toml: `vm.vcpus` must be between 1 and 32, not 0"
        );
        assert!(parse("[vm]\nmemory_mib = 64\n").is_err());
        assert!(parse("[vm]\nvcpus = \"two\"\n")
            .unwrap_err()
            .to_string()
            .contains("invalid type"));
        assert!(parse("[firecracker]\nlog_level = \"loud\"\n").is_err());
        assert!(parse("[storage]\nclone = \"magic\"\n")
            .unwrap_err()
            .to_string()
            .contains("`storage.clone` must be one of"));
    }

    #[test]
    fn plain_http_catalogs_need_the_opt_in() {
        let error = parse("[catalog]\nurl = \"http://mirror.example/catalog.toml\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "Invalid config /etc/banger/config.toml: `catalog.url` http://mirror.example/catalog.toml is plain http; use https, or set `catalog.allow_insecure_http = true`"
        );
        assert!(parse("[catalog]\nurl = \"HTTP://mirror.example/c\"\n").is_err());
        let allowed =
            parse("[catalog]\nurl = \"http://mirror.example/c\"\nallow_insecure_http = true\n")
                .unwrap();
        assert!(allowed.catalog.allow_insecure_http);
        assert!(!parse("").unwrap().catalog.allow_insecure_http);
        assert!(parse("[catalog]\nurl = \"https://mirror.example/c\"\n").is_ok());
        assert!(parse("[catalog]\nurl = \"/srv/catalog.toml\"\n").is_ok());
    }

    #[test]
    fn backend_is_auto_or_a_known_backend() {
        assert_eq!(parse("").unwrap().vmm.backend, BackendSetting::Auto);
        assert_eq!(
            parse("[vmm]\nbackend = \"qemu\"\n").unwrap().vmm.backend,
            BackendSetting::Fixed(Backend::Qemu)
        );
        assert_eq!(
            parse("[vmm]\nbackend = \"xen\"\n")
                .unwrap_err()
                .to_string(),
            "Invalid config /etc/banger/config.toml: line 2: `vmm.backend` must be one of auto, firecracker, qemu, not \"xen\""
        );
    }

    #[test]
    fn network_pool_and_resolved_settings() {
        let config = parse("").unwrap();
        assert_eq!(config.network.tap_pool_size, 4);
        assert!(config.network.resolved);
        let config = parse("[network]\ntap_pool_size = 0\nresolved = false\n").unwrap();
        assert_eq!(config.network.tap_pool_size, 0);
        assert!(!config.network.resolved);
        assert_eq!(
            parse("[network]\ntap_pool_size = 65\n")
                .unwrap_err()
                .to_string(),
            "Invalid config /etc/banger/config.toml: `network.tap_pool_size` must be at most 64, not 65"
        );
    }

    #[test]
    fn missing_file_is_defaults_only_when_optional() {
        let path = Path::new("/nonexistent/banger.toml");
        assert_eq!(Config::load(path, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(path, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
