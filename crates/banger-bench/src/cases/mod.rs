//! The cases, in the order they run. Each makes its own daemon(s) in its
//! own folder of the run's work directory and leaves nothing behind.
//!
//! The goals printed next to the figures are those of the performance
//! issue: create→agent ready [fake] p50 ≤ 30 ms and 50 concurrent creates
//! ≥ 20/s; `vm run -- true` p50 ≤ 10 ms [fake] and ≥ 10× faster than a new
//! `ssh` [real]; create→running [real Firecracker] ≤ 1.2× the raw API
//! sequence; create→agent ready [real] ≤ 1.1× a bare QEMU boot; workspace
//! prepare ≥ 1.5× faster than `tar | ssh` [real]; `vm list` with 1,000 VMs
//! ≤ 50 ms; daemon RSS ≤ 30 MiB idle and ≤ 200 KiB per VM; and from the
//! snapshot issue, restore → agent ready ≥ 10× faster than a cold create
//! [real].

mod clone;
mod create;
mod firecracker;
mod guest;
mod list;
mod qemu;
mod snapshot;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::daemon::{Daemon, DaemonSetup};
use crate::{fixtures, Context, Outcome};

pub struct Case {
    pub name: &'static str,
    pub run: fn(&Context) -> anyhow::Result<Outcome>,
}

pub const ALL: &[Case] = &[
    Case {
        name: "create",
        run: create::sequential,
    },
    Case {
        name: "concurrent",
        run: create::concurrent,
    },
    Case {
        name: "run",
        run: guest::run_true,
    },
    Case {
        name: "workspace",
        run: guest::workspace,
    },
    Case {
        name: "list",
        run: list::list,
    },
    Case {
        name: "rss",
        run: list::rss,
    },
    Case {
        name: "clone",
        run: clone::clone,
    },
    Case {
        name: "firecracker",
        run: firecracker::firecracker,
    },
    Case {
        name: "qemu",
        run: qemu::qemu,
    },
    Case {
        name: "snapshot",
        run: snapshot::snapshot,
    },
];

/// The case's folder in the run's work directory (created).
fn folder(context: &Context, case: &str) -> anyhow::Result<PathBuf> {
    let path = context.work.join(case);
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

/// A fake-firecracker daemon in the case's folder with a small image
/// (`image_mib`) and a stand-in kernel registered as `default`.
fn fake_daemon(
    context: &Context,
    case: &str,
    guest_agent: bool,
    image_mib: u64,
) -> anyhow::Result<Daemon> {
    fake_daemon_with(context, case, guest_agent, image_mib, "")
}

/// [`fake_daemon`] with `vm_settings` (lines) added to its `[vm]` section.
fn fake_daemon_with(
    context: &Context,
    case: &str,
    guest_agent: bool,
    image_mib: u64,
    vm_settings: &str,
) -> anyhow::Result<Daemon> {
    let directory = folder(context, case)?;
    let (image, kernel) = fixtures::fake_defaults(&directory, image_mib)?;
    let mut setup = DaemonSetup::fake(&context.bins, &directory.join("daemon"), guest_agent);
    setup.config = setup
        .config
        .replacen("[vm]\n", &format!("[vm]\n{vm_settings}"), 1);
    let daemon = Daemon::start(&context.bins, &directory.join("daemon"), setup)?;
    daemon.import_defaults(&image, &kernel)?;
    Ok(daemon)
}

/// How long each create stage took, from `vm create --json`'s stage
/// events, collected over many creates.
#[derive(Debug, Default)]
struct StageTimes {
    /// Stage name → milliseconds per create, in the order first seen.
    order: Vec<String>,
    times: BTreeMap<String, Vec<f64>>,
}

impl StageTimes {
    /// Adds the `finished` events of one `vm create --json` output.
    fn add(&mut self, json_lines: &str) {
        for line in json_lines.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if event["event"] != "stage" || event["status"] != "finished" {
                continue;
            }
            // Microseconds where the daemon sends them, else whole ms.
            let elapsed = event["elapsed_us"]
                .as_f64()
                .map(|micros| micros / 1000.0)
                .or_else(|| event["elapsed_ms"].as_f64());
            let (Some(stage), Some(elapsed)) = (event["stage"].as_str(), elapsed) else {
                continue;
            };
            if !self.times.contains_key(stage) {
                self.order.push(stage.to_owned());
            }
            self.times
                .entry(stage.to_owned())
                .or_default()
                .push(elapsed);
        }
    }

    fn p50(&self, stage: &str) -> Option<f64> {
        self.times
            .get(stage)
            .map(|times| crate::report::Summary::of(times).p50)
    }

    /// `stage p50: clone root disk 3 ms, …` for the stages that took time.
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .order
            .iter()
            .filter_map(|stage| {
                let p50 = self.p50(stage)?;
                (p50 >= 0.05).then(|| format!("{stage} {p50:.1} ms"))
            })
            .collect();
        if parts.is_empty() {
            "stage p50s: all under 0.05 ms".to_owned()
        } else {
            format!("stage p50s: {}", parts.join(", "))
        }
    }
}
