//! Appending a validated batch: each key once, a duplicate decided by the
//! log's primary key (a safe retry answers with the original, a conflicting
//! one refuses the batch), the statement guarded by the directory version.

use std::collections::{BTreeMap, HashMap};

use aggregates::usage::{
    usage_stream_id, validate_usage, SentUsage, UsageEvent, UsageLimits, UsageRecord,
    USAGE_STREAM_TYPE,
};
use aggregates::FieldErrors;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::directory::Directory;
use super::group_append::{Append, AppendEvent, Appended};
use super::{Ingest, IngestError, Recorded};
use crate::event_log::store::CommandMetadata;

/// Validate a batch against `directory` and append it, in one statement
/// that first checks the directory still holds (the service's directory
/// version unchanged). `None`: it did not, and nothing was appended.
pub(super) async fn append_batch(
    ingest: &Ingest,
    directory: &Directory,
    batch: Vec<SentUsage>,
    // Who records it (the caller's service and key, or an import run).
    request: CommandMetadata,
    limits: UsageLimits,
    now: DateTime<Utc>,
) -> Result<Option<Vec<Recorded>>, IngestError> {
    let caller = &directory.caller;
    let metadata = request;

    let mut errors = BTreeMap::new();
    let mut records = Vec::with_capacity(batch.len());
    for (index, sent) in batch.into_iter().enumerate() {
        let subscription = sent
            .external_subscription_id
            .as_deref()
            .and_then(|id| directory.entries.get(id.trim()))
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

    // Each key once; the same key twice in one batch must carry the same content.
    let stream_ids: Vec<String> = records.iter().map(stream_id).collect();
    let mut unique: Vec<usize> = Vec::with_capacity(records.len());
    let mut index_of_key: HashMap<&str, usize> = HashMap::new();
    for (index, record) in records.iter().enumerate() {
        match index_of_key.get(stream_ids[index].as_str()) {
            Some(&first) if !same_content(&records[first].sent, &record.sent) => {
                errors.insert(index, conflict());
            }
            Some(_) => {}
            None => {
                index_of_key.insert(&stream_ids[index], index);
                unique.push(index);
            }
        }
    }
    if !errors.is_empty() {
        return Err(IngestError::Invalid(errors));
    }
    let payload = |i: usize| {
        records[i]
            .recorded_payload()
            .map_err(|e| IngestError::Unreadable(format!("usage payload: {e}")))
    };
    let metadata = serde_json::to_string(&metadata.into_map()).expect("a map of strings");

    // One statement (shared with appends that arrive together), so all or
    // nothing without a transaction of our own. It appends only if the
    // directory the batch was validated against still holds, and quietly
    // (the caller wakes this process's runner). Each row carries the usage
    // facts billing reads beside the payload (the columns say what
    // `usage_facts(payload)` says; `ledger verify` checks).
    let append = Append {
        service: caller.service.clone(),
        directory_version: directory.version,
        metadata,
        events: unique
            .iter()
            .map(|&i| {
                let record = &records[i];
                Ok(AppendEvent {
                    stream_id: stream_ids[i].clone(),
                    payload: payload(i)?,
                    subscription: record.subscription_lago_id,
                    metric: record.sent.code.clone().unwrap_or_default(),
                    timestamp: record.timestamp,
                    value: record.value,
                    unique_key: record.unique_key.clone(),
                    period_start: record.period.start,
                    period_end: record.period.end,
                })
            })
            .collect::<Result<_, IngestError>>()?,
    };
    let mut recorded_at = match ingest.appender.append(append).await {
        Ok(Appended::Recorded(recorded_at)) => recorded_at,
        Ok(Appended::DirectoryChanged) => return Ok(None),
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(RETRY_CONFLICT) => {
            // Rare: the payloads are serialized again to find which differ.
            let keys: Vec<&str> = unique.iter().map(|&i| stream_ids[i].as_str()).collect();
            let payloads: Vec<String> = unique
                .iter()
                .map(|&i| payload(i))
                .collect::<Result<_, _>>()?;
            for position in conflicting(&ingest.pool, &keys, &payloads).await? {
                for (index, id) in stream_ids.iter().enumerate() {
                    if id == keys[position] {
                        errors.insert(index, conflict());
                    }
                }
            }
            return Err(IngestError::Invalid(errors));
        }
        Err(error) => return Err(error.into()),
    };

    // Keys already in the log with the same content: answer with the original.
    let retried: Vec<&str> = unique
        .iter()
        .map(|&i| stream_ids[i].as_str())
        .filter(|k| !recorded_at.contains_key(*k))
        .collect();
    let mut originals: HashMap<String, UsageRecord> = HashMap::new();
    if !retried.is_empty() {
        let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT aggregate_id, payload::text, recorded_at FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND sequence = 1",
        )
        .bind(USAGE_STREAM_TYPE)
        .bind(&retried)
        .fetch_all(&ingest.pool)
        .await?;
        for (key, payload, at) in rows {
            let UsageEvent::UsageRecorded(original) = serde_json::from_str(&payload)
                .map_err(|e| IngestError::Unreadable(format!("usage event {key}: {e}")))?;
            recorded_at.insert(key.clone(), at);
            originals.insert(key, original);
        }
    }
    Ok(Some(
        records
            .into_iter()
            .zip(stream_ids)
            .map(|(record, key)| {
                let at = recorded_at.get(&key).copied().unwrap_or(now);
                let original = originals.get(&key).cloned();
                Recorded {
                    new: original.is_none(),
                    record: original.unwrap_or(record),
                    recorded_at: at,
                }
            })
            .collect(),
    ))
}

/// The SQLSTATE `usage_retry_matches` raises on a conflicting retry.
const RETRY_CONFLICT: &str = "LU409";

/// Positions (in `keys`) whose recorded content differs from `payloads`,
/// compared by the same rule as `usage_retry_matches`.
async fn conflicting(
    pool: &PgPool,
    keys: &[&str],
    payloads: &[String],
) -> Result<Vec<usize>, sqlx::Error> {
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT batch.ordinal - 1 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS batch(stream, payload, ordinal) \
         JOIN events e ON e.aggregate_type = $1 AND e.aggregate_id = batch.stream AND e.sequence = 1 \
         WHERE (e.payload -> 'UsageRecorded' -> 'sent')::jsonb \
               IS DISTINCT FROM (batch.payload::json -> 'UsageRecorded' -> 'sent')::jsonb",
    )
    .bind(USAGE_STREAM_TYPE)
    .bind(keys)
    .bind(payloads)
    .fetch_all(pool)
    .await?;
    Ok(positions.into_iter().map(|p| p as usize).collect())
}

/// Whether two sent events are the same, by the rule the log applies to
/// retries: JSON values, numbers compared as numbers.
fn same_content(a: &SentUsage, b: &SentUsage) -> bool {
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                aggregates::wire::parse_decimal(&x.to_string())
                    == aggregates::wire::parse_decimal(&y.to_string())
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }
    a.transaction_id == b.transaction_id
        && a.external_subscription_id == b.external_subscription_id
        && a.code == b.code
        && same(&a.timestamp, &b.timestamp)
        && same(&a.properties, &b.properties)
}

fn stream_id(record: &UsageRecord) -> String {
    usage_stream_id(
        record.subscription_lago_id,
        record.sent.code.as_deref().unwrap_or_default(),
        record.sent.transaction_id.as_deref().unwrap_or_default(),
    )
}

/// The code a retry with different content is refused with.
const CONFLICT: &str = "value_already_exist";

fn conflict() -> FieldErrors {
    let mut errors = FieldErrors::default();
    errors.add("transaction_id", CONFLICT);
    errors
}

/// Whether an event was refused as a retry with different content.
pub fn is_conflict(errors: &FieldErrors) -> bool {
    errors
        .fields()
        .get("transaction_id")
        .is_some_and(|codes| codes.iter().any(|c| c == CONFLICT))
}
