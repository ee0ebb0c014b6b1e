//! Payments in: Stripe's signed webhook (verification, once per event id,
//! ordered by `created`, unmatched events), payment statuses set through
//! the Lago API, shadow invoices never payable, overdue invoices.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use ledger::payments::mark_overdue;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;

use crate::helpers::{close, live_invoice, spawn_signalling_app, TestApp, STRIPE_SECRET};

/// `Stripe-Signature` as Stripe's libraries build it: `t=<unix>,v1=<hex
/// HMAC-SHA256 of "<t>.<payload>" keyed with the whole whsec_ secret>`.
pub(crate) fn stripe_signature(secret: &str, timestamp: i64, payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{payload}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

pub(crate) fn event(id: &str, event_type: &str, created: i64, object: Value) -> String {
    json!({"id": id, "object": "event", "type": event_type, "created": created,
           "livemode": false, "data": {"object": object}})
    .to_string()
}

pub(crate) fn intent(id: &str, lago_invoice_id: &Value) -> Value {
    json!({"id": id, "object": "payment_intent", "customer": "cus_stripe_ada",
           "metadata": {"lago_invoice_id": lago_invoice_id}})
}

async fn post_stripe(
    app: &TestApp,
    payload: &str,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut request = app
        .client
        .post(format!("{}/webhooks/stripe", app.address))
        .header("content-type", "application/json")
        .body(payload.to_string());
    if let Some(signature) = signature {
        request = request.header("Stripe-Signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Post `payload` signed now with the configured secret; expect 200.
pub(crate) async fn deliver(app: &TestApp, payload: &str) -> Value {
    let signature = stripe_signature(STRIPE_SECRET, Utc::now().timestamp(), payload);
    let (status, body) = post_stripe(app, payload, Some(signature)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["outcome"].clone()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn stripe_events(pool: &PgPool) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM events WHERE aggregate_type = 'StripeEvent'",
    )
    .await
}

async fn invoice(app: &TestApp, svc: &crate::helpers::ServiceClient<'_>, id: &Value) -> Value {
    app.catch_up().await;
    let (status, body) = svc
        .get(&format!("/invoices/{}", id.as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["invoice"].clone()
}

#[sqlx::test]
async fn stripe_events_are_verified_first_recorded_once_and_ordered_by_created(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let id = live_invoice(&svc).await["lago_id"].clone();
    let now = Utc::now().timestamp();
    let succeeded = event(
        "evt_1",
        "payment_intent.succeeded",
        now,
        intent("pi_1", &id),
    );

    // Refused before anything is read: 400 naming the header, nothing recorded.
    let refusals = [
        (None, "signature_missing"),
        (
            Some(stripe_signature("whsec_wrong", now, &succeeded)),
            "signature_mismatch",
        ),
        (
            Some(stripe_signature(STRIPE_SECRET, now - 301, &succeeded)),
            "timestamp_outside_tolerance",
        ),
        (Some(format!("t={now}")), "signature_malformed"),
    ];
    for (signature, reason) in refusals {
        let (status, body) = post_stripe(&app, &succeeded, signature).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error_details"]["Stripe-Signature"], json!([reason]));
    }
    let huge = "x".repeat(3 * 1024 * 1024);
    let (status, body) = post_stripe(
        &app,
        &huge,
        Some(stripe_signature(STRIPE_SECRET, now, &huge)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
    let not_json = "not json";
    let (status, body) = post_stripe(
        &app,
        not_json,
        Some(stripe_signature(STRIPE_SECRET, now, not_json)),
    )
    .await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("bad_request"))
    );
    let tampered = succeeded.replace("pi_1", "pi_9");
    let (status, _) = post_stripe(
        &app,
        &tampered,
        Some(stripe_signature(STRIPE_SECRET, now, &succeeded)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a tampered body");
    assert_eq!(stripe_events(&pool).await, 0, "nothing recorded");

    // The rotated-out secret still verifies while it is configured.
    let (status, body) = post_stripe(
        &app,
        &succeeded,
        Some(stripe_signature("whsec_rotated_out", now, &succeeded)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outcome"]["status"], "applied");
    assert_eq!(
        invoice(&app, &svc, &id).await["payment_status"],
        "succeeded"
    );

    // At least once: the same event again changes nothing.
    assert_eq!(deliver(&app, &succeeded).await["status"], "duplicate");
    assert_eq!(stripe_events(&pool).await, 1);
    // Out of order: a failure Stripe created before the success loses.
    let late_failure = event(
        "evt_0",
        "payment_intent.payment_failed",
        now - 60,
        intent("pi_1", &id),
    );
    assert_eq!(deliver(&app, &late_failure).await["status"], "unchanged");
    assert_eq!(
        invoice(&app, &svc, &id).await["payment_status"],
        "succeeded"
    );

    // Refunds and disputes name only the payment intent: found through it.
    let charge = json!({"id": "ch_1", "object": "charge", "payment_intent": "pi_1",
                        "amount_refunded": 500, "metadata": {}});
    assert_eq!(
        deliver(&app, &event("evt_2", "charge.refunded", now + 1, charge)).await["status"],
        "applied"
    );
    let dispute = |status: &str| {
        json!({"id": "dp_1", "object": "dispute", "payment_intent": "pi_1",
                                        "charge": "ch_1", "status": status, "metadata": {}})
    };
    deliver(
        &app,
        &event(
            "evt_3",
            "charge.dispute.created",
            now + 2,
            dispute("needs_response"),
        ),
    )
    .await;
    let shown = invoice(&app, &svc, &id).await;
    assert_eq!(
        (
            shown["refunded_amount_cents"].clone(),
            shown["payment_disputed"].clone()
        ),
        (json!(500), json!(true))
    );
    deliver(
        &app,
        &event("evt_4", "charge.dispute.closed", now + 3, dispute("lost")),
    )
    .await;
    let shown = invoice(&app, &svc, &id).await;
    assert_eq!(shown["payment_disputed"], false);
    assert_eq!(
        shown["payment_dispute_lost_at"],
        json!(projections::catalog::timestamp(
            DateTime::from_timestamp(now + 3, 0).unwrap()
        ))
    );

    // Unknown invoices and unused types: recorded, answered 200.
    let stranger = event(
        "evt_5",
        "payment_intent.succeeded",
        now,
        intent("pi_x", &json!("00000000-0000-0000-0000-000000000000")),
    );
    assert_eq!(
        deliver(&app, &stranger).await,
        json!({"status": "unmatched", "reason": "invoice_not_found"})
    );
    let customer = event("evt_6", "customer.created", now, json!({"id": "cus_1"}));
    assert_eq!(
        deliver(&app, &customer).await["reason"],
        "event_type_not_used"
    );
    assert_eq!(stripe_events(&pool).await, 7);
    let payment_events = count(
        &pool,
        "SELECT count(*) FROM events WHERE aggregate_type = 'Invoice' AND event_type LIKE 'InvoicePayment%'",
    )
    .await;
    assert_eq!(
        payment_events, 4,
        "succeeded, refunded, disputed, dispute closed"
    );
}

#[sqlx::test]
async fn payment_statuses_set_through_the_api_and_shadow_invoices_are_never_payable(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let live = live_invoice(&svc).await;
    let path = format!("/invoices/{}", live["lago_id"].as_str().unwrap());
    assert_eq!(
        (
            live["payment_status"].clone(),
            live["payment_overdue"].clone()
        ),
        (json!("pending"), json!(false))
    );
    assert_eq!(live["payment_due_date"], "2026-10-01");

    let (status, body) = svc
        .put(&path, json!({"invoice": {"payment_status": "paid"}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"payment_status": ["value_is_invalid"]})
    );
    let (status, body) = svc
        .put(&path, json!({"invoice": {"payment_status": "failed"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["invoice"]["payment_status"], "failed");
    let (_, listed) = svc.get("/invoices?payment_status=failed").await;
    assert_eq!(listed["meta"]["total_count"], 1);
    let (_, listed) = svc.get("/invoices?payment_status=pending").await;
    assert_eq!(listed["meta"]["total_count"], 0);

    // Overdue once its due date (the issuing date, net 0) has ended in the
    // customer's zone (Toronto, UTC−4 in October).
    assert_eq!(
        mark_overdue(&pool, "2026-10-02T03:59:59Z".parse().unwrap())
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        mark_overdue(&pool, "2026-10-02T04:00:00Z".parse().unwrap())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        mark_overdue(&pool, "2026-10-03T04:00:00Z".parse().unwrap())
            .await
            .unwrap(),
        0,
        "once"
    );
    app.catch_up().await;
    let (_, shown) = svc.get(&path).await;
    assert_eq!(shown["invoice"]["payment_overdue"], true);
    let (_, paid) = svc
        .put(&path, json!({"invoice": {"payment_status": "succeeded"}}))
        .await;
    assert_eq!(
        (
            paid["invoice"]["payment_status"].clone(),
            paid["invoice"]["payment_overdue"].clone()
        ),
        (json!("succeeded"), json!(false))
    );

    // A shadow subscription's invoice: never payable, by API or by Stripe.
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
               "external_id": "shadow_1", "subscription_at": "2026-09-01T04:00:00Z", "shadow": true}}),
    )
    .await;
    close(&app, "2026-10-02T00:00:01Z").await;
    let (_, shadow) = svc.get("/invoices?status=finalized").await;
    let shadow = shadow["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["shadow"] == true)
        .unwrap()
        .clone();
    let (status, body) = svc
        .put(
            &format!("/invoices/{}", shadow["lago_id"].as_str().unwrap()),
            json!({"invoice": {"payment_status": "succeeded"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"payment_status": ["shadow_invoice_not_payable"]})
    );
    let outcome = deliver(
        &app,
        &event(
            "evt_s",
            "payment_intent.succeeded",
            Utc::now().timestamp(),
            intent("pi_s", &shadow["lago_id"]),
        ),
    )
    .await;
    assert_eq!(outcome["reason"], "shadow_invoice_not_payable");
    assert_eq!(
        mark_overdue(&pool, "2026-12-01T00:00:00Z".parse().unwrap())
            .await
            .unwrap(),
        0,
        "shadow invoices are never overdue"
    );

    // Another service's invoice is not found.
    let other = app.service("nexadesk").await;
    let (status, _) = other
        .put(&path, json!({"invoice": {"payment_status": "failed"}}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test]
async fn racing_deliveries_record_each_event_once_and_the_latest_status_wins(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let id = live_invoice(&svc).await["lago_id"].clone();
    let now = Utc::now().timestamp();
    // Five copies of one event, and ten events created a second apart
    // (failed, succeeded, failed, …; the last one created succeeded),
    // delivered all at once in reverse order of creation.
    let copy = event(
        "evt_copy",
        "payment_intent.payment_failed",
        now - 100,
        intent("pi_1", &id),
    );
    let mut payloads: Vec<String> = vec![copy; 5];
    for n in (0..10).rev() {
        let kind = if n % 2 == 1 {
            "payment_intent.succeeded"
        } else {
            "payment_intent.payment_failed"
        };
        payloads.push(event(
            &format!("evt_{n}"),
            kind,
            now + n,
            intent("pi_1", &id),
        ));
    }
    let outcomes = futures_util::future::join_all(payloads.iter().map(|p| deliver(&app, p))).await;
    let duplicates = outcomes
        .iter()
        .filter(|o| o["status"] == "duplicate")
        .count();
    assert_eq!(duplicates, 4, "{outcomes:?}");
    assert_eq!(stripe_events(&pool).await, 11);
    assert_eq!(
        invoice(&app, &svc, &id).await["payment_status"],
        "succeeded"
    );
    // Every recorded change moved forward in Stripe's time.
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT payload->'InvoicePaymentStatusUpdated'->>'occurred_at' FROM events \
         WHERE aggregate_type = 'Invoice' AND event_type = 'InvoicePaymentStatusUpdated' ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "no update older than the one before it");
    assert!(!times.is_empty());
}
