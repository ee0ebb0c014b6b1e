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

use crate::postgres as database;

/// `Result` with the API's error.
pub type ApiResult<T, E = ApiError> = Result<T, E>;

/// Every way a request can fail, each with its status and Lago's body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing root key, bad query parameters.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A path segment or query parameter that cannot be a value (a NUL).
    #[error("bad parameter {field}: {code}")]
    BadParameter {
        /// `path`, or the query parameter's name.
        field: String,
        /// Why.
        code: &'static str,
    },
    /// The body is larger than the API accepts.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The body is not JSON (`Content-Type` must be `application/json`).
    #[error("unsupported media type")]
    UnsupportedMediaType,
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
    /// The subscription's usage or amounts are beyond what a bill can hold
    /// (values in the log from before the bounds at the door): it is
    /// quarantined, and the reason is shown.
    #[error("unbillable: {reason}")]
    Unbillable {
        /// The field naming the subscription.
        field: &'static str,
        /// What overflowed.
        reason: String,
    },
    /// Another writer changed the resource at the same moment, repeatedly.
    #[error("conflict")]
    Conflict,
    /// The database cannot be reached right now: retry (503, `Retry-After`).
    #[error("database unavailable")]
    Unavailable,
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
            ApiError::BadParameter { field, code } => (
                StatusCode::BAD_REQUEST,
                json!({"status": 400, "error": "Bad Request", "code": "bad_request",
                       "error_details": {field.as_str(): [code]}}),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"status": 413, "error": "Payload Too Large", "code": "payload_too_large",
                       "error_details": {"body": ["larger_than_2_mib"]}}),
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"status": 415, "error": "Unsupported Media Type", "code": "unsupported_media_type",
                       "error_details": {"content_type": ["expected_application_json"]}}),
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
            ApiError::Unbillable { field, reason } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"status": 422, "error": "Unprocessable Entity", "code": "subscription_quarantined",
                       "error_details": {*field: ["subscription_quarantined"]}, "reason": reason}),
            ),
            ApiError::Conflict => (
                StatusCode::CONFLICT,
                json!({"status": 409, "error": "Conflict", "code": "concurrent_modification"}),
            ),
            ApiError::Unavailable => return unavailable(),
            ApiError::Unexpected(error) if database::caused_by_unavailable(error) => {
                tracing::warn!(error = format!("{error:#}"), "database unavailable");
                return unavailable();
            }
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

/// How long a client is told to wait before retrying during an outage.
const RETRY_AFTER_SECONDS: &str = "1";

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECONDS)],
        Json(
            json!({"status": 503, "error": "Service Unavailable", "code": "database_unavailable"}),
        ),
    )
        .into_response()
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if database::is_unavailable(&error) {
            tracing::warn!(%error, "database unavailable");
            return ApiError::Unavailable;
        }
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
            AggregateError::DatabaseConnectionError(e) => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable
            }
            AggregateError::UnexpectedError(e)
                if e.downcast_ref::<sqlx::Error>()
                    .is_some_and(database::is_unavailable) =>
            {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable
            }
            AggregateError::DeserializationError(e) | AggregateError::UnexpectedError(e) => {
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
