//! Kernel import: a kernel file and optional initrd, or `--from-debian` a
//! Debian kernel package made into a vmlinux and an initramfs with the
//! guest agent; and where that static agent is looked for.

use std::path::{Path, PathBuf};

use banger_disk::confined::{self, ConfinedDir, ConfinedError};
use banger_disk::initramfs::{self, DebianKernel, InitramfsError, KernelModules};
use banger_proto::{ImportKernelParams, Kernel};

use super::{open_source, ImageError, ImageService, OpenSource, RemoveOnDrop};
use crate::access::{as_peer, Peer};
use crate::files;
use crate::ids::{new_id, now, validate_artifact_name};

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
    pub async fn import_kernel(
        &self,
        peer: Peer,
        params: ImportKernelParams,
    ) -> Result<Kernel, ImageError> {
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
        if let Some(source) = params.from_debian.clone() {
            if !params.path.is_empty() || params.initrd.is_some() {
                return Err(ImageError::DebianKernelWithFiles);
            }
            let this = self.clone();
            return tokio::task::spawn_blocking(move || {
                this.import_debian_kernel_blocking(&peer, &params.name, &source, cmdline)
            })
            .await
            .map_err(|source| ImageError::Task {
                task: "Kernel import",
                source,
            })?;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let kernel = open_source(&peer, &params.path, "kernel", Some(MAX_KERNEL_BYTES))?;
            let initrd = params
                .initrd
                .as_deref()
                .map(|path| open_source(&peer, path, "initrd", Some(MAX_INITRD_BYTES)))
                .transpose()?;
            this.import_kernel_blocking(&params.name, kernel, initrd, cmdline)
        })
        .await
        .map_err(|source| ImageError::Task {
            task: "Kernel import",
            source,
        })?
    }

    /// Reads the package as the caller, beneath the directory they named
    /// (or `/` for an installed release), then builds the initramfs and
    /// registers both as root; see the module docs of `banger_disk::confined`.
    fn import_debian_kernel_blocking(
        &self,
        peer: &Peer,
        name: &str,
        source: &str,
        cmdline: String,
    ) -> Result<Kernel, ImageError> {
        let (root, release) = DebianKernel::root_of(source)?;
        let agent = find_agent(&agent_candidates(self.agent_path.as_deref()))?;
        let agent = read_agent(&agent)?;
        // Everything of the package is opened on a thread with the caller's
        // filesystem identity, beneath the directory it opened as them.
        let package = as_peer(peer, || read_debian_package(&root, &release))
            .map_err(ImageError::AssumeIdentity)??;
        let mut kernel = package.kernel;
        let initrd_path = self.paths.tmp().join(format!("initrd-{}", new_id()));
        let _initrd_guard = RemoveOnDrop(Some(initrd_path.clone()));
        // Stored as the ELF vmlinux: Firecracker boots nothing else, and
        // QEMU's microvm boots it through its PVH note.
        let vmlinux_path = self.paths.tmp().join(format!("vmlinux-{}", new_id()));
        let _vmlinux_guard = RemoveOnDrop(Some(vmlinux_path.clone()));
        if let Some(file) = unpack_vmlinux(&mut kernel, &vmlinux_path)? {
            kernel.file = file;
        }
        let build_error = |source: InitramfsError| ImageError::BuildInitramfs {
            release: package.release.clone(),
            source,
        };
        let (archive, _) = initramfs::agent_initramfs(&package.release, &package.modules, agent)
            .map_err(build_error)?;
        let output =
            std::fs::File::create(&initrd_path).map_err(|source| ImageError::CreateFile {
                path: initrd_path.clone(),
                source,
            })?;
        archive
            .write_gzip(std::io::BufWriter::new(output))
            .map_err(build_error)?;
        let file = std::fs::File::open(&initrd_path).map_err(|source| ImageError::ReopenFile {
            path: initrd_path.clone(),
            source,
        })?;
        let initrd = OpenSource {
            path: initrd_path.clone(),
            file,
            is_directory: false,
        };
        self.import_kernel_blocking(name, kernel, Some(initrd), cmdline)
    }

    fn import_kernel_blocking(
        &self,
        name: &str,
        mut kernel: OpenSource,
        initrd: Option<OpenSource>,
        cmdline: String,
    ) -> Result<Kernel, ImageError> {
        if !files::is_kernel_image(&kernel.file, &kernel.path).map_err(ImageError::ReadKernel)? {
            return Err(ImageError::NotAKernel { path: kernel.path });
        }
        let id = new_id();
        let staging = self.paths.tmp().join(format!("kernel-{id}"));
        let mut staging_guard = RemoveOnDrop(Some(staging.clone()));
        std::fs::create_dir(&staging).map_err(ImageError::CreateKernelStaging)?;
        crate::fault::pause_at(|| "kernel import:copy".to_owned());
        files::copy_with_digest(&mut kernel.file, &kernel.path, &staging.join("vmlinux"))
            .map_err(ImageError::CopyKernel)?;
        let has_initrd = initrd.is_some();
        if let Some(mut initrd) = initrd {
            files::copy_with_digest(&mut initrd.file, &initrd.path, &staging.join("initrd"))
                .map_err(ImageError::CopyInitrd)?;
        }
        let destination = self.paths.kernels().join(&id);
        std::fs::rename(&staging, &destination).map_err(ImageError::MoveKernel)?;
        staging_guard.disarm();
        let mut destination_guard = RemoveOnDrop(Some(destination.clone()));
        crate::fault::pause_at(|| "kernel import:register".to_owned());
        let record = Kernel {
            id,
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

/// The first candidate that is a file.
pub fn find_agent(candidates: &[PathBuf]) -> Result<PathBuf, ImageError> {
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| ImageError::AgentNotFound {
            candidates: candidates.to_vec(),
        })
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
        assert_eq!(find_agent(&missing).unwrap(), missing[1]);
    }
}
