//! PID 1 duties, for guests booted with the agent as init.
//!
//! Before the async runtime starts (so `fork` is safe):
//! 1. Mount what a minimal system needs ([`MOUNTS`]), skipping targets that
//!    are already mount points (the kernel may have mounted `devtmpfs`).
//! 2. Read `/proc/cmdline`: apply `banger.name=` as the hostname; with
//!    `banger.init=PATH` hand PID 1 to that init (systemd) and keep serving
//!    as its sibling ([`hand_off`]).
//! 3. Turn Ctrl-Alt-Del into SIGINT to us, so a VMM's graceful stop reaches
//!    [`power_off`].
//!
//! While serving, the reaper collects every child (orphans included). On
//! SIGTERM/SIGINT/SIGPWR or a host `shutdown`, [`power_off`] signals every
//! process, waits briefly, syncs, unmounts and powers off.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;

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
}

/// Parses `/proc/cmdline`; unknown words are ignored, the last value wins.
pub fn parse_cmdline(cmdline: &str) -> BootParameters {
    let mut parameters = BootParameters::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let value = value.trim_matches('"');
        match key {
            "banger.name" if is_valid_hostname(value) => {
                parameters.hostname = Some(value.to_owned())
            }
            "banger.init" if value.starts_with('/') => parameters.init = Some(PathBuf::from(value)),
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

/// Mounts what is missing, sets the hostname, disables Ctrl-Alt-Del reboot.
/// Returns the boot parameters for the caller's hand-off decision.
pub fn set_up() -> Result<BootParameters, InitError> {
    // /proc may not be mounted yet; then nothing is.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for spec in mounts_needed(&mountinfo) {
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
    let parameters = parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
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
