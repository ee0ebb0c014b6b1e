//! `--log-format json`: one JSON object per line; every request's line
//! carries its request id, route, latency and (for a service's key) the
//! service; nothing logs a key or the database URL's password.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{database_url, LedgerProcess, ADMIN_KEY};

#[sqlx::test]
async fn json_logs_carry_request_id_route_service_and_latency_and_never_a_secret(pool: PgPool) {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let url = database_url(&pool.connect_options()).replacen(
        "postgres://ledger@",
        &format!("postgres://ledger:{password}@"),
        1,
    );
    assert!(url.contains(&password), "{url}");
    let mut ledger =
        LedgerProcess::start(&pool, &["--log-format", "json", "--database-url", &url]).await;
    let app = &ledger.app;
    let svc = app.service("logsvc").await;
    svc.nexacloud_catalog().await;
    let (status, _) = svc
        .post("/events", json!({"event": {"transaction_id": "t1"}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = svc.get("/customers/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = app
        .client
        .get(format!("{}/api/v1/customers", app.address))
        .bearer_auth(&svc.key)
        .header("x-request-id", "req-fixed-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "req-fixed-123");
    let service_key = svc.key.clone();

    // Every line is JSON; one line per answered request (2 operator
    // requests, 4 for the catalog, the 422, the 404, the list).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let answered = loop {
        let lines: Vec<Value> = ledger
            .log()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect();
        let answered: Vec<Value> = lines
            .into_iter()
            .filter(|l| l["fields"]["message"] == "finished processing request")
            .collect();
        if answered.len() >= 9 || std::time::Instant::now() > deadline {
            break answered;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(answered.len(), 9, "{answered:#?}");
    for line in &answered {
        let span = &line["span"];
        assert!(
            span["request_id"].as_str().is_some_and(|id| !id.is_empty())
                && span["route"].as_str().is_some_and(|r| r.starts_with('/'))
                && line["fields"]["latency"].as_str().is_some(),
            "{line}"
        );
        let operator = span["route"]
            .as_str()
            .is_some_and(|r| r.starts_with("/admin/v1"));
        assert_eq!(
            span["service"],
            if operator {
                Value::Null
            } else {
                json!("logsvc")
            },
            "{line}"
        );
    }
    let fixed: Vec<&Value> = answered
        .iter()
        .filter(|l| l["span"]["request_id"] == "req-fixed-123")
        .collect();
    assert_eq!(fixed.len(), 1);
    assert_eq!(
        (
            fixed[0]["span"]["route"].clone(),
            fixed[0]["span"]["method"].clone(),
            fixed[0]["fields"]["status"].clone()
        ),
        (json!("/api/v1/customers"), json!("GET"), json!(200))
    );
    let statuses: Vec<(String, i64)> = answered
        .iter()
        .map(|l| {
            (
                l["span"]["route"].as_str().unwrap().to_string(),
                l["fields"]["status"].as_i64().unwrap(),
            )
        })
        .filter(|(_, status)| *status != 200)
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("/api/v1/events".to_string(), 422),
            ("/api/v1/customers/{external_id}".to_string(), 404)
        ]
    );

    let log = ledger.log().to_string();
    for secret in [ADMIN_KEY, service_key.as_str(), password.as_str()] {
        assert!(!log.contains(secret), "the log holds a secret");
    }
}
