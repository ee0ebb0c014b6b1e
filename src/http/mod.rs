//! The HTTP API: `/health` and `/ready`, the operator API under `/admin/v1`
//! and the Lago-compatible API under `/api/v1`.
//!
//! Every request runs in a tracing span carrying its request id (taken from
//! `x-request-id` or generated, and echoed back).

pub mod admin;
pub mod admin_webhooks;
pub mod api;
pub mod error;
pub mod extract;
pub mod health;
pub mod pagination;
pub mod stripe;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderName, Request};
use axum::Router;
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::event_log::projection_runner::ProjectionRunner;
use crate::event_log::store::{self, CommandBus};
use error::ApiError;

/// The header carrying a request's id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

/// The state behind [`AppState`].
pub struct AppStateInner {
    /// The database pool.
    pub pool: PgPool,
    /// The command handlers of the write model.
    pub commands: CommandBus,
    /// The operator key for `/admin/v1` (`None`: the admin API refuses all).
    pub admin_key: Option<admin::AdminKey>,
    /// Drives the projections up to a request's own write before it answers.
    pub projections: ProjectionRunner,
    /// Which usage timestamps are accepted.
    pub usage_limits: aggregates::usage::UsageLimits,
    /// The usage ingest path: its memory of callers and subscriptions, and
    /// its appenders.
    pub usage_ingest: crate::usage::Ingest,
    /// Signalled after usage is appended (usage appends do not NOTIFY): wakes
    /// this process's projection runner.
    pub usage_appended: Arc<tokio::sync::Notify>,
    /// The background tasks' health (read by `/ready`).
    pub tasks: Arc<crate::app::supervisor::TaskRegistry>,
    /// How Stripe's webhook is verified.
    pub stripe: crate::payments::stripe::StripeSettings,
    /// Where webhooks may be delivered.
    pub webhook_addresses: crate::webhooks::address::AddressPolicy,
}

/// What the ledger trusts and reaches outside: the payment provider's
/// webhook secrets and the addresses webhooks may go to.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    /// How Stripe's webhook is verified.
    pub stripe: crate::payments::stripe::StripeSettings,
    /// Where webhooks may be delivered.
    pub webhook_addresses: crate::webhooks::address::AddressPolicy,
}

/// How long a write waits for the projections to show it.
const READ_YOUR_WRITES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl AppState {
    /// Assemble the state on `pool` (registers the projections).
    pub async fn new(
        pool: PgPool,
        admin_key: Option<admin::AdminKey>,
        usage_limits: aggregates::usage::UsageLimits,
        usage_appenders: usize,
        providers: Providers,
    ) -> Result<Self, sqlx::Error> {
        let commands = CommandBus::new(&pool);
        let projections = ProjectionRunner::for_all(pool.clone()).await?;
        let usage_ingest = crate::usage::Ingest::start(pool.clone(), usage_appenders);
        Ok(Self(Arc::new(AppStateInner {
            pool,
            commands,
            admin_key,
            projections,
            usage_limits,
            usage_ingest,
            usage_appended: Default::default(),
            tasks: Default::default(),
            stripe: providers.stripe,
            webhook_addresses: providers.webhook_addresses,
        })))
    }

    /// After a command: wait until every projection has applied the
    /// aggregate's latest event, so the response (and the client's next
    /// request) reads what was just written.
    pub async fn await_projected(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<(), ApiError> {
        let cursor = store::last_event_cursor(&self.pool, aggregate_type, aggregate_id).await?;
        self.await_applied(cursor).await
    }

    /// Before a read of what usage was appended: wait until every projection
    /// has applied the log as it stands now (usage appended by any request
    /// answered before this one included), driving them meanwhile.
    pub async fn await_log_projected(&self) -> Result<(), ApiError> {
        let cursor = store::log_head_cursor(&self.pool).await?;
        self.await_applied(cursor).await
    }

    async fn await_applied(
        &self,
        cursor: Option<projections::LogPosition>,
    ) -> Result<(), ApiError> {
        let Some(cursor) = cursor else {
            return Ok(());
        };
        let applied = self
            .projections
            .wait_until_applied(cursor, READ_YOUR_WRITES_TIMEOUT)
            .await
            .map_err(|e| {
                ApiError::Unexpected(anyhow::Error::new(e).context("projection failed"))
            })?;
        if applied {
            Ok(())
        } else {
            Err(ApiError::Unexpected(anyhow::anyhow!(
                "projections did not reach position {} within {:?}",
                cursor.position,
                READ_YOUR_WRITES_TIMEOUT
            )))
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A handler panicked: answer a generic 500 (the panic is logged), never a
/// closed connection.
fn panicked(payload: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let message = crate::app::supervisor::panic_message(payload.as_ref());
    tracing::error!(panic = %message, "request handler panicked");
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(serde_json::json!({"status": 500, "error": "Internal Server Error"})),
    )
        .into_response()
}

/// The whole API with its middleware.
pub fn router(state: AppState) -> Router {
    // Installed before the first request is counted.
    crate::app::metrics::recorder();
    with_middleware(
        Router::new()
            .merge(health::router())
            .route("/metrics", axum::routing::get(metrics))
            .merge(stripe::router())
            .nest("/admin/v1", admin::router().merge(admin_webhooks::router()))
            .nest("/api/v1", api::router())
            .fallback(|| async { ApiError::NotFound("route") })
            .method_not_allowed_fallback(|| async { ApiError::InvalidStatus })
            .with_state(state),
    )
}

/// `GET /metrics` (the operator key): Prometheus' text format.
async fn metrics(
    _: admin::Operator,
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::response::Response {
    crate::app::metrics::serve_metrics(axum::extract::State(state.pool.clone())).await
}

/// What every request passes through: NUL refusal, panic catching,
/// metrics, request ids and tracing.
fn with_middleware(routes: Router) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    routes
        .layer(axum::middleware::from_fn(extract::refuse_nul))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(
            crate::app::metrics::track_requests,
        ))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| {
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID_HEADER)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or("-");
                    let route = request
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("unmatched", |path| path.as_str());
                    // `service` is filled in once the caller's key is known.
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        route = %route,
                        request_id = %request_id,
                        service = tracing::field::Empty,
                    )
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_and_the_router_keeps_serving() {
        let app = with_middleware(
            Router::new()
                .route(
                    "/boom",
                    get(|| async { panic!("handler bug") as &'static str }),
                )
                .route("/fine", get(|| async { "fine" })),
        );
        let request = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request("/boom")).await.unwrap();
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"status": 500, "error": "Internal Server Error"})
        );
        let response = app.oneshot(request("/fine")).await.unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::OK);
    }
}
