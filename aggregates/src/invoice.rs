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
//!
//! Payments are facts on the same stream: a payment status set through the
//! API or by a payment provider's event (ordered by when the provider says it
//! happened, so a late `failed` never overrides a later `succeeded`),
//! refunds, disputes and the moment the invoice became overdue. A shadow
//! invoice is never payable.

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
    /// Days after the issuing date the payment is due (the customer's
    /// `net_payment_term` when it was drafted).
    #[serde(default)]
    pub net_payment_term: i64,
}

impl InvoiceHeader {
    /// The date its payment is due: the issuing date plus the payment term.
    pub fn payment_due_date(&self) -> chrono::NaiveDate {
        self.issuing_date + chrono::Duration::days(self.net_payment_term)
    }
}

/// Whether an invoice is paid (Lago's `payment_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Not yet settled (every finalized invoice starts here).
    #[default]
    Pending,
    /// Paid.
    Succeeded,
    /// The payment failed.
    Failed,
}

impl PaymentStatus {
    /// Lago's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// From Lago's name.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|status| status.as_str() == text)
    }
}

/// Who reported a payment fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PaymentSource {
    /// The service, through `PUT /invoices/{id}` (settled elsewhere).
    Api,
    /// A Stripe event.
    Stripe {
        /// Stripe's event id (`evt_…`).
        event_id: String,
        /// Stripe's event type.
        event_type: String,
        /// The payment intent it concerns.
        payment_intent: Option<String>,
    },
}

/// A payment status change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentUpdate {
    /// The new status.
    pub status: PaymentStatus,
    /// When it happened, by the reporter's clock (Stripe's `created`; now
    /// for the API): updates older than the current status are ignored.
    pub occurred_at: DateTime<Utc>,
    /// Who reported it.
    pub source: PaymentSource,
    /// The provider's reason for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<PaymentFailure>,
    /// The provider's customer id, when the event named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_customer_id: Option<String>,
}

/// Why a payment failed, as the provider said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailure {
    /// The provider's code (Stripe's `last_payment_error.code`).
    pub code: Option<String>,
    /// The provider's message.
    pub message: Option<String>,
}

/// How a dispute ended (Stripe's dispute `status` on `charge.dispute.closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeOutcome {
    /// The merchant won: the payment stands.
    Won,
    /// The customer won: the money went back.
    Lost,
    /// Closed otherwise (e.g. a warning closed).
    Other,
}

/// An invoice's payment state, folded from its payment events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PaymentState {
    /// The status.
    pub status: PaymentStatus,
    /// When the status was set (the reporter's clock).
    pub status_at: Option<DateTime<Utc>>,
    /// Past its due date unpaid.
    pub overdue: bool,
    /// Refunded so far, in cents.
    pub refunded_amount_cents: i64,
    /// A dispute is open.
    pub disputed: bool,
    /// When a dispute was lost.
    pub dispute_lost_at: Option<DateTime<Utc>>,
    /// The time of the latest dispute fact (orders dispute events).
    pub dispute_at: Option<DateTime<Utc>>,
}

impl PaymentState {
    /// Fold one payment event (other events change nothing).
    pub fn apply(&mut self, event: &InvoiceEvent) {
        match event {
            InvoiceEvent::InvoicePaymentStatusUpdated(update) => {
                self.status = update.status;
                self.status_at = Some(update.occurred_at);
                if update.status == PaymentStatus::Succeeded {
                    self.overdue = false;
                }
            }
            InvoiceEvent::InvoicePaymentOverdue { .. } => self.overdue = true,
            InvoiceEvent::InvoicePaymentRefunded {
                refunded_amount_cents,
                ..
            } => self.refunded_amount_cents = *refunded_amount_cents,
            InvoiceEvent::InvoicePaymentDisputed { occurred_at, .. } => {
                self.disputed = true;
                self.dispute_at = Some(*occurred_at);
            }
            InvoiceEvent::InvoicePaymentDisputeClosed {
                outcome,
                occurred_at,
                ..
            } => {
                self.disputed = false;
                self.dispute_at = Some(*occurred_at);
                if *outcome == DisputeOutcome::Lost {
                    self.dispute_lost_at = Some(*occurred_at);
                }
            }
            InvoiceEvent::InvoiceDrafted(_) | InvoiceEvent::InvoiceFinalized(_) => {}
        }
    }
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
    /// Its payment status changed.
    InvoicePaymentStatusUpdated(PaymentUpdate),
    /// Its due date passed unpaid.
    InvoicePaymentOverdue {
        /// When it was noticed.
        overdue_at: DateTime<Utc>,
    },
    /// (Part of) its payment was refunded.
    InvoicePaymentRefunded {
        /// Refunded in total so far, in cents.
        refunded_amount_cents: i64,
        /// When (the provider's clock).
        occurred_at: DateTime<Utc>,
        /// Who reported it.
        source: PaymentSource,
    },
    /// The customer disputed its payment.
    InvoicePaymentDisputed {
        /// When (the provider's clock).
        occurred_at: DateTime<Utc>,
        /// Who reported it.
        source: PaymentSource,
    },
    /// A dispute of its payment closed.
    InvoicePaymentDisputeClosed {
        /// How.
        outcome: DisputeOutcome,
        /// When (the provider's clock).
        occurred_at: DateTime<Utc>,
        /// Who reported it.
        source: PaymentSource,
    },
}

impl DomainEvent for InvoiceEvent {
    fn event_type(&self) -> String {
        match self {
            Self::InvoiceDrafted(_) => "InvoiceDrafted",
            Self::InvoiceFinalized(_) => "InvoiceFinalized",
            Self::InvoicePaymentStatusUpdated(_) => "InvoicePaymentStatusUpdated",
            Self::InvoicePaymentOverdue { .. } => "InvoicePaymentOverdue",
            Self::InvoicePaymentRefunded { .. } => "InvoicePaymentRefunded",
            Self::InvoicePaymentDisputed { .. } => "InvoicePaymentDisputed",
            Self::InvoicePaymentDisputeClosed { .. } => "InvoicePaymentDisputeClosed",
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
    /// Only a finalized invoice can be paid.
    #[error("invoice is not finalized")]
    NotFinalized,
    /// A shadow invoice is for comparison only: never payable.
    #[error("a shadow invoice is never payable")]
    Shadow,
}

/// The write model of an invoice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invoice {
    header: Option<InvoiceHeader>,
    finalization: Option<InvoiceFinalization>,
    payment: PaymentState,
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
        self.payment.apply(&event);
        match event {
            InvoiceEvent::InvoiceDrafted(header) => self.header = Some(header),
            InvoiceEvent::InvoiceFinalized(finalization) => self.finalization = Some(finalization),
            _ => {}
        }
    }

    /// Its payment state.
    pub fn payment(&self) -> &PaymentState {
        &self.payment
    }

    /// Payments apply to finalized live invoices only.
    fn payable(&self) -> Result<(), InvoiceError> {
        let header = self.header.as_ref().ok_or(InvoiceError::NotFound)?;
        if header.shadow {
            return Err(InvoiceError::Shadow);
        }
        if self.finalization.is_none() {
            return Err(InvoiceError::NotFinalized);
        }
        Ok(())
    }

    /// Record a payment status. Providers deliver out of order, so the
    /// reporter's clock decides: an update older than the latest one known
    /// changes nothing; the same status reported later is recorded too (it
    /// moves the latest time on, so an older report of another status,
    /// arriving after it, still loses).
    pub fn update_payment(
        &self,
        update: PaymentUpdate,
    ) -> Result<Option<InvoiceEvent>, InvoiceError> {
        self.payable()?;
        let latest = self.payment.status_at;
        let stale = latest.is_some_and(|at| update.occurred_at < at);
        let nothing_new = update.status == self.payment.status
            && latest.is_none_or(|at| update.occurred_at <= at);
        if stale || nothing_new {
            return Ok(None);
        }
        Ok(Some(InvoiceEvent::InvoicePaymentStatusUpdated(update)))
    }

    /// Record a refund, given the total refunded so far (Stripe's
    /// `amount_refunded`): nothing unless it grew.
    pub fn refund(
        &self,
        refunded_amount_cents: i64,
        occurred_at: DateTime<Utc>,
        source: PaymentSource,
    ) -> Result<Option<InvoiceEvent>, InvoiceError> {
        self.payable()?;
        Ok(
            (refunded_amount_cents > self.payment.refunded_amount_cents).then_some(
                InvoiceEvent::InvoicePaymentRefunded {
                    refunded_amount_cents,
                    occurred_at,
                    source,
                },
            ),
        )
    }

    /// Record a dispute opened (`outcome` none) or closed: nothing when an
    /// equal or later dispute fact is already recorded.
    pub fn dispute(
        &self,
        outcome: Option<DisputeOutcome>,
        occurred_at: DateTime<Utc>,
        source: PaymentSource,
    ) -> Result<Option<InvoiceEvent>, InvoiceError> {
        self.payable()?;
        if self.payment.dispute_at.is_some_and(|at| occurred_at < at) {
            return Ok(None);
        }
        Ok(Some(match outcome {
            None if self.payment.disputed => return Ok(None),
            None => InvoiceEvent::InvoicePaymentDisputed {
                occurred_at,
                source,
            },
            Some(outcome) => InvoiceEvent::InvoicePaymentDisputeClosed {
                outcome,
                occurred_at,
                source,
            },
        }))
    }

    /// The moment after which it is overdue: the end of its due date in
    /// `tz` (an invoice due on the 15th is overdue from the 16th).
    pub fn overdue_from(&self, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
        let header = self.header.as_ref()?;
        let next_day = header.payment_due_date().succ_opt()?;
        Some(crate::period::local_midnight(next_day, tz))
    }

    /// Mark it overdue at `now` when its due date has passed unpaid.
    pub fn mark_overdue(&self, now: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<InvoiceEvent> {
        self.payable().ok()?;
        let due_passed = self.overdue_from(tz).is_some_and(|from| now >= from);
        (due_passed && !self.payment.overdue && self.payment.status != PaymentStatus::Succeeded)
            .then_some(InvoiceEvent::InvoicePaymentOverdue { overdue_at: now })
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
            net_payment_term: 0,
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

    fn paid(status: PaymentStatus, at: &str) -> PaymentUpdate {
        PaymentUpdate {
            status,
            occurred_at: at.parse().unwrap(),
            source: PaymentSource::Api,
            failure: None,
            provider_customer_id: None,
        }
    }

    #[test]
    fn the_latest_report_wins_whatever_order_they_arrive_in() {
        let mut invoice = Invoice::default();
        assert_eq!(
            invoice.update_payment(paid(PaymentStatus::Succeeded, "2026-12-01T00:00:07Z")),
            Err(InvoiceError::NotFound)
        );
        invoice.apply(invoice.draft(header()).unwrap());
        assert_eq!(
            invoice.update_payment(paid(PaymentStatus::Succeeded, "2026-12-01T00:00:07Z")),
            Err(InvoiceError::NotFinalized)
        );
        invoice.apply(invoice.finalize(finalization()).unwrap());
        let record = |invoice: &mut Invoice, status, at| {
            let event = invoice.update_payment(paid(status, at)).unwrap();
            let recorded = event.is_some();
            if let Some(event) = event {
                invoice.apply(event);
            }
            recorded
        };
        use PaymentStatus::{Failed, Pending, Succeeded};
        assert!(
            !record(&mut invoice, Pending, "2026-12-01T00:00:01Z"),
            "pending already"
        );
        assert!(record(&mut invoice, Succeeded, "2026-12-01T00:00:07Z"));
        assert!(
            record(&mut invoice, Succeeded, "2026-12-01T00:00:09Z"),
            "the clock moves on"
        );
        assert!(
            !record(&mut invoice, Succeeded, "2026-12-01T00:00:09Z"),
            "the same report"
        );
        assert!(
            !record(&mut invoice, Failed, "2026-12-01T00:00:08Z"),
            "older than the latest"
        );
        assert_eq!(invoice.payment().status, Succeeded);
        assert!(record(&mut invoice, Failed, "2026-12-01T00:00:10Z"));
        assert_eq!(invoice.payment().status, Failed);
        let mut shadow = Invoice::default();
        shadow.apply(InvoiceEvent::InvoiceDrafted(InvoiceHeader {
            shadow: true,
            ..header()
        }));
        shadow.apply(shadow.finalize(finalization()).unwrap());
        assert_eq!(
            shadow.update_payment(paid(Succeeded, "2026-12-01T00:00:07Z")),
            Err(InvoiceError::Shadow)
        );
        assert_eq!(
            shadow.mark_overdue("2027-01-01T00:00:00Z".parse().unwrap(), chrono_tz::UTC),
            None
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
