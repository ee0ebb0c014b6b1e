//! Projection `invoices`: every invoice, draft or finalized, as the
//! Lago-compatible API lists and shows it. A draft's lines are computed
//! when it is read; a finalized invoice's are those its event recorded.

use aggregates::invoice::{InvoiceEvent, INVOICE_STREAM_TYPE};
use async_trait::async_trait;
use sqlx::PgConnection;

use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `invoices` projection.
pub struct Invoices;

#[async_trait]
impl Projection for Invoices {
    fn name(&self) -> &'static str {
        "invoices"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["invoices"]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[INVOICE_STREAM_TYPE]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != INVOICE_STREAM_TYPE {
            return Ok(());
        }
        let invoice_event: InvoiceEvent = serde::Deserialize::deserialize(&event.payload)
            .map_err(|e| ProjectionError::unreadable(event, e))?;
        match invoice_event {
            InvoiceEvent::InvoiceDrafted(header) => {
                sqlx::query(
                    "INSERT INTO invoices (service_code, lago_id, stream_id, subscription_lago_id, \
                     external_subscription_id, external_customer_id, issued_at, issuing_date, status, \
                     shadow, grace_until, header, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'draft', $9, $10, $11, $12, $12)",
                )
                .bind(&header.service)
                .bind(header.lago_id)
                .bind(&event.aggregate_id)
                .bind(header.subscription_lago_id)
                .bind(&header.external_subscription_id)
                .bind(&header.external_customer_id)
                .bind(header.issued_at)
                .bind(header.issuing_date)
                .bind(header.shadow)
                .bind(header.grace_until)
                .bind(serde_json::to_value(&header).expect("serializable"))
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
            InvoiceEvent::InvoiceFinalized(finalization) => {
                sqlx::query(
                    "UPDATE invoices SET status = 'finalized', number = $2, sequential_number = $3, \
                     finalization = $4, updated_at = $5 WHERE stream_id = $1",
                )
                .bind(&event.aggregate_id)
                .bind(&finalization.number)
                .bind(finalization.sequential_number)
                .bind(serde_json::to_value(&finalization).expect("serializable"))
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }
}
