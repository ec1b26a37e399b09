//! The host side of the vsock device: Firecracker's host-initiated
//! connection protocol, bridged to a Unix socket that plays the guest.
//!
//! For each connection accepted on the vsock `uds_path` after boot:
//!
//! 1. Read the first line byte by byte (nothing past `\n` may be consumed,
//!    it belongs to the proxied stream). It must be `CONNECT <port>\n` with
//!    a decimal `u32` port, at most 32 bytes; otherwise the connection is
//!    closed, as the real VMM does.
//! 2. Connect to the guest side: the Unix socket named by
//!    `FAKE_FIRECRACKER_VSOCK_AGENT`, whatever the port. Without that
//!    variable, or if the connect fails, close the connection (the real VMM
//!    resets it when no guest listens on the port).
//! 3. Answer `OK <host_port>\n`, `host_port` being a local port number
//!    allocated from 2^30 upwards, like the real VMM's.
//! 4. Copy bytes both ways until either side closes.
//!
//! Guest-initiated connections (the guest connects to host CID 2, port P)
//! go, as in the real VMM, to the host's Unix socket `<uds_path>_P`; if
//! nothing listens there the guest's connection is closed. The host-mode
//! guest makes them through [`guest_device_path`]: each connection there
//! sends `CONNECT <P>\n` and is then the guest's stream ([`serve_guest`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The longest `CONNECT` line accepted, newline included.
const MAX_CONNECT_LINE_LEN: usize = 32;
/// First host-side port handed out in `OK <port>` answers.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Why one bridged connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("Cannot read the CONNECT line")]
    ReadConnectLine(#[source] io::Error),
    #[error("Invalid CONNECT line {line:?}")]
    InvalidConnectLine { line: String },
    #[error("No guest agent is listening (FAKE_FIRECRACKER_VSOCK_AGENT is not set)")]
    NoAgent,
    #[error("Cannot connect to the guest agent socket {path}")]
    ConnectAgent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Nothing listens for the guest's connection on {path}")]
    ConnectHost {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot proxy the connection")]
    Proxy(#[source] io::Error),
}

/// The Unix socket that stands for the guest's side of the vsock device,
/// next to the host-mode guest agent's socket `agent_socket`.
#[must_use]
pub fn guest_device_path(agent_socket: &Path) -> PathBuf {
    let mut path = agent_socket.as_os_str().to_owned();
    path.push(".connect");
    PathBuf::from(path)
}

/// Accepts guest-initiated connections on `device` forever and forwards
/// each to `<uds_path>_<port>`.
pub async fn serve_guest(device: UnixListener, uds_path: PathBuf) {
    loop {
        let stream = match device.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("fake-firecracker: vsock: guest accept failed: {error}");
                continue;
            }
        };
        let uds_path = uds_path.clone();
        tokio::spawn(async move {
            if let Err(error) = forward_to_host(stream, &uds_path).await {
                eprintln!("fake-firecracker: vsock: {}", super::error_chain(&error));
            }
        });
    }
}

async fn forward_to_host(mut guest: UnixStream, uds_path: &Path) -> Result<(), BridgeError> {
    let line = read_connect_line(&mut guest).await?;
    let port = parse_connect_line(&line).ok_or(BridgeError::InvalidConnectLine { line })?;
    let mut target = uds_path.as_os_str().to_owned();
    target.push(format!("_{port}"));
    let target = PathBuf::from(target);
    let mut host =
        UnixStream::connect(&target)
            .await
            .map_err(|source| BridgeError::ConnectHost {
                path: target.clone(),
                source,
            })?;
    tokio::io::copy_bidirectional(&mut guest, &mut host)
        .await
        .map_err(BridgeError::Proxy)?;
    Ok(())
}

/// Accepts host connections forever, one task each.
pub async fn serve(listener: UnixListener, agent: Option<PathBuf>) {
    let next_host_port = Arc::new(AtomicU32::new(FIRST_HOST_PORT));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("fake-firecracker: vsock: accept failed: {error}");
                continue;
            }
        };
        let agent = agent.clone();
        let next_host_port = Arc::clone(&next_host_port);
        tokio::spawn(async move {
            let host_port = next_host_port.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = bridge(stream, agent.as_deref(), host_port).await {
                eprintln!("fake-firecracker: vsock: {}", super::error_chain(&error));
            }
        });
    }
}

async fn bridge(
    mut host: UnixStream,
    agent: Option<&Path>,
    host_port: u32,
) -> Result<(), BridgeError> {
    let line = read_connect_line(&mut host).await?;
    parse_connect_line(&line).ok_or(BridgeError::InvalidConnectLine { line })?;
    let agent = agent.ok_or(BridgeError::NoAgent)?;
    let mut guest =
        UnixStream::connect(agent)
            .await
            .map_err(|source| BridgeError::ConnectAgent {
                path: agent.to_owned(),
                source,
            })?;
    host.write_all(format!("OK {host_port}\n").as_bytes())
        .await
        .map_err(BridgeError::Proxy)?;
    tokio::io::copy_bidirectional(&mut host, &mut guest)
        .await
        .map_err(BridgeError::Proxy)?;
    Ok(())
}

/// Reads up to and including the first `\n`, refusing long lines.
async fn read_connect_line(stream: &mut UnixStream) -> Result<String, BridgeError> {
    let mut line = Vec::with_capacity(MAX_CONNECT_LINE_LEN);
    loop {
        let byte = stream
            .read_u8()
            .await
            .map_err(BridgeError::ReadConnectLine)?;
        line.push(byte);
        if byte == b'\n' || line.len() >= MAX_CONNECT_LINE_LEN {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// The guest port of a `CONNECT <port>\n` line.
fn parse_connect_line(line: &str) -> Option<u32> {
    let port = line.strip_prefix("CONNECT ")?.strip_suffix('\n')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_syntax() {
        assert_eq!(parse_connect_line("CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect_line("CONNECT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect_line("CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect_line("CONNECT 52"), None);
        assert_eq!(parse_connect_line("connect 52\n"), None);
        assert_eq!(parse_connect_line("CONNECT +52\n"), None);
        assert_eq!(parse_connect_line("CONNECT \n"), None);
    }

    #[tokio::test]
    async fn bridges_to_the_agent_and_keeps_bytes_after_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let agent_path = dir.path().join("agent.sock");
        let agent = UnixListener::bind(&agent_path).unwrap();
        let vsock_path = dir.path().join("vsock.sock");
        let vsock = UnixListener::bind(&vsock_path).unwrap();
        tokio::spawn(serve(vsock, Some(agent_path)));
        tokio::spawn(async move {
            let (mut stream, _) = agent.accept().await.unwrap();
            let (mut reader, mut writer) = stream.split();
            tokio::io::copy(&mut reader, &mut writer).await.unwrap();
        });

        let mut host = UnixStream::connect(&vsock_path).await.unwrap();
        // The payload is sent with the CONNECT line on purpose: bytes after
        // the newline must reach the guest.
        host.write_all(b"CONNECT 1024\nhello").await.unwrap();
        let mut reply = vec![0; "OK 1073741824\nhello".len()];
        host.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, b"OK 1073741824\nhello");
    }

    #[tokio::test]
    async fn guest_connections_reach_uds_path_underscore_port() {
        let dir = tempfile::tempdir().unwrap();
        let uds_path = dir.path().join("vsock.sock");
        let host = UnixListener::bind(dir.path().join("vsock.sock_1025")).unwrap();
        let device_path = guest_device_path(&dir.path().join("agent.sock"));
        let device = UnixListener::bind(&device_path).unwrap();
        tokio::spawn(serve_guest(device, uds_path));
        let mut guest = UnixStream::connect(&device_path).await.unwrap();
        guest.write_all(b"CONNECT 1025\nREADY x\n").await.unwrap();
        drop(guest);
        let (mut accepted, _) = host.accept().await.unwrap();
        let mut received = String::new();
        accepted.read_to_string(&mut received).await.unwrap();
        assert_eq!(received, "READY x\n");
    }

    #[tokio::test]
    async fn bad_line_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let vsock_path = dir.path().join("vsock.sock");
        let vsock = UnixListener::bind(&vsock_path).unwrap();
        tokio::spawn(serve(vsock, None));
        let mut host = UnixStream::connect(&vsock_path).await.unwrap();
        host.write_all(b"HELLO\n").await.unwrap();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
