//! The `Service` aggregate: a product of the company (NexaCloud, NexaDesk,
//! ...) that appends usage to the ledger and receives its webhooks.
//!
//! The aggregate id is the service's code, so registering a code twice is
//! refused by the aggregate itself, and two racing registrations collide on
//! the event log's primary key (an optimistic-concurrency conflict), never
//! producing two services.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// What an operator can ask of a service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum ServiceCommand {
    /// Register a new service under `code` (also the aggregate id).
    Register {
        /// Stable identifier, e.g. `nexacloud`.
        code: String,
        /// Display name, e.g. `NexaCloud hosting`.
        name: String,
    },
    /// Stop accepting the service's API keys.
    Deactivate,
    /// Accept the service's API keys again.
    Reactivate,
    /// Issue an API key. Only its SHA-256 digest is recorded; the key itself
    /// is shown to the operator once and never stored.
    IssueApiKey {
        /// Public identifier of the key (shown in lists, used to revoke).
        key_id: String,
        /// Hex SHA-256 of the key.
        key_sha256: String,
        /// What the key is for.
        label: Option<String>,
    },
    /// Revoke an API key: requests with it get 401 from then on.
    RevokeApiKey {
        /// The key's public identifier.
        key_id: String,
    },
}

/// Facts about a service, as recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceEvent {
    /// A service was registered.
    ServiceRegistered {
        /// Stable identifier.
        code: String,
        /// Display name.
        name: String,
    },
    /// A service was deactivated: its keys stop working.
    ServiceDeactivated,
    /// A deactivated service was reactivated.
    ServiceReactivated,
    /// An API key was issued (its digest only).
    ApiKeyIssued {
        /// Public identifier.
        key_id: String,
        /// Hex SHA-256 of the key.
        key_sha256: String,
        /// What it is for.
        label: Option<String>,
    },
    /// An API key was revoked.
    ApiKeyRevoked {
        /// Public identifier.
        key_id: String,
    },
}

impl DomainEvent for ServiceEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ServiceRegistered { .. } => "ServiceRegistered",
            Self::ServiceDeactivated => "ServiceDeactivated",
            Self::ServiceReactivated => "ServiceReactivated",
            Self::ApiKeyIssued { .. } => "ApiKeyIssued",
            Self::ApiKeyRevoked { .. } => "ApiKeyRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// A domain refusal: the command was understood and rejected. Each names the
/// field at fault so the HTTP layer can report it (422) without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The code is already taken by a registered service.
    #[error("code: a service with this code is already registered")]
    CodeAlreadyRegistered,
    /// The code does not follow the format rule.
    #[error("code: {0}")]
    InvalidCode(&'static str),
    /// The name is empty or too long.
    #[error("name: {0}")]
    InvalidName(&'static str),
    /// The command needs a registered service.
    #[error("code: no service is registered with this code")]
    NotRegistered,
    /// Deactivating an inactive service, or reactivating an active one.
    #[error("status: the service is already {0}")]
    AlreadyInStatus(&'static str),
    /// Revoking a key the service never issued.
    #[error("key_id: no such API key")]
    UnknownApiKey,
    /// Revoking a key twice.
    #[error("key_id: the API key is already revoked")]
    ApiKeyAlreadyRevoked,
}

impl ServiceError {
    /// The request field this refusal is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::CodeAlreadyRegistered | Self::InvalidCode(_) | Self::NotRegistered => "code",
            Self::InvalidName(_) => "name",
            Self::AlreadyInStatus(_) => "status",
            Self::UnknownApiKey | Self::ApiKeyAlreadyRevoked => "key_id",
        }
    }

    /// The Lago-style error code for this refusal.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::CodeAlreadyRegistered => "value_already_exist",
            Self::InvalidCode(_) | Self::InvalidName(_) => "value_is_invalid",
            Self::NotRegistered => "not_found",
            Self::AlreadyInStatus(_) | Self::ApiKeyAlreadyRevoked => "invalid_status",
            Self::UnknownApiKey => "not_found",
        }
    }
}

/// Whether a service's keys are accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceStatus {
    /// Not registered yet (the state before the first event).
    #[default]
    Unregistered,
    /// Registered and accepting requests.
    Active,
    /// Registered, requests refused.
    Inactive,
}

impl ServiceStatus {
    /// The name used on the wire and in projections.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unregistered => "unregistered",
            Self::Active => "active",
            Self::Inactive => "inactive",
        }
    }
}

/// The service as the write model knows it: just enough state to decide.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    code: String,
    name: String,
    status: ServiceStatus,
    /// Issued key ids, with whether each is revoked.
    api_keys: std::collections::BTreeMap<String, bool>,
}

impl Service {
    /// The current status.
    pub fn status(&self) -> ServiceStatus {
        self.status
    }

    /// The service's code (empty before registration).
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The service's display name (empty before registration).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The format rule for service codes: they appear in URLs, logs and webhook
/// payloads, so they are short, lowercase and unambiguous.
pub fn validate_service_code(code: &str) -> Result<(), ServiceError> {
    if code.is_empty() || code.len() > 64 {
        return Err(ServiceError::InvalidCode("must be 1 to 64 characters"));
    }
    let valid_chars = code
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid_chars || !code.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(ServiceError::InvalidCode(
            "must start with a lowercase letter and hold only a-z, 0-9, '-' and '_'",
        ));
    }
    Ok(())
}

impl Aggregate for Service {
    const TYPE: &'static str = "Service";
    type Command = ServiceCommand;
    type Event = ServiceEvent;
    type Error = ServiceError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            ServiceCommand::Register { code, name } => {
                if self.status != ServiceStatus::Unregistered {
                    return Err(ServiceError::CodeAlreadyRegistered);
                }
                validate_service_code(&code)?;
                let name = name.trim().to_string();
                if name.is_empty() || name.len() > 200 {
                    return Err(ServiceError::InvalidName("must be 1 to 200 characters"));
                }
                ServiceEvent::ServiceRegistered { code, name }
            }
            ServiceCommand::Deactivate => match self.status {
                ServiceStatus::Unregistered => return Err(ServiceError::NotRegistered),
                ServiceStatus::Inactive => return Err(ServiceError::AlreadyInStatus("inactive")),
                ServiceStatus::Active => ServiceEvent::ServiceDeactivated,
            },
            ServiceCommand::Reactivate => match self.status {
                ServiceStatus::Unregistered => return Err(ServiceError::NotRegistered),
                ServiceStatus::Active => return Err(ServiceError::AlreadyInStatus("active")),
                ServiceStatus::Inactive => ServiceEvent::ServiceReactivated,
            },
            ServiceCommand::IssueApiKey {
                key_id,
                key_sha256,
                label,
            } => {
                if self.status == ServiceStatus::Unregistered {
                    return Err(ServiceError::NotRegistered);
                }
                ServiceEvent::ApiKeyIssued {
                    key_id,
                    key_sha256,
                    label,
                }
            }
            ServiceCommand::RevokeApiKey { key_id } => match self.api_keys.get(&key_id) {
                None => return Err(ServiceError::UnknownApiKey),
                Some(true) => return Err(ServiceError::ApiKeyAlreadyRevoked),
                Some(false) => ServiceEvent::ApiKeyRevoked { key_id },
            },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ServiceEvent::ServiceRegistered { code, name } => {
                self.code = code;
                self.name = name;
                self.status = ServiceStatus::Active;
            }
            ServiceEvent::ServiceDeactivated => self.status = ServiceStatus::Inactive,
            ServiceEvent::ServiceReactivated => self.status = ServiceStatus::Active,
            ServiceEvent::ApiKeyIssued { key_id, .. } => {
                self.api_keys.insert(key_id, false);
            }
            ServiceEvent::ApiKeyRevoked { key_id } => {
                self.api_keys.insert(key_id, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type ServiceTest = TestFramework<Service>;

    fn registered() -> ServiceEvent {
        ServiceEvent::ServiceRegistered {
            code: "nexacloud".into(),
            name: "NexaCloud hosting".into(),
        }
    }

    #[test]
    fn registering_a_new_code_records_service_registered() {
        ServiceTest::with(())
            .given_no_previous_events()
            .when(ServiceCommand::Register {
                code: "nexacloud".into(),
                name: "  NexaCloud hosting ".into(),
            })
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn registering_a_taken_code_is_refused() {
        ServiceTest::with(())
            .given(vec![registered()])
            .when(ServiceCommand::Register {
                code: "nexacloud".into(),
                name: "Another".into(),
            })
            .then_expect_error(ServiceError::CodeAlreadyRegistered);
    }

    #[test]
    fn codes_outside_the_format_are_refused_by_name() {
        for code in [
            "",
            "NexaCloud",
            "1cloud",
            "nexa cloud",
            "nexa/cloud",
            &"a".repeat(65),
        ] {
            let result = ServiceTest::with(())
                .given_no_previous_events()
                .when(ServiceCommand::Register {
                    code: code.to_string(),
                    name: "x".into(),
                })
                .inspect_result();
            let error = result.expect_err(code);
            assert_eq!(error.field(), "code", "{code:?}");
            assert_eq!(error.error_code(), "value_is_invalid", "{code:?}");
        }
    }

    #[test]
    fn an_empty_name_is_refused() {
        ServiceTest::with(())
            .given_no_previous_events()
            .when(ServiceCommand::Register {
                code: "nexadesk".into(),
                name: "   ".into(),
            })
            .then_expect_error(ServiceError::InvalidName("must be 1 to 200 characters"));
    }

    #[test]
    fn deactivation_and_reactivation_alternate() {
        ServiceTest::with(())
            .given(vec![registered()])
            .when(ServiceCommand::Deactivate)
            .then_expect_events(vec![ServiceEvent::ServiceDeactivated]);
        ServiceTest::with(())
            .given(vec![registered(), ServiceEvent::ServiceDeactivated])
            .when(ServiceCommand::Deactivate)
            .then_expect_error(ServiceError::AlreadyInStatus("inactive"));
        ServiceTest::with(())
            .given(vec![registered(), ServiceEvent::ServiceDeactivated])
            .when(ServiceCommand::Reactivate)
            .then_expect_events(vec![ServiceEvent::ServiceReactivated]);
        ServiceTest::with(())
            .given(vec![registered()])
            .when(ServiceCommand::Reactivate)
            .then_expect_error(ServiceError::AlreadyInStatus("active"));
    }

    fn issued() -> ServiceEvent {
        ServiceEvent::ApiKeyIssued {
            key_id: "key_1".into(),
            key_sha256: "ab".repeat(32),
            label: Some("production".into()),
        }
    }

    #[test]
    fn a_key_is_issued_by_digest_and_revoked_once() {
        ServiceTest::with(())
            .given(vec![registered()])
            .when(ServiceCommand::IssueApiKey {
                key_id: "key_1".into(),
                key_sha256: "ab".repeat(32),
                label: Some("production".into()),
            })
            .then_expect_events(vec![issued()]);
        ServiceTest::with(())
            .given(vec![registered(), issued()])
            .when(ServiceCommand::RevokeApiKey {
                key_id: "key_1".into(),
            })
            .then_expect_events(vec![ServiceEvent::ApiKeyRevoked {
                key_id: "key_1".into(),
            }]);
        ServiceTest::with(())
            .given(vec![
                registered(),
                issued(),
                ServiceEvent::ApiKeyRevoked {
                    key_id: "key_1".into(),
                },
            ])
            .when(ServiceCommand::RevokeApiKey {
                key_id: "key_1".into(),
            })
            .then_expect_error(ServiceError::ApiKeyAlreadyRevoked);
        ServiceTest::with(())
            .given(vec![registered()])
            .when(ServiceCommand::RevokeApiKey {
                key_id: "key_9".into(),
            })
            .then_expect_error(ServiceError::UnknownApiKey);
    }

    #[test]
    fn an_unregistered_service_cannot_change_status() {
        ServiceTest::with(())
            .given_no_previous_events()
            .when(ServiceCommand::Deactivate)
            .then_expect_error(ServiceError::NotRegistered);
    }
}
