//! banger's loop and device-mapper devices as the kernel shows them in
//! sysfs, for reconciliation.
//!
//! A device is banger's when:
//! - a dm device is named `banger-<vm id>`;
//! - a loop device's backing file lies under the state dir.
//!
//! Releasing leaked devices:
//! 1. Scan; remove every `banger-*` dm device whose VM is not live
//!    (`dmsetup remove --retry`), then detach the loop devices it held.
//! 2. Scan again; detach every banger loop device nothing holds (no dm
//!    device on top): banger attaches loops only under its dm devices.

use std::path::{Path, PathBuf};

use super::{dm_snapshot::DM_PREFIX, CloneError};
use crate::command::{arguments, CommandRunner};

/// A device-mapper device named `banger-<vm id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDevice {
    /// The dm name (`banger-<vm id>`).
    pub name: String,
    pub vm_id: String,
    /// Kernel name, e.g. `dm-3`.
    pub kernel_name: String,
    /// Kernel names of the devices under it (`loop0`, `loop1`).
    pub slaves: Vec<String>,
}

/// A loop device whose backing file lies under the state dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// Kernel name, e.g. `loop3`.
    pub kernel_name: String,
    /// `/dev/loop3`.
    pub device: PathBuf,
    pub backing_file: PathBuf,
    /// Whether something (a dm device) holds it.
    pub held: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDevices {
    pub dm_devices: Vec<DmDevice>,
    pub loop_devices: Vec<LoopDevice>,
}

/// Lists banger's dm and loop devices from `sysfs` (normally `/sys`).
///
/// # Errors
/// [`CloneError::Scan`] when `SYSFS/block` cannot be read.
pub fn scan(sysfs: &Path, state_dir: &Path) -> Result<HostDevices, CloneError> {
    let block = sysfs.join("block");
    let state_dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let entries = std::fs::read_dir(&block).map_err(|source| CloneError::Scan {
        path: block.clone(),
        source,
    })?;
    let mut found = HostDevices::default();
    for entry in entries.flatten() {
        let kernel_name = entry.file_name().to_string_lossy().into_owned();
        let device_dir = block.join(&kernel_name);
        if kernel_name.starts_with("dm-") {
            let Ok(name) = std::fs::read_to_string(device_dir.join("dm/name")) else {
                continue;
            };
            let name = name.trim().to_owned();
            if let Some(vm_id) = name.strip_prefix(DM_PREFIX) {
                found.dm_devices.push(DmDevice {
                    vm_id: vm_id.to_owned(),
                    name: name.clone(),
                    kernel_name,
                    slaves: list_names(&device_dir.join("slaves")),
                });
            }
        } else if kernel_name.starts_with("loop") {
            let Ok(backing) = std::fs::read_to_string(device_dir.join("loop/backing_file")) else {
                continue;
            };
            let backing = backing.trim_end_matches('\n');
            let backing = PathBuf::from(backing.strip_suffix(" (deleted)").unwrap_or(backing));
            if backing.starts_with(&state_dir) {
                found.loop_devices.push(LoopDevice {
                    device: PathBuf::from("/dev").join(&kernel_name),
                    held: !list_names(&device_dir.join("holders")).is_empty(),
                    kernel_name,
                    backing_file: backing,
                });
            }
        }
    }
    found.dm_devices.sort_by(|a, b| a.name.cmp(&b.name));
    found
        .loop_devices
        .sort_by(|a, b| a.kernel_name.cmp(&b.kernel_name));
    Ok(found)
}

/// The dm device called `name`, if the kernel has one.
pub(crate) fn find_dm_device(sysfs: &Path, name: &str) -> Option<DmDevice> {
    let block = sysfs.join("block");
    std::fs::read_dir(&block).ok()?.flatten().find_map(|entry| {
        let kernel_name = entry.file_name().to_string_lossy().into_owned();
        let device_dir = block.join(&kernel_name);
        let found = std::fs::read_to_string(device_dir.join("dm/name")).ok()?;
        (found.trim() == name).then(|| DmDevice {
            name: name.to_owned(),
            vm_id: name.strip_prefix(DM_PREFIX).unwrap_or(name).to_owned(),
            slaves: list_names(&device_dir.join("slaves")),
            kernel_name,
        })
    })
}

fn list_names(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// What [`release_leaked`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    pub dm_devices: Vec<String>,
    pub loop_devices: Vec<PathBuf>,
}

/// Removes banger dm devices of VMs that are not live and detaches banger
/// loop devices nothing holds. Goes on after a failure and returns the first
/// error at the end, so one stuck device does not keep the others leaked.
///
/// # Errors
/// The first [`CloneError`] met.
pub fn release_leaked(
    runner: &dyn CommandRunner,
    sysfs: &Path,
    state_dir: &Path,
    is_live: &dyn Fn(&str) -> bool,
) -> Result<Released, CloneError> {
    let mut released = Released::default();
    let mut first_error = None;
    for device in scan(sysfs, state_dir)?.dm_devices {
        if is_live(&device.vm_id) {
            continue;
        }
        match runner.run(
            "dmsetup",
            &arguments(["remove", "--retry", device.name.as_str()]),
        ) {
            Ok(_) => released.dm_devices.push(device.name),
            Err(source) => {
                first_error.get_or_insert(CloneError::RemoveDm {
                    name: device.name,
                    source,
                });
            }
        }
    }
    for device in scan(sysfs, state_dir)?.loop_devices {
        if device.held {
            continue;
        }
        match detach_loop(runner, &device.device) {
            Ok(()) => released.loop_devices.push(device.device),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(released), Err)
}

pub(super) fn detach_loop(runner: &dyn CommandRunner, device: &Path) -> Result<(), CloneError> {
    runner
        .run(
            "losetup",
            &arguments([std::ffi::OsStr::new("-d"), device.as_os_str()]),
        )
        .map(|_| ())
        .map_err(|source| CloneError::DetachLoop {
            device: device.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::fake::RecordingRunner;

    fn device(sysfs: &Path, kernel_name: &str, files: &[(&str, &str)], links: &[&str]) {
        let directory = sysfs.join("block").join(kernel_name);
        for (name, content) in files {
            std::fs::create_dir_all(directory.join(name).parent().unwrap()).unwrap();
            std::fs::write(directory.join(name), content).unwrap();
        }
        for link in links {
            std::fs::create_dir_all(directory.join(link)).unwrap();
        }
    }

    #[test]
    fn scan_finds_only_banger_devices_and_release_spares_live_vms() {
        let directory = tempfile::tempdir().unwrap();
        let sysfs = directory.path().join("sys");
        let state = directory.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let state_name = std::fs::canonicalize(&state).unwrap();
        let image = format!("{}/images/i.ext4\n", state_name.display());
        let cow = format!("{}/vms/dead/rootfs.cow (deleted)\n", state_name.display());
        device(
            &sysfs,
            "dm-0",
            &[("dm/name", "banger-live\n")],
            &["slaves/loop0"],
        );
        device(
            &sysfs,
            "dm-1",
            &[("dm/name", "banger-dead\n")],
            &["slaves/loop1", "slaves/loop2"],
        );
        device(&sysfs, "dm-2", &[("dm/name", "vg0-root\n")], &[]);
        device(
            &sysfs,
            "loop0",
            &[("loop/backing_file", &image)],
            &["holders/dm-0"],
        );
        device(
            &sysfs,
            "loop1",
            &[("loop/backing_file", &image)],
            &["holders/dm-1"],
        );
        device(
            &sysfs,
            "loop2",
            &[("loop/backing_file", &cow)],
            &["holders/dm-1"],
        );
        device(
            &sysfs,
            "loop3",
            &[("loop/backing_file", "/home/user/other.img\n")],
            &[],
        );
        device(&sysfs, "loop4", &[("loop/backing_file", &image)], &[]);
        device(&sysfs, "sda", &[], &[]);
        let found = scan(&sysfs, &state).unwrap();
        let names: Vec<_> = found
            .dm_devices
            .iter()
            .map(|device| device.vm_id.as_str())
            .collect();
        assert_eq!(names, ["dead", "live"]);
        assert_eq!(found.dm_devices[0].slaves, ["loop1", "loop2"]);
        let loops: Vec<_> = found
            .loop_devices
            .iter()
            .map(|device| (device.kernel_name.as_str(), device.held))
            .collect();
        assert_eq!(
            loops,
            [
                ("loop0", true),
                ("loop1", true),
                ("loop2", true),
                ("loop4", false)
            ]
        );
        assert_eq!(
            found.loop_devices[2].backing_file,
            state_name.join("vms/dead/rootfs.cow")
        );
        let runner = RecordingRunner::default();
        let released = release_leaked(&runner, &sysfs, &state, &|vm_id| vm_id == "live").unwrap();
        // The fake does not change sysfs, so only the unheld loop goes.
        assert_eq!(released.dm_devices, ["banger-dead"]);
        assert_eq!(released.loop_devices, [PathBuf::from("/dev/loop4")]);
        assert_eq!(
            *runner.calls.lock().unwrap(),
            [
                "dmsetup remove --retry banger-dead",
                "losetup -d /dev/loop4"
            ]
        );
    }
}
