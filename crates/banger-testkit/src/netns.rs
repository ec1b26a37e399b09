//! A network namespace for tests that enable banger's network: the host's
//! own network is untouched. It has an uplink (a veth pair) with a default
//! route, and is deleted when dropped.

use std::process::{Command, Stdio};

use crate::test_daemon::TestDaemon;

pub struct TestNetns(pub String);

impl TestNetns {
    /// Creates namespace `name` (removing one an interrupted run left).
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let run = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        run(&["netns", "add", name]);
        let namespace = Self(name.to_owned());
        run(&["-n", name, "link", "set", "lo", "up"]);
        run(&[
            "-n", name, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ]);
        run(&["-n", name, "addr", "add", "192.0.2.1/24", "dev", "uplink0"]);
        run(&["-n", name, "link", "set", "uplink0", "up"]);
        run(&["-n", name, "link", "set", "uplink1", "up"]);
        run(&["-n", name, "route", "add", "default", "via", "192.0.2.254"]);
        namespace
    }

    /// Runs `program ARGS` in the namespace; panics on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(
            output.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Makes `daemon` (not yet started) run in this namespace with its
    /// network enabled.
    pub fn enable_network_of(&self, daemon: &mut TestDaemon) {
        let config = std::fs::read_to_string(&daemon.config)
            .expect("read config")
            .replace(
                "[network]\nenabled = false\n",
                "[network]\nenabled = true\ndns_upstreams = [\"127.0.0.1:5353\"]\n",
            );
        std::fs::write(&daemon.config, config).expect("write config");
        daemon.netns = Some(self.0.clone());
    }

    /// Tables named `banger`, as `FAMILY banger`.
    pub fn banger_tables(&self) -> Vec<String> {
        self.run("nft", &["list", "tables"])
            .lines()
            .filter_map(|line| line.strip_prefix("table "))
            .filter(|table| table.ends_with(" banger"))
            .map(str::to_owned)
            .collect()
    }

    /// Rules in the banger tables.
    pub fn banger_rule_count(&self) -> usize {
        crate::host_state::normalise_ruleset(&self.run("nft", &["list", "ruleset"]), |name| {
            name == "banger"
        })
        .len()
    }

    /// Listening sockets on port 53 (`ss` lines, UDP and TCP).
    pub fn dns_listeners(&self) -> Vec<String> {
        self.run("ss", &["-H", "-l", "-n", "-u", "-t"])
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .any(|field| field.ends_with(":53") && !field.starts_with('*'))
            })
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// Names of links starting with `prefix`.
    pub fn links_named(&self, prefix: &str) -> Vec<String> {
        self.run("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with(prefix))
            .collect()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
