//! PID 1 duties, for guests booted with the agent as init.
//!
//! From the initramfs `banger_disk::initramfs` builds (the agent is `/init`
//! and [`MODULE_LIST`] exists), [`switch_from_initramfs`] runs first:
//! 1. Mount `/proc`, `/sys` and `/dev`.
//! 2. Load the modules in [`MODULE_LIST`] in order with `finit_module`
//!    (compressed ones with `MODULE_INIT_COMPRESSED_FILE`); a module that
//!    fails is reported and the rest still load.
//! 3. Wait up to [`ROOT_WAIT`] for the `root=` device (default `/dev/vda`),
//!    mount it on [`NEW_ROOT`] (`rootfstype=`, default ext4; `ro` or `rw`).
//! 4. Mount a tmpfs on the new root's `/run` and copy the agent to
//!    [`AGENT_COPY`] there, so it outlives the initramfs.
//! 5. Move `/dev`, `/proc` and `/sys` into the new root, delete the
//!    initramfs's files (its memory is freed), move the new root onto `/`,
//!    chroot into it.
//! 6. Exec the copy with `--from-initramfs`, which starts again below as
//!    PID 1 of the real root. If a step fails the error is printed on the
//!    console and the agent serves from the initramfs, so the host gets
//!    answers (and the console the reason) instead of a hang.
//!
//! Then, before the async runtime starts (so `fork` is safe):
//! 1. Mount what a minimal system needs ([`MOUNTS`]), skipping targets that
//!    are already mount points (the kernel may have mounted `devtmpfs`).
//! 2. Read `/proc/cmdline`: apply `banger.name=` as the hostname; with
//!    `banger.init=PATH` hand PID 1 to that init (systemd) and keep serving
//!    as its child ([`hand_off`]). Coming from the initramfs, the root's
//!    `/sbin/init` is handed PID 1 when it exists and `banger.init=` is
//!    absent; `banger.init=none` keeps the agent PID 1 either way.
//! 3. Turn Ctrl-Alt-Del into SIGINT to us, so a VMM's graceful stop reaches
//!    [`power_off`].
//!
//! While serving, the reaper collects every child (orphans included). On
//! SIGTERM/SIGINT/SIGPWR or a host `shutdown`, [`power_off`] signals every
//! process, waits briefly, syncs, unmounts and powers off.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

/// Present only in the initramfs: the modules to load, one absolute path a line.
pub const MODULE_LIST: &str = "/banger/modules";
/// Where the root device is mounted before it becomes `/`.
pub const NEW_ROOT: &str = "/newroot";
/// The agent's copy in the real root (on a tmpfs mounted on its `/run`).
pub const AGENT_COPY: &str = "/run/banger/agent";
/// How long to wait for the root device to appear.
pub const ROOT_WAIT: Duration = Duration::from_secs(10);
/// The flag the agent is re-executed with after leaving the initramfs.
pub const FROM_INITRAMFS_FLAG: &str = "--from-initramfs";
/// `finit_module` flag: the kernel decompresses the module itself.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("Failed to create mount point {target}")]
    CreateMountPoint {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to set the hostname to {hostname}")]
    SetHostname {
        hostname: String,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to read the module list {path}")]
    ReadModuleList {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to open kernel module {path}")]
    OpenModule {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to load kernel module {path}")]
    LoadModule {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "Root device {device} did not appear within {waited:?} (root= on the kernel command line)"
    )]
    RootDeviceMissing { device: PathBuf, waited: Duration },
    #[error("Failed to mount the root device {device} ({fstype}) on {target}")]
    MountRoot {
        device: PathBuf,
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to move {source_path} to {target}")]
    MoveMount {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to copy the agent to {target}")]
    CopyAgent {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to switch the root to {new_root}")]
    SwitchRoot {
        new_root: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to hand PID 1 to {init}")]
    HandOff {
        init: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// One filesystem PID 1 mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// The mount table, in order (parents before children).
pub const MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
];

/// What banger passes the guest on the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootParameters {
    /// `banger.name=`: the hostname.
    pub hostname: Option<String>,
    /// `banger.init=`: an init to hand PID 1 to.
    pub init: Option<PathBuf>,
    /// `banger.init=none`: stay PID 1 even if the root has an init.
    pub init_disabled: bool,
    /// `root=`, `rootfstype=`, `ro`/`rw`: what the initramfs mounts.
    pub root: RootParameters,
}

/// The root file system the initramfs stage mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootParameters {
    pub device: PathBuf,
    pub fstype: String,
    pub read_only: bool,
}

impl Default for RootParameters {
    fn default() -> Self {
        Self {
            device: PathBuf::from("/dev/vda"),
            fstype: "ext4".to_owned(),
            read_only: false,
        }
    }
}

impl BootParameters {
    /// The init to hand PID 1 to: `banger.init=`, else (coming from the
    /// initramfs) the root's `/sbin/init` if `exists` says it is there.
    pub fn hand_off_target(
        &self,
        from_initramfs: bool,
        exists: impl Fn(&Path) -> bool,
    ) -> Option<PathBuf> {
        if self.init_disabled {
            return None;
        }
        if let Some(init) = &self.init {
            return Some(init.clone());
        }
        let default = Path::new("/sbin/init");
        (from_initramfs && exists(default)).then(|| default.to_owned())
    }
}

/// Parses `/proc/cmdline`; unknown words are ignored, the last value wins.
pub fn parse_cmdline(cmdline: &str) -> BootParameters {
    let mut parameters = BootParameters::default();
    for word in cmdline.split_whitespace() {
        match word {
            "ro" => parameters.root.read_only = true,
            "rw" => parameters.root.read_only = false,
            _ => {}
        }
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let value = value.trim_matches('"');
        match key {
            "banger.name" if is_valid_hostname(value) => {
                parameters.hostname = Some(value.to_owned());
            }
            "banger.init" if value == "none" => {
                parameters.init = None;
                parameters.init_disabled = true;
            }
            "banger.init" if value.starts_with('/') => {
                parameters.init = Some(PathBuf::from(value));
                parameters.init_disabled = false;
            }
            "root" if value.starts_with("/dev/") => parameters.root.device = PathBuf::from(value),
            "rootfstype" if !value.is_empty() => parameters.root.fstype = value.to_owned(),
            _ => {}
        }
    }
    parameters
}

fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Targets of `/proc/self/mountinfo` text (field 5).
pub fn mounted_targets(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|target| target.replace("\\040", " "))
        .collect()
}

/// The entries of [`MOUNTS`] whose target is not mounted yet.
pub fn mounts_needed(mountinfo: &str) -> Vec<MountSpec> {
    let mounted = mounted_targets(mountinfo);
    MOUNTS
        .iter()
        .filter(|spec| !mounted.iter().any(|target| target == spec.target))
        .copied()
        .collect()
}

/// `/proc/cmdline`, parsed (empty when unreadable).
#[must_use]
pub fn read_cmdline() -> BootParameters {
    parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// Mounts what is missing, sets the hostname, disables Ctrl-Alt-Del reboot.
/// Returns the boot parameters for the caller's hand-off decision.
pub fn set_up() -> Result<BootParameters, InitError> {
    mount_missing(MOUNTS)?;
    let parameters = read_cmdline();
    if let Some(hostname) = &parameters.hostname {
        nix::unistd::sethostname(hostname).map_err(|source| InitError::SetHostname {
            hostname: hostname.clone(),
            source,
        })?;
    }
    // Ctrl-Alt-Del now sends SIGINT to PID 1 instead of rebooting at once.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    Ok(parameters)
}

/// Whether `/` is banger's initramfs.
#[must_use]
pub fn is_initramfs() -> bool {
    Path::new(MODULE_LIST).exists()
}

fn mount_missing(specs: &[MountSpec]) -> Result<(), InitError> {
    // /proc may not be mounted yet; then nothing is.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mounted_targets(&mountinfo);
    for spec in specs
        .iter()
        .filter(|spec| !mounted.iter().any(|target| target == spec.target))
    {
        let target = Path::new(spec.target);
        std::fs::create_dir_all(target).map_err(|source| InitError::CreateMountPoint {
            target: target.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some(spec.fstype),
            target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        )
        .map_err(|source| InitError::Mount {
            fstype: spec.fstype,
            target: target.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// The module paths of a module list: one absolute path a line, `#` comments.
#[must_use]
pub fn parse_module_list(list: &str) -> Vec<PathBuf> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// Loads one module; one that is already loaded counts as loaded.
pub fn load_module(path: &Path) -> Result<(), InitError> {
    let file = std::fs::File::open(path).map_err(|source| InitError::OpenModule {
        path: path.to_owned(),
        source,
    })?;
    let compressed = path
        .extension()
        .is_some_and(|extension| extension == "xz" || extension == "zst" || extension == "gz");
    let flags = if compressed {
        nix::kmod::ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        nix::kmod::ModuleInitFlags::empty()
    };
    match nix::kmod::finit_module(&file, c"", flags) {
        Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
        Err(source) => Err(InitError::LoadModule {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads every module of `list` in order; returns the failures (each also
/// printed), so one missing driver does not keep the others out.
pub fn load_modules(list: &Path) -> Result<Vec<InitError>, InitError> {
    let text = std::fs::read_to_string(list).map_err(|source| InitError::ReadModuleList {
        path: list.to_owned(),
        source,
    })?;
    let mut failures = Vec::new();
    for path in parse_module_list(&text) {
        if let Err(error) = load_module(&path) {
            tracing::error!("{}", banger_proto::error_chain(&error));
            failures.push(error);
        }
    }
    Ok(failures)
}

/// Polls until `path` exists or `timeout` passes.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Steps 1–5 of the initramfs stage (see the module docs). On success the
/// process runs in the new root; the caller execs [`AGENT_COPY`] if this
/// returns `true` (the copy exists).
pub fn switch_from_initramfs() -> Result<bool, InitError> {
    mount_missing(&MOUNTS[..3])?;
    let parameters = read_cmdline();
    let started = Instant::now();
    let failures = load_modules(Path::new(MODULE_LIST))?;
    tracing::info!(
        failed = failures.len(),
        "loaded modules in {:?}",
        started.elapsed()
    );
    let root = &parameters.root;
    if !wait_for_path(&root.device, ROOT_WAIT) {
        return Err(InitError::RootDeviceMissing {
            device: root.device.clone(),
            waited: ROOT_WAIT,
        });
    }
    let new_root = Path::new(NEW_ROOT);
    std::fs::create_dir_all(new_root).map_err(|source| InitError::CreateMountPoint {
        target: new_root.to_owned(),
        source,
    })?;
    let mut flags = MsFlags::empty();
    if root.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(&root.device),
        new_root,
        Some(root.fstype.as_str()),
        flags,
        None::<&str>,
    )
    .map_err(|source| InitError::MountRoot {
        device: root.device.clone(),
        fstype: root.fstype.clone(),
        target: new_root.to_owned(),
        source,
    })?;
    let copied = match copy_agent(new_root) {
        Ok(()) => true,
        Err(error) => {
            tracing::error!("{}", banger_proto::error_chain(&error));
            false
        }
    };
    for target in ["/dev", "/proc", "/sys"] {
        move_mount(Path::new(target), &new_root.join(&target[1..]))?;
    }
    delete_initramfs(new_root);
    let switch_error = |source| InitError::SwitchRoot {
        new_root: new_root.to_owned(),
        source,
    };
    nix::unistd::chdir(new_root).map_err(switch_error)?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(switch_error)?;
    nix::unistd::chroot(".").map_err(switch_error)?;
    nix::unistd::chdir("/").map_err(switch_error)?;
    tracing::info!(device = %root.device.display(), "switched root in {:?}", started.elapsed());
    Ok(copied)
}

/// Mounts a tmpfs on the new root's `/run` and copies `/init` there.
fn copy_agent(new_root: &Path) -> Result<(), InitError> {
    let run = new_root.join("run");
    let target = new_root.join(&AGENT_COPY[1..]);
    let copy_error = |source| InitError::CopyAgent {
        target: target.clone(),
        source,
    };
    std::fs::create_dir_all(&run).map_err(copy_error)?;
    nix::mount::mount(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        NOSUID_NODEV,
        Some("mode=0755"),
    )
    .map_err(|source| InitError::Mount {
        fstype: "tmpfs",
        target: run.clone(),
        source,
    })?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(copy_error)?;
    }
    std::fs::copy("/init", &target).map_err(copy_error)?;
    Ok(())
}

fn move_mount(source_path: &Path, target: &Path) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(|source| InitError::CreateMountPoint {
        target: target.to_owned(),
        source,
    })?;
    nix::mount::mount(
        Some(source_path),
        target,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|source| InitError::MoveMount {
        source_path: source_path.to_owned(),
        target: target.to_owned(),
        source,
    })
}

/// Removes the initramfs's files (they live in RAM) without crossing into
/// another file system: only entries on the same device as `/` go.
fn delete_initramfs(new_root: &Path) {
    let Ok(root_device) = std::fs::metadata("/").map(|metadata| metadata.dev()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == new_root {
            continue;
        }
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.dev() != root_device {
            continue;
        }
        let removed = if metadata.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(error) = removed {
            tracing::warn!(
                "failed to remove {} from the initramfs: {error}",
                path.display()
            );
        }
    }
}

/// Replaces this process with the agent's copy in the new root, adding
/// [`FROM_INITRAMFS_FLAG`]. Returns only on failure.
pub fn exec_agent_copy() -> nix::Error {
    let path = std::ffi::CString::new(AGENT_COPY).unwrap_or_default();
    let mut argv = vec![path.clone()];
    for argument in std::env::args_os().skip(1) {
        if let Ok(argument) = std::ffi::CString::new(argument.into_encoded_bytes()) {
            argv.push(argument);
        }
    }
    argv.push(std::ffi::CString::new(FROM_INITRAMFS_FLAG).unwrap_or_default());
    match nix::unistd::execv(&path, &argv) {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

/// Forks: PID 1 execs `init`, the child returns and goes on as the agent.
/// Must run before any thread is started.
pub fn hand_off(init: &Path) -> Result<(), InitError> {
    let error = |source| InitError::HandOff {
        init: init.to_owned(),
        source,
    };
    let path = std::ffi::CString::new(init.as_os_str().as_encoded_bytes())
        .map_err(|_| error(nix::Error::EINVAL))?;
    // SAFETY: called before the runtime or any other thread exists, so the
    // child is a complete copy of a single-threaded process.
    #[allow(unsafe_code)]
    let forked = unsafe { nix::unistd::fork() }.map_err(error)?;
    match forked {
        nix::unistd::ForkResult::Child => Ok(()),
        nix::unistd::ForkResult::Parent { .. } => {
            let argv = [path.clone()];
            let failure = nix::unistd::execv(&path, &argv).unwrap_err();
            Err(error(failure))
        }
    }
}

/// After a hand-off the image's init is PID 1: ask it for a clean power-off
/// the way it expects (systemd: SIGRTMIN+4; others: their `poweroff`, and
/// busybox init's SIGUSR2 as the last resort).
pub fn ask_init_to_power_off() {
    let signal = if Path::new("/run/systemd/system").exists() {
        libc::SIGRTMIN() + 4
    } else {
        match std::process::Command::new("poweroff").status() {
            Ok(status) if status.success() => return,
            _ => libc::SIGUSR2,
        }
    };
    // SAFETY: kill(2) with a constant pid and a valid signal number.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(1, signal) } == 0;
    if !sent {
        tracing::error!(
            "Failed to ask init to power off: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Stops every process, syncs, unmounts and powers off. Never returns.
pub fn power_off() -> ! {
    use nix::sys::signal::{kill, Signal};
    let everyone = nix::unistd::Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    std::thread::sleep(Duration::from_secs(2));
    let _ = kill(everyone, Signal::SIGKILL);
    nix::unistd::sync();
    for spec in MOUNTS.iter().rev() {
        let _ = nix::mount::umount2(spec.target, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) only returns on failure; PID 1 must not exit (kernel panic) – wait forever.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gives_hostname_and_init() {
        let parameters = parse_cmdline(
            "console=ttyS0 reboot=k panic=1 banger.name=dev-box banger.init=/sbin/init quiet\n",
        );
        assert_eq!(parameters.hostname.as_deref(), Some("dev-box"));
        assert_eq!(parameters.init.as_deref(), Some(Path::new("/sbin/init")));
        assert_eq!(
            parse_cmdline("console=ttyS0 root=/dev/vda"),
            BootParameters::default()
        );
    }

    #[test]
    fn cmdline_gives_the_root_device() {
        let parameters = parse_cmdline("console=ttyS0 root=/dev/vda rw");
        assert_eq!(parameters.root, RootParameters::default());
        let parameters = parse_cmdline("root=/dev/vdb rootfstype=xfs ro");
        assert_eq!(
            parameters.root,
            RootParameters {
                device: PathBuf::from("/dev/vdb"),
                fstype: "xfs".to_owned(),
                read_only: true,
            }
        );
        // The kernel's own rules: the last of ro/rw wins; a LABEL= root is not ours to resolve.
        let parameters = parse_cmdline("ro root=LABEL=x rw");
        assert_eq!(parameters.root, RootParameters::default());
    }

    #[test]
    fn hand_off_prefers_banger_init_then_the_roots_init() {
        let present = |_: &Path| true;
        let absent = |_: &Path| false;
        let none = parse_cmdline("");
        assert_eq!(
            none.hand_off_target(true, present).as_deref(),
            Some(Path::new("/sbin/init"))
        );
        assert_eq!(none.hand_off_target(true, absent), None);
        // Booted straight from a root disk, only banger.init= hands off.
        assert_eq!(none.hand_off_target(false, present), None);
        let systemd = parse_cmdline("banger.init=/lib/systemd/systemd");
        assert_eq!(
            systemd.hand_off_target(false, absent).as_deref(),
            Some(Path::new("/lib/systemd/systemd"))
        );
        let disabled = parse_cmdline("banger.init=/sbin/init banger.init=none");
        assert!(disabled.init_disabled);
        assert_eq!(disabled.hand_off_target(true, present), None);
    }

    #[test]
    fn module_list_is_one_path_a_line() {
        assert_eq!(
            parse_module_list(
                "# load order\n/lib/modules/6.1/a.ko\n\n /lib/modules/6.1/b.ko.xz \n"
            ),
            [
                PathBuf::from("/lib/modules/6.1/a.ko"),
                PathBuf::from("/lib/modules/6.1/b.ko.xz")
            ]
        );
    }

    #[test]
    fn a_missing_module_is_a_clear_error() {
        let error = load_module(Path::new("/nonexistent/virtio_blk.ko")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Failed to open kernel module /nonexistent/virtio_blk.ko"
        );
        let error = load_modules(Path::new("/nonexistent/modules")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Failed to read the module list /nonexistent/modules"
        );
    }

    #[test]
    fn cmdline_refuses_bad_values() {
        let parameters = parse_cmdline("banger.name=Bad_Name banger.init=relative/init");
        assert_eq!(parameters, BootParameters::default());
        let parameters = parse_cmdline("banger.name=\"ok-name\" banger.name=");
        assert_eq!(parameters.hostname.as_deref(), Some("ok-name"));
    }

    #[test]
    fn mount_table_mounts_parents_first() {
        let targets: Vec<&str> = MOUNTS.iter().map(|spec| spec.target).collect();
        assert_eq!(
            targets,
            ["/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp"]
        );
        let dev = targets.iter().position(|target| *target == "/dev").unwrap();
        let pts = targets
            .iter()
            .position(|target| *target == "/dev/pts")
            .unwrap();
        assert!(dev < pts);
        let tmp = MOUNTS.iter().find(|spec| spec.target == "/tmp").unwrap();
        assert_eq!(tmp.data, Some("mode=1777"));
        assert!(tmp.flags.contains(MsFlags::MS_NOSUID));
    }

    #[test]
    fn already_mounted_targets_are_skipped() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,mode=755
24 22 0:20 / /proc rw,nosuid,nodev,noexec - proc proc rw
";
        let needed: Vec<&str> = mounts_needed(mountinfo)
            .iter()
            .map(|spec| spec.target)
            .collect();
        assert_eq!(needed, ["/sys", "/dev/pts", "/run", "/tmp"]);
        assert_eq!(mounts_needed("").len(), MOUNTS.len());
    }
}
