//! Developer tools: the demo and the benchmarks. Nothing here is on the
//! serving path.

pub mod bench;
pub mod demo;
