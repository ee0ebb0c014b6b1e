//! Imports: a system's customers, plans, subscriptions, usage and invoices
//! appended to the log as facts (docs/imports.md).
//!
//! Rooms: this module applies records of the neutral format
//! ([`aggregates::import`]) to the ledger — through the same commands as
//! the API, then the record's own fact; [`file`] reads the format from JSON
//! Lines; [`nexacloud`] reads NexaCloud's database into records;
//! [`report`] is what a run tells its operator.
//!
//! Idempotence: each record's fact sits at sequence 1 of its own stream
//! (service, source, type, source id), so however many runs race, it is
//! appended once; a record already imported is compared with what its last
//! fact holds (unchanged, or changed with the fields). Usage records are
//! usage events, keyed by transaction id like every usage event. The
//! domain effect comes first and is idempotent itself, so a run that
//! crashed between the two is completed by the next.

pub mod file;
pub mod nexacloud;
pub mod report;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use aggregates::billable_metric::{
    validate_metric, AggregationType, BillableMetricCommand, MetricInput, MetricRef,
};
use aggregates::customer::{updated_profile, CustomerCommand, CustomerInput, CustomerProfile};
use aggregates::import::{
    changed_fields, validate_external_invoice, ImportOrigin, ImportRunEvent, ImportedRecordEvent,
    RecordType, SourceRecord, IMPORTED_RECORD_TYPE, IMPORT_RUN_TYPE,
};
use aggregates::plan::{validate_plan, PlanCommand, PlanDefinition, PlanInput, PlanRef};
use aggregates::subscription::{SubscriptionCommand, SubscriptionInput};
use aggregates::usage::{
    usage_stream_id, validate_usage, SentUsage, UsageEvent, UsageLimits, USAGE_STREAM_TYPE,
};
use aggregates::{BillableMetric, CatalogError, Customer, FieldErrors, Plan, Subscription};
use chrono::{DateTime, Utc};
use cqrs_es::AggregateError;
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::event_log::append::{append_events, NewEvent, OnConflict};
use crate::event_log::projection_runner::ProjectionRunner;
use crate::event_log::store::{self, CommandBus, CommandMetadata};
use crate::usage::{Ingest, IngestError};
pub use report::Report;

/// Records applied per round trip of facts (and per usage append).
const CHUNK: usize = 500;

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct ImportSettings {
    /// The service imported into (must be registered).
    pub service: String,
    /// Read and validate only; append nothing.
    pub dry_run: bool,
    /// Apply records that changed in the source since they were imported.
    pub apply_changes: bool,
    /// The options as the run records them (never a password).
    pub options: Value,
    /// Who runs it (recorded with the run).
    pub by: String,
}

/// Why an import could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The service is not registered.
    #[error("no service '{0}' is registered (ledger services create {0} --name …)")]
    UnknownService(String),
    /// The source could not be read.
    #[error("{0}")]
    Source(String),
    /// The ledger's storage failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Usage could not be appended.
    #[error("usage: {0}")]
    Usage(#[from] IngestError),
}

/// A record refused: the field and the reason.
#[derive(Debug)]
struct Refused {
    field: String,
    reason: String,
}

impl Refused {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn from_fields(errors: &FieldErrors) -> Self {
        let mut fields = errors.fields().iter();
        match fields.next() {
            Some((field, codes)) => {
                let mut reason = codes.join(", ");
                for (other, codes) in fields {
                    reason.push_str(&format!("; {other}: {}", codes.join(", ")));
                }
                Self::new(field, reason)
            }
            None => Self::new("record", "value_is_invalid"),
        }
    }

    fn from_catalog(error: &CatalogError) -> Self {
        match error {
            CatalogError::Invalid(errors) => Self::from_fields(errors),
            CatalogError::NotFound(what) => Self::new(what, format!("{what}_not_found")),
            other => Self::new("record", other.to_string()),
        }
    }
}

/// A command refused by its aggregate, or storage failing.
fn refused_command(
    error: AggregateError<CatalogError>,
) -> Result<Result<(), Refused>, ImportError> {
    match error {
        AggregateError::UserError(error) => Ok(Err(Refused::from_catalog(&error))),
        AggregateError::AggregateConflict => Ok(Err(Refused::new(
            "record",
            "kept changing under the import; run it again",
        ))),
        other => Err(ImportError::Source(format!("the ledger's log: {other}"))),
    }
}

/// An import in progress: records go in with [`Importer::add`], failures
/// found by a source adapter with [`Importer::report`], and
/// [`Importer::finish`] records the run's completion.
pub struct Importer {
    pool: PgPool,
    commands: CommandBus,
    ingest: Arc<Ingest>,
    settings: ImportSettings,
    run: Option<Run>,
    report: Report,
    pending: Vec<(String, SourceRecord)>,
    /// What this run imports, for records that refer to it (a dry run has
    /// not created it).
    known: HashMap<RecordType, HashSet<String>>,
    /// Keeps the read side up to date: records refer to what the records
    /// before them created (a plan to its metrics, usage to its
    /// subscriptions), as the projections show it.
    projections: ProjectionRunner,
    /// The type of the last chunk applied.
    last_type: Option<RecordType>,
    /// Usage chunks being appended, oldest first.
    in_flight: VecDeque<(Vec<UsageRow>, UsageAppend)>,
}

/// A usage record: where it came from, its source id, the event.
type UsageRow = (String, String, SentUsage);
/// A usage chunk's append under way.
type UsageAppend = tokio::task::JoinHandle<Result<Vec<crate::usage::Recorded>, IngestError>>;
/// Usage chunks appended at once.
const USAGE_IN_FLIGHT: usize = 4;

struct Run {
    id: Uuid,
    source: String,
    metadata: CommandMetadata,
}

impl Importer {
    /// Prepare a run into `settings.service`.
    pub async fn new(pool: &PgPool, settings: ImportSettings) -> Result<Self, ImportError> {
        let registered: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'Service' AND aggregate_id = $1)",
        )
        .bind(&settings.service)
        .fetch_one(pool)
        .await?;
        if !registered {
            return Err(ImportError::UnknownService(settings.service));
        }
        Ok(Self {
            pool: pool.clone(),
            commands: CommandBus::new(pool),
            ingest: Arc::new(Ingest::start(pool.clone(), USAGE_IN_FLIGHT)),
            report: Report {
                service: settings.service.clone(),
                dry_run: settings.dry_run,
                ..Report::default()
            },
            settings,
            run: None,
            pending: Vec::new(),
            known: HashMap::new(),
            projections: ProjectionRunner::for_all(pool.clone()).await?,
            last_type: None,
            in_flight: VecDeque::new(),
        })
    }

    /// The report so far (adapters record their own failures and warnings).
    pub fn report(&mut self) -> &mut Report {
        &mut self.report
    }

    /// Whether this run appends nothing.
    pub fn dry_run(&self) -> bool {
        self.settings.dry_run
    }

    /// Apply one record; `table` names where it came from for the report.
    pub async fn add(&mut self, table: &str, record: SourceRecord) -> Result<(), ImportError> {
        self.start(&record.source).await?;
        let source = self.run.as_ref().map(|r| r.source.as_str());
        if source != Some(record.source.as_str()) {
            self.report.fail(
                record.record_type,
                table,
                &record.source_id,
                "source",
                format!("one run imports one source ({})", source.unwrap_or("-")),
            );
            return Ok(());
        }
        let same_kind = self
            .pending
            .first()
            .is_none_or(|(_, first)| first.record_type == record.record_type);
        if !same_kind || self.pending.len() >= CHUNK {
            self.flush().await?;
        }
        self.pending.push((table.to_string(), record));
        Ok(())
    }

    /// Apply what is pending and record the run's completion: from then on
    /// its subscriptions may be billed.
    pub async fn finish(mut self) -> Result<Report, ImportError> {
        self.flush().await?;
        self.settle_usage().await?;
        if let Some(run) = &self.run {
            if !self.settings.dry_run {
                let event = ImportRunEvent::ImportRunCompleted {
                    counts: self.report.counts_json(),
                    completed_at: Utc::now(),
                };
                self.append_run_event(run, 2, &event).await?;
                self.projections
                    .catch_up()
                    .await
                    .map_err(|e| ImportError::Source(format!("the ledger's projections: {e}")))?;
            }
        }
        Ok(self.report)
    }

    /// The run's start, appended with its first record.
    async fn start(&mut self, source: &str) -> Result<(), ImportError> {
        if self.run.is_some() {
            return Ok(());
        }
        let id = Uuid::now_v7();
        let run = Run {
            id,
            source: source.to_string(),
            metadata: CommandMetadata {
                request_id: format!("import-{id}"),
                ..CommandMetadata::cli()
            },
        };
        self.report.source = Some(source.to_string());
        if !self.settings.dry_run {
            let event = ImportRunEvent::ImportRunStarted {
                run_id: id,
                service: self.settings.service.clone(),
                source: source.to_string(),
                options: self.settings.options.clone(),
                by: self.settings.by.clone(),
                started_at: Utc::now(),
            };
            self.append_run_event(&run, 1, &event).await?;
            self.report.run_id = Some(id);
        }
        self.run = Some(run);
        Ok(())
    }

    async fn append_run_event(
        &self,
        run: &Run,
        sequence: i64,
        event: &ImportRunEvent,
    ) -> Result<(), ImportError> {
        let mut conn = self.pool.acquire().await?;
        append_events(
            &mut conn,
            IMPORT_RUN_TYPE,
            &[NewEvent {
                stream: format!("{}/{}", self.settings.service, run.id),
                sequence,
                event_type: cqrs_es::DomainEvent::event_type(event),
                payload: serde_json::to_value(event).expect("run events serialize"),
            }],
            run.metadata.clone(),
            OnConflict::Fail,
        )
        .await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ImportError> {
        let chunk = std::mem::take(&mut self.pending);
        let Some((_, first)) = chunk.first() else {
            return Ok(());
        };
        if self.last_type != Some(first.record_type) {
            self.settle_usage().await?;
            self.projections
                .catch_up()
                .await
                .map_err(|e| ImportError::Source(format!("the ledger's projections: {e}")))?;
            self.last_type = Some(first.record_type);
        }
        match first.record_type {
            RecordType::Usage => self.flush_usage(chunk).await,
            _ => self.flush_facts(chunk).await,
        }
    }

    fn run(&self) -> &Run {
        self.run.as_ref().expect("a record starts the run")
    }

    fn remember(&mut self, record_type: RecordType, key: String) {
        self.known.entry(record_type).or_default().insert(key);
    }

    fn imports(&self, record_type: RecordType, key: &str) -> bool {
        self.known
            .get(&record_type)
            .is_some_and(|keys| keys.contains(key))
    }

    /// Records with a fact stream of their own: compare with the last fact,
    /// apply what is new (or changed, when asked), then append the facts.
    async fn flush_facts(&mut self, chunk: Vec<(String, SourceRecord)>) -> Result<(), ImportError> {
        let service = self.settings.service.clone();
        let streams: Vec<String> = chunk.iter().map(|(_, r)| r.stream_id(&service)).collect();
        let rows: Vec<(String, i64, Value)> = sqlx::query_as(
            "SELECT DISTINCT ON (aggregate_id) aggregate_id, sequence, payload::jsonb FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = ANY($2) ORDER BY aggregate_id, sequence DESC",
        )
        .bind(IMPORTED_RECORD_TYPE)
        .bind(&streams)
        .fetch_all(&self.pool)
        .await?;
        let mut last: HashMap<String, (i64, Map<String, Value>)> = HashMap::new();
        for (stream, sequence, payload) in rows {
            let fact: ImportedRecordEvent = serde_json::from_value(payload)
                .map_err(|e| ImportError::Source(format!("imported fact {stream}: {e}")))?;
            let record = SourceRecord::from_value(fact.record().clone())
                .map_err(|e| ImportError::Source(format!("imported fact {stream}: {e}")))?;
            last.insert(stream, (sequence, record.fields));
        }

        let run_id = self.run().id;
        let mut facts: Vec<NewEvent> = Vec::new();
        let mut fresh = 0u64;
        let record_type = chunk[0].1.record_type;
        for ((table, record), stream) in chunk.into_iter().zip(streams) {
            let outcome = match last.get(&stream) {
                None => self.apply(&record, Mode::New).await?,
                Some((sequence, before)) => {
                    let fields = changed_fields(before, &record.fields);
                    if fields.is_empty() {
                        self.report.counts_mut(record_type).unchanged += 1;
                        self.remember_record(&record);
                        continue;
                    }
                    let applied = self.settings.apply_changes && !self.settings.dry_run;
                    if applied {
                        if let Err(refused) = self.apply(&record, Mode::Change(before)).await? {
                            self.report.fail(
                                record_type,
                                &table,
                                &record.source_id,
                                &refused.field,
                                refused.reason,
                            );
                            continue;
                        }
                        facts.push(NewEvent {
                            stream,
                            sequence: sequence + 1,
                            event_type: "ImportedRecordChanged".into(),
                            payload: serde_json::to_value(
                                ImportedRecordEvent::ImportedRecordChanged {
                                    run_id,
                                    record: record.to_value(),
                                    fields: fields.clone(),
                                },
                            )
                            .expect("facts serialize"),
                        });
                    }
                    self.report.counts_mut(record_type).changed += 1;
                    self.report.changes.push(report::Change {
                        record_type,
                        source_id: record.source_id.clone(),
                        fields,
                        applied,
                    });
                    self.remember_record(&record);
                    continue;
                }
            };
            match outcome {
                Err(refused) => self.report.fail(
                    record_type,
                    &table,
                    &record.source_id,
                    &refused.field,
                    refused.reason,
                ),
                Ok(()) => {
                    fresh += 1;
                    self.remember_record(&record);
                    facts.push(NewEvent {
                        stream,
                        sequence: 1,
                        event_type: "RecordImported".into(),
                        payload: serde_json::to_value(ImportedRecordEvent::RecordImported {
                            run_id,
                            record: record.to_value(),
                        })
                        .expect("facts serialize"),
                    });
                }
            }
        }
        let written = if self.settings.dry_run || facts.is_empty() {
            fresh
        } else {
            let mut conn = self.pool.acquire().await?;
            let metadata = self.run().metadata.clone();
            // Another run may have appended some of them first: each fact once.
            let written = append_events(
                &mut conn,
                IMPORTED_RECORD_TYPE,
                &facts,
                metadata,
                OnConflict::Skip,
            )
            .await?;
            let changes = facts.iter().filter(|f| f.sequence > 1).count() as u64;
            written.saturating_sub(changes)
        };
        let counts = self.report.counts_mut(record_type);
        counts.new += written.min(fresh);
        counts.unchanged += fresh.saturating_sub(written);
        Ok(())
    }

    fn remember_record(&mut self, record: &SourceRecord) {
        let key = match record.record_type {
            RecordType::BillableMetric | RecordType::Plan => record.text("code"),
            RecordType::Customer | RecordType::Subscription => record.text("external_id"),
            RecordType::Usage | RecordType::ExternalInvoice => None,
        };
        if let Some(key) = key {
            self.remember(record.record_type, key);
        }
    }

    /// A record's domain effect, by the commands the API would run. `Ok(Err)`:
    /// the record is refused.
    async fn apply(
        &self,
        record: &SourceRecord,
        mode: Mode<'_>,
    ) -> Result<Result<(), Refused>, ImportError> {
        match record.record_type {
            RecordType::BillableMetric => self.apply_metric(record).await,
            RecordType::Customer => self.apply_customer(record).await,
            RecordType::Plan => self.apply_plan(record, mode).await,
            RecordType::Subscription => self.apply_subscription(record, mode).await,
            RecordType::ExternalInvoice => self.check_external_invoice(record).await,
            RecordType::Usage => unreachable!("usage is appended by flush_usage"),
        }
    }

    fn scoped(&self, key: &str) -> String {
        aggregates::scoped_id(&self.settings.service, key)
    }

    async fn apply_metric(
        &self,
        record: &SourceRecord,
    ) -> Result<Result<(), Refused>, ImportError> {
        let input: MetricInput = match record.fields_as() {
            Ok(input) => input,
            Err(errors) => return Ok(Err(Refused::from_fields(&errors))),
        };
        let proposed = match validate_metric(Uuid::nil(), input.clone()) {
            Ok(definition) => definition,
            Err(error) => return Ok(Err(Refused::from_catalog(&error))),
        };
        let id = self.scoped(&proposed.code);
        let existing: BillableMetric = store::load(&self.pool, &id).await.map_err(storage)?;
        if let Some(current) = existing.definition() {
            let same = aggregates::billable_metric::MetricDefinition {
                lago_id: current.lago_id,
                ..proposed
            } == *current;
            return Ok(if same {
                Ok(())
            } else {
                Err(Refused::new(
                    "code",
                    "a metric with this code exists with another definition",
                ))
            });
        }
        if self.settings.dry_run {
            return Ok(Ok(()));
        }
        let command = BillableMetricCommand::Create {
            lago_id: Uuid::new_v4(),
            input,
        };
        let handler = &self.commands.billable_metrics;
        match store::execute(handler, &id, command, self.run().metadata.clone()).await {
            Ok(()) => Ok(Ok(())),
            // Another run created it first: the same metric is no refusal.
            Err(AggregateError::UserError(_))
                if Box::pin(self.apply_metric(record)).await?.is_ok() =>
            {
                Ok(Ok(()))
            }
            Err(error) => refused_command(error),
        }
    }

    async fn unknown_tax_codes(
        &self,
        codes: Option<&Vec<String>>,
    ) -> Result<Vec<String>, ImportError> {
        let service = &self.settings.service;
        Ok(projections::catalog::unknown_tax_codes(&self.pool, service, codes).await?)
    }

    async fn apply_customer(
        &self,
        record: &SourceRecord,
    ) -> Result<Result<(), Refused>, ImportError> {
        let Some(external_id) = record.text("external_id") else {
            return Ok(Err(Refused::new("external_id", "value_is_mandatory")));
        };
        let mut input: CustomerInput = match record.fields_as() {
            Ok(input) => input,
            Err(errors) => return Ok(Err(Refused::from_fields(&errors))),
        };
        let tax_codes = input.tax_codes.clone().flatten();
        input.unknown_tax_codes = self.unknown_tax_codes(tax_codes.as_ref()).await?;
        if self.settings.dry_run {
            if !input.unknown_tax_codes.is_empty() {
                return Ok(Err(Refused::new("tax_codes", "tax_not_found")));
            }
            return Ok(updated_profile(&CustomerProfile::default(), &input)
                .map(|_| ())
                .map_err(|e| Refused::from_catalog(&e)));
        }
        let command = CustomerCommand::Upsert {
            lago_id: Uuid::new_v4(),
            external_id: external_id.clone(),
            input,
        };
        let handler = &self.commands.customers;
        let id = self.scoped(&external_id);
        match store::execute(handler, &id, command, self.run().metadata.clone()).await {
            Ok(()) => Ok(Ok(())),
            Err(error) => refused_command(error),
        }
    }

    /// A plan record's input: charges name their metric by
    /// `billable_metric_code`, resolved inside the service.
    async fn plan_input(
        &self,
        record: &SourceRecord,
    ) -> Result<Result<PlanInput, Refused>, ImportError> {
        let mut fields = record.fields.clone();
        let mut codes = Vec::new();
        if let Some(Value::Array(charges)) = fields.get_mut("charges") {
            for (index, charge) in charges.iter_mut().enumerate() {
                let code = charge
                    .get("billable_metric_code")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let Some(code) = code else {
                    let field = format!("charges[{index}].billable_metric_code");
                    return Ok(Err(Refused::new(&field, "value_is_mandatory")));
                };
                if let Some(object) = charge.as_object_mut() {
                    object.insert(
                        "billable_metric_id".into(),
                        Value::String(Uuid::nil().to_string()),
                    );
                }
                codes.push(code);
            }
        }
        let patched = SourceRecord {
            fields,
            ..record.clone()
        };
        let mut input: PlanInput = match patched.fields_as() {
            Ok(input) => input,
            Err(errors) => return Ok(Err(Refused::from_fields(&errors))),
        };
        for (index, (charge, code)) in input.charges.iter_mut().flatten().zip(&codes).enumerate() {
            let row: Option<(Uuid, String)> = sqlx::query_as(
                "SELECT lago_id, resource->>'aggregation_type' FROM billable_metrics \
                 WHERE service_code = $1 AND code = $2",
            )
            .bind(&self.settings.service)
            .bind(code)
            .fetch_optional(&self.pool)
            .await?;
            let metric = match row {
                Some((lago_id, aggregation)) => {
                    AggregationType::parse(&aggregation).map(|a| (lago_id, a))
                }
                // A dry run has not created this run's metrics: stand-ins.
                None if self.settings.dry_run && self.imports(RecordType::BillableMetric, code) => {
                    Some((Uuid::nil(), AggregationType::SumAgg))
                }
                None => None,
            };
            let Some((lago_id, aggregation_type)) = metric else {
                let field = format!("charges[{index}].billable_metric_code");
                return Ok(Err(Refused::new(&field, "billable_metric_not_found")));
            };
            charge.billable_metric_id = Some(lago_id.to_string());
            charge.metric = Some(MetricRef {
                lago_id,
                code: code.clone(),
                aggregation_type,
            });
        }
        input.unknown_tax_codes = self.unknown_tax_codes(input.tax_codes.as_ref()).await?;
        Ok(Ok(input))
    }

    async fn apply_plan(
        &self,
        record: &SourceRecord,
        mode: Mode<'_>,
    ) -> Result<Result<(), Refused>, ImportError> {
        let Some(code) = record.text("code") else {
            return Ok(Err(Refused::new("code", "value_is_mandatory")));
        };
        let input = match self.plan_input(record).await? {
            Ok(input) => input,
            Err(refused) => return Ok(Err(refused)),
        };
        let id = self.scoped(&code);
        let plan: Plan = store::load(&self.pool, &id).await.map_err(storage)?;
        let command = match (plan.current(), mode) {
            (None, _) => {
                if let Err(error) = validate_plan(Uuid::nil(), 1, input.clone(), None) {
                    return Ok(Err(Refused::from_catalog(&error)));
                }
                PlanCommand::Create {
                    lago_id: Uuid::new_v4(),
                    input,
                }
            }
            (Some(current), mode) => {
                let next = match validate_plan(
                    current.lago_id,
                    current.version + 1,
                    input.clone(),
                    Some(current),
                ) {
                    Ok(next) => next,
                    Err(error) => return Ok(Err(Refused::from_catalog(&error))),
                };
                if same_terms(current, &next) {
                    return Ok(Ok(()));
                }
                if matches!(mode, Mode::New) {
                    return Ok(Err(Refused::new(
                        "code",
                        "a plan with this code exists in the ledger with other terms",
                    )));
                }
                PlanCommand::Update { input }
            }
        };
        if self.settings.dry_run {
            return Ok(Ok(()));
        }
        let handler = &self.commands.plans;
        let creating = matches!(command, PlanCommand::Create { .. });
        match store::execute(handler, &id, command, self.run().metadata.clone()).await {
            Ok(()) => Ok(Ok(())),
            // Another run created it first: the same plan is no refusal.
            Err(AggregateError::UserError(_))
                if creating && Box::pin(self.apply_plan(record, Mode::New)).await?.is_ok() =>
            {
                Ok(Ok(()))
            }
            Err(error) => refused_command(error),
        }
    }

    async fn apply_subscription(
        &self,
        record: &SourceRecord,
        mode: Mode<'_>,
    ) -> Result<Result<(), Refused>, ImportError> {
        let Some(external_id) = record.text("external_id") else {
            return Ok(Err(Refused::new("external_id", "value_is_mandatory")));
        };
        let mut input: SubscriptionInput = match record.fields_as() {
            Ok(input) => input,
            Err(errors) => return Ok(Err(Refused::from_fields(&errors))),
        };
        let terminated_at = match record.fields.get("terminated_at") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => match DateTime::parse_from_rfc3339(text.trim()) {
                Ok(at) => Some(at.with_timezone(&Utc)),
                Err(_) => return Ok(Err(Refused::new("terminated_at", "invalid_date"))),
            },
            Some(_) => return Ok(Err(Refused::new("terminated_at", "invalid_date"))),
        };
        let customer_id = input.external_customer_id.clone().unwrap_or_default();
        let plan_code = input.plan_code.clone().unwrap_or_default();
        let customer: Customer = store::load(&self.pool, &self.scoped(&customer_id))
            .await
            .map_err(storage)?;
        let plan: Plan = store::load(&self.pool, &self.scoped(&plan_code))
            .await
            .map_err(storage)?;
        input.customer = customer.reference();
        input.plan = plan.current().map(PlanRef::from);
        let id = self.scoped(&external_id);
        let existing: Subscription = store::load(&self.pool, &id).await.map_err(storage)?;
        let metadata = self.run().metadata.clone();
        let handler = &self.commands.subscriptions;

        if let Mode::Change(before) = mode {
            // What can change after the import: the plan and the termination.
            let mut commands = Vec::new();
            for field in changed_fields(before, &record.fields) {
                match field.as_str() {
                    "plan_code" => commands.push(SubscriptionCommand::ChangePlan {
                        plan: input.plan.clone(),
                        at: Utc::now(),
                    }),
                    "terminated_at" => match terminated_at {
                        Some(at) => commands.push(SubscriptionCommand::Terminate { at }),
                        None => {
                            return Ok(Err(Refused::new(
                                "terminated_at",
                                "a terminated subscription stays terminated",
                            )))
                        }
                    },
                    other => {
                        return Ok(Err(Refused::new(other, "cannot change once imported")));
                    }
                }
            }
            for command in commands {
                if let Err(error) = store::execute(handler, &id, command, metadata.clone()).await {
                    return refused_command(error);
                }
            }
            return Ok(Ok(()));
        }

        if self.settings.dry_run {
            let customer_known =
                input.customer.is_some() || self.imports(RecordType::Customer, &customer_id);
            let plan_known = input.plan.is_some() || self.imports(RecordType::Plan, &plan_code);
            if !customer_known {
                return Ok(Err(Refused::new(
                    "external_customer_id",
                    "customer_not_found",
                )));
            }
            if !plan_known {
                return Ok(Err(Refused::new("plan_code", "plan_not_found")));
            }
            return Ok(Ok(()));
        }
        if existing.terms().is_none() {
            input.import = Some(ImportOrigin {
                source: record.source.clone(),
                run_id: self.run().id,
            });
        }
        let command = SubscriptionCommand::Create {
            lago_id: Uuid::new_v4(),
            input: Box::new(input),
            now: Utc::now(),
        };
        if let Err(error) = store::execute(handler, &id, command, metadata.clone()).await {
            // Another run created it first (and may have terminated it):
            // the same customer and plan is this record, imported.
            let now: Subscription = store::load(&self.pool, &id).await.map_err(storage)?;
            let same = now.terms().is_some_and(|terms| {
                terms.customer.external_id == customer_id && terms.plan.code == plan_code
            });
            if !same {
                return refused_command(error);
            }
        }
        if let Some(at) = terminated_at {
            let terminate = SubscriptionCommand::Terminate { at };
            match store::execute(handler, &id, terminate, metadata).await {
                // Already terminated (a re-run after a crash): done.
                Err(AggregateError::UserError(CatalogError::InvalidStatus(_))) | Ok(()) => {}
                Err(error) => return refused_command(error),
            }
        }
        Ok(Ok(()))
    }

    /// An external invoice's fact is its effect; what it names must exist.
    async fn check_external_invoice(
        &self,
        record: &SourceRecord,
    ) -> Result<Result<(), Refused>, ImportError> {
        let invoice = match validate_external_invoice(&record.fields) {
            Ok(invoice) => invoice,
            Err(errors) => return Ok(Err(Refused::from_fields(&errors))),
        };
        let customer: Customer =
            store::load(&self.pool, &self.scoped(&invoice.external_customer_id))
                .await
                .map_err(storage)?;
        if customer.reference().is_none()
            && !self.imports(RecordType::Customer, &invoice.external_customer_id)
        {
            return Ok(Err(Refused::new(
                "external_customer_id",
                "customer_not_found",
            )));
        }
        if let Some(subscription) = &invoice.external_subscription_id {
            let found: Subscription = store::load(&self.pool, &self.scoped(subscription))
                .await
                .map_err(storage)?;
            if found.terms().is_none() && !self.imports(RecordType::Subscription, subscription) {
                return Ok(Err(Refused::new(
                    "external_subscription_id",
                    "subscription_not_found",
                )));
            }
        }
        Ok(Ok(()))
    }

    /// Usage records: usage events, appended as a backfill. A record whose
    /// transaction id is recorded with other content is `changed` (a usage
    /// event, once recorded, is never rewritten).
    async fn flush_usage(&mut self, chunk: Vec<(String, SourceRecord)>) -> Result<(), ImportError> {
        let mut rows: Vec<UsageRow> = Vec::with_capacity(chunk.len());
        for (table, record) in chunk {
            match record.fields_as::<SentUsage>() {
                Ok(mut sent) => {
                    if sent.transaction_id.is_none() {
                        sent.transaction_id = Some(record.source_id.clone());
                    }
                    rows.push((table, record.source_id, sent));
                }
                Err(errors) => {
                    let refused = Refused::from_fields(&errors);
                    self.report.fail(
                        RecordType::Usage,
                        &table,
                        &record.source_id,
                        &refused.field,
                        refused.reason,
                    );
                }
            }
        }
        if self.settings.dry_run {
            return self.check_usage(rows).await;
        }
        if rows.is_empty() {
            return Ok(());
        }
        // Chunks are appended a few at a time; a chunk's outcome is counted
        // when it is settled (always before the run's completion).
        let task = self.append_usage(&rows);
        self.in_flight.push_back((rows, task));
        while self.in_flight.len() >= USAGE_IN_FLIGHT {
            self.settle_oldest_usage().await?;
        }
        Ok(())
    }

    fn append_usage(&self, rows: &[UsageRow]) -> UsageAppend {
        let batch: Vec<SentUsage> = rows.iter().map(|(_, _, sent)| sent.clone()).collect();
        let (ingest, service, metadata) = (
            self.ingest.clone(),
            self.settings.service.clone(),
            self.run().metadata.clone(),
        );
        tokio::spawn(async move {
            ingest
                .record_import(&service, batch, metadata, Utc::now())
                .await
        })
    }

    /// Count every usage chunk still in flight.
    async fn settle_usage(&mut self) -> Result<(), ImportError> {
        while !self.in_flight.is_empty() {
            self.settle_oldest_usage().await?;
        }
        Ok(())
    }

    async fn settle_oldest_usage(&mut self) -> Result<(), ImportError> {
        let Some((mut rows, task)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let mut outcome = task
            .await
            .map_err(|e| ImportError::Source(format!("usage append: {e}")))?;
        for _ in 0..3 {
            match outcome {
                Ok(recorded) => {
                    let counts = self.report.counts_mut(RecordType::Usage);
                    for event in recorded {
                        if event.new {
                            counts.new += 1;
                        } else {
                            counts.unchanged += 1;
                        }
                    }
                    return Ok(());
                }
                Err(IngestError::Invalid(errors)) => {
                    let mut kept = Vec::with_capacity(rows.len());
                    for (index, row) in rows.into_iter().enumerate() {
                        match errors.get(&index) {
                            None => kept.push(row),
                            Some(field_errors) => self.usage_refused(row, field_errors).await?,
                        }
                    }
                    rows = kept;
                    if rows.is_empty() {
                        return Ok(());
                    }
                    outcome = self
                        .append_usage(&rows)
                        .await
                        .map_err(|e| ImportError::Source(format!("usage append: {e}")))?;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ImportError::Source("usage kept being refused".into()))
    }

    async fn usage_refused(
        &mut self,
        (table, source_id, sent): UsageRow,
        errors: &FieldErrors,
    ) -> Result<(), ImportError> {
        let conflict = errors
            .fields()
            .get("transaction_id")
            .is_some_and(|codes| codes.iter().any(|c| c == "value_already_exist"));
        if conflict {
            let fields = self.usage_changes(&sent).await?;
            self.report.counts_mut(RecordType::Usage).changed += 1;
            self.report.changes.push(report::Change {
                record_type: RecordType::Usage,
                source_id,
                fields,
                applied: false,
            });
        } else {
            let refused = Refused::from_fields(errors);
            self.report.fail(
                RecordType::Usage,
                &table,
                &source_id,
                &refused.field,
                refused.reason,
            );
        }
        Ok(())
    }

    /// The fields of a usage event recorded under `sent`'s transaction id
    /// that differ from `sent`.
    async fn usage_changes(&self, sent: &SentUsage) -> Result<Vec<String>, ImportError> {
        let subscription: Option<Uuid> = sqlx::query_scalar(
            "SELECT lago_id FROM subscriptions WHERE service_code = $1 AND external_id = $2",
        )
        .bind(&self.settings.service)
        .bind(sent.external_subscription_id.as_deref().unwrap_or_default())
        .fetch_optional(&self.pool)
        .await?;
        let original: Option<String> = match subscription {
            None => None,
            Some(lago_id) => {
                let stream = usage_stream_id(
                    lago_id,
                    sent.code.as_deref().unwrap_or_default(),
                    sent.transaction_id.as_deref().unwrap_or_default(),
                );
                sqlx::query_scalar(
                    "SELECT payload::text FROM events \
                     WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1",
                )
                .bind(USAGE_STREAM_TYPE)
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        let as_map = |sent: &SentUsage| match serde_json::to_value(sent) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        Ok(
            match original.and_then(|p| serde_json::from_str::<UsageEvent>(&p).ok()) {
                Some(UsageEvent::UsageRecorded(original)) => {
                    changed_fields(&as_map(&original.sent), &as_map(sent))
                }
                None => vec!["properties".to_string()],
            },
        )
    }

    /// A dry run's usage: validated against the ledger's subscriptions (or
    /// this run's), compared with what is recorded.
    async fn check_usage(
        &mut self,
        rows: Vec<(String, String, SentUsage)>,
    ) -> Result<(), ImportError> {
        let ids: Vec<String> = rows
            .iter()
            .filter_map(|(_, _, sent)| sent.external_subscription_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let directory =
            crate::usage::directory::directory(&self.pool, &self.settings.service, &ids).await?;
        let now = Utc::now();
        for (table, source_id, sent) in rows {
            let subscription_id = sent.external_subscription_id.clone().unwrap_or_default();
            match directory.get(&subscription_id) {
                Some(entry) => {
                    match validate_usage(
                        Uuid::nil(),
                        sent.clone(),
                        Some(&entry.usage),
                        UsageLimits::backfill(),
                        now,
                    ) {
                        Err(errors) => {
                            let refused = Refused::from_fields(&errors);
                            self.report.fail(
                                RecordType::Usage,
                                &table,
                                &source_id,
                                &refused.field,
                                refused.reason,
                            );
                        }
                        Ok(record) => {
                            let stream = usage_stream_id(
                                entry.usage.lago_id,
                                record.sent.code.as_deref().unwrap_or_default(),
                                record.sent.transaction_id.as_deref().unwrap_or_default(),
                            );
                            let recorded: Option<Value> = sqlx::query_scalar(
                                "SELECT (payload -> 'UsageRecorded' -> 'sent')::jsonb FROM events \
                                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1",
                            )
                            .bind(USAGE_STREAM_TYPE)
                            .bind(&stream)
                            .fetch_optional(&self.pool)
                            .await?;
                            let counts = self.report.counts_mut(RecordType::Usage);
                            match recorded {
                                None => counts.new += 1,
                                Some(Value::Object(before)) => {
                                    let after = match serde_json::to_value(&sent) {
                                        Ok(Value::Object(map)) => map,
                                        _ => Map::new(),
                                    };
                                    let fields = changed_fields(&before, &after);
                                    if fields.is_empty() {
                                        counts.unchanged += 1;
                                    } else {
                                        counts.changed += 1;
                                        self.report.changes.push(report::Change {
                                            record_type: RecordType::Usage,
                                            source_id,
                                            fields,
                                            applied: false,
                                        });
                                    }
                                }
                                Some(_) => counts.unchanged += 1,
                            }
                        }
                    }
                }
                None if self.imports(RecordType::Subscription, &subscription_id) => {
                    self.report.counts_mut(RecordType::Usage).new += 1;
                }
                None => self.report.fail(
                    RecordType::Usage,
                    &table,
                    &source_id,
                    "external_subscription_id",
                    "subscription_not_found",
                ),
            }
        }
        Ok(())
    }
}

/// How a record meets the ledger.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Not imported before.
    New,
    /// Imported before as `before`; the source changed since.
    Change(&'a Map<String, Value>),
}

/// Two plan versions bill the same (their charges' ids aside).
fn same_terms(current: &PlanDefinition, next: &PlanDefinition) -> bool {
    let mut next = next.clone();
    next.version = current.version;
    for (charge, existing) in next.charges.iter_mut().zip(&current.charges) {
        charge.lago_id = existing.lago_id;
    }
    next == *current
}

fn storage<E: std::error::Error>(error: AggregateError<E>) -> ImportError {
    ImportError::Source(format!("the ledger's log: {error}"))
}
