//! Webhooks out: endpoints (Lago's API, the secret shown once, rotation,
//! the SSRF guard), the outbox (messages per endpoint, stable ids, shadow
//! silence, rebuilds), delivery (signatures, the retry schedule with
//! injected time, Retry-After, 410, dead letters, redeliver, recover), two
//! dispatchers, and the control loop with NexaCloud's example receiver.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use ledger::app::BackgroundTasks;
use ledger::webhooks::address::AddressPolicy;
use ledger::webhooks::dispatcher::Dispatcher;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;

use crate::helpers::{
    close, ledger_cli, live_invoice, loopback, signalling_settings, spawn_app_with_settings,
    spawn_signalling_app, ServiceClient, TestApp,
};

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
}

impl Hit {
    fn header(&self, name: &str) -> String {
        self.headers[name].to_str().unwrap().to_string()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Queued answers: (status, Retry-After).
type Answers = Arc<Mutex<VecDeque<(u16, Option<&'static str>)>>>;

/// A receiver on a real socket: records every request and answers with
/// the queued answers (status, Retry-After), then 200.
#[derive(Clone)]
struct Receiver {
    url: String,
    paths: Arc<Mutex<Vec<String>>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    answers: Answers,
}

impl Receiver {
    async fn start() -> Receiver {
        let hits: Arc<Mutex<Vec<Hit>>> = Default::default();
        let answers: Answers = Default::default();
        let paths: Arc<Mutex<Vec<String>>> = Default::default();
        let (h, a, p) = (hits.clone(), answers.clone(), paths.clone());
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let (h, a, p) = (h.clone(), a.clone(), p.clone());
                async move {
                    let mut hits = h.lock().unwrap();
                    p.lock().unwrap().push(uri.path().to_string());
                    hits.push(Hit { headers, body });
                    drop(hits);
                    let (status, retry_after) =
                        a.lock().unwrap().pop_front().unwrap_or((200, None));
                    let mut response = axum::response::Response::new(axum::body::Body::from("ok"));
                    *response.status_mut() = AxumStatus::from_u16(status).unwrap();
                    if let Some(after) = retry_after {
                        response
                            .headers_mut()
                            .insert("retry-after", after.parse().unwrap());
                    }
                    response
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url,
            paths,
            hits,
            answers,
        }
    }

    fn answer(&self, answers: &[(u16, Option<&'static str>)]) {
        self.answers.lock().unwrap().extend(answers.iter().copied());
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

async fn endpoint(svc: &ServiceClient<'_>, url: &str, types: Option<&[&str]>) -> Value {
    let mut body = json!({"webhook_url": url, "signature_algo": "hmac"});
    if let Some(types) = types {
        body["event_types"] = json!(types);
    }
    let (status, created) = svc
        .post("/webhook_endpoints", json!({"webhook_endpoint": body}))
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    created["webhook_endpoint"].clone()
}

/// Standard Webhooks' signature, computed here independently.
fn standard_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", engine.encode(mac.finalize().into_bytes()))
}

fn lago_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn dispatcher(pool: &PgPool) -> Dispatcher {
    Dispatcher::new(pool.clone(), loopback())
}

async fn pass(app: &TestApp, at: DateTime<Utc>) -> ledger::webhooks::dispatcher::DispatchReport {
    app.catch_up().await;
    dispatcher(&app.pool).dispatch_once(at).await.unwrap()
}

async fn delivery(pool: &PgPool, message_id: &str) -> Value {
    ledger::webhooks::show(pool, message_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap()
}

fn utc(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

#[sqlx::test]
async fn endpoints_show_the_secret_once_rotate_and_refuse_private_addresses(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let created = endpoint(&svc, "http://127.0.0.1:9/hooks", None).await;
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let key = base64::engine::general_purpose::STANDARD
        .decode(&secret["whsec_".len()..])
        .unwrap();
    assert_eq!(key.len(), 32);
    assert_eq!(created["signature_algo"], "hmac");
    assert_eq!(created["status"], "active");
    let path = format!(
        "/webhook_endpoints/{}",
        created["lago_id"].as_str().unwrap()
    );
    let (_, shown) = svc.get(&path).await;
    assert_eq!(shown["webhook_endpoint"].get("secret"), None, "shown once");

    let (status, rotated) = svc.post(&format!("{path}/rotate_secret"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(rotated["webhook_endpoint"]["secret"], json!(secret));
    let (status, updated) = svc
        .put(
            &path,
            json!({"webhook_endpoint": {"event_types": ["invoice.created"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(
        updated["webhook_endpoint"]["event_types"],
        json!(["invoice.created"])
    );
    assert_eq!(
        updated["webhook_endpoint"]["webhook_url"],
        "http://127.0.0.1:9/hooks"
    );
    let (_, listed) = svc.get("/webhook_endpoints").await;
    assert_eq!(listed["meta"]["total_count"], 1);

    // Refused at creation, by field: every non-public range unless allowed.
    for (url, code) in [
        (
            "http://169.254.169.254/latest/meta-data",
            "address_not_allowed",
        ),
        ("http://10.0.0.5/hooks", "address_not_allowed"),
        ("http://[::ffff:192.168.1.1]/hooks", "address_not_allowed"),
        ("http://100.64.0.1/hooks", "address_not_allowed"),
        ("http://[fd00::1]/hooks", "address_not_allowed"),
        ("ftp://example.com/hooks", "url_is_invalid"),
    ] {
        let (status, body) = svc
            .post(
                "/webhook_endpoints",
                json!({"webhook_endpoint": {"webhook_url": url}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert_eq!(
            body["error_details"],
            json!({"webhook_url": [code]}),
            "{url}"
        );
    }
    let (status, body) = svc
        .post("/webhook_endpoints", json!({"webhook_endpoint": {"webhook_url": "https://example.com", "signature_algo": "jwt"}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"signature_algo": ["value_is_invalid"]})
    );

    // Loopback only through the allow list: a ledger without it refuses.
    let strict = spawn_app_with_settings(
        pool.clone(),
        ledger::app::Settings {
            providers: Default::default(),
            ..signalling_settings(BackgroundTasks::NONE)
        },
    )
    .await;
    let strict_svc = ServiceClient {
        app: &strict,
        key: svc.key.clone(),
    };
    for url in [
        "http://127.0.0.1:9/hooks",
        "http://localhost:9/hooks",
        "http://[::1]:9/",
    ] {
        let (status, body) = strict_svc
            .post(
                "/webhook_endpoints",
                json!({"webhook_endpoint": {"webhook_url": url}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}");
        assert_eq!(
            body["error_details"],
            json!({"webhook_url": ["address_not_allowed"]})
        );
    }

    let (status, _) = svc.delete(&path).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = svc.get(&path).await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("webhook_endpoint_not_found"))
    );
    let other = app.service("nexadesk").await;
    let (_, listed) = other.get("/webhook_endpoints").await;
    assert_eq!(
        listed["meta"]["total_count"], 0,
        "another service sees none"
    );
}

#[sqlx::test]
async fn messages_are_signed_both_ways_and_carry_the_subscription_metadata(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let receiver = Receiver::start().await;
    let created = endpoint(&svc, &receiver.url, None).await;
    let secret = created["secret"].as_str().unwrap();
    let invoice = live_invoice(&svc).await;

    let report = pass(&app, Utc::now()).await;
    assert_eq!(
        (report.enqueued, report.attempted, report.delivered),
        (3, 3, 3)
    );
    let hits = receiver.hits();
    let types: Vec<String> = hits
        .iter()
        .map(|h| h.json()["webhook_type"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = types.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["invoice.created", "invoice.drafted", "subscription.started"]
    );
    let created_hit = hits
        .iter()
        .find(|h| h.json()["webhook_type"] == "invoice.created")
        .unwrap();
    let body = created_hit.json();
    assert_eq!(body["object_type"], "invoice");
    assert_eq!(body["invoice"]["lago_id"], invoice["lago_id"]);
    assert_eq!(body["invoice"]["total_amount_cents"], 2147);
    assert_eq!(body["invoice"]["number"], "NEXACLOUD-000001");
    assert_eq!(
        body["invoice"]["subscriptions"][0]["metadata"],
        json!({"deployment_id": "deployment-42"})
    );
    let id = created_hit.header("webhook-id");
    let timestamp = created_hit.header("webhook-timestamp");
    assert_eq!(
        created_hit.header("webhook-signature"),
        standard_signature(secret, &id, &timestamp, &created_hit.body)
    );
    assert_eq!(
        created_hit.header("x-lago-signature"),
        lago_signature(secret, &created_hit.body)
    );
    assert_eq!(created_hit.header("x-lago-signature-algorithm"), "hmac");
    assert_eq!(created_hit.header("x-lago-unique-key"), id);
    assert_eq!(delivery(&pool, &id).await["status"], "delivered");
    assert_eq!(pass(&app, Utc::now()).await.attempted, 0, "delivered once");

    // Unpaid past its due date: one overdue message.
    let overdue = ledger::payments::mark_overdue(&pool, utc("2026-10-02T04:00:00Z"))
        .await
        .unwrap();
    assert_eq!(overdue, 1);
    assert_eq!(pass(&app, Utc::now()).await.delivered, 1);
    let last = receiver.hits().last().unwrap().json();
    assert_eq!(last["webhook_type"], "invoice.payment_overdue");
    assert_eq!(last["invoice"]["payment_overdue"], true);

    // During a rotation both secrets sign; the body and id stay the same.
    let path = format!(
        "/webhook_endpoints/{}",
        created["lago_id"].as_str().unwrap()
    );
    let (_, rotated) = svc.post(&format!("{path}/rotate_secret"), json!({})).await;
    let new_secret = rotated["webhook_endpoint"]["secret"].as_str().unwrap();
    assert!(
        ledger::webhooks::redeliver(&pool, id.parse().unwrap(), Utc::now())
            .await
            .unwrap()
    );
    pass(&app, Utc::now()).await;
    let again = receiver.hits().last().unwrap().clone();
    assert_eq!(
        (again.header("webhook-id"), again.body.clone()),
        (id.clone(), created_hit.body.clone())
    );
    let timestamp = again.header("webhook-timestamp");
    assert_eq!(
        again.header("webhook-signature"),
        format!(
            "{} {}",
            standard_signature(new_secret, &id, &timestamp, &again.body),
            standard_signature(secret, &id, &timestamp, &again.body)
        )
    );
    let mut tampered = again.body.to_vec();
    tampered[10] ^= 1;
    assert_ne!(
        again.header("webhook-signature").split(' ').next().unwrap(),
        standard_signature(new_secret, &id, &timestamp, &tampered)
    );
    assert_eq!(delivery(&pool, &id).await["attempts"], 2);
    assert_eq!(receiver.hits().len(), 5);
}

#[sqlx::test]
async fn failed_attempts_follow_the_schedule_honour_retry_after_and_end_as_dead_letters(
    pool: PgPool,
) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let receiver = Receiver::start().await;
    endpoint(&svc, &receiver.url, Some(&["invoice.created"])).await;
    live_invoice(&svc).await;
    let t0 = utc("2026-12-03T10:00:00Z");
    receiver.answer(&[
        (500, None),
        (503, Some("3600")),
        (502, None),
        (500, None),
        (500, None),
        (500, None),
        (500, None),
        (500, None),
    ]);

    let first = pass(&app, t0).await;
    assert_eq!(
        (first.enqueued, first.attempted, first.delivered),
        (1, 1, 0)
    );
    let id = receiver.hits()[0].header("webhook-id");
    let due = |d: &Value| utc(d["next_attempt_at"].as_str().unwrap());
    let shown = delivery(&pool, &id).await;
    let wait = due(&shown) - t0;
    assert!(
        wait >= Duration::seconds(4) && wait <= Duration::seconds(6),
        "{wait}"
    );
    assert_eq!(shown["attempts_made"][0]["status_code"], 500);
    assert_eq!(
        pass(&app, t0 + Duration::seconds(3)).await.attempted,
        0,
        "not yet due"
    );

    // Attempt 2 answers 503 with Retry-After: 3600 (beyond the 5 min step).
    let t2 = due(&shown);
    assert_eq!(pass(&app, t2).await.attempted, 1);
    let shown = delivery(&pool, &id).await;
    assert_eq!(due(&shown) - t2, Duration::seconds(3600));
    assert_eq!(pass(&app, t2 + Duration::seconds(3599)).await.attempted, 0);

    // The rest of the schedule: 30 min, 2 h, 5 h, 10 h, 10 h (±20%).
    let mut at = due(&shown);
    for (attempt, base) in (3..=7).zip([1_800, 7_200, 18_000, 36_000, 36_000]) {
        assert_eq!(pass(&app, at).await.attempted, 1, "attempt {attempt}");
        let shown = delivery(&pool, &id).await;
        let wait = (due(&shown) - at).num_seconds();
        assert!(
            (base * 8 / 10..=base * 12 / 10).contains(&wait),
            "after attempt {attempt}: {wait}s"
        );
        at = due(&shown);
    }
    let last = pass(&app, at).await;
    assert_eq!((last.attempted, last.dead), (1, 1));
    let shown = delivery(&pool, &id).await;
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["attempts"], 8);
    assert_eq!(shown["attempts_made"].as_array().unwrap().len(), 8);
    assert_eq!(
        pass(&app, at + Duration::days(30)).await.attempted,
        0,
        "a dead letter stays"
    );
    let bodies: std::collections::BTreeSet<Bytes> =
        receiver.hits().into_iter().map(|h| h.body).collect();
    assert_eq!(bodies.len(), 1, "every attempt sent the same bytes");

    // Listed as failed; redelivered by an operator (CLI), it goes out.
    let listed = ledger_cli(&pool, &["webhooks", "list", "--status", "failed"]);
    assert!(listed.status.success());
    let lines: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["message_id"], json!(id));
    assert_eq!(lines[0]["webhook_type"], "invoice.created");
    let redelivered = ledger_cli(&pool, &["webhooks", "redeliver", &id]);
    assert!(
        redelivered.status.success(),
        "{}",
        String::from_utf8_lossy(&redelivered.stderr)
    );
    let report = dispatcher(&pool).dispatch_once(Utc::now()).await.unwrap();
    assert_eq!(report.delivered, 1);
    let shown = delivery(&pool, &id).await;
    assert_eq!(
        (shown["status"].clone(), shown["attempts"].clone()),
        (json!("delivered"), json!(9))
    );
    assert_eq!(receiver.hits().len(), 9);
    // The same over the operator API.
    let (status, body) = app
        .post_admin(&format!("/admin/v1/webhooks/{id}/redeliver"), "")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["webhook"]["status"].clone(),
            body["webhook"]["attempts"].clone()
        ),
        (json!("pending"), json!(9))
    );
    assert_eq!(
        body["webhook"]["attempts_made"].as_array().unwrap().len(),
        9
    );
    let (status, _) = app
        .post_admin("/admin/v1/webhooks/not-an-id/redeliver", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test]
async fn gone_endpoints_are_disabled_and_failures_recovered_since_a_time(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let gone = Receiver::start().await;
    let flaky = Receiver::start().await;
    let gone_endpoint = endpoint(&svc, &gone.url, None).await;
    let flaky_endpoint = endpoint(
        &svc,
        &flaky.url,
        Some(&["invoice.created", "invoice.drafted"]),
    )
    .await;
    gone.answer(&[(410, None), (410, None), (410, None)]);
    live_invoice(&svc).await;

    let t0 = Utc::now();
    let report = pass(&app, t0).await;
    assert_eq!((report.attempted, report.delivered, report.dead), (5, 2, 3));
    app.catch_up().await;
    let path = format!(
        "/webhook_endpoints/{}",
        gone_endpoint["lago_id"].as_str().unwrap()
    );
    let (_, shown) = svc.get(&path).await;
    assert_eq!(
        (
            shown["webhook_endpoint"]["status"].clone(),
            shown["webhook_endpoint"]["disabled_reason"].clone()
        ),
        (json!("disabled"), json!("410 Gone"))
    );
    // A disabled endpoint gets no new messages.
    let (status, _) = svc.delete("/subscriptions/dep_1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pass(&app, t0).await.enqueued, 0);
    let (status, failed) = app
        .get_admin(&format!(
            "/admin/v1/webhooks?status=failed&endpoint={}",
            gone_endpoint["lago_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(failed["webhooks"].as_array().unwrap().len(), 3);
    assert_eq!(failed["webhooks"][0]["last_error"], "HTTP 410");
    assert_eq!(gone.hits().len(), 3);

    // The flaky endpoint is down for the whole schedule, then back.
    flaky.hits.lock().unwrap().clear();
    let flaky_id = flaky_endpoint["lago_id"].as_str().unwrap().to_string();
    sqlx::query("UPDATE webhook_deliveries SET status = 'failed', attempts = 8 WHERE endpoint_lago_id = $1::uuid")
        .bind(&flaky_id)
        .execute(&pool)
        .await
        .unwrap();
    let (status, body) = app
        .post_admin(
            "/admin/v1/webhooks/recover",
            &json!({"endpoint": flaky_id, "since": (Utc::now() + Duration::days(1)).to_rfc3339()})
                .to_string(),
        )
        .await;
    assert_eq!(
        (status, body["queued"].clone()),
        (StatusCode::OK, json!(0)),
        "none created since then"
    );
    let (status, body) = app
        .post_admin(
            "/admin/v1/webhooks/recover",
            &json!({"endpoint": flaky_id, "since": "2026-01-01T00:00:00Z"}).to_string(),
        )
        .await;
    assert_eq!((status, body["queued"].clone()), (StatusCode::OK, json!(2)));
    let (status, body) = app
        .post_admin(
            "/admin/v1/webhooks/recover",
            &json!({"since": "x"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, body["error_details"].clone()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"endpoint": ["value_is_mandatory"]})
        )
    );
    let report = pass(&app, Utc::now()).await;
    assert_eq!(report.delivered, 2);
    assert_eq!(flaky.hits().len(), 2);
    let (status, _) = app.get("/admin/v1/webhooks", Some("not-the-key")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .get_admin("/admin/v1/webhooks/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test]
async fn delivery_refuses_addresses_outside_the_policy_again(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let receiver = Receiver::start().await;
    let named = receiver.url.replace("127.0.0.1", "localhost");
    endpoint(&svc, &receiver.url, Some(&["subscription.started"])).await;
    endpoint(&svc, &named, Some(&["subscription.started"])).await;
    live_invoice(&svc).await;
    app.catch_up().await;
    // A dispatcher whose policy no longer allows loopback.
    let strict = Dispatcher::new(pool.clone(), AddressPolicy::default());
    let report = strict.dispatch_once(Utc::now()).await.unwrap();
    assert_eq!((report.attempted, report.delivered), (2, 0));
    assert!(receiver.hits().is_empty(), "nothing reached the receiver");
    let failed = ledger::webhooks::list(
        &pool,
        &ledger::webhooks::DeliveryFilter {
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let errors: Vec<String> = failed
        .iter()
        .map(|d| d["last_error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors.len(), 2);
    assert!(
        errors
            .iter()
            .all(|e| e.contains("address_not_allowed (loopback)")),
        "{errors:?}"
    );
}

#[sqlx::test]
async fn shadow_subscriptions_never_speak_until_flipped(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let receiver = Receiver::start().await;
    endpoint(&svc, &receiver.url, None).await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
               "external_id": "shadow_1", "subscription_at": "2026-09-01T04:00:00Z", "shadow": true}}),
    )
    .await;
    close(&app, "2026-10-02T00:00:00Z").await;
    let (status, _) = svc.post("/subscriptions/shadow_1/suspend", json!({})).await;
    let report = pass(&app, Utc::now()).await;
    assert_eq!(
        report.enqueued, 0,
        "no message for a shadow subscription ({status})"
    );
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(messages, 0);

    // Flipped live: from then on it speaks.
    let stream = "nexacloud/shadow_1";
    let version: i64 = sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_type = 'Subscription' AND aggregate_id = $1")
        .bind(stream).fetch_one(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let flipped = aggregates::subscription::SubscriptionEvent::SubscriptionFlipped {
        live_from: utc("2026-11-01T04:00:00Z"),
        flipped_at: utc("2026-10-15T00:00:00Z"),
    };
    ledger::event_log::append::append_events(
        &mut conn,
        "Subscription",
        &[ledger::event_log::append::NewEvent {
            stream: stream.into(),
            sequence: version + 1,
            event_type: "SubscriptionFlipped".into(),
            payload: serde_json::to_value(&flipped).unwrap(),
        }],
        ledger::event_log::store::CommandMetadata::cli(),
        ledger::event_log::append::OnConflict::Fail,
    )
    .await
    .unwrap();
    drop(conn);
    let (status, body) = svc.delete("/subscriptions/shadow_1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let report = pass(&app, Utc::now()).await;
    assert_eq!(report.delivered, 1);
    let hit = receiver.hits()[0].json();
    assert_eq!(hit["webhook_type"], "subscription.terminated");
    assert_eq!(hit["subscription"]["external_id"], "shadow_1");
    assert_eq!(hit["subscription"]["status"], "terminated");
    assert_eq!(hit["subscription"]["live_from"], "2026-11-01T04:00:00Z");
    assert_ne!(hit["subscription"]["terminated_at"], Value::Null);
}

#[sqlx::test]
async fn a_rebuild_of_the_outbox_yields_the_same_messages_and_sends_none_again(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let receiver = Receiver::start().await;
    endpoint(&svc, &receiver.url, None).await;
    live_invoice(&svc).await;
    assert_eq!(pass(&app, Utc::now()).await.delivered, 3);
    let ids = |pool: PgPool| async move {
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM webhook_messages ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let before = ids(pool.clone()).await;
    let runner = ledger::event_log::projection_runner::ProjectionRunner::for_all(pool.clone())
        .await
        .unwrap();
    let outbox = projections::all()
        .into_iter()
        .find(|p| p.name() == "webhooks")
        .unwrap();
    ledger::event_log::projection_runner::reset(&pool, outbox.as_ref())
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    assert_eq!(ids(pool.clone()).await, before, "same ids");
    let report = pass(&app, Utc::now()).await;
    assert_eq!((report.enqueued, report.attempted), (0, 0));
    assert_eq!(receiver.hits().len(), 3);
}

#[sqlx::test]
async fn two_ledgers_on_one_database_deliver_each_message_once(pool: PgPool) {
    let tasks = BackgroundTasks {
        projections: true,
        webhooks: true,
        ..BackgroundTasks::NONE
    };
    let first = spawn_app_with_settings(pool.clone(), signalling_settings(tasks)).await;
    let _second = spawn_app_with_settings(pool.clone(), signalling_settings(tasks)).await;
    let svc = first.service("nexacloud").await;
    let receiver = Receiver::start().await;
    for _ in 0..4 {
        endpoint(&svc, &receiver.url, Some(&["subscription.started"])).await;
    }
    svc.nexacloud_catalog().await;
    for n in 0..50 {
        svc.created(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": format!("dep_{n}")}}),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while receiver.hits().len() < 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for hit in receiver.hits() {
        *counts.entry(hit.header("webhook-id")).or_default() += 1;
    }
    assert_eq!(counts.len(), 200, "every message arrived");
    assert!(counts.values().all(|n| *n == 1), "each exactly once");
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(delivered, 200);
}

/// NexaCloud's example receiver (`examples/nexacloud_receiver.py`, which
/// verifies with the official `standardwebhooks` library) on a free port.
struct ExampleReceiver {
    child: std::process::Child,
    url: String,
}

impl Drop for ExampleReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_example_receiver(secret: &str, api: &str) -> ExampleReceiver {
    use std::io::BufRead;
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/target/lago-venv/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: scripts/test creates it (the Python client's virtual environment)"
    );
    let mut child = std::process::Command::new(python)
        .arg(format!("{root}/examples/nexacloud_receiver.py"))
        .args(["--port", "0", "--secret", secret, "--api", api])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the example receiver starts");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let listening: Value = serde_json::from_str(&line).expect("it prints its port");
    std::thread::spawn(move || for _ in stdout.lines() {});
    ExampleReceiver {
        child,
        url: format!("http://127.0.0.1:{}/", listening["listening"]),
    }
}

/// The paths of NexaCloud's API the receiver called, in order.
fn calls(api: &Receiver) -> Vec<String> {
    api.paths.lock().unwrap().clone()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[sqlx::test]
async fn the_control_loop_suspends_restores_and_deprovisions_a_deployment(pool: PgPool) {
    use crate::payments::{deliver, event, intent};
    let tasks = BackgroundTasks {
        projections: true,
        webhooks: true,
        ..BackgroundTasks::NONE
    };
    let app = spawn_app_with_settings(pool.clone(), signalling_settings(tasks)).await;
    let svc = app.service("nexacloud").await;
    let nexacloud_api = Receiver::start().await;
    let created = endpoint(&svc, &nexacloud_api.url, None).await;
    let secret = created["secret"].as_str().unwrap();
    let api_base = nexacloud_api.url.trim_end_matches("/hooks").to_string();
    let receiver = start_example_receiver(secret, &api_base);
    let path = format!(
        "/webhook_endpoints/{}",
        created["lago_id"].as_str().unwrap()
    );
    let (status, _) = svc
        .put(
            &path,
            json!({"webhook_endpoint": {"webhook_url": receiver.url}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // A forged delivery is refused by the receiver's verification.
    let forged = reqwest::Client::new()
        .post(&receiver.url)
        .header("webhook-id", "msg_forged")
        .header("webhook-timestamp", Utc::now().timestamp().to_string())
        .header("webhook-signature", "v1,Zm9yZ2Vk")
        .body(
            r#"{"webhook_type":"subscription.terminated","subscription":{"external_id":"dep_1"}}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);

    let invoice = live_invoice(&svc).await;
    let now = Utc::now().timestamp();
    deliver(
        &app,
        &event(
            "evt_fail",
            "payment_intent.payment_failed",
            now,
            intent("pi_1", &invoice["lago_id"]),
        ),
    )
    .await;
    until("suspend", || calls(&nexacloud_api).len() == 1).await;
    deliver(
        &app,
        &event(
            "evt_ok",
            "payment_intent.succeeded",
            now + 1,
            intent("pi_1", &invoice["lago_id"]),
        ),
    )
    .await;
    until("restore", || calls(&nexacloud_api).len() == 2).await;
    let (status, _) = svc.delete("/subscriptions/dep_1").await;
    assert_eq!(status, StatusCode::OK);
    until("deprovision", || calls(&nexacloud_api).len() == 3).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        calls(&nexacloud_api),
        [
            "/subscriptions/deployment-42/suspend",
            "/subscriptions/deployment-42/restore",
            "/subscriptions/deployment-42/deprovision"
        ],
        "each signal once, in order"
    );
    let ids: std::collections::BTreeSet<String> = nexacloud_api
        .hits()
        .iter()
        .map(|h| h.header("x-webhook-id"))
        .collect();
    assert_eq!(ids.len(), 3, "three distinct messages");
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        failed, 0,
        "every message was accepted (signatures verified)"
    );
}

#[sqlx::test]
async fn a_message_claimed_by_a_dispatcher_that_died_is_sent_again_with_its_id(pool: PgPool) {
    let app = spawn_signalling_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let receiver = Receiver::start().await;
    endpoint(&svc, &receiver.url, Some(&["invoice.created"])).await;
    live_invoice(&svc).await;
    app.catch_up().await;
    let t0 = utc("2026-12-03T10:00:00Z");
    let outbox = dispatcher(&pool);
    assert_eq!(outbox.enqueue(t0).await.unwrap(), 1);
    // A dispatcher claimed it, sent it, and crashed before recording.
    let id: uuid::Uuid =
        sqlx::query_scalar("UPDATE webhook_deliveries SET claimed_until = $1 RETURNING message_id")
            .bind(t0 + Duration::seconds(60))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        outbox
            .dispatch_once(t0 + Duration::seconds(30))
            .await
            .unwrap()
            .attempted,
        0,
        "its lease holds"
    );
    let report = outbox
        .dispatch_once(t0 + Duration::seconds(60))
        .await
        .unwrap();
    assert_eq!(
        (report.attempted, report.delivered),
        (1, 1),
        "the lease expired: sent again"
    );
    assert_eq!(receiver.hits()[0].header("webhook-id"), id.to_string());
}
