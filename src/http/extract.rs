//! Extractors whose rejections use the API's error body.

use std::net::SocketAddr;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use chrono::Utc;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::event_log::store::{Actor, CommandMetadata};

/// JSON body; malformed JSON or a missing root key is a 400 with the reason.
pub struct LagoJson<T>(pub T);

impl<S, T> FromRequest<S> for LagoJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(value)| LagoJson(value))
            .map_err(|rejection: JsonRejection| ApiError::BadRequest(rejection.body_text()))
    }
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
