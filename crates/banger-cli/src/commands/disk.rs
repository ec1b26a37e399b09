//! `banger disk ...`: persistent work disks.

use std::path::Path;

use banger_proto::method::{self, NoParams};
use banger_proto::{CreateDiskParams, RemoveParams, ResizeDiskParams, WorkDisk};

use crate::args::DiskCommand;
use crate::client::Client;
use crate::printer::{table, Printer};

pub async fn run(socket: &Path, printer: Printer, command: DiskCommand) -> anyhow::Result<()> {
    let mut client = Client::connect(socket).await?;
    match command {
        DiskCommand::Create { name, size, json } => {
            let disk = client
                .call::<method::DiskCreate>(CreateDiskParams { name, size })
                .await?;
            report(printer, json.json, &disk, "created")
        }
        DiskCommand::List(flag) => {
            let disks = client.call::<method::DiskList>(NoParams).await?;
            if flag.json {
                printer.json(&disks);
            } else {
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .map(|disk| {
                        vec![
                            disk.name.clone(),
                            format!("{} MiB", disk.size_bytes >> 20),
                            disk.vm.clone().unwrap_or_else(|| "-".to_owned()),
                            disk.created_at.clone(),
                        ]
                    })
                    .collect();
                printer.data(&table(&["NAME", "SIZE", "VM", "CREATED"], &rows));
            }
            Ok(())
        }
        DiskCommand::Rm { name, json } => {
            let disk = client
                .call::<method::DiskRemove>(RemoveParams { name })
                .await?;
            report(printer, json.json, &disk, "removed")
        }
        DiskCommand::Resize { name, size, json } => {
            let disk = client
                .call::<method::DiskResize>(ResizeDiskParams { name, size })
                .await?;
            report(printer, json.json, &disk, "resized")
        }
    }
}

fn report(printer: Printer, json: bool, disk: &WorkDisk, done: &str) -> anyhow::Result<()> {
    if json {
        printer.json(disk);
    } else {
        printer.message(&format!(
            "Work disk {} {done} ({} MiB)",
            disk.name,
            disk.size_bytes >> 20
        ));
    }
    Ok(())
}
