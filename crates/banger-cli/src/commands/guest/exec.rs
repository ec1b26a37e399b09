//! `vm run`: a command in the guest, with its stdio, signals and terminal.

use std::io::IsTerminal;
use std::path::Path;

use banger_agent_proto::client::ExecSession;
use banger_proto::agent::{ExecRequest, WindowSize};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{agent_error, connect};
use crate::args::RunArgs;
use crate::error::Exit;

pub async fn run(socket: &Path, args: RunArgs) -> anyhow::Result<()> {
    let agent = connect(socket, &args.name.vm).await?;
    let tty = args.tty && std::io::stdin().is_terminal();
    let request = ExecRequest {
        argv: args.command,
        env: args.env,
        cwd: args.workdir,
        user: args.user,
        pty: tty.then(terminal_size),
    };
    let session = agent
        .exec(request)
        .await
        .map_err(|error| agent_error(&args.name.vm, error))?;
    let forward_stdin = args.interactive || tty || !std::io::stdin().is_terminal();
    let raw_mode = if tty { RawMode::enter() } else { None };
    let status = drive(session, forward_stdin, tty).await;
    drop(raw_mode);
    let status = status.map_err(|error| agent_error(&args.name.vm, error))?;
    match u8::try_from(status.shell_code()) {
        Ok(0) => Ok(()),
        code => Err(Exit(code.unwrap_or(255)).into()),
    }
}

/// Pumps stdin, stdout and stderr, forwards Ctrl-C (without a tty) and
/// window size changes (with one), and returns the exit status.
async fn drive(
    session: ExecSession,
    forward_stdin: bool,
    tty: bool,
) -> Result<banger_proto::agent::ExitStatus, banger_agent_proto::client::ClientError> {
    let ExecSession {
        mut stdin,
        mut stdout,
        mut stderr,
        control,
        exit,
    } = session;
    let input = tokio::spawn(async move {
        if forward_stdin {
            // A blocking thread: tokio's stdin cannot be cancelled, and the
            // command may end while we wait for input.
            let (chunks, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
            std::thread::spawn(move || {
                use std::io::Read;
                let mut input = std::io::stdin().lock();
                let mut buffer = vec![0_u8; 64 * 1024];
                loop {
                    match input.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(read) => {
                            if chunks
                                .blocking_send(Bytes::copy_from_slice(&buffer[..read]))
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            });
            while let Some(chunk) = receiver.recv().await {
                if stdin.write(chunk).await.is_err() {
                    return;
                }
            }
        }
        stdin.close();
    });
    let output = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(chunk) = stdout.recv().await {
            if out.write_all(&chunk).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    let errors = tokio::spawn(async move {
        let mut err = tokio::io::stderr();
        while let Some(chunk) = stderr.recv().await {
            if err.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut interrupt), Ok(mut resize), Ok(mut terminate), Ok(mut hangup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::window_change()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                Some(()) = interrupt.recv() => { let _ = control.signal(libc::SIGINT); }
                Some(()) = terminate.recv() => { let _ = control.signal(libc::SIGTERM); }
                Some(()) = hangup.recv() => { let _ = control.signal(libc::SIGHUP); }
                Some(()) = resize.recv(), if tty => { let size = terminal_size(); let _ = control.resize(size.rows, size.cols); }
                else => break,
            }
        }
    });
    let status = exit.wait().await;
    signals.abort();
    input.abort();
    let _ = output.await;
    let _ = errors.await;
    status
}

fn terminal_size() -> WindowSize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` into the pointer, which is valid.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &raw mut size) } == 0;
    if ok && size.ws_row > 0 && size.ws_col > 0 {
        WindowSize {
            rows: size.ws_row,
            cols: size.ws_col,
        }
    } else {
        WindowSize { rows: 24, cols: 80 }
    }
}

/// The local terminal in raw mode, restored on drop.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}
