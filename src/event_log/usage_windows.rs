//! Reading the usage of billing windows *as of a log position*: the one
//! reader the closer, the draft view, replay and explain share.
//!
//! A window is half-open, `[start, end)`, by the usage's business
//! timestamp; "as of" keeps the events at or before the position in log
//! order `(transaction_id, position)`, so a usage event recorded after an
//! invoice was computed is never in it, however early its timestamp. The
//! read is index-only on `events_usage_by_time`.

use std::collections::HashMap;

use aggregates::billing::LogPosition;
use aggregates::closing::LoggedPoint;
use aggregates::period::BillingPeriod;
use aggregates::usage::UsagePoint;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct PointRow {
    subscription_lago_id: Uuid,
    metric_code: String,
    timestamp: DateTime<Utc>,
    position: i64,
    log_transaction_id: i64,
    value: Option<Decimal>,
    unique_key: Option<String>,
}

/// The usage events of each (subscription, window), up to `as_of`, by
/// subscription (an event in two overlapping windows comes once).
pub async fn usage_as_of(
    conn: &mut PgConnection,
    windows: &[(Uuid, BillingPeriod)],
    as_of: LogPosition,
) -> Result<HashMap<Uuid, Vec<LoggedPoint>>, sqlx::Error> {
    let mut points: HashMap<Uuid, Vec<LoggedPoint>> = HashMap::new();
    if windows.is_empty() {
        return Ok(points);
    }
    let rows: Vec<PointRow> = sqlx::query_as(
        "SELECT DISTINCT u.usage_subscription AS subscription_lago_id, u.usage_metric AS metric_code, \
                u.usage_timestamp AS \"timestamp\", u.position, \
                u.transaction_id::text::bigint AS log_transaction_id, u.usage_value AS value, \
                u.usage_unique_key AS unique_key \
         FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(subscription, start_at, end_at) \
         JOIN events u ON u.usage_subscription = w.subscription \
          AND u.usage_timestamp >= w.start_at AND u.usage_timestamp < w.end_at \
         WHERE (u.transaction_id, u.position) <= ($4::text::xid8, $5)",
    )
    .bind(windows.iter().map(|(s, _)| *s).collect::<Vec<_>>())
    .bind(windows.iter().map(|(_, w)| w.start).collect::<Vec<_>>())
    .bind(windows.iter().map(|(_, w)| w.end).collect::<Vec<_>>())
    .bind(as_of.transaction_id.to_string())
    .bind(as_of.position)
    .fetch_all(conn)
    .await?;
    for row in rows {
        points
            .entry(row.subscription_lago_id)
            .or_default()
            .push(LoggedPoint {
                metric_code: row.metric_code,
                as_of: LogPosition::from((row.log_transaction_id, row.position)),
                point: UsagePoint {
                    timestamp: row.timestamp,
                    position: row.position,
                    value: row.value,
                    unique_key: row.unique_key,
                },
            });
    }
    Ok(points)
}
