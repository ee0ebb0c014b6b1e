//! The admin API over a real socket: services, auth, error bodies, request ids.

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{spawn_app, ADMIN_KEY};

#[sqlx::test]
async fn a_registered_service_is_listed_and_read_back(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (status, body) = app.register_service("nexacloud", "NexaCloud hosting").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"service": {"code": "nexacloud", "name": "NexaCloud hosting", "status": "active"}})
    );
    app.register_service("nexadesk", "NexaDesk").await;
    app.catch_up().await;

    let (status, body) = app.get_admin("/admin/v1/services/nexacloud").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"]["name"], "NexaCloud hosting");
    assert_eq!(body["service"]["status"], "active");

    let (status, body) = app.get_admin("/admin/v1/services?per_page=1&page=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["services"].as_array().unwrap().len(), 1);
    assert_eq!(body["services"][0]["code"], "nexadesk");
    assert_eq!(
        body["meta"],
        json!({"current_page": 2, "next_page": null, "prev_page": 1, "total_pages": 2, "total_count": 2})
    );
}

#[sqlx::test]
async fn deactivation_follows_the_status_rules(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.register_service("nexamaps", "NexaMaps").await;
    let (status, body) = app
        .post_admin("/admin/v1/services/nexamaps/deactivate", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"]["status"], "inactive");

    let (status, body) = app
        .post_admin("/admin/v1/services/nexamaps/deactivate", "")
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        body,
        json!({"status": 405, "error": "Method Not Allowed", "code": "invalid_status"})
    );

    let (status, body) = app
        .post_admin("/admin/v1/services/nowhere/deactivate", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"status": 404, "error": "Not Found", "code": "service_not_found"})
    );
}

#[sqlx::test]
async fn invalid_registrations_get_422_naming_the_field(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    app.register_service("nexacloud", "NexaCloud").await;
    let cases = [
        ("nexacloud", "Again", "code", "value_already_exist"),
        ("Nexa Cloud", "x", "code", "value_is_invalid"),
        ("nexadesk", "  ", "name", "value_is_invalid"),
    ];
    for (code, name, field, error) in cases {
        let (status, body) = app.register_service(code, name).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{code:?}");
        assert_eq!(
            body,
            json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                   "error_details": {field: [error]}}),
            "{code:?}"
        );
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "refusals record nothing");
}

#[sqlx::test]
async fn malformed_bodies_get_400_and_record_nothing(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    for body in [
        "{not json",
        r#"{"code": "nexacloud", "name": "missing root key"}"#,
        r#"{"service": {"code": 7, "name": "x"}}"#,
    ] {
        let (status, response) = app.post_admin("/admin/v1/services", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(response["status"], 400);
        assert_eq!(response["code"], "bad_request");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
}

#[sqlx::test]
async fn the_admin_api_needs_the_operator_key(pool: PgPool) {
    let app = spawn_app(pool).await;
    for key in [None, Some("wrong-key"), Some("")] {
        let (status, body) = app.get("/admin/v1/services", key).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(body, json!({"status": 401, "error": "Unauthorized"}));
    }
    let (status, _) = app.get("/admin/v1/services", Some(ADMIN_KEY)).await;
    assert_eq!(status, StatusCode::OK);
}

#[sqlx::test]
async fn the_request_id_is_echoed_and_recorded_in_the_event(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let response = app
        .client
        .post(format!("{}/admin/v1/services", app.address))
        .bearer_auth(ADMIN_KEY)
        .header("x-request-id", "req-from-nexacloud-17")
        .json(&json!({"service": {"code": "nexacloud", "name": "NexaCloud"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "req-from-nexacloud-17");
    let metadata: serde_json::Value =
        sqlx::query_scalar("SELECT metadata::jsonb FROM events WHERE aggregate_id = 'nexacloud'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(metadata["actor"], "operator");
    assert_eq!(metadata["request_id"], "req-from-nexacloud-17");
    assert_eq!(metadata["client_ip"], "127.0.0.1");

    // Without one, the ledger makes one up and still returns it.
    let response = app
        .client
        .get(format!("{}/health", app.address))
        .send()
        .await
        .unwrap();
    let generated = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(generated).unwrap().get_version_num(),
        4
    );
}

#[sqlx::test]
async fn health_ready_and_unknown_routes_answer_json(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (status, body) = app.get("/health", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "alive"})));

    app.register_service("nexacloud", "NexaCloud").await;
    let (status, body) = app.get("/ready", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["migrations"], "applied");
    // A write answers once every projection shows it.
    for (index, name) in [
        "catalog",
        "imports",
        "invoices",
        "reconciliation",
        "service_directory",
    ]
    .iter()
    .enumerate()
    {
        let projection = &body["projections"][index];
        assert_eq!(projection["name"], *name);
        assert_eq!(projection["lag"], 0);
        assert_eq!(projection["last_position"], 1);
    }

    let (status, body) = app.get("/api/v1/nothing-here", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"status": 404, "error": "Not Found", "code": "route_not_found"})
    );
}

#[sqlx::test]
async fn ready_reports_pending_migrations(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (status, body) = app.get("/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"status": "not_ready", "database": "reachable", "migrations": "pending",
               "tasks": []})
    );
}
