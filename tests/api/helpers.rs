//! `TestApp`: the whole ledger started in-process on port 0.

use std::net::SocketAddr;

use ledger::http::admin::AdminKey;
use ledger::http::AppState;
use ledger::projection_runner::ProjectionRunner;
use ledger::startup::Application;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

pub struct TestApp {
    pub address: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
}

/// Start the API on a real socket (no projection runner: tests call
/// `catch_up` when they need the read side, so nothing races them).
pub async fn spawn_app(pool: PgPool) -> TestApp {
    let state = AppState::new(pool.clone(), Some(AdminKey::new(ADMIN_KEY)))
        .await
        .expect("state");
    let app = Application::build(state, SocketAddr::from(([127, 0, 0, 1], 0)))
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
