//! Projection `usage`: recorded usage events and, per subscription, metric
//! and billing period, the running aggregates Lago's aggregation types need.
//! Computed incrementally, one event at a time, in log order.

use aggregates::usage::{UsageEvent, USAGE_STREAM_TYPE};
use async_trait::async_trait;
use sqlx::PgConnection;

use crate::log::LogEvent;
use crate::projection::{Projection, ProjectionError};

/// The `usage` projection.
pub struct Usage;

#[async_trait]
impl Projection for Usage {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["usage_events", "usage_aggregates", "usage_unique_values"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != USAGE_STREAM_TYPE {
            return Ok(());
        }
        let UsageEvent::UsageRecorded(record) = serde_json::from_value(event.payload.clone())
            .map_err(|e| ProjectionError::unreadable(event, e))?;
        let metric = record.sent.code.as_deref().unwrap_or_default();
        sqlx::query(
            "INSERT INTO usage_events (service_code, subscription_lago_id, external_subscription_id, metric_code, \
             transaction_id, lago_id, customer_lago_id, \"timestamp\", value, unique_key, properties, period_start, \
             period_end, position, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&record.service)
        .bind(record.subscription_lago_id)
        .bind(record.sent.external_subscription_id.as_deref().unwrap_or_default())
        .bind(metric)
        .bind(record.sent.transaction_id.as_deref().unwrap_or_default())
        .bind(record.lago_id)
        .bind(record.customer_lago_id)
        .bind(record.timestamp)
        .bind(record.value)
        .bind(&record.unique_key)
        .bind(&record.sent.properties)
        .bind(record.period.start)
        .bind(record.period.end)
        .bind(event.position)
        .bind(event.recorded_at)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO usage_aggregates AS a (subscription_lago_id, metric_code, period_start, period_end, \
             events_count, value_sum, value_max, latest_value, latest_timestamp, latest_position) \
             VALUES ($1, $2, $3, $4, 1, $5, $5, $5, $6, $7) \
             ON CONFLICT (subscription_lago_id, metric_code, period_start) DO UPDATE SET \
               events_count = a.events_count + 1, \
               value_sum = CASE WHEN EXCLUDED.value_sum IS NULL THEN a.value_sum \
                                ELSE coalesce(a.value_sum, 0) + EXCLUDED.value_sum END, \
               value_max = GREATEST(a.value_max, EXCLUDED.value_max), \
               latest_value = CASE WHEN (EXCLUDED.latest_timestamp, EXCLUDED.latest_position) \
                                        > (a.latest_timestamp, a.latest_position) \
                                   THEN EXCLUDED.latest_value ELSE a.latest_value END, \
               latest_position = CASE WHEN (EXCLUDED.latest_timestamp, EXCLUDED.latest_position) \
                                        > (a.latest_timestamp, a.latest_position) \
                                   THEN EXCLUDED.latest_position ELSE a.latest_position END, \
               latest_timestamp = GREATEST(a.latest_timestamp, EXCLUDED.latest_timestamp)",
        )
        .bind(record.subscription_lago_id)
        .bind(metric)
        .bind(record.period.start)
        .bind(record.period.end)
        .bind(record.value)
        .bind(record.timestamp)
        .bind(event.position)
        .execute(&mut *conn)
        .await?;
        if let Some(key) = &record.unique_key {
            let new_value = sqlx::query(
                "INSERT INTO usage_unique_values (subscription_lago_id, metric_code, period_start, unique_key) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(record.subscription_lago_id)
            .bind(metric)
            .bind(record.period.start)
            .bind(key)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if new_value == 1 {
                sqlx::query(
                    "UPDATE usage_aggregates SET unique_count = unique_count + 1 \
                     WHERE subscription_lago_id = $1 AND metric_code = $2 AND period_start = $3",
                )
                .bind(record.subscription_lago_id)
                .bind(metric)
                .bind(record.period.start)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}
