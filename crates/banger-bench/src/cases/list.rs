//! The daemon at scale: `vm list` with many VMs in the store, and its
//! resident memory idle and per running VM.

use std::time::Duration;

use anyhow::Context as _;

use super::fake_daemon;
use crate::daemon::Daemon;
use crate::processes;
use crate::report::{Figure, Goal, Summary, Unit};
use crate::{Context, Outcome};

/// `vm list` and `vm list --json` with 1,000 stopped VMs (`--no-start`; 20
/// in a quick run) against `vm list` with none.
pub fn list(context: &Context) -> anyhow::Result<Outcome> {
    // A thousand clones of it: a small image.
    if let Err(reason) = crate::fixtures::require_free(&context.work, 512 << 20) {
        return Ok(Outcome::skipped("list", reason));
    }
    let daemon = fake_daemon(context, "list", false, 8)?;
    let runs = context.pick(3, 20);
    let count = context.pick(20, 1000);
    let mut empty = Vec::new();
    for _ in 0..runs {
        empty.push(daemon.timed(&["vm", "list"])?.0);
    }
    create_many(&daemon, count, &["--no-start"])?;
    let mut text = Vec::new();
    let mut json = Vec::new();
    for _ in 0..runs {
        let (elapsed, stdout) = daemon.timed(&["vm", "list"])?;
        anyhow::ensure!(
            stdout.lines().count() == count + 1,
            "vm list printed {} lines for {count} VMs",
            stdout.lines().count()
        );
        text.push(elapsed);
        json.push(daemon.timed(&["vm", "list", "--json"])?.0);
    }
    daemon.delete_all()?;
    Ok(Outcome {
        figures: vec![
            Figure::timed("list.empty", "baseline: vm list, no VMs", &empty),
            Figure::timed("list.many", &format!("vm list, {count} VMs"), &text)
                .against("list.empty")
                .goal(Goal::AtMost(50.0)),
            Figure::timed(
                "list-json.many",
                &format!("vm list --json, {count} VMs"),
                &json,
            )
            .against("list.empty")
            .goal(Goal::AtMost(50.0)),
        ],
        skipped: Vec::new(),
    })
}

/// bangerd's RSS (`/proc/PID/status`) idle, and per running VM with 100
/// fake VMs (5 in a quick run), each with its agent connection.
pub fn rss(context: &Context) -> anyhow::Result<Outcome> {
    let daemon = fake_daemon(context, "rss", true, 64)?;
    let count = context.pick(5, 100);
    daemon.banger(&["vm", "list"])?;
    let idle = sample_rss(&daemon)?;
    create_many(&daemon, count, &[])?;
    // One command through every agent connection, so each is in use.
    for name in daemon.vm_names()? {
        daemon.banger(&["vm", "run", &name, "--", "true"])?;
    }
    let loaded = sample_rss(&daemon)?;
    let idle_summary = Summary::of(&idle);
    #[allow(clippy::cast_precision_loss)]
    let per_vm: Vec<f64> = loaded
        .iter()
        .map(|kib| (kib - idle_summary.p50) / count as f64)
        .collect();
    daemon.delete_all()?;
    let idle_mib: Vec<f64> = idle.iter().map(|kib| kib / 1024.0).collect();
    Ok(Outcome {
        figures: vec![
            Figure::new(
                "rss.idle",
                "bangerd RSS, idle",
                Unit::Mebibytes,
                Summary::of(&idle_mib),
            )
            .goal(Goal::AtMost(30.0)),
            Figure::new(
                "rss.per-vm",
                &format!("bangerd RSS per running VM ({count} fake VMs)"),
                Unit::Kibibytes,
                Summary::of(&per_vm),
            )
            .goal(Goal::AtMost(200.0)),
        ],
        skipped: Vec::new(),
    })
}

/// Five samples of the daemon's RSS in KiB, 100 ms apart.
fn sample_rss(daemon: &Daemon) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        #[allow(clippy::cast_precision_loss)]
        samples.push(processes::rss_kib(daemon.pid()).context("read bangerd's RSS")? as f64);
    }
    Ok(samples)
}

/// Creates `count` VMs named `vmN`, eight at a time.
fn create_many(daemon: &Daemon, count: usize, extra: &[&str]) -> anyhow::Result<()> {
    let names: Vec<String> = (0..count).map(|index| format!("vm{index}")).collect();
    for chunk in names.chunks(8) {
        processes::check_interrupt()?;
        let children: Vec<_> = chunk
            .iter()
            .map(|name| {
                daemon
                    .command()
                    .args(["-q", "vm", "create", name])
                    .args(extra)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()
            .context("run banger vm create")?;
        for (child, name) in children.into_iter().zip(chunk) {
            let output = child.wait_with_output()?;
            daemon.check(&["vm", "create", name], &output)?;
        }
    }
    Ok(())
}
