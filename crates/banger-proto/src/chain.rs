//! The one way banger turns an error and its causes into a line.

/// `error: cause: cause …`: the error's message followed by each
/// [`source`](std::error::Error::source), joined with `: `. Messages say
/// what failed and leave the why to their source, so the line reads as one
/// sentence; the CLI prints it after `error:`, the daemon sends it as an RPC
/// error's message and keeps it as a VM's last error. Messages may quote a
/// guest (its console, its agent), so the line goes through
/// [`crate::sanitize::text`]: no control characters or escape sequences.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    crate::sanitize::text(&text)
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("Failed to open the drive of VM `dev`")]
    struct OpenDrive {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn joins_every_cause() {
        let error = OpenDrive {
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
        };
        assert_eq!(
            error_chain(&error),
            "Failed to open the drive of VM `dev`: No such file"
        );
        assert_eq!(error_chain(&error.source), "No such file");
    }

    #[test]
    fn guest_escape_sequences_are_made_visible() {
        let error = OpenDrive {
            source: std::io::Error::other("Agent refused: \x1b]0;owned\x07no\nsuch"),
        };
        assert_eq!(
            error_chain(&error),
            "Failed to open the drive of VM `dev`: Agent refused: \\x1b]0;owned\\x07no\nsuch"
        );
    }
}
