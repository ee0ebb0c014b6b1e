//! `/invoices`: list (Lago's filters), show with fees and billing periods,
//! and finalize a draft early. A finalized invoice is shown exactly as its
//! `InvoiceFinalized` event recorded it; a draft's lines are computed when
//! read, with the same code finalization will use.

use aggregates::billing::{AppliedTax, Fee, FeeKind, InvoiceTotals, LogPosition};
use aggregates::invoice::{InvoiceError, INVOICE_STREAM_TYPE};
use aggregates::invoice::{InvoiceFinalization, InvoiceHeader};
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::Tenant;
use crate::http::error::{ApiError, ApiResult};
use crate::http::pagination::PageRequest;
use crate::http::AppState;
use crate::invoicing::closer::{self as invoicing, InvoicingError};
use projections::catalog::timestamp;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/invoices", get(list))
        .route("/invoices/{lago_id}", get(find))
        .route("/invoices/{lago_id}/finalize", put(finalize))
}

#[derive(sqlx::FromRow)]
struct InvoiceRow {
    stream_id: String,
    status: String,
    header: Value,
    finalization: Option<Value>,
    created_at: DateTime<Utc>,
}

const COLUMNS: &str = "stream_id, status, header, finalization, created_at";

impl From<InvoicingError> for ApiError {
    fn from(error: InvoicingError) -> Self {
        match error {
            InvoicingError::Refused(InvoiceError::NotFound) => ApiError::NotFound("invoice"),
            InvoicingError::Refused(InvoiceError::AlreadyFinalized) => ApiError::InvalidStatus,
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

fn fee_json(header: &InvoiceHeader, fee: &Fee) -> Value {
    let item_type = match fee.kind {
        FeeKind::Subscription => "subscription",
        FeeKind::Credit => "credit",
        FeeKind::Charge | FeeKind::TrueUp | FeeKind::Adjustment => "charge",
    };
    json!({
        "lago_invoice_id": header.lago_id,
        "lago_charge_id": fee.charge_lago_id,
        "external_subscription_id": header.external_subscription_id,
        "external_customer_id": header.external_customer_id,
        "fee_type": fee.kind,
        "item": {"type": item_type, "code": fee.code, "name": fee.name,
                 "lago_item_id": fee.charge_lago_id.or(Some(header.lago_plan_id))},
        "plan_code": fee.plan_code,
        "plan_version": fee.plan_version,
        "charge_model": fee.charge_model,
        "aggregation_type": fee.aggregation_type.map(|a| a.as_str()),
        "amount_cents": fee.amount_cents,
        "amount_currency": header.currency,
        "precise_amount": fee.precise_amount.normalize().to_string(),
        "taxes_amount_cents": fee.taxes_amount_cents,
        "total_amount_cents": fee.amount_cents + fee.taxes_amount_cents,
        "total_amount_currency": header.currency,
        "units": fee.units.normalize().to_string(),
        "total_aggregated_units": fee.units.normalize().to_string(),
        "events_count": fee.events_count,
        "from_date": timestamp(fee.from),
        "to_date": timestamp(fee.to),
        "from_datetime": timestamp(fee.from),
        "to_datetime": timestamp(fee.to),
        "proration": fee.proration.map(|p| json!({
            "days": p.days, "period_days": p.period_days,
            "period_from_datetime": timestamp(p.period.start),
            "period_to_datetime": timestamp(p.period.end),
        })),
        "adjusts": fee.adjusts.map(|a| json!({
            "from_datetime": timestamp(a.window.start),
            "to_datetime": timestamp(a.window.end),
            "billed_as_of": {"transaction_id": a.billed_as_of.transaction_id,
                             "position": a.billed_as_of.position},
        })),
    })
}

/// What the invoice shows: recorded (finalized) or computed now (draft).
struct Lines<'a> {
    number: String,
    sequential_id: Option<i64>,
    fees: &'a [Fee],
    taxes: &'a [AppliedTax],
    totals: InvoiceTotals,
    /// The position a finalized invoice's usage was read as of. A draft
    /// shows none: its position is the log's head, which moves with every
    /// service's writes (another tenant's write rate is not this one's to see).
    as_of: Option<LogPosition>,
    finalized_at: Option<DateTime<Utc>>,
}

fn invoice_json(
    header: &InvoiceHeader,
    status: &str,
    lines: Lines<'_>,
    created_at: DateTime<Utc>,
) -> Value {
    let window = |w: Option<aggregates::period::BillingPeriod>| {
        w.map_or((header.issued_at, header.issued_at), |w| (w.start, w.end))
    };
    let (subscription_from, subscription_to) = window(header.subscription_window);
    let (charges_from, charges_to) = window(header.charges_window);
    let totals = lines.totals;
    json!({
        "lago_id": header.lago_id,
        "sequential_id": lines.sequential_id,
        "number": lines.number,
        "issuing_date": header.issuing_date.to_string(),
        "payment_due_date": header.issuing_date.to_string(),
        "payment_overdue": false,
        "net_payment_term": 0,
        "invoice_type": "subscription",
        "version_number": 4,
        "status": status,
        "payment_status": "pending",
        "shadow": header.shadow,
        "currency": header.currency,
        "lago_customer_id": header.customer_lago_id,
        "external_customer_id": header.external_customer_id,
        "fees_amount_cents": totals.fees_amount_cents,
        "coupons_amount_cents": 0,
        "taxes_amount_cents": totals.taxes_amount_cents,
        "credit_notes_amount_cents": 0,
        "progressive_billing_credit_amount_cents": 0,
        "sub_total_excluding_taxes_amount_cents": totals.fees_amount_cents,
        "sub_total_including_taxes_amount_cents": totals.total_amount_cents,
        "total_amount_cents": totals.total_amount_cents,
        "total_due_amount_cents": totals.total_amount_cents,
        "prepaid_credit_amount_cents": 0,
        "billing_periods": [{
            "lago_subscription_id": header.subscription_lago_id,
            "external_subscription_id": header.external_subscription_id,
            "lago_plan_id": header.lago_plan_id,
            "subscription_from_datetime": timestamp(subscription_from),
            "subscription_to_datetime": timestamp(subscription_to),
            "charges_from_datetime": timestamp(charges_from),
            "charges_to_datetime": timestamp(charges_to),
            "invoicing_reason": header.reason.as_str(),
        }],
        "fees": lines.fees.iter().map(|fee| fee_json(header, fee)).collect::<Vec<_>>(),
        "applied_taxes": lines.taxes.iter().map(|tax| json!({
            "lago_invoice_id": header.lago_id,
            "tax_code": tax.code,
            "tax_name": tax.code,
            "tax_rate": tax.rate,
            "amount_cents": tax.amount_cents,
            "amount_currency": header.currency,
            "fees_amount_cents": totals.fees_amount_cents,
        })).collect::<Vec<_>>(),
        "as_of_log_position": lines.as_of.map(|as_of| json!({
            "transaction_id": as_of.transaction_id, "position": as_of.position})),
        "grace_until": timestamp(header.grace_until),
        "created_at": timestamp(created_at),
        "finalized_at": lines.finalized_at.map(timestamp),
    })
}

async fn render(state: &AppState, row: InvoiceRow) -> ApiResult<Value> {
    let header: InvoiceHeader = serde_json::from_value(row.header).map_err(unreadable)?;
    if let Some(finalization) = row.finalization {
        let finalization: InvoiceFinalization =
            serde_json::from_value(finalization).map_err(unreadable)?;
        let lines = Lines {
            number: finalization.number.clone(),
            sequential_id: Some(finalization.sequential_number),
            fees: &finalization.fees,
            taxes: &finalization.taxes,
            totals: finalization.totals,
            as_of: Some(finalization.as_of),
            finalized_at: Some(finalization.finalized_at),
        };
        return Ok(invoice_json(&header, &row.status, lines, row.created_at));
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
    let lines = Lines {
        number: format!(
            "{}-DRAFT-{}",
            header.service.to_uppercase(),
            &header.lago_id.simple().to_string()[..8]
        ),
        sequential_id: None,
        fees: &fees,
        taxes: &taxes,
        totals,
        as_of: None,
        finalized_at: None,
    };
    Ok(invoice_json(&header, &row.status, lines, row.created_at))
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
        // Payments come later: every invoice is pending until then.
        if payment_status.as_deref().is_some_and(|s| s != "pending") {
            sql.push(" AND false");
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
