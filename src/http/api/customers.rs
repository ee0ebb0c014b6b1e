//! `/customers`: upsert by external id, get, list (optionally by email,
//! matched regardless of case).

use aggregates::customer::{normalized_email, CustomerCommand, CustomerInput};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    find_resource, list_resources, read, unknown_tax_codes, write_then_read, Resource, Tenant,
};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, LagoQuery, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;
use crate::usage::current::{self, CurrentUsage};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/customers", post(upsert).get(list))
        .route("/customers/{external_id}", get(find))
        .route("/customers/{external_id}/current_usage", get(current_usage))
}

#[derive(Deserialize)]
struct UpsertBody {
    customer: Value,
}

const CUSTOMER: Resource<'static> = Resource {
    name: "customer",
    select: "SELECT resource FROM customers WHERE service_code = $1 AND external_id = $2",
};

async fn upsert(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<UpsertBody>,
) -> ApiResult<Json<Value>> {
    let external_id = match body.customer.get("external_id") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.trim().to_string(),
        Some(Value::String(_)) | Some(Value::Null) | None => {
            return Err(ApiError::invalid("external_id", "value_is_mandatory"))
        }
        Some(_) => return Err(ApiError::invalid("external_id", "value_is_invalid")),
    };
    // Parsed from the value (not flattened) so numbers keep their exact text.
    let mut input: CustomerInput = serde_json::from_value(body.customer)
        .map_err(|error| ApiError::BadRequest(format!("customer: {error}")))?;
    let tax_codes = input.tax_codes.clone().flatten();
    input.unknown_tax_codes = unknown_tax_codes(&state, &tenant, tax_codes.as_ref()).await?;
    let command = CustomerCommand::Upsert {
        lago_id: Uuid::new_v4(),
        external_id: external_id.clone(),
        input,
    };
    let handler = &state.commands.customers;
    write_then_read(
        &state,
        &tenant,
        &request,
        handler,
        &external_id,
        command,
        &CUSTOMER,
    )
    .await
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(external_id): Path<String>,
) -> ApiResult<Json<Value>> {
    read(&state, &tenant, &external_id, &CUSTOMER).await
}

#[derive(Deserialize)]
struct ListQuery {
    page: Option<i64>,
    per_page: Option<i64>,
    email: Option<String>,
}

async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    LagoQuery(query): LagoQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    let page = PageRequest {
        page: query.page,
        per_page: query.per_page,
    }
    .validate()?;
    let email = query.email.as_deref().map(normalized_email);
    let (customers, meta) = list_resources(&state, "resource", "customers", &tenant, page, |sql| {
        if let Some(email) = &email {
            sql.push(" AND email_normalized = ")
                .push_bind(email.clone());
        }
    })
    .await?;
    Ok(Json(json!({ "customers": customers, "meta": meta })))
}

#[derive(Deserialize)]
struct UsageQuery {
    external_subscription_id: Option<String>,
}

/// The open period's usage and amounts of one of the customer's
/// subscriptions, priced by the same code as invoices.
async fn current_usage(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(external_id): Path<String>,
    LagoQuery(query): LagoQuery<UsageQuery>,
) -> ApiResult<Json<Value>> {
    let Some(subscription) = query.external_subscription_id.filter(|s| !s.is_empty()) else {
        return Err(ApiError::invalid(
            "external_subscription_id",
            "value_is_mandatory",
        ));
    };
    let customer = find_resource(
        &state,
        CUSTOMER.select,
        &tenant,
        &external_id,
        CUSTOMER.name,
    )
    .await?;
    let directory = crate::usage::directory::directory(
        &state.pool,
        &tenant.service,
        std::slice::from_ref(&subscription),
    )
    .await
    .map_err(super::events::ingest_failure)?;
    let entry = directory
        .get(&subscription)
        .filter(|entry| entry.external_customer_id == external_id)
        .ok_or(ApiError::NotFound("subscription"))?;
    let tax_codes: Vec<String> = customer["tax_codes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|code| code.as_str().map(String::from))
        .collect();
    let rates: Vec<rust_decimal::Decimal> = sqlx::query_scalar(
        "SELECT rate FROM taxes WHERE service_code = $1 AND code = ANY($2) ORDER BY code",
    )
    .bind(&tenant.service)
    .bind(&tax_codes)
    .fetch_all(&state.pool)
    .await?;
    // Read your writes: usage appended before this request counts.
    state.await_log_projected().await?;
    let usage = current::current_usage(&state.pool, entry, &rates, chrono::Utc::now())
        .await
        .map_err(|error| match error {
            current::CurrentUsageError::Unbillable(cause) => ApiError::Unbillable {
                field: "external_subscription_id",
                reason: cause.to_string(),
            },
            current::CurrentUsageError::Database(error) => error.into(),
        })?;
    Ok(Json(json!({ "customer_usage": customer_usage(&usage) })))
}

/// Lago's `customer_usage` object.
fn customer_usage(usage: &CurrentUsage<'_>) -> Value {
    let currency = usage.currency;
    let charges: Vec<Value> = usage
        .charges
        .iter()
        .map(|line| {
            let (charge, units) = (line.charge, line.usage.units.normalize().to_string());
            json!({
                "units": units,
                "total_aggregated_units": units,
                "events_count": line.usage.events_count,
                "amount_cents": line.amount_cents,
                "precise_amount": line.precise_amount.normalize().to_string(),
                "amount_currency": currency,
                "charge": {"lago_id": charge.lago_id, "code": charge.metric.code,
                           "charge_model": charge.pricing.model_name()},
                "billable_metric": {"lago_id": charge.metric.lago_id, "name": charge.metric.code,
                                    "code": charge.metric.code,
                                    "aggregation_type": charge.metric.aggregation_type.as_str()},
                "filters": [],
            })
        })
        .collect();
    json!({
        "from_datetime": projections::catalog::timestamp(usage.period.start),
        "to_datetime": projections::catalog::timestamp(usage.period.end),
        "issuing_date": usage.issuing_date.to_string(),
        "currency": currency,
        "amount_cents": usage.amount_cents,
        "taxes_amount_cents": usage.taxes_amount_cents,
        "total_amount_cents": usage.total_amount_cents,
        "charges_usage": charges,
    })
}
