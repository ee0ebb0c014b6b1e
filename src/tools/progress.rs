//! Progress of long work on a terminal (indicatif): a bar with a rate and an
//! estimate on standard error when it is a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// One bar, or nothing when standard error is not a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(label: &str, total: u64, template: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        Self { bar: Some(bar) }
    }

    /// Rows of a table.
    pub fn rows(label: &str, total: u64) -> Self {
        Self::new(
            label,
            total,
            "{msg:<16} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}",
        )
    }

    /// Bytes of a file.
    pub fn bytes(label: &str, total: u64) -> Self {
        Self::new(
            label,
            total,
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
    }

    /// `done` more.
    pub fn advance(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(done);
        }
    }

    /// The work is over: the bar stays, complete.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
