//! The operator API (`/admin/v1`), authenticated by the operator key.
//!
//! The key is configured (`LEDGER_ADMIN_KEY`) and only its SHA-256 digest is
//! kept in memory; a presented key is hashed and compared in constant time.
//! Without a configured key every admin request is refused.

use aggregates::service::ServiceStatus;
use aggregates::{Service, ServiceCommand};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::extract::{LagoJson, LagoQuery, RequestContext};
use super::pagination::PageRequest;
use super::AppState;
use crate::access::keys;
use crate::access::services;
use crate::event_log::store::{self, Actor};
use crate::invoicing::explain;
use crate::invoicing::replay::ReplayError;
use crate::reconciliation::{ReconcileError, ReconcileRequest};

/// The operator key, as its hex SHA-256 digest.
#[derive(Clone)]
pub struct AdminKey(String);

impl AdminKey {
    /// The key `key` (kept only as its digest).
    pub fn new(key: &str) -> Self {
        Self(keys::digest(key))
    }

    /// From a stored digest (the embedded default keeps one).
    pub fn from_digest(digest: String) -> Self {
        Self(digest)
    }

    fn matches(&self, presented: &str) -> bool {
        keys::digests_match(&self.0, &keys::digest(presented))
    }
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

/// Proof that the request carries the operator key.
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        match &state.admin_key {
            Some(key) if key.matches(presented.trim()) => Ok(Operator),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// The operator API under `/admin/v1`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/services", post(register_service).get(list_services))
        .route("/services/{code}", get(get_service))
        .route("/services/{code}/deactivate", post(deactivate_service))
        .route("/services/{code}/reactivate", post(reactivate_service))
        .route(
            "/services/{code}/api_keys",
            post(issue_api_key).get(list_api_keys),
        )
        .route("/services/{code}/api_keys/{key_id}", delete(revoke_api_key))
        .route("/invoices/{lago_id}/explain", get(explain_invoice))
        .route("/replay", get(replay_period))
        .route("/quarantine", get(list_quarantine))
        .route("/log/verify", post(verify_log))
        .route("/reconciliation", get(reconciliation))
        .route(
            "/reconciliation/{service}/{subscription}/{period}",
            get(explain_reconciliation),
        )
}

/// The subscriptions billing cannot price, with why (every service).
async fn list_quarantine(_: Operator, State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let quarantined = crate::invoicing::quarantine::quarantined(&state.pool).await?;
    Ok(Json(
        serde_json::json!({ "quarantined_subscriptions": quarantined }),
    ))
}

/// `POST /admin/v1/log/verify[?from_position=N]`: what `ledger verify`
/// checks, answered as JSON (200 whether the log is intact or not; `intact`
/// says which).
async fn verify_log(
    _: Operator,
    State(state): State<AppState>,
    LagoQuery(query): LagoQuery<VerifyQuery>,
) -> ApiResult<Json<Value>> {
    let from = query.from_position.unwrap_or(0);
    if from < 0 {
        return Err(ApiError::invalid("from_position", "value_is_out_of_range"));
    }
    let verified = crate::event_log::tamper::verify(&state.pool, from)
        .await
        .map_err(ApiError::Unexpected)?;
    let first_break = verified.first_break.as_ref().map(|broken| {
        let reason = match broken {
            crate::event_log::tamper::Break::Chain { reason, .. }
            | crate::event_log::tamper::Break::Seal { reason, .. } => reason.clone(),
        };
        json!({"position": broken.position(), "reason": reason})
    });
    Ok(Json(json!({"verification": {
        "intact": first_break.is_none(),
        "events_checked": verified.events_checked,
        "seals_checked": verified.seals_checked,
        "unsealed": verified.unsealed,
        "latest_digest": verified.latest_digest,
        "first_break": first_break,
    }})))
}

#[derive(Debug, Deserialize)]
struct VerifyQuery {
    from_position: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct RegisterServiceBody {
    service: RegisterService,
}

#[derive(Debug, Deserialize)]
struct RegisterService {
    code: String,
    name: String,
}

/// A service as the admin API shows it (read from `service_directory`).
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ServiceView {
    /// The service's code.
    pub code: String,
    /// Its display name.
    pub name: String,
    /// `active` or `deactivated`.
    pub status: String,
    /// When it was registered.
    pub registered_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

#[tracing::instrument(skip_all, fields(code = %body.service.code))]
async fn register_service(
    _: Operator,
    State(state): State<AppState>,
    context: RequestContext,
    LagoJson(body): LagoJson<RegisterServiceBody>,
) -> ApiResult<Json<Value>> {
    let RegisterService { code, name } = body.service;
    aggregates::service::validate_service_code(&code)
        .map_err(|refusal| ApiError::invalid(refusal.field(), refusal.error_code()))?;
    store::execute(
        &state.commands.services,
        &code,
        ServiceCommand::Register {
            code: code.clone(),
            name,
        },
        context.metadata(Actor::Operator),
    )
    .await?;
    service_response(&state, &code).await
}

#[tracing::instrument(skip_all, fields(code = %code))]
async fn deactivate_service(
    _: Operator,
    State(state): State<AppState>,
    context: RequestContext,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    change_status(&state, context, code, ServiceCommand::Deactivate).await
}

#[tracing::instrument(skip_all, fields(code = %code))]
async fn reactivate_service(
    _: Operator,
    State(state): State<AppState>,
    context: RequestContext,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    change_status(&state, context, code, ServiceCommand::Reactivate).await
}

async fn change_status(
    state: &AppState,
    context: RequestContext,
    code: String,
    command: ServiceCommand,
) -> ApiResult<Json<Value>> {
    store::execute(
        &state.commands.services,
        &code,
        command,
        context.metadata(Actor::Operator),
    )
    .await?;
    service_response(state, &code).await
}

/// The service as the write model now knows it, once the projections show
/// the change too (so the operator's next read sees it).
async fn service_response(state: &AppState, code: &str) -> ApiResult<Json<Value>> {
    let service: Service = store::load(&state.pool, code).await?;
    state
        .await_projected(services::AGGREGATE_TYPE, code)
        .await?;
    if service.status() == ServiceStatus::Unregistered {
        return Err(ApiError::NotFound("service"));
    }
    Ok(Json(json!({"service": {
        "code": service.code(),
        "name": service.name(),
        "status": service.status().as_str(),
    }})))
}

async fn get_service(
    _: Operator,
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    let service: Option<ServiceView> = sqlx::query_as(
        "SELECT code, name, status, registered_at, updated_at FROM service_directory WHERE code = $1",
    )
    .bind(&code)
    .fetch_optional(&state.pool)
    .await?;
    let service = service.ok_or(ApiError::NotFound("service"))?;
    Ok(Json(json!({ "service": service })))
}

async fn list_services(
    _: Operator,
    State(state): State<AppState>,
    LagoQuery(page): LagoQuery<PageRequest>,
) -> ApiResult<Json<Value>> {
    let page = page.validate()?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM service_directory")
        .fetch_one(&state.pool)
        .await?;
    let services: Vec<ServiceView> = sqlx::query_as(
        "SELECT code, name, status, registered_at, updated_at FROM service_directory \
         ORDER BY code LIMIT $1 OFFSET $2",
    )
    .bind(page.per_page)
    .bind(page.offset())
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(
        json!({ "services": services, "meta": page.meta(total) }),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct IssueKeyBody {
    #[serde(default)]
    api_key: IssueKey,
}

#[derive(Debug, Default, Deserialize)]
struct IssueKey {
    label: Option<String>,
}

/// Issue a key; the response is the only place the key ever appears.
async fn issue_api_key(
    _: Operator,
    State(state): State<AppState>,
    context: RequestContext,
    Path(code): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    // The body is optional: an empty one issues an unlabelled key.
    let body: IssueKeyBody = if body.iter().all(u8::is_ascii_whitespace) {
        IssueKeyBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| ApiError::BadRequest(error.to_string()))?
    };
    let label = body.api_key.label;
    let issued = services::issue_key(
        &state.commands,
        &code,
        label,
        context.metadata(Actor::Operator),
    )
    .await?;
    state
        .await_projected(services::AGGREGATE_TYPE, &code)
        .await?;
    Ok(Json(json!({ "api_key": issued })))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct ApiKeyView {
    id: String,
    label: Option<String>,
    issued_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

async fn list_api_keys(
    _: Operator,
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM service_directory WHERE code = $1)")
            .bind(&code)
            .fetch_one(&state.pool)
            .await?;
    if !exists {
        return Err(ApiError::NotFound("service"));
    }
    let keys: Vec<ApiKeyView> = sqlx::query_as(
        "SELECT key_id AS id, label, issued_at, revoked_at FROM api_keys WHERE service_code = $1 ORDER BY issued_at, key_id",
    )
    .bind(&code)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "api_keys": keys })))
}

async fn revoke_api_key(
    _: Operator,
    State(state): State<AppState>,
    context: RequestContext,
    Path((code, key_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    services::revoke_key(
        &state.commands,
        &code,
        &key_id,
        context.metadata(Actor::Operator),
    )
    .await?;
    state
        .await_projected(services::AGGREGATE_TYPE, &code)
        .await?;
    let key: ApiKeyView = sqlx::query_as(
        "SELECT key_id AS id, label, issued_at, revoked_at FROM api_keys WHERE service_code = $1 AND key_id = $2",
    )
    .bind(&code)
    .bind(&key_id)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(json!({ "api_key": key })))
}

/// Why an invoice says what it says (any service's invoice: an auditor's view).
async fn explain_invoice(
    _: Operator,
    State(state): State<AppState>,
    Path(lago_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let lago_id: uuid::Uuid = lago_id.parse().map_err(|_| ApiError::NotFound("invoice"))?;
    let explained = explain::explain_invoice(&state.pool, lago_id)
        .await
        .map_err(|e| match e {
            explain::ExplainError::NotFound(_) => ApiError::NotFound("invoice"),
            explain::ExplainError::Unexpected(error) => ApiError::Unexpected(error),
        })?;
    Ok(Json(
        serde_json::json!({ "invoice_explanation": explained }),
    ))
}

#[derive(Deserialize)]
struct ReplayQuery {
    period: Option<String>,
    service: Option<String>,
    subscription: Option<String>,
    as_of: Option<String>,
}

/// `ledger replay` over HTTP: the period recomputed from the log, compared
/// with what was billed.
async fn replay_period(
    _: Operator,
    State(state): State<AppState>,
    crate::http::extract::LagoQuery(query): crate::http::extract::LagoQuery<ReplayQuery>,
) -> ApiResult<Json<Value>> {
    let period = query
        .period
        .filter(|p| p.len() == 7)
        .ok_or_else(|| ApiError::invalid("period", "value_is_invalid"))?;
    let as_of = query
        .as_of
        .map(|text| text.parse::<crate::invoicing::replay::AsOf>())
        .transpose()
        .map_err(|_| ApiError::invalid("as_of", "value_is_invalid"))?;
    let request = crate::invoicing::replay::ReplayRequest {
        period,
        service: query.service,
        subscription: query.subscription,
        as_of,
        pricing: None,
    };
    // The replay's future is not provably `Send` (a compiler limitation with
    // higher-ranked lifetimes over `&[&dyn Projection]`), so it runs on a
    // blocking thread of its own rather than on the request's task.
    let pool = state.pool.clone();
    let report = tokio::task::spawn_blocking(move || {
        tokio::runtime::Handle::current()
            .block_on(crate::invoicing::replay::replay(&pool, &request))
    })
    .await
    .map_err(|e| ApiError::Unexpected(anyhow::Error::new(e)))?
    .map_err(|e| match e {
        ReplayError::BadPeriod => ApiError::invalid("period", "value_is_invalid"),
        ReplayError::NoSuchPosition => ApiError::invalid("as_of", "value_is_invalid"),
        ReplayError::PricingNeedsService | ReplayError::BadPriceBook { .. } => {
            ApiError::invalid("pricing", "value_is_invalid")
        }
        ReplayError::Unexpected(error) => ApiError::Unexpected(error),
    })?;
    Ok(Json(json!({ "replay": report })))
}

#[derive(Deserialize)]
struct ReconciliationQuery {
    period: Option<String>,
    service: Option<String>,
    subscription: Option<String>,
    tolerance_cents: Option<String>,
}

fn reconcile_refusal(error: ReconcileError) -> ApiError {
    match error {
        ReconcileError::BadPeriod => ApiError::invalid("period", "value_is_invalid"),
        ReconcileError::BadTolerance => ApiError::invalid("tolerance_cents", "value_is_invalid"),
        ReconcileError::NotFound(_) => ApiError::NotFound("reconciliation_row"),
        ReconcileError::Ambiguous(..) => ApiError::invalid("service", "value_is_mandatory"),
        ReconcileError::NothingToAccept(_) | ReconcileError::ReasonMissing => {
            ApiError::invalid("reason", "value_is_invalid")
        }
        ReconcileError::Replay(_) => ApiError::invalid("pricing", "value_is_invalid"),
        ReconcileError::Unexpected(error) => ApiError::Unexpected(error),
    }
}

/// `ledger reconcile` over HTTP: a period's rows, unattributed invoices and
/// summary.
async fn reconciliation(
    _: Operator,
    State(state): State<AppState>,
    crate::http::extract::LagoQuery(query): crate::http::extract::LagoQuery<ReconciliationQuery>,
) -> ApiResult<Json<Value>> {
    let period = query
        .period
        .ok_or_else(|| ApiError::invalid("period", "value_is_mandatory"))?;
    let tolerance_cents = match query.tolerance_cents {
        None => 0,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|t| *t >= 0)
            .ok_or_else(|| ApiError::invalid("tolerance_cents", "value_is_invalid"))?,
    };
    let request = ReconcileRequest {
        period,
        service: query.service,
        subscription: query.subscription,
        tolerance_cents,
        pricing: None,
    };
    let pool = state.pool.clone();
    // As for the replay: run on a blocking thread of its own.
    let report = tokio::task::spawn_blocking(move || {
        tokio::runtime::Handle::current()
            .block_on(crate::reconciliation::reconcile(&pool, &request))
    })
    .await
    .map_err(|e| ApiError::Unexpected(anyhow::Error::new(e)))?
    .map_err(reconcile_refusal)?;
    Ok(Json(json!({ "reconciliation": report })))
}

/// `ledger explain reconciliation` over HTTP.
async fn explain_reconciliation(
    _: Operator,
    State(state): State<AppState>,
    Path((service, subscription, period)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let explained =
        crate::reconciliation::explain(&state.pool, Some(&service), &subscription, &period)
            .await
            .map_err(reconcile_refusal)?;
    Ok(Json(json!({ "reconciliation_explanation": explained })))
}
