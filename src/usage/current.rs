//! Current usage: the open period of a subscription, read from the `usage`
//! projection and priced by the same charge models and rounding as
//! invoices.

use aggregates::billable_metric::AggregationType;
use aggregates::charge::Charge;
use aggregates::period::{billing_period_for, BillingPeriod};
use aggregates::pricing::{
    charge_amount, checked, tax_minor_units, to_minor_units, ChargeUsage, Overflow,
};
use aggregates::usage::{period_units, weighted_sum, PeriodAggregate};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use super::directory::DirectoryEntry;

/// Why the open period could not be priced.
#[derive(Debug, thiserror::Error)]
pub enum CurrentUsageError {
    /// The period's usage or its amounts are beyond what a bill can hold:
    /// the subscription cannot be billed until an operator acts.
    #[error("the subscription cannot be billed: {0}")]
    Unbillable(#[from] Overflow),
    /// Storage failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(sqlx::FromRow)]
struct AggregateRow {
    events_count: i64,
    value_sum: Option<Decimal>,
    value_max: Option<Decimal>,
    latest_value: Option<Decimal>,
    unique_count: i64,
    overflowed: bool,
}

/// The usage of one charge in one period, read from the `usage` projection.
pub async fn charge_usage(
    pool: &PgPool,
    subscription_lago_id: Uuid,
    metric_code: &str,
    aggregation: AggregationType,
    period: BillingPeriod,
    with_event_values: bool,
) -> Result<ChargeUsage, CurrentUsageError> {
    let row: Option<AggregateRow> = sqlx::query_as(
        "SELECT events_count, value_sum, value_max, latest_value, unique_count, overflowed \
         FROM usage_aggregates \
         WHERE subscription_lago_id = $1 AND metric_code = $2 AND period_start = $3",
    )
    .bind(subscription_lago_id)
    .bind(metric_code)
    .bind(period.start)
    .fetch_optional(pool)
    .await?;
    if row.as_ref().is_some_and(|row| row.overflowed) {
        return Err(Overflow("usage").into());
    }
    let aggregate = row
        .map(|row| PeriodAggregate {
            events_count: row.events_count,
            value_sum: row.value_sum,
            value_max: row.value_max,
            latest_value: row.latest_value,
            unique_count: row.unique_count,
        })
        .unwrap_or_default();
    let needs_events = aggregation == AggregationType::WeightedSumAgg || with_event_values;
    let events: Vec<(DateTime<Utc>, Decimal)> = if needs_events && aggregate.events_count > 0 {
        sqlx::query_as(
            "SELECT usage_timestamp, coalesce(usage_value, 0) FROM events \
             WHERE usage_subscription = $1 AND usage_timestamp >= $3 AND usage_timestamp < $4 \
               AND usage_metric = $2 AND usage_period_start = $3 \
             ORDER BY usage_timestamp, position",
        )
        .bind(subscription_lago_id)
        .bind(metric_code)
        .bind(period.start)
        .bind(period.end)
        .fetch_all(pool)
        .await?
    } else {
        vec![]
    };
    let weighted = weighted_sum(period, Decimal::ZERO, &events)?;
    Ok(ChargeUsage {
        units: period_units(aggregation, &aggregate, weighted),
        events_count: aggregate.events_count,
        event_values: events.into_iter().map(|(_, value)| value).collect(),
    })
}

/// One charge of the open period, priced.
pub struct ChargeLine<'a> {
    /// The plan's charge.
    pub charge: &'a Charge,
    /// Its usage so far.
    pub usage: ChargeUsage,
    /// The unrounded amount, in currency units.
    pub precise_amount: Decimal,
    /// The amount rounded once to minor units.
    pub amount_cents: i64,
}

/// The open period of a subscription, priced by the invoices' rules.
pub struct CurrentUsage<'a> {
    /// The period.
    pub period: BillingPeriod,
    /// The day its invoice will be issued, in the customer's time zone.
    pub issuing_date: chrono::NaiveDate,
    /// The plan's currency.
    pub currency: &'a str,
    /// Each charge.
    pub charges: Vec<ChargeLine<'a>>,
    /// Sum of the charges' cents.
    pub amount_cents: i64,
    /// Tax per fee, as on the invoice.
    pub taxes_amount_cents: i64,
    /// Charges and taxes.
    pub total_amount_cents: i64,
}

/// The open period's usage of a subscription at `now`, priced.
pub async fn current_usage<'a>(
    pool: &PgPool,
    entry: &'a DirectoryEntry,
    tax_rates: &[Decimal],
    now: DateTime<Utc>,
) -> Result<CurrentUsage<'a>, CurrentUsageError> {
    let period = billing_period_for(&entry.usage.periods, now);
    let currency = entry.plan.amount_currency.as_str();
    let mut charges = Vec::with_capacity(entry.plan.charges.len());
    let mut amount_cents = 0i64;
    let mut taxes_amount_cents = 0i64;
    for charge in &entry.plan.charges {
        let usage = charge_usage(
            pool,
            entry.usage.lago_id,
            &charge.metric.code,
            charge.metric.aggregation_type,
            period,
            charge.pricing.needs_event_values(),
        )
        .await?;
        let precise_amount = charge_amount(&charge.pricing, &usage)?;
        let cents = to_minor_units(precise_amount, currency)?;
        amount_cents = checked::sum_minor([amount_cents, cents], "total")?;
        // Tax per fee, as on the invoice (`aggregates::billing`).
        let tax = tax_minor_units(cents, tax_rates)?;
        taxes_amount_cents = checked::sum_minor([taxes_amount_cents, tax], "total")?;
        charges.push(ChargeLine {
            charge,
            usage,
            precise_amount,
            amount_cents: cents,
        });
    }
    Ok(CurrentUsage {
        period,
        issuing_date: period
            .end
            .with_timezone(&entry.usage.periods.timezone)
            .date_naive(),
        currency,
        charges,
        amount_cents,
        taxes_amount_cents,
        total_amount_cents: checked::sum_minor([amount_cents, taxes_amount_cents], "total")?,
    })
}
