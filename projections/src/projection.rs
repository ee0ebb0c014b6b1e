//! The contract every projection keeps.

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::log::{LogEvent, Reads};

/// A projection failed to fold an event.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The event's payload does not match what its type promises.
    #[error("event at position {position} ({event_type}) cannot be read: {reason}")]
    UnreadableEvent {
        /// Where in the log.
        position: i64,
        /// Its recorded type.
        event_type: String,
        /// What was wrong.
        reason: String,
    },
    /// Storing the fold's result failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl ProjectionError {
    /// An event whose payload cannot be decoded.
    pub fn unreadable(event: &LogEvent, reason: impl ToString) -> Self {
        Self::UnreadableEvent {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: reason.to_string(),
        }
    }
}

/// A named read model folded from the log.
///
/// The runner calls [`Projection::apply`] for each event in log order inside
/// one transaction that also advances the projection's checkpoint, so an
/// implementation only has to be a deterministic function of the event and
/// the rows it already wrote. It must ignore event types it does not use.
#[async_trait]
pub trait Projection: Send + Sync {
    /// The projection's name (its checkpoint key; used on the CLI).
    fn name(&self) -> &'static str;

    /// The tables this projection owns; a rebuild empties exactly these.
    fn tables(&self) -> &'static [&'static str];

    /// What the fold reads: the aggregate types whose events it decodes (by
    /// default all; events of other types are not shipped to it at all,
    /// which spares projections that skip usage the bulk of the log) and
    /// whether it reads usage facts (by default not). A fold must still skip
    /// what it does not read: a window's last event always reaches it.
    fn reads(&self) -> Reads<'static> {
        Reads::default()
    }

    /// Fold one event into the projection's tables.
    async fn apply(&self, conn: &mut PgConnection, event: &LogEvent)
        -> Result<(), ProjectionError>;

    /// Fold a batch of events, in log order, with the same result as
    /// folding them one by one. High-volume projections override it with
    /// set-based SQL.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[LogEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            self.apply(conn, event).await?;
        }
        Ok(())
    }
}
