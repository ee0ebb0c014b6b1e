//! `Plan`: a price list — a flat fee per billing interval plus usage
//! charges. Plans are versioned: every change publishes a new version, and a
//! subscription keeps billing on the version it was created (or explicitly
//! moved) on, so what a customer was billed never changes under them.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use iso_currency::Currency;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::charge::{validate_charge, Charge, ChargeInput};
use crate::refusal::{codes, CatalogError, FieldErrors};
use crate::wire::{decimal_number_or_string, identifier, required_string, whole_number};

/// How often a plan bills (Lago's intervals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingInterval {
    /// Monday to Sunday (calendar) or 7 days (anniversary).
    Weekly,
    /// A month.
    Monthly,
    /// Three months.
    Quarterly,
    /// Six months.
    Semiannual,
    /// A year.
    Yearly,
}

impl BillingInterval {
    /// Parse Lago's name; an unknown interval is refused, never defaulted.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "weekly" => Self::Weekly,
            "monthly" => Self::Monthly,
            "quarterly" => Self::Quarterly,
            "semiannual" => Self::Semiannual,
            "yearly" => Self::Yearly,
            _ => return None,
        })
    }

    /// Lago's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
            Self::Quarterly => "quarterly",
            Self::Semiannual => "semiannual",
            Self::Yearly => "yearly",
        }
    }
}

/// A plan as a client sent it. On an update, absent fields keep the current
/// version's values.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct PlanInput {
    /// Display name.
    pub name: Option<String>,
    /// Identifier subscriptions reference.
    pub code: Option<String>,
    /// Billing interval.
    pub interval: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Flat fee per interval, in the currency's minor unit (required).
    pub amount_cents: Option<Value>,
    /// ISO 4217 currency.
    pub amount_currency: Option<String>,
    /// Flat fee billed at the start of the period.
    pub pay_in_advance: Option<bool>,
    /// Trial days.
    pub trial_period: Option<Value>,
    /// Usage charges.
    pub charges: Option<Vec<ChargeInput>>,
    /// Taxes applied to the plan's fees.
    pub tax_codes: Option<Vec<String>>,
    /// Tax codes that do not exist in the service (found by the caller).
    #[serde(skip)]
    pub unknown_tax_codes: Vec<String>,
}

/// One version of a plan, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDefinition {
    /// The plan's id (the same for every version).
    pub lago_id: Uuid,
    /// Version, from 1.
    pub version: u32,
    /// Code.
    pub code: String,
    /// Display name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Billing interval.
    pub interval: BillingInterval,
    /// Flat fee per interval, minor units.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub amount_currency: String,
    /// Flat fee in advance.
    pub pay_in_advance: bool,
    /// Trial days.
    pub trial_period: Decimal,
    /// Usage charges.
    pub charges: Vec<Charge>,
    /// Taxes.
    pub tax_codes: Vec<String>,
}

/// Commands on a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanCommand {
    /// Create version 1.
    Create {
        /// The plan's id.
        lago_id: Uuid,
        /// What the client sent.
        input: PlanInput,
    },
    /// Publish a new version from the current one and the changes sent.
    Update {
        /// What the client sent.
        input: PlanInput,
    },
}

/// Facts about a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanEvent {
    /// Version 1 was published.
    PlanCreated(PlanDefinition),
    /// A later version was published; earlier versions stay as they were.
    PlanVersionPublished(PlanDefinition),
}

impl DomainEvent for PlanEvent {
    fn event_type(&self) -> String {
        match self {
            PlanEvent::PlanCreated(_) => "PlanCreated",
            PlanEvent::PlanVersionPublished(_) => "PlanVersionPublished",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The write model of a plan (aggregate id `{service}/{code}`): its current
/// version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    current: Option<PlanDefinition>,
}

impl Plan {
    /// The latest version.
    pub fn current(&self) -> Option<&PlanDefinition> {
        self.current.as_ref()
    }
}

/// What a subscription needs to know of its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRef {
    /// Plan id.
    pub lago_id: Uuid,
    /// Code.
    pub code: String,
    /// The version subscribed to.
    pub version: u32,
    /// Currency of its prices.
    pub currency: String,
    /// Its billing interval.
    pub interval: BillingInterval,
}

impl From<&PlanDefinition> for PlanRef {
    fn from(plan: &PlanDefinition) -> Self {
        Self {
            lago_id: plan.lago_id,
            code: plan.code.clone(),
            version: plan.version,
            currency: plan.amount_currency.clone(),
            interval: plan.interval,
        }
    }
}

/// Whether `code` is an ISO 4217 currency.
pub fn valid_currency(code: &str) -> bool {
    Currency::from_code(code).is_some()
}

/// Validate a plan version: `input` over `base` (the current version on an
/// update, nothing on a create).
pub fn validate_plan(
    lago_id: Uuid,
    version: u32,
    input: PlanInput,
    base: Option<&PlanDefinition>,
) -> Result<PlanDefinition, CatalogError> {
    let mut errors = FieldErrors::default();
    let name = match (&input.name, base) {
        (None, Some(base)) => base.name.clone(),
        (name, _) => required_string(&mut errors, "name", name),
    };
    let code = match (&input.code, base) {
        (None, Some(base)) => base.code.clone(),
        (Some(code), Some(base)) if code != &base.code => {
            // Identity is set at creation only.
            errors.add("code", codes::INVALID);
            base.code.clone()
        }
        (code, _) => identifier(&mut errors, "code", code),
    };
    let interval = match (input.interval.as_deref(), base) {
        (None, Some(base)) => Some(base.interval),
        (None, None) => {
            errors.add("interval", codes::MANDATORY);
            None
        }
        (Some(name), _) => {
            let parsed = BillingInterval::parse(name);
            if parsed.is_none() {
                errors.add("interval", codes::INVALID);
            }
            parsed
        }
    };
    let amount_cents = match (&input.amount_cents, base) {
        (None, Some(base)) => Some(base.amount_cents),
        (None | Some(Value::Null), _) => {
            errors.add("amount_cents", codes::MANDATORY);
            None
        }
        (Some(value), _) => match whole_number(value) {
            Some(cents) if cents >= 0 => Some(cents),
            _ => {
                errors.add("amount_cents", codes::INVALID_AMOUNT);
                None
            }
        },
    };
    let amount_currency = match (&input.amount_currency, base) {
        (None, Some(base)) => Some(base.amount_currency.clone()),
        (None, None) => {
            errors.add("amount_currency", codes::MANDATORY);
            None
        }
        (Some(currency), _) => {
            let currency = currency.trim().to_uppercase();
            if valid_currency(&currency) {
                Some(currency)
            } else {
                errors.add("amount_currency", codes::INVALID);
                None
            }
        }
    };
    let trial_period = match (&input.trial_period, base) {
        (None, Some(base)) => Some(base.trial_period),
        (None | Some(Value::Null), None) => Some(Decimal::ZERO),
        (Some(value), _) => match decimal_number_or_string(value) {
            Some(days) if days >= Decimal::ZERO => Some(days),
            _ => {
                errors.add("trial_period", codes::INVALID);
                None
            }
        },
    };
    let charges = match (&input.charges, base) {
        (None, Some(base)) => base.charges.clone(),
        (charges, _) => {
            let charges = charges.clone().unwrap_or_default();
            let validated: Vec<Option<Charge>> = charges
                .iter()
                .enumerate()
                .map(|(index, charge)| validate_charge(&mut errors, index, charge))
                .collect();
            validated.into_iter().flatten().collect()
        }
    };
    if !input.unknown_tax_codes.is_empty() {
        errors.add("tax_codes", "tax_not_found");
    }
    let tax_codes = match (&input.tax_codes, base) {
        (None, Some(base)) => base.tax_codes.clone(),
        (codes, _) => codes.clone().unwrap_or_default(),
    };
    errors.into_result()?;
    Ok(PlanDefinition {
        lago_id,
        version,
        code,
        name,
        description: input
            .description
            .or_else(|| base.and_then(|b| b.description.clone())),
        interval: interval.expect("validated"),
        amount_cents: amount_cents.expect("validated"),
        amount_currency: amount_currency.expect("validated"),
        pay_in_advance: input
            .pay_in_advance
            .or(base.map(|b| b.pay_in_advance))
            .unwrap_or(false),
        trial_period: trial_period.expect("validated"),
        charges,
        tax_codes,
    })
}

impl Aggregate for Plan {
    const TYPE: &'static str = "Plan";
    type Command = PlanCommand;
    type Event = PlanEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PlanCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CatalogError> {
        let event = match (command, &self.current) {
            (PlanCommand::Create { .. }, Some(_)) => {
                return Err(CatalogError::invalid("code", codes::ALREADY_EXISTS))
            }
            (PlanCommand::Create { lago_id, input }, None) => {
                PlanEvent::PlanCreated(validate_plan(lago_id, 1, input, None)?)
            }
            (PlanCommand::Update { .. }, None) => return Err(CatalogError::NotFound("plan")),
            (PlanCommand::Update { input }, Some(current)) => {
                let next =
                    validate_plan(current.lago_id, current.version + 1, input, Some(current))?;
                let unchanged = PlanDefinition {
                    version: current.version,
                    ..next.clone()
                } == *current;
                if unchanged {
                    return Ok(());
                }
                PlanEvent::PlanVersionPublished(next)
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: PlanEvent) {
        match event {
            PlanEvent::PlanCreated(definition) | PlanEvent::PlanVersionPublished(definition) => {
                self.current = Some(definition)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;
    use serde_json::json;

    fn input() -> PlanInput {
        PlanInput {
            name: Some("Starter".into()),
            code: Some("starter".into()),
            interval: Some("monthly".into()),
            amount_cents: Some(json!(1900)),
            amount_currency: Some("usd".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_plan_is_created_at_version_1() {
        let plan = validate_plan(Uuid::nil(), 1, input(), None).unwrap();
        assert_eq!(
            (
                plan.version,
                plan.amount_cents,
                plan.amount_currency.as_str()
            ),
            (1, 1900, "USD")
        );
        assert_eq!(plan.interval, BillingInterval::Monthly);
    }

    #[test]
    fn an_unknown_interval_is_refused_not_defaulted_to_monthly() {
        let error = validate_plan(
            Uuid::nil(),
            1,
            PlanInput {
                interval: Some("biweekly".into()),
                ..input()
            },
            None,
        );
        assert_eq!(
            error.unwrap_err(),
            CatalogError::invalid("interval", "value_is_invalid")
        );
    }

    #[test]
    fn a_missing_flat_price_is_refused_not_read_as_zero() {
        let error = validate_plan(
            Uuid::nil(),
            1,
            PlanInput {
                amount_cents: None,
                ..input()
            },
            None,
        );
        assert_eq!(
            error.unwrap_err(),
            CatalogError::invalid("amount_cents", "value_is_mandatory")
        );
        let negative = validate_plan(
            Uuid::nil(),
            1,
            PlanInput {
                amount_cents: Some(json!(-1)),
                ..input()
            },
            None,
        );
        assert_eq!(
            negative.unwrap_err(),
            CatalogError::invalid("amount_cents", "invalid_amount")
        );
    }

    #[test]
    fn an_unknown_currency_or_tax_code_is_refused() {
        let currency = validate_plan(
            Uuid::nil(),
            1,
            PlanInput {
                amount_currency: Some("XYZ".into()),
                ..input()
            },
            None,
        );
        assert_eq!(
            currency.unwrap_err(),
            CatalogError::invalid("amount_currency", "value_is_invalid")
        );
        let tax = validate_plan(
            Uuid::nil(),
            1,
            PlanInput {
                tax_codes: Some(vec!["vat_xx".into()]),
                unknown_tax_codes: vec!["vat_xx".into()],
                ..input()
            },
            None,
        );
        assert_eq!(
            tax.unwrap_err(),
            CatalogError::invalid("tax_codes", "tax_not_found")
        );
    }

    #[test]
    fn an_update_publishes_a_new_version_keeping_what_was_not_sent() {
        let v1 = validate_plan(Uuid::nil(), 1, input(), None).unwrap();
        let v2 = PlanDefinition {
            version: 2,
            amount_cents: 2900,
            ..v1.clone()
        };
        TestFramework::<Plan>::with(())
            .given(vec![PlanEvent::PlanCreated(v1.clone())])
            .when(PlanCommand::Update {
                input: PlanInput {
                    amount_cents: Some(json!(2900)),
                    ..Default::default()
                },
            })
            .then_expect_events(vec![PlanEvent::PlanVersionPublished(v2)]);
        // Sending the same values again publishes nothing.
        TestFramework::<Plan>::with(())
            .given(vec![PlanEvent::PlanCreated(v1)])
            .when(PlanCommand::Update { input: input() })
            .then_expect_events(vec![]);
    }

    #[test]
    fn the_code_cannot_be_changed_by_an_update() {
        let v1 = validate_plan(Uuid::nil(), 1, input(), None).unwrap();
        TestFramework::<Plan>::with(())
            .given(vec![PlanEvent::PlanCreated(v1)])
            .when(PlanCommand::Update {
                input: PlanInput {
                    code: Some("other".into()),
                    ..Default::default()
                },
            })
            .then_expect_error(CatalogError::invalid("code", "value_is_invalid"));
    }
}
