//! Running a VMM unprivileged: Firecracker's jailer (chroot, uid/gid drop,
//! PID and mount namespaces, cgroups) and what the host must prepare for it.
//!
//! The layout, as the jailer builds it (Firecracker's `docs/jailer.md`):
//!
//! ```text
//! <chroot_base>/<exec_file_name>/<vm_id>/root/    the VMM's `/`, owned by uid:gid
//!   <exec_file_name>        a copy of the Firecracker binary (made by the jailer)
//!   <exec_file_name>.pid    the VMM's pid as the host sees it (written by the jailer)
//!   dev/kvm, dev/net/tun    device nodes (made by the jailer)
//!   firecracker.sock        the API socket
//!   vsock.sock              the vsock Unix socket
//!   vmlinux, initrd         kernel and initrd, hard links
//!   drive-<id>              each drive: a hard link (regular files) or a
//!                           device node (block devices)
//!   firecracker.log, firecracker.metrics   hard links of the runtime dir's
//! ```
//!
//! The VM's runtime directory gets a symlink `jail` to the chroot, so the
//! daemon reaches the sockets through short paths
//! (`<runtime_dir>/jail/firecracker.sock`) whatever the chroot's path length.
//! Files are hard-linked, never copied: a file on another filesystem than
//! the chroot base is refused with an error naming it. Writable files are
//! given to uid:gid; read-only ones stay root's and are made world-readable.
//!
//! The chroot only lives as long as the VMM: [`remove_jail`] removes it, and
//! the VM's cgroups, once the process is gone (stop, kill, crash, a failed
//! start).

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the symlink in a VM's runtime directory that points to its chroot.
pub const JAIL_LINK: &str = "jail";
/// The cgroup (under each hierarchy's root) that holds one cgroup per VM.
pub const PARENT_CGROUP: &str = "banger";

/// How [`crate::firecracker::Firecracker`] jails Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The `jailer` executable; a bare name is looked up in `PATH`.
    pub jailer: PathBuf,
    /// `--chroot-base-dir`: must exist, on the same filesystem as the VMs'
    /// disks, kernels and runtime directories.
    pub chroot_base: PathBuf,
    /// The unprivileged user the VMM runs as.
    pub uid: u32,
    pub gid: u32,
    /// How CPU and memory limits are applied; `None` runs without them.
    pub cgroups: Option<Cgroups>,
}

/// The cgroup hierarchy the jailer puts each VM in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy mounted here, with `cpu` and `memory` enabled.
    V2 { root: PathBuf },
    /// Legacy hierarchies: `cpu` and `memory` each mounted on their own.
    V1 { cpu: PathBuf, memory: PathBuf },
}

impl Cgroups {
    /// What the host offers, read from `/proc/mounts`: cgroup v2 when its
    /// root offers both `cpu` and `memory`, else v1 when both controllers
    /// are mounted, else `None`.
    #[must_use]
    pub fn detect() -> Option<Self> {
        let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
        Self::from_mounts(&mounts, |root| {
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
        })
    }

    fn from_mounts(mounts: &str, controllers: impl Fn(&Path) -> String) -> Option<Self> {
        let mut v1_cpu = None;
        let mut v1_memory = None;
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, mount_point, kind, options, ..] = fields[..] else {
                continue;
            };
            let mount_point = PathBuf::from(mount_point);
            match kind {
                "cgroup2" => {
                    let offered = controllers(&mount_point);
                    let offered: Vec<&str> = offered.split_whitespace().collect();
                    if offered.contains(&"cpu") && offered.contains(&"memory") {
                        return Some(Self::V2 { root: mount_point });
                    }
                }
                "cgroup" => {
                    let options: Vec<&str> = options.split(',').collect();
                    if options.contains(&"cpu") {
                        v1_cpu = Some(mount_point.clone());
                    }
                    if options.contains(&"memory") {
                        v1_memory = Some(mount_point);
                    }
                }
                _ => {}
            }
        }
        Some(Self::V1 {
            cpu: v1_cpu?,
            memory: v1_memory?,
        })
    }

    /// The limits of a VM of `vcpus` whose VMM may use `memory_mib` in all:
    /// CPU time capped at `vcpus` CPUs, memory at `memory_mib`; as
    /// `(<controller>.<file>, value)`.
    #[must_use]
    pub fn limits(&self, vcpus: u8, memory_mib: u64) -> Vec<(String, String)> {
        const PERIOD_US: u64 = 100_000;
        let quota_us = PERIOD_US * u64::from(vcpus.max(1));
        let memory_bytes = memory_mib << 20;
        let limit = |file: &str, value: String| (file.to_owned(), value);
        match self {
            Self::V2 { .. } => vec![
                limit("cpu.max", format!("{quota_us} {PERIOD_US}")),
                limit("memory.max", memory_bytes.to_string()),
            ],
            Self::V1 { .. } => vec![
                limit("cpu.cfs_period_us", PERIOD_US.to_string()),
                limit("cpu.cfs_quota_us", quota_us.to_string()),
                limit("memory.limit_in_bytes", memory_bytes.to_string()),
            ],
        }
    }

    /// The jailer flags that put a Firecracker VM of `vcpus` and
    /// `memory_mib` in its own cgroup under [`PARENT_CGROUP`], with
    /// [`Self::limits`] (the guest's memory plus
    /// [`VMM_MEMORY_OVERHEAD_MIB`]).
    #[must_use]
    pub fn jailer_args(&self, vcpus: u8, memory_mib: u32) -> Vec<String> {
        let version = match self {
            Self::V2 { .. } => "2",
            Self::V1 { .. } => "1",
        };
        let mut args = vec![
            "--cgroup-version".to_owned(),
            version.to_owned(),
            "--parent-cgroup".to_owned(),
            PARENT_CGROUP.to_owned(),
        ];
        for (file, value) in self.limits(vcpus, u64::from(memory_mib) + VMM_MEMORY_OVERHEAD_MIB) {
            args.push("--cgroup".to_owned());
            args.push(format!("{file}={value}"));
        }
        args
    }

    /// Makes VM `vm_id`'s cgroups with [`Self::limits`] and moves process
    /// `pid` (all its threads) into them: what the jailer does, for a VMM
    /// without one (QEMU). v2 enables `cpu` and `memory` for the children
    /// of the root and of [`PARENT_CGROUP`].
    ///
    /// # Errors
    /// When a cgroup cannot be made or written; the caller removes what was
    /// made with [`remove_cgroups`].
    pub fn enter(
        &self,
        vm_id: &str,
        pid: u32,
        vcpus: u8,
        memory_mib: u64,
    ) -> Result<(), JailError> {
        let write = |path: PathBuf, value: &str| {
            std::fs::write(&path, value).map_err(|source| JailError::Prepare { path, source })
        };
        let make = |path: &Path| {
            std::fs::create_dir_all(path).map_err(|source| JailError::Prepare {
                path: path.to_owned(),
                source,
            })
        };
        let limits = self.limits(vcpus, memory_mib);
        match self {
            Self::V2 { root } => {
                let parent = root.join(PARENT_CGROUP);
                make(&parent)?;
                for dir in [root, &parent] {
                    write(dir.join("cgroup.subtree_control"), "+cpu +memory")?;
                }
                let own = parent.join(vm_id);
                make(&own)?;
                for (file, value) in &limits {
                    write(own.join(file), value)?;
                }
                write(own.join("cgroup.procs"), &pid.to_string())?;
            }
            Self::V1 { cpu, memory } => {
                for hierarchy in [cpu, memory] {
                    let own = hierarchy.join(PARENT_CGROUP).join(vm_id);
                    make(&own)?;
                    for (file, value) in &limits {
                        if own.join(file).exists() {
                            write(own.join(file), value)?;
                        }
                    }
                    write(own.join("cgroup.procs"), &pid.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The cgroup directories of VM `vm_id` (one per hierarchy).
    #[must_use]
    pub fn vm_cgroups(&self, vm_id: &str) -> Vec<PathBuf> {
        match self {
            Self::V2 { root } => vec![root.join(PARENT_CGROUP).join(vm_id)],
            Self::V1 { cpu, memory } => {
                let mut dirs = vec![cpu.join(PARENT_CGROUP).join(vm_id)];
                if memory != cpu {
                    dirs.push(memory.join(PARENT_CGROUP).join(vm_id));
                }
                dirs
            }
        }
    }
}

/// Memory a VMM process needs besides the guest's RAM.
pub const VMM_MEMORY_OVERHEAD_MIB: u64 = 128;

/// A failure preparing or removing a VM's jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("The jailer `{}` was not found", jailer.display())]
    JailerNotFound { jailer: PathBuf },
    #[error("The Firecracker binary `{}` was not found", binary.display())]
    BinaryNotFound { binary: PathBuf },
    #[error(
        "{} is on another filesystem than the jail directory {}: the VMM can only reach it through a hard link (move the state directory so both are on one filesystem, or set `[firecracker] jailed = false`)",
        path.display(),
        chroot_base.display()
    )]
    OtherFilesystem { path: PathBuf, chroot_base: PathBuf },
    #[error("Could not prepare {} in the jail", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where one VM's jail lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPaths {
    /// `<chroot_base>/<exec_file_name>/<vm_id>`: removed whole.
    pub vm_dir: PathBuf,
    /// `<vm_dir>/root`: the VMM's `/`.
    pub root: PathBuf,
    /// `<runtime_dir>/jail`, the symlink to `root`.
    pub link: PathBuf,
}

impl JailPaths {
    #[must_use]
    pub fn new(
        chroot_base: &Path,
        exec_file_name: &OsString,
        vm_id: &str,
        runtime_dir: &Path,
    ) -> Self {
        let vm_dir = chroot_base.join(exec_file_name).join(vm_id);
        Self {
            root: vm_dir.join("root"),
            vm_dir,
            link: runtime_dir.join(JAIL_LINK),
        }
    }

    /// The path the jailed VMM sees for a host path inside the jail
    /// (`<runtime_dir>/jail/x` or `<root>/x` become `/x`); `None` for any
    /// other path.
    #[must_use]
    pub fn inside(&self, host_path: &Path) -> Option<PathBuf> {
        let relative = host_path
            .strip_prefix(&self.link)
            .or_else(|_| host_path.strip_prefix(&self.root))
            .ok()?;
        Some(Path::new("/").join(relative))
    }
}

/// Finds an executable: a path is used as is, a bare name is looked up in
/// `PATH`. The result is absolute (the jailer canonicalises `--exec-file`).
#[must_use]
pub fn find_executable(program: &Path) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 || program.is_absolute() {
        return is_executable(program)
            .then(|| std::fs::canonicalize(program).ok())
            .flatten();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .and_then(|found| std::fs::canonicalize(found).ok())
}

/// Builds the part of the jail the host provides: a fresh `root` (a stale
/// jail of an earlier run is removed first), and the `jail` symlink in the
/// runtime directory.
///
/// # Errors
/// When a directory or the symlink cannot be made.
pub fn create_jail(paths: &JailPaths) -> Result<(), JailError> {
    remove_dir_if_present(&paths.vm_dir)?;
    let prepare = |path: &Path| {
        let path = path.to_owned();
        move |source| JailError::Prepare { path, source }
    };
    std::fs::create_dir_all(&paths.root).map_err(prepare(&paths.root))?;
    remove_file_if_present(&paths.link).map_err(prepare(&paths.link))?;
    std::os::unix::fs::symlink(&paths.root, &paths.link).map_err(prepare(&paths.link))
}

/// Makes `host_path` reachable as `/<name>` inside the jail: a hard link of
/// a regular file, a device node for a block device. A writable entry is
/// given to `uid:gid`; a read-only regular file is made world-readable (it
/// stays root's, so the VMM cannot change it). Returns the path inside.
///
/// # Errors
/// [`JailError::OtherFilesystem`] when a regular file is on another
/// filesystem than the jail; any failure to link, make or chown.
pub fn link_into(
    config: &JailConfig,
    paths: &JailPaths,
    host_path: &Path,
    name: &str,
    writable: bool,
) -> Result<PathBuf, JailError> {
    let target = paths.root.join(name);
    let prepare = |source| JailError::Prepare {
        path: host_path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(host_path).map_err(prepare)?;
    remove_file_if_present(&target).map_err(prepare)?;
    if metadata.file_type().is_block_device() {
        nix::sys::stat::mknod(
            &target,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(if writable { 0o600 } else { 0o400 }),
            metadata.rdev(),
        )
        .map_err(|errno| prepare(io::Error::from(errno)))?;
        std::os::unix::fs::chown(&target, Some(config.uid), Some(config.gid)).map_err(prepare)?;
    } else {
        match std::fs::hard_link(host_path, &target) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
                return Err(JailError::OtherFilesystem {
                    path: host_path.to_owned(),
                    chroot_base: config.chroot_base.clone(),
                });
            }
            Err(error) => return Err(prepare(error)),
        }
        if writable {
            std::os::unix::fs::chown(&target, Some(config.uid), Some(config.gid))
                .map_err(prepare)?;
        } else if metadata.mode() & 0o004 == 0 {
            let mode = metadata.permissions().mode() | 0o444;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(prepare)?;
        }
    }
    Ok(Path::new("/").join(name))
}

/// Makes the regular file `host_path` (a snapshot's state or memory)
/// reachable as `/<name>` inside the jail, readable by the VMM and nobody
/// else: a hard link, the file made `root:gid` mode 0640. The VMM cannot
/// write it, so one restore cannot change what the next one loads.
///
/// # Errors
/// [`JailError::OtherFilesystem`] when the file is on another filesystem
/// than the jail; any failure to link or chown.
pub fn link_read_only_for_vmm(
    config: &JailConfig,
    paths: &JailPaths,
    host_path: &Path,
    name: &str,
) -> Result<PathBuf, JailError> {
    let target = paths.root.join(name);
    let prepare = |source| JailError::Prepare {
        path: host_path.to_owned(),
        source,
    };
    remove_file_if_present(&target).map_err(prepare)?;
    match std::fs::hard_link(host_path, &target) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
            return Err(JailError::OtherFilesystem {
                path: host_path.to_owned(),
                chroot_base: config.chroot_base.clone(),
            });
        }
        Err(error) => return Err(prepare(error)),
    }
    std::os::unix::fs::chown(&target, Some(0), Some(config.gid)).map_err(prepare)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).map_err(prepare)?;
    Ok(Path::new("/").join(name))
}

/// Whether tap `name` already belongs to `uid` (its sysfs `owner`).
#[must_use]
pub fn tap_owned_by(name: &str, uid: u32) -> bool {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("owner"))
        .is_ok_and(|owner| owner.trim() == uid.to_string())
}

/// Gives the persistent tap `name` to `uid:gid` (`TUNSETOWNER`,
/// `TUNSETGROUP`), so a jailed VMM, which opens its taps itself after the
/// privilege drop, may attach to it. Root attaches to the tap for this; it
/// must not be in use.
///
/// # Errors
/// When the tap cannot be attached to or its owner set.
#[allow(unsafe_code)]
pub fn set_tap_owner(name: &str, uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    let error = |source| JailError::Prepare {
        path: PathBuf::from(format!("tap {name}")),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(error(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(error)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        // At most IFNAMSIZ - 1 bytes (checked above): the last stays NUL.
        *slot = byte as libc::c_char;
    }
    // The flags banger creates its taps with and Firecracker opens them with.
    #[allow(clippy::cast_possible_truncation)]
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    request.ifr_ifru.ifru_flags = flags;
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `request` a valid
    // ifreq that lives across the call; TUNSETIFF reads and writes only
    // within it.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &raw mut request) } < 0 {
        return Err(error(io::Error::last_os_error()));
    }
    for (request, id) in [(libc::TUNSETOWNER, uid), (libc::TUNSETGROUP, gid)] {
        // SAFETY: TUNSETOWNER and TUNSETGROUP take the id as an integer.
        if unsafe { libc::ioctl(tun.as_raw_fd(), request as _, libc::c_ulong::from(id)) } < 0 {
            return Err(error(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The jail of the VM whose runtime directory is `runtime_dir`, from its
/// `jail` symlink, if it points into `chroot_base` (anything else is not
/// ours to remove).
#[must_use]
pub fn jail_of(chroot_base: &Path, runtime_dir: &Path) -> Option<JailPaths> {
    let link = runtime_dir.join(JAIL_LINK);
    let root = std::fs::read_link(&link).ok()?;
    let vm_dir = root.parent()?.to_owned();
    let inside_base = vm_dir
        .parent()
        .and_then(Path::parent)
        .is_some_and(|base| base == chroot_base);
    (inside_base && root.file_name() == Some("root".as_ref())).then_some(JailPaths {
        vm_dir,
        root,
        link,
    })
}

/// Removes VM `vm_id`'s cgroups, once its processes are gone. Missing ones
/// are not an error.
///
/// # Errors
/// The first cgroup that could not be removed; the others are still tried.
pub fn remove_cgroups(cgroups: &Cgroups, vm_id: &str) -> Result<(), JailError> {
    let mut first_error = None;
    for dir in cgroups.vm_cgroups(vm_id) {
        // A process that just exited may still be leaving its cgroup.
        let mut result = std::fs::remove_dir(&dir);
        for _ in 0..50 {
            if !matches!(&result, Err(error) if error.raw_os_error() == Some(libc::EBUSY)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            result = std::fs::remove_dir(&dir);
        }
        match result {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                first_error.get_or_insert(JailError::Remove {
                    path: dir,
                    source: error,
                });
            }
            _ => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Removes a VM's jail (chroot directory and symlink) and its cgroups. Only
/// called once the VMM is gone. Missing parts are not an error.
///
/// # Errors
/// The first part that could not be removed; the others are still tried.
pub fn remove_jail(
    paths: &JailPaths,
    cgroups: Option<&Cgroups>,
    vm_id: &str,
) -> Result<(), JailError> {
    let mut first_error = None;
    if let Err(error) = remove_dir_if_present(&paths.vm_dir) {
        first_error.get_or_insert(error);
    }
    if let Err(source) = remove_file_if_present(&paths.link) {
        first_error.get_or_insert(JailError::Remove {
            path: paths.link.clone(),
            source,
        });
    }
    if let Some(cgroups) = cgroups {
        if let Err(error) = remove_cgroups(cgroups, vm_id) {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn remove_dir_if_present(path: &Path) -> Result<(), JailError> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(JailError::Remove {
            path: path.to_owned(),
            source: error,
        }),
        _ => Ok(()),
    }
}

fn remove_file_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_is_preferred_when_it_offers_cpu_and_memory() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        let found = Cgroups::from_mounts(mounts, |_| "cpuset cpu io memory pids".to_owned());
        assert_eq!(
            found,
            Some(Cgroups::V2 {
                root: "/sys/fs/cgroup".into()
            })
        );
        let limits = found.unwrap().jailer_args(2, 512);
        assert_eq!(
            limits,
            [
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "banger",
                "--cgroup",
                "cpu.max=200000 100000",
                "--cgroup",
                "memory.max=671088640",
            ]
        );
    }

    #[test]
    fn hybrid_hosts_use_the_v1_controllers() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let found = Cgroups::from_mounts(mounts, |_| String::new()).unwrap();
        assert_eq!(
            found.vm_cgroups("abc"),
            [
                PathBuf::from("/sys/fs/cgroup/cpu/banger/abc"),
                PathBuf::from("/sys/fs/cgroup/memory/banger/abc"),
            ]
        );
        assert!(found
            .jailer_args(1, 256)
            .contains(&"memory.limit_in_bytes=402653184".to_owned()));
        assert_eq!(Cgroups::from_mounts("", |_| String::new()), None);
    }

    #[test]
    fn paths_inside_the_jail_are_rooted_at_slash() {
        let paths = JailPaths::new(
            Path::new("/state/jail"),
            &OsString::from("firecracker"),
            "0123",
            Path::new("/state/vms/0123"),
        );
        assert_eq!(paths.root, Path::new("/state/jail/firecracker/0123/root"));
        assert_eq!(
            paths.inside(Path::new("/state/vms/0123/jail/vsock.sock")),
            Some(PathBuf::from("/vsock.sock"))
        );
        assert_eq!(paths.inside(Path::new("/state/vms/0123/disk")), None);
    }

    #[test]
    fn a_jail_link_outside_the_base_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("jail");
        let runtime = dir.path().join("vm");
        std::fs::create_dir_all(&runtime).unwrap();
        let paths = JailPaths::new(&base, &OsString::from("fc"), "id1", &runtime);
        create_jail(&paths).unwrap();
        assert_eq!(jail_of(&base, &runtime), Some(paths.clone()));
        assert_eq!(jail_of(&dir.path().join("elsewhere"), &runtime), None);
        remove_jail(&paths, None, "id1").unwrap();
        assert!(!paths.vm_dir.exists() && paths.link.symlink_metadata().is_err());
    }
}
