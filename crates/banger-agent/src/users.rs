//! User and group lookup from `/etc/passwd` and `/etc/group`.
//!
//! The agent is linked statically; glibc's NSS (`getpwnam`, `getgrouplist`)
//! would then `dlopen` modules named in the guest's `nsswitch.conf`, which a
//! static binary cannot do safely. banger's guests keep their users in the
//! files, so the agent reads them itself.

use std::path::PathBuf;

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
}

/// Parses `/etc/passwd` text (`name:x:uid:gid:gecos:home:shell`).
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: PathBuf::from(fields[5]),
                shell: fields[6].to_owned(),
            })
        })
        .collect()
}

/// The gids of `/etc/group` text listing `user` as a member, plus `primary`.
pub fn groups_of(group_text: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    for line in group_text.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else {
            continue;
        };
        if fields[3].split(',').any(|member| member.trim() == user) && !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    gids
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn user_by_name(name: &str) -> Option<PasswdEntry> {
    parse_passwd(&read("/etc/passwd"))
        .into_iter()
        .find(|entry| entry.name == name)
}

pub fn user_by_uid(uid: u32) -> Option<PasswdEntry> {
    parse_passwd(&read("/etc/passwd"))
        .into_iter()
        .find(|entry| entry.uid == uid)
}

/// Supplementary groups of `user` (primary group first).
pub fn groups_of_user(user: &PasswdEntry) -> Vec<u32> {
    groups_of(&read("/etc/group"), &user.name, user.gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_group_files_parse() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\ndev:x:1000:1000:Dev,,,:/home/dev:/bin/zsh\nbroken:x:notanumber:1::/:/bin/sh\n";
        let entries = parse_passwd(passwd);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1],
            PasswdEntry {
                name: "dev".into(),
                uid: 1000,
                gid: 1000,
                home: PathBuf::from("/home/dev"),
                shell: "/bin/zsh".into(),
            }
        );
        let group =
            "root:x:0:\nsudo:x:27:dev,other\ndocker:x:999:other\ndev:x:1000:\nkvm:x:108: dev\n";
        assert_eq!(groups_of(group, "dev", 1000), vec![1000, 27, 108]);
        assert_eq!(groups_of(group, "nobody", 65534), vec![65534]);
    }
}
