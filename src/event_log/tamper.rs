//! Tamper evidence: proving that no recorded event was altered, removed,
//! inserted or reordered since it was written.
//!
//! Two proofs, neither of which puts writers behind one lock:
//!
//! - **Stream chains.** The database hashes every event on insert, chained
//!   to the previous event of its stream (`event_digest` in the migrations).
//!   A changed event no longer matches its hash; a removed one breaks its
//!   stream's sequence or the next event's chain.
//! - **Seals over the global order.** A `LogSealed` event (stream
//!   `LogSeal/log`, itself chained) records the SHA-256 of the previous
//!   seal's digest followed by the hashes of every event after the previous
//!   seal, in log order, up to a readable position. An event removed,
//!   inserted or moved inside a sealed range changes that digest. `ledger
//!   serve` seals every minute; `ledger seal` seals on demand.
//!
//! Both proofs are recomputable from the log alone. Keep the latest seal's
//! digest outside the database (`ledger verify` prints it): whoever can
//! rewrite the whole table can recompute every hash, but not a digest kept
//! elsewhere.

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::store::{Actor, CommandMetadata};
use crate::tools::progress::Progress;
use projections::LogPosition;

/// The seal stream.
pub const SEAL_STREAM_TYPE: &str = "LogSeal";
const SEAL_STREAM_ID: &str = "log";

/// How many events one seal covers at most.
const SEAL_MAX_EVENTS: i64 = 100_000;

/// A seal over a range of the log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSeal {
    /// The range starts after this point (the previous seal's `to`).
    pub from: (i64, i64),
    /// The range ends at this point, inclusive.
    pub to: (i64, i64),
    /// Events in the range.
    pub events: i64,
    /// SHA-256 (hex) of the previous seal's digest and the range's hashes.
    pub digest: String,
    /// The previous seal's digest (hex; empty for the first seal).
    pub previous: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum SealEvent {
    LogSealed(LogSeal),
}

/// Events after the latest seal's range (what the next seal covers).
pub async fn unsealed_events(pool: &PgPool) -> anyhow::Result<i64> {
    let sealed_to = seals(pool)
        .await?
        .last()
        .map(|(_, _, s)| s.to)
        .unwrap_or((0, 0));
    Ok(events_after(pool, sealed_to).await?)
}

async fn events_after(pool: &PgPool, after: (i64, i64)) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2)",
    )
    .bind(after.0.to_string())
    .bind(after.1)
    .fetch_one(pool)
    .await
}

/// The log position of the latest seal's own event (0: no seal yet).
pub async fn sealed_position(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT position FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
                          ORDER BY sequence DESC LIMIT 1), 0)",
    )
    .bind(SEAL_STREAM_TYPE)
    .bind(SEAL_STREAM_ID)
    .fetch_one(pool)
    .await
}

/// The seals recorded so far, in order.
pub async fn seals(pool: &PgPool) -> Result<Vec<(i64, i64, LogSeal)>, anyhow::Error> {
    let rows: Vec<(i64, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT sequence, position, payload::jsonb FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(SEAL_STREAM_TYPE)
    .bind(SEAL_STREAM_ID)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(sequence, position, payload)| {
            let SealEvent::LogSealed(seal) = serde_json::from_value(payload)?;
            Ok((sequence, position, seal))
        })
        .collect()
}

/// Hashes of the events in `(after, upto]` in log order, streamed.
fn hashes_between<'a>(
    pool: &'a PgPool,
    after: LogPosition,
    upto: Option<LogPosition>,
) -> impl futures_util::Stream<Item = Result<(i64, i64, Vec<u8>, bool), sqlx::Error>> + 'a {
    let upto = upto.unwrap_or(LogPosition::END);
    sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, event_hash, aggregate_type = 'LogSeal' FROM events \
         WHERE (events.transaction_id, events.position) > ($1::text::xid8, $2) \
           AND (events.transaction_id, events.position) <= ($3::text::xid8, $4) \
           AND events.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY events.transaction_id, events.position",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(upto.transaction_id.to_string())
    .bind(upto.position)
    .fetch(pool)
}

/// Seal every readable event after the last seal (at most
/// `SEAL_MAX_EVENTS` per seal). Returns the seals written (none when there
/// was nothing new, or another sealer won the race).
pub async fn seal(pool: &PgPool) -> anyhow::Result<usize> {
    seal_showing(pool, &Progress::hidden()).await
}

/// [`seal`], the events hashed shown on `progress`.
pub async fn seal_showing(pool: &PgPool, progress: &Progress) -> anyhow::Result<usize> {
    let mut written = 0;
    loop {
        let existing = seals(pool).await?;
        let (sequence, from, previous) = existing
            .last()
            .map(|(sequence, _, seal)| (*sequence, seal.to, seal.digest.clone()))
            .unwrap_or((0, (0, 0), String::new()));
        let mut hasher = Sha256::new();
        hasher.update(previous.as_bytes());
        let mut count = 0i64;
        let mut news = 0i64;
        let mut to = from;
        {
            let mut hashes = hashes_between(pool, LogPosition::from(from), None);
            while let Some((transaction_id, position, hash, is_seal)) = hashes.try_next().await? {
                hasher.update(&hash);
                count += 1;
                progress.advance(1);
                news += i64::from(!is_seal);
                to = (transaction_id, position);
                if count == SEAL_MAX_EVENTS {
                    break;
                }
            }
        }
        // Only the last seal's own event is new: nothing to seal (the next
        // seal covers it).
        if news == 0 {
            return Ok(written);
        }
        let seal = LogSeal {
            from,
            to,
            events: count,
            digest: hex(&hasher.finalize()),
            previous,
        };
        let metadata = CommandMetadata {
            actor: Actor::Sealer,
            ..CommandMetadata::cli()
        };
        let sealed = NewEvent {
            stream: SEAL_STREAM_ID.to_string(),
            sequence: sequence + 1,
            event_type: "LogSealed".to_string(),
            payload: serde_json::to_value(SealEvent::LogSealed(seal))?,
        };
        let mut conn = pool.acquire().await?;
        let inserted = append_events(
            &mut conn,
            SEAL_STREAM_TYPE,
            &[sealed],
            metadata,
            OnConflict::Skip,
        )
        .await?;
        if inserted == 0 {
            // Another sealer wrote this seal first; theirs covers the range.
            return Ok(written);
        }
        written += 1;
        if count < SEAL_MAX_EVENTS {
            return Ok(written);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the proof breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// An event's content does not match its hash, or its stream's chain or
    /// sequence is broken at it.
    Chain {
        /// The event's position.
        position: i64,
        /// What does not match.
        reason: String,
    },
    /// A seal's range no longer hashes to its digest (an event in it was
    /// removed, inserted or moved); the range starts after `after_position`.
    Seal {
        /// The seal's own position.
        seal_position: i64,
        /// Its range starts after this position.
        after_position: i64,
        /// What does not match.
        reason: String,
    },
}

impl Break {
    /// The first log position the break concerns.
    pub fn position(&self) -> i64 {
        match self {
            Break::Chain { position, .. } => *position,
            Break::Seal { after_position, .. } => after_position + 1,
        }
    }
}

/// What `ledger verify` found.
#[derive(Debug, Clone)]
pub struct Verification {
    /// Events whose chain was checked.
    pub events_checked: i64,
    /// Seals checked.
    pub seals_checked: usize,
    /// Events after the last seal (chain-checked only).
    pub unsealed: i64,
    /// The latest seal's digest, to keep elsewhere.
    pub latest_digest: Option<String>,
    /// The first break, if any (the earliest position).
    pub first_break: Option<Break>,
}

/// Verify the log from `from_position` on (0: everything).
pub async fn verify(pool: &PgPool, from_position: i64) -> anyhow::Result<Verification> {
    verify_showing(pool, from_position, &Progress::hidden()).await
}

/// [`verify`], shown on `progress`: the chains (one statement), then each
/// seal's events.
pub async fn verify_showing(
    pool: &PgPool,
    from_position: i64,
    progress: &Progress,
) -> anyhow::Result<Verification> {
    // Stream chains: recompute every event's hash from its content and its
    // stream's previous event, and check sequences step by one; a usage
    // event's columns must say what its (hashed) payload says.
    let chain: Option<(i64, String)> = sqlx::query_as(
        "SELECT position, CASE \
             WHEN previous_sequence IS NULL AND sequence <> 1 THEN 'its stream starts at sequence ' || sequence \
             WHEN previous_sequence IS NOT NULL AND sequence <> previous_sequence + 1 \
               THEN 'sequence ' || sequence || ' follows ' || previous_sequence \
             WHEN event_hash IS DISTINCT FROM expected THEN 'its content does not match its hash' \
             ELSE 'its usage columns do not match its payload' END \
         FROM (SELECT position, sequence, event_hash, \
                 lag(sequence) OVER stream AS previous_sequence, \
                 event_digest(lag(event_hash) OVER stream, aggregate_type, aggregate_id, sequence, \
                              event_type, event_version, payload, metadata) AS expected, \
                 (usage_subscription, usage_metric, usage_timestamp, usage_value, usage_unique_key, \
                  usage_period_start, usage_period_end) IS NOT DISTINCT FROM \
                   (f.subscription, f.metric, f.\"timestamp\", f.value, f.unique_key, f.period_start, \
                    f.period_end) AS facts_match \
               FROM events LEFT JOIN LATERAL usage_facts(aggregate_type, payload) AS f ON true WINDOW stream AS (PARTITION BY aggregate_type, aggregate_id ORDER BY sequence)) e \
         WHERE position >= $1 AND (event_hash IS DISTINCT FROM expected \
           OR (previous_sequence IS NULL AND sequence <> 1) \
           OR sequence <> coalesce(previous_sequence + 1, 1) \
           OR NOT facts_match) \
         ORDER BY position LIMIT 1",
    )
    .bind(from_position)
    .fetch_optional(pool)
    .await?;
    let events_checked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE position >= $1")
            .bind(from_position)
            .fetch_one(pool)
            .await?;
    let mut first_break = chain.map(|(position, reason)| Break::Chain { position, reason });

    // Seals: recompute each sealed range's digest in log order.
    let all_seals = seals(pool).await?;
    let sealed_events: i64 = all_seals
        .iter()
        .filter(|(_, position, seal)| seal.to.1 >= from_position || *position >= from_position)
        .map(|(_, _, seal)| seal.events)
        .sum();
    progress.next_events("seals", sealed_events.max(0) as u64);
    let mut seals_checked = 0;
    let mut expected_from = (0, 0);
    let mut expected_previous = String::new();
    for (_, seal_position, seal) in &all_seals {
        let in_scope = seal.to.1 >= from_position || seal_position >= &from_position;
        let broken = |reason: String| Break::Seal {
            seal_position: *seal_position,
            after_position: seal.from.1,
            reason,
        };
        let mut found = None;
        if seal.from != expected_from || seal.previous != expected_previous {
            found = Some(broken("the seal does not follow the previous one".into()));
        } else if in_scope {
            let mut hasher = Sha256::new();
            hasher.update(seal.previous.as_bytes());
            let mut count = 0i64;
            let mut hashes = hashes_between(
                pool,
                LogPosition::from(seal.from),
                Some(LogPosition::from(seal.to)),
            );
            while let Some((_, _, hash, _)) = hashes.try_next().await? {
                hasher.update(&hash);
                count += 1;
                progress.advance(1);
            }
            if hex(&hasher.finalize()) != seal.digest {
                found = Some(broken(format!(
                    "the {} events sealed here no longer hash to the seal ({count} found)",
                    seal.events
                )));
            }
            seals_checked += 1;
        }
        if let Some(found) = found {
            if first_break
                .as_ref()
                .is_none_or(|b| found.position() < b.position())
            {
                first_break = Some(found);
            }
            break;
        }
        expected_from = seal.to;
        expected_previous = seal.digest.clone();
    }
    let sealed_to = all_seals.last().map(|(_, _, s)| s.to).unwrap_or((0, 0));
    let unsealed = events_after(pool, sealed_to).await?;
    progress.finish();
    crate::app::metrics::verified(first_break.is_none());
    Ok(Verification {
        events_checked,
        seals_checked,
        unsealed,
        latest_digest: all_seals.last().map(|(_, _, s)| s.digest.clone()),
        first_break,
    })
}

/// Seals the log every `interval` inside `ledger serve`.
pub async fn run_sealer(
    pool: PgPool,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    health: crate::app::supervisor::TaskHealth,
) {
    loop {
        match seal(&pool).await {
            Ok(written) => {
                crate::app::metrics::sealed(written);
                health.succeeded()
            }
            Err(error) => health.failed(&format!("sealing the log failed: {error:#}")),
        }
        tokio::select! {
            _ = tokio::time::sleep(health.next_wait(interval)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
