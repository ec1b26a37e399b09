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
