//! `Invoice`: one subscription's invoice at one issuing instant (see
//! [`crate::billing`]). Its stream id is (service, subscription, instant), so
//! the log's primary key allows exactly one invoice per subscription and
//! instant, whoever races to write it.
//!
//! An invoice is drafted (`InvoiceDrafted`, no number; its lines are computed
//! when read, so a draft keeps picking up late usage), then finalized
//! (`InvoiceFinalized`): the event records every fee line, the taxes and
//! totals, its number and the log position it was computed as of. Nothing
//! changes a finalized invoice; later usage of its window is billed as an
//! adjustment on a later invoice.

use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::billing::{AppliedTax, Fee, InvoiceTotals, InvoicingReason, LogPosition};
use crate::period::BillingPeriod;

/// The aggregate type of invoice streams.
pub const INVOICE_STREAM_TYPE: &str = "Invoice";

/// The stream of a subscription's invoice at `issued_at`.
pub fn invoice_stream_id(
    service: &str,
    subscription_lago_id: Uuid,
    issued_at: DateTime<Utc>,
) -> String {
    format!(
        "{service}/{subscription_lago_id}/{}",
        issued_at.to_rfc3339_opts(SecondsFormat::Micros, true)
    )
}

/// An invoice number: unique and gapless per service, live and shadow
/// invoices counted apart (a shadow invoice never takes a live number).
pub fn invoice_number(service: &str, shadow: bool, sequential_number: i64) -> String {
    let prefix = service.to_uppercase();
    if shadow {
        format!("SHADOW-{prefix}-{sequential_number:06}")
    } else {
        format!("{prefix}-{sequential_number:06}")
    }
}

/// What an invoice is for, fixed when it is drafted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceHeader {
    /// Its id.
    pub lago_id: Uuid,
    /// The service that bills it.
    pub service: String,
    /// The subscription.
    pub subscription_lago_id: Uuid,
    /// The service's id for the subscription.
    pub external_subscription_id: String,
    /// The customer.
    pub customer_lago_id: Uuid,
    /// The service's id for the customer.
    pub external_customer_id: String,
    /// The issuing instant.
    pub issued_at: DateTime<Utc>,
    /// The issuing instant's date in the customer's time zone.
    pub issuing_date: chrono::NaiveDate,
    /// Why it was issued.
    pub reason: InvoicingReason,
    /// ISO 4217.
    pub currency: String,
    /// Comparison only: never paid, never sent.
    pub shadow: bool,
    /// The plan it was issued on.
    pub lago_plan_id: Uuid,
    /// The window its flat fee covers (Lago's `subscription_from/to`).
    pub subscription_window: Option<BillingPeriod>,
    /// The window its usage covers (Lago's `charges_from/to`).
    pub charges_window: Option<BillingPeriod>,
    /// Finalized automatically from then on (the customer's grace period).
    pub grace_until: DateTime<Utc>,
    /// When it was drafted.
    pub drafted_at: DateTime<Utc>,
}

/// What finalization fixed for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceFinalization {
    /// Its number.
    pub number: String,
    /// Its place in the service's sequence.
    pub sequential_number: i64,
    /// When.
    pub finalized_at: DateTime<Utc>,
    /// The log position its usage was read as of.
    pub as_of: LogPosition,
    /// Every line.
    pub fees: Vec<Fee>,
    /// Taxes by code.
    pub taxes: Vec<AppliedTax>,
    /// Totals (sums of the lines).
    pub totals: InvoiceTotals,
}

/// Facts about an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvoiceEvent {
    /// Drafted.
    InvoiceDrafted(InvoiceHeader),
    /// Finalized.
    InvoiceFinalized(InvoiceFinalization),
}

impl DomainEvent for InvoiceEvent {
    fn event_type(&self) -> String {
        match self {
            Self::InvoiceDrafted(_) => "InvoiceDrafted",
            Self::InvoiceFinalized(_) => "InvoiceFinalized",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// Why an invoice command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    /// There is no such invoice.
    #[error("invoice not found")]
    NotFound,
    /// Finalized invoices never change.
    #[error("invoice is already finalized")]
    AlreadyFinalized,
}

/// The write model of an invoice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invoice {
    header: Option<InvoiceHeader>,
    finalization: Option<InvoiceFinalization>,
    version: i64,
}

impl Invoice {
    /// Fold its events.
    pub fn from_events(events: impl IntoIterator<Item = InvoiceEvent>) -> Invoice {
        let mut invoice = Invoice::default();
        for event in events {
            invoice.apply(event);
        }
        invoice
    }

    /// Apply one event.
    pub fn apply(&mut self, event: InvoiceEvent) {
        self.version += 1;
        match event {
            InvoiceEvent::InvoiceDrafted(header) => self.header = Some(header),
            InvoiceEvent::InvoiceFinalized(finalization) => self.finalization = Some(finalization),
        }
    }

    /// How many events it has (the next one's sequence is this + 1).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The header, once drafted.
    pub fn header(&self) -> Option<&InvoiceHeader> {
        self.header.as_ref()
    }

    /// The finalization, once finalized.
    pub fn finalization(&self) -> Option<&InvoiceFinalization> {
        self.finalization.as_ref()
    }

    /// Draft it; drafting an existing invoice changes nothing.
    pub fn draft(&self, header: InvoiceHeader) -> Option<InvoiceEvent> {
        self.header
            .is_none()
            .then_some(InvoiceEvent::InvoiceDrafted(header))
    }

    /// Finalize a draft.
    pub fn finalize(
        &self,
        finalization: InvoiceFinalization,
    ) -> Result<InvoiceEvent, InvoiceError> {
        if self.header.is_none() {
            return Err(InvoiceError::NotFound);
        }
        if self.finalization.is_some() {
            return Err(InvoiceError::AlreadyFinalized);
        }
        Ok(InvoiceEvent::InvoiceFinalized(finalization))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> InvoiceHeader {
        let at: DateTime<Utc> = "2026-12-01T05:00:00Z".parse().unwrap();
        InvoiceHeader {
            lago_id: Uuid::nil(),
            service: "nexacloud".into(),
            subscription_lago_id: Uuid::nil(),
            external_subscription_id: "dep_1".into(),
            customer_lago_id: Uuid::nil(),
            external_customer_id: "cus_1".into(),
            issued_at: at,
            issuing_date: at.date_naive(),
            reason: InvoicingReason::SubscriptionPeriodic,
            currency: "CAD".into(),
            shadow: false,
            lago_plan_id: Uuid::nil(),
            subscription_window: None,
            charges_window: None,
            grace_until: at,
            drafted_at: at,
        }
    }

    fn finalization() -> InvoiceFinalization {
        InvoiceFinalization {
            number: invoice_number("nexacloud", false, 1),
            sequential_number: 1,
            finalized_at: "2026-12-01T05:00:00Z".parse().unwrap(),
            as_of: LogPosition::default(),
            fees: vec![],
            taxes: vec![],
            totals: InvoiceTotals::default(),
        }
    }

    #[test]
    fn a_draft_is_finalized_once_and_never_again() {
        let invoice = Invoice::default();
        assert_eq!(
            invoice.finalize(finalization()),
            Err(InvoiceError::NotFound)
        );
        let drafted = invoice.draft(header()).expect("first draft");
        let mut invoice = Invoice::from_events([drafted]);
        assert_eq!(
            invoice.draft(header()),
            None,
            "drafting again changes nothing"
        );
        let finalized = invoice.finalize(finalization()).unwrap();
        invoice.apply(finalized);
        assert_eq!(invoice.version(), 2);
        assert_eq!(
            invoice.finalize(finalization()),
            Err(InvoiceError::AlreadyFinalized)
        );
    }

    #[test]
    fn numbers_are_per_service_and_shadow_invoices_are_numbered_apart() {
        assert_eq!(invoice_number("nexacloud", false, 42), "NEXACLOUD-000042");
        assert_eq!(
            invoice_number("nexacloud", true, 7),
            "SHADOW-NEXACLOUD-000007"
        );
    }

    #[test]
    fn the_stream_id_names_the_service_subscription_and_instant() {
        assert_eq!(
            invoice_stream_id(
                "nexacloud",
                Uuid::nil(),
                "2026-12-01T05:00:00Z".parse().unwrap()
            ),
            "nexacloud/00000000-0000-0000-0000-000000000000/2026-12-01T05:00:00.000000Z"
        );
    }
}
