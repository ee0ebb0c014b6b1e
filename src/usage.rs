//! Recording usage and reading current usage.
//!
//! A batch is validated against the subscription directory (the `catalog`
//! projection) and appended in one transaction as one multi-row insert into
//! the event log. Each event's stream id is its (subscription, metric,
//! transaction id), so the log's primary key decides duplicates: a second
//! append of the same key inserts nothing, however many requests race. A
//! duplicate whose content matches the original is a safe retry (answered
//! with the original); one whose content differs refuses the whole batch.

use std::collections::{BTreeMap, HashMap, HashSet};

use aggregates::billable_metric::AggregationType;
use aggregates::period::{billing_period_for, BillingPeriod, PeriodRule};
use aggregates::plan::PlanDefinition;
use aggregates::pricing::{charge_amount, tax_minor_units, to_minor_units, ChargeUsage};
use aggregates::subscription::BillingTime;
use aggregates::usage::{
    period_units, usage_stream_id, validate_usage, weighted_sum, ChargedMetric, PeriodAggregate,
    SentUsage, UsageEvent, UsageLimits, UsageRecord, UsageSubscription, USAGE_STREAM_TYPE,
};
use aggregates::FieldErrors;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::event_store::CommandMetadata;

/// Why a batch was refused, per event index.
#[derive(Debug)]
pub enum IngestError {
    /// Field errors by the event's index in the request.
    Invalid(BTreeMap<usize, FieldErrors>),
    /// Storage failed.
    Database(sqlx::Error),
}

impl From<sqlx::Error> for IngestError {
    fn from(error: sqlx::Error) -> Self {
        IngestError::Database(error)
    }
}

/// A recorded event with the time the log recorded it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub record: UsageRecord,
    pub recorded_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct SubscriptionRow {
    external_id: String,
    lago_id: Uuid,
    customer_lago_id: Uuid,
    external_customer_id: String,
    subscription_at: DateTime<Utc>,
    terminated_at: Option<DateTime<Utc>>,
    billing_time: String,
    timezone: String,
    definition: Value,
}

/// A subscription of the service, with its plan version and customer zone.
pub struct DirectoryEntry {
    pub usage: UsageSubscription,
    pub plan: PlanDefinition,
    pub external_customer_id: String,
}

/// The service's subscriptions among `external_ids`, as usage validation
/// needs them (one query for the subscriptions, one for their metrics).
pub async fn directory(
    pool: &PgPool,
    service: &str,
    external_ids: &[String],
) -> Result<HashMap<String, DirectoryEntry>, sqlx::Error> {
    let rows: Vec<SubscriptionRow> = sqlx::query_as(
        "SELECT s.external_id, s.lago_id, c.lago_id AS customer_lago_id, c.external_id AS external_customer_id, \
                s.subscription_at, s.terminated_at, s.resource->>'billing_time' AS billing_time, \
                coalesce(c.resource->>'timezone', 'UTC') AS timezone, pv.definition \
         FROM subscriptions s \
         JOIN customers c ON c.service_code = s.service_code AND c.external_id = s.external_customer_id \
         JOIN plan_versions pv ON pv.service_code = s.service_code AND pv.code = s.plan_code \
                              AND pv.version = s.plan_version \
         WHERE s.service_code = $1 AND s.external_id = ANY($2)",
    )
    .bind(service)
    .bind(external_ids)
    .fetch_all(pool)
    .await?;
    let metric_codes: HashSet<String> = rows
        .iter()
        .filter_map(|row| serde_json::from_value::<PlanDefinition>(row.definition.clone()).ok())
        .flat_map(|plan| plan.charges.into_iter().map(|c| c.metric.code))
        .collect();
    let metric_codes: Vec<String> = metric_codes.into_iter().collect();
    let fields: HashMap<String, Option<String>> = sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT code, resource->>'field_name' FROM billable_metrics WHERE service_code = $1 AND code = ANY($2)",
    )
    .bind(service)
    .bind(&metric_codes)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let mut entries = HashMap::with_capacity(rows.len());
    for row in rows {
        let plan: PlanDefinition =
            serde_json::from_value(row.definition).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let metrics = plan
            .charges
            .iter()
            .map(|charge| {
                (
                    charge.metric.code.clone(),
                    ChargedMetric {
                        aggregation_type: charge.metric.aggregation_type,
                        field_name: fields.get(&charge.metric.code).cloned().flatten(),
                    },
                )
            })
            .collect();
        let timezone = row.timezone.parse().unwrap_or(chrono_tz::UTC);
        let usage = UsageSubscription {
            service: service.to_string(),
            lago_id: row.lago_id,
            customer_lago_id: row.customer_lago_id,
            subscription_at: row.subscription_at,
            terminated_at: row.terminated_at,
            periods: PeriodRule {
                interval: plan.interval,
                billing_time: BillingTime::parse(&row.billing_time)
                    .unwrap_or(BillingTime::Calendar),
                subscription_at: row.subscription_at,
                timezone,
            },
            metrics,
        };
        entries.insert(
            row.external_id,
            DirectoryEntry {
                usage,
                plan,
                external_customer_id: row.external_customer_id,
            },
        );
    }
    Ok(entries)
}

/// Validate and append a batch, all or nothing. Returns each event as
/// recorded (the original one for a safe retry), in request order.
pub async fn record_batch(
    pool: &PgPool,
    service: &str,
    batch: Vec<SentUsage>,
    metadata: CommandMetadata,
    limits: UsageLimits,
    now: DateTime<Utc>,
) -> Result<Vec<Recorded>, IngestError> {
    let external_ids: Vec<String> = batch
        .iter()
        .filter_map(|event| {
            event
                .external_subscription_id
                .as_ref()
                .map(|id| id.trim().to_string())
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let directory = directory(pool, service, &external_ids).await?;

    let mut errors = BTreeMap::new();
    let mut records = Vec::with_capacity(batch.len());
    for (index, sent) in batch.into_iter().enumerate() {
        let subscription = sent
            .external_subscription_id
            .as_deref()
            .and_then(|id| directory.get(id.trim()))
            .map(|entry| &entry.usage);
        match validate_usage(Uuid::new_v4(), sent, subscription, limits, now) {
            Ok(record) => records.push(record),
            Err(field_errors) => {
                errors.insert(index, field_errors);
            }
        }
    }
    if !errors.is_empty() {
        return Err(IngestError::Invalid(errors));
    }

    // The same key twice in one batch must carry the same content.
    let keys: Vec<String> = records.iter().map(stream_id).collect();
    let mut first_of_key: HashMap<&str, usize> = HashMap::new();
    for (index, key) in keys.iter().enumerate() {
        match first_of_key.get(key.as_str()) {
            Some(&first) if records[first].sent != records[index].sent => {
                errors.insert(index, conflict());
            }
            Some(_) => {}
            None => {
                first_of_key.insert(key, index);
            }
        }
    }
    if !errors.is_empty() {
        return Err(IngestError::Invalid(errors));
    }

    let payloads: Vec<String> = records
        .iter()
        .map(|record| serde_json::to_string(&UsageEvent::UsageRecorded(record.clone())))
        .collect::<Result<_, _>>()
        .map_err(|e| IngestError::Database(sqlx::Error::Encode(Box::new(e))))?;
    let metadata = serde_json::to_string(&metadata.into_map())
        .map_err(|e| IngestError::Database(sqlx::Error::Encode(Box::new(e))))?;

    let mut tx = pool.begin().await?;
    let inserted: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT $1, stream, 1, 'UsageRecorded', '1.0', payload::json, $4::json \
         FROM unnest($2::text[], $3::text[]) AS batch(stream, payload) \
         ON CONFLICT DO NOTHING \
         RETURNING aggregate_id, recorded_at",
    )
    .bind(USAGE_STREAM_TYPE)
    .bind(&keys)
    .bind(&payloads)
    .bind(&metadata)
    .fetch_all(&mut *tx)
    .await?;
    let mut recorded_at: HashMap<String, DateTime<Utc>> = inserted.into_iter().collect();

    // Keys already in the log: a retry if the content matches.
    let existing_keys: Vec<&String> = keys
        .iter()
        .filter(|k| !recorded_at.contains_key(*k))
        .collect();
    let mut originals: HashMap<String, UsageRecord> = HashMap::new();
    if !existing_keys.is_empty() {
        let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT aggregate_id, payload::text, recorded_at FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND sequence = 1",
        )
        .bind(USAGE_STREAM_TYPE)
        .bind(&existing_keys)
        .fetch_all(&mut *tx)
        .await?;
        for (key, payload, at) in rows {
            let UsageEvent::UsageRecorded(original) = serde_json::from_str(&payload)
                .map_err(|e| IngestError::Database(sqlx::Error::Decode(Box::new(e))))?;
            recorded_at.insert(key.clone(), at);
            originals.insert(key, original);
        }
    }
    let mut result = Vec::with_capacity(records.len());
    for (index, (record, key)) in records.into_iter().zip(&keys).enumerate() {
        let record = match originals.get(key) {
            Some(original) if original.sent != record.sent => {
                errors.insert(index, conflict());
                continue;
            }
            Some(original) => original.clone(),
            None => record,
        };
        let at = recorded_at.get(key).copied().unwrap_or(now);
        result.push(Recorded {
            record,
            recorded_at: at,
        });
    }
    if !errors.is_empty() {
        tx.rollback().await?;
        return Err(IngestError::Invalid(errors));
    }
    tx.commit().await?;
    Ok(result)
}

fn stream_id(record: &UsageRecord) -> String {
    usage_stream_id(
        record.subscription_lago_id,
        record.sent.code.as_deref().unwrap_or_default(),
        record.sent.transaction_id.as_deref().unwrap_or_default(),
    )
}

fn conflict() -> FieldErrors {
    let mut errors = FieldErrors::default();
    errors.add("transaction_id", "value_already_exist");
    errors
}

/// Lago's event object.
pub fn event_json(record: &UsageRecord, recorded_at: DateTime<Utc>) -> Value {
    json!({
        "lago_id": record.lago_id,
        "transaction_id": record.sent.transaction_id,
        "lago_customer_id": record.customer_lago_id,
        "code": record.sent.code,
        "timestamp": record.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "properties": record.sent.properties,
        "lago_subscription_id": record.subscription_lago_id,
        "external_subscription_id": record.sent.external_subscription_id,
        "created_at": projections::catalog::timestamp(recorded_at),
    })
}

#[derive(sqlx::FromRow)]
struct AggregateRow {
    events_count: i64,
    value_sum: Option<Decimal>,
    value_max: Option<Decimal>,
    latest_value: Option<Decimal>,
    unique_count: i64,
}

/// The usage of one charge in one period, read from the `usage` projection.
pub async fn charge_usage(
    pool: &PgPool,
    subscription_lago_id: Uuid,
    metric_code: &str,
    aggregation: AggregationType,
    period: BillingPeriod,
    with_event_values: bool,
) -> Result<ChargeUsage, sqlx::Error> {
    let row: Option<AggregateRow> = sqlx::query_as(
        "SELECT events_count, value_sum, value_max, latest_value, unique_count FROM usage_aggregates \
         WHERE subscription_lago_id = $1 AND metric_code = $2 AND period_start = $3",
    )
    .bind(subscription_lago_id)
    .bind(metric_code)
    .bind(period.start)
    .fetch_optional(pool)
    .await?;
    let aggregate = row
        .map(|row| PeriodAggregate {
            events_count: row.events_count,
            value_sum: row.value_sum,
            value_max: row.value_max,
            latest_value: row.latest_value,
            unique_count: row.unique_count,
        })
        .unwrap_or_default();
    let needs_events = aggregation == AggregationType::WeightedSumAgg || with_event_values;
    let events: Vec<(DateTime<Utc>, Decimal)> = if needs_events && aggregate.events_count > 0 {
        sqlx::query_as(
            "SELECT \"timestamp\", coalesce(value, 0) FROM usage_events \
             WHERE subscription_lago_id = $1 AND metric_code = $2 AND period_start = $3 \
             ORDER BY \"timestamp\", position",
        )
        .bind(subscription_lago_id)
        .bind(metric_code)
        .bind(period.start)
        .fetch_all(pool)
        .await?
    } else {
        vec![]
    };
    let weighted = weighted_sum(period, Decimal::ZERO, &events);
    Ok(ChargeUsage {
        units: period_units(aggregation, &aggregate, weighted),
        events_count: aggregate.events_count,
        event_values: events.into_iter().map(|(_, value)| value).collect(),
    })
}

/// Lago's `customer_usage` for the open period of a subscription.
pub async fn current_usage(
    pool: &PgPool,
    entry: &DirectoryEntry,
    tax_rates: &[Decimal],
    now: DateTime<Utc>,
) -> Result<Value, sqlx::Error> {
    let period = billing_period_for(&entry.usage.periods, now);
    let currency = entry.plan.amount_currency.as_str();
    let mut charges = Vec::with_capacity(entry.plan.charges.len());
    let mut amount_cents = 0i64;
    for charge in &entry.plan.charges {
        let usage = charge_usage(
            pool,
            entry.usage.lago_id,
            &charge.metric.code,
            charge.metric.aggregation_type,
            period,
            charge.pricing.needs_event_values(),
        )
        .await?;
        let precise = charge_amount(&charge.pricing, &usage);
        let cents = to_minor_units(precise, currency);
        amount_cents += cents;
        charges.push(json!({
            "units": usage.units.normalize().to_string(),
            "total_aggregated_units": usage.units.normalize().to_string(),
            "events_count": usage.events_count,
            "amount_cents": cents,
            "precise_amount": precise.normalize().to_string(),
            "amount_currency": currency,
            "charge": {"lago_id": charge.lago_id, "code": charge.metric.code, "charge_model": charge.pricing.model_name()},
            "billable_metric": {"lago_id": charge.metric.lago_id, "name": charge.metric.code,
                                "code": charge.metric.code, "aggregation_type": charge.metric.aggregation_type.as_str()},
            "filters": [],
        }));
    }
    let taxes_amount_cents = tax_minor_units(amount_cents, tax_rates);
    Ok(json!({
        "from_datetime": projections::catalog::timestamp(period.start),
        "to_datetime": projections::catalog::timestamp(period.end),
        "issuing_date": period.end.with_timezone(&entry.usage.periods.timezone).date_naive().to_string(),
        "currency": currency,
        "amount_cents": amount_cents,
        "taxes_amount_cents": taxes_amount_cents,
        "total_amount_cents": amount_cents + taxes_amount_cents,
        "charges_usage": charges,
    }))
}
