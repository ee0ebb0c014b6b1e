//! What an import did: per record type new / unchanged / changed / failed /
//! skipped, every failure (table, source id, field, reason), every change
//! found, and warnings. Printed as a table; written as JSON by `--report`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aggregates::import::RecordType;
use serde::Serialize;
use uuid::Uuid;

/// Counts of one record type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Imported by this run.
    pub new: u64,
    /// Already imported, the same.
    pub unchanged: u64,
    /// Already imported, different in the source since.
    pub changed: u64,
    /// Refused (see the failures).
    pub failed: u64,
    /// Not imported on purpose (e.g. an inactive plan no subscription uses,
    /// usage of a subscription that was not imported).
    pub skipped: u64,
}

/// A row that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The record type it would have been (`None`: not a record at all).
    pub record_type: Option<RecordType>,
    /// Where it came from (a source table, or the file's line).
    pub table: String,
    /// Its id in the source.
    pub source_id: String,
    /// The field at fault.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// A record that changed in the source since it was imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Its type.
    pub record_type: RecordType,
    /// Its id in the source.
    pub source_id: String,
    /// The fields that differ.
    pub fields: Vec<String>,
    /// Whether the change was applied (`--apply-changes`).
    pub applied: bool,
}

/// The report of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The run's id in the log (`None` for a dry run, or when nothing was read).
    pub run_id: Option<Uuid>,
    /// The service imported into.
    pub service: String,
    /// The source system.
    pub source: Option<String>,
    /// Nothing was appended.
    pub dry_run: bool,
    /// Per record type.
    pub counts: BTreeMap<RecordType, Counts>,
    /// Lines that are not records of the format.
    pub unreadable: u64,
    /// Every row not imported.
    pub failures: Vec<Failure>,
    /// Every change found.
    pub changes: Vec<Change>,
    /// What deserves a look but was imported.
    pub warnings: Vec<String>,
}

impl Report {
    /// The counts of `record_type`.
    pub fn counts_mut(&mut self, record_type: RecordType) -> &mut Counts {
        self.counts.entry(record_type).or_default()
    }

    /// Record a failed row.
    pub fn fail(
        &mut self,
        record_type: RecordType,
        table: &str,
        source_id: &str,
        field: &str,
        reason: impl Into<String>,
    ) {
        self.counts_mut(record_type).failed += 1;
        self.failures.push(Failure {
            record_type: Some(record_type),
            table: table.to_string(),
            source_id: source_id.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        });
    }

    /// Record a line that is not a record of the format.
    pub fn fail_unreadable(&mut self, table: &str, source_id: &str, reason: impl Into<String>) {
        self.unreadable += 1;
        self.failures.push(Failure {
            record_type: None,
            table: table.to_string(),
            source_id: source_id.to_string(),
            field: "record".to_string(),
            reason: reason.into(),
        });
    }

    /// Totals over every type (unreadable lines count as failed).
    pub fn total(&self) -> Counts {
        let start = Counts {
            failed: self.unreadable,
            ..Counts::default()
        };
        self.counts.values().fold(start, |a, c| Counts {
            new: a.new + c.new,
            unchanged: a.unchanged + c.unchanged,
            changed: a.changed + c.changed,
            failed: a.failed + c.failed,
            skipped: a.skipped + c.skipped,
        })
    }

    /// 0 when every row was imported or unchanged, 2 when some rows
    /// failed, 1 when nothing could be done.
    pub fn exit_code(&self) -> u8 {
        let total = self.total();
        let done = total.new + total.unchanged + total.changed;
        if done == 0 {
            1
        } else if total.failed > 0 {
            2
        } else {
            0
        }
    }

    /// The counts as the run's completion records them.
    pub fn counts_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.counts).expect("counts serialize")
    }

    /// The report as a person reads it.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mode = if self.dry_run {
            " (dry run: nothing appended)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "import into {} from {}{mode}",
            self.service,
            self.source.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>10} {:>8} {:>7} {:>8}",
            "record type", "new", "unchanged", "changed", "failed", "skipped"
        );
        let mut row = |name: &str, c: &Counts| {
            let _ = writeln!(
                out,
                "{name:<18} {:>9} {:>10} {:>8} {:>7} {:>8}",
                c.new, c.unchanged, c.changed, c.failed, c.skipped
            );
        };
        for (kind, counts) in &self.counts {
            row(kind.as_str(), counts);
        }
        if self.unreadable > 0 {
            let unreadable = Counts {
                failed: self.unreadable,
                ..Counts::default()
            };
            row("unreadable", &unreadable);
        }
        row("total", &self.total());
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nfailures (table, source id, field, reason):");
            for failure in self.failures.iter().take(50) {
                let _ = writeln!(
                    out,
                    "  {:<16} {:<40} {:<24} {}",
                    failure.table, failure.source_id, failure.field, failure.reason
                );
            }
            if self.failures.len() > 50 {
                let _ = writeln!(
                    out,
                    "  … and {} more (--report FILE.json has them all)",
                    self.failures.len() - 50
                );
            }
        }
        if !self.changes.is_empty() {
            let _ = writeln!(out, "\nchanged in the source since imported:");
            for change in self.changes.iter().take(50) {
                let applied = if change.applied {
                    "applied"
                } else {
                    "not applied (--apply-changes)"
                };
                let _ = writeln!(
                    out,
                    "  {:<16} {:<40} {:<32} {applied}",
                    change.record_type.as_str(),
                    change.source_id,
                    change.fields.join(", ")
                );
            }
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(out, "\nwarnings:");
            for warning in self.warnings.iter().take(50) {
                let _ = writeln!(out, "  {warning}");
            }
            if self.warnings.len() > 50 {
                let _ = writeln!(out, "  … and {} more", self.warnings.len() - 50);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_says_whether_everything_nothing_or_some_was_imported() {
        let mut report = Report::default();
        assert_eq!(report.exit_code(), 1);
        report.counts_mut(RecordType::Customer).unchanged = 2;
        assert_eq!(report.exit_code(), 0);
        report.fail(RecordType::Plan, "plans", "p1", "price_monthly", "sub-cent");
        assert_eq!(report.exit_code(), 2);
        assert_eq!(
            report.total(),
            Counts {
                unchanged: 2,
                failed: 1,
                ..Counts::default()
            }
        );
    }
}
