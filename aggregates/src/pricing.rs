//! The pricing law: what a charge costs for a period's usage, in full
//! precision, and the one rounding rule. Current usage, invoices and every
//! replay call these functions; nothing else computes a price.
//!
//! Amounts are in currency units (dollars, not cents) and never rounded here
//! except by [`to_minor_units`], which rounds half away from zero (half-up
//! for the non-negative amounts billed) to the currency's minor unit, once,
//! on the fee.
//!
//! Every operation is checked: a sum, product or conversion that does not
//! fit (a decimal holds about 7.9 × 10²⁸, a bill's minor units 9.2 × 10¹⁸)
//! is an [`Overflow`], never a panic and never a wrapped or saturated
//! number. The bounds at the door ([`crate::wire::MAX_MAGNITUDE`]) keep
//! every real bill far from these limits; the checks are what guards a
//! value that reached the log anyway.

use iso_currency::Currency;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::charge::{PriceRange, Pricing};

/// A computation of a bill whose result does not fit: the usage or the
/// amount is beyond what a bill can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {0} is beyond what a bill can hold")]
pub struct Overflow(pub &'static str);

/// The result of a checked computation.
pub type Checked<T> = Result<T, Overflow>;

/// Checked operations on amounts and units (each names what overflowed).
pub mod checked {
    use rust_decimal::Decimal;

    use super::{Checked, Overflow};

    /// `a + b`.
    pub fn add(a: Decimal, b: Decimal, what: &'static str) -> Checked<Decimal> {
        a.checked_add(b).ok_or(Overflow(what))
    }

    /// `a - b`.
    pub fn sub(a: Decimal, b: Decimal, what: &'static str) -> Checked<Decimal> {
        a.checked_sub(b).ok_or(Overflow(what))
    }

    /// `a × b`.
    pub fn mul(a: Decimal, b: Decimal, what: &'static str) -> Checked<Decimal> {
        a.checked_mul(b).ok_or(Overflow(what))
    }

    /// `a ÷ b` (a zero divisor is an overflow too: it has no result).
    pub fn div(a: Decimal, b: Decimal, what: &'static str) -> Checked<Decimal> {
        a.checked_div(b).ok_or(Overflow(what))
    }

    /// The sum of `values`.
    pub fn sum(values: impl IntoIterator<Item = Decimal>, what: &'static str) -> Checked<Decimal> {
        values
            .into_iter()
            .try_fold(Decimal::ZERO, |total, value| add(total, value, what))
    }

    /// The sum of amounts in minor units.
    pub fn sum_minor(values: impl IntoIterator<Item = i64>, what: &'static str) -> Checked<i64> {
        values.into_iter().try_fold(0i64, |total, value| {
            total.checked_add(value).ok_or(Overflow(what))
        })
    }

    /// `a - b` in minor units.
    pub fn sub_minor(a: i64, b: i64, what: &'static str) -> Checked<i64> {
        a.checked_sub(b).ok_or(Overflow(what))
    }
}

use checked::{add, div, mul, sub};

const AMOUNT: &str = "charge amount";

/// A period's usage of one charge's metric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChargeUsage {
    /// Aggregated units (count, sum, max, ...).
    pub units: Decimal,
    /// Number of events.
    pub events_count: i64,
    /// Each event's value, in order (for per-event percentage rules).
    pub event_values: Vec<Decimal>,
}

/// The precise amount of a charge for `usage`.
pub fn charge_amount(pricing: &Pricing, usage: &ChargeUsage) -> Checked<Decimal> {
    let units = usage.units.max(Decimal::ZERO);
    match pricing {
        Pricing::Standard {
            amount,
            free_units,
            unit_size,
        } => {
            let paid = sub(units, *free_units, AMOUNT)?.max(Decimal::ZERO);
            div(mul(paid, *amount, AMOUNT)?, *unit_size, AMOUNT)
        }
        Pricing::Package {
            amount,
            free_units,
            package_size,
        } => {
            let paid = sub(units, *free_units, AMOUNT)?;
            if paid <= Decimal::ZERO {
                Ok(Decimal::ZERO)
            } else {
                mul(div(paid, *package_size, AMOUNT)?.ceil(), *amount, AMOUNT)
            }
        }
        Pricing::Graduated { ranges } => graduated(ranges, units),
        Pricing::GraduatedPercentage { ranges } => graduated(
            &ranges
                .iter()
                .map(|r| r.as_price_range())
                .collect::<Vec<_>>(),
            units,
        ),
        Pricing::Volume { ranges } => volume(ranges, units),
        Pricing::Percentage {
            rate,
            fixed_amount,
            free_units_per_events,
            free_units_per_total_aggregation,
            per_transaction_min_amount,
            per_transaction_max_amount,
        } => {
            let fixed_amount = fixed_amount.unwrap_or_default();
            let free_events = free_units_per_events.unwrap_or(0).max(0);
            let free_total = free_units_per_total_aggregation.unwrap_or_default();
            if per_transaction_min_amount.is_some() || per_transaction_max_amount.is_some() {
                percentage_per_event(
                    *rate,
                    fixed_amount,
                    free_events,
                    free_total,
                    *per_transaction_min_amount,
                    *per_transaction_max_amount,
                    &usage.event_values,
                )
            } else {
                percentage(*rate, fixed_amount, free_events, free_total, units, usage)
            }
        }
    }
}

/// Lago's `percentage` without per-transaction bounds. The free part is
/// made of whole first events (in the order of their timestamps): the first
/// `free_events` of them when set, else those whose running total stays
/// within `free_total` plus the one that crosses it. Their summed value,
/// capped at `free_total` when both are set, pays no rate; the events free
/// of the fixed fee are the first `free_events`, or, with `free_total`,
/// those whose running total stays below it (the fewer, when both are set).
fn percentage(
    rate: Decimal,
    fixed_amount: Decimal,
    free_events: i64,
    free_total: Decimal,
    units: Decimal,
    usage: &ChargeUsage,
) -> Checked<Decimal> {
    let mut running_totals = Vec::new();
    if free_events > 0 || free_total > Decimal::ZERO {
        let mut total = Decimal::ZERO;
        for value in &usage.event_values {
            if free_events > 0 {
                if running_totals.len() as i64 >= free_events {
                    break;
                }
            } else if free_total < total {
                break;
            }
            total = add(total, *value, AMOUNT)?;
            running_totals.push(total);
        }
    }
    let last = running_totals.last().copied().unwrap_or_default();
    let free_value = if free_total.is_zero() || last <= free_total {
        last
    } else {
        free_total
    };
    let share = if free_value > units {
        Decimal::ZERO
    } else {
        div(
            mul(sub(units, free_value, AMOUNT)?, rate, AMOUNT)?,
            Decimal::ONE_HUNDRED,
            AMOUNT,
        )?
    };
    let below_total = running_totals.iter().filter(|t| **t < free_total).count() as i64;
    let free_of_fee = [free_events, below_total]
        .into_iter()
        .filter(|n| *n > 0)
        .min()
        .unwrap_or(0);
    let fixed = if units.is_zero() || free_of_fee >= usage.events_count {
        Decimal::ZERO
    } else {
        mul(
            Decimal::from(usage.events_count - free_of_fee),
            fixed_amount,
            AMOUNT,
        )?
    };
    add(share, fixed, AMOUNT)
}

/// Each range prices the units above the previous range's `to_value` up to
/// its own; the flat amount of every range reached is charged. No usage
/// costs nothing (Lago: "does not apply the flat amount for 0").
fn graduated(ranges: &[PriceRange], units: Decimal) -> Checked<Decimal> {
    if units.is_zero() {
        return Ok(Decimal::ZERO);
    }
    let mut total = Decimal::ZERO;
    let mut floor = Decimal::ZERO;
    for (index, range) in ranges.iter().enumerate() {
        if index > 0 && units <= floor {
            break;
        }
        let ceiling = range.to_value.unwrap_or(Decimal::MAX);
        let in_range = sub(units.min(ceiling), floor, AMOUNT)?.max(Decimal::ZERO);
        let priced = mul(in_range, range.per_unit_amount, AMOUNT)?;
        total = add(total, add(range.flat_amount, priced, AMOUNT)?, AMOUNT)?;
        match range.to_value {
            Some(to) => floor = to,
            None => break,
        }
    }
    Ok(total)
}

/// The range holding the total prices every unit, plus its flat amount; no
/// usage costs nothing.
fn volume(ranges: &[PriceRange], units: Decimal) -> Checked<Decimal> {
    if units.is_zero() {
        return Ok(Decimal::ZERO);
    }
    let range = ranges
        .iter()
        .find(|range| range.to_value.is_none_or(|to| units <= to))
        .or(ranges.last());
    match range {
        None => Ok(Decimal::ZERO),
        Some(range) => add(
            mul(units, range.per_unit_amount, AMOUNT)?,
            range.flat_amount,
            AMOUNT,
        ),
    }
}

/// Lago's `percentage` with per-transaction bounds: each event pays its rate
/// and the fixed fee, raised to the minimum or capped at the maximum; the
/// first events are free while free events or a free total remain (the
/// event that exhausts the free total pays on what exceeds it).
fn percentage_per_event(
    rate: Decimal,
    fixed_amount: Decimal,
    free_events: i64,
    free_total: Decimal,
    min: Option<Decimal>,
    max: Option<Decimal>,
    values: &[Decimal],
) -> Checked<Decimal> {
    let mut free_events_left = free_events;
    let mut free_left = free_total;
    let mut total = Decimal::ZERO;
    for value in values {
        let mut value = *value;
        if free_events_left > 0 || free_left > Decimal::ZERO {
            free_events_left -= 1;
            if free_left <= Decimal::ZERO {
                continue;
            }
            if free_left > value {
                free_left = sub(free_left, value, AMOUNT)?;
                continue;
            }
            value = sub(value, free_left, AMOUNT)?;
            free_left = Decimal::ZERO;
            free_events_left = 0;
        }
        let mut amount = add(
            div(mul(value, rate, AMOUNT)?, Decimal::ONE_HUNDRED, AMOUNT)?,
            fixed_amount,
            AMOUNT,
        )?;
        if let Some(min) = min.filter(|min| amount < *min) {
            amount = min;
        } else if let Some(max) = max.filter(|max| amount > *max) {
            amount = max;
        }
        total = add(total, amount, AMOUNT)?;
    }
    Ok(total)
}

/// The currency's minor-unit exponent (2 for CAD, 0 for JPY, 3 for KWD).
pub fn minor_unit_exponent(currency: &str) -> u32 {
    Currency::from_code(currency)
        .and_then(|c| c.exponent())
        .map(u32::from)
        .unwrap_or(2)
}

/// Round a precise amount to the currency's minor unit, half away from zero,
/// and express it in minor units (cents).
pub fn to_minor_units(amount: Decimal, currency: &str) -> Checked<i64> {
    let exponent = minor_unit_exponent(currency);
    let rounded = amount.round_dp_with_strategy(exponent, RoundingStrategy::MidpointAwayFromZero);
    let minor = mul(rounded, Decimal::from(10i64.pow(exponent)), "amount")?;
    minor.trunc().try_into().map_err(|_| Overflow("amount"))
}

/// The tax rule: each of the customer's tax rates applies to the sum of the
/// (already rounded) fees, in minor units, and is rounded half-up to the
/// minor unit; the taxes are the sum of those amounts.
pub fn tax_minor_units(fees_minor_units: i64, rates_percent: &[Decimal]) -> Checked<i64> {
    let taxes = rates_percent.iter().map(|rate| {
        let tax = div(
            mul(Decimal::from(fees_minor_units), *rate, "tax")?,
            Decimal::ONE_HUNDRED,
            "tax",
        )?;
        let rounded = tax.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
        i64::try_from(rounded).map_err(|_| Overflow("tax"))
    });
    checked::sum_minor(taxes.collect::<Checked<Vec<i64>>>()?, "tax")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    fn amount_of(pricing: &Pricing, usage: &ChargeUsage) -> Decimal {
        charge_amount(pricing, usage).expect("fits")
    }

    fn cents_of(amount: Decimal, currency: &str) -> i64 {
        to_minor_units(amount, currency).expect("fits")
    }

    fn tax_of(cents: i64, rates: &[Decimal]) -> i64 {
        tax_minor_units(cents, rates).expect("fits")
    }

    fn usage(units: &str, events: i64) -> ChargeUsage {
        ChargeUsage {
            units: d(units),
            events_count: events,
            event_values: vec![],
        }
    }

    fn nexacloud() -> Pricing {
        Pricing::Standard {
            amount: d("0.0075"),
            free_units: d("36000"),
            unit_size: d("3600"),
        }
    }

    #[test]
    fn sub_cent_rates_survive_until_the_fee_is_rounded() {
        // 2,400 CPU-seconds over the quota: exactly $0.005, one cent.
        let amount = amount_of(&nexacloud(), &usage("38400", 10));
        assert_eq!(amount, d("0.005"));
        assert_eq!(cents_of(amount, "CAD"), 1);
        // 1,000 seconds over: $0.00208333..., zero cents.
        let amount = amount_of(&nexacloud(), &usage("37000", 10));
        assert_eq!(amount.round_dp(10), d("0.0020833333"));
        assert_eq!(cents_of(amount, "CAD"), 0);
        // Within the quota: nothing.
        assert_eq!(amount_of(&nexacloud(), &usage("36000", 3)), Decimal::ZERO);
    }

    #[test]
    fn standard_without_extras_is_units_times_amount() {
        let pricing = Pricing::Standard {
            amount: d("0.25"),
            free_units: Decimal::ZERO,
            unit_size: Decimal::ONE,
        };
        assert_eq!(amount_of(&pricing, &usage("7", 7)), d("1.75"));
    }

    #[test]
    fn package_charges_each_started_package_beyond_the_free_units() {
        let pricing = Pricing::Package {
            amount: d("5"),
            free_units: d("100"),
            package_size: d("1000"),
        };
        assert_eq!(amount_of(&pricing, &usage("100", 1)), d("0"));
        assert_eq!(amount_of(&pricing, &usage("101", 1)), d("5"));
        assert_eq!(amount_of(&pricing, &usage("1100", 1)), d("5"));
        assert_eq!(amount_of(&pricing, &usage("1101", 1)), d("10"));
    }

    fn ranges(spec: &[(i64, Option<i64>, &str, &str)]) -> Vec<PriceRange> {
        spec.iter()
            .map(|(from, to, per_unit, flat)| PriceRange {
                from_value: Decimal::from(*from),
                to_value: to.map(Decimal::from),
                per_unit_amount: d(per_unit),
                flat_amount: d(flat),
            })
            .collect()
    }

    #[test]
    fn graduated_prices_each_range_and_every_flat_fee_reached() {
        let pricing = Pricing::Graduated {
            ranges: ranges(&[
                (0, Some(10), "1", "2"),
                (11, Some(20), "0.5", "3"),
                (21, None, "0.1", "0"),
            ]),
        };
        assert_eq!(
            amount_of(&pricing, &usage("0", 0)),
            d("0"),
            "no flat fee without usage"
        );
        assert_eq!(
            amount_of(&pricing, &usage("10", 1)),
            d("12"),
            "edge: all in the first range"
        );
        assert_eq!(
            amount_of(&pricing, &usage("11", 1)),
            d("15.5"),
            "10×1+2 + 1×0.5+3"
        );
        assert_eq!(
            amount_of(&pricing, &usage("20", 1)),
            d("20"),
            "10×1+2 + 10×0.5+3"
        );
        assert_eq!(amount_of(&pricing, &usage("25", 1)), d("20.5"), "+ 5×0.1");
    }

    #[test]
    fn volume_prices_every_unit_at_the_range_holding_the_total() {
        let pricing = Pricing::Volume {
            ranges: ranges(&[(0, Some(100), "2", "0"), (101, None, "1", "10")]),
        };
        assert_eq!(amount_of(&pricing, &usage("0", 0)), d("0"));
        assert_eq!(
            amount_of(&pricing, &usage("100", 1)),
            d("200"),
            "edge: still the first range"
        );
        assert_eq!(amount_of(&pricing, &usage("101", 1)), d("111"));
    }

    /// Lago's `standard_service_spec.rb` (10 units at 5.00) and
    /// `package_service_spec.rb` (packages of 10 at 1.00, 121 units, with and
    /// without 10 free units).
    #[test]
    fn standard_and_package_match_lagos_spec_cases() {
        let standard = Pricing::Standard {
            amount: d("5"),
            free_units: d("0"),
            unit_size: d("1"),
        };
        assert_eq!(amount_of(&standard, &usage("10", 1)), d("50"));
        let package = |free: &str| Pricing::Package {
            amount: d("1"),
            free_units: d(free),
            package_size: d("10"),
        };
        assert_eq!(amount_of(&package("0"), &usage("121", 1)), d("13"));
        assert_eq!(amount_of(&package("10"), &usage("121", 1)), d("12"));
    }

    /// Lago's `graduated_service_spec.rb`: 0–10 at 0.10 + 0.02 flat, 11 and
    /// above at 0.05 + 0.03 flat; and decimal units across a bound.
    #[test]
    fn graduated_matches_lagos_spec_cases() {
        let pricing = Pricing::Graduated {
            ranges: ranges(&[(0, Some(10), "0.10", "0.02"), (11, None, "0.05", "0.03")]),
        };
        for (units, expected) in [
            ("0", "0"),
            ("1", "0.12"),
            ("10", "1.02"),
            ("11", "1.10"),
            ("12", "1.15"),
            // 10 × 0.10 + 0.02 + 0.5 × 0.05 + 0.03
            ("10.5", "1.075"),
        ] {
            assert_eq!(
                amount_of(&pricing, &usage(units, 1)),
                d(expected),
                "{units} units"
            );
        }
    }

    /// Lago's `volume_service_spec.rb`: 0–100 at 2 + 10 flat, 101–200 at 1,
    /// 201 and above at 0.5 + 50 flat.
    #[test]
    fn volume_matches_lagos_spec_cases() {
        let pricing = Pricing::Volume {
            ranges: ranges(&[
                (0, Some(100), "2", "10"),
                (101, Some(200), "1", "0"),
                (201, None, "0.5", "50"),
            ]),
        };
        for (units, expected) in [
            ("0", "0"),
            ("1", "12"),
            ("100", "210"),
            ("100.5", "100.5"),
            ("101", "101"),
            ("200", "200"),
            ("300", "200"),
        ] {
            assert_eq!(
                amount_of(&pricing, &usage(units, 1)),
                d(expected),
                "{units} units"
            );
        }
    }

    /// Lago's `graduated_percentage_service_spec.rb`: 0–10 at 1% + 200 flat,
    /// 11–20 at 2% + 300 flat, 21 and above at 3% + 400 flat.
    #[test]
    fn graduated_percentage_matches_lagos_spec_cases() {
        let rate_range =
            |from: i64, to: Option<i64>, rate: &str, flat: &str| crate::charge::RateRange {
                from_value: Decimal::from(from),
                to_value: to.map(Decimal::from),
                rate: d(rate),
                flat_amount: d(flat),
            };
        let pricing = Pricing::GraduatedPercentage {
            ranges: vec![
                rate_range(0, Some(10), "1", "200"),
                rate_range(11, Some(20), "2", "300"),
                rate_range(21, None, "3", "400"),
            ],
        };
        for (units, expected) in [
            ("0", "0"),
            ("1", "200.01"),
            ("10", "200.1"),
            ("11", "500.12"),
            ("12", "500.14"),
            ("21", "900.33"),
        ] {
            assert_eq!(
                amount_of(&pricing, &usage(units, 1)),
                d(expected),
                "{units} units"
            );
        }
    }

    fn events(values: &[&str]) -> ChargeUsage {
        let event_values: Vec<Decimal> = values.iter().map(|v| d(v)).collect();
        ChargeUsage {
            units: event_values.iter().sum(),
            events_count: event_values.len() as i64,
            event_values,
        }
    }

    fn percentage(
        rate: &str,
        fixed: Option<&str>,
        free_events: Option<i64>,
        free_total: Option<&str>,
    ) -> Pricing {
        Pricing::Percentage {
            rate: d(rate),
            fixed_amount: fixed.map(d),
            free_units_per_events: free_events,
            free_units_per_total_aggregation: free_total.map(d),
            per_transaction_min_amount: None,
            per_transaction_max_amount: None,
        }
    }

    /// Lago's `percentage_service_spec.rb`: 800 units over 4 events whose
    /// running totals are 50, 150, 400 (events 50, 100, 250, 400), rate 1.3%,
    /// fixed 2.0.
    #[test]
    fn percentage_matches_lagos_spec_cases() {
        let four = events(&["50", "100", "250", "400"]);
        let cases = [
            // free events 3 and free total 250: (800 - 250) × 1.3% + (4 - 2) × 2
            (Some(3), Some("250.0"), "11.15"),
            // free total 250 only: the same
            (None, Some("250.0"), "11.15"),
            // 3 free events only: (800 - 400) × 1.3% + (4 - 3) × 2
            (Some(3), None, "7.20"),
            // nothing free: 800 × 1.3% + 4 × 2
            (None, None, "18.40"),
            // a free total above the last running total: (800 - 400) × 1.3% + 1 × 2
            (Some(3), Some("500.0"), "7.20"),
        ];
        for (free_events, free_total, expected) in cases {
            let pricing = percentage("1.3", Some("2.0"), free_events, free_total);
            assert_eq!(
                amount_of(&pricing, &four),
                d(expected),
                "free events {free_events:?}, free total {free_total:?}"
            );
        }
        // No units: nothing, not even the fixed fee.
        let nothing = events(&["0", "0", "0", "0"]);
        let pricing = percentage("1.3", Some("2.0"), Some(3), Some("250.0"));
        assert_eq!(amount_of(&pricing, &nothing), d("0"));
        // Rate 0: only the fixed fee of every event.
        let pricing = percentage("0", Some("2.0"), None, None);
        assert_eq!(amount_of(&pricing, &four), d("8.0"));
        // More free events than events: 400 units over 4 events, all free.
        let all_free = events(&["50", "100", "250", "0"]);
        let pricing = percentage("1.3", Some("2.0"), Some(5), None);
        assert_eq!(amount_of(&pricing, &all_free), d("0"));
    }

    /// The first free events pay neither the rate nor the fixed fee (the
    /// old system billed 2.5% of every unit: $12.60 instead of $9.10).
    #[test]
    fn free_events_are_free_entirely() {
        let pricing = percentage("2.5", Some("0.05"), Some(2), None);
        // (500 - 140) × 2.5% + (4 - 2) × 0.05
        let usage = events(&["100", "40", "60", "300"]);
        assert_eq!(cents_of(amount_of(&pricing, &usage), "USD"), 910);
        // 1.2% + $0.10, first 3 events or $500 free, events 200/100/100/50:
        // free 400 (the running total of the 3 free events, within 500);
        // 50 × 1.2% + 1 × 0.10
        let pricing = percentage("1.2", Some("0.10"), Some(3), Some("500"));
        let usage = events(&["200", "100", "100", "50"]);
        assert_eq!(amount_of(&pricing, &usage), d("0.70"));
    }

    #[test]
    fn percentage_per_transaction_bounds_apply_to_each_event() {
        let pricing = Pricing::Percentage {
            rate: d("1"),
            fixed_amount: None,
            free_units_per_events: None,
            free_units_per_total_aggregation: None,
            per_transaction_min_amount: Some(d("0.50")),
            per_transaction_max_amount: Some(d("2")),
        };
        let usage = ChargeUsage {
            units: d("1010"),
            events_count: 2,
            event_values: vec![d("10"), d("1000")],
        };
        // 10 → 0.10 raised to 0.50; 1000 → 10 capped at 2.
        assert_eq!(amount_of(&pricing, &usage), d("2.50"));
    }

    #[test]
    fn each_tax_rate_applies_to_the_fees_and_rounds_half_up() {
        // 13% HST on $19.01: 247.13 cents → 247.
        assert_eq!(tax_of(1901, &[d("13")]), 247);
        // 13% on $0.50 = 6.5 cents → 7 (half-up).
        assert_eq!(tax_of(50, &[d("13")]), 7);
        // GST 5% + QST 9.975% on $100: 500 + 997.5 → 500 + 998.
        assert_eq!(tax_of(10000, &[d("5"), d("9.975")]), 1498);
        assert_eq!(tax_of(10000, &[]), 0);
    }

    #[test]
    fn rounding_is_half_up_to_the_currency_minor_unit() {
        assert_eq!(cents_of(d("0.005"), "USD"), 1);
        assert_eq!(cents_of(d("0.00499999"), "USD"), 0);
        assert_eq!(cents_of(d("10.125"), "CAD"), 1013);
        assert_eq!(cents_of(d("1234.5"), "JPY"), 1235);
        assert_eq!(cents_of(d("1.2345"), "KWD"), 1235);
    }

    #[test]
    fn amounts_beyond_what_a_bill_holds_are_overflows_not_wrapped_numbers() {
        let cent_per_unit = Pricing::Standard {
            amount: d("0.01"),
            free_units: Decimal::ZERO,
            unit_size: Decimal::ONE,
        };
        // 10^21 units at $0.01: $10^19, more cents than an i64 holds.
        let amount = amount_of(&cent_per_unit, &usage("1000000000000000000000", 1));
        assert_eq!(amount, d("10000000000000000000"));
        assert_eq!(to_minor_units(amount, "USD"), Err(Overflow("amount")));
        // The decimal type's maximum times a price does not fit a decimal.
        let dollar = Pricing::Standard {
            amount: d("2"),
            free_units: Decimal::ZERO,
            unit_size: Decimal::ONE,
        };
        let most = ChargeUsage {
            units: Decimal::MAX,
            events_count: 1,
            event_values: vec![],
        };
        assert_eq!(
            charge_amount(&dollar, &most),
            Err(Overflow("charge amount"))
        );
        // A tax on the largest amount overflows instead of saturating.
        assert_eq!(tax_minor_units(i64::MAX, &[d("200")]), Err(Overflow("tax")));
        assert_eq!(
            tax_minor_units(i64::MAX / 2, &[d("100"), d("100")]),
            Ok(i64::MAX - 1)
        );
        assert_eq!(
            tax_minor_units(i64::MAX / 2 + 1, &[d("100"), d("100")]),
            Err(Overflow("tax"))
        );
    }
}
