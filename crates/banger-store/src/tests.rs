use super::*;
use banger_proto::StageStatus;

fn image(name: &str) -> Image {
    Image {
        id: format!("img-{name}"),
        name: name.to_owned(),
        path: format!("/state/images/{name}.ext4"),
        size_bytes: 1 << 30,
        digest: "sha256:00".to_owned(),
        source: "/tmp/x.ext4".to_owned(),
        created_at: "2026-01-01T00:00:00Z".to_owned(),
    }
}

fn kernel(name: &str) -> Kernel {
    Kernel {
        id: format!("krn-{name}"),
        name: name.to_owned(),
        kernel_path: "/state/kernels/vmlinux".to_owned(),
        initrd_path: None,
        cmdline: "console=ttyS0".to_owned(),
        source: "/tmp/vmlinux".to_owned(),
        created_at: "2026-01-01T00:00:00Z".to_owned(),
    }
}

fn vm(id: &str, name: &str) -> Vm {
    Vm {
        id: id.to_owned(),
        name: name.to_owned(),
        state: VmState::Creating,
        image: "debian".to_owned(),
        kernel: "default".to_owned(),
        backend: Backend::Firecracker,
        vcpus: 2,
        memory_mib: 1024,
        disk_bytes: 1 << 30,
        pid: None,
        created_at: "2026-01-01T00:00:00Z".to_owned(),
        started_at: None,
        error: None,
        dir: format!("/state/vms/{id}"),
        network: None,
        work_disk: None,
    }
}

fn seeded() -> Store {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("debian")).unwrap();
    store.insert_kernel(&kernel("default")).unwrap();
    store
}

#[test]
fn migrations_apply_once_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
        store.insert_image(&image("debian")).unwrap();
        store.insert_kernel(&kernel("default")).unwrap();
        store.insert_vm(&vm("abc123", "dev")).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    assert_eq!(store.list_vms().unwrap().len(), 1);
    assert_eq!(store.list_images().unwrap()[0].name, "debian");
    let mode: String = store
        .lock()
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let connection = Connection::open(&path).unwrap();
        connection
            .pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
    }
    let error = Store::open(&path).err().unwrap();
    assert!(matches!(error, StoreError::TooNew { .. }), "{error}");
}

#[test]
fn duplicate_names_are_refused() {
    let store = seeded();
    assert!(matches!(
        store.insert_image(&Image {
            id: "other".into(),
            ..image("debian")
        }),
        Err(StoreError::AlreadyExists { kind: "Image", .. })
    ));
    store.insert_vm(&vm("aaa111", "dev")).unwrap();
    let error = store.insert_vm(&vm("bbb222", "dev")).unwrap_err();
    assert_eq!(error.to_string(), "VM `dev` already exists");
}

#[test]
fn vm_needs_registered_image_and_kernel() {
    let store = seeded();
    let mut orphan = vm("ccc333", "orphan");
    orphan.image = "missing".into();
    assert!(matches!(
        store.insert_vm(&orphan),
        Err(StoreError::Query(_))
    ));
    assert!(store.list_vms().unwrap().is_empty());
}

#[test]
fn images_and_kernels_in_use_cannot_be_removed() {
    let store = seeded();
    store.insert_vm(&vm("aaa111", "dev")).unwrap();
    let error = store.delete_image("debian").unwrap_err();
    assert_eq!(error.to_string(), "Image `debian` is used by VM(s): dev");
    assert!(matches!(
        store.delete_kernel("default"),
        Err(StoreError::InUse { .. })
    ));
    assert!(store.delete_vm("aaa111").unwrap());
    assert!(store.delete_image("debian").unwrap());
    assert!(store.delete_kernel("default").unwrap());
    assert!(!store.delete_image("debian").unwrap());
}

#[test]
fn lookup_by_name_then_unique_prefix() {
    let store = seeded();
    store.insert_vm(&vm("abc111", "one")).unwrap();
    store.insert_vm(&vm("abd222", "two")).unwrap();
    assert!(
        matches!(store.lookup_vm("one").unwrap(), VmLookup::Found(found) if found.id == "abc111")
    );
    assert!(
        matches!(store.lookup_vm("abd").unwrap(), VmLookup::Found(found) if found.name == "two")
    );
    assert!(
        matches!(store.lookup_vm("ab").unwrap(), VmLookup::Ambiguous(names) if names == ["one", "two"])
    );
    assert!(matches!(
        store.lookup_vm("ffff").unwrap(),
        VmLookup::NotFound
    ));
    assert!(matches!(store.lookup_vm("%").unwrap(), VmLookup::NotFound));
}

#[test]
fn update_vm_writes_state_and_pid() {
    let store = seeded();
    let mut record = vm("abc111", "one");
    store.insert_vm(&record).unwrap();
    record.state = VmState::Running;
    record.pid = Some(4242);
    record.vcpus = 4;
    record.error = Some("x".into());
    store.update_vm(&record).unwrap();
    assert_eq!(store.get_vm("abc111").unwrap().unwrap(), record);
}

#[test]
fn operations_round_trip() {
    let store = seeded();
    let mut operation = Operation {
        id: "op1".into(),
        kind: "vm.create".into(),
        vm_id: "abc111".into(),
        vm_name: "one".into(),
        subject: "vm one".into(),
        state: OperationState::Running,
        stages: vec![],
        error: None,
        created_at: "2026-01-01T00:00:00Z".into(),
        finished_at: None,
    };
    store.save_operation(&operation).unwrap();
    operation.stages.push(StageEvent {
        operation_id: "op1".into(),
        stage: "clone root disk".into(),
        status: StageStatus::Finished,
        elapsed_ms: 5,
        elapsed_us: Some(5_250),
        message: None,
        bytes: None,
        total: None,
    });
    operation.state = OperationState::Failed;
    operation.error = Some("boom".into());
    operation.finished_at = Some("2026-01-01T00:00:01Z".into());
    store.save_operation(&operation).unwrap();
    assert_eq!(store.get_operation("op1").unwrap().unwrap(), operation);
    assert_eq!(store.list_operations().unwrap(), vec![operation]);
    assert!(store.get_operation("nope").unwrap().is_none());
}

#[test]
fn operations_of_one_second_list_newest_first() {
    let store = Store::open_in_memory().unwrap();
    // Ids in the opposite order to their start.
    for id in ["op9", "op5", "op1"] {
        store
            .save_operation(&Operation {
                id: id.into(),
                kind: "image.import".into(),
                vm_id: String::new(),
                vm_name: String::new(),
                subject: format!("image {id}"),
                state: OperationState::Running,
                stages: vec![],
                error: None,
                created_at: "2026-01-01T00:00:00Z".into(),
                finished_at: None,
            })
            .unwrap();
    }
    // An update keeps an operation's place.
    let mut first = store.get_operation("op9").unwrap().unwrap();
    first.state = OperationState::Succeeded;
    store.save_operation(&first).unwrap();
    let ids: Vec<String> = store
        .list_operations()
        .unwrap()
        .into_iter()
        .map(|operation| operation.id)
        .collect();
    assert_eq!(ids, ["op1", "op5", "op9"]);
}

#[test]
fn backends_round_trip_and_an_unknown_one_is_an_error() {
    let store = seeded();
    let mut record = vm("q1", "on-qemu");
    record.backend = Backend::Qemu;
    store.insert_vm(&record).unwrap();
    assert_eq!(store.list_vms().unwrap()[0].backend, Backend::Qemu);
    store
        .lock()
        .execute("UPDATE vms SET backend = 'xen' WHERE id = 'q1'", [])
        .unwrap();
    let error = store.list_vms().unwrap_err();
    assert!(matches!(error, StoreError::Query(_)), "{error:?}");
    let message = banger_proto::error_chain(&error);
    assert!(message.contains("Unknown backend `xen`"), "{message}");
}

#[test]
fn update_of_a_deleted_vm_fails() {
    let store = seeded();
    let record = vm("abc111", "one");
    store.insert_vm(&record).unwrap();
    store.delete_vm("abc111").unwrap();
    assert!(matches!(
        store.update_vm(&record),
        Err(StoreError::MissingVm { .. })
    ));
}

#[test]
fn leases_are_unique_and_go_with_their_vm() {
    let store = seeded();
    store.insert_vm(&vm("aaa111", "one")).unwrap();
    store.insert_vm(&vm("bbb222", "two")).unwrap();
    let first = store
        .insert_lease("aaa111", |ips, taps| {
            assert!(ips.is_empty() && taps.is_empty());
            Ok((
                "172.30.0.2".into(),
                "bgtap0".into(),
                "06:00:00:00:00:01".into(),
            ))
        })
        .unwrap()
        .unwrap();
    assert_eq!(first.ip, "172.30.0.2");
    // The chooser sees what is taken; a duplicate is refused by the schema.
    let taken = store.insert_lease("bbb222", |ips, taps| {
        assert_eq!(ips, ["172.30.0.2"]);
        assert_eq!(taps, ["bgtap0"]);
        Ok(("172.30.0.2".into(), "bgtap1".into(), "m".into()))
    });
    assert!(taken.is_err());
    assert_eq!(
        store
            .insert_lease("bbb222", |_, _| Err("full".into()))
            .unwrap(),
        Err("full".to_owned())
    );
    assert_eq!(
        store
            .get_vm("aaa111")
            .unwrap()
            .unwrap()
            .network
            .unwrap()
            .tap,
        "bgtap0"
    );
    assert_eq!(store.list_leases().unwrap().len(), 1);
    store.delete_vm("aaa111").unwrap();
    assert!(store.list_leases().unwrap().is_empty());
}

fn work_disk(id: &str, name: &str, vm_id: Option<&str>) -> WorkDisk {
    WorkDisk {
        id: id.to_owned(),
        name: name.to_owned(),
        path: format!("/state/disks/{id}.ext4"),
        size_bytes: 1 << 30,
        vm_id: vm_id.map(str::to_owned),
        vm: None,
        created_at: "2026-01-01T00:00:00Z".to_owned(),
    }
}

#[test]
fn work_disks_attach_to_one_vm_and_survive_it_detached() {
    let store = seeded();
    store.insert_vm(&vm("v1", "one")).unwrap();
    store.insert_vm(&vm("v2", "two")).unwrap();
    store
        .insert_work_disk(&work_disk("d1", "one-work", Some("v1")))
        .unwrap();
    // One disk per VM, one name per disk.
    assert!(store
        .insert_work_disk(&work_disk("d2", "second", Some("v1")))
        .is_err());
    assert!(store
        .insert_work_disk(&work_disk("d3", "one-work", None))
        .is_err());
    assert_eq!(
        store.get_vm("v1").unwrap().unwrap().work_disk.as_deref(),
        Some("one-work")
    );
    let found = store.find_work_disk("one-work").unwrap().unwrap();
    assert_eq!(found.vm.as_deref(), Some("one"));
    assert_eq!(store.work_disk_of_vm("v1").unwrap().unwrap().id, "d1");
    // An attached disk cannot be attached elsewhere.
    assert!(!store.set_work_disk_vm("d1", Some("v2")).unwrap());
    assert!(store.work_disk_made_by_create("d1").unwrap());
    // Detaching forgets who made it: a later attach is only an attach.
    assert!(store.set_work_disk_vm("d1", None).unwrap());
    assert!(!store.work_disk_made_by_create("d1").unwrap());
    assert!(store.set_work_disk_vm("d1", Some("v1")).unwrap());
    assert!(!store.work_disk_made_by_create("d1").unwrap());
    // The VM goes, the disk stays, detached.
    store.delete_vm("v1").unwrap();
    let kept = store.find_work_disk("one-work").unwrap().unwrap();
    assert_eq!(kept.vm_id, None);
    assert!(store.set_work_disk_vm("d1", Some("v2")).unwrap());
    // An attached disk's row is not removed by the detached-only delete.
    assert!(!store.delete_detached_work_disk("d1").unwrap());
    store.set_work_disk_size("d1", 2 << 30).unwrap();
    assert_eq!(store.list_work_disks().unwrap()[0].size_bytes, 2 << 30);
    assert!(store.delete_work_disk("d1").unwrap());
    assert!(store.get_vm("v2").unwrap().unwrap().work_disk.is_none());
}

fn snapshot(id: &str, name: &str, source_vm_id: &str) -> Snapshot {
    Snapshot {
        id: id.into(),
        name: name.into(),
        source_vm_id: source_vm_id.into(),
        source_vm: "web".into(),
        image: "debian".into(),
        kernel: "k".into(),
        backend: Backend::Firecracker,
        backend_version: "1.17.0".into(),
        vcpus: 2,
        memory_mib: 512,
        disk_bytes: 1 << 30,
        has_work_disk: true,
        size_bytes: 600 << 20,
        dir: format!("/var/lib/banger/snapshots/{id}"),
        created_at: "2026-01-01T00:00:00Z".into(),
    }
}

#[test]
fn snapshots_round_trip_survive_their_vm_and_have_unique_names() {
    let store = seeded();
    store.insert_vm(&vm("v1", "web")).unwrap();
    let first = snapshot("s1", "web-1", "v1");
    store.insert_snapshot(&first).unwrap();
    let error = store
        .insert_snapshot(&snapshot("s2", "web-1", "v1"))
        .unwrap_err();
    assert_eq!(error.to_string(), "Snapshot `web-1` already exists");
    store
        .insert_snapshot(&snapshot("s3", "a-first", "v1"))
        .unwrap();
    assert!(store.delete_vm("v1").unwrap());
    assert_eq!(store.find_snapshot("web-1").unwrap(), Some(first));
    let names: Vec<_> = store
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|snapshot| snapshot.name)
        .collect();
    assert_eq!(names, ["a-first", "web-1"]);
    assert!(store.delete_snapshot("s1").unwrap());
    assert!(!store.delete_snapshot("s1").unwrap());
    assert_eq!(store.find_snapshot("web-1").unwrap(), None);
}
