//! The printer owns the terminal: data goes to stdout, everything for the
//! human (progress, confirmations, errors) to stderr. It honours `--quiet`,
//! `--no-progress`, `NO_COLOR`, and whether stderr is a terminal.
//!
//! It is the only module that prints, and everything it prints goes
//! through `banger_proto::sanitize` first: VM errors, console tails, agent
//! messages and other text a guest chose reach the terminal with their
//! control characters and escape sequences made visible (JSON keeps the
//! same value, escaped). Writes to stdout ignore errors so that
//! `banger vm list | head -1` ends quietly instead of panicking on a closed
//! pipe.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};

use banger_proto::sanitize;
use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub struct Printer {
    /// Suppress messages and progress; data and errors still print.
    pub quiet: bool,
    /// Spinners, byte bars and live lines (stderr is a terminal, not
    /// `TERM=dumb`, no `--no-progress` or `--quiet`); see `crate::progress`.
    pub progress: bool,
    /// ANSI colours on stderr (a terminal, and `NO_COLOR` unset or empty).
    pub color: bool,
}

impl Printer {
    /// A printer for this process's terminal. `NO_COLOR` (no-color.org)
    /// turns colour off, not progress: bars and spinners stay, uncoloured.
    /// A terminal that cannot move its cursor (`TERM=dumb`) gets plain
    /// lines.
    pub fn new(quiet: bool, no_progress: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|term| term == "dumb");
        Self {
            quiet,
            progress: terminal && !dumb && !no_progress && !quiet,
            color: terminal && !no_color,
        }
    }

    /// A line of data on stdout.
    pub fn data(&self, text: &str) {
        self.write_data(&sanitize::text(text));
    }

    fn write_data(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
    }

    /// Pretty JSON on stdout.
    pub fn json(&self, value: &impl Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => self.write_data(&sanitize::json(&text)),
            Err(error) => self.error(&format!("Failed to encode JSON: {error}"), None),
        }
    }

    /// One compact JSON line on stdout, flushed at once (streams).
    pub fn json_line(&self, value: &impl Serialize) {
        match serde_json::to_string(value) {
            Ok(text) => self.write_data(&sanitize::json(&text)),
            Err(error) => self.error(&format!("Failed to encode JSON: {error}"), None),
        }
    }

    /// A message for the human, unless quiet.
    pub fn message(&self, text: &str) {
        if !self.quiet {
            eprintln!("{}", sanitize::text(text));
        }
    }

    /// `error: <message>` and, when there is one, `hint: <hint>` on stderr,
    /// even when quiet.
    pub fn error(&self, message: &str, hint: Option<&str>) {
        let message = sanitize::text(message);
        let hint = hint.map(sanitize::text);
        if self.color {
            eprintln!("\x1b[1;31merror\x1b[0m: {message}");
        } else {
            eprintln!("error: {message}");
        }
        if let Some(hint) = hint.as_deref() {
            if self.color {
                eprintln!("\x1b[1;36mhint\x1b[0m: {hint}");
            } else {
                eprintln!("hint: {hint}");
            }
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let render = |cells: Vec<&str>| -> String {
        let mut line = String::new();
        for (index, cell) in cells.iter().enumerate() {
            if index + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[index] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        line.trim_end().to_owned()
    };
    let mut lines = vec![render(headers.to_vec())];
    lines.extend(
        rows.iter()
            .map(|row| render(row.iter().map(String::as_str).collect())),
    );
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let text = super::table(
            &["NAME", "STATE"],
            &[
                vec!["a".into(), "running".into()],
                vec!["longer-name".into(), "stopped".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME         STATE\na            running\nlonger-name  stopped"
        );
    }
}
