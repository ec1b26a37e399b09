//! `fake-firecracker`: a stand-in for the Firecracker VMM (v1.17) in tests.
//!
//! It takes Firecracker's flags, serves Firecracker's HTTP API on the same
//! Unix socket and refuses what the real one refuses, so that banger's
//! client and create steps can be tested without KVM. The request models
//! are transcribed independently from `firecracker-api.yaml` (see
//! [`models`]), never shared with the client.
//!
//! # Running it
//!
//! `fake-firecracker --api-sock PATH --id ID`. `--api-sock` must not exist
//! (exit 1 otherwise, like the real binary); `--id` must be 1 to 64
//! alphanumeric characters or `-`. `--version` prints `Firecracker v1.17.0`.
//! The other real flags are accepted: `--log-path`/`--level`/`--module` and
//! `--metrics-path` configure the logger and metrics at start-up,
//! `--http-api-max-payload-size` sets the body limit (default 51200), the
//! rest (`--boot-timer`, `--seccomp-filter`, `--no-seccomp`,
//! `--start-time-us`, …) are ignored. `--config-file` and `--no-api` are
//! refused (exit 1): the fake only boots through the API.
//!
//! # The API it serves
//!
//! | operation | notes |
//! |---|---|
//! | `GET /` | `InstanceInfo`: `app_name` "Firecracker", `id`, `state` ("Not started", "Running", "Paused"), `vmm_version` |
//! | `GET /version` | `{"firecracker_version": "1.17.0"}` |
//! | `PUT /actions` | `InstanceStart`, `SendCtrlAltDel`, `FlushMetrics` |
//! | `PUT /boot-source` | kernel (and initrd if given) must open; `boot_args` printable ASCII, ≤ 2047 bytes |
//! | `PUT /drives/{drive_id}` | see below |
//! | `GET`, `PUT`, `PATCH /machine-config` | `vcpu_count` 1..=32 (1 or even with `smt`), `mem_size_mib` ≥ 1 (even with `huge_pages` "2M"); PUT resets omitted optionals to defaults; an empty PATCH is refused |
//! | `PUT /logger` | `log_path` opened for append (created if missing); once only |
//! | `PUT /metrics` | `metrics_path` opened for append (created if missing); once only |
//! | `PUT /network-interfaces/{iface_id}` | `host_dev_name` 1..=15 bytes, unique; `guest_mac` `xx:xx:xx:xx:xx:xx`, unique; `mtu` 68..=65535 |
//! | `PUT /vsock` | `guest_cid` ≥ 3 (and a `u32`); `uds_path` is bound *at this request*, so an existing file there is refused |
//! | `PATCH /vm` | `Paused` / `Resumed`, post-boot only |
//! | `PUT /snapshot/create` | Paused only ("…the vCPUs are running; pause the microVM first."); `Diff` needs `track_dirty_pages`; writes the state file (the configuration as JSON) and a sparse memory file of `mem_size_mib` starting `fake guest memory of <id>` |
//! | `PUT /snapshot/load` | only before any boot resource ("Loading a microVM snapshot not allowed after configuring boot-specific resources."); one of `mem_file_path`/`mem_backend` (`File`; `Uffd` not implemented); the state and memory files must open, the recorded drives reopen, each `network_overrides` id must exist; `vsock_override` moves the socket; `resume_vm` runs the guest (as `InstanceStart`), else Paused until `PATCH /vm` `Resumed` |
//! | `GET /vm/config` | `FullVmConfiguration` of what was configured (implemented resources only; unset ones `null`) |
//!
//! Every body is parsed with unknown fields refused, required fields
//! required, exact types and exact enum spellings (`Logger.level` is
//! case-insensitive, as the yaml says). Ids in paths must be 1 to 64
//! alphanumeric characters or `_` and equal the body's id. Drives: a
//! virtio-block drive needs `path_on_host` (opened read-write unless
//! `is_read_only`) and `is_read_only`; a vhost-user-block drive has `socket`
//! (which must exist) and none of `path_on_host`, `is_read_only`,
//! `rate_limiter`, `io_engine`; only one drive may be the root device.
//!
//! Answers: success is `204 No Content` with an empty body (or `200` with
//! JSON for the GETs); every error is `400` with
//! `{"fault_message": "..."}`. Body parse errors read "An error occurred
//! when deserializing the json body of a request: " followed by serde's
//! message, e.g. "unknown field `foo`, expected one of `…`" or "missing
//! field `kernel_image_path`". Unknown paths answer "Invalid request method
//! and/or path: PUT /foo."; operations the yaml defines but the fake does
//! not implement (balloon, mmds, pmem, entropy, serial,
//! cpu-config, memory hotplug, PATCH of drives and network interfaces)
//! answer "fake-firecracker does not implement PUT /balloon.".
//!
//! # State machine
//!
//! 1. Before `InstanceStart`: all configuration operations are accepted;
//!    `SendCtrlAltDel`, `FlushMetrics` and `PATCH /vm` answer "The requested
//!    operation is not supported before starting the microVM.".
//! 2. `InstanceStart` without a boot source answers "Cannot start microvm
//!    without kernel configuration.". On success the fake prints two
//!    console lines to stdout (`fake-firecracker: booting kernel <path>
//!    cmdline <args>` and `fake-firecracker: guest running`) and appends
//!    "Successfully started microvm" to the log file, if any.
//! 3. After it: every configuration operation, and `InstanceStart` again,
//!    answer "The requested operation is not supported after starting the
//!    microVM.". The process stays up as the "VM" until it is told to go.
//! 4. `SendCtrlAltDel`: exit 0 about 100 ms later. SIGTERM or SIGINT: exit 0
//!    at once. Both remove the API socket; the vsock socket is left behind,
//!    as it is by the real VMM, for the client to clean up.
//!
//! # Steering it from a test (environment variables)
//!
//! - `FAKE_FIRECRACKER_REQUEST_LOG=/path/file.jsonl`: append one JSON line
//!   per request received, after it is answered:
//!   `{"method":"PUT","path":"/drives/rootfs","body":<JSON body or null>,"status":204,"id":"<--id>"}`.
//!   `body` is `null` when the body is empty or not JSON; `path` has no
//!   query string. The file is opened `O_APPEND` and each line is one
//!   `write`, so several fakes may share one file.
//! - `FAKE_FIRECRACKER_FAIL="PUT /drives/rootfs,PUT /network-interfaces/*"`:
//!   comma-separated `METHOD path` entries; `path` is matched exactly, or as
//!   a prefix when it ends in `*`; the method is case-insensitive and `*`
//!   matches any method. A matching request answers 400 `injected failure`
//!   and changes nothing.
//! - `FAKE_FIRECRACKER_DELAY="PUT /actions=2000"`: comma-separated
//!   `METHOD path=MILLISECONDS` entries (same patterns; the first match
//!   wins): the request is held that long *before* it is processed. A
//!   request that has been read is processed even if the client hangs up
//!   meanwhile (as by the real VMM): a create cancelled during a held
//!   `InstanceStart` still gets a "booted" fake, which the client must kill.
//! - `FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS=N`: N ms after a successful
//!   `InstanceStart`, exit with code 1, leaving the API socket behind, as a
//!   crashed VMM would.
//! - `FAKE_FIRECRACKER_VSOCK_AGENT=/path/agent.sock`: after boot, host
//!   connections to the vsock `uds_path` that send `CONNECT <port>\n` are
//!   answered `OK <host_port>\n` and proxied to this Unix socket (any port);
//!   see [`vsock`] for the protocol. Without it, such connections are closed
//!   after the `CONNECT` line, as when no guest listens.
//!
//! - `FAKE_FIRECRACKER_GUEST_AGENT_BIN=/path/banger-agent` (and optionally
//!   `FAKE_FIRECRACKER_GUEST_AGENT_SSH_DIR` and
//!   `FAKE_FIRECRACKER_GUEST_AGENT_COMMAND_PATH`, the `PATH` it runs
//!   commands with): at `InstanceStart`, run that
//!   agent in test mode (`--listen-unix` next to the vsock socket) as the
//!   VM's guest and bridge vsock connections to it (its announcement goes,
//!   as a guest-initiated connection, to `<uds_path>_1025`); when it exits (a host
//!   asked it to shut down) the VMM exits 0, as after a guest power-off.
//!
//! - `FAKE_FIRECRACKER_CONSOLE_TEXT=TEXT`: written on the console after the
//!   boot lines, as it is (a hostile guest's escape sequences, for tests of
//!   what reaches the user).
//!
//! - `FAKE_FIRECRACKER_JAILED` (set by `fake-jailer`): every absolute path
//!   in the flags and the API (`--api-sock`, kernel, initrd, drives, log,
//!   metrics, vsock) is resolved under the working directory, which the
//!   fake jailer sets to the chroot root: the paths a jailed Firecracker is
//!   given are chroot paths.
//!
//! A malformed value in any of these is a start-up error (exit 1).

pub mod cli;
pub mod models;
pub mod router;
pub mod server;
pub mod settings;
pub mod vmm;
pub mod vsock;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use self::cli::Args;
use self::models::{LogLevel, Logger, Metrics};
use self::server::{Exit, RequestLog, ServerConfig};
use self::settings::{Settings, SettingsError};
use self::vmm::{Vmm, VmmAction, VmmError, FIRECRACKER_VERSION};

const MAX_INSTANCE_ID_LEN: usize = 64;

/// Why the fake could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{flag} is not supported by fake-firecracker, which only boots through the API")]
    UnsupportedFlag { flag: &'static str },
    #[error("Invalid instance ID {id:?}: it must be 1 to 64 alphanumeric characters or `-`")]
    InvalidInstanceId { id: String },
    #[error("Invalid log level {level:?}")]
    InvalidLevel { level: String },
    #[error("Invalid environment")]
    Settings(#[from] SettingsError),
    #[error("Cannot open the request log {path}")]
    OpenRequestLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot configure the logger from --log-path")]
    InitLogger(#[source] VmmError),
    #[error("Cannot configure metrics from --metrics-path")]
    InitMetrics(#[source] VmmError),
    #[error("Failed to open the API socket at {path}: the path already exists")]
    ApiSocketExists { path: PathBuf },
    #[error("Failed to open the API socket at {path}")]
    BindApiSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot start the async runtime")]
    Runtime(#[source] io::Error),
    #[error("Cannot install the signal handlers")]
    Signals(#[source] io::Error),
}

/// Entry point of the `fake-firecracker` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    if args.version {
        println!("Firecracker v{FIRECRACKER_VERSION}");
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(error) => {
            eprintln!("fake-firecracker: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Validates the flags and environment, binds the API socket and serves
/// until the process should exit.
///
/// # Errors
/// Anything that prevents serving; the socket is not left behind then.
pub fn run(args: &Args) -> Result<Exit, StartError> {
    if args.config_file.is_some() {
        return Err(StartError::UnsupportedFlag {
            flag: "--config-file",
        });
    }
    if args.no_api {
        return Err(StartError::UnsupportedFlag { flag: "--no-api" });
    }
    if !is_valid_instance_id(&args.id) {
        return Err(StartError::InvalidInstanceId {
            id: args.id.clone(),
        });
    }
    let settings = Settings::from_env()?;
    let request_log = settings
        .request_log
        .as_deref()
        .map(|path| {
            RequestLog::open(path).map_err(|source| StartError::OpenRequestLog {
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    let vmm = configure_from_flags(args)?;

    let api_sock = host_path(&args.api_sock);
    // The real VMM refuses a leftover socket rather than unlinking it.
    if api_sock.symlink_metadata().is_ok() {
        return Err(StartError::ApiSocketExists {
            path: args.api_sock.clone(),
        });
    }
    let bind_error = |source| StartError::BindApiSocket {
        path: args.api_sock.clone(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::bind(&api_sock).map_err(bind_error)?;
    let served = serve(
        listener,
        vmm,
        ServerConfig {
            instance_id: args.id.clone(),
            settings,
            request_log,
            max_payload_size: args.http_api_max_payload_size,
        },
    );
    let remove_socket = served
        .as_ref()
        .map_or(true, |exit| exit.removes_api_socket());
    if remove_socket {
        // Best effort: nothing useful to do if it is already gone.
        let _ = std::fs::remove_file(&api_sock);
    }
    served
}

fn serve(
    listener: std::os::unix::net::UnixListener,
    vmm: Vmm,
    config: ServerConfig,
) -> Result<Exit, StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    runtime.block_on(async move {
        listener
            .set_nonblocking(true)
            .map_err(StartError::Runtime)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(StartError::Runtime)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        };
        Ok(server::run(listener, shutdown, vmm, config).await)
    })
}

/// Applies `--log-path` and `--metrics-path` as the API would.
fn configure_from_flags(args: &Args) -> Result<Vmm, StartError> {
    let mut vmm = Vmm::new(args.id.clone());
    let level = args
        .level
        .as_deref()
        .map(|level| {
            LogLevel::parse(level).ok_or_else(|| StartError::InvalidLevel {
                level: level.to_owned(),
            })
        })
        .transpose()?;
    if let Some(log_path) = &args.log_path {
        let logger = Logger {
            level,
            log_path: Some(log_path.to_string_lossy().into_owned()),
            show_level: Some(args.show_level),
            show_log_origin: Some(args.show_log_origin),
            module: args.module.clone(),
        };
        vmm.handle(VmmAction::PutLogger(logger))
            .map_err(StartError::InitLogger)?;
    }
    if let Some(metrics_path) = &args.metrics_path {
        let metrics = Metrics {
            metrics_path: metrics_path.to_string_lossy().into_owned(),
            emit_id: None,
            properties: None,
        };
        vmm.handle(VmmAction::PutMetrics(metrics))
            .map_err(StartError::InitMetrics)?;
    }
    Ok(vmm)
}

/// 1 to 64 characters, alphanumeric or `-` (the real binary's rule).
fn is_valid_instance_id(id: &str) -> bool {
    (1..=MAX_INSTANCE_ID_LEN).contains(&id.chars().count())
        && id.chars().all(|c| c == '-' || c.is_alphanumeric())
}

/// An error and its sources joined with `: `, as a `fault_message` or a
/// start-up message.
pub(crate) use banger_proto::error_chain;

/// Set (to anything) by `fake-jailer` in the environment of the VMM it
/// starts: the fake then resolves absolute paths against its working
/// directory, the chroot root, as the real one does after `pivot_root`.
pub const JAILED_VAR: &str = "FAKE_FIRECRACKER_JAILED";

/// Where a path Firecracker was given is on the host: itself, or when
/// jailed (see [`JAILED_VAR`]) the same path under the working directory.
/// `..` cannot climb out of the jail: it is dropped, as `/..` is `/`.
pub(crate) fn host_path(path: impl AsRef<std::path::Path>) -> PathBuf {
    static JAILED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let path = path.as_ref();
    if !*JAILED.get_or_init(|| std::env::var_os(JAILED_VAR).is_some()) {
        return path.to_owned();
    }
    let mut inside = PathBuf::from(".");
    for component in path.components() {
        match component {
            std::path::Component::Normal(part) => inside.push(part),
            std::path::Component::ParentDir if inside != std::path::Path::new(".") => {
                inside.pop();
            }
            _ => {}
        }
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids() {
        assert!(is_valid_instance_id("anonymous-instance"));
        assert!(is_valid_instance_id("vm-01"));
        assert!(!is_valid_instance_id(""));
        assert!(!is_valid_instance_id("vm_01"));
        assert!(!is_valid_instance_id(&"a".repeat(65)));
    }

    #[test]
    fn error_chain_joins_sources() {
        let error = StartError::BindApiSocket {
            path: PathBuf::from("/run/x.sock"),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(
            error_chain(&error),
            "Failed to open the API socket at /run/x.sock: denied"
        );
    }
}
