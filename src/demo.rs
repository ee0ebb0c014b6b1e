//! `ledger demo`: start the ledger, record a few facts through its HTTP API
//! and print what the ledger now knows — the log and the projections built
//! from it. It grows as capabilities land.

use std::net::SocketAddr;

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::database::{ClusterAccess, Database, DatabaseConfig};
use crate::http::admin::AdminKey;
use crate::http::AppState;
use crate::projection_runner::{self, ProjectionRunner};
use crate::startup::Application;

const SERVICES: [(&str, &str); 3] = [
    ("nexacloud", "NexaCloud hosting"),
    ("nexadesk", "NexaDesk helpdesk"),
    ("nexamaps", "NexaMaps API"),
];

pub async fn run(config: &DatabaseConfig) -> anyhow::Result<()> {
    let database = Database::open(config, ClusterAccess::Own).await?;
    let result = demonstrate(&database).await;
    database.close().await;
    result
}

async fn demonstrate(database: &Database) -> anyhow::Result<()> {
    let admin_key = uuid::Uuid::new_v4().to_string();
    let state = AppState::new(database.pool.clone(), Some(AdminKey::new(&admin_key))).await?;
    let app = Application::build(state, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let base = format!("http://{}", app.local_addr()?);
    let (stop, stopped) = watch::channel(false);
    let mut server_stopped = stopped.clone();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = server_stopped.changed().await;
    }));
    let runner = ProjectionRunner::for_all(database.pool.clone()).await?;
    let runner = tokio::spawn(runner.run(stopped));

    println!(
        "ledger serving at {base} (database: {})\n",
        describe(database)
    );
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
        "\n== the event log (latest 10 of {} events) ==",
        count_events(database).await?
    );
    let rows: Vec<(i64, String, String, String, Value)> = sqlx::query_as(
        "SELECT position, aggregate_type, aggregate_id, event_type, metadata::jsonb \
         FROM events ORDER BY transaction_id DESC, position DESC LIMIT 10",
    )
    .fetch_all(&database.pool)
    .await?;
    for (position, aggregate_type, aggregate_id, event_type, metadata) in rows.into_iter().rev() {
        println!(
            "#{position:<5} {aggregate_type}/{aggregate_id:<10} {event_type:<20} by {} request {}",
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

    let _ = stop.send(true);
    let _ = server.await;
    let _ = runner.await;
    Ok(())
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
}
