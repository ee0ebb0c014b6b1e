//! Explaining an invoice: for each fee, the plan version and charge, the
//! window, the aggregation, every usage event that produced it (log
//! position, recorded time, business timestamp, transaction id, value), and
//! the arithmetic from units to cents and tax — enough to recompute the
//! invoice by hand. The numbers are recomputed with the billing law
//! (`aggregates::billing`, `pricing`, `usage`) from the events, as of the
//! log position the invoice recorded, and checked against what it recorded.

use aggregates::billable_metric::AggregationType;
use aggregates::billing::{Fee, FeeKind, LogPosition};
use std::collections::HashMap;

use aggregates::charge::{Charge, Pricing};
use aggregates::closing::LoggedPoint;
use aggregates::invoice::{InvoiceFinalization, InvoiceHeader};
use aggregates::period::BillingPeriod;
use aggregates::plan::PlanDefinition;
use aggregates::pricing::{
    charge_amount, checked, tax_minor_units, to_minor_units, Checked, Overflow,
};
use aggregates::usage::{usage_in_window, UsagePoint};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use projections::catalog::timestamp;

use crate::event_log::usage_windows::usage_as_of;

#[derive(sqlx::FromRow)]
struct InvoiceRow {
    service_code: String,
    status: String,
    header: Value,
    finalization: Option<Value>,
}

/// A usage event of a fee, as the explanation shows it.
struct EventRow {
    as_of: LogPosition,
    recorded_at: DateTime<Utc>,
    transaction_id: String,
    point: UsagePoint,
}

fn text(decimal: Decimal) -> String {
    decimal.normalize().to_string()
}

/// The rule of a charge model, in words, with the charge's properties.
fn pricing_rule(pricing: &Pricing, units: Decimal, precise: Decimal) -> String {
    match pricing {
        Pricing::Standard {
            amount,
            free_units,
            unit_size,
        } => format!(
            "standard: max(units − free_units, 0) × amount ÷ unit_size = max({} − {}, 0) × {} ÷ {} = {}",
            text(units),
            text(*free_units),
            text(*amount),
            text(*unit_size),
            text(precise)
        ),
        Pricing::Package { .. } => format!(
            "package: paid = units − free_units; 0 if paid ≤ 0, else ⌈paid ÷ package_size⌉ × amount; with {} units = {}",
            text(units),
            text(precise)
        ),
        Pricing::Graduated { .. } => format!(
            "graduated: each range prices the units falling in it at its per_unit_amount, plus the flat_amount of every range reached (none without units); with {} units = {}",
            text(units),
            text(precise)
        ),
        Pricing::GraduatedPercentage { .. } => format!(
            "graduated_percentage: each range takes its rate (percent) of the units falling in it, plus the flat_amount of every range reached (none without units); with {} units = {}",
            text(units),
            text(precise)
        ),
        Pricing::Volume { .. } => format!(
            "volume: the range holding the total prices every unit, plus its flat_amount; with {} units = {}",
            text(units),
            text(precise)
        ),
        Pricing::Percentage { .. } => format!(
            "percentage: (units − free value of the first events) × rate ÷ 100 + (events − events free of the fee) × fixed_amount, or per event within min/max; with {} units = {}",
            text(units),
            text(precise)
        ),
    }
}

fn aggregation_rule(aggregation: AggregationType) -> &'static str {
    match aggregation {
        AggregationType::CountAgg => "count of the events",
        AggregationType::SumAgg => "sum of the values",
        AggregationType::MaxAgg => "largest value",
        AggregationType::LatestAgg => "value of the latest event (by timestamp, then log position)",
        AggregationType::UniqueCountAgg => "number of distinct values",
        AggregationType::WeightedSumAgg => {
            "running total averaged over the window by time (each value a change)"
        }
    }
}

/// An amount in minor units, or what overflowed computing it.
fn minor_units(amount: Checked<i64>) -> String {
    amount.map_or_else(|overflow| overflow.to_string(), |cents| cents.to_string())
}

fn tax_lines(cents: i64, taxes: &[(String, Decimal)]) -> Vec<String> {
    taxes
        .iter()
        .map(|(code, rate)| {
            let raw = checked::mul(Decimal::from(cents), *rate, "tax")
                .and_then(|tax| checked::div(tax, Decimal::ONE_HUNDRED, "tax"));
            format!(
                "{code}: {cents} × {}% = {} → {} (half-up to the minor unit)",
                text(*rate),
                raw.map_or_else(|overflow| overflow.to_string(), text),
                minor_units(tax_minor_units(cents, &[*rate]))
            )
        })
        .collect()
}

/// Why an invoice was not explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// There is no such invoice.
    #[error("no invoice {0}")]
    NotFound(Uuid),
    /// Storage failed or stored data could not be read.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Explain the invoice `lago_id` (any service: an operator's view).
pub async fn explain_invoice(pool: &PgPool, lago_id: Uuid) -> Result<Value, ExplainError> {
    explain(pool, lago_id)
        .await?
        .ok_or(ExplainError::NotFound(lago_id))
}

async fn explain(pool: &PgPool, lago_id: Uuid) -> anyhow::Result<Option<Value>> {
    let Some(row): Option<InvoiceRow> = sqlx::query_as(
        "SELECT service_code, status, header, finalization FROM invoices WHERE lago_id = $1",
    )
    .bind(lago_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let header: InvoiceHeader = serde_json::from_value(row.header)?;
    let Some(finalization) = row.finalization else {
        return Ok(Some(json!({
            "lago_id": lago_id,
            "status": row.status,
            "explanation": "a draft: its lines are computed when it is read (GET /api/v1/invoices/{lago_id}) and fixed when it is finalized; explain it then",
        })));
    };
    let finalization: InvoiceFinalization = serde_json::from_value(finalization)?;
    let taxes: Vec<(String, Decimal)> = finalization
        .taxes
        .iter()
        .map(|t| (t.code.clone(), t.rate))
        .collect();
    let mut fees = Vec::with_capacity(finalization.fees.len());
    for fee in &finalization.fees {
        let plan = plan_version(pool, &row.service_code, &fee.plan_code, fee.plan_version).await?;
        fees.push(explain_fee(pool, &header, &finalization, &taxes, fee, plan.as_ref()).await?);
    }
    let totals = finalization.totals;
    Ok(Some(json!({
        "lago_id": lago_id,
        "number": finalization.number,
        "service": row.service_code,
        "external_subscription_id": header.external_subscription_id,
        "external_customer_id": header.external_customer_id,
        "currency": header.currency,
        "issued_at": timestamp(header.issued_at),
        "invoicing_reason": header.reason.as_str(),
        "shadow": header.shadow,
        "as_of_log_position": {"transaction_id": finalization.as_of.transaction_id,
                               "position": finalization.as_of.position},
        "finalized_at": timestamp(finalization.finalized_at),
        "fees": fees,
        "totals": {
            "fees_amount_cents": totals.fees_amount_cents,
            "taxes_amount_cents": totals.taxes_amount_cents,
            "total_amount_cents": totals.total_amount_cents,
            "arithmetic": format!(
                "fees: sum of the lines' amount_cents = {}; taxes: sum of the lines' taxes = {}; total = {} + {} = {}",
                totals.fees_amount_cents, totals.taxes_amount_cents,
                totals.fees_amount_cents, totals.taxes_amount_cents, totals.total_amount_cents),
        },
        "rules": {
            "rounding": "each fee's precise amount is rounded once, half away from zero, to the currency's minor unit",
            "tax": "per fee and per tax rate: the fee's cents × rate ÷ 100, rounded half-up; the invoice's tax is the sum",
            "windows": "half-open [from, to): an event exactly at `to` belongs to the next window",
        },
    })))
}

pub(crate) async fn plan_version(
    pool: &PgPool,
    service: &str,
    code: &str,
    version: u32,
) -> anyhow::Result<Option<PlanDefinition>> {
    let definition: Option<Value> = sqlx::query_scalar(
        "SELECT definition FROM plan_versions WHERE service_code = $1 AND code = $2 AND version = $3",
    )
    .bind(service)
    .bind(code)
    .bind(version as i32)
    .fetch_optional(pool)
    .await?;
    Ok(definition.map(serde_json::from_value).transpose()?)
}

/// The events of `metric` in the window as of the invoice's position (the
/// billing reader, [`usage_as_of`]), in time order, with what an auditor
/// reads beside them: when each was recorded and its transaction id.
async fn window_events(
    pool: &PgPool,
    subscription: Uuid,
    metric: &str,
    window: BillingPeriod,
    as_of: LogPosition,
) -> anyhow::Result<Vec<EventRow>> {
    let mut conn = pool.acquire().await?;
    let mut points: Vec<LoggedPoint> = usage_as_of(&mut conn, &[(subscription, window)], as_of)
        .await?
        .remove(&subscription)
        .unwrap_or_default();
    points.retain(|p| p.metric_code == metric);
    points.sort_by_key(|p| (p.point.timestamp, p.point.position));
    let positions: Vec<i64> = points.iter().map(|p| p.point.position).collect();
    let details: HashMap<i64, (DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT position, recorded_at, payload -> 'UsageRecorded' -> 'sent' ->> 'transaction_id' \
         FROM events WHERE position = ANY($1)",
    )
    .bind(&positions)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(
        |(position, recorded_at, transaction_id): (i64, _, String)| {
            (position, (recorded_at, transaction_id))
        },
    )
    .collect();
    Ok(points
        .into_iter()
        .filter_map(|p| {
            let (recorded_at, transaction_id) = details.get(&p.point.position)?.clone();
            Some(EventRow {
                as_of: p.as_of,
                recorded_at,
                transaction_id,
                point: p.point,
            })
        })
        .collect())
}

async fn explain_fee(
    pool: &PgPool,
    header: &InvoiceHeader,
    finalization: &InvoiceFinalization,
    taxes: &[(String, Decimal)],
    fee: &Fee,
    plan: Option<&PlanDefinition>,
) -> anyhow::Result<Value> {
    let window = BillingPeriod {
        start: fee.from,
        end: fee.to,
    };
    let mut explained = json!({
        "fee_type": fee.kind,
        "name": fee.name,
        "plan": {"code": fee.plan_code, "version": fee.plan_version},
        "from_datetime": timestamp(fee.from),
        "to_datetime": timestamp(fee.to),
        "units": text(fee.units),
        "precise_amount": text(fee.precise_amount),
        "amount_cents": fee.amount_cents,
        "taxes_amount_cents": fee.taxes_amount_cents,
        "tax_arithmetic": tax_lines(fee.amount_cents, taxes),
    });
    let currency = &header.currency;
    if let Some(proration) = fee.proration {
        let flat = plan.map(|p| p.amount_cents).unwrap_or_default();
        explained["arithmetic"] = json!([
            format!(
                "flat fee {flat} (minor units) for the period {} to {} ({} days)",
                timestamp(proration.period.start),
                timestamp(proration.period.end),
                proration.period_days
            ),
            format!(
                "{}{flat} × {} days ÷ {} days = {} {currency}",
                if fee.kind == FeeKind::Credit {
                    "credit: −"
                } else {
                    ""
                },
                proration.days,
                proration.period_days,
                text(fee.precise_amount)
            ),
            format!("rounded half-up: {} minor units", fee.amount_cents),
        ]);
        return Ok(explained);
    }
    let charge: Option<&Charge> = plan.and_then(|p| {
        p.charges
            .iter()
            .find(|c| Some(c.lago_id) == fee.charge_lago_id)
    });
    let Some(charge) = charge else {
        explained["arithmetic"] = json!(["the charge's plan version is not in the catalog"]);
        return Ok(explained);
    };
    let aggregation = charge.metric.aggregation_type;
    explained["charge"] = json!({
        "lago_id": charge.lago_id,
        "billable_metric": {"code": charge.metric.code, "lago_id": charge.metric.lago_id,
                            "aggregation_type": aggregation.as_str()},
        "charge_model": charge.pricing.model_name(),
        "properties": charge.pricing.properties(),
    });
    explained["aggregation"] = json!(aggregation_rule(aggregation));
    let rows = window_events(
        pool,
        header.subscription_lago_id,
        &charge.metric.code,
        window,
        finalization.as_of,
    )
    .await?;
    let billed_before = fee.adjusts.map(|a| a.billed_as_of);
    explained["events"] = rows
        .iter()
        .map(|row| {
            let late = billed_before.is_some_and(|before| row.as_of > before);
            json!({"position": row.point.position, "recorded_at": timestamp(row.recorded_at),
                   "timestamp": timestamp(row.point.timestamp), "transaction_id": row.transaction_id,
                   "value": row.point.value.map(text), "unique_key": row.point.unique_key,
                   "late": late})
        })
        .collect();
    let all: Vec<&UsagePoint> = rows.iter().map(|row| &row.point).collect();
    let priced = |points: &[&UsagePoint]| {
        let usage = usage_in_window(aggregation, window, points)?;
        let precise = charge_amount(&charge.pricing, &usage)?;
        Ok::<_, Overflow>((usage, precise))
    };
    let (now, precise_now) = match priced(&all) {
        Ok(priced) => priced,
        Err(overflow) => {
            explained["arithmetic"] = json!([format!(
                "cannot be recomputed from its {} events: {overflow}",
                rows.len()
            )]);
            return Ok(explained);
        }
    };
    let mut arithmetic = vec![format!(
        "units = {} over {} events = {}",
        aggregation_rule(aggregation),
        now.events_count,
        text(now.units)
    )];
    match billed_before {
        None if fee.kind == FeeKind::TrueUp => {
            arithmetic.push(format!(
                "usage amount {} is below the charge's minimum of {} minor units: true-up = minimum − usage = {}",
                text(precise_now),
                charge.min_amount_cents,
                text(fee.precise_amount)
            ));
        }
        None => {
            arithmetic.push(pricing_rule(&charge.pricing, now.units, precise_now));
            arithmetic.push(format!(
                "rounded half-up: {} minor units",
                minor_units(to_minor_units(precise_now, currency))
            ));
        }
        Some(before) => {
            let earlier: Vec<&UsagePoint> = rows
                .iter()
                .filter(|row| row.as_of <= before)
                .map(|row| &row.point)
                .collect();
            let (then, precise_then) = match priced(&earlier) {
                Ok(priced) => priced,
                Err(overflow) => {
                    arithmetic.push(format!("billed before: cannot be recomputed: {overflow}"));
                    explained["arithmetic"] = json!(arithmetic);
                    return Ok(explained);
                }
            };
            let (cents_now, cents_then) = (
                to_minor_units(precise_now, currency),
                to_minor_units(precise_then, currency),
            );
            arithmetic.push(format!(
                "billed before, as of log position {}: {} units → {} → {} minor units",
                before.position,
                text(then.units),
                text(precise_then),
                minor_units(cents_then)
            ));
            arithmetic.push(format!(
                "now: {}; rounded half-up: {} minor units",
                pricing_rule(&charge.pricing, now.units, precise_now),
                minor_units(cents_now)
            ));
            let difference = match (cents_now, cents_then) {
                (Ok(now), Ok(then)) => checked::sub_minor(now, then, "adjustment"),
                (Err(overflow), _) | (_, Err(overflow)) => Err(overflow),
            };
            arithmetic.push(format!(
                "adjustment = {} − {} = {} minor units (precise {})",
                minor_units(cents_now),
                minor_units(cents_then),
                minor_units(difference),
                checked::sub(precise_now, precise_then, "adjustment")
                    .map_or_else(|overflow| overflow.to_string(), text)
            ));
        }
    }
    let recomputed = match billed_before {
        None => to_minor_units(precise_now, currency),
        Some(_) => Ok(fee.amount_cents),
    };
    if fee.kind == FeeKind::Charge && recomputed != Ok(fee.amount_cents) {
        arithmetic.push(format!(
            "MISMATCH: the events now give {} minor units, the invoice recorded {}",
            minor_units(recomputed),
            fee.amount_cents
        ));
    }
    explained["arithmetic"] = json!(arithmetic);
    Ok(explained)
}
