//! The create steps and the capability hooks, with recording capabilities
//! and a fake VMM whose "VMM process" is a real `sleep`: what runs, in what
//! order, and what is undone when each step fails.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use banger_proto::{Backend, CreateVmParams, Image, Kernel, OperationState, VmState};
use banger_store::Store;
use banger_vmm::process::ProcessHandle;
use banger_vmm::{AgentEndpoint, LaunchSpec, StopOutcome, Vmm, VmmError, VmmHandle, VsockSpec};

use super::{AgentWait, GuestStage, VmService, VmServiceParts};
use crate::agents::Agents;
use crate::backends::Backends;
use crate::capabilities::recording::{Journal, RecordingCapability};
use crate::capabilities::{Capabilities, Capability};
use crate::catalog::CatalogService;
use crate::config::Config;
use crate::error::DaemonResult;
use crate::images::ImageService;
use crate::operations::LiveOperation;
use crate::operations::OperationRegistry;
use crate::paths::StatePaths;

/// A VMM whose process is `sleep`; records its calls in the journal and
/// fails the call it is told to.
struct FakeVmm {
    journal: Journal,
    fail: Mutex<Option<&'static str>>,
    launched: Mutex<Option<LaunchSpec>>,
}

impl FakeVmm {
    fn call(&self, name: &'static str) -> Result<(), VmmError> {
        self.journal.push(format!("vmm.{name}"));
        let fail = *self
            .fail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fail == Some(name) {
            return Err(VmmError::PrepareRuntimeFile {
                vm_name: "fake".to_owned(),
                path: format!("/{name}").into(),
                source: std::io::Error::other(format!("{name} fails")),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn backend(&self) -> Backend {
        Backend::Firecracker
    }

    async fn spawn(&self, spec: &LaunchSpec) -> Result<VmmHandle, VmmError> {
        self.call("spawn")?;
        *self
            .launched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(spec.clone());
        let process: ProcessHandle = banger_vmm::process::spawn(
            Path::new("/bin/sleep"),
            ["600"],
            &spec.runtime_dir.join(banger_vmm::CONSOLE_LOG_FILE),
        )
        .map_err(|source| VmmError::SpawnProcess {
            backend: Backend::Firecracker,
            vm_name: spec.vm_name.clone(),
            source,
        })?;
        Ok(VmmHandle::new(
            Backend::Firecracker,
            spec.vm_id.clone(),
            spec.runtime_dir.clone(),
            spec.runtime_dir.join("fake.sock"),
            process,
        ))
    }

    async fn boot(&self, _handle: &VmmHandle) -> Result<(), VmmError> {
        self.call("boot")
    }

    async fn stop(&self, handle: &VmmHandle, _grace: Duration) -> Result<StopOutcome, VmmError> {
        self.kill(handle).await?;
        Ok(StopOutcome::Killed {
            status: handle.wait_exit().await,
        })
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.journal.push("vmm.kill".to_owned());
        let _ = handle.process().kill().await;
        Ok(())
    }

    fn release(&self, _runtime_dir: &Path) {}

    fn agent_endpoint(&self, runtime_dir: &Path) -> (AgentEndpoint, Option<VsockSpec>) {
        (AgentEndpoint::Unix(runtime_dir.join("agent.sock")), None)
    }

    async fn adopt(
        &self,
        _vm_id: &str,
        _runtime_dir: &Path,
        _pid: u32,
    ) -> Result<Option<VmmHandle>, VmmError> {
        Ok(None)
    }
}

/// A guest stage that records its calls (and never needs the agent).
struct RecordingGuestStage {
    journal: Journal,
}

#[async_trait]
impl GuestStage for RecordingGuestStage {
    fn bind(&mut self, _operation_id: &str) {
        self.journal.push("guest.bind".to_owned());
    }

    async fn run(
        self: Box<Self>,
        _operation: &LiveOperation,
        vm: &banger_proto::Vm,
        _agent: AgentWait<'_>,
    ) -> DaemonResult<()> {
        self.journal.push(format!("guest.run {}", vm.state));
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    paths: StatePaths,
    journal: Journal,
    first: Arc<RecordingCapability>,
    second: Arc<RecordingCapability>,
    vmm: Arc<FakeVmm>,
    vms: Arc<VmService>,
    operations: Arc<OperationRegistry>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = StatePaths::new(dir.path());
    paths.create().unwrap();
    let store = Store::open(&paths.database()).unwrap();
    let image_path = dir.path().join("image.ext4");
    std::fs::write(&image_path, vec![0_u8; 4096]).unwrap();
    let kernel_path = dir.path().join("vmlinux");
    std::fs::write(&kernel_path, b"kernel").unwrap();
    store
        .insert_image(&Image {
            id: "image-id".to_owned(),
            name: "image".to_owned(),
            path: image_path.display().to_string(),
            size_bytes: 4096,
            digest: "sha256:0".to_owned(),
            source: "test".to_owned(),
            created_at: "2026-01-01T00:00:00Z".to_owned(),
        })
        .unwrap();
    store
        .insert_kernel(&Kernel {
            id: "kernel-id".to_owned(),
            name: "kernel".to_owned(),
            kernel_path: kernel_path.display().to_string(),
            initrd_path: None,
            cmdline: "console=ttyS0".to_owned(),
            source: "test".to_owned(),
            created_at: "2026-01-01T00:00:00Z".to_owned(),
        })
        .unwrap();
    let config = Arc::new(Config::default());
    let journal = Journal::default();
    let first = Arc::new(RecordingCapability::new("first", &journal));
    let mut second = RecordingCapability::new("second", &journal);
    second.after_boot_stage = Some("second ready");
    let second = Arc::new(second);
    let vmm = Arc::new(FakeVmm {
        journal: journal.clone(),
        fail: Mutex::new(None),
        launched: Mutex::new(None),
    });
    let operations = Arc::new(OperationRegistry::new(store.clone()));
    let images = ImageService::new(store.clone(), paths.clone(), false);
    let catalog = Arc::new(
        CatalogService::new(
            &config.catalog,
            paths.clone(),
            images.clone(),
            Arc::clone(&operations),
        )
        .unwrap(),
    );
    let capabilities: Capabilities = vec![
        Arc::clone(&first) as Arc<dyn Capability>,
        Arc::clone(&second) as Arc<dyn Capability>,
    ];
    let vms = VmService::new(VmServiceParts {
        store,
        paths: paths.clone(),
        config,
        images,
        backends: Arc::new(Backends::with_firecracker(Arc::clone(&vmm) as Arc<dyn Vmm>)),
        clone: Arc::new(banger_disk::clone::Copy),
        catalog,
        operations: Arc::clone(&operations),
        capabilities,
        agents: Arc::new(Agents::default()),
    });
    Fixture {
        _dir: dir,
        paths,
        journal,
        first,
        second,
        vmm,
        vms,
        operations,
    }
}

impl Fixture {
    /// Creates VM `name` and waits for the operation to end.
    async fn create(&self, name: &str) -> banger_proto::Operation {
        self.create_with(name, None).await
    }

    async fn create_with(
        &self,
        name: &str,
        guest_stage: Option<Box<dyn GuestStage>>,
    ) -> banger_proto::Operation {
        let started = self
            .vms
            .create(
                CreateVmParams {
                    name: name.to_owned(),
                    image: Some("image".to_owned()),
                    kernel: Some("kernel".to_owned()),
                    vcpus: None,
                    memory_mib: None,
                    no_start: false,
                    backend: None,
                    work_disk: None,
                    workspace: None,
                    ports: Vec::new(),
                    egress: None,
                    network_group: None,
                    from_snapshot: None,
                    regen_host_keys: false,
                },
                guest_stage,
            )
            .await
            .unwrap();
        for _ in 0..1000 {
            let operation = self.operations.status(&started.operation_id).unwrap();
            if operation.state.is_terminal() {
                return operation;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("create of {name} did not end");
    }

    fn fail_at(&self, point: Option<&'static str>) {
        self.first.fail_at(None);
        self.second.fail_at(None);
        *self
            .vmm
            .fail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        match point {
            Some("first.prepare") => self.first.fail_at(Some("prepare")),
            Some("second.prepare") => self.second.fail_at(Some("prepare")),
            Some("second.launch") => self.second.fail_at(Some("launch")),
            Some("vmm.spawn") => {
                *self.vmm.fail.lock().unwrap() = Some("spawn");
            }
            Some("vmm.boot") => {
                *self.vmm.fail.lock().unwrap() = Some("boot");
            }
            Some("second.after_boot") => self.second.fail_at(Some("after_boot")),
            Some(other) => panic!("no failure point {other}"),
            None => {}
        }
    }

    fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.paths.vms()).unwrap().count()
    }
}

fn strings(entries: &[&str]) -> Vec<String> {
    entries.iter().map(|entry| (*entry).to_owned()).collect()
}

#[tokio::test]
async fn a_failure_at_each_step_undoes_the_steps_before_it_newest_first() {
    let fixture = fixture();
    let ran_to_spawn = [
        "first.prepare",
        "second.prepare",
        "first.launch",
        "second.launch",
        "vmm.spawn",
    ];
    let cases: [(&str, Vec<&str>); 6] = [
        ("first.prepare", vec!["first.prepare"]),
        (
            "second.prepare",
            vec!["first.prepare", "second.prepare", "first.undo"],
        ),
        (
            "second.launch",
            vec![
                "first.prepare",
                "second.prepare",
                "first.launch",
                "second.launch",
                "second.undo",
                "first.undo",
            ],
        ),
        (
            "vmm.spawn",
            [&ran_to_spawn[..], &["second.undo", "first.undo"]].concat(),
        ),
        (
            "vmm.boot",
            [
                &ran_to_spawn[..],
                &[
                    "vmm.boot",
                    "first.after_exit",
                    "second.after_exit",
                    "vmm.kill",
                    "second.undo",
                    "first.undo",
                ],
            ]
            .concat(),
        ),
        (
            "second.after_boot",
            [
                &ran_to_spawn[..],
                &[
                    "vmm.boot",
                    "second.after_boot",
                    "first.after_exit",
                    "second.after_exit",
                    "vmm.kill",
                    "second.undo",
                    "first.undo",
                ],
            ]
            .concat(),
        ),
    ];
    for (index, (point, expected)) in cases.iter().enumerate() {
        fixture.journal.clear();
        fixture.fail_at(Some(point));
        let name = format!("fails-{index}");
        let operation = fixture.create(&name).await;
        assert_eq!(operation.state, OperationState::Failed, "{point}");
        assert_eq!(fixture.journal.entries(), strings(expected), "{point}");
        // The root disk's undo ran too; the row stays, failed, with the error.
        assert_eq!(fixture.vm_dirs(), 0, "{point}");
        let vm = fixture.vms.find(&name).unwrap();
        assert_eq!(vm.state, VmState::Failed, "{point}");
        assert!(
            vm.error.as_deref().unwrap_or_default().contains("fails"),
            "{point}: {:?}",
            vm.error
        );
        assert_eq!(vm.pid, None);
        fixture.vms.delete(&name, false, false).await.unwrap();
    }
}

#[tokio::test]
async fn a_create_runs_every_hook_in_list_order_and_delete_runs_them_backwards() {
    let fixture = fixture();
    let guest_stage = RecordingGuestStage {
        journal: fixture.journal.clone(),
    };
    let operation = fixture
        .create_with("works", Some(Box::new(guest_stage)))
        .await;
    assert_eq!(operation.state, OperationState::Succeeded);
    assert_eq!(
        fixture.journal.entries(),
        strings(&[
            "guest.bind",
            "first.prepare",
            "second.prepare",
            "first.launch",
            "second.launch",
            "vmm.spawn",
            "vmm.boot",
            "second.after_boot",
            "guest.run running",
        ])
    );
    // Stages: the capabilities' own, the after-boot one, in order.
    let stages: Vec<String> = fixture
        .operations
        .status(&operation.id)
        .unwrap()
        .stages
        .iter()
        .filter(|event| event.status == banger_proto::StageStatus::Started)
        .map(|event| event.stage.clone())
        .collect();
    assert_eq!(
        stages,
        strings(&[
            "resolve image",
            "clone root disk",
            "first",
            "second",
            "start vmm",
            "boot",
            "second ready",
            "ready",
        ])
    );
    let launched = fixture.vmm.launched.lock().unwrap().clone().unwrap();
    assert_eq!(
        launched.kernel_cmdline,
        "console=ttyS0 banger.name=works first=1 second=1"
    );
    assert_eq!(fixture.vms.find("works").unwrap().state, VmState::Running);

    fixture.journal.clear();
    fixture.vms.stop("works", false).await.unwrap();
    assert_eq!(
        fixture.journal.entries(),
        strings(&[
            "first.before_stop",
            "second.before_stop",
            "vmm.kill",
            "first.after_exit",
            "second.after_exit",
        ])
    );
    fixture.journal.clear();
    fixture.vms.delete("works", false, false).await.unwrap();
    assert_eq!(
        fixture.journal.entries(),
        strings(&["second.on_delete", "first.on_delete"])
    );
    assert_eq!(fixture.vm_dirs(), 0);
    assert!(fixture.vms.list().unwrap().is_empty());
}
