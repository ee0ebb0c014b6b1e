//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::AppState;
use crate::app::supervisor::TaskState;
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
/// every background task of the process is running with a recent pass
/// (a failing, restarting or stalled task makes it 503: billing has
/// stopped). Each projection's lag and the quarantined subscriptions are
/// reported.
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let check = async {
        let migrations_applied = database::migrations_applied(&state.pool).await?;
        let projections = projection_runner::status(&state.pool).await?;
        let quarantined = crate::invoicing::quarantine::count(&state.pool).await?;
        Ok::<_, sqlx::Error>((migrations_applied, projections, quarantined))
    };
    let tasks = state.tasks.snapshot();
    let now = chrono::Utc::now();
    let tasks_healthy = tasks.iter().all(|task| task.healthy(now));
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok((true, projections, quarantined))) => {
            let status = if tasks_healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                Json(json!({
                    "status": if tasks_healthy { "ready" } else { "not_ready" },
                    "database": "reachable", "migrations": "applied",
                    "tasks": tasks, "projections": projections,
                    "quarantined_subscriptions": quarantined,
                })),
            )
        }
        Ok(Ok((false, _, _))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "not_ready", "database": "reachable", "migrations": "pending",
                        "tasks": tasks}),
            ),
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness check failed");
            not_ready_unreachable(tasks)
        }
        Err(_) => not_ready_unreachable(tasks),
    }
}

fn not_ready_unreachable(tasks: Vec<TaskState>) -> (StatusCode, Json<Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not_ready", "database": "unreachable", "tasks": tasks})),
    )
}
