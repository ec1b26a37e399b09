//! Figures, their baselines and goals, and the two ways they are printed:
//! a text table and JSON.
//!
//! A figure's ratio is its p50 over its baseline's p50, both measured in
//! the same run. A goal is printed with whether it holds; it never makes
//! the suite fail.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

/// What a figure's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Milliseconds,
    Kibibytes,
    Mebibytes,
}

impl Unit {
    fn symbol(self) -> &'static str {
        match self {
            Self::Milliseconds => "ms",
            Self::Kibibytes => "KiB",
            Self::Mebibytes => "MiB",
        }
    }
}

/// n, p50, p95 and max of a set of samples (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl Summary {
    /// # Panics
    /// `samples` is empty (every figure measures at least once).
    #[must_use]
    pub fn of(samples: &[f64]) -> Self {
        assert!(!samples.is_empty(), "a figure needs at least one sample");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |fraction: f64| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rank = (fraction * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        Self {
            n: sorted.len(),
            p50: rank(0.50),
            p95: rank(0.95),
            max: sorted[sorted.len() - 1],
        }
    }

    #[must_use]
    pub fn of_durations(samples: &[Duration]) -> Self {
        let milliseconds: Vec<f64> = samples
            .iter()
            .map(|sample| sample.as_secs_f64() * 1000.0)
            .collect();
        Self::of(&milliseconds)
    }
}

/// A goal from the performance issue, checked against a figure's p50.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// p50 at most this many of the figure's unit.
    AtMost(f64),
    /// p50 at most this multiple of the baseline's p50.
    RatioAtMost(f64),
    /// The baseline's p50 at least this multiple of the figure's p50
    /// ("N times faster than the baseline").
    FasterThanBaseline(f64),
    /// `count` things done in p50 milliseconds: at least this many per second.
    RateAtLeast { count: usize, per_second: f64 },
}

impl Goal {
    fn describe(self, unit: Unit) -> String {
        match self {
            Self::AtMost(value) => format!("p50 ≤ {} {}", trim(value), unit.symbol()),
            Self::RatioAtMost(ratio) => format!("≤ {}× baseline", trim(ratio)),
            Self::FasterThanBaseline(ratio) => format!("≥ {}× faster than baseline", trim(ratio)),
            Self::RateAtLeast { per_second, .. } => format!("≥ {} /s", trim(per_second)),
        }
    }

    fn holds(self, summary: &Summary, baseline: Option<&Summary>) -> Option<bool> {
        match self {
            Self::AtMost(value) => Some(summary.p50 <= value),
            Self::RatioAtMost(ratio) => baseline.map(|base| summary.p50 <= ratio * base.p50),
            Self::FasterThanBaseline(ratio) => baseline.map(|base| base.p50 >= ratio * summary.p50),
            #[allow(clippy::cast_precision_loss)]
            Self::RateAtLeast { count, per_second } => {
                Some(count as f64 * 1000.0 / summary.p50 >= per_second)
            }
        }
    }
}

fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable identifier, e.g. `create.fake`; what baselines refer to.
    pub key: String,
    /// For people, e.g. `create → agent ready [fake]`.
    pub label: String,
    pub unit: Unit,
    pub summary: Summary,
    /// Key of the figure this one is a ratio against.
    pub baseline: Option<String>,
    pub goal: Option<Goal>,
    /// Anything else worth saying next to the numbers (rates, sizes).
    pub note: Option<String>,
}

impl Figure {
    #[must_use]
    pub fn new(key: &str, label: &str, unit: Unit, summary: Summary) -> Self {
        Self {
            key: key.to_owned(),
            label: label.to_owned(),
            unit,
            summary,
            baseline: None,
            goal: None,
            note: None,
        }
    }

    #[must_use]
    pub fn timed(key: &str, label: &str, samples: &[Duration]) -> Self {
        Self::new(
            key,
            label,
            Unit::Milliseconds,
            Summary::of_durations(samples),
        )
    }

    #[must_use]
    pub fn against(mut self, baseline: &str) -> Self {
        self.baseline = Some(baseline.to_owned());
        self
    }

    #[must_use]
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = Some(goal);
        self
    }

    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// How a case ended when it did not produce figures.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub case: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Failed {
    pub case: String,
    pub error: String,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub quick: bool,
    pub figures: Vec<Figure>,
    pub skipped: Vec<Skipped>,
    pub failed: Vec<Failed>,
}

impl Report {
    fn find(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|figure| figure.key == key)
    }

    fn ratio(&self, figure: &Figure) -> Option<(f64, &Figure)> {
        let baseline = self.find(figure.baseline.as_deref()?)?;
        (baseline.summary.p50 > 0.0).then(|| (figure.summary.p50 / baseline.summary.p50, baseline))
    }

    fn goal_holds(&self, figure: &Figure) -> Option<bool> {
        let baseline = self.ratio(figure).map(|(_, baseline)| &baseline.summary);
        figure.goal?.holds(&figure.summary, baseline)
    }

    /// The table: one line per figure, then notes, skips and failures.
    #[must_use]
    pub fn table(&self) -> String {
        let header =
            ["key", "case", "n", "p50", "p95", "max", "ratio", "goal", ""].map(str::to_owned);
        let mut rows = vec![header];
        for figure in &self.figures {
            let value = |value: f64| format_value(value, figure.unit);
            let ratio = self
                .ratio(figure)
                .map(|(ratio, baseline)| format!("{ratio:.2}× {}", baseline.key))
                .unwrap_or_default();
            let goal = figure
                .goal
                .map(|goal| goal.describe(figure.unit))
                .unwrap_or_default();
            let holds = match self.goal_holds(figure) {
                Some(true) => "met",
                Some(false) => "not met",
                None => "",
            };
            rows.push([
                figure.key.clone(),
                figure.label.clone(),
                figure.summary.n.to_string(),
                value(figure.summary.p50),
                value(figure.summary.p95),
                value(figure.summary.max),
                ratio,
                goal,
                holds.to_owned(),
            ]);
        }
        let mut widths = [0_usize; 9];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (index, (cell, width)) in row.iter().zip(widths).enumerate() {
                let pad = width - cell.chars().count();
                // Text left, numbers right.
                if (2..=5).contains(&index) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str("  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let notes: Vec<&Figure> = self
            .figures
            .iter()
            .filter(|figure| figure.note.is_some())
            .collect();
        if !notes.is_empty() {
            out.push('\n');
            for figure in notes {
                let _ = writeln!(
                    out,
                    "{}: {}",
                    figure.key,
                    figure.note.as_deref().unwrap_or_default()
                );
            }
        }
        if !self.skipped.is_empty() || !self.failed.is_empty() {
            out.push('\n');
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "SKIPPED {}: {}", skipped.case, skipped.reason);
        }
        for failed in &self.failed {
            let _ = writeln!(out, "FAILED {}: {}", failed.case, failed.error);
        }
        out
    }

    #[must_use]
    pub fn json(&self) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|figure| {
                json!({
                    "key": figure.key,
                    "label": figure.label,
                    "unit": figure.unit.symbol(),
                    "n": figure.summary.n,
                    "p50": round(figure.summary.p50),
                    "p95": round(figure.summary.p95),
                    "max": round(figure.summary.max),
                    "baseline": figure.baseline,
                    "ratio": self.ratio(figure).map(|(ratio, _)| round(ratio)),
                    "goal": figure.goal.map(|goal| goal.describe(figure.unit)),
                    "goal_met": self.goal_holds(figure),
                    "note": figure.note,
                })
            })
            .collect();
        json!({
            "mode": if self.quick { "quick" } else { "full" },
            "figures": figures,
            "skipped": self.skipped.iter().map(|skipped| json!({"case": skipped.case, "reason": skipped.reason})).collect::<Vec<_>>(),
            "failed": self.failed.iter().map(|failed| json!({"case": failed.case, "error": failed.error})).collect::<Vec<_>>(),
        })
    }
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn format_value(value: f64, unit: Unit) -> String {
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {}", unit.symbol())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        let summary = Summary::of(&samples);
        assert_eq!(summary.n, 20);
        assert!((summary.p50 - 10.0).abs() < f64::EPSILON);
        assert!((summary.p95 - 19.0).abs() < f64::EPSILON);
        assert!((summary.max - 20.0).abs() < f64::EPSILON);
        let one = Summary::of(&[7.0]);
        assert!((one.p50 - 7.0).abs() < f64::EPSILON && (one.p95 - 7.0).abs() < f64::EPSILON);
    }

    #[test]
    fn ratios_and_goals_use_the_baseline_of_the_same_run() {
        let mut report = Report::default();
        report.figures.push(Figure::new(
            "base",
            "baseline",
            Unit::Milliseconds,
            Summary::of(&[10.0]),
        ));
        report.figures.push(
            Figure::new("fast", "fast", Unit::Milliseconds, Summary::of(&[1.0]))
                .against("base")
                .goal(Goal::FasterThanBaseline(10.0)),
        );
        report.figures.push(
            Figure::new("slow", "slow", Unit::Milliseconds, Summary::of(&[13.0]))
                .against("base")
                .goal(Goal::RatioAtMost(1.2)),
        );
        report.figures.push(
            Figure::new("burst", "burst", Unit::Milliseconds, Summary::of(&[2000.0])).goal(
                Goal::RateAtLeast {
                    count: 50,
                    per_second: 20.0,
                },
            ),
        );
        let json = report.json();
        let figures = json["figures"].as_array().unwrap();
        assert_eq!(figures[1]["ratio"], 0.1);
        assert_eq!(figures[1]["goal_met"], true);
        assert_eq!(figures[2]["ratio"], 1.3);
        assert_eq!(figures[2]["goal_met"], false);
        assert_eq!(figures[3]["goal_met"], true);
        let table = report.table();
        assert!(table.contains("1.30× base"), "{table}");
        assert!(table.contains("not met"), "{table}");
    }
}
