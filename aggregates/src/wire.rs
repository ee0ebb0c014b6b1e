//! Reading the raw values a command carries (as a client sent them) into
//! domain values, recording a field error instead of guessing. Prices must
//! be decimal strings, never JSON numbers (a float has already lost digits
//! by the time it is a number); they are parsed exactly, never through f64.

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

/// The longest identifier (code, external id) accepted: they are keys of
/// indexes, and nobody's real identifier is longer.
pub const MAX_IDENTIFIER_LENGTH: usize = 255;

/// A required identifier: non-blank and at most [`MAX_IDENTIFIER_LENGTH`].
pub fn identifier(errors: &mut FieldErrors, field: &str, value: &Option<String>) -> String {
    let text = required_string(errors, field, value);
    if text.chars().count() > MAX_IDENTIFIER_LENGTH {
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

/// A decimal sent as a JSON number or string, exactly as written.
pub fn decimal_number_or_string(value: &Value) -> Option<Decimal> {
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

/// A whole number sent as a JSON number or a numeric string.
pub fn whole_number(value: &Value) -> Option<i64> {
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
}
