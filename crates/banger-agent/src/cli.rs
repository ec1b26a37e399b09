//! Command-line arguments of `banger-agent`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_proto::agent::{DEFAULT_VSOCK_PORT, SERIAL_PORT_NAME};
use clap::Parser;

use crate::transport;

#[derive(Debug, Parser)]
#[command(name = "banger-agent", version, about = "banger's guest agent")]
pub struct Args {
    /// Serve on this Unix socket (host test mode: no init duties).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["vsock_port", "serial"])]
    pub listen_unix: Option<PathBuf>,
    /// Host test mode: announce readiness through this Unix socket, which
    /// stands for the guest's vsock device (fake-firecracker's).
    #[arg(long, value_name = "PATH", requires = "listen_unix")]
    pub announce_unix: Option<PathBuf>,
    /// Listen on this AF_VSOCK port (Firecracker).
    #[arg(long, value_name = "PORT", conflicts_with = "serial")]
    pub vsock_port: Option<u32>,
    /// Serve on this virtio-serial port (QEMU).
    #[arg(long, value_name = "DEVICE")]
    pub serial: Option<PathBuf>,
    /// Where the SSH host keys are.
    #[arg(long, value_name = "DIR", default_value = "/etc/ssh")]
    pub ssh_config_dir: PathBuf,
    /// The `PATH` commands run with (host test mode: a directory of stand-in
    /// guest programs first).
    #[arg(long, value_name = "PATH", hide = true, requires = "listen_unix")]
    pub command_path: Option<String>,
    /// Set by the agent itself when it re-executes after leaving the initramfs.
    #[arg(long, hide = true)]
    pub from_initramfs: bool,
}

/// Where the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Vsock(u32),
    Serial(PathBuf),
}

impl Args {
    /// The chosen transport; without a flag, the virtio-serial port
    /// `banger.agent` if the guest has one, else vsock on the default port.
    pub fn listen(&self) -> Listen {
        self.listen_in(Path::new("/"), Duration::ZERO)
    }

    /// [`Self::listen`] for a guest whose root is `root`; when the guest has
    /// a virtio console whose port is not there yet (the driver is still
    /// probing), waits up to `wait` for it.
    pub fn listen_in(&self, root: &Path, wait: Duration) -> Listen {
        if let Some(path) = &self.listen_unix {
            return Listen::Unix(path.clone());
        }
        if let Some(port) = self.vsock_port {
            return Listen::Vsock(port);
        }
        if let Some(path) = &self.serial {
            return Listen::Serial(path.clone());
        }
        let deadline = Instant::now() + wait;
        loop {
            if let Some(port) = transport::find_serial_port(root, SERIAL_PORT_NAME) {
                return Listen::Serial(port);
            }
            if Instant::now() >= deadline || !transport::has_virtio_console(root) {
                return Listen::Vsock(DEFAULT_VSOCK_PORT);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_pick_the_transport() {
        let args = Args::parse_from(["banger-agent", "--listen-unix", "/tmp/a.sock"]);
        assert_eq!(args.listen(), Listen::Unix("/tmp/a.sock".into()));
        let args = Args::parse_from(["banger-agent", "--vsock-port", "52"]);
        assert_eq!(args.listen(), Listen::Vsock(52));
        assert!(
            Args::try_parse_from(["banger-agent", "--vsock-port", "52", "--serial", "/dev/x"])
                .is_err()
        );
    }

    #[test]
    fn without_flags_the_named_port_wins_over_vsock() {
        let root = tempfile::tempdir().unwrap();
        let args = Args::parse_from(["banger-agent"]);
        assert_eq!(
            args.listen_in(root.path(), Duration::from_secs(5)),
            Listen::Vsock(DEFAULT_VSOCK_PORT),
            "no virtio console: no wait, vsock"
        );
        let port = root.path().join("sys/class/virtio-ports/vport0p1");
        std::fs::create_dir_all(&port).unwrap();
        std::fs::write(port.join("name"), "banger.agent\n").unwrap();
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/vport0p1"), "").unwrap();
        assert_eq!(
            args.listen_in(root.path(), Duration::ZERO),
            Listen::Serial(root.path().join("dev/vport0p1"))
        );
    }
}
