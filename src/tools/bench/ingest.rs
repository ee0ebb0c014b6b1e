//! `ledger bench ingest`: usage ingestion throughput over real HTTP, beside
//! PostgreSQL's own limit measured in the same run on the same cluster.
//!
//! It starts a throwaway embedded cluster (durable settings, as in
//! production), the ledger in-process with its projection runner, builds a
//! catalog through the API, then for each client concurrency measures:
//! single-event posts and 100-event batches through the ledger, and raw
//! single-row commits and 100-row multi-row inserts into a table like
//! `events` (same columns, defaults and indexes). It prints each pair with
//! its ratio, and the process's peak RSS (client, server and load generator
//! share the process; PostgreSQL runs apart).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::app::{Application, BackgroundTasks, Settings};
use crate::http::admin::AdminKey;
use crate::postgres::embedded::EmbeddedPostgres;
use crate::postgres::{pool_options, MIGRATOR};
use crate::tools::bench::{peak_rss_mib, Throwaway};

const SUBSCRIPTIONS: usize = 100;
const BATCH: usize = 100;

/// What to measure.
#[derive(Debug, Clone)]
pub struct IngestBench {
    /// Where the throwaway cluster lives.
    pub data_dir: std::path::PathBuf,
    /// Seconds per measurement.
    pub seconds: u64,
    /// Client concurrencies to measure.
    pub concurrency: Vec<usize>,
}

/// Run the benchmark and print its table.
pub async fn run(options: IngestBench) -> anyhow::Result<()> {
    let cluster = Throwaway::start(&options.data_dir, "bench", 200).await?;
    let result = measure(&cluster.cluster, &options).await;
    cluster.remove().await?;
    result
}

async fn measure(cluster: &EmbeddedPostgres, options: &IngestBench) -> anyhow::Result<()> {
    let max_clients = options.concurrency.iter().copied().max().unwrap_or(1) as u32;
    let pool = pool_options(max_clients + 8)
        .connect_with(cluster.connect_options())
        .await?;
    MIGRATOR.run(&pool).await?;
    let admin_key = uuid::Uuid::new_v4().to_string();
    let settings = Settings::local(
        Some(AdminKey::new(&admin_key)),
        BackgroundTasks::PROJECTIONS,
    );
    let ledger = Application::build(pool.clone(), settings).await?.spawn()?;
    let base = ledger.base_url.clone();

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let key = setup_catalog(&http, &base, &admin_key).await?;
    let raw_pool = pool_options(max_clients + 2)
        .connect_with(cluster.connect_options())
        .await?;
    // The same table, with the same per-row hash the log computes on insert.
    sqlx::raw_sql(
        "CREATE TABLE bench_raw_events (LIKE events INCLUDING ALL); \
         CREATE TRIGGER bench_chain BEFORE INSERT ON bench_raw_events \
           FOR EACH ROW EXECUTE FUNCTION events_chain();",
    )
    .execute(&raw_pool)
    .await?;

    println!(
        "ingest benchmark: {} s per measurement, {SUBSCRIPTIONS} subscriptions, machine: {} cores",
        options.seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<26} {:>11} {:>16} {:>16} {:>7}",
        "mode", "concurrency", "ledger ev/s", "raw PG ev/s", "ratio"
    );
    let duration = Duration::from_secs(options.seconds);
    let run_id = AtomicU64::new(0);
    for &clients in &options.concurrency {
        for batch in [1, BATCH] {
            let prefix = format!("r{}", run_id.fetch_add(1, Ordering::Relaxed));
            let ledger = ledger_rate(&http, &base, &key, clients, batch, duration, &prefix).await?;
            // The baseline runs alone: let the projections drain first.
            drain_projections(&pool).await?;
            let raw = raw_rate(&raw_pool, clients, batch, duration, &prefix).await?;
            let mode = if batch == 1 {
                "single events / 1-row commits"
            } else {
                "batches of 100 / 100-row inserts"
            };
            println!(
                "{mode:<26} {clients:>11} {ledger:>16.0} {raw:>16.0} {:>7.2}",
                ledger / raw
            );
        }
    }
    println!(
        "peak RSS of the ledger process (server + load generator): {} MiB",
        peak_rss_mib()
    );
    ledger.stop().await;
    pool.close().await;
    raw_pool.close().await;
    Ok(())
}

async fn setup_catalog(
    http: &reqwest::Client,
    base: &str,
    admin_key: &str,
) -> anyhow::Result<String> {
    let post = |path: &str, key: &str, body: Value| {
        let request = http
            .post(format!("{base}{path}"))
            .bearer_auth(key)
            .json(&body);
        async move {
            let response = request.send().await?;
            let status = response.status();
            let body: Value = response.json().await?;
            if !status.is_success() {
                bail!("setup {status}: {body}");
            }
            Ok::<Value, anyhow::Error>(body)
        }
    };
    post(
        "/admin/v1/services",
        admin_key,
        json!({"service": {"code": "bench", "name": "Bench"}}),
    )
    .await?;
    let key = post("/admin/v1/services/bench/api_keys", admin_key, json!({})).await?["api_key"]
        ["key"]
        .as_str()
        .context("no key")?
        .to_string();
    let metric = post(
        "/api/v1/billable_metrics",
        &key,
        json!({"billable_metric": {"name": "CPU", "code": "cpu_seconds", "aggregation_type": "sum_agg", "field_name": "cpu_seconds"}}),
    )
    .await?;
    post(
        "/api/v1/plans",
        &key,
        json!({"plan": {"name": "P", "code": "p", "interval": "monthly", "amount_cents": 1900, "amount_currency": "CAD",
               "charges": [{"billable_metric_id": metric["billable_metric"]["lago_id"], "charge_model": "standard",
                            "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]}}),
    )
    .await?;
    post(
        "/api/v1/customers",
        &key,
        json!({"customer": {"external_id": "c", "currency": "CAD"}}),
    )
    .await?;
    let started = (Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    for i in 0..SUBSCRIPTIONS {
        post(
            "/api/v1/subscriptions",
            &key,
            json!({"subscription": {"external_customer_id": "c", "plan_code": "p", "external_id": format!("dep_{i}"),
                   "subscription_at": started}}),
        )
        .await?;
    }
    Ok(key)
}

fn usage_event(prefix: &str, client: usize, sequence: u64, at: i64) -> Value {
    json!({"transaction_id": format!("{prefix}-{client}-{sequence}"),
           "external_subscription_id": format!("dep_{}", sequence as usize % SUBSCRIPTIONS),
           "code": "cpu_seconds", "timestamp": at, "properties": {"cpu_seconds": 1234.5}})
}

async fn ledger_rate(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    clients: usize,
    batch: usize,
    duration: Duration,
    prefix: &str,
) -> anyhow::Result<f64> {
    let events = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let at = Utc::now().timestamp() - 60;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (http, events) = (http.clone(), events.clone());
            let (url, key, prefix) = (
                format!(
                    "{base}/api/v1/events{}",
                    if batch == 1 { "" } else { "/batch" }
                ),
                key.to_string(),
                prefix.to_string(),
            );
            tokio::spawn(async move {
                let mut sequence = 0u64;
                while Instant::now() < deadline {
                    let body = if batch == 1 {
                        sequence += 1;
                        json!({"event": usage_event(&prefix, client, sequence, at)})
                    } else {
                        let items: Vec<Value> = (0..batch)
                            .map(|_| {
                                sequence += 1;
                                usage_event(&prefix, client, sequence, at)
                            })
                            .collect();
                        json!({ "events": items })
                    };
                    let response = http.post(&url).bearer_auth(&key).json(&body).send().await?;
                    if !response.status().is_success() {
                        bail!(
                            "ingest answered {}: {}",
                            response.status(),
                            response.text().await?
                        );
                    }
                    events.fetch_add(batch as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(events.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// A row as the ledger writes it: the same `UsageRecorded` payload, the same
/// metadata and the same usage columns, so the baseline inserts equivalent
/// bytes.
#[derive(Clone, sqlx::FromRow)]
struct SampleRow {
    payload: String,
    metadata: String,
    usage_subscription: uuid::Uuid,
    usage_metric: String,
    usage_timestamp: chrono::DateTime<chrono::Utc>,
    usage_value: Option<rust_decimal::Decimal>,
    usage_unique_key: Option<String>,
    usage_period_start: chrono::DateTime<chrono::Utc>,
    usage_period_end: chrono::DateTime<chrono::Utc>,
}

async fn sample_row(pool: &PgPool) -> anyhow::Result<SampleRow> {
    sqlx::query_as(
        "SELECT payload::text AS payload, metadata::text AS metadata, usage_subscription, usage_metric, \
                usage_timestamp, usage_value, usage_unique_key, usage_period_start, usage_period_end \
         FROM events WHERE aggregate_type = 'Usage' LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .context("no usage event recorded yet")
}

async fn raw_rate(
    pool: &PgPool,
    clients: usize,
    batch: usize,
    duration: Duration,
    prefix: &str,
) -> anyhow::Result<f64> {
    let sample = sample_row(pool).await?;
    let events = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (pool, events, prefix) = (pool.clone(), events.clone(), prefix.to_string());
            let sample = sample.clone();
            tokio::spawn(async move {
                let mut sequence = 0u64;
                while Instant::now() < deadline {
                    let mut ids = Vec::with_capacity(batch);
                    let mut payloads = Vec::with_capacity(batch);
                    for _ in 0..batch {
                        sequence += 1;
                        ids.push(format!("{prefix}-{client}-{sequence}"));
                        payloads.push(sample.payload.replace("\"transaction_id\"", &format!("\"t{sequence}\":0,\"transaction_id\"")));
                    }
                    sqlx::query(
                        "INSERT INTO bench_raw_events (aggregate_type, aggregate_id, sequence, event_type, \
                         event_version, payload, metadata, usage_subscription, usage_metric, usage_timestamp, \
                         usage_value, usage_unique_key, usage_period_start, usage_period_end) \
                         SELECT 'Usage', id, 1, 'UsageRecorded', '1.0', payload::json, $3::json, \
                                subscription, metric, at, value, unique_key, period_start, period_end \
                         FROM unnest($1::text[], $2::text[], $4::uuid[], $5::text[], $6::timestamptz[], \
                                     $7::numeric[], $8::text[], $9::timestamptz[], $10::timestamptz[]) \
                              AS batch(id, payload, subscription, metric, at, value, unique_key, period_start, period_end) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&ids)
                    .bind(&payloads)
                    .bind(&sample.metadata)
                    .bind(vec![sample.usage_subscription; batch])
                    .bind(vec![sample.usage_metric.as_str(); batch])
                    .bind(vec![sample.usage_timestamp; batch])
                    .bind(vec![sample.usage_value; batch])
                    .bind(vec![sample.usage_unique_key.as_deref(); batch])
                    .bind(vec![sample.usage_period_start; batch])
                    .bind(vec![sample.usage_period_end; batch])
                    .execute(&pool)
                    .await?;
                    events.fetch_add(batch as u64, Ordering::Relaxed);
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(events.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

async fn drain_projections(pool: &PgPool) -> anyhow::Result<()> {
    while crate::event_log::projection_runner::status(pool)
        .await?
        .iter()
        .any(|p| p.lag > 0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
