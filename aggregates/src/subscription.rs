//! `Subscription`: a customer on a plan version — for NexaCloud, one per
//! deployment (the external id is the deployment id). Shadow subscriptions
//! are metered and invoiced for comparison only (DOMAIN.md "shadow safety").

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::customer::CustomerRef;
use crate::import::ImportOrigin;
use crate::plan::PlanRef;
use crate::refusal::{codes, CatalogError, FieldErrors};
use crate::wire::{identifier, required_string};

/// Where billing periods are anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingTime {
    /// Periods follow the calendar (1st of the month, Monday, ...).
    Calendar,
    /// Periods start on the subscription's own day.
    Anniversary,
}

impl BillingTime {
    /// Parse Lago's name; unknown values are refused.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "calendar" => Some(Self::Calendar),
            "anniversary" => Some(Self::Anniversary),
            _ => None,
        }
    }

    /// Lago's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Calendar => "calendar",
            Self::Anniversary => "anniversary",
        }
    }
}

/// A subscription as a client sent it, with the customer and plan resolved
/// by the caller inside the calling service (`None` = not found there).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct SubscriptionInput {
    /// The customer's external id.
    pub external_customer_id: Option<String>,
    /// The plan's code.
    pub plan_code: Option<String>,
    /// The service's id for the subscription (NexaCloud: the deployment id).
    pub external_id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// `calendar` (default) or `anniversary`.
    pub billing_time: Option<String>,
    /// Start, ISO 8601 (default: now).
    pub subscription_at: Option<String>,
    /// Planned end, ISO 8601.
    pub ending_at: Option<String>,
    /// Metered and invoiced for comparison only.
    pub shadow: Option<bool>,
    /// The service's own keys and values (an object), returned as sent.
    pub metadata: Option<serde_json::Value>,
    /// Set by an import: the run that brought it and its history.
    #[serde(skip)]
    pub import: Option<ImportOrigin>,
    /// The customer, resolved by the caller.
    #[serde(skip)]
    pub customer: Option<CustomerRef>,
    /// The plan's current version, resolved by the caller.
    #[serde(skip)]
    pub plan: Option<PlanRef>,
}

/// What a subscription was created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionTerms {
    /// Its id.
    pub lago_id: Uuid,
    /// The service's id for it.
    pub external_id: String,
    /// Display name.
    pub name: Option<String>,
    /// The customer.
    pub customer: CustomerRef,
    /// The plan version it bills on.
    pub plan: PlanRef,
    /// Period anchoring.
    pub billing_time: BillingTime,
    /// Start.
    pub subscription_at: DateTime<Utc>,
    /// Planned end.
    pub ending_at: Option<DateTime<Utc>>,
    /// Shadow (comparison only) or live.
    pub shadow: bool,
    /// The service's own keys and values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// The import that created it (held from billing until that run completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportOrigin>,
}

/// Commands on a subscription. Times are given by the caller (the clock is
/// an input, so tests and replays are deterministic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionCommand {
    /// Create it (or, for the same customer and plan, return the existing one).
    Create {
        /// Its id.
        lago_id: Uuid,
        /// What the client sent.
        input: Box<SubscriptionInput>,
        /// Now.
        now: DateTime<Utc>,
    },
    /// End it now (its closing invoice covers the partial period).
    Terminate {
        /// When.
        at: DateTime<Utc>,
    },
    /// Suspend it (e.g. after a failed payment).
    Suspend {
        /// When.
        at: DateTime<Utc>,
    },
    /// Lift a suspension.
    Restore {
        /// When.
        at: DateTime<Utc>,
    },
    /// Move it to another plan, or the latest version of its plan.
    ChangePlan {
        /// The plan version to move to; `None` when the plan does not exist.
        plan: Option<PlanRef>,
        /// When.
        at: DateTime<Utc>,
    },
}

/// Facts about a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubscriptionEvent {
    /// It was created.
    SubscriptionCreated(SubscriptionTerms),
    /// It was terminated.
    SubscriptionTerminated {
        /// When.
        terminated_at: DateTime<Utc>,
    },
    /// It was suspended.
    SubscriptionSuspended {
        /// When.
        suspended_at: DateTime<Utc>,
    },
    /// Its suspension was lifted.
    SubscriptionRestored {
        /// When.
        restored_at: DateTime<Utc>,
    },
    /// It was moved to another plan version.
    SubscriptionPlanChanged {
        /// The version it left.
        previous: PlanRef,
        /// The version it bills on from now.
        plan: PlanRef,
        /// When.
        changed_at: DateTime<Utc>,
    },
    /// A shadow subscription goes live: invoices issued after `live_from`
    /// (a period boundary) are real; those up to it stay shadow.
    SubscriptionFlipped {
        /// The boundary.
        live_from: DateTime<Utc>,
        /// When the flip was decided.
        flipped_at: DateTime<Utc>,
    },
    /// A flip undone before its first live invoice: shadow again.
    SubscriptionFlipUndone {
        /// When.
        undone_at: DateTime<Utc>,
    },
}

impl DomainEvent for SubscriptionEvent {
    fn event_type(&self) -> String {
        match self {
            Self::SubscriptionCreated(_) => "SubscriptionCreated",
            Self::SubscriptionTerminated { .. } => "SubscriptionTerminated",
            Self::SubscriptionSuspended { .. } => "SubscriptionSuspended",
            Self::SubscriptionRestored { .. } => "SubscriptionRestored",
            Self::SubscriptionPlanChanged { .. } => "SubscriptionPlanChanged",
            Self::SubscriptionFlipped { .. } => "SubscriptionFlipped",
            Self::SubscriptionFlipUndone { .. } => "SubscriptionFlipUndone",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The write model of a subscription (aggregate id `{service}/{external_id}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Subscription {
    terms: Option<SubscriptionTerms>,
    suspended: bool,
    terminated: bool,
    #[serde(default)]
    live_from: Option<DateTime<Utc>>,
}

fn parse_time(
    errors: &mut FieldErrors,
    field: &str,
    value: &Option<String>,
) -> Option<DateTime<Utc>> {
    let text = value.as_deref()?.trim();
    match DateTime::parse_from_rfc3339(text) {
        Ok(at) => Some(at.with_timezone(&Utc)),
        Err(_) => {
            errors.add(field, "invalid_date");
            None
        }
    }
}

/// Validate a new subscription's terms.
pub fn validate_subscription(
    lago_id: Uuid,
    input: SubscriptionInput,
    now: DateTime<Utc>,
) -> Result<SubscriptionTerms, CatalogError> {
    let mut errors = FieldErrors::default();
    let external_id = identifier(&mut errors, "external_id", &input.external_id);
    required_string(
        &mut errors,
        "external_customer_id",
        &input.external_customer_id,
    );
    identifier(&mut errors, "plan_code", &input.plan_code);
    let billing_time = match input.billing_time.as_deref() {
        None => Some(BillingTime::Calendar),
        Some(name) => {
            let parsed = BillingTime::parse(name);
            if parsed.is_none() {
                errors.add("billing_time", codes::INVALID);
            }
            parsed
        }
    };
    let subscription_at = parse_time(&mut errors, "subscription_at", &input.subscription_at);
    let ending_at = parse_time(&mut errors, "ending_at", &input.ending_at);
    if input
        .metadata
        .as_ref()
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        errors.add("metadata", codes::INVALID);
    }
    let starts = subscription_at.unwrap_or(now);
    if ending_at.is_some_and(|end| end <= starts) {
        errors.add("ending_at", "invalid_date");
    }
    errors.into_result()?;
    let customer = input.customer.ok_or(CatalogError::NotFound("customer"))?;
    let plan = input.plan.ok_or(CatalogError::NotFound("plan"))?;
    if customer
        .currency
        .as_ref()
        .is_some_and(|c| c != &plan.currency)
    {
        return Err(CatalogError::invalid(
            "currency",
            "currencies_does_not_match",
        ));
    }
    Ok(SubscriptionTerms {
        lago_id,
        external_id,
        name: input.name,
        customer,
        plan,
        billing_time: billing_time.expect("validated"),
        subscription_at: starts,
        ending_at,
        shadow: input.shadow.unwrap_or(false),
        metadata: input.metadata.filter(|m| m.is_object()),
        import: input.import,
    })
}

impl Subscription {
    /// The terms, once created.
    pub fn terms(&self) -> Option<&SubscriptionTerms> {
        self.terms.as_ref()
    }

    /// Where a flip made it live from, if it was flipped (and not undone).
    pub fn live_from(&self) -> Option<DateTime<Utc>> {
        self.live_from
    }

    /// Flip a shadow subscription live from the boundary `live_from`.
    pub fn flip(
        &self,
        live_from: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<SubscriptionEvent, CatalogError> {
        let terms = self.live()?;
        if !terms.shadow {
            return Err(CatalogError::InvalidStatus("live"));
        }
        if self.live_from.is_some() {
            return Err(CatalogError::InvalidStatus("already flipped"));
        }
        Ok(SubscriptionEvent::SubscriptionFlipped {
            live_from,
            flipped_at: now,
        })
    }

    /// Undo a flip (the caller checks that no live invoice was issued).
    pub fn undo_flip(&self, now: DateTime<Utc>) -> Result<SubscriptionEvent, CatalogError> {
        self.terms
            .as_ref()
            .ok_or(CatalogError::NotFound("subscription"))?;
        if self.live_from.is_none() {
            return Err(CatalogError::InvalidStatus("not flipped"));
        }
        Ok(SubscriptionEvent::SubscriptionFlipUndone { undone_at: now })
    }

    fn live(&self) -> Result<&SubscriptionTerms, CatalogError> {
        let terms = self
            .terms
            .as_ref()
            .ok_or(CatalogError::NotFound("subscription"))?;
        if self.terminated {
            return Err(CatalogError::InvalidStatus("terminated"));
        }
        Ok(terms)
    }
}

impl Aggregate for Subscription {
    const TYPE: &'static str = "Subscription";
    type Command = SubscriptionCommand;
    type Event = SubscriptionEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: SubscriptionCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CatalogError> {
        let event = match command {
            SubscriptionCommand::Create {
                lago_id,
                input,
                now,
            } => {
                if let Some(existing) = &self.terms {
                    let same = !self.terminated
                        && input.external_customer_id.as_deref()
                            == Some(existing.customer.external_id.as_str())
                        && input.plan_code.as_deref() == Some(existing.plan.code.as_str());
                    return if same {
                        Ok(())
                    } else {
                        Err(CatalogError::invalid("external_id", codes::ALREADY_EXISTS))
                    };
                }
                SubscriptionEvent::SubscriptionCreated(validate_subscription(lago_id, *input, now)?)
            }
            SubscriptionCommand::Terminate { at } => {
                self.live()?;
                SubscriptionEvent::SubscriptionTerminated { terminated_at: at }
            }
            SubscriptionCommand::Suspend { at } => {
                self.live()?;
                if self.suspended {
                    return Err(CatalogError::InvalidStatus("suspended"));
                }
                SubscriptionEvent::SubscriptionSuspended { suspended_at: at }
            }
            SubscriptionCommand::Restore { at } => {
                self.live()?;
                if !self.suspended {
                    return Err(CatalogError::InvalidStatus("not suspended"));
                }
                SubscriptionEvent::SubscriptionRestored { restored_at: at }
            }
            SubscriptionCommand::ChangePlan { plan, at } => {
                let terms = self.live()?;
                let plan = plan.ok_or(CatalogError::NotFound("plan"))?;
                if plan == terms.plan {
                    return Ok(());
                }
                if plan.currency != terms.plan.currency {
                    return Err(CatalogError::invalid(
                        "currency",
                        "currencies_does_not_match",
                    ));
                }
                SubscriptionEvent::SubscriptionPlanChanged {
                    previous: terms.plan.clone(),
                    plan,
                    changed_at: at,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: SubscriptionEvent) {
        match event {
            SubscriptionEvent::SubscriptionCreated(terms) => self.terms = Some(terms),
            SubscriptionEvent::SubscriptionTerminated { .. } => self.terminated = true,
            SubscriptionEvent::SubscriptionSuspended { .. } => self.suspended = true,
            SubscriptionEvent::SubscriptionRestored { .. } => self.suspended = false,
            SubscriptionEvent::SubscriptionPlanChanged { plan, .. } => {
                if let Some(terms) = self.terms.as_mut() {
                    terms.plan = plan;
                }
            }
            SubscriptionEvent::SubscriptionFlipped { live_from, .. } => {
                self.live_from = Some(live_from)
            }
            SubscriptionEvent::SubscriptionFlipUndone { .. } => self.live_from = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BillingInterval;
    use cqrs_es::test::TestFramework;

    fn now() -> DateTime<Utc> {
        "2026-11-13T09:00:00Z".parse().unwrap()
    }

    fn plan(code: &str, version: u32, currency: &str) -> PlanRef {
        PlanRef {
            lago_id: Uuid::nil(),
            code: code.into(),
            version,
            currency: currency.into(),
            interval: BillingInterval::Monthly,
        }
    }

    fn customer() -> CustomerRef {
        CustomerRef {
            lago_id: Uuid::nil(),
            external_id: "cus_1".into(),
            currency: Some("USD".into()),
        }
    }

    fn input() -> SubscriptionInput {
        SubscriptionInput {
            external_customer_id: Some("cus_1".into()),
            plan_code: Some("starter".into()),
            external_id: Some("dep_1".into()),
            customer: Some(customer()),
            plan: Some(plan("starter", 1, "USD")),
            ..Default::default()
        }
    }

    fn created() -> SubscriptionEvent {
        SubscriptionEvent::SubscriptionCreated(
            validate_subscription(Uuid::nil(), input(), now()).unwrap(),
        )
    }

    fn create(input: SubscriptionInput) -> SubscriptionCommand {
        SubscriptionCommand::Create {
            lago_id: Uuid::nil(),
            input: Box::new(input),
            now: now(),
        }
    }

    #[test]
    fn a_subscription_starts_now_on_calendar_billing_unless_told_otherwise() {
        let SubscriptionEvent::SubscriptionCreated(terms) = created() else {
            unreachable!()
        };
        assert_eq!(
            (terms.subscription_at, terms.billing_time, terms.shadow),
            (now(), BillingTime::Calendar, false)
        );
    }

    #[test]
    fn the_same_external_id_with_the_same_plan_returns_the_existing_one() {
        TestFramework::<Subscription>::with(())
            .given(vec![created()])
            .when(create(input()))
            .then_expect_events(vec![]);
    }

    #[test]
    fn the_same_external_id_on_another_plan_or_customer_is_refused() {
        for other in [
            SubscriptionInput {
                plan_code: Some("pro".into()),
                plan: Some(plan("pro", 1, "USD")),
                ..input()
            },
            SubscriptionInput {
                external_customer_id: Some("cus_2".into()),
                ..input()
            },
        ] {
            TestFramework::<Subscription>::with(())
                .given(vec![created()])
                .when(create(other))
                .then_expect_error(CatalogError::invalid("external_id", "value_already_exist"));
        }
    }

    #[test]
    fn missing_references_and_bad_values_are_refused() {
        let cases = [
            (
                SubscriptionInput {
                    external_customer_id: None,
                    ..input()
                },
                CatalogError::invalid("external_customer_id", "value_is_mandatory"),
            ),
            (
                SubscriptionInput {
                    plan: None,
                    ..input()
                },
                CatalogError::NotFound("plan"),
            ),
            (
                SubscriptionInput {
                    customer: None,
                    ..input()
                },
                CatalogError::NotFound("customer"),
            ),
            (
                SubscriptionInput {
                    billing_time: Some("biweekly".into()),
                    ..input()
                },
                CatalogError::invalid("billing_time", "value_is_invalid"),
            ),
            (
                SubscriptionInput {
                    subscription_at: Some("yesterday".into()),
                    ..input()
                },
                CatalogError::invalid("subscription_at", "invalid_date"),
            ),
            (
                SubscriptionInput {
                    plan: Some(plan("starter", 1, "EUR")),
                    ..input()
                },
                CatalogError::invalid("currency", "currencies_does_not_match"),
            ),
        ];
        for (input, error) in cases {
            TestFramework::<Subscription>::with(())
                .given_no_previous_events()
                .when(create(input))
                .then_expect_error(error);
        }
    }

    #[test]
    fn suspend_restore_and_terminate_follow_the_status() {
        let at = now();
        TestFramework::<Subscription>::with(())
            .given(vec![created()])
            .when(SubscriptionCommand::Restore { at })
            .then_expect_error(CatalogError::InvalidStatus("not suspended"));
        TestFramework::<Subscription>::with(())
            .given(vec![
                created(),
                SubscriptionEvent::SubscriptionSuspended { suspended_at: at },
            ])
            .when(SubscriptionCommand::Restore { at })
            .then_expect_events(vec![SubscriptionEvent::SubscriptionRestored {
                restored_at: at,
            }]);
        TestFramework::<Subscription>::with(())
            .given(vec![
                created(),
                SubscriptionEvent::SubscriptionTerminated { terminated_at: at },
            ])
            .when(SubscriptionCommand::Terminate { at })
            .then_expect_error(CatalogError::InvalidStatus("terminated"));
    }

    #[test]
    fn a_plan_change_is_recorded_with_both_versions() {
        let at = now();
        TestFramework::<Subscription>::with(())
            .given(vec![created()])
            .when(SubscriptionCommand::ChangePlan {
                plan: Some(plan("starter", 2, "USD")),
                at,
            })
            .then_expect_events(vec![SubscriptionEvent::SubscriptionPlanChanged {
                previous: plan("starter", 1, "USD"),
                plan: plan("starter", 2, "USD"),
                changed_at: at,
            }]);
    }
}
