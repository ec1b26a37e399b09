//! Running a command for an exec session.
//!
//! 1. Resolve the user (`/etc/passwd`, `/etc/group`) and build a clean
//!    environment before forking: the child between fork and exec only makes
//!    async-signal-safe calls (`setsid`/`setpgid`, `TIOCSCTTY`, `setgroups`,
//!    `setgid`, `setuid`).
//! 2. The child leads its own process group (its own session with a pty), so
//!    signals from the host reach the whole pipeline it starts.
//! 3. Pumps move stdin in (as the host's credit allows us to receive) and
//!    stdout/stderr out (as the host's credit allows us to send). A child
//!    that stops reading stdin stops the host's stdin stream, nothing more.
//! 4. When the child exits, stdin stops, and output is drained until end of
//!    stream, giving up on a quiet fd after [`DRAIN_GRACE`] (a background
//!    grandchild may hold it open forever). Then the exit is reported.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use banger_agent_proto::protocol::{send_frame, FrameSender, ReceiveStream, SendWindow};
use banger_proto::agent::{ExecRequest, ExitStatus, Frame, StreamId, WindowSize};
use bytes::Bytes;
use nix::unistd::{Gid, Uid};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::reaper::Reaper;
use crate::transport::FdStream;

/// How long output is still read from a quiet fd after the child exited.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type Sink = Box<dyn AsyncWrite + Send + Unpin>;
type Source = Box<dyn AsyncRead + Send + Unpin>;

/// Requests the host makes of a running exec besides stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Resize(WindowSize),
    Signal(i32),
}

/// The session's streams as exec sees them.
#[derive(Debug)]
pub struct ExecIo {
    pub frames: FrameSender,
    pub session: u64,
    pub stdin: ReceiveStream,
    pub stdout: Arc<SendWindow>,
    pub stderr: Arc<SendWindow>,
    /// Closed when the connection is gone; the process group is then killed.
    pub control: mpsc::UnboundedReceiver<Control>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("Empty command")]
    EmptyCommand,
    #[error("Unknown user {user}")]
    UnknownUser { user: String },
    #[error("Failed to open a pseudo-terminal")]
    OpenPty(#[source] nix::Error),
    #[error("Failed to start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to set up the child's stdio")]
    Stdio(#[source] std::io::Error),
}

struct Identity {
    switch_to: Option<(Uid, Gid, Vec<Gid>)>,
    name: String,
    home: PathBuf,
    shell: String,
}

fn resolve_user(user: Option<&str>) -> Result<Identity, ExecError> {
    let Some(name) = user else {
        let own = crate::users::user_by_uid(nix::unistd::getuid().as_raw());
        return Ok(Identity {
            switch_to: None,
            name: own
                .as_ref()
                .map_or_else(|| "root".to_owned(), |user| user.name.clone()),
            home: own
                .as_ref()
                .map_or_else(|| PathBuf::from("/"), |user| user.home.clone()),
            shell: own.map_or_else(|| "/bin/sh".to_owned(), |user| user.shell),
        });
    };
    let found = crate::users::user_by_name(name).ok_or_else(|| ExecError::UnknownUser {
        user: name.to_owned(),
    })?;
    let groups = crate::users::groups_of_user(&found)
        .into_iter()
        .map(Gid::from_raw)
        .collect();
    Ok(Identity {
        switch_to: Some((Uid::from_raw(found.uid), Gid::from_raw(found.gid), groups)),
        name: found.name,
        home: found.home,
        shell: found.shell,
    })
}

/// Runs `request` to completion, streaming through `io`.
pub async fn run(
    reaper: &Reaper,
    request: ExecRequest,
    mut io: ExecIo,
    path: &str,
) -> Result<ExitStatus, ExecError> {
    let program = request.argv.first().ok_or(ExecError::EmptyCommand)?.clone();
    let identity = resolve_user(request.user.as_deref())?;

    let mut command = std::process::Command::new(&program);
    command.args(&request.argv[1..]).env_clear();
    command
        .env("PATH", path)
        .env("HOME", &identity.home)
        .env("USER", &identity.name)
        .env("LOGNAME", &identity.name)
        .env("SHELL", &identity.shell);
    if request.pty.is_some() {
        command.env("TERM", "xterm-256color");
    }
    command.envs(request.env.iter().map(|(key, value)| (key, value)));
    let cwd = request.cwd.as_ref().map_or_else(
        || {
            if identity.home.is_dir() {
                identity.home.clone()
            } else {
                PathBuf::from("/")
            }
        },
        PathBuf::from,
    );
    command.current_dir(&cwd);

    let pty = match request.pty {
        Some(size) => {
            let winsize = to_winsize(size);
            let opened = nix::pty::openpty(Some(&winsize), None).map_err(ExecError::OpenPty)?;
            let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(ExecError::Stdio);
            command
                .stdin(stdio(&opened.slave)?)
                .stdout(stdio(&opened.slave)?)
                .stderr(stdio(&opened.slave)?);
            Some(opened.master)
        }
        None => {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let with_pty = pty.is_some();
    let switch_to = identity.switch_to;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on data prepared before the fork.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if with_pty {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else {
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            }
            if let Some((uid, gid, groups)) = &switch_to {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    // The slave copies live in `command`; the master must see EOF once the child's close.
    drop(command);
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let exit = reaper.watch(pid);

    let (exited_sender, exited) = watch::channel(false);
    let mut resize_fd = None;
    let (stdin_sink, stdout_source, stderr_source): (Sink, Source, Option<Source>) = match pty {
        Some(master) => {
            resize_fd = Some(master.try_clone().map_err(ExecError::Stdio)?);
            let stream = FdStream::new(master).map_err(ExecError::Stdio)?;
            let (reader, writer) = tokio::io::split(stream);
            (Box::new(writer), Box::new(reader), None)
        }
        None => {
            let take = |fd: Option<OwnedFd>| {
                fd.ok_or_else(|| ExecError::Stdio(std::io::Error::other("missing pipe")))
            };
            let stdin = take(child.stdin.take().map(OwnedFd::from))?;
            let stdout = take(child.stdout.take().map(OwnedFd::from))?;
            let stderr = take(child.stderr.take().map(OwnedFd::from))?;
            let pipe_error = ExecError::Stdio;
            (
                Box::new(tokio::net::unix::pipe::Sender::from_owned_fd(stdin).map_err(pipe_error)?),
                Box::new(
                    tokio::net::unix::pipe::Receiver::from_owned_fd(stdout).map_err(pipe_error)?,
                ),
                Some(Box::new(
                    tokio::net::unix::pipe::Receiver::from_owned_fd(stderr).map_err(pipe_error)?,
                )),
            )
        }
    };
    // The pipes now live in the pumps; `child` is only a pid (the reaper waits).
    drop(child);

    let stdin_task = tokio::spawn(pump_in(io.stdin, stdin_sink));
    let stdout_task = tokio::spawn(pump_out(
        stdout_source,
        Arc::clone(&io.stdout),
        io.frames.clone(),
        io.session,
        StreamId::Stdout,
        exited.clone(),
    ));
    let stderr_task = stderr_source.map(|source| {
        tokio::spawn(pump_out(
            source,
            Arc::clone(&io.stderr),
            io.frames.clone(),
            io.session,
            StreamId::Stderr,
            exited.clone(),
        ))
    });
    if stderr_task.is_none() {
        send_frame(
            &io.frames,
            Frame::Eof {
                session: io.session,
                stream: StreamId::Stderr,
            },
        );
    }

    tokio::pin!(exit);
    let mut control_open = true;
    let status = loop {
        tokio::select! {
            status = &mut exit => break status.unwrap_or(ExitStatus { code: None, signal: None }),
            control = io.control.recv(), if control_open => match control {
                Some(Control::Resize(size)) => {
                    if let Some(fd) = &resize_fd {
                        set_window_size(fd, size);
                    }
                }
                Some(Control::Signal(number)) => signal_group(pid, number),
                None => {
                    control_open = false;
                    signal_group(pid, libc::SIGKILL);
                }
            },
        }
    };
    let _ = exited_sender.send(true);
    stdin_task.abort();
    let _ = stdout_task.await;
    if let Some(task) = stderr_task {
        let _ = task.await;
    }
    Ok(status)
}

async fn pump_in(mut stdin: ReceiveStream, sink: Sink) {
    let mut sink = Some(sink);
    while let Some(chunk) = stdin.recv().await {
        // A child that closed stdin gets nothing more; the chunks are still
        // taken so the host's stream keeps its credit.
        if let Some(writer) = sink.as_mut() {
            if writer.write_all(&chunk).await.is_err() || writer.flush().await.is_err() {
                sink = None;
            }
        }
    }
    // Host sent EOF: dropping the pipe closes the child's stdin.
    drop(sink);
}

async fn pump_out(
    mut source: Source,
    window: Arc<SendWindow>,
    frames: FrameSender,
    session: u64,
    stream: StreamId,
    mut exited: watch::Receiver<bool>,
) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_GRACE, source.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_quiet) => break,
            }
        } else {
            tokio::select! {
                read = source.read(&mut buffer) => read,
                _ = exited.changed() => continue,
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(len) => {
                if !window
                    .send(
                        &frames,
                        session,
                        stream,
                        Bytes::copy_from_slice(&buffer[..len]),
                    )
                    .await
                {
                    return;
                }
            }
        }
    }
    send_frame(&frames, Frame::Eof { session, stream });
}

fn to_winsize(size: WindowSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_window_size(fd: &OwnedFd, size: WindowSize) {
    let winsize = to_winsize(size);
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid
    // for the duration of the call; the fd is an open pty master.
    #[allow(unsafe_code)]
    unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &raw const winsize);
    }
}

fn signal_group(pid: i32, number: i32) {
    let Ok(signal) = nix::sys::signal::Signal::try_from(number) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::killpg(pid, signal).is_err() {
        let _ = nix::sys::signal::kill(pid, signal);
    }
}
