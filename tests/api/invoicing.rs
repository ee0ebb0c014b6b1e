//! Invoicing: the period closer (time injected), exact cents, grace period
//! drafts, late usage as adjustments, racing closers, termination, shadow.

use aggregates::usage::UsageLimits;
use chrono::{DateTime, Datelike, Duration, Utc};
use ledger::invoicing::closer::{close_due, CloseReport};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{close, spawn_app_with_limits, ServiceClient, WINDOW_DAYS};

/// Usage as old as these tests need is accepted (a backfill).
fn limits() -> UsageLimits {
    UsageLimits {
        acceptance_window: Duration::days(WINDOW_DAYS),
        ..Default::default()
    }
}

fn utc(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// One pass of the closer at `now`, as `ledger serve` runs it: projections
/// caught up first, the invoices projected after.
async fn subscribe(svc: &ServiceClient<'_>, external_id: &str, customer: &str, at: &str) {
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": customer, "plan_code": "starter",
               "external_id": external_id, "subscription_at": at}}),
    )
    .await;
}

async fn usage(svc: &ServiceClient<'_>, tx: &str, subscription: &str, at: &str, seconds: &str) {
    svc.created(
        "/events",
        json!({"event": {"transaction_id": tx, "external_subscription_id": subscription,
               "code": "cpu_seconds", "timestamp": utc(at).timestamp(),
               "properties": {"cpu_seconds": seconds}}}),
    )
    .await;
}

async fn invoices(svc: &ServiceClient<'_>, query: &str) -> Vec<Value> {
    let (status, body) = svc.get(&format!("/invoices{query}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["invoices"].as_array().unwrap().clone()
}

/// (fee_type, code, amount_cents, taxes_amount_cents) of each line.
fn lines(invoice: &Value) -> Vec<(String, String, i64, i64)> {
    invoice["fees"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["fee_type"].as_str().unwrap().to_string(),
                f["item"]["code"].as_str().unwrap().to_string(),
                f["amount_cents"].as_i64().unwrap(),
                f["taxes_amount_cents"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn line(kind: &str, code: &str, cents: i64, tax: i64) -> (String, String, i64, i64) {
    (kind.to_string(), code.to_string(), cents, tax)
}

fn totals(invoice: &Value) -> (i64, i64, i64) {
    (
        invoice["fees_amount_cents"].as_i64().unwrap(),
        invoice["taxes_amount_cents"].as_i64().unwrap(),
        invoice["total_amount_cents"].as_i64().unwrap(),
    )
}

/// Days in the UTC month of `at`.
fn days_in_month(at: DateTime<Utc>) -> i64 {
    let first = at.date_naive().with_day(1).unwrap();
    i64::from((first + chrono::Months::new(1)).pred_opt().unwrap().day())
}

/// `amount_cents × days ÷ period_days`, rounded half away from zero: the
/// expected prorated flat fee, computed here independently of the ledger.
fn prorated(amount_cents: i64, days: i64, period_days: i64) -> i64 {
    let exact =
        rust_decimal::Decimal::from(amount_cents * days) / rust_decimal::Decimal::from(period_days);
    i64::try_from(
        exact.round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero),
    )
    .unwrap()
}

#[sqlx::test]
async fn a_period_closes_into_one_invoice_per_subscription_to_the_cent(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    // Toronto: 2026-09-13 10:00 EDT.
    subscribe(&svc, "dep_1", "cus_ada", "2026-09-13T14:00:00Z").await;
    subscribe(&svc, "dep_2", "cus_ada", "2026-09-01T04:00:00Z").await;
    usage(&svc, "a", "dep_1", "2026-09-20T12:00:00Z", "400000").await;
    // 23:30 on September 30th in Toronto: September's.
    usage(&svc, "b", "dep_1", "2026-10-01T03:30:00Z", "20000").await;
    // 00:30 on October 1st in Toronto: October's.
    usage(&svc, "c", "dep_1", "2026-10-01T04:30:00Z", "5000").await;
    usage(&svc, "a", "dep_2", "2026-09-02T00:00:00Z", "38400").await;

    let report = close(&app, "2026-10-02T00:00:00Z").await;
    assert_eq!(
        report,
        CloseReport {
            drafted: 0,
            finalized: 2,
            adjustment_invoices: 0,
            refused: 0,
            quarantined: 0,
        }
    );
    let all = invoices(&svc, "?external_customer_id=cus_ada").await;
    assert_eq!(all.len(), 2, "one invoice per subscription");
    let find = |subscription: &str| {
        all.iter()
            .find(|i| i["billing_periods"][0]["external_subscription_id"] == subscription)
            .unwrap()
            .clone()
    };
    let first = find("dep_1");
    // Flat fee: 13th..30th = 18 of 30 days × $19.00 = $11.40 (HST 148.2 → 148).
    // CPU: 420,000 s − 36,000 included = 384,000 s × $0.0075 / 3,600 = $0.80
    // (HST 10.4 → 10).
    assert_eq!(
        lines(&first),
        vec![
            line("subscription", "starter", 1140, 148),
            line("charge", "cpu_seconds", 80, 10)
        ]
    );
    assert_eq!(totals(&first), (1220, 158, 1378));
    assert_eq!(first["fees"][0]["proration"]["days"], 18);
    assert_eq!(first["fees"][0]["proration"]["period_days"], 30);
    assert_eq!(first["fees"][1]["units"], "420000");
    assert_eq!(first["fees"][1]["precise_amount"], "0.8");
    assert_eq!(first["fees"][1]["events_count"], 2);
    assert_eq!(first["status"], "finalized");
    assert_eq!(first["invoice_type"], "subscription");
    assert_eq!(first["issuing_date"], "2026-10-01");
    let period = &first["billing_periods"][0];
    assert_eq!(period["charges_from_datetime"], "2026-09-13T14:00:00Z");
    assert_eq!(period["charges_to_datetime"], "2026-10-01T04:00:00Z");
    assert_eq!(period["invoicing_reason"], "subscription_periodic");
    // dep_2: whole September; 38,400 s is 2,400 s over: exactly $0.005 → 1¢.
    let second = find("dep_2");
    assert_eq!(
        lines(&second),
        vec![
            line("subscription", "starter", 1900, 247),
            line("charge", "cpu_seconds", 1, 0)
        ]
    );
    assert_eq!(second["fees"][1]["precise_amount"], "0.005");
    let mut numbers: Vec<&str> = all.iter().map(|i| i["number"].as_str().unwrap()).collect();
    numbers.sort();
    assert_eq!(numbers, vec!["NEXACLOUD-000001", "NEXACLOUD-000002"]);

    // Closing again changes nothing; the next period is not due yet.
    assert_eq!(
        close(&app, "2026-10-02T00:00:00Z").await,
        CloseReport::default()
    );
    assert_eq!(invoices(&svc, "").await.len(), 2);
    // The recorded event holds every line and the log position it read.
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Invoice' AND event_type = 'InvoiceFinalized' \
         AND (payload->'InvoiceFinalized'->'as_of'->>'position')::bigint > 0 \
         AND json_array_length(payload->'InvoiceFinalized'->'fees') = 2",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 2);
    // Filters.
    assert_eq!(invoices(&svc, "?status=draft").await.len(), 0);
    assert_eq!(
        invoices(&svc, "?issuing_date_from=2026-10-02").await.len(),
        0
    );
    assert_eq!(
        invoices(&svc, "?issuing_date_to=2026-10-01&payment_status=pending")
            .await
            .len(),
        2
    );
    assert_eq!(
        invoices(&svc, "?external_customer_id=someone_else")
            .await
            .len(),
        0
    );
    let (status, body) = svc.get("/invoices?status=paid").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error_details"]["status"][0], "value_is_invalid");
}

#[sqlx::test]
async fn a_grace_period_draft_picks_up_late_usage_and_later_usage_becomes_an_adjustment(
    pool: PgPool,
) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_ada", "billing_configuration": {"invoice_grace_period": 3}}}),
    )
    .await;
    subscribe(&svc, "dep_1", "cus_ada", "2026-09-01T04:00:00Z").await;
    usage(&svc, "a", "dep_1", "2026-09-10T12:00:00Z", "36000").await;

    // October 1st: September's invoice is a draft until October 4th.
    let report = close(&app, "2026-10-01T12:00:00Z").await;
    assert_eq!((report.drafted, report.finalized), (1, 0));
    let draft = invoices(&svc, "?status=draft").await.remove(0);
    assert_eq!(draft["status"], "draft");
    assert_eq!(lines(&draft)[1], line("charge", "cpu_seconds", 0, 0));
    // A late event during the grace period lands on the draft.
    usage(&svc, "late-1", "dep_1", "2026-09-29T12:00:00Z", "3600000").await;
    let (_, body) = svc
        .get(&format!("/invoices/{}", draft["lago_id"].as_str().unwrap()))
        .await;
    // 3,600,000 s over the quota = 1,000 core-hours × $0.0075 = $7.50.
    assert_eq!(
        lines(&body["invoice"])[1],
        line("charge", "cpu_seconds", 750, 98)
    );
    // A draft's usage is read at the log's head, which moves with every
    // service's writes: its position is not shown to the tenant.
    assert_eq!(body["invoice"]["as_of_log_position"], Value::Null);

    // Grace over: finalized with the late event, numbered.
    let report = close(&app, "2026-10-04T05:00:00Z").await;
    assert_eq!((report.drafted, report.finalized), (0, 1));
    let september = invoices(&svc, "?status=finalized").await.remove(0);
    assert_eq!(september["lago_id"], draft["lago_id"]);
    assert_eq!(september["number"], "NEXACLOUD-000001");
    assert_eq!(totals(&september), (2650, 345, 2995));

    // Usage for September after finalization: recorded, September unchanged.
    usage(&svc, "late-2", "dep_1", "2026-09-30T12:00:00Z", "7200").await;
    let (_, body) = svc
        .get(&format!(
            "/invoices/{}",
            september["lago_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(totals(&body["invoice"]), (2650, 345, 2995));

    // October's draft carries it as a labelled adjustment; finalize it early.
    close(&app, "2026-11-01T12:00:00Z").await;
    let october = invoices(&svc, "?status=draft").await.remove(0);
    let (status, body) = svc
        .put(
            &format!(
                "/invoices/{}/finalize",
                october["lago_id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let october = body["invoice"].clone();
    assert_eq!(october["status"], "finalized");
    assert_eq!(october["number"], "NEXACLOUD-000002");
    // 7,200 s more: $7.50 + $0.015 = $7.515 → 752¢, 750¢ billed: 2¢.
    assert_eq!(
        lines(&october),
        vec![
            line("subscription", "starter", 1900, 247),
            line("charge", "cpu_seconds", 0, 0),
            line("adjustment", "cpu_seconds", 2, 0),
        ]
    );
    let adjustment = &october["fees"][2];
    assert_eq!(adjustment["units"], "7200");
    assert_eq!(adjustment["precise_amount"], "0.015");
    assert_eq!(
        adjustment["adjusts"]["from_datetime"],
        "2026-09-01T04:00:00Z"
    );
    assert_eq!(adjustment["adjusts"]["to_datetime"], "2026-10-01T04:00:00Z");
    assert!(adjustment["item"]["name"]
        .as_str()
        .unwrap()
        .contains("late usage"));
    // Finalized invoices refuse a second finalization; nothing is billed twice.
    let (status, body) = svc
        .put(
            &format!(
                "/invoices/{}/finalize",
                october["lago_id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(body["code"], "invalid_status");
    close(&app, "2026-11-05T00:00:00Z").await;
    assert_eq!(invoices(&svc, "").await.len(), 2);
}

#[sqlx::test]
async fn two_closers_racing_issue_one_invoice_per_subscription_with_gapless_numbers(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    for n in 0..20 {
        subscribe(&svc, &format!("dep_{n}"), "cus_ada", "2026-09-01T04:00:00Z").await;
    }
    app.catch_up().await;
    let now = utc("2026-10-02T00:00:00Z");
    let window = Duration::days(WINDOW_DAYS);
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let pool = app.pool.clone();
            tokio::spawn(async move { close_due(&pool, None, window, now).await.unwrap() })
        })
        .collect();
    let mut finalized = 0;
    for racer in racers {
        finalized += racer.await.unwrap().finalized;
    }
    assert_eq!(
        finalized, 20,
        "each invoice finalized by exactly one closer"
    );
    app.catch_up().await;
    let numbers: Vec<i64> =
        sqlx::query_scalar("SELECT sequential_number FROM invoices ORDER BY sequential_number")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(numbers, (1..=20).collect::<Vec<i64>>());
    let streams: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'Invoice'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(streams, 20);
}

#[sqlx::test]
async fn a_termination_closes_the_partial_period_and_late_usage_gets_its_own_invoice(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    // UTC customer, so days are plain calendar days.
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_utc", "currency": "CAD", "timezone": "UTC"}}),
    )
    .await;
    let start = Utc::now() - Duration::days(70);
    subscribe(&svc, "dep_1", "cus_utc", &start.to_rfc3339()).await;
    let used_at = Utc::now() - Duration::seconds(5);
    usage(&svc, "a", "dep_1", &used_at.to_rfc3339(), "39600").await;
    let (status, body) = svc.delete("/subscriptions/dep_1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let terminated_at: DateTime<Utc> = body["subscription"]["terminated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = (terminated_at + Duration::seconds(1)).to_rfc3339();
    close(&app, &now).await;
    let all = invoices(&svc, "").await;
    let closing = all
        .iter()
        .find(|i| i["billing_periods"][0]["invoicing_reason"] == "subscription_terminating")
        .expect("a closing invoice");
    // Days 1..termination day of the month, inclusive.
    let day = i64::from(terminated_at.day());
    let month_days = days_in_month(terminated_at);
    assert_eq!(closing["fees"][0]["proration"]["days"], day);
    assert_eq!(closing["fees"][0]["proration"]["period_days"], month_days);
    assert_eq!(
        closing["fees"][0]["amount_cents"].as_i64().unwrap(),
        prorated(1900, day, month_days)
    );
    // 3,600 s over the quota: $0.0075 → 1¢.
    assert_eq!(lines(closing)[1], line("charge", "cpu_seconds", 1, 0));

    // Usage from before the termination, recorded after the closing invoice.
    let late_at = terminated_at - Duration::seconds(1);
    usage(&svc, "late", "dep_1", &late_at.to_rfc3339(), "36000").await;
    let report = close(&app, &(terminated_at + Duration::seconds(2)).to_rfc3339()).await;
    assert_eq!(report.adjustment_invoices, 1);
    let adjustment = invoices(&svc, "").await.remove(0);
    assert_eq!(
        adjustment["billing_periods"][0]["invoicing_reason"],
        "adjustment"
    );
    // 75,600 s − 36,000 = 39,600 s → $0.0825 → 8¢; 1¢ billed: 7¢.
    assert_eq!(
        lines(&adjustment),
        vec![line("adjustment", "cpu_seconds", 7, 0)]
    );
    assert_eq!(
        close(&app, &(terminated_at + Duration::seconds(3)).to_rfc3339()).await,
        CloseReport::default()
    );
}

#[sqlx::test]
async fn shadow_subscriptions_are_invoiced_apart_and_marked_shadow(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    subscribe(&svc, "live_1", "cus_ada", "2026-09-01T04:00:00Z").await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
               "external_id": "shadow_1", "subscription_at": "2026-09-01T04:00:00Z", "shadow": true}}),
    )
    .await;
    close(&app, "2026-10-02T00:00:00Z").await;
    let all = invoices(&svc, "").await;
    let mut seen: Vec<(String, bool, i64)> = all
        .iter()
        .map(|i| {
            (
                i["number"].as_str().unwrap().to_string(),
                i["shadow"].as_bool().unwrap(),
                i["total_amount_cents"].as_i64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("NEXACLOUD-000001".to_string(), false, 2147),
            ("SHADOW-NEXACLOUD-000001".to_string(), true, 2147),
        ]
    );
}

#[sqlx::test]
async fn invoices_of_another_service_are_not_found(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    subscribe(&svc, "dep_1", "cus_ada", "2026-09-01T04:00:00Z").await;
    close(&app, "2026-10-02T00:00:00Z").await;
    let id = invoices(&svc, "").await[0]["lago_id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = app.service("nexadesk").await;
    let (status, body) = other.get(&format!("/invoices/{id}")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("invoice_not_found"))
    );
    assert_eq!(invoices(&other, "").await.len(), 0);
    let (status, _) = other
        .put(&format!("/invoices/{id}/finalize"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = svc.get("/invoices/not-a-uuid").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test]
async fn pay_in_advance_bills_the_flat_fee_at_the_start_of_each_period(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.put("/plans/starter", json!({"plan": {"pay_in_advance": true}}))
        .await;
    // 2026-09-13 10:00 in Toronto; September has 30 days.
    subscribe(&svc, "dep_1", "cus_ada", "2026-09-13T14:00:00Z").await;
    usage(&svc, "a", "dep_1", "2026-09-20T12:00:00Z", "39600").await;
    close(&app, "2026-10-02T00:00:00Z").await;
    let mut all = invoices(&svc, "").await;
    all.reverse();
    let reasons: Vec<&str> = all
        .iter()
        .map(|i| {
            i["billing_periods"][0]["invoicing_reason"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        reasons,
        vec!["subscription_starting", "subscription_periodic"]
    );
    // At the start: September 13th..30th in advance, $19 × 18/30.
    assert_eq!(
        lines(&all[0]),
        vec![line("subscription", "starter", 1140, 148)]
    );
    assert_eq!(all[0]["issuing_date"], "2026-09-13");
    // October 1st: October in advance, and September's usage (3,600 s over: 1¢).
    assert_eq!(
        lines(&all[1]),
        vec![
            line("subscription", "starter", 1900, 247),
            line("charge", "cpu_seconds", 1, 0)
        ]
    );
    let period = &all[1]["billing_periods"][0];
    assert_eq!(period["subscription_from_datetime"], "2026-10-01T04:00:00Z");
    assert_eq!(period["subscription_to_datetime"], "2026-11-01T04:00:00Z");
    assert_eq!(period["charges_from_datetime"], "2026-09-13T14:00:00Z");
    assert_eq!(period["charges_to_datetime"], "2026-10-01T04:00:00Z");
}

#[sqlx::test]
async fn a_plan_change_closes_the_old_plans_days_on_their_own_invoice(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    let metric = svc.nexacloud_catalog().await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_utc", "currency": "CAD", "timezone": "UTC"}}),
    )
    .await;
    svc.created(
        "/plans",
        json!({"plan": {"name": "Pro", "code": "pro", "interval": "monthly", "amount_cents": 6000,
            "amount_currency": "CAD", "charges": [{"billable_metric_id": metric["billable_metric"]["lago_id"],
            "charge_model": "standard", "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]}}),
    )
    .await;
    subscribe(
        &svc,
        "dep_1",
        "cus_utc",
        &(Utc::now() - Duration::days(70)).to_rfc3339(),
    )
    .await;
    let (status, body) = svc
        .post(
            "/subscriptions/dep_1/change_plan",
            json!({"subscription": {"plan_code": "pro"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let changed_at = Utc::now();
    close(&app, &(changed_at + Duration::seconds(5)).to_rfc3339()).await;
    let all = invoices(&svc, "").await;
    // The newest invoice closes the old plan at the change: days 1 to the
    // day before the change (the change day is billed on the new plan).
    let closing = &all[0];
    let days = i64::from(changed_at.day()) - 1;
    let fees = lines(closing);
    if days == 0 {
        // Changed on the 1st: the old plan has no days left to bill.
        assert_eq!(fees, vec![line("charge", "cpu_seconds", 0, 0)]);
    } else {
        assert_eq!(fees[0].1, "starter");
        assert_eq!(closing["fees"][0]["proration"]["days"], days);
        assert_eq!(closing["fees"][0]["plan_code"], "starter");
    }
    // The next boundary bills the new plan from the change day on.
    let next_month = (changed_at.date_naive().with_day(1).unwrap() + chrono::Months::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    close(&app, &(next_month + Duration::seconds(1)).to_rfc3339()).await;
    let next = invoices(&svc, "").await.remove(0);
    let month_days = days_in_month(changed_at);
    let new_days = month_days - days;
    assert_eq!(next["fees"][0]["plan_code"], "pro");
    assert_eq!(next["fees"][0]["proration"]["days"], new_days);
    assert_eq!(
        next["fees"][0]["amount_cents"].as_i64().unwrap(),
        prorated(6000, new_days, month_days)
    );
}

#[sqlx::test]
async fn a_close_that_fails_midway_leaves_nothing_and_the_next_one_issues_everything_once(
    pool: PgPool,
) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    for n in 0..3 {
        subscribe(&svc, &format!("dep_{n}"), "cus_ada", "2026-09-01T04:00:00Z").await;
    }
    app.catch_up().await;
    // The crash: the last write of the closing transaction fails, after the
    // invoice events and numbers were written in it.
    sqlx::raw_sql(
        "CREATE FUNCTION crash() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'crash mid-close'; END $$; \
         CREATE TRIGGER crash BEFORE INSERT ON billed_windows FOR EACH ROW EXECUTE FUNCTION crash();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let failed = close_due(
        &app.pool,
        None,
        Duration::days(WINDOW_DAYS),
        utc("2026-10-02T00:00:00Z"),
    )
    .await;
    assert!(failed.is_err());
    let count = |sql: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM events WHERE aggregate_type = 'Invoice'").await,
        0
    );
    assert_eq!(
        count("SELECT coalesce(sum(last_number), 0)::bigint FROM invoice_sequences").await,
        0
    );
    sqlx::raw_sql("DROP TRIGGER crash ON billed_windows")
        .execute(&app.pool)
        .await
        .unwrap();
    // The restart.
    let report = close(&app, "2026-10-02T00:00:00Z").await;
    assert_eq!(report.finalized, 3);
    assert_eq!(
        close(&app, "2026-10-02T00:00:00Z").await,
        CloseReport::default()
    );
    let numbers: Vec<i64> =
        sqlx::query_scalar("SELECT sequential_number FROM invoices ORDER BY sequential_number")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(numbers, vec![1, 2, 3]);
}

#[sqlx::test]
async fn an_early_termination_credits_the_unused_days_paid_in_advance(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.put("/plans/starter", json!({"plan": {"pay_in_advance": true}}))
        .await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_utc", "currency": "CAD", "timezone": "UTC"}}),
    )
    .await;
    subscribe(
        &svc,
        "dep_1",
        "cus_utc",
        &(Utc::now() - Duration::days(70)).to_rfc3339(),
    )
    .await;
    let (status, body) = svc.delete("/subscriptions/dep_1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let terminated_at: DateTime<Utc> = body["subscription"]["terminated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    close(&app, &(terminated_at + Duration::seconds(1)).to_rfc3339()).await;
    let closing = invoices(&svc, "").await.remove(0);
    assert_eq!(
        closing["billing_periods"][0]["invoicing_reason"],
        "subscription_terminating"
    );
    let credit = closing["fees"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fee_type"] == "credit")
        .cloned();
    // The month was paid in full at its start; the days after the
    // termination day come back: $19.00 × (days in month − day) ÷ days.
    let day = i64::from(terminated_at.day());
    let month_days = days_in_month(terminated_at);
    let unused = month_days - day;
    if unused == 0 {
        assert_eq!(
            credit, None,
            "terminated on the month's last day: nothing unused"
        );
        return;
    }
    let credit = credit.expect("a credit line");
    assert_eq!(credit["proration"]["days"], unused);
    assert_eq!(
        credit["amount_cents"].as_i64().unwrap(),
        -prorated(1900, unused, month_days)
    );
    assert!(credit["amount_cents"].as_i64().unwrap() < 0);
}

#[sqlx::test]
async fn a_window_already_billed_is_never_billed_again_even_after_a_time_zone_change(pool: PgPool) {
    let app = spawn_app_with_limits(pool, limits()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_utc", "currency": "CAD", "timezone": "UTC"}}),
    )
    .await;
    subscribe(&svc, "dep_1", "cus_utc", "2026-09-01T00:00:00Z").await;
    usage(&svc, "a", "dep_1", "2026-09-15T12:00:00Z", "400000").await;
    close(&app, "2026-10-02T00:00:00Z").await;
    // Periods now end at Toronto's midnight: the next window would start at
    // 2026-09-01T04:00Z, inside September as already billed (UTC).
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_utc", "timezone": "America/Toronto"}}),
    )
    .await;
    let report = close(&app, "2026-11-02T00:00:00Z").await;
    assert_eq!((report.finalized, report.refused), (0, 1));
    assert_eq!(
        invoices(&svc, "").await.len(),
        1,
        "September is billed once"
    );
}
