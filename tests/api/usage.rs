//! Usage ingestion: idempotency as a database fact, batches all or nothing,
//! per-event validation, the aggregation projection, and current usage.

use chrono::{Duration, Timelike, Utc};
use ledger::event_log::projection_runner::{self, ProjectionRunner};
use projections::{Projection, Usage};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{spawn_app, spawn_app_with, spawn_app_with_limits, ServiceClient, TestApp};

fn ago(duration: Duration) -> i64 {
    (Utc::now() - duration).timestamp()
}

/// NexaCloud's catalog plus a subscription that started ten days ago, and
/// extra metrics of every aggregation type charged on a second plan.
async fn setup(app: &TestApp) -> ServiceClient<'_> {
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    let started = (Utc::now() - Duration::days(10)).to_rfc3339();
    for external_id in ["dep_1", "dep_2"] {
        svc.created(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": external_id, "subscription_at": started}}),
        )
        .await;
    }
    svc
}

fn event(transaction_id: &str, subscription: &str, seconds: Value, at: i64) -> Value {
    json!({"transaction_id": transaction_id, "external_subscription_id": subscription, "code": "cpu_seconds",
           "timestamp": at, "properties": {"cpu_seconds": seconds}})
}

async fn usage_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Usage'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn an_event_is_recorded_once_and_read_back_exactly_as_sent(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let at = ago(Duration::minutes(1));
    let body =
        json!({"event": event("tx_1", "dep_1", serde_json::from_str("1234.5000").unwrap(), at)});
    let (status, first) = svc.post("/events", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["event"]["transaction_id"], "tx_1");
    assert_eq!(
        first["event"]["properties"]["cpu_seconds"].to_string(),
        "1234.5000"
    );

    // A retry of the same event: the original, counted once.
    let (status, retry) = svc.post("/events", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retry["event"]["lago_id"], first["event"]["lago_id"]);
    assert_eq!(usage_events(&pool).await, 1);

    let stored: String =
        sqlx::query_scalar("SELECT payload::text FROM events WHERE aggregate_type = 'Usage'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        stored.contains(r#""cpu_seconds":1234.5000"#),
        "stored exactly as sent: {stored}"
    );

    app.catch_up().await;
    let (status, found) = svc.get("/events/tx_1?external_subscription_id=dep_1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found["event"]["lago_id"], first["event"]["lago_id"]);
    assert_eq!(
        found["event"]["properties"]["cpu_seconds"].to_string(),
        "1234.5000"
    );
    let (status, missing) = svc.get("/events/tx_1?external_subscription_id=dep_2").await;
    assert_eq!(
        (status, missing["code"].clone()),
        (StatusCode::NOT_FOUND, json!("event_not_found"))
    );
}

#[sqlx::test]
async fn the_same_key_with_other_content_is_refused_and_the_original_stands(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let at = ago(Duration::minutes(1));
    svc.created(
        "/events",
        json!({"event": event("tx_1", "dep_1", json!(100), at)}),
    )
    .await;
    let (status, body) = svc
        .post(
            "/events",
            json!({"event": event("tx_1", "dep_1", json!(999), at)}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"transaction_id": ["value_already_exist"]})
    );
    assert_eq!(usage_events(&pool).await, 1);
    app.catch_up().await;
    let (_, found) = svc.get("/events/tx_1?external_subscription_id=dep_1").await;
    assert_eq!(found["event"]["properties"]["cpu_seconds"], 100);

    // The same transaction id on another subscription is another event.
    svc.created(
        "/events",
        json!({"event": event("tx_1", "dep_2", json!(5), at)}),
    )
    .await;
    assert_eq!(usage_events(&pool).await, 2);
}

#[sqlx::test]
async fn thirty_two_concurrent_posts_of_one_event_record_it_once(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let body = json!({"event": event("tx_race", "dep_1", json!(42), ago(Duration::minutes(1)))});
    let url = format!("{}/api/v1/events", app.address);
    let posts: Vec<_> = (0..32)
        .map(|_| {
            let request = app.client.post(&url).bearer_auth(&svc.key).json(&body);
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                (status, body["event"]["lago_id"].clone())
            })
        })
        .collect();
    let mut ids = Vec::new();
    for post in posts {
        let (status, id) = post.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every response names the one event");
    assert_eq!(usage_events(&pool).await, 1);
}

/// Hold the ingest path's only appender: a transaction of the test writes
/// (uncommitted) the log row an event is about to be appended as, then the
/// event is posted; its append statement waits on that row. Returns the
/// transaction (roll it back to let the appender go) and the post.
async fn hold_the_appender(
    app: &TestApp,
    svc: &ServiceClient<'_>,
    transaction_id: &str,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<(StatusCode, Value)>,
) {
    let (_, subscription) = svc.get("/subscriptions/dep_1").await;
    let subscription: uuid::Uuid = subscription["subscription"]["lago_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut blocker = app.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Usage', $1, 1, 'UsageRecorded', '1.0', '{}', '{}')",
    )
    .bind(aggregates::usage::usage_stream_id(subscription, "cpu_seconds", transaction_id))
    .execute(&mut *blocker)
    .await
    .unwrap();
    let held = post(
        app,
        svc,
        event(transaction_id, "dep_1", json!(1), ago(Duration::minutes(1))),
    );
    // Until the append statement waits for the test's row.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO events%'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the append never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    (blocker, held)
}

/// Post `events` (each alone) while the only appender is held, give them a
/// second to queue, release it; the answers, in order.
async fn queued_behind_a_held_append(
    app: &TestApp,
    svc: &ServiceClient<'_>,
    held_id: &str,
    events: Vec<Value>,
) -> Vec<(StatusCode, Value)> {
    let (blocker, held) = hold_the_appender(app, svc, held_id).await;
    let posts: Vec<_> = events.into_iter().map(|e| post(app, svc, e)).collect();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    blocker.rollback().await.unwrap();
    assert_eq!(held.await.unwrap().0, StatusCode::OK);
    let mut answers = vec![];
    for post in posts {
        answers.push(post.await.unwrap());
    }
    answers
}

/// Post one event on a task of its own.
fn post(
    app: &TestApp,
    svc: &ServiceClient<'_>,
    event: Value,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let request = app
        .client
        .post(format!("{}/api/v1/events", app.address))
        .bearer_auth(&svc.key)
        .json(&json!({ "event": event }));
    tokio::spawn(async move {
        let response = request.send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    })
}

/// Appends that arrive while the appender is busy share its next statement
/// and commit, and each request still gets its own answer: the others are
/// recorded once each, a retry with the same content is answered with the
/// original, and a conflicting retry among them is refused alone (the
/// shared statement fails whole, so each of its appends runs again alone).
#[sqlx::test]
async fn appends_that_arrive_together_share_a_commit_and_keep_their_own_answers(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), Default::default(), 1).await;
    let svc = setup(&app).await;
    let at = ago(Duration::minutes(1));
    let (status, original) = svc
        .post(
            "/events",
            json!({"event": event("tx_old", "dep_1", json!(5), at)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let transactions = |ids: Vec<String>| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT transaction_id) FROM events \
                 WHERE aggregate_type = 'Usage' AND payload -> 'UsageRecorded' -> 'sent' ->> 'transaction_id' = ANY($1)",
            )
            .bind(ids)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // Ten new events and a same-content retry queue behind a held append.
    let new: Vec<String> = (0..10).map(|i| format!("tx_new_{i}")).collect();
    let mut events: Vec<Value> = new
        .iter()
        .map(|id| event(id, "dep_2", json!(2), at))
        .collect();
    events.push(event("tx_old", "dep_1", json!(5), at));
    let mut answers = queued_behind_a_held_append(&app, &svc, "tx_held", events).await;
    let retry = answers.pop().unwrap();
    assert_eq!(retry.0, StatusCode::OK, "{}", retry.1);
    assert_eq!(retry.1["event"]["lago_id"], original["event"]["lago_id"]);
    for (status, body) in answers {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(transactions(new.clone()).await, 1, "one shared commit");
    assert_eq!(usage_events(&pool).await, 12, "tx_old, tx_held and ten new");

    // Five more and a conflicting retry: the conflict is refused alone.
    let mut events: Vec<Value> = (0..5)
        .map(|i| event(&format!("tx_more_{i}"), "dep_2", json!(3), at))
        .collect();
    events.push(event("tx_old", "dep_1", json!(6), at));
    let mut answers = queued_behind_a_held_append(&app, &svc, "tx_held_2", events).await;
    let conflict = answers.pop().unwrap();
    assert_eq!(conflict.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        conflict.1["error_details"],
        json!({"transaction_id": ["value_already_exist"]})
    );
    for (status, body) in answers {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(usage_events(&pool).await, 18, "five more and tx_held_2");
    let (_, kept) = svc
        .get("/events/tx_old?external_subscription_id=dep_1")
        .await;
    assert_eq!(kept["event"]["properties"]["cpu_seconds"], json!(5));
}

#[sqlx::test]
async fn a_batch_is_all_or_nothing_and_a_replayed_batch_counts_once(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let at = ago(Duration::minutes(2));
    let batch: Vec<Value> = (0..100)
        .map(|i| event(&format!("tx_{i}"), "dep_1", json!(i), at))
        .collect();
    let (status, body) = svc.post("/events/batch", json!({ "events": batch })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["events"].as_array().unwrap().len(), 100);
    // The client timed out and sends the whole batch again.
    let (status, replay) = svc.post("/events/batch", json!({ "events": batch })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        replay["events"][57]["lago_id"],
        body["events"][57]["lago_id"]
    );
    assert_eq!(usage_events(&pool).await, 100);

    // One conflicting event refuses the batch: nothing of it is appended.
    let mixed = vec![
        event("tx_new_1", "dep_1", json!(1), at),
        event("tx_5", "dep_1", json!(999), at),
        event("tx_new_2", "dep_1", json!(1), at),
    ];
    let (status, body) = svc.post("/events/batch", json!({ "events": mixed })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"1": {"transaction_id": ["value_already_exist"]}})
    );
    assert_eq!(usage_events(&pool).await, 100);

    let (status, body) = svc.post("/events/batch", json!({"events": []})).await;
    assert_eq!(
        (status, body["error_details"].clone()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"events": ["no_events"]})
        )
    );
    let too_many: Vec<Value> = (0..101)
        .map(|i| event(&format!("tx_x{i}"), "dep_1", json!(1), at))
        .collect();
    let (status, body) = svc
        .post("/events/batch", json!({ "events": too_many }))
        .await;
    assert_eq!(
        (status, body["error_details"].clone()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"events": ["too_many_events"]})
        )
    );
}

#[sqlx::test]
async fn every_invalid_event_is_refused_naming_the_reason(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let other = app.service("nexadesk").await;
    other.nexacloud_catalog().await;
    other
        .created("/subscriptions", json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                  "external_id": "desk_sub", "subscription_at": (Utc::now() - Duration::days(3)).to_rfc3339()}}))
        .await;
    svc.created("/subscriptions", json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                 "external_id": "dep_later", "subscription_at": (Utc::now() + Duration::days(3)).to_rfc3339()}}))
        .await;
    svc.delete("/subscriptions/dep_2").await;
    let now = ago(Duration::seconds(1));
    // Usage from before the termination is still accepted (it arrived late).
    svc.created(
        "/events",
        json!({"event": event("late", "dep_2", json!(1), ago(Duration::minutes(5)))}),
    )
    .await;
    let cases = vec![
        (
            "unknown subscription",
            event("a", "nope", json!(1), now),
            json!({"external_subscription_id": ["subscription_not_found"]}),
        ),
        (
            "another service's subscription",
            event("a", "desk_sub", json!(1), now),
            json!({"external_subscription_id": ["subscription_not_found"]}),
        ),
        (
            "after its termination",
            event("a", "dep_2", json!(1), ago(Duration::seconds(-60))),
            json!({"timestamp": ["subscription_not_active_at_timestamp"]}),
        ),
        (
            "not yet started",
            event("a", "dep_later", json!(1), now),
            json!({"timestamp": ["subscription_not_active_at_timestamp"]}),
        ),
        (
            "metric not on the plan",
            json!({"transaction_id": "a", "external_subscription_id": "dep_1", "code": "gpu", "timestamp": now}),
            json!({"code": ["metric_not_found"]}),
        ),
        (
            "property missing",
            json!({"transaction_id": "a", "external_subscription_id": "dep_1", "code": "cpu_seconds", "timestamp": now, "properties": {}}),
            json!({"properties.cpu_seconds": ["value_is_mandatory"]}),
        ),
        (
            "not numeric",
            event("a", "dep_1", json!("12abc"), now),
            json!({"properties.cpu_seconds": ["value_is_not_numeric"]}),
        ),
        (
            "negative",
            event("a", "dep_1", json!(-3), now),
            json!({"properties.cpu_seconds": ["value_is_negative"]}),
        ),
        (
            "unparseable timestamp",
            event("a", "dep_1", json!(1), 0)
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("timestamp".into(), json!("last tuesday"));
                    Value::Object(o)
                })
                .unwrap(),
            json!({"timestamp": ["invalid_timestamp"]}),
        ),
        (
            "too far in the future",
            event("a", "dep_1", json!(1), ago(Duration::minutes(-6))),
            json!({"timestamp": ["too_far_in_the_future"]}),
        ),
        (
            "too old",
            event("a", "dep_1", json!(1), ago(Duration::days(36))),
            json!({"timestamp": ["older_than_acceptance_window"]}),
        ),
        (
            "no transaction id",
            json!({"external_subscription_id": "dep_1", "code": "cpu_seconds", "timestamp": now, "properties": {"cpu_seconds": 1}}),
            json!({"transaction_id": ["value_is_mandatory"]}),
        ),
    ];
    for (case, body, expected) in &cases {
        let (status, response) = svc.post("/events", json!({ "event": body })).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{case}: {response}"
        );
        assert_eq!(&response["error_details"], expected, "{case}");
    }
    // In a batch, errors are keyed by index.
    let batch: Vec<Value> = vec![
        event("ok", "dep_1", json!(1), now),
        cases[0].1.clone(),
        cases[6].1.clone(),
    ];
    let (status, response) = svc.post("/events/batch", json!({ "events": batch })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        response["error_details"],
        json!({"1": {"external_subscription_id": ["subscription_not_found"]},
               "2": {"properties.cpu_seconds": ["value_is_not_numeric"]}})
    );
    assert_eq!(usage_events(&pool).await, 1, "only the late one");
}

#[sqlx::test]
async fn shadow_subscriptions_accept_usage_like_live_ones(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                 "external_id": "dep_shadow", "shadow": true,
                 "subscription_at": (Utc::now() - Duration::days(1)).to_rfc3339()}}),
    )
    .await;
    let (status, _) = svc
        .post(
            "/events",
            json!({"event": event("tx_1", "dep_shadow", json!(10), ago(Duration::minutes(1)))}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(usage_events(&pool).await, 1);
}

/// A plan charging one metric of every aggregation type, and a subscription on it.
async fn every_aggregation(svc: &ServiceClient<'_>) {
    let mut charges = Vec::new();
    for aggregation in [
        "count_agg",
        "sum_agg",
        "max_agg",
        "unique_count_agg",
        "latest_agg",
        "weighted_sum_agg",
    ] {
        let metric = svc
            .created(
                "/billable_metrics",
                json!({"billable_metric": {"name": aggregation, "code": aggregation,
                      "aggregation_type": aggregation, "field_name": "v"}}),
            )
            .await;
        charges.push(json!({"billable_metric_id": metric["billable_metric"]["lago_id"], "charge_model": "standard",
                            "properties": {"amount": "1"}}));
    }
    svc.created(
        "/plans",
        json!({"plan": {"name": "All", "code": "all", "interval": "monthly", "amount_cents": 0,
                 "amount_currency": "CAD", "charges": charges}}),
    )
    .await;
    svc.created("/subscriptions", json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "all",
                 "external_id": "dep_all", "subscription_at": (Utc::now() - Duration::days(20)).to_rfc3339()}}))
        .await;
}

/// metric, events, sum, max, latest, distinct values.
type AggregateRow = (
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
);

async fn aggregate_rows(pool: &PgPool) -> Vec<AggregateRow> {
    sqlx::query_as(
        "SELECT metric_code, events_count, value_sum::text, value_max::text, latest_value::text, unique_count \
         FROM usage_aggregates ORDER BY metric_code, period_start",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn the_usage_projection_aggregates_every_type_and_rebuilds_identically(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    every_aggregation(&svc).await;
    let mut events = Vec::new();
    // Values out of time order: latest is by timestamp, not arrival.
    for (i, (minutes_ago, value)) in [(30, "5"), (10, "2.5"), (50, "7"), (20, "2.5")]
        .iter()
        .enumerate()
    {
        for code in [
            "count_agg",
            "sum_agg",
            "max_agg",
            "unique_count_agg",
            "latest_agg",
            "weighted_sum_agg",
        ] {
            events.push(json!({"transaction_id": format!("tx_{i}"), "external_subscription_id": "dep_all", "code": code,
                               "timestamp": ago(Duration::minutes(*minutes_ago)), "properties": {"v": value}}));
        }
    }
    svc.created("/events/batch", json!({ "events": events }))
        .await;
    app.catch_up().await;
    let live = aggregate_rows(&pool).await;
    let expected: Vec<AggregateRow> = vec![
        ("count_agg".into(), 4, None, None, None, 0),
        (
            "latest_agg".into(),
            4,
            Some("17.0".into()),
            Some("7".into()),
            Some("2.5".into()),
            0,
        ),
        (
            "max_agg".into(),
            4,
            Some("17.0".into()),
            Some("7".into()),
            Some("2.5".into()),
            0,
        ),
        (
            "sum_agg".into(),
            4,
            Some("17.0".into()),
            Some("7".into()),
            Some("2.5".into()),
            0,
        ),
        ("unique_count_agg".into(), 4, None, None, None, 3),
        (
            "weighted_sum_agg".into(),
            4,
            Some("17.0".into()),
            Some("7".into()),
            Some("2.5".into()),
            0,
        ),
    ];
    assert_eq!(live, expected);

    projection_runner::reset(&pool, &Usage).await.unwrap();
    ProjectionRunner::new(pool.clone(), vec![Box::new(Usage)])
        .await
        .unwrap()
        .catch_up()
        .await
        .unwrap();
    assert_eq!(
        aggregate_rows(&pool).await,
        live,
        "rebuilt from the log: identical"
    );

    // The set-based batch fold equals folding one event at a time.
    projection_runner::reset(&pool, &Usage).await.unwrap();
    ProjectionRunner::new(pool.clone(), vec![Box::new(OneByOne)])
        .await
        .unwrap()
        .catch_up()
        .await
        .unwrap();
    assert_eq!(aggregate_rows(&pool).await, live, "one by one: identical");
}

/// The usage projection folded strictly one event at a time.
struct OneByOne;

#[async_trait::async_trait]
impl Projection for OneByOne {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn tables(&self) -> &'static [&'static str] {
        Usage.tables()
    }

    fn reads(&self) -> projections::log::Reads<'static> {
        Usage.reads()
    }

    async fn apply(
        &self,
        conn: &mut sqlx::PgConnection,
        event: &projections::LogEvent,
    ) -> Result<(), projections::ProjectionError> {
        Usage.apply(conn, event).await
    }
}

/// Current usage reads its writes: every event answered before the request
/// counts, though no runner folded it yet (the test app runs none; the
/// request drives the projections itself).
#[sqlx::test]
async fn current_usage_counts_every_event_answered_before_it(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let units = || async {
        let (status, body) = svc
            .get("/customers/cus_ada/current_usage?external_subscription_id=dep_1")
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let charge = &body["customer_usage"]["charges_usage"][0];
        (charge["units"].clone(), charge["events_count"].clone())
    };
    svc.created(
        "/events",
        json!({"event": event("tx_1", "dep_1", json!(1000), ago(Duration::minutes(2)))}),
    )
    .await;
    assert_eq!(units().await, (json!("1000"), json!(1)));
    svc.created(
        "/events/batch",
        json!({"events": [event("tx_2", "dep_1", json!(2000), ago(Duration::minutes(1))),
                          event("tx_3", "dep_1", json!("3000.5"), ago(Duration::minutes(1)))]}),
    )
    .await;
    assert_eq!(units().await, (json!("6000.5"), json!(3)));
}

#[sqlx::test]
async fn current_usage_prices_the_open_period_with_the_invoice_rules(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    // 36,000 s included; 396,000 s used: 100 core-hours over at $0.0075 = $0.75.
    let events: Vec<Value> = (0..4)
        .map(|i| {
            event(
                &format!("tx_{i}"),
                "dep_1",
                json!(99_000),
                ago(Duration::minutes(5 + i)),
            )
        })
        .collect();
    svc.created("/events/batch", json!({ "events": events }))
        .await;
    // Other subscription of the same customer: billed apart.
    svc.created(
        "/events",
        json!({"event": event("tx_0", "dep_2", json!(1_000_000), ago(Duration::minutes(1)))}),
    )
    .await;
    app.catch_up().await;

    let (status, body) = svc
        .get("/customers/cus_ada/current_usage?external_subscription_id=dep_1")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let usage = &body["customer_usage"];
    assert_eq!(usage["currency"], "CAD");
    assert_eq!(usage["amount_cents"], 75);
    // 13% HST of 75 cents = 9.75 → 10 (half-up).
    assert_eq!(usage["taxes_amount_cents"], 10);
    assert_eq!(usage["total_amount_cents"], 85);
    let charge = &usage["charges_usage"][0];
    assert_eq!(charge["units"], "396000");
    assert_eq!(charge["events_count"], 4);
    assert_eq!(charge["amount_cents"], 75);
    assert_eq!(charge["precise_amount"], "0.75");
    assert_eq!(charge["charge"]["charge_model"], "standard");
    assert_eq!(charge["billable_metric"]["aggregation_type"], "sum_agg");
    for field in ["from_datetime", "to_datetime", "issuing_date"] {
        assert!(usage[field].is_string(), "{field}");
    }

    let (status, body) = svc
        .get("/customers/cus_ada/current_usage?external_subscription_id=nope")
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("subscription_not_found"))
    );
    let (status, body) = svc.get("/customers/cus_ada/current_usage").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"external_subscription_id": ["value_is_mandatory"]})
    );
}

#[sqlx::test]
async fn usage_needs_a_live_key_of_a_live_service(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let body = json!({"event": event("tx_1", "dep_1", json!(1), ago(Duration::minutes(1)))});
    let unauthorized = json!({"status": 401, "error": "Unauthorized"});
    for key in [None, Some("ledger_nexacloud_forged")] {
        let mut request = app
            .client
            .post(format!("{}/api/v1/events", app.address))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.json::<Value>().await.unwrap(), unauthorized);
    }
    app.post_admin("/admin/v1/services/nexacloud/deactivate", "")
        .await;
    let (status, response) = svc
        .post("/events/batch", json!({"events": [body["event"]]}))
        .await;
    assert_eq!((status, response), (StatusCode::UNAUTHORIZED, unauthorized));
    assert_eq!(usage_events(&pool).await, 0);
}

#[sqlx::test]
async fn operators_can_widen_the_acceptance_window_for_a_backfill(pool: PgPool) {
    let limits = aggregates::usage::UsageLimits {
        acceptance_window: Duration::days(400),
        ..Default::default()
    };
    let app = spawn_app_with_limits(pool.clone(), limits).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": "dep_old",
               "subscription_at": (Utc::now() - Duration::days(300)).to_rfc3339()}}),
    )
    .await;
    let (status, body) = svc
        .post(
            "/events",
            json!({"event": event("tx_old", "dep_old", json!(1), ago(Duration::days(200)))}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = svc
        .post(
            "/events",
            json!({"event": event("tx_older", "dep_old", json!(1), ago(Duration::days(401)))}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"timestamp": ["older_than_acceptance_window"]})
    );
}

#[sqlx::test]
async fn an_events_period_is_decided_in_the_customers_time_zone(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    // The customer is in America/Toronto: the period starts at local midnight.
    let at = Utc::now() - Duration::minutes(1);
    svc.created(
        "/events",
        json!({"event": event("tx_tz", "dep_1", json!(1), at.timestamp())}),
    )
    .await;
    app.catch_up().await;
    let (start, end): (chrono::DateTime<Utc>, chrono::DateTime<Utc>) =
        sqlx::query_as("SELECT period_start, period_end FROM usage_aggregates")
            .fetch_one(&pool)
            .await
            .unwrap();
    let toronto: chrono_tz::Tz = "America/Toronto".parse().unwrap();
    for boundary in [start, end] {
        let local = boundary.with_timezone(&toronto);
        assert_eq!(
            (local.format("%d %H:%M").to_string()),
            "01 00:00",
            "{boundary}"
        );
    }
    assert!(start <= at.with_nanosecond(0).unwrap() && at < end);
    let (_, usage) = svc
        .get("/customers/cus_ada/current_usage?external_subscription_id=dep_1")
        .await;
    assert_eq!(
        usage["customer_usage"]["from_datetime"],
        start.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    );
}

/// The ingest path remembers callers and subscriptions between requests, but
/// never trusts what it remembers: after a plan change, a termination or a
/// revoked key, the next event is judged by the catalog as it now stands.
#[sqlx::test]
async fn a_remembered_directory_is_checked_by_every_append(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    every_aggregation(&svc).await;
    let now = ago(Duration::seconds(1));
    // Remembered: dep_1 on "starter", which does not charge sum_agg.
    let (status, _) = svc
        .post(
            "/events",
            json!({"event": event("t1", "dep_1", json!(1), now)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let sum_event = |transaction_id: &str| {
        json!({"event": {"transaction_id": transaction_id, "external_subscription_id": "dep_1",
                         "code": "sum_agg", "timestamp": now, "properties": {"v": 2}}})
    };
    let (status, body) = svc.post("/events", sum_event("t2")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error_details"], json!({"code": ["metric_not_found"]}));

    // A plan change makes sum_agg billable on dep_1: accepted at once.
    let (status, body) = svc
        .post(
            "/subscriptions/dep_1/change_plan",
            json!({"subscription": {"plan_code": "all"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = svc.post("/events", sum_event("t2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["event"]["code"], "sum_agg");

    // Terminated: usage after the termination is refused, though the
    // subscription was remembered active a moment ago.
    let (status, _) = svc
        .post(
            "/events",
            json!({"event": event("t3", "dep_2", json!(1), now)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = svc.delete("/subscriptions/dep_2").await;
    assert_eq!(status, StatusCode::OK);
    let later = ago(Duration::seconds(-30));
    let (status, body) = svc
        .post(
            "/events",
            json!({"event": event("t4", "dep_2", json!(1), later)}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["error_details"],
        json!({"timestamp": ["subscription_not_active_at_timestamp"]})
    );

    // A revoked key stops at once, though it was remembered.
    let (status, issued) = app
        .post_admin("/admin/v1/services/nexacloud/api_keys", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let second = ServiceClient {
        app: &app,
        key: issued["api_key"]["key"].as_str().unwrap().to_string(),
    };
    let (status, _) = second.post("/events", sum_event("t5")).await;
    assert_eq!(status, StatusCode::OK);
    let revoked = app
        .delete_admin(&format!(
            "/admin/v1/services/nexacloud/api_keys/{}",
            issued["api_key"]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(revoked, StatusCode::OK);
    let (status, _) = second.post("/events", sum_event("t6")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(usage_events(&pool).await, 4, "t1, t2, t3, t5");
}

/// What a remembered directory is checked against: every change to a row
/// usage validation reads (a customer, a subscription, a key, a projection
/// reset) gives the service a new directory version, never one it had
/// before; new rows and other services' changes leave it as it is.
#[sqlx::test]
async fn the_usage_directory_version_moves_with_every_change_usage_depends_on(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    app.service("nexadesk").await;
    let version = |service: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT version FROM usage_directory_versions WHERE service_code = $1",
            )
            .bind(service)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let mut seen = vec![version("nexacloud").await];
    let desk = version("nexadesk").await;
    let moved = |now: i64, seen: &mut Vec<i64>, what: &str| {
        assert!(
            !seen.contains(&now),
            "{what}: version {now} already seen in {seen:?}"
        );
        seen.push(now);
    };

    // New rows: unchanged.
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_new", "name": "New"}}),
    )
    .await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_new", "plan_code": "starter", "external_id": "dep_new"}}),
    )
    .await;
    assert_eq!(version("nexacloud").await, seen[0]);

    // A customer's time zone (which decides usage periods).
    let (status, body) = svc
        .post(
            "/customers",
            json!({"customer": {"external_id": "cus_new", "name": "New", "timezone": "Europe/Paris"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    moved(version("nexacloud").await, &mut seen, "customer update");

    // A termination.
    let (status, _) = svc.delete("/subscriptions/dep_new").await;
    assert_eq!(status, StatusCode::OK);
    moved(version("nexacloud").await, &mut seen, "termination");

    // A revoked key.
    let (_, issued) = app
        .post_admin("/admin/v1/services/nexacloud/api_keys", "")
        .await;
    assert_eq!(
        version("nexacloud").await,
        *seen.last().unwrap(),
        "a new key"
    );
    let revoked = app
        .delete_admin(&format!(
            "/admin/v1/services/nexacloud/api_keys/{}",
            issued["api_key"]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(revoked, StatusCode::OK);
    moved(version("nexacloud").await, &mut seen, "key revocation");

    // Another service's changes are not this one's.
    assert_eq!(version("nexadesk").await, desk);

    // A projection reset (TRUNCATE) moves every service.
    projection_runner::reset(&pool, &projections::Catalog)
        .await
        .unwrap();
    moved(version("nexacloud").await, &mut seen, "catalog reset");
    assert_ne!(version("nexadesk").await, desk);
}

/// A notifying commit holds PostgreSQL's notification lock until its flush,
/// so usage appends (the high-volume path) do not notify; everything else
/// still wakes the runners of every process.
#[sqlx::test]
async fn usage_appends_commit_without_a_notification(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = setup(&app).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("ledger_events_appended").await.unwrap();
    let (status, _) = svc
        .post(
            "/events/batch",
            json!({"events": [event("q1", "dep_1", json!(1), ago(Duration::seconds(5))),
                              event("q2", "dep_2", json!(2), ago(Duration::seconds(5)))]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
    assert!(quiet.is_err(), "a usage append notified: {quiet:?}");
    assert_eq!(usage_events(&pool).await, 2);
    // A catalog change notifies.
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_new", "name": "New"}}),
    )
    .await;
    let notified = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv()).await;
    assert!(matches!(notified, Ok(Ok(_))), "{notified:?}");
}
