//! The one error type of the HTTP API and its Lago-shaped JSON bodies.
//!
//! Domain refusals become 4xx naming the field; optimistic-concurrency
//! conflicts that survive their retries become 409; anything unexpected is
//! logged inside the request's span and answered with a generic 500 that
//! leaks nothing (no SQL, no internal message).

use std::collections::BTreeMap;

use aggregates::ServiceError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cqrs_es::AggregateError;
use serde_json::json;

/// `Result` with the API's error.
pub type ApiResult<T, E = ApiError> = Result<T, E>;

/// Every way a request can fail, each with its status and Lago's body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing root key, bad query parameters.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No key, or an unknown or revoked one (Lago's 401).
    #[error("unauthorized")]
    Unauthorized,
    /// `{resource}_not_found`.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Lago's 422: each field with its error codes.
    #[error("validation errors: {0:?}")]
    Validation(BTreeMap<String, Vec<String>>),
    /// Lago's 422 for a batch: each refused item's index with its fields.
    #[error("batch validation errors: {0:?}")]
    BatchValidation(BTreeMap<String, BTreeMap<String, Vec<String>>>),
    /// A state transition the resource's status does not allow (Lago's 405).
    #[error("invalid status")]
    InvalidStatus,
    /// Another writer changed the resource at the same moment, repeatedly.
    #[error("conflict")]
    Conflict,
    /// Anything the client did not cause: logged, answered with a generic 500.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl ApiError {
    /// A 422 for one field.
    pub fn invalid(field: &str, code: &str) -> Self {
        Self::Validation(BTreeMap::from([(
            field.to_string(),
            vec![code.to_string()],
        )]))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::BadRequest(reason) => (
                StatusCode::BAD_REQUEST,
                json!({"status": 400, "error": "Bad Request", "code": "bad_request",
                       "error_details": {"body": [reason]}}),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"status": 401, "error": "Unauthorized"}),
            ),
            ApiError::NotFound(resource) => (
                StatusCode::NOT_FOUND,
                json!({"status": 404, "error": "Not Found", "code": format!("{resource}_not_found")}),
            ),
            ApiError::Validation(details) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                       "error_details": details}),
            ),
            ApiError::BatchValidation(details) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                       "error_details": details}),
            ),
            ApiError::InvalidStatus => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"status": 405, "error": "Method Not Allowed", "code": "invalid_status"}),
            ),
            ApiError::Conflict => (
                StatusCode::CONFLICT,
                json!({"status": 409, "error": "Conflict", "code": "concurrent_modification"}),
            ),
            ApiError::Unexpected(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed unexpectedly");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"status": 500, "error": "Internal Server Error"}),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::Unexpected(anyhow::Error::new(error).context("database query failed"))
    }
}

/// How a domain refusal reads on the wire.
pub trait Refusal: std::error::Error + Send + Sync + 'static {
    /// The API error this refusal answers with.
    fn into_api_error(self) -> ApiError;
}

impl Refusal for ServiceError {
    fn into_api_error(self) -> ApiError {
        match self {
            ServiceError::NotRegistered => ApiError::NotFound("service"),
            ServiceError::UnknownApiKey => ApiError::NotFound("api_key"),
            ServiceError::AlreadyInStatus(_) | ServiceError::ApiKeyAlreadyRevoked => {
                ApiError::InvalidStatus
            }
            refusal => ApiError::invalid(refusal.field(), refusal.error_code()),
        }
    }
}

impl<E: Refusal> From<AggregateError<E>> for ApiError {
    fn from(error: AggregateError<E>) -> Self {
        match error {
            AggregateError::UserError(refusal) => refusal.into_api_error(),
            AggregateError::AggregateConflict => ApiError::Conflict,
            AggregateError::DatabaseConnectionError(e)
            | AggregateError::DeserializationError(e)
            | AggregateError::UnexpectedError(e) => {
                ApiError::Unexpected(anyhow::anyhow!(e).context("event store failed"))
            }
        }
    }
}

impl Refusal for aggregates::CatalogError {
    fn into_api_error(self) -> ApiError {
        match self {
            aggregates::CatalogError::Invalid(errors) => {
                ApiError::Validation(errors.fields().clone())
            }
            aggregates::CatalogError::NotFound(resource) => ApiError::NotFound(resource),
            aggregates::CatalogError::InvalidStatus(_) => ApiError::InvalidStatus,
        }
    }
}
