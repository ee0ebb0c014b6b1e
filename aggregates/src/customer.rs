//! `Customer`: a service's customer, upserted by external id (Lago's
//! semantics: only the keys sent are written). The external id is the
//! identity and never changes; re-sending what is already recorded records
//! nothing.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::plan::valid_currency;
use crate::refusal::{codes, CatalogError, FieldErrors};
use crate::wire::identifier;

/// Distinguishes a key sent as `null` (`Some(None)`: clear it) from a key
/// not sent at all (`None`: keep it).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

macro_rules! customer_fields {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// The keys of a customer upsert, each absent, null, or a value.
        #[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
        pub struct CustomerInput {
            $(
                #[allow(missing_docs)]
                #[serde(default, deserialize_with = "present")]
                pub $field: Option<Option<$ty>>,
            )*
            /// Lago's `billing_configuration` object.
            #[serde(default)]
            pub billing_configuration: Option<BillingConfigurationInput>,
            /// Tax codes that do not exist in the service (found by the caller).
            #[serde(skip)]
            pub unknown_tax_codes: Vec<String>,
        }

        /// What the ledger knows about a customer.
        #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
        pub struct CustomerProfile {
            $(
                #[allow(missing_docs)]
                pub $field: Option<$ty>,
            )*
            /// Days an invoice stays a draft after its period ends.
            pub invoice_grace_period: Option<i64>,
            /// The payment provider (e.g. `stripe`).
            pub payment_provider: Option<String>,
            /// The customer's id at the payment provider.
            pub provider_customer_id: Option<String>,
        }

        impl CustomerProfile {
            fn merge_fields(&mut self, input: &CustomerInput) {
                $(
                    if let Some(value) = &input.$field {
                        self.$field = value.clone();
                    }
                )*
            }
        }
    };
}

customer_fields! {
    name: String,
    firstname: String,
    lastname: String,
    email: String,
    currency: String,
    timezone: String,
    country: String,
    address_line1: String,
    address_line2: String,
    city: String,
    state: String,
    zipcode: String,
    phone: String,
    url: String,
    legal_name: String,
    legal_number: String,
    tax_identification_number: String,
    customer_type: String,
    net_payment_term: i64,
    tax_codes: Vec<String>,
}

/// Lago's `billing_configuration` keys the ledger uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct BillingConfigurationInput {
    /// Grace period in days.
    #[serde(default, deserialize_with = "present")]
    pub invoice_grace_period: Option<Option<i64>>,
    /// Payment provider.
    #[serde(default, deserialize_with = "present")]
    pub payment_provider: Option<Option<String>>,
    /// The provider's customer id.
    #[serde(default, deserialize_with = "present")]
    pub provider_customer_id: Option<Option<String>>,
}

/// Commands on a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerCommand {
    /// Create, or update the keys sent.
    Upsert {
        /// The id the customer gets if it is created.
        lago_id: Uuid,
        /// The service's id for the customer.
        external_id: String,
        /// What the client sent.
        input: CustomerInput,
    },
}

/// Facts about a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CustomerEvent {
    /// The customer was created.
    CustomerCreated {
        /// Its id.
        lago_id: Uuid,
        /// The service's id for it.
        external_id: String,
        /// Its profile.
        profile: CustomerProfile,
    },
    /// The profile changed; this is the whole new profile.
    CustomerUpdated {
        /// The new profile.
        profile: CustomerProfile,
    },
}

impl DomainEvent for CustomerEvent {
    fn event_type(&self) -> String {
        match self {
            CustomerEvent::CustomerCreated { .. } => "CustomerCreated",
            CustomerEvent::CustomerUpdated { .. } => "CustomerUpdated",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// What a subscription needs of its customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRef {
    /// Its id.
    pub lago_id: Uuid,
    /// The service's id for it.
    pub external_id: String,
    /// Its currency, if set.
    pub currency: Option<String>,
}

/// The write model of a customer (aggregate id `{service}/{external_id}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Customer {
    lago_id: Option<Uuid>,
    external_id: String,
    profile: CustomerProfile,
}

impl Customer {
    /// The reference subscriptions keep, once the customer exists.
    pub fn reference(&self) -> Option<CustomerRef> {
        Some(CustomerRef {
            lago_id: self.lago_id?,
            external_id: self.external_id.clone(),
            currency: self.profile.currency.clone(),
        })
    }
}

/// The profile after applying `input` to `current`, validated.
pub fn updated_profile(
    current: &CustomerProfile,
    input: &CustomerInput,
) -> Result<CustomerProfile, CatalogError> {
    let mut profile = current.clone();
    profile.merge_fields(input);
    if let Some(config) = &input.billing_configuration {
        if let Some(value) = &config.invoice_grace_period {
            profile.invoice_grace_period = *value;
        }
        if let Some(value) = &config.payment_provider {
            profile.payment_provider = value.clone();
        }
        if let Some(value) = &config.provider_customer_id {
            profile.provider_customer_id = value.clone();
        }
    }
    let mut errors = FieldErrors::default();
    if let Some(email) = &profile.email {
        let email = email.trim();
        // RFC 5321 caps an address at 254 characters.
        let well_formed = email.len() <= 254
            && email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && domain.contains('.') && !email.contains(' ')
            });
        if !well_formed {
            errors.add("email", codes::INVALID);
        }
        profile.email = Some(email.to_string());
    }
    if let Some(timezone) = &profile.timezone {
        if timezone.parse::<chrono_tz::Tz>().is_err() {
            errors.add("timezone", codes::INVALID);
        }
    }
    if let Some(currency) = &profile.currency {
        let upper = currency.trim().to_uppercase();
        if valid_currency(&upper) {
            profile.currency = Some(upper);
        } else {
            errors.add("currency", codes::INVALID);
        }
    }
    if let Some(country) = &profile.country {
        let upper = country.trim().to_uppercase();
        if upper.len() == 2 && upper.chars().all(|c| c.is_ascii_uppercase()) {
            profile.country = Some(upper);
        } else {
            errors.add("country", "country_code_invalid");
        }
    }
    if profile.invoice_grace_period.is_some_and(|days| days < 0) {
        errors.add("billing_configuration.invoice_grace_period", codes::INVALID);
    }
    if profile.net_payment_term.is_some_and(|days| days < 0) {
        errors.add("net_payment_term", codes::INVALID);
    }
    if !input.unknown_tax_codes.is_empty() {
        errors.add("tax_codes", "tax_not_found");
    }
    errors.into_result()?;
    Ok(profile)
}

/// The case-insensitive form of an email, used to match customers.
pub fn normalized_email(email: &str) -> String {
    email.trim().to_lowercase()
}

impl Aggregate for Customer {
    const TYPE: &'static str = "Customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CustomerCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CatalogError> {
        let CustomerCommand::Upsert {
            lago_id,
            external_id,
            input,
        } = command;
        let mut errors = FieldErrors::default();
        identifier(&mut errors, "external_id", &Some(external_id.clone()));
        errors.into_result()?;
        let profile = updated_profile(&self.profile, &input)?;
        let event = match self.lago_id {
            None => CustomerEvent::CustomerCreated {
                lago_id,
                external_id,
                profile,
            },
            Some(_) if profile == self.profile => return Ok(()),
            Some(_) => CustomerEvent::CustomerUpdated { profile },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: CustomerEvent) {
        match event {
            CustomerEvent::CustomerCreated {
                lago_id,
                external_id,
                profile,
            } => {
                self.lago_id = Some(lago_id);
                self.external_id = external_id;
                self.profile = profile;
            }
            CustomerEvent::CustomerUpdated { profile } => self.profile = profile,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn input(json: &str) -> CustomerInput {
        serde_json::from_str(json).unwrap()
    }

    fn upsert(json: &str) -> CustomerCommand {
        CustomerCommand::Upsert {
            lago_id: Uuid::nil(),
            external_id: "cus_1".into(),
            input: input(json),
        }
    }

    fn created() -> CustomerEvent {
        CustomerEvent::CustomerCreated {
            lago_id: Uuid::nil(),
            external_id: "cus_1".into(),
            profile: CustomerProfile {
                name: Some("Ada".into()),
                email: Some("Ada@Example.com".into()),
                currency: Some("CAD".into()),
                timezone: Some("America/Toronto".into()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn an_upsert_of_a_new_external_id_creates_the_customer() {
        TestFramework::<Customer>::with(())
            .given_no_previous_events()
            .when(upsert(r#"{"name":"Ada","email":"Ada@Example.com","currency":"cad","timezone":"America/Toronto"}"#))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn only_the_keys_sent_are_written_and_null_clears() {
        let mut expected = match created() {
            CustomerEvent::CustomerCreated { profile, .. } => profile,
            _ => unreachable!(),
        };
        expected.name = Some("Ada Lovelace".into());
        expected.timezone = None;
        expected.provider_customer_id = Some("cus_stripe_9".into());
        TestFramework::<Customer>::with(())
            .given(vec![created()])
            .when(upsert(
                r#"{"name":"Ada Lovelace","timezone":null,"billing_configuration":{"provider_customer_id":"cus_stripe_9"}}"#,
            ))
            .then_expect_events(vec![CustomerEvent::CustomerUpdated { profile: expected }]);
    }

    #[test]
    fn re_sending_the_same_values_records_nothing() {
        TestFramework::<Customer>::with(())
            .given(vec![created()])
            .when(upsert(r#"{"name":"Ada","currency":"CAD"}"#))
            .then_expect_events(vec![]);
    }

    #[test]
    fn invalid_values_are_refused_by_field() {
        let cases = [
            (
                r#"{"timezone":"Mars/Olympus"}"#,
                "timezone",
                "value_is_invalid",
            ),
            (r#"{"currency":"ABC"}"#, "currency", "value_is_invalid"),
            (r#"{"email":"not-an-email"}"#, "email", "value_is_invalid"),
            (
                &format!(r#"{{"email":"{}@example.com"}}"#, "a".repeat(250)),
                "email",
                "value_is_invalid",
            ),
            (
                r#"{"billing_configuration":{"invoice_grace_period":-1}}"#,
                "billing_configuration.invoice_grace_period",
                "value_is_invalid",
            ),
        ];
        for (json, field, code) in cases {
            TestFramework::<Customer>::with(())
                .given_no_previous_events()
                .when(upsert(json))
                .then_expect_error(CatalogError::invalid(field, code));
        }
    }

    #[test]
    fn emails_match_regardless_of_case() {
        assert_eq!(
            normalized_email(" Ada@Example.COM "),
            normalized_email("ada@example.com")
        );
    }
}
