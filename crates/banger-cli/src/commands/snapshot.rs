//! `banger snapshot ...` and `banger vm snapshot`: VM snapshots.

use std::path::Path;

use banger_proto::method::{self, NoParams};
use banger_proto::{Snapshot, SnapshotRef, SnapshotVmParams};

use crate::args::SnapshotCommand;
use crate::client::Client;
use crate::error::Hint as _;
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

/// `banger vm fork VM NEW [--count N]`: a snapshot, N creates from it one
/// after the other, then the snapshot is removed (each copy's disks are its
/// own clones). The snapshot is removed whatever happens.
/// What `vm fork` makes: how many copies, and whether each gets new SSH
/// host keys.
pub struct Copies {
    pub count: u32,
    pub regen_host_keys: bool,
}

pub async fn fork(
    socket: &Path,
    printer: Printer,
    vm: String,
    new: String,
    copies: Copies,
    json: bool,
) -> anyhow::Result<()> {
    let count = copies.count;
    let names: Vec<String> = if count == 1 {
        vec![new]
    } else {
        (1..=count).map(|index| format!("{new}-{index}")).collect()
    };
    for name in &names {
        if let Err(error) = banger_proto::validate_vm_name(name) {
            return Err(crate::error::UsageError(error.to_string())).hint(
                "VM names are DNS labels: lowercase letters, digits and `-` (with --count, NAME-1, NAME-2, …)",
            );
        }
    }
    let snapshot = Client::connect(socket)
        .await?
        .call::<method::VmSnapshot>(SnapshotVmParams {
            vm,
            name: None,
            stop: false,
        })
        .await?;
    let mut outcome = Ok(());
    for name in names {
        let args = crate::args::CreateArgs {
            name: Some(name),
            image: None,
            kernel: None,
            vcpus: None,
            memory_mib: None,
            no_start: false,
            backend: None,
            work_disk: None,
            workspace: None,
            workspace_dest: None,
            project: None,
            wait_ssh: None,
            publish: Vec::new(),
            egress: None,
            network_group: None,
            from_snapshot: Some(snapshot.name.clone()),
            regen_host_keys: copies.regen_host_keys,
            json,
        };
        outcome = super::vm::create(socket, printer, args).await;
        if outcome.is_err() {
            break;
        }
    }
    let removed = Client::connect(socket)
        .await?
        .call::<method::SnapshotRemove>(SnapshotRef {
            name: snapshot.name,
        })
        .await;
    outcome?;
    removed?;
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
