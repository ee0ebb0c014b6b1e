//! `ledger demo`: start the ledger, record a few facts through its HTTP API
//! and print what the ledger now knows — the log and the projections built
//! from it. It grows as capabilities land.

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::{Application, BackgroundTasks, Settings};
use crate::event_log::projection_runner;
use crate::http::admin::AdminKey;
use crate::postgres::{ClusterAccess, Database, DatabaseConfig};

const SERVICES: [(&str, &str); 3] = [
    ("nexacloud", "NexaCloud hosting"),
    ("nexadesk", "NexaDesk helpdesk"),
    ("nexamaps", "NexaMaps API"),
];

/// Run the demo on the database `config` names (see the README).
/// `log_file`: where the server's log lines go, if not to stderr.
pub async fn run(
    config: &DatabaseConfig,
    log_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let database = Database::open(config, ClusterAccess::Own).await?;
    let result = demonstrate(&database, log_file).await;
    database.close().await;
    result
}

async fn demonstrate(
    database: &Database,
    log_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let admin_key = uuid::Uuid::new_v4().to_string();
    let settings = Settings {
        // The demo's webhook receiver listens on loopback.
        providers: crate::http::Providers {
            webhook_addresses: crate::webhooks::address::AddressPolicy::parse(&[
                "127.0.0.1/32".into()
            ])
            .map_err(anyhow::Error::msg)?,
            ..Default::default()
        },
        ..Settings::local(
            Some(AdminKey::new(&admin_key)),
            BackgroundTasks {
                webhooks: true,
                ..BackgroundTasks::PROJECTIONS
            },
        )
    };
    let ledger = Application::build(database.pool.clone(), settings)
        .await?
        .spawn()?;
    let base = ledger.base_url.clone();

    println!(
        "ledger serving at {base} (database: {})",
        describe(database)
    );
    if let Some(file) = log_file {
        println!(
            "the server's log lines: {} (`ledger demo --server-logs` prints them instead)",
            std::path::absolute(file)?.display()
        );
    }
    println!();
    let client = Client {
        http: reqwest::Client::new(),
        base: base.clone(),
        admin_key,
    };
    println!("== recording facts through the admin API ==");
    for (code, name) in SERVICES {
        let (status, body) = client
            .post(
                "/admin/v1/services",
                json!({"service": {"code": code, "name": name}}),
            )
            .await?;
        match status {
            StatusCode::OK => println!("POST /admin/v1/services {code:<10} -> 200 registered"),
            StatusCode::UNPROCESSABLE_ENTITY => println!(
                "POST /admin/v1/services {code:<10} -> 422 {} (kept from an earlier run)",
                body["error_details"]
            ),
            other => anyhow::bail!("unexpected answer {other}: {body}"),
        }
    }
    let (status, body) = client
        .post("/admin/v1/services/nexamaps/deactivate", json!({}))
        .await?;
    println!(
        "POST /admin/v1/services/nexamaps/deactivate -> {} {}",
        status.as_u16(),
        body.get("code")
            .or(body.get("service").and_then(|s| s.get("status")))
            .unwrap_or(&Value::Null)
    );
    let (status, body) = client
        .post(
            "/admin/v1/services",
            json!({"service": {"code": "NexaCloud!", "name": "x"}}),
        )
        .await?;
    println!(
        "POST /admin/v1/services NexaCloud! -> {} {}",
        status.as_u16(),
        body["error_details"]
    );

    println!("\n== NexaCloud's catalog, through the Lago-compatible API with its own key ==");
    let (_, key) = client
        .post(
            "/admin/v1/services/nexacloud/api_keys",
            json!({"api_key": {"label": "demo"}}),
        )
        .await?;
    let nexacloud = client.as_service(key["api_key"]["key"].as_str().unwrap_or_default());
    let (_, metric) = nexacloud
        .post(
            "/api/v1/billable_metrics",
            json!({"billable_metric": {"name": "CPU seconds", "code": "cpu_seconds",
                   "aggregation_type": "sum_agg", "field_name": "cpu_seconds"}}),
        )
        .await?;
    let metric_id = match metric["billable_metric"]["lago_id"].as_str() {
        Some(id) => id.to_string(),
        None => nexacloud
            .get("/api/v1/billable_metrics/cpu_seconds")
            .await?
            .1["billable_metric"]["lago_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    // The deployments have been running since yesterday.
    let started = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let writes = [
        (
            "/api/v1/taxes",
            json!({"tax": {"name": "HST Ontario", "code": "hst_on", "rate": 13.0}}),
        ),
        (
            "/api/v1/plans",
            json!({"plan": {"name": "Starter", "code": "starter", "interval": "monthly",
            "amount_cents": 1900, "amount_currency": "CAD", "tax_codes": ["hst_on"],
            "charges": [{"billable_metric_id": metric_id, "charge_model": "standard",
                         "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]}}),
        ),
        (
            "/api/v1/customers",
            json!({"customer": {"external_id": "cus_ada", "name": "Ada Lovelace",
            "email": "ada@example.com", "currency": "CAD", "timezone": "America/Toronto", "tax_codes": ["hst_on"],
            "billing_configuration": {"invoice_grace_period": 3, "provider_customer_id": "cus_stripe_42"}}}),
        ),
        (
            "/api/v1/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada",
            "plan_code": "starter", "external_id": "dep_web", "name": "web deployment",
            "subscription_at": started}}),
        ),
        (
            "/api/v1/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada",
            "plan_code": "starter", "external_id": "dep_batch", "name": "batch deployment", "shadow": true,
            "subscription_at": started}}),
        ),
        (
            "/api/v1/plans",
            json!({"plan": {"name": "Broken", "code": "broken", "interval": "fortnightly",
            "amount_cents": 100, "amount_currency": "CAD",
            "charges": [{"billable_metric_id": metric_id, "charge_model": "standard", "properties": {"amount": 0.0075}}]}}),
        ),
    ];
    for (path, body) in writes {
        let (status, response) = nexacloud.post(path, body).await?;
        let outcome = match status.as_u16() {
            200 => "200".to_string(),
            code => format!("{code} {}", response["error_details"]),
        };
        println!("POST {path:<24} -> {outcome}");
    }
    let (_, plan) = nexacloud.get("/api/v1/plans/starter").await?;
    let plan = &plan["plan"];
    println!(
        "plan starter v{}: {} {} cents/{} + {} on {} {}",
        plan["version"],
        plan["amount_currency"].as_str().unwrap_or_default(),
        plan["amount_cents"],
        plan["interval"].as_str().unwrap_or_default(),
        plan["charges"][0]["charge_model"]
            .as_str()
            .unwrap_or_default(),
        plan["charges"][0]["billable_metric_code"]
            .as_str()
            .unwrap_or_default(),
        plan["charges"][0]["properties"],
    );
    let (_, subscriptions) = nexacloud
        .get("/api/v1/subscriptions?external_customer_id=cus_ada&status[]=active&status[]=pending")
        .await?;
    for subscription in subscriptions["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "subscription {:<10} {:<7} plan {} v{} shadow={}",
            subscription["external_id"].as_str().unwrap_or_default(),
            subscription["status"].as_str().unwrap_or_default(),
            subscription["plan_code"].as_str().unwrap_or_default(),
            subscription["plan_version"],
            subscription["shadow"],
        );
    }
    println!("\n== usage: NexaCloud reports CPU-seconds per deployment ==");
    let at = chrono::Utc::now().timestamp() - 60;
    let batch: Vec<Value> = (0..4)
        .map(|i| {
            json!({"transaction_id": format!("demo-web-{at}-{i}"), "external_subscription_id": "dep_web",
                   "code": "cpu_seconds", "timestamp": at - i * 60, "properties": {"cpu_seconds": 99000}})
        })
        .collect();
    let (status, _) = nexacloud
        .post("/api/v1/events/batch", json!({ "events": batch }))
        .await?;
    println!(
        "POST /api/v1/events/batch, 4 events of 99,000 CPU-s on dep_web -> {}",
        status.as_u16()
    );
    let (status, _) = nexacloud
        .post("/api/v1/events/batch", json!({ "events": batch }))
        .await?;
    println!(
        "the same batch again (a client retry)                     -> {} (counted once)",
        status.as_u16()
    );
    let mut conflicting = batch[0].clone();
    conflicting["properties"]["cpu_seconds"] = json!(1);
    let (status, body) = nexacloud
        .post("/api/v1/events", json!({ "event": conflicting }))
        .await?;
    println!(
        "the first event again with other content                       -> {} {}",
        status.as_u16(),
        body["error_details"]
    );
    let shadow_event = json!({"event": {"transaction_id": format!("demo-batch-{at}"), "external_subscription_id": "dep_batch",
        "code": "cpu_seconds", "timestamp": at, "properties": {"cpu_seconds": 500000}}});
    let (status, _) = nexacloud.post("/api/v1/events", shadow_event).await?;
    println!(
        "POST /api/v1/events, 500,000 CPU-s on the shadow dep_batch -> {}",
        status.as_u16()
    );
    wait_until_caught_up(&client).await?;
    for deployment in ["dep_web", "dep_batch"] {
        let (_, usage) = nexacloud
            .get(&format!(
                "/api/v1/customers/cus_ada/current_usage?external_subscription_id={deployment}"
            ))
            .await?;
        let usage = &usage["customer_usage"];
        let charge = &usage["charges_usage"][0];
        println!(
            "current usage {deployment:<9}: {} CPU-s in {} events -> {}¢ (precise ${}) + {}¢ HST = {}¢",
            charge["units"].as_str().unwrap_or_default(),
            charge["events_count"],
            usage["amount_cents"],
            charge["precise_amount"].as_str().unwrap_or_default(),
            usage["taxes_amount_cents"],
            usage["total_amount_cents"],
        );
    }

    let (_, desk_key) = client
        .post("/admin/v1/services/nexadesk/api_keys", json!({}))
        .await?;
    let nexadesk = client.as_service(desk_key["api_key"]["key"].as_str().unwrap_or_default());
    let (status, body) = nexadesk.get("/api/v1/subscriptions/dep_web").await?;
    println!(
        "nexadesk's key asking for dep_web -> {} {}",
        status.as_u16(),
        body["code"]
    );

    let hooks = Hooks::listen(&nexacloud).await?;
    invoicing(database, &client, &nexacloud).await?;
    hooks.report(&nexacloud).await?;
    import_sample(database).await?;
    reconcile_sample(database, &client).await?;

    wait_until_caught_up(&client).await?;
    println!("\n== what the ledger knows (GET /admin/v1/services, from the service_directory projection) ==");
    let (_, body) = client.get("/admin/v1/services").await?;
    for service in body["services"].as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<20} {:<8} registered {}",
            service["code"].as_str().unwrap_or_default(),
            service["name"].as_str().unwrap_or_default(),
            service["status"].as_str().unwrap_or_default(),
            service["registered_at"].as_str().unwrap_or_default()
        );
    }

    println!(
        "\n== the event log (latest 12 of {} events) ==",
        count_events(database).await?
    );
    let rows: Vec<(i64, String, String, String, Value)> = sqlx::query_as(
        "SELECT position, aggregate_type, aggregate_id, event_type, metadata::jsonb \
         FROM events ORDER BY transaction_id DESC, position DESC LIMIT 12",
    )
    .fetch_all(&database.pool)
    .await?;
    for (position, aggregate_type, aggregate_id, event_type, metadata) in rows.into_iter().rev() {
        println!(
            "#{position:<4} {:<34} {event_type:<26} by {:<17} request {}",
            format!("{aggregate_type}/{aggregate_id}"),
            metadata["actor"].as_str().unwrap_or("?"),
            metadata["request_id"].as_str().unwrap_or("?"),
        );
    }

    println!("\n== projections ==");
    for status in projection_runner::status(&database.pool).await? {
        println!(
            "{:<20} checkpoint #{:<6} lag {}",
            status.name, status.last_position, status.lag
        );
    }
    let (_, ready) = client.get("/ready").await?;
    println!("\nGET /ready -> {}", ready["status"]);

    ledger.stop().await;
    Ok(())
}

/// NexaCloud's own database (the shared sample, loaded into a database of
/// its own beside the ledger's) imported as shadow subscriptions, with the
/// report; a second demo run shows every row unchanged.
async fn import_sample(database: &Database) -> anyhow::Result<()> {
    use crate::import::{nexacloud, ImportSettings, Importer};
    println!("\n== importing NexaCloud's database (the sample): ledger import nexacloud ==");
    let options = database.pool.connect_options();
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'nexacloud_sample')",
    )
    .fetch_one(&database.pool)
    .await?;
    let source_options = options.as_ref().clone().database("nexacloud_sample");
    if !exists {
        sqlx::query("CREATE DATABASE nexacloud_sample")
            .execute(&database.pool)
            .await?;
        let source = sqlx::PgPool::connect_with(source_options.clone()).await?;
        sqlx::raw_sql(nexacloud::SCHEMA).execute(&source).await?;
        sqlx::raw_sql(nexacloud::SAMPLE).execute(&source).await?;
        source.close().await;
    }
    let url = format!(
        "postgres://{}@localhost/nexacloud_sample?host={}&port={}",
        source_options.get_username(),
        source_options
            .get_socket()
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| source_options.get_host().to_string()),
        source_options.get_port()
    );
    let mapping = nexacloud::MappingOptions {
        timezone: chrono_tz::UTC,
        tax_codes: vec!["hst_on".into()],
        cpu_price: "0.0075".parse()?,
        cpu_unit_size: "3600".parse()?,
        since: None,
    };
    let settings = ImportSettings {
        service: "nexacloud".into(),
        dry_run: false,
        apply_changes: false,
        options: mapping.to_json(),
        by: "demo".into(),
    };
    let importer = Importer::new(&database.pool, settings).await?;
    let report =
        nexacloud::run(&url, &mapping, nexacloud::Sink::Import(Box::new(importer))).await?;
    print!("{}", report.table());
    println!(
        "(each imported subscription is shadow: invoiced for comparison only; \
         usage keeps NexaCloud's transaction ids usage_records:<id>)"
    );
    Ok(())
}

/// The imported subscriptions' shadow invoices (one pass of the period
/// closer) reconciled with NexaCloud's own October invoices, and the delta's
/// explanation.
async fn reconcile_sample(database: &Database, client: &Client) -> anyhow::Result<()> {
    println!("\n== dual run: ledger reconcile --period 2026-10 --service nexacloud ==");
    let report = crate::invoicing::closer::close_due(
        &database.pool,
        Some("nexacloud"),
        aggregates::usage::UsageLimits::default().acceptance_window,
        chrono::Utc::now(),
    )
    .await?;
    println!(
        "period closer: {} shadow invoices finalized for the imported deployments",
        report.finalized
    );
    wait_until_caught_up(client).await?;
    let request = crate::reconciliation::ReconcileRequest {
        period: "2026-10".into(),
        service: Some("nexacloud".into()),
        ..Default::default()
    };
    let report = crate::reconciliation::reconcile(&database.pool, &request).await?;
    print!("{}", crate::reconciliation::table(&report));
    if let Some(row) = report.rows.iter().find(|r| r.status == "delta") {
        println!(
            "\n== ledger explain reconciliation {} 2026-10 ==",
            row.external_subscription_id
        );
        let explained = crate::reconciliation::explain(
            &database.pool,
            Some("nexacloud"),
            &row.external_subscription_id,
            "2026-10",
        )
        .await?;
        let text = crate::reconciliation::explain_text(&explained);
        // The side-by-side lines and the causes; the arithmetic follows in full
        // with `ledger explain reconciliation`.
        for line in text.lines().take_while(|l| !l.is_empty()) {
            println!("{line}");
        }
    }
    println!(
        "(exit code 1 while a row is unresolved: fix the rule, or `ledger reconcile accept … --reason`; \
         `ledger flip` refuses until the latest periods match)"
    );
    Ok(())
}

/// Last month, closed: a deployment that ran all of it is invoiced by one
/// pass of the period closer (as `ledger serve` runs it every minute), and
/// the invoice is explained; then the log is sealed and verified.
async fn invoicing(database: &Database, client: &Client, nexacloud: &Client) -> anyhow::Result<()> {
    use chrono::{Datelike, TimeZone};
    println!("\n== invoicing: last month closes (customer in Toronto, 3-day grace period) ==");
    let toronto = chrono_tz::America::Toronto;
    let today = chrono::Utc::now().with_timezone(&toronto).date_naive();
    let this_month = today.with_day(1).context("day 1")?;
    let last_month = this_month - chrono::Months::new(1);
    let local = |date: chrono::NaiveDate, hour: u32| {
        toronto
            .from_local_datetime(&date.and_hms_opt(hour, 0, 0).expect("valid hour"))
            .earliest()
            .map(|at| at.with_timezone(&chrono::Utc))
            .context("a local time")
    };
    let (status, _) = nexacloud
        .post(
            "/api/v1/subscriptions",
            json!({"subscription": {"external_customer_id": "cus_ada",
            "plan_code": "starter", "external_id": "dep_api", "name": "api deployment",
            "subscription_at": local(last_month, 0)?.to_rfc3339()}}),
        )
        .await?;
    println!(
        "dep_api subscribed since {last_month} (local midnight) -> {}",
        status.as_u16()
    );
    // 23:30 on the month's last day, local time: still last month's usage.
    let last_day = this_month.pred_opt().context("a day before")?;
    let at = local(last_day, 23)? + chrono::Duration::minutes(30);
    let (status, _) = nexacloud
        .post("/api/v1/events", json!({"event": {"transaction_id": format!("demo-api-{last_month}"),
            "external_subscription_id": "dep_api", "code": "cpu_seconds", "timestamp": at.timestamp(),
            "properties": {"cpu_seconds": 432000}}}))
        .await?;
    println!(
        "432,000 CPU-s on dep_api at {last_day} 23:30 local -> {}",
        status.as_u16()
    );
    wait_until_caught_up(client).await?;
    let report = crate::invoicing::closer::close_due(
        &database.pool,
        None,
        aggregates::usage::UsageLimits::default().acceptance_window,
        chrono::Utc::now(),
    )
    .await?;
    println!(
        "period closer: {} drafted, {} finalized (grace period: drafts until the 4th)",
        report.drafted, report.finalized
    );
    wait_until_caught_up(client).await?;
    let (_, invoices) = nexacloud
        .get("/api/v1/invoices?external_customer_id=cus_ada")
        .await?;
    for invoice in invoices["invoices"].as_array().into_iter().flatten() {
        let period = &invoice["billing_periods"][0];
        if period["external_subscription_id"] != "dep_api" {
            continue;
        }
        println!(
            "invoice {} {} for {} to {}: fees {}¢ + tax {}¢ = {}¢ (shadow={})",
            invoice["number"].as_str().unwrap_or_default(),
            invoice["status"].as_str().unwrap_or_default(),
            period["charges_from_datetime"].as_str().unwrap_or_default(),
            period["charges_to_datetime"].as_str().unwrap_or_default(),
            invoice["fees_amount_cents"],
            invoice["taxes_amount_cents"],
            invoice["total_amount_cents"],
            invoice["shadow"],
        );
        for fee in invoice["fees"].as_array().into_iter().flatten() {
            println!(
                "  {:<12} {:<12} {:>10} units -> {:>5}¢ (precise {}) + {}¢ tax",
                fee["fee_type"].as_str().unwrap_or_default(),
                fee["item"]["code"].as_str().unwrap_or_default(),
                fee["units"].as_str().unwrap_or_default(),
                fee["amount_cents"],
                fee["precise_amount"].as_str().unwrap_or_default(),
                fee["taxes_amount_cents"],
            );
        }
        if invoice["status"] == "finalized" {
            let id = invoice["lago_id"].as_str().unwrap_or_default();
            let (_, explained) = client
                .get(&format!("/admin/v1/invoices/{id}/explain"))
                .await?;
            let fees = &explained["invoice_explanation"]["fees"];
            println!("  why (GET /admin/v1/invoices/{id}/explain):");
            for line in fees[1]["arithmetic"].as_array().into_iter().flatten() {
                println!("    {}", line.as_str().unwrap_or_default());
            }
        }
    }
    crate::event_log::tamper::seal(&database.pool).await?;
    let verified = crate::event_log::tamper::verify(&database.pool, 0).await?;
    println!(
        "ledger verify: {} events chain-checked, {} seal(s) checked -> {}",
        verified.events_checked,
        verified.seals_checked,
        match verified.first_break {
            None => "no event altered, removed, inserted or reordered".to_string(),
            Some(broken) => format!("BROKEN at position {}", broken.position()),
        }
    );
    Ok(())
}

/// A receiver standing in for NexaCloud's webhook endpoint.
struct Hooks {
    endpoint: String,
    secret: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, axum::body::Bytes)>>>,
}

impl Hooks {
    async fn listen(nexacloud: &Client) -> anyhow::Result<Self> {
        println!("\n== webhooks: NexaCloud registers an endpoint (a receiver in this process) ==");
        let received: std::sync::Arc<std::sync::Mutex<Vec<_>>> = Default::default();
        let log = received.clone();
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let log = log.clone();
                async move {
                    log.lock().expect("received").push((headers, body));
                    "ok"
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/ledger-webhooks", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (status, body) = nexacloud
            .post(
                "/api/v1/webhook_endpoints",
                json!({"webhook_endpoint": {"webhook_url": url, "signature_algo": "hmac",
                       "event_types": ["subscription.started", "invoice.drafted", "invoice.created"]}}),
            )
            .await?;
        if status != StatusCode::OK {
            anyhow::bail!("cannot register the demo's endpoint: {body}");
        }
        let endpoint = &body["webhook_endpoint"];
        let secret = endpoint["secret"].as_str().unwrap_or_default().to_string();
        println!(
            "POST /api/v1/webhook_endpoints {url} -> 200, secret {}… (shown once)",
            &secret[..secret.len().min(12)]
        );
        Ok(Self {
            endpoint: endpoint["lago_id"].as_str().unwrap_or_default().to_string(),
            secret,
            received,
        })
    }

    /// What arrived, each signature checked; then the endpoint is removed.
    async fn report(self, nexacloud: &Client) -> anyhow::Result<()> {
        println!("\n== webhooks received (signed, Standard Webhooks and Lago headers) ==");
        // Give the dispatcher a moment (it polls every 100 ms).
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let received = self.received.lock().expect("received").clone();
        if received.is_empty() {
            println!("(nothing new since an earlier run: each fact is announced once)");
        }
        for (headers, body) in &received {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
            let expected = crate::webhooks::signing::standard_signature(
                &self.secret,
                &id,
                timestamp.parse().unwrap_or_default(),
                body,
            );
            let event: Value = serde_json::from_slice(body).unwrap_or_default();
            let object = &event[event["object_type"].as_str().unwrap_or_default()];
            println!(
                "{:<22} {} webhook-id {id} signature {}",
                event["webhook_type"].as_str().unwrap_or_default(),
                object["number"]
                    .as_str()
                    .or(object["external_id"].as_str())
                    .unwrap_or_default(),
                if header("webhook-signature") == expected {
                    "verified"
                } else {
                    "WRONG"
                }
            );
        }
        nexacloud
            .delete(&format!("/api/v1/webhook_endpoints/{}", self.endpoint))
            .await?;
        Ok(())
    }
}

fn describe(database: &Database) -> String {
    match database.embedded_data_dir() {
        Some(dir) => format!("embedded PostgreSQL in {}", dir.display()),
        None => "DATABASE_URL".to_string(),
    }
}

async fn count_events(database: &Database) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&database.pool)
        .await?)
}

/// Projections are eventually consistent: wait until `/ready` reports no lag.
async fn wait_until_caught_up(client: &Client) -> anyhow::Result<()> {
    for _ in 0..100 {
        let (_, ready) = client.get("/ready").await?;
        let caught_up = ready["projections"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["lag"] == 0));
        if caught_up {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("projections did not catch up within 5 s")
}

struct Client {
    http: reqwest::Client,
    base: String,
    admin_key: String,
}

impl Client {
    /// The same client, authenticated as a service.
    fn as_service(&self, key: &str) -> Client {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            admin_key: key.to_string(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        Ok((response.status(), response.json().await?))
    }

    async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        Ok((response.status(), response.json().await?))
    }

    async fn delete(&self, path: &str) -> anyhow::Result<StatusCode> {
        let response = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .with_context(|| format!("DELETE {path}"))?;
        Ok(response.status())
    }
}
