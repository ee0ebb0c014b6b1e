//! The one door to the event log: commands committed through cqrs-es
//! ([`store`]), the projection runner that reads the log in order
//! ([`projection_runner`]), and the tamper evidence over it ([`tamper`]).
//! Usage, being high-volume, is appended by [`crate::usage`] into the same
//! table.

pub mod append;
pub mod projection_runner;
pub mod store;
pub mod tamper;
pub mod usage_windows;
