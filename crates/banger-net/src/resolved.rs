//! systemd-resolved: where it runs, the bridge becomes a link whose DNS
//! server is the daemon's and whose routing domain is `~DOMAIN`, so the host
//! itself resolves `NAME.banger` and sends nothing else there.
//!
//! 1. [`probe`]: resolved runs when its varlink socket
//!    (`/run/systemd/resolve/io.systemd.Resolve`) accepts a connection; an
//!    older resolved without it is recognised by `stub-resolv.conf`. A
//!    daemon in another network namespace than PID 1 (tests, containers)
//!    leaves resolved alone: resolved knows links by index in its own
//!    namespace, so the bridge's index would name some other link there.
//! 2. [`configure`]: `resolvectl dns LINK ADDRESS[:PORT]`, `resolvectl
//!    domain LINK ~DOMAIN`, `resolvectl default-route LINK false` (no other
//!    query goes to the link), through the [`Resolved`] seam.
//! 3. [`revert`]: `resolvectl revert LINK` at teardown. resolved also drops
//!    the settings by itself when the link disappears or resolved restarts;
//!    the daemon applies them again at its next start.
//! 4. [`query`]: what resolved holds for the link now (`resolvectl dns
//!    LINK`, `resolvectl domain LINK`), for `doctor`.
//!
//! resolved uses a link for lookups only while it is up with carrier: the
//! bridge has carrier while at least one VM's tap is open, which is exactly
//! when there are names to resolve.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

/// Where resolved keeps its runtime files.
pub const RUN_DIR: &str = "/run/systemd/resolve";

#[derive(Debug, thiserror::Error)]
pub enum ResolvedError {
    #[error("Failed to run `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`resolvectl {command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// Only [`RecordingResolved`] returns this.
    #[error("Injected failure of `resolvectl {command}`")]
    Injected { command: String },
}

/// Whether the host's resolved can be told about the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    Running,
    NotRunning,
    /// Running, but in another network namespace than the daemon.
    OtherNamespace,
}

/// Looks for resolved under `run_dir` (normally [`RUN_DIR`]) and compares
/// the network namespaces of `self` and PID 1.
#[must_use]
pub fn probe(run_dir: &Path) -> Presence {
    let socket = run_dir.join("io.systemd.Resolve");
    let running = if socket.exists() {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    } else {
        run_dir.join("stub-resolv.conf").exists()
    };
    if !running {
        Presence::NotRunning
    } else if same_network_namespace_as_init() {
        Presence::Running
    } else {
        Presence::OtherNamespace
    }
}

/// Whether this process shares PID 1's network namespace; true when PID 1's
/// cannot be read.
fn same_network_namespace_as_init() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(own), Ok(init)) => own == init,
        _ => true,
    }
}

/// What resolved is told about the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedLink {
    pub link: String,
    /// The DNS server on the gateway.
    pub server: SocketAddrV4,
    /// Routed as `~DOMAIN`.
    pub domain: String,
}

/// The `resolvectl` argument lists that configure `link`, in order.
#[must_use]
pub fn configure_commands(link: &ResolvedLink) -> Vec<Vec<String>> {
    let server = if link.server.port() == 53 {
        link.server.ip().to_string()
    } else {
        link.server.to_string()
    };
    vec![
        vec!["dns".to_owned(), link.link.clone(), server],
        vec![
            "domain".to_owned(),
            link.link.clone(),
            format!("~{}", link.domain),
        ],
        vec![
            "default-route".to_owned(),
            link.link.clone(),
            "false".to_owned(),
        ],
    ]
}

/// The `resolvectl` arguments that drop every setting of `link`.
#[must_use]
pub fn revert_command(link: &str) -> Vec<String> {
    vec!["revert".to_owned(), link.to_owned()]
}

/// Runs `resolvectl` with arguments, returning its standard output.
#[async_trait]
pub trait Resolved: Send + Sync {
    async fn resolvectl(&self, args: &[String]) -> Result<String, ResolvedError>;
}

/// Tells resolved to route `~DOMAIN` to the server on `link`.
///
/// # Errors
/// A `resolvectl` call fails (settings before it stay applied; [`revert`]
/// drops them).
pub async fn configure(resolved: &dyn Resolved, link: &ResolvedLink) -> Result<(), ResolvedError> {
    for command in configure_commands(link) {
        resolved.resolvectl(&command).await?;
    }
    Ok(())
}

/// Drops every setting of `link`.
///
/// # Errors
/// `resolvectl` fails.
pub async fn revert(resolved: &dyn Resolved, link: &str) -> Result<(), ResolvedError> {
    resolved.resolvectl(&revert_command(link)).await.map(drop)
}

/// What resolved holds for a link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkSettings {
    pub servers: Vec<String>,
    pub domains: Vec<String>,
}

impl LinkSettings {
    /// Whether these route `~domain` to `server`.
    #[must_use]
    pub fn routes(&self, link: &ResolvedLink) -> bool {
        let server = &configure_commands(link)[0][2];
        self.servers.iter().any(|found| found == server)
            && self
                .domains
                .iter()
                .any(|found| found == &format!("~{}", link.domain))
    }
}

/// Asks resolved for `link`'s DNS servers and domains.
///
/// # Errors
/// `resolvectl` fails.
pub async fn query(resolved: &dyn Resolved, link: &str) -> Result<LinkSettings, ResolvedError> {
    let servers = resolved
        .resolvectl(&["dns".to_owned(), link.to_owned()])
        .await?;
    let domains = resolved
        .resolvectl(&["domain".to_owned(), link.to_owned()])
        .await?;
    Ok(LinkSettings {
        servers: link_values(&servers),
        domains: link_values(&domains),
    })
}

/// The values of `Link 7 (banger0): A B` lines.
fn link_values(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split_once("): ").map(|(_, values)| values))
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

/// The real `resolvectl`.
#[derive(Clone, Debug)]
pub struct ResolvectlCommand {
    program: PathBuf,
}

impl ResolvectlCommand {
    #[must_use]
    pub fn new() -> Self {
        Self::with_program(Path::new("resolvectl"))
    }

    #[must_use]
    pub fn with_program(program: &Path) -> Self {
        Self {
            program: program.to_owned(),
        }
    }
}

impl Default for ResolvectlCommand {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Resolved for ResolvectlCommand {
    async fn resolvectl(&self, args: &[String]) -> Result<String, ResolvedError> {
        let output = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| ResolvedError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let detail = match stderr.trim() {
                "" => output.status.to_string(),
                text => text.lines().next().unwrap_or(text).to_owned(),
            };
            Err(ResolvedError::Command {
                command: args.join(" "),
                detail,
            })
        }
    }
}

/// A [`Resolved`] that records argument lists and keeps per-link settings
/// the way resolved would, so [`query`] sees what [`configure`] set.
#[derive(Clone, Default)]
pub struct RecordingResolved {
    state: Arc<Mutex<RecordingState>>,
}

#[derive(Default)]
struct RecordingState {
    calls: Vec<Vec<String>>,
    links: std::collections::BTreeMap<String, LinkSettings>,
    fail: Option<String>,
}

impl RecordingResolved {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call whose first argument is `verb` fail.
    pub fn fail(&self, verb: &str) {
        self.state().fail = Some(verb.to_owned());
    }

    #[must_use]
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.state().calls.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RecordingState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Resolved for RecordingResolved {
    async fn resolvectl(&self, args: &[String]) -> Result<String, ResolvedError> {
        let mut state = self.state();
        state.calls.push(args.to_vec());
        if state.fail.as_deref() == args.first().map(String::as_str) {
            return Err(ResolvedError::Injected {
                command: args.join(" "),
            });
        }
        let (Some(verb), Some(link)) = (args.first(), args.get(1)) else {
            return Ok(String::new());
        };
        let values = &args[2..];
        let settings = state.links.entry(link.clone()).or_default();
        let listed = match verb.as_str() {
            "dns" if values.is_empty() => settings.servers.join(" "),
            "domain" if values.is_empty() => settings.domains.join(" "),
            "dns" => {
                settings.servers = values.to_vec();
                return Ok(String::new());
            }
            "domain" => {
                settings.domains = values.to_vec();
                return Ok(String::new());
            }
            "revert" => {
                state.links.remove(link);
                return Ok(String::new());
            }
            _ => return Ok(String::new()),
        };
        Ok(format!("Link 7 ({link}): {listed}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(port: u16) -> ResolvedLink {
        ResolvedLink {
            link: "banger0".to_owned(),
            server: SocketAddrV4::new([172, 30, 0, 1].into(), port),
            domain: "banger".to_owned(),
        }
    }

    #[test]
    fn commands_name_the_link_server_and_routing_domain() {
        assert_eq!(
            configure_commands(&link(53)),
            [
                ["dns", "banger0", "172.30.0.1"],
                ["domain", "banger0", "~banger"],
                ["default-route", "banger0", "false"],
            ]
        );
        assert_eq!(configure_commands(&link(5353))[0][2], "172.30.0.1:5353");
        assert_eq!(revert_command("banger0"), ["revert", "banger0"]);
    }

    #[test]
    fn link_values_parse_resolvectl_output() {
        assert_eq!(
            link_values("Link 7 (banger0): 172.30.0.1 10.0.0.1\n"),
            ["172.30.0.1", "10.0.0.1"]
        );
        assert_eq!(link_values("Link 7 (banger0): ~banger\n"), ["~banger"]);
        assert!(link_values("Link 7 (banger0):\n").is_empty());
        assert!(link_values("").is_empty());
    }

    #[tokio::test]
    async fn configure_query_and_revert_through_the_seam() {
        let resolved = RecordingResolved::new();
        let link = link(53);
        assert!(!query(&resolved, "banger0").await.unwrap().routes(&link));
        configure(&resolved, &link).await.unwrap();
        let settings = query(&resolved, "banger0").await.unwrap();
        assert_eq!(settings.servers, ["172.30.0.1"]);
        assert!(settings.routes(&link));
        assert!(!settings.routes(&ResolvedLink {
            domain: "other".to_owned(),
            ..link.clone()
        }));
        revert(&resolved, "banger0").await.unwrap();
        assert!(!query(&resolved, "banger0").await.unwrap().routes(&link));
        assert_eq!(resolved.calls()[2..5], configure_commands(&link)[..]);
    }

    #[tokio::test]
    async fn a_failing_step_stops_configuration() {
        let resolved = RecordingResolved::new();
        resolved.fail("domain");
        let error = configure(&resolved, &link(53)).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "Injected failure of `resolvectl domain banger0 ~banger`"
        );
        assert_eq!(resolved.calls().len(), 2);
    }

    #[test]
    fn probe_reads_the_run_dir() {
        let dir = std::env::temp_dir().join(format!("banger-resolved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(probe(&dir), Presence::NotRunning);
        // A stale socket nobody listens on is not a running resolved.
        let socket = dir.join("io.systemd.Resolve");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert_eq!(probe(&dir), Presence::NotRunning);
        std::fs::remove_file(&socket).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_ne!(probe(&dir), Presence::NotRunning);
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn real_resolvectl_failures_are_one_line() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let error = runtime
            .block_on(
                ResolvectlCommand::with_program(Path::new("/nonexistent/resolvectl"))
                    .resolvectl(&revert_command("banger0")),
            )
            .unwrap_err();
        assert_eq!(error.to_string(), "Failed to run `/nonexistent/resolvectl`");
        let error = runtime
            .block_on(
                ResolvectlCommand::with_program(Path::new("false"))
                    .resolvectl(&revert_command("banger0")),
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "`resolvectl revert banger0` failed: exit status: 1"
        );
    }
}
