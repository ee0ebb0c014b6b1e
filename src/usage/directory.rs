//! The subscription directory as usage validation reads it: which
//! subscriptions a caller's service has, their customers, plan versions and
//! billing periods — read with the caller's key in one round trip, and
//! remembered between requests under the service's directory version.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use aggregates::period::PeriodRule;
use aggregates::plan::PlanDefinition;
use aggregates::subscription::BillingTime;
use aggregates::usage::{ChargedMetric, UsageSubscription};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::IngestError;
use crate::access::{Caller, ACTIVE_KEY_SELECT};

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
    /// What usage validation checks an event against.
    pub usage: UsageSubscription,
    /// The plan version it bills on.
    pub plan: Arc<PlanDefinition>,
    /// The service's id for its customer.
    pub external_customer_id: String,
}

/// The service's subscriptions among `external_ids`, as usage validation
/// needs them (one query).
pub async fn directory(
    pool: &PgPool,
    service: &str,
    external_ids: &[String],
) -> Result<HashMap<String, DirectoryEntry>, IngestError> {
    let rows: Vec<SubscriptionRow> = sqlx::query_as(&DIRECTORY_SELECT.replace("{service}", "$1"))
        .bind(service)
        .bind(external_ids)
        .fetch_all(pool)
        .await?;
    entries(pool, service, rows).await
}

/// The directory entries of `service` among `external_ids` with the
/// directory version they are at least as new as (read first: a change
/// after it fails the append's guard), for appends on the service's behalf.
pub(super) async fn service_directory(
    pool: &PgPool,
    service: &str,
    external_ids: &[String],
) -> Result<Directory, IngestError> {
    let version: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT version FROM usage_directory_versions WHERE service_code = $1), 0)",
    )
    .bind(service)
    .fetch_one(pool)
    .await?;
    let entries = directory(pool, service, external_ids).await?;
    Ok(Directory {
        caller: Caller {
            service: service.to_string(),
            key_id: String::new(),
        },
        version,
        entries: entries
            .into_iter()
            .map(|(id, entry)| (id, Arc::new(entry)))
            .collect(),
    })
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
pub(super) async fn authorized_directory(
    pool: &PgPool,
    key_digest: &str,
    external_ids: &[String],
) -> Result<Option<Directory>, IngestError> {
    let sql = format!(
        "WITH caller AS ({ACTIVE_KEY_SELECT}) \
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
    let Some(caller) = Caller::verified(
        &first.caller_key_id,
        &first.caller_service,
        &first.caller_key_sha256,
        key_digest,
    ) else {
        return Ok(None);
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
pub(super) struct Directory {
    pub caller: Caller,
    pub version: i64,
    pub entries: HashMap<String, Arc<DirectoryEntry>>,
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
    pub(super) fn lookup(&self, key_digest: &str, external_ids: &[String]) -> Option<Directory> {
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
    pub(super) fn remember(&self, key_digest: &str, directory: &Directory) {
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

    pub(super) fn forget(&self, key_digest: &str) {
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
) -> Result<PlansForUsage, IngestError> {
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
        let plan = PlanDefinition::deserialize(&definition).map_err(|e| {
            IngestError::Unreadable(format!("plan {plan_lago_id} version {version}: {e}"))
        })?;
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
) -> Result<HashMap<String, DirectoryEntry>, IngestError> {
    let plans = plans_for_usage(pool, service, &rows).await?;
    let mut entries = HashMap::with_capacity(rows.len());
    for row in rows {
        let plan = plans
            .get(&(row.plan_lago_id, row.plan_version))
            .ok_or_else(|| {
                IngestError::Unreadable(format!(
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
