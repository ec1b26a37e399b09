//! The host's side of the transports (the guest's is in `banger-agent`).
//!
//! - QEMU: the agent's virtio-serial port is a Unix-socket chardev on the
//!   host; connecting to that socket is the whole transport
//!   ([`crate::client::AgentClient::connect_unix`]). The agent writes its
//!   announcement line (`READY <version>\n`) on the port the moment it
//!   opens it; [`SkipAnnouncement`] drops that line before the frames.
//! - Firecracker: the host side of its vsock multiplexer
//!   ([`firecracker_vsock_handshake`]):
//!   1. connect to the VM's vsock Unix socket (`uds_path`);
//!   2. write `CONNECT <port>\n`;
//!   3. read `OK <host port>\n`; from then on the socket is the guest's stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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

/// The longest announcement line [`SkipAnnouncement`] drops.
const MAX_ANNOUNCEMENT: usize = 64;

/// A stream whose first bytes may be the agent's announcement line
/// (`READY <version>\n`, written on the virtio-serial port the moment the
/// agent opens it): the line is dropped, everything after it passes
/// unchanged. A stream that starts with anything else (an agent that does
/// not announce: its first bytes are a frame's length, whose first byte is
/// 0 for any frame that fits the limits) passes unchanged from the start.
#[derive(Debug)]
pub struct SkipAnnouncement<S> {
    inner: S,
    /// Bytes of the line dropped so far; `None` once past it (or none came).
    dropped: Option<usize>,
}

impl<S> SkipAnnouncement<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            dropped: Some(0),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SkipAnnouncement<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some(dropped) = this.dropped else {
                return Pin::new(&mut this.inner).poll_read(context, buffer);
            };
            let start = buffer.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(context, buffer))?;
            let read = &buffer.filled()[start..];
            if read.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if dropped == 0 && read[0] != b'R' {
                this.dropped = None;
                return Poll::Ready(Ok(()));
            }
            match read.iter().position(|&byte| byte == b'\n') {
                Some(newline) => {
                    let rest = start + newline + 1;
                    let end = buffer.filled().len();
                    buffer.filled_mut().copy_within(rest..end, start);
                    buffer.set_filled(start + (end - rest));
                    this.dropped = None;
                    if end > rest {
                        return Poll::Ready(Ok(()));
                    }
                }
                None if dropped + read.len() > MAX_ANNOUNCEMENT => {
                    // Not an announcement after all: pass it on.
                    this.dropped = None;
                    return Poll::Ready(Ok(()));
                }
                None => {
                    this.dropped = Some(dropped + read.len());
                    buffer.set_filled(start);
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SkipAnnouncement<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(context, data)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_announcement_line_is_dropped_and_the_rest_kept() {
        for (input, expected) in [
            (&b"READY 0.1.0\n\0\0\0\x05rest"[..], &b"\0\0\0\x05rest"[..]),
            (&b"\0\0\0\x05frames"[..], &b"\0\0\0\x05frames"[..]),
            (&b"READY 0.1.0\n"[..], &b""[..]),
        ] {
            // One byte at a time, as a serial port may deliver it.
            let mut stream = SkipAnnouncement::new(OneByteAtATime(input));
            let mut output = Vec::new();
            stream.read_to_end(&mut output).await.unwrap();
            assert_eq!(output, expected);
        }
        let mut stream = SkipAnnouncement::new(&b"READY 1\nabc"[..]);
        let mut output = Vec::new();
        stream.read_to_end(&mut output).await.unwrap();
        assert_eq!(output, b"abc");
    }

    struct OneByteAtATime<'a>(&'a [u8]);

    impl AsyncRead for OneByteAtATime<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _context: &mut Context<'_>,
            buffer: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                buffer.put_slice(&[first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

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
