//! A restored guest becomes the VM it was restored as
//! ([`banger_proto::agent::Operation::Identity`]).
//!
//! A snapshot's memory holds its source's hostname, address, MAC, clock
//! and random pool. The host hands the agent the new VM's identity once it
//! reaches the agent of a restored VM; the agent, in a guest:
//! 1. sets the hostname from `banger.name=`;
//! 2. moves the network to `banger.net=`: the interface (the restored NIC
//!    keeps its source's MAC, so it is found by name, not by MAC) gets the
//!    new MAC, its old IPv4 addresses go, the new address and default route
//!    are set, `/etc/resolv.conf` is rewritten;
//! 3. sets the clock from the host;
//! 4. mixes the host's random bytes into the pool and credits them
//!    (`RNDADDENTROPY`);
//! 5. with `regen_host_keys`, replaces the SSH host keys and has a running
//!    sshd load them ([`crate::host_keys`]); without it the keys are kept
//!    and every copy of a snapshot answers with its source's keys.
//!
//! In host test mode nothing else is changed; the identity is recorded
//! (and reported in the next `hello`), and host keys are replaced only in
//! an `--ssh-config-dir` other than the host's own `/etc/ssh`.

use std::path::Path;

use banger_net::cmdline::GuestNetwork;
use banger_proto::agent::IdentityRequest;

use crate::{init, network, system};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("The identity's kernel command line has no valid banger.name=")]
    NoHostname,
    #[error("Failed to set the hostname to {hostname}")]
    SetHostname {
        hostname: String,
        #[source]
        source: nix::Error,
    },
    #[error("Invalid network in the identity")]
    Network(#[source] network::NetworkError),
    #[error(transparent)]
    Clock(#[from] system::SystemError),
    #[error("Failed to add the host's entropy to the random pool")]
    Entropy(#[source] std::io::Error),
    #[error("Failed to replace the SSH host keys")]
    HostKeys(#[from] crate::host_keys::HostKeyError),
}

/// Applies `request` to the guest (see the module docs), whose SSH host
/// keys are in `ssh_dir`; returns what it changed.
pub async fn apply(
    request: &IdentityRequest,
    ssh_dir: &Path,
) -> Result<Vec<String>, IdentityError> {
    let mut applied = Vec::new();
    let hostname = init::parse_cmdline(&request.cmdline)
        .hostname
        .ok_or(IdentityError::NoHostname)?;
    nix::unistd::sethostname(&hostname).map_err(|source| IdentityError::SetHostname {
        hostname: hostname.clone(),
        source,
    })?;
    applied.push("hostname".to_owned());
    let guest_network = GuestNetwork::from_kernel_cmdline(&request.cmdline)
        .map_err(|error| IdentityError::Network(network::NetworkError::Parse(error)))?;
    if let Some(guest_network) = guest_network {
        network::move_to(
            &guest_network,
            Path::new("/sys/class/net"),
            Path::new("/etc/resolv.conf"),
        )
        .await
        .map_err(IdentityError::Network)?;
        applied.push("network".to_owned());
    }
    system::sync_clock(request.unix_nanos)?;
    applied.push("clock".to_owned());
    if !request.entropy.is_empty() {
        add_entropy(&request.entropy).map_err(IdentityError::Entropy)?;
        applied.push("entropy".to_owned());
    }
    if request.regen_host_keys {
        let pid_files: Vec<std::path::PathBuf> = crate::host_keys::SSHD_PID_FILES
            .iter()
            .map(std::path::PathBuf::from)
            .collect();
        applied.push(regenerate_host_keys(ssh_dir, &hostname, &pid_files).await?);
    }
    Ok(applied)
}

/// Step 5: new host keys in `ssh_dir`, loaded by the sshd one of
/// `sshd_pid_files` names if it runs; returns what it did, for the
/// applied list.
pub async fn regenerate_host_keys(
    ssh_dir: &Path,
    hostname: &str,
    sshd_pid_files: &[std::path::PathBuf],
) -> Result<String, IdentityError> {
    let types = crate::host_keys::regenerate(ssh_dir, &format!("root@{hostname}")).await?;
    let reloaded = crate::host_keys::reload_sshd(sshd_pid_files, Path::new("/proc"))?;
    Ok(format!(
        "host keys ({}{})",
        types.join(", "),
        if reloaded { "; sshd reloaded" } else { "" }
    ))
}

nix::ioctl_write_ptr!(rnd_add_entropy, b'R', 0x03, [libc::c_int; 2]);

/// Mixes `bytes` into the kernel's random pool and credits them as entropy
/// (`RNDADDENTROPY` on `/dev/urandom`; root only).
pub fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    let size = libc::c_int::try_from(bytes.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // `struct rand_pool_info`: entropy_count (bits), buf_size (bytes), buf.
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&size.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the buffer aligned for the kernel's int fields.
    let mut words = vec![0_u32; info.len().div_ceil(4)];
    for (word, chunk) in words.iter_mut().zip(info.chunks(4)) {
        let mut bytes = [0_u8; 4];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(bytes);
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    use std::os::fd::AsRawFd;
    // SAFETY: `words` holds a whole `rand_pool_info` (two ints, then
    // `buf_size` bytes) and lives across the call; the kernel only reads it.
    #[allow(unsafe_code)]
    unsafe { rnd_add_entropy(random.as_raw_fd(), words.as_ptr().cast()) }
        .map(drop)
        .map_err(std::io::Error::from)
}
