//! Command-line arguments of `banger-agent`.

use std::path::PathBuf;

use banger_proto::agent::{DEFAULT_VSOCK_PORT, SERIAL_PORT_NAME};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "banger-agent", version, about = "banger's guest agent")]
pub struct Args {
    /// Serve on this Unix socket (host test mode: no init duties).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["vsock_port", "serial"])]
    pub listen_unix: Option<PathBuf>,
    /// Listen on this AF_VSOCK port (Firecracker).
    #[arg(long, value_name = "PORT", conflicts_with = "serial")]
    pub vsock_port: Option<u32>,
    /// Serve on this virtio-serial port (QEMU).
    #[arg(long, value_name = "DEVICE")]
    pub serial: Option<PathBuf>,
    /// Where the SSH host keys are.
    #[arg(long, value_name = "DIR", default_value = "/etc/ssh")]
    pub ssh_config_dir: PathBuf,
}

/// Where the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Vsock(u32),
    Serial(PathBuf),
}

impl Args {
    /// The chosen transport; without a flag, the virtio-serial port if the
    /// guest has one, else vsock on the default port.
    pub fn listen(&self) -> Listen {
        if let Some(path) = &self.listen_unix {
            return Listen::Unix(path.clone());
        }
        if let Some(port) = self.vsock_port {
            return Listen::Vsock(port);
        }
        if let Some(path) = &self.serial {
            return Listen::Serial(path.clone());
        }
        let serial = PathBuf::from("/dev/virtio-ports").join(SERIAL_PORT_NAME);
        if serial.exists() {
            Listen::Serial(serial)
        } else {
            Listen::Vsock(DEFAULT_VSOCK_PORT)
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
}
