//! How the CLI fails.
//!
//! 1. Commands return [`anyhow::Result`] and add `.context()` on the way
//!    up: each message says what failed, its source says why.
//! 2. A hint for the user rides in the chain: attached with [`Hint::hint`]
//!    (a [`Hinted`] link) or sent by the daemon with its error
//!    ([`ClientError::hint`]). The outermost one wins.
//! 3. [`report`] prints `error: ` and the whole chain on one line
//!    ([`banger_proto::error_chain`]), then `hint: `, and picks the exit
//!    code: 2 when the chain holds a [`UsageError`], else 1. An [`Exit`]
//!    prints nothing and ends with its code: the command has already said
//!    what there is to say, or passes a guest's exit status through.

use std::error::Error;
use std::fmt;
use std::process::ExitCode;

use crate::client::ClientError;
use crate::printer::Printer;

/// An error with what the user can do about it. It stands in for its error
/// in the chain (same message, same sources), so attaching a hint never
/// changes the printed message.
pub struct Hinted {
    error: anyhow::Error,
    hint: String,
}

impl fmt::Debug for Hinted {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Hinted")
            .field("error", &self.error)
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Display for Hinted {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without `{:#}`, anyhow shows only the outermost message.
        fmt::Display::fmt(&self.error, formatter)
    }
}

impl Error for Hinted {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.error.source()
    }
}

/// `error` with `hint` attached.
pub fn hinted(error: impl Into<anyhow::Error>, hint: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Hinted {
        error: error.into(),
        hint: hint.into(),
    })
}

/// Attaches a hint to the error of a `Result`.
pub trait Hint<T> {
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> Hint<T> for Result<T, E> {
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T> {
        self.map_err(|error| hinted(error, hint))
    }
}

/// A command line that cannot work although clap accepted it: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Ends the CLI with this exit code and prints nothing more.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub u8);

/// Every error of the chain, outermost first, including the error each
/// [`Hinted`] link stands in for.
pub(crate) fn links(error: &anyhow::Error) -> Vec<&(dyn Error + 'static)> {
    let mut links = Vec::new();
    for link in error.chain() {
        links.push(link);
        let mut link = link;
        while let Some(hinted) = link.downcast_ref::<Hinted>() {
            link = hinted.error.as_ref();
            links.push(link);
        }
    }
    links
}

fn hint_of(link: &(dyn Error + 'static)) -> Option<String> {
    if let Some(hinted) = link.downcast_ref::<Hinted>() {
        return Some(hinted.hint.clone());
    }
    link.downcast_ref::<ClientError>()
        .and_then(ClientError::hint)
}

/// The outermost hint of the chain.
pub fn hint(error: &anyhow::Error) -> Option<String> {
    links(error).into_iter().find_map(hint_of)
}

/// Prints `error` (module docs, step 3) and returns the exit code.
pub fn report(printer: Printer, error: &anyhow::Error) -> ExitCode {
    let links = links(error);
    if let Some(Exit(code)) = links.iter().find_map(|link| link.downcast_ref::<Exit>()) {
        return ExitCode::from(*code);
    }
    let hint = links.iter().copied().find_map(hint_of);
    printer.error(&banger_proto::error_chain(error.as_ref()), hint.as_deref());
    if links.iter().any(|link| link.is::<UsageError>()) {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    fn io_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file")
    }

    #[test]
    fn hints_do_not_change_the_message_and_the_outermost_wins() {
        let error = Err::<(), _>(io_error())
            .context("Cannot read /x")
            .hint("create it")
            .context("Workspace not prepared")
            .hint("retry later")
            .unwrap_err();
        assert_eq!(
            banger_proto::error_chain(error.as_ref()),
            "Workspace not prepared: Cannot read /x: No such file"
        );
        assert_eq!(hint(&error).as_deref(), Some("retry later"));
    }

    #[test]
    fn daemon_hints_are_found_under_context() {
        let rpc = banger_proto::RpcError::new(banger_proto::ErrorKind::NotFound, "No VM `x`")
            .with_hint("banger vm list");
        let error = Err::<(), _>(ClientError::Rpc(rpc))
            .context("Workspace not prepared")
            .unwrap_err();
        assert_eq!(
            banger_proto::error_chain(error.as_ref()),
            "Workspace not prepared: No VM `x`"
        );
        assert_eq!(hint(&error).as_deref(), Some("banger vm list"));
    }

    #[test]
    fn usage_errors_and_exits_are_found_behind_hints() {
        let error = Err::<(), _>(UsageError("Bad name".into()))
            .hint("use a DNS label")
            .unwrap_err();
        assert!(links(&error).iter().any(|link| link.is::<UsageError>()));
        assert_eq!(hint(&error).as_deref(), Some("use a DNS label"));
        let error = anyhow::Error::new(Exit(130)).context("cancelled");
        assert!(links(&error)
            .iter()
            .any(|link| matches!(link.downcast_ref::<Exit>(), Some(Exit(130)))));
    }
}
