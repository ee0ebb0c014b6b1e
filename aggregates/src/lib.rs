//! The write model of the ledger: cqrs-es aggregates, their commands, events
//! and refusals, and (as the billing issues land) the pure billing math.
//!
//! Nothing here does I/O or knows about SQL or HTTP: every function takes
//! values and returns values, so the live path and every replay compute the
//! same thing.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

pub mod service;

pub use service::{Service, ServiceCommand, ServiceError, ServiceEvent};
