//! Malformed input at every boundary, as property tests (stable Rust,
//! `proptest`): random bytes and mutations of valid input must give an
//! error or a result, never a panic or a hang.
//! - the agent frame decoder, host side (`AgentClient::connect` against a
//!   peer sending garbage) and agent side (a real `banger-agent
//!   --listen-unix` fed garbage, which keeps serving);
//! - the catalog parser; the tar/OCI unpacker; the initramfs reader and
//!   the kernel module index parser;
//! - the daemon's JSON-RPC server: random and mutated request lines, a huge
//!   line, and slow-loris clients holding connections with half a request,
//!   while another client is still served within a bound.
//!
//! `PROPTEST_CASES` sets the number of cases per property.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::test_daemon::{binary, TestDaemon};
use proptest::prelude::*;

/// Bytes that are `valid` with random positions overwritten, a random cut
/// and random bytes appended.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len().max(1);
    (
        proptest::collection::vec((0..len, any::<u8>()), 0..8),
        0..=len,
        proptest::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(edits, cut, tail)| {
            let mut bytes = valid.clone();
            for (at, byte) in edits {
                if at < bytes.len() {
                    bytes[at] = byte;
                }
            }
            bytes.truncate(cut);
            bytes.extend(tail);
            bytes
        })
}

fn garbage_or(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        mutated(valid),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn frame_bytes(frame: &banger_proto::agent::Frame, payload: &[u8]) -> Vec<u8> {
    runtime().block_on(async {
        let mut bytes = Vec::new();
        banger_agent_proto::protocol::write_frame(&mut bytes, frame, payload)
            .await
            .expect("encode");
        bytes
    })
}

fn hello() -> banger_proto::agent::Frame {
    banger_proto::agent::Frame::Hello {
        protocol_version: 1,
        host_version: "0.1.0".to_owned(),
    }
}

proptest! {
    #[test]
    fn frame_decoder_never_panics(bytes in garbage_or(frame_bytes(&hello(), b"payload"))) {
        runtime().block_on(async {
            let mut reader: &[u8] = &bytes;
            // Until the end, an error, or at most a few frames.
            for _ in 0..8 {
                match banger_agent_proto::protocol::read_frame(&mut reader).await {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        });
    }

    #[test]
    fn host_side_handshake_with_a_garbage_agent_fails_cleanly(bytes in garbage_or(frame_bytes(&hello(), b""))) {
        runtime().block_on(async {
            let (host, mut agent) = tokio::io::duplex(1 << 16);
            let peer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = agent.write_all(&bytes).await;
                // Then hang up.
            });
            let outcome = tokio::time::timeout(
                Duration::from_secs(5),
                banger_agent_proto::client::AgentClient::connect(host),
            )
            .await;
            assert!(outcome.is_ok(), "the handshake hung on garbage");
            let _ = peer.await;
        });
    }

    #[test]
    fn catalog_parser_never_panics(bytes in garbage_or(CATALOG.as_bytes().to_vec())) {
        let base = url::Url::parse("http://127.0.0.1:8080/catalogs/catalog.toml").expect("url");
        let _ = banger_catalog::Catalog::parse(&bytes, &base);
        let json = url::Url::parse("http://127.0.0.1:8080/catalogs/catalog.json").expect("url");
        let _ = banger_catalog::Catalog::parse(&bytes, &json);
    }

    #[test]
    fn initramfs_reader_never_panics(bytes in garbage_or(newc_archive())) {
        let _ = banger_disk::initramfs::parse_newc(&bytes);
        let _ = banger_disk::initramfs::parse_gzip(&bytes);
    }

    #[test]
    fn module_index_parser_never_panics(dep in "[a-z/._: \n-]{0,200}", builtin in "[a-z/._\n-]{0,100}") {
        let _ = banger_disk::initramfs::KernelModules::parse(Path::new("/lib/modules/x"), &dep, &builtin);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn unpacker_never_panics(bytes in garbage_or(tar_archive())) {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("source.tar");
        std::fs::write(&source, &bytes).expect("write source");
        let options = banger_disk::unpack::UnpackOptions {
            preserve_owners: false,
            maximum_stream_bytes: Some(16 << 20),
            maximum_content_bytes: Some(16 << 20),
            ..banger_disk::unpack::UnpackOptions::default()
        };
        let staging = dir.path().join("staging");
        if banger_disk::unpack::unpack(&source, &staging, &options).is_err() {
            prop_assert!(!staging.exists(), "a failed unpack left its staging dir");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// `docker save` archives whose `manifest.json` is mutated (layer
    /// names included: missing, escaping, absolute).
    #[test]
    fn docker_save_unpacker_never_panics(
        manifest in mutated(DOCKER_MANIFEST.as_bytes().to_vec()),
        layer_name in prop_oneof![Just("layer.tar"), Just("../layer.tar"), Just("/layer.tar"), Just("missing.tar"), Just("")],
    ) {
        let mut builder = tar::Builder::new(Vec::new());
        let mut append = |name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            let _ = builder.append_data(&mut header, name, data);
        };
        append("manifest.json", &manifest);
        append("config.json", b"{}");
        if !layer_name.is_empty() && !layer_name.starts_with('/') && !layer_name.starts_with("..") {
            append(layer_name, &tar_archive());
        }
        let archive = builder.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("image.tar");
        std::fs::write(&source, &archive).expect("write source");
        let options = banger_disk::unpack::UnpackOptions {
            preserve_owners: false,
            maximum_stream_bytes: Some(16 << 20),
            maximum_content_bytes: Some(16 << 20),
            ..banger_disk::unpack::UnpackOptions::default()
        };
        let staging = dir.path().join("staging");
        if banger_disk::unpack::unpack(&source, &staging, &options).is_err() {
            prop_assert!(!staging.exists(), "a failed unpack left its staging dir");
        }
    }
}

const DOCKER_MANIFEST: &str =
    r#"[{"Config":"config.json","RepoTags":["guest:latest"],"Layers":["layer.tar"]}]"#;

/// `cases` unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

const CATALOG: &str = r#"
format = 1

[[images]]
name = "debian-12"
version = "2026.11.1"
url = "images/debian-12.ext4"
size = 1073741824
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

[[kernels]]
name = "generic"
version = "6.1.119"
url = "../../kernels/vmlinux"
size = 41234560
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
initrd_url = "kernels/initrd.img"
"#;

/// A small `newc` archive: one file and the trailer.
fn newc_archive() -> Vec<u8> {
    fn entry(bytes: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        bytes.extend(header.as_bytes());
        bytes.extend(name.as_bytes());
        bytes.push(0);
        while !bytes.len().is_multiple_of(4) {
            bytes.push(0);
        }
        bytes.extend(data);
        while !bytes.len().is_multiple_of(4) {
            bytes.push(0);
        }
    }
    let mut bytes = Vec::new();
    entry(&mut bytes, "init", 0o100_755, b"#!/bin/sh\n");
    entry(&mut bytes, "TRAILER!!!", 0, b"");
    bytes
}

/// A small tar archive: a directory, a file, a symlink.
fn tar_archive() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    builder
        .append_data(&mut header, "etc/", std::io::empty())
        .expect("dir");
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(6);
    builder
        .append_data(&mut header, "etc/hostname", &b"guest\n"[..])
        .expect("file");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    builder
        .append_link(&mut header, "etc/link", "hostname")
        .expect("link");
    builder.into_inner().expect("tar")
}

/// The agent side: a real `banger-agent --listen-unix` fed garbage on many
/// connections keeps accepting and still answers a proper handshake.
#[test]
fn agent_keeps_serving_after_garbage_frames() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let mut agent: Child = Command::new(binary("banger-agent"))
        .arg("--listen-unix")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn banger-agent");
    let agent_pid = agent.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the agent did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(64),
        ..ProptestConfig::default()
    });
    let strategy = garbage_or(frame_bytes(&hello(), b""));
    runner
        .run(&strategy, |bytes| {
            let mut stream = UnixStream::connect(&socket).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = stream.write_all(&bytes);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            prop_assert!(banger_vmm::process::is_running(agent_pid), "the agent died");
            Ok(())
        })
        .expect("property");
    let hello = runtime().block_on(banger_agent_proto::client::AgentClient::connect_unix(
        &socket,
    ));
    assert!(hello.is_ok(), "no handshake after garbage: {hello:?}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Counts the daemon's open descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

#[test]
fn rpc_server_survives_garbage_huge_lines_and_slow_loris_clients() {
    let daemon = TestDaemon::start_with(&[]);
    let valid = br#"{"jsonrpc":"2.0","id":1,"method":"vm.list","params":{}}"#.to_vec();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(128),
        ..ProptestConfig::default()
    });
    runner
        .run(&garbage_or(valid), |mut bytes| {
            bytes.push(b'\n');
            let mut stream = UnixStream::connect(&daemon.socket).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = stream.write_all(&bytes);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            let read = stream.read_to_end(&mut answer);
            prop_assert!(read.is_ok(), "no answer within 10 s: {read:?}");
            // Every answer line is JSON-RPC.
            for line in answer
                .split(|&byte| byte == b'\n')
                .filter(|line| !line.is_empty())
            {
                let value: serde_json::Value = serde_json::from_slice(line)
                    .map_err(|error| TestCaseError::fail(format!("not JSON: {error}")))?;
                prop_assert_eq!(&value["jsonrpc"], "2.0");
            }
            Ok(())
        })
        .expect("property");

    // A huge line (8 MiB, no newline) is refused; the daemon goes on.
    let mut stream = UnixStream::connect(&daemon.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(&vec![b'x'; 8 << 20]);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.contains("longer than"), "{answer}");
    drop(stream);

    // Slow loris: 300 clients each holding half a request.
    let pid = daemon.pid().expect("daemon pid");
    let fds_before = open_fds(pid);
    let held: Vec<UnixStream> = (0..300)
        .map(|_| {
            let mut stream = UnixStream::connect(&daemon.socket).expect("connect");
            stream.write_all(b"{\"jsonrpc\":\"2.0\",").expect("write");
            stream
        })
        .collect();
    let started = Instant::now();
    daemon.banger_ok(&["vm", "list"]);
    daemon.banger_ok(&["image", "list"]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "other clients waited {:?} behind slow ones",
        started.elapsed()
    );
    drop(held);
    // Their connections are released.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > fds_before + 5 {
        assert!(
            Instant::now() < deadline,
            "descriptors not released: {} before, {} now",
            fds_before,
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.banger_ok(&["vm", "list"]);
}
