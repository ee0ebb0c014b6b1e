//! Metrics in Prometheus' text format (`GET /metrics`, behind the operator
//! key, or on `--metrics-listen` alone).
//!
//! Counters and histograms are recorded where things happen (requests,
//! usage appends, projection batches, closer passes, seals, verifications)
//! and kept by one process-wide recorder; what the database knows
//! (checkpoints and lag, quarantined subscriptions, the last seal) and the
//! connection pool are read when the metrics are scraped, so every
//! `ledger serve` beside the same database reports the same values for them.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use aggregates::closing::CloseReport;

/// Request latency buckets (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Group-append size buckets (events or appends per statement).
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's recorder, installed on first use (`None` if another
/// recorder was installed first: nothing is then recorded here).
pub fn recorder() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Prefix("ledger_usage_append_group".to_string()),
                        GROUP_BUCKETS,
                    )
                });
            let handle = builder.ok()?.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!(
        "ledger_http_requests_total",
        "HTTP requests answered, by route, method and status"
    );
    describe_histogram!(
        "ledger_http_request_duration_seconds",
        "HTTP request latency, by route and method"
    );
    describe_counter!(
        "ledger_usage_events_total",
        "Usage events sent, by service and result (recorded, retry, conflict, refused)"
    );
    describe_histogram!(
        "ledger_usage_append_group_events",
        "Usage events per shared append statement"
    );
    describe_histogram!(
        "ledger_usage_append_group_appends",
        "Requests' appends per shared append statement"
    );
    describe_counter!(
        "ledger_projection_events_applied_total",
        "Log events applied (walked) by this process, by projection"
    );
    describe_gauge!(
        "ledger_projection_checkpoint_position",
        "The log position of a projection's checkpoint"
    );
    describe_gauge!(
        "ledger_projection_lag_events",
        "Committed events after a projection's checkpoint (counted up to 100,000)"
    );
    describe_counter!(
        "ledger_closer_passes_total",
        "Period closer passes, by result (ok, failed)"
    );
    describe_counter!(
        "ledger_invoices_total",
        "Invoices by what the closer did (drafted: left for a grace period; finalized; refused)"
    );
    describe_gauge!(
        "ledger_quarantined_subscriptions",
        "Subscriptions the closer could not bill"
    );
    describe_counter!("ledger_log_seals_total", "Seals this process wrote");
    describe_gauge!(
        "ledger_log_sealed_position",
        "The log position of the latest seal's own event (0: none)"
    );
    describe_counter!(
        "ledger_log_verifications_total",
        "Log verifications, by result (intact, broken)"
    );
    describe_gauge!(
        "ledger_db_pool_connections",
        "Database pool connections, by state (in_use, idle, max)"
    );
}

/// Record one answered request (the route is the router's pattern, never
/// the path: ids stay out of the labels).
pub async fn track_requests(request: Request<Body>, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let seconds = started.elapsed().as_secs_f64();
    counter!("ledger_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    histogram!("ledger_http_request_duration_seconds", "route" => route, "method" => method)
        .record(seconds);
    response
}

/// What became of sent usage events.
#[derive(Debug, Clone, Copy)]
pub enum UsageResult {
    /// Appended now.
    Recorded,
    /// A safe retry of an event already recorded.
    Retry,
    /// A retry whose content differs from the recorded event.
    Conflict,
    /// Refused with the rest of its request (invalid, or beside a conflict).
    Refused,
}

/// `events` usage events of `service` ended as `result`.
pub fn usage_events(service: &str, result: UsageResult, events: usize) {
    if events == 0 {
        return;
    }
    let result = match result {
        UsageResult::Recorded => "recorded",
        UsageResult::Retry => "retry",
        UsageResult::Conflict => "conflict",
        UsageResult::Refused => "refused",
    };
    counter!("ledger_usage_events_total", "service" => service.to_string(), "result" => result)
        .increment(events as u64);
}

/// One shared append statement carried `appends` requests' `events`.
pub fn group_append(appends: usize, events: usize) {
    histogram!("ledger_usage_append_group_appends").record(appends as f64);
    histogram!("ledger_usage_append_group_events").record(events as f64);
}

/// A batch of `projection` walked `events` events.
pub fn projection_applied(projection: &'static str, events: usize) {
    counter!("ledger_projection_events_applied_total", "projection" => projection)
        .increment(events as u64);
}

/// A closer pass ended: its report, or `None` when it failed.
pub fn closer_pass(report: Option<&CloseReport>) {
    let Some(report) = report else {
        counter!("ledger_closer_passes_total", "result" => "failed").increment(1);
        return;
    };
    counter!("ledger_closer_passes_total", "result" => "ok").increment(1);
    for (outcome, count) in [
        ("drafted", report.drafted),
        ("finalized", report.finalized),
        ("refused", report.refused),
    ] {
        counter!("ledger_invoices_total", "outcome" => outcome).increment(count as u64);
    }
}

/// The sealer wrote `seals` seals.
pub fn sealed(seals: usize) {
    counter!("ledger_log_seals_total").increment(seals as u64);
}

/// A verification of the log ended, intact or broken.
pub fn verified(intact: bool) {
    let result = if intact { "intact" } else { "broken" };
    counter!("ledger_log_verifications_total", "result" => result).increment(1);
}

/// How long the scrape-time reads may take before the scrape answers 503.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The exposition: what the database knows read now, then everything the
/// recorder holds.
pub async fn exposition(pool: &PgPool) -> Result<String, ScrapeError> {
    let recorder = recorder().ok_or(ScrapeError::NoRecorder)?;
    tokio::time::timeout(SCRAPE_TIMEOUT, read_database(pool))
        .await
        .map_err(|_| ScrapeError::Database("timed out".to_string()))?
        .map_err(|e| ScrapeError::Database(e.to_string()))?;
    let idle = pool.num_idle() as f64;
    gauge!("ledger_db_pool_connections", "state" => "in_use").set(pool.size() as f64 - idle);
    gauge!("ledger_db_pool_connections", "state" => "idle").set(idle);
    gauge!("ledger_db_pool_connections", "state" => "max")
        .set(pool.options().get_max_connections() as f64);
    recorder.run_upkeep();
    Ok(recorder.render())
}

async fn read_database(pool: &PgPool) -> Result<(), sqlx::Error> {
    for status in crate::event_log::projection_runner::status(pool).await? {
        gauge!("ledger_projection_checkpoint_position", "projection" => status.name.clone())
            .set(status.last_position as f64);
        gauge!("ledger_projection_lag_events", "projection" => status.name).set(status.lag as f64);
    }
    gauge!("ledger_quarantined_subscriptions")
        .set(crate::invoicing::quarantine::count(pool).await? as f64);
    gauge!("ledger_log_sealed_position")
        .set(crate::event_log::tamper::sealed_position(pool).await? as f64);
    Ok(())
}

/// Why a scrape could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Another recorder holds the process's metrics.
    #[error("metrics are not recorded by this process")]
    NoRecorder,
    /// The database could not be read.
    #[error("database: {0}")]
    Database(String),
}

/// `GET /metrics`: the exposition as Prometheus' text format 0.0.4.
pub async fn serve_metrics(State(pool): State<PgPool>) -> Response {
    match exposition(&pool).await {
        Ok(text) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(error) => {
            tracing::warn!(%error, "metrics scrape failed");
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(
                    serde_json::json!({"status": 503, "error": "Service Unavailable",
                                              "code": "metrics_unavailable"}),
                ),
            )
                .into_response()
        }
    }
}

/// The router `--metrics-listen` serves: `/metrics` alone, no key (for a
/// private address only Prometheus reaches).
pub fn router(pool: PgPool) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(serve_metrics))
        .with_state(pool)
}
