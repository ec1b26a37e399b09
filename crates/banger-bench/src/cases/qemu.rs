//! Real guests under QEMU (TCG where KVM cannot run them): the golden
//! image, the host's Debian kernel with banger's initramfs and the static
//! agent, the daemon's network, all in a network namespace made for the
//! run. Slow, so full runs only.
//!
//! 1. create → agent ready, against a bare `qemu-system-x86_64` boot to the
//!    same point: banger's own QEMU command line for that VM (read from
//!    /proc), started unpaused in a folder of its own with a pristine copy
//!    of the image (not timed) and a tap of its own, timed from spawn to
//!    the agent's first byte on its virtio-serial port after a `hello`.
//! 2. `vm run -- true` against `ssh` (a new connection each time, banger's
//!    key) to the same guest.
//! 3. `vm workspace prepare` and `vm cp` of a generated, committed tree
//!    (20,000 files, 300 MiB) against `tar | ssh … tar x` of the same tree
//!    into the same guest.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::{folder, StageTimes};
use crate::daemon::{Daemon, DaemonSetup};
use crate::fixtures;
use crate::processes::{self, Spawned};
use crate::report::{Figure, Goal};
use crate::{Context, Outcome};

const CASE: &str = "qemu";
/// The baseline's tap, in the run's namespace.
const BASELINE_TAP: &str = "benchtap0";

pub(super) struct Inputs {
    pub(super) golden: PathBuf,
    pub(super) agent: PathBuf,
}

/// The golden image and static agent, or why real guests cannot run here.
pub(super) fn inputs(context: &Context) -> Result<Inputs, String> {
    if context.quick {
        return Err("real guests boot under TCG for minutes: full runs only".to_owned());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespace, taps)".to_owned());
    }
    for tool in ["qemu-system-x86_64", "ssh", "nft", "ip", "tar"] {
        if !processes::on_path(tool) {
            return Err(format!("`{tool}` is not installed (scripts/setup-host.sh)"));
        }
    }
    let golden = context
        .golden_image
        .clone()
        .filter(|path| path.is_file())
        .ok_or(
            "BANGER_GOLDEN_IMAGE is not set to a golden image (images/golden/build.sh --minimal)",
        )?;
    let agent = context
        .agent_static
        .clone()
        .filter(|path| path.is_file())
        .ok_or("BANGER_AGENT_STATIC is not set to the static agent (scripts/build-agent.sh)")?;
    Ok(Inputs { golden, agent })
}

pub fn qemu(context: &Context) -> anyhow::Result<Outcome> {
    let inputs = match inputs(context) {
        Ok(inputs) => inputs,
        Err(reason) => return Ok(Outcome::skipped(CASE, reason)),
    };
    let directory = folder(context, CASE)?;
    // The image twice (the daemon's and a VM's clone), the tree and its
    // .git, and a work disk holding three copies of them.
    if let Err(reason) = fixtures::require_free(&directory, 4 << 30) {
        return Ok(Outcome::skipped(CASE, reason));
    }
    let netns = Namespace::new(&format!("banger-bench-{}", std::process::id()))?;
    let config = format!(
        "[network]\nenabled = true\nuplink = \"uplink0\"\n\n\
         [vmm]\nbackend = \"qemu\"\n\n\
         [vm]\nvcpus = 1\nmemory_mib = 768\nstop_grace_seconds = 30\n\n\
         [agent]\npath = \"{}\"\nready_timeout_seconds = 300\n",
        inputs.agent.display()
    );
    let daemon = Daemon::start(
        &context.bins,
        &directory.join("daemon"),
        DaemonSetup {
            config,
            env: Vec::new(),
            state_dir: None,
            netns: Some(netns.name.clone()),
        },
    )?;
    if let Err(error) = daemon.banger(&["-q", "kernel", "import", "default", "--from-debian"]) {
        return Ok(Outcome::skipped(
            CASE,
            format!(
                "no Debian kernel to boot (`kernel import --from-debian`): {}",
                error.to_string().lines().next().unwrap_or_default()
            ),
        ));
    }
    daemon.banger(&[
        "-q",
        "image",
        "import",
        "default",
        &inputs.golden.display().to_string(),
    ])?;
    let image = daemon.json(&["image", "show", "default"])?["path"]
        .as_str()
        .map(PathBuf::from)
        .context("image show printed no path")?;
    netns.ip(&["tuntap", "add", "dev", BASELINE_TAP, "mode", "tap"])?;

    let mut figures = boot(&daemon, &netns, &directory, &image)?;
    figures.extend(in_guest(context, &daemon, &netns, &directory)?);
    drop(daemon);
    drop(netns);
    Ok(Outcome {
        figures,
        skipped: Vec::new(),
    })
}

/// Step 1: banger's create and the bare boot, alternating.
fn boot(
    daemon: &Daemon,
    netns: &Namespace,
    directory: &Path,
    image: &Path,
) -> anyhow::Result<Vec<Figure>> {
    let runs = 3;
    let mut creates = Vec::new();
    let mut bare = Vec::new();
    let mut stages = StageTimes::default();
    for round in 0..runs {
        let name = format!("boot{round}");
        let (elapsed, events) = daemon.timed(&["vm", "create", &name, "--json"])?;
        creates.push(elapsed);
        stages.add(&events);
        let vm = daemon.json(&["vm", "show", &name])?;
        let bare_boot = BareBoot::of(&vm)?;
        daemon.banger(&["-q", "vm", "delete", "--force", &name])?;
        bare.push(bare_boot.run(netns, &directory.join(format!("bare{round}")), image)?);
    }
    Ok(vec![
        Figure::timed(
            "qemu.bare",
            "baseline: bare QEMU boot to the agent's first byte",
            &bare,
        ),
        Figure::timed("create.real", "create → agent ready [real, QEMU]", &creates)
            .against("qemu.bare")
            .goal(Goal::RatioAtMost(1.1))
            .note(stages.describe()),
    ])
}

/// banger's QEMU command line for one VM, to be run again by hand.
struct BareBoot {
    arguments: Vec<String>,
    vm_dir: String,
}

impl BareBoot {
    fn of(vm: &Value) -> anyhow::Result<Self> {
        let pid = vm["pid"].as_u64().context("vm show printed no pid")?;
        let vm_dir = vm["dir"].as_str().context("vm show printed no dir")?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("read QEMU's command line (pid {pid})"))?;
        let arguments = cmdline
            .split(|byte| *byte == 0)
            .filter(|argument| !argument.is_empty())
            .map(|argument| String::from_utf8_lossy(argument).into_owned())
            .collect();
        Ok(Self {
            arguments,
            vm_dir: vm_dir.to_owned(),
        })
    }

    /// Boots it in `directory` (the root disk a fresh copy of `image`, the
    /// NIC on the baseline's tap, not paused) and times spawn → the agent's
    /// first byte.
    fn run(&self, netns: &Namespace, directory: &Path, image: &Path) -> anyhow::Result<Duration> {
        processes::check_interrupt()?;
        std::fs::create_dir_all(directory)?;
        let moved = directory.display().to_string();
        let mut arguments: Vec<String> = Vec::new();
        let mut previous = String::new();
        for argument in &self.arguments[1..] {
            // Not paused: nobody sends `cont`.
            if argument == "-S" {
                continue;
            }
            let mut argument = argument.replace(&self.vm_dir, &moved);
            match previous.as_str() {
                "-name" => argument = "banger-bench-bare".to_owned(),
                "-netdev" => {
                    argument = argument
                        .split(',')
                        .map(|part| {
                            if part.starts_with("ifname=") {
                                format!("ifname={BASELINE_TAP}")
                            } else {
                                part.to_owned()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                }
                "-drive" => {
                    let file = drive_file(&argument).context("a -drive without file=")?;
                    if argument.contains("id=drive-rootfs") {
                        fixtures::run(
                            Command::new("cp")
                                .arg("--sparse=always")
                                .arg(image)
                                .arg(&file),
                        )?;
                    } else {
                        bail!("banger's VM has a drive the bare boot cannot make: {argument}");
                    }
                }
                _ => {}
            }
            previous.clone_from(&argument);
            arguments.push(argument);
        }
        let agent_socket = arguments
            .iter()
            .find(|argument| argument.starts_with("socket,id=agent,"))
            .and_then(|argument| {
                argument
                    .split(',')
                    .find_map(|part| part.strip_prefix("path="))
            })
            .map(PathBuf::from)
            .context("no agent chardev in banger's QEMU command line")?;
        let console = std::fs::File::create(directory.join("qemu.out"))?;
        let started = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(&self.arguments[0])
            .args(&arguments)
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("spawn QEMU")?;
        let mut process = Spawned::new(child);
        let mut stream = loop {
            processes::check_interrupt()?;
            if let Ok(stream) = UnixStream::connect(&agent_socket) {
                break stream;
            }
            if let Some(status) = process.child().try_wait()? {
                bail!(
                    "QEMU exited at start ({status}): {}",
                    std::fs::read_to_string(directory.join("qemu.out")).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("QEMU's agent socket was not up within 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let header = br#"{"type":"hello","protocol_version":1,"host_version":"banger-bench"}"#;
        let mut frame = Vec::new();
        frame.extend_from_slice(&u32::try_from(header.len())?.to_be_bytes());
        frame.extend_from_slice(&0_u32.to_be_bytes());
        frame.extend_from_slice(header);
        stream.write_all(&frame)?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let mut byte = [0_u8; 1];
        let read = stream
            .read(&mut byte)
            .context("wait for the agent's first byte")?;
        let elapsed = started.elapsed();
        if read == 0 {
            bail!("the agent's port closed before it answered");
        }
        process.terminate(Duration::ZERO);
        fixtures::remove_tree(directory)?;
        Ok(elapsed)
    }
}

fn drive_file(argument: &str) -> Option<String> {
    // QEMU escapes a comma in a value as ",,".
    let unescaped = argument.replace(",,", "\u{0}");
    unescaped
        .split(',')
        .find_map(|part| part.strip_prefix("file="))
        .map(|file| file.replace('\u{0}', ","))
}

/// Steps 2 and 3, in one VM with a work disk for the copies.
fn in_guest(
    context: &Context,
    daemon: &Daemon,
    netns: &Namespace,
    directory: &Path,
) -> anyhow::Result<Vec<Figure>> {
    daemon.banger(&["-q", "vm", "create", "bench", "--work-disk", "2G"])?;
    wait_in_guest(
        daemon,
        "bench",
        "systemctl is-active ssh",
        Duration::from_secs(600),
    )?;
    let home = directory.join("home");
    std::fs::create_dir_all(&home)?;
    // Installs banger's key in the guest and pins its host keys.
    let output = daemon
        .command()
        .env("HOME", &home)
        .env_remove("XDG_DATA_HOME")
        .args(["vm", "ssh", "bench", "--", "true"])
        .output()?;
    daemon.check(&["vm", "ssh", "bench", "--", "true"], &output)?;
    let vm = daemon.json(&["vm", "show", "bench"])?;
    let address = vm["network"]["ip"]
        .as_str()
        .context("the VM has no address")?
        .to_owned();
    let ssh = Ssh {
        netns: netns.name.clone(),
        key: home.join(".local/share/banger/ssh/id_ed25519"),
        target: format!("root@{address}"),
    };
    ssh.run("true", None)?;

    let runs = 20;
    let mut run = Vec::new();
    let mut fresh_ssh = Vec::new();
    for _ in 0..runs {
        run.push(daemon.timed(&["vm", "run", "bench", "--", "true"])?.0);
        let started = Instant::now();
        ssh.run("true", None)?;
        fresh_ssh.push(started.elapsed());
    }

    let tree = directory.join("tree");
    let (files, mib) = (20_000, 300);
    fixtures::generate_tree(&tree, files, mib << 20)?;
    fixtures::commit_tree(&tree)?;
    let bytes = fixtures::disk_usage(&tree)?;
    let tree_arg = tree.display().to_string();
    let mut pipe = Vec::new();
    let mut prepare = Vec::new();
    let mut copy = Vec::new();
    for round in 0..context.pick(1, 2) {
        let destination = format!("/root/pipe{round}");
        let started = Instant::now();
        ssh.run(
            &format!("mkdir -p {destination} && tar -C {destination} -xf -"),
            Some(&tree),
        )?;
        pipe.push(started.elapsed());
        let destination = format!("/root/prepare{round}");
        prepare.push(
            daemon
                .timed(&[
                    "-q",
                    "vm",
                    "workspace",
                    "prepare",
                    "bench",
                    &tree_arg,
                    "--dest",
                    &destination,
                ])?
                .0,
        );
        let destination = format!("/root/cp{round}");
        daemon.banger(&["vm", "run", "bench", "--", "mkdir", "-p", &destination])?;
        copy.push(
            daemon
                .timed(&["-q", "vm", "cp", &tree_arg, &format!("bench:{destination}")])?
                .0,
        );
        daemon.banger(&[
            "vm",
            "run",
            "bench",
            "--",
            "sh",
            "-c",
            "rm -rf /root/pipe* /root/prepare* /root/cp* && sync",
        ])?;
    }
    let throughput = |samples: &[Duration]| {
        let summary = crate::report::Summary::of_durations(samples);
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes as f64 / 1_048_576.0 / (summary.p50 / 1000.0);
        format!("{rate:.1} MiB/s at p50")
    };
    Ok(vec![
        Figure::timed(
            "ssh.real",
            "baseline: ssh (new connection) true [real]",
            &fresh_ssh,
        ),
        Figure::timed("run.real", "vm run -- true [real]", &run)
            .against("ssh.real")
            .goal(Goal::FasterThanBaseline(10.0)),
        Figure::timed("tar-ssh.real", "baseline: tar | ssh … tar x [real]", &pipe).note(format!(
            "{files} files, {} MiB with .git; {}",
            bytes >> 20,
            throughput(&pipe)
        )),
        Figure::timed("workspace.real", "vm workspace prepare [real]", &prepare)
            .against("tar-ssh.real")
            .goal(Goal::FasterThanBaseline(1.5))
            .note(throughput(&prepare)),
        Figure::timed("cp.real", "vm cp of the tree [real]", &copy)
            .against("tar-ssh.real")
            .note(throughput(&copy)),
    ])
}

/// Polls `sh -c SCRIPT` in VM `vm` until it exits 0.
pub(super) fn wait_in_guest(
    daemon: &Daemon,
    vm: &str,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        processes::check_interrupt()?;
        let output = daemon
            .command()
            .args(["vm", "run", vm, "--", "sh", "-c", script])
            .output()?;
        if output.status.success() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "`{script}` in the guest did not succeed within {timeout:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// OpenSSH to the guest from inside the namespace, a new connection each
/// time.
struct Ssh {
    netns: String,
    key: PathBuf,
    target: String,
}

impl Ssh {
    /// Runs `command` in the guest; with `tree`, a tar of it is its stdin.
    fn run(&self, command: &str, tree: Option<&Path>) -> anyhow::Result<()> {
        processes::check_interrupt()?;
        let ssh = format!(
            "ip netns exec {} ssh -q -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o ControlMaster=no -o ControlPath=none {} '{}'",
            self.netns,
            self.key.display(),
            self.target,
            command
        );
        let script = match tree {
            Some(tree) => format!("tar -C '{}' -cf - . | {ssh}", tree.display()),
            None => ssh,
        };
        fixtures::run(Command::new("sh").args(["-c", &script]))?;
        Ok(())
    }
}

/// A network namespace for the run: loopback, and an uplink with the
/// default route the daemon's NAT wants. Deleting it takes the daemon's
/// bridge, taps and nftables table with it.
pub(super) struct Namespace {
    pub(super) name: String,
}

impl Namespace {
    pub(super) fn new(name: &str) -> anyhow::Result<Self> {
        fixtures::run(Command::new("ip").args(["netns", "add", name]))?;
        let namespace = Self {
            name: name.to_owned(),
        };
        namespace.ip(&["link", "set", "lo", "up"])?;
        // A veth pair whose far end goes nowhere: enough for a route.
        namespace.ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ])?;
        namespace.ip(&["addr", "add", "192.0.2.1/24", "dev", "uplink0"])?;
        namespace.ip(&["link", "set", "uplink0", "up"])?;
        namespace.ip(&["link", "set", "uplink1", "up"])?;
        namespace.ip(&["route", "add", "default", "via", "192.0.2.254"])?;
        Ok(namespace)
    }

    fn ip(&self, arguments: &[&str]) -> anyhow::Result<()> {
        fixtures::run(Command::new("ip").args(["-n", &self.name]).args(arguments))?;
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(error) = fixtures::run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("banger-bench: {error:#}");
        }
    }
}
