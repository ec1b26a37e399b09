//! Who may talk to the daemon, and what files they may hand it.
//!
//! The socket is mode 0660 and owned by the access group, which is the first
//! fence. Because a misconfigured mode would otherwise hand root to anyone,
//! every connection is checked again with the peer's kernel-reported
//! credentials (`SO_PEERCRED`): root, and members of the group, are served.

use std::os::unix::fs::MetadataExt;
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

/// Whether `peer` could read `path` itself: the daemon runs as root and must
/// not become a way to read files the caller cannot.
pub fn peer_can_read(peer: &Peer, path: &Path) -> std::io::Result<bool> {
    if peer.uid == 0 {
        return Ok(true);
    }
    let groups = peer_groups(peer);
    // Every directory on the way must be searchable.
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for directory in ancestors {
        if directory.as_os_str().is_empty() {
            continue;
        }
        let metadata = std::fs::metadata(directory)?;
        if !permits(&metadata, peer.uid, &groups, 0o1) {
            return Ok(false);
        }
    }
    let metadata = std::fs::metadata(path)?;
    Ok(permits(&metadata, peer.uid, &groups, 0o4))
}

fn permits(metadata: &std::fs::Metadata, uid: u32, groups: &[u32], bit: u32) -> bool {
    let mode = metadata.mode();
    if metadata.uid() == uid {
        mode & (bit << 6) != 0
    } else if groups.contains(&metadata.gid()) {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
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
    fn file_readability_follows_mode_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"x").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let stranger = Peer {
            uid: 65_534,
            gid: 65_534,
            pid: None,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let owner = std::fs::metadata(&path).unwrap().uid();
        if owner == stranger.uid {
            eprintln!("skipping: test runs as the stranger uid");
            return;
        }
        assert!(!peer_can_read(&stranger, &path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(peer_can_read(&stranger, &path).unwrap());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!peer_can_read(&stranger, &path).unwrap());
    }
}
