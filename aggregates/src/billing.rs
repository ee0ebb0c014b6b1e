//! The billing law: when a subscription is invoiced, what each invoice
//! covers, and what every line on it costs. Pure functions of values; the
//! period closer, drafts, current usage and every replay call these.
//!
//! # When invoices are issued
//!
//! A subscription is invoiced at its *issuing instants*: its start, every
//! billing-period boundary after it (in the customer's time zone, see
//! [`crate::period`]), every plan change and its termination. The invoice at
//! instant `T` (previous instant `T₀`) carries:
//!
//! - the usage charges of `[T₀, T)` on the plan then in effect;
//! - a pay-in-arrears flat fee for `[T₀, T)`, prorated by days;
//! - a pay-in-advance flat fee for `[T, end of T's period)`, prorated by days
//!   (not at a termination);
//! - at a termination or plan change inside a period already paid in advance,
//!   a credit for the unused days of that period;
//! - adjustments for usage that arrived after an earlier window was finalized.
//!
//! An invoice with nothing on it (pay in arrears, at the start) is not issued.
//!
//! # Proration
//!
//! A flat fee covers a whole number of local days: `amount × days used ÷
//! days in the period`, days counted inclusively — the start day and the
//! termination day are billed. The day of a plan change is billed on the new
//! plan only. Trial days (the plan's `trial_period`) are free.
//!
//! # Rounding and tax
//!
//! Every fee keeps its precise amount; its `amount_cents` is that amount
//! rounded once, half away from zero, to the currency's minor unit
//! ([`to_minor_units`]). Each fee's tax is, per tax rate, its rounded amount ×
//! rate, rounded the same way ([`tax_minor_units`]). Invoice totals are sums of
//! the fee lines shown.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::billable_metric::AggregationType;
use crate::period::{billing_period_for, local_midnight, BillingPeriod, PeriodRule};
use crate::plan::PlanDefinition;
use crate::pricing::{
    charge_amount, checked, minor_unit_exponent, tax_minor_units, to_minor_units, Checked,
};
use crate::subscription::BillingTime;
use crate::usage::{usage_in_window, UsagePoint};

/// A plan version a subscription bills on from `since`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanSegment {
    /// When the subscription moved to it (the first: its start).
    pub since: DateTime<Utc>,
    /// The plan version.
    pub plan: PlanDefinition,
}

/// Everything about a subscription that decides when and what it is billed.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingSchedule {
    /// Calendar or anniversary periods.
    pub billing_time: BillingTime,
    /// The customer's time zone.
    pub timezone: Tz,
    /// Start.
    pub subscription_at: DateTime<Utc>,
    /// End, if terminated.
    pub terminated_at: Option<DateTime<Utc>>,
    /// Its plan versions in time order (at least one, the first from the start).
    pub plans: Vec<PlanSegment>,
}

/// Why an invoice was issued (Lago's `invoicing_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoicingReason {
    /// At the start (pay in advance).
    SubscriptionStarting,
    /// At a period boundary or a plan change.
    SubscriptionPeriodic,
    /// At the termination.
    SubscriptionTerminating,
    /// Late usage of a terminated subscription.
    Adjustment,
}

impl InvoicingReason {
    /// Lago's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SubscriptionStarting => "subscription_starting",
            Self::SubscriptionPeriodic => "subscription_periodic",
            Self::SubscriptionTerminating => "subscription_terminating",
            Self::Adjustment => "adjustment",
        }
    }
}

/// A flat fee (or its credit) an invoice carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatFeeWindow {
    /// Index of the plan segment it is for.
    pub segment: usize,
    /// The days covered.
    pub window: BillingPeriod,
    /// The full billing period the fee is a part of.
    pub period: BillingPeriod,
    /// Days billed (or credited).
    pub days: i64,
    /// Days in the full period.
    pub period_days: i64,
    /// A credit for unused days paid in advance.
    pub credit: bool,
}

/// What the invoice at one issuing instant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLayout {
    /// The issuing instant (identifies the invoice within its subscription).
    pub issued_at: DateTime<Utc>,
    /// Why.
    pub reason: InvoicingReason,
    /// The usage window `[T₀, T)` and its plan segment.
    pub usage: Option<(BillingPeriod, usize)>,
    /// Flat fees and credits.
    pub flat_fees: Vec<FlatFeeWindow>,
}

impl InvoiceLayout {
    /// Whether the invoice would carry nothing.
    pub fn is_empty(&self) -> bool {
        self.usage.is_none() && self.flat_fees.is_empty()
    }

    /// The subscription-fee window shown as Lago's `subscription_from/to`.
    pub fn subscription_window(&self) -> Option<BillingPeriod> {
        self.flat_fees
            .iter()
            .find(|fee| !fee.credit)
            .map(|fee| fee.window)
            .or(self.usage.map(|(window, _)| window))
    }
}

impl BillingSchedule {
    /// The index of the plan segment in effect at `at`.
    pub fn segment_at(&self, at: DateTime<Utc>) -> usize {
        self.plans
            .iter()
            .rposition(|segment| segment.since <= at)
            .unwrap_or(0)
    }

    /// How periods are laid out for a segment's plan.
    pub fn period_rule(&self, segment: usize) -> PeriodRule {
        PeriodRule {
            interval: self.plans[segment].plan.interval,
            billing_time: self.billing_time,
            subscription_at: self.subscription_at,
            timezone: self.timezone,
        }
    }

    /// The billing period containing `at`, on the plan in effect then.
    pub fn period_at(&self, at: DateTime<Utc>) -> BillingPeriod {
        billing_period_for(&self.period_rule(self.segment_at(at)), at)
    }

    fn next_instant(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.terminated_at.is_some_and(|end| end <= t) {
            return None;
        }
        let mut next = self.period_at(t).end;
        if let Some(change) = self.plans.iter().map(|s| s.since).find(|&s| s > t) {
            next = next.min(change);
        }
        if let Some(end) = self.terminated_at {
            next = next.min(end);
        }
        Some(next)
    }

    /// Every issuing instant up to and including `until`, in order.
    pub fn issuing_instants(&self, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut instants = Vec::new();
        if self
            .terminated_at
            .is_some_and(|end| end <= self.subscription_at)
        {
            return instants;
        }
        let mut t = self.subscription_at;
        while t <= until {
            instants.push(t);
            match self.next_instant(t) {
                Some(next) => t = next,
                None => break,
            }
        }
        instants
    }

    fn trial_end(&self) -> DateTime<Utc> {
        let plan = &self.plans[0].plan;
        let seconds = (plan.trial_period * Decimal::from(86_400))
            .trunc()
            .try_into()
            .unwrap_or(0i64);
        self.subscription_at + Duration::seconds(seconds)
    }

    fn is_plan_change(&self, t: DateTime<Utc>) -> bool {
        self.plans.iter().skip(1).any(|s| s.since == t)
    }

    /// What the invoice at issuing instant `t` (previous instant `previous`)
    /// covers.
    pub fn layout(&self, previous: Option<DateTime<Utc>>, t: DateTime<Utc>) -> InvoiceLayout {
        let terminating = self.terminated_at == Some(t);
        let plan_change = self.is_plan_change(t);
        let trial_end = self.trial_end();
        let tz = self.timezone;
        let mut flat_fees = Vec::new();
        let mut usage = None;
        if let Some(t0) = previous {
            let segment = self.segment_at(t0);
            let plan = &self.plans[segment].plan;
            usage = Some((BillingPeriod { start: t0, end: t }, segment));
            let period = self.period_at(t0);
            if !plan.pay_in_advance {
                let from = t0.max(trial_end);
                let days = billed_days(from, t, tz, !plan_change);
                if days > 0 {
                    flat_fees.push(FlatFeeWindow {
                        segment,
                        window: BillingPeriod {
                            start: from,
                            end: t,
                        },
                        period,
                        days,
                        period_days: billed_days(period.start, period.end, tz, true),
                        credit: false,
                    });
                }
            } else if (terminating || plan_change) && t < period.end {
                // Paid in advance from when this segment entered the period.
                let paid_from = period.start.max(self.plans[segment].since).max(trial_end);
                let paid = billed_days(paid_from, period.end, tz, true);
                let used = billed_days(paid_from, t, tz, !plan_change);
                if paid > used {
                    flat_fees.push(FlatFeeWindow {
                        segment,
                        window: BillingPeriod {
                            start: t,
                            end: period.end,
                        },
                        period,
                        days: paid - used,
                        period_days: billed_days(period.start, period.end, tz, true),
                        credit: true,
                    });
                }
            }
        }
        if !terminating {
            let segment = self.segment_at(t);
            if self.plans[segment].plan.pay_in_advance {
                let period = self.period_at(t);
                let from = t.max(trial_end);
                let days = billed_days(from, period.end, tz, true);
                if days > 0 {
                    flat_fees.push(FlatFeeWindow {
                        segment,
                        window: BillingPeriod {
                            start: from,
                            end: period.end,
                        },
                        period,
                        days,
                        period_days: billed_days(period.start, period.end, tz, true),
                        credit: false,
                    });
                }
            }
        }
        let reason = if terminating {
            InvoicingReason::SubscriptionTerminating
        } else if previous.is_none() {
            InvoicingReason::SubscriptionStarting
        } else {
            InvoicingReason::SubscriptionPeriodic
        };
        InvoiceLayout {
            issued_at: t,
            reason,
            usage,
            flat_fees,
        }
    }

    /// The layouts of every invoice issued up to `until`, in order (empty
    /// ones left out).
    pub fn layouts(&self, until: DateTime<Utc>) -> Vec<InvoiceLayout> {
        let instants = self.issuing_instants(until);
        let mut previous = None;
        let mut layouts = Vec::with_capacity(instants.len());
        for t in instants {
            let layout = self.layout(previous, t);
            if !layout.is_empty() {
                layouts.push(layout);
            }
            previous = Some(t);
        }
        layouts
    }

    /// The layout of the invoice issued at `issued_at`, if the schedule
    /// issues one then (an adjustment invoice is not on the schedule).
    pub fn layout_issued_at(&self, issued_at: DateTime<Utc>) -> Option<InvoiceLayout> {
        self.layouts(issued_at)
            .into_iter()
            .find(|l| l.issued_at == issued_at)
    }
}

fn local_date(at: DateTime<Utc>, tz: Tz) -> NaiveDate {
    at.with_timezone(&tz).date_naive()
}

fn is_local_midnight(at: DateTime<Utc>, tz: Tz) -> bool {
    local_midnight(local_date(at, tz), tz) == at
}

/// The local days `[from, to)` touches, counted inclusively: the first day
/// always; the last partial day when `bill_last_partial_day` (a
/// termination), not when the next plan takes that day (a plan change).
pub fn billed_days(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    tz: Tz,
    bill_last_partial_day: bool,
) -> i64 {
    if to <= from {
        return 0;
    }
    let first = local_date(from, tz);
    let mut last = local_date(to, tz);
    if is_local_midnight(to, tz) || !bill_last_partial_day {
        last = last.pred_opt().expect("a day before");
    }
    ((last - first).num_days() + 1).max(0)
}

/// What kind of line a fee is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeeKind {
    /// The plan's flat fee.
    Subscription,
    /// A usage charge.
    Charge,
    /// A charge's minimum for the period, above its usage.
    TrueUp,
    /// Usage recorded after an earlier window was finalized.
    Adjustment,
    /// Unused days of a flat fee paid in advance.
    Credit,
}

impl FeeKind {
    /// The name on the wire (`fee_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::Charge => "charge",
            Self::TrueUp => "true_up",
            Self::Adjustment => "adjustment",
            Self::Credit => "credit",
        }
    }
}

/// How a flat fee was prorated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proration {
    /// Days billed (or credited).
    pub days: i64,
    /// Days in the full period.
    pub period_days: i64,
    /// The full period.
    pub period: BillingPeriod,
}

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fee {
    /// What it is.
    pub kind: FeeKind,
    /// Plan code (flat fees) or metric code (charges).
    pub code: String,
    /// Shown on the invoice.
    pub name: String,
    /// The plan version it prices.
    pub plan_code: String,
    /// The plan version.
    pub plan_version: u32,
    /// The charge (usage lines).
    pub charge_lago_id: Option<Uuid>,
    /// The charge model (usage lines).
    pub charge_model: Option<String>,
    /// The metric (usage lines).
    pub billable_metric_lago_id: Option<Uuid>,
    /// The metric's aggregation (usage lines).
    pub aggregation_type: Option<AggregationType>,
    /// The window it covers.
    pub from: DateTime<Utc>,
    /// End of the window (exclusive).
    pub to: DateTime<Utc>,
    /// Units (usage lines) or days (flat fees).
    pub units: Decimal,
    /// Usage events counted.
    pub events_count: i64,
    /// The unrounded amount, in currency units.
    pub precise_amount: Decimal,
    /// The amount rounded once to minor units.
    pub amount_cents: i64,
    /// Tax on `amount_cents`, minor units.
    pub taxes_amount_cents: i64,
    /// Flat fees: how they were prorated.
    pub proration: Option<Proration>,
    /// Adjustments: the earlier window whose late usage this bills, and the
    /// log position that window had been billed up to.
    pub adjusts: Option<AdjustedWindow>,
}

/// The earlier window an adjustment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustedWindow {
    /// The window.
    pub window: BillingPeriod,
    /// The log position it had been billed up to.
    pub billed_as_of: LogPosition,
}

/// A point in the log order (the writing transaction, then the position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct LogPosition {
    /// The writing transaction (xid8 as an integer).
    pub transaction_id: i64,
    /// The global position.
    pub position: i64,
}

impl LogPosition {
    /// Before the first event.
    pub const START: LogPosition = LogPosition {
        transaction_id: 0,
        position: 0,
    };
    /// After every event (an upper bound that includes the whole log).
    pub const END: LogPosition = LogPosition {
        transaction_id: i64::MAX,
        position: i64::MAX,
    };
}

impl From<(i64, i64)> for LogPosition {
    /// From a `(transaction_id, position)` pair as the log's columns give it.
    fn from((transaction_id, position): (i64, i64)) -> Self {
        LogPosition {
            transaction_id,
            position,
        }
    }
}

/// A tax applied to an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedTax {
    /// The tax's code.
    pub code: String,
    /// Rate, percent.
    pub rate: Decimal,
    /// Sum over the fees, minor units.
    pub amount_cents: i64,
}

/// An invoice's totals, each the sum of what the invoice shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InvoiceTotals {
    /// Sum of the fees' `amount_cents`.
    pub fees_amount_cents: i64,
    /// Sum of the fees' taxes.
    pub taxes_amount_cents: i64,
    /// Fees + taxes.
    pub total_amount_cents: i64,
}

/// The usage of a plan's metrics in one window.
pub type WindowUsage<'a> = dyn Fn(&str) -> Vec<&'a UsagePoint> + 'a;

/// An earlier window with usage recorded after it was billed.
pub struct LateWindow<'a, 'p> {
    /// The window.
    pub window: BillingPeriod,
    /// The plan version it billed on.
    pub plan: &'a PlanDefinition,
    /// The position it was billed up to.
    pub billed_as_of: LogPosition,
    /// Its events up to that position, by metric code.
    pub before: &'a WindowUsage<'p>,
    /// Its events now, by metric code.
    pub now: &'a WindowUsage<'p>,
}

fn flat_amount(plan: &PlanDefinition) -> Decimal {
    Decimal::new(
        plan.amount_cents,
        minor_unit_exponent(&plan.amount_currency),
    )
}

/// The fee lines of the invoice laid out by `layout`: flat fees, usage
/// charges (from `usage`, the usage window's events by metric code),
/// adjustments for `late` windows, and credits — each rounded once and taxed.
pub fn invoice_fees(
    schedule: &BillingSchedule,
    layout: &InvoiceLayout,
    usage: &WindowUsage<'_>,
    late: &[LateWindow<'_, '_>],
    tax_rates: &[Decimal],
) -> Checked<Vec<Fee>> {
    let mut fees = Vec::new();
    let flat_fee = |fee: &FlatFeeWindow| {
        let plan = &schedule.plans[fee.segment].plan;
        let share = Decimal::from(fee.days) / Decimal::from(fee.period_days.max(1));
        let sign = if fee.credit {
            -Decimal::ONE
        } else {
            Decimal::ONE
        };
        let precise = checked::mul(sign * flat_amount(plan), share, "flat fee")?;
        let mut line = Fee::new(
            if fee.credit {
                FeeKind::Credit
            } else {
                FeeKind::Subscription
            },
            plan,
            fee.window,
            precise,
        );
        line.code = plan.code.clone();
        line.name = if fee.credit {
            format!("{} — unused days credited", plan.name)
        } else {
            plan.name.clone()
        };
        line.units = Decimal::from(fee.days);
        line.proration = Some(Proration {
            days: fee.days,
            period_days: fee.period_days,
            period: fee.period,
        });
        Ok(line)
    };
    for fee in layout.flat_fees.iter().filter(|f| !f.credit) {
        fees.push(flat_fee(fee)?);
    }
    if let Some((window, segment)) = layout.usage {
        let plan = &schedule.plans[segment].plan;
        for charge in &plan.charges {
            let used = usage_in_window(
                charge.metric.aggregation_type,
                window,
                &usage(&charge.metric.code),
            )?;
            let precise = charge_amount(&charge.pricing, &used)?;
            let mut line = Fee::charge(FeeKind::Charge, plan, charge, window, precise);
            line.units = used.units;
            line.events_count = used.events_count;
            fees.push(line);
            let minimum = Decimal::new(
                charge.min_amount_cents,
                minor_unit_exponent(&plan.amount_currency),
            );
            if precise < minimum {
                let shortfall = checked::sub(minimum, precise, "minimum")?;
                let mut true_up = Fee::charge(FeeKind::TrueUp, plan, charge, window, shortfall);
                true_up.name = format!("{} — minimum", charge.metric.code);
                fees.push(true_up);
            }
        }
    }
    for late in late {
        for charge in &late.plan.charges {
            let aggregation = charge.metric.aggregation_type;
            let code = &charge.metric.code;
            let before = usage_in_window(aggregation, late.window, &(late.before)(code))?;
            let now = usage_in_window(aggregation, late.window, &(late.now)(code))?;
            if before == now {
                continue;
            }
            let precise_before = charge_amount(&charge.pricing, &before)?;
            let precise_now = charge_amount(&charge.pricing, &now)?;
            let currency = &late.plan.amount_currency;
            let mut line = Fee::charge(
                FeeKind::Adjustment,
                late.plan,
                charge,
                late.window,
                checked::sub(precise_now, precise_before, "adjustment")?,
            );
            // Rounded so that the window's billed cents add up to the
            // rounded amount of all its usage.
            line.amount_cents = checked::sub_minor(
                to_minor_units(precise_now, currency)?,
                to_minor_units(precise_before, currency)?,
                "adjustment",
            )?;
            line.name = format!(
                "{} — late usage for {} to {}",
                code,
                late.window.start.to_rfc3339(),
                late.window.end.to_rfc3339()
            );
            line.units = checked::sub(now.units, before.units, "adjustment")?;
            line.events_count = now.events_count - before.events_count;
            line.adjusts = Some(AdjustedWindow {
                window: late.window,
                billed_as_of: late.billed_as_of,
            });
            fees.push(line);
        }
    }
    for fee in layout.flat_fees.iter().filter(|f| f.credit) {
        fees.push(flat_fee(fee)?);
    }
    let currency = schedule.plans[0].plan.amount_currency.clone();
    for fee in &mut fees {
        if fee.kind != FeeKind::Adjustment {
            fee.amount_cents = to_minor_units(fee.precise_amount, &currency)?;
        }
        fee.taxes_amount_cents = tax_minor_units(fee.amount_cents, tax_rates)?;
    }
    Ok(fees)
}

impl Fee {
    fn new(kind: FeeKind, plan: &PlanDefinition, window: BillingPeriod, precise: Decimal) -> Fee {
        Fee {
            kind,
            code: plan.code.clone(),
            name: plan.name.clone(),
            plan_code: plan.code.clone(),
            plan_version: plan.version,
            charge_lago_id: None,
            charge_model: None,
            billable_metric_lago_id: None,
            aggregation_type: None,
            from: window.start,
            to: window.end,
            units: Decimal::ZERO,
            events_count: 0,
            precise_amount: precise,
            amount_cents: 0,
            taxes_amount_cents: 0,
            proration: None,
            adjusts: None,
        }
    }

    fn charge(
        kind: FeeKind,
        plan: &PlanDefinition,
        charge: &crate::charge::Charge,
        window: BillingPeriod,
        precise: Decimal,
    ) -> Fee {
        Fee {
            code: charge.metric.code.clone(),
            name: charge.metric.code.clone(),
            charge_lago_id: Some(charge.lago_id),
            charge_model: Some(charge.pricing.model_name().to_string()),
            billable_metric_lago_id: Some(charge.metric.lago_id),
            aggregation_type: Some(charge.metric.aggregation_type),
            ..Fee::new(kind, plan, window, precise)
        }
    }
}

/// The invoice's totals and applied taxes: sums of its fee lines.
pub fn invoice_totals(
    fees: &[Fee],
    taxes: &[(String, Decimal)],
) -> Checked<(InvoiceTotals, Vec<AppliedTax>)> {
    let fees_amount_cents = checked::sum_minor(fees.iter().map(|f| f.amount_cents), "total")?;
    let taxes_amount_cents =
        checked::sum_minor(fees.iter().map(|f| f.taxes_amount_cents), "total")?;
    let mut applied = Vec::with_capacity(taxes.len());
    for (code, rate) in taxes {
        let per_fee = fees
            .iter()
            .map(|f| tax_minor_units(f.amount_cents, &[*rate]))
            .collect::<Checked<Vec<i64>>>()?;
        applied.push(AppliedTax {
            code: code.clone(),
            rate: *rate,
            amount_cents: checked::sum_minor(per_fee, "tax")?,
        });
    }
    Ok((
        InvoiceTotals {
            fees_amount_cents,
            taxes_amount_cents,
            total_amount_cents: checked::sum_minor(
                [fees_amount_cents, taxes_amount_cents],
                "total",
            )?,
        },
        applied,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{d, plan, utc};

    fn schedule(start: &str, plan: PlanDefinition) -> BillingSchedule {
        BillingSchedule {
            billing_time: BillingTime::Calendar,
            timezone: chrono_tz::UTC,
            subscription_at: utc(start),
            terminated_at: None,
            plans: vec![PlanSegment {
                since: utc(start),
                plan,
            }],
        }
    }

    /// (issued at, [(kind, amount_cents)]) of every invoice up to `until`,
    /// with no usage.
    fn invoices(s: &BillingSchedule, until: &str) -> Vec<(String, Vec<(FeeKind, i64)>)> {
        s.layouts(utc(until))
            .iter()
            .map(|layout| {
                let fees = invoice_fees(s, layout, &|_| vec![], &[], &[]).unwrap();
                (
                    layout.issued_at.to_rfc3339(),
                    fees.iter()
                        .filter(|f| f.kind != FeeKind::Charge)
                        .map(|f| (f.kind, f.amount_cents))
                        .collect(),
                )
            })
            .collect()
    }

    fn at(text: &str) -> String {
        utc(text).to_rfc3339()
    }

    #[test]
    fn a_start_on_the_13th_of_a_30_day_month_bills_18_of_30_days() {
        let s = schedule("2026-11-13T10:00:00Z", plan("cloud", 3000, false));
        assert_eq!(
            invoices(&s, "2027-01-01T00:00:00Z"),
            vec![
                // 13th..30th inclusive = 18 days: $30 × 18/30.
                (
                    at("2026-12-01T00:00:00Z"),
                    vec![(FeeKind::Subscription, 1800)]
                ),
                (
                    at("2027-01-01T00:00:00Z"),
                    vec![(FeeKind::Subscription, 3000)]
                ),
            ]
        );
    }

    #[test]
    fn months_of_28_29_30_and_31_days_prorate_by_their_own_length() {
        for (start, expected) in [
            // $31 × 14/28 = 15.50
            ("2026-02-15T00:00:00Z", 1550),
            // $31 × 15/29 = 16.0344… → 16.03
            ("2028-02-15T00:00:00Z", 1603),
            // $31 × 16/30 = 16.5333… → 16.53
            ("2026-04-15T00:00:00Z", 1653),
            // $31 × 17/31 = 17.00
            ("2026-01-15T00:00:00Z", 1700),
        ] {
            let s = schedule(start, plan("cloud", 3100, false));
            let first = &invoices(&s, "2030-01-01T00:00:00Z")[0];
            assert_eq!(first.1, vec![(FeeKind::Subscription, expected)], "{start}");
        }
    }

    #[test]
    fn a_termination_bills_the_days_up_to_and_including_its_day() {
        let mut s = schedule("2026-10-01T00:00:00Z", plan("cloud", 3000, false));
        s.terminated_at = Some(utc("2026-11-20T15:00:00Z"));
        let all = invoices(&s, "2027-01-01T00:00:00Z");
        assert_eq!(
            all,
            vec![
                (
                    at("2026-11-01T00:00:00Z"),
                    vec![(FeeKind::Subscription, 3000)]
                ),
                // 1st..20th = 20 of 30 days.
                (
                    at("2026-11-20T15:00:00Z"),
                    vec![(FeeKind::Subscription, 2000)]
                ),
            ]
        );
        let last = s.layouts(utc("2027-01-01T00:00:00Z")).pop().unwrap();
        assert_eq!(last.reason, InvoicingReason::SubscriptionTerminating);
    }

    #[test]
    fn a_plan_change_bills_the_change_day_on_the_new_plan_only() {
        let mut s = schedule("2026-11-01T00:00:00Z", plan("starter", 3000, false));
        let mut pro = plan("pro", 6000, false);
        pro.version = 2;
        s.plans.push(PlanSegment {
            since: utc("2026-11-20T15:00:00Z"),
            plan: pro,
        });
        let layouts = s.layouts(utc("2026-12-01T00:00:00Z"));
        let fees: Vec<Vec<(String, i64)>> = layouts
            .iter()
            .map(|l| {
                invoice_fees(&s, l, &|_| vec![], &[], &[])
                    .unwrap()
                    .iter()
                    .filter(|f| f.kind == FeeKind::Subscription)
                    .map(|f| (f.plan_code.clone(), f.amount_cents))
                    .collect()
            })
            .collect();
        assert_eq!(
            fees,
            vec![
                // 1st..19th on starter: $30 × 19/30.
                vec![("starter".to_string(), 1900)],
                // 20th..30th on pro: $60 × 11/30.
                vec![("pro".to_string(), 2200)],
            ]
        );
    }

    #[test]
    fn pay_in_advance_bills_the_period_at_its_start_and_credits_unused_days() {
        let mut s = schedule("2026-11-13T10:00:00Z", plan("cloud", 3000, true));
        s.terminated_at = Some(utc("2026-12-10T12:00:00Z"));
        assert_eq!(
            invoices(&s, "2027-02-01T00:00:00Z"),
            vec![
                // At the start: 13th..30th of November, in advance.
                (
                    at("2026-11-13T10:00:00Z"),
                    vec![(FeeKind::Subscription, 1800)]
                ),
                // December in advance (November's usage on the same invoice).
                (
                    at("2026-12-01T00:00:00Z"),
                    vec![(FeeKind::Subscription, 3000)]
                ),
                // Terminated on the 10th: 21 of 31 days back, $30 × 21/31 =
                // 20.3225… → −20.32.
                (at("2026-12-10T12:00:00Z"), vec![(FeeKind::Credit, -2032)]),
            ]
        );
    }

    #[test]
    fn anniversary_billing_from_the_31st_follows_short_months() {
        let mut s = schedule("2026-01-31T09:00:00Z", plan("cloud", 3000, false));
        s.billing_time = BillingTime::Anniversary;
        let issued: Vec<String> = invoices(&s, "2026-05-31T00:00:00Z")
            .into_iter()
            .map(|(t, fees)| {
                assert_eq!(
                    fees,
                    vec![(FeeKind::Subscription, 3000)],
                    "{t}: whole periods"
                );
                t
            })
            .collect();
        assert_eq!(
            issued,
            vec![
                at("2026-02-28T00:00:00Z"),
                at("2026-03-31T00:00:00Z"),
                at("2026-04-30T00:00:00Z"),
                at("2026-05-31T00:00:00Z"),
            ]
        );
    }

    fn point(timestamp: &str, position: i64, value: &str) -> UsagePoint {
        UsagePoint {
            timestamp: utc(timestamp),
            position,
            value: Some(d(value)),
            unique_key: None,
        }
    }

    #[test]
    fn usage_at_23_30_toronto_time_on_the_last_day_bills_in_that_month() {
        let mut s = schedule("2026-10-01T04:00:00Z", plan("cloud", 0, false));
        s.timezone = "America/Toronto".parse().unwrap();
        // 2026-10-31 23:30 EDT; 2026-11-01 00:30 EDT.
        let points = [
            point("2026-11-01T03:30:00Z", 1, "40000"),
            point("2026-11-01T04:30:00Z", 2, "99999"),
        ];
        let layouts = s.layouts(utc("2026-11-01T04:00:00Z"));
        assert_eq!(layouts.len(), 1);
        assert_eq!(layouts[0].issued_at, utc("2026-11-01T04:00:00Z"));
        let fees = invoice_fees(&s, &layouts[0], &|_| points.iter().collect(), &[], &[]).unwrap();
        let cpu = fees.iter().find(|f| f.kind == FeeKind::Charge).unwrap();
        assert_eq!((cpu.units, cpu.events_count), (d("40000"), 1));
        // (40,000 − 36,000) × 0.0075 / 3,600 = 0.008333… → 1 cent.
        assert_eq!(cpu.amount_cents, 1);
    }

    #[test]
    fn a_dst_change_inside_a_period_changes_nothing_about_its_days() {
        let tz: Tz = "America/Toronto".parse().unwrap();
        // November 2026 (EDT → EST on the 1st): 30 days, 721 hours.
        let mut s = schedule("2026-11-13T15:00:00Z", plan("cloud", 3000, false));
        s.timezone = tz;
        let layout = &s.layouts(utc("2026-12-01T05:00:00Z"))[0];
        assert_eq!(
            layout.issued_at,
            utc("2026-12-01T05:00:00Z"),
            "local midnight, EST"
        );
        let fee = layout.flat_fees[0];
        assert_eq!((fee.days, fee.period_days), (18, 30));
        // March 2027 springs forward on the 14th: still 31 days.
        assert_eq!(
            billed_days(
                utc("2027-03-01T05:00:00Z"),
                utc("2027-04-01T04:00:00Z"),
                tz,
                true
            ),
            31
        );
    }

    #[test]
    fn sub_cent_usage_is_rounded_once_on_the_fee_and_taxed_per_fee() {
        let s = schedule("2026-11-01T00:00:00Z", plan("cloud", 1901, false));
        let layout = &s.layouts(utc("2026-12-01T00:00:00Z"))[0];
        for (seconds, cents) in [("38400", 1), ("37000", 0), ("396000", 75)] {
            let points = [point("2026-11-10T00:00:00Z", 1, seconds)];
            let fees =
                invoice_fees(&s, layout, &|_| points.iter().collect(), &[], &[d("13")]).unwrap();
            let cpu = &fees[1];
            assert_eq!(cpu.amount_cents, cents, "{seconds} s");
            // HST 13% on $19.01 = 247.13 → 247; on 75¢ = 9.75 → 10.
            assert_eq!(fees[0].taxes_amount_cents, 247);
            let (totals, applied) = invoice_totals(&fees, &[("HST".into(), d("13"))]).unwrap();
            let tax = 247 + tax_minor_units(cents, &[d("13")]).unwrap();
            assert_eq!(
                totals,
                InvoiceTotals {
                    fees_amount_cents: 1901 + cents,
                    taxes_amount_cents: tax,
                    total_amount_cents: 1901 + cents + tax,
                }
            );
            assert_eq!(applied[0].amount_cents, tax);
        }
    }

    #[test]
    fn late_usage_is_billed_as_the_difference_in_rounded_cents() {
        let s = schedule("2026-11-01T00:00:00Z", plan("cloud", 0, false));
        let layouts = s.layouts(utc("2027-01-01T00:00:00Z"));
        let november = layouts[0].usage.unwrap().0;
        // Billed: 38,400 s (0.5¢ → 1¢). Late: 1,000 s more (0.7083¢ total → 1¢).
        let billed = [point("2026-11-10T00:00:00Z", 1, "38400")];
        let all = [billed[0].clone(), point("2026-11-30T23:00:00Z", 9, "1000")];
        let plan = &s.plans[0].plan;
        let before = |_: &str| billed.iter().collect();
        let now = |_: &str| all.iter().collect();
        let late = [LateWindow {
            window: november,
            plan,
            billed_as_of: LogPosition {
                transaction_id: 5,
                position: 1,
            },
            before: &before,
            now: &now,
        }];
        let fees = invoice_fees(&s, &layouts[1], &|_| vec![], &late, &[]).unwrap();
        let adjustment = fees.iter().find(|f| f.kind == FeeKind::Adjustment).unwrap();
        assert_eq!(adjustment.units, d("1000"));
        assert_eq!(adjustment.events_count, 1);
        assert_eq!(adjustment.precise_amount.round_dp(8), d("0.00208333"));
        assert_eq!(adjustment.amount_cents, 0, "1¢ billed, 1¢ due in all");
        assert_eq!(adjustment.adjusts.unwrap().window, november);
        // 9,000 s more instead: 0.7083¢ + 0.25¢ ... total 47,400 s = 2.375¢ → 2¢.
        let all = [billed[0].clone(), point("2026-11-30T23:00:00Z", 9, "9000")];
        let now = |_: &str| all.iter().collect();
        let late = [LateWindow {
            now: &now,
            ..late[0]
        }];
        let fees = invoice_fees(&s, &layouts[1], &|_| vec![], &late, &[]).unwrap();
        let adjustment = fees.iter().find(|f| f.kind == FeeKind::Adjustment).unwrap();
        assert_eq!(adjustment.amount_cents, 1, "2¢ due, 1¢ billed");
    }

    #[test]
    fn fee_kinds_are_named_on_the_wire_as_serialized() {
        for kind in [
            FeeKind::Subscription,
            FeeKind::Charge,
            FeeKind::TrueUp,
            FeeKind::Adjustment,
            FeeKind::Credit,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn a_trial_makes_its_days_free() {
        let mut free = plan("cloud", 3000, false);
        free.trial_period = d("10");
        let s = schedule("2026-11-01T00:00:00Z", free);
        // 11th..30th = 20 days.
        assert_eq!(
            invoices(&s, "2026-12-01T00:00:00Z")[0].1,
            vec![(FeeKind::Subscription, 2000)]
        );
    }

    #[test]
    fn a_charge_minimum_adds_a_true_up_line() {
        let mut with_minimum = plan("cloud", 0, false);
        with_minimum.charges[0].min_amount_cents = 500;
        let s = schedule("2026-11-01T00:00:00Z", with_minimum);
        let layout = &s.layouts(utc("2026-12-01T00:00:00Z"))[0];
        let points = [point("2026-11-10T00:00:00Z", 1, "396000")];
        let fees = invoice_fees(&s, layout, &|_| points.iter().collect(), &[], &[]).unwrap();
        let lines: Vec<(FeeKind, i64)> = fees.iter().map(|f| (f.kind, f.amount_cents)).collect();
        // 75¢ of usage, 5.00 minimum: 4.25 true-up.
        assert_eq!(
            lines,
            vec![
                (FeeKind::Subscription, 0),
                (FeeKind::Charge, 75),
                (FeeKind::TrueUp, 425)
            ]
        );
    }
}
