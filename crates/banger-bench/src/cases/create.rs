//! create → agent ready with fake-firecracker and a host-mode agent as the
//! guest: what banger itself costs, without a guest kernel.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{fake_daemon, fake_daemon_with, StageTimes};
use crate::daemon::Daemon;
use crate::processes;
use crate::report::{Figure, Goal};
use crate::{Context, Outcome};

/// One create at a time: p50/p95 of `banger vm create` (returns once the
/// agent answered), against the bare CLI → daemon round trip (`banger vm
/// list` with at most one VM), which every command pays. Deletes are
/// measured on the way.
pub fn sequential(context: &Context) -> anyhow::Result<Outcome> {
    let runs = context.pick(3, 30);
    let cold = {
        let daemon = fake_daemon(context, "create", true, IMAGE_MIB)?;
        measure(&daemon, runs)?
    };
    // The same with root disks cloned ahead of time: the clone stage no
    // longer copies.
    let warm = {
        let daemon = fake_daemon_with(
            context,
            "create/warm",
            true,
            IMAGE_MIB,
            &format!("warm_pool = {WARM_POOL}\n"),
        )?;
        measure(&daemon, runs)?
    };
    Ok(Outcome {
        figures: vec![
            Figure::timed(
                "vm-list",
                "baseline: banger vm list (CLI → daemon round trip)",
                &cold.list,
            ),
            Figure::timed("create.fake", "create → agent ready [fake]", &cold.creates)
                .against("vm-list")
                .goal(Goal::AtMost(30.0))
                .note(cold.stages.describe()),
            Figure::timed(
                "create.fake.warm",
                &format!("create → agent ready [fake], warm_pool = {WARM_POOL}"),
                &warm.creates,
            )
            .against("create.fake")
            .goal(Goal::AtMost(30.0))
            .note(warm.stages.describe()),
            Figure::timed("delete.fake", "vm delete --force [fake]", &cold.deletes)
                .against("vm-list"),
        ],
        skipped: Vec::new(),
    })
}

/// The fake image's size: a small ext4 whose copy still shows.
const IMAGE_MIB: u64 = 64;
/// Clones the warm-pool figure keeps ready.
const WARM_POOL: usize = 4;

/// What [`measure`] collects.
struct Sequential {
    list: Vec<Duration>,
    creates: Vec<Duration>,
    deletes: Vec<Duration>,
    stages: StageTimes,
}

/// `runs` creates one at a time, each deleted before the next (with a
/// `vm list` before each as the baseline).
fn measure(daemon: &Daemon, runs: usize) -> anyhow::Result<Sequential> {
    // The first create pays one-off costs (page cache, the daemon's lazy
    // state); it is not what a user sees on the next one.
    daemon.banger(&["-q", "vm", "create", "warmup"])?;
    daemon.banger(&["-q", "vm", "delete", "--force", "warmup"])?;
    let mut measured = Sequential {
        list: Vec::new(),
        creates: Vec::new(),
        deletes: Vec::new(),
        stages: StageTimes::default(),
    };
    for index in 0..runs {
        measured.list.push(daemon.timed(&["vm", "list"])?.0);
        let name = format!("c{index}");
        let (elapsed, events) = daemon.timed(&["vm", "create", &name, "--json"])?;
        measured.creates.push(elapsed);
        measured.stages.add(&events);
        measured
            .deletes
            .push(daemon.timed(&["-q", "vm", "delete", "--force", &name])?.0);
    }
    Ok(measured)
}

/// Bursts of N creates at once (10, and 50 in a full run): wall time from
/// the first spawn to the last exit, against the same N creates one after
/// another in the same daemon.
pub fn concurrent(context: &Context) -> anyhow::Result<Outcome> {
    let daemon = fake_daemon(context, "concurrent", true, 64)?;
    let rounds = context.pick(2, 3);
    daemon.banger(&["-q", "vm", "create", "warmup"])?;
    daemon.banger(&["-q", "vm", "delete", "--force", "warmup"])?;
    let mut figures = Vec::new();
    for count in context.pick(vec![10], vec![10, 50]) {
        let mut serial = Vec::new();
        let mut burst = Vec::new();
        for round in 0..rounds {
            let started = Instant::now();
            for index in 0..count {
                daemon.banger(&["-q", "vm", "create", &format!("s{round}x{index}")])?;
            }
            serial.push(started.elapsed());
            daemon.delete_all()?;
            burst.push(create_at_once(&daemon, count, round)?);
            daemon.delete_all()?;
        }
        let serial_key = format!("serial{count}");
        let burst_figure = Figure::timed(
            &format!("concurrent{count}"),
            &format!("{count} concurrent creates [fake] (wall)"),
            &burst,
        )
        .against(&serial_key);
        #[allow(clippy::cast_precision_loss)]
        let rate = count as f64 * 1000.0 / burst_figure.summary.p50;
        let mut burst_figure = burst_figure.note(format!("{rate:.1} creates/s at p50"));
        if count == 50 {
            burst_figure = burst_figure.goal(Goal::RateAtLeast {
                count,
                per_second: 20.0,
            });
        }
        figures.push(Figure::timed(
            &serial_key,
            &format!("baseline: {count} creates one after another [fake]"),
            &serial,
        ));
        figures.push(burst_figure);
    }
    Ok(Outcome {
        figures,
        skipped: Vec::new(),
    })
}

/// Spawns `count` `banger vm create` at once and waits for all of them.
fn create_at_once(daemon: &Daemon, count: usize, round: usize) -> anyhow::Result<Duration> {
    processes::check_interrupt()?;
    let started = Instant::now();
    let mut children = Vec::new();
    for index in 0..count {
        let name = format!("p{round}x{index}");
        let child = daemon
            .command()
            .args(["-q", "vm", "create", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("run banger vm create")?;
        children.push((name, child));
    }
    let mut failure = None;
    for (name, child) in children {
        let output = child.wait_with_output()?;
        if let Err(error) = daemon.check(&["vm", "create", &name], &output) {
            failure.get_or_insert(error);
        }
    }
    let elapsed = started.elapsed();
    match failure {
        Some(error) => Err(error),
        None => Ok(elapsed),
    }
}
