//! NAT and forwarding for guests, in one nftables table owned by banger.
//!
//! The table is `inet banger` ([`TABLE_FAMILY`], [`TABLE_NAME`]); nothing
//! else of the host's ruleset is touched. Applying works like this:
//!
//! 1. [`ruleset`] renders the whole table from a [`NatConfig`] as an
//!    `nft -f` script that first declares the table (a no-op if it exists),
//!    then deletes it, then defines it afresh.
//! 2. [`Nft::run_script`] feeds the script to `nft -f -`. nft applies one
//!    script as one transaction, so the table is replaced atomically and N
//!    applies leave exactly one copy of each rule; a failed apply leaves the
//!    previous table in place.
//! 3. [`remove_script`] deletes the table the same way (declare, delete), so
//!    removing an absent table succeeds.
//!
//! The table has two chains:
//! - `postrouting` (nat, srcnat): traffic from the subnet leaving through the
//!   uplink (the default-route interface) is masqueraded.
//! - `forward` (filter, policy accept): bridge → uplink from the subnet is
//!   accepted, uplink → bridge only for established/related connections
//!   (nothing outside can open a connection to a guest), and with
//!   `isolate_vms` bridge → bridge is dropped.
//!
//! Isolation between VMs has two halves. Frames between two taps of one
//! bridge are switched at layer 2 and never reach the `inet` forward hook
//! (unless `br_netfilter` is loaded), so the daemon also attaches taps with
//! the bridge port `isolated` flag ([`crate::netlink::HostNetwork::attach_to_bridge`]):
//! isolated ports cannot exchange frames. The `forward` rule covers the
//! other path, a guest routing to another guest through the gateway.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::ipam::Subnet;

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "banger";

/// What the NAT table is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// The bridge the guests' taps are attached to.
    pub bridge: String,
    pub subnet: Subnet,
    /// The interface guest traffic leaves through, usually
    /// [`crate::netlink::HostNetwork::default_route_interface`].
    pub uplink: String,
    /// Drop traffic between VMs.
    pub isolate_vms: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("Failed to run `{program}`")]
    SpawnNft {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the ruleset: {stderr}")]
    ApplyRuleset { stderr: String },
    #[error("Failed to list the nftables ruleset: {stderr}")]
    ListRuleset { stderr: String },
    #[error("nft printed JSON that could not be read")]
    ParseJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("Interface name `{name}` cannot be used in a ruleset")]
    InvalidInterface { name: String },
    /// Only [`RecordingNft`] returns this.
    #[error("Injected nft failure")]
    Injected,
}

/// The nft script that (re)creates banger's table from `config`.
///
/// # Errors
/// An interface name that is not a valid interface name (it would be
/// interpolated into the script).
pub fn ruleset(config: &NatConfig) -> Result<String, NatError> {
    for name in [&config.bridge, &config.uplink] {
        if !crate::netlink::is_valid_interface_name(name)
            || name.contains('"')
            || name.contains('\\')
        {
            return Err(NatError::InvalidInterface { name: name.clone() });
        }
    }
    let NatConfig {
        bridge,
        uplink,
        isolate_vms,
        ..
    } = config;
    let network = config.subnet.network_cidr();
    let isolation = if *isolate_vms {
        format!("\t\tiifname \"{bridge}\" oifname \"{bridge}\" drop\n")
    } else {
        String::new()
    };
    Ok(format!(
        "table {TABLE_FAMILY} {TABLE_NAME}\n\
         delete table {TABLE_FAMILY} {TABLE_NAME}\n\
         table {TABLE_FAMILY} {TABLE_NAME} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         {isolation}\
         \t\tiifname \"{bridge}\" oifname \"{uplink}\" ip saddr {network} accept\n\
         \t\tiifname \"{uplink}\" oifname \"{bridge}\" ip daddr {network} ct state established,related accept\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{uplink}\" ip saddr {network} masquerade\n\
         \t}}\n\
         }}\n"
    ))
}

/// The nft script that deletes banger's table; succeeds if it is absent.
#[must_use]
pub fn remove_script() -> String {
    format!("table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n")
}

/// What `nft -j list ruleset` says about banger's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSummary {
    /// How many `inet banger` tables exist (0 or 1, unless something is
    /// badly wrong).
    pub tables: usize,
    pub chains: usize,
    pub rules: usize,
}

/// Counts banger's tables, chains and rules in `nft -j list ruleset` output.
///
/// # Errors
/// The text is not JSON.
pub fn summarize(ruleset_json: &str) -> Result<TableSummary, NatError> {
    let value: serde_json::Value =
        serde_json::from_str(ruleset_json).map_err(|source| NatError::ParseJson { source })?;
    let ours = |object: &serde_json::Value| {
        object.get("family").and_then(serde_json::Value::as_str) == Some(TABLE_FAMILY)
            && (object.get("table").or_else(|| object.get("name")))
                .and_then(serde_json::Value::as_str)
                == Some(TABLE_NAME)
    };
    let mut summary = TableSummary::default();
    let items = value
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for item in items {
        if let Some(table) = item.get("table") {
            summary.tables += usize::from(ours(table));
        } else if let Some(chain) = item.get("chain") {
            summary.chains += usize::from(chain.get("table").is_some() && ours(chain));
        } else if let Some(rule) = item.get("rule") {
            summary.rules += usize::from(ours(rule));
        }
    }
    Ok(summary)
}

/// Running nft.
#[async_trait]
pub trait Nft: Send + Sync {
    /// Applies a script as one transaction (`nft -f -`).
    async fn run_script(&self, script: &str) -> Result<(), NatError>;

    /// `nft -j list ruleset`.
    async fn list_ruleset_json(&self) -> Result<String, NatError>;
}

/// Replaces banger's table with the one `config` describes.
///
/// # Errors
/// The ruleset cannot be rendered or nft refuses it.
pub async fn apply(nft: &dyn Nft, config: &NatConfig) -> Result<(), NatError> {
    nft.run_script(&ruleset(config)?).await
}

/// Deletes banger's table (on daemon shutdown / teardown).
///
/// # Errors
/// nft fails.
pub async fn remove(nft: &dyn Nft) -> Result<(), NatError> {
    nft.run_script(&remove_script()).await
}

/// The real nft binary.
///
/// It runs in the network namespace of the thread that spawns it.
#[derive(Clone, Debug)]
pub struct NftCommand {
    program: String,
}

impl NftCommand {
    /// `nft` from `PATH`.
    #[must_use]
    pub fn new() -> Self {
        Self::with_program("nft")
    }

    #[must_use]
    pub fn with_program(program: &str) -> Self {
        Self {
            program: program.to_owned(),
        }
    }

    fn spawn_error(&self, source: std::io::Error) -> NatError {
        NatError::SpawnNft {
            program: self.program.clone(),
            source,
        }
    }
}

impl Default for NftCommand {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Nft for NftCommand {
    async fn run_script(&self, script: &str) -> Result<(), NatError> {
        let mut child = tokio::process::Command::new(&self.program)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|source| self.spawn_error(source))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(NatError::ApplyRuleset {
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    async fn list_ruleset_json(&self) -> Result<String, NatError> {
        let output = tokio::process::Command::new(&self.program)
            .args(["-j", "list", "ruleset"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(NatError::ListRuleset {
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// An [`Nft`] that records scripts and answers listings with a canned
/// ruleset.
#[derive(Clone, Default)]
pub struct RecordingNft {
    scripts: Arc<Mutex<Vec<String>>>,
    fail: Arc<Mutex<bool>>,
    listing: Arc<Mutex<String>>,
}

impl RecordingNft {
    #[must_use]
    pub fn new() -> Self {
        Self {
            listing: Arc::new(Mutex::new("{\"nftables\": []}".to_owned())),
            ..Self::default()
        }
    }

    /// Every script run so far.
    #[must_use]
    pub fn scripts(&self) -> Vec<String> {
        lock(&self.scripts).clone()
    }

    /// Makes the following `run_script` calls fail.
    pub fn fail_scripts(&self, fail: bool) {
        *lock(&self.fail) = fail;
    }

    /// What `list_ruleset_json` returns.
    pub fn set_listing(&self, json: &str) {
        json.clone_into(&mut lock(&self.listing));
    }
}

#[async_trait]
impl Nft for RecordingNft {
    async fn run_script(&self, script: &str) -> Result<(), NatError> {
        lock(&self.scripts).push(script.to_owned());
        if *lock(&self.fail) {
            return Err(NatError::Injected);
        }
        Ok(())
    }

    async fn list_ruleset_json(&self) -> Result<String, NatError> {
        Ok(lock(&self.listing).clone())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(isolate_vms: bool) -> NatConfig {
        NatConfig {
            bridge: "banger0".to_owned(),
            subnet: Subnet::default(),
            uplink: "eth0".to_owned(),
            isolate_vms,
        }
    }

    #[test]
    fn ruleset_text() {
        assert_eq!(
            ruleset(&config(true)).unwrap(),
            "table inet banger\n\
             delete table inet banger\n\
             table inet banger {\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"banger0\" oifname \"banger0\" drop\n\
             \t\tiifname \"banger0\" oifname \"eth0\" ip saddr 172.30.0.0/24 accept\n\
             \t\tiifname \"eth0\" oifname \"banger0\" ip daddr 172.30.0.0/24 ct state established,related accept\n\
             \t}\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"eth0\" ip saddr 172.30.0.0/24 masquerade\n\
             \t}\n\
             }\n"
        );
        let open = ruleset(&config(false)).unwrap();
        assert!(!open.contains("drop"));
        assert_eq!(
            open.lines().count(),
            ruleset(&config(true)).unwrap().lines().count() - 1
        );
    }

    #[test]
    fn ruleset_refuses_interface_names_that_could_inject() {
        for uplink in ["eth0\" accept", "", "a\\b", "sixteen-chars-xx"] {
            let config = NatConfig {
                uplink: uplink.to_owned(),
                ..config(false)
            };
            assert!(
                matches!(ruleset(&config), Err(NatError::InvalidInterface { .. })),
                "{uplink}"
            );
        }
    }

    #[test]
    fn remove_script_tolerates_an_absent_table() {
        assert_eq!(
            remove_script(),
            "table inet banger\ndelete table inet banger\n"
        );
    }

    #[test]
    fn summarize_counts_only_bangers_table() {
        let json = r#"{"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "banger", "handle": 1}},
            {"table": {"family": "ip", "name": "banger", "handle": 2}},
            {"table": {"family": "inet", "name": "filter", "handle": 3}},
            {"chain": {"family": "inet", "table": "banger", "name": "forward", "handle": 1}},
            {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1}},
            {"rule": {"family": "inet", "table": "banger", "chain": "forward", "handle": 3, "expr": []}},
            {"rule": {"family": "inet", "table": "banger", "chain": "forward", "handle": 4, "expr": []}},
            {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 5, "expr": []}}
        ]}"#;
        assert_eq!(
            summarize(json).unwrap(),
            TableSummary {
                tables: 1,
                chains: 1,
                rules: 2
            }
        );
        assert!(summarize("nope").is_err());
    }

    #[tokio::test]
    async fn apply_and_remove_go_through_nft() {
        let nft = RecordingNft::new();
        apply(&nft, &config(true)).await.unwrap();
        remove(&nft).await.unwrap();
        assert_eq!(
            nft.scripts(),
            [ruleset(&config(true)).unwrap(), remove_script()]
        );
        nft.fail_scripts(true);
        assert!(matches!(
            apply(&nft, &config(true)).await,
            Err(NatError::Injected)
        ));
    }
}
