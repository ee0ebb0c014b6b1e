//! The Lago-compatible catalog over a real socket: metrics, taxes, plans
//! (versioned), customers, subscriptions, and the validation table.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::spawn_app;

fn unprocessable(field: &str, code: &str) -> Value {
    json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
           "error_details": {field: [code]}})
}

fn not_found(resource: &str) -> Value {
    json!({"status": 404, "error": "Not Found", "code": format!("{resource}_not_found")})
}

#[sqlx::test]
async fn metrics_of_every_aggregation_type_are_created_read_and_listed(pool: PgPool) {
    let app = spawn_app(pool).await;
    let nexacloud = app.service("nexacloud").await;
    let types = [
        "count_agg",
        "sum_agg",
        "max_agg",
        "unique_count_agg",
        "latest_agg",
        "weighted_sum_agg",
    ];
    for aggregation in types {
        let body = nexacloud
            .created(
                "/billable_metrics",
                json!({"billable_metric": {"name": aggregation, "code": aggregation,
                       "aggregation_type": aggregation, "field_name": "value"}}),
            )
            .await;
        let metric = &body["billable_metric"];
        assert_eq!(metric["aggregation_type"], aggregation);
        assert_eq!(metric["filters"], json!([]));
        assert!(metric["lago_id"].as_str().unwrap().len() == 36);
        let expected_field = if aggregation == "count_agg" {
            Value::Null
        } else {
            json!("value")
        };
        assert_eq!(metric["field_name"], expected_field);
    }
    let (status, body) = nexacloud.get("/billable_metrics/max_agg").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["billable_metric"]["name"], "max_agg");
    assert_eq!(body["billable_metric"]["weighted_interval"], Value::Null);

    let (_, page) = nexacloud.get("/billable_metrics?per_page=4&page=2").await;
    let codes: Vec<&str> = page["billable_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, vec!["latest_agg", "weighted_sum_agg"]);
    assert_eq!(
        page["meta"],
        json!({"current_page": 2, "next_page": null, "prev_page": 1, "total_pages": 2, "total_count": 6})
    );
}

#[sqlx::test]
async fn a_tax_rate_is_held_exactly_whether_sent_as_number_or_string(pool: PgPool) {
    let app = spawn_app(pool).await;
    let nexacloud = app.service("nexacloud").await;
    let hst = nexacloud
        .created(
            "/taxes",
            json!({"tax": {"name": "HST Ontario", "code": "hst_on", "rate": 13.0}}),
        )
        .await;
    assert_eq!(hst["tax"]["rate"].to_string(), "13");
    let qst = nexacloud
        .created(
            "/taxes",
            json!({"tax": {"name": "QST", "code": "qst", "rate": "9.975"}}),
        )
        .await;
    assert_eq!(qst["tax"]["rate"].to_string(), "9.975");
    let (_, body) = nexacloud.get("/taxes/qst").await;
    assert_eq!(body["tax"]["rate"].to_string(), "9.975");
    let (_, list) = nexacloud.get("/taxes").await;
    assert_eq!(list["meta"]["total_count"], 2);
}

#[sqlx::test]
async fn plans_hold_every_charge_model_with_prices_as_decimal_strings(pool: PgPool) {
    let app = spawn_app(pool).await;
    let svc = app.service("nexacloud").await;
    let metric = svc.nexacloud_catalog().await;
    let metric_id = metric["billable_metric"]["lago_id"].clone();
    let charge = |model: &str, properties: Value| json!({"billable_metric_id": metric_id, "charge_model": model, "properties": properties});
    let body = svc
        .created(
            "/plans",
            json!({"plan": {"name": "Every model", "code": "every_model", "interval": "yearly",
                "amount_cents": 0, "amount_currency": "USD", "pay_in_advance": true,
                "charges": [
                    charge("standard", json!({"amount": "0.0075", "unit_size": "3600", "free_units": "36000"})),
                    charge("package", json!({"amount": "5", "free_units": 100, "package_size": 1000})),
                    charge("graduated", json!({"graduated_ranges": [
                        {"from_value": 0, "to_value": 10, "per_unit_amount": "1", "flat_amount": "2"},
                        {"from_value": 11, "to_value": null, "per_unit_amount": "0.5", "flat_amount": "0"}]})),
                    charge("volume", json!({"volume_ranges": [
                        {"from_value": 0, "to_value": 100, "per_unit_amount": "2", "flat_amount": "0"},
                        {"from_value": 101, "to_value": null, "per_unit_amount": "1", "flat_amount": "10"}]})),
                    charge("percentage", json!({"rate": "2.9", "fixed_amount": "0.30", "free_units_per_events": 3})),
                ]}}),
        )
        .await;
    let plan = &body["plan"];
    assert_eq!(
        (plan["version"].clone(), plan["interval"].clone()),
        (json!(1), json!("yearly"))
    );
    let charges = plan["charges"].as_array().unwrap();
    let models: Vec<&str> = charges
        .iter()
        .map(|c| c["charge_model"].as_str().unwrap())
        .collect();
    assert_eq!(
        models,
        vec!["standard", "package", "graduated", "volume", "percentage"]
    );
    assert_eq!(
        charges[0]["properties"],
        json!({"amount": "0.0075", "unit_size": "3600", "free_units": "36000"})
    );
    assert_eq!(charges[0]["billable_metric_code"], "cpu_seconds");
    assert_eq!(charges[0]["lago_billable_metric_id"], metric_id);
    assert_eq!(
        charges[2]["properties"]["graduated_ranges"][1],
        json!({"from_value": 11, "to_value": null, "per_unit_amount": "0.5", "flat_amount": "0"})
    );
    assert_eq!(charges[4]["properties"]["rate"], "2.9");
    let (status, again) = svc.get("/plans/every_model").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&again["plan"], plan);
}

#[sqlx::test]
async fn a_plan_update_is_a_new_version_and_subscriptions_stay_on_theirs_until_moved(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": "dep_1"}}),
    )
    .await;

    let (status, body) = svc
        .put("/plans/starter", json!({"plan": {"amount_cents": 2500}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["plan"]["version"].clone(),
            body["plan"]["amount_cents"].clone()
        ),
        (json!(2), json!(2500))
    );
    assert_eq!(
        body["plan"]["charges"][0]["properties"]["amount"], "0.0075",
        "charges kept"
    );

    let (_, subscription) = svc.get("/subscriptions/dep_1").await;
    assert_eq!(subscription["subscription"]["plan_version"], 1);

    let (status, moved) = svc
        .post(
            "/subscriptions/dep_1/change_plan",
            json!({"subscription": {"plan_code": "starter"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["subscription"]["plan_version"], 2);
    assert_eq!(moved["subscription"]["previous_plan_code"], "starter");

    let versions: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT version, (definition->>'amount_cents')::bigint FROM plan_versions \
         WHERE service_code = 'nexacloud' AND code = 'starter' ORDER BY version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![(1, 1900), (2, 2500)]);
    let recorded: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'Subscription' ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        vec!["SubscriptionCreated", "SubscriptionPlanChanged"]
    );
}

#[sqlx::test]
async fn customers_upsert_only_the_keys_sent_and_match_email_regardless_of_case(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    let (_, created) = svc.get("/customers/cus_ada").await;
    let customer = &created["customer"];
    assert_eq!(customer["applicable_timezone"], "America/Toronto");
    assert_eq!(customer["tax_codes"], json!(["hst_on"]));
    assert_eq!(customer["created_at"], customer["updated_at"]);

    let updated = svc
        .created(
            "/customers",
            json!({"customer": {"external_id": "cus_ada", "name": "Ada Lovelace",
                   "billing_configuration": {"invoice_grace_period": 3, "provider_customer_id": "cus_stripe_42"}}}),
        )
        .await;
    let customer = &updated["customer"];
    assert_eq!(customer["name"], "Ada Lovelace");
    assert_eq!(customer["email"], "Ada@Example.com", "not sent, kept");
    assert_eq!(
        customer["lago_id"], created["customer"]["lago_id"],
        "identity kept"
    );
    assert_eq!(
        customer["billing_configuration"],
        json!({"invoice_grace_period": 3, "payment_provider": null, "provider_customer_id": "cus_stripe_42"})
    );

    // The same values again change nothing: no new event.
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_ada", "name": "Ada Lovelace"}}),
    )
    .await;
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Customer'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(events, 2);

    let (_, found) = svc.get("/customers?email=ADA@example.COM").await;
    assert_eq!(found["meta"]["total_count"], 1);
    assert_eq!(found["customers"][0]["external_id"], "cus_ada");
    let (_, default_tz) = svc
        .post(
            "/customers",
            json!({"customer": {"external_id": "cus_utc"}}),
        )
        .await;
    assert_eq!(default_tz["customer"]["applicable_timezone"], "UTC");
}

#[sqlx::test]
async fn subscriptions_are_created_listed_suspended_restored_and_terminated(pool: PgPool) {
    let app = spawn_app(pool).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    let create = |external_id: &str, extra: Value| {
        let mut body = json!({"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": external_id});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({ "subscription": body })
    };
    let live = svc
        .created("/subscriptions", create("dep_1", json!({})))
        .await;
    let live = &live["subscription"];
    assert_eq!(live["status"], "active");
    assert_eq!(live["billing_time"], "calendar");
    assert_eq!(live["shadow"], false);
    assert_eq!(live["external_customer_id"], "cus_ada");

    let future = svc
        .created(
            "/subscriptions",
            create("dep_2", json!({"subscription_at": "2099-01-01T00:00:00Z", "billing_time": "anniversary", "shadow": true})),
        )
        .await;
    assert_eq!(future["subscription"]["status"], "pending");
    assert_eq!(future["subscription"]["shadow"], true);
    assert_eq!(
        future["subscription"]["subscription_at"],
        "2099-01-01T00:00:00Z"
    );

    // The same external id, customer and plan again: the existing one.
    let again = svc
        .created("/subscriptions", create("dep_1", json!({})))
        .await;
    assert_eq!(again["subscription"]["lago_id"], live["lago_id"]);

    let (_, active) = svc.get("/subscriptions?external_customer_id=cus_ada").await;
    assert_eq!(active["meta"]["total_count"], 1, "only active by default");
    let (_, both) = svc
        .get("/subscriptions?status[]=active&status[]=pending&plan_code=starter")
        .await;
    assert_eq!(both["meta"]["total_count"], 2);

    let (status, suspended) = svc.post("/subscriptions/dep_1/suspend", json!({})).await;
    assert_eq!(
        (status, suspended["subscription"]["status"].clone()),
        (StatusCode::OK, json!("suspended"))
    );
    let (status, again) = svc.post("/subscriptions/dep_1/suspend", json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(again["code"], "invalid_status");
    let (_, restored) = svc.post("/subscriptions/dep_1/restore", json!({})).await;
    assert_eq!(restored["subscription"]["status"], "active");
    assert_eq!(restored["subscription"]["suspended_at"], Value::Null);

    let (status, terminated) = svc.delete("/subscriptions/dep_1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(terminated["subscription"]["status"], "terminated");
    assert!(terminated["subscription"]["terminated_at"].is_string());
    let (status, _) = svc.delete("/subscriptions/dep_1").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (_, ended) = svc.get("/subscriptions?status[]=terminated").await;
    assert_eq!(ended["subscriptions"][0]["external_id"], "dep_1");
}

#[sqlx::test]
async fn the_validation_table(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    let metric = svc.nexacloud_catalog().await;
    let metric_id = metric["billable_metric"]["lago_id"].clone();
    let plan = |overrides: Value| {
        let mut plan = json!({"name": "P", "code": "p2", "interval": "monthly", "amount_cents": 100,
                              "amount_currency": "USD"});
        plan.as_object_mut()
            .unwrap()
            .extend(overrides.as_object().unwrap().clone());
        json!({ "plan": plan })
    };
    let charge = |model: &str, properties: Value| json!({"charges": [{"billable_metric_id": metric_id, "charge_model": model, "properties": properties}]});
    let range = |from: i64, to: Option<i64>| json!({"from_value": from, "to_value": to, "per_unit_amount": "1", "flat_amount": "0"});
    let subscription = |overrides: Value| {
        let mut s = json!({"external_customer_id": "cus_ada", "plan_code": "starter", "external_id": "dep_9"});
        s.as_object_mut()
            .unwrap()
            .extend(overrides.as_object().unwrap().clone());
        json!({ "subscription": s })
    };
    let cases: Vec<(&str, &str, Value, StatusCode, Value)> = vec![
        (
            "unknown interval",
            "/plans",
            plan(json!({"interval": "biweekly"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("interval", "value_is_invalid"),
        ),
        (
            "unknown aggregation",
            "/billable_metrics",
            json!({"billable_metric": {"name": "x", "code": "x", "aggregation_type": "avg_agg", "field_name": "v"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("aggregation_type", "value_is_invalid"),
        ),
        (
            "unknown charge model",
            "/plans",
            plan(charge("tiered", json!({}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("charges[0].charge_model", "value_is_invalid"),
        ),
        (
            "unknown billing_time",
            "/subscriptions",
            subscription(json!({"billing_time": "weekly"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("billing_time", "value_is_invalid"),
        ),
        (
            "price as a JSON number",
            "/plans",
            plan(charge("standard", json!({"amount": 0.0075}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("charges[0].properties.amount", "invalid_amount"),
        ),
        (
            "negative price",
            "/plans",
            plan(charge("standard", json!({"amount": "-0.01"}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("charges[0].properties.amount", "invalid_amount"),
        ),
        (
            "price not decimal",
            "/plans",
            plan(charge("standard", json!({"amount": "1,5"}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("charges[0].properties.amount", "invalid_amount"),
        ),
        (
            "range gap",
            "/plans",
            plan(charge(
                "graduated",
                json!({"graduated_ranges": [range(0, Some(10)), range(20, None)]}),
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(
                "charges[0].properties.graduated_ranges",
                "invalid_graduated_ranges",
            ),
        ),
        (
            "range overlap",
            "/plans",
            plan(charge(
                "volume",
                json!({"volume_ranges": [range(0, Some(10)), range(5, None)]}),
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(
                "charges[0].properties.volume_ranges",
                "invalid_volume_ranges",
            ),
        ),
        (
            "open range not last",
            "/plans",
            plan(charge(
                "graduated",
                json!({"graduated_ranges": [range(0, None), range(11, Some(20))]}),
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable(
                "charges[0].properties.graduated_ranges",
                "invalid_graduated_ranges",
            ),
        ),
        (
            "package_size 0",
            "/plans",
            plan(charge("package", json!({"amount": "1", "package_size": 0}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("charges[0].properties.package_size", "invalid_package_size"),
        ),
        (
            "plan price missing",
            "/plans",
            json!({"plan": {"name": "P", "code": "p3", "interval": "monthly", "amount_currency": "USD"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("amount_cents", "value_is_mandatory"),
        ),
        (
            "charge price missing",
            "/plans",
            plan(charge("standard", json!({}))),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("charges[0].properties.amount", "value_is_mandatory"),
        ),
        (
            "duplicate metric code",
            "/billable_metrics",
            json!({"billable_metric": {"name": "x", "code": "cpu_seconds", "aggregation_type": "count_agg"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("code", "value_already_exist"),
        ),
        (
            "duplicate plan code",
            "/plans",
            plan(json!({"code": "starter"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("code", "value_already_exist"),
        ),
        (
            "duplicate tax code",
            "/taxes",
            json!({"tax": {"name": "x", "code": "hst_on", "rate": 5}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("code", "value_already_exist"),
        ),
        (
            "unknown tax code on a plan",
            "/plans",
            plan(json!({"tax_codes": ["gst_xx"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("tax_codes", "tax_not_found"),
        ),
        (
            "unknown tax code on a customer",
            "/customers",
            json!({"customer": {"external_id": "c2", "tax_codes": ["gst_xx"]}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("tax_codes", "tax_not_found"),
        ),
        (
            "invalid timezone",
            "/customers",
            json!({"customer": {"external_id": "c2", "timezone": "Toronto"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("timezone", "value_is_invalid"),
        ),
        (
            "unknown currency",
            "/customers",
            json!({"customer": {"external_id": "c2", "currency": "CAN"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("currency", "value_is_invalid"),
        ),
        (
            "missing customer external_id",
            "/customers",
            json!({"customer": {"name": "x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("external_id", "value_is_mandatory"),
        ),
        (
            "unknown plan_code",
            "/subscriptions",
            subscription(json!({"plan_code": "gold"})),
            StatusCode::NOT_FOUND,
            not_found("plan"),
        ),
        (
            "unknown metric",
            "/plans",
            plan(
                json!({"charges": [{"billable_metric_id": "7b7c2b4e-0000-4000-8000-000000000000", "charge_model": "standard",
                                  "properties": {"amount": "1"}}]}),
            ),
            StatusCode::NOT_FOUND,
            not_found("billable_metric"),
        ),
        (
            "unknown customer",
            "/subscriptions",
            subscription(json!({"external_customer_id": "nobody"})),
            StatusCode::NOT_FOUND,
            not_found("customer"),
        ),
        (
            "missing customer id",
            "/subscriptions",
            subscription(json!({"external_customer_id": null})),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("external_customer_id", "value_is_mandatory"),
        ),
        (
            "invalid subscription_at",
            "/subscriptions",
            subscription(json!({"subscription_at": "next monday"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("subscription_at", "invalid_date"),
        ),
    ];
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    for (case, path, body, status, expected) in cases {
        let (got_status, got) = svc.post(path, body).await;
        assert_eq!((got_status, &got), (status, &expected), "{case}");
    }
    // One subscription on the starter plan, then the same external id on
    // another plan is taken.
    svc.created("/subscriptions", subscription(json!({}))).await;
    svc.created(
        "/plans",
        plan(json!({"code": "pro", "amount_currency": "CAD"})),
    )
    .await;
    let (status, body) = svc
        .post("/subscriptions", subscription(json!({"plan_code": "pro"})))
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            unprocessable("external_id", "value_already_exist")
        )
    );

    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        events_after - events_before,
        2,
        "refusals record nothing; the two creations do"
    );

    // Malformed JSON and a missing root key are 400s.
    for body in [
        json!("not an object"),
        json!({"plan": "x"}),
        json!({"name": "missing root"}),
    ] {
        let (status, response) = svc.post("/plans", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(response["code"], "bad_request");
    }
}

#[sqlx::test]
async fn requests_without_a_live_key_of_a_live_service_get_401(pool: PgPool) {
    let app = spawn_app(pool).await;
    let svc = app.service("nexacloud").await;
    let unauthorized = json!({"status": 401, "error": "Unauthorized"});
    let (status, _) = svc.get("/plans").await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = app.get("/api/v1/plans", None).await;
    assert_eq!(
        (status, body),
        (StatusCode::UNAUTHORIZED, unauthorized.clone())
    );
    let (status, body) = app
        .get("/api/v1/plans", Some("ledger_nexacloud_forged"))
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::UNAUTHORIZED, unauthorized.clone())
    );
    let (status, body) = app
        .get("/api/v1/plans", Some(crate::helpers::ADMIN_KEY))
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::UNAUTHORIZED, unauthorized.clone()),
        "the operator key is not a service key"
    );

    app.post_admin("/admin/v1/services/nexacloud/deactivate", "")
        .await;
    let (status, body) = svc.get("/plans").await;
    assert_eq!(
        (status, body),
        (StatusCode::UNAUTHORIZED, unauthorized.clone())
    );
    app.post_admin("/admin/v1/services/nexacloud/reactivate", "")
        .await;
    let (status, _) = svc.get("/plans").await;
    assert_eq!(status, StatusCode::OK);

    let (_, keys) = app.get_admin("/admin/v1/services/nexacloud/api_keys").await;
    let key_id = keys["api_keys"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        keys["api_keys"][0].get("key"),
        None,
        "a listed key never shows the secret"
    );
    let response = app
        .client
        .delete(format!(
            "{}/admin/v1/services/nexacloud/api_keys/{key_id}",
            app.address
        ))
        .bearer_auth(crate::helpers::ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) = svc.get("/plans").await;
    assert_eq!((status, body), (StatusCode::UNAUTHORIZED, unauthorized));
}

#[sqlx::test]
async fn hostile_input_gets_a_4xx_never_a_500(pool: PgPool) {
    let app = spawn_app(pool).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    let long = "x".repeat(10_000);
    let posts = [
        (
            "/billable_metrics",
            json!({"billable_metric": {"name": "x", "code": long, "aggregation_type": "count_agg"}}),
        ),
        ("/customers", json!({"customer": {"external_id": long}})),
        (
            "/customers",
            json!({"customer": {"external_id": "c", "email": format!("{long}@example.com")}}),
        ),
        (
            "/customers",
            json!({"customer": {"external_id": "c", "net_payment_term": "soon"}}),
        ),
        ("/customers", json!({"customer": {"external_id": 42}})),
        (
            "/plans",
            json!({"plan": {"name": "x", "code": "x", "interval": "monthly", "amount_cents": 1e40, "amount_currency": "USD"}}),
        ),
        (
            "/plans",
            json!({"plan": {"name": "x", "code": "x", "interval": "monthly", "amount_cents": 1, "amount_currency": "USD",
                                   "charges": [{"billable_metric_id": "not-a-uuid", "charge_model": "standard"}]}}),
        ),
        (
            "/plans",
            json!({"plan": {"name": "x", "code": "x", "interval": "monthly", "amount_cents": 1, "amount_currency": "USD",
                                   "charges": [{"charge_model": "standard", "properties": "amount=1"}]}}),
        ),
        (
            "/taxes",
            json!({"tax": {"name": "x", "code": "x", "rate": "1e400"}}),
        ),
        (
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                                                    "external_id": "d", "subscription_at": "99999-01-01T00:00:00Z"}}),
        ),
        (
            "/subscriptions/nothing/change_plan",
            json!({"subscription": {}}),
        ),
    ];
    for (path, body) in posts {
        let (status, response) = svc.post(path, body.clone()).await;
        assert!(
            status.is_client_error(),
            "POST {path} {body}: {status} {response}"
        );
        assert!(
            response["status"]
                .as_u64()
                .is_some_and(|s| (400..500).contains(&s)),
            "{response}"
        );
    }
    for path in [
        "/plans?page=9223372036854775807&per_page=1000",
        "/plans?page=-1",
        "/plans?per_page=abc",
        "/subscriptions?status[]=everything",
        "/subscriptions?page=1e3",
    ] {
        let (status, response) = svc.get(path).await;
        assert!(status.is_client_error(), "GET {path}: {status} {response}");
    }
}
