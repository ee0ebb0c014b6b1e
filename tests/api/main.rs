//! Integration tests: one binary, each test against its own fresh database
//! (`#[sqlx::test]` creates it from DATABASE_URL, applies the migrations and
//! drops it afterwards) and, for HTTP, the real application on a real socket.

mod admin_services;
mod catalog;
mod embedded_cluster;
mod event_log;
mod explain;
mod faults;
mod helpers;
mod hostile;
mod imports;
mod invoicing;
mod log_ordering;
mod logging;
mod metrics;
mod payments;
mod progress;
mod projection_runner;
mod rebuild;
mod reconciliation;
mod replay;
mod tamper_evidence;
mod tenancy;
mod usage;
mod webhooks;
