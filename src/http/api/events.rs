//! `/events`: record usage (one, or a batch of up to 100, all or nothing)
//! and read a recorded event back.

use std::collections::BTreeMap;

use aggregates::usage::SentUsage;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{PresentedKey, Tenant};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::AppState;
use crate::usage::{event_json, record_batch, IngestError, Recorded};

/// The most events a batch may hold.
pub const MAX_BATCH: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/events", post(create))
        .route("/events/batch", post(create_batch))
        .route("/events/{transaction_id}", get(find))
}

#[derive(Deserialize)]
struct EventBody {
    event: SentUsage,
}

#[derive(Deserialize)]
struct BatchBody {
    events: Vec<SentUsage>,
}

/// Authentication happens with the subscription lookup, in one round trip.
async fn record(
    state: &AppState,
    key: &PresentedKey,
    request: &RequestContext,
    events: Vec<SentUsage>,
) -> Result<Vec<Recorded>, IngestError> {
    // The actor is filled in once the key is known.
    let metadata = request.metadata(crate::event_store::Actor::Operator);
    record_batch(
        &state.pool,
        &key.0,
        events,
        metadata,
        state.usage_limits,
        Utc::now(),
    )
    .await
}

async fn create(
    key: PresentedKey,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<EventBody>,
) -> ApiResult<Json<Value>> {
    match record(&state, &key, &request, vec![body.event]).await {
        Ok(recorded) => {
            let event = &recorded[0];
            Ok(Json(
                json!({ "event": event_json(&event.record, event.recorded_at) }),
            ))
        }
        Err(IngestError::Invalid(mut errors)) => {
            let errors = errors.remove(&0).unwrap_or_default();
            Err(ApiError::Validation(errors.fields().clone()))
        }
        Err(IngestError::Unauthorized) => Err(ApiError::Unauthorized),
        Err(IngestError::Database(error)) => Err(error.into()),
    }
}

async fn create_batch(
    key: PresentedKey,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<BatchBody>,
) -> ApiResult<Json<Value>> {
    if body.events.is_empty() {
        return Err(ApiError::invalid("events", "no_events"));
    }
    if body.events.len() > MAX_BATCH {
        return Err(ApiError::invalid("events", "too_many_events"));
    }
    match record(&state, &key, &request, body.events).await {
        Ok(recorded) => {
            let events: Vec<Value> = recorded
                .iter()
                .map(|e| event_json(&e.record, e.recorded_at))
                .collect();
            Ok(Json(json!({ "events": events })))
        }
        Err(IngestError::Invalid(errors)) => Err(ApiError::BatchValidation(
            errors
                .into_iter()
                .map(|(index, errors)| (index.to_string(), errors.fields().clone()))
                .collect::<BTreeMap<_, _>>(),
        )),
        Err(IngestError::Unauthorized) => Err(ApiError::Unauthorized),
        Err(IngestError::Database(error)) => Err(error.into()),
    }
}

#[derive(Deserialize)]
struct FindQuery {
    external_subscription_id: Option<String>,
    code: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    lago_id: Uuid,
    transaction_id: String,
    customer_lago_id: Uuid,
    metric_code: String,
    timestamp: DateTime<Utc>,
    properties: Value,
    subscription_lago_id: Uuid,
    external_subscription_id: String,
    recorded_at: DateTime<Utc>,
}

/// Transaction ids are unique per subscription and metric, so the
/// subscription is required; `code` picks the metric when the same
/// transaction id was used for several.
async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(transaction_id): Path<String>,
    LagoQuery(query): LagoQuery<FindQuery>,
) -> ApiResult<Json<Value>> {
    let Some(subscription) = query.external_subscription_id.filter(|s| !s.is_empty()) else {
        return Err(ApiError::invalid(
            "external_subscription_id",
            "value_is_mandatory",
        ));
    };
    let row: Option<EventRow> = sqlx::query_as(
        "SELECT lago_id, transaction_id, customer_lago_id, metric_code, \"timestamp\", properties, \
                subscription_lago_id, external_subscription_id, recorded_at \
         FROM usage_events WHERE service_code = $1 AND external_subscription_id = $2 AND transaction_id = $3 \
           AND ($4::text IS NULL OR metric_code = $4) \
         ORDER BY position LIMIT 1",
    )
    .bind(&tenant.service)
    .bind(&subscription)
    .bind(&transaction_id)
    .bind(query.code)
    .fetch_optional(&state.pool)
    .await?;
    let row = row.ok_or(ApiError::NotFound("event"))?;
    Ok(Json(json!({ "event": {
        "lago_id": row.lago_id,
        "transaction_id": row.transaction_id,
        "lago_customer_id": row.customer_lago_id,
        "code": row.metric_code,
        "timestamp": row.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "properties": row.properties,
        "lago_subscription_id": row.subscription_lago_id,
        "external_subscription_id": row.external_subscription_id,
        "created_at": projections::catalog::timestamp(row.recorded_at),
    }})))
}
