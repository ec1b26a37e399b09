//! `banger vm port ...` and `vm set --egress`.

use std::path::Path;

use banger_proto::method;
use banger_proto::netpolicy::{SetEgressParams, VmPortParams};
use banger_proto::vm::VmNetwork;
use banger_proto::{EgressPolicy, PublishedPort, Vm, VmRef};

use crate::args::PortCommand;
use crate::client::Client;
use crate::printer::{table, Printer};

pub async fn port(
    socket: &Path,
    printer: Printer,
    vm: &str,
    action: PortCommand,
) -> anyhow::Result<()> {
    let mut client = Client::connect(socket).await?;
    let vm = vm.to_owned();
    let (ports, message, json) = match action {
        PortCommand::Add { port, json } => {
            let params = VmPortParams {
                vm: vm.clone(),
                port,
            };
            let ports = client.call::<method::VmPortAdd>(params).await?;
            let message = format!("{vm}: published {}", describe(&port));
            (ports, Some(message), json.json)
        }
        PortCommand::Rm { port, json } => {
            let params = VmPortParams {
                vm: vm.clone(),
                port,
            };
            let ports = client.call::<method::VmPortRemove>(params).await?;
            let message = format!("{vm}: no longer published {}", describe(&port));
            (ports, Some(message), json.json)
        }
        PortCommand::List(json) => {
            let ports = client.call::<method::VmPortList>(VmRef { vm }).await?;
            (ports, None, json.json)
        }
    };
    if json {
        printer.json(&ports);
    } else if let Some(message) = message {
        printer.message(&message);
    } else {
        let rows: Vec<Vec<String>> = ports
            .iter()
            .map(|port| {
                vec![
                    format!("{}:{}", port.host_ip, port.host_port),
                    port.guest_port.to_string(),
                    port.protocol.to_string(),
                ]
            })
            .collect();
        printer.data(&table(&["HOST", "GUEST PORT", "PROTO"], &rows));
    }
    Ok(())
}

/// `HOSTIP:HOSTPORT -> GUESTPORT/PROTO`.
fn describe(port: &PublishedPort) -> String {
    format!(
        "{}:{} -> {}/{}",
        port.host_ip, port.host_port, port.guest_port, port.protocol
    )
}

pub async fn set_egress(socket: &Path, vm: &str, egress: EgressPolicy) -> anyhow::Result<Vm> {
    Ok(Client::connect(socket)
        .await?
        .call::<method::VmEgressSet>(SetEgressParams {
            vm: vm.to_owned(),
            egress,
        })
        .await?)
}

/// The `vm show` lines of a VM's ports, egress policy and group.
pub fn details(network: &VmNetwork) -> Vec<String> {
    let mut lines = Vec::new();
    for port in &network.ports {
        lines.push(format!("port:      {}", describe(port)));
    }
    lines.push(format!("egress:    {}", network.egress));
    if let Some(group) = &network.network_group {
        lines.push(format!("group:     {group}"));
    }
    lines
}
