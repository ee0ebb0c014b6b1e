//! The read models of the ledger: each projection is a pure fold over the
//! event log in log order, plus the SQL that stores its result, plus a
//! checkpoint. Any projection can be thrown away and rebuilt from the log and
//! must come out the same.
//!
//! What lives here: the ordered log reader ([`log`]), the [`Projection`]
//! contract, and the projections themselves. What must not: HTTP, commands,
//! or any write to the event log — projections only read it.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

pub mod catalog;
pub mod imports;
pub mod invoices;
pub mod log;
pub mod projection;
pub mod reconciliation;
pub mod service_directory;
pub mod usage;
pub mod webhooks;

pub use catalog::Catalog;
pub use imports::Imports;
pub use invoices::Invoices;
pub use log::{LogEvent, LogPosition};
pub use projection::{Projection, ProjectionError};
pub use reconciliation::Reconciliation;
pub use service_directory::ServiceDirectory;
pub use usage::Usage;

/// Every projection the ledger maintains, in the order the runner serves them.
pub fn all() -> Vec<Box<dyn Projection>> {
    vec![
        Box::new(ServiceDirectory),
        Box::new(Catalog),
        Box::new(Usage),
        Box::new(Invoices),
        Box::new(Imports),
        Box::new(Reconciliation),
        Box::new(webhooks::Webhooks),
    ]
}
