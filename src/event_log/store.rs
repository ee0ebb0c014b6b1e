//! Wiring of the write model: cqrs-es aggregates committed to the event log
//! through postgres-es, with every command's metadata recorded beside its
//! events (who, in which request, when).

use std::collections::HashMap;
use std::fmt;

use aggregates::{BillableMetric, Customer, Plan, Service, Subscription, Tax};
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework};
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;

/// The command side of one aggregate type.
pub type CommandHandler<A> = CqrsFramework<A, PersistedEventStore<PostgresEventRepository, A>>;

/// Who asked for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An operator, through the admin API or the CLI.
    Operator,
    /// A service, through its API key.
    Service(String),
    /// The period closer inside `ledger serve`.
    Closer,
    /// The log sealer (`ledger serve`, `ledger seal`).
    Sealer,
    /// A payment provider's signed webhook (`stripe`).
    PaymentProvider(&'static str),
    /// The webhook dispatcher (an endpoint answered `410 Gone`).
    Dispatcher,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Operator => f.write_str("operator"),
            Actor::Service(code) => write!(f, "service:{code}"),
            Actor::Closer => f.write_str("period-closer"),
            Actor::Sealer => f.write_str("log-sealer"),
            Actor::PaymentProvider(name) => write!(f, "provider:{name}"),
            Actor::Dispatcher => f.write_str("webhook-dispatcher"),
        }
    }
}

/// What every command carries into the metadata of the events it records.
#[derive(Debug, Clone)]
pub struct CommandMetadata {
    /// Who recorded the event.
    pub actor: Actor,
    /// The request (or CLI run) it was recorded in.
    pub request_id: String,
    /// When the writer recorded it (the log also keeps its own time).
    pub recorded_at: DateTime<Utc>,
    /// The client's address, for HTTP requests.
    pub client_ip: Option<String>,
    /// The API key the request was authenticated with (services only).
    pub api_key_id: Option<String>,
}

impl CommandMetadata {
    /// Metadata for an event a background task of the ledger records.
    pub fn internal(actor: Actor) -> Self {
        Self {
            actor,
            request_id: format!("task-{}", uuid::Uuid::new_v4()),
            recorded_at: Utc::now(),
            client_ip: None,
            api_key_id: None,
        }
    }

    /// Metadata for a command an operator runs from the CLI.
    pub fn cli() -> Self {
        Self {
            actor: Actor::Operator,
            request_id: format!("cli-{}", uuid::Uuid::new_v4()),
            recorded_at: Utc::now(),
            client_ip: None,
            api_key_id: None,
        }
    }

    /// The metadata as recorded beside events.
    pub fn into_map(self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            ("actor".to_string(), self.actor.to_string()),
            ("request_id".to_string(), self.request_id),
            (
                "recorded_at".to_string(),
                self.recorded_at
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ]);
        if let Some(ip) = self.client_ip {
            map.insert("client_ip".to_string(), ip);
        }
        if let Some(key_id) = self.api_key_id {
            map.insert("api_key_id".to_string(), key_id);
        }
        map
    }
}

/// The command handlers of every aggregate, sharing one pool.
pub struct CommandBus {
    /// Services and their API keys.
    pub services: CommandHandler<Service>,
    /// Billable metrics.
    pub billable_metrics: CommandHandler<BillableMetric>,
    /// Taxes.
    pub taxes: CommandHandler<Tax>,
    /// Plans.
    pub plans: CommandHandler<Plan>,
    /// Customers.
    pub customers: CommandHandler<Customer>,
    /// Subscriptions.
    pub subscriptions: CommandHandler<Subscription>,
    /// Webhook endpoints.
    pub webhook_endpoints: CommandHandler<aggregates::WebhookEndpoint>,
}

impl CommandBus {
    /// A handler per aggregate, all committing to the log in `pool`.
    pub fn new(pool: &PgPool) -> Self {
        Self {
            services: command_handler(pool),
            billable_metrics: command_handler(pool),
            taxes: command_handler(pool),
            plans: command_handler(pool),
            customers: command_handler(pool),
            subscriptions: command_handler(pool),
            webhook_endpoints: command_handler(pool),
        }
    }
}

/// The current state of an aggregate, read from its own events (always
/// consistent, unlike a projection).
pub async fn load<A: Aggregate>(
    pool: &PgPool,
    aggregate_id: &str,
) -> Result<A, AggregateError<A::Error>> {
    let store: PersistedEventStore<PostgresEventRepository, A> =
        PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()));
    Ok(cqrs_es::EventStore::load_aggregate(&store, aggregate_id)
        .await?
        .aggregate)
}

/// Where the last event of an aggregate sits in the log, if it has any.
pub async fn last_event_cursor(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<projections::LogPosition>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(projections::LogPosition::from))
}

/// The cursor of the last event committed to the log so far (in log order).
pub async fn log_head_cursor(
    pool: &PgPool,
) -> Result<Option<projections::LogPosition>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events \
         ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(projections::LogPosition::from))
}

/// A handler committing `A`'s events to the log in `pool`.
pub fn command_handler<A>(pool: &PgPool) -> CommandHandler<A>
where
    A: Aggregate<Services = ()>,
{
    let repository = PostgresEventRepository::new(pool.clone());
    CqrsFramework::new(PersistedEventStore::new_event_store(repository), vec![], ())
}

/// How many times a command is retried after losing an optimistic-
/// concurrency race before the conflict is reported (409).
const CONFLICT_RETRIES: usize = 3;

/// Run a command, retrying when another writer committed to the same
/// aggregate first: the retry re-reads the aggregate, so it decides on the
/// state that won (e.g. a second registration of one code becomes a
/// refusal, not a duplicate).
pub async fn execute<A>(
    handler: &CommandHandler<A>,
    aggregate_id: &str,
    command: A::Command,
    metadata: CommandMetadata,
) -> Result<(), AggregateError<A::Error>>
where
    A: Aggregate,
    A::Command: Clone,
{
    let mut attempt = 0;
    loop {
        let result = handler
            .execute_with_metadata(aggregate_id, command.clone(), metadata.clone().into_map())
            .await;
        match result {
            Err(AggregateError::AggregateConflict) if attempt < CONFLICT_RETRIES => attempt += 1,
            other => return other,
        }
    }
}
