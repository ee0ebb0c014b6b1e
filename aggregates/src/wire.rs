//! Reading the raw values a command carries (as a client sent them) into
//! domain values, recording a field error instead of guessing. Prices must
//! be decimal strings, never JSON numbers (a float has already lost digits
//! by the time it is a number); they are parsed exactly, never through f64.
//!
//! # Bounds
//!
//! Every number a client sends — usage values, prices, rates, units, range
//! bounds, amounts in cents — has a magnitude of at most [`MAX_MAGNITUDE`]
//! (10¹⁵), and every string is free of NUL characters and, for identifiers,
//! at most [`MAX_IDENTIFIER_LENGTH`] characters. At 10¹⁵ per event, a
//! period's sum stays inside a decimal (7.9 × 10²⁸) for 79 trillion events,
//! and one event's amount at the largest price still fits a bill's minor
//! units. Sums over many events at once can still exceed what a bill holds:
//! the pricing arithmetic is checked (`crate::pricing`) and such a
//! subscription is quarantined, never billed a wrong amount.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

use crate::refusal::{codes, FieldErrors};

/// A required, non-blank string.
pub fn required_string(errors: &mut FieldErrors, field: &str, value: &Option<String>) -> String {
    match value.as_deref().map(str::trim) {
        Some(text) if !text.is_empty() => text.to_string(),
        _ => {
            errors.add(field, codes::MANDATORY);
            String::new()
        }
    }
}

/// The longest identifier (code, external id, unique-count key) accepted:
/// they are keys of indexes, and nobody's real identifier is longer.
pub const MAX_IDENTIFIER_LENGTH: usize = 255;

/// The largest magnitude of any number a client sends (10¹⁵).
pub const MAX_MAGNITUDE: i64 = 1_000_000_000_000_000;

/// Whether `value` is within [`MAX_MAGNITUDE`].
pub fn within_bounds(value: Decimal) -> bool {
    value.abs() <= Decimal::from(MAX_MAGNITUDE)
}

/// Whether `text` can be an identifier: no NUL, at most
/// [`MAX_IDENTIFIER_LENGTH`] characters.
pub fn valid_identifier(text: &str) -> bool {
    !text.contains('\0') && text.chars().count() <= MAX_IDENTIFIER_LENGTH
}

/// The first place in `value` (a JSON path below `field`) where a string or
/// a key holds a NUL character: PostgreSQL's text cannot store one.
pub fn nul_in(value: &Value, field: &str) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then(|| field.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| nul_in(item, &format!("{field}[{index}]"))),
        Value::Object(members) => members.iter().find_map(|(key, item)| {
            let path = if field.is_empty() {
                key.replace('\0', "\\u0000")
            } else {
                format!("{field}.{}", key.replace('\0', "\\u0000"))
            };
            if key.contains('\0') {
                Some(path)
            } else {
                nul_in(item, &path)
            }
        }),
        _ => None,
    }
}

/// A required identifier: non-blank, without NUL, at most
/// [`MAX_IDENTIFIER_LENGTH`].
pub fn identifier(errors: &mut FieldErrors, field: &str, value: &Option<String>) -> String {
    let text = required_string(errors, field, value);
    if !valid_identifier(&text) {
        errors.add(field, codes::INVALID);
    }
    text
}

/// A decimal sent as a JSON string (e.g. `"0.0075"`), at least zero.
pub fn price(errors: &mut FieldErrors, field: &str, value: Option<&Value>) -> Option<Decimal> {
    match value {
        None | Some(Value::Null) => {
            errors.add(field, codes::MANDATORY);
            None
        }
        Some(Value::String(text)) => match parse_decimal(text) {
            Some(amount) if !within_bounds(amount) => {
                errors.add(field, codes::OUT_OF_RANGE);
                None
            }
            Some(amount) if amount >= Decimal::ZERO => Some(amount),
            _ => {
                errors.add(field, codes::INVALID_AMOUNT);
                None
            }
        },
        Some(_) => {
            errors.add(field, codes::INVALID_AMOUNT);
            None
        }
    }
}

/// An optional decimal string (absent → `None`, present but bad → error).
pub fn optional_price(
    errors: &mut FieldErrors,
    field: &str,
    value: Option<&Value>,
) -> Option<Decimal> {
    match value {
        None | Some(Value::Null) => None,
        present => price(errors, field, present),
    }
}

/// A decimal sent as a JSON number or string, exactly as written, within
/// [`MAX_MAGNITUDE`].
pub fn decimal_number_or_string(value: &Value) -> Option<Decimal> {
    unbounded_decimal(value).filter(|d| within_bounds(*d))
}

/// A decimal sent as a JSON number or string, exactly as written, of any
/// size (the caller applies the bounds and names the refusal).
pub fn unbounded_decimal(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(number) => parse_decimal(&number.to_string()),
        Value::String(text) => parse_decimal(text),
        _ => None,
    }
}

/// Plain decimal notation or scientific notation, exactly.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Decimal::from_str_exact(text)
        .ok()
        .or_else(|| Decimal::from_scientific(text).ok())
        .map(|d| d.normalize())
}

/// A whole number sent as a JSON number or a numeric string, within
/// [`MAX_MAGNITUDE`].
pub fn whole_number(value: &Value) -> Option<i64> {
    unbounded_whole_number(value).filter(|n| n.unsigned_abs() <= MAX_MAGNITUDE as u64)
}

fn unbounded_whole_number(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64().or_else(|| {
            let exact = parse_decimal(&number.to_string())?;
            (exact.fract().is_zero()).then(|| i64::from_str(&exact.trunc().to_string()).ok())?
        }),
        Value::String(text) => i64::from_str(text.trim()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_are_required_and_bounded() {
        let mut errors = FieldErrors::default();
        assert_eq!(
            identifier(&mut errors, "code", &Some(" cpu ".into())),
            "cpu"
        );
        identifier(&mut errors, "code", &Some("x".repeat(256)));
        identifier(&mut errors, "external_id", &Some("  ".into()));
        assert_eq!(errors.fields()["code"], vec![codes::INVALID.to_string()]);
        assert_eq!(
            errors.fields()["external_id"],
            vec![codes::MANDATORY.to_string()]
        );
    }

    #[test]
    fn prices_keep_every_digit() {
        let mut errors = FieldErrors::default();
        let rate = price(&mut errors, "amount", Some(&json!("0.0075")));
        assert_eq!(rate, Some(Decimal::new(75, 4)));
        let tiny = price(&mut errors, "amount", Some(&json!("0.000000123456789")));
        assert_eq!(tiny.unwrap().to_string(), "0.000000123456789");
        assert!(errors.is_empty());
    }

    #[test]
    fn prices_as_numbers_negative_or_not_decimal_are_refused() {
        for bad in [
            json!(0.0075),
            json!("-1"),
            json!("abc"),
            json!(""),
            json!(true),
        ] {
            let mut errors = FieldErrors::default();
            assert_eq!(price(&mut errors, "amount", Some(&bad)), None, "{bad}");
            assert_eq!(
                errors.fields()["amount"],
                vec![codes::INVALID_AMOUNT.to_string()],
                "{bad}"
            );
        }
        let mut errors = FieldErrors::default();
        assert_eq!(price(&mut errors, "amount", None), None);
        assert_eq!(
            errors.fields()["amount"],
            vec![codes::MANDATORY.to_string()]
        );
    }

    #[test]
    fn a_json_number_is_read_from_its_text_not_through_f64() {
        let value: Value = serde_json::from_str("13.000000000000000001").unwrap();
        assert_eq!(
            decimal_number_or_string(&value).unwrap().to_string(),
            "13.000000000000000001"
        );
    }

    #[test]
    fn numbers_beyond_the_bounds_are_refused() {
        let mut errors = FieldErrors::default();
        assert_eq!(
            price(&mut errors, "amount", Some(&json!("1000000000000000"))),
            Some(Decimal::from(MAX_MAGNITUDE))
        );
        assert_eq!(
            price(&mut errors, "amount", Some(&json!("1000000000000000.01"))),
            None
        );
        assert_eq!(
            errors.fields()["amount"],
            vec![codes::OUT_OF_RANGE.to_string()]
        );
        assert_eq!(
            whole_number(&json!(1_000_000_000_000_000i64)),
            Some(MAX_MAGNITUDE)
        );
        assert_eq!(whole_number(&json!(1_000_000_000_000_001i64)), None);
        assert_eq!(whole_number(&json!(i64::MIN)), None);
        assert_eq!(
            decimal_number_or_string(&json!("79228162514264337593543950335")),
            None
        );
        assert_eq!(
            unbounded_decimal(&json!("79228162514264337593543950335")),
            Some(Decimal::MAX)
        );
    }

    #[test]
    fn nul_characters_are_found_by_path() {
        let body = json!({"event": {"code": "cpu", "properties": {"region": "ca\u{0}", "ok": 1}}});
        assert_eq!(nul_in(&body, ""), Some("event.properties.region".into()));
        let key = json!({"event": {"properties": {"a\u{0}b": 1}}});
        assert_eq!(nul_in(&key, ""), Some("event.properties.a\\u0000b".into()));
        let batch = json!({"events": [{"transaction_id": "t1"}, {"transaction_id": "t\u{0}"}]});
        assert_eq!(nul_in(&batch, ""), Some("events[1].transaction_id".into()));
        assert_eq!(nul_in(&json!({"a": ["x", {"b": "y"}]}), ""), None);
        assert!(!valid_identifier("a\u{0}b"));
        assert!(!valid_identifier(&"x".repeat(256)));
        assert!(valid_identifier(&"x".repeat(255)));
    }
}
