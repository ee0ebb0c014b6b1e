//! `ledger bench webhooks`: delivering the outbox to a local receiver.
//!
//! On a throwaway embedded cluster (durable settings) it creates N monthly
//! subscriptions over HTTP, an endpoint for `invoice.created` and
//! `invoice.payment_status_updated` pointing at a receiver in this process
//! (loopback allowed), and closes last month: N finalized invoices. Then:
//!
//! 1. **Backlog**: the ledger (projection runner + dispatcher, as `ledger
//!    serve` runs them) starts with N messages to fold and deliver (the
//!    other read models already hold the invoices); timed from its start to
//!    the last message received: messages/s. Beside it,
//!    the reference: the same N bodies POSTed raw to the same receiver with
//!    the same concurrency (no database, no signing).
//! 2. **Steady state**: with the ledger running, payments are recorded at a
//!    steady rate (`--rate` per second); each one's latency is from its
//!    event's commit (the log's `recorded_at`) to its receipt: p50 and p99.
//!
//! Peak RSS is printed beside the figures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use aggregates::invoice::{PaymentSource, PaymentStatus, PaymentUpdate};
use aggregates::webhook_endpoint::{WebhookEndpointCommand, WebhookEndpointInput};
use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};

use crate::app::{Application, BackgroundTasks, Settings};
use crate::event_log::store::{self, CommandMetadata};
use crate::http::admin::AdminKey;
use crate::payments::{self, PaymentFact};
use crate::postgres::embedded::EmbeddedPostgres;
use crate::tools::bench::close::backfill;
use crate::tools::bench::{peak_rss_mib, Throwaway};
use crate::webhooks::address::AddressPolicy;

/// What to measure.
#[derive(Debug, Clone)]
pub struct WebhooksBench {
    /// Where the throwaway cluster lives.
    pub data_dir: std::path::PathBuf,
    /// Finalized invoices whose messages are delivered.
    pub invoices: usize,
    /// Payments recorded per second in the steady-state phase.
    pub rate: usize,
    /// Seconds of steady state.
    pub seconds: u64,
}

/// Run the benchmark and print its table.
pub async fn run(options: WebhooksBench) -> anyhow::Result<()> {
    let cluster = Throwaway::start(&options.data_dir, "bench-webhooks", 100).await?;
    let result = measure(&cluster.cluster, &options).await;
    cluster.remove().await?;
    result
}

/// When each message id was received.
type Receipts = Arc<Mutex<HashMap<String, DateTime<Utc>>>>;

async fn receiver(receipts: Receipts) -> anyhow::Result<String> {
    let app = axum::Router::new().fallback(move |headers: HeaderMap, _body: Bytes| {
        let receipts = receipts.clone();
        async move {
            let at = Utc::now();
            if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
                receipts
                    .lock()
                    .expect("receipts")
                    .insert(id.to_string(), at);
            }
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn wait_for(receipts: &Receipts, count: usize, limit: StdDuration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while receipts.lock().expect("receipts").len() < count {
        if Instant::now() > deadline {
            bail!(
                "only {} of {count} messages arrived within {limit:?}",
                receipts.lock().expect("receipts").len()
            );
        }
        tokio::time::sleep(StdDuration::from_millis(5)).await;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn measure(cluster: &EmbeddedPostgres, options: &WebhooksBench) -> anyhow::Result<()> {
    let n = options.invoices;
    let setup = Instant::now();
    let backfilled = backfill(cluster, n, 0).await?;
    let pool = backfilled.pool.clone();
    let receipts: Receipts = Default::default();
    let url = receiver(receipts.clone()).await?;
    let endpoint = uuid::Uuid::new_v4();
    let command = WebhookEndpointCommand::Create {
        lago_id: endpoint,
        input: WebhookEndpointInput {
            webhook_url: Some(url.clone()),
            signature_algo: None,
            event_types: Some(vec![
                "invoice.created".into(),
                "invoice.payment_status_updated".into(),
            ]),
        },
        secret: crate::webhooks::signing::generate_secret(),
        at: Utc::now(),
    };
    let handler = store::command_handler::<aggregates::WebhookEndpoint>(&pool);
    store::execute(
        &handler,
        &format!("bench/{endpoint}"),
        command,
        CommandMetadata::cli(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = crate::invoicing::closer::close_due(
        &pool,
        Some("bench"),
        backfilled.window,
        backfilled.this_month + chrono::Duration::seconds(1),
    )
    .await?;
    if report.finalized != n {
        bail!(
            "expected {n} invoices, the closer finalized {}",
            report.finalized
        );
    }
    // The other read models fold the invoices whatever webhooks do: bring
    // them up to date first, so the clock measures the outbox alone.
    crate::event_log::projection_runner::ProjectionRunner::for_all(pool.clone())
        .await?
        .apply_readable_of(|p| p.name() != "webhooks")
        .await?;
    println!("webhooks benchmark: {n} finalized invoices, one endpoint on loopback");
    println!(
        "set-up (catalog, subscriptions over HTTP, closing): {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // 1. The backlog: fold and deliver N messages.
    let settings = Settings {
        providers: crate::http::Providers {
            webhook_addresses: AddressPolicy::parse(&["127.0.0.0/8".into()])
                .map_err(anyhow::Error::msg)?,
            ..Default::default()
        },
        dispatch_interval: StdDuration::from_millis(20),
        ..Settings::local(
            Some(AdminKey::new(&uuid::Uuid::new_v4().to_string())),
            BackgroundTasks {
                projections: true,
                webhooks: true,
                ..BackgroundTasks::NONE
            },
        )
    };
    let started = Instant::now();
    let ledger = Application::build(pool.clone(), settings).await?.spawn()?;
    let folded = loop {
        let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_messages")
            .fetch_one(&pool)
            .await?;
        if messages as usize >= n {
            break started.elapsed();
        }
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    };
    wait_for(&receipts, n, StdDuration::from_secs(600)).await?;
    let backlog = started.elapsed();

    // The reference: the same bodies POSTed raw, 64 at a time.
    let bodies: Vec<String> =
        sqlx::query_scalar("SELECT body FROM webhook_messages ORDER BY position")
            .fetch_all(&pool)
            .await?;
    let raw_receipts: Receipts = Default::default();
    let raw_url = receiver(raw_receipts.clone()).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    let bodies = Arc::new(bodies);
    for worker in 0..64 {
        let (client, url, bodies) = (client.clone(), raw_url.clone(), bodies.clone());
        sends.spawn(async move {
            for (i, body) in bodies.iter().enumerate().skip(worker).step_by(64) {
                client
                    .post(&url)
                    .header("webhook-id", i.to_string())
                    .body(body.clone())
                    .send()
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = sends.join_next().await {
        done.context("a raw sender")??;
    }
    let raw = started.elapsed();

    // 2. Steady state: payments at a fixed rate, latency commit → receipt.
    let streams: Vec<String> = sqlx::query_scalar(
        "SELECT stream_id FROM invoices WHERE status = 'finalized' ORDER BY issued_at, stream_id",
    )
    .fetch_all(&pool)
    .await?;
    let payments_total = (options.rate * options.seconds as usize).min(streams.len());
    let interval = StdDuration::from_secs_f64(1.0 / options.rate.max(1) as f64);
    let mut ticker = tokio::time::interval(interval);
    let before = receipts.lock().expect("receipts").len();
    for stream in streams.iter().take(payments_total) {
        ticker.tick().await;
        let fact = PaymentFact::Status(PaymentUpdate {
            status: PaymentStatus::Succeeded,
            occurred_at: Utc::now(),
            source: PaymentSource::Api,
            failure: None,
            provider_customer_id: None,
        });
        payments::record(&pool, stream, &fact, CommandMetadata::cli()).await?;
    }
    wait_for(
        &receipts,
        before + payments_total,
        StdDuration::from_secs(120),
    )
    .await?;
    ledger.stop().await;
    let committed: Vec<(uuid::Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT m.id, e.recorded_at FROM webhook_messages m JOIN events e ON e.position = m.position \
         WHERE m.webhook_type = 'invoice.payment_status_updated'",
    )
    .fetch_all(&pool)
    .await?;
    let receipts = receipts.lock().expect("receipts").clone();
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| {
            receipts
                .get(&id.to_string())
                .map(|received| (*received - *at).num_microseconds().unwrap_or(0) as f64 / 1_000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&pool)
            .await?;

    println!("{:<64} {:>12}", "measure", "figure");
    println!(
        "{:<64} {:>12.0}",
        format!("backlog: {n} messages folded, signed, delivered (msg/s, goal ≥ 1,000)"),
        n as f64 / backlog.as_secs_f64()
    );
    println!(
        "{:<64} {:>12.0}",
        "  of which folding the log into the outbox (msg/s)",
        n as f64 / folded.as_secs_f64()
    );
    println!(
        "{:<64} {:>12.0}",
        "reference: the same bodies POSTed raw, 64 in flight (msg/s)",
        n as f64 / raw.as_secs_f64()
    );
    println!(
        "{:<64} {:>12.1}",
        format!(
            "steady state, {} payments at {}/s: latency p50 (ms)",
            latencies.len(),
            options.rate
        ),
        percentile(&latencies, 0.50)
    );
    println!(
        "{:<64} {:>12.1}",
        "steady state: latency p99 (ms, goal < 1,000)",
        percentile(&latencies, 0.99)
    );
    println!(
        "delivered in all: {delivered}; peak RSS of the ledger process: {} MiB",
        peak_rss_mib()
    );
    pool.close().await;
    Ok(())
}
