//! New SSH host keys for a restored guest (`--regen-host-keys`).
//!
//! A snapshot's copies share its disk, and so its `/etc/ssh/ssh_host_*`
//! keys: anyone holding one copy's private key could pose as every other.
//! On request the agent replaces them:
//! 1. for every key type the directory holds (`ssh_host_TYPE_key`; the
//!    `ssh-keygen -A` set, rsa, ecdsa and ed25519, when it holds none) a new
//!    pair is made with `ssh-keygen` beside the old one and renamed over it,
//!    so a failure leaves the old keys, never none; certificates
//!    (`*-cert.pub`) of the old keys are removed;
//! 2. a running sshd (its pid file names it, and `/proc` says it is `sshd`)
//!    gets `SIGHUP`, on which it re-executes itself and loads the new keys
//!    (what `systemctl reload ssh` does).
//!
//! The host learns the new keys as it learns any: `vm ssh` asks the agent
//! for them and pins them under the VM's own name.

use std::path::{Path, PathBuf};

/// Key types made when the directory holds none (those of `ssh-keygen -A`).
const DEFAULT_TYPES: &[&str] = &["rsa", "ecdsa", "ed25519"];
/// Types `ssh-keygen -t` accepts for host keys.
const KNOWN_TYPES: &[&str] = &["rsa", "ecdsa", "ed25519", "dsa"];
/// Where sshd records its listener's pid (`PidFile`).
pub const SSHD_PID_FILES: &[&str] = &["/run/sshd.pid", "/var/run/sshd.pid"];

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("Failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to run ssh-keygen (is openssh-client installed in the image?)")]
    Spawn(#[source] std::io::Error),
    #[error("ssh-keygen failed to make a {key_type} host key: {stderr}")]
    Keygen { key_type: String, stderr: String },
    #[error("Failed to replace {path}")]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to signal sshd (pid {pid}) to load its new host keys")]
    Reload {
        pid: i32,
        #[source]
        source: nix::Error,
    },
}

/// The key types of the `ssh_host_TYPE_key` (or `.pub`) files in `dir`, sorted.
fn key_types(dir: &Path) -> Result<Vec<String>, HostKeyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| HostKeyError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut types: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let name = name.strip_suffix(".pub").unwrap_or(&name);
            let key_type = name.strip_prefix("ssh_host_")?.strip_suffix("_key")?;
            KNOWN_TYPES.contains(&key_type).then(|| key_type.to_owned())
        })
        .collect();
    types.sort();
    types.dedup();
    Ok(types)
}

/// Replaces the host keys in `dir` (step 1 of the module docs); returns
/// the types made.
pub async fn regenerate(dir: &Path, comment: &str) -> Result<Vec<String>, HostKeyError> {
    let mut types = key_types(dir)?;
    if types.is_empty() {
        types = DEFAULT_TYPES.iter().map(|&t| t.to_owned()).collect();
    }
    for key_type in &types {
        let key = dir.join(format!("ssh_host_{key_type}_key"));
        let fresh = dir.join(format!(".ssh_host_{key_type}_key.new"));
        let fresh_pub = with_suffix(&fresh, ".pub");
        for stale in [&fresh, &fresh_pub] {
            remove_if_present(stale)?;
        }
        let output = tokio::process::Command::new("ssh-keygen")
            .args(["-q", "-t", key_type, "-N", "", "-C", comment, "-f"])
            .arg(&fresh)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(HostKeyError::Spawn)?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&fresh);
            let _ = std::fs::remove_file(&fresh_pub);
            return Err(HostKeyError::Keygen {
                key_type: key_type.clone(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        // The private key last: a reader that sees it also sees its public half.
        rename(&fresh_pub, &with_suffix(&key, ".pub"))?;
        rename(&fresh, &key)?;
        remove_if_present(&with_suffix(&key, "-cert.pub"))?;
    }
    Ok(types)
}

/// Sends `SIGHUP` to the sshd a pid file in `pid_files` names, if it runs
/// (`/proc/PID/comm` under `proc` says `sshd`); says whether one did.
pub fn reload_sshd(pid_files: &[PathBuf], proc: &Path) -> Result<bool, HostKeyError> {
    for pid_file in pid_files {
        let Ok(text) = std::fs::read_to_string(pid_file) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            continue;
        };
        if pid <= 1 {
            continue;
        }
        let comm =
            std::fs::read_to_string(proc.join(pid.to_string()).join("comm")).unwrap_or_default();
        if comm.trim() != "sshd" {
            continue;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|source| HostKeyError::Reload { pid, source })?;
        return Ok(true);
    }
    Ok(false)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn rename(from: &Path, to: &Path) -> Result<(), HostKeyError> {
    std::fs::rename(from, to).map_err(|source| HostKeyError::Replace {
        path: to.to_owned(),
        source,
    })
}

fn remove_if_present(path: &Path) -> Result<(), HostKeyError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(HostKeyError::Replace {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn keygen(dir: &Path, key_type: &str) {
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", key_type, "-N", "", "-f"])
            .arg(dir.join(format!("ssh_host_{key_type}_key")))
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn fingerprint(path: &Path) -> String {
        let output = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    fn have_keygen() -> bool {
        let found = std::process::Command::new("ssh-keygen")
            .arg("-?")
            .output()
            .is_ok();
        if !found {
            eprintln!("skipped: ssh-keygen is not installed");
        }
        found
    }

    #[tokio::test]
    async fn host_keys_are_replaced_by_new_ones_of_the_same_types() {
        if !have_keygen() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("etc/ssh");
        std::fs::create_dir_all(&dir).unwrap();
        keygen(&dir, "ed25519");
        keygen(&dir, "ecdsa");
        std::fs::write(dir.join("ssh_host_ed25519_key-cert.pub"), "old cert").unwrap();
        std::fs::write(dir.join("sshd_config"), "Port 22\n").unwrap();
        let before: Vec<String> = ["ed25519", "ecdsa"]
            .iter()
            .map(|t| fingerprint(&dir.join(format!("ssh_host_{t}_key.pub"))))
            .collect();

        let types = regenerate(&dir, "root@copy").await.unwrap();
        assert_eq!(types, ["ecdsa", "ed25519"]);
        for (key_type, old) in ["ed25519", "ecdsa"].iter().zip(&before) {
            let key = dir.join(format!("ssh_host_{key_type}_key"));
            let new = fingerprint(&with_suffix(&key, ".pub"));
            assert_ne!(&new, old, "{key_type} key was replaced");
            assert!(new.contains("root@copy"), "{new}");
            // The private half matches the public one and is private.
            assert_eq!(fingerprint(&key), new);
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ssh_host_ecdsa_key",
                "ssh_host_ecdsa_key.pub",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
                "sshd_config",
            ],
            "no temporary files, no stale certificate, nothing else touched"
        );
    }

    #[tokio::test]
    async fn a_directory_without_keys_gets_the_default_set() {
        if !have_keygen() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let types = regenerate(dir.path(), "root@copy").await.unwrap();
        assert_eq!(types, DEFAULT_TYPES);
        for key_type in DEFAULT_TYPES {
            assert!(dir
                .path()
                .join(format!("ssh_host_{key_type}_key.pub"))
                .is_file());
        }
    }

    #[test]
    fn only_a_running_sshd_named_by_its_pid_file_is_signalled() {
        let dir = tempfile::tempdir().unwrap();
        // A process whose name is `sshd`: `sleep` under that name.
        let sshd = dir.path().join("sshd");
        std::fs::copy("/bin/sleep", &sshd).unwrap();
        // SIGHUP at its default action even when the test runs under
        // `nohup` (an ignored signal stays ignored across exec).
        let mut child = {
            use std::os::unix::process::CommandExt;
            let mut command = std::process::Command::new(&sshd);
            command.arg("30");
            // SAFETY: only async-signal-safe `signal` between fork and exec.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(|| {
                    libc::signal(libc::SIGHUP, libc::SIG_DFL);
                    Ok(())
                });
            }
            command.spawn().unwrap()
        };
        let pid_file = dir.path().join("sshd.pid");
        let missing = dir.path().join("missing.pid");
        // A pid file naming a process that is not sshd is ignored.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&pid_file, format!("{}\n", other.id())).unwrap();
        assert!(!reload_sshd(&[missing.clone(), pid_file.clone()], Path::new("/proc")).unwrap());
        assert!(other.try_wait().unwrap().is_none(), "not signalled");

        std::fs::write(&pid_file, format!("{}\n", child.id())).unwrap();
        assert!(reload_sshd(&[missing, pid_file], Path::new("/proc")).unwrap());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGHUP));
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
