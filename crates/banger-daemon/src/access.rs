//! Who may talk to the daemon, and what files they may hand it.
//!
//! The socket is mode 0660 and owned by the access group, which is the first
//! fence. Because a misconfigured mode would otherwise hand root to anyone,
//! every connection is checked again with the peer's kernel-reported
//! credentials (`SO_PEERCRED`): root, and members of the group, are served.

use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

/// The peer of a connection, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
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

    /// Whether `peer` may use the daemon.
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 {
            return true;
        }
        let Some(group_id) = self.group_id else {
            return false;
        };
        peer_groups(peer).contains(&group_id)
    }
}

/// Primary and supplementary groups of the peer: from `/proc/PID/status`
/// when the process is known (what the kernel will enforce), else from the
/// group database.
pub fn peer_groups(peer: &Peer) -> Vec<u32> {
    let mut groups = vec![peer.gid];
    if let Some(pid) = peer.pid {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(line) = status.lines().find(|line| line.starts_with("Groups:")) {
                groups.extend(
                    line["Groups:".len()..]
                        .split_whitespace()
                        .filter_map(|group| group.parse::<u32>().ok()),
                );
                return groups;
            }
        }
    }
    if let Ok(Some(user)) = User::from_uid(Uid::from_raw(peer.uid)) {
        if let Ok(name) = std::ffi::CString::new(user.name) {
            if let Ok(list) = nix::unistd::getgrouplist(&name, Gid::from_raw(peer.gid)) {
                groups.extend(list.into_iter().map(Gid::as_raw));
            }
        }
    }
    groups
}

/// Opens `path` for reading with the peer's filesystem identity (fsuid,
/// fsgid, supplementary groups), so the kernel decides, through every
/// symlink and directory on the way, exactly as if the peer had opened it.
/// The daemon runs as root and must not become a way to read files the
/// caller cannot. Callers then work on the returned descriptor only, so
/// swapping the path afterwards changes nothing.
///
/// Runs on a short-lived thread: credentials set with the raw syscalls are
/// per-thread (the libc wrappers would change every thread of the daemon).
/// `O_NONBLOCK` keeps a FIFO from blocking the open; callers check the file
/// type with `fstat`.
pub fn open_as_peer(peer: &Peer, path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
    };
    if peer.uid == 0 || !nix::unistd::geteuid().is_root() {
        return open(path);
    }
    let groups: Vec<libc::gid_t> = peer_groups(peer);
    let peer = *peer;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                #[allow(unsafe_code)]
                // SAFETY: plain syscalls with valid arguments (a live slice and
                // its length, integer ids); they change only this thread's
                // credentials, and the thread ends after the open.
                let fsuid = unsafe {
                    if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::syscall(libc::SYS_setfsgid, peer.gid);
                    libc::syscall(libc::SYS_setfsuid, peer.uid);
                    // setfsuid returns the previous id, not an error: ask again.
                    libc::syscall(libc::SYS_setfsuid, peer.uid)
                };
                if u32::try_from(fsuid).ok() != Some(peer.uid) {
                    return Err(std::io::Error::other(
                        "could not assume the caller's identity",
                    ));
                }
                open(path)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("open thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_is_always_allowed() {
        let policy = AccessPolicy {
            group_name: "none".into(),
            group_id: None,
        };
        assert!(policy.allows(&Peer {
            uid: 0,
            gid: 0,
            pid: None
        }));
        assert!(!policy.allows(&Peer {
            uid: 1000,
            gid: 1000,
            pid: None
        }));
    }

    #[test]
    fn group_members_are_allowed_by_primary_group() {
        let policy = AccessPolicy {
            group_name: "banger".into(),
            group_id: Some(4242),
        };
        assert!(policy.allows(&Peer {
            uid: 1000,
            gid: 4242,
            pid: None
        }));
        assert!(!policy.allows(&Peer {
            uid: 1000,
            gid: 4243,
            pid: None
        }));
    }

    #[test]
    fn supplementary_groups_come_from_proc() {
        // This test process's own groups are what /proc reports for it.
        let own = Peer {
            uid: 1,
            gid: 999_999,
            pid: Some(i32::try_from(std::process::id()).unwrap()),
        };
        let groups = peer_groups(&own);
        assert_eq!(groups[0], 999_999);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let expected: Vec<u32> = line[7..]
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        assert_eq!(&groups[1..], expected.as_slice());
    }

    #[test]
    fn files_open_with_the_callers_rights() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED files_open_with_the_callers_rights: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let stranger = Peer {
            uid: 65_534,
            gid: 65_534,
            pid: None,
        };
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
        // What the stranger may read opens.
        let public = dir.path().join("public");
        std::fs::write(&public, b"z").unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_as_peer(&stranger, &public).is_ok());
        // Root (and the daemon's own threads afterwards) keep their rights.
        assert!(open_as_peer(
            &Peer {
                uid: 0,
                gid: 0,
                pid: None
            },
            &secret
        )
        .is_ok());
        assert!(std::fs::File::open(&secret).is_ok());
    }
}
