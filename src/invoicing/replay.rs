//! Replaying a billing period from the log alone and comparing it with what
//! was billed.
//!
//! The catalog projection is rebuilt from the log — up to the chosen log
//! position — into a scratch schema beside the live tables (dropped
//! afterwards; nothing live is written). Each finalized invoice of the period
//! is then recomputed with the same billing code the period closer uses
//! ([`crate::invoicing::closer`], [`aggregates::billing`]): usage read from the log
//! as of the invoice's recorded log position (or the one asked for), and the
//! windows already billed before it derived from the earlier invoices in the
//! log. Every fee whose cents differ is reported.

use std::collections::{BTreeMap, HashMap};

use aggregates::billing::{Fee, InvoiceLayout, InvoicingReason, LogPosition};
use aggregates::invoice::{Invoice, InvoiceEvent, INVOICE_STREAM_TYPE};
use aggregates::period::BillingPeriod;
use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use aggregates::billable_metric::{AggregationType, MetricRef};
use aggregates::plan::{validate_plan, PlanDefinition, PlanInput};

use crate::event_log::projection_runner::rebuild_into_upto;
use aggregates::closing::{compute_invoice, BilledWindow};

use crate::event_log::usage_windows::usage_as_of;
use crate::invoicing::closer::subscription_billing;
use crate::tools::progress::Progress;
use projections::catalog::timestamp;
use projections::{Catalog, Projection};

/// Why a replay did not run: the request's mistakes (→ 4xx, by field)
/// apart from failures (→ 500).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// `period` is not `YYYY-MM`.
    #[error("--period is YYYY-MM, e.g. 2026-09")]
    BadPeriod,
    /// No event at that log position, or none recorded before that time.
    #[error("no event at that log position or before that time")]
    NoSuchPosition,
    /// A what-if price book without the service its plans belong to.
    #[error("--pricing needs --service (plans belong to a service)")]
    PricingNeedsService,
    /// A price book entry that the plan API would refuse.
    #[error("plans[{index}]: {reason}")]
    BadPriceBook {
        /// The entry's index in `plans`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Storage failed or stored data could not be read.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ReplayError {
    fn from(error: sqlx::Error) -> Self {
        ReplayError::Unexpected(anyhow::Error::new(error).context("database query failed"))
    }
}

impl From<serde_json::Error> for ReplayError {
    fn from(error: serde_json::Error) -> Self {
        ReplayError::Unexpected(anyhow::Error::new(error).context("unreadable stored event"))
    }
}

impl From<crate::invoicing::closer::InvoicingError> for ReplayError {
    fn from(error: crate::invoicing::closer::InvoicingError) -> Self {
        ReplayError::Unexpected(anyhow::Error::new(error).context("reading a subscription"))
    }
}

impl From<crate::event_log::projection_runner::RebuildError> for ReplayError {
    fn from(error: crate::event_log::projection_runner::RebuildError) -> Self {
        ReplayError::Unexpected(anyhow::Error::new(error).context("rebuilding the catalog"))
    }
}

/// The log position to replay as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// A global position.
    Position(i64),
    /// The last event recorded at or before this time.
    Time(DateTime<Utc>),
}

impl std::str::FromStr for AsOf {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(position) = text.parse::<i64>() {
            return Ok(AsOf::Position(position));
        }
        DateTime::parse_from_rfc3339(text)
            .map(|at| AsOf::Time(at.with_timezone(&Utc)))
            .map_err(|_| format!("'{text}' is neither a log position nor an RFC 3339 time"))
    }
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// `YYYY-MM`: invoices whose usage window starts in that month (in the
    /// customer's time zone).
    pub period: String,
    /// Only this service.
    pub service: Option<String>,
    /// Only this subscription (external id).
    pub subscription: Option<String>,
    /// Replay as of this position or time (default: each invoice's own).
    pub as_of: Option<AsOf>,
    /// What-if pricing: plan changes (the plan API's format, by code) to
    /// bill the period with instead of the plans it was billed on.
    pub pricing: Option<PriceBook>,
}

/// An alternative price book: `{"plans": [<plan objects as POST /plans
/// takes them>]}`. Each entry changes the plan of that code (only the keys
/// given, as `PUT /plans/{code}` would).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct PriceBook {
    /// The plans, as `POST /plans` takes them.
    pub plans: Vec<PlanInput>,
}

/// One fee, as recorded and as replayed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FeeComparison {
    /// The fee: its kind and code.
    pub fee: String,
    /// Start of its window.
    pub from_datetime: String,
    /// End of its window (exclusive).
    pub to_datetime: String,
    /// What the invoice recorded (none: the replay found a fee it lacks).
    pub recorded_cents: Option<i64>,
    /// What the replay computed (none: the invoice has a fee the replay lacks).
    pub replayed_cents: Option<i64>,
}

/// One invoice, as recorded and as replayed.
#[derive(Debug, Clone, Serialize)]
pub struct InvoiceComparison {
    /// The invoice.
    pub lago_id: Uuid,
    /// Its number.
    pub number: String,
    /// Its service.
    pub service: String,
    /// Its subscription (external id).
    pub external_subscription_id: String,
    /// The log position it was computed as of.
    pub recorded_as_of: i64,
    /// The log position the replay read as of.
    pub replayed_as_of: i64,
    /// Its recorded total.
    pub recorded_total_cents: i64,
    /// The replayed total.
    pub replayed_total_cents: i64,
    /// Fee by fee.
    pub fees: Vec<FeeComparison>,
    /// The recomputed invoice: its header, lines and taxes.
    #[serde(skip)]
    pub replayed: Option<Box<Replayed>>,
}

/// A recomputed invoice (what a what-if reconciliation compares).
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The invoice's header.
    pub header: aggregates::invoice::InvoiceHeader,
    /// Its recomputed lines.
    pub fees: Vec<Fee>,
    /// Its recomputed taxes.
    pub taxes: Vec<aggregates::billing::AppliedTax>,
}

/// A fee whose replayed cents differ from the recorded ones.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    /// The service.
    pub service: String,
    /// The subscription (external id).
    pub external_subscription_id: String,
    /// The invoice's number.
    pub number: String,
    /// The fee and its window.
    pub fee: String,
    /// What the replay computed.
    pub expected_cents: i64,
    /// What the invoice recorded.
    pub recorded_cents: i64,
}

/// The replay of a period.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The period replayed (`YYYY-MM`).
    pub period: String,
    /// Whether an alternative price book was applied (differences are then
    /// what the price change would do, not errors).
    pub what_if: bool,
    /// Every invoice replayed.
    pub invoices: Vec<InvoiceComparison>,
    /// Every fee whose cents differ.
    pub differences: Vec<Difference>,
    /// Sum of the recorded invoices' totals.
    pub recorded_total_cents: i64,
    /// Sum of the replayed invoices' totals.
    pub replayed_total_cents: i64,
}

fn parse_period(period: &str) -> Result<(i32, u32), ReplayError> {
    aggregates::reconciliation::parse_period(period).ok_or(ReplayError::BadPeriod)
}

async fn resolve(pool: &PgPool, as_of: AsOf) -> Result<LogPosition, ReplayError> {
    let row: Option<(i64, i64)> = match as_of {
        AsOf::Position(position) => {
            sqlx::query_as(
                "SELECT transaction_id::text::bigint, position FROM events WHERE position = $1",
            )
            .bind(position)
            .fetch_optional(pool)
            .await?
        }
        AsOf::Time(at) => sqlx::query_as(
            "SELECT transaction_id::text::bigint, position FROM events WHERE recorded_at <= $1 \
             ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1",
        )
        .bind(at)
        .fetch_optional(pool)
        .await?,
    };
    let (transaction_id, position) = row.ok_or(ReplayError::NoSuchPosition)?;
    Ok(LogPosition {
        transaction_id,
        position,
    })
}

fn fee_key(fee: &Fee) -> (String, String, String) {
    (
        format!("{} {}", fee.kind.as_str(), fee.code),
        timestamp(fee.from),
        timestamp(fee.to),
    )
}

/// The comparison row of `fee`'s line (the same fee and window), created
/// empty on first sight.
fn comparison<'a>(
    fees: &'a mut BTreeMap<(String, String, String), FeeComparison>,
    fee: &Fee,
) -> &'a mut FeeComparison {
    let key = fee_key(fee);
    fees.entry(key.clone()).or_insert_with(|| FeeComparison {
        fee: key.0,
        from_datetime: key.1,
        to_datetime: key.2,
        recorded_cents: None,
        replayed_cents: None,
    })
}

/// The price book's plans, each validated over the service's current
/// version of the plan (only the keys given change it), with charges'
/// `billable_metric_id` resolved among the service's metrics.
async fn price_book(
    pool: &PgPool,
    service: &str,
    book: &PriceBook,
) -> Result<HashMap<String, PlanDefinition>, ReplayError> {
    let mut plans = HashMap::new();
    for (index, input) in book.plans.iter().enumerate() {
        let mut input = input.clone();
        let code = input
            .code
            .clone()
            .ok_or_else(|| ReplayError::BadPriceBook {
                index,
                reason: "code is mandatory".into(),
            })?;
        let current: Option<Value> = sqlx::query_scalar(
            "SELECT pv.definition FROM plans p JOIN plan_versions pv ON pv.service_code = p.service_code \
               AND pv.code = p.code AND pv.version = p.version \
             WHERE p.service_code = $1 AND p.code = $2",
        )
        .bind(service)
        .bind(&code)
        .fetch_optional(pool)
        .await?;
        let base: Option<PlanDefinition> = current.map(serde_json::from_value).transpose()?;
        for charge in input.charges.iter_mut().flatten() {
            let Some(id) = charge.billable_metric_id.as_deref() else {
                continue;
            };
            let lago_id: Uuid = id.trim().parse().map_err(|_| ReplayError::BadPriceBook {
                index,
                reason: format!("billable_metric_id {id} is not a lago_id"),
            })?;
            let (metric_code, aggregation): (String, String) = sqlx::query_as(
                "SELECT code, resource->>'aggregation_type' FROM billable_metrics \
                 WHERE service_code = $1 AND lago_id = $2",
            )
            .bind(service)
            .bind(lago_id)
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| ReplayError::BadPriceBook {
                index,
                reason: format!("no billable metric {lago_id} in {service}"),
            })?;
            charge.metric = Some(MetricRef {
                lago_id,
                code: metric_code,
                aggregation_type: AggregationType::parse(&aggregation)
                    .ok_or_else(|| anyhow::anyhow!("stored aggregation {aggregation}"))?,
            });
        }
        let lago_id = base.as_ref().map_or_else(Uuid::new_v4, |b| b.lago_id);
        let version = base.as_ref().map_or(1, |b| b.version);
        let plan = validate_plan(lago_id, version, input, base.as_ref()).map_err(|e| {
            ReplayError::BadPriceBook {
                index,
                reason: format!("({code}) {e}"),
            }
        })?;
        plans.insert(code, plan);
    }
    Ok(plans)
}

/// Replay a period (see the module documentation).
pub async fn replay(pool: &PgPool, request: &ReplayRequest) -> Result<ReplayReport, ReplayError> {
    replay_showing(pool, request, &Progress::hidden()).await
}

/// [`replay`], the catalog's rebuild as of the period shown on `progress`.
pub async fn replay_showing(
    pool: &PgPool,
    request: &ReplayRequest,
    progress: &Progress,
) -> Result<ReplayReport, ReplayError> {
    let (year, month) = parse_period(&request.period)?;
    // Every invoice in the log, in log order.
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT aggregate_id, payload::jsonb FROM events WHERE aggregate_type = $1 \
         ORDER BY events.transaction_id, events.position",
    )
    .bind(INVOICE_STREAM_TYPE)
    .fetch_all(pool)
    .await?;
    let mut invoices: HashMap<String, Invoice> = HashMap::new();
    let mut finalized_order: Vec<String> = Vec::new();
    for (stream, payload) in rows {
        let event: InvoiceEvent = serde_json::from_value(payload)?;
        if matches!(event, InvoiceEvent::InvoiceFinalized(_)) {
            finalized_order.push(stream.clone());
        }
        invoices.entry(stream).or_default().apply(event);
    }
    let finalized: Vec<&Invoice> = finalized_order.iter().map(|s| &invoices[s]).collect();
    let selected: Vec<&Invoice> = finalized
        .iter()
        .copied()
        .filter(|invoice| {
            let header = invoice.header().expect("finalized invoices are drafted");
            request
                .service
                .as_ref()
                .is_none_or(|s| s == &header.service)
                && request
                    .subscription
                    .as_ref()
                    .is_none_or(|s| s == &header.external_subscription_id)
        })
        .collect();
    let requested = match request.as_of {
        Some(as_of) => Some(resolve(pool, as_of).await?),
        None => None,
    };
    let upto = requested.or_else(|| {
        selected
            .iter()
            .filter_map(|i| i.finalization())
            .map(|f| f.as_of)
            .max()
    });
    let what_if = match &request.pricing {
        Some(book) => {
            let service = request
                .service
                .as_deref()
                .ok_or(ReplayError::PricingNeedsService)?;
            price_book(pool, service, book).await?
        }
        None => HashMap::new(),
    };
    let mut report = ReplayReport {
        period: request.period.clone(),
        what_if: request.pricing.is_some(),
        invoices: vec![],
        differences: vec![],
        recorded_total_cents: 0,
        replayed_total_cents: 0,
    };
    let Some(upto) = upto else {
        return Ok(report);
    };
    let schema = format!("replay_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let scratch: [&dyn Projection; 1] = [&Catalog];
    let events =
        projections::log::count_between(&mut *pool.acquire().await?, LogPosition::START, upto)
            .await?;
    progress.next_events("catalog as of the period", events.max(0) as u64);
    rebuild_into_upto(pool, &scratch, &schema, Some(upto), progress).await?;
    progress.finish();
    let scope = Scope {
        selected: &selected,
        finalized: &finalized,
        requested,
        period: (year, month),
        what_if: &what_if,
    };
    let result = compare(pool, &schema, &scope, &mut report).await;
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pool)
        .await?;
    result?;
    Ok(report)
}

/// What a replay compares.
struct Scope<'a> {
    /// The finalized invoices to replay, in log order.
    selected: &'a [&'a Invoice],
    /// Every finalized invoice, in log order (what was billed before).
    finalized: &'a [&'a Invoice],
    /// The position asked for (`None`: each invoice's own).
    requested: Option<LogPosition>,
    /// (year, month).
    period: (i32, u32),
    /// What-if plans by code.
    what_if: &'a HashMap<String, PlanDefinition>,
}

async fn compare(
    pool: &PgPool,
    schema: &str,
    scope: &Scope<'_>,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let mut conn = pool.acquire().await?;
    sqlx::query(&format!("SET search_path TO {schema}, public"))
        .execute(&mut *conn)
        .await?;
    let outcome = compare_in(&mut conn, scope, report).await;
    sqlx::query("RESET search_path").execute(&mut *conn).await?;
    outcome
}

async fn compare_in(
    conn: &mut sqlx::PgConnection,
    scope: &Scope<'_>,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let (year, month) = scope.period;
    for invoice in scope.selected {
        let header = invoice.header().expect("drafted");
        let recorded = invoice.finalization().expect("finalized");
        let Some(mut billing) =
            subscription_billing(&mut *conn, &header.service, header.subscription_lago_id).await?
        else {
            continue;
        };
        for segment in &mut billing.schedule.plans {
            if let Some(plan) = scope.what_if.get(&segment.plan.code) {
                segment.plan = plan.clone();
            }
        }
        let tz = billing.schedule.timezone;
        let starts = header
            .charges_window
            .map(|w| w.start)
            .unwrap_or(header.issued_at)
            .with_timezone(&tz);
        if (starts.year(), starts.month()) != (year, month) {
            continue;
        }
        let as_of = scope.requested.unwrap_or(recorded.as_of);
        // What was billed before this invoice, from the earlier ones.
        let mut billed: BTreeMap<DateTime<Utc>, BilledWindow> = BTreeMap::new();
        for earlier in scope
            .finalized
            .iter()
            .take_while(|i| !std::ptr::eq(**i, *invoice))
        {
            let (h, f) = (
                earlier.header().expect("drafted"),
                earlier.finalization().expect("finalized"),
            );
            if h.subscription_lago_id != header.subscription_lago_id {
                continue;
            }
            let mut mark = |window: BillingPeriod, plan_code: &str, plan_version: u32| {
                billed.insert(
                    window.start,
                    BilledWindow {
                        subscription_lago_id: h.subscription_lago_id,
                        window,
                        plan_code: plan_code.to_string(),
                        plan_version,
                        as_of: f.as_of,
                    },
                );
            };
            if let Some(window) = h.charges_window {
                let fee = f.fees.iter().find(|fee| fee.from == window.start);
                let (code, version) = fee.map_or((String::new(), 0), |fee| {
                    (fee.plan_code.clone(), fee.plan_version)
                });
                mark(window, &code, version);
            }
            for fee in &f.fees {
                if let Some(adjusted) = fee.adjusts {
                    mark(adjusted.window, &fee.plan_code, fee.plan_version);
                }
            }
        }
        let layout = if header.reason == InvoicingReason::Adjustment {
            Some(InvoiceLayout {
                issued_at: header.issued_at,
                reason: InvoicingReason::Adjustment,
                usage: None,
                flat_fees: vec![],
            })
        } else {
            billing.schedule.layout_issued_at(header.issued_at)
        };
        let Some(layout) = layout else { continue };
        let mut windows: Vec<(Uuid, BillingPeriod)> = billed
            .values()
            .map(|b| (b.subscription_lago_id, b.window))
            .collect();
        windows.extend(layout.usage.map(|(w, _)| (billing.lago_id, w)));
        let mut points = usage_as_of(&mut *conn, &windows, as_of).await?;
        let points = points.remove(&billing.lago_id).unwrap_or_default();
        let late: Vec<BilledWindow> = billed
            .into_values()
            .filter(|b| {
                points.iter().any(|p| {
                    b.window.contains(p.point.timestamp) && p.as_of > b.as_of && p.as_of <= as_of
                })
            })
            .collect();
        let replayed = match compute_invoice(&billing, layout, &late, &points, as_of) {
            Ok(replayed) => replayed,
            Err(overflow) => {
                report.differences.push(Difference {
                    service: header.service.clone(),
                    external_subscription_id: header.external_subscription_id.clone(),
                    number: recorded.number.clone(),
                    fee: format!("the whole invoice cannot be recomputed: {overflow}"),
                    expected_cents: 0,
                    recorded_cents: recorded.totals.total_amount_cents,
                });
                continue;
            }
        };
        let mut fees: BTreeMap<(String, String, String), FeeComparison> = BTreeMap::new();
        for fee in &recorded.fees {
            comparison(&mut fees, fee).recorded_cents = Some(fee.amount_cents);
        }
        for fee in &replayed.fees {
            comparison(&mut fees, fee).replayed_cents = Some(fee.amount_cents);
        }
        let fees: Vec<FeeComparison> = fees.into_values().collect();
        for fee in &fees {
            if fee.recorded_cents != fee.replayed_cents {
                report.differences.push(Difference {
                    service: header.service.clone(),
                    external_subscription_id: header.external_subscription_id.clone(),
                    number: recorded.number.clone(),
                    fee: format!("{} [{}, {})", fee.fee, fee.from_datetime, fee.to_datetime),
                    expected_cents: fee.replayed_cents.unwrap_or(0),
                    recorded_cents: fee.recorded_cents.unwrap_or(0),
                });
            }
        }
        // Sums for the reader (saturating: an old invoice may hold anything).
        report.recorded_total_cents = report
            .recorded_total_cents
            .saturating_add(recorded.totals.total_amount_cents);
        report.replayed_total_cents = report
            .replayed_total_cents
            .saturating_add(replayed.totals.total_amount_cents);
        report.invoices.push(InvoiceComparison {
            lago_id: header.lago_id,
            number: recorded.number.clone(),
            service: header.service.clone(),
            external_subscription_id: header.external_subscription_id.clone(),
            recorded_as_of: recorded.as_of.position,
            replayed_as_of: as_of.position,
            recorded_total_cents: recorded.totals.total_amount_cents,
            replayed_total_cents: replayed.totals.total_amount_cents,
            fees,
            replayed: Some(Box::new(Replayed {
                header: header.clone(),
                fees: replayed.fees,
                taxes: replayed.taxes,
            })),
        });
    }
    Ok(())
}

/// The report as a table.
pub fn table(report: &ReplayReport) -> String {
    let mut out =
        format!(
        "{} of {}: {} invoice(s), {} difference(s); billed {} cents, replayed {} cents ({:+})\n",
        if report.what_if { "what-if replay" } else { "replay" },
        report.period,
        report.invoices.len(),
        report.differences.len(),
        report.recorded_total_cents,
        report.replayed_total_cents,
        report
            .replayed_total_cents
            .saturating_sub(report.recorded_total_cents)
    );
    for invoice in &report.invoices {
        out.push_str(&format!(
            "{:<24} {:<24} recorded as of {:>8}: {:>10}  replayed as of {:>8}: {:>10}\n",
            invoice.number,
            invoice.external_subscription_id,
            invoice.recorded_as_of,
            invoice.recorded_total_cents,
            invoice.replayed_as_of,
            invoice.replayed_total_cents
        ));
    }
    for d in &report.differences {
        out.push_str(&format!(
            "DIFFERENCE {} {} {}: expected {} cents, recorded {} cents ({:+})\n",
            d.number,
            d.external_subscription_id,
            d.fee,
            d.expected_cents,
            d.recorded_cents,
            d.expected_cents.saturating_sub(d.recorded_cents)
        ));
    }
    out
}
