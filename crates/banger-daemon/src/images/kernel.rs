//! Kernel import: a kernel file and optional initrd, or `--from-debian` a
//! Debian kernel package made into a vmlinux and an initramfs with the
//! guest agent; and where that static agent is looked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_disk::confined::{self, ConfinedDir, ConfinedError};
use banger_disk::initramfs::{self, DebianKernel, InitramfsError, KernelModules};
use banger_proto::image::OperationStarted;
use banger_proto::{ImportKernelParams, Kernel};

use super::operation::{copy_file, spawn_import, stage};
use super::{open_source, ImageError, ImageService, OpenSource, RemoveOnDrop};
use crate::access::{as_peer, Peer};
use crate::files;
use crate::ids::{new_id, now, validate_artifact_name};
use crate::operations::{LiveOperation, OperationRegistry};

/// Kernel arguments used when an imported kernel gives none: serial console,
/// reboot on triple fault/panic so the VMM exits instead of hanging.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// The same for Debian kernels, whose initramfs mounts `root=`.
pub const DEBIAN_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";
/// The largest kernel image imported (a vmlinux is tens of megabytes).
pub const MAX_KERNEL_BYTES: u64 = 512 * 1024 * 1024;
/// The largest initrd imported.
pub const MAX_INITRD_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Where the static guest agent is looked for last (after `[agent] path`
/// and the directory of `bangerd`): a source install
/// (`scripts/quickstart.sh`), then the Debian package.
pub const AGENT_INSTALL_PATHS: [&str; 2] = [
    "/usr/local/lib/banger/banger-agent",
    "/usr/lib/banger/banger-agent",
];

impl ImageService {
    /// `kernel.import`: checks the name, the command line and the sources
    /// (opened, and a `--from-debian` package read, as the caller; the
    /// agent found), then imports them as an operation (see
    /// [`super::operation`]).
    pub async fn start_kernel_import(
        &self,
        peer: Peer,
        params: ImportKernelParams,
        operations: &Arc<OperationRegistry>,
    ) -> Result<OperationStarted, ImageError> {
        validate_artifact_name("kernel", &params.name)?;
        if self.store.find_kernel(&params.name)?.is_some() {
            return Err(ImageError::KernelExists { name: params.name });
        }
        let default_cmdline = if params.from_debian.is_some() {
            DEBIAN_KERNEL_CMDLINE
        } else {
            DEFAULT_KERNEL_CMDLINE
        };
        let cmdline = params
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline.to_owned());
        if cmdline.contains('\n') {
            return Err(ImageError::MultilineCommandLine);
        }
        let name = params.name.clone();
        let this = self.clone();
        if let Some(source) = params.from_debian.clone() {
            if !params.path.is_empty() || params.initrd.is_some() {
                return Err(ImageError::DebianKernelWithFiles);
            }
            let (package, agent) = tokio::task::spawn_blocking(move || {
                let (root, release) = DebianKernel::root_of(&source)?;
                let (_, agent) = find_agent(&agent_candidates(this.agent_path.as_deref()))?;
                // Everything of the package is opened on a thread with the
                // caller's filesystem identity, beneath the directory it
                // opened as them.
                let package = as_peer(&peer, || read_debian_package(&root, &release))
                    .map_err(ImageError::AssumeIdentity)??;
                Ok::<_, ImageError>((package, agent))
            })
            .await
            .map_err(|source| ImageError::Task {
                task: "Kernel import",
                source,
            })??;
            let this = self.clone();
            return spawn_import(operations, "kernel", &params.name, move |operation| {
                this.import_debian_kernel_blocking(&name, package, agent, cmdline, operation)
            });
        }
        let (kernel, initrd) = tokio::task::spawn_blocking(move || {
            let kernel = open_source(&peer, &params.path, "kernel", Some(MAX_KERNEL_BYTES))?;
            check_kernel_image(&kernel)?;
            let initrd = params
                .initrd
                .as_deref()
                .map(|path| open_source(&peer, path, "initrd", Some(MAX_INITRD_BYTES)))
                .transpose()?;
            Ok::<_, ImageError>((kernel, initrd))
        })
        .await
        .map_err(|source| ImageError::Task {
            task: "Kernel import",
            source,
        })??;
        let this = self.clone();
        spawn_import(operations, "kernel", &params.name, move |operation| {
            this.import_kernel_blocking(&name, kernel, initrd, cmdline, operation)
        })
    }

    /// Builds the vmlinux and the initramfs of a package read as the
    /// caller (as root, in `tmp/`), then registers both as an import with
    /// an initrd does.
    fn import_debian_kernel_blocking(
        &self,
        name: &str,
        package: DebianPackage,
        agent: Vec<u8>,
        cmdline: String,
        operation: &Arc<LiveOperation>,
    ) -> Result<Kernel, ImageError> {
        let mut kernel = package.kernel;
        let initrd_path = self.paths.tmp().join(format!("initrd-{}", new_id()));
        let _initrd_guard = RemoveOnDrop(Some(initrd_path.clone()));
        // Stored as the ELF vmlinux: Firecracker boots nothing else, and
        // QEMU's microvm boots it through its PVH note.
        let vmlinux_path = self.paths.tmp().join(format!("vmlinux-{}", new_id()));
        let _vmlinux_guard = RemoveOnDrop(Some(vmlinux_path.clone()));
        let initrd = stage(operation, "build initramfs", |_| {
            if let Some(file) = unpack_vmlinux(&mut kernel, &vmlinux_path)? {
                kernel.file = file;
            }
            let build_error = |source: InitramfsError| ImageError::BuildInitramfs {
                release: package.release.clone(),
                source,
            };
            let (archive, _) =
                initramfs::agent_initramfs(&package.release, &package.modules, agent)
                    .map_err(build_error)?;
            let output =
                std::fs::File::create(&initrd_path).map_err(|source| ImageError::CreateFile {
                    path: initrd_path.clone(),
                    source,
                })?;
            archive
                .write_gzip(std::io::BufWriter::new(output))
                .map_err(build_error)?;
            let file =
                std::fs::File::open(&initrd_path).map_err(|source| ImageError::ReopenFile {
                    path: initrd_path.clone(),
                    source,
                })?;
            check_kernel_image(&kernel)?;
            Ok(OpenSource {
                path: initrd_path.clone(),
                file,
                is_directory: false,
            })
        })?;
        self.import_kernel_blocking(name, kernel, Some(initrd), cmdline, operation)
    }

    /// Copies the kernel (and initrd) into a staging directory (stage
    /// `copy kernel`, with the bytes of both), moves it into `kernels/`
    /// and registers it (`register kernel`).
    fn import_kernel_blocking(
        &self,
        name: &str,
        mut kernel: OpenSource,
        initrd: Option<OpenSource>,
        cmdline: String,
        operation: &Arc<LiveOperation>,
    ) -> Result<Kernel, ImageError> {
        let id = new_id();
        let staging = self.paths.tmp().join(format!("kernel-{id}"));
        let mut staging_guard = RemoveOnDrop(Some(staging.clone()));
        std::fs::create_dir(&staging).map_err(ImageError::CreateKernelStaging)?;
        crate::fault::pause_at(|| "kernel import:copy".to_owned());
        let has_initrd = initrd.is_some();
        stage(operation, "copy kernel", |stage| {
            let length = |source: &OpenSource| source.file.metadata().map_or(0, |meta| meta.len());
            let kernel_bytes = length(&kernel);
            let total = kernel_bytes + initrd.as_ref().map_or(0, length);
            let mut meter = operation.meter(stage);
            let copied = copy_file(
                operation,
                &mut meter,
                (0, total),
                &mut kernel.file,
                &kernel.path,
                &staging.join("vmlinux"),
            )
            .map_err(ImageError::CopyKernel)
            .and_then(|_| match initrd {
                Some(mut initrd) => copy_file(
                    operation,
                    &mut meter,
                    (kernel_bytes, total),
                    &mut initrd.file,
                    &initrd.path,
                    &staging.join("initrd"),
                )
                .map(drop)
                .map_err(ImageError::CopyInitrd),
                None => Ok(()),
            });
            meter.finish();
            copied
        })?;
        stage(operation, "register kernel", |_| {
            let destination = self.paths.kernels().join(&id);
            std::fs::rename(&staging, &destination).map_err(ImageError::MoveKernel)?;
            staging_guard.disarm();
            let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
            crate::fault::pause_at(|| "kernel import:register".to_owned());
            let record = Kernel {
                id: id.clone(),
                name: name.to_owned(),
                kernel_path: destination.join("vmlinux").display().to_string(),
                initrd_path: has_initrd.then(|| destination.join("initrd").display().to_string()),
                cmdline,
                source: kernel.path.display().to_string(),
                created_at: now(),
            };
            self.store.insert_kernel(&record)?;
            destination_guard.disarm();
            Ok(record)
        })
    }
}

/// Refuses a file that is neither an ELF vmlinux nor a bzImage.
fn check_kernel_image(kernel: &OpenSource) -> Result<(), ImageError> {
    if files::is_kernel_image(&kernel.file, &kernel.path).map_err(ImageError::ReadKernel)? {
        Ok(())
    } else {
        Err(ImageError::NotAKernel {
            path: kernel.path.clone(),
        })
    }
}

/// What the daemon read of a Debian kernel package, as the caller.
struct DebianPackage {
    release: String,
    kernel: OpenSource,
    modules: Vec<initramfs::LoadedModule>,
}

/// Finds kernel `release` (empty: the newest) beneath `root` and reads its
/// kernel image and the modules the agent needs: every file beneath `root`
/// (no `..`, escaping symlink or magic link), regular, size-capped, opened
/// with the calling thread's rights.
fn read_debian_package(root: &Path, release: &str) -> Result<DebianPackage, ImageError> {
    let package = ConfinedDir::open(root)?;
    let located = DebianKernel::locate(&package, release)?;
    let kernel = OpenSource {
        path: package.path().join(&located.kernel),
        file: package.open_file(&located.kernel, MAX_KERNEL_BYTES)?,
        is_directory: false,
    };
    let build_error = |source: InitramfsError| ImageError::BuildInitramfs {
        release: located.release.clone(),
        source,
    };
    let directory = package
        .subdirectory(&located.modules)
        .map_err(|error| build_error(error.into()))?;
    let modules = KernelModules::read(&directory).map_err(build_error)?;
    let resolved = modules
        .resolve(initramfs::REQUIRED_MODULES, initramfs::OPTIONAL_MODULES)
        .map_err(build_error)?;
    let modules = initramfs::read_modules(&directory, &resolved).map_err(build_error)?;
    Ok(DebianPackage {
        release: located.release,
        kernel,
        modules,
    })
}

/// The static agent's bytes: the daemon's own file, read as root.
fn read_agent(path: &Path) -> Result<Vec<u8>, ImageError> {
    let read = || -> Result<Vec<u8>, ConfinedError> {
        let file = std::fs::File::open(path).map_err(|source| ConfinedError::Open {
            path: path.to_owned(),
            source,
        })?;
        confined::check_regular(&file, path, initramfs::AGENT_LIMIT)?;
        confined::read_limited(file, path, initramfs::AGENT_LIMIT)
    };
    read().map_err(|source| ImageError::ReadAgent {
        path: path.to_owned(),
        source,
    })
}

/// Writes the ELF vmlinux inside bzImage `kernel` to `output` and returns it
/// opened; `None` when `kernel` already is an ELF, or is compressed in a
/// format banger does not unpack (it is then kept as it is: QEMU boots a
/// bzImage, Firecracker will not).
fn unpack_vmlinux(
    kernel: &mut OpenSource,
    output: &Path,
) -> Result<Option<std::fs::File>, ImageError> {
    use std::io::{Read, Seek, Write};
    let mut image = Vec::new();
    (&mut kernel.file)
        .take(MAX_KERNEL_BYTES)
        .read_to_end(&mut image)
        .and_then(|_| kernel.file.rewind())
        .map_err(|source| ImageError::ReadFile {
            path: kernel.path.clone(),
            source,
        })?;
    if banger_disk::vmlinux::is_elf(&image) {
        return Ok(None);
    }
    let vmlinux = match banger_disk::vmlinux::extract(&image) {
        Ok(vmlinux) => vmlinux,
        Err(banger_disk::vmlinux::VmlinuxError::Unsupported { format }) => {
            tracing::warn!(kernel = %kernel.path.display(), format, "kept the bzImage: Firecracker cannot boot it");
            return Ok(None);
        }
        Err(source) => {
            return Err(ImageError::UnpackVmlinux {
                path: kernel.path.clone(),
                source,
            })
        }
    };
    let write_error = |source| ImageError::WriteFile {
        path: output.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(write_error)?;
    file.write_all(&vmlinux).map_err(write_error)?;
    file.rewind().map_err(write_error)?;
    Ok(Some(file))
}

/// Where the static guest agent is looked for, in order: `[agent] path`
/// alone when set; else next to the running `bangerd`, then
/// [`AGENT_INSTALL_PATHS`].
pub fn agent_candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = configured {
        return vec![path.to_owned()];
    }
    let mut candidates = Vec::new();
    if let Some(directory) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        candidates.push(directory.join("banger-agent"));
    }
    candidates.extend(AGENT_INSTALL_PATHS.map(PathBuf::from));
    candidates
}

/// The first candidate that is a static ELF executable for this machine's
/// architecture (the guest's), with its bytes. A candidate that is a file
/// but not such an executable (a dynamically linked `cargo build` output
/// next to `bangerd`, say) is skipped with a warning naming it.
pub fn find_agent(candidates: &[PathBuf]) -> Result<(PathBuf, Vec<u8>), ImageError> {
    let mut skipped = Vec::new();
    for path in candidates.iter().filter(|path| path.is_file()) {
        let bytes = read_agent(path)?;
        match static_executable_problem(&bytes, std::env::consts::ARCH) {
            None => return Ok((path.clone(), bytes)),
            Some(problem) => {
                tracing::warn!(agent = %path.display(), %problem, "skipped a guest agent that is not a static executable");
                skipped.push(format!("{}: {problem}", path.display()));
            }
        }
    }
    Err(ImageError::AgentNotFound {
        candidates: candidates.to_vec(),
        skipped,
    })
}

/// Why `bytes` cannot be the guest's `/init`, or `None` when it is a static
/// ELF executable for `arch` (a `std::env::consts::ARCH` name): no program
/// interpreter (`PT_INTERP`), so nothing to load from a root that is not
/// mounted yet.
pub fn static_executable_problem(bytes: &[u8], arch: &str) -> Option<String> {
    use goblin::elf::header;
    let elf = match goblin::elf::Elf::parse(bytes) {
        Ok(elf) => elf,
        Err(error) => return Some(format!("not an ELF executable ({error})")),
    };
    if !matches!(elf.header.e_type, header::ET_EXEC | header::ET_DYN) {
        return Some("not an ELF executable".to_owned());
    }
    let expected = match arch {
        "x86_64" => header::EM_X86_64,
        "aarch64" => header::EM_AARCH64,
        other => return Some(format!("unsupported guest architecture {other}")),
    };
    if elf.header.e_machine != expected {
        return Some(format!(
            "built for {}, not {arch}",
            header::machine_to_str(elf.header.e_machine)
        ));
    }
    if let Some(interpreter) = elf.interpreter {
        return Some(format!("dynamically linked (interpreter {interpreter})"));
    }
    None
}

#[cfg(test)]
mod tests {
    use banger_proto::ErrorKind;

    use super::*;
    use crate::error::RpcFailure;

    #[test]
    fn the_agent_is_the_configured_path_or_next_to_bangerd_then_installed() {
        assert_eq!(
            agent_candidates(Some(Path::new("/opt/agent"))),
            [PathBuf::from("/opt/agent")]
        );
        let candidates = agent_candidates(None);
        assert!(candidates.ends_with(&AGENT_INSTALL_PATHS.map(PathBuf::from)));
        assert!(candidates[0].ends_with("banger-agent"));

        let directory = tempfile::tempdir().unwrap();
        let missing = [directory.path().join("a"), directory.path().join("b")];
        let error = find_agent(&missing).unwrap_err();
        assert_eq!(
            crate::error::chain(&error),
            format!(
                "No static guest agent found (looked at {}, {})",
                missing[0].display(),
                missing[1].display()
            )
        );
        assert_eq!(error.kind(), ErrorKind::Failed);
        assert!(error.hint().unwrap().contains("build-agent.sh"));
        std::fs::write(&missing[1], "agent").unwrap();
        let error = find_agent(&missing).unwrap_err();
        assert!(
            crate::error::chain(&error).contains(&format!(
                "; skipped {}: not an ELF executable",
                missing[1].display()
            )),
            "{}",
            crate::error::chain(&error)
        );
    }

    /// A minimal ELF64 executable for `machine`: the header and one
    /// `PT_LOAD`, plus a `PT_INTERP` when `interpreter` is given.
    fn elf(machine: u16, interpreter: Option<&str>) -> Vec<u8> {
        use goblin::elf::{header, program_header};
        let count: u16 = if interpreter.is_some() { 2 } else { 1 };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&header::ET_EXEC.to_le_bytes());
        bytes.extend_from_slice(&machine.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes()); // e_version
        bytes.extend_from_slice(&0x40_1000u64.to_le_bytes()); // e_entry
        bytes.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        bytes.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        bytes.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        bytes.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        bytes.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        bytes.extend_from_slice(&count.to_le_bytes()); // e_phnum
        bytes.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
        let data_offset = 64 + 56 * u64::from(count);
        let mut segment = |kind: u32, offset: u64, size: u64| {
            bytes.extend_from_slice(&kind.to_le_bytes());
            bytes.extend_from_slice(&5u32.to_le_bytes()); // p_flags
            bytes.extend_from_slice(&offset.to_le_bytes());
            bytes.extend_from_slice(&(0x40_0000 + offset).to_le_bytes()); // p_vaddr
            bytes.extend_from_slice(&(0x40_0000 + offset).to_le_bytes()); // p_paddr
            bytes.extend_from_slice(&size.to_le_bytes()); // p_filesz
            bytes.extend_from_slice(&size.to_le_bytes()); // p_memsz
            bytes.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        };
        let interpreter_len = interpreter.map_or(0, |path| path.len() as u64 + 1);
        segment(program_header::PT_LOAD, 0, data_offset + interpreter_len);
        if interpreter.is_some() {
            segment(program_header::PT_INTERP, data_offset, interpreter_len);
        }
        if let Some(path) = interpreter {
            bytes.extend_from_slice(path.as_bytes());
            bytes.push(0);
        }
        bytes
    }

    #[test]
    fn only_a_static_executable_for_the_guest_architecture_is_packed() {
        use goblin::elf::header;
        assert_eq!(
            static_executable_problem(&elf(header::EM_X86_64, None), "x86_64"),
            None
        );
        assert_eq!(
            static_executable_problem(
                &elf(header::EM_X86_64, Some("/lib64/ld-linux-x86-64.so.2")),
                "x86_64"
            )
            .as_deref(),
            Some("dynamically linked (interpreter /lib64/ld-linux-x86-64.so.2)")
        );
        assert_eq!(
            static_executable_problem(&elf(header::EM_AARCH64, None), "x86_64").as_deref(),
            Some("built for AARCH64, not x86_64")
        );
        assert!(static_executable_problem(b"#!/bin/sh\n", "x86_64")
            .unwrap()
            .starts_with("not an ELF executable"));
    }

    #[test]
    fn a_dynamic_agent_first_in_the_list_is_skipped_for_the_static_one() {
        use goblin::elf::header;
        let machine = match std::env::consts::ARCH {
            "aarch64" => header::EM_AARCH64,
            _ => header::EM_X86_64,
        };
        let directory = tempfile::tempdir().unwrap();
        let dynamic = directory.path().join("target-release-banger-agent");
        let static_agent = directory.path().join("installed-banger-agent");
        // What `cargo build --release` leaves next to bangerd.
        std::fs::write(&dynamic, elf(machine, Some("/lib64/ld-linux-x86-64.so.2"))).unwrap();
        std::fs::write(&static_agent, elf(machine, None)).unwrap();
        let candidates = [dynamic.clone(), static_agent.clone()];
        let (found, bytes) = find_agent(&candidates).unwrap();
        assert_eq!(found, static_agent);
        assert_eq!(bytes, std::fs::read(&static_agent).unwrap());

        // Only the dynamic one: refused, naming it and why, with the hint.
        let error = find_agent(&candidates[..1]).unwrap_err();
        assert_eq!(
            crate::error::chain(&error),
            format!(
                "No static guest agent found (looked at {0}; skipped {0}: dynamically linked (interpreter /lib64/ld-linux-x86-64.so.2))",
                dynamic.display()
            )
        );
        assert!(error.hint().unwrap().contains("scripts/build-agent.sh"));

        // The test binary itself is a real dynamically linked executable.
        let real = std::env::current_exe().unwrap();
        assert!(
            static_executable_problem(&std::fs::read(real).unwrap(), std::env::consts::ARCH)
                .unwrap()
                .starts_with("dynamically linked")
        );
    }
}
