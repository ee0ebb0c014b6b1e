//! Extractors whose rejections use the API's error body.

use std::net::SocketAddr;

use aggregates::refusal::codes;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use crate::event_log::store::{Actor, CommandMetadata};

/// JSON body. Not JSON (`Content-Type`) is a 415, beyond the body limit a
/// 413, malformed JSON or a missing root key a 400 with the reason, and a
/// NUL character in any string or key a 422 naming its path (PostgreSQL's
/// text cannot hold one, and nothing a client means contains one).
pub struct LagoJson<T>(pub T);

impl<S, T> FromRequest<S> for LagoJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| match rejection {
                BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
                    ApiError::PayloadTooLarge
                }
                other => ApiError::BadRequest(other.body_text()),
            })?;
        let malformed = |error: serde_json::Error| {
            ApiError::BadRequest(format!("Failed to parse the request body as JSON: {error}"))
        };
        // A NUL can only arrive escaped: look for the escape before paying
        // for a walk over the whole document.
        if memchr::memmem::find(&body, b"\\u0000").is_some() {
            let value: Value = serde_json::from_slice(&body).map_err(malformed)?;
            if let Some(path) = aggregates::wire::nul_in(&value, "") {
                return Err(nul_refusal(&path));
            }
            return serde_json::from_value(value)
                .map(LagoJson)
                .map_err(malformed);
        }
        serde_json::from_slice(&body)
            .map(LagoJson)
            .map_err(malformed)
    }
}

/// The 422 for a NUL at `path`, named as the resource's other errors are:
/// below the body's root key (`event.properties.region` →
/// `properties.region`), by index for a batch (`events[1].code` → `1`:
/// `code`), the root key itself when the NUL is in it.
fn nul_refusal(path: &str) -> ApiError {
    let below_root = path.find(['.', '[']).map(|at| &path[at..]);
    match below_root {
        Some(rest) if rest.starts_with('[') => {
            let (index, field) = rest[1..].split_once("].").unwrap_or((rest, ""));
            ApiError::BatchValidation(std::collections::BTreeMap::from([(
                index.to_string(),
                std::collections::BTreeMap::from([(
                    field.to_string(),
                    vec![codes::INVALID.to_string()],
                )]),
            )]))
        }
        Some(rest) => ApiError::invalid(&rest[1..], codes::INVALID),
        None => ApiError::invalid(path, codes::INVALID),
    }
}

/// `application/json`, or any `application/…+json`, parameters aside.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Refuse a NUL in the path or the query string (percent-encoded `%00`)
/// with a 400 naming `path` or the parameter, before any handler runs.
pub async fn refuse_nul(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let encoded_nul = |text: &str| memchr::memmem::find(text.as_bytes(), b"%00").is_some();
    if encoded_nul(uri.path()) {
        return bad_parameter("path".into());
    }
    if let Some(query) = uri.query() {
        let refused = form_urlencoded::parse(query.as_bytes())
            .find(|(key, value)| key.contains('\0') || value.contains('\0'));
        if let Some((key, _)) = refused {
            return bad_parameter(key.replace('\0', "\\u0000"));
        }
    }
    next.run(request).await
}

fn bad_parameter(field: String) -> Response {
    ApiError::BadParameter {
        field,
        code: codes::INVALID,
    }
    .into_response()
}

/// Query string; a malformed one is a 400 with the reason.
pub struct LagoQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for LagoQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| LagoQuery(value))
            .map_err(|rejection: QueryRejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// Who sent the request and which request it is, for event metadata.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request's id (the client's `x-request-id`, or generated).
    pub request_id: String,
    /// The client's address.
    pub client_ip: Option<String>,
}

impl RequestContext {
    /// The metadata of a command `actor` issues in this request.
    pub fn metadata(&self, actor: Actor) -> CommandMetadata {
        CommandMetadata {
            actor,
            request_id: self.request_id.clone(),
            recorded_at: Utc::now(),
            client_ip: self.client_ip.clone(),
            api_key_id: None,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .headers
            .get(super::REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let client_ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string());
        Ok(Self {
            request_id,
            client_ip,
        })
    }
}
