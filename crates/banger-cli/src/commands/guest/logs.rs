//! `vm logs`: the console log from the daemon, or with `--guest` the
//! guest's journal through the agent.

use std::path::Path;

use banger_agent_proto::client::{AgentClient, ExecSession};
use banger_proto::agent::ExecRequest;
use banger_proto::method;
use tokio::io::AsyncWriteExt;

use super::{agent_error, connect};
use crate::client::Client;
use crate::error::{hinted, Exit};

/// How `vm logs` prints the console's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Escape sequences and other control characters made visible.
    Text,
    Raw,
    /// `{"line": "..."}` per line.
    Json,
}

/// Turns console bytes into output, holding back what may continue in
/// the next chunk (a partial UTF-8 character or `\r`; a partial line for
/// JSON).
struct LogPrinter {
    format: LogFormat,
    pending: Vec<u8>,
}

impl LogPrinter {
    /// A printer of raw bytes, JSON lines or sanitized text.
    fn new(raw: bool, json: bool) -> Self {
        let format = if raw {
            LogFormat::Raw
        } else if json {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
        Self {
            format,
            pending: Vec::new(),
        }
    }
}

impl LogPrinter {
    fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.format == LogFormat::Raw {
            return bytes.to_vec();
        }
        self.pending.extend_from_slice(bytes);
        let ready = match self.format {
            LogFormat::Json => self
                .pending
                .iter()
                .rposition(|byte| *byte == b'\n')
                .map_or(0, |newline| newline + 1),
            _ => {
                let valid = match std::str::from_utf8(&self.pending) {
                    Ok(_) => self.pending.len(),
                    Err(error) if error.error_len().is_none() => error.valid_up_to(),
                    Err(_) => self.pending.len(),
                };
                if self.pending[..valid].ends_with(b"\r") {
                    valid - 1
                } else {
                    valid
                }
            }
        };
        let chunk: Vec<u8> = self.pending.drain(..ready).collect();
        self.render(&chunk)
    }

    fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.render(&rest)
    }

    fn render(&self, bytes: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(bytes);
        match self.format {
            LogFormat::Raw => bytes.to_vec(),
            LogFormat::Text => banger_proto::sanitize::text(&text).into_bytes(),
            LogFormat::Json => {
                let mut out = Vec::new();
                for line in text.split_inclusive('\n') {
                    let line = line.strip_suffix('\n').unwrap_or(line);
                    let line = line.strip_suffix('\r').unwrap_or(line);
                    let object = serde_json::json!({ "line": line });
                    out.extend_from_slice(object.to_string().as_bytes());
                    out.push(b'\n');
                }
                out
            }
        }
    }
}

pub async fn logs(
    socket: &Path,
    reference: &str,
    follow: bool,
    tail: Option<u64>,
    raw: bool,
    json: bool,
) -> anyhow::Result<()> {
    use banger_workspace::stream::{read_frame, Frame};
    use std::io::Write as _;
    let (_, mut reader, _write) = Client::connect(socket)
        .await?
        .call_streaming::<method::VmLogs>(banger_proto::vm::LogsParams {
            vm: reference.to_owned(),
            tail,
            follow,
        })
        .await?;
    let mut printer = LogPrinter::new(raw, json);
    let mut stdout = std::io::stdout().lock();
    let mut out = |bytes: &[u8]| -> anyhow::Result<()> {
        stdout.write_all(bytes)?;
        stdout.flush()?;
        Ok(())
    };
    loop {
        match read_frame(&mut reader).await {
            Ok(Some(Frame::Data(bytes))) => out(&printer.push(&bytes))?,
            Ok(Some(Frame::End(_))) => break,
            Ok(Some(Frame::Error(error))) => {
                out(&printer.finish())?;
                return Err(crate::client::ClientError::Rpc(error).into());
            }
            Ok(None) => {
                out(&printer.finish())?;
                return Err(hinted(
                    anyhow::anyhow!("The daemon closed the console log stream early"),
                    "the daemon may have restarted; run the command again",
                ));
            }
            Err(error) => {
                out(&printer.finish())?;
                return Err(hinted(
                    anyhow::Error::new(error).context("Reading the console log stream failed"),
                    "the daemon may have restarted; run the command again",
                ));
            }
        }
    }
    out(&printer.finish())
}

/// An agent error of `vm logs --guest`, with a hint when the guest has no
/// `journalctl` to run.
fn journal_error(vm: &str, error: banger_agent_proto::client::ClientError) -> anyhow::Error {
    let missing = matches!(
        &error,
        banger_agent_proto::client::ClientError::Agent(refusal)
            if refusal.message.contains("journalctl") && refusal.message.contains("No such file")
    );
    let error = agent_error(vm, error);
    if missing {
        hinted(
            error.context("The guest has no journalctl"),
            "its init is not systemd; the agent logs to the console: `banger vm logs NAME`",
        )
    } else {
        error
    }
}

/// How long `vm logs --guest` waits for a booting guest's journald.
const JOURNAL_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Exits 0 when there is nothing to wait for: no `journalctl` (the error
/// comes from running it), not a guest booted by banger's initramfs (the
/// agent's copy is missing), or journald runs (it makes its varlink socket
/// itself, unlike the sockets systemd opens for it before it starts).
const JOURNAL_PROBE: &str = "command -v journalctl >/dev/null 2>&1 || exit 0; \
    [ -e /run/banger/agent ] || exit 0; \
    [ -e /run/systemd/journal/io.systemd.journal ]";

/// The agent answers as soon as the guest boots, before the image's init
/// has started journald (under TCG, a minute before): until it runs,
/// `journalctl` finds no journal files at all. Waits (up to
/// [`JOURNAL_WAIT`], saying so once) until it runs; a guest whose agent
/// cannot run the probe is not waited for.
async fn wait_for_journal(agent: &AgentClient, vm: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + JOURNAL_WAIT;
    let mut told = false;
    loop {
        let probe = agent
            .exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), JOURNAL_PROBE.into()],
                ..ExecRequest::default()
            })
            .await;
        // No `sh` to probe with: run journalctl, which says what is wrong.
        let Ok(probe) = probe else { return Ok(()) };
        let Ok(output) = probe.output().await else {
            return Ok(());
        };
        if output.status.code == Some(0) || std::time::Instant::now() >= deadline {
            return Ok(());
        }
        if !told {
            eprintln!(
                "waiting up to {} s for {vm}'s journald (its init is still starting)…",
                JOURNAL_WAIT.as_secs()
            );
            told = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `vm logs --guest`: the guest's journal for this boot, read by running
/// `journalctl` in the guest through the agent (`--lines=N` for `--tail`,
/// `--follow` until Ctrl-C, which is passed on to it), once journald runs.
pub async fn guest_logs(
    socket: &Path,
    reference: &str,
    follow: bool,
    tail: Option<u64>,
    raw: bool,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let agent = connect(socket, reference).await?;
    wait_for_journal(&agent, reference).await?;
    let mut argv: Vec<String> = ["journalctl", "--no-pager", "--boot", "--output=short-iso"]
        .map(str::to_owned)
        .to_vec();
    if let Some(lines) = tail {
        argv.push(format!("--lines={lines}"));
    }
    if follow {
        argv.push("--follow".to_owned());
    }
    let session = agent
        .exec(ExecRequest {
            argv,
            ..ExecRequest::default()
        })
        .await
        .map_err(|error| journal_error(reference, error))?;
    let ExecSession {
        mut stdin,
        mut stdout,
        mut stderr,
        control,
        exit,
    } = session;
    stdin.close();
    let mut printer = LogPrinter::new(raw, json);
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                Some(()) = interrupt.recv() => { let _ = control.signal(libc::SIGINT); }
                Some(()) = terminate.recv() => { let _ = control.signal(libc::SIGTERM); }
                else => break,
            }
        }
    });
    let errors = tokio::spawn(async move {
        let mut err = tokio::io::stderr();
        while let Some(chunk) = stderr.recv().await {
            let text = banger_proto::sanitize::text(&String::from_utf8_lossy(&chunk));
            if err.write_all(text.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stdout.recv().await {
        if out
            .write_all(&printer.push(&chunk))
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    let _ = out.write_all(&printer.finish()).and_then(|()| out.flush());
    let status = exit.wait().await;
    signals.abort();
    let _ = errors.await;
    let status = status.map_err(|error| journal_error(reference, error))?;
    match status.shell_code() {
        0 => Ok(()),
        // Ctrl-C while following is how one leaves.
        130 if follow => Ok(()),
        code => Err(Exit(u8::try_from(code).unwrap_or(255)).into()),
    }
}
