//! Delivering the outbox: messages the `webhooks` projection wrote reach
//! `webhook_deliveries` in log order (through a cursor), and workers claim
//! due deliveries with `FOR UPDATE SKIP LOCKED`, lease them, POST them and
//! record every attempt.
//!
//! - 2xx: delivered. Anything else, a timeout (15 s) or a refused address:
//!   a failed attempt, retried on [`SCHEDULE`] (±20% jitter, never before a
//!   `Retry-After`); after the last attempt the delivery is `failed` (dead
//!   letter) until an operator redelivers or recovers it.
//! - `410 Gone`: the endpoint is disabled (an event on its stream) and the
//!   message fails at once.
//! - No redirect is followed and no proxy from the environment is used.
//!
//! Several dispatchers (in several `ledger serve`) share the table: a claim
//! is exclusive while its lease runs, so a message goes out once in normal
//! operation. A crash between sending and recording leaves the lease to
//! expire and the message is sent again with the same `webhook-id`: delivery
//! is at least once, and receivers de-duplicate on that id.
//!
//! The clock is an input: `now` decides what is due and when the next
//! attempt is; the `webhook-timestamp` header is the real time of sending
//! (receivers check it against theirs).

use std::time::{Duration as StdDuration, Instant};

use aggregates::webhook_endpoint::WebhookEndpointCommand;
use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::address::{check_literal, AddressPolicy, GuardedResolver};
use super::signing;
use crate::event_log::store::{self, Actor, CommandHandler, CommandMetadata};

/// The wait after each failed attempt: the first attempt is immediate, then
/// 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h; eight attempts in all.
pub const SCHEDULE: [i64; 7] = [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000];

/// Attempts before a message is a dead letter.
pub const MAX_ATTEMPTS: i32 = SCHEDULE.len() as i32 + 1;

/// How long one attempt may take.
pub const ATTEMPT_TIMEOUT: StdDuration = StdDuration::from_secs(15);

/// How long a claim holds a message (longer than an attempt can take).
const LEASE_SECONDS: i64 = 60;

/// How much of an answer an attempt records.
const EXCERPT_BYTES: usize = 256;

/// The latest a `Retry-After` can push an attempt.
const MAX_RETRY_AFTER_SECONDS: i64 = 36_000;

/// The wait before attempt `attempts_made + 1`, jittered by ±20%
/// (deterministically from the message id, so a retried pass agrees), or
/// none when `attempts_made` was the last.
pub fn retry_delay(message_id: Uuid, attempts_made: i32) -> Option<Duration> {
    let base = *SCHEDULE.get(usize::try_from(attempts_made - 1).ok()?)?;
    let digest = signing_digest(message_id, attempts_made);
    // A factor in [0.8, 1.2].
    let factor = 0.8 + 0.4 * (f64::from(digest % 10_001) / 10_000.0);
    Some(Duration::milliseconds(
        (base as f64 * 1_000.0 * factor).round() as i64,
    ))
}

fn signing_digest(message_id: Uuid, attempts_made: i32) -> u32 {
    let mac = crate::payments::stripe::hmac_sha256(
        message_id.as_bytes(),
        &[&attempts_made.to_be_bytes()],
    );
    u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]])
}

/// `Retry-After` as seconds or an HTTP date, relative to `now`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<i64>() {
        Ok(seconds) => Duration::seconds(seconds),
        Err(_) => {
            DateTime::parse_from_rfc2822(value)
                .ok()?
                .with_timezone(&Utc)
                - now
        }
    };
    Some(wait.clamp(Duration::zero(), Duration::seconds(MAX_RETRY_AFTER_SECONDS)))
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Messages that reached the delivery queue.
    pub enqueued: u64,
    /// Attempts made.
    pub attempted: usize,
    /// Of which delivered.
    pub delivered: usize,
    /// Messages that became dead letters.
    pub dead: usize,
}

/// One claimed delivery, with what sending it needs.
#[derive(Debug, sqlx::FromRow)]
struct Claimed {
    message_id: Uuid,
    attempts: i32,
    round_start: i32,
    endpoint_lago_id: Uuid,
    service_code: String,
    body: Option<String>,
    webhook_url: Option<String>,
    secret: Option<String>,
    previous_secret: Option<String>,
    previous_valid_until: Option<DateTime<Utc>>,
    unavailable: Option<String>,
}

/// How one attempt went.
#[derive(Debug)]
struct Attempt {
    message_id: Uuid,
    endpoint_lago_id: Uuid,
    service_code: String,
    number: i32,
    in_round: i32,
    status_code: Option<u16>,
    latency_ms: i32,
    error: Option<String>,
    excerpt: Option<String>,
    retry_after: Option<Duration>,
}

impl Attempt {
    fn delivered(&self) -> bool {
        self.status_code.is_some_and(|s| (200..300).contains(&s))
    }
    fn gone(&self) -> bool {
        self.status_code == Some(410)
    }
}

/// The delivery worker.
pub struct Dispatcher {
    pool: PgPool,
    client: reqwest::Client,
    policy: AddressPolicy,
    endpoints: CommandHandler<aggregates::WebhookEndpoint>,
    /// Deliveries claimed per pass.
    pub batch: i64,
}

impl Dispatcher {
    /// A dispatcher delivering only where `policy` permits.
    pub fn new(pool: PgPool, policy: AddressPolicy) -> Self {
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(GuardedResolver::new(policy.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(ATTEMPT_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build()
            .expect("an HTTP client");
        Self {
            endpoints: store::command_handler(&pool),
            pool,
            client,
            policy,
            batch: 256,
        }
    }

    /// Move new messages (beyond the cursor, in log order) into the queue.
    pub async fn enqueue(&self, now: DateTime<Utc>) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let cursor: i64 =
            sqlx::query_scalar("SELECT position FROM webhook_dispatch_cursor FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        let reached: Option<i64> =
            sqlx::query_scalar("SELECT max(position) FROM webhook_messages WHERE position > $1")
                .bind(cursor)
                .fetch_one(&mut *tx)
                .await?;
        let Some(reached) = reached else {
            tx.rollback().await?;
            return Ok(0);
        };
        let enqueued = sqlx::query(
            "INSERT INTO webhook_deliveries (message_id, service_code, endpoint_lago_id, \
             next_attempt_at, enqueued_at, updated_at) \
             SELECT id, service_code, endpoint_lago_id, $3, $3, $3 FROM webhook_messages \
             WHERE position > $1 AND position <= $2 ORDER BY position \
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(cursor)
        .bind(reached)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE webhook_dispatch_cursor SET position = $1")
            .bind(reached)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(enqueued)
    }

    async fn claim(&self, now: DateTime<Utc>) -> Result<Vec<Claimed>, sqlx::Error> {
        sqlx::query_as(
            "WITH claimed AS ( \
               UPDATE webhook_deliveries d SET claimed_until = $1 + make_interval(secs => $3) \
               FROM (SELECT message_id FROM webhook_deliveries \
                     WHERE status = 'pending' AND next_attempt_at <= $1 \
                       AND (claimed_until IS NULL OR claimed_until <= $1) \
                     ORDER BY next_attempt_at, message_id LIMIT $2 FOR UPDATE SKIP LOCKED) due \
               WHERE d.message_id = due.message_id \
               RETURNING d.message_id, d.attempts, d.round_start, d.endpoint_lago_id, d.service_code) \
             SELECT c.message_id, c.attempts, c.round_start, c.endpoint_lago_id, c.service_code, m.body, \
                    e.webhook_url, e.secret, e.previous_secret, e.previous_valid_until, \
                    CASE WHEN e.lago_id IS NULL OR e.deleted_at IS NOT NULL THEN 'endpoint deleted' \
                         WHEN e.disabled_at IS NOT NULL THEN 'endpoint disabled: ' || e.disabled_reason \
                    END AS unavailable \
             FROM claimed c LEFT JOIN webhook_messages m ON m.id = c.message_id \
             LEFT JOIN webhook_endpoints e ON e.lago_id = c.endpoint_lago_id",
        )
        .bind(now)
        .bind(self.batch)
        .bind(LEASE_SECONDS as f64)
        .fetch_all(&self.pool)
        .await
    }

    /// Attempt every due delivery (one batch) at `now`.
    pub async fn deliver_due(&self, now: DateTime<Utc>) -> Result<DispatchReport, sqlx::Error> {
        let claimed = self.claim(now).await?;
        let mut report = DispatchReport::default();
        let mut unavailable = Vec::new();
        let mut sends = tokio::task::JoinSet::new();
        for delivery in claimed {
            let (Some(body), Some(url), Some(secret)) =
                (&delivery.body, &delivery.webhook_url, &delivery.secret)
            else {
                // Its message is being rebuilt: release it for a later pass.
                unavailable.push((delivery.message_id, None));
                continue;
            };
            if let Some(reason) = &delivery.unavailable {
                unavailable.push((delivery.message_id, Some(reason.clone())));
                continue;
            }
            let mut secrets = vec![secret.clone()];
            if let (Some(previous), Some(until)) =
                (&delivery.previous_secret, delivery.previous_valid_until)
            {
                if now < until {
                    secrets.push(previous.clone());
                }
            }
            let (client, policy) = (self.client.clone(), self.policy.clone());
            let (body, url) = (body.clone(), url.clone());
            sends.spawn(async move {
                send(&client, &policy, &delivery, &url, &secrets, body, now).await
            });
        }
        let mut attempts = Vec::new();
        while let Some(done) = sends.join_next().await {
            attempts.push(done.expect("a send never panics"));
        }
        self.release_or_fail(&unavailable, now).await?;
        report.attempted = attempts.len();
        report.delivered = attempts.iter().filter(|a| a.delivered()).count();
        report.dead = self.record(&attempts, now).await?
            + unavailable.iter().filter(|(_, r)| r.is_some()).count();
        for gone in attempts.iter().filter(|a| a.gone()) {
            self.disable(gone).await;
        }
        Ok(report)
    }

    /// Messages whose endpoint is gone fail at once; those whose message
    /// row is missing (a rebuild) are released.
    async fn release_or_fail(
        &self,
        unavailable: &[(Uuid, Option<String>)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        if unavailable.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = unavailable.iter().map(|(id, _)| *id).collect();
        let reasons: Vec<Option<String>> = unavailable.iter().map(|(_, r)| r.clone()).collect();
        sqlx::query(
            "UPDATE webhook_deliveries d SET claimed_until = NULL, updated_at = $3, \
             status = CASE WHEN u.reason IS NULL THEN d.status ELSE 'failed' END, \
             last_error = coalesce(u.reason, d.last_error) \
             FROM unnest($1::uuid[], $2::text[]) AS u(id, reason) WHERE d.message_id = u.id",
        )
        .bind(&ids)
        .bind(&reasons)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record the attempts and schedule what follows; returns the number of
    /// new dead letters.
    async fn record(&self, attempts: &[Attempt], now: DateTime<Utc>) -> Result<usize, sqlx::Error> {
        if attempts.is_empty() {
            return Ok(0);
        }
        let mut statuses = Vec::with_capacity(attempts.len());
        let mut next = Vec::with_capacity(attempts.len());
        for attempt in attempts {
            let (status, at) = if attempt.delivered() {
                ("delivered", now)
            } else if attempt.gone() {
                ("failed", now)
            } else {
                match retry_delay(attempt.message_id, attempt.in_round) {
                    None => ("failed", now),
                    Some(delay) => {
                        let wait = attempt.retry_after.map_or(delay, |after| after.max(delay));
                        ("pending", now + wait)
                    }
                }
            };
            statuses.push(status);
            next.push(at);
        }
        let dead = statuses.iter().filter(|s| **s == "failed").count();
        let ids: Vec<Uuid> = attempts.iter().map(|a| a.message_id).collect();
        let errors: Vec<Option<String>> = attempts
            .iter()
            .map(|a| match (&a.error, a.status_code) {
                (Some(error), _) => Some(error.clone()),
                (None, Some(code)) if !a.delivered() => Some(format!("HTTP {code}")),
                _ => None,
            })
            .collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (message_id, attempt, attempted_at, status_code, latency_ms, \
             error, response_excerpt) \
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::int[], $5::int[], \
                                  $6::text[], $7::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(attempts.iter().map(|a| a.number).collect::<Vec<_>>())
        .bind(vec![now; attempts.len()])
        .bind(attempts.iter().map(|a| a.status_code.map(i32::from)).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.latency_ms).collect::<Vec<_>>())
        .bind(&errors)
        .bind(attempts.iter().map(|a| a.excerpt.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_deliveries d SET attempts = u.attempt, status = u.status, \
             next_attempt_at = u.next, claimed_until = NULL, updated_at = $6, last_error = u.error, \
             delivered_at = CASE WHEN u.status = 'delivered' THEN $6 END \
             FROM unnest($1::uuid[], $2::int[], $3::text[], $4::timestamptz[], $5::text[]) \
               AS u(id, attempt, status, next, error) \
             WHERE d.message_id = u.id",
        )
        .bind(&ids)
        .bind(attempts.iter().map(|a| a.number).collect::<Vec<_>>())
        .bind(&statuses)
        .bind(&next)
        .bind(&errors)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(dead)
    }

    /// An endpoint answered `410 Gone`: disable it (its stream records why).
    async fn disable(&self, attempt: &Attempt) {
        let id =
            aggregates::scoped_id(&attempt.service_code, &attempt.endpoint_lago_id.to_string());
        let command = WebhookEndpointCommand::Disable {
            reason: "410 Gone".into(),
            at: Utc::now(),
        };
        let metadata = CommandMetadata::internal(Actor::Dispatcher);
        if let Err(error) = store::execute(&self.endpoints, &id, command, metadata).await {
            tracing::warn!(%error, endpoint = %attempt.endpoint_lago_id, "cannot disable a gone endpoint");
        }
    }

    /// One pass: enqueue what is new, deliver what is due.
    pub async fn dispatch_once(&self, now: DateTime<Utc>) -> Result<DispatchReport, sqlx::Error> {
        let enqueued = self.enqueue(now).await?;
        let report = self.deliver_due(now).await?;
        Ok(DispatchReport { enqueued, ..report })
    }

    /// Run until `shutdown` turns true: passes back to back while there is
    /// work, every `idle` otherwise.
    pub async fn run(
        self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        health: crate::app::supervisor::TaskHealth,
        idle: StdDuration,
    ) {
        loop {
            let busy = match self.dispatch_once(Utc::now()).await {
                Ok(report) => {
                    health.succeeded();
                    report.attempted as i64 >= self.batch
                }
                Err(error) => {
                    health.failed(&format!("webhook dispatch failed: {error:#}"));
                    false
                }
            };
            if busy {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(health.next_wait(idle)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// POST one message.
async fn send(
    client: &reqwest::Client,
    policy: &AddressPolicy,
    delivery: &Claimed,
    url: &str,
    secrets: &[String],
    body: String,
    now: DateTime<Utc>,
) -> Attempt {
    let mut attempt = Attempt {
        message_id: delivery.message_id,
        endpoint_lago_id: delivery.endpoint_lago_id,
        service_code: delivery.service_code.clone(),
        number: delivery.attempts + 1,
        in_round: delivery.attempts + 1 - delivery.round_start,
        status_code: None,
        latency_ms: 0,
        error: None,
        excerpt: None,
        retry_after: None,
    };
    let parsed = match reqwest::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(_) => {
            attempt.error = Some("url_is_invalid".into());
            return attempt;
        }
    };
    if let Err(refused) = check_literal(policy, &parsed) {
        attempt.error = Some(refused.to_string());
        return attempt;
    }
    let id = delivery.message_id.to_string();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let mut request = client.post(parsed);
    for (name, value) in signing::headers(&secrets, &id, Utc::now().timestamp(), body.as_bytes()) {
        request = request.header(name, value);
    }
    let started = Instant::now();
    let result = request.body(body).send().await;
    match result {
        Ok(mut response) => {
            attempt.status_code = Some(response.status().as_u16());
            attempt.retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now));
            let mut excerpt = Vec::new();
            while excerpt.len() < EXCERPT_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            excerpt.truncate(EXCERPT_BYTES);
            attempt.excerpt = Some(String::from_utf8_lossy(&excerpt).replace('\0', ""));
        }
        Err(error) => {
            attempt.error = Some(describe(&error));
        }
    }
    attempt.latency_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
    attempt
}

/// A transport failure in a line, with its innermost cause (a refused
/// address names its range).
fn describe(error: &reqwest::Error) -> String {
    use std::error::Error;
    let mut cause: &dyn Error = error;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    if error.is_timeout() {
        return "timeout".into();
    }
    format!("{error}: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_waits_5s_5min_30min_2h_5h_10h_10h_within_20_percent() {
        let id = Uuid::from_u128(7);
        let expected = [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000];
        for (made, base) in (1..).zip(expected) {
            let delay = retry_delay(id, made).unwrap().num_milliseconds();
            let base = base * 1_000;
            assert!(
                (base * 8 / 10..=base * 12 / 10).contains(&delay),
                "after attempt {made}: {delay} ms vs {base} ms"
            );
            assert_eq!(
                retry_delay(id, made),
                retry_delay(id, made),
                "deterministic"
            );
        }
        assert_eq!(retry_delay(id, 8), None, "the eighth attempt was the last");
        assert_eq!(MAX_ATTEMPTS, 8);
        let spread: std::collections::BTreeSet<i64> = (0..50)
            .map(|n| {
                retry_delay(Uuid::from_u128(n), 1)
                    .unwrap()
                    .num_milliseconds()
            })
            .collect();
        assert!(spread.len() > 40, "jitter spreads messages apart");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now: DateTime<Utc> = "2026-12-03T12:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::seconds(120)));
        assert_eq!(
            parse_retry_after("Thu, 03 Dec 2026 12:10:00 GMT", now),
            Some(Duration::seconds(600))
        );
        assert_eq!(
            parse_retry_after("999999", now),
            Some(Duration::seconds(36_000))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
