//! Working in a VM whose guest is a host-mode agent (fake-firecracker):
//! `vm run -- true`, and moving a tree in with `vm workspace prepare` and
//! `vm cp`.

use std::process::Command;
use std::time::{Duration, Instant};

use super::fake_daemon;
use crate::fixtures;
use crate::processes;
use crate::report::{Figure, Goal};
use crate::{Context, Outcome};

/// `banger vm run VM -- true` against spawning `/bin/true` directly: what a
/// command in a VM costs over a local one.
pub fn run_true(context: &Context) -> anyhow::Result<Outcome> {
    let daemon = fake_daemon(context, "run", true, 64)?;
    daemon.banger(&["-q", "vm", "create", "runner"])?;
    let runs = context.pick(3, 100);
    daemon.banger(&["vm", "run", "runner", "--", "true"])?;
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for _ in 0..runs {
        processes::check_interrupt()?;
        let started = Instant::now();
        let status = Command::new("/bin/true").status()?;
        local.push(started.elapsed());
        anyhow::ensure!(status.success(), "/bin/true failed: {status}");
        remote.push(daemon.timed(&["vm", "run", "runner", "--", "true"])?.0);
    }
    Ok(Outcome {
        figures: vec![
            Figure::timed("spawn-true", "baseline: spawn /bin/true", &local),
            Figure::timed("run.fake", "vm run -- true [fake]", &remote)
                .against("spawn-true")
                .goal(Goal::AtMost(10.0)),
        ],
        skipped: Vec::new(),
    })
}

/// `vm workspace prepare` and `vm cp` of a generated, committed tree
/// (20,000 files, 300 MiB; tiny in a quick run) into a host-mode guest,
/// against `tar | tar` of the same tree: the floor of any copy, with no
/// network or daemon in between. The tree is in the page cache for all.
pub fn workspace(context: &Context) -> anyhow::Result<Outcome> {
    let (files, mib) = context.pick((200, 4), (20_000, 300));
    // The tree, its .git, and one copy of both at a time.
    if let Err(reason) = fixtures::require_free(&context.work, (mib << 20) * 4 + (256 << 20)) {
        return Ok(Outcome::skipped("workspace", reason));
    }
    let daemon = fake_daemon(context, "workspace", true, 64)?;
    let directory = context.work.join("workspace");
    let tree = directory.join("tree");
    fixtures::generate_tree(&tree, files, mib << 20)?;
    fixtures::commit_tree(&tree)?;
    let bytes = fixtures::disk_usage(&tree)?;
    daemon.banger(&["-q", "vm", "create", "ws"])?;
    let runs = context.pick(2, 3);
    let guest = directory.join("guest");
    let tree_arg = tree.display().to_string();
    let mut pipe = Vec::new();
    let mut prepare = Vec::new();
    let mut copy = Vec::new();
    for round in 0..runs {
        let destination = guest.join(format!("pipe{round}"));
        std::fs::create_dir_all(&destination)?;
        let started = Instant::now();
        fixtures::run(
            Command::new("sh")
                .args(["-c", "tar -C \"$1\" -cf - . | tar -C \"$2\" -xf -", "sh"])
                .arg(&tree)
                .arg(&destination),
        )?;
        pipe.push(started.elapsed());
        fixtures::remove_tree(&destination)?;

        let destination = guest.join(format!("prepare{round}"));
        let (elapsed, _) = daemon.timed(&[
            "-q",
            "vm",
            "workspace",
            "prepare",
            "ws",
            &tree_arg,
            "--dest",
            &destination.display().to_string(),
        ])?;
        prepare.push(elapsed);
        fixtures::remove_tree(&destination)?;

        let destination = guest.join(format!("cp{round}"));
        std::fs::create_dir_all(&destination)?;
        let (elapsed, _) = daemon.timed(&[
            "-q",
            "vm",
            "cp",
            &tree_arg,
            &format!("ws:{}", destination.display()),
        ])?;
        copy.push(elapsed);
        fixtures::remove_tree(&destination)?;
    }
    let throughput = |samples: &[Duration]| {
        let summary = crate::report::Summary::of_durations(samples);
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes as f64 / 1_048_576.0 / (summary.p50 / 1000.0);
        format!("{rate:.0} MiB/s at p50")
    };
    let size = format!("{files} files, {} MiB with .git", bytes >> 20);
    Ok(Outcome {
        figures: vec![
            Figure::timed("tar-pipe", "baseline: tar | tar of the tree", &pipe)
                .note(format!("{size}; {}", throughput(&pipe))),
            Figure::timed("workspace.fake", "vm workspace prepare [fake]", &prepare)
                .against("tar-pipe")
                .note(throughput(&prepare)),
            Figure::timed("cp.fake", "vm cp of the tree [fake]", &copy)
                .against("tar-pipe")
                .note(throughput(&copy)),
        ],
        skipped: Vec::new(),
    })
}
