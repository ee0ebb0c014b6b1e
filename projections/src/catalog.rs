//! Projection `catalog`: each service's billable metrics, taxes, plans (and
//! every plan version), customers and subscriptions, folded from their
//! aggregates' events. Each row keeps the object the Lago-compatible API
//! returns (`resource`), built here by pure functions of the events.

use aggregates::billable_metric::{BillableMetricEvent, MetricDefinition};
use aggregates::customer::{normalized_email, CustomerEvent, CustomerProfile};
use aggregates::plan::{PlanDefinition, PlanEvent};
use aggregates::subscription::{SubscriptionEvent, SubscriptionTerms};
use aggregates::tax::{TaxDefinition, TaxEvent};
use aggregates::{BillableMetric, Customer, Plan, Subscription, Tax};
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::Aggregate;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `catalog` projection.
pub struct Catalog;

/// ISO 8601 UTC, seconds precision, as Lago writes timestamps.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An exact decimal as a JSON number.
fn decimal_number(value: rust_decimal::Decimal) -> Value {
    serde_json::from_str(&value.normalize().to_string()).unwrap_or(Value::Null)
}

/// The API object of a billable metric.
pub fn metric_resource(metric: &MetricDefinition, created_at: DateTime<Utc>) -> Value {
    json!({
        "lago_id": metric.lago_id,
        "name": metric.name,
        "code": metric.code,
        "description": metric.description,
        "aggregation_type": metric.aggregation_type.as_str(),
        "field_name": metric.field_name,
        "weighted_interval": metric.weighted_interval,
        "recurring": metric.recurring,
        "filters": [],
        "created_at": timestamp(created_at),
    })
}

/// The API object of a tax (`rate` a JSON number, exact).
pub fn tax_resource(tax: &TaxDefinition, created_at: DateTime<Utc>) -> Value {
    json!({
        "lago_id": tax.lago_id,
        "name": tax.name,
        "code": tax.code,
        "rate": decimal_number(tax.rate),
        "description": tax.description,
        "applied_to_organization": false,
        "created_at": timestamp(created_at),
    })
}

/// The API object of a plan version.
pub fn plan_resource(
    plan: &PlanDefinition,
    created_at: DateTime<Utc>,
    published_at: DateTime<Utc>,
) -> Value {
    let charges: Vec<Value> = plan
        .charges
        .iter()
        .map(|charge| {
            json!({
                "lago_id": charge.lago_id,
                "lago_billable_metric_id": charge.metric.lago_id,
                "billable_metric_code": charge.metric.code,
                "charge_model": charge.pricing.model_name(),
                "pay_in_advance": charge.pay_in_advance,
                "invoiceable": charge.invoiceable,
                "min_amount_cents": charge.min_amount_cents,
                "properties": charge.pricing.properties(),
                "filters": [],
                "created_at": timestamp(published_at),
            })
        })
        .collect();
    json!({
        "lago_id": plan.lago_id,
        "name": plan.name,
        "code": plan.code,
        "interval": plan.interval.as_str(),
        "description": plan.description,
        "amount_cents": plan.amount_cents,
        "amount_currency": plan.amount_currency,
        "pay_in_advance": plan.pay_in_advance,
        "trial_period": decimal_number(plan.trial_period),
        "charges": charges,
        "tax_codes": plan.tax_codes,
        "version": plan.version,
        "created_at": timestamp(created_at),
        "updated_at": timestamp(published_at),
    })
}

/// The API object of a customer.
pub fn customer_resource(
    lago_id: Uuid,
    external_id: &str,
    profile: &CustomerProfile,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
) -> Value {
    json!({
        "lago_id": lago_id,
        "external_id": external_id,
        "name": profile.name,
        "firstname": profile.firstname,
        "lastname": profile.lastname,
        "email": profile.email,
        "currency": profile.currency,
        "timezone": profile.timezone,
        "applicable_timezone": profile.timezone.as_deref().unwrap_or("UTC"),
        "country": profile.country,
        "address_line1": profile.address_line1,
        "address_line2": profile.address_line2,
        "city": profile.city,
        "state": profile.state,
        "zipcode": profile.zipcode,
        "phone": profile.phone,
        "url": profile.url,
        "legal_name": profile.legal_name,
        "legal_number": profile.legal_number,
        "tax_identification_number": profile.tax_identification_number,
        "customer_type": profile.customer_type,
        "net_payment_term": profile.net_payment_term,
        "tax_codes": profile.tax_codes.clone().unwrap_or_default(),
        "billing_configuration": {
            "invoice_grace_period": profile.invoice_grace_period,
            "payment_provider": profile.payment_provider,
            "provider_customer_id": profile.provider_customer_id,
        },
        "created_at": timestamp(created_at),
        "updated_at": timestamp(updated_at),
    })
}

/// Tax codes among `codes` that `service` has not created (the `taxes`
/// table), in the order given.
pub async fn unknown_tax_codes(
    pool: &sqlx::PgPool,
    service: &str,
    codes: Option<&Vec<String>>,
) -> Result<Vec<String>, sqlx::Error> {
    let Some(codes) = codes.filter(|codes| !codes.is_empty()) else {
        return Ok(vec![]);
    };
    let known: Vec<String> =
        sqlx::query_scalar("SELECT code FROM taxes WHERE service_code = $1 AND code = ANY($2)")
            .bind(service)
            .bind(codes)
            .fetch_all(pool)
            .await?;
    Ok(codes
        .iter()
        .filter(|code| !known.contains(code))
        .cloned()
        .collect())
}

/// The API object of a new subscription (status is computed when read).
pub fn subscription_resource(terms: &SubscriptionTerms, created_at: DateTime<Utc>) -> Value {
    json!({
        "lago_id": terms.lago_id,
        "external_id": terms.external_id,
        "lago_customer_id": terms.customer.lago_id,
        "external_customer_id": terms.customer.external_id,
        "name": terms.name,
        "plan_code": terms.plan.code,
        "plan_version": terms.plan.version,
        "lago_plan_id": terms.plan.lago_id,
        "billing_time": terms.billing_time.as_str(),
        "subscription_at": timestamp(terms.subscription_at),
        "started_at": timestamp(terms.subscription_at),
        "ending_at": terms.ending_at.map(timestamp),
        "terminated_at": null,
        "canceled_at": null,
        "suspended_at": null,
        "previous_plan_code": null,
        "next_plan_code": null,
        "downgrade_plan_date": null,
        "shadow": terms.shadow,
        "live_from": null,
        "metadata": terms.metadata.clone().unwrap_or_else(|| json!({})),
        "created_at": timestamp(created_at),
    })
}

/// What a subscription event changes in its API object (the keys to merge
/// into it); `None` for its creation, which makes the whole object
/// ([`subscription_resource`]). The status is computed when read (SQL
/// `subscription_status`).
pub fn subscription_changes(event: &SubscriptionEvent) -> Option<Value> {
    Some(match event {
        SubscriptionEvent::SubscriptionCreated(_) => return None,
        SubscriptionEvent::SubscriptionTerminated { terminated_at } => {
            json!({"terminated_at": timestamp(*terminated_at)})
        }
        SubscriptionEvent::SubscriptionSuspended { suspended_at } => {
            json!({"suspended_at": timestamp(*suspended_at)})
        }
        SubscriptionEvent::SubscriptionRestored { .. } => json!({"suspended_at": null}),
        SubscriptionEvent::SubscriptionPlanChanged { previous, plan, .. } => json!({
            "plan_code": plan.code, "plan_version": plan.version, "lago_plan_id": plan.lago_id,
            "previous_plan_code": previous.code,
        }),
        SubscriptionEvent::SubscriptionFlipped { live_from, .. } => {
            json!({"live_from": timestamp(*live_from)})
        }
        SubscriptionEvent::SubscriptionFlipUndone { .. } => json!({"live_from": null}),
    })
}

fn decode<E: DeserializeOwned>(event: &LogEvent) -> Result<E, ProjectionError> {
    event
        .decode()
        .map_err(|error| ProjectionError::unreadable(event, error))
}

/// `{service}/{key}` → (service, key).
fn scope(event: &LogEvent) -> Result<(&str, &str), ProjectionError> {
    event
        .aggregate_id
        .split_once('/')
        .ok_or_else(|| ProjectionError::unreadable(event, "aggregate id is not {service}/{key}"))
}

#[async_trait]
impl Projection for Catalog {
    fn name(&self) -> &'static str {
        "catalog"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "billable_metrics",
            "taxes",
            "plans",
            "plan_versions",
            "customers",
            "subscriptions",
        ]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[
                BillableMetric::TYPE,
                Tax::TYPE,
                Plan::TYPE,
                Customer::TYPE,
                Subscription::TYPE,
            ]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        let at = event.recorded_at;
        match event.aggregate_type.as_str() {
            BillableMetric::TYPE => {
                let (service, code) = scope(event)?;
                let BillableMetricEvent::BillableMetricCreated(metric) = decode(event)?;
                sqlx::query(
                    "INSERT INTO billable_metrics (service_code, code, lago_id, resource, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(service)
                .bind(code)
                .bind(metric.lago_id)
                .bind(metric_resource(&metric, at))
                .bind(at)
                .execute(conn)
                .await?;
            }
            Tax::TYPE => {
                let (service, code) = scope(event)?;
                let TaxEvent::TaxCreated(tax) = decode(event)?;
                sqlx::query(
                    "INSERT INTO taxes (service_code, code, lago_id, rate, resource, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(service)
                .bind(code)
                .bind(tax.lago_id)
                .bind(tax.rate)
                .bind(tax_resource(&tax, at))
                .bind(at)
                .execute(conn)
                .await?;
            }
            Plan::TYPE => apply_plan(conn, event, decode(event)?).await?,
            Customer::TYPE => apply_customer(conn, event, decode(event)?).await?,
            Subscription::TYPE => apply_subscription(conn, event, decode(event)?).await?,
            _ => {}
        }
        Ok(())
    }
}

async fn apply_plan(
    conn: &mut PgConnection,
    event: &LogEvent,
    plan_event: PlanEvent,
) -> Result<(), ProjectionError> {
    let (service, code) = scope(event)?;
    let at = event.recorded_at;
    let (PlanEvent::PlanCreated(plan) | PlanEvent::PlanVersionPublished(plan)) = plan_event;
    let definition =
        serde_json::to_value(&plan).map_err(|e| ProjectionError::unreadable(event, e))?;
    sqlx::query(
        "INSERT INTO plan_versions (service_code, code, version, definition, published_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(service)
    .bind(code)
    .bind(plan.version as i32)
    .bind(definition)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    let created_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT created_at FROM plans WHERE service_code = $1 AND code = $2")
            .bind(service)
            .bind(code)
            .fetch_optional(&mut *conn)
            .await?;
    let created_at = created_at.unwrap_or(at);
    sqlx::query(
        "INSERT INTO plans (service_code, code, lago_id, version, resource, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (service_code, code) DO UPDATE \
         SET version = EXCLUDED.version, resource = EXCLUDED.resource, updated_at = EXCLUDED.updated_at",
    )
    .bind(service)
    .bind(code)
    .bind(plan.lago_id)
    .bind(plan.version as i32)
    .bind(plan_resource(&plan, created_at, at))
    .bind(created_at)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}

async fn apply_customer(
    conn: &mut PgConnection,
    event: &LogEvent,
    customer_event: CustomerEvent,
) -> Result<(), ProjectionError> {
    let (service, external_id) = scope(event)?;
    let at = event.recorded_at;
    match customer_event {
        CustomerEvent::CustomerCreated {
            lago_id, profile, ..
        } => {
            sqlx::query(
                "INSERT INTO customers (service_code, external_id, lago_id, email_normalized, resource, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(service)
            .bind(external_id)
            .bind(lago_id)
            .bind(profile.email.as_deref().map(normalized_email))
            .bind(customer_resource(lago_id, external_id, &profile, at, at))
            .bind(at)
            .execute(conn)
            .await?;
        }
        CustomerEvent::CustomerUpdated { profile } => {
            let row: Option<(Uuid, DateTime<Utc>)> = sqlx::query_as(
                "SELECT lago_id, created_at FROM customers WHERE service_code = $1 AND external_id = $2",
            )
            .bind(service)
            .bind(external_id)
            .fetch_optional(&mut *conn)
            .await?;
            let (lago_id, created_at) = row.ok_or_else(|| {
                ProjectionError::unreadable(event, "update of an unknown customer")
            })?;
            sqlx::query(
                "UPDATE customers SET email_normalized = $3, resource = $4, updated_at = $5 \
                 WHERE service_code = $1 AND external_id = $2",
            )
            .bind(service)
            .bind(external_id)
            .bind(profile.email.as_deref().map(normalized_email))
            .bind(customer_resource(
                lago_id,
                external_id,
                &profile,
                created_at,
                at,
            ))
            .bind(at)
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}

async fn apply_subscription(
    conn: &mut PgConnection,
    event: &LogEvent,
    subscription_event: SubscriptionEvent,
) -> Result<(), ProjectionError> {
    let (service, external_id) = scope(event)?;
    let at = event.recorded_at;
    let Some(changes) = subscription_changes(&subscription_event) else {
        let SubscriptionEvent::SubscriptionCreated(terms) = subscription_event else {
            unreachable!("only a creation changes nothing in place")
        };
        sqlx::query(
            "INSERT INTO subscriptions (service_code, external_id, lago_id, external_customer_id, \
             plan_code, plan_version, shadow, subscription_at, resource, created_at, updated_at, \
             plan_history, import_source, import_run) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, \
             jsonb_build_array(jsonb_build_object('since', $8, 'code', $5::text, 'version', $6::int)), \
             $11, $12)",
        )
        .bind(service)
        .bind(external_id)
        .bind(terms.lago_id)
        .bind(&terms.customer.external_id)
        .bind(&terms.plan.code)
        .bind(terms.plan.version as i32)
        .bind(terms.shadow)
        .bind(terms.subscription_at)
        .bind(subscription_resource(&terms, at))
        .bind(at)
        .bind(terms.import.as_ref().map(|i| i.source.clone()))
        .bind(terms.import.as_ref().map(|i| i.run_id))
        .execute(conn)
        .await?;
        return Ok(());
    };
    // The columns each event sets beside the object's keys ($5 onwards).
    let set = match &subscription_event {
        SubscriptionEvent::SubscriptionCreated(_) => unreachable!("handled above"),
        SubscriptionEvent::SubscriptionTerminated { .. } => "terminated_at = $5, ",
        SubscriptionEvent::SubscriptionSuspended { .. } => "suspended_at = $5, ",
        SubscriptionEvent::SubscriptionRestored { .. } => "suspended_at = NULL, ",
        SubscriptionEvent::SubscriptionPlanChanged { .. } => {
            "plan_code = $5, plan_version = $6, plan_history = plan_history || \
             jsonb_build_array(jsonb_build_object('since', $7::timestamptz, 'code', $5::text, \
             'version', $6::int)), "
        }
        SubscriptionEvent::SubscriptionFlipped { .. } => "live_from = $5, ",
        SubscriptionEvent::SubscriptionFlipUndone { .. } => "live_from = NULL, ",
    };
    let sql = format!(
        "UPDATE subscriptions SET {set}resource = resource || $4, updated_at = $3 \
         WHERE service_code = $1 AND external_id = $2"
    );
    let query = sqlx::query(&sql)
        .bind(service)
        .bind(external_id)
        .bind(at)
        .bind(changes);
    let query = match subscription_event {
        SubscriptionEvent::SubscriptionTerminated { terminated_at } => query.bind(terminated_at),
        SubscriptionEvent::SubscriptionSuspended { suspended_at } => query.bind(suspended_at),
        SubscriptionEvent::SubscriptionPlanChanged {
            plan, changed_at, ..
        } => query
            .bind(plan.code)
            .bind(plan.version as i32)
            .bind(changed_at),
        SubscriptionEvent::SubscriptionFlipped { live_from, .. } => query.bind(live_from),
        _ => query,
    };
    query.execute(conn).await?;
    Ok(())
}
