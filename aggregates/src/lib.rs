//! The write model of the ledger: cqrs-es aggregates, their commands, events
//! and refusals, and the pure billing math (periods, charge models,
//! proration, rounding, tax) and the period closer's planner ([`closing`]).
//!
//! Nothing here does I/O or knows about SQL or HTTP: every function takes
//! values and returns values, so the live path and every replay compute the
//! same thing. Commands carry what a client sent (raw) plus what the caller
//! looked up; every validation rule lives here.
//!
//! Catalog aggregates are scoped by service: their ids are
//! [`scoped_id`]`(service, key)`, so one service cannot name another's.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

pub mod billable_metric;
pub mod billing;
pub mod charge;
pub mod closing;
pub mod customer;
#[cfg(test)]
mod fixtures;
pub mod import;
pub mod invoice;
pub mod period;
pub mod plan;
pub mod pricing;
pub mod reconciliation;
pub mod refusal;
pub mod service;
pub mod subscription;
pub mod tax;
pub mod usage;
pub mod webhook_endpoint;
pub mod wire;

pub use billable_metric::BillableMetric;
pub use customer::Customer;
pub use plan::Plan;
pub use refusal::{CatalogError, FieldErrors};
pub use service::{Service, ServiceCommand, ServiceError, ServiceEvent};
pub use subscription::Subscription;
pub use tax::Tax;
pub use webhook_endpoint::WebhookEndpoint;

/// The aggregate id of a service's resource: `{service}/{key}`. Service codes
/// hold no `/`, so the id is unambiguous.
pub fn scoped_id(service: &str, key: &str) -> String {
    format!("{service}/{key}")
}
