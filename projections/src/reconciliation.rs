//! Projection `reconciliation`: the ledger's invoices and the source's
//! imported ones side by side, one row per (service, external subscription
//! id, period), with the delta and the status at a tolerance of 0
//! ([`aggregates::reconciliation`]). Invoices with no subscription stay
//! unattributed (listed per customer, never compared). Operators'
//! acceptances are kept beside the rows.
//!
//! A batch is folded in memory — the invoices it changes, then every row
//! those touch recomputed from all of that row's invoices — and written
//! with a handful of set-based statements.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aggregates::customer::CustomerEvent;
use aggregates::import::{
    validate_external_invoice, ImportedRecordEvent, RecordType, SourceRecord, IMPORTED_RECORD_TYPE,
};
use aggregates::invoice::{InvoiceEvent, InvoiceFinalization, InvoiceHeader, INVOICE_STREAM_TYPE};
use aggregates::reconciliation::{
    compare, ledger_invoice, ledger_period, put_in_row_order, source_invoice, source_period,
    LedgerInvoice, ReconciliationEvent, SourceInvoice, RECONCILIATION_STREAM_TYPE,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `reconciliation` projection.
pub struct Reconciliation;

const CUSTOMER_TYPE: &str = "Customer";

/// A ledger invoice drafted and not yet finalized: what its finalization
/// needs to place it.
#[derive(Clone, Serialize, Deserialize)]
struct Draft {
    draft: InvoiceHeader,
    timezone: String,
}

/// What a `reconciliation_invoices` row holds.
#[derive(Clone)]
enum Stored {
    /// A ledger invoice not finalized yet.
    Draft(Box<Draft>),
    /// A finalized ledger invoice.
    Ledger(Box<LedgerInvoice>),
    /// A source invoice.
    Source(Box<SourceInvoice>),
}

impl Stored {
    fn parse(side: &str, counted: bool, text: &str) -> Result<Stored, serde_json::Error> {
        Ok(match (side, counted) {
            ("ledger", false) => Stored::Draft(Box::new(serde_json::from_str(text)?)),
            ("ledger", true) => Stored::Ledger(Box::new(serde_json::from_str(text)?)),
            _ => Stored::Source(Box::new(serde_json::from_str(text)?)),
        })
    }

    fn to_json(&self) -> String {
        match self {
            Stored::Draft(draft) => serde_json::to_string(draft),
            Stored::Ledger(invoice) => serde_json::to_string(invoice),
            Stored::Source(invoice) => serde_json::to_string(invoice),
        }
        .expect("serializable")
    }
}

/// The state of one `reconciliation_invoices` row after the batch.
#[derive(Clone)]
struct InvoiceRow {
    service: String,
    side: &'static str,
    key: String,
    external_customer_id: String,
    external_subscription_id: Option<String>,
    period: Option<String>,
    counted: bool,
    invoice: Stored,
}

type RowKey = (String, String, String);

fn unreadable(event: &LogEvent, reason: impl ToString) -> ProjectionError {
    ProjectionError::unreadable(event, reason)
}

#[async_trait]
impl Projection for Reconciliation {
    fn name(&self) -> &'static str {
        "reconciliation"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "reconciliation_timezones",
            "reconciliation_invoices",
            "reconciliation_rows",
            "reconciliation_acceptances",
        ]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[
                CUSTOMER_TYPE,
                INVOICE_STREAM_TYPE,
                IMPORTED_RECORD_TYPE,
                RECONCILIATION_STREAM_TYPE,
            ]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        self.apply_batch(conn, std::slice::from_ref(event)).await
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[LogEvent],
    ) -> Result<(), ProjectionError> {
        let reads = self.reads();
        let relevant: Vec<&LogEvent> = events.iter().filter(|e| reads.ships(e)).collect();
        if relevant.is_empty() {
            return Ok(());
        }
        let mut fold = Fold::default();
        let decoded = relevant
            .iter()
            .map(|event| decode(event))
            .collect::<Result<Vec<_>, _>>()?;
        fold.preload(conn, &decoded).await?;
        for (event, decoded) in relevant.iter().zip(decoded) {
            fold.apply(event, decoded)?;
        }
        fold.write(conn).await
    }
}

/// What folding an event needs of it, decoded.
enum Decoded {
    /// A customer's time zone.
    Timezone((String, String), String),
    /// A ledger invoice drafted: its service and stream.
    Drafted(String, String, Box<InvoiceHeader>),
    /// A ledger invoice finalized.
    Finalized(String, String, Box<InvoiceFinalization>),
    /// A source invoice imported, as its row.
    Source(Box<InvoiceRow>),
    /// An operator's decision on a row.
    Decision(RowKey, ReconciliationEvent),
    /// Nothing for the reconciliation (a payment, another record type).
    Nothing,
}

/// Decode one event (pure).
fn decode(event: &LogEvent) -> Result<Decoded, ProjectionError> {
    Ok(match event.aggregate_type.as_str() {
        CUSTOMER_TYPE => {
            let (service, customer) = split_scope(event)?;
            let profile = match event.decode().map_err(|e| unreadable(event, e))? {
                CustomerEvent::CustomerCreated { profile, .. }
                | CustomerEvent::CustomerUpdated { profile } => profile,
            };
            Decoded::Timezone(
                (service.to_string(), customer.to_string()),
                profile.timezone.unwrap_or_else(|| "UTC".to_string()),
            )
        }
        INVOICE_STREAM_TYPE => {
            let service = invoice_service(event)?.to_string();
            match event.decode().map_err(|e| unreadable(event, e))? {
                InvoiceEvent::InvoiceDrafted(header) => {
                    Decoded::Drafted(service, event.aggregate_id.clone(), Box::new(header))
                }
                InvoiceEvent::InvoiceFinalized(finalization) => {
                    Decoded::Finalized(service, event.aggregate_id.clone(), Box::new(finalization))
                }
                // Payments do not change what was billed.
                _ => Decoded::Nothing,
            }
        }
        IMPORTED_RECORD_TYPE => {
            let (service, source, kind, source_id) = imported_scope(event)?;
            if kind != RecordType::ExternalInvoice.as_str() {
                return Ok(Decoded::Nothing);
            }
            let fact: ImportedRecordEvent = event.decode().map_err(|e| unreadable(event, e))?;
            let record = SourceRecord::from_value(fact.record().clone())
                .map_err(|e| unreadable(event, format!("{e:?}")))?;
            let external = validate_external_invoice(&record.fields)
                .map_err(|e| unreadable(event, format!("{e:?}")))?;
            let compared = source_invoice(source_id, &external);
            Decoded::Source(Box::new(InvoiceRow {
                service: service.to_string(),
                side: "source",
                key: format!("{source}/{source_id}"),
                external_customer_id: external.external_customer_id.clone(),
                external_subscription_id: external.external_subscription_id.clone(),
                period: source_period(&external),
                counted: compared.counted,
                invoice: Stored::Source(Box::new(compared)),
            }))
        }
        RECONCILIATION_STREAM_TYPE => {
            let stream = "stream is not {service}/{subscription}/{period}";
            let (service, rest) = split_scope(event).map_err(|_| unreadable(event, stream))?;
            let Some((subscription, period)) = rest.rsplit_once('/') else {
                return Err(unreadable(event, stream));
            };
            let decision: ReconciliationEvent = event.decode().map_err(|e| unreadable(event, e))?;
            Decoded::Decision(
                (
                    service.to_string(),
                    subscription.to_string(),
                    period.to_string(),
                ),
                decision,
            )
        }
        _ => Decoded::Nothing,
    })
}

#[derive(Default)]
struct Fold {
    /// Customers' time zones, as loaded and as changed by the batch.
    timezones: HashMap<(String, String), String>,
    changed_timezones: BTreeMap<(String, String), String>,
    /// Invoice rows, as loaded and as changed by the batch.
    invoices: HashMap<(String, &'static str, String), InvoiceRow>,
    changed_invoices: BTreeSet<(String, &'static str, String)>,
    /// Rows to recompute.
    touched: BTreeSet<RowKey>,
    /// Acceptances, last one per row.
    acceptances: BTreeMap<RowKey, ReconciliationEvent>,
}

fn split_scope(event: &LogEvent) -> Result<(&str, &str), ProjectionError> {
    event
        .aggregate_id
        .split_once('/')
        .ok_or_else(|| unreadable(event, "aggregate id is not {service}/{key}"))
}

/// `{service}/{source}/{type}/{source_id}`.
fn imported_scope(event: &LogEvent) -> Result<(&str, &str, &str, &str), ProjectionError> {
    let mut parts = event.aggregate_id.splitn(4, '/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(service), Some(source), Some(kind), Some(source_id)) => {
            Ok((service, source, kind, source_id))
        }
        _ => Err(unreadable(
            event,
            "stream is not {service}/{source}/{type}/{source_id}",
        )),
    }
}

/// The service of an invoice stream (`{service}/{subscription}/{instant}`).
fn invoice_service(event: &LogEvent) -> Result<&str, ProjectionError> {
    split_scope(event).map(|(service, _)| service)
}

impl Fold {
    /// Load, in a few statements, the rows the batch's events build on.
    async fn preload(
        &mut self,
        conn: &mut PgConnection,
        events: &[Decoded],
    ) -> Result<(), ProjectionError> {
        let mut customers: BTreeSet<(String, String)> = BTreeSet::new();
        let mut keys: BTreeSet<(String, &'static str, String)> = BTreeSet::new();
        for event in events {
            match event {
                Decoded::Drafted(service, _, header) => {
                    customers.insert((service.clone(), header.external_customer_id.clone()));
                }
                Decoded::Finalized(service, stream, _) => {
                    keys.insert((service.clone(), "ledger", stream.clone()));
                }
                Decoded::Source(row) => {
                    keys.insert((row.service.clone(), "source", row.key.clone()));
                }
                _ => {}
            }
        }
        if !customers.is_empty() {
            let (services, ids): (Vec<String>, Vec<String>) = customers.into_iter().unzip();
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT t.service_code, t.external_customer_id, t.timezone \
                 FROM reconciliation_timezones t \
                 JOIN unnest($1::text[], $2::text[]) AS k(s, c) \
                   ON t.service_code = k.s AND t.external_customer_id = k.c",
            )
            .bind(&services)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
            for (service, customer, timezone) in rows {
                self.timezones.insert((service, customer), timezone);
            }
        }
        if !keys.is_empty() {
            let mut services = Vec::new();
            let mut sides = Vec::new();
            let mut ids = Vec::new();
            for (service, side, key) in keys {
                services.push(service);
                sides.push(side.to_string());
                ids.push(key);
            }
            type Loaded = (
                String,
                String,
                String,
                String,
                Option<String>,
                Option<String>,
                bool,
                String,
            );
            let rows: Vec<Loaded> = sqlx::query_as(
                "SELECT i.service_code, i.side, i.key, i.external_customer_id, \
                 i.external_subscription_id, i.period, i.counted, i.invoice \
                 FROM reconciliation_invoices i \
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(s, d, x) \
                   ON i.service_code = k.s AND i.side = k.d AND i.key = k.x",
            )
            .bind(&services)
            .bind(&sides)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
            for (service, side, key, customer, subscription, period, counted, invoice) in rows {
                let side = if side == "ledger" { "ledger" } else { "source" };
                let invoice =
                    Stored::parse(side, counted, &invoice).map_err(|e| stored(&key, e))?;
                self.invoices.insert(
                    (service.clone(), side, key.clone()),
                    InvoiceRow {
                        service,
                        side,
                        key,
                        external_customer_id: customer,
                        external_subscription_id: subscription,
                        period,
                        counted,
                        invoice,
                    },
                );
            }
        }
        Ok(())
    }

    fn put_invoice(&mut self, row: InvoiceRow) {
        let id = (row.service.clone(), row.side, row.key.clone());
        if let Some(old) = self.invoices.get(&id) {
            touch(&mut self.touched, old);
        }
        touch(&mut self.touched, &row);
        self.changed_invoices.insert(id.clone());
        self.invoices.insert(id, row);
    }

    fn apply(&mut self, event: &LogEvent, decoded: Decoded) -> Result<(), ProjectionError> {
        match decoded {
            Decoded::Timezone(key, timezone) => {
                self.timezones.insert(key.clone(), timezone.clone());
                self.changed_timezones.insert(key, timezone);
            }
            Decoded::Drafted(service, stream, header) => {
                let timezone = self
                    .timezones
                    .get(&(service.clone(), header.external_customer_id.clone()))
                    .cloned()
                    .unwrap_or_else(|| "UTC".to_string());
                let tz = timezone.parse().unwrap_or(chrono_tz::UTC);
                let row = InvoiceRow {
                    service,
                    side: "ledger",
                    key: stream,
                    external_customer_id: header.external_customer_id.clone(),
                    external_subscription_id: Some(header.external_subscription_id.clone()),
                    period: Some(ledger_period(&header, tz)),
                    counted: false,
                    invoice: Stored::Draft(Box::new(Draft {
                        draft: *header,
                        timezone,
                    })),
                };
                self.put_invoice(row);
            }
            Decoded::Finalized(service, stream, finalization) => {
                let id = (service, "ledger", stream);
                let Some(row) = self.invoices.get(&id) else {
                    return Err(unreadable(event, "finalized before it was drafted"));
                };
                let Stored::Draft(draft) = &row.invoice else {
                    return Err(unreadable(event, "finalized twice"));
                };
                let tz = draft.timezone.parse().unwrap_or(chrono_tz::UTC);
                let invoice = ledger_invoice(&draft.draft, &finalization, tz);
                let row = InvoiceRow {
                    service: row.service.clone(),
                    key: row.key.clone(),
                    external_customer_id: row.external_customer_id.clone(),
                    external_subscription_id: row.external_subscription_id.clone(),
                    period: row.period.clone(),
                    counted: true,
                    invoice: Stored::Ledger(Box::new(invoice)),
                    ..*row
                };
                self.put_invoice(row);
            }
            Decoded::Source(row) => self.put_invoice(*row),
            Decoded::Decision(key, decision) => {
                self.acceptances.insert(key, decision);
            }
            Decoded::Nothing => {}
        }
        Ok(())
    }
    /// Write the batch: time zones, invoices, acceptances, then every
    /// touched row recomputed from all of its invoices.
    async fn write(self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let rows = self.recomputed_rows(conn).await?;
        if !self.changed_timezones.is_empty() {
            let mut columns: [Vec<String>; 3] = Default::default();
            for ((service, customer), timezone) in &self.changed_timezones {
                columns[0].push(service.clone());
                columns[1].push(customer.clone());
                columns[2].push(timezone.clone());
            }
            sqlx::query(
                "INSERT INTO reconciliation_timezones (service_code, external_customer_id, timezone) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) \
                 ON CONFLICT (service_code, external_customer_id) DO UPDATE SET timezone = EXCLUDED.timezone",
            )
            .bind(&columns[0])
            .bind(&columns[1])
            .bind(&columns[2])
            .execute(&mut *conn)
            .await?;
        }
        if !self.changed_invoices.is_empty() {
            let rows: Vec<&InvoiceRow> = self
                .changed_invoices
                .iter()
                .map(|id| &self.invoices[id])
                .collect();
            sqlx::query(
                "INSERT INTO reconciliation_invoices (service_code, side, key, external_customer_id, \
                 external_subscription_id, period, counted, invoice) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                      $6::text[], $7::bool[], $8::text[]) \
                 ON CONFLICT (service_code, side, key) DO UPDATE SET \
                   external_customer_id = EXCLUDED.external_customer_id, \
                   external_subscription_id = EXCLUDED.external_subscription_id, \
                   period = EXCLUDED.period, counted = EXCLUDED.counted, invoice = EXCLUDED.invoice",
            )
            .bind(rows.iter().map(|r| r.service.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.side).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.external_customer_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.external_subscription_id.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.period.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.counted).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.invoice.to_json()).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        }
        for ((service, subscription, period), decision) in &self.acceptances {
            let ReconciliationEvent::ReconciliationAccepted {
                status,
                delta_cents,
                reason,
                accepted_by,
                accepted_at,
            } = decision;
            sqlx::query(
                "INSERT INTO reconciliation_acceptances (service_code, external_subscription_id, \
                 period, delta_cents, status, reason, accepted_by, accepted_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (service_code, external_subscription_id, period) DO UPDATE SET \
                   delta_cents = EXCLUDED.delta_cents, status = EXCLUDED.status, \
                   reason = EXCLUDED.reason, accepted_by = EXCLUDED.accepted_by, \
                   accepted_at = EXCLUDED.accepted_at",
            )
            .bind(service)
            .bind(subscription)
            .bind(period)
            .bind(delta_cents)
            .bind(status.as_str())
            .bind(reason)
            .bind(accepted_by)
            .bind::<DateTime<Utc>>(*accepted_at)
            .execute(&mut *conn)
            .await?;
        }
        write_rows(conn, rows).await
    }

    /// Every touched row recomputed from all of its counted invoices: those
    /// the batch holds (loaded or changed) and the others, read.
    async fn recomputed_rows(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<RowState>, ProjectionError> {
        let mut sides: BTreeMap<RowKey, (String, Vec<LedgerInvoice>, Vec<SourceInvoice>)> =
            BTreeMap::new();
        let mut add = |key: RowKey, customer: &str, invoice: &Stored| {
            let entry = sides
                .entry(key)
                .or_insert_with(|| (customer.to_string(), vec![], vec![]));
            match invoice {
                Stored::Ledger(invoice) => entry.1.push((**invoice).clone()),
                Stored::Source(invoice) => entry.2.push((**invoice).clone()),
                Stored::Draft(_) => {}
            }
        };
        if !self.touched.is_empty() {
            let mut keys: [Vec<&str>; 3] = Default::default();
            for (service, subscription, period) in &self.touched {
                keys[0].push(service);
                keys[1].push(subscription);
                keys[2].push(period);
            }
            type Counted = (String, String, String, String, String, String, String);
            let others: Vec<Counted> = sqlx::query_as(
                "SELECT i.service_code, i.external_subscription_id, i.period, i.side, i.key, \
                 i.external_customer_id, i.invoice FROM reconciliation_invoices i \
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(s, e, p) \
                   ON i.service_code = k.s AND i.external_subscription_id = k.e AND i.period = k.p \
                 WHERE i.counted",
            )
            .bind(&keys[0])
            .bind(&keys[1])
            .bind(&keys[2])
            .fetch_all(&mut *conn)
            .await?;
            for (service, subscription, period, side, key, customer, invoice) in others {
                let side = if side == "ledger" { "ledger" } else { "source" };
                if self
                    .invoices
                    .contains_key(&(service.clone(), side, key.clone()))
                {
                    continue;
                }
                let invoice = Stored::parse(side, true, &invoice).map_err(|e| stored(&key, e))?;
                add((service, subscription, period), &customer, &invoice);
            }
        }
        for row in self.invoices.values() {
            let (Some(subscription), Some(period)) = (&row.external_subscription_id, &row.period)
            else {
                continue;
            };
            let key = (row.service.clone(), subscription.clone(), period.clone());
            if row.counted && self.touched.contains(&key) {
                add(key, &row.external_customer_id, &row.invoice);
            }
        }
        Ok(self
            .touched
            .iter()
            .map(|key| {
                let compared = sides
                    .remove(key)
                    .and_then(|(customer, mut ledger, mut source)| {
                        put_in_row_order(&mut ledger, &mut source);
                        compare(&key.2, &ledger, &source).map(|c| (customer, c))
                    });
                (key.clone(), compared)
            })
            .collect())
    }
}

/// Mark the row an invoice belongs to for recomputing.
fn touch(touched: &mut BTreeSet<RowKey>, row: &InvoiceRow) {
    if let (Some(subscription), Some(period)) = (&row.external_subscription_id, &row.period) {
        touched.insert((row.service.clone(), subscription.clone(), period.clone()));
    }
}

fn stored(key: &str, error: serde_json::Error) -> ProjectionError {
    ProjectionError::UnreadableEvent {
        position: 0,
        event_type: format!("reconciliation invoice {key}"),
        reason: error.to_string(),
    }
}

/// A touched row: its comparison, or `None` when nothing is left to compare.
type RowState = (
    RowKey,
    Option<(String, aggregates::reconciliation::Comparison)>,
);

/// Write the recomputed rows: upsert those with a comparison, delete the rest.
async fn write_rows(conn: &mut PgConnection, states: Vec<RowState>) -> Result<(), ProjectionError> {
    let mut gone: [Vec<&str>; 3] = Default::default();
    let mut rows = Vec::new();
    for (key, state) in &states {
        match state {
            Some((customer, c)) => rows.push((key, customer, c)),
            None => {
                gone[0].push(&key.0);
                gone[1].push(&key.1);
                gone[2].push(&key.2);
            }
        }
    }
    if !gone[0].is_empty() {
        sqlx::query(
            "DELETE FROM reconciliation_rows r USING unnest($1::text[], $2::text[], $3::text[]) \
               AS k(s, e, p) \
             WHERE r.service_code = k.s AND r.external_subscription_id = k.e AND r.period = k.p",
        )
        .bind(&gone[0])
        .bind(&gone[1])
        .bind(&gone[2])
        .execute(&mut *conn)
        .await?;
    }
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO reconciliation_rows (service_code, external_subscription_id, period, \
         external_customer_id, status, ledger_fees_cents, ledger_taxes_cents, ledger_total_cents, \
         source_fees_cents, source_taxes_cents, source_total_cents, delta_cents) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
           $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], \
           $12::bigint[]) \
         ON CONFLICT (service_code, external_subscription_id, period) DO UPDATE SET \
           external_customer_id = EXCLUDED.external_customer_id, status = EXCLUDED.status, \
           ledger_fees_cents = EXCLUDED.ledger_fees_cents, ledger_taxes_cents = EXCLUDED.ledger_taxes_cents, \
           ledger_total_cents = EXCLUDED.ledger_total_cents, source_fees_cents = EXCLUDED.source_fees_cents, \
           source_taxes_cents = EXCLUDED.source_taxes_cents, source_total_cents = EXCLUDED.source_total_cents, \
           delta_cents = EXCLUDED.delta_cents",
    )
    .bind(rows.iter().map(|r| r.0 .0.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.0 .1.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.0 .2.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.status.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.ledger.fees_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.ledger.taxes_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.ledger.total_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.source.fees_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.source.taxes_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.source.total_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.2.delta_cents).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
