//! Recording usage and reading current usage.
//!
//! Rooms: [`directory`] (the caller's key and subscriptions, remembered),
//! `append` (one batch into the log), `group_append` (appends that arrive
//! together share a statement), [`current`] (the open period, priced).
//!
//! A batch is validated against the subscription directory (the `catalog`
//! projection) and appended in one transaction as one multi-row insert into
//! the event log. Each event's stream id is its (subscription, metric,
//! transaction id), so the log's primary key decides duplicates: a second
//! append of the same key inserts nothing, however many requests race. A
//! duplicate whose content matches the original is a safe retry (answered
//! with the original); one whose content differs refuses the whole batch.

use std::collections::{BTreeMap, HashSet};

use aggregates::usage::{SentUsage, UsageLimits, UsageRecord};
use aggregates::FieldErrors;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::app::metrics::{self, UsageResult};
use crate::event_log::store::{Actor, CommandMetadata};
use directory::{authorized_directory, DirectoryCache};
use group_append::GroupAppender;

mod append;
pub mod current;
pub mod directory;
mod group_append;

/// Append statements in flight at once unless configured: one per CPU
/// core of this host. Fewer statements carry more appends each (appends
/// that arrive while all are busy share the next ones).
pub fn default_appenders() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

/// A process's usage ingest path: what it remembers of the directory, and
/// its appenders.
pub struct Ingest {
    pool: PgPool,
    directory: DirectoryCache,
    appender: GroupAppender,
}

impl Ingest {
    /// Start the ingest path with `appenders` append statements at most in
    /// flight at once (see [`default_appenders`]).
    pub fn start(pool: PgPool, appenders: usize) -> Self {
        Self {
            appender: GroupAppender::start(pool.clone(), appenders),
            directory: DirectoryCache::default(),
            pool,
        }
    }
}

/// Why a batch was not recorded: refusals (the caller's to fix) apart from
/// failures.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The API key is unknown or revoked, or its service deactivated.
    #[error("unknown or revoked API key")]
    Unauthorized,
    /// Field errors by the event's index in the request.
    #[error("invalid events: {0:?}")]
    Invalid(BTreeMap<usize, FieldErrors>),
    /// The catalog changed under every attempt to append the batch.
    #[error("the catalog changed under every attempt to record the batch")]
    CatalogKeptChanging,
    /// A stored catalog or log value could not be read.
    #[error("unreadable usage data: {0}")]
    Unreadable(String),
    /// Storage failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A recorded event with the time the log recorded it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Appended now (`false`: a safe retry of an event already recorded).
    pub new: bool,
    /// The event (the original one for a safe retry).
    pub record: UsageRecord,
    /// When the log recorded it.
    pub recorded_at: DateTime<Utc>,
}

/// How many times a batch reads the directory afresh when the catalog
/// changed between its read and its append (after the remembered one).
const STALE_DIRECTORY_ATTEMPTS: usize = 3;

impl Ingest {
    /// Validate and append a batch, all or nothing. Returns each event as
    /// recorded (the original one for a safe retry), in request order.
    pub async fn record_batch(
        &self,
        key_digest: &str,
        batch: Vec<SentUsage>,
        request: CommandMetadata,
        limits: UsageLimits,
        now: DateTime<Utc>,
    ) -> Result<Vec<Recorded>, IngestError> {
        let external_ids: Vec<String> = batch
            .iter()
            .filter_map(|event| {
                event
                    .external_subscription_id
                    .as_ref()
                    .map(|id| id.trim().to_string())
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // The remembered directory first (when it has everything), then fresh
        // reads while the catalog changes under the append.
        let cache = &self.directory;
        let mut remembered = cache.lookup(key_digest, &external_ids);
        for _ in 0..=STALE_DIRECTORY_ATTEMPTS {
            let from_memory = remembered.is_some();
            let directory = match remembered.take() {
                Some(directory) => directory,
                None => {
                    let Some(directory) =
                        authorized_directory(&self.pool, key_digest, &external_ids).await?
                    else {
                        cache.forget(key_digest);
                        return Err(IngestError::Unauthorized);
                    };
                    cache.remember(key_digest, &directory);
                    directory
                }
            };
            let metadata = CommandMetadata {
                actor: Actor::Service(directory.caller.service.clone()),
                api_key_id: Some(directory.caller.key_id.clone()),
                ..request.clone()
            };
            let attempt =
                append::append_batch(self, &directory, batch.clone(), metadata, limits, now);
            let service = directory.caller.service.as_str();
            tracing::Span::current().record("service", service);
            match attempt.await {
                Ok(Some(recorded)) => {
                    let new = recorded.iter().filter(|r| r.new).count();
                    metrics::usage_events(service, UsageResult::Recorded, new);
                    metrics::usage_events(service, UsageResult::Retry, recorded.len() - new);
                    return Ok(recorded);
                }
                // The catalog changed since the directory was read: read it afresh.
                Ok(None) => {}
                // A refusal found with remembered entries is confirmed afresh.
                Err(IngestError::Invalid(_)) if from_memory => {}
                Err(IngestError::Invalid(errors)) => {
                    let conflicts = errors.values().filter(|e| append::is_conflict(e)).count();
                    metrics::usage_events(service, UsageResult::Conflict, conflicts);
                    metrics::usage_events(service, UsageResult::Refused, batch.len() - conflicts);
                    return Err(IngestError::Invalid(errors));
                }
                Err(error) => return Err(error),
            }
        }
        Err(IngestError::CatalogKeptChanging)
    }

    /// Append a batch of imported usage for `service` (a backfill: no
    /// acceptance window), all or nothing, recorded with `metadata` (the
    /// import run's). The directory is read afresh for every attempt.
    pub async fn record_import(
        &self,
        service: &str,
        batch: Vec<SentUsage>,
        metadata: CommandMetadata,
        now: DateTime<Utc>,
    ) -> Result<Vec<Recorded>, IngestError> {
        let external_ids: Vec<String> = batch
            .iter()
            .filter_map(|event| event.external_subscription_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for _ in 0..=STALE_DIRECTORY_ATTEMPTS {
            let directory =
                directory::service_directory(&self.pool, service, &external_ids).await?;
            let attempt = append::append_batch(
                self,
                &directory,
                batch.clone(),
                metadata.clone(),
                UsageLimits::backfill(),
                now,
            );
            if let Some(recorded) = attempt.await? {
                return Ok(recorded);
            }
        }
        Err(IngestError::CatalogKeptChanging)
    }
}
