//! Usage: one event per (subscription, metric, transaction id), validated
//! against the subscription it names and recorded exactly as sent.
//!
//! Usage does not go through a cqrs-es aggregate (it is high-volume and each
//! event is its own one-event stream), but it is the same kind of fact in
//! the same log: [`UsageEvent::UsageRecorded`] in a stream whose id is
//! [`usage_stream_id`]. The log's primary key on (type, stream, sequence 1)
//! makes "recorded twice" impossible, whoever races.

use std::collections::HashMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::billable_metric::AggregationType;
use crate::period::{billing_period_for, BillingPeriod, PeriodRule};
use crate::pricing::{checked, Checked};
use crate::refusal::{codes, FieldErrors};
use crate::wire::{
    decimal_number_or_string, nul_in, parse_decimal, valid_identifier, within_bounds,
};

/// The aggregate type of usage streams.
pub const USAGE_STREAM_TYPE: &str = "Usage";

/// A usage event exactly as a client sent it (Lago's `event` object).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SentUsage {
    /// The client's idempotency key.
    #[serde(default)]
    pub transaction_id: Option<String>,
    /// The subscription it is for (NexaCloud: the deployment id).
    #[serde(default)]
    pub external_subscription_id: Option<String>,
    /// The billable metric's code.
    #[serde(default)]
    pub code: Option<String>,
    /// Unix seconds (integer, float or numeric string); null or absent = now.
    #[serde(default)]
    pub timestamp: Value,
    /// The event's properties (the aggregated field among them).
    #[serde(default)]
    pub properties: Value,
}

/// A recorded usage event: what was sent, plus what the ledger resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The event's id.
    pub lago_id: Uuid,
    /// Exactly what the client sent (compared on a retry).
    pub sent: SentUsage,
    /// The service that recorded it (and owns the subscription).
    pub service: String,
    /// The subscription's id.
    pub subscription_lago_id: Uuid,
    /// The customer's id.
    pub customer_lago_id: Uuid,
    /// The metric's aggregation.
    pub aggregation_type: AggregationType,
    /// When the usage happened.
    pub timestamp: DateTime<Utc>,
    /// The aggregated property's value, exactly as sent (numeric aggregations).
    pub value: Option<Decimal>,
    /// The aggregated property as a key (unique_count).
    pub unique_key: Option<String>,
    /// The billing period the event bills in, decided by its timestamp.
    pub period: BillingPeriod,
}

impl UsageRecord {
    /// This record's `UsageRecorded` event as the log stores it (the JSON
    /// of [`UsageEvent`]), serialized without copying the record.
    pub fn recorded_payload(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        enum Borrowed<'a> {
            UsageRecorded(&'a UsageRecord),
        }
        serde_json::to_string(&Borrowed::UsageRecorded(self))
    }
}

/// Facts about usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsageEvent {
    /// A usage event was recorded.
    UsageRecorded(UsageRecord),
}

impl DomainEvent for UsageEvent {
    fn event_type(&self) -> String {
        "UsageRecorded".to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The stream of one usage event: unique per (subscription, metric,
/// transaction id). Length prefixes keep it unambiguous whatever characters
/// the codes hold.
pub fn usage_stream_id(
    subscription_lago_id: Uuid,
    metric_code: &str,
    transaction_id: &str,
) -> String {
    format!(
        "{subscription_lago_id}/{}:{metric_code}/{}:{transaction_id}",
        metric_code.len(),
        transaction_id.len()
    )
}

/// What a metric charged on the subscription's plan needs for validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargedMetric {
    /// Aggregation.
    pub aggregation_type: AggregationType,
    /// The aggregated property.
    pub field_name: Option<String>,
}

/// The subscription a usage event names, as the directory knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSubscription {
    /// The service that owns it.
    pub service: String,
    /// Its id.
    pub lago_id: Uuid,
    /// Its customer's id.
    pub customer_lago_id: Uuid,
    /// Start.
    pub subscription_at: DateTime<Utc>,
    /// End, if terminated.
    pub terminated_at: Option<DateTime<Utc>>,
    /// How its periods are laid out.
    pub periods: PeriodRule,
    /// The metrics its plan version charges, by code.
    pub metrics: HashMap<String, ChargedMetric>,
}

/// The acceptance rules for timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimits {
    /// How far in the future a timestamp may be (clock skew).
    pub future_skew: Duration,
    /// How far in the past a timestamp may be.
    pub acceptance_window: Duration,
}

impl Default for UsageLimits {
    fn default() -> Self {
        Self {
            future_skew: Duration::minutes(5),
            acceptance_window: Duration::days(35),
        }
    }
}

impl UsageLimits {
    /// The limits of a backfill (an import): any past timestamp is accepted.
    pub fn backfill() -> Self {
        Self {
            acceptance_window: Duration::MAX,
            ..Self::default()
        }
    }
}

/// Unix seconds (integer, float or numeric string), read exactly.
pub fn parse_timestamp(value: &Value, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let seconds = match value {
        Value::Null => return Some(now),
        other => decimal_number_or_string(other)?,
    };
    let whole = seconds.trunc();
    let nanos = ((seconds - whole) * Decimal::from(1_000_000_000)).trunc();
    let whole: i64 = whole.try_into().ok()?;
    let nanos: i64 = nanos.try_into().ok()?;
    Utc.timestamp_opt(whole, u32::try_from(nanos).ok()?)
        .single()
}

/// Validate one event against its subscription (`None`: no such
/// subscription in the calling service). Errors name the field.
pub fn validate_usage(
    lago_id: Uuid,
    sent: SentUsage,
    subscription: Option<&UsageSubscription>,
    limits: UsageLimits,
    now: DateTime<Utc>,
) -> Result<UsageRecord, FieldErrors> {
    let mut errors = FieldErrors::default();
    for (field, value) in [
        ("transaction_id", &sent.transaction_id),
        ("external_subscription_id", &sent.external_subscription_id),
        ("code", &sent.code),
    ] {
        match value.as_deref().map(str::trim) {
            None | Some("") => errors.add(field, codes::MANDATORY),
            Some(text) if !valid_identifier(text) => errors.add(field, codes::INVALID),
            Some(_) => {}
        }
    }
    let timestamp = match parse_timestamp(&sent.timestamp, now) {
        None => {
            errors.add("timestamp", "invalid_timestamp");
            None
        }
        Some(at) if at > now + limits.future_skew => {
            errors.add("timestamp", "too_far_in_the_future");
            None
        }
        Some(at)
            if now
                .checked_sub_signed(limits.acceptance_window)
                .is_some_and(|earliest| at < earliest) =>
        {
            errors.add("timestamp", "older_than_acceptance_window");
            None
        }
        Some(at) => Some(at),
    };
    if !(sent.properties.is_null() || sent.properties.is_object()) {
        errors.add("properties", codes::INVALID);
    } else if let Some(path) = nul_in(&sent.properties, "properties") {
        errors.add(path, codes::INVALID);
    }
    let Some(subscription) = subscription else {
        if sent
            .external_subscription_id
            .as_deref()
            .is_some_and(|id| !id.trim().is_empty())
        {
            errors.add("external_subscription_id", "subscription_not_found");
        }
        return Err(errors);
    };
    if let Some(at) = timestamp {
        let started = subscription.subscription_at <= at;
        let not_ended = subscription.terminated_at.is_none_or(|end| at < end);
        if !(started && not_ended) {
            errors.add("timestamp", "subscription_not_active_at_timestamp");
        }
    }
    let metric = sent
        .code
        .as_deref()
        .and_then(|code| subscription.metrics.get(code.trim()));
    if metric.is_none() && sent.code.as_deref().is_some_and(|c| !c.trim().is_empty()) {
        errors.add("code", "metric_not_found");
    }
    let (mut value, mut unique_key) = (None, None);
    if let Some(metric) = metric {
        let field = metric.field_name.as_deref().unwrap_or_default();
        let property = sent.properties.get(field);
        let path = format!("properties.{field}");
        match metric.aggregation_type {
            AggregationType::CountAgg => {}
            AggregationType::UniqueCountAgg => match property {
                Some(Value::String(text)) if !valid_identifier(text) => {
                    errors.add(path, codes::INVALID)
                }
                Some(Value::String(text)) if !text.is_empty() => unique_key = Some(text.clone()),
                Some(Value::Number(number)) => unique_key = Some(number.to_string()),
                None | Some(Value::Null) => errors.add(path, codes::MANDATORY),
                Some(_) => errors.add(path, codes::INVALID),
            },
            aggregation => match property {
                None | Some(Value::Null) => errors.add(path, codes::MANDATORY),
                Some(raw) => match exact_number(raw) {
                    None => errors.add(path, "value_is_not_numeric"),
                    Some(number) if !within_bounds(number) => errors.add(path, codes::OUT_OF_RANGE),
                    // A weighted sum's values are changes, which may be negative.
                    Some(number)
                        if number.is_sign_negative()
                            && aggregation != AggregationType::WeightedSumAgg =>
                    {
                        errors.add(path, "value_is_negative")
                    }
                    Some(number) => value = Some(number),
                },
            },
        }
    }
    errors.clone().into_result().map_err(|_| errors)?;
    let timestamp = timestamp.expect("validated");
    Ok(UsageRecord {
        lago_id,
        period: billing_period_for(&subscription.periods, timestamp),
        sent: SentUsage {
            transaction_id: sent.transaction_id.map(|t| t.trim().to_string()),
            external_subscription_id: sent.external_subscription_id.map(|t| t.trim().to_string()),
            code: sent.code.map(|t| t.trim().to_string()),
            ..sent
        },
        service: subscription.service.clone(),
        subscription_lago_id: subscription.lago_id,
        customer_lago_id: subscription.customer_lago_id,
        aggregation_type: metric.expect("validated").aggregation_type,
        timestamp,
        value,
        unique_key,
    })
}

/// A number sent as a JSON number or numeric string, exactly as written.
fn exact_number(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(number) => parse_decimal(&number.to_string()),
        Value::String(text) => parse_decimal(text),
        _ => None,
    }
}

/// The time-weighted sum of a period (Lago's `weighted_sum_agg`): each
/// event changes a running total by its value; the result is the total's
/// average over the period, weighted by how long each total held.
/// `events` must be in time order; `initial` is the total at the start.
///
/// Computed exactly (Σ total × milliseconds, divided once by the period's
/// length) while that fits a decimal; totals so large that it does not are
/// weighted by their share of the period instead (one rounding per change,
/// at the 28th significant digit). Only a running total beyond a decimal
/// overflows.
pub fn weighted_sum(
    period: BillingPeriod,
    initial: Decimal,
    events: &[(DateTime<Utc>, Decimal)],
) -> Checked<Decimal> {
    let length = Decimal::from((period.end - period.start).num_milliseconds());
    if length.is_zero() {
        return Ok(Decimal::ZERO);
    }
    let exact = running_totals(period, initial, events, |total, held| {
        checked::mul(total, held, WEIGHTED)
    })
    .and_then(|weighted| checked::div(weighted, length, WEIGHTED));
    exact.or_else(|_| {
        running_totals(period, initial, events, |total, held| {
            checked::mul(total, checked::div(held, length, WEIGHTED)?, WEIGHTED)
        })
    })
}

const WEIGHTED: &str = "weighted usage";

/// Σ `weigh(total, milliseconds it held)` over the period.
fn running_totals(
    period: BillingPeriod,
    initial: Decimal,
    events: &[(DateTime<Utc>, Decimal)],
    weigh: impl Fn(Decimal, Decimal) -> Checked<Decimal>,
) -> Checked<Decimal> {
    let held =
        |from: DateTime<Utc>, to: DateTime<Utc>| Decimal::from((to - from).num_milliseconds());
    let mut total = initial;
    let mut since = period.start;
    let mut weighted = Decimal::ZERO;
    for (at, change) in events {
        let at = (*at).clamp(period.start, period.end);
        weighted = checked::add(weighted, weigh(total, held(since, at))?, WEIGHTED)?;
        total = checked::add(total, *change, WEIGHTED)?;
        since = at;
    }
    checked::add(weighted, weigh(total, held(since, period.end))?, WEIGHTED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BillingInterval;
    use crate::subscription::BillingTime;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-11-21T12:00:00Z".parse().unwrap()
    }

    fn subscription() -> UsageSubscription {
        let metric = |aggregation_type, field: Option<&str>| ChargedMetric {
            aggregation_type,
            field_name: field.map(Into::into),
        };
        UsageSubscription {
            service: "nexacloud".into(),
            lago_id: Uuid::nil(),
            customer_lago_id: Uuid::nil(),
            subscription_at: "2026-11-01T00:00:00Z".parse().unwrap(),
            terminated_at: Some("2026-11-25T00:00:00Z".parse().unwrap()),
            periods: PeriodRule {
                interval: BillingInterval::Monthly,
                billing_time: BillingTime::Calendar,
                subscription_at: "2026-11-01T00:00:00Z".parse().unwrap(),
                timezone: chrono_tz::UTC,
            },
            metrics: HashMap::from([
                (
                    "cpu_seconds".to_string(),
                    metric(AggregationType::SumAgg, Some("cpu_seconds")),
                ),
                (
                    "users".to_string(),
                    metric(AggregationType::UniqueCountAgg, Some("user_id")),
                ),
                (
                    "seats".to_string(),
                    metric(AggregationType::WeightedSumAgg, Some("delta")),
                ),
                ("calls".to_string(), metric(AggregationType::CountAgg, None)),
            ]),
        }
    }

    fn sent(code: &str, timestamp: Value, properties: Value) -> SentUsage {
        SentUsage {
            transaction_id: Some("tx_1".into()),
            external_subscription_id: Some("dep_1".into()),
            code: Some(code.into()),
            timestamp,
            properties,
        }
    }

    fn refused(sent: SentUsage) -> Vec<(String, Vec<String>)> {
        validate_usage(
            Uuid::nil(),
            sent,
            Some(&subscription()),
            UsageLimits::default(),
            now(),
        )
        .unwrap_err()
        .fields()
        .iter()
        .map(|(f, c)| (f.clone(), c.clone()))
        .collect()
    }

    fn one(field: &str, code: &str) -> Vec<(String, Vec<String>)> {
        vec![(field.to_string(), vec![code.to_string()])]
    }

    #[test]
    fn a_value_is_read_exactly_from_its_json_text() {
        let properties: Value =
            serde_json::from_str(r#"{"cpu_seconds": 1234.000000000000000001}"#).unwrap();
        let record = validate_usage(
            Uuid::nil(),
            sent("cpu_seconds", json!(now().timestamp() - 3600), properties),
            Some(&subscription()),
            UsageLimits::default(),
            now(),
        )
        .unwrap();
        assert_eq!(record.value.unwrap().to_string(), "1234.000000000000000001");
        assert_eq!(
            record.period.start,
            "2026-11-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        // The payload as stored keeps the value's text and reads back as the
        // same event.
        let payload = record.recorded_payload().unwrap();
        assert_eq!(
            payload,
            serde_json::to_string(&UsageEvent::UsageRecorded(record.clone())).unwrap()
        );
        assert!(payload.contains(r#""cpu_seconds":1234.000000000000000001"#));
        let UsageEvent::UsageRecorded(read) = serde_json::from_str(&payload).unwrap();
        assert_eq!(read, record);
    }

    #[test]
    fn timestamps_are_unix_seconds_as_integer_float_or_string_and_null_is_now() {
        let at = |value: Value| parse_timestamp(&value, now()).map(|t| t.to_rfc3339());
        assert_eq!(
            at(json!(1_763_726_400)),
            Some("2025-11-21T12:00:00+00:00".into())
        );
        assert_eq!(
            at(serde_json::from_str("1763726400.25").unwrap()),
            Some("2025-11-21T12:00:00.250+00:00".into())
        );
        assert_eq!(
            at(json!("1763726400")),
            Some("2025-11-21T12:00:00+00:00".into())
        );
        assert_eq!(at(Value::Null), Some(now().to_rfc3339()));
        assert_eq!(at(json!("yesterday")), None);
    }

    #[test]
    fn hostile_values_are_refused_by_field() {
        let at = json!(now().timestamp() - 3600);
        assert_eq!(
            refused(sent(
                "cpu_seconds",
                at.clone(),
                json!({"cpu_seconds": "79228162514264337593543950335"})
            )),
            one("properties.cpu_seconds", "value_is_out_of_range")
        );
        assert_eq!(
            refused(sent(
                "seats",
                at.clone(),
                json!({"delta": "-1000000000000001"})
            )),
            one("properties.delta", "value_is_out_of_range")
        );
        assert_eq!(
            refused(sent(
                "cpu_seconds",
                at.clone(),
                json!({"cpu_seconds": 1e21})
            )),
            one("properties.cpu_seconds", "value_is_out_of_range")
        );
        assert_eq!(
            refused(sent(
                "users",
                at.clone(),
                json!({"user_id": "u".repeat(100_000)})
            )),
            one("properties.user_id", "value_is_invalid")
        );
        assert_eq!(
            refused(sent("calls", at.clone(), json!({"region": "ca\u{0}"}))),
            one("properties.region", "value_is_invalid")
        );
        let mut nul_id = sent("calls", at, json!({}));
        nul_id.transaction_id = Some("tx\u{0}1".into());
        assert_eq!(refused(nul_id), one("transaction_id", "value_is_invalid"));
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let future = (now() + Duration::minutes(6)).timestamp();
        assert_eq!(
            refused(sent("calls", json!(future), json!({}))),
            one("timestamp", "too_far_in_the_future")
        );
        let old = (now() - Duration::days(36)).timestamp();
        assert_eq!(
            refused(sent("calls", json!(old), json!({}))),
            one("timestamp", "older_than_acceptance_window")
        );
        assert_eq!(
            refused(sent("calls", json!("soon"), json!({}))),
            one("timestamp", "invalid_timestamp")
        );
    }

    #[test]
    fn usage_outside_the_subscription_life_is_refused() {
        let before = "2026-10-31T23:59:59Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp();
        assert_eq!(
            refused(sent("calls", json!(before), json!({}))),
            one("timestamp", "subscription_not_active_at_timestamp")
        );
        let limits = UsageLimits {
            future_skew: Duration::days(10),
            ..Default::default()
        };
        let after_end = "2026-11-25T00:00:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp();
        let error = validate_usage(
            Uuid::nil(),
            sent("calls", json!(after_end), json!({})),
            Some(&subscription()),
            limits,
            now(),
        )
        .unwrap_err();
        assert_eq!(
            error.fields()["timestamp"],
            vec!["subscription_not_active_at_timestamp".to_string()]
        );
    }

    #[test]
    fn the_metric_must_be_charged_and_its_property_usable() {
        let ts = json!(now().timestamp());
        assert_eq!(
            refused(sent("gpu_seconds", ts.clone(), json!({}))),
            one("code", "metric_not_found")
        );
        assert_eq!(
            refused(sent("cpu_seconds", ts.clone(), json!({}))),
            one("properties.cpu_seconds", "value_is_mandatory")
        );
        assert_eq!(
            refused(sent(
                "cpu_seconds",
                ts.clone(),
                json!({"cpu_seconds": "lots"})
            )),
            one("properties.cpu_seconds", "value_is_not_numeric")
        );
        assert_eq!(
            refused(sent("cpu_seconds", ts.clone(), json!({"cpu_seconds": -5}))),
            one("properties.cpu_seconds", "value_is_negative")
        );
        assert_eq!(
            refused(sent("users", ts.clone(), json!({}))),
            one("properties.user_id", "value_is_mandatory")
        );
        // A weighted sum's change may be negative.
        validate_usage(
            Uuid::nil(),
            sent("seats", ts, json!({"delta": -2})),
            Some(&subscription()),
            UsageLimits::default(),
            now(),
        )
        .unwrap();
    }

    #[test]
    fn an_unknown_subscription_is_named() {
        let error = validate_usage(
            Uuid::nil(),
            sent("calls", Value::Null, json!({})),
            None,
            UsageLimits::default(),
            now(),
        )
        .unwrap_err();
        assert_eq!(
            error.fields()["external_subscription_id"],
            vec!["subscription_not_found".to_string()]
        );
    }

    #[test]
    fn stream_ids_are_unambiguous() {
        assert_ne!(
            usage_stream_id(Uuid::nil(), "a/1", "2"),
            usage_stream_id(Uuid::nil(), "a", "1/2")
        );
    }

    #[test]
    fn the_weighted_sum_averages_the_running_total_over_the_period() {
        let period = BillingPeriod {
            start: "2026-11-01T00:00:00Z".parse().unwrap(),
            end: "2026-12-01T00:00:00Z".parse().unwrap(),
        };
        // 10 seats from the 1st, +20 from the 16th (half the period): 10×½ + 30×½ = 20.
        let events = [
            ("2026-11-01T00:00:00Z".parse().unwrap(), Decimal::from(10)),
            ("2026-11-16T00:00:00Z".parse().unwrap(), Decimal::from(20)),
        ];
        assert_eq!(
            weighted_sum(period, Decimal::ZERO, &events),
            Ok(Decimal::from(20))
        );
    }

    #[test]
    fn a_weighted_sum_of_huge_totals_is_weighted_by_share_and_only_a_total_beyond_a_decimal_overflows(
    ) {
        let period = BillingPeriod {
            start: "2026-11-01T00:00:00Z".parse().unwrap(),
            end: "2026-12-01T00:00:00Z".parse().unwrap(),
        };
        // 6 × 10^20 held for the last 20 of 30 days: total × milliseconds
        // (2.6 × 10^9) does not fit a decimal, its share of the period does
        // (⅔, rounded at the 28th significant digit).
        let huge = Decimal::from(600_000_000_000_000_000_000i128);
        let events = [("2026-11-11T00:00:00Z".parse().unwrap(), huge)];
        assert_eq!(
            weighted_sum(period, Decimal::ZERO, &events).map(|units| units.round_dp(6)),
            Ok(Decimal::from(400_000_000_000_000_000_000i128))
        );
        let beyond = [
            ("2026-11-02T00:00:00Z".parse().unwrap(), Decimal::MAX),
            ("2026-11-03T00:00:00Z".parse().unwrap(), Decimal::ONE),
        ];
        assert_eq!(
            weighted_sum(period, Decimal::ZERO, &beyond),
            Err(crate::pricing::Overflow("weighted usage"))
        );
    }
}

/// A period's running aggregates for one metric (the `usage` projection's row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodAggregate {
    /// Events recorded.
    pub events_count: i64,
    /// Sum of values.
    pub value_sum: Option<Decimal>,
    /// Largest value.
    pub value_max: Option<Decimal>,
    /// Value of the latest event.
    pub latest_value: Option<Decimal>,
    /// Distinct values.
    pub unique_count: i64,
}

/// A period's units for an aggregation type (Lago's semantics). The weighted
/// sum is computed from the period's events by [`weighted_sum`] and passed in.
pub fn period_units(
    aggregation: AggregationType,
    aggregate: &PeriodAggregate,
    weighted: Decimal,
) -> Decimal {
    match aggregation {
        AggregationType::CountAgg => Decimal::from(aggregate.events_count),
        AggregationType::SumAgg => aggregate.value_sum.unwrap_or_default(),
        AggregationType::MaxAgg => aggregate.value_max.unwrap_or_default(),
        AggregationType::LatestAgg => aggregate.latest_value.unwrap_or_default(),
        AggregationType::UniqueCountAgg => Decimal::from(aggregate.unique_count),
        AggregationType::WeightedSumAgg => weighted,
    }
}

/// One recorded usage event of a metric, as billing reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsagePoint {
    /// When the usage happened.
    pub timestamp: DateTime<Utc>,
    /// Its global log position (orders events with equal timestamps).
    pub position: i64,
    /// The aggregated value (numeric aggregations).
    pub value: Option<Decimal>,
    /// The aggregated key (unique_count).
    pub unique_key: Option<String>,
}

/// The usage of one metric in `window`, from its events (any order; those
/// outside the window are ignored). This is the fold invoices and replays
/// use; it yields the same [`PeriodAggregate`] the incremental projection
/// keeps, and the units come from the one [`period_units`].
pub fn usage_in_window(
    aggregation: AggregationType,
    window: BillingPeriod,
    points: &[&UsagePoint],
) -> Checked<crate::pricing::ChargeUsage> {
    let mut inside: Vec<&UsagePoint> = points
        .iter()
        .copied()
        .filter(|p| window.contains(p.timestamp))
        .collect();
    inside.sort_by_key(|p| (p.timestamp, p.position));
    let mut aggregate = PeriodAggregate {
        events_count: inside.len() as i64,
        ..Default::default()
    };
    let mut unique = std::collections::HashSet::new();
    for point in &inside {
        if let Some(value) = point.value {
            let sum = aggregate.value_sum.unwrap_or_default();
            aggregate.value_sum = Some(checked::add(sum, value, "usage")?);
            aggregate.value_max = Some(aggregate.value_max.map_or(value, |max| max.max(value)));
        }
        if let Some(key) = &point.unique_key {
            unique.insert(key.as_str());
        }
    }
    aggregate.unique_count = unique.len() as i64;
    aggregate.latest_value = inside.last().and_then(|p| p.value);
    let values: Vec<(DateTime<Utc>, Decimal)> = inside
        .iter()
        .map(|p| (p.timestamp, p.value.unwrap_or_default()))
        .collect();
    let weighted = if aggregation == AggregationType::WeightedSumAgg {
        weighted_sum(window, Decimal::ZERO, &values)?
    } else {
        Decimal::ZERO
    };
    Ok(crate::pricing::ChargeUsage {
        units: period_units(aggregation, &aggregate, weighted),
        events_count: aggregate.events_count,
        event_values: values.into_iter().map(|(_, value)| value).collect(),
    })
}
