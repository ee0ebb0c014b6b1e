//! Group append: usage appends that arrive together share one statement and
//! one commit.
//!
//! Every request's append is validated on its own, then handed to a small
//! set of appenders. An idle appender takes the next append at once (a lone
//! request waits for nobody); a busy one's queue gathers whatever arrives
//! while its statement and commit are under way, and the next statement
//! carries all of it. Appends share a statement when they were validated
//! against the same directory (service and version, see migration
//! `usage_directory_versions`), so one guard covers them all: if that
//! directory changed, none is appended and each request reads it afresh.
//! An append is all or nothing, as the statement is; its request is
//! answered only after the commit.
//!
//! Two appends of the same key never share a statement (one waits for the
//! next), so a duplicate is always decided by the log's primary key against
//! a committed row. If a shared statement fails (a conflicting retry raises
//! `LU409` and aborts it whole), each of its appends runs again alone, so
//! the error reaches only the request that caused it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use aggregates::usage::USAGE_STREAM_TYPE;

/// The most events one shared statement carries.
const MAX_GROUP_EVENTS: usize = 1_000;
/// Appends waiting for an appender before senders wait too.
const QUEUE_CAPACITY: usize = 10_000;

/// One request's validated events, ready for the log.
pub struct Append {
    /// The service whose directory validated the events.
    pub service: String,
    /// The directory version they were validated against.
    pub directory_version: i64,
    /// The request's metadata (JSON), the same for each of its events.
    pub metadata: String,
    pub events: Vec<AppendEvent>,
}

/// A usage event's log row: its stream id, payload and usage columns.
pub struct AppendEvent {
    pub stream_id: String,
    pub payload: String,
    pub subscription: Uuid,
    pub metric: String,
    pub timestamp: DateTime<Utc>,
    pub value: Option<Decimal>,
    pub unique_key: Option<String>,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

/// What became of an append.
#[derive(Debug)]
pub enum Appended {
    /// The service's directory changed since it was read: nothing appended.
    DirectoryChanged,
    /// The events appended now, by stream id, with their recorded time. A
    /// stream id missing here was already in the log with the same content.
    Recorded(HashMap<String, DateTime<Utc>>),
}

struct Job {
    append: Append,
    reply: oneshot::Sender<Result<Appended, sqlx::Error>>,
}

/// The appenders of one process.
pub struct GroupAppender {
    queue: mpsc::Sender<Job>,
}

impl GroupAppender {
    /// Start `statements` appenders on `pool` (at most that many append
    /// statements run at once; at least one). They stop when the appender
    /// is dropped.
    pub fn start(pool: PgPool, statements: usize) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..statements.max(1) {
            tokio::spawn(appender(pool.clone(), receiver.clone()));
        }
        Self { queue }
    }

    /// Append `append` (with whatever else is waiting) and wait for the
    /// commit.
    pub async fn append(&self, append: Append) -> Result<Appended, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        let stopped = || sqlx::Error::Protocol("the usage appenders have stopped".into());
        self.queue
            .send(Job { append, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// One appender: takes the next append and everything queued behind it,
/// then appends them in as few statements as their keys allow.
async fn appender(pool: PgPool, queue: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let jobs = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut events = first.append.events.len();
            let mut jobs = vec![first];
            while events < MAX_GROUP_EVENTS {
                let Ok(job) = queue.try_recv() else { break };
                events += job.append.events.len();
                jobs.push(job);
            }
            jobs
        };
        for group in disjoint_groups(jobs) {
            run(&pool, group).await;
        }
    }
}

/// Split jobs, in order, into groups that can share a statement: validated
/// against the same directory (service and version, so one guard covers
/// them), with stream ids that do not overlap.
fn disjoint_groups(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<(HashSet<String>, Vec<Job>)> = vec![];
    for job in jobs {
        let ids = || job.append.events.iter().map(|e| &e.stream_id);
        let fits = |(taken, jobs): &(HashSet<String>, Vec<Job>)| {
            let directory = &jobs[0].append;
            directory.service == job.append.service
                && directory.directory_version == job.append.directory_version
                && ids().all(|id| !taken.contains(id))
        };
        let index = groups.iter().position(fits).unwrap_or_else(|| {
            groups.push((HashSet::new(), vec![]));
            groups.len() - 1
        });
        groups[index].0.extend(ids().cloned());
        groups[index].1.push(job);
    }
    groups.into_iter().map(|(_, jobs)| jobs).collect()
}

/// Append a group in one statement and answer each job; if the statement
/// fails, each job runs alone so only its own error reaches it.
async fn run(pool: &PgPool, group: Vec<Job>) {
    let appends: Vec<&Append> = group.iter().map(|job| &job.append).collect();
    match append_all(pool, &appends).await {
        Ok(outcomes) => {
            for (job, outcome) in group.into_iter().zip(outcomes) {
                let _ = job.reply.send(Ok(outcome));
            }
        }
        Err(error) if group.len() == 1 => {
            let job = group.into_iter().next().expect("one job");
            let _ = job.reply.send(Err(error));
        }
        Err(_) => {
            for job in group {
                let outcome = append_all(pool, &[&job.append])
                    .await
                    .map(|mut outcomes| outcomes.remove(0));
                let _ = job.reply.send(outcome);
            }
        }
    }
}

/// One statement for appends validated against the same directory: it
/// appends only if the service's directory version is still the one they
/// were validated at, and quietly (no NOTIFY: see migration
/// `quiet_usage_appends`). A duplicate key with the same content inserts
/// nothing; with different content `usage_retry_matches` raises `LU409`.
/// (The guard is one lookup whatever the group's size, which keeps the
/// statement on one cached plan.)
async fn append_all(pool: &PgPool, appends: &[&Append]) -> Result<Vec<Appended>, sqlx::Error> {
    let directory = appends[0];
    // Each event with the index (from 1) of its append's metadata.
    let events = || {
        appends
            .iter()
            .enumerate()
            .flat_map(|(n, append)| append.events.iter().map(move |event| (n as i32 + 1, event)))
    };
    let rows: Vec<(bool, Option<String>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "WITH directory AS ( \
           SELECT set_config('ledger.quiet_append', 'on', true) = 'on' \
              AND coalesce((SELECT v.version FROM usage_directory_versions v WHERE v.service_code = $12), 0) = $13 \
              AS holds), \
         appended AS ( \
           INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
                               usage_subscription, usage_metric, usage_timestamp, usage_value, usage_unique_key, \
                               usage_period_start, usage_period_end) \
           SELECT $1, stream, 1, 'UsageRecorded', '1.0', payload::json, ($4::json[])[append], \
                  subscription, metric, at, value, unique_key, period_start, period_end \
           FROM unnest($2::text[], $3::text[], $14::int[], $5::uuid[], $6::text[], $7::timestamptz[], \
                       $8::numeric[], $9::text[], $10::timestamptz[], $11::timestamptz[]) \
                AS batch(stream, payload, append, subscription, metric, at, value, unique_key, \
                         period_start, period_end) \
           WHERE (SELECT holds FROM directory) \
           ON CONFLICT (aggregate_type, aggregate_id, sequence) DO UPDATE SET sequence = events.sequence \
           WHERE NOT usage_retry_matches(events.payload, EXCLUDED.payload) \
           RETURNING aggregate_id, recorded_at) \
         SELECT directory.holds, appended.aggregate_id, appended.recorded_at \
         FROM directory LEFT JOIN appended ON true",
    )
    .bind(USAGE_STREAM_TYPE)
    .bind(events().map(|(_, e)| e.stream_id.as_str()).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.payload.as_str()).collect::<Vec<_>>())
    .bind(appends.iter().map(|a| a.metadata.as_str()).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.subscription).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.metric.as_str()).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.timestamp).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.value).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.unique_key.as_deref()).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.period_start).collect::<Vec<_>>())
    .bind(events().map(|(_, e)| e.period_end).collect::<Vec<_>>())
    .bind(&directory.service)
    .bind(directory.directory_version)
    .bind(events().map(|(n, _)| n).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;

    if !rows.first().is_some_and(|(holds, _, _)| *holds) {
        return Ok(appends.iter().map(|_| Appended::DirectoryChanged).collect());
    }
    crate::app::metrics::group_append(appends.len(), events().count());
    let recorded_at: HashMap<String, DateTime<Utc>> = rows
        .into_iter()
        .filter_map(|(_, stream_id, at)| Some((stream_id?, at?)))
        .collect();
    Ok(appends
        .iter()
        .map(|append| {
            Appended::Recorded(
                append
                    .events
                    .iter()
                    .filter_map(|e| Some((e.stream_id.clone(), *recorded_at.get(&e.stream_id)?)))
                    .collect(),
            )
        })
        .collect())
}
