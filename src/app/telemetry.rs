//! Logging: human-readable by default, JSON lines with `--log-format json`.
//! The level comes from `RUST_LOG` (default `info`). Lines go to stderr, or
//! to a file (`ledger demo` keeps the server's lines out of its narration).

use std::path::Path;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for a log pipeline.
    Json,
}

/// Install the global subscriber: level from `RUST_LOG` (default `info`),
/// lines to stderr, or appended to `file` (created with its directory).
pub fn init(format: LogFormat, file: Option<&Path>) -> std::io::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let writer = match file {
        None => BoxMakeWriter::new(std::io::stderr),
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(file.is_none())
        .with_writer(writer);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}
