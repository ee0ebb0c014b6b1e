//! Projection `service_directory`: which services exist and whether they are
//! active. Folded from the `Service` aggregate's events.

use aggregates::service::ServiceStatus;
use aggregates::{Service, ServiceEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;

use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `service_directory` projection.
pub struct ServiceDirectory;

/// What one event changes in the directory: the pure part of the fold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryChange {
    /// A new row.
    Registered {
        /// Service code.
        code: String,
        /// Display name.
        name: String,
    },
    /// A status change of an existing row.
    StatusChanged {
        /// Service code.
        code: String,
        /// The new status.
        status: ServiceStatus,
    },
    /// A new API key (digest only).
    KeyIssued {
        /// Service code.
        code: String,
        /// Public id.
        key_id: String,
        /// Hex SHA-256.
        key_sha256: String,
        /// Label.
        label: Option<String>,
    },
    /// A revoked API key.
    KeyRevoked {
        /// Public id.
        key_id: String,
    },
}

/// The pure fold: which directory change, if any, an event makes.
pub fn directory_change(event: &LogEvent) -> Result<Option<DirectoryChange>, ProjectionError> {
    if event.aggregate_type != Service::TYPE {
        return Ok(None);
    }
    let service_event: ServiceEvent = event
        .decode()
        .map_err(|error| ProjectionError::unreadable(event, error))?;
    let code = event.aggregate_id.clone();
    Ok(Some(match service_event {
        ServiceEvent::ServiceRegistered { name, .. } => DirectoryChange::Registered { code, name },
        ServiceEvent::ServiceDeactivated => DirectoryChange::StatusChanged {
            code,
            status: ServiceStatus::Inactive,
        },
        ServiceEvent::ServiceReactivated => DirectoryChange::StatusChanged {
            code,
            status: ServiceStatus::Active,
        },
        ServiceEvent::ApiKeyIssued {
            key_id,
            key_sha256,
            label,
        } => DirectoryChange::KeyIssued {
            code,
            key_id,
            key_sha256,
            label,
        },
        ServiceEvent::ApiKeyRevoked { key_id } => DirectoryChange::KeyRevoked { key_id },
    }))
}

#[async_trait]
impl Projection for ServiceDirectory {
    fn name(&self) -> &'static str {
        "service_directory"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["service_directory", "api_keys"]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[Service::TYPE]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        let at: DateTime<Utc> = event.recorded_at;
        match directory_change(event)? {
            None => {}
            Some(DirectoryChange::Registered { code, name }) => {
                sqlx::query(
                    "INSERT INTO service_directory \
                     (code, name, status, registered_at, updated_at, last_position) \
                     VALUES ($1, $2, 'active', $3, $3, $4)",
                )
                .bind(code)
                .bind(name)
                .bind(at)
                .bind(event.position)
                .execute(conn)
                .await?;
            }
            Some(DirectoryChange::StatusChanged { code, status }) => {
                sqlx::query(
                    "UPDATE service_directory SET status = $2, updated_at = $3, last_position = $4 \
                     WHERE code = $1",
                )
                .bind(code)
                .bind(status.as_str())
                .bind(at)
                .bind(event.position)
                .execute(conn)
                .await?;
            }
            Some(DirectoryChange::KeyIssued {
                code,
                key_id,
                key_sha256,
                label,
            }) => {
                sqlx::query(
                    "INSERT INTO api_keys (key_id, service_code, key_sha256, label, issued_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(key_id)
                .bind(code)
                .bind(key_sha256)
                .bind(label)
                .bind(at)
                .execute(conn)
                .await?;
            }
            Some(DirectoryChange::KeyRevoked { key_id }) => {
                sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1")
                    .bind(key_id)
                    .bind(at)
                    .execute(conn)
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_event(aggregate_type: &str, payload: serde_json::Value) -> LogEvent {
        LogEvent {
            position: 7,
            transaction_id: 900,
            aggregate_type: aggregate_type.into(),
            aggregate_id: "nexacloud".into(),
            sequence: 1,
            event_type: "ServiceRegistered".into(),
            event_version: "1.0".into(),
            payload: payload.to_string(),
            metadata: "{}".into(),
            recorded_at: Utc::now(),
            usage: None,
        }
    }

    #[test]
    fn a_registration_adds_an_active_row() {
        let event = log_event(
            "Service",
            json!({"ServiceRegistered": {"code": "nexacloud", "name": "NexaCloud"}}),
        );
        assert_eq!(
            directory_change(&event).unwrap(),
            Some(DirectoryChange::Registered {
                code: "nexacloud".into(),
                name: "NexaCloud".into()
            })
        );
    }

    #[test]
    fn deactivation_changes_the_status() {
        let event = log_event("Service", json!("ServiceDeactivated"));
        assert_eq!(
            directory_change(&event).unwrap(),
            Some(DirectoryChange::StatusChanged {
                code: "nexacloud".into(),
                status: ServiceStatus::Inactive
            })
        );
    }

    #[test]
    fn other_streams_are_ignored() {
        let event = log_event("Customer", json!({"anything": 1}));
        assert_eq!(directory_change(&event).unwrap(), None);
    }

    #[test]
    fn an_unreadable_payload_names_its_position() {
        let event = log_event("Service", json!({"ServiceRenamed": {}}));
        let error = directory_change(&event).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("event at position 7 (ServiceRegistered) cannot be read"),
            "{error}"
        );
    }
}
