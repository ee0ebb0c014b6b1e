//! Webhooks out: the outbox the `webhooks` projection folds from the log
//! (`projections::webhooks`), its delivery ([`dispatcher`]), signatures
//! ([`signing`]), the SSRF guard ([`address`]), and what operators do with
//! deliveries: list them, redeliver one, recover an endpoint's failures.

pub mod address;
pub mod dispatcher;
pub mod signing;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

/// Which deliveries to list.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// `pending`, `delivered` or `failed`.
    pub status: Option<String>,
    /// One endpoint.
    pub endpoint: Option<Uuid>,
    /// One service.
    pub service: Option<String>,
    /// At most this many, newest first.
    pub limit: i64,
}

/// The delivery statuses.
pub const DELIVERY_STATUSES: [&str; 3] = ["pending", "delivered", "failed"];

const DELIVERY_JSON: &str = "jsonb_build_object('message_id', d.message_id, \
    'service', d.service_code, 'endpoint_lago_id', d.endpoint_lago_id, \
    'webhook_type', m.webhook_type, 'status', d.status, 'attempts', d.attempts, \
    'next_attempt_at', CASE WHEN d.status = 'pending' THEN d.next_attempt_at END, \
    'last_error', d.last_error, 'delivered_at', d.delivered_at, \
    'created_at', coalesce(m.created_at, d.enqueued_at), 'log_position', m.position)";

/// Deliveries matching `filter`, newest first.
pub async fn list(pool: &PgPool, filter: &DeliveryFilter) -> Result<Vec<Value>, sqlx::Error> {
    let mut sql: QueryBuilder<'_, Postgres> = QueryBuilder::new(format!(
        "SELECT {DELIVERY_JSON} FROM webhook_deliveries d \
         LEFT JOIN webhook_messages m ON m.id = d.message_id WHERE true"
    ));
    if let Some(status) = &filter.status {
        sql.push(" AND d.status = ").push_bind(status.clone());
    }
    if let Some(endpoint) = filter.endpoint {
        sql.push(" AND d.endpoint_lago_id = ").push_bind(endpoint);
    }
    if let Some(service) = &filter.service {
        sql.push(" AND d.service_code = ")
            .push_bind(service.clone());
    }
    sql.push(" ORDER BY d.enqueued_at DESC, d.message_id LIMIT ")
        .push_bind(filter.limit);
    sql.build_query_scalar().fetch_all(pool).await
}

/// One delivery with its body and every attempt.
pub async fn show(pool: &PgPool, message_id: Uuid) -> Result<Option<Value>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT {DELIVERY_JSON} || jsonb_build_object('body', m.body, 'attempts_made', \
           coalesce((SELECT jsonb_agg(jsonb_build_object('attempt', a.attempt, \
              'attempted_at', a.attempted_at, 'status_code', a.status_code, \
              'latency_ms', a.latency_ms, 'error', a.error, 'response_excerpt', a.response_excerpt) \
              ORDER BY a.attempt) FROM webhook_attempts a WHERE a.message_id = d.message_id), '[]')) \
         FROM webhook_deliveries d LEFT JOIN webhook_messages m ON m.id = d.message_id \
         WHERE d.message_id = $1"
    ))
    .bind(message_id)
    .fetch_optional(pool)
    .await
}

/// Queue one message again at `now` (whatever its status), with a fresh
/// round of the retry schedule. False when there is no such delivery.
pub async fn redeliver(
    pool: &PgPool,
    message_id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $2, \
         claimed_until = NULL, round_start = attempts, updated_at = $2 WHERE message_id = $1",
    )
    .bind(message_id)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Queue again every failed message of `endpoint` created since `since`.
/// Returns how many.
pub async fn recover(
    pool: &PgPool,
    endpoint: Uuid,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE webhook_deliveries d SET status = 'pending', next_attempt_at = $3, \
         claimed_until = NULL, round_start = attempts, updated_at = $3 \
         FROM webhook_messages m WHERE m.id = d.message_id AND d.endpoint_lago_id = $1 \
           AND d.status = 'failed' AND m.created_at >= $2",
    )
    .bind(endpoint)
    .bind(since)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected())
}
