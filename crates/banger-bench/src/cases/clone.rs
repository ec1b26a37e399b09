//! Root-disk clones of a large sparse image (4 GiB holding 1 GiB of data;
//! 64 MiB holding 8 MiB in a quick run) by each strategy the host allows,
//! as the `clone root disk` stage of `vm create --no-start`, against `cp`
//! of the same file on the same file system.
//!
//! 1. copy, on the work directory's file system, against
//!    `cp --sparse=always`;
//! 2. reflink, on an XFS (reflink=1) loop mount made for the run (root and
//!    `mkfs.xfs` needed), against `cp --reflink=always`;
//! 3. dm-snapshot where device-mapper answers (root), no baseline.
//!
//! The image is in the page cache for all of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{folder, StageTimes};
use crate::daemon::{Daemon, DaemonSetup};
use crate::fixtures;
use crate::processes;
use crate::report::{Figure, Skipped, Summary};
use crate::{Context, Outcome};

pub fn clone(context: &Context) -> anyhow::Result<Outcome> {
    let directory = folder(context, "clone")?;
    let (size_mib, data_mib) = context.pick((64, 8), (4096, 1024));
    // The image, the daemon's copy of it, a clone: each holds the data.
    if let Err(reason) = fixtures::require_free(&directory, (data_mib << 20) * 7 / 2 + (256 << 20))
    {
        return Ok(Outcome::skipped("clone", reason));
    }
    let contents = directory.join("contents");
    std::fs::create_dir_all(&contents)?;
    fixtures::write_noise(&contents.join("data.bin"), data_mib << 20, 7)?;
    let image = directory.join("image.ext4");
    fixtures::make_ext4(&image, size_mib, Some(&contents))?;
    fixtures::remove_tree(&contents)?;
    let kernel = directory.join("vmlinux");
    fixtures::write_fake_kernel(&kernel)?;
    let inputs = Inputs {
        image,
        kernel,
        runs: context.pick(2, 3),
        size: format!(
            "{size_mib} MiB image, {data_mib} MiB of data, on {}",
            fixtures::file_system_type(&directory)
        ),
    };

    let mut outcome = Outcome::default();
    outcome.figures.extend(measure(
        context,
        &inputs,
        &directory.join("copy"),
        None,
        "copy",
        Some(("cp-sparse", "--sparse=always")),
    )?);

    match reflink_unavailable() {
        Some(reason) => outcome.skipped.push(Skipped {
            case: "clone.reflink".to_owned(),
            reason,
        }),
        None => {
            // mkfs.xfs refuses file systems under 300 MB.
            let xfs = XfsLoop::new(
                &directory.join("xfs"),
                ((size_mib << 20) * 3).max(512 << 20),
            )?;
            let figures = measure(
                context,
                &inputs,
                &directory.join("reflink"),
                Some(xfs.mount_point.join("state")),
                "reflink",
                Some(("cp-reflink", "--reflink=always")),
            );
            drop(xfs);
            outcome.figures.extend(figures?);
        }
    }

    match device_mapper_unavailable() {
        Some(reason) => outcome.skipped.push(Skipped {
            case: "clone.dm-snapshot".to_owned(),
            reason,
        }),
        None => outcome.figures.extend(measure(
            context,
            &inputs,
            &directory.join("dm-snapshot"),
            None,
            "dm-snapshot",
            None,
        )?),
    }
    Ok(outcome)
}

struct Inputs {
    image: PathBuf,
    kernel: PathBuf,
    runs: usize,
    size: String,
}

/// A daemon with `[storage] clone = strategy` whose state lives in
/// `state_dir`; times its clone stage and, with a baseline, `cp FLAG` of
/// the stored image next to it.
fn measure(
    context: &Context,
    inputs: &Inputs,
    directory: &Path,
    state_dir: Option<PathBuf>,
    strategy: &str,
    baseline: Option<(&str, &str)>,
) -> anyhow::Result<Vec<Figure>> {
    let mut setup = DaemonSetup::fake(&context.bins, directory, false);
    let size = match &state_dir {
        Some(state_dir) => inputs.size.replace(
            &fixtures::file_system_type(&context.work),
            &fixtures::file_system_type(state_dir.parent().unwrap_or(state_dir)),
        ),
        None => inputs.size.clone(),
    };
    setup.config = setup
        .config
        .replace("clone = \"copy\"", &format!("clone = \"{strategy}\""));
    setup.state_dir = state_dir;
    let daemon = Daemon::start(&context.bins, directory, setup)?;
    daemon.import_defaults(&inputs.image, &inputs.kernel)?;
    let stored = daemon.json(&["image", "show", "default"])?["path"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("image show printed no path"))?;
    let copy_target = daemon.state_dir.join("cp-baseline");
    let mut stages = StageTimes::default();
    let mut walls = Vec::new();
    let mut copies = Vec::new();
    for round in 0..inputs.runs {
        if let Some((_, flag)) = baseline {
            processes::check_interrupt()?;
            let started = Instant::now();
            fixtures::run(Command::new("cp").arg(flag).arg(&stored).arg(&copy_target))?;
            copies.push(started.elapsed());
            std::fs::remove_file(&copy_target)?;
        }
        let name = format!("clone{round}");
        let (wall, events) = daemon.timed(&["vm", "create", &name, "--no-start", "--json"])?;
        walls.push(wall);
        stages.add(&events);
        daemon.banger(&["-q", "vm", "delete", "--force", &name])?;
    }
    let clone_times = stages
        .times
        .get("clone root disk")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("vm create --json reported no `clone root disk` stage"))?;
    let wall = Summary::of_durations(&walls);
    let mut figure = Figure::new(
        &format!("clone.{strategy}"),
        &format!("root disk clone, {strategy} (create stage)"),
        crate::report::Unit::Milliseconds,
        Summary::of(&clone_times),
    )
    .note(format!(
        "{size}; stage times are whole ms; vm create --no-start p50 {:.0} ms",
        wall.p50
    ));
    let mut figures = Vec::new();
    if let Some((key, flag)) = baseline {
        figures.push(Figure::timed(key, &format!("baseline: cp {flag}"), &copies));
        figure = figure.against(key);
    }
    figures.push(figure);
    Ok(figures)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub(super) fn reflink_unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root for an XFS loop mount".to_owned());
    }
    ["mkfs.xfs", "losetup", "mount", "umount"]
        .into_iter()
        .find(|tool| !processes::on_path(tool))
        .map(|tool| format!("`{tool}` is not installed (apt install xfsprogs)"))
}

fn device_mapper_unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root".to_owned());
    }
    if !processes::on_path("dmsetup") {
        return Some("`dmsetup` is not installed".to_owned());
    }
    match Command::new("dmsetup").arg("version").output() {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "device-mapper does not answer (`dmsetup version`): {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .next()
                .unwrap_or_default()
        )),
        Err(error) => Some(format!("cannot run dmsetup: {error}")),
    }
}

/// An XFS file system with reflink=1 on a sparse file, on a loop device,
/// mounted for the run. Drop unmounts and detaches.
pub(super) struct XfsLoop {
    pub(super) mount_point: PathBuf,
    loop_device: Option<String>,
    mounted: bool,
}

impl XfsLoop {
    pub(super) fn new(directory: &Path, size: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(directory)?;
        let backing = directory.join("xfs.img");
        std::fs::File::create(&backing)?.set_len(size)?;
        fixtures::run(
            Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&backing),
        )?;
        let mut mount = Self {
            mount_point: directory.join("mnt"),
            loop_device: None,
            mounted: false,
        };
        let device = fixtures::run(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&backing),
        )?;
        mount.loop_device = Some(device.trim().to_owned());
        std::fs::create_dir_all(&mount.mount_point)?;
        fixtures::run(
            Command::new("mount")
                .arg(device.trim())
                .arg(&mount.mount_point),
        )?;
        mount.mounted = true;
        Ok(mount)
    }
}

impl Drop for XfsLoop {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(error) = fixtures::run(Command::new("umount").arg(&self.mount_point)) {
                eprintln!("banger-bench: {error:#}");
            }
        }
        if let Some(device) = &self.loop_device {
            if let Err(error) = fixtures::run(Command::new("losetup").args(["-d", device])) {
                eprintln!("banger-bench: {error:#}");
            }
        }
    }
}
