//! `GET /metrics` of a `ledger serve` process of its own: Prometheus' text
//! format behind the operator key, or without one on `--metrics-listen`;
//! what it counts, to the event; `promtool check metrics` accepts it.

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{address_in, LedgerProcess, ADMIN_KEY};

/// The exposition's samples: `name{label="value",…}` (labels sorted) → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample");
            let key = match series.split_once('{') {
                Some((name, labels)) => {
                    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    labels.sort();
                    format!("{name}{{{}}}", labels.join(","))
                }
                None => series.to_string(),
            };
            (key, value.parse().expect("a number"))
        })
        .collect()
}

async fn scrape(client: &reqwest::Client, url: &str, key: Option<&str>) -> (StatusCode, String) {
    let mut request = client.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

fn promtool_check(exposition: &str) -> (bool, String) {
    use std::io::Write;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (from Debian's prometheus package; scripts/test provides it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn usage(transaction_id: &str, subscription: &str, seconds: i64) -> serde_json::Value {
    json!({"transaction_id": transaction_id, "external_subscription_id": subscription,
           "code": "cpu_seconds", "timestamp": (Utc::now() - Duration::minutes(5)).timestamp(),
           "properties": {"cpu_seconds": seconds}})
}

#[sqlx::test]
async fn metrics_count_requests_usage_projections_and_verifications_and_pass_promtool(
    pool: PgPool,
) {
    let mut ledger = LedgerProcess::start(
        &pool,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--close-interval-seconds",
            "1",
        ],
    )
    .await;
    let metrics_url = format!(
        "http://{}/metrics",
        address_in(&ledger.wait_for_line("metrics are served").await)
    );
    let app = &ledger.app;
    let client = reqwest::Client::new();
    let svc = app.service("metricsvc").await;
    svc.nexacloud_catalog().await;
    svc.subscribe("dep_1", 10).await;

    // 3 recorded, then the same 3 retried, 1 conflicting retry, and a batch
    // of 2 refused whole for its unknown subscription.
    let batch = json!({"events": [usage("tx_1", "dep_1", 10), usage("tx_2", "dep_1", 20),
                                  usage("tx_3", "dep_1", 30)]});
    assert_eq!(
        svc.post("/events/batch", batch.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(svc.post("/events/batch", batch).await.0, StatusCode::OK);
    let (status, body) = svc
        .post("/events", json!({"event": usage("tx_1", "dep_1", 11)}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = svc
        .post(
            "/events/batch",
            json!({"events": [usage("tx_4", "dep_1", 1), usage("tx_5", "dep_nope", 1)]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // On the API's address: the operator key only.
    let on_api = format!("{}/metrics", app.address);
    assert_eq!(
        scrape(&client, &on_api, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        scrape(&client, &on_api, Some(&svc.key)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = scrape(&client, &on_api, Some(ADMIN_KEY)).await;
    assert_eq!(status, StatusCode::OK);

    let (status, verified) = app.post_admin("/admin/v1/log/verify", "").await;
    assert_eq!(status, StatusCode::OK, "{verified}");
    assert_eq!(verified["verification"]["intact"], true);

    // Once every projection has applied the whole log (its own metrics say
    // so), scrape the metrics address without a key.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (text, metrics) = loop {
        let (status, text) = scrape(&client, &metrics_url, None).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let metrics = samples(&text);
        let (events, drafted, finalized): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE event_type = 'InvoiceDrafted'), \
             count(*) FILTER (WHERE event_type = 'InvoiceFinalized') FROM events",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let projections: Vec<String> = projections::all()
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        let current = projections.iter().all(|p| {
            metrics.get(&format!(
                "ledger_projection_lag_events{{projection=\"{p}\"}}"
            )) == Some(&0.0)
                && metrics.get(&format!(
                    "ledger_projection_events_applied_total{{projection=\"{p}\"}}"
                )) == Some(&(events as f64))
        }) && metrics.contains_key("ledger_closer_passes_total{result=\"ok\"}")
            // The closer's invoices (the subscription's first period may
            // have ended already), as counted and as in the log.
            // (`drafted`: left waiting for a grace period.)
            && metrics.get("ledger_invoices_total{outcome=\"drafted\"}")
                == Some(&((drafted - finalized) as f64))
            && metrics.get("ledger_invoices_total{outcome=\"finalized\"}")
                == Some(&(finalized as f64));
        if current {
            break (text, metrics);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projections never caught up: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };

    let value = |key: &str| {
        *metrics
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
    };
    for (result, events) in [
        ("recorded", 3.0),
        ("retry", 3.0),
        ("conflict", 1.0),
        ("refused", 2.0),
    ] {
        assert_eq!(
            value(&format!(
                "ledger_usage_events_total{{result=\"{result}\",service=\"metricsvc\"}}"
            )),
            events,
            "{result}"
        );
    }
    let requests = |route: &str, method: &str, status: u16| {
        value(&format!(
            "ledger_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}}"
        ))
    };
    assert_eq!(requests("/api/v1/events/batch", "POST", 200), 2.0);
    assert_eq!(requests("/api/v1/events/batch", "POST", 422), 1.0);
    assert_eq!(requests("/api/v1/events", "POST", 422), 1.0);
    assert_eq!(requests("/metrics", "GET", 401), 2.0);
    assert_eq!(requests("/metrics", "GET", 200), 1.0);
    assert_eq!(requests("/admin/v1/log/verify", "POST", 200), 1.0);
    assert_eq!(
        value("ledger_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/events/batch\"}"),
        3.0
    );
    // The two appended statements (the retry appends nothing, but runs).
    assert_eq!(value("ledger_usage_append_group_events_count"), 2.0);
    assert_eq!(value("ledger_usage_append_group_events_sum"), 6.0);
    assert_eq!(value("ledger_usage_append_group_appends_sum"), 2.0);
    assert_eq!(
        value("ledger_log_verifications_total{result=\"intact\"}"),
        1.0
    );
    assert_eq!(value("ledger_quarantined_subscriptions"), 0.0);
    assert_eq!(value("ledger_db_pool_connections{state=\"max\"}"), 10.0);
    assert!(value("ledger_closer_passes_total{result=\"ok\"}") >= 1.0);
    assert_eq!(value("ledger_invoices_total{outcome=\"refused\"}"), 0.0);

    let (valid, said) = promtool_check(&text);
    assert!(valid && said.trim().is_empty(), "promtool: {said}");

    // A tampered row: the next verification is broken, and counted so.
    sqlx::raw_sql(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; \
         UPDATE events SET usage_value = 1 WHERE position = \
           (SELECT min(position) FROM events WHERE aggregate_type = 'Usage'); \
         ALTER TABLE events ENABLE TRIGGER events_append_only;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (status, verified) = app.post_admin("/admin/v1/log/verify", "").await;
    assert_eq!(status, StatusCode::OK, "{verified}");
    assert_eq!(verified["verification"]["intact"], false);
    let tampered: i64 =
        sqlx::query_scalar("SELECT min(position) FROM events WHERE aggregate_type = 'Usage'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        verified["verification"]["first_break"]["position"],
        tampered
    );
    let (_, text) = scrape(&client, &metrics_url, None).await;
    assert_eq!(
        samples(&text).get("ledger_log_verifications_total{result=\"broken\"}"),
        Some(&1.0)
    );
    let (status, refused) = app
        .post_admin("/admin/v1/log/verify?from_position=-1", "")
        .await;
    assert_eq!(
        (status, refused["error_details"].clone()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"from_position": ["value_is_out_of_range"]})
        )
    );
    assert!(!ledger.log().contains("panicked"));
}
