//! SQLite state of the daemon: what banger made, and the source of truth for
//! reconciliation.
//!
//! The store is a thin repository layer: it maps rows to the wire types of
//! `banger-proto` and enforces integrity (unique names, images and kernels
//! that VMs still reference cannot be removed). It has no policy.
//!
//! Concurrency: one connection behind a mutex. Every call is a short
//! statement; callers never hold the store across an await point or while
//! waiting on anything else (see the lock order in `docs/ARCHITECTURE.md`).

mod migrations;
mod netpolicy;

pub use netpolicy::ports_overlap;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use banger_proto::vm::VmNetwork;
use banger_proto::{
    Backend, Image, Kernel, Operation, OperationState, Snapshot, StageEvent, Vm, VmState, WorkDisk,
};
use rusqlite::{params, Connection, OptionalExtension, Row};

use migrations::MIGRATIONS;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Failed to open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "Database {path} has schema version {found}, newer than this banger supports ({supported})"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        supported: usize,
    },
    #[error("Failed to apply database migration {version}")]
    Migrate {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{kind} `{name}` already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} `{name}` is used by VM(s): {users}")]
    InUse {
        kind: &'static str,
        name: String,
        users: String,
    },
    #[error("VM `{name}` is no longer in the database")]
    MissingVm { name: String },
    #[error("Corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("Database query failed")]
    Query(#[from] rusqlite::Error),
}

/// Handle to the state database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    connection: Arc<Mutex<Connection>>,
}

/// A VM lookup that may match by id prefix.
#[derive(Debug)]
pub enum VmLookup {
    Found(Box<Vm>),
    NotFound,
    Ambiguous(Vec<String>),
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode, and
    /// applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| connection.pragma_update(None, "synchronous", "NORMAL"))
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::initialise(connection, path)
    }

    /// An in-memory database, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let connection = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Self::initialise(connection, Path::new(":memory:"))
    }

    fn initialise(mut connection: Connection, path: &Path) -> Result<Self, StoreError> {
        connection
            .pragma_update(None, "foreign_keys", "ON")
            .and_then(|()| connection.busy_timeout(std::time::Duration::from_secs(5)))
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        migrate(&mut connection, path)?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (statements
        // are atomic), so a poisoned mutex is still safe to use.
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        Ok(user_version(&self.lock())?)
    }

    // ---- images ----

    pub fn insert_image(&self, image: &Image) -> Result<(), StoreError> {
        let result = self.lock().execute(
            "INSERT INTO images (id, name, path, size_bytes, digest, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                image.id,
                image.name,
                image.path,
                to_i64(image.size_bytes),
                image.digest,
                image.source,
                image.created_at
            ],
        );
        map_unique(result, "Image", &image.name)
    }

    pub fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT id, name, path, size_bytes, digest, source, created_at FROM images ORDER BY name",
        )?;
        let rows = statement.query_map([], image_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn find_image(&self, name: &str) -> Result<Option<Image>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT id, name, path, size_bytes, digest, source, created_at FROM images WHERE name = ?1",
                [name],
                image_from_row,
            )
            .optional()?)
    }

    /// Removes the image row; refused while a VM references it.
    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        let connection = self.lock();
        let users = users_of(&connection, "image_id", "images", name)?;
        if !users.is_empty() {
            return Err(StoreError::InUse {
                kind: "Image",
                name: name.to_owned(),
                users: users.join(", "),
            });
        }
        Ok(connection.execute("DELETE FROM images WHERE name = ?1", [name])? > 0)
    }

    // ---- kernels ----

    pub fn insert_kernel(&self, kernel: &Kernel) -> Result<(), StoreError> {
        let result = self.lock().execute(
            "INSERT INTO kernels (id, name, kernel_path, initrd_path, cmdline, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                kernel.id,
                kernel.name,
                kernel.kernel_path,
                kernel.initrd_path,
                kernel.cmdline,
                kernel.source,
                kernel.created_at
            ],
        );
        map_unique(result, "Kernel", &kernel.name)
    }

    pub fn list_kernels(&self) -> Result<Vec<Kernel>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT id, name, kernel_path, initrd_path, cmdline, source, created_at FROM kernels ORDER BY name",
        )?;
        let rows = statement.query_map([], kernel_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn find_kernel(&self, name: &str) -> Result<Option<Kernel>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT id, name, kernel_path, initrd_path, cmdline, source, created_at FROM kernels WHERE name = ?1",
                [name],
                kernel_from_row,
            )
            .optional()?)
    }

    /// Removes the kernel row; refused while a VM references it.
    pub fn delete_kernel(&self, name: &str) -> Result<bool, StoreError> {
        let connection = self.lock();
        let users = users_of(&connection, "kernel_id", "kernels", name)?;
        if !users.is_empty() {
            return Err(StoreError::InUse {
                kind: "Kernel",
                name: name.to_owned(),
                users: users.join(", "),
            });
        }
        Ok(connection.execute("DELETE FROM kernels WHERE name = ?1", [name])? > 0)
    }

    // ---- VMs ----

    /// Inserts a VM; `vm.image` and `vm.kernel` name registered ones. The
    /// unique name constraint is what makes concurrent creates of one name
    /// safe.
    pub fn insert_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let connection = self.lock();
        let result = connection.execute(
            "INSERT INTO vms (id, name, state, image_id, kernel_id, backend, vcpus, memory_mib,
                              disk_bytes, pid, dir, created_at, started_at, error)
             VALUES (?1, ?2, ?3,
                     (SELECT id FROM images WHERE name = ?4),
                     (SELECT id FROM kernels WHERE name = ?5),
                     ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                vm.id,
                vm.name,
                vm.state.as_str(),
                vm.image,
                vm.kernel,
                vm.backend.as_str(),
                vm.vcpus,
                vm.memory_mib,
                to_i64(vm.disk_bytes),
                vm.pid,
                vm.dir,
                vm.created_at,
                vm.started_at,
                vm.error
            ],
        );
        map_unique(result, "VM", &vm.name)
    }

    /// Writes every mutable field of `vm` (state, pid, sizes, times, error).
    /// Fails with [`StoreError::MissingVm`] if the row is gone.
    pub fn update_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let changed = self
            .lock()
            .prepare_cached(
                "UPDATE vms SET state = ?2, vcpus = ?3, memory_mib = ?4, disk_bytes = ?5, pid = ?6,
                            started_at = ?7, error = ?8
             WHERE id = ?1",
            )?
            .execute(params![
                vm.id,
                vm.state.as_str(),
                vm.vcpus,
                vm.memory_mib,
                to_i64(vm.disk_bytes),
                vm.pid,
                vm.started_at,
                vm.error
            ])?;
        if changed == 0 {
            return Err(StoreError::MissingVm {
                name: vm.name.clone(),
            });
        }
        Ok(())
    }

    pub fn get_vm(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(&format!("{VM_SELECT} WHERE vms.id = ?1"))?;
        Ok(statement.query_row([id], vm_from_row).optional()?)
    }

    /// Finds a VM by exact name, else by unique id prefix.
    pub fn lookup_vm(&self, reference: &str) -> Result<VmLookup, StoreError> {
        let connection = self.lock();
        let mut by_name = connection.prepare(&format!("{VM_SELECT} WHERE vms.name = ?1"))?;
        if let Some(vm) = by_name.query_row([reference], vm_from_row).optional()? {
            return Ok(VmLookup::Found(Box::new(vm)));
        }
        if reference.is_empty() || !reference.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Ok(VmLookup::NotFound);
        }
        let mut by_prefix = connection.prepare(&format!(
            "{VM_SELECT} WHERE vms.id LIKE ?1 || '%' ORDER BY vms.name"
        ))?;
        let mut matches: Vec<Vm> = by_prefix
            .query_map([reference.to_ascii_lowercase()], vm_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(match matches.len() {
            0 => VmLookup::NotFound,
            1 => VmLookup::Found(Box::new(matches.remove(0))),
            _ => VmLookup::Ambiguous(matches.into_iter().map(|vm| vm.name).collect()),
        })
    }

    pub fn list_vms(&self) -> Result<Vec<Vm>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare(&format!("{VM_SELECT} ORDER BY vms.created_at, vms.name"))?;
        let rows = statement.query_map([], vm_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_vm(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().execute("DELETE FROM vms WHERE id = ?1", [id])? > 0)
    }

    // ---- network leases ----

    /// Leases an address and a tap to `vm_id` atomically: `choose` sees
    /// every address and tap leased now and picks free ones (and the MAC).
    /// The unique constraints back the choice up.
    pub fn insert_lease(
        &self,
        vm_id: &str,
        choose: impl FnOnce(&[String], &[String]) -> Result<(String, String, String), String>,
    ) -> Result<Result<VmNetwork, String>, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let (ips, taps): (Vec<String>, Vec<String>) = {
            let mut statement = transaction.prepare("SELECT ip, tap FROM leases")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<Result<Vec<(String, String)>, _>>()?
                .into_iter()
                .unzip()
        };
        let (ip, tap, mac) = match choose(&ips, &taps) {
            Ok(choice) => choice,
            Err(refusal) => return Ok(Err(refusal)),
        };
        transaction.execute(
            "INSERT INTO leases (vm_id, ip, tap, mac) VALUES (?1, ?2, ?3, ?4)",
            params![vm_id, ip, tap, mac],
        )?;
        transaction.commit()?;
        Ok(Ok(VmNetwork {
            ip,
            mac,
            tap,
            dns_name: String::new(),
            ..VmNetwork::default()
        }))
    }

    pub fn delete_lease(&self, vm_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .execute("DELETE FROM leases WHERE vm_id = ?1", [vm_id])?
            > 0)
    }

    /// Every lease as (VM id, VM name, network).
    pub fn list_leases(&self) -> Result<Vec<(String, String, VmNetwork)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT leases.vm_id, vms.name, leases.ip, leases.mac, leases.tap
             FROM leases JOIN vms ON vms.id = leases.vm_id ORDER BY leases.ip",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                VmNetwork {
                    ip: row.get(2)?,
                    mac: row.get(3)?,
                    tap: row.get(4)?,
                    dns_name: String::new(),
                    ..VmNetwork::default()
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- work disks ----

    /// Registers a work disk (made by its VM's create when `vm_id` is set);
    /// a taken name or a VM that already has one is refused by the unique
    /// constraints (`StoreError::Query`).
    pub fn insert_work_disk(&self, disk: &WorkDisk) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO work_disks (id, name, path, size_bytes, vm_id, created_at, made_by_create)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                disk.id,
                disk.name,
                disk.path,
                to_i64(disk.size_bytes),
                disk.vm_id,
                disk.created_at,
                disk.vm_id.is_some()
            ],
        )?;
        Ok(())
    }

    /// Whether the create of the VM the disk is attached to made it.
    pub fn work_disk_made_by_create(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT made_by_create FROM work_disks WHERE id = ?1",
                [id],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    pub fn list_work_disks(&self) -> Result<Vec<WorkDisk>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare(&format!("{WORK_DISK_SELECT} ORDER BY work_disks.name"))?;
        let rows = statement.query_map([], work_disk_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn find_work_disk(&self, name: &str) -> Result<Option<WorkDisk>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare(&format!("{WORK_DISK_SELECT} WHERE work_disks.name = ?1"))?;
        Ok(statement.query_row([name], work_disk_from_row).optional()?)
    }

    pub fn work_disk_of_vm(&self, vm_id: &str) -> Result<Option<WorkDisk>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare(&format!("{WORK_DISK_SELECT} WHERE work_disks.vm_id = ?1"))?;
        Ok(statement
            .query_row([vm_id], work_disk_from_row)
            .optional()?)
    }

    /// Attaches the disk to `vm_id`, or detaches it with `None`. Attaching
    /// only succeeds while the disk is detached: false otherwise.
    pub fn set_work_disk_vm(&self, id: &str, vm_id: Option<&str>) -> Result<bool, StoreError> {
        let changed = match vm_id {
            Some(vm_id) => self.lock().execute(
                "UPDATE work_disks SET vm_id = ?2 WHERE id = ?1 AND vm_id IS NULL",
                params![id, vm_id],
            )?,
            None => self.lock().execute(
                "UPDATE work_disks SET vm_id = NULL, made_by_create = 0 WHERE id = ?1",
                [id],
            )?,
        };
        Ok(changed > 0)
    }

    pub fn set_work_disk_size(&self, id: &str, size_bytes: u64) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE work_disks SET size_bytes = ?2 WHERE id = ?1",
            params![id, to_i64(size_bytes)],
        )?;
        Ok(())
    }

    /// Deletes the disk's row only while no VM has it; false otherwise.
    pub fn delete_detached_work_disk(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().execute(
            "DELETE FROM work_disks WHERE id = ?1 AND vm_id IS NULL",
            [id],
        )? > 0)
    }

    pub fn delete_work_disk(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .execute("DELETE FROM work_disks WHERE id = ?1", [id])?
            > 0)
    }

    // ---- operations ----

    /// Inserts or replaces the operation's row (operations are written at
    /// start, at each stage, and at the end).
    pub fn save_operation(&self, operation: &Operation) -> Result<(), StoreError> {
        let stages =
            serde_json::to_string(&operation.stages).map_err(|error| StoreError::Corrupt {
                table: "operations",
                detail: error.to_string(),
            })?;
        // Cached: every stage event of every operation runs it.
        self.lock().prepare_cached(
            "INSERT INTO operations (id, kind, vm_id, vm_name, state, stages, error, created_at, finished_at, subject)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, stages = excluded.stages,
                 error = excluded.error, finished_at = excluded.finished_at",
        )?
        .execute(
            params![
                operation.id,
                operation.kind,
                operation.vm_id,
                operation.vm_name,
                operation.state.as_str(),
                stages,
                operation.error,
                operation.created_at,
                operation.finished_at,
                operation.subject
            ],
        )?;
        Ok(())
    }

    pub fn get_operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(&format!("{OPERATION_SELECT} WHERE id = ?1"))?;
        let row = statement.query_row([id], operation_columns).optional()?;
        row.map(operation_from_columns).transpose()
    }

    /// All operations, newest first.
    /// Newest first; operations of the same second in the order they began
    /// (an update keeps its row).
    pub fn list_operations(&self) -> Result<Vec<Operation>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(&format!(
            "{OPERATION_SELECT} ORDER BY created_at DESC, rowid DESC"
        ))?;
        let rows: Vec<OperationColumns> = statement
            .query_map([], operation_columns)?
            .collect::<Result<_, _>>()?;
        rows.into_iter().map(operation_from_columns).collect()
    }

    // ---- snapshots ----

    /// Registers a snapshot; a taken name is `AlreadyExists`.
    pub fn insert_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let result = self.lock().execute(
            "INSERT INTO snapshots (id, name, source_vm_id, source_vm, image, kernel, backend,
                backend_version, vcpus, memory_mib, disk_bytes, has_work_disk, size_bytes, dir,
                created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                snapshot.id,
                snapshot.name,
                snapshot.source_vm_id,
                snapshot.source_vm,
                snapshot.image,
                snapshot.kernel,
                snapshot.backend.as_str(),
                snapshot.backend_version,
                snapshot.vcpus,
                snapshot.memory_mib,
                to_i64(snapshot.disk_bytes),
                snapshot.has_work_disk,
                to_i64(snapshot.size_bytes),
                snapshot.dir,
                snapshot.created_at,
            ],
        );
        map_unique(result, "Snapshot", &snapshot.name)
    }

    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(&format!("{SNAPSHOT_SELECT} ORDER BY name"))?;
        let rows = statement.query_map([], snapshot_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn find_snapshot(&self, name: &str) -> Result<Option<Snapshot>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(&format!("{SNAPSHOT_SELECT} WHERE name = ?1"))?;
        Ok(statement.query_row([name], snapshot_from_row).optional()?)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?
            > 0)
    }
}

const SNAPSHOT_SELECT: &str =
    "SELECT id, name, source_vm_id, source_vm, image, kernel, backend, backend_version, vcpus,
        memory_mib, disk_bytes, has_work_disk, size_bytes, dir, created_at FROM snapshots";

const VM_SELECT: &str =
    "SELECT vms.id, vms.name, vms.state, images.name, kernels.name, vms.backend,
        vms.vcpus, vms.memory_mib, vms.disk_bytes, vms.pid, vms.created_at, vms.started_at,
        vms.error, vms.dir, leases.ip, leases.mac, leases.tap, work_disks.name
    FROM vms JOIN images ON images.id = vms.image_id JOIN kernels ON kernels.id = vms.kernel_id
    LEFT JOIN leases ON leases.vm_id = vms.id
    LEFT JOIN work_disks ON work_disks.vm_id = vms.id";

const WORK_DISK_SELECT: &str =
    "SELECT work_disks.id, work_disks.name, work_disks.path, work_disks.size_bytes,
        work_disks.vm_id, vms.name, work_disks.created_at
    FROM work_disks LEFT JOIN vms ON vms.id = work_disks.vm_id";

const OPERATION_SELECT: &str =
    "SELECT id, kind, vm_id, vm_name, state, stages, error, created_at, finished_at, subject FROM operations";

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let current = user_version(connection).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: current,
            supported: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = index + 1;
        let apply = |connection: &mut Connection| -> rusqlite::Result<()> {
            let transaction = connection.transaction()?;
            transaction.execute_batch(sql)?;
            transaction.pragma_update(None, "user_version", version)?;
            transaction.commit()
        };
        apply(connection).map_err(|source| StoreError::Migrate { version, source })?;
    }
    Ok(())
}

fn user_version(connection: &Connection) -> rusqlite::Result<usize> {
    connection.query_row("PRAGMA user_version", [], |row| row.get(0))
}

fn users_of(
    connection: &Connection,
    column: &str,
    table: &str,
    name: &str,
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare(&format!(
        "SELECT vms.name FROM vms JOIN {table} ON {table}.id = vms.{column} WHERE {table}.name = ?1 ORDER BY vms.name"
    ))?;
    let rows = statement.query_map([name], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn map_unique(
    result: rusqlite::Result<usize>,
    kind: &'static str,
    name: &str,
) -> Result<(), StoreError> {
    match result {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(error, Some(message)))
            if error.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                && message.ends_with(".name") =>
        {
            Err(StoreError::AlreadyExists {
                kind,
                name: name.to_owned(),
            })
        }
        Err(error) => Err(error.into()),
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn get_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    Ok(u64::try_from(value).unwrap_or(0))
}

fn image_from_row(row: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        id: row.get(0)?,
        name: row.get(1)?,
        path: row.get(2)?,
        size_bytes: get_u64(row, 3)?,
        digest: row.get(4)?,
        source: row.get(5)?,
        created_at: row.get(6)?,
    })
}

fn kernel_from_row(row: &Row<'_>) -> rusqlite::Result<Kernel> {
    Ok(Kernel {
        id: row.get(0)?,
        name: row.get(1)?,
        kernel_path: row.get(2)?,
        initrd_path: row.get(3)?,
        cmdline: row.get(4)?,
        source: row.get(5)?,
        created_at: row.get(6)?,
    })
}

fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<Vm> {
    let state: String = row.get(2)?;
    let state = VmState::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            2,
            rusqlite::types::Type::Text,
            format!("unknown VM state `{state}`").into(),
        )
    })?;
    // An unknown backend is a corrupt row, never a silent default.
    let backend: String = row.get(5)?;
    let backend: Backend = backend.parse().map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(error))
    })?;
    Ok(Vm {
        id: row.get(0)?,
        name: row.get(1)?,
        state,
        image: row.get(3)?,
        kernel: row.get(4)?,
        backend,
        vcpus: row.get(6)?,
        memory_mib: row.get(7)?,
        disk_bytes: get_u64(row, 8)?,
        pid: row.get(9)?,
        created_at: row.get(10)?,
        started_at: row.get(11)?,
        error: row.get(12)?,
        dir: row.get(13)?,
        network: match (
            row.get::<_, Option<String>>(14)?,
            row.get::<_, Option<String>>(15)?,
            row.get::<_, Option<String>>(16)?,
        ) {
            (Some(ip), Some(mac), Some(tap)) => Some(VmNetwork {
                ip,
                mac,
                tap,
                dns_name: String::new(),
                ..VmNetwork::default()
            }),
            _ => None,
        },
        work_disk: row.get(17)?,
    })
}

fn snapshot_from_row(row: &Row<'_>) -> rusqlite::Result<Snapshot> {
    let backend: String = row.get(6)?;
    let backend: Backend = backend.parse().map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(error))
    })?;
    Ok(Snapshot {
        id: row.get(0)?,
        name: row.get(1)?,
        source_vm_id: row.get(2)?,
        source_vm: row.get(3)?,
        image: row.get(4)?,
        kernel: row.get(5)?,
        backend,
        backend_version: row.get(7)?,
        vcpus: row.get(8)?,
        memory_mib: row.get(9)?,
        disk_bytes: get_u64(row, 10)?,
        has_work_disk: row.get(11)?,
        size_bytes: get_u64(row, 12)?,
        dir: row.get(13)?,
        created_at: row.get(14)?,
    })
}

fn work_disk_from_row(row: &Row<'_>) -> rusqlite::Result<WorkDisk> {
    Ok(WorkDisk {
        id: row.get(0)?,
        name: row.get(1)?,
        path: row.get(2)?,
        size_bytes: get_u64(row, 3)?,
        vm_id: row.get(4)?,
        vm: row.get(5)?,
        created_at: row.get(6)?,
    })
}

type OperationColumns = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
);

fn operation_columns(row: &Row<'_>) -> rusqlite::Result<OperationColumns> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
    ))
}

fn operation_from_columns(columns: OperationColumns) -> Result<Operation, StoreError> {
    let (id, kind, vm_id, vm_name, state, stages, error, created_at, finished_at, subject) =
        columns;
    let state = OperationState::parse(&state).ok_or_else(|| StoreError::Corrupt {
        table: "operations",
        detail: format!("unknown state `{state}` of operation {id}"),
    })?;
    let stages: Vec<StageEvent> =
        serde_json::from_str(&stages).map_err(|parse| StoreError::Corrupt {
            table: "operations",
            detail: format!("stages of operation {id}: {parse}"),
        })?;
    Ok(Operation {
        id,
        kind,
        vm_id,
        vm_name,
        subject,
        state,
        stages,
        error,
        created_at,
        finished_at,
    })
}

#[cfg(test)]
mod tests;
