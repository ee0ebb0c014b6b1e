//! Rebuild equals live: after real traffic (catalog, usage, late usage,
//! finalized invoices with an adjustment), every projection rebuilt from the
//! log — beside the live tables, and in place — matches live row by row.

use aggregates::usage::UsageLimits;
use chrono::Duration;
use ledger::event_log::projection_runner::{self, rebuild_into, ProjectionRunner};
use ledger::invoicing::closer::close_due;
use projections::Projection;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{spawn_app_with_limits, TestApp};

async fn traffic(app: &TestApp) {
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.put("/plans/starter", json!({"plan": {"description": "v2"}}))
        .await;
    for (external_id, at) in [
        ("dep_1", "2026-09-13T14:00:00Z"),
        ("dep_2", "2026-09-01T04:00:00Z"),
    ] {
        svc.created(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": external_id, "subscription_at": at}}),
        )
        .await;
    }
    let usage = |tx: &str, sub: &str, at: &str, seconds: &str| {
        json!({"event": {"transaction_id": tx, "external_subscription_id": sub, "code": "cpu_seconds",
               "timestamp": at.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp(),
               "properties": {"cpu_seconds": seconds}}})
    };
    svc.created(
        "/events",
        usage("a", "dep_1", "2026-09-20T12:00:00Z", "400000"),
    )
    .await;
    svc.created(
        "/events",
        usage("a", "dep_2", "2026-09-02T00:00:00Z", "38400.5"),
    )
    .await;
    let close = |now: &'static str| {
        let pool = app.pool.clone();
        async move {
            ProjectionRunner::for_all(pool.clone())
                .await
                .unwrap()
                .catch_up()
                .await
                .unwrap();
            close_due(&pool, None, Duration::days(3650), now.parse().unwrap())
                .await
                .unwrap()
        }
    };
    close("2026-10-02T00:00:00Z").await;
    // Late for September, then October closes with the adjustment.
    svc.created(
        "/events",
        usage("late", "dep_1", "2026-09-30T12:00:00Z", "7200"),
    )
    .await;
    svc.created(
        "/events",
        usage("b", "dep_1", "2026-10-10T12:00:00Z", "100"),
    )
    .await;
    close("2026-11-02T00:00:00Z").await;
    svc.delete("/subscriptions/dep_2").await;
    app.catch_up().await;
}

async fn table_names(app: &TestApp) -> Vec<&'static str> {
    let runner = ProjectionRunner::for_all(app.pool.clone()).await.unwrap();
    runner
        .projections()
        .flat_map(|p| p.tables().iter().copied())
        .collect()
}

/// Rows of `a.t` not in `b.t` plus rows of `b.t` not in `a.t` (with
/// multiplicity), and the row count of `a.t`.
async fn difference(pool: &PgPool, a: &str, b: &str, table: &str) -> (i64, i64) {
    let diff: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM ((TABLE {a}.{table} EXCEPT ALL TABLE {b}.{table}) \
         UNION ALL (TABLE {b}.{table} EXCEPT ALL TABLE {a}.{table})) d"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {a}.{table}"))
        .fetch_one(pool)
        .await
        .unwrap();
    (diff, rows)
}

#[sqlx::test]
async fn every_projection_rebuilt_beside_live_and_in_place_equals_live(pool: PgPool) {
    let limits = UsageLimits {
        acceptance_window: Duration::days(3650),
        ..Default::default()
    };
    let app = spawn_app_with_limits(pool, limits).await;
    traffic(&app).await;
    let tables = table_names(&app).await;
    // Keep a copy of live to compare the in-place rebuild with.
    let mut copy = "CREATE SCHEMA before;".to_string();
    for table in &tables {
        copy.push_str(&format!(
            "CREATE TABLE before.{table} AS TABLE public.{table};"
        ));
    }
    sqlx::raw_sql(&copy).execute(&app.pool).await.unwrap();

    let runner = ProjectionRunner::for_all(app.pool.clone()).await.unwrap();
    let all: Vec<&dyn Projection> = runner.projections().collect();
    let (read, _) = rebuild_into(&app.pool, &all, "rebuilt").await.unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(read as i64, total);
    let mut seen = Vec::new();
    for table in &tables {
        let (diff, rows) = difference(&app.pool, "public", "rebuilt", table).await;
        assert_eq!(diff, 0, "{table}: rebuilt beside live differs");
        assert_eq!(
            difference(&app.pool, "public", "before", table).await.0,
            0,
            "{table}: live was touched"
        );
        seen.push((table.to_string(), rows > 0));
    }
    // The traffic reached every table that matters here.
    for table in [
        "subscriptions",
        "usage_aggregates",
        "invoices",
        "plan_versions",
    ] {
        assert!(
            seen.contains(&(table.to_string(), true)),
            "{table} is empty"
        );
    }
    let adjustments: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rebuilt.invoices, jsonb_array_elements(finalization->'fees') fee \
         WHERE fee->>'kind' = 'adjustment'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(adjustments, 1, "the late usage's adjustment is rebuilt too");

    // In place: reset and replay every projection; equal to the copy.
    for projection in runner.projections() {
        projection_runner::reset(&app.pool, projection)
            .await
            .unwrap();
    }
    runner.catch_up().await.unwrap();
    for table in &tables {
        assert_eq!(
            difference(&app.pool, "public", "before", table).await.0,
            0,
            "{table}: in-place rebuild differs"
        );
    }
}

#[sqlx::test]
async fn a_rebuild_refuses_system_schemas_reserved_words_and_names_postgres_would_cut(
    pool: PgPool,
) {
    let runner = ProjectionRunner::for_all(pool.clone()).await.unwrap();
    let all: Vec<&dyn Projection> = runner.projections().collect();
    let too_long = "r".repeat(64);
    for (schema, why) in [
        ("public", "a system schema, or public (the live tables)"),
        (
            "information_schema",
            "a system schema, or public (the live tables)",
        ),
        ("pg_temp", "a system schema, or public (the live tables)"),
        ("pg_catalog", "a system schema, or public (the live tables)"),
        ("select", "a word PostgreSQL reserves"),
        ("user", "a word PostgreSQL reserves"),
        (
            too_long.as_str(),
            "longer than the 63 characters PostgreSQL keeps",
        ),
        (
            "Robert'); DROP TABLE events;--",
            "use lower-case letters, digits and _, not starting with a digit",
        ),
        (
            "",
            "use lower-case letters, digits and _, not starting with a digit",
        ),
        (
            "9lives",
            "use lower-case letters, digits and _, not starting with a digit",
        ),
    ] {
        match rebuild_into(&pool, &all, schema).await {
            Err(projection_runner::RebuildError::InvalidSchema { name, why: refused }) => {
                assert_eq!((name.as_str(), refused), (schema, why));
            }
            other => panic!("{schema:?} was not refused: {other:?}"),
        }
    }
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'information_schema' \
         AND table_name = 'usage_aggregates'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(created, 0);
    // 63 characters is the longest name kept whole.
    let longest = "r".repeat(63);
    let (_, _) = rebuild_into(&pool, &all, &longest).await.unwrap();
    let schema: String = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname::text LIKE 'rrr%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(schema, longest);
}
