//! The agent's log: to stderr (the console, when booted as init) and, in a
//! guest whose systemd-journald runs, to the journal too, so that
//! `banger vm logs NAME --guest` shows it beside the guest's services.
//!
//! The agent starts before the image's init and so before journald: the
//! journal is attached later, by [`JournalSlot::attach_when_ready`], once
//! journald's socket exists. Lines logged before that are only on the
//! console (`banger vm logs NAME`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// journald's native protocol socket (systemd-journald.socket).
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// The agent's `SYSLOG_IDENTIFIER` in the journal (`journalctl -t banger-agent`).
pub const SYSLOG_IDENTIFIER: &str = "banger-agent";
/// How long to look for journald after boot; a guest without systemd never
/// gets one.
const JOURNAL_WAIT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_secs(1);

/// Where the journal layer goes once journald runs.
pub struct JournalSlot {
    handle: reload::Handle<Option<tracing_journald::Layer>, Registry>,
}

/// Installs the global subscriber: stderr now (level from
/// `BANGER_AGENT_LOG`, default `info`), the journal when it is attached.
pub fn init() -> JournalSlot {
    let (journal, handle) = reload::Layer::new(None::<tracing_journald::Layer>);
    tracing_subscriber::registry()
        .with(journal)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(
            EnvFilter::try_from_env("BANGER_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    JournalSlot { handle }
}

impl JournalSlot {
    /// Waits (up to [`JOURNAL_WAIT`]) for [`JOURNAL_SOCKET`], then logs to
    /// the journal too. Returns whether it did.
    pub async fn attach_when_ready(self) -> bool {
        let socket = Path::new(JOURNAL_SOCKET);
        let deadline = Instant::now() + JOURNAL_WAIT;
        while !socket.exists() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        // journald may not read yet (socket activation queues the
        // datagrams), but a socket nobody will ever serve refuses them.
        let layer = loop {
            match tracing_journald::layer() {
                Ok(layer) => break layer,
                Err(error) if Instant::now() >= deadline => {
                    tracing::warn!("Cannot log to the journal: {error}");
                    return false;
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        };
        let layer = layer.with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned());
        if self.handle.reload(Some(layer)).is_err() {
            return false;
        }
        tracing::info!(
            "logging to the journal too; earlier lines are on the console (`banger vm logs`)"
        );
        true
    }
}
