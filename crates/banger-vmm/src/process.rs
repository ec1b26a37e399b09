//! Host processes that run a VMM: spawning them detached from the daemon,
//! observing their exit, killing them, and re-attaching to them after a
//! daemon restart.
//!
//! The life of a watched process:
//!
//! 1. [`spawn`] starts the program in a new session (`setsid`), so signals
//!    for the daemon's terminal (Ctrl-C, hang-up) do not reach it, and
//!    without any parent-death signal, so it survives the daemon. Its stdin
//!    is `/dev/null`; stdout and stderr are appended to the console log.
//!    [`adopt`] instead attaches to a process an earlier daemon started.
//! 2. A pidfd (`pidfd_open(2)`) is opened for the pid. For a child this is
//!    race-free: the pid cannot be reused before we reap it. For an adopted
//!    pid, the command line is read *after* opening the pidfd and the pidfd
//!    is then checked to still refer to a live process, so the command line
//!    seen belongs to the process the pidfd refers to.
//! 3. The pidfd is registered with Tokio's reactor; a watcher task waits for
//!    it to become readable, which the kernel signals the moment the process
//!    exits.
//! 4. The watcher reaps the process with `waitpid(WNOHANG)` when it is our
//!    child (an adopted process is not, and `ECHILD` then means the status is
//!    unknown), and publishes the [`ExitStatusInfo`] through a
//!    `tokio::sync::watch` channel that every clone of the [`ProcessHandle`]
//!    reads. Adopting a pid that this process spawned itself and still
//!    watches shares that watcher instead of racing it to reap.
//! 5. Signals are sent through the pidfd (`pidfd_send_signal(2)`), never by
//!    pid, so a process that is already gone and whose pid was reused is
//!    never hit.
//!
//! Everything here must be called from within a Tokio runtime: the watcher
//! is a Tokio task and the pidfd is registered with the runtime's reactor.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatusInfo {
    /// The process exited with this code.
    Exited { code: i32 },
    /// The process was terminated by this signal.
    Signaled { signal: i32 },
    /// The process is gone but its status cannot be known: it was adopted,
    /// so it is not a child of this daemon and was reaped by someone else.
    Unknown,
}

impl ExitStatusInfo {
    #[must_use]
    pub fn code(&self) -> Option<i32> {
        match self {
            Self::Exited { code } => Some(*code),
            _ => None,
        }
    }

    #[must_use]
    pub fn signal(&self) -> Option<i32> {
        match self {
            Self::Signaled { signal } => Some(*signal),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatusInfo {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited { code } => write!(formatter, "exited with code {code}"),
            Self::Signaled { signal } => match Signal::try_from(*signal) {
                Ok(name) => write!(formatter, "killed by {name}"),
                Err(_) => write!(formatter, "killed by signal {signal}"),
            },
            Self::Unknown => write!(
                formatter,
                "exited with unknown status (not a child of this daemon)"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("Could not open the console log {}", path.display())]
    OpenConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not start {}", program.display())]
    SpawnProcess {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not open a pidfd for process {pid}")]
    OpenPidfd {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("Could not watch process {pid} for exit")]
    WatchProcess {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("Could not read the command line of process {pid}")]
    ReadCommandLine {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("Could not send {signal} to process {pid}")]
    SendSignal {
        pid: u32,
        signal: Signal,
        #[source]
        source: io::Error,
    },
}

/// A watched process. Cheap to clone; all clones observe the same process.
#[derive(Clone)]
pub struct ProcessHandle {
    inner: Arc<ProcessInner>,
}

struct ProcessInner {
    pid: u32,
    adopted: bool,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ExitStatusInfo>>,
}

impl fmt::Debug for ProcessHandle {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ProcessHandle")
            .field("pid", &self.inner.pid)
            .field("adopted", &self.inner.adopted)
            .field("exit", &*self.inner.exit.borrow())
            .finish_non_exhaustive()
    }
}

/// Starts `program` with `args` as a detached VMM process (see the module
/// docs) and starts watching it. stdout and stderr are appended to
/// `console_log`, which is created if missing.
///
/// # Errors
/// When the console log cannot be opened, the program cannot be started, or
/// it cannot be watched; in the last case the process is killed and reaped
/// first.
pub fn spawn<I, S>(
    program: &Path,
    args: I,
    console_log: &Path,
) -> Result<ProcessHandle, ProcessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let open_console = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(console_log)
            .map_err(|source| ProcessError::OpenConsoleLog {
                path: console_log.to_owned(),
                source,
            })
    };
    let stdout = open_console()?;
    let stderr = open_console()?;

    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    start_new_session(&mut command);
    let child = command
        .spawn()
        .map_err(|source| ProcessError::SpawnProcess {
            program: program.to_owned(),
            source,
        })?;
    // Dropping the `Child` neither kills nor waits for it; the watcher owns
    // reaping from here on.
    let pid = child.id();
    drop(child);

    let watched = pidfd_open(pid)
        .map_err(|source| ProcessError::OpenPidfd { pid, source })
        .and_then(|pidfd| watch_process(pid, pidfd, false));
    if watched.is_err() {
        kill_and_reap_child(pid);
    }
    watched
}

/// Attaches to a process that an earlier daemon instance started.
///
/// Returns `Ok(None)` when `pid` is not running (or is a zombie), or when
/// `is_expected` rejects its command line (argv, including `argv[0]`), which
/// guards against the pid having been reused by an unrelated process.
///
/// # Errors
/// When the pidfd or the command line cannot be read for a reason other than
/// the process being gone.
pub fn adopt(
    pid: u32,
    is_expected: impl FnOnce(&[OsString]) -> bool,
) -> Result<Option<ProcessHandle>, ProcessError> {
    if pid == 0 || i32::try_from(pid).is_err() {
        return Ok(None);
    }
    let pidfd = match pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(source) => return Err(ProcessError::OpenPidfd { pid, source }),
    };
    let Some(command_line) = read_command_line(pid)? else {
        return Ok(None);
    };
    if !is_expected(&command_line) {
        return Ok(None);
    }
    // The pidfd was opened before the command line was read. If the process
    // it refers to is still alive now, the pid cannot have been reused in
    // between, so the command line we checked is that process's.
    match pidfd_send_signal(&pidfd, None) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        // EPERM still proves the process exists.
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => {}
        Err(source) => {
            return Err(ProcessError::WatchProcess { pid, source });
        }
    }
    adopted_handle(pid, pidfd).map(Some)
}

/// Attaches to `pid` without looking at its command line: a process whose
/// pid cannot have been reused, because it is our unreaped child or the
/// child of one (a jailed VMM, orphaned to us as its subreaper, which may
/// still be between `fork` and `exec`). The caller checks what it runs once
/// it can tell. `Ok(None)` when it is gone.
///
/// # Errors
/// When the pidfd cannot be opened or watched.
pub fn adopt_descendant(pid: u32) -> Result<Option<ProcessHandle>, ProcessError> {
    if pid == 0 || i32::try_from(pid).is_err() {
        return Ok(None);
    }
    let pidfd = match pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(source) => return Err(ProcessError::OpenPidfd { pid, source }),
    };
    adopted_handle(pid, pidfd).map(Some)
}

/// The handle of an adopted `pid`: shares the watcher another handle of it
/// already has, else starts one on `pidfd`.
fn adopted_handle(pid: u32, pidfd: OwnedFd) -> Result<ProcessHandle, ProcessError> {
    if let Some((pidfd, exit)) = existing_watcher(pid) {
        return Ok(ProcessHandle {
            inner: Arc::new(ProcessInner {
                pid,
                adopted: true,
                pidfd,
                exit,
            }),
        });
    }
    watch_process(pid, pidfd, true)
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): an
/// orphaned descendant (a jailed VMM whose jailer exited) becomes its child
/// rather than init's, so its exit status can be collected.
///
/// # Errors
/// When the kernel refuses.
#[allow(unsafe_code)]
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl(2) with PR_SET_CHILD_SUBREAPER takes an integer flag and
    // reads no memory of ours.
    let result = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ends `pid` if it is a child of this process (a VMM that could not be
/// watched): reaps it if it has exited, else kills and reaps it. While it is
/// our unreaped child its pid cannot have been reused, so signalling by pid
/// is safe. `None` when it is not our child.
#[must_use]
pub fn kill_and_reap_if_child(pid: u32) -> Option<ExitStatusInfo> {
    let raw_pid = Pid::from_raw(i32::try_from(pid).ok()?);
    let mut flags = Some(WaitPidFlag::WNOHANG);
    loop {
        match waitpid(raw_pid, flags) {
            Ok(WaitStatus::Exited(_, code)) => return Some(ExitStatusInfo::Exited { code }),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Some(ExitStatusInfo::Signaled {
                    signal: signal as i32,
                })
            }
            Err(Errno::EINTR) => {}
            Ok(_) => {
                let _ = nix::sys::signal::kill(raw_pid, Signal::SIGKILL);
                flags = None;
            }
            Err(_) => return None,
        }
    }
}

/// Whether `pid` exists and has not exited (is not a zombie).
#[must_use]
pub fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state ...`; comm may contain spaces and parentheses.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Reads `/proc/<pid>/cmdline` as argv. `Ok(None)` when the process does
/// not exist or has no command line (zombies and kernel threads).
///
/// # Errors
/// When the file exists but cannot be read.
pub fn read_command_line(pid: u32) -> Result<Option<Vec<OsString>>, ProcessError> {
    let path = format!("/proc/{pid}/cmdline");
    let mut bytes = Vec::new();
    let read = File::open(&path).and_then(|mut file| file.read_to_end(&mut bytes));
    match read {
        Ok(_) => {}
        Err(error)
            if error.kind() == io::ErrorKind::NotFound
                || error.raw_os_error() == Some(libc::ESRCH) =>
        {
            return Ok(None);
        }
        Err(source) => return Err(ProcessError::ReadCommandLine { pid, source }),
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.last() == Some(&0) {
        bytes.pop();
    }
    Ok(Some(
        bytes
            .split(|byte| *byte == 0)
            .map(|argument| OsStr::from_bytes(argument).to_owned())
            .collect(),
    ))
}

/// Whether `flag` is immediately followed by `value` somewhere in `args`.
#[must_use]
pub fn has_flag_value(args: &[OsString], flag: &str, value: &OsStr) -> bool {
    args.windows(2)
        .any(|pair| pair[0] == OsStr::new(flag) && pair[1] == value)
}

/// The last `max_lines` lines of a log file (at most its last 8 KiB), for
/// error messages, with the guest's control characters and escape sequences
/// made visible (`banger_proto::sanitize`). Best effort: an unreadable file
/// gives an empty string.
#[must_use]
pub fn read_log_tail(path: &Path, max_lines: usize) -> String {
    const MAX_BYTES: u64 = 8 * 1024;
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map_or(0, |metadata| metadata.len());
    if file
        .seek(SeekFrom::Start(length.saturating_sub(MAX_BYTES)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    banger_proto::sanitize::text(&lines[lines.len().saturating_sub(max_lines)..].join("\n"))
}

impl ProcessHandle {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Whether this process was adopted rather than spawned by us.
    #[must_use]
    pub fn is_adopted(&self) -> bool {
        self.inner.adopted
    }

    #[must_use]
    pub fn has_exited(&self) -> bool {
        self.inner.exit.borrow().is_some()
    }

    #[must_use]
    pub fn exit_status(&self) -> Option<ExitStatusInfo> {
        *self.inner.exit.borrow()
    }

    /// Resolves once the process has exited and (if it is our child) been
    /// reaped. Any number of tasks may wait concurrently.
    pub async fn wait_exit(&self) -> ExitStatusInfo {
        let mut exit = self.inner.exit.clone();
        let published = exit.wait_for(Option::is_some).await.map(|status| *status);
        match published {
            Ok(Some(status)) => status,
            // The watcher task only goes away without publishing when the
            // runtime it ran on shuts down; nothing will ever report the
            // exit then.
            Ok(None) | Err(_) => std::future::pending().await,
        }
    }

    /// Sends `signal` to the process. A process that has already exited is
    /// not an error.
    ///
    /// # Errors
    /// When the kernel refuses to deliver the signal.
    pub fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        match pidfd_send_signal(&self.inner.pidfd, Some(signal)) {
            Ok(()) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(source) => Err(ProcessError::SendSignal {
                pid: self.inner.pid,
                signal,
                source,
            }),
        }
    }

    /// Sends `SIGKILL` and waits until the process is gone.
    ///
    /// # Errors
    /// When the signal cannot be delivered.
    pub async fn kill(&self) -> Result<ExitStatusInfo, ProcessError> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL)?;
        Ok(self.wait_exit().await)
    }
}

/// Children spawned by this process whose watcher has not reaped them yet.
/// [`adopt`] of such a pid (a daemon restarted within the same process, as
/// tests do) shares the existing watcher: two watchers would race to reap the
/// child and one of them would lose its exit status.
///
/// Invariant: an entry is removed under the lock in the same critical
/// section as the `waitpid` that reaps it, so while an entry exists its pid
/// cannot have been reused.
static UNREAPED_CHILDREN: Mutex<BTreeMap<u32, Watcher>> = Mutex::new(BTreeMap::new());

struct Watcher {
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ExitStatusInfo>>,
}

fn unreaped_children() -> MutexGuard<'static, BTreeMap<u32, Watcher>> {
    UNREAPED_CHILDREN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The live watcher of a child we spawned, if there is one.
fn existing_watcher(pid: u32) -> Option<(Arc<OwnedFd>, watch::Receiver<Option<ExitStatusInfo>>)> {
    let mut children = unreaped_children();
    let watcher = children.get(&pid)?;
    // An error means the watcher task is gone (its runtime shut down); a
    // new watcher must take over reaping.
    if watcher.exit.has_changed().is_err() {
        children.remove(&pid);
        return None;
    }
    Some((Arc::clone(&watcher.pidfd), watcher.exit.clone()))
}

fn watch_process(pid: u32, pidfd: OwnedFd, adopted: bool) -> Result<ProcessHandle, ProcessError> {
    let pidfd = Arc::new(pidfd);
    let readiness = register_readable(Arc::clone(&pidfd))
        .map_err(|source| ProcessError::WatchProcess { pid, source })?;
    let (sender, receiver) = watch::channel(None);
    if !adopted {
        // Registered before the watcher starts, so it is always removed
        // after it was inserted.
        unreaped_children().insert(
            pid,
            Watcher {
                pidfd: Arc::clone(&pidfd),
                exit: receiver.clone(),
            },
        );
    }
    tokio::spawn(async move {
        // A pidfd becomes readable when the process exits, and stays so.
        if let Err(error) = readiness.readable().await {
            tracing::warn!(pid, %error, "stopped watching process for exit");
            return;
        }
        let status = reap(pid).await;
        tracing::debug!(pid, %status, "process exited");
        sender.send_replace(Some(status));
    });
    Ok(ProcessHandle {
        inner: Arc::new(ProcessInner {
            pid,
            adopted,
            pidfd,
            exit: receiver,
        }),
    })
}

/// Collects the status of an exited process. Only called once its pidfd is
/// readable, so a child is a zombie by now.
async fn reap(pid: u32) -> ExitStatusInfo {
    let Ok(raw_pid) = i32::try_from(pid) else {
        return ExitStatusInfo::Unknown;
    };
    loop {
        let result = {
            let mut children = unreaped_children();
            let result = waitpid(Pid::from_raw(raw_pid), Some(WaitPidFlag::WNOHANG));
            let settled = match result {
                Ok(status) => matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)),
                Err(error) => error != Errno::EINTR,
            };
            if settled {
                children.remove(&pid);
            }
            result
        };
        match result {
            Ok(WaitStatus::Exited(_, code)) => return ExitStatusInfo::Exited { code },
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return ExitStatusInfo::Signaled {
                    signal: signal as i32,
                }
            }
            // Not expected once the pidfd is readable; give the kernel a
            // moment rather than spinning.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(Errno::EINTR) => {}
            // Not our child: an adopted process, reaped by its new parent.
            Err(Errno::ECHILD) => return ExitStatusInfo::Unknown,
            Err(error) => {
                tracing::warn!(pid, %error, "could not reap exited process");
                return ExitStatusInfo::Unknown;
            }
        }
    }
}

/// Last resort when a freshly spawned child cannot be watched: it is still
/// our unreaped child, so its pid cannot have been reused and signalling by
/// pid is safe.
fn kill_and_reap_child(pid: u32) {
    let Ok(raw_pid) = i32::try_from(pid) else {
        return;
    };
    let pid = Pid::from_raw(raw_pid);
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    while waitpid(pid, None) == Err(Errno::EINTR) {}
}

#[allow(unsafe_code)]
fn register_readable(pidfd: Arc<OwnedFd>) -> io::Result<AsyncFd<Arc<OwnedFd>>> {
    // SAFETY: the `AsyncFd` owns a clone of the `Arc`, so the descriptor
    // stays open and refers to the same pidfd for the whole life of the
    // registration, and `as_raw_fd` of an `Arc<OwnedFd>` always returns that
    // same descriptor.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

#[allow(unsafe_code)]
fn start_new_session(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe, allocates nothing and touches
    // no state shared with the parent.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
}

#[allow(unsafe_code)]
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags: libc::c_uint = 0;
    // SAFETY: pidfd_open(2) takes a pid and flags by value and returns a new
    // file descriptor (always close-on-exec) or -1; no memory is passed.
    let result = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(result).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us and nothing
    // else owns it, so `OwnedFd` may take ownership and close it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `None` sends no signal and only checks that the process still exists.
#[allow(unsafe_code)]
fn pidfd_send_signal(pidfd: &OwnedFd, signal: Option<Signal>) -> io::Result<()> {
    let signal: libc::c_int = signal.map_or(0, |signal| signal as libc::c_int);
    let flags: libc::c_uint = 0;
    // SAFETY: pidfd_send_signal(2) with a null siginfo pointer reads no
    // memory of ours; the descriptor is valid for the duration of the call
    // because we borrow its owner.
    let result = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Exit must be seen well within a second of the process ending.
    const EXIT_DEADLINE: Duration = Duration::from_millis(500);

    fn console_log(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("console.log")
    }

    fn process_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[tokio::test]
    async fn spawned_process_is_seen_exiting_after_kill() {
        let dir = tempfile::tempdir().unwrap();
        let handle = spawn(Path::new("sleep"), ["30"], &console_log(&dir)).unwrap();
        assert!(!handle.has_exited());
        assert!(!handle.is_adopted());
        assert!(process_exists(handle.pid()));

        let started = Instant::now();
        let status = handle.kill().await.unwrap();
        assert!(
            started.elapsed() < EXIT_DEADLINE,
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            status,
            ExitStatusInfo::Signaled {
                signal: libc::SIGKILL
            }
        );
        assert!(handle.has_exited());
        assert_eq!(handle.exit_status(), Some(status));
        // Reaped, not left as a zombie.
        assert!(!process_exists(handle.pid()));
        // Killing again is harmless.
        assert_eq!(handle.kill().await.unwrap(), status);
    }

    #[tokio::test]
    async fn many_waiters_see_the_same_exit() {
        let dir = tempfile::tempdir().unwrap();
        let handle = spawn(Path::new("sleep"), ["30"], &console_log(&dir)).unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.wait_exit().await })
            })
            .collect();
        handle.signal(Signal::SIGTERM).unwrap();
        for waiter in waiters {
            let status = tokio::time::timeout(EXIT_DEADLINE, waiter)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                status,
                ExitStatusInfo::Signaled {
                    signal: libc::SIGTERM
                }
            );
        }
    }

    #[tokio::test]
    async fn exit_code_is_observed() {
        let dir = tempfile::tempdir().unwrap();
        let handle = spawn(
            Path::new("sh"),
            ["-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
            &console_log(&dir),
        )
        .unwrap();
        let status = tokio::time::timeout(EXIT_DEADLINE, handle.wait_exit())
            .await
            .unwrap();
        assert_eq!(status, ExitStatusInfo::Exited { code: 3 });
        assert_eq!(status.to_string(), "exited with code 3");
        let console = std::fs::read_to_string(console_log(&dir)).unwrap();
        assert_eq!(console, "to-stdout\nto-stderr\n");
    }

    #[tokio::test]
    async fn spawned_process_runs_in_its_own_session_with_null_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let handle = spawn(
            Path::new("sh"),
            ["-c", "cat; cut -d' ' -f5,6 /proc/$$/stat"],
            &console_log(&dir),
        )
        .unwrap();
        // `cat` ends at once because stdin is /dev/null.
        let status = tokio::time::timeout(EXIT_DEADLINE * 4, handle.wait_exit())
            .await
            .unwrap();
        assert_eq!(status, ExitStatusInfo::Exited { code: 0 });
        let console = std::fs::read_to_string(console_log(&dir)).unwrap();
        let ids: Vec<u32> = console
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect();
        // Process-group leader and session leader of its own.
        assert_eq!(ids, vec![handle.pid(), handle.pid()]);
    }

    #[tokio::test]
    async fn spawn_of_a_missing_program_fails() {
        let dir = tempfile::tempdir().unwrap();
        let error = spawn(
            Path::new("/nonexistent/firecracker"),
            ["--help"],
            &console_log(&dir),
        )
        .unwrap_err();
        assert!(
            matches!(error, ProcessError::SpawnProcess { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "Could not start /nonexistent/firecracker"
        );
    }

    /// Starts `sh -c <idle> <fifo> --id <vm_id>` as a grandchild that is
    /// reparented away from this test process, like a VMM left behind by an
    /// earlier daemon. It idles blocked on a FIFO, with no child of its own,
    /// so killing it leaves nothing behind. Returns its pid.
    fn start_orphan(dir: &tempfile::TempDir, vm_id: &str) -> u32 {
        let fifo = dir.path().join("idle.fifo");
        let output = Command::new("sh")
            .args([
                OsStr::new("-c"),
                OsStr::new(
                    r#"sh -c 'mkfifo "$0" && read -r never <> "$0"' "$1" --id "$2" >/dev/null 2>&1 &
                    echo $!"#,
                ),
                OsStr::new("outer"),
                fifo.as_os_str(),
                OsStr::new(vm_id),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn expects_id(vm_id: &'static str) -> impl FnOnce(&[OsString]) -> bool {
        move |args| has_flag_value(args, "--id", OsStr::new(vm_id))
    }

    #[tokio::test]
    async fn adopt_attaches_to_a_live_process_with_matching_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let pid = start_orphan(&dir, "vm-adopt-1");
        let handle = adopt(pid, expects_id("vm-adopt-1"))
            .unwrap()
            .expect("the orphan should be adopted");
        assert_eq!(handle.pid(), pid);
        assert!(handle.is_adopted());
        assert!(!handle.has_exited());

        let started = Instant::now();
        let status = handle.kill().await.unwrap();
        assert!(
            started.elapsed() < EXIT_DEADLINE,
            "took {:?}",
            started.elapsed()
        );
        // Not our child, so the status cannot be known.
        assert_eq!(status, ExitStatusInfo::Unknown);
    }

    #[tokio::test]
    async fn adopt_refuses_a_process_with_another_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let pid = start_orphan(&dir, "vm-adopt-2");
        let adopted = adopt(pid, expects_id("vm-someone-else")).unwrap();
        assert!(adopted.is_none());
        assert!(process_exists(pid));
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL)
            .unwrap();
    }

    #[tokio::test]
    async fn adopt_of_a_dead_pid_is_none() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(adopt(pid, |_| true).unwrap().is_none());
        assert!(adopt(0, |_| true).unwrap().is_none());
        assert!(adopt(u32::MAX, |_| true).unwrap().is_none());
    }

    #[test]
    fn command_line_is_split_into_arguments() {
        let args = read_command_line(std::process::id()).unwrap().unwrap();
        assert!(!args.is_empty());
        assert!(has_flag_value(
            &[
                OsString::from("firecracker"),
                OsString::from("--id"),
                OsString::from("vm-1"),
            ],
            "--id",
            OsStr::new("vm-1"),
        ));
        assert!(!has_flag_value(
            &[OsString::from("vm-1"), OsString::from("--id")],
            "--id",
            OsStr::new("vm-1"),
        ));
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "one\ntwo\nthree\nfour\n").unwrap();
        assert_eq!(read_log_tail(&path, 2), "three\nfour");
        assert_eq!(read_log_tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn log_tail_makes_guest_escape_sequences_visible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "ok\n\x1b]0;owned\x07\x1b[2Jpanic\tnow\r\n").unwrap();
        assert_eq!(
            read_log_tail(&path, 2),
            "ok\n\\x1b]0;owned\\x07\\x1b[2Jpanic\tnow"
        );
    }

    #[test]
    fn exit_statuses_read_well() {
        assert_eq!(
            ExitStatusInfo::Signaled { signal: 9 }.to_string(),
            "killed by SIGKILL"
        );
        assert_eq!(
            ExitStatusInfo::Unknown.to_string(),
            "exited with unknown status (not a child of this daemon)"
        );
    }
}
