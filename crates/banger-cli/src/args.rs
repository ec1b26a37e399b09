//! Command-line arguments (clap derive).

use std::path::PathBuf;

use banger_proto::Backend;
use clap::{Args, Parser, Subcommand};

pub const DEFAULT_SOCKET: &str = "/run/banger/bangerd.sock";

/// Fast, disposable microVMs for development.
#[derive(Debug, Parser)]
#[command(name = "banger", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "BANGER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print only data and errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// No spinners or progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Manage root filesystem images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage guest kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Manage persistent work disks.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Manage VM snapshots (made by `vm snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Inspect and cancel long-running operations.
    #[command(subcommand)]
    Operation(OperationCommand),
    /// The daemon itself.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Check the host and configuration; exits 1 if a check fails.
    Doctor(JsonFlag),
    /// Print an OpenSSH config snippet so `ssh NAME.banger` reaches VMs.
    SshConfig,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// Names of VMs, images, kernels and disks complete from the daemon.
    /// bash: `banger completions bash > ~/.local/share/bash-completion/completions/banger`.
    Completions {
        /// The shell.
        shell: String,
    },
    /// Write the manual pages (roff) into a directory.
    #[command(hide = true)]
    ManualPages {
        /// Where the pages go (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VmName {
    /// VM name or unique id prefix.
    #[arg(add = crate::completion::vm_names())]
    pub vm: String,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM and start it.
    Create(CreateArgs),
    /// List VMs.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Show one VM.
    Show {
        #[command(flatten)]
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Start a stopped VM.
    Start {
        #[command(flatten)]
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Stop a VM: ask the guest to shut down, kill it after the grace period.
    Stop {
        #[command(flatten)]
        name: VmName,
        /// Kill the VMM at once.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Stop and start a VM.
    Restart {
        #[command(flatten)]
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Delete a VM and its disks.
    #[command(alias = "rm")]
    Delete {
        #[command(flatten)]
        name: VmName,
        /// Also delete a running VM (killing it) or one being created.
        #[arg(long)]
        force: bool,
        /// Keep the VM's work disk (detached) instead of deleting it.
        #[arg(long)]
        keep_work_disk: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Change a stopped VM's size, or a VM's egress policy.
    Set(SetArgs),
    /// Publish host ports to a VM: add, rm, list.
    Port {
        #[command(flatten)]
        name: VmName,
        #[command(subcommand)]
        action: PortCommand,
    },
    /// Run a command in a running VM (through its agent; exit code passes through).
    Run(RunArgs),
    /// Copy files or directories between the host and a VM (`NAME:/path` on one side).
    Cp(CpArgs),
    /// Open an SSH session to a VM, or run a command over SSH.
    Ssh(SshArgs),
    /// Push your SSH public keys (~/.ssh/*.pub and banger's key) and git identity to a VM.
    Authsync(AuthsyncArgs),
    /// Pipe stdin/stdout to a VM's TCP port (the ProxyCommand of `banger ssh-config`).
    #[command(hide = true)]
    SshProxy {
        /// `NAME.banger` or NAME.
        host: String,
        port: u16,
    },
    /// The guest's resource use and the VMM process's.
    Stats {
        #[command(flatten)]
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Print a VM's console log; `-f` follows it until the VM stops.
    Logs {
        #[command(flatten)]
        name: VmName,
        /// The guest's journal (`journalctl -b` through the agent) instead
        /// of the console; `-f` follows it until Ctrl-C.
        #[arg(long)]
        guest: bool,
        /// Go on printing what the guest writes until its VMM exits.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of what is there.
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
        /// Print the guest's bytes as they are (escape sequences included).
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// One JSON object per line: {"line": "..."}.
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Copy a git working tree into a VM, and bring the work back.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Stop a running VM's vCPUs (its VMM and agent connection stay).
    Pause {
        #[command(flatten)]
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Run a paused VM's vCPUs again.
    Resume {
        #[command(flatten)]
        name: VmName,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Copy a running VM: snapshot it (a short pause), start NEW from the
    /// snapshot (NEW-1..NEW-N with --count), then remove the snapshot.
    Fork {
        #[command(flatten)]
        name: VmName,
        /// Name of the copy.
        new: String,
        /// How many copies.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        count: u32,
        /// Give each copy new SSH host keys (default: copies keep the
        /// source's keys).
        #[arg(long)]
        regen_host_keys: bool,
        /// Print stage events and the VMs as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Snapshot a VM: memory, device state and its disks; it is paused meanwhile.
    Snapshot {
        #[command(flatten)]
        name: VmName,
        /// The snapshot's name (default: VM-N).
        snapshot: Option<String>,
        /// Stop the VM after the snapshot instead of resuming it.
        #[arg(long)]
        stop: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots, with the bytes each holds on disk.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Show one snapshot.
    Show {
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Delete a snapshot (VMs restored from it keep running).
    Rm {
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Send a git working tree (tracked files as they are now, untracked
    /// files that are not ignored, and `.git`) into a VM as one tar stream.
    Prepare(WorkspacePrepareArgs),
    /// Bring what changed in the VM since prepare back: as a patch, or as a
    /// branch in the host repository (its working tree is not touched).
    Export(WorkspaceExportArgs),
}

/// The guest directory of a workspace.
pub const DEFAULT_WORKSPACE_DEST: &str = "/root/repo";

#[derive(Debug, Args)]
pub struct WorkspacePrepareArgs {
    #[command(flatten)]
    pub name: VmName,
    /// The repository (default: the current directory's git top level).
    pub path: Option<PathBuf>,
    /// Guest directory to unpack into.
    #[arg(long, default_value = DEFAULT_WORKSPACE_DEST, value_name = "DIR")]
    pub dest: String,
    /// Guest user who owns the copy.
    #[arg(short = 'u', long, default_value = "root")]
    pub user: String,
    /// Replace what is at the destination (it is removed first).
    #[arg(long)]
    pub force: bool,
    /// Also send files git ignores (build output, `.env`, ...).
    #[arg(long)]
    pub include_ignored: bool,
    /// PATH is not a git repository: copy every file under it as is.
    #[arg(long, conflicts_with = "include_ignored")]
    pub no_git: bool,
    /// Print the stage events and the result as JSON lines.
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("format").required(true).args(["patch", "branch"])))]
pub struct WorkspaceExportArgs {
    #[command(flatten)]
    pub name: VmName,
    /// The host repository that receives the branch (default: the current
    /// directory's); only with `--branch`.
    #[arg(conflicts_with = "patch")]
    pub path: Option<PathBuf>,
    /// Write a `git apply`-able binary patch from the base commit to the
    /// guest's working tree into FILE.
    #[arg(long, value_name = "FILE")]
    pub patch: Option<PathBuf>,
    /// Create branch NAME in the host repository: the guest's commits plus
    /// one commit with its uncommitted changes.
    #[arg(long, value_name = "NAME")]
    pub branch: Option<String>,
    /// Replace an existing branch or patch file.
    #[arg(long)]
    pub force: bool,
    /// Guest directory of the workspace.
    #[arg(long, default_value = DEFAULT_WORKSPACE_DEST, value_name = "DIR")]
    pub dest: String,
    /// Guest user who runs git there.
    #[arg(short = 'u', long, default_value = "root")]
    pub user: String,
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub name: VmName,
    /// Give the command a terminal (pty), sized and resized like yours.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Send your stdin to the command (implied when stdin is not a terminal).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest (default: the user's home).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run as this guest user (default: root).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{value}` is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a host path or NAME:/path in a VM.
    pub source: String,
    /// Destination: a host path or NAME:/path in a VM.
    pub destination: String,
    /// Copying out of a VM: follow symlinks in the guest (the source and
    /// those in a copied tree) and copy what they point at. Without it a
    /// symlink is copied as a link.
    #[arg(short = 'L', long = "dereference")]
    pub dereference: bool,
    /// Copying out of a VM: keep the guest's owners (when run as root) and
    /// permission bits without applying your umask. Set-user-ID, set-group-ID
    /// and sticky bits are always dropped.
    #[arg(short = 'a', long = "archive")]
    pub archive: bool,
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    #[command(flatten)]
    pub name: VmName,
    /// Guest user to log in as.
    #[arg(short = 'u', long, default_value = "root")]
    pub user: String,
    /// The guest's sshd port (waited for until it listens).
    #[arg(short = 'p', long, default_value_t = 22)]
    pub port: u16,
    /// A command to run instead of a login shell.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AuthsyncArgs {
    #[command(flatten)]
    pub name: VmName,
    /// Guest user whose authorized_keys and git identity are replaced.
    #[arg(short = 'u', long, default_value = "root")]
    pub user: String,
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name (a DNS label); a random one when absent.
    pub name: Option<String>,
    /// Image name (default: the daemon's configured default).
    #[arg(long, add = crate::completion::image_names())]
    pub image: Option<String>,
    /// Kernel name (default: the daemon's configured default).
    #[arg(long, add = crate::completion::kernel_names())]
    pub kernel: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Memory in MiB.
    #[arg(long = "memory")]
    pub memory_mib: Option<u32>,
    /// Create the VM without starting it.
    #[arg(long)]
    pub no_start: bool,
    /// VMM backend: firecracker or qemu (default: the daemon's choice).
    #[arg(long)]
    pub backend: Option<Backend>,
    /// A persistent work disk mounted at /root: a size (`10G`) makes one
    /// named NAME-work; a name attaches a detached one.
    #[arg(long, value_name = "SIZE|NAME", add = crate::completion::disk_names())]
    pub work_disk: Option<String>,
    /// Once the VM runs, prepare this git working tree in it (as `vm
    /// workspace prepare`, a `workspace` stage).
    #[arg(long, value_name = "PATH", conflicts_with = "no_start")]
    pub workspace: Option<PathBuf>,
    /// Guest directory for the workspace (default: /root/repo).
    #[arg(long, value_name = "DIR")]
    pub workspace_dest: Option<String>,
    /// Take defaults from this project file (default: `banger.toml` in the
    /// `--workspace` directory); flags win over it.
    #[arg(long, value_name = "FILE")]
    pub project: Option<PathBuf>,
    /// Once the VM runs, wait until its sshd listens on PORT (22), an `ssh
    /// ready` stage asked of the guest agent.
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "22", require_equals = true, conflicts_with = "no_start")]
    pub wait_ssh: Option<u16>,
    /// Forward a host port to the VM: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]
    /// (repeatable; HOSTIP defaults to 127.0.0.1, 0.0.0.0 is every address).
    #[arg(short = 'p', long = "publish", value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/PROTO]", value_parser = banger_proto::PublishedPort::parse)]
    pub publish: Vec<banger_proto::PublishedPort>,
    /// Where the VM may send traffic: allow-all (default), none (only the
    /// host's DNS), or allow=LIST of CIDRs and names (`*.example.org`).
    #[arg(long, value_name = "POLICY", value_parser = banger_proto::EgressPolicy::parse)]
    pub egress: Option<banger_proto::EgressPolicy>,
    /// Let the VM talk to the other VMs of this group (VMs are isolated
    /// from each other otherwise).
    #[arg(long, value_name = "GROUP")]
    pub network_group: Option<String>,
    /// Start from this snapshot's memory and disks (`vm snapshot`) instead
    /// of booting; image, kernel, size and backend are the snapshot's.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "kernel", "vcpus", "memory_mib", "no_start", "backend", "work_disk", "workspace", "project"])]
    pub from_snapshot: Option<String>,
    /// With --from-snapshot: give the VM new SSH host keys (default: it
    /// keeps the snapshot's, so every copy answers with the same keys).
    #[arg(long, requires = "from_snapshot")]
    pub regen_host_keys: bool,
    /// Print stage events and the VM as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["vcpus", "memory_mib", "disk_size", "egress"])))]
pub struct SetArgs {
    #[command(flatten)]
    pub name: VmName,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Memory in MiB.
    #[arg(long = "memory")]
    pub memory_mib: Option<u32>,
    /// Grow the root disk to this size (`20G`; never shrinks).
    #[arg(long)]
    pub disk_size: Option<String>,
    /// Change the egress policy (also while the VM runs): allow-all, none
    /// or allow=LIST.
    #[arg(long, value_name = "POLICY", value_parser = banger_proto::EgressPolicy::parse)]
    pub egress: Option<banger_proto::EgressPolicy>,
    #[command(flatten)]
    pub json: JsonFlag,
}

#[derive(Debug, Subcommand)]
pub enum PortCommand {
    /// Forward a host port: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp].
    Add {
        #[arg(value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/PROTO]", value_parser = banger_proto::PublishedPort::parse)]
        port: banger_proto::PublishedPort,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Stop forwarding a host port.
    #[command(alias = "remove")]
    Rm {
        #[arg(value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/PROTO]", value_parser = banger_proto::PublishedPort::parse)]
        port: banger_proto::PublishedPort,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List the published ports.
    #[command(alias = "ls")]
    List(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Make a detached work disk (attach it with `vm create --work-disk NAME`).
    Create {
        name: String,
        /// Size, e.g. 10G or 512M.
        size: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List work disks and the VMs they are attached to.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Delete a detached work disk.
    Rm {
        #[arg(add = crate::completion::disk_names())]
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Grow a work disk (its VM must be stopped; never shrinks).
    Resize {
        #[arg(add = crate::completion::disk_names())]
        name: String,
        size: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Register an ext4 root filesystem image.
    Import {
        name: String,
        file: PathBuf,
        /// Print stage events (byte progress too) as JSON lines, then the image.
        #[arg(long)]
        json: bool,
    },
    /// Download an image from the configured catalog and register it.
    Pull {
        name: String,
        /// Catalog version (default: the highest).
        #[arg(long = "catalog-version", id = "catalog_version")]
        version: Option<String>,
        /// Print stage events (byte progress too) as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List images.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Show one image.
    Show {
        #[arg(add = crate::completion::image_names())]
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove an image no VM uses.
    Rm {
        #[arg(add = crate::completion::image_names())]
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Register a guest kernel (vmlinux or bzImage).
    Import {
        name: String,
        #[arg(required_unless_present = "from_debian")]
        file: Option<PathBuf>,
        /// An initramfs to boot with it.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Take a Debian kernel and generate its initramfs (modules and the
        /// guest agent): the newest installed, a release such as
        /// 6.1.0-48-cloud-amd64, or an unpacked package directory.
        #[arg(
            long,
            value_name = "VERSION|DIR",
            num_args = 0..=1,
            default_missing_value = "",
            conflicts_with_all = ["file", "initrd"]
        )]
        from_debian: Option<String>,
        /// Kernel command line (banger appends its own arguments).
        #[arg(long)]
        cmdline: Option<String>,
        /// Print stage events (byte progress too) as JSON lines, then the kernel.
        #[arg(long)]
        json: bool,
    },
    /// Download a kernel from the configured catalog (signature checked when
    /// the entry has one) and register it.
    Pull {
        name: String,
        /// Catalog version (default: the highest).
        #[arg(long = "catalog-version", id = "catalog_version")]
        version: Option<String>,
        /// Print stage events (byte progress too) as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List kernels.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Show one kernel.
    Show {
        #[arg(add = crate::completion::kernel_names())]
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove a kernel no VM uses.
    Rm {
        #[arg(add = crate::completion::kernel_names())]
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperationCommand {
    /// List operations, newest first.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Show one operation with its stages.
    Show {
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Cancel a running operation; it rolls back what it made.
    Cancel {
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Version, uptime, socket, state dir, backend, VM counts.
    Status(JsonFlag),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("banger").chain(args.iter().copied()))
    }

    #[test]
    fn create_with_and_without_name() {
        let cli = parse(&["vm", "create", "dev", "--memory", "512", "--json"]).unwrap();
        let Command::Vm(VmCommand::Create(create)) = cli.command else {
            panic!("not create");
        };
        assert_eq!(create.name.as_deref(), Some("dev"));
        assert_eq!(create.memory_mib, Some(512));
        assert!(create.json);
        let cli = parse(&["vm", "create"]).unwrap();
        let Command::Vm(VmCommand::Create(create)) = cli.command else {
            panic!("not create");
        };
        assert!(create.name.is_none());
    }

    #[test]
    fn backend_is_parsed_and_unknown_ones_are_usage_errors() {
        let cli = parse(&["vm", "create", "dev", "--backend", "qemu"]).unwrap();
        let Command::Vm(VmCommand::Create(create)) = cli.command else {
            panic!("not create");
        };
        assert_eq!(create.backend, Some(Backend::Qemu));
        let error = parse(&["vm", "create", "dev", "--backend", "foo"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            error
                .to_string()
                .contains("Unknown backend `foo`: use firecracker or qemu"),
            "{error}"
        );
    }

    #[test]
    fn set_needs_a_change() {
        let error = parse(&["vm", "set", "dev"]).unwrap_err();
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert!(parse(&["vm", "set", "dev", "--vcpus", "2"]).is_ok());
    }

    #[test]
    fn socket_flag_and_default() {
        let cli = parse(&["--socket", "/tmp/x.sock", "vm", "list"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
        let cli = parse(&["vm", "ls", "--json"]).unwrap();
        if std::env::var_os("BANGER_SOCKET").is_none() {
            assert_eq!(cli.socket, PathBuf::from(DEFAULT_SOCKET));
        }
        assert!(matches!(
            cli.command,
            Command::Vm(VmCommand::List(JsonFlag { json: true }))
        ));
    }

    #[test]
    fn workspace_export_needs_exactly_one_format() {
        assert!(parse(&["vm", "workspace", "export", "dev"]).is_err());
        assert!(parse(&[
            "vm",
            "workspace",
            "export",
            "dev",
            "--patch",
            "p",
            "--branch",
            "b"
        ])
        .is_err());
        // PATH names the host repository, which only a branch needs.
        assert!(parse(&["vm", "workspace", "export", "dev", "--patch", "p", "."]).is_err());
        let cli = parse(&["vm", "workspace", "export", "dev", "--branch", "b", "."]).unwrap();
        let Command::Vm(VmCommand::Workspace(WorkspaceCommand::Export(export))) = cli.command
        else {
            panic!("not export");
        };
        assert_eq!(export.dest, DEFAULT_WORKSPACE_DEST);
        assert_eq!(export.path, Some(PathBuf::from(".")));
    }

    #[test]
    fn create_workspace_needs_a_started_vm() {
        assert!(parse(&["vm", "create", "--workspace", ".", "--no-start"]).is_err());
        let cli = parse(&["vm", "create", "--workspace", "."]).unwrap();
        let Command::Vm(VmCommand::Create(create)) = cli.command else {
            panic!("not create");
        };
        assert_eq!(create.workspace.as_deref(), Some(std::path::Path::new(".")));
        assert!(create.workspace_dest.is_none() && create.project.is_none());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
