//! `/taxes`: create, get by code, list.

use aggregates::tax::{TaxCommand, TaxInput};
use aggregates::Tax;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use cqrs_es::Aggregate;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{find_resource, list_resources, Tenant};
use crate::event_store;
use crate::http::error::ApiResult;
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/taxes", post(create).get(list))
        .route("/taxes/{code}", get(find))
}

#[derive(Deserialize)]
struct CreateBody {
    tax: TaxInput,
}

const SELECT: &str = "SELECT resource FROM taxes WHERE service_code = $1 AND code = $2";

async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<CreateBody>,
) -> ApiResult<Json<Value>> {
    let code = body.tax.code.clone().unwrap_or_default();
    let id = tenant.scoped(&code);
    let command = TaxCommand::Create {
        lago_id: Uuid::new_v4(),
        input: body.tax,
    };
    event_store::execute(
        &state.commands.taxes,
        &id,
        command,
        tenant.metadata(&request),
    )
    .await?;
    state.await_projected(Tax::TYPE, &id).await?;
    let tax = find_resource(&state, SELECT, &tenant, &code, "tax").await?;
    Ok(Json(json!({ "tax": tax })))
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    let tax = find_resource(&state, SELECT, &tenant, &code, "tax").await?;
    Ok(Json(json!({ "tax": tax })))
}

async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    LagoQuery(page): LagoQuery<PageRequest>,
) -> ApiResult<Json<Value>> {
    let (taxes, meta) = list_resources(
        &state,
        "resource",
        "taxes",
        &tenant,
        page.validate()?,
        |_| {},
    )
    .await?;
    Ok(Json(json!({ "taxes": taxes, "meta": meta })))
}
