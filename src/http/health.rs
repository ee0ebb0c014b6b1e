//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::AppState;
use crate::event_log::projection_runner;
use crate::postgres as database;

/// How long `/ready` waits for the database before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `/health` (the process answers) and `/ready` (its database and projections can serve).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
}

/// The process is alive and serving HTTP; says nothing about the database.
async fn health() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// Ready to serve: the database answers, every migration is applied, and
/// each projection's lag is reported.
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let check = async {
        let migrations_applied = database::migrations_applied(&state.pool).await?;
        let projections = projection_runner::status(&state.pool).await?;
        Ok::<_, sqlx::Error>((migrations_applied, projections))
    };
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok((true, projections))) => (
            StatusCode::OK,
            Json(
                json!({"status": "ready", "database": "reachable", "migrations": "applied",
                        "projections": projections}),
            ),
        ),
        Ok(Ok((false, _))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "database": "reachable", "migrations": "pending"})),
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness check failed");
            not_ready_unreachable()
        }
        Err(_) => not_ready_unreachable(),
    }
}

fn not_ready_unreachable() -> (StatusCode, Json<Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not_ready", "database": "unreachable"})),
    )
}
