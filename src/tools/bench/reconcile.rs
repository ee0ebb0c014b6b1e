//! `ledger bench reconcile`: reconciling one period of N subscriptions, and
//! rebuilding the `reconciliation` projection, beside a raw read of the log
//! rows it reads.
//!
//! On a throwaway embedded cluster (durable settings) it creates the
//! NexaCloud-like catalog and N monthly subscriptions that started three
//! months ago (UTC), records one usage event per subscription and month over
//! HTTP, closes the three months (3 × N shadow-or-live invoices), and
//! imports the source's actuals as `external_invoice` records: per ten
//! subscriptions six that match and one of each delta (usage price, flat
//! fee, tax), one never invoiced at the source, and one with a shifted
//! window every other ten; one one-off invoice per hundred. It then times
//! reconciling the middle month (every row with its causes) and the
//! projection's in-place rebuild, beside a raw sequential read of the rows
//! the projection decodes. Peak RSS is printed with the figures.

use std::time::Instant;

use anyhow::Context;
use chrono::{Datelike, Months, TimeZone, Utc};
use futures_util::TryStreamExt;
use serde_json::{json, Value};

use crate::app::{Application, BackgroundTasks, Settings};
use crate::event_log::projection_runner::{self, ProjectionRunner};
use crate::http::admin::AdminKey;
use crate::import::{ImportSettings, Importer};
use crate::postgres::embedded::EmbeddedPostgres;
use crate::postgres::{pool_options, MIGRATOR};
use crate::reconciliation::{reconcile, ReconcileRequest};
use crate::tools::bench::close::{post, setup_catalog, CLIENTS};
use crate::tools::bench::{peak_rss_mib, Throwaway};
use crate::tools::progress::Progress;
use aggregates::import::{RecordType, SourceRecord};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ReconcileBench {
    /// Where the throwaway cluster lives.
    pub data_dir: std::path::PathBuf,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Usage events per subscription and period.
    pub events_per_period: usize,
}

/// Run the benchmark and print its table.
pub async fn run(options: ReconcileBench) -> anyhow::Result<()> {
    let cluster = Throwaway::start(&options.data_dir, "bench-reconcile", 100).await?;
    let result = measure(&cluster.cluster, &options).await;
    cluster.remove().await?;
    result
}

/// Log rows as text, streamed (sequential scan): those the projection
/// decodes (`decoded`), or every row, as its runner reads the log.
async fn raw_read(pool: &sqlx::PgPool, decoded: bool) -> anyhow::Result<i64> {
    let filter = if decoded {
        "WHERE aggregate_type IN ('Customer', 'Invoice', 'ImportedRecord', 'Reconciliation')"
    } else {
        ""
    };
    let query = format!(
        "SELECT position, aggregate_type, aggregate_id, event_type, payload::text, metadata::text \
         FROM events {filter}"
    );
    let mut rows =
        sqlx::query_as::<_, (i64, String, String, String, String, String)>(&query).fetch(pool);
    let mut read = 0i64;
    while rows.try_next().await?.is_some() {
        read += 1;
    }
    Ok(read)
}

/// The source's invoice of subscription `i` for the month starting `from`.
fn actual(
    i: usize,
    month: usize,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> Option<SourceRecord> {
    // The ledger: 1900 flat + 80 usage (106.67 core-hours beyond the quota
    // at 0.0075), tax 247 + 10.
    let (mut flat, mut usage, mut rate, mut tax) = (1900, 80, "0.0075", 257);
    let (mut from_date, mut to_date) = (from, to);
    match i % 10 {
        6 => (usage, rate, tax) = (64, "0.006", 255),
        7 => (flat, tax) = (1000, 140),
        8 => tax = 256,
        9 if (i / 10).is_multiple_of(2) => return None,
        9 => {
            (from_date, to_date) = (
                from + chrono::Duration::days(4),
                to + chrono::Duration::days(4),
            )
        }
        _ => {}
    }
    Some(SourceRecord::new(
        RecordType::ExternalInvoice,
        "bench",
        format!("inv_{i}_{month}"),
        json!({"number": format!("S-{i}-{month}"), "external_customer_id": "c",
               "external_subscription_id": format!("dep_{i}"),
               "from_date": from_date.to_string(), "to_date": to_date.to_string(), "status": "paid",
               "currency": "CAD", "fees_amount_cents": flat + usage, "taxes_amount_cents": tax,
               "total_amount_cents": flat + usage + tax,
               "lines": [{"kind": "plan", "description": "P", "units": "1", "unit_amount": "19",
                          "amount_cents": flat},
                         {"kind": "usage", "description": "CPU (h)", "units": "106.6667",
                          "unit_amount": rate, "amount_cents": usage}]}),
    ))
}

async fn measure(cluster: &EmbeddedPostgres, options: &ReconcileBench) -> anyhow::Result<()> {
    let (n, m) = (options.subscriptions, options.events_per_period.max(1));
    println!(
        "reconcile benchmark: {n} subscriptions × 3 periods × {m} usage events, machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let setup = Instant::now();
    let pool = pool_options(CLIENTS as u32 + 8)
        .connect_with(cluster.connect_options())
        .await?;
    MIGRATOR.run(&pool).await?;
    let admin_key = uuid::Uuid::new_v4().to_string();
    let window = chrono::Duration::days(400);
    let settings = Settings {
        usage_limits: aggregates::usage::UsageLimits {
            acceptance_window: window,
            ..Default::default()
        },
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
            .context("day 1")?
            .and_hms_opt(0, 0, 0)
            .context("midnight")?,
    );
    let months: Vec<chrono::DateTime<Utc>> =
        (0..=3).rev().map(|m| this_month - Months::new(m)).collect();
    let key = setup_catalog(&http, &ledger.base_url, &admin_key, n, months[0]).await?;
    // A day's CPU at a time: 420,000 CPU-s a month in all.
    let per_event = rust_decimal::Decimal::from(420_000) / rust_decimal::Decimal::from(m as u64);
    let progress = Progress::events("usage over HTTP", (3 * n * m) as u64);
    for (month, start) in months.iter().take(3).enumerate() {
        let all: Vec<(usize, usize)> = (0..n).flat_map(|i| (0..m).map(move |e| (i, e))).collect();
        let tasks: Vec<_> = all
            .chunks(all.len().div_ceil(CLIENTS).max(1))
            .map(|mine| {
                let (http, base, key) = (http.clone(), ledger.base_url.clone(), key.clone());
                let progress = progress.clone();
                let mine = mine.to_vec();
                let start = *start;
                tokio::spawn(async move {
                    for chunk in mine.chunks(100) {
                        let events: Vec<Value> = chunk
                            .iter()
                            .map(|(i, e)| {
                                let at = start + chrono::Duration::minutes(60 * 20 * *e as i64 + 1);
                                json!({"transaction_id": format!("m{month}-{e}"),
                                       "external_subscription_id": format!("dep_{i}"),
                                       "code": "cpu_seconds", "timestamp": at.timestamp(),
                                       "properties": {"cpu_seconds": per_event.to_string()}})
                            })
                            .collect();
                        post(
                            &http,
                            format!("{base}/api/v1/events/batch"),
                            &key,
                            json!({ "events": events }),
                        )
                        .await?;
                        progress.advance(chunk.len() as u64);
                    }
                    Ok::<(), anyhow::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
    }
    progress.finish();
    ProjectionRunner::for_all(pool.clone())
        .await?
        .catch_up()
        .await?;
    ledger.stop().await;
    let mut invoices = 0;
    for end in &months[1..] {
        let closed = crate::invoicing::closer::close_due(
            &pool,
            Some("bench"),
            window,
            *end + chrono::Duration::seconds(1),
        )
        .await?;
        invoices += closed.finalized;
    }
    let mut importer = Importer::new(
        &pool,
        ImportSettings {
            service: "bench".into(),
            dry_run: false,
            apply_changes: false,
            options: json!({"door": "bench"}),
            by: "bench".into(),
        },
    )
    .await?;
    for (month, start) in months.iter().take(3).enumerate() {
        let from = start.date_naive();
        let to = months[month + 1].date_naive() - chrono::Duration::days(1);
        for i in 0..n {
            if let Some(record) = actual(i, month, from, to) {
                importer.add("invoices", record).await?;
            }
            if i % 100 == 0 {
                let one_off = SourceRecord::new(
                    RecordType::ExternalInvoice,
                    "bench",
                    format!("fee_{i}_{month}"),
                    json!({"number": format!("F-{i}-{month}"), "external_customer_id": "c",
                           "external_subscription_id": null, "from_date": from.to_string(),
                           "to_date": from.to_string(), "status": "paid", "currency": "CAD",
                           "fees_amount_cents": 2500, "taxes_amount_cents": 325,
                           "total_amount_cents": 2825, "lines": []}),
                );
                importer.add("invoices", one_off).await?;
            }
        }
    }
    let imported = importer.finish().await?;
    let runner = ProjectionRunner::for_all(pool.clone()).await?;
    runner.catch_up().await?;
    sqlx::query("VACUUM (ANALYZE)").execute(&pool).await?;
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    println!(
        "set-up: {events} events in the log ({invoices} invoices, {} source records), {:.1} s",
        imported.counts.values().map(|c| c.new).sum::<u64>(),
        setup.elapsed().as_secs_f64()
    );

    let mut reference = Vec::new();
    for decoded in [true, false] {
        raw_read(&pool, decoded).await?;
        let started = Instant::now();
        let read = raw_read(&pool, decoded).await?;
        reference.push((read, started.elapsed().as_secs_f64()));
    }

    println!(
        "{:<66} {:>9} {:>12} {:>9}",
        "measure", "seconds", "rows/s", "goal"
    );
    let period = format!("{:04}-{:02}", months[1].year(), months[1].month());
    let started = Instant::now();
    let report = reconcile(
        &pool,
        &ReconcileRequest {
            period: period.clone(),
            service: Some("bench".into()),
            ..Default::default()
        },
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{:<66} {seconds:>9.2} {:>12.0} {:>9}",
        format!(
            "reconcile {period} ({} rows, causes included)",
            report.rows.len()
        ),
        report.rows.len() as f64 / seconds.max(1e-9),
        "< 5 s"
    );
    for ((read, raw), name) in reference.iter().zip([
        "raw read of the rows it decodes (reference 1)",
        "raw read of every log row, as its runner reads (reference 2)",
    ]) {
        println!(
            "{name:<66} {raw:>9.2} {:>12.0} {:>9}",
            *read as f64 / raw.max(1e-9),
            ""
        );
    }
    let rebuilder = ProjectionRunner::for_all(pool.clone()).await?.rebuilding();
    let projection = rebuilder
        .projections()
        .find(|p| p.name() == "reconciliation")
        .expect("known");
    let started = Instant::now();
    projection_runner::reset(&pool, projection).await?;
    let applied = rebuilder.catch_up_one(projection).await?;
    let rebuilt = started.elapsed().as_secs_f64();
    println!(
        "{:<66} {rebuilt:>9.2} {:>12.0} {:>9}",
        format!(
            "rebuild reconciliation in place ({:.2}× ref. 1, {:.2}× ref. 2)",
            reference[0].1 / rebuilt.max(1e-9),
            reference[1].1 / rebuilt.max(1e-9)
        ),
        applied as f64 / rebuilt.max(1e-9),
        "≥ 0.5×"
    );
    let s = &report.summary;
    println!(
        "rows of {period}: {}; causes: {}",
        s.statuses
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.causes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("peak RSS: {} MiB", peak_rss_mib());
    Ok(())
}
