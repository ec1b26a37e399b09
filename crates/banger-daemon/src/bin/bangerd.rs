//! `bangerd`, the banger daemon. See `banger_daemon::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The banger daemon: owns VMs, images and host resources; serves the CLI.
#[derive(Parser)]
#[command(name = "bangerd", version)]
struct Args {
    /// State directory (database, images, kernels, VM disks).
    #[arg(long, env = "BANGER_STATE_DIR", default_value = banger_daemon::config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Control socket path.
    #[arg(long, env = "BANGER_SOCKET", default_value = banger_daemon::config::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Config file (TOML). The default path may be absent; a named one must exist.
    #[arg(long, env = "BANGER_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `banger_daemon=debug`.
    #[arg(long, env = "BANGER_LOG", default_value = "info")]
    log: String,
    /// Read and validate the config file, then exit (0 when it is valid).
    #[arg(long)]
    check_config: bool,
}

/// Raises the soft limit on open files to the hard limit: every VM holds
/// descriptors (VMM sockets, disks, console logs) and the DNS server takes
/// one per TCP client, and the usual soft limit of 1024 is soon reached.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`, a valid
    // rlimit owned by this frame.
    #[allow(unsafe_code)]
    let result = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            -1
        } else if limit.rlim_cur >= limit.rlim_max {
            0
        } else {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised)
        }
    };
    if result == 0 {
        tracing::debug!(limit = limit.rlim_max, "open file limit");
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            soft = limit.rlim_cur,
            "failed to raise the open file limit"
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check_config {
        let path = args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(banger_daemon::config::DEFAULT_CONFIG_PATH));
        return match banger_daemon::config::Config::load(&path, true) {
            Ok(_) => {
                println!("{}: valid", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("bangerd: error: {}", banger_proto::error_chain(&error));
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    raise_open_file_limit();
    let options = banger_daemon::DaemonOptions {
        state_dir: args.state_dir,
        socket: args.socket,
        config_required: args.config.is_some(),
        config: args
            .config
            .unwrap_or_else(|| PathBuf::from(banger_daemon::config::DEFAULT_CONFIG_PATH)),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bangerd: error: Failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(banger_daemon::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "bangerd: error: {}",
                banger_proto::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
