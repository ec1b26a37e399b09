//! The command line: Firecracker's own flags, so the fake can be spawned by
//! the same code that spawns the real binary.

use std::path::PathBuf;

use clap::Parser;

use super::server::DEFAULT_MAX_PAYLOAD_SIZE;

/// A stand-in for the Firecracker VMM that serves and enforces its HTTP API
/// (see the `banger_testkit::fake_firecracker` docs).
#[derive(Debug, Parser)]
#[command(name = "fake-firecracker", disable_version_flag = true)]
pub struct Args {
    /// Path of the Unix socket to serve the API on; must not exist.
    #[arg(long, default_value = "/run/firecracker.socket")]
    pub api_sock: PathBuf,
    /// The microVM id: 1 to 64 alphanumeric characters or `-`.
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Not supported by the fake: refused.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Not supported by the fake: refused.
    #[arg(long)]
    pub no_api: bool,
    /// Configure the logger at start-up (a later `PUT /logger` is refused).
    #[arg(long)]
    pub log_path: Option<PathBuf>,
    /// Log level for `--log-path`, case-insensitive.
    #[arg(long)]
    pub level: Option<String>,
    /// Module filter for `--log-path`.
    #[arg(long)]
    pub module: Option<String>,
    /// Show the level in log lines (accepted, no effect).
    #[arg(long)]
    pub show_level: bool,
    /// Show the origin in log lines (accepted, no effect).
    #[arg(long)]
    pub show_log_origin: bool,
    /// Configure metrics at start-up (a later `PUT /metrics` is refused).
    #[arg(long)]
    pub metrics_path: Option<PathBuf>,
    /// Accepted, no effect.
    #[arg(long)]
    pub boot_timer: bool,
    /// Accepted, no effect (passed by the jailer).
    #[arg(long)]
    pub start_time_us: Option<u64>,
    /// Accepted, no effect (passed by the jailer).
    #[arg(long)]
    pub start_time_cpu_us: Option<u64>,
    /// Accepted, no effect (passed by the jailer).
    #[arg(long)]
    pub parent_cpu_time_us: Option<u64>,
    /// Accepted, no effect.
    #[arg(long)]
    pub seccomp_filter: Option<PathBuf>,
    /// Accepted, no effect.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_PAYLOAD_SIZE)]
    pub http_api_max_payload_size: usize,
    /// Accepted, no effect.
    #[arg(long)]
    pub mmds_size_limit: Option<usize>,
    /// Accepted, no effect.
    #[arg(long)]
    pub enable_pci: bool,
    /// Print `Firecracker v<version>` and exit.
    #[arg(long)]
    pub version: bool,
}
