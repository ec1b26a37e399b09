//! `banger operation ...`.

use std::path::Path;

use banger_proto::method;
use banger_proto::{OperationParams, OperationRef};

use crate::args::OperationCommand;
use crate::client::Client;
use crate::printer::{table, Printer};

pub async fn run(socket: &Path, printer: Printer, command: OperationCommand) -> anyhow::Result<()> {
    let mut client = Client::connect(socket).await?;
    match command {
        OperationCommand::List(flag) => {
            let operations = client
                .call::<method::OperationList>(OperationParams::default())
                .await?;
            if flag.json {
                printer.json(&operations);
            } else {
                let rows: Vec<Vec<String>> = operations
                    .iter()
                    .map(|operation| {
                        vec![
                            operation.id.clone(),
                            operation.kind.clone(),
                            operation.vm_name.clone(),
                            operation.state.as_str().to_owned(),
                            operation.created_at.clone(),
                            operation.error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                printer.data(&table(
                    &["ID", "KIND", "VM", "STATE", "CREATED", "ERROR"],
                    &rows,
                ));
            }
        }
        OperationCommand::Show { id, json } => {
            let operation = client
                .call::<method::OperationStatus>(OperationRef { id })
                .await?;
            if json.json {
                printer.json(&operation);
            } else {
                let mut lines = vec![
                    format!("id:       {}", operation.id),
                    format!("kind:     {}", operation.kind),
                    // Imports and pulls act on no VM: say what they act on.
                    if operation.vm_name.is_empty() {
                        format!("subject:  {}", operation.subject)
                    } else {
                        format!("vm:       {}", operation.vm_name)
                    },
                    format!("state:    {}", operation.state.as_str()),
                    format!("created:  {}", operation.created_at),
                ];
                if let Some(error) = &operation.error {
                    lines.push(format!("error:    {error}"));
                }
                lines.push("stages:".to_owned());
                for stage in &operation.stages {
                    lines.push(format!(
                        "  {:<16} {:<12} {:>10} ms  {}",
                        stage.stage,
                        format!("{:?}", stage.status).to_lowercase(),
                        stage_ms(stage),
                        stage_detail(stage)
                    ));
                }
                printer.data(&lines.join("\n"));
            }
        }
        OperationCommand::Cancel { id, json } => {
            let operation = client
                .call::<method::OperationCancel>(OperationRef { id })
                .await?;
            if json.json {
                printer.json(&operation);
            } else {
                printer.message(&format!("cancelling operation {}", operation.id));
            }
        }
    }
    Ok(())
}

/// A stage's time in milliseconds: to the microsecond where the daemon
/// sent it, else whole milliseconds.
fn stage_ms(stage: &banger_proto::StageEvent) -> String {
    match stage.elapsed_us {
        #[allow(clippy::cast_precision_loss)]
        Some(micros) => format!("{:.3}", micros as f64 / 1000.0),
        None => stage.elapsed_ms.to_string(),
    }
}

/// A stage event's message, or the bytes of a `progress` event.
fn stage_detail(stage: &banger_proto::StageEvent) -> String {
    use indicatif::HumanBytes;
    match (stage.bytes, stage.total) {
        (Some(bytes), Some(total)) => format!("{} of {}", HumanBytes(bytes), HumanBytes(total)),
        (Some(bytes), None) => HumanBytes(bytes).to_string(),
        _ => stage.message.clone().unwrap_or_default(),
    }
}
