//! A real `bangerd` in a directory of the run, driven through the real
//! `banger` CLI.
//!
//! 1. [`Daemon::start`] writes the config, spawns bangerd in its own process
//!    group (a Ctrl-C reaches the suite, which then cleans up in order) and
//!    waits until the socket answers.
//! 2. Cases run `banger` commands against it ([`Daemon::banger`],
//!    [`Daemon::timed`]).
//! 3. Dropping it deletes every VM through the CLI, SIGTERMs the daemon,
//!    SIGKILLs, by pid, any process still running from its directory (VMMs,
//!    guest agents), so a failed case leaves nothing behind, and removes
//!    its state dir (the log stays).

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::processes::{self, Spawned};
use crate::Binaries;

/// How a daemon is started: its config file and extra environment.
pub struct DaemonSetup {
    pub config: String,
    pub env: Vec<(String, String)>,
    /// Where its state lives (default: `DIR/state`).
    pub state_dir: Option<PathBuf>,
    /// Run bangerd inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

impl DaemonSetup {
    /// fake-firecracker as the VMM, no host network, root disks copied (so a
    /// run never leaves device-mapper state behind). With `guest_agent`,
    /// every VM gets a `banger-agent` in host test mode as its guest and
    /// create waits for it, as for a real guest.
    #[must_use]
    pub fn fake(bins: &Binaries, directory: &Path, guest_agent: bool) -> Self {
        // Jailed by fake-jailer as the daemon's default is, where it can be
        // (root); unjailed otherwise.
        let jailed = nix::unistd::geteuid().is_root();
        let mut config = format!(
            "[network]\nenabled = false\n\n[vmm]\nbackend = \"firecracker\"\n\n\
             [firecracker]\nbinary = \"{}\"\njailer = \"{}\"\njailed = {jailed}\n\n\
             [vm]\nvcpus = 1\nmemory_mib = 256\nstop_grace_seconds = 3\n\n\
             [storage]\nclone = \"copy\"\n\n",
            bins.fake_firecracker.display(),
            bins.fake_jailer.display()
        );
        let mut env = Vec::new();
        if guest_agent {
            config.push_str("[agent]\nwait = true\nready_timeout_seconds = 30\n");
            let ssh = directory.join("agent-ssh");
            env.push((
                "FAKE_FIRECRACKER_GUEST_AGENT_BIN".to_owned(),
                bins.agent.display().to_string(),
            ));
            env.push((
                "FAKE_FIRECRACKER_GUEST_AGENT_SSH_DIR".to_owned(),
                ssh.display().to_string(),
            ));
        } else {
            config.push_str("[agent]\nwait = false\n");
        }
        Self {
            config,
            env,
            state_dir: None,
            netns: None,
        }
    }
}

pub struct Daemon {
    pub directory: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    bins: Binaries,
    netns: Option<String>,
    process: Option<Spawned>,
}

impl Daemon {
    /// Starts bangerd in `directory` (created) and waits up to 30 s until it
    /// serves.
    ///
    /// # Errors
    /// The directory or config cannot be written, or bangerd does not come up.
    pub fn start(bins: &Binaries, directory: &Path, setup: DaemonSetup) -> anyhow::Result<Self> {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("create {}", directory.display()))?;
        let ssh = directory.join("agent-ssh");
        std::fs::create_dir_all(&ssh)?;
        std::fs::write(
            ssh.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBANGERBENCHKEY root@guest\n",
        )?;
        let config = directory.join("config.toml");
        std::fs::write(&config, &setup.config)
            .with_context(|| format!("write {}", config.display()))?;
        let state_dir = setup.state_dir.unwrap_or_else(|| directory.join("state"));
        let socket = directory.join("bangerd.sock");
        let log = directory.join("bangerd.log");
        let log_file = std::fs::File::create(&log)?;
        let mut command = match &setup.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&bins.bangerd);
                command
            }
            None => Command::new(&bins.bangerd),
        };
        command
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .envs(setup.env)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("spawn {}", bins.bangerd.display()))?;
        let mut daemon = Self {
            directory: directory.to_owned(),
            state_dir,
            socket,
            log,
            bins: bins.clone(),
            netns: setup.netns,
            process: Some(Spawned::new(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            processes::check_interrupt()?;
            if let Some(status) = daemon.process_mut().child().try_wait()? {
                bail!(
                    "bangerd exited at start ({status}); log:\n{}",
                    daemon.log_tail()
                );
            }
            if UnixStream::connect(&daemon.socket).is_ok() {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "bangerd did not serve within 30 s; log:\n{}",
                    daemon.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn process_mut(&mut self) -> &mut Spawned {
        self.process.as_mut().expect("daemon running")
    }

    /// The daemon's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Spawned::id)
    }

    /// The last lines of the daemon's log.
    #[must_use]
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A `banger` command pointed at this daemon (inside its namespace, if
    /// any).
    #[must_use]
    pub fn command(&self) -> Command {
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns])
                    .arg(&self.bins.banger);
                command
            }
            None => Command::new(&self.bins.banger),
        };
        command
            .arg("--socket")
            .arg(&self.socket)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    /// Runs `banger ARGS`; fails with its stderr and the daemon log's tail
    /// unless it exits 0. Returns stdout.
    ///
    /// # Errors
    /// banger cannot be run or exits non-zero.
    pub fn banger(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(self.timed(args)?.1)
    }

    /// [`Self::banger`], timed from spawn to exit.
    ///
    /// # Errors
    /// banger cannot be run or exits non-zero.
    pub fn timed(&self, args: &[&str]) -> anyhow::Result<(Duration, String)> {
        processes::check_interrupt()?;
        let mut command = self.command();
        command.args(args);
        let started = Instant::now();
        let output = command.output().context("run banger")?;
        let elapsed = started.elapsed();
        self.check(args, &output)?;
        Ok((
            elapsed,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }

    /// Turns a finished `banger ARGS` into an error unless it exited 0.
    ///
    /// # Errors
    /// It did not exit 0.
    pub fn check(&self, args: &[&str], output: &Output) -> anyhow::Result<()> {
        if output.status.success() {
            return Ok(());
        }
        bail!(
            "`banger {}` failed ({}): {}\ndaemon log:\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            self.log_tail()
        )
    }

    /// Runs `banger ARGS --json` and parses stdout.
    ///
    /// # Errors
    /// banger fails or prints no JSON.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let stdout = self.banger(&all)?;
        serde_json::from_str(&stdout)
            .with_context(|| format!("`banger {}` printed no JSON: {stdout}", all.join(" ")))
    }

    /// Imports a registered image and kernel under the name `default`.
    ///
    /// # Errors
    /// An import fails.
    pub fn import_defaults(&self, image: &Path, kernel: &Path) -> anyhow::Result<()> {
        self.banger(&[
            "-q",
            "image",
            "import",
            "default",
            &image.display().to_string(),
        ])?;
        self.banger(&[
            "-q",
            "kernel",
            "import",
            "default",
            &kernel.display().to_string(),
        ])?;
        Ok(())
    }

    /// Names of every VM the daemon knows.
    ///
    /// # Errors
    /// `vm list` fails.
    pub fn vm_names(&self) -> anyhow::Result<Vec<String>> {
        let list = self.json(&["vm", "list"])?;
        Ok(list
            .as_array()
            .map(|vms| {
                vms.iter()
                    .filter_map(|vm| vm["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Deletes VMs by name, `parallel` at a time.
    ///
    /// # Errors
    /// A delete fails.
    pub fn delete(&self, names: &[String], parallel: usize) -> anyhow::Result<()> {
        for chunk in names.chunks(parallel.max(1)) {
            let children: Vec<_> = chunk
                .iter()
                .map(|name| {
                    self.command()
                        .args(["-q", "vm", "delete", "--force", name])
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                })
                .collect::<Result<_, _>>()
                .context("run banger vm delete")?;
            for (child, name) in children.into_iter().zip(chunk) {
                let output = child.wait_with_output()?;
                self.check(&["vm", "delete", "--force", name], &output)?;
            }
        }
        Ok(())
    }

    /// Deletes every VM.
    ///
    /// # Errors
    /// Listing or a delete fails.
    pub fn delete_all(&self) -> anyhow::Result<()> {
        let names = self.vm_names()?;
        self.delete(&names, 8)
    }

    /// Deletes every VM, stops the daemon, kills what is left. Returns what
    /// went wrong, if anything (the cleanup still ran to the end).
    pub fn shutdown(&mut self) -> Option<String> {
        let mut process = self.process.take()?;
        let mut problem = None;
        if let Ok(Some(status)) = process.child().try_wait() {
            problem = Some(format!("bangerd had exited ({status})"));
        } else if let Err(error) = self.delete_all_unchecked() {
            problem = Some(format!("could not delete every VM: {error:#}"));
        }
        process.terminate(Duration::from_secs(10));
        let killed = processes::kill_processes_under(&self.directory)
            + processes::kill_processes_under(&self.state_dir);
        if killed > 0 && problem.is_none() {
            problem = Some(format!("{killed} processes were left and killed"));
        }
        problem
    }

    /// [`Self::delete_all`] even after an interrupt.
    fn delete_all_unchecked(&self) -> anyhow::Result<()> {
        let output = self
            .command()
            .args(["vm", "list", "--json"])
            .output()
            .context("run banger vm list")?;
        self.check(&["vm", "list", "--json"], &output)?;
        let list: Value = serde_json::from_slice(&output.stdout)?;
        for vm in list.as_array().into_iter().flatten() {
            if let Some(name) = vm["name"].as_str() {
                let output = self
                    .command()
                    .args(["-q", "vm", "delete", "--force", name])
                    .output()?;
                self.check(&["vm", "delete", "--force", name], &output)?;
            }
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(problem) = self.shutdown() {
            eprintln!(
                "banger-bench: cleanup of {}: {problem}",
                self.directory.display()
            );
        }
        // Images and clones can be gigabytes; the log stays for --keep.
        if let Err(error) = crate::fixtures::remove_tree(&self.state_dir) {
            eprintln!("banger-bench: {error:#}");
        }
    }
}
