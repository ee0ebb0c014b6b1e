//! The flip: shadow subscriptions go live from their next period boundary
//! once their latest reconciled periods all match (or are accepted) and
//! their customer has a payment provider customer id; undone before the
//! first live invoice.
//!
//! Flips and undos are written under the service's invoice-number lock —
//! the lock every invoice write takes — and the closer reads flips from the
//! log under that lock, so an undo and a first live invoice can never both
//! happen.

use aggregates::reconciliation::flip_blockers;
use aggregates::subscription::{Subscription, SubscriptionEvent};
use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{subscription_rows, ReconcileError};
use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::store::CommandMetadata;
use crate::invoicing::closer::{lock_sequences, subscription_billing, subscription_stream};

/// What to flip.
#[derive(Debug, Clone)]
pub struct FlipRequest {
    /// The service.
    pub service: String,
    /// Only these subscriptions (external ids); empty: every shadow one.
    pub subscriptions: Vec<String>,
    /// Consecutive resolved periods needed (the latest ones).
    pub cycles: usize,
    /// The reconciliation's tolerance.
    pub tolerance_cents: i64,
    /// Say what would happen; write nothing.
    pub dry_run: bool,
    /// Return flipped subscriptions to shadow instead.
    pub undo: bool,
    /// Now.
    pub now: DateTime<Utc>,
}

/// A subscription flipped (or undone, or that would be).
#[derive(Debug, Clone, Serialize)]
pub struct Flipped {
    /// The subscription.
    pub external_subscription_id: String,
    /// The boundary invoices after which are live.
    pub live_from: DateTime<Utc>,
}

/// A subscription that may not flip, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Blocked {
    /// The subscription.
    pub external_subscription_id: String,
    /// What blocks it.
    pub blockers: Vec<String>,
}

/// What a flip did.
#[derive(Debug, Clone, Serialize)]
pub struct FlipReport {
    /// Nothing was written.
    pub dry_run: bool,
    /// An undo.
    pub undo: bool,
    /// Flipped (or returned to shadow); empty when anything is blocked.
    pub flipped: Vec<Flipped>,
    /// The blocked subscriptions (nothing is written when there is one).
    pub blocked: Vec<Blocked>,
}

#[derive(sqlx::FromRow)]
struct Candidate {
    external_id: String,
    lago_id: Uuid,
    terminated_at: Option<DateTime<Utc>>,
    provider_customer_id: Option<String>,
}

async fn candidates(
    pool: &PgPool,
    request: &FlipRequest,
) -> Result<(Vec<Candidate>, Vec<Blocked>), ReconcileError> {
    let found: Vec<Candidate> = sqlx::query_as(
        "SELECT s.external_id, s.lago_id, s.terminated_at, \
         nullif(c.resource->'billing_configuration'->>'provider_customer_id', '') AS provider_customer_id \
         FROM subscriptions s \
         JOIN customers c ON c.service_code = s.service_code AND c.external_id = s.external_customer_id \
         WHERE s.service_code = $1 AND s.shadow AND (cardinality($2::text[]) = 0 OR s.external_id = ANY($2)) \
         ORDER BY s.external_id",
    )
    .bind(&request.service)
    .bind(&request.subscriptions)
    .fetch_all(pool)
    .await?;
    let blocked: Vec<Blocked> = request
        .subscriptions
        .iter()
        .filter(|id| !found.iter().any(|c| &c.external_id == *id))
        .map(|id| Blocked {
            external_subscription_id: id.clone(),
            blockers: vec![format!("not a shadow subscription of {}", request.service)],
        })
        .collect();
    // Terminated ones are only considered when named (and then refused).
    let listed = !request.subscriptions.is_empty();
    let chosen = found
        .into_iter()
        .filter(|c| listed || c.terminated_at.is_none())
        .collect();
    Ok((chosen, blocked))
}

/// Flip (or undo) as asked (see the module documentation).
pub async fn flip(
    pool: &PgPool,
    request: &FlipRequest,
    metadata: CommandMetadata,
) -> Result<FlipReport, ReconcileError> {
    if request.tolerance_cents < 0 {
        return Err(ReconcileError::BadTolerance);
    }
    let (chosen, mut blocked) = candidates(pool, request).await?;
    let listed = !request.subscriptions.is_empty();
    let mut report = FlipReport {
        dry_run: request.dry_run,
        undo: request.undo,
        flipped: vec![],
        blocked: vec![],
    };
    let mut tx = pool.begin().await?;
    lock_sequences(&mut tx, &request.service).await?;
    let mut events = Vec::new();
    for candidate in &chosen {
        let stream = subscription_stream(&request.service, &candidate.external_id);
        let (subscription, version) = load_subscription(&mut tx, &stream).await?;
        // Flipped or not as its own events say (the projection may lag).
        if !listed && subscription.live_from().is_some() != request.undo {
            continue;
        }
        let mut blockers = Vec::new();
        let decided = if request.undo {
            if let Some(issued_at) =
                live_invoice(&mut tx, &request.service, candidate.lago_id).await?
            {
                blockers.push(format!(
                    "its first live invoice (issued at {}) exists",
                    issued_at.to_rfc3339()
                ));
            }
            subscription
                .undo_flip(request.now)
                .map(|event| (event, subscription.live_from()))
        } else {
            let rows = subscription_rows(
                pool,
                &request.service,
                &candidate.external_id,
                request.tolerance_cents,
            )
            .await?;
            let rows: Vec<(String, bool, String)> = rows
                .into_iter()
                .map(|r| {
                    let status = match r.status.as_str() {
                        "delta" | "period_mismatch" => format!(
                            "{} (delta {})",
                            r.status,
                            aggregates::reconciliation::format_cents(r.delta_cents)
                        ),
                        _ => r.status,
                    };
                    (r.period, r.resolved, status)
                })
                .collect();
            blockers.extend(flip_blockers(&rows, request.cycles.max(1)));
            if candidate.provider_customer_id.is_none() {
                blockers.push("its customer has no payment provider customer id".to_string());
            }
            let billing = subscription_billing(&mut tx, &request.service, candidate.lago_id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .ok_or_else(|| {
                    anyhow::anyhow!("subscription {} not billable", candidate.external_id)
                })?;
            let live_from = billing.schedule.period_at(request.now).end;
            subscription
                .flip(live_from, request.now)
                .map(|event| (event, Some(live_from)))
        };
        match decided {
            Err(aggregates::CatalogError::InvalidStatus(status)) => {
                blockers.push(status.to_string())
            }
            Err(refused) => blockers.push(refused.to_string()),
            Ok((event, Some(live_from))) if blockers.is_empty() => {
                report.flipped.push(Flipped {
                    external_subscription_id: candidate.external_id.clone(),
                    live_from,
                });
                events.push(NewEvent {
                    stream,
                    sequence: version + 1,
                    event_type: event.event_type(),
                    payload: serde_json::to_value(&event)?,
                });
            }
            Ok(_) => {}
        }
        if !blockers.is_empty() {
            blocked.push(Blocked {
                external_subscription_id: candidate.external_id.clone(),
                blockers,
            });
        }
    }
    // Release the lock now, not when the connection is next used.
    if !blocked.is_empty() {
        tx.rollback().await?;
        report.flipped.clear();
        report.blocked = blocked;
        return Ok(report);
    }
    if request.dry_run {
        tx.rollback().await?;
    } else {
        append_events(&mut tx, "Subscription", &events, metadata, OnConflict::Fail).await?;
        tx.commit().await?;
    }
    Ok(report)
}

/// A subscription folded from its own events, and its version.
async fn load_subscription(
    conn: &mut PgConnection,
    stream: &str,
) -> Result<(Subscription, i64), ReconcileError> {
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT sequence, payload::jsonb FROM events WHERE aggregate_type = 'Subscription' \
         AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(stream)
    .fetch_all(&mut *conn)
    .await?;
    let mut subscription = Subscription::default();
    let mut version = 0;
    for (sequence, payload) in rows {
        let event: SubscriptionEvent = serde_json::from_value(payload)?;
        subscription.apply(event);
        version = sequence;
    }
    Ok((subscription, version))
}

/// When the subscription's first live invoice was issued, if it has one
/// (draft or finalized), from the log.
async fn live_invoice(
    conn: &mut PgConnection,
    service: &str,
    lago_id: Uuid,
) -> Result<Option<DateTime<Utc>>, ReconcileError> {
    let issued: Option<String> = sqlx::query_scalar(
        "SELECT payload->'InvoiceDrafted'->>'issued_at' FROM events \
         WHERE aggregate_type = 'Invoice' AND aggregate_id LIKE $1 AND event_type = 'InvoiceDrafted' \
           AND NOT (payload->'InvoiceDrafted'->>'shadow')::boolean \
         ORDER BY sequence LIMIT 1",
    )
    .bind(format!("{service}/{lago_id}/%"))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(issued.and_then(|t| {
        DateTime::parse_from_rfc3339(&t)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }))
}

/// The report as text.
pub fn table(report: &FlipReport) -> String {
    let mut out = String::new();
    let verb = match (report.undo, report.dry_run) {
        (false, false) => "flipped",
        (false, true) => "would flip",
        (true, false) => "returned to shadow",
        (true, true) => "would return to shadow",
    };
    if !report.blocked.is_empty() {
        out.push_str("refused: nothing was written; blocking:\n");
        for blocked in &report.blocked {
            for blocker in &blocked.blockers {
                out.push_str(&format!(
                    "  {:<28} {blocker}\n",
                    blocked.external_subscription_id
                ));
            }
        }
        return out;
    }
    for flipped in &report.flipped {
        out.push_str(&format!(
            "{verb} {:<28} invoices issued after {} are {}\n",
            flipped.external_subscription_id,
            flipped.live_from.to_rfc3339(),
            if report.undo { "shadow again" } else { "live" }
        ));
    }
    if report.flipped.is_empty() {
        out.push_str("nothing to do\n");
    }
    out
}
