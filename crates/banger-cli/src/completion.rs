//! Shell completions and manual pages, both generated from the clap
//! definitions in [`crate::args`].
//!
//! Completions use clap's completion engine: the shell script that
//! `banger completions SHELL` prints calls `banger` back with `COMPLETE=SHELL`
//! set, and [`complete_if_asked`] answers before normal argument parsing. So
//! names of VMs, images, kernels and disks complete from the daemon, and the
//! script never goes stale against the binary.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use banger_proto::method::{self, Method};
use banger_proto::NoParams;
use clap::CommandFactory;
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use clap_complete::env::{CompleteEnv, Shells};

use crate::args::{Cli, DEFAULT_SOCKET};
use crate::client::Client;
use crate::error::Hint as _;

/// The variable the registration script sets when it asks for completions.
const COMPLETE_VAR: &str = "COMPLETE";

/// How long a completion may wait for the daemon before offering nothing.
const DAEMON_TIMEOUT: Duration = Duration::from_millis(500);

/// Answers a shell's completion request and exits, when this run is one.
pub fn complete_if_asked() {
    CompleteEnv::with_factory(Cli::command)
        .var(COMPLETE_VAR)
        .complete();
}

/// The shells `banger completions` knows.
pub fn shell_names() -> Vec<&'static str> {
    Shells::builtins().names().collect()
}

/// Writes the registration script for `shell` to `out`.
pub fn write_script(shell: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let shells = Shells::builtins();
    let completer = shells
        .completer(shell)
        .with_context(|| format!("Unknown shell `{shell}`"))
        .hint(format!("use one of {}", shell_names().join(", ")))?;
    completer
        .write_registration(COMPLETE_VAR, "banger", "banger", "banger", out)
        .context("Failed to write the completion script")
}

/// Writes one roff manual page per command (`banger.1`, `banger-vm.1`,
/// `banger-vm-create.1`, …) into `dir`; returns the files written.
pub fn write_manual_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("Failed to create {}", dir.display()))?;
    let mut command = Cli::command();
    command.build();
    let mut written = Vec::new();
    write_pages(&command, "banger", dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    command: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    if command.is_hide_set() {
        return Ok(());
    }
    let page = command.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut buffer = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buffer)
        .with_context(|| format!("Failed to render the manual page of `{name}`"))?;
    std::fs::write(&path, buffer).with_context(|| format!("Failed to write {}", path.display()))?;
    written.push(path);
    for subcommand in command.get_subcommands() {
        if subcommand.get_name() == "help" {
            continue;
        }
        let sub_name = format!("{name}-{}", subcommand.get_name());
        write_pages(subcommand, &sub_name, dir, written)?;
    }
    Ok(())
}

/// Completes VM names.
pub fn vm_names() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        names::<method::VmList>(|vms| {
            vms.into_iter()
                .map(|vm| (vm.name, Some(vm.state.to_string())))
                .collect()
        })
    })
}

/// Completes image names.
pub fn image_names() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        names::<method::ImageList>(|images| {
            images.into_iter().map(|image| (image.name, None)).collect()
        })
    })
}

/// Completes kernel names.
pub fn kernel_names() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        names::<method::KernelList>(|kernels| {
            kernels
                .into_iter()
                .map(|kernel| (kernel.name, None))
                .collect()
        })
    })
}

/// Completes work disk names.
pub fn disk_names() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        names::<method::DiskList>(|disks| disks.into_iter().map(|disk| (disk.name, None)).collect())
    })
}

/// Asks the daemon for a list and turns it into candidates; nothing when the
/// daemon does not answer in time (a completion must never hang a shell).
fn names<M>(
    pick: impl FnOnce(M::Result) -> Vec<(String, Option<String>)>,
) -> Vec<CompletionCandidate>
where
    M: Method<Params = NoParams>,
{
    let socket = std::env::var_os("BANGER_SOCKET")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let listed = runtime.block_on(async {
        tokio::time::timeout(DAEMON_TIMEOUT, async {
            let mut client = Client::connect(&socket).await.ok()?;
            client.call::<M>(NoParams).await.ok()
        })
        .await
        .ok()
        .flatten()
    });
    let Some(listed) = listed else {
        return Vec::new();
    };
    pick(listed)
        .into_iter()
        .map(|(name, help)| CompletionCandidate::new(OsStr::new(&name)).help(help.map(Into::into)))
        .collect()
}
