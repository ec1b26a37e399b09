//! `banger daemon ...`.

use std::path::Path;

use banger_proto::method::{self, NoParams};
use banger_proto::status::{CheckStatus, DoctorReport};

use crate::args::DaemonCommand;
use crate::client::Client;
use crate::error::Exit;
use crate::printer::Printer;

pub async fn run(socket: &Path, printer: Printer, command: DaemonCommand) -> anyhow::Result<()> {
    match command {
        DaemonCommand::Status(flag) => {
            let status = Client::connect(socket)
                .await?
                .call::<method::DaemonStatus>(NoParams)
                .await?;
            if flag.json {
                printer.json(&status);
                return Ok(());
            }
            let counts: Vec<String> = status
                .vms
                .iter()
                .filter(|(_, count)| **count > 0)
                .map(|(state, count)| format!("{count} {state}"))
                .collect();
            printer.data(&format!(
                "version:         {}\npid:             {}\nuptime:          {}s\nsocket:          {}\nstate dir:       {}\nconfig:          {}\nbackend:         {}\nclone strategy:  {}\nvms:             {}",
                status.version,
                status.pid,
                status.uptime_seconds,
                status.socket,
                status.state_dir,
                status.config,
                status.backend,
                status.clone_strategy,
                if counts.is_empty() { "none".to_owned() } else { counts.join(", ") }
            ));
            match &status.network {
                Some(network) => printer.data(&format!(
                    "network:         {} {} (.{}), {} leased, {} free",
                    network.bridge,
                    network.subnet,
                    network.domain,
                    network.leases_used,
                    network.leases_free
                )),
                None => printer.data("network:         disabled"),
            }
            Ok(())
        }
    }
}

pub async fn doctor(socket: &Path, printer: Printer, json: bool) -> anyhow::Result<()> {
    let report: DoctorReport = Client::connect(socket)
        .await?
        .call::<method::DaemonDoctor>(NoParams)
        .await?;
    if json {
        printer.json(&report);
    } else {
        for check in &report.checks {
            let mark = match check.status {
                CheckStatus::Ok => "ok  ",
                CheckStatus::Warn => "warn",
                CheckStatus::Fail => "FAIL",
            };
            printer.data(&format!("[{mark}] {}: {}", check.name, check.detail));
            if let (Some(hint), false) = (&check.hint, check.status == CheckStatus::Ok) {
                printer.data(&format!("       fix: {hint}"));
            }
        }
    }
    if report.worst() == CheckStatus::Fail {
        // The report says what failed.
        return Err(Exit(1).into());
    }
    Ok(())
}
