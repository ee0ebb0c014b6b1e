//! Imports: records of a system the ledger takes over, in the neutral
//! import format (JSON Lines, one record per line; `docs/imports.md`).
//!
//! Every record names its `type`, its `source` (e.g. `nexacloud`) and its
//! `source_id` there; the rest are the fields of the matching
//! Lago-compatible resource. Each imported fact is keyed by (service,
//! source, type, source id): the stream [`imported_record_stream`] of type
//! [`IMPORTED_RECORD_TYPE`] holds the record as imported (sequence 1) and
//! every change applied since, so a second import of the same record
//! appends nothing. Usage is the exception: a usage record's fact is the
//! usage event itself, keyed by its transaction id like every usage event.
//!
//! Each run is a stream of its own ([`IMPORT_RUN_TYPE`]): who ran it, from
//! which source, with which options, and its counts once complete.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::refusal::{codes, FieldErrors};
use crate::wire::{decimal_number_or_string, whole_number};

/// The aggregate type of imported facts.
pub const IMPORTED_RECORD_TYPE: &str = "ImportedRecord";
/// The aggregate type of import runs.
pub const IMPORT_RUN_TYPE: &str = "ImportRun";

/// The kinds of record, in the order an import applies them (what a record
/// refers to comes before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordType {
    /// A billable metric (`/billable_metrics`).
    BillableMetric,
    /// A customer (`/customers`).
    Customer,
    /// A plan (`/plans`), its charges naming metrics by code.
    Plan,
    /// A subscription (`/subscriptions`), with `metadata` and `terminated_at`.
    Subscription,
    /// A usage event (`/events`).
    Usage,
    /// An invoice the source issued, with its lines (for reconciliation).
    ExternalInvoice,
}

impl RecordType {
    /// Every type, in import order.
    pub const ALL: [RecordType; 6] = [
        Self::BillableMetric,
        Self::Customer,
        Self::Plan,
        Self::Subscription,
        Self::Usage,
        Self::ExternalInvoice,
    ];

    /// The name in the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BillableMetric => "billable_metric",
            Self::Customer => "customer",
            Self::Plan => "plan",
            Self::Subscription => "subscription",
            Self::Usage => "usage",
            Self::ExternalInvoice => "external_invoice",
        }
    }

    /// Parse a name of the format.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// One record of the format.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    /// What it is.
    pub record_type: RecordType,
    /// The system it comes from.
    pub source: String,
    /// Its id in that system.
    pub source_id: String,
    /// The resource's fields (everything but `type`, `source`, `source_id`).
    pub fields: Map<String, Value>,
}

impl SourceRecord {
    /// A record of `record_type` from `source`.
    pub fn new(
        record_type: RecordType,
        source: &str,
        source_id: impl Into<String>,
        fields: Value,
    ) -> Self {
        let fields = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        Self {
            record_type,
            source: source.to_string(),
            source_id: source_id.into(),
            fields,
        }
    }

    /// Read a record from its JSON object; refusals name the field.
    pub fn from_value(value: Value) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::default();
        let Value::Object(mut fields) = value else {
            errors.add("record", "value_is_not_an_object");
            return Err(errors);
        };
        let mut text = |name: &str| match fields.remove(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            None | Some(Value::Null) => {
                errors.add(name, codes::MANDATORY);
                None
            }
            Some(Value::String(_)) => {
                errors.add(name, codes::MANDATORY);
                None
            }
            Some(_) => {
                errors.add(name, codes::INVALID);
                None
            }
        };
        let (kind, source, source_id) = (text("type"), text("source"), text("source_id"));
        let record_type = kind.as_deref().and_then(|k| {
            let parsed = RecordType::parse(k);
            if parsed.is_none() {
                errors.add("type", codes::INVALID);
            }
            parsed
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            record_type: record_type.expect("checked"),
            source: source.expect("checked"),
            source_id: source_id.expect("checked"),
            fields,
        })
    }

    /// The record as one object of the format.
    pub fn to_value(&self) -> Value {
        let mut object = Map::new();
        object.insert("type".into(), self.record_type.as_str().into());
        object.insert("source".into(), self.source.clone().into());
        object.insert("source_id".into(), self.source_id.clone().into());
        for (key, value) in &self.fields {
            object.insert(key.clone(), value.clone());
        }
        Value::Object(object)
    }

    /// The stream that holds this record's fact in `service`.
    pub fn stream_id(&self, service: &str) -> String {
        imported_record_stream(service, &self.source, self.record_type, &self.source_id)
    }

    /// A text field, trimmed (`None` when absent, null or empty).
    pub fn text(&self, field: &str) -> Option<String> {
        match self.fields.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            _ => None,
        }
    }

    /// The record's fields as `T` (a resource's input type).
    pub fn fields_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, FieldErrors> {
        serde_json::from_value(Value::Object(self.fields.clone())).map_err(|error| {
            let mut errors = FieldErrors::default();
            errors.add(field_of(&error.to_string()), codes::INVALID);
            errors
        })
    }
}

/// The field a serde error names (`unknown`: none named).
fn field_of(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "record".to_string())
}

/// The stream id of an imported fact: `{service}/{source}/{type}/{source_id}`.
pub fn imported_record_stream(
    service: &str,
    source: &str,
    record_type: RecordType,
    source_id: &str,
) -> String {
    format!("{service}/{source}/{}/{source_id}", record_type.as_str())
}

/// The fields whose values differ between two versions of a record
/// (numbers compared as numbers), sorted.
pub fn changed_fields(before: &Map<String, Value>, after: &Map<String, Value>) -> Vec<String> {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|key| !same_value(before.get(*key), after.get(*key)))
        .map(|key| key.to_string())
        .collect()
}

fn same_value(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None | Some(Value::Null), None | Some(Value::Null)) => true,
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            decimal_number_or_string(&Value::Number(x.clone()))
                == decimal_number_or_string(&Value::Number(y.clone()))
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(Some(x), Some(y)))
        }
        (Some(Value::Object(x)), Some(Value::Object(y))) => changed_fields(x, y).is_empty(),
        (a, b) => a == b,
    }
}

/// Facts about an imported record (stream [`imported_record_stream`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ImportedRecordEvent {
    /// The record was imported (sequence 1).
    RecordImported {
        /// The run that imported it.
        run_id: Uuid,
        /// The record as imported (the format's object).
        record: Value,
    },
    /// The source's record changed and the change was applied
    /// (`--apply-changes`).
    ImportedRecordChanged {
        /// The run that applied it.
        run_id: Uuid,
        /// The record as it now is.
        record: Value,
        /// The fields that changed.
        fields: Vec<String>,
    },
}

impl ImportedRecordEvent {
    /// The record this fact leaves in place.
    pub fn record(&self) -> &Value {
        match self {
            Self::RecordImported { record, .. } | Self::ImportedRecordChanged { record, .. } => {
                record
            }
        }
    }
}

impl DomainEvent for ImportedRecordEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RecordImported { .. } => "RecordImported",
            Self::ImportedRecordChanged { .. } => "ImportedRecordChanged",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// Facts about an import run (stream `{service}/{run_id}` of type
/// [`IMPORT_RUN_TYPE`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ImportRunEvent {
    /// A run started.
    ImportRunStarted {
        /// Its id.
        run_id: Uuid,
        /// The service imported into.
        service: String,
        /// The source system.
        source: String,
        /// The options it was run with (never a password).
        options: Value,
        /// Who ran it.
        by: String,
        /// When.
        started_at: DateTime<Utc>,
    },
    /// It read every record of its source (failed rows included).
    ImportRunCompleted {
        /// Per record type: new, unchanged, changed, failed, skipped.
        counts: Value,
        /// When.
        completed_at: DateTime<Utc>,
    },
}

impl DomainEvent for ImportRunEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ImportRunStarted { .. } => "ImportRunStarted",
            Self::ImportRunCompleted { .. } => "ImportRunCompleted",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// What an imported subscription carries: where it came from, so it is not
/// billed before the run that brought its history completes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOrigin {
    /// The source system.
    pub source: String,
    /// The run that created it.
    pub run_id: Uuid,
}

/// The statuses an external invoice may have.
pub const EXTERNAL_INVOICE_STATUSES: [&str; 6] = [
    "draft",
    "open",
    "finalized",
    "paid",
    "void",
    "uncollectible",
];

/// An invoice the source system issued: its actual billing, which the
/// reconciliation compares with the ledger's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalInvoice {
    /// The source's invoice number.
    pub number: String,
    /// The customer.
    pub external_customer_id: String,
    /// The subscription; `None` for a one-off invoice (a fee, a credit).
    pub external_subscription_id: Option<String>,
    /// First day billed.
    pub from_date: Option<NaiveDate>,
    /// Last day billed.
    pub to_date: Option<NaiveDate>,
    /// One of [`EXTERNAL_INVOICE_STATUSES`].
    pub status: String,
    /// ISO 4217.
    pub currency: String,
    /// Before tax, in cents.
    pub fees_amount_cents: i64,
    /// Tax, in cents.
    pub taxes_amount_cents: i64,
    /// Total, in cents.
    pub total_amount_cents: i64,
    /// Its lines.
    pub lines: Vec<ExternalInvoiceLine>,
}

/// A line of an external invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalInvoiceLine {
    /// The source's kind (e.g. `plan`, `usage`, `fee`, `credit`).
    pub kind: String,
    /// Its text.
    pub description: String,
    /// Units billed (exact decimal).
    pub units: Decimal,
    /// Price per unit in the currency (exact decimal).
    pub unit_amount: Decimal,
    /// The line's amount, in cents.
    pub amount_cents: i64,
}

/// Validate an `external_invoice` record's fields.
pub fn validate_external_invoice(
    fields: &Map<String, Value>,
) -> Result<ExternalInvoice, FieldErrors> {
    let mut errors = FieldErrors::default();
    let text = |errors: &mut FieldErrors, name: &str, required: bool| match fields.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        None | Some(Value::Null) if !required => None,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            errors.add(name, codes::MANDATORY);
            None
        }
        Some(_) => {
            errors.add(name, codes::INVALID);
            None
        }
    };
    let date = |errors: &mut FieldErrors, name: &str| {
        let text = text(errors, name, false)?;
        match text.parse::<NaiveDate>() {
            Ok(date) => Some(date),
            Err(_) => {
                errors.add(name, "invalid_date");
                None
            }
        }
    };
    let cents = |errors: &mut FieldErrors, name: String, value: Option<&Value>| match value {
        None | Some(Value::Null) => {
            errors.add(name, codes::MANDATORY);
            None
        }
        Some(value) => {
            let parsed = whole_number(value);
            if parsed.is_none() {
                errors.add(name, codes::INVALID_AMOUNT);
            }
            parsed
        }
    };
    let number = text(&mut errors, "number", true);
    let customer = text(&mut errors, "external_customer_id", true);
    let subscription = text(&mut errors, "external_subscription_id", false);
    let from_date = date(&mut errors, "from_date");
    let to_date = date(&mut errors, "to_date");
    if let (Some(from), Some(to)) = (from_date, to_date) {
        if to < from {
            errors.add("to_date", "invalid_date");
        }
    }
    let status = text(&mut errors, "status", true);
    if let Some(status) = &status {
        if !EXTERNAL_INVOICE_STATUSES.contains(&status.as_str()) {
            errors.add("status", codes::INVALID);
        }
    }
    let currency = text(&mut errors, "currency", true).map(|c| c.to_uppercase());
    if currency
        .as_deref()
        .is_some_and(|c| !crate::plan::valid_currency(c))
    {
        errors.add("currency", codes::INVALID);
    }
    let fees = cents(
        &mut errors,
        "fees_amount_cents".into(),
        fields.get("fees_amount_cents"),
    );
    let taxes = cents(
        &mut errors,
        "taxes_amount_cents".into(),
        fields.get("taxes_amount_cents"),
    );
    let total = cents(
        &mut errors,
        "total_amount_cents".into(),
        fields.get("total_amount_cents"),
    );
    let mut lines = Vec::new();
    match fields.get("lines") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                let field = |name: &str| format!("lines[{index}].{name}");
                let get = |name: &str| item.get(name);
                let line_text = |errors: &mut FieldErrors, name: &str| match get(name) {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => {
                        errors.add(field(name), codes::MANDATORY);
                        None
                    }
                };
                let decimal = |errors: &mut FieldErrors, name: &str| {
                    let parsed = get(name).and_then(decimal_number_or_string);
                    if parsed.is_none() {
                        errors.add(field(name), codes::INVALID);
                    }
                    parsed
                };
                let kind = line_text(&mut errors, "kind");
                let description = line_text(&mut errors, "description");
                let units = decimal(&mut errors, "units");
                let unit_amount = decimal(&mut errors, "unit_amount");
                let amount = cents(&mut errors, field("amount_cents"), get("amount_cents"));
                if let (
                    Some(kind),
                    Some(description),
                    Some(units),
                    Some(unit_amount),
                    Some(amount),
                ) = (kind, description, units, unit_amount, amount)
                {
                    lines.push(ExternalInvoiceLine {
                        kind,
                        description,
                        units: units.normalize(),
                        unit_amount: unit_amount.normalize(),
                        amount_cents: amount,
                    });
                }
            }
        }
        Some(_) => errors.add("lines", codes::INVALID),
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ExternalInvoice {
        number: number.expect("checked"),
        external_customer_id: customer.expect("checked"),
        external_subscription_id: subscription,
        from_date,
        to_date,
        status: status.expect("checked"),
        currency: currency.expect("checked"),
        fees_amount_cents: fees.expect("checked"),
        taxes_amount_cents: taxes.expect("checked"),
        total_amount_cents: total.expect("checked"),
        lines,
    })
}

/// An amount in a currency's units as whole cents: `None` when it is not a
/// whole number of cents (never rounded).
pub fn whole_cents(amount: Decimal) -> Option<i64> {
    let cents = amount.checked_mul(Decimal::ONE_HUNDRED)?;
    if cents.fract().is_zero() {
        i64::try_from(cents.trunc()).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_needs_a_known_type_a_source_and_a_source_id() {
        let errors =
            SourceRecord::from_value(json!({"type": "invoice", "source": " "})).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "source: value_is_mandatory; source_id: value_is_mandatory; type: value_is_invalid"
        );
        let record = SourceRecord::from_value(
            json!({"type": "customer", "source": "nexacloud", "source_id": "u1", "email": "a@b"}),
        )
        .unwrap();
        assert_eq!(
            record.stream_id("nexacloud"),
            "nexacloud/nexacloud/customer/u1"
        );
        assert_eq!(record.text("email").as_deref(), Some("a@b"));
    }

    #[test]
    fn changed_fields_compare_numbers_as_numbers() {
        let before = json!({"amount_cents": 1900, "name": "Starter", "x": null});
        let after = json!({"amount_cents": 1900.0, "name": "Starter Plus"});
        assert_eq!(
            changed_fields(before.as_object().unwrap(), after.as_object().unwrap()),
            vec!["name".to_string()]
        );
    }

    #[test]
    fn whole_cents_never_rounds() {
        assert_eq!(whole_cents("19.0000".parse().unwrap()), Some(1900));
        assert_eq!(whole_cents("9.9950".parse().unwrap()), None);
        assert_eq!(whole_cents("0.01".parse().unwrap()), Some(1));
    }

    #[test]
    fn an_external_invoice_is_validated_field_by_field() {
        let fields = json!({"number": "NC-1", "external_customer_id": "u1", "status": "paid",
            "currency": "cad", "fees_amount_cents": 1964, "taxes_amount_cents": 255,
            "total_amount_cents": 2219, "from_date": "2026-10-01", "to_date": "2026-10-31",
            "lines": [{"kind": "usage", "description": "CPU", "units": "106.6667",
                       "unit_amount": "0.006000", "amount_cents": 64}]});
        let invoice = validate_external_invoice(fields.as_object().unwrap()).unwrap();
        assert_eq!(invoice.currency, "CAD");
        assert_eq!(invoice.lines[0].unit_amount.to_string(), "0.006");
        let bad = json!({"number": "NC-1", "external_customer_id": "u1", "status": "lost",
            "currency": "CAD", "fees_amount_cents": 19.5, "taxes_amount_cents": 0,
            "total_amount_cents": 0, "lines": [{"kind": "plan"}]});
        assert_eq!(
            validate_external_invoice(bad.as_object().unwrap())
                .unwrap_err()
                .to_string(),
            "fees_amount_cents: invalid_amount; lines[0].amount_cents: value_is_mandatory; \
             lines[0].description: value_is_mandatory; lines[0].unit_amount: value_is_invalid; \
             lines[0].units: value_is_invalid; status: value_is_invalid"
        );
    }
}
