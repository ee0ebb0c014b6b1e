//! Runs the projections: each reads the log in order after its checkpoint
//! and folds the events into its tables, tables and checkpoint written in one
//! transaction.
//!
//! Several ledger processes may run side by side on one database: a batch
//! locks its projection's checkpoint row with `FOR UPDATE SKIP LOCKED`, so
//! only one process advances a projection at a time and none applies an
//! event twice. The runner sleeps until PostgreSQL notifies that events were
//! appended (usage appends do not notify: the process that appended wakes
//! its own runner), or a second passes (events held back by the visibility
//! horizon, and usage appended by other processes, become readable without a
//! notification of their own).

use std::sync::Arc;
use std::time::Duration;

use projections::log::{self, LogPosition, Window};
use projections::{Projection, ProjectionError};
use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::tools::progress::Progress;

/// The log read per transaction: a thousand events shipped, ten thousand
/// walked for a projection that reads a few types.
const WINDOW: Window = Window {
    walk: 10_000,
    ship: 1_000,
    step: 10_000,
};
/// The log read per transaction by a rebuild (far behind, nobody waiting):
/// a projection that reads a few types passes over the others a million at
/// a time, with at most 50,000 events in memory (bigger batches cost more
/// memory and folded no faster).
const REBUILD_WINDOW: Window = Window {
    walk: 1_000_000,
    ship: 50_000,
    step: 50_000,
};
/// The channel the `events_appended` trigger notifies.
const APPENDED_CHANNEL: &str = "ledger_events_appended";
/// The longest a runner waits without a notification.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a notified runner waits for more appends before folding: under
/// a stream of small appends, one pass (a transaction per projection) then
/// covers many of them instead of one each (at 10 ms, single events at one
/// client ran ~0.07 of the reference slower than at 50 ms: `ledger bench
/// ingest`). Requests that must read their own writes, current usage
/// among them, drive the projections themselves and never wait for this.
const COALESCE_DELAY: Duration = Duration::from_millis(50);
/// How soon to look again when events are held back by the horizon.
const HELD_BACK_RETRY: Duration = Duration::from_millis(20);

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Applied a window of the log.
    Applied {
        /// Its events (walked: including those the projection does not
        /// read, which the log never ships to it).
        events: usize,
        /// Whether it stopped at its limit: more may be readable at once.
        full: bool,
    },
    /// Nothing after the checkpoint: the projection is current.
    CaughtUp,
    /// Committed events lie after the checkpoint, but an older transaction
    /// still running (in any database of the cluster) keeps them below the
    /// visibility horizon for now.
    HeldBack,
    /// Another process holds the projection right now.
    Busy,
}

/// A projection's progress, as `ledger projections status` and `/ready` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// The global position of the last event it applied.
    pub last_position: i64,
    /// Events applied since its last reset.
    pub events_applied: i64,
    /// Committed events after the checkpoint (counted up to 100,000).
    pub lag: i64,
    /// When the checkpoint last moved (none before the first run).
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Applies the log to a set of projections.
pub struct ProjectionRunner {
    pool: PgPool,
    projections: Vec<Box<dyn Projection>>,
    /// The log read per batch: bigger when rebuilding (far behind, nobody
    /// waiting).
    window: Window,
}

impl ProjectionRunner {
    /// A runner for the given projections; their checkpoint rows are created
    /// when missing.
    pub async fn new(
        pool: PgPool,
        projections: Vec<Box<dyn Projection>>,
    ) -> Result<Self, sqlx::Error> {
        for projection in &projections {
            register(&pool, projection.name()).await?;
        }
        Ok(Self {
            pool,
            projections,
            window: WINDOW,
        })
    }

    /// The same runner in rebuild mode (see `rebuilding`).
    pub fn rebuilding(mut self) -> Self {
        self.window = REBUILD_WINDOW;
        self
    }

    /// The same runner reading `window`s of the log.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = Window {
            walk: window.walk.max(1),
            ship: window.ship.max(1),
            step: window.step.max(1),
        };
        self
    }

    /// A runner for every projection of the ledger.
    pub async fn for_all(pool: PgPool) -> Result<Self, sqlx::Error> {
        Self::new(pool, projections::all()).await
    }

    /// The projections this runner serves.
    pub fn projections(&self) -> impl Iterator<Item = &dyn Projection> {
        self.projections.iter().map(|p| p.as_ref())
    }

    /// Apply the next batch of events to one projection.
    pub async fn run_batch(
        &self,
        projection: &dyn Projection,
    ) -> Result<BatchOutcome, ProjectionError> {
        let mut tx = self.pool.begin().await?;
        // The batch commits without waiting for the disk: it is derived from
        // the log, which is durable before any of it becomes readable, and a
        // crash loses the last batches together with their checkpoint, so
        // they are simply applied again. (One fsync per appended request
        // instead of two.)
        let checkpoint: Option<(i64, i64, String)> = sqlx::query_as(
            "SELECT last_transaction_id::text::bigint, last_position, \
                    set_config('synchronous_commit', 'off', true) \
             FROM projection_checkpoints WHERE projection = $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(projection.name())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((transaction_id, position, _)) = checkpoint else {
            tx.rollback().await?;
            return Ok(BatchOutcome::Busy);
        };
        let cursor = LogPosition {
            transaction_id,
            position,
        };
        let reads = projection.reads();
        let batch = log::read_after(&mut tx, cursor, self.window.for_reads(reads), reads).await?;
        let Some(last) = batch.end() else {
            let outcome = match log::any_after(&mut tx, cursor).await? {
                false => BatchOutcome::CaughtUp,
                true => BatchOutcome::HeldBack,
            };
            // Ended now, not whenever the pool gets round to rolling back a
            // dropped transaction (a task of the caller's runtime, which may
            // be blocked): the checkpoint row stays locked until then, and a
            // rebuild, which locks it, would wait.
            tx.rollback().await?;
            return Ok(outcome);
        };
        projection.apply_batch(&mut tx, &batch.events).await?;
        sqlx::query(
            "UPDATE projection_checkpoints SET last_transaction_id = $2::text::xid8, \
             last_position = $3, events_applied = events_applied + $4, updated_at = now() \
             WHERE projection = $1",
        )
        .bind(projection.name())
        .bind(last.transaction_id.to_string())
        .bind(last.position)
        .bind(batch.walked as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        crate::app::metrics::projection_applied(projection.name(), batch.walked);
        Ok(BatchOutcome::Applied {
            events: batch.walked,
            full: batch.full,
        })
    }

    /// Apply batches to every projection until none has anything readable
    /// (or another process holds it). Returns the events applied and whether
    /// any projection is held back by the visibility horizon.
    pub async fn apply_readable(&self) -> Result<(usize, bool), ProjectionError> {
        self.apply_readable_of(|_| true).await
    }

    /// [`Self::apply_readable`] for the projections `wanted` picks. A window
    /// short of its limits read everything readable at its snapshot, so it
    /// ends the projection's turn.
    pub async fn apply_readable_of(
        &self,
        wanted: impl Fn(&dyn Projection) -> bool,
    ) -> Result<(usize, bool), ProjectionError> {
        let mut applied = 0;
        let mut held_back = false;
        for projection in self.projections.iter().filter(|p| wanted(p.as_ref())) {
            loop {
                match self.run_batch(projection.as_ref()).await? {
                    BatchOutcome::Applied { events, full } => {
                        applied += events;
                        if !full {
                            break;
                        }
                    }
                    BatchOutcome::HeldBack => {
                        held_back = true;
                        break;
                    }
                    BatchOutcome::CaughtUp | BatchOutcome::Busy => break,
                }
            }
        }
        Ok((applied, held_back))
    }

    /// Apply every event committed so far to every projection, waiting out
    /// transactions that hold events back (the CLI's rebuild, tests). Stops
    /// early for a projection another process is advancing. Returns the
    /// events this runner applied.
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        for projection in &self.projections {
            applied += self.catch_up_one(projection.as_ref()).await?;
        }
        Ok(applied)
    }

    /// Wait until every projection of this runner has applied the log up to
    /// `cursor`, driving them forward meanwhile (so a request can read its
    /// own write). Gives up after `timeout`.
    pub async fn wait_until_applied(
        &self,
        cursor: LogPosition,
        timeout: Duration,
    ) -> Result<bool, ProjectionError> {
        let names: Vec<&str> = self.projections.iter().map(|p| p.name()).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.apply_readable().await?;
            let reached: bool = sqlx::query_scalar(
                "SELECT coalesce(bool_and((last_transaction_id, last_position) >= ($1::text::xid8, $2)), false) \
                 FROM projection_checkpoints WHERE projection = ANY($3)",
            )
            .bind(cursor.transaction_id.to_string())
            .bind(cursor.position)
            .bind(&names)
            .fetch_one(&self.pool)
            .await?;
            if reached {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// [`Self::catch_up`] for one projection.
    pub async fn catch_up_one(
        &self,
        projection: &dyn Projection,
    ) -> Result<usize, ProjectionError> {
        self.catch_up_one_showing(projection, &Progress::hidden())
            .await
    }

    /// [`Self::catch_up_one`], each batch's events shown on `progress`.
    pub async fn catch_up_one_showing(
        &self,
        projection: &dyn Projection,
        progress: &Progress,
    ) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        loop {
            match self.run_batch(projection).await? {
                BatchOutcome::Applied { events, .. } => {
                    applied += events;
                    progress.advance(events as u64);
                }
                BatchOutcome::HeldBack => tokio::time::sleep(HELD_BACK_RETRY).await,
                BatchOutcome::CaughtUp | BatchOutcome::Busy => return Ok(applied),
            }
        }
    }

    /// Keep every projection caught up until `shutdown` turns true: woken
    /// by PostgreSQL's notification of appended events, by `appended` (usage
    /// appended by this process, which does not notify), or by polling.
    /// A wake for usage advances only the projections that read usage; the
    /// others pass over it at least every [`POLL_INTERVAL`].
    pub async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        appended: Arc<Notify>,
        health: crate::app::supervisor::TaskHealth,
    ) {
        let mut listener = None;
        let mut usage_only = false;
        let mut last_full_pass = tokio::time::Instant::now();
        while !*shutdown.borrow() {
            let pass = if usage_only && last_full_pass.elapsed() < POLL_INTERVAL {
                self.apply_readable_of(|p| p.reads().usage()).await
            } else {
                last_full_pass = tokio::time::Instant::now();
                self.apply_readable().await
            };
            usage_only = false;
            let wait = match pass {
                Ok((_, held_back)) => {
                    health.succeeded();
                    if held_back {
                        HELD_BACK_RETRY
                    } else {
                        POLL_INTERVAL
                    }
                }
                Err(error) => {
                    health.failed(&format!("projection runner failed: {error}"));
                    // Reconnect the notifications too: the database may have restarted.
                    listener = None;
                    health.next_wait(POLL_INTERVAL * 5)
                }
            };
            if listener.is_none() {
                listener = listen(&self.pool).await;
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = notified => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "lost the event notification channel; polling");
                        listener = None;
                    }
                    // Let the appends of the next moments join this pass,
                    // and drop the notifications it will cover.
                    tokio::time::sleep(COALESCE_DELAY).await;
                    if let Some(listener) = listener.as_mut() {
                        while listener.next_buffered().is_some() {}
                    }
                }
                _ = appended.notified() => {
                    usage_only = true;
                    tokio::time::sleep(COALESCE_DELAY).await;
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// Listen for appended events on a connection of its own, never one of the
/// pool's: after the database restarts, a pooled connection that had
/// listened could go back to the pool still receiving notifications, and
/// every query on it would then fail.
async fn listen(pool: &PgPool) -> Option<PgListener> {
    let options = pool.connect_options().as_ref().clone();
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    let mut listener = PgListener::connect_with(&own).await.ok()?;
    listener.listen(APPENDED_CHANNEL).await.ok()?;
    Some(listener)
}

async fn register(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .execute(pool)
    .await
    .map(|_| ())
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    projection: String,
    transaction_id: i64,
    last_position: i64,
    events_applied: i64,
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every projection's checkpoint and lag: those the ledger defines (even
/// before a runner registered them) and any other with a checkpoint.
pub async fn status(pool: &PgPool) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let known: Vec<&str> = projections::all().iter().map(|p| p.name()).collect();
    let rows: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT projection, coalesce(last_transaction_id::text::bigint, 0) AS transaction_id, \
         coalesce(last_position, 0) AS last_position, \
         coalesce(events_applied, 0) AS events_applied, updated_at \
         FROM (SELECT unnest($1::text[]) AS projection \
               UNION SELECT projection FROM projection_checkpoints) AS names \
         LEFT JOIN projection_checkpoints USING (projection) \
         ORDER BY projection",
    )
    .bind(&known)
    .fetch_all(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    let mut statuses = Vec::with_capacity(rows.len());
    for row in rows {
        let cursor = LogPosition {
            transaction_id: row.transaction_id,
            position: row.last_position,
        };
        statuses.push(ProjectionStatus {
            name: row.projection,
            last_position: row.last_position,
            events_applied: row.events_applied,
            lag: log::count_after(&mut conn, cursor).await?,
            updated_at: row.updated_at,
        });
    }
    Ok(statuses)
}

/// The position `projection` has applied the log up to (the start when it
/// never ran): what a reader of its tables sees, as a log position.
pub async fn checkpoint(
    conn: &mut sqlx::PgConnection,
    projection: &str,
) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT last_transaction_id::text::bigint, last_position FROM projection_checkpoints \
         WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(LogPosition::from).unwrap_or_default())
}

/// Empty a projection's tables and reset its checkpoint, in one transaction
/// (waiting for a runner that holds it to finish its batch). The next
/// `catch_up` replays the log from the start.
pub async fn reset(pool: &PgPool, projection: &dyn Projection) -> Result<(), sqlx::Error> {
    register(pool, projection.name()).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("TRUNCATE {}", projection.tables().join(", ")))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE projection_checkpoints SET last_transaction_id = '0', last_position = 0, \
         events_applied = 0, updated_at = now() WHERE projection = $1",
    )
    .bind(projection.name())
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The longest identifier PostgreSQL keeps (longer ones are cut, silently).
const MAX_SCHEMA_NAME: usize = 63;

/// Why a side-by-side rebuild was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The schema name cannot be a rebuild's: not a plain lower-case
    /// identifier, a system schema, a reserved word or too long.
    #[error("'{name}' is not a schema a rebuild may write to: {why}")]
    InvalidSchema {
        /// The name asked for.
        name: String,
        /// Why not.
        why: &'static str,
    },
    /// A projection's fold or tables failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// Storage failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Rebuild `projections` from the whole log into `schema`, beside the live
/// tables, which are left untouched: each table is recreated there like
/// its live twin and the same folds write to it (through the connection's
/// `search_path`). Returns the events read and the log position reached.
/// This is how a rebuild is compared with live, and how alternative
/// computations run next to the real ones.
pub async fn rebuild_into(
    pool: &PgPool,
    projections: &[&dyn Projection],
    schema: &str,
) -> Result<(usize, LogPosition), RebuildError> {
    rebuild_into_showing(pool, projections, schema, &Progress::hidden()).await
}

/// [`rebuild_into`], the events read shown on `progress`.
pub async fn rebuild_into_showing(
    pool: &PgPool,
    projections: &[&dyn Projection],
    schema: &str,
    progress: &Progress,
) -> Result<(usize, LogPosition), RebuildError> {
    rebuild_into_upto(pool, projections, schema, None, progress).await
}

/// Refuse a schema a rebuild must not write to: anything but lower-case
/// letters, digits and `_` (not first a digit), the system schemas
/// (`pg_*`, `information_schema`) and `public` (the live tables), a word
/// PostgreSQL reserves, or a name longer than it keeps.
async fn check_schema_name(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<(), RebuildError> {
    let refuse = |why| {
        Err(RebuildError::InvalidSchema {
            name: schema.to_string(),
            why,
        })
    };
    let plain = !schema.is_empty()
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if !plain {
        return refuse("use lower-case letters, digits and _, not starting with a digit");
    }
    if schema.len() > MAX_SCHEMA_NAME {
        return refuse("longer than the 63 characters PostgreSQL keeps");
    }
    if schema == "public" || schema == "information_schema" || schema.starts_with("pg_") {
        return refuse("a system schema, or public (the live tables)");
    }
    let reserved: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_get_keywords() WHERE word = $1 AND catcode IN ('R', 'T'))",
    )
    .bind(schema)
    .fetch_one(&mut *conn)
    .await?;
    if reserved {
        return refuse("a word PostgreSQL reserves");
    }
    Ok(())
}

/// [`rebuild_into`], folding only the log up to `upto` (inclusive): the
/// projections as they stood at that point of the log.
pub async fn rebuild_into_upto(
    pool: &PgPool,
    projections: &[&dyn Projection],
    schema: &str,
    upto: Option<LogPosition>,
    progress: &Progress,
) -> Result<(usize, LogPosition), RebuildError> {
    let mut conn = pool.acquire().await?;
    check_schema_name(&mut conn, schema).await?;
    let mut ddl = format!("CREATE SCHEMA IF NOT EXISTS {schema};");
    for projection in projections {
        for table in projection.tables() {
            ddl.push_str(&format!(
                "DROP TABLE IF EXISTS {schema}.{table}; \
                 CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL);"
            ));
        }
    }
    sqlx::raw_sql(&ddl).execute(&mut *conn).await?;
    sqlx::query(&format!("SET search_path TO {schema}, public"))
        .execute(&mut *conn)
        .await?;
    let result = fold_log(&mut conn, projections, upto, progress).await;
    // The connection goes back to the pool: give it back its own path.
    sqlx::query("RESET search_path").execute(&mut *conn).await?;
    result
}

/// Fold the log from its start (up to `upto`) into `projections` on `conn`,
/// one transaction per batch (explicit `BEGIN`/`COMMIT` on the borrowed
/// connection; rolled back on a failure).
async fn fold_log(
    conn: &mut sqlx::PgConnection,
    projections: &[&dyn Projection],
    upto: Option<LogPosition>,
    progress: &Progress,
) -> Result<(usize, LogPosition), RebuildError> {
    let mut cursor = LogPosition::START;
    let mut read = 0;
    loop {
        sqlx::raw_sql("BEGIN; SET LOCAL synchronous_commit = off")
            .execute(&mut *conn)
            .await?;
        let step = fold_batch(conn, projections, cursor, upto).await;
        let step = match step {
            Ok(step) => step,
            Err(error) => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                return Err(error);
            }
        };
        sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
        match step {
            FoldStep::Applied(count, last, done) => {
                read += count;
                progress.advance(count as u64);
                cursor = last;
                if done {
                    return Ok((read, cursor));
                }
            }
            FoldStep::HeldBack => tokio::time::sleep(HELD_BACK_RETRY).await,
            FoldStep::Done => return Ok((read, cursor)),
        }
    }
}

enum FoldStep {
    Applied(usize, LogPosition, bool),
    HeldBack,
    Done,
}

async fn fold_batch(
    conn: &mut sqlx::PgConnection,
    projections: &[&dyn Projection],
    cursor: LogPosition,
    upto: Option<LogPosition>,
) -> Result<FoldStep, RebuildError> {
    // The union of what the projections read (all payloads, if one reads all).
    let payloads: Option<Vec<&str>> = projections
        .iter()
        .map(|p| p.reads().payloads)
        .collect::<Option<Vec<_>>>()
        .map(|types| types.into_iter().flatten().copied().collect());
    let reads = log::Reads {
        payloads: payloads.as_deref(),
        usage_facts: projections.iter().any(|p| p.reads().usage_facts),
    };
    let mut batch =
        log::read_after(&mut *conn, cursor, REBUILD_WINDOW.for_reads(reads), reads).await?;
    let Some(mut last) = batch.end() else {
        if !log::any_after(&mut *conn, cursor).await? {
            return Ok(FoldStep::Done);
        }
        return Ok(FoldStep::HeldBack);
    };
    // The end is reached once a window holds it or reads past it (an empty
    // window may only mean the horizon holds events back).
    let mut walked = batch.walked;
    let reached_end = upto.is_some_and(|end| end <= last);
    if let Some(end) = upto.filter(|_| reached_end) {
        batch.events.retain(|e| e.cursor() <= end);
        walked = walked.saturating_sub(log::count_between(&mut *conn, end, last).await? as usize);
        last = end;
    }
    for projection in projections {
        projection.apply_batch(&mut *conn, &batch.events).await?;
    }
    Ok(FoldStep::Applied(walked, last, reached_end))
}
