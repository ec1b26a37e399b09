//! Who may talk to the daemon, and what files they may hand it.
//!
//! The socket is mode 0660 and owned by the access group, which is the first
//! fence. Because a misconfigured mode would otherwise hand root to anyone,
//! every connection is checked again with the peer's kernel-reported
//! credentials, taken once when the connection is accepted: uid and gid
//! (`SO_PEERCRED`) and supplementary groups (`SO_PEERGROUPS`), all as they
//! were when the peer connected. Root, and members of the group, are served.
//!
//! Files a peer names are read with the peer's rights ([`open_as_peer`],
//! [`as_peer`]): the daemon runs as root and must never read for a caller
//! what the caller could not read itself.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use nix::unistd::Group;

/// The peer of a connection, as the kernel reported it at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Arc<[u32]>,
}

impl Peer {
    /// The credentials of the process at the other end of the connected
    /// Unix socket `socket`.
    ///
    /// # Errors
    /// The socket is not a connected Unix socket.
    pub fn of_socket(socket: BorrowedFd<'_>) -> std::io::Result<Self> {
        let credentials =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(Self {
            uid: credentials.uid(),
            gid: credentials.gid(),
            pid: (credentials.pid() > 0).then_some(credentials.pid()),
            groups: peer_groups(socket)?.into(),
        })
    }

    /// Primary and supplementary groups.
    pub fn all_groups(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.gid).chain(self.groups.iter().copied())
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+); not every libc build exports it.
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups of the peer of `socket`, as they were when it
/// connected.
fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut length = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| std::io::Error::other("too many peer groups"))?;
        #[allow(unsafe_code)]
        // SAFETY: `groups` is a live buffer of `length` bytes; the kernel
        // writes at most that many and stores the size it needs in `length`.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &raw mut length,
            )
        };
        let count = length as usize / size_of::<libc::gid_t>();
        if result == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small; `length` says how large to make it.
        if error.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
            groups.resize(count, 0);
            continue;
        }
        return Err(error);
    }
}

/// The access policy: root, plus members of `group` if it exists.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub group_name: String,
    pub group_id: Option<u32>,
}

impl AccessPolicy {
    pub fn new(group_name: &str) -> Self {
        let group_id = Group::from_name(group_name)
            .ok()
            .flatten()
            .map(|group| group.gid.as_raw());
        Self {
            group_name: group_name.to_owned(),
            group_id,
        }
    }

    /// Whether `peer` may use the daemon: decided from the credentials taken
    /// at connect time only.
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 {
            return true;
        }
        let Some(group_id) = self.group_id else {
            return false;
        };
        peer.all_groups().any(|group| group == group_id)
    }
}

/// Runs `work` on a short-lived thread with the peer's filesystem identity
/// (fsuid, fsgid, supplementary groups), so every path it opens, stats or
/// lists is checked by the kernel exactly as if the peer had done it. The
/// daemon runs as root and must not become a way to read files the caller
/// cannot.
///
/// Credentials set with the raw syscalls are per-thread (the libc wrappers
/// would change every thread of the daemon), so the rest of the daemon keeps
/// its rights. Root peers, and a daemon not running as root, run `work` on
/// a thread unchanged.
///
/// # Errors
/// The identity could not be assumed.
pub fn as_peer<T: Send>(peer: &Peer, work: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let assume = peer.uid != 0 && nix::unistd::geteuid().is_root();
    let groups: Vec<libc::gid_t> = peer.groups.to_vec();
    let (uid, gid) = (peer.uid, peer.gid);
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if assume {
                    #[allow(unsafe_code)]
                    // SAFETY: plain syscalls with valid arguments (a live slice
                    // and its length, integer ids); they change only this
                    // thread's credentials, and the thread ends after `work`.
                    let fsuid = unsafe {
                        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::syscall(libc::SYS_setfsgid, gid);
                        libc::syscall(libc::SYS_setfsuid, uid);
                        // setfsuid returns the previous id, not an error: ask again.
                        libc::syscall(libc::SYS_setfsuid, uid)
                    };
                    if u32::try_from(fsuid).ok() != Some(uid) {
                        return Err(std::io::Error::other(
                            "could not assume the caller's identity",
                        ));
                    }
                }
                Ok(work())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "thread reading as the caller panicked",
                ))
            })
    })
}

/// Opens `path` for reading with the peer's rights (see [`as_peer`]),
/// through every symlink and directory on the way, refusing magic links
/// (`/proc/PID/fd/N`, which would reach the daemon's own descriptors).
/// Callers then work on the returned descriptor only, so swapping the path
/// afterwards changes nothing. `O_NONBLOCK` keeps a FIFO from blocking the
/// open; callers check the file type with `fstat`.
pub fn open_as_peer(peer: &Peer, path: &Path) -> std::io::Result<std::fs::File> {
    as_peer(peer, || open_no_magic_links(path))?
}

fn open_no_magic_links(path: &Path) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use std::os::fd::FromRawFd;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(libc::AT_FDCWD, path, how)?;
    #[allow(unsafe_code)]
    // SAFETY: `openat2` just returned this descriptor, owned by nobody else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: groups.into(),
        }
    }

    #[test]
    fn root_is_always_allowed() {
        let policy = AccessPolicy {
            group_name: "none".into(),
            group_id: None,
        };
        assert!(policy.allows(&peer(0, 0, &[])));
        assert!(!policy.allows(&peer(1000, 1000, &[])));
    }

    #[test]
    fn group_members_are_allowed_by_primary_or_supplementary_group() {
        let policy = AccessPolicy {
            group_name: "banger".into(),
            group_id: Some(4242),
        };
        assert!(policy.allows(&peer(1000, 4242, &[])));
        assert!(policy.allows(&peer(1000, 1000, &[27, 4242])));
        assert!(!policy.allows(&peer(1000, 4243, &[27])));
    }

    #[test]
    fn credentials_come_from_the_socket() {
        // A socketpair's peer is this process, as it was at creation.
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let own = Peer::of_socket(ours.as_fd()).unwrap();
        assert_eq!(own.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(own.gid, nix::unistd::getegid().as_raw());
        assert_eq!(own.pid, Some(i32::try_from(std::process::id()).unwrap()));
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(nix::unistd::Gid::as_raw)
            .collect();
        let mut groups = own.groups.to_vec();
        expected.sort_unstable();
        groups.sort_unstable();
        assert_eq!(groups, expected);
    }

    #[test]
    fn groups_are_the_ones_the_peer_connected_with() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED groups_are_the_ones_the_peer_connected_with: needs root");
            return;
        }
        // A thread takes uid 65534 and the sole group 4242 (raw syscalls:
        // this thread only), connects, and ends. The process as a whole,
        // and so /proc/PID/status, stays root with root's groups: the
        // decision must come from the socket.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let connector = std::thread::spawn(move || {
            let group: libc::gid_t = 4242;
            #[allow(unsafe_code)]
            // SAFETY: plain syscalls on this thread's own credentials with a
            // live one-element array.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setgroups, 1, &raw const group), 0);
                assert_eq!(
                    libc::syscall(libc::SYS_setresgid, 65_534, 65_534, 65_534),
                    0
                );
                assert_eq!(
                    libc::syscall(libc::SYS_setresuid, 65_534, 65_534, 65_534),
                    0
                );
            }
            std::os::unix::net::UnixStream::connect(&path).unwrap()
        });
        // The connection is queued before it is accepted.
        let _client = connector.join().unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let peer = Peer::of_socket(accepted.as_fd()).unwrap();
        assert_eq!((peer.uid, peer.gid), (65_534, 65_534));
        assert_eq!(&*peer.groups, &[4242]);
        let member = AccessPolicy {
            group_name: "banger".into(),
            group_id: Some(4242),
        };
        assert!(member.allows(&peer));
        // Root's own groups (what /proc reports for this process) do not count.
        let root_group = AccessPolicy {
            group_name: "root".into(),
            group_id: Some(0),
        };
        assert!(!root_group.allows(&peer));
    }

    #[test]
    fn files_open_with_the_callers_rights() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED files_open_with_the_callers_rights: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let stranger = peer(65_534, 65_534, &[]);
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = open_as_peer(&stranger, &secret).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
        // A symlink the stranger may read does not lend the target's rights.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(open_as_peer(&stranger, &link).is_err());
        // A readable file in a closed directory stays closed.
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let inner = closed.join("file");
        std::fs::write(&inner, b"y").unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_as_peer(&stranger, &inner).is_err());
        // ... also through the daemon's own descriptor of it (a magic link).
        let held = std::fs::File::open(&inner).unwrap();
        let magic = std::path::PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
        assert!(open_as_peer(&stranger, &magic).is_err());
        // What the stranger may read opens.
        let public = dir.path().join("public");
        std::fs::write(&public, b"z").unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_as_peer(&stranger, &public).is_ok());
        // Root (and the daemon's own threads afterwards) keep their rights.
        assert!(open_as_peer(&peer(0, 0, &[]), &secret).is_ok());
        assert!(std::fs::File::open(&secret).is_ok());
    }

    #[test]
    fn work_runs_with_the_callers_rights() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED work_runs_with_the_callers_rights: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let stranger = peer(65_534, 65_534, &[]);
        let listed = as_peer(&stranger, || std::fs::read_dir(dir.path()).is_ok()).unwrap();
        assert!(!listed);
        assert!(as_peer(&peer(0, 0, &[]), || std::fs::read_dir(dir.path()).is_ok()).unwrap());
    }
}
