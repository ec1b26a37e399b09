//! The `banger` CLI: parses arguments, talks to `bangerd`, prints.
//!
//! Exit codes: 0 success, 1 failure (the error chain and a `hint:` line are
//! printed), 2 usage error, 130 when an operation was cancelled with Ctrl-C.

pub mod args;
pub mod client;
mod commands;
pub mod completion;
pub mod error;
pub mod names;
pub mod printer;
mod progress;
pub mod project;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use crate::args::{Cli, Command};
use crate::printer::Printer;

pub fn main() -> ExitCode {
    completion::complete_if_asked();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let printer = Printer::new(cli.quiet, cli.no_progress);
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli, printer)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => error::report(printer, &error),
    }
}

async fn run(cli: Cli, printer: Printer) -> anyhow::Result<()> {
    let socket = cli.socket;
    match cli.command {
        Command::Vm(command) => commands::vm::run(&socket, printer, command).await,
        Command::Image(command) => commands::image::run_image(&socket, printer, command).await,
        Command::Kernel(command) => commands::image::run_kernel(&socket, printer, command).await,
        Command::Disk(command) => commands::disk::run(&socket, printer, command).await,
        Command::Snapshot(command) => commands::snapshot::run(&socket, printer, command).await,
        Command::Operation(command) => commands::operation::run(&socket, printer, command).await,
        Command::Daemon(command) => commands::daemon::run(&socket, printer, command).await,
        Command::Doctor(flag) => commands::daemon::doctor(&socket, printer, flag.json).await,
        Command::SshConfig => commands::guest::ssh_config(printer),
        Command::Completions { shell } => {
            completion::write_script(&shell, &mut std::io::stdout().lock())
        }
        Command::ManualPages { dir } => {
            for page in completion::write_manual_pages(&dir)? {
                printer.data(&page.display().to_string());
            }
            Ok(())
        }
    }
}
