//! `banger snapshot ...` and `banger vm snapshot`: VM snapshots.

use std::path::Path;

use banger_proto::method::{self, NoParams};
use banger_proto::{Snapshot, SnapshotRef, SnapshotVmParams};

use crate::args::SnapshotCommand;
use crate::client::Client;
use crate::printer::{table, Printer};

pub async fn run(socket: &Path, printer: Printer, command: SnapshotCommand) -> anyhow::Result<()> {
    let mut client = Client::connect(socket).await?;
    match command {
        SnapshotCommand::List(flag) => {
            let snapshots = client.call::<method::SnapshotList>(NoParams).await?;
            if flag.json {
                printer.json(&snapshots);
            } else {
                let rows: Vec<Vec<String>> = snapshots
                    .iter()
                    .map(|snapshot| {
                        vec![
                            snapshot.name.clone(),
                            snapshot.source_vm.clone(),
                            snapshot.image.clone(),
                            format!("{} {}", snapshot.backend, snapshot.backend_version),
                            mebibytes(snapshot.size_bytes),
                            snapshot.created_at.clone(),
                        ]
                    })
                    .collect();
                printer.data(&table(
                    &["NAME", "SOURCE VM", "IMAGE", "BACKEND", "SIZE", "CREATED"],
                    &rows,
                ));
            }
            Ok(())
        }
        SnapshotCommand::Show { name, json } => {
            let snapshot = client
                .call::<method::SnapshotShow>(SnapshotRef { name })
                .await?;
            if json.json {
                printer.json(&snapshot);
            } else {
                printer.data(&details(&snapshot));
            }
            Ok(())
        }
        SnapshotCommand::Rm { name, json } => {
            let snapshot = client
                .call::<method::SnapshotRemove>(SnapshotRef { name })
                .await?;
            if json.json {
                printer.json(&snapshot);
            } else {
                printer.message(&format!("removed snapshot {}", snapshot.name));
            }
            Ok(())
        }
    }
}

/// `banger vm snapshot VM [NAME] [--stop]`.
pub async fn take(
    socket: &Path,
    printer: Printer,
    vm: String,
    name: Option<String>,
    stop: bool,
    json: bool,
) -> anyhow::Result<()> {
    let snapshot = Client::connect(socket)
        .await?
        .call::<method::VmSnapshot>(SnapshotVmParams { vm, name, stop })
        .await?;
    if json {
        printer.json(&snapshot);
    } else {
        printer.message(&format!(
            "snapshot {} of {} written ({})",
            snapshot.name,
            snapshot.source_vm,
            mebibytes(snapshot.size_bytes)
        ));
    }
    Ok(())
}

fn mebibytes(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

fn details(snapshot: &Snapshot) -> String {
    [
        format!("name:      {}", snapshot.name),
        format!("id:        {}", snapshot.id),
        format!(
            "source vm: {} ({})",
            snapshot.source_vm, snapshot.source_vm_id
        ),
        format!("image:     {}", snapshot.image),
        format!("kernel:    {}", snapshot.kernel),
        format!(
            "backend:   {} {}",
            snapshot.backend, snapshot.backend_version
        ),
        format!("vcpus:     {}", snapshot.vcpus),
        format!("memory:    {} MiB", snapshot.memory_mib),
        format!("disk:      {} MiB", snapshot.disk_bytes >> 20),
        format!(
            "work disk: {}",
            if snapshot.has_work_disk { "yes" } else { "no" }
        ),
        format!("size:      {}", mebibytes(snapshot.size_bytes)),
        format!("created:   {}", snapshot.created_at),
        format!("dir:       {}", snapshot.dir),
    ]
    .join("\n")
}
