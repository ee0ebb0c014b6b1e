//! The `ledger` binary: parses the command line and runs it (see
//! [`ledger::app::cli`]).

use std::process::ExitCode;

use clap::Parser;
use ledger::app::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = cli.log_file();
    if let Err(error) = ledger::app::telemetry::init(cli.log_format, log_file.as_deref()) {
        eprintln!("error: cannot write the log file: {error}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ledger::app::cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
