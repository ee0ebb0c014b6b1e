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

use aggregates::billing::{BillingSchedule, InvoicingReason, LogPosition, PlanSegment};
use aggregates::closing::{
    compute_invoice, plan_close, BilledWindow, ClosingInput, ClosingPlan, ComputedInvoice,
};
pub use aggregates::closing::{CloseReport, SubscriptionBilling};
use aggregates::invoice::{
    Invoice, InvoiceError, InvoiceEvent, InvoiceHeader, INVOICE_STREAM_TYPE,
};
use aggregates::period::BillingPeriod;
use aggregates::plan::PlanDefinition;
use aggregates::pricing::Overflow;
use aggregates::subscription::BillingTime;
use chrono::{DateTime, Duration, Utc};
use cqrs_es::DomainEvent;
use serde::Deserialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::projection_runner::{checkpoint, ProjectionRunner};
use crate::event_log::store::{Actor, CommandMetadata};
use crate::event_log::usage_windows::usage_as_of;

/// Why issuing failed.
#[derive(Debug, thiserror::Error)]
pub enum InvoicingError {
    /// An invoice command was refused.
    #[error(transparent)]
    Refused(#[from] InvoiceError),
    /// Storage failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored value could not be read.
    #[error("unreadable billing data: {0}")]
    Unreadable(String),
    /// The invoice's usage or amounts are beyond what a bill can hold.
    #[error("the invoice cannot be computed: {0}")]
    Unbillable(#[from] Overflow),
}

const BILLING_SELECT: &str = "SELECT s.service_code, s.lago_id, s.external_id, \
        c.lago_id AS customer_lago_id, c.external_id AS external_customer_id, s.shadow, s.live_from, \
        coalesce((c.resource->'billing_configuration'->>'invoice_grace_period')::bigint, 0) AS grace_days, \
        coalesce((c.resource->>'net_payment_term')::bigint, 0) AS net_payment_term, \
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
    live_from: Option<DateTime<Utc>>,
    grace_days: i64,
    net_payment_term: i64,
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
        live_from: row.live_from,
        grace_days: row.grace_days,
        net_payment_term: row.net_payment_term,
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

/// An imported subscription is held from billing until a run of its source,
/// started no earlier than the one that created it, has completed (as folded
/// by the usage projection, so with every usage event before it): its past
/// periods are then invoiced once, with all of their imported usage. A
/// crashed run's subscriptions are released by the next complete run.
const IMPORT_RELEASED: &str = "(s.import_run IS NULL OR EXISTS ( \
        SELECT 1 FROM import_runs own JOIN import_runs done \
          ON done.service_code = own.service_code AND done.source = own.source \
         AND done.started_position >= own.started_position AND done.completed_at IS NOT NULL \
        WHERE own.run_id = s.import_run))";

/// The subscriptions that may have something to invoice at `now`: every one
/// not terminated, and terminated ones whose late usage could still arrive
/// (imported ones once released, see [`IMPORT_RELEASED`]).
pub async fn billable_subscriptions(
    pool: &PgPool,
    service: Option<&str>,
    acceptance_window: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<SubscriptionBilling>, InvoicingError> {
    let rows: Vec<BillingRow> = sqlx::query_as(&format!(
        "{BILLING_SELECT} WHERE ($1::text IS NULL OR s.service_code = $1) \
           AND (s.terminated_at IS NULL OR s.terminated_at > $2) AND {IMPORT_RELEASED} \
         ORDER BY s.service_code, s.lago_id"
    ))
    .bind(service)
    // A window wider than any history (a backfill's) keeps every one.
    .bind(now - acceptance_window.min(Duration::days(100 * 366)) - Duration::days(1))
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

/// The projection whose checkpoint usage is read as of.
const USAGE_PROJECTION: &str = "usage";

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
        if subscription.may_be_due(now) {
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
    let finalized = async {
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
        Ok::<(), InvoicingError>(())
    }
    .await;
    match finalized {
        Ok(()) => tx.commit().await?,
        // Ended before answering, not whenever the pool gets round to
        // rolling back a dropped transaction: the service's invoice numbers
        // are locked until then.
        Err(error) => {
            tx.rollback().await?;
            return Err(error);
        }
    }
    Ok(())
}

pub(crate) async fn lock_sequences(
    conn: &mut PgConnection,
    service: &str,
) -> Result<[i64; 2], sqlx::Error> {
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
pub(crate) async fn load_invoices(
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

/// A row of `billed_windows`.
#[derive(sqlx::FromRow)]
struct BilledWindowRow {
    subscription_lago_id: Uuid,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    plan_code: String,
    plan_version: i32,
    as_of_transaction_id: i64,
    as_of_position: i64,
}

impl From<BilledWindowRow> for BilledWindow {
    fn from(row: BilledWindowRow) -> Self {
        BilledWindow {
            subscription_lago_id: row.subscription_lago_id,
            window: BillingPeriod {
                start: row.window_start,
                end: row.window_end,
            },
            plan_code: row.plan_code,
            plan_version: row.plan_version as u32,
            as_of: LogPosition::from((row.as_of_transaction_id, row.as_of_position)),
        }
    }
}

fn by_subscription(windows: Vec<BilledWindowRow>) -> HashMap<Uuid, Vec<BilledWindow>> {
    let mut by: HashMap<Uuid, Vec<BilledWindow>> = HashMap::new();
    for window in windows {
        by.entry(window.subscription_lago_id)
            .or_default()
            .push(window.into());
    }
    by
}

/// Billed windows of `subscriptions` with usage beyond what they were billed as of.
async fn late_windows(
    conn: &mut PgConnection,
    subscriptions: &[Uuid],
    as_of: LogPosition,
) -> Result<HashMap<Uuid, Vec<BilledWindow>>, sqlx::Error> {
    let rows = sqlx::query_as(
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
    .await?;
    Ok(by_subscription(rows))
}

/// Every window of `subscriptions` billed so far.
async fn billed_windows(
    conn: &mut PgConnection,
    subscriptions: &[Uuid],
) -> Result<HashMap<Uuid, Vec<BilledWindow>>, sqlx::Error> {
    let rows = sqlx::query_as("SELECT * FROM billed_windows WHERE subscription_lago_id = ANY($1)")
        .bind(subscriptions)
        .fetch_all(conn)
        .await?;
    Ok(by_subscription(rows))
}

/// Close one chunk of one service's subscriptions inside `conn`'s
/// transaction: load what the planner decides from, plan, write.
async fn close_chunk(
    conn: &mut PgConnection,
    service: &str,
    subscriptions: &[&SubscriptionBilling],
    now: DateTime<Utc>,
    finalize_early: Option<&str>,
) -> Result<CloseReport, InvoicingError> {
    let last_numbers = lock_sequences(conn, service).await?;
    let refreshed = with_flips_from_log(conn, subscriptions).await?;
    let subscriptions: Vec<&SubscriptionBilling> = match &refreshed {
        Some(refreshed) => refreshed.iter().collect(),
        None => subscriptions.to_vec(),
    };
    let subscriptions = subscriptions.as_slice();
    let candidate_streams: Vec<String> = subscriptions
        .iter()
        .flat_map(|b| b.open_instants(now).into_iter().map(|t| b.stream_id(t)))
        .collect();
    let invoices = load_invoices(conn, &candidate_streams).await?;
    let as_of = checkpoint(conn, USAGE_PROJECTION).await?;
    let ids: Vec<Uuid> = subscriptions.iter().map(|b| b.lago_id).collect();
    let late = late_windows(conn, &ids, as_of).await?;
    let billed = billed_windows(conn, &ids).await?;
    let input = ClosingInput {
        service,
        subscriptions,
        invoices: &invoices,
        billed: &billed,
        late: &late,
        as_of,
        now,
        finalize_early,
        last_numbers,
    };
    let usage = usage_as_of(conn, &input.usage_windows(), as_of).await?;
    let plan = plan_close(&input, &usage, &mut Uuid::new_v4)?;
    write_plan(conn, service, &plan).await?;
    record_quarantine(conn, service, subscriptions, &plan).await?;
    Ok(plan.report)
}

/// The chunk with each shadow subscription's flip as the log has it (under
/// the sequence lock, which flips and their undoing also take: a flip
/// undone a moment ago is never billed live from a lagging projection).
/// `None` when no shadow subscription's flip state differs.
async fn with_flips_from_log(
    conn: &mut PgConnection,
    subscriptions: &[&SubscriptionBilling],
) -> Result<Option<Vec<SubscriptionBilling>>, InvoicingError> {
    let streams: Vec<String> = subscriptions
        .iter()
        .filter(|b| b.shadow)
        .map(|b| subscription_stream(&b.service, &b.external_id))
        .collect();
    if streams.is_empty() {
        return Ok(None);
    }
    let flips = flips_in_log(conn, &streams).await?;
    let live_from = |b: &SubscriptionBilling| {
        b.shadow
            .then(|| flips.get(&subscription_stream(&b.service, &b.external_id)))
            .flatten()
            .copied()
            .flatten()
    };
    if subscriptions.iter().all(|b| live_from(b) == b.live_from) {
        return Ok(None);
    }
    Ok(Some(
        subscriptions
            .iter()
            .map(|b| SubscriptionBilling {
                live_from: live_from(b),
                ..(*b).clone()
            })
            .collect(),
    ))
}

/// A subscription's stream id.
pub fn subscription_stream(service: &str, external_id: &str) -> String {
    format!("{service}/{external_id}")
}

/// The flip state of each of `streams` that was ever flipped, from its own
/// events: `Some(boundary)` while flipped, `None` once undone.
pub async fn flips_in_log(
    conn: &mut PgConnection,
    streams: &[String],
) -> Result<HashMap<String, Option<DateTime<Utc>>>, InvoicingError> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT aggregate_id, payload::jsonb FROM events WHERE aggregate_type = 'Subscription' \
         AND aggregate_id = ANY($1) \
         AND event_type IN ('SubscriptionFlipped', 'SubscriptionFlipUndone') \
         ORDER BY aggregate_id, sequence",
    )
    .bind(streams)
    .fetch_all(&mut *conn)
    .await?;
    let mut state = HashMap::new();
    for (stream, payload) in rows {
        let event: aggregates::subscription::SubscriptionEvent = serde_json::from_value(payload)
            .map_err(|e| InvoicingError::Unreadable(format!("subscription {stream}: {e}")))?;
        let live_from = match event {
            aggregates::subscription::SubscriptionEvent::SubscriptionFlipped {
                live_from, ..
            } => Some(live_from),
            _ => None,
        };
        state.insert(stream, live_from);
    }
    Ok(state)
}

/// Make the `billing_quarantine` entries of the chunk's subscriptions what
/// the pass found: those it refused or could not bill, each logged as an
/// error with its reason; the others' entries are removed.
async fn record_quarantine(
    conn: &mut PgConnection,
    service: &str,
    subscriptions: &[&SubscriptionBilling],
    plan: &ClosingPlan,
) -> Result<(), sqlx::Error> {
    let external_id = |lago_id: Uuid| {
        subscriptions
            .iter()
            .find(|b| b.lago_id == lago_id)
            .map_or_else(String::new, |b| b.external_id.clone())
    };
    let mut held: Vec<(Uuid, String, DateTime<Utc>, String)> = Vec::new();
    for refusal in &plan.refusals {
        held.push((
            refusal.subscription_lago_id,
            external_id(refusal.subscription_lago_id),
            refusal.window.end,
            format!(
                "the usage window from {} overlaps one already billed (did the customer's time zone change?)",
                refusal.window.start.to_rfc3339()
            ),
        ));
    }
    for quarantine in &plan.quarantined {
        if held.iter().any(|h| h.0 == quarantine.subscription_lago_id) {
            continue;
        }
        tracing::error!(
            subscription = %quarantine.subscription_lago_id,
            external_subscription_id = %quarantine.external_subscription_id,
            service = %service,
            issued_at = %quarantine.issued_at,
            reason = %quarantine.cause,
            "an invoice cannot be computed; the subscription is quarantined (not billed) until an operator acts"
        );
        held.push((
            quarantine.subscription_lago_id,
            quarantine.external_subscription_id.clone(),
            quarantine.issued_at,
            format!("its invoice cannot be computed: {}", quarantine.cause),
        ));
    }
    let all: Vec<Uuid> = subscriptions.iter().map(|b| b.lago_id).collect();
    let held_ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
    sqlx::query(
        "DELETE FROM billing_quarantine WHERE subscription_lago_id = ANY($1) \
         AND NOT subscription_lago_id = ANY($2)",
    )
    .bind(&all)
    .bind(&held_ids)
    .execute(&mut *conn)
    .await?;
    if held.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO billing_quarantine (subscription_lago_id, service_code, \
         external_subscription_id, issued_at, reason) \
         SELECT s, $2, e, i, r FROM unnest($1::uuid[], $3::text[], $4::timestamptz[], $5::text[]) \
           AS held(s, e, i, r) \
         ON CONFLICT (subscription_lago_id) DO UPDATE SET issued_at = EXCLUDED.issued_at, \
           reason = EXCLUDED.reason, last_seen_at = now()",
    )
    .bind(&held_ids)
    .bind(service)
    .bind(held.iter().map(|h| h.1.clone()).collect::<Vec<_>>())
    .bind(held.iter().map(|h| h.2).collect::<Vec<_>>())
    .bind(held.iter().map(|h| h.3.clone()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Write what a pass planned: its invoice events, the service's invoice
/// numbers and the billing frontier (all inside the caller's transaction).
async fn write_plan(
    conn: &mut PgConnection,
    service: &str,
    plan: &ClosingPlan,
) -> Result<(), sqlx::Error> {
    for refusal in &plan.refusals {
        tracing::error!(
            subscription = %refusal.subscription_lago_id,
            service = %service,
            window_start = %refusal.window.start,
            "an invoice's usage window overlaps one already billed (did the customer's time zone change?); \
             not invoicing this subscription further"
        );
    }
    let events: Vec<NewEvent> = plan
        .events
        .iter()
        .map(|planned| NewEvent {
            stream: planned.stream.clone(),
            sequence: planned.sequence,
            event_type: planned.event.event_type(),
            payload: serde_json::to_value(&planned.event).expect("serializable"),
        })
        .collect();
    let metadata = CommandMetadata {
        actor: Actor::Closer,
        request_id: format!("close-{}", Uuid::new_v4()),
        recorded_at: Utc::now(),
        client_ip: None,
        api_key_id: None,
    };
    append_events(
        conn,
        INVOICE_STREAM_TYPE,
        &events,
        metadata,
        OnConflict::Fail,
    )
    .await?;
    for (shadow, last) in [(false, plan.last_numbers[0]), (true, plan.last_numbers[1])] {
        sqlx::query(
            "UPDATE invoice_sequences SET last_number = $3 WHERE service_code = $1 AND shadow = $2",
        )
        .bind(service)
        .bind(shadow)
        .bind(last)
        .execute(&mut *conn)
        .await?;
    }
    upsert_billed(conn, &plan.billed).await
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
    .bind(billed.iter().map(|b| b.window.start).collect::<Vec<_>>())
    .bind(billed.iter().map(|b| b.window.end).collect::<Vec<_>>())
    .bind(
        billed
            .iter()
            .map(|b| b.plan_code.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        billed
            .iter()
            .map(|b| b.plan_version as i32)
            .collect::<Vec<_>>(),
    )
    .bind(
        billed
            .iter()
            .map(|b| b.as_of.transaction_id)
            .collect::<Vec<_>>(),
    )
    .bind(billed.iter().map(|b| b.as_of.position).collect::<Vec<_>>())
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
    let as_of = checkpoint(&mut conn, USAGE_PROJECTION).await?;
    let late: Vec<BilledWindow> = late_windows(&mut conn, &[billing.lago_id], as_of)
        .await?
        .remove(&billing.lago_id)
        .unwrap_or_default();
    let mut windows: Vec<(Uuid, BillingPeriod)> =
        late.iter().map(|b| (billing.lago_id, b.window)).collect();
    windows.extend(layout.usage.map(|(w, _)| (billing.lago_id, w)));
    let mut points = usage_as_of(&mut conn, &windows, as_of).await?;
    let points = points.remove(&billing.lago_id).unwrap_or_default();
    Ok(Some(compute_invoice(
        &billing, layout, &late, &points, as_of,
    )?))
}

/// The period closer inside `ledger serve`: every `interval`, brings the
/// projections up to date, drafts and finalizes what is due, and projects
/// the result. Safe beside other closers (see the module documentation).
pub struct PeriodCloser {
    /// The database.
    pub pool: PgPool,
    /// Brings the projections up to date before and after a pass.
    pub runner: ProjectionRunner,
    /// How long usage may arrive late (terminated subscriptions are looked at that long).
    pub acceptance_window: Duration,
    /// How often a pass runs.
    pub interval: std::time::Duration,
}

impl PeriodCloser {
    /// One pass at `now`.
    pub async fn close_once(&self, now: DateTime<Utc>) -> anyhow::Result<CloseReport> {
        self.runner.catch_up().await?;
        let report = close_due(&self.pool, None, self.acceptance_window, now).await?;
        let overdue = crate::payments::mark_overdue(&self.pool, now).await?;
        if overdue > 0 {
            tracing::info!(overdue, "invoices marked overdue");
        }
        self.runner.catch_up().await?;
        Ok(report)
    }

    /// Run until `shutdown` turns true.
    pub async fn run(
        self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        health: crate::app::supervisor::TaskHealth,
    ) {
        loop {
            let pass = self.close_once(Utc::now()).await;
            crate::app::metrics::closer_pass(pass.as_ref().ok());
            match pass {
                Ok(report) => {
                    health.succeeded();
                    if report != CloseReport::default() {
                        tracing::info!(?report, "period closer pass");
                    }
                }
                Err(error) => health.failed(&format!("period closer pass failed: {error:#}")),
            }
            tokio::select! {
                _ = tokio::time::sleep(health.next_wait(self.interval)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
