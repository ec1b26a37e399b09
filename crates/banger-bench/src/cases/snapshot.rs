//! Snapshots: `vm create --from-snapshot` against a cold create of the same
//! image in the same daemon, `vm fork --count 10`, the `vm snapshot` itself
//! and the bytes a snapshot holds against the guest's memory.
//!
//! 1. [fake] fake-firecracker, jailed by fake-jailer as restores need (so
//!    root), a host-mode agent as the guest: restore → agent ready against
//!    create → agent ready, alternating, with the stage p50s of both;
//!    `vm snapshot` against `vm pause` + `vm resume`; fork10.
//! 2. [real] QEMU guests (golden image, Debian kernel, the daemon's
//!    network in a namespace made for the run; root, full runs only): the
//!    same figures with the daemon's state dir on an XFS (reflink=1) loop
//!    mount the case makes, so root disks and the snapshot's disk copy are
//!    reflinks; then restores and cold creates again with the state dir on
//!    the work directory's file system (ext4 here: every clone a copy), so
//!    both are visible.
//!
//! Every VM, snapshot, daemon, namespace and mount is removed at the end of
//! its step and on failure (drops in reverse order: daemon, namespace,
//! mount).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::clone::{reflink_unavailable, XfsLoop};
use super::qemu::{self, wait_in_guest, Namespace};
use super::{fake_daemon, folder, StageTimes};
use crate::daemon::{Daemon, DaemonSetup};
use crate::fixtures;
use crate::report::{Figure, Goal, Skipped, Summary, Unit};
use crate::{Context, Outcome};

/// VMs `vm fork --count` makes.
const FORK_COUNT: usize = 10;
/// Guest memory of the real guests (as the `qemu` case).
const REAL_MEMORY_MIB: u64 = 768;

pub fn snapshot(context: &Context) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    if nix::unistd::geteuid().is_root() {
        outcome.figures.extend(fake(context)?);
    } else {
        outcome.skipped.push(Skipped {
            case: "snapshot.fake".to_owned(),
            reason: "restores need the jailed fake-firecracker (fake-jailer), which needs root"
                .to_owned(),
        });
    }
    match real_unavailable(context) {
        Some(reason) => outcome.skipped.push(Skipped {
            case: "snapshot.real".to_owned(),
            reason,
        }),
        None => {
            let inputs = qemu::inputs(context).map_err(anyhow::Error::msg)?;
            let real = real(context, &inputs)?;
            outcome.figures.extend(real.figures);
            outcome.skipped.extend(real.skipped);
        }
    }
    Ok(outcome)
}

/// Step 1.
fn fake(context: &Context) -> anyhow::Result<Vec<Figure>> {
    let runs = context.pick(3, 20);
    let daemon = fake_daemon(context, "snapshot/fake", true, 64)?;
    // One-off costs (page cache, lazy daemon state) of both paths first.
    daemon.banger(&["-q", "vm", "create", "src"])?;
    daemon.banger(&["-q", "vm", "snapshot", "src", "warmup"])?;
    daemon.banger(&["-q", "vm", "create", "warmup", "--from-snapshot", "warmup"])?;
    daemon.banger(&["-q", "vm", "delete", "--force", "warmup"])?;
    daemon.banger(&["-q", "snapshot", "rm", "warmup"])?;

    let written = snapshots(&daemon, "src", runs)?;
    daemon.banger(&["-q", "vm", "snapshot", "src", "base"])?;
    let creates = creates(&daemon, "base", runs)?;
    let forks = fork(&daemon, "src", context.pick(1, 3))?;
    daemon.banger(&["-q", "snapshot", "rm", "base"])?;
    drop(daemon);
    Ok(figures(
        "fake",
        "fake",
        &written,
        &creates,
        Some(&forks),
        None,
    ))
}

fn real_unavailable(context: &Context) -> Option<String> {
    if let Err(reason) = qemu::inputs(context) {
        return Some(reason);
    }
    if let Some(reason) = reflink_unavailable() {
        return Some(format!("the state dir on XFS: {reason}"));
    }
    None
}

/// Step 2.
fn real(context: &Context, inputs: &qemu::Inputs) -> anyhow::Result<Outcome> {
    let directory = folder(context, "snapshot/real")?;
    // The XFS file system (the image, two snapshots' memory, the guests'
    // writes), then on ext4 the image, a snapshot and a copy per VM.
    if let Err(reason) = fixtures::require_free(&directory, 12 << 30) {
        return Ok(Outcome::skipped("snapshot.real", reason));
    }
    let runs = 3;
    let mut figures = Vec::new();
    {
        let xfs = XfsLoop::new(&directory.join("xfs"), 10 << 30)?;
        let netns = Namespace::new(&format!("banger-bench-snap-{}", std::process::id()))?;
        let daemon = real_daemon(
            context,
            inputs,
            &directory.join("reflink"),
            &netns,
            "reflink",
            Some(xfs.mount_point.join("state")),
        )?;
        source_guest(&daemon)?;
        let written = snapshots(&daemon, "src", 2)?;
        daemon.banger(&["-q", "vm", "snapshot", "src", "base"])?;
        let creates = creates(&daemon, "base", runs)?;
        let forks = fork(&daemon, "src", 1)?;
        daemon.banger(&["-q", "snapshot", "rm", "base"])?;
        drop(daemon);
        drop(netns);
        drop(xfs);
        figures.extend(figures_real(
            "real",
            "real, state on XFS: reflinks",
            &written,
            &creates,
            Some(&forks),
        ));
    }
    {
        let netns = Namespace::new(&format!("banger-bench-snapc-{}", std::process::id()))?;
        let daemon = real_daemon(
            context,
            inputs,
            &directory.join("copy"),
            &netns,
            "copy",
            None,
        )?;
        source_guest(&daemon)?;
        let written = snapshots(&daemon, "src", 1)?;
        daemon.banger(&["-q", "vm", "snapshot", "src", "base"])?;
        let creates = creates(&daemon, "base", runs)?;
        daemon.banger(&["-q", "snapshot", "rm", "base"])?;
        let file_system = fixtures::file_system_type(&directory);
        drop(daemon);
        drop(netns);
        figures.extend(figures_real(
            "real.copy",
            &format!("real, state on {file_system}: copies"),
            &written,
            &creates,
            None,
        ));
    }
    Ok(Outcome {
        figures,
        skipped: Vec::new(),
    })
}

fn figures_real(
    tag: &str,
    label: &str,
    written: &Written,
    creates: &Creates,
    forks: Option<&[Duration]>,
) -> Vec<Figure> {
    figures(
        tag,
        label,
        written,
        creates,
        forks,
        Some(Goal::FasterThanBaseline(10.0)),
    )
}

/// A QEMU daemon in `netns` with `[storage] clone = strategy`, the Debian
/// kernel and the golden image imported as `default`.
fn real_daemon(
    context: &Context,
    inputs: &qemu::Inputs,
    directory: &Path,
    netns: &Namespace,
    strategy: &str,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<Daemon> {
    let config = format!(
        "[network]\nenabled = true\nuplink = \"uplink0\"\n\n\
         [vmm]\nbackend = \"qemu\"\n\n\
         [vm]\nvcpus = 1\nmemory_mib = {REAL_MEMORY_MIB}\nstop_grace_seconds = 30\n\n\
         [storage]\nclone = \"{strategy}\"\n\n\
         [agent]\npath = \"{}\"\nready_timeout_seconds = 300\n",
        inputs.agent.display()
    );
    let daemon = Daemon::start(
        &context.bins,
        directory,
        DaemonSetup {
            config,
            env: Vec::new(),
            state_dir,
            netns: Some(netns.name.clone()),
        },
    )?;
    daemon
        .banger(&["-q", "kernel", "import", "default", "--from-debian"])
        .context("import the Debian kernel (`kernel import --from-debian`)")?;
    daemon.banger(&[
        "-q",
        "image",
        "import",
        "default",
        &inputs.golden.display().to_string(),
    ])?;
    Ok(daemon)
}

/// Boots the VM snapshots are taken of, `src`, and waits until the guest
/// settled (ssh up), as a dev box someone forks would be.
fn source_guest(daemon: &Daemon) -> anyhow::Result<()> {
    daemon.banger(&["-q", "vm", "create", "src"])?;
    wait_in_guest(
        daemon,
        "src",
        "systemctl is-active ssh",
        Duration::from_secs(600),
    )
}

/// `vm snapshot` times, the baseline times, and the last snapshot's size.
struct Written {
    pause_resume: Vec<Duration>,
    snapshots: Vec<Duration>,
    size: Size,
}

/// What one snapshot holds, from `snapshot list --json` and its directory.
struct Size {
    bytes: u64,
    memory_mib: u64,
    /// File name, apparent bytes, allocated bytes.
    files: Vec<(String, u64, u64)>,
}

impl Size {
    fn describe(&self) -> String {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(name, length, allocated)| {
                format!("{name} {} ({} allocated)", mib(*length), mib(*allocated))
            })
            .collect();
        format!(
            "snapshot list: {}; files: {}",
            mib(self.bytes),
            files.join(", ")
        )
    }
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let value = bytes as f64 / 1_048_576.0;
    format!("{value:.1} MiB")
}

/// `runs` × (`vm pause` + `vm resume` of `source`, then `vm snapshot` of
/// it, removed again).
fn snapshots(daemon: &Daemon, source: &str, runs: usize) -> anyhow::Result<Written> {
    let mut pause_resume = Vec::new();
    let mut snapshots = Vec::new();
    let mut size = None;
    for index in 0..runs {
        let started = Instant::now();
        daemon.banger(&["-q", "vm", "pause", source])?;
        daemon.banger(&["-q", "vm", "resume", source])?;
        pause_resume.push(started.elapsed());
        let name = format!("timed{index}");
        snapshots.push(daemon.timed(&["-q", "vm", "snapshot", source, &name])?.0);
        let measured = size_of(daemon, &name);
        daemon.banger(&["-q", "snapshot", "rm", &name])?;
        size = Some(measured?);
    }
    Ok(Written {
        pause_resume,
        snapshots,
        size: size.context("no snapshot was taken")?,
    })
}

fn size_of(daemon: &Daemon, name: &str) -> anyhow::Result<Size> {
    let list = daemon.json(&["snapshot", "list"])?;
    let snapshot = list
        .as_array()
        .and_then(|snapshots| snapshots.iter().find(|snapshot| snapshot["name"] == name))
        .with_context(|| format!("snapshot list --json has no `{name}`"))?;
    let field = |key: &str| {
        snapshot[key]
            .as_u64()
            .with_context(|| format!("snapshot list --json has no {key}"))
    };
    let dir = snapshot["dir"]
        .as_str()
        .context("snapshot list --json has no dir")?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {dir}"))? {
        use std::os::unix::fs::MetadataExt as _;
        let entry = entry?;
        let metadata = entry.metadata()?;
        files.push((
            entry.file_name().to_string_lossy().into_owned(),
            metadata.len(),
            metadata.blocks() * 512,
        ));
    }
    files.sort();
    Ok(Size {
        bytes: field("size_bytes")?,
        memory_mib: field("memory_mib")?,
        files,
    })
}

/// Cold creates and restores of `snapshot`, alternating.
struct Creates {
    cold: Vec<Duration>,
    cold_stages: StageTimes,
    restores: Vec<Duration>,
    restore_stages: StageTimes,
}

fn creates(daemon: &Daemon, snapshot: &str, runs: usize) -> anyhow::Result<Creates> {
    let mut creates = Creates {
        cold: Vec::new(),
        cold_stages: StageTimes::default(),
        restores: Vec::new(),
        restore_stages: StageTimes::default(),
    };
    for index in 0..runs {
        let name = format!("cold{index}");
        let (elapsed, events) = daemon.timed(&["vm", "create", &name, "--json"])?;
        creates.cold.push(elapsed);
        creates.cold_stages.add(&events);
        daemon.banger(&["-q", "vm", "delete", "--force", &name])?;
        let name = format!("restored{index}");
        let (elapsed, events) =
            daemon.timed(&["vm", "create", &name, "--from-snapshot", snapshot, "--json"])?;
        creates.restores.push(elapsed);
        creates.restore_stages.add(&events);
        daemon.banger(&["-q", "vm", "delete", "--force", &name])?;
    }
    Ok(creates)
}

/// `rounds` × `vm fork SOURCE NEW --count 10` (wall), the copies deleted
/// after each.
fn fork(daemon: &Daemon, source: &str, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let count = FORK_COUNT.to_string();
    let mut walls = Vec::new();
    for round in 0..rounds {
        let new = format!("fork{round}");
        let forked = daemon.timed(&["-q", "vm", "fork", source, &new, "--count", &count]);
        // The copies made before a failure go too.
        let names: Vec<String> = daemon
            .vm_names()?
            .into_iter()
            .filter(|name| name.starts_with(&format!("{new}-")))
            .collect();
        daemon.delete(&names, 4)?;
        walls.push(forked?.0);
    }
    Ok(walls)
}

/// The figures of one daemon; keys end in `.TAG`.
fn figures(
    tag: &str,
    label: &str,
    written: &Written,
    creates: &Creates,
    forks: Option<&[Duration]>,
    restore_goal: Option<Goal>,
) -> Vec<Figure> {
    let key = |name: &str| format!("{name}.{tag}");
    let mut restore = Figure::timed(
        &key("restore"),
        &format!("create --from-snapshot → agent ready [{label}]"),
        &creates.restores,
    )
    .against(&key("cold"))
    .note(creates.restore_stages.describe());
    if let Some(goal) = restore_goal {
        restore = restore.goal(goal);
    }
    #[allow(clippy::cast_precision_loss)]
    let snapshot_mib = written.size.bytes as f64 / 1_048_576.0;
    #[allow(clippy::cast_precision_loss)]
    let memory_mib = written.size.memory_mib as f64;
    let mut figures = vec![
        Figure::timed(
            &key("cold"),
            &format!("baseline: create → agent ready [{label}]"),
            &creates.cold,
        )
        .note(creates.cold_stages.describe()),
        restore,
        Figure::timed(
            &key("pause-resume"),
            &format!("baseline: vm pause + vm resume [{label}]"),
            &written.pause_resume,
        ),
        Figure::timed(
            &key("snapshot"),
            &format!("vm snapshot (pause, write, resume) [{label}]"),
            &written.snapshots,
        )
        .against(&key("pause-resume")),
        Figure::new(
            &key("memory"),
            &format!("baseline: guest memory [{label}]"),
            Unit::Mebibytes,
            Summary::of(&[memory_mib]),
        ),
        Figure::new(
            &key("snapshot-size"),
            &format!("snapshot on disk [{label}]"),
            Unit::Mebibytes,
            Summary::of(&[snapshot_mib]),
        )
        .against(&key("memory"))
        .note(written.size.describe()),
    ];
    if let Some(forks) = forks {
        #[allow(clippy::cast_possible_truncation)]
        let per_vm: Vec<Duration> = forks.iter().map(|wall| *wall / FORK_COUNT as u32).collect();
        figures.push(Figure::timed(
            &key("fork10"),
            &format!("vm fork --count {FORK_COUNT} (wall) [{label}]"),
            forks,
        ));
        figures.push(
            Figure::timed(
                &key("fork10.per-vm"),
                &format!("vm fork --count {FORK_COUNT}, per VM [{label}]"),
                &per_vm,
            )
            .against(&key("restore")),
        );
    }
    figures
}
