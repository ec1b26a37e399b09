//! A snapshot of everything on the host a [`TestDaemon`] can make, to
//! compare before and after an operation (or a crash) with a readable diff.
//!
//! Each kind of thing is a named category of normalised lines:
//! - `link`, `address`, `nft`: the network namespace the daemon runs in
//!   (`TestDaemon::netns`); with no namespace, only links and nft tables
//!   named like banger's (`banger*`, `bgtap*`, `bgpool*`). nft rules lose
//!   their handles and counters.
//! - `mount`: mount points under the state dir.
//! - `loop`: loop devices backed by a file under the state dir; `dm`:
//!   device-mapper targets named after the state dir's VMs (when `dmsetup`
//!   exists).
//! - `process`: processes (other than bangerd itself) whose command line or
//!   working directory is under the state dir, and the VMMs and guest
//!   agents `TestDaemon` finds (jailed ones name only paths in their jail),
//!   without their pid.
//! - `file`: every path under the state dir, except the store's own files.
//! - `store:<table>`: every row of every store table, as JSON.
//!
//! [`HostState::diff`] lists what appeared (`+`) and vanished (`-`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::test_daemon::TestDaemon;

/// Categories of lines; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostState {
    pub categories: BTreeMap<String, BTreeSet<String>>,
}

impl HostState {
    /// Takes the snapshot of `daemon`'s host state now.
    pub fn capture(daemon: &TestDaemon) -> Self {
        let mut state = Self::default();
        state.capture_network(daemon.netns.as_deref());
        let root = daemon.state_dir.display().to_string();
        state.set("mount", mounts_under(&root));
        state.set("loop", loops_under(&root));
        state.set("dm", dm_targets(&daemon.state_dir));
        let mut extra = daemon.vmm_pids();
        extra.extend(daemon.guest_agent_pids());
        state.set("process", processes_under(&root, daemon.pid(), &extra));
        state.set("file", files_under(&daemon.state_dir));
        for (table, rows) in store_rows(&daemon.state_dir.join("state.db")) {
            state.set(&format!("store:{table}"), rows);
        }
        state
    }

    fn set(&mut self, category: &str, lines: impl IntoIterator<Item = String>) {
        self.categories
            .insert(category.to_owned(), lines.into_iter().collect());
    }

    /// The lines of one category (empty when absent).
    pub fn lines(&self, category: &str) -> BTreeSet<String> {
        self.categories.get(category).cloned().unwrap_or_default()
    }

    /// This snapshot without the categories `names` (exact names, or a
    /// prefix ending in `:` such as `store:`).
    #[must_use]
    pub fn without(mut self, names: &[&str]) -> Self {
        self.categories.retain(|category, _| {
            !names
                .iter()
                .any(|name| category == name || (name.ends_with(':') && category.starts_with(name)))
        });
        self
    }

    /// This snapshot without the lines that contain any of `needles` (the
    /// ids of VMs allowed to differ, say).
    #[must_use]
    pub fn without_lines_containing(mut self, needles: &[&str]) -> Self {
        for lines in self.categories.values_mut() {
            lines.retain(|line| !needles.iter().any(|needle| line.contains(needle)));
        }
        self
    }

    /// `+ category: line` for what `after` has and `self` has not, `-` for
    /// the reverse; empty when equal.
    pub fn diff(&self, after: &Self) -> Vec<String> {
        let names: BTreeSet<&String> = self
            .categories
            .keys()
            .chain(after.categories.keys())
            .collect();
        let mut diff = Vec::new();
        for name in names {
            let before = self.lines(name);
            let now = after.lines(name);
            diff.extend(
                before
                    .difference(&now)
                    .map(|line| format!("- {name}: {line}")),
            );
            diff.extend(
                now.difference(&before)
                    .map(|line| format!("+ {name}: {line}")),
            );
        }
        diff
    }

    /// Panics with the readable diff unless `after` equals this snapshot.
    pub fn assert_same(&self, after: &Self, context: &str) {
        let diff = self.diff(after);
        assert!(
            diff.is_empty(),
            "{context}: host state changed:\n{}",
            diff.join("\n")
        );
    }

    fn capture_network(&mut self, netns: Option<&str>) {
        let run = |program: &str, args: &[&str]| -> String {
            let mut command = match netns {
                Some(netns) => {
                    let mut command = Command::new("ip");
                    command.args(["netns", "exec", netns, program]);
                    command
                }
                None => Command::new(program),
            };
            command
                .args(args)
                .output()
                .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
                .unwrap_or_default()
        };
        let ours = |name: &str| {
            netns.is_some()
                || name.starts_with("banger")
                || name.starts_with("bgtap")
                || name.starts_with("bgpool")
        };
        let links = run("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ": ");
                let _index = fields.next()?;
                let name = fields.next()?;
                let rest = fields.next().unwrap_or_default();
                let name = name.split('@').next().unwrap_or(name);
                // Flags, master and state; not counters or the index.
                let master = rest
                    .split_whitespace()
                    .skip_while(|word| *word != "master")
                    .nth(1)
                    .map(|master| format!(" master {master}"))
                    .unwrap_or_default();
                let flags = rest.split_whitespace().next().unwrap_or_default();
                ours(name).then(|| format!("{name} {flags}{master}"))
            })
            .collect::<Vec<_>>();
        self.set("link", links);
        let addresses = run("ip", &["-o", "address", "show"])
            .lines()
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let name = *words.get(1)?;
                let family = *words.get(2)?;
                let address = *words.get(3)?;
                ours(name).then(|| format!("{name} {family} {address}"))
            })
            .collect::<Vec<_>>();
        self.set("address", addresses);
        let ruleset = run("nft", &["list", "ruleset"]);
        self.set("nft", normalise_ruleset(&ruleset, |table| ours(table)));
    }
}

/// `nft list ruleset` as `table FAMILY NAME | chain … | line` lines, without
/// handles and counters, for the tables `keep` accepts by name.
pub fn normalise_ruleset(ruleset: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut table: Option<String> = None;
    let mut block = String::new();
    for raw in ruleset.lines() {
        // `nft -a` style handle comments.
        let line = raw.split(" # handle").next().unwrap_or(raw).trim();
        if let Some(rest) = line.strip_prefix("table ") {
            let rest = rest.trim_end_matches('{').trim();
            let name = rest.split_whitespace().last().unwrap_or_default();
            table = keep(name).then(|| format!("table {rest}"));
            block.clear();
            continue;
        }
        let Some(table) = &table else { continue };
        if line.is_empty() || line == "}" {
            continue;
        }
        if line.ends_with('{') {
            block = line.trim_end_matches('{').trim().to_owned();
            continue;
        }
        let mut words: Vec<&str> = Vec::new();
        let mut tokens = line.split_whitespace().peekable();
        while let Some(word) = tokens.next() {
            match word {
                "counter" => {
                    // `counter packets N bytes M`
                    if tokens.peek() == Some(&"packets") {
                        for _ in 0..4 {
                            tokens.next();
                        }
                    }
                }
                word => words.push(word),
            }
        }
        lines.push(format!("{table} | {block} | {}", words.join(" ")));
    }
    lines
}

fn mounts_under(root: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mount_point = line.split_whitespace().nth(4)?;
            mount_point
                .starts_with(root)
                .then(|| mount_point.to_owned())
        })
        .collect()
}

fn loops_under(root: &str) -> Vec<String> {
    let output = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output();
    let Ok(output) = output else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let device = words.next()?;
            let file = words.next()?;
            file.starts_with(root).then(|| format!("{device} {file}"))
        })
        .collect()
}

/// Device-mapper targets whose name mentions a VM directory of this state
/// dir (banger names them after the VM id).
fn dm_targets(state_dir: &Path) -> Vec<String> {
    let ids: Vec<String> = std::fs::read_dir(state_dir.join("vms"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Ok(output) = Command::new("dmsetup").args(["ls"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.contains("banger") || ids.iter().any(|id| name.contains(id.as_str())))
        .map(str::to_owned)
        .collect()
}

fn processes_under(root: &str, daemon: Option<u32>, extra: &[u32]) -> Vec<String> {
    let mut processes = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return processes;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if Some(pid) == daemon || pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // bangerd (a previous one, or the one under `ip netns exec`) is
        // not a leak; its command line names the state dir as a flag.
        if cmdline.contains("--state-dir") {
            continue;
        }
        let cwd = std::fs::read_link(entry.path().join("cwd"))
            .map(|cwd| cwd.display().to_string())
            .unwrap_or_default();
        if cmdline.contains(root) || cwd.starts_with(root) || extra.contains(&pid) {
            processes.push(format!("{} (cwd {cwd})", cmdline.trim_end()));
        }
    }
    processes
}

fn files_under(state_dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![state_dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let relative = path
                .strip_prefix(state_dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            if relative.starts_with("state.db") {
                continue;
            }
            let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
            if is_dir {
                pending.push(path);
                files.push(format!("{relative}/"));
            } else {
                files.push(relative);
            }
        }
    }
    files
}

/// Every row of every table of the store at `path`, as JSON arrays.
fn store_rows(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut tables = BTreeMap::new();
    if !path.exists() {
        return tables;
    }
    let Ok(connection) = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return tables;
    };
    let _ = connection.busy_timeout(std::time::Duration::from_secs(5));
    let names: Vec<String> = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default();
    for name in names {
        let rows = connection
            .prepare(&format!("SELECT * FROM \"{name}\""))
            .and_then(|mut statement| {
                let columns = statement.column_count();
                statement
                    .query_map([], |row| {
                        let mut values = Vec::with_capacity(columns);
                        for index in 0..columns {
                            let value: rusqlite::types::Value = row.get(index)?;
                            values.push(match value {
                                rusqlite::types::Value::Null => serde_json::Value::Null,
                                rusqlite::types::Value::Integer(number) => number.into(),
                                rusqlite::types::Value::Real(number) => number.into(),
                                rusqlite::types::Value::Text(text) => text.into(),
                                rusqlite::types::Value::Blob(blob) => {
                                    format!("<{} bytes>", blob.len()).into()
                                }
                            });
                        }
                        Ok(serde_json::Value::Array(values).to_string())
                    })?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_default();
        tables.insert(name, rows);
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_loses_handles_and_counters_and_other_tables() {
        let ruleset = "table inet banger { # handle 7\n\tchain postrouting { # handle 1\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr 172.30.0.0/24 counter packets 12 bytes 3456 masquerade # handle 4\n\t}\n}\ntable ip other { # handle 9\n\tchain x { # handle 1\n\t\tcounter packets 1 bytes 2 accept # handle 2\n\t}\n}\n";
        let lines = normalise_ruleset(ruleset, |name| name == "banger");
        assert_eq!(
            lines,
            vec![
                "table inet banger | chain postrouting | type nat hook postrouting priority srcnat; policy accept;",
                "table inet banger | chain postrouting | ip saddr 172.30.0.0/24 masquerade",
            ]
        );
    }

    #[test]
    fn diff_names_what_appeared_and_vanished() {
        let mut before = HostState::default();
        before.set("file", ["vms/a/".to_owned(), "images/x".to_owned()]);
        let mut after = HostState::default();
        after.set("file", ["vms/b/".to_owned(), "images/x".to_owned()]);
        after.set("loop", ["/dev/loop3 /s/vms/b/root.ext4".to_owned()]);
        assert_eq!(
            before.diff(&after),
            vec![
                "- file: vms/a/",
                "+ file: vms/b/",
                "+ loop: /dev/loop3 /s/vms/b/root.ext4",
            ]
        );
        assert!(before.diff(&before).is_empty());
        assert!(before
            .clone()
            .without_lines_containing(&["vms/a"])
            .diff(
                &after
                    .without(&["loop"])
                    .without_lines_containing(&["vms/b"])
            )
            .is_empty());
    }
}
