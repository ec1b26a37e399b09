//! External tools (`losetup`, `dmsetup`, `mkfs.ext4`, …) behind a trait, so
//! the device-mapper strategy can be exercised with a recording fake on hosts
//! without device-mapper.

use std::ffi::{OsStr, OsString};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("Failed to run `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command_line}` failed ({status}): {stderr}")]
    Failed {
        command_line: String,
        status: String,
        stderr: String,
    },
}

/// Runs a program to completion and returns its standard output.
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Runs `program` with `arguments`; a non-zero exit is an error carrying stderr.
    ///
    /// # Errors
    /// [`CommandError`] when the program cannot be started or exits non-zero.
    fn run(&self, program: &str, arguments: &[OsString]) -> Result<String, CommandError>;
}

/// The real runner: `std::process::Command`, stdin closed, output captured.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostCommands;

impl CommandRunner for HostCommands {
    fn run(&self, program: &str, arguments: &[OsString]) -> Result<String, CommandError> {
        let output = Command::new(program)
            .args(arguments)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| CommandError::Spawn {
                program: program.to_owned(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(CommandError::Failed {
                command_line: command_line(program, arguments),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// `program arg1 arg2` for messages.
#[must_use]
pub fn command_line(program: &str, arguments: &[OsString]) -> String {
    let mut line = program.to_owned();
    for argument in arguments {
        line.push(' ');
        line.push_str(&argument.to_string_lossy());
    }
    line
}

/// Builds an argument list from anything string-like.
pub fn arguments<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    items
        .into_iter()
        .map(|item| item.as_ref().to_owned())
        .collect()
}

/// Whether `program` is found on `PATH` (or is an existing path).
#[must_use]
pub fn tool_exists(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).exists();
    }
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|directory| directory.join(program).is_file())
    })
}

/// A recording fake for tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::{command_line, CommandError, CommandRunner};
    use std::ffi::OsString;
    use std::sync::Mutex;

    /// Records command lines; answers `losetup --find` with successive loop
    /// devices and fails the command whose line contains `fail_on`.
    #[derive(Debug, Default)]
    pub(crate) struct RecordingRunner {
        pub(crate) calls: Mutex<Vec<String>>,
        pub(crate) fail_on: Option<&'static str>,
    }

    impl CommandRunner for RecordingRunner {
        fn run(&self, program: &str, arguments: &[OsString]) -> Result<String, CommandError> {
            let line = command_line(program, arguments);
            let mut calls = self.calls.lock().unwrap();
            calls.push(line.clone());
            if self.fail_on.is_some_and(|pattern| line.contains(pattern)) {
                return Err(CommandError::Failed {
                    command_line: line,
                    status: "exit status: 1".to_owned(),
                    stderr: "injected".to_owned(),
                });
            }
            if line.starts_with("losetup --find") {
                let loops = calls
                    .iter()
                    .filter(|call| call.starts_with("losetup --find"))
                    .count();
                return Ok(format!("/dev/loop{}\n", loops + 6));
            }
            Ok(String::new())
        }
    }
}
