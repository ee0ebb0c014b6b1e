//! `ledger bench rebuild`: rebuilding the usage and invoices projections
//! from a log of a million usage events, beside a raw sequential read of the
//! same rows; and `ledger verify` on that log.
//!
//! On a throwaway embedded cluster (durable settings) it records N × M usage
//! events through the HTTP API (the set-up of `bench close`), closes last
//! month (N invoices), then measures, in one run: a raw read of every event
//! row in log order (the columns a projection reads, as text, streamed); the
//! in-place rebuild of `usage` and of `invoices` (reset, then replay the
//! whole log — what `ledger projections rebuild` does); both rebuilt side by
//! side in one pass (`--into`); sealing and verifying the log. Peak RSS is
//! printed with the figures.

use std::time::Instant;

use futures_util::TryStreamExt;

use crate::event_log::projection_runner::{self, rebuild_into, ProjectionRunner};
use crate::postgres::embedded::EmbeddedPostgres;
use crate::tools::bench::close::{backfill, Backfilled};
use crate::tools::bench::{peak_rss_mib, Throwaway};
use projections::Projection;

/// What to measure.
#[derive(Debug, Clone)]
pub struct RebuildBench {
    /// Where the throwaway cluster lives.
    pub data_dir: std::path::PathBuf,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Usage events per subscription.
    pub events_per_subscription: usize,
}

/// Run the benchmark and print its table.
pub async fn run(options: RebuildBench) -> anyhow::Result<()> {
    let cluster = Throwaway::start(&options.data_dir, "bench-rebuild", 100).await?;
    let result = measure(&cluster.cluster, &options).await;
    cluster.remove().await?;
    result
}

/// Every event row, the columns a projection reads, as text, streamed, in
/// storage order (a sequential scan: the fastest read PostgreSQL offers; the
/// log order through its index, or sorted, is slower); returns how many.
async fn raw_read(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    let mut rows = sqlx::query_as::<_, (i64, String, String, String, String, String)>(
        "SELECT position, aggregate_type, aggregate_id, event_type, payload::text, metadata::text \
         FROM events",
    )
    .fetch(pool);
    let mut read = 0i64;
    while rows.try_next().await?.is_some() {
        read += 1;
    }
    Ok(read)
}

fn rate(events: i64, seconds: f64) -> f64 {
    events as f64 / seconds.max(1e-9)
}

async fn measure(cluster: &EmbeddedPostgres, options: &RebuildBench) -> anyhow::Result<()> {
    let (n, m) = (options.subscriptions, options.events_per_subscription);
    println!(
        "rebuild benchmark: {n} subscriptions × {m} usage events, machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let setup = Instant::now();
    let Backfilled {
        pool,
        window,
        this_month,
        ..
    } = backfill(cluster, n, m).await?;
    let runner = ProjectionRunner::for_all(pool.clone()).await?;
    let closed = crate::invoicing::closer::close_due(
        &pool,
        None,
        window,
        this_month + chrono::Duration::seconds(1),
    )
    .await?;
    runner.catch_up().await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    println!(
        "set-up: {events} events in the log ({} invoices), {:.1} s",
        closed.finalized,
        setup.elapsed().as_secs_f64()
    );

    // A first, untimed pass warms the caches for the reference and the
    // rebuilds alike (the first read after the set-up's vacuum was up to
    // three times slower than the next).
    raw_read(&pool).await?;
    let started = Instant::now();
    let read = raw_read(&pool).await?;
    let raw = started.elapsed().as_secs_f64();
    let raw_rate = rate(read, raw);

    println!(
        "{:<58} {:>9} {:>12} {:>7}",
        "measure", "seconds", "events/s", "vs raw"
    );
    let row = |name: &str, seconds: f64, count: i64| {
        let r = rate(count, seconds);
        println!("{name:<58} {seconds:>9.2} {r:>12.0} {:>7.2}", r / raw_rate);
    };
    row(
        "raw sequential read of every event row (reference)",
        raw,
        read,
    );
    let rebuilder = ProjectionRunner::for_all(pool.clone()).await?.rebuilding();
    for name in ["usage", "invoices"] {
        let projection = rebuilder
            .projections()
            .find(|p| p.name() == name)
            .expect("known");
        let started = Instant::now();
        projection_runner::reset(&pool, projection).await?;
        let applied = rebuilder.catch_up_one(projection).await? as i64;
        row(
            &format!("rebuild {name} in place"),
            started.elapsed().as_secs_f64(),
            applied,
        );
    }
    let both: Vec<&dyn Projection> = runner
        .projections()
        .filter(|p| ["usage", "invoices"].contains(&p.name()))
        .collect();
    let started = Instant::now();
    let (applied, _) = rebuild_into(&pool, &both, "bench_rebuilt").await?;
    row(
        "rebuild usage + invoices side by side (one pass)",
        started.elapsed().as_secs_f64(),
        applied as i64,
    );
    let started = Instant::now();
    crate::event_log::tamper::seal(&pool).await?;
    row("seal the log", started.elapsed().as_secs_f64(), events);
    let started = Instant::now();
    let verified = crate::event_log::tamper::verify(&pool, 0).await?;
    row(
        "verify the log (chains and seals)",
        started.elapsed().as_secs_f64(),
        verified.events_checked,
    );
    if let Some(broken) = verified.first_break {
        anyhow::bail!("the fresh log does not verify: {broken:?}");
    }
    println!("peak RSS of the ledger process: {} MiB", peak_rss_mib());
    pool.close().await;
    Ok(())
}
