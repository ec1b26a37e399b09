//! Child reaping.
//!
//! 1. Exec spawns with `std::process` (not `tokio::process`, whose own
//!    reaping would race ours) and hands the pid to [`Reaper::watch`].
//! 2. On every `SIGCHLD` (and once a second, in case one was coalesced) the
//!    reaper task collects exit statuses: of the watched pids only
//!    ([`ReapMode::OwnChildren`], when the agent shares a process with others,
//!    as in tests), or of every child ([`ReapMode::AllChildren`], as PID 1,
//!    where orphans are re-parented to us and must not stay zombies).
//! 3. A status whose pid nobody watches yet is kept (bounded) so a child
//!    that exits before `watch` is called is not lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use banger_proto::agent::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, Notify};

/// Statuses of unwatched pids kept at most (orphans' statuses, as PID 1).
const UNCLAIMED_LIMIT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    OwnChildren,
    AllChildren,
}

#[derive(Debug)]
pub struct Reaper {
    mode: ReapMode,
    state: Mutex<ReaperState>,
    poke: Notify,
}

#[derive(Debug, Default)]
struct ReaperState {
    waiting: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, ExitStatus>,
}

impl Reaper {
    /// Starts the reaper task on the current runtime.
    pub fn start(mode: ReapMode) -> std::io::Result<Arc<Self>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Self {
            mode,
            state: Mutex::new(ReaperState::default()),
            poke: Notify::new(),
        });
        let task_reaper = Arc::clone(&reaper);
        // The task lives as long as the runtime: the agent reaps until it exits.
        tokio::spawn(async move {
            let reaper = task_reaper;
            loop {
                reaper.reap_ready();
                let poked = reaper.poke.notified();
                tokio::select! {
                    _ = sigchld.recv() => {}
                    () = poked => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(reaper)
    }

    /// The exit status of `pid`, once it has exited.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (sender, receiver) = oneshot::channel();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(status) = state.unclaimed.remove(&pid) {
            let _ = sender.send(status);
        } else {
            state.waiting.insert(pid, sender);
        }
        drop(state);
        // The SIGCHLD may have come before the pid was watched.
        self.poke.notify_one();
        receiver
    }

    fn reap_ready(&self) {
        match self.mode {
            ReapMode::OwnChildren => {
                let pids: Vec<i32> = {
                    let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    state.waiting.keys().copied().collect()
                };
                for pid in pids {
                    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                        Ok(status) => {
                            if let Some(exit) = exit_status(status) {
                                self.deliver(pid, exit);
                            }
                        }
                        Err(Errno::ECHILD) => self.deliver(
                            pid,
                            ExitStatus {
                                code: None,
                                signal: None,
                            },
                        ),
                        Err(_) => {}
                    }
                }
            }
            ReapMode::AllChildren => loop {
                match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => {
                        if let (Some(pid), Some(exit)) = (status.pid(), exit_status(status)) {
                            self.deliver(pid.as_raw(), exit);
                        }
                    }
                }
            },
        }
    }

    fn deliver(&self, pid: i32, status: ExitStatus) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = state.waiting.remove(&pid) {
            let _ = sender.send(status);
        } else {
            if state.unclaimed.len() >= UNCLAIMED_LIMIT {
                state.unclaimed.clear();
            }
            state.unclaimed.insert(pid, status);
        }
    }
}

/// The exit of a wait status; `None` for stops and continues.
pub fn exit_status(status: WaitStatus) -> Option<ExitStatus> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitStatus {
            code: Some(code),
            signal: None,
        }),
        WaitStatus::Signaled(_, signal, _) => Some(ExitStatus {
            code: None,
            signal: Some(signal as i32),
        }),
        _ => None,
    }
}
