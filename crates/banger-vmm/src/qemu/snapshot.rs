//! QEMU snapshots: the paused guest's RAM and device state as a migration
//! stream written to a file QEMU is handed over QMP (`getfd`, then
//! `migrate fd:NAME`), restored into a QEMU started with `-incoming defer`
//! (`migrate-incoming fd:NAME`); `vmstate` records the format and version.

use std::path::Path;
use std::time::Duration;

use super::{control_error, qmp, Qemu, QmpError, BACKEND};
use crate::{LaunchSpec, SnapshotInfo, VmmError, VmmHandle};

impl Qemu {
    /// [`crate::Vmm::snapshot`]: the paused guest's migration stream into
    /// `dir` (see [`Qemu::migrate_out`]); nothing is left on failure.
    pub(super) async fn write_snapshot(
        &self,
        handle: &VmmHandle,
        dir: &Path,
    ) -> Result<SnapshotInfo, VmmError> {
        let version = self
            .version(handle)
            .await
            .map_err(|source| control_error(handle, "snapshot", source))?;
        let info = SnapshotInfo::in_dir(BACKEND, version, dir);
        let written = self.migrate_out(handle, &info).await;
        if written.is_err() {
            let _ = std::fs::remove_file(&info.memory_path);
            let _ = std::fs::remove_file(&info.state_path);
        }
        written?;
        Ok(info)
    }

    /// [`crate::Vmm::restore`]: QEMU started with `-incoming defer`, then
    /// the stream loaded ([`Qemu::migrate_in`]); killed on failure.
    pub(super) async fn restore_snapshot(
        &self,
        spec: &LaunchSpec,
        snapshot: &SnapshotInfo,
    ) -> Result<VmmHandle, VmmError> {
        snapshot.check_restorable_by(BACKEND, None)?;
        let handle = self
            .spawn_with(spec, &["-incoming".as_ref(), "defer".as_ref()])
            .await?;
        if let Err(error) = self.migrate_in(&handle, snapshot).await {
            self.abandon(&handle).await;
            return Err(error);
        }
        Ok(handle)
    }

    /// QEMU's version, `major.minor.micro` (`query-version`).
    async fn version(&self, handle: &VmmHandle) -> Result<String, QmpError> {
        let value = self
            .client(handle)
            .connect()
            .await?
            .execute("query-version", None)
            .await?;
        let part = |key: &str| value["qemu"][key].as_u64().unwrap_or_default();
        Ok(format!(
            "{}.{}.{}",
            part("major"),
            part("minor"),
            part("micro")
        ))
    }

    /// The paused guest's whole state (RAM and devices) as a migration
    /// stream into `memory`, through an fd QEMU is handed (`getfd`; its
    /// sandbox forbids `exec:`), then `vmstate` records the format. The
    /// guest stays paused; `cont` runs it again.
    async fn migrate_out(&self, handle: &VmmHandle, info: &SnapshotInfo) -> Result<(), VmmError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file_error = |path: &Path| {
            let path = path.to_owned();
            move |source| VmmError::SnapshotFile {
                vm_id: handle.vm_id().to_owned(),
                path,
                source,
            }
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&info.memory_path)
            .map_err(file_error(&info.memory_path))?;
        let control = |source| control_error(handle, "snapshot", source);
        let mut connection = self.client(handle).connect().await.map_err(control)?;
        migrate_through_fd(&mut connection, "migrate", file)
            .await
            .map_err(control)?;
        std::fs::write(
            &info.state_path,
            format!(
                "qemu {} migration stream in {}\n",
                info.backend_version,
                crate::SNAPSHOT_MEMORY_FILE
            ),
        )
        .map_err(file_error(&info.state_path))?;
        std::fs::set_permissions(&info.state_path, std::fs::Permissions::from_mode(0o600))
            .map_err(file_error(&info.state_path))
    }

    /// Loads a snapshot into a QEMU started with `-incoming defer`: checks
    /// the version, hands it the stream read-only (`migrate-incoming
    /// fd:NAME`), waits for the load, runs the guest.
    async fn migrate_in(
        &self,
        handle: &VmmHandle,
        snapshot: &SnapshotInfo,
    ) -> Result<(), VmmError> {
        let control = |source| control_error(handle, "restore", source);
        let version = self.version(handle).await.map_err(control)?;
        snapshot.check_restorable_by(BACKEND, Some(&version))?;
        let file = std::fs::File::open(&snapshot.memory_path).map_err(|source| {
            VmmError::SnapshotFile {
                vm_id: handle.vm_id().to_owned(),
                path: snapshot.memory_path.clone(),
                source,
            }
        })?;
        let mut connection = self.client(handle).connect().await.map_err(control)?;
        migrate_through_fd(&mut connection, "migrate-incoming", file)
            .await
            .map_err(control)?;
        connection.execute("cont", None).await.map_err(control)?;
        Ok(())
    }
}

/// The name the migration stream's fd is given in QEMU.
const MIGRATION_FD: &str = "banger-snapshot";
/// How long a snapshot may take to write or load.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// Hands QEMU `file` as the migration stream (`getfd`, SCM_RIGHTS), runs
/// `command` (`migrate` or `migrate-incoming`) on it and waits until the
/// migration is done. The daemon's copy of the descriptor is closed once
/// QEMU holds its own.
async fn migrate_through_fd(
    connection: &mut qmp::QmpConnection,
    command: &str,
    file: std::fs::File,
) -> Result<(), QmpError> {
    use std::os::fd::AsFd;
    connection.pass_fd(MIGRATION_FD, file.as_fd()).await?;
    drop(file);
    connection
        .execute(
            command,
            Some(serde_json::json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await?;
    wait_for_migration(connection).await
}

/// Polls `query-migrate` until it is `completed` (or failed, or the
/// timeout passes).
async fn wait_for_migration(connection: &mut qmp::QmpConnection) -> Result<(), QmpError> {
    let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let status = connection.execute("query-migrate", None).await?;
        match status["status"].as_str().unwrap_or_default() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(QmpError::Refused {
                    command: "migrate".to_owned(),
                    class: "MigrationFailed".to_owned(),
                    description: status["error-desc"]
                        .as_str()
                        .unwrap_or("the migration failed")
                        .to_owned(),
                })
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(QmpError::TimedOut {
                step: "migrate".to_owned(),
                timeout: MIGRATION_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
