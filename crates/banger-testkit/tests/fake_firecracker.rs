//! Runs the built `fake-firecracker` binary and talks raw HTTP/1.1 to it
//! over its Unix socket, the way banger's Firecracker client will.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_fake-firecracker");
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const STEERING_VARIABLES: [&str; 5] = [
    "FAKE_FIRECRACKER_REQUEST_LOG",
    "FAKE_FIRECRACKER_FAIL",
    "FAKE_FIRECRACKER_DELAY",
    "FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS",
    "FAKE_FIRECRACKER_VSOCK_AGENT",
];

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Answer {
    fn fault(&self) -> &str {
        self.body
            .as_ref()
            .and_then(|body| body["fault_message"].as_str())
            .unwrap_or_else(|| panic!("no fault_message in {self:?}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// One HTTP/1.1 connection; requests are sent with keep-alive.
struct Connection {
    stream: BufReader<UnixStream>,
}

impl Connection {
    async fn open(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).await.unwrap();
        Self {
            stream: BufReader::new(stream),
        }
    }

    async fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Answer {
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();

        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await.unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let length: usize = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, value)| value.parse().unwrap());
        let mut raw = vec![0; length];
        self.stream.read_exact(&mut raw).await.unwrap();
        let body = (!raw.is_empty()).then(|| serde_json::from_slice(&raw).unwrap());
        Answer {
            status,
            headers,
            body,
        }
    }
}

/// A running fake with its own temp dir holding a kernel and a rootfs.
struct Fake {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Fake {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(environment: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.path().join("rootfs.ext4"), b"rootfs").unwrap();
        let socket = dir.path().join("firecracker.sock");
        let console = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let mut command = Command::new(BINARY);
        command
            .arg("--api-sock")
            .arg(&socket)
            .arg("--id")
            .arg("test-vm")
            .stdin(Stdio::null())
            .stdout(Stdio::from(console))
            .kill_on_drop(true);
        for variable in STEERING_VARIABLES {
            command.env_remove(variable);
        }
        command.envs(environment.iter().copied());
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while UnixStream::connect(&socket).await.is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("fake-firecracker exited at start-up: {status}");
            }
            assert!(Instant::now() < deadline, "API socket never appeared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self { child, dir, socket }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|body| body.to_string());
        Connection::open(&self.socket)
            .await
            .request(method, path, body.as_deref())
            .await
    }

    async fn put(&self, path: &str, body: Value) -> Answer {
        self.request("PUT", path, Some(body)).await
    }

    async fn put_ok(&self, path: &str, body: Value) {
        let answer = self.put(path, body).await;
        assert_eq!(answer.status, 204, "PUT {path}: {answer:?}");
        assert!(answer.body.is_none());
    }

    async fn get(&self, path: &str) -> Answer {
        self.request("GET", path, None).await
    }

    fn boot_source(&self) -> Value {
        json!({
            "kernel_image_path": self.path("vmlinux"),
            "boot_args": "console=ttyS0 reboot=k panic=1",
        })
    }

    fn root_drive(&self) -> Value {
        json!({
            "drive_id": "rootfs",
            "path_on_host": self.path("rootfs.ext4"),
            "is_root_device": true,
            "is_read_only": false,
        })
    }

    async fn boot(&self) {
        self.put_ok("/boot-source", self.boot_source()).await;
        self.put_ok("/drives/rootfs", self.root_drive()).await;
        self.put_ok("/actions", json!({"action_type": "InstanceStart"}))
            .await;
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(EXIT_TIMEOUT, self.child.wait())
            .await
            .expect("fake-firecracker did not exit")
            .unwrap()
    }
}

#[tokio::test]
async fn full_boot_sequence_succeeds_and_is_reflected() {
    let fake = Fake::start().await;
    let info = fake.get("/").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.header("content-type"), Some("application/json"));
    assert_eq!(
        info.body.unwrap(),
        json!({"app_name": "Firecracker", "id": "test-vm", "state": "Not started", "vmm_version": "1.17.0"})
    );
    assert_eq!(
        fake.get("/version").await.body.unwrap(),
        json!({"firecracker_version": "1.17.0"})
    );

    fake.put_ok(
        "/logger",
        json!({"log_path": fake.path("firecracker.log"), "level": "debug", "show_level": true}),
    )
    .await;
    fake.put_ok(
        "/metrics",
        json!({"metrics_path": fake.path("metrics.json")}),
    )
    .await;
    fake.put_ok(
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}),
    )
    .await;
    let patch = fake
        .request(
            "PATCH",
            "/machine-config",
            Some(json!({"mem_size_mib": 2048})),
        )
        .await;
    assert_eq!(patch.status, 204, "{patch:?}");
    fake.put_ok("/boot-source", fake.boot_source()).await;
    fake.put_ok("/drives/rootfs", fake.root_drive()).await;
    fake.put_ok(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap-test0", "guest_mac": "06:00:ac:10:00:02"}),
    )
    .await;
    fake.put_ok(
        "/vsock",
        json!({"guest_cid": 3, "uds_path": fake.path("vsock.sock")}),
    )
    .await;
    fake.put_ok("/actions", json!({"action_type": "InstanceStart"}))
        .await;
    fake.put_ok("/actions", json!({"action_type": "FlushMetrics"}))
        .await;

    assert_eq!(fake.get("/").await.body.unwrap()["state"], "Running");
    let machine = fake.get("/machine-config").await.body.unwrap();
    assert_eq!(machine["vcpu_count"], 2);
    assert_eq!(machine["mem_size_mib"], 2048);
    let config = fake.get("/vm/config").await.body.unwrap();
    assert_eq!(config["boot-source"], fake.boot_source());
    assert_eq!(config["drives"], json!([fake.root_drive()]));
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"],
        "tap-test0"
    );
    assert_eq!(config["vsock"]["guest_cid"], 3);
    assert_eq!(config["machine-config"]["mem_size_mib"], 2048);
    assert_eq!(config["logger"]["level"], "Debug");

    let console = std::fs::read_to_string(fake.path("console.log")).unwrap();
    assert!(
        console.contains(&format!(
            "fake-firecracker: booting kernel {} cmdline console=ttyS0 reboot=k panic=1",
            fake.path("vmlinux")
        )),
        "{console}"
    );
    assert!(
        console.contains("fake-firecracker: guest running"),
        "{console}"
    );
    let log = std::fs::read_to_string(fake.path("firecracker.log")).unwrap();
    assert!(log.contains("Successfully started microvm"), "{log}");
    let metrics = std::fs::read_to_string(fake.path("metrics.json")).unwrap();
    let line: Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(line["vmm"]["state"], "Running");
}

#[tokio::test]
async fn unknown_field_is_refused_and_named() {
    let fake = Fake::start().await;
    let mut body = fake.boot_source();
    body["kernel_args"] = json!("console=ttyS0");
    let answer = fake.put("/boot-source", body).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let fault = answer.fault();
    assert!(fault.contains("unknown field `kernel_args`"), "{fault}");
    assert!(fault.contains("expected one of"), "{fault}");
}

#[tokio::test]
async fn missing_required_field_is_refused() {
    let fake = Fake::start().await;
    let answer = fake
        .put(
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": fake.path("rootfs.ext4"), "is_read_only": false}),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("missing field `is_root_device`"),
        "{answer:?}"
    );
    let answer = fake
        .put("/network-interfaces/eth0", json!({"iface_id": "eth0"}))
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("missing field `host_dev_name`"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn wrong_type_and_bad_enum_are_refused() {
    let fake = Fake::start().await;
    let answer = fake
        .put(
            "/machine-config",
            json!({"vcpu_count": "2", "mem_size_mib": 256}),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(answer.fault().contains("invalid type"), "{answer:?}");
    let answer = fake.put("/actions", json!({"action_type": "Reboot"})).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("unknown variant `Reboot`"),
        "{answer:?}"
    );
    let answer = fake
        .put(
            "/machine-config",
            json!({"vcpu_count": 33, "mem_size_mib": 256}),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(answer.fault().contains("vCPU number"), "{answer:?}");
}

#[tokio::test]
async fn missing_kernel_is_refused() {
    let fake = Fake::start().await;
    let missing = fake.path("no-such-vmlinux");
    let answer = fake
        .put("/boot-source", json!({"kernel_image_path": missing}))
        .await;
    assert_eq!(answer.status, 400);
    assert!(answer.fault().contains(&missing), "{answer:?}");
    assert!(answer.fault().contains("No such file"), "{answer:?}");
}

#[tokio::test]
async fn drive_id_must_match_and_root_is_unique() {
    let fake = Fake::start().await;
    let answer = fake.put("/drives/data", fake.root_drive()).await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.fault(),
        "The id from the path does not match the id from the body!"
    );
    fake.put_ok("/drives/rootfs", fake.root_drive()).await;
    let mut second_root = fake.root_drive();
    second_root["drive_id"] = json!("rootfs2");
    let answer = fake.put("/drives/rootfs2", second_root).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.fault(), "A root block device already exists!");
}

#[tokio::test]
async fn start_without_boot_source_is_refused() {
    let fake = Fake::start().await;
    let answer = fake
        .put("/actions", json!({"action_type": "InstanceStart"}))
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.fault(),
        "Cannot start microvm without kernel configuration."
    );
    let answer = fake
        .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("not supported before starting"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn configuration_after_start_is_refused() {
    let fake = Fake::start().await;
    fake.boot().await;
    for (path, body) in [
        ("/boot-source", fake.boot_source()),
        ("/drives/rootfs", fake.root_drive()),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ] {
        let answer = fake.put(path, body).await;
        assert_eq!(answer.status, 400, "PUT {path}");
        assert_eq!(
            answer.fault(),
            "The requested operation is not supported after starting the microVM."
        );
    }
}

#[tokio::test]
async fn pause_and_resume() {
    let fake = Fake::start().await;
    let answer = fake
        .request("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(answer.status, 400, "pausing before boot: {answer:?}");
    fake.boot().await;
    let answer = fake
        .request("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(answer.status, 204);
    assert_eq!(fake.get("/").await.body.unwrap()["state"], "Paused");
    let answer = fake
        .request("PATCH", "/vm", Some(json!({"state": "Resumed"})))
        .await;
    assert_eq!(answer.status, 204);
    assert_eq!(fake.get("/").await.body.unwrap()["state"], "Running");
}

#[tokio::test]
async fn unknown_path_and_empty_body() {
    let fake = Fake::start().await;
    let answer = fake.get("/nope").await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.fault(),
        "Invalid request method and/or path: GET /nope."
    );
    let answer = fake.request("PUT", "/boot-source", None).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.fault(), "Empty PUT request.");
}

#[tokio::test]
async fn keep_alive_serves_several_requests_per_connection() {
    let fake = Fake::start().await;
    let mut connection = Connection::open(&fake.socket).await;
    let first = connection.request("GET", "/version", None).await;
    let body = fake.boot_source().to_string();
    let second = connection.request("PUT", "/boot-source", Some(&body)).await;
    let third = connection.request("GET", "/", None).await;
    assert_eq!((first.status, second.status, third.status), (200, 204, 200));
}

#[tokio::test]
async fn injected_failure_answers_400_and_changes_nothing() {
    let fake = Fake::start_with(&[("FAKE_FIRECRACKER_FAIL", "PUT /drives/*, PATCH /vm")]).await;
    let answer = fake.put("/drives/rootfs", fake.root_drive()).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.fault(), "injected failure");
    fake.put_ok("/boot-source", fake.boot_source()).await;
    let config = fake.get("/vm/config").await.body.unwrap();
    assert_eq!(config["drives"], json!([]));
}

#[tokio::test]
async fn request_log_records_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("requests.jsonl");
    let fake =
        Fake::start_with(&[("FAKE_FIRECRACKER_REQUEST_LOG", log_path.to_str().unwrap())]).await;
    fake.put_ok("/boot-source", fake.boot_source()).await;
    fake.get("/").await;
    fake.put("/drives/rootfs", json!({"drive_id": "rootfs"}))
        .await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"method": "PUT", "path": "/boot-source", "body": fake.boot_source(), "status": 204, "id": "test-vm"}),
            json!({"method": "GET", "path": "/", "body": null, "status": 200, "id": "test-vm"}),
            json!({"method": "PUT", "path": "/drives/rootfs", "body": {"drive_id": "rootfs"}, "status": 400, "id": "test-vm"}),
        ]
    );
}

#[tokio::test]
async fn delay_holds_the_request() {
    let fake = Fake::start_with(&[("FAKE_FIRECRACKER_DELAY", "GET /version=300")]).await;
    let started = Instant::now();
    assert_eq!(fake.get("/version").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn held_request_is_processed_even_if_the_client_hangs_up() {
    let fake = Fake::start_with(&[("FAKE_FIRECRACKER_DELAY", "PUT /actions=300")]).await;
    fake.put_ok("/boot-source", fake.boot_source()).await;
    let body = json!({"action_type": "InstanceStart"}).to_string();
    let mut connection = Connection::open(&fake.socket).await;
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        connection.request("PUT", "/actions", Some(&body)),
    )
    .await;
    assert!(cancelled.is_err(), "the request should still be held");
    drop(connection);
    assert_eq!(fake.get("/").await.body.unwrap()["state"], "Not started");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.get("/").await.body.unwrap()["state"], "Running");
}

#[tokio::test]
async fn ctrl_alt_del_exits_zero_and_removes_the_socket() {
    let mut fake = Fake::start().await;
    fake.boot().await;
    fake.put_ok("/actions", json!({"action_type": "SendCtrlAltDel"}))
        .await;
    let status = fake.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(!fake.socket.exists());
}

#[tokio::test]
async fn exit_after_boot_simulates_a_crash() {
    let mut fake = Fake::start_with(&[("FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS", "200")]).await;
    // The timer only runs from boot: the unbooted fake stays up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(fake.child.try_wait().unwrap().is_none());
    fake.boot().await;
    let status = fake.wait_exit().await;
    assert_eq!(status.code(), Some(1));
    // A crashed VMM leaves its socket behind.
    assert!(fake.socket.exists());
}

#[tokio::test]
async fn sigterm_exits_zero_and_removes_the_socket() {
    let mut fake = Fake::start().await;
    fake.boot().await;
    let pid = fake.child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(fake.wait_exit().await.code(), Some(0));
    assert!(!fake.socket.exists());
}

#[tokio::test]
async fn vsock_bridge_proxies_to_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent_path = dir.path().join("agent.sock");
    let agent = UnixListener::bind(&agent_path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = agent.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    let fake =
        Fake::start_with(&[("FAKE_FIRECRACKER_VSOCK_AGENT", agent_path.to_str().unwrap())]).await;
    let uds_path = fake.path("vsock.sock");
    fake.put_ok("/vsock", json!({"guest_cid": 3, "uds_path": uds_path}))
        .await;
    fake.boot().await;

    let stream = UnixStream::connect(&uds_path).await.unwrap();
    let mut stream = BufReader::new(stream);
    stream.get_mut().write_all(b"CONNECT 52\n").await.unwrap();
    let mut reply = String::new();
    stream.read_line(&mut reply).await.unwrap();
    let port: u32 = reply
        .strip_prefix("OK ")
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("bad reply {reply:?}"));
    assert!(port >= 1 << 30);
    stream.get_mut().write_all(b"ping\n").await.unwrap();
    let mut echoed = String::new();
    stream.read_line(&mut echoed).await.unwrap();
    assert_eq!(echoed, "ping\n");
}

#[tokio::test]
async fn existing_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("taken.sock");
    std::fs::write(&socket, b"").unwrap();
    let output = Command::new(BINARY)
        .arg("--api-sock")
        .arg(&socket)
        .arg("--id")
        .arg("test-vm")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(socket.exists(), "the existing file must not be removed");
}

#[tokio::test]
async fn invalid_instance_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let output = Command::new(BINARY)
        .arg("--api-sock")
        .arg(&socket)
        .arg("--id")
        .arg("bad_id")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(!socket.exists());
}

#[tokio::test]
async fn version_flag_prints_the_firecracker_version() {
    let output = Command::new(BINARY)
        .arg("--version")
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "Firecracker v1.17.0\n"
    );
}

#[tokio::test]
async fn snapshot_is_only_taken_while_paused_and_loads_in_a_fresh_vmm() {
    let source = Fake::start().await;
    let create = json!({
        "snapshot_path": source.path("vmstate"),
        "mem_file_path": source.path("memory"),
        "snapshot_type": "Full",
    });
    // Before boot, and while running: refused, nothing written.
    let answer = source.put("/snapshot/create", create.clone()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    source.boot().await;
    let answer = source.put("/snapshot/create", create.clone()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.fault().contains("pause the microVM first"),
        "{answer:?}"
    );
    assert!(!source.dir.path().join("vmstate").exists());
    let answer = source
        .request("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(answer.status, 204);
    source.put_ok("/snapshot/create", create).await;
    let memory = std::fs::read(source.dir.path().join("memory")).unwrap();
    assert!(memory.starts_with(b"fake guest memory of test-vm\n"));
    assert_eq!(memory.len(), 128 << 20, "the configured memory size");

    // Load is refused once a boot resource is configured.
    let load = json!({
        "snapshot_path": source.path("vmstate"),
        "mem_backend": {"backend_type": "File", "backend_path": source.path("memory")},
        "network_overrides": [],
        "resume_vm": true,
    });
    let configured = Fake::start().await;
    configured
        .put_ok("/boot-source", configured.boot_source())
        .await;
    let answer = configured.put("/snapshot/load", load.clone()).await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.fault(),
        "Loading a microVM snapshot not allowed after configuring boot-specific resources."
    );

    // A missing memory file, an unknown interface override: refused.
    let fresh = Fake::start().await;
    let mut missing = load.clone();
    missing["mem_backend"]["backend_path"] = json!(fresh.path("no-memory"));
    let answer = fresh.put("/snapshot/load", missing).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("Cannot open the memory file"),
        "{answer:?}"
    );
    let mut unknown = load.clone();
    unknown["network_overrides"] = json!([{"iface_id": "eth9", "host_dev_name": "tap9"}]);
    let answer = fresh.put("/snapshot/load", unknown).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.fault().contains("unknown interface eth9"),
        "{answer:?}"
    );

    // A fresh VMM (logger and metrics allowed) loads it and runs the guest
    // with the snapshot's devices; boot configuration is refused after.
    fresh
        .put_ok("/logger", json!({"log_path": fresh.path("fc.log")}))
        .await;
    fresh.put_ok("/snapshot/load", load).await;
    let info = fresh.get("/").await.body.unwrap();
    assert_eq!(info["state"], "Running");
    let config = fresh.get("/vm/config").await.body.unwrap();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        source.path("rootfs.ext4")
    );
    let answer = fresh.put("/boot-source", fresh.boot_source()).await;
    assert_eq!(answer.status, 400);
    // The memory file was only read.
    assert_eq!(
        std::fs::read(source.dir.path().join("memory")).unwrap(),
        memory
    );
}
