//! Projection `usage`: per subscription, metric and billing period, the
//! running aggregates Lago's aggregation types need. Computed incrementally
//! in log order from the usage facts each log row carries (the events
//! themselves are read from the log: `events_usage_by_time`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use aggregates::import::{ImportRunEvent, IMPORT_RUN_TYPE};

use crate::log::{LogEvent, Reads, UsageFacts};
use crate::projection::{Projection, ProjectionError};

/// The `usage` projection.
pub struct Usage;

#[async_trait]
impl Projection for Usage {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["usage_aggregates", "usage_unique_values", "import_runs"]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[IMPORT_RUN_TYPE]),
            usage_facts: true,
        }
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[LogEvent],
    ) -> Result<(), ProjectionError> {
        // Import runs are folded in log order with the usage around them: a
        // run seen complete here means its usage before it is folded too.
        let mut from = 0;
        for (index, event) in events.iter().enumerate() {
            if event.aggregate_type == IMPORT_RUN_TYPE {
                self.fold_usage(conn, &events[from..index]).await?;
                apply_import_run(conn, event).await?;
                from = index + 1;
            }
        }
        self.fold_usage(conn, &events[from..]).await
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        self.apply_batch(conn, std::slice::from_ref(event)).await
    }
}

impl Usage {
    async fn fold_usage(
        &self,
        conn: &mut PgConnection,
        events: &[LogEvent],
    ) -> Result<(), ProjectionError> {
        let facts: Vec<(&UsageFacts, i64)> = events
            .iter()
            .filter_map(|e| e.usage.as_ref().map(|facts| (facts, e.position)))
            .collect();
        if facts.is_empty() {
            return Ok(());
        }
        upsert_aggregates(conn, &fold_groups(&facts)).await?;
        add_unique_values(conn, &facts).await?;
        Ok(())
    }
}

async fn apply_import_run(
    conn: &mut PgConnection,
    event: &LogEvent,
) -> Result<(), ProjectionError> {
    let run: ImportRunEvent = event
        .decode()
        .map_err(|error| ProjectionError::unreadable(event, error))?;
    match run {
        ImportRunEvent::ImportRunStarted {
            run_id,
            service,
            source,
            options,
            by,
            started_at,
        } => {
            sqlx::query(
                "INSERT INTO import_runs (run_id, service_code, source, started_position, started_at, \
                 started_by, options) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(run_id)
            .bind(service)
            .bind(source)
            .bind(event.position)
            .bind(started_at)
            .bind(by)
            .bind(options)
            .execute(conn)
            .await?;
        }
        ImportRunEvent::ImportRunCompleted {
            counts,
            completed_at,
        } => {
            let run_id = event
                .aggregate_id
                .rsplit_once('/')
                .and_then(|(_, id)| Uuid::parse_str(id).ok())
                .ok_or_else(|| {
                    ProjectionError::unreadable(event, "run stream is not {service}/{run_id}")
                })?;
            sqlx::query("UPDATE import_runs SET completed_at = $2, counts = $3 WHERE run_id = $1")
                .bind(run_id)
                .bind(completed_at)
                .bind(counts)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// One (subscription, metric, period) of a batch, folded in log order.
struct Group {
    period_end: DateTime<Utc>,
    events_count: i64,
    value_sum: Option<Decimal>,
    value_max: Option<Decimal>,
    latest: (DateTime<Utc>, i64, Option<Decimal>),
    /// The sum no longer fits a decimal: the values that would overflow it
    /// are left out and the aggregate is marked (billing refuses it).
    overflowed: bool,
}

type GroupKey = (Uuid, String, DateTime<Utc>);

/// The pure part of a batch fold: per group, what the batch adds.
fn fold_groups(facts: &[(&UsageFacts, i64)]) -> BTreeMap<GroupKey, Group> {
    let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
    for (fact, position) in facts {
        let key = (
            fact.subscription_lago_id,
            fact.metric_code.clone(),
            fact.period_start,
        );
        let latest = (fact.timestamp, *position, fact.value);
        let group = groups.entry(key).or_insert(Group {
            period_end: fact.period_end,
            events_count: 0,
            value_sum: None,
            value_max: None,
            latest,
            overflowed: false,
        });
        group.events_count += 1;
        if let Some(value) = fact.value {
            match group.value_sum.unwrap_or_default().checked_add(value) {
                Some(sum) => group.value_sum = Some(sum),
                None => group.overflowed = true,
            }
            group.value_max = Some(group.value_max.map_or(value, |max| max.max(value)));
        }
        if (latest.0, latest.1) > (group.latest.0, group.latest.1) {
            group.latest = latest;
        }
    }
    groups
}

async fn upsert_aggregates(
    conn: &mut PgConnection,
    groups: &BTreeMap<GroupKey, Group>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO usage_aggregates AS a (subscription_lago_id, metric_code, period_start, period_end, \
         events_count, value_sum, value_max, latest_value, latest_timestamp, latest_position, overflowed) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[], \
                              $6::numeric[], $7::numeric[], $8::numeric[], $9::timestamptz[], $10::bigint[], \
                              $11::boolean[]) \
         ON CONFLICT (subscription_lago_id, metric_code, period_start) DO UPDATE SET \
           events_count = a.events_count + EXCLUDED.events_count, \
           value_sum = CASE WHEN EXCLUDED.value_sum IS NULL THEN a.value_sum \
                            WHEN abs(coalesce(a.value_sum, 0) + EXCLUDED.value_sum) > $12 THEN a.value_sum \
                            ELSE coalesce(a.value_sum, 0) + EXCLUDED.value_sum END, \
           overflowed = a.overflowed OR EXCLUDED.overflowed \
                        OR abs(coalesce(a.value_sum, 0) + coalesce(EXCLUDED.value_sum, 0)) > $12, \
           value_max = GREATEST(a.value_max, EXCLUDED.value_max), \
           latest_value = CASE WHEN (EXCLUDED.latest_timestamp, EXCLUDED.latest_position) \
                                    > (a.latest_timestamp, a.latest_position) \
                               THEN EXCLUDED.latest_value ELSE a.latest_value END, \
           latest_position = CASE WHEN (EXCLUDED.latest_timestamp, EXCLUDED.latest_position) \
                                    > (a.latest_timestamp, a.latest_position) \
                               THEN EXCLUDED.latest_position ELSE a.latest_position END, \
           latest_timestamp = GREATEST(a.latest_timestamp, EXCLUDED.latest_timestamp)",
    )
    .bind(groups.keys().map(|k| k.0).collect::<Vec<_>>())
    .bind(groups.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
    .bind(groups.keys().map(|k| k.2).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.period_end).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.events_count).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.value_sum).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.value_max).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.latest.2).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.latest.0).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.latest.1).collect::<Vec<_>>())
    .bind(groups.values().map(|g| g.overflowed).collect::<Vec<_>>())
    .bind(Decimal::MAX)
    .execute(conn)
    .await?;
    Ok(())
}

/// Record the batch's distinct values and count the new ones per group.
async fn add_unique_values(
    conn: &mut PgConnection,
    facts: &[(&UsageFacts, i64)],
) -> Result<(), sqlx::Error> {
    let unique: Vec<&UsageFacts> = facts
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| f.unique_key.is_some())
        .collect();
    if unique.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH added AS ( \
           INSERT INTO usage_unique_values (subscription_lago_id, metric_code, period_start, unique_key) \
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[]) \
           ON CONFLICT DO NOTHING \
           RETURNING subscription_lago_id, metric_code, period_start) \
         UPDATE usage_aggregates a SET unique_count = a.unique_count + added.count \
         FROM (SELECT subscription_lago_id, metric_code, period_start, count(*) AS count \
               FROM added GROUP BY 1, 2, 3) AS added \
         WHERE a.subscription_lago_id = added.subscription_lago_id AND a.metric_code = added.metric_code \
           AND a.period_start = added.period_start",
    )
    .bind(unique.iter().map(|f| f.subscription_lago_id).collect::<Vec<_>>())
    .bind(unique.iter().map(|f| f.metric_code.as_str()).collect::<Vec<_>>())
    .bind(unique.iter().map(|f| f.period_start).collect::<Vec<_>>())
    .bind(unique.iter().map(|f| f.unique_key.as_deref()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
