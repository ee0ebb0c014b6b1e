//! `ledger bench import`: importing a generated NexaCloud database, beside a
//! raw multi-row insert of the same rows.
//!
//! On a throwaway embedded cluster (durable settings) it generates two
//! NexaCloud databases with the shared schema — a small one (a tenth of the
//! subscriptions and usage records) and the full one (by default 10,000
//! subscriptions and 1,000,000 usage records) — and measures, in one run:
//! the small import (peak RSS after it); the full import from scratch and
//! again (every record unchanged), in records/s; and, as the reference, the
//! event rows the first import wrote, read back and written with plain
//! multi-row inserts (500 rows a statement) into a copy of the log with the
//! same hash-chain trigger. Peak RSS
//! after the full import beside the small one's shows whether memory grows
//! with the source.

use std::time::Instant;

use sqlx::PgPool;

use crate::access::services;
use crate::event_log::store::{CommandBus, CommandMetadata};
use crate::import::nexacloud::{self, MappingOptions, Sink};
use crate::import::{ImportSettings, Importer, Report};
use crate::postgres::{pool_options, MIGRATOR};
use crate::tools::bench::{peak_rss_mib, Throwaway};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ImportBench {
    /// Where the throwaway cluster lives.
    pub data_dir: std::path::PathBuf,
    /// Subscriptions in the full source.
    pub subscriptions: usize,
    /// Usage records in the full source.
    pub usage_records: usize,
}

/// Run the benchmark and print its table.
pub async fn run(options: ImportBench) -> anyhow::Result<()> {
    let cluster = Throwaway::start(&options.data_dir, "bench-import", 50).await?;
    let result = measure(&cluster, &options).await;
    cluster.remove().await?;
    result
}

/// A database of the throwaway cluster, created empty.
async fn database(cluster: &Throwaway, name: &str) -> anyhow::Result<(String, PgPool)> {
    let admin = PgPool::connect_with(cluster.cluster.connect_options()).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let options = cluster.cluster.connect_options().database(name);
    let url = cluster.cluster.url_of_database(name);
    let pool = pool_options(8).connect_with(options).await?;
    Ok((url, pool))
}

/// A NexaCloud source: users with two deployments each, two plans, one
/// monthly subscription per deployment, usage records spread over October,
/// one invoice per subscription.
async fn generate_source(pool: &PgPool, subscriptions: usize, usage: usize) -> anyhow::Result<()> {
    sqlx::raw_sql(nexacloud::SCHEMA).execute(pool).await?;
    let per = (usage / subscriptions.max(1)).max(1) as i64;
    let script = format!(
        "INSERT INTO plans (id, slug, name, cpu_seconds_quota, price_monthly, price_yearly) VALUES \
           ('00000000-0000-0000-0000-000000000001', 'starter', 'Starter', 36000, 19, 190), \
           ('00000000-0000-0000-0000-000000000002', 'pro', 'Pro', 360000, 49, NULL); \
         INSERT INTO users (id, email, full_name) \
           SELECT md5('u' || n)::uuid, 'user' || n || '@example.com', 'User ' || n \
           FROM generate_series(1, {users}) n; \
         INSERT INTO deployments (id, user_id, name, status) \
           SELECT md5('d' || n)::uuid, md5('u' || ((n + 1) / 2))::uuid, 'dep-' || n, 'running' \
           FROM generate_series(1, {subscriptions}) n; \
         INSERT INTO subscriptions (id, user_id, plan_id, deployment_id, billing_cycle, status, created_at) \
           SELECT md5('s' || n)::uuid, md5('u' || ((n + 1) / 2))::uuid, \
                  CASE WHEN n % 2 = 0 THEN '00000000-0000-0000-0000-000000000001'::uuid \
                       ELSE '00000000-0000-0000-0000-000000000002'::uuid END, \
                  md5('d' || n)::uuid, 'monthly', 'active', '2026-09-01 00:00+00' \
           FROM generate_series(1, {subscriptions}) n; \
         INSERT INTO usage_records (subscription_id, period_start, period_end, cpu_hours, amount) \
           SELECT md5('s' || (1 + (k - 1) / {per}))::uuid, \
                  '2026-10-01 00:00+00'::timestamptz + ((k - 1) % {per}) * interval '6 hours', \
                  '2026-10-01 00:00+00'::timestamptz + ((k - 1) % {per}) * interval '6 hours' + interval '1 hour', \
                  round((random() * 10)::numeric, 4), 0 \
           FROM generate_series(1, {total}) k; \
         INSERT INTO invoices (id, user_id, subscription_id, number, period_start, period_end, status, subtotal, tax, total) \
           SELECT md5('i' || n)::uuid, md5('u' || ((n + 1) / 2))::uuid, md5('s' || n)::uuid, 'NC-' || n, \
                  '2026-10-01', '2026-10-31', 'paid', 19, 2.47, 21.47 \
           FROM generate_series(1, {subscriptions}) n; \
         INSERT INTO invoice_items (id, invoice_id, kind, description, quantity, unit_price, subtotal) \
           SELECT md5('it' || n)::uuid, md5('i' || n)::uuid, 'plan', 'Starter (monthly)', 1, 19, 19 \
           FROM generate_series(1, {subscriptions}) n; \
         ANALYZE",
        users = subscriptions.div_ceil(2),
        total = per * subscriptions as i64,
    );
    sqlx::raw_sql(&script).execute(pool).await?;
    Ok(())
}

/// A ledger database with the service registered.
async fn ledger(cluster: &Throwaway, name: &str) -> anyhow::Result<PgPool> {
    let (_, pool) = database(cluster, name).await?;
    MIGRATOR.run(&pool).await?;
    let commands = CommandBus::new(&pool);
    services::register(&commands, "nexacloud", "NexaCloud", CommandMetadata::cli())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(pool)
}

async fn import(pool: &PgPool, url: &str) -> anyhow::Result<(Report, f64)> {
    let settings = ImportSettings {
        service: "nexacloud".into(),
        dry_run: false,
        apply_changes: false,
        options: serde_json::json!({"door": "bench"}),
        by: "bench".into(),
    };
    let options = MappingOptions {
        timezone: chrono_tz::UTC,
        tax_codes: vec![],
        cpu_price: "0.0075".parse()?,
        cpu_unit_size: "3600".parse()?,
        since: None,
    };
    let started = Instant::now();
    let importer = Importer::new(pool, settings).await?;
    let report = nexacloud::run(url, &options, Sink::Import(Box::new(importer))).await?;
    Ok((report, started.elapsed().as_secs_f64()))
}

/// One event row as the log holds it.
type EventRow = (
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    Option<uuid::Uuid>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<rust_decimal::Decimal>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// The reference: the same event rows the first import wrote, read back in
/// log order and written with multi-row inserts of 500 rows into a copy of
/// the log (same columns, indexes and per-row hash-chain trigger).
async fn raw_insert(pool: &PgPool) -> anyhow::Result<(u64, f64)> {
    sqlx::raw_sql(
        "CREATE TABLE bench_raw_events (LIKE events INCLUDING ALL); \
         CREATE TRIGGER bench_chain BEFORE INSERT ON bench_raw_events \
           FOR EACH ROW EXECUTE FUNCTION events_chain();",
    )
    .execute(pool)
    .await?;
    let started = Instant::now();
    let (mut last, mut written) = (0i64, 0u64);
    loop {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, aggregate_type, aggregate_id, sequence, event_type, payload::text, \
             metadata::text, usage_subscription, usage_metric, usage_timestamp, usage_value, \
             usage_unique_key, usage_period_start, usage_period_end \
             FROM events WHERE position > $1 AND aggregate_type <> 'Service' ORDER BY position LIMIT 500",
        )
        .bind(last)
        .fetch_all(pool)
        .await?;
        let Some(end) = rows.last().map(|r| r.0) else {
            break;
        };
        last = end;
        let column = |f: fn(&EventRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
        written += sqlx::query(
            "INSERT INTO bench_raw_events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, usage_subscription, usage_metric, usage_timestamp, \
             usage_value, usage_unique_key, usage_period_start, usage_period_end) \
             SELECT t, id, s, e, '1.0', p::json, m::json, us, um, ut, uv, uk, ups, upe \
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], \
                         $7::uuid[], $8::text[], $9::timestamptz[], $10::numeric[], $11::text[], \
                         $12::timestamptz[], $13::timestamptz[]) \
               AS r(t, id, s, e, p, m, us, um, ut, uv, uk, ups, upe)",
        )
        .bind(column(|r| r.1.clone()))
        .bind(column(|r| r.2.clone()))
        .bind(rows.iter().map(|r| r.3).collect::<Vec<_>>())
        .bind(column(|r| r.4.clone()))
        .bind(column(|r| r.5.clone()))
        .bind(column(|r| r.6.clone()))
        .bind(rows.iter().map(|r| r.7).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.8.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.9).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.10).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.11.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.12).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.13).collect::<Vec<_>>())
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok((written, started.elapsed().as_secs_f64()))
}

fn records(report: &Report) -> u64 {
    let total = report.total();
    total.new + total.unchanged + total.changed + total.failed
}

async fn measure(cluster: &Throwaway, options: &ImportBench) -> anyhow::Result<()> {
    let (n, m) = (options.subscriptions, options.usage_records);
    println!(
        "import benchmark: NexaCloud sources of {} subscriptions × {} usage records and {n} × {m}, machine: {} cores",
        n / 10,
        m / 10,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let setup = Instant::now();
    let (small_url, small) = database(cluster, "nexacloud_small").await?;
    generate_source(&small, n / 10, m / 10).await?;
    let (full_url, full) = database(cluster, "nexacloud_full").await?;
    generate_source(&full, n, m).await?;
    let small_ledger = ledger(cluster, "ledger_small").await?;
    let full_ledger = ledger(cluster, "ledger_full").await?;
    println!(
        "set-up (sources generated): {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let (small_report, small_seconds) = import(&small_ledger, &small_url).await?;
    let small_rss = peak_rss_mib();
    let (first, first_seconds) = import(&full_ledger, &full_url).await?;
    let full_rss = peak_rss_mib();
    let (again, again_seconds) = import(&full_ledger, &full_url).await?;
    let (raw_rows, raw_seconds) = raw_insert(&full_ledger).await?;

    let rate = |records: u64, seconds: f64| records as f64 / seconds.max(1e-9);
    // Event rows per second, the import's beside the reference's.
    let first_rate = rate(raw_rows, first_seconds);
    let raw_rate = rate(raw_rows, raw_seconds);
    println!(
        "{:<58} {:>9} {:>9} {:>11}",
        "measure", "records", "seconds", "records/s"
    );
    let row = |name: &str, records: u64, seconds: f64| {
        println!(
            "{name:<58} {records:>9} {seconds:>9.2} {:>11.0}",
            rate(records, seconds)
        );
    };
    row(
        "small source, from scratch",
        records(&small_report),
        small_seconds,
    );
    row("full source, from scratch", records(&first), first_seconds);
    row(
        "full source, again (all unchanged)",
        records(&again),
        again_seconds,
    );
    row(
        "raw multi-row insert of its event rows (reference)",
        raw_rows,
        raw_seconds,
    );
    let unchanged = again.total();
    println!(
        "second run: {} unchanged, {} new, {} changed, {} failed",
        unchanged.unchanged, unchanged.new, unchanged.changed, unchanged.failed
    );
    println!(
        "ratio first import / raw insert, in event rows per second: {:.2} (goal ≥ 0.5)",
        first_rate / raw_rate.max(1e-9)
    );
    println!(
        "peak RSS of the ledger process: {small_rss} MiB after the small source, {full_rss} MiB after the full one (goal: flat)"
    );
    for pool in [small, full, small_ledger, full_ledger] {
        pool.close().await;
    }
    Ok(())
}
