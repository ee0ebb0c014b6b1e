//! The ledger service: the I/O around the billing rules.
//!
//! The billing rules and the closing planner live in the `aggregates`
//! crate and the read models in `projections`; this crate holds, by room:
//!
//! - [`app`]: the running ledger — its assembly (`Application`), the CLI and
//!   the logs;
//! - [`postgres`]: which PostgreSQL is used (a URL or the embedded cluster),
//!   the pool and the migrations;
//! - [`event_log`]: the one door to the log — commands through cqrs-es,
//!   appends, positions, usage windows, the projection runner, seals and
//!   verification;
//! - [`access`]: API keys, the operator key and service administration;
//! - [`usage`]: recording usage (authentication, directory, group append)
//!   and current usage;
//! - [`invoicing`]: the period closer, replay and explain;
//! - [`import`]: imports from the systems the ledger takes over (the
//!   neutral format, the NexaCloud adapter);
//! - [`http`]: the Lago-compatible API and the operator API;
//! - [`tools`]: the demo, the benchmarks and progress bars.
#![forbid(unsafe_code)]

pub mod access;
pub mod app;
pub mod event_log;
pub mod http;
pub mod import;
pub mod invoicing;
pub mod payments;
pub mod postgres;
pub mod reconciliation;
pub mod tools;
pub mod usage;
pub mod webhooks;
