//! The fake's snapshot endpoints: `PUT /snapshot/create` (steps 4) and
//! `PUT /snapshot/load` (step 5) of [`super`]'s lifecycle.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use super::{bind_vsock, Boot, Effect, Outcome, Vmm, VmmError, VsockDevice, FIRECRACKER_VERSION};
use crate::fake_firecracker::models::{
    BootSource, Drive, InstanceState, MachineConfiguration, MemoryBackendType, NetworkInterface,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType, Vsock,
};

/// What the fake's snapshot state file holds: the configuration of the
/// devices, as the real one holds their state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotState {
    pub firecracker_version: String,
    pub instance_id: String,
    pub boot_source: Option<BootSource>,
    pub drives: Vec<Drive>,
    pub machine: MachineConfiguration,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
}

impl Vmm {
    pub(super) fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
    ) -> Result<Outcome, VmmError> {
        if params.snapshot_type == Some(SnapshotType::Diff)
            && self.machine.track_dirty_pages != Some(true)
        {
            return Err(VmmError::DiffSnapshotNotTracked);
        }
        if self.state != InstanceState::Paused {
            return Err(VmmError::SnapshotWhileRunning);
        }
        let state = SnapshotState {
            firecracker_version: FIRECRACKER_VERSION.to_owned(),
            instance_id: self.instance_id.clone(),
            boot_source: self.boot_source.clone(),
            drives: self.drives.clone(),
            machine: self.machine.clone(),
            network_interfaces: self.network_interfaces.clone(),
            vsock: self.vsock.as_ref().map(|device| device.config.clone()),
        };
        let write_error = |path: &str| {
            let path = PathBuf::from(path);
            move |source| VmmError::WriteSnapshot { path, source }
        };
        let json = serde_json::to_vec_pretty(&state).expect("the snapshot state serializes");
        std::fs::write(super::super::host_path(&params.snapshot_path), json)
            .map_err(write_error(&params.snapshot_path))?;
        let memory = (|| {
            let mut file = File::create(super::super::host_path(&params.mem_file_path))?;
            file.write_all(format!("fake guest memory of {}\n", self.instance_id).as_bytes())?;
            file.set_len(self.machine.mem_size_mib * 1024 * 1024)
        })();
        if let Err(source) = memory {
            let _ = std::fs::remove_file(super::super::host_path(&params.snapshot_path));
            return Err(write_error(&params.mem_file_path)(source));
        }
        self.log("Snapshot created");
        Ok(Outcome::empty())
    }

    pub(super) fn load_snapshot(
        &mut self,
        params: SnapshotLoadParams,
    ) -> Result<Outcome, VmmError> {
        if self.configured {
            return Err(VmmError::LoadSnapshotNotAllowed);
        }
        let memory_path = match (&params.mem_file_path, &params.mem_backend) {
            (Some(path), None) => path.clone(),
            (None, Some(backend)) if backend.backend_type == MemoryBackendType::File => {
                backend.backend_path.clone()
            }
            (None, Some(_)) => return Err(VmmError::UffdNotImplemented),
            _ => return Err(VmmError::LoadSnapshotMemory),
        };
        let snapshot_path = PathBuf::from(&params.snapshot_path);
        let text = std::fs::read(super::super::host_path(&snapshot_path)).map_err(|source| {
            VmmError::OpenSnapshot {
                path: snapshot_path.clone(),
                source,
            }
        })?;
        let mut state: SnapshotState =
            serde_json::from_slice(&text).map_err(|source| VmmError::ParseSnapshot {
                path: snapshot_path.clone(),
                source,
            })?;
        // Mapped privately by the real VMM: opened read-only, never written.
        File::open(super::super::host_path(&memory_path)).map_err(|source| {
            VmmError::OpenMemory {
                path: PathBuf::from(&memory_path),
                source,
            }
        })?;
        for drive in &state.drives {
            if let Some(path) = &drive.path_on_host {
                let writable = drive.is_read_only != Some(true);
                OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(super::super::host_path(path))
                    .map_err(|source| VmmError::RestoreDrive {
                        drive_id: drive.drive_id.clone(),
                        source: Box::new(VmmError::OpenDrive {
                            path: PathBuf::from(path),
                            source,
                        }),
                    })?;
            }
        }
        for network_override in params.network_overrides.unwrap_or_default() {
            let interface = state
                .network_interfaces
                .iter_mut()
                .find(|interface| interface.iface_id == network_override.iface_id)
                .ok_or(VmmError::UnknownNetworkOverride {
                    iface_id: network_override.iface_id.clone(),
                })?;
            interface.host_dev_name = network_override.host_dev_name;
        }
        if let (Some(vsock), Some(vsock_override)) = (&mut state.vsock, params.vsock_override) {
            vsock.uds_path = vsock_override.uds_path;
        }
        let listener = state
            .vsock
            .as_ref()
            .map(|vsock| bind_vsock(&vsock.uds_path))
            .transpose()?;
        self.boot_source = state.boot_source;
        self.drives = state.drives;
        self.machine = state.machine;
        self.network_interfaces = state.network_interfaces;
        self.vsock = state.vsock.map(|config| VsockDevice {
            config,
            listener: None,
        });
        self.configured = true;
        let boot_source = self.boot_source.clone();
        let boot = Boot {
            kernel_image_path: boot_source
                .as_ref()
                .map(|source| source.kernel_image_path.clone())
                .unwrap_or_default(),
            boot_args: boot_source.and_then(|source| source.boot_args),
            vsock_listener: listener,
        };
        self.log(&format!("Loaded the snapshot {}", snapshot_path.display()));
        if params.resume_vm == Some(true) {
            self.state = InstanceState::Running;
            Ok(Outcome {
                body: None,
                effect: Some(Effect::Booted(boot)),
            })
        } else {
            self.state = InstanceState::Paused;
            self.pending_boot = Some(boot);
            Ok(Outcome::empty())
        }
    }
}
