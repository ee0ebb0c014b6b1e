//! The `ledger` command line. Every option can also come from the
//! environment variable named in `ledger --help`.
//!
//! Its documentation is `--help`: clap turns doc comments into help text,
//! so the command types carry them only where they are help.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use aggregates::usage::UsageLimits;

use crate::access::services;
use crate::app::telemetry::LogFormat;
use crate::app::{shutdown_signal, Application, BackgroundTasks, Settings};
use crate::event_log::projection_runner::{self, ProjectionRunner};
use crate::event_log::store::{CommandBus, CommandMetadata};
use crate::http::admin::AdminKey;
use crate::payments::stripe::StripeSettings;
use crate::postgres::embedded::{ClusterSettings, EmbeddedPostgres};
use crate::postgres::{ClusterAccess, Database, DatabaseConfig};
use crate::tools::progress::Progress;
use crate::webhooks::address::AddressPolicy;

#[derive(Debug, Parser)]
#[command(
    name = "ledger",
    version,
    about = "An event-sourced billing ledger with a Lago-compatible API",
    long_about = "An event-sourced billing ledger with a Lago-compatible API.\n\n\
        Without DATABASE_URL the ledger runs on an embedded PostgreSQL cluster that it \
        initialises and starts in its data directory (PostgreSQL's server binaries must \
        be installed; Debian: apt-get install postgresql)."
)]
pub struct Cli {
    /// PostgreSQL to use; without it the embedded cluster in --data-dir is used.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// The ledger's data directory (holds the embedded cluster).
    #[arg(
        long,
        env = "LEDGER_DATA_DIR",
        global = true,
        default_value = "ledger-data"
    )]
    pub data_dir: PathBuf,

    /// Connections in the database pool.
    #[arg(long, env = "LEDGER_DB_POOL_SIZE", global = true, default_value_t = 10)]
    pub db_pool_size: u32,

    /// Log format (level from RUST_LOG, default info).
    #[arg(
        long,
        env = "LEDGER_LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API and keep the projections up to date.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The operator key for /admin/v1 (default on the embedded database: generated on first start).
        #[arg(long, env = "LEDGER_ADMIN_KEY", hide_env_values = true)]
        admin_key: Option<String>,
        /// Usage timestamps may be this many seconds in the future (clock skew).
        #[arg(long, env = "LEDGER_USAGE_FUTURE_SKEW_SECONDS", default_value_t = 300)]
        usage_future_skew_seconds: u32,
        /// Usage timestamps may be this many days old (widen it for backfills).
        #[arg(
            long,
            env = "LEDGER_USAGE_ACCEPTANCE_WINDOW_DAYS",
            default_value_t = 35
        )]
        usage_acceptance_window_days: u32,
        /// How often the period closer looks for invoices to draft and finalize.
        #[arg(long, env = "LEDGER_CLOSE_INTERVAL_SECONDS", default_value_t = 60)]
        close_interval_seconds: u64,
        /// Usage append statements in flight at once, each on a connection of
        /// its own beside the pool (usage arriving meanwhile shares the next
        /// ones). Default: one per CPU core, at most 8.
        #[arg(long, env = "LEDGER_USAGE_APPENDERS", default_value_t = crate::usage::default_appenders())]
        usage_appenders: usize,
        /// Stripe webhook endpoint secrets (`whsec_…`), comma-separated during a rotation.
        #[arg(long, env = "LEDGER_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
        stripe_webhook_secret: Option<String>,
        /// How far a Stripe signature's timestamp may be from now, in seconds.
        #[arg(long, env = "LEDGER_STRIPE_TOLERANCE_SECONDS", default_value_t = 300)]
        stripe_tolerance_seconds: i64,
        /// Ranges webhooks may be delivered to beyond the public internet
        /// (CIDRs, comma-separated; e.g. the private network of a receiver).
        #[arg(long, env = "LEDGER_WEBHOOK_ALLOW", value_delimiter = ',', num_args = 1..)]
        webhook_allow: Vec<String>,
        /// Also serve `/metrics` on this address, without a key (a private
        /// address Prometheus reaches; `/metrics` on --listen needs the
        /// operator key).
        #[arg(long, env = "LEDGER_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Outgoing webhook deliveries: list, redeliver, recover.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Register services and manage their API keys.
    Services {
        #[command(subcommand)]
        command: ServicesCommand,
    },
    /// Inspect or rebuild the projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Start the ledger, record a few facts through its API and print what it
    /// knows. The server's log lines go to `<data-dir>/demo.log`.
    Demo {
        /// Print the server's log lines on stderr instead.
        #[arg(long)]
        server_logs: bool,
    },
    /// Recompute a period's invoices from the log alone and compare them
    /// with the finalized ones; exits 1 when anything differs.
    Replay {
        /// YYYY-MM: invoices whose usage window starts in that month.
        #[arg(long)]
        period: String,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this subscription (external id).
        #[arg(long)]
        subscription: Option<String>,
        /// Replay as of this log position or RFC 3339 time (default: each
        /// invoice's own recorded position).
        #[arg(long)]
        as_of: Option<crate::invoicing::replay::AsOf>,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
        /// What-if: bill the period with this price book instead
        /// (`{"plans": [...]}`, the plan API's format; needs --service).
        #[arg(long)]
        pricing: Option<std::path::PathBuf>,
    },
    /// Compare a period's ledger invoices with the source's imported ones,
    /// per subscription, with the causes of every delta; exits 1 unless every
    /// row matches or is accepted (docs/reconciliation.md).
    #[command(args_conflicts_with_subcommands = true)]
    Reconcile {
        #[command(subcommand)]
        command: Option<ReconcileCommand>,
        /// YYYY-MM.
        #[arg(long)]
        period: Option<String>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this subscription (external id).
        #[arg(long)]
        subscription: Option<String>,
        /// table, json or csv.
        #[arg(long, default_value = "table")]
        format: String,
        /// A delta of at most this many cents is a match (shown as such).
        #[arg(long, default_value_t = 0)]
        tolerance_cents: i64,
        /// What-if: compare against invoices recomputed with this price
        /// book (the format `replay --pricing` reads; needs --service).
        #[arg(long)]
        pricing: Option<std::path::PathBuf>,
    },
    /// Make shadow subscriptions live from their next period boundary, once
    /// their latest reconciled periods match; exits 1 listing what blocks.
    Flip {
        /// The service.
        #[arg(long)]
        service: String,
        /// Only these subscriptions (external ids; repeat or separate with commas).
        #[arg(long, value_delimiter = ',')]
        subscription: Vec<String>,
        /// Consecutive reconciled periods (the latest) that must all match.
        #[arg(long, default_value_t = 1)]
        cycles: usize,
        /// The reconciliation's tolerance, in cents.
        #[arg(long, default_value_t = 0)]
        tolerance_cents: i64,
        /// Say what would happen; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Return flipped subscriptions to shadow (before their first live invoice).
        #[arg(long)]
        undo: bool,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Seal the log now: a `LogSealed` event hashing every event since the last seal.
    Seal,
    /// Explain a finalized invoice: every fee's events and arithmetic.
    Explain {
        #[command(subcommand)]
        command: ExplainCommand,
    },
    /// Prove that no recorded event was altered, removed, inserted or
    /// reordered: stream hash chains and seals. Exits 1 at the first break.
    Verify {
        /// Verify from this log position on.
        #[arg(long, default_value_t = 0)]
        from: i64,
    },
    /// Import customers, plans, subscriptions, usage and invoices from a
    /// system the ledger takes over (docs/imports.md). Exits 0 when every
    /// row was imported or unchanged, 2 when some rows failed, 1 when
    /// nothing could be done.
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Measure throughput against PostgreSQL's own limit, in one run.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Start a throwaway embedded cluster in --data-dir, run COMMAND with
    /// DATABASE_URL pointing at it, then stop it (used by the test suite).
    WithPostgres {
        /// Turn off fsync: for throwaway clusters only.
        #[arg(long)]
        durability_off: bool,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Usage events/s over HTTP (single and 100-event batches) beside raw
    /// PostgreSQL inserts, on a throwaway cluster in --data-dir.
    Ingest {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client concurrencies to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        concurrency: Vec<usize>,
    },
    /// Time the period closer finalizing one invoice per subscription,
    /// beside a raw read of the same usage rows, on a throwaway cluster.
    Close {
        /// Subscriptions to invoice.
        #[arg(long, default_value_t = 10_000)]
        subscriptions: usize,
        /// Usage events per subscription.
        #[arg(long, default_value_t = 100)]
        events: usize,
    },
    /// Import a generated NexaCloud database from scratch and again, beside
    /// a raw multi-row insert of the same rows, on a throwaway cluster.
    Import {
        /// Subscriptions in the full source (the small one has a tenth).
        #[arg(long, default_value_t = 10_000)]
        subscriptions: usize,
        /// Usage records in the full source (the small one has a tenth).
        #[arg(long, default_value_t = 1_000_000)]
        usage_records: usize,
    },
    /// Reconcile one period of many subscriptions with imported actuals and
    /// rebuild the reconciliation, beside a raw read, on a throwaway cluster.
    Reconcile {
        /// Subscriptions (each with three periods).
        #[arg(long, default_value_t = 10_000)]
        subscriptions: usize,
        /// Usage events per subscription and period.
        #[arg(long, default_value_t = 30)]
        events: usize,
    },
    /// Deliver many finalized invoices' webhooks to a local receiver
    /// (messages/s beside raw POSTs), then latency at a steady rate.
    Webhooks {
        /// Finalized invoices whose messages are delivered.
        #[arg(long, default_value_t = 10_000)]
        invoices: usize,
        /// Payments recorded per second in the steady-state phase.
        #[arg(long, default_value_t = 200)]
        rate: usize,
        /// Seconds of steady state.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Time rebuilding the usage and invoices projections, sealing and
    /// verifying, beside a raw read of the log, on a throwaway cluster.
    Rebuild {
        /// Subscriptions.
        #[arg(long, default_value_t = 1_000)]
        subscriptions: usize,
        /// Usage events per subscription.
        #[arg(long, default_value_t = 1_000)]
        events: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Import a file of the neutral import format (JSON Lines).
    File {
        /// The file.
        path: PathBuf,
        #[command(flatten)]
        run: ImportRunArgs,
    },
    /// Import NexaCloud's database (read only, one snapshot).
    #[command(args_conflicts_with_subcommands = true)]
    Nexacloud {
        #[command(subcommand)]
        command: Option<NexacloudCommand>,
        /// NexaCloud's PostgreSQL (a read-only role is enough).
        #[arg(long, env = "NEXACLOUD_SOURCE_URL", hide_env_values = true)]
        source_url: Option<String>,
        /// Write the records as JSON Lines to this file instead of importing.
        #[arg(long)]
        export: Option<PathBuf>,
        #[command(flatten)]
        run: ImportRunArgs,
        #[command(flatten)]
        mapping: NexacloudMapping,
    },
}

#[derive(Debug, Subcommand)]
pub enum NexacloudCommand {
    /// Connect, count each table's rows in a READ ONLY transaction, warn
    /// when the role could write, and name what differs from the schema.
    TestConnection {
        /// NexaCloud's PostgreSQL.
        #[arg(long, env = "NEXACLOUD_SOURCE_URL", hide_env_values = true)]
        source_url: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct ImportRunArgs {
    /// The service to import into.
    #[arg(long)]
    service: Option<String>,
    /// Read and validate everything, print the report, append nothing.
    #[arg(long)]
    dry_run: bool,
    /// Apply records that changed in the source since they were imported.
    #[arg(long)]
    apply_changes: bool,
    /// Also write the report, with every failure, as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct NexacloudMapping {
    /// Every imported customer's time zone.
    #[arg(long, default_value = "UTC")]
    timezone: chrono_tz::Tz,
    /// Every imported customer's tax codes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tax_codes: Vec<String>,
    /// The price of --cpu-unit-size CPU-seconds beyond a plan's quota.
    #[arg(long, default_value = "0.0075")]
    cpu_price: rust_decimal::Decimal,
    /// The CPU-seconds one --cpu-price buys.
    #[arg(long, default_value = "3600")]
    cpu_unit_size: rust_decimal::Decimal,
    /// Also import subscriptions cancelled after this date (YYYY-MM-DD, UTC).
    #[arg(long)]
    since: Option<chrono::NaiveDate>,
}

#[derive(Debug, Subcommand)]
pub enum ExplainCommand {
    /// An invoice, by its lago_id (JSON on stdout).
    Invoice {
        /// The invoice's lago_id.
        lago_id: uuid::Uuid,
    },
    /// A reconciliation row: both sides line by line, side by side, with
    /// the ledger's arithmetic beside the source's lines.
    Reconciliation {
        /// The subscription (external id).
        subscription: String,
        /// YYYY-MM.
        period: String,
        /// The service (needed when the id exists in several).
        #[arg(long)]
        service: Option<String>,
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReconcileCommand {
    /// Accept a row's delta with a reason: it no longer blocks a flip and
    /// stays visible as accepted (an event; a different delta later is not
    /// accepted).
    Accept {
        /// The subscription (external id).
        subscription: String,
        /// YYYY-MM.
        period: String,
        /// Why the delta is acceptable.
        #[arg(long)]
        reason: String,
        /// The service (needed when the id exists in several).
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServicesCommand {
    /// Register a service and issue its first API key (printed once).
    Create {
        /// The service's code, e.g. `nexacloud`.
        code: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// List the services and their keys (never the keys themselves).
    List,
    /// Issue another API key for a service (printed once).
    IssueKey {
        /// The service's code.
        code: String,
        /// What the key is for.
        #[arg(long)]
        label: Option<String>,
    },
    /// Revoke an API key: requests with it get 401 from then on.
    RevokeKey {
        /// The service's code.
        code: String,
        /// The key's id (see `ledger services list`).
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Deliveries, newest first (one JSON object per line).
    List {
        /// `pending`, `delivered` or `failed`.
        #[arg(long)]
        status: Option<String>,
        /// One endpoint's (its lago_id).
        #[arg(long)]
        endpoint: Option<uuid::Uuid>,
        /// One service's.
        #[arg(long)]
        service: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One delivery with its body and attempts.
    Show {
        /// The message id (its `webhook-id`).
        message_id: uuid::Uuid,
    },
    /// Queue one message again now (same id, same body, a fresh retry schedule).
    Redeliver {
        /// The message id (its `webhook-id`).
        message_id: uuid::Uuid,
    },
    /// Queue again every failed message of an endpoint created since a time.
    Recover {
        /// The endpoint (its lago_id).
        #[arg(long)]
        endpoint: uuid::Uuid,
        /// RFC 3339.
        #[arg(long)]
        since: chrono::DateTime<chrono::Utc>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Each projection's checkpoint and lag.
    Status,
    /// Empty a projection and replay the whole log into it.
    Rebuild {
        /// The projection's name (see `ledger projections status`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every projection.
        #[arg(long)]
        all: bool,
        /// Rebuild into this schema beside the live tables (left untouched).
        #[arg(long)]
        into: Option<String>,
    },
}

/// Where `ledger demo` writes the server's log lines (in its data directory).
pub const DEMO_LOG: &str = "demo.log";

impl Cli {
    /// The file log lines go to instead of stderr: `ledger demo`'s, unless
    /// asked for on stderr.
    pub fn log_file(&self) -> Option<PathBuf> {
        match self.command {
            Command::Demo { server_logs: false } => Some(self.data_dir.join(DEMO_LOG)),
            _ => None,
        }
    }

    fn database_config(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.database_url.clone(),
            data_dir: self.data_dir.clone(),
            max_connections: self.db_pool_size,
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.database_config();
    match cli.command {
        Command::Serve {
            listen,
            admin_key,
            usage_future_skew_seconds,
            usage_acceptance_window_days,
            close_interval_seconds,
            usage_appenders,
            stripe_webhook_secret,
            stripe_tolerance_seconds,
            webhook_allow,
            metrics_listen,
        } => {
            let providers = crate::http::Providers {
                stripe: StripeSettings::from_list(
                    stripe_webhook_secret.as_deref(),
                    stripe_tolerance_seconds,
                ),
                webhook_addresses: AddressPolicy::parse(&webhook_allow)
                    .map_err(|e| anyhow::anyhow!("--webhook-allow: {e}"))?,
            };
            let limits = UsageLimits {
                future_skew: chrono::Duration::seconds(usage_future_skew_seconds.into()),
                acceptance_window: chrono::Duration::days(usage_acceptance_window_days.into()),
            };
            let settings = ServeSettings {
                listen,
                admin_key,
                usage_limits: limits,
                usage_appenders,
                close_interval: std::time::Duration::from_secs(close_interval_seconds.max(1)),
                providers,
                metrics_listen,
            };
            serve(&config, settings).await?;
        }
        Command::Webhooks { command } => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let done = webhooks(&database, command).await;
            database.close().await;
            return done;
        }
        Command::Migrate => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            println!("migrations applied");
            database.close().await;
        }
        Command::Services { command } => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let result = services(&database, command).await;
            database.close().await;
            result?;
        }
        Command::Projections { command } => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let result = projections(&database, command).await;
            database.close().await;
            result?;
        }
        Command::Demo { server_logs } => {
            let log_file = (!server_logs).then(|| config.data_dir.join(DEMO_LOG));
            crate::tools::demo::run(&config, log_file.as_deref()).await?
        }
        Command::Explain {
            command: ExplainCommand::Invoice { lago_id },
        } => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let explained =
                crate::invoicing::explain::explain_invoice(&database.pool, lago_id).await;
            database.close().await;
            println!("{}", serde_json::to_string_pretty(&explained?)?);
        }
        Command::Explain {
            command:
                ExplainCommand::Reconciliation {
                    subscription,
                    period,
                    service,
                    format,
                },
        } => {
            if format != "text" && format != "json" {
                bail!("--format is text or json");
            }
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let explained = caught_up(&database).await;
            let explained = match explained {
                Ok(()) => {
                    crate::reconciliation::explain(
                        &database.pool,
                        service.as_deref(),
                        &subscription,
                        &period,
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            database.close().await;
            let explained = explained?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&explained)?);
            } else {
                print!("{}", crate::reconciliation::explain_text(&explained));
            }
        }
        Command::Reconcile {
            command:
                Some(ReconcileCommand::Accept {
                    subscription,
                    period,
                    reason,
                    service,
                }),
            ..
        } => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let accepted = match caught_up(&database).await {
                Ok(()) => {
                    crate::reconciliation::accept(
                        &database.pool,
                        service.as_deref(),
                        &subscription,
                        &period,
                        &reason,
                        CommandMetadata::cli(),
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            database.close().await;
            let row = accepted?;
            println!(
                "accepted {}/{} {}: {} of {} ({})",
                row.service,
                row.external_subscription_id,
                row.period,
                row.recorded_status.as_str(),
                aggregates::reconciliation::format_cents(row.delta_cents),
                reason.trim()
            );
        }
        Command::Reconcile {
            command: None,
            period,
            service,
            subscription,
            format,
            tolerance_cents,
            pricing,
        } => {
            if !["table", "json", "csv"].contains(&format.as_str()) {
                bail!("--format is table, json or csv");
            }
            let Some(period) = period else {
                bail!("--period YYYY-MM is mandatory");
            };
            let pricing = pricing.map(|path| read_price_book(&path)).transpose()?;
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let request = crate::reconciliation::ReconcileRequest {
                period,
                service,
                subscription,
                tolerance_cents,
                pricing,
            };
            let report = match caught_up(&database).await {
                Ok(()) => crate::reconciliation::reconcile(&database.pool, &request).await,
                Err(e) => Err(e.into()),
            };
            database.close().await;
            let report = report?;
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&report)?),
                "csv" => print!("{}", crate::reconciliation::csv(&report)?),
                _ => print!("{}", crate::reconciliation::table(&report)),
            }
            // A what-if's rows are its answer; the live rows decide the exit.
            if !report.all_resolved() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Flip {
            service,
            subscription,
            cycles,
            tolerance_cents,
            dry_run,
            undo,
            format,
        } => {
            if format != "table" && format != "json" {
                bail!("--format is table or json");
            }
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let request = crate::reconciliation::flip::FlipRequest {
                service,
                subscriptions: subscription,
                cycles,
                tolerance_cents,
                dry_run,
                undo,
                now: chrono::Utc::now(),
            };
            let report = match caught_up(&database).await {
                Ok(()) => {
                    crate::reconciliation::flip::flip(
                        &database.pool,
                        &request,
                        CommandMetadata::cli(),
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            database.close().await;
            let report = report?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::reconciliation::flip::table(&report));
            }
            if !report.blocked.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Replay {
            period,
            service,
            subscription,
            as_of,
            format,
            pricing,
        } => {
            if format != "table" && format != "json" {
                bail!("--format is table or json");
            }
            let pricing = pricing.map(|path| read_price_book(&path)).transpose()?;
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let request = crate::invoicing::replay::ReplayRequest {
                period,
                service,
                subscription,
                as_of,
                pricing,
            };
            let progress = Progress::spinner("reading the log's invoices");
            let report =
                crate::invoicing::replay::replay_showing(&database.pool, &request, &progress).await;
            database.close().await;
            let report = report?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::invoicing::replay::table(&report));
            }
            // A what-if replay's differences are its answer, not a failure.
            if !report.differences.is_empty() && !report.what_if {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Seal => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let started = std::time::Instant::now();
            let unsealed = crate::event_log::tamper::unsealed_events(&database.pool).await?;
            let progress = Progress::events("sealing", unsealed.max(0) as u64);
            let sealed = crate::event_log::tamper::seal_showing(&database.pool, &progress).await;
            progress.finish();
            database.close().await;
            println!(
                "{} seal(s) written over {unsealed} events in {:.2?}",
                sealed?,
                started.elapsed()
            );
        }
        Command::Verify { from } => {
            let database = Database::open(&config, ClusterAccess::ShareIfRunning).await?;
            let started = std::time::Instant::now();
            let progress = Progress::spinner("checking every stream's hash chain");
            let verified =
                crate::event_log::tamper::verify_showing(&database.pool, from, &progress).await;
            database.close().await;
            let verified = verified?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "{} events chain-checked, {} seals checked, {} events after the last seal, in {seconds:.2} s ({:.0} events/s)",
                verified.events_checked,
                verified.seals_checked,
                verified.unsealed,
                verified.events_checked as f64 / seconds.max(1e-9)
            );
            if let Some(digest) = &verified.latest_digest {
                println!("latest seal digest (keep it outside the database): {digest}");
            }
            match verified.first_break {
                None => {
                    println!("the log verifies: no event altered, removed, inserted or reordered")
                }
                Some(broken) => {
                    println!(
                        "the proof breaks at position {}: {broken:?}",
                        broken.position()
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Bench {
            command:
                BenchCommand::Ingest {
                    seconds,
                    concurrency,
                },
        } => {
            crate::tools::bench::ingest::run(crate::tools::bench::ingest::IngestBench {
                data_dir: config.data_dir.clone(),
                seconds,
                concurrency,
            })
            .await?
        }
        Command::Bench {
            command:
                BenchCommand::Reconcile {
                    subscriptions,
                    events,
                },
        } => {
            crate::tools::bench::reconcile::run(crate::tools::bench::reconcile::ReconcileBench {
                data_dir: config.data_dir.clone(),
                subscriptions,
                events_per_period: events,
            })
            .await?
        }
        Command::Bench {
            command:
                BenchCommand::Close {
                    subscriptions,
                    events,
                },
        } => {
            crate::tools::bench::close::run(crate::tools::bench::close::CloseBench {
                data_dir: config.data_dir.clone(),
                subscriptions,
                events_per_subscription: events,
            })
            .await?
        }
        Command::Bench {
            command:
                BenchCommand::Import {
                    subscriptions,
                    usage_records,
                },
        } => {
            crate::tools::bench::import::run(crate::tools::bench::import::ImportBench {
                data_dir: config.data_dir.clone(),
                subscriptions,
                usage_records,
            })
            .await?
        }
        Command::Bench {
            command:
                BenchCommand::Rebuild {
                    subscriptions,
                    events,
                },
        } => {
            crate::tools::bench::rebuild::run(crate::tools::bench::rebuild::RebuildBench {
                data_dir: config.data_dir.clone(),
                subscriptions,
                events_per_subscription: events,
            })
            .await?
        }
        Command::Bench {
            command:
                BenchCommand::Webhooks {
                    invoices,
                    rate,
                    seconds,
                },
        } => {
            crate::tools::bench::webhooks::run(crate::tools::bench::webhooks::WebhooksBench {
                data_dir: config.data_dir.clone(),
                invoices,
                rate,
                seconds,
            })
            .await?
        }
        Command::Import { command } => return import(&config, command).await,
        Command::WithPostgres {
            durability_off,
            command,
        } => return with_postgres(&config, durability_off, command).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: &DatabaseConfig, settings: ServeSettings) -> anyhow::Result<()> {
    let database = Database::open(config, ClusterAccess::Own).await?;
    let admin_key = match (settings.admin_key, database.embedded_data_dir()) {
        (Some(key), _) => Some(AdminKey::new(&key)),
        (None, Some(dir)) => Some(AdminKey::from_digest(
            crate::access::keys::embedded_operator_key(dir)
                .context("cannot keep the operator key")?,
        )),
        (None, None) => {
            tracing::warn!("no LEDGER_ADMIN_KEY configured: the admin API refuses every request");
            None
        }
    };
    let app = Application::build(
        database.pool.clone(),
        Settings {
            listen: settings.listen,
            admin_key,
            usage_limits: settings.usage_limits,
            usage_appenders: settings.usage_appenders,
            close_interval: settings.close_interval,
            seal_interval: std::time::Duration::from_secs(60),
            background: BackgroundTasks::ALL,
            connections: crate::app::server::ConnectionLimits::default(),
            providers: settings.providers,
            dispatch_interval: std::time::Duration::from_millis(100),
            metrics_listen: settings.metrics_listen,
        },
    )
    .await?;
    let stop = shutdown_signal();
    if let Some(address) = app.metrics_addr() {
        tracing::info!(address = %address?, "metrics are served at /metrics");
    }
    tracing::info!(address = %app.local_addr()?, "ledger is serving");
    let served = app.run_until_stopped(stop).await;
    database.close().await;
    served.context("the HTTP server failed")
}

async fn webhooks(database: &Database, command: WebhooksCommand) -> anyhow::Result<ExitCode> {
    use crate::webhooks::{self as outbox, dispatcher::Dispatcher, DeliveryFilter};
    let pool = &database.pool;
    let now = chrono::Utc::now();
    match command {
        WebhooksCommand::List {
            status,
            endpoint,
            service,
            limit,
        } => {
            if let Some(status) = &status {
                if !outbox::DELIVERY_STATUSES.contains(&status.as_str()) {
                    bail!("--status: one of {}", outbox::DELIVERY_STATUSES.join(", "));
                }
            }
            // Show every message the log yields so far, queued or not yet.
            ProjectionRunner::for_all(pool.clone())
                .await?
                .catch_up()
                .await?;
            Dispatcher::new(pool.clone(), Default::default())
                .enqueue(now)
                .await?;
            let filter = DeliveryFilter {
                status,
                endpoint,
                service,
                limit: limit.clamp(1, 10_000),
            };
            for delivery in outbox::list(pool, &filter).await? {
                println!("{delivery}");
            }
        }
        WebhooksCommand::Show { message_id } => match outbox::show(pool, message_id).await? {
            Some(delivery) => println!("{}", serde_json::to_string_pretty(&delivery)?),
            None => bail!("no message {message_id}"),
        },
        WebhooksCommand::Redeliver { message_id } => {
            if !outbox::redeliver(pool, message_id, now).await? {
                bail!("no message {message_id}");
            }
            println!("message {message_id} queued for delivery");
        }
        WebhooksCommand::Recover { endpoint, since } => {
            let queued = outbox::recover(pool, endpoint, since, now).await?;
            println!(
                "{queued} failed message(s) of endpoint {endpoint} since {since} queued again"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `ledger serve` was asked for.
struct ServeSettings {
    listen: SocketAddr,
    admin_key: Option<String>,
    usage_limits: UsageLimits,
    usage_appenders: usize,
    close_interval: std::time::Duration,
    providers: crate::http::Providers,
    metrics_listen: Option<SocketAddr>,
}

async fn services(database: &Database, command: ServicesCommand) -> anyhow::Result<()> {
    let commands = CommandBus::new(&database.pool);
    let refused =
        |error: cqrs_es::AggregateError<aggregates::ServiceError>| anyhow::anyhow!("{error}");
    match command {
        ServicesCommand::Create { code, name } => {
            services::register(&commands, &code, &name, CommandMetadata::cli())
                .await
                .map_err(refused)?;
            let key = services::issue_key(
                &commands,
                &code,
                Some("initial".into()),
                CommandMetadata::cli(),
            )
            .await
            .map_err(refused)?;
            println!("registered service {code}");
            println!(
                "API key {} (shown once; only its SHA-256 is kept):\n  {}",
                key.id, key.key
            );
        }
        ServicesCommand::IssueKey { code, label } => {
            let key = services::issue_key(&commands, &code, label, CommandMetadata::cli())
                .await
                .map_err(refused)?;
            println!(
                "API key {} for {code} (shown once; only its SHA-256 is kept):\n  {}",
                key.id, key.key
            );
        }
        ServicesCommand::RevokeKey { code, key_id } => {
            services::revoke_key(&commands, &code, &key_id, CommandMetadata::cli())
                .await
                .map_err(refused)?;
            println!("revoked {key_id} of {code}");
        }
        ServicesCommand::List => {}
    }
    ProjectionRunner::for_all(database.pool.clone())
        .await?
        .catch_up()
        .await?;
    #[derive(sqlx::FromRow)]
    struct KeyRow {
        code: String,
        name: String,
        status: String,
        key_id: Option<String>,
        label: Option<String>,
        revoked: Option<bool>,
    }
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT s.code, s.name, s.status, k.key_id, k.label, k.revoked_at IS NOT NULL AS revoked \
         FROM service_directory s LEFT JOIN api_keys k ON k.service_code = s.code \
         ORDER BY s.code, k.issued_at",
    )
    .fetch_all(&database.pool)
    .await?;
    println!(
        "\n{:<12} {:<24} {:<9} {:<38} {:<12} revoked",
        "service", "name", "status", "key", "label"
    );
    for row in rows {
        println!(
            "{:<12} {:<24} {:<9} {:<38} {:<12} {}",
            row.code,
            row.name,
            row.status,
            row.key_id.unwrap_or_default(),
            row.label.unwrap_or_default(),
            row.revoked
                .map(|r| if r { "yes" } else { "no" })
                .unwrap_or("")
        );
    }
    Ok(())
}

async fn projections(database: &Database, command: ProjectionsCommand) -> anyhow::Result<()> {
    let runner = ProjectionRunner::for_all(database.pool.clone()).await?;
    match command {
        ProjectionsCommand::Status => {
            println!(
                "{:<24} {:>14} {:>14} {:>10}  updated at",
                "projection", "checkpoint", "applied", "lag"
            );
            for status in projection_runner::status(&database.pool).await? {
                println!(
                    "{:<24} {:>14} {:>14} {:>10}  {}",
                    status.name,
                    status.last_position,
                    status.events_applied,
                    status.lag,
                    status
                        .updated_at
                        .map(|at| at.to_rfc3339())
                        .unwrap_or_else(|| "never".into())
                );
            }
            let quarantined = crate::invoicing::quarantine::quarantined(&database.pool).await?;
            let distinct: std::collections::BTreeSet<_> =
                quarantined.iter().map(|q| q.subscription_lago_id).collect();
            println!(
                "\nquarantined subscriptions (not billed): {}",
                distinct.len()
            );
            for q in quarantined {
                println!(
                    "{:<16} {:<32} found by {:<7} {}",
                    q.service, q.external_subscription_id, q.found_by, q.reason
                );
            }
        }
        ProjectionsCommand::Rebuild { name, all, into } => {
            let chosen: Vec<&dyn projections::Projection> = match name {
                _ if all => runner.projections().collect(),
                Some(name) => match runner.projections().find(|p| p.name() == name) {
                    Some(projection) => vec![projection],
                    None => {
                        let known: Vec<&str> = runner.projections().map(|p| p.name()).collect();
                        bail!("no projection named '{name}' (known: {})", known.join(", "));
                    }
                },
                None => bail!("name a projection or pass --all"),
            };
            let names: Vec<&str> = chosen.iter().map(|p| p.name()).collect();
            let started = std::time::Instant::now();
            let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                .fetch_one(&database.pool)
                .await?;
            let events = events.max(0) as u64;
            match into {
                Some(schema) => {
                    let progress = Progress::events(&format!("into {schema}"), events);
                    let (read, cursor) = projection_runner::rebuild_into_showing(
                        &database.pool,
                        &chosen,
                        &schema,
                        &progress,
                    )
                    .await?;
                    progress.finish();
                    println!(
                        "rebuilt {} into schema {schema}: {read} events read up to position {} in {:.2?}; live tables untouched",
                        names.join(", "),
                        cursor.position,
                        started.elapsed()
                    );
                }
                None => {
                    let runner = ProjectionRunner::for_all(database.pool.clone())
                        .await?
                        .rebuilding();
                    let chosen: Vec<&dyn projections::Projection> = runner
                        .projections()
                        .filter(|p| names.contains(&p.name()))
                        .collect();
                    let mut applied = 0;
                    for projection in chosen {
                        let progress = Progress::events(projection.name(), events);
                        projection_runner::reset(&database.pool, projection).await?;
                        applied += runner.catch_up_one_showing(projection, &progress).await?;
                        progress.finish();
                    }
                    println!(
                        "rebuilt {}: {applied} events replayed in {:.2?}",
                        names.join(", "),
                        started.elapsed()
                    );
                }
            }
        }
    }
    Ok(())
}

async fn import(config: &DatabaseConfig, command: ImportCommand) -> anyhow::Result<ExitCode> {
    use crate::import::{self, nexacloud, ImportSettings, Importer};
    let settings =
        |run: &ImportRunArgs, options: serde_json::Value| -> anyhow::Result<ImportSettings> {
            Ok(ImportSettings {
                service: run.service.clone().context("--service is required")?,
                dry_run: run.dry_run,
                apply_changes: run.apply_changes,
                options,
                by: format!("operator (cli, {})", whoami()),
            })
        };
    let (report, report_path) = match command {
        ImportCommand::Nexacloud {
            command: Some(NexacloudCommand::TestConnection { source_url }),
            ..
        } => {
            return match nexacloud::test_connection(&source_url).await {
                Ok(check) => {
                    print!("{}", check.text());
                    Ok(if check.differences.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(error) => {
                    eprintln!("{error}");
                    Ok(ExitCode::FAILURE)
                }
            };
        }
        ImportCommand::Nexacloud {
            command: None,
            source_url,
            export,
            run,
            mapping,
        } => {
            let url = source_url.context("--source-url is required")?;
            let options = nexacloud::MappingOptions {
                timezone: mapping.timezone,
                tax_codes: mapping.tax_codes,
                cpu_price: mapping.cpu_price,
                cpu_unit_size: mapping.cpu_unit_size,
                since: mapping
                    .since
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|d| d.and_utc()),
            };
            let mut recorded = options.to_json();
            recorded["door"] = "nexacloud".into();
            let outcome = match export {
                Some(path) => {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    let sink = nexacloud::Sink::Export {
                        out: Box::new(std::io::BufWriter::new(file)),
                        report: import::Report {
                            service: run.service.clone().unwrap_or_default(),
                            dry_run: true,
                            ..Default::default()
                        },
                    };
                    let report = nexacloud::run(&url, &options, sink).await;
                    if report.is_ok() {
                        println!("records written to {}", path.display());
                    }
                    report
                }
                None => {
                    let settings = settings(&run, recorded)?;
                    let database = Database::open(config, ClusterAccess::ShareIfRunning).await?;
                    let outcome = match Importer::new(&database.pool, settings).await {
                        Ok(importer) => {
                            nexacloud::run(
                                &url,
                                &options,
                                nexacloud::Sink::Import(Box::new(importer)),
                            )
                            .await
                        }
                        Err(error) => Err(error),
                    };
                    database.close().await;
                    outcome
                }
            };
            (outcome, run.report)
        }
        ImportCommand::File { path, run } => {
            let options = serde_json::json!({"door": "file", "path": path.display().to_string()});
            let settings = settings(&run, options)?;
            let database = Database::open(config, ClusterAccess::ShareIfRunning).await?;
            let outcome = match Importer::new(&database.pool, settings).await {
                Ok(importer) => import::file::import_file(importer, &path).await,
                Err(error) => Err(error),
            };
            database.close().await;
            (outcome, run.report)
        }
    };
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", report.table());
    if let Some(path) = report_path {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// The user running the CLI, as the run records it.
/// A what-if price book file (`{"plans": [...]}`).
fn read_price_book(path: &std::path::Path) -> anyhow::Result<crate::invoicing::replay::PriceBook> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a price book ({{\"plans\": [...]}})",
            path.display()
        )
    })
}

/// Bring every projection up to the log's head (a CLI beside `ledger
/// serve` shares the work; alone, it does it).
async fn caught_up(database: &Database) -> anyhow::Result<()> {
    crate::event_log::projection_runner::ProjectionRunner::for_all(database.pool.clone())
        .await?
        .catch_up()
        .await?;
    Ok(())
}

fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| nix::unistd::Uid::current().to_string())
}

async fn with_postgres(
    config: &DatabaseConfig,
    durability_off: bool,
    command: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let settings = ClusterSettings {
        max_connections: 300,
        durability_off,
    };
    let mut cluster = EmbeddedPostgres::open(&config.data_dir, settings).await?;
    cluster.start().await?;
    let (program, args) = command.split_first().context("no command given")?;
    let status = tokio::process::Command::new(program)
        .args(args)
        .env("DATABASE_URL", cluster.database_url())
        .status()
        .await
        .with_context(|| format!("cannot run {program}"));
    cluster.stop().await?;
    let status = status?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}
