//! A plan's usage charges: which metric, which pricing model, and the model's
//! properties, validated and held as exact decimals.
//!
//! The models are Lago's (standard, package, graduated, graduated percentage, volume, percentage).
//! `standard` takes two optional extras that make the NexaCloud price exact:
//! `free_units` (units included before anything is charged) and `unit_size`
//! (the number of units the `amount` is for). CPU billed at $0.0075 per
//! core-hour (3,600 CPU-seconds) beyond 36,000 included seconds is
//! `{"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}`, and is
//! computed as (units − free_units) × amount ÷ unit_size in full precision.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::billable_metric::MetricRef;
use crate::refusal::{codes, FieldErrors};
use crate::wire::{decimal_number_or_string, optional_price, price, whole_number};

/// One range of a graduated or volume charge. `to_value` is `None` only on
/// the last, open-ended range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRange {
    /// Lower bound.
    pub from_value: Decimal,
    /// Upper bound; `None` = no limit.
    pub to_value: Option<Decimal>,
    /// Price of each unit in the range.
    pub per_unit_amount: Decimal,
    /// Flat price of reaching the range.
    pub flat_amount: Decimal,
}

/// One range of a graduated percentage charge: `rate` percent of the units
/// that fall in it, plus `flat_amount` once it is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateRange {
    /// Lower bound.
    pub from_value: Decimal,
    /// Upper bound; `None` = no limit.
    pub to_value: Option<Decimal>,
    /// Percent of the units in the range.
    pub rate: Decimal,
    /// Flat price of reaching the range.
    pub flat_amount: Decimal,
}

impl RateRange {
    /// The range as a graduated one: the rate as a price per unit.
    pub fn as_price_range(&self) -> PriceRange {
        PriceRange {
            from_value: self.from_value,
            to_value: self.to_value,
            per_unit_amount: self.rate / Decimal::ONE_HUNDRED,
            flat_amount: self.flat_amount,
        }
    }
}

/// A charge model with its validated properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "charge_model", rename_all = "snake_case")]
pub enum Pricing {
    /// `amount` per `unit_size` units beyond `free_units`.
    Standard {
        /// Price per `unit_size` units.
        amount: Decimal,
        /// Units included (not charged).
        free_units: Decimal,
        /// How many units `amount` buys (1 unless stated).
        unit_size: Decimal,
    },
    /// `amount` per started package of `package_size` units beyond `free_units`.
    Package {
        /// Price per package.
        amount: Decimal,
        /// Units included.
        free_units: Decimal,
        /// Units per package (> 0).
        package_size: Decimal,
    },
    /// Each range prices the units that fall in it.
    Graduated {
        /// Contiguous ranges from 0, last open.
        ranges: Vec<PriceRange>,
    },
    /// Each range takes its rate (percent) of the units that fall in it
    /// (Lago's tiered percentages).
    GraduatedPercentage {
        /// Contiguous ranges from 0, last open.
        ranges: Vec<RateRange>,
    },
    /// The range holding the total prices every unit.
    Volume {
        /// Contiguous ranges from 0, last open.
        ranges: Vec<PriceRange>,
    },
    /// A percentage of the aggregated amount plus a fixed fee per event.
    Percentage {
        /// Percent of the amount.
        rate: Decimal,
        /// Fee per event.
        fixed_amount: Option<Decimal>,
        /// Events free of the fixed fee.
        free_units_per_events: Option<i64>,
        /// Amount free of the percentage.
        free_units_per_total_aggregation: Option<Decimal>,
        /// Smallest charge per event.
        per_transaction_min_amount: Option<Decimal>,
        /// Largest charge per event.
        per_transaction_max_amount: Option<Decimal>,
    },
}

impl Pricing {
    /// Lago's name of the model.
    pub fn model_name(&self) -> &'static str {
        match self {
            Pricing::Standard { .. } => "standard",
            Pricing::Package { .. } => "package",
            Pricing::Graduated { .. } => "graduated",
            Pricing::GraduatedPercentage { .. } => "graduated_percentage",
            Pricing::Volume { .. } => "volume",
            Pricing::Percentage { .. } => "percentage",
        }
    }

    /// Whether pricing needs each event's value (per-transaction bounds,
    /// free events or a free total: they count whole first events).
    pub fn needs_event_values(&self) -> bool {
        match self {
            Pricing::Percentage {
                free_units_per_events,
                free_units_per_total_aggregation,
                per_transaction_min_amount,
                per_transaction_max_amount,
                ..
            } => {
                free_units_per_events.is_some_and(|n| n > 0)
                    || free_units_per_total_aggregation.is_some_and(|t| t > Decimal::ZERO)
                    || per_transaction_min_amount.is_some()
                    || per_transaction_max_amount.is_some()
            }
            _ => false,
        }
    }

    /// The properties as Lago shows them (prices as decimal strings).
    pub fn properties(&self) -> Value {
        fn ranges_json(ranges: &[PriceRange]) -> Value {
            ranges
                .iter()
                .map(|r| {
                    json!({
                        "from_value": number(r.from_value),
                        "to_value": r.to_value.map(number),
                        "per_unit_amount": r.per_unit_amount.to_string(),
                        "flat_amount": r.flat_amount.to_string(),
                    })
                })
                .collect()
        }
        match self {
            Pricing::Standard {
                amount,
                free_units,
                unit_size,
            } => json!({
                "amount": amount.to_string(),
                "free_units": free_units.to_string(),
                "unit_size": unit_size.to_string(),
            }),
            Pricing::Package {
                amount,
                free_units,
                package_size,
            } => json!({
                "amount": amount.to_string(),
                "free_units": number(*free_units),
                "package_size": number(*package_size),
            }),
            Pricing::Graduated { ranges } => json!({ "graduated_ranges": ranges_json(ranges) }),
            Pricing::Volume { ranges } => json!({ "volume_ranges": ranges_json(ranges) }),
            Pricing::GraduatedPercentage { ranges } => json!({
                "graduated_percentage_ranges": ranges
                    .iter()
                    .map(|r| json!({
                        "from_value": number(r.from_value),
                        "to_value": r.to_value.map(number),
                        "rate": r.rate.to_string(),
                        "flat_amount": r.flat_amount.to_string(),
                    }))
                    .collect::<Vec<_>>()
            }),
            Pricing::Percentage {
                rate,
                fixed_amount,
                free_units_per_events,
                free_units_per_total_aggregation,
                per_transaction_min_amount,
                per_transaction_max_amount,
            } => json!({
                "rate": rate.to_string(),
                "fixed_amount": fixed_amount.map(|d| d.to_string()),
                "free_units_per_events": free_units_per_events,
                "free_units_per_total_aggregation": free_units_per_total_aggregation.map(|d| d.to_string()),
                "per_transaction_min_amount": per_transaction_min_amount.map(|d| d.to_string()),
                "per_transaction_max_amount": per_transaction_max_amount.map(|d| d.to_string()),
            }),
        }
    }
}

/// An exact decimal as a JSON number (range bounds and package sizes are
/// numbers on Lago's wire).
fn number(value: Decimal) -> Value {
    serde_json::from_str(&value.normalize().to_string()).unwrap_or(Value::Null)
}

/// A charge as a client sent it, with its metric resolved by the caller
/// (inside the calling service) from `billable_metric_id`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct ChargeInput {
    /// The metric's lago_id.
    pub billable_metric_id: Option<String>,
    /// Lago's model name.
    pub charge_model: Option<String>,
    /// Billed at the start of the period.
    pub pay_in_advance: Option<bool>,
    /// Appears on invoices.
    pub invoiceable: Option<bool>,
    /// Smallest amount billed for the charge, in cents.
    pub min_amount_cents: Option<i64>,
    /// The model's properties.
    pub properties: Option<Value>,
    /// The metric, found by the caller; `None` when it does not exist.
    #[serde(skip)]
    pub metric: Option<MetricRef>,
    /// The id the charge gets (chosen by the caller, so the aggregate stays
    /// deterministic).
    #[serde(skip, default = "Uuid::new_v4")]
    pub lago_id: Uuid,
}

/// A validated charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Its id.
    pub lago_id: Uuid,
    /// The metric it prices.
    pub metric: MetricRef,
    /// Model and properties.
    pub pricing: Pricing,
    /// Billed in advance.
    pub pay_in_advance: bool,
    /// Shown on invoices.
    pub invoiceable: bool,
    /// Minimum per period, in cents.
    pub min_amount_cents: i64,
}

/// Validate one charge; errors are recorded under `charges[index].…`.
pub fn validate_charge(
    errors: &mut FieldErrors,
    index: usize,
    input: &ChargeInput,
) -> Option<Charge> {
    let field = |name: &str| format!("charges[{index}].{name}");
    if input
        .billable_metric_id
        .as_deref()
        .is_none_or(|id| id.trim().is_empty())
    {
        errors.add(field("billable_metric_id"), codes::MANDATORY);
    }
    let properties = input
        .properties
        .clone()
        .unwrap_or(Value::Object(Map::new()));
    let Some(properties) = properties.as_object() else {
        errors.add(field("properties"), codes::INVALID);
        return None;
    };
    let prop = |name: &str| format!("charges[{index}].properties.{name}");
    let pricing = match input.charge_model.as_deref() {
        None => {
            errors.add(field("charge_model"), codes::MANDATORY);
            None
        }
        Some("standard") => {
            let amount = price(errors, &prop("amount"), properties.get("amount"));
            let free_units =
                non_negative(errors, &prop("free_units"), properties.get("free_units"));
            let unit_size = match properties.get("unit_size") {
                None | Some(Value::Null) => Some(Decimal::ONE),
                Some(value) => match decimal_number_or_string(value) {
                    Some(size) if size > Decimal::ZERO => Some(size),
                    _ => {
                        errors.add(prop("unit_size"), codes::INVALID);
                        None
                    }
                },
            };
            Some(Pricing::Standard {
                amount: amount?,
                free_units: free_units?,
                unit_size: unit_size?,
            })
        }
        Some("package") => {
            let amount = price(errors, &prop("amount"), properties.get("amount"));
            let free_units = whole(errors, &prop("free_units"), properties.get("free_units"), 0);
            let package_size = match properties.get("package_size").and_then(whole_number) {
                Some(size) if size > 0 => Some(Decimal::from(size)),
                _ => {
                    errors.add(prop("package_size"), "invalid_package_size");
                    None
                }
            };
            Some(Pricing::Package {
                amount: amount?,
                free_units: free_units?,
                package_size: package_size?,
            })
        }
        Some("graduated") => {
            let ranges = ranges(
                errors,
                &prop("graduated_ranges"),
                properties.get("graduated_ranges"),
                "invalid_graduated_ranges",
                "per_unit_amount",
            );
            Some(Pricing::Graduated { ranges: ranges? })
        }
        Some("graduated_percentage") => {
            let ranges = ranges(
                errors,
                &prop("graduated_percentage_ranges"),
                properties.get("graduated_percentage_ranges"),
                "invalid_graduated_percentage_ranges",
                "rate",
            );
            Some(Pricing::GraduatedPercentage {
                ranges: ranges?
                    .into_iter()
                    .map(|r| RateRange {
                        from_value: r.from_value,
                        to_value: r.to_value,
                        rate: r.per_unit_amount,
                        flat_amount: r.flat_amount,
                    })
                    .collect(),
            })
        }
        Some("volume") => {
            let ranges = ranges(
                errors,
                &prop("volume_ranges"),
                properties.get("volume_ranges"),
                "invalid_volume_ranges",
                "per_unit_amount",
            );
            Some(Pricing::Volume { ranges: ranges? })
        }
        Some("percentage") => {
            let rate = price(errors, &prop("rate"), properties.get("rate"));
            let fixed_amount = optional_price(
                errors,
                &prop("fixed_amount"),
                properties.get("fixed_amount"),
            );
            let free_units_per_events = match properties.get("free_units_per_events") {
                None | Some(Value::Null) => None,
                Some(value) => match whole_number(value) {
                    Some(n) if n >= 0 => Some(n),
                    _ => {
                        errors.add(prop("free_units_per_events"), codes::INVALID);
                        None
                    }
                },
            };
            let free_total = optional_price(
                errors,
                &prop("free_units_per_total_aggregation"),
                properties.get("free_units_per_total_aggregation"),
            );
            let min = optional_price(
                errors,
                &prop("per_transaction_min_amount"),
                properties.get("per_transaction_min_amount"),
            );
            let max = optional_price(
                errors,
                &prop("per_transaction_max_amount"),
                properties.get("per_transaction_max_amount"),
            );
            if let (Some(min), Some(max)) = (min, max) {
                if min > max {
                    errors.add(prop("per_transaction_max_amount"), codes::INVALID);
                }
            }
            Some(Pricing::Percentage {
                rate: rate?,
                fixed_amount,
                free_units_per_events,
                free_units_per_total_aggregation: free_total,
                per_transaction_min_amount: min,
                per_transaction_max_amount: max,
            })
        }
        Some(_) => {
            errors.add(field("charge_model"), codes::INVALID);
            None
        }
    };
    let min_amount_cents = input.min_amount_cents.unwrap_or(0);
    if min_amount_cents < 0 {
        errors.add(field("min_amount_cents"), codes::INVALID_AMOUNT);
    }
    Some(Charge {
        lago_id: input.lago_id,
        metric: input.metric.clone()?,
        pricing: pricing?,
        pay_in_advance: input.pay_in_advance.unwrap_or(false),
        invoiceable: input.invoiceable.unwrap_or(true),
        min_amount_cents,
    })
}

/// A non-negative decimal (number or string), zero when absent.
fn non_negative(errors: &mut FieldErrors, field: &str, value: Option<&Value>) -> Option<Decimal> {
    match value {
        None | Some(Value::Null) => Some(Decimal::ZERO),
        Some(value) => match decimal_number_or_string(value) {
            Some(d) if d >= Decimal::ZERO => Some(d),
            _ => {
                errors.add(field, codes::INVALID);
                None
            }
        },
    }
}

/// A non-negative whole number, `default` when absent.
fn whole(
    errors: &mut FieldErrors,
    field: &str,
    value: Option<&Value>,
    default: i64,
) -> Option<Decimal> {
    match value {
        None | Some(Value::Null) => Some(Decimal::from(default)),
        Some(value) => match whole_number(value) {
            Some(n) if n >= 0 => Some(Decimal::from(n)),
            _ => {
                errors.add(field, codes::INVALID);
                None
            }
        },
    }
}

/// Ranges must start at 0, follow each other without gap or overlap (the
/// next `from_value` equals the previous `to_value`, or that plus one, as
/// Lago accepts), have `to_value > from_value`, and only the last is open.
/// `unit_field` names each range's price per unit (`per_unit_amount`, or a
/// graduated percentage's `rate`).
fn ranges(
    errors: &mut FieldErrors,
    field: &str,
    value: Option<&Value>,
    code: &str,
    unit_field: &str,
) -> Option<Vec<PriceRange>> {
    let Some(items) = value
        .and_then(Value::as_array)
        .filter(|items| !items.is_empty())
    else {
        errors.add(field, code);
        return None;
    };
    let mut parsed = Vec::with_capacity(items.len());
    let mut valid = true;
    let mut expected_from = Some(Decimal::ZERO);
    for (i, item) in items.iter().enumerate() {
        let item_field = format!("{field}[{i}]");
        let from = item.get("from_value").and_then(decimal_number_or_string);
        let to = match item.get("to_value") {
            None | Some(Value::Null) => None,
            Some(v) => match decimal_number_or_string(v) {
                Some(to) => Some(to),
                None => {
                    valid = false;
                    None
                }
            },
        };
        let per_unit = price(
            errors,
            &format!("{item_field}.{unit_field}"),
            item.get(unit_field),
        );
        let flat = price(
            errors,
            &format!("{item_field}.flat_amount"),
            item.get("flat_amount"),
        );
        let is_last = i == items.len() - 1;
        let bounds_ok = match (from, expected_from) {
            (Some(from), Some(previous_to)) => {
                let contiguous = if i == 0 {
                    from == Decimal::ZERO
                } else {
                    from == previous_to || from == previous_to + Decimal::ONE
                };
                let end_ok = match to {
                    None => is_last,
                    Some(to) => !is_last && to > from,
                };
                contiguous && end_ok
            }
            _ => false,
        };
        valid &= bounds_ok;
        expected_from = to;
        if let (Some(from), Some(per_unit_amount), Some(flat_amount)) = (from, per_unit, flat) {
            parsed.push(PriceRange {
                from_value: from,
                to_value: to,
                per_unit_amount,
                flat_amount,
            });
        }
    }
    if !valid {
        errors.add(field, code);
        return None;
    }
    (parsed.len() == items.len()).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billable_metric::AggregationType;

    fn charge(model: &str, properties: Value) -> Result<Charge, FieldErrors> {
        let input = ChargeInput {
            billable_metric_id: Some("m".into()),
            charge_model: Some(model.into()),
            properties: Some(properties),
            metric: Some(MetricRef {
                lago_id: Uuid::nil(),
                code: "cpu_seconds".into(),
                aggregation_type: AggregationType::SumAgg,
            }),
            ..Default::default()
        };
        let mut errors = FieldErrors::default();
        let charge = validate_charge(&mut errors, 0, &input);
        if errors.is_empty() {
            Ok(charge.unwrap())
        } else {
            Err(errors)
        }
    }

    fn refused(model: &str, properties: Value) -> Vec<(String, Vec<String>)> {
        charge(model, properties)
            .unwrap_err()
            .fields()
            .iter()
            .map(|(f, c)| (f.clone(), c.clone()))
            .collect()
    }

    fn error(field: &str, code: &str) -> Vec<(String, Vec<String>)> {
        vec![(field.to_string(), vec![code.to_string()])]
    }

    #[test]
    fn the_nexacloud_price_is_held_exactly() {
        let charge = charge(
            "standard",
            json!({"amount": "0.0075", "unit_size": "3600", "free_units": "36000"}),
        )
        .unwrap();
        assert_eq!(
            charge.pricing,
            Pricing::Standard {
                amount: Decimal::new(75, 4),
                free_units: Decimal::from(36000),
                unit_size: Decimal::from(3600),
            }
        );
        assert_eq!(
            charge.pricing.properties(),
            json!({"amount": "0.0075", "free_units": "36000", "unit_size": "3600"})
        );
    }

    #[test]
    fn a_price_sent_as_a_number_is_refused() {
        assert_eq!(
            refused("standard", json!({"amount": 0.0075})),
            error("charges[0].properties.amount", "invalid_amount")
        );
    }

    #[test]
    fn a_missing_price_is_refused_not_read_as_zero() {
        assert_eq!(
            refused("standard", json!({})),
            error("charges[0].properties.amount", "value_is_mandatory")
        );
    }

    #[test]
    fn a_zero_or_negative_unit_size_is_refused() {
        assert_eq!(
            refused("standard", json!({"amount": "1", "unit_size": "0"})),
            error("charges[0].properties.unit_size", "value_is_invalid")
        );
    }

    #[test]
    fn package_size_zero_is_refused() {
        assert_eq!(
            refused(
                "package",
                json!({"amount": "5", "package_size": 0, "free_units": 10})
            ),
            error("charges[0].properties.package_size", "invalid_package_size")
        );
        let ok = charge(
            "package",
            json!({"amount": "5", "package_size": 100, "free_units": 10}),
        )
        .unwrap();
        assert_eq!(
            ok.pricing.properties(),
            json!({"amount": "5", "free_units": 10, "package_size": 100})
        );
    }

    #[test]
    fn graduated_percentage_ranges_carry_a_rate_each() {
        let ranges = json!([
            {"from_value": 0, "to_value": 10, "rate": "1", "flat_amount": "200"},
            {"from_value": 11, "to_value": null, "rate": "2.5", "flat_amount": "0"},
        ]);
        let ok = charge(
            "graduated_percentage",
            json!({ "graduated_percentage_ranges": ranges.clone() }),
        )
        .unwrap();
        assert_eq!(ok.pricing.model_name(), "graduated_percentage");
        assert_eq!(
            ok.pricing.properties(),
            json!({ "graduated_percentage_ranges": ranges })
        );
        assert_eq!(
            refused(
                "graduated_percentage",
                json!({"graduated_percentage_ranges": [
                    {"from_value": 0, "to_value": null, "rate": 1, "flat_amount": "0"}
                ]})
            ),
            error(
                "charges[0].properties.graduated_percentage_ranges[0].rate",
                "invalid_amount"
            )
        );
        assert_eq!(
            refused(
                "graduated_percentage",
                json!({"graduated_percentage_ranges": [
                    {"from_value": 5, "to_value": null, "rate": "1", "flat_amount": "0"}
                ]})
            ),
            error(
                "charges[0].properties.graduated_percentage_ranges",
                "invalid_graduated_percentage_ranges"
            )
        );
    }

    fn range(from: i64, to: Option<i64>) -> Value {
        json!({"from_value": from, "to_value": to, "per_unit_amount": "1", "flat_amount": "0"})
    }

    #[test]
    fn graduated_and_volume_ranges_must_be_contiguous_from_zero_with_only_the_last_open() {
        let good = [
            vec![range(0, Some(10)), range(11, None)],
            vec![range(0, Some(10)), range(10, Some(20)), range(20, None)],
            vec![range(0, None)],
        ];
        for ranges in good {
            charge("graduated", json!({"graduated_ranges": ranges.clone()})).unwrap();
            charge("volume", json!({"volume_ranges": ranges})).unwrap();
        }
        let bad = [
            ("gap", vec![range(0, Some(10)), range(12, None)]),
            ("overlap", vec![range(0, Some(10)), range(5, None)]),
            (
                "open range not last",
                vec![range(0, None), range(11, Some(20))],
            ),
            (
                "last range closed",
                vec![range(0, Some(10)), range(11, Some(20))],
            ),
            ("not from zero", vec![range(1, Some(10)), range(11, None)]),
            (
                "to below from",
                vec![range(0, Some(10)), range(11, Some(11)), range(12, None)],
            ),
            ("empty", vec![]),
        ];
        for (case, ranges) in bad {
            assert_eq!(
                refused("graduated", json!({"graduated_ranges": ranges.clone()})),
                error(
                    "charges[0].properties.graduated_ranges",
                    "invalid_graduated_ranges"
                ),
                "{case}"
            );
            assert_eq!(
                refused("volume", json!({"volume_ranges": ranges})),
                error(
                    "charges[0].properties.volume_ranges",
                    "invalid_volume_ranges"
                ),
                "{case}"
            );
        }
    }

    #[test]
    fn percentage_needs_a_rate_and_a_coherent_min_max() {
        charge(
            "percentage",
            json!({"rate": "2.9", "fixed_amount": "0.30", "free_units_per_events": 5}),
        )
        .unwrap();
        assert_eq!(
            refused("percentage", json!({"fixed_amount": "0.30"})),
            error("charges[0].properties.rate", "value_is_mandatory")
        );
        assert_eq!(
            refused(
                "percentage",
                json!({"rate": "1", "per_transaction_min_amount": "5", "per_transaction_max_amount": "1"})
            ),
            error(
                "charges[0].properties.per_transaction_max_amount",
                "value_is_invalid"
            )
        );
    }

    #[test]
    fn an_unknown_charge_model_is_refused_by_name() {
        assert_eq!(
            refused("dynamic", json!({})),
            error("charges[0].charge_model", "value_is_invalid")
        );
    }
}
