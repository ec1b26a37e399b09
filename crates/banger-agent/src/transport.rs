//! The guest's byte streams the protocol runs over (the host's side is in
//! `banger_agent_proto::transport`).
//!
//! - [`FdStream`]: any pollable fd (an accepted AF_VSOCK socket, a
//!   virtio-serial char device, a pty master) as `AsyncRead + AsyncWrite`.
//! - [`VsockListener`]: the guest's AF_VSOCK listener (`VMADDR_CID_ANY`).
//! - [`open_serial`]: the guest's virtio-serial port.
//! - [`open_serial_port`] and [`announce_serial`], [`announce_vsock`], [`announce_unix`]: the agent tells the host it
//!   serves (docs/agent-protocol.md, "Readiness").

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A non-blocking fd driven by the tokio reactor.
#[derive(Debug)]
pub struct FdStream {
    inner: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        // SAFETY: `fd` is an owned, open fd; the `AsyncFd` owns it from here
        // on, so it stays valid and is the same fd until deregistered and closed.
        #[allow(unsafe_code)]
        let inner = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { inner })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.inner.poll_read_ready(context))?;
            let unfilled = buffer.initialize_unfilled();
            match guard.try_io(|inner| {
                nix::unistd::read(inner.as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(read)) => {
                    buffer.advance(read);
                    return Poll::Ready(Ok(()));
                }
                // A pty master reports EIO once every slave fd is closed: that is its end of stream.
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.inner.poll_write_ready(context))?;
            match guard
                .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A listening AF_VSOCK socket (any CID), accepted on the tokio reactor.
#[derive(Debug)]
pub struct VsockListener {
    inner: AsyncFd<OwnedFd>,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
        };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .map_err(io::Error::from)?;
        listen(&fd, Backlog::new(16).map_err(io::Error::from)?).map_err(io::Error::from)?;
        // SAFETY: `fd` is an owned, open socket that the `AsyncFd` owns from here on.
        #[allow(unsafe_code)]
        let inner = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { inner })
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.inner.readable().await?;
            let accepted = guard.try_io(|inner| {
                nix::sys::socket::accept4(
                    inner.as_raw_fd(),
                    nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            if let Ok(accepted) = accepted {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                #[allow(unsafe_code)]
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(accepted?) };
                return FdStream::new(fd);
            }
        }
    }
}

/// The device of the virtio-serial port named `name`, under `root` (`/` in
/// a guest): udev's `/dev/virtio-ports/NAME` link, else the `vportNpM` whose
/// `/sys/class/virtio-ports/vportNpM/name` is `name` (no udev, e.g. when
/// the agent is init).
#[must_use]
pub fn find_serial_port(root: &Path, name: &str) -> Option<std::path::PathBuf> {
    let link = root.join("dev/virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    let mut ports: Vec<_> = std::fs::read_dir(root.join("sys/class/virtio-ports"))
        .ok()?
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    ports.sort();
    ports.into_iter().find_map(|port| {
        let port_name =
            std::fs::read_to_string(root.join("sys/class/virtio-ports").join(&port).join("name"))
                .ok()?;
        let device = root.join("dev").join(&port);
        (port_name.trim_end_matches('\n') == name && device.exists()).then_some(device)
    })
}

/// Whether the guest has a virtio console device (virtio device id 3), so a
/// named port may still be on its way.
#[must_use]
pub fn has_virtio_console(root: &Path) -> bool {
    std::fs::read_dir(root.join("sys/bus/virtio/devices"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            std::fs::read_to_string(entry.path().join("device"))
                .is_ok_and(|id| id.trim() == "0x0003")
        })
}

/// Opens a virtio-serial port (e.g. `/dev/virtio-ports/banger.agent`).
pub fn open_serial(path: &Path) -> io::Result<FdStream> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    FdStream::new(OwnedFd::from(file))
}

/// The line the agent writes when it announces itself.
#[must_use]
pub fn announcement() -> String {
    format!("READY {}\n", env!("CARGO_PKG_VERSION"))
}

/// Opens a virtio-serial port for [`announce_serial`] (blocking mode).
pub fn open_serial_port(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

/// Announces the agent on an open virtio-serial port: switches it to
/// blocking mode and writes [`announcement`], which waits until a host end
/// is connected (the kernel holds a writer while the host end is closed).
/// The port stays open between hosts: a host that goes away shows as the
/// end of a connection's stream (read EOF, `POLLHUP`), and the next one is
/// announced to on the same fd, so bytes a new host sends before the agent
/// noticed are not thrown away by a close.
pub fn announce_serial(port: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(port.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(port.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    let mut written = 0;
    let line = announcement();
    while written < line.len() {
        match nix::unistd::write(port, &line.as_bytes()[written..]) {
            Ok(count) => written += count,
            Err(nix::errno::Errno::EINTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Announces the agent to the host: connects to host CID 2, `port` (on
/// Firecracker the VMM forwards this to the host's `<uds_path>_<port>`),
/// writes [`announcement`] and closes. Blocking.
pub fn announce_vsock(port: u32) -> io::Result<()> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_HOST, port))
        .map_err(io::Error::from)?;
    let mut stream = std::fs::File::from(fd);
    std::io::Write::write_all(&mut stream, announcement().as_bytes())
}

/// [`announce_vsock`] in host test mode: `path` is the Unix socket that
/// stands for the guest's vsock device (fake-firecracker's), which takes
/// `CONNECT <port>\n` first and then forwards the stream as a guest
/// connection to host port `port`.
pub fn announce_unix(path: &Path, port: u32) -> io::Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    std::io::Write::write_all(
        &mut stream,
        format!("CONNECT {port}\n{}", announcement()).as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_port_is_found_by_its_sysfs_name() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        assert_eq!(find_serial_port(root, "banger.agent"), None);
        for (port, name) in [
            ("vport0p0", ""),
            ("vport0p1", "banger.agent\n"),
            ("vport1p1", "other\n"),
        ] {
            let directory = root.join("sys/class/virtio-ports").join(port);
            std::fs::create_dir_all(&directory).unwrap();
            std::fs::write(directory.join("name"), name).unwrap();
        }
        std::fs::create_dir_all(root.join("dev")).unwrap();
        // The sysfs entry alone is not enough: the device node must exist.
        assert_eq!(find_serial_port(root, "banger.agent"), None);
        std::fs::write(root.join("dev/vport0p1"), "").unwrap();
        assert_eq!(
            find_serial_port(root, "banger.agent"),
            Some(root.join("dev/vport0p1"))
        );
        std::fs::create_dir_all(root.join("dev/virtio-ports")).unwrap();
        std::fs::write(root.join("dev/virtio-ports/banger.agent"), "").unwrap();
        assert_eq!(
            find_serial_port(root, "banger.agent"),
            Some(root.join("dev/virtio-ports/banger.agent"))
        );

        assert!(!has_virtio_console(root));
        let device = root.join("sys/bus/virtio/devices/virtio2");
        std::fs::create_dir_all(&device).unwrap();
        std::fs::write(device.join("device"), "0x0003\n").unwrap();
        assert!(has_virtio_console(root));
    }
}
