//! `ledger verify`: stream hash chains and seals detect a changed payload, a
//! changed usage column, a deleted row and two swapped rows; an untouched log
//! verifies clean.

use chrono::{Duration, Utc};
use ledger::event_log::tamper::{seal, verify, Break};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{spawn_app, TestApp};

/// A catalog, a subscription and ten usage events, sealed; then two more
/// events after the seal. Returns the positions of the usage events.
async fn traffic(app: &TestApp) -> Vec<i64> {
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.subscribe("dep_1", 3).await;
    let record = |n: usize| {
        json!({"event": {"transaction_id": format!("t{n}"), "external_subscription_id": "dep_1",
               "code": "cpu_seconds", "timestamp": (Utc::now() - Duration::hours(1)).timestamp(),
               "properties": {"cpu_seconds": 100 + n}}})
    };
    for n in 0..10 {
        svc.created("/events", record(n)).await;
    }
    // A seal covers what the visibility horizon lets it read; other tests'
    // transactions (anywhere in the cluster) may hold it back a moment.
    // Seal once all of the above is readable, so the seal covers it.
    for _ in 0..500 {
        let readable: bool = sqlx::query_scalar(
            "SELECT max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()) FROM events",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if readable {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seal(&app.pool).await.unwrap(), 1);
    for n in 10..12 {
        svc.created("/events", record(n)).await;
    }
    sqlx::query_scalar(
        "SELECT position FROM events WHERE aggregate_type = 'Usage' ORDER BY position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// Rewrite the log as its owner would, around the append-only guard.
async fn tamper(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(&format!(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; {sql}; \
         ALTER TABLE events ENABLE TRIGGER events_append_only;"
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn an_untouched_log_verifies_clean(pool: PgPool) {
    let app = spawn_app(pool).await;
    traffic(&app).await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let sealed = || async {
        ledger::event_log::tamper::seals(&app.pool)
            .await
            .unwrap()
            .iter()
            .map(|(_, _, seal)| seal.events)
            .sum::<i64>()
    };
    let verified = verify(&app.pool, 0).await.unwrap();
    assert_eq!(verified.first_break, None);
    assert_eq!(verified.seals_checked, 1);
    assert_eq!(verified.events_checked, count().await);
    assert_eq!(verified.latest_digest.unwrap().len(), 64);
    // The seal covers what was readable when it ran (the visibility horizon
    // may hold the newest events back); the rest — at least its own event
    // and the two after it — is reported unsealed.
    assert_eq!(sealed().await + verified.unsealed, count().await);
    assert!(verified.unsealed >= 3);
    // Sealing again covers the rest, the first seal's own event included;
    // then only the last seal's own event is new, and nothing is sealed.
    // (Other tests' transactions may hold the horizon back for a moment.)
    let mut verified = verify(&app.pool, 0).await.unwrap();
    for _ in 0..200 {
        seal(&app.pool).await.unwrap();
        verified = verify(&app.pool, 0).await.unwrap();
        if verified.unsealed == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(seal(&app.pool).await.unwrap(), 0, "nothing new to seal");
    assert_eq!(verified.first_break, None);
    assert_eq!(
        verified.seals_checked,
        ledger::event_log::tamper::seals(&app.pool)
            .await
            .unwrap()
            .len()
    );
    assert_eq!(sealed().await + verified.unsealed, count().await);
    assert_eq!(verified.unsealed, 1, "the last seal's own event");
}

#[sqlx::test]
async fn a_changed_payload_is_found_at_its_position(pool: PgPool) {
    let app = spawn_app(pool).await;
    let usage = traffic(&app).await;
    let target = usage[4];
    tamper(
        &app.pool,
        &format!(
            "UPDATE events SET payload = replace(payload::text, '\"cpu_seconds\":104', '\"cpu_seconds\":1')::json \
             WHERE position = {target}"
        ),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert_eq!(broken.position(), target);
    assert!(
        matches!(broken, Break::Chain { ref reason, .. } if reason.contains("does not match its hash"))
    );
    // Recomputing the row's hash as well does not hide it: the seal still breaks.
    tamper(
        &app.pool,
        &format!(
            "UPDATE events SET event_hash = event_digest(NULL, aggregate_type, aggregate_id, sequence, \
             event_type, event_version, payload, metadata) WHERE position = {target}"
        ),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert!(matches!(broken, Break::Seal { .. }), "{broken:?}");
    assert!(broken.position() <= target);
}

#[sqlx::test]
async fn a_changed_usage_column_is_found_at_its_position(pool: PgPool) {
    let app = spawn_app(pool).await;
    let usage = traffic(&app).await;
    // Billing reads the usage columns: a value changed there (the payload
    // and its hash untouched) is found.
    tamper(
        &app.pool,
        &format!(
            "UPDATE events SET usage_value = 1 WHERE position = {}",
            usage[6]
        ),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert_eq!(broken.position(), usage[6]);
    assert!(
        matches!(broken, Break::Chain { ref reason, .. } if reason == "its usage columns do not match its payload"),
        "{broken:?}"
    );
    // So is usage attached to an event that is not usage (the first one).
    tamper(
        &app.pool,
        &format!(
            "UPDATE events SET usage_subscription = (SELECT usage_subscription FROM events WHERE position = {}) \
             WHERE position = (SELECT min(position) FROM events)",
            usage[0]
        ),
    )
    .await;
    let first: i64 = sqlx::query_scalar("SELECT min(position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert_eq!(broken.position(), first);
}

#[sqlx::test]
async fn a_deleted_row_is_found(pool: PgPool) {
    let app = spawn_app(pool).await;
    let usage = traffic(&app).await;
    // A whole one-event usage stream: only the seal can tell.
    tamper(
        &app.pool,
        &format!("DELETE FROM events WHERE position = {}", usage[6]),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert!(
        matches!(broken, Break::Seal { ref reason, .. } if reason.contains("no longer hash to the seal")),
        "{broken:?}"
    );
    assert!(broken.position() <= usage[6]);
}

#[sqlx::test]
async fn a_deleted_event_inside_a_stream_breaks_its_chain(pool: PgPool) {
    let app = spawn_app(pool).await;
    traffic(&app).await;
    // Two more events on the customer's stream, after the seal.
    let svc = crate::helpers::ServiceClient {
        app: &app,
        key: issue_key(&app).await,
    };
    for name in ["Ada L.", "Ada Lovelace"] {
        svc.created(
            "/customers",
            json!({"customer": {"external_id": "cus_ada", "name": name}}),
        )
        .await;
    }
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM events WHERE aggregate_type = 'Customer' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(positions.len(), 3);
    tamper(
        &app.pool,
        &format!("DELETE FROM events WHERE position = {}", positions[1]),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert_eq!(
        broken,
        Break::Chain {
            position: positions[2],
            reason: "sequence 3 follows 1".into()
        }
    );
}

async fn issue_key(app: &TestApp) -> String {
    let (_, body) = app
        .post_admin("/admin/v1/services/nexacloud/api_keys", "")
        .await;
    body["api_key"]["key"].as_str().unwrap().to_string()
}

#[sqlx::test]
async fn two_swapped_rows_are_found(pool: PgPool) {
    let app = spawn_app(pool).await;
    let usage = traffic(&app).await;
    let (a, b) = (usage[2], usage[7]);
    // Reorder: swap the two events' places in the log order.
    tamper(
        &app.pool,
        &format!(
            "UPDATE events e SET transaction_id = o.transaction_id \
             FROM (SELECT position, transaction_id FROM events WHERE position IN ({a}, {b})) o \
             WHERE e.position IN ({a}, {b}) AND o.position <> e.position"
        ),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert!(matches!(broken, Break::Seal { .. }), "{broken:?}");
    assert!(broken.position() <= a);
}

#[sqlx::test]
async fn two_swapped_payloads_are_found_at_the_first(pool: PgPool) {
    let app = spawn_app(pool).await;
    let usage = traffic(&app).await;
    let (a, b) = (usage[1], usage[3]);
    tamper(
        &app.pool,
        &format!(
            "UPDATE events e SET payload = o.payload \
             FROM (SELECT position, payload FROM events WHERE position IN ({a}, {b})) o \
             WHERE e.position IN ({a}, {b}) AND o.position <> e.position"
        ),
    )
    .await;
    let broken = verify(&app.pool, 0).await.unwrap().first_break.unwrap();
    assert_eq!(broken.position(), a);
    // Verifying from after both starts clean on the chains.
    let later = verify(&app.pool, b + 1).await.unwrap();
    assert!(!matches!(later.first_break, Some(Break::Chain { .. })));
}
