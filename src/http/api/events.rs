//! `/events`: record usage (one, or a batch of up to 100, all or nothing)
//! and read a recorded event back.

use std::collections::BTreeMap;

use aggregates::usage::{usage_stream_id, SentUsage, UsageEvent, UsageRecord, USAGE_STREAM_TYPE};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{PresentedKey, Tenant};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::AppState;
use crate::usage::{IngestError, Recorded};

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

/// The answer to a post: serialized straight from the records.
#[derive(Serialize)]
struct OneEvent<'a> {
    event: EventView<'a>,
}

#[derive(Serialize)]
struct Events<'a> {
    events: Vec<EventView<'a>>,
}

/// Authentication happens with the subscription lookup, in one round trip.
async fn record(
    state: &AppState,
    key: &PresentedKey,
    request: &RequestContext,
    events: Vec<SentUsage>,
) -> Result<Vec<Recorded>, IngestError> {
    // The actor is filled in once the key is known.
    let metadata = request.metadata(crate::event_log::store::Actor::Operator);
    let recorded = state
        .usage_ingest
        .record_batch(&key.0, events, metadata, state.usage_limits, Utc::now())
        .await;
    if recorded.is_ok() {
        state.usage_appended.notify_one();
    }
    recorded
}

async fn create(
    key: PresentedKey,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<EventBody>,
) -> ApiResult<Response> {
    match record(&state, &key, &request, vec![body.event]).await {
        Ok(recorded) => {
            let event = &recorded[0];
            Ok(Json(OneEvent {
                event: EventView::new(&event.record, event.recorded_at),
            })
            .into_response())
        }
        Err(IngestError::Invalid(mut errors)) => {
            let errors = errors.remove(&0).unwrap_or_default();
            Err(ApiError::Validation(errors.fields().clone()))
        }
        Err(IngestError::Unauthorized) => Err(ApiError::Unauthorized),
        Err(failure) => Err(ingest_failure(failure)),
    }
}

async fn create_batch(
    key: PresentedKey,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<BatchBody>,
) -> ApiResult<Response> {
    if body.events.is_empty() {
        return Err(ApiError::invalid("events", "no_events"));
    }
    if body.events.len() > MAX_BATCH {
        return Err(ApiError::invalid("events", "too_many_events"));
    }
    match record(&state, &key, &request, body.events).await {
        Ok(recorded) => {
            let events = recorded
                .iter()
                .map(|e| EventView::new(&e.record, e.recorded_at))
                .collect();
            Ok(Json(Events { events }).into_response())
        }
        Err(IngestError::Invalid(errors)) => Err(ApiError::BatchValidation(
            errors
                .into_iter()
                .map(|(index, errors)| (index.to_string(), errors.fields().clone()))
                .collect::<BTreeMap<_, _>>(),
        )),
        Err(IngestError::Unauthorized) => Err(ApiError::Unauthorized),
        Err(failure) => Err(ingest_failure(failure)),
    }
}

#[derive(Deserialize)]
struct FindQuery {
    external_subscription_id: Option<String>,
    code: Option<String>,
}

/// Transaction ids are unique per subscription and metric, so the
/// subscription is required; `code` picks the metric when the same
/// transaction id was used for several.
async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(transaction_id): Path<String>,
    LagoQuery(query): LagoQuery<FindQuery>,
) -> ApiResult<Response> {
    let Some(subscription) = query.external_subscription_id.filter(|s| !s.is_empty()) else {
        return Err(ApiError::invalid(
            "external_subscription_id",
            "value_is_mandatory",
        ));
    };
    // The event's stream is derived from (subscription, metric, transaction
    // id): one primary-key probe per metric of the service (or the one named).
    let subscription: Option<(Uuid, Vec<String>)> = sqlx::query_as(
        "SELECT s.lago_id, array(SELECT m.code FROM billable_metrics m \
                                 WHERE m.service_code = s.service_code ORDER BY m.code) \
         FROM subscriptions s WHERE s.service_code = $1 AND s.external_id = $2",
    )
    .bind(&tenant.service)
    .bind(&subscription)
    .fetch_optional(&state.pool)
    .await?;
    let Some((subscription_lago_id, metric_codes)) = subscription else {
        return Err(ApiError::NotFound("event"));
    };
    let streams: Vec<String> = match query.code {
        Some(code) => vec![usage_stream_id(
            subscription_lago_id,
            &code,
            &transaction_id,
        )],
        None => metric_codes
            .iter()
            .map(|code| usage_stream_id(subscription_lago_id, code, &transaction_id))
            .collect(),
    };
    let found: Option<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT payload::text, recorded_at FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND sequence = 1 \
         ORDER BY position LIMIT 1",
    )
    .bind(USAGE_STREAM_TYPE)
    .bind(&streams)
    .fetch_optional(&state.pool)
    .await?;
    let (payload, recorded_at) = found.ok_or(ApiError::NotFound("event"))?;
    let UsageEvent::UsageRecorded(record) = serde_json::from_str(&payload).map_err(|e| {
        ApiError::Unexpected(anyhow::Error::new(e).context("unreadable usage event"))
    })?;
    Ok(Json(OneEvent {
        event: EventView::new(&record, recorded_at),
    })
    .into_response())
}

/// Lago's event object, serialized straight from the record.
#[derive(Serialize)]
pub struct EventView<'a> {
    lago_id: Uuid,
    transaction_id: &'a Option<String>,
    lago_customer_id: Uuid,
    code: &'a Option<String>,
    timestamp: String,
    properties: &'a Value,
    lago_subscription_id: Uuid,
    external_subscription_id: &'a Option<String>,
    created_at: String,
}

impl<'a> EventView<'a> {
    /// The view of `record`, recorded at `recorded_at`.
    pub fn new(record: &'a UsageRecord, recorded_at: DateTime<Utc>) -> Self {
        Self {
            lago_id: record.lago_id,
            transaction_id: &record.sent.transaction_id,
            lago_customer_id: record.customer_lago_id,
            code: &record.sent.code,
            timestamp: record
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            properties: &record.sent.properties,
            lago_subscription_id: record.subscription_lago_id,
            external_subscription_id: &record.sent.external_subscription_id,
            created_at: projections::catalog::timestamp(recorded_at),
        }
    }
}

/// A failure to record usage that is not the caller's to fix.
pub(super) fn ingest_failure(failure: IngestError) -> ApiError {
    match failure {
        IngestError::Unauthorized => ApiError::Unauthorized,
        IngestError::Database(error) => error.into(),
        other => ApiError::Unexpected(anyhow::Error::new(other)),
    }
}
