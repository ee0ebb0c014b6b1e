//! Invoices: the period closer (load → plan → write; the plan itself is
//! `aggregates::closing`), replaying a period from the log, and explaining
//! an invoice.

pub mod closer;
pub mod explain;
pub mod quarantine;
pub mod replay;
