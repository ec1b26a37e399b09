//! The host's side of the transports (the guest's is in `banger-agent`).
//!
//! - QEMU: the agent's virtio-serial port is a Unix-socket chardev on the
//!   host; connecting to that socket is the whole transport
//!   ([`crate::client::AgentClient::connect_unix`]).
//! - Firecracker: the host side of its vsock multiplexer
//!   ([`firecracker_vsock_handshake`]):
//!   1. connect to the VM's vsock Unix socket (`uds_path`);
//!   2. write `CONNECT <port>\n`;
//!   3. read `OK <host port>\n`; from then on the socket is the guest's stream.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum VsockHandshakeError {
    #[error("Vsock handshake I/O failed")]
    Io(#[from] io::Error),
    #[error("Firecracker refused the vsock connection to port {port}: {answer:?}")]
    Refused { port: u32, answer: String },
}

/// Firecracker's host-initiated vsock handshake on an already connected stream.
pub async fn firecracker_vsock_handshake<S>(
    stream: &mut S,
    port: u32,
) -> Result<(), VsockHandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    stream.flush().await?;
    // Read byte by byte: whatever follows the newline is the guest's protocol.
    let mut answer = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        answer.push(byte);
        if answer.len() > 64 {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if answer.starts_with("OK ") {
        Ok(())
    } else {
        Err(VsockHandshakeError::Refused { port, answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn firecracker_handshake_sends_connect_and_accepts_ok() {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        let fake = tokio::spawn(async move {
            let mut line = vec![0_u8; 13];
            vmm.read_exact(&mut line).await.unwrap();
            vmm.write_all(b"OK 1073741824\nrest").await.unwrap();
            (String::from_utf8(line).unwrap(), vmm)
        });
        firecracker_vsock_handshake(&mut host, 1024).await.unwrap();
        let (line, _vmm) = fake.await.unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        let mut rest = [0_u8; 4];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");

        let (mut host, mut vmm) = tokio::io::duplex(256);
        vmm.write_all(b"FAILURE\n").await.unwrap();
        assert!(matches!(
            firecracker_vsock_handshake(&mut host, 5).await,
            Err(VsockHandshakeError::Refused { port: 5, .. })
        ));
    }
}
