//! Projection `invoices`: every invoice, draft or finalized, as the
//! Lago-compatible API lists and shows it, with its payment state. A draft's
//! lines are computed when it is read; a finalized invoice's are those its
//! event recorded. [`invoice_json`] is the invoice's API object, shared by
//! the API and the webhooks.

use aggregates::billing::{AppliedTax, Fee, FeeKind, InvoiceTotals, LogPosition};
use aggregates::invoice::{InvoiceEvent, InvoiceHeader, PaymentState, INVOICE_STREAM_TYPE};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgConnection;

use crate::catalog::timestamp;
use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `invoices` projection.
pub struct Invoices;

#[async_trait]
impl Projection for Invoices {
    fn name(&self) -> &'static str {
        "invoices"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["invoices"]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[INVOICE_STREAM_TYPE]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != INVOICE_STREAM_TYPE {
            return Ok(());
        }
        let invoice_event: InvoiceEvent = event
            .decode()
            .map_err(|e| ProjectionError::unreadable(event, e))?;
        match invoice_event {
            InvoiceEvent::InvoiceDrafted(header) => {
                sqlx::query(
                    "INSERT INTO invoices (service_code, lago_id, stream_id, subscription_lago_id, \
                     external_subscription_id, external_customer_id, issued_at, issuing_date, status, \
                     shadow, grace_until, header, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'draft', $9, $10, $11, $12, $12)",
                )
                .bind(&header.service)
                .bind(header.lago_id)
                .bind(&event.aggregate_id)
                .bind(header.subscription_lago_id)
                .bind(&header.external_subscription_id)
                .bind(&header.external_customer_id)
                .bind(header.issued_at)
                .bind(header.issuing_date)
                .bind(header.shadow)
                .bind(header.grace_until)
                .bind(serde_json::to_value(&header).expect("serializable"))
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
            InvoiceEvent::InvoiceFinalized(finalization) => {
                sqlx::query(
                    "UPDATE invoices SET status = 'finalized', number = $2, sequential_number = $3, \
                     finalization = $4, updated_at = $5 WHERE stream_id = $1",
                )
                .bind(&event.aggregate_id)
                .bind(&finalization.number)
                .bind(finalization.sequential_number)
                .bind(serde_json::to_value(&finalization).expect("serializable"))
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
            payment_event => {
                let stored: Option<Value> =
                    sqlx::query_scalar("SELECT payment FROM invoices WHERE stream_id = $1")
                        .bind(&event.aggregate_id)
                        .fetch_optional(&mut *conn)
                        .await?;
                let mut payment: PaymentState = serde_json::from_value(stored.unwrap_or_default())
                    .map_err(|e| ProjectionError::unreadable(event, e))?;
                payment.apply(&payment_event);
                sqlx::query(
                    "UPDATE invoices SET payment_status = $2, payment_overdue = $3, payment = $4, \
                     updated_at = $5 WHERE stream_id = $1",
                )
                .bind(&event.aggregate_id)
                .bind(payment.status.as_str())
                .bind(payment.overdue)
                .bind(serde_json::to_value(&payment).expect("serializable"))
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }
}

/// The API object of one fee line.
pub fn fee_json(header: &InvoiceHeader, fee: &Fee) -> Value {
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
pub struct Lines<'a> {
    /// Its number (a draft shows a provisional one).
    pub number: String,
    /// Its place in the service's sequence, once finalized.
    pub sequential_id: Option<i64>,
    /// Its lines.
    pub fees: &'a [Fee],
    /// Its taxes by code.
    pub taxes: &'a [AppliedTax],
    /// Its totals.
    pub totals: InvoiceTotals,
    /// The position a finalized invoice's usage was read as of. A draft
    /// shows none: its position is the log's head, which moves with every
    /// service's writes (another tenant's write rate is not this one's to see).
    pub as_of: Option<LogPosition>,
    /// When it was finalized.
    pub finalized_at: Option<DateTime<Utc>>,
}

impl<'a> Lines<'a> {
    /// What a finalized invoice shows: what its finalization recorded.
    pub fn finalized(finalization: &'a aggregates::invoice::InvoiceFinalization) -> Self {
        Self {
            number: finalization.number.clone(),
            sequential_id: Some(finalization.sequential_number),
            fees: &finalization.fees,
            taxes: &finalization.taxes,
            totals: finalization.totals,
            as_of: Some(finalization.as_of),
            finalized_at: Some(finalization.finalized_at),
        }
    }

    /// What a draft shows: lines computed now (none where they are not),
    /// under a provisional number.
    pub fn draft(
        header: &InvoiceHeader,
        fees: &'a [Fee],
        taxes: &'a [AppliedTax],
        totals: InvoiceTotals,
    ) -> Self {
        Self {
            number: format!(
                "{}-DRAFT-{}",
                header.service.to_uppercase(),
                &header.lago_id.simple().to_string()[..8]
            ),
            sequential_id: None,
            fees,
            taxes,
            totals,
            as_of: None,
            finalized_at: None,
        }
    }
}

/// The API object of an invoice (Lago's fields, the ledger's additions).
pub fn invoice_json(
    header: &InvoiceHeader,
    status: &str,
    lines: Lines<'_>,
    payment: &PaymentState,
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
        "payment_due_date": header.payment_due_date().to_string(),
        "payment_overdue": payment.overdue,
        "net_payment_term": header.net_payment_term,
        "invoice_type": "subscription",
        "version_number": 4,
        "status": status,
        "payment_status": payment.status.as_str(),
        "payment_dispute_lost_at": payment.dispute_lost_at.map(timestamp),
        "payment_disputed": payment.disputed,
        "refunded_amount_cents": payment.refunded_amount_cents,
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
