//! Payments in: facts about whether an invoice was paid, appended to the
//! invoice's own stream. They come from the Lago-compatible API (a payment
//! settled elsewhere), from Stripe's signed webhook ([`stripe`]) and from
//! the period closer, which marks unpaid invoices overdue ([`mark_overdue`]).
//!
//! Each fact is decided by the invoice aggregate folded from the log
//! (`Invoice::update_payment` and its siblings) and appended at the
//! stream's next sequence: two writers racing on one invoice cannot both
//! append the same sequence, and the loser retries on the new state.

pub mod stripe;

use aggregates::invoice::{
    DisputeOutcome, Invoice, InvoiceError, InvoiceEvent, PaymentSource, PaymentUpdate,
    INVOICE_STREAM_TYPE,
};
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use sqlx::{PgConnection, PgPool};

use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::store::{Actor, CommandMetadata};
use crate::invoicing::closer::{load_invoices, InvoicingError};

/// A payment fact to record on an invoice.
#[derive(Debug, Clone)]
pub enum PaymentFact {
    /// The payment status changed.
    Status(PaymentUpdate),
    /// The total refunded grew.
    Refund {
        /// Refunded in total, in cents.
        refunded_amount_cents: i64,
        /// When (the provider's clock).
        occurred_at: DateTime<Utc>,
        /// Who said so.
        source: PaymentSource,
    },
    /// A dispute opened (`outcome` none) or closed.
    Dispute {
        /// How it closed.
        outcome: Option<DisputeOutcome>,
        /// When (the provider's clock).
        occurred_at: DateTime<Utc>,
        /// Who said so.
        source: PaymentSource,
    },
}

impl PaymentFact {
    /// The event the invoice would record (none: nothing changes).
    fn decide(&self, invoice: &Invoice) -> Result<Option<InvoiceEvent>, InvoiceError> {
        match self {
            Self::Status(update) => invoice.update_payment(update.clone()),
            Self::Refund {
                refunded_amount_cents,
                occurred_at,
                source,
            } => invoice.refund(*refunded_amount_cents, *occurred_at, source.clone()),
            Self::Dispute {
                outcome,
                occurred_at,
                source,
            } => invoice.dispute(*outcome, *occurred_at, source.clone()),
        }
    }
}

/// What recording a fact did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The invoice changed.
    Applied,
    /// The fact was already known, or older than what is (nothing written).
    Unchanged,
}

/// Whether `error` is the log's primary key refusing a second event at one
/// sequence (another writer appended first).
pub(crate) fn lost_race(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation())
}

/// Record `fact` on the invoice `stream` inside `conn`'s transaction.
/// A concurrent append to the stream fails this one's insert (the caller
/// retries the transaction).
pub async fn record_in(
    conn: &mut PgConnection,
    stream: &str,
    fact: &PaymentFact,
    metadata: CommandMetadata,
) -> Result<Recorded, InvoicingError> {
    let invoices = load_invoices(conn, &[stream.to_string()]).await?;
    let invoice = invoices.get(stream).ok_or(InvoiceError::NotFound)?;
    let Some(event) = fact.decide(invoice)? else {
        return Ok(Recorded::Unchanged);
    };
    append(conn, stream, invoice.version() + 1, &event, metadata).await?;
    Ok(Recorded::Applied)
}

async fn append(
    conn: &mut PgConnection,
    stream: &str,
    sequence: i64,
    event: &InvoiceEvent,
    metadata: CommandMetadata,
) -> Result<(), sqlx::Error> {
    let new = NewEvent {
        stream: stream.to_string(),
        sequence,
        event_type: event.event_type(),
        payload: serde_json::to_value(event).expect("serializable"),
    };
    append_events(
        conn,
        INVOICE_STREAM_TYPE,
        &[new],
        metadata,
        OnConflict::Fail,
    )
    .await?;
    Ok(())
}

/// How often a write that lost a race on a stream is tried again.
const RACE_RETRIES: usize = 5;

/// End one attempt of a transaction that writes to a stream: commit it (or
/// roll it back when `keep` is false) and give its result; roll it back and
/// give `None` when it lost a race on a stream and may be tried again.
pub(crate) async fn settle<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    outcome: Result<(T, bool), InvoicingError>,
    attempts: &mut usize,
) -> Result<Option<T>, InvoicingError> {
    match outcome {
        Ok((result, true)) => {
            tx.commit().await?;
            Ok(Some(result))
        }
        Ok((result, false)) => {
            tx.rollback().await?;
            Ok(Some(result))
        }
        Err(error) => {
            tx.rollback().await?;
            match error {
                InvoicingError::Database(e) if lost_race(&e) && *attempts < RACE_RETRIES => {
                    *attempts += 1;
                    Ok(None)
                }
                other => Err(other),
            }
        }
    }
}

/// Record `fact` in a transaction of its own, retried when another writer
/// appended to the invoice at the same moment.
pub async fn record(
    pool: &PgPool,
    stream: &str,
    fact: &PaymentFact,
    metadata: CommandMetadata,
) -> Result<Recorded, InvoicingError> {
    let mut attempts = 0;
    loop {
        let mut tx = pool.begin().await?;
        let outcome = record_in(&mut tx, stream, fact, metadata.clone()).await;
        if let Some(recorded) = settle(tx, outcome.map(|r| (r, true)), &mut attempts).await? {
            return Ok(recorded);
        }
    }
}

/// Mark every finalized live invoice whose due date has passed unpaid as
/// overdue at `now` (the customer's time zone decides when a date ends).
/// Returns how many were marked.
pub async fn mark_overdue(pool: &PgPool, now: DateTime<Utc>) -> Result<usize, InvoicingError> {
    // A cheap filter first (due by UTC dates, a day early); the aggregate
    // decides with the customer's zone.
    let candidates: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.stream_id, coalesce(c.resource->>'timezone', 'UTC') FROM invoices i \
         LEFT JOIN customers c ON c.service_code = i.service_code \
                              AND c.external_id = i.external_customer_id \
         WHERE i.status = 'finalized' AND NOT i.shadow AND i.payment_status <> 'succeeded' \
           AND NOT i.payment_overdue \
           AND i.issuing_date + coalesce((i.header->>'net_payment_term')::int, 0) < ($1::timestamptz AT TIME ZONE 'UTC')::date + 1 \
         ORDER BY i.issued_at, i.stream_id",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    let mut marked = 0;
    for (stream, timezone) in candidates {
        let tz = timezone.parse().unwrap_or(chrono_tz::UTC);
        let mut tx = pool.begin().await?;
        let invoices = load_invoices(&mut tx, std::slice::from_ref(&stream)).await?;
        let Some(event) = invoices.get(&stream).and_then(|i| i.mark_overdue(now, tz)) else {
            tx.rollback().await?;
            continue;
        };
        let invoice = &invoices[&stream];
        let metadata = CommandMetadata::internal(Actor::Closer);
        match append(&mut tx, &stream, invoice.version() + 1, &event, metadata).await {
            Ok(()) => {
                tx.commit().await?;
                marked += 1;
            }
            // A payment arrived at the same moment: the next pass decides.
            Err(e) if lost_race(&e) => tx.rollback().await?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(marked)
}
