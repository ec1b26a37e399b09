//! How an operation's stages look while the CLI follows it (`vm create`,
//! `image import`/`pull`, `kernel import`/`pull`, workspaces):
//!
//! - On a terminal: a spinner per running stage; a stage that reports
//!   bytes (`progress` events: downloads, image and kernel copies, a root
//!   disk copied by the `copy` clone strategy) turns into a bar with bytes,
//!   rate and ETA (a spinner with bytes and rate while the total is
//!   unknown). A reflink clone reports no bytes and shows no bar.
//! - Bars and spinners need stderr to be a terminal (and `TERM` not
//!   `dumb`), and neither `--no-progress` nor `--quiet`
//!   ([`Printer::progress`]). Otherwise `progress` events print nothing and
//!   each finished stage is one plain line that says how many bytes it
//!   moved: no carriage returns, no cursor movement.
//! - `NO_COLOR` (no-color.org: no ANSI colour) keeps bars and spinners but
//!   draws them in the terminal's own colour.
//! - `--json`: every frame as one JSON object per line on stdout, `progress`
//!   events included, as the daemon sent them; nothing drawn.

use std::collections::HashMap;
use std::time::Duration;

use banger_proto::{StageEvent, StageStatus, StreamFrame};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressState, ProgressStyle};

use crate::printer::Printer;

/// Stage lines: spinners and bars on a terminal, plain lines otherwise,
/// JSON lines with `--json`.
pub(crate) struct StageView {
    printer: Printer,
    json: bool,
    bars: Option<MultiProgress>,
    active: HashMap<String, ProgressBar>,
    /// The last bytes (and total) each stage reported, for its closing line.
    moved: HashMap<String, (u64, Option<u64>)>,
}

impl StageView {
    pub(crate) fn new(printer: Printer, json: bool) -> Self {
        let bars = (printer.progress && !json).then(MultiProgress::new);
        Self {
            printer,
            json,
            bars,
            active: HashMap::new(),
            moved: HashMap::new(),
        }
    }

    fn line(&self, text: String) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(text);
            }
            None => self.printer.message(&text),
        }
    }

    pub(crate) fn stage(&mut self, event: &StageEvent) {
        if self.json {
            self.printer.json_line(&StreamFrame::Stage(event.clone()));
            return;
        }
        let seconds = event
            .elapsed_us
            .map_or_else(
                || Duration::from_millis(event.elapsed_ms),
                Duration::from_micros,
            )
            .as_secs_f64();
        match event.status {
            StageStatus::Started => {
                self.moved.remove(&event.stage);
                if let Some(bars) = &self.bars {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(self.style(Look::Spinner));
                    bar.set_message(event.stage.clone());
                    bar.enable_steady_tick(Duration::from_millis(100));
                    self.active.insert(event.stage.clone(), bar);
                }
            }
            StageStatus::Finished => {
                self.remove(&event.stage);
                let moved = self.moved.remove(&event.stage);
                self.line(finished_line(
                    &event.stage,
                    seconds,
                    moved,
                    event.message.as_deref(),
                ));
            }
            StageStatus::Failed => {
                self.remove(&event.stage);
                self.line(format!(
                    "  ✗ {} ({seconds:.3}s): {}",
                    event.stage,
                    event.message.as_deref().unwrap_or("failed")
                ));
            }
            StageStatus::RolledBack => {
                self.line(format!("  ↺ {} rolled back", event.stage));
            }
            StageStatus::Progress => self.progress(event),
        }
    }

    /// Bytes of a running stage: its spinner becomes a bar.
    fn progress(&mut self, event: &StageEvent) {
        let Some(bytes) = event.bytes else {
            return;
        };
        self.moved.insert(event.stage.clone(), (bytes, event.total));
        let Some(bar) = self.active.get(&event.stage) else {
            return;
        };
        match event.total {
            Some(total) if bar.length() != Some(total) => {
                bar.set_length(total);
                bar.set_style(self.style(Look::Bar));
            }
            None if bar.length().is_some() || bar.position() == 0 => {
                bar.unset_length();
                bar.set_style(self.style(Look::Bytes));
            }
            _ => {}
        }
        bar.set_position(bytes);
        // Stages run by the CLI say more (files) in the message.
        if let Some(message) = &event.message {
            bar.set_message(format!("{} ({message})", event.stage));
        }
    }

    fn style(&self, look: Look) -> ProgressStyle {
        let template = match (look, self.printer.color) {
            (Look::Spinner, true) => "  {spinner:.green} {msg} {seconds:.dim}",
            (Look::Spinner, false) => "  {spinner} {msg} {seconds}",
            (Look::Bar, true) => {
                "  {spinner:.green} {msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec:.dim} ETA {eta}"
            }
            (Look::Bar, false) => {
                "  {spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            }
            (Look::Bytes, true) => "  {spinner:.green} {msg} {bytes} {bytes_per_sec:.dim}",
            (Look::Bytes, false) => "  {spinner} {msg} {bytes} {bytes_per_sec}",
        };
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .with_key(
                "seconds",
                |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.1}s", state.elapsed().as_secs_f64());
                },
            )
            .progress_chars("=> ")
    }

    fn remove(&mut self, stage: &str) {
        if let Some(bar) = self.active.remove(stage) {
            bar.finish_and_clear();
            if let Some(bars) = &self.bars {
                bars.remove(&bar);
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        let stages: Vec<String> = self.active.keys().cloned().collect();
        for stage in stages {
            self.remove(&stage);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Look {
    /// A running stage without bytes.
    Spinner,
    /// Bytes of a known total: bar, rate, ETA.
    Bar,
    /// Bytes of an unknown total: count and rate.
    Bytes,
}

/// `  ✓ STAGE (SECONDS, BYTES, MESSAGE)`: the bytes it moved, when it
/// reported any (`12.00 MiB`, or `3.00 MiB of 12.00 MiB` when it stopped
/// short of its total).
fn finished_line(
    stage: &str,
    seconds: f64,
    moved: Option<(u64, Option<u64>)>,
    message: Option<&str>,
) -> String {
    let mut detail = String::new();
    match moved {
        Some((bytes, Some(total))) if bytes != total => {
            detail = format!(", {} of {}", HumanBytes(bytes), HumanBytes(total));
        }
        Some((bytes, _)) => detail = format!(", {}", HumanBytes(bytes)),
        None => {}
    }
    if let Some(message) = message {
        detail.push_str(", ");
        detail.push_str(message);
    }
    format!("  ✓ {stage} ({seconds:.3}s{detail})")
}

#[cfg(test)]
mod tests {
    use super::finished_line;

    #[test]
    fn finished_lines_say_the_bytes_moved() {
        assert_eq!(
            finished_line("copy image", 0.5, Some((12 << 20, Some(12 << 20))), None),
            "  ✓ copy image (0.500s, 12.00 MiB)"
        );
        assert_eq!(
            finished_line("pull image", 1.0, Some((3 << 20, Some(12 << 20))), None),
            "  ✓ pull image (1.000s, 3.00 MiB of 12.00 MiB)"
        );
        assert_eq!(
            finished_line("clone root disk", 0.001, None, Some("reflink")),
            "  ✓ clone root disk (0.001s, reflink)"
        );
        assert_eq!(
            finished_line("clone root disk", 2.0, Some((1024, None)), Some("copy")),
            "  ✓ clone root disk (2.000s, 1.00 KiB, copy)"
        );
    }
}
