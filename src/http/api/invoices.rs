//! `/invoices`: list (Lago's filters), show with fees and billing periods,
//! finalize a draft early, and set a payment status settled elsewhere. A finalized invoice is shown exactly as its
//! `InvoiceFinalized` event recorded it; a draft's lines are computed when
//! read, with the same code finalization will use.

use aggregates::invoice::{InvoiceError, PaymentSource, PaymentState, INVOICE_STREAM_TYPE};
use aggregates::invoice::{InvoiceFinalization, InvoiceHeader, PaymentStatus, PaymentUpdate};
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::Tenant;
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;
use crate::invoicing::closer::{self as invoicing, InvoicingError};
use crate::payments::{self, PaymentFact};
use projections::invoices::{invoice_json, Lines};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/invoices", get(list))
        .route("/invoices/{lago_id}", get(find).put(update))
        .route("/invoices/{lago_id}/finalize", put(finalize))
}

#[derive(sqlx::FromRow)]
struct InvoiceRow {
    stream_id: String,
    status: String,
    header: Value,
    finalization: Option<Value>,
    payment: Value,
    created_at: DateTime<Utc>,
}

const COLUMNS: &str = "stream_id, status, header, finalization, payment, created_at";

impl From<InvoicingError> for ApiError {
    fn from(error: InvoicingError) -> Self {
        match error {
            InvoicingError::Refused(InvoiceError::NotFound) => ApiError::NotFound("invoice"),
            InvoicingError::Refused(
                InvoiceError::AlreadyFinalized | InvoiceError::NotFinalized,
            ) => ApiError::InvalidStatus,
            InvoicingError::Refused(InvoiceError::Shadow) => {
                ApiError::invalid("payment_status", "shadow_invoice_not_payable")
            }
            InvoicingError::Unbillable(cause) => ApiError::Unbillable {
                field: "invoice",
                reason: cause.to_string(),
            },
            other => ApiError::Unexpected(other.into()),
        }
    }
}

fn unreadable(e: serde_json::Error) -> ApiError {
    ApiError::Unexpected(anyhow::Error::new(e).context("unreadable invoice row"))
}

async fn render(state: &AppState, row: InvoiceRow) -> ApiResult<Value> {
    let header: InvoiceHeader = serde_json::from_value(row.header).map_err(unreadable)?;
    let payment: PaymentState = serde_json::from_value(row.payment).map_err(unreadable)?;
    if let Some(finalization) = row.finalization {
        let finalization: InvoiceFinalization =
            serde_json::from_value(finalization).map_err(unreadable)?;
        let lines = Lines::finalized(&finalization);
        return Ok(invoice_json(
            &header,
            &row.status,
            lines,
            &payment,
            row.created_at,
        ));
    }
    // A draft shows every usage event recorded before this request: wait
    // until the projections have applied the log as it stands (an event
    // committed but still below another transaction's visibility horizon
    // included), as current usage does.
    state.await_log_projected().await?;
    let computed = invoicing::preview_draft(&state.pool, &header).await?;
    let (fees, taxes, totals) = computed
        .map(|c| (c.fees, c.taxes, c.totals))
        .unwrap_or_default();
    let lines = Lines::draft(&header, &fees, &taxes, totals);
    Ok(invoice_json(
        &header,
        &row.status,
        lines,
        &payment,
        row.created_at,
    ))
}

async fn row(state: &AppState, tenant: &Tenant, lago_id: &str) -> ApiResult<InvoiceRow> {
    let lago_id: Uuid = lago_id.parse().map_err(|_| ApiError::NotFound("invoice"))?;
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM invoices WHERE service_code = $1 AND lago_id = $2"
    ))
    .bind(&tenant.service)
    .bind(lago_id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound("invoice"))
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(lago_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = row(&state, &tenant, &lago_id).await?;
    Ok(Json(json!({"invoice": render(&state, row).await?})))
}

async fn finalize(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(lago_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let found = row(&state, &tenant, &lago_id).await?;
    if found.status != "draft" {
        return Err(ApiError::InvalidStatus);
    }
    let header: InvoiceHeader = serde_json::from_value(found.header).map_err(unreadable)?;
    invoicing::finalize_early(
        &state.pool,
        &tenant.service,
        header.subscription_lago_id,
        &found.stream_id,
        Utc::now(),
    )
    .await?;
    state
        .await_projected(INVOICE_STREAM_TYPE, &found.stream_id)
        .await?;
    let row = row(&state, &tenant, &lago_id).await?;
    Ok(Json(json!({"invoice": render(&state, row).await?})))
}

#[derive(serde::Deserialize)]
struct UpdateBody {
    invoice: UpdateInput,
}

#[derive(serde::Deserialize)]
struct UpdateInput {
    payment_status: Option<Value>,
}

/// Lago's update: `payment_status` of a finalized invoice, for a payment
/// settled outside any provider the ledger hears from.
async fn update(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(lago_id): Path<String>,
    LagoJson(body): LagoJson<UpdateBody>,
) -> ApiResult<Json<Value>> {
    let found = row(&state, &tenant, &lago_id).await?;
    let status = match &body.invoice.payment_status {
        None => None,
        Some(Value::String(text)) => Some(
            PaymentStatus::parse(text)
                .ok_or_else(|| ApiError::invalid("payment_status", "value_is_invalid"))?,
        ),
        Some(_) => return Err(ApiError::invalid("payment_status", "value_is_invalid")),
    };
    if let Some(status) = status {
        let fact = PaymentFact::Status(PaymentUpdate {
            status,
            occurred_at: Utc::now(),
            source: PaymentSource::Api,
            failure: None,
            provider_customer_id: None,
        });
        payments::record(
            &state.pool,
            &found.stream_id,
            &fact,
            tenant.metadata(&request),
        )
        .await?;
        state
            .await_projected(INVOICE_STREAM_TYPE, &found.stream_id)
            .await?;
    }
    let row = row(&state, &tenant, &lago_id).await?;
    Ok(Json(json!({"invoice": render(&state, row).await?})))
}

const STATUSES: [&str; 2] = ["draft", "finalized"];
const PAYMENT_STATUSES: [&str; 3] = ["pending", "succeeded", "failed"];

/// Lago's filters: `external_customer_id`, `status`, `payment_status`,
/// `issuing_date_from`, `issuing_date_to`; plus paging. Newest first.
async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let mut page = PageRequest {
        page: None,
        per_page: None,
    };
    let (mut customer, mut status, mut payment_status) = (None, None, None);
    let (mut from, mut to): (Option<NaiveDate>, Option<NaiveDate>) = (None, None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let number = |field: &str| {
            value
                .parse::<i64>()
                .map_err(|_| ApiError::invalid(field, "value_is_invalid"))
        };
        let date = |field: &str| {
            value
                .parse::<NaiveDate>()
                .map_err(|_| ApiError::invalid(field, "invalid_date"))
        };
        match key.as_ref() {
            "page" => page.page = Some(number("page")?),
            "per_page" => page.per_page = Some(number("per_page")?),
            "external_customer_id" => customer = Some(value.into_owned()),
            "status" => {
                if !STATUSES.contains(&value.as_ref()) {
                    return Err(ApiError::invalid("status", "value_is_invalid"));
                }
                status = Some(value.into_owned());
            }
            "payment_status" => {
                if !PAYMENT_STATUSES.contains(&value.as_ref()) {
                    return Err(ApiError::invalid("payment_status", "value_is_invalid"));
                }
                payment_status = Some(value.into_owned());
            }
            "issuing_date_from" => from = Some(date("issuing_date_from")?),
            "issuing_date_to" => to = Some(date("issuing_date_to")?),
            _ => {}
        }
    }
    let page = page.validate()?;
    let filter = |sql: &mut QueryBuilder<'_, Postgres>| {
        sql.push(" WHERE service_code = ")
            .push_bind(tenant.service.clone());
        if let Some(customer) = &customer {
            sql.push(" AND external_customer_id = ")
                .push_bind(customer.clone());
        }
        if let Some(status) = &status {
            sql.push(" AND status = ").push_bind(status.clone());
        }
        if let Some(payment_status) = &payment_status {
            sql.push(" AND payment_status = ")
                .push_bind(payment_status.clone());
        }
        if let Some(from) = from {
            sql.push(" AND issuing_date >= ").push_bind(from);
        }
        if let Some(to) = to {
            sql.push(" AND issuing_date <= ").push_bind(to);
        }
    };
    let mut count = QueryBuilder::new("SELECT count(*) FROM invoices");
    filter(&mut count);
    let total: i64 = count.build_query_scalar().fetch_one(&state.pool).await?;
    let mut select = QueryBuilder::new(format!("SELECT {COLUMNS} FROM invoices"));
    filter(&mut select);
    select
        .push(" ORDER BY issued_at DESC, lago_id LIMIT ")
        .push_bind(page.per_page)
        .push(" OFFSET ")
        .push_bind(page.offset());
    let rows: Vec<InvoiceRow> = select.build_query_as().fetch_all(&state.pool).await?;
    let mut invoices = Vec::with_capacity(rows.len());
    for row in rows {
        invoices.push(render(&state, row).await?);
    }
    Ok(Json(
        json!({"invoices": invoices, "meta": page.meta(total)}),
    ))
}
