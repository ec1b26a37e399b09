//! The test-steering knobs, read once from the environment at start-up.
//!
//! Variable names and semantics are documented in the parent module. A
//! malformed value is a start-up error (exit 1): a typo in a test's fault
//! plan must not silently turn into "no fault".

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;

pub const REQUEST_LOG_VAR: &str = "FAKE_FIRECRACKER_REQUEST_LOG";
pub const FAIL_VAR: &str = "FAKE_FIRECRACKER_FAIL";
pub const DELAY_VAR: &str = "FAKE_FIRECRACKER_DELAY";
pub const EXIT_AFTER_BOOT_VAR: &str = "FAKE_FIRECRACKER_EXIT_AFTER_BOOT_MS";
pub const VSOCK_AGENT_VAR: &str = "FAKE_FIRECRACKER_VSOCK_AGENT";
/// A `banger-agent` binary run per VM in test mode as its guest.
pub const GUEST_AGENT_BIN_VAR: &str = "FAKE_FIRECRACKER_GUEST_AGENT_BIN";
/// The SSH config dir that guest agent reads host keys from.
pub const GUEST_AGENT_SSH_DIR_VAR: &str = "FAKE_FIRECRACKER_GUEST_AGENT_SSH_DIR";
/// The `PATH` that guest agent runs commands with (stand-in guest programs).
pub const GUEST_AGENT_COMMAND_PATH_VAR: &str = "FAKE_FIRECRACKER_GUEST_AGENT_COMMAND_PATH";
/// Extra text the "guest" writes on its console at boot.
pub const CONSOLE_TEXT_VAR: &str = "FAKE_FIRECRACKER_CONSOLE_TEXT";
/// Set by `fake-jailer`: the descriptor of the root launcher that runs the
/// guest agent for a jailed (unprivileged) fake.
pub const GUEST_LAUNCHER_FD_VAR: &str = "FAKE_FIRECRACKER_GUEST_LAUNCHER_FD";

/// Everything the environment can change about the fake's behaviour.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Append one JSON line per request here.
    pub request_log: Option<PathBuf>,
    /// Requests answered 400 "injected failure" without being processed.
    pub failures: Vec<RequestPattern>,
    /// Requests held for a while before being processed.
    pub delays: Vec<(RequestPattern, Duration)>,
    /// Exit with code 1 this long after a successful `InstanceStart`.
    pub exit_after_boot: Option<Duration>,
    /// Where the vsock bridge connects guest ports to.
    pub vsock_agent: Option<PathBuf>,
    /// Run this agent binary per VM as its guest (overrides `vsock_agent`).
    pub guest_agent_bin: Option<PathBuf>,
    pub guest_agent_ssh_dir: Option<PathBuf>,
    /// Written on the console after the boot lines, as it is.
    pub console_text: Option<String>,
}

/// A malformed steering variable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name} is not valid UTF-8")]
    NotUnicode { name: &'static str },
    #[error("{name}: invalid entry {entry:?}: {reason}")]
    InvalidEntry {
        name: &'static str,
        entry: String,
        reason: &'static str,
    },
}

impl Settings {
    /// Reads the `FAKE_FIRECRACKER_*` variables.
    ///
    /// # Errors
    /// A variable is set but malformed.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(std::env::var_os)
    }

    /// Reads the variables through `lookup`, so tests need not touch the
    /// process environment.
    ///
    /// # Errors
    /// A variable is set but malformed.
    pub fn from_lookup(
        lookup: impl Fn(&'static str) -> Option<OsString>,
    ) -> Result<Self, SettingsError> {
        let text = |name: &'static str| -> Result<Option<String>, SettingsError> {
            lookup(name)
                .map(|value| {
                    value
                        .into_string()
                        .map_err(|_| SettingsError::NotUnicode { name })
                })
                .transpose()
                .map(|value| value.filter(|value| !value.trim().is_empty()))
        };
        let failures = match text(FAIL_VAR)? {
            Some(value) => entries(&value)
                .map(|entry| {
                    RequestPattern::parse(entry).map_err(|reason| invalid(FAIL_VAR, entry, reason))
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let delays = match text(DELAY_VAR)? {
            Some(value) => entries(&value)
                .map(|entry| parse_delay(entry).map_err(|reason| invalid(DELAY_VAR, entry, reason)))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let exit_after_boot = text(EXIT_AFTER_BOOT_VAR)?
            .map(|value| {
                parse_millis(&value).map_err(|reason| invalid(EXIT_AFTER_BOOT_VAR, &value, reason))
            })
            .transpose()?;
        Ok(Self {
            request_log: lookup(REQUEST_LOG_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            failures,
            delays,
            exit_after_boot,
            vsock_agent: lookup(VSOCK_AGENT_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            guest_agent_bin: lookup(GUEST_AGENT_BIN_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            guest_agent_ssh_dir: lookup(GUEST_AGENT_SSH_DIR_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            console_text: text(CONSOLE_TEXT_VAR)?,
        })
    }

    /// Whether a failure is injected for this request.
    pub fn fails(&self, method: &Method, path: &str) -> bool {
        self.failures
            .iter()
            .any(|pattern| pattern.matches(method, path))
    }

    /// How long to hold this request: the first matching entry wins.
    pub fn delay(&self, method: &Method, path: &str) -> Option<Duration> {
        self.delays
            .iter()
            .find(|(pattern, _)| pattern.matches(method, path))
            .map(|(_, delay)| *delay)
    }
}

fn entries(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

fn invalid(name: &'static str, entry: &str, reason: &'static str) -> SettingsError {
    SettingsError::InvalidEntry {
        name,
        entry: entry.to_owned(),
        reason,
    }
}

fn parse_delay(entry: &str) -> Result<(RequestPattern, Duration), &'static str> {
    let (pattern, millis) = entry
        .rsplit_once('=')
        .ok_or("expected `METHOD /path=MILLISECONDS`")?;
    Ok((
        RequestPattern::parse(pattern.trim())?,
        parse_millis(millis)?,
    ))
}

fn parse_millis(value: &str) -> Result<Duration, &'static str> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| "expected a whole number of milliseconds")
}

/// `METHOD /path` (exact) or `METHOD /prefix*` (prefix); the method is
/// matched case-insensitively and `*` matches any method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPattern {
    /// Upper-case method, or `None` for any.
    method: Option<String>,
    path: PathPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl RequestPattern {
    /// Parses `METHOD /path` or `METHOD /prefix*`.
    ///
    /// # Errors
    /// The entry is not two words, or the path does not start with `/`.
    pub fn parse(entry: &str) -> Result<Self, &'static str> {
        let (method, path) = entry
            .split_once(char::is_whitespace)
            .ok_or("expected `METHOD /path`")?;
        let path = path.trim();
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return Err("the path must start with `/` and contain no spaces");
        }
        let method = (method != "*").then(|| method.to_ascii_uppercase());
        let path = match path.strip_suffix('*') {
            Some(prefix) => PathPattern::Prefix(prefix.to_owned()),
            None => PathPattern::Exact(path.to_owned()),
        };
        Ok(Self { method, path })
    }

    /// Whether a request with this method and path matches.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        let method_matches = self
            .method
            .as_deref()
            .is_none_or(|expected| expected == method.as_str());
        method_matches
            && match &self.path {
                PathPattern::Exact(exact) => path == exact,
                PathPattern::Prefix(prefix) => path.starts_with(prefix.as_str()),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&'static str, &str)]) -> Result<Settings, SettingsError> {
        let pairs: Vec<(&'static str, OsString)> = pairs
            .iter()
            .map(|(name, value)| (*name, OsString::from(value)))
            .collect();
        Settings::from_lookup(|name| {
            pairs
                .iter()
                .find(|(candidate, _)| *candidate == name)
                .map(|(_, value)| value.clone())
        })
    }

    #[test]
    fn failure_patterns_exact_and_prefix() {
        let settings = settings(&[(FAIL_VAR, "PUT /drives/rootfs, patch /vm ,GET /vm*")]).unwrap();
        assert!(settings.fails(&Method::PUT, "/drives/rootfs"));
        assert!(!settings.fails(&Method::PUT, "/drives/rootfs2"));
        assert!(!settings.fails(&Method::GET, "/drives/rootfs"));
        assert!(settings.fails(&Method::PATCH, "/vm"));
        assert!(settings.fails(&Method::GET, "/vm/config"));
        assert!(!settings.fails(&Method::GET, "/version"));
    }

    #[test]
    fn any_method_wildcard() {
        let settings = settings(&[(FAIL_VAR, "* /drives/*")]).unwrap();
        assert!(settings.fails(&Method::PUT, "/drives/a"));
        assert!(settings.fails(&Method::PATCH, "/drives/b"));
        assert!(!settings.fails(&Method::PUT, "/boot-source"));
    }

    #[test]
    fn delays_parse_and_first_match_wins() {
        let settings = settings(&[(DELAY_VAR, "PUT /actions=2000,PUT /*=5")]).unwrap();
        assert_eq!(
            settings.delay(&Method::PUT, "/actions"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            settings.delay(&Method::PUT, "/vsock"),
            Some(Duration::from_millis(5))
        );
        assert_eq!(settings.delay(&Method::GET, "/"), None);
    }

    #[test]
    fn malformed_values_are_errors() {
        assert!(settings(&[(FAIL_VAR, "PUT")]).is_err());
        assert!(settings(&[(FAIL_VAR, "PUT drives")]).is_err());
        assert!(settings(&[(DELAY_VAR, "PUT /actions")]).is_err());
        assert!(settings(&[(DELAY_VAR, "PUT /actions=soon")]).is_err());
        assert!(settings(&[(EXIT_AFTER_BOOT_VAR, "-5")]).is_err());
    }

    #[test]
    fn unset_and_empty_mean_off() {
        let settings = settings(&[(FAIL_VAR, ""), (REQUEST_LOG_VAR, "")]).unwrap();
        assert!(settings.failures.is_empty());
        assert!(settings.request_log.is_none());
        assert!(settings.exit_after_boot.is_none());
    }
}
