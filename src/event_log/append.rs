//! Appending events that are not usage (invoices, seals) straight into the
//! log, inside the caller's transaction, with the metadata that says who
//! recorded them. Aggregates with rules go through cqrs-es instead
//! ([`super::store`]); usage has its own high-volume path
//! ([`crate::usage`]). All three write the same table.

use serde_json::Value;
use sqlx::PgConnection;

use super::store::CommandMetadata;

/// An event to append at a given sequence of its stream.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The stream (aggregate) id.
    pub stream: String,
    /// Its sequence in the stream (from 1): the primary key makes a second
    /// writer of the same sequence fail, or skip (see [`OnConflict`]).
    pub sequence: i64,
    /// The event's type, e.g. `InvoiceFinalized`.
    pub event_type: String,
    /// The payload as its aggregate serializes it.
    pub payload: Value,
}

/// What an append does when a sequence is already taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Fail (the caller's transaction aborts: nothing of it is written).
    Fail,
    /// Write nothing for that event (another writer got there first).
    Skip,
}

/// Append `events` of streams of `aggregate_type`, all with `metadata`, in
/// one statement. Returns how many were written.
pub async fn append_events(
    conn: &mut PgConnection,
    aggregate_type: &str,
    events: &[NewEvent],
    metadata: CommandMetadata,
    on_conflict: OnConflict,
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let metadata = serde_json::to_value(metadata.into_map()).expect("a map of strings");
    let conflict = match on_conflict {
        OnConflict::Fail => "",
        OnConflict::Skip => " ON CONFLICT DO NOTHING",
    };
    let written = sqlx::query(&format!(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) \
         SELECT $1, stream, sequence, event_type, '1.0', payload::json, $6::json \
         FROM unnest($2::text[], $3::bigint[], $4::text[], $5::jsonb[]) \
           AS e(stream, sequence, event_type, payload){conflict}"
    ))
    .bind(aggregate_type)
    .bind(events.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.sequence).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| &e.payload).collect::<Vec<_>>())
    .bind(metadata)
    .execute(conn)
    .await?;
    Ok(written.rows_affected())
}
