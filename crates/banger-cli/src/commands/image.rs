//! `banger image ...` and `banger kernel ...`.

use std::path::{Path, PathBuf};

use banger_proto::image::{OperationStarted, PullParams};
use banger_proto::method;
use banger_proto::{Image, ImportImageParams, ImportKernelParams, Kernel, RemoveParams};

use crate::args::{ImageCommand, KernelCommand};
use crate::client::Client;
use crate::printer::{table, Printer};
use crate::{CliError, CliResult};

/// The daemon runs elsewhere (another cwd): send absolute, existing paths.
pub fn absolute(path: &Path) -> CliResult<String> {
    let absolute: PathBuf = std::fs::canonicalize(path)
        .map_err(|error| CliError::new(format!("Cannot use {}: {error}", path.display())))?;
    absolute
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::new(format!("{} is not valid UTF-8", absolute.display())))
}

/// Starts a pull and follows it like `vm create` (Ctrl-C cancels).
async fn pull(
    socket: &Path,
    printer: Printer,
    method_name: &str,
    name: String,
    version: Option<String>,
    json: bool,
) -> CliResult {
    let started = std::time::Instant::now();
    let interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|error| CliError::new(format!("Failed to handle Ctrl-C: {error}")))?;
    let pull: OperationStarted = Client::connect(socket)
        .await?
        .call(method_name, PullParams { name, version })
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

pub async fn run_image(socket: &Path, printer: Printer, command: ImageCommand) -> CliResult {
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
        return pull(socket, printer, method::IMAGE_PULL, name, version, json).await;
    }
    let mut client = Client::connect(socket).await?;
    match command {
        ImageCommand::Pull { .. } => unreachable!("handled above"),
        ImageCommand::Import { name, file, json } => {
            let path = absolute(&file)?;
            printer.message(&format!("importing {path} as image {name}…"));
            let image: Image = client
                .call(method::IMAGE_IMPORT, ImportImageParams { name, path })
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
            let images: Vec<Image> = client
                .call(method::IMAGE_LIST, serde_json::json!({}))
                .await?;
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
            let image: Image = client
                .call(method::IMAGE_SHOW, RemoveParams { name })
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
        ImageCommand::Rm { name } => {
            let image: Image = client
                .call(method::IMAGE_REMOVE, RemoveParams { name })
                .await?;
            printer.message(&format!("removed image {}", image.name));
        }
    }
    Ok(())
}

pub async fn run_kernel(socket: &Path, printer: Printer, command: KernelCommand) -> CliResult {
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
        return pull(socket, printer, method::KERNEL_PULL, name, version, json).await;
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
            let kernel: Kernel = client
                .call(
                    method::KERNEL_IMPORT,
                    ImportKernelParams {
                        name,
                        path,
                        initrd,
                        cmdline,
                        from_debian,
                    },
                )
                .await?;
            if json.json {
                printer.json(&kernel);
            } else {
                printer.message(&format!("imported kernel {}", kernel.name));
            }
        }
        KernelCommand::List(flag) => {
            let kernels: Vec<Kernel> = client
                .call(method::KERNEL_LIST, serde_json::json!({}))
                .await?;
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
            let kernel: Kernel = client
                .call(method::KERNEL_SHOW, RemoveParams { name })
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
        KernelCommand::Rm { name } => {
            let kernel: Kernel = client
                .call(method::KERNEL_REMOVE, RemoveParams { name })
                .await?;
            printer.message(&format!("removed kernel {}", kernel.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn absolute_names_missing_paths() {
        let error = super::absolute(std::path::Path::new("/nonexistent/disk.ext4")).unwrap_err();
        assert!(
            error
                .message
                .starts_with("Cannot use /nonexistent/disk.ext4"),
            "{}",
            error.message
        );
        let here = super::absolute(std::path::Path::new(".")).unwrap();
        assert!(here.starts_with('/'));
    }
}
