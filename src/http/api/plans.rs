//! `/plans`: create, update (a new version), get by code, list. A charge's
//! `billable_metric_id` is resolved among the calling service's metrics only.

use aggregates::billable_metric::{AggregationType, MetricRef};
use aggregates::plan::{PlanCommand, PlanInput};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{list_resources, read, unknown_tax_codes, write_then_read, Resource, Tenant};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/plans", post(create).get(list))
        .route("/plans/{code}", get(find).put(update))
}

#[derive(Deserialize)]
struct PlanBody {
    plan: PlanInput,
}

const PLAN: Resource<'static> = Resource {
    name: "plan",
    select: "SELECT resource FROM plans WHERE service_code = $1 AND code = $2",
};

/// Resolve the charges' metrics and the tax codes inside the service.
async fn resolve(state: &AppState, tenant: &Tenant, mut input: PlanInput) -> ApiResult<PlanInput> {
    for charge in input.charges.iter_mut().flatten() {
        let Some(id) = charge
            .billable_metric_id
            .as_deref()
            .filter(|id| !id.trim().is_empty())
        else {
            continue; // reported by the aggregate as mandatory
        };
        let lago_id =
            Uuid::parse_str(id.trim()).map_err(|_| ApiError::NotFound("billable_metric"))?;
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT code, resource->>'aggregation_type' FROM billable_metrics \
             WHERE service_code = $1 AND lago_id = $2",
        )
        .bind(&tenant.service)
        .bind(lago_id)
        .fetch_optional(&state.pool)
        .await?;
        let (code, aggregation) = row.ok_or(ApiError::NotFound("billable_metric"))?;
        charge.metric = Some(MetricRef {
            lago_id,
            code,
            aggregation_type: AggregationType::parse(&aggregation).ok_or_else(|| {
                ApiError::Unexpected(anyhow::anyhow!("stored aggregation {aggregation}"))
            })?,
        });
    }
    input.unknown_tax_codes = unknown_tax_codes(state, tenant, input.tax_codes.as_ref()).await?;
    Ok(input)
}

async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<PlanBody>,
) -> ApiResult<Json<Value>> {
    let code = body.plan.code.clone().unwrap_or_default();
    let input = resolve(&state, &tenant, body.plan).await?;
    let command = PlanCommand::Create {
        lago_id: Uuid::new_v4(),
        input,
    };
    respond(&state, &tenant, &request, &code, command).await
}

async fn update(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(code): Path<String>,
    LagoJson(body): LagoJson<PlanBody>,
) -> ApiResult<Json<Value>> {
    let input = resolve(&state, &tenant, body.plan).await?;
    respond(
        &state,
        &tenant,
        &request,
        &code,
        PlanCommand::Update { input },
    )
    .await
}

async fn respond(
    state: &AppState,
    tenant: &Tenant,
    request: &RequestContext,
    code: &str,
    command: PlanCommand,
) -> ApiResult<Json<Value>> {
    write_then_read(
        state,
        tenant,
        request,
        &state.commands.plans,
        code,
        command,
        &PLAN,
    )
    .await
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    read(&state, &tenant, &code, &PLAN).await
}

async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    LagoQuery(page): LagoQuery<PageRequest>,
) -> ApiResult<Json<Value>> {
    let (plans, meta) = list_resources(
        &state,
        "resource",
        "plans",
        &tenant,
        page.validate()?,
        |_| {},
    )
    .await?;
    Ok(Json(json!({ "plans": plans, "meta": meta })))
}
