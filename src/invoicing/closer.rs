//! Issuing invoices: the period closer, early finalization and draft views.
//!
//! The closer looks at every subscription's issuing instants up to now (the
//! billing law, [`aggregates::billing`]) and, for each one not yet
//! finalized, drafts the invoice (while the customer's grace period runs) or
//! finalizes it. All invoice writes of a service happen in transactions that
//! first lock the service's invoice-number row, so they are serialized per
//! service however many `ledger serve` processes run; inside, the state of
//! each invoice is read from the log itself (its stream), never from a
//! projection that may lag. Numbers, events and the billing frontier
//! (`billed_windows`) are written in that one transaction: a crash leaves
//! either all of them or none, and the stream id (service, subscription,
//! instant) makes a second invoice for the same instant impossible.
//!
//! Usage is read from the `usage` projection *as of a log position*: its
//! checkpoint, recorded in the finalization. Usage that reaches the
//! projection later — recorded late, or merely projected late — is never
//! lost: at the subscription's next invoice, every earlier window whose
//! events now go beyond the position it was billed as of gets an adjustment
//! line (or, for a terminated subscription, an adjustment invoice).

use std::collections::{BTreeMap, HashMap};

use aggregates::billing::{
    invoice_fees, invoice_totals, BillingSchedule, Fee, InvoiceLayout, InvoiceTotals,
    InvoicingReason, LateWindow, LogPosition, PlanSegment,
};
use aggregates::invoice::{
    invoice_number, invoice_stream_id, Invoice, InvoiceError, InvoiceEvent, InvoiceFinalization,
    InvoiceHeader, INVOICE_STREAM_TYPE,
};
use aggregates::period::BillingPeriod;
use aggregates::plan::PlanDefinition;
use aggregates::subscription::BillingTime;
use aggregates::usage::UsagePoint;
use chrono::{DateTime, Duration, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::event_log::store::{Actor, CommandMetadata};

/// Why issuing failed.
#[derive(Debug, thiserror::Error)]
pub enum InvoicingError {
    /// An invoice command was refused.
    #[error(transparent)]
    Refused(#[from] InvoiceError),
    /// Storage failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored value could not be read.
    #[error("unreadable billing data: {0}")]
    Unreadable(String),
}

/// A subscription with everything billing it needs.
#[derive(Debug, Clone)]
pub struct SubscriptionBilling {
    pub service: String,
    pub lago_id: Uuid,
    pub external_id: String,
    pub customer_lago_id: Uuid,
    pub external_customer_id: String,
    pub shadow: bool,
    pub grace_days: i64,
    /// The customer's taxes: (code, rate in percent).
    pub taxes: Vec<(String, Decimal)>,
    pub schedule: BillingSchedule,
    /// Everything issued up to here is finalized, per the `invoices`
    /// projection (just before its oldest draft, else its latest finalized
    /// invoice). A hint that saves reading old streams: the log decides.
    pub last_finalized_at: Option<DateTime<Utc>>,
}

impl SubscriptionBilling {
    fn stream_id(&self, issued_at: DateTime<Utc>) -> String {
        invoice_stream_id(&self.service, self.lago_id, issued_at)
    }

    fn tax_rates(&self) -> Vec<Decimal> {
        self.taxes.iter().map(|(_, rate)| *rate).collect()
    }
}

const BILLING_SELECT: &str = "SELECT s.service_code, s.lago_id, s.external_id, \
        c.lago_id AS customer_lago_id, c.external_id AS external_customer_id, s.shadow, \
        coalesce((c.resource->'billing_configuration'->>'invoice_grace_period')::bigint, 0) AS grace_days, \
        s.resource->>'billing_time' AS billing_time, coalesce(c.resource->>'timezone', 'UTC') AS timezone, \
        s.subscription_at, s.terminated_at, \
        (SELECT jsonb_agg(jsonb_build_object('since', h.item->'since', 'plan', pv.definition) ORDER BY h.ord) \
           FROM jsonb_array_elements(s.plan_history) WITH ORDINALITY AS h(item, ord) \
           JOIN plan_versions pv ON pv.service_code = s.service_code AND pv.code = h.item->>'code' \
                                AND pv.version = (h.item->>'version')::int) AS plans, \
        coalesce((SELECT jsonb_agg(jsonb_build_array(t.code, t.rate::text) ORDER BY t.code) FROM taxes t \
           WHERE t.service_code = s.service_code \
             AND t.code IN (SELECT jsonb_array_elements_text(c.resource->'tax_codes'))), '[]') AS taxes, \
        coalesce((SELECT min(i.issued_at) - interval '1 microsecond' FROM invoices i \
                  WHERE i.subscription_lago_id = s.lago_id AND i.status = 'draft'), \
                 (SELECT max(i.issued_at) FROM invoices i WHERE i.subscription_lago_id = s.lago_id \
                  AND i.status = 'finalized')) AS last_finalized_at \
    FROM subscriptions s \
    JOIN customers c ON c.service_code = s.service_code AND c.external_id = s.external_customer_id";

#[derive(sqlx::FromRow)]
struct BillingRow {
    service_code: String,
    lago_id: Uuid,
    external_id: String,
    customer_lago_id: Uuid,
    external_customer_id: String,
    shadow: bool,
    grace_days: i64,
    billing_time: String,
    timezone: String,
    subscription_at: DateTime<Utc>,
    terminated_at: Option<DateTime<Utc>>,
    plans: Option<Value>,
    taxes: Value,
    last_finalized_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct SegmentRow {
    since: DateTime<Utc>,
    plan: PlanDefinition,
}

fn billing_from_row(row: BillingRow) -> Result<SubscriptionBilling, InvoicingError> {
    let unreadable = |what: &str, e: &dyn std::fmt::Display| {
        InvoicingError::Unreadable(format!("subscription {}: {what}: {e}", row.lago_id))
    };
    let segments: Vec<SegmentRow> = serde_json::from_value(row.plans.clone().unwrap_or_default())
        .map_err(|e| unreadable("plan history", &e))?;
    if segments.is_empty() {
        return Err(unreadable("plan history", &"empty"));
    }
    let taxes: Vec<(String, String)> =
        serde_json::from_value(row.taxes.clone()).map_err(|e| unreadable("taxes", &e))?;
    let taxes = taxes
        .into_iter()
        .map(|(code, rate)| Ok((code, rate.parse().map_err(|e| unreadable("tax rate", &e))?)))
        .collect::<Result<_, InvoicingError>>()?;
    Ok(SubscriptionBilling {
        service: row.service_code,
        lago_id: row.lago_id,
        external_id: row.external_id,
        customer_lago_id: row.customer_lago_id,
        external_customer_id: row.external_customer_id,
        shadow: row.shadow,
        grace_days: row.grace_days,
        taxes,
        schedule: BillingSchedule {
            billing_time: BillingTime::parse(&row.billing_time).unwrap_or(BillingTime::Calendar),
            timezone: row.timezone.parse().unwrap_or(chrono_tz::UTC),
            subscription_at: row.subscription_at,
            terminated_at: row.terminated_at,
            plans: segments
                .into_iter()
                .map(|s| PlanSegment {
                    since: s.since,
                    plan: s.plan,
                })
                .collect(),
        },
        last_finalized_at: row.last_finalized_at,
    })
}

/// The subscriptions that may have something to invoice at `now`: every one
/// not terminated, and terminated ones whose late usage could still arrive.
pub async fn billable_subscriptions(
    pool: &PgPool,
    service: Option<&str>,
    acceptance_window: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<SubscriptionBilling>, InvoicingError> {
    let rows: Vec<BillingRow> = sqlx::query_as(&format!(
        "{BILLING_SELECT} WHERE ($1::text IS NULL OR s.service_code = $1) \
           AND (s.terminated_at IS NULL OR s.terminated_at > $2) \
         ORDER BY s.service_code, s.lago_id"
    ))
    .bind(service)
    .bind(now - acceptance_window - Duration::days(1))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(billing_from_row).collect()
}

/// One subscription of a service, for a draft view or an early finalization.
pub async fn subscription_billing(
    conn: &mut PgConnection,
    service: &str,
    subscription_lago_id: Uuid,
) -> Result<Option<SubscriptionBilling>, InvoicingError> {
    let row: Option<BillingRow> = sqlx::query_as(&format!(
        "{BILLING_SELECT} WHERE s.service_code = $1 AND s.lago_id = $2"
    ))
    .bind(service)
    .bind(subscription_lago_id)
    .fetch_optional(conn)
    .await?;
    row.map(billing_from_row).transpose()
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

/// How many subscriptions one closing transaction handles.
const CHUNK: usize = 500;

/// Draft and finalize everything due at `now`, for every service (or one).
pub async fn close_due(
    pool: &PgPool,
    service: Option<&str>,
    acceptance_window: Duration,
    now: DateTime<Utc>,
) -> Result<CloseReport, InvoicingError> {
    let subscriptions = billable_subscriptions(pool, service, acceptance_window, now).await?;
    let mut by_service: BTreeMap<&str, Vec<&SubscriptionBilling>> = BTreeMap::new();
    for subscription in &subscriptions {
        let has_due = subscription
            .schedule
            .issuing_instants(now)
            .last()
            .is_some_and(|last| subscription.last_finalized_at.is_none_or(|f| f < *last));
        if has_due || subscription.schedule.terminated_at.is_some() {
            by_service
                .entry(subscription.service.as_str())
                .or_default()
                .push(subscription);
        }
    }
    let mut report = CloseReport::default();
    for (service, subscriptions) in by_service {
        for chunk in subscriptions.chunks(CHUNK) {
            let mut tx = pool.begin().await?;
            report += close_chunk(&mut tx, service, chunk, now, None).await?;
            tx.commit().await?;
        }
    }
    Ok(report)
}

/// Finalize one draft now (`PUT /invoices/:id/finalize`).
pub async fn finalize_early(
    pool: &PgPool,
    service: &str,
    subscription_lago_id: Uuid,
    stream_id: &str,
    now: DateTime<Utc>,
) -> Result<(), InvoicingError> {
    let mut tx = pool.begin().await?;
    lock_sequences(&mut tx, service).await?;
    let billing = subscription_billing(&mut tx, service, subscription_lago_id)
        .await?
        .ok_or(InvoiceError::NotFound)?;
    let existing = load_invoices(&mut tx, &[stream_id.to_string()]).await?;
    let invoice = existing.get(stream_id).ok_or(InvoiceError::NotFound)?;
    if invoice.finalization().is_some() {
        return Err(InvoiceError::AlreadyFinalized.into());
    }
    let report = close_chunk(&mut tx, service, &[&billing], now, Some(stream_id)).await?;
    if report.finalized == 0 {
        return Err(InvoiceError::NotFound.into());
    }
    tx.commit().await?;
    Ok(())
}

async fn lock_sequences(conn: &mut PgConnection, service: &str) -> Result<[i64; 2], sqlx::Error> {
    sqlx::query(
        "INSERT INTO invoice_sequences (service_code, shadow, last_number) \
         VALUES ($1, false, 0), ($1, true, 0) ON CONFLICT DO NOTHING",
    )
    .bind(service)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(bool, i64)> = sqlx::query_as(
        "SELECT shadow, last_number FROM invoice_sequences WHERE service_code = $1 \
         ORDER BY shadow FOR UPDATE",
    )
    .bind(service)
    .fetch_all(&mut *conn)
    .await?;
    let mut numbers = [0, 0];
    for (shadow, last) in rows {
        numbers[usize::from(shadow)] = last;
    }
    Ok(numbers)
}

/// The invoices among `stream_ids`, folded from the log.
async fn load_invoices(
    conn: &mut PgConnection,
    stream_ids: &[String],
) -> Result<HashMap<String, Invoice>, InvoicingError> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT aggregate_id, payload::jsonb FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = ANY($2) ORDER BY aggregate_id, sequence",
    )
    .bind(INVOICE_STREAM_TYPE)
    .bind(stream_ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut invoices: HashMap<String, Invoice> = HashMap::new();
    for (stream, payload) in rows {
        let event: InvoiceEvent = serde_json::from_value(payload)
            .map_err(|e| InvoicingError::Unreadable(format!("invoice {stream}: {e}")))?;
        invoices.entry(stream).or_default().apply(event);
    }
    Ok(invoices)
}

/// The position the `usage` projection has applied the log up to.
pub async fn usage_position(conn: &mut PgConnection) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT last_transaction_id::text::bigint, last_position FROM projection_checkpoints \
         WHERE projection = 'usage'",
    )
    .fetch_optional(conn)
    .await?;
    Ok(row
        .map(|(transaction_id, position)| LogPosition {
            transaction_id,
            position,
        })
        .unwrap_or_default())
}

/// A window of a subscription already billed, with the position it was
/// billed up to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct BilledWindow {
    pub subscription_lago_id: Uuid,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub plan_code: String,
    pub plan_version: i32,
    pub as_of_transaction_id: i64,
    pub as_of_position: i64,
}

impl BilledWindow {
    pub(crate) fn window(&self) -> BillingPeriod {
        BillingPeriod {
            start: self.window_start,
            end: self.window_end,
        }
    }

    pub(crate) fn as_of(&self) -> LogPosition {
        LogPosition {
            transaction_id: self.as_of_transaction_id,
            position: self.as_of_position,
        }
    }
}

/// Billed windows of `subscriptions` with usage beyond what they were billed as of.
async fn late_windows(
    conn: &mut PgConnection,
    subscriptions: &[Uuid],
    as_of: LogPosition,
) -> Result<Vec<BilledWindow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT b.* FROM billed_windows b \
         WHERE b.subscription_lago_id = ANY($1) AND EXISTS ( \
           SELECT 1 FROM events u WHERE u.usage_subscription = b.subscription_lago_id \
             AND u.usage_timestamp >= b.window_start AND u.usage_timestamp < b.window_end \
             AND (u.transaction_id, u.position) > (b.as_of_transaction_id::text::xid8, b.as_of_position) \
             AND (u.transaction_id, u.position) <= ($2::text::xid8, $3)) \
         ORDER BY b.subscription_lago_id, b.window_start",
    )
    .bind(subscriptions)
    .bind(as_of.transaction_id.to_string())
    .bind(as_of.position)
    .fetch_all(conn)
    .await
}

/// Every window of `subscriptions` billed so far.
async fn billed_windows(
    conn: &mut PgConnection,
    subscriptions: &[Uuid],
) -> Result<Vec<BilledWindow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM billed_windows WHERE subscription_lago_id = ANY($1)")
        .bind(subscriptions)
        .fetch_all(conn)
        .await
}

/// A usage event with the log position it was recorded at.
pub(crate) struct LoggedPoint {
    pub metric_code: String,
    pub as_of: LogPosition,
    pub point: UsagePoint,
}

#[derive(sqlx::FromRow)]
struct PointRow {
    subscription_lago_id: Uuid,
    metric_code: String,
    timestamp: DateTime<Utc>,
    position: i64,
    log_transaction_id: i64,
    value: Option<Decimal>,
    unique_key: Option<String>,
}

/// The usage events of each (subscription, window), up to `as_of`.
pub(crate) async fn window_points(
    conn: &mut PgConnection,
    windows: &[(Uuid, BillingPeriod)],
    as_of: LogPosition,
) -> Result<HashMap<Uuid, Vec<LoggedPoint>>, sqlx::Error> {
    let mut points: HashMap<Uuid, Vec<LoggedPoint>> = HashMap::new();
    if windows.is_empty() {
        return Ok(points);
    }
    let rows: Vec<PointRow> = sqlx::query_as(
        "SELECT DISTINCT u.usage_subscription AS subscription_lago_id, u.usage_metric AS metric_code, \
                u.usage_timestamp AS \"timestamp\", u.position, \
                u.transaction_id::text::bigint AS log_transaction_id, u.usage_value AS value, \
                u.usage_unique_key AS unique_key \
         FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(subscription, start_at, end_at) \
         JOIN events u ON u.usage_subscription = w.subscription \
          AND u.usage_timestamp >= w.start_at AND u.usage_timestamp < w.end_at \
         WHERE (u.transaction_id, u.position) <= ($4::text::xid8, $5)",
    )
    .bind(windows.iter().map(|(s, _)| *s).collect::<Vec<_>>())
    .bind(windows.iter().map(|(_, w)| w.start).collect::<Vec<_>>())
    .bind(windows.iter().map(|(_, w)| w.end).collect::<Vec<_>>())
    .bind(as_of.transaction_id.to_string())
    .bind(as_of.position)
    .fetch_all(conn)
    .await?;
    for row in rows {
        points
            .entry(row.subscription_lago_id)
            .or_default()
            .push(LoggedPoint {
                metric_code: row.metric_code,
                as_of: LogPosition {
                    transaction_id: row.log_transaction_id,
                    position: row.position,
                },
                point: UsagePoint {
                    timestamp: row.timestamp,
                    position: row.position,
                    value: row.value,
                    unique_key: row.unique_key,
                },
            });
    }
    Ok(points)
}

/// What to do with one invoice of a subscription.
enum Action {
    Draft(InvoiceLayout),
    Finalize(InvoiceLayout),
    /// Late usage of a terminated subscription with nothing else to bill.
    Adjust(DateTime<Utc>),
}

/// One invoice, computed.
pub struct ComputedInvoice {
    pub layout: InvoiceLayout,
    pub fees: Vec<Fee>,
    pub totals: InvoiceTotals,
    pub taxes: Vec<aggregates::billing::AppliedTax>,
    /// The log position its usage was read as of.
    pub as_of: LogPosition,
    /// The billed windows it moves forward (its own usage window and every
    /// late window it adjusts).
    billed: Vec<BilledWindow>,
}

/// Compute one invoice of `billing` (the invoice at `layout`, with the late
/// windows given) from usage read as of `as_of`.
pub(crate) fn compute(
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
                .find(|p| p.code == b.plan_code && p.version as i32 == b.plan_version)
                .unwrap_or(
                    &billing.schedule.plans[billing.schedule.segment_at(b.window_start)].plan,
                )
        })
        .collect();
    type Reader<'a> = Box<dyn Fn(&str) -> Vec<&'a UsagePoint> + 'a>;
    let readers: Vec<(Reader<'_>, Reader<'_>)> = late
        .iter()
        .map(|b| {
            let (window, billed_as_of) = (b.window(), b.as_of());
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
            window: b.window(),
            plan,
            billed_as_of: b.as_of(),
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
        .map(|b| BilledWindow {
            as_of_transaction_id: as_of.transaction_id,
            as_of_position: as_of.position,
            ..b.clone()
        })
        .collect();
    if let Some((window, segment)) = layout.usage {
        let plan = &billing.schedule.plans[segment].plan;
        billed.push(BilledWindow {
            subscription_lago_id: billing.lago_id,
            window_start: window.start,
            window_end: window.end,
            plan_code: plan.code.clone(),
            plan_version: plan.version as i32,
            as_of_transaction_id: as_of.transaction_id,
            as_of_position: as_of.position,
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

fn header(
    billing: &SubscriptionBilling,
    layout: &InvoiceLayout,
    now: DateTime<Utc>,
) -> InvoiceHeader {
    let segment = billing.schedule.segment_at(layout.issued_at);
    let plan = &billing.schedule.plans[segment].plan;
    InvoiceHeader {
        lago_id: Uuid::new_v4(),
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

/// The actions due for one subscription: its unfinalized invoices in order;
/// once one stays a draft (grace period), later ones are only drafted.
fn actions(
    billing: &SubscriptionBilling,
    existing: &HashMap<String, Invoice>,
    now: DateTime<Utc>,
    finalize_early: Option<&str>,
    has_late_usage: bool,
) -> Vec<Action> {
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
        let invoice = existing.get(&stream);
        if invoice.is_some_and(|i| i.finalization().is_some()) {
            continue;
        }
        let grace_over = now >= layout.issued_at + Duration::days(billing.grace_days);
        let early = finalize_early == Some(stream.as_str());
        if finalize_early.is_some() {
            if early {
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
    let finalizes = actions.iter().any(|a| matches!(a, Action::Finalize(_)));
    let terminated = billing.schedule.terminated_at.is_some_and(|end| end <= now);
    if has_late_usage && terminated && !finalizes && actions.is_empty() && finalize_early.is_none()
    {
        actions.push(Action::Adjust(now));
    }
    actions
}

/// Close one chunk of one service's subscriptions inside `conn`'s transaction.
async fn close_chunk(
    conn: &mut PgConnection,
    service: &str,
    subscriptions: &[&SubscriptionBilling],
    now: DateTime<Utc>,
    finalize_early: Option<&str>,
) -> Result<CloseReport, InvoicingError> {
    let mut numbers = lock_sequences(conn, service).await?;
    let candidate_streams: Vec<String> = subscriptions
        .iter()
        .flat_map(|b| {
            b.schedule
                .issuing_instants(now)
                .into_iter()
                .filter(|t| b.last_finalized_at.is_none_or(|f| *t >= f))
                .map(|t| b.stream_id(t))
        })
        .collect();
    let existing = load_invoices(conn, &candidate_streams).await?;
    let as_of = usage_position(conn).await?;
    let ids: Vec<Uuid> = subscriptions.iter().map(|b| b.lago_id).collect();
    let mut late: HashMap<Uuid, Vec<BilledWindow>> = HashMap::new();
    for window in late_windows(conn, &ids, as_of).await? {
        late.entry(window.subscription_lago_id)
            .or_default()
            .push(window);
    }
    let mut billed_before: HashMap<Uuid, Vec<BilledWindow>> = HashMap::new();
    for window in billed_windows(conn, &ids).await? {
        billed_before
            .entry(window.subscription_lago_id)
            .or_default()
            .push(window);
    }
    let mut refused = 0;
    let planned: Vec<(&SubscriptionBilling, Vec<Action>)> = subscriptions
        .iter()
        .map(|b| {
            let has_late = late.contains_key(&b.lago_id);
            let mut actions = actions(b, &existing, now, finalize_early, has_late);
            // Never bill a window of usage twice: an invoice whose usage
            // window overlaps one already billed stops this subscription's
            // invoicing until an operator looks.
            let billed = billed_before.get(&b.lago_id).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(index) = actions.iter().position(|action| {
                let (Action::Draft(layout) | Action::Finalize(layout)) = action else {
                    return false;
                };
                layout.usage.is_some_and(|(w, _)| {
                    billed.iter().any(|b| b.window_start < w.end && w.start < b.window_end)
                })
            }) {
                tracing::error!(
                    subscription = %b.lago_id,
                    service = %b.service,
                    "an invoice's usage window overlaps one already billed (did the customer's time zone change?); \
                     not invoicing this subscription further"
                );
                actions.truncate(index);
                refused += 1;
            }
            (*b, actions)
        })
        .collect();
    let mut windows: Vec<(Uuid, BillingPeriod)> = Vec::new();
    for (billing, actions) in &planned {
        if !actions.iter().any(|a| !matches!(a, Action::Draft(_))) {
            continue;
        }
        for action in actions {
            if let Action::Finalize(layout) = action {
                windows.extend(layout.usage.map(|(w, _)| (billing.lago_id, w)));
            }
        }
        for window in late.get(&billing.lago_id).into_iter().flatten() {
            windows.push((billing.lago_id, window.window()));
        }
    }
    let points = window_points(conn, &windows, as_of).await?;
    let mut writer = EventWriter::default();
    let mut billed: Vec<BilledWindow> = Vec::new();
    let mut report = CloseReport {
        refused,
        ..CloseReport::default()
    };
    for (billing, actions) in planned {
        let mut late_left = late.remove(&billing.lago_id).unwrap_or_default();
        let no_points = Vec::new();
        let points = points.get(&billing.lago_id).unwrap_or(&no_points);
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
            let invoice = existing.get(&stream).cloned().unwrap_or_default();
            let mut version = invoice.version();
            let header = match invoice.header() {
                Some(header) => header.clone(),
                None => {
                    let header = header(billing, &layout, now);
                    let event = invoice.draft(header.clone()).expect("not drafted yet");
                    version += 1;
                    writer.push(&stream, version, &event);
                    header
                }
            };
            if !finalize {
                report.drafted += 1;
                continue;
            }
            let computed = compute(
                billing,
                layout,
                &std::mem::take(&mut late_left),
                points,
                as_of,
            );
            let counter = &mut numbers[usize::from(billing.shadow)];
            *counter += 1;
            let mut drafted = invoice.clone();
            if drafted.header().is_none() {
                drafted.apply(InvoiceEvent::InvoiceDrafted(header.clone()));
            }
            let event = drafted.finalize(InvoiceFinalization {
                number: invoice_number(service, billing.shadow, *counter),
                sequential_number: *counter,
                finalized_at: now,
                as_of,
                fees: computed.fees,
                taxes: computed.taxes,
                totals: computed.totals,
            })?;
            writer.push(&stream, version + 1, &event);
            billed.extend(computed.billed);
            report.finalized += 1;
            if header.reason == InvoicingReason::Adjustment {
                report.adjustment_invoices += 1;
            }
        }
    }
    writer.write(conn).await?;
    for (shadow, last) in [(false, numbers[0]), (true, numbers[1])] {
        sqlx::query(
            "UPDATE invoice_sequences SET last_number = $3 WHERE service_code = $1 AND shadow = $2",
        )
        .bind(service)
        .bind(shadow)
        .bind(last)
        .execute(&mut *conn)
        .await?;
    }
    upsert_billed(conn, &billed).await?;
    Ok(report)
}

/// Invoice events of one transaction, appended in one statement.
#[derive(Default)]
struct EventWriter {
    streams: Vec<String>,
    sequences: Vec<i64>,
    types: Vec<String>,
    payloads: Vec<Value>,
}

impl EventWriter {
    fn push(&mut self, stream: &str, sequence: i64, event: &InvoiceEvent) {
        self.streams.push(stream.to_string());
        self.sequences.push(sequence);
        self.types.push(event.event_type());
        self.payloads
            .push(serde_json::to_value(event).expect("serializable"));
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.streams.is_empty() {
            return Ok(());
        }
        let metadata = CommandMetadata {
            actor: Actor::Closer,
            request_id: format!("close-{}", Uuid::new_v4()),
            recorded_at: Utc::now(),
            client_ip: None,
            api_key_id: None,
        };
        let metadata = serde_json::to_value(metadata.into_map()).expect("serializable");
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
             payload, metadata) \
             SELECT $1, stream, sequence, event_type, '1.0', payload::json, $6::json \
             FROM unnest($2::text[], $3::bigint[], $4::text[], $5::jsonb[]) \
               AS e(stream, sequence, event_type, payload)",
        )
        .bind(INVOICE_STREAM_TYPE)
        .bind(&self.streams)
        .bind(&self.sequences)
        .bind(&self.types)
        .bind(&self.payloads)
        .bind(metadata)
        .execute(conn)
        .await?;
        Ok(())
    }
}

async fn upsert_billed(
    conn: &mut PgConnection,
    billed: &[BilledWindow],
) -> Result<(), sqlx::Error> {
    if billed.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO billed_windows (subscription_lago_id, window_start, window_end, plan_code, \
         plan_version, as_of_transaction_id, as_of_position) \
         SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[], \
                              $5::int[], $6::bigint[], $7::bigint[]) \
         ON CONFLICT (subscription_lago_id, window_start) DO UPDATE SET \
           as_of_transaction_id = EXCLUDED.as_of_transaction_id, \
           as_of_position = EXCLUDED.as_of_position",
    )
    .bind(
        billed
            .iter()
            .map(|b| b.subscription_lago_id)
            .collect::<Vec<_>>(),
    )
    .bind(billed.iter().map(|b| b.window_start).collect::<Vec<_>>())
    .bind(billed.iter().map(|b| b.window_end).collect::<Vec<_>>())
    .bind(
        billed
            .iter()
            .map(|b| b.plan_code.clone())
            .collect::<Vec<_>>(),
    )
    .bind(billed.iter().map(|b| b.plan_version).collect::<Vec<_>>())
    .bind(
        billed
            .iter()
            .map(|b| b.as_of_transaction_id)
            .collect::<Vec<_>>(),
    )
    .bind(billed.iter().map(|b| b.as_of_position).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// A draft's lines as of now: the same computation finalization will do.
pub async fn preview_draft(
    pool: &PgPool,
    header: &InvoiceHeader,
) -> Result<Option<ComputedInvoice>, InvoicingError> {
    let mut conn = pool.acquire().await?;
    let Some(billing) =
        subscription_billing(&mut conn, &header.service, header.subscription_lago_id).await?
    else {
        return Ok(None);
    };
    let layout = if header.reason == InvoicingReason::Adjustment {
        None
    } else {
        billing.schedule.layout_issued_at(header.issued_at)
    };
    let Some(layout) = layout else {
        return Ok(None);
    };
    let as_of = usage_position(&mut conn).await?;
    let late = late_windows(&mut conn, &[billing.lago_id], as_of).await?;
    let mut windows: Vec<(Uuid, BillingPeriod)> =
        late.iter().map(|b| (billing.lago_id, b.window())).collect();
    windows.extend(layout.usage.map(|(w, _)| (billing.lago_id, w)));
    let mut points = window_points(&mut conn, &windows, as_of).await?;
    let points = points.remove(&billing.lago_id).unwrap_or_default();
    Ok(Some(compute(&billing, layout, &late, &points, as_of)))
}

/// The period closer inside `ledger serve`: every `interval`, brings the
/// projections up to date, drafts and finalizes what is due, and projects
/// the result. Safe beside other closers (see the module documentation).
pub struct PeriodCloser {
    pub pool: PgPool,
    pub runner: crate::event_log::projection_runner::ProjectionRunner,
    pub acceptance_window: Duration,
    pub interval: std::time::Duration,
}

impl PeriodCloser {
    /// One pass at `now`.
    pub async fn close_once(&self, now: DateTime<Utc>) -> anyhow::Result<CloseReport> {
        self.runner.catch_up().await?;
        let report = close_due(&self.pool, None, self.acceptance_window, now).await?;
        self.runner.catch_up().await?;
        Ok(report)
    }

    /// Run until `shutdown` turns true.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            match self.close_once(Utc::now()).await {
                Ok(report) if report != CloseReport::default() => {
                    tracing::info!(?report, "period closer pass")
                }
                Ok(_) => {}
                Err(error) => tracing::error!(error = %error, "period closer pass failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
