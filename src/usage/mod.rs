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
use std::sync::{Arc, LazyLock, RwLock};

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
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::event_log::store::{Actor, CommandMetadata};
use group_append::{Append, AppendEvent, Appended, GroupAppender};

mod group_append;

/// Append statements in flight at once unless configured: one per CPU
/// core of this host. Fewer statements carry more appends each (appends
/// that arrive while all are busy share the next ones).
pub fn default_appenders() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

/// A process's usage ingest path: what it remembers of the directory, and
/// its appenders.
pub struct Ingest {
    directory: DirectoryCache,
    appender: GroupAppender,
}

impl Ingest {
    /// Start the ingest path with `appenders` append statements at most in
    /// flight at once (see [`default_appenders`]).
    pub fn start(pool: PgPool, appenders: usize) -> Self {
        Self {
            directory: DirectoryCache::default(),
            appender: GroupAppender::start(pool, appenders),
        }
    }
}

/// Why a batch was refused, per event index.
#[derive(Debug)]
pub enum IngestError {
    /// The API key is unknown or revoked, or its service deactivated.
    Unauthorized,
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

/// The directory columns of a subscription, its customer and plan version.
/// `{service}` is the SQL expression of the calling service.
/// The directory entries among `$2`, each with its plan version's identity
/// (the definition itself comes from [`plans_for_usage`]).
const DIRECTORY_SELECT: &str = "SELECT s.external_id, s.lago_id, c.lago_id AS customer_lago_id, \
        c.external_id AS external_customer_id, s.subscription_at, s.terminated_at, \
        s.resource->>'billing_time' AS billing_time, coalesce(c.resource->>'timezone', 'UTC') AS timezone, \
        s.plan_code, s.plan_version, p.lago_id AS plan_lago_id \
    FROM subscriptions s \
    JOIN customers c ON c.service_code = s.service_code AND c.external_id = s.external_customer_id \
    JOIN plans p ON p.service_code = s.service_code AND p.code = s.plan_code \
    WHERE s.service_code = {service} AND s.external_id = ANY($2)";

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
    plan_code: String,
    plan_version: i32,
    plan_lago_id: Uuid,
}

/// A subscription of the service, with its plan version and customer zone.
pub struct DirectoryEntry {
    pub usage: UsageSubscription,
    pub plan: Arc<PlanDefinition>,
    pub external_customer_id: String,
}

/// The service's subscriptions among `external_ids`, as usage validation
/// needs them (one query).
pub async fn directory(
    pool: &PgPool,
    service: &str,
    external_ids: &[String],
) -> Result<HashMap<String, DirectoryEntry>, sqlx::Error> {
    let rows: Vec<SubscriptionRow> = sqlx::query_as(&DIRECTORY_SELECT.replace("{service}", "$1"))
        .bind(service)
        .bind(external_ids)
        .fetch_all(pool)
        .await?;
    entries(pool, service, rows).await
}

/// The service an API key acts for.
#[derive(Debug, Clone)]
pub struct Caller {
    pub service: String,
    pub key_id: String,
}

struct CallerRow {
    caller_key_id: String,
    caller_service: String,
    caller_key_sha256: String,
    directory_version: i64,
    /// None when the caller has none of the subscriptions asked for.
    subscription: Option<SubscriptionRow>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for CallerRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let has_subscription = row.try_get::<Option<String>, _>("external_id")?.is_some();
        Ok(Self {
            caller_key_id: row.try_get("caller_key_id")?,
            caller_service: row.try_get("caller_service")?,
            caller_key_sha256: row.try_get("caller_key_sha256")?,
            directory_version: row.try_get("directory_version")?,
            subscription: if has_subscription {
                Some(SubscriptionRow::from_row(row)?)
            } else {
                None
            },
        })
    }
}

/// Authenticate an API key (by its digest) and read the directory entries
/// of its service among `external_ids`, with the service's directory
/// version, in one round trip (one snapshot). `None`: the key is unknown or
/// revoked, or its service is deactivated.
async fn authorized_directory(
    pool: &PgPool,
    key_digest: &str,
    external_ids: &[String],
) -> Result<Option<Directory>, sqlx::Error> {
    let sql = format!(
        "WITH caller AS (SELECT k.key_id, k.service_code, k.key_sha256 FROM api_keys k \
                         JOIN service_directory d ON d.code = k.service_code \
                         WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL AND d.status = 'active') \
         SELECT caller.key_id AS caller_key_id, caller.service_code AS caller_service, \
                caller.key_sha256 AS caller_key_sha256, \
                coalesce((SELECT v.version FROM usage_directory_versions v \
                          WHERE v.service_code = caller.service_code), 0) AS directory_version, \
                entry.* \
         FROM caller LEFT JOIN LATERAL ({}) AS entry ON true",
        DIRECTORY_SELECT.replace("{service}", "caller.service_code")
    );
    let rows: Vec<CallerRow> = sqlx::query_as(&sql)
        .bind(key_digest)
        .bind(external_ids)
        .fetch_all(pool)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    if !crate::access::keys::digests_match(&first.caller_key_sha256, key_digest) {
        return Ok(None);
    }
    let caller = Caller {
        service: first.caller_service.clone(),
        key_id: first.caller_key_id.clone(),
    };
    let version = first.directory_version;
    let entries = entries(
        pool,
        &caller.service,
        rows.into_iter()
            .filter_map(|row| row.subscription)
            .collect(),
    )
    .await?;
    Ok(Some(Directory {
        caller,
        version,
        entries: entries
            .into_iter()
            .map(|(id, entry)| (id, Arc::new(entry)))
            .collect(),
    }))
}

/// An authenticated caller and the directory entries a batch names, as of
/// the caller's service's directory version (migration
/// `usage_directory_versions`).
struct Directory {
    caller: Caller,
    version: i64,
    entries: HashMap<String, Arc<DirectoryEntry>>,
}

/// The most subscriptions a [`DirectoryCache`] holds before it starts over.
const DIRECTORY_CACHE_LIMIT: usize = 100_000;

/// What the ingest path remembers between requests, so a request usually
/// makes one round trip to PostgreSQL: the append. Callers by key digest,
/// and each service's directory entries with the directory version they were
/// read at. Nothing is trusted blindly: the append itself checks, in the same
/// statement, that the service's version is still the one remembered (any
/// change to its status, keys, customers, subscriptions or plans gives it a
/// new one), and appends nothing otherwise; the request then reads the
/// directory afresh. A refusal found with remembered entries is also checked
/// against fresh ones before it is answered.
#[derive(Default)]
pub struct DirectoryCache {
    callers: RwLock<HashMap<String, Caller>>,
    services: RwLock<HashMap<String, RememberedService>>,
}

/// A service's directory entries read at one version.
struct RememberedService {
    version: i64,
    entries: HashMap<String, Arc<DirectoryEntry>>,
}

impl DirectoryCache {
    /// The caller and every entry asked for, if all are remembered.
    fn lookup(&self, key_digest: &str, external_ids: &[String]) -> Option<Directory> {
        let caller = self
            .callers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_digest)?
            .clone();
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let service = services.get(&caller.service)?;
        let mut entries = HashMap::with_capacity(external_ids.len());
        for id in external_ids {
            entries.insert(id.clone(), service.entries.get(id)?.clone());
        }
        Some(Directory {
            version: service.version,
            caller,
            entries,
        })
    }

    /// Remember a fresh read; entries read at another version are dropped.
    fn remember(&self, key_digest: &str, directory: &Directory) {
        self.callers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key_digest.to_string(), directory.caller.clone());
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let remembered: usize = services.values().map(|s| s.entries.len()).sum();
        if remembered + directory.entries.len() > DIRECTORY_CACHE_LIMIT {
            services.clear();
        }
        let service = services
            .entry(directory.caller.service.clone())
            .or_insert_with(|| RememberedService {
                version: directory.version,
                entries: HashMap::new(),
            });
        if service.version != directory.version {
            service.version = directory.version;
            service.entries.clear();
        }
        for (id, entry) in &directory.entries {
            service.entries.insert(id.clone(), entry.clone());
        }
    }

    fn forget(&self, key_digest: &str) {
        self.callers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key_digest);
    }
}

/// A plan version as usage validation reads it: its definition and the
/// metric each of its charges aggregates.
struct PlanForUsage {
    plan: Arc<PlanDefinition>,
    metrics: HashMap<String, ChargedMetric>,
}

/// A plan version is a fact: once published it never changes, and neither
/// do the billable metrics it charges. So each is read and decoded once per
/// process, keyed by the plan's id (unique across services and databases)
/// and the version. Bounded by the number of plan versions.
static PLANS_FOR_USAGE: LazyLock<RwLock<PlansForUsage>> = LazyLock::new(Default::default);

/// Plan versions by (plan id, version).
type PlansForUsage = HashMap<(Uuid, i32), Arc<PlanForUsage>>;

/// The plan versions `rows` are on, from the process's cache, reading the
/// ones it lacks in one query.
async fn plans_for_usage(
    pool: &PgPool,
    service: &str,
    rows: &[SubscriptionRow],
) -> Result<PlansForUsage, sqlx::Error> {
    let mut plans = HashMap::new();
    let mut missing: Vec<(String, i32)> = vec![];
    {
        let cache = PLANS_FOR_USAGE.read().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            let key = (row.plan_lago_id, row.plan_version);
            match cache.get(&key) {
                Some(plan) => {
                    plans.insert(key, plan.clone());
                }
                None => missing.push((row.plan_code.clone(), row.plan_version)),
            }
        }
    }
    if missing.is_empty() {
        return Ok(plans);
    }
    let read: Vec<(Uuid, i32, Value, Value)> = sqlx::query_as(
        "SELECT p.lago_id, pv.version, pv.definition, \
                coalesce((SELECT jsonb_object_agg(m.code, m.resource->'field_name') FROM billable_metrics m \
                          WHERE m.service_code = pv.service_code AND m.code IN \
                            (SELECT charge->'metric'->>'code' \
                             FROM jsonb_array_elements(pv.definition->'charges') charge)), '{}') \
         FROM unnest($2::text[], $3::int[]) AS wanted(code, version) \
         JOIN plan_versions pv ON pv.service_code = $1 AND pv.code = wanted.code AND pv.version = wanted.version \
         JOIN plans p ON p.service_code = pv.service_code AND p.code = pv.code",
    )
    .bind(service)
    .bind(missing.iter().map(|(code, _)| code.as_str()).collect::<Vec<_>>())
    .bind(missing.iter().map(|(_, version)| *version).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let mut cache = PLANS_FOR_USAGE.write().unwrap_or_else(|e| e.into_inner());
    for (plan_lago_id, version, definition, field_names) in read {
        let plan = PlanDefinition::deserialize(&definition)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let metrics = plan
            .charges
            .iter()
            .map(|charge| {
                (
                    charge.metric.code.clone(),
                    ChargedMetric {
                        aggregation_type: charge.metric.aggregation_type,
                        field_name: field_names[&charge.metric.code].as_str().map(String::from),
                    },
                )
            })
            .collect();
        let plan = Arc::new(PlanForUsage {
            plan: Arc::new(plan),
            metrics,
        });
        cache.insert((plan_lago_id, version), plan.clone());
        plans.insert((plan_lago_id, version), plan);
    }
    Ok(plans)
}

async fn entries(
    pool: &PgPool,
    service: &str,
    rows: Vec<SubscriptionRow>,
) -> Result<HashMap<String, DirectoryEntry>, sqlx::Error> {
    let plans = plans_for_usage(pool, service, &rows).await?;
    let mut entries = HashMap::with_capacity(rows.len());
    for row in rows {
        let plan = plans
            .get(&(row.plan_lago_id, row.plan_version))
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!(
                    "plan {} version {} of subscription {} is not in the catalog",
                    row.plan_code, row.plan_version, row.external_id
                ))
            })?;
        let timezone = row.timezone.parse().unwrap_or(chrono_tz::UTC);
        let usage = UsageSubscription {
            service: service.to_string(),
            lago_id: row.lago_id,
            customer_lago_id: row.customer_lago_id,
            subscription_at: row.subscription_at,
            terminated_at: row.terminated_at,
            periods: PeriodRule {
                interval: plan.plan.interval,
                billing_time: BillingTime::parse(&row.billing_time)
                    .unwrap_or(BillingTime::Calendar),
                subscription_at: row.subscription_at,
                timezone,
            },
            metrics: plan.metrics.clone(),
        };
        entries.insert(
            row.external_id,
            DirectoryEntry {
                usage,
                plan: plan.plan.clone(),
                external_customer_id: row.external_customer_id,
            },
        );
    }
    Ok(entries)
}

/// How many times a batch reads the directory afresh when the catalog
/// changed between its read and its append (after the remembered one).
const STALE_DIRECTORY_ATTEMPTS: usize = 3;

/// Validate and append a batch, all or nothing. Returns each event as
/// recorded (the original one for a safe retry), in request order.
pub async fn record_batch(
    pool: &PgPool,
    ingest: &Ingest,
    key_digest: &str,
    batch: Vec<SentUsage>,
    request: CommandMetadata,
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
    // The remembered directory first (when it has everything), then fresh
    // reads while the catalog changes under the append.
    let cache = &ingest.directory;
    let mut remembered = cache.lookup(key_digest, &external_ids);
    for _ in 0..=STALE_DIRECTORY_ATTEMPTS {
        let from_memory = remembered.is_some();
        let directory = match remembered.take() {
            Some(directory) => directory,
            None => {
                let Some(directory) = authorized_directory(pool, key_digest, &external_ids).await?
                else {
                    cache.forget(key_digest);
                    return Err(IngestError::Unauthorized);
                };
                cache.remember(key_digest, &directory);
                directory
            }
        };
        let attempt = append_batch(
            pool,
            ingest,
            &directory,
            batch.clone(),
            request.clone(),
            limits,
            now,
        );
        match attempt.await {
            Ok(Some(recorded)) => return Ok(recorded),
            // The catalog changed since the directory was read: read it afresh.
            Ok(None) => {}
            // A refusal found with remembered entries is confirmed afresh.
            Err(IngestError::Invalid(_)) if from_memory => {}
            Err(error) => return Err(error),
        }
    }
    Err(IngestError::Database(sqlx::Error::Protocol(
        "the catalog changed under every attempt to record the batch".into(),
    )))
}

/// Validate a batch against `directory` and append it, in one statement
/// that first checks the directory still holds (the service's directory
/// version unchanged). `None`: it did not, and nothing was appended.
async fn append_batch(
    pool: &PgPool,
    ingest: &Ingest,
    directory: &Directory,
    batch: Vec<SentUsage>,
    request: CommandMetadata,
    limits: UsageLimits,
    now: DateTime<Utc>,
) -> Result<Option<Vec<Recorded>>, IngestError> {
    let caller = &directory.caller;
    let metadata = CommandMetadata {
        actor: Actor::Service(caller.service.clone()),
        api_key_id: Some(caller.key_id.clone()),
        ..request
    };

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
            .map_err(|e| IngestError::Database(sqlx::Error::Encode(Box::new(e))))
    };
    let metadata = serde_json::to_string(&metadata.into_map())
        .map_err(|e| IngestError::Database(sqlx::Error::Encode(Box::new(e))))?;

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
            for position in conflicting(pool, &keys, &payloads).await? {
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
        .fetch_all(pool)
        .await?;
        for (key, payload, at) in rows {
            let UsageEvent::UsageRecorded(original) = serde_json::from_str(&payload)
                .map_err(|e| IngestError::Database(sqlx::Error::Decode(Box::new(e))))?;
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
                let record = originals.get(&key).cloned().unwrap_or(record);
                Recorded {
                    record,
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

fn conflict() -> FieldErrors {
    let mut errors = FieldErrors::default();
    errors.add("transaction_id", "value_already_exist");
    errors
}

/// Lago's event object, serialized straight from the record.
#[derive(serde::Serialize)]
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
            "SELECT usage_timestamp, coalesce(usage_value, 0) FROM events \
             WHERE usage_subscription = $1 AND usage_timestamp >= $3 AND usage_timestamp < $4 \
               AND usage_metric = $2 AND usage_period_start = $3 \
             ORDER BY usage_timestamp, position",
        )
        .bind(subscription_lago_id)
        .bind(metric_code)
        .bind(period.start)
        .bind(period.end)
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
    let mut taxes_amount_cents = 0i64;
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
        // Tax per fee, as on the invoice (`aggregates::billing`).
        taxes_amount_cents += tax_minor_units(cents, tax_rates);
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
