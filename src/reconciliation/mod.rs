//! Reading the dual-run reconciliation: the `reconciliation` projection's
//! rows of a period with a reader's tolerance, the operators' acceptances
//! and each delta's causes ([`aggregates::reconciliation`]); what-if runs
//! against a recomputed ledger side; the side-by-side explanation; accepting
//! a row. The flip lives in [`flip`].

pub mod flip;

use std::collections::{BTreeMap, HashMap};

use aggregates::charge::Pricing;
use aggregates::plan::PlanDefinition;
use aggregates::reconciliation::{
    causes, compare, format_cents, ledger_invoice_of, parse_period, put_in_row_order,
    reconciliation_stream, Amounts, Cause, CauseKind, LedgerInvoice, LedgerLine, LineClass,
    ReconciliationEvent, RowStatus, SourceInvoice, UnitPrice, RECONCILIATION_STREAM_TYPE,
};
use chrono::{DateTime, NaiveDate, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::store::CommandMetadata;
use crate::invoicing::replay::{replay, PriceBook, ReplayError, ReplayRequest};

/// Why a reconciliation request was not answered: the request's mistakes
/// (→ 4xx, by field) apart from failures.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// `period` is not `YYYY-MM`.
    #[error("period is YYYY-MM, e.g. 2026-10")]
    BadPeriod,
    /// A negative tolerance.
    #[error("tolerance_cents is a whole number of cents, 0 or more")]
    BadTolerance,
    /// No such row.
    #[error("no reconciliation row for {0}")]
    NotFound(String),
    /// The subscription id exists in several services.
    #[error("{0} is reconciled in several services ({1}): name one with --service")]
    Ambiguous(String, String),
    /// The row needs nothing accepted.
    #[error("{0} matches: there is nothing to accept")]
    NothingToAccept(String),
    /// An acceptance needs a reason.
    #[error("reason is mandatory")]
    ReasonMissing,
    /// The what-if replay's request was refused.
    #[error(transparent)]
    Replay(ReplayError),
    /// Storage failed.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ReconcileError {
    fn from(error: sqlx::Error) -> Self {
        ReconcileError::Unexpected(anyhow::Error::new(error).context("database query failed"))
    }
}

impl From<serde_json::Error> for ReconcileError {
    fn from(error: serde_json::Error) -> Self {
        ReconcileError::Unexpected(anyhow::Error::new(error).context("unreadable stored row"))
    }
}

impl From<ReplayError> for ReconcileError {
    fn from(error: ReplayError) -> Self {
        match error {
            ReplayError::Unexpected(e) => ReconcileError::Unexpected(e),
            refused => ReconcileError::Replay(refused),
        }
    }
}

/// What to reconcile.
#[derive(Debug, Clone, Default)]
pub struct ReconcileRequest {
    /// `YYYY-MM`.
    pub period: String,
    /// Only this service.
    pub service: Option<String>,
    /// Only this subscription (external id).
    pub subscription: Option<String>,
    /// A delta of at most this many cents (either way) is a match.
    pub tolerance_cents: i64,
    /// What-if: compare against invoices recomputed with this price book.
    pub pricing: Option<PriceBook>,
}

/// An operator's acceptance of a row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Acceptance {
    /// Why.
    pub reason: String,
    /// Who.
    pub accepted_by: String,
    /// When.
    pub accepted_at: DateTime<Utc>,
    /// The delta accepted.
    pub delta_cents: i64,
    /// The status accepted.
    pub status: String,
}

/// One side of a row, as shown.
#[derive(Debug, Clone, Serialize)]
pub struct SideView {
    /// Fees, minor units.
    pub fees_cents: i64,
    /// Taxes.
    pub taxes_cents: i64,
    /// Total.
    pub total_cents: i64,
    /// First day billed.
    pub from: Option<NaiveDate>,
    /// Last day billed.
    pub to: Option<NaiveDate>,
    /// Its invoices' numbers.
    pub invoices: Vec<String>,
}

/// What a row would be under a what-if price book.
#[derive(Debug, Clone, Serialize)]
pub struct WhatIfRow {
    /// Its status then.
    pub status: String,
    /// Resolved then.
    pub resolved: bool,
    /// The ledger's total then.
    pub ledger_total_cents: i64,
    /// The delta then.
    pub delta_cents: i64,
    /// The causes then.
    pub causes: Vec<Cause>,
}

/// One row of the reconciliation, as shown.
#[derive(Debug, Clone, Serialize)]
pub struct RowView {
    /// The service.
    pub service: String,
    /// The subscription.
    pub external_subscription_id: String,
    /// Its customer.
    pub external_customer_id: String,
    /// `YYYY-MM`.
    pub period: String,
    /// As shown: `match`, `delta`, `missing_in_ledger`, `missing_in_source`,
    /// `period_mismatch` or `accepted`.
    pub status: String,
    /// As the projection compared it (tolerance 0, no acceptance).
    pub recorded_status: RowStatus,
    /// Match or accepted: it does not block a flip.
    pub resolved: bool,
    /// A delta within this tolerance is shown as a match.
    pub matched_within_tolerance_cents: Option<i64>,
    /// The acceptance that resolves it (or one given for another delta).
    pub accepted: Option<Acceptance>,
    /// The ledger's side.
    pub ledger: SideView,
    /// The source's side.
    pub source: SideView,
    /// Ledger total − source total.
    pub delta_cents: i64,
    /// What the delta is made of (adds up to it).
    pub causes: Vec<Cause>,
    /// Under the what-if price book.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what_if: Option<WhatIfRow>,
    #[serde(skip)]
    ledger_invoices: Vec<LedgerInvoice>,
    #[serde(skip)]
    source_invoices: Vec<SourceInvoice>,
}

/// An invoice with no subscription: listed, never compared.
#[derive(Debug, Clone, Serialize)]
pub struct Unattributed {
    /// The service.
    pub service: String,
    /// The customer.
    pub external_customer_id: String,
    /// `YYYY-MM`, or none when the invoice is undated.
    pub period: Option<String>,
    /// `ledger` or `source`.
    pub side: String,
    /// Its number.
    pub number: String,
    /// Fees.
    pub fees_cents: i64,
    /// Taxes.
    pub taxes_cents: i64,
    /// Total.
    pub total_cents: i64,
}

/// Counts and totals.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    /// Rows.
    pub rows: u64,
    /// Rows per shown status (every status listed).
    pub statuses: BTreeMap<String, u64>,
    /// Rows per cause among the rows that do not match.
    pub causes: BTreeMap<String, u64>,
    /// Sum of the ledger's totals.
    pub ledger_total_cents: i64,
    /// Sum of the source's totals.
    pub source_total_cents: i64,
    /// Sum of the deltas.
    pub delta_cents: i64,
    /// Unattributed invoices.
    pub unattributed: u64,
    /// Their totals.
    pub unattributed_total_cents: i64,
}

/// What a what-if price book changes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WhatIfSummary {
    /// Rows it turns into matches.
    pub turns_into_match: Vec<String>,
    /// Rows it breaks (resolved now, not then).
    pub breaks: Vec<String>,
    /// Rows unresolved either way.
    pub still_unresolved: Vec<String>,
}

/// A period's reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    /// `YYYY-MM`.
    pub period: String,
    /// The tolerance applied.
    pub tolerance_cents: i64,
    /// The rows.
    pub rows: Vec<RowView>,
    /// Invoices with no subscription.
    pub unattributed: Vec<Unattributed>,
    /// Counts and totals.
    pub summary: Summary,
    /// Under the what-if price book.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what_if: Option<WhatIfSummary>,
}

impl ReconcileReport {
    /// Every row matches or is accepted.
    pub fn all_resolved(&self) -> bool {
        self.rows.iter().all(|r| r.resolved)
    }
}

/// How a row is shown at `tolerance` with `acceptance`: (status, resolved,
/// matched within tolerance).
pub fn shown_status(
    recorded: RowStatus,
    delta_cents: i64,
    tolerance: i64,
    acceptance: Option<&Acceptance>,
) -> (String, bool, Option<i64>) {
    if recorded == RowStatus::Match {
        return ("match".into(), true, None);
    }
    if recorded == RowStatus::Delta && delta_cents.unsigned_abs() <= tolerance.unsigned_abs() {
        return ("match".into(), true, Some(tolerance));
    }
    if acceptance.is_some_and(|a| a.delta_cents == delta_cents && a.status == recorded.as_str()) {
        return ("accepted".into(), true, None);
    }
    (recorded.as_str().into(), false, None)
}

#[derive(sqlx::FromRow)]
struct StoredRow {
    service_code: String,
    external_subscription_id: String,
    period: String,
    external_customer_id: String,
    status: String,
    delta_cents: i64,
    ledger_fees_cents: i64,
    ledger_taxes_cents: i64,
    ledger_total_cents: i64,
    source_fees_cents: i64,
    source_taxes_cents: i64,
    source_total_cents: i64,
    ledger: Value,
    source: Value,
    accepted_reason: Option<String>,
    accepted_by: Option<String>,
    accepted_at: Option<DateTime<Utc>>,
    accepted_delta_cents: Option<i64>,
    accepted_status: Option<String>,
}

const ROWS_SELECT: &str = "SELECT r.service_code, r.external_subscription_id, r.period, \
    r.external_customer_id, r.status, r.delta_cents, r.ledger_fees_cents, r.ledger_taxes_cents, \
    r.ledger_total_cents, r.source_fees_cents, r.source_taxes_cents, r.source_total_cents, \
    (SELECT coalesce(json_agg(i.invoice::json), '[]') FROM reconciliation_invoices i \
      WHERE i.service_code = r.service_code AND i.external_subscription_id = r.external_subscription_id \
        AND i.period = r.period AND i.side = 'ledger' AND i.counted) AS ledger, \
    (SELECT coalesce(json_agg(i.invoice::json), '[]') FROM reconciliation_invoices i \
      WHERE i.service_code = r.service_code AND i.external_subscription_id = r.external_subscription_id \
        AND i.period = r.period AND i.side = 'source' AND i.counted) AS source, \
    a.reason AS accepted_reason, a.accepted_by, a.accepted_at, \
    a.delta_cents AS accepted_delta_cents, a.status AS accepted_status \
    FROM reconciliation_rows r LEFT JOIN reconciliation_acceptances a \
      ON a.service_code = r.service_code AND a.external_subscription_id = r.external_subscription_id \
     AND a.period = r.period";

/// The plan versions the rows' usage lines were priced on.
struct Plans(HashMap<(String, String, u32), PlanDefinition>);

impl Plans {
    async fn load(pool: &PgPool, rows: &[StoredRow]) -> Result<Plans, ReconcileError> {
        let mut wanted: Vec<(String, String, i32)> = Vec::new();
        for row in rows {
            if row.status == RowStatus::Match.as_str() {
                continue;
            }
            let invoices: Vec<LedgerInvoice> = serde_json::from_value(row.ledger.clone())?;
            for line in invoices.iter().flat_map(|i| &i.lines) {
                let key = (
                    row.service_code.clone(),
                    line.plan_code.clone(),
                    line.plan_version as i32,
                );
                if line.class == LineClass::Usage && !wanted.contains(&key) {
                    wanted.push(key);
                }
            }
        }
        let mut plans = HashMap::new();
        if wanted.is_empty() {
            return Ok(Plans(plans));
        }
        let found: Vec<(String, String, i32, Value)> = sqlx::query_as(
            "SELECT pv.service_code, pv.code, pv.version, pv.definition FROM plan_versions pv \
             JOIN unnest($1::text[], $2::text[], $3::int[]) AS k(s, c, v) \
               ON pv.service_code = k.s AND pv.code = k.c AND pv.version = k.v",
        )
        .bind(wanted.iter().map(|w| w.0.as_str()).collect::<Vec<_>>())
        .bind(wanted.iter().map(|w| w.1.as_str()).collect::<Vec<_>>())
        .bind(wanted.iter().map(|w| w.2).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
        for (service, code, version, definition) in found {
            plans.insert(
                (service, code, version as u32),
                serde_json::from_value(definition)?,
            );
        }
        Ok(Plans(plans))
    }

    /// A usage line in its price's terms (see [`UnitPrice`]).
    fn price_of(&self, service: &str, line: &LedgerLine) -> Option<UnitPrice> {
        let plan = self.0.get(&(
            service.to_string(),
            line.plan_code.clone(),
            line.plan_version,
        ))?;
        let charge = plan
            .charges
            .iter()
            .find(|c| Some(c.lago_id) == line.charge_lago_id)?;
        let paid = |free: Decimal| (line.units - free).max(Decimal::ZERO);
        match &charge.pricing {
            Pricing::Standard {
                amount,
                free_units,
                unit_size,
            } if !unit_size.is_zero() => Some(UnitPrice {
                billed_units: paid(*free_units) / *unit_size,
                rate: *amount,
            }),
            Pricing::Package {
                amount,
                free_units,
                package_size,
            } if !package_size.is_zero() => Some(UnitPrice {
                billed_units: (paid(*free_units) / *package_size).ceil(),
                rate: *amount,
            }),
            _ => None,
        }
    }
}

fn side_view(
    amounts: Amounts,
    window: Option<(NaiveDate, NaiveDate)>,
    numbers: Vec<String>,
) -> SideView {
    SideView {
        fees_cents: amounts.fees_cents,
        taxes_cents: amounts.taxes_cents,
        total_cents: amounts.total_cents,
        from: window.map(|w| w.0),
        to: window.map(|w| w.1),
        invoices: numbers,
    }
}

fn row_view(stored: StoredRow, tolerance: i64, plans: &Plans) -> Result<RowView, ReconcileError> {
    let recorded = RowStatus::parse(&stored.status)
        .ok_or_else(|| anyhow::anyhow!("stored status {}", stored.status))?;
    let mut ledger_invoices: Vec<LedgerInvoice> = serde_json::from_value(stored.ledger)?;
    let mut source_invoices: Vec<SourceInvoice> = serde_json::from_value(stored.source)?;
    put_in_row_order(&mut ledger_invoices, &mut source_invoices);
    let accepted = match (
        stored.accepted_reason,
        stored.accepted_by,
        stored.accepted_at,
        stored.accepted_delta_cents,
        stored.accepted_status,
    ) {
        (Some(reason), Some(accepted_by), Some(accepted_at), Some(delta_cents), Some(status)) => {
            Some(Acceptance {
                reason,
                accepted_by,
                accepted_at,
                delta_cents,
                status,
            })
        }
        _ => None,
    };
    let (status, resolved, within) =
        shown_status(recorded, stored.delta_cents, tolerance, accepted.as_ref());
    let comparison = compare(&stored.period, &ledger_invoices, &source_invoices);
    let service = stored.service_code.clone();
    let found = if recorded == RowStatus::Match {
        vec![]
    } else {
        causes(&ledger_invoices, &source_invoices, &|line| {
            plans.price_of(&service, line)
        })
    };
    let ledger_amounts = Amounts {
        fees_cents: stored.ledger_fees_cents,
        taxes_cents: stored.ledger_taxes_cents,
        total_cents: stored.ledger_total_cents,
    };
    let source_amounts = Amounts {
        fees_cents: stored.source_fees_cents,
        taxes_cents: stored.source_taxes_cents,
        total_cents: stored.source_total_cents,
    };
    Ok(RowView {
        service: stored.service_code,
        external_subscription_id: stored.external_subscription_id,
        external_customer_id: stored.external_customer_id,
        period: stored.period,
        status,
        recorded_status: recorded,
        resolved,
        matched_within_tolerance_cents: within,
        accepted,
        ledger: side_view(
            ledger_amounts,
            comparison.as_ref().and_then(|c| c.ledger_window),
            ledger_invoices.iter().map(|i| i.number.clone()).collect(),
        ),
        source: side_view(
            source_amounts,
            comparison.as_ref().and_then(|c| c.source_window),
            source_invoices
                .iter()
                .filter(|i| i.counted)
                .map(|i| i.number.clone())
                .collect(),
        ),
        delta_cents: stored.delta_cents,
        causes: found,
        what_if: None,
        ledger_invoices,
        source_invoices,
    })
}

async fn stored_rows(
    pool: &PgPool,
    period: Option<&str>,
    service: Option<&str>,
    subscription: Option<&str>,
) -> Result<Vec<StoredRow>, ReconcileError> {
    Ok(sqlx::query_as(&format!(
        "{ROWS_SELECT} WHERE ($1::text IS NULL OR r.period = $1) \
           AND ($2::text IS NULL OR r.service_code = $2) \
           AND ($3::text IS NULL OR r.external_subscription_id = $3) \
         ORDER BY r.service_code, r.external_subscription_id, r.period DESC"
    ))
    .bind(period)
    .bind(service)
    .bind(subscription)
    .fetch_all(pool)
    .await?)
}

/// Rows of a service's subscription, newest period first, as shown at
/// `tolerance` (what the flip decides on).
pub async fn subscription_rows(
    pool: &PgPool,
    service: &str,
    subscription: &str,
    tolerance: i64,
) -> Result<Vec<RowView>, ReconcileError> {
    let stored = stored_rows(pool, None, Some(service), Some(subscription)).await?;
    let plans = Plans::load(pool, &stored).await?;
    stored
        .into_iter()
        .map(|row| row_view(row, tolerance, &plans))
        .collect()
}

/// Reconcile a period (see the module documentation).
pub async fn reconcile(
    pool: &PgPool,
    request: &ReconcileRequest,
) -> Result<ReconcileReport, ReconcileError> {
    parse_period(&request.period).ok_or(ReconcileError::BadPeriod)?;
    if request.tolerance_cents < 0 {
        return Err(ReconcileError::BadTolerance);
    }
    let stored = stored_rows(
        pool,
        Some(&request.period),
        request.service.as_deref(),
        request.subscription.as_deref(),
    )
    .await?;
    let plans = Plans::load(pool, &stored).await?;
    let rows: Vec<RowView> = stored
        .into_iter()
        .map(|row| row_view(row, request.tolerance_cents, &plans))
        .collect::<Result<_, _>>()?;
    let unattributed = if request.subscription.is_some() {
        vec![]
    } else {
        unattributed(pool, &request.period, request.service.as_deref()).await?
    };
    let mut report = ReconcileReport {
        period: request.period.clone(),
        tolerance_cents: request.tolerance_cents,
        summary: summary(&rows, &unattributed),
        rows,
        unattributed,
        what_if: None,
    };
    if let Some(book) = &request.pricing {
        what_if(pool, request, book, &plans, &mut report).await?;
    }
    Ok(report)
}

fn summary(rows: &[RowView], unattributed: &[Unattributed]) -> Summary {
    let mut summary = Summary {
        rows: rows.len() as u64,
        unattributed: unattributed.len() as u64,
        unattributed_total_cents: unattributed.iter().map(|u| u.total_cents).sum(),
        ..Summary::default()
    };
    for status in RowStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .chain(["accepted"])
    {
        summary.statuses.insert(status.to_string(), 0);
    }
    for cause in CauseKind::ALL {
        summary.causes.insert(cause.as_str().to_string(), 0);
    }
    for row in rows {
        *summary.statuses.entry(row.status.clone()).or_default() += 1;
        if row.status != "match" {
            let mut kinds: Vec<CauseKind> = row.causes.iter().map(|c| c.cause).collect();
            kinds.dedup();
            for kind in kinds {
                *summary.causes.entry(kind.as_str().to_string()).or_default() += 1;
            }
        }
        summary.ledger_total_cents += row.ledger.total_cents;
        summary.source_total_cents += row.source.total_cents;
        summary.delta_cents += row.delta_cents;
    }
    summary
}

async fn unattributed(
    pool: &PgPool,
    period: &str,
    service: Option<&str>,
) -> Result<Vec<Unattributed>, ReconcileError> {
    let rows: Vec<(String, String, Option<String>, String, Value)> = sqlx::query_as(
        "SELECT service_code, external_customer_id, period, side, invoice::json FROM reconciliation_invoices \
         WHERE external_subscription_id IS NULL AND counted AND (period = $1 OR period IS NULL) \
           AND ($2::text IS NULL OR service_code = $2) \
         ORDER BY service_code, external_customer_id, side, key",
    )
    .bind(period)
    .bind(service)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(service, customer, period, side, invoice)| {
            let invoice: SourceInvoice = serde_json::from_value(invoice)?;
            Ok(Unattributed {
                service,
                external_customer_id: customer,
                period,
                side,
                number: invoice.number,
                fees_cents: invoice.fees_cents,
                taxes_cents: invoice.taxes_cents,
                total_cents: invoice.total_cents,
            })
        })
        .collect()
}

/// Recompute the ledger side of every row with the price book (a replay:
/// nothing live is touched) and compare again.
async fn what_if(
    pool: &PgPool,
    request: &ReconcileRequest,
    book: &PriceBook,
    plans: &Plans,
    report: &mut ReconcileReport,
) -> Result<(), ReconcileError> {
    let replayed = replay(
        pool,
        &ReplayRequest {
            period: request.period.clone(),
            service: request.service.clone(),
            subscription: request.subscription.clone(),
            as_of: None,
            pricing: Some(book.clone()),
        },
    )
    .await?;
    let by_id: HashMap<Uuid, _> = replayed
        .invoices
        .iter()
        .filter_map(|i| {
            i.replayed
                .as_ref()
                .map(|r| (i.lago_id, (i.number.as_str(), r)))
        })
        .collect();
    let timezones: HashMap<(String, String), String> =
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT service_code, external_customer_id, timezone FROM reconciliation_timezones \
         WHERE $1::text IS NULL OR service_code = $1",
        )
        .bind(request.service.as_deref())
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(s, c, t)| ((s, c), t))
        .collect();
    let mut summary = WhatIfSummary::default();
    for row in &mut report.rows {
        let tz = timezones
            .get(&(row.service.clone(), row.external_customer_id.clone()))
            .and_then(|t| t.parse().ok())
            .unwrap_or(chrono_tz::UTC);
        let ledger: Vec<LedgerInvoice> = row
            .ledger_invoices
            .iter()
            .map(|invoice| match by_id.get(&invoice.lago_id) {
                Some((number, r)) => ledger_invoice_of(&r.header, number, &r.fees, &r.taxes, tz),
                None => invoice.clone(),
            })
            .collect();
        let Some(comparison) = compare(&row.period, &ledger, &row.source_invoices) else {
            continue;
        };
        let (status, resolved, _) = shown_status(
            comparison.status,
            comparison.delta_cents,
            request.tolerance_cents,
            row.accepted.as_ref(),
        );
        let found = if comparison.status == RowStatus::Match {
            vec![]
        } else {
            let service = row.service.clone();
            causes(&ledger, &row.source_invoices, &|line| {
                plans.price_of(&service, line)
            })
        };
        let name = format!("{}/{}", row.service, row.external_subscription_id);
        match (row.resolved, resolved) {
            (false, true) => summary.turns_into_match.push(name),
            (true, false) => summary.breaks.push(name),
            (false, false) => summary.still_unresolved.push(name),
            (true, true) => {}
        }
        row.what_if = Some(WhatIfRow {
            status,
            resolved,
            ledger_total_cents: comparison.ledger.total_cents,
            delta_cents: comparison.delta_cents,
            causes: found,
        });
    }
    report.what_if = Some(summary);
    Ok(())
}

/// The one row of `subscription` in `period` (in `service`, or the only
/// service that has it).
async fn one_row(
    pool: &PgPool,
    service: Option<&str>,
    subscription: &str,
    period: &str,
) -> Result<RowView, ReconcileError> {
    parse_period(period).ok_or(ReconcileError::BadPeriod)?;
    let stored = stored_rows(pool, Some(period), service, Some(subscription)).await?;
    if stored.len() > 1 {
        let services: Vec<&str> = stored.iter().map(|r| r.service_code.as_str()).collect();
        return Err(ReconcileError::Ambiguous(
            subscription.to_string(),
            services.join(", "),
        ));
    }
    let plans = Plans::load(pool, &stored).await?;
    let row = stored
        .into_iter()
        .next()
        .ok_or_else(|| ReconcileError::NotFound(format!("{subscription} in {period}")))?;
    row_view(row, 0, &plans)
}

/// Accept a row's delta with a reason (an event on the row's stream).
pub async fn accept(
    pool: &PgPool,
    service: Option<&str>,
    subscription: &str,
    period: &str,
    reason: &str,
    metadata: CommandMetadata,
) -> Result<RowView, ReconcileError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(ReconcileError::ReasonMissing);
    }
    let row = one_row(pool, service, subscription, period).await?;
    if row.recorded_status == RowStatus::Match {
        return Err(ReconcileError::NothingToAccept(format!(
            "{subscription} in {period}"
        )));
    }
    let stream = reconciliation_stream(&row.service, subscription, period);
    let event = ReconciliationEvent::ReconciliationAccepted {
        status: row.recorded_status,
        delta_cents: row.delta_cents,
        reason: reason.to_string(),
        accepted_by: metadata.actor.to_string(),
        accepted_at: metadata.recorded_at,
    };
    let mut tx = pool.begin().await?;
    let sequence: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(RECONCILIATION_STREAM_TYPE)
    .bind(&stream)
    .fetch_one(&mut *tx)
    .await?;
    append_events(
        &mut tx,
        RECONCILIATION_STREAM_TYPE,
        &[NewEvent {
            stream,
            sequence,
            event_type: event.event_type(),
            payload: serde_json::to_value(&event)?,
        }],
        metadata,
        OnConflict::Fail,
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// Both sides of a row line by line, side by side, with the ledger's
/// arithmetic (each invoice's explanation) beside the source's lines.
pub async fn explain(
    pool: &PgPool,
    service: Option<&str>,
    subscription: &str,
    period: &str,
) -> Result<Value, ReconcileError> {
    let row = one_row(pool, service, subscription, period).await?;
    let mut explanations = Vec::new();
    for invoice in &row.ledger_invoices {
        let explained = crate::invoicing::explain::explain_invoice(pool, invoice.lago_id)
            .await
            .map_err(|e| anyhow::anyhow!("explaining {}: {e}", invoice.number))?;
        explanations.push(explained);
    }
    let classes = [LineClass::FlatFee, LineClass::Usage, LineClass::OneOff];
    let side_by_side: Vec<Value> = classes
        .iter()
        .map(|class| {
            let ledger: Vec<Value> = row
                .ledger_invoices
                .iter()
                .flat_map(|i| i.lines.iter().map(move |l| (i, l)))
                .filter(|(_, l)| l.class == *class)
                .map(|(i, l)| {
                    json!({"invoice": i.number, "name": l.name, "from": l.from_date, "to": l.to_date,
                           "units": l.units.normalize().to_string(), "days": l.days.map(|d| d.0),
                           "amount_cents": l.amount_cents, "taxes_cents": l.taxes_cents})
                })
                .collect();
            let source: Vec<Value> = row
                .source_invoices
                .iter()
                .flat_map(|i| i.lines.iter().map(move |l| (i, l)))
                .filter(|(_, l)| l.class == *class)
                .map(|(i, l)| {
                    json!({"invoice": i.number, "status": i.status, "counted": i.counted,
                           "description": l.description, "from": i.from_date, "to": i.to_date,
                           "units": l.units.normalize().to_string(),
                           "unit_amount": l.unit_amount.normalize().to_string(),
                           "amount_cents": l.amount_cents})
                })
                .collect();
            json!({"class": class.as_str(), "ledger": ledger, "source": source})
        })
        .collect();
    let totals = json!({
        "ledger": {"fees_cents": row.ledger.fees_cents, "taxes_cents": row.ledger.taxes_cents,
                   "total_cents": row.ledger.total_cents},
        "source": {"fees_cents": row.source.fees_cents, "taxes_cents": row.source.taxes_cents,
                   "total_cents": row.source.total_cents},
    });
    Ok(json!({
        "row": row,
        "side_by_side": side_by_side,
        "totals": totals,
        "ledger_explanations": explanations,
    }))
}

/// An explanation (from [`explain`]) as text: both sides in two columns,
/// then the ledger's arithmetic.
pub fn explain_text(explained: &Value) -> String {
    let mut out = String::new();
    let row = &explained["row"];
    out.push_str(&format!(
        "{} / {} — {}: {} (delta {})\n",
        row["service"].as_str().unwrap_or_default(),
        row["external_subscription_id"].as_str().unwrap_or_default(),
        row["period"].as_str().unwrap_or_default(),
        row["status"].as_str().unwrap_or_default(),
        format_cents(row["delta_cents"].as_i64().unwrap_or_default()),
    ));
    out.push_str(&format!("{:<10} {:<52} {:<52}\n", "", "ledger", "source"));
    let cell = |line: &Value, ledger: bool| -> String {
        let amount = format_cents(line["amount_cents"].as_i64().unwrap_or_default());
        if ledger {
            format!(
                "{} {}–{} ×{} = {}",
                line["name"].as_str().unwrap_or_default(),
                line["from"].as_str().unwrap_or_default(),
                line["to"].as_str().unwrap_or_default(),
                line["units"].as_str().unwrap_or_default(),
                amount
            )
        } else {
            format!(
                "{} {} × {} = {}",
                line["description"].as_str().unwrap_or_default(),
                line["units"].as_str().unwrap_or_default(),
                line["unit_amount"].as_str().unwrap_or_default(),
                amount
            )
        }
    };
    for class in explained["side_by_side"].as_array().into_iter().flatten() {
        let empty = vec![];
        let ledger = class["ledger"].as_array().unwrap_or(&empty);
        let source = class["source"].as_array().unwrap_or(&empty);
        for i in 0..ledger.len().max(source.len()) {
            out.push_str(&format!(
                "{:<10} {:<52} {:<52}\n",
                if i == 0 {
                    class["class"].as_str().unwrap_or_default()
                } else {
                    ""
                },
                ledger.get(i).map(|l| cell(l, true)).unwrap_or_default(),
                source.get(i).map(|l| cell(l, false)).unwrap_or_default(),
            ));
        }
    }
    let totals = &explained["totals"];
    for (name, key) in [("tax", "taxes_cents"), ("total", "total_cents")] {
        out.push_str(&format!(
            "{name:<10} {:<52} {:<52}\n",
            format_cents(totals["ledger"][key].as_i64().unwrap_or_default()),
            format_cents(totals["source"][key].as_i64().unwrap_or_default()),
        ));
    }
    for cause in row["causes"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "cause {:<9} {:>10}  {}\n",
            cause["cause"].as_str().unwrap_or_default(),
            format_cents(cause["amount_cents"].as_i64().unwrap_or_default()),
            cause["explanation"].as_str().unwrap_or_default()
        ));
    }
    for invoice in explained["ledger_explanations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "\nledger invoice {} — arithmetic\n",
            invoice["number"].as_str().unwrap_or_default()
        ));
        for fee in invoice["fees"].as_array().into_iter().flatten() {
            out.push_str(&format!("  {}\n", fee["name"].as_str().unwrap_or_default()));
            for line in fee["arithmetic"].as_array().into_iter().flatten() {
                out.push_str(&format!("    {}\n", line.as_str().unwrap_or_default()));
            }
            for line in fee["tax_arithmetic"].as_array().into_iter().flatten() {
                out.push_str(&format!("    tax {}\n", line.as_str().unwrap_or_default()));
            }
        }
    }
    out
}

fn causes_text(causes: &[Cause]) -> String {
    causes
        .iter()
        .map(|c| format!("{} {}", c.cause.as_str(), format_cents(c.amount_cents)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as a table: the rows, the unattributed invoices, the summary.
pub fn table(report: &ReconcileReport) -> String {
    let mut out = format!(
        "reconciliation {} (tolerance {} cents)\n{:<12} {:<36} {:<36} {:<18} {:>10} {:>10} {:>10}  causes\n",
        report.period,
        report.tolerance_cents,
        "service",
        "subscription",
        "customer",
        "status",
        "ledger",
        "source",
        "delta"
    );
    for row in &report.rows {
        let mut status = row.status.clone();
        if let Some(t) = row.matched_within_tolerance_cents {
            status = format!("{status} (±{t})");
        }
        out.push_str(&format!(
            "{:<12} {:<36} {:<36} {:<18} {:>10} {:>10} {:>10}  {}\n",
            row.service,
            row.external_subscription_id,
            row.external_customer_id,
            status,
            format_cents(row.ledger.total_cents),
            format_cents(row.source.total_cents),
            format_cents(row.delta_cents),
            causes_text(&row.causes)
        ));
        if let Some(accepted) = row.accepted.as_ref().filter(|_| row.status == "accepted") {
            out.push_str(&format!(
                "{:<12} accepted by {} at {}: {}\n",
                "",
                accepted.accepted_by,
                accepted.accepted_at.to_rfc3339(),
                accepted.reason
            ));
        }
        if let Some(what_if) = &row.what_if {
            out.push_str(&format!(
                "{:<12} what-if: {} (ledger {}, delta {})  {}\n",
                "",
                what_if.status,
                format_cents(what_if.ledger_total_cents),
                format_cents(what_if.delta_cents),
                causes_text(&what_if.causes)
            ));
        }
    }
    if !report.unattributed.is_empty() {
        out.push_str("unattributed (no subscription; never compared)\n");
        for u in &report.unattributed {
            out.push_str(&format!(
                "{:<12} {:<36} {:<8} {:<20} {:>10} {}\n",
                u.service,
                u.external_customer_id,
                u.side,
                u.number,
                format_cents(u.total_cents),
                u.period.as_deref().unwrap_or("undated")
            ));
        }
    }
    let s = &report.summary;
    let counts = |map: &BTreeMap<String, u64>| {
        map.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push_str(&format!(
        "summary: {} rows — {}\ncauses: {}\ntotals: ledger {}, source {}, delta {}; unattributed {} ({})\n",
        s.rows,
        counts(&s.statuses),
        counts(&s.causes),
        format_cents(s.ledger_total_cents),
        format_cents(s.source_total_cents),
        format_cents(s.delta_cents),
        s.unattributed,
        format_cents(s.unattributed_total_cents)
    ));
    if let Some(what_if) = &report.what_if {
        out.push_str(&format!(
            "what-if: turns into match [{}]; breaks [{}]; still unresolved [{}]\n",
            what_if.turns_into_match.join(", "),
            what_if.breaks.join(", "),
            what_if.still_unresolved.join(", ")
        ));
    }
    out
}

/// The rows as CSV (one line per row; the causes as `cause:cents` pairs).
pub fn csv(report: &ReconcileReport) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "service",
        "external_subscription_id",
        "external_customer_id",
        "period",
        "status",
        "recorded_status",
        "ledger_fees_cents",
        "ledger_taxes_cents",
        "ledger_total_cents",
        "source_fees_cents",
        "source_taxes_cents",
        "source_total_cents",
        "delta_cents",
        "causes",
        "accepted_by",
        "accepted_reason",
    ])?;
    for row in &report.rows {
        let accepted = row.accepted.as_ref().filter(|_| row.status == "accepted");
        writer.write_record([
            row.service.clone(),
            row.external_subscription_id.clone(),
            row.external_customer_id.clone(),
            row.period.clone(),
            row.status.clone(),
            row.recorded_status.as_str().to_string(),
            row.ledger.fees_cents.to_string(),
            row.ledger.taxes_cents.to_string(),
            row.ledger.total_cents.to_string(),
            row.source.fees_cents.to_string(),
            row.source.taxes_cents.to_string(),
            row.source.total_cents.to_string(),
            row.delta_cents.to_string(),
            row.causes
                .iter()
                .map(|c| format!("{}:{}", c.cause.as_str(), c.amount_cents))
                .collect::<Vec<_>>()
                .join(" "),
            accepted.map(|a| a.accepted_by.clone()).unwrap_or_default(),
            accepted.map(|a| a.reason.clone()).unwrap_or_default(),
        ])?;
    }
    Ok(String::from_utf8(writer.into_inner()?)?)
}
