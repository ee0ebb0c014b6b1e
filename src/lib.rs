//! The ledger service: configuration and CLI, the HTTP API, the event-store
//! wiring, the projection runner and the embedded default database.
//!
//! The billing rules live in the `aggregates` crate and the read models in
//! `projections`; this crate is the I/O around them.
#![forbid(unsafe_code)]

pub mod audit;
pub mod bench;
pub mod bench_close;
pub mod bench_rebuild;
pub mod cli;
pub mod database;
pub mod demo;
pub mod embedded;
pub mod event_store;
pub mod explain;
pub mod http;
pub mod invoicing;
pub mod keys;
pub mod projection_runner;
pub mod replay;
pub mod service_admin;
pub mod startup;
pub mod telemetry;
pub mod usage;
