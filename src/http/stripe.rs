//! `POST /webhooks/stripe`: Stripe's events, verified over the raw body
//! before anything in it is read (400 and nothing recorded otherwise); then
//! each event id is recorded once, with the payment fact it carries
//! (see [`crate::payments::stripe`]). Unknown invoices and event types are
//! recorded as unmatched and answered 200, so Stripe stops retrying them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::payments::stripe;

/// The route Stripe posts to.
pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/stripe", post(receive))
}

async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Value>> {
    let body = body.map_err(|rejection| match rejection.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest(rejection.body_text()),
    })?;
    let signature = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok());
    stripe::verify(&state.stripe, signature, &body, Utc::now()).map_err(|refusal| {
        ApiError::BadParameter {
            field: "Stripe-Signature".into(),
            code: refusal.code(),
        }
    })?;
    let event: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    let outcome = stripe::receive(&state.pool, &event).await?;
    Ok(Json(json!({"received": true, "outcome": outcome})))
}
