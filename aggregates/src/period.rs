//! Billing periods: the half-open window `[start, end)` a moment bills in,
//! for every interval, calendar or anniversary, in the customer's IANA time
//! zone (DOMAIN.md lesson 15: an event exactly at a boundary belongs to the
//! next period).
//!
//! Calendar periods follow the calendar in the customer's zone: a month from
//! the 1st, a week from Monday, quarters from January/April/July/October,
//! half-years from January/July, years from January 1st, each from local
//! midnight. Anniversary periods start on the subscription's own local date
//! (its day of the month, clamped to a short month's last day, or its
//! weekday), at local midnight.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::plan::BillingInterval;
use crate::subscription::BillingTime;

/// A billing period `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingPeriod {
    /// First instant in the period.
    pub start: DateTime<Utc>,
    /// First instant of the next period.
    pub end: DateTime<Utc>,
}

impl BillingPeriod {
    /// Whether `at` falls in `[start, end)`.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && at < self.end
    }
}

/// How a subscription's periods are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodRule {
    /// The plan's interval.
    pub interval: BillingInterval,
    /// Calendar or anniversary.
    pub billing_time: BillingTime,
    /// The subscription's start (anchors anniversary periods).
    pub subscription_at: DateTime<Utc>,
    /// The customer's time zone.
    pub timezone: Tz,
}

/// Local midnight of `date` in `tz`, as an instant. Where midnight does not
/// exist (a DST jump at midnight), the first instant of that day.
pub(crate) fn local_midnight(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    match tz.from_local_datetime(&midnight) {
        chrono::LocalResult::Single(at) => at.with_timezone(&Utc),
        chrono::LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
        chrono::LocalResult::None => {
            // Skipped hour: the day starts when the clocks resume.
            (1..=3)
                .find_map(|hours| {
                    tz.from_local_datetime(&(midnight + chrono::Duration::hours(hours)))
                        .earliest()
                })
                .expect("a day starts within three hours of midnight")
                .with_timezone(&Utc)
        }
    }
}

fn months_per_period(interval: BillingInterval) -> Option<u32> {
    match interval {
        BillingInterval::Weekly => None,
        BillingInterval::Monthly => Some(1),
        BillingInterval::Quarterly => Some(3),
        BillingInterval::Semiannual => Some(6),
        BillingInterval::Yearly => Some(12),
    }
}

/// The anchor day-of-month `day` in the month `months` after `base`'s month,
/// clamped to that month's last day.
fn anchored_date(base_year: i32, base_month: u32, months: i64, day: u32) -> NaiveDate {
    let total = base_year as i64 * 12 + (base_month as i64 - 1) + months;
    let (year, month) = (total.div_euclid(12) as i32, total.rem_euclid(12) as u32 + 1);
    let first = NaiveDate::from_ymd_opt(year, month, 1).expect("valid month");
    let last_day = (first + Months::new(1) - Days::new(1)).day();
    first
        .with_day(day.min(last_day))
        .expect("clamped day exists")
}

/// The period in which `at` bills.
pub fn billing_period_for(rule: &PeriodRule, at: DateTime<Utc>) -> BillingPeriod {
    let local = at.with_timezone(&rule.timezone).date_naive();
    let (start, end) = match (rule.billing_time, months_per_period(rule.interval)) {
        (BillingTime::Calendar, None) => {
            let monday = local - Days::new(local.weekday().num_days_from_monday() as u64);
            (monday, monday + Days::new(7))
        }
        (BillingTime::Calendar, Some(step)) => {
            let month0 = local.month0() / step * step;
            let start = NaiveDate::from_ymd_opt(local.year(), month0 + 1, 1).expect("valid");
            (start, start + Months::new(step))
        }
        (BillingTime::Anniversary, None) => {
            let anchor = rule
                .subscription_at
                .with_timezone(&rule.timezone)
                .date_naive();
            let days = (local - anchor).num_days().div_euclid(7) * 7;
            let start = anchor + chrono::Duration::days(days);
            (start, start + Days::new(7))
        }
        (BillingTime::Anniversary, Some(step)) => {
            let anchor = rule
                .subscription_at
                .with_timezone(&rule.timezone)
                .date_naive();
            let months_between = (local.year() as i64 - anchor.year() as i64) * 12
                + (local.month() as i64 - anchor.month() as i64);
            let step = step as i64;
            let mut k = months_between.div_euclid(step);
            let date_of =
                |k: i64| anchored_date(anchor.year(), anchor.month(), k * step, anchor.day());
            while date_of(k) > local {
                k -= 1;
            }
            while date_of(k + 1) <= local {
                k += 1;
            }
            (date_of(k), date_of(k + 1))
        }
    };
    BillingPeriod {
        start: local_midnight(start, rule.timezone),
        end: local_midnight(end, rule.timezone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn rule(
        interval: BillingInterval,
        billing_time: BillingTime,
        subscription_at: &str,
        tz: &str,
    ) -> PeriodRule {
        PeriodRule {
            interval,
            billing_time,
            subscription_at: utc(subscription_at),
            timezone: tz.parse().unwrap(),
        }
    }

    fn period(r: &PeriodRule, at: &str) -> (String, String) {
        let p = billing_period_for(r, utc(at));
        (p.start.to_rfc3339(), p.end.to_rfc3339())
    }

    fn expect(start: &str, end: &str) -> (String, String) {
        (utc(start).to_rfc3339(), utc(end).to_rfc3339())
    }

    #[test]
    fn calendar_months_in_utc_are_half_open() {
        let r = rule(
            BillingInterval::Monthly,
            BillingTime::Calendar,
            "2026-01-13T10:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&r, "2026-02-28T23:59:59Z"),
            expect("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z")
        );
        // Exactly at the boundary: the next period.
        assert_eq!(
            period(&r, "2026-03-01T00:00:00Z"),
            expect("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")
        );
    }

    #[test]
    fn an_event_at_23_30_toronto_time_on_the_last_day_belongs_to_that_month() {
        let r = rule(
            BillingInterval::Monthly,
            BillingTime::Calendar,
            "2026-01-01T05:00:00Z",
            "America/Toronto",
        );
        // 2026-10-31 23:30 EDT is 2026-11-01 03:30 UTC.
        assert_eq!(
            period(&r, "2026-11-01T03:30:00Z"),
            expect("2026-10-01T04:00:00Z", "2026-11-01T04:00:00Z")
        );
    }

    #[test]
    fn a_period_spanning_a_dst_change_ends_at_local_midnight() {
        let r = rule(
            BillingInterval::Monthly,
            BillingTime::Calendar,
            "2026-01-01T05:00:00Z",
            "America/Toronto",
        );
        // November 2026 starts in EDT (UTC-4) and ends in EST (UTC-5).
        assert_eq!(
            period(&r, "2026-11-15T12:00:00Z"),
            expect("2026-11-01T04:00:00Z", "2026-12-01T05:00:00Z")
        );
    }

    #[test]
    fn calendar_weeks_quarters_half_years_and_years() {
        let weekly = rule(
            BillingInterval::Weekly,
            BillingTime::Calendar,
            "2026-01-01T00:00:00Z",
            "UTC",
        );
        // 2026-11-21 is a Saturday.
        assert_eq!(
            period(&weekly, "2026-11-21T12:00:00Z"),
            expect("2026-11-16T00:00:00Z", "2026-11-23T00:00:00Z")
        );
        let quarterly = rule(
            BillingInterval::Quarterly,
            BillingTime::Calendar,
            "2026-01-01T00:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&quarterly, "2026-11-21T12:00:00Z"),
            expect("2026-10-01T00:00:00Z", "2027-01-01T00:00:00Z")
        );
        let semiannual = rule(
            BillingInterval::Semiannual,
            BillingTime::Calendar,
            "2026-01-01T00:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&semiannual, "2026-06-30T23:59:59Z"),
            expect("2026-01-01T00:00:00Z", "2026-07-01T00:00:00Z")
        );
        let yearly = rule(
            BillingInterval::Yearly,
            BillingTime::Calendar,
            "2026-01-01T00:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&yearly, "2026-11-21T12:00:00Z"),
            expect("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn anniversary_from_the_31st_clamps_to_short_months() {
        let r = rule(
            BillingInterval::Monthly,
            BillingTime::Anniversary,
            "2026-01-31T15:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&r, "2026-02-10T00:00:00Z"),
            expect("2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z")
        );
        assert_eq!(
            period(&r, "2026-03-01T00:00:00Z"),
            expect("2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z")
        );
        assert_eq!(
            period(&r, "2026-04-30T12:00:00Z"),
            expect("2026-04-30T00:00:00Z", "2026-05-31T00:00:00Z")
        );
        // A leap year's February.
        let leap = rule(
            BillingInterval::Monthly,
            BillingTime::Anniversary,
            "2028-01-30T00:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&leap, "2028-02-29T10:00:00Z"),
            expect("2028-02-29T00:00:00Z", "2028-03-30T00:00:00Z")
        );
    }

    #[test]
    fn anniversary_weeks_and_years_start_on_the_subscription_day() {
        // 2026-11-13 is a Friday.
        let weekly = rule(
            BillingInterval::Weekly,
            BillingTime::Anniversary,
            "2026-11-13T09:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&weekly, "2026-11-21T12:00:00Z"),
            expect("2026-11-20T00:00:00Z", "2026-11-27T00:00:00Z")
        );
        let yearly = rule(
            BillingInterval::Yearly,
            BillingTime::Anniversary,
            "2024-02-29T09:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&yearly, "2026-03-01T00:00:00Z"),
            expect("2026-02-28T00:00:00Z", "2027-02-28T00:00:00Z")
        );
        let quarterly = rule(
            BillingInterval::Quarterly,
            BillingTime::Anniversary,
            "2026-01-15T00:00:00Z",
            "UTC",
        );
        assert_eq!(
            period(&quarterly, "2026-04-14T23:59:59Z"),
            expect("2026-01-15T00:00:00Z", "2026-04-15T00:00:00Z")
        );
    }

    #[test]
    fn anniversary_in_a_time_zone_starts_at_local_midnight() {
        let r = rule(
            BillingInterval::Monthly,
            BillingTime::Anniversary,
            "2026-03-13T03:00:00Z",
            "America/Toronto",
        );
        // Subscribed 2026-03-12 23:00 EDT: anchored on the 12th, local midnight.
        assert_eq!(
            period(&r, "2026-03-20T00:00:00Z"),
            expect("2026-03-12T04:00:00Z", "2026-04-12T04:00:00Z")
        );
    }
}
