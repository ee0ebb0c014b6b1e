//! Imports: the NexaCloud adapter against a real NexaCloud database (the
//! shared schema plus `tests/fixtures/nexacloud_cases.sql`), the neutral
//! format's file door, idempotent and racing runs, dry runs, changes,
//! test-connection, the CLI's exit codes, and the backfill hold.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aggregates::import::{RecordType, SourceRecord};
use ledger::app::{BackgroundTasks, Settings};
use ledger::event_log::store::log_head_cursor;
use ledger::http::admin::AdminKey;
use ledger::import::nexacloud::{self, MappingOptions, Sink};
use ledger::import::report::{Change, Counts};
use ledger::import::{ImportSettings, Importer, Report};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{
    database_url, ledger_cli, spawn_app, spawn_app_with_settings, TestApp, ADMIN_KEY,
};

const FIXTURES: &str = include_str!("../fixtures/nexacloud_cases.sql");

/// A NexaCloud database of its own beside the test's ledger database.
struct Source {
    url: String,
    pool: PgPool,
}

async fn source_database(ledger: &PgPool, fixtures: &str) -> Source {
    let name = format!("nexacloud_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(ledger)
        .await
        .unwrap();
    let options = ledger.connect_options().as_ref().clone().database(&name);
    let pool = PgPool::connect_with(options.clone()).await.unwrap();
    sqlx::raw_sql(nexacloud::SCHEMA)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(fixtures).execute(&pool).await.unwrap();
    Source {
        url: database_url(&options),
        pool,
    }
}

fn mapping() -> MappingOptions {
    MappingOptions {
        timezone: chrono_tz::UTC,
        tax_codes: vec![],
        cpu_price: "0.0075".parse().unwrap(),
        cpu_unit_size: "3600".parse().unwrap(),
        since: Some("2026-09-01T00:00:00Z".parse().unwrap()),
    }
}

fn settings(dry_run: bool, apply_changes: bool) -> ImportSettings {
    ImportSettings {
        service: "nexacloud".into(),
        dry_run,
        apply_changes,
        options: json!({"door": "test"}),
        by: "test".into(),
    }
}

async fn import(app: &TestApp, source: &Source, dry_run: bool, apply_changes: bool) -> Report {
    let importer = Importer::new(&app.pool, settings(dry_run, apply_changes))
        .await
        .unwrap();
    nexacloud::run(&source.url, &mapping(), Sink::Import(Box::new(importer)))
        .await
        .unwrap()
}

async fn app_with_service(pool: PgPool) -> TestApp {
    let app = spawn_app(pool).await;
    let (status, body) = app.register_service("nexacloud", "NexaCloud").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    app
}

fn counts(new: u64, unchanged: u64, changed: u64, failed: u64, skipped: u64) -> Counts {
    Counts {
        new,
        unchanged,
        changed,
        failed,
        skipped,
    }
}

/// The counts of a first import of the fixtures.
fn first_import_counts() -> BTreeMap<RecordType, Counts> {
    BTreeMap::from([
        (RecordType::BillableMetric, counts(1, 0, 0, 0, 0)),
        (RecordType::Customer, counts(4, 0, 0, 0, 0)),
        (RecordType::Plan, counts(4, 0, 0, 1, 1)),
        (RecordType::Subscription, counts(5, 0, 0, 3, 1)),
        (RecordType::Usage, counts(4, 0, 0, 0, 2)),
        (RecordType::ExternalInvoice, counts(3, 0, 0, 1, 1)),
    ])
}

/// (table, source id, field) of each failure.
fn failures(report: &Report) -> Vec<(String, String, String)> {
    report
        .failures
        .iter()
        .map(|f| (f.table.clone(), f.source_id.clone(), f.field.clone()))
        .collect()
}

fn expected_failures() -> Vec<(String, String, String)> {
    [
        (
            "plans",
            "22222222-0000-0000-0000-000000000005",
            "price_monthly",
        ),
        (
            "subscriptions",
            "44444444-0000-0000-0000-000000000004",
            "billing_cycle",
        ),
        (
            "subscriptions",
            "44444444-0000-0000-0000-000000000005",
            "billing_cycle",
        ),
        (
            "subscriptions",
            "44444444-0000-0000-0000-000000000009",
            "plan_id",
        ),
        (
            "invoices",
            "55555555-0000-0000-0000-000000000005",
            "subtotal",
        ),
    ]
    .iter()
    .map(|(t, s, f)| (t.to_string(), s.to_string(), f.to_string()))
    .collect()
}

async fn count_events(pool: &PgPool, aggregate_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = $1")
        .bind(aggregate_type)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn the_nexacloud_mapping_produces_exactly_these_records(pool: PgPool) {
    let source = source_database(&pool, FIXTURES).await;
    let file = tempfile::NamedTempFile::new().unwrap();
    let sink = Sink::Export {
        out: Box::new(std::fs::File::create(file.path()).unwrap()),
        report: Report::default(),
    };
    let report = nexacloud::run(&source.url, &mapping(), sink).await.unwrap();
    let records: BTreeMap<(String, String), Value> = std::fs::read_to_string(file.path())
        .unwrap()
        .lines()
        .map(|line| {
            let record = SourceRecord::from_value(serde_json::from_str(line).unwrap()).unwrap();
            let key = (
                record.record_type.as_str().to_string(),
                record.source_id.clone(),
            );
            (key, Value::Object(record.fields))
        })
        .collect();
    let of = |kind: &str| -> BTreeSet<String> {
        records
            .keys()
            .filter(|(k, _)| k == kind)
            .map(|(_, id)| id.clone())
            .collect()
    };
    let get = |kind: &str, id: &str| records[&(kind.to_string(), id.to_string())].clone();
    let sub = |n: u32| format!("44444444-0000-0000-0000-00000000000{n}");

    assert_eq!(
        of("billable_metric"),
        BTreeSet::from(["cpu_seconds".to_string()])
    );
    assert_eq!(of("customer").len(), 4);
    assert_eq!(
        get("customer", "11111111-0000-0000-0000-000000000001"),
        json!({"external_id": "11111111-0000-0000-0000-000000000001", "name": "Acme Ops",
               "email": "ops@acme.example", "timezone": "UTC",
               "billing_configuration": {"payment_provider": "stripe", "provider_customer_id": "cus_Acme001"}})
    );

    // One plan per cycle with a price; inactive only when used; never a rounded price.
    let plan_codes: BTreeSet<String> = of("plan")
        .iter()
        .map(|id| get("plan", id)["code"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        plan_codes,
        BTreeSet::from(
            [
                "legacy-monthly",
                "pro-monthly",
                "starter-monthly",
                "starter-yearly"
            ]
            .map(String::from)
        )
    );
    assert_eq!(
        get("plan", "22222222-0000-0000-0000-000000000001:monthly"),
        json!({"code": "starter-monthly", "name": "Starter (monthly)", "interval": "monthly",
               "amount_cents": 1900, "amount_currency": "CAD",
               "charges": [{"billable_metric_code": "cpu_seconds", "charge_model": "standard",
                            "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]})
    );
    assert_eq!(
        get("plan", "22222222-0000-0000-0000-000000000001:yearly")["amount_cents"],
        19000
    );

    // Alive now, or cancelled after --since; always shadow; the deployment kept.
    assert_eq!(of("subscription"), BTreeSet::from([1, 2, 3, 6, 8].map(sub)));
    assert_eq!(
        get("subscription", &sub(1)),
        json!({"external_id": sub(1), "external_customer_id": "11111111-0000-0000-0000-000000000001",
               "plan_code": "starter-monthly", "name": "acme-web", "billing_time": "calendar",
               "subscription_at": "2026-09-13T14:00:00Z", "shadow": true,
               "metadata": {"deployment_id": "33333333-0000-0000-0000-000000000001"},
               "terminated_at": null})
    );
    assert_eq!(
        get("subscription", &sub(2))["external_customer_id"],
        "11111111-0000-0000-0000-000000000001",
        "a user with two deployments is one customer with two subscriptions"
    );
    assert_eq!(get("subscription", &sub(3))["plan_code"], "starter-yearly");
    assert_eq!(get("subscription", &sub(6))["plan_code"], "legacy-monthly");
    assert_eq!(
        get("subscription", &sub(8))["terminated_at"],
        "2026-10-20T00:00:00Z"
    );

    // CPU-hours × 3600, exactly; the record's start; the documented transaction id.
    assert_eq!(
        of("usage"),
        BTreeSet::from(["1", "2", "3", "6"].map(String::from))
    );
    assert_eq!(
        get("usage", "1"),
        json!({"transaction_id": "usage_records:1", "external_subscription_id": sub(1),
               "code": "cpu_seconds", "timestamp": 1791158400,
               "properties": {"cpu_seconds": "4444.2"}})
    );
    assert_eq!(get("usage", "3")["properties"]["cpu_seconds"], "180900");
    assert_eq!(get("usage", "6")["properties"]["cpu_seconds"], "0.36");

    // The source's invoices, one-offs without a subscription, void ones kept.
    assert_eq!(of("external_invoice").len(), 3);
    assert_eq!(
        get("external_invoice", "55555555-0000-0000-0000-000000000001"),
        json!({"number": "NC-1001", "external_customer_id": "11111111-0000-0000-0000-000000000001",
               "external_subscription_id": sub(1), "from_date": "2026-10-01", "to_date": "2026-10-31",
               "status": "paid", "currency": "CAD", "fees_amount_cents": 1964,
               "taxes_amount_cents": 255, "total_amount_cents": 2219,
               "lines": [{"kind": "plan", "description": "Starter (monthly)", "units": "1",
                          "unit_amount": "19", "amount_cents": 1900},
                         {"kind": "usage", "description": "CPU overage (h)", "units": "106.6667",
                          "unit_amount": "0.006", "amount_cents": 64}]})
    );
    let one_off = get("external_invoice", "55555555-0000-0000-0000-000000000002");
    assert_eq!(
        (
            one_off["external_subscription_id"].clone(),
            one_off["total_amount_cents"].clone()
        ),
        (Value::Null, json!(2825))
    );
    assert_eq!(
        get("external_invoice", "55555555-0000-0000-0000-000000000003")["status"],
        "void"
    );

    assert_eq!(failures(&report), expected_failures());
    assert_eq!(
        report.failures[0].reason,
        "9.995 is not a whole number of cents (never rounded)"
    );
    assert_eq!(
        report.failures[1].reason,
        "plan pro is not sold yearly (no yearly price)"
    );
    assert_eq!(
        report.failures[2].reason,
        "unknown billing cycle 'weekly' (monthly or yearly)"
    );
    assert_eq!(
        report.warnings,
        vec![
            "users 11111111-0000-0000-0000-000000000002, 11111111-0000-0000-0000-000000000003 share \
             the email dev@globex.example (in different case): imported as 2 customers"
                .to_string(),
            format!(
                "usage_records 2 (subscription {}) runs from 2026-10-31T22:00:00+00:00 to \
                 2026-11-01T02:00:00+00:00, across a billing-period boundary: imported at its start",
                sub(1)
            ),
        ]
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn an_import_appends_each_fact_once_and_a_rerun_reports_everything_unchanged(pool: PgPool) {
    let app = app_with_service(pool.clone()).await;
    let source = source_database(&pool, FIXTURES).await;

    let report = import(&app, &source, false, false).await;
    assert_eq!(report.counts, first_import_counts());
    assert_eq!(failures(&report), expected_failures());
    assert_eq!(report.exit_code(), 2, "some rows failed");
    assert_eq!(count_events(&pool, "ImportedRecord").await, 17);
    assert_eq!(count_events(&pool, "ImportRun").await, 2);

    // What the API shows: shadow subscriptions with their deployment.
    app.catch_up().await;
    let subscriptions: Vec<(String, bool, Option<String>, Value)> = sqlx::query_as(
        "SELECT external_id, shadow, terminated_at::text, resource->'metadata' FROM subscriptions \
         WHERE service_code = 'nexacloud' ORDER BY external_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(subscriptions.len(), 5);
    assert!(
        subscriptions.iter().all(|s| s.1),
        "every imported subscription is shadow"
    );
    assert_eq!(
        subscriptions[0].3,
        json!({"deployment_id": "33333333-0000-0000-0000-000000000001"})
    );
    assert_eq!(
        subscriptions[4].2.as_deref(),
        Some("2026-10-20 00:00:00+00")
    );
    let seconds: Vec<String> = sqlx::query_scalar(
        "SELECT usage_value::text FROM events WHERE aggregate_type = 'Usage' ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(seconds, ["4444.2", "7200", "180900", "0.36"]);

    let head = log_head_cursor(&pool).await.unwrap().unwrap();
    let again = import(&app, &source, false, false).await;
    let mut unchanged = first_import_counts();
    for counts in unchanged.values_mut() {
        counts.unchanged = counts.new;
        counts.new = 0;
    }
    assert_eq!(again.counts, unchanged);
    assert_eq!(again.exit_code(), 2, "the same rows fail again");
    let appended: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_type FROM events WHERE position > $1 ORDER BY position",
    )
    .bind(head.position)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        appended,
        ["ImportRun", "ImportRun"],
        "only the run itself is recorded"
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn a_dry_run_reports_the_same_and_appends_nothing(pool: PgPool) {
    let app = app_with_service(pool.clone()).await;
    let source = source_database(&pool, FIXTURES).await;
    let head = log_head_cursor(&pool).await.unwrap();

    let dry = import(&app, &source, true, false).await;
    assert_eq!(dry.counts, first_import_counts());
    assert_eq!(failures(&dry), expected_failures());
    assert_eq!((dry.dry_run, dry.run_id), (true, None));
    assert_eq!(
        log_head_cursor(&pool).await.unwrap(),
        head,
        "nothing appended"
    );

    import(&app, &source, false, false).await;
    let head = log_head_cursor(&pool).await.unwrap();
    let dry = import(&app, &source, true, false).await;
    assert_eq!(dry.counts[&RecordType::Usage], counts(0, 4, 0, 0, 2));
    assert_eq!(dry.counts[&RecordType::Plan], counts(0, 4, 0, 1, 1));
    assert_eq!(
        log_head_cursor(&pool).await.unwrap(),
        head,
        "nothing appended"
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn two_racing_imports_append_each_fact_once(pool: PgPool) {
    let app = app_with_service(pool.clone()).await;
    let source = source_database(&pool, FIXTURES).await;
    let (a, b) = tokio::join!(
        import(&app, &source, false, false),
        import(&app, &source, false, false)
    );
    assert_eq!(count_events(&pool, "ImportedRecord").await, 17);
    assert_eq!(count_events(&pool, "Usage").await, 4);
    assert_eq!(
        count_events(&pool, "Subscription").await,
        5 + 1,
        "5 created, 1 terminated"
    );
    assert_eq!(count_events(&pool, "Plan").await, 4);
    for (kind, first) in first_import_counts() {
        let (x, y) = (a.counts[&kind], b.counts[&kind]);
        assert_eq!(x.new + y.new, first.new, "{kind:?} imported once");
        assert_eq!(
            x.new + x.unchanged,
            first.new,
            "{kind:?}: run a saw every row"
        );
        assert_eq!(
            y.new + y.unchanged,
            first.new,
            "{kind:?}: run b saw every row"
        );
        assert_eq!(
            (x.failed, y.failed),
            (first.failed, first.failed),
            "{kind:?}"
        );
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn a_changed_source_row_is_reported_and_applied_only_when_asked(pool: PgPool) {
    let app = app_with_service(pool.clone()).await;
    let source = source_database(&pool, FIXTURES).await;
    import(&app, &source, false, false).await;
    sqlx::raw_sql(
        "UPDATE plans SET price_monthly = 21.0000 WHERE slug = 'starter'; \
         UPDATE users SET email = 'billing@acme.example' WHERE id = '11111111-0000-0000-0000-000000000001'",
    )
    .execute(&source.pool)
    .await
    .unwrap();
    let plan_versions = || async {
        sqlx::query_as::<_, (i32, i64)>(
            "SELECT version, (definition->>'amount_cents')::bigint FROM plan_versions \
             WHERE service_code = 'nexacloud' AND code = 'starter-monthly' ORDER BY version",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let email = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT resource->>'email' FROM customers WHERE external_id = '11111111-0000-0000-0000-000000000001'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    let report = import(&app, &source, false, false).await;
    let expected = |applied| {
        let change = |record_type, source_id: &str, field: &str| Change {
            record_type,
            source_id: source_id.to_string(),
            fields: vec![field.to_string()],
            applied,
        };
        vec![
            change(
                RecordType::Customer,
                "11111111-0000-0000-0000-000000000001",
                "email",
            ),
            change(
                RecordType::Plan,
                "22222222-0000-0000-0000-000000000001:monthly",
                "amount_cents",
            ),
        ]
    };
    assert_eq!(report.changes, expected(false));
    assert_eq!(report.counts[&RecordType::Plan], counts(0, 3, 1, 1, 1));
    app.catch_up().await;
    assert_eq!(plan_versions().await, [(1, 1900)], "nothing overwritten");
    assert_eq!(email().await, "ops@acme.example");

    let report = import(&app, &source, false, true).await;
    assert_eq!(report.changes, expected(true));
    app.catch_up().await;
    assert_eq!(
        plan_versions().await,
        [(1, 1900), (2, 2100)],
        "a new plan version"
    );
    assert_eq!(email().await, "billing@acme.example");

    let report = import(&app, &source, false, false).await;
    assert!(report.changes.is_empty());
    assert_eq!(report.counts[&RecordType::Plan], counts(0, 4, 0, 1, 1));
}

#[sqlx::test(migrations = "./migrations")]
async fn test_connection_counts_rows_warns_on_write_and_names_what_is_missing(pool: PgPool) {
    let source = source_database(&pool, FIXTURES).await;
    let check = nexacloud::test_connection(&source.url).await.unwrap();
    let counts: Vec<(&str, i64)> = check
        .row_counts
        .iter()
        .map(|(t, c)| (t.as_str(), *c))
        .collect();
    assert_eq!(
        counts,
        [
            ("users", 4),
            ("plans", 5),
            ("deployments", 3),
            ("subscriptions", 9),
            ("usage_records", 6),
            ("invoices", 5),
            ("invoice_items", 3)
        ]
    );
    assert_eq!(check.writable.len(), 7, "the owner could write every table");
    assert_eq!(
        check.writable[0],
        (
            "users".to_string(),
            vec!["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
        )
    );
    assert!(check.differences.is_empty());

    // A read-only role: no warning.
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"
    ))
    .execute(&source.pool)
    .await
    .unwrap();
    let options = source
        .pool
        .connect_options()
        .as_ref()
        .clone()
        .username(&role);
    let check = nexacloud::test_connection(&database_url(&options))
        .await
        .unwrap();
    assert!(check.writable.is_empty(), "{:?}", check.writable);
    assert_eq!(check.row_counts.len(), 7);

    sqlx::raw_sql(
        "ALTER TABLE usage_records DROP COLUMN cpu_hours; \
         ALTER TABLE invoices ALTER COLUMN total TYPE numeric(14,2)",
    )
    .execute(&source.pool)
    .await
    .unwrap();
    let check = nexacloud::test_connection(&source.url).await.unwrap();
    assert_eq!(
        check.differences,
        [
            "column usage_records.cpu_hours is missing (expected numeric(14,4))",
            "column invoices.total is numeric(14,2), expected numeric(12,4)"
        ]
    );
    let output = ledger_cli(
        &pool,
        &[
            "import",
            "nexacloud",
            "test-connection",
            "--source-url",
            &source.url,
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(
            "missing: column usage_records.cpu_hours is missing (expected numeric(14,4))"
        ),
        "{stdout}"
    );
    sqlx::raw_sql(&format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"
    ))
    .execute(&source.pool)
    .await
    .unwrap();
}

#[sqlx::test(migrations = "./migrations")]
async fn an_unreachable_source_is_one_line_without_the_password(pool: PgPool) {
    let url = "postgres://reader:hunter2secret@127.0.0.1:1/nexacloud";
    let error = nexacloud::test_connection(url)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("cannot connect to the source database 127.0.0.1:1 (nexacloud): "),
        "{error}"
    );
    assert!(
        !error.contains("hunter2secret") && !error.contains('\n'),
        "{error}"
    );
    let output = ledger_cli(
        &pool,
        &[
            "import",
            "nexacloud",
            "test-connection",
            "--source-url",
            url,
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
    assert!(
        stderr.contains("cannot connect to the source database"),
        "{stderr}"
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn the_file_door_imports_the_neutral_format_with_exit_codes(pool: PgPool) {
    let _app = app_with_service(pool.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: &[Value]| {
        let path = dir.path().join(name);
        let text: Vec<String> = lines.iter().map(Value::to_string).collect();
        std::fs::write(&path, text.join("\n") + "\n\n").unwrap();
        path.display().to_string()
    };
    let good = [
        json!({"type": "billable_metric", "source": "sheet", "source_id": "m1", "code": "api_calls",
               "name": "API calls", "aggregation_type": "count_agg"}),
        json!({"type": "customer", "source": "sheet", "source_id": "c1", "external_id": "cus_1",
               "name": "Ada", "currency": "USD"}),
        json!({"type": "plan", "source": "sheet", "source_id": "p1", "code": "basic", "name": "Basic",
               "interval": "monthly", "amount_cents": 1000, "amount_currency": "USD",
               "charges": [{"billable_metric_code": "api_calls", "charge_model": "standard",
                            "properties": {"amount": "0.001"}}]}),
        json!({"type": "subscription", "source": "sheet", "source_id": "s1", "external_id": "sub_1",
               "external_customer_id": "cus_1", "plan_code": "basic",
               "subscription_at": "2026-10-01T00:00:00Z"}),
        json!({"type": "usage", "source": "sheet", "source_id": "u1", "external_subscription_id": "sub_1",
               "code": "api_calls", "timestamp": 1791158400, "properties": {}}),
        json!({"type": "external_invoice", "source": "sheet", "source_id": "i1", "number": "S-1",
               "external_customer_id": "cus_1", "external_subscription_id": "sub_1",
               "from_date": "2026-10-01", "to_date": "2026-10-31", "status": "paid", "currency": "USD",
               "fees_amount_cents": 1000, "taxes_amount_cents": 0, "total_amount_cents": 1000}),
    ];
    let report_path = dir.path().join("report.json");
    let path = write("good.jsonl", &good);
    let args = ["import", "file", &path, "--service", "nexacloud"];
    let output = ledger_cli(&pool, &args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("total                      6          0        0       0        0"),
        "{stdout}"
    );
    // The usage took its transaction id from the source id.
    let tx: String = sqlx::query_scalar(
        "SELECT payload->'UsageRecorded'->'sent'->>'transaction_id' FROM events WHERE aggregate_type = 'Usage'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tx, "u1");

    let mut some_bad = good.to_vec();
    some_bad.push(
        json!({"type": "customer", "source": "sheet", "source_id": "c2",
                         "external_id": "cus_2", "currency": "XYZ"}),
    );
    let path = write("some_bad.jsonl", &some_bad);
    let report_arg = report_path.display().to_string();
    let output = ledger_cli(
        &pool,
        &[
            "import",
            "file",
            &path,
            "--service",
            "nexacloud",
            "--report",
            &report_arg,
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(
        report["failures"],
        json!([{"record_type": "customer", "table": "line 7", "source_id": "c2",
                "field": "currency", "reason": "value_is_invalid"}])
    );
    assert_eq!(
        report["counts"]["customer"],
        json!({"new": 0, "unchanged": 1, "changed": 0, "failed": 1, "skipped": 0})
    );

    let path = dir.path().join("nothing.jsonl");
    std::fs::write(&path, "not json\n{\"type\": \"customer\"}\n").unwrap();
    let path = path.display().to_string();
    let output = ledger_cli(&pool, &["import", "file", &path, "--service", "nexacloud"]);
    assert_eq!(output.status.code(), Some(1), "nothing could be done");

    let output = ledger_cli(&pool, &["import", "file", &path, "--service", "nobody"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no service 'nobody' is registered"));
}

/// An imported subscription's past periods are invoiced once, with all of
/// their imported usage, even with the closer running every second while
/// the import is under way.
#[sqlx::test(migrations = "./migrations")]
async fn backfilled_periods_are_invoiced_once_with_all_their_usage(pool: PgPool) {
    let app = spawn_app_with_settings(
        pool.clone(),
        Settings {
            close_interval: Duration::from_secs(1),
            usage_limits: aggregates::usage::UsageLimits::backfill(),
            ..Settings::local(Some(AdminKey::new(ADMIN_KEY)), BackgroundTasks::ALL)
        },
    )
    .await;
    let (status, _) = app.register_service("nexacloud", "NexaCloud").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let record = |kind: RecordType, id: &str, fields: Value| {
        SourceRecord::new(kind, "nexacloud", id, fields)
    };
    let mut importer = Importer::new(&pool, settings(false, false)).await.unwrap();
    for (table, item) in [
        (
            "m",
            record(
                RecordType::BillableMetric,
                "cpu",
                json!({"code": "cpu_seconds", "name": "CPU",
            "aggregation_type": "sum_agg", "field_name": "cpu_seconds"}),
            ),
        ),
        (
            "c",
            record(
                RecordType::Customer,
                "u1",
                json!({"external_id": "u1", "name": "Acme"}),
            ),
        ),
        (
            "p",
            record(
                RecordType::Plan,
                "p1",
                json!({"code": "starter-monthly", "name": "Starter",
            "interval": "monthly", "amount_cents": 1900, "amount_currency": "CAD",
            "charges": [{"billable_metric_code": "cpu_seconds", "charge_model": "standard",
                         "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "0"}}]}),
            ),
        ),
        (
            "s",
            record(
                RecordType::Subscription,
                "s1",
                json!({"external_id": "s1", "external_customer_id": "u1",
            "plan_code": "starter-monthly", "subscription_at": "2026-09-01T00:00:00Z", "shadow": true}),
            ),
        ),
    ] {
        importer.add(table, item).await.unwrap();
    }
    // The first usage record applies the subscription; the rest waits while
    // the closer makes passes over a subscription with three past periods.
    let usage = |n: u32, day: &str| {
        let at: chrono::DateTime<chrono::Utc> = day.parse().unwrap();
        record(
            RecordType::Usage,
            &format!("r{n}"),
            json!({"transaction_id": format!("usage_records:{n}"),
            "external_subscription_id": "s1", "code": "cpu_seconds", "timestamp": at.timestamp(),
            "properties": {"cpu_seconds": "36000"}}),
        )
    };
    importer
        .add("usage_records", usage(1, "2026-09-15T00:00:00Z"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let invoices: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(invoices, 0, "held until the import run completes");
    importer
        .add("usage_records", usage(2, "2026-10-15T00:00:00Z"))
        .await
        .unwrap();
    importer
        .add("usage_records", usage(3, "2026-11-15T00:00:00Z"))
        .await
        .unwrap();
    importer
        .add("usage_records", usage(4, "2026-11-16T00:00:00Z"))
        .await
        .unwrap();
    importer.finish().await.unwrap();

    let mut finalized: Vec<(String, i64, i64)> = Vec::new();
    for _ in 0..100 {
        finalized = sqlx::query_as(
            "SELECT issuing_date::text, (finalization->'totals'->>'fees_amount_cents')::bigint, \
             jsonb_array_length(finalization->'fees')::bigint FROM invoices \
             WHERE status = 'finalized' ORDER BY issued_at",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if finalized.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // $19 + 10 CPU-hours at $0.0075 (7.5 cents, 8 after rounding) per period;
    // November has twice the usage: 15 cents.
    // Each: the flat fee and the CPU charge, nothing adjusted later.
    assert_eq!(
        finalized,
        [
            ("2026-10-01".to_string(), 1908, 2),
            ("2026-11-01".to_string(), 1908, 2),
            ("2026-12-01".to_string(), 1915, 2)
        ]
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (finalized, adjustments): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'finalized'), \
                count(*) FILTER (WHERE finalization::text LIKE '%\"adjustment\"%') FROM invoices",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (finalized, adjustments),
        (3, 0),
        "each period invoiced once"
    );
}

/// The records of one subscription's backfill: September to November.
fn backfill_records() -> Vec<SourceRecord> {
    let record = |kind: RecordType, id: &str, fields: Value| {
        SourceRecord::new(kind, "nexacloud", id, fields)
    };
    let mut records = vec![
        record(
            RecordType::BillableMetric,
            "cpu",
            json!({"code": "cpu_seconds", "name": "CPU",
            "aggregation_type": "sum_agg", "field_name": "cpu_seconds"}),
        ),
        record(
            RecordType::Customer,
            "u1",
            json!({"external_id": "u1", "name": "Acme"}),
        ),
        record(
            RecordType::Plan,
            "p1",
            json!({"code": "starter-monthly", "name": "Starter",
            "interval": "monthly", "amount_cents": 1900, "amount_currency": "CAD", "charges": [{"billable_metric_code": "cpu_seconds",
                "charge_model": "standard", "properties": {"amount": "0"}}]}),
        ),
        record(
            RecordType::Subscription,
            "s1",
            json!({"external_id": "s1", "external_customer_id": "u1",
            "plan_code": "starter-monthly", "subscription_at": "2026-09-01T00:00:00Z", "shadow": true}),
        ),
    ];
    records.push(record(
        RecordType::Usage,
        "r1",
        json!({"external_subscription_id": "s1",
        "code": "cpu_seconds", "timestamp": 1789430400, "properties": {"cpu_seconds": "1"}}),
    ));
    records
}

#[sqlx::test(migrations = "./migrations")]
async fn a_crashed_run_holds_its_subscriptions_until_a_later_run_completes(pool: PgPool) {
    let app = app_with_service(pool.clone()).await;
    let close = || async {
        app.catch_up().await;
        let now = "2026-12-03T00:00:00Z".parse().unwrap();
        ledger::invoicing::closer::close_due(&pool, None, chrono::Duration::days(3650), now)
            .await
            .unwrap()
            .finalized
    };
    let mut crashed = Importer::new(&pool, settings(false, false)).await.unwrap();
    for record in backfill_records() {
        crashed.add("rows", record).await.unwrap();
    }
    drop(crashed); // the usage chunk never flushed, the run never completed
    assert_eq!(count_events(&pool, "Subscription").await, 1);
    assert_eq!(close().await, 0, "held: its run did not complete");

    let mut rerun = Importer::new(&pool, settings(false, false)).await.unwrap();
    for record in backfill_records() {
        rerun.add("rows", record).await.unwrap();
    }
    let report = rerun.finish().await.unwrap();
    assert_eq!(
        report.counts[&RecordType::Subscription],
        counts(0, 1, 0, 0, 0)
    );
    assert_eq!(report.counts[&RecordType::Usage], counts(1, 0, 0, 0, 0));
    assert_eq!(
        close().await,
        3,
        "September, October and November, once each"
    );
}

#[sqlx::test(migrations = "./migrations")]
async fn a_subscription_keeps_its_metadata_through_the_api(pool: PgPool) {
    let app = spawn_app(pool).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    let created = svc
        .created(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": "dep_1", "metadata": {"deployment_id": "d-1"}}}),
        )
        .await;
    assert_eq!(
        created["subscription"]["metadata"],
        json!({"deployment_id": "d-1"})
    );
    let (_, found) = svc.get("/subscriptions/dep_1").await;
    assert_eq!(
        found["subscription"]["metadata"],
        json!({"deployment_id": "d-1"})
    );
    let (status, body) = svc
        .post(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": "dep_2", "metadata": "d-2"}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error_details"],
        json!({"metadata": ["value_is_invalid"]})
    );
    let created = svc
        .created(
            "/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": "dep_3"}}),
        )
        .await;
    assert_eq!(created["subscription"]["metadata"], json!({}));
}
