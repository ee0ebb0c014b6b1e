//! Progress of long work on a terminal (indicatif): a bar with a rate and an
//! estimate on standard error when it is a terminal, nothing otherwise (and
//! nothing for work done for an HTTP request: [`Progress::hidden`]). The
//! commands print their one-line summary themselves, on standard output.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// One bar, or nothing when standard error is not a terminal (clones show
/// the same bar: one per task of a shared piece of work).
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

const EVENTS: &str = "{msg:<24} [{bar:30}] {pos}/{len} events {per_sec} eta {eta}";

impl Progress {
    fn new(label: &str, total: u64, template: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self::hidden();
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        Self { bar: Some(bar) }
    }

    /// No bar at all.
    pub fn hidden() -> Self {
        Self { bar: None }
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

    /// Events of the log.
    pub fn events(label: &str, total: u64) -> Self {
        Self::new(label, total, EVENTS)
    }

    /// Requests of a set-up.
    pub fn requests(label: &str, total: u64) -> Self {
        Self::new(
            label,
            total,
            "{msg:<24} [{bar:30}] {pos}/{len} requests {per_sec} eta {eta}",
        )
    }

    /// Work whose size is unknown (one long statement): a spinner with the
    /// time it has taken.
    pub fn spinner(label: &str) -> Self {
        let progress = Self::new(label, 0, "{spinner} {msg} {elapsed}");
        if let Some(bar) = &progress.bar {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        progress
    }

    /// The next part of the work: `total` events, counted from zero.
    pub fn next_events(&self, label: &str, total: u64) {
        if let Some(bar) = &self.bar {
            bar.disable_steady_tick();
            if let Ok(style) = ProgressStyle::with_template(EVENTS) {
                bar.set_style(style);
            }
            bar.set_message(label.to_string());
            bar.set_length(total);
            bar.reset();
        }
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
