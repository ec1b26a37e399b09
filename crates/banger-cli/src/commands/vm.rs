//! `banger vm ...`.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use banger_proto::method::{self, Method, NoParams};
use banger_proto::{
    CreateVmParams, CreateVmResult, DeleteVmParams, OperationRef, OperationState, SetVmParams,
    StageEvent, StageStatus, StopVmParams, StreamFrame, Vm, VmRef,
};

use crate::args::{CreateArgs, SetArgs, VmCommand};
use crate::client::{Client, Watch};
use crate::error::{Exit, Hint as _, UsageError};
use crate::printer::{table, Printer};
pub(crate) use crate::progress::StageView;

pub async fn run(socket: &Path, printer: Printer, command: VmCommand) -> anyhow::Result<()> {
    match command {
        VmCommand::Run(args) => super::guest::run(socket, args).await,
        VmCommand::Cp(args) => super::guest::cp(socket, printer, args).await,
        VmCommand::Ssh(args) => super::guest::ssh(socket, args).await,
        VmCommand::SshProxy { host, port } => super::guest::ssh_proxy(socket, &host, port).await,
        VmCommand::Authsync(args) => super::guest::authsync(socket, printer, args).await,
        VmCommand::Stats { name, json } => {
            super::guest::stats(socket, printer, &name.vm, json.json).await
        }
        VmCommand::Logs {
            name,
            guest: true,
            follow,
            tail,
            raw,
            json,
        } => super::guest::guest_logs(socket, &name.vm, follow, tail, raw, json.json).await,
        VmCommand::Logs {
            name,
            guest: false,
            follow,
            tail,
            raw,
            json,
        } => super::guest::logs(socket, &name.vm, follow, tail, raw, json.json).await,
        VmCommand::Create(args) => create(socket, printer, args).await,
        VmCommand::Workspace(command) => super::workspace::run(socket, printer, command).await,
        VmCommand::List(flag) => {
            let vms = Client::connect(socket)
                .await?
                .call::<method::VmList>(NoParams)
                .await?;
            if flag.json {
                printer.json(&vms);
            } else {
                printer.data(&vm_table(&vms));
            }
            Ok(())
        }
        VmCommand::Show { name, json } => {
            let vm = Client::connect(socket)
                .await?
                .call::<method::VmShow>(VmRef { vm: name.vm })
                .await?;
            if json.json {
                printer.json(&vm);
            } else {
                printer.data(&vm_details(&vm));
            }
            Ok(())
        }
        VmCommand::Start { name, json } => {
            let vm = call_vm::<method::VmStart>(socket, VmRef { vm: name.vm }).await?;
            report(printer, json.json, &vm, "started")
        }
        VmCommand::Stop { name, force, json } => {
            let vm = call_vm::<method::VmStop>(socket, StopVmParams { vm: name.vm, force }).await?;
            report(printer, json.json, &vm, "stopped")
        }
        VmCommand::Restart { name, json } => {
            let vm = call_vm::<method::VmRestart>(socket, VmRef { vm: name.vm }).await?;
            report(printer, json.json, &vm, "restarted")
        }
        VmCommand::Delete {
            name,
            force,
            keep_work_disk,
            json,
        } => {
            let vm = call_vm::<method::VmDelete>(
                socket,
                DeleteVmParams {
                    vm: name.vm,
                    force,
                    keep_work_disk,
                },
            )
            .await?;
            report(printer, json.json, &vm, "deleted")
        }
        VmCommand::Port { name, action } => {
            super::ports::port(socket, printer, &name.vm, action).await
        }
        VmCommand::Set(SetArgs {
            name,
            vcpus,
            memory_mib,
            disk_size,
            egress,
            json,
        }) => {
            if let Some(egress) = egress {
                let vm = super::ports::set_egress(socket, &name.vm, egress).await?;
                if vcpus.is_none() && memory_mib.is_none() && disk_size.is_none() {
                    return report(printer, json.json, &vm, "updated");
                }
            }
            let vm = call_vm::<method::VmSet>(
                socket,
                SetVmParams {
                    vm: name.vm,
                    vcpus,
                    memory_mib,
                    disk_size,
                },
            )
            .await?;
            report(printer, json.json, &vm, "updated")
        }
        VmCommand::Pause { name, json } => {
            let vm = call_vm::<method::VmPause>(socket, VmRef { vm: name.vm }).await?;
            report(printer, json.json, &vm, "paused")
        }
        VmCommand::Resume { name, json } => {
            let vm = call_vm::<method::VmResume>(socket, VmRef { vm: name.vm }).await?;
            report(printer, json.json, &vm, "resumed")
        }
        VmCommand::Snapshot {
            name,
            snapshot,
            stop,
            json,
        } => super::snapshot::take(socket, printer, name.vm, snapshot, stop, json.json).await,
        VmCommand::Fork {
            name,
            new,
            count,
            regen_host_keys,
            json,
        } => {
            let copies = super::snapshot::Copies {
                count,
                regen_host_keys,
            };
            super::snapshot::fork(socket, printer, name.vm, new, copies, json).await
        }
    }
}

/// Calls a method that answers with the VM it acted on.
async fn call_vm<M: Method<Result = Vm>>(socket: &Path, params: M::Params) -> anyhow::Result<Vm> {
    Ok(Client::connect(socket).await?.call::<M>(params).await?)
}

fn report(printer: Printer, json: bool, vm: &Vm, verb: &str) -> anyhow::Result<()> {
    if json {
        printer.json(vm);
    } else if verb == "deleted" {
        printer.message(&format!("deleted {}", vm.name));
    } else {
        printer.message(&format!("{verb} {} ({})", vm.name, vm.state));
    }
    Ok(())
}

fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                short_id(&vm.id).to_owned(),
                vm.state.to_string(),
                vm.image.clone(),
                vm.kernel.clone(),
                vm.vcpus.to_string(),
                format!("{} MiB", vm.memory_mib),
                vm.pid
                    .map(|pid| pid.to_string())
                    .unwrap_or_else(|| "-".into()),
                vm.created_at.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ID", "STATE", "IMAGE", "KERNEL", "VCPUS", "MEMORY", "PID", "CREATED",
        ],
        &rows,
    )
}

fn vm_details(vm: &Vm) -> String {
    let mut lines = vec![
        format!("name:      {}", vm.name),
        format!("id:        {}", vm.id),
        format!("state:     {}", vm.state),
        format!("image:     {}", vm.image),
        format!("kernel:    {}", vm.kernel),
        format!("backend:   {}", vm.backend),
        format!("vcpus:     {}", vm.vcpus),
        format!("memory:    {} MiB", vm.memory_mib),
        format!("disk:      {} MiB", vm.disk_bytes >> 20),
        format!("work disk: {}", vm.work_disk.as_deref().unwrap_or("-")),
        format!(
            "pid:       {}",
            vm.pid
                .map(|pid| pid.to_string())
                .unwrap_or_else(|| "-".into())
        ),
        format!("created:   {}", vm.created_at),
        format!("dir:       {}", vm.dir),
    ];
    if let Some(network) = &vm.network {
        lines.push(format!("ip:        {}", network.ip));
        lines.push(format!("dns name:  {}", network.dns_name));
        lines.push(format!("mac:       {}", network.mac));
        lines.push(format!("tap:       {}", network.tap));
        lines.extend(super::ports::details(network));
    }
    if let Some(started) = &vm.started_at {
        lines.push(format!("started:   {started}"));
    }
    if let Some(error) = &vm.error {
        lines.push(format!("error:     {error}"));
    }
    lines.join("\n")
}

/// Fills what the command line left unset from the project file: `--project
/// FILE`, else `banger.toml` in the `--workspace` directory. The file's
/// `workspace` (default on) decides only when `--workspace` is not given:
/// on, the file's directory is the workspace.
fn apply_project(args: &mut CreateArgs) -> anyhow::Result<()> {
    let loaded = match (&args.project, &args.workspace) {
        (Some(file), _) => Some(crate::project::load(file)?),
        (None, Some(directory)) => crate::project::find(directory)?,
        (None, None) => None,
    };
    let Some(loaded) = loaded else {
        return Ok(());
    };
    let project = loaded.project.clone();
    args.image = args.image.take().or(project.image);
    args.kernel = args.kernel.take().or(project.kernel);
    args.vcpus = args.vcpus.or(project.vcpus);
    args.memory_mib = args.memory_mib.or(project.memory);
    args.work_disk = args.work_disk.take().or(project.work_disk);
    args.workspace_dest = args.workspace_dest.take().or(project.workspace_dest);
    if args.publish.is_empty() {
        args.publish = project.ports.unwrap_or_default();
    }
    args.egress = args.egress.take().or(project.egress);
    args.network_group = args.network_group.take().or(project.network_group);
    if args.workspace.is_none() && project.workspace != Some(false) {
        if args.no_start {
            return Err(UsageError(format!(
                "{} prepares a workspace, which needs a started VM",
                loaded.path.display()
            )))
            .hint("drop --no-start, or set `workspace = false` in the project file");
        }
        args.workspace = Some(loaded.directory());
    }
    Ok(())
}

pub(crate) async fn create(
    socket: &Path,
    printer: Printer,
    mut args: CreateArgs,
) -> anyhow::Result<()> {
    apply_project(&mut args)?;
    let name = args.name.clone().unwrap_or_else(crate::names::random_name);
    if let Err(error) = banger_proto::validate_vm_name(&name) {
        return Err(UsageError(error.to_string()))
            .hint("VM names are DNS labels: lowercase letters, digits and `-`");
    }
    if args.workspace.is_none() && args.workspace_dest.is_some() {
        return Err(UsageError("--workspace-dest needs a workspace".to_owned()))
            .hint("add --workspace DIR (or a project file with `workspace = true`)");
    }
    // A workspace that cannot be sent is refused before there is a VM.
    let workspace = match &args.workspace {
        Some(path) => {
            let dest = args
                .workspace_dest
                .as_deref()
                .unwrap_or(crate::args::DEFAULT_WORKSPACE_DEST);
            let plan = super::workspace::create_plan(path).await?;
            let spec = super::workspace::create_spec(&plan, dest)?;
            Some((plan, spec))
        }
        None => None,
    };
    let started = Instant::now();
    // Catch Ctrl-C before the operation exists: one pressed during the
    // `vm.create` call is then seen by `follow` and cancels the operation
    // instead of killing the CLI and leaving it unwatched.
    let interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("Failed to handle Ctrl-C")?;
    let mut client = Client::connect(socket).await?;
    let created: CreateVmResult = client
        .call::<method::VmCreate>(CreateVmParams {
            name: name.clone(),
            image: args.image,
            kernel: args.kernel,
            vcpus: args.vcpus,
            memory_mib: args.memory_mib,
            no_start: args.no_start,
            backend: args.backend,
            work_disk: args.work_disk,
            workspace: workspace.as_ref().map(|(_, spec)| spec.clone()),
            ports: args.publish,
            egress: args.egress,
            network_group: args.network_group,
            from_snapshot: args.from_snapshot,
            regen_host_keys: args.regen_host_keys,
        })
        .await?;
    let watch = Client::connect(socket)
        .await?
        .watch(&created.operation_id)
        .await?;
    // The `workspace` stage waits for this upload; the operation's frames
    // say how it goes, and a Ctrl-C cancels the operation (and so the stage).
    let upload = workspace.map(|(plan, _)| {
        tokio::spawn(super::workspace::create_upload(
            socket.to_owned(),
            created.operation_id.clone(),
            plan,
        ))
    });
    let followed = async {
        let (mut view, done) = watch_until_done(
            socket,
            printer,
            args.json,
            watch,
            interrupts,
            &created.operation_id,
        )
        .await?;
        if let Some(port) = args.wait_ssh {
            wait_ssh_stage(socket, &mut view, &name, port, &created.operation_id).await?;
        }
        view.clear();
        report_done(printer, args.json, &done, started);
        Ok(())
    }
    .await;
    if let Some(upload) = upload {
        // Done or failed by now as far as the operation is concerned; stop
        // its packing before leaving.
        upload.abort();
        let _ = upload.await;
    }
    followed
}

/// `vm create --wait-ssh`: an `ssh ready` stage, run by the CLI once the
/// create is done, that waits until the guest's sshd listens on `port`.
async fn wait_ssh_stage(
    socket: &Path,
    view: &mut StageView,
    vm: &str,
    port: u16,
    operation_id: &str,
) -> anyhow::Result<()> {
    const STAGE: &str = "ssh ready";
    let started = Instant::now();
    let event = |status, message: Option<String>| StageEvent {
        operation_id: operation_id.to_owned(),
        stage: STAGE.to_owned(),
        status,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        elapsed_us: Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        message,
        bytes: None,
        total: None,
    };
    view.stage(&event(StageStatus::Started, None));
    let outcome = async {
        let agent = Client::connect(socket).await?.agent(vm).await?;
        super::guest::wait_listening(&agent, vm, port, super::guest::SSH_WAIT, true).await
    }
    .await;
    match outcome {
        Ok(seen) => {
            let message = if seen {
                format!("port {port} listens")
            } else {
                "not waited: the guest agent cannot tell (an older agent)".to_owned()
            };
            view.stage(&event(StageStatus::Finished, Some(message)));
            Ok(())
        }
        Err(error) => {
            view.stage(&event(
                StageStatus::Failed,
                Some(banger_proto::error_chain(error.as_ref())),
            ));
            Err(error)
        }
    }
}

/// Renders an operation's frames until it ends; Ctrl-C cancels it (a second
/// Ctrl-C leaves at once). For operations another command started (pulls,
/// imports), without the closing lines ([`report_done`]): the `Done` frame of
/// the operation, which succeeded.
pub(crate) async fn follow_to_done(
    socket: &Path,
    printer: Printer,
    json: bool,
    watch: Watch,
    interrupts: tokio::signal::unix::Signal,
    operation_id: &str,
) -> anyhow::Result<StreamFrame> {
    let (mut view, done) =
        watch_until_done(socket, printer, json, watch, interrupts, operation_id).await?;
    view.clear();
    Ok(done)
}

/// The closing lines of a successful operation: the `Done` frame (and the
/// VM) as JSON lines, or a summary for people.
pub(crate) fn report_done(printer: Printer, json: bool, done: &StreamFrame, started: Instant) {
    let StreamFrame::Done { operation, vm } = done else {
        return;
    };
    if json {
        printer.json_line(done);
        if let Some(vm) = vm {
            printer.json_line(vm);
        }
        return;
    }
    match vm {
        Some(vm) => printer.message(&format!(
            "{} is {} (id {}, {:.1}s)",
            vm.name,
            vm.state,
            short_id(&vm.id),
            started.elapsed().as_secs_f64()
        )),
        None => printer.message(&format!(
            "{} done ({:.1}s)",
            operation.subject,
            started.elapsed().as_secs_f64()
        )),
    }
}

/// Renders stage frames until the `Done` frame and returns it with the view
/// (so later stages can be added) when the operation succeeded; Ctrl-C
/// cancels the operation (a second Ctrl-C leaves at once).
async fn watch_until_done(
    socket: &Path,
    printer: Printer,
    json: bool,
    mut watch: Watch,
    mut interrupts: tokio::signal::unix::Signal,
    operation_id: &str,
) -> anyhow::Result<(StageView, StreamFrame)> {
    let mut view = StageView::new(printer, json);
    let mut cancelling = false;
    loop {
        tokio::select! {
            frame = watch.next() => match frame? {
                Some(StreamFrame::Stage(event)) => view.stage(&event),
                Some(done @ StreamFrame::Done { .. }) => {
                    let StreamFrame::Done { operation, vm } = &done else { unreachable!() };
                    let state = operation.state;
                    if state != OperationState::Succeeded {
                        view.clear();
                        if json {
                            printer.json_line(&done);
                            if let Some(vm) = vm {
                                printer.json_line(vm);
                            }
                        }
                    }
                    return match state {
                        OperationState::Succeeded => Ok((view, done)),
                        OperationState::Cancelled => {
                            printer.message("cancelled; everything it made was removed");
                            Err(Exit(130).into())
                        }
                        OperationState::Failed | OperationState::Running => Err(anyhow::Error::msg(
                            operation
                                .error
                                .clone()
                                .unwrap_or_else(|| "The operation failed".to_owned()),
                        )),
                    };
                }
                None => {
                    return Err(anyhow::anyhow!("The daemon closed the operation stream early")).hint(
                        format!("the daemon may have restarted; `banger operation show {operation_id}` says how it ended"),
                    )
                }
            },
            _ = interrupts.recv() => {
                if cancelling {
                    return Err(Exit(130).into());
                }
                cancelling = true;
                printer.message("cancelling… (Ctrl-C again to stop waiting)");
                let mut client = Client::connect(socket).await?;
                let cancelled = client
                    .call::<method::OperationCancel>(OperationRef { id: operation_id.to_owned() })
                    .await;
                if let Err(error) = cancelled {
                    printer.message(&format!("cancel failed: {error}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::VmState;

    fn vm(name: &str, state: VmState, pid: Option<u32>) -> Vm {
        Vm {
            id: "3f2a9c0d1e2b4a5f6789".into(),
            name: name.into(),
            state,
            image: "debian-12".into(),
            kernel: "6.1".into(),
            backend: banger_proto::Backend::Firecracker,
            vcpus: 2,
            memory_mib: 1024,
            disk_bytes: 4 << 30,
            pid,
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: None,
            error: None,
            dir: "/var/lib/banger/vms/x".into(),
            network: None,
            work_disk: None,
        }
    }

    #[test]
    fn vm_table_is_aligned_with_short_ids() {
        let text = vm_table(&[
            vm("dev-1", VmState::Running, Some(4242)),
            vm("a-much-longer-name", VmState::Stopped, None),
        ]);
        let expected = "\
NAME                ID            STATE    IMAGE      KERNEL  VCPUS  MEMORY    PID   CREATED
dev-1               3f2a9c0d1e2b  running  debian-12  6.1     2      1024 MiB  4242  2026-01-01T00:00:00Z
a-much-longer-name  3f2a9c0d1e2b  stopped  debian-12  6.1     2      1024 MiB  -     2026-01-01T00:00:00Z";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_vm_table_is_just_the_header() {
        assert_eq!(
            vm_table(&[]),
            "NAME  ID  STATE  IMAGE  KERNEL  VCPUS  MEMORY  PID  CREATED"
        );
    }

    #[test]
    fn short_id_handles_short_ids() {
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
    }
}
