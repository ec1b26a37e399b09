//! `banger image ...` and `banger kernel ...`. Imports and pulls are
//! daemon operations, followed like `vm create` (stages, byte bars,
//! `--json` event streams; see `crate::progress`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use banger_proto::image::{OperationStarted, PullParams};
use banger_proto::method::{self, Method, NoParams};
use banger_proto::{ImportImageParams, ImportKernelParams, RemoveParams, StreamFrame};

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

/// Starts an operation (an import or a pull) and follows it like `vm
/// create` (Ctrl-C cancels): stage lines and byte bars, or with `json` the
/// event stream as JSON lines. Returns the `Done` frame, not yet printed.
async fn start_and_follow<M: Method<Result = OperationStarted>>(
    socket: &Path,
    printer: Printer,
    params: M::Params,
    json: bool,
) -> anyhow::Result<StreamFrame> {
    let interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("Failed to handle Ctrl-C")?;
    let started = Client::connect(socket).await?.call::<M>(params).await?;
    let watch = Client::connect(socket)
        .await?
        .watch(&started.operation_id)
        .await?;
    crate::commands::vm::follow_to_done(
        socket,
        printer,
        json,
        watch,
        interrupts,
        &started.operation_id,
    )
    .await
}

/// Starts a pull and follows it.
async fn pull<M: Method<Params = PullParams, Result = OperationStarted>>(
    socket: &Path,
    printer: Printer,
    name: String,
    version: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let done = start_and_follow::<M>(socket, printer, PullParams { name, version }, json).await?;
    crate::commands::vm::report_done(printer, json, &done, started);
    Ok(())
}

/// The closing lines of an import: with `json`, the `Done` frame and then
/// the record as JSON lines (the stream's last line is what was imported).
fn report_import<T: serde::Serialize>(
    printer: Printer,
    json: bool,
    done: &StreamFrame,
    record: &T,
    summary: String,
    started: std::time::Instant,
) {
    if json {
        printer.json_line(done);
        printer.json_line(record);
    } else {
        printer.message(&format!(
            "{summary} ({:.1}s)",
            started.elapsed().as_secs_f64()
        ));
    }
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
            let started = std::time::Instant::now();
            let path = absolute(&file)?;
            printer.message(&format!("importing {path} as image {name}…"));
            let params = ImportImageParams {
                name: name.clone(),
                path,
            };
            let done =
                start_and_follow::<method::ImageImport>(socket, printer, params, json).await?;
            let image = client
                .call::<method::ImageShow>(RemoveParams { name })
                .await?;
            let summary = format!(
                "imported image {} ({} MiB, {})",
                image.name,
                image.size_bytes >> 20,
                image.digest
            );
            report_import(printer, json, &done, &image, summary, started);
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
            let started = std::time::Instant::now();
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
            let params = ImportKernelParams {
                name: name.clone(),
                path,
                initrd,
                cmdline,
                from_debian,
            };
            let done =
                start_and_follow::<method::KernelImport>(socket, printer, params, json).await?;
            let kernel = client
                .call::<method::KernelShow>(RemoveParams { name })
                .await?;
            let summary = format!("imported kernel {}", kernel.name);
            report_import(printer, json, &done, &kernel, summary, started);
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
