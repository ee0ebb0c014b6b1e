//! The NexaCloud adapter: NexaCloud's own PostgreSQL database (its schema:
//! `nexacloud_schema.sql`) read into records of the neutral format, inside
//! one `REPEATABLE READ, READ ONLY` transaction (one consistent snapshot),
//! table by table through cursors, so memory stays flat whatever the size
//! of the source. The mapping rules are in docs/imports.md.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::str::FromStr;

use aggregates::import::{whole_cents, RecordType, SourceRecord};
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};

use super::{ImportError, Importer, Report};
use crate::tools::progress::Progress;

/// The source name records carry.
pub const SOURCE: &str = "nexacloud";
/// The metric NexaCloud's CPU usage is recorded on.
pub const CPU_METRIC: &str = "cpu_seconds";
/// The tables of NexaCloud's schema, version 1 (what the adapter reads).
pub const SCHEMA: &str = include_str!("nexacloud_schema.sql");
/// A small NexaCloud database (the demo imports it).
pub const SAMPLE: &str = include_str!("nexacloud_sample.sql");
/// Rows fetched from a cursor at a time.
const FETCH: usize = 1_000;

/// How NexaCloud's rows become records.
#[derive(Debug, Clone)]
pub struct MappingOptions {
    /// Every imported customer's time zone (NexaCloud has none).
    pub timezone: Tz,
    /// Every imported customer's tax codes (NexaCloud has none).
    pub tax_codes: Vec<String>,
    /// The price of `cpu_unit_size` CPU-seconds beyond the quota.
    pub cpu_price: Decimal,
    /// The CPU-seconds one `cpu_price` buys.
    pub cpu_unit_size: Decimal,
    /// Also import subscriptions cancelled after this instant.
    pub since: Option<DateTime<Utc>>,
}

impl MappingOptions {
    /// The options as a run records them.
    pub fn to_json(&self) -> Value {
        json!({
            "timezone": self.timezone.name(),
            "tax_codes": self.tax_codes,
            "cpu_price": self.cpu_price.to_string(),
            "cpu_unit_size": self.cpu_unit_size.to_string(),
            "since": self.since.map(|s| s.to_rfc3339()),
        })
    }
}

/// Where the records go: into the ledger, or to a JSON Lines file.
pub enum Sink {
    /// Imported.
    Import(Box<Importer>),
    /// Written for review (nothing imported).
    Export {
        /// The file.
        out: Box<dyn Write + Send>,
        /// The adapter's own failures, warnings and the records written.
        report: Report,
    },
}

impl Sink {
    async fn put(&mut self, table: &str, record: SourceRecord) -> Result<(), ImportError> {
        match self {
            Sink::Import(importer) => importer.add(table, record).await,
            Sink::Export { out, report } => {
                report.counts_mut(record.record_type).new += 1;
                report.source = Some(record.source.clone());
                writeln!(out, "{}", record.to_value())
                    .map_err(|e| ImportError::Source(format!("cannot write the export: {e}")))
            }
        }
    }

    fn report(&mut self) -> &mut Report {
        match self {
            Sink::Import(importer) => importer.report(),
            Sink::Export { report, .. } => report,
        }
    }

    async fn finish(self) -> Result<Report, ImportError> {
        match self {
            Sink::Import(importer) => importer.finish().await,
            Sink::Export { mut out, report } => {
                out.flush()
                    .map_err(|e| ImportError::Source(format!("cannot write the export: {e}")))?;
                Ok(report)
            }
        }
    }
}

/// Connect to the source, with one clear line (never the password) when it
/// cannot be reached or refuses.
pub async fn connect(url: &str) -> Result<PgConnection, ImportError> {
    let options = PgConnectOptions::from_str(url).map_err(|_| {
        ImportError::Source(
            "the source URL is not a PostgreSQL URL (postgres://user:password@host/database)"
                .into(),
        )
    })?;
    let options = options
        .application_name("ledger-import")
        .disable_statement_logging();
    let password = url::password(url);
    PgConnection::connect_with(&options).await.map_err(|error| {
        let reason = match &error {
            sqlx::Error::Database(db) => db.message().to_string(),
            sqlx::Error::Io(io) => io.to_string(),
            sqlx::Error::Tls(tls) => format!("TLS: {tls}"),
            other => other.to_string(),
        };
        let reason = match &password {
            Some(password) if !password.is_empty() => reason.replace(password.as_str(), "***"),
            _ => reason,
        };
        ImportError::Source(format!(
            "cannot connect to the source database {}:{} ({}): {reason}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("-")
        ))
    })
}

mod url {
    /// The password in a `postgres://user:password@host` URL, to keep it out of messages.
    pub fn password(url: &str) -> Option<String> {
        let rest = url.split_once("://")?.1;
        let userinfo = rest.split_once('@')?.0;
        userinfo.split_once(':').map(|(_, p)| p.to_string())
    }
}

/// A column of the expected schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The table.
    pub table: String,
    /// The column.
    pub name: String,
    /// Its type as PostgreSQL's `format_type` names it.
    pub data_type: String,
}

/// The columns `schema.sql` declares, in order.
pub fn expected_columns() -> Vec<Column> {
    let mut columns = Vec::new();
    let mut table: Option<String> = None;
    for line in SCHEMA.lines() {
        let line = line.split("--").next().unwrap_or("").trim();
        if let Some(rest) = line.strip_prefix("CREATE TABLE ") {
            table = rest.split_whitespace().next().map(str::to_string);
            continue;
        }
        if line.starts_with(')') {
            table = None;
            continue;
        }
        let Some(table) = &table else { continue };
        let mut words = line.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let kind = kind.trim_end_matches(',');
        let data_type = match kind {
            "timestamptz" => "timestamp with time zone".to_string(),
            "bigserial" => "bigint".to_string(),
            "numeric(12,4)" | "numeric(14,4)" | "numeric(12,6)" => kind.to_string(),
            other => other.to_string(),
        };
        columns.push(Column {
            table: table.clone(),
            name: name.to_string(),
            data_type,
        });
    }
    columns
}

/// What the source lacks or has otherwise than `schema.sql`.
pub async fn schema_differences(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         WHERE c.relnamespace = to_regnamespace(current_schema()) AND c.relkind IN ('r', 'p', 'v') \
           AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .fetch_all(&mut *conn)
    .await?;
    let found: HashMap<(String, String), String> =
        rows.into_iter().map(|(t, c, ty)| ((t, c), ty)).collect();
    let tables: HashSet<&str> = found.keys().map(|(t, _)| t.as_str()).collect();
    let mut differences = Vec::new();
    let mut missing_tables = HashSet::new();
    for column in expected_columns() {
        if !tables.contains(column.table.as_str()) {
            if missing_tables.insert(column.table.clone()) {
                differences.push(format!("table {} is missing", column.table));
            }
            continue;
        }
        match found.get(&(column.table.clone(), column.name.clone())) {
            None => differences.push(format!(
                "column {}.{} is missing (expected {})",
                column.table, column.name, column.data_type
            )),
            Some(ty) if *ty != column.data_type => differences.push(format!(
                "column {}.{} is {ty}, expected {}",
                column.table, column.name, column.data_type
            )),
            Some(_) => {}
        }
    }
    Ok(differences)
}

/// The tables the adapter reads.
pub fn tables() -> Vec<String> {
    let mut tables: Vec<String> = Vec::new();
    for column in expected_columns() {
        if !tables.contains(&column.table) {
            tables.push(column.table);
        }
    }
    tables
}

/// What `test-connection` found.
#[derive(Debug, Default)]
pub struct ConnectionCheck {
    /// Row count per table (of those present).
    pub row_counts: Vec<(String, i64)>,
    /// Tables the role could write to.
    pub writable: Vec<(String, Vec<&'static str>)>,
    /// What is missing or differs from schema.sql.
    pub differences: Vec<String>,
}

impl ConnectionCheck {
    /// The check as printed.
    pub fn text(&self) -> String {
        let mut out = String::from("connected; read inside a READ ONLY transaction\n");
        for (table, count) in &self.row_counts {
            out.push_str(&format!("  {table:<16} {count:>12} rows\n"));
        }
        for (table, privileges) in &self.writable {
            out.push_str(&format!(
                "warning: the role can {} on {table}; the importer only reads: give it a read-only role\n",
                privileges.join(", ")
            ));
        }
        for difference in &self.differences {
            out.push_str(&format!("missing: {difference}\n"));
        }
        if self.differences.is_empty() {
            out.push_str("the schema matches NexaCloud's schema version 1\n");
        }
        out
    }
}

/// Connect, and inside a read-only transaction count each table's rows,
/// find the privileges to write, and compare the schema.
pub async fn test_connection(url: &str) -> Result<ConnectionCheck, ImportError> {
    let mut conn = connect(url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut check = ConnectionCheck {
        differences: schema_differences(&mut tx).await?,
        ..ConnectionCheck::default()
    };
    for table in tables() {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            continue;
        }
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await?;
        check.row_counts.push((table.clone(), count));
        let mut privileges = Vec::new();
        for privilege in ["INSERT", "UPDATE", "DELETE", "TRUNCATE"] {
            let has: bool = sqlx::query_scalar("SELECT has_table_privilege(current_user, $1, $2)")
                .bind(&table)
                .bind(privilege)
                .fetch_one(&mut *tx)
                .await?;
            if has {
                privileges.push(privilege);
            }
        }
        if !privileges.is_empty() {
            check.writable.push((table, privileges));
        }
    }
    tx.rollback().await?;
    Ok(check)
}

/// A table read through a cursor of the snapshot, `FETCH` rows at a time.
struct Cursor<'c> {
    conn: &'c mut PgConnection,
    name: &'static str,
    progress: Progress,
}

impl<'c> Cursor<'c> {
    async fn open(
        conn: &'c mut PgConnection,
        name: &'static str,
        label: &str,
        select: &str,
    ) -> Result<Cursor<'c>, sqlx::Error> {
        let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ({select}) AS rows"))
            .fetch_one(&mut *conn)
            .await?;
        sqlx::raw_sql(&format!("DECLARE {name} NO SCROLL CURSOR FOR {select}"))
            .execute(&mut *conn)
            .await?;
        Ok(Cursor {
            conn,
            name,
            progress: Progress::rows(label, total.max(0) as u64),
        })
    }

    async fn next(&mut self) -> Result<Vec<PgRow>, sqlx::Error> {
        let rows = sqlx::raw_sql(&format!("FETCH {FETCH} FROM {}", self.name))
            .fetch_all(&mut *self.conn)
            .await?;
        self.progress.advance(rows.len() as u64);
        Ok(rows)
    }

    async fn close(self) -> Result<(), sqlx::Error> {
        self.progress.finish();
        sqlx::raw_sql(&format!("CLOSE {}", self.name))
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }
}

/// The plans of one NexaCloud plan, per billing cycle: the ledger plan's
/// code, or why there is none.
#[derive(Default)]
struct Cycles {
    slug: String,
    monthly: Option<Result<String, String>>,
    yearly: Option<Result<String, String>>,
}

/// The `WHERE` of the subscriptions imported: alive now, or cancelled
/// after `since`.
fn imported_subscriptions(since: Option<DateTime<Utc>>) -> String {
    match since {
        None => "s.status <> 'cancelled'".to_string(),
        Some(since) => format!(
            "(s.status <> 'cancelled' OR s.cancelled_at IS NULL OR s.cancelled_at > '{}'::timestamptz)",
            since.to_rfc3339()
        ),
    }
}

/// Unix seconds of `at`, exactly (a decimal string when it has a fraction).
fn unix_seconds(at: DateTime<Utc>) -> Value {
    let nanos = at.timestamp_subsec_nanos();
    if nanos == 0 {
        json!(at.timestamp())
    } else {
        let seconds = Decimal::from(at.timestamp()) + Decimal::new(nanos.into(), 9);
        json!(seconds.normalize().to_string())
    }
}

fn decimal_text(value: Decimal) -> String {
    value.normalize().to_string()
}

/// The start of the billing period after the one holding `at` (calendar
/// periods in `zone`).
fn next_boundary(at: DateTime<Utc>, zone: Tz, yearly: bool) -> Option<DateTime<Utc>> {
    let local = at.with_timezone(&zone).date_naive();
    let next = if yearly || local.month() == 12 {
        NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)?
    };
    zone.from_local_datetime(&next.and_hms_opt(0, 0, 0)?)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

/// Read the source at `url` into `sink` with `options`.
pub async fn run(
    url: &str,
    options: &MappingOptions,
    mut sink: Sink,
) -> Result<Report, ImportError> {
    let mut conn = connect(url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let differences = schema_differences(&mut tx).await?;
    if !differences.is_empty() {
        return Err(ImportError::Source(format!(
            "the source is not NexaCloud's schema version 1: {}",
            differences.join("; ")
        )));
    }
    let alive = imported_subscriptions(options.since);

    sink.put(
        "(ledger)",
        SourceRecord::new(
            RecordType::BillableMetric,
            SOURCE,
            CPU_METRIC,
            json!({"code": CPU_METRIC, "name": "CPU seconds", "aggregation_type": "sum_agg",
                   "field_name": CPU_METRIC}),
        ),
    )
    .await?;

    // users → customers
    let duplicates: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT lower(email), array_agg(id::text ORDER BY id) FROM users \
         GROUP BY lower(email) HAVING count(*) > 1 ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (email, ids) in duplicates {
        sink.report().warnings.push(format!(
            "users {} share the email {email} (in different case): imported as {} customers",
            ids.join(", "),
            ids.len()
        ));
    }
    let mut cursor = Cursor::open(
        &mut tx,
        "nexacloud_users",
        "users",
        "SELECT id::text AS id, email, full_name, stripe_customer_id FROM users ORDER BY id",
    )
    .await?;
    loop {
        let rows = cursor.next().await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let id: String = row.try_get("id")?;
            let mut fields = Map::new();
            fields.insert("external_id".into(), json!(id));
            fields.insert(
                "name".into(),
                json!(row.try_get::<Option<String>, _>("full_name")?),
            );
            fields.insert("email".into(), json!(row.try_get::<String, _>("email")?));
            fields.insert("timezone".into(), json!(options.timezone.name()));
            if !options.tax_codes.is_empty() {
                fields.insert("tax_codes".into(), json!(options.tax_codes));
            }
            if let Some(stripe) = row.try_get::<Option<String>, _>("stripe_customer_id")? {
                fields.insert(
                    "billing_configuration".into(),
                    json!({"payment_provider": "stripe", "provider_customer_id": stripe}),
                );
            }
            let record = SourceRecord::new(RecordType::Customer, SOURCE, id, Value::Object(fields));
            sink.put("users", record).await?;
        }
    }
    cursor.close().await?;

    // plans → one ledger plan per billing cycle with a price
    let mut plans: HashMap<String, Cycles> = HashMap::new();
    let mut cursor = Cursor::open(
        &mut tx,
        "nexacloud_plans",
        "plans",
        &format!(
            "SELECT p.id::text AS id, p.slug, p.name, p.cpu_seconds_quota, p.price_monthly, \
             p.price_yearly, p.currency, p.is_active, \
             EXISTS (SELECT 1 FROM subscriptions s WHERE s.plan_id = p.id AND {alive}) AS used \
             FROM plans p ORDER BY p.slug"
        ),
    )
    .await?;
    loop {
        let rows = cursor.next().await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let id: String = row.try_get("id")?;
            let slug: String = row.try_get("slug")?;
            let active: bool = row.try_get("is_active")?;
            let used: bool = row.try_get("used")?;
            let mut cycles = Cycles {
                slug: slug.clone(),
                ..Cycles::default()
            };
            for (cycle, column) in [("monthly", "price_monthly"), ("yearly", "price_yearly")] {
                let Some(price) = row.try_get::<Option<Decimal>, _>(column)? else {
                    continue; // not sold on this cycle
                };
                let source_id = format!("{id}:{cycle}");
                if !active && !used {
                    sink.report().counts_mut(RecordType::Plan).skipped += 1;
                    continue;
                }
                let Some(cents) = whole_cents(price) else {
                    let reason = format!(
                        "{} is not a whole number of cents (never rounded)",
                        decimal_text(price)
                    );
                    sink.report()
                        .fail(RecordType::Plan, "plans", &id, column, reason.clone());
                    let failed = Err(format!(
                        "plan {slug} has no {cycle} price the ledger can bill: {reason}"
                    ));
                    match cycle {
                        "monthly" => cycles.monthly = Some(failed),
                        _ => cycles.yearly = Some(failed),
                    }
                    continue;
                };
                let code = format!("{slug}-{cycle}");
                let name: String = row.try_get("name")?;
                let quota: i64 = row.try_get("cpu_seconds_quota")?;
                let currency: String = row.try_get("currency")?;
                let record = SourceRecord::new(
                    RecordType::Plan,
                    SOURCE,
                    source_id,
                    json!({"code": code, "name": format!("{name} ({cycle})"), "interval": cycle,
                           "amount_cents": cents, "amount_currency": currency,
                           "charges": [{"billable_metric_code": CPU_METRIC, "charge_model": "standard",
                               "properties": {"amount": decimal_text(options.cpu_price),
                                              "unit_size": decimal_text(options.cpu_unit_size),
                                              "free_units": quota.to_string()}}]}),
                );
                sink.put("plans", record).await?;
                match cycle {
                    "monthly" => cycles.monthly = Some(Ok(code)),
                    _ => cycles.yearly = Some(Ok(code)),
                }
            }
            plans.insert(id, cycles);
        }
    }
    cursor.close().await?;

    // subscriptions → shadow subscriptions, one per deployment
    let not_taken: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM subscriptions s WHERE NOT ({alive})"
    ))
    .fetch_one(&mut *tx)
    .await?;
    sink.report().counts_mut(RecordType::Subscription).skipped += not_taken as u64;
    // The imported subscriptions and whether each bills yearly.
    let mut imported: HashMap<String, bool> = HashMap::new();
    let mut cursor = Cursor::open(
        &mut tx,
        "nexacloud_subscriptions",
        "subscriptions",
        &format!(
            "SELECT s.id::text AS id, s.user_id::text AS user_id, s.plan_id::text AS plan_id, \
             s.deployment_id::text AS deployment_id, d.name AS deployment_name, s.billing_cycle, \
             s.status, s.created_at, s.cancelled_at \
             FROM subscriptions s LEFT JOIN deployments d ON d.id = s.deployment_id \
             WHERE {alive} ORDER BY s.created_at, s.id"
        ),
    )
    .await?;
    loop {
        let rows = cursor.next().await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let id: String = row.try_get("id")?;
            let plan_id: String = row.try_get("plan_id")?;
            let cycle: String = row.try_get("billing_cycle")?;
            let status: String = row.try_get("status")?;
            let cancelled_at: Option<DateTime<Utc>> = row.try_get("cancelled_at")?;
            let fail = |sink: &mut Sink, field: &str, reason: String| {
                sink.report().fail(
                    RecordType::Subscription,
                    "subscriptions",
                    &id,
                    field,
                    reason,
                );
            };
            let plan = plans.get(&plan_id);
            let code = match (cycle.as_str(), plan) {
                ("monthly" | "yearly", None) => {
                    Err(("plan_id", format!("plan {plan_id} is not in the source")))
                }
                ("monthly", Some(p)) => p
                    .monthly
                    .clone()
                    .ok_or_else(|| {
                        (
                            "billing_cycle",
                            format!("plan {} is not sold monthly (no monthly price)", p.slug),
                        )
                    })
                    .and_then(|r| r.map_err(|e| ("plan_id", e))),
                ("yearly", Some(p)) => p
                    .yearly
                    .clone()
                    .ok_or_else(|| {
                        (
                            "billing_cycle",
                            format!("plan {} is not sold yearly (no yearly price)", p.slug),
                        )
                    })
                    .and_then(|r| r.map_err(|e| ("plan_id", e))),
                (other, _) => Err((
                    "billing_cycle",
                    format!("unknown billing cycle '{other}' (monthly or yearly)"),
                )),
            };
            let code = match code {
                Ok(code) => code,
                Err((field, reason)) => {
                    fail(&mut sink, field, reason);
                    continue;
                }
            };
            let terminated_at = match status.as_str() {
                "active" | "trialing" | "past_due" => None,
                "cancelled" => match cancelled_at {
                    Some(at) => Some(at),
                    None => {
                        fail(
                            &mut sink,
                            "cancelled_at",
                            "a cancelled subscription needs cancelled_at".into(),
                        );
                        continue;
                    }
                },
                other => {
                    fail(&mut sink, "status", format!("unknown status '{other}'"));
                    continue;
                }
            };
            let created_at: DateTime<Utc> = row.try_get("created_at")?;
            let mut metadata = Map::new();
            if let Some(deployment) = row.try_get::<Option<String>, _>("deployment_id")? {
                metadata.insert("deployment_id".into(), json!(deployment));
            }
            let record = SourceRecord::new(
                RecordType::Subscription,
                SOURCE,
                id.clone(),
                json!({"external_id": id, "external_customer_id": row.try_get::<String, _>("user_id")?,
                       "plan_code": code, "name": row.try_get::<Option<String>, _>("deployment_name")?,
                       "billing_time": "calendar",
                       "subscription_at": created_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                       "shadow": true, "metadata": metadata,
                       "terminated_at": terminated_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))}),
            );
            sink.put("subscriptions", record).await?;
            imported.insert(id, cycle == "yearly");
        }
    }
    cursor.close().await?;

    // usage_records → usage events on the CPU metric
    let mut cursor = Cursor::open(
        &mut tx,
        "nexacloud_usage",
        "usage_records",
        "SELECT u.id, u.subscription_id::text AS subscription_id, u.period_start, u.period_end, \
         u.cpu_hours FROM usage_records u ORDER BY u.id",
    )
    .await?;
    let hour = Decimal::from(3600);
    loop {
        let rows = cursor.next().await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let subscription: String = row.try_get("subscription_id")?;
            let Some(&yearly) = imported.get(&subscription) else {
                sink.report().counts_mut(RecordType::Usage).skipped += 1;
                continue;
            };
            let start: DateTime<Utc> = row.try_get("period_start")?;
            let end: DateTime<Utc> = row.try_get("period_end")?;
            let hours: Decimal = row.try_get("cpu_hours")?;
            let Some(seconds) = hours.checked_mul(hour) else {
                sink.report().fail(
                    RecordType::Usage,
                    "usage_records",
                    &id.to_string(),
                    "cpu_hours",
                    "too large",
                );
                continue;
            };
            if next_boundary(start, options.timezone, yearly).is_some_and(|boundary| end > boundary)
            {
                sink.report().warnings.push(format!(
                    "usage_records {id} (subscription {subscription}) runs from {} to {}, across a \
                     billing-period boundary: imported at its start",
                    start.to_rfc3339(),
                    end.to_rfc3339()
                ));
            }
            let transaction_id = format!("usage_records:{id}");
            let record = SourceRecord::new(
                RecordType::Usage,
                SOURCE,
                id.to_string(),
                json!({"transaction_id": transaction_id, "external_subscription_id": subscription,
                       "code": CPU_METRIC, "timestamp": unix_seconds(start),
                       "properties": {CPU_METRIC: decimal_text(seconds)}}),
            );
            sink.put("usage_records", record).await?;
        }
    }
    cursor.close().await?;

    // invoices (+ invoice_items) → external invoices
    let mut cursor = Cursor::open(
        &mut tx,
        "nexacloud_invoices",
        "invoices",
        "SELECT i.id::text AS id, i.user_id::text AS user_id, i.subscription_id::text AS subscription_id, \
         i.number, i.period_start, i.period_end, i.status, i.subtotal, i.tax, i.total, i.currency, \
         coalesce((SELECT json_agg(json_build_object('kind', it.kind, 'description', it.description, \
                     'quantity', it.quantity::text, 'unit_price', it.unit_price::text, \
                     'subtotal', it.subtotal::text) ORDER BY it.id) \
                   FROM invoice_items it WHERE it.invoice_id = i.id), '[]'::json) AS items \
         FROM invoices i ORDER BY i.created_at, i.id",
    )
    .await?;
    loop {
        let rows = cursor.next().await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            if let Some(record) = external_invoice(&row, &imported, sink.report())? {
                sink.put("invoices", record).await?;
            }
        }
    }
    cursor.close().await?;
    tx.rollback().await?;
    sink.finish().await
}

/// An invoice row as an `external_invoice` record (`None`: skipped or failed).
fn external_invoice(
    row: &PgRow,
    imported: &HashMap<String, bool>,
    report: &mut Report,
) -> Result<Option<SourceRecord>, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let subscription: Option<String> = row.try_get("subscription_id")?;
    if subscription
        .as_ref()
        .is_some_and(|s| !imported.contains_key(s))
    {
        report.counts_mut(RecordType::ExternalInvoice).skipped += 1;
        return Ok(None);
    }
    let mut fail = |field: &str, reason: String| {
        report.fail(RecordType::ExternalInvoice, "invoices", &id, field, reason);
    };
    let mut amounts = Map::new();
    for (column, field) in [
        ("subtotal", "fees_amount_cents"),
        ("tax", "taxes_amount_cents"),
        ("total", "total_amount_cents"),
    ] {
        let amount: Decimal = row.try_get(column)?;
        match whole_cents(amount) {
            Some(cents) => {
                amounts.insert(field.into(), json!(cents));
            }
            None => {
                fail(
                    column,
                    format!("{} is not a whole number of cents", decimal_text(amount)),
                );
                return Ok(None);
            }
        }
    }
    let items: Value = row.try_get("items")?;
    let mut lines = Vec::new();
    for item in items.as_array().into_iter().flatten() {
        let text = |name: &str| {
            item.get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let decimal = |name: &str| Decimal::from_str(&text(name)).ok();
        let (Some(units), Some(unit_amount), Some(subtotal)) = (
            decimal("quantity"),
            decimal("unit_price"),
            decimal("subtotal"),
        ) else {
            fail("invoice_items", "unreadable amounts".into());
            return Ok(None);
        };
        let Some(cents) = whole_cents(subtotal) else {
            fail(
                "invoice_items.subtotal",
                format!("{} is not a whole number of cents", decimal_text(subtotal)),
            );
            return Ok(None);
        };
        lines.push(
            json!({"kind": text("kind"), "description": text("description"),
                          "units": decimal_text(units), "unit_amount": decimal_text(unit_amount),
                          "amount_cents": cents}),
        );
    }
    let date = |name: &str| -> Result<Option<String>, sqlx::Error> {
        Ok(row
            .try_get::<Option<NaiveDate>, _>(name)?
            .map(|d| d.to_string()))
    };
    let mut fields = Map::new();
    fields.insert("number".into(), json!(row.try_get::<String, _>("number")?));
    fields.insert(
        "external_customer_id".into(),
        json!(row.try_get::<String, _>("user_id")?),
    );
    fields.insert("external_subscription_id".into(), json!(subscription));
    fields.insert("from_date".into(), json!(date("period_start")?));
    fields.insert("to_date".into(), json!(date("period_end")?));
    fields.insert("status".into(), json!(row.try_get::<String, _>("status")?));
    fields.insert(
        "currency".into(),
        json!(row.try_get::<String, _>("currency")?),
    );
    fields.extend(amounts);
    fields.insert("lines".into(), Value::Array(lines));
    Ok(Some(SourceRecord::new(
        RecordType::ExternalInvoice,
        SOURCE,
        id,
        Value::Object(fields),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_schema_is_read_from_schema_sql() {
        let columns = expected_columns();
        let find = |table: &str, name: &str| {
            columns
                .iter()
                .find(|c| c.table == table && c.name == name)
                .map(|c| c.data_type.clone())
        };
        assert_eq!(
            find("plans", "price_monthly").as_deref(),
            Some("numeric(12,4)")
        );
        assert_eq!(find("usage_records", "id").as_deref(), Some("bigint"));
        assert_eq!(
            find("usage_records", "cpu_hours").as_deref(),
            Some("numeric(14,4)")
        );
        assert_eq!(
            find("invoice_items", "unit_price").as_deref(),
            Some("numeric(12,6)")
        );
        assert_eq!(
            find("subscriptions", "created_at").as_deref(),
            Some("timestamp with time zone")
        );
        assert_eq!(columns.len(), 58);
        assert_eq!(
            tables(),
            [
                "users",
                "plans",
                "deployments",
                "subscriptions",
                "usage_records",
                "invoices",
                "invoice_items"
            ]
        );
    }

    #[test]
    fn cpu_hours_become_seconds_exactly_and_timestamps_keep_their_fraction() {
        let hours: Decimal = "1.2345".parse().unwrap();
        assert_eq!(decimal_text(hours * Decimal::from(3600)), "4444.2");
        let at: DateTime<Utc> = "2026-10-05T00:00:00.25Z".parse().unwrap();
        assert_eq!(unix_seconds(at), json!("1791158400.25"));
        assert_eq!(
            unix_seconds("2026-10-05T00:00:00Z".parse().unwrap()),
            json!(1791158400)
        );
    }

    #[test]
    fn the_next_billing_boundary_is_the_next_calendar_month_in_the_zone() {
        let at: DateTime<Utc> = "2026-10-31T23:00:00Z".parse().unwrap();
        assert_eq!(
            next_boundary(at, chrono_tz::UTC, false)
                .unwrap()
                .to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(
            next_boundary(at, chrono_tz::America::Toronto, false)
                .unwrap()
                .to_rfc3339(),
            "2026-11-01T04:00:00+00:00"
        );
        assert_eq!(
            next_boundary(at, chrono_tz::UTC, true)
                .unwrap()
                .to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn the_password_is_found_to_be_kept_out_of_messages() {
        assert_eq!(
            url::password("postgres://reader:s3cret@db.example/nexacloud").as_deref(),
            Some("s3cret")
        );
        assert_eq!(url::password("postgres://db.example/nexacloud"), None);
    }
}
