//! The dual-run reconciliation: the ledger's invoices of a subscription and
//! period beside the source system's actual ones, the delta, its status and
//! its causes. Pure functions of the two sides; the `reconciliation`
//! projection stores the sides and the status, readers add a tolerance, the
//! operators' acceptances and the causes (docs/reconciliation.md).
//!
//! # Periods
//!
//! A period is a calendar month, `YYYY-MM`. A ledger invoice belongs to the
//! month its usage window starts in (else its issuing instant), in the
//! customer's time zone — the rule `ledger replay` selects by; a source
//! invoice to the month of its first billed day.
//!
//! # Causes
//!
//! A delta is split into parts that add up to it exactly. Lines are classed
//! as flat fee (the ledger's subscription fees and credits; the source's
//! `plan`/`subscription` lines), usage (charges, true-ups and adjustments;
//! `usage`/`charge` lines) and one-off (every other source line). Each
//! class's part is the ledger's lines with their tax minus the source's lines
//! with the tax the ledger's rule would put on them, so a fee difference
//! carries its own tax. What remains is the source's own arithmetic: its
//! lines not adding up to its total and its tax differing from the ledger's
//! rule on its own lines — `rounding` when the source merely rounded once on
//! the total, `tax` when its rate differs.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::billing::{AppliedTax, Fee, FeeKind};
use crate::import::ExternalInvoice;
use crate::invoice::{InvoiceFinalization, InvoiceHeader};
use crate::pricing::tax_minor_units;

/// The aggregate type of reconciliation streams (an operator's decisions
/// about a row; stream `{service}/{external_subscription_id}/{period}`).
pub const RECONCILIATION_STREAM_TYPE: &str = "Reconciliation";

/// The stream of a row's decisions.
pub fn reconciliation_stream(
    service: &str,
    external_subscription_id: &str,
    period: &str,
) -> String {
    format!("{service}/{external_subscription_id}/{period}")
}

/// An operator's decision about a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconciliationEvent {
    /// The row's delta is accepted: it no longer blocks a flip.
    ReconciliationAccepted {
        /// The row's status when accepted.
        status: RowStatus,
        /// The delta accepted (a different delta later is not accepted).
        delta_cents: i64,
        /// Why.
        reason: String,
        /// Who.
        accepted_by: String,
        /// When.
        accepted_at: DateTime<Utc>,
    },
}

impl cqrs_es::DomainEvent for ReconciliationEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ReconciliationAccepted { .. } => "ReconciliationAccepted",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// `YYYY-MM` as (year, month); anything else is `None`.
pub fn parse_period(period: &str) -> Option<(i32, u32)> {
    let (year, month) = period.split_once('-')?;
    if year.len() != 4 || month.len() != 2 || !year.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, month) = (year.parse::<i32>().ok()?, month.parse::<u32>().ok()?);
    (1..=12).contains(&month).then_some((year, month))
}

/// The month holding `date`, as `YYYY-MM`.
pub fn period_of(date: NaiveDate) -> String {
    format!("{:04}-{:02}", date.year(), date.month())
}

/// The first and last day of a `YYYY-MM` period.
pub fn period_days(period: &str) -> Option<(NaiveDate, NaiveDate)> {
    let (year, month) = parse_period(period)?;
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)?
    };
    Some((first, next - Duration::days(1)))
}

/// The period after `period`.
pub fn next_period(period: &str) -> Option<String> {
    let (_, last) = period_days(period)?;
    Some(period_of(last + Duration::days(1)))
}

/// What a line is, for the causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineClass {
    /// The plan's flat fee (and credits of it).
    FlatFee,
    /// Usage.
    Usage,
    /// Anything else the source put on a subscription's invoice.
    OneOff,
}

impl LineClass {
    fn of_fee(kind: FeeKind) -> Self {
        match kind {
            FeeKind::Subscription | FeeKind::Credit => Self::FlatFee,
            FeeKind::Charge | FeeKind::TrueUp | FeeKind::Adjustment => Self::Usage,
        }
    }

    /// A source line's class from its kind.
    pub fn of_source_kind(kind: &str) -> Self {
        match kind.to_ascii_lowercase().as_str() {
            "plan" | "subscription" | "flat_fee" => Self::FlatFee,
            "usage" | "charge" => Self::Usage,
            _ => Self::OneOff,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FlatFee => "flat_fee",
            Self::Usage => "usage",
            Self::OneOff => "one_off",
        }
    }
}

/// A line of a ledger invoice, as the reconciliation reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLine {
    /// Its class.
    pub class: LineClass,
    /// The fee's kind (`subscription`, `charge`, …).
    pub kind: String,
    /// Plan code (flat fees) or metric code.
    pub code: String,
    /// Shown on the invoice.
    pub name: String,
    /// The plan.
    pub plan_code: String,
    /// Its version.
    pub plan_version: u32,
    /// The charge (usage lines).
    pub charge_lago_id: Option<Uuid>,
    /// First day of its window (customer's time zone).
    pub from_date: NaiveDate,
    /// Last day of its window.
    pub to_date: NaiveDate,
    /// Flat fees: days billed and days in the full period.
    pub days: Option<(i64, i64)>,
    /// Units (usage: as aggregated; flat fees: days).
    pub units: Decimal,
    /// Usage events counted.
    pub events_count: i64,
    /// The unrounded amount.
    pub precise_amount: Decimal,
    /// Rounded once, minor units.
    pub amount_cents: i64,
    /// Its tax, minor units.
    pub taxes_cents: i64,
}

/// A ledger invoice, as the reconciliation reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerInvoice {
    /// Its id.
    pub lago_id: Uuid,
    /// Its number.
    pub number: String,
    /// Shadow or live.
    pub shadow: bool,
    /// Its issuing instant.
    pub issued_at: DateTime<Utc>,
    /// First day of the window it bills.
    pub from_date: NaiveDate,
    /// Last day of that window.
    pub to_date: NaiveDate,
    /// Fees, minor units.
    pub fees_cents: i64,
    /// Taxes, minor units.
    pub taxes_cents: i64,
    /// Total, minor units.
    pub total_cents: i64,
    /// The tax rates applied (code, percent).
    pub tax_rates: Vec<(String, Decimal)>,
    /// Its lines.
    pub lines: Vec<LedgerLine>,
}

fn local_date(at: DateTime<Utc>, tz: Tz) -> NaiveDate {
    at.with_timezone(&tz).date_naive()
}

/// The window a ledger invoice bills: its usage window, else its flat fee's,
/// else its issuing instant.
fn billed_window(header: &InvoiceHeader) -> (DateTime<Utc>, DateTime<Utc>) {
    header
        .charges_window
        .or(header.subscription_window)
        .map_or((header.issued_at, header.issued_at), |w| (w.start, w.end))
}

/// The period of a ledger invoice (see the module documentation).
pub fn ledger_period(header: &InvoiceHeader, tz: Tz) -> String {
    let start = header
        .charges_window
        .map_or(header.issued_at, |window| window.start);
    period_of(local_date(start, tz))
}

/// The last day of a window ending (exclusively) at `end`.
fn last_day(start: DateTime<Utc>, end: DateTime<Utc>, tz: Tz) -> NaiveDate {
    if end <= start {
        local_date(start, tz)
    } else {
        local_date(end - Duration::microseconds(1), tz)
    }
}

fn ledger_line(fee: &Fee, tz: Tz) -> LedgerLine {
    LedgerLine {
        class: LineClass::of_fee(fee.kind),
        kind: fee.kind.as_str().to_string(),
        code: fee.code.clone(),
        name: fee.name.clone(),
        plan_code: fee.plan_code.clone(),
        plan_version: fee.plan_version,
        charge_lago_id: fee.charge_lago_id,
        from_date: local_date(fee.from, tz),
        to_date: last_day(fee.from, fee.to, tz),
        days: fee.proration.map(|p| (p.days, p.period_days)),
        units: fee.units,
        events_count: fee.events_count,
        precise_amount: fee.precise_amount,
        amount_cents: fee.amount_cents,
        taxes_cents: fee.taxes_amount_cents,
    }
}

/// A finalized ledger invoice as the reconciliation reads it.
pub fn ledger_invoice(
    header: &InvoiceHeader,
    finalization: &InvoiceFinalization,
    tz: Tz,
) -> LedgerInvoice {
    ledger_invoice_of(
        header,
        &finalization.number,
        &finalization.fees,
        &finalization.taxes,
        tz,
    )
}

/// A ledger invoice from its header and lines (a recomputed invoice too).
pub fn ledger_invoice_of(
    header: &InvoiceHeader,
    number: &str,
    fees: &[Fee],
    taxes: &[AppliedTax],
    tz: Tz,
) -> LedgerInvoice {
    let (start, end) = billed_window(header);
    let lines: Vec<LedgerLine> = fees.iter().map(|fee| ledger_line(fee, tz)).collect();
    let fees_cents = lines
        .iter()
        .map(|l| l.amount_cents)
        .fold(0i64, i64::saturating_add);
    let taxes_cents = lines
        .iter()
        .map(|l| l.taxes_cents)
        .fold(0i64, i64::saturating_add);
    LedgerInvoice {
        lago_id: header.lago_id,
        number: number.to_string(),
        shadow: header.shadow,
        issued_at: header.issued_at,
        from_date: local_date(start, tz),
        to_date: last_day(start, end, tz),
        fees_cents,
        taxes_cents,
        total_cents: fees_cents.saturating_add(taxes_cents),
        tax_rates: taxes.iter().map(|t| (t.code.clone(), t.rate)).collect(),
        lines,
    }
}

/// A line of a source invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLine {
    /// Its class.
    pub class: LineClass,
    /// The source's kind.
    pub kind: String,
    /// Its text.
    pub description: String,
    /// Units.
    pub units: Decimal,
    /// Price per unit.
    pub unit_amount: Decimal,
    /// Amount, minor units.
    pub amount_cents: i64,
}

/// A source invoice, as the reconciliation reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInvoice {
    /// The source's id of the record.
    pub source_id: String,
    /// The source's number.
    pub number: String,
    /// Its status at the source.
    pub status: String,
    /// Whether it is compared (drafts and void invoices are not billing).
    pub counted: bool,
    /// First day billed.
    pub from_date: Option<NaiveDate>,
    /// Last day billed.
    pub to_date: Option<NaiveDate>,
    /// Fees, minor units.
    pub fees_cents: i64,
    /// Taxes, minor units.
    pub taxes_cents: i64,
    /// Total, minor units.
    pub total_cents: i64,
    /// Its lines.
    pub lines: Vec<SourceLine>,
}

/// An imported external invoice as the reconciliation reads it.
pub fn source_invoice(source_id: &str, invoice: &ExternalInvoice) -> SourceInvoice {
    SourceInvoice {
        source_id: source_id.to_string(),
        number: invoice.number.clone(),
        status: invoice.status.clone(),
        counted: !matches!(invoice.status.as_str(), "draft" | "void"),
        from_date: invoice.from_date,
        to_date: invoice.to_date,
        fees_cents: invoice.fees_amount_cents,
        taxes_cents: invoice.taxes_amount_cents,
        total_cents: invoice.total_amount_cents,
        lines: invoice
            .lines
            .iter()
            .map(|line| SourceLine {
                class: LineClass::of_source_kind(&line.kind),
                kind: line.kind.clone(),
                description: line.description.clone(),
                units: line.units,
                unit_amount: line.unit_amount,
                amount_cents: line.amount_cents,
            })
            .collect(),
    }
}

/// The period of a source invoice: the month of its first billed day
/// (`None`: undated).
pub fn source_period(invoice: &ExternalInvoice) -> Option<String> {
    invoice.from_date.map(period_of)
}

/// A row's status (before a reader's tolerance and acceptances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowStatus {
    /// Both sides agree to the cent.
    Match,
    /// Both sides billed the same window, for different amounts.
    Delta,
    /// The source invoiced it; the ledger did not.
    MissingInLedger,
    /// The ledger invoiced it; the source did not.
    MissingInSource,
    /// The two sides' windows do not line up.
    PeriodMismatch,
}

impl RowStatus {
    /// Every status, in the order summaries list them.
    pub const ALL: [RowStatus; 5] = [
        Self::Match,
        Self::Delta,
        Self::MissingInLedger,
        Self::MissingInSource,
        Self::PeriodMismatch,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Delta => "delta",
            Self::MissingInLedger => "missing_in_ledger",
            Self::MissingInSource => "missing_in_source",
            Self::PeriodMismatch => "period_mismatch",
        }
    }

    /// From its name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A side's sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Amounts {
    /// Fees.
    pub fees_cents: i64,
    /// Taxes.
    pub taxes_cents: i64,
    /// Total.
    pub total_cents: i64,
}

/// A row's comparison of its two sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// Its status.
    pub status: RowStatus,
    /// The ledger's sums.
    pub ledger: Amounts,
    /// The source's sums.
    pub source: Amounts,
    /// Ledger total − source total.
    pub delta_cents: i64,
    /// The days the ledger's invoices bill (first, last).
    pub ledger_window: Option<(NaiveDate, NaiveDate)>,
    /// The days the source's invoices bill (first, last).
    pub source_window: Option<(NaiveDate, NaiveDate)>,
}

fn window(days: impl Iterator<Item = (NaiveDate, NaiveDate)>) -> Option<(NaiveDate, NaiveDate)> {
    days.fold(None, |acc, (from, to)| match acc {
        None => Some((from, to)),
        Some((a, b)) => Some((a.min(from), b.max(to))),
    })
}

/// Whether two windows bill the same period: they end on the same day, or
/// both lie inside the period's month (a partial first or last month).
fn line_up(period: &str, ledger: (NaiveDate, NaiveDate), source: (NaiveDate, NaiveDate)) -> bool {
    if ledger.1 == source.1 {
        return true;
    }
    period_days(period).is_some_and(|(first, last)| {
        [ledger, source]
            .iter()
            .all(|(from, to)| *from >= first && *to <= last)
    })
}

/// A row's invoices in one order, whatever order they were met or read in:
/// the ledger's by issue (then id), the source's by their id.
pub fn put_in_row_order(ledger: &mut [LedgerInvoice], source: &mut [SourceInvoice]) {
    ledger.sort_by_key(|a| (a.issued_at, a.lago_id));
    source.sort_by(|a, b| a.source_id.cmp(&b.source_id));
}

/// Compare a row's sides (the source's uncounted invoices are ignored);
/// `None` when neither side has anything counted.
pub fn compare(
    period: &str,
    ledger: &[LedgerInvoice],
    source: &[SourceInvoice],
) -> Option<Comparison> {
    let source: Vec<&SourceInvoice> = source.iter().filter(|s| s.counted).collect();
    if ledger.is_empty() && source.is_empty() {
        return None;
    }
    let sum = |values: &mut dyn Iterator<Item = i64>| values.fold(0i64, i64::saturating_add);
    let ledger_amounts = Amounts {
        fees_cents: sum(&mut ledger.iter().map(|i| i.fees_cents)),
        taxes_cents: sum(&mut ledger.iter().map(|i| i.taxes_cents)),
        total_cents: sum(&mut ledger.iter().map(|i| i.total_cents)),
    };
    let source_amounts = Amounts {
        fees_cents: sum(&mut source.iter().map(|i| i.fees_cents)),
        taxes_cents: sum(&mut source.iter().map(|i| i.taxes_cents)),
        total_cents: sum(&mut source.iter().map(|i| i.total_cents)),
    };
    let ledger_window = window(ledger.iter().map(|i| (i.from_date, i.to_date)));
    let source_window = window(
        source
            .iter()
            .filter_map(|i| Some((i.from_date?, i.to_date.or(i.from_date)?))),
    );
    let delta_cents = ledger_amounts
        .total_cents
        .saturating_sub(source_amounts.total_cents);
    let status = match (ledger.is_empty(), source.is_empty()) {
        (true, _) => RowStatus::MissingInLedger,
        (_, true) => RowStatus::MissingInSource,
        _ => match (ledger_window, source_window) {
            (Some(l), Some(s)) if !line_up(period, l, s) => RowStatus::PeriodMismatch,
            _ if delta_cents == 0 => RowStatus::Match,
            _ => RowStatus::Delta,
        },
    };
    Some(Comparison {
        status,
        ledger: ledger_amounts,
        source: source_amounts,
        delta_cents,
        ledger_window,
        source_window,
    })
}

/// What a delta is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    /// The flat fee differs (e.g. one side prorated).
    FlatFee,
    /// Usage differs, in units or in price per unit.
    Usage,
    /// The tax rate differs.
    Tax,
    /// Rounding differs (e.g. the source rounds once on the total).
    Rounding,
    /// Lines of other kinds on one side.
    OneOff,
}

impl CauseKind {
    /// Every cause, in the order summaries list them.
    pub const ALL: [CauseKind; 5] = [
        Self::FlatFee,
        Self::Usage,
        Self::Tax,
        Self::Rounding,
        Self::OneOff,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FlatFee => "flat_fee",
            Self::Usage => "usage",
            Self::Tax => "tax",
            Self::Rounding => "rounding",
            Self::OneOff => "one_off",
        }
    }
}

/// One part of a delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// What.
    pub cause: CauseKind,
    /// Its share of the delta (ledger − source), minor units.
    pub amount_cents: i64,
    /// In words.
    pub explanation: String,
    /// Both sides' figures.
    pub detail: Value,
}

/// A ledger usage line in the terms of its price: the units the price
/// applies to and the price per unit (e.g. core-hours beyond the quota at
/// $0.0075), as the plan's charge defines them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitPrice {
    /// Units the price applies to.
    pub billed_units: Decimal,
    /// Price per unit.
    pub rate: Decimal,
}

fn text(decimal: Decimal) -> String {
    decimal.normalize().to_string()
}

/// Minor units as an amount with two decimals (`-9.70`).
pub fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", (cents / 100).abs(), (cents % 100).abs())
}

fn days_inclusive(from: NaiveDate, to: NaiveDate) -> i64 {
    (to - from).num_days() + 1
}

/// Split the delta of a row whose both sides are present into its causes
/// (see the module documentation); their amounts add up to the delta.
/// `price_of` gives a ledger usage line's units and rate as its charge
/// prices them (`None`: the line's own amount per unit is shown).
pub fn causes(
    ledger: &[LedgerInvoice],
    source: &[SourceInvoice],
    price_of: &dyn Fn(&LedgerLine) -> Option<UnitPrice>,
) -> Vec<Cause> {
    let source: Vec<&SourceInvoice> = source.iter().filter(|s| s.counted).collect();
    if ledger.is_empty() || source.is_empty() {
        return vec![];
    }
    let rates: Vec<Decimal> = ledger
        .iter()
        .find(|i| !i.tax_rates.is_empty())
        .map(|i| i.tax_rates.iter().map(|(_, r)| *r).collect())
        .unwrap_or_default();
    let ledger_tax_on = |cents: i64| tax_minor_units(cents, &rates).unwrap_or(0);
    let ledger_lines: Vec<&LedgerLine> = ledger.iter().flat_map(|i| &i.lines).collect();
    let source_lines: Vec<(&SourceInvoice, &SourceLine)> = source
        .iter()
        .flat_map(|i| i.lines.iter().map(move |l| (*i, l)))
        .collect();
    let mut found = Vec::new();
    for class in [LineClass::FlatFee, LineClass::Usage, LineClass::OneOff] {
        let ours: Vec<&LedgerLine> = ledger_lines
            .iter()
            .copied()
            .filter(|l| l.class == class)
            .collect();
        let theirs: Vec<(&SourceInvoice, &SourceLine)> = source_lines
            .iter()
            .copied()
            .filter(|(_, l)| l.class == class)
            .collect();
        let ledger_cents: i64 = ours.iter().map(|l| l.amount_cents + l.taxes_cents).sum();
        let source_fees: i64 = theirs.iter().map(|(_, l)| l.amount_cents).sum();
        let source_cents: i64 = source_fees
            + theirs
                .iter()
                .map(|(_, l)| ledger_tax_on(l.amount_cents))
                .sum::<i64>();
        let amount = ledger_cents - source_cents;
        if amount == 0 {
            continue;
        }
        let ledger_fees: i64 = ours.iter().map(|l| l.amount_cents).sum();
        found.push(match class {
            LineClass::FlatFee => flat_fee_cause(amount, &ours, &theirs, ledger_fees, source_fees),
            LineClass::Usage => usage_cause(amount, &ours, &theirs, ledger_fees, source_fees, price_of),
            LineClass::OneOff => Cause {
                cause: CauseKind::OneOff,
                amount_cents: amount,
                explanation: format!(
                    "one-off lines: the ledger {} ({} line(s)), the source {} ({} line(s))",
                    format_cents(ledger_fees),
                    ours.len(),
                    format_cents(source_fees),
                    theirs.len()
                ),
                detail: json!({
                    "source_lines": theirs.iter().map(|(_, l)| json!({
                        "kind": l.kind, "description": l.description, "amount_cents": l.amount_cents,
                    })).collect::<Vec<_>>(),
                }),
            },
        });
    }
    // The source's own arithmetic against its lines.
    let source_fees: i64 = source.iter().map(|i| i.fees_cents).sum();
    let source_taxes: i64 = source.iter().map(|i| i.taxes_cents).sum();
    let lines_sum: i64 = source_lines.iter().map(|(_, l)| l.amount_cents).sum();
    let ledger_rule_tax: i64 = source_lines
        .iter()
        .map(|(_, l)| ledger_tax_on(l.amount_cents))
        .sum();
    let once_on_total: i64 = source.iter().map(|i| ledger_tax_on(i.fees_cents)).sum();
    let lines_vs_total = lines_sum - source_fees;
    let tax_vs_rule = ledger_rule_tax - source_taxes;
    let rate_percent: Decimal = rates.iter().copied().sum();
    let (rounding_tax, rate_tax) = if source_taxes == once_on_total {
        (tax_vs_rule, 0)
    } else {
        (0, tax_vs_rule)
    };
    if rate_tax != 0 {
        let effective = if source_fees == 0 {
            Decimal::ZERO
        } else {
            (Decimal::from(source_taxes) * Decimal::ONE_HUNDRED / Decimal::from(source_fees))
                .round_dp(4)
        };
        found.push(Cause {
            cause: CauseKind::Tax,
            amount_cents: rate_tax,
            explanation: format!(
                "tax rate: the ledger {}%, the source {}% ({} tax on {})",
                text(rate_percent),
                text(effective),
                format_cents(source_taxes),
                format_cents(source_fees)
            ),
            detail: json!({
                "ledger_rate_percent": text(rate_percent),
                "source_rate_percent": text(effective),
                "source_taxes_cents": source_taxes,
                "ledger_rule_on_source_lines_cents": ledger_rule_tax,
            }),
        });
    }
    let rounding = lines_vs_total + rounding_tax;
    if rounding != 0 {
        let mut parts = Vec::new();
        if lines_vs_total != 0 {
            parts.push(format!(
                "the source's lines add up to {} but its fees total {}",
                format_cents(lines_sum),
                format_cents(source_fees)
            ));
        }
        if rounding_tax != 0 {
            parts.push(format!(
                "the source rounds tax once on the total ({}), the ledger on each line ({})",
                format_cents(source_taxes),
                format_cents(ledger_rule_tax)
            ));
        }
        found.push(Cause {
            cause: CauseKind::Rounding,
            amount_cents: rounding,
            explanation: format!("rounding: {}", parts.join("; ")),
            detail: json!({
                "source_lines_cents": lines_sum,
                "source_fees_cents": source_fees,
                "source_taxes_cents": source_taxes,
                "tax_on_each_line_cents": ledger_rule_tax,
                "tax_once_on_total_cents": once_on_total,
            }),
        });
    }
    found
}

fn flat_fee_cause(
    amount: i64,
    ours: &[&LedgerLine],
    theirs: &[(&SourceInvoice, &SourceLine)],
    ledger_fees: i64,
    source_fees: i64,
) -> Cause {
    let ledger_days: Vec<Value> = ours
        .iter()
        .map(|l| {
            json!({
                "from": l.from_date, "to": l.to_date,
                "days": l.days.map(|d| d.0), "period_days": l.days.map(|d| d.1),
                "amount_cents": l.amount_cents,
            })
        })
        .collect();
    let source_days: Vec<Value> = theirs
        .iter()
        .map(|(i, l)| {
            let days = match (i.from_date, i.to_date) {
                (Some(from), Some(to)) => Some(days_inclusive(from, to)),
                _ => None,
            };
            json!({"from": i.from_date, "to": i.to_date, "days": days,
                   "units": text(l.units), "unit_amount": text(l.unit_amount),
                   "amount_cents": l.amount_cents})
        })
        .collect();
    let ours_text: Vec<String> = ours
        .iter()
        .map(|l| match l.days {
            Some((days, period_days)) if days != period_days => format!(
                "{} – {} ({days} of {period_days} days, prorated)",
                l.from_date, l.to_date
            ),
            _ => format!("{} – {}", l.from_date, l.to_date),
        })
        .collect();
    let theirs_text: Vec<String> = theirs
        .iter()
        .map(|(i, _)| match (i.from_date, i.to_date) {
            (Some(from), Some(to)) => format!("{from} – {to} ({} days)", days_inclusive(from, to)),
            _ => "undated".to_string(),
        })
        .collect();
    let or_none = |v: Vec<String>| {
        if v.is_empty() {
            "nothing".to_string()
        } else {
            v.join(", ")
        }
    };
    Cause {
        cause: CauseKind::FlatFee,
        amount_cents: amount,
        explanation: format!(
            "flat fee: the ledger billed {} for {}, the source {} for {}",
            format_cents(ledger_fees),
            or_none(ours_text),
            format_cents(source_fees),
            or_none(theirs_text)
        ),
        detail: json!({"ledger": ledger_days, "source": source_days}),
    }
}

fn usage_cause(
    amount: i64,
    ours: &[&LedgerLine],
    theirs: &[(&SourceInvoice, &SourceLine)],
    ledger_fees: i64,
    source_fees: i64,
    price_of: &dyn Fn(&LedgerLine) -> Option<UnitPrice>,
) -> Cause {
    let priced: Vec<UnitPrice> = ours
        .iter()
        .map(|l| {
            price_of(l).unwrap_or_else(|| UnitPrice {
                billed_units: l.units,
                rate: if l.units.is_zero() {
                    Decimal::ZERO
                } else {
                    (l.precise_amount / l.units).round_dp(6)
                },
            })
        })
        .collect();
    let ledger_units: Decimal = priced.iter().map(|p| p.billed_units).sum();
    let source_units: Decimal = theirs.iter().map(|(_, l)| l.units).sum();
    let ledger_rates: Vec<Decimal> = dedup(priced.iter().map(|p| p.rate.normalize()));
    let source_rates: Vec<Decimal> = dedup(theirs.iter().map(|(_, l)| l.unit_amount.normalize()));
    // The source's units are compared at the precision it states them in.
    let scale = theirs
        .iter()
        .map(|(_, l)| l.units.scale())
        .max()
        .unwrap_or(0);
    let units_differ = ledger_units.round_dp(scale) != source_units.round_dp(scale);
    let rates_differ = ledger_rates != source_rates;
    let mut differs = Vec::new();
    if units_differ {
        differs.push("units");
    }
    if rates_differ {
        differs.push("price per unit");
    }
    let rates_text = |rates: &[Decimal]| {
        rates
            .iter()
            .map(|r| text(*r))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    Cause {
        cause: CauseKind::Usage,
        amount_cents: amount,
        explanation: format!(
            "usage differs in {}: the ledger {} units at {} = {}, the source {} units at {} = {}",
            if differs.is_empty() {
                "rounding of its lines".to_string()
            } else {
                differs.join(" and ")
            },
            text(ledger_units.round_dp(scale.max(4))),
            rates_text(&ledger_rates),
            format_cents(ledger_fees),
            text(source_units),
            rates_text(&source_rates),
            format_cents(source_fees)
        ),
        detail: json!({
            "differs": differs,
            "ledger": {"units": text(ledger_units), "rates": ledger_rates.iter().map(|r| text(*r)).collect::<Vec<_>>(),
                       "amount_cents": ledger_fees,
                       "events": ours.iter().map(|l| l.events_count).sum::<i64>()},
            "source": {"units": text(source_units), "rates": source_rates.iter().map(|r| text(*r)).collect::<Vec<_>>(),
                       "amount_cents": source_fees},
        }),
    }
}

fn dedup(values: impl Iterator<Item = Decimal>) -> Vec<Decimal> {
    let mut out: Vec<Decimal> = Vec::new();
    for value in values {
        if !out.contains(&value) {
            out.push(value);
        }
    }
    out.sort();
    out
}

/// What keeps a subscription from flipping, given its rows newest first as
/// (period, resolved: match or accepted, status as shown): fewer than
/// `cycles` rows, a gap between the latest `cycles` periods, or one of them
/// unresolved. Empty: it may flip.
pub fn flip_blockers(rows: &[(String, bool, String)], cycles: usize) -> Vec<String> {
    let mut blockers = Vec::new();
    if rows.len() < cycles {
        blockers.push(format!(
            "{} reconciled period(s), {cycles} needed",
            rows.len()
        ));
    }
    let latest = &rows[..rows.len().min(cycles)];
    for pair in latest.windows(2) {
        if next_period(&pair[1].0).as_deref() != Some(pair[0].0.as_str()) {
            blockers.push(format!(
                "periods {} and {} are not consecutive",
                pair[1].0, pair[0].0
            ));
        }
    }
    for (period, resolved, status) in latest {
        if !resolved {
            blockers.push(format!("{period}: {status}"));
        }
    }
    blockers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::d;

    fn date(text: &str) -> NaiveDate {
        text.parse().unwrap()
    }

    fn ledger(lines: Vec<LedgerLine>, from: &str, to: &str) -> LedgerInvoice {
        let fees: i64 = lines.iter().map(|l| l.amount_cents).sum();
        let taxes: i64 = lines.iter().map(|l| l.taxes_cents).sum();
        LedgerInvoice {
            lago_id: Uuid::nil(),
            number: "SHADOW-NEXACLOUD-000001".into(),
            shadow: true,
            issued_at: "2026-11-01T04:00:00Z".parse().unwrap(),
            from_date: date(from),
            to_date: date(to),
            fees_cents: fees,
            taxes_cents: taxes,
            total_cents: fees + taxes,
            tax_rates: vec![("hst_on".into(), d("13"))],
            lines,
        }
    }

    fn line(class: LineClass, cents: i64, tax: i64) -> LedgerLine {
        LedgerLine {
            class,
            kind: if class == LineClass::FlatFee {
                "subscription"
            } else {
                "charge"
            }
            .into(),
            code: "starter".into(),
            name: "Starter".into(),
            plan_code: "starter".into(),
            plan_version: 1,
            charge_lago_id: None,
            from_date: date("2026-10-01"),
            to_date: date("2026-10-31"),
            days: (class == LineClass::FlatFee).then_some((31, 31)),
            units: d("1"),
            events_count: 0,
            precise_amount: Decimal::from(cents) / Decimal::ONE_HUNDRED,
            amount_cents: cents,
            taxes_cents: tax,
        }
    }

    fn source(
        lines: Vec<(&str, &str, &str, i64)>,
        taxes: i64,
        from: &str,
        to: &str,
    ) -> SourceInvoice {
        let fees: i64 = lines.iter().map(|l| l.3).sum();
        SourceInvoice {
            source_id: "inv_1".into(),
            number: "NC-1".into(),
            status: "paid".into(),
            counted: true,
            from_date: Some(date(from)),
            to_date: Some(date(to)),
            fees_cents: fees,
            taxes_cents: taxes,
            total_cents: fees + taxes,
            lines: lines
                .into_iter()
                .map(|(kind, units, rate, cents)| SourceLine {
                    class: LineClass::of_source_kind(kind),
                    kind: kind.into(),
                    description: kind.into(),
                    units: d(units),
                    unit_amount: d(rate),
                    amount_cents: cents,
                })
                .collect(),
        }
    }

    #[test]
    fn periods_are_months_and_anything_else_is_refused() {
        assert_eq!(parse_period("2026-10"), Some((2026, 10)));
        for bad in [
            "2026-13",
            "2026-1",
            "26-10",
            "2026/10",
            "2026-10-01",
            "",
            "abcd-ef",
        ] {
            assert_eq!(parse_period(bad), None, "{bad}");
        }
        assert_eq!(
            period_days("2026-02"),
            Some((date("2026-02-01"), date("2026-02-28")))
        );
        assert_eq!(next_period("2026-12").as_deref(), Some("2027-01"));
    }

    #[test]
    fn equal_totals_over_the_same_window_match() {
        // Starter $19.00 + 13% = $21.47 on both sides.
        let l = ledger(
            vec![line(LineClass::FlatFee, 1900, 247)],
            "2026-10-01",
            "2026-10-31",
        );
        let s = source(
            vec![("plan", "1", "19", 1900)],
            247,
            "2026-10-01",
            "2026-10-31",
        );
        let c = compare(
            "2026-10",
            std::slice::from_ref(&l),
            std::slice::from_ref(&s),
        )
        .unwrap();
        assert_eq!(c.status, RowStatus::Match);
        assert_eq!(
            (c.ledger.total_cents, c.source.total_cents, c.delta_cents),
            (2147, 2147, 0)
        );
        assert!(causes(&[l], &[s], &|_| None).is_empty());
    }

    #[test]
    fn a_full_month_against_a_prorated_one_is_a_flat_fee_delta_with_its_tax() {
        // Started 15 October: 17 of 31 days of $19.00 = $10.419… → $10.42,
        // tax $1.35 (1042 × 13% = 135.46); the source billed $19.00 + $2.47.
        let mut prorated = line(LineClass::FlatFee, 1042, 135);
        prorated.from_date = date("2026-10-15");
        prorated.days = Some((17, 31));
        let l = ledger(vec![prorated], "2026-10-15", "2026-10-31");
        let s = source(
            vec![("plan", "1", "19", 1900)],
            247,
            "2026-10-01",
            "2026-10-31",
        );
        let c = compare(
            "2026-10",
            std::slice::from_ref(&l),
            std::slice::from_ref(&s),
        )
        .unwrap();
        assert_eq!((c.status, c.delta_cents), (RowStatus::Delta, 1177 - 2147));
        let found = causes(&[l], &[s], &|_| None);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].cause, found[0].amount_cents),
            (CauseKind::FlatFee, -970)
        );
        assert_eq!(
            found[0].explanation,
            "flat fee: the ledger billed 10.42 for 2026-10-15 – 2026-10-31 (17 of 31 days, prorated), \
             the source 19.00 for 2026-10-01 – 2026-10-31 (31 days)"
        );
    }

    #[test]
    fn a_different_price_per_unit_is_a_usage_delta_showing_both_rates() {
        // 106.6667 core-hours: the ledger at $0.0075 = $0.80 (+ $0.10 tax),
        // the source at $0.006 = $0.64 (+ $0.08).
        let l = ledger(
            vec![line(LineClass::Usage, 80, 10)],
            "2026-10-01",
            "2026-10-31",
        );
        let s = source(
            vec![("usage", "106.6667", "0.006", 64)],
            8,
            "2026-10-01",
            "2026-10-31",
        );
        let price = |_: &LedgerLine| {
            Some(UnitPrice {
                billed_units: d("384000") / d("3600"),
                rate: d("0.0075"),
            })
        };
        let found = causes(&[l], &[s], &price);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].cause, found[0].amount_cents),
            (CauseKind::Usage, 18)
        );
        assert_eq!(found[0].detail["differs"], json!(["price per unit"]));
        assert_eq!(found[0].detail["ledger"]["rates"], json!(["0.0075"]));
        assert_eq!(found[0].detail["source"]["rates"], json!(["0.006"]));
    }

    #[test]
    fn tax_rounded_once_on_the_total_is_rounding_and_another_rate_is_tax() {
        // Two lines of $0.05 at 13%: 1 + 1 cents per line, 1 cent on $0.10.
        let l = ledger(
            vec![line(LineClass::FlatFee, 5, 1), line(LineClass::Usage, 5, 1)],
            "2026-10-01",
            "2026-10-31",
        );
        let s = source(
            vec![("plan", "1", "0.05", 5), ("usage", "1", "0.05", 5)],
            1,
            "2026-10-01",
            "2026-10-31",
        );
        let found = causes(std::slice::from_ref(&l), &[s], &|_| None);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].cause, found[0].amount_cents),
            (CauseKind::Rounding, 1)
        );
        // At 5% the source taxes $19.00 with $0.95, the ledger's 13% $2.47.
        let l = ledger(
            vec![line(LineClass::FlatFee, 1900, 247)],
            "2026-10-01",
            "2026-10-31",
        );
        let s = source(
            vec![("plan", "1", "19", 1900)],
            95,
            "2026-10-01",
            "2026-10-31",
        );
        let found = causes(&[l], &[s], &|_| None);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].cause, found[0].amount_cents),
            (CauseKind::Tax, 152)
        );
        assert_eq!(found[0].detail["source_rate_percent"], "5");
    }

    #[test]
    fn causes_add_up_to_the_delta() {
        let l = ledger(
            vec![
                line(LineClass::FlatFee, 1042, 135),
                line(LineClass::Usage, 80, 10),
            ],
            "2026-10-01",
            "2026-10-31",
        );
        let s = source(
            vec![
                ("plan", "1", "19", 1900),
                ("usage", "106.6667", "0.006", 64),
                ("fee", "1", "25", 2500),
            ],
            600,
            "2026-10-01",
            "2026-10-31",
        );
        let c = compare(
            "2026-10",
            std::slice::from_ref(&l),
            std::slice::from_ref(&s),
        )
        .unwrap();
        let found = causes(&[l], &[s], &|_| None);
        assert_eq!(
            found.iter().map(|c| c.amount_cents).sum::<i64>(),
            c.delta_cents
        );
        let kinds: Vec<CauseKind> = found.iter().map(|c| c.cause).collect();
        assert_eq!(
            kinds,
            vec![
                CauseKind::FlatFee,
                CauseKind::Usage,
                CauseKind::OneOff,
                CauseKind::Tax
            ]
        );
    }

    #[test]
    fn missing_sides_and_windows_that_do_not_line_up() {
        let l = ledger(
            vec![line(LineClass::FlatFee, 1900, 247)],
            "2026-10-01",
            "2026-10-31",
        );
        let s = source(
            vec![("plan", "1", "19", 1900)],
            247,
            "2026-10-05",
            "2026-11-04",
        );
        assert_eq!(
            compare("2026-10", std::slice::from_ref(&l), &[])
                .unwrap()
                .status,
            RowStatus::MissingInSource
        );
        assert_eq!(
            compare("2026-10", &[], std::slice::from_ref(&s))
                .unwrap()
                .status,
            RowStatus::MissingInLedger
        );
        let c = compare("2026-10", &[l], std::slice::from_ref(&s)).unwrap();
        assert_eq!(c.status, RowStatus::PeriodMismatch);
        assert_eq!(
            c.source_window,
            Some((date("2026-10-05"), date("2026-11-04")))
        );
        let void = SourceInvoice {
            counted: false,
            ..s
        };
        assert_eq!(compare("2026-10", &[], &[void]), None);
    }

    #[test]
    fn a_flip_needs_the_latest_consecutive_periods_resolved() {
        let row = |p: &str, ok: bool| {
            (
                p.to_string(),
                ok,
                if ok { "match" } else { "delta" }.to_string(),
            )
        };
        assert!(flip_blockers(&[row("2026-10", true)], 1).is_empty());
        assert_eq!(
            flip_blockers(&[row("2026-10", true)], 2),
            vec!["1 reconciled period(s), 2 needed"]
        );
        assert_eq!(
            flip_blockers(&[row("2026-10", true), row("2026-08", true)], 2),
            vec!["periods 2026-08 and 2026-10 are not consecutive"]
        );
        assert_eq!(
            flip_blockers(&[row("2026-10", false), row("2026-09", true)], 2),
            vec!["2026-10: delta"]
        );
        assert!(flip_blockers(&[row("2026-10", true), row("2026-09", false)], 1).is_empty());
    }
}
