//! Stripe's webhook: signature verification (before anything is read), the
//! events used and how each finds its invoice, and their recording — each
//! Stripe event id once (stream `StripeEvent/{id}`, sequence 1: the log's
//! primary key enforces it), together with the payment fact it carries, in
//! one transaction.
//!
//! Verification is Stripe's scheme: `Stripe-Signature: t=…,v1=…[,v1=…]`,
//! HMAC-SHA256 in lowercase hex over `"{t}.{raw body}"`, keyed with the
//! endpoint secret exactly as given (`whsec_…`, not decoded), compared in
//! constant time; any `v1` under any configured secret may match; `t` must
//! lie within the tolerance of now.

use aggregates::invoice::{DisputeOutcome, PaymentFailure, PaymentSource, PaymentStatus};
use aggregates::invoice::{InvoiceError, PaymentUpdate};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use sqlx::{PgConnection, PgPool};
use subtle::ConstantTimeEq;

use super::{record_in, settle, PaymentFact, Recorded};
use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::store::{Actor, CommandMetadata};
use crate::invoicing::closer::InvoicingError;

/// The aggregate type of recorded Stripe events.
pub const STRIPE_EVENT_STREAM_TYPE: &str = "StripeEvent";

/// Stripe's default tolerance for a signature's timestamp.
pub const DEFAULT_TOLERANCE_SECONDS: i64 = 300;

/// How Stripe's webhook is verified.
#[derive(Debug, Clone, Default)]
pub struct StripeSettings {
    /// The endpoint secrets (several during a rotation); none: every event
    /// is refused.
    pub secrets: Vec<String>,
    /// How far a signature's timestamp may be from now, in seconds.
    pub tolerance_seconds: i64,
}

impl StripeSettings {
    /// From `LEDGER_STRIPE_WEBHOOK_SECRET`'s form: comma-separated secrets.
    pub fn from_list(secrets: Option<&str>, tolerance_seconds: i64) -> Self {
        Self {
            secrets: secrets
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            tolerance_seconds,
        }
    }
}

/// Why a delivery's signature was refused (the 400's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or no secret is configured.
    #[error("signature_missing")]
    Missing,
    /// The header has no `t` or no `v1`.
    #[error("signature_malformed")]
    Malformed,
    /// The timestamp is outside the tolerance.
    #[error("timestamp_outside_tolerance")]
    Stale,
    /// No `v1` matches under any secret.
    #[error("signature_mismatch")]
    Mismatch,
}

impl SignatureError {
    /// The reason code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "signature_missing",
            Self::Malformed => "signature_malformed",
            Self::Stale => "timestamp_outside_tolerance",
            Self::Mismatch => "signature_mismatch",
        }
    }
}

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in message {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `v1` signature Stripe computes for `payload` at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    hex(&hmac_sha256(
        secret.as_bytes(),
        &[timestamp.to_string().as_bytes(), b".", payload],
    ))
}

/// Verify a delivery's `Stripe-Signature` header over its raw body.
pub fn verify(
    settings: &StripeSettings,
    header: Option<&str>,
    payload: &[u8],
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    if settings.secrets.is_empty() {
        return Err(SignatureError::Missing);
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        match item.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now.timestamp() - timestamp).abs() > settings.tolerance_seconds {
        return Err(SignatureError::Stale);
    }
    let matches = settings.secrets.iter().any(|secret| {
        let expected = signature(secret, timestamp, payload);
        signatures
            .iter()
            .any(|given| bool::from(expected.as_bytes().ct_eq(given.as_bytes())))
    });
    matches.then_some(()).ok_or(SignatureError::Mismatch)
}

/// What the ledger did with a Stripe event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// `applied`, `unchanged`, `unmatched` or `duplicate`.
    pub status: &'static str,
    /// Why it was unmatched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The invoice it concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lago_invoice_id: Option<uuid::Uuid>,
}

/// The fields of a Stripe event the ledger reads.
struct StripeEvent<'a> {
    id: &'a str,
    event_type: &'a str,
    created: DateTime<Utc>,
    object: &'a Value,
}

fn parse(body: &Value) -> Option<StripeEvent<'_>> {
    Some(StripeEvent {
        id: body.get("id")?.as_str().filter(|id| !id.is_empty())?,
        event_type: body.get("type")?.as_str()?,
        created: DateTime::from_timestamp(body.get("created")?.as_i64()?, 0)?,
        object: body.get("data")?.get("object")?,
    })
}

fn text<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get(field).and_then(Value::as_str)
}

/// The payment intent an event concerns: the object itself for
/// `payment_intent.*`, its `payment_intent` field for charges and disputes.
fn payment_intent<'a>(event: &StripeEvent<'a>) -> Option<&'a str> {
    if event.event_type.starts_with("payment_intent.") {
        text(event.object, "id")
    } else {
        text(event.object, "payment_intent")
    }
}

/// The payment fact an event carries (none: a type the ledger does not use).
fn fact(event: &StripeEvent<'_>) -> Option<PaymentFact> {
    let source = PaymentSource::Stripe {
        event_id: event.id.to_string(),
        event_type: event.event_type.to_string(),
        payment_intent: payment_intent(event).map(String::from),
    };
    let status = |status, failure| {
        PaymentFact::Status(PaymentUpdate {
            status,
            occurred_at: event.created,
            source: source.clone(),
            failure,
            provider_customer_id: text(event.object, "customer").map(String::from),
        })
    };
    let object = event.object;
    Some(match event.event_type {
        "payment_intent.succeeded" => status(PaymentStatus::Succeeded, None),
        "payment_intent.payment_failed" => {
            let error = object.get("last_payment_error").unwrap_or(&Value::Null);
            status(
                PaymentStatus::Failed,
                Some(PaymentFailure {
                    code: text(error, "code").map(String::from),
                    message: text(error, "message").map(String::from),
                }),
            )
        }
        "payment_intent.canceled" => status(
            PaymentStatus::Failed,
            Some(PaymentFailure {
                code: Some("canceled".into()),
                message: text(object, "cancellation_reason").map(String::from),
            }),
        ),
        "charge.refunded" => PaymentFact::Refund {
            refunded_amount_cents: object.get("amount_refunded")?.as_i64()?,
            occurred_at: event.created,
            source,
        },
        "charge.dispute.created" => PaymentFact::Dispute {
            outcome: None,
            occurred_at: event.created,
            source,
        },
        "charge.dispute.closed" => PaymentFact::Dispute {
            outcome: Some(match text(object, "status") {
                Some("won") => DisputeOutcome::Won,
                Some("lost") => DisputeOutcome::Lost,
                _ => DisputeOutcome::Other,
            }),
            occurred_at: event.created,
            source,
        },
        _ => return None,
    })
}

/// An invoice a Stripe event names, as the invoices projection knows it.
#[derive(sqlx::FromRow)]
struct Target {
    stream_id: String,
    lago_id: uuid::Uuid,
    shadow: bool,
}

/// The invoice an event is for: the payment intent's (or charge's)
/// `metadata.lago_invoice_id`, else `metadata.invoice_number`, else the
/// invoice an earlier event of the same payment intent paid.
async fn target(
    conn: &mut PgConnection,
    event: &StripeEvent<'_>,
) -> Result<Option<Target>, sqlx::Error> {
    const SELECT: &str = "SELECT stream_id, lago_id, shadow FROM invoices";
    let metadata = event.object.get("metadata").unwrap_or(&Value::Null);
    if let Some(id) = text(metadata, "lago_invoice_id").and_then(|id| id.parse::<uuid::Uuid>().ok())
    {
        let found = sqlx::query_as(&format!("{SELECT} WHERE lago_id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    if let Some(number) = text(metadata, "invoice_number") {
        let found = sqlx::query_as(&format!("{SELECT} WHERE number = $1 LIMIT 1"))
            .bind(number)
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    let Some(intent) = payment_intent(event) else {
        return Ok(None);
    };
    sqlx::query_as(&format!(
        "{SELECT} WHERE stream_id = (SELECT invoice_stream FROM stripe_payment_intents \
         WHERE payment_intent = $1)"
    ))
    .bind(intent)
    .fetch_optional(&mut *conn)
    .await
}

/// Record one verified Stripe event: once per event id, with the payment
/// fact it carries when it names a payable invoice.
pub async fn receive(pool: &PgPool, body: &Value) -> Result<Outcome, InvoicingError> {
    let Some(event) = parse(body) else {
        return Ok(unmatched("not_a_stripe_event", None));
    };
    let mut attempts = 0;
    loop {
        let mut tx = pool.begin().await?;
        // A duplicate releases at once what this delivery would have written.
        let outcome = receive_in(&mut tx, &event, body).await.map(|outcome| {
            let keep = outcome.status != "duplicate";
            (outcome, keep)
        });
        if let Some(outcome) = settle(tx, outcome, &mut attempts).await? {
            return Ok(outcome);
        }
    }
}

fn unmatched(reason: &'static str, lago_invoice_id: Option<uuid::Uuid>) -> Outcome {
    Outcome {
        status: "unmatched",
        reason: Some(reason),
        lago_invoice_id,
    }
}

async fn receive_in(
    conn: &mut PgConnection,
    event: &StripeEvent<'_>,
    body: &Value,
) -> Result<Outcome, InvoicingError> {
    let metadata = || CommandMetadata::internal(Actor::PaymentProvider("stripe"));
    let outcome = match (fact(event), target(conn, event).await?) {
        (None, _) => unmatched("event_type_not_used", None),
        (Some(_), None) => unmatched("invoice_not_found", None),
        (Some(_), Some(target)) if target.shadow => {
            unmatched("shadow_invoice_not_payable", Some(target.lago_id))
        }
        (Some(fact), Some(target)) => {
            if let Some(intent) = payment_intent(event) {
                sqlx::query(
                    "INSERT INTO stripe_payment_intents (payment_intent, invoice_stream) \
                     VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(intent)
                .bind(&target.stream_id)
                .execute(&mut *conn)
                .await?;
            }
            match record_in(conn, &target.stream_id, &fact, metadata()).await {
                Ok(recorded) => Outcome {
                    status: match recorded {
                        Recorded::Applied => "applied",
                        Recorded::Unchanged => "unchanged",
                    },
                    reason: None,
                    lago_invoice_id: Some(target.lago_id),
                },
                Err(InvoicingError::Refused(InvoiceError::NotFinalized)) => {
                    unmatched("invoice_not_finalized", Some(target.lago_id))
                }
                Err(InvoicingError::Refused(InvoiceError::Shadow)) => {
                    unmatched("shadow_invoice_not_payable", Some(target.lago_id))
                }
                Err(other) => return Err(other),
            }
        }
    };
    let recorded = NewEvent {
        stream: event.id.to_string(),
        sequence: 1,
        event_type: "StripeEventReceived".into(),
        payload: serde_json::json!({
            "StripeEventReceived": {
                "id": event.id,
                "type": event.event_type,
                "created": event.created,
                "outcome": outcome,
                "event": body,
            }
        }),
    };
    let written = append_events(
        conn,
        STRIPE_EVENT_STREAM_TYPE,
        &[recorded],
        metadata(),
        OnConflict::Skip,
    )
    .await?;
    if written == 0 {
        // Delivered before: the caller rolls back whatever this delivery
        // would have recorded.
        return Ok(Outcome {
            status: "duplicate",
            reason: None,
            lago_invoice_id: outcome.lago_invoice_id,
        });
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secrets: &str) -> StripeSettings {
        StripeSettings::from_list(Some(secrets), DEFAULT_TOLERANCE_SECONDS)
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    #[test]
    fn the_signature_is_stripes_hex_hmac_over_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{"id":"evt_1"}' |
        //   openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            signature("whsec_test", 1_700_000_000, br#"{"id":"evt_1"}"#),
            "c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925"
        );
    }

    #[test]
    fn any_v1_under_any_secret_verifies_within_the_tolerance() {
        let body = br#"{"id":"evt_1"}"#;
        let good = signature("whsec_new", 1_700_000_000, body);
        let header = format!("t=1700000000,v1=deadbeef,v1={good}");
        let now = at(1_700_000_100);
        assert_eq!(
            verify(&settings("whsec_old, whsec_new"), Some(&header), body, now),
            Ok(())
        );
        assert_eq!(
            verify(&settings("whsec_old"), Some(&header), body, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                &settings("whsec_new"),
                Some(&header),
                br#"{"id":"evt_2"}"#,
                now
            ),
            Err(SignatureError::Mismatch),
            "a tampered body"
        );
        assert_eq!(
            verify(
                &settings("whsec_new"),
                Some(&header),
                body,
                at(1_700_000_301)
            ),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&settings("whsec_new"), None, body, now),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(&settings(""), Some(&header), body, now),
            Err(SignatureError::Missing),
            "no secret configured refuses everything"
        );
        assert_eq!(
            verify(&settings("whsec_new"), Some("v1=abc"), body, now),
            Err(SignatureError::Malformed)
        );
    }
}
