//! `TestApp`: the whole ledger started in-process on port 0.

use chrono::Duration;
use ledger::app::{Application, BackgroundTasks, Settings};
use ledger::event_log::projection_runner::ProjectionRunner;
use ledger::http::admin::AdminKey;
use ledger::invoicing::closer::{close_due, CloseReport};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// How far back the invoicing tests accept usage (their months are fixed
/// dates) and close periods.
pub const WINDOW_DAYS: i64 = 3650;

/// One pass of the period closer at `now` (RFC 3339), with the projections
/// caught up before and after.
pub async fn close(app: &TestApp, now: &str) -> CloseReport {
    app.catch_up().await;
    let now = now.parse().expect("an RFC 3339 instant");
    let report = close_due(&app.pool, None, Duration::days(WINDOW_DAYS), now)
        .await
        .expect("close");
    app.catch_up().await;
    report
}

pub struct TestApp {
    pub address: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
}

/// Start the API on a real socket (no projection runner: tests call
/// `catch_up` when they need the read side, so nothing races them).
pub async fn spawn_app(pool: PgPool) -> TestApp {
    spawn_app_with_limits(pool, Default::default()).await
}

/// The API with other usage timestamp limits (e.g. a widened backfill window).
pub async fn spawn_app_with_limits(
    pool: PgPool,
    limits: aggregates::usage::UsageLimits,
) -> TestApp {
    spawn_app_with(pool, limits, ledger::usage::default_appenders()).await
}

/// The API with given usage limits and usage appenders.
pub async fn spawn_app_with(
    pool: PgPool,
    limits: aggregates::usage::UsageLimits,
    usage_appenders: usize,
) -> TestApp {
    spawn_app_with_settings(
        pool,
        Settings {
            usage_limits: limits,
            usage_appenders,
            ..Settings::local(Some(AdminKey::new(ADMIN_KEY)), BackgroundTasks::NONE)
        },
    )
    .await
}

/// The API with the given settings (the admin key must be [`ADMIN_KEY`]).
pub async fn spawn_app_with_settings(pool: PgPool, settings: Settings) -> TestApp {
    let app = Application::build(pool.clone(), settings)
        .await
        .expect("bind");
    let address = format!("http://{}", app.local_addr().unwrap());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    TestApp {
        address,
        pool,
        client: reqwest::Client::new(),
    }
}

impl TestApp {
    pub async fn catch_up(&self) -> usize {
        ProjectionRunner::for_all(self.pool.clone())
            .await
            .unwrap()
            .catch_up()
            .await
            .unwrap()
    }

    pub async fn post_admin(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.address))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        read(response).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.client.get(format!("{}{path}", self.address));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        read(request.send().await.expect("request")).await
    }

    pub async fn get_admin(&self, path: &str) -> (StatusCode, Value) {
        self.get(path, Some(ADMIN_KEY)).await
    }

    pub async fn delete_admin(&self, path: &str) -> StatusCode {
        self.client
            .delete(format!("{}{path}", self.address))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn register_service(&self, code: &str, name: &str) -> (StatusCode, Value) {
        let body = serde_json::json!({"service": {"code": code, "name": name}}).to_string();
        self.post_admin("/admin/v1/services", &body).await
    }
}

async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("response body is not JSON ({status}): {text:?}"));
    (status, body)
}

/// A service's view of the Lago-compatible API.
pub struct ServiceClient<'a> {
    pub app: &'a TestApp,
    pub key: String,
}

impl TestApp {
    /// Register a service and issue it a key.
    pub async fn service(&self, code: &str) -> ServiceClient<'_> {
        let (status, _) = self.register_service(code, code).await;
        assert_eq!(status, StatusCode::OK, "register {code}");
        let (status, body) = self
            .post_admin(&format!("/admin/v1/services/{code}/api_keys"), "")
            .await;
        assert_eq!(status, StatusCode::OK, "key for {code}: {body}");
        ServiceClient {
            app: self,
            key: body["api_key"]["key"].as_str().unwrap().to_string(),
        }
    }
}

impl ServiceClient<'_> {
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .app
            .client
            .request(method, format!("{}/api/v1{path}", self.app.address))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        read(request.send().await.expect("request")).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// POST and expect 200; returns the body.
    pub async fn created(&self, path: &str, body: Value) -> Value {
        let (status, response) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "POST {path}: {response}");
        response
    }

    /// A Starter subscription of `cus_ada` (see [`Self::nexacloud_catalog`])
    /// that started `days_ago` days ago.
    pub async fn subscribe(&self, external_id: &str, days_ago: i64) -> Value {
        let started = chrono::Utc::now() - Duration::days(days_ago);
        self.created(
            "/subscriptions",
            serde_json::json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
                   "external_id": external_id, "subscription_at": started.to_rfc3339()}}),
        )
        .await
    }

    /// The NexaCloud catalog: a CPU metric, 13% HST, a monthly plan with an
    /// included quota and the per-core-hour price, and a customer.
    pub async fn nexacloud_catalog(&self) -> Value {
        let metric = self
            .created(
                "/billable_metrics",
                serde_json::json!({"billable_metric": {"name": "CPU seconds", "code": "cpu_seconds",
                    "aggregation_type": "sum_agg", "field_name": "cpu_seconds"}}),
            )
            .await;
        self.created(
            "/taxes",
            serde_json::json!({"tax": {"name": "HST Ontario", "code": "hst_on", "rate": 13.0}}),
        )
        .await;
        self.created(
            "/plans",
            serde_json::json!({"plan": {"name": "Starter", "code": "starter", "interval": "monthly",
                "amount_cents": 1900, "amount_currency": "CAD", "tax_codes": ["hst_on"],
                "charges": [{"billable_metric_id": metric["billable_metric"]["lago_id"],
                    "charge_model": "standard",
                    "properties": {"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}}]}}),
        )
        .await;
        self.created(
            "/customers",
            serde_json::json!({"customer": {"external_id": "cus_ada", "name": "Ada", "email": "Ada@Example.com",
                "currency": "CAD", "timezone": "America/Toronto", "tax_codes": ["hst_on"]}}),
        )
        .await;
        metric
    }
}

/// The URL of the database `connect` reaches (for the CLI under test).
pub fn database_url(connect: &sqlx::postgres::PgConnectOptions) -> String {
    format!(
        "postgres://{}@localhost/{}?host={}&port={}",
        connect.get_username(),
        connect.get_database().unwrap(),
        connect
            .get_socket()
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| connect.get_host().to_string()),
        connect.get_port()
    )
}

/// Run the ledger binary against the test's database.
pub fn ledger_cli(pool: &PgPool, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("DATABASE_URL", database_url(&pool.connect_options()))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ledger")
}

/// A Stripe endpoint secret the signal tests configure.
pub const STRIPE_SECRET: &str = "whsec_test_stripe_endpoint_secret";

/// The ledger with Stripe's secret configured, webhooks allowed to
/// loopback (the tests' receivers), and no background task.
pub async fn spawn_signalling_app(pool: PgPool) -> TestApp {
    spawn_app_with_settings(pool, signalling_settings(BackgroundTasks::NONE)).await
}

/// Settings of [`spawn_signalling_app`] with the given tasks.
pub fn signalling_settings(background: BackgroundTasks) -> Settings {
    Settings {
        usage_limits: aggregates::usage::UsageLimits {
            acceptance_window: Duration::days(WINDOW_DAYS),
            ..Default::default()
        },
        providers: ledger::http::Providers {
            stripe: ledger::payments::stripe::StripeSettings::from_list(
                Some(&format!("whsec_rotated_out,{STRIPE_SECRET}")),
                300,
            ),
            webhook_addresses: loopback(),
        },
        ..Settings::local(Some(AdminKey::new(ADMIN_KEY)), background)
    }
}

/// A policy that allows loopback (IPv4 and IPv6) and nothing else.
pub fn loopback() -> ledger::webhooks::address::AddressPolicy {
    ledger::webhooks::address::AddressPolicy::parse(&["127.0.0.0/8".into(), "::1/128".into()])
        .unwrap()
}

/// The NexaCloud catalog, deployment `dep_1` (live, its deployment id in
/// the metadata) since 1 September 2026, and September closed: one
/// finalized invoice of $19.00 + 13% HST, returned as the API shows it.
pub async fn live_invoice(svc: &ServiceClient<'_>) -> Value {
    svc.nexacloud_catalog().await;
    svc.created(
        "/subscriptions",
        serde_json::json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
            "external_id": "dep_1", "subscription_at": "2026-09-01T04:00:00Z",
            "metadata": {"deployment_id": "deployment-42"}}}),
    )
    .await;
    close(svc.app, "2026-10-02T00:00:00Z").await;
    let (status, body) = svc.get("/invoices?status=finalized").await;
    assert_eq!(status, StatusCode::OK);
    let invoice = body["invoices"][0].clone();
    assert_eq!(invoice["total_amount_cents"], 2147, "{invoice}");
    invoice
}

/// `ledger serve` as its own process on the test's database (its metrics
/// and logs its own): the API on a free port, `args` added. Killed when
/// dropped.
pub struct LedgerProcess {
    pub app: TestApp,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// What it logged so far (see [`LedgerProcess::log`]).
    log: String,
}

impl LedgerProcess {
    pub async fn start(pool: &PgPool, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("DATABASE_URL", database_url(&pool.connect_options()))
            .env("LEDGER_ADMIN_KEY", ADMIN_KEY)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start ledger serve");
        let (sender, lines) = std::sync::mpsc::channel();
        let reader = std::io::BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let mut process = Self {
            app: TestApp {
                address: String::new(),
                pool: pool.clone(),
                client: reqwest::Client::new(),
            },
            child,
            lines,
            log: String::new(),
        };
        let line = process.wait_for_line("ledger is serving").await;
        process.app.address = format!("http://{}", address_in(&line));
        process
    }

    /// Wait (up to a minute) for a logged line containing `text`.
    pub async fn wait_for_line(&mut self, text: &str) -> String {
        if let Some(line) = self.log.lines().find(|l| l.contains(text)) {
            return line.to_string();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no line with {text:?} in:\n{}",
                        self.log
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    panic!("ledger serve exited; it logged:\n{}", self.log)
                }
            }
        }
    }

    /// Everything logged so far.
    pub fn log(&mut self) -> &str {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push_str(&line);
            self.log.push('\n');
        }
        &self.log
    }
}

impl Drop for LedgerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `127.0.0.1:port` a log line names.
pub fn address_in(line: &str) -> String {
    let start = line.find("127.0.0.1:").expect("an address in the line");
    line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect()
}
