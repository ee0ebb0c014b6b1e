//! The refusals every catalog aggregate shares, in Lago's vocabulary: a map
//! of field → error codes (422), a missing resource (404), or a transition
//! the current status does not allow (405).

use std::collections::BTreeMap;
use std::fmt;

/// Field paths with their Lago error codes, e.g. `interval: [value_is_invalid]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldErrors(BTreeMap<String, Vec<String>>);

impl FieldErrors {
    /// Record one error on one field.
    pub fn add(&mut self, field: impl Into<String>, code: &str) {
        let codes = self.0.entry(field.into()).or_default();
        if !codes.iter().any(|c| c == code) {
            codes.push(code.to_string());
        }
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing was recorded, else the refusal.
    pub fn into_result(self) -> Result<(), CatalogError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(CatalogError::Invalid(self))
        }
    }

    /// The errors by field.
    pub fn fields(&self) -> &BTreeMap<String, Vec<String>> {
        &self.0
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(field, codes)| format!("{field}: {}", codes.join(", ")))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Why a catalog command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// One or more fields are invalid (422 `validation_errors`).
    #[error("{0}")]
    Invalid(FieldErrors),
    /// A resource the command names does not exist (404 `<resource>_not_found`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The resource's status does not allow this (405 `invalid_status`).
    #[error("invalid status: {0}")]
    InvalidStatus(&'static str),
}

impl CatalogError {
    /// A 422 on one field.
    pub fn invalid(field: impl Into<String>, code: &str) -> Self {
        let mut errors = FieldErrors::default();
        errors.add(field, code);
        CatalogError::Invalid(errors)
    }
}

/// Lago's error codes, named once.
pub mod codes {
    /// A required value is missing.
    pub const MANDATORY: &str = "value_is_mandatory";
    /// A value is not one of the accepted ones or has the wrong form.
    pub const INVALID: &str = "value_is_invalid";
    /// The identifier is taken.
    pub const ALREADY_EXISTS: &str = "value_already_exist";
    /// A price is not a non-negative decimal string.
    pub const INVALID_AMOUNT: &str = "invalid_amount";
    /// A number beyond the bounds a bill can hold
    /// ([`crate::wire::MAX_MAGNITUDE`]).
    pub const OUT_OF_RANGE: &str = "value_is_out_of_range";
}
