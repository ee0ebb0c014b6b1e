//! `/billable_metrics`: create, get by code, list.

use aggregates::billable_metric::{BillableMetricCommand, MetricInput};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{list_resources, read, write_then_read, Resource, Tenant};
use crate::http::error::ApiResult;
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/billable_metrics", post(create).get(list))
        .route("/billable_metrics/{code}", get(find))
}

#[derive(Deserialize)]
struct CreateBody {
    billable_metric: MetricInput,
}

const METRIC: Resource<'static> = Resource {
    name: "billable_metric",
    select: "SELECT resource FROM billable_metrics WHERE service_code = $1 AND code = $2",
};

async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<CreateBody>,
) -> ApiResult<Json<Value>> {
    let code = body.billable_metric.code.clone().unwrap_or_default();
    let command = BillableMetricCommand::Create {
        lago_id: Uuid::new_v4(),
        input: body.billable_metric,
    };
    let handler = &state.commands.billable_metrics;
    write_then_read(&state, &tenant, &request, handler, &code, command, &METRIC).await
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    read(&state, &tenant, &code, &METRIC).await
}

async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    LagoQuery(page): LagoQuery<PageRequest>,
) -> ApiResult<Json<Value>> {
    let (metrics, meta) = list_resources(
        &state,
        "resource",
        "billable_metrics",
        &tenant,
        page.validate()?,
        |_| {},
    )
    .await?;
    Ok(Json(json!({ "billable_metrics": metrics, "meta": meta })))
}
