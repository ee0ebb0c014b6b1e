//! `/taxes`: create, get by code, list.

use aggregates::tax::{TaxCommand, TaxInput};
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
        .route("/taxes", post(create).get(list))
        .route("/taxes/{code}", get(find))
}

#[derive(Deserialize)]
struct CreateBody {
    tax: TaxInput,
}

const TAX: Resource<'static> = Resource {
    name: "tax",
    select: "SELECT resource FROM taxes WHERE service_code = $1 AND code = $2",
};

async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<CreateBody>,
) -> ApiResult<Json<Value>> {
    let code = body.tax.code.clone().unwrap_or_default();
    let command = TaxCommand::Create {
        lago_id: Uuid::new_v4(),
        input: body.tax,
    };
    write_then_read(
        &state,
        &tenant,
        &request,
        &state.commands.taxes,
        &code,
        command,
        &TAX,
    )
    .await
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> ApiResult<Json<Value>> {
    read(&state, &tenant, &code, &TAX).await
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
