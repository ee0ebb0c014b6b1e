//! The neutral import format's door: JSON Lines from a file, one record per
//! line (blank lines ignored). A line that is not a record is a per-row
//! failure naming its line; every other line is imported.

use std::io::BufRead;
use std::path::Path;

use aggregates::import::SourceRecord;

use super::{ImportError, Importer, Report};
use crate::tools::progress::Progress;

/// Import every record of the JSON Lines file at `path`.
pub async fn import_file(mut importer: Importer, path: &Path) -> Result<Report, ImportError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ImportError::Source(format!("cannot read {}: {e}", path.display())))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = Progress::bytes(&path.display().to_string(), size);
    let reader = std::io::BufReader::new(file);
    for (index, line) in reader.lines().enumerate() {
        let line =
            line.map_err(|e| ImportError::Source(format!("cannot read {}: {e}", path.display())))?;
        progress.advance(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        let table = format!("line {}", index + 1);
        let record = serde_json::from_str(&line)
            .map_err(|e| e.to_string())
            .and_then(|value| SourceRecord::from_value(value).map_err(|e| e.to_string()));
        match record {
            Ok(record) => importer.add(&table, record).await?,
            Err(reason) => {
                let source_id = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("source_id")?.as_str().map(String::from))
                    .unwrap_or_default();
                importer
                    .report()
                    .fail_unreadable(&table, &source_id, reason);
            }
        }
    }
    progress.finish();
    importer.finish().await
}
