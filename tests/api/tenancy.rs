//! Tenancy: a service's key reaches only that service's resources. Another
//! service's resources answer 404 — by code, external id or lago_id, for
//! reads, lists, changes and terminations — exactly as if they did not
//! exist, so a service cannot even probe for them.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::spawn_app;

fn not_found(resource: &str) -> Value {
    json!({"status": 404, "error": "Not Found", "code": format!("{resource}_not_found")})
}

#[sqlx::test]
async fn a_service_cannot_read_list_change_or_terminate_another_services_resources(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let nexacloud = app.service("nexacloud").await;
    let nexadesk = app.service("nexadesk").await;
    let desk_metric = nexadesk.nexacloud_catalog().await;
    let desk_metric_id = desk_metric["billable_metric"]["lago_id"].clone();
    nexadesk
        .created(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": "dep_desk"}}),
        )
        .await;
    let (_, desk_customer) = nexadesk.get("/customers/cus_ada").await;
    let desk_customer_lago_id = desk_customer["customer"]["lago_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Reads by code / external id.
    for (path, resource) in [
        ("/billable_metrics/cpu_seconds", "billable_metric"),
        ("/taxes/hst_on", "tax"),
        ("/plans/starter", "plan"),
        ("/customers/cus_ada", "customer"),
        ("/subscriptions/dep_desk", "subscription"),
        (
            &format!("/customers/{desk_customer_lago_id}") as &str,
            "customer",
        ),
    ] {
        let (status, body) = nexacloud.get(path).await;
        assert_eq!(
            (status, body),
            (StatusCode::NOT_FOUND, not_found(resource)),
            "GET {path}"
        );
    }

    // Lists hold nothing of the other service, filters included.
    for path in [
        "/billable_metrics",
        "/taxes",
        "/plans",
        "/customers",
        "/customers?email=ada@example.com",
        "/subscriptions?external_customer_id=cus_ada",
        "/subscriptions?status[]=active&status[]=pending&status[]=terminated&status[]=suspended",
    ] {
        let (status, body) = nexacloud.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(body["meta"]["total_count"], 0, "GET {path}: {body}");
    }

    // Changes and terminations.
    let (status, body) = nexacloud
        .put("/plans/starter", json!({"plan": {"amount_cents": 1}}))
        .await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, not_found("plan")));
    for action in ["suspend", "restore"] {
        let (status, body) = nexacloud
            .post(&format!("/subscriptions/dep_desk/{action}"), json!({}))
            .await;
        assert_eq!(
            (status, body),
            (StatusCode::NOT_FOUND, not_found("subscription")),
            "{action}"
        );
    }
    let (status, body) = nexacloud
        .post(
            "/subscriptions/dep_desk/change_plan",
            json!({"subscription": {"plan_code": "starter"}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, not_found("subscription"))
    );
    let (status, body) = nexacloud.delete("/subscriptions/dep_desk").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, not_found("subscription"))
    );

    // References to the other service's resources, by code or lago_id.
    let (status, body) = nexacloud
        .post(
            "/plans",
            json!({"plan": {"name": "Steal", "code": "steal", "interval": "monthly", "amount_cents": 1,
                   "amount_currency": "CAD", "charges": [{"billable_metric_id": desk_metric_id,
                   "charge_model": "standard", "properties": {"amount": "1"}}]}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, not_found("billable_metric"))
    );
    let (status, body) = nexacloud
        .post(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": "dep_x"}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, not_found("customer"))
    );
    let (status, body) = nexacloud
        .post(
            "/plans",
            json!({"plan": {"name": "T", "code": "t", "interval": "monthly", "amount_cents": 1,
                                         "amount_currency": "CAD", "tax_codes": ["hst_on"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"tax_codes": ["tax_not_found"]})
    );

    // Nothing of nexadesk's changed.
    let (_, desk_subscription) = nexadesk.get("/subscriptions/dep_desk").await;
    assert_eq!(desk_subscription["subscription"]["status"], "active");
    let (_, desk_plan) = nexadesk.get("/plans/starter").await;
    assert_eq!(desk_plan["plan"]["version"], 1);
    let foreign_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id LIKE 'nexacloud/%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(foreign_events, 0, "every refusal recorded nothing");
}

#[sqlx::test]
async fn the_same_identifiers_in_two_services_do_not_collide(pool: PgPool) {
    let app = spawn_app(pool).await;
    let nexacloud = app.service("nexacloud").await;
    let nexadesk = app.service("nexadesk").await;
    for service in [&nexacloud, &nexadesk] {
        service.nexacloud_catalog().await;
        service
            .created(
                "/subscriptions",
                json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": "dep_1"}}),
            )
            .await;
    }
    nexadesk
        .created(
            "/customers",
            json!({"customer": {"external_id": "cus_ada", "name": "Desk Ada"}}),
        )
        .await;
    nexadesk.delete("/subscriptions/dep_1").await;

    let (_, cloud_customer) = nexacloud.get("/customers/cus_ada").await;
    let (_, desk_customer) = nexadesk.get("/customers/cus_ada").await;
    assert_eq!(cloud_customer["customer"]["name"], "Ada");
    assert_eq!(desk_customer["customer"]["name"], "Desk Ada");
    assert_ne!(
        cloud_customer["customer"]["lago_id"],
        desk_customer["customer"]["lago_id"]
    );

    let (_, cloud_subscription) = nexacloud.get("/subscriptions/dep_1").await;
    let (_, desk_subscription) = nexadesk.get("/subscriptions/dep_1").await;
    assert_eq!(cloud_subscription["subscription"]["status"], "active");
    assert_eq!(desk_subscription["subscription"]["status"], "terminated");
    for service in [&nexacloud, &nexadesk] {
        let (_, plans) = service.get("/plans").await;
        assert_eq!(plans["meta"]["total_count"], 1);
    }
}
