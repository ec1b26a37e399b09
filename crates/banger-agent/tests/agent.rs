//! Drives a real `banger-agent --listen-unix` process through the client.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use banger_agent_proto::client::{AgentClient, ExecSession};
use banger_proto::agent::{AgentErrorKind, ExecRequest, WindowSize};
use bytes::Bytes;
use sha2::{Digest, Sha256};

struct TestAgent {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl TestAgent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join("ssh");
        std::fs::create_dir(&ssh).unwrap();
        std::fs::write(
            ssh.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAC3NzaTEST root@guest\n",
        )
        .unwrap();
        std::fs::write(ssh.join("ssh_host_ed25519_key"), "PRIVATE").unwrap();
        let socket = dir.path().join("agent.sock");
        // BANGER_AGENT_BIN runs the suite against another build (e.g. the static one).
        let binary = std::env::var_os("BANGER_AGENT_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_banger-agent")),
            PathBuf::from,
        );
        let child = Command::new(binary)
            .arg("--listen-unix")
            .arg(&socket)
            .arg("--ssh-config-dir")
            .arg(&ssh)
            .env("BANGER_AGENT_LOG", "warn")
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket, dir }
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect_unix(&self.socket).await.unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn argv(words: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: words.iter().map(|word| (*word).to_owned()).collect(),
        ..ExecRequest::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    argv(&["sh", "-c", script])
}

/// Reads `session.stdout` until `needle` shows up; returns everything read.
async fn read_until(session: &mut ExecSession, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline.into(), session.stdout.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {needle:?}, saw {seen:?}"))
            .unwrap_or_else(|| panic!("stream ended before {needle:?}, saw {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test]
async fn hello_reports_the_guest() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let hello = client.hello();
    assert_eq!(
        hello.protocol_version,
        banger_proto::agent::PROTOCOL_VERSION
    );
    assert_eq!(hello.agent_version, banger_proto::VERSION);
    assert!(!hello.kernel_release.is_empty());
    assert!(!hello.hostname.is_empty());
    assert!(hello.boot_time_unix > 1_000_000_000);
    if Path::new("/etc/os-release").exists() {
        assert!(!hello.distro.is_empty());
    }
    assert!(!hello.is_init);
}

#[tokio::test]
async fn exit_codes_and_signals_pass_through() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    for (request, code) in [
        (argv(&["true"]), 0),
        (argv(&["false"]), 1),
        (sh("exit 42"), 42),
    ] {
        let output = client.exec(request).await.unwrap().output().await.unwrap();
        assert_eq!(output.status.code, Some(code));
        assert_eq!(output.status.signal, None);
    }
    let output = client
        .exec(sh("kill -TERM $$"))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code, None);
    assert_eq!(output.status.signal, Some(libc::SIGTERM));
    assert_eq!(output.status.shell_code(), 128 + libc::SIGTERM);
}

#[tokio::test]
async fn missing_program_is_an_invalid_request() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let error = client
        .exec(argv(&["/no/such/program"]))
        .await
        .unwrap()
        .output()
        .await
        .unwrap_err();
    assert_eq!(error.agent_kind(), Some(AgentErrorKind::InvalidRequest));
    // The connection survives a failed session.
    let output = client
        .exec(argv(&["true"]))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code, Some(0));
}

#[tokio::test]
async fn stdout_and_stderr_stay_separate_and_env_cwd_apply() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut request = sh("echo out; echo err >&2; echo \"$GREETING\"; pwd");
    request.env = vec![("GREETING".into(), "hi there".into())];
    request.cwd = Some(agent.dir.path().display().to_string());
    let output = client.exec(request).await.unwrap().output().await.unwrap();
    let cwd = std::fs::canonicalize(agent.dir.path()).unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("out\nhi there\n{}\n", cwd.display())
    );
    assert_eq!(String::from_utf8(output.stderr).unwrap(), "err\n");
}

#[tokio::test]
async fn hundred_mebibytes_round_trip_through_cat() {
    const TOTAL: usize = 100 * 1024 * 1024;
    let agent = TestAgent::start();
    let client = agent.client().await;
    let session = client.exec(argv(&["cat"])).await.unwrap();
    let ExecSession {
        mut stdin,
        mut stdout,
        exit,
        ..
    } = session;
    let writer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut state = 0x1234_5678_u64;
        let mut sent = 0;
        while sent < TOTAL {
            let mut block = vec![0_u8; 256 * 1024];
            for byte in &mut block {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                *byte = (state >> 56) as u8;
            }
            hasher.update(&block);
            sent += block.len();
            stdin.write(Bytes::from(block)).await.unwrap();
        }
        stdin.close();
        hasher.finalize()
    });
    let mut hasher = Sha256::new();
    let mut received = 0;
    while let Some(chunk) = stdout.recv().await {
        received += chunk.len();
        hasher.update(&chunk);
    }
    let sent_digest = writer.await.unwrap();
    assert_eq!(received, TOTAL);
    assert_eq!(hasher.finalize(), sent_digest);
    assert_eq!(exit.wait().await.unwrap().code, Some(0));
}

#[tokio::test]
async fn a_slow_reader_holds_back_only_its_stream() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    // 16 MiB is far more than the window plus a pipe buffer: the writer must
    // block until we read, and only then print to stderr.
    let mut session = client
        .exec(sh("head -c 16777216 /dev/zero; echo done >&2"))
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(700), session.stderr.recv()).await;
    assert!(
        early.is_err(),
        "stderr arrived while stdout was not read: {early:?}"
    );
    // Another session on the same connection is not held back.
    let other = client
        .exec(argv(&["echo", "free"]))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(other.stdout, b"free\n");
    let output = session.output().await.unwrap();
    assert_eq!(output.stdout.len(), 16 * 1024 * 1024);
    assert_eq!(output.stderr, b"done\n");
}

#[tokio::test]
async fn twenty_execs_run_concurrently_on_one_connection() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..20 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let request = sh(&format!(
                "sleep 0.5; echo session-{index}; echo e{index} >&2; exit {index}"
            ));
            (
                index,
                client.exec(request).await.unwrap().output().await.unwrap(),
            )
        }));
    }
    for task in tasks {
        let (index, output) = task.await.unwrap();
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            format!("session-{index}\n")
        );
        assert_eq!(
            String::from_utf8(output.stderr).unwrap(),
            format!("e{index}\n")
        );
        assert_eq!(output.status.code, Some(index));
    }
    // Run one after another they would take 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn pty_echoes_input_and_sees_resize() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut request =
        sh("stty size; echo ready; read line; echo got:$line; read x; stty size; tty");
    request.pty = Some(WindowSize { rows: 24, cols: 80 });
    let mut session = client.exec(request).await.unwrap();
    let seen = read_until(&mut session, "ready").await;
    assert!(seen.contains("24 80"), "{seen:?}");
    session.stdin.write(&b"hello\n"[..]).await.unwrap();
    // The terminal echoes what we typed, then the shell answers.
    let seen = read_until(&mut session, "got:hello").await;
    assert!(seen.contains("hello\r\n"), "no echo in {seen:?}");
    session.control.resize(50, 132).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    session.stdin.write(&b"\n"[..]).await.unwrap();
    let seen = read_until(&mut session, "50 132").await;
    let rest = session.output().await.unwrap();
    let all = format!("{seen}{}", String::from_utf8_lossy(&rest.stdout));
    assert!(all.contains("/dev/pts/"), "{all:?}");
    assert!(rest.stderr.is_empty());
    assert_eq!(rest.status.code, Some(0));
}

#[tokio::test]
async fn signals_reach_the_process() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let session = client.exec(argv(&["sleep", "30"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    session.control.signal(libc::SIGINT).unwrap();
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), session.exit.wait())
        .await
        .expect("sleep did not die")
        .unwrap();
    assert_eq!(status.signal, Some(libc::SIGINT));
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn copy_in_and_out_round_trip_a_tree() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let source = tempfile::tempdir().unwrap();
    let tree = source.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/empty")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha").unwrap();
    std::fs::set_permissions(tree.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(tree.join("sub/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(
        tree.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(tree.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a.txt", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("../a.txt", tree.join("sub/up")).unwrap();

    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all("tree", &tree).unwrap();
    let archive = builder.into_inner().unwrap();

    let guest = tempfile::tempdir().unwrap();
    let dest = guest.path().join("dest");
    let entries = client
        .copy_in(&dest.display().to_string(), &archive[..])
        .await
        .unwrap();
    assert!(entries >= 7, "{entries}");
    let copied = dest.join("tree");
    assert_eq!(
        std::fs::read_to_string(copied.join("a.txt")).unwrap(),
        "alpha"
    );
    assert_eq!(mode_of(&copied.join("a.txt")), 0o640);
    assert_eq!(mode_of(&copied.join("sub/run.sh")), 0o755);
    assert_eq!(mode_of(&copied.join("sub")), 0o750);
    assert_eq!(
        std::fs::read_link(copied.join("link")).unwrap(),
        Path::new("a.txt")
    );
    assert_eq!(
        std::fs::read_link(copied.join("sub/up")).unwrap(),
        Path::new("../a.txt")
    );
    assert!(copied.join("sub/empty").is_dir());

    let mut stream = client
        .copy_out(&copied.display().to_string())
        .await
        .unwrap();
    let mut tarball = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut tarball)
        .await
        .unwrap();
    let back = tempfile::tempdir().unwrap();
    let mut unpacked = tar::Archive::new(&tarball[..]);
    unpacked.set_preserve_permissions(true);
    unpacked.unpack(back.path()).unwrap();
    let returned = back.path().join("tree");
    assert_eq!(
        std::fs::read_to_string(returned.join("sub/run.sh")).unwrap(),
        "#!/bin/sh\necho run\n"
    );
    assert_eq!(mode_of(&returned.join("sub/run.sh")), 0o755);
    assert_eq!(mode_of(&returned.join("a.txt")), 0o640);
    assert_eq!(
        std::fs::read_link(returned.join("link")).unwrap(),
        Path::new("a.txt")
    );
    assert_eq!(
        std::fs::read_link(returned.join("sub/up")).unwrap(),
        Path::new("../a.txt")
    );

    // A single file comes out under its own name.
    let mut stream = client
        .copy_out(&copied.join("a.txt").display().to_string())
        .await
        .unwrap();
    let mut tarball = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut tarball)
        .await
        .unwrap();
    let mut archive = tar::Archive::new(&tarball[..]);
    let mut entries = archive.entries().unwrap();
    let mut entry = entries.next().unwrap().unwrap();
    assert_eq!(entry.path().unwrap(), Path::new("a.txt"));
    let mut text = String::new();
    entry.read_to_string(&mut text).unwrap();
    assert_eq!(text, "alpha");

    // A missing path fails the stream.
    let mut stream = client.copy_out("/no/such/path").await.unwrap();
    let mut sink = Vec::new();
    assert!(tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink)
        .await
        .is_err());
}

/// A one-entry tar with the raw name (and link name) written into the header,
/// bypassing the `tar` crate's own refusal to build such entries.
fn raw_tar(name: &str, kind: tar::EntryType, link: Option<&str>, contents: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    {
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(contents.len() as u64);
    header.set_cksum();
    let mut archive = header.as_bytes().to_vec();
    archive.extend_from_slice(contents);
    archive.resize(archive.len().div_ceil(512) * 512 + 1024, 0);
    archive
}

#[tokio::test]
async fn hostile_archives_are_refused() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let guest = tempfile::tempdir().unwrap();
    let dest = guest.path().join("a/b");
    let absolute = guest.path().join("absolute-victim");
    let cases = [
        (
            "parent",
            raw_tar("../x", tar::EntryType::Regular, None, b"evil"),
        ),
        (
            "absolute",
            raw_tar(
                &absolute.display().to_string(),
                tar::EntryType::Regular,
                None,
                b"evil",
            ),
        ),
        (
            "symlink",
            raw_tar("esc", tar::EntryType::Symlink, Some("../../.."), b""),
        ),
        (
            "absolute symlink",
            raw_tar("esc", tar::EntryType::Symlink, Some("/etc"), b""),
        ),
        (
            "hard link",
            raw_tar("hard", tar::EntryType::Link, Some("../../x"), b""),
        ),
        ("device", raw_tar("dev", tar::EntryType::Char, None, b"")),
    ];
    for (name, archive) in cases {
        let error = client
            .copy_in(&dest.display().to_string(), &archive[..])
            .await
            .expect_err(name);
        assert_eq!(
            error.agent_kind(),
            Some(AgentErrorKind::UnsafeArchive),
            "{name}: {error}"
        );
    }
    assert!(!guest.path().join("a/x").exists());
    assert!(!absolute.exists());
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);

    // A symlink already in the destination is not written through.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dest.join("door")).unwrap();
    let archive = raw_tar("door/file", tar::EntryType::Regular, None, b"evil");
    let error = client
        .copy_in(&dest.display().to_string(), &archive[..])
        .await
        .unwrap_err();
    assert_eq!(
        error.agent_kind(),
        Some(AgentErrorKind::UnsafeArchive),
        "{error}"
    );
    assert!(!outside.path().join("file").exists());
}

#[tokio::test]
async fn stats_host_keys_and_shutdown() {
    let mut agent = TestAgent::start();
    let client = agent.client().await;
    let stats = client.stats().await.unwrap();
    assert!(stats.cpu_count >= 1);
    assert!(stats.memory_total_bytes > 0);
    assert!(stats.memory_available_bytes <= stats.memory_total_bytes);
    assert!(stats.disk_total_bytes > 0);
    assert!(stats.uptime_seconds > 0.0);

    let keys = client.host_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].algorithm, "ssh-ed25519");
    assert_eq!(keys[0].key, "AAAAC3NzaTEST");

    client.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn exec_as_another_user_when_root() {
    if !nix::unistd::getuid().is_root() {
        println!("SKIPPED exec_as_another_user_when_root: needs root");
        return;
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody").unwrap() else {
        println!("SKIPPED exec_as_another_user_when_root: no user nobody");
        return;
    };
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut request = sh("id -u; id -g; echo $USER");
    request.user = Some("nobody".into());
    request.cwd = Some("/".into());
    let output = client.exec(request).await.unwrap().output().await.unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("{}\n{}\nnobody\n", nobody.uid, nobody.gid)
    );
    let mut request = argv(&["true"]);
    request.user = Some("no-such-user-here".into());
    let error = client
        .exec(request)
        .await
        .unwrap()
        .output()
        .await
        .unwrap_err();
    assert_eq!(
        error.agent_kind(),
        Some(AgentErrorKind::InvalidRequest),
        "{error:?}"
    );
}

/// A stand-in for Firecracker's vsock Unix socket: it answers the `CONNECT`
/// line like Firecracker and then relays bytes to the agent's socket.
#[tokio::test]
async fn connects_through_a_firecracker_style_vsock_socket() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let agent = TestAgent::start();
    let vsock = agent.dir.path().join("v.sock");
    let listener = tokio::net::UnixListener::bind(&vsock).unwrap();
    let target = agent.socket.clone();
    let relay = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        stream
            .get_mut()
            .write_all(b"OK 1073741824\n")
            .await
            .unwrap();
        let mut guest = tokio::net::UnixStream::connect(&target).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut guest).await;
    });
    let client = AgentClient::connect_firecracker_vsock(&vsock, 1024)
        .await
        .unwrap();
    let output = client
        .exec(argv(&["echo", "via vsock"]))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(output.stdout, b"via vsock\n");
    drop(client);
    relay.abort();
}

#[tokio::test]
async fn a_wrong_protocol_version_is_refused() {
    use banger_agent_proto::protocol::{read_frame, write_frame};
    use banger_proto::agent::Frame;
    use tokio::io::AsyncWriteExt;
    let agent = TestAgent::start();
    let mut stream = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    let hello = Frame::Hello {
        protocol_version: 99,
        host_version: "test".into(),
    };
    write_frame(&mut stream, &hello, &[]).await.unwrap();
    stream.flush().await.unwrap();
    match read_frame(&mut stream).await.unwrap() {
        Some((Frame::Failed { session: 0, error }, _)) => {
            assert_eq!(error.kind, AgentErrorKind::Protocol);
            assert!(error.message.contains("99"), "{}", error.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(read_frame(&mut stream).await.unwrap().is_none());
}

#[tokio::test]
async fn dropping_the_client_kills_its_commands() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut session = client.exec(sh("echo $$; exec sleep 30")).await.unwrap();
    let seen = read_until(&mut session, "\n").await;
    let pid: i32 = seen.trim().parse().unwrap();
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(alive(pid));
    drop(session);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "command outlived its connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's fd transport (what vsock and virtio-serial use) with an
/// in-process server on one end of a socketpair.
#[tokio::test]
async fn in_process_server_over_an_fd_stream() {
    use banger_agent::reaper::{ReapMode, Reaper};
    use banger_agent::server::{serve_connection, Agent};
    use banger_agent::system::SystemPaths;
    use banger_agent::transport::FdStream;
    let (guest_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let agent = Agent::new(
        SystemPaths::default(),
        false,
        Reaper::start(ReapMode::OwnChildren).unwrap(),
    );
    let stream = FdStream::new(std::os::fd::OwnedFd::from(guest_end)).unwrap();
    let server = tokio::spawn(serve_connection(agent, stream));
    host_end.set_nonblocking(true).unwrap();
    let client = AgentClient::connect(tokio::net::UnixStream::from_std(host_end).unwrap())
        .await
        .unwrap();
    let session = client.exec(argv(&["cat"])).await.unwrap();
    let payload = vec![7_u8; 1024 * 1024];
    let ExecSession {
        mut stdin,
        mut stdout,
        stderr,
        control,
        exit,
    } = session;
    // Write and read at once: cat's output must drain for its input to flow.
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move {
            stdin.write(Bytes::from(payload)).await.unwrap();
            stdin.close();
            stdin
        })
    };
    assert_eq!(stdout.read_to_end().await, payload);
    let stdin = writer.await.unwrap();
    assert_eq!(exit.wait().await.unwrap().code, Some(0));
    // The client and its sessions' streams hold the connection open.
    drop((stdin, stdout, stderr, control, client));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server did not end with the connection")
        .unwrap()
        .unwrap();
}

/// A raw session sees the agent's frames as sent; `cancel` kills its command.
#[tokio::test]
async fn raw_sessions_relay_frames_and_cancel_kills() {
    use banger_proto::agent::{Frame, Operation, OperationResult, StreamId};
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut raw = client
        .open_raw(Operation::Exec(sh("echo $$; exec sleep 30")))
        .unwrap();
    let session = raw.id();
    let (frame, payload) = raw.frames.recv().await.unwrap();
    assert_eq!(
        frame,
        Frame::Data {
            session,
            stream: StreamId::Stdout
        }
    );
    let pid: i32 = String::from_utf8_lossy(&payload).trim().parse().unwrap();
    assert!(raw
        .sender
        .send(
            Frame::Credit {
                session: 0,
                stream: StreamId::Stdout,
                bytes: u32::try_from(payload.len()).unwrap(),
            },
            Bytes::new(),
        )
        .is_ok());
    assert!(raw.sender.cancel());
    let result = loop {
        match tokio::time::timeout(Duration::from_secs(10), raw.frames.recv())
            .await
            .expect("no answer after cancel")
            .expect("raw stream ended without done")
        {
            (Frame::Done { result, .. }, _) => break result,
            (Frame::Failed { error, .. }, _) => panic!("failed: {error:?}"),
            _ => {}
        }
    };
    let OperationResult::Exited(status) = result else {
        panic!("unexpected result {result:?}");
    };
    assert_eq!(status.signal, Some(libc_sigkill()));
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err());
    // The connection is still good for other sessions.
    let output = client
        .exec(argv(&["true"]))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code, Some(0));
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// A second host that says hello on a byte stream the agent still serves
/// (a restored guest's virtio-serial port handed to a new host without a
/// hang-up the agent saw) is served: the agent answers its hello.
#[tokio::test]
async fn a_new_hello_on_an_open_connection_is_answered() {
    use banger_agent::reaper::{ReapMode, Reaper};
    use banger_agent::server::{serve_connection, Agent};
    use banger_agent::system::SystemPaths;
    use banger_agent::transport::FdStream;
    let (guest_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let agent = Agent::new(
        SystemPaths::default(),
        false,
        Reaper::start(ReapMode::OwnChildren).unwrap(),
    );
    let stream = FdStream::new(std::os::fd::OwnedFd::from(guest_end)).unwrap();
    let _server = tokio::spawn(serve_connection(agent, stream));
    host_end.set_nonblocking(true).unwrap();
    let host = |end: &std::os::unix::net::UnixStream| {
        tokio::net::UnixStream::from_std(end.try_clone().unwrap()).unwrap()
    };
    // The first host says hello and goes away without closing the stream,
    // as the source's host does for a restored guest.
    let mut first = host(&host_end);
    banger_agent_proto::protocol::write_frame(
        &mut first,
        &banger_proto::agent::Frame::Hello {
            protocol_version: banger_proto::agent::PROTOCOL_VERSION,
            host_version: "first".into(),
        },
        &[],
    )
    .await
    .unwrap();
    let (reply, _) = banger_agent_proto::protocol::read_frame(&mut first)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reply, banger_proto::agent::Frame::HelloReply(_)),
        "{reply:?}"
    );
    let _first_host_stays = first;
    let second = tokio::time::timeout(
        Duration::from_secs(5),
        AgentClient::connect(host(&host_end)),
    )
    .await
    .expect("the agent did not answer the second hello")
    .unwrap();
    let output = second
        .exec(argv(&["echo", "second"]))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(output.stdout, b"second\n");
}

/// In host test mode an identity is recorded, not applied, and reported in
/// the next hello.
#[tokio::test]
async fn an_identity_is_reported_in_the_next_hello() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    assert_eq!(client.hello().generation, 0);
    assert_eq!(client.hello().vm_id, None);
    let applied = client
        .identity(banger_proto::agent::IdentityRequest {
            generation: 7,
            vm_id: "copy-id".into(),
            cmdline: "console=ttyS0 banger.name=copy".into(),
            unix_nanos: 1,
            entropy: vec![1; 64],
            regen_host_keys: false,
        })
        .await
        .unwrap();
    assert!(applied.is_empty(), "{applied:?}");
    drop(client);
    let client = agent.client().await;
    assert_eq!(client.hello().generation, 7);
    assert_eq!(client.hello().vm_id.as_deref(), Some("copy-id"));
}
