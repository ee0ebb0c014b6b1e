//! Projection `imports`: every imported record as it now stands (the record
//! of its last fact), by (service, source, type, source id). Usage records
//! are usage events and are not repeated here.

use aggregates::import::{ImportedRecordEvent, IMPORTED_RECORD_TYPE};
use async_trait::async_trait;
use sqlx::PgConnection;

use crate::log::{LogEvent, Reads};
use crate::projection::{Projection, ProjectionError};

/// The `imports` projection.
pub struct Imports;

#[async_trait]
impl Projection for Imports {
    fn name(&self) -> &'static str {
        "imports"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["imported_records"]
    }

    fn reads(&self) -> Reads<'static> {
        Reads {
            payloads: Some(&[IMPORTED_RECORD_TYPE]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != IMPORTED_RECORD_TYPE {
            return Ok(());
        }
        // {service}/{source}/{type}/{source_id}; a source id may hold '/'.
        let mut parts = event.aggregate_id.splitn(4, '/');
        let (Some(service), Some(source), Some(kind), Some(source_id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ProjectionError::unreadable(
                event,
                "stream is not {service}/{source}/{type}/{source_id}",
            ));
        };
        let fact: ImportedRecordEvent = event
            .decode()
            .map_err(|error| ProjectionError::unreadable(event, error))?;
        match fact {
            ImportedRecordEvent::RecordImported { run_id, record } => {
                sqlx::query(
                    "INSERT INTO imported_records (service_code, source, record_type, source_id, \
                     record, imported_by, imported_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(service)
                .bind(source)
                .bind(kind)
                .bind(source_id)
                .bind(record)
                .bind(run_id)
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
            ImportedRecordEvent::ImportedRecordChanged { run_id, record, .. } => {
                sqlx::query(
                    "UPDATE imported_records SET record = $5, changed_by = $6, changed_at = $7 \
                     WHERE service_code = $1 AND source = $2 AND record_type = $3 AND source_id = $4",
                )
                .bind(service)
                .bind(source)
                .bind(kind)
                .bind(source_id)
                .bind(record)
                .bind(run_id)
                .bind(event.recorded_at)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }
}
