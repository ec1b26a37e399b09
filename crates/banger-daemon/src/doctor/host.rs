//! Checks of the host outside banger: `/dev/kvm`, the tools banger runs,
//! the access group; and finding and running host programs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::status::{Check, CheckStatus};

use super::{check, Doctor};

impl Doctor<'_> {
    pub(super) fn access_group(&self) -> Check {
        match self.access.group_id {
            Some(gid) => check(
                "access group",
                CheckStatus::Ok,
                format!(
                    "root and members of `{}` (gid {gid}) may use the socket",
                    self.access.group_name
                ),
                None,
            ),
            None => check(
                "access group",
                CheckStatus::Warn,
                format!(
                    "group `{}` does not exist: only root can use banger",
                    self.access.group_name
                ),
                Some(&format!(
                    "`groupadd {}` and add users to it",
                    self.access.group_name
                )),
            ),
        }
    }
}

pub(super) fn kvm() -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => check(
            "kvm",
            CheckStatus::Ok,
            "/dev/kvm is accessible".to_owned(),
            None,
        ),
        Err(error) => check(
            "kvm",
            CheckStatus::Fail,
            format!("cannot open /dev/kvm: {error}"),
            Some("enable virtualization in firmware and load kvm_intel or kvm_amd"),
        ),
    }
}

pub(super) fn tool(name: &str, install: &str) -> Check {
    match find_executable(Path::new(name)) {
        Some(path) => check(name, CheckStatus::Ok, path.display().to_string(), None),
        None => check(
            name,
            CheckStatus::Warn,
            format!("{name} not found in PATH"),
            Some(install),
        ),
    }
}

/// `binary` itself if it has a slash, else the first match in `PATH`.
pub fn find_executable(binary: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 {
        return is_executable(binary).then(|| binary.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

/// `PROGRAM --version`, given 5 s.
pub(super) async fn version_output(
    program: &Path,
) -> Result<std::io::Result<std::process::Output>, tokio::time::error::Elapsed> {
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(program)
            .arg("--version")
            .output(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_executable_searches_path_and_checks_mode() {
        assert!(find_executable(Path::new("sh")).is_some());
        assert!(find_executable(Path::new("definitely-not-a-banger-tool")).is_none());
        assert_eq!(
            find_executable(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert!(find_executable(Path::new("/etc/passwd")).is_none());
    }
}
