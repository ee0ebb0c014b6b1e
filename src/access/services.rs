//! Operator actions on services and their API keys, shared by the admin
//! API and the `ledger services` CLI so both follow one set of rules.

use aggregates::{Service, ServiceCommand, ServiceError};
use cqrs_es::AggregateError;
use serde::Serialize;

use crate::access::keys;
use crate::event_log::store::{self, CommandBus, CommandMetadata};

/// A freshly issued key: the only time the key itself exists outside the
/// client that receives it.
#[derive(Debug, Serialize)]
pub struct IssuedKey {
    /// The key's id (public: listed, revoked by it).
    pub id: String,
    /// The key itself: shown once, never stored.
    pub key: String,
    /// The service it acts for.
    pub service_code: String,
    /// What it is for.
    pub label: Option<String>,
}

/// Register a service.
pub async fn register(
    commands: &CommandBus,
    code: &str,
    name: &str,
    metadata: CommandMetadata,
) -> Result<(), AggregateError<ServiceError>> {
    aggregates::service::validate_service_code(code).map_err(AggregateError::UserError)?;
    let command = ServiceCommand::Register {
        code: code.to_string(),
        name: name.to_string(),
    };
    store::execute(&commands.services, code, command, metadata).await
}

/// Issue an API key for a service; only its digest is recorded.
pub async fn issue_key(
    commands: &CommandBus,
    code: &str,
    label: Option<String>,
    metadata: CommandMetadata,
) -> Result<IssuedKey, AggregateError<ServiceError>> {
    let key = keys::generate(&format!("ledger_{code}_"));
    let id = format!("key_{}", uuid::Uuid::new_v4().simple());
    let command = ServiceCommand::IssueApiKey {
        key_id: id.clone(),
        key_sha256: keys::digest(&key),
        label: label.clone(),
    };
    store::execute(&commands.services, code, command, metadata).await?;
    Ok(IssuedKey {
        id,
        key,
        service_code: code.to_string(),
        label,
    })
}

/// Revoke one of a service's keys.
pub async fn revoke_key(
    commands: &CommandBus,
    code: &str,
    key_id: &str,
    metadata: CommandMetadata,
) -> Result<(), AggregateError<ServiceError>> {
    let command = ServiceCommand::RevokeApiKey {
        key_id: key_id.to_string(),
    };
    store::execute(&commands.services, code, command, metadata).await
}

/// The aggregate type the service commands write to (for read-your-writes).
pub const AGGREGATE_TYPE: &str = <Service as cqrs_es::Aggregate>::TYPE;
