//! `ledger bench close`: closing a billing period for many subscriptions,
//! beside the time PostgreSQL takes to read the same usage rows raw.
//!
//! On a throwaway embedded cluster (durable settings) it creates one
//! service, the NexaCloud-like catalog and N monthly subscriptions that
//! started on the 1st of last month (UTC), records M usage events for each
//! through the HTTP API (100-event batches), lets the projections drain,
//! then times one pass of the period closer at the 1st of this month —
//! which finalizes N invoices, each computed from its events — and the
//! projection of those invoices; then a raw sequential read of the same
//! usage rows. Peak RSS is printed beside the figures.

use std::time::Instant;

use anyhow::{bail, Context};
use chrono::{Datelike, TimeZone, Utc};
use futures_util::TryStreamExt;
use serde_json::{json, Value};

use crate::app::{Application, BackgroundTasks, Settings};
use crate::event_log::projection_runner::ProjectionRunner;
use crate::http::admin::AdminKey;
use crate::postgres::embedded::EmbeddedPostgres;
use crate::postgres::{pool_options, MIGRATOR};
use crate::tools::bench::{peak_rss_mib, Throwaway};
use crate::tools::progress::Progress;

/// What to measure.
#[derive(Debug, Clone)]
pub struct CloseBench {
    /// Where the throwaway cluster lives.
    pub data_dir: std::path::PathBuf,
    /// Subscriptions to invoice.
    pub subscriptions: usize,
    /// Usage events per subscription.
    pub events_per_subscription: usize,
}

/// Run the benchmark and print its table.
pub async fn run(options: CloseBench) -> anyhow::Result<()> {
    let cluster = Throwaway::start(&options.data_dir, "bench-close", 100).await?;
    let result = measure(&cluster.cluster, &options).await;
    cluster.remove().await?;
    result
}

pub(crate) const CLIENTS: usize = 8;

/// What the period benchmarks start from: N subscriptions that started on
/// the 1st of last month (UTC), M usage events each recorded over HTTP, the
/// projections drained and the HTTP server stopped.
pub(crate) struct Backfilled {
    pub pool: sqlx::PgPool,
    /// The acceptance window the usage was recorded under (a backfill).
    pub window: chrono::Duration,
    pub this_month: chrono::DateTime<Utc>,
    pub last_month: chrono::DateTime<Utc>,
}

pub(crate) async fn backfill(
    cluster: &EmbeddedPostgres,
    subscriptions: usize,
    events_per_subscription: usize,
) -> anyhow::Result<Backfilled> {
    let pool = pool_options(CLIENTS as u32 + 8)
        .connect_with(cluster.connect_options())
        .await?;
    MIGRATOR.run(&pool).await?;
    let admin_key = uuid::Uuid::new_v4().to_string();
    let window = chrono::Duration::days(400);
    let limits = aggregates::usage::UsageLimits {
        acceptance_window: window,
        ..Default::default()
    };
    let settings = Settings {
        usage_limits: limits,
        ..Settings::local(
            Some(AdminKey::new(&admin_key)),
            BackgroundTasks::PROJECTIONS,
        )
    };
    let ledger = Application::build(pool.clone(), settings).await?.spawn()?;
    let http = reqwest::Client::new();
    let this_month = Utc.from_utc_datetime(
        &Utc::now()
            .date_naive()
            .with_day(1)
            .expect("day 1")
            .and_hms_opt(0, 0, 0)
            .expect("midnight"),
    );
    let last_month = this_month - chrono::Months::new(1);
    let key = setup_catalog(
        &http,
        &ledger.base_url,
        &admin_key,
        subscriptions,
        last_month,
    )
    .await?;
    record_usage(
        &http,
        &ledger.base_url,
        &key,
        subscriptions,
        events_per_subscription,
        last_month,
    )
    .await?;
    ProjectionRunner::for_all(pool.clone())
        .await?
        .catch_up()
        .await?;
    ledger.stop().await;
    // The month's usage was recorded over a month, in which autovacuum
    // (tuned for the log: every 1% of new rows) marked the log's pages
    // all-visible and cleaned the aggregates' updated rows; here it was
    // recorded a moment ago, so do what autovacuum would have done by now,
    // rather than have it run during the measurement.
    sqlx::query("VACUUM (ANALYZE)").execute(&pool).await?;
    // And let the set-up's writes reach the disk before anything is timed.
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    Ok(Backfilled {
        pool,
        window,
        this_month,
        last_month,
    })
}

async fn measure(cluster: &EmbeddedPostgres, options: &CloseBench) -> anyhow::Result<()> {
    let (n, m) = (options.subscriptions, options.events_per_subscription);
    let setup = Instant::now();
    let Backfilled {
        pool,
        window,
        this_month,
        last_month,
    } = backfill(cluster, n, m).await?;
    println!("close benchmark: {n} subscriptions × {m} usage events, period {last_month} to {this_month}");
    println!(
        "set-up (catalog, subscriptions, usage over HTTP): {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let report = crate::invoicing::closer::close_due(
        &pool,
        Some("bench"),
        window,
        this_month + chrono::Duration::seconds(1),
    )
    .await?;
    let close = started.elapsed();
    if report.finalized != n {
        bail!(
            "expected {n} invoices, the closer finalized {}",
            report.finalized
        );
    }
    let started = Instant::now();
    ProjectionRunner::for_all(pool.clone())
        .await?
        .catch_up()
        .await?;
    let projected = started.elapsed();

    let started = Instant::now();
    let mut rows = sqlx::query_as::<
        _,
        (
            uuid::Uuid,
            String,
            chrono::DateTime<Utc>,
            Option<rust_decimal::Decimal>,
        ),
    >(
        "SELECT usage_subscription, usage_metric, usage_timestamp, usage_value FROM events \
         WHERE usage_subscription IS NOT NULL",
    )
    .fetch(&pool);
    let mut read = 0usize;
    while rows.try_next().await?.is_some() {
        read += 1;
    }
    let raw = started.elapsed();
    let total: i64 = sqlx::query_scalar(
        "SELECT sum((finalization->'totals'->>'total_amount_cents')::bigint)::bigint FROM invoices",
    )
    .fetch_one(&pool)
    .await?;
    println!("{:<52} {:>9}", "measure", "seconds");
    println!(
        "{:<52} {:>9.2}",
        format!("close the period ({n} invoices finalized, goal < 10 s)"),
        close.as_secs_f64()
    );
    println!(
        "{:<52} {:>9.2}",
        "project those invoices (invoices projection)",
        projected.as_secs_f64()
    );
    println!(
        "{:<52} {:>9.2}",
        format!("raw read of the {read} usage rows"),
        raw.as_secs_f64()
    );
    println!(
        "ratio close / raw read: {:.1}; invoices total: {total} cents",
        close.as_secs_f64() / raw.as_secs_f64()
    );
    println!("peak RSS of the ledger process: {} MiB", peak_rss_mib());
    pool.close().await;
    Ok(())
}

pub(crate) async fn post(
    http: &reqwest::Client,
    url: String,
    key: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = http.post(url).bearer_auth(key).json(&body).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("setup {status}: {body}");
    }
    Ok(body)
}

pub(crate) async fn setup_catalog(
    http: &reqwest::Client,
    base: &str,
    admin_key: &str,
    subscriptions: usize,
    started: chrono::DateTime<Utc>,
) -> anyhow::Result<String> {
    post(
        http,
        format!("{base}/admin/v1/services"),
        admin_key,
        json!({"service": {"code": "bench", "name": "Bench"}}),
    )
    .await?;
    let key = post(
        http,
        format!("{base}/admin/v1/services/bench/api_keys"),
        admin_key,
        json!({}),
    )
    .await?["api_key"]["key"]
        .as_str()
        .context("no key")?
        .to_string();
    let metric = post(http, format!("{base}/api/v1/billable_metrics"), &key,
        json!({"billable_metric": {"name": "CPU", "code": "cpu_seconds", "aggregation_type": "sum_agg", "field_name": "cpu_seconds"}})).await?;
    post(
        http,
        format!("{base}/api/v1/taxes"),
        &key,
        json!({"tax": {"name": "HST", "code": "hst", "rate": "13"}}),
    )
    .await?;
    post(http, format!("{base}/api/v1/plans"), &key,
        json!({"plan": {"name": "P", "code": "p", "interval": "monthly", "amount_cents": 1900, "amount_currency": "CAD",
               "charges": [{"billable_metric_id": metric["billable_metric"]["lago_id"], "charge_model": "standard",
                            "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]}})).await?;
    post(
        http,
        format!("{base}/api/v1/customers"),
        &key,
        json!({"customer": {"external_id": "c", "currency": "CAD", "tax_codes": ["hst"]}}),
    )
    .await?;
    let progress = Progress::requests("subscriptions", subscriptions as u64);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, base, key) = (http.clone(), base.to_string(), key.clone());
            let progress = progress.clone();
            tokio::spawn(async move {
                for i in (client..subscriptions).step_by(CLIENTS) {
                    post(&http, format!("{base}/api/v1/subscriptions"), &key,
                        json!({"subscription": {"external_customer_id": "c", "plan_code": "p",
                               "external_id": format!("dep_{i}"), "subscription_at": started.to_rfc3339()}})).await?;
                    progress.advance(1);
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    progress.finish();
    Ok(key)
}

async fn record_usage(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    subscriptions: usize,
    per_subscription: usize,
    period_start: chrono::DateTime<Utc>,
) -> anyhow::Result<()> {
    let total = subscriptions * per_subscription;
    let progress = Progress::events("usage over HTTP", total as u64);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, base, key) = (http.clone(), base.to_string(), key.to_string());
            let progress = progress.clone();
            tokio::spawn(async move {
                let mine: Vec<usize> = (client..total).step_by(CLIENTS).collect();
                for chunk in mine.chunks(100) {
                    let events: Vec<Value> = chunk
                        .iter()
                        .map(|&i| {
                            let (sub, n) = (i % subscriptions, i / subscriptions);
                            let at = period_start + chrono::Duration::minutes(10 * n as i64 + 1);
                            json!({"transaction_id": format!("t{n}"), "external_subscription_id": format!("dep_{sub}"),
                                   "code": "cpu_seconds", "timestamp": at.timestamp(),
                                   "properties": {"cpu_seconds": "1234.5"}})
                        })
                        .collect();
                    post(&http, format!("{base}/api/v1/events/batch"), &key, json!({ "events": events })).await?;
                    progress.advance(chunk.len() as u64);
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    progress.finish();
    Ok(())
}
