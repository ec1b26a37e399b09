//! What the agent reads from and writes to the guest system: the hello
//! facts, stats from `/proc`, the clock, SSH host keys and user auth files.
//! Parsers are pure functions so they are tested on fixed text.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use banger_proto::agent::{
    AuthSyncRequest, CpuTimes, GuestStats, HelloInfo, HostKey, PROTOCOL_VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Unknown user {user}")]
    UnknownUser { user: String },
    #[error("Failed to set the clock")]
    SetClock(#[source] nix::Error),
    #[error("Failed to query the root filesystem")]
    StatFilesystem(#[source] nix::Error),
}

fn read_to_string(path: &Path) -> Result<String, SystemError> {
    fs::read_to_string(path).map_err(|source| SystemError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SystemError> {
    let error = |source| SystemError::Write {
        path: path.to_owned(),
        source,
    };
    fs::write(path, contents).map_err(error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(error)
}

/// Where the agent finds the guest's files; `/` in a guest, a temp dir in tests.
#[derive(Debug, Clone)]
pub struct SystemPaths {
    pub os_release: PathBuf,
    pub proc: PathBuf,
    pub ssh_config_dir: PathBuf,
    /// The `PATH` commands run with.
    pub command_path: String,
}

impl Default for SystemPaths {
    fn default() -> Self {
        Self {
            os_release: PathBuf::from("/etc/os-release"),
            proc: PathBuf::from("/proc"),
            ssh_config_dir: PathBuf::from("/etc/ssh"),
            command_path: crate::exec::DEFAULT_PATH.to_owned(),
        }
    }
}

pub fn hello_info(paths: &SystemPaths, is_init: bool) -> HelloInfo {
    let uname = nix::sys::utsname::uname().ok();
    let field = |value: Option<&std::ffi::OsStr>| {
        value
            .map(|text| text.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    HelloInfo {
        agent_version: banger_proto::VERSION.to_owned(),
        protocol_version: PROTOCOL_VERSION,
        kernel_release: field(uname.as_ref().map(nix::sys::utsname::UtsName::release)),
        distro: fs::read_to_string(&paths.os_release)
            .map(|text| distro_name(&text))
            .unwrap_or_default(),
        hostname: field(uname.as_ref().map(nix::sys::utsname::UtsName::nodename)),
        boot_time_unix: fs::read_to_string(paths.proc.join("stat"))
            .ok()
            .and_then(|text| boot_time(&text))
            .unwrap_or(0),
        is_init,
        generation: 0,
        vm_id: None,
    }
}

/// `PRETTY_NAME`, else `NAME`, else `ID` from os-release text.
pub fn distro_name(os_release: &str) -> String {
    let value_of = |key: &str| {
        os_release.lines().find_map(|line| {
            let (name, value) = line.split_once('=')?;
            (name.trim() == key).then(|| {
                value
                    .trim()
                    .trim_matches(|c| c == '"' || c == '\'')
                    .to_owned()
            })
        })
    };
    value_of("PRETTY_NAME")
        .or_else(|| value_of("NAME"))
        .or_else(|| value_of("ID"))
        .unwrap_or_default()
}

/// `btime` from `/proc/stat`.
pub fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// The aggregate `cpu` line and the number of `cpuN` lines of `/proc/stat`.
pub fn cpu_times(proc_stat: &str) -> (CpuTimes, u32) {
    let mut total = CpuTimes::default();
    let mut count = 0;
    for line in proc_stat.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                let values: Vec<u64> = fields.map(|field| field.parse().unwrap_or(0)).collect();
                let at = |index: usize| values.get(index).copied().unwrap_or(0);
                total = CpuTimes {
                    user: at(0),
                    nice: at(1),
                    system: at(2),
                    idle: at(3),
                    iowait: at(4),
                    irq: at(5),
                    softirq: at(6),
                    steal: at(7),
                };
            }
            Some(name) if name.starts_with("cpu") => count += 1,
            _ => {}
        }
    }
    (total, count)
}

/// A `/proc/meminfo` field in bytes.
pub fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            let mut parts = rest.split_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            Some(match parts.next() {
                Some("kB") => value * 1024,
                _ => value,
            })
        })
        .unwrap_or(0)
}

/// The three load averages of `/proc/loadavg`.
pub fn load_average(loadavg: &str) -> [f64; 3] {
    let mut values = loadavg
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0.0));
    [
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
    ]
}

pub fn stats(paths: &SystemPaths) -> Result<GuestStats, SystemError> {
    let proc_stat = read_to_string(&paths.proc.join("stat"))?;
    let meminfo = read_to_string(&paths.proc.join("meminfo"))?;
    let loadavg = read_to_string(&paths.proc.join("loadavg"))?;
    let uptime = read_to_string(&paths.proc.join("uptime"))?;
    let (cpu, cpu_count) = cpu_times(&proc_stat);
    let root = nix::sys::statvfs::statvfs("/").map_err(SystemError::StatFilesystem)?;
    let fragment = root.fragment_size();
    Ok(GuestStats {
        uptime_seconds: uptime
            .split_whitespace()
            .next()
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0),
        load_average: load_average(&loadavg),
        cpu_count,
        cpu,
        memory_total_bytes: meminfo_bytes(&meminfo, "MemTotal"),
        memory_available_bytes: meminfo_bytes(&meminfo, "MemAvailable"),
        swap_total_bytes: meminfo_bytes(&meminfo, "SwapTotal"),
        swap_free_bytes: meminfo_bytes(&meminfo, "SwapFree"),
        disk_total_bytes: root.blocks() * fragment,
        disk_available_bytes: root.blocks_available() * fragment,
    })
}

/// Sets the realtime clock to the host's time; returns guest minus host before.
pub fn sync_clock(host_unix_nanos: u64) -> Result<i64, SystemError> {
    let guest = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| i128::try_from(since.as_nanos()).unwrap_or(i128::MAX))
        .unwrap_or(0);
    let offset = i64::try_from(guest - i128::from(host_unix_nanos)).unwrap_or(i64::MAX);
    let seconds = i64::try_from(host_unix_nanos / 1_000_000_000).unwrap_or(i64::MAX);
    let nanos = i64::try_from(host_unix_nanos % 1_000_000_000).unwrap_or(0);
    let spec = nix::sys::time::TimeSpec::new(seconds, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec)
        .map_err(SystemError::SetClock)?;
    Ok(offset)
}

/// The public keys `/etc/ssh/ssh_host_*_key.pub`, sorted by path.
pub fn host_keys(ssh_config_dir: &Path) -> Result<Vec<HostKey>, SystemError> {
    let entries = fs::read_dir(ssh_config_dir).map_err(|source| SystemError::Read {
        path: ssh_config_dir.to_owned(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("ssh_host_") && name.ends_with("_key.pub"))
        })
        .collect();
    paths.sort();
    let mut keys = Vec::new();
    for path in paths {
        let text = read_to_string(&path)?;
        let mut fields = text.split_whitespace();
        if let (Some(algorithm), Some(key)) = (fields.next(), fields.next()) {
            keys.push(HostKey {
                algorithm: algorithm.to_owned(),
                key: key.to_owned(),
                path: path.display().to_string(),
            });
        }
    }
    Ok(keys)
}

/// Whether a TCP socket listens on `port`: a `LISTEN` (state `0A`) line of
/// `tcp` or `tcp6` under `proc_net` whose local port is `port`. A missing
/// `tcp6` (no IPv6) counts as no sockets.
pub fn listening(proc_net: &Path, port: u16) -> Result<bool, SystemError> {
    for file in ["tcp", "tcp6"] {
        let path = proc_net.join(file);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && file == "tcp6" => {
                continue
            }
            Err(source) => return Err(SystemError::Read { path, source }),
        };
        // `sl local_address rem_address st ...`; addresses are `HEX:PORT`.
        let found = text.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local_port = fields
                .next()
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            let state = fields.nth(1);
            local_port == Some(port) && state == Some("0A")
        });
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Installs the request's keys and git identity for its user (looked up in passwd).
pub fn authsync(request: &AuthSyncRequest) -> Result<(), SystemError> {
    let user =
        crate::users::user_by_name(&request.user).ok_or_else(|| SystemError::UnknownUser {
            user: request.user.clone(),
        })?;
    install_auth(&user.home, user.uid, user.gid, request)
}

/// Writes `home/.ssh/authorized_keys` (0600, in a 0700 dir) and the `[user]`
/// section of `home/.gitconfig`, owned by `uid:gid`.
pub fn install_auth(
    home: &Path,
    uid: u32,
    gid: u32,
    request: &AuthSyncRequest,
) -> Result<(), SystemError> {
    let chown = |path: &Path| {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| SystemError::Write {
            path: path.to_owned(),
            source,
        })
    };
    let ssh_dir = home.join(".ssh");
    fs::create_dir_all(&ssh_dir).map_err(|source| SystemError::Write {
        path: ssh_dir.clone(),
        source,
    })?;
    fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
        SystemError::Write {
            path: ssh_dir.clone(),
            source,
        }
    })?;
    chown(&ssh_dir)?;
    let mut keys = String::new();
    for key in &request.authorized_keys {
        keys.push_str(key.trim());
        keys.push('\n');
    }
    let authorized_keys = ssh_dir.join("authorized_keys");
    write_file(&authorized_keys, keys.as_bytes(), 0o600)?;
    chown(&authorized_keys)?;

    if request.git_name.is_some() || request.git_email.is_some() {
        let gitconfig = home.join(".gitconfig");
        let existing = match fs::read_to_string(&gitconfig) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(SystemError::Read {
                    path: gitconfig,
                    source,
                })
            }
        };
        let updated = set_git_identity(
            &existing,
            request.git_name.as_deref(),
            request.git_email.as_deref(),
        );
        write_file(&gitconfig, updated.as_bytes(), 0o644)?;
        chown(&gitconfig)?;
    }
    Ok(())
}

/// `gitconfig` with `user.name`/`user.email` set, other lines kept.
pub fn set_git_identity(gitconfig: &str, name: Option<&str>, email: Option<&str>) -> String {
    let wanted: Vec<(&str, &str)> = [("name", name), ("email", email)]
        .into_iter()
        .filter_map(|(key, value)| value.map(|value| (key, value)))
        .collect();
    let quote = |value: &str| format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = Vec::new();
    let mut in_user = false;
    let mut seen_user = false;
    let mut written: Vec<&str> = Vec::new();
    let flush = |out: &mut Vec<String>, written: &mut Vec<&str>| {
        for (key, value) in &wanted {
            if !written.contains(key) {
                out.push(format!("\t{key} = {}", quote(value)));
                written.push(key);
            }
        }
    };
    for line in gitconfig.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_user {
                flush(&mut out, &mut written);
            }
            in_user = trimmed
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim()
                .eq_ignore_ascii_case("user");
            seen_user |= in_user;
            out.push(line.to_owned());
            continue;
        }
        if in_user {
            let key = trimmed
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if let Some((key, value)) = wanted.iter().find(|(wanted_key, _)| *wanted_key == key) {
                out.push(format!("\t{key} = {}", quote(value)));
                written.push(key);
                continue;
            }
        }
        out.push(line.to_owned());
    }
    if in_user {
        flush(&mut out, &mut written);
    }
    if !seen_user && !wanted.is_empty() {
        out.push("[user]".to_owned());
        flush(&mut out, &mut written);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distro_prefers_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(distro_name(text), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(distro_name("ID=alpine\n"), "alpine");
        assert_eq!(distro_name(""), "");
    }

    #[test]
    fn proc_parsers_read_fixed_text() {
        let stat = "cpu  10 2 30 400 5 6 7 8 0 0\ncpu0 5 1 15 200 2 3 3 4 0 0\ncpu1 5 1 15 200 3 3 4 4 0 0\nintr 1\nbtime 1700000000\n";
        let (cpu, count) = cpu_times(stat);
        assert_eq!(count, 2);
        assert_eq!(cpu.user, 10);
        assert_eq!(cpu.idle, 400);
        assert_eq!(cpu.steal, 8);
        assert_eq!(boot_time(stat), Some(1_700_000_000));
        let meminfo = "MemTotal:        2048 kB\nMemFree:  1 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(meminfo_bytes(meminfo, "MemTotal"), 2048 * 1024);
        assert_eq!(meminfo_bytes(meminfo, "MemAvailable"), 1024 * 1024);
        assert_eq!(meminfo_bytes(meminfo, "Mem"), 0);
        assert_eq!(load_average("0.50 1.25 2.00 1/100 42\n"), [0.5, 1.25, 2.0]);
    }

    #[test]
    fn git_identity_replaces_or_adds_the_user_section() {
        let added = set_git_identity(
            "[core]\n\teditor = vi\n",
            Some("Ada"),
            Some("ada@example.org"),
        );
        assert_eq!(
            added,
            "[core]\n\teditor = vi\n[user]\n\tname = \"Ada\"\n\temail = \"ada@example.org\"\n"
        );
        let replaced = set_git_identity(
            "[user]\n\tname = Old\n\tsigningkey = K\n[core]\n\teditor = vi\n",
            Some("New"),
            Some("new@example.org"),
        );
        assert_eq!(
            replaced,
            "[user]\n\tname = \"New\"\n\tsigningkey = K\n\temail = \"new@example.org\"\n[core]\n\teditor = vi\n"
        );
        assert_eq!(set_git_identity("", None, None), "\n");
    }

    #[test]
    fn install_auth_writes_keys_and_identity() {
        let home = tempfile::tempdir().unwrap();
        let request = AuthSyncRequest {
            user: "me".into(),
            authorized_keys: vec!["ssh-ed25519 AAAA one".into(), "ssh-rsa BBBB two\n".into()],
            git_name: Some("Ada".into()),
            git_email: Some("ada@example.org".into()),
        };
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        install_auth(home.path(), uid, gid, &request).unwrap();
        let keys = home.path().join(".ssh/authorized_keys");
        assert_eq!(
            fs::read_to_string(&keys).unwrap(),
            "ssh-ed25519 AAAA one\nssh-rsa BBBB two\n"
        );
        assert_eq!(
            fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(home.path().join(".ssh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let gitconfig = fs::read_to_string(home.path().join(".gitconfig")).unwrap();
        assert!(gitconfig.contains("name = \"Ada\""));
        assert!(gitconfig.contains("email = \"ada@example.org\""));
    }

    #[test]
    fn a_port_listens_when_tcp_or_tcp6_has_a_listen_line_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        // Port 22 connected (01), port 8080 (1F90) listening.
        std::fs::write(
            dir.path().join("tcp"),
            format!("{header}   0: 0100007F:0016 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2\n"),
        )
        .unwrap();
        assert!(!listening(dir.path(), 22).unwrap());
        assert!(listening(dir.path(), 8080).unwrap());
        std::fs::write(
            dir.path().join("tcp6"),
            format!("{header}   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3\n"),
        )
        .unwrap();
        assert!(listening(dir.path(), 22).unwrap());

        // The real table: a listener of this process is seen.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening(Path::new("/proc/net"), port).unwrap());
        drop(listener);
        assert!(!listening(Path::new("/proc/net"), port).unwrap());
    }

    #[test]
    fn host_keys_are_read_from_pub_files_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAC3 root@guest\n",
        )
        .unwrap();
        fs::write(dir.path().join("ssh_host_ed25519_key"), "PRIVATE").unwrap();
        fs::write(
            dir.path().join("ssh_host_rsa_key.pub"),
            "ssh-rsa AAAAB3 root@guest\n",
        )
        .unwrap();
        let keys = host_keys(dir.path()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert_eq!(keys[0].key, "AAAAC3");
        assert_eq!(keys[1].algorithm, "ssh-rsa");
    }
}
