//! `banger image ...` and `banger kernel ...`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use banger_proto::image::{OperationStarted, PullParams};
use banger_proto::method::{self, Method, NoParams};
use banger_proto::{ImportImageParams, ImportKernelParams, RemoveParams};

use crate::args::{ImageCommand, KernelCommand};
use crate::client::Client;
use crate::error::Hint as _;
use crate::printer::{table, Printer};

/// The daemon runs elsewhere (another cwd): send absolute, existing paths.
pub fn absolute(path: &Path) -> anyhow::Result<String> {
    let absolute: PathBuf = std::fs::canonicalize(path)
        .with_context(|| format!("Cannot use {}", path.display()))
        .hint("check the path; it is read by you, from this directory")?;
    absolute
        .to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not valid UTF-8", absolute.display()))
        .hint("rename the file (or a directory above it) to a UTF-8 name")
}

/// Starts a pull and follows it like `vm create` (Ctrl-C cancels).
async fn pull<M: Method<Params = PullParams, Result = OperationStarted>>(
    socket: &Path,
    printer: Printer,
    name: String,
    version: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("Failed to handle Ctrl-C")?;
    let pull = Client::connect(socket)
        .await?
        .call::<M>(PullParams { name, version })
        .await?;
    let watch = Client::connect(socket)
        .await?
        .watch(&pull.operation_id)
        .await?;
    crate::commands::vm::follow(
        socket,
        printer,
        json,
        watch,
        interrupts,
        &pull.operation_id,
        started,
    )
    .await
}

pub async fn run_image(
    socket: &Path,
    printer: Printer,
    command: ImageCommand,
) -> anyhow::Result<()> {
    // Local mistakes (a missing file) are reported before the daemon is asked.
    if let ImageCommand::Import { file, .. } = &command {
        absolute(file)?;
    }
    if let ImageCommand::Pull {
        name,
        version,
        json,
    } = command
    {
        return pull::<method::ImagePull>(socket, printer, name, version, json).await;
    }
    let mut client = Client::connect(socket).await?;
    match command {
        ImageCommand::Pull { .. } => unreachable!("handled above"),
        ImageCommand::Import { name, file, json } => {
            let path = absolute(&file)?;
            printer.message(&format!("importing {path} as image {name}…"));
            let image = client
                .call::<method::ImageImport>(ImportImageParams { name, path })
                .await?;
            if json.json {
                printer.json(&image);
            } else {
                printer.message(&format!(
                    "imported image {} ({} MiB, {})",
                    image.name,
                    image.size_bytes >> 20,
                    image.digest
                ));
            }
        }
        ImageCommand::List(flag) => {
            let images = client.call::<method::ImageList>(NoParams).await?;
            if flag.json {
                printer.json(&images);
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|image| {
                        vec![
                            image.name.clone(),
                            format!("{} MiB", image.size_bytes >> 20),
                            image.digest.chars().take(19).collect(),
                            image.created_at.clone(),
                            image.source.clone(),
                        ]
                    })
                    .collect();
                printer.data(&table(
                    &["NAME", "SIZE", "DIGEST", "CREATED", "SOURCE"],
                    &rows,
                ));
            }
        }
        ImageCommand::Show { name, json } => {
            let image = client
                .call::<method::ImageShow>(RemoveParams { name })
                .await?;
            if json.json {
                printer.json(&image);
            } else {
                printer.data(&format!(
                    "name:     {}\nid:       {}\nsize:     {} bytes\ndigest:   {}\nsource:   {}\ncreated:  {}\npath:     {}",
                    image.name, image.id, image.size_bytes, image.digest, image.source, image.created_at, image.path
                ));
            }
        }
        ImageCommand::Rm { name, json } => {
            let image = client
                .call::<method::ImageRemove>(RemoveParams { name })
                .await?;
            if json.json {
                printer.json(&image);
            } else {
                printer.message(&format!("removed image {}", image.name));
            }
        }
    }
    Ok(())
}

pub async fn run_kernel(
    socket: &Path,
    printer: Printer,
    command: KernelCommand,
) -> anyhow::Result<()> {
    if let KernelCommand::Import { file, initrd, .. } = &command {
        file.as_deref().map(absolute).transpose()?;
        initrd.as_deref().map(absolute).transpose()?;
    }
    if let KernelCommand::Pull {
        name,
        version,
        json,
    } = command
    {
        return pull::<method::KernelPull>(socket, printer, name, version, json).await;
    }
    let mut client = Client::connect(socket).await?;
    match command {
        KernelCommand::Pull { .. } => unreachable!("handled above"),
        KernelCommand::Import {
            name,
            file,
            initrd,
            cmdline,
            from_debian,
            json,
        } => {
            let path = file
                .as_deref()
                .map(absolute)
                .transpose()?
                .unwrap_or_default();
            let initrd = initrd.as_deref().map(absolute).transpose()?;
            // A package directory is resolved here, where the relative path means something.
            let from_debian = match from_debian {
                Some(source) if source.contains('/') || Path::new(&source).is_dir() => {
                    Some(absolute(Path::new(&source))?)
                }
                other => other,
            };
            let kernel = client
                .call::<method::KernelImport>(ImportKernelParams {
                    name,
                    path,
                    initrd,
                    cmdline,
                    from_debian,
                })
                .await?;
            if json.json {
                printer.json(&kernel);
            } else {
                printer.message(&format!("imported kernel {}", kernel.name));
            }
        }
        KernelCommand::List(flag) => {
            let kernels = client.call::<method::KernelList>(NoParams).await?;
            if flag.json {
                printer.json(&kernels);
            } else {
                let rows: Vec<Vec<String>> = kernels
                    .iter()
                    .map(|kernel| {
                        vec![
                            kernel.name.clone(),
                            if kernel.initrd_path.is_some() {
                                "yes"
                            } else {
                                "no"
                            }
                            .to_owned(),
                            kernel.cmdline.clone(),
                            kernel.created_at.clone(),
                        ]
                    })
                    .collect();
                printer.data(&table(&["NAME", "INITRD", "CMDLINE", "CREATED"], &rows));
            }
        }
        KernelCommand::Show { name, json } => {
            let kernel = client
                .call::<method::KernelShow>(RemoveParams { name })
                .await?;
            if json.json {
                printer.json(&kernel);
            } else {
                printer.data(&format!(
                    "name:     {}\nid:       {}\nkernel:   {}\ninitrd:   {}\ncmdline:  {}\nsource:   {}\ncreated:  {}",
                    kernel.name,
                    kernel.id,
                    kernel.kernel_path,
                    kernel.initrd_path.as_deref().unwrap_or("-"),
                    kernel.cmdline,
                    kernel.source,
                    kernel.created_at
                ));
            }
        }
        KernelCommand::Rm { name, json } => {
            let kernel = client
                .call::<method::KernelRemove>(RemoveParams { name })
                .await?;
            if json.json {
                printer.json(&kernel);
            } else {
                printer.message(&format!("removed kernel {}", kernel.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn absolute_names_missing_paths() {
        let error = super::absolute(std::path::Path::new("/nonexistent/disk.ext4")).unwrap_err();
        let message = banger_proto::error_chain(error.as_ref());
        assert!(
            message.starts_with("Cannot use /nonexistent/disk.ext4: No such file"),
            "{message}"
        );
        let here = super::absolute(std::path::Path::new(".")).unwrap();
        assert!(here.starts_with('/'));
    }
}
