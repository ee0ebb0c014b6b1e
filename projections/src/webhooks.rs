//! Projection `webhooks`: the outbox. Each webhook-worthy event of the log
//! becomes one message per endpoint of its service that wants its type
//! (enabled and not deleted at that point of the log), with an id derived
//! from the event and the endpoint — a rebuild, a restart or a second
//! instance folds the same event into the same id, never a second message.
//!
//! The body is Lago's envelope `{"webhook_type", "object_type",
//! "organization_id", "<object_type>": {…}}` with the object as the API
//! serializes it, written once as text: the bytes signed and sent on every
//! attempt. Invoices carry their subscription (with its `metadata`, where a
//! service keeps its own ids) under `subscriptions`.
//!
//! Shadow never speaks: a shadow invoice, and every event of a shadow
//! subscription until it is flipped, produces no message.

use aggregates::invoice::{
    DisputeOutcome, InvoiceEvent, InvoiceFinalization, InvoiceHeader, PaymentState, PaymentStatus,
    INVOICE_STREAM_TYPE,
};
use aggregates::subscription::SubscriptionEvent;
use aggregates::webhook_endpoint::{EndpointConfig, WebhookEndpointEvent};
use aggregates::{Subscription, WebhookEndpoint};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde_json::{json, Value};
use sqlx::PgConnection;
use std::collections::HashMap;

use uuid::Uuid;

use crate::catalog::{subscription_changes, subscription_resource};
use crate::invoices::{invoice_json, Lines};
use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `webhooks` projection.
pub struct Webhooks;

/// The namespace of message ids (UUID v5 over the event and the endpoint).
const MESSAGE_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d77_6562_686f_6f6b_7331);

/// The id of the message `event` yields as `webhook_type` for `endpoint`.
pub fn message_id(event: &LogEvent, webhook_type: &str, endpoint: Uuid) -> Uuid {
    let name = format!(
        "{}/{}/{}/{webhook_type}/{endpoint}",
        event.aggregate_type, event.aggregate_id, event.sequence
    );
    Uuid::new_v5(&MESSAGE_NAMESPACE, name.as_bytes())
}

/// A message to write: its type, object type and object.
struct Emission {
    webhook_type: &'static str,
    object_type: &'static str,
    object: Value,
}

#[async_trait]
impl Projection for Webhooks {
    fn name(&self) -> &'static str {
        "webhooks"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "webhook_endpoints",
            "webhook_subscriptions",
            "webhook_invoices",
            "webhook_messages",
        ]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[
                INVOICE_STREAM_TYPE,
                Subscription::TYPE,
                WebhookEndpoint::TYPE,
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
        let mut batch = Batch::default();
        for event in events {
            batch.apply(conn, event).await?;
        }
        batch.write(conn).await
    }
}

/// An endpoint and the types it wants (none: every type).
type EndpointWants = (Uuid, Option<Vec<String>>);

/// What one batch has read or written, so each row is read once per
/// batch, and the messages it yields, written together at its end.
#[derive(Default)]
struct Batch {
    /// Per service: its enabled endpoints and the types each wants.
    endpoints: HashMap<String, Vec<EndpointWants>>,
    /// Per (service, external id): the object and whether it speaks.
    subscriptions: HashMap<(String, String), (Value, bool)>,
    /// Per invoice stream.
    invoices: HashMap<String, StoredInvoice>,
    /// Invoices changed in the batch (written at its end).
    changed_invoices: Vec<String>,
    /// Messages to write.
    messages: Vec<Message>,
}

struct Message {
    id: Uuid,
    service: String,
    endpoint: Uuid,
    webhook_type: &'static str,
    object_type: &'static str,
    body: String,
    position: i64,
    created_at: DateTime<Utc>,
}

impl Batch {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        let Some((service, key)) = event.aggregate_id.split_once('/') else {
            return Ok(());
        };
        let emissions = match event.aggregate_type.as_str() {
            t if t == WebhookEndpoint::TYPE => {
                apply_endpoint(conn, event, service, decode(event)?).await?;
                self.endpoints.remove(service);
                return Ok(());
            }
            t if t == Subscription::TYPE => {
                self.apply_subscription(conn, event, service, key, decode(event)?)
                    .await?
            }
            INVOICE_STREAM_TYPE => self.apply_invoice(conn, event, decode(event)?).await?,
            _ => return Ok(()),
        };
        for emission in emissions {
            self.emit(conn, event, service, emission).await?;
        }
        Ok(())
    }
}

/// Whether an endpoint wanting `wants` (none: everything) receives `webhook_type`.
fn receives(wants: &Option<Vec<String>>, webhook_type: &str) -> bool {
    wants
        .as_ref()
        .is_none_or(|types| types.iter().any(|t| t == webhook_type))
}

fn decode<E: serde::de::DeserializeOwned>(event: &LogEvent) -> Result<E, ProjectionError> {
    event
        .decode()
        .map_err(|error| ProjectionError::unreadable(event, error))
}

async fn apply_endpoint(
    conn: &mut PgConnection,
    event: &LogEvent,
    service: &str,
    endpoint_event: WebhookEndpointEvent,
) -> Result<(), ProjectionError> {
    let lago_id: Uuid = event
        .aggregate_id
        .rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            ProjectionError::unreadable(event, "aggregate id is not {service}/{uuid}")
        })?;
    let at = event.recorded_at;
    let types = |config: &EndpointConfig| config.event_types.as_ref().map(|t| json!(t));
    match endpoint_event {
        WebhookEndpointEvent::WebhookEndpointCreated { config, secret, .. } => {
            sqlx::query(
                "INSERT INTO webhook_endpoints (service_code, lago_id, webhook_url, signature_algo, \
                 event_types, secret, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            )
            .bind(service)
            .bind(lago_id)
            .bind(&config.webhook_url)
            .bind(&config.signature_algo)
            .bind(types(&config))
            .bind(secret)
            .bind(at)
            .execute(conn)
            .await?;
        }
        WebhookEndpointEvent::WebhookEndpointUpdated { config, .. } => {
            sqlx::query(
                "UPDATE webhook_endpoints SET webhook_url = $2, signature_algo = $3, event_types = $4, \
                 disabled_at = NULL, disabled_reason = NULL, updated_at = $5 WHERE lago_id = $1",
            )
            .bind(lago_id)
            .bind(&config.webhook_url)
            .bind(&config.signature_algo)
            .bind(types(&config))
            .bind(at)
            .execute(conn)
            .await?;
        }
        WebhookEndpointEvent::WebhookEndpointSecretRotated {
            secret,
            previous_valid_until,
            ..
        } => {
            sqlx::query(
                "UPDATE webhook_endpoints SET previous_secret = secret, previous_valid_until = $3, \
                 secret = $2, updated_at = $4 WHERE lago_id = $1",
            )
            .bind(lago_id)
            .bind(secret)
            .bind(previous_valid_until)
            .bind(at)
            .execute(conn)
            .await?;
        }
        WebhookEndpointEvent::WebhookEndpointDisabled { reason, at } => {
            sqlx::query(
                "UPDATE webhook_endpoints SET disabled_at = $2, disabled_reason = $3, updated_at = $2 \
                 WHERE lago_id = $1",
            )
            .bind(lago_id)
            .bind(at)
            .bind(reason)
            .execute(conn)
            .await?;
        }
        WebhookEndpointEvent::WebhookEndpointDeleted { at } => {
            sqlx::query(
                "UPDATE webhook_endpoints SET deleted_at = $2, updated_at = $2 WHERE lago_id = $1",
            )
            .bind(lago_id)
            .bind(at)
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}

impl Batch {
    /// The subscription's object as a payload shows it, and whether it speaks.
    async fn subscription(
        &mut self,
        conn: &mut PgConnection,
        service: &str,
        external_id: &str,
    ) -> Result<Option<(Value, bool)>, sqlx::Error> {
        let key = (service.to_string(), external_id.to_string());
        if let Some(found) = self.subscriptions.get(&key) {
            return Ok(Some(found.clone()));
        }
        let found: Option<(Value, bool)> = sqlx::query_as(
        "SELECT resource, speaks FROM webhook_subscriptions WHERE service_code = $1 AND external_id = $2",
    )
    .bind(service)
    .bind(external_id)
    .fetch_optional(conn)
    .await?;
        if let Some(found) = &found {
            self.subscriptions.insert(key, found.clone());
        }
        Ok(found)
    }

    async fn apply_subscription(
        &mut self,
        conn: &mut PgConnection,
        event: &LogEvent,
        service: &str,
        external_id: &str,
        subscription_event: SubscriptionEvent,
    ) -> Result<Vec<Emission>, ProjectionError> {
        let known = match &subscription_event {
            SubscriptionEvent::SubscriptionCreated(terms) => Some((
                subscription_resource(terms, event.recorded_at),
                !terms.shadow,
            )),
            _ => self.subscription(conn, service, external_id).await?,
        };
        let Some((resource, speaks)) = known else {
            return Err(ProjectionError::unreadable(
                event,
                "subscription not created",
            ));
        };
        let changes = subscription_changes(&subscription_event).unwrap_or_else(|| json!({}));
        // A termination is effective at its own instant, even a moment after
        // the log recorded it.
        let as_of = match &subscription_event {
            SubscriptionEvent::SubscriptionTerminated { terminated_at } => {
                event.recorded_at.max(*terminated_at)
            }
            _ => event.recorded_at,
        };
        let (webhook_type, speaks) = match subscription_event {
            SubscriptionEvent::SubscriptionCreated(_) => (Some("subscription.started"), speaks),
            SubscriptionEvent::SubscriptionTerminated { .. } => {
                (Some("subscription.terminated"), speaks)
            }
            SubscriptionEvent::SubscriptionSuspended { .. }
            | SubscriptionEvent::SubscriptionRestored { .. }
            | SubscriptionEvent::SubscriptionPlanChanged { .. } => {
                (Some("subscription.updated"), speaks)
            }
            SubscriptionEvent::SubscriptionFlipped { .. } => (None, true),
            SubscriptionEvent::SubscriptionFlipUndone { .. } => (None, false),
        };
        // The object as of the event, its status by the catalog's rule.
        let resource: Value = sqlx::query_scalar(
            "INSERT INTO webhook_subscriptions (service_code, external_id, speaks, resource) \
             SELECT $1, $2, $3, r || jsonb_build_object('status', subscription_status( \
                 (r->>'subscription_at')::timestamptz, (r->>'suspended_at')::timestamptz, \
                 (r->>'terminated_at')::timestamptz, $5)) \
             FROM (SELECT $4::jsonb AS r) changed \
             ON CONFLICT (service_code, external_id) DO UPDATE \
             SET speaks = excluded.speaks, resource = excluded.resource RETURNING resource",
        )
        .bind(service)
        .bind(external_id)
        .bind(speaks)
        .bind(merged(resource, changes))
        .bind(as_of)
        .fetch_one(&mut *conn)
        .await?;
        self.subscriptions.insert(
            (service.to_string(), external_id.to_string()),
            (resource.clone(), speaks),
        );
        Ok(webhook_type
            .map(|t| speaking(speaks, t, resource))
            .unwrap_or_default())
    }
}

/// `object` with the keys of `changes` set.
fn merged(mut object: Value, changes: Value) -> Value {
    if let (Some(object), Value::Object(changes)) = (object.as_object_mut(), changes) {
        object.extend(changes);
    }
    object
}

fn speaking(speaks: bool, webhook_type: &'static str, subscription: Value) -> Vec<Emission> {
    if !speaks {
        return vec![];
    }
    vec![Emission {
        webhook_type,
        object_type: "subscription",
        object: subscription,
    }]
}

#[derive(Clone, sqlx::FromRow)]
struct StoredInvoice {
    status: String,
    header: Value,
    finalization: Option<Value>,
    payment: Value,
    created_at: DateTime<Utc>,
}

impl Batch {
    async fn apply_invoice(
        &mut self,
        conn: &mut PgConnection,
        event: &LogEvent,
        invoice_event: InvoiceEvent,
    ) -> Result<Vec<Emission>, ProjectionError> {
        let unreadable = |e: serde_json::Error| ProjectionError::unreadable(event, e);
        let stream = &event.aggregate_id;
        let mut stored = if let InvoiceEvent::InvoiceDrafted(header) = &invoice_event {
            StoredInvoice {
                status: "draft".into(),
                header: serde_json::to_value(header).expect("serializable"),
                finalization: None,
                payment: json!({}),
                created_at: event.recorded_at,
            }
        } else if let Some(stored) = self.invoices.get(stream) {
            stored.clone()
        } else {
            let stored: Option<StoredInvoice> = sqlx::query_as(
                "SELECT status, header, finalization, payment, created_at FROM webhook_invoices \
             WHERE stream_id = $1",
            )
            .bind(stream)
            .fetch_optional(&mut *conn)
            .await?;
            stored.ok_or_else(|| ProjectionError::unreadable(event, "invoice not drafted"))?
        };
        let header: InvoiceHeader =
            serde_json::from_value(stored.header.clone()).map_err(unreadable)?;
        let mut payment: PaymentState =
            serde_json::from_value(stored.payment.clone()).map_err(unreadable)?;
        let status_before = payment.status;
        payment.apply(&invoice_event);
        stored.payment = serde_json::to_value(&payment).expect("serializable");
        if let InvoiceEvent::InvoiceFinalized(finalization) = &invoice_event {
            stored.status = "finalized".into();
            stored.finalization = Some(serde_json::to_value(finalization).expect("serializable"));
        }
        self.invoices.insert(stream.clone(), stored.clone());
        self.changed_invoices.push(stream.clone());
        let types: &[&str] = match &invoice_event {
            InvoiceEvent::InvoiceDrafted(_) => &["invoice.drafted"],
            InvoiceEvent::InvoiceFinalized(_) => &["invoice.created"],
            // The same status reported again is not news.
            InvoiceEvent::InvoicePaymentStatusUpdated(update) if update.status == status_before => {
                &[]
            }
            InvoiceEvent::InvoicePaymentStatusUpdated(_) => {
                &["invoice.payment_status_updated", "invoice.payment_failure"]
            }
            InvoiceEvent::InvoicePaymentOverdue { .. } => &["invoice.payment_overdue"],
            InvoiceEvent::InvoicePaymentDisputeClosed { .. } => &["invoice.payment_dispute_lost"],
            _ => &[],
        };
        if header.shadow || !self.wanted(conn, &header.service, types).await? {
            return Ok(vec![]);
        }
        let finalization: Option<InvoiceFinalization> = stored
            .finalization
            .map(serde_json::from_value)
            .transpose()
            .map_err(unreadable)?;
        let lines = match &finalization {
            Some(finalization) => Lines::finalized(finalization),
            None => Lines::draft(&header, &[], &[], Default::default()),
        };
        let mut invoice = invoice_json(&header, &stored.status, lines, &payment, stored.created_at);
        let subscription = self
            .subscription(conn, &header.service, &header.external_subscription_id)
            .await?;
        invoice["subscriptions"] = json!(subscription
            .map(|(resource, _)| resource)
            .into_iter()
            .collect::<Vec<_>>());
        let of_invoice = |webhook_type| Emission {
            webhook_type,
            object_type: "invoice",
            object: invoice.clone(),
        };
        Ok(match &invoice_event {
            InvoiceEvent::InvoiceDrafted(_) => vec![of_invoice("invoice.drafted")],
            InvoiceEvent::InvoiceFinalized(_) => vec![of_invoice("invoice.created")],
            InvoiceEvent::InvoicePaymentStatusUpdated(update) => {
                let mut emissions = vec![of_invoice("invoice.payment_status_updated")];
                if update.status == PaymentStatus::Failed {
                    let failure = update.failure.clone();
                    emissions.push(Emission {
                        webhook_type: "invoice.payment_failure",
                        object_type: "payment_provider_invoice_payment_error",
                        object: json!({
                            "lago_invoice_id": header.lago_id,
                            "lago_customer_id": header.customer_lago_id,
                            "external_customer_id": header.external_customer_id,
                            "provider_customer_id": update.provider_customer_id,
                            "payment_provider": match update.source {
                                aggregates::invoice::PaymentSource::Stripe { .. } => Some("stripe"),
                                aggregates::invoice::PaymentSource::Api => None,
                            },
                            "provider_error": {
                                "error_code": failure.as_ref().and_then(|f| f.code.clone()),
                                "message": failure.as_ref().and_then(|f| f.message.clone()),
                            },
                            "invoice": invoice,
                        }),
                    });
                }
                emissions
            }
            InvoiceEvent::InvoicePaymentOverdue { .. } => {
                vec![of_invoice("invoice.payment_overdue")]
            }
            InvoiceEvent::InvoicePaymentDisputeClosed {
                outcome: DisputeOutcome::Lost,
                ..
            } => vec![Emission {
                webhook_type: "invoice.payment_dispute_lost",
                object_type: "payment_dispute_lost",
                object: json!({"invoice": invoice}),
            }],
            _ => vec![],
        })
    }
}

impl Batch {
    /// The enabled endpoints of `service`, read once per batch.
    async fn endpoints(
        &mut self,
        conn: &mut PgConnection,
        service: &str,
    ) -> Result<&[EndpointWants], sqlx::Error> {
        if !self.endpoints.contains_key(service) {
            let rows: Vec<(Uuid, Option<Value>)> = sqlx::query_as(
                "SELECT lago_id, event_types FROM webhook_endpoints \
                 WHERE service_code = $1 AND deleted_at IS NULL AND disabled_at IS NULL ORDER BY lago_id",
            )
            .bind(service)
            .fetch_all(&mut *conn)
            .await?;
            let endpoints = rows
                .into_iter()
                .map(|(id, types)| (id, types.and_then(|t| serde_json::from_value(t).ok())))
                .collect();
            self.endpoints.insert(service.to_string(), endpoints);
        }
        Ok(&self.endpoints[service])
    }

    /// Whether any endpoint of `service` wants one of `types`.
    async fn wanted(
        &mut self,
        conn: &mut PgConnection,
        service: &str,
        types: &[&str],
    ) -> Result<bool, sqlx::Error> {
        let endpoints = self.endpoints(conn, service).await?;
        Ok(types
            .iter()
            .any(|t| endpoints.iter().any(|(_, wants)| receives(wants, t))))
    }

    /// Queue `emission` as one message per endpoint of `service` that wants it.
    async fn emit(
        &mut self,
        conn: &mut PgConnection,
        event: &LogEvent,
        service: &str,
        emission: Emission,
    ) -> Result<(), ProjectionError> {
        let wanted: Vec<Uuid> = self
            .endpoints(conn, service)
            .await?
            .iter()
            .filter(|(_, wants)| receives(wants, emission.webhook_type))
            .map(|(id, _)| *id)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let body = json!({
            "webhook_type": emission.webhook_type,
            "object_type": emission.object_type,
            "organization_id": service,
            emission.object_type: emission.object,
        })
        .to_string();
        for endpoint in wanted {
            self.messages.push(Message {
                id: message_id(event, emission.webhook_type, endpoint),
                service: service.to_string(),
                endpoint,
                webhook_type: emission.webhook_type,
                object_type: emission.object_type,
                body: body.clone(),
                position: event.position,
                created_at: event.recorded_at,
            });
        }
        Ok(())
    }

    /// Write the batch's invoices and messages (a message id already
    /// written stays as it was).
    async fn write(mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        self.changed_invoices.sort();
        self.changed_invoices.dedup();
        if !self.changed_invoices.is_empty() {
            let rows: Vec<(&String, &StoredInvoice)> = self
                .changed_invoices
                .iter()
                .map(|stream| (stream, &self.invoices[stream]))
                .collect();
            sqlx::query(
                "INSERT INTO webhook_invoices (stream_id, status, header, finalization, payment, created_at) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::jsonb[], \
                                      $6::timestamptz[]) \
                 ON CONFLICT (stream_id) DO UPDATE SET status = excluded.status, \
                 finalization = excluded.finalization, payment = excluded.payment",
            )
            .bind(rows.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, i)| i.status.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, i)| &i.header).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, i)| i.finalization.as_ref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, i)| &i.payment).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, i)| i.created_at).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        }
        if self.messages.is_empty() {
            return Ok(());
        }
        let m = &self.messages;
        sqlx::query(
            "INSERT INTO webhook_messages (id, service_code, endpoint_lago_id, webhook_type, object_type, \
             body, position, created_at) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], \
                                  $6::text[], $7::bigint[], $8::timestamptz[]) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(m.iter().map(|m| m.id).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.service.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.endpoint).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.webhook_type).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.object_type).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.body.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.position).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.created_at).collect::<Vec<_>>())
        .execute(conn)
        .await?;
        Ok(())
    }
}
