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
use crate::pricing::{Checked, Overflow};
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
    /// A shadow subscription flipped live: invoices issued after this
    /// boundary are live (see [`SubscriptionBilling::shadow_at`]).
    pub live_from: Option<DateTime<Utc>>,
    /// The customer's grace period, in days: invoices stay drafts that long.
    pub grace_days: i64,
    /// The customer's payment term, in days after the issuing date.
    pub net_payment_term: i64,
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

    /// Whether its invoice issued at `issued_at` is a shadow one: a shadow
    /// subscription's invoices are, up to and including the boundary a flip
    /// made it live from; those issued after it are live. The invoice at the
    /// boundary bills the last shadow period, which the source billed: no
    /// period is billed live twice.
    pub fn shadow_at(&self, issued_at: DateTime<Utc>) -> bool {
        self.shadow && self.live_from.is_none_or(|from| issued_at <= from)
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
    /// Subscriptions whose invoice could not be computed (their usage or
    /// amounts are beyond what a bill holds): nothing of theirs was written
    /// by the pass; the other subscriptions were billed.
    pub quarantined: usize,
}

impl std::ops::AddAssign for CloseReport {
    fn add_assign(&mut self, other: Self) {
        self.drafted += other.drafted;
        self.finalized += other.finalized;
        self.adjustment_invoices += other.adjustment_invoices;
        self.refused += other.refused;
        self.quarantined += other.quarantined;
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

/// A subscription the pass could not bill: computing one of its invoices
/// overflowed. It stays unbilled (and is shown as quarantined) until an
/// operator acts; every other subscription is billed as usual.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// The subscription.
    pub subscription_lago_id: Uuid,
    /// The service's id for it.
    pub external_subscription_id: String,
    /// When the invoice that failed is issued.
    pub issued_at: DateTime<Utc>,
    /// What overflowed.
    pub cause: Overflow,
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
    /// The subscriptions that could not be billed.
    pub quarantined: Vec<Quarantine>,
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
        quarantined: Vec::new(),
    };
    let no_points = Vec::new();
    for billing in input.subscriptions {
        let (actions, refusal) = decide(billing, input);
        if let Some(refusal) = refusal {
            plan.report.refused += 1;
            plan.refusals.push(refusal);
        }
        let points = usage.get(&billing.lago_id).unwrap_or(&no_points);
        // A subscription is planned whole or not at all: on an overflow its
        // events, windows, numbers and counts are taken back.
        let before = (
            plan.events.len(),
            plan.billed.len(),
            plan.last_numbers,
            plan.report,
        );
        match plan_subscription(&mut plan, billing, actions, input, points, new_invoice_id) {
            Ok(()) => {}
            Err(PlanFailure::Invoice(error)) => return Err(error),
            Err(PlanFailure::Overflow { issued_at, cause }) => {
                plan.events.truncate(before.0);
                plan.billed.truncate(before.1);
                plan.last_numbers = before.2;
                plan.report = before.3;
                plan.report.quarantined += 1;
                plan.quarantined.push(Quarantine {
                    subscription_lago_id: billing.lago_id,
                    external_subscription_id: billing.external_id.clone(),
                    issued_at,
                    cause,
                });
            }
        }
    }
    Ok(plan)
}

/// Why one subscription's part of a pass was not planned.
enum PlanFailure {
    /// An invoice's amounts overflowed (the subscription is quarantined).
    Overflow {
        issued_at: DateTime<Utc>,
        cause: Overflow,
    },
    /// An invoice command was refused (a bug: the pass stops).
    Invoice(InvoiceError),
}

/// Plan `actions` of one subscription into `plan`.
fn plan_subscription(
    plan: &mut ClosingPlan,
    billing: &SubscriptionBilling,
    actions: Vec<Action>,
    input: &ClosingInput<'_>,
    points: &[LoggedPoint],
    new_invoice_id: &mut dyn FnMut() -> Uuid,
) -> Result<(), PlanFailure> {
    {
        let mut late_left = input
            .late
            .get(&billing.lago_id)
            .cloned()
            .unwrap_or_default();
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
            let issued_at = layout.issued_at;
            let computed = compute_invoice(
                billing,
                layout,
                &std::mem::take(&mut late_left),
                points,
                input.as_of,
            )
            .map_err(|cause| PlanFailure::Overflow { issued_at, cause })?;
            // A draft keeps the kind it was drafted as.
            let shadow = invoice
                .header()
                .map_or(billing.shadow_at(issued_at), |h| h.shadow);
            let counter = &mut plan.last_numbers[usize::from(shadow)];
            *counter += 1;
            let event = invoice
                .finalize(InvoiceFinalization {
                    number: invoice_number(input.service, shadow, *counter),
                    sequential_number: *counter,
                    finalized_at: input.now,
                    as_of: input.as_of,
                    fees: computed.fees,
                    taxes: computed.taxes,
                    totals: computed.totals,
                })
                .map_err(PlanFailure::Invoice)?;
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
    Ok(())
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
        shadow: billing.shadow_at(layout.issued_at),
        lago_plan_id: plan.lago_id,
        subscription_window: layout.subscription_window(),
        charges_window: layout.usage.map(|(window, _)| window),
        grace_until: layout.issued_at + Duration::days(billing.grace_days),
        drafted_at: now,
        net_payment_term: billing.net_payment_term,
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
) -> Checked<ComputedInvoice> {
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
    )?;
    let (totals, taxes) = invoice_totals(&fees, &billing.taxes)?;
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
    Ok(ComputedInvoice {
        layout,
        fees,
        totals,
        taxes,
        as_of,
        billed,
    })
}

#[cfg(test)]
mod tests {
    //! Given / when / then: the subscriptions, invoices, billed windows and
    //! usage a pass sees; the pass at an instant; the events it appends.

    use super::*;
    use crate::billing::FeeKind;
    use crate::fixtures::{self, d, utc};
    use crate::subscription::BillingTime;

    const SERVICE: &str = "nexacloud";

    fn at(position: i64) -> LogPosition {
        LogPosition {
            transaction_id: 1000 + position,
            position,
        }
    }

    fn plan(code: &str, amount_cents: i64) -> PlanDefinition {
        fixtures::plan(code, amount_cents, false)
    }

    /// A deployment on the $19.00 Starter plan since 1 September 2026 (UTC,
    /// calendar months), 13% HST, no grace period.
    fn deployment() -> SubscriptionBilling {
        SubscriptionBilling {
            service: SERVICE.into(),
            lago_id: Uuid::from_u128(1),
            external_id: "dep_1".into(),
            customer_lago_id: Uuid::from_u128(2),
            external_customer_id: "cus_1".into(),
            shadow: false,
            live_from: None,
            grace_days: 0,
            net_payment_term: 0,
            taxes: vec![("hst_on".into(), d("13"))],
            schedule: BillingSchedule {
                billing_time: BillingTime::Calendar,
                timezone: chrono_tz::UTC,
                subscription_at: utc("2026-09-01T00:00:00Z"),
                terminated_at: None,
                plans: vec![crate::billing::PlanSegment {
                    since: utc("2026-09-01T00:00:00Z"),
                    plan: plan("starter", 1900),
                }],
            },
            last_finalized_at: None,
        }
    }

    fn cpu(timestamp: &str, seconds: i64, recorded: LogPosition) -> LoggedPoint {
        LoggedPoint {
            metric_code: "cpu_seconds".into(),
            as_of: recorded,
            point: UsagePoint {
                timestamp: utc(timestamp),
                position: recorded.position,
                value: Some(Decimal::from(seconds)),
                unique_key: None,
            },
        }
    }

    fn window(start: &str, end: &str) -> BillingPeriod {
        BillingPeriod {
            start: utc(start),
            end: utc(end),
        }
    }

    fn september() -> BillingPeriod {
        window("2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z")
    }

    fn october() -> BillingPeriod {
        window("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")
    }

    /// What a pass sees besides the subscriptions.
    #[derive(Default)]
    struct Given {
        invoices: HashMap<String, Invoice>,
        billed: HashMap<Uuid, Vec<BilledWindow>>,
        late: HashMap<Uuid, Vec<BilledWindow>>,
        usage: HashMap<Uuid, Vec<LoggedPoint>>,
        finalize_early: Option<String>,
        last_numbers: [i64; 2],
    }

    impl Given {
        /// When the closer passes at `now` (usage read as of position 100).
        fn when_closing_at(
            &self,
            billing: &SubscriptionBilling,
            now: &str,
        ) -> (Vec<(Uuid, BillingPeriod)>, ClosingPlan) {
            self.when_closing_all(&[billing], now)
        }

        /// When the closer passes at `now` over several subscriptions.
        fn when_closing_all(
            &self,
            subscriptions: &[&SubscriptionBilling],
            now: &str,
        ) -> (Vec<(Uuid, BillingPeriod)>, ClosingPlan) {
            let input = ClosingInput {
                service: SERVICE,
                subscriptions,
                invoices: &self.invoices,
                billed: &self.billed,
                late: &self.late,
                as_of: at(100),
                now: utc(now),
                finalize_early: self.finalize_early.as_deref(),
                last_numbers: self.last_numbers,
            };
            let mut ids = 0u128;
            let plan = plan_close(&input, &self.usage, &mut || {
                ids += 1;
                Uuid::from_u128(1000 + ids)
            })
            .expect("planned");
            (input.usage_windows(), plan)
        }

        /// An invoice of `billing` issued at `issued_at`, drafted (and
        /// finalized, when `finalized`) by an earlier pass.
        fn with_invoice(
            mut self,
            billing: &SubscriptionBilling,
            issued: &str,
            finalized: bool,
        ) -> Self {
            let layout = billing
                .schedule
                .layout_issued_at(utc(issued))
                .expect("an issuing instant");
            let mut events = vec![InvoiceEvent::InvoiceDrafted(invoice_header(
                billing,
                &layout,
                Uuid::from_u128(500),
                utc(issued),
            ))];
            if finalized {
                let computed = compute_invoice(billing, layout, &[], &[], at(10)).unwrap();
                events.push(InvoiceEvent::InvoiceFinalized(InvoiceFinalization {
                    number: invoice_number(SERVICE, false, 1),
                    sequential_number: 1,
                    finalized_at: utc(issued),
                    as_of: at(10),
                    fees: computed.fees,
                    taxes: computed.taxes,
                    totals: computed.totals,
                }));
            }
            self.invoices
                .insert(billing.stream_id(utc(issued)), Invoice::from_events(events));
            self
        }
    }

    fn finalization(plan: &ClosingPlan, index: usize) -> &InvoiceFinalization {
        match &plan.events[index].event {
            InvoiceEvent::InvoiceFinalized(finalization) => finalization,
            other => panic!("event {index} is {other:?}, not a finalization"),
        }
    }

    fn header(plan: &ClosingPlan, index: usize) -> &InvoiceHeader {
        match &plan.events[index].event {
            InvoiceEvent::InvoiceDrafted(header) => header,
            other => panic!("event {index} is {other:?}, not a draft"),
        }
    }

    fn cents(finalization: &InvoiceFinalization) -> Vec<(FeeKind, i64)> {
        finalization
            .fees
            .iter()
            .map(|fee| (fee.kind, fee.amount_cents))
            .collect()
    }

    #[test]
    fn a_due_period_is_drafted_finalized_numbered_and_billed_as_of_the_position() {
        let billing = deployment();
        let mut given = Given {
            last_numbers: [41, 7],
            ..Given::default()
        };
        given.usage.insert(
            billing.lago_id,
            vec![
                cpu("2026-09-10T00:00:00Z", 210_000, at(20)),
                cpu("2026-09-30T23:30:00Z", 210_000, at(30)),
                // Recorded after the position the pass reads as of.
                cpu("2026-09-30T23:45:00Z", 999_999, at(101)),
            ],
        );

        let (windows, plan) = given.when_closing_at(&billing, "2026-10-01T00:00:01Z");

        assert_eq!(windows, vec![(billing.lago_id, september())]);
        let stream = billing.stream_id(utc("2026-10-01T00:00:00Z"));
        assert_eq!(
            plan.events
                .iter()
                .map(|e| (e.stream.as_str(), e.sequence))
                .collect::<Vec<_>>(),
            vec![(stream.as_str(), 1), (stream.as_str(), 2)]
        );
        assert_eq!(header(&plan, 0).lago_id, Uuid::from_u128(1001));
        assert_eq!(
            header(&plan, 0).reason,
            InvoicingReason::SubscriptionPeriodic
        );
        let finalized = finalization(&plan, 1);
        assert_eq!(finalized.number, invoice_number(SERVICE, false, 42));
        assert_eq!(finalized.sequential_number, 42);
        assert_eq!(finalized.as_of, at(100));
        // $19.00 flat; (420,000 − 36,000) × 0.0075 ÷ 3,600 = $0.80; 13% of
        // each fee: 247 + 10 (10.4, half-up).
        assert_eq!(
            cents(finalized),
            vec![(FeeKind::Subscription, 1900), (FeeKind::Charge, 80)]
        );
        assert_eq!(finalized.totals.taxes_amount_cents, 257);
        assert_eq!(finalized.totals.total_amount_cents, 2237);
        assert_eq!(plan.last_numbers, [42, 7]);
        assert_eq!(
            plan.billed,
            vec![BilledWindow {
                subscription_lago_id: billing.lago_id,
                window: september(),
                plan_code: "starter".into(),
                plan_version: 1,
                as_of: at(100),
            }]
        );
        assert_eq!(
            plan.report,
            CloseReport {
                drafted: 0,
                finalized: 1,
                adjustment_invoices: 0,
                refused: 0,
                quarantined: 0
            }
        );
    }

    #[test]
    fn a_grace_period_keeps_the_invoice_a_draft_and_reads_no_usage() {
        let billing = SubscriptionBilling {
            grace_days: 3,
            ..deployment()
        };

        let (windows, plan) = Given::default().when_closing_at(&billing, "2026-10-02T00:00:00Z");

        assert_eq!(windows, vec![]);
        assert_eq!(plan.events.len(), 1);
        assert_eq!(header(&plan, 0).grace_until, utc("2026-10-04T00:00:00Z"));
        assert_eq!(plan.report.drafted, 1);
        assert_eq!(plan.report.finalized, 0);
        assert_eq!(plan.last_numbers, [0, 0]);
        assert_eq!(plan.billed, vec![]);
    }

    #[test]
    fn once_an_invoice_waits_for_its_grace_later_ones_are_only_drafted() {
        let billing = SubscriptionBilling {
            grace_days: 40,
            ..deployment()
        };

        // September's invoice (grace until 10 November) and October's.
        let (windows, plan) = Given::default().when_closing_at(&billing, "2026-11-02T00:00:00Z");

        assert_eq!(windows, vec![]);
        assert_eq!(plan.report.drafted, 2);
        assert_eq!(
            plan.events
                .iter()
                .map(|e| (e.stream.clone(), e.sequence))
                .collect::<Vec<_>>(),
            vec![
                (billing.stream_id(utc("2026-10-01T00:00:00Z")), 1),
                (billing.stream_id(utc("2026-11-01T00:00:00Z")), 1),
            ]
        );
    }

    #[test]
    fn a_draft_is_finalized_once_its_grace_is_over_and_not_drafted_again() {
        let billing = SubscriptionBilling {
            grace_days: 3,
            ..deployment()
        };
        let given = Given::default().with_invoice(&billing, "2026-10-01T00:00:00Z", false);

        let (windows, plan) = given.when_closing_at(&billing, "2026-10-04T00:00:00Z");

        assert_eq!(windows, vec![(billing.lago_id, september())]);
        assert_eq!(plan.events.len(), 1);
        assert_eq!(plan.events[0].sequence, 2);
        assert_eq!(
            cents(finalization(&plan, 0)),
            vec![(FeeKind::Subscription, 1900), (FeeKind::Charge, 0)]
        );
        assert_eq!(plan.report.drafted, 0);
        assert_eq!(plan.report.finalized, 1);
    }

    #[test]
    fn early_finalization_finalizes_only_the_draft_asked_for() {
        let billing = SubscriptionBilling {
            grace_days: 40,
            ..deployment()
        };
        let october_issue = billing.stream_id(utc("2026-10-01T00:00:00Z"));
        let mut given = Given::default()
            .with_invoice(&billing, "2026-10-01T00:00:00Z", false)
            .with_invoice(&billing, "2026-11-01T00:00:00Z", false);
        given.finalize_early = Some(october_issue.clone());

        let (windows, plan) = given.when_closing_at(&billing, "2026-11-02T00:00:00Z");

        assert_eq!(windows, vec![(billing.lago_id, september())]);
        assert_eq!(plan.events.len(), 1);
        assert_eq!(plan.events[0].stream, october_issue);
        assert_eq!(finalization(&plan, 0).sequential_number, 1);
        assert_eq!(plan.report.finalized, 1);
        assert_eq!(plan.report.drafted, 0);
    }

    #[test]
    fn late_usage_is_billed_as_an_adjustment_on_the_next_invoice() {
        let billing = SubscriptionBilling {
            last_finalized_at: Some(utc("2026-10-01T00:00:00Z")),
            ..deployment()
        };
        let billed_september = BilledWindow {
            subscription_lago_id: billing.lago_id,
            window: september(),
            plan_code: "starter".into(),
            plan_version: 1,
            as_of: at(40),
        };
        let mut given = Given::default().with_invoice(&billing, "2026-10-01T00:00:00Z", true);
        given
            .billed
            .insert(billing.lago_id, vec![billed_september.clone()]);
        given
            .late
            .insert(billing.lago_id, vec![billed_september.clone()]);
        given.usage.insert(
            billing.lago_id,
            vec![
                cpu("2026-09-10T00:00:00Z", 420_000, at(20)),
                // Recorded after September was billed (as of 40).
                cpu("2026-09-30T23:30:00Z", 7_200, at(60)),
            ],
        );

        let (windows, plan) = given.when_closing_at(&billing, "2026-11-01T00:00:00Z");

        assert_eq!(
            windows,
            vec![(billing.lago_id, october()), (billing.lago_id, september())]
        );
        let finalized = finalization(&plan, 1);
        // October: $19.00 flat, no CPU; September again: 427,200 units →
        // $0.815 → 82¢, billed 80¢ before: an adjustment of 2¢.
        assert_eq!(
            cents(finalized),
            vec![
                (FeeKind::Subscription, 1900),
                (FeeKind::Charge, 0),
                (FeeKind::Adjustment, 2)
            ]
        );
        let adjustment = &finalized.fees[2];
        assert_eq!(adjustment.precise_amount, d("0.015"));
        assert_eq!(
            adjustment.adjusts,
            Some(crate::billing::AdjustedWindow {
                window: september(),
                billed_as_of: at(40)
            })
        );
        // Both windows are billed as of this pass now.
        assert_eq!(
            plan.billed,
            vec![
                BilledWindow {
                    as_of: at(100),
                    ..billed_september
                },
                BilledWindow {
                    subscription_lago_id: billing.lago_id,
                    window: october(),
                    plan_code: "starter".into(),
                    plan_version: 1,
                    as_of: at(100),
                },
            ]
        );
    }

    #[test]
    fn a_terminated_subscription_bills_its_partial_period_then_late_usage_on_an_adjustment_invoice()
    {
        let mut billing = deployment();
        billing.schedule.terminated_at = Some(utc("2026-10-16T00:00:00Z"));

        // The termination invoice: 15 of October's 31 days of $19.00.
        let (windows, plan) = Given::default().when_closing_at(&billing, "2026-10-16T00:00:01Z");
        let issued = header(&plan, 2);
        assert_eq!(issued.reason, InvoicingReason::SubscriptionTerminating);
        assert_eq!(
            windows,
            vec![
                (billing.lago_id, september()),
                (
                    billing.lago_id,
                    window("2026-10-01T00:00:00Z", "2026-10-16T00:00:00Z")
                )
            ]
        );
        assert_eq!(
            cents(finalization(&plan, 3)),
            vec![(FeeKind::Subscription, 919), (FeeKind::Charge, 0)]
        );

        // Later, usage of its last window arrives late.
        billing.last_finalized_at = Some(utc("2026-10-16T00:00:00Z"));
        let last_window = BilledWindow {
            subscription_lago_id: billing.lago_id,
            window: window("2026-10-01T00:00:00Z", "2026-10-16T00:00:00Z"),
            plan_code: "starter".into(),
            plan_version: 1,
            as_of: at(40),
        };
        let mut given = Given::default()
            .with_invoice(&billing, "2026-10-01T00:00:00Z", true)
            .with_invoice(&billing, "2026-10-16T00:00:00Z", true);
        given
            .billed
            .insert(billing.lago_id, vec![last_window.clone()]);
        given.late.insert(billing.lago_id, vec![last_window]);
        given.usage.insert(
            billing.lago_id,
            vec![cpu("2026-10-15T12:00:00Z", 75_600, at(70))],
        );

        let (windows, plan) = given.when_closing_at(&billing, "2026-10-20T00:00:00Z");

        let stream = billing.stream_id(utc("2026-10-20T00:00:00Z"));
        assert_eq!(plan.events[0].stream, stream);
        assert_eq!(header(&plan, 0).reason, InvoicingReason::Adjustment);
        assert_eq!(
            windows,
            vec![(
                billing.lago_id,
                window("2026-10-01T00:00:00Z", "2026-10-16T00:00:00Z")
            )]
        );
        // (75,600 − 36,000) × 0.0075 ÷ 3,600 = $0.0825 → 8¢, none billed before.
        assert_eq!(
            cents(finalization(&plan, 1)),
            vec![(FeeKind::Adjustment, 8)]
        );
        assert_eq!(plan.report.adjustment_invoices, 1);
        assert_eq!(plan.report.finalized, 1);
    }

    #[test]
    fn after_a_plan_change_each_period_bills_on_its_own_plan() {
        let mut billing = deployment();
        let mut pro = plan("pro", 4900);
        pro.version = 3;
        billing.schedule.plans.push(crate::billing::PlanSegment {
            since: utc("2026-10-01T00:00:00Z"),
            plan: pro,
        });

        let (_, plan) = Given::default().when_closing_at(&billing, "2026-11-01T00:00:00Z");

        assert_eq!(plan.report.finalized, 2);
        assert_eq!(
            cents(finalization(&plan, 1))[0],
            (FeeKind::Subscription, 1900)
        );
        assert_eq!(
            cents(finalization(&plan, 3))[0],
            (FeeKind::Subscription, 4900)
        );
        assert_eq!(
            plan.billed
                .iter()
                .map(|b| (b.window, b.plan_code.as_str(), b.plan_version))
                .collect::<Vec<_>>(),
            vec![(september(), "starter", 1), (october(), "pro", 3)]
        );
        assert_eq!(plan.last_numbers, [2, 0]);
    }

    #[test]
    fn an_invoice_whose_window_overlaps_one_already_billed_is_refused() {
        let billing = deployment();
        let mut given = Given::default();
        // September was billed in Toronto time; the customer is now in UTC.
        given.billed.insert(
            billing.lago_id,
            vec![BilledWindow {
                subscription_lago_id: billing.lago_id,
                window: window("2026-09-01T04:00:00Z", "2026-10-01T04:00:00Z"),
                plan_code: "starter".into(),
                plan_version: 1,
                as_of: at(40),
            }],
        );

        let (windows, plan) = given.when_closing_at(&billing, "2026-10-01T00:00:01Z");

        assert_eq!(windows, vec![]);
        assert_eq!(plan.events, vec![]);
        assert_eq!(plan.report.refused, 1);
        assert_eq!(
            plan.refusals,
            vec![OverlapRefusal {
                subscription_lago_id: billing.lago_id,
                window: september(),
            }]
        );
        assert_eq!(plan.last_numbers, [0, 0]);
    }

    #[test]
    fn shadow_invoices_are_numbered_apart() {
        let billing = SubscriptionBilling {
            shadow: true,
            ..deployment()
        };
        let given = Given {
            last_numbers: [41, 7],
            ..Given::default()
        };

        let (_, plan) = given.when_closing_at(&billing, "2026-10-01T00:00:01Z");

        assert_eq!(
            finalization(&plan, 1).number,
            invoice_number(SERVICE, true, 8)
        );
        assert_eq!(plan.last_numbers, [41, 8]);
    }

    #[test]
    fn a_flipped_subscription_bills_its_boundary_invoice_in_shadow_and_the_next_live() {
        let flipped = SubscriptionBilling {
            shadow: true,
            live_from: Some("2026-10-01T00:00:00Z".parse().unwrap()),
            ..deployment()
        };
        assert!(flipped.shadow_at("2026-10-01T00:00:00Z".parse().unwrap()));
        assert!(!flipped.shadow_at("2026-11-01T00:00:00Z".parse().unwrap()));
        let given = Given {
            last_numbers: [41, 7],
            ..Given::default()
        };

        let (_, plan) = given.when_closing_at(&flipped, "2026-11-01T00:00:01Z");

        let numbers: Vec<String> = plan
            .events
            .iter()
            .filter_map(|e| match &e.event {
                InvoiceEvent::InvoiceFinalized(f) => Some(f.number.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            numbers,
            vec![
                invoice_number(SERVICE, true, 8),
                invoice_number(SERVICE, false, 42)
            ]
        );
        assert_eq!(plan.last_numbers, [42, 8]);
    }

    #[test]
    fn a_subscription_whose_invoice_overflows_is_quarantined_and_the_others_are_billed() {
        let broken = deployment();
        let healthy = SubscriptionBilling {
            lago_id: Uuid::from_u128(3),
            external_id: "dep_2".into(),
            ..deployment()
        };
        let mut given = Given {
            last_numbers: [41, 0],
            ..Given::default()
        };
        // Two events at the decimal type's maximum: their sum does not fit.
        let most = |at_position| LoggedPoint {
            point: UsagePoint {
                value: Some(Decimal::MAX),
                ..cpu("2026-09-10T00:00:00Z", 0, at(at_position)).point
            },
            ..cpu("2026-09-10T00:00:00Z", 0, at(at_position))
        };
        given.usage.insert(broken.lago_id, vec![most(20), most(21)]);
        given.usage.insert(
            healthy.lago_id,
            vec![cpu("2026-09-10T00:00:00Z", 40_000, at(22))],
        );

        let (_, plan) = given.when_closing_all(&[&broken, &healthy], "2026-10-01T00:00:01Z");

        assert_eq!(
            plan.quarantined,
            vec![Quarantine {
                subscription_lago_id: broken.lago_id,
                external_subscription_id: "dep_1".into(),
                issued_at: utc("2026-10-01T00:00:00Z"),
                cause: Overflow("usage"),
            }]
        );
        // Nothing of the broken subscription is written, not even its draft;
        // the healthy one takes the next number.
        assert_eq!(plan.events.len(), 2);
        assert!(plan
            .events
            .iter()
            .all(|e| e.stream == healthy.stream_id(utc("2026-10-01T00:00:00Z"))));
        let finalized = finalization(&plan, 1);
        assert_eq!(finalized.number, invoice_number(SERVICE, false, 42));
        // $19.00 + 4,000 CPU-seconds over the quota ($0.008333… → 1¢), 13% HST.
        assert_eq!(finalized.totals.fees_amount_cents, 1901);
        assert_eq!(finalized.totals.total_amount_cents, 1901 + 247);
        assert_eq!(plan.last_numbers, [42, 0]);
        assert_eq!(plan.billed.len(), 1);
        assert_eq!(plan.billed[0].subscription_lago_id, healthy.lago_id);
        assert_eq!(
            plan.report,
            CloseReport {
                drafted: 0,
                finalized: 1,
                adjustment_invoices: 0,
                refused: 0,
                quarantined: 1
            }
        );
    }
}
