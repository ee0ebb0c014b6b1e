//! Developer and operator tools: the demo, the benchmarks, progress bars.
//! Nothing here is on the serving path.

pub mod bench;
pub mod demo;
pub mod progress;
