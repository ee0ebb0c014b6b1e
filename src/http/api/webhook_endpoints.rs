//! `/webhook_endpoints`: where a service's webhooks go (Lago's API), plus
//! `POST /webhook_endpoints/{lago_id}/rotate_secret`. The secret is shown
//! once, in the answer that created or rotated it; a URL whose host is (or
//! resolves to) a refused address is refused by field (see
//! [`crate::webhooks::address`]).

use aggregates::webhook_endpoint::{WebhookEndpointCommand, WebhookEndpointInput};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{Duration, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{list_resources, read, write_then_read, Resource, Tenant};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;
use crate::webhooks::address::check_url;
use crate::webhooks::signing::generate_secret;

/// How long a rotated-out secret keeps signing beside the new one.
pub const ROTATION_OVERLAP_HOURS: i64 = 24;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhook_endpoints", post(create).get(list))
        .route(
            "/webhook_endpoints/{lago_id}",
            get(find).put(update).delete(remove),
        )
        .route("/webhook_endpoints/{lago_id}/rotate_secret", post(rotate))
}

const RESOURCE_SQL: &str = "jsonb_build_object('lago_id', lago_id, \
    'lago_organization_id', service_code, 'webhook_url', webhook_url, \
    'signature_algo', signature_algo, 'event_types', event_types, \
    'status', CASE WHEN disabled_at IS NULL THEN 'active' ELSE 'disabled' END, \
    'disabled_reason', disabled_reason, \
    'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))";

fn resource(select: &str) -> Resource<'_> {
    Resource {
        name: "webhook_endpoint",
        select,
    }
}

fn select() -> String {
    format!(
        "SELECT {RESOURCE_SQL} FROM webhook_endpoints WHERE service_code = $1 \
         AND lago_id::text = $2 AND deleted_at IS NULL"
    )
}

#[derive(Deserialize)]
struct Body {
    webhook_endpoint: WebhookEndpointInput,
}

async fn guard(state: &AppState, input: &WebhookEndpointInput) -> ApiResult<()> {
    if let Some(url) = input.webhook_url.as_deref().map(str::trim) {
        if aggregates::webhook_endpoint::validate(input, None).is_ok() {
            check_url(&state.webhook_addresses, url)
                .await
                .map_err(|refused| ApiError::invalid("webhook_url", refused.code()))?;
        }
    }
    Ok(())
}

/// Run `command` on the endpoint `lago_id` and answer with it as a GET would.
async fn execute(
    state: &AppState,
    tenant: &Tenant,
    request: &RequestContext,
    lago_id: Uuid,
    command: WebhookEndpointCommand,
) -> ApiResult<Value> {
    let select = select();
    let Json(answer) = write_then_read(
        state,
        tenant,
        request,
        &state.commands.webhook_endpoints,
        &lago_id.to_string(),
        command,
        &resource(&select),
    )
    .await?;
    Ok(answer)
}

fn endpoint_id(lago_id: &str) -> ApiResult<Uuid> {
    lago_id
        .parse()
        .map_err(|_| ApiError::NotFound("webhook_endpoint"))
}

async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<Body>,
) -> ApiResult<Json<Value>> {
    guard(&state, &body.webhook_endpoint).await?;
    let lago_id = Uuid::new_v4();
    let secret = generate_secret();
    let command = WebhookEndpointCommand::Create {
        lago_id,
        input: body.webhook_endpoint,
        secret: secret.clone(),
        at: Utc::now(),
    };
    let mut answer = execute(&state, &tenant, &request, lago_id, command).await?;
    answer["webhook_endpoint"]["secret"] = json!(secret);
    Ok(Json(answer))
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(lago_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let select = select();
    read(&state, &tenant, &lago_id, &resource(&select)).await
}

async fn update(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(lago_id): Path<String>,
    LagoJson(body): LagoJson<Body>,
) -> ApiResult<Json<Value>> {
    let lago_id = endpoint_id(&lago_id)?;
    guard(&state, &body.webhook_endpoint).await?;
    let command = WebhookEndpointCommand::Update {
        input: body.webhook_endpoint,
        at: Utc::now(),
    };
    Ok(Json(
        execute(&state, &tenant, &request, lago_id, command).await?,
    ))
}

async fn rotate(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(lago_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let lago_id = endpoint_id(&lago_id)?;
    let secret = generate_secret();
    let now = Utc::now();
    let previous_valid_until = now + Duration::hours(ROTATION_OVERLAP_HOURS);
    let command = WebhookEndpointCommand::RotateSecret {
        secret: secret.clone(),
        previous_valid_until,
        at: now,
    };
    let mut answer = execute(&state, &tenant, &request, lago_id, command).await?;
    answer["webhook_endpoint"]["secret"] = json!(secret);
    answer["webhook_endpoint"]["previous_secret_valid_until"] =
        json!(projections::catalog::timestamp(previous_valid_until));
    Ok(Json(answer))
}

async fn remove(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(lago_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let lago_id = endpoint_id(&lago_id)?.to_string();
    let select = select();
    let Json(before) = read(&state, &tenant, &lago_id, &resource(&select)).await?;
    let id = tenant.scoped(&lago_id);
    let command = WebhookEndpointCommand::Delete { at: Utc::now() };
    crate::event_log::store::execute(
        &state.commands.webhook_endpoints,
        &id,
        command,
        tenant.metadata(&request),
    )
    .await?;
    state
        .await_projected(
            <aggregates::WebhookEndpoint as cqrs_es::Aggregate>::TYPE,
            &id,
        )
        .await?;
    Ok(Json(before))
}

async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    LagoQuery(page): LagoQuery<PageRequest>,
) -> ApiResult<Json<Value>> {
    let (endpoints, meta) = list_resources(
        &state,
        RESOURCE_SQL,
        "webhook_endpoints",
        &tenant,
        page.validate()?,
        |sql| {
            sql.push(" AND deleted_at IS NULL");
        },
    )
    .await?;
    Ok(Json(
        json!({ "webhook_endpoints": endpoints, "meta": meta }),
    ))
}
