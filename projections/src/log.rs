//! Reading the event log in its one total order, safely under concurrency.
//!
//! Positions come from an identity column, so they are handed out in insert
//! order but become visible in commit order: a reader that pages on
//! `position > last_seen` can skip a row whose transaction commits late.
//! The log order is therefore `(transaction_id, position)`, and a read only
//! returns rows whose writing transaction is older than the oldest one still
//! running (`pg_snapshot_xmin(pg_current_snapshot())`). Every such
//! transaction has finished, so no row can later appear below the cursor:
//! anything that becomes visible afterwards was written by a transaction at
//! or above the horizon, which sorts after everything already returned.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// A point in the log order: everything at or before it has been read
/// (one type for the whole workspace: the billing law records it too).
pub use aggregates::billing::LogPosition;

/// One recorded fact, as read from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    /// Global position (unique, insert order).
    pub position: i64,
    /// The writing transaction (xid8 as an integer).
    pub transaction_id: i64,
    /// The aggregate (stream) type, e.g. `Service`.
    pub aggregate_type: String,
    /// The aggregate (stream) id.
    pub aggregate_id: String,
    /// The event's sequence inside its stream, from 1.
    pub sequence: i64,
    /// The event's type, e.g. `ServiceRegistered`.
    pub event_type: String,
    /// The payload's schema version.
    pub event_version: String,
    /// The event as serialized by its aggregate: the log's JSON text, decoded
    /// by the reader that needs it ([`LogEvent::decode`]) straight into its
    /// type (a rebuild reads a million of them).
    pub payload: String,
    /// Who recorded it and in which request (the log's JSON text).
    pub metadata: String,
    /// When the database recorded it.
    pub recorded_at: DateTime<Utc>,
    /// A usage event's facts, from the log row's usage columns (only for
    /// readers that ask for them).
    pub usage: Option<UsageFacts>,
}

/// What billing reads of a usage event, stored beside its payload in the
/// log row (see migration `usage_facts_in_the_log`; `ledger verify` checks
/// they agree with the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageFacts {
    /// The subscription's id.
    pub subscription_lago_id: Uuid,
    /// The metric's code.
    pub metric_code: String,
    /// When the usage happened.
    pub timestamp: DateTime<Utc>,
    /// The aggregated property's value (numeric aggregations).
    pub value: Option<Decimal>,
    /// The aggregated property as a key (unique_count).
    pub unique_key: Option<String>,
    /// The billing period the event bills in.
    pub period_start: DateTime<Utc>,
    /// Its end (exclusive).
    pub period_end: DateTime<Utc>,
}

/// Decoded by column index, in [`SELECT_EVENTS`]'s order, without sqlx's
/// per-value type check (the query is fixed, its types known): the log is
/// read a million rows at a time by a rebuild, and both showed in its
/// profile.
impl<'r> sqlx::FromRow<'r, PgRow> for LogEvent {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let usage = match row.try_get::<Option<Uuid>, _>(10)? {
            None => None,
            Some(subscription_lago_id) => Some(UsageFacts {
                subscription_lago_id,
                metric_code: row.try_get_unchecked(11)?,
                timestamp: row.try_get_unchecked(12)?,
                value: row.try_get_unchecked(13)?,
                unique_key: row.try_get_unchecked(14)?,
                period_start: row.try_get_unchecked(15)?,
                period_end: row.try_get_unchecked(16)?,
            }),
        };
        Ok(Self {
            position: row.try_get_unchecked(0)?,
            transaction_id: row.try_get_unchecked(1)?,
            aggregate_type: row.try_get_unchecked(2)?,
            aggregate_id: row.try_get_unchecked(3)?,
            sequence: row.try_get_unchecked(4)?,
            event_type: row.try_get_unchecked(5)?,
            event_version: row.try_get_unchecked(6)?,
            payload: row.try_get_unchecked(7)?,
            metadata: row.try_get_unchecked(8)?,
            recorded_at: row.try_get_unchecked(9)?,
            usage,
        })
    }
}

/// What a reader of the log asks for beyond each event's place and type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reads<'a> {
    /// The aggregate types whose events it reads, with their payload and
    /// metadata (`None`: all). Events of other types stay in the database
    /// (but usage events for a reader of their facts, and a window's last
    /// event, which comes with null payload and metadata to move the
    /// cursor).
    pub payloads: Option<&'a [&'a str]>,
    /// Whether it reads usage events' facts (the log row's usage columns).
    pub usage_facts: bool,
}

impl Reads<'_> {
    /// Whether `event` is one this reader reads (not only shipped to move
    /// its cursor).
    pub fn ships(&self, event: &LogEvent) -> bool {
        self.payloads
            .is_none_or(|types| types.contains(&event.aggregate_type.as_str()))
            || (self.usage_facts && event.aggregate_type == aggregates::usage::USAGE_STREAM_TYPE)
    }

    /// Whether usage events mean anything to this reader (their facts or
    /// their payloads).
    pub fn usage(&self) -> bool {
        self.usage_facts
            || self
                .payloads
                .is_none_or(|types| types.contains(&aggregates::usage::USAGE_STREAM_TYPE))
    }
}

impl LogEvent {
    /// The payload, decoded as the event type `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    /// The cursor just after this event.
    pub fn cursor(&self) -> LogPosition {
        LogPosition {
            transaction_id: self.transaction_id,
            position: self.position,
        }
    }
}

/// The log's columns; `payload` and `metadata` only for the aggregate types
/// in `$4` (all when it is null), usage facts only when `$5`: a fold never
/// pays for decoding events it skips (most of the log is usage, which most
/// projections skip, and the usage projection reads only the facts).
const SELECT_EVENTS: &str = "SELECT position, transaction_id::text::bigint AS transaction_id, \
     aggregate_type, aggregate_id, sequence, event_type, event_version, \
     CASE WHEN $4::text[] IS NULL OR aggregate_type = ANY($4) THEN payload::text ELSE 'null' END AS payload, \
     CASE WHEN $4::text[] IS NULL OR aggregate_type = ANY($4) THEN metadata::text ELSE 'null' END AS metadata, \
     recorded_at, \
     CASE WHEN $5 THEN usage_subscription END AS usage_subscription, \
     CASE WHEN $5 THEN usage_metric END AS usage_metric, \
     CASE WHEN $5 THEN usage_timestamp END AS usage_timestamp, \
     CASE WHEN $5 THEN usage_value END AS usage_value, \
     CASE WHEN $5 THEN usage_unique_key END AS usage_unique_key, \
     CASE WHEN $5 THEN usage_period_start END AS usage_period_start, \
     CASE WHEN $5 THEN usage_period_end END AS usage_period_end";

/// How much of the log one read covers: it ends at its `walk`-th event or
/// at its `ship`-th shipped one, whichever comes first. A reader that reads
/// every event is shipped all it walks; one that reads a few types passes
/// over long stretches of others in one read, its memory bounded by `ship`,
/// walking at most `step` events per statement (a statement that walks a
/// small part of the log keeps to the log index, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The most events walked.
    pub walk: i64,
    /// The most events shipped.
    pub ship: i64,
    /// The most events one statement walks.
    pub step: i64,
}

impl Window {
    /// The window for `reads`: a reader of usage reads most of the log, so
    /// its window walks no further than it ships (walking ahead of what it
    /// can take would only walk the same events again next time).
    pub fn for_reads(self, reads: Reads<'_>) -> Window {
        if reads.usage() {
            Window {
                walk: self.ship,
                ship: self.ship,
                step: self.ship,
            }
        } else {
            self
        }
    }
}

/// A window of the log as one reader reads it.
#[derive(Debug, Default)]
pub struct LogBatch {
    /// The window's events the reader reads (see [`Reads::ships`]), in
    /// log order; the window's last event always among them.
    pub events: Vec<LogEvent>,
    /// How many events the window holds (shipped or not).
    pub walked: usize,
    /// Whether the window stopped at a limit (more may be readable at once)
    /// rather than at the end of what its snapshot could read.
    pub full: bool,
}

impl LogBatch {
    /// The cursor just after the window (`None`: nothing readable).
    pub fn end(&self) -> Option<LogPosition> {
        self.events.last().map(LogEvent::cursor)
    }
}

/// The next window after `cursor` in log order, never returning an event
/// while an older transaction that could still write below it runs.
/// `reads` says which events, payloads and facts to ship: the database
/// walks the window (an index-only scan finds its end) and ships only what
/// the reader reads, plus the window's last event so that the cursor moves
/// past the rest.
/// (The ORDER BY names the table's columns: the select list aliases
/// `transaction_id` to an integer, and ordering by that alias would sort the
/// whole remaining log instead of walking the `(transaction_id, position)`
/// index.)
pub async fn read_after(
    conn: &mut PgConnection,
    cursor: LogPosition,
    window: Window,
    reads: Reads<'_>,
) -> Result<LogBatch, sqlx::Error> {
    if reads.payloads.is_none() {
        let limit = window.walk.min(window.ship);
        let events = sqlx::query_as::<_, LogEvent>(&format!(
            "{SELECT_EVENTS} FROM events \
             WHERE (transaction_id, position) > ($1::text::xid8, $2) \
               AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY events.transaction_id, events.position \
             LIMIT $3"
        ))
        .bind(cursor.transaction_id.to_string())
        .bind(cursor.position)
        .bind(limit)
        .bind(reads.payloads)
        .bind(reads.usage_facts)
        .fetch_all(conn)
        .await?;
        return Ok(LogBatch {
            walked: events.len(),
            full: events.len() as i64 == limit,
            events,
        });
    }
    let mut batch = LogBatch::default();
    let mut at = cursor;
    let mut read = 0;
    loop {
        let walk = (window.walk - batch.walked as i64).min(window.step.max(1));
        let part = read_part(&mut *conn, at, walk, (window.ship - read).max(1), reads).await?;
        let Some(end) = part.end() else { break };
        // A part's last event only moves the cursor: the next part's does.
        if batch.events.last().is_some_and(|e| !reads.ships(e)) {
            batch.events.pop();
        }
        at = end;
        read += part.events.iter().filter(|e| reads.ships(e)).count() as i64;
        batch.walked += part.walked;
        batch.events.extend(part.events);
        batch.full = part.full;
        if !part.full || batch.walked as i64 >= window.walk || read >= window.ship {
            break;
        }
    }
    Ok(batch)
}

/// One statement's part of a filtered window: at most `limit` events
/// walked, at most `ship` shipped.
async fn read_part(
    conn: &mut PgConnection,
    cursor: LogPosition,
    limit: i64,
    ship: i64,
    reads: Reads<'_>,
) -> Result<LogBatch, sqlx::Error> {
    // The part's end: its `limit`-th event, else (the log's tail, or the
    // horizon moved since) its last readable one among the next `limit`;
    // both walk the log index only.
    let at_limit: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events \
         WHERE (transaction_id, position) > ($1::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY events.transaction_id, events.position OFFSET $3 - 1 LIMIT 1",
    )
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.position)
    .bind(limit)
    .fetch_optional(&mut *conn)
    .await?;
    let found = match at_limit {
        Some((transaction, position)) => Some((limit, transaction, position)),
        None => {
            sqlx::query_as(
                "WITH walked AS (SELECT transaction_id, position FROM events \
                   WHERE (transaction_id, position) > ($1::text::xid8, $2) \
                     AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                   ORDER BY transaction_id, position LIMIT $3) \
                 SELECT (SELECT count(*) FROM walked), transaction_id::text::bigint, position \
                 FROM walked \
                 ORDER BY walked.transaction_id DESC, walked.position DESC LIMIT 1",
            )
            .bind(cursor.transaction_id.to_string())
            .bind(cursor.position)
            .bind(limit)
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    let Some((walked, transaction_id, position)) = found else {
        return Ok(LogBatch::default());
    };
    let window_end = LogPosition {
        transaction_id,
        position,
    };
    // Everything in the window committed before the first statement looked
    // (it lies below that statement's horizon), so this one sees the same.
    // (The window's last event is shipped, with a null payload if the reader
    // does not read it, only to move the cursor.)
    // The window walked in log order (the log index, as the reads without a
    // filter), its events filtered before they leave the database; cut
    // short at its `ship`-th (the walk then ends there: counted).
    let events = sqlx::query_as::<_, LogEvent>(&format!(
        "{SELECT_EVENTS} FROM (SELECT * FROM events \
           WHERE (transaction_id, position) > ($1::text::xid8, $2) \
             AND (transaction_id, position) <= ($6::text::xid8, $7) \
           ORDER BY events.transaction_id, events.position LIMIT $3) AS events \
         WHERE aggregate_type = ANY($4) OR ($5 AND aggregate_type = '{usage}') \
            OR (transaction_id, position) = ($6::text::xid8, $7) \
         ORDER BY events.transaction_id, events.position LIMIT $8",
        usage = aggregates::usage::USAGE_STREAM_TYPE
    ))
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.position)
    .bind(limit)
    .bind(reads.payloads)
    .bind(reads.usage_facts)
    .bind(window_end.transaction_id.to_string())
    .bind(window_end.position)
    .bind(ship)
    .fetch_all(&mut *conn)
    .await?;
    match events.last().map(LogEvent::cursor) {
        Some(last) if last != window_end => Ok(LogBatch {
            walked: count_between(conn, cursor, last).await? as usize,
            full: true,
            events,
        }),
        _ => Ok(LogBatch {
            events,
            walked: walked as usize,
            full: walked == limit,
        }),
    }
}

/// The most events [`count_after`] counts: a status report stays cheap
/// however far behind a projection is.
pub const LAG_COUNT_LIMIT: i64 = 100_000;

/// How many committed events lie after `cursor` (including any the horizon
/// still holds back), counted up to [`LAG_COUNT_LIMIT`]: the lag a status
/// report shows.
pub async fn count_after(conn: &mut PgConnection, cursor: LogPosition) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events \
         WHERE (transaction_id, position) > ($1::text::xid8, $2) \
         ORDER BY transaction_id, position LIMIT $3) AS behind",
    )
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.position)
    .bind(LAG_COUNT_LIMIT)
    .fetch_one(conn)
    .await
}

/// How many events lie after `after` and at or before `upto` (an index-only
/// count).
pub async fn count_between(
    conn: &mut PgConnection,
    after: LogPosition,
    upto: LogPosition,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2) \
           AND (transaction_id, position) <= ($3::text::xid8, $4)",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(upto.transaction_id.to_string())
    .bind(upto.position)
    .fetch_one(conn)
    .await
}

/// Whether any committed event lies after `cursor` (an index probe).
pub async fn any_after(conn: &mut PgConnection, cursor: LogPosition) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        // A scalar subquery ordered by the log index: a probe. (EXISTS would
        // drop the ORDER BY and may walk the log from its start.)
        "SELECT (SELECT position FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2) \
         ORDER BY transaction_id, position LIMIT 1) IS NOT NULL",
    )
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.position)
    .fetch_one(conn)
    .await
}
