use std::process::ExitCode;

use clap::Parser;
use ledger::cli::Cli;

/// mimalloc: the request path allocates many small, short-lived values
/// (JSON trees, rows, strings); glibc's allocator spent as much CPU on them
/// as the ledger's own code did (`perf` over `ledger bench ingest`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ledger::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ledger::cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
