//! Hostile values and faults: what a client can send is refused at the door
//! by field (nothing written), and values already in the log that no bill
//! can hold quarantine their subscription while every other subscription,
//! service and projection goes on.

use chrono::{Duration, Utc};
use ledger::event_log::projection_runner::{rebuild_into, ProjectionRunner};
use ledger::event_log::tamper;
use projections::Projection;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{close, spawn_app_with_limits, ServiceClient, TestApp, WINDOW_DAYS};

fn backfill() -> aggregates::usage::UsageLimits {
    aggregates::usage::UsageLimits {
        acceptance_window: Duration::days(WINDOW_DAYS),
        ..Default::default()
    }
}

const DECIMAL_MAX: &str = "79228162514264337593543950335";

async fn subscribe(svc: &ServiceClient<'_>, id: &str, plan: &str, at: &str) {
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": plan,
               "external_id": id, "subscription_at": at}}),
    )
    .await;
}

async fn cpu(svc: &ServiceClient<'_>, tx: &str, subscription: &str, at: i64, seconds: &str) {
    svc.created(
        "/events",
        json!({"event": {"transaction_id": tx, "external_subscription_id": subscription,
               "code": "cpu_seconds", "timestamp": at, "properties": {"cpu_seconds": seconds}}}),
    )
    .await;
}

/// Append copies of the usage event `seed` (each with a transaction id of
/// the seed's length, so its stream id stays well formed) with `value` in
/// place of its value, straight into the log as a version without bounds at the door
/// could have (the log's triggers chain and hash them like any append).
async fn append_as_an_older_version(pool: &PgPool, seed: &str, copies: &[(&str, &str)]) {
    for (tx, value) in copies {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
               payload, metadata, usage_subscription, usage_metric, usage_timestamp, usage_value, \
               usage_unique_key, usage_period_start, usage_period_end) \
             SELECT aggregate_type, replace(aggregate_id, $1, $2), sequence, event_type, event_version, \
               replace(replace(payload::text, '\"' || $1 || '\"', '\"' || $2 || '\"'), \
                       '\"value\":\"1\"', '\"value\":\"' || $3 || '\"')::json, \
               metadata, usage_subscription, usage_metric, usage_timestamp, $3::numeric, \
               usage_unique_key, usage_period_start, usage_period_end \
             FROM events WHERE aggregate_type = 'Usage' AND aggregate_id LIKE '%' || $1",
        )
        .bind(seed)
        .bind(tx)
        .bind(value)
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn seats(svc: &ServiceClient<'_>, tx: &str, subscription: &str, at: i64) {
    svc.created(
        "/events",
        json!({"event": {"transaction_id": tx, "external_subscription_id": subscription,
               "code": "seats", "timestamp": at, "properties": {"delta": "1"}}}),
    )
    .await;
}

async fn log_size(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The NexaCloud catalog plus a plan at $0.01 per CPU-second and one at
/// $0.01 per seat (a time-weighted sum).
async fn catalog(svc: &ServiceClient<'_>) {
    let metric = svc.nexacloud_catalog().await;
    let seats = svc
        .created(
            "/billable_metrics",
            json!({"billable_metric": {"name": "Seats", "code": "seats",
                   "aggregation_type": "weighted_sum_agg", "field_name": "delta"}}),
        )
        .await;
    per_unit_plan(svc, "seated", &seats, "0.01").await;
    per_unit_plan(svc, "metered", &metric, "0.01").await;
}

/// A plan with no flat fee and one standard charge of `amount` per unit.
async fn per_unit_plan(svc: &ServiceClient<'_>, code: &str, metric: &Value, amount: &str) {
    svc.created(
        "/plans",
        json!({"plan": {"name": code, "code": code, "interval": "monthly",
            "amount_cents": 0, "amount_currency": "CAD",
            "charges": [{"billable_metric_id": metric["billable_metric"]["lago_id"],
                "charge_model": "standard", "properties": {"amount": amount}}]}}),
    )
    .await;
}

#[sqlx::test]
async fn values_in_the_log_no_bill_can_hold_quarantine_their_subscription_and_the_rest_is_billed(
    pool: PgPool,
) {
    let app = spawn_app_with_limits(pool.clone(), backfill()).await;
    let cloud = app.service("nexacloud").await;
    catalog(&cloud).await;
    let desk = app.service("nexadesk").await;
    desk.nexacloud_catalog().await;
    for (svc, id, plan) in [
        (&cloud, "dep_max", "starter"),
        (&cloud, "dep_1e21", "metered"),
        (&cloud, "dep_seats", "seated"),
        (&cloud, "dep_ok", "starter"),
        (&desk, "desk_ok", "starter"),
    ] {
        // Midnight in Toronto, the customer's time zone.
        subscribe(svc, id, plan, "2026-09-01T04:00:00Z").await;
    }
    let september = chrono::DateTime::parse_from_rfc3339("2026-09-10T00:00:00Z")
        .unwrap()
        .timestamp();
    cpu(&cloud, "max_seed", "dep_max", september, "1").await;
    cpu(&cloud, "big_seed", "dep_1e21", september, "1").await;
    cpu(&cloud, "ok", "dep_ok", september, "40000").await;
    seats(&cloud, "seat_seed", "dep_seats", september).await;
    cpu(&desk, "ok", "desk_ok", september, "40000").await;
    // Two events at the decimal type's maximum (their sum does not fit one)
    // and one of 10^21 CPU-seconds at $0.01 (more cents than a bill holds).
    append_as_an_older_version(
        &pool,
        "max_seed",
        &[("max_one1", DECIMAL_MAX), ("max_two2", DECIMAL_MAX)],
    )
    .await;
    append_as_an_older_version(&pool, "big_seed", &[("big_one1", "1000000000000000000000")]).await;
    // 5 × 10^20 seats from the 10th: weighted, $0.01 each, beyond a bill.
    append_as_an_older_version(
        &pool,
        "seat_seed",
        &[("seat_one1", "500000000000000000000")],
    )
    .await;
    // The same in dep_max's open period, for its current usage.
    let an_hour_ago = (Utc::now() - Duration::hours(1)).timestamp();
    cpu(&cloud, "open_seed", "dep_max", an_hour_ago, "1").await;
    append_as_an_older_version(
        &pool,
        "open_seed",
        &[("open_one1", DECIMAL_MAX), ("open_two2", DECIMAL_MAX)],
    )
    .await;

    // Every projection folds the log; nothing panics.
    app.catch_up().await;
    let report = close(&app, "2026-10-01T04:00:01Z").await;
    assert_eq!((report.finalized, report.quarantined), (2, 3), "{report:?}");

    // The healthy subscriptions of both services are billed exactly:
    // $19.00 + 4,000 s over the quota (1¢), 13% HST.
    for svc in [&cloud, &desk] {
        let (status, body) = svc.get("/invoices?status=finalized").await;
        assert_eq!(status, StatusCode::OK);
        let invoices = body["invoices"].as_array().unwrap();
        assert_eq!(invoices.len(), 1, "{body}");
        assert_eq!(invoices[0]["fees_amount_cents"], 1901);
        assert_eq!(invoices[0]["total_amount_cents"], 1901 + 247);
    }
    // Nothing at all is written for the quarantined ones (no negative total).
    let (_, body) = cloud.get("/invoices").await;
    assert_eq!(body["invoices"].as_array().unwrap().len(), 1, "{body}");

    let (status, body) = app.get_admin("/admin/v1/quarantine").await;
    assert_eq!(status, StatusCode::OK);
    let mut quarantined: Vec<(String, String, String)> = body["quarantined_subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["external_subscription_id"].as_str().unwrap().to_string(),
                q["found_by"].as_str().unwrap().to_string(),
                q["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // The open period's usage, marked by the usage projection.
    let usage_entry = quarantined.iter().position(|q| q.1 == "usage").unwrap();
    let (id, found_by, reason) = quarantined.remove(usage_entry);
    assert_eq!((id.as_str(), found_by.as_str()), ("dep_max", "usage"));
    assert!(
        reason.starts_with("the usage of cpu_seconds from 2026-")
            && reason.ends_with(" is beyond what a bill can hold"),
        "{reason}"
    );
    assert_eq!(
        quarantined,
        vec![
            (
                "dep_1e21".into(),
                "closer".into(),
                "its invoice cannot be computed: the amount is beyond what a bill can hold".into()
            ),
            (
                "dep_max".into(),
                "closer".into(),
                "its invoice cannot be computed: the usage is beyond what a bill can hold".into()
            ),
            (
                "dep_seats".into(),
                "closer".into(),
                "its invoice cannot be computed: the amount is beyond what a bill can hold".into()
            ),
        ]
    );
    // `ledger projections status` lists them too.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["projections", "status"])
        .env(
            "DATABASE_URL",
            crate::helpers::database_url(&pool.connect_options()),
        )
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains("quarantined subscriptions (not billed): 3"),
        "{printed}"
    );
    let dep_seats = printed
        .lines()
        .find(|line| line.contains("dep_seats"))
        .unwrap();
    assert!(
        dep_seats.starts_with("nexacloud")
            && dep_seats.contains("found by closer")
            && dep_seats.ends_with(
                "its invoice cannot be computed: the amount is beyond what a bill can hold"
            ),
        "{dep_seats}"
    );
    let (status, ready) = app.get("/ready", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["quarantined_subscriptions"], 3);

    // Current usage: the quarantined subscription is refused with its
    // reason, the others are priced.
    let (status, body) = cloud
        .get("/customers/cus_ada/current_usage?external_subscription_id=dep_max")
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "subscription_quarantined");
    assert_eq!(
        body["error_details"],
        json!({"external_subscription_id": ["subscription_quarantined"]})
    );
    assert_eq!(body["reason"], "the usage is beyond what a bill can hold");
    let (status, _) = cloud
        .get("/customers/cus_ada/current_usage?external_subscription_id=dep_ok")
        .await;
    assert_eq!(status, StatusCode::OK);

    // A second pass finds the same, and other services keep being billed.
    let report = close(&app, "2026-11-01T04:00:01Z").await;
    assert_eq!((report.finalized, report.quarantined), (2, 3), "{report:?}");
    let (_, body) = desk.get("/invoices?status=finalized").await;
    assert_eq!(body["invoices"].as_array().unwrap().len(), 2);

    // A rebuild and a verification of the whole log go through.
    let runner = ProjectionRunner::for_all(pool.clone()).await.unwrap();
    let all: Vec<&dyn Projection> = runner.projections().collect();
    let (read, _) = rebuild_into(&pool, &all, "hostile_rebuild").await.unwrap();
    assert_eq!(read as i64, log_size(&pool).await);
    let overflowed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM hostile_rebuild.usage_aggregates WHERE overflowed",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(overflowed, 2, "both of dep_max's periods");
    let verification = tamper::verify(&pool, 0).await.unwrap();
    assert_eq!(verification.first_break, None);
}

#[sqlx::test]
async fn a_nul_in_the_log_does_not_stop_verification(pool: PgPool) {
    let app = spawn_app_with_limits(pool.clone(), backfill()).await;
    let cloud = app.service("nexacloud").await;
    cloud.nexacloud_catalog().await;
    subscribe(&cloud, "dep_1", "starter", "2026-09-01T00:00:00Z").await;
    let at = (Utc::now() - Duration::hours(1)).timestamp();
    cloud
        .created(
            "/events",
            json!({"event": {"transaction_id": "seed", "external_subscription_id": "dep_1",
                   "code": "cpu_seconds", "timestamp": at,
                   "properties": {"cpu_seconds": "1", "region": "ca"}}}),
        )
        .await;
    // An older version stored a NUL in a property nobody bills on.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
           payload, metadata, usage_subscription, usage_metric, usage_timestamp, usage_value, \
           usage_unique_key, usage_period_start, usage_period_end) \
         SELECT aggregate_type, replace(aggregate_id, 'seed', 'nul0'), sequence, event_type, \
           event_version, replace(replace(payload::text, '\"seed\"', '\"nul0\"'), '\"ca\"', \
           '\"c\\u0000a\"')::json, metadata, usage_subscription, usage_metric, usage_timestamp, \
           usage_value, usage_unique_key, usage_period_start, usage_period_end \
         FROM events WHERE aggregate_type = 'Usage'",
    )
    .execute(&pool)
    .await
    .unwrap();
    app.catch_up().await;
    let verification = tamper::verify(&pool, 0).await.unwrap();
    assert_eq!(verification.first_break, None);
    assert_eq!(verification.events_checked, log_size(&pool).await);
    let (status, body) = cloud
        .get("/customers/cus_ada/current_usage?external_subscription_id=dep_1")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["customer_usage"]["charges_usage"][0]["events_count"],
        2
    );
}

/// POST `body` raw with a content type.
async fn post_raw(
    app: &TestApp,
    key: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let response = app
        .client
        .post(format!("{}/api/v1{path}", app.address))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[sqlx::test]
async fn hostile_values_at_the_door_are_refused_by_field_and_nothing_is_written(pool: PgPool) {
    let app = spawn_app_with_limits(pool.clone(), backfill()).await;
    let cloud = app.service("nexacloud").await;
    cloud.nexacloud_catalog().await;
    let users = cloud
        .created(
            "/billable_metrics",
            json!({"billable_metric": {"name": "Users", "code": "users",
                   "aggregation_type": "unique_count_agg", "field_name": "user_id"}}),
        )
        .await;
    per_unit_plan(&cloud, "seats", &users, "1").await;
    subscribe(&cloud, "dep_1", "starter", "2026-09-01T00:00:00Z").await;
    subscribe(&cloud, "seats_1", "seats", "2026-09-01T00:00:00Z").await;
    let before = log_size(&pool).await;
    let at = (Utc::now() - Duration::hours(1)).timestamp();
    let event = |tx: &str, subscription: &str, code: &str, properties: Value| {
        json!({"event": {"transaction_id": tx, "external_subscription_id": subscription,
               "code": code, "timestamp": at, "properties": properties}})
    };
    let refused = [
        (
            event(
                "t1",
                "dep_1",
                "cpu_seconds",
                json!({"cpu_seconds": DECIMAL_MAX}),
            ),
            "properties.cpu_seconds",
            "value_is_out_of_range",
        ),
        (
            event("t2", "dep_1", "cpu_seconds", json!({"cpu_seconds": 1e21})),
            "properties.cpu_seconds",
            "value_is_out_of_range",
        ),
        (
            event(
                "t3",
                "dep_1",
                "cpu_seconds",
                json!({"cpu_seconds": "500000000000000000000"}),
            ),
            "properties.cpu_seconds",
            "value_is_out_of_range",
        ),
        (
            event(
                "t4",
                "seats_1",
                "users",
                json!({"user_id": "u".repeat(100_000)}),
            ),
            "properties.user_id",
            "value_is_invalid",
        ),
        (
            event(
                "t5",
                "dep_1",
                "cpu_seconds",
                json!({"cpu_seconds": "1", "region": "c\u{0}a"}),
            ),
            "properties.region",
            "value_is_invalid",
        ),
        (
            event(
                "t6",
                "dep_1",
                "cpu_seconds",
                json!({"cpu_seconds": "1", "re\u{0}gion": "ca"}),
            ),
            "properties.re\\u0000gion",
            "value_is_invalid",
        ),
        (
            event(
                "t\u{0}7",
                "dep_1",
                "cpu_seconds",
                json!({"cpu_seconds": "1"}),
            ),
            "transaction_id",
            "value_is_invalid",
        ),
        (
            event(
                "t8",
                "dep\u{0}1",
                "cpu_seconds",
                json!({"cpu_seconds": "1"}),
            ),
            "external_subscription_id",
            "value_is_invalid",
        ),
        (
            event("t9", "seats_1", "users", json!({"user_id": "a\u{0}b"})),
            "properties.user_id",
            "value_is_invalid",
        ),
    ];
    for (body, field, code) in refused {
        let (status, response) = cloud.post("/events", body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {response}"
        );
        assert_eq!(
            response["error_details"][field],
            json!([code]),
            "{field}: {response}"
        );
    }
    let (status, response) = cloud
        .post(
            "/events/batch",
            json!({"events": [
                {"transaction_id": "b1", "external_subscription_id": "dep_1", "code": "cpu_seconds",
                 "timestamp": at, "properties": {"cpu_seconds": "1"}},
                {"transaction_id": "b2", "external_subscription_id": "dep_1", "code": "cpu_seconds",
                 "timestamp": at, "properties": {"cpu_seconds": DECIMAL_MAX}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        response["error_details"]["1"]["properties.cpu_seconds"],
        json!(["value_is_out_of_range"]),
        "{response}"
    );
    let (status, response) = cloud
        .post(
            "/events/batch",
            json!({"events": [
                {"transaction_id": "b1", "external_subscription_id": "dep_1", "code": "cpu_seconds",
                 "timestamp": at, "properties": {"cpu_seconds": "1"}},
                {"transaction_id": "b\u{0}2", "external_subscription_id": "dep_1",
                 "code": "cpu_seconds", "timestamp": at, "properties": {"cpu_seconds": "1"}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        response["error_details"],
        json!({"1": {"transaction_id": ["value_is_invalid"]}}),
        "{response}"
    );
    for (path, body, field) in [
        (
            "/customers",
            json!({"customer": {"external_id": "cus_2", "name": "A\u{0}da"}}),
            "name",
        ),
        (
            "/customers",
            json!({"customer": {"external_id": "cus\u{0}2", "name": "Ada"}}),
            "external_id",
        ),
        (
            "/billable_metrics",
            json!({"billable_metric": {"name": "C\u{0}PU", "code": "cpu2",
                   "aggregation_type": "count_agg"}}),
            "name",
        ),
        (
            "/taxes",
            json!({"tax": {"name": "G\u{0}ST", "code": "gst", "rate": 5.0}}),
            "name",
        ),
    ] {
        let (status, response) = cloud.post(path, body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {response}"
        );
        assert_eq!(
            response["error_details"][field],
            json!(["value_is_invalid"])
        );
    }
    let (status, response) = cloud
        .post(
            "/plans",
            json!({"plan": {"name": "Huge", "code": "huge", "interval": "monthly",
                   "amount_cents": 10_000_000_000_000_000i64, "amount_currency": "CAD"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{response}");
    assert_eq!(
        response["error_details"]["amount_cents"],
        json!(["invalid_amount"])
    );

    // Paths and query values: 400 naming the path or the parameter.
    for (path, field) in [
        ("/customers/a%00b", "path"),
        (
            "/customers/cus_ada/current_usage?external_subscription_id=s1%00",
            "external_subscription_id",
        ),
        (
            "/events/tx?external_subscription_id=a%00b",
            "external_subscription_id",
        ),
        ("/customers?email=a%00b", "email"),
        (
            "/subscriptions?external_customer_id=a%00",
            "external_customer_id",
        ),
    ] {
        let (status, response) = cloud.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {response}");
        assert_eq!(
            response["error_details"],
            json!({field: ["value_is_invalid"]})
        );
    }

    // 413 beyond the body limit, 415 for a body that is not JSON.
    let (status, response) = post_raw(
        &app,
        &cloud.key,
        "/events",
        "application/json",
        vec![b' '; 20 * 1024 * 1024],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response["code"], "payload_too_large");
    let (status, response) =
        post_raw(&app, &cloud.key, "/events", "text/plain", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(response["code"], "unsupported_media_type");

    assert_eq!(log_size(&pool).await, before, "nothing was written");
}
