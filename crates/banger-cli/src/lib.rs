//! The `banger` CLI: parses arguments, talks to `bangerd`, prints.
//!
//! Exit codes: 0 success, 1 failure (the error chain and a `hint:` line are
//! printed), 2 usage error, 130 when an operation was cancelled with Ctrl-C.

pub mod args;
pub mod client;
mod commands;
pub mod names;
pub mod printer;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::client::ClientError;
use crate::printer::Printer;

/// A failure with what the user can do about it.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub hint: Option<String>,
    pub exit_code: u8,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            exit_code: 1,
        }
    }

    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        Self {
            message: banger_proto::error_chain(&error),
            hint: error.hint(),
            exit_code: 1,
        }
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let printer = Printer::new(cli.quiet, cli.no_progress);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            printer.error(&format!("Failed to start the async runtime: {error}"), None);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, printer)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if !error.message.is_empty() {
                printer.error(&error.message, error.hint.as_deref());
            }
            ExitCode::from(error.exit_code)
        }
    }
}

async fn run(cli: Cli, printer: Printer) -> CliResult {
    let socket = cli.socket;
    match cli.command {
        Command::Vm(command) => commands::vm::run(&socket, printer, command).await,
        Command::Image(command) => commands::image::run_image(&socket, printer, command).await,
        Command::Kernel(command) => commands::image::run_kernel(&socket, printer, command).await,
        Command::Disk(command) => commands::disk::run(&socket, printer, command).await,
        Command::Operation(command) => commands::operation::run(&socket, printer, command).await,
        Command::Daemon(command) => commands::daemon::run(&socket, printer, command).await,
        Command::Doctor(flag) => commands::daemon::doctor(&socket, printer, flag.json).await,
        Command::SshConfig => commands::guest::ssh_config(printer),
    }
}
