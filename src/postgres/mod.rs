//! Which PostgreSQL the ledger uses, and its schema.
//!
//! With `DATABASE_URL` the ledger connects to that server and starts nothing.
//! Without it, it runs on the embedded default cluster in its data directory.

pub mod embedded;

use std::path::Path;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::postgres::embedded::{ClusterSettings, EmbeddedError, EmbeddedPostgres};

/// The schema: the event log and every projection table.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Why the ledger has no database. Messages are meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The embedded cluster could not be used.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// `DATABASE_URL` does not parse.
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    /// The server cannot be reached.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Where the database comes from.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// An existing server (`DATABASE_URL`); `None` means the embedded default.
    pub url: Option<String>,
    /// The ledger's data directory (holds the embedded cluster).
    pub data_dir: std::path::PathBuf,
    /// Size of the connection pool.
    pub max_connections: u32,
}

/// How a command treats an embedded cluster that another ledger runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterAccess {
    /// Own the data directory; refuse it if another ledger holds it (`serve`).
    Own,
    /// Use the cluster a running ledger owns, if any (admin CLI commands).
    ShareIfRunning,
}

/// The open database: a pool, and the embedded cluster if the ledger runs one.
pub struct Database {
    /// The pool every part of the ledger shares.
    pub pool: PgPool,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connect (starting the embedded cluster when there is no URL) and
    /// apply the migrations.
    pub async fn open(
        config: &DatabaseConfig,
        access: ClusterAccess,
    ) -> Result<Self, DatabaseError> {
        let (options, embedded) = match &config.url {
            Some(url) => {
                let options: PgConnectOptions = url
                    .parse()
                    .map_err(|e: sqlx::Error| DatabaseError::InvalidUrl(e.to_string()))?;
                (options, None)
            }
            None => {
                match EmbeddedPostgres::open(&config.data_dir, ClusterSettings::default()).await {
                    Ok(mut cluster) => {
                        cluster.start().await?;
                        tracing::info!(data_dir = %cluster.data_dir().display(), "embedded PostgreSQL is running");
                        (cluster.connect_options(), Some(cluster))
                    }
                    Err(error @ EmbeddedError::DirectoryInUse { .. }) => {
                        match (access, embedded::running_cluster_options(&config.data_dir)) {
                            (ClusterAccess::ShareIfRunning, Some(options)) => (options, None),
                            _ => return Err(error.into()),
                        }
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        let pool = pool_options(config.max_connections)
            .connect_with(options)
            .await
            .map_err(DatabaseError::Connect)?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool, embedded })
    }

    /// The data directory of the embedded cluster this ledger runs, if any.
    pub fn embedded_data_dir(&self) -> Option<&Path> {
        self.embedded.as_ref().map(|cluster| cluster.data_dir())
    }

    /// Close the pool, then stop the embedded cluster if this ledger runs it.
    pub async fn close(mut self) {
        self.pool.close().await;
        if let Some(cluster) = self.embedded.as_mut() {
            if let Err(error) = cluster.stop().await {
                tracing::error!(%error, "could not stop the embedded PostgreSQL server");
            }
        }
    }
}

/// How long a request waits for a pooled connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `error` means the database cannot be reached right now (down,
/// restarting, refusing connections, or a connection lost): a client may
/// retry, and is told so with a 503.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            // 08: connection exceptions; 57P01-03: shutdown, crash, cannot
            // connect now; 53300: too many connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether any cause in `error`'s chain is the database being unavailable
/// (an I/O error counts: every I/O of a request handler is the database's).
pub fn caused_by_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(is_unavailable)
            || cause.downcast_ref::<std::io::Error>().is_some()
    })
}

/// The pool settings the ledger uses everywhere. A short acquire timeout
/// keeps `/ready` and requests answering while the database is down.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        // During an outage a request fails fast (503, `Retry-After`) rather
        // than waiting for a connection that will not come.
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // No ping before every query (a round trip each): a connection that
        // died fails its next query, which the caller sees as an error, and
        // the pool drops it.
        .test_before_acquire(false)
}

/// Whether every migration this binary knows has been applied.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR
        .iter()
        .all(|migration| applied.contains(&migration.version)))
}
