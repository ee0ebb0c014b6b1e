//! `/admin/v1/webhooks`: the operator's view of outgoing deliveries —
//! list (by status, endpoint, service), one with its attempts, redeliver
//! one, recover an endpoint's failures since a time. The CLI's
//! `ledger webhooks` does the same through [`crate::webhooks`].

use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::admin::Operator;
use super::error::{ApiError, ApiResult};
use super::extract::LagoJson;
use super::AppState;
use crate::webhooks::{self, DeliveryFilter, DELIVERY_STATUSES};

/// The routes under `/admin/v1`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks", get(list))
        .route("/webhooks/recover", post(recover))
        .route("/webhooks/{message_id}", get(show))
        .route("/webhooks/{message_id}/redeliver", post(redeliver))
}

async fn list(
    _: Operator,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let mut filter = DeliveryFilter {
        limit: 100,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "status" if DELIVERY_STATUSES.contains(&value.as_ref()) => {
                filter.status = Some(value.into_owned())
            }
            "status" => return Err(ApiError::invalid("status", "value_is_invalid")),
            "endpoint" => {
                filter.endpoint = Some(
                    value
                        .parse()
                        .map_err(|_| ApiError::invalid("endpoint", "value_is_invalid"))?,
                )
            }
            "service" => filter.service = Some(value.into_owned()),
            "limit" => {
                filter.limit = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| ApiError::invalid("limit", "value_is_invalid"))?
            }
            _ => {}
        }
    }
    let deliveries = webhooks::list(&state.pool, &filter).await?;
    Ok(Json(json!({ "webhooks": deliveries })))
}

fn message_id(text: &str) -> ApiResult<Uuid> {
    text.parse().map_err(|_| ApiError::NotFound("webhook"))
}

async fn show(
    _: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let delivery = webhooks::show(&state.pool, message_id(&id)?)
        .await?
        .ok_or(ApiError::NotFound("webhook"))?;
    Ok(Json(json!({ "webhook": delivery })))
}

async fn redeliver(
    _: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = message_id(&id)?;
    if !webhooks::redeliver(&state.pool, id, Utc::now()).await? {
        return Err(ApiError::NotFound("webhook"));
    }
    show(Operator, State(state), Path(id.to_string())).await
}

#[derive(Deserialize)]
struct RecoverBody {
    endpoint: Option<String>,
    since: Option<String>,
}

async fn recover(
    _: Operator,
    State(state): State<AppState>,
    LagoJson(body): LagoJson<RecoverBody>,
) -> ApiResult<Json<Value>> {
    let endpoint: Uuid = body
        .endpoint
        .as_deref()
        .ok_or_else(|| ApiError::invalid("endpoint", "value_is_mandatory"))?
        .parse()
        .map_err(|_| ApiError::invalid("endpoint", "value_is_invalid"))?;
    let since: DateTime<Utc> = body
        .since
        .as_deref()
        .ok_or_else(|| ApiError::invalid("since", "value_is_mandatory"))?
        .parse()
        .map_err(|_| ApiError::invalid("since", "invalid_date"))?;
    let queued = webhooks::recover(&state.pool, endpoint, since, Utc::now()).await?;
    Ok(Json(json!({ "queued": queued })))
}
