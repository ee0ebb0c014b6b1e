//! Benchmarks: each measures the ledger beside a raw PostgreSQL reference
//! in the same run, on a throwaway embedded cluster.

pub mod close;
pub mod ingest;
pub mod rebuild;
