//! Embedded schema migrations, applied in order and recorded in SQLite's
//! `user_version`. A migration is never edited once released; changes are
//! new entries at the end.

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: images, kernels, VMs, operations.
    "CREATE TABLE images (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        digest TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE kernels (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kernel_path TEXT NOT NULL,
        initrd_path TEXT,
        cmdline TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE RESTRICT,
        kernel_id TEXT NOT NULL REFERENCES kernels(id) ON DELETE RESTRICT,
        backend TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL,
        pid INTEGER,
        dir TEXT NOT NULL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        error TEXT
    );
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        vm_id TEXT NOT NULL,
        vm_name TEXT NOT NULL,
        state TEXT NOT NULL,
        stages TEXT NOT NULL,
        error TEXT,
        created_at TEXT NOT NULL,
        finished_at TEXT
    );",
    // 2: what an operation acts on, for people (image and kernel pulls have no VM).
    "ALTER TABLE operations ADD COLUMN subject TEXT NOT NULL DEFAULT '';",
    // 3: network leases: one address and tap per VM, never shared.
    "CREATE TABLE leases (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        ip TEXT NOT NULL UNIQUE,
        tap TEXT NOT NULL UNIQUE,
        mac TEXT NOT NULL
    );",
    // 4: work disks; one per VM at most, detached (vm_id NULL) when kept.
    "CREATE TABLE work_disks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        vm_id TEXT UNIQUE REFERENCES vms(id) ON DELETE SET NULL,
        created_at TEXT NOT NULL
    );",
    // 5: whether the attached VM's create made the disk (so reconciling an
    // interrupted create deletes it, and keeps a disk it only attached).
    "ALTER TABLE work_disks ADD COLUMN made_by_create INTEGER NOT NULL DEFAULT 0;",
    // 6: published ports (host address and port to guest port) and each
    // VM's egress policy and network group.
    "CREATE TABLE published_ports (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        host_ip TEXT NOT NULL,
        host_port INTEGER NOT NULL,
        guest_port INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        UNIQUE (protocol, host_ip, host_port)
    );
    CREATE TABLE network_policies (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        egress TEXT NOT NULL,
        network_group TEXT
    );",
    // 7: VM snapshots. Not tied to the source VM's row (a snapshot
    // survives its deletion); image and kernel are kept by name.
    "CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        source_vm_id TEXT NOT NULL,
        source_vm TEXT NOT NULL,
        image TEXT NOT NULL,
        kernel TEXT NOT NULL,
        backend TEXT NOT NULL,
        backend_version TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL,
        has_work_disk INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        dir TEXT NOT NULL,
        created_at TEXT NOT NULL
    );",
];
