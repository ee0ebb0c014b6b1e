//! `WebhookEndpoint`: where a service hears about its billing facts (Lago's
//! `webhook_endpoints`). Aggregate id `{service}/{lago_id}`.
//!
//! Each endpoint has a secret (`whsec_` + base64 of 32 random bytes) that
//! signs every message; it is shown once, when created or rotated. During a
//! rotation the previous secret keeps signing beside the new one until
//! `previous_valid_until`, so receivers can switch without a gap. An
//! endpoint that answers `410 Gone` is disabled; updating it enables it
//! again.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::refusal::{codes, CatalogError, FieldErrors};

/// The webhook types an endpoint can receive (Lago's names).
pub const WEBHOOK_TYPES: [&str; 9] = [
    "invoice.drafted",
    "invoice.created",
    "invoice.payment_status_updated",
    "invoice.payment_failure",
    "invoice.payment_overdue",
    "invoice.payment_dispute_lost",
    "subscription.started",
    "subscription.terminated",
    "subscription.updated",
];

/// An endpoint as a client described it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct WebhookEndpointInput {
    /// Where to POST (http or https).
    pub webhook_url: Option<String>,
    /// `hmac` (the only scheme the ledger signs with; Lago's `jwt` is refused).
    pub signature_algo: Option<String>,
    /// Only these types (none: every type).
    pub event_types: Option<Vec<String>>,
}

/// A validated endpoint configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfig {
    /// Where to POST.
    pub webhook_url: String,
    /// `hmac`.
    pub signature_algo: String,
    /// Only these types (none: every type).
    pub event_types: Option<Vec<String>>,
}

impl EndpointConfig {
    /// Whether the endpoint receives `webhook_type`.
    pub fn wants(&self, webhook_type: &str) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == webhook_type))
    }
}

/// Commands on an endpoint. The secret and the clock are inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEndpointCommand {
    /// Create it.
    Create {
        /// Its id.
        lago_id: Uuid,
        /// What the client sent.
        input: WebhookEndpointInput,
        /// Its first secret.
        secret: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Change its URL, scheme or types (and enable it if it was disabled).
    Update {
        /// What the client sent (absent fields keep their values).
        input: WebhookEndpointInput,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Replace its secret; the previous one keeps signing until `previous_valid_until`.
    RotateSecret {
        /// The new secret.
        secret: String,
        /// Until when the previous one still signs.
        previous_valid_until: DateTime<Utc>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Stop delivering to it (it answered `410 Gone`).
    Disable {
        /// Why.
        reason: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// Delete it.
    Delete {
        /// Now.
        at: DateTime<Utc>,
    },
}

/// Facts about an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebhookEndpointEvent {
    /// Created.
    WebhookEndpointCreated {
        /// Its id.
        lago_id: Uuid,
        /// Its configuration.
        config: EndpointConfig,
        /// Its secret.
        secret: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Its configuration changed (and it is enabled).
    WebhookEndpointUpdated {
        /// The new configuration.
        config: EndpointConfig,
        /// When.
        at: DateTime<Utc>,
    },
    /// Its secret was rotated.
    WebhookEndpointSecretRotated {
        /// The new secret.
        secret: String,
        /// Until when the previous one still signs.
        previous_valid_until: DateTime<Utc>,
        /// When.
        at: DateTime<Utc>,
    },
    /// Deliveries to it stopped.
    WebhookEndpointDisabled {
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Deleted.
    WebhookEndpointDeleted {
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for WebhookEndpointEvent {
    fn event_type(&self) -> String {
        match self {
            Self::WebhookEndpointCreated { .. } => "WebhookEndpointCreated",
            Self::WebhookEndpointUpdated { .. } => "WebhookEndpointUpdated",
            Self::WebhookEndpointSecretRotated { .. } => "WebhookEndpointSecretRotated",
            Self::WebhookEndpointDisabled { .. } => "WebhookEndpointDisabled",
            Self::WebhookEndpointDeleted { .. } => "WebhookEndpointDeleted",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The write model of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    config: Option<EndpointConfig>,
    disabled: bool,
    deleted: bool,
}

/// Validate a whole configuration: `webhook_url` http(s) with a host,
/// `signature_algo` `hmac` (default), known `event_types`.
pub fn validate(
    input: &WebhookEndpointInput,
    current: Option<&EndpointConfig>,
) -> Result<EndpointConfig, CatalogError> {
    let mut errors = FieldErrors::default();
    let url = input
        .webhook_url
        .clone()
        .or_else(|| current.map(|c| c.webhook_url.clone()));
    match url.as_deref().map(str::trim) {
        None | Some("") => errors.add("webhook_url", codes::MANDATORY),
        Some(url) if !well_formed_url(url) => errors.add("webhook_url", "url_is_invalid"),
        Some(_) => {}
    }
    let algo = input
        .signature_algo
        .clone()
        .or_else(|| current.map(|c| c.signature_algo.clone()))
        .unwrap_or_else(|| "hmac".to_string());
    if algo != "hmac" {
        errors.add("signature_algo", codes::INVALID);
    }
    let event_types = match &input.event_types {
        Some(types) => Some(types.clone()),
        None => current.and_then(|c| c.event_types.clone()),
    };
    if let Some(types) = &event_types {
        if types.iter().any(|t| !WEBHOOK_TYPES.contains(&t.as_str())) {
            errors.add("event_types", codes::INVALID);
        }
    }
    errors.into_result()?;
    Ok(EndpointConfig {
        webhook_url: url.unwrap_or_default().trim().to_string(),
        signature_algo: algo,
        event_types,
    })
}

/// `http://host…` or `https://host…`, no user info, no whitespace.
fn well_formed_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    !authority.is_empty()
        && !authority.contains('@')
        && !url.chars().any(char::is_whitespace)
        && url.len() <= 2048
}

impl WebhookEndpoint {
    /// Its configuration, unless deleted.
    pub fn config(&self) -> Option<&EndpointConfig> {
        self.config.as_ref().filter(|_| !self.deleted)
    }
}

impl Aggregate for WebhookEndpoint {
    const TYPE: &'static str = "WebhookEndpoint";
    type Command = WebhookEndpointCommand;
    type Event = WebhookEndpointEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: WebhookEndpointCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CatalogError> {
        let event = match command {
            WebhookEndpointCommand::Create {
                lago_id,
                input,
                secret,
                at,
            } => {
                if self.config.is_some() {
                    return Err(CatalogError::invalid("lago_id", codes::ALREADY_EXISTS));
                }
                WebhookEndpointEvent::WebhookEndpointCreated {
                    lago_id,
                    config: validate(&input, None)?,
                    secret,
                    at,
                }
            }
            command => {
                let current = self
                    .config()
                    .ok_or(CatalogError::NotFound("webhook_endpoint"))?;
                match command {
                    WebhookEndpointCommand::Update { input, at } => {
                        WebhookEndpointEvent::WebhookEndpointUpdated {
                            config: validate(&input, Some(current))?,
                            at,
                        }
                    }
                    WebhookEndpointCommand::RotateSecret {
                        secret,
                        previous_valid_until,
                        at,
                    } => WebhookEndpointEvent::WebhookEndpointSecretRotated {
                        secret,
                        previous_valid_until,
                        at,
                    },
                    WebhookEndpointCommand::Disable { reason, at } => {
                        if self.disabled {
                            return Ok(());
                        }
                        WebhookEndpointEvent::WebhookEndpointDisabled { reason, at }
                    }
                    WebhookEndpointCommand::Delete { at } => {
                        WebhookEndpointEvent::WebhookEndpointDeleted { at }
                    }
                    WebhookEndpointCommand::Create { .. } => unreachable!("handled above"),
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: WebhookEndpointEvent) {
        match event {
            WebhookEndpointEvent::WebhookEndpointCreated { config, .. }
            | WebhookEndpointEvent::WebhookEndpointUpdated { config, .. } => {
                self.config = Some(config);
                self.disabled = false;
            }
            WebhookEndpointEvent::WebhookEndpointSecretRotated { .. } => {}
            WebhookEndpointEvent::WebhookEndpointDisabled { .. } => self.disabled = true,
            WebhookEndpointEvent::WebhookEndpointDeleted { .. } => self.deleted = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(url: &str) -> WebhookEndpointInput {
        WebhookEndpointInput {
            webhook_url: Some(url.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_configuration_needs_an_http_url_hmac_and_known_types() {
        let config = validate(&input("https://hooks.nexacloud.example/ledger"), None).unwrap();
        assert_eq!(config.signature_algo, "hmac");
        assert!(config.wants("invoice.created"));
        for bad in [
            "ftp://x",
            "https://",
            "https://user@host/",
            "http://a b",
            "",
        ] {
            let refused = validate(&input(bad), None).unwrap_err();
            assert!(
                refused.to_string().contains("webhook_url"),
                "{bad}: {refused}"
            );
        }
        let jwt = WebhookEndpointInput {
            signature_algo: Some("jwt".into()),
            ..input("https://x.example")
        };
        assert!(validate(&jwt, None)
            .unwrap_err()
            .to_string()
            .contains("signature_algo"));
        let typed = WebhookEndpointInput {
            event_types: Some(vec!["invoice.created".into()]),
            ..input("https://x.example")
        };
        let config = validate(&typed, None).unwrap();
        assert!(config.wants("invoice.created") && !config.wants("invoice.drafted"));
        let unknown = WebhookEndpointInput {
            event_types: Some(vec!["invoice.eaten".into()]),
            ..input("https://x.example")
        };
        assert!(validate(&unknown, None)
            .unwrap_err()
            .to_string()
            .contains("event_types"));
    }
}
