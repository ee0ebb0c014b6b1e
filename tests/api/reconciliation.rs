//! The dual-run reconciliation: shadow invoices of October 2026 against the
//! source's imported invoices, every status and cause on figures computed
//! here by hand, tolerance, the what-if price book, acceptance, re-import,
//! the rebuild, and the flip (refused, allowed, undone, first live invoice).

use aggregates::usage::UsageLimits;
use chrono::Duration;
use ledger::event_log::projection_runner::rebuild_into;
use ledger::event_log::store::CommandMetadata;
use ledger::invoicing::replay::PriceBook;
use ledger::reconciliation::flip::{flip, FlipReport, FlipRequest};
use ledger::reconciliation::{accept, reconcile, ReconcileReport, ReconcileRequest};
use projections::{Projection, Reconciliation};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{close, ledger_cli, spawn_app_with_limits, ServiceClient, TestApp};

/// The month every case is reconciled in.
const OCTOBER: &str = "2026-10";

async fn subscribe(svc: &ServiceClient<'_>, id: &str, customer: &str, plan: &str, at: &str) {
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": customer, "plan_code": plan,
               "external_id": id, "subscription_at": at, "shadow": true}}),
    )
    .await;
}

async fn cpu(svc: &ServiceClient<'_>, subscription: &str, at: &str, seconds: &str) {
    svc.created(
        "/events",
        json!({"event": {"transaction_id": format!("{subscription}-{at}"),
               "external_subscription_id": subscription, "code": "cpu_seconds",
               "timestamp": at.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp(),
               "properties": {"cpu_seconds": seconds}}}),
    )
    .await;
}

/// An `external_invoice` record of the source `nc`.
fn source_invoice(
    id: &str,
    customer: &str,
    subscription: Option<&str>,
    dates: Option<(&str, &str)>,
    status: &str,
    lines: &[(&str, &str, &str, i64)],
    taxes: i64,
) -> Value {
    let fees: i64 = lines.iter().map(|l| l.3).sum();
    json!({"type": "external_invoice", "source": "nc", "source_id": id, "number": format!("NC-{id}"),
           "external_customer_id": customer, "external_subscription_id": subscription,
           "from_date": dates.map(|d| d.0), "to_date": dates.map(|d| d.1), "status": status,
           "currency": "CAD", "fees_amount_cents": fees, "taxes_amount_cents": taxes,
           "total_amount_cents": fees + taxes,
           "lines": lines.iter().map(|(kind, units, rate, cents)| json!({
               "kind": kind, "description": kind, "units": units, "unit_amount": rate,
               "amount_cents": cents})).collect::<Vec<_>>()})
}

const OCT: Option<(&str, &str)> = Some(("2026-10-01", "2026-10-31"));

/// What the source invoiced for October. The ledger's side, by hand
/// (Starter: $19.00 a month, 10 core-hours included, $0.0075 per core-hour
/// beyond; 13% HST per line, half-up):
/// - dep_match, dep_price: 420,000 CPU-s = 106.666… core-hours beyond the
///   quota × 0.0075 = $0.80; 1900 + 80 + 247 + 10 (10.4) = 2237. The source
///   billed dep_match the same, dep_price at $0.006 = 64 + 247 + 8 = 2219;
/// - dep_prorated, from 15 October: 17 of 31 days × $19.00 = 10.4193… →
///   1042 + 135 (135.46) = 1177; the source billed the full month, 2147;
/// - dep_rounding on Mini ($0.05 + the same charge), 60,000 CPU-s = $0.05 of
///   usage: 5 + 5 + 1 (0.65) + 1 (0.65) = 12; the source taxed $0.10 once:
///   10 + 1 (1.3) = 11;
/// - dep_unbilled: 1900 + 247 = 2147, never invoiced at the source (one void
///   invoice, not counted);
/// - dep_mismatch: 2147 on both sides, the source's window 5 Oct – 4 Nov;
/// - dep_late starts on 1 November in the ledger; the source invoiced its
///   October, 2147;
/// - a one-off invoice of cus_ada: $25.00 + $3.25, no subscription.
fn source_invoices(dep_price_rate: &str, dep_price_cents: i64, dep_price_tax: i64) -> Vec<Value> {
    vec![
        source_invoice(
            "1",
            "cus_ada",
            Some("dep_match"),
            OCT,
            "paid",
            &[
                ("plan", "1", "19", 1900),
                ("usage", "106.6667", "0.0075", 80),
            ],
            257,
        ),
        source_invoice(
            "2",
            "cus_ada",
            Some("dep_price"),
            OCT,
            "paid",
            &[
                ("plan", "1", "19", 1900),
                ("usage", "106.6667", dep_price_rate, dep_price_cents),
            ],
            dep_price_tax,
        ),
        source_invoice(
            "3",
            "cus_bob",
            Some("dep_prorated"),
            OCT,
            "paid",
            &[("plan", "1", "19", 1900)],
            247,
        ),
        source_invoice(
            "4",
            "cus_bob",
            Some("dep_rounding"),
            OCT,
            "open",
            &[("plan", "1", "0.05", 5), ("usage", "6.6667", "0.0075", 5)],
            1,
        ),
        source_invoice(
            "5",
            "cus_cy",
            Some("dep_unbilled"),
            OCT,
            "void",
            &[("plan", "1", "19", 1900)],
            247,
        ),
        source_invoice(
            "6",
            "cus_cy",
            Some("dep_mismatch"),
            Some(("2026-10-05", "2026-11-04")),
            "paid",
            &[("plan", "1", "19", 1900)],
            247,
        ),
        source_invoice(
            "7",
            "cus_cy",
            Some("dep_late"),
            OCT,
            "paid",
            &[("plan", "1", "19", 1900)],
            247,
        ),
        source_invoice(
            "8",
            "cus_ada",
            None,
            None,
            "paid",
            &[("fee", "1", "25", 2500)],
            325,
        ),
    ]
}

fn import_invoices(pool: &PgPool, dir: &std::path::Path, records: &[Value], changes: bool) {
    let path = dir.join("invoices.jsonl");
    let text: Vec<String> = records.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    let path = path.display().to_string();
    let mut args = vec!["import", "file", &path, "--service", "nexacloud"];
    if changes {
        args.push("--apply-changes");
    }
    let output = ledger_cli(pool, &args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The catalog, the subscriptions, October's usage, the source's invoices
/// and October closed (the ledger's shadow invoices finalized).
async fn dual_run(app: &TestApp, dir: &std::path::Path) -> String {
    let svc = app.service("nexacloud").await;
    let metric = svc.nexacloud_catalog().await;
    let metric_id = metric["billable_metric"]["lago_id"]
        .as_str()
        .unwrap()
        .to_string();
    svc.created(
        "/plans",
        json!({"plan": {"name": "Mini", "code": "mini", "interval": "monthly",
            "amount_cents": 5, "amount_currency": "CAD",
            "charges": [{"billable_metric_id": metric_id, "charge_model": "standard",
                "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]}}),
    )
    .await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_ada",
               "billing_configuration": {"payment_provider": "stripe", "provider_customer_id": "cus_S1"}}}),
    )
    .await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_bob", "name": "Bob", "currency": "CAD",
               "tax_codes": ["hst_on"]}}),
    )
    .await;
    svc.created(
        "/customers",
        json!({"customer": {"external_id": "cus_cy", "name": "Cy", "currency": "CAD", "tax_codes": ["hst_on"],
               "billing_configuration": {"payment_provider": "stripe", "provider_customer_id": "cus_S3"}}}),
    )
    .await;
    // cus_ada is in Toronto: its months start at 04:00 UTC (EDT).
    subscribe(
        &svc,
        "dep_match",
        "cus_ada",
        "starter",
        "2026-10-01T04:00:00Z",
    )
    .await;
    subscribe(
        &svc,
        "dep_price",
        "cus_ada",
        "starter",
        "2026-10-01T04:00:00Z",
    )
    .await;
    subscribe(
        &svc,
        "dep_prorated",
        "cus_bob",
        "starter",
        "2026-10-15T00:00:00Z",
    )
    .await;
    subscribe(
        &svc,
        "dep_rounding",
        "cus_bob",
        "mini",
        "2026-10-01T00:00:00Z",
    )
    .await;
    subscribe(
        &svc,
        "dep_unbilled",
        "cus_cy",
        "starter",
        "2026-10-01T00:00:00Z",
    )
    .await;
    subscribe(
        &svc,
        "dep_mismatch",
        "cus_cy",
        "starter",
        "2026-10-01T00:00:00Z",
    )
    .await;
    subscribe(
        &svc,
        "dep_late",
        "cus_cy",
        "starter",
        "2026-11-01T00:00:00Z",
    )
    .await;
    cpu(&svc, "dep_match", "2026-10-10T12:00:00Z", "420000").await;
    cpu(&svc, "dep_price", "2026-10-10T12:00:00Z", "420000").await;
    cpu(&svc, "dep_rounding", "2026-10-10T12:00:00Z", "60000").await;
    import_invoices(&app.pool, dir, &source_invoices("0.006", 64, 255), false);
    close(app, "2026-11-01T06:00:00Z").await;
    metric_id
}

async fn october(
    pool: &PgPool,
    tolerance_cents: i64,
    pricing: Option<PriceBook>,
) -> ReconcileReport {
    reconcile(
        pool,
        &ReconcileRequest {
            period: OCTOBER.into(),
            service: Some("nexacloud".into()),
            subscription: None,
            tolerance_cents,
            pricing,
        },
    )
    .await
    .expect("reconcile")
}

/// (subscription, status, ledger total, source total, delta) of each row.
fn rows(report: &ReconcileReport) -> Vec<(String, String, i64, i64, i64)> {
    report
        .rows
        .iter()
        .map(|r| {
            (
                r.external_subscription_id.clone(),
                r.status.clone(),
                r.ledger.total_cents,
                r.source.total_cents,
                r.delta_cents,
            )
        })
        .collect()
}

fn row(sub: &str, status: &str, ledger: i64, source: i64) -> (String, String, i64, i64, i64) {
    (sub.into(), status.into(), ledger, source, ledger - source)
}

/// (cause, cents) of a row's causes.
fn causes_of(report: &ReconcileReport, subscription: &str) -> Vec<(String, i64)> {
    report
        .rows
        .iter()
        .find(|r| r.external_subscription_id == subscription)
        .unwrap()
        .causes
        .iter()
        .map(|c| (c.cause.as_str().to_string(), c.amount_cents))
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn app_limits() -> UsageLimits {
    UsageLimits {
        acceptance_window: Duration::days(3650),
        ..Default::default()
    }
}

#[sqlx::test(migrations = "./migrations")]
async fn every_status_and_cause_on_hand_computed_cents(pool: PgPool) {
    let app = spawn_app_with_limits(pool.clone(), app_limits()).await;
    let dir = tempfile::tempdir().unwrap();
    let metric_id = dual_run(&app, dir.path()).await;

    let report = october(&pool, 0, None).await;
    assert_eq!(
        rows(&report),
        vec![
            row("dep_late", "missing_in_ledger", 0, 2147),
            row("dep_match", "match", 2237, 2237),
            row("dep_mismatch", "period_mismatch", 2147, 2147),
            row("dep_price", "delta", 2237, 2219),
            row("dep_prorated", "delta", 1177, 2147),
            row("dep_rounding", "delta", 12, 11),
            row("dep_unbilled", "missing_in_source", 2147, 0),
        ]
    );
    assert_eq!(causes_of(&report, "dep_price"), vec![("usage".into(), 18)]);
    assert_eq!(
        causes_of(&report, "dep_prorated"),
        vec![("flat_fee".into(), -970)]
    );
    assert_eq!(
        causes_of(&report, "dep_rounding"),
        vec![("rounding".into(), 1)]
    );
    assert_eq!(causes_of(&report, "dep_mismatch"), vec![]);
    let price = &report.rows[3].causes[0];
    assert_eq!(price.detail["differs"], json!(["price per unit"]));
    assert_eq!(price.detail["ledger"]["rates"], json!(["0.0075"]));
    assert_eq!(price.detail["source"]["rates"], json!(["0.006"]));
    assert_eq!(price.detail["source"]["units"], "106.6667");
    assert_eq!(
        report.rows[4].causes[0].explanation,
        "flat fee: the ledger billed 10.42 for 2026-10-15 – 2026-10-31 (17 of 31 days, prorated), \
         the source 19.00 for 2026-10-01 – 2026-10-31 (31 days)"
    );
    let mismatch = &report.rows[2];
    assert_eq!(
        (
            mismatch.ledger.from,
            mismatch.ledger.to,
            mismatch.source.from,
            mismatch.source.to
        ),
        (
            "2026-10-01".parse().ok(),
            "2026-10-31".parse().ok(),
            "2026-10-05".parse().ok(),
            "2026-11-04".parse().ok()
        )
    );
    // The void invoice is not the source's billing.
    assert!(report.rows[6].source.invoices.is_empty());
    // The one-off invoice is listed for its customer, never compared.
    assert_eq!(report.unattributed.len(), 1);
    let one_off = &report.unattributed[0];
    assert_eq!(
        (
            one_off.external_customer_id.as_str(),
            one_off.side.as_str(),
            one_off.number.as_str(),
            one_off.total_cents
        ),
        ("cus_ada", "source", "NC-8", 2825)
    );
    let summary = &report.summary;
    assert_eq!(summary.rows, 7);
    assert_eq!(
        summary.statuses,
        counts(&[
            ("accepted", 0),
            ("delta", 3),
            ("match", 1),
            ("missing_in_ledger", 1),
            ("missing_in_source", 1),
            ("period_mismatch", 1)
        ])
    );
    assert_eq!(
        summary.causes,
        counts(&[
            ("flat_fee", 1),
            ("one_off", 0),
            ("rounding", 1),
            ("tax", 0),
            ("usage", 1)
        ])
    );
    assert_eq!(
        (
            summary.ledger_total_cents,
            summary.source_total_cents,
            summary.delta_cents
        ),
        (9957, 10908, -951)
    );
    assert_eq!(
        (summary.unattributed, summary.unattributed_total_cents),
        (1, 2825)
    );
    assert!(!report.all_resolved());

    // Within a tolerance of one cent the rounding delta is a match.
    let tolerant = october(&pool, 1, None).await;
    let rounding = &tolerant.rows[5];
    assert_eq!(
        (
            rounding.status.as_str(),
            rounding.matched_within_tolerance_cents
        ),
        ("match", Some(1))
    );
    assert_eq!(tolerant.summary.statuses["match"], 2);

    // What if the price were $0.006 per core-hour? dep_price would match,
    // dep_match would break; nothing live changes.
    let book: PriceBook = serde_json::from_value(json!({"plans": [{"code": "starter",
        "charges": [{"billable_metric_id": metric_id, "charge_model": "standard",
                     "properties": {"amount": "0.006", "unit_size": "3600", "free_units": "36000"}}]}]}))
    .unwrap();
    let what_if = october(&pool, 0, Some(book)).await;
    let summary = what_if.what_if.as_ref().unwrap();
    assert_eq!(summary.turns_into_match, vec!["nexacloud/dep_price"]);
    assert_eq!(summary.breaks, vec!["nexacloud/dep_match"]);
    assert_eq!(
        summary.still_unresolved,
        vec![
            "nexacloud/dep_late",
            "nexacloud/dep_mismatch",
            "nexacloud/dep_prorated",
            "nexacloud/dep_rounding",
            "nexacloud/dep_unbilled"
        ]
    );
    let price_then = what_if.rows[3].what_if.as_ref().unwrap();
    assert_eq!(
        (
            price_then.status.as_str(),
            price_then.ledger_total_cents,
            price_then.delta_cents
        ),
        ("match", 2219, 0)
    );
    let match_then = what_if.rows[1].what_if.as_ref().unwrap();
    assert_eq!(
        (match_then.status.as_str(), match_then.delta_cents),
        ("delta", -18)
    );
    assert_eq!(
        rows(&october(&pool, 0, None).await),
        rows(&report),
        "nothing live changed"
    );

    // The operator API gives the same; bad requests are refused by field.
    let (status, body) = app
        .get_admin("/admin/v1/reconciliation?period=2026-10&service=nexacloud")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["reconciliation"]["summary"],
        serde_json::to_value(&report.summary).unwrap()
    );
    assert_eq!(
        body["reconciliation"]["rows"][3]["causes"][0]["amount_cents"],
        18
    );
    for (query, field) in [
        ("period=2026-13", "period"),
        ("period=2026-10&tolerance_cents=-1", "tolerance_cents"),
        ("", "period"),
    ] {
        let (status, body) = app
            .get_admin(&format!("/admin/v1/reconciliation?{query}"))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
        assert!(
            body["error_details"].get(field).is_some(),
            "{query}: {body}"
        );
    }
    let (status, _) = app
        .get("/admin/v1/reconciliation?period=2026-10", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Both sides line by line, with the ledger's arithmetic.
    let (status, body) = app
        .get_admin("/admin/v1/reconciliation/nexacloud/dep_price/2026-10")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let explained = &body["reconciliation_explanation"];
    let usage = &explained["side_by_side"][1];
    assert_eq!(usage["class"], "usage");
    assert_eq!(usage["ledger"][0]["amount_cents"], 80);
    assert_eq!(usage["source"][0]["units"], "106.6667");
    assert_eq!(usage["source"][0]["unit_amount"], "0.006");
    let arithmetic = explained["ledger_explanations"][0]["fees"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fee_type"] == "charge")
        .unwrap()["arithmetic"]
        .to_string();
    assert!(arithmetic.contains("0.0075"), "{arithmetic}");

    // The CLI: exit 1 while a row is unresolved, CSV and the side-by-side text.
    let output = ledger_cli(
        &pool,
        &["reconcile", "--period", OCTOBER, "--service", "nexacloud"],
    );
    assert_eq!(output.status.code(), Some(1));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("summary: 7 rows"), "{table}");
    assert!(table.contains("unattributed"), "{table}");
    let output = ledger_cli(
        &pool,
        &[
            "reconcile",
            "--period",
            OCTOBER,
            "--subscription",
            "dep_match",
            "--format",
            "csv",
        ],
    );
    assert_eq!(output.status.code(), Some(0));
    let csv = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(
        lines[1].starts_with(
            "nexacloud,dep_match,cus_ada,2026-10,match,match,1980,257,2237,1980,257,2237,0,"
        ),
        "{csv}"
    );
    let output = ledger_cli(&pool, &["explain", "reconciliation", "dep_price", OCTOBER]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("cause usage"), "{text}");
    assert!(text.contains("usage 106.6667 × 0.006 = 0.64"), "{text}");
}

#[sqlx::test(migrations = "./migrations")]
async fn accepting_reimporting_and_rebuilding_keep_one_row_per_subscription_and_period(
    pool: PgPool,
) {
    let app = spawn_app_with_limits(pool.clone(), app_limits()).await;
    let dir = tempfile::tempdir().unwrap();
    dual_run(&app, dir.path()).await;

    let refused = accept(
        &pool,
        None,
        "dep_match",
        OCTOBER,
        "fine",
        CommandMetadata::cli(),
    )
    .await;
    assert_eq!(
        refused.unwrap_err().to_string(),
        "dep_match in 2026-10 matches: there is nothing to accept"
    );
    let refused = accept(
        &pool,
        None,
        "dep_prorated",
        OCTOBER,
        "  ",
        CommandMetadata::cli(),
    )
    .await;
    assert_eq!(refused.unwrap_err().to_string(), "reason is mandatory");
    let output = ledger_cli(
        &pool,
        &[
            "reconcile",
            "accept",
            "dep_prorated",
            OCTOBER,
            "--reason",
            "the source bills whole months",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    app.catch_up().await;
    let report = october(&pool, 0, None).await;
    let accepted = &report.rows[4];
    assert_eq!(
        (accepted.status.as_str(), accepted.resolved),
        ("accepted", true)
    );
    let acceptance = accepted.accepted.as_ref().unwrap();
    assert_eq!(
        (
            acceptance.reason.as_str(),
            acceptance.accepted_by.as_str(),
            acceptance.delta_cents
        ),
        ("the source bills whole months", "operator", -970)
    );
    assert_eq!(report.summary.statuses["accepted"], 1);
    assert_eq!(report.summary.statuses["delta"], 2);

    // The source corrects dep_price's October (billed at $0.0075 after
    // all): the re-import updates the row; nothing is compared twice.
    import_invoices(&pool, dir.path(), &source_invoices("0.0075", 80, 257), true);
    app.catch_up().await;
    let report = october(&pool, 0, None).await;
    assert_eq!(report.rows.len(), 7);
    assert_eq!(rows(&report)[3], row("dep_price", "match", 2237, 2237));
    let source_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_invoices WHERE side = 'source'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(source_rows, 8);

    // Rebuilt beside the live tables, the projection is the same row for row.
    let projection: &dyn Projection = &Reconciliation;
    rebuild_into(&pool, &[projection], "reconciliation_copy")
        .await
        .unwrap();
    for (table, order) in [
        (
            "reconciliation_rows",
            "service_code, external_subscription_id, period",
        ),
        ("reconciliation_invoices", "service_code, side, key"),
        (
            "reconciliation_acceptances",
            "service_code, external_subscription_id, period",
        ),
        (
            "reconciliation_timezones",
            "service_code, external_customer_id",
        ),
    ] {
        let query = |schema: &str| {
            format!("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY {order}), '[]') FROM {schema}.{table} t")
        };
        let live: Value = sqlx::query_scalar(&query("public"))
            .fetch_one(&pool)
            .await
            .unwrap();
        let rebuilt: Value = sqlx::query_scalar(&query("reconciliation_copy"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(live.as_array().is_some_and(|a| !a.is_empty()), "{table}");
        assert_eq!(live, rebuilt, "{table}");
    }
}

async fn flip_at(
    pool: &PgPool,
    subscriptions: &[&str],
    now: &str,
    undo: bool,
    cycles: usize,
) -> FlipReport {
    flip(
        pool,
        &FlipRequest {
            service: "nexacloud".into(),
            subscriptions: subscriptions.iter().map(|s| s.to_string()).collect(),
            cycles,
            tolerance_cents: 0,
            dry_run: false,
            undo,
            now: now.parse().unwrap(),
        },
        CommandMetadata::cli(),
    )
    .await
    .expect("flip")
}

fn blocked(report: &FlipReport) -> Vec<(String, Vec<String>)> {
    report
        .blocked
        .iter()
        .map(|b| (b.external_subscription_id.clone(), b.blockers.clone()))
        .collect()
}

async fn flip_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN ('SubscriptionFlipped', 'SubscriptionFlipUndone')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn numbers(pool: &PgPool, subscription: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT number FROM invoices WHERE external_subscription_id = $1 AND number IS NOT NULL ORDER BY issued_at",
    )
    .bind(subscription)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn the_flip_is_refused_on_unresolved_rows_then_allowed_undone_and_bills_live_after_its_boundary(
    pool: PgPool,
) {
    let app = spawn_app_with_limits(pool.clone(), app_limits()).await;
    let dir = tempfile::tempdir().unwrap();
    dual_run(&app, dir.path()).await;
    let output = ledger_cli(
        &pool,
        &[
            "reconcile",
            "accept",
            "dep_prorated",
            OCTOBER,
            "--reason",
            "whole months",
        ],
    );
    assert_eq!(output.status.code(), Some(0));
    app.catch_up().await;

    // Every shadow subscription at once: refused, listing what blocks, nothing written.
    let report = flip_at(&pool, &[], "2026-11-15T12:00:00Z", false, 1).await;
    assert!(report.flipped.is_empty());
    assert_eq!(
        blocked(&report),
        vec![
            ("dep_late".into(), vec!["2026-10: missing_in_ledger".into()]),
            (
                "dep_mismatch".into(),
                vec!["2026-10: period_mismatch (delta 0.00)".into()]
            ),
            (
                "dep_price".into(),
                vec!["2026-10: delta (delta 0.18)".into()]
            ),
            (
                "dep_prorated".into(),
                vec!["its customer has no payment provider customer id".into()]
            ),
            (
                "dep_rounding".into(),
                vec![
                    "2026-10: delta (delta 0.01)".into(),
                    "its customer has no payment provider customer id".into()
                ]
            ),
            (
                "dep_unbilled".into(),
                vec!["2026-10: missing_in_source".into()]
            ),
        ]
    );
    assert_eq!(flip_events(&pool).await, 0);
    let output = ledger_cli(&pool, &["flip", "--service", "nexacloud"]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with("refused: nothing was written; blocking:"),
        "{text}"
    );
    assert!(text.contains("dep_price"), "{text}");
    let report = flip_at(&pool, &["dep_match"], "2026-11-15T12:00:00Z", false, 2).await;
    assert_eq!(
        blocked(&report),
        vec![(
            "dep_match".into(),
            vec!["1 reconciled period(s), 2 needed".into()]
        )]
    );
    let report = flip_at(&pool, &["dep_nobody"], "2026-11-15T12:00:00Z", false, 1).await;
    assert_eq!(
        blocked(&report),
        vec![(
            "dep_nobody".into(),
            vec!["not a shadow subscription of nexacloud".into()]
        )]
    );

    // dep_match is live from Toronto's 1 December; undone; flipped again.
    let report = flip_at(&pool, &["dep_match"], "2026-11-15T12:00:00Z", false, 1).await;
    assert!(report.blocked.is_empty(), "{:?}", report.blocked);
    assert_eq!(
        report.flipped[0].live_from.to_rfc3339(),
        "2026-12-01T05:00:00+00:00"
    );
    app.catch_up().await;
    let live_from: Option<String> = sqlx::query_scalar(
        "SELECT resource->>'live_from' FROM subscriptions WHERE external_id = 'dep_match'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(live_from.as_deref(), Some("2026-12-01T05:00:00Z"));
    let again = flip_at(&pool, &["dep_match"], "2026-11-15T12:00:00Z", false, 1).await;
    assert_eq!(
        blocked(&again),
        vec![("dep_match".into(), vec!["already flipped".into()])]
    );
    let undone = flip_at(&pool, &["dep_match"], "2026-11-16T12:00:00Z", true, 1).await;
    assert_eq!(undone.flipped.len(), 1);
    flip_at(&pool, &["dep_match"], "2026-11-16T12:00:00Z", false, 1).await;
    assert_eq!(flip_events(&pool).await, 3);

    // The invoice at the boundary bills November, the source's: shadow.
    // December's is the first live one, numbered in the live sequence.
    close(&app, "2026-12-01T06:00:00Z").await;
    close(&app, "2027-01-01T06:00:00Z").await;
    let billed = numbers(&pool, "dep_match").await;
    assert_eq!(billed.len(), 3, "{billed:?}");
    assert!(
        billed[0].starts_with("SHADOW-") && billed[1].starts_with("SHADOW-"),
        "{billed:?}"
    );
    assert_eq!(billed[2], "NEXACLOUD-000001");
    assert!(numbers(&pool, "dep_price")
        .await
        .iter()
        .all(|n| n.starts_with("SHADOW-")));
    let refused = flip_at(&pool, &["dep_match"], "2027-01-02T00:00:00Z", true, 1).await;
    assert_eq!(
        blocked(&refused),
        vec![(
            "dep_match".into(),
            vec!["its first live invoice (issued at 2027-01-01T05:00:00+00:00) exists".into()]
        )]
    );
}
