//! Explaining an invoice: every fee's events and arithmetic, adjustments
//! included, through the operator API.

use aggregates::usage::UsageLimits;
use chrono::Duration;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{close, spawn_app_with_limits, ServiceClient, TestApp};

async fn usage(svc: &ServiceClient<'_>, tx: &str, at: &str, seconds: &str) {
    svc.created(
        "/events",
        json!({"event": {"transaction_id": tx, "external_subscription_id": "dep_1", "code": "cpu_seconds",
               "timestamp": at.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp(),
               "properties": {"cpu_seconds": seconds}}}),
    )
    .await;
}

async fn explain(app: &TestApp, invoice: &Value) -> Value {
    let (status, body) = app
        .get_admin(&format!(
            "/admin/v1/invoices/{}/explain",
            invoice["lago_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["invoice_explanation"].clone()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[sqlx::test]
async fn an_invoice_is_explained_fee_by_fee_down_to_its_events(pool: PgPool) {
    let limits = UsageLimits {
        acceptance_window: Duration::days(3650),
        ..Default::default()
    };
    let app = spawn_app_with_limits(pool, limits).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
               "external_id": "dep_1", "subscription_at": "2026-09-01T04:00:00Z"}}),
    )
    .await;
    usage(&svc, "a", "2026-09-20T12:00:00Z", "400000").await;
    usage(&svc, "b", "2026-09-30T12:00:00Z", "20000").await;
    close(&app, "2026-10-02T00:00:00Z").await;
    usage(&svc, "late", "2026-09-30T13:00:00Z", "7200").await;
    close(&app, "2026-11-02T00:00:00Z").await;
    let (_, body) = svc.get("/invoices").await;
    let (october, september) = (&body["invoices"][0], &body["invoices"][1]);

    let explained = explain(&app, september).await;
    assert_eq!(explained["number"], "NEXACLOUD-000001");
    let flat = &explained["fees"][0];
    assert_eq!(
        strings(&flat["arithmetic"])[1..],
        [
            "1900 × 30 days ÷ 30 days = 19 CAD",
            "rounded half-up: 1900 minor units"
        ]
    );
    let cpu = &explained["fees"][1];
    assert_eq!(cpu["charge"]["charge_model"], "standard");
    assert_eq!(
        cpu["charge"]["billable_metric"]["aggregation_type"],
        "sum_agg"
    );
    let events: Vec<(String, String)> = cpu["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["transaction_id"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("a".to_string(), "400000".to_string()),
            ("b".to_string(), "20000".to_string())
        ],
        "the late event came after this invoice's log position"
    );
    assert!(cpu["events"][0]["position"].as_i64().unwrap() > 0);
    assert_eq!(
        strings(&cpu["arithmetic"]),
        [
            "units = sum of the values over 2 events = 420000",
            "standard: max(units − free_units, 0) × amount ÷ unit_size = max(420000 − 36000, 0) × 0.0075 ÷ 3600 = 0.8",
            "rounded half-up: 80 minor units",
        ]
    );
    assert_eq!(
        strings(&cpu["tax_arithmetic"]),
        ["hst_on: 80 × 13% = 10.4 → 10 (half-up to the minor unit)"]
    );
    assert_eq!(
        explained["totals"]["total_amount_cents"],
        1900 + 80 + 247 + 10
    );

    // October: the late event is explained as an adjustment of September.
    let explained = explain(&app, october).await;
    let adjustment = explained["fees"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fee_type"] == "adjustment")
        .unwrap();
    let late: Vec<bool> = adjustment["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["late"].as_bool().unwrap())
        .collect();
    assert_eq!(late, vec![false, false, true]);
    let arithmetic = strings(&adjustment["arithmetic"]);
    assert_eq!(
        arithmetic[0],
        "units = sum of the values over 3 events = 427200"
    );
    assert!(
        arithmetic[1].ends_with("420000 units → 0.8 → 80 minor units"),
        "{}",
        arithmetic[1]
    );
    // 391,200 s over the quota: $0.815 → 82¢.
    assert_eq!(
        arithmetic[3],
        "adjustment = 82 − 80 = 2 minor units (precise 0.015)"
    );
    assert_eq!(adjustment["amount_cents"], 2);

    let (status, body) = app
        .get_admin(&format!("/admin/v1/invoices/{}/explain", uuid::Uuid::nil()))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("invoice_not_found"))
    );
    let path = format!(
        "/admin/v1/invoices/{}/explain",
        september["lago_id"].as_str().unwrap()
    );
    let (status, _) = app.get(&path, Some(&svc.key)).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a service key does not reach the operator API"
    );
}
