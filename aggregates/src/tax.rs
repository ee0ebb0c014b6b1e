//! `Tax`: a named tax rate (e.g. `hst_on` at 13%), applied to customers by
//! code. The rate is a percentage held as an exact decimal.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::refusal::{codes, CatalogError, FieldErrors};
use crate::wire::{decimal_number_or_string, identifier, required_string};

/// A tax as a client described it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct TaxInput {
    /// Display name.
    pub name: Option<String>,
    /// Identifier customers reference.
    pub code: Option<String>,
    /// Percentage, as a JSON number (what the Lago client sends) or a decimal string.
    pub rate: Option<Value>,
    /// Free text.
    pub description: Option<String>,
}

/// Commands on a tax.
#[derive(Debug, Clone, PartialEq)]
pub enum TaxCommand {
    /// Create the tax.
    Create {
        /// Its id.
        lago_id: Uuid,
        /// What the client sent.
        input: TaxInput,
    },
}

/// A validated tax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaxDefinition {
    /// Lago id.
    pub lago_id: Uuid,
    /// Display name.
    pub name: String,
    /// Code.
    pub code: String,
    /// Percentage, e.g. 13 for 13%.
    pub rate: Decimal,
    /// Free text.
    pub description: Option<String>,
}

/// Facts about a tax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaxEvent {
    /// The tax was created.
    TaxCreated(TaxDefinition),
}

impl DomainEvent for TaxEvent {
    fn event_type(&self) -> String {
        "TaxCreated".to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The write model of a tax (aggregate id `{service}/{code}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tax {
    definition: Option<TaxDefinition>,
}

impl Tax {
    /// The tax, once created.
    pub fn definition(&self) -> Option<&TaxDefinition> {
        self.definition.as_ref()
    }
}

/// Validate a tax as sent: the rate is a percentage from 0 to 100.
pub fn validate_tax(lago_id: Uuid, input: TaxInput) -> Result<TaxDefinition, CatalogError> {
    let mut errors = FieldErrors::default();
    let name = required_string(&mut errors, "name", &input.name);
    let code = identifier(&mut errors, "code", &input.code);
    let rate = match input.rate.as_ref() {
        None | Some(Value::Null) => {
            errors.add("rate", codes::MANDATORY);
            None
        }
        Some(value) => match decimal_number_or_string(value) {
            Some(rate) if rate >= Decimal::ZERO && rate <= Decimal::ONE_HUNDRED => Some(rate),
            _ => {
                errors.add("rate", codes::INVALID);
                None
            }
        },
    };
    errors.into_result()?;
    Ok(TaxDefinition {
        lago_id,
        name,
        code,
        rate: rate.expect("validated"),
        description: input.description,
    })
}

impl Aggregate for Tax {
    const TYPE: &'static str = "Tax";
    type Command = TaxCommand;
    type Event = TaxEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: TaxCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CatalogError> {
        let TaxCommand::Create { lago_id, input } = command;
        if self.definition.is_some() {
            return Err(CatalogError::invalid("code", codes::ALREADY_EXISTS));
        }
        let definition = validate_tax(lago_id, input)?;
        sink.write(TaxEvent::TaxCreated(definition), self).await;
        Ok(())
    }

    fn apply(&mut self, event: TaxEvent) {
        let TaxEvent::TaxCreated(definition) = event;
        self.definition = Some(definition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_rate(rate: Value) -> TaxInput {
        TaxInput {
            name: Some("HST Ontario".into()),
            code: Some("hst_on".into()),
            rate: Some(rate),
            description: None,
        }
    }

    #[test]
    fn a_rate_sent_as_a_number_or_a_string_is_held_exactly() {
        let as_number: Value = serde_json::from_str("13.0").unwrap();
        assert_eq!(
            validate_tax(Uuid::nil(), with_rate(as_number))
                .unwrap()
                .rate,
            Decimal::new(13, 0)
        );
        assert_eq!(
            validate_tax(Uuid::nil(), with_rate(json!("14.975")))
                .unwrap()
                .rate,
            Decimal::new(14975, 3)
        );
    }

    #[test]
    fn a_rate_outside_0_to_100_or_not_a_number_is_refused() {
        for rate in [json!("-1"), json!("100.01"), json!("thirteen"), json!([13])] {
            assert_eq!(
                validate_tax(Uuid::nil(), with_rate(rate.clone())).unwrap_err(),
                CatalogError::invalid("rate", "value_is_invalid"),
                "{rate}"
            );
        }
    }
}
