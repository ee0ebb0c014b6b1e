//! Period replay: recomputed from the log alone, it reproduces finalized
//! invoices to the cent as of their recorded position, and shows what late
//! usage changed when replayed later; nothing live is written.

use aggregates::usage::UsageLimits;
use chrono::Duration;
use ledger::invoicing::replay::{replay, AsOf, Difference, ReplayRequest};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{close, spawn_app_with_limits, ServiceClient, TestApp};

async fn usage(svc: &ServiceClient<'_>, tx: &str, sub: &str, at: &str, seconds: &str) {
    svc.created(
        "/events",
        json!({"event": {"transaction_id": tx, "external_subscription_id": sub, "code": "cpu_seconds",
               "timestamp": at.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp(),
               "properties": {"cpu_seconds": seconds}}}),
    )
    .await;
}

fn request(period: &str, as_of: Option<AsOf>) -> ReplayRequest {
    ReplayRequest {
        period: period.into(),
        service: Some("nexacloud".into()),
        subscription: None,
        as_of,
        pricing: None,
    }
}

/// NexaCloud's catalog and two subscriptions of one customer from
/// 2026-09-13 10:00 Toronto time; usage as old as needed is accepted.
async fn two_subscriptions(pool: PgPool) -> (TestApp, String) {
    let limits = UsageLimits {
        acceptance_window: Duration::days(3650),
        ..Default::default()
    };
    let app = spawn_app_with_limits(pool, limits).await;
    let key = {
        let svc = app.service("nexacloud").await;
        svc.nexacloud_catalog().await;
        for sub in ["dep_1", "dep_2"] {
            svc.created(
                "/subscriptions",
                json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                       "external_id": sub, "subscription_at": "2026-09-13T14:00:00Z"}}),
            )
            .await;
        }
        svc.key.clone()
    };
    (app, key)
}

#[sqlx::test]
async fn a_replayed_period_matches_to_the_cent_and_shows_what_late_usage_changed(pool: PgPool) {
    let (app, key) = two_subscriptions(pool).await;
    let svc = ServiceClient { app: &app, key };
    usage(&svc, "a", "dep_1", "2026-09-20T12:00:00Z", "400000").await;
    usage(&svc, "b", "dep_1", "2026-09-30T12:00:00Z", "20000").await;
    usage(&svc, "a", "dep_2", "2026-09-21T12:00:00Z", "38400").await;
    close(&app, "2026-10-02T00:00:00Z").await;
    usage(&svc, "late", "dep_1", "2026-09-30T13:00:00Z", "7200").await;
    close(&app, "2026-11-02T00:00:00Z").await;
    let invoices_before: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    // As of each invoice's own log position: identical, to the cent.
    let september = replay(&app.pool, &request("2026-09", None)).await.unwrap();
    assert_eq!(september.invoices.len(), 2);
    assert_eq!(september.differences, vec![]);
    let mut totals: Vec<(String, i64, i64)> = september
        .invoices
        .iter()
        .map(|i| {
            (
                i.external_subscription_id.clone(),
                i.recorded_total_cents,
                i.replayed_total_cents,
            )
        })
        .collect();
    totals.sort();
    // dep_1: 1140 + 80 + 148 + 10; dep_2: 1140 + 1 + 148 + 0.
    assert_eq!(
        totals,
        vec![
            ("dep_1".to_string(), 1378, 1378),
            ("dep_2".to_string(), 1289, 1289)
        ]
    );
    // October, with September's late usage as an adjustment: identical too.
    let october = replay(&app.pool, &request("2026-10", None)).await.unwrap();
    assert_eq!(october.invoices.len(), 2);
    assert_eq!(october.differences, vec![]);
    assert!(october
        .invoices
        .iter()
        .flat_map(|i| &i.fees)
        .any(|f| f.fee == "adjustment cpu_seconds" && f.recorded_cents == Some(2)));

    // As of now: September's dep_1 would have billed the late event too.
    let latest: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let later = replay(&app.pool, &request("2026-09", Some(AsOf::Position(latest))))
        .await
        .unwrap();
    assert_eq!(
        later.differences,
        vec![Difference {
            service: "nexacloud".into(),
            external_subscription_id: "dep_1".into(),
            number: later
                .invoices
                .iter()
                .find(|i| i.external_subscription_id == "dep_1")
                .unwrap()
                .number
                .clone(),
            fee: "charge cpu_seconds [2026-09-13T14:00:00Z, 2026-10-01T04:00:00Z)".into(),
            expected_cents: 82,
            recorded_cents: 80,
        }]
    );

    // The same over the operator API.
    let (status, body) = app
        .get_admin(&format!(
            "/admin/v1/replay?period=2026-09&service=nexacloud&as_of={latest}"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replay"]["differences"][0]["expected_cents"], 82);
    assert_eq!(body["replay"]["differences"][0]["recorded_cents"], 80);
    let (status, body) = app.get_admin("/admin/v1/replay?period=September").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error_details"]["period"][0], "value_is_invalid");
    // A position the log does not have is the `as_of` field's fault.
    let (status, body) = app
        .get_admin("/admin/v1/replay?period=2026-09&as_of=999999999")
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error_details"]["as_of"][0], "value_is_invalid");

    // Nothing live was written; the scratch schemas are gone.
    let invoices_after: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(invoices_after, invoices_before);
    let scratch: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'replay_%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(scratch, 0);
}

#[sqlx::test]
async fn a_what_if_price_book_shows_each_subscriptions_and_the_total_difference(pool: PgPool) {
    let (app, key) = two_subscriptions(pool).await;
    let svc = ServiceClient { app: &app, key };
    usage(&svc, "a", "dep_1", "2026-09-20T12:00:00Z", "420000").await;
    close(&app, "2026-10-02T00:00:00Z").await;

    let book: ledger::invoicing::replay::PriceBook =
        serde_json::from_value(json!({"plans": [{"code": "starter", "amount_cents": 2100}]}))
            .unwrap();
    let what_if = replay(
        &app.pool,
        &ReplayRequest {
            pricing: Some(book),
            ..request("2026-09", None)
        },
    )
    .await
    .unwrap();
    assert!(what_if.what_if);
    // $21.00 × 18/30 = $12.60 instead of $11.40, on both subscriptions.
    let mut changes: Vec<(String, String, i64, i64)> = what_if
        .differences
        .iter()
        .map(|d| {
            (
                d.external_subscription_id.clone(),
                d.fee.split(' ').take(2).collect::<Vec<_>>().join(" "),
                d.recorded_cents,
                d.expected_cents,
            )
        })
        .collect();
    changes.sort();
    assert_eq!(
        changes,
        vec![
            ("dep_1".into(), "subscription starter".into(), 1140, 1260),
            ("dep_2".into(), "subscription starter".into(), 1140, 1260),
        ]
    );
    // Billed: (1140 + 80 + 148 + 10) + (1140 + 0 + 148 + 0) = 2666.
    // What if: (1260 + 80 + 164 + 10) + (1260 + 0 + 164 + 0) = 2938.
    assert_eq!(
        (what_if.recorded_total_cents, what_if.replayed_total_cents),
        (2666, 2938)
    );
    // A price book is validated like the plan API.
    let bad: ledger::invoicing::replay::PriceBook =
        serde_json::from_value(json!({"plans": [{"code": "starter", "interval": "fortnightly"}]}))
            .unwrap();
    let refused = replay(
        &app.pool,
        &ReplayRequest {
            pricing: Some(bad),
            ..request("2026-09", None)
        },
    )
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("interval"), "{refused}");
}
