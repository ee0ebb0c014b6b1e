//! Who may do what: API keys and the operator key (stored as digests),
//! service administration, and the one lookup from a presented key to its
//! service.

pub mod keys;
pub mod services;
