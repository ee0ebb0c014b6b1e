//! The period closer's decisions, pure: which invoices of a service's
//! subscriptions to draft, finalize, adjust or refuse at an instant, their
//! headers, numbers and lines, and the billing frontier they move.
//!
//! The closer (in the service crate) loads the inputs inside one locked
//! transaction — the subscriptions, their invoices folded from the log, the
//! windows already billed, the usage — calls [`plan_close`], and writes what
//! it returns. Replay and the draft view compute invoices with the same
//! [`compute_invoice`]. Nothing here reads a clock or a database: `now`,
//! the log position and the new invoices' ids are inputs.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::billing::{
    invoice_fees, invoice_totals, AppliedTax, BillingSchedule, Fee, InvoiceLayout, InvoiceTotals,
    InvoicingReason, LateWindow, LogPosition,
};
use crate::invoice::{
    invoice_number, invoice_stream_id, Invoice, InvoiceError, InvoiceEvent, InvoiceFinalization,
    InvoiceHeader,
};
use crate::period::BillingPeriod;
use crate::plan::PlanDefinition;
use crate::usage::UsagePoint;

/// A subscription with everything billing it needs.
#[derive(Debug, Clone)]
pub struct SubscriptionBilling {
    /// The service it belongs to.
    pub service: String,
    /// Its id.
    pub lago_id: Uuid,
    /// The service's id for it.
    pub external_id: String,
    /// Its customer's id.
    pub customer_lago_id: Uuid,
    /// The service's id for its customer.
    pub external_customer_id: String,
    /// Billed for comparison only (never payable, numbered apart).
    pub shadow: bool,
    /// The customer's grace period, in days: invoices stay drafts that long.
    pub grace_days: i64,
    /// The customer's taxes: (code, rate in percent).
    pub taxes: Vec<(String, Decimal)>,
    /// Its periods, plans and time zone.
    pub schedule: BillingSchedule,
    /// Everything issued up to here is finalized, per the `invoices`
    /// projection (just before its oldest draft, else its latest finalized
    /// invoice). A hint that saves reading old streams: the log decides.
    pub last_finalized_at: Option<DateTime<Utc>>,
}

impl SubscriptionBilling {
    /// The stream of its invoice issued at `issued_at`.
    pub fn stream_id(&self, issued_at: DateTime<Utc>) -> String {
        invoice_stream_id(&self.service, self.lago_id, issued_at)
    }

    fn tax_rates(&self) -> Vec<Decimal> {
        self.taxes.iter().map(|(_, rate)| *rate).collect()
    }

    /// The instants it issued, or will issue, an invoice at up to `now`
    /// that may still be unfinalized.
    pub fn open_instants(&self, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        self.schedule
            .issuing_instants(now)
            .into_iter()
            .filter(|t| self.last_finalized_at.is_none_or(|f| *t >= f))
            .collect()
    }

    /// Whether a pass of the closer at `now` may have anything to do for it.
    pub fn may_be_due(&self, now: DateTime<Utc>) -> bool {
        let has_due = self
            .schedule
            .issuing_instants(now)
            .last()
            .is_some_and(|last| self.last_finalized_at.is_none_or(|f| f < *last));
        has_due || self.schedule.terminated_at.is_some()
    }
}

/// A window of a subscription already billed, with the log position it was
/// billed up to (the billing frontier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledWindow {
    /// The subscription.
    pub subscription_lago_id: Uuid,
    /// The usage window.
    pub window: BillingPeriod,
    /// The plan it was billed on.
    pub plan_code: String,
    /// That plan's version.
    pub plan_version: u32,
    /// The log position its usage was read as of.
    pub as_of: LogPosition,
}

/// A usage event with the log position it was recorded at.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedPoint {
    /// The metric's code.
    pub metric_code: String,
    /// Where it is in the log.
    pub as_of: LogPosition,
    /// What billing reads of it.
    pub point: UsagePoint,
}

/// What one pass of the closer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CloseReport {
    /// Invoices drafted (waiting for their grace period).
    pub drafted: usize,
    /// Invoices finalized.
    pub finalized: usize,
    /// Of those, adjustment invoices of terminated subscriptions.
    pub adjustment_invoices: usize,
    /// Invoices not issued because their usage window overlaps one already
    /// billed (e.g. after the customer's time zone changed): they would bill
    /// the same usage twice. Logged as errors, for an operator.
    pub refused: usize,
}

impl std::ops::AddAssign for CloseReport {
    fn add_assign(&mut self, other: Self) {
        self.drafted += other.drafted;
        self.finalized += other.finalized;
        self.adjustment_invoices += other.adjustment_invoices;
        self.refused += other.refused;
    }
}

/// Everything a pass of the closer decides from, for one service.
#[derive(Debug, Clone, Copy)]
pub struct ClosingInput<'a> {
    /// The service.
    pub service: &'a str,
    /// Its subscriptions to look at.
    pub subscriptions: &'a [&'a SubscriptionBilling],
    /// Their invoices among [`SubscriptionBilling::open_instants`], folded
    /// from the log, by stream id.
    pub invoices: &'a HashMap<String, Invoice>,
    /// Every window billed so far, by subscription.
    pub billed: &'a HashMap<Uuid, Vec<BilledWindow>>,
    /// The billed windows with usage recorded beyond the position they were
    /// billed as of (up to `as_of`), by subscription.
    pub late: &'a HashMap<Uuid, Vec<BilledWindow>>,
    /// The log position usage is read as of.
    pub as_of: LogPosition,
    /// The instant of the pass.
    pub now: DateTime<Utc>,
    /// Finalize only this draft (its stream id), now, grace or not.
    pub finalize_early: Option<&'a str>,
    /// The service's last invoice numbers: `[live, shadow]`.
    pub last_numbers: [i64; 2],
}

/// An event to append to an invoice's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    /// The invoice's stream id.
    pub stream: String,
    /// Its sequence in the stream.
    pub sequence: i64,
    /// The event.
    pub event: InvoiceEvent,
}

/// A subscription whose invoicing stopped: an invoice's usage window
/// overlaps one already billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlapRefusal {
    /// The subscription.
    pub subscription_lago_id: Uuid,
    /// The usage window that was not billed.
    pub window: BillingPeriod,
}

/// What a pass decided: everything to write, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosingPlan {
    /// Invoice events, in order.
    pub events: Vec<PlannedEvent>,
    /// The billing frontier: windows billed (or billed again) as of the pass.
    pub billed: Vec<BilledWindow>,
    /// The service's last invoice numbers after the pass: `[live, shadow]`.
    pub last_numbers: [i64; 2],
    /// The counts.
    pub report: CloseReport,
    /// The subscriptions refused for an overlapping window.
    pub refusals: Vec<OverlapRefusal>,
}

/// What to do with one invoice of a subscription.
#[derive(Debug, Clone)]
enum Action {
    Draft(InvoiceLayout),
    Finalize(InvoiceLayout),
    /// Late usage of a terminated subscription with nothing else to bill.
    Adjust(DateTime<Utc>),
}

/// The actions due for one subscription: its unfinalized invoices in order;
/// once one stays a draft (grace period), later ones are only drafted.
fn actions(billing: &SubscriptionBilling, input: &ClosingInput<'_>) -> Vec<Action> {
    let now = input.now;
    let mut actions = Vec::new();
    let mut blocked = false;
    for layout in billing.schedule.layouts(now) {
        if billing
            .last_finalized_at
            .is_some_and(|f| layout.issued_at < f)
        {
            continue;
        }
        let stream = billing.stream_id(layout.issued_at);
        let invoice = input.invoices.get(&stream);
        if invoice.is_some_and(|i| i.finalization().is_some()) {
            continue;
        }
        let grace_over = now >= layout.issued_at + Duration::days(billing.grace_days);
        if let Some(early) = input.finalize_early {
            if early == stream {
                actions.push(Action::Finalize(layout));
            }
            continue;
        }
        if !blocked && grace_over {
            actions.push(Action::Finalize(layout));
        } else {
            blocked = true;
            if invoice.is_none() {
                actions.push(Action::Draft(layout));
            }
        }
    }
    let has_late_usage = input.late.contains_key(&billing.lago_id);
    let terminated = billing.schedule.terminated_at.is_some_and(|end| end <= now);
    if has_late_usage && terminated && actions.is_empty() && input.finalize_early.is_none() {
        actions.push(Action::Adjust(now));
    }
    actions
}

/// The subscription's actions, cut before the first invoice whose usage
/// window overlaps one already billed (never bill a window of usage twice;
/// the subscription's invoicing stops there until an operator looks).
fn decide(
    billing: &SubscriptionBilling,
    input: &ClosingInput<'_>,
) -> (Vec<Action>, Option<OverlapRefusal>) {
    let mut actions = actions(billing, input);
    let billed = input
        .billed
        .get(&billing.lago_id)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let overlapping = actions.iter().enumerate().find_map(|(index, action)| {
        let (Action::Draft(layout) | Action::Finalize(layout)) = action else {
            return None;
        };
        let (window, _) = layout.usage?;
        billed
            .iter()
            .any(|b| b.window.start < window.end && window.start < b.window.end)
            .then_some((index, window))
    });
    let refusal = overlapping.map(|(index, window)| {
        actions.truncate(index);
        OverlapRefusal {
            subscription_lago_id: billing.lago_id,
            window,
        }
    });
    (actions, refusal)
}

impl ClosingInput<'_> {
    /// The (subscription, window) pairs whose usage [`plan_close`] reads:
    /// the usage windows of the invoices it finalizes and the late windows
    /// those invoices adjust. A subscription with only drafts reads none.
    pub fn usage_windows(&self) -> Vec<(Uuid, BillingPeriod)> {
        let mut windows = Vec::new();
        for billing in self.subscriptions {
            let (actions, _) = decide(billing, self);
            if actions.iter().all(|a| matches!(a, Action::Draft(_))) {
                continue;
            }
            for action in &actions {
                if let Action::Finalize(layout) = action {
                    windows.extend(layout.usage.map(|(w, _)| (billing.lago_id, w)));
                }
            }
            for window in self.late.get(&billing.lago_id).into_iter().flatten() {
                windows.push((billing.lago_id, window.window));
            }
        }
        windows
    }
}

/// Decide a pass of the closer for one service: the invoices to draft and
/// finalize (numbered in order, live and shadow apart), their lines from
/// `usage` (the events of [`ClosingInput::usage_windows`] up to
/// `input.as_of`, by subscription), the billing frontier they move, and
/// the refusals. `new_invoice_id` names each invoice drafted.
pub fn plan_close(
    input: &ClosingInput<'_>,
    usage: &HashMap<Uuid, Vec<LoggedPoint>>,
    new_invoice_id: &mut dyn FnMut() -> Uuid,
) -> Result<ClosingPlan, InvoiceError> {
    let mut plan = ClosingPlan {
        events: Vec::new(),
        billed: Vec::new(),
        last_numbers: input.last_numbers,
        report: CloseReport::default(),
        refusals: Vec::new(),
    };
    let no_points = Vec::new();
    for billing in input.subscriptions {
        let (actions, refusal) = decide(billing, input);
        if let Some(refusal) = refusal {
            plan.report.refused += 1;
            plan.refusals.push(refusal);
        }
        let mut late_left = input
            .late
            .get(&billing.lago_id)
            .cloned()
            .unwrap_or_default();
        let points = usage.get(&billing.lago_id).unwrap_or(&no_points);
        for action in actions {
            let (layout, finalize) = match action {
                Action::Draft(layout) => (layout, false),
                Action::Finalize(layout) => (layout, true),
                Action::Adjust(at) => (
                    InvoiceLayout {
                        issued_at: at,
                        reason: InvoicingReason::Adjustment,
                        usage: None,
                        flat_fees: vec![],
                    },
                    true,
                ),
            };
            let stream = billing.stream_id(layout.issued_at);
            let mut invoice = input.invoices.get(&stream).cloned().unwrap_or_default();
            if invoice.header().is_none() {
                let header = invoice_header(billing, &layout, new_invoice_id(), input.now);
                let event = invoice.draft(header).expect("not drafted yet");
                plan.events.push(PlannedEvent {
                    stream: stream.clone(),
                    sequence: invoice.version() + 1,
                    event: event.clone(),
                });
                invoice.apply(event);
            }
            if !finalize {
                plan.report.drafted += 1;
                continue;
            }
            let computed = compute_invoice(
                billing,
                layout,
                &std::mem::take(&mut late_left),
                points,
                input.as_of,
            );
            let counter = &mut plan.last_numbers[usize::from(billing.shadow)];
            *counter += 1;
            let event = invoice.finalize(InvoiceFinalization {
                number: invoice_number(input.service, billing.shadow, *counter),
                sequential_number: *counter,
                finalized_at: input.now,
                as_of: input.as_of,
                fees: computed.fees,
                taxes: computed.taxes,
                totals: computed.totals,
            })?;
            plan.events.push(PlannedEvent {
                stream,
                sequence: invoice.version() + 1,
                event,
            });
            plan.billed.extend(computed.billed);
            plan.report.finalized += 1;
            if invoice.header().map(|h| h.reason) == Some(InvoicingReason::Adjustment) {
                plan.report.adjustment_invoices += 1;
            }
        }
    }
    Ok(plan)
}

/// The header of `billing`'s invoice laid out by `layout`.
pub fn invoice_header(
    billing: &SubscriptionBilling,
    layout: &InvoiceLayout,
    lago_id: Uuid,
    now: DateTime<Utc>,
) -> InvoiceHeader {
    let segment = billing.schedule.segment_at(layout.issued_at);
    let plan = &billing.schedule.plans[segment].plan;
    InvoiceHeader {
        lago_id,
        service: billing.service.clone(),
        subscription_lago_id: billing.lago_id,
        external_subscription_id: billing.external_id.clone(),
        customer_lago_id: billing.customer_lago_id,
        external_customer_id: billing.external_customer_id.clone(),
        issued_at: layout.issued_at,
        issuing_date: layout
            .issued_at
            .with_timezone(&billing.schedule.timezone)
            .date_naive(),
        reason: layout.reason,
        currency: plan.amount_currency.clone(),
        shadow: billing.shadow,
        lago_plan_id: plan.lago_id,
        subscription_window: layout.subscription_window(),
        charges_window: layout.usage.map(|(window, _)| window),
        grace_until: layout.issued_at + Duration::days(billing.grace_days),
        drafted_at: now,
    }
}

/// One invoice, computed.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputedInvoice {
    /// What it bills.
    pub layout: InvoiceLayout,
    /// Its lines.
    pub fees: Vec<Fee>,
    /// Its totals.
    pub totals: InvoiceTotals,
    /// Its taxes.
    pub taxes: Vec<AppliedTax>,
    /// The log position its usage was read as of.
    pub as_of: LogPosition,
    /// The billed windows it moves forward (its own usage window and every
    /// late window it adjusts).
    pub billed: Vec<BilledWindow>,
}

/// Compute one invoice of `billing` (the invoice at `layout`, adjusting the
/// `late` windows) from `points` read as of `as_of`.
pub fn compute_invoice(
    billing: &SubscriptionBilling,
    layout: InvoiceLayout,
    late: &[BilledWindow],
    points: &[LoggedPoint],
    as_of: LogPosition,
) -> ComputedInvoice {
    let in_window = |window: BillingPeriod, code: &str, upto: LogPosition| -> Vec<&UsagePoint> {
        points
            .iter()
            .filter(|p| {
                p.metric_code == code && window.contains(p.point.timestamp) && p.as_of <= upto
            })
            .map(|p| &p.point)
            .collect()
    };
    let usage_window = layout.usage.map(|(window, _)| window);
    let usage = |code: &str| match usage_window {
        Some(window) => in_window(window, code, as_of),
        None => vec![],
    };
    let plans: Vec<&PlanDefinition> = late
        .iter()
        .map(|b| {
            billing
                .schedule
                .plans
                .iter()
                .map(|s| &s.plan)
                .find(|p| p.code == b.plan_code && p.version == b.plan_version)
                .unwrap_or(
                    &billing.schedule.plans[billing.schedule.segment_at(b.window.start)].plan,
                )
        })
        .collect();
    type Reader<'a> = Box<dyn Fn(&str) -> Vec<&'a UsagePoint> + 'a>;
    let readers: Vec<(Reader<'_>, Reader<'_>)> = late
        .iter()
        .map(|b| {
            let (window, billed_as_of) = (b.window, b.as_of);
            let before: Reader<'_> =
                Box::new(move |code: &str| in_window(window, code, billed_as_of));
            let now: Reader<'_> = Box::new(move |code: &str| in_window(window, code, as_of));
            (before, now)
        })
        .collect();
    let late_windows: Vec<LateWindow<'_, '_>> = late
        .iter()
        .zip(&plans)
        .zip(&readers)
        .map(|((b, plan), (before, now))| LateWindow {
            window: b.window,
            plan,
            billed_as_of: b.as_of,
            before: before.as_ref(),
            now: now.as_ref(),
        })
        .collect();
    let fees = invoice_fees(
        &billing.schedule,
        &layout,
        &usage,
        &late_windows,
        &billing.tax_rates(),
    );
    let (totals, taxes) = invoice_totals(&fees, &billing.taxes);
    let mut billed: Vec<BilledWindow> = late
        .iter()
        .map(|b| BilledWindow { as_of, ..b.clone() })
        .collect();
    if let Some((window, segment)) = layout.usage {
        let plan = &billing.schedule.plans[segment].plan;
        billed.push(BilledWindow {
            subscription_lago_id: billing.lago_id,
            window,
            plan_code: plan.code.clone(),
            plan_version: plan.version,
            as_of,
        });
    }
    ComputedInvoice {
        layout,
        fees,
        totals,
        taxes,
        as_of,
        billed,
    }
}
