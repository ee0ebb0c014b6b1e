//! Test fixtures shared by the billing law's tests: NexaCloud's Starter
//! plan and its CPU charge, and the parsing shorthands.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::billable_metric::{AggregationType, MetricRef};
use crate::charge::{Charge, Pricing};
use crate::plan::{BillingInterval, PlanDefinition};

/// An RFC 3339 instant.
pub fn utc(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// A decimal, exactly.
pub fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// NexaCloud's CPU charge: 36,000 CPU-seconds included, then $0.0075 per
/// 3,600 CPU-seconds.
fn cpu_charge() -> Charge {
    Charge {
        lago_id: Uuid::from_u128(8),
        metric: MetricRef {
            lago_id: Uuid::from_u128(9),
            code: "cpu_seconds".into(),
            aggregation_type: AggregationType::SumAgg,
        },
        pricing: Pricing::Standard {
            amount: d("0.0075"),
            free_units: d("36000"),
            unit_size: d("3600"),
        },
        pay_in_advance: false,
        invoiceable: true,
        min_amount_cents: 0,
    }
}

/// A monthly CAD plan with a flat fee and the CPU charge.
pub fn plan(code: &str, amount_cents: i64, pay_in_advance: bool) -> PlanDefinition {
    PlanDefinition {
        lago_id: Uuid::from_u128(7),
        version: 1,
        code: code.into(),
        name: code.into(),
        description: None,
        interval: BillingInterval::Monthly,
        amount_cents,
        amount_currency: "CAD".into(),
        pay_in_advance,
        trial_period: Decimal::ZERO,
        charges: vec![cpu_charge()],
        tax_codes: vec![],
    }
}
