//! Quarantined subscriptions: those billing cannot price — an invoice the
//! period closer could not compute or was refused (recorded by the closer
//! in `billing_quarantine`), or an open period whose usage no bill can hold
//! (marked by the `usage` projection). Every other subscription is billed
//! as usual; these wait for an operator. `/ready`, `ledger projections
//! status` and `GET /admin/v1/quarantine` show them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// One quarantined subscription, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct QuarantinedSubscription {
    /// The service it belongs to.
    pub service: String,
    /// Its id.
    pub subscription_lago_id: Uuid,
    /// The service's id for it.
    pub external_subscription_id: String,
    /// Who found it: `closer` or `usage` (the projection).
    pub found_by: String,
    /// What cannot be billed.
    pub reason: String,
    /// When it was first found (the closer's entries; `None` for usage).
    pub since: Option<DateTime<Utc>>,
}

/// Every quarantined subscription, by service: the closer's entries, and
/// for usage the latest period no bill can hold.
pub async fn quarantined(pool: &PgPool) -> Result<Vec<QuarantinedSubscription>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM ( \
           SELECT service_code AS service, subscription_lago_id, external_subscription_id, \
                  'closer' AS found_by, reason, first_seen_at AS since \
           FROM billing_quarantine \
           UNION ALL \
           (SELECT DISTINCT ON (s.lago_id) s.service_code, s.lago_id, s.external_id, 'usage', \
                  'the usage of ' || a.metric_code || ' from ' || \
                  to_char(a.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') || \
                  ' is beyond what a bill can hold', NULL::timestamptz \
           FROM usage_aggregates a JOIN subscriptions s ON s.lago_id = a.subscription_lago_id \
           WHERE a.overflowed \
           ORDER BY s.lago_id, a.period_start DESC)) AS quarantined \
         ORDER BY 1, 3, 4",
    )
    .fetch_all(pool)
    .await
}

/// How many subscriptions are quarantined (each once, whoever found it).
pub async fn count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(DISTINCT id) FROM (SELECT subscription_lago_id AS id FROM billing_quarantine \
         UNION ALL SELECT subscription_lago_id FROM usage_aggregates WHERE overflowed) AS quarantined",
    )
    .fetch_one(pool)
    .await
}
