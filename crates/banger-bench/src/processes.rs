//! Processes the suite starts, and how it makes sure none outlives it.
//!
//! 1. Every process the suite spawns itself is held by a [`Spawned`], which
//!    kills it by pid (SIGKILL) and reaps it when dropped.
//! 2. Processes spawned on the suite's behalf (VMMs by bangerd, guest agents
//!    by fake-firecracker) carry a path under the run's work directory on
//!    their command line; [`kill_processes_under`] finds them by that path
//!    and kills them by pid. Nothing is ever matched by program name.
//! 3. SIGINT and SIGTERM only set a flag ([`interrupted`]); the running case
//!    stops at its next step and the normal cleanup runs.

use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_signal: libc_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

#[allow(non_camel_case_types)]
type libc_int = std::ffi::c_int;

/// Makes SIGINT and SIGTERM set the interrupt flag instead of killing the
/// suite before it cleans up.
pub fn catch_interrupts() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(note_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            let _ = sigaction(signal, &action);
        }
    }
}

#[must_use]
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails when the suite was asked to stop.
///
/// # Errors
/// SIGINT or SIGTERM arrived.
pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// A child process the suite started; killed and reaped when dropped.
pub struct Spawned {
    child: Option<Child>,
}

impl Spawned {
    #[must_use]
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it either way.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = kill(pid_of(child.id()), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Pids of live processes (other than this one) whose command line mentions
/// `directory`.
#[must_use]
pub fn processes_under(directory: &Path) -> Vec<u32> {
    let needle = directory.display().to_string();
    let own = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == own {
            continue;
        }
        // Zombies have an empty command line: a match is a live process.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs every process [`processes_under`] finds; returns how many there
/// were.
pub fn kill_processes_under(directory: &Path) -> usize {
    let pids = processes_under(directory);
    for pid in &pids {
        let _ = kill(pid_of(*pid), Signal::SIGKILL);
    }
    pids.len()
}

/// Resident set size of a process, from `/proc/PID/status`, in KiB.
///
/// # Errors
/// The process is gone or the file has no `VmRSS` line.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no VmRSS"))
}

/// Whether `program` is an executable file on PATH (or a path that is one).
#[must_use]
pub fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|directory| directory.join(program).is_file())
}
