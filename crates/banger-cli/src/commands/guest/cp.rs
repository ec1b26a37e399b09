//! `vm cp`: files and trees between the host and a guest, as tar streams.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use banger_agent_proto::client::AgentClient;
use banger_proto::agent::ExecRequest;

use super::{agent_error, connect};
use crate::args::CpArgs;
use crate::error::{hinted, Hint as _};
use crate::printer::Printer;

/// One side of `vm cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Host(PathBuf),
    Guest { vm: String, path: String },
}

/// `NAME:/path` is in a VM; anything else (write `./a:b` for a host path
/// with a colon) is on the host.
fn parse_location(text: &str) -> Location {
    if let Some((vm, path)) = text.split_once(':') {
        if !vm.is_empty() && !vm.contains('/') && !path.is_empty() {
            return Location::Guest {
                vm: vm.to_owned(),
                path: path.to_owned(),
            };
        }
    }
    Location::Host(PathBuf::from(text))
}

pub async fn cp(socket: &Path, printer: Printer, args: CpArgs) -> anyhow::Result<()> {
    match (
        parse_location(&args.source),
        parse_location(&args.destination),
    ) {
        (Location::Host(source), Location::Guest { vm, path }) => {
            let agent = connect(socket, &vm).await?;
            let entries = copy_in(&agent, &vm, &source, &path).await?;
            if args.json.json {
                printer.json(&serde_json::json!({
                    "vm": vm,
                    "source": source,
                    "destination": path,
                    "entries": entries,
                }));
            } else {
                printer.message(&format!("Copied {entries} entries to {vm}:{path}"));
            }
            Ok(())
        }
        (Location::Guest { vm, path }, Location::Host(destination)) => {
            let agent = connect(socket, &vm).await?;
            let options = CopyOutOptions {
                follow_links: args.dereference,
                unpack: unpack_options(args.archive),
            };
            copy_out(&agent, &vm, &path, &destination, options).await?;
            if args.json.json {
                printer.json(&serde_json::json!({
                    "vm": vm,
                    "source": path,
                    "destination": destination,
                }));
            } else {
                printer.message(&format!("Copied {vm}:{path} to {}", destination.display()));
            }
            Ok(())
        }
        (Location::Host(_), Location::Host(_)) => {
            Err(anyhow::anyhow!("Neither side of `vm cp` is in a VM"))
                .hint("write one side as NAME:/path, e.g. `banger vm cp ./src devbox:/root/`")
        }
        (Location::Guest { .. }, Location::Guest { .. }) => Err(anyhow::anyhow!(
            "`vm cp` copies between the host and a VM, not between two VMs"
        ))
        .hint("copy to the host first, then from the host to the other VM"),
    }
}

fn last_component(path: &str) -> Option<String> {
    Path::new(path.trim_end_matches('/'))
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
}

/// Whether `path` is a directory in the guest.
async fn guest_is_dir(agent: &AgentClient, vm: &str, path: &str) -> anyhow::Result<bool> {
    let probe = agent
        .exec(ExecRequest {
            argv: vec!["test".into(), "-d".into(), path.into()],
            ..ExecRequest::default()
        })
        .await
        .map_err(|error| agent_error(vm, error))?
        .output()
        .await
        .map_err(|error| agent_error(vm, error))?;
    Ok(probe.status.code == Some(0))
}

/// Copies a host file or tree into the guest: into `dest` when it is a
/// directory there, else as `dest` (the source renamed).
async fn copy_in(agent: &AgentClient, vm: &str, source: &Path, dest: &str) -> anyhow::Result<u64> {
    let metadata = std::fs::symlink_metadata(source)
        .with_context(|| format!("Cannot read {}", source.display()))
        .hint("check the path; it is read by you, from this directory")?;
    let source_name = source
        .canonicalize()
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .with_context(|| format!("{} has no name to copy as", source.display()))
        .hint("name the file or directory itself, not `/` or `..`")?;
    let (dest_dir, name) = if guest_is_dir(agent, vm, dest).await? {
        (dest.to_owned(), source_name)
    } else {
        let parent = Path::new(dest.trim_end_matches('/'))
            .parent()
            .map_or_else(|| "/".to_owned(), |parent| parent.display().to_string());
        let name = last_component(dest)
            .with_context(|| format!("Invalid destination path `{dest}`"))
            .hint("give a directory or file path in the guest, e.g. NAME:/root/")?;
        (
            if parent.is_empty() {
                ".".into()
            } else {
                parent
            },
            name,
        )
    };
    let (reader, writer) = tokio::io::duplex(256 * 1024);
    let source = source.to_owned();
    let packer = tokio::task::spawn_blocking(move || {
        let writer = tokio_util::io::SyncIoBridge::new(writer);
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        let result = if metadata.is_dir() {
            builder.append_dir_all(&name, &source)
        } else {
            builder.append_path_with_name(&source, &name)
        };
        result
            .and_then(|()| builder.finish())
            .with_context(|| format!("Cannot pack {}", source.display()))
    });
    let copied = agent.copy_in(&dest_dir, reader).await;
    let packed = packer.await.context("Packing task failed")?;
    match (copied, packed) {
        (Ok(entries), Ok(())) => Ok(entries),
        (Err(error), _) => Err(agent_error(vm, error)),
        (Ok(_), Err(error)) => Err(error),
    }
}

/// How `vm cp` brings a guest file or tree to the host.
#[derive(Debug, Clone, Copy)]
struct CopyOutOptions {
    /// `-L`: the guest follows symlinks.
    follow_links: bool,
    unpack: banger_agent_proto::files::UnpackOptions,
}

/// The calling process's umask (from `/proc/self/status`; 022 if unknown).
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("Umask:")
                    .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
            })
        })
        .unwrap_or(0o022)
}

/// What the guest's files become on the host: links as they are, no
/// set-id or sticky bits; the caller's umask applied and the caller owning
/// them, unless `archive` (`-a`: modes as they are, and owners when root).
fn unpack_options(archive: bool) -> banger_agent_proto::files::UnpackOptions {
    let mut options = banger_agent_proto::files::UnpackOptions::copy_out(current_umask());
    if archive {
        options.mode_mask = 0o777;
        options.preserve_owners = nix::unistd::geteuid().is_root();
    }
    options
}

/// Copies a guest file or tree to the host: into `destination` when it is a
/// directory, else as `destination`. The guest's tar is unpacked by
/// `files::unpack_with` into a staging directory beside the destination
/// (nothing written through a link, see its module), then renamed into place.
async fn copy_out(
    agent: &AgentClient,
    vm: &str,
    path: &str,
    destination: &Path,
    options: CopyOutOptions,
) -> anyhow::Result<()> {
    let name = last_component(path)
        .with_context(|| format!("Invalid guest path `{path}`"))
        .hint("name a file or directory in the guest, e.g. NAME:/root/file")?;
    let stream = agent
        .copy_out_with(path, options.follow_links)
        .await
        .map_err(|error| agent_error(vm, error))?;
    let into_dir = destination.is_dir();
    let staging_parent = if into_dir {
        destination.to_owned()
    } else {
        match destination.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        }
    };
    let staging = tempfile_dir(&staging_parent)?;
    let staging_path = staging.clone();
    let unpacked = tokio::task::spawn_blocking(move || {
        let reader = tokio_util::io::SyncIoBridge::new(stream);
        banger_agent_proto::files::unpack_with(reader, &staging_path, &options.unpack)
    })
    .await
    .context("Unpacking task failed");
    let result = match unpacked {
        Ok(Ok(_)) => {
            let unpacked = staging.join(&name);
            let target = if into_dir {
                destination.join(&name)
            } else {
                destination.to_owned()
            };
            std::fs::rename(&unpacked, &target)
                .with_context(|| format!("Cannot move the copy to {}", target.display()))
                .hint("check that the destination's directory exists and you may write there")
        }
        Ok(Err(error)) => Err(hinted(
            anyhow::Error::new(error).context(format!("Copy from VM `{vm}` failed")),
            format!("check the path in the guest: `banger vm run {vm} -- ls -ld {path}`"),
        )),
        Err(error) => Err(error),
    };
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// A fresh hidden directory in `parent`, so the final rename stays on one filesystem.
fn tempfile_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    for attempt in 0..100_u32 {
        let path = parent.join(format!(
            ".banger-cp-{}-{attempt}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| {
                        format!("Cannot create a staging directory in {}", parent.display())
                    })
                    .hint("check that the destination's directory exists and you may write there")
            }
        }
    }
    bail!("Cannot create a staging directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_name_a_vm_only_before_a_colon_without_slashes() {
        assert_eq!(
            parse_location("devbox:/root/x"),
            Location::Guest {
                vm: "devbox".into(),
                path: "/root/x".into()
            }
        );
        assert_eq!(parse_location("./a:b"), Location::Host("./a:b".into()));
        assert_eq!(parse_location("plain"), Location::Host("plain".into()));
        assert_eq!(parse_location(":x"), Location::Host(":x".into()));
    }

    #[test]
    fn last_component_ignores_trailing_slashes() {
        assert_eq!(last_component("/root/repo/").as_deref(), Some("repo"));
        assert_eq!(last_component("/"), None);
    }
}
