//! banger's benchmark suite.
//!
//! Drives the real binaries (bangerd, banger, fake-firecracker, the guest
//! agent in host test mode; real Firecracker and QEMU where present), never
//! the daemon's code, so it measures what a user gets. Each run:
//!
//! 1. Makes one work directory; every case gets a folder in it, with its
//!    own daemon(s).
//! 2. Runs the cases in order. A case measures its figures and the
//!    baselines they are compared with in the same run, on this machine, so
//!    ratios hold from one machine to another where absolute times do not.
//!    A case that needs what the machine lacks is skipped with the reason.
//! 3. After each case, kills (by pid) any process still running from its
//!    folder and reports that as a failure: a case must clean up.
//! 4. Prints the table (or JSON) and exits 1 if a case failed. Times never
//!    fail a run; goals are printed with whether they hold.

mod args;
mod cases;
mod daemon;
mod fixtures;
mod processes;
mod report;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser as _;

use crate::args::Args;
use crate::report::{Failed, Figure, Report, Skipped};

/// The binaries the suite drives.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub bangerd: PathBuf,
    pub banger: PathBuf,
    pub fake_firecracker: PathBuf,
    pub fake_jailer: PathBuf,
    pub agent: PathBuf,
}

impl Binaries {
    fn find(directory: &Path) -> anyhow::Result<Self> {
        let binary = |name: &str| {
            let path = directory.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(anyhow::anyhow!(
                    "{} is missing (build the workspace's binaries first: `cargo build --release --workspace --bins`)",
                    path.display()
                ))
            }
        };
        Ok(Self {
            bangerd: binary("bangerd")?,
            banger: binary("banger")?,
            fake_firecracker: binary("fake-firecracker")?,
            fake_jailer: binary("fake-jailer")?,
            agent: binary("banger-agent")?,
        })
    }
}

/// What every case gets.
pub struct Context {
    pub bins: Binaries,
    pub quick: bool,
    /// The run's work directory.
    pub work: PathBuf,
    pub firecracker: Option<PathBuf>,
    pub golden_image: Option<PathBuf>,
    pub agent_static: Option<PathBuf>,
}

impl Context {
    /// `quick` in a quick run, else `full`.
    #[must_use]
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// What a case produced: figures, and the parts it skipped with why.
#[derive(Debug, Default)]
pub struct Outcome {
    pub figures: Vec<Figure>,
    pub skipped: Vec<Skipped>,
}

impl Outcome {
    #[must_use]
    pub fn skipped(case: &str, reason: impl Into<String>) -> Self {
        Self {
            figures: Vec::new(),
            skipped: vec![Skipped {
                case: case.to_owned(),
                reason: reason.into(),
            }],
        }
    }
}

pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!("{:#}", report.json());
            } else {
                print!("{}", report.table());
            }
            if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    processes::catch_interrupts();
    let bin_dir = match &args.bin_dir {
        Some(directory) => directory.clone(),
        None => std::env::current_exe()
            .context("locate banger-bench")?
            .parent()
            .context("banger-bench has no directory")?
            .to_owned(),
    };
    let bins = Binaries::find(&bin_dir)?;
    for name in &args.cases {
        if !cases::ALL.iter().any(|case| case.name == name) {
            let names: Vec<&str> = cases::ALL.iter().map(|case| case.name).collect();
            anyhow::bail!("unknown case `{name}` (cases: {})", names.join(", "));
        }
    }
    let work = tempfile::Builder::new()
        .prefix("banger-bench-")
        .tempdir()
        .context("make the work directory")?;
    let context = Context {
        bins,
        quick: args.quick,
        work: work.path().to_owned(),
        firecracker: args.firecracker.clone(),
        golden_image: args.golden_image.clone(),
        agent_static: args.agent_static.clone(),
    };
    eprintln!(
        "banger-bench: {} run, binaries from {}, work in {}",
        if args.quick { "quick" } else { "full" },
        bin_dir.display(),
        work.path().display()
    );
    let mut report = Report {
        quick: args.quick,
        ..Report::default()
    };
    for case in cases::ALL {
        if !args.cases.is_empty() && !args.cases.iter().any(|name| name == case.name) {
            continue;
        }
        if processes::interrupted() {
            report.failed.push(Failed {
                case: case.name.to_owned(),
                error: "not run: interrupted".to_owned(),
            });
            continue;
        }
        let started = Instant::now();
        eprintln!("banger-bench: {} …", case.name);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (case.run)(&context)));
        let folder = context.work.join(case.name);
        let leaked = processes::kill_processes_under(&folder);
        match outcome {
            Ok(Ok(outcome)) => {
                report.figures.extend(outcome.figures);
                for skipped in outcome.skipped {
                    eprintln!("SKIPPED {}: {}", skipped.case, skipped.reason);
                    report.skipped.push(skipped);
                }
            }
            Ok(Err(error)) => report.failed.push(Failed {
                case: case.name.to_owned(),
                error: format!("{error:#}"),
            }),
            Err(_) => report.failed.push(Failed {
                case: case.name.to_owned(),
                error: "panicked".to_owned(),
            }),
        }
        // A case's inputs can be gigabytes; the next case may need the room.
        if !args.keep {
            if let Err(error) = fixtures::remove_tree(&folder) {
                report.failed.push(Failed {
                    case: case.name.to_owned(),
                    error: format!("{error:#}"),
                });
            }
        }
        if leaked > 0 {
            report.failed.push(Failed {
                case: case.name.to_owned(),
                error: format!("left {leaked} processes running (killed)"),
            });
        }
        eprintln!(
            "banger-bench: {} done in {:.1} s",
            case.name,
            started.elapsed().as_secs_f64()
        );
    }
    if args.keep {
        let kept = work.keep();
        eprintln!("banger-bench: kept {}", kept.display());
    } else {
        work.close().context("remove the work directory")?;
    }
    Ok(report)
}
